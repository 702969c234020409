//! The RabbitMQ layer against a real RabbitMQ (`WEIR_TEST_AMQP_URL`, default the local
//! broker). Every test uses its own exchange and queues and deletes them at the end.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use lapin::options::BasicConsumeOptions;
use tokio::time::Instant;
use weir::data::broker::{
    AMQPValue, Broker, BrokerError, FieldTable, OutMessage, QueueCounts, Routing, from_properties,
    to_message,
};
use weir::data::event::{CloudEvent, Data, ExtValue};
use weir::topology::QueueType;

fn url() -> String {
    std::env::var("WEIR_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

fn unique(what: &str) -> String {
    format!("test.broker.{what}.{}", uuid::Uuid::now_v7().simple())
}

/// Queues left behind by a failed test disappear after ten minutes unused.
fn expiring() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongInt(600_000));
    args
}

fn deadline(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

/// An exchange with one quorum queue bound to `pattern`.
struct Setup {
    broker: Broker,
    /// The connection name RabbitMQ shows for `broker`.
    name: String,
    exchange: String,
    queue: String,
}

impl Setup {
    async fn new(what: &str, pattern: &str) -> Setup {
        let name = unique(what);
        let broker = Broker::with_name(url(), &name);
        let exchange = unique(what);
        let queue = unique(what);
        broker.declare_exchange(&exchange).await.unwrap();
        broker
            .declare_queue(&queue, QueueType::Quorum, expiring())
            .await
            .unwrap();
        broker.bind_queue(&queue, &exchange, pattern).await.unwrap();
        Setup {
            broker,
            name,
            exchange,
            queue,
        }
    }

    async fn cleanup(self) {
        self.broker.delete_queue(&self.queue).await.unwrap();
        self.broker.delete_exchange(&self.exchange).await.unwrap();
    }
}

/// Every message in `queue` (consumed and acknowledged automatically).
async fn drain(broker: &Broker, queue: &str) -> Vec<lapin::message::Delivery> {
    let count = broker.queue_counts(queue).await.unwrap().unwrap().messages as usize;
    let ch = broker.open_channel().await.unwrap();
    let options = BasicConsumeOptions {
        no_ack: true,
        ..BasicConsumeOptions::default()
    };
    let mut consumer = ch
        .basic_consume(queue.into(), "".into(), options, FieldTable::default())
        .await
        .unwrap();
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let next = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a delivery within 10 s");
        out.push(next.expect("consumer open").unwrap());
    }
    out
}

fn event(i: usize, ty: &str, data: Option<Data>, ct: Option<&str>) -> CloudEvent {
    CloudEvent {
        id: format!("id-{i}"),
        source: "/tests/broker".into(),
        ty: ty.into(),
        datacontenttype: ct.map(str::to_string),
        dataschema: None,
        subject: Some(format!("subject-{}", i % 7)),
        time: Some("2024-05-01T10:00:00.5Z".into()),
        extensions: BTreeMap::from([
            ("weirposition".into(), ExtValue::String(i.to_string())),
            ("weirversion".into(), ExtValue::String("1".into())),
            (
                "weirrecordedtime".into(),
                ExtValue::String("2024-05-01T10:00:01.000000Z".into()),
            ),
            ("vip".into(), ExtValue::Bool(i.is_multiple_of(2))),
            ("priority".into(), ExtValue::Integer(i as i64)),
        ]),
        data,
    }
}

fn json_event(i: usize, ty: &str) -> CloudEvent {
    let data = Bytes::from(format!("{{\"n\": {i}}}"));
    event(i, ty, Some(Data::Json(data)), Some("application/json"))
}

fn position(d: &lapin::message::Delivery) -> usize {
    let ev = from_properties(&d.properties, &d.data).unwrap();
    ev.extension_str("weirposition").unwrap().parse().unwrap()
}

