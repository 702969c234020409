//! `examples/kubernetes/` applied with the real kubectl to the test API server and run by the
//! real `weir operator`: every Weir resource of the example reaches `Ready=True`, backed by the
//! machine's RabbitMQ and PostgreSQL through Secrets the test substitutes for the example's
//! in-cluster ones. The example's namespace is renamed so that runs never share an exchange.

mod apiserver;
mod common;

use std::path::Path;

use apiserver::TestApiServer;
use common::{AMQP_URL, Operator, fresh_database, unique};
use serde_json::Value;

/// The example's manifests, in file order, moved to namespace `ns`.
fn example(ns: &str) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/kubernetes");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("examples/kubernetes")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "the example's files: {files:?}");
    files
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("example file"))
        .collect::<Vec<_>>()
        .join("\n---\n")
        .replace("namespace: shop", &format!("namespace: {ns}"))
        .replace("name: shop\n", &format!("name: {ns}\n"))
}

fn ready(obj: &Value) -> Option<(String, String)> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
        .map(|c| {
            (
                c["status"].as_str().unwrap_or("").to_string(),
                format!("{} {}", c["reason"], c["message"]),
            )
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_example_applies_and_every_resource_becomes_ready() {
    let server = TestApiServer::start().await;
    let ns = unique("kex");
    server.apply_crds().await;

    let out = server
        .kubectl_with_input(&["apply", "-f", "-"], &example(&ns))
        .await;
    assert!(out.success, "kubectl apply of the example: {}", out.stderr);
    for what in [
        format!("namespace/{ns}"),
        "secret/rabbitmq".into(),
        "eventstream.weir.dev/orders".into(),
        "deployment.apps/order-printer".into(),
        "service/order-printer".into(),
        "subscription.weir.dev/print-orders".into(),
    ] {
        assert!(
            out.stdout.contains(&what),
            "{what} not applied: {}",
            out.stdout
        );
    }

    // The machine's services stand in for the in-cluster ones.
    let db = fresh_database().await;
    let secrets = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: rabbitmq, namespace: {ns}}}\nstringData: {{url: \"{AMQP_URL}\"}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: pg, namespace: {ns}}}\nstringData: {{url: \"{db}\"}}\n"
    );
    server.apply(&secrets).await;

    let op = Operator::start(server.kubeconfig(), "op-ex", &unique("weir-"), &[]);
    // The last conditions seen, shown if they never turn ready.
    let seen = std::sync::Mutex::new(String::new());
    for kind in ["eventstreams", "subscriptions"] {
        common::eventually(
            90,
            &format!("every {kind} of the example Ready=True"),
            || {
                format!(
                    "last seen: {}\n{}",
                    seen.lock().map(|s| s.clone()).unwrap_or_default(),
                    op.log_text()
                )
            },
            || async {
                let out = server
                    .kubectl(&["get", kind, "-n", &ns, "-o", "json"])
                    .await;
                let v: Value = serde_json::from_str(&out.stdout).ok()?;
                if let Ok(mut s) = seen.lock() {
                    *s = v["items"]
                        .as_array()
                        .map(|items| {
                            items
                                .iter()
                                .map(|i| i["status"].to_string())
                                .collect::<Vec<_>>()
                                .join("\n")
                        })
                        .unwrap_or_default();
                }
                let items = v["items"].as_array()?.clone();
                (!items.is_empty()
                    && items
                        .iter()
                        .all(|i| ready(i).is_some_and(|(s, _)| s == "True")))
                .then_some(())
            },
        )
        .await;
    }
    let out = server.kubectl(&["get", "weir", "-n", &ns]).await;
    assert!(out.success, "{}", out.stderr);
    assert!(
        out.stdout.contains("orders") && out.stdout.contains("print-orders"),
        "{}",
        out.stdout
    );
}
