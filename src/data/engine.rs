//! The engine runs what the topology asks for: one [`StreamRuntime`] per EventStream, each
//! with its validator, batcher (streams with a store) or bounded publisher (broker-only
//! streams), relay and health. `apply` moves the running set to a new topology; a stream
//! whose plan did not change keeps running untouched.

use crate::poison::{MutexExt, RwLockExt};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::data::batcher::{self, BatchObserver, BatchWriter, Batcher};
use crate::data::broker::Broker;
use crate::data::event::{CloudEvent, StoredEvent};
use crate::data::ingest::Validator;
use crate::data::relay::{self, Handoff, Relay};
use crate::data::store::pools::Pools;
use crate::data::store::{RequestOutcome, Store, StoreError};
use crate::data::{Trouble, sleep_or_cancel};
use crate::metrics::Metrics;
use crate::topology::{AccessPlan, DeletionPolicy, Key, StreamPlan};

/// Publishes in flight per broker-only stream and process. 256 concurrent confirm waits
/// keep RabbitMQ's confirm pipeline full; beyond that callers get 503 rather than queueing.
const BROKER_INFLIGHT: usize = 256;
/// How long `stop` waits for a stream's batcher to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("stream {key}: {message}")]
    Invalid { key: Key, message: String },
    #[error("stream {key}: store: {source}")]
    Store { key: Key, source: StoreError },
    #[error("stream {key}: broker: {source}")]
    Broker {
        key: Key,
        source: crate::data::broker::BrokerError,
    },
}

use crate::data::conditions::Dependency;
/// Reasons of the dependency conditions (kept here too for the runtime parts that set them).
pub use crate::data::conditions::reason;

/// Health of a stream's dependencies, as last observed by this process.
#[derive(Default)]
pub struct Health {
    /// The stream's rows exist in its store (set-up done). Whether the database answers now
    /// is the pool's health ([`Store::unavailable`]), shared by every stream of it.
    pub store_ready: AtomicBool,
    pub broker_ready: AtomicBool,
    /// Why the store side is not ready (set-up), if it is not.
    pub last_error: Mutex<Option<String>>,
    /// Why the exchange could not be declared, if it could not.
    broker_error: Mutex<Option<String>>,
    /// The last append failed with a transient error (said once per change).
    pub append_failing: AtomicBool,
    /// The highest position this process knows to be committed (its appends, its relay,
    /// the set-up's read): status shows it without asking the database.
    pub head: Arc<std::sync::atomic::AtomicI64>,
}

impl Health {
    fn set_error(&self, e: Option<String>) {
        *self.last_error.locked() = e;
    }
    fn set_broker_error(&self, e: Option<String>) {
        *self.broker_error.locked() = e;
    }
    fn broker_error(&self) -> Option<String> {
        self.broker_error.locked().clone()
    }
    pub fn error(&self) -> Option<String> {
        self.last_error.locked().clone()
    }
}

pub enum Backend {
    Stored {
        store: Store,
        /// Set once the stream's rows exist (provisioning may wait for the database).
        stream_id: Arc<OnceLock<i64>>,
        batcher: Mutex<Option<Batcher>>,
        batcher_task: Mutex<Option<JoinHandle<()>>>,
    },
    BrokerOnly {
        inflight: Arc<Semaphore>,
    },
}

pub struct StreamRuntime {
    /// The plan the stream was started with. Its `access` is the one at start: read the
    /// current one with [`StreamRuntime::access`].
    pub plan: StreamPlan,
    /// Who may publish and read now (replaced in place when only it changes, e.g. a rotated
    /// token, so that a rotation does not restart the stream).
    access: RwLock<Arc<AccessPlan>>,
    pub validator: Validator,
    pub broker: Broker,
    pub backend: Backend,
    pub health: Arc<Health>,
    /// `spec.ingest.rateLimit`'s bucket on this worker; rebuilt (full) with the runtime
    /// whenever the plan changes.
    pub rate_limit: Option<crate::data::ingest::limit::RateLimit>,
    /// `spec.pii`: encryption of personal-data fields (stored streams only).
    pub pii: Option<Arc<crate::data::pii::Pii>>,
    cancel: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Backend {
    /// The stream's store (`None` for a broker-only stream).
    pub fn store(&self) -> Option<&Store> {
        match self {
            Backend::Stored { store, .. } => Some(store),
            Backend::BrokerOnly { .. } => None,
        }
    }
}

impl StreamRuntime {
    pub fn key(&self) -> &Key {
        &self.plan.key
    }

