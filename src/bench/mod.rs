//! `weir bench`: Weir's throughput and latency measured beside a raw baseline in the same run
//! (same machine, same services, same settings), reported as a ratio.
//!
//! Each scenario starts its own `weir run` pipeline (a child process of this binary) against a
//! fresh database and fresh exchanges, warms up, measures, and cleans up.

mod archive;
mod broker;
mod cache;
mod delivery;
mod drain;
mod load;
mod perkey;
mod pii;
mod pipeline;
pub use pipeline::listen_port;
mod replay;
mod report;
mod scale;
mod scenarios;
mod sink;

use std::path::PathBuf;
use std::time::Duration;

pub use report::{Measurement, Report};

/// What `weir bench` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// HTTP publish → durable in PostgreSQL, against a raw UNNEST append.
    Ingest,
    /// HTTP publish to a broker-only stream, against a raw confirmed lapin publisher.
    Broker,
    /// Stored events → stream exchange, against the raw confirmed publisher.
    Relay,
    /// Archiving the committed corpus: MB/s, compression ratio with and without the
    /// dictionary, read-back rate, against zstd, SELECT+DELETE and hot reads.
    Archive,
    /// Zipf-distributed subject reads over HTTP through each CachePolicy strategy, against
    /// the same reads of a stream without a cache.
    Cache,
    /// HTTP publish → store → subscription → local sink at offered rates (1k, 5k, 20k ev/s,
    /// as fast as possible; or `--rate`), latency taken by the sink, against a raw lapin
    /// publish → consume → HTTP POST loop.
    E2e,
    /// HTTP publish → store → an `ordering: perKey` subscription (16 lanes, 1,000 keys) →
    /// local sink, against the same load through an unordered subscription, one after the
    /// other in one pipeline: what per-key order costs.
    PerKey,
    /// Stored events → a new `startFrom: earliest` subscription → local sink, against a raw
    /// `SELECT` feeding the same HTTP POST loop.
    Replay,
    /// Live delivery alone: `--events` waiting in a scaled-to-zero Subscription's queue,
    /// drained to a local sink with at least 64 deliveries in flight (`--concurrency`),
    /// against a raw consumer (the same prefetch, one POST per message, ack after the 2xx)
    /// draining as many from a quorum queue.
    Drain,
    /// One worker with `--streams` EventStreams (store + broker, one database) and one
    /// Subscription each: time until every resource is Ready, `/v1/status` answer times,
    /// PostgreSQL sessions, AMQP connections and channels, idle RSS and CPU, one more
    /// resource's apply → Ready, then paced traffic over every stream counted at a sink;
    /// against the same at `--baseline-streams`.
    Scale,
}

#[derive(Clone, Debug)]
pub struct BenchArgs {
    pub scenario: Scenario,
    /// Events to measure (after warm-up).
    pub events: usize,
    /// Concurrent HTTP clients (and baseline publishers where it applies).
    pub concurrency: usize,
    /// Events per request; `None`: the scenario's default set (ingest: 1 and 100).
    pub batch: Option<usize>,
    /// Bytes of each event's JSON payload.
    pub payload: usize,
    /// Offered rate in events/s; `None`: as fast as possible.
    pub rate: Option<u64>,
    /// Stop measuring after this long even if `events` were not all sent.
    pub duration: Option<Duration>,
    /// Publish to a running weir instead of starting one (`--url`): its stream `shop/orders`.
    pub url: Option<String>,
    pub json: Option<PathBuf>,
    pub plot: Option<PathBuf>,
    /// PostgreSQL server for the fresh benchmark database and the baseline.
    pub pg_url: String,
    pub amqp_url: String,
    /// `cache`: distinct subjects stored (read with a Zipf distribution over them).
    pub subjects: usize,
    /// `cache`: each policy's `maxItems`.
    pub cache_items: u64,
    /// `ingest`: measure a stream with two personal-data fields (`spec.pii`) beside the same
    /// stream without, in the same run.
    pub pii: bool,
    /// `scale`: EventStreams (one Subscription each) of the measured pipeline.
    pub streams: usize,
    /// `scale`: EventStreams (one Subscription each) of the baseline pipeline.
    pub baseline_streams: usize,
    /// `scale`: how long idle CPU is measured.
    pub idle: Duration,
    /// `scale`: how long resources may take to become Ready before the run fails, naming
    /// those that are not.
    pub ready_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("broker: {0}")]
    Broker(String),
    #[error("pipeline: {0}")]
    Pipeline(String),
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("plot: {0}")]
    Plot(String),
}

/// Refuses `--url` for a scenario that starts its own pipeline; `why` says what it needs one
/// for.
fn own_pipeline(args: &BenchArgs, why: &str) -> Result<(), BenchError> {
    match args.url {
        Some(_) => Err(BenchError::Pipeline(format!("{why}: drop --url"))),
        None => Ok(()),
    }
}

/// Runs one scenario, prints its table, and writes `--json`/`--plot` if asked.
pub async fn run(args: BenchArgs) -> Result<Vec<Report>, BenchError> {
    let reports = match args.scenario {
        Scenario::Ingest if args.pii => pii::ingest_pii(&args).await?,
        Scenario::Ingest => scenarios::ingest(&args).await?,
        Scenario::Broker => broker::broker(&args).await?,
        Scenario::Relay => broker::relay(&args).await?,
        Scenario::Archive => archive::archive(&args).await?,
        Scenario::Cache => cache::cache(&args).await?,
        Scenario::E2e => delivery::e2e(&args).await?,
        Scenario::PerKey => perkey::per_key(&args).await?,
        Scenario::Replay => replay::replay(&args).await?,
        Scenario::Drain => drain::drain(&args).await?,
        Scenario::Scale => scale::scale(&args).await?,
    };
    println!("{}", report::table(&reports));
    if let Some(path) = &args.json {
        let v = if reports.len() == 1 {
            serde_json::to_value(&reports[0])
        } else {
            serde_json::to_value(&reports)
        };
        let text = v.map(|v| serde_json::to_string_pretty(&v).unwrap_or_default());
        std::fs::write(path, text.unwrap_or_default())?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &args.plot {
        report::plot(&reports, path)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(reports)
}
