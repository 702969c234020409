//! The connection loop of the ingest and admin HTTP servers: what `axum::serve` does, plus the
//! limits a server facing untrusted clients needs.
//!
//! HTTP/1.1 only: hyper's HTTP/2 server has no header read timeout, and its version detection
//! (`auto`) waits without a deadline for a client's first bytes, so a connection that sends
//! nothing would hold its slot for ever. Clients reach Weir over HTTP/1.1 (plain-text HTTP/2,
//! h2c, is not offered by common clients without an explicit prior-knowledge switch).
//!
//! - **Header read timeout** (`--header-read-timeout`): a connection that has not sent a
//!   request's complete headers this long after it became ready for one is closed (hyper's
//!   HTTP/1 `header_read_timeout`). This also ends keep-alive connections idle that long.
//! - **Connection cap** (`--max-connections`, per worker and port): the server accepts a
//!   connection only while it holds fewer than the cap. Over it, new connections wait in the
//!   kernel's accept backlog (and, once that is full, their SYNs go unanswered and clients
//!   retry) instead of being accepted and closed: closing would make every client reconnect
//!   at once, while waiting turns into an ordinary connect delay that ends as soon as a slot
//!   frees (slow clients free theirs within the header or body timeout).
//! - **Body read timeout** (`--body-read-timeout`) and **body memory** (`--body-memory`) are
//!   not enforced here but where a body is read ([`crate::data::http`],
//!   [`crate::data::ingest::budget`]): a publish whose body has not arrived whole in that time
//!   is answered 408, one that finds the worker's body memory spent 503, and nothing of either
//!   is stored.
//! - **Graceful shutdown with a deadline** (`--drain-timeout`): when `shutdown` is cancelled
//!   the listener closes; connections with no request in progress (idle, or still sending
//!   headers) are closed at once; the others finish their request (keep-alive off) and are
//!   closed when the drain deadline passes, whatever they are doing (a publish cut there was
//!   not acknowledged, so its client retries it elsewhere; dedup makes that safe).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::server::conn::http1::Builder;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// The most a connection's read buffer grows to (hyper's default is about 400 KiB). Headers
/// larger than this are refused (431); 64 KiB is twice nginx's default header allowance and
/// keeps a client that sends huge headers slowly to 64 KiB of memory instead of 400.
const MAX_BUF_SIZE: usize = 64 * 1024;

/// The limits of one server (both ports use the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_connections: usize,
    pub drain_timeout: Duration,
    /// Bytes of publish bodies in flight beyond each one's free part (ingest port).
    pub body_memory: usize,
    /// Live followers (`follow=true`) of the ingest port.
    pub follow: FollowLimits,
}

/// The bounds of live follows (`?follow=true`, Server-Sent Events) on the ingest port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FollowLimits {
    /// Followers the worker serves at once; more are answered 503.
    pub max_followers: usize,
    /// Bytes of events waiting for one follower's connection.
    pub buffer: usize,
    /// How long a follower's buffer may stay full before it is disconnected.
    pub stall_timeout: Duration,
    /// Interval of the `: keep-alive` comments sent while no event comes.
    pub heartbeat: Duration,
}

impl Default for FollowLimits {
    fn default() -> Self {
        FollowLimits {
            max_followers: 256,
            buffer: 256 * 1024,
            stall_timeout: Duration::from_secs(30),
            heartbeat: Duration::from_secs(15),
        }
    }
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 4096,
            drain_timeout: Duration::from_secs(15),
            body_memory: 32 * 1024 * 1024,
            follow: FollowLimits::default(),
        }
    }
}