    /// Who may publish to and read from the stream now.
    pub fn access(&self) -> Arc<AccessPlan> {
        self.access.reading().clone()
    }

    /// The plan the stream runs, with its current access.
    fn current_plan(&self) -> StreamPlan {
        let mut plan = self.plan.clone();
        plan.access = (*self.access()).clone();
        plan
    }

    /// The batcher while the stream runs (`None` once stopping or for broker-only streams).
    pub fn batcher(&self) -> Option<Batcher> {
        match &self.backend {
            Backend::Stored { batcher, .. } => batcher.locked().clone(),
            Backend::BrokerOnly { .. } => None,
        }
    }

    pub fn stream_id(&self) -> Option<i64> {
        match &self.backend {
            Backend::Stored { stream_id, .. } => stream_id.get().copied(),
            Backend::BrokerOnly { .. } => None,
        }
    }

    /// The StoreReady condition as this process sees it: `(ready, reason, message)`;
    /// `None` for a broker-only stream.
    pub fn store_condition(&self) -> Option<Dependency> {
        let store = self.store()?;
        Some(if let Some(e) = store.unavailable() {
            Dependency::down(reason::STORE_UNAVAILABLE, format!("store: {e}"))
        } else if !self.health.store_ready.load(Ordering::Acquire) {
            match self.health.error() {
                Some(e) => Dependency::down(reason::STORE_UNAVAILABLE, e),
                None => Dependency::down(reason::PROVISIONING, "creating the stream's rows"),
            }
        } else {
            Dependency::up(reason::CONNECTED)
        })
    }

    /// The BrokerReady condition as this process sees it.
    pub fn broker_condition(&self) -> Dependency {
        let connected = self.health.broker_ready.load(Ordering::Acquire);
        match self.health.broker_error() {
            Some(e) => Dependency::down(reason::BROKER_UNAVAILABLE, e),
            None if !connected => Dependency::down(
                reason::BROKER_UNAVAILABLE,
                "broker: not connected (reconnecting with backoff)",
            ),
            None => Dependency::up(reason::CONNECTED),
        }
    }

    pub fn store(&self) -> Option<&Store> {
        self.backend.store()
    }

