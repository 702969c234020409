//! The conditions Weir reports on its resources, in one place: their types, their reasons, and
//! the kube-free shape both modes serve (`/v1/status` in standalone mode, `.status.conditions`
//! written by the operator). `docs/status.md` describes each one.

use std::fmt;

use serde::Serialize;

/// The type of a condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, utoipa::ToSchema)]
pub enum ConditionType {
    /// Every kind: the resource is valid and runs.
    Ready,
    /// EventStream: the RabbitMQ exchange is declared and the broker connected.
    BrokerReady,
    /// EventStream with a store: the stream's rows exist and the database answers.
    StoreReady,
    /// Subscription: the last delivery reached the sink (information, not a gate of Ready).
    SinkReachable,
    /// Subscription: catch-up from the store is over, live delivery runs.
    CaughtUp,
    /// Subscription: the delivery order in force (always True; the reason says which).
    Ordering,
    /// ArchivePolicy: the last archive run of every selected stream succeeded.
    ArchiveHealthy,
}

impl ConditionType {
    /// Every type Weir reports.
    pub const ALL: [ConditionType; 7] = [
        ConditionType::Ready,
        ConditionType::BrokerReady,
        ConditionType::StoreReady,
        ConditionType::SinkReachable,
        ConditionType::CaughtUp,
        ConditionType::Ordering,
        ConditionType::ArchiveHealthy,
    ];

    /// Whether `type_` is one Weir reports (rather than one another controller set).
    pub fn is_weir(type_: &str) -> bool {
        Self::ALL.iter().any(|t| t.as_str() == type_)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Ready => "Ready",
            ConditionType::BrokerReady => "BrokerReady",
            ConditionType::StoreReady => "StoreReady",
            ConditionType::SinkReachable => "SinkReachable",
            ConditionType::CaughtUp => "CaughtUp",
            ConditionType::Ordering => "Ordering",
            ConditionType::ArchiveHealthy => "ArchiveHealthy",
        }
    }
}

impl fmt::Display for ConditionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The reasons of the conditions (besides the spec problems' reasons, which are
/// [`crate::topology::Reason`]'s names: `InvalidSpec`, `SecretNotFound`, ...).
pub mod reason {
    /// Ready=True.
    pub const READY: &str = "Ready";
    /// Ready=False: valid, but not running in this worker (set-up failed or has not happened).
    pub const NOT_RUNNING: &str = "NotRunning";
    /// Ready=False on a Subscription whose EventStream is being deleted.
    pub const STREAM_DELETED: &str = "StreamDeleted";
    /// BrokerReady / StoreReady = True.
    pub const CONNECTED: &str = "Connected";
    /// StoreReady=False while the stream's rows are created.
    pub const PROVISIONING: &str = "Provisioning";
    /// Ready=False of a Subscription whose queues or catch-up could not be set up for a
    /// reason that is neither the store nor the broker being down.
    pub const PROVISIONING_FAILED: &str = "ProvisioningFailed";
    /// StoreReady=False: the database does not answer, or set-up failed.
    pub const STORE_UNAVAILABLE: &str = "StoreUnavailable";
    /// BrokerReady=False (and Ready=False of a Subscription whose queues cannot be set up).
    pub const BROKER_UNAVAILABLE: &str = "BrokerUnavailable";
    /// SinkReachable=True: the last delivery was accepted, or none was attempted yet.
    pub const DELIVERED: &str = "Delivered";
    /// SinkReachable=False: the last delivery failed (connection, timeout or error status).
    pub const DELIVERY_FAILED: &str = "DeliveryFailed";
    /// CaughtUp=True.
    pub const LIVE: &str = "Live";
    /// CaughtUp=False: queues being provisioned or stored events replayed.
    pub const CATCHING_UP: &str = "CatchingUp";
    /// Ready=True and CaughtUp=False of a Subscription with `consumers: 0`: provisioned, no
    /// consumer runs, events accumulate in its queues.
    pub const SCALED_TO_ZERO: &str = "ScaledToZero";
    /// Ordering: no order between events.
    pub const UNORDERED: &str = "Unordered";
    /// Ordering: `perKey` with one partition, every event in order.
    pub const SERIAL: &str = "Serial";
    /// Ordering: `perKey` over several partitions, in order per key.
    pub const PER_KEY: &str = "PerKey";
    /// ArchiveHealthy=True.
    pub const ARCHIVING: &str = "Archiving";
    /// ArchiveHealthy=False (and Ready=False): an archive run failed.
    pub const ARCHIVE_FAILED: &str = "ArchiveFailed";
}

/// One condition, as both modes show it (the operator adds `lastTransitionTime` and
/// `observedGeneration`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct StatusCondition {
    #[serde(rename = "type")]
    pub type_: ConditionType,
    /// `"True"` or `"False"`.
    #[schema(value_type = String)]
    pub status: &'static str,
    pub reason: String,
    pub message: String,
}

impl StatusCondition {
    pub fn new(
        type_: ConditionType,
        ok: bool,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> StatusCondition {
        StatusCondition {
            type_,
            status: if ok { "True" } else { "False" },
            reason: reason.into(),
            message: message.into(),
        }
    }

    pub fn is_true(&self) -> bool {
        self.status == "True"
    }
}

/// The state of one dependency of a stream (its broker, its store) as this process sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dependency {
    pub ok: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Dependency {
    pub fn up(reason: &'static str) -> Dependency {
        Dependency {
            ok: true,
            reason,
            message: String::new(),
        }
    }

    pub fn down(reason: &'static str, message: impl Into<String>) -> Dependency {
        Dependency {
            ok: false,
            reason,
            message: message.into(),
        }
    }

    pub fn condition(&self, type_: ConditionType) -> StatusCondition {
        StatusCondition::new(type_, self.ok, self.reason, self.message.clone())
    }
}
