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
mod probe;
mod ready;
mod table;
mod traffic;

use probe::*;
use ready::*;
use table::opt;
pub use table::table;
use traffic::*;

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
    /// Of that change, the worker's own time per phase (`weir_topology_sync_seconds`, summed
    /// over the syncs it caused): reading the folder, building the topology, applying it.
    pub one_more_load_ms: Option<f64>,
    pub one_more_build_ms: Option<f64>,
    pub one_more_apply_ms: Option<f64>,
    /// How many syncs that change caused (one, unless the folder watch saw two writes).
    pub one_more_syncs: Option<f64>,
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
        ("one_more_load_ms", r.one_more_load_ms),
        ("one_more_build_ms", r.one_more_build_ms),
        ("one_more_apply_ms", r.one_more_apply_ms),
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
    let client = crate::tls_provider::http_client_builder()
        .timeout(STATUS_TIMEOUT)
        .build()?;
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
    let phases_before = sync_phases(pipe).await;
    pipe.write_manifest("extra.yaml", &resource_yaml(suffix, n, &sink.url))?;
    let applied = Instant::now();
    let extra = [stream_name(n), sub_name(suffix, n)];
    let w = watch_ready(pipe, &client, &extra, applied, args.ready_timeout, tag).await?;
    let Some(one_more) = w.ready_after else {
        let amqp = amqp_now(pipe);
        return Err(not_ready_error(tag, &w, &extra, None, amqp, sampler).await);
    };
    run.one_more_ready_ms = one_more.as_secs_f64() * 1e3;
    // The sync is timed when it ends, which is before its resources report Ready.
    if let (Some(before), Some(after)) = (phases_before, sync_phases(pipe).await) {
        let spent = |phase: &str| {
            let (s1, c1) = after.get(phase).copied().unwrap_or_default();
            let (s0, c0) = before.get(phase).copied().unwrap_or_default();
            (c1 > c0).then_some(((s1 - s0) * 1e3, c1 - c0))
        };
        run.one_more_load_ms = spent("load").map(|(ms, _)| ms);
        run.one_more_build_ms = spent("build").map(|(ms, _)| ms);
        run.one_more_apply_ms = spent("apply").map(|(ms, _)| ms);
        run.one_more_syncs = spent("build").map(|(_, n)| n);
    }
    eprintln!(
        "{tag}: one more → Ready in {:.0} ms; the worker's own time: load {} ms, build {} ms, \
         apply {} ms ({} syncs)",
        run.one_more_ready_ms,
        opt(run.one_more_load_ms, 2),
        opt(run.one_more_build_ms, 2),
        opt(run.one_more_apply_ms, 2),
        opt(run.one_more_syncs, 0),
    );

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

    #[test]
    fn sync_phases_are_read_from_a_real_scrape() {
        let m = crate::metrics::Metrics::new();
        m.observe_sync("build", Duration::from_millis(250));
        m.observe_sync("build", Duration::from_millis(500));
        m.observe_sync("apply", Duration::from_secs(2));
        let phases = parse_sync_phases(&m.render());
        assert_eq!(phases.get("build"), Some(&(0.75, 2.0)));
        assert_eq!(phases.get("apply"), Some(&(2.0, 1.0)));
        assert_eq!(phases.get("load"), None);
    }
}
