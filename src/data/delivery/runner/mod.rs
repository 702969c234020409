//! The runtime of one subscription in one worker: provisioning of its queues, catch-up from
//! the store, the live consumer(s), retries, dead letters, replies, and graceful stop.
//!
//! # Catch-up (`startFrom` other than `latest`)
//! Provisioning and catch-up run under a PostgreSQL advisory lock per subscription, so that
//! one worker at a time does them. The queue is declared (and bound) *before* the store is
//! read, so every event committed after the catch-up's last read also reaches the queue: the
//! catch-up reads pages in position order until a page is empty and records its high-water
//! mark; the live consumers then drop every first-attempt message at or below it. Progress
//! (`next_position`, `caught_up_to`, `position`) lives in `weir_subscription_progress`, so a
//! worker that dies mid-way is replaced by another that resumes from the last page.
//!
//! # Retries under `ordering: perKey`
//! A lane's retry cannot go to a delay queue: the events behind it would overtake it. It waits
//! at the head of its lane instead, with its message unacked, and its state (attempts made, when
//! the next is due) is published, confirmed, to the lane's hold queue before the wait. Two
//! things return the message to the head of the lane queue (quorum queues deliver returned
//! messages first): a crash, and the lane itself, which closes its channel after holding
//! messages for [`lane_refresh`] (10 minutes; below RabbitMQ's 30-minute `consumer_timeout`,
//! which would close it anyway, mid-wait). Whoever receives the returned message next — this
//! worker or, with `x-single-active-consumer`, another — sees it redelivered, reads the hold
//! queue, and carries on from the recorded attempt count and due time. When the event is
//! settled (delivered or dead-lettered) the hold queue is purged, then the message is acked.
//! Only the lane's active consumer touches its hold queue, so nobody else races for it.
//!
//! # Scaled to zero (`consumers: 0`)
//! The runner provisions as usual (queues, bindings, the recorded start in the progress table)
//! and unbinds queues of an earlier shape, then only samples the backlog: no consumer, no
//! catch-up, no drain, so nothing is delivered while events accumulate in the bound queues.
//! A catch-up not yet run (or interrupted) stays recorded as pending. Scaling up restarts the
//! runner ([`crate::data::subscriptions`]), which catches up from the recorded page, then
//! consumes what accumulated, in queue order (per lane under `perKey`).
//!
//! # Graceful stop
//! The consumers are cancelled (`basic.cancel`), deliveries already started finish (each
//! bounded by `delivery.timeout`; a perKey retry waiting for its next attempt stops waiting and
//! its message is returned, its hold record kept), then the channels close, which returns every
//! prefetched message that was not started. Nothing is dead-lettered and no attempt is counted
//! because of a stop.

use crate::poison::{MutexExt, RwLockExt};
use std::collections::BTreeMap;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use lapin::Channel;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicQosOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

mod attempt;
mod backlog;
mod catchup;
mod consume;
mod intake;
mod lane;
mod pacing;
mod provision;
mod replies;
mod state;
mod streams;

use attempt::Settle;
use backlog::background;
use consume::{consume_shared, drain};
use intake::move_intake;
use lane::{Lane, consume_lane};
pub use pacing::Pacer;
pub use replies::{failed_event, reply_event};
pub use state::SubState;
use streams::{Bound, HWM_PENDING};

use super::backoff::all_buckets;
use super::sender::{Failure, Outcome, Sender};
use super::{
    ATTEMPTS_HEADER, Appender, DELIVERY_FAILED_TYPE, DUE_HEADER, DeliveryError, EXCHANGE_HEADER,
    EXT_ATTEMPTS, EXT_ERROR_CODE, EXT_ERROR_DATA, EXT_ERROR_DEST, EXT_STREAM, HOLD_ID_HEADER,
    HOLD_SOURCE_HEADER, Names, binding_keys,
};
use crate::data::broker::{Broker, BrokerError, OutMessage, Routing, from_properties, to_message};
use crate::data::event::{
    CloudEvent, EXT_CAUSATION_ID, EXT_CORRELATION_ID, EXT_POSITION, EXT_PUBLISHER,
    EXT_RECORDED_TIME, EXT_VERSION, ExtValue,
};
use crate::data::store::Store;
use crate::data::store::locks::LockKey;
use crate::data::{Trouble, sleep_or_cancel};
use crate::metrics::Metrics;
use crate::topology::filter::matches_all;
use crate::topology::{
    DeadLetterPlan, OrderingPlan, QueueType, SinkFormat, StartFrom, StreamPlan, SubscriptionPlan,
};

