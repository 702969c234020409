//! The name, exchange and `pii.fields` rules in both running modes: one set of manifests,
//! holding the colliding pairs of the issue and their DNS-label counterparts, runs through
//! `weir run -f DIR` and through `weir operator` against the in-repo test API server (applied
//! with the real `kubectl`). In each, the refused resources report `InvalidSpec` naming the
//! field and make no queue or exchange, and the valid ones run with queues of their own (checked
//! on the real RabbitMQ).

mod apiserver;
mod common;

use std::time::{Duration, Instant};

use apiserver::TestApiServer;
use common::{AMQP_URL, Operator, Weir, status_sink, unique};
use serde_json::Value;

/// Resources refused, with the field their problem names.
const REFUSED: &[(&str, &str, &str)] = &[
    ("EventStream", "a.b", "metadata.name"),
    ("Subscription", "b.c", "metadata.name"),
    ("Subscription", "x.p0", "metadata.name"),
    ("Subscription", "d", "spec.stream"),
    ("EventStream", "custom", "spec.broker.exchange"),
    ("EventStream", "foreign", "spec.broker.exchange"),
    ("EventStream", "secretive", "spec.pii.fields"),
];

/// Resources that run.
const VALID: &[(&str, &str)] = &[
    ("EventStream", "a"),
    ("EventStream", "a-b"),
    ("EventStream", "s"),
    ("Subscription", "c"),
    ("Subscription", "b-c"),
    ("Subscription", "x"),
];

fn manifests(ns: &str, sink: &str) -> String {
    let doc = |kind: &str, name: &str, spec: &str| {
        format!(
            "---\napiVersion: weir.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: \"{name}\", namespace: {ns}}}\nspec:\n{spec}"
        )
    };
    let broker = "  broker: {urlSecretRef: {name: rabbitmq, key: url}}\n";
    let sub = |stream: &str, extra: &str| {
        format!("  stream: \"{stream}\"\n  sink: {{uri: \"{sink}\"}}\n{extra}")
    };
    [
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: rabbitmq, namespace: {ns}}}\nstringData: {{url: \"{AMQP_URL}\"}}\n"
        ),
        doc("EventStream", "a", broker),
        doc("EventStream", "a-b", broker),
        doc("EventStream", "a.b", broker),
        doc("EventStream", "s", broker),
        // Stream a-b + subscription c, stream a + subscription b-c: distinct queues.
        doc("Subscription", "c", &sub("a-b", "")),
        doc("Subscription", "b-c", &sub("a", "")),
        // Stream a + subscription b.c would share weir.<ns>.a.b.c with a.b + c.
        doc("Subscription", "b.c", &sub("a", "")),
        doc("Subscription", "d", &sub("a.b", "")),
        doc("Subscription", "x", &sub("s", "  ordering: perKey\n  partitions: 2\n")),
        // Its queue would be x's first lane.
        doc("Subscription", "x.p0", &sub("s", "")),
        doc(
            "EventStream",
            "custom",
            &format!("  broker: {{urlSecretRef: {{name: rabbitmq, key: url}}, exchange: legacy-{ns}}}\n"),
        ),
        doc(
            "EventStream",
            "foreign",
            "  broker: {urlSecretRef: {name: rabbitmq, key: url}, exchange: weir.default.orders}\n",
        ),
        doc(
            "EventStream",
            "secretive",
            &format!("{broker}  pii: {{fields: [/email], keySecretRef: {{name: rabbitmq, key: url}}}}\n"),
        ),
    ]
    .concat()
}

