//! The log grows with what a person must read, not with traffic: a real `weir run` at
//! `RUST_LOG=info` relays tens of thousands of events that no queue takes (each returned by
//! RabbitMQ, which lapin would log at WARN, ~2.4 KB a line) and its log stays small.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// The most log the whole run may write (start-up, provisioning, 20,000 events relayed).
/// Start-up at info is a few lines; one lapin line per returned event would be ~48 MB.
const MAX_LOG_BYTES: u64 = 20 * 1024;

const EVENTS: usize = 10_000;
const BATCH: usize = 100;

/// The relay's `weir_relay_events_total{outcome}` for `test/<stream>`.
fn relayed(metrics: &str, stream: &str, outcome: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("weir_relay_events_total{"))
        .filter(|l| {
            l.contains("namespace=\"test\"")
                && l.contains(&format!("stream=\"{stream}\""))
                && l.contains(&format!("outcome=\"{outcome}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

async fn publish_all(url: String, ty: &'static str) {
    let client = common::http();
    let mut tasks = tokio::task::JoinSet::new();
    // Three keep-alive clients, as in the run the issue describes.
    for c in 0..3 {
        let (client, url) = (client.clone(), url.clone());
        tasks.spawn(async move {
            for b in (c..EVENTS / BATCH).step_by(3) {
                let events: Vec<Value> = (0..BATCH)
                    .map(|i| json!({"type": ty, "subject": format!("o-{}", b * BATCH + i), "data": {"n": i}}))
                    .collect();
                let r = client
                    .post(&url)
                    .json(&Value::Array(events))
                    .send()
                    .await
                    .expect("publish");
                assert_eq!(r.status().as_u16(), 201, "{:?}", r.text().await);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("publisher task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_events_are_counted_not_logged() {
    let db_url = fresh_database().await;
    let m = Manifests::new(&db_url);
    // A stream with no subscription: every event comes back from RabbitMQ.
    m.write(
        "quiet.yaml",
        &stream_yaml("quiet", &unique("weir.test.quiet."), ""),
    );
    // A stream whose only subscription's bindings take another type.
    m.write(
        "picky.yaml",
        &stream_yaml("picky", &unique("weir.test.picky."), ""),
    );
    let sink = format!("http://127.0.0.1:{}/", free_port());
    m.write(
        "sub.yaml",
        &format!(
            "apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: shipped-only, namespace: test}}\n\
             spec:\n  stream: picky\n  sink: {{uri: \"{sink}\"}}\n  filters:\n    - exact: {{type: order.shipped}}\n"
        ),
    );
    // The level a developer or a cluster would run at; not the quieter one tests default to.
    let mut w = Weir::start_with(m.path(), &[("RUST_LOG", "info")]);
    w.wait_ready("test", "quiet").await;
    w.wait_ready("test", "picky").await;
    w.wait_ready("test", "shipped-only").await;

    let started = Instant::now();
    tokio::join!(
        publish_all(w.events_url("test", "quiet"), "order.created"),
        publish_all(w.events_url("test", "picky"), "order.created"),
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let metrics = w.metrics().await;
        let quiet = relayed(&metrics, "quiet", "unroutable");
        let picky = relayed(&metrics, "picky", "unroutable");
        if quiet >= EVENTS as u64 && picky >= EVENTS as u64 {
            assert_eq!(relayed(&metrics, "quiet", "routed"), 0);
            assert_eq!(relayed(&metrics, "picky", "routed"), 0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "relayed as unroutable: quiet {quiet}, picky {picky} of {EVENTS} each; log:\n{}",
            w.log_text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let size = std::fs::metadata(&w.log).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "{} events relayed unroutable in {:?}; log {size} bytes",
        2 * EVENTS,
        started.elapsed()
    );
    let text = w.log_text();
    assert!(
        size < MAX_LOG_BYTES,
        "the log grew to {size} bytes (limit {MAX_LOG_BYTES}):\n{}",
        &text[..text.len().min(4000)]
    );
    assert!(
        !text.contains("returned us a message"),
        "lapin's per-message WARN is filtered"
    );
}
