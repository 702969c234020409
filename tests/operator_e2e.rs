//! End to end: the real `weir operator` binary against the in-process test API server, driven
//! by the real `kubectl`, with the real RabbitMQ and PostgreSQL.
//!
//! One scenario (it needs minutes of wall time, so it is one test rather than many):
//! `kubectl apply` of the quickstart, every resource `Ready=True`, `kubectl get weir` and
//! `kubectl explain`, events published, stored and delivered, `kubectl scale`, malformed
//! resources reported and fixed without a restart, a second operator serving ingest and taking
//! the Lease over when the holder is killed, `kubectl delete` under each deletionPolicy, and
//! finally the chart's RBAC compared with every call the operators made.
//!
//! The operators authenticate as the chart's service account and the test API server enforces
//! the RBAC objects `helm template` renders, so a verb missing from the chart fails here as it
//! would fail a rollout. Where the test API server differs from a real one, see
//! `tests/apiserver/mod.rs`.

mod apiserver;
mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use apiserver::TestApiServer;
use common::recording::RecordingSink;
use common::{Operator, exchange_exists, queue_exists, unique};
use serde_json::{Value, json};

/// The quickstart manifests, moved to namespace `ns` and pointed at `sink`.
fn quickstart(ns: &str, sink: &str) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect::<Vec<_>>()
        .join("\n---\n")
        .replace("namespace: shop", &format!("namespace: {ns}"))
        .replace("http://127.0.0.1:8888/", sink)
}

async fn get_json(server: &TestApiServer, args: &[&str]) -> Option<Value> {
    let mut a = vec!["get"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["-o", "json"]);
    let out = server.kubectl(&a).await;
    if !out.success {
        return None;
    }
    serde_json::from_str(&out.stdout).ok()
}

fn ready(obj: &Value) -> Option<(String, String, String)> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
        .map(|c| {
            (
                c["status"].as_str().unwrap_or("").to_string(),
                c["reason"].as_str().unwrap_or("").to_string(),
                c["message"].as_str().unwrap_or("").to_string(),
            )
        })
}

async fn wait_ready(server: &TestApiServer, ns: &str, what: &str, ops: &[&Operator]) {
    eventually(90, &format!("{what} Ready=True"), ops, || async {
        let v = get_json(server, &["-n", ns, what]).await?;
        let items = v["items"].as_array()?.clone();
        (!items.is_empty()
            && items
                .iter()
                .all(|i| ready(i).is_some_and(|(s, _, _)| s == "True")))
        .then_some(())
    })
    .await;
}

async fn wait_condition(
    server: &TestApiServer,
    ns: &str,
    what: &str,
    status: &str,
    reason: &str,
    ops: &[&Operator],
) -> String {
    eventually(
        60,
        &format!("{what} Ready={status} {reason}"),
        ops,
        || async {
            let v = get_json(server, &["-n", ns, what]).await?;
            let (s, r, m) = ready(&v)?;
            (s == status && r == reason).then_some(m)
        },
    )
    .await
}

fn event(id: &str) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "/e2e", "type": "order.created",
           "data": {"orderId": id, "amount": 3}})
}

async fn publish(url: &str, ns: &str, stream: &str, id: &str) -> reqwest::StatusCode {
    let status = common::publish_event(url, ns, stream, &event(id)).await;
    reqwest::StatusCode::from_u16(status).unwrap_or(reqwest::StatusCode::SERVICE_UNAVAILABLE)
}

/// [`common::eventually`] with the operators' logs as context.
async fn eventually<T, F, Fut>(secs: u64, what: &str, ops: &[&Operator], f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let logs = || {
        let logs: Vec<String> = ops.iter().map(|o| o.log_text()).collect();
        format!("operator logs:\n{}", logs.join("\n=====\n"))
    };
    common::eventually(secs, what, logs, f).await
}

/// A sink recording every delivery; [`delivered_ids`] lists their `ce-id`s.
async fn sink() -> (String, RecordingSink) {
    let sink = RecordingSink::start().await;
    (sink.url.clone(), sink)
}

