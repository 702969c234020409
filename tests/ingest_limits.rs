//! Ingest limits against a real `weir run` with RabbitMQ and PostgreSQL: `spec.ingest.rateLimit`
//! (429 + Retry-After, nothing stored, the rejected metric, a re-applied limit), and slow
//! clients (header trickles and slow bodies neither block a normal publish nor grow memory
//! without bound, slow bodies are cut with nothing stored, SIGTERM still exits), and the
//! connection cap.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

fn event(id: &str) -> Value {
    json!({
        "specversion": "1.0", "id": id, "source": "/limits", "type": "t",
        "datacontenttype": "application/json", "data": {"n": id},
    })
}

async fn publish(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
    batch: bool,
) -> reqwest::Response {
    let ct = if batch {
        "application/cloudevents-batch+json"
    } else {
        "application/cloudevents+json"
    };
    client
        .post(url)
        .header("content-type", ct)
        .body(body.to_string())
        .send()
        .await
        .expect("publish")
}

/// The ids stored in the stream, in order.
async fn stored_ids(url: &str) -> Vec<String> {
    let page: Value = common::http_get(format!("{url}?from=1&limit=1000&consistency=strong"))
        .await
        .expect("read")
        .json()
        .await
        .expect("a batch");
    page.as_array()
        .expect("an array")
        .iter()
        .map(|e| e["id"].as_str().expect("an id").to_string())
        .collect()
}

/// The value of one sample in a scrape, 0 when absent.
fn sample(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_event_over_the_rate_limit_gets_429_with_retry_after_and_is_not_stored() {
    let db = fresh_database().await;
    let m = Manifests::new(&db);
    let ex = unique("weir.test.rl.");
    let limited = |rate: u32| {
        stream_yaml(
            "rl",
            &ex,
            &format!("  ingest:\n    rateLimit: {{eventsPerSecond: {rate}, burst: {rate}}}\n"),
        )
    };
    m.write("rl.yaml", &limited(5));
    let mut w = Weir::start(m.path());
    w.wait_readable("test", "rl").await;
    let url = w.events_url("test", "rl");
    let client = common::http();

    // Six single-event publishes at once: the bucket holds five, and the sixth is checked
    // long before 200 ms (one token's refill) have passed.
    let sends = (0..6).map(|i| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let r = publish(&client, &url, &event(&format!("e{i}")), false).await;
            let status = r.status().as_u16();
            let retry_after = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let ct = r
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string());
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (format!("e{i}"), status, retry_after, ct, body)
        }
    });
    let answers = futures::future::join_all(sends).await;
    let accepted: Vec<_> = answers.iter().filter(|a| a.1 == 201).collect();
    let limited_answers: Vec<_> = answers.iter().filter(|a| a.1 == 429).collect();
    assert_eq!(
        (accepted.len(), limited_answers.len()),
        (5, 1),
        "five 201 and one 429: {answers:?}"
    );
    let (rejected_id, _, retry_after, ct, body) = limited_answers[0].clone();
    assert_eq!(
        retry_after.as_deref(),
        Some("1"),
        "Retry-After: one token is 200 ms away"
    );
    assert_eq!(ct.as_deref(), Some("application/problem+json"));
    assert_eq!(
        body["type"], "https://weir.dev/problems/rate-limited",
        "{body}"
    );
    assert_eq!(body["status"], 429);

    // Nothing of the refused event was stored.
    let ids = stored_ids(&url).await;
    assert_eq!(ids.len(), 5, "{ids:?}");
    assert!(!ids.contains(&rejected_id), "{ids:?}");
    let metrics = w.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            r#"weir_ingest_rejected_total{namespace="test",reason="rate_limited",stream="rl"}"#
        ),
        1.0,
        "{metrics}"
    );

    // After waiting as told, the same event is admitted.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = publish(&client, &url, &event(&rejected_id), false).await;
    assert_eq!(r.status(), 201);
    assert_eq!(stored_ids(&url).await.len(), 6);

    // A batch larger than the burst can never pass: 413 at once, not a 429 to retry.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let six: Vec<Value> = (10..16).map(|i| event(&format!("b{i}"))).collect();
    let r = publish(&client, &url, &json!(six), true).await;
    assert_eq!(r.status(), 413);
    assert!(r.headers().get("retry-after").is_none());
    let body: Value = r.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("burst of 5"),
        "{body}"
    );
    // A batch of the burst's size costs all of it at once.
    let five: Vec<Value> = (20..25).map(|i| event(&format!("c{i}"))).collect();
    let r = publish(&client, &url, &json!(five), true).await;
    assert_eq!(r.status(), 201);
    // Five more right after need a second of refill: refused whole, none stored.
    let again: Vec<Value> = (30..35).map(|i| event(&format!("c{i}"))).collect();
    let r = publish(&client, &url, &json!(again), true).await;
    assert_eq!(r.status(), 429);
    assert_eq!(stored_ids(&url).await.len(), 11);

    // A re-applied, larger limit takes effect: a batch of 50 passes once the worker has it.
    m.write("rl.yaml", &limited(1000));
    let fifty: Vec<Value> = (100..150).map(|i| event(&format!("d{i}"))).collect();
    let fifty = json!(fifty);
    eventually(
        30,
        "the new rate limit to admit a batch of 50",
        || w.log_text(),
        || {
            let (client, url, fifty) = (client.clone(), url.clone(), fifty.clone());
            async move { (publish(&client, &url, &fifty, true).await.status() == 201).then_some(()) }
        },
    )
    .await;
    assert_eq!(stored_ids(&url).await.len(), 61);
    w.terminate();
}

