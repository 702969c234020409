//! Test harness: unique databases, manifest folders, and real `weir` processes.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod certs;
pub mod chaos;
pub mod counting;
pub mod helm;
pub mod pg;
pub mod recording;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

pub fn pg_admin_url() -> String {
    std::env::var("WEIR_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// An HTTP client (rustls on ring: the provider is installed first, as `weir`'s `main` does;
/// reqwest panics without one).
pub fn http() -> reqwest::Client {
    weir::tls_provider::http_client()
}

/// An HTTP client builder, the provider installed.
pub fn http_builder() -> reqwest::ClientBuilder {
    weir::tls_provider::http_client_builder()
}

/// `GET url` (what `reqwest::get` does, with the provider installed).
pub async fn http_get(url: impl reqwest::IntoUrl) -> reqwest::Result<reqwest::Response> {
    http().get(url).send().await
}

/// `GET url`: the status and the body as JSON (null when it is not JSON).
pub async fn get_json(url: &str) -> (u16, serde_json::Value) {
    let r = http_get(url).await.expect("GET");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// POSTs `events` as one `application/cloudevents-batch+json` request: the status and the body
/// as JSON (null when it is not JSON).
pub async fn post_batch(url: &str, events: &[serde_json::Value]) -> (u16, serde_json::Value) {
    let r = http()
        .post(url)
        .header("content-type", "application/cloudevents-batch+json")
        .body(serde_json::to_string(events).expect("events serialise"))
        .send()
        .await
        .expect("POST");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// A name unique to this test run, safe for databases, exchanges and queues.
pub fn unique(prefix: &str) -> String {
    let n: u64 = rand::random();
    format!("{prefix}{:x}", n & 0xffff_ffff_ffff)
}

/// Creates an empty database and returns its URL.
pub async fn fresh_database() -> String {
    let name = unique("weir_t_");
    let admin = sqlx::PgPool::connect(&pg_admin_url())
        .await
        .expect("PostgreSQL must be running for integration tests");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .expect("create database");
    admin.close().await;
    let base = pg_admin_url();
    let cut = base.rfind('/').expect("url has a path");
    format!("{}/{name}", &base[..cut])
}

/// A port for a child `weir` to listen on, free when this returns: below the kernel's
/// ephemeral range, so no outgoing connection can take it before the child binds it (see
/// [`weir::bench::listen_port`]).
pub fn free_port() -> u16 {
    weir::bench::listen_port().expect("a free port")
}

/// RabbitMQ's management API for the default vhost's queues.
pub const MANAGEMENT_QUEUES: &str = "http://127.0.0.1:15672/api/queues/%2F";

/// The names of the default vhost's queues, from the management API (current there, unlike
/// its sampled message counts); empty when the API does not answer.
pub async fn management_queues() -> Vec<String> {
    let Ok(r) = http()
        .get(format!("{MANAGEMENT_QUEUES}?columns=name"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
    else {
        return Vec::new();
    };
    let qs: Vec<serde_json::Value> = r.json().await.unwrap_or_default();
    qs.iter()
        .filter_map(|q| q["name"].as_str().map(str::to_string))
        .collect()
}

/// A manifest folder with Secrets for the local RabbitMQ and the given database.
pub struct Manifests {
    pub dir: tempfile::TempDir,
}

impl Manifests {
    pub fn new(db_url: &str) -> Manifests {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = Manifests { dir };
        m.write(
            "secrets.yaml",
            &format!(
                "apiVersion: v1\nkind: Secret\nmetadata: {{name: rabbitmq, namespace: test}}\nstringData: {{url: \"{AMQP_URL}\"}}\n---\n\
                 apiVersion: v1\nkind: Secret\nmetadata: {{name: pg, namespace: test}}\nstringData: {{url: \"{db_url}\"}}\n"
            ),
        );
        m
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, file: &str, text: &str) {
        // Write then rename, as editors do, so the watcher never sees half a file.
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).expect("write manifest");
        std::fs::rename(&tmp, self.dir.path().join(file)).expect("rename manifest");
    }

    pub fn remove(&self, file: &str) {
        std::fs::remove_file(self.dir.path().join(file)).expect("remove manifest");
    }
}

/// An EventStream manifest in namespace `test` with a store, `extra` appended to its spec.
pub fn stream_yaml(name: &str, exchange: &str, extra: &str) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: {name}, namespace: test}}\nspec:\n  \
         broker: {{urlSecretRef: {{name: rabbitmq, key: url}}, exchange: {exchange}}}\n  \
         store: {{urlSecretRef: {{name: pg, key: url}}}}\n{extra}"
    )
}

/// A broker-only EventStream manifest.
pub fn broker_only_yaml(name: &str, exchange: &str) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: {name}, namespace: test}}\nspec:\n  \
         broker: {{urlSecretRef: {{name: rabbitmq, key: url}}, exchange: {exchange}, queueType: quorum}}\n"
    )
}

