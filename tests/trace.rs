//! Correlation traces: the events of one saga across a namespace's streams, in commit order,
//! over HTTP and as `weir trace`'s causation tree.

mod common;

use common::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_saga_is_traced_across_streams_in_commit_order() {
    let db = fresh_database().await;
    let m = Manifests::new(&db);
    m.write(
        "orders.yaml",
        &stream_yaml("orders", &unique("weir.test.tr."), ""),
    );
    m.write(
        "shipping.yaml",
        &stream_yaml("shipping", &unique("weir.test.tr."), ""),
    );
    let mut w = Weir::start(m.path());
    w.wait_readable("test", "orders").await;
    w.wait_readable("test", "shipping").await;
    let c = common::http();
    // Structured CloudEvents: the seed's JSON shape has no causationid.
    let publish = |stream: &str, mut body: Value| {
        let (c, url) = (c.clone(), w.events_url("test", stream));
        body["specversion"] = json!("1.0");
        body["source"] = json!("/trace-test");
        async move {
            let r = c
                .post(&url)
                .header("content-type", "application/cloudevents+json")
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
        }
    };
    let saga = unique("saga-");
    publish(
        "orders",
        json!({"type": "other", "id": "x0", "correlationid": "unrelated"}),
    )
    .await;
    // The saga's first event names its distributed trace (the CloudEvents tracing extension).
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    publish(
        "orders",
        json!({"type": "order.created", "id": "o1", "correlationid": saga,
               "traceparent": format!("00-{trace_id}-00f067aa0ba902b7-01")}),
    )
    .await;
    publish("orders", json!({"type": "payment.completed", "id": "p1", "correlationid": saga, "causationid": "o1"})).await;
    publish("shipping", json!({"type": "shipment.scheduled", "id": "s1", "correlationid": saga, "causationid": "p1"})).await;
    publish(
        "orders",
        json!({"type": "email.sent", "id": "e1", "correlationid": saga, "causationid": "o1"}),
    )
    .await;

    let url = format!("{}/v1/namespaces/test/correlations/{saga}/events", w.url);
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let rows: Vec<(String, String, i64, Option<String>)> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["id"].as_str().unwrap().to_string(),
                e["stream"].as_str().unwrap().to_string(),
                e["position"].as_i64().unwrap(),
                e["causationid"].as_str().map(str::to_string),
            )
        })
        .collect();
    let row = |id: &str, stream: &str, pos: i64, cause: Option<&str>| {
        (
            id.to_string(),
            stream.to_string(),
            pos,
            cause.map(str::to_string),
        )
    };
    assert_eq!(
        rows,
        [
            row("o1", "orders", 2, None),
            row("p1", "orders", 3, Some("o1")),
            row("s1", "shipping", 1, Some("p1")),
            row("e1", "orders", 4, Some("o1")),
        ]
    );
    assert_eq!(v["truncated"], false);
    assert_eq!(v["events"][0]["event"]["correlationid"], saga.as_str());
    assert_eq!(v["events"][0]["event"]["weirposition"], "2");
    // Each event shows the trace it carries: o1 its own, the others (published without one)
    // each a new trace.
    assert_eq!(v["events"][0]["traceId"], trace_id);
    let others: std::collections::BTreeSet<&str> = v["events"].as_array().unwrap()[1..]
        .iter()
        .map(|e| e["traceId"].as_str().unwrap())
        .collect();
    assert_eq!(others.len(), 3, "{v}");
    assert!(!others.contains(trace_id), "{v}");

    // limit cuts the trace and says so; an unknown id is an empty trace; a bad limit a 400.
    let v: Value = c
        .get(format!("{url}?limit=2"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (v["events"].as_array().unwrap().len(), &v["truncated"]),
        (2, &json!(true))
    );
    let v: Value = c
        .get(format!(
            "{}/v1/namespaces/test/correlations/none/events",
            w.url
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["events"], json!([]));
    let r = c.get(format!("{url}?limit=0")).send().await.unwrap();
    assert_eq!(r.status(), 400);

    // The CLI prints the causation tree.
    let out = std::process::Command::new(weir_binary())
        .args(["--url", &w.url, "trace", "test", &saga])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        format!("correlationid {saga} (4 events)"),
        "{text}"
    );
    assert!(lines[1].starts_with("order.created o1  orders#2"), "{text}");
    assert!(lines[1].ends_with(&format!("  trace {trace_id}")), "{text}");
    assert!(
        lines[2].starts_with("   └─ payment.completed p1  orders#3"),
        "{text}"
    );
    assert!(
        lines[3].starts_with("      └─ shipment.scheduled s1  shipping#1"),
        "{text}"
    );
    assert!(
        lines[4].starts_with("   └─ email.sent e1  orders#4"),
        "{text}"
    );
}
