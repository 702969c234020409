//! Subscriptions over several streams (`streams`, `streamSelector`): validation of the three
//! ways of naming streams, then real `weir run` processes on the real RabbitMQ and PostgreSQL:
//! both histories replayed merged by commit time and handed over to live events exactly once
//! with per-key order, and streams bound (their history replayed) and unbound live as their
//! labels change.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::recording::{EventKey, Got, RecordingSink, tally};
use common::*;
use serde_json::{Value, json};
use weir::topology::{Defaults, Key, Kind, Reason, build};

// ---------------------------------------------------------------------------------------------
// Validation

const SECRETS: &str = "apiVersion: v1\nkind: Secret\nmetadata: {name: rabbitmq, namespace: shop}\n\
stringData: {url: \"amqp://guest:guest@127.0.0.1:5672/%2f\"}\n---\n\
apiVersion: v1\nkind: Secret\nmetadata: {name: far, namespace: shop}\n\
stringData: {url: \"amqp://guest:guest@10.0.0.9:5672/%2f\"}\n---\n\
apiVersion: v1\nkind: Secret\nmetadata: {name: pg, namespace: shop}\n\
stringData: {url: \"postgres://a@db:5432/events\"}\n---\n";

/// An EventStream of namespace `shop` on the broker of Secret `broker`, with a store unless
/// `bare`, labelled `tier: gold` if `gold`.
fn shop_stream(name: &str, broker: &str, bare: bool, gold: bool) -> String {
    let labels = if gold { ", labels: {tier: gold}" } else { "" };
    let store = if bare {
        ""
    } else {
        "  store: {urlSecretRef: {name: pg, key: url}}\n"
    };
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: {name}, namespace: shop{labels}}}\n\
         spec:\n  broker: {{urlSecretRef: {{name: {broker}, key: url}}}}\n{store}---\n"
    )
}

fn shop_sub(name: &str, selection: &str) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec:\n{selection}  sink: {{uri: \"http://sink.example/\"}}\n---\n"
    )
}

#[track_caller]
fn assert_problem(
    built: &weir::topology::Built,
    sub: &str,
    path: &str,
    reason: Reason,
    needle: &str,
) {
    let report = built
        .report(Kind::Subscription, &Key::new("shop", sub))
        .unwrap_or_else(|| panic!("no report for {sub}"));
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.path == path && p.reason == reason && p.message.contains(needle)),
        "{sub}: expected {reason:?} at {path} containing {needle:?}, got {:#?}",
        report.problems
    );
}

#[test]
fn the_ways_of_naming_streams_are_checked_with_clear_messages() {
    let mut yaml = SECRETS.to_string();
    yaml += &shop_stream("a", "rabbitmq", false, true);
    yaml += &shop_stream("b", "rabbitmq", false, true);
    yaml += &shop_stream("far", "far", false, false);
    yaml += &shop_stream("bare", "rabbitmq", true, false);
    // Selected by `tier: gold` but invalid (its broker Secret is missing): left out.
    yaml += &shop_stream("broken", "missing", false, true);
    yaml += &shop_sub("both", "  stream: a\n  streams: [a, b]\n");
    yaml += &shop_sub("none", "");
    yaml += &shop_sub("empty", "  streams: []\n");
    yaml += &shop_sub("unknown", "  streams: [a, nope]\n");
    yaml += &shop_sub("twice", "  streams: [a, a]\n");
    yaml += &shop_sub("mixed", "  streams: [a, far]\n");
    yaml += &shop_sub("unstored", "  streams: [a, bare]\n  startFrom: earliest\n");
    yaml += &shop_sub(
        "nomatch",
        "  streamSelector: {matchLabels: {tier: platinum}}\n",
    );
    yaml += &shop_sub(
        "badsel",
        "  streamSelector: {matchExpressions: [{key: tier, operator: Near, values: [x]}]}\n",
    );
    yaml += &shop_sub("gold", "  streamSelector: {matchLabels: {tier: gold}}\n");
    yaml += &shop_sub("pair", "  streams: [b, a]\n  startFrom: earliest\n");
    yaml += &shop_sub("live", "  streams: [a, bare]\n");
    let built = build(&index_from_yaml(&yaml), &Defaults::default());

    let exactly_one = "either stream, or streams and/or streamSelector must be set";
    assert_problem(&built, "both", "spec", Reason::InvalidSpec, exactly_one);
    assert_problem(&built, "none", "spec", Reason::InvalidSpec, exactly_one);
    assert_problem(
        &built,
        "empty",
        "spec.streams",
        Reason::InvalidSpec,
        "must name at least one EventStream",
    );
    assert_problem(
        &built,
        "unknown",
        "spec.streams[1]",
        Reason::StreamNotFound,
        "EventStream shop/nope not found",
    );
    assert_problem(
        &built,
        "twice",
        "spec.streams[1]",
        Reason::InvalidSpec,
        "EventStream shop/a is listed twice",
    );
    assert_problem(
        &built,
        "mixed",
        "spec.streams[1]",
        Reason::InvalidSpec,
        "EventStream shop/far is on another broker than shop/a",
    );
    assert_problem(
        &built,
        "unstored",
        "spec.startFrom",
        Reason::InvalidSpec,
        "EventStream shop/bare has no store",
    );
    assert_problem(
        &built,
        "nomatch",
        "spec.streamSelector",
        Reason::StreamNotFound,
        "selects no valid EventStream of namespace shop",
    );
    assert_problem(
        &built,
        "badsel",
        "spec.streamSelector",
        Reason::InvalidSpec,
        "invalid label selector",
    );

    let plan = |name: &str| {
        built
            .topology
            .subscriptions
            .get(&Key::new("shop", name))
            .unwrap_or_else(|| panic!("{name} is valid: {:#?}", built.reports))
            .clone()
    };
    let keys = |names: &[&str]| {
        names
            .iter()
            .map(|n| Key::new("shop", *n))
            .collect::<Vec<_>>()
    };
    let gold = plan("gold");
    assert!(gold.multi);
    assert_eq!(gold.streams, keys(&["a", "b"]), "broken is left out");
    // Sorted whatever the order written.
    assert_eq!(plan("pair").streams, keys(&["a", "b"]));
    // A broker-only stream is fine when nothing is replayed.
    assert_eq!(plan("live").streams, keys(&["a", "bare"]));
    assert_eq!(
        weir::data::delivery::Names::new(&gold).queue,
        "weir.shop._.gold"
    );
}

