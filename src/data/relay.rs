//! The relay: publishes a stream's stored events to its exchange in position order, from a
//! checkpoint kept in PostgreSQL, with one owner per stream across every process.
//!
//! Ownership is a session-level advisory lock, held by the database's lock session (one per
//! database and process, see `store::locks`), not by a connection per relay: a worker with a
//! thousand streams holds a thousand relay locks on one connection. Checkpoint writes go
//! through that same session and carry the epoch granted when the lock was taken, so a
//! process that lost its lock (session dropped, another owner took over) cannot move the
//! checkpoint. When the owner dies, PostgreSQL drops its session and locks, and another
//! process takes over within one lock-poll interval.
//!
//! A relay holds no connection while it waits: it is woken by the database's notification
//! session (one `LISTEN` per database and process, see `store::notify`) or by this process's
//! own appends (the hand-over), and reads the store through the pool only when there is
//! something to read.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::data::broker::{Broker, Routing, to_message};
use crate::data::event::StoredEvent;
use crate::data::store::Store;
use crate::data::store::locks::{Lease, LockKey};
use crate::data::store::notify::Announced;
use crate::data::tracecontext::{Round, Stage};
use crate::data::{Trouble, sleep_or_cancel};
use crate::metrics::Metrics;
use crate::topology::Key;

/// First key of the two-key advisory lock space used for relays (`'WEIR' - 1`).
const RELAY_LOCK_CLASS: i32 = 0x5745_4951;
/// Events read and published per round. 500 keeps a round's confirms well inside one
/// publish deadline and a round's memory at a few MiB for typical events.
const PAGE: i64 = 500;
/// Upper bound on waiting for an append notification before reading the table anyway. The
/// notification session tells its relays when it reconnected (notifications may have been
/// missed then), so this is a safety net only: long enough that a thousand idle relays cost
/// a few queries a second.
const IDLE_POLL: Duration = Duration::from_secs(30);
/// Time allowed for one round of publishes to be confirmed before it is retried.
const PUBLISH_DEADLINE: Duration = Duration::from_secs(30);
/// Committed batches waiting for the relay. It takes what is waiting every round; a relay
/// this many batches behind catches up faster from the store (up to `PAGE` per read), so
/// more would only hold memory.
const HANDOFF_BATCHES: usize = 16;
/// How long the relay waits for this process's own batches to be handed over after the
/// store announced them, before reading them back. The hand-over follows its commit by
/// microseconds; a batch another process committed costs this much extra latency.
const HANDOFF_GRACE: Duration = Duration::from_millis(2);
/// Backoff after an interrupted relay: from 200 ms, doubling, capped at 30 s (a database
/// or broker that is down is not hammered by a thousand relays), with jitter.
const RETRY_BASE: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The appending side of the hand-over: batches this process committed go straight to its
/// relay, which then need not read them back from the store (one query and a notification
/// hop less between a commit and its publish, and less work for the database).
#[derive(Clone)]
pub struct Handoff {
    /// Set while this process's relay owns the stream: only then is a batch worth building.
    owner: Arc<AtomicBool>,
    tx: mpsc::Sender<Vec<StoredEvent>>,
}

/// The relay's side of the hand-over.
pub struct HandoffRx {
    owner: Arc<AtomicBool>,
    rx: mpsc::Receiver<Vec<StoredEvent>>,
}

pub fn handoff() -> (Handoff, HandoffRx) {
    let owner = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel(HANDOFF_BATCHES);
    (
        Handoff {
            owner: owner.clone(),
            tx,
        },
        HandoffRx { owner, rx },
    )
}

impl Handoff {
    /// Whether this process's relay publishes the stream now.
    pub fn wanted(&self) -> bool {
        self.owner.load(Ordering::Acquire)
    }

    /// Hands a committed batch (positions consecutive) to the relay. Never waits: when the
    /// relay is behind, the batch is dropped and the relay reads it from the store.
    pub fn offer(&self, events: Vec<StoredEvent>) {
        let _ = self.tx.try_send(events);
    }
}

