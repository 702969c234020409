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
//! # Graceful stop
//! The consumers are cancelled (`basic.cancel`), deliveries already started finish (each
//! bounded by `delivery.timeout`; a perKey retry waiting for its next attempt stops waiting and
//! its message is returned, its hold record kept), then the channels close, which returns every
//! prefetched message that was not started. Nothing is dead-lettered and no attempt is counted
//! because of a stop.

use crate::poison::MutexExt;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicQosOptions, ExchangeBindOptions, ExchangeDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::backoff::{all_buckets, retry_after_delay, retry_delay};
use super::sender::{Failure, Outcome, Sender};
use super::{
    ATTEMPTS_HEADER, Appender, DELIVERY_FAILED_TYPE, DUE_HEADER, DeliveryError, EXT_ATTEMPTS,
    EXT_ERROR_CODE, EXT_ERROR_DATA, EXT_ERROR_DEST, HOLD_ID_HEADER, HOLD_SOURCE_HEADER, Names,
    binding_keys,
};
use crate::data::broker::{Broker, BrokerError, OutMessage, Routing, from_properties, to_message};
use crate::data::event::{
    CloudEvent, EXT_CAUSATION_ID, EXT_CORRELATION_ID, EXT_POSITION, EXT_RECORDED_TIME, EXT_VERSION,
    ExtValue,
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

/// What status shows about a running subscription.
pub struct SubState {
    /// Highest stream position delivered (or dead-lettered) so far.
    pub position: AtomicI64,
    pub caught_up: AtomicBool,
    pub provisioned: AtomicBool,
    pub inflight: AtomicI64,
    /// Ready and unacknowledged messages of the subscription's queues plus retries waiting
    /// in delay queues (see [`BacklogSampler`]); -1 before the first sample.
    pub backlog: AtomicI64,
    /// Last attempt's outcome: reachable, and what happened.
    pub sink: Mutex<Option<(bool, String)>>,
    /// Why the subscription is not running, if it is not.
    pub error: Mutex<Option<String>>,
    /// The reason of `error` when set-up failed.
    failure: Mutex<Option<&'static str>>,
    /// Something the operator should know although it runs (a queue kept with old
    /// arguments).
    pub notice: Mutex<Option<String>>,
}

impl Default for SubState {
    fn default() -> Self {
        SubState {
            position: AtomicI64::new(0),
            caught_up: AtomicBool::new(false),
            provisioned: AtomicBool::new(false),
            inflight: AtomicI64::new(0),
            backlog: AtomicI64::new(-1),
            sink: Mutex::new(None),
            error: Mutex::new(None),
            failure: Mutex::new(None),
            notice: Mutex::new(None),
        }
    }
}

impl SubState {
    fn set_error(&self, e: Option<String>) {
        if e.is_none() {
            *self.failure.locked() = None;
        }
        *self.error.locked() = e;
    }
    /// Records why the subscription does not run, with its condition reason.
    fn set_failure(&self, reason: &'static str, e: String) {
        *self.error.locked() = Some(e);
        *self.failure.locked() = Some(reason);
    }
    /// Why set-up fails, as a condition reason (StoreUnavailable, BrokerUnavailable,
    /// ProvisioningFailed) with the error, while it does.
    pub fn failure(&self) -> Option<(&'static str, String)> {
        let reason = (*self.failure.locked())?;
        Some((reason, self.error().unwrap_or_default()))
    }
    pub fn error(&self) -> Option<String> {
        self.error.locked().clone()
    }
    pub fn notice(&self) -> Option<String> {
        self.notice.locked().clone()
    }
    pub fn sink(&self) -> Option<(bool, String)> {
        self.sink.locked().clone()
    }
}

/// The stream side a subscription reads from.
#[derive(Clone)]
pub struct StreamSide {
    pub plan: StreamPlan,
    pub broker: Broker,
    pub store: Option<Store>,
    /// The stream's id in its store, once provisioned.
    pub stream_id: Arc<dyn Fn() -> Option<i64> + Send + Sync>,
}

/// One running subscription.
pub struct Runner {
    pub plan: SubscriptionPlan,
    pub stream_plan: StreamPlan,
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
    stream: StreamSide,
    sender: Sender,
    dl_sender: Option<Sender>,
    appender: Arc<dyn Appender>,
    settings: watch::Receiver<Settings>,
    /// In-flight cap (`consumers`), resized live.
    limit: Arc<Semaphore>,
    limit_size: Mutex<u32>,
    pacer: Pacer,
    /// First-attempt messages at or below this position were delivered by the catch-up.
    hwm: AtomicI64,
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

/// A perKey lane's consumer channel and hold queue, for the message being handled.
struct Lane<'a> {
    ch: &'a Channel,
    hold: &'a str,
    /// When the channel was opened: no message it holds was delivered earlier.
    opened: Instant,
    /// [`lane_refresh`].
    refresh: Duration,
    /// The message was delivered before (a crash, a refresh, a stop): its hold record, if
    /// any, says where its retries stand.
    redelivered: bool,
    /// The hold queue may hold records: purge it once the event is settled.
    dirty: AtomicBool,
}

/// What a hold record says about an event: attempts made, when the next is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct HoldState {
    attempts: u32,
    due_ms: i64,
}

/// Hold records read at most per lookup: a lane writes one per retry of its head event, so
/// this is reached only with `delivery.retry` in the thousands (then the attempt count
/// resumes from the 1000th record, and a few more attempts than asked for are made).
const HOLD_READ_MAX: usize = 1000;

