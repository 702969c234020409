//! TLS to RabbitMQ (`amqps://`) against the machine's TLS listener on 127.0.0.1:5671, set up
//! by `scripts/services.sh` with a test CA in /var/lib/weir-test-tls (see docs/testing.md).
//!
//! Every Weir connection of a worker goes to 5671 and RabbitMQ reports it as TLS; a client
//! certificate is presented when configured; `amqps://` to the plain port and a wrong CA fail
//! with a clear error in the stream's status, never with a plain-text connection.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const TLS_DIR: &str = "/var/lib/weir-test-tls";
const MGMT: &str = "http://127.0.0.1:15672/api";

/// The test PKI's file `name`; fails (never skips) when the setup is missing.
fn pki(name: &str) -> String {
    let path = format!("{TLS_DIR}/{name}");
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("{path}: {e}: the RabbitMQ TLS test setup is missing; run scripts/services.sh")
    })
}

fn require_listener() {
    if std::net::TcpStream::connect_timeout(
        &"127.0.0.1:5671".parse().expect("address"),
        Duration::from_secs(5),
    )
    .is_err()
    {
        panic!("RabbitMQ has no TLS listener on 127.0.0.1:5671; run scripts/services.sh");
    }
}

/// A Secret manifest with multi-line values (PEM) as YAML block scalars.
fn secret(name: &str, data: &[(&str, &str)]) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: test}}\nstringData:\n"
    );
    for (k, v) in data {
        y.push_str(&format!("  {k}: |\n"));
        for line in v.lines() {
            y.push_str(&format!("    {line}\n"));
        }
    }
    y
}

/// The Secrets every test here uses: `amqps` (URLs), `ca`, `other-ca`, `client` (mTLS) and `pg`.
fn secrets(db_url: &str) -> String {
    [
        secret(
            "amqps",
            &[
                ("tls", "amqps://guest:guest@127.0.0.1:5671/%2f"),
                ("plainport", "amqps://guest:guest@127.0.0.1:5672/%2f"),
            ],
        ),
        secret("ca", &[("ca.crt", &pki("ca.pem"))]),
        secret("other-ca", &[("ca.crt", &pki("other-ca.pem"))]),
        secret(
            "client",
            &[
                ("tls.crt", &pki("client.pem")),
                ("tls.key", &pki("client.key")),
            ],
        ),
        secret("pg", &[("url", db_url)]),
    ]
    .join("---\n")
}

/// An EventStream on `url_key` of Secret `amqps` with `tls` (YAML flow mapping).
fn stream(name: &str, url_key: &str, tls: &str, store: bool) -> String {
    let store = if store {
        "  store: {urlSecretRef: {name: pg, key: url}}\n"
    } else {
        ""
    };
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: {name}, namespace: test}}\n\
         spec:\n  broker: {{urlSecretRef: {{name: amqps, key: {url_key}}}, exchange: weir.test.{name}-{sfx}, tls: {tls}}}\n{store}",
        sfx = unique("")
    )
}

/// The worker's TCP connections to RabbitMQ as `(local port, server port)`, from `ss`.
fn amqp_sockets(pid: u32) -> Vec<(u16, u16)> {
    let out = std::process::Command::new("ss")
        .args(["-Htnp", "state", "established"])
        .output()
        .expect("ss");
    let text = String::from_utf8_lossy(&out.stdout);
    let tag = format!("pid={pid},");
    text.lines()
        .filter(|l| l.contains(&tag))
        .filter_map(|l| {
            let mut addrs = l
                .split_whitespace()
                .filter_map(|t| t.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()));
            let (local, peer) = (addrs.next()?, addrs.next()?);
            [5671, 5672].contains(&peer).then_some((local, peer))
        })
        .collect()
}

/// RabbitMQ's view of its connections: `peer_port -> (ssl, peer_cert_subject)`.
async fn broker_connections() -> std::collections::HashMap<u16, (bool, String)> {
    let v: Value = common::http()
        .get(format!(
            "{MGMT}/connections?columns=peer_port,ssl,peer_cert_subject"
        ))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .expect("management API")
        .json()
        .await
        .expect("management JSON");
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            let port = u16::try_from(c["peer_port"].as_u64()?).ok()?;
            let subject = c["peer_cert_subject"].as_str().unwrap_or_default();
            Some((port, (c["ssl"] == true, subject.to_string())))
        })
        .collect()
}