#[tokio::test]
async fn confirmed_publish_reaches_a_bound_quorum_queue_intact() {
    let s = Setup::new("intact", "order.#").await;
    let events = vec![
        json_event(1, "order.created"),
        event(
            2,
            "order.note",
            Some(Data::Text(Bytes::from_static("ünïcode text".as_bytes()))),
            Some("text/plain; charset=utf-8"),
        ),
        event(
            3,
            "order.blob",
            Some(Data::Binary(Bytes::from_static(&[0, 1, 2, 255, 254]))),
            Some("application/octet-stream"),
        ),
        event(4, "order.empty", None, None),
    ];
    let msgs: Vec<OutMessage> = events.iter().map(to_message).collect();
    let routing = s
        .broker
        .publish(&s.exchange, &msgs, deadline(10))
        .await
        .unwrap();
    assert_eq!(routing, vec![Routing::Routed; 4]);
    assert!(s.broker.healthy().await);

    let got = drain(&s.broker, &s.queue).await;
    assert_eq!(got.len(), 4);
    for (d, ev) in got.iter().zip(&events) {
        assert_eq!(d.routing_key.as_str(), ev.ty);
        assert_eq!(*d.properties.delivery_mode(), Some(2), "persistent");
        assert_eq!(
            d.properties.message_id().as_ref().map(|s| s.as_str()),
            Some(ev.id.as_str())
        );
        let headers = d.properties.headers().as_ref().unwrap().inner();
        for h in [
            "cloudEvents:specversion",
            "cloudEvents:id",
            "cloudEvents:source",
            "cloudEvents:type",
            "cloudEvents:subject",
            "cloudEvents:time",
            "cloudEvents:weirposition",
            "cloudEvents:weirversion",
            "cloudEvents:weirrecordedtime",
        ] {
            assert!(headers.contains_key(h), "{h} missing");
        }
        assert_eq!(
            headers.get("cloudEvents:vip"),
            Some(&AMQPValue::Boolean(
                ev.extensions["vip"] == ExtValue::Bool(true)
            ))
        );
        // The whole event, data kind included, comes back as it was published.
        assert_eq!(&from_properties(&d.properties, &d.data).unwrap(), ev);
    }
    s.cleanup().await;
}

#[tokio::test]
async fn a_message_no_queue_takes_is_reported_unroutable() {
    let s = Setup::new("unroutable", "order.#").await;
    let msgs: Vec<OutMessage> = (0..4)
        .map(|i| {
            let ty = if i % 2 == 0 {
                "order.created"
            } else {
                "invoice.sent"
            };
            to_message(&json_event(i, ty))
        })
        .collect();
    let routing = s
        .broker
        .publish(&s.exchange, &msgs, deadline(10))
        .await
        .unwrap();
    assert_eq!(
        routing,
        vec![
            Routing::Routed,
            Routing::Unroutable,
            Routing::Routed,
            Routing::Unroutable
        ]
    );

    // Many of each, interleaved in one call: confirms of routed (quorum, later) and
    // unroutable (at once) messages complete out of order and are acknowledged in bulk,
    // yet every message gets its own answer.
    let pattern = |i: usize| i % 3 == 1 || (i / 50) % 2 == 1;
    let msgs: Vec<OutMessage> = (0..2000)
        .map(|i| {
            let ty = if pattern(i) {
                "invoice.sent"
            } else {
                "order.created"
            };
            to_message(&json_event(i, ty))
        })
        .collect();
    let routing = s
        .broker
        .publish(&s.exchange, &msgs, deadline(30))
        .await
        .unwrap();
    let expected: Vec<Routing> = (0..2000)
        .map(|i| {
            if pattern(i) {
                Routing::Unroutable
            } else {
                Routing::Routed
            }
        })
        .collect();
    assert_eq!(routing, expected);
    let routed = expected.iter().filter(|r| **r == Routing::Routed).count();
    let counts = s.broker.queue_counts(&s.queue).await.unwrap().unwrap();
    assert_eq!(counts.messages as usize, routed + 2);
    s.cleanup().await;
}

