//! The disruptor: one fault at a time, in a seeded random order, each undone before the next.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use tokio_util::sync::CancellationToken;

use crate::common::Weir;
use crate::common::chaos::{self, ChaosProxy, Flow, RabbitKilled};
use crate::load::{Receiver, SinkMode, Targets};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// SIGKILL the worker holding the stored stream's relay lock, then start it again.
    KillRelayOwner,
    /// SIGKILL a worker while it delivers, then start it again.
    KillWorker,
    /// SIGKILL RabbitMQ's VM, then start the node again.
    KillRabbit,
    /// PostgreSQL's proxy forwards nothing for 5 s (connections hang).
    PgBlackhole,
    /// 200 ms more in each direction between the workers and RabbitMQ for 15 s.
    BrokerLatency,
    /// SIGSTOP a worker for 10 s (its locks, leases and unacked messages held), then SIGCONT.
    StopWorker,
    /// The sink answers 500 for 6 s, then holds requests past the delivery timeout for 6 s.
    SinkTrouble,
}

pub const ALL: [Kind; 7] = [
    Kind::KillRelayOwner,
    Kind::KillWorker,
    Kind::KillRabbit,
    Kind::PgBlackhole,
    Kind::BrokerLatency,
    Kind::StopWorker,
    Kind::SinkTrouble,
];

/// One disruption applied: when (since the run began), how long it lasted, what it hit.
#[derive(Clone, Debug)]
pub struct Applied {
    pub kind: Kind,
    pub at: Duration,
    pub took: Duration,
    pub note: String,
}

/// The advisory-lock class of relay locks (`RELAY_LOCK_CLASS` in `src/data/relay.rs`).
const RELAY_LOCK_CLASS: i64 = 0x5745_4951;

pub struct Disruptor {
    pub workers: Vec<Weir>,
    /// Each worker's pid, for the resource sampler.
    pub pids: Arc<Mutex<Vec<u32>>>,
    pub targets: Targets,
    pub dir: PathBuf,
    pub env: Vec<(&'static str, &'static str)>,
    pub pg_proxy: Arc<ChaosProxy>,
    pub amqp_proxy: Arc<ChaosProxy>,
    pub receiver: Receiver,
    /// A direct connection (not through the proxy) to the run's database.
    pub db: sqlx::PgPool,
    pub db_name: String,
    pub rng: StdRng,
}

/// The disruptor's random order, from the run's seed.
pub fn seeded(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

impl Disruptor {
    /// Applies disruptions `gap` apart until `until`, and at least one of each kind; stops
    /// early when `stop` is cancelled.
    pub async fn run(
        &mut self,
        started: Instant,
        until: Instant,
        gap: Duration,
        stop: CancellationToken,
    ) -> Vec<Applied> {
        let mut applied: Vec<Applied> = Vec::new();
        let mut deck: Vec<Kind> = Vec::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(gap) => {}
            }
            let every_kind = ALL.iter().all(|k| applied.iter().any(|a| a.kind == *k));
            if Instant::now() >= until && every_kind {
                break;
            }
            if deck.is_empty() {
                deck = ALL.to_vec();
                deck.shuffle(&mut self.rng);
            }
            let kind = deck.pop().expect("a card");
            let at = started.elapsed();
            let t = Instant::now();
            eprintln!("[prober] {:>6.1}s  {kind:?} …", at.as_secs_f64());
            let note = self.apply(kind).await;
            let took = t.elapsed();
            eprintln!(
                "[prober] {:>6.1}s  {kind:?} done in {:.1}s ({note})",
                started.elapsed().as_secs_f64(),
                took.as_secs_f64()
            );
            applied.push(Applied {
                kind,
                at,
                took,
                note,
            });
        }
        applied
    }

    async fn apply(&mut self, kind: Kind) -> String {
        match kind {
            Kind::KillRelayOwner => {
                // Right after another disruption the lock may be between owners: ask for 15 s.
                let mut owner = None;
                for _ in 0..30 {
                    owner = self.relay_owner().await;
                    if owner.is_some() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                let (i, note) = match owner {
                    Some(i) => (i, format!("owner: worker {i}")),
                    None => (0, "owner not found: worker 0".to_string()),
                };
                self.kill_and_restart(i).await;
                note
            }
            Kind::KillWorker => {
                let i = usize::from(rand::Rng::random_bool(&mut self.rng, 0.5));
                self.kill_and_restart(i).await;
                format!("worker {i}")
            }
            Kind::KillRabbit => {
                let killed = RabbitKilled::kill().await;
                tokio::time::sleep(Duration::from_secs(2)).await;
                let back = killed.restart().await;
                format!("back in {:.1}s", back.as_secs_f64())
            }
            Kind::PgBlackhole => {
                self.pg_proxy.set(Flow {
                    stalled: true,
                    ..Flow::default()
                });
                tokio::time::sleep(Duration::from_secs(5)).await;
                self.pg_proxy.set(Flow::default());
                "5s".into()
            }
            Kind::BrokerLatency => {
                self.amqp_proxy.set(Flow {
                    latency: Duration::from_millis(200),
                    ..Flow::default()
                });
                tokio::time::sleep(Duration::from_secs(15)).await;
                self.amqp_proxy.set(Flow::default());
                "200ms for 15s".into()
            }
            Kind::StopWorker => {
                let i = usize::from(rand::Rng::random_bool(&mut self.rng, 0.5));
                let pid = self.workers[i].child.id();
                chaos::signal(pid, "STOP");
                tokio::time::sleep(Duration::from_secs(10)).await;
                chaos::signal(pid, "CONT");
                format!("worker {i}")
            }
            Kind::SinkTrouble => {
                self.receiver.set_mode(SinkMode::Fail);
                tokio::time::sleep(Duration::from_secs(6)).await;
                self.receiver.set_mode(SinkMode::Hang);
                tokio::time::sleep(Duration::from_secs(6)).await;
                self.receiver.set_mode(SinkMode::Ok);
                "500s 6s, hangs 6s".into()
            }
        }
    }

    /// The worker whose lock session holds the stored stream's relay lock: PostgreSQL names
    /// the session's client port (the proxy's side), the proxy maps it to the worker's port,
    /// and `ss` names the process.
    async fn relay_owner(&self) -> Option<usize> {
        let port: i32 = sqlx::query_scalar(
            "SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'advisory' AND l.classid = $1::bigint::oid AND l.objsubid = 2
               AND l.granted AND a.datname = $2
             LIMIT 1",
        )
        .bind(RELAY_LOCK_CLASS)
        .bind(&self.db_name)
        .fetch_optional(&self.db)
        .await
        .ok()??;
        let client = self.pg_proxy.client_port(u16::try_from(port).ok()?)?;
        let pid = chaos::pid_with_local_port(client)?;
        self.workers.iter().position(|w| w.child.id() == pid)
    }

    /// SIGKILL worker `i`, start a new one on the same folder, and wait until it is ready.
    async fn kill_and_restart(&mut self, i: usize) {
        self.workers[i].kill9();
        // Let its deliveries and leases be seen as gone before the replacement starts.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut w = Weir::start_with(&self.dir, &self.env);
        for s in &self.targets.streams {
            w.wait_ready_within(&self.targets.ns, s, 120).await;
        }
        self.pids.lock().unwrap()[i] = w.child.id();
        self.targets.workers.write().unwrap()[i] = w.url.clone();
        self.workers[i] = w;
    }
}