/// The `/v1/status` entry of stream `name`, as text.
async fn stream_status(w: &Weir, name: &str) -> String {
    let Ok(r) = common::http_get(format!("{}/v1/status", w.admin)).await else {
        return String::new();
    };
    let v: Value = r.json().await.unwrap_or_default();
    v["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["namespace"] == "test" && r["name"] == name && r["kind"] != "Subscription")
        .map(ToString::to_string)
        .unwrap_or_default()
}

fn event(id: &str) -> Value {
    json!({"specversion": "1.0", "type": "order.created", "source": "/tls", "id": id, "data": {"id": id}})
}

/// A store-backed stream (relay) with mutual TLS and a broker-only stream with CA trust only
/// publish over TLS, a Subscription delivers through it, and every Weir connection is TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_and_delivers_over_tls() {
    require_listener();
    let db = fresh_database().await;
    let m = Manifests::new(&db);
    let ca = "{caSecretRef: {name: ca, key: ca.crt}}";
    let mtls = "{caSecretRef: {name: ca, key: ca.crt}, clientCertSecretRef: {name: client}}";
    m.write("secrets.yaml", &secrets(&db));
    m.write(
        "streams.yaml",
        &[
            stream("orders", "tls", mtls, true),
            stream("direct", "tls", ca, false),
        ]
        .join("---\n"),
    );
    // The sink: ids of the events it was given.
    let got: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let got2 = got.clone();
    let app = axum::Router::new().route(
        "/",
        axum::routing::post(move |h: http::HeaderMap| {
            let got = got2.clone();
            async move {
                if let Some(id) = h.get("ce-id").and_then(|v| v.to_str().ok()) {
                    got.lock().expect("sink lock").insert(id.to_string());
                }
                http::StatusCode::OK
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind sink");
    let sink = format!("http://{}/", l.local_addr().expect("sink address"));
    tokio::spawn(async move { axum::serve(l, app).await });
    m.write(
        "subscription.yaml",
        &format!(
            "apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: tail, namespace: test}}\n\
             spec:\n  stream: orders\n  sink: {{uri: \"{sink}\"}}\n"
        ),
    );

    let mut w = Weir::start(m.path());
    w.wait_ready("test", "orders").await;
    w.wait_ready("test", "direct").await;
    // The subscription's queue is bound before events count on it.
    let log = w.log.clone();
    let ctx = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually(60, "subscription tail ready", ctx, || async {
        let r = common::http_get(format!("{}/v1/status", w.admin))
            .await
            .ok()?;
        let v: Value = r.json().await.ok()?;
        v["resources"]
            .as_array()?
            .iter()
            .any(|r| r["name"] == "tail" && r["ready"] == true)
            .then_some(())
    })
    .await;

    const N: usize = 20;
    for i in 0..N {
        for s in ["orders", "direct"] {
            let status = publish_event(&w.url, "test", s, &event(&format!("{s}-{i}"))).await;
            assert!(
                (200..300).contains(&status),
                "publish to {s}: {status}\n{}",
                ctx()
            );
        }
    }
    let want: BTreeSet<String> = (0..N).map(|i| format!("orders-{i}")).collect();
    eventually(60, "every event delivered to the sink", ctx, || async {
        (*got.lock().expect("sink lock") == want).then_some(())
    })
    .await;
    let delivered = got.lock().expect("sink lock").len();
    assert_eq!(delivered, N, "lost or duplicated deliveries");

    // Every AMQP connection of the worker goes to the TLS port, and RabbitMQ says it is TLS.
    let pid = w.child.id();
    let sockets = amqp_sockets(pid);
    assert!(
        sockets.len() >= 4,
        "two streams with different TLS settings have their own data and topology connections: {sockets:?}"
    );
    assert!(
        sockets.iter().all(|(_, server)| *server == 5671),
        "a connection to the plain port: {sockets:?}"
    );
    let conns = eventually(30, "RabbitMQ lists every connection", ctx, || async {
        let conns = broker_connections().await;
        sockets
            .iter()
            .all(|(local, _)| conns.contains_key(local))
            .then_some(conns)
    })
    .await;
    let mut with_cert = 0;
    for (local, _) in &sockets {
        let (ssl, subject) = &conns[local];
        assert!(ssl, "connection from port {local} is not TLS: {conns:?}");
        if subject.contains("weir-test-client") {
            with_cert += 1;
        } else {
            assert!(subject.is_empty(), "unexpected certificate {subject}");
        }
    }
    // orders (mutual TLS) presents the client certificate, direct (CA only) does not.
    assert!(
        with_cert >= 1,
        "no connection presented the client certificate: {conns:?}"
    );
    assert!(
        with_cert < sockets.len(),
        "the CA-only stream presented a client certificate: {conns:?}"
    );
    w.terminate();
}

/// `amqps://` to the plain listener and a server certificate from another CA fail with a
/// clear error in the stream's status; publishes are refused, nothing goes out in plain text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_port_and_wrong_ca_fail_clearly() {
    require_listener();
    let db = fresh_database().await;
    let m = Manifests::new(&db);
    m.write("secrets.yaml", &secrets(&db));
    m.write(
        "streams.yaml",
        &[
            stream(
                "plainport",
                "plainport",
                "{caSecretRef: {name: ca, key: ca.crt}}",
                false,
            ),
            stream(
                "wrongca",
                "tls",
                "{caSecretRef: {name: other-ca, key: ca.crt}}",
                false,
            ),
        ]
        .join("---\n"),
    );
    let w = Weir::start(m.path());
    let log = w.log.clone();
    let ctx = || std::fs::read_to_string(&log).unwrap_or_default();
    for (name, says) in [
        ("plainport", "does not speak TLS here"),
        ("wrongca", "certificate verification failed"),
    ] {
        let status = eventually(
            60,
            &format!("{name}'s TLS error in its status"),
            ctx,
            || async {
                let s = stream_status(&w, name).await;
                s.contains(says).then_some(s)
            },
        )
        .await;
        assert!(status.contains("\"ready\":false"), "{status}");
        // The error names the connection without its password.
        assert!(status.contains("amqps://guest@127.0.0.1:567"), "{status}");
        assert!(!status.contains("guest:guest"), "{status}");
        let code = publish_event(&w.url, "test", name, &event("e-1")).await;
        assert_eq!(code, 503, "publish to {name} while TLS fails");
    }
    // Nothing of this worker is connected: no plain-text fallback.
    let sockets = amqp_sockets(w.child.id());
    let conns = broker_connections().await;
    assert!(
        sockets.iter().all(|(local, _)| !conns.contains_key(local)),
        "a connection RabbitMQ accepted: {sockets:?} {conns:?}"
    );
}
