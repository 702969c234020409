//! The streams a subscription reads: which one a message comes from, the hand-over from each
//! stream's replay to its live messages, and (`streams`/`streamSelector`) the merged replay of
//! several streams and the live binding and unbinding of streams while the consumers run.
//!
//! # Several streams
//! One queue (the intake under `perKey`) is bound to every stream's
//! exchange. A live message's stream is the exchange it was published to; the event gains the
//! extension [`EXT_STREAM`] before anything else sees it, so that retries, hold records and dead
//! letters (which travel through the default exchange) still name it.
//!
//! Each stream with a store has its own replay row in its store's progress table, named
//! `<subscription>/<stream>` (no subscription name holds a `/`), under its own advisory lock.
//! The row is written before the replay starts and records the stream's head at that moment,
//! read after the queue was bound: every event up to it is replayed from the store, every
//! later one reaches the queue, so first-attempt messages at or below it are dropped as
//! duplicates. Replays of several streams are merged by commit time (`weirrecordedtime`), ties
//! by stream name then position.
//!
//! A stream bound while the consumers run ([`Runner::rebind`]) is replayed alongside them.
//! Until its mark is known (from its row, written by whichever worker holds its lock), its
//! first-attempt messages wait; under `perKey` they also wait for its replay to end, so that
//! a key's live events never overtake its history. A stream unbound is forgotten at once: its
//! messages still in the queue, in delay queues or in lanes are acknowledged without delivery
//! (counted as `unbound`). Its row stays: bound again later, it resumes with live events.

use super::*;
use crate::topology::Key;

/// The mark of a stream whose replay row is not known yet.
pub(super) const HWM_PENDING: i64 = i64::MAX;
/// How often a worker that does not hold a stream's lock looks at its replay row.
const ROW_POLL: Duration = Duration::from_millis(500);
/// How often a first-attempt message waiting for its stream's hand-over looks again.
const HAND_OVER_POLL: Duration = Duration::from_millis(100);

/// One stream a subscription reads.
pub(super) struct Bound {
    pub(super) side: StreamSide,
    /// First-attempt messages at or below this position were (or are being) delivered by the
    /// replay; [`HWM_PENDING`] until known.
    pub(super) hwm: AtomicI64,
    /// Its history is being replayed while the live consumers run.
    pub(super) replaying: AtomicBool,
    /// Cancelled when the stream is unbound or the runner stops.
    pub(super) cancel: CancellationToken,
}

impl Bound {
    pub(super) fn new(side: StreamSide, hwm: i64, cancel: CancellationToken) -> Bound {
        Bound {
            side,
            hwm: AtomicI64::new(hwm),
            replaying: AtomicBool::new(false),
            cancel,
        }
    }

    fn name(&self) -> &str {
        &self.side.plan.key.name
    }
}

/// What a first-attempt message waits for.
pub(super) enum HandOver {
    /// Its stream's mark (first-attempt messages at or below it are duplicates).
    Mark(i64),
    /// The stream was unbound meanwhile.
    Unbound,
}

/// One stream's part of a replay.
struct Replay {
    bound: Arc<Bound>,
    store: Store,
    stream_id: i64,
    /// Next position to read, and the last one to replay.
    read_from: i64,
    hwm: i64,
    /// Read and not yet delivered: (commit time, position, event).
    buf: std::collections::VecDeque<(chrono::DateTime<chrono::Utc>, i64, CloudEvent)>,
    /// Last position handed to the sink (0: none yet).
    delivered: i64,
    exhausted: bool,
}

impl Runner {
    /// The plans of the streams read now.
    pub fn stream_plans(&self) -> BTreeMap<Key, StreamPlan> {
        self.inner
            .bounds()
            .into_iter()
            .map(|b| (b.side.plan.key.clone(), b.side.plan.clone()))
            .collect()
    }

    /// Whether set-up is over and the consumers run (or the subscription is scaled to zero):
    /// only then can streams be bound or unbound in place.
    pub fn settled(&self) -> bool {
        self.state.caught_up.load(Ordering::Acquire)
            || self.state.scaled_to_zero.load(Ordering::Acquire)
    }