/// The worker's resident memory, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// A connection that sends a request's headers one byte a second, for ever.
async fn trickle_headers(addr: String, path: String) {
    let Ok(mut s) = TcpStream::connect(&addr).await else {
        return;
    };
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/cloudevents+json\r\n\
         x-padding: {}\r\n",
        "a".repeat(4096)
    );
    for b in head.bytes() {
        if s.write_all(&[b]).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// What became of a slow body.
#[derive(Debug, PartialEq, Eq)]
enum SlowEnd {
    /// The server answered with this status.
    Answered(u16),
    /// The server closed the connection without an answer.
    Closed,
}

/// Declares a 4 MiB event, sends its first `first` bytes at once and then 1 KiB a second
/// (the rest would take over an hour); returns how the server ended it.
async fn slow_body(addr: String, path: String, first: usize) -> SlowEnd {
    let Ok(s) = TcpStream::connect(&addr).await else {
        return SlowEnd::Closed;
    };
    let total = 4 * 1024 * 1024;
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/cloudevents+json\r\n\
         content-length: {total}\r\n\r\n"
    );
    let start = br#"{"specversion":"1.0","id":"slow","source":"/slow","type":"t","data":""#;
    let mut body = start.to_vec();
    body.resize(first, b'x');
    let (mut rd, mut wr) = s.into_split();
    // Writing and reading at once: the server may answer before it has read what was sent.
    let writer = tokio::spawn(async move {
        if wr.write_all(head.as_bytes()).await.is_err() || wr.write_all(&body).await.is_err() {
            return;
        }
        let kib = vec![b'x'; 1024];
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if wr.write_all(&kib).await.is_err() {
                return;
            }
        }
    });
    let mut buf = vec![0u8; 4096];
    let end = match rd.read(&mut buf).await {
        Ok(n) if n >= 12 && buf.starts_with(b"HTTP/1.1 ") => {
            let code = std::str::from_utf8(&buf[9..12]).unwrap_or("0");
            SlowEnd::Answered(code.parse().unwrap_or(0))
        }
        _ => SlowEnd::Closed,
    };
    writer.abort();
    end
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_clients_neither_block_a_publish_nor_store_anything_and_sigterm_still_exits() {
    let db = fresh_database().await;
    let m = Manifests::new(&db);
    m.write(
        "slow.yaml",
        &stream_yaml(
            "slow",
            &unique("weir.test.slow."),
            "  validation:\n    maxRequestBytes: 8MiB\n    maxEventBytes: 8MiB\n",
        ),
    );
    // A short body timeout keeps the test short; the header timeout stays at its default
    // (30 s), so the trickling connections are all still open at SIGTERM.
    let mut w = Weir::start_with_args(m.path(), &["--body-read-timeout", "4s"]);
    w.wait_readable("test", "slow").await;
    let url = w.events_url("test", "slow");
    let addr = w.url.trim_start_matches("http://").to_string();
    let path = "/v1/namespaces/test/streams/slow/events".to_string();
    let client = common::http();
    assert_eq!(
        publish(&client, &url, &event("warm"), false).await.status(),
        201
    );
    let pid = w.child.id();
    let rss_before = rss_bytes(pid);

    let tricklers: Vec<_> = (0..300)
        .map(|_| tokio::spawn(trickle_headers(addr.clone(), path.clone())))
        .collect();
    // Each sends all but the last 4 KiB of its 4 MiB at once, then trickles.
    let slow: Vec<_> = (0..50)
        .map(|_| tokio::spawn(slow_body(addr.clone(), path.clone(), (4 << 20) - 4096)))
        .collect();
    // Every slow client is connected and sending.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Answered while every slow client still holds its connection (the body timeout, 4 s, cuts
    // them 2.5 s from here; with 8 s the trickles completed their bodies first). Blocked would
    // mean no answer before then; 2 s leaves room for a loaded 2-core machine, where 1 s was
    // once too tight.
    let started = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        publish(&common::http(), &url, &event("normal"), false),
    )
    .await
    .expect("a normal publish answered while slow clients hold connections");
    assert_eq!(r.status(), 201, "after {:?}", started.elapsed());

    // The slow bodies are cut at the body timeout: 408 (or closed), nothing stored.
    let mut peak = rss_bytes(pid);
    let mut ends = Vec::new();
    for s in slow {
        // The body timeout is 4 s: a slow body still open after 20 s was never cut.
        let end = tokio::time::timeout(Duration::from_secs(20), s)
            .await
            .expect("the body read timeout ends a slow body")
            .expect("slow body task");
        ends.push(end);
        peak = peak.max(rss_bytes(pid));
    }
    // The first bodies take the worker's body memory (32 MiB: about eight of them) and are
    // cut at the body timeout (408); the others find it spent (503 at once).
    let answered = |code| {
        ends.iter()
            .filter(|e| **e == SlowEnd::Answered(code))
            .count()
    };
    let (answered_408, answered_503) = (answered(408), answered(503));
    assert!(
        ends.iter()
            .all(|e| matches!(e, SlowEnd::Answered(408 | 503) | SlowEnd::Closed)),
        "{ends:?}"
    );
    assert!(answered_408 > 0, "the body timeout answers 408: {ends:?}");
    assert!(
        answered_503 > 0,
        "the body memory refuses with 503: {ends:?}"
    );
    let grown = peak.saturating_sub(rss_before);
    eprintln!(
        "slow bodies: {answered_408} answered 408, {answered_503} 503, {} closed; RSS {} MB, \
         peak +{} MB",
        ends.len() - answered_408 - answered_503,
        rss_before / (1024 * 1024),
        grown / (1024 * 1024)
    );
    assert!(
        grown < 100 * 1024 * 1024,
        "RSS grew by {} MB (from {} MB)",
        grown / (1024 * 1024),
        rss_before / (1024 * 1024)
    );
    let ids = stored_ids(&url).await;
    assert_eq!(ids, ["warm", "normal"], "nothing of a cut body is stored");

    // SIGTERM with 300 connections still in their headers and fresh slow bodies in flight.
    let late: Vec<_> = (0..20)
        .map(|_| tokio::spawn(slow_body(addr.clone(), path.clone(), 256 * 1024)))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    let status = w.terminate();
    assert!(status.success(), "{status:?}\n{}", w.log_text());
    eprintln!("exited {:?} after SIGTERM", t.elapsed());
    for l in late {
        // The process has exited: every connection is closed or answered.
        let end = tokio::time::timeout(Duration::from_secs(5), l)
            .await
            .expect("a slow body outlived the process")
            .expect("late slow body");
        assert!(
            matches!(end, SlowEnd::Closed | SlowEnd::Answered(408 | 503)),
            "{end:?}"
        );
    }
    for t in tricklers {
        t.abort();
    }
    // Still nothing partial: a fresh worker reads the same two events.
    let mut w2 = Weir::start(m.path());
    w2.wait_readable("test", "slow").await;
    assert_eq!(
        stored_ids(&w2.events_url("test", "slow")).await,
        ["warm", "normal"]
    );
    w2.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_wait_until_one_closes() {
    let db = fresh_database().await;
    let m = Manifests::new(&db);
    m.write(
        "cap.yaml",
        &stream_yaml("cap", &unique("weir.test.cap."), ""),
    );
    let mut w = Weir::start_with_args(m.path(), &["--max-connections", "10"]);
    w.wait_readable("test", "cap").await;
    let url = w.events_url("test", "cap");
    let addr = w.url.trim_start_matches("http://").to_string();
    // wait_readable's connections are idle keep-alives: a fresh worker-side count needs them
    // gone, so hold the slots with connections of our own and let the reader's pool close.
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while held.len() < 10 {
        assert!(Instant::now() < deadline, "could not take the 10 slots");
        let s = TcpStream::connect(&addr).await.expect("connect");
        // A connection only counts once accepted; a request answered on it proves that.
        let mut s = s;
        let ok = tokio::time::timeout(Duration::from_millis(500), async {
            s.write_all(
                b"GET /v1/namespaces/test/streams/cap/events?limit=1 HTTP/1.1\r\nhost: x\r\n\r\n",
            )
            .await
            .ok()?;
            let mut buf = vec![0u8; 1024];
            let n = s.read(&mut buf).await.ok()?;
            (n > 0).then_some(())
        })
        .await;
        if matches!(ok, Ok(Some(()))) {
            held.push(s);
        }
    }
    // Every slot is held by an idle keep-alive connection: a publish on a new connection
    // is not accepted...
    let client = common::http();
    let pending = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move {
            publish(&client, &url, &event("waited"), false)
                .await
                .status()
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !pending.is_finished(),
        "a connection over the cap was served"
    );
    // ...until one of them closes.
    drop(held.pop());
    let status = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("served once a slot freed")
        .expect("publish task");
    assert_eq!(status, 201);
    drop(held);
    drop(client);
    assert_eq!(stored_ids(&url).await, ["waited"]);
    w.terminate();
}