/// Stored events read per catch-up page: large enough to keep the sink busy, small enough
/// that a page re-delivered after a failure is a small repeat.
const CATCHUP_PAGE: i64 = 500;
/// Messages prefetched per perKey lane: the lane delivers one at a time, a few more keep it
/// from waiting on the network between messages.
const LANE_PREFETCH: u16 = 8;
/// How often the backlog is sampled from the broker (a passive declare per queue, and the
/// management API for unacknowledged messages).
const BACKLOG_EVERY: Duration = Duration::from_secs(3);
/// How often the delivered position is written to the progress table.
const POSITION_EVERY: Duration = Duration::from_secs(2);
/// Pause before reconnecting a consumer or retrying provisioning after a failure.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// Longest pause between two provisioning attempts of a subscription that keeps failing.
const SETUP_RETRY_MAX: Duration = Duration::from_secs(30);
/// How long a retry or dead-letter publish may wait for its confirm.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// Partition queues looked for when the shape of a subscription changed (`partitions` is
/// rarely above a few dozen; a lane beyond this is left alone).
const MAX_PARTITIONS_SCAN: u32 = 64;
/// Default of [`lane_refresh`]: a third of RabbitMQ's default `consumer_timeout` (30 min),
/// so a lane returns its messages well before the broker would close its channel.
const LANE_REFRESH: Duration = Duration::from_secs(600);

/// How long a perKey lane may hold its messages while it waits for a retry, before it returns
/// them (closing its channel) and re-reads its hold queue. `WEIR_LANE_REFRESH` (a duration
/// such as `5m`) overrides it, for a broker whose `consumer_timeout` is lower.
fn lane_refresh() -> Duration {
    match std::env::var("WEIR_LANE_REFRESH") {
        Err(_) => LANE_REFRESH,
        Ok(v) => match crate::topology::units::parse_duration(&v) {
            Ok(d) if d >= Duration::from_secs(1) => d,
            _ => {
                tracing::warn!(value = %v, "WEIR_LANE_REFRESH is not a duration of at least 1s; using 10m");
                LANE_REFRESH
            }
        },
    }
}

/// How long a drained queue must stay empty before it is deleted: retries still waiting in
/// delay queues may come back to it meanwhile (bounded by `backoffMax` / `retryAfterMax`).
const DRAIN_SETTLE_MAX: Duration = Duration::from_secs(300);

/// Settings applied live, without restarting the consumers' deliveries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Deliveries in flight in this worker.
    pub consumers: u32,
    /// Deliveries started per second in this worker.
    pub rate_limit: Option<u32>,
}

/// The stream side a subscription reads from.
#[derive(Clone)]
pub struct StreamSide {
    pub plan: StreamPlan,
    pub broker: Broker,
    pub store: Option<Store>,
    /// The stream's id in its store, once provisioned.
    pub stream_id: Arc<dyn Fn() -> Option<i64> + Send + Sync>,
    /// The stream's personal-data encryption, if it has pii fields: events are decrypted
    /// just before they are sent (unless the subscription asks for the envelopes).
    pub pii: Option<Arc<crate::data::pii::Pii>>,
}

