//! The benchmark's sink: an in-process HTTP server that takes CloudEvents in binary mode,
//! timestamps each arrival and keeps the end-to-end latency of every event, plus the raw
//! HTTP POST loop the baselines feed it with.
//!
//! Latency needs one clock for the publish and the arrival. Both happen in this process (the
//! `weir run` child only carries the stamp along as the `benchsent` extension), so the clock
//! is [`stamp_of`]: microseconds on the monotonic clock since a process-wide epoch.

use crate::poison::MutexExt;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use http::{HeaderMap, StatusCode};
use tokio::task::JoinHandle;

use super::BenchError;

/// The CloudEvents extension carrying the publish time ([`now_us`] when it was sent).
pub const SENT_EXTENSION: &str = "benchsent";
/// Highest latency recorded, in microseconds: a minute. Anything slower is clamped.
const MAX_LATENCY_US: u64 = 60_000_000;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// `at` as microseconds since the process's benchmark epoch (0 for instants before it).
pub fn stamp_of(at: Instant) -> u64 {
    at.saturating_duration_since(epoch()).as_micros() as u64
}

fn new_histogram() -> Result<Histogram<u64>, BenchError> {
    Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3)
        .map_err(|e| BenchError::Pipeline(e.to_string()))
}

/// What the sink saw of the events whose id starts with the current run's prefix. `seen`
/// holds one id per event of the run, so it is bounded by the run's size (`--events`;
/// 100,000 ids are a few MB).
struct Tally {
    prefix: String,
    seen: HashSet<String>,
    latency: Histogram<u64>,
    /// From the event's commit (`ce-weirrecordedtime`, PostgreSQL's clock) to its arrival
    /// (this machine's clock: the same one, as the bench runs beside PostgreSQL).
    after_commit: Histogram<u64>,
    duplicates: usize,
    first: Option<Instant>,
    last: Option<Instant>,
}

struct State {
    tally: Mutex<Tally>,
    /// Distinct events of the current run (mirrors `tally.seen.len()` for lock-free polling).
    delivered: AtomicUsize,
}

/// What [`Sink::take`] returns about one run.
pub struct Arrivals {
    pub delivered: usize,
    pub duplicates: usize,
    /// End-to-end latency of each first arrival, in microseconds.
    pub latency: Histogram<u64>,
    /// Commit → arrival (relay, broker and delivery) of each first arrival, in microseconds.
    pub after_commit: Histogram<u64>,
    pub first: Option<Instant>,
    pub last: Option<Instant>,
}

pub struct Sink {
    pub url: String,
    state: Arc<State>,
    server: JoinHandle<()>,
}