// ---------------------------------------------------------------------------------------------
// Delivery

/// A stream of namespace `test` with a store, labelled `tier: gold` if `gold`.
fn test_stream(name: &str, exchange: &str, gold: bool) -> String {
    let yaml = stream_yaml(name, exchange, "");
    if gold {
        yaml.replace(
            &format!("{{name: {name}, namespace: test}}"),
            &format!("{{name: {name}, namespace: test, labels: {{tier: gold}}}}"),
        )
    } else {
        yaml
    }
}

fn test_sub(name: &str, sink: &str, spec: &str) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: {name}, namespace: test}}\n\
         spec:\n  sink: {{uri: \"{sink}\"}}\n{spec}"
    )
}

/// Publishes `n` events to `stream`, ids `<stream>-<tag>-<i>`, subjects over 10 keys.
async fn publish(weir: &Weir, stream: &str, tag: &str, n: usize) -> Vec<EventKey> {
    let evs: Vec<Value> = (0..n)
        .map(|i| {
            json!({"type": "order.created", "id": format!("{stream}-{tag}-{i}"),
                   "subject": format!("key-{}", i % 10), "data": {"n": i}})
        })
        .collect();
    let r = http()
        .post(weir.events_url("test", stream))
        .json(&evs)
        .send()
        .await
        .expect("publish");
    assert_eq!(r.status().as_u16(), 201, "{:?}", r.text().await);
    evs.iter()
        .map(|e| {
            (
                stream.to_string(),
                e["id"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Waits until every one of `expected` was received (by stream and id).
async fn wait_received(sink: &RecordingSink, expected: &BTreeSet<EventKey>, weir: &Weir) {
    eventually(
        120,
        "every expected event delivered",
        || weir.log_text(),
        || async { sink.received_all(expected).then_some(()) },
    )
    .await;
}

/// The streams the subscription's status lists.
async fn status_streams(weir: &Weir, sub: &str) -> Value {
    subscription_status(weir, sub).await["fields"]["streams"].clone()
}

/// A subscription `spec` (its streams and options) delivering to a new recording sink,
/// written as `sub.yaml`; answers the sink and the subscription's name.
async fn subscribe(m: &Manifests, spec: &str) -> (RecordingSink, String) {
    let sink = RecordingSink::start().await;
    let sub = unique("s");
    m.write("sub.yaml", &test_sub(&sub, &sink.url, spec));
    (sink, sub)
}

/// Waits until the subscription's `status.streams` is `streams`.
async fn wait_streams(weir: &Weir, sub: &str, streams: Value) {
    let what = format!("subscription {sub} reading {streams}");
    eventually(
        60,
        &what,
        || weir.log_text(),
        || async { (status_streams(weir, sub).await == streams).then_some(()) },
    )
    .await;
}

/// After a quiet moment: every expected event arrived exactly once and nothing else did,
/// `silenced` (published to a stream after it stopped being read) included.
async fn assert_exactly_once(
    sink: &RecordingSink,
    expected: &BTreeSet<EventKey>,
    silenced: &[EventKey],
) -> Vec<Got> {
    // Anything late (a duplicate) shows up within this.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = sink.got();
    let (lost, duplicated, unexpected) = tally(&got, expected);
    let late = got
        .iter()
        .filter(|g| silenced.contains(&(g.stream.clone(), g.id.clone())))
        .count();
    assert_eq!(
        (lost, duplicated, unexpected),
        (0, 0, 0),
        "(lost, duplicated, unexpected); {late} delivered after their stream stopped being read"
    );
    got
}

/// Events of one key of one stream arrived in position order; answers how many such keys.
fn assert_key_order(got: &[Got]) -> usize {
    let mut per_key: BTreeMap<(String, String), Vec<i64>> = BTreeMap::new();
    for g in got {
        per_key
            .entry((g.stream.clone(), g.subject.clone()))
            .or_default()
            .push(g.position);
    }
    for (k, v) in &per_key {
        assert!(
            v.windows(2).all(|w| w[0] < w[1]),
            "{k:?} out of order: {v:?}"
        );
    }
    per_key.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_streams_replay_merged_by_commit_time_then_live_exactly_once_in_key_order() {
    let db = fresh_database().await;
    let m = Manifests::new(&db);
    m.write("a.yaml", &test_stream("a", &unique("weir.test.a."), false));
    m.write("b.yaml", &test_stream("b", &unique("weir.test.b."), false));
    let mut weir = Weir::start(m.path());
    weir.wait_ready("test", "a").await;
    weir.wait_ready("test", "b").await;
    // Histories written in turns, so that commit times interleave across the streams.
    let mut expected = BTreeSet::new();
    for r in 0..6 {
        expected.extend(publish(&weir, "a", &format!("h{r}"), 50).await);
        expected.extend(publish(&weir, "b", &format!("h{r}"), 50).await);
    }
    let (sink, sub) = subscribe(
        &m,
        "  streams: [b, a]\n  startFrom: earliest\n  ordering: perKey\n  partitions: 4\n",
    )
    .await;
    // Live events while the replay runs.
    for r in 0..10 {
        expected.extend(publish(&weir, "a", &format!("l{r}"), 20).await);
        expected.extend(publish(&weir, "b", &format!("l{r}"), 20).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(expected.len(), 1000);
    wait_received(&sink, &expected, &weir).await;
    let got = assert_exactly_once(&sink, &expected, &[]).await;
    // Each event names its stream, and events of one key of one stream came in position order.
    for g in &got {
        assert!(g.id.starts_with(&format!("{}-", g.stream)), "{g:?}");
    }
    assert_eq!(assert_key_order(&got), 20);
    // The histories were replayed merged by commit time (perKey replays one at a time).
    let history: Vec<&Got> = got.iter().filter(|g| g.id.contains("-h")).collect();
    assert_eq!(history.len(), 600);
    assert!(
        history.windows(2).all(|w| w[0].recorded <= w[1].recorded),
        "history not in commit-time order"
    );
    let first_b = history.iter().position(|g| g.stream == "b");
    let last_a = history.iter().rposition(|g| g.stream == "a");
    assert!(first_b < last_a, "the two histories interleave");

    let st = wait_subscription(&weir, &sub).await;
    assert_eq!(st["fields"]["streams"], json!(["a", "b"]), "{st}");
    assert_eq!(
        st["fields"]["queue"],
        format!("weir.test._.{sub}.intake"),
        "{st}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_labelled_later_is_replayed_and_one_unlabelled_stops_arriving() {
    let db = fresh_database().await;
    let m = Manifests::new(&db);
    let (xa, xb) = (unique("weir.test.a."), unique("weir.test.b."));
    m.write("a.yaml", &test_stream("a", &xa, true));
    m.write("b.yaml", &test_stream("b", &xb, false));
    // At info, the log says when a subscription starts and when its streams change.
    let mut weir = Weir::start_with(
        m.path(),
        &[("RUST_LOG", "warn,weir=info,lapin::channel=off")],
    );
    weir.wait_ready("test", "a").await;
    weir.wait_ready("test", "b").await;
    let mut expected = BTreeSet::new();
    expected.extend(publish(&weir, "a", "h", 100).await);
    // b's history: delivered only once b is selected (startFrom earliest covers it).
    let b_history = publish(&weir, "b", "h", 100).await;

    let (sink, sub) = subscribe(
        &m,
        "  streamSelector: {matchLabels: {tier: gold}}\n  startFrom: earliest\n",
    )
    .await;
    wait_subscription(&weir, &sub).await;
    assert_eq!(status_streams(&weir, &sub).await, json!(["a"]));
    expected.extend(publish(&weir, "a", "l1", 50).await);
    wait_received(&sink, &expected, &weir).await;
    assert!(
        sink.got().iter().all(|g| g.stream == "a"),
        "nothing of b before it is selected"
    );
    let b_before = publish(&weir, "b", "l1", 50).await;

    // b gains the label: bound live, its whole history replayed while a goes on.
    m.write("b.yaml", &test_stream("b", &xb, true));
    wait_streams(&weir, &sub, json!(["a", "b"])).await;
    expected.extend(b_history);
    expected.extend(b_before);
    for r in 0..5 {
        expected.extend(publish(&weir, "a", &format!("l2{r}"), 20).await);
        expected.extend(publish(&weir, "b", &format!("l2{r}"), 20).await);
    }
    wait_received(&sink, &expected, &weir).await;

    // a loses the label: unbound; what is published to it afterwards never arrives.
    m.write("a.yaml", &test_stream("a", &xa, false));
    wait_streams(&weir, &sub, json!(["b"])).await;
    let a_after = publish(&weir, "a", "l3", 50).await;
    expected.extend(publish(&weir, "b", "l3", 50).await);
    wait_received(&sink, &expected, &weir).await;
    assert_exactly_once(&sink, &expected, &a_after).await;
    assert_eq!(expected.len(), 100 + 50 + 100 + 50 + 200 + 50);
    // The other stream's deliveries went on: the subscription was started once, and its
    // streams changed twice in place.
    let log = weir.log_text();
    assert_eq!(log.matches("subscription started").count(), 1, "{log}");
    assert_eq!(
        log.matches("subscription streams changed").count(),
        2,
        "{log}"
    );
}

/// `streams` and `streamSelector` together: one stream by name, one added later by label.
/// `startFrom: earliest` covers both histories; the labelled one stops arriving when its label
/// goes, the named one keeps arriving whatever its labels; a stream both named and selected is
/// read once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_stream_by_name_and_one_added_later_by_label_exactly_once() {
    let db = fresh_database().await;
    let m = Manifests::new(&db);
    let (xa, xb) = (unique("weir.test.a."), unique("weir.test.b."));
    m.write("a.yaml", &test_stream("a", &xa, false));
    m.write("b.yaml", &test_stream("b", &xb, false));
    let mut weir = Weir::start(m.path());
    weir.wait_ready("test", "a").await;
    weir.wait_ready("test", "b").await;
    let mut expected = BTreeSet::new();
    expected.extend(publish(&weir, "a", "h", 60).await);
    let b_history = publish(&weir, "b", "h", 60).await;

    let spec =
        "  streams: [a]\n  streamSelector: {matchLabels: {tier: gold}}\n  startFrom: earliest\n";
    let (sink, sub) = subscribe(&m, spec).await;
    wait_subscription(&weir, &sub).await;
    // The selector matches nothing yet: the list alone is read.
    assert_eq!(status_streams(&weir, &sub).await, json!(["a"]));
    expected.extend(publish(&weir, "a", "l1", 30).await);
    wait_received(&sink, &expected, &weir).await;
    let b_before = publish(&weir, "b", "l1", 30).await;

    // b gains the label: bound, its history and what it got meanwhile delivered.
    m.write("b.yaml", &test_stream("b", &xb, true));
    wait_streams(&weir, &sub, json!(["a", "b"])).await;
    expected.extend(b_history);
    expected.extend(b_before);
    expected.extend(publish(&weir, "a", "l2", 30).await);
    expected.extend(publish(&weir, "b", "l2", 30).await);
    wait_received(&sink, &expected, &weir).await;

    // a gains the label too: named and selected, still read once.
    m.write("a.yaml", &test_stream("a", &xa, true));
    // b loses it: unbound, while a stays (named).
    m.write("b.yaml", &test_stream("b", &xb, false));
    wait_streams(&weir, &sub, json!(["a"])).await;
    let b_after = publish(&weir, "b", "l3", 30).await;
    expected.extend(publish(&weir, "a", "l3", 30).await);
    wait_received(&sink, &expected, &weir).await;
    assert_exactly_once(&sink, &expected, &b_after).await;
    assert_eq!(expected.len(), 60 + 30 + 60 + 30 + 30 + 30 + 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_and_dead_letters_keep_the_stream_of_their_event() {
    let db = fresh_database().await;
    let m = Manifests::new(&db);
    m.write("a.yaml", &test_stream("a", &unique("weir.test.a."), false));
    m.write("b.yaml", &test_stream("b", &unique("weir.test.b."), false));
    // Every event fails once (503, retried through a delay queue and the default exchange);
    // `poison` ones are refused (400, dead-lettered at once).
    let sink = RecordingSink::start_failing(1).await;
    let sub = unique("s");
    m.write(
        "sub.yaml",
        &test_sub(
            &sub,
            &sink.url,
            "  streams: [a, b]\n  delivery: {retry: 3, backoffDelay: 50ms, backoffMax: 100ms}\n",
        ),
    );
    let mut weir = Weir::start(m.path());
    weir.wait_ready("test", "a").await;
    weir.wait_ready("test", "b").await;
    wait_subscription(&weir, &sub).await;
    let mut expected = BTreeSet::new();
    expected.extend(publish(&weir, "a", "x", 30).await);
    expected.extend(publish(&weir, "b", "x", 30).await);
    publish(&weir, "a", "poison", 1).await;
    publish(&weir, "b", "poison", 1).await;
    wait_received(&sink, &expected, &weir).await;
    let dlq = format!("weir-dlq.test.{sub}");
    eventually(
        30,
        "two dead letters",
        || weir.log_text(),
        || async { (queue_len(&dlq).await == Some(2)).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = sink.got();
    assert_eq!(
        tally(&got, &expected),
        (0, 0, 0),
        "(lost, duplicated, unexpected)"
    );
    // Each retry reached the sink naming the same stream as the first attempt.
    let requests = sink.requests();
    assert_eq!(requests.iter().filter(|g| !g.ok).count(), 60 + 2);
    assert!(
        requests
            .iter()
            .all(|g| g.id.starts_with(&format!("{}-", g.stream))),
        "every attempt names its event's stream"
    );
    let list: Value = http_get(format!(
        "{}/v1/namespaces/test/subscriptions/{sub}/deadletters",
        weir.admin
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let mut dead: Vec<(String, String)> = list["deadLetters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let s = |k: &str| d["event"][k].as_str().unwrap_or_default().to_string();
            (s("weirstream"), s("id"))
        })
        .collect();
    dead.sort();
    assert_eq!(
        dead,
        [
            ("a".to_string(), "a-poison-0".to_string()),
            ("b".to_string(), "b-poison-0".to_string())
        ]
    );
}

/// Two workers: whichever takes a new stream's lock replays it, the other learns the mark from
/// its replay row; under perKey neither delivers a key's live event before its history.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_hand_a_stream_labelled_later_over_exactly_once_in_key_order() {
    let db = fresh_database().await;
    let m = Manifests::new(&db);
    let xb = unique("weir.test.b.");
    m.write("a.yaml", &test_stream("a", &unique("weir.test.a."), true));
    m.write("b.yaml", &test_stream("b", &xb, false));
    let sink = RecordingSink::start().await;
    let sub = unique("s");
    m.write(
        "sub.yaml",
        &test_sub(
            &sub,
            &sink.url,
            "  streamSelector: {matchLabels: {tier: gold}}\n  startFrom: earliest\n  \
             ordering: perKey\n  partitions: 2\n",
        ),
    );
    let (w1, w2) = two_readable_workers(m.path(), "test", &["a", "b"]).await;
    wait_subscription(&w1, &sub).await;
    wait_subscription(&w2, &sub).await;
    let mut expected = BTreeSet::new();
    expected.extend(publish(&w1, "b", "h", 500).await);
    m.write("b.yaml", &test_stream("b", &xb, true));
    // Live events of both streams, through both workers, while b's history is replayed.
    for r in 0..10 {
        let w = if r % 2 == 0 { &w1 } else { &w2 };
        expected.extend(publish(w, "b", &format!("l{r}"), 20).await);
        expected.extend(publish(w, "a", &format!("l{r}"), 20).await);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    wait_received(&sink, &expected, &w1).await;
    let got = assert_exactly_once(&sink, &expected, &[]).await;
    assert_key_order(&got);
}