#[tokio::test]
async fn one_call_of_5000_messages_keeps_its_order() {
    let s = Setup::new("order", "#").await;
    let msgs: Vec<OutMessage> = (1..=5000)
        .map(|i| to_message(&json_event(i, "order.created")))
        .collect();
    let routing = s
        .broker
        .publish(&s.exchange, &msgs, deadline(60))
        .await
        .unwrap();
    assert_eq!(routing.len(), 5000);
    assert!(routing.iter().all(|r| *r == Routing::Routed));
    let got: Vec<usize> = drain(&s.broker, &s.queue)
        .await
        .iter()
        .map(position)
        .collect();
    assert_eq!(got, (1..=5000).collect::<Vec<_>>());
    s.cleanup().await;
}

#[tokio::test]
async fn concurrent_callers_each_get_all_their_messages_confirmed_in_order() {
    let s = Setup::new("concurrent", "#").await;
    // 12 callers × 40 calls × 25 messages; each caller's messages carry increasing
    // positions in their own range, so per-caller order can be checked in the queue.
    let mut tasks = Vec::new();
    for caller in 0..12usize {
        let broker = s.broker.clone();
        let exchange = s.exchange.clone();
        tasks.push(tokio::spawn(async move {
            for call in 0..40usize {
                let msgs: Vec<OutMessage> = (0..25)
                    .map(|k| to_message(&json_event(caller * 100_000 + call * 25 + k, "t")))
                    .collect();
                let r = broker
                    .publish(&exchange, &msgs, deadline(30))
                    .await
                    .unwrap();
                assert_eq!(r, vec![Routing::Routed; 25]);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let got = drain(&s.broker, &s.queue).await;
    assert_eq!(got.len(), 12 * 40 * 25);
    let mut last = [None::<usize>; 12];
    for p in got.iter().map(position) {
        let caller = p / 100_000;
        assert!(
            last[caller].is_none_or(|l| l < p),
            "caller {caller} out of order at {p}"
        );
        last[caller] = Some(p);
    }
    s.cleanup().await;
}

#[tokio::test]
async fn a_nack_is_reported_as_nacked() {
    let broker = Broker::with_name(url(), &unique("nack"));
    let exchange = unique("nack");
    let queue = unique("nack");
    broker.declare_exchange(&exchange).await.unwrap();
    // A classic queue that holds one message and refuses more with a nack.
    let mut args = expiring();
    args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    broker
        .declare_queue(&queue, QueueType::Classic, args)
        .await
        .unwrap();
    broker.bind_queue(&queue, &exchange, "#").await.unwrap();
    let msgs: Vec<OutMessage> = (0..3).map(|i| to_message(&json_event(i, "t"))).collect();
    let err = broker
        .publish(&exchange, &msgs, deadline(10))
        .await
        .unwrap_err();
    assert_eq!(err, BrokerError::Nacked { count: 2 });
    assert!(err.is_transient());
    // The broker handle keeps working after a nack.
    broker.delete_queue(&queue).await.unwrap();
    let r = broker
        .publish(&exchange, &msgs[..1], deadline(10))
        .await
        .unwrap();
    assert_eq!(r, vec![Routing::Unroutable]);
    broker.delete_exchange(&exchange).await.unwrap();
}

#[tokio::test]
async fn a_missing_exchange_fails_its_own_call_only() {
    let s = Setup::new("missing", "#").await;
    let missing = unique("missing-exchange");
    let msgs: Vec<OutMessage> = (0..50).map(|i| to_message(&json_event(i, "t"))).collect();
    // Calls to a missing exchange and to a good one, at the same time (they may share a
    // channel and a round).
    let (bad, good) = tokio::join!(
        s.broker.publish(&missing, &msgs, deadline(10)),
        s.broker.publish(&s.exchange, &msgs, deadline(10)),
    );
    match bad {
        Err(BrokerError::Protocol { code: 404, .. }) => {}
        other => panic!("expected 404, got {other:?}"),
    }
    assert_eq!(good.unwrap(), vec![Routing::Routed; 50]);
    // Several calls in a row, so that some worker reuses a channel closed by the error.
    for _ in 0..8 {
        let r = s
            .broker
            .publish(&s.exchange, &msgs, deadline(10))
            .await
            .unwrap();
        assert_eq!(r.len(), 50);
    }
    s.cleanup().await;
}

#[tokio::test]
async fn topology_operations_are_idempotent() {
    let broker = Broker::with_name(url(), &unique("topology"));
    let exchange = unique("topology");
    let queue = unique("topology");
    broker.declare_exchange(&exchange).await.unwrap();
    broker.declare_exchange(&exchange).await.unwrap();
    assert_eq!(broker.queue_counts(&queue).await.unwrap(), None);
    broker
        .declare_queue(&queue, QueueType::Quorum, expiring())
        .await
        .unwrap();
    broker
        .declare_queue(&queue, QueueType::Quorum, expiring())
        .await
        .unwrap();
    // The same name with another type is refused, and says so.
    let err = broker
        .declare_queue(&queue, QueueType::Classic, expiring())
        .await
        .unwrap_err();
    assert!(
        matches!(err, BrokerError::Protocol { code: 406, .. }),
        "{err}"
    );
    assert!(!err.is_transient());
    broker.bind_queue(&queue, &exchange, "a.*").await.unwrap();
    broker.bind_queue(&queue, &exchange, "a.*").await.unwrap();
    assert_eq!(
        broker.queue_counts(&queue).await.unwrap(),
        Some(QueueCounts {
            messages: 0,
            consumers: 0
        })
    );
    let r = broker
        .publish(
            &exchange,
            &[to_message(&json_event(1, "a.b"))],
            deadline(10),
        )
        .await
        .unwrap();
    assert_eq!(r, vec![Routing::Routed]);
    assert_eq!(
        broker
            .queue_counts(&queue)
            .await
            .unwrap()
            .map(|c| c.messages),
        Some(1)
    );
    broker.unbind_queue(&queue, &exchange, "a.*").await.unwrap();
    broker.unbind_queue(&queue, &exchange, "a.*").await.unwrap();
    broker.delete_queue(&queue).await.unwrap();
    broker.delete_queue(&queue).await.unwrap();
    assert_eq!(broker.queue_counts(&queue).await.unwrap(), None);
    broker.delete_exchange(&exchange).await.unwrap();
    broker.delete_exchange(&exchange).await.unwrap();
    let err = broker.declare_exchange(&"x".repeat(300)).await.unwrap_err();
    assert!(matches!(err, BrokerError::InvalidName { .. }), "{err}");
}

#[tokio::test]
async fn an_unreachable_broker_is_unavailable_by_the_deadline() {
    // Nothing listens on port 1.
    let broker = Broker::new("amqp://guest:guest@127.0.0.1:1/%2f".into());
    let started = Instant::now();
    let msgs = [to_message(&json_event(1, "t"))];
    let err = broker
        .publish("x", &msgs, Instant::now() + Duration::from_millis(600))
        .await
        .unwrap_err();
    assert!(matches!(err, BrokerError::Unavailable(_)), "{err}");
    assert!(
        err.to_string().contains("connect"),
        "the cause is named: {err}"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(590) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert!(broker.check().await.unwrap_err().is_transient());
    assert!(!broker.healthy().await);

    let bad = Broker::new("nonsense".into());
    let err = bad.publish("x", &msgs, deadline(5)).await.unwrap_err();
    assert!(matches!(err, BrokerError::InvalidUrl(_)), "{err}");
}

#[tokio::test]
async fn a_killed_connection_is_replaced_and_unconfirmed_messages_are_sent_again() {
    let s = Setup::new("killed", "#").await;
    s.broker.check().await.unwrap();

    // Publishers keep going while the connection is closed under them by the broker.
    let stop = Arc::new(AtomicBool::new(false));
    let closed = Arc::new(AtomicBool::new(false));
    let calls_after_close = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for caller in 0..4usize {
        let broker = s.broker.clone();
        let exchange = s.exchange.clone();
        let (stop, closed) = (stop.clone(), closed.clone());
        let calls_after_close = calls_after_close.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = Vec::new();
            let mut call = 0;
            while !stop.load(Ordering::Relaxed) {
                let msgs: Vec<OutMessage> = (0..50)
                    .map(|k| to_message(&json_event(caller * 1_000_000 + call * 50 + k, "t")))
                    .collect();
                // The deadline leaves room for reconnecting: every call must succeed.
                broker
                    .publish(&exchange, &msgs, deadline(20))
                    .await
                    .unwrap();
                ok.extend(msgs.iter().map(|m| m.message_id.clone()));
                if closed.load(Ordering::Relaxed) {
                    calls_after_close.fetch_add(1, Ordering::Relaxed);
                }
                call += 1;
            }
            ok
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    close_connection(&s.name).await;
    closed.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);

    let mut confirmed = Vec::new();
    for t in tasks {
        confirmed.extend(t.await.unwrap());
    }
    assert!(calls_after_close.load(Ordering::Relaxed) > 0);
    assert!(s.broker.healthy().await, "reconnected by itself");
    let delivered: Vec<String> = drain(&s.broker, &s.queue)
        .await
        .iter()
        .filter_map(|d| d.properties.message_id().as_ref().map(|m| m.to_string()))
        .collect();
    let ids: std::collections::HashSet<&String> = delivered.iter().collect();
    eprintln!(
        "{} confirmed, {} in the queue ({} distinct)",
        confirmed.len(),
        delivered.len(),
        ids.len()
    );
    let missing: Vec<&String> = confirmed.iter().filter(|id| !ids.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "{} confirmed messages missing",
        missing.len()
    );
    s.cleanup().await;
}

/// The defect underneath "one resource's broker error lands on another": lapin (4.12)
/// remembers the error of a channel the broker closed *by channel number* for the life of
/// the connection, and numbers channels from a sequence that wraps at `channel_max`. Once the
/// sequence wraps, a new channel under that number fails at once with the old channel's
/// error. `Link::channel` therefore never lets one connection open more than `channel_max`
/// channels. If this test fails, lapin changed that behaviour (the budget is then only a
/// precaution).
#[tokio::test]
async fn lapin_hands_a_reused_channel_number_the_error_of_its_closed_predecessor() {
    use lapin::options::QueueDeclareOptions;
    let conn = lapin::Connection::connect(&url(), Default::default())
        .await
        .unwrap();
    let max = conn.configuration().channel_max();
    assert!(max > 0 && max <= 4096, "channel_max {max}");
    let missing = unique("never-declared");
    let first = conn.create_channel().await.unwrap();
    let err = first
        .queue_declare(
            missing.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&missing), "{err}");
    let closed_number = first.id();
    drop(first);
    // Every other number once (each channel closed by us, which leaves no trace).
    let mut reused = None;
    for i in 1..=u32::from(max) {
        match conn.create_channel().await {
            Ok(ch) => {
                assert_ne!(ch.id(), closed_number, "number reused without the error");
                ch.close(200, "OK".into()).await.unwrap();
            }
            Err(e) => {
                reused = Some((i, e.to_string()));
                break;
            }
        }
    }
    let (after, text) = reused.expect("the sequence wrapped onto the closed number");
    assert_eq!(
        after,
        u32::from(max),
        "the number comes back after channel_max opens"
    );
    assert!(
        text.contains(&missing),
        "a new channel got the old channel's error: {text}"
    );
}

/// At scale, one worker's broker handle serves many resources at once: backlog samples whose
/// passive declares mostly find nothing (404), subscriptions declaring and binding, consumers
/// of queues that are gone, relays publishing. Thousands of refusals (more than a connection
/// has channel numbers) must not close or poison a channel anyone else uses, and every error
/// must be the one of the operation that got it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_stay_with_the_operation_that_caused_them() {
    use lapin::options::BasicConsumeOptions;
    let s = Setup::new("refusals", "#").await;
    // Just above the 2,047 channel numbers a RabbitMQ connection has by default. Not many
    // more: every refusal is two error lines in RabbitMQ's log, and a node flooded with them
    // stopped accepting connections on this machine (5,000 refusals in seconds did it).
    const MISSING: usize = 2_100;
    // Consumers of gone queues (on the data connection): enough to interleave with the rest.
    const GONE: usize = 200;
    let started = Instant::now();

    // Publishers all along: every call confirmed and routed.
    let stop = Arc::new(AtomicBool::new(false));
    let mut publishers = Vec::new();
    for caller in 0..3usize {
        let (broker, exchange, stop) = (s.broker.clone(), s.exchange.clone(), stop.clone());
        publishers.push(tokio::spawn(async move {
            let mut calls = 0usize;
            while !stop.load(Ordering::Relaxed) || calls == 0 {
                let msgs: Vec<OutMessage> = (0..20)
                    .map(|k| to_message(&json_event(caller * 1_000_000 + calls * 20 + k, "t")))
                    .collect();
                let r = broker.publish(&exchange, &msgs, deadline(30)).await;
                assert_eq!(
                    r.as_deref(),
                    Ok(&[Routing::Routed; 20][..]),
                    "publish call {calls} of caller {caller}"
                );
                calls += 1;
            }
            calls
        }));
    }

    // Passive declares of queues that do not exist (each a 404 closing its channel), with
    // declares and binds of other names in between, many at once.
    let mut ops = tokio::task::JoinSet::new();
    for i in 0..MISSING {
        let broker = s.broker.clone();
        let exchange = s.exchange.clone();
        ops.spawn(async move {
            let missing = unique("missing");
            assert_eq!(broker.queue_counts(&missing).await, Ok(None), "{missing}");
            match i % 10 {
                0 => {
                    // A bind of a missing queue: refused, and the refusal names that queue.
                    let gone = unique("gone");
                    let err = broker.bind_queue(&gone, &exchange, "x").await.unwrap_err();
                    assert!(
                        matches!(&err, BrokerError::Protocol { code: 404, text } if text.contains(&gone)),
                        "bind of {gone}: {err}"
                    );
                }
                5 => {
                    let q = unique("other");
                    broker.declare_queue(&q, QueueType::Classic, expiring()).await.unwrap();
                    broker.bind_queue(&q, &exchange, "nothing.matches").await.unwrap();
                    assert_eq!(
                        broker.queue_counts(&q).await.unwrap().map(|c| c.messages),
                        Some(0)
                    );
                    broker.delete_queue(&q).await.unwrap();
                }
                _ => {}
            }
        });
    }
    // Consumers of queues that are gone, on channels of their own (each a 404 on the data
    // connection, which carries the publishing channels): also more than one connection's
    // numbers.
    let mut consumers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let broker = s.broker.clone();
        consumers.spawn(async move {
            for _ in 0..(GONE / 4) {
                let gone = unique("consume-gone");
                let ch = broker.open_channel().await.unwrap();
                let err = ch
                    .basic_consume(
                        gone.as_str().into(),
                        "c".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .unwrap_err();
                assert!(err.to_string().contains(&gone), "consume of {gone}: {err}");
            }
        });
    }
    while let Some(r) = ops.join_next().await {
        r.unwrap();
    }
    while let Some(r) = consumers.join_next().await {
        r.unwrap();
    }
    // A call to a missing exchange closes a publishing channel: its own error, and the
    // publishing channel opened after it (on a data connection past its numbers) works.
    let missing_exchange = unique("missing-exchange");
    let one = [to_message(&json_event(1, "t"))];
    let err = s
        .broker
        .publish(&missing_exchange, &one, deadline(10))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BrokerError::Protocol { code: 404, text } if text.contains(&missing_exchange)),
        "{err}"
    );
    stop.store(true, Ordering::Relaxed);
    let mut calls = 0;
    for p in publishers {
        calls += p.await.unwrap();
    }
    for _ in 0..8 {
        let r = s.broker.publish(&s.exchange, &one, deadline(10)).await;
        assert_eq!(r, Ok(vec![Routing::Routed]));
    }
    eprintln!(
        "{MISSING} missing queues looked for and {GONE} gone queues consumed, \
         {calls} publish calls confirmed meanwhile, in {:?}",
        started.elapsed()
    );
    s.cleanup().await;
}

/// Asks RabbitMQ to close the data connection (publishing, consumers) of the handle named
/// `name` (the test runs as root on the broker's machine).
async fn close_connection(name: &str) {
    let name = name.to_string();
    tokio::task::spawn_blocking(move || {
        // One connection per line: its pid (as `close_connection` wants it), a tab, then
        // its client properties, which include the connection name.
        let out = std::process::Command::new("rabbitmqctl")
            .args(["list_connections", "pid", "client_properties", "-q"])
            .output()
            .expect("rabbitmqctl runs");
        let listing = String::from_utf8_lossy(&out.stdout);
        let pid = listing
            .lines()
            // The handle's topology connection is named "<name> (topology)": not that one.
            .find(|line| line.contains(&name) && !line.contains(&format!("{name} (topology)")))
            .and_then(|line| line.split('\t').next())
            .expect("our connection is listed")
            .to_string();
        let status = std::process::Command::new("rabbitmqctl")
            .args(["close_connection", &pid, "test closes the connection"])
            .status()
            .expect("rabbitmqctl runs");
        assert!(status.success());
    })
    .await
    .unwrap();
}

/// Not a correctness test: compares `Broker::publish` under many concurrent callers with a
/// plain lapin publisher keeping 200 confirms in flight, both to a quorum queue.
/// Run with `cargo test --test broker -- --ignored --nocapture throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput_against_a_raw_lapin_publisher() {
    const N: usize = 40_000;
    let s = Setup::new("throughput", "#").await;
    let msgs: Vec<OutMessage> = (0..N).map(|i| to_message(&json_event(i, "t"))).collect();

    // Raw lapin: one channel, a window of 200 confirms.
    let conn = lapin::Connection::connect(&url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let started = Instant::now();
    let mut window = std::collections::VecDeque::new();
    for m in &msgs {
        if window.len() >= 200 {
            let c: lapin::PublisherConfirm = window.pop_front().unwrap();
            assert!(c.await.unwrap().is_ack());
        }
        let props = lapin::BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(m.headers.clone())
            .with_message_id(m.message_id.as_str().into());
        let c = ch
            .basic_publish(
                s.exchange.as_str().into(),
                m.routing_key.as_str().into(),
                lapin::options::BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &m.body,
                props,
            )
            .await
            .unwrap();
        window.push_back(c);
    }
    for c in window {
        assert!(c.await.unwrap().is_ack());
    }
    let raw = N as f64 / started.elapsed().as_secs_f64();

    // Weir: 16 callers (batchers of several streams), calls of 50 messages.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for chunk in msgs.chunks(N / 16) {
        let broker = s.broker.clone();
        let exchange = s.exchange.clone();
        let chunk = chunk.to_vec();
        tasks.push(tokio::spawn(async move {
            for call in chunk.chunks(50) {
                broker.publish(&exchange, call, deadline(60)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let ours = N as f64 / started.elapsed().as_secs_f64();

    // A relay: one caller, pages of 1000 messages.
    let started = Instant::now();
    for page in msgs.chunks(1000) {
        s.broker
            .publish(&s.exchange, page, deadline(60))
            .await
            .unwrap();
    }
    let relay = N as f64 / started.elapsed().as_secs_f64();
    println!(
        "raw lapin: {raw:.0} msg/s; Broker::publish, 16 callers × 50: {ours:.0} msg/s ({:.0}%); \
         one caller × 1000: {relay:.0} msg/s ({:.0}%)",
        100.0 * ours / raw,
        100.0 * relay / raw
    );
    s.broker.delete_queue(&s.queue).await.unwrap();
    s.broker.delete_exchange(&s.exchange).await.unwrap();
    assert!(ours >= 0.7 * raw);
}
