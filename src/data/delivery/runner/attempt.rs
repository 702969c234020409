//! Delivering one event until it is settled: attempts, retries (where they wait is the
//! caller's [`Wait`]), dead letters, replies appended to their stream, and what becomes of the
//! broker message. What follows each attempt is decided by [`crate::data::delivery::step::next_step`].

use super::lane::now_ms;
use super::*;
use crate::data::delivery::backoff::JITTER;
use crate::data::delivery::step::{Step, next_step};
use crate::data::tracecontext::{Attempt, Outgoing, carry_if_missing};

impl Inner {
    /// Delivers an event until it is settled: delivered, handed to a durable retry, or
    /// dead-lettered (each confirmed). `attempts` were made before. `wait`: where retries
    /// wait. An error means nothing was settled: the caller returns the message to its queue.
    pub(super) async fn process(
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
            let trace = Attempt::start(&ev, &self.plan.key, attempt);
            let (outcome, took) = match self.for_sink(&ev).await {
                Ok(out) => self.sender.send(&out, trace.outgoing()).await,
                Err(f) => (Outcome::Failed(f), Duration::ZERO),
            };
            match &outcome {
                Outcome::Delivered { status, .. } => trace.answered(Some(*status), None),
                Outcome::Failed(f) => trace.answered(f.code.parse().ok(), Some(&f.code)),
            }
            // The attempt's span ends here; a reply continues its trace.
            let delivered_in = trace.outgoing().context().cloned();
            drop(trace);
            self.state.inflight.fetch_sub(1, Ordering::AcqRel);
            inflight.dec();
            self.metrics
                .delivery_duration
                .with_label_values(&labels)
                .observe(took.as_secs_f64());
            let jitter = rand::random_range(1.0 - JITTER..=1.0 + JITTER);
            let step = next_step(&outcome, attempt, &self.plan.delivery, jitter);
            match outcome {
                Outcome::Delivered { status, reply } => {
                    self.attempt_metric("success");
                    *self.state.sink.locked() =
                        Some((true, format!("last delivery answered {status}")));
                    if let (Some(r), Some(stream)) = (reply, &self.plan.reply) {
                        let mut r = reply_event(r, &ev);
                        carry_if_missing(&mut r, delivered_in.as_ref());
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
                    if let Step::Retry { delay } = step {
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

    /// The event as the sink gets it: personal-data fields decrypted (or the redaction
    /// marker), unless the subscription asked for the envelopes. The broker message, retries
    /// and dead letters keep the envelopes. A key that cannot be read is a failed attempt
    /// (`pii-key-missing`, retried, then dead-lettered with that code), never a crash.
    async fn for_sink<'e>(
        &self,
        ev: &'e CloudEvent,
    ) -> Result<std::borrow::Cow<'e, CloudEvent>, Failure> {
        // The stream the event comes from decrypts it (an event of a stream unbound
        // meanwhile keeps its envelopes).
        let Some(side) = self.origin("", false, ev) else {
            return Ok(std::borrow::Cow::Borrowed(ev));
        };
        let Some(pii) = &side.side.pii else {
            return Ok(std::borrow::Cow::Borrowed(ev));
        };
        if self.plan.delivery.pii_envelope {
            return Ok(std::borrow::Cow::Borrowed(ev));
        }
        let fail = |code: &str, data: String, retryable: bool| Failure {
            retryable,
            code: code.to_string(),
            data,
            retry_after: None,
        };
        let Some(id) = (side.side.stream_id)() else {
            return Err(fail(
                "pii-store",
                "the stream's store is not set up yet".into(),
                true,
            ));
        };
        let mut out = ev.clone();
        match pii.reveal(id, std::iter::once(&mut out)).await {
            Ok(()) => Ok(std::borrow::Cow::Owned(out)),
            Err(e) => {
                let retryable = !matches!(e, crate::data::pii::PiiError::Tampered { .. });
                tracing::warn!(subscription = %self.plan.key, error = %e, "personal-data fields not decrypted");
                Err(fail(e.code(), e.to_string(), retryable))
            }
        }
    }

    pub(super) fn attempt_metric(&self, outcome: &str) {
        let [ns, sub] = self.labels();
        self.metrics
            .delivery_attempts
            .with_label_values(&[ns, sub, outcome])
            .inc();
    }

    pub(super) async fn publish_to_queue(
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
    pub(super) async fn record_hold(
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

    pub(super) async fn publish_retry(
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

    pub(super) async fn dead_letter(
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
                    && let (Outcome::Failed(e), _) = s.send(&dead, &Outgoing::of_event(&dead)).await
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
    pub(super) async fn handle(
        &self,
        exchange: &str,
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
        // A perKey event moved from the intake to its lane comes through the default
        // exchange: the mover kept the stream's exchange in a header.
        let moved = match exchange {
            "" => props
                .headers()
                .as_ref()
                .and_then(|h| super::lane::header_str(h, EXCHANGE_HEADER)),
            _ => None,
        };
        let exchange = moved.as_deref().unwrap_or(exchange);
        let mut ev = match from_properties(props, body) {
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
        let Some(origin) = self.origin(exchange, attempts.is_none(), &ev) else {
            // A stream no longer read (see the streams module).
            self.count("unbound");
            return Settle::Ack;
        };
        self.stamp(&mut ev, &origin);
        if attempts.is_none() {
            let hwm = match self.await_hand_over(&origin, cancel).await {
                Ok(streams::HandOver::Mark(hwm)) => hwm,
                Ok(streams::HandOver::Unbound) => {
                    self.count("unbound");
                    return Settle::Ack;
                }
                Err(_) => return Settle::Return,
            };
            if let Some(p) = ev
                .extension_str(EXT_POSITION)
                .and_then(|p| p.parse::<i64>().ok())
                && p <= hwm
            {
                // Delivered by the catch-up already.
                self.count("duplicate");
                return Settle::Ack;
            }
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
pub(super) enum Settle {
    /// Settled (delivered, filtered, retried elsewhere or dead-lettered): ack it.
    Ack,
    /// Not settled: return it to its queue (or, in a lane, try it again here).
    Return,
    /// A perKey lane must return its messages now (see [`Lane::wait_until`]).
    Refresh,
}

pub(super) fn first_line(s: &str) -> &str {
    let line = s.lines().next().unwrap_or_default();
    match line.char_indices().nth(120) {
        Some((i, _)) => &line[..i],
        None => line,
    }
}
