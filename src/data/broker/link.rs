//! One AMQP connection of a broker URL (the data or the topology connection), (re)opened on
//! demand with capped, jittered exponential backoff shared by every user of the connection,
//! and replaced by a fresh one once it has opened as many channels as it has channel numbers
//! (see [`Link::channel`]).
//!
//! lapin's own connection recovery is not used: it is recent, and a publisher needs to know
//! exactly which messages were confirmed on the connection that broke in order to send the
//! others again. A broken connection is simply replaced by a new one on the next use.

use crate::poison::MutexExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::{Channel, Connection, ConnectionProperties};
use tokio::time::Instant;

use super::error::{BrokerError, classify, parse_url};
use super::tls::{Transport, redacted};
use crate::topology::TlsPlan;

/// First delay after a failed connection attempt.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest delay between attempts: RabbitMQ usually restarts within seconds, and a 503
/// answered meanwhile tells publishers to retry, so waiting longer buys nothing.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// An unreachable host can leave a TCP connect hanging; nobody waits longer than this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The delay before attempt `failures + 1`, given `failures` consecutive failures (≥ 1):
/// `BACKOFF_BASE × 2^(failures-1)` capped at `BACKOFF_MAX`, then scaled by `jitter`
/// (expected in `0.5..=1.0`) so that many processes do not reconnect in lock-step.
pub(crate) fn backoff_delay(failures: u32, jitter: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let delay = BACKOFF_BASE.saturating_mul(1u32 << exp).min(BACKOFF_MAX);
    delay.mul_f64(jitter.clamp(0.5, 1.0))
}

/// One open connection and how many channels it has handed out.
pub(crate) struct Current {
    pub(crate) conn: Arc<Connection>,
    /// Tells this connection from the ones before it (see [`Link::current_id`]).
    pub(crate) id: u64,
    /// Channels opened (or attempted) on this connection.
    opened: AtomicUsize,
    /// How many channels this connection may open: its negotiated `channel_max`. See
    /// [`Link::channel`] for why a connection never opens more.
    budget: usize,
}

struct State {
    conn: Option<Arc<Current>>,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<BrokerError>,
    /// Connections opened so far (the next one's [`Current::id`]).
    opened: u64,
}

/// The connection to one broker URL with one TLS plan.
pub(crate) struct Link {
    url: String,
    /// Extra trust and client certificate for `amqps://` (`spec.broker.tls`).
    tls: Arc<TlsPlan>,
    /// How the connection is made (plain TCP or TLS), built on the first attempt: building it
    /// reads the system's CA roots, which is not worth repeating on every reconnect.
    transport: Mutex<Option<Transport>>,
    name: String,
    /// Serialises connection attempts, so that many tasks noticing a broken connection at
    /// once open one new connection rather than one each.
    state: tokio::sync::Mutex<State>,
    /// The current connection, readable without waiting for an attempt in progress.
    current: Mutex<Option<Arc<Current>>>,
    /// The last failure of the connection itself (cannot connect, connection lost), which
    /// every user of the link shares; deadline errors name it. Never a channel-level
    /// refusal (a 404, a 406): that belongs to the one operation that caused it, and naming
    /// it here would report one resource's error as every other resource's.
    last_error: Mutex<Option<BrokerError>>,
}

impl Link {
    pub(crate) fn new(url: String, tls: Arc<TlsPlan>, name: String) -> Link {
        Link {
            url,
            tls,
            transport: Mutex::new(None),
            name,
            state: tokio::sync::Mutex::new(State {
                conn: None,
                failures: 0,
                retry_at: None,
                last_error: None,
                opened: 0,
            }),
            current: Mutex::new(None),
            last_error: Mutex::new(None),
        }
    }

    /// True while a connection is open.
    pub(crate) fn is_connected(&self) -> bool {
        self.current
            .locked()
            .as_ref()
            .is_some_and(|c| c.conn.status().connected())
    }

    /// The id of the connection new channels are opened on, if any: a channel opened on
    /// another one belongs to a connection that was retired or lost.
    pub(crate) fn current_id(&self) -> Option<u64> {
        self.current.locked().as_ref().map(|c| c.id)
    }

    /// The most recent failure of the connection itself, for error messages.
    pub(crate) fn last_error(&self) -> Option<BrokerError> {
        self.last_error.locked().clone()
    }

    /// When the next connection attempt is allowed, if we are backing off.
    pub(crate) async fn retry_at(&self) -> Option<Instant> {
        self.state.lock().await.retry_at
    }

