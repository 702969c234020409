//! `scale`: one worker with many resources. A generated manifest folder holds N EventStreams
//! (each with `store` and `broker`, all on one database through one Secret, default pool
//! settings) and one Subscription per stream delivering to the benchmark's sink. Measured:
//!
//! - the time from spawning `weir run` until every resource reports Ready on `/v1/status`,
//!   and the slowest `/v1/status` answer meanwhile (each poll has its own timeout, so a hung
//!   admin API is counted and reported instead of hanging the benchmark);
//! - the worker's PostgreSQL sessions (rows of `pg_stat_activity` for the benchmark's
//!   database): the maximum sampled during start-up, and the count at idle;
//! - its AMQP connections (its own TCP sockets to the broker, from `/proc`) and channels
//!   (RabbitMQ's management API, `/api/channels`, matched on those sockets' client ports);
//! - its RSS (`VmRSS`) and CPU (`utime + stime`) at idle;
//! - the apply → Ready latency of one more stream + subscription written into the watched
//!   folder while N exist (includes the folder watch's 300 ms debounce);
//! - a paced traffic phase, one event per request, round-robin over every stream, counted at
//!   the sink: delivered ÷ sent and end-to-end latency.
//!
//! Baseline: the same measurements of a small pipeline (`--baseline-streams`, default 10) in
//! the same run, reported as ratios and as the cost per added resource.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::delivery::from_arrivals;
use super::load::payload;
use super::pipeline::{Database, Pipeline};
use super::report::{Measurement, Report};
use super::scenarios::{stream_yaml, versions};
use super::sink::{self, Sink};
use super::{BenchArgs, BenchError};

/// Offered rate of the traffic phase when `--rate` is not given, spread over all streams.
const DEFAULT_RATE: u64 = 100;
/// Length of the traffic phase when `--duration` is not given.
const DEFAULT_TRAFFIC: Duration = Duration::from_secs(30);
/// Pause between two `/v1/status` polls: often enough to time Ready within a quarter second,
/// rare enough that the polls (a few MB of JSON at 2,000 resources) do not load the worker.
const STATUS_POLL: Duration = Duration::from_millis(250);
/// One `/v1/status` request may take this long (connect to the end of the body). Issue 23
/// asks for an answer within a second under any load; five gives a slow answer room to be
/// measured, while a hung admin API still costs the benchmark at most this per poll.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two samples of `pg_stat_activity` during start-up.
const PG_SAMPLE: Duration = Duration::from_millis(250);
/// After everything is Ready, time for start-up work still in flight (pool connections
/// returned, first consumer credits) to settle before the idle measurements.
const SETTLE: Duration = Duration::from_secs(3);
/// Publish requests in flight at once in the traffic phase. At the default 100 ev/s with
/// millisecond answers only one or two are; 64 absorb a stall of over half a second at that
/// rate before the pacing falls behind (which then shows up as latency, since each event
/// carries the time it was due), and they keep a stuck worker from piling up sockets.
const PUBLISH_IN_FLIGHT: usize = 64;
/// A publish answered after this long counts as failed: above Weir's own request timeout
/// (10 s), so Weir's 503 is what is normally seen.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(15);
/// Stop waiting for deliveries after this long without a new one.
const STALL: Duration = Duration::from_secs(30);
/// How many resources that are not Ready a timeout report names (the rest are counted).
const NOT_READY_SHOWN: usize = 10;
/// Requests to RabbitMQ's management API: it answers locally in milliseconds; a dead plugin
/// must not stall the benchmark.
const MANAGEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// What one pipeline size measured. Serialized into the report's `details`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ScaleRun {
    pub streams: usize,
    pub subscriptions: usize,
    /// Streams + subscriptions.
    pub resources: usize,
    /// From spawning `weir run` until every resource reported Ready.
    pub ready_s: f64,
    /// The slowest `/v1/status` answer (or timeout) during start-up.
    pub status_worst_ms: f64,
    pub status_polls: usize,
    /// Polls that got no answer within [`STATUS_TIMEOUT`].
    pub status_timeouts: usize,
    /// The worker's sessions on the benchmark database: most seen during start-up.
    pub pg_sessions_startup_max: Option<i64>,
    /// ... and at idle, after start-up settled.
    pub pg_sessions_idle: Option<i64>,
    /// The worker's established TCP connections to the broker at idle.
    pub amqp_connections: Option<usize>,
    /// Channels RabbitMQ lists on those connections at idle (management API).
    pub amqp_channels: Option<usize>,
    pub rss_idle_mb: Option<f64>,
    /// CPU time over the idle window, in % of one core.
    pub idle_cpu_percent: Option<f64>,
    pub idle_window_s: f64,
    /// Apply (file written) → stream and subscription both Ready, with N in place.
    pub one_more_ready_ms: f64,
    pub rate: u64,
    pub traffic_s: f64,
    /// Events accepted by the worker (2xx) in the traffic phase.
    pub sent: usize,
    /// Distinct events of the phase the sink received.
    pub delivered: usize,
    pub publish_errors: usize,
    pub duplicates: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
}

