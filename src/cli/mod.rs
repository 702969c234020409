//! The `weir` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

mod archive;
mod client;
mod delivery;
mod keys;
mod output;
mod plugin;
mod status;
mod trace;

pub use archive::ArchiveAction;
pub use delivery::DlqAction;
pub use output::Output;

#[derive(Parser, Debug)]
#[command(
    name = "weir",
    version,
    about = "Event pipelines declared as Kubernetes resources"
)]
pub struct Cli {
    /// Ingest/read API of a running weir (for client commands).
    #[arg(
        long,
        global = true,
        env = "WEIR_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    /// Admin API of a running weir (for client commands).
    #[arg(
        long,
        global = true,
        env = "WEIR_ADMIN_URL",
        default_value = "http://127.0.0.1:9090"
    )]
    pub admin: String,
    /// File holding the bearer token client commands send: to the admin API for `weir status`,
    /// `weir dlq` and `weir archive` (the admin token file standalone; a Kubernetes token for
    /// audience `weir` with the operator, e.g. from `kubectl create token NAME --audience
    /// weir`), and to the read API for `weir tail` and `weir trace` (a publisher's or reader's
    /// token of a stream with `ingest.auth`).
    #[arg(long, global = true, env = "WEIR_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Output format of client commands.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the pipelines declared in a folder of manifests (standalone mode).
    Run {
        /// Folder of YAML manifests (EventStream, Subscription, ArchivePolicy, CachePolicy,
        /// Secret, ConfigMap). Watched: changes apply without a restart.
        #[arg(short = 'f', long = "filename")]
        dir: PathBuf,
        /// When a manifest is deleted, also remove its queues, exchange and stored events if
        /// its deletionPolicy is Delete. Without it, data is always kept.
        #[arg(long)]
        prune: bool,
        #[command(flatten)]
        worker: WorkerArgs,
        /// Admin (health, metrics, status, dead letters, archive) listen address. Loopback by
        /// default: another address needs --admin-token-file.
        #[arg(long, env = "WEIR_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
        admin_listen: SocketAddr,
        /// File holding the bearer token the admin API's protected endpoints require (dead
        /// letters, archive, status details). Read at start (refused if unreadable or
        /// empty) and again on every protected request, so a rotated token applies at once.
        #[arg(long, env = "WEIR_ADMIN_TOKEN_FILE")]
        admin_token_file: Option<PathBuf>,
        #[command(flatten)]
        policy: PolicyArgs,
        /// Let sinks on loopback (127.0.0.0/8, ::1) be delivered to, for local development
        /// (the quickstart's sink). This worker's own ports stay refused.
        #[arg(long)]
        allow_loopback_sinks: bool,
    },
    /// Run as the in-cluster controller and worker: watch the resources through the
    /// Kubernetes API and run their pipelines.
    Operator {
        /// Namespaces to watch, comma-separated; default all.
        #[arg(long, env = "WEIR_NAMESPACES", value_delimiter = ',')]
        namespaces: Vec<String>,
        #[command(flatten)]
        worker: WorkerArgs,
        /// Admin (health, metrics, status, dead letters, archive) listen address. Loopback by
        /// default, as standalone; the chart sets the Pod's address explicitly so that probes
        /// and Prometheus reach it. Its protected endpoints always need a Kubernetes token.
        #[arg(long, env = "WEIR_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
        admin_listen: SocketAddr,
        /// TokenReview audience of admin API tokens (`kubectl create token NAME --audience
        /// weir`).
        #[arg(long, env = "WEIR_ADMIN_TOKEN_AUDIENCE", default_value = crate::admin::auth::DEFAULT_AUDIENCE)]
        admin_token_audience: String,
        /// Namespace of the leader-election Lease (the Pod's own namespace in a cluster).
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        lease_namespace: String,
        /// Name of the leader-election Lease.
        #[arg(long, env = "WEIR_LEASE_NAME", default_value = "weir-operator")]
        lease_name: String,
        /// This replica's identity in the Lease (the Pod name in a cluster).
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Resync interval of valid resources and maximum age of cached Secrets.
        #[arg(long, env = "WEIR_REFRESH", default_value = "60s", value_parser = parse_duration)]
        refresh: Duration,
        /// Label selector of the worker Pods, written as each Subscription's `status.selector`
        /// (the `/scale` selector an HPA reads Pod metrics through). The chart sets it.
        #[arg(long, env = "WEIR_POD_SELECTOR", default_value = crate::control::context::DEFAULT_POD_SELECTOR)]
        pod_selector: String,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Check a folder of manifests without starting anything; exit 1 on any problem.
    Validate {
        #[arg(short = 'f', long = "filename")]
        dir: PathBuf,
        /// Validate as `weir operator` would (in a cluster), not as `weir run`: allows what
        /// needs the Kubernetes API, such as `ingest.auth.mode: ServiceAccounts`.
        #[arg(long)]
        operator: bool,
        #[command(flatten)]
        policy: PolicyArgs,
        /// Accept sinks on loopback, as `weir run --allow-loopback-sinks` does.
        #[arg(long)]
        allow_loopback_sinks: bool,
    },
    /// Print the CustomResourceDefinitions as multi-document YAML.
    Crds,
    /// Show every resource and its conditions (like `kubectl get weir`). As `kubectl weir
    /// status`, read from the cluster (`--kubeconfig`, `--context`, `-n`, `-A`).
    Status,
    /// Measure throughput and latency beside a raw baseline in the same run.
    Bench(BenchCmd),
    /// Dead letters of a subscription (through the admin API).
    Dlq {
        #[command(subcommand)]
        action: delivery::DlqAction,
    },
    /// Archive operations: run now, totals, verify (through the admin API).
    Archive {
        #[command(subcommand)]
        action: archive::ArchiveAction,
    },
    /// Forget a subject of a stream with personal-data fields (`spec.pii`): deletes its data
    /// key, so its fields read, deliver and replay as "weir:pii:forgotten" (audited; through
    /// the admin API).
    Forget {
        /// `<namespace>/<stream>`.
        target: String,
        /// The event `subject` to forget.
        subject: String,
    },
    /// Personal-data key operations (through the admin API).
    Keys {
        #[command(subcommand)]
        action: keys::KeysAction,
    },
    /// Print events as they are stored in a stream, following new ones (Ctrl-C stops).
    Tail {
        /// `<namespace>/<stream>`.
        target: String,
        /// First position to print.
        #[arg(long, default_value_t = 1)]
        from: i64,
    },
    /// Print a saga: every stored event of a namespace carrying a correlationid, as a
    /// causation tree (`causationid` → parent).
    Trace {
        namespace: String,
        correlationid: String,
    },
    /// Receive CloudEvents over HTTP and print each one (a sink for quickstarts and
    /// debugging).
    Sink {
        #[arg(long, default_value = "127.0.0.1:8888")]
        listen: SocketAddr,
    },
}