    /// The open connection, or a new one. While backing off after a failed attempt, answers
    /// the last error at once instead of trying again.
    pub(crate) async fn connection(&self) -> Result<Arc<Connection>, BrokerError> {
        self.current(None).await.map(|c| c.conn.clone())
    }

    /// The open connection, or a new one if there is none or it is `replace` (retired:
    /// healthy, but no new channel may be opened on it).
    async fn current(&self, replace: Option<&Arc<Current>>) -> Result<Arc<Current>, BrokerError> {
        let mut st = self.state.lock().await;
        if let Some(cur) = &st.conn {
            let retired = replace.is_some_and(|r| Arc::ptr_eq(r, cur));
            if !retired && cur.conn.status().connected() {
                return Ok(cur.clone());
            }
            if retired {
                // Its channels keep it open until they are dropped; lapin closes it then.
                tracing::debug!(connection = %self.name, channels = cur.budget,
                    "RabbitMQ connection opened all the channels it may; using a new one");
            } else {
                tracing::warn!(connection = %self.name, "RabbitMQ connection lost; reconnecting");
            }
            st.conn = None;
            *self.current.locked() = None;
        }
        if let Some(at) = st.retry_at
            && Instant::now() < at
        {
            return Err(st
                .last_error
                .clone()
                .unwrap_or_else(|| BrokerError::Unavailable("reconnecting".into())));
        }
        let uri = parse_url(&self.url)?;
        let target = redacted(&uri);
        let props = ConnectionProperties::default().with_connection_name(self.name.clone().into());
        let attempt = match self.transport(&uri) {
            Ok(transport) => {
                tokio::time::timeout(CONNECT_TIMEOUT, transport.connect(uri, props)).await
            }
            // A URL that cannot work is not worth retrying; a TLS set-up that failed (no CA
            // roots readable) is retried with backoff like any connection failure.
            Err(e @ BrokerError::InvalidUrl(_)) => return Err(e),
            Err(e) => Ok(Err(e)),
        };
        let err = match attempt {
            Ok(Ok(conn)) => {
                if st.failures > 0 {
                    tracing::info!(connection = %self.name, "RabbitMQ connection re-established");
                }
                // 0 would mean "no limit"; lapin then numbers channels up to u16::MAX.
                let budget = match conn.configuration().channel_max() {
                    0 => usize::from(u16::MAX),
                    n => usize::from(n),
                };
                st.opened += 1;
                let cur = Arc::new(Current {
                    conn: Arc::new(conn),
                    id: st.opened,
                    opened: AtomicUsize::new(0),
                    budget,
                });
                st.conn = Some(cur.clone());
                st.failures = 0;
                st.retry_at = None;
                st.last_error = None;
                *self.current.locked() = Some(cur.clone());
                *self.last_error.locked() = None;
                return Ok(cur);
            }
            Ok(Err(e)) => e,
            Err(_) => BrokerError::Unavailable(format!(
                "connect to {target}: no answer within {}s",
                CONNECT_TIMEOUT.as_secs()
            )),
        };
        st.failures = st.failures.saturating_add(1);
        let delay = backoff_delay(st.failures, rand::random_range(0.5..=1.0));
        st.retry_at = Some(Instant::now() + delay);
        st.last_error = Some(err.clone());
        *self.last_error.locked() = Some(err.clone());
        tracing::warn!(
            connection = %self.name, error = %err, retry_in_ms = delay.as_millis() as u64,
            "cannot connect to RabbitMQ"
        );
        Err(err)
    }

    /// The transport for `uri`, built on first use and kept.
    fn transport(&self, uri: &lapin::uri::AMQPUri) -> Result<Transport, BrokerError> {
        let mut cached = self.transport.locked();
        if let Some(t) = cached.as_ref() {
            return Ok(t.clone());
        }
        let t = Transport::new(uri, &self.tls)?;
        *cached = Some(t.clone());
        Ok(t)
    }

    /// Starts a connection attempt on a separate task unless one is already under way.
    pub(crate) fn connect_in_background(self: &Arc<Self>) {
        let link = self.clone();
        tokio::spawn(async move {
            // Someone holding the lock is connecting (or about to); no need to queue up.
            if link.state.try_lock().is_ok() {
                let _ = link.connection().await;
            }
        });
    }

    /// Records `err` as the connection's failure if the current connection is in fact down:
    /// an error of a channel whose connection still stands is that channel's alone.
    pub(crate) fn record_if_disconnected(&self, err: &BrokerError) {
        if !self.is_connected() {
            *self.last_error.locked() = Some(err.clone());
        }
    }