/// The `ce-id` of every delivery so far, in order.
fn delivered_ids(sink: &RecordingSink) -> Vec<String> {
    sink.got().into_iter().map(|g| g.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_end_to_end_with_kubectl() {
    let server = TestApiServer::start().await;
    let ns = unique("e2e");
    let lease = unique("weir-");
    server.apply_crds().await;
    // kubectl's typed `create` subcommands send protobuf, which the test server does not
    // read: everything is created with `apply -f -`.
    server.apply_namespace(&ns).await;

    // The operators run as the chart's service account (release namespace `default`, where
    // Operator::start puts the Lease) under the chart's rendered RBAC.
    let chart = common::helm::render_in("default", &[]).unwrap_or_else(|e| panic!("helm: {e}"));
    server.enforce_rbac(&chart);
    let op_kubeconfig = server.kubeconfig_with_token(&server.issue_token("default", "weir", &[]));
    let mut a = Operator::start(&op_kubeconfig, "op-a", &lease, &[]);
    let (sink_url, delivered) = sink().await;
    server.apply(&quickstart(&ns, &sink_url)).await;

    // One of each of the other two kinds, so that `kubectl get weir` shows all four.
    let policies = format!(
        "apiVersion: weir.dev/v1alpha1\nkind: CachePolicy\nmetadata: {{name: hot, namespace: {ns}}}\n\
         spec: {{streamNames: [orders]}}\n---\n\
         apiVersion: weir.dev/v1alpha1\nkind: ArchivePolicy\nmetadata: {{name: nightly, namespace: {ns}}}\n\
         spec: {{streamNames: [orders]}}\n"
    );
    server.apply(&policies).await;

    // Every resource becomes ready.
    wait_ready(&server, &ns, "eventstreams", &[&a]).await;
    wait_ready(&server, &ns, "subscriptions", &[&a]).await;
    wait_ready(&server, &ns, "cachepolicies", &[&a]).await;
    wait_ready(&server, &ns, "archivepolicies", &[&a]).await;
    let es = get_json(&server, &["-n", &ns, "wes", "orders"])
        .await
        .unwrap();
    assert_eq!(es["status"]["exchange"], format!("weir.{ns}.orders"));
    assert_eq!(
        es["status"]["observedGeneration"],
        es["metadata"]["generation"]
    );
    assert!(
        es["metadata"]["finalizers"]
            .as_array()
            .unwrap()
            .contains(&json!("weir.dev/cleanup"))
    );

    // `kubectl get weir` shows the kinds with their printer columns.
    let out = server.kubectl(&["get", "weir", "-n", &ns]).await;
    assert!(out.success, "{}", out.stderr);
    for needle in [
        "ENDPOINT",
        "HEAD",
        "BACKLOG",
        "CONSUMERS",
        "eventstream.weir.dev/orders",
        "subscription.weir.dev/print-orders",
        "cachepolicy.weir.dev/hot",
        "archivepolicy.weir.dev/nightly",
    ] {
        assert!(
            out.stdout.contains(needle),
            "no {needle} in:\n{}",
            out.stdout
        );
    }
    // `kubectl explain` shows the doc comments.
    let out = server
        .kubectl(&["explain", "eventstream.spec.batching"])
        .await;
    assert!(out.success, "{}", out.stderr);
    assert!(
        out.stdout.contains("maxEvents") && out.stdout.contains("grouped"),
        "{}",
        out.stdout
    );

    // Publish: stored (read back) and delivered.
    assert!(publish(&a.url, &ns, "orders", "e1").await.is_success());
    let body: Value = common::http_get(format!(
        "{}/v1/namespaces/{ns}/streams/orders/events/1",
        a.url
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(body["id"], "e1");
    eventually(30, "delivery of e1", &[&a], || async {
        delivered_ids(&delivered)
            .contains(&"e1".to_string())
            .then_some(())
    })
    .await;

    // /scale: the new consumers value is applied live and reported.
    let out = server
        .kubectl(&["scale", "-n", &ns, "wsub", "print-orders", "--replicas=8"])
        .await;
    assert!(out.success, "{}", out.stderr);
    eventually(30, "status.consumers = 8", &[&a], || async {
        let v = get_json(&server, &["-n", &ns, "wsub", "print-orders"]).await?;
        (v["status"]["consumers"] == 8).then_some(())
    })
    .await;
    let v = get_json(&server, &["-n", &ns, "wsub", "print-orders"])
        .await
        .unwrap();
    // The `/scale` selector selects the worker Pods (the operator's default labels here).
    assert_eq!(
        v["status"]["selector"],
        "app.kubernetes.io/name=weir,app.kubernetes.io/component=operator"
    );

    // A malformed stream (a duration the CRD schema cannot check) is reported and skipped;
    // fixing it makes it ready without a restart.
    let broken = format!(
        "apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: broken, namespace: {ns}}}\n\
         spec:\n  broker: {{urlSecretRef: {{name: rabbitmq, key: url}}}}\n  batching: {{maxDelay: soon}}\n"
    );
    server.apply(&broken).await;
    let msg = wait_condition(&server, &ns, "wes/broken", "False", "InvalidSpec", &[&a]).await;
    assert!(msg.contains("spec.batching.maxDelay"), "{msg}");
    // Patching in a valid delay makes it ready again.
    let fix = async || {
        let out = server
            .kubectl(&[
                "patch",
                "-n",
                &ns,
                "wes",
                "broken",
                "--type=merge",
                "-p",
                r#"{"spec":{"batching":{"maxDelay":"5ms"}}}"#,
            ])
            .await;
        assert!(out.success, "{}", out.stderr);
        wait_condition(&server, &ns, "wes/broken", "True", "Ready", &[&a]).await;
    };
    fix().await;
    // The same mistake again: the recorder patches the existing Warning's series.
    server.apply(&broken).await;
    wait_condition(&server, &ns, "wes/broken", "False", "InvalidSpec", &[&a]).await;
    fix().await;

    // A missing Secret names the Secret; creating it makes the stream ready.
    let secret = unique("late-");
    let nosecret = format!(
        "apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: nosecret, namespace: {ns}}}\n\
         spec:\n  broker: {{urlSecretRef: {{name: {secret}, key: url}}}}\n  deletionPolicy: Delete\n"
    );
    server.apply(&nosecret).await;
    let msg = wait_condition(
        &server,
        &ns,
        "wes/nosecret",
        "False",
        "SecretNotFound",
        &[&a],
    )
    .await;
    assert!(msg.contains(&secret), "{msg}");
    server.apply(&format!(
                "apiVersion: v1\nkind: Secret\nmetadata: {{name: {secret}, namespace: {ns}}}\nstringData: {{url: \"{}\"}}\n",
                common::AMQP_URL
            )).await;
    wait_condition(&server, &ns, "wes/nosecret", "True", "Ready", &[&a]).await;

    // A schema kept in a ConfigMap (`schemaFrom`) is read with `get`, like Secrets.
    let schemas = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: order-schemas, namespace: {ns}}}\n\
         data:\n  created.json: '{{\"type\": \"object\", \"required\": [\"orderId\"]}}'\n---\n\
         apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: schemed, namespace: {ns}}}\n\
         spec:\n  broker: {{urlSecretRef: {{name: rabbitmq, key: url}}}}\n  deletionPolicy: Delete\n  validation:\n    \
         schemas:\n      - type: order.created\n        schemaFrom: {{configMapKeyRef: {{name: order-schemas, key: created.json}}}}\n"
    );
    server.apply(&schemas).await;
    wait_condition(&server, &ns, "wes/schemed", "True", "Ready", &[&a]).await;

    // A second operator: serves ingest too; A holds the Lease.
    // It watches only the test's namespace (`--namespaces`, the chart's `watchNamespaces`);
    // op-a watches all namespaces.
    let b = Operator::start(&op_kubeconfig, "op-b", &lease, &["--namespaces", &ns]);
    eventually(60, "op-b serving ingest", &[&a, &b], || async {
        publish(&b.url, &ns, "orders", "e2")
            .await
            .is_success()
            .then_some(())
    })
    .await;
    assert_eq!(holder(&server, &lease).await, "op-a");
    eventually(30, "head 2 in status", &[&a, &b], || async {
        let v = get_json(&server, &["-n", &ns, "wes", "orders"]).await?;
        (v["status"]["head"] == "2").then_some(())
    })
    .await;

    // With both running, only the holder records Events.
    let events = get_json(&server, &["-n", &ns, "events.events.k8s.io"])
        .await
        .unwrap();
    let instances: BTreeSet<String> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reportingInstance"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(instances, BTreeSet::from(["op-a".to_string()]));

    // Killing the holder hands the Lease over; status keeps updating.
    a.kill9();
    eventually(60, "op-b holding the Lease", &[&b], || async {
        (holder(&server, &lease).await == "op-b").then_some(())
    })
    .await;
    assert!(publish(&b.url, &ns, "orders", "e3").await.is_success());
    eventually(30, "head 3 in status (written by op-b)", &[&b], || async {
        let v = get_json(&server, &["-n", &ns, "wes", "orders"]).await?;
        (v["status"]["head"] == "3").then_some(())
    })
    .await;

    // deletionPolicy Delete: the broker-only stream's exchange goes with it.
    let notifications_exchange = format!("weir.{ns}.notifications");
    assert!(exchange_exists(&notifications_exchange).await);
    let out = server
        .kubectl(&["delete", "-n", &ns, "wes", "notifications", "--timeout=60s"])
        .await;
    assert!(out.success, "{}", out.stderr);
    assert!(!exchange_exists(&notifications_exchange).await);

    // A stream with a live subscription is not torn down under it.
    let out = server
        .kubectl(&["delete", "-n", &ns, "wes", "orders", "--wait=false"])
        .await;
    assert!(out.success, "{}", out.stderr);
    wait_condition(
        &server,
        &ns,
        "wsub/print-orders",
        "False",
        "StreamDeleted",
        &[&b],
    )
    .await;
    assert!(
        get_json(&server, &["-n", &ns, "wes", "orders"])
            .await
            .is_some()
    );
    // The subscription (deletionPolicy Delete by default) takes its queue with it; then the
    // stream goes, keeping its exchange and stored events (Retain).
    let queue = format!("weir.{ns}.orders.print-orders");
    assert!(queue_exists(&queue).await);
    let out = server
        .kubectl(&["delete", "-n", &ns, "wsub", "print-orders", "--timeout=60s"])
        .await;
    assert!(out.success, "{}", out.stderr);
    assert!(!queue_exists(&queue).await);
    eventually(60, "EventStream orders gone", &[&b], || async {
        get_json(&server, &["-n", &ns, "wes", "orders"])
            .await
            .is_none()
            .then_some(())
    })
    .await;
    assert!(exchange_exists(&format!("weir.{ns}.orders")).await);
    let pool = sqlx::PgPool::connect(&common::pg_admin_url())
        .await
        .unwrap();
    let (rows,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM weir_events e JOIN weir_streams s USING (stream_id) \
         WHERE s.namespace = $1 AND s.name = 'orders'",
    )
    .bind(&ns)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(rows, 3, "Retain keeps the stored events");
    // Clean up what Retain kept, so test runs do not pile up.
    let _ = sqlx::query("DELETE FROM weir_streams WHERE namespace = $1")
        .bind(&ns)
        .execute(&pool)
        .await;

    // The admin API asks the API server who a bearer token is (TokenReview) and what its
    // user may do (SubjectAccessReview): no grant here, so 403.
    let token = server.issue_token(&ns, "ops", &["weir"]);
    let r = common::http()
        .get(format!(
            "{}/v1/namespaces/{ns}/subscriptions/print-orders/deadletters",
            b.admin
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // The chart's RBAC against every call the operators made.
    let rules = chart_rules(&chart);
    let used: BTreeSet<(String, String, String)> = server
        .calls()
        .into_iter()
        .filter(|c| !c.user_agent.starts_with("kubectl") && !c.resource.is_empty())
        .map(|c| {
            let resource = match &c.subresource {
                Some(s) => format!("{}/{s}", c.resource),
                None => c.resource.clone(),
            };
            (c.group, resource, c.verb)
        })
        .collect();
    let not_allowed: Vec<_> = used.difference(&rules).collect();
    assert!(
        not_allowed.is_empty(),
        "calls the chart's RBAC does not allow: {not_allowed:?}"
    );
    // Every rule was exercised: the scenario reads a `schemaFrom` ConfigMap and repeats a
    // Warning (patched onto its Event series).
    let unused: Vec<_> = rules.difference(&used).collect();
    assert!(unused.is_empty(), "rules never used: {unused:?}");
    drop(b);
}

/// The identity holding the Lease.
async fn holder(server: &TestApiServer, lease: &str) -> String {
    let out = server
        .kubectl(&[
            "get",
            "lease",
            "-n",
            "default",
            lease,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .await;
    out.stdout.trim().to_string()
}

/// The (group, resource, verb) triples the chart's rules grant.
/// (group, resource, verb) of every rule in the rendered chart's Roles and ClusterRoles.
fn chart_rules(chart: &[Value]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for role in chart
        .iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
    {
        for r in role["rules"].as_array().unwrap() {
            let list = |k: &str| -> Vec<String> {
                r[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect()
            };
            for g in list("apiGroups") {
                for res in list("resources") {
                    for v in list("verbs") {
                        out.insert((g.clone(), res.clone(), v));
                    }
                }
            }
        }
    }
    out
}

async fn http_status(url: &str) -> Option<u16> {
    common::http_get(url)
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// Readiness waits for the CRDs; SIGTERM exits cleanly and releases the Lease at once. The
/// operator watches two namespaces here (`--namespaces`, the chart's `watchNamespaces`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_waits_for_crds_and_releases_the_lease_on_sigterm() {
    let server = TestApiServer::start().await;
    let lease = unique("weir-");
    // The chart's per-namespace Roles (watchNamespaces) are enough for a scoped operator.
    let chart =
        common::helm::render_in("default", &["--set=watchNamespaces={default,kube-public}"])
            .unwrap_or_else(|e| panic!("helm: {e}"));
    server.enforce_rbac(&chart);
    let op_kubeconfig = server.kubeconfig_with_token(&server.issue_token("default", "weir", &[]));
    let mut op = Operator::start(
        &op_kubeconfig,
        "op-solo",
        &lease,
        &["--namespaces", "default,kube-public"],
    );
    let healthz = format!("{}/healthz", op.admin);
    let readyz = format!("{}/readyz", op.admin);
    eventually(30, "healthz", &[&op], || async {
        (http_status(&healthz).await == Some(200)).then_some(())
    })
    .await;
    // No CRDs yet: alive, not ready, and no Lease taken.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(http_status(&readyz).await, Some(503));
    assert_eq!(holder(&server, &lease).await, "");

    server.apply_crds().await;
    eventually(
        30,
        "readyz once the CRDs are established",
        &[&op],
        || async { (http_status(&readyz).await == Some(200)).then_some(()) },
    )
    .await;
    eventually(30, "op-solo holding the Lease", &[&op], || async {
        (holder(&server, &lease).await == "op-solo").then_some(())
    })
    .await;

    let status = op.terminate();
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        op.log_text()
    );
    // Released, not left to expire.
    assert_eq!(holder(&server, &lease).await, "");
}

/// `kubectl scale wsub/NAME --replicas=0` (what KEDA writes through `/scale` for an idle
/// subscription): the operator accepts it, stops delivering, keeps the queue bound and reports
/// the accumulating backlog and `ScaledToZero`; `--replicas=2` delivers what accumulated, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_scale_to_zero_parks_a_subscription_and_scaling_up_delivers_what_accumulated() {
    let server = TestApiServer::start().await;
    let db = common::fresh_database().await;
    // Namespace `test`, so that the stream's exchange is `weir.test.<stream>`.
    let ns = "test";
    let stream = unique("orders-");
    let sub = unique("zero-");
    server.apply_crds().await;
    let (sink_url, delivered) = sink().await;
    let manifests = common::namespace_with_secrets(ns, &db)
        + &format!(
            "apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: {stream}, namespace: {ns}}}\n\
         spec:\n  broker: {{urlSecretRef: {{name: rabbitmq, key: url}}}}\n\
         \x20 store: {{urlSecretRef: {{name: pg, key: url}}}}\n  deletionPolicy: Delete\n---\n\
         apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: {sub}, namespace: {ns}}}\n\
         spec:\n  stream: {stream}\n  sink: {{uri: \"{sink_url}\"}}\n  consumers: 2\n",
        );
    let lease = unique("weir-");
    let op = Operator::start(server.kubeconfig(), "op-zero", &lease, &[]);
    server.apply(&manifests).await;
    let wsub = format!("wsub/{sub}");
    wait_condition(&server, ns, &wsub, "True", "Ready", &[&op]).await;
    assert!(publish(&op.url, ns, &stream, "e0").await.is_success());
    eventually(30, "delivery of e0", &[&op], || async {
        delivered_ids(&delivered)
            .contains(&"e0".to_string())
            .then_some(())
    })
    .await;

    // To zero through `/scale`: accepted by the schema and by validation, reported as such.
    let out = server
        .kubectl(&["scale", "-n", ns, &wsub, "--replicas=0"])
        .await;
    assert!(out.success, "{}", out.stderr);
    wait_condition(&server, ns, &wsub, "True", "ScaledToZero", &[&op]).await;
    let v = get_json(&server, &["-n", ns, &wsub]).await.unwrap();
    assert_eq!(v["spec"]["consumers"], 0, "{v}");
    assert_eq!(v["status"]["consumers"], 0, "{v}");
    let caught = v["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "CaughtUp")
        .cloned()
        .unwrap();
    assert_eq!(
        (&caught["status"], &caught["reason"]),
        (&json!("False"), &json!("ScaledToZero"))
    );
    let queue = format!("weir.{ns}.{stream}.{sub}");
    assert!(
        queue_exists(&queue).await,
        "the queue stays while scaled to zero"
    );

    let ids: Vec<String> = (1..=20).map(|i| format!("z{i}")).collect();
    for id in &ids {
        assert!(publish(&op.url, ns, &stream, id).await.is_success());
    }
    // The backlog keeps being reported (KEDA's signal to wake it up) while nothing is
    // delivered.
    eventually(60, "status.backlog = 20", &[&op], || async {
        let v = get_json(&server, &["-n", ns, &wsub]).await?;
        (v["status"]["backlog"] == 20).then_some(())
    })
    .await;
    assert_eq!(delivered_ids(&delivered), vec!["e0".to_string()]);

    // Back up: everything that accumulated is delivered, once.
    let out = server
        .kubectl(&["scale", "-n", ns, &wsub, "--replicas=2"])
        .await;
    assert!(out.success, "{}", out.stderr);
    eventually(
        60,
        "the 20 accumulated events delivered",
        &[&op],
        || async {
            let d = delivered_ids(&delivered);
            ids.iter().all(|id| d.contains(id)).then_some(())
        },
    )
    .await;
    wait_condition(&server, ns, &wsub, "True", "Ready", &[&op]).await;
    eventually(60, "status.consumers = 2, backlog 0", &[&op], || async {
        let v = get_json(&server, &["-n", ns, &wsub]).await?;
        (v["status"]["consumers"] == 2 && v["status"]["backlog"] == 0).then_some(())
    })
    .await;
    let d = delivered_ids(&delivered);
    assert_eq!(d.len(), 21, "each event once: {d:?}");

    // Clean up the broker side (deletionPolicy Delete on both).
    let out = server
        .kubectl(&["delete", "-n", ns, &wsub, &format!("wes/{stream}")])
        .await;
    assert!(out.success, "{}", out.stderr);
    eventually(60, "queue and exchange deleted", &[&op], || async {
        (!queue_exists(&queue).await && !exchange_exists(&format!("weir.{ns}.{stream}")).await)
            .then_some(())
    })
    .await;
}