pub async fn scale(args: &BenchArgs) -> Result<Vec<Report>, BenchError> {
    if args.url.is_some() {
        return Err(BenchError::Pipeline(
            "scale generates its own manifests and needs its own pipeline: drop --url".into(),
        ));
    }
    let n = args.streams.max(1);
    let nb = args.baseline_streams.clamp(1, n);
    let versions = versions(&args.pg_url).await;
    let sink = Sink::start().await?;
    let mgmt = Management::for_amqp_url(&args.amqp_url);
    if mgmt.is_none() {
        eprintln!("note: RabbitMQ's management API is not usable; channels are not counted");
    }
    eprintln!("scale baseline: {nb} streams + {nb} subscriptions");
    let (base, base_m) = run_one(args, nb, &sink, mgmt.as_ref(), "baseline").await?;
    eprintln!("scale: {n} streams + {n} subscriptions");
    let (big, big_m) = run_one(args, n, &sink, mgmt.as_ref(), "scale").await?;
    let mut report = Report::new(
        "scale",
        format!(
            "streams={n} subs={n} rate={} payload={}B",
            big.rate, args.payload
        ),
        big_m,
        base_m,
        versions,
    );
    report.details = Some(json!({
        "scale": big,
        "baseline": base,
        "ratios": ratios(&big, &base),
        "per_added_resource": per_added_resource(&big, &base),
    }));
    Ok(vec![report])
}

/// The figures compared between the two sizes: (key in the JSON, value).
fn figures(r: &ScaleRun) -> Vec<(&'static str, Option<f64>)> {
    vec![
        ("ready_s", Some(r.ready_s)),
        ("status_worst_ms", Some(r.status_worst_ms)),
        (
            "pg_sessions_startup_max",
            r.pg_sessions_startup_max.map(|v| v as f64),
        ),
        ("pg_sessions_idle", r.pg_sessions_idle.map(|v| v as f64)),
        ("amqp_connections", r.amqp_connections.map(|v| v as f64)),
        ("amqp_channels", r.amqp_channels.map(|v| v as f64)),
        ("rss_idle_mb", r.rss_idle_mb),
        ("idle_cpu_percent", r.idle_cpu_percent),
        ("one_more_ready_ms", Some(r.one_more_ready_ms)),
    ]
}

/// Each figure at N ÷ the same at the baseline size.
fn ratios(big: &ScaleRun, base: &ScaleRun) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for ((k, a), (_, b)) in figures(big).into_iter().zip(figures(base)) {
        if let (Some(a), Some(b)) = (a, b)
            && b > 0.0
        {
            out.insert(k.into(), json!(a / b));
        }
    }
    out.into()
}

/// (figure at N − figure at the baseline) ÷ (resources at N − resources at the baseline):
/// what each added resource costs, with the fixed cost of a worker taken out.
fn per_added_resource(big: &ScaleRun, base: &ScaleRun) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    let added = big.resources.saturating_sub(base.resources);
    if added == 0 {
        return out.into();
    }
    for ((k, a), (_, b)) in figures(big).into_iter().zip(figures(base)) {
        if let (Some(a), Some(b)) = (a, b) {
            out.insert(k.into(), json!((a - b) / added as f64));
        }
    }
    out.into()
}

fn stream_name(i: usize) -> String {
    format!("s{i:04}")
}

/// Subscription queues are named after namespace, stream and subscription: the run's suffix
/// in the subscription's name keeps concurrent benchmark runs apart, and lets the clean-up
/// find every queue of the run.
fn sub_name(suffix: &str, i: usize) -> String {
    format!("sub-{suffix}-{i:04}")
}

/// The run's stream exchanges (the default name, `weir.<ns>.<stream>`, would be shared by
/// concurrent runs).
fn exchange_name(suffix: &str, i: usize) -> String {
    format!("weir.bench.scale-{suffix}-{i:04}")
}

/// Names of the broker objects the run created contain one of these.
fn broker_needles(suffix: &str) -> [String; 2] {
    [format!("sub-{suffix}-"), format!("scale-{suffix}-")]
}

/// Stream `i` (store + broker) and its subscription to the sink. Retries are short so a
/// hiccup does not stall the traffic phase; none are expected from the local sink.
fn resource_yaml(suffix: &str, i: usize, sink_url: &str) -> String {
    let stream = stream_name(i);
    let stream_doc = stream_yaml(&stream, "  store: {urlSecretRef: {name: pg, key: url}}\n")
        .replace(
            "queueType: quorum}",
            &format!(
                "queueType: quorum, exchange: {}}}",
                exchange_name(suffix, i)
            ),
        );
    format!(
        "{stream_doc}---\napiVersion: weir.dev/v1alpha1\nkind: Subscription\n\
         metadata: {{name: {}, namespace: bench}}\n\
         spec:\n  stream: {stream}\n  sink: {{uri: \"{sink_url}\"}}\n  \
         delivery: {{timeout: 10s, retry: 10, backoffDelay: 100ms, backoffMax: 2s}}\n",
        sub_name(suffix, i)
    )
}