    /// Forgets `cur` if it is still the current connection (a channel could not be opened
    /// on it although it claims to be connected), so that the next use reconnects.
    async fn discard(&self, cur: &Arc<Current>) {
        let mut st = self.state.lock().await;
        if st.conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, cur)) {
            st.conn = None;
            *self.current.locked() = None;
        }
    }

    /// A new channel on the current (or a new) connection, with the id of that connection.
    ///
    /// Why a connection opens at most `channel_max` channels: lapin numbers channels from a
    /// sequence that wraps at `channel_max`, and it remembers the error of every channel the
    /// broker closed (a 404 of a passive declare, a 406) *by channel number*, for the life of
    /// the connection. A channel opened later under a number that had been closed that way
    /// fails at once with the old error — another resource's "no queue 'weir-retry.…'" — and
    /// stays in lapin's channel table for good (it never reached the broker, so it is never
    /// closed), until no number is left. So the numbers of one connection are never reused:
    /// after `channel_max` channels, new channels go to a new connection, and the old one
    /// closes when its last channel is dropped.
    pub(crate) async fn channel(&self) -> Result<(Channel, u64), BrokerError> {
        let mut replace: Option<Arc<Current>> = None;
        // Two tries: the second on a fresh connection, whose numbers are all unused.
        for _ in 0..2 {
            let cur = self.current(replace.as_ref()).await?;
            if cur.opened.fetch_add(1, Ordering::Relaxed) >= cur.budget {
                replace = Some(cur);
                continue;
            }
            match tokio::time::timeout(CONNECT_TIMEOUT, cur.conn.create_channel()).await {
                Ok(Ok(ch)) => return Ok((ch, cur.id)),
                Ok(Err(e)) => {
                    let err = classify("open channel", &e);
                    if matches!(err, BrokerError::Protocol { .. }) {
                        // The broker never refuses `channel.open` with a channel-level
                        // error: this is an error lapin kept from an earlier channel under
                        // the same number (see above). It is not this caller's; retire the
                        // connection and try a fresh one.
                        tracing::warn!(connection = %self.name, channel_error = %err,
                            "RabbitMQ connection reused a closed channel number; using a new connection");
                        replace = Some(cur);
                        continue;
                    }
                    if !cur.conn.status().connected() {
                        *self.last_error.locked() = Some(err.clone());
                    }
                    if !cur.conn.status().connected() || matches!(err, BrokerError::Unavailable(_))
                    {
                        self.discard(&cur).await;
                    }
                    return Err(err);
                }
                Err(_) => {
                    self.discard(&cur).await;
                    return Err(BrokerError::Unavailable("open channel: no answer".into()));
                }
            }
        }
        Err(BrokerError::Unavailable(
            "open channel: no usable channel number on a new connection".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff_delay(1, 1.0), Duration::from_millis(100));
        assert_eq!(backoff_delay(2, 1.0), Duration::from_millis(200));
        assert_eq!(backoff_delay(4, 1.0), Duration::from_millis(800));
        assert_eq!(backoff_delay(7, 1.0), Duration::from_secs(5));
        assert_eq!(backoff_delay(1000, 1.0), Duration::from_secs(5));
        assert_eq!(backoff_delay(1, 0.5), Duration::from_millis(50));
        // Jitter outside its range is clamped rather than trusted.
        assert_eq!(backoff_delay(3, 7.0), Duration::from_millis(400));
    }

    #[tokio::test]
    async fn refused_connection_backs_off_and_reports_the_cause() {
        // Port 1 on loopback: nothing listens there, the connect fails at once.
        let link = Link::new(
            "amqp://guest:guest@127.0.0.1:1/%2f".into(),
            Arc::default(),
            "test".into(),
        );
        let err = link.connection().await.unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(!link.is_connected());
        let at = link.retry_at().await.expect("a retry time after a failure");
        // While backing off (at least 50 ms), no new attempt is made: the same error comes
        // back at once.
        assert_eq!(link.connection().await.unwrap_err(), err);
        assert_eq!(link.retry_at().await, Some(at));
        assert_eq!(link.last_error(), Some(err));
        assert!(at <= Instant::now() + BACKOFF_BASE);
    }

    #[tokio::test]
    async fn invalid_url_is_not_transient() {
        let link = Link::new("amqp:nope".into(), Arc::default(), "test".into());
        let err = link.connection().await.unwrap_err();
        assert!(matches!(err, BrokerError::InvalidUrl(_)), "{err}");
        assert!(!err.is_transient());
    }
}