    /// Stops background work and drains the batcher: every queued request is answered.
    async fn stop(&self) {
        self.cancel.cancel();
        if let Backend::Stored {
            batcher,
            batcher_task,
            ..
        } = &self.backend
        {
            drop(batcher.locked().take());
            let task = batcher_task.locked().take();
            if let Some(task) = task
                && tokio::time::timeout(DRAIN_TIMEOUT, task).await.is_err()
            {
                tracing::warn!(stream = %self.plan.key, "batcher did not drain in time");
            }
        }
        let tasks: Vec<_> = std::mem::take(&mut *self.tasks.locked());
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

struct StoreWriter {
    store: Store,
    health: Arc<Health>,
    stream_id: Arc<OnceLock<i64>>,
    compression: crate::topology::CompressionPlan,
    /// This stream's batches in flight, so the next one is decided while the previous commits.
    chain: crate::data::store::AppendChain,
    /// `weir_store_appends_total{path}` of this stream, and its namespace and name.
    paths: prometheus::IntCounterVec,
    labels: [String; 2],
    /// Committed batches for this process's relay.
    handoff: Handoff,
    /// `weir_store_payload_bytes_total{kind="raw"|"stored"}` of this stream.
    payload_raw: prometheus::IntCounter,
    payload_stored: prometheus::IntCounter,
}

impl BatchWriter for StoreWriter {
    fn write<'a>(
        &'a self,
        requests: &'a [Vec<CloudEvent>],
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Vec<RequestOutcome>, StoreError>> + Send + 'a>,
    > {
        Box::pin(async move {
            let Some(id) = self.stream_id.get().copied() else {
                return Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut));
            };
            let inputs: Vec<_> = requests
                .iter()
                .map(|r| crate::data::store::AppendInput { events: r })
                .collect();
            let (outcomes, report) = self
                .store
                .append_chained(id, &inputs, &self.compression, &self.chain)
                .await?;
            self.paths
                .with_label_values(&[&self.labels[0], &self.labels[1], report.path.label()])
                .inc();
            if let Some(last) = report.written.iter().map(|w| w.2).max() {
                self.health.head.fetch_max(last, Ordering::AcqRel);
            }
            self.payload_raw.inc_by(report.bytes.raw);
            self.payload_stored.inc_by(report.bytes.stored);
            if let Some(recorded_time) = report.recorded_at
                && self.handoff.wanted()
            {
                // Exactly what reading these rows back would give.
                let events = report
                    .written
                    .iter()
                    .map(|&(r, e, position, version)| StoredEvent {
                        position,
                        version,
                        recorded_time,
                        event: requests[r][e].clone(),
                    })
                    .collect();
                self.handoff.offer(events);
            }
            Ok(outcomes)
        })
    }
}

struct Observer {
    metrics: Metrics,
    key: Key,
    /// An append that failed is said once per change (the store's health is the pool's).
    health: Arc<Health>,
}

impl BatchObserver for Observer {
    fn batch_written(&self, events: usize, elapsed: Duration) {
        if self.health.append_failing.swap(false, Ordering::AcqRel) {
            tracing::info!(stream = %self.key, "appends succeed again");
        }
        let l = [self.key.namespace.as_str(), self.key.name.as_str()];
        self.metrics
            .batch_events
            .with_label_values(&l)
            .observe(events as f64);
        self.metrics
            .store_append_duration
            .with_label_values(&l)
            .observe(elapsed.as_secs_f64());
    }
    fn retried(&self) {
        if !self.health.append_failing.swap(true, Ordering::AcqRel) {
            tracing::warn!(stream = %self.key, "store unavailable: an append failed and is retried");
        }
        self.metrics
            .store_append_retries
            .with_label_values(&[self.key.namespace.as_str(), self.key.name.as_str()])
            .inc();
    }
}

pub struct Engine {
    streams: RwLock<HashMap<Key, Arc<StreamRuntime>>>,
    pools: Pools,
    /// One broker handle (and so one set of connections) per URL and TLS plan: two streams
    /// with the same URL but different CAs or client certificates must not share one.
    brokers: Mutex<HashMap<(String, crate::topology::TlsPlan), Broker>>,
    pub metrics: Metrics,
    pub limits: batcher::Limits,
    /// The read side's caches (CachePolicies).
    pub caches: crate::data::cache::Caches,
    /// Unwrapped personal-data keys of every stream of this worker (bounded, short-lived).
    pub deks: crate::data::pii::DekCache,
}

impl Engine {
    pub fn new(metrics: Metrics) -> Engine {
        Engine {
            streams: RwLock::new(HashMap::new()),
            pools: Pools::new(metrics.clone()),
            brokers: Mutex::new(HashMap::new()),
            caches: crate::data::cache::Caches::new(metrics.clone()),
            deks: crate::data::pii::dek_cache(),
            metrics,
            limits: batcher::Limits::default(),
        }
    }

    pub fn stream(&self, namespace: &str, name: &str) -> Option<Arc<StreamRuntime>> {
        let streams = self.streams.reading();
        streams.get(&Key::new(namespace, name)).cloned()
    }