/// Several test binaries restart RabbitMQ; this lock file (shared with `tests/broker_restart.rs`)
/// keeps them from doing it at the same time. Held until dropped.
pub fn rabbitmq_restart_lock() -> std::fs::File {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("weir-rabbitmq-restart.lock"))
        .expect("lock file");
    file.lock().expect("lock");
    file
}

/// A private copy of the `weir` binary made at first use, so that a rebuild of
/// `target/debug/weir` while the tests run cannot swap the program under them.
pub fn weir_binary() -> PathBuf {
    static COPY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    COPY.get_or_init(|| {
        let src = env!("CARGO_BIN_EXE_weir");
        // One copy per build (named by size and mtime), so repeated runs do not pile up copies.
        let meta = std::fs::metadata(src).expect("the weir binary");
        let stamp = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let dst = std::env::temp_dir().join(format!("weir-bin-{}-{stamp}", meta.len()));
        if !dst.exists() {
            let tmp = std::env::temp_dir().join(unique("weir-bin-tmp-"));
            std::fs::copy(src, &tmp).expect("copy the weir binary");
            // Rename is atomic: concurrent test binaries never run a half-written copy.
            std::fs::rename(&tmp, &dst).expect("place the weir binary copy");
        }
        dst
    })
    .clone()
}

/// A running `weir run` process, killed on drop.
pub struct Weir {
    pub child: Child,
    pub url: String,
    pub admin: String,
    pub dir: PathBuf,
    pub log: PathBuf,
}

impl Weir {
    pub fn start(dir: &Path) -> Weir {
        Self::start_with(dir, &[])
    }

    pub fn start_with_args(dir: &Path, args: &[&str]) -> Weir {
        Self::spawn(dir, &[], args)
    }

    pub fn start_with(dir: &Path, env: &[(&str, &str)]) -> Weir {
        Self::spawn(dir, env, &[])
    }

    /// A worker without `--allow-loopback-sinks` (the others have it: test sinks listen on
    /// 127.0.0.1), as a deployment runs.
    pub fn start_guarded(dir: &Path, args: &[&str]) -> Weir {
        Self::spawn_as(dir, &[], args, false)
    }