/// Clears the owner flag when the relay stops owning the stream, however it stops.
struct Owning<'a>(&'a AtomicBool);

impl Drop for Owning<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Handed-over batches by first position. They can arrive out of commit order (each comes
/// from its own append task), and some never arrive (another process committed them, or
/// the channel was full), so they are only used where they continue the checkpoint.
#[derive(Default)]
struct Handed(BTreeMap<i64, Vec<StoredEvent>>);

impl Handed {
    fn file(&mut self, events: Vec<StoredEvent>) {
        if let Some(first) = events.first() {
            self.0.insert(first.position, events);
        }
    }

    /// The events right after `checkpoint`, if they were handed over: whole consecutive
    /// batches until a gap or a page (`PAGE`) is reached. Drops what is already published.
    fn take_after(&mut self, checkpoint: i64) -> Option<Vec<StoredEvent>> {
        while let Some(e) = self.0.first_entry() {
            if e.get().last().is_some_and(|l| l.position > checkpoint) {
                break;
            }
            e.remove();
        }
        let first = self.0.first_entry()?;
        if *first.key() > checkpoint + 1 {
            return None;
        }
        let mut events = first.remove();
        events.retain(|e| e.position > checkpoint);
        while (events.len() as i64) < PAGE {
            let next = events.last().map_or(checkpoint, |e| e.position) + 1;
            match self.0.remove(&next) {
                Some(more) => events.extend(more),
                None => break,
            }
        }
        Some(events)
    }

    fn last_position(&self) -> Option<i64> {
        self.0.last_key_value()?.1.last().map(|e| e.position)
    }
}

pub struct Relay {
    pub key: Key,
    pub store: Store,
    pub stream_id: i64,
    pub exchange: String,
    pub broker: Broker,
    pub metrics: Metrics,
    /// The stream's head as this process knows it (status reads it).
    pub head: Arc<std::sync::atomic::AtomicI64>,
    /// This process's committed batches, handed over by its appends.
    pub handoff: tokio::sync::Mutex<HandoffRx>,
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("store: {0}")]
    Store(#[from] crate::data::store::StoreError),
    #[error("lost relay ownership (checkpoint fenced)")]
    Fenced,
    #[error("lost relay ownership (the database's lock session broke)")]
    Lost,
}

impl Relay {
    pub async fn run(self, cancel: CancellationToken) {
        let mut trouble = Trouble::new(RETRY_BASE, RETRY_MAX);
        while !cancel.is_cancelled() {
            // `Ok` only when cancelled: nothing to say then.
            match self.own_and_relay(&cancel, &mut trouble).await {
                Ok(()) => {}
                Err(e) => {
                    let msg = e.to_string();
                    let (delay, say) = trouble.failed(&msg);
                    if say {
                        tracing::warn!(stream = %self.key, error = %msg, "relay interrupted");
                    }
                    sleep_or_cancel(&cancel, delay).await;
                }
            }
        }
    }

    /// Waits for the lock, then relays until cancelled or until ownership is lost.
    async fn own_and_relay(
        &self,
        cancel: &CancellationToken,
        trouble: &mut Trouble,
    ) -> Result<(), RelayError> {
        // Relays of streams whose id does not fit an int4 share lock keys (a longer wait for
        // the other, never two owners of one).
        let key = LockKey::Pair(RELAY_LOCK_CLASS, self.stream_id as i32);
        let Some(lease) = self.store.locks().acquire(key, cancel).await else {
            return Ok(());
        };
        let (epoch, mut checkpoint) = lease.claim_relay(self.stream_id).await?;
        // Owning again ends a trouble (this line says so): the next failure is said anew.
        trouble.ok();
        tracing::info!(stream = %self.key, epoch, checkpoint, "relay owner");
        let lost = lease.lost().clone();
        tokio::select! {
            r = self.relay(&lease, epoch, &mut checkpoint, cancel) => r,
            // The session that held the lock broke: another process may own the stream now.
            _ = lost.cancelled() => Err(RelayError::Lost),
        }
    }

    async fn relay(
        &self,
        lease: &Lease,
        epoch: i64,
        checkpoint: &mut i64,
        cancel: &CancellationToken,
    ) -> Result<(), RelayError> {
        let mut notes = self.store.notifier().appended(self.stream_id);
        let mut resyncs = notes.borrow_and_update().resyncs;
        let labels = [self.key.namespace.as_str(), self.key.name.as_str()];
        let lag = self.metrics.relay_lag.with_label_values(&labels);
        let mut declared = false;
        let mut handoff = self.handoff.lock().await;
        let handoff = &mut *handoff;
        // Batches offered before this process owned the stream were not built; from here on
        // they are.
        while handoff.rx.try_recv().is_ok() {}
        handoff.owner.store(true, Ordering::Release);
        let _owning = Owning(&handoff.owner);
        let mut handed = Handed::default();
        // The highest position known to be committed: announced by the store's
        // notifications or seen in a hand-over. A new owner knows nothing, so it reads.
        let mut announced = i64::MAX;
        // Since when the relay has known of events past the checkpoint that were not handed
        // over.
        let mut waiting_since: Option<Instant> = None;
        // Broker trouble is retried here (the lock stays held: nobody else could do better),
        // with backoff, and said once per state change.
        let mut trouble = Trouble::new(Duration::from_millis(500), RETRY_MAX);
        let key = &self.key;
        let broker_trouble = |trouble: &mut Trouble, e: &dyn std::fmt::Display, what: &str| {
            let msg = format!("{what}: {e}");
            let (delay, say) = trouble.failed(&msg);
            if say {
                tracing::warn!(stream = %key, error = %msg, "relay cannot publish");
            }
            delay
        };
        loop {
            if cancel.is_cancelled() {
                return Ok(());
            }
            if !declared {
                if let Err(e) = self.broker.declare_exchange(&self.exchange).await {
                    let delay = broker_trouble(&mut trouble, &e, "declaring the exchange");
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
                declared = true;
            }
            while let Ok(batch) = handoff.rx.try_recv() {
                handed.file(batch);
            }
            let mut events = handed.take_after(*checkpoint).unwrap_or_default();
            // Handed-over batches past a gap: the gap was another process's or dropped.
            announced = announced.max(handed.last_position().unwrap_or(0));
            if events.is_empty() && *checkpoint < announced {
                // Give a late hand-over its grace, then read the store.
                let since = *waiting_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= HANDOFF_GRACE {
                    events = self
                        .store
                        .read_range(self.stream_id, *checkpoint + 1, PAGE)
                        .await?;
                    if events.is_empty() {
                        announced = *checkpoint;
                    }
                }
            }
            if events.is_empty() {
                if *checkpoint >= announced {
                    waiting_since = None;
                }
                lag.set(0);
                let read_at = waiting_since.map(|t| t + HANDOFF_GRACE);
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    // A safety net: reconnects of the notification session are announced.
                    _ = tokio::time::sleep(IDLE_POLL) => announced = i64::MAX,
                    _ = tokio::time::sleep_until(read_at.unwrap_or_else(Instant::now)),
                        if read_at.is_some() => {}
                    changed = notes.changed() => {
                        if changed.is_err() {
                            // The store is closing (shutdown).
                            return Ok(());
                        }
                        let Announced { resyncs: r, head } = *notes.borrow_and_update();
                        if r != resyncs {
                            // Notifications may have been missed: read what is there.
                            resyncs = r;
                            announced = i64::MAX;
                        } else {
                            announced = announced.max(head);
                        }
                    }
                    Some(batch) = handoff.rx.recv() => handed.file(batch),
                }
                continue;
            }
            let msgs: Vec<_> = events
                .iter()
                .map(|e| to_message(&e.to_cloud_event()))
                .collect();
            let deadline = Instant::now() + PUBLISH_DEADLINE;
            // Ended once the round is confirmed (or failed).
            let spans = Round::start(Stage::Relay, labels, events.iter().map(|e| &e.event));
            let routing = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                r = self.broker.publish(&self.exchange, &msgs, deadline) => r,
            };
            let routing = match routing {
                Ok(r) => {
                    drop(spans);
                    r
                }
                Err(e) => {
                    spans.failed(&e);
                    drop(spans);
                    // Not confirmed: the checkpoint stays, the same events go out again.
                    let delay = broker_trouble(&mut trouble, &e, "publishing");
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            };
            if trouble.ok() {
                tracing::info!(stream = %self.key, "relay publishing again");
            }
            let routed = routing
                .iter()
                .filter(|r| matches!(r, Routing::Routed))
                .count();
            let last = events.last().map_or(*checkpoint, |e| e.position);
            if !lease.write_checkpoint(self.stream_id, epoch, last).await? {
                return Err(RelayError::Fenced);
            }
            if last >= announced {
                waiting_since = None;
            }
            *checkpoint = last;
            let m = &self.metrics.relay_events;
            m.with_label_values(&[labels[0], labels[1], "routed"])
                .inc_by(routed as u64);
            m.with_label_values(&[labels[0], labels[1], "unroutable"])
                .inc_by((routing.len() - routed) as u64);
            // A short page reached what was committed when it was read: the head then. A
            // full one may be behind: ask (a round trip saved on most rounds under light load).
            let head = if (events.len() as i64) < PAGE {
                last
            } else {
                self.store.head(self.stream_id).await?
            };
            lag.set(head - *checkpoint);
            self.head.fetch_max(head, Ordering::AcqRel);
            self.metrics
                .stream_head
                .with_label_values(&labels)
                .set(head);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::event::CloudEvent;

    fn batch(positions: std::ops::RangeInclusive<i64>) -> Vec<StoredEvent> {
        positions
            .map(|position| StoredEvent {
                position,
                version: None,
                recorded_time: chrono::DateTime::UNIX_EPOCH,
                event: CloudEvent::bare(position.to_string()),
            })
            .collect()
    }

    fn positions(events: &[StoredEvent]) -> Vec<i64> {
        events.iter().map(|e| e.position).collect()
    }

    #[test]
    fn handed_batches_are_taken_in_position_order_whatever_order_they_came_in() {
        let mut h = Handed::default();
        h.file(batch(4..=6));
        h.file(batch(1..=3));
        h.file(batch(7..=7));
        assert_eq!(h.last_position(), Some(7));
        let got = h.take_after(0).unwrap();
        assert_eq!(positions(&got), (1..=7).collect::<Vec<_>>());
        assert_eq!(h.last_position(), None);
    }

    #[test]
    fn a_gap_is_left_to_the_store_and_published_events_are_dropped() {
        let mut h = Handed::default();
        h.file(batch(1..=3));
        h.file(batch(8..=9));
        // Positions 4..=7 were committed by another process: nothing to take after 3.
        assert_eq!(positions(&h.take_after(0).unwrap()), vec![1, 2, 3]);
        assert!(h.take_after(3).is_none());
        // The store read covered up to 8: only 9 is left of the handed batch.
        assert_eq!(positions(&h.take_after(8).unwrap()), vec![9]);
        // Everything at or below the checkpoint is dropped.
        h.file(batch(10..=12));
        assert!(h.take_after(12).is_none());
        assert_eq!(h.last_position(), None);
    }

    #[test]
    fn a_take_stops_at_one_page() {
        let mut h = Handed::default();
        h.file(batch(1..=PAGE - 1));
        h.file(batch(PAGE..=PAGE + 10));
        h.file(batch(PAGE + 11..=PAGE + 20));
        assert_eq!(h.take_after(0).unwrap().len() as i64, PAGE + 10);
        assert_eq!(
            positions(&h.take_after(PAGE + 10).unwrap()),
            (PAGE + 11..=PAGE + 20).collect::<Vec<_>>()
        );
    }
}
