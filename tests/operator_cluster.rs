//! The end-to-end scenario against a real cluster (kind, k3d, ...): ignored by default, run
//! with `WEIR_TEST_KUBECONFIG=/path/to/kubeconfig cargo test --test operator_cluster -- --ignored`.
//! See `docs/testing.md`.
//!
//! `weir operator` runs on the test machine (out of cluster) with that kubeconfig, so the
//! RabbitMQ and PostgreSQL URLs of the quickstart (127.0.0.1) and the test's sink are reachable
//! from it; the cluster provides the real API server (schema validation, CEL rules,
//! server-side apply, finalizers, `/scale`) that the in-process test API server imitates.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::recording::RecordingSink;
use common::{free_port, unique, weir_binary};
use serde_json::{Value, json};

fn kubeconfig() -> PathBuf {
    match std::env::var_os("WEIR_TEST_KUBECONFIG") {
        Some(p) => PathBuf::from(p),
        None => panic!("set WEIR_TEST_KUBECONFIG to the kubeconfig of a test cluster"),
    }
}

struct Kubectl {
    output: std::process::Output,
}

impl Kubectl {
    fn ok(&self) -> bool {
        self.output.status.success()
    }
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
}

fn kubectl(args: &[&str], input: Option<&str>) -> Kubectl {
    use std::io::Write;
    let mut cmd = Command::new(std::env::var("WEIR_TEST_KUBECTL").unwrap_or("kubectl".into()));
    cmd.arg("--kubeconfig")
        .arg(kubeconfig())
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("kubectl must be installed");
    if let Some(mut stdin) = child.stdin.take()
        && let Some(text) = input
    {
        stdin.write_all(text.as_bytes()).expect("kubectl stdin");
    }
    Kubectl {
        output: child.wait_with_output().expect("kubectl output"),
    }
}

fn get(args: &[&str]) -> Option<Value> {
    let mut a = vec!["get"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["-o", "json"]);
    let out = kubectl(&a, None);
    out.ok()
        .then(|| serde_json::from_str(&out.stdout()).ok())
        .flatten()
}

fn ready_status(obj: &Value) -> Option<String> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
        .and_then(|c| c["status"].as_str().map(String::from))
}

async fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster"]
async fn operator_on_a_real_cluster() {
    let ns = unique("weir-e2e-");
    let out = kubectl(&["apply", "-f", "crds/"], None);
    assert!(out.ok(), "{}", out.stderr());
    let out = kubectl(
        &[
            "wait",
            "--for=condition=established",
            "--timeout=60s",
            "crd/eventstreams.weir.dev",
            "crd/subscriptions.weir.dev",
            "crd/archivepolicies.weir.dev",
            "crd/cachepolicies.weir.dev",
        ],
        None,
    );
    assert!(out.ok(), "{}", out.stderr());
    let out = kubectl(&["create", "namespace", &ns], None);
    assert!(out.ok(), "{}", out.stderr());

    // The sink.
    let seen = RecordingSink::start().await;
    let sink = seen.url.clone();

    let port = free_port();
    let _operator = Operator(
        Command::new(weir_binary())
            .args(["operator", "--namespaces", &ns, "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--admin-listen")
            .arg(format!("127.0.0.1:{}", free_port()))
            .args(["--lease-namespace", &ns, "--refresh", "5s"])
            // The test sink listens on 127.0.0.1.
            .args(["--sink-allow-cidrs", "127.0.0.0/8"])
            .env("KUBECONFIG", kubeconfig())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn weir operator"),
    );
    let url = format!("http://127.0.0.1:{port}");

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart");
    let mut manifests = String::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        manifests.push_str(&std::fs::read_to_string(f).unwrap());
        manifests.push_str("\n---\n");
    }
    let manifests = manifests
        .replace("namespace: shop", &format!("namespace: {ns}"))
        .replace("http://127.0.0.1:8888/", &sink);
    let out = kubectl(&["apply", "-f", "-"], Some(&manifests));
    assert!(out.ok(), "{}", out.stderr());

    for kind in ["eventstreams", "subscriptions"] {
        eventually(120, &format!("{kind} ready"), || {
            get(&["-n", &ns, kind]).is_some_and(|v| {
                v["items"].as_array().is_some_and(|items| {
                    !items.is_empty()
                        && items
                            .iter()
                            .all(|i| ready_status(i).as_deref() == Some("True"))
                })
            })
        })
        .await;
    }
    let out = kubectl(&["get", "weir", "-n", &ns], None);
    assert!(out.stdout().contains("ENDPOINT"), "{}", out.stdout());
    let out = kubectl(&["explain", "eventstream.spec.batching"], None);
    assert!(out.stdout().contains("maxEvents"), "{}", out.stdout());

    let status = common::http()
        .post(format!("{url}/v1/namespaces/{ns}/streams/orders/events"))
        .header("content-type", "application/cloudevents+json")
        .body(
            json!({"specversion": "1.0", "id": "c1", "source": "/cluster", "type": "order.created",
                   "data": {"orderId": "c1", "amount": 1}})
            .to_string(),
        )
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_success(), "{status}");
    eventually(60, "delivery", || seen.delivered().contains("c1")).await;

    let out = kubectl(
        &["scale", "-n", &ns, "wsub", "print-orders", "--replicas=8"],
        None,
    );
    assert!(out.ok(), "{}", out.stderr());
    eventually(60, "consumers 8", || {
        get(&["-n", &ns, "wsub", "print-orders"]).is_some_and(|v| v["status"]["consumers"] == 8)
    })
    .await;

    for (kind, name) in [
        ("wes", "notifications"),
        ("wsub", "print-orders"),
        ("wes", "orders"),
    ] {
        let out = kubectl(&["delete", "-n", &ns, kind, name, "--timeout=120s"], None);
        assert!(out.ok(), "{}", out.stderr());
    }
    let _ = kubectl(&["delete", "namespace", &ns, "--wait=false"], None);
}