impl Lane<'_> {
    fn amqp(&self, e: lapin::Error) -> DeliveryError {
        DeliveryError::Broker(BrokerError::Unavailable(format!(
            "hold queue {}: {e}",
            self.hold
        )))
    }

    /// Reads the hold records (each is returned to the hold queue at once: they stay the
    /// durable record until the event is settled) and says where `ev`'s retries stand.
    async fn read(&self, ev: &CloudEvent) -> Result<Option<HoldState>, DeliveryError> {
        let mut got = Vec::new();
        while got.len() < HOLD_READ_MAX {
            match self
                .ch
                .basic_get(self.hold.into(), BasicGetOptions::default())
                .await
                .map_err(|e| self.amqp(e))?
            {
                Some(m) => got.push(m.delivery),
                None => break,
            }
        }
        if got.is_empty() {
            return Ok(None);
        }
        self.dirty.store(true, Ordering::Release);
        let state = hold_state(
            got.iter().filter_map(|d| d.properties.headers().as_ref()),
            &ev.id,
            &ev.source,
        );
        for d in got {
            d.acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
                .map_err(|e| self.amqp(e))?;
        }
        Ok(state)
    }

    /// Waits until `due_ms`, unless that would hold the lane's messages too long: then it
    /// waits until the refresh time and asks for the messages to be returned
    /// ([`DeliveryError::Refresh`]); whoever gets them next resumes from the hold record.
    async fn wait_until(
        &self,
        due_ms: i64,
        cancel: &CancellationToken,
    ) -> Result<(), DeliveryError> {
        let remaining = Duration::from_millis(due_ms.saturating_sub(now_ms()).max(0) as u64);
        // Holding until twice the refresh time after the channel opened still leaves a third
        // of the default consumer timeout to spare.
        let limit = self.opened + self.refresh * 2;
        if Instant::now() + remaining <= limit {
            return match sleep_or_cancel(cancel, remaining).await {
                true => Ok(()),
                false => Err(DeliveryError::Shutdown),
            };
        }
        let until_refresh = (self.opened + self.refresh).saturating_duration_since(Instant::now());
        if !sleep_or_cancel(cancel, until_refresh).await {
            return Err(DeliveryError::Shutdown);
        }
        Err(DeliveryError::Refresh)
    }

    /// Drops the hold records once the event is settled (before its message is acked: a
    /// crash in between redelivers it, at least once, rather than losing the record first).
    async fn settle(&self) -> Result<(), DeliveryError> {
        if self.dirty.load(Ordering::Acquire) {
            self.ch
                .queue_purge(self.hold.into(), QueuePurgeOptions::default())
                .await
                .map_err(|e| self.amqp(e))?;
            self.dirty.store(false, Ordering::Release);
        }
        Ok(())
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn header_i64(h: &FieldTable, k: &str) -> Option<i64> {
    match h.inner().get(k) {
        Some(AMQPValue::LongLongInt(n)) => Some(*n),
        Some(AMQPValue::LongInt(n)) => Some(i64::from(*n)),
        _ => None,
    }
}

fn header_str(h: &FieldTable, k: &str) -> Option<String> {
    match h.inner().get(k) {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// The newest of the hold records (their headers) about the event `id` from `source`.
fn hold_state<'h>(
    records: impl IntoIterator<Item = &'h FieldTable>,
    id: &str,
    source: &str,
) -> Option<HoldState> {
    records
        .into_iter()
        .filter(|h| {
            header_str(h, HOLD_ID_HEADER).as_deref() == Some(id)
                && header_str(h, HOLD_SOURCE_HEADER).as_deref() == Some(source)
        })
        .filter_map(|h| {
            Some(HoldState {
                attempts: header_i64(h, ATTEMPTS_HEADER)?.clamp(0, i64::from(u32::MAX)) as u32,
                due_ms: header_i64(h, DUE_HEADER)?,
            })
        })
        .max_by_key(|s| s.attempts)
}

impl Runner {
    /// Starts the subscription's tasks. Fails at once only for a sink that cannot work.
    pub fn start(
        plan: SubscriptionPlan,
        stream: StreamSide,
        appender: Arc<dyn Appender>,
        metrics: Metrics,
    ) -> Result<Runner, DeliveryError> {
        let consumers = plan.consumers.max(1);
        let sender = Sender::new(&plan.sink, plan.delivery.timeout)?;
        let dl_sender = match &plan.delivery.dead_letter {
            Some(DeadLetterPlan::Sink(url)) => Some(Sender::to_url(
                url,
                SinkFormat::Binary,
                None,
                plan.delivery.timeout,
            )?),
            _ => None,
        };
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
            stream: stream.clone(),
            sender,
            dl_sender,
            appender,
            settings: rx,
            limit: Arc::new(Semaphore::new(consumers as usize)),
            limit_size: Mutex::new(consumers),
            pacer: Pacer::default(),
            hwm: AtomicI64::new(0),
            declared_delays: Mutex::new(HashSet::new()),
            lane_refresh: lane_refresh(),
            flushed: AtomicI64::new(0),
        });
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(inner.clone(), cancel.clone()));
        Ok(Runner {
            plan,
            stream_plan: stream.plan,
            names,
            state,
            inner,
            settings: tx,
            cancel,
            task: Mutex::new(Some(task)),
        })
    }

    /// Applies `consumers` and `rateLimit` without stopping deliveries.
    pub fn update(&self, plan: &SubscriptionPlan) {
        let s = Settings {
            consumers: plan.consumers.max(1),
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
        if let Some(x) = &self.names.hash_exchange {
            broker.delete_exchange(x).await?;
        }
        for d in all_buckets(&self.plan.delivery) {
            broker.delete_queue(&self.names.retry_queue(d)).await?;
        }
        broker.delete_queue(&self.names.dead_letter_queue).await?;
        if let Some(store) = &self.inner.stream.store {
            sqlx::query(
                "DELETE FROM weir_subscription_progress WHERE namespace = $1 AND name = $2",
            )
            .bind(&self.plan.key.namespace)
            .bind(&self.plan.key.name)
            .execute(store.pool())
            .await?;
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
        match inner.prepare(&cancel).await {
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
                        crate::data::engine::reason::STORE_UNAVAILABLE
                    }
                    DeliveryError::Broker(_) => crate::data::engine::reason::BROKER_UNAVAILABLE,
                    _ => "ProvisioningFailed",
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
        }
    }
    let _ = side.await;
    for d in drains {
        let _ = d.await;
    }
    inner.flush_position().await;
}

/// Samples the backlog and writes the delivered position, until stopped.
async fn background(inner: Arc<Inner>, cancel: CancellationToken) {
    let labels = inner.labels();
    let backlog = inner
        .metrics
        .subscription_backlog
        .with_label_values(&labels);
    let mut sampler = BacklogSampler::default();
    let mut last_sample = Instant::now() - BACKLOG_EVERY;
    loop {
        if last_sample.elapsed() >= BACKLOG_EVERY {
            last_sample = Instant::now();
            if let Some(total) = sampler.sample(&inner).await {
                inner.state.backlog.store(total, Ordering::Release);
                backlog.set(total);
            }
        }
        inner.flush_position().await;
        if !sleep_or_cancel(&cancel, POSITION_EVERY.min(BACKLOG_EVERY)).await {
            return;
        }
    }
}

/// How often every delay bucket is looked for; buckets found are counted on every sample.
/// (A passive declare takes a channel each, and most buckets of a subscription never exist.)
const BUCKETS_EVERY: Duration = Duration::from_secs(30);

/// The backlog: events accepted for the subscription and not yet settled.
#[derive(Default)]
struct BacklogSampler {
    /// Delay buckets seen to exist.
    buckets: HashSet<Duration>,
    buckets_checked: Option<Instant>,
}