/// The flags of [`ServerLimits`], shared by `weir run` and `weir operator`.
#[derive(clap::Args, Clone, Debug)]
pub struct ServerArgs {
    /// Close a connection that has not sent a request's complete headers this long after it
    /// became ready for one (also the keep-alive idle timeout). 30 s is hyper's default and
    /// outlasts any honest client on a slow network; put a proxy's upstream idle timeout
    /// below it.
    #[arg(long, env = "WEIR_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// Answer 408 to a publish whose body has not arrived whole this long after its headers.
    /// 30 s carries a 4 MiB request (the default maxRequestBytes) at about 1 Mbit/s.
    #[arg(long, env = "WEIR_BODY_READ_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub body_read_timeout: Duration,
    /// Connections each port holds at once; more wait in the kernel's accept backlog. A
    /// connection waiting for headers costs about 26 KiB (measured), so 4096 of them about
    /// 100 MiB, a fifth of the chart's 512 MiB memory limit.
    #[arg(long, env = "WEIR_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// After SIGTERM, how long requests in progress may take before their connections are
    /// closed. 15 s covers the request timeout (10 s) of a publish waiting for its commit and
    /// leaves the rest of the Pod's grace period (45 s in the chart) to draining batchers.
    #[arg(long, env = "WEIR_DRAIN_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Memory for publish bodies in flight, per worker: beyond its first 16 KiB, a body draws
    /// from this as it arrives; one that finds it spent is answered 503. 32 MiB holds
    /// thirty-two 1 MiB requests (the default batching.maxBytes) or eight of the default
    /// maxRequestBytes (4 MiB) being read at once, and keeps slow clients to a sixteenth of
    /// the chart's 512 MiB memory limit.
    #[arg(long, env = "WEIR_BODY_MEMORY", default_value = "32MiB", value_parser = parse_size)]
    pub body_memory: usize,
    /// Live followers (`follow=true`) served at once per worker; more are answered 503 with
    /// `Retry-After`. Each may hold `--follow-buffer` of events and hyper's 64 KiB write
    /// buffer, so 256 of them hold at most ~80 MiB, a sixth of the chart's 512 MiB memory
    /// limit; each also reads the store once per append it is woken for.
    #[arg(long, env = "WEIR_MAX_FOLLOWERS", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_followers: u32,
    /// Events waiting for one follower's connection, in bytes. 256 KiB is hundreds of
    /// typical events: a reader that keeps up never fills it, one that stalls is found out
    /// before it holds much.
    #[arg(long, env = "WEIR_FOLLOW_BUFFER", default_value = "256KiB", value_parser = parse_size)]
    pub follow_buffer: usize,
    /// A follower whose buffer stays full this long is disconnected (with a last message
    /// telling it to reconnect with `Last-Event-ID`). 30 s outlasts a client's pauses (a
    /// garbage collection, a slow disk) but not a client that stopped reading.
    #[arg(long, env = "WEIR_FOLLOW_STALL_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub follow_stall_timeout: Duration,
    /// Interval of the `: keep-alive` comments sent to a follower while no event comes. 15 s
    /// is half the shortest idle timeout common proxies and load balancers use (30 s; nginx
    /// and cloud load balancers default to 60 s), so an idle follow is never closed by one.
    #[arg(long, env = "WEIR_FOLLOW_HEARTBEAT", default_value = "15s", value_parser = parse_duration)]
    pub follow_heartbeat: Duration,
}

impl ServerArgs {
    pub fn limits(&self) -> ServerLimits {
        ServerLimits {
            header_read_timeout: self.header_read_timeout,
            body_read_timeout: self.body_read_timeout,
            max_connections: self.max_connections as usize,
            drain_timeout: self.drain_timeout,
            body_memory: self.body_memory,
            follow: FollowLimits {
                max_followers: self.max_followers as usize,
                buffer: self.follow_buffer,
                stall_timeout: self.follow_stall_timeout,
                heartbeat: self.follow_heartbeat,
            },
        }
    }
}

