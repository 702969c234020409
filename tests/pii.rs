//! Personal-data field encryption (`spec.pii`) end to end, against the real PostgreSQL and
//! RabbitMQ: with `fields: [/customer/email, /customer/address]` the plaintext is nowhere in
//! `weir_events`, in the RabbitMQ message or in archive segments, yet readers and sinks get
//! it back exactly; `weir forget` makes a subject's fields read, replay and deliver as the
//! redaction marker everywhere (hot and archived) while the rest stays readable and the
//! archive verifies; `weir keys rotate` lets old key ids go, and a key removed while in use
//! fails reads clearly.

mod common;

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use common::recording::RecordingSink;
use common::*;
use serde_json::{Value, json};

const NS: &str = "test";
const STREAM: &str = "orders";
const MARKER: &str = "weir:pii:forgotten";

fn key_line(id: &str, byte: u8) -> String {
    format!(
        "{id}:{}",
        base64::engine::general_purpose::STANDARD.encode([byte; 32])
    )
}

fn keys_secret(lines: &[String]) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: pii-keys, namespace: test}}\nstringData: {{keys: {:?}}}\n",
        lines.join("\n")
    )
}

const PII: &str = "  pii: {fields: [/customer/email, /customer/address], keySecretRef: {name: pii-keys, key: keys}}\n";

fn email(subject: &str, i: usize) -> String {
    format!("{subject}.{i}@example.com")
}

fn event(subject: &str, i: usize) -> Value {
    json!({
        "specversion": "1.0",
        "id": format!("{subject}-{i}"),
        "source": "/pii-test",
        "type": "order.created",
        "subject": subject,
        "datacontenttype": "application/json",
        "data": {
            "orderId": format!("ord-{subject}-{i}"),
            "customer": {
                "email": email(subject, i),
                "address": {"street": format!("{i} Main St"), "zip": 12345},
                "tier": "gold"
            }
        }
    })
}

async fn publish(w: &Weir, events: &[Value]) -> (u16, Value) {
    post_batch(&w.events_url(NS, STREAM), events).await
}

async fn read_all(w: &Weir) -> Vec<Value> {
    let (status, page) = get_json(&format!("{}?limit=1000", w.events_url(NS, STREAM))).await;
    assert_eq!(status, 200, "{page}");
    page.as_array().cloned().unwrap_or_default()
}

/// A sink recording every event; `(ce-subject, body)` of each through [`received`].
async fn recording_sink() -> (String, RecordingSink) {
    let sink = RecordingSink::start().await;
    (sink.url.clone(), sink)
}

/// `(ce-subject, body)` of every event `sink` accepted (binary mode: the body is `data`).
fn received(sink: &RecordingSink) -> Vec<(String, Value)> {
    sink.got()
        .iter()
        .map(|g| (g.subject.clone(), g.json()))
        .collect()
}

fn subscription(name: &str, sink: &str, extra: &str) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: {name}, namespace: test}}\nspec:\n  \
         stream: {STREAM}\n  sink: {{uri: \"{sink}\"}}\n{extra}"
    )
}