impl BacklogSampler {
    /// Ready + unacknowledged messages of the consumed queues (unacknowledged from the
    /// management API, i.e. every replica's deliveries in flight and prefetched; without it,
    /// this worker's deliveries in flight), plus the retries waiting in delay queues. `None`
    /// if the broker could not be asked.
    async fn sample(&mut self, inner: &Inner) -> Option<i64> {
        let broker = &inner.stream.broker;
        // With the management API, one list of every queue (shared by every subscription of
        // this worker) answers everything below: no AMQP operation at all. A thousand
        // subscriptions asking per queue, and looking for delay buckets with passive declares
        // (a channel opened and closed by the broker each), churned thousands of channels a
        // minute.
        // Whether the management API answers is the broker's news, said once by the broker
        // handle (not once per subscription).
        let table = broker.managed_queues().await.ok();
        let mut total = 0i64;
        let mut listed = true;
        for q in inner.names.consumed() {
            match table.as_ref().and_then(|t| t.get(&q)) {
                Some(c) => total += (c.ready + c.unacknowledged) as i64,
                None => {
                    // Not listed (no API, or a queue declared since the broker last
                    // collected its statistics): ask AMQP for what is ready.
                    let ready = broker.queue_counts(&q).await.ok()??.messages;
                    total += i64::from(ready);
                    listed = false;
                }
            }
        }
        if !listed {
            // What is in flight here is all that can be known of the unacknowledged ones.
            total += inner.state.inflight.load(Ordering::Acquire);
        }
        if matches!(inner.plan.ordering, OrderingPlan::None) {
            if let Some(t) = &table {
                for d in all_buckets(&inner.plan.delivery) {
                    if let Some(c) = t.get(&inner.names.retry_queue(d)) {
                        total += c.ready as i64;
                    }
                }
                return Some(total);
            }
            let look_all = self
                .buckets_checked
                .is_none_or(|t| t.elapsed() >= BUCKETS_EVERY);
            if look_all {
                self.buckets_checked = Some(Instant::now());
            }
            // Buckets this worker published into are counted at once; those only other
            // replicas used are found by the periodic look.
            self.buckets
                .extend(inner.declared_delays.locked().iter().copied());
            for d in all_buckets(&inner.plan.delivery) {
                if !look_all && !self.buckets.contains(&d) {
                    continue;
                }
                match broker
                    .queue_counts(&inner.names.retry_queue(d))
                    .await
                    .ok()?
                {
                    Some(c) => {
                        self.buckets.insert(d);
                        total += i64::from(c.messages);
                    }
                    None => {
                        self.buckets.remove(&d);
                    }
                }
            }
        }
        Some(total)
    }
}

impl Inner {
    fn labels(&self) -> [&str; 2] {
        [
            self.plan.key.namespace.as_str(),
            self.plan.key.name.as_str(),
        ]
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
        if let Some(p) = ev
            .extension_str(EXT_POSITION)
            .and_then(|p| p.parse::<i64>().ok())
        {
            self.state.position.fetch_max(p, Ordering::AcqRel);
        }
    }

    async fn flush_position(&self) {
        let (Some(store), Some(_)) = (&self.stream.store, (self.stream.stream_id)()) else {
            return;
        };
        let p = self.state.position.load(Ordering::Acquire);
        if p == 0 || p <= self.flushed.load(Ordering::Acquire) {
            return;
        }
        let r = sqlx::query(
            "UPDATE weir_subscription_progress SET position = $3, updated_at = now()
             WHERE namespace = $1 AND name = $2 AND position < $3",
        )
        .bind(&self.plan.key.namespace)
        .bind(&self.plan.key.name)
        .bind(p)
        .execute(store.pool())
        .await;
        if r.is_ok() {
            self.flushed.fetch_max(p, Ordering::AcqRel);
        }
    }