    /// Moves a multi-stream subscription to `sides` without stopping its consumers: streams
    /// no longer read are unbound and forgotten, new ones are bound and their history replayed
    /// from `startFrom` in the background.
    pub async fn rebind(&self, sides: Vec<StreamSide>) -> Result<(), DeliveryError> {
        let inner = &self.inner;
        let wanted: BTreeMap<String, StreamSide> = sides
            .into_iter()
            .map(|s| (s.plan.key.name.clone(), s))
            .collect();
        let current: BTreeMap<String, Arc<Bound>> = inner.sides.reading().clone();
        for (name, b) in current.iter().filter(|(n, _)| !wanted.contains_key(*n)) {
            // Unbound first, then forgotten: nothing new arrives, and what is still queued is
            // dropped. A failed unbind (the exchange deleted with its stream, the broker away)
            // is reported; the stream's messages are dropped all the same.
            if let Err(e) = inner.unbind_exchange(&b.side.plan.broker.exchange).await {
                tracing::warn!(subscription = %inner.plan.key, stream = %name, error = %e, "unbinding a stream");
            }
            b.cancel.cancel();
            inner.sides.writing().remove(name);
            tracing::info!(subscription = %inner.plan.key, stream = %name, "stream unbound");
        }
        for (name, side) in wanted {
            if current.contains_key(&name) {
                continue;
            }
            let b = Arc::new(Bound::new(side, HWM_PENDING, inner.cancel.child_token()));
            inner.sides.writing().insert(name.clone(), b.clone());
            if let Err(e) = inner.bind_exchange(&b.side.plan.broker.exchange).await {
                inner.sides.writing().remove(&name);
                return Err(e);
            }
            tracing::info!(subscription = %inner.plan.key, stream = %name, "stream bound");
            let task = tokio::spawn(inner.clone().hand_over(b));
            {
                let mut tasks = inner.hand_overs.locked();
                tasks.retain(|t| !t.is_finished());
                tasks.push(task);
            }
        }
        Ok(())
    }
}

impl Inner {
    pub(super) fn bounds(&self) -> Vec<Arc<Bound>> {
        self.sides.reading().values().cloned().collect()
    }

    /// The exchanges of every stream read.
    pub(super) fn exchanges(&self) -> Vec<String> {
        self.sides
            .reading()
            .values()
            .map(|b| b.side.plan.broker.exchange.clone())
            .collect()
    }

    /// The name of a stream's replay row in its store's progress table.
    pub(super) fn progress_name(&self, b: &Bound) -> String {
        format!("{}/{}", self.plan.key.name, b.name())
    }

    /// The stream a message comes from: the only one of a single-stream subscription; for
    /// several, the exchange a first attempt was published to, or the stream its event names
    /// (retries and redriven dead letters arrive through the default exchange). `None`: a
    /// stream no longer read.
    pub(super) fn origin(
        &self,
        exchange: &str,
        first_attempt: bool,
        ev: &CloudEvent,
    ) -> Option<Arc<Bound>> {
        let sides = self.sides.reading();
        if !self.plan.multi {
            return sides.values().next().cloned();
        }
        if first_attempt && !exchange.is_empty() {
            return sides
                .values()
                .find(|b| b.side.plan.broker.exchange == exchange)
                .cloned();
        }
        ev.extension_str(EXT_STREAM)
            .and_then(|n| sides.get(&n).cloned())
    }

    /// Marks `ev` as coming from `b` (multi-stream subscriptions).
    pub(super) fn stamp(&self, ev: &mut CloudEvent, b: &Bound) {
        if self.plan.multi {
            ev.extensions
                .insert(EXT_STREAM.into(), ExtValue::String(b.name().to_string()));
        }
    }

    /// Waits until a first-attempt message of `b` can be judged: its mark known and, under
    /// `perKey`, its replay over (see the module documentation).
    pub(super) async fn await_hand_over(
        &self,
        b: &Bound,
        cancel: &CancellationToken,
    ) -> Result<HandOver, DeliveryError> {
        let per_key = matches!(self.plan.ordering, OrderingPlan::PerKey { .. });
        loop {
            if b.cancel.is_cancelled() && !cancel.is_cancelled() {
                return Ok(HandOver::Unbound);
            }
            let hwm = b.hwm.load(Ordering::Acquire);
            if hwm != HWM_PENDING && !(per_key && b.replaying.load(Ordering::Acquire)) {
                return Ok(HandOver::Mark(hwm));
            }
            if !sleep_or_cancel(cancel, HAND_OVER_POLL).await {
                return Err(DeliveryError::Shutdown);
            }
        }
    }

