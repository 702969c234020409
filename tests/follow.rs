//! Live follow over Server-Sent Events (`?follow=true`), against the real PostgreSQL and
//! RabbitMQ: history then live events, a cut connection resumed with `Last-Event-ID` without
//! gap or repeat, a stalled follower cut off without memory growth, the follower cap, archived
//! events served, and `weir tail` following live through a dropped connection.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const NS: &str = "test";
const STREAM: &str = "orders";

fn event(i: usize, data_bytes: usize) -> Value {
    json!({
        "specversion": "1.0",
        "id": format!("ev-{i}"),
        "source": "/follow-test",
        "type": "order.created",
        "subject": format!("order-{}", i % 3),
        "data": {"i": i, "pad": "x".repeat(data_bytes)},
    })
}

async fn publish(w: &Weir, range: std::ops::Range<usize>, data_bytes: usize) {
    let c = http();
    let all: Vec<Value> = range.map(|i| event(i, data_bytes)).collect();
    let per_request = (1_000_000 / (data_bytes + 200)).clamp(1, 500);
    for chunk in all.chunks(per_request) {
        let r = c
            .post(w.events_url(NS, STREAM))
            .header("content-type", "application/cloudevents-batch+json")
            .body(serde_json::to_string(chunk).unwrap())
            .send()
            .await
            .unwrap();
        let status = r.status();
        assert!(status.is_success(), "{status}: {}", r.text().await.unwrap());
    }
}

/// One parsed SSE message.
#[derive(Debug, Default, Clone)]
struct Msg {
    event: String,
    id: Option<i64>,
    data: String,
}

/// A follow response being read: messages, and the comments seen.
struct Follow {
    resp: reqwest::Response,
    buf: Vec<u8>,
    comments: usize,
}

impl Follow {
    async fn open(url: &str, last_event_id: Option<i64>) -> Follow {
        let mut rb = http().get(url);
        if let Some(id) = last_event_id {
            rb = rb.header("last-event-id", id.to_string());
        }
        let resp = rb.send().await.unwrap();
        assert_eq!(resp.status(), 200, "{url}");
        assert_eq!(
            resp.headers()["content-type"],
            "text/event-stream",
            "{:?}",
            resp.headers()
        );
        Follow {
            resp,
            buf: vec![],
            comments: 0,
        }
    }

    /// The next message, or `None` when the stream ended; fails after `secs`.
    async fn next(&mut self, secs: u64) -> Option<Msg> {
        tokio::time::timeout(Duration::from_secs(secs), async {
            loop {
                if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                    let raw: Vec<u8> = self.buf.drain(..end + 2).collect();
                    let text = String::from_utf8(raw).unwrap();
                    let mut m = Msg::default();
                    let mut data = vec![];
                    let mut any = false;
                    for line in text.lines().filter(|l| !l.is_empty()) {
                        if line.starts_with(':') {
                            self.comments += 1;
                            continue;
                        }
                        any = true;
                        let (f, v) = line.split_once(": ").unwrap_or((line, ""));
                        match f {
                            "id" => m.id = Some(v.parse().unwrap()),
                            "event" => m.event = v.to_string(),
                            "data" => data.push(v.to_string()),
                            other => panic!("unexpected field {other:?} in {text:?}"),
                        }
                    }
                    if !any {
                        continue;
                    }
                    m.data = data.join("\n");
                    return Some(m);
                }
                match self.resp.chunk().await {
                    Ok(Some(c)) => self.buf.extend_from_slice(&c),
                    Ok(None) | Err(_) => return None,
                }
            }
        })
        .await
        .expect("a follow message in time")
    }
}

fn follow_url(w: &Weir, from: i64) -> String {
    format!("{}?from={from}&follow=true", w.events_url(NS, STREAM))
}

/// Checks that an event message is the stored event at its id.
fn check_event(m: &Msg) -> i64 {
    assert_eq!(m.event, "", "{m:?}");
    let id = m.id.expect("an id");
    let ev: Value = serde_json::from_str(&m.data).unwrap();
    assert_eq!(ev["weirposition"], id.to_string(), "{ev}");
    // Positions start at 1, events are numbered from 0, and are published in order.
    assert_eq!(ev["id"], format!("ev-{}", id - 1), "{ev}");
    id
}

fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

