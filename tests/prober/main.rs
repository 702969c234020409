//! The continuous prober: numbered events published at a steady rate through two `weir run`
//! workers into a stored stream and a broker-only stream, each read by a `perKey` and an
//! unordered subscription delivering to a sink in the test, while a disruptor kills workers,
//! the relay owner and RabbitMQ, blackholes PostgreSQL, slows the broker path, stops a worker
//! and makes the sink fail. At the end every answered event must have been delivered by every
//! subscription of its stream, nothing delivered that was not sent (or was refused), and no
//! key out of order. See RELIABILITY.md.
//!
//! `WEIR_PROBER_SECONDS` (default 120 for the short run, 1800 for the long one),
//! `WEIR_PROBER_RATE` (events/s, default 200), `WEIR_PROBER_SEED`, `WEIR_PROBER_GAP` (seconds
//! between disruptions, default 5). The soak (`soak`, ignored) is in `soak.rs`.

#[path = "../common/mod.rs"]
mod common;
mod disrupt;
mod load;
mod report;
mod soak;

use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use common::chaos::ChaosProxy;
use common::*;
use disrupt::Disruptor;
use load::{Ledger, Receiver, Targets};
use report::{Sample, Sampler, Sub};
use tokio_util::sync::CancellationToken;

pub const NS: &str = "test";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The services behind proxies, the manifests, the receiver and two workers.
pub struct Rig {
    pub run: String,
    pub m: Manifests,
    pub db: sqlx::PgPool,
    pub db_name: String,
    pub pg_proxy: Arc<ChaosProxy>,
    pub amqp_proxy: Arc<ChaosProxy>,
    pub receiver: Receiver,
    pub streams: Vec<String>,
    pub subs: Vec<Sub>,
    pub workers: Vec<Weir>,
    pub targets: Targets,
    pub pids: Arc<Mutex<Vec<u32>>>,
}

/// Worker settings: publishes answer (503) within 5 s when the store or broker hangs.
pub const WORKER_ENV: &[(&str, &str)] = &[("WEIR_REQUEST_TIMEOUT", "5s")];

impl Rig {
    /// `extra_yaml`: more resources in the manifest folder (the soak's archive and cache);
    /// `{stored}` in it is replaced by the stored stream's name.
    pub async fn start(extra_yaml: &str) -> Rig {
        let run = unique("p");
        let direct = fresh_database().await;
        let db_name = direct.rsplit('/').next().unwrap().to_string();
        let db = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect_with(
                sqlx::postgres::PgConnectOptions::from_str(&direct)
                    .unwrap()
                    .application_name("weir-prober"),
            )
            .await
            .unwrap();
        let pg_proxy = Arc::new(ChaosProxy::start("127.0.0.1:5432").await);
        let amqp_proxy = Arc::new(ChaosProxy::start("127.0.0.1:5672").await);
        let pg_url = format!("postgres://postgres@127.0.0.1:{}/{db_name}", pg_proxy.port);
        let amqp_url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", amqp_proxy.port);
        let m = Manifests::new(&pg_url);
        m.write(
            "secrets.yaml",
            &format!(
                "apiVersion: v1\nkind: Secret\nmetadata: {{name: rabbitmq, namespace: {NS}}}\nstringData: {{url: \"{amqp_url}\"}}\n---\n\
                 apiVersion: v1\nkind: Secret\nmetadata: {{name: pg, namespace: {NS}}}\nstringData: {{url: \"{pg_url}\"}}\n"
            ),
        );
        let receiver = Receiver::start().await;
        let streams = vec![format!("{run}-stored"), format!("{run}-bonly")];
        m.write(
            "streams.yaml",
            &format!(
                "{}---\n{}",
                stream_yaml(&streams[0], &format!("weir.test.{run}.stored"), ""),
                broker_only_yaml(&streams[1], &format!("weir.test.{run}.bonly"))
            ),
        );
        let mut subs = Vec::new();
        let mut yaml = String::new();
        for (stream, sname) in streams.iter().enumerate() {
            for per_key in [true, false] {
                let name = format!("{sname}-{}", if per_key { "key" } else { "any" });
                // Retries enough to outlast every disruption (the longest, a RabbitMQ restart,
                // takes well under a minute; 1,000 retries at up to 2 s are half an hour), so a
                // dead letter means a lost event, not an exhausted budget.
                let order = if per_key {
                    "  ordering: perKey\n  partitions: 4\n"
                } else {
                    ""
                };
                let _ = std::fmt::Write::write_fmt(
                    &mut yaml,
                    format_args!(
                        "---\napiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: {name}, namespace: {NS}}}\n\
                         spec:\n  stream: {sname}\n  sink: {{uri: \"{}/{name}\"}}\n  consumers: 8\n{order}\
                         \x20 delivery: {{timeout: 2s, retry: 1000, backoffDelay: 100ms, backoffMax: 2s}}\n",
                        receiver.url
                    ),
                );
                subs.push(Sub {
                    name,
                    stream,
                    per_key,
                });
            }
        }
        m.write("subscriptions.yaml", &yaml);
        if !extra_yaml.is_empty() {
            m.write("extra.yaml", &extra_yaml.replace("{stored}", &streams[0]));
        }
        let mut workers = vec![
            Weir::start_with(m.path(), WORKER_ENV),
            Weir::start_with(m.path(), WORKER_ENV),
        ];
        for w in &mut workers {
            for s in &streams {
                w.wait_ready_within(NS, s, 120).await;
            }
            for s in &subs {
                w.wait_ready_within(NS, &s.name, 120).await;
            }
        }
        let targets = Targets {
            workers: Arc::new(RwLock::new(workers.iter().map(|w| w.url.clone()).collect())),
            streams: streams.clone(),
            ns: NS.into(),
        };
        let pids = Arc::new(Mutex::new(workers.iter().map(|w| w.child.id()).collect()));
        Rig {
            run,
            m,
            db,
            db_name,
            pg_proxy,
            amqp_proxy,
            receiver,
            streams,
            subs,
            workers,
            targets,
            pids,
        }
    }