/// One pipeline of `n` streams + `n` subscriptions: started, measured, stopped, its
/// database dropped and its broker objects deleted.
async fn run_one(
    args: &BenchArgs,
    n: usize,
    sink: &Sink,
    mgmt: Option<&Management>,
    tag: &str,
) -> Result<(ScaleRun, Measurement), BenchError> {
    let db = Database::create(&args.pg_url).await?;
    let suffix = db.suffix.clone();
    let db_name = db.name.clone();
    let manifests = (0..n)
        .map(|i| resource_yaml(&suffix, i, &sink.url))
        .collect::<Vec<_>>()
        .join("---\n");
    let sampler = PgSampler::spawn(&args.pg_url, &db_name)?;
    let started = Instant::now();
    let mut pipe =
        Pipeline::start_on(db, &args.pg_url, &args.amqp_url, |_| manifests.clone()).await?;
    let result = measure(
        args, n, sink, mgmt, tag, &mut pipe, &sampler, &suffix, started,
    )
    .await;
    sampler.stop();
    eprintln!("{tag}: stopping the worker, dropping its database and broker objects…");
    let stopped = pipe.stop().await;
    if let Some(m) = mgmt {
        match m.sweep(&broker_needles(&suffix)).await {
            Ok(0) => {}
            Ok(k) => eprintln!("{tag}: deleted {k} queues and exchanges of the run"),
            Err(e) => eprintln!("warning: {tag}: the run's queues may remain: {e}"),
        }
    } else {
        eprintln!("warning: {tag}: no management API; the run's queues and exchanges remain");
    }
    // A measurement error says more than a clean-up error that follows from it.
    let r = result?;
    stopped?;
    Ok(r)
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    args: &BenchArgs,
    n: usize,
    sink: &Sink,
    mgmt: Option<&Management>,
    tag: &str,
    pipe: &mut Pipeline,
    sampler: &PgSampler,
    suffix: &str,
    started: Instant,
) -> Result<(ScaleRun, Measurement), BenchError> {
    let client = reqwest::Client::builder().timeout(STATUS_TIMEOUT).build()?;
    let mut expected: Vec<String> = (0..n).map(stream_name).collect();
    expected.extend((0..n).map(|i| sub_name(suffix, i)));
    let w = watch_ready(pipe, &client, &expected, started, args.ready_timeout, tag).await?;
    let startup_max = sampler.max();
    let amqp_port = amqp_port(&args.amqp_url);
    let amqp_now = |pipe: &Pipeline| {
        pipe.pid()
            .and_then(|pid| socket_ports(pid, amqp_port))
            .map(|p| p.len())
    };
    if w.ready_after.is_none() {
        let amqp = amqp_now(pipe);
        return Err(not_ready_error(tag, &w, &expected, startup_max, amqp, sampler).await);
    }
    let mut run = ScaleRun {
        streams: n,
        subscriptions: n,
        resources: expected.len(),
        ready_s: w.ready_after.map_or(0.0, |d| d.as_secs_f64()),
        status_worst_ms: w.worst.as_secs_f64() * 1e3,
        status_polls: w.polls,
        status_timeouts: w.timeouts,
        pg_sessions_startup_max: startup_max,
        ..ScaleRun::default()
    };
    let pid = pipe
        .pid()
        .ok_or_else(|| BenchError::Pipeline("the worker has no process id".into()))?;

    // Idle: nothing polls the worker while its CPU is measured.
    tokio::time::sleep(SETTLE).await;
    let idle = args.idle.max(Duration::from_secs(1));
    eprintln!("{tag}: idle; measuring CPU over {idle:?}…");
    let cpu0 = (cpu_ticks(pid), Instant::now());
    tokio::time::sleep(idle).await;
    let cpu1 = (cpu_ticks(pid), Instant::now());
    if let (Some(t0), Some(t1)) = (cpu0.0, cpu1.0) {
        let secs = (t1.saturating_sub(t0)) as f64 / clock_ticks() as f64;
        run.idle_cpu_percent = Some(100.0 * secs / (cpu1.1 - cpu0.1).as_secs_f64());
    }
    run.idle_window_s = (cpu1.1 - cpu0.1).as_secs_f64();
    run.rss_idle_mb = rss_kib(pid).map(|k| k as f64 / 1024.0);
    run.pg_sessions_idle = sampler.sample().await;
    let ports = socket_ports(pid, amqp_port);
    run.amqp_connections = ports.as_ref().map(HashSet::len);
    if let (Some(m), Some(ports)) = (mgmt, &ports) {
        match m.channels_on(ports).await {
            Ok(c) => run.amqp_channels = Some(c),
            Err(e) => eprintln!("warning: {tag}: channels not counted: {e}"),
        }
    }
    eprintln!(
        "{tag}: idle CPU {} % · RSS {} MB · PostgreSQL sessions {} · AMQP connections {} · channels {}",
        opt(run.idle_cpu_percent, 2),
        opt(run.rss_idle_mb, 1),
        opt(run.pg_sessions_idle.map(|v| v as f64), 0),
        opt(run.amqp_connections.map(|v| v as f64), 0),
        opt(run.amqp_channels.map(|v| v as f64), 0),
    );

    // One more stream + subscription, with n in place.
    eprintln!("{tag}: one more stream + subscription…");
    pipe.write_manifest("extra.yaml", &resource_yaml(suffix, n, &sink.url))?;
    let applied = Instant::now();
    let extra = [stream_name(n), sub_name(suffix, n)];
    let w = watch_ready(pipe, &client, &extra, applied, args.ready_timeout, tag).await?;
    let Some(one_more) = w.ready_after else {
        let amqp = amqp_now(pipe);
        return Err(not_ready_error(tag, &w, &extra, None, amqp, sampler).await);
    };
    run.one_more_ready_ms = one_more.as_secs_f64() * 1e3;

    // Traffic over every stream, the extra one included.
    let streams: Vec<String> = (0..=n).map(stream_name).collect();
    let rate = args.rate.unwrap_or(DEFAULT_RATE).max(1);
    let duration = args.duration.unwrap_or(DEFAULT_TRAFFIC);
    run.rate = rate;
    run.traffic_s = duration.as_secs_f64();
    eprintln!(
        "{tag}: traffic, {rate} ev/s round-robin over {} streams for {duration:?}",
        streams.len()
    );
    let label = format!("t{suffix}");
    sink.begin(&format!("{label}-"))?;
    let t = traffic(pipe, &streams, rate, duration, args.payload, sink, &label).await?;
    let backlog = t.sent.saturating_sub(sink.delivered());
    sink.wait_for(t.sent, STALL).await;
    let a = sink.take()?;
    let m = from_arrivals(
        &format!("weir, {n} streams + {n} subscriptions"),
        &a,
        t.started,
        t.sent,
        Some(backlog),
        Some(rate),
        t.errors,
    );
    run.sent = t.sent;
    run.delivered = a.delivered;
    run.publish_errors = t.errors;
    run.duplicates = a.duplicates;
    run.p50_ms = m.p50_ms;
    run.p99_ms = m.p99_ms;
    Ok((run, m))
}

