//! ArchivePolicy end to end, against the real PostgreSQL and RabbitMQ: events move into
//! segments and read back exactly as before (by position, range, subject, correlation, and
//! through a subscription's catch-up); crashes at each step of the move lose and double
//! nothing; two processes write each segment once; a damaged segment is found by `verify`
//! and does not take the others down; deleteAfter removes old segments with an audit record.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::recording::RecordingSink;
use common::*;
use serde_json::{Value, json};

const NS: &str = "test";
const STREAM: &str = "orders";

fn policy_yaml(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: ArchivePolicy\nmetadata: {{name: {name}, namespace: test}}\nspec:\n  \
         streamNames: [orders]\n  archiveAfter: 1s\n  schedule: 1s\n{extra}"
    )
}

/// Event `i` of the test corpus: JSON data of varying size, a subject per 97 events, a
/// correlation id per 50, and a few text and binary payloads.
fn event(i: usize) -> Value {
    let mut e = json!({
        "specversion": "1.0",
        "id": format!("ev-{i}"),
        "source": "/archive-test",
        "type": if i.is_multiple_of(3) { "order.paid" } else { "order.created" },
        "subject": format!("order-{}", i % 97),
        "correlationid": format!("corr-{}", i % 50),
        "time": "2026-11-27T12:00:00Z",
    });
    match i % 41 {
        0 => {
            e["datacontenttype"] = json!("text/plain");
            e["data"] = json!(format!("plain text number {i}\nsecond line"));
        }
        1 => {
            e["datacontenttype"] = json!("application/octet-stream");
            e["data_base64"] = json!("AAECAwT/");
        }
        _ => {
            e["datacontenttype"] = json!("application/json");
            e["data"] = json!({
                "orderId": format!("ord-{i:07}"),
                "customer": format!("cust-{}", i % 313),
                "total": (i % 10_000) as f64 / 100.0,
                "items": (0..(i % 4 + 1)).map(|k| json!({"sku": format!("sku-{}", (i + k) % 211), "qty": k + 1})).collect::<Vec<_>>(),
                "note": "x".repeat(i % 300),
            });
        }
    }
    e
}

async fn publish(w: &Weir, events: &[Value]) {
    let (status, body) = post_batch(&w.events_url(NS, STREAM), events).await;
    assert!((200..300).contains(&status), "{status}: {body}");
}

async fn publish_range(w: &Weir, range: std::ops::Range<usize>) {
    let all: Vec<Value> = range.map(event).collect();
    for chunk in all.chunks(500) {
        publish(w, chunk).await;
    }
}