    pub fn streams(&self) -> Vec<Arc<StreamRuntime>> {
        let streams = self.streams.reading();
        let mut v: Vec<_> = streams.values().cloned().collect();
        v.sort_by(|a, b| a.plan.key.cmp(&b.plan.key));
        v
    }

    pub fn pools(&self) -> &Pools {
        &self.pools
    }

    /// What this worker cannot serve now, for readiness: streams still being set up, and
    /// streams whose store (database down) or, for broker-only streams, broker cannot take a
    /// publish. Empty when every stream can. At most `limit` lines, then a count.
    pub fn unserved(&self, limit: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut more = 0usize;
        for rt in self.streams() {
            let why = match rt.store_condition() {
                Some(c) if !c.ok => Some(format!("{}: {}", c.reason, c.message)),
                Some(_) => None,
                None => {
                    let c = rt.broker_condition();
                    (!c.ok).then(|| format!("{}: {}", c.reason, c.message))
                }
            };
            if let Some(why) = why {
                if out.len() < limit {
                    out.push(format!("stream {}: {why}", rt.plan.key));
                } else {
                    more += 1;
                }
            }
        }
        if more > 0 {
            out.push(format!("... and {more} more streams"));
        }
        out
    }

    fn broker_for(&self, plan: &crate::topology::BrokerPlan) -> Broker {
        let mut brokers = self.brokers.locked();
        brokers
            .entry((plan.url.clone(), plan.tls.clone()))
            .or_insert_with(|| {
                Broker::with_tls(
                    plan.url.clone(),
                    plan.tls.clone(),
                    crate::data::broker::DEFAULT_CONNECTION_NAME,
                )
            })
            .clone()
    }

    /// Moves the running streams to `plans`. Streams in `keep` (present but currently
    /// invalid) keep their running version; any other stream not in `plans` is stopped, and
    /// with `prune` its exchange and stored events are removed if its policy says Delete.
    pub async fn apply(
        &self,
        plans: &std::collections::BTreeMap<Key, StreamPlan>,
        keep: &BTreeSet<Key>,
        prune: bool,
    ) -> Vec<EngineError> {
        let mut errors = Vec::new();
        let mut to_stop = Vec::new();
        let mut to_prune = Vec::new();
        for (key, plan) in plans {
            if let Some(rt) = self.stream(&key.namespace, &key.name)
                && rt.plan.same_runtime(plan)
            {
                if rt.current_plan() != *plan {
                    *rt.access.writing() = Arc::new(plan.access.clone());
                    tracing::info!(stream = %key, "stream access updated");
                }
                continue;
            }
            match self.start(plan.clone()) {
                Ok(rt) => {
                    tracing::info!(stream = %key, generation = plan.generation, "stream started");
                    let old = self.streams.writing().insert(key.clone(), rt);
                    to_stop.extend(old);
                }
                Err(e) => errors.push(e),
            }
        }
        {
            let mut streams = self.streams.writing();
            let gone: Vec<Key> = streams
                .keys()
                .filter(|k| !plans.contains_key(*k) && !keep.contains(*k))
                .cloned()
                .collect();
            for k in gone {
                if let Some(rt) = streams.remove(&k) {
                    tracing::info!(stream = %k, "stream stopped");
                    if prune && rt.plan.deletion_policy == DeletionPolicy::Delete {
                        to_prune.push(rt.clone());
                    }
                    to_stop.push(rt);
                }
            }
        }
        for rt in to_stop {
            rt.stop().await;
        }
        for rt in to_prune {
            if let Err(e) = self.prune(&rt).await {
                errors.push(e);
            }
        }
        errors
    }

    /// Removes a deleted stream's exchange and stored events (deletionPolicy Delete).
    async fn prune(&self, rt: &StreamRuntime) -> Result<(), EngineError> {
        let key = rt.plan.key.clone();
        rt.broker
            .delete_exchange(&rt.plan.broker.exchange)
            .await
            .map_err(|source| EngineError::Broker {
                key: key.clone(),
                source,
            })?;
        if let Some(store) = rt.store() {
            store
                .delete_stream(&key.namespace, &key.name)
                .await
                .map_err(|source| EngineError::Store {
                    key: key.clone(),
                    source,
                })?;
        }
        tracing::info!(stream = %key, "pruned exchange and stored events");
        Ok(())
    }

