//! Change notification for one database: a single `LISTEN` session per database and process,
//! fanned out inside the worker.
//!
//! Every append sends `NOTIFY weir_appended '<stream id>:<head>'` and
//! `NOTIFY weir_subjects '<json>'` (see `append.rs`). Relays want the first for their own
//! stream, the read-side caches want the second. A session per relay (or per cache) would
//! cost a connection per resource; this one session costs one per database, whatever the
//! number of streams.
//!
//! - `weir_appended` goes to a `watch` channel per stream id: it keeps only the highest head
//!   announced, so a relay that is busy never makes the notifier queue anything.
//! - `weir_subjects` goes to a bounded `broadcast` channel with the connection's state changes;
//!   a receiver that falls behind is told it lagged (a cache then clears itself).
//! - Notifications sent while the session is down are lost: every (re)connect counts one more
//!   resync in each stream's watch (read the store, do not trust what you were told), and
//!   broadcast receivers get [`Note::Connected`].
//!
//! The session is made like the pool's connections (to the server the pool targets now) and
//! follows the pool after a database failover.

use crate::poison::MutexExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

/// Channel of `<stream id>:<head>` notifications.
pub const APPENDED_CHANNEL: &str = "weir_appended";
/// Channel of the subjects and correlation ids of each append (cache invalidation).
pub const SUBJECTS_CHANNEL: &str = "weir_subjects";
/// What a stream's watch says: the highest head announced, and how many times notifications
/// may have been missed (a receiver that sees this number change reads the store).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Announced {
    pub resyncs: u64,
    pub head: i64,
}

/// Subject notes kept for slow receivers. A note is at most ~7 KB (the append caps its
/// payload), so 1024 bound the channel to a few MiB; a receiver further behind is told it
/// lagged and clears its caches, which is always correct.
const NOTES: usize = 1024;
/// Limit of one connection attempt: a failover during an outage is picked up by the next
/// attempt instead of waiting for the old server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a connected session checks that its pool still targets the same server.
const FAILOVER_CHECK: Duration = Duration::from_millis(250);
/// Reconnect backoff: from 200 ms, doubling, capped at 5 s, with jitter.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What broadcast receivers are told.
#[derive(Clone, Debug)]
pub enum Note {
    /// The session (re)connected: notifications sent before were lost.
    Connected,
    /// The session is down: nothing is heard until [`Note::Connected`].
    Disconnected,
    /// A `weir_subjects` payload.
    Subjects(Arc<str>),
}

/// The notifier of one database. Cheap to clone; the session starts on first use (it needs a
/// Tokio runtime) and stops with [`Notifier::close`].
#[derive(Clone)]
pub struct Notifier {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    heads: Mutex<HashMap<i64, watch::Sender<Announced>>>,
    /// Connections made so far: the resync count a new watch starts from.
    resyncs: std::sync::atomic::AtomicU64,
    notes: broadcast::Sender<Note>,
    live: AtomicBool,
    started: AtomicBool,
    cancel: CancellationToken,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("live", &self.live())
            .finish_non_exhaustive()
    }
}

impl Notifier {
    pub fn new(pool: PgPool) -> Notifier {
        Notifier {
            inner: Arc::new(Inner {
                pool,
                heads: Mutex::new(HashMap::new()),
                resyncs: std::sync::atomic::AtomicU64::new(0),
                notes: broadcast::channel(NOTES).0,
                live: AtomicBool::new(false),
                started: AtomicBool::new(false),
                cancel: CancellationToken::new(),
            }),
        }
    }

    /// The heads announced for `stream_id`, and the resyncs (every reconnect).
    pub fn appended(&self, stream_id: i64) -> watch::Receiver<Announced> {
        self.start();
        let mut heads = self.inner.heads.locked();
        // Streams whose relays stopped are forgotten here (not per notification): a sweep per
        // registration is O(streams), a few thousand steps at most.
        heads.retain(|_, tx| tx.receiver_count() > 0);
        heads
            .entry(stream_id)
            .or_insert_with(|| {
                watch::channel(Announced {
                    resyncs: self.inner.resyncs.load(Ordering::Acquire),
                    head: 0,
                })
                .0
            })
            .subscribe()
    }

    /// The subject notes and connection changes, from now on.
    pub fn notes(&self) -> broadcast::Receiver<Note> {
        self.start();
        self.inner.notes.subscribe()
    }

    /// True while the session listens.
    pub fn live(&self) -> bool {
        self.inner.live.load(Ordering::Acquire)
    }

    /// Stops the session (shutdown).
    pub fn close(&self) {
        self.inner.cancel.cancel();
    }

    fn start(&self) {
        if self.inner.started.swap(true, Ordering::AcqRel) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(run(self.inner.clone()));
            }
            // No runtime (a unit test building plans): started on the next call that has one.
            Err(_) => self.inner.started.store(false, Ordering::Release),
        }
    }
}

/// `<stream id>:<head>`.
fn parse_appended(payload: &str) -> Option<(i64, i64)> {
    let (id, head) = payload.split_once(':')?;
    Some((id.parse().ok()?, head.parse().ok()?))
}