    pub fn sampler(&self) -> Sampler {
        Sampler {
            pids: self.pids.clone(),
            db: self.db.clone(),
            db_name: self.db_name.clone(),
            amqp_proxy: self.amqp_proxy.clone(),
        }
    }

    /// The tallies of every subscription against `ledger`.
    pub fn tallies(&self, ledger: &Ledger) -> Vec<report::Tally> {
        let l = ledger.0.lock().unwrap().clone();
        self.subs
            .iter()
            .map(|s| report::tally(&self.run, &l, s, &self.receiver.got(&s.name)))
            .collect()
    }

    /// Waits until every answered event is delivered by every subscription (or `within`
    /// passed), then until the sink saw nothing new for 5 s (late duplicates and
    /// redeliveries are counted too).
    pub async fn drain(&self, ledger: &Ledger, within: Duration) -> Duration {
        let t = Instant::now();
        while t.elapsed() < within {
            if self.tallies(ledger).iter().all(|t| t.missing.is_empty()) {
                break;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let quiet_deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < quiet_deadline {
            let (_, last) = self.receiver.activity();
            if last.is_none_or(|l| l.elapsed() > Duration::from_secs(5)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        t.elapsed()
    }

    /// Messages left in each subscription's dead-letter queue.
    pub async fn dlq(&self) -> Vec<Option<u32>> {
        let mut out = Vec::new();
        for s in &self.subs {
            out.push(queue_len(&format!("weir-dlq.{NS}.{}", s.name)).await);
        }
        out
    }

    /// Worker processes that exited by themselves (never expected).
    pub fn crashed(&mut self) -> Vec<String> {
        self.workers
            .iter_mut()
            .enumerate()
            .filter_map(|(i, w)| {
                w.child
                    .try_wait()
                    .ok()
                    .flatten()
                    .map(|st| format!("worker {i}: {st}; log:\n{}", w.log_text()))
            })
            .collect()
    }
}

/// Samples resources every `every` until `stop`.
pub fn spawn_sampler(
    sampler: Sampler,
    started: Instant,
    every: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Vec<Sample>> {
    tokio::spawn(async move {
        let mut out = Vec::new();
        loop {
            out.push(sampler.sample(started).await);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
        }
        out.push(sampler.sample(started).await);
        out
    })
}

async fn probe(default_seconds: u64) {
    let seconds = env_u64("WEIR_PROBER_SECONDS", default_seconds);
    let rate = env_u64("WEIR_PROBER_RATE", 200) as u32;
    let seed = env_u64("WEIR_PROBER_SEED", rand::random());
    let gap = Duration::from_secs(env_u64("WEIR_PROBER_GAP", 5));
    eprintln!(
        "[prober] WEIR_PROBER_SECONDS={seconds} WEIR_PROBER_RATE={rate} WEIR_PROBER_SEED={seed} WEIR_PROBER_GAP={}",
        gap.as_secs()
    );
    report::self_check();
    let mut rig = Rig::start("").await;
    let started = Instant::now();
    let ledger = Ledger::default();
    let stop = CancellationToken::new();
    let sender = tokio::spawn(load::send(
        rig.run.clone(),
        rate,
        rig.targets.clone(),
        ledger.clone(),
        stop.clone(),
    ));
    let sampling_stop = CancellationToken::new();
    let sampling = spawn_sampler(
        rig.sampler(),
        started,
        Duration::from_secs(5),
        sampling_stop.clone(),
    );
    let mut disruptor = Disruptor {
        workers: std::mem::take(&mut rig.workers),
        pids: rig.pids.clone(),
        targets: rig.targets.clone(),
        dir: rig.m.path().to_path_buf(),
        env: WORKER_ENV.to_vec(),
        pg_proxy: rig.pg_proxy.clone(),
        amqp_proxy: rig.amqp_proxy.clone(),
        receiver: rig.receiver.clone(),
        db: rig.db.clone(),
        db_name: rig.db_name.clone(),
        rng: disrupt::seeded(seed),
    };
    let until = started + Duration::from_secs(seconds);
    let applied = disruptor
        .run(started, until, gap, CancellationToken::new())
        .await;
    rig.workers = std::mem::take(&mut disruptor.workers);
    stop.cancel();
    let sent = sender.await.unwrap();
    let sending = started.elapsed();
    let drained = rig.drain(&ledger, Duration::from_secs(180)).await;
    // The last sample after the drain: the sender's connections (thousands while a worker
    // was stopped) are closed by then, so what is left is the workers' own.
    sampling_stop.cancel();
    let samples = sampling.await.unwrap();
    let tallies = rig.tallies(&ledger);
    let dlq = rig.dlq().await;
    let crashed = rig.crashed();
    let l = ledger.0.lock().unwrap().clone();
    eprintln!(
        "\n[prober] seed {seed}: {sent} events in {:.0}s ({:.0}/s asked {rate}/s), drained in {:.0}s, \
         sink answered 500 or hung {} times\n",
        sending.as_secs_f64(),
        sent as f64 / sending.as_secs_f64(),
        drained.as_secs_f64(),
        rig.receiver.refused()
    );
    eprintln!("{}", report::counts_table(&l, &rig.subs, &tallies, &dlq));
    eprintln!("{}", report::timeline(&applied));
    eprintln!("{}", report::disruptions_table(&applied));
    eprintln!(
        "{}",
        report::resources_table(&samples, Duration::from_secs(20))
    );
    for (s, t) in rig.subs.iter().zip(&tallies) {
        if !t.clean() {
            eprintln!(
                "{}: missing {:?}\nunexpected {:?}\norder {:?}",
                s.name,
                &t.missing[..t.missing.len().min(20)],
                &t.unexpected[..t.unexpected.len().min(20)],
                &t.order_violations[..t.order_violations.len().min(20)]
            );
        }
    }
    for (i, pid) in rig.pids.lock().unwrap().iter().enumerate() {
        eprintln!(
            "worker {i} (pid {pid}): {} open files; TCP: {}",
            common::chaos::open_fds(*pid).unwrap_or(0),
            common::chaos::tcp_summary(*pid)
        );
    }
    assert!(
        crashed.is_empty(),
        "workers exited by themselves: {crashed:?}"
    );
    for k in disrupt::ALL {
        assert!(
            applied.iter().any(|a| a.kind == k),
            "{k:?} was never applied"
        );
    }
    assert!(
        l.iter().any(|s| s.answer == load::Answer::Accepted),
        "no publish was answered 2xx"
    );
    for (s, t) in rig.subs.iter().zip(&tallies) {
        assert!(t.delivered > 0, "{}: nothing delivered", s.name);
        assert!(
            t.missing.is_empty(),
            "{}: {} answered events never delivered",
            s.name,
            t.missing.len()
        );
        assert!(
            t.unexpected.is_empty(),
            "{}: {} unexpected deliveries",
            s.name,
            t.unexpected.len()
        );
        assert!(
            t.order_violations.is_empty(),
            "{}: {} order violations",
            s.name,
            t.order_violations.len()
        );
    }
}

/// About two minutes, every disruption at least once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prober_short() {
    probe(120).await;
}

/// Thirty minutes (record the result in RELIABILITY.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "30 minutes; run with --ignored"]
async fn prober_long() {
    probe(1800).await;
}

/// One hour of steady mixed load, no faults: resources must not grow after warm-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "one hour; run with --ignored"]
async fn soak() {
    soak::soak().await;
}
