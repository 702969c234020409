//! Both modes report the same status: one set of manifests runs through `weir run -f DIR`
//! (standalone, `/v1/status`) and through `weir operator` against the in-repo test API server
//! (applied with the real `kubectl`, read back as each object's `.status`), and the conditions
//! (type, status, reason) of every resource are compared.
//!
//! The manifests cover every kind and the states a platform team meets: running streams with
//! and without a store, subscriptions that deliver, that fail to deliver, that keep per-key order
//! in one lane and in several, one whose stream does not exist, a stream with an invalid spec,
//! one whose Secret is missing, two cache policies competing for one stream, and an archive
//! policy that runs. Each mode gets its own namespace, database and exchanges, so the two run
//! at once without sharing queues.

mod apiserver;
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use apiserver::TestApiServer;
use common::{AMQP_URL, Operator, Weir, fresh_database, publish_event, status_sink, unique};
use serde_json::{Value, json};

/// Every manifest, as one multi-document YAML, in namespace `ns`.
fn manifests(ns: &str, db: &str, ok_sink: &str, bad_sink: &str) -> String {
    // Inside the namespace's own exchange prefix (others are refused).
    let x = unique(&format!("weir.{ns}.sm"));
    let docs = [
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: rabbitmq, namespace: {ns}}}\nstringData: {{url: \"{AMQP_URL}\"}}"
        ),
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: pg, namespace: {ns}}}\nstringData: {{url: \"{db}\"}}"
        ),
        format!(
            "apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: orders, namespace: {ns}}}\nspec:\n  \
             broker: {{urlSecretRef: {{name: rabbitmq, key: url}}, exchange: {x}.orders}}\n  \
             store: {{urlSecretRef: {{name: pg, key: url}}}}"
        ),
        format!(
            "apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: fast, namespace: {ns}}}\nspec:\n  \
             broker: {{urlSecretRef: {{name: rabbitmq, key: url}}, exchange: {x}.fast}}"
        ),
        format!(
            "apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: broken, namespace: {ns}}}\nspec:\n  \
             broker: {{urlSecretRef: {{name: rabbitmq, key: url}}, exchange: {x}.broken}}\n  batching: {{maxDelay: soon}}"
        ),
        format!(
            "apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: nosecret, namespace: {ns}}}\nspec:\n  \
             broker: {{urlSecretRef: {{name: absent, key: url}}, exchange: {x}.nosecret}}"
        ),
        format!(
            "apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: delivered, namespace: {ns}}}\nspec:\n  \
             stream: orders\n  sink: {{uri: \"{ok_sink}\"}}\n  startFrom: earliest"
        ),
        format!(
            "apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: failing, namespace: {ns}}}\nspec:\n  \
             stream: orders\n  sink: {{uri: \"{bad_sink}\"}}\n  startFrom: earliest\n  delivery: {{retry: 0}}"
        ),
        format!(
            "apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: serial, namespace: {ns}}}\nspec:\n  \
             stream: orders\n  sink: {{uri: \"{ok_sink}\"}}\n  ordering: perKey\n  partitions: 1"
        ),
        format!(
            "apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: keyed, namespace: {ns}}}\nspec:\n  \
             stream: fast\n  sink: {{uri: \"{ok_sink}\"}}\n  ordering: perKey\n  partitions: 3"
        ),
        format!(
            "apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: orphan, namespace: {ns}}}\nspec:\n  \
             stream: missing\n  sink: {{uri: \"{ok_sink}\"}}"
        ),
        format!(
            "apiVersion: weir.dev/v1alpha1\nkind: CachePolicy\nmetadata: {{name: a-hot, namespace: {ns}}}\n\
             spec: {{streamNames: [orders], strategy: LRU, maxItems: 100}}"
        ),
        format!(
            "apiVersion: weir.dev/v1alpha1\nkind: CachePolicy\nmetadata: {{name: b-hot, namespace: {ns}}}\n\
             spec: {{streamNames: [orders], strategy: LFU}}"
        ),
        format!(
            "apiVersion: weir.dev/v1alpha1\nkind: ArchivePolicy\nmetadata: {{name: nightly, namespace: {ns}}}\n\
             spec: {{streamNames: [orders], archiveAfter: 1s, schedule: 1s}}"
        ),
    ];
    docs.join("\n---\n")
}

/// The resources every snapshot must hold, by (kind, name).
const EXPECTED: [(&str, &str); 12] = [
    ("EventStream", "orders"),
    ("EventStream", "fast"),
    ("EventStream", "broken"),
    ("EventStream", "nosecret"),
    ("Subscription", "delivered"),
    ("Subscription", "failing"),
    ("Subscription", "serial"),
    ("Subscription", "keyed"),
    ("Subscription", "orphan"),
    ("CachePolicy", "a-hot"),
    ("CachePolicy", "b-hot"),
    ("ArchivePolicy", "nightly"),
];

