//! The engine runs what the topology asks for: one [`StreamRuntime`] per EventStream, each
//! with its validator, batcher (streams with a store) or bounded publisher (broker-only
//! streams), relay and health. `apply` moves the running set to a new topology; a stream
//! whose plan did not change keeps running untouched.

mod provision;
mod runtime;
mod writer;

pub use runtime::{Backend, Health, StreamRuntime};

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::data::batcher::{self, Batcher};
use crate::data::broker::Broker;
use crate::data::ingest::Validator;
use crate::data::relay::{self, Relay};
use crate::data::store::StoreError;
use crate::data::store::pools::Pools;
use crate::metrics::Metrics;
use crate::poison::{MutexExt, RwLockExt};
use crate::topology::{DeletionPolicy, Key, StreamPlan};
use provision::{provision_exchange, provision_store, watch_broker};
use writer::{Observer, StoreWriter};

/// Publishes in flight per broker-only stream and process. 256 concurrent confirm waits
/// keep RabbitMQ's confirm pipeline full; beyond that callers get 503 rather than queueing.
const BROKER_INFLIGHT: usize = 256;

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

/// Reasons of the dependency conditions (kept here too for the runtime parts that set them).
pub use crate::data::conditions::reason;

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
        self.stream_by_key(&Key::new(namespace, name))
    }

    pub fn stream_by_key(&self, key: &Key) -> Option<Arc<StreamRuntime>> {
        self.streams.reading().get(key).cloned()
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
        plans: &std::collections::BTreeMap<Key, Arc<StreamPlan>>,
        keep: &BTreeSet<Key>,
        prune: bool,
    ) -> Vec<EngineError> {
        let mut errors = Vec::new();
        let mut to_stop = Vec::new();
        let mut to_prune = Vec::new();
        for (key, plan) in plans {
            if let Some(rt) = self.stream_by_key(key) {
                if Arc::ptr_eq(&*rt.applied.reading(), plan) {
                    continue;
                }
                if rt.plan.same_runtime(plan) {
                    if rt.current_plan() != **plan {
                        *rt.access.writing() = Arc::new(plan.access.clone());
                        tracing::info!(stream = %key, "stream access updated");
                    }
                    *rt.applied.writing() = plan.clone();
                    continue;
                }
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

    fn start(&self, applied: Arc<StreamPlan>) -> Result<Arc<StreamRuntime>, EngineError> {
        let plan = StreamPlan::clone(&applied);
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
            applied: RwLock::new(applied),
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