/// One running subscription.
pub struct Runner {
    pub plan: SubscriptionPlan,
    pub names: Names,
    pub state: Arc<SubState>,
    inner: Arc<Inner>,
    settings: watch::Sender<Settings>,
    cancel: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

struct Inner {
    plan: SubscriptionPlan,
    names: Names,
    state: Arc<SubState>,
    metrics: Metrics,
    /// The side the subscription's queues live on: the broker (shared by every stream read,
    /// validation sees to it) and the queue type. For a single-stream subscription, its
    /// stream, store included.
    stream: StreamSide,
    /// Every stream read, by name (the namespace is the subscription's). One entry unless
    /// the plan is `multi`; then it changes while the runner runs ([`Runner::rebind`]).
    sides: RwLock<BTreeMap<String, Arc<Bound>>>,
    /// Stopped with the runner; each stream's token is a child of it.
    cancel: CancellationToken,
    /// The hand-overs of streams bound while the consumers run ([`Runner::rebind`]).
    hand_overs: Mutex<Vec<JoinHandle<()>>>,
    sender: Sender,
    dl_sender: Option<Sender>,
    appender: Arc<dyn Appender>,
    settings: watch::Receiver<Settings>,
    /// In-flight cap (`consumers`), resized live.
    limit: Arc<Semaphore>,
    limit_size: Mutex<u32>,
    pacer: Pacer,
    /// Scaled to zero with a catch-up pending: the stream position it starts from (0: none).
    /// The backlog counts the stored events from there, so that an autoscaler watching it
    /// wakes a subscription whose queue is still empty.
    pending_catchup: AtomicI64,
    declared_delays: Mutex<HashSet<Duration>>,
    lane_refresh: Duration,
    /// The position last written to the progress table: an idle subscription writes nothing
    /// (a thousand of them would otherwise write every few seconds for nothing).
    flushed: AtomicI64,
}

/// Where a retry waits.
enum Wait<'a> {
    /// In a delay queue (ordering none): the original is acked once the retry is confirmed.
    Delayed,
    /// Here, in memory (draining a queue of an earlier shape, one message at a time).
    InPlace,
    /// At the head of a perKey lane, recorded in its hold queue.
    Lane(&'a Lane<'a>),
}

impl Runner {
    /// Starts the subscription's tasks over `sides` (one per stream of the plan, in its
    /// order). Fails at once only for a sink that cannot work.
    pub fn start(
        plan: SubscriptionPlan,
        sides: Vec<StreamSide>,
        appender: Arc<dyn Appender>,
        metrics: Metrics,
        guard: &super::SinkGuard,
    ) -> Result<Runner, DeliveryError> {
        // 0 (scaled to zero) leaves the in-flight cap at no permit: nothing may deliver.
        let consumers = plan.consumers;
        let sender = Sender::new(&plan.sink, plan.delivery.timeout, guard)?;
        let dl_sender = match &plan.delivery.dead_letter {
            Some(DeadLetterPlan::Sink(url)) => Some(Sender::to_url(
                url,
                SinkFormat::Binary,
                None,
                plan.delivery.timeout,
                guard,
            )?),
            _ => None,
        };
        let Some(stream) = sides.first().cloned() else {
            return Err(DeliveryError::Other(format!(
                "subscription {} reads no stream",
                plan.key
            )));
        };
        let cancel = CancellationToken::new();
        // A single-stream subscription's consumers start after its catch-up, which sets the
        // mark; a multi-stream one's streams are pending until theirs is known.
        let first_mark = if plan.multi { HWM_PENDING } else { 0 };
        let bound: BTreeMap<String, Arc<Bound>> = sides
            .into_iter()
            .map(|s| {
                let name = s.plan.key.name.clone();
                (
                    name,
                    Arc::new(Bound::new(s, first_mark, cancel.child_token())),
                )
            })
            .collect();
        let names = super::Names::new(&plan);
        let state = Arc::new(SubState::default());
        let settings = Settings {
            consumers,
            rate_limit: plan.rate_limit.filter(|r| *r > 0),
        };
        let (tx, rx) = watch::channel(settings);
        let inner = Arc::new(Inner {
            plan: plan.clone(),
            names: names.clone(),
            state: state.clone(),
            metrics,
            stream,
            sides: RwLock::new(bound),
            cancel: cancel.clone(),
            sender,
            dl_sender,
            appender,
            settings: rx,
            limit: Arc::new(Semaphore::new(consumers as usize)),
            limit_size: Mutex::new(consumers),
            pacer: Pacer::default(),
            pending_catchup: AtomicI64::new(0),
            declared_delays: Mutex::new(HashSet::new()),
            lane_refresh: lane_refresh(),
            flushed: AtomicI64::new(0),
            hand_overs: Mutex::new(Vec::new()),
        });
        let task = tokio::spawn(run(inner.clone(), cancel.clone()));
        Ok(Runner {
            plan,
            names,
            state,
            inner,
            settings: tx,
            cancel,
            task: Mutex::new(Some(task)),
        })
    }