    fn start(&self, plan: StreamPlan) -> Result<Arc<StreamRuntime>, EngineError> {
        let key = plan.key.clone();
        self.metrics.init_stream(&key.namespace, &key.name);
        let validator = Validator::new(&plan.validation).map_err(|e| EngineError::Invalid {
            key: key.clone(),
            message: e.to_string(),
        })?;
        let broker = self.broker_for(&plan.broker);
        let cancel = CancellationToken::new();
        let health = Arc::new(Health::default());
        let mut tasks = Vec::new();
        let backend = match &plan.store {
            Some(sp) => {
                let store = self
                    .pools
                    .store_for(sp)
                    .map_err(|source| EngineError::Store {
                        key: key.clone(),
                        source,
                    })?;
                let stream_id = Arc::new(OnceLock::new());
                let (handoff, handoff_rx) = relay::handoff();
                let writer = Arc::new(StoreWriter {
                    handoff,
                    store: store.clone(),
                    health: health.clone(),
                    stream_id: stream_id.clone(),
                    compression: plan.compression.clone(),
                    chain: Default::default(),
                    paths: self.metrics.store_appends.clone(),
                    labels: [key.namespace.clone(), key.name.clone()],
                    payload_raw: self.metrics.compression_bytes.with_label_values(&[
                        key.namespace.as_str(),
                        key.name.as_str(),
                        "raw",
                    ]),
                    payload_stored: self.metrics.compression_bytes.with_label_values(&[
                        key.namespace.as_str(),
                        key.name.as_str(),
                        "stored",
                    ]),
                });
                let observer = Arc::new(Observer {
                    metrics: self.metrics.clone(),
                    key: key.clone(),
                    health: health.clone(),
                });
                let (b, task) =
                    Batcher::spawn(plan.batching.clone(), self.limits.clone(), writer, observer);
                tasks.push(tokio::spawn(provision_store(
                    key.clone(),
                    store.clone(),
                    stream_id.clone(),
                    health.clone(),
                    cancel.clone(),
                    Relay {
                        key: key.clone(),
                        store: store.clone(),
                        stream_id: 0,
                        exchange: plan.broker.exchange.clone(),
                        broker: broker.clone(),
                        metrics: self.metrics.clone(),
                        head: health.head.clone(),
                        handoff: tokio::sync::Mutex::new(handoff_rx),
                    },
                )));
                Backend::Stored {
                    store,
                    stream_id,
                    batcher: Mutex::new(Some(b)),
                    batcher_task: Mutex::new(Some(task)),
                }
            }
            None => {
                tasks.push(tokio::spawn(provision_exchange(
                    key.clone(),
                    broker.clone(),
                    plan.broker.exchange.clone(),
                    health.clone(),
                    cancel.clone(),
                )));
                Backend::BrokerOnly {
                    inflight: Arc::new(Semaphore::new(BROKER_INFLIGHT)),
                }
            }
        };
        let pii =
            crate::data::pii::Pii::for_stream(&key, plan.pii.as_ref(), backend.store(), &self.deks)
                .map_err(|message| EngineError::Invalid { key, message })?;
        tasks.push(tokio::spawn(watch_broker(
            broker.clone(),
            health.clone(),
            cancel.clone(),
        )));
        Ok(Arc::new(StreamRuntime {
            access: RwLock::new(Arc::new(plan.access.clone())),
            rate_limit: plan
                .rate_limit
                .as_ref()
                .map(crate::data::ingest::limit::RateLimit::new),
            plan,
            validator,
            broker,
            backend,
            health,
            pii,
            cancel,
            tasks: Mutex::new(tasks),
        }))
    }

