//! The subscriptions running in this worker: [`Subscriptions::apply`] moves them to a new
//! topology (start, stop, restart on a changed spec, live update of `consumers` and
//! `rateLimit`), and the dead-letter operations the admin API offers.
//!
//! `consumers` and `rateLimit` are per worker (per replica): with three replicas and
//! `consumers: 4`, up to twelve deliveries run at once. `consumers: 0` keeps the subscription
//! provisioned with no consumer (scaled to zero); moving to or from 0 restarts its runner.

use crate::poison::RwLockExt;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicGetOptions, QueuePurgeOptions};
use lapin::types::AMQPValue;
use tokio::time::Instant;

use crate::data::broker::{Routing, from_properties, to_message};
use crate::data::delivery::guard::SinkGuard;
use crate::data::delivery::runner::StreamSide;
use crate::data::delivery::{
    ATTEMPTS_HEADER, Appender, DeliveryError, EXT_ATTEMPTS, EXT_ERROR_CODE, EXT_ERROR_DATA,
    EXT_ERROR_DEST, Runner,
};
use crate::data::engine::{Engine, StreamRuntime};
use crate::data::event::{CloudEvent, to_structured_json};
use crate::metrics::Metrics;
use crate::topology::{DeletionPolicy, Key, StreamPlan, SubscriptionPlan};

/// How long a redriven message may wait for the broker's confirm.
const REDRIVE_CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// Most dead letters one list answers: the admin API is for people and scripts, not bulk
/// export; the rest stays in the queue.
pub const MAX_LIST: usize = 1000;

struct Entry {
    runner: Arc<Runner>,
    /// The plan as last applied (consumers and rateLimit may differ from the runner's
    /// starting plan).
    plan: Arc<SubscriptionPlan>,
    /// The stream runtimes it was applied with, in `plan.streams` order. An apply that
    /// finds the same plan allocation over the same runtimes has nothing to compare (see
    /// [`Subscriptions::unchanged`]). Weak: a stopped stream's runtime is not kept alive
    /// for this, and the allocation it points to cannot be reused while it is held.
    streams: Vec<Weak<StreamRuntime>>,
}

/// Every subscription of this worker.
pub struct Subscriptions {
    engine: Arc<Engine>,
    /// Where replies and dead letters routed to a stream go (the plane's append path).
    appender: Arc<dyn Appender>,
    metrics: Metrics,
    /// The sink guard every runner's senders go through (one per process).
    guard: Arc<SinkGuard>,
    running: RwLock<BTreeMap<Key, Entry>>,
    /// Why a subscription in the topology is not running.
    problems: RwLock<BTreeMap<Key, String>>,
}

/// One dead letter, as the admin API shows it.
#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub ty: String,
    pub position: Option<String>,
    pub attempts: Option<String>,
    pub error_code: Option<String>,
    pub error_dest: Option<String>,
    pub error_data: Option<String>,
    /// The whole event in the CloudEvents JSON format.
    #[schema(value_type = crate::openapi::CloudEventJson)]
    pub event: serde_json::Value,
}

/// Two plans that differ at most in `consumers` and `rateLimit` (applied live). Scaling to
/// or from zero is not live: a runner scaled to zero runs no consumer at all, so the change
/// restarts it (a graceful stop, then a start that resumes from the queues and the recorded
/// progress).
fn same_but_live(a: &SubscriptionPlan, b: &SubscriptionPlan) -> bool {
    if (a.consumers == 0) != (b.consumers == 0) {
        return false;
    }
    let mut b = b.clone();
    b.consumers = a.consumers;
    b.rate_limit = a.rate_limit;
    b.generation = a.generation;
    *a == b
}

impl Subscriptions {
    pub fn new(
        engine: Arc<Engine>,
        appender: Arc<dyn Appender>,
        guard: Arc<SinkGuard>,
    ) -> Subscriptions {
        Subscriptions {
            appender,
            guard,
            metrics: engine.metrics.clone(),
            engine,
            running: RwLock::new(BTreeMap::new()),
            problems: RwLock::new(BTreeMap::new()),
        }
    }

