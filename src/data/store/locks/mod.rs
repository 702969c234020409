//! Ownership across processes for one database: one PostgreSQL session per database and
//! process holds every advisory lock this process owns there, and writes the relays'
//! checkpoints.
//!
//! A session per owned resource (what a lock held on its own connection costs) would make
//! the connections of a worker grow with its streams and subscriptions; a lock held on a
//! pool connection would take the pool away from appends, and a blocking `pg_advisory_lock`
//! there deadlocks once enough waiters hold every connection. So: one session, one task.
//!
//! - Waiters register the keys they want; the task tries every wanted key in one query per
//!   round (a new waiter starts a round at once, then every [`LOCK_POLL`] while a key is held
//!   elsewhere). A granted key becomes a [`Lease`]; dropping it releases the key.
//! - Within the process a key has one holder at a time: the session would grant it twice
//!   (advisory locks are re-entrant per session), so the task never asks for a key it holds.
//! - Every lease of a session shares its `lost` token: when the session breaks, PostgreSQL
//!   has released its locks, every lease is lost at once, and its holders stop before another
//!   process can take over (they notice within one [`KEEPALIVE`]).
//! - Relay checkpoints are written through this session, with the lease's session generation
//!   checked first and the relay's epoch checked in SQL: a holder whose session broke cannot
//!   move a checkpoint, even if the task has reconnected since. Writes of many relays waiting
//!   at once go out as one statement.

use crate::poison::MutexExt;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::StoreError;
use sql::{claim, try_lock, unlock, write_checkpoints};

mod sql;

/// How often keys held elsewhere are tried again: the takeover time after an owner dies.
pub const LOCK_POLL: Duration = Duration::from_secs(1);
/// An idle session that holds locks is checked this often (a dead session means lost locks).
pub const KEEPALIVE: Duration = Duration::from_secs(1);
/// Limit of one connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Limit of one statement of the session: a hung server must not stall every owner.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect backoff: from 200 ms, doubling, capped at 5 s, with jitter.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Checkpoint writes waiting for the session. A relay has at most one outstanding (it waits
/// for the answer), so this bounds the relays writing at once, not their number: past it a
/// relay waits for room, which only slows relays down when this many write in the same
/// instant.
const WRITES: usize = 1024;

/// An advisory lock key: the two-int form (`pg_try_advisory_lock(int4, int4)`) or a name
/// hashed by `hashtextextended(name, 0)` (the one-bigint form). Both match the keys earlier
/// versions took on their own connections, so mixed versions still exclude each other.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LockKey {
    Pair(i32, i32),
    Named(String),
}

/// Holding a key. Dropping it releases the key (in the background).
pub struct Lease {
    key: Option<LockKey>,
    generation: u64,
    lost: CancellationToken,
    locks: Arc<Inner>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Cancelled when the session holding the lock broke: the lock is gone.
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    /// Claims the relay of `stream_id` for this lease: bumps the checkpoint's epoch (durably)
    /// and answers `(epoch, checkpoint)`.
    pub async fn claim_relay(&self, stream_id: i64) -> Result<(i64, i64), StoreError> {
        self.request(|reply| Req::Claim {
            generation: self.generation,
            stream_id,
            reply,
        })
        .await
    }

    /// Moves the relay checkpoint of `stream_id` to `position` if this lease still holds the
    /// lock and `epoch` is still the checkpoint's: false when fenced.
    pub async fn write_checkpoint(
        &self,
        stream_id: i64,
        epoch: i64,
        position: i64,
    ) -> Result<bool, StoreError> {
        self.request(|reply| Req::Checkpoint {
            generation: self.generation,
            stream_id,
            epoch,
            position,
            reply,
        })
        .await
    }