/// The broker objects of namespace `ns`: the valid resources' exist, distinct; the refused
/// ones' do not.
async fn assert_broker_objects(ns: &str, mode: &str) {
    for q in [
        format!("weir.{ns}.a-b.c"),
        format!("weir.{ns}.a.b-c"),
        format!("weir.{ns}.s.x.p0"),
        format!("weir.{ns}.s.x.p1"),
        format!("weir.{ns}.s.x.intake"),
        format!("weir-dlq.{ns}.x"),
    ] {
        assert!(common::queue_exists(&q).await, "{mode}: queue {q} missing");
    }
    for q in [
        // b.c on a; d on a.b.
        format!("weir.{ns}.a.b.c"),
        format!("weir.{ns}.a.b.d"),
        // x.p0's own queues (x's lane weir.<ns>.s.x.p0 exists, as x's).
        format!("weir-dlq.{ns}.x.p0"),
        format!("weir-dlq.{ns}.b.c"),
    ] {
        assert!(!common::queue_exists(&q).await, "{mode}: queue {q} exists");
    }
    for x in [format!("weir.{ns}.a"), format!("weir.{ns}.a-b")] {
        assert!(
            common::exchange_exists(&x).await,
            "{mode}: exchange {x} missing"
        );
    }
    for x in [format!("weir.{ns}.a.b"), format!("legacy-{ns}")] {
        assert!(
            !common::exchange_exists(&x).await,
            "{mode}: exchange {x} exists"
        );
    }
}

