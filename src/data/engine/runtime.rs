//! A running stream: its dependencies' health, its backend (store and batcher, or the
//! broker-only publish bound) and the conditions this process reports for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::data::batcher::Batcher;
use crate::data::broker::Broker;
use crate::data::conditions::{Dependency, reason};
use crate::data::ingest::Validator;
use crate::data::store::Store;
use crate::poison::{MutexExt, RwLockExt};
use crate::topology::{AccessPlan, Key, StreamPlan};

/// How long `stop` waits for a stream's batcher to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

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
    pub(super) fn set_error(&self, e: Option<String>) {
        *self.last_error.locked() = e;
    }
    pub(super) fn set_broker_error(&self, e: Option<String>) {
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
    pub(super) access: RwLock<Arc<AccessPlan>>,
    /// The topology's plan last applied to this runtime (the start plan, or a later one that
    /// differed only in place). The next apply with the same allocation has nothing to
    /// compare: the builder hands an unchanged stream's plan back as the same `Arc`.
    pub(super) applied: RwLock<Arc<StreamPlan>>,
    pub validator: Validator,
    pub broker: Broker,
    pub backend: Backend,
    pub health: Arc<Health>,
    /// `spec.ingest.rateLimit`'s bucket on this worker; rebuilt (full) with the runtime
    /// whenever the plan changes.
    pub rate_limit: Option<crate::data::ingest::limit::RateLimit>,
    /// `spec.pii`: encryption of personal-data fields (stored streams only).
    pub pii: Option<Arc<crate::data::pii::Pii>>,
    pub(super) cancel: CancellationToken,
    pub(super) tasks: Mutex<Vec<JoinHandle<()>>>,
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
    pub(super) fn current_plan(&self) -> StreamPlan {
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
    pub(super) async fn stop(&self) {
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