    /// Applies `consumers` and `rateLimit` without stopping deliveries. Not for a move to or
    /// from `consumers: 0`: that restarts the runner (see the module documentation).
    pub fn update(&self, plan: &SubscriptionPlan) {
        let s = Settings {
            consumers: plan.consumers,
            rate_limit: plan.rate_limit.filter(|r| *r > 0),
        };
        self.inner.resize(s.consumers);
        self.settings.send_replace(s);
    }

    /// The settings in force.
    pub fn settings(&self) -> Settings {
        *self.settings.borrow()
    }

    /// Stops gracefully (see the module documentation).
    pub async fn stop(&self) {
        self.cancel.cancel();
        let task = self.task.locked().take();
        if let Some(task) = task {
            // Deliveries finish within their timeout; the margin covers the acks and the
            // channel close.
            let bound = self.plan.delivery.timeout + Duration::from_secs(10);
            if tokio::time::timeout(bound, task).await.is_err() {
                tracing::warn!(subscription = %self.plan.key, "consumers did not stop in time");
            }
        }
    }

    /// The broker the subscription's queues live on.
    pub fn inner_broker(&self) -> crate::data::broker::Broker {
        self.inner.stream.broker.clone()
    }

    /// Deletes the subscription's queues, exchange and progress (deletionPolicy Delete).
    pub async fn prune(&self) -> Result<(), DeliveryError> {
        let broker = &self.inner.stream.broker;
        for q in self.names.consumed().iter().chain(&self.names.holds) {
            broker.delete_queue(q).await?;
        }
        broker.delete_queue(&self.names.queue).await?;
        if self.names.intake.is_some() {
            broker
                .delete_exchange(&Names::legacy_hash_exchange(&self.plan))
                .await?;
        }
        for d in all_buckets(&self.plan.delivery) {
            broker.delete_queue(&self.names.retry_queue(d)).await?;
        }
        broker.delete_queue(&self.names.dead_letter_queue).await?;
        let ns = &self.plan.key.namespace;
        if !self.plan.multi {
            if let Some(store) = &self.inner.stream.store {
                store.delete_progress(ns, &self.plan.key.name).await?;
            }
            return Ok(());
        }
        for b in self.inner.bounds() {
            if let Some(store) = &b.side.store {
                store
                    .delete_progress(ns, &self.inner.progress_name(&b))
                    .await?;
            }
        }
        Ok(())
    }
}

async fn run(inner: Arc<Inner>, cancel: CancellationToken) {
    // Provisioning and catch-up, retried until they succeed or the subscription stops, with
    // backoff (a thousand subscriptions of a database that refuses must not hammer it) and
    // said once per state change.
    let mut trouble = Trouble::new(RECONNECT_DELAY, SETUP_RETRY_MAX);
    loop {
        // A stop ends the set-up wherever it is: a runner stopped because its subscription is
        // being deleted must not declare the queue again after the Lease holder deleted it
        // (an abandoned catch-up resumes from its last recorded page elsewhere).
        let prepared = tokio::select! {
            r = inner.prepare(&cancel) => r,
            _ = cancel.cancelled() => Err(DeliveryError::Shutdown),
        };
        match prepared {
            Ok(()) => break,
            Err(DeliveryError::Shutdown) => return,
            Err(e) => {
                let msg = e.to_string();
                let (delay, say) = trouble.failed(&msg);
                if say {
                    tracing::warn!(subscription = %inner.plan.key, error = %msg, "subscription not ready");
                }
                inner.state.set_error(Some(msg));
                *inner.state.failure.locked() = Some(match &e {
                    DeliveryError::Store(_) | DeliveryError::Database(_) => {
                        crate::data::conditions::reason::STORE_UNAVAILABLE
                    }
                    DeliveryError::Broker(_) => crate::data::conditions::reason::BROKER_UNAVAILABLE,
                    _ => crate::data::conditions::reason::PROVISIONING_FAILED,
                });
                if !sleep_or_cancel(&cancel, delay).await {
                    return;
                }
            }
        }
    }
    if trouble.ok() {
        tracing::info!(subscription = %inner.plan.key, "subscription ready");
    }
    inner.state.set_error(None);
    if inner.scaled_to_zero() {
        // Queues of an earlier shape are unbound now, so that nothing new reaches them; they
        // are drained once the subscription is scaled up (the next runner finds them again).
        if let Err(e) = inner.retire_stale().await {
            tracing::warn!(subscription = %inner.plan.key, error = %e, "looking for stale queues");
        }
        inner.state.scaled_to_zero.store(true, Ordering::Release);
        tracing::info!(subscription = %inner.plan.key,
            "subscription scaled to zero: queues provisioned, no consumer runs");
        background(inner.clone(), cancel.clone()).await;
        return;
    }
    inner.state.caught_up.store(true, Ordering::Release);
    let side = tokio::spawn(background(inner.clone(), cancel.clone()));
    let drains = match inner.retire_stale().await {
        Ok(stale) => stale
            .into_iter()
            .map(|q| tokio::spawn(drain(inner.clone(), q, cancel.clone())))
            .collect(),
        Err(e) => {
            tracing::warn!(subscription = %inner.plan.key, error = %e, "looking for stale queues");
            vec![]
        }
    };
    match &inner.plan.ordering {
        OrderingPlan::None => consume_shared(inner.clone(), cancel.clone()).await,
        OrderingPlan::PerKey { .. } => {
            let mover = tokio::spawn(move_intake(inner.clone(), cancel.clone()));
            let lanes: Vec<_> = inner
                .names
                .partitions
                .iter()
                .zip(&inner.names.holds)
                .map(|(q, h)| {
                    tokio::spawn(consume_lane(
                        inner.clone(),
                        q.clone(),
                        h.clone(),
                        cancel.clone(),
                    ))
                })
                .collect();
            for l in lanes {
                let _ = l.await;
            }
            let _ = mover.await;
        }
    }
    let _ = side.await;
    for d in drains {
        let _ = d.await;
    }
    // Replays of streams bound later stop with the runner (their tokens are children of
    // its own): waited for, so that no delivery of this runner outlives its stop.
    let hand_overs = std::mem::take(&mut *inner.hand_overs.locked());
    for h in hand_overs {
        let _ = h.await;
    }
    inner.flush_position().await;
}