impl Sink {
    /// Starts the sink on a free local port.
    pub async fn start() -> Result<Sink, BenchError> {
        let _ = epoch();
        let state = Arc::new(State {
            tally: Mutex::new(Tally {
                prefix: String::new(),
                seen: HashSet::new(),
                latency: new_histogram()?,
                after_commit: new_histogram()?,
                duplicates: 0,
                first: None,
                last: None,
            }),
            delivered: AtomicUsize::new(0),
        });
        let st = state.clone();
        // No connection or request limit here: the senders bound their own concurrency
        // (Weir's `consumers`, the baselines' `DELIVERY_CONSUMERS`), which is what is measured.
        let app = axum::Router::new().route(
            "/",
            axum::routing::post(move |headers: HeaderMap, _body: bytes::Bytes| {
                let st = st.clone();
                async move {
                    receive(&st, &headers);
                    StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("bench sink stopped: {e}");
            }
        });
        Ok(Sink {
            url: format!("http://{addr}/"),
            state,
            server,
        })
    }

    /// Starts counting a new run: only events whose id starts with `prefix` are counted.
    pub fn begin(&self, prefix: &str) -> Result<(), BenchError> {
        let mut t = self.state.tally.locked();
        t.prefix = prefix.to_string();
        t.seen.clear();
        t.latency = new_histogram()?;
        t.after_commit = new_histogram()?;
        t.duplicates = 0;
        t.first = None;
        t.last = None;
        self.state.delivered.store(0, Ordering::Release);
        Ok(())
    }

    /// Distinct events of the current run received so far.
    pub fn delivered(&self) -> usize {
        self.state.delivered.load(Ordering::Acquire)
    }

    /// Waits until `expected` distinct events arrived, showing progress; gives up when none
    /// arrived for `stall` (what arrived is still reported, and the caller's counts show the
    /// gap).
    pub async fn wait_for(&self, expected: usize, stall: Duration) {
        let mut last_count = self.delivered();
        let mut last_change = Instant::now();
        let mut last_print = Instant::now();
        loop {
            let d = self.delivered();
            if d >= expected {
                break;
            }
            if d != last_count {
                last_count = d;
                last_change = Instant::now();
            } else if last_change.elapsed() > stall {
                eprintln!("\n  no delivery for {stall:?}; {d}/{expected} arrived");
                return;
            }
            if last_print.elapsed() > Duration::from_millis(500) {
                eprint!("\r  delivered {d}/{expected}   ");
                last_print = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        eprintln!("\r  delivered {expected}/{expected}   ");
    }

    /// The current run's arrivals.
    pub fn take(&self) -> Result<Arrivals, BenchError> {
        let mut t = self.state.tally.locked();
        Ok(Arrivals {
            delivered: t.seen.len(),
            duplicates: t.duplicates,
            latency: std::mem::replace(&mut t.latency, new_histogram()?),
            after_commit: std::mem::replace(&mut t.after_commit, new_histogram()?),
            first: t.first,
            last: t.last,
        })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn receive(st: &State, headers: &HeaderMap) {
    let now = Instant::now();
    let now_us = stamp_of(now);
    let Some(id) = header(headers, "ce-id") else {
        return;
    };
    // The stamp is decimal digits; anything else (a foreign event) records no latency.
    let sent: Option<u64> = header(headers, "ce-benchsent").and_then(|v| v.parse().ok());
    let committed = header(headers, "ce-weirrecordedtime")
        .and_then(|v| chrono::DateTime::parse_from_rfc3339(v).ok())
        .map(|at| {
            let us = (chrono::Utc::now() - at.to_utc()).num_microseconds();
            us.unwrap_or(0).clamp(1, MAX_LATENCY_US as i64) as u64
        });
    let mut t = st.tally.locked();
    if t.prefix.is_empty() || !id.starts_with(t.prefix.as_str()) {
        return;
    }
    if !t.seen.insert(id.to_string()) {
        t.duplicates += 1;
        return;
    }
    if let Some(sent) = sent {
        let us = now_us.saturating_sub(sent).clamp(1, MAX_LATENCY_US);
        let _ = t.latency.record(us);
    }
    if let Some(us) = committed {
        let _ = t.after_commit.record(us);
    }
    t.first.get_or_insert(now);
    t.last = Some(now);
    st.delivered.fetch_add(1, Ordering::Release);
}

/// One event as the raw baselines POST it: binary mode, the attributes as `ce-` headers.
pub struct RawEvent {
    pub headers: Vec<(String, String)>,
    pub body: bytes::Bytes,
}

/// The baselines' HTTP client: one pool for every POST, idle connections kept for each
/// concurrent sender.
pub fn raw_client(concurrency: usize) -> Result<reqwest::Client, BenchError> {
    Ok(crate::tls_provider::http_client_builder()
        .pool_max_idle_per_host(concurrency)
        .timeout(Duration::from_secs(10))
        .build()?)
}

/// POSTs one event; true on 2xx.
pub async fn raw_post(client: &reqwest::Client, url: &str, ev: &RawEvent) -> bool {
    let mut req = client
        .post(url)
        .header(http::header::CONTENT_TYPE, "application/json");
    for (k, v) in &ev.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    matches!(req.body(ev.body.clone()).send().await, Ok(r) if r.status().is_success())
}
