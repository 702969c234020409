//! RabbitMQ restarted while publishers write to a broker-only stream: every event answered
//! 202 is in the bound queue afterwards. Its own test binary, because it stops the broker
//! that other tests use.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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
