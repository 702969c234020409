//! Black-box tests of the durable ingest path: real `weir run` processes, the real
//! PostgreSQL and RabbitMQ.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use sqlx::Row;

async fn post_json(client: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let r = client.post(url).json(body).send().await.expect("post");
    let status = r.status().as_u16();
    let v = r.json().await.unwrap_or(Value::Null);
    (status, v)
}

fn seed_events(prefix: &str, n: usize, subjects: usize, offset: usize) -> Value {
    Value::Array(
        (0..n)
            .map(|i| {
                json!({
                    "type": "order.created",
                    "id": format!("{prefix}-{i}"),
                    "subject": format!("order-{}", (offset + i) % subjects),
                    "data": {"n": i, "pad": "x".repeat(64)}
                })
            })
            .collect(),
    )
}

/// Positions are 1..=n with no gap or repeat; per-subject versions are 1..=k in position order.
async fn assert_gap_free(db: &sqlx::PgPool, n: i64) {
    let rows = sqlx::query("SELECT position FROM weir_events ORDER BY position")
        .fetch_all(db)
        .await
        .unwrap();
    let positions: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        positions,
        (1..=n).collect::<Vec<_>>(),
        "positions gap-free 1..={n}"
    );
    let bad: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
           SELECT version, lag(version) OVER (PARTITION BY subject ORDER BY position) AS prev,
                  row_number() OVER (PARTITION BY subject ORDER BY position) AS rn
           FROM weir_events WHERE subject IS NOT NULL) x
         WHERE version <> rn OR (prev IS NOT NULL AND version <> prev + 1)",
    )
    .fetch_one(db)
    .await
    .unwrap();
    assert_eq!(
        bad, 0,
        "per-subject versions are gap-free and follow position order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_store_20000_events_once_and_relay_them_in_order() {
    let db_url = fresh_database().await;
    let m = Manifests::new(&db_url);
    let ex = unique("weir.test.orders.");
    m.write("stream.yaml", &stream_yaml("orders", &ex, ""));
    let (_conn, ch, q) = bind_test_queue(&ex).await;
    let (a, b) = two_workers(m.path(), "test", "orders").await;

    let urls = Arc::new([
        a.events_url("test", "orders"),
        b.events_url("test", "orders"),
    ]);
    let client = common::http();
    let mut tasks = vec![];
    for c in 0..8 {
        let urls = urls.clone();
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = vec![];
            for r in 0..250 {
                let body = seed_events(&format!("c{c}-r{r}"), 10, 50, c * 10 + r);
                let (status, v) = post_json(&client, &urls[(c + r) % 2], &body).await;
                assert_eq!(status, 201, "{v}");
                for res in v["results"].as_array().unwrap() {
                    assert_eq!(res["duplicate"], false);
                    ids.push(res["position"].as_i64().unwrap());
                }
            }
            ids
        }));
    }
    let mut answered = BTreeSet::new();
    for t in tasks {
        for p in t.await.unwrap() {
            assert!(answered.insert(p), "position {p} answered twice");
        }
    }
    assert_eq!(answered.len(), 20_000);

    let db = sqlx::PgPool::connect(&db_url).await.unwrap();
    assert_gap_free(&db, 20_000).await;

    let relayed = drain_queue(&ch, &q, 20_000, Duration::from_secs(20)).await;
    let relayed: Vec<i64> = relayed.iter().map(|p| p.parse().unwrap()).collect();
    assert_eq!(
        relayed,
        (1..=20_000).collect::<Vec<_>>(),
        "relayed once each, in position order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_run_loses_no_answered_event() {
    let db_url = fresh_database().await;
    let m = Manifests::new(&db_url);
    let ex = unique("weir.test.kill.");
    m.write("stream.yaml", &stream_yaml("orders", &ex, ""));
    let (_conn, ch, q) = bind_test_queue(&ex).await;
    let (mut a, b) = two_workers(m.path(), "test", "orders").await;

    let urls = Arc::new([
        a.events_url("test", "orders"),
        b.events_url("test", "orders"),
    ]);
    let client = common::http();
    let mut tasks = vec![];
    for c in 0..4 {
        let urls = urls.clone();
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok_ids = vec![];
            for r in 0..200 {
                let body = seed_events(&format!("k{c}-r{r}"), 5, 20, r);
                if let Ok(resp) = client.post(&urls[(c + r) % 2]).json(&body).send().await
                    && resp.status().as_u16() == 201
                {
                    for i in 0..5 {
                        ok_ids.push(format!("k{c}-r{r}-{i}"));
                    }
                }
            }
            ok_ids
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    a.kill9();
    let mut ok_ids = vec![];
    for t in tasks {
        ok_ids.extend(t.await.unwrap());
    }
    assert!(ok_ids.len() > 1000, "most requests went to the survivor");
    // Restart the killed process; both run again.
    let mut a2 = Weir::start(m.path());
    a2.wait_ready("test", "orders").await;

    let db = sqlx::PgPool::connect(&db_url).await.unwrap();
    let stored: Vec<String> = sqlx::query_scalar("SELECT id FROM weir_events")
        .fetch_all(&db)
        .await
        .unwrap();
    let stored: BTreeSet<String> = stored.into_iter().collect();
    for id in &ok_ids {
        assert!(stored.contains(id), "answered event {id} is not stored");
    }
    let head = stored.len() as i64;
    assert_gap_free(&db, head).await;
    // Every stored event reaches the exchange (at least once: a relay owner that died may
    // have published without moving its checkpoint).
    let relayed = drain_queue(&ch, &q, usize::MAX, Duration::from_secs(10)).await;
    let relayed: BTreeSet<i64> = relayed.iter().map(|p| p.parse().unwrap()).collect();
    assert_eq!(relayed, (1..=head).collect::<BTreeSet<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_case_names_the_problem_and_the_server_keeps_serving() {
    let db_url = fresh_database().await;
    let m = Manifests::new(&db_url);
    let ex = unique("weir.test.err.");
    m.write(
        "stream.yaml",
        &stream_yaml(
            "orders",
            &ex,
            "  validation:\n    maxEventBytes: 1KiB\n    maxRequestBytes: 8KiB\n    allowUnknownTypes: false\n    \
             schemas:\n      - type: order.created\n        schema: {type: object, required: [orderId], properties: {orderId: {type: string}}}\n",
        ),
    );
    m.write(
        "strict.yaml",
        &stream_yaml(
            "strict",
            &unique("weir.test.strict."),
            "  validation:\n    requiredExtensions: [correlationid]\n",
        ),
    );
    let mut w = Weir::start(m.path());
    w.wait_ready("test", "orders").await;
    w.wait_ready("test", "strict").await;
    let url = w.events_url("test", "orders");
    let c = common::http();
    let ce = |extra: Value| {
        let mut v = json!({"specversion": "1.0", "id": "1", "source": "/t", "type": "order.created", "data": {"orderId": "o1"}});
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            for (k, x) in e {
                if x.is_null() {
                    o.remove(k);
                } else {
                    o.insert(k.clone(), x.clone());
                }
            }
        }
        v.to_string()
    };
    let send = |url: String, ct: &'static str, body: String| {
        let c = c.clone();
        async move {
            let r = c
                .post(url)
                .header("content-type", ct)
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let ctype = r
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            (status, ctype, v)
        }
    };
    let structured = "application/cloudevents+json";
    let cases: Vec<(&str, String, &str, String, u16, &str)> = vec![
        (
            "unknown stream",
            w.events_url("test", "nope"),
            structured,
            ce(json!({})),
            404,
            "nope",
        ),
        (
            "unsupported content type",
            url.clone(),
            "text/xml",
            "<e/>".into(),
            415,
            "text/xml",
        ),
        (
            "body over maxRequestBytes",
            url.clone(),
            structured,
            "x".repeat(9000),
            413,
            "8192",
        ),
        (
            "event over maxEventBytes",
            url.clone(),
            structured,
            ce(json!({"data": {"orderId": "x".repeat(2000)}})),
            413,
            "1024",
        ),
        (
            "malformed JSON",
            url.clone(),
            structured,
            "{\"id\": ".into(),
            400,
            "line 1",
        ),
        (
            "missing id",
            url.clone(),
            structured,
            ce(json!({"id": null})),
            400,
            "/id",
        ),
        (
            "bad extension name",
            url.clone(),
            structured,
            ce(json!({"Bad-Name": "x"})),
            400,
            "Bad-Name",
        ),
        (
            "schema violation",
            url.clone(),
            structured,
            ce(json!({"data": {"other": 1}})),
            422,
            "/data",
        ),
        (
            "unknown type",
            url.clone(),
            structured,
            ce(json!({"type": "order.exploded"})),
            422,
            "order.exploded",
        ),
        (
            "missing required extension",
            w.events_url("test", "strict"),
            structured,
            ce(json!({})),
            422,
            "correlationid",
        ),
    ];
    for (name, u, ct, body, want, needle) in cases {
        let (status, ctype, v) = send(u, ct, body).await;
        assert_eq!(status, want, "{name}: {v}");
        assert!(
            ctype.starts_with("application/problem+json"),
            "{name}: {ctype}"
        );
        assert_eq!(v["status"], want, "{name}");
        let text = v.to_string();
        assert!(
            text.contains(needle),
            "{name}: body should mention {needle:?}: {text}"
        );
    }
    // The schema violation names the event index, pointer and keyword.
    let (_, _, v) = send(
        url.clone(),
        "application/cloudevents-batch+json",
        format!(
            "[{},{}]",
            ce(json!({"id": "a"})),
            ce(json!({"id": "b", "data": {"orderId": 5}}))
        ),
    )
    .await;
    let e = &v["errors"][0];
    assert_eq!(
        (
            e["index"].as_i64(),
            e["pointer"].as_str(),
            e["keyword"].as_str()
        ),
        (Some(1), Some("/data/orderId"), Some("type")),
        "{v}"
    );
    // Nothing of a rejected request was stored, and the server still serves.
    let (status, _, v) = send(url.clone(), structured, ce(json!({"id": "ok"}))).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(
        v["results"][0]["position"], 1,
        "rejected requests stored nothing: {v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_batches_concurrent_single_event_requests() {
    let db_url = fresh_database().await;
    let m = Manifests::new(&db_url);
    m.write(
        "stream.yaml",
        &stream_yaml("gc", &unique("weir.test.gc."), ""),
    );
    let mut w = Weir::start(m.path());
    w.wait_ready("test", "gc").await;
    let url = Arc::new(w.events_url("test", "gc"));
    let client = common::http();
    let mut tasks = vec![];
    for c in 0..64 {
        let url = url.clone();
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut unreadable = 0;
            for r in 0..30 {
                let body = json!({"type": "t", "id": format!("g{c}-{r}"), "data": {"r": r}});
                let (status, v) = post_json(&client, &url, &body).await;
                assert_eq!(status, 201, "{v}");
                let p = v["results"][0]["position"].as_i64().unwrap();
                // The answer comes only after commit: the event is readable at once.
                let got = client.get(format!("{url}/{p}")).send().await.unwrap();
                if got.status() != 200 {
                    unreadable += 1;
                }
            }
            unreadable
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 0, "a 201 came before its commit");
    }
    let metrics = w.metrics().await;
    let get = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l.contains("stream=\"gc\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in\n{metrics}"))
    };
    let (sum, count) = (get("weir_batch_events_sum"), get("weir_batch_events_count"));
    assert_eq!(sum as i64, 64 * 30);
    assert!(
        sum / count > 1.0,
        "mean batch {} should exceed 1",
        sum / count
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_expected_versions_let_exactly_one_win() {
    let db_url = fresh_database().await;
    let m = Manifests::new(&db_url);
    m.write(
        "stream.yaml",
        &stream_yaml("acc", &unique("weir.test.ev."), ""),
    );
    let mut w = Weir::start(m.path());
    w.wait_ready("test", "acc").await;
    let url = w.events_url("test", "acc");
    let c = common::http();
    let post = |id: String, subject: String, expected: String| {
        let c = c.clone();
        let url = url.clone();
        async move {
            c.post(&url)
                .header("content-type", "application/cloudevents+json")
                .body(
                    json!({"specversion": "1.0", "id": id, "source": "/race", "type": "t",
                    "subject": subject, "expectedversion": expected})
                    .to_string(),
                )
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    for round in 0..20 {
        let s = format!("acct-{round}");
        assert_eq!(post(format!("{s}-open"), s.clone(), "0".into()).await, 201);
        assert_eq!(
            post(format!("{s}-again"), s.clone(), "0".into()).await,
            409,
            "subject exists"
        );
        let (x, y) = tokio::join!(
            post(format!("{s}-x"), s.clone(), "1".into()),
            post(format!("{s}-y"), s.clone(), "1".into())
        );
        let mut got = [x, y];
        got.sort();
        assert_eq!(got, [201, 409], "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_round_trips_byte_for_byte_in_every_content_mode() {
    let db_url = fresh_database().await;
    let m = Manifests::new(&db_url);
    let ex = unique("weir.test.rt.");
    m.write(
        "stream.yaml",
        &stream_yaml("rt", &ex, "  compression: {minBytes: 1KiB, level: 3}\n"),
    );
    let (_conn, ch, q) = bind_test_queue(&ex).await;
    let mut w = Weir::start(m.path());
    w.wait_ready("test", "rt").await;
    let url = w.events_url("test", "rt");
    let c = common::http();
    let binary: Vec<u8> = (0..=255u8).collect();
    let big_json = format!(
        "{{ \"z\" : 1,\n  \"a\":[1.50, 2e3], \"pad\": \"{}\" }}",
        "y".repeat(3000)
    );
    // (request, expected data kind in structured output, expected payload bytes)
    let odd_json = "{ \"b\" : 1,   \"a\":2.50 ,\"n\":null}";
    let mut expectations: Vec<(String, Vec<u8>, &str)> = vec![];

    let structured = format!(
        r#"{{"specversion":"1.0","id":"s1","source":"/rt","type":"t","datacontenttype":"application/json","data":{odd_json}}}"#
    );
    let r = c
        .post(&url)
        .header("content-type", "application/cloudevents+json")
        .body(structured)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    expectations.push(("s1".into(), odd_json.as_bytes().to_vec(), "json"));

    let text = json!({"specversion":"1.0","id":"s2","source":"/rt","type":"t","datacontenttype":"text/plain","data":"héllo \"world\"\n"});
    let r = c
        .post(&url)
        .header("content-type", "application/cloudevents+json")
        .body(text.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    expectations.push(("s2".into(), "héllo \"world\"\n".as_bytes().to_vec(), "text"));

    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&binary);
    let batch = format!(
        r#"[{{"specversion":"1.0","id":"s3","source":"/rt","type":"t","datacontenttype":"application/octet-stream","data_base64":"{b64}"}},
            {{"specversion":"1.0","id":"s4","source":"/rt","type":"t","data":{big_json}}}]"#
    );
    let r = c
        .post(&url)
        .header("content-type", "application/cloudevents-batch+json")
        .body(batch)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    expectations.push(("s3".into(), binary.clone(), "binary"));
    expectations.push(("s4".into(), big_json.as_bytes().to_vec(), "json"));

    let r = c
        .post(&url)
        .header("ce-specversion", "1.0")
        .header("ce-id", "b1")
        .header("ce-source", "/rt")
        .header("ce-type", "t")
        .header("content-type", "application/octet-stream")
        .body(binary.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    expectations.push(("b1".into(), binary.clone(), "binary"));
    let r = c
        .post(&url)
        .header("ce-specversion", "1.0")
        .header("ce-id", "b2")
        .header("ce-source", "/rt")
        .header("ce-type", "t")
        .header("content-type", "application/json")
        .body(odd_json)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    expectations.push(("b2".into(), odd_json.as_bytes().to_vec(), "json"));
    let r = c
        .post(&url)
        .header("ce-specversion", "1.0")
        .header("ce-id", "b3")
        .header("ce-source", "/rt")
        .header("ce-type", "t")
        .header("content-type", "text/plain; charset=utf-8")
        .body("plain text")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    expectations.push(("b3".into(), b"plain text".to_vec(), "text"));

    // Read back through the API: structured JSON, data spliced verbatim.
    let page = c
        .get(format!("{url}?from=1&limit=100"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        page.headers()["content-type"],
        "application/cloudevents-batch+json"
    );
    let text = page.text().await.unwrap();
    let raw: Vec<BTreeMap<String, Box<serde_json::value::RawValue>>> =
        serde_json::from_str(&text).unwrap();
    let by_id: HashMap<String, &BTreeMap<String, Box<serde_json::value::RawValue>>> = raw
        .iter()
        .map(|e| (serde_json::from_str::<String>(e["id"].get()).unwrap(), e))
        .collect();
    for (id, bytes, kind) in &expectations {
        let e = by_id[id];
        let got: Vec<u8> = match *kind {
            "json" => e["data"].get().as_bytes().to_vec(),
            "text" => serde_json::from_str::<String>(e["data"].get())
                .unwrap()
                .into_bytes(),
            _ => base64::engine::general_purpose::STANDARD
                .decode(serde_json::from_str::<String>(e["data_base64"].get()).unwrap())
                .unwrap(),
        };
        assert_eq!(&got, bytes, "event {id} ({kind}) read back");
        assert!(e.contains_key("weirposition") && e.contains_key("weirrecordedtime"));
    }
    // And through the broker: the AMQP body is the payload itself.
    use futures::StreamExt;
    use lapin::options::*;
    let mut consumer = ch
        .basic_consume(
            q.as_str().into(),
            "rt".into(),
            BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let mut seen = 0;
    while seen < expectations.len() {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let headers = d.properties.headers().clone().unwrap_or_default();
        let id = match headers.inner().get("cloudEvents:id") {
            Some(lapin::types::AMQPValue::LongString(s)) => s.to_string(),
            other => panic!("cloudEvents:id header: {other:?}"),
        };
        let (_, bytes, _) = expectations.iter().find(|(i, _, _)| *i == id).unwrap();
        assert_eq!(&d.data, bytes, "event {id} on the broker");
        d.ack(BasicAckOptions::default()).await.unwrap();
        seen += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watched_folder_applies_add_edit_break_and_delete_without_restart() {
    let db_url = fresh_database().await;
    let m = Manifests::new(&db_url);
    let mut w = Weir::start(m.path());
    let url = w.events_url("test", "live");
    let c = common::http();
    let publish = |size: usize| {
        let c = c.clone();
        let url = url.clone();
        async move {
            let body = json!({"type": "t", "data": {"pad": "p".repeat(size)}});
            c.post(&url)
                .json(&body)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    let ex = unique("weir.test.live.");
    // Add.
    m.write("live.yaml", &stream_yaml("live", &ex, ""));
    w.wait_ready("test", "live").await;
    assert_eq!(publish(2000).await, 201);
    // Edit: a smaller maxEventBytes takes effect.
    m.write(
        "live.yaml",
        &stream_yaml("live", &ex, "  validation: {maxEventBytes: 1KiB}\n"),
    );
    wait_for(|| async { publish(2000).await == 413 }, "edit applied").await;
    // The edited stream answers size checks as soon as it runs; appends wait for its store
    // to be provisioned again (503 with Retry-After meanwhile).
    wait_for(
        || async { publish(10).await == 201 },
        "edited stream appends",
    )
    .await;
    // Break: the previous version keeps running and status says why.
    m.write(
        "live.yaml",
        &stream_yaml("live", &ex, "  batching: {maxDelay: 5 sec}\n"),
    );
    wait_for(
        || async {
            let s: Value = c
                .get(format!("{}/v1/status", w.admin))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            s.to_string().contains("5 sec")
        },
        "broken manifest reported",
    )
    .await;
    assert_eq!(
        publish(2000).await,
        413,
        "the previous (edited) version still runs"
    );
    assert_eq!(publish(10).await, 201);
    // Delete: the stream stops.
    m.remove("live.yaml");
    wait_for(|| async { publish(10).await == 404 }, "delete applied").await;
}

async fn wait_for<F, Fut>(mut f: F, what: &str)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    common::eventually(20, what, String::new, || {
        let ready = f();
        async move { ready.await.then_some(()) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_answers_503_with_retry_after_and_loses_nothing_answered() {
    let db_url = fresh_database().await;
    let m = Manifests::new(&db_url);
    m.write(
        "stream.yaml",
        &stream_yaml(
            "slow",
            &unique("weir.test.slow."),
            "  batching: {maxEvents: 10}\n",
        ),
    );
    let mut w = Weir::start_with(
        m.path(),
        &[("WEIR_BATCH_QUEUE", "4"), ("WEIR_REQUEST_TIMEOUT", "60s")],
    );
    w.wait_ready("test", "slow").await;
    let url = Arc::new(w.events_url("test", "slow"));
    let rss = |metrics: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with("process_resident_memory_bytes"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let before = rss(&w.metrics().await);
    // Slow the store down on purpose: hold the stream's counter row.
    let db = sqlx::PgPool::connect(&db_url).await.unwrap();
    let mut lock = db.begin().await.unwrap();
    sqlx::query("SELECT head FROM weir_streams WHERE name = 'slow' FOR UPDATE")
        .fetch_one(&mut *lock)
        .await
        .unwrap();
    let client = common::http();
    let mut tasks = vec![];
    for c in 0..48 {
        let url = url.clone();
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = vec![];
            let mut overloaded = 0;
            for r in 0..30 {
                let id = format!("o{c}-{r}");
                let body = json!({"type": "t", "id": id, "data": {"pad": "z".repeat(100_000)}});
                let resp = client.post(url.as_str()).json(&body).send().await.unwrap();
                match resp.status().as_u16() {
                    201 => ok.push(id),
                    503 => {
                        assert!(
                            resp.headers().contains_key("retry-after"),
                            "503 without Retry-After"
                        );
                        overloaded += 1;
                    }
                    s => panic!("unexpected {s}"),
                }
            }
            (ok, overloaded)
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = rss(&w.metrics().await);
    lock.rollback().await.unwrap();
    let mut ok_ids = vec![];
    let mut overloaded = 0;
    for t in tasks {
        let (ok, o) = t.await.unwrap();
        ok_ids.extend(ok);
        overloaded += o;
    }
    assert!(overloaded > 0, "a stalled store must turn into 503s");
    // 48 clients keep sending 100 KB requests while the store is stalled; the queue holds at
    // most 4 requests plus the two batches waiting on the lock.
    assert!(
        during - before < 48e6,
        "memory grew by {} bytes",
        during - before
    );
    let stored = common::stored_ids(&db).await;
    for id in &ok_ids {
        assert!(stored.contains(id), "answered {id} not stored");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_answers_in_flight_publishes_and_exits_cleanly() {
    let db_url = fresh_database().await;
    let m = Manifests::new(&db_url);
    m.write(
        "stream.yaml",
        &stream_yaml("term", &unique("weir.test.term."), ""),
    );
    let mut w = Weir::start(m.path());
    w.wait_ready("test", "term").await;
    let url = Arc::new(w.events_url("test", "term"));
    let client = common::http();
    let mut tasks = vec![];
    for c in 0..16 {
        let url = url.clone();
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = vec![];
            for r in 0.. {
                let id = format!("t{c}-{r}");
                match client
                    .post(url.as_str())
                    .json(&json!({"type": "t", "id": id, "data": {}}))
                    .send()
                    .await
                {
                    Ok(resp) if resp.status().as_u16() == 201 => ok.push(id),
                    Ok(resp) if resp.status().as_u16() == 503 => {}
                    Ok(resp) => panic!("unexpected {}", resp.status()),
                    Err(_) => break, // the listener is gone
                }
            }
            ok
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let status = w.terminate();
    assert!(
        status.success(),
        "weir exited with {status}; log:\n{}",
        w.log_text()
    );
    let mut ok_ids = vec![];
    for t in tasks {
        ok_ids.extend(t.await.unwrap());
    }
    assert!(!ok_ids.is_empty());
    let db = sqlx::PgPool::connect(&db_url).await.unwrap();
    let stored = common::stored_ids(&db).await;
    for id in &ok_ids {
        assert!(stored.contains(id), "answered {id} not stored");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_manifest_removes_data_only_under_prune_and_delete_policy() {
    let db_url = fresh_database().await;
    let db = sqlx::PgPool::connect(&db_url).await.unwrap();
    let count = |name: &'static str| {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM weir_events e JOIN weir_streams s USING (stream_id) WHERE s.name = $1",
            )
            .bind(name)
            .fetch_one(&db)
            .await
            .unwrap()
        }
    };
    for (prune, policy, kept) in [
        (false, "Delete", true),
        (true, "Retain", true),
        (true, "Delete", false),
    ] {
        let m = Manifests::new(&db_url);
        let name: &'static str = Box::leak(unique("p").into_boxed_str());
        let ex = unique("weir.test.prune.");
        m.write(
            "s.yaml",
            &stream_yaml(name, &ex, &format!("  deletionPolicy: {policy}\n")),
        );
        let mut w = if prune {
            Weir::start_with_args(m.path(), &["--prune"])
        } else {
            Weir::start(m.path())
        };
        w.wait_ready("test", name).await;
        let r = common::http()
            .post(w.events_url("test", name))
            .json(&json!({"type": "t", "data": {}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        assert_eq!(count(name).await, 1);
        m.remove("s.yaml");
        let url = w.events_url("test", name);
        wait_for(
            || async {
                common::http()
                    .post(&url)
                    .json(&json!({"type": "t", "data": {}}))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    == 404
            },
            "stream stopped",
        )
        .await;
        // Pruning happens right after the stop; give it a moment.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(count(name).await > 0, kept, "prune={prune} policy={policy}");
        assert_eq!(
            exchange_exists(&ex).await,
            kept,
            "exchange kept? prune={prune} policy={policy}"
        );
    }
}

/// Sends `request` as raw bytes over a new connection (half-closing it afterwards when
/// `half_close`), and returns the response's status and JSON body.
async fn raw_http(addr: &str, request: &[u8], half_close: bool) -> (u16, String, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write request");
    if half_close {
        // No more bytes will come: the body stays short of its Content-Length.
        s.shutdown().await.expect("half-close");
    }
    // Read until the response is complete: headers, then Content-Length bytes of body.
    let mut buf = Vec::new();
    let read = async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.expect("read response");
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let len = text[..end]
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len || n == 0 {
                    return text;
                }
            }
            assert!(n > 0, "connection closed before a response: {text:?}");
        }
    };
    let text = tokio::time::timeout(Duration::from_secs(15), read)
        .await
        .expect("a response within 15 s");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let ctype = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    (
        status,
        ctype,
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_body_is_a_400_and_only_an_oversized_one_a_413() {
    let db_url = fresh_database().await;
    let m = Manifests::new(&db_url);
    let ex = unique("weir.test.body.");
    m.write(
        "stream.yaml",
        &stream_yaml("orders", &ex, "  validation:\n    maxRequestBytes: 8KiB\n"),
    );
    let mut w = Weir::start(m.path());
    w.wait_ready("test", "orders").await;
    let addr = w.url.trim_start_matches("http://").to_string();
    let path = "/v1/namespaces/test/streams/orders/events";
    let head = |extra: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{extra}\r\n"
        )
    };
    let event = r#"{"type":"order.created","data":{"n":1}}"#;

    let unreadable = |name: &str, (status, ctype, v): (u16, String, Value)| {
        assert_eq!(status, 400, "{name}: {v}");
        assert!(
            ctype.starts_with("application/problem+json"),
            "{name}: {ctype}"
        );
        assert_eq!(
            v["type"], "https://weir.dev/problems/unreadable-body",
            "{name}: {v}"
        );
        assert_eq!(v["status"], 400, "{name}: {v}");
        let detail = v["detail"].as_str().unwrap_or_default();
        assert!(
            detail.starts_with("the request body could not be read: "),
            "{name}: {detail}"
        );
        eprintln!("{name}: {detail}");
        detail.to_string()
    };

    // A chunk size line that is not hexadecimal.
    let req = format!(
        "{}zz\r\n{event}\r\n0\r\n\r\n",
        head("Transfer-Encoding: chunked\r\n")
    );
    let detail = unreadable("bad chunk", raw_http(&addr, req.as_bytes(), false).await);
    assert!(detail.contains("chunk"), "says what was wrong: {detail}");

    // A Content-Length of 100 with 10 bytes sent before the client stops sending.
    let req = format!("{}{}", head("Content-Length: 100\r\n"), &event[..10]);
    unreadable("truncated", raw_http(&addr, req.as_bytes(), true).await);

    // Over the limit (8 KiB) without a Content-Length, so the limit is found while reading:
    // still 413.
    let big = "x".repeat(9000);
    let req = format!(
        "{}{:x}\r\n{big}\r\n0\r\n\r\n",
        head("Transfer-Encoding: chunked\r\n"),
        big.len()
    );
    let (status, ctype, v) = raw_http(&addr, req.as_bytes(), false).await;
    assert_eq!(status, 413, "{v}");
    assert!(ctype.starts_with("application/problem+json"), "{ctype}");
    assert_eq!(
        v["type"], "https://weir.dev/problems/payload-too-large",
        "{v}"
    );
    assert!(
        v["detail"].as_str().unwrap_or_default().contains("8192"),
        "{v}"
    );
    // And with a Content-Length over the limit.
    let req = format!("{}{big}", head("Content-Length: 9000\r\n"));
    let (status, _, v) = raw_http(&addr, req.as_bytes(), false).await;
    assert_eq!(status, 413, "{v}");

    // The server still serves, and nothing of the broken requests was stored.
    let req = format!(
        "{}{event}",
        head(&format!("Content-Length: {}\r\n", event.len()))
    );
    let (status, _, v) = raw_http(&addr, req.as_bytes(), false).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["results"][0]["position"], 1, "{v}");
}
