//! Who may use the admin API (docs/security-admin.md), against the real RabbitMQ and
//! PostgreSQL: the default bind is loopback; standalone, `--admin-token-file` guards dead
//! letters, archive and status details (401 leaves the dead-letter queue as it was, checked with
//! `rabbitmqctl`), the CLI sends `--token-file`, and every purge writes one audit line; with
//! the operator, RBAC (through the test API server's TokenReview and SubjectAccessReview)
//! decides who may purge.
//!
//! Files: `main.rs` (helpers and the listen-address tests), `standalone.rs` (the admin token),
//! `operator.rs` (RBAC).

#[path = "../apiserver/mod.rs"]
mod apiserver;
#[path = "../common/mod.rs"]
mod common;
mod operator;
mod standalone;

use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use common::{free_port, weir_binary};
use serde_json::Value;

/// Messages in `queue` as `rabbitmqctl list_queues name messages` reports them (`None`: no
/// such queue). rabbitmqctl's count lags a publish by up to a few seconds (it reads the
/// queue's statistics), so callers wait for a value with [`wait_queue`].
pub fn rabbitmqctl_messages(queue: &str) -> Option<u64> {
    let out = Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("rabbitmqctl runs (RabbitMQ must be installed for integration tests)");
    assert!(
        out.status.success(),
        "rabbitmqctl list_queues: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut parts = l.split_whitespace();
        (parts.next() == Some(queue))
            .then(|| parts.next().and_then(|n| n.parse().ok()))
            .flatten()
    })
}

pub async fn wait_queue(queue: &str, want: u64, context: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = rabbitmqctl_messages(queue);
        if n == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{queue}: {n:?} messages, want {want}; {}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A sink that refuses every delivery with 422 (not retried: straight to the dead letters).
pub async fn refusing_sink() -> String {
    let app = Router::new().route(
        "/",
        post(|| async { (http::StatusCode::UNPROCESSABLE_ENTITY, "no") }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/")
}

/// The audit records (lines that are JSON objects of type `weir.audit.v1`) in `log`.
pub fn audit_records(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "weir.audit.v1")
        .collect()
}

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// An address of this machine that is not loopback, if it has one: the source address of a
/// UDP socket "connected" to a public address (no packet is sent), else the first one
/// `hostname -I` lists.
fn non_loopback_address() -> Option<IpAddr> {
    let udp = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|()| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip())
        .ok()
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified());
    udp.or_else(|| {
        let out = Command::new("hostname").arg("-I").output().ok()?;
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|s| s.parse::<IpAddr>().ok())
            .find(|ip| ip.is_ipv4() && !ip.is_loopback())
    })
}

pub fn weir_cmd() -> Command {
    let mut c = Command::new(weir_binary());
    c.stdin(Stdio::null())
        .env_remove("WEIR_TOKEN_FILE")
        .env_remove("WEIR_ADMIN_LISTEN")
        .env_remove("WEIR_ADMIN_TOKEN_FILE");
    c
}

#[test]
fn the_default_admin_listen_address_is_loopback() {
    use clap::Parser as _;
    for mode in [vec!["weir", "run", "-f", "x"], vec!["weir", "operator"]] {
        let cli = weir::cli::Cli::try_parse_from(&mode).unwrap();
        let addr = match cli.command {
            weir::cli::Command::Run { admin_listen, .. } => admin_listen,
            weir::cli::Command::Operator { admin_listen, .. } => admin_listen,
            _ => unreachable!(),
        };
        if std::env::var_os("WEIR_ADMIN_LISTEN").is_none() {
            assert_eq!(
                addr,
                "127.0.0.1:9090".parse::<SocketAddr>().unwrap(),
                "{mode:?}"
            );
        }
    }
}

/// The binary with no `--admin-listen` serves admin on 127.0.0.1:9090 and not on the
/// machine's other address; a non-loopback admin address without a token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_admin_binds_loopback_by_default() {
    let Some(other) = non_loopback_address() else {
        println!("skipped: this machine has no non-loopback address to try the admin port on");
        return;
    };
    if std::net::TcpStream::connect("127.0.0.1:9090").is_ok() {
        println!("skipped: 127.0.0.1:9090 is already taken by another process");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("weir.log");
    let mut child = weir_cmd()
        .args(["run", "-f"])
        .arg(dir.path())
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let client = common::http();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client.get("http://127.0.0.1:9090/healthz").send().await
            && r.status() == 200
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no admin answer on 127.0.0.1:9090 ({:?}); log:\n{}",
            child.try_wait(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let there = SocketAddr::new(other, 9090);
    let reach = std::net::TcpStream::connect_timeout(&there, Duration::from_secs(2));
    assert!(
        reach.is_err(),
        "the admin port answers on {there}, the machine's non-loopback address"
    );
    common::sigterm_and_wait(&mut child, "weir", || {
        std::fs::read_to_string(&log).unwrap_or_default()
    });

    // A wider admin address without a token is refused, saying how to fix it.
    let out = weir_cmd()
        .args(["run", "-f"])
        .arg(dir.path())
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--admin-listen", &format!("0.0.0.0:{}", free_port())])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a loopback address") && err.contains("--admin-token-file"),
        "{err}"
    );
    // So is an empty token file.
    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    let out = weir_cmd()
        .args(["run", "-f"])
        .arg(dir.path())
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--admin-listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--admin-token-file")
        .arg(&empty)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("token file") && err.contains("empty"), "{err}");
}
