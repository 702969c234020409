//! The shared consumer of a subscription's queue (ordering none), its graceful stop, and the
//! drain of queues left by an earlier shape.

use super::*;

/// Consumes the subscription's queue (ordering none) until stopped, reconnecting when the
/// channel breaks and re-consuming when `consumers` changes (prefetch = consumers).
pub(super) async fn consume_shared(inner: Arc<Inner>, cancel: CancellationToken) {
    let mut tasks = JoinSet::new();
    let mut settings = inner.settings.clone();
    'connect: while !cancel.is_cancelled() {
        let prefetch = settings.borrow_and_update().consumers;
        let Some((ch, mut consumer, tag)) =
            open_or_wait(&inner, &inner.names.queue, prefetch, &cancel).await
        else {
            break;
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
                            let settle = inner.handle(d.exchange.as_str(), &d.properties, &d.data, &Wait::Delayed, &cancel).await;
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
pub(super) async fn finish(ch: &Channel, tag: ShortString, tasks: &mut JoinSet<()>) {
    let _ = ch.basic_cancel(tag, BasicCancelOptions::default()).await;
    while tasks.join_next().await.is_some() {}
    let _ = ch.close(200, "OK".into()).await;
}

/// How long basic.qos and basic.consume together may take on an open channel: an answer takes
/// milliseconds, a loaded broker a few seconds.
const CONSUME_OPEN_TIMEOUT: Duration = Duration::from_secs(15);

/// A consumer: its channel, the stream of deliveries, and its tag.
pub(super) type Opened = (Channel, lapin::Consumer, ShortString);

/// Opens a consumer of `queue`; while the broker refuses, records why (status shows it),
/// waits a moment and tries again. `None` once the subscription stops. The broker's link backs
/// off its reconnects: this costs nothing while it is down, and it is not logged (the link
/// says it once).
pub(super) async fn open_or_wait(
    inner: &Inner,
    queue: &str,
    prefetch: u32,
    cancel: &CancellationToken,
) -> Option<Opened> {
    while !cancel.is_cancelled() {
        match open_consumer(inner, queue, prefetch).await {
            Ok(x) => return Some(x),
            Err(e) => {
                inner.state.set_failure(
                    crate::data::conditions::reason::BROKER_UNAVAILABLE,
                    e.to_string(),
                );
                if !sleep_or_cancel(cancel, RECONNECT_DELAY).await {
                    return None;
                }
            }
        }
    }
    None
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
    // Prefetch bounds the messages held by this worker: one per delivery in flight. AMQP reads
    // a prefetch of 0 as unlimited, so it is never sent (a subscription scaled to zero opens
    // no consumer in the first place).
    let prefetch = u16::try_from(prefetch.max(1)).unwrap_or(u16::MAX);
    let tag: ShortString = format!("weir-{}", uuid::Uuid::now_v7()).into();
    let open = async {
        ch.basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(amqp)?;
        ch.basic_consume(
            queue.into(),
            tag.clone(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp)
    };
    // Bounded: a channel opened just before its connection died (a broker killed while a
    // thousand consumers reopen) was seen to leave basic.qos/basic.consume unanswered for
    // good, and the subscription then never consumed again.
    match tokio::time::timeout(CONSUME_OPEN_TIMEOUT, open).await {
        Ok(Ok(consumer)) => Ok((ch, consumer, tag)),
        Ok(Err(e)) => Err(e),
        Err(_) => {
            // Whatever state the channel is in, it is not used again.
            let _ = tokio::time::timeout(CONSUME_OPEN_TIMEOUT, ch.close(200, "OK".into())).await;
            Err(DeliveryError::Broker(BrokerError::Unavailable(format!(
                "consume {queue}: no answer within {CONSUME_OPEN_TIMEOUT:?}"
            ))))
        }
    }
}

/// Delivers what is left in a queue of an earlier shape (one message at a time, in queue
/// order), then deletes it once it stayed empty long enough for pending retries to return.
///
/// It consumes rather than polls with `basic.get`: a quorum queue with a single active
/// consumer (a lane, the intake) refuses `basic.get`, so a retired lane was never drained.
pub(super) async fn drain(inner: Arc<Inner>, queue: String, cancel: CancellationToken) {
    let settle = inner
        .plan
        .delivery
        .backoff_max
        .max(inner.plan.delivery.retry_after_max)
        .min(DRAIN_SETTLE_MAX)
        + Duration::from_secs(1);
    let mut empty_since: Option<Instant> = None;
    while !cancel.is_cancelled() {
        let Some((ch, mut consumer, tag)) = open_or_wait(&inner, &queue, 1, &cancel).await else {
            return;
        };
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => None,
                d = tokio::time::timeout(Duration::from_secs(1), consumer.next()) => Some(d),
            };
            let Some(next) = next else {
                finish(&ch, tag, &mut JoinSet::new()).await;
                return;
            };
            let d = match next {
                Ok(Some(Ok(d))) => d,
                Ok(_) => {
                    // The channel broke: consume again.
                    sleep_or_cancel(&cancel, RECONNECT_DELAY).await;
                    break;
                }
                Err(_) => {
                    // Nothing came for a second. Empty for the settle time (and nothing ready,
                    // should another worker's consumer be the queue's active one): deleted.
                    let since = *empty_since.get_or_insert_with(Instant::now);
                    if since.elapsed() < settle {
                        continue;
                    }
                    match inner.stream.broker.queue_counts(&queue).await {
                        Ok(Some(c)) if c.messages == 0 => {}
                        // Another worker deleted it.
                        Ok(None) => {
                            finish(&ch, tag, &mut JoinSet::new()).await;
                            return;
                        }
                        _ => {
                            empty_since = None;
                            continue;
                        }
                    }
                    finish(&ch, tag, &mut JoinSet::new()).await;
                    if inner.delete_drained(&queue).await {
                        return;
                    }
                    empty_since = None;
                    break;
                }
            };
            empty_since = None;
            let settle = inner
                .handle(
                    d.exchange.as_str(),
                    &d.properties,
                    &d.data,
                    &Wait::InPlace,
                    &cancel,
                )
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
    }
}

impl Inner {
    /// Deletes a drained queue of an earlier shape (and a retired lane's hold queue); false if
    /// the broker refused.
    async fn delete_drained(&self, queue: &str) -> bool {
        // Quorum queues do not implement `if-empty`: the queue was unbound and stayed empty
        // through the settle time, so it is deleted outright.
        match self.stream.broker.delete_queue(queue).await {
            Ok(()) => {
                tracing::info!(subscription = %self.plan.key, queue, "drained and deleted");
                // A retired lane's hold queue goes with it (its records were about events this
                // drain has since delivered).
                let lane = queue
                    .strip_prefix(&format!("{}.p", self.names.queue))
                    .and_then(|i| i.parse::<u32>().ok());
                if let Some(i) = lane
                    && !self.names.partitions.iter().any(|p| p == queue)
                {
                    let key = &self.plan.key;
                    let hold = Names::hold_name(&key.namespace, &key.name, i);
                    let _ = self.stream.broker.delete_queue(&hold).await;
                }
                true
            }
            Err(e) => {
                tracing::warn!(subscription = %self.plan.key, queue, error = %e,
                    "deleting a drained queue");
                false
            }
        }
    }
}
