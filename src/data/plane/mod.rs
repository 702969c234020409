//! The data plane of one worker, the same in both modes: the running streams (engine, with
//! the read caches), subscriptions and archivers, moved together to each new topology.
//!
//! Three verbs, used by `weir run` and `weir operator` alike:
//! - [`Plane::apply`]: move everything to a built topology (what standalone mode does on
//!   every folder change, what the operator does on every reconcile);
//! - [`Plane::observe`] / [`Plane::resources`]: the status of a resource
//!   ([`observe::ResourceStatus`]), the same conditions and reasons in both modes;
//! - [`Plane::append`]: the one path of events into a stream (publishers, replies, dead
//!   letters routed to a stream).

pub mod append;
pub mod observe;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use tokio::time::Instant;

use crate::data::archive::Archives;
use crate::data::batcher::Joining;
use crate::data::cache::StreamStore;
use crate::data::delivery::SinkGuard;
use crate::data::engine::{Engine, EngineError, StreamRuntime};
use crate::data::event::CloudEvent;
use crate::data::subscriptions::Subscriptions;
use crate::data::tracecontext::Ingest;
use crate::metrics::Metrics;
use crate::poison::RwLockExt;
use crate::topology::{Built, Key, Kind, Report};

pub use append::{AppendError, AppendOutcome};
pub use observe::{Fields, ResourceStatus};

/// What a source asks the plane to run.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    /// The built topology: plans of the valid resources, a report for every resource.
    pub built: Built,
    /// Resources whose current version could not even be read (standalone: a document that
    /// does not parse); their previous version keeps running, like an invalid one's.
    pub broken: BTreeSet<(Kind, Key)>,
    /// EventStreams being deleted (operator: a deletionTimestamp, held by the finalizer while
    /// subscriptions still use them): their subscriptions say so.
    pub deleting_streams: BTreeSet<Key>,
    /// Problems of the source that belong to no resource (standalone: unparsable files).
    pub source_problems: Vec<String>,
}

/// What an apply did.
#[derive(Clone, Debug, Default)]
pub struct ApplyReport {
    /// Streams the engine could not start or stop cleanly, with why.
    pub stream_errors: BTreeMap<Key, String>,
    /// Other failures of the apply (subscriptions), for the log.
    pub errors: Vec<String>,
}

/// The last applied topology, as status reads it.
#[derive(Default)]
pub(crate) struct View {
    pub loaded: bool,
    pub built: Built,
    /// Resources whose new version is invalid (or unreadable) and whose previous version
    /// keeps running.
    pub kept: BTreeSet<(Kind, Key)>,
    pub deleting_streams: BTreeSet<Key>,
    pub source_problems: Vec<String>,
    pub stream_errors: BTreeMap<Key, String>,
}

/// The data plane (see the module docs).
pub struct Plane {
    pub engine: Arc<Engine>,
    pub subscriptions: Arc<Subscriptions>,
    pub archives: Arc<Archives>,
    appends: Arc<append::Appends>,
    /// Base URL shown as the streams' endpoint in status.
    endpoint_base: String,
    view: RwLock<Arc<View>>,
    /// One apply at a time: the plane moves from one whole topology to the next.
    applying: tokio::sync::Mutex<()>,
}

impl Plane {
    /// A plane with nothing running. `batch_queue`: requests each stream's batcher may queue.
    /// `guard` is the sink guard of this worker (its policy and own listen ports).
    pub fn new(
        metrics: Metrics,
        batch_queue: usize,
        endpoint_base: String,
        guard: Arc<SinkGuard>,
    ) -> Plane {
        let mut engine = Engine::new(metrics);
        engine.limits.queue_requests = batch_queue.max(1);
        let engine = Arc::new(engine);
        let appends = Arc::new(append::Appends::new(engine.clone()));
        Plane {
            subscriptions: Arc::new(Subscriptions::new(engine.clone(), appends.clone(), guard)),
            archives: Arc::new(Archives::new(engine.clone())),
            engine,
            appends,
            endpoint_base,
            view: RwLock::new(Arc::new(View::default())),
            applying: tokio::sync::Mutex::new(()),
        }
    }

