//! The status of every resource, computed once for both modes: standalone mode serves it at
//! `/v1/status`, the operator writes it to each object's `.status` (adding transition times).
//!
//! Computed from memory only (the last applied topology's reports and what the running
//! streams, subscriptions, archivers and caches record): it answers at once whatever the
//! database or broker do, and takes no lock an apply holds across an await.

use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::data::conditions::{ConditionType, StatusCondition, reason};
use crate::data::plane::{Plane, View};
use crate::topology::{Key, Kind, OrderingPlan, Report};

/// One resource as both modes report it.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ResourceStatus {
    /// `EventStream`, `Subscription`, `ArchivePolicy` or `CachePolicy`.
    #[serde(serialize_with = "kind_name")]
    #[schema(value_type = String)]
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    /// The `metadata.generation` this status describes.
    pub generation: i64,
    /// Whether the `Ready` condition is `True`.
    pub ready: bool,
    /// `Ready` first, then the others by type.
    pub conditions: Vec<StatusCondition>,
    /// The kind's own status fields (each listed in docs/status.md).
    #[schema(value_type = Object)]
    pub fields: Fields,
}

fn kind_name<S: serde::Serializer>(k: &Kind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(k.as_str())
}

impl ResourceStatus {
    pub fn key(&self) -> Key {
        Key::new(self.namespace.clone(), self.name.clone())
    }

    /// The `Ready` condition (always present).
    pub fn ready_condition(&self) -> Option<&StatusCondition> {
        self.conditions
            .iter()
            .find(|c| c.type_ == ConditionType::Ready)
    }
}

/// The status fields of each kind. Serialised as one flat object (`/v1/status`'s `fields`);
/// the operator copies them into the kind's status struct under the same names.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Fields {
    EventStream(StreamFields),
    Subscription(SubscriptionFields),
    ArchivePolicy(ArchiveFields),
    CachePolicy(CacheFields),
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamFields {
    /// URL that publishers POST events to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The RabbitMQ exchange the stream publishes to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exchange: Option<String>,
    /// Highest position this worker knows to be committed, as a string of digits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionFields {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// The partition queues (`ordering: perKey`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition_queues: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter_queue: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumers: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backlog: Option<u64>,
    /// Last delivered position, as a string of digits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<String>,
    /// Something a person should know that is not a failure (e.g. a catch-up skipped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
    /// The streams read, by name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streams: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ArchiveFields {
    /// When an archiver of the policy last finished a run (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_run: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archived_events: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archived_bytes: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression_ratio: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheFields {
    /// Hits divided by lookups on this worker, e.g. `"0.97"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hit_ratio: Option<String>,
    /// Entries held on this worker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entries: Option<u64>,
}

/// The `Ready=False` a report's problems imply, if any: the first problem's reason, every
/// problem in the message (`"; "`-separated, each as `path: message`).
pub fn spec_condition(report: &Report) -> Option<StatusCondition> {
    let first = report.problems.first()?;
    let message = report
        .problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    Some(StatusCondition::new(
        ConditionType::Ready,
        false,
        first.reason.as_str(),
        message,
    ))
}

/// What one resource's runtime says, before `Ready` is derived.
struct Observed {
    /// Conditions besides `Ready`.
    conditions: Vec<StatusCondition>,
    /// Conditions whose `False` makes the resource not ready.
    gates: Vec<ConditionType>,
    /// Why a valid resource is not ready when no gating condition says it (reason, message).
    not_ready: Option<(String, String)>,
    /// The reason and message of `Ready=True` when it is not plain `Ready` (a subscription
    /// scaled to zero).
    ready_as: Option<(&'static str, String)>,
    fields: Fields,
}

impl Plane {
    /// The status of every resource of the last applied topology.
    pub fn resources(&self) -> Vec<ResourceStatus> {
        let view = self.view();
        view.built
            .reports
            .iter()
            .map(|r| self.status_of(&view, r))
            .collect()
    }

    /// The status of one resource, if the last applied topology has it.
    pub fn observe(&self, kind: Kind, key: &Key) -> Option<ResourceStatus> {
        let view = self.view();
        let report = view.built.report(kind, key)?;
        Some(self.status_of(&view, report))
    }