    /// Set-up of a multi-stream subscription: provisions, takes every stream's lock (in name
    /// order, so two workers cannot deadlock), learns or records each stream's mark, then
    /// replays what is left of every history, merged.
    pub(super) async fn prepare_multi(
        &self,
        cancel: &CancellationToken,
    ) -> Result<(), DeliveryError> {
        let fresh = self.provision().await?;
        let mut leases = Vec::new();
        let mut replays = Vec::new();
        for b in self.bounds() {
            let Some(store) = b.side.store.clone() else {
                // Broker-only: no history and no positions, nothing to hand over.
                b.hwm.store(0, Ordering::Release);
                continue;
            };
            let stream_id = wait_stream_id(&b.side, cancel).await?;
            let Some(lease) = store.locks().acquire(self.lock_key(&b), cancel).await else {
                return Err(DeliveryError::Shutdown);
            };
            let (next, hwm) = self.replay_row(&store, stream_id, &b, fresh).await?;
            b.hwm.store(hwm, Ordering::Release);
            leases.push(lease);
            if next <= hwm {
                replays.push(Replay::new(b, store, stream_id, next, hwm));
            }
        }
        if self.scaled_to_zero() || replays.is_empty() {
            return Ok(());
        }
        let lost: Vec<CancellationToken> = leases.iter().map(|l| l.lost().clone()).collect();
        tokio::select! {
            r = self.replay(replays, false, cancel) => r,
            _ = futures::future::select_all(lost.iter().map(|t| Box::pin(t.cancelled()))) => {
                Err(DeliveryError::Other(
                    "lost a stream's lock (the database's lock session broke)".into(),
                ))
            }
        }
    }

    fn lock_key(&self, b: &Bound) -> LockKey {
        let key = &self.plan.key;
        LockKey::Named(format!(
            "weir-subscription/{}/{}/{}",
            key.namespace,
            key.name,
            b.name()
        ))
    }

    /// A stream's replay row as (next position to replay, mark), written first when missing,
    /// of another stream incarnation, or when the queue is new.
    async fn replay_row(
        &self,
        store: &Store,
        stream_id: i64,
        b: &Bound,
        fresh: bool,
    ) -> Result<(i64, i64), DeliveryError> {
        let (ns, name) = (&self.plan.key.namespace, self.progress_name(b));
        if let Some(row) = store.progress(ns, &name).await?
            && !fresh
            && row.stream_id == stream_id
            && let Some(hwm) = row.caught_up_to
        {
            return Ok((row.next_position, hwm));
        }
        let head = store.head(stream_id).await?;
        let next = match &self.plan.start_from {
            StartFrom::Latest => head + 1,
            StartFrom::Earliest => 1,
            StartFrom::Position(p) => *p,
            StartFrom::Time(t) => store
                .first_position_since(stream_id, *t)
                .await?
                .unwrap_or(head + 1),
        };
        store
            .start_progress(ns, &name, stream_id, next, Some(head))
            .await?;
        Ok((next, head))
    }

    /// Hands a stream bound while the consumers run over to them: learns its mark (from its
    /// row, whoever writes it) and, holding its lock, replays its history. Retried until it
    /// succeeds, the stream is unbound or the runner stops.
    async fn hand_over(self: Arc<Self>, b: Arc<Bound>) {
        let Some(store) = b.side.store.clone() else {
            b.hwm.store(0, Ordering::Release);
            return;
        };
        let cancel = b.cancel.clone();
        let watcher = tokio::spawn(self.clone().watch_row(b.clone(), store.clone()));
        let mut trouble = Trouble::new(RECONNECT_DELAY, SETUP_RETRY_MAX);
        loop {
            match self.replay_added(&b, &store, &cancel).await {
                Ok(()) | Err(DeliveryError::Shutdown) => break,
                Err(e) => {
                    let (delay, say) = trouble.failed(&e.to_string());
                    if say {
                        tracing::warn!(subscription = %self.plan.key, stream = %b.name(), error = %e,
                            "replaying a stream bound later");
                    }
                    if !sleep_or_cancel(&cancel, delay).await {
                        break;
                    }
                }
            }
        }
        b.replaying.store(false, Ordering::Release);
        watcher.abort();
    }

    async fn replay_added(
        &self,
        b: &Arc<Bound>,
        store: &Store,
        cancel: &CancellationToken,
    ) -> Result<(), DeliveryError> {
        let stream_id = wait_stream_id(&b.side, cancel).await?;
        let Some(lease) = store.locks().acquire(self.lock_key(b), cancel).await else {
            return Err(DeliveryError::Shutdown);
        };
        let (next, hwm) = self.replay_row(store, stream_id, b, false).await?;
        b.hwm.store(hwm, Ordering::Release);
        if next > hwm || self.scaled_to_zero() {
            return Ok(());
        }
        b.replaying.store(true, Ordering::Release);
        tracing::info!(subscription = %self.plan.key, stream = %b.name(), from = next, to = hwm,
            "replaying a stream bound later");
        let replay = Replay::new(b.clone(), store.clone(), stream_id, next, hwm);
        let lost = lease.lost().clone();
        let r = tokio::select! {
            r = self.replay(vec![replay], true, cancel) => r,
            _ = lost.cancelled() => Err(DeliveryError::Other(
                "lost the stream's lock (the database's lock session broke)".into(),
            )),
        };
        b.replaying.store(false, Ordering::Release);
        r
    }

