//! The perKey intake: the streams publish a perKey subscription's events into one
//! single-active-consumer queue, and the worker holding it moves them, in order, to the lane of
//! their key ([`lane_of`]). RabbitMQ could route by key itself (its consistent-hash exchange
//! did so in earlier versions), but that exchange rebuilds its hash ring in an arbitrary order
//! when the broker restarts: a key then moved to another lane while its earlier events still
//! waited in the old one, and the two lanes delivered them out of order. Here the lane of a key
//! is a function of the key and `partitions` alone.
//!
//! Order: the intake is read in queue order by one worker at a time (single active consumer),
//! each batch is published on one channel in that order and confirmed before the next batch
//! is read, and only then acked. A worker that dies between the confirm and the ack leaves
//! the batch to the next one, which moves it again: a lane then holds those events twice, the
//! second copies after the first (delivery is at least once everywhere).

use futures::FutureExt;

use super::consume::open_or_wait;
use super::*;
use crate::data::broker::{HEADER_PREFIX, HEADER_PREFIX_ALT};
use crate::data::delivery::lane_of;

/// Messages the mover holds unacked: one batch, published and confirmed together. 128 keeps a
/// confirm round trip (milliseconds) from limiting a subscription to less than tens of
/// thousands of events a second, while what one worker holds stays bounded (128 events of at
/// most the stream's `maxBytes`).
const INTAKE_PREFETCH: u16 = 128;

/// Moves the intake to the lanes until the subscription stops (see the module documentation).
pub(super) async fn move_intake(inner: Arc<Inner>, cancel: CancellationToken) {
    let (Some(intake), OrderingPlan::PerKey { partition_key, .. }) =
        (inner.names.intake.clone(), &inner.plan.ordering)
    else {
        return;
    };
    let key_headers = [
        format!("{HEADER_PREFIX}{partition_key}"),
        format!("{HEADER_PREFIX_ALT}{partition_key}"),
    ];
    while !cancel.is_cancelled() {
        // Every worker asks; the broker lets one consume and keeps the others waiting, and
        // hands the intake to one of them when that one goes away.
        let Some((ch, mut consumer, tag)) =
            open_or_wait(&inner, &intake, INTAKE_PREFETCH.into(), &cancel).await
        else {
            return;
        };
        loop {
            let first = tokio::select! {
                _ = cancel.cancelled() => None,
                d = consumer.next() => Some(d),
            };
            let Some(first) = first else {
                // Stopped: nothing is in flight (a batch is acked or returned before the next
                // one is read); closing returns what was prefetched.
                let _ = ch.basic_cancel(tag, BasicCancelOptions::default()).await;
                let _ = ch.close(200, "OK".into()).await;
                return;
            };
            let Some(Ok(first)) = first else {
                sleep_or_cancel(&cancel, RECONNECT_DELAY).await;
                break;
            };
            let mut batch = vec![first];
            while batch.len() < usize::from(INTAKE_PREFETCH) {
                match consumer.next().now_or_never() {
                    Some(Some(Ok(d))) => batch.push(d),
                    _ => break,
                }
            }
            match inner.move_batch(&batch, &key_headers).await {
                Ok(()) => {
                    let last = batch.last().map(|d| &d.acker);
                    let acked = match last {
                        Some(a) => a.ack(BasicAckOptions { multiple: true }).await.is_ok(),
                        None => true,
                    };
                    if !acked {
                        // The channel broke: the batch returns to the intake and is moved
                        // again by whoever consumes it next.
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(subscription = %inner.plan.key, error = %e,
                        "moving the intake to the lanes failed; its messages return to the intake");
                    inner.state.set_failure(
                        crate::data::conditions::reason::BROKER_UNAVAILABLE,
                        e.to_string(),
                    );
                    // Closing the channel returns the batch (and what was prefetched behind
                    // it) to the head of the intake, in order.
                    let _ = ch.close(200, "OK".into()).await;
                    sleep_or_cancel(&cancel, RECONNECT_DELAY).await;
                    break;
                }
            }
        }
    }
}

impl Inner {
    /// Publishes `batch` to the lanes of its keys, in order, and waits for the confirms.
    async fn move_batch(
        &self,
        batch: &[lapin::message::Delivery],
        key_headers: &[String; 2],
    ) -> Result<(), DeliveryError> {
        let partitions = self.names.partitions.len() as u32;
        let msgs: Vec<OutMessage> = batch
            .iter()
            .map(|d| {
                let mut headers = d.properties.headers().clone().unwrap_or_default();
                let key = key_headers
                    .iter()
                    .find_map(|k| headers.inner().get(k.as_str()).cloned());
                let lane = lane_of(key.as_ref(), partitions) as usize;
                if !d.exchange.as_str().is_empty() {
                    headers.insert(
                        EXCHANGE_HEADER.into(),
                        AMQPValue::LongString(d.exchange.as_str().into()),
                    );
                }
                OutMessage {
                    routing_key: self.names.partitions[lane].clone(),
                    headers,
                    body: d.data.clone().into(),
                    message_id: d
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|m| m.to_string())
                        .unwrap_or_default(),
                    content_type: d.properties.content_type().as_ref().map(|c| c.to_string()),
                    timestamp: *d.properties.timestamp(),
                }
            })
            .collect();
        let deadline = Instant::now() + PUBLISH_TIMEOUT;
        let routed = self.stream.broker.publish("", &msgs, deadline).await?;
        if routed.iter().any(|r| *r != Routing::Routed) {
            // A lane queue was deleted under the running subscription: declare the lanes
            // again; the batch returns to the intake and is moved once they exist.
            self.declare_lanes().await?;
            return Err(DeliveryError::Other(
                "a lane queue was missing (declared again)".into(),
            ));
        }
        Ok(())
    }
}
