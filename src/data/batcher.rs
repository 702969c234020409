//! The per-stream batcher: coalesces concurrent publish requests into one store transaction
//! (group commit) without ever splitting a request.
//!
//! A batch is flushed as soon as no other request is waiting to join it: a lone request is
//! written at once. When requests are still being parsed for this stream (they have announced
//! themselves with [`Batcher::joining`] once their body was read) the batcher waits for them,
//! at most `maxDelay` after the first request of the batch. While one batch commits the next one
//! fills up, which is where batches larger than one come from under load.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::data::event::CloudEvent;
use crate::data::store::{RequestOutcome, StoreError};
use crate::topology::BatchingPlan;

/// Why a request got no durable answer. Every variant means "not known to be stored": the
/// publisher retries with the same ids (dedup makes that safe).
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("the event store is unavailable: {0}")]
    Unavailable(String),
    #[error("the request deadline passed before the events could be stored")]
    DeadlineExceeded,
    #[error("storing the events failed: {0}")]
    Failed(String),
    #[error("the stream is shutting down")]
    ShuttingDown,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the stream's batch queue is full")]
    Overloaded,
    #[error("the stream is shutting down")]
    ShuttingDown,
}

/// Writes one batch: one outcome per request, in order. Implemented by the store; tests use
/// fakes.
pub trait BatchWriter: Send + Sync + 'static {
    fn write<'a>(
        &'a self,
        requests: &'a [Vec<CloudEvent>],
    ) -> Pin<Box<dyn Future<Output = Result<Vec<RequestOutcome>, StoreError>> + Send + 'a>>;
}

/// Observations of the batcher, for metrics.
pub trait BatchObserver: Send + Sync + 'static {
    fn batch_written(&self, events: usize, elapsed: Duration);
    fn retried(&self);
}

pub type Reply = Result<RequestOutcome, BatchError>;

struct Pending {
    events: Vec<CloudEvent>,
    bytes: usize,
    deadline: Instant,
    reply: oneshot::Sender<Reply>,
}

/// Limits of the batcher's queue and concurrency.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Requests waiting for a batch. 1024 requests keeps a few batches' worth of work queued
    /// at the rates one PostgreSQL primary sustains, while a stalled store turns into 503s
    /// within a fraction of a second instead of unbounded memory.
    pub queue_requests: usize,
    /// Bytes of event payload waiting. With `maxRequestBytes` 4 MiB a handful of large
    /// requests would otherwise pin gigabytes; 64 MiB per stream bounds it.
    pub queue_bytes: usize,
    /// Batches being written at once. The store decides a batch on top of the ones still
    /// committing, so it is ready to go when the previous commit ends: three keep one
    /// committing, one ready and one being looked up and decided. Measured with `weir bench
    /// ingest`: two and four were both slower (four splits the queue into smaller batches).
    pub inflight_batches: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            queue_requests: 1024,
            queue_bytes: 64 * 1024 * 1024,
            inflight_batches: 3,
        }
    }
}

/// Handle to a running batcher. Dropping every handle lets the batcher drain and stop.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Pending>,
    bytes: Arc<Semaphore>,
    queue_bytes: usize,
    joining: Arc<AtomicUsize>,
}

/// Marks a request as on its way to the batcher (its body read, being parsed) while alive.
pub struct Joining(Arc<AtomicUsize>);

impl Drop for Joining {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Batcher {
    pub fn spawn(
        plan: BatchingPlan,
        limits: Limits,
        writer: Arc<dyn BatchWriter>,
        observer: Arc<dyn BatchObserver>,
    ) -> (Batcher, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(limits.queue_requests.max(1));
        let bytes = Arc::new(Semaphore::new(limits.queue_bytes));
        let joining = Arc::new(AtomicUsize::new(0));
        let task = Task {
            rx,
            plan,
            writer,
            observer,
            bytes: bytes.clone(),
            joining: joining.clone(),
            inflight: Arc::new(Semaphore::new(limits.inflight_batches.max(1))),
        };
        let handle = tokio::spawn(task.run());
        (
            Batcher {
                tx,
                bytes,
                queue_bytes: limits.queue_bytes,
                joining,
            },
            handle,
        )
    }