    /// Learns a stream's mark and whether its replay runs from its row, for a worker that
    /// does not hold its lock (another one replays it).
    async fn watch_row(self: Arc<Self>, b: Arc<Bound>, store: Store) {
        let name = self.progress_name(&b);
        loop {
            if let Some(id) = (b.side.stream_id)()
                && let Ok(Some(row)) = store.progress(&self.plan.key.namespace, &name).await
                && row.stream_id == id
                && let Some(hwm) = row.caught_up_to
            {
                b.hwm.store(hwm, Ordering::Release);
                let running = row.next_position <= hwm;
                b.replaying.store(running, Ordering::Release);
                if !running {
                    return;
                }
            }
            if !sleep_or_cancel(&b.cancel, ROW_POLL).await {
                return;
            }
        }
    }

    /// Replays the streams' histories up to their marks, merged by commit time, recording
    /// each stream's progress after every page. `live`: the consumers run meanwhile (a stream
    /// bound later).
    async fn replay(
        &self,
        mut parts: Vec<Replay>,
        live: bool,
        cancel: &CancellationToken,
    ) -> Result<(), DeliveryError> {
        let ns = self.plan.key.namespace.clone();
        loop {
            for p in parts
                .iter_mut()
                .filter(|p| p.buf.is_empty() && !p.exhausted)
            {
                p.fill(self).await?;
            }
            let mut page = Vec::new();
            while page.len() < CATCHUP_PAGE as usize {
                // A stream whose buffer ran dry may hold an earlier event: read it first.
                if parts.iter().any(|p| p.buf.is_empty() && !p.exhausted) {
                    break;
                }
                let Some(i) = (0..parts.len())
                    .filter(|i| !parts[*i].buf.is_empty())
                    .min_by_key(|i| {
                        let p = &parts[*i];
                        p.buf.front().map(|(t, pos, _)| (*t, p.bound.name(), *pos))
                    })
                else {
                    break;
                };
                if let Some((_, pos, ev)) = parts[i].buf.pop_front() {
                    parts[i].delivered = pos;
                    page.push(ev);
                }
            }
            if page.is_empty() {
                if parts.iter().all(|p| p.exhausted && p.buf.is_empty()) {
                    break;
                }
                continue;
            }
            self.deliver_page(page, live, cancel).await?;
            for p in parts.iter().filter(|p| p.delivered > 0) {
                p.store
                    .set_next_position(&ns, &self.progress_name(&p.bound), p.delivered + 1)
                    .await?;
            }
        }
        for p in &parts {
            // Past the mark even when the last events were not delivered (none left).
            p.store
                .set_next_position(&ns, &self.progress_name(&p.bound), p.hwm + 1)
                .await?;
            tracing::info!(subscription = %self.plan.key, stream = %p.bound.name(), to = p.hwm, "stream replayed");
        }
        Ok(())
    }
}

impl Replay {
    fn new(bound: Arc<Bound>, store: Store, stream_id: i64, next: i64, hwm: i64) -> Replay {
        Replay {
            bound,
            store,
            stream_id,
            read_from: next,
            hwm,
            buf: Default::default(),
            delivered: 0,
            exhausted: false,
        }
    }

    /// Reads the next page of this stream, up to its mark.
    async fn fill(&mut self, inner: &Inner) -> Result<(), DeliveryError> {
        let page = self
            .store
            .read_range(self.stream_id, self.read_from, CATCHUP_PAGE)
            .await?;
        let Some(last) = page.last().map(|e| e.position) else {
            self.exhausted = true;
            return Ok(());
        };
        for e in page.iter().filter(|e| e.position <= self.hwm) {
            let mut ev = e.to_cloud_event();
            inner.stamp(&mut ev, &self.bound);
            self.buf.push_back((e.recorded_time, e.position, ev));
        }
        self.read_from = last + 1;
        if last >= self.hwm {
            self.exhausted = true;
        }
        Ok(())
    }
}

/// The stream's id in its store, once its runtime provisioned it.
pub(super) async fn wait_stream_id(
    side: &StreamSide,
    cancel: &CancellationToken,
) -> Result<i64, DeliveryError> {
    loop {
        if let Some(id) = (side.stream_id)() {
            return Ok(id);
        }
        if !sleep_or_cancel(cancel, Duration::from_millis(200)).await {
            return Err(DeliveryError::Shutdown);
        }
    }
}