    pub(crate) fn view(&self) -> Arc<View> {
        self.view.reading().clone()
    }

    /// True once a topology has been applied (readiness).
    pub fn loaded(&self) -> bool {
        self.view().loaded
    }

    /// The build report of one resource of the last applied topology.
    pub fn report(&self, kind: Kind, key: &Key) -> Option<Report> {
        self.view().built.report(kind, key).cloned()
    }

    /// Problems of the source that belong to no resource.
    pub fn source_problems(&self) -> Vec<String> {
        self.view().source_problems.clone()
    }

    /// Moves streams, caches, subscriptions and archivers to `desired`. Valid resources run;
    /// invalid or unreadable ones keep their previous version; absent ones stop, and with
    /// `prune` their queues and data are removed when their deletionPolicy says so.
    pub async fn apply(&self, desired: Desired, prune: bool) -> ApplyReport {
        let _one = self.applying.lock().await;
        let Desired {
            built,
            broken,
            deleting_streams,
            source_problems,
        } = desired;
        let mut kept = broken;
        kept.extend(
            built
                .reports
                .iter()
                .filter(|r| !r.is_valid())
                .map(|r| (r.kind, r.key.clone())),
        );
        let keep = |kind: Kind| -> BTreeSet<Key> {
            kept.iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, key)| key.clone())
                .collect()
        };
        let mut report = ApplyReport::default();
        let topology = &built.topology;
        for e in self
            .engine
            .apply(&topology.streams, &keep(Kind::EventStream), prune)
            .await
        {
            tracing::warn!(error = %e, "applying streams");
            let key = match &e {
                EngineError::Invalid { key, .. }
                | EngineError::Store { key, .. }
                | EngineError::Broker { key, .. } => key.clone(),
            };
            report.stream_errors.insert(key, e.to_string());
        }
        let streams = self.engine.streams();
        let stores: Vec<StreamStore<'_>> = streams
            .iter()
            .filter_map(|rt| {
                Some(StreamStore {
                    key: &rt.plan.key,
                    url: rt.plan.store.as_ref()?.urls.first()?,
                    store: rt.store()?,
                })
            })
            .collect();
        self.engine.caches.apply(&topology.cache_policies, &stores);
        for e in self
            .subscriptions
            .apply(&topology.subscriptions, &keep(Kind::Subscription), prune)
            .await
        {
            tracing::warn!(error = %e, "applying subscriptions");
            report.errors.push(e.to_string());
        }
        self.archives.apply(&topology.archive_policies);
        tracing::debug!(resources = built.reports.len(), "applied");
        *self.view.writing() = Arc::new(View {
            loaded: true,
            built,
            kept,
            deleting_streams,
            source_problems,
            stream_errors: report.stream_errors.clone(),
        });
        report
    }

    /// Appends `events` to the running stream `rt`, durably, before `deadline` (see
    /// [`append::Appends::append`]).
    pub async fn append(
        &self,
        rt: &StreamRuntime,
        events: Vec<CloudEvent>,
        deadline: Instant,
        joining: Option<Joining>,
        trace: &Ingest,
    ) -> Result<AppendOutcome, AppendError> {
        self.appends
            .append(rt, events, deadline, joining, trace)
            .await
    }

    /// Appends to the stream `key` (see [`Plane::append`]).
    pub async fn append_to(
        &self,
        key: &Key,
        events: Vec<CloudEvent>,
        deadline: Instant,
    ) -> Result<AppendOutcome, AppendError> {
        let rt = self
            .engine
            .stream(&key.namespace, &key.name)
            .ok_or_else(|| AppendError::NotFound(key.clone()))?;
        self.append(&rt, events, deadline, None, &Ingest::internal())
            .await
    }

    /// Stops everything, in the order that loses nothing: subscriptions stop taking messages
    /// and finish their started deliveries (whose replies still reach the running batchers)
    /// while archivers stop; then the streams drain their batchers and the pools close.
    /// Call after ingest stopped accepting.
    pub async fn shutdown(&self) {
        tokio::join!(self.subscriptions.shutdown(), self.archives.shutdown());
        self.engine.shutdown().await;
    }
}
