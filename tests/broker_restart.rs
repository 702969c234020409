//! RabbitMQ stops and starts again while publishers keep publishing: every message whose
//! `publish` returned Ok is in the queue afterwards. Its own test binary, because it takes
//! the broker away from every other test for a few seconds; it needs root (`rabbitmqctl`).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use lapin::options::BasicConsumeOptions;
use tokio::time::Instant;
use weir::data::broker::{AMQPValue, Broker, BrokerError, FieldTable, OutMessage, to_message};
use weir::data::event::{CloudEvent, Data, ExtValue};
use weir::topology::QueueType;

fn url() -> String {
    std::env::var("WEIR_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

fn unique(what: &str) -> String {
    format!(
        "test.broker-restart.{what}.{}",
        uuid::Uuid::now_v7().simple()
    )
}

fn message(id: String) -> OutMessage {
    to_message(&CloudEvent {
        id,
        source: "/tests/broker-restart".into(),
        ty: "restart.test".into(),
        datacontenttype: Some("application/json".into()),
        dataschema: None,
        subject: None,
        time: None,
        extensions: BTreeMap::from([("weirposition".into(), ExtValue::String("1".into()))]),
        data: Some(Data::Json(Bytes::from_static(b"{}"))),
    })
}

fn rabbitmqctl(args: &[&str]) {
    let status = std::process::Command::new("rabbitmqctl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("rabbitmqctl runs (the test needs root on the broker's machine)");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

/// Stops the RabbitMQ application and makes sure it is started again, even when the test
/// fails half-way.
struct Stopped {
    started: bool,
}

impl Stopped {
    async fn stop() -> Stopped {
        tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"]))
            .await
            .unwrap();
        Stopped { started: false }
    }

    async fn start(mut self) {
        tokio::task::spawn_blocking(|| rabbitmqctl(&["start_app"]))
            .await
            .unwrap();
        self.started = true;
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if !self.started {
            rabbitmqctl(&["start_app"]);
        }
    }
}

/// Several test binaries restart RabbitMQ; a lock file keeps them from doing it at the
/// same time.
fn restart_lock() -> std::fs::File {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("weir-rabbitmq-restart.lock"))
        .unwrap();
    file.lock().unwrap();
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_restart_loses_no_confirmed_message() {
    let _lock = restart_lock();
    let broker = Broker::with_name(url(), &unique("conn"));
    let exchange = unique("x");
    let queue = unique("q");
    broker.declare_exchange(&exchange).await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongInt(600_000));
    broker
        .declare_queue(&queue, QueueType::Quorum, args)
        .await
        .unwrap();
    broker.bind_queue(&queue, &exchange, "#").await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let restarted = Arc::new(AtomicBool::new(false));
    let ok_after_restart = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for caller in 0..4 {
        let broker = broker.clone();
        let exchange = exchange.clone();
        let (stop, restarted) = (stop.clone(), restarted.clone());
        let (ok_after_restart, failures) = (ok_after_restart.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            let mut confirmed = Vec::new();
            let mut call = 0;
            while !stop.load(Ordering::Relaxed) {
                let msgs: Vec<OutMessage> = (0..20)
                    .map(|k| message(format!("{caller}-{call}-{k}")))
                    .collect();
                let deadline = Instant::now() + Duration::from_secs(2);
                match broker.publish(&exchange, &msgs, deadline).await {
                    Ok(_) => {
                        confirmed.extend(msgs.into_iter().map(|m| m.message_id));
                        if restarted.load(Ordering::Relaxed) {
                            ok_after_restart.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        // What the HTTP layer answers with 503 + Retry-After.
                        assert!(matches!(e, BrokerError::Unavailable(_)), "{e}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                call += 1;
            }
            confirmed
        }));
    }

    tokio::time::sleep(Duration::from_millis(1000)).await;
    let stopped = Stopped::stop().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!broker.healthy().await);
    stopped.start().await;
    restarted.store(true, Ordering::Relaxed);

    // The publishers recover by themselves (backoff is capped at 5 s).
    let waited = Instant::now();
    while ok_after_restart.load(Ordering::Relaxed) < 8 {
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "no publish succeeded after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut confirmed = Vec::new();
    for t in tasks {
        confirmed.extend(t.await.unwrap());
    }
    assert!(
        failures.load(Ordering::Relaxed) > 0,
        "the outage was seen by the publishers"
    );
    assert!(broker.healthy().await);

    // Everything in the queue, by message id.
    let count = broker.queue_counts(&queue).await.unwrap().unwrap().messages as usize;
    let ch = broker.open_channel().await.unwrap();
    let options = BasicConsumeOptions {
        no_ack: true,
        ..BasicConsumeOptions::default()
    };
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            options,
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut in_queue = HashSet::with_capacity(count);
    for _ in 0..count {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a delivery within 10 s")
            .expect("consumer open")
            .unwrap();
        if let Some(id) = d.properties.message_id() {
            in_queue.insert(id.to_string());
        }
    }
    let missing: Vec<&String> = confirmed
        .iter()
        .filter(|id| !in_queue.contains(*id))
        .collect();
    eprintln!(
        "{} messages confirmed, {count} in the queue, {} failed calls",
        confirmed.len(),
        failures.load(Ordering::Relaxed)
    );
    assert!(
        missing.is_empty(),
        "{} confirmed messages missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    drop(ch);
    broker.delete_queue(&queue).await.unwrap();
    broker.delete_exchange(&exchange).await.unwrap();
}