/// (kind, name) → the conditions as (type, status, reason), in the order reported.
type Snapshot = BTreeMap<(String, String), Vec<(String, String, String)>>;

fn conditions_of(conditions: &Value) -> Vec<(String, String, String)> {
    conditions
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                c["type"].as_str().unwrap_or("?").to_string(),
                c["status"].as_str().unwrap_or("?").to_string(),
                c["reason"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect()
}

/// Standalone mode: `/v1/status` of the namespace.
async fn standalone_snapshot(w: &Weir, ns: &str) -> Option<(Snapshot, Value)> {
    let v: Value = common::http_get(format!("{}/v1/status", w.admin))
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    let mut snap = Snapshot::new();
    let mut fields = serde_json::Map::new();
    for r in v["resources"].as_array()? {
        if r["namespace"] != ns {
            continue;
        }
        let kind = r["kind"].as_str()?.to_string();
        let name = r["name"].as_str()?.to_string();
        fields.insert(format!("{kind}/{name}"), r["fields"].clone());
        snap.insert((kind, name), conditions_of(&r["conditions"]));
    }
    Some((snap, Value::Object(fields)))
}

/// Operator mode: every object's `.status`, read with `kubectl get -o json`.
async fn operator_snapshot(server: &TestApiServer, ns: &str) -> Option<(Snapshot, Value)> {
    let mut snap = Snapshot::new();
    let mut statuses = serde_json::Map::new();
    for plural in [
        "eventstreams",
        "subscriptions",
        "cachepolicies",
        "archivepolicies",
    ] {
        let out = server
            .kubectl(&["get", "-n", ns, plural, "-o", "json"])
            .await;
        if !out.success {
            return None;
        }
        let v: Value = serde_json::from_str(&out.stdout).ok()?;
        for item in v["items"].as_array()? {
            let kind = item["kind"].as_str()?.to_string();
            let name = item["metadata"]["name"].as_str()?.to_string();
            statuses.insert(format!("{kind}/{name}"), item["status"].clone());
            snap.insert((kind, name), conditions_of(&item["status"]["conditions"]));
        }
    }
    Some((snap, Value::Object(statuses)))
}

fn condition<'a>(
    s: &'a Snapshot,
    kind: &str,
    name: &str,
    type_: &str,
) -> Option<&'a (String, String, String)> {
    s.get(&(kind.to_string(), name.to_string()))?
        .iter()
        .find(|c| c.0 == type_)
}

fn has(s: &Snapshot, kind: &str, name: &str, type_: &str, status: &str, reason: &str) -> bool {
    condition(s, kind, name, type_).is_some_and(|c| c.1 == status && c.2 == reason)
}

/// Whether a snapshot shows the state the scenario builds (every resource reported, the
/// deliveries and the dead letter done), so that two snapshots compare like with like.
fn settled(s: &Snapshot) -> bool {
    EXPECTED
        .iter()
        .all(|(k, n)| s.contains_key(&(k.to_string(), n.to_string())))
        && has(s, "EventStream", "orders", "Ready", "True", "Ready")
        && has(s, "EventStream", "fast", "Ready", "True", "Ready")
        && has(s, "Subscription", "delivered", "CaughtUp", "True", "Live")
        && has(
            s,
            "Subscription",
            "delivered",
            "SinkReachable",
            "True",
            "Delivered",
        )
        && has(
            s,
            "Subscription",
            "failing",
            "SinkReachable",
            "False",
            "DeliveryFailed",
        )
        && has(s, "Subscription", "serial", "Ready", "True", "Ready")
        && has(s, "Subscription", "keyed", "Ready", "True", "Ready")
        && has(s, "ArchivePolicy", "nightly", "Ready", "True", "Ready")
}

/// `resource.field` pairs standalone mode reports that the operator's `.status` lacks.
fn missing_fields(standalone: &Value, operator: &Value) -> Vec<String> {
    let mut missing = Vec::new();
    for (resource, fields) in standalone.as_object().into_iter().flatten() {
        for name in fields.as_object().into_iter().flatten().map(|(k, _)| k) {
            if operator[resource][name].is_null() {
                missing.push(format!("{resource}.{name}"));
            }
        }
    }
    missing
}