    /// Declares the queues and bindings; true if the subscription's queue did not exist.
    async fn provision(&self) -> Result<bool, DeliveryError> {
        let broker = &self.stream.broker;
        let exchange = &self.stream.plan.broker.exchange;
        broker.declare_exchange(exchange).await?;
        let first = self.names.consumed()[0].clone();
        let fresh = broker.queue_counts(&first).await?.is_none();
        self.declare_or_keep(&self.names.dead_letter_queue, FieldTable::default())
            .await?;
        let keys = binding_keys(&self.plan);
        match &self.names.hash_exchange {
            None => {
                self.declare_or_keep(&self.names.queue, FieldTable::default())
                    .await?;
                for k in &keys {
                    broker.bind_queue(&self.names.queue, exchange, k).await?;
                }
            }
            Some(hx) => {
                let OrderingPlan::PerKey { partition_key, .. } = &self.plan.ordering else {
                    return Err(DeliveryError::Other("hash exchange without perKey".into()));
                };
                let ch = broker.open_channel().await?;
                let mut args = FieldTable::default();
                args.insert(
                    "hash-header".into(),
                    AMQPValue::LongString(format!("cloudEvents:{partition_key}").into()),
                );
                let durable = ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                };
                let r = async {
                    ch.exchange_declare(
                        hx.as_str().into(),
                        ExchangeKind::Custom("x-consistent-hash".into()),
                        durable,
                        args,
                    )
                    .await?;
                    for k in &keys {
                        ch.exchange_bind(
                            hx.as_str().into(),
                            exchange.as_str().into(),
                            k.as_str().into(),
                            ExchangeBindOptions::default(),
                            FieldTable::default(),
                        )
                        .await?;
                    }
                    lapin::Result::Ok(())
                }
                .await;
                let _ = ch.close(200, "OK".into()).await;
                r.map_err(|e| {
                    DeliveryError::Other(format!(
                        "declaring the consistent-hash exchange {hx} (is the \
                         rabbitmq_consistent_hash_exchange plugin enabled?): {e}"
                    ))
                })?;
                for q in &self.names.partitions {
                    let mut a = FieldTable::default();
                    a.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
                    self.declare_or_keep(q, a).await?;
                    // With the consistent-hash exchange the binding key is the weight.
                    broker.bind_queue(q, hx, "1").await?;
                }
                for h in &self.names.holds {
                    self.declare_or_keep(h, FieldTable::default()).await?;
                }
            }
        }
        self.state.provisioned.store(true, Ordering::Release);
        Ok(fresh)
    }

    /// Provisions, then catches up from the store when the subscription is new and starts
    /// from the past (see the module documentation).
    async fn prepare(&self, cancel: &CancellationToken) -> Result<(), DeliveryError> {
        let Some(store) = self.stream.store.clone() else {
            self.provision().await?;
            return Ok(());
        };
        let stream_id = loop {
            if let Some(id) = (self.stream.stream_id)() {
                break id;
            }
            if !sleep_or_cancel(cancel, Duration::from_millis(200)).await {
                return Err(DeliveryError::Shutdown);
            }
        };
        let (ns, name) = (&self.plan.key.namespace, &self.plan.key.name);
        // The lock is held by the database's lock session, not by a pool connection: a
        // thousand subscriptions waiting for their locks hold no connection.
        let key = LockKey::Named(format!("weir-subscription/{ns}/{name}"));
        let Some(lease) = store.locks().acquire(key, cancel).await else {
            return Err(DeliveryError::Shutdown);
        };
        let lost = lease.lost().clone();
        tokio::select! {
            r = self.prepare_locked(&store, stream_id, cancel) => r,
            // Another worker may take over: stop here, it resumes from the last page.
            _ = lost.cancelled() => Err(DeliveryError::Other(
                "lost the subscription's lock (the database's lock session broke)".into(),
            )),
        }
    }

    async fn prepare_locked(
        &self,
        store: &Store,
        stream_id: i64,
        cancel: &CancellationToken,
    ) -> Result<(), DeliveryError> {
        let (ns, name) = (&self.plan.key.namespace, &self.plan.key.name);
        // Set-ups of one database run a few at a time (the catch-up below does not hold the
        // slot: it may take hours, and its reads are one short query per page).
        let slot = store.provision_slot().await;
        let fresh = self.provision().await?;
        let row: Option<(i64, Option<i64>, i64, i64)> = sqlx::query_as(
            "SELECT next_position, caught_up_to, position, stream_id
             FROM weir_subscription_progress WHERE namespace = $1 AND name = $2",
        )
        .bind(ns)
        .bind(name)
        .fetch_optional(store.pool())
        .await?;
        let row = match row {
            Some(r) if !fresh && r.3 == stream_id => r,
            _ => {
                // A new subscription (or its queue was deleted, or it now reads another
                // stream): record where it starts. A queue that existed before progress was
                // kept counts as `latest`.
                let head = store.head(stream_id).await?;
                let start = if fresh {
                    match &self.plan.start_from {
                        StartFrom::Latest => None,
                        StartFrom::Earliest => Some(1),
                        StartFrom::Position(p) => Some(*p),
                        StartFrom::Time(t) => Some(
                            store
                                .first_position_since(stream_id, *t)
                                .await?
                                .unwrap_or(head + 1),
                        ),
                    }
                } else {
                    None
                };
                let (next, caught) = match start {
                    None => (head + 1, Some(0)),
                    Some(p) => (p, None),
                };
                sqlx::query(
                    "INSERT INTO weir_subscription_progress
                       (namespace, name, stream_id, next_position, caught_up_to, position)
                     VALUES ($1, $2, $3, $4, $5, 0)
                     ON CONFLICT (namespace, name) DO UPDATE SET stream_id = $3,
                       next_position = $4, caught_up_to = $5, position = 0, updated_at = now()",
                )
                .bind(ns)
                .bind(name)
                .bind(stream_id)
                .bind(next)
                .bind(caught)
                .execute(store.pool())
                .await?;
                (next, caught, 0, stream_id)
            }
        };
        drop(slot);
        self.state.position.fetch_max(row.2, Ordering::AcqRel);
        if let Some(hwm) = row.1 {
            self.hwm.store(hwm, Ordering::Release);
            return Ok(());
        }
        let mut next = row.0;
        tracing::info!(subscription = %self.plan.key, from = next, "catching up from the store");
        loop {
            let page = store.read_range(stream_id, next, CATCHUP_PAGE).await?;
            let Some(last) = page.last().map(|e| e.position) else {
                break;
            };
            let events: Vec<CloudEvent> = page.iter().map(|e| e.to_cloud_event()).collect();
            self.deliver_page(events, cancel).await?;
            next = last + 1;
            sqlx::query(
                "UPDATE weir_subscription_progress SET next_position = $3, updated_at = now()
                 WHERE namespace = $1 AND name = $2",
            )
            .bind(ns)
            .bind(name)
            .bind(next)
            .execute(store.pool())
            .await?;
            self.flush_position().await;
        }
        let hwm = next - 1;
        sqlx::query(
            "UPDATE weir_subscription_progress SET caught_up_to = $3, updated_at = now()
             WHERE namespace = $1 AND name = $2",
        )
        .bind(ns)
        .bind(name)
        .bind(hwm)
        .execute(store.pool())
        .await?;
        self.hwm.store(hwm, Ordering::Release);
        tracing::info!(subscription = %self.plan.key, to = hwm, "caught up");
        Ok(())
    }

    /// Delivers one catch-up page: concurrently (ordering none, up to `consumers`) or one
    /// event at a time (perKey, which keeps every key's order).
    async fn deliver_page(
        &self,
        events: Vec<CloudEvent>,
        cancel: &CancellationToken,
    ) -> Result<(), DeliveryError> {
        let in_place = !matches!(self.plan.ordering, OrderingPlan::None);
        let width = if in_place {
            1
        } else {
            self.settings.borrow().consumers.max(1) as usize
        };
        let results: Vec<Result<(), DeliveryError>> = futures::stream::iter(events)
            .map(|ev| async move {
                if !self.accepts(&ev) {
                    self.count("filtered");
                    self.note_position(&ev);
                    return Ok(());
                }
                let _permit = self.limit.acquire().await;
                // perKey catch-up retries wait here: the catch-up holds no message, and a
                // crash resumes from its last recorded page.
                let wait = if in_place {
                    Wait::InPlace
                } else {
                    Wait::Delayed
                };
                self.process(ev, 0, &wait, cancel).await
            })
            .buffered(width)
            .collect()
            .await;
        results.into_iter().collect()
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

    /// Delivers an event until it is settled: delivered, handed to a durable retry, or
    /// dead-lettered (each confirmed). `attempts` were made before. `wait`: where retries
    /// wait. An error means nothing was settled: the caller returns the message to its queue.
    async fn process(
        &self,
        ev: CloudEvent,
        attempts: u32,
        wait: &Wait<'_>,
        cancel: &CancellationToken,
    ) -> Result<(), DeliveryError> {
        let labels = self.labels();
        let mut attempt = attempts;
        if let Wait::Lane(lane) = wait
            && (lane.redelivered || lane.dirty.load(Ordering::Acquire))
            && let Some(h) = lane.read(&ev).await?
        {
            // A retry was under way when the message was returned: resume it.
            attempt = attempt.max(h.attempts);
            lane.wait_until(h.due_ms, cancel).await?;
        }
        let inflight = self
            .metrics
            .subscription_inflight
            .with_label_values(&labels);
        loop {
            self.pace().await;
            attempt += 1;
            self.state.inflight.fetch_add(1, Ordering::AcqRel);
            inflight.inc();
            let (outcome, took) = self.sender.send(&ev).await;
            self.state.inflight.fetch_sub(1, Ordering::AcqRel);
            inflight.dec();
            self.metrics
                .delivery_duration
                .with_label_values(&labels)
                .observe(took.as_secs_f64());
            match outcome {
                Outcome::Delivered { status, reply } => {
                    self.attempt_metric("success");
                    *self.state.sink.locked() =
                        Some((true, format!("last delivery answered {status}")));
                    if let (Some(r), Some(stream)) = (reply, &self.plan.reply) {
                        let r = reply_event(r, &ev);
                        match self.appender.append(stream, vec![r]).await {
                            Ok(()) => {}
                            Err(DeliveryError::Rejected(why)) => {
                                // The delivery itself succeeded; a reply the target stream
                                // refuses is reported, not retried for ever.
                                tracing::warn!(subscription = %self.plan.key, reason = %why, "reply refused");
                                self.count("reply_refused");
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    if let Wait::Lane(lane) = wait {
                        lane.settle().await?;
                    }
                    self.count("delivered");
                    self.note_position(&ev);
                    return Ok(());
                }
                Outcome::Failed(f) => {
                    self.attempt_metric(f.class());
                    *self.state.sink.locked() = Some((
                        false,
                        format!("last attempt failed: {} {}", f.code, first_line(&f.data)),
                    ));
                    if f.retryable && attempt <= self.plan.delivery.retry {
                        let delay = match f.retry_after {
                            Some(d) => retry_after_delay(&self.plan.delivery, d),
                            None => retry_delay(
                                &self.plan.delivery,
                                attempt,
                                rand::random_range(0.8..=1.2),
                            ),
                        };
                        self.metrics
                            .delivery_retries
                            .with_label_values(&labels)
                            .inc();
                        match wait {
                            Wait::Delayed => return self.publish_retry(&ev, attempt, delay).await,
                            Wait::InPlace => {
                                if !sleep_or_cancel(cancel, delay).await {
                                    return Err(DeliveryError::Shutdown);
                                }
                            }
                            Wait::Lane(lane) => {
                                let due = now_ms().saturating_add(delay.as_millis() as i64);
                                self.record_hold(lane, &ev, attempt, due).await?;
                                lane.wait_until(due, cancel).await?;
                            }
                        }
                        continue;
                    }
                    self.dead_letter(&ev, &f, attempt).await?;
                    if let Wait::Lane(lane) = wait {
                        lane.settle().await?;
                    }
                    self.note_position(&ev);
                    return Ok(());
                }
            }
        }
    }

    fn attempt_metric(&self, outcome: &str) {
        let [ns, sub] = self.labels();
        self.metrics
            .delivery_attempts
            .with_label_values(&[ns, sub, outcome])
            .inc();
    }

    async fn publish_to_queue(
        &self,
        queue: &str,
        mut msg: OutMessage,
    ) -> Result<(), DeliveryError> {
        msg.routing_key = queue.to_string();
        let deadline = Instant::now() + PUBLISH_TIMEOUT;
        let routing = self.stream.broker.publish("", &[msg], deadline).await?;
        match routing.first() {
            Some(Routing::Routed) => Ok(()),
            _ => Err(DeliveryError::Broker(BrokerError::Unavailable(format!(
                "queue {queue} does not exist"
            )))),
        }
    }

    /// Records, confirmed, that `ev` had `attempts` attempts and the next is due at `due_ms`.
    async fn record_hold(
        &self,
        lane: &Lane<'_>,
        ev: &CloudEvent,
        attempts: u32,
        due_ms: i64,
    ) -> Result<(), DeliveryError> {
        let mut headers = FieldTable::default();
        headers.insert(
            ATTEMPTS_HEADER.into(),
            AMQPValue::LongLongInt(i64::from(attempts)),
        );
        headers.insert(DUE_HEADER.into(), AMQPValue::LongLongInt(due_ms));
        headers.insert(
            HOLD_ID_HEADER.into(),
            AMQPValue::LongString(ev.id.as_str().into()),
        );
        headers.insert(
            HOLD_SOURCE_HEADER.into(),
            AMQPValue::LongString(ev.source.as_str().into()),
        );
        let msg = OutMessage {
            routing_key: String::new(),
            headers,
            body: bytes::Bytes::new(),
            message_id: String::new(),
            content_type: None,
            timestamp: None,
        };
        // Marked before the publish: a record confirmed but not seen as such is still purged.
        lane.dirty.store(true, Ordering::Release);
        self.publish_to_queue(lane.hold, msg).await
    }

    async fn publish_retry(
        &self,
        ev: &CloudEvent,
        attempts: u32,
        delay: Duration,
    ) -> Result<(), DeliveryError> {
        let queue = self.names.retry_queue(delay);
        if !self.declared_delays.locked().contains(&delay) {
            self.declare_delay_queue(&queue, delay).await?;
            self.declared_delays.locked().insert(delay);
        }
        let mut msg = to_message(ev);
        msg.headers.insert(
            ATTEMPTS_HEADER.into(),
            AMQPValue::LongLongInt(i64::from(attempts)),
        );
        let r = self.publish_to_queue(&queue, msg).await;
        if r.is_err() {
            // The queue may have been deleted behind our back: declare it again next time.
            self.declared_delays.locked().remove(&delay);
        }
        r
    }

    async fn declare_delay_queue(&self, queue: &str, delay: Duration) -> Result<(), DeliveryError> {
        let qt = self.stream.plan.broker.queue_type;
        let mut args = FieldTable::default();
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(delay.as_millis() as i64),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from("")),
        );
        // Back to the subscription's queue (perKey retries wait in place, so this is only
        // used with ordering none).
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(self.names.queue.as_str().into()),
        );
        if qt == QueueType::Quorum {
            // Expired messages move at least once: the broker republishes with a confirm
            // before it drops the message here.
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString("at-least-once".into()),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
        }
        self.declare_or_keep(queue, args).await
    }

    /// Declares a queue. One that exists with other immutable arguments (the stream's
    /// `queueType` changed, say) is kept as it is and reported, instead of failing for ever:
    /// its messages stay deliverable. Deleting the subscription with `--prune` recreates it.
    async fn declare_or_keep(&self, name: &str, args: FieldTable) -> Result<(), DeliveryError> {
        let qt = self.stream.plan.broker.queue_type;
        match self.stream.broker.declare_queue(name, qt, args).await {
            Err(BrokerError::Protocol { code: 406, text }) => {
                if self.stream.broker.queue_counts(name).await?.is_none() {
                    return Err(BrokerError::Protocol { code: 406, text }.into());
                }
                let notice = format!(
                    "queue {name} exists with other arguments ({text}); it is kept as it is \
                     (delete the subscription with --prune to recreate it)"
                );
                tracing::warn!(subscription = %self.plan.key, "{notice}");
                *self.state.notice.locked() = Some(notice);
                Ok(())
            }
            r => Ok(r?),
        }
    }

    /// Queues of an earlier shape of this subscription (another `ordering`, fewer
    /// `partitions`) that still exist: unbound here so that nothing new reaches them, then
    /// drained by [`drain`].
    async fn retire_stale(&self) -> Result<Vec<String>, DeliveryError> {
        let broker = &self.stream.broker;
        let exchange = &self.stream.plan.broker.exchange;
        let (mut stale, first_lane) = match &self.plan.ordering {
            OrderingPlan::None => (vec![], 0),
            OrderingPlan::PerKey { partitions, .. } => {
                let main = &self.names.queue;
                let found = broker.queue_counts(main).await?.is_some();
                (if found { vec![main.clone()] } else { vec![] }, *partitions)
            }
        };
        // Lanes are always declared p0, p1, … in order, so the first one missing ends the
        // stale ones: looking further would only log the broker's NOT_FOUND for each.
        for i in first_lane..MAX_PARTITIONS_SCAN {
            let q = format!("{}.p{i}", self.names.queue);
            if broker.queue_counts(&q).await?.is_none() {
                break;
            }
            stale.push(q);
        }
        if stale.is_empty() {
            return Ok(stale);
        }
        match &self.names.hash_exchange {
            // Deleting the old hash exchange removes its bindings, both ways.
            None => {
                broker
                    .delete_exchange(&format!(
                        "weir-hash.{}.{}",
                        self.plan.key.namespace, self.plan.key.name
                    ))
                    .await?
            }
            Some(hx) => {
                for q in stale.iter().filter(|q| **q != self.names.queue) {
                    broker.unbind_queue(q, hx, "1").await?;
                }
            }
        }
        if stale.contains(&self.names.queue) {
            let mut keys = binding_keys(&self.plan);
            keys.push("#".into());
            keys.dedup();
            for k in keys {
                broker.unbind_queue(&self.names.queue, exchange, &k).await?;
            }
        }
        tracing::info!(subscription = %self.plan.key, queues = ?stale, "draining queues of an earlier shape");
        Ok(stale)
    }

    async fn dead_letter(
        &self,
        ev: &CloudEvent,
        f: &Failure,
        attempts: u32,
    ) -> Result<(), DeliveryError> {
        let mut dead = ev.clone();
        let put = |ev: &mut CloudEvent, k: &str, v: String| {
            ev.extensions.insert(k.to_string(), ExtValue::String(v));
        };
        put(&mut dead, EXT_ERROR_DEST, self.sender.url().to_string());
        put(&mut dead, EXT_ERROR_CODE, f.code.clone());
        put(&mut dead, EXT_ERROR_DATA, f.data.clone());
        put(&mut dead, EXT_ATTEMPTS, attempts.to_string());
        let mut msg = to_message(&dead);
        msg.headers.insert(
            ATTEMPTS_HEADER.into(),
            AMQPValue::LongLongInt(i64::from(attempts)),
        );
        self.publish_to_queue(&self.names.dead_letter_queue, msg)
            .await?;
        let labels = self.labels();
        self.metrics.deadletters.with_label_values(&labels).inc();
        self.count("deadlettered");
        match &self.plan.delivery.dead_letter {
            None => {}
            Some(DeadLetterPlan::Sink(_)) => {
                if let Some(s) = &self.dl_sender
                    && let (Outcome::Failed(e), _) = s.send(&dead).await
                {
                    // The dead-letter queue holds the event; the sink is a notification.
                    tracing::warn!(subscription = %self.plan.key, code = %e.code,
                        "dead-letter sink refused the event (it stays in the dead-letter queue)");
                }
            }
            Some(DeadLetterPlan::Stream(stream)) => {
                let failed = failed_event(&dead, &self.plan.key.name);
                match self.appender.append(stream, vec![failed]).await {
                    Ok(()) => {}
                    Err(DeliveryError::Rejected(why)) => {
                        tracing::warn!(subscription = %self.plan.key, reason = %why,
                            "dead-letter stream refused the failed event (it stays in the dead-letter queue)");
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Handles one live message; says what to do with it.
    async fn handle(
        &self,
        props: &lapin::BasicProperties,
        body: &[u8],
        wait: &Wait<'_>,
        cancel: &CancellationToken,
    ) -> Settle {
        let attempts = props
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(ATTEMPTS_HEADER).cloned());
        let attempts = match attempts {
            Some(AMQPValue::LongLongInt(n)) => Some(n.clamp(0, i64::from(u32::MAX)) as u32),
            Some(AMQPValue::LongInt(n)) => Some(n.max(0) as u32),
            _ => None,
        };
        let ev = match from_properties(props, body) {
            Ok(ev) => ev,
            Err(e) => {
                // Not a CloudEvent: nothing can deliver it. Park it in the dead-letter queue,
                // as received, with the reason.
                let mut headers = props.headers().clone().unwrap_or_default();
                headers.insert(
                    "weir-error".into(),
                    AMQPValue::LongString(e.to_string().into()),
                );
                let msg = OutMessage {
                    routing_key: String::new(),
                    headers,
                    body: bytes::Bytes::copy_from_slice(body),
                    message_id: String::new(),
                    content_type: props.content_type().as_ref().map(|c| c.to_string()),
                    timestamp: None,
                };
                return match self
                    .publish_to_queue(&self.names.dead_letter_queue, msg)
                    .await
                {
                    Ok(()) => Settle::Ack,
                    Err(_) => Settle::Return,
                };
            }
        };
        if attempts.is_none()
            && let Some(p) = ev
                .extension_str(EXT_POSITION)
                .and_then(|p| p.parse::<i64>().ok())
            && p <= self.hwm.load(Ordering::Acquire)
        {
            // Delivered by the catch-up already.
            self.count("duplicate");
            return Settle::Ack;
        }
        if !self.accepts(&ev) {
            self.count("filtered");
            return Settle::Ack;
        }
        match self.process(ev, attempts.unwrap_or(0), wait, cancel).await {
            Ok(()) => Settle::Ack,
            Err(DeliveryError::Shutdown) => Settle::Return,
            Err(DeliveryError::Refresh) => Settle::Refresh,
            Err(e) => {
                tracing::warn!(subscription = %self.plan.key, error = %e,
                    "could not settle a delivery; it returns to the queue");
                sleep_or_cancel(cancel, RECONNECT_DELAY).await;
                Settle::Return
            }
        }
    }
}

/// What becomes of a message after [`Inner::handle`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Settle {
    /// Settled (delivered, filtered, retried elsewhere or dead-lettered): ack it.
    Ack,
    /// Not settled: return it to its queue (or, in a lane, try it again here).
    Return,
    /// A perKey lane must return its messages now (see [`Lane::wait_until`]).
    Refresh,
}

/// Spaces starts evenly at `rate` per second (no burst): the limit is per worker, and an
/// even pace is what a rate-limited sink expects.
#[derive(Debug)]
pub struct Pacer {
    next: tokio::sync::Mutex<Instant>,
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer {
            next: tokio::sync::Mutex::new(Instant::now()),
        }
    }
}

impl Pacer {
    /// Waits for the next start slot; `None` (unlimited) returns at once.
    pub async fn wait(&self, rate: Option<u32>) {
        let Some(rate) = rate else { return };
        let mut next = self.next.lock().await;
        let now = Instant::now();
        if *next < now {
            *next = now;
        }
        let at = *next;
        *next += Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
        drop(next);
        tokio::time::sleep_until(at).await;
    }
}

fn first_line(s: &str) -> &str {
    let line = s.lines().next().unwrap_or_default();
    match line.char_indices().nth(120) {
        Some((i, _)) => &line[..i],
        None => line,
    }
}

/// Weir's stored-event extensions, which the target stream assigns anew.
fn strip_stored(ev: &mut CloudEvent) {
    for k in [EXT_POSITION, EXT_VERSION, EXT_RECORDED_TIME] {
        ev.extensions.remove(k);
    }
}

/// A sink's reply as appended to `reply.stream`: the delivered event's `correlationid`
/// (kept when the reply has its own) and `causationid` = the delivered event's id.
pub fn reply_event(mut reply: CloudEvent, cause: &CloudEvent) -> CloudEvent {
    strip_stored(&mut reply);
    if let Some(c) = cause.correlation_id() {
        reply
            .extensions
            .entry(EXT_CORRELATION_ID.into())
            .or_insert(ExtValue::String(c));
    }
    reply
        .extensions
        .insert(EXT_CAUSATION_ID.into(), ExtValue::String(cause.id.clone()));
    reply
}

/// The `dev.weir.delivery.failed` event appended to a `deadLetterSink: {stream}`: the dead
/// letter with a derived id (stable, so that appending it twice stores it once), the failed
/// event's id as `causationid`, its `correlationid` kept and its type in `weirfailedtype`.
pub fn failed_event(dead: &CloudEvent, subscription: &str) -> CloudEvent {
    let mut ev = dead.clone();
    strip_stored(&mut ev);
    ev.id = format!("{}.failed.{subscription}", dead.id);
    ev.extensions
        .insert("weirfailedtype".into(), ExtValue::String(dead.ty.clone()));
    ev.ty = DELIVERY_FAILED_TYPE.into();
    ev.extensions
        .insert(EXT_CAUSATION_ID.into(), ExtValue::String(dead.id.clone()));
    ev
}

/// Consumes the subscription's queue (ordering none) until stopped, reconnecting when the
/// channel breaks and re-consuming when `consumers` changes (prefetch = consumers).
async fn consume_shared(inner: Arc<Inner>, cancel: CancellationToken) {
    let mut tasks = JoinSet::new();
    let mut settings = inner.settings.clone();
    'connect: while !cancel.is_cancelled() {
        let prefetch = settings.borrow_and_update().consumers;
        let (ch, mut consumer, tag) =
            match open_consumer(&inner, &inner.names.queue, prefetch).await {
                Ok(x) => x,
                Err(e) => {
                    // The broker's link backs off its reconnects: this costs nothing while it
                    // is down, and it is not logged (the link says it once).
                    inner.state.set_failure(
                        crate::data::engine::reason::BROKER_UNAVAILABLE,
                        e.to_string(),
                    );
                    if !sleep_or_cancel(&cancel, RECONNECT_DELAY).await {
                        break;
                    }
                    continue;
                }
            };
        inner.state.set_error(None);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    finish(&ch, tag, &mut tasks).await;
                    return;
                }
                changed = settings.changed() => {
                    if changed.is_err() { continue; }
                    if settings.borrow().consumers != prefetch {
                        // A new prefetch needs a new consumer: the started deliveries finish
                        // and are acked, the prefetched ones return to the queue with the
                        // channel, and consuming resumes with the new prefetch.
                        finish(&ch, tag, &mut tasks).await;
                        continue 'connect;
                    }
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                d = consumer.next() => match d {
                    Some(Ok(d)) => {
                        let permit = tokio::select! {
                            _ = cancel.cancelled() => {
                                let _ = d.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
                                finish(&ch, tag, &mut tasks).await;
                                return;
                            }
                            p = inner.limit.clone().acquire_owned() => p,
                        };
                        let Ok(permit) = permit else { continue };
                        let inner = inner.clone();
                        let cancel = cancel.clone();
                        tasks.spawn(async move {
                            let settle = inner.handle(&d.properties, &d.data, &Wait::Delayed, &cancel).await;
                            let _ = if settle == Settle::Ack {
                                d.acker.ack(BasicAckOptions::default()).await
                            } else {
                                d.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await
                            };
                            drop(permit);
                        });
                    }
                    Some(Err(e)) => {
                        tracing::warn!(subscription = %inner.plan.key, error = %e, "consumer failed; reconnecting");
                        while tasks.join_next().await.is_some() {}
                        sleep_or_cancel(&cancel, RECONNECT_DELAY).await;
                        continue 'connect;
                    }
                    None => {
                        while tasks.join_next().await.is_some() {}
                        sleep_or_cancel(&cancel, RECONNECT_DELAY).await;
                        continue 'connect;
                    }
                }
            }
        }
    }
}