    fn spawn(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Weir {
        Self::spawn_as(dir, env, args, true)
    }

    fn spawn_as(dir: &Path, env: &[(&str, &str)], args: &[&str], loopback_sinks: bool) -> Weir {
        let port = free_port();
        let admin_port = free_port();
        let log = std::env::temp_dir().join(format!("{}.log", unique("weir-test-")));
        let logf = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(weir_binary());
        cmd.arg("run")
            .arg("-f")
            .arg(dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--admin-listen")
            .arg(format!("127.0.0.1:{admin_port}"))
            .args(loopback_sinks.then_some("--allow-loopback-sinks"))
            .args(args)
            .env(
                "RUST_LOG",
                // Weir's default quiets lapin's log of channels the broker closes (the expected
                // NOT_FOUND of passive declares); a test's log should read the same.
                std::env::var("WEIR_TEST_LOG").unwrap_or_else(|_| "warn,lapin::channel=off".into()),
            )
            .stdout(Stdio::null())
            .stderr(logf);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn weir");
        Weir {
            child,
            url: format!("http://127.0.0.1:{port}"),
            admin: format!("http://127.0.0.1:{admin_port}"),
            dir: dir.to_path_buf(),
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the stream answers reads (store provisioned) or publishes can go out.
    pub async fn wait_ready(&mut self, ns: &str, stream: &str) {
        self.wait_ready_within(ns, stream, 30).await
    }

    /// [`Weir::wait_ready`] with a deadline of `secs` (a worker started right after a RabbitMQ
    /// restart on a loaded machine can need more than 30 s).
    pub async fn wait_ready_within(&mut self, ns: &str, stream: &str, secs: u64) {
        let client = http();
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let st = client
                .get(format!("{}/v1/status", self.admin))
                .send()
                .await
                .ok();
            if let Some(r) = st
                && let Ok(v) = r.json::<serde_json::Value>().await
            {
                let ready = v["resources"].as_array().is_some_and(|rs| {
                    rs.iter()
                        .any(|r| r["namespace"] == ns && r["name"] == stream && r["ready"] == true)
                });
                if ready {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "stream {ns}/{stream} not ready in {secs} s (process: {:?}, admin {}); log:\n{}",
                self.child.try_wait(),
                self.admin,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the stream answers reads (its store is provisioned). Reads, publishes to
    /// a stored stream and cache invalidation need only PostgreSQL, so this does not wait for
    /// the broker as [`Weir::wait_ready`] does.
    pub async fn wait_readable(&mut self, ns: &str, stream: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = format!("{}?from=1&limit=1", self.events_url(ns, stream));
        loop {
            if let Ok(r) = http_get(&url).await
                && r.status() == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "stream {ns}/{stream} not readable in 30 s; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn events_url(&self, ns: &str, stream: &str) -> String {
        format!("{}/v1/namespaces/{ns}/streams/{stream}/events", self.url)
    }

    pub async fn metrics(&self) -> String {
        http_get(format!("{}/metrics", self.admin))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body")
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL on Unix
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let log = self.log.clone();
        sigterm_and_wait(&mut self.child, "weir", || {
            std::fs::read_to_string(&log).unwrap_or_default()
        })
    }
}

/// SIGTERM to `child`, then its exit status; fails after 30 s, showing `log`.
pub fn sigterm_and_wait(
    child: &mut Child,
    what: &str,
    log: impl Fn() -> String,
) -> std::process::ExitStatus {
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not exit after SIGTERM; log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Weir {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Declares a durable classic queue bound to `exchange` with routing key `#` and returns a
/// channel to consume it with.
pub async fn bind_test_queue(exchange: &str) -> (lapin::Connection, lapin::Channel, String) {
    use lapin::options::*;
    use lapin::types::FieldTable;
    let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be running for integration tests");
    let ch = conn.create_channel().await.expect("channel");
    ch.exchange_declare(
        exchange.into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare exchange");
    let q = unique("weir-test-q-");
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare queue");
    ch.queue_bind(
        q.as_str().into(),
        exchange.into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind queue");
    (conn, ch, q)
}

/// Drains up to `want` messages from `queue`, returning their `cloudEvents:weirposition` (or
/// `cloudEvents:id` when absent) header values in arrival order. Stops after `idle` without
/// a message.
pub async fn drain_queue(
    ch: &lapin::Channel,
    queue: &str,
    want: usize,
    idle: Duration,
) -> Vec<String> {
    drain_queue_headers(ch, queue, want, idle)
        .await
        .into_iter()
        .map(|h| {
            h.get("cloudEvents:weirposition")
                .or_else(|| h.get("cloudEvents:id"))
                .cloned()
                .unwrap_or_default()
        })
        .collect()
}

/// Drains up to `want` messages from `queue`, returning each one's string headers in arrival
/// order. Stops after `idle` without a message.
pub async fn drain_queue_headers(
    ch: &lapin::Channel,
    queue: &str,
    want: usize,
    idle: Duration,
) -> Vec<std::collections::BTreeMap<String, String>> {
    use futures::StreamExt;
    use lapin::options::*;
    use lapin::types::{AMQPValue, FieldTable};
    ch.basic_qos(1000, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            unique("c").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut out = Vec::new();
    while out.len() < want {
        let next = tokio::time::timeout(idle, consumer.next()).await;
        let Ok(Some(Ok(d))) = next else { break };
        let headers = d.properties.headers().clone().unwrap_or_default();
        let strings = headers
            .inner()
            .iter()
            .filter_map(|(k, v)| match v {
                AMQPValue::LongString(s) => Some((k.to_string(), s.to_string())),
                AMQPValue::ShortString(s) => Some((k.to_string(), s.to_string())),
                _ => None,
            })
            .collect();
        out.push(strings);
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    out
}

/// A running `weir operator` (kubeconfig from the test API server), killed on drop.
pub struct Operator {
    pub child: Child,
    pub url: String,
    pub admin: String,
    pub log: PathBuf,
}

impl Operator {
    pub fn start(kubeconfig: &Path, identity: &str, lease: &str, extra: &[&str]) -> Operator {
        let port = free_port();
        let admin = free_port();
        let log = std::env::temp_dir().join(format!("{}.log", unique("weir-operator-")));
        let logf = std::fs::File::create(&log).expect("log file");
        let child = Command::new(weir_binary())
            .args(["operator", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--admin-listen")
            .arg(format!("127.0.0.1:{admin}"))
            .args(["--identity", identity, "--lease-name", lease])
            .args(["--lease-namespace", "default"])
            // A quick resync unless the test sets its own.
            .args(if extra.contains(&"--refresh") {
                &[][..]
            } else {
                &["--refresh", "2s"][..]
            })
            // Test sinks listen on 127.0.0.1; the operator has no loopback switch, the range
            // is allowed by name.
            .args(["--sink-allow-cidrs", "127.0.0.0/8"])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("WEIR_TEST_LOG").unwrap_or_else(|_| "warn,weir=info".into()),
            )
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn weir operator");
        Operator {
            child,
            url: format!("http://127.0.0.1:{port}"),
            admin: format!("http://127.0.0.1:{admin}"),
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then the exit status (failing after 30 s).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let log = self.log.clone();
        sigterm_and_wait(&mut self.child, "weir operator", || {
            std::fs::read_to_string(&log).unwrap_or_default()
        })
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// How often the waiting helpers below look again: short beside what tests wait for (seconds),
/// long beside what one look costs (a local HTTP request or a passive declare).
const POLL: Duration = Duration::from_millis(100);

/// Calls `f` every [`POLL`] until it returns `Ok`, or until `secs` have passed; then the last
/// `Err` (what it saw instead).
async fn poll_for<T, E, F, Fut>(secs: u64, mut f: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// Polls `f` until it returns `Some`, failing after `secs` with `what` and whatever `context`
/// says then (a process's log, say).
pub async fn eventually<T, F, Fut>(
    secs: u64,
    what: &str,
    context: impl Fn() -> String,
    mut f: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let found = poll_for(secs, || {
        let look = f();
        async move { look.await.ok_or(()) }
    })
    .await;
    match found {
        Ok(v) => v,
        Err(()) => panic!("timed out after {secs} s waiting for {what}\n{}", context()),
    }
}

/// Polls `f` until it returns `Ok`, failing after `secs` with `what` and the last `Err`: what
/// `f` saw instead, in its own words.
pub async fn eventually_ok<T, F, Fut>(secs: u64, what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    match poll_for(secs, f).await {
        Ok(v) => v,
        Err(seen) => panic!("timed out after {secs} s waiting for {what}: {seen}"),
    }
}

/// The subscription `name`'s entry in the worker's `/v1/status` (null while it is not listed
/// or the admin API does not answer).
pub async fn subscription_status(weir: &Weir, name: &str) -> serde_json::Value {
    let Ok(r) = http_get(format!("{}/v1/status", weir.admin)).await else {
        return serde_json::Value::Null;
    };
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    v["resources"]
        .as_array()
        .and_then(|rs| {
            rs.iter()
                .find(|r| r["kind"] == "Subscription" && r["name"] == name)
                .cloned()
        })
        .unwrap_or_default()
}

/// Waits until the subscription reports Ready (queues declared, caught up); its status.
pub async fn wait_subscription(weir: &Weir, name: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = subscription_status(weir, name).await;
        if s["ready"] == true {
            return s;
        }
        if Instant::now() > deadline {
            let log = weir.log_text();
            let mut from = log.len().saturating_sub(4000);
            while !log.is_char_boundary(from) {
                from += 1;
            }
            panic!("subscription {name} not ready: {s}; log:\n{}", &log[from..]);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A sink answering every POST with `status`; its URL.
pub async fn status_sink(status: u16) -> String {
    let code = http::StatusCode::from_u16(status).expect("an HTTP status code");
    let app = axum::Router::new().route("/", axum::routing::post(move || async move { code }));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a sink");
    let url = format!("http://{}/", l.local_addr().expect("sink address"));
    tokio::spawn(async move { axum::serve(l, app).await });
    url
}

/// Publishes one structured CloudEvent to `ns/stream` of the weir at `base`; the status (0 when
/// nothing answered).
pub async fn publish_event(base: &str, ns: &str, stream: &str, event: &serde_json::Value) -> u16 {
    http()
        .post(format!("{base}/v1/namespaces/{ns}/streams/{stream}/events"))
        .header("content-type", "application/cloudevents+json")
        .body(event.to_string())
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Two `weir run` workers on one folder (a shared worker's deployment in miniature), each
/// ready to take publishes to `ns/stream`.
pub async fn two_workers(dir: &Path, ns: &str, stream: &str) -> (Weir, Weir) {
    let (mut a, mut b) = (Weir::start(dir), Weir::start(dir));
    a.wait_ready(ns, stream).await;
    b.wait_ready(ns, stream).await;
    (a, b)
}

/// Two `weir run` workers on one folder, each answering reads of every one of `streams`.
pub async fn two_readable_workers(dir: &Path, ns: &str, streams: &[&str]) -> (Weir, Weir) {
    let (mut a, mut b) = (Weir::start(dir), Weir::start(dir));
    for w in [&mut a, &mut b] {
        for s in streams {
            w.wait_readable(ns, s).await;
        }
    }
    (a, b)
}

/// Closes a test's own AMQP connection, waiting at most 5 s: lapin's `close` can wait for ever
/// for an answer the broker already gave (seen once in a full run, which then hung), and a
/// test's helper connection has nothing left to lose.
pub async fn close_amqp(conn: lapin::Connection) {
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.close(200, "OK".into())).await;
}

/// The ids of every event stored in the database behind `db`.
pub async fn stored_ids(db: &sqlx::PgPool) -> std::collections::BTreeSet<String> {
    sqlx::query_scalar("SELECT id FROM weir_events")
        .fetch_all(db)
        .await
        .expect("read the stored ids")
        .into_iter()
        .collect()
}

/// Messages ready in queue `name` (None: no such queue), by a passive declare.
pub async fn queue_len(name: &str) -> Option<u32> {
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default()),
    )
    .await
    .expect("RabbitMQ accepts a connection within 10 s")
    .expect("RabbitMQ must be running");
    let ch = conn.create_channel().await.expect("channel");
    let declare = ch.queue_declare(
        name.into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    );
    let r = tokio::time::timeout(Duration::from_secs(10), declare)
        .await
        .expect("RabbitMQ answers a passive declare within 10 s")
        .ok()
        .map(|q| q.message_count());
    close_amqp(conn).await;
    r
}

/// Whether RabbitMQ has queue `name` (a passive declare).
pub async fn queue_exists(name: &str) -> bool {
    declared(name, false).await
}

/// Whether RabbitMQ has exchange `name` (a passive declare).
pub async fn exchange_exists(name: &str) -> bool {
    declared(name, true).await
}

/// A passive declare of exchange or queue `name` on a connection of its own.
async fn declared(name: &str, exchange: bool) -> bool {
    let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be running");
    let ch = conn.create_channel().await.expect("channel");
    let ok = if exchange {
        let passive = lapin::options::ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        ch.exchange_declare(
            name.into(),
            lapin::ExchangeKind::Topic,
            passive,
            Default::default(),
        )
        .await
        .is_ok()
    } else {
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        ch.queue_declare(name.into(), passive, Default::default())
            .await
            .is_ok()
    };
    close_amqp(conn).await;
    ok
}

/// Namespace `ns` with the Secrets `rabbitmq` (the local RabbitMQ) and `pg` (`db_url`), as
/// YAML documents ending in a separator: a test appends its own resources.
pub fn namespace_with_secrets(ns: &str, db_url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: rabbitmq, namespace: {ns}}}\nstringData: {{url: \"{AMQP_URL}\"}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: pg, namespace: {ns}}}\nstringData: {{url: \"{db_url}\"}}\n---\n"
    )
}

/// An index from a multi-document YAML text (a tiny stand-in for the manifest folder): the four
/// Weir kinds, Secrets (`stringData`) and ConfigMaps (`data`); namespace `default` if unset.
pub fn index_from_yaml(yaml: &str) -> weir::topology::Index {
    let mut idx = weir::topology::Index::default();
    for v in weir::yaml::from_multiple::<serde_json::Value>(yaml).expect("fixture is valid YAML") {
        if v.is_null() {
            continue;
        }
        let ns = v["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let name = v["metadata"]["name"]
            .as_str()
            .expect("fixture has a name")
            .to_string();
        let key = weir::topology::Key::new(ns.clone(), name);
        let mut v = v.clone();
        v["metadata"]["namespace"] = ns.into();
        match v["kind"].as_str().expect("fixture has a kind") {
            "EventStream" => {
                idx.streams.insert(key, serde_json::from_value(v).unwrap());
            }
            "Subscription" => {
                idx.subscriptions
                    .insert(key, serde_json::from_value(v).unwrap());
            }
            "ArchivePolicy" => {
                idx.archive_policies
                    .insert(key, serde_json::from_value(v).unwrap());
            }
            "CachePolicy" => {
                idx.cache_policies
                    .insert(key, serde_json::from_value(v).unwrap());
            }
            "Secret" => {
                let data: std::collections::BTreeMap<String, String> =
                    serde_json::from_value(v["stringData"].clone()).unwrap();
                idx.secrets.insert(
                    key,
                    data.into_iter().map(|(k, v)| (k, v.into_bytes())).collect(),
                );
            }
            "ConfigMap" => {
                idx.config_maps
                    .insert(key, serde_json::from_value(v["data"].clone()).unwrap());
            }
            other => panic!("unexpected kind {other}"),
        }
    }
    idx
}
