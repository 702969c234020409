//! Subject reads return one page (default 100 events, at most 1000) and a
//! `Link: <…>; rel="next"` to the next one, never the whole subject: over a subject of 2,500
//! events (real PostgreSQL), following the links yields every event once, in version order,
//! with and without a CachePolicy in front of the stream.

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::{Value, json};

/// Publishes `n` events to `subject` (ids `{subject}-{i}`, i from 1), 500 per request,
/// interleaved with one event of another subject per request.
async fn fill(c: &reqwest::Client, url: &str, subject: &str, n: usize) {
    let mut i = 1;
    while i <= n {
        let end = (i + 499).min(n);
        let mut batch: Vec<Value> = (i..=end)
            .map(|k| json!({"type": "t", "id": format!("{subject}-{k}"), "subject": subject, "data": {"k": k}}))
            .collect();
        batch.push(json!({"type": "t", "id": format!("{subject}-noise-{i}"), "subject": format!("{subject}-noise"), "data": {}}));
        let r = c.post(url).json(&batch).send().await.unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
        i = end + 1;
    }
}

/// The `next` target of a `Link` header, if any.
fn next_link(resp: &reqwest::Response) -> Option<String> {
    let link = resp.headers().get("link")?.to_str().ok()?;
    let (target, rel) = link.split_once(';')?;
    assert_eq!(rel.trim(), "rel=\"next\"", "{link}");
    Some(
        target
            .trim()
            .trim_start_matches('<')
            .trim_end_matches('>')
            .to_string(),
    )
}

/// Follows the links from `first` (a path and query); returns the page sizes and the events'
/// `(id, weirversion)` in order.
async fn walk(c: &reqwest::Client, base: &str, first: &str) -> (Vec<usize>, Vec<(String, i64)>) {
    let mut sizes = Vec::new();
    let mut events = Vec::new();
    let mut next = Some(first.to_string());
    while let Some(path) = next {
        assert!(sizes.len() < 100, "too many pages");
        let resp = c.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        next = next_link(&resp);
        let page: Vec<Value> = resp.json().await.unwrap();
        sizes.push(page.len());
        for e in page {
            let version = e["weirversion"]
                .as_i64()
                .or_else(|| e["weirversion"].as_str().and_then(|s| s.parse().ok()))
                .expect("weirversion");
            events.push((e["id"].as_str().unwrap().to_string(), version));
        }
    }
    (sizes, events)
}

fn expected(subject: &str, n: usize) -> Vec<(String, i64)> {
    (1..=n)
        .map(|k| (format!("{subject}-{k}"), k as i64))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subject_pages_hold_every_event_once_in_order() {
    let db = fresh_database().await;
    let m = Manifests::new(&db);
    m.write(
        "streams.yaml",
        &format!(
            "{}---\n{}---\n\
             apiVersion: weir.dev/v1alpha1\nkind: CachePolicy\nmetadata: {{name: reads, namespace: test}}\n\
             spec: {{streamNames: [cached], strategy: LRU, maxItems: 100, ttl: 300s}}\n",
            stream_yaml("plain", &unique("weir.test.pg."), ""),
            stream_yaml("cached", &unique("weir.test.pg."), ""),
        ),
    );
    let mut w = Weir::start(m.path());
    w.wait_readable("test", "plain").await;
    w.wait_readable("test", "cached").await;
    let c = common::http();
    for stream in ["plain", "cached"] {
        let url = w.events_url("test", stream);
        fill(&c, &url, "big", 2500).await;
        fill(&c, &url, "small", 150).await;
    }
    let path = |stream: &str, subject: &str, q: &str| {
        format!("/v1/namespaces/test/streams/{stream}/subjects/{subject}/events{q}")
    };

    for stream in ["plain", "cached"] {
        // Default page: 100.
        let (sizes, events) = walk(&c, &w.url, &path(stream, "big", "")).await;
        assert_eq!(sizes, vec![100; 25], "{stream}");
        assert_eq!(events, expected("big", 2500), "{stream}");
        let ids: BTreeSet<&String> = events.iter().map(|e| &e.0).collect();
        assert_eq!(ids.len(), 2500, "{stream}: every event once");

        // Largest page: 1000.
        let (sizes, events) = walk(&c, &w.url, &path(stream, "big", "?limit=1000")).await;
        assert_eq!(sizes, [1000, 1000, 500], "{stream}");
        assert_eq!(events, expected("big", 2500), "{stream}");

        // From the middle, up to a version: the bound ends the paging.
        let (sizes, events) = walk(
            &c,
            &w.url,
            &path(stream, "big", "?from=1201&limit=300&version=1800"),
        )
        .await;
        assert_eq!(sizes, [300, 300], "{stream}");
        assert_eq!(events, expected("big", 1800)[1200..].to_vec(), "{stream}");

        // A small subject, twice (through the cache, the second time from memory).
        for round in 0..2 {
            let (sizes, events) = walk(&c, &w.url, &path(stream, "small", "")).await;
            assert_eq!(sizes, [100, 50], "{stream} round {round}");
            assert_eq!(events, expected("small", 150), "{stream} round {round}");
        }
        // An append shows on the next read, pages included.
        let r = c
            .post(w.events_url("test", stream))
            .json(&json!({"type": "t", "id": "small-151", "subject": "small", "data": {}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let (sizes, events) = walk(&c, &w.url, &path(stream, "small", "?from=101")).await;
        assert_eq!(sizes, [51], "{stream}");
        assert_eq!(events, expected("small", 151)[100..].to_vec(), "{stream}");
        let (_, events) = walk(&c, &w.url, &path(stream, "small", "?limit=1000")).await;
        assert_eq!(events, expected("small", 151), "{stream}");

        // Out-of-range paging parameters are refused, naming the parameter.
        for (q, needle) in [
            ("?limit=1001", "limit"),
            ("?limit=0", "limit"),
            ("?from=0", "from"),
            ("?from=x", "from"),
        ] {
            let r = c
                .get(format!("{}{}", w.url, path(stream, "big", q)))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 400, "{q}");
            let body = r.text().await.unwrap();
            assert!(
                body.contains(&format!("query parameter {needle}")),
                "{q}: {body}"
            );
        }
    }
    // The cache answered the second read of the small subject.
    let metrics = w.metrics().await;
    let hit = metrics
        .lines()
        .find(|l| {
            l.starts_with(
                r#"weir_cache_requests_total{namespace="test",policy="reads",result="hit"}"#,
            )
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(hit >= 1.0, "no cache hit:\n{metrics}");
}
