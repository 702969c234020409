//! The backlog a subscription shows (events accepted and not yet settled), sampled from the
//! broker's queue counts, and the periodic write of the delivered position.

use super::*;

/// Samples the backlog and writes the delivered position, until stopped.
pub(super) async fn background(inner: Arc<Inner>, cancel: CancellationToken) {
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
pub(super) const BUCKETS_EVERY: Duration = Duration::from_secs(30);

/// The backlog: events accepted for the subscription and not yet settled.
#[derive(Default)]
pub(super) struct BacklogSampler {
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
        let pending = inner.pending_catchup.load(Ordering::Acquire);
        if pending > 0
            && let (Some(store), Some(id)) = (&inner.stream.store, (inner.stream.stream_id)())
        {
            // Scaled to zero before its catch-up ran: the catch-up will replay the stored events
            // from `pending` to the head, and the queue holds the newest of them (those
            // committed since it was declared), so the larger of the two counts what waits
            // (before filters: an upper bound). One primary-key read, only in this rare state.
            let head = store.head(id).await.ok()?;
            total = total.max(head - pending + 1);
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