/// What both `weir run` and `weir operator` serve with: the ingest port and its limits.
#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    /// Ingest/read listen address.
    #[arg(long, env = "WEIR_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// How long a publish may wait for durability before it is answered 503.
    #[arg(long, env = "WEIR_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// Base URL shown as stream endpoints in status (default: the listen address; in a
    /// cluster, e.g. the ingest Service's URL).
    #[arg(long, env = "WEIR_PUBLIC_URL")]
    public_url: Option<String>,
    /// Publish requests each stream may queue for its batcher; beyond that, 503.
    #[arg(long, env = "WEIR_BATCH_QUEUE", default_value_t = 1024)]
    batch_queue: usize,
    #[command(flatten)]
    server: crate::server::ServerArgs,
}

impl WorkerArgs {
    fn config(self) -> crate::app::WorkerConfig {
        crate::app::WorkerConfig {
            listen: self.listen,
            request_timeout: self.request_timeout,
            public_url: self.public_url,
            batch_queue: self.batch_queue,
            server: self.server.limits(),
        }
    }
}

/// Operator-wide limits on what manifests may ask for, shared by `run`, `operator` and
/// `validate`.
#[derive(clap::Args, Debug, Clone)]
pub struct PolicyArgs {
    /// Let streams publish to exchanges outside their namespace's prefix `weir.<namespace>.`
    /// (never to other namespaces' `weir.` names). Also WEIR_ALLOW_CUSTOM_EXCHANGES=true.
    #[arg(long)]
    allow_custom_exchanges: bool,
    #[command(flatten)]
    sinks: SinkArgs,
}

impl PolicyArgs {
    /// Sets the policy into `defaults` (the environment's `WEIR_ALLOW_CUSTOM_EXCHANGES` stays
    /// on when set).
    fn apply(self, defaults: &mut crate::topology::Defaults, allow_loopback_sinks: bool) {
        defaults.allow_custom_exchanges |= self.allow_custom_exchanges;
        defaults.sinks = self.sinks.policy(allow_loopback_sinks);
    }
}

/// Where sinks may point beyond the sink guard's default (docs/security-sinks.md).
#[derive(clap::Args, Debug, Clone)]
pub struct SinkArgs {
    /// Address ranges sinks may reach although the sink guard refuses them by default
    /// (loopback, link-local, unspecified): comma-separated CIDRs, e.g. 169.254.10.0/24.
    /// Private ranges need no entry. This worker's own ingest and admin ports stay refused.
    #[arg(long, env = "WEIR_SINK_ALLOW_CIDRS", value_parser = parse_cidrs)]
    sink_allow_cidrs: Option<CidrList>,
}