    async fn request<T>(
        &self,
        req: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Req,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        let lost = || StoreError::Unavailable(sqlx::Error::PoolClosed);
        if self.lost.is_cancelled() || self.locks.requests.send(req(tx)).await.is_err() {
            return Err(lost());
        }
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Unavailable(sqlx::Error::Protocol(e))),
            Err(_) => Err(lost()),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let mut st = self.locks.state.locked();
        if st.generation != self.generation {
            // The session that held it is gone, and the lock with it.
            return;
        }
        st.held.remove(&key);
        st.release.push(key);
        drop(st);
        self.locks.wake.notify_one();
    }
}

enum Req {
    Claim {
        generation: u64,
        stream_id: i64,
        reply: oneshot::Sender<Result<(i64, i64), String>>,
    },
    Checkpoint {
        generation: u64,
        stream_id: i64,
        epoch: i64,
        position: i64,
        reply: oneshot::Sender<Result<bool, String>>,
    },
}

/// The lock session of one database. Cheap to clone; the session starts on first use.
#[derive(Clone)]
pub struct Locks {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Locks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Locks").finish_non_exhaustive()
    }
}

struct Inner {
    pool: PgPool,
    state: Mutex<State>,
    wake: Notify,
    requests: mpsc::Sender<Req>,
    requests_rx: Mutex<Option<mpsc::Receiver<Req>>>,
    started: AtomicBool,
    cancel: CancellationToken,
}

#[derive(Default)]
struct State {
    /// Counts sessions: a lease belongs to the session it was granted on.
    generation: u64,
    /// The current session's `lost` token.
    lost: CancellationToken,
    /// Waiters by key, first come first served.
    wanted: HashMap<LockKey, Vec<oneshot::Sender<Lease>>>,
    /// Keys held by the current session and granted to a lease.
    held: HashSet<LockKey>,
    /// Keys whose lease was dropped, to unlock.
    release: Vec<LockKey>,
    /// Why the session is down, if it is.
    error: Option<String>,
}

impl Locks {
    pub fn new(pool: PgPool) -> Locks {
        let (tx, rx) = mpsc::channel(WRITES);
        Locks {
            inner: Arc::new(Inner {
                pool,
                state: Mutex::new(State::default()),
                wake: Notify::new(),
                requests: tx,
                requests_rx: Mutex::new(Some(rx)),
                started: AtomicBool::new(false),
                cancel: CancellationToken::new(),
            }),
        }
    }

    /// Waits until this process holds `key`; `None` when cancelled first.
    pub async fn acquire(&self, key: LockKey, cancel: &CancellationToken) -> Option<Lease> {
        self.start();
        let (tx, rx) = oneshot::channel();
        self.inner
            .state
            .locked()
            .wanted
            .entry(key)
            .or_default()
            .push(tx);
        self.inner.wake.notify_one();
        tokio::select! {
            _ = cancel.cancelled() => None,
            // A waiter that gave up leaves a closed sender: the task drops it, or releases
            // what it granted to it.
            l = rx => l.ok(),
        }
    }

    /// Stops the session (shutdown): its locks are released with it.
    pub fn close(&self) {
        self.inner.cancel.cancel();
    }

    fn start(&self) {
        if self.inner.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(rx) = self.inner.requests_rx.locked().take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(run(self.inner.clone(), rx));
            }
            Err(_) => {
                *self.inner.requests_rx.locked() = Some(rx);
                self.inner.started.store(false, Ordering::Release);
            }
        }
    }
}