    /// Stops every stream (draining batchers) and closes the pools: the last step of a
    /// graceful shutdown, after the HTTP servers stopped accepting.
    pub async fn shutdown(&self) {
        let all: Vec<_> = {
            let mut streams = self.streams.writing();
            streams.drain().map(|(_, v)| v).collect()
        };
        for rt in all {
            rt.stop().await;
        }
        self.caches.shutdown();
        self.pools.close_all().await;
    }
}

/// Backoff of a stream's set-up after a failure: from 200 ms, doubling, capped at 30 s, with
/// jitter (a thousand streams of a database that refuses retry a few times a minute each).
const SETUP_RETRY_BASE: Duration = Duration::from_millis(200);
const SETUP_RETRY_MAX: Duration = Duration::from_secs(30);

/// Migrates the database (once per database), creates the stream's rows, then runs the relay.
/// Set-ups of one database run a few at a time ([`Store::provision_slot`]); while the pool's
/// health check says the database is down, a set-up waits for it to come back instead of
/// trying. The stream answers 503 meanwhile and its StoreReady condition says why.
async fn provision_store(
    key: Key,
    store: Store,
    stream_id: Arc<OnceLock<i64>>,
    health: Arc<Health>,
    cancel: CancellationToken,
    mut relay: Relay,
) {
    let mut trouble = Trouble::new(SETUP_RETRY_BASE, SETUP_RETRY_MAX);
    let mut db = store.health();
    let id = loop {
        if let Some(e) = store.unavailable() {
            health.set_error(Some(format!("store: {e}")));
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = db.changed() => if r.is_err() { return },
            }
            continue;
        }
        let r = async {
            let _slot = store.provision_slot().await;
            store.migrate().await?;
            let id = store.ensure_stream(&key.namespace, &key.name).await?;
            let head = store.head(id).await?;
            Ok::<_, StoreError>((id, head))
        };
        let r = tokio::select! {
            _ = cancel.cancelled() => return,
            r = r => r,
        };
        match r {
            Ok((id, head)) => {
                health.head.fetch_max(head, Ordering::AcqRel);
                break id;
            }
            Err(e) => {
                let msg = format!("store: {e}");
                let (delay, say) = trouble.failed(&msg);
                if say {
                    tracing::warn!(stream = %key, error = %e, "store not ready");
                }
                health.set_error(Some(msg));
                if !sleep_or_cancel(&cancel, delay).await {
                    return;
                }
            }
        }
    };
    if trouble.ok() {
        tracing::info!(stream = %key, "store ready");
    }
    let _ = stream_id.set(id);
    health.store_ready.store(true, Ordering::Release);
    health.set_error(None);
    relay.stream_id = id;
    relay.run(cancel).await;
}

async fn provision_exchange(
    key: Key,
    broker: Broker,
    exchange: String,
    health: Arc<Health>,
    cancel: CancellationToken,
) {
    let mut trouble = Trouble::new(SETUP_RETRY_BASE, SETUP_RETRY_MAX);
    loop {
        match broker.declare_exchange(&exchange).await {
            Ok(()) => {
                if trouble.ok() {
                    tracing::info!(stream = %key, "exchange declared");
                }
                health.set_broker_error(None);
                return;
            }
            Err(e) => {
                let msg = format!("broker: {e}");
                let (delay, say) = trouble.failed(&msg);
                if say {
                    tracing::warn!(stream = %key, error = %e, "exchange not declared yet");
                }
                health.set_broker_error(Some(msg));
                if !sleep_or_cancel(&cancel, delay).await {
                    return;
                }
            }
        }
    }
}

/// Samples the broker connection's health for status and readiness.
async fn watch_broker(broker: Broker, health: Arc<Health>, cancel: CancellationToken) {
    loop {
        let ok = broker.healthy().await;
        health.broker_ready.store(ok, Ordering::Release);
        if !sleep_or_cancel(&cancel, Duration::from_secs(2)).await {
            return;
        }
    }
}