    /// Call when a request's body has been read, before it is parsed; keep the guard until
    /// it is submitted or rejected. Not before the body is in: a slow body would make every
    /// batch of the stream wait its full maxDelay.
    pub fn joining(&self) -> Joining {
        self.joining.fetch_add(1, Ordering::AcqRel);
        Joining(self.joining.clone())
    }

    /// Queues a request; the answer arrives on the returned receiver once its batch has
    /// committed (or failed). Never waits: a full queue is `Overloaded` (503).
    pub fn submit(
        &self,
        events: Vec<CloudEvent>,
        deadline: Instant,
    ) -> Result<oneshot::Receiver<Reply>, SubmitError> {
        let size: usize = events.iter().map(CloudEvent::encoded_size).sum();
        // A request larger than the whole byte budget is still admitted when the queue is
        // empty (it is bounded by maxRequestBytes), so it cannot be starved forever.
        let want = size.min(self.queue_bytes) as u32;
        let permit = self
            .bytes
            .clone()
            .try_acquire_many_owned(want.max(1))
            .map_err(|_| SubmitError::Overloaded)?;
        permit.forget(); // returned by the batcher when the request leaves the queue
        let (reply, rx) = oneshot::channel();
        let p = Pending {
            events,
            bytes: want.max(1) as usize,
            deadline,
            reply,
        };
        match self.tx.try_send(p) {
            Ok(()) => Ok(rx),
            Err(e) => {
                let (err, p) = match e {
                    mpsc::error::TrySendError::Full(p) => (SubmitError::Overloaded, p),
                    mpsc::error::TrySendError::Closed(p) => (SubmitError::ShuttingDown, p),
                };
                self.bytes.add_permits(p.bytes);
                Err(err)
            }
        }
    }
}

struct Task {
    rx: mpsc::Receiver<Pending>,
    plan: BatchingPlan,
    writer: Arc<dyn BatchWriter>,
    observer: Arc<dyn BatchObserver>,
    bytes: Arc<Semaphore>,
    joining: Arc<AtomicUsize>,
    inflight: Arc<Semaphore>,
}

impl Task {
    async fn run(mut self) {
        let mut writes = JoinSet::new();
        let mut carry: Option<Pending> = None;
        loop {
            let first = match carry.take() {
                Some(p) => p,
                None => match self.rx.recv().await {
                    Some(p) => p,
                    None => break, // every handle dropped: drain done
                },
            };
            // Bounded concurrency: wait for a write slot before forming the batch, so what
            // arrives while every slot is busy joins it (group commit grows with the load).
            let permit = match self.inflight.clone().acquire_owned().await {
                Ok(p) => p,
                Err(_) => break,
            };
            let started = Instant::now();
            let mut batch_events = first.events.len();
            let mut batch_bytes = first.bytes;
            let mut batch = vec![first];
            while batch_events < self.plan.max_events && batch_bytes < self.plan.max_bytes {
                let next = match self.rx.try_recv() {
                    Ok(p) => Some(p),
                    Err(_) if self.joining.load(Ordering::Acquire) > 0 => {
                        // Requests are being parsed right now: give them until maxDelay.
                        let wait_until = started + self.plan.max_delay;
                        tokio::time::timeout_at(wait_until, self.rx.recv())
                            .await
                            .unwrap_or_default()
                    }
                    Err(_) => None,
                };
                let Some(p) = next else { break };
                if batch_events + p.events.len() > self.plan.max_events
                    || batch_bytes + p.bytes > self.plan.max_bytes
                {
                    // Never split a request: it opens the next batch.
                    carry = Some(p);
                    break;
                }
                batch_events += p.events.len();
                batch_bytes += p.bytes;
                batch.push(p);
            }
            let writer = self.writer.clone();
            let observer = self.observer.clone();
            let bytes = self.bytes.clone();
            writes.spawn(async move {
                write_with_retry(batch, writer.as_ref(), observer.as_ref(), &bytes).await;
                drop(permit);
            });
            // Reap finished writes so the set does not grow.
            while writes.try_join_next().is_some() {}
        }
        while writes.join_next().await.is_some() {}
    }
}

/// Writes a batch, retrying transient failures with capped exponential backoff until the
/// requests' deadlines; a request whose deadline passes is answered and dropped from the
/// batch, the rest are retried. A retry after a commit whose acknowledgement was lost
/// finds the events by `(source, id)` and answers them as duplicates of themselves.
async fn write_with_retry(
    mut batch: Vec<Pending>,
    writer: &dyn BatchWriter,
    observer: &dyn BatchObserver,
    bytes: &Semaphore,
) {
    let mut backoff = Duration::from_millis(20);
    loop {
        let requests: Vec<Vec<CloudEvent>> = batch
            .iter_mut()
            .map(|p| std::mem::take(&mut p.events))
            .collect();
        let started = Instant::now();
        let result = writer.write(&requests).await;
        match result {
            Ok(outcomes) => {
                let n = requests.iter().map(Vec::len).sum();
                observer.batch_written(n, started.elapsed());
                for (p, outcome) in batch.into_iter().zip(outcomes) {
                    bytes.add_permits(p.bytes);
                    let _ = p.reply.send(Ok(outcome));
                }
                return;
            }
            Err(e) if e.is_transient() => {
                observer.retried();
                tracing::warn!(error = %e, "append failed, retrying");
                for (p, events) in batch.iter_mut().zip(requests) {
                    p.events = events;
                }
                let now = Instant::now();
                let (keep, expired): (Vec<_>, Vec<_>) =
                    batch.into_iter().partition(|p| p.deadline > now + backoff);
                for p in expired {
                    bytes.add_permits(p.bytes);
                    let _ = p.reply.send(Err(BatchError::Unavailable(e.to_string())));
                }
                if keep.is_empty() {
                    return;
                }
                batch = keep;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(e) => {
                tracing::error!(error = %e, "append failed");
                for p in batch {
                    bytes.add_permits(p.bytes);
                    let _ = p.reply.send(Err(BatchError::Failed(e.to_string())));
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::store::Appended;
    use std::sync::Mutex;

    fn ev(i: usize) -> CloudEvent {
        CloudEvent::bare(i.to_string())
    }

    /// Records batch shapes; each write takes `delay` (virtual time) and may fail first.
    struct Fake {
        batches: Mutex<Vec<Vec<usize>>>,
        delay: Duration,
        fail_first: AtomicUsize,
        gate: Option<Arc<Semaphore>>,
    }

    impl BatchWriter for Fake {
        fn write<'a>(
            &'a self,
            requests: &'a [Vec<CloudEvent>],
        ) -> Pin<Box<dyn Future<Output = Result<Vec<RequestOutcome>, StoreError>> + Send + 'a>>
        {
            Box::pin(async move {
                if let Some(g) = &self.gate {
                    let _p = g.acquire().await;
                }
                tokio::time::sleep(self.delay).await;
                if self
                    .fail_first
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                    .is_ok()
                {
                    return Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut));
                }
                self.batches
                    .lock()
                    .unwrap()
                    .push(requests.iter().map(Vec::len).collect());
                Ok(requests
                    .iter()
                    .map(|r| {
                        Ok(r.iter()
                            .map(|_| Appended {
                                position: 1,
                                version: None,
                                duplicate: false,
                            })
                            .collect())
                    })
                    .collect())
            })
        }
    }

    struct Quiet;
    impl BatchObserver for Quiet {
        fn batch_written(&self, _: usize, _: Duration) {}
        fn retried(&self) {}
    }

    fn fake(delay_ms: u64, fail_first: usize) -> Arc<Fake> {
        Arc::new(Fake {
            batches: Mutex::new(vec![]),
            delay: Duration::from_millis(delay_ms),
            fail_first: AtomicUsize::new(fail_first),
            gate: None,
        })
    }

    fn plan(max_events: usize) -> BatchingPlan {
        BatchingPlan {
            max_events,
            max_bytes: 1 << 20,
            max_delay: Duration::from_millis(5),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_request_is_written_at_once() {
        let w = fake(1, 0);
        let (b, _h) = Batcher::spawn(plan(50), Limits::default(), w.clone(), Arc::new(Quiet));
        let start = Instant::now();
        let rx = b
            .submit(vec![ev(1)], start + Duration::from_secs(5))
            .unwrap();
        rx.await.unwrap().unwrap().unwrap();
        // Only the write's own 1 ms: no maxDelay wait for a lone request.
        assert_eq!(start.elapsed(), Duration::from_millis(1));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_coalesce_and_are_never_split() {
        let w = fake(10, 0);
        let (b, _h) = Batcher::spawn(plan(10), Limits::default(), w.clone(), Arc::new(Quiet));
        let d = Instant::now() + Duration::from_secs(5);
        let mut rxs = vec![];
        for i in 0..8 {
            rxs.push(b.submit(vec![ev(i), ev(i + 100), ev(i + 200)], d).unwrap());
        }
        for rx in rxs {
            assert_eq!(rx.await.unwrap().unwrap().unwrap().len(), 3);
        }
        let batches = w.batches.lock().unwrap().clone();
        // 8 requests of 3 events with maxEvents 10: whole requests only, at most 3 per batch.
        assert!(
            batches
                .iter()
                .all(|b| b.iter().all(|n| *n == 3) && b.len() <= 3)
        );
        assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 8);
        assert!(batches.iter().any(|b| b.len() > 1), "{batches:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_larger_than_max_events_is_one_batch() {
        let w = fake(1, 0);
        let (b, _h) = Batcher::spawn(plan(2), Limits::default(), w.clone(), Arc::new(Quiet));
        let d = Instant::now() + Duration::from_secs(5);
        let rx = b.submit((0..7).map(ev).collect(), d).unwrap();
        assert_eq!(rx.await.unwrap().unwrap().unwrap().len(), 7);
        assert_eq!(*w.batches.lock().unwrap(), vec![vec![7]]);
    }

    #[tokio::test(start_paused = true)]
    async fn waits_up_to_max_delay_for_requests_being_parsed() {
        let w = fake(0, 0);
        let (b, _h) = Batcher::spawn(plan(50), Limits::default(), w.clone(), Arc::new(Quiet));
        let d = Instant::now() + Duration::from_secs(5);
        let guard = b.joining();
        let rx1 = b.submit(vec![ev(1)], d).unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
        let rx2 = b.submit(vec![ev(2)], d).unwrap();
        drop(guard);
        rx1.await.unwrap().unwrap().unwrap();
        rx2.await.unwrap().unwrap().unwrap();
        assert_eq!(*w.batches.lock().unwrap(), vec![vec![1, 1]]);
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_within_the_deadline() {
        let w = fake(1, 3);
        let (b, _h) = Batcher::spawn(plan(50), Limits::default(), w.clone(), Arc::new(Quiet));
        let rx = b
            .submit(vec![ev(1)], Instant::now() + Duration::from_secs(5))
            .unwrap();
        assert!(rx.await.unwrap().is_ok());
        assert_eq!(w.batches.lock().unwrap().len(), 1);

        let w = fake(1, 1000);
        let (b, _h) = Batcher::spawn(plan(50), Limits::default(), w.clone(), Arc::new(Quiet));
        let rx = b
            .submit(vec![ev(1)], Instant::now() + Duration::from_millis(500))
            .unwrap();
        assert!(matches!(rx.await.unwrap(), Err(BatchError::Unavailable(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_answers_overloaded_and_memory_stays_bounded() {
        let gate = Arc::new(Semaphore::new(0));
        let w = Arc::new(Fake {
            batches: Mutex::new(vec![]),
            delay: Duration::ZERO,
            fail_first: AtomicUsize::new(0),
            gate: Some(gate.clone()),
        });
        let limits = Limits {
            queue_requests: 4,
            queue_bytes: 1 << 20,
            inflight_batches: 1,
        };
        let (b, _h) = Batcher::spawn(plan(1), limits, w.clone(), Arc::new(Quiet));
        let d = Instant::now() + Duration::from_secs(60);
        let mut accepted = vec![];
        let mut overloaded = 0;
        for i in 0..20 {
            match b.submit(vec![ev(i)], d) {
                Ok(rx) => accepted.push(rx),
                Err(SubmitError::Overloaded) => overloaded += 1,
                Err(e) => panic!("{e}"),
            }
            tokio::task::yield_now().await;
        }
        assert!(
            overloaded > 0 && accepted.len() <= 4 + 2,
            "{}",
            accepted.len()
        );
        gate.add_permits(1000);
        for rx in accepted {
            assert!(rx.await.unwrap().is_ok());
        }
    }
}
