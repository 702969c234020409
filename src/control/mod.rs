//! The Kubernetes control plane of `weir operator`.
//!
//! Watches the four kinds through kube-runtime controllers whose caches feed the same
//! [`crate::topology::Index`] as standalone mode; every reconcile follows one shape:
//! dereference (Secrets and ConfigMaps read with `get`) → validate and build the topology
//! (no API calls) → apply it to the data plane (through `data/` only) → status.
//!
//! Work that must have one owner at a time — status writes, finalizers (and so the removal of
//! queues and stored data on delete), Events — is done only by the holder of a
//! `coordination.k8s.io` Lease. Every replica runs the data plane.

pub mod context;
pub mod leader;
pub mod reconcile;
pub mod refs;
pub mod review;
pub mod run;
pub mod status_body;
pub mod status_writer;

pub use context::{Context, Settings, Stores};
pub use run::{OperatorConfig, run};

/// Finalizer that Weir puts on EventStreams and Subscriptions, so that their queues and
/// stored events are handled according to `deletionPolicy` before the object goes away.
pub const FINALIZER: &str = "weir.dev/cleanup";
/// Field manager of every server-side apply Weir makes.
pub const FIELD_MANAGER: &str = "weir";
/// Name of the controller in Events (`reportingController`).
pub const CONTROLLER_NAME: &str = "weir.dev/operator";

/// Every (API group, resource, verb) `weir operator` calls. The chart's RBAC grants exactly
/// these (a test checks), so a new call needs a new rule in the same change.
pub const API_CALLS: &[(&str, &str, &str)] = &[
    // Controllers' watches; the finalizer (streams and subscriptions only) is added and
    // removed with a JSON patch.
    ("weir.dev", "eventstreams", "list"),
    ("weir.dev", "eventstreams", "watch"),
    ("weir.dev", "eventstreams", "patch"),
    ("weir.dev", "subscriptions", "list"),
    ("weir.dev", "subscriptions", "watch"),
    ("weir.dev", "subscriptions", "patch"),
    ("weir.dev", "archivepolicies", "list"),
    ("weir.dev", "archivepolicies", "watch"),
    ("weir.dev", "cachepolicies", "list"),
    ("weir.dev", "cachepolicies", "watch"),
    // Status: server-side apply.
    ("weir.dev", "eventstreams/status", "patch"),
    ("weir.dev", "subscriptions/status", "patch"),
    ("weir.dev", "archivepolicies/status", "patch"),
    ("weir.dev", "cachepolicies/status", "patch"),
    // Referenced Secrets and ConfigMaps, one by one.
    ("", "secrets", "get"),
    ("", "configmaps", "get"),
    // Events: created, then patched as a series when they repeat.
    ("events.k8s.io", "events", "create"),
    ("events.k8s.io", "events", "patch"),
    // Leader election.
    ("coordination.k8s.io", "leases", "get"),
    ("coordination.k8s.io", "leases", "create"),
    ("coordination.k8s.io", "leases", "patch"),
    // Waiting for the CRDs to be established.
    ("apiextensions.k8s.io", "customresourcedefinitions", "get"),
    // Admin API callers: who the bearer token is, and whether RBAC lets them (review.rs).
    ("authentication.k8s.io", "tokenreviews", "create"),
    ("authorization.k8s.io", "subjectaccessreviews", "create"),
];

/// What can go wrong in the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A call to the API server failed (network, 5xx, conflict): transient, retried.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// An object came without a name or namespace (never from a real API server).
    #[error("object without {0}")]
    MissingMetadata(&'static str),
    /// The data plane could not apply the topology (broker or store unreachable): transient.
    #[error("data plane: {0}")]
    DataPlane(String),
    /// A stream being deleted still has Subscriptions: it is torn down once they are gone.
    #[error("EventStream {0} still has subscriptions: {1}")]
    StreamInUse(String, String),
    /// The finalizer could not be added or removed.
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// The CustomResourceDefinitions did not become established in time.
    #[error("CRD {0} is not established")]
    CrdNotEstablished(String),
    /// Leader election failed to start.
    #[error("leader election: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
    /// A status body could not be serialised.
    #[error("serialising status: {0}")]
    Json(#[from] serde_json::Error),
}

impl ControlError {
    /// The category used as the reason of Warning Events.
    pub fn category(&self) -> &'static str {
        match self {
            ControlError::Kube(_) => "KubernetesApiError",
            ControlError::MissingMetadata(_) => "InvalidObject",
            ControlError::DataPlane(_) => "DataPlaneError",
            ControlError::StreamInUse(..) => "StreamInUse",
            ControlError::Finalizer(_) => "FinalizerError",
            ControlError::CrdNotEstablished(_) => "CrdNotEstablished",
            ControlError::Lease(_) => "LeaseError",
            ControlError::Json(_) => "InternalError",
        }
    }
}