/// Every event of the stream, read in pages.
async fn read_all(w: &Weir) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    loop {
        let from = out.last().map_or(1, |e: &Value| {
            e["weirposition"]
                .as_str()
                .unwrap()
                .parse::<usize>()
                .unwrap()
                + 1
        });
        let (status, page) = get_json(&format!(
            "{}?from={from}&limit=1000",
            w.events_url(NS, STREAM)
        ))
        .await;
        assert_eq!(status, 200, "{page}");
        let page = page.as_array().cloned().unwrap_or_default();
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

async fn pg(db: &str) -> sqlx::PgPool {
    sqlx::PgPool::connect(db).await.unwrap()
}

async fn count(pool: &sqlx::PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Waits until the stream's hot table is empty and `n` events are archived.
async fn wait_archived(w: &Weir, db: &sqlx::PgPool, n: i64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let archived = count(
            db,
            "SELECT coalesce(sum(event_count), 0)::bigint FROM weir_archive_segments",
        )
        .await;
        let hot = count(db, "SELECT count(*) FROM weir_events").await;
        if archived == n && hot == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{archived} of {n} archived, {hot} hot after {within:?}; log:\n{}",
            w.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `weir archive ...` against a running process; returns (exit code, stdout).
fn cli(w: &Weir, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(weir_binary())
        .arg("--admin")
        .arg(&w.admin)
        .arg("archive")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// A fresh database, a manifest folder with the `orders` stream, and a running weir that has
/// stored events `0..n`, read back (as the hot table serves them) into `before`. Every event
/// is older than archiveAfter (1 s) when this returns, so that a policy written next cuts
/// segments by `maxEvents` alone.
struct Stored {
    pool: sqlx::PgPool,
    m: Manifests,
    w: Weir,
    before: Vec<Value>,
}

async fn stored(n: usize) -> Stored {
    let db = fresh_database().await;
    let pool = pg(&db).await;
    let m = Manifests::new(&db);
    m.write(
        "orders.yaml",
        &stream_yaml(STREAM, &unique("weir.test.ar."), ""),
    );
    let mut w = Weir::start(m.path());
    w.wait_readable(NS, STREAM).await;
    publish_range(&w, 0..n).await;
    let before = read_all(&w).await;
    assert_eq!(before.len(), n);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    Stored { pool, m, w, before }
}

/// The test policy archiving into files under `vol`, with `extra` spec lines.
fn volume_policy(vol: &Path, extra: &str) -> String {
    policy_yaml(
        "old-orders",
        &format!(
            "{extra}  destination: {{volume: {{path: {}}}}}\n",
            vol.display()
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_thousand_archived_events_read_back_exactly_as_before() {
    const N: usize = 50_000;
    // Everything as the hot table serves it.
    let Stored { pool, m, w, before } = stored(N).await;
    let subjects: Vec<String> = (0..97).step_by(7).map(|i| format!("order-{i}")).collect();
    let subject_url = |s: &str, q: &str| {
        format!(
            "{}/v1/namespaces/{NS}/streams/{STREAM}/subjects/{s}/events{q}",
            w.url
        )
    };
    // Whole subjects (about 515 events each: one page of 1000) and a page from the middle.
    let mut subjects_before = Vec::new();
    for s in &subjects {
        subjects_before.push(get_json(&subject_url(s, "?limit=1000")).await.1);
        subjects_before.push(get_json(&subject_url(s, "?version=17")).await.1);
        subjects_before.push(get_json(&subject_url(s, "?from=201&limit=100")).await.1);
    }
    let as_of = before[N / 2]["weirrecordedtime"]
        .as_str()
        .unwrap()
        .to_string();
    let as_of_q = format!("?asOf={}", urlencode(&as_of));
    let as_of_before = get_json(&subject_url("order-5", &as_of_q)).await.1;
    let trace_url = format!("{}/v1/namespaces/{NS}/correlations/corr-7/events", w.url);
    let trace_before = get_json(&trace_url).await.1;
    assert_eq!(
        trace_before["events"].as_array().map(Vec::len),
        Some(N / 50),
        "{trace_before}"
    );

    // Archive: segments of 10,000 events, in the store.
    m.write(
        "archive.yaml",
        &policy_yaml("old-orders", "  segment: {maxEvents: 10000}\n"),
    );
    wait_archived(&w, &pool, N as i64, Duration::from_secs(120)).await;
    assert_eq!(
        count(&pool, "SELECT count(*) FROM weir_archive_segments").await,
        5
    );
    assert!(count(&pool, "SELECT count(*) FROM weir_archive_dictionaries").await >= 1);

    // Range, one event, subject (all, by version, as of a time) and trace: unchanged.
    let after = read_all(&w).await;
    assert_eq!(after.len(), N);
    for (i, (a, b)) in after.iter().zip(&before).enumerate() {
        assert_eq!(a, b, "event at index {i} differs after archiving");
    }
    for p in (1..=N).step_by(997).chain([1, N]) {
        let (status, one) = get_json(&format!("{}/{p}", w.events_url(NS, STREAM))).await;
        assert_eq!(status, 200);
        assert_eq!(one, before[p - 1], "position {p}");
    }
    let mut subjects_after = Vec::new();
    for s in &subjects {
        subjects_after.push(get_json(&subject_url(s, "?limit=1000")).await.1);
        subjects_after.push(get_json(&subject_url(s, "?version=17")).await.1);
        subjects_after.push(get_json(&subject_url(s, "?from=201&limit=100")).await.1);
    }
    assert!(
        subjects_before
            .iter()
            .step_by(3)
            .all(|v| v.as_array().is_some_and(|a| a.len() > 500)),
        "whole subjects were read"
    );
    assert_eq!(subjects_after, subjects_before);
    assert_eq!(
        get_json(&subject_url("order-5", &as_of_q)).await.1,
        as_of_before
    );
    assert_eq!(get_json(&trace_url).await.1, trace_before);
    let (status, _) = get_json(&format!("{}/{}", w.events_url(NS, STREAM), N + 1)).await;
    assert_eq!(status, 404);

    // The hot store still knows versions and dedup keys of archived events.
    let c = common::http();
    let mut next = event(N);
    next["subject"] = json!("order-3");
    next["expectedversion"] = json!(
        before
            .iter()
            .filter(|e| e["subject"] == "order-3")
            .count()
            .to_string()
    );
    publish(&w, &[next]).await;
    let dup = c
        .post(w.events_url(NS, STREAM))
        .header("content-type", "application/cloudevents-batch+json")
        .body(serde_json::to_string(&[event(5)]).unwrap())
        .send()
        .await
        .unwrap();
    assert!(dup.status().is_success());
    let dup: Value = dup.json().await.unwrap();
    assert!(dup.to_string().contains("\"position\":6"), "{dup}");
    assert_eq!(read_all(&w).await.len(), N + 1);

    // Pages of a subject whose events are archived but for its newest (unless that was
    // archived too by now): each event once, in version order, across the boundary.
    let mut versions = Vec::new();
    let mut from = 1;
    loop {
        let (status, page) =
            get_json(&subject_url("order-3", &format!("?from={from}&limit=100"))).await;
        assert_eq!(status, 200);
        let page = page.as_array().unwrap().clone();
        versions.extend(page.iter().map(|e| {
            e["weirversion"]
                .as_str()
                .and_then(|v| v.parse::<i64>().ok())
                .or_else(|| e["weirversion"].as_i64())
                .unwrap()
        }));
        if page.len() < 100 {
            break;
        }
        from = versions.last().unwrap() + 1;
    }
    let order_3 = before.iter().filter(|e| e["subject"] == "order-3").count() as i64 + 1;
    assert_eq!(versions, (1..=order_3).collect::<Vec<_>>());

    // verify and status through the CLI.
    let (code, out) = cli(&w, &["verify"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 problem(s)"), "{out}");
    let (code, out) = cli(&w, &["-o", "json", "status"]);
    assert_eq!(code, 0, "{out}");
    let status: Value = serde_json::from_str(&out).unwrap();
    let s = &status["streams"][0];
    // The event appended above may be archived too by now (archiveAfter is 1 s).
    assert!(
        s["archivedEvents"].as_i64().unwrap() >= N as i64,
        "{status}"
    );
    let ratio = s["compressionRatio"].as_f64().unwrap();
    assert!(ratio > 3.0, "compression ratio {ratio}");
    let board = get_json(&format!("{}/v1/status", w.admin)).await.1;
    let ap = board["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "ArchivePolicy")
        .cloned()
        .unwrap();
    let archived: i64 = ap["fields"]["archivedEvents"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(archived >= N as i64, "{ap}");
    assert!(ap["fields"]["lastRun"].is_string(), "{ap}");
    let metrics = w.metrics().await;
    let archived: i64 = metrics
        .lines()
        .find(|l| l.starts_with("weir_archive_events_total{namespace=\"test\",stream=\"orders\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(archived >= N as i64, "{metrics}");
    assert!(metrics.contains("weir_store_payload_bytes_total{kind=\"raw\""));

    // A subscription created now replays all of it, in order, from the archive.
    let got = RecordingSink::start().await;
    let sink = &got.url;
    // A name of its own: queues outlive the process, and an existing queue means "not new".
    let sub = unique("replay-");
    m.write(
        "sub.yaml",
        &format!(
            "apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: {sub}, namespace: test}}\n\
             spec:\n  stream: orders\n  sink: {{uri: \"{sink}\"}}\n  startFrom: earliest\n  consumers: 1\n"
        ),
    );
    // And one starting from a time inside the archive starts at the first event recorded
    // then.
    let from_time = RecordingSink::start().await;
    let sink2 = &from_time.url;
    let first_at = before
        .iter()
        .position(|e| e["weirrecordedtime"].as_str().unwrap() >= as_of.as_str())
        .unwrap() as i64
        + 1;
    m.write(
        "sub2.yaml",
        &format!(
            "apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: {}, namespace: test}}\n\
             spec:\n  stream: orders\n  sink: {{uri: \"{sink2}\"}}\n  startFrom: \"{as_of}\"\n",
            unique("from-time-")
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let n = got.got().len();
        let n2 = from_time.got().len() as i64;
        if n > N && n2 >= N as i64 + 2 - first_at {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{n} of {} delivered; log:\n{}",
            N + 1,
            w.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let got: Vec<i64> = got.got().iter().map(|g| g.position).collect();
    let distinct: BTreeSet<i64> = got.iter().copied().collect();
    assert_eq!(distinct.len(), N + 1);
    assert_eq!(distinct.first(), Some(&1));
    assert_eq!(distinct.last(), Some(&(N as i64 + 1)));
    assert!(
        got.windows(2).all(|p| p[0] < p[1]),
        "delivered out of order"
    );
    let from_time: BTreeSet<i64> = from_time.got().iter().map(|g| g.position).collect();
    assert_eq!(from_time.first(), Some(&first_at));
    assert_eq!(from_time.len() as i64, N as i64 + 2 - first_at);
}

fn urlencode(s: &str) -> String {
    s.replace(':', "%3A").replace('+', "%2B")
}

fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let d = dir.join(NS).join(STREAM);
    let mut v: Vec<_> = std::fs::read_dir(&d)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Waits for a process started with a fault point to abort.
fn wait_aborted(w: &mut Weir, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(status)) = w.child.try_wait() {
            assert!(!status.success(), "weir exited cleanly instead of aborting");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "weir did not reach its fault point; log:\n{}",
            w.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_at_any_step_of_the_move_loses_and_doubles_nothing() {
    const N: usize = 6000;
    let Stored {
        pool,
        m,
        mut w,
        before,
    } = stored(N).await;
    let vol = tempfile::tempdir().unwrap();
    assert!(w.terminate().success());

    m.write(
        "archive.yaml",
        &volume_policy(vol.path(), "  segment: {maxEvents: 2000}\n"),
    );
    for point in ["after-segment-write", "before-hot-delete", "mid-delete"] {
        let mut w = Weir::start_with(m.path(), &[("WEIR_ARCHIVE_FAULT", point)]);
        wait_aborted(&mut w, Duration::from_secs(60));
        // Nothing moved: every event still hot, no segment recorded.
        assert_eq!(
            count(&pool, "SELECT count(*) FROM weir_events").await,
            N as i64,
            "{point}"
        );
        assert_eq!(
            count(&pool, "SELECT count(*) FROM weir_archive_segments").await,
            0,
            "{point}"
        );
        if point == "after-segment-write" {
            // The file was written before the crash; the next run removes it.
            assert_eq!(segment_files(vol.path()).len(), 1, "{point}");
        }
    }

    let mut w = Weir::start(m.path());
    w.wait_readable(NS, STREAM).await;
    wait_archived(&w, &pool, N as i64, Duration::from_secs(60)).await;
    let files = segment_files(vol.path());
    assert_eq!(
        files.len(),
        3,
        "one file per segment, no leftovers: {files:?}"
    );
    assert_eq!(read_all(&w).await, before);
    let (code, out) = cli(&w, &["verify", "test/orders"]);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_with_the_same_policy_write_each_segment_once() {
    const N: usize = 20_000;
    let Stored {
        pool,
        m,
        w: a,
        before,
    } = stored(N).await;
    let vol = tempfile::tempdir().unwrap();
    m.write(
        "archive.yaml",
        &volume_policy(vol.path(), "  segment: {maxEvents: 1000}\n"),
    );
    let mut b = Weir::start(m.path());
    b.wait_readable(NS, STREAM).await;
    wait_archived(&a, &pool, N as i64, Duration::from_secs(120)).await;

    // Each segment once: 20 rows, 20 files, and the two processes' archived counts add up to
    // exactly N.
    assert_eq!(
        count(&pool, "SELECT count(*) FROM weir_archive_segments").await,
        20
    );
    assert_eq!(segment_files(vol.path()).len(), 20);
    let archived_by = |metrics: &str| -> i64 {
        metrics
            .lines()
            .find(|l| l.starts_with("weir_archive_events_total{"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (ma, mb) = (a.metrics().await, b.metrics().await);
    assert_eq!(archived_by(&ma) + archived_by(&mb), N as i64, "{ma}\n{mb}");
    assert_eq!(read_all(&b).await, before);
    let (code, out) = cli(&a, &["verify"]);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_segment_fails_verify_and_the_others_stay_readable() {
    const N: usize = 5000;
    let Stored { pool, m, w, before } = stored(N).await;
    let vol = tempfile::tempdir().unwrap();
    m.write(
        "archive.yaml",
        &volume_policy(
            vol.path(),
            "  segment: {maxEvents: 1000}\n  compression: {dictionary: false}\n",
        ),
    );
    wait_archived(&w, &pool, N as i64, Duration::from_secs(60)).await;
    let files = segment_files(vol.path());
    assert_eq!(files.len(), 5);

    // Damage the second block of the third segment (positions 2001..=3000).
    let (index,): (sqlx::types::Json<Vec<Value>>,) =
        sqlx::query_as("SELECT block_index FROM weir_archive_segments WHERE first_position = 2001")
            .fetch_one(&pool)
            .await
            .unwrap();
    let block = &index.0[1];
    let offset = block["offset"].as_u64().unwrap();
    let damaged_first = block["first_position"].as_i64().unwrap();
    let mut bytes = std::fs::read(&files[2]).unwrap();
    bytes[offset as usize + 10] ^= 0x5a;
    std::fs::write(&files[2], &bytes).unwrap();

    let (code, out) = cli(&w, &["verify"]);
    assert_eq!(code, 1, "{out}");
    let name = files[2].display().to_string();
    assert!(
        out.contains(&name) && out.contains(&format!("byte {offset}")),
        "verify must name the segment and offset:\n{out}"
    );

    // The damaged block answers an error that names it; everything else reads as before.
    let (status, problem) =
        get_json(&format!("{}/{damaged_first}", w.events_url(NS, STREAM))).await;
    assert_eq!(status, 500, "{problem}");
    assert!(
        problem["detail"].as_str().unwrap_or("").contains(&name),
        "{problem}"
    );
    for p in [1usize, 1500, 2001, 3500, 5000] {
        let (status, one) = get_json(&format!("{}/{p}", w.events_url(NS, STREAM))).await;
        assert_eq!(status, 200, "position {p}: {one}");
        assert_eq!(one, before[p - 1]);
    }
    // Every block holds events of every subject (one in 97 events each): a subject's first
    // page reads the blocks it needs, not all of the subject's. The whole subject needs the
    // damaged block.
    let subject_url = |q: &str| {
        format!(
            "{}/v1/namespaces/{NS}/streams/{STREAM}/subjects/order-5/events?{q}",
            w.url
        )
    };
    let (status, page) = get_json(&subject_url("limit=5")).await;
    assert_eq!(status, 200, "{page}");
    let expected: Vec<Value> = before
        .iter()
        .filter(|e| e["subject"] == "order-5")
        .take(5)
        .cloned()
        .collect();
    assert_eq!(page, Value::Array(expected));
    let (status, problem) = get_json(&subject_url("limit=1000")).await;
    assert_eq!(status, 500, "{problem}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_after_removes_old_segments_with_an_audit_record() {
    const N: usize = 3000;
    let Stored { pool, m, w, .. } = stored(N).await;
    m.write(
        "archive.yaml",
        &policy_yaml(
            "old-orders",
            "  deleteAfter: 4s\n  segment: {maxEvents: 1000}\n",
        ),
    );
    // Archived first, then (once older than 4 s) deleted, with one audit row per segment.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let audit = count(&pool, "SELECT count(*) FROM weir_archive_audit").await;
        let segments = count(&pool, "SELECT count(*) FROM weir_archive_segments").await;
        let hot = count(&pool, "SELECT count(*) FROM weir_events").await;
        if audit == 3 && segments == 0 && hot == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "audit {audit}, segments {segments}, hot {hot}; log:\n{}",
            w.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, _) = get_json(&format!("{}/1", w.events_url(NS, STREAM))).await;
    assert_eq!(status, 404);
    // The removals wrote audit records (one JSON line per removal, docs/security-admin.md)
    // that add up to the events removed.
    let removals: Vec<serde_json::Value> = w
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "weir.audit.v1" && v["action"] == "archive.deleteAfter")
        .collect();
    assert!(
        !removals.is_empty(),
        "no audit record; log:\n{}",
        w.log_text()
    );
    for r in &removals {
        assert_eq!(r["who"], "weir:archiver", "{r}");
        assert_eq!(r["target"], format!("{NS}/{STREAM}"), "{r}");
        assert_eq!(r["outcome"], "success", "{r}");
    }
    let removed: u64 = removals.iter().filter_map(|r| r["count"].as_u64()).sum();
    assert_eq!(removed, N as u64, "{removals:?}");
    // New events still append after the deleted ones, and verify accepts the deleted prefix.
    publish_range(&w, N..N + 10).await;
    let page = read_all(&w).await;
    assert_eq!(page.len(), 10);
    assert_eq!(page[0]["weirposition"], (N + 1).to_string());
    let (code, out) = cli(&w, &["verify"]);
    assert_eq!(code, 0, "{out}");
}