/// What watching `/v1/status` for a set of resources saw.
struct Watch {
    /// From the watch's start until all were Ready; `None` when the limit passed first.
    ready_after: Option<Duration>,
    elapsed: Duration,
    worst: Duration,
    polls: usize,
    timeouts: usize,
    ready: usize,
    /// Per resource not Ready at the last answer: why (its first False condition).
    not_ready: HashMap<String, String>,
    /// The last poll's failure, when it had one.
    last_error: Option<String>,
    /// When `/v1/status` last answered (from the watch's start), if it ever did: the age
    /// of `not_ready`.
    last_answer: Option<Duration>,
}

/// Polls `/v1/status` until every resource in `names` (namespace `bench`) is Ready or
/// `limit` has passed since `since`, showing progress. Fails only when the worker exits.
async fn watch_ready(
    pipe: &mut Pipeline,
    client: &reqwest::Client,
    names: &[String],
    since: Instant,
    limit: Duration,
    tag: &str,
) -> Result<Watch, BenchError> {
    let url = format!("{}/v1/status", pipe.admin);
    let mut w = Watch {
        ready_after: None,
        elapsed: Duration::ZERO,
        worst: Duration::ZERO,
        polls: 0,
        timeouts: 0,
        ready: 0,
        not_ready: names
            .iter()
            .map(|n| (n.clone(), "not listed yet".to_string()))
            .collect(),
        last_error: None,
        last_answer: None,
    };
    let mut progress = Progress::new();
    loop {
        if let Some(status) = pipe.exited()? {
            progress.end();
            return Err(BenchError::Pipeline(format!(
                "{tag}: weir run exited ({status}) {:.1} s after the watch began, with {}/{} resources Ready",
                since.elapsed().as_secs_f64(),
                w.ready,
                names.len()
            )));
        }
        let t0 = Instant::now();
        let answer = async {
            client
                .get(&url)
                .send()
                .await?
                .error_for_status()?
                .json::<serde_json::Value>()
                .await
        }
        .await;
        let took = t0.elapsed();
        w.polls += 1;
        match answer {
            Ok(v) => {
                w.last_answer = Some(since.elapsed());
                w.worst = w.worst.max(took);
                w.last_error = None;
                readiness(&v, names, &mut w);
            }
            Err(e) if e.is_timeout() => {
                w.worst = w.worst.max(took);
                w.timeouts += 1;
                w.last_error = Some(format!("no answer in {STATUS_TIMEOUT:?}"));
            }
            // Refused before the admin port listens; not an answer time.
            Err(e) => w.last_error = Some(e.to_string()),
        }
        w.elapsed = since.elapsed();
        if w.ready == names.len() {
            w.ready_after = Some(w.elapsed);
            progress.finish(&format!(
                "  {tag}: {}/{} Ready after {:.2} s · worst /v1/status {:.0} ms",
                w.ready,
                names.len(),
                w.elapsed.as_secs_f64(),
                w.worst.as_secs_f64() * 1e3
            ));
            return Ok(w);
        }
        if w.elapsed >= limit {
            progress.end();
            return Ok(w);
        }
        progress.show((w.ready, w.timeouts), || {
            format!(
                "  {tag}: {}/{} Ready at {:.1} s · worst /v1/status {:.0} ms · {} polls timed out",
                w.ready,
                names.len(),
                w.elapsed.as_secs_f64(),
                w.worst.as_secs_f64() * 1e3,
                w.timeouts
            )
        });
        tokio::time::sleep(STATUS_POLL).await;
    }
}