/// `weir <args>` against a running process; (exit code, stdout + stderr).
fn cli(w: &Weir, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(weir_binary())
        .arg("--admin")
        .arg(&w.admin)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// The bodies of up to `want` messages of `queue`.
async fn queue_bodies(ch: &lapin::Channel, queue: &str, want: usize) -> Vec<Vec<u8>> {
    use futures::StreamExt;
    use lapin::options::*;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            unique("c").as_str().into(),
            BasicConsumeOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    while out.len() < want {
        let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await
        else {
            break;
        };
        out.push(d.data.clone());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Every archive segment file under `vol`, decoded (the policy trains no dictionary): the
/// raw bytes and the `data` of every event.
fn segments(vol: &Path) -> (Vec<u8>, Vec<String>) {
    use weir::data::archive::format::{decompress_block, parse_body};
    let mut raw = Vec::new();
    let mut datas = Vec::new();
    let mut dirs = vec![vol.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
                continue;
            }
            let body = std::fs::read(&p).unwrap();
            raw.extend_from_slice(&body);
            let Ok((index, _)) = parse_body(&body) else {
                continue;
            };
            for b in &index {
                let frame = &body[b.offset as usize..(b.offset + u64::from(b.len)) as usize];
                for ev in decompress_block(frame, b, None).unwrap() {
                    if let Some(data) = &ev.event.data {
                        datas.push(String::from_utf8_lossy(data.bytes()).into_owned());
                    }
                }
            }
        }
    }
    (raw, datas)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn personal_data_is_ciphertext_at_rest_plaintext_for_readers_and_forgettable() {
    let db = fresh_database().await;
    let pool = sqlx::PgPool::connect(&db).await.unwrap();
    let m = Manifests::new(&db);
    let vol = tempfile::tempdir().unwrap();
    let exchange = unique("weir.test.pii.");
    let (live_url, live) = recording_sink().await;
    let (sealed_url, sealed) = recording_sink().await;
    m.write("keys.yaml", &keys_secret(&[key_line("k1", 1)]));
    m.write("orders.yaml", &stream_yaml(STREAM, &exchange, PII));
    // Names of this run only: a queue left by an earlier run would make a subscription
    // count as existing (and skip its catch-up).
    let (live_sub, sealed_sub, replay_sub) = (unique("live"), unique("sealed"), unique("replay"));
    m.write("live.yaml", &subscription(&live_sub, &live_url, ""));
    m.write(
        "sealed.yaml",
        &subscription(&sealed_sub, &sealed_url, "  delivery: {pii: Envelope}\n"),
    );
    // Runs only when asked (`weir archive run`): the schedule is an hour.
    m.write(
        "archive.yaml",
        &format!(
            "apiVersion: weir.dev/v1alpha1\nkind: ArchivePolicy\nmetadata: {{name: old, namespace: test}}\nspec:\n  \
             streamNames: [{STREAM}]\n  archiveAfter: 1s\n  schedule: 1h\n  \
             compression: {{dictionary: false}}\n  destination: {{volume: {{path: {}}}}}\n",
            vol.path().display()
        ),
    );
    let (conn, ch, queue) = bind_test_queue(&exchange).await;
    let mut w = Weir::start(m.path());
    w.wait_readable(NS, STREAM).await;
    // Both subscriptions consume before anything is published.
    for sub in [&live_sub, &sealed_sub] {
        eventually(
            30,
            &format!("subscription {sub} ready"),
            || w.log_text(),
            || async {
                let (_, s) = get_json(&format!("{}/v1/status", w.admin)).await;
                s["resources"]
                    .as_array()?
                    .iter()
                    .any(|r| {
                        r["kind"] == "Subscription"
                            && r["name"] == sub.as_str()
                            && r["ready"] == true
                    })
                    .then_some(())
            },
        )
        .await;
    }

    // Refusals: a pii field without a subject, and a non-JSON payload.
    let mut no_subject = event("x", 0);
    no_subject.as_object_mut().unwrap().remove("subject");
    let (status, body) = publish(&w, &[no_subject]).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        body["type"], "https://weir.dev/problems/pii-refused",
        "{body}"
    );
    assert_eq!(
        body["errors"][0]["pointer"], "/data/customer/email",
        "{body}"
    );
    let text = json!({"specversion": "1.0", "id": "t", "source": "/s", "type": "t",
        "subject": "x", "datacontenttype": "text/plain", "data": "hello"});
    let (status, body) = publish(&w, &[text]).await;
    assert_eq!(status, 422, "{body}");
    // An event without the fields is stored as it is.
    let mut plain = event("carol", 0);
    plain["data"] = json!({"orderId": "no-customer"});
    let (status, body) = publish(&w, &[plain]).await;
    assert_eq!(status, 201, "{body}");

    // Batch 1: alice and bob, archived below.
    let batch1: Vec<Value> = (0..3)
        .flat_map(|i| [event("alice", i), event("bob", i)])
        .collect();
    let (status, body) = publish(&w, &batch1).await;
    assert_eq!(status, 201, "{body}");

    // The store holds only envelopes.
    let rows: Vec<(Option<String>, Vec<u8>)> = sqlx::query_as(
        "SELECT subject, data FROM weir_events WHERE data IS NOT NULL ORDER BY position",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 7);
    for (subject, data) in &rows {
        assert!(
            !contains(data, "@example.com"),
            "{subject:?}: plaintext stored"
        );
        assert!(!contains(data, "Main St"), "{subject:?}: plaintext stored");
        if subject.as_deref() != Some("carol") {
            assert!(contains(data, "weir:pii:v1:"), "{subject:?}");
            // What is not listed stays in clear.
            assert!(contains(data, "gold") && contains(data, "ord-"));
        }
    }
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM weir_subject_keys")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(keys, 2, "one key per subject with personal data");

    // So does RabbitMQ.
    let bodies = queue_bodies(&ch, &queue, 7).await;
    assert_eq!(bodies.len(), 7);
    for b in &bodies {
        assert!(!contains(b, "@example.com") && !contains(b, "Main St"));
    }
    assert_eq!(
        bodies
            .iter()
            .filter(|b| contains(b, "weir:pii:v1:"))
            .count(),
        6
    );
    close_amqp(conn).await;

    // A reader gets every value back exactly.
    let all = read_all(&w).await;
    assert_eq!(all.len(), 7);
    let check_plain = |ev: &Value| {
        let subject = ev["subject"].as_str().unwrap();
        let i: usize = ev["id"]
            .as_str()
            .unwrap()
            .rsplit('-')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(ev["data"]["customer"]["email"], email(subject, i), "{ev}");
        assert_eq!(
            ev["data"]["customer"]["address"],
            json!({"street": format!("{i} Main St"), "zip": 12345}),
            "{ev}"
        );
        assert_eq!(ev["data"]["customer"]["tier"], "gold");
    };
    for ev in &all[1..] {
        check_plain(ev);
    }
    // One event, and a subject's events, too.
    let (status, one) = get_json(&format!("{}/2", w.events_url(NS, STREAM))).await;
    assert_eq!(status, 200);
    check_plain(&one);
    let (_, bob) = get_json(&format!(
        "{}/v1/namespaces/{NS}/streams/{STREAM}/subjects/bob/events",
        w.url
    ))
    .await;
    assert_eq!(bob.as_array().unwrap().len(), 3);
    bob.as_array().unwrap().iter().for_each(check_plain);

    // The sink gets the plaintext; the Envelope subscription the envelopes.
    eventually(
        30,
        "7 deliveries to each sink",
        || w.log_text(),
        || async { (live.got().len() >= 7 && sealed.got().len() >= 7).then_some(()) },
    )
    .await;
    for (subject, body) in received(&live).iter().filter(|(s, _)| s != "carol") {
        assert!(
            body["customer"]["email"]
                .as_str()
                .unwrap()
                .starts_with(subject.as_str()),
            "{body}"
        );
    }
    for (subject, body) in received(&sealed).iter().filter(|(s, _)| s != "carol") {
        let e = body["customer"]["email"].as_str().unwrap();
        assert!(e.starts_with("weir:pii:v1:"), "{subject}: {body}");
    }

    // Archive batch 1: the segment files hold envelopes only.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (code, out) = cli(&w, &["archive", "run", &format!("{NS}/{STREAM}")]);
    assert_eq!(code, 0, "{out}");
    let hot: i64 = sqlx::query_scalar("SELECT count(*) FROM weir_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(hot, 0, "{out}");
    let (raw, datas) = segments(vol.path());
    assert_eq!(datas.len(), 7);
    assert!(!contains(&raw, "@example.com"));
    for d in &datas {
        assert!(!d.contains("@example.com") && !d.contains("Main St"), "{d}");
    }
    assert_eq!(
        datas.iter().filter(|d| d.contains("weir:pii:v1:")).count(),
        6
    );

    // Batch 2 stays hot.
    let batch2: Vec<Value> = (3..5)
        .flat_map(|i| [event("alice", i), event("bob", i)])
        .collect();
    let (status, body) = publish(&w, &batch2).await;
    assert_eq!(status, 201, "{body}");
    // Archived and hot events alike read back in clear.
    let all = read_all(&w).await;
    assert_eq!(all.len(), 11);
    all[1..].iter().for_each(check_plain);

    // Forget alice.
    let (code, out) = cli(&w, &["forget", &format!("{NS}/{STREAM}"), "alice"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("forgotten"), "{out}");
    let check_forgotten = |ev: &Value| {
        assert_eq!(ev["data"]["customer"]["email"], MARKER, "{ev}");
        assert_eq!(ev["data"]["customer"]["address"], MARKER, "{ev}");
        // The rest of the event is unchanged.
        assert_eq!(ev["data"]["customer"]["tier"], "gold");
        assert!(
            ev["data"]["orderId"]
                .as_str()
                .unwrap()
                .starts_with("ord-alice-")
        );
    };
    let after = read_all(&w).await;
    assert_eq!(after.len(), 11);
    for (a, b) in all.iter().zip(&after) {
        // Positions and versions do not move.
        assert_eq!(a["weirposition"], b["weirposition"]);
        assert_eq!(a["weirversion"], b["weirversion"]);
        assert_eq!(a["id"], b["id"]);
    }
    let (alice, others): (Vec<&Value>, Vec<&Value>) =
        after[1..].iter().partition(|e| e["subject"] == "alice");
    assert_eq!(alice.len(), 5, "3 archived, 2 hot");
    alice.iter().for_each(|e| check_forgotten(e));
    others.iter().for_each(|e| check_plain(e));
    let (_, alice_page) = get_json(&format!(
        "{}/v1/namespaces/{NS}/streams/{STREAM}/subjects/alice/events",
        w.url
    ))
    .await;
    alice_page
        .as_array()
        .unwrap()
        .iter()
        .for_each(check_forgotten);
    let (_, one) = get_json(&format!("{}/2", w.events_url(NS, STREAM))).await;
    assert_eq!(one["subject"], "alice");
    check_forgotten(&one);

    // A replay from the start delivers the marker for alice, the plaintext for bob.
    let (replay_url, replay) = recording_sink().await;
    m.write(
        "replay.yaml",
        &subscription(&replay_sub, &replay_url, "  startFrom: earliest\n"),
    );
    let seen = || format!("{:?}\n{}", received(&replay), w.log_text());
    eventually(60, "11 replayed deliveries", seen, || async {
        (replay.got().len() >= 11).then_some(())
    })
    .await;
    for (subject, body) in received(&replay).iter() {
        match subject.as_str() {
            "alice" => assert_eq!(body["customer"]["email"], MARKER, "{body}"),
            "bob" => assert!(
                body["customer"]["email"]
                    .as_str()
                    .unwrap()
                    .starts_with("bob.")
            ),
            _ => assert_eq!(body["orderId"], "no-customer"),
        }
    }

    // The archive is intact, and the forget is in the audit log.
    let (code, out) = cli(&w, &["archive", "verify", &format!("{NS}/{STREAM}")]);
    assert_eq!(code, 0, "{out}");
    let audit: Vec<Value> = w
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "weir.audit.v1" && v["action"] == "subject.forget")
        .collect();
    assert_eq!(audit.len(), 1, "{}", w.log_text());
    assert_eq!(audit[0]["target"], format!("{NS}/{STREAM}/subjects/alice"));
    assert_eq!(audit[0]["outcome"], "success");
    // The subject's key is gone from the store; the other's stays.
    let left: Vec<String> = sqlx::query_scalar("SELECT subject FROM weir_subject_keys")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(left, ["bob"]);
}

/// Waits until a new subject's key is wrapped by `kek_id`: the worker runs the new Secret.
async fn wait_newest(w: &Weir, pool: &sqlx::PgPool, kek_id: &str) {
    eventually(
        30,
        &format!("new keys wrapped by {kek_id}"),
        || w.log_text(),
        || async {
            let subject = unique("probe-");
            let (status, _) = publish(w, &[event(&subject, 0)]).await;
            if status != 201 {
                return None;
            }
            let got: String =
                sqlx::query_scalar("SELECT kek_id FROM weir_subject_keys WHERE subject = $1")
                    .bind(&subject)
                    .fetch_one(pool)
                    .await
                    .ok()?;
            (got == kek_id).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_lets_old_keys_go_and_a_missing_key_fails_clearly() {
    let db = fresh_database().await;
    let pool = sqlx::PgPool::connect(&db).await.unwrap();
    let m = Manifests::new(&db);
    m.write("keys.yaml", &keys_secret(&[key_line("k1", 1)]));
    m.write(
        "orders.yaml",
        &stream_yaml(STREAM, &unique("weir.test.pii."), PII),
    );
    let mut w = Weir::start(m.path());
    w.wait_readable(NS, STREAM).await;
    let events: Vec<Value> = (0..20).map(|i| event(&format!("s{}", i % 10), i)).collect();
    let (status, body) = publish(&w, &events).await;
    assert_eq!(status, 201, "{body}");

    // k1 removed while still in use: reads of those subjects fail naming it, no crash.
    m.write("keys.yaml", &keys_secret(&[key_line("k9", 9)]));
    let problem = eventually(
        30,
        "reads failing with pii-key-missing",
        || w.log_text(),
        || async {
            let (status, body) =
                get_json(&format!("{}?limit=1000", w.events_url(NS, STREAM))).await;
            (status == 503).then_some(body)
        },
    )
    .await;
    assert_eq!(
        problem["type"], "https://weir.dev/problems/pii-key-missing",
        "{problem}"
    );
    assert!(
        problem["detail"].as_str().unwrap().contains("\"k1\""),
        "{problem}"
    );
    // A replay meanwhile cannot decrypt: each attempt fails with that reason and, without
    // retries, the events are dead-lettered with it (keeping their envelopes).
    let (sink, got) = recording_sink().await;
    let sub = unique("replay");
    m.write(
        "replay.yaml",
        &subscription(
            &sub,
            &sink,
            "  startFrom: earliest\n  delivery: {retry: 0}\n",
        ),
    );
    let dead = eventually(
        60,
        "20 dead letters",
        || w.log_text(),
        || async {
            let (_, list) = get_json(&format!(
                "{}/v1/namespaces/{NS}/subscriptions/{sub}/deadletters?limit=100",
                w.admin
            ))
            .await;
            let dl = list["deadLetters"].as_array().cloned().unwrap_or_default();
            (dl.len() >= 20).then_some(dl)
        },
    )
    .await;
    for d in &dead {
        assert_eq!(d["errorCode"], "pii-key-missing", "{d}");
        assert!(d["errorData"].as_str().unwrap().contains("\"k1\""), "{d}");
        let email = d["event"]["data"]["customer"]["email"]
            .as_str()
            .unwrap_or_default();
        assert!(email.starts_with("weir:pii:v1:"), "{d}");
    }
    assert!(got.got().is_empty(), "delivered without its key");
    m.remove("replay.yaml");
    assert!(w.child.try_wait().unwrap().is_none(), "weir exited");

    // The old keys back, k2 newest (new keys wrapped by k2 show the reload): readable again;
    // rotate re-wraps every key with k2. (k9 stays too: a probe published before the
    // reload got a key wrapped by it.)
    m.write(
        "keys.yaml",
        &keys_secret(&[key_line("k1", 1), key_line("k9", 9), key_line("k2", 2)]),
    );
    wait_newest(&w, &pool, "k2").await;
    let (code, out) = cli(&w, &["keys", "rotate", &format!("{NS}/{STREAM}")]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("re-wrapped") && out.contains("\"k2\""),
        "{out}"
    );
    let old: i64 =
        sqlx::query_scalar("SELECT count(*) FROM weir_subject_keys WHERE kek_id <> 'k2'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(old, 0);
    let audit = w
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["action"] == "keys.rotate")
        .count();
    assert!(audit >= 1, "{}", w.log_text());

    // k1 removed after the rotation (k3 added, so the reload shows): everything reads.
    m.write(
        "keys.yaml",
        &keys_secret(&[key_line("k2", 2), key_line("k3", 3)]),
    );
    wait_newest(&w, &pool, "k3").await;
    let all = read_all(&w).await;
    assert!(all.len() >= 20);
    for ev in &all {
        let subject = ev["subject"].as_str().unwrap();
        let e = ev["data"]["customer"]["email"].as_str().unwrap();
        assert!(e.starts_with(&format!("{subject}.")), "{ev}");
    }
}
