//! Who may use the admin API (docs/security-admin.md), against the real RabbitMQ and
//! PostgreSQL: the default bind is loopback; standalone, `--admin-token-file` guards dead
//! letters, archive and status details (401 leaves the dead-letter queue as it was, checked with
//! `rabbitmqctl`), the CLI sends `--token-file`, and every purge writes one audit line; with
//! the operator, RBAC (through the test API server's TokenReview and SubjectAccessReview)
//! decides who may purge.

mod apiserver;
mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use apiserver::TestApiServer;
use axum::Router;
use axum::routing::post;
use common::{AMQP_URL, Manifests, Operator, Weir, free_port, fresh_database, unique, weir_binary};
use serde_json::{Value, json};

/// Messages in `queue` as `rabbitmqctl list_queues name messages` reports them (`None`: no
/// such queue). rabbitmqctl's count lags a publish by up to a few seconds (it reads the
/// queue's statistics), so callers wait for a value with [`wait_queue`].
fn rabbitmqctl_messages(queue: &str) -> Option<u64> {
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

async fn wait_queue(queue: &str, want: u64, context: impl Fn() -> String) {
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
async fn refusing_sink() -> String {
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
fn audit_records(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "weir.audit.v1")
        .collect()
}

fn bearer(token: &str) -> String {
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

fn weir_cmd() -> Command {
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
    let client = reqwest::Client::new();
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
    assert!(
        err.contains("admin token file") && err.contains("empty"),
        "{err}"
    );
}

/// Standalone with `--admin-token-file`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standalone_admin_token_guards_dead_letters_archive_and_status() {
    let db = fresh_database().await;
    let m = Manifests::new(&db);
    let exchange = unique("weir-test-admin-");
    let sub = unique("s");
    let sink = refusing_sink().await;
    m.write("orders.yaml", &common::stream_yaml("orders", &exchange, ""));
    m.write(
        "sub.yaml",
        &format!(
            "apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: {sub}, namespace: test}}\n\
             spec:\n  stream: orders\n  sink: {{uri: \"{sink}\"}}\n"
        ),
    );
    m.write(
        "archive.yaml",
        "apiVersion: weir.dev/v1alpha1\nkind: ArchivePolicy\nmetadata: {name: cold, namespace: test}\n\
         spec: {streamNames: [orders]}\n",
    );
    let tokens = tempfile::tempdir().unwrap();
    let token_file = tokens.path().join("admin-token");
    std::fs::write(&token_file, "first-admin-token\n").unwrap();
    let wrong_file = tokens.path().join("wrong-token");
    std::fs::write(&wrong_file, "not-the-token\n").unwrap();
    let mut weir = Weir::start_with_args(
        m.path(),
        &["--admin-token-file", token_file.to_str().unwrap()],
    );
    let client = reqwest::Client::new();
    let token = "first-admin-token";

    // Without a token, status is a summary only; with it, the details.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v: Value = match client
            .get(format!("{}/v1/status", weir.admin))
            .header("authorization", bearer(token))
            .send()
            .await
        {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        let ready = |name: &str| {
            v["resources"]
                .as_array()
                .is_some_and(|rs| rs.iter().any(|r| r["name"] == name && r["ready"] == true))
        };
        if ready("orders") && ready(&sub) {
            assert_eq!(v["details"], true);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not ready: {v}; log:\n{}",
            weir.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let summary: Value = client
        .get(format!("{}/v1/status", weir.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(summary["details"], false, "{summary}");
    assert_eq!(summary["summary"]["resources"], 3, "{summary}");
    assert!(summary.get("resources").is_none(), "{summary}");
    assert!(!summary.to_string().contains(&sub), "names leak: {summary}");
    // The probes and metrics stay open.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = client
            .get(format!("{}{path}", weir.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }

    // Three dead letters.
    let events: Vec<Value> = (0..3)
        .map(|i| json!({"type": "order.created", "id": format!("d-{i}"), "data": {"n": i}}))
        .collect();
    let r = client
        .post(weir.events_url("test", "orders"))
        .json(&events)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let dlq = format!("weir-dlq.test.{sub}");
    wait_queue(&dlq, 3, || weir.log_text()).await;
    let dl_url = format!(
        "{}/v1/namespaces/test/subscriptions/{sub}/deadletters",
        weir.admin
    );

    // No token, a wrong token, a malformed header: 401 with a Bearer challenge, problem+json,
    // and nothing purged.
    for auth in [
        None,
        Some(bearer("not-the-token")),
        Some("Basic YTpi".into()),
    ] {
        let mut rb = client.delete(&dl_url);
        if let Some(a) = &auth {
            rb = rb.header("authorization", a);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
        let challenge = r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(challenge.starts_with("Bearer"), "{challenge}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{auth:?}"
        );
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["status"], 401);
    }
    for (method, url) in [
        (reqwest::Method::GET, dl_url.clone()),
        (reqwest::Method::GET, format!("{dl_url}/d-0")),
        (reqwest::Method::POST, format!("{dl_url}/redrive")),
        (reqwest::Method::GET, format!("{}/v1/archive", weir.admin)),
        (
            reqwest::Method::GET,
            format!("{}/v1/namespaces/test/streams/orders/archive", weir.admin),
        ),
        (
            reqwest::Method::POST,
            format!(
                "{}/v1/namespaces/test/streams/orders/archive/run",
                weir.admin
            ),
        ),
        (
            reqwest::Method::POST,
            format!(
                "{}/v1/namespaces/test/streams/orders/archive/verify",
                weir.admin
            ),
        ),
    ] {
        let r = client.request(method.clone(), &url).send().await.unwrap();
        assert_eq!(r.status(), 401, "{method} {url}");
    }
    // rabbitmqctl's statistics lag: give them time to show a purge, had one happened.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        rabbitmqctl_messages(&dlq),
        Some(3),
        "unauthenticated calls changed the DLQ"
    );
    assert!(
        audit_records(&weir.log_text()).is_empty(),
        "refused calls are not audited: {}",
        weir.log_text()
    );

    // The CLI: without a token it fails naming the flag; with the wrong one 401; with
    // --token-file (and WEIR_TOKEN_FILE) it works.
    let cli = |args: &[&str], token_file: Option<&Path>, env_file: Option<&Path>| {
        let mut c = weir_cmd();
        c.args(["--admin", &weir.admin, "-o", "json"]);
        if let Some(f) = token_file {
            c.arg("--token-file").arg(f);
        }
        if let Some(f) = env_file {
            c.env("WEIR_TOKEN_FILE", f);
        }
        c.args(args).output().unwrap()
    };
    let target = format!("test/{sub}");
    let out = cli(&["dlq", "list", &target], None, None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401") && err.contains("--token-file"), "{err}");
    let out = cli(&["dlq", "list", &target], Some(&wrong_file), None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    let out = cli(&["dlq", "list", &target], Some(&token_file), None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        listed["deadLetters"].as_array().map(Vec::len),
        Some(3),
        "{listed}"
    );
    let out = cli(&["status"], None, Some(&token_file));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["details"], true, "{st}");
    let out = cli(&["archive", "status"], Some(&token_file), None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let archived: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        archived["streams"][0]["stream"], "test/orders",
        "{archived}"
    );

    // An authorised purge through the CLI empties the queue and writes one audit line.
    let out = cli(&["dlq", "purge", &target, "--yes"], Some(&token_file), None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_queue(&dlq, 0, || weir.log_text()).await;
    let records = audit_records(&weir.log_text());
    assert_eq!(records.len(), 1, "{records:?}\nlog:\n{}", weir.log_text());
    let rec = &records[0];
    assert_eq!(rec["who"], "admin-token");
    assert_eq!(rec["action"], "deadletters.purge");
    assert_eq!(rec["target"], target);
    assert_eq!(rec["count"], 3);
    assert_eq!(rec["outcome"], "success");
    assert_eq!(rec["error"], Value::Null);
    let time = rec["time"].as_str().unwrap();
    assert!(chrono::DateTime::parse_from_rfc3339(time).is_ok(), "{time}");
    let mut keys: Vec<&String> = rec.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "action", "count", "error", "outcome", "target", "time", "type", "who"
        ]
    );

    // An archive run is audited too.
    let r = client
        .post(format!(
            "{}/v1/namespaces/test/streams/orders/archive/run",
            weir.admin
        ))
        .header("authorization", bearer(token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let records = audit_records(&weir.log_text());
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[1]["action"], "archive.run");
    assert_eq!(records[1]["target"], "test/orders");
    assert_eq!(records[1]["outcome"], "success");

    // Rotation: the file is read on every request; the old token stops working at once.
    std::fs::write(&token_file, "second-admin-token\n").unwrap();
    let status = |t: &'static str| {
        let c = client.clone();
        let url = dl_url.clone();
        async move {
            c.get(url)
                .header("authorization", bearer(t))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(status("first-admin-token").await, 401);
    assert_eq!(status("second-admin-token").await, 200);
    weir.terminate();
}

/// Operator mode: TokenReview + SubjectAccessReview through the test API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_admin_is_decided_by_rbac() {
    let server = TestApiServer::start().await;
    let ns = unique("adm");
    let out = server.kubectl(&["apply", "-f", "crds/"]).await;
    assert!(out.success, "{}", out.stderr);
    let sub = "refused";
    let sink = refusing_sink().await;
    let manifests = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: rabbitmq, namespace: {ns}}}\n\
         stringData: {{url: \"{AMQP_URL}\"}}\n---\n\
         apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: orders, namespace: {ns}}}\n\
         spec: {{broker: {{urlSecretRef: {{name: rabbitmq, key: url}}}}, deletionPolicy: Delete}}\n---\n\
         apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: {sub}, namespace: {ns}}}\n\
         spec: {{stream: orders, sink: {{uri: \"{sink}\"}}, deletionPolicy: Delete}}\n"
    );
    let out = server
        .kubectl_with_input(&["apply", "-f", "-"], &manifests)
        .await;
    assert!(out.success, "{}", out.stderr);
    let op = Operator::start(server.kubeconfig(), "op-admin", &unique("weir-"), &[]);

    // Published once the subscription's queue is bound (202 from a broker-only stream).
    let dlq = format!("weir-dlq.{ns}.{sub}");
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut published = 0;
    while published < 2 {
        let ready = server
            .object("weir.dev", "subscriptions", &ns, sub)
            .is_some_and(|o| {
                o["status"]["conditions"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
            });
        if ready {
            let ev = json!({"specversion": "1.0", "id": format!("e-{published}"), "source": "/t",
                            "type": "order.created", "data": {}});
            if common::publish_event(&op.url, &ns, "orders", &ev).await == 202 {
                published += 1;
                continue;
            }
        }
        assert!(
            Instant::now() < deadline,
            "subscription not ready; log:\n{}",
            op.log_text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    wait_queue(&dlq, 2, || op.log_text()).await;

    let admin = server.issue_token("ops", "admin", &["weir"]);
    let viewer = server.issue_token("ops", "viewer", &["weir"]);
    let other_audience = server.issue_token("ops", "admin", &["https://kubernetes.default.svc"]);
    server.grant(
        "system:serviceaccount:ops:admin",
        "delete",
        "weir.dev",
        "subscriptions",
        "deadletters",
        &ns,
    );
    server.grant(
        "system:serviceaccount:ops:viewer",
        "get",
        "weir.dev",
        "subscriptions",
        "deadletters",
        &ns,
    );
    let client = reqwest::Client::new();
    let url = format!(
        "{}/v1/namespaces/{ns}/subscriptions/{sub}/deadletters",
        op.admin
    );
    let purge = |token: Option<String>| {
        let mut rb = client.delete(&url);
        if let Some(t) = token {
            rb = rb.header("authorization", bearer(&t));
        }
        async move { rb.send().await.unwrap() }
    };
    let r = purge(None).await;
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    assert_eq!(purge(Some("bogus".into())).await.status(), 401);
    assert_eq!(
        purge(Some(other_audience)).await.status(),
        401,
        "a token for another audience"
    );
    let r = purge(Some(viewer.clone())).await;
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("system:serviceaccount:ops:viewer may not delete subscriptions/deadletters"),
        "{body}"
    );
    // The viewer may list.
    let r = client
        .get(&url)
        .header("authorization", bearer(&viewer))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let listed: Value = r.json().await.unwrap();
    assert_eq!(listed["deadLetters"].as_array().map(Vec::len), Some(2));
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        rabbitmqctl_messages(&dlq),
        Some(2),
        "refused purges changed the DLQ"
    );
    assert!(audit_records(&op.log_text()).is_empty());

    // The allowed account, through the CLI.
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{admin}\n")).unwrap();
    let out = weir_cmd()
        .args(["--admin", &op.admin, "--token-file"])
        .arg(&token_file)
        .args(["dlq", "purge", &format!("{ns}/{sub}"), "--yes"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_queue(&dlq, 0, || op.log_text()).await;
    let records = audit_records(&op.log_text());
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["who"], "system:serviceaccount:ops:admin");
    assert_eq!(records[0]["action"], "deadletters.purge");
    assert_eq!(records[0]["target"], format!("{ns}/{sub}"));
    assert_eq!(records[0]["count"], 2);

    // Status: a summary without a token; with one, only what the caller may `get`.
    let st: Value = client
        .get(format!("{}/v1/status", op.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(st["details"], false, "{st}");
    server.grant(
        "system:serviceaccount:ops:viewer",
        "get",
        "weir.dev",
        "subscriptions",
        "",
        &ns,
    );
    let st: Value = client
        .get(format!("{}/v1/status", op.admin))
        .header("authorization", bearer(&viewer))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kinds: Vec<&str> = st["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["Subscription"], "{st}");

    // The reviews are calls the chart's RBAC must allow (tests/chart.rs compares the list).
    let used = server.permissions_used(|c| !c.is_kubectl());
    for (group, resource) in [
        ("authentication.k8s.io", "tokenreviews"),
        ("authorization.k8s.io", "subjectaccessreviews"),
    ] {
        let call = (
            group.to_string(),
            resource.to_string(),
            "create".to_string(),
        );
        assert!(used.contains(&call), "{call:?} not made: {used:?}");
        assert!(
            weir::control::API_CALLS.contains(&(group, resource, "create")),
            "{call:?} missing from API_CALLS"
        );
    }
    drop(op);
}