impl Inner {
    fn labels(&self) -> [&str; 2] {
        [
            self.plan.key.namespace.as_str(),
            self.plan.key.name.as_str(),
        ]
    }

    /// `consumers: 0`: provisioned, nothing consumed or caught up.
    fn scaled_to_zero(&self) -> bool {
        self.settings.borrow().consumers == 0
    }

    fn resize(&self, new: u32) {
        let mut size = self.limit_size.locked();
        let old = *size;
        *size = new;
        if new > old {
            self.limit.add_permits((new - old) as usize);
        } else if new < old {
            // Take the surplus permits as in-flight deliveries return them.
            let limit = self.limit.clone();
            tokio::spawn(async move {
                if let Ok(p) = limit.acquire_many_owned(old - new).await {
                    p.forget();
                }
            });
        }
    }

    /// Waits for the rate limit, if any.
    async fn pace(&self) {
        let rate = self.settings.borrow().rate_limit;
        self.pacer.wait(rate).await;
    }

    fn note_position(&self, ev: &CloudEvent) {
        if self.plan.multi {
            return;
        }
        if let Some(p) = ev
            .extension_str(EXT_POSITION)
            .and_then(|p| p.parse::<i64>().ok())
        {
            self.state.position.fetch_max(p, Ordering::AcqRel);
        }
    }

    async fn flush_position(&self) {
        // Positions are per stream: a multi-stream subscription records each stream's
        // progress in its replay rows, not one delivered position.
        if self.plan.multi {
            return;
        }
        let (Some(store), Some(_)) = (&self.stream.store, (self.stream.stream_id)()) else {
            return;
        };
        let p = self.state.position.load(Ordering::Acquire);
        if p == 0 || p <= self.flushed.load(Ordering::Acquire) {
            return;
        }
        let r = store
            .advance_position(&self.plan.key.namespace, &self.plan.key.name, p)
            .await;
        if r.is_ok() {
            self.flushed.fetch_max(p, Ordering::AcqRel);
        }
    }

    fn accepts(&self, ev: &CloudEvent) -> bool {
        matches_all(&self.plan.filters, &|name| ev.attribute(name))
    }

    fn count(&self, outcome: &str) {
        let [ns, sub] = self.labels();
        self.metrics
            .deliveries
            .with_label_values(&[ns, sub, outcome])
            .inc();
    }
}
