//! Read caches (CachePolicy) with two real `weir` processes on one database: an append
//! invalidates the subject's cached reads at once on the replica that answered it and within
//! one second on the other; a policy edit replaces the cache live.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn policy_yaml(name: &str, stream: &str, strategy: &str, max_items: u32) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: CachePolicy\nmetadata: {{name: {name}, namespace: test}}\n\
         spec: {{streamNames: [{stream}], strategy: {strategy}, maxItems: {max_items}, ttl: 300s}}\n"
    )
}

async fn publish(c: &reqwest::Client, url: &str, subject: &str, id: &str) {
    let r = c
        .post(url)
        .json(&json!({"type": "t", "id": id, "subject": subject, "data": {"n": id}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
}

/// The ids of the events in `v` (an array of events) in order.
fn ids(v: &Value) -> Vec<String> {
    let events = v
        .as_array()
        .unwrap_or_else(|| panic!("not a list of events: {v}"));
    events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

/// GETs `path` of the worker's read API, expecting a 200 with JSON.
async fn read_json(c: &reqwest::Client, w: &Weir, path: &str) -> Value {
    let r = c.get(format!("{}{path}", w.url)).send().await.unwrap();
    assert_eq!(r.status(), 200, "GET {path}");
    r.json().await.unwrap()
}

async fn subject_ids(c: &reqwest::Client, w: &Weir, stream: &str, subject: &str) -> Vec<String> {
    let path = format!("/v1/namespaces/test/streams/{stream}/subjects/{subject}/events");
    ids(&read_json(c, w, &path).await)
}

/// The value of one sample line of a `/metrics` scrape, 0 if absent.
fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn hits(text: &str, policy: &str) -> f64 {
    sample(
        text,
        &format!(r#"weir_cache_requests_total{{namespace="test",policy="{policy}",result="hit"}}"#),
    )
}

/// Reads a subject until this replica's cache answers (its invalidation listener is live).
async fn until_cached(c: &reqwest::Client, w: &Weir, stream: &str, subject: &str, policy: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let before = hits(&w.metrics().await, policy);
        subject_ids(c, w, stream, subject).await;
        subject_ids(c, w, stream, subject).await;
        if hits(&w.metrics().await, policy) > before {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the cache never answered; log:\n{}",
            w.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_append_invalidates_the_subject_on_both_replicas() {
    let db = fresh_database().await;
    let m = Manifests::new(&db);
    m.write(
        "stream.yaml",
        &stream_yaml("orders", &unique("weir.test.cache."), ""),
    );
    m.write("cache.yaml", &policy_yaml("reads", "orders", "LRU", 1000));
    let (a, b) = two_readable_workers(m.path(), "test", &["orders"]).await;
    let c = common::http();
    let (url_a, url_b) = (
        a.events_url("test", "orders"),
        b.events_url("test", "orders"),
    );

    publish(&c, &url_a, "order-1", "e0").await;
    until_cached(&c, &a, "orders", "order-1", "reads").await;
    until_cached(&c, &b, "orders", "order-1", "reads").await;

    let mut expected = vec!["e0".to_string()];
    let mut worst = Duration::ZERO;
    for i in 1..=10 {
        // Alternate which replica takes the append.
        let (writer, other, url) = if i % 2 == 1 {
            (&a, &b, &url_a)
        } else {
            (&b, &a, &url_b)
        };
        // Both replicas hold the subject cached before the append.
        assert_eq!(subject_ids(&c, writer, "orders", "order-1").await, expected);
        assert_eq!(subject_ids(&c, other, "orders", "order-1").await, expected);
        let id = format!("e{i}");
        publish(&c, url, "order-1", &id).await;
        expected.push(id);
        let answered = Instant::now();
        // The replica that answered: immediately, on the first read.
        assert_eq!(
            subject_ids(&c, writer, "orders", "order-1").await,
            expected,
            "read after the 2xx on the same replica"
        );
        // The other: within one second.
        loop {
            if subject_ids(&c, other, "orders", "order-1").await == expected {
                break;
            }
            assert!(
                answered.elapsed() < Duration::from_secs(1),
                "the other replica still serves a stale subject after 1 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        worst = worst.max(answered.elapsed());
    }
    eprintln!("slowest cross-replica invalidation: {worst:?}");

    // Time travel is answered from the cached subject, filtered in memory.
    let v: Value = c
        .get(format!(
            "{}/v1/namespaces/test/streams/orders/subjects/order-1/events?version=3",
            b.url
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].clone())
        .collect();
    assert_eq!(ids, [json!("e0"), json!("e1"), json!("e2")]);

    // Status shows the hit ratio sampled on the replica asked.
    let status: Value = c
        .get(format!("{}/v1/status", b.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let policy = status["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "CachePolicy")
        .unwrap()
        .clone();
    let ratio: f64 = policy["fields"]["hitRatio"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(ratio > 0.0 && ratio < 1.0, "{policy}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_pages_and_events_are_cached_a_policy_edit_resizes_live() {
    let db = fresh_database().await;
    let m = Manifests::new(&db);
    m.write(
        "stream.yaml",
        &stream_yaml("pages", &unique("weir.test.cache."), ""),
    );
    m.write(
        "cache.yaml",
        &policy_yaml("pages-cache", "pages", "FIFO", 100),
    );
    let mut w = Weir::start(m.path());
    w.wait_readable("test", "pages").await;
    let c = common::http();
    let url = w.events_url("test", "pages");
    for i in 0..5 {
        publish(&c, &url, &format!("s{i}"), &format!("p{i}")).await;
    }
    until_cached(&c, &w, "pages", "s0", "pages-cache").await;
    let entries = |text: &str| {
        sample(
            text,
            r#"weir_cache_entries{namespace="test",policy="pages-cache"}"#,
        )
    };

    // A short page (3 asked, 2 left) is not cached: it must show the next append.
    let page = |from: u32, limit: u32| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            let v: Value = c
                .get(format!("{url}?from={from}&limit={limit}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v.as_array()
                .unwrap()
                .iter()
                .map(|e| e["id"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(page(4, 3).await, ["p3", "p4"]);
    publish(&c, &url, "s5", "p5").await;
    assert_eq!(page(4, 3).await, ["p3", "p4", "p5"]);
    // A full page is cached (and stays right: positions never change).
    let before = hits(&w.metrics().await, "pages-cache");
    assert_eq!(page(1, 2).await, ["p0", "p1"]);
    assert_eq!(page(1, 2).await, ["p0", "p1"]);
    for p in 1..=3 {
        let r = c.get(format!("{url}/{p}")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let r = c.get(format!("{url}/{p}")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let text = w.metrics().await;
    assert!(hits(&text, "pages-cache") >= before + 4.0, "{text}");
    assert!(entries(&text) >= 5.0, "{text}");

    // The policy shrinks to one entry with another strategy: the cache is replaced live.
    m.write("cache.yaml", &policy_yaml("pages-cache", "pages", "LFU", 1));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = w.metrics().await;
        if entries(&text) <= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cache was not replaced: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for p in 1..=4 {
        let r = c.get(format!("{url}/{p}")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        entries(&w.metrics().await),
        1.0,
        "maxItems 1 holds after the edit"
    );

    // Removing the policy stops caching and drops its series.
    m.remove("cache.yaml");
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.metrics().await.contains(r#"policy="pages-cache""#) {
        assert!(Instant::now() < deadline, "the policy's series remain");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn trace_ids(c: &reqwest::Client, w: &Weir, id: &str) -> Vec<String> {
    let path = format!("/v1/namespaces/test/correlations/{id}/events");
    ids(&read_json(c, w, &path).await["events"])
}

/// Traces span a namespace's streams: cached while a policy covers each of them, and dropped
/// by an append carrying their correlation id to any of them — at once on the replica that
/// answered it, within a second on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trace_is_cached_and_an_append_to_any_stream_invalidates_it() {
    let db = fresh_database().await;
    let m = Manifests::new(&db);
    m.write(
        "orders.yaml",
        &stream_yaml("orders", &unique("weir.test.cache."), ""),
    );
    m.write(
        "payments.yaml",
        &stream_yaml("payments", &unique("weir.test.cache."), ""),
    );
    m.write("cache.yaml", &policy_yaml("reads", "orders", "LRU", 1000));
    m.write(
        "cache2.yaml",
        &policy_yaml("pay-reads", "payments", "LFU", 1000),
    );
    let (a, b) = two_readable_workers(m.path(), "test", &["orders", "payments"]).await;
    let c = common::http();
    let send = |w: &Weir, stream: &str, id: &str| {
        let (c, url) = (c.clone(), w.events_url("test", stream));
        let id = id.to_string();
        async move {
            let r = c
                .post(&url)
                .header("content-type", "application/cloudevents+json")
                .body(
                    json!({"specversion": "1.0", "type": "t", "source": "/trace", "id": id,
                           "correlationid": "saga-1", "data": {}})
                    .to_string(),
                )
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
        }
    };
    send(&a, "orders", "o1").await;
    // The trace is cached on both replicas (traces live in the first stream's cache, "orders").
    for w in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let before = hits(&w.metrics().await, "reads");
            assert_eq!(trace_ids(&c, w, "saga-1").await, ["o1"]);
            assert_eq!(trace_ids(&c, w, "saga-1").await, ["o1"]);
            if hits(&w.metrics().await, "reads") > before {
                break;
            }
            assert!(Instant::now() < deadline, "the trace was never cached");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // An append to the other stream, on A: A sees it at once, B within a second.
    send(&a, "payments", "p1").await;
    assert_eq!(trace_ids(&c, &a, "saga-1").await, ["o1", "p1"]);
    let started = Instant::now();
    loop {
        if trace_ids(&c, &b, "saga-1").await == ["o1", "p1"] {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "replica B served a stale trace for over a second"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And the other way round.
    send(&b, "orders", "o2").await;
    assert_eq!(trace_ids(&c, &b, "saga-1").await, ["o1", "p1", "o2"]);
    let started = Instant::now();
    while trace_ids(&c, &a, "saga-1").await != ["o1", "p1", "o2"] {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "replica A served a stale trace for over a second"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
