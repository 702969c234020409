//! Catch-up from the store (`startFrom` other than `latest`), under the subscription's
//! advisory lock, resumable from the last recorded page.

use super::*;
use crate::data::store::Progress;

impl Inner {
    /// Provisions, then catches up from the store when the subscription is new and starts
    /// from the past (see the module documentation).
    pub(super) async fn prepare(&self, cancel: &CancellationToken) -> Result<(), DeliveryError> {
        if self.plan.multi {
            return self.prepare_multi(cancel).await;
        }
        let Some(store) = self.stream.store.clone() else {
            self.provision().await?;
            return Ok(());
        };
        let stream_id = streams::wait_stream_id(&self.stream, cancel).await?;
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

    pub(super) async fn prepare_locked(
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
        let row = store.progress(ns, name).await?;
        let row = match row {
            Some(r) if !fresh && r.stream_id == stream_id => r,
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
                store
                    .start_progress(ns, name, stream_id, next, caught)
                    .await?;
                Progress {
                    next_position: next,
                    caught_up_to: caught,
                    position: 0,
                    stream_id,
                }
            }
        };
        drop(slot);
        self.state
            .position
            .fetch_max(row.position, Ordering::AcqRel);
        if let Some(hwm) = row.caught_up_to {
            self.set_hwm(hwm);
            return Ok(());
        }
        if self.scaled_to_zero() {
            // The start is recorded and the queue collects every event committed from now on:
            // the catch-up runs from `next_position` once the subscription is scaled up.
            self.pending_catchup
                .store(row.next_position, Ordering::Release);
            return Ok(());
        }
        let mut next = row.next_position;
        tracing::info!(subscription = %self.plan.key, from = next, "catching up from the store");
        loop {
            let page = store.read_range(stream_id, next, CATCHUP_PAGE).await?;
            let Some(last) = page.last().map(|e| e.position) else {
                break;
            };
            let events: Vec<CloudEvent> = page.iter().map(|e| e.to_cloud_event()).collect();
            self.deliver_page(events, false, cancel).await?;
            next = last + 1;
            store.set_next_position(ns, name, next).await?;
            self.flush_position().await;
        }
        let hwm = next - 1;
        store.set_caught_up(ns, name, hwm).await?;
        self.set_hwm(hwm);
        tracing::info!(subscription = %self.plan.key, to = hwm, "caught up");
        Ok(())
    }

    /// The mark of a single-stream subscription's stream.
    fn set_hwm(&self, hwm: i64) {
        for b in self.bounds() {
            b.hwm.store(hwm, Ordering::Release);
        }
    }

    /// Delivers one catch-up page: concurrently (ordering none, up to `consumers`) or one
    /// event at a time (perKey, which keeps every key's order). `live`: the consumers run
    /// meanwhile (a stream bound later); under perKey their lanes may hold every delivery
    /// permit while they wait for this replay to end, so it takes none (it delivers one event
    /// at a time, one beyond `consumers` at most).
    pub(super) async fn deliver_page(
        &self,
        events: Vec<CloudEvent>,
        live: bool,
        cancel: &CancellationToken,
    ) -> Result<(), DeliveryError> {
        let in_place = !matches!(self.plan.ordering, OrderingPlan::None);
        let take_permit = !(live && in_place);
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
                let _permit = if take_permit {
                    Some(self.limit.acquire().await)
                } else {
                    None
                };
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
}