/// Stops a consumer gracefully: no new deliveries, the started ones finish (and ack), then
/// the channel closes and the broker takes back every prefetched message not started.
async fn finish(ch: &Channel, tag: ShortString, tasks: &mut JoinSet<()>) {
    let _ = ch.basic_cancel(tag, BasicCancelOptions::default()).await;
    while tasks.join_next().await.is_some() {}
    let _ = ch.close(200, "OK".into()).await;
}

async fn open_consumer(
    inner: &Inner,
    queue: &str,
    prefetch: u32,
) -> Result<(Channel, lapin::Consumer, ShortString), DeliveryError> {
    let ch = inner.stream.broker.open_channel().await?;
    let amqp = |e: lapin::Error| {
        DeliveryError::Broker(BrokerError::Unavailable(format!("consume {queue}: {e}")))
    };
    // Prefetch bounds the messages held by this worker: one per delivery in flight.
    let prefetch = u16::try_from(prefetch).unwrap_or(u16::MAX);
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(amqp)?;
    let tag: ShortString = format!("weir-{}", uuid::Uuid::now_v7()).into();
    let consumer = ch
        .basic_consume(
            queue.into(),
            tag.clone(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp)?;
    Ok((ch, consumer, tag))
}

/// Delivers what is left in a queue of an earlier shape (one message at a time, in queue
/// order), then deletes it once it stayed empty long enough for pending retries to return.
async fn drain(inner: Arc<Inner>, queue: String, cancel: CancellationToken) {
    let settle = inner
        .plan
        .delivery
        .backoff_max
        .max(inner.plan.delivery.retry_after_max)
        .min(DRAIN_SETTLE_MAX)
        + Duration::from_secs(1);
    let mut empty_since: Option<Instant> = None;
    while !cancel.is_cancelled() {
        let ch = match inner.stream.broker.open_channel().await {
            Ok(ch) => ch,
            Err(_) => {
                sleep_or_cancel(&cancel, RECONNECT_DELAY).await;
                continue;
            }
        };
        loop {
            let got = ch
                .basic_get(queue.as_str().into(), BasicGetOptions::default())
                .await;
            let Ok(got) = got else { break };
            let Some(m) = got else {
                let since = *empty_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= settle {
                    // Quorum queues do not implement `if-empty`: the queue was unbound and
                    // stayed empty through the settle time, so it is deleted outright.
                    let _ = ch.close(200, "OK".into()).await;
                    match inner.stream.broker.delete_queue(&queue).await {
                        Ok(()) => {
                            tracing::info!(subscription = %inner.plan.key, queue, "drained and deleted");
                            // A retired lane's hold queue goes with it (its records were
                            // about events this drain has since delivered).
                            let lane = queue
                                .strip_prefix(&format!("{}.p", inner.names.queue))
                                .and_then(|i| i.parse::<u32>().ok());
                            if let Some(i) = lane
                                && !inner.names.partitions.contains(&queue)
                            {
                                let key = &inner.plan.key;
                                let hold = Names::hold_name(&key.namespace, &key.name, i);
                                let _ = inner.stream.broker.delete_queue(&hold).await;
                            }
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(subscription = %inner.plan.key, queue, error = %e,
                                "deleting a drained queue");
                            empty_since = None;
                            break;
                        }
                    }
                }
                if !sleep_or_cancel(&cancel, Duration::from_secs(1)).await {
                    let _ = ch.close(200, "OK".into()).await;
                    return;
                }
                continue;
            };
            empty_since = None;
            let d = m.delivery;
            let settle = inner
                .handle(&d.properties, &d.data, &Wait::InPlace, &cancel)
                .await;
            let _ = if settle == Settle::Ack {
                d.acker.ack(BasicAckOptions::default()).await
            } else {
                d.acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await
            };
        }
        let _ = ch.close(200, "OK".into()).await;
        sleep_or_cancel(&cancel, RECONNECT_DELAY).await;
    }
}

/// Consumes one partition queue (perKey): one delivery at a time, in queue order; a retry
/// waits at the head of the lane (see the module documentation), so later events of the same
/// keys wait behind it.
async fn consume_lane(inner: Arc<Inner>, queue: String, hold: String, cancel: CancellationToken) {
    while !cancel.is_cancelled() {
        let (ch, mut consumer, tag) =
            match open_consumer(&inner, &queue, LANE_PREFETCH.into()).await {
                Ok(x) => x,
                Err(e) => {
                    // The broker's link backs off its reconnects: this costs nothing while it
                    // is down, and it is not logged (the link says it once).
                    inner.state.set_failure(
                        crate::data::engine::reason::BROKER_UNAVAILABLE,
                        e.to_string(),
                    );
                    if !sleep_or_cancel(&cancel, RECONNECT_DELAY).await {
                        return;
                    }
                    continue;
                }
            };
        let opened = Instant::now();
        loop {
            let d = tokio::select! {
                _ = cancel.cancelled() => None,
                d = consumer.next() => Some(d),
            };
            let Some(d) = d else {
                let mut none = JoinSet::new();
                finish(&ch, tag, &mut none).await;
                return;
            };
            let Some(Ok(d)) = d else {
                sleep_or_cancel(&cancel, RECONNECT_DELAY).await;
                break;
            };
            let permit = tokio::select! {
                _ = cancel.cancelled() => None,
                p = inner.limit.clone().acquire_owned() => p.ok(),
            };
            let settle = match permit {
                Some(_p) => {
                    let lane = Lane {
                        ch: &ch,
                        hold: &hold,
                        opened,
                        refresh: inner.lane_refresh,
                        redelivered: d.redelivered,
                        dirty: AtomicBool::new(false),
                    };
                    // A message that could not be settled (the broker or the reply stream is
                    // away) is tried again here rather than returned: the messages prefetched
                    // behind it must not overtake it. A broken channel returns them all, in
                    // order, so then it is left to the reconnect.
                    loop {
                        let s = inner
                            .handle(&d.properties, &d.data, &Wait::Lane(&lane), &cancel)
                            .await;
                        if s != Settle::Return || cancel.is_cancelled() || !ch.status().connected()
                        {
                            break s;
                        }
                    }
                }
                None => Settle::Return,
            };
            match settle {
                Settle::Ack => {
                    let _ = d.acker.ack(BasicAckOptions::default()).await;
                }
                Settle::Return => {
                    let _ = d
                        .acker
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..Default::default()
                        })
                        .await;
                }
                Settle::Refresh => {
                    tracing::info!(subscription = %inner.plan.key, queue,
                        "lane returns its messages to the queue during a long retry wait \
                         (they must not outlive the broker's consumer timeout)");
                    // Closing the channel returns this message and those prefetched behind it
                    // to the head of the queue, in order; the next consumer (this one again,
                    // or another worker's) resumes from the hold record.
                    let _ = ch.close(200, "OK".into()).await;
                    break;
                }
            }
            if !ch.status().connected() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn ev(id: &str, ext: &[(&str, &str)]) -> CloudEvent {
        CloudEvent {
            id: id.into(),
            source: "/s".into(),
            ty: "order.created".into(),
            datacontenttype: None,
            dataschema: None,
            subject: None,
            time: None,
            extensions: ext
                .iter()
                .map(|(k, v)| (k.to_string(), ExtValue::String(v.to_string())))
                .collect::<BTreeMap<_, _>>(),
            data: None,
        }
    }

    #[test]
    fn replies_keep_the_correlation_and_name_their_cause() {
        let cause = ev("c1", &[("correlationid", "saga-1"), ("weirposition", "9")]);
        let r = reply_event(ev("r1", &[("weirposition", "3")]), &cause);
        assert_eq!(r.correlation_id().as_deref(), Some("saga-1"));
        assert_eq!(r.extension_str("causationid").as_deref(), Some("c1"));
        assert!(r.extension_str("weirposition").is_none());
        // A reply's own correlationid wins.
        let r = reply_event(ev("r2", &[("correlationid", "own")]), &cause);
        assert_eq!(r.correlation_id().as_deref(), Some("own"));
    }

    #[test]
    fn failed_events_keep_the_correlation_and_have_a_stable_id() {
        let dead = ev(
            "p1",
            &[
                ("correlationid", "saga-1"),
                ("weirposition", "4"),
                ("weirerrorcode", "400"),
            ],
        );
        let f = failed_event(&dead, "payments");
        assert_eq!(f.ty, DELIVERY_FAILED_TYPE);
        assert_eq!(f.id, "p1.failed.payments");
        assert_eq!(f.correlation_id().as_deref(), Some("saga-1"));
        assert_eq!(f.extension_str("causationid").as_deref(), Some("p1"));
        assert_eq!(
            f.extension_str("weirfailedtype").as_deref(),
            Some("order.created")
        );
        assert_eq!(f.extension_str("weirerrorcode").as_deref(), Some("400"));
        assert!(f.extension_str("weirposition").is_none());
        assert_eq!(failed_event(&dead, "payments"), f);
    }

    #[tokio::test(start_paused = true)]
    async fn the_pacer_spaces_starts_and_can_change_rate() {
        let p = Pacer::default();
        let start = Instant::now();
        for _ in 0..5 {
            p.wait(Some(10)).await;
        }
        // Starts at 0, 100, 200, 300 and 400 ms.
        assert_eq!(start.elapsed(), Duration::from_millis(400));
        let t = Instant::now();
        p.wait(Some(2)).await; // the slot booked at 10/s
        p.wait(Some(2)).await;
        assert_eq!(t.elapsed(), Duration::from_millis(600));
        let t = Instant::now();
        for _ in 0..100 {
            p.wait(None).await;
        }
        assert!(t.elapsed() < Duration::from_millis(1));
    }
}