    fn status_of(&self, view: &View, r: &Report) -> ResourceStatus {
        let o = match r.kind {
            Kind::EventStream => self.stream_status(view, &r.key),
            Kind::Subscription => self.subscription_status(view, &r.key),
            Kind::ArchivePolicy => self.archive_status(&r.key),
            Kind::CachePolicy => self.cache_status(&r.key),
        };
        let kept = view.kept.contains(&(r.kind, r.key.clone()));
        let ready = match spec_condition(r) {
            Some(mut c) => {
                if kept {
                    c.message = format!(
                        "the new version is invalid, the previous one keeps running: {}",
                        c.message
                    );
                }
                c
            }
            None => match (
                &o.not_ready,
                o.conditions
                    .iter()
                    .find(|c| !c.is_true() && o.gates.contains(&c.type_)),
            ) {
                (Some((reason, message)), _) => {
                    StatusCondition::new(ConditionType::Ready, false, reason, message)
                }
                (None, Some(bad)) => {
                    StatusCondition::new(ConditionType::Ready, false, &bad.reason, &bad.message)
                }
                (None, None) => match &o.ready_as {
                    Some((reason, message)) => {
                        StatusCondition::new(ConditionType::Ready, true, *reason, message)
                    }
                    None => StatusCondition::new(ConditionType::Ready, true, reason::READY, ""),
                },
            },
        };
        let mut conditions = o.conditions;
        conditions.sort_by_key(|c| c.type_.as_str());
        let is_ready = ready.is_true();
        conditions.insert(0, ready);
        ResourceStatus {
            kind: r.kind,
            namespace: r.key.namespace.clone(),
            name: r.key.name.clone(),
            generation: r.generation,
            ready: is_ready,
            conditions,
            fields: o.fields,
        }
    }

    fn stream_status(&self, view: &View, key: &Key) -> Observed {
        let mut fields = StreamFields::default();
        let mut conditions = Vec::new();
        let mut not_ready = None;
        match self.engine.stream(&key.namespace, &key.name) {
            Some(rt) => {
                conditions.push(rt.broker_condition().condition(ConditionType::BrokerReady));
                if let Some(c) = rt.store_condition() {
                    conditions.push(c.condition(ConditionType::StoreReady));
                    fields.head = Some(rt.health.head.load(Ordering::Acquire).to_string());
                }
                fields.exchange = Some(rt.plan.broker.exchange.clone());
                fields.endpoint = Some(format!(
                    "{}/v1/namespaces/{}/streams/{}/events",
                    self.endpoint_base.trim_end_matches('/'),
                    key.namespace,
                    key.name
                ));
            }
            None => {
                let why = view
                    .stream_errors
                    .get(key)
                    .cloned()
                    .unwrap_or_else(|| "not started yet".to_string());
                not_ready = Some((reason::NOT_RUNNING.to_string(), why));
            }
        }
        Observed {
            conditions,
            gates: vec![ConditionType::BrokerReady, ConditionType::StoreReady],
            not_ready,
            ready_as: None,
            fields: Fields::EventStream(fields),
        }
    }

