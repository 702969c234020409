//! Failover as it happens in production: a PostgreSQL primary with a synchronous
//! streaming-replication standby, both started by this test in a temporary folder on ports of
//! their own. While publishers keep publishing, the primary is stopped (`-m immediate`, a
//! crash) and the standby promoted. The stream's Secret lists both URLs: ingest answers 503
//! while there is no primary, then continues on the promoted standby, and every event that
//! was answered 2xx is there, once, at the position it was answered with, and reaches the
//! stream's exchange through the relay. The crashed primary then comes back, writable: writes
//! stay on the new primary, and a second process's read cache still sees the first's appends.
//!
//! The clusters run as the `postgres` user when the test runs as root (`initdb` refuses to run
//! as root). The test is skipped (it passes, saying why) only when the PostgreSQL server
//! binaries or `runuser` are missing.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::pg::{PgRunner, pg_bin_dir, running_as_root};
use common::*;
use serde_json::{Value, json};

/// One PostgreSQL cluster of the pair.
struct Node {
    data: PathBuf,
    port: u16,
    log: PathBuf,
}

impl Node {
    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn append_conf(&self, file: &str, lines: &str) {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data.join(file))
            .unwrap_or_else(|e| panic!("open {file}: {e}"));
        f.write_all(lines.as_bytes())
            .expect("append to the configuration");
    }

    fn start(&self, pg: &PgRunner) {
        let (data, log) = (self.data.to_string_lossy(), self.log.to_string_lossy());
        pg.run(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-w", "-t", "60", "start"],
        );
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A primary and its synchronous standby in a temporary folder. Dropping it stops both
/// servers (immediately) whatever happened, then removes the folder.
struct Pair {
    pg: PgRunner,
    primary: Node,
    standby: Node,
    root: tempfile::TempDir,
}

impl Drop for Pair {
    fn drop(&mut self) {
        for node in [&self.primary, &self.standby] {
            if node.data.join("postmaster.pid").exists() {
                self.pg.stop_now(&node.data);
            }
        }
    }
}

/// The standby's `application_name`, named in the primary's `synchronous_standby_names`.
const STANDBY_NAME: &str = "weir_standby";

impl Pair {
    /// `initdb` + primary start + `pg_basebackup -R` + standby start, then waits until the
    /// primary reports the standby as synchronous.
    async fn start(bin: PathBuf, as_postgres: bool) -> Pair {
        let root = tempfile::Builder::new()
            .prefix("weir-pgfo-")
            .tempdir()
            .expect("tempdir");
        let pg = PgRunner::in_dir(bin, as_postgres, root.path());
        let node = |name: &str| Node {
            data: root.path().join(name),
            port: free_port(),
            log: root.path().join(format!("{name}.log")),
        };
        let pair = Pair {
            pg,
            primary: node("primary"),
            standby: node("standby"),
            root,
        };
        let sockets = pair.root.path().to_string_lossy().to_string();
        let primary_data = pair.primary.data.to_string_lossy().to_string();
        pair.pg.run(
            "initdb",
            &[
                "-D",
                &primary_data,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
            ],
        );
        // initdb's pg_hba.conf trusts local and 127.0.0.1 connections, replication included.
        // A commit waits until the standby has flushed it (synchronous_commit = on with a
        // named synchronous standby): an answered event survives the primary's loss.
        pair.primary.append_conf(
            "postgresql.conf",
            &format!(
                "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{sockets}'\n\
                 wal_level = replica\nmax_wal_senders = 4\nhot_standby = on\n\
                 synchronous_commit = on\nsynchronous_standby_names = '{STANDBY_NAME}'\n\
                 max_connections = 50\nshared_buffers = 16MB\n",
                pair.primary.port
            ),
        );
        pair.primary.start(&pair.pg);
        let standby_data = pair.standby.data.to_string_lossy().to_string();
        let primary_port = pair.primary.port.to_string();
        pair.pg.run(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &primary_port,
                "-U",
                "postgres",
                "-D",
                &standby_data,
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
            ],
        );
        // The standby's own port; it names itself so the primary's synchronous_standby_names
        // matches it. Once promoted it has no standby of its own, so it must not wait for one
        // (in production the new primary would get a new standby).
        pair.standby.append_conf(
            "postgresql.conf",
            &format!(
                "\nport = {}\nsynchronous_standby_names = ''\n",
                pair.standby.port
            ),
        );
        pair.standby.append_conf(
            "postgresql.auto.conf",
            &format!(
                "\nprimary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name={STANDBY_NAME}'\n",
                pair.primary.port
            ),
        );
        pair.standby.start(&pair.pg);

        let primary = sqlx::PgPool::connect(&pair.primary.url())
            .await
            .expect("connect to the test primary");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let state: Option<String> = sqlx::query_scalar(
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = $1",
            )
            .bind(STANDBY_NAME)
            .fetch_optional(&primary)
            .await
            .expect("pg_stat_replication");
            if state.as_deref() == Some("sync") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the standby did not become synchronous in 60 s (state {state:?}); standby log:\n{}",
                pair.standby.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        primary.close().await;
        pair
    }

    fn crash_primary(&self) {
        let data = self.primary.data.to_string_lossy().to_string();
        self.pg
            .run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }

    /// Starts the crashed primary again: it recovers as a primary of its own (writable), as
    /// a server that was only unreachable would. Weir must not go back to it.
    fn restart_old_primary(&self) {
        self.primary.start(&self.pg);
    }

    fn promote_standby(&self) {
        let data = self.standby.data.to_string_lossy().to_string();
        self.pg
            .run("pg_ctl", &["-D", &data, "-w", "-t", "60", "promote"]);
    }
}