/// Publishes one event to each running stream of a mode until both are accepted.
async fn publish_until_accepted(url: &str, ns: &str, what: &str, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(90);
    for (stream, id) in [("orders", "o1"), ("fast", "f1")] {
        loop {
            let event = json!({"specversion": "1.0", "type": "order.created", "id": id,
                               "source": "/status-modes", "subject": format!("k{id}"),
                               "data": {"n": id}});
            let status = publish_event(url, ns, stream, &event).await;
            if (200..300).contains(&status) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: publishing to {stream} answers {status}; log:\n{}",
                log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standalone_and_operator_report_identical_conditions() {
    let ok_sink = status_sink(200).await;
    let bad_sink = status_sink(500).await;

    // Standalone.
    let solo_ns = unique("solo");
    let solo_db = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("all.yaml"),
        manifests(&solo_ns, &solo_db, &ok_sink, &bad_sink),
    )
    .unwrap();
    let w = Weir::start(dir.path());

    // Operator.
    let server = TestApiServer::start().await;
    let op_ns = unique("op");
    let op_db = fresh_database().await;
    server.apply_crds().await;
    server.apply_namespace(&op_ns).await;
    server
        .apply(&manifests(&op_ns, &op_db, &ok_sink, &bad_sink))
        .await;
    let op = Operator::start(server.kubeconfig(), "op-status", &unique("weir-"), &[]);

    publish_until_accepted(&w.url, &solo_ns, "standalone", || w.log_text()).await;
    publish_until_accepted(&op.url, &op_ns, "operator", || op.log_text()).await;

    // Wait until both have settled, then until they agree: a mode may pass through a
    // transient state (provisioning, catching up) the other has already left.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (solo, solo_fields, oper, oper_status) = loop {
        let a = standalone_snapshot(&w, &solo_ns).await;
        let b = operator_snapshot(&server, &op_ns).await;
        if let (Some((a, af)), Some((b, bf))) = (&a, &b)
            && settled(a)
            && settled(b)
            && a == b
            && missing_fields(af, bf).is_empty()
        {
            break (a.clone(), af.clone(), b.clone(), bf.clone());
        }
        if Instant::now() > deadline {
            let show = |s: &Option<(Snapshot, Value)>| match s {
                Some((s, _)) => s
                    .iter()
                    .map(|((k, n), c)| format!("  {k}/{n}: {c:?}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                None => "  (unreadable)".to_string(),
            };
            let missing = match (&a, &b) {
                (Some((_, af)), Some((_, bf))) => missing_fields(af, bf),
                _ => Vec::new(),
            };
            panic!(
                "the modes did not settle on the same conditions.\nstandalone:\n{}\noperator:\n{}\n\
                 fields standalone reports and the operator's .status lacks: {missing:?}\n\
                 standalone log:\n{}\noperator log:\n{}",
                show(&a),
                show(&b),
                w.log_text(),
                op.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(solo, oper);

    // The states the scenario builds, named, so the comparison is not between two empty lists.
    let s = &solo;
    assert_eq!(s.len(), EXPECTED.len(), "{s:?}");
    assert!(
        has(
            s,
            "EventStream",
            "orders",
            "BrokerReady",
            "True",
            "Connected"
        ),
        "{s:?}"
    );
    assert!(
        has(
            s,
            "EventStream",
            "orders",
            "StoreReady",
            "True",
            "Connected"
        ),
        "{s:?}"
    );
    assert!(
        condition(s, "EventStream", "fast", "StoreReady").is_none(),
        "{s:?}"
    );
    assert!(
        has(s, "EventStream", "broken", "Ready", "False", "InvalidSpec"),
        "{s:?}"
    );
    assert!(
        has(
            s,
            "EventStream",
            "nosecret",
            "Ready",
            "False",
            "SecretNotFound"
        ),
        "{s:?}"
    );
    assert!(
        has(
            s,
            "Subscription",
            "delivered",
            "Ordering",
            "True",
            "Unordered"
        ),
        "{s:?}"
    );
    assert!(
        has(s, "Subscription", "failing", "Ready", "True", "Ready"),
        "{s:?}"
    );
    assert!(
        has(s, "Subscription", "serial", "Ordering", "True", "Serial"),
        "{s:?}"
    );
    assert!(
        has(s, "Subscription", "keyed", "Ordering", "True", "PerKey"),
        "{s:?}"
    );
    assert!(
        has(
            s,
            "Subscription",
            "orphan",
            "Ready",
            "False",
            "StreamNotFound"
        ),
        "{s:?}"
    );
    assert!(
        has(s, "CachePolicy", "a-hot", "Ready", "True", "Ready"),
        "{s:?}"
    );
    assert!(
        has(
            s,
            "CachePolicy",
            "b-hot",
            "Ready",
            "False",
            "PolicyConflict"
        ),
        "{s:?}"
    );
    assert!(
        has(
            s,
            "ArchivePolicy",
            "nightly",
            "ArchiveHealthy",
            "True",
            "Archiving"
        ),
        "{s:?}"
    );
    for conditions in s.values() {
        assert_eq!(
            conditions[0].0, "Ready",
            "Ready comes first: {conditions:?}"
        );
    }

    // The operator writes every status field standalone mode reports, under the same name.
    assert!(missing_fields(&solo_fields, &oper_status).is_empty());
    assert!(
        solo_fields["EventStream/orders"]["exchange"].is_string()
            && oper_status["EventStream/orders"]["exchange"].is_string(),
        "{solo_fields}\n{oper_status}"
    );
}