async fn worker(args: &[&str], extra_manifests: &[(&str, String)]) -> (Manifests, Weir) {
    let db = fresh_database().await;
    let m = Manifests::new(&db);
    m.write(
        "orders.yaml",
        &stream_yaml(STREAM, &unique("weir.test.follow."), ""),
    );
    for (file, text) in extra_manifests {
        m.write(file, text);
    }
    let mut w = Weir::start_with_args(m.path(), args);
    w.wait_readable(NS, STREAM).await;
    (m, w)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_gets_history_then_live_events_and_resumes_without_gap_or_repeat() {
    let notify = broker_only_yaml("notices", &unique("weir.test.follow.bo."));
    let (_m, mut w) = worker(&["--follow-heartbeat", "1s"], &[("notices.yaml", notify)]).await;
    publish(&w, 0..50, 10).await;

    let mut seen: BTreeMap<i64, usize> = BTreeMap::new();
    let mut f = Follow::open(&follow_url(&w, 1), None).await;
    // History: positions 1..=50.
    for want in 1..=50 {
        let m = f.next(30).await.expect("history");
        assert_eq!(check_event(&m), want);
        *seen.entry(want).or_default() += 1;
    }
    // Live events, published while the follower waits: a publisher keeps going in the
    // background, across the cut below.
    let publisher = {
        let w_url = w.url.clone();
        tokio::spawn(async move {
            let c = http();
            for i in 50..200 {
                let r = c
                    .post(format!(
                        "{w_url}/v1/namespaces/{NS}/streams/{STREAM}/events"
                    ))
                    .header("content-type", "application/cloudevents+json")
                    .body(event(i, 10).to_string())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
                if i % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
    };
    let mut last = 50;
    while last < 100 {
        let m = f.next(30).await.expect("live events");
        last = check_event(&m);
        *seen.entry(last).or_default() += 1;
    }
    // The connection is killed mid-stream; the client reconnects with Last-Event-ID.
    drop(f);
    let mut f = Follow::open(&follow_url(&w, 1), Some(last)).await;
    while last < 200 {
        let m = f.next(30).await.expect("events after the reconnect");
        let id = check_event(&m);
        assert_eq!(id, last + 1, "no gap, no repeat after Last-Event-ID {last}");
        last = id;
        *seen.entry(id).or_default() += 1;
    }
    publisher.await.unwrap();
    assert_eq!(seen.len(), 200);
    assert!(seen.iter().all(|(_, n)| *n == 1), "every id exactly once");
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (1..=200).collect::<Vec<_>>()
    );
    // Idle now: keep-alive comments come (every second here).
    let before = f.comments;
    let idle = tokio::time::timeout(Duration::from_millis(2500), f.next(5)).await;
    assert!(idle.is_err(), "no event while idle: {idle:?}");
    assert!(f.comments > before, "keep-alive comments while idle");
    assert_eq!(
        metric(
            &w.metrics().await,
            "weir_followers{namespace=\"test\",stream=\"orders\"}"
        ),
        Some(1.0)
    );
    drop(f);

    // The subject variant: order-1's events (positions 2, 5, 8, ...), resumed the same way.
    let subject_url = format!(
        "{}/v1/namespaces/{NS}/streams/{STREAM}/subjects/order-1/events?follow=true",
        w.url
    );
    let mut f = Follow::open(&subject_url, None).await;
    let first: Vec<i64> = futures_take(&mut f, 3).await;
    assert_eq!(first, vec![2, 5, 8]);
    drop(f);
    let mut f = Follow::open(&subject_url, Some(8)).await;
    assert_eq!(futures_take(&mut f, 2).await, vec![11, 14]);
    // The rest of order-1's history: positions 17..=200, every third.
    let ids = futures_take(&mut f, 1000).await;
    assert_eq!(ids, (17..=200).step_by(3).collect::<Vec<_>>());
    // Live on the subject: of events 200..203, only i = 202 (position 203) is order-1's.
    publish(&w, 200..203, 10).await;
    let m = f.next(30).await.unwrap();
    assert_eq!(check_event(&m), 203);
    // A position of another subject is no place to resume a subject.
    let r = http()
        .get(&subject_url)
        .header("last-event-id", "3")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Follow is a read: what normal reads refuse, a follow refuses alike.
    let r = http_get(format!(
        "{}/v1/namespaces/{NS}/streams/notices/events?follow=true",
        w.url
    ))
    .await
    .unwrap();
    assert_eq!(
        r.status(),
        404,
        "a broker-only stream keeps no events to follow"
    );
    let problem: Value = r.json().await.unwrap();
    assert!(
        problem["detail"].as_str().unwrap().contains("no store"),
        "{problem}"
    );
    let r = http_get(format!("{}&limit=5", follow_url(&w, 1)))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http_get(format!("{}?follow=yes", w.events_url(NS, STREAM)))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // A stopping worker ends its follows with a last message, and still exits cleanly.
    let mut f = Follow::open(&follow_url(&w, 200), None).await;
    assert_eq!(futures_take(&mut f, 10).await, vec![200, 201, 202, 203]);
    let term = std::process::Command::new("kill")
        .args(["-TERM", &w.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let m = f.next(30).await.expect("a last message");
    assert_eq!(m.event, "error", "{m:?}");
    let problem: Value = serde_json::from_str(&m.data).unwrap();
    assert_eq!(problem["lastEventId"], 203, "{problem}");
    assert!(f.next(30).await.is_none(), "the follow ends");
    assert!(w.terminate().success());
}

/// The ids of the next `n` event messages, or of those that come until the stream goes quiet
/// for a second (for `n` larger than what is there).
async fn futures_take(f: &mut Follow, n: usize) -> Vec<i64> {
    let mut out = vec![];
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(1), f.next(30)).await {
            Ok(Some(m)) => out.push(m.id.expect("an id")),
            Ok(None) => panic!("the follow ended"),
            Err(_) => break,
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_follower_is_cut_off_and_the_worker_does_not_grow() {
    let (_m, w) = worker(
        &["--follow-buffer", "64KiB", "--follow-stall-timeout", "3s"],
        &[],
    )
    .await;
    // 48 MiB of history: a follower that held what it could not send would hold all of it.
    const N: usize = 6000;
    const DATA: usize = 8 * 1024;
    publish(&w, 0..N, DATA).await;
    let pid = w.child.id();
    // A follower that reads to the end once, so that what any follow allocates (pools,
    // buffers) is allocated before the baseline.
    let mut f = Follow::open(&follow_url(&w, (N - 300) as i64), None).await;
    assert_eq!(futures_take(&mut f, 300).await.len(), 300);
    drop(f);
    let before = rss_kib(pid);

    // A client that sends its request and never reads.
    let addr: std::net::SocketAddr = w.url.trim_start_matches("http://").parse().unwrap();
    let mut conn = stalled_client(addr).await;
    let stalled = "weir_follow_ends_total{namespace=\"test\",reason=\"stalled\",stream=\"orders\"}";
    eventually(
        60,
        "the stalled follower to be disconnected",
        || w.log_text(),
        || async { (metric(&w.metrics().await, stalled) == Some(1.0)).then_some(()) },
    )
    .await;
    let after = rss_kib(pid);
    let followers = "weir_followers{namespace=\"test\",stream=\"orders\"}";
    assert_eq!(metric(&w.metrics().await, followers), Some(0.0));
    println!("worker RSS: {before} KiB before the stalled follower, {after} KiB after its cut");
    // Generous: allocator noise and a page of events in flight, far below the 48 MiB the
    // follower would have held.
    assert!(
        after < before + 16 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    // The connection is closed: what the kernel buffered comes, then the end, well short of
    // the whole history.
    let mut got = 0usize;
    let mut chunk = vec![0u8; 64 * 1024];
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    })
    .await
    .expect("the server closes the stalled follower's connection");
    println!("the stalled follower received {got} bytes before the close");
    assert!(
        got < N * DATA / 2,
        "{got} bytes: the follower was not cut off"
    );

    // A slow client, one that pauses longer than the stall timeout but reads again within
    // the grace after its cut, reads what was sent and then the last message: reconnect.
    let mut conn = stalled_client(addr).await;
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let mut all = vec![];
    tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut all))
        .await
        .expect("the follow ends")
        .unwrap();
    let text = String::from_utf8_lossy(&all);
    let at = text
        .rfind("event: error\ndata: ")
        .unwrap_or_else(|| panic!("no last message in {} bytes", all.len()));
    let data = &text[at + "event: error\ndata: ".len()..];
    let problem: Value = serde_json::from_str(&data[..data.find("\n\n").unwrap()]).unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("Last-Event-ID"),
        "{problem}"
    );
    let last = problem["lastEventId"].as_i64().unwrap();
    assert!(last >= 1, "{problem}");
    // It was sent up to that id, and nothing after it.
    assert!(text.contains(&format!("id: {last}\n")));
    assert!(!text.contains(&format!("id: {}\n", last + 1)));
}

/// A client that sends a follow request from 1 and reads nothing, with a small receive
/// window.
async fn stalled_client(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut conn = socket.connect(addr).await.unwrap();
    conn.write_all(
        format!(
            "GET /v1/namespaces/{NS}/streams/{STREAM}/events?from=1&follow=true HTTP/1.1\r\n\
             host: {addr}\r\naccept: text/event-stream\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_over_the_cap_get_503() {
    let (_m, w) = worker(&["--max-followers", "2"], &[]).await;
    publish(&w, 0..3, 10).await;
    let mut a = Follow::open(&follow_url(&w, 1), None).await;
    let mut b = Follow::open(&follow_url(&w, 1), None).await;
    assert_eq!(check_event(&a.next(30).await.unwrap()), 1);
    assert_eq!(check_event(&b.next(30).await.unwrap()), 1);
    let r = http_get(follow_url(&w, 1)).await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
    let problem: Value = r.json().await.unwrap();
    assert!(
        problem["detail"].as_str().unwrap().contains("followers"),
        "{problem}"
    );
    // Normal reads are not followers.
    let r = http_get(format!("{}?from=1", w.events_url(NS, STREAM)))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A follower leaving frees its place.
    drop(a);
    let resp = eventually(
        30,
        "a follower's place to free",
        || w.log_text(),
        || async {
            let r = http_get(follow_url(&w, 1)).await.ok()?;
            (r.status() == 200).then_some(r)
        },
    )
    .await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut c = Follow {
        resp,
        buf: vec![],
        comments: 0,
    };
    assert_eq!(check_event(&c.next(30).await.unwrap()), 1);
    assert_eq!(check_event(&b.next(30).await.unwrap()), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn archived_events_are_served_to_a_follower_from_1() {
    let vol = tempfile::tempdir().unwrap();
    let (m, w) = worker(&[], &[]).await;
    publish(&w, 0..300, 100).await;
    let db = sqlx::PgPool::connect(&db_url(&m)).await.unwrap();
    m.write(
        "archive.yaml",
        &format!(
            "apiVersion: weir.dev/v1alpha1\nkind: ArchivePolicy\nmetadata: {{name: old-orders, namespace: test}}\nspec:\n  \
             streamNames: [orders]\n  archiveAfter: 1s\n  schedule: 1s\n  \
             segment: {{maxEvents: 100}}\n  \
             destination: {{volume: {{path: {}}}}}\n",
            vol.path().display()
        ),
    );
    eventually(
        60,
        "every event archived",
        || w.log_text(),
        || async {
            let hot: i64 = sqlx::query_scalar("SELECT count(*) FROM weir_events")
                .fetch_one(&db)
                .await
                .ok()?;
            let archived: i64 = sqlx::query_scalar(
                "SELECT coalesce(sum(event_count), 0)::bigint FROM weir_archive_segments",
            )
            .fetch_one(&db)
            .await
            .ok()?;
            (hot == 0 && archived == 300).then_some(())
        },
    )
    .await;
    let mut f = Follow::open(&follow_url(&w, 1), None).await;
    for want in 1..=300 {
        assert_eq!(check_event(&f.next(30).await.unwrap()), want);
    }
    // And live after the archive.
    publish(&w, 300..301, 100).await;
    assert_eq!(check_event(&f.next(30).await.unwrap()), 301);
    // Resuming inside the archive.
    drop(f);
    let mut f = Follow::open(&follow_url(&w, 1), Some(150)).await;
    assert_eq!(check_event(&f.next(30).await.unwrap()), 151);
}

/// The database URL written in the manifests' Secret.
fn db_url(m: &Manifests) -> String {
    let secrets = std::fs::read_to_string(m.path().join("secrets.yaml")).unwrap();
    let start = secrets.rfind("url: \"").unwrap() + 6;
    let end = start + secrets[start..].find('"').unwrap();
    secrets[start..end].to_string()
}

/// A TCP proxy to `target` whose connections the test can cut.
struct Proxy {
    addr: std::net::SocketAddr,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    async fn start(target: std::net::SocketAddr) -> Proxy {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = std::sync::Arc::new(std::sync::Mutex::new(vec![]));
        let list = conns.clone();
        tokio::spawn(async move {
            while let Ok((mut down, _)) = l.accept().await {
                let task = tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                list.lock().unwrap().push(task.abort_handle());
            }
        });
        Proxy { addr, conns }
    }

    fn cut(&self) -> usize {
        let conns = std::mem::take(&mut *self.conns.lock().unwrap());
        for c in &conns {
            c.abort();
        }
        conns.len()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn weir_tail_follows_live_across_a_dropped_connection() {
    use tokio::io::AsyncBufReadExt as _;
    let (_m, w) = worker(&[], &[]).await;
    publish(&w, 0..5, 10).await;
    let proxy = Proxy::start(w.url.trim_start_matches("http://").parse().unwrap()).await;
    let mut tail = tokio::process::Command::new(weir_binary())
        .args(["tail", "test/orders", "--from", "2", "-o", "json", "--url"])
        .arg(format!("http://{}", proxy.addr))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(tail.stdout.take().unwrap()).lines();
    let mut positions = vec![];
    let mut read = async |n: usize, positions: &mut Vec<i64>| {
        for _ in 0..n {
            let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .expect("a line from weir tail in time")
                .unwrap()
                .expect("weir tail still running");
            let ev: Value = serde_json::from_str(&line).unwrap();
            positions.push(ev["weirposition"].as_str().unwrap().parse::<i64>().unwrap());
        }
    };
    read(4, &mut positions).await;
    publish(&w, 5..8, 10).await;
    read(3, &mut positions).await;
    // The connection drops; events stored meanwhile come after the reconnect.
    assert!(proxy.cut() >= 1);
    publish(&w, 8..12, 10).await;
    read(4, &mut positions).await;
    assert_eq!(positions, (2..=12).collect::<Vec<_>>());
    tail.kill().await.unwrap();
}
