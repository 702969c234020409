//! RabbitMQ restarted while publishers write to a broker-only stream: every event answered
//! 202 is in the bound queue afterwards. Its own test binary, because it stops the broker
//! that other tests use.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::recording::EventKey;
use common::*;
use serde_json::json;

/// Starts the RabbitMQ app again however the test ends.
struct StartAppGuard;

impl Drop for StartAppGuard {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "start_app"])
            .status();
    }
}

fn rabbitmqctl(arg: &str) {
    let s = Command::new("rabbitmqctl")
        .args(["-q", arg])
        .status()
        .expect("rabbitmqctl");
    assert!(s.success(), "rabbitmqctl {arg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_restart_loses_no_event_answered_202() {
    let _lock = rabbitmq_restart_lock();
    let db_url = fresh_database().await;
    let m = Manifests::new(&db_url);
    let ex = unique("weir.test.bo.");
    m.write("stream.yaml", &broker_only_yaml("fanout", &ex));
    let (conn, _ch, q) = bind_test_queue(&ex).await;
    let mut w = Weir::start(m.path());
    w.wait_ready("test", "fanout").await;
    let url = Arc::new(w.events_url("test", "fanout"));
    let stop = Arc::new(AtomicBool::new(false));
    let restarted = Arc::new(AtomicBool::new(false));
    let client = common::http();
    let mut tasks = vec![];
    for c in 0..4 {
        let (url, stop, restarted, client) =
            (url.clone(), stop.clone(), restarted.clone(), client.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut ok_after, mut unavailable) = (vec![], 0, 0);
            let mut i = 0;
            while !stop.load(Ordering::Acquire) {
                let id = format!("bo{c}-{i}");
                i += 1;
                let after = restarted.load(Ordering::Acquire);
                let r = client
                    .post(url.as_str())
                    .json(&json!({"type": "t", "id": id, "data": {"i": i}}))
                    .send()
                    .await;
                match r.map(|r| r.status().as_u16()) {
                    Ok(202) => {
                        ok.push(id);
                        if after {
                            ok_after += 1;
                        }
                    }
                    Ok(503) => unavailable += 1,
                    other => panic!("unexpected answer {other:?}"),
                }
            }
            (ok, ok_after, unavailable)
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    {
        let _guard = StartAppGuard;
        rabbitmqctl("stop_app");
        tokio::time::sleep(Duration::from_secs(3)).await;
    } // start_app
    rabbitmqctl("await_startup");
    restarted.store(true, Ordering::Release);
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::Release);
    let (mut answered, mut after, mut unavailable) = (vec![], 0, 0);
    for t in tasks {
        let (ok, a, u) = t.await.unwrap();
        answered.extend(ok);
        after += a;
        unavailable += u;
    }
    drop(conn);
    assert!(
        after > 0,
        "publishing recovered after the restart (503s during it: {unavailable})"
    );
    let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let seen: BTreeSet<String> = drain_queue(&ch, &q, usize::MAX, Duration::from_secs(5))
        .await
        .into_iter()
        .collect();
    let missing: Vec<_> = answered.iter().filter(|id| !seen.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} answered events missing, e.g. {:?}",
        missing.len(),
        answered.len(),
        &missing[..missing.len().min(5)]
    );
}

/// A perKey subscription keeps each key's events in order across a RabbitMQ crash (SIGKILL,
/// the node started again). Two keys' first events wait in their lanes through the crash (the
/// sink refuses them until released); the same keys' events published after it must wait
/// behind them. (Lanes picked by RabbitMQ's consistent-hash exchange failed this: the broker
/// rebuilds the ring in an arbitrary binding order after a restart, so a key usually moved to
/// another lane, free to deliver its new events while the old ones still waited.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rabbitmq_crash_keeps_each_keys_events_in_order() {
    const KEYS: [&str; 2] = ["a", "b"];
    const EACH: usize = 3;
    let db_url = fresh_database().await;
    let m = Manifests::new(&db_url);
    let ex = unique("weir.test.keyed.");
    m.write("stream.yaml", &broker_only_yaml("keyed", &ex));
    let sink = common::recording::RecordingSink::start_holding("before-").await;
    // 16 lanes: a key the old ring moved would almost surely land in a lane not blocked by
    // the held events.
    m.write(
        "sub.yaml",
        &format!(
            "apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: ordered, namespace: test}}\n\
             spec:\n  stream: keyed\n  sink: {{uri: \"{}\"}}\n  ordering: perKey\n  partitions: 16\n  \
             delivery: {{retry: 1000, backoffDelay: 50ms, backoffMax: 200ms}}\n",
            sink.url
        ),
    );
    let mut w = Weir::start(m.path());
    w.wait_ready("test", "keyed").await;
    wait_subscription(&w, "ordered").await;
    let base = w.events_url("test", "keyed");
    let client = common::http();
    // Publishes `EACH` events per key, each answered before the next; 503 (not reconnected
    // yet after the crash) is not an answer: sent again.
    let publish = |phase: &'static str| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let mut sent = vec![];
            for i in 0..EACH {
                for k in KEYS {
                    let id = format!("{phase}-{k}-{i}");
                    let deadline = std::time::Instant::now() + Duration::from_secs(60);
                    loop {
                        let r = client
                            .post(&base)
                            .json(&json!({"type": "t", "id": id, "subject": k, "data": {}}))
                            .send()
                            .await
                            .map(|r| r.status().as_u16());
                        match r {
                            Ok(202) => break,
                            Ok(503) | Err(_) if std::time::Instant::now() < deadline => {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                            other => panic!("publishing {id}: {other:?}"),
                        }
                    }
                    sent.push((k, id));
                }
            }
            sent
        }
    };
    let mut sent = publish("before").await;
    // The first event of each key is being retried at the head of its lane.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while KEYS.iter().any(|k| {
        !sink
            .requests()
            .iter()
            .any(|g| g.id == format!("before-{k}-0"))
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "the held events never reached the sink"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let killed = common::chaos::RabbitKilled::kill().await;
    let back_in = killed.restart().await;
    sent.extend(publish("after").await);
    // Time for the new events to overtake, if they could.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let overtook: Vec<String> = sink.got().iter().map(|g| g.id.clone()).collect();
    sink.release();
    let expected: BTreeSet<EventKey> = sent
        .iter()
        .map(|(_, id)| (String::new(), id.clone()))
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !sink.received_all(&expected) {
        assert!(
            std::time::Instant::now() < deadline,
            "not every event delivered within 2 minutes: {:?}",
            sink.got().iter().map(|g| &g.id).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = sink.got();
    let (lost, duplicated, unexpected) = common::recording::tally(&got, &expected);
    eprintln!(
        "RabbitMQ back in {back_in:?}; delivered while held: {overtook:?}; \
         lost {lost}, duplicated {duplicated}, unexpected {unexpected}"
    );
    assert_eq!((lost, unexpected), (0, 0));
    assert!(
        overtook.is_empty(),
        "events delivered while their key's earlier events were held: {overtook:?}"
    );
    // Each key's first deliveries in publish order.
    let mut first_seen: Vec<&str> = vec![];
    for g in &got {
        if !first_seen.contains(&g.id.as_str()) {
            first_seen.push(&g.id);
        }
    }
    for k in KEYS {
        let published: Vec<&str> = sent
            .iter()
            .filter(|(kk, _)| *kk == k)
            .map(|(_, id)| id.as_str())
            .collect();
        let delivered: Vec<&str> = first_seen
            .iter()
            .copied()
            .filter(|id| id.contains(&format!("-{k}-")))
            .collect();
        assert_eq!(delivered, published, "key {k} out of order");
    }
}