async fn run(inner: Arc<Inner>, mut requests: mpsc::Receiver<Req>) {
    let mut failures = 0u32;
    loop {
        let target = inner.pool.connect_options();
        let connect = async {
            let mut c = (*target).clone().connect().await?;
            // Checkpoints need not wait for their WAL flush: one lost in a database crash only
            // makes the next owner publish those events again (delivery is at least once, and
            // consumers drop repeats by position). Claims turn it back on for themselves.
            sqlx::query("SET synchronous_commit = off")
                .execute(&mut c)
                .await?;
            Ok::<_, sqlx::Error>(c)
        };
        let connected = tokio::select! {
            _ = inner.cancel.cancelled() => return,
            r = tokio::time::timeout(CONNECT_TIMEOUT, connect) => r,
        };
        let conn = match connected {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                failed(&inner, &mut requests, e.to_string());
                failures = failures.saturating_add(1);
                if !pause(&inner, failures).await {
                    return;
                }
                continue;
            }
            Err(_) => {
                failed(&inner, &mut requests, "connect: no answer".to_string());
                failures = failures.saturating_add(1);
                if !pause(&inner, failures).await {
                    return;
                }
                continue;
            }
        };
        let (generation, lost) = {
            let mut st = inner.state.locked();
            st.generation += 1;
            st.lost = CancellationToken::new();
            // Keys released while no session existed were unlocked with the old session.
            st.release.clear();
            if st.error.take().is_some() {
                tracing::info!("database lock session: connected again");
            }
            (st.generation, st.lost.clone())
        };
        let end = serve(&inner, conn, generation, &mut requests).await;
        // The session is gone, and every lock it held with it.
        lost.cancel();
        {
            let mut st = inner.state.locked();
            st.held.clear();
            st.release.clear();
        }
        match end {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "database lock session lost: every lock it held is released");
                inner.state.locked().error = Some(e.clone());
                failures = 1;
                if !pause(&inner, failures).await {
                    return;
                }
            }
        }
    }
}

/// Records why no session could be made, once per distinct error, and fails the requests
/// waiting (their leases are of a session that is gone).
fn failed(inner: &Inner, requests: &mut mpsc::Receiver<Req>, error: String) {
    let mut st = inner.state.locked();
    if st.error.as_deref() != Some(error.as_str()) {
        tracing::warn!(error = %error, "database lock session: cannot connect");
        st.error = Some(error);
    }
    drop(st);
    while let Ok(req) = requests.try_recv() {
        refuse(req);
    }
}

fn refuse(req: Req) {
    let msg = "the lock session was lost".to_string();
    match req {
        Req::Claim { reply, .. } => {
            let _ = reply.send(Err(msg));
        }
        Req::Checkpoint { reply, .. } => {
            let _ = reply.send(Err(msg));
        }
    }
}