/// Counts the Ready ones of `names` in a `/v1/status` answer and notes why the others are not.
fn readiness(v: &serde_json::Value, names: &[String], w: &mut Watch) {
    let mut listed: HashMap<&str, &serde_json::Value> = HashMap::new();
    for r in v["resources"].as_array().into_iter().flatten() {
        if r["namespace"] == "bench"
            && let Some(name) = r["name"].as_str()
        {
            listed.insert(name, r);
        }
    }
    w.ready = 0;
    w.not_ready.clear();
    for name in names {
        match listed.get(name.as_str()) {
            Some(r) if r["ready"] == true => w.ready += 1,
            Some(r) => {
                let why = r["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|c| c["status"] != "True")
                    .map_or_else(
                        || "not Ready (no False condition)".to_string(),
                        |c| {
                            format!(
                                "{}=False {}: {}",
                                c["type"].as_str().unwrap_or("?"),
                                c["reason"].as_str().unwrap_or(""),
                                c["message"].as_str().unwrap_or("")
                            )
                        },
                    );
                w.not_ready.insert(name.clone(), why);
            }
            None => {
                w.not_ready.insert(name.clone(), "not listed".into());
            }
        }
    }
}

/// The error of a watch that timed out: how long, how many, which (and why), how the admin
/// API and PostgreSQL looked.
async fn not_ready_error(
    tag: &str,
    w: &Watch,
    names: &[String],
    startup_max: Option<i64>,
    amqp_connections: Option<usize>,
    sampler: &PgSampler,
) -> BenchError {
    let shown: Vec<String> = names
        .iter()
        .filter_map(|n| w.not_ready.get(n).map(|why| format!("    {n}: {why}")))
        .take(NOT_READY_SHOWN)
        .collect();
    let missing = names.len() - w.ready;
    let more = missing.saturating_sub(shown.len());
    let sessions = sampler.breakdown().await.unwrap_or_default();
    BenchError::Pipeline(format!(
        "{tag}: {missing} of {} resources not Ready after {:.1} s\n  \
         /v1/status: {} polls, {} timed out (> {:?}), worst {:.0} ms{}\n  \
         PostgreSQL sessions of the worker: max {} during the wait; now {}\n  \
         AMQP connections of the worker now: {}\n  \
         not Ready {}:\n{}{}",
        names.len(),
        w.elapsed.as_secs_f64(),
        w.polls,
        w.timeouts,
        STATUS_TIMEOUT,
        w.worst.as_secs_f64() * 1e3,
        w.last_error
            .as_ref()
            .map_or_else(String::new, |e| format!("; last poll: {e}")),
        startup_max.map_or_else(|| "-".into(), |v| v.to_string()),
        if sessions.is_empty() {
            "-".to_string()
        } else {
            sessions
        },
        amqp_connections.map_or_else(|| "-".into(), |c| c.to_string()),
        match w.last_answer {
            Some(t) => format!("at the last /v1/status answer ({:.1} s)", t.as_secs_f64()),
            None => "(/v1/status never answered)".into(),
        },
        shown.join("\n"),
        if more > 0 {
            format!("\n    … and {more} more")
        } else {
            String::new()
        }
    ))
}

struct Traffic {
    started: Instant,
    sent: usize,
    errors: usize,
}

/// Publishes `rate × duration` events, one per request, paced open-loop (event i is due at
/// i ÷ rate) and spread round-robin over `streams`, each stamped with its due time.
async fn traffic(
    pipe: &Pipeline,
    streams: &[String],
    rate: u64,
    duration: Duration,
    payload_bytes: usize,
    sink: &Sink,
    label: &str,
) -> Result<Traffic, BenchError> {
    let total = ((rate as f64 * duration.as_secs_f64()).round() as usize).max(1);
    let urls: Vec<String> = streams.iter().map(|s| pipe.events_url(s)).collect();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(PUBLISH_IN_FLIGHT)
        .timeout(PUBLISH_TIMEOUT)
        .build()?;
    let limit = Arc::new(Semaphore::new(PUBLISH_IN_FLIGHT));
    let sent = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let data = payload(payload_bytes, 0);
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    let mut progress = Progress::new();
    for i in 0..total {
        let due = started + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let body = json!({
            "specversion": "1.0", "id": format!("{label}-{i}"), "source": "/bench",
            "type": "order.created", "subject": format!("order-{i}"),
            "datacontenttype": "application/json",
            sink::SENT_EXTENSION: sink::stamp_of(due).to_string(), "data": data,
        });
        let url = urls[i % urls.len()].clone();
        let (client, ok, failed) = (client.clone(), sent.clone(), errors.clone());
        tasks.spawn(async move {
            let r = client
                .post(url)
                .header(http::header::CONTENT_TYPE, "application/cloudevents+json")
                .body(serde_json::to_vec(&body).unwrap_or_default())
                .send()
                .await;
            if matches!(&r, Ok(r) if r.status().is_success()) {
                ok.fetch_add(1, Ordering::Relaxed);
            } else {
                failed.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
        });
        // Reap finished requests so the set stays as small as the requests in flight.
        while tasks.try_join_next().is_some() {}
        // Only the time advances the line in a log: a change of counts is no news here.
        progress.show((0, 0), || {
            format!(
                "  sent {}/{total} · errors {} · delivered {}",
                sent.load(Ordering::Relaxed),
                errors.load(Ordering::Relaxed),
                sink.delivered()
            )
        });
    }
    while tasks.join_next().await.is_some() {}
    let (sent, errors) = (sent.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
    progress.finish(&format!("  sent {sent}/{total} · errors {errors}"));
    Ok(Traffic {
        started,
        sent,
        errors,
    })
}

/// Progress on stderr. On a terminal, one line rewritten twice a second; otherwise (a log, a
/// test's captured output) a new line when the watched counts change, else every 10 s, so a
/// long wait does not fill the log.
struct Progress {
    tty: bool,
    last: Instant,
    key: Option<(usize, usize)>,
    /// A line rewritten in place is on screen (a newline must end it).
    open: bool,
}

impl Progress {
    fn new() -> Progress {
        use std::io::IsTerminal as _;
        Progress {
            tty: std::io::stderr().is_terminal(),
            last: Instant::now(),
            key: None,
            open: false,
        }
    }

    fn show(&mut self, key: (usize, usize), line: impl FnOnce() -> String) {
        let age = self.last.elapsed();
        if self.tty && age >= Duration::from_millis(500) {
            eprint!("\r{}   ", line());
            self.open = true;
        } else if !self.tty
            && ((self.key != Some(key) && age >= Duration::from_millis(500))
                || age >= Duration::from_secs(10))
        {
            eprintln!("{}", line());
            self.key = Some(key);
        } else {
            return;
        }
        self.last = Instant::now();
    }

    /// Ends a line left open.
    fn end(&mut self) {
        if self.open {
            eprintln!();
            self.open = false;
        }
    }

    fn finish(&mut self, line: &str) {
        if self.open {
            eprintln!("\r{line}   ");
            self.open = false;
        } else {
            eprintln!("{line}");
        }
    }
}

/// Samples the worker's sessions on the benchmark database in the background (the maximum
/// is kept), and answers one-off samples. Connects to the server's admin database, so its
/// own session is never counted; one connection at most (`max_connections(1)`).
struct PgSampler {
    pool: sqlx::PgPool,
    db: String,
    max: Arc<AtomicI64>,
    cancel: CancellationToken,
}

impl PgSampler {
    fn spawn(pg_url: &str, db: &str) -> Result<PgSampler, BenchError> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy(pg_url)?;
        let s = PgSampler {
            pool,
            db: db.to_string(),
            max: Arc::new(AtomicI64::new(-1)),
            cancel: CancellationToken::new(),
        };
        let (pool, db, max, cancel) = (
            s.pool.clone(),
            s.db.clone(),
            s.max.clone(),
            s.cancel.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(PG_SAMPLE) => {}
                }
                // A refused sample (the server out of connections) is simply missing.
                if let Ok(c) = count_sessions(&pool, &db).await {
                    max.fetch_max(c, Ordering::Relaxed);
                }
            }
        });
        Ok(s)
    }

    /// The most sessions seen so far; `None` if no sample succeeded.
    fn max(&self) -> Option<i64> {
        Some(self.max.load(Ordering::Relaxed)).filter(|&v| v >= 0)
    }

    async fn sample(&self) -> Option<i64> {
        count_sessions(&self.pool, &self.db).await.ok()
    }

    /// The sessions now, grouped by state and the start of their query, most first.
    async fn breakdown(&self) -> Option<String> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT coalesce(state, '?'), left(regexp_replace(query, '\\s+', ' ', 'g'), 48),
                    count(*)
             FROM pg_stat_activity WHERE datname = $1 GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 8",
        )
        .bind(&self.db)
        .fetch_all(&self.pool)
        .await
        .ok()?;
        let total: i64 = rows.iter().map(|r| r.2).sum();
        let parts: Vec<String> = rows
            .iter()
            .map(|(state, q, c)| format!("{c} {state} `{q}`"))
            .collect();
        Some(format!("{total} ({})", parts.join(", ")))
    }

    fn stop(&self) {
        self.cancel.cancel();
    }
}