    fn subscription_status(&self, view: &View, key: &Key) -> Observed {
        // `selector` (of `/scale`) is the operator's to fill: it knows its Pods' labels.
        let mut fields = SubscriptionFields::default();
        let mut conditions = Vec::new();
        let mut not_ready = None;
        let mut ready_as = None;
        let mut gates = vec![ConditionType::CaughtUp];
        let plan = view.built.topology.subscriptions.get(key);
        if let Some(plan) = plan {
            fields.streams = Some(plan.streams.iter().map(|k| k.name.clone()).collect());
            // A multi-stream subscription reads on while one of its streams goes: the
            // stream leaves its set once deleted.
            if !plan.multi && view.deleting_streams.contains(plan.stream()) {
                not_ready = Some((
                    reason::STREAM_DELETED.to_string(),
                    format!("EventStream {} is being deleted", plan.stream()),
                ));
            }
        }
        match self.subscriptions.get(key) {
            Some((runner, plan)) => {
                let st = &runner.state;
                let (sink_ok, sink_msg) = st
                    .sink()
                    .unwrap_or((true, "no delivery attempted yet".to_string()));
                conditions.push(StatusCondition::new(
                    ConditionType::SinkReachable,
                    sink_ok,
                    if sink_ok {
                        reason::DELIVERED
                    } else {
                        reason::DELIVERY_FAILED
                    },
                    sink_msg,
                ));
                let caught_up = st.caught_up.load(Ordering::Acquire);
                if st.scaled_to_zero.load(Ordering::Acquire) {
                    // Provisioned and parked on purpose: ready (nothing is lost, events
                    // accumulate), but not live, so CaughtUp says so without gating Ready.
                    let message = "consumers is 0: no consumer runs; events accumulate in \
                                   the subscription's queues until it is scaled up";
                    conditions.push(StatusCondition::new(
                        ConditionType::CaughtUp,
                        false,
                        reason::SCALED_TO_ZERO,
                        message,
                    ));
                    gates.clear();
                    ready_as = Some((reason::SCALED_TO_ZERO, message.to_string()));
                } else {
                    conditions.push(StatusCondition::new(
                        ConditionType::CaughtUp,
                        caught_up,
                        if caught_up {
                            reason::LIVE
                        } else {
                            reason::CATCHING_UP
                        },
                        if caught_up {
                            String::new()
                        } else {
                            "provisioning its queues or replaying stored events".to_string()
                        },
                    ));
                }
                let (ordering_reason, ordering_msg) = match &plan.ordering {
                    OrderingPlan::None => (reason::UNORDERED, String::new()),
                    OrderingPlan::PerKey {
                        partition_key,
                        partitions: 1,
                    } => (
                        reason::SERIAL,
                        format!("one lane: every event in order (key {partition_key})"),
                    ),
                    OrderingPlan::PerKey {
                        partition_key,
                        partitions,
                    } => (
                        reason::PER_KEY,
                        format!("{partitions} lanes keyed by {partition_key}"),
                    ),
                };
                conditions.push(StatusCondition::new(
                    ConditionType::Ordering,
                    true,
                    ordering_reason,
                    ordering_msg,
                ));
                if not_ready.is_none() {
                    not_ready = match st.failure() {
                        Some((reason, e)) => Some((reason.to_string(), e)),
                        None => st.error().map(|e| (reason::NOT_RUNNING.to_string(), e)),
                    };
                }
                if !runner.names.partitions.is_empty() {
                    fields.partition_queues = Some(runner.names.partitions.clone());
                }
                // The queue the streams publish into (under perKey, the intake).
                fields.queue = Some(runner.names.bound().to_string());
                fields.dead_letter_queue = Some(runner.names.dead_letter_queue.clone());
                fields.consumers = Some(runner.settings().consumers);
                // Sampled from the broker's queue counts: the same for every worker.
                fields.backlog = u64::try_from(st.backlog.load(Ordering::Acquire)).ok();
                // Positions are per stream: one number means nothing for several.
                if !plan.multi {
                    fields.position = Some(st.position.load(Ordering::Acquire).to_string());
                }
                fields.notice = st.notice();
            }
            None => {
                if let Some(plan) = plan {
                    fields.consumers = Some(plan.consumers);
                    if not_ready.is_none() {
                        let why = self
                            .subscriptions
                            .problem(key)
                            .unwrap_or_else(|| "not started yet".to_string());
                        not_ready = Some((reason::NOT_RUNNING.to_string(), why));
                    }
                }
            }
        }
        Observed {
            conditions,
            gates,
            not_ready,
            ready_as,
            fields: Fields::Subscription(fields),
        }
    }

    fn archive_status(&self, key: &Key) -> Observed {
        // Totals come from the segments table (cached after each run): the same on every
        // worker; the error is this worker's last failed run.
        let (totals, error) = self.archives.policy_status(key);
        let healthy = match error {
            None => {
                StatusCondition::new(ConditionType::ArchiveHealthy, true, reason::ARCHIVING, "")
            }
            Some(e) => StatusCondition::new(
                ConditionType::ArchiveHealthy,
                false,
                reason::ARCHIVE_FAILED,
                e,
            ),
        };
        Observed {
            conditions: vec![healthy],
            gates: vec![ConditionType::ArchiveHealthy],
            not_ready: None,
            ready_as: None,
            fields: Fields::ArchivePolicy(ArchiveFields {
                last_run: totals
                    .last_run
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
                archived_events: Some(totals.events.to_string()),
                archived_bytes: Some(totals.stored.to_string()),
                compression_ratio: (totals.stored > 0)
                    .then(|| format!("{:.1}", totals.raw as f64 / totals.stored as f64)),
            }),
        }
    }

    fn cache_status(&self, key: &Key) -> Observed {
        let mut fields = CacheFields::default();
        if let Some(cache) = self.engine.caches.policy(key) {
            // Sampled on this worker: each worker has its own cache.
            fields.hit_ratio = cache.hit_ratio().map(|r| format!("{r:.2}"));
            fields.entries = Some(cache.entry_count());
        }
        Observed {
            conditions: Vec::new(),
            gates: Vec::new(),
            not_ready: None,
            ready_as: None,
            fields: Fields::CachePolicy(fields),
        }
    }
}