fn parse_size(s: &str) -> Result<usize, String> {
    match crate::topology::units::parse_size(s) {
        Ok(0) => Err("must be more than 0 bytes".into()),
        Ok(n) => usize::try_from(n).map_err(|_| format!("{s} is too large")),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    match crate::topology::units::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be more than 0s".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// Serves `app` on `listener` until `shutdown` is cancelled, then drains as the module doc
/// says. `name` names the server in logs.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    shutdown: CancellationToken,
    name: &'static str,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut builder = Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_BUF_SIZE);
    // One task per connection; finished ones are reaped before each accept, so the set holds
    // at most `max_connections` live tasks.
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => break, // the semaphore is never closed
            },
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    accept_error(name, &e, &shutdown).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // Answers go out as soon as they are written: with Nagle's algorithm on, a response
        // written in more than one segment can wait for the client's delayed ACK (40 ms on
        // Linux) before its last part leaves. Not set, it costs latency, never correctness:
        // logged, not fatal.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(server = name, error = %e, "TCP_NODELAY not set");
        }
        conns.spawn(connection(
            builder.clone(),
            stream,
            peer,
            app.clone(),
            shutdown.clone(),
            limits.drain_timeout,
            slot,
        ));
    }
    drop(listener);
    // Every connection ends by itself within the drain timeout; the margin is for the
    // scheduling of hundreds of tasks, and the abort for one that somehow does not.
    let deadline = tokio::time::Instant::now() + limits.drain_timeout + Duration::from_secs(1);
    while let Ok(Some(_)) = tokio::time::timeout_at(deadline, conns.join_next()).await {}
    if !conns.is_empty() {
        tracing::warn!(
            server = name,
            connections = conns.len(),
            "connections still open after the drain timeout; closing them"
        );
    }
    conns.shutdown().await;
    Ok(())
}

/// Errors of one accepted connection (reset before accept) are the client's and skipped;
/// others (too many open files) are waited out for a second so the loop does not spin.
async fn accept_error(name: &str, e: &std::io::Error, shutdown: &CancellationToken) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::warn!(server = name, error = %e, "accepting a connection");
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        _ = shutdown.cancelled() => {}
    }
}

/// Put in every request's extensions: cancelling it closes the request's connection at once,
/// whatever is being written. A response that must end a client that stopped reading (a
/// stalled follower) uses it: hyper would otherwise wait for ever to write the rest.
#[derive(Clone, Debug, Default)]
pub struct CloseConnection(pub CancellationToken);

/// Counts the requests of a connection that are being handled or answered.
struct InProgress(Arc<AtomicUsize>);

impl InProgress {
    fn start(count: &Arc<AtomicUsize>) -> InProgress {
        count.fetch_add(1, Ordering::AcqRel);
        InProgress(count.clone())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn connection(
    builder: Builder,
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    shutdown: CancellationToken,
    drain_timeout: Duration,
    _slot: OwnedSemaphorePermit,
) {
    let in_progress = Arc::new(AtomicUsize::new(0));
    let counter = in_progress.clone();
    let close = CloseConnection::default();
    let closer = close.clone();
    let service = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
        req.extensions_mut().insert(closer.clone());
        // From the complete headers until the response body is written (the guard rides
        // in the body): a shutdown lets exactly these finish.
        let guard = InProgress::start(&counter);
        let app = app.clone();
        async move {
            let response = app.oneshot(req).await;
            response.map(|r| {
                r.map(|body| {
                    Body::new(body.map_frame(move |frame| {
                        let _ = &guard;
                        frame
                    }))
                })
            })
        }
    });
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let finished = tokio::select! {
        r = conn.as_mut() => Some(r),
        _ = shutdown.cancelled() => None,
        // Dropping the connection closes it.
        _ = close.0.cancelled() => return,
    };
    if let Some(Err(e)) = &finished {
        // Header timeouts, resets and malformed requests: the client's doing.
        tracing::debug!(%peer, error = %e, "connection ended");
    }
    if finished.is_some() || in_progress.load(Ordering::Acquire) == 0 {
        return; // dropping the connection closes it
    }
    conn.as_mut().graceful_shutdown();
    if tokio::time::timeout(drain_timeout, conn).await.is_err() {
        tracing::debug!(%peer, "request cut at the drain timeout");
    }
}