/// Deletes what a run left on the broker.
async fn delete_broker_objects(ns: &str) {
    let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be running");
    let ch = conn.create_channel().await.expect("channel");
    for q in [
        format!("weir.{ns}.a-b.c"),
        format!("weir.{ns}.a.b-c"),
        format!("weir.{ns}.s.x.p0"),
        format!("weir.{ns}.s.x.p1"),
        format!("weir.{ns}.s.x.intake"),
        format!("weir-dlq.{ns}.x"),
        format!("weir-dlq.{ns}.c"),
        format!("weir-dlq.{ns}.b-c"),
        format!("weir-hold.{ns}.x.p0"),
        format!("weir-hold.{ns}.x.p1"),
    ] {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    for x in ["a", "a-b", "s"] {
        let name = format!("weir.{ns}.{x}");
        let _ = ch
            .exchange_delete(name.as_str().into(), Default::default())
            .await;
    }
    let _ = ch
        .exchange_delete(
            format!("weir-hash.{ns}.x").as_str().into(),
            Default::default(),
        )
        .await;
    common::close_amqp(conn).await;
}

/// `(kind, name) -> (ready status, reason, message)` of the standalone `/v1/status`.
async fn standalone_conditions(
    w: &Weir,
    ns: &str,
) -> Vec<(String, String, String, String, String)> {
    let Ok(r) = common::http_get(format!("{}/v1/status", w.admin)).await else {
        return Vec::new();
    };
    let Ok(v) = r.json::<Value>().await else {
        return Vec::new();
    };
    conditions(
        v["resources"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["namespace"] == ns),
        |r| &r["conditions"],
    )
}

async fn operator_conditions(
    server: &TestApiServer,
    ns: &str,
) -> Vec<(String, String, String, String, String)> {
    let mut out = Vec::new();
    for plural in ["eventstreams", "subscriptions"] {
        let o = server
            .kubectl(&["get", "-n", ns, plural, "-o", "json"])
            .await;
        let Ok(v) = serde_json::from_str::<Value>(&o.stdout) else {
            continue;
        };
        out.extend(conditions(
            v["items"].as_array().into_iter().flatten(),
            |r| &r["status"]["conditions"],
        ));
    }
    out
}

/// `(kind, name, Ready status, reason, message)` of each resource.
fn conditions<'a>(
    resources: impl Iterator<Item = &'a Value>,
    conds: impl Fn(&'a Value) -> &'a Value,
) -> Vec<(String, String, String, String, String)> {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    resources
        .filter_map(|r| {
            let ready = conds(r).as_array()?.iter().find(|c| c["type"] == "Ready")?;
            let name = if r["metadata"].is_object() {
                &r["metadata"]["name"]
            } else {
                &r["name"]
            };
            Some((
                s(&r["kind"]),
                s(name),
                s(&ready["status"]),
                s(&ready["reason"]),
                s(&ready["message"]),
            ))
        })
        .collect()
}

/// Waits until every refused resource is `Ready=False/InvalidSpec` naming its field and every
/// valid one `Ready=True`.
async fn wait_settled<F, Fut>(mode: &str, read: F, log: impl Fn() -> String)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Vec<(String, String, String, String, String)>>,
{
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let got = read().await;
        let find = |kind: &str, name: &str| got.iter().find(|c| c.0 == kind && c.1 == name);
        let refused_ok = REFUSED.iter().all(|(kind, name, field)| {
            find(kind, name)
                .is_some_and(|c| c.2 == "False" && c.3 == "InvalidSpec" && c.4.contains(field))
        });
        let valid_ok = VALID
            .iter()
            .all(|(kind, name)| find(kind, name).is_some_and(|c| c.2 == "True"));
        if refused_ok && valid_ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{mode}: conditions did not settle: {got:#?}\nlog:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standalone_refuses_colliding_names_and_keeps_the_others_apart() {
    let sink = status_sink(200).await;
    let ns = unique("nms");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("all.yaml"), manifests(&ns, &sink)).unwrap();
    let mut w = Weir::start(dir.path());
    for (_, name) in VALID {
        w.wait_ready(&ns, name).await;
    }
    // Folder mode refuses a dotted name when loading (the resource never reaches the status
    // with a Ready condition); the log says which and why.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = standalone_conditions(&w, &ns).await;
        let log = w.log_text();
        let loaded_ok = ["custom", "foreign", "secretive", "d"].iter().all(|name| {
            got.iter()
                .any(|c| c.1 == *name && c.2 == "False" && c.3 == "InvalidSpec")
        });
        let names_logged = ["a.b", "b.c", "x.p0"].iter().all(|n| {
            log.contains(&format!(
                "metadata.name: \"{n}\" is not a valid name: it must be a DNS label"
            ))
        });
        if loaded_ok && names_logged {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "standalone: {got:#?}\nlog:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_broker_objects(&ns, "standalone").await;
    w.terminate();
    delete_broker_objects(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_refuses_colliding_names_and_keeps_the_others_apart() {
    let sink = status_sink(200).await;
    let server = TestApiServer::start().await;
    let ns = unique("nmo");
    server.apply_crds().await;
    server.apply_namespace(&ns).await;
    // The API server takes dotted names (a DNS subdomain is a valid object name): the
    // operator is what must refuse them.
    server.apply(&manifests(&ns, &sink)).await;
    let op = Operator::start(server.kubeconfig(), "op-names", &unique("weir-"), &[]);
    wait_settled(
        "operator",
        || operator_conditions(&server, &ns),
        || op.log_text(),
    )
    .await;
    assert_broker_objects(&ns, "operator").await;

    // The message names the rule.
    let got = operator_conditions(&server, &ns).await;
    let msg = &got
        .iter()
        .find(|c| c.1 == "x.p0")
        .expect("x.p0 has a Ready condition")
        .4;
    assert!(
        msg.contains("metadata.name") && msg.contains("DNS label"),
        "{msg}"
    );
    drop(op);
    delete_broker_objects(&ns).await;
}

/// `weir run --allow-custom-exchanges` runs the stream the default refuses, on its own
/// exchange; another namespace's `weir.` name stays refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standalone_allows_custom_exchanges_with_the_setting() {
    let ns = unique("nmx");
    let dir = tempfile::tempdir().unwrap();
    let doc = |name: &str, exchange: &str| {
        format!(
            "---\napiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec:\n  broker: {{urlSecretRef: {{name: rabbitmq, key: url}}, exchange: \"{exchange}\"}}\n"
        )
    };
    std::fs::write(
        dir.path().join("all.yaml"),
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: rabbitmq, namespace: {ns}}}\nstringData: {{url: \"{AMQP_URL}\"}}\n{}{}",
            doc("custom", &format!("legacy-{ns}")),
            doc("foreign", "weir.default.orders"),
        ),
    )
    .unwrap();
    let mut w = Weir::start_with_args(dir.path(), &["--allow-custom-exchanges"]);
    w.wait_ready(&ns, "custom").await;
    assert!(
        common::exchange_exists(&format!("legacy-{ns}")).await,
        "exchange legacy-{ns} was not declared; log:\n{}",
        w.log_text()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !standalone_conditions(&w, &ns)
        .await
        .iter()
        .any(|c| c.1 == "foreign" && c.3 == "InvalidSpec" && c.4.contains("spec.broker.exchange"))
    {
        assert!(
            Instant::now() < deadline,
            "foreign was not refused; log:\n{}",
            w.log_text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    w.terminate();
    let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be running");
    let ch = conn.create_channel().await.expect("channel");
    let _ = ch
        .exchange_delete(format!("legacy-{ns}").as_str().into(), Default::default())
        .await;
    common::close_amqp(conn).await;
}