/// One publish attempt as the publisher saw it.
#[derive(Debug)]
struct Attempt {
    id: String,
    sent: Instant,
    answered: Instant,
    /// HTTP status, or `None` when no answer came (connection error or client timeout).
    status: Option<u16>,
    /// The position of a 2xx answer.
    position: Option<i64>,
}

/// Concurrent publishers, one event per request, each with a unique id.
const PUBLISHERS: usize = 4;

async fn publisher(n: usize, url: String, stop: Arc<AtomicBool>, log: Arc<Mutex<Vec<Attempt>>>) {
    // A client timeout well above the request timeout: weir itself answers 503 first.
    let client = common::http_builder()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("http client");
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let id = format!("p{n}-{i}");
        i += 1;
        let sent = Instant::now();
        let r = client
            .post(&url)
            .json(&json!({"type": "t", "id": id, "subject": format!("s{}", i % 10), "data": {"i": i}}))
            .send()
            .await;
        let (status, position) = match r {
            Ok(r) => {
                let status = r.status().as_u16();
                let body: Value = r.json().await.unwrap_or(Value::Null);
                (Some(status), body["results"][0]["position"].as_i64())
            }
            Err(_) => (None, None),
        };
        let failed = !status.is_some_and(|s| (200..300).contains(&s));
        log.lock().unwrap().push(Attempt {
            id,
            sent,
            answered: Instant::now(),
            status,
            position,
        });
        if failed {
            // Like a publisher honouring Retry-After, without slowing the test down.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn count_ok(log: &Mutex<Vec<Attempt>>, sent_after: Instant) -> usize {
    log.lock()
        .unwrap()
        .iter()
        .filter(|a| a.sent >= sent_after && a.status.is_some_and(|s| (200..300).contains(&s)))
        .count()
}

async fn wait_for_ok(log: &Mutex<Vec<Attempt>>, sent_after: Instant, n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    while count_ok(log, sent_after) < n {
        assert!(
            Instant::now() < deadline,
            "fewer than {n} publishes answered 2xx within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn primary_crash_and_standby_promotion_lose_no_answered_event() {
    let Some(bin) = pg_bin_dir() else {
        eprintln!("skipped: no PostgreSQL server binaries (initdb) in /usr/lib/postgresql/*/bin");
        return;
    };
    let as_root = running_as_root();
    if as_root && !Path::new("/usr/sbin/runuser").exists() && !Path::new("/sbin/runuser").exists() {
        eprintln!("skipped: running as root without runuser (initdb refuses root)");
        return;
    }
    let pair = Pair::start(bin, as_root).await;

    let m = Manifests::new(&format!("{},{}", pair.primary.url(), pair.standby.url()));
    let exchange = unique("weir.test.failover.");
    // A queue on the stream's exchange: the relay must carry on after the failover too.
    let (_amqp, channel, queue) = bind_test_queue(&exchange).await;
    m.write(
        "stream.yaml",
        &stream_yaml("orders", &exchange, "").replace(
            "store: {urlSecretRef: {name: pg, key: url}}",
            // A short connect timeout: the pool notices the dead primary within a second.
            "store: {urlSecretRef: {name: pg, key: url}, pool: {connectTimeout: 1s}}",
        ),
    );
    // A read cache on the stream, and a second process that only reads: its cached subjects
    // must still be invalidated by appends on the first after the failover.
    m.write(
        "cache.yaml",
        "apiVersion: weir.dev/v1alpha1\nkind: CachePolicy\nmetadata: {name: orders-cache, namespace: test}\n\
         spec: {streamNames: [orders], strategy: LRU, maxItems: 100, ttl: 300s}\n",
    );
    let mut w = Weir::start_with(m.path(), &[("WEIR_REQUEST_TIMEOUT", "2s")]);
    w.wait_ready("test", "orders").await;
    let mut reader = Weir::start_with(m.path(), &[("WEIR_REQUEST_TIMEOUT", "2s")]);
    reader.wait_ready("test", "orders").await;

    let log = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..PUBLISHERS)
        .map(|n| {
            tokio::spawn(publisher(
                n,
                w.events_url("test", "orders"),
                stop.clone(),
                log.clone(),
            ))
        })
        .collect();
    wait_for_ok(&log, started, 100, Duration::from_secs(30)).await;

    pair.crash_primary();
    let crashed = Instant::now();
    // Publishers meet a store without a primary for longer than the request timeout (2 s),
    // so publishes sent after the crash, not only those in flight, are refused meanwhile.
    tokio::time::sleep(Duration::from_secs(5)).await;
    // The standby takes writes as soon as promotion completes, which is a little before
    // `pg_ctl promote -w` returns: "no primary" ends when the promotion starts.
    let promoting = Instant::now();
    pair.promote_standby();
    let promoted = Instant::now();
    eprintln!(
        "primary crashed; standby promoted {:?} later",
        promoted - crashed
    );
    // Failover: the write pool finds the promoted standby writable and moves to it.
    wait_for_ok(&log, promoted, 100, Duration::from_secs(60)).await;

    // The old primary comes back, writable. Each process fails over on its own health checks
    // (the reader has no traffic to notice the outage sooner), and a crashed primary must not
    // come back writable before every process has moved (production fences it): the restart
    // waits for both. From then on writes stay on the new primary (going back could write to
    // two primaries); publishing goes on for longer than a pool health interval.
    for p in [&w, &reader] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !p
            .log_text()
            .contains("database failover: the pool now connects to URL #2")
        {
            assert!(
                Instant::now() < deadline,
                "a process did not fail over in 30 s; its log:\n{}",
                p.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    pair.restart_old_primary();
    let restarted = Instant::now();
    wait_for_ok(&log, restarted, 50, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(8).saturating_sub(restarted.elapsed())).await;

    // Cross-process invalidation still works: the reader caches a subject, the writer
    // appends to it, and the reader shows the append within a second.
    let c = common::http();
    let subject_url = format!(
        "{}/v1/namespaces/test/streams/orders/subjects/probe/events",
        reader.url
    );
    let reader_ids = || async {
        let r = c.get(&subject_url).send().await.unwrap();
        assert_eq!(r.status(), 200, "reader: {}", reader.log_text());
        let v: Value = r.json().await.unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    for (k, id) in ["probe-1", "probe-2"].into_iter().enumerate() {
        let r = c
            .post(w.events_url("test", "orders"))
            .json(&json!({"type": "t", "id": id, "subject": "probe", "data": {}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "probe publish {id}");
        let appended = Instant::now();
        loop {
            let ids = reader_ids().await;
            if ids.len() == k + 1 {
                break;
            }
            assert!(
                appended.elapsed() < Duration::from_secs(1),
                "the reader still shows {ids:?} 1 s after {id} was answered; reader log:\n{}",
                reader.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Read twice more: the subject is cached now (a hit).
        reader_ids().await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        w.child.try_wait().unwrap().is_none(),
        "weir keeps running; log:\n{}",
        w.log_text()
    );

    let log = std::mem::take(&mut *log.lock().unwrap());
    let is_ok = |a: &Attempt| a.status.is_some_and(|s| (200..300).contains(&s));
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for a in &log {
        *statuses
            .entry(a.status.map_or("no answer".into(), |s| s.to_string()))
            .or_default() += 1;
    }
    let first_ok_after = log
        .iter()
        .filter(|a| is_ok(a) && a.sent >= promoted)
        .map(|a| a.answered - promoted)
        .min();
    eprintln!(
        "attempts by answer: {statuses:?}; first 2xx sent after the promotion answered {first_ok_after:?} after it"
    );

    // Ingest answered 503 (and only 503) while there was no primary: to publishes in flight
    // at the crash and to publishes sent after it.
    let unavailable = |sent_after: bool| {
        log.iter()
            .filter(|a| a.status == Some(503) && a.answered >= crashed)
            .filter(|a| !sent_after || a.sent >= crashed)
            .count()
    };
    assert!(
        unavailable(false) > 0 && unavailable(true) > 0,
        "503s after the crash: {} (sent after it: {}); all answers: {statuses:?}",
        unavailable(false),
        unavailable(true)
    );
    let odd: Vec<&Attempt> = log
        .iter()
        .filter(|a| !is_ok(a) && a.status != Some(503))
        .collect();
    assert!(
        odd.is_empty(),
        "answers other than 2xx or 503: {odd:?}\n{}",
        w.log_text()
    );
    // Nothing can have been written while no server accepted writes.
    let impossible: Vec<&Attempt> = log
        .iter()
        .filter(|a| is_ok(a) && a.sent > crashed && a.answered < promoting)
        .collect();
    assert!(
        impossible.is_empty(),
        "answered 2xx while there was no primary: {impossible:?}"
    );

    // Nothing sent after the crash went to the old primary, before or after it came back.
    let old = sqlx::PgPool::connect(&pair.primary.url())
        .await
        .expect("connect to the restarted old primary");
    let on_old: std::collections::HashSet<String> =
        sqlx::query_scalar("SELECT id FROM weir_events")
            .fetch_all(&old)
            .await
            .unwrap()
            .into_iter()
            .collect();
    old.close().await;
    let split: Vec<&str> = log
        .iter()
        .filter(|a| a.sent >= crashed && on_old.contains(&a.id))
        .map(|a| a.id.as_str())
        .collect();
    assert!(
        split.is_empty(),
        "events sent after the crash were written to the old primary: {split:?}"
    );

    // Every event answered 2xx is in the promoted database, once, at its answered position.
    let db = sqlx::PgPool::connect(&pair.standby.url())
        .await
        .expect("connect to the promoted standby");
    let stored: Vec<(String, i64)> = sqlx::query_as("SELECT id, position FROM weir_events")
        .fetch_all(&db)
        .await
        .unwrap();
    let mut by_id: HashMap<&str, Vec<i64>> = HashMap::new();
    for (id, pos) in &stored {
        by_id.entry(id.as_str()).or_default().push(*pos);
    }
    let twice: Vec<_> = by_id.iter().filter(|(_, p)| p.len() > 1).collect();
    assert!(twice.is_empty(), "stored more than once: {twice:?}");
    let answered: Vec<&Attempt> = log.iter().filter(|a| is_ok(a)).collect();
    let mut lost = vec![];
    for a in &answered {
        match by_id.get(a.id.as_str()) {
            None => lost.push(a.id.clone()),
            Some(p) => assert_eq!(
                Some(p[0]),
                a.position,
                "{} is stored at the position it was answered with",
                a.id
            ),
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} events answered 2xx are missing after the failover: {lost:?}",
        lost.len(),
        answered.len()
    );
    // Positions stay gap-free across the failover.
    let (count, max): (i64, Option<i64>) =
        sqlx::query_as("SELECT count(*), max(position) FROM weir_events")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(Some(count), max, "positions 1..=n with no gap");
    eprintln!(
        "{} events answered 2xx ({} after the promotion), {} stored",
        answered.len(),
        count_ok_in(&answered, promoted),
        stored.len()
    );
    db.close().await;

    // The relay follows the store to the new primary: every answered event reaches the
    // stream exchange (at least once).
    let relayed: std::collections::HashSet<i64> =
        drain_queue(&channel, &queue, usize::MAX, Duration::from_secs(8))
            .await
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect();
    let unrelayed: Vec<i64> = answered
        .iter()
        .filter_map(|a| a.position)
        .filter(|p| !relayed.contains(p))
        .collect();
    assert!(
        unrelayed.is_empty(),
        "{} of {} answered events never reached the exchange (positions {unrelayed:?}); log:\n{}",
        unrelayed.len(),
        answered.len(),
        w.log_text()
    );
    drop(reader);
    drop(w);
    drop(pair);
}

fn count_ok_in(answered: &[&Attempt], sent_after: Instant) -> usize {
    answered.iter().filter(|a| a.sent >= sent_after).count()
}