    /// The running subscription and the plan applied to it.
    pub fn get(&self, key: &Key) -> Option<(Arc<Runner>, SubscriptionPlan)> {
        self.running
            .reading()
            .get(key)
            .map(|e| (e.runner.clone(), SubscriptionPlan::clone(&e.plan)))
    }

    /// Whether `key` runs `plan` (the same allocation, which the builder hands back for a
    /// subscription it did not re-plan) over the same stream runtimes as when last applied:
    /// then the apply has nothing to do for it.
    fn unchanged(&self, key: &Key, plan: &Arc<SubscriptionPlan>) -> bool {
        let running = self.running.reading();
        let Some(e) = running.get(key) else {
            return false;
        };
        Arc::ptr_eq(&e.plan, plan)
            && e.streams.len() == plan.streams.len()
            && plan.streams.iter().zip(&e.streams).all(|(k, w)| {
                self.engine
                    .stream_by_key(k)
                    .is_some_and(|rt| std::ptr::eq(Arc::as_ptr(&rt), w.as_ptr()))
            })
    }

    /// The stream runtimes `sides` stand for, to be recorded with an applied plan.
    fn runtimes(&self, plan: &SubscriptionPlan) -> Vec<Weak<StreamRuntime>> {
        plan.streams
            .iter()
            .filter_map(|k| self.engine.stream_by_key(k))
            .map(|rt| Arc::downgrade(&rt))
            .collect()
    }

    /// Records `plan` as applied to the running `key`, with the runtimes it reads now.
    fn applied(&self, key: &Key, plan: &Arc<SubscriptionPlan>) {
        let streams = self.runtimes(plan);
        if let Some(e) = self.running.writing().get_mut(key) {
            e.plan = plan.clone();
            e.streams = streams;
        }
    }

    /// Why a subscription of the topology is not running, if so.
    pub fn problem(&self, key: &Key) -> Option<String> {
        self.problems.reading().get(key).cloned()
    }

    /// Moves the running subscriptions to `plans` (call after the engine applied the
    /// streams). Subscriptions in `keep` (present but currently invalid) keep running as
    /// they are; others absent from `plans` stop, and with `prune` their queues and progress
    /// are deleted when their deletionPolicy is Delete.
    pub async fn apply(
        &self,
        plans: &BTreeMap<Key, Arc<SubscriptionPlan>>,
        keep: &BTreeSet<Key>,
        prune: bool,
    ) -> Vec<DeliveryError> {
        let mut errors = Vec::new();
        let mut problems = BTreeMap::new();
        for (key, plan) in plans {
            if self.unchanged(key, plan) {
                continue;
            }
            let sides = match self.sides(plan) {
                Ok(sides) => sides,
                Err(missing) => {
                    problems.insert(key.clone(), format!("EventStream {missing} is not running"));
                    // Bound first: the lock guard must not live across the await (Send futures).
                    let old = self.running.writing().remove(key);
                    if let Some(e) = old {
                        e.runner.stop().await;
                    }
                    continue;
                }
            };
            let wanted: BTreeMap<Key, StreamPlan> = sides
                .iter()
                .map(|s| (s.plan.key.clone(), s.plan.clone()))
                .collect();
            let current = self.get(key);
            if let Some((runner, applied)) = &current {
                let running = runner.stream_plans();
                // The runner's starting plan with the streams it reads now (they may have
                // changed in place since it started).
                let mut moved = runner.plan.clone();
                moved.streams = running.keys().cloned().collect();
                if running == wanted && same_but_live(&moved, plan) {
                    if applied != &**plan {
                        runner.update(plan);
                        tracing::info!(subscription = %key, consumers = plan.consumers,
                            rate = ?plan.rate_limit, "subscription settings updated");
                    }
                    self.applied(key, plan);
                    continue;
                }
                // Another set of streams (a label added or removed, a stream created or
                // deleted) is applied in place when the streams still read did not change:
                // their consumers go on.
                moved.streams = plan.streams.clone();
                if plan.multi
                    && runner.settled()
                    && same_but_live(&moved, plan)
                    && running
                        .iter()
                        .all(|(k, p)| wanted.get(k).is_none_or(|w| w == p))
                {
                    match runner.rebind(sides.clone()).await {
                        Ok(()) => {
                            runner.update(plan);
                            self.applied(key, plan);
                            tracing::info!(subscription = %key, streams = ?plan.streams, "subscription streams changed");
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(subscription = %key, error = %e,
                                "binding streams in place failed; restarting the subscription");
                        }
                    }
                }
            }
            // A changed spec: stop the old consumers first, so that no two versions deliver
            // at once, then start the new one.
            // Bound first: the lock guard must not live across the await (Send futures).
            let old = if current.is_some() {
                self.running.writing().remove(key)
            } else {
                None
            };
            if let Some(e) = old {
                e.runner.stop().await;
            }
            let streams = self.runtimes(plan);
            match Runner::start(
                SubscriptionPlan::clone(plan),
                sides,
                self.appender.clone(),
                self.metrics.clone(),
                &self.guard,
            ) {
                Ok(r) => {
                    tracing::info!(subscription = %key, generation = plan.generation, "subscription started");
                    self.running.writing().insert(
                        key.clone(),
                        Entry {
                            runner: Arc::new(r),
                            plan: plan.clone(),
                            streams,
                        },
                    );
                }
                Err(e) => {
                    problems.insert(key.clone(), e.to_string());
                    errors.push(e);
                }
            }
        }
        let gone: Vec<Entry> = {
            let mut running = self.running.writing();
            let keys: Vec<Key> = running
                .keys()
                .filter(|k| !plans.contains_key(*k) && !keep.contains(*k))
                .cloned()
                .collect();
            keys.iter().filter_map(|k| running.remove(k)).collect()
        };
        for e in gone {
            tracing::info!(subscription = %e.plan.key, "subscription stopped");
            e.runner.stop().await;
            if prune && e.plan.deletion_policy == DeletionPolicy::Delete {
                match e.runner.prune().await {
                    Ok(()) => {
                        tracing::info!(subscription = %e.plan.key, "pruned queues and progress")
                    }
                    Err(err) => errors.push(err),
                }
            }
        }
        *self.problems.writing() = problems;
        errors
    }