/// The value of `--sink-allow-cidrs`.
#[derive(Clone, Debug)]
struct CidrList(Vec<ipnet::IpNet>);

fn parse_cidrs(s: &str) -> Result<CidrList, String> {
    crate::data::delivery::SinkPolicy::parse_cidrs(s).map(CidrList)
}

impl SinkArgs {
    fn policy(self, allow_loopback: bool) -> crate::data::delivery::SinkPolicy {
        crate::data::delivery::SinkPolicy {
            allow_loopback,
            allow: self.sink_allow_cidrs.map(|c| c.0).unwrap_or_default(),
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct BenchCmd {
    /// The scenario to measure.
    #[arg(value_enum)]
    scenario: crate::bench::Scenario,
    /// Events to measure after warm-up (batch-1 variants measure at most 50,000; e2e: per
    /// offered rate; replay: events stored and replayed; cache: reads per strategy; archive:
    /// corpus events archived).
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Concurrent HTTP clients (batch-1 variants use at least 64).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Events per request (default: both 1 and 100).
    #[arg(long)]
    batch: Option<usize>,
    /// Bytes of each event's JSON payload.
    #[arg(long, default_value_t = 512)]
    payload: usize,
    /// Offered rate in events/s (default: as fast as possible; e2e: 1k, 5k, 20k and as fast
    /// as possible).
    #[arg(long)]
    rate: Option<u64>,
    /// Stop each measurement after this long.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// `cache`: distinct subjects stored and read (Zipf-distributed, s = 1).
    #[arg(long, default_value_t = 1000)]
    subjects: usize,
    /// `cache`: `maxItems` of each strategy's CachePolicy.
    #[arg(long, default_value_t = 100)]
    cache_items: u64,
    /// `ingest`: also run a stream encrypting two personal-data fields (`spec.pii`) beside
    /// the same stream without, and report their ratio.
    #[arg(long)]
    pii: bool,
    /// `scale`: EventStreams in the measured pipeline, each with store, broker and one
    /// Subscription (`--rate` defaults to 100 ev/s over all of them, `--duration` to 30s).
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// `scale`: EventStreams (one Subscription each) of the small pipeline measured beside it.
    #[arg(long, default_value_t = 10)]
    baseline_streams: usize,
    /// `scale`: how long idle CPU is measured once every resource is Ready.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    idle: Duration,
    /// `scale`: fail, naming the resources that are not Ready, after this long.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    ready_timeout: Duration,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw latency percentiles against offered rate into this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// PostgreSQL server for the benchmark's fresh databases.
    #[arg(
        long,
        env = "WEIR_BENCH_PG",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pg: String,
    /// RabbitMQ for the benchmark's fresh exchanges and queues.
    #[arg(
        long,
        env = "WEIR_BENCH_AMQP",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp: String,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::topology::units::parse_duration(s).map_err(|e| e.to_string())
}

pub fn main() -> ExitCode {
    // Run as `kubectl-weir` (a kubectl plugin), the command line also takes kubectl's
    // cluster flags; see `plugin`.
    let (cli, kube) = if plugin::invoked_as_plugin() {
        let (cli, flags) = plugin::parse();
        (cli, Some(flags))
    } else {
        (Cli::parse(), None)
    };
    // Spans are exported by the commands that move events, when the OTEL_* environment asks.
    let otel = match &cli.command {
        Command::Run { .. } | Command::Operator { .. } => crate::otel::from_env(),
        _ => Ok(None),
    };
    let (layer, exporter) = match otel {
        Ok(o) => o.unzip(),
        Err(e) => {
            eprintln!("error: tracing export: {e}");
            return ExitCode::FAILURE;
        }
    };
    crate::telemetry::init(layer);
    let code = match dispatch(cli, kube) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    if let Some(exporter) = exporter {
        exporter.shutdown();
    }
    code
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn dispatch(cli: Cli, kube: Option<plugin::KubeFlags>) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            dir,
            prune,
            worker,
            admin_listen,
            admin_token_file,
            policy,
            allow_loopback_sinks,
        } => {
            let mut defaults = crate::topology::Defaults::from_env()?;
            policy.apply(&mut defaults, allow_loopback_sinks);
            runtime()?.block_on(async move {
                let shutdown = CancellationToken::new();
                crate::shutdown::on_signal(shutdown.clone());
                crate::app::run(
                    crate::app::RunConfig {
                        dir,
                        prune,
                        worker: worker.config(),
                        admin_listen,
                        admin_token_file,
                    },
                    defaults,
                    shutdown,
                )
                .await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Operator {
            namespaces,
            worker,
            admin_listen,
            admin_token_audience,
            lease_namespace,
            lease_name,
            identity,
            refresh,
            pod_selector,
            policy,
        } => {
            let mut defaults = crate::topology::Defaults::from_env()?;
            // No loopback switch in a cluster: a range is allowed by name, on purpose.
            policy.apply(&mut defaults, false);
            let identity =
                identity.unwrap_or_else(|| format!("weir-{}", uuid::Uuid::now_v7().simple()));
            runtime()?.block_on(async move {
                let shutdown = CancellationToken::new();
                crate::shutdown::on_signal(shutdown.clone());
                crate::control::run(
                    crate::control::OperatorConfig {
                        namespaces: namespaces.into_iter().filter(|n| !n.is_empty()).collect(),
                        worker: worker.config(),
                        admin_listen,
                        admin_token_audience,
                        lease: crate::control::leader::LeaseConfig {
                            namespace: lease_namespace,
                            name: lease_name,
                            identity,
                            duration: 15,
                            grace: 5,
                        },
                        refresh,
                        pod_selector,
                        status_queue: crate::control::status_writer::DEFAULT_CAPACITY,
                        concurrency: 4,
                    },
                    defaults,
                    shutdown,
                )
                .await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate {
            dir,
            operator,
            policy,
            allow_loopback_sinks,
        } => {
            let mut defaults = crate::topology::Defaults::from_env()?;
            defaults.token_review = operator;
            policy.apply(&mut defaults, allow_loopback_sinks);
            let report = crate::source::folder::validate(&dir, &defaults)?;
            for p in &report.problems {
                println!("{p}");
            }
            if report.is_ok() {
                println!("{}: {} resources valid", dir.display(), report.resources);
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("{} problem(s) found", report.problems.len());
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Crds => {
            print!("{}", crate::api::crds::to_yaml()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Status => {
            if let Some(flags) = kube {
                return runtime()?.block_on(plugin::status(&flags, cli.output));
            }
            let token = client::read_token(cli.token_file.as_deref())?;
            runtime()?.block_on(status::status(&cli.admin, token.as_deref(), cli.output))
        }
        Command::Dlq { action } => {
            let token = client::read_token(cli.token_file.as_deref())?;
            runtime()?.block_on(delivery::dlq(
                &cli.admin,
                token.as_deref(),
                cli.output,
                action,
            ))
        }
        Command::Archive { action } => {
            let token = client::read_token(cli.token_file.as_deref())?;
            runtime()?.block_on(archive::archive(
                &cli.admin,
                token.as_deref(),
                cli.output,
                action,
            ))
        }
        Command::Forget { target, subject } => {
            let token = client::read_token(cli.token_file.as_deref())?;
            runtime()?.block_on(keys::forget(
                &cli.admin,
                token.as_deref(),
                cli.output,
                &target,
                &subject,
            ))
        }
        Command::Keys { action } => {
            let token = client::read_token(cli.token_file.as_deref())?;
            runtime()?.block_on(keys::keys(&cli.admin, token.as_deref(), cli.output, action))
        }
        Command::Tail { target, from } => {
            let token = client::read_token(cli.token_file.as_deref())?;
            runtime()?.block_on(delivery::tail(
                &cli.url,
                token.as_deref(),
                cli.output,
                &target,
                from,
            ))
        }
        Command::Trace {
            namespace,
            correlationid,
        } => {
            let token = client::read_token(cli.token_file.as_deref())?;
            runtime()?.block_on(trace::trace(
                &cli.url,
                token.as_deref(),
                cli.output,
                &namespace,
                &correlationid,
            ))
        }
        Command::Sink { listen } => runtime()?.block_on(delivery::sink(listen, cli.output)),
        Command::Bench(b) => {
            // `--url` (global) targets a running weir only when given explicitly.
            let url = std::env::args()
                .any(|a| a == "--url" || a.starts_with("--url="))
                .then(|| cli.url.clone());
            let args = crate::bench::BenchArgs {
                scenario: b.scenario,
                events: b.events,
                concurrency: b.concurrency,
                batch: b.batch,
                payload: b.payload,
                rate: b.rate,
                duration: b.duration,
                url,
                json: b.json,
                plot: b.plot,
                pg_url: b.pg,
                amqp_url: b.amqp,
                subjects: b.subjects,
                cache_items: b.cache_items,
                pii: b.pii,
                streams: b.streams,
                baseline_streams: b.baseline_streams,
                idle: b.idle,
                ready_timeout: b.ready_timeout,
            };
            runtime()?.block_on(crate::bench::run(args))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