async fn count_sessions(pool: &sqlx::PgPool, db: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
        .bind(db)
        .fetch_one(pool)
        .await
}

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `utime + stime` of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    // Field 3 (state) is then index 0, utime (14) index 11, stime (15) index 12.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on every Linux this runs on).
fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

fn amqp_port(amqp_url: &str) -> u16 {
    amqp_url
        .parse::<lapin::uri::AMQPUri>()
        .map_or(5672, |u| u.authority.port)
}

/// Local ports of the process's established TCP connections to `remote_port`: its sockets
/// (`/proc/PID/fd`) matched by inode against its network namespace's TCP tables.
fn socket_ports(pid: u32, remote_port: u16) -> Option<HashSet<u16>> {
    let mut inodes = HashSet::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        if let Ok(target) = std::fs::read_link(e.path())
            && let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
        {
            inodes.insert(inode.to_string());
        }
    }
    let port = |addr: &str| {
        addr.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    let mut ports = HashSet::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl, local, remote, state (01 = ESTABLISHED), …, inode (index 9).
            if f.len() > 9
                && f[3] == "01"
                && port(f[2]) == Some(remote_port)
                && inodes.contains(f[9])
                && let Some(local) = port(f[1])
            {
                ports.insert(local);
            }
        }
    }
    Some(ports)
}