async fn pause(inner: &Inner, failures: u32) -> bool {
    let delay = crate::data::backoff(BACKOFF_BASE, BACKOFF_MAX, failures);
    tokio::select! {
        _ = inner.cancel.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(QUERY_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the lock session did not answer".to_string()),
    }
}

/// Serves one session until it breaks (`Err`) or the process stops (`Ok`).
async fn serve(
    inner: &Arc<Inner>,
    mut conn: PgConnection,
    generation: u64,
    requests: &mut mpsc::Receiver<Req>,
) -> Result<(), String> {
    let mut last_query = Instant::now();
    let mut next_try = Instant::now();
    loop {
        // Requests first: a relay waits on its checkpoint.
        let mut batch = Vec::new();
        while batch.len() < WRITES {
            match requests.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            requests_round(&mut conn, generation, batch).await?;
            last_query = Instant::now();
        }
        // Releases.
        let release = std::mem::take(&mut inner.state.locked().release);
        if !release.is_empty() {
            timed(unlock(&mut conn, &release)).await?;
            last_query = Instant::now();
        }
        // Wanted keys not held here.
        if Instant::now() >= next_try {
            let keys: Vec<LockKey> = {
                let mut st = inner.state.locked();
                st.wanted.retain(|_, w| {
                    w.retain(|tx| !tx.is_closed());
                    !w.is_empty()
                });
                let st = &*st;
                st.wanted
                    .keys()
                    .filter(|k| !st.held.contains(*k))
                    .cloned()
                    .collect()
            };
            if !keys.is_empty() {
                let got = timed(try_lock(&mut conn, &keys)).await?;
                last_query = Instant::now();
                grant(inner, &mut conn, generation, got).await?;
                next_try = Instant::now() + LOCK_POLL;
            }
        }
        let holding = !inner.state.locked().held.is_empty();
        if holding && last_query.elapsed() >= KEEPALIVE {
            timed(sqlx::query("SELECT 1").execute(&mut conn)).await?;
            last_query = Instant::now();
        }
        let waiting = !inner.state.locked().wanted.is_empty();
        let tick = if waiting {
            next_try.max(Instant::now() + Duration::from_millis(1))
        } else {
            Instant::now() + KEEPALIVE
        };
        tokio::select! {
            _ = inner.cancel.cancelled() => {
                let _ = conn.close().await;
                return Ok(());
            }
            _ = inner.wake.notified() => {
                // A new waiter is tried at once.
                next_try = Instant::now();
            }
            r = requests.recv() => match r {
                Some(r) => requests_round(&mut conn, generation, vec![r]).await?,
                None => return Ok(()),
            },
            _ = tokio::time::sleep_until(tick) => {}
        }
    }
}

/// Hands granted keys to their first waiter still waiting; a key nobody waits for any more
/// is unlocked again.
async fn grant(
    inner: &Arc<Inner>,
    conn: &mut PgConnection,
    generation: u64,
    got: Vec<LockKey>,
) -> Result<(), String> {
    let mut unwanted = Vec::new();
    {
        let mut st = inner.state.locked();
        let lost = st.lost.clone();
        for key in got {
            let mut lease = Some(Lease {
                key: Some(key.clone()),
                generation,
                lost: lost.clone(),
                locks: inner.clone(),
            });
            if let Some(waiters) = st.wanted.get_mut(&key) {
                while let Some(l) = lease.take() {
                    if waiters.is_empty() {
                        lease = Some(l);
                        break;
                    }
                    // A waiter that gave up meanwhile hands it back: try the next one.
                    if let Err(back) = waiters.remove(0).send(l) {
                        lease = Some(back);
                    }
                }
                if waiters.is_empty() {
                    st.wanted.remove(&key);
                }
            }
            match lease {
                None => {
                    st.held.insert(key);
                }
                Some(mut l) => {
                    // Not released through its Drop (that would lock the state again).
                    l.key = None;
                    unwanted.push(key);
                }
            }
        }
    }
    if !unwanted.is_empty() {
        timed(unlock(conn, &unwanted)).await?;
    }
    Ok(())
}

/// Answers claims one by one (rare) and checkpoint writes as one statement. A request of an
/// older session is fenced without asking the database.
async fn requests_round(
    conn: &mut PgConnection,
    generation: u64,
    batch: Vec<Req>,
) -> Result<(), String> {
    let mut writes = Vec::new();
    for req in batch {
        match req {
            Req::Claim {
                generation: g,
                stream_id,
                reply,
            } => {
                if g != generation {
                    let _ = reply.send(Err("the lock session was lost".into()));
                    continue;
                }
                let r = timed(claim(conn, stream_id)).await;
                let failed = r.as_ref().err().cloned();
                let _ = reply.send(r);
                if let Some(e) = failed {
                    return Err(e);
                }
            }
            Req::Checkpoint {
                generation: g,
                stream_id,
                epoch,
                position,
                reply,
            } => {
                if g != generation {
                    let _ = reply.send(Ok(false));
                    continue;
                }
                writes.push((stream_id, epoch, position, reply));
            }
        }
    }
    if writes.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = writes.iter().map(|w| w.0).collect();
    let epochs: Vec<i64> = writes.iter().map(|w| w.1).collect();
    let positions: Vec<i64> = writes.iter().map(|w| w.2).collect();
    let moved = timed(write_checkpoints(conn, ids, epochs, positions)).await;
    match moved {
        Ok(moved) => {
            for (id, _, _, reply) in writes {
                let _ = reply.send(Ok(moved.contains(&id)));
            }
            Ok(())
        }
        Err(e) => {
            for (_, _, _, reply) in writes {
                let _ = reply.send(Err(e.clone()));
            }
            Err(e)
        }
    }
}