    /// The running streams a plan reads, in its order, or the first one not running.
    fn sides(&self, plan: &SubscriptionPlan) -> Result<Vec<StreamSide>, Key> {
        plan.streams
            .iter()
            .map(|k| {
                let rt = self.engine.stream(&k.namespace, &k.name).ok_or(k.clone())?;
                let rt2 = rt.clone();
                Ok(StreamSide {
                    plan: rt.plan.clone(),
                    broker: rt.broker.clone(),
                    store: rt.store().cloned(),
                    stream_id: Arc::new(move || rt2.stream_id()),
                    pii: rt.pii.clone(),
                })
            })
            .collect()
    }

    /// Stops every subscription gracefully (before the engine drains its batchers, so that
    /// replies still find them).
    pub async fn shutdown(&self) {
        let all: Vec<Entry> = std::mem::take(&mut *self.running.writing())
            .into_values()
            .collect();
        let stops = all.iter().map(|e| e.runner.stop());
        futures::future::join_all(stops).await;
    }

    fn runner(&self, key: &Key) -> Result<Arc<Runner>, DeliveryError> {
        self.get(key)
            .map(|(r, _)| r)
            .ok_or_else(|| DeliveryError::NotRunning(key.clone()))
    }

    /// Up to `limit` dead letters, oldest first. They stay in the queue.
    pub async fn dead_letters(
        &self,
        key: &Key,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, DeliveryError> {
        let r = self.runner(key)?;
        let broker = &r.inner_broker();
        let ch = broker.open_channel().await?;
        let mut out = Vec::new();
        let q = r.names.dead_letter_queue.clone();
        // Messages taken with basic.get stay unacked on this channel; closing it returns
        // them all, in order.
        while out.len() < limit.min(MAX_LIST) {
            let Some(d) = take_one(&ch, &q).await? else {
                break;
            };
            match from_properties(&d.properties, &d.data) {
                Ok(ev) => out.push(dead_letter_view(&ev)),
                Err(e) => out.push(DeadLetter {
                    id: String::new(),
                    source: String::new(),
                    ty: String::new(),
                    position: None,
                    attempts: None,
                    error_code: Some("undecodable".into()),
                    error_dest: None,
                    error_data: Some(e.to_string()),
                    event: serde_json::Value::Null,
                }),
            }
        }
        let _ = ch.close(200, "OK".into()).await;
        Ok(out)
    }

    /// Moves the dead letters present now (at most `limit`) back to the subscription's queue
    /// (attempts start over); returns how many moved and how many remain in the dead-letter
    /// queue. `progress` is called after each one.
    pub async fn redrive(
        &self,
        key: &Key,
        limit: Option<u64>,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(u64, u64), DeliveryError> {
        let r = self.runner(key)?;
        let broker = r.inner_broker();
        let q = r.names.dead_letter_queue.clone();
        let Some(counts) = broker.queue_counts(&q).await? else {
            return Ok((0, 0));
        };
        let ch = broker.open_channel().await?;
        let mut moved = 0u64;
        // Only the dead letters present at the start: one that fails again while we work
        // lands back in the queue and must not be redriven in a loop.
        let todo = limit.map_or(u64::from(counts.messages), |l| {
            l.min(u64::from(counts.messages))
        });
        while moved < todo {
            let Some(d) = take_one(&ch, &q).await? else {
                break;
            };
            let mut ev = from_properties(&d.properties, &d.data)?;
            for k in [EXT_ERROR_DEST, EXT_ERROR_CODE, EXT_ERROR_DATA, EXT_ATTEMPTS] {
                ev.extensions.remove(k);
            }
            let mut msg = to_message(&ev);
            // Present (0): the live consumer must not take it for a catch-up duplicate.
            msg.headers
                .insert(ATTEMPTS_HEADER.into(), AMQPValue::LongLongInt(0));
            // Into the queue the streams publish to (under perKey, the intake: the event
            // joins its key's lane behind what is already there).
            msg.routing_key = r.names.bound().to_string();
            let deadline = Instant::now() + REDRIVE_CONFIRM_TIMEOUT;
            let routing = broker.publish("", &[msg], deadline).await?;
            if routing.first() != Some(&Routing::Routed) {
                return Err(DeliveryError::Other(format!(
                    "the subscription's queue took no message (is it deleted?); {moved} redriven"
                )));
            }
            d.acker
                .ack(BasicAckOptions::default())
                .await
                .map_err(|e| DeliveryError::Other(format!("ack: {e}")))?;
            moved += 1;
            progress(moved);
        }
        let _ = ch.close(200, "OK".into()).await;
        let remaining = broker
            .queue_counts(&q)
            .await?
            .map_or(0, |c| u64::from(c.messages));
        Ok((moved, remaining))
    }

    /// Deletes every dead letter; returns how many.
    pub async fn purge(&self, key: &Key) -> Result<u64, DeliveryError> {
        let r = self.runner(key)?;
        let ch = r.inner_broker().open_channel().await?;
        let q = r.names.dead_letter_queue.clone();
        let n = ch
            .queue_purge(q.as_str().into(), QueuePurgeOptions::default())
            .await
            .map_err(|e| DeliveryError::Other(format!("queue.purge {q}: {e}")))?;
        let _ = ch.close(200, "OK".into()).await;
        Ok(u64::from(n))
    }
}

/// Takes the next message of `queue` unacknowledged (basic.get); `None` when it is empty.
async fn take_one(
    ch: &lapin::Channel,
    queue: &str,
) -> Result<Option<lapin::message::Delivery>, DeliveryError> {
    let got = ch
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .map_err(|e| DeliveryError::Other(format!("basic.get {queue}: {e}")))?;
    Ok(got.map(|m| m.delivery))
}

fn dead_letter_view(ev: &CloudEvent) -> DeadLetter {
    DeadLetter {
        id: ev.id.clone(),
        source: ev.source.clone(),
        ty: ev.ty.clone(),
        position: ev.extension_str("weirposition"),
        attempts: ev.extension_str(EXT_ATTEMPTS),
        error_code: ev.extension_str(EXT_ERROR_CODE),
        error_dest: ev.extension_str(EXT_ERROR_DEST),
        error_data: ev.extension_str(EXT_ERROR_DATA),
        event: serde_json::from_slice(&to_structured_json(ev)).unwrap_or_default(),
    }
}