/// RabbitMQ's management API, for channel counts and the clean-up of the run's queues and
/// exchanges. At `WEIR_RABBITMQ_MANAGEMENT_URL` if set (as the worker's), else port 15672 of
/// the AMQP host, with the AMQP URL's credentials and vhost.
struct Management {
    client: reqwest::Client,
    base: String,
    vhost: String,
    user: String,
    password: String,
}

impl Management {
    fn for_amqp_url(amqp_url: &str) -> Option<Management> {
        let uri = amqp_url.parse::<lapin::uri::AMQPUri>().ok()?;
        let base = match std::env::var("WEIR_RABBITMQ_MANAGEMENT_URL") {
            Ok(v) if v == "off" => return None,
            Ok(v) => v.trim_end_matches('/').to_string(),
            Err(_) => format!("http://{}:15672", uri.authority.host),
        };
        let client = reqwest::Client::builder()
            .timeout(MANAGEMENT_TIMEOUT)
            .build()
            .ok()?;
        Some(Management {
            client,
            base,
            vhost: encode(&uri.vhost),
            user: uri.authority.userinfo.username,
            password: uri.authority.userinfo.password,
        })
    }

    async fn get(&self, path: &str) -> Result<serde_json::Value, BenchError> {
        Ok(self
            .client
            .get(format!("{}/api/{path}", self.base))
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// Channels open on the connections whose client port is in `ports`.
    async fn channels_on(&self, ports: &HashSet<u16>) -> Result<usize, BenchError> {
        let v = self
            .get(&format!(
                "vhosts/{}/channels?columns=connection_details",
                self.vhost
            ))
            .await?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter(|c| {
                c["connection_details"]["peer_port"]
                    .as_u64()
                    .is_some_and(|p| ports.contains(&(p as u16)))
            })
            .count())
    }

    /// Deletes the queues and exchanges whose name contains one of `needles`; how many.
    async fn sweep(&self, needles: &[String]) -> Result<usize, BenchError> {
        let mut deleted = 0;
        for kind in ["queues", "exchanges"] {
            let v = self
                .get(&format!("{kind}/{}?columns=name", self.vhost))
                .await?;
            for name in v
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|q| q["name"].as_str())
            {
                if !needles.iter().any(|n| name.contains(n.as_str())) {
                    continue;
                }
                let r = self
                    .client
                    .delete(format!(
                        "{}/api/{kind}/{}/{}",
                        self.base,
                        self.vhost,
                        encode(name)
                    ))
                    .basic_auth(&self.user, Some(&self.password))
                    .send()
                    .await?;
                if r.status().is_success() {
                    deleted += 1;
                }
            }
        }
        Ok(deleted)
    }
}

fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

/// The scale report's own table: each figure at N beside the baseline size, the ratio, and
/// the cost per added resource.
pub fn table(details: &serde_json::Value) -> String {
    let (big, base) = (&details["scale"], &details["baseline"]);
    let (ratios, per) = (&details["ratios"], &details["per_added_resource"]);
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64();
    let mut out = format!(
        "\n{:<46} {:>16} {:>16} {:>9} {:>14}\n",
        "scale",
        format!("N={}", big["streams"]),
        format!("N={}", base["streams"]),
        "ratio",
        "per added res."
    );
    let rows: [(&str, &str, usize); 9] = [
        ("ready_s", "all Ready after (s)", 2),
        (
            "status_worst_ms",
            "worst /v1/status during start-up (ms)",
            1,
        ),
        (
            "pg_sessions_startup_max",
            "PostgreSQL sessions, start-up max",
            0,
        ),
        ("pg_sessions_idle", "PostgreSQL sessions, idle", 0),
        ("amqp_connections", "AMQP connections, idle", 0),
        ("amqp_channels", "AMQP channels, idle", 0),
        ("rss_idle_mb", "RSS idle (MB)", 1),
        ("idle_cpu_percent", "idle CPU (% of one core)", 2),
        ("one_more_ready_ms", "one more stream + sub → Ready (ms)", 0),
    ];
    for (k, label, d) in rows {
        out.push_str(&format!(
            "{:<46} {:>16} {:>16} {:>9} {:>14}\n",
            label,
            opt(f(big, k), d),
            opt(f(base, k), d),
            opt(f(ratios, k), 2),
            opt(f(per, k), 4),
        ));
    }
    out.push_str(&format!(
        "{:<46} {:>16} {:>16}\n",
        "resources (streams + subscriptions)",
        big["resources"].to_string(),
        base["resources"].to_string()
    ));
    out.push_str(&format!(
        "{:<46} {:>16} {:>16}\n",
        "/v1/status polls timed out (> 5 s)",
        format!("{}/{}", big["status_timeouts"], big["status_polls"]),
        format!("{}/{}", base["status_timeouts"], base["status_polls"]),
    ));
    let delivered = |v: &serde_json::Value| {
        format!(
            "{}/{} ({} err)",
            v["delivered"], v["sent"], v["publish_errors"]
        )
    };
    out.push_str(&format!(
        "{:<46} {:>16} {:>16}\n",
        format!(
            "traffic {} ev/s × {} s: delivered/sent",
            big["rate"], big["traffic_s"]
        ),
        delivered(big),
        delivered(base),
    ));
    let lat =
        |v: &serde_json::Value| format!("{} / {}", opt(f(v, "p50_ms"), 1), opt(f(v, "p99_ms"), 1));
    out.push_str(&format!(
        "{:<46} {:>16} {:>16}\n",
        "traffic latency p50 / p99 (ms)",
        lat(big),
        lat(base)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_name_the_run_and_use_the_shared_secrets() {
        let y = resource_yaml("ab12", 7, "http://127.0.0.1:9/");
        assert!(y.contains("name: s0007"), "{y}");
        assert!(y.contains("exchange: weir.bench.scale-ab12-0007}"), "{y}");
        assert!(y.contains("urlSecretRef: {name: pg, key: url}"), "{y}");
        assert!(y.contains("name: sub-ab12-0007"), "{y}");
        assert!(y.contains("stream: s0007"), "{y}");
        assert_eq!(
            crate::yaml::from_multiple::<serde_json::Value>(&y)
                .unwrap()
                .len(),
            2,
            "{y}"
        );
        let needles = broker_needles("ab12");
        assert!(needles.iter().any(|n| exchange_name("ab12", 3).contains(n)));
        assert!(needles.iter().any(|n| sub_name("ab12", 3).contains(n)));
    }

    #[test]
    fn per_resource_cost_takes_the_fixed_cost_out() {
        let base = ScaleRun {
            resources: 20,
            ready_s: 1.0,
            rss_idle_mb: Some(50.0),
            ..ScaleRun::default()
        };
        let big = ScaleRun {
            resources: 220,
            ready_s: 5.0,
            rss_idle_mb: Some(70.0),
            ..ScaleRun::default()
        };
        let per = per_added_resource(&big, &base);
        assert_eq!(per["ready_s"], json!(0.02));
        assert_eq!(per["rss_idle_mb"], json!(0.1));
        let r = ratios(&big, &base);
        assert_eq!(r["ready_s"], json!(5.0));
        assert!(r.get("amqp_channels").is_none());
    }

    #[test]
    fn own_process_stats_are_readable() {
        let pid = std::process::id();
        assert!(rss_kib(pid).is_some_and(|k| k > 0));
        assert!(cpu_ticks(pid).is_some());
        assert!(socket_ports(pid, 1).is_some());
    }
}
