//! perKey lanes: one consumer per partition queue, one delivery at a time, and the hold
//! queue that keeps a waiting retry's attempt count and due time (see the module documentation
//! of [`super`]).

use super::consume::{finish, open_or_wait};
use super::*;

/// A perKey lane's consumer channel and hold queue, for the message being handled.
pub(super) struct Lane<'a> {
    pub(super) ch: &'a Channel,
    pub(super) hold: &'a str,
    /// When the channel was opened: no message it holds was delivered earlier.
    pub(super) opened: Instant,
    /// [`lane_refresh`].
    pub(super) refresh: Duration,
    /// The message was delivered before (a crash, a refresh, a stop): its hold record, if
    /// any, says where its retries stand.
    pub(super) redelivered: bool,
    /// The hold queue may hold records: purge it once the event is settled.
    pub(super) dirty: AtomicBool,
}

/// What a hold record says about an event: attempts made, when the next is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct HoldState {
    pub(super) attempts: u32,
    pub(super) due_ms: i64,
}

/// Hold records read at most per lookup: a lane writes one per retry of its head event, so
/// this is reached only with `delivery.retry` in the thousands (then the attempt count
/// resumes from the 1000th record, and a few more attempts than asked for are made).
pub(super) const HOLD_READ_MAX: usize = 1000;

impl Lane<'_> {
    pub(super) fn amqp(&self, e: lapin::Error) -> DeliveryError {
        DeliveryError::Broker(BrokerError::Unavailable(format!(
            "hold queue {}: {e}",
            self.hold
        )))
    }

    /// Reads the hold records (each is returned to the hold queue at once: they stay the
    /// durable record until the event is settled) and says where `ev`'s retries stand.
    pub(super) async fn read(&self, ev: &CloudEvent) -> Result<Option<HoldState>, DeliveryError> {
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
    pub(super) async fn wait_until(
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
    pub(super) async fn settle(&self) -> Result<(), DeliveryError> {
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

pub(super) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub(super) fn header_i64(h: &FieldTable, k: &str) -> Option<i64> {
    match h.inner().get(k) {
        Some(AMQPValue::LongLongInt(n)) => Some(*n),
        Some(AMQPValue::LongInt(n)) => Some(i64::from(*n)),
        _ => None,
    }
}

pub(super) fn header_str(h: &FieldTable, k: &str) -> Option<String> {
    match h.inner().get(k) {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// The newest of the hold records (their headers) about the event `id` from `source`.
pub(super) fn hold_state<'h>(
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

/// Consumes one partition queue (perKey): one delivery at a time, in queue order; a retry
/// waits at the head of the lane (see the module documentation), so later events of the same
/// keys wait behind it.
pub(super) async fn consume_lane(
    inner: Arc<Inner>,
    queue: String,
    hold: String,
    cancel: CancellationToken,
) {
    while !cancel.is_cancelled() {
        let Some((ch, mut consumer, tag)) =
            open_or_wait(&inner, &queue, LANE_PREFETCH.into(), &cancel).await
        else {
            return;
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
                            .handle(
                                d.exchange.as_str(),
                                &d.properties,
                                &d.data,
                                &Wait::Lane(&lane),
                                &cancel,
                            )
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