impl Inner {
    fn dispatch(&self, channel: &str, payload: &str) {
        if channel == APPENDED_CHANNEL {
            if let Some((id, head)) = parse_appended(payload)
                && let Some(tx) = self.heads.locked().get(&id)
            {
                tx.send_if_modified(|a| {
                    // A lower head is old news (notifications of concurrent commits can
                    // arrive out of order).
                    if a.head >= head {
                        return false;
                    }
                    a.head = head;
                    true
                });
            }
        } else if channel == SUBJECTS_CHANNEL && self.notes.receiver_count() > 0 {
            let _ = self.notes.send(Note::Subjects(Arc::from(payload)));
        }
    }

    fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::Release);
        let _ = self.notes.send(if live {
            Note::Connected
        } else {
            Note::Disconnected
        });
        if live {
            let resyncs = self.resyncs.fetch_add(1, Ordering::AcqRel) + 1;
            for tx in self.heads.locked().values() {
                tx.send_modify(|a| a.resyncs = resyncs);
            }
        }
    }
}

async fn run(inner: Arc<Inner>) {
    let mut failures = 0u32;
    let mut last_error: Option<String> = None;
    loop {
        // The server the pool targets now: after a failover, the new primary, where the
        // appends' notifications are sent from then on.
        let target = inner.pool.connect_options();
        let connect = async {
            // A pool of one, of its own: never a connection of the store's pool, and
            // `PgListener` needs a pool to connect through.
            let own = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .max_lifetime(None)
                .idle_timeout(None)
                .acquire_timeout(CONNECT_TIMEOUT)
                .connect_lazy_with((*target).clone());
            let mut l = sqlx::postgres::PgListener::connect_with(&own).await?;
            // A lost connection ends our loop instead of reconnecting silently: what was sent
            // meanwhile is lost, and the receivers must hear about it.
            l.eager_reconnect(false);
            l.listen_all([APPENDED_CHANNEL, SUBJECTS_CHANNEL]).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let connected = tokio::select! {
            _ = inner.cancel.cancelled() => return,
            r = connect => r,
        };
        match connected {
            Ok(mut l) => {
                if failures > 0 {
                    tracing::info!("database notifications: listening again");
                }
                failures = 0;
                last_error = None;
                inner.set_live(true);
                let mut check = tokio::time::interval(FAILOVER_CHECK);
                loop {
                    let next = tokio::select! {
                        _ = inner.cancel.cancelled() => {
                            inner.live.store(false, Ordering::Release);
                            return;
                        }
                        _ = check.tick() => {
                            if Arc::ptr_eq(&target, &inner.pool.connect_options()) {
                                continue;
                            }
                            tracing::warn!("database failover: the notification session follows its pool");
                            break;
                        }
                        n = l.try_recv() => n,
                    };
                    match next {
                        Ok(Some(n)) => inner.dispatch(n.channel(), n.payload()),
                        Ok(None) => break,
                        Err(e) => {
                            last_error = Some(e.to_string());
                            tracing::warn!(error = %e, "database notifications: session lost");
                            break;
                        }
                    }
                }
                inner.set_live(false);
            }
            Err(e) => {
                // Said once per distinct error, not once per attempt.
                let msg = e.to_string();
                if last_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(error = %msg, "database notifications: cannot listen");
                    last_error = Some(msg);
                }
            }
        }
        failures = failures.saturating_add(1);
        let delay = crate::data::backoff(BACKOFF_BASE, BACKOFF_MAX, failures);
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_payloads_name_stream_and_head() {
        assert_eq!(parse_appended("7:120"), Some((7, 120)));
        assert_eq!(parse_appended("7"), None);
        assert_eq!(parse_appended("x:1"), None);
        assert_eq!(parse_appended("7:x"), None);
    }

    #[tokio::test]
    async fn heads_keep_the_highest_and_reconnects_count_resyncs() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .unwrap();
        let n = Notifier::new(pool);
        n.inner.started.store(true, Ordering::Release); // no session in this test
        let mut rx = n.appended(7);
        let first = *rx.borrow_and_update();
        n.inner.dispatch(APPENDED_CHANNEL, "7:10");
        assert_eq!(
            *rx.borrow_and_update(),
            Announced {
                resyncs: first.resyncs,
                head: 10
            }
        );
        n.inner.dispatch(APPENDED_CHANNEL, "7:9");
        assert!(!rx.has_changed().unwrap(), "an older head is not news");
        n.inner.dispatch(APPENDED_CHANNEL, "8:99");
        assert!(
            !rx.has_changed().unwrap(),
            "another stream's head is not ours"
        );
        n.inner.set_live(true);
        let a = *rx.borrow_and_update();
        assert_eq!(a.resyncs, first.resyncs + 1, "a reconnect is a resync");
        assert_eq!(a.head, 10);
        n.inner.dispatch(APPENDED_CHANNEL, "7:12");
        assert_eq!(rx.borrow_and_update().head, 12);
        // A stream nobody watches is forgotten at the next registration.
        drop(rx);
        let _other = n.appended(8);
        assert!(!n.inner.heads.locked().contains_key(&7));
    }
}
