//! The [`Builder`] against a fresh [`build`]: after every change, both give the same topology
//! and reports, and the builder plans only what the change touches.

use super::*;
use crate::api::EventStream;
use serde_json::{Value, json};

/// An index kept the way the API server keeps objects: every write of a spec raises the
/// object's generation (here a counter for all objects, which is as good for the builder).
struct World {
    index: Index,
    rv: u64,
}

impl World {
    fn new() -> World {
        let mut w = World {
            index: Index::default(),
            rv: 0,
        };
        w.secret("amqp", "amqp://guest:guest@127.0.0.1:5672/%2f");
        w.secret("pg", "postgres://postgres@127.0.0.1:5432/weir");
        w
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn secret(&mut self, name: &str, url: &str) {
        self.index.secrets.insert(
            Key::new("t", name),
            [("url".to_string(), url.as_bytes().to_vec())]
                .into_iter()
                .collect(),
        );
    }

    fn stream(&mut self, name: &str, spec: Value, labels: Value) {
        let rv = self.next_rv();
        let v = json!({
            "apiVersion": "weir.dev/v1alpha1", "kind": "EventStream",
            "metadata": {"name": name, "namespace": "t", "generation": rv,
                         "uid": format!("uid-{name}"), "labels": labels},
            "spec": spec,
        });
        let es = serde_json::from_value(v).expect("an EventStream");
        self.index.streams.insert(Key::new("t", name), Arc::new(es));
    }

    fn subscription(&mut self, name: &str, spec: Value) {
        let rv = self.next_rv();
        let v = json!({
            "apiVersion": "weir.dev/v1alpha1", "kind": "Subscription",
            "metadata": {"name": name, "namespace": "t", "generation": rv,
                         "uid": format!("uid-{name}")},
            "spec": spec,
        });
        let sub = serde_json::from_value(v).expect("a Subscription");
        self.index
            .subscriptions
            .insert(Key::new("t", name), Arc::new(sub));
    }
}

fn stream_spec(max_events: u32, exchange: Option<&str>) -> Value {
    let mut broker = json!({"urlSecretRef": {"name": "amqp", "key": "url"}});
    if let Some(e) = exchange {
        broker["exchange"] = json!(e);
    }
    json!({
        "broker": broker,
        "store": {"urlSecretRef": {"name": "pg", "key": "url"}},
        "batching": {"maxEvents": max_events},
    })
}

fn sub_spec(stream: &str, sink: &str) -> Value {
    json!({"stream": stream, "sink": {"uri": sink}})
}

/// The whole outcome, for comparison (plans and reports have no common `PartialEq`).
fn outcome(b: &Built) -> String {
    format!("{:?}\n{:?}", b.topology, b.reports)
}

const N: usize = 60;

fn world() -> World {
    let mut w = World::new();
    for i in 0..N {
        w.stream(
            &format!("s{i}"),
            stream_spec(100, None),
            json!({"tier": "a"}),
        );
        w.subscription(
            &format!("sub{i}"),
            sub_spec(&format!("s{i}"), "https://sink.example.com/x"),
        );
    }
    w
}

/// Builds with `b` and checks the outcome against a fresh build; returns what was planned.
fn check(b: &mut Builder, w: &World, step: &str) -> BuildCounts {
    let incremental = b.build(&w.index);
    let fresh = build(&w.index, b.defaults());
    assert_eq!(outcome(&incremental), outcome(&fresh), "after {step}");
    b.last
}

#[test]
fn a_second_build_reuses_every_plan() {
    let w = world();
    let mut b = Builder::new(Defaults::default());
    let first = check(&mut b, &w, "the first build");
    assert_eq!(
        first,
        BuildCounts {
            planned: 2 * N,
            reused: 0
        }
    );
    let second = check(&mut b, &w, "no change");
    assert_eq!(
        second,
        BuildCounts {
            planned: 0,
            reused: 2 * N
        }
    );
    assert!(b.build(&w.index).is_valid());
}

#[test]
fn one_change_plans_what_it_touches() {
    let mut w = world();
    let mut b = Builder::new(Defaults::default());
    check(&mut b, &w, "the first build");

    // A stream's spec: the stream and the subscription that names it.
    w.stream("s7", stream_spec(50, None), json!({"tier": "a"}));
    assert_eq!(check(&mut b, &w, "s7's batching").planned, 2);

    // A subscription's sink: that subscription alone.
    w.subscription("sub3", sub_spec("s3", "https://other.example.com/y"));
    assert_eq!(check(&mut b, &w, "sub3's sink").planned, 1);

    // A new stream with its subscription: those two.
    w.stream("extra", stream_spec(100, None), json!({}));
    w.subscription("sub-extra", sub_spec("extra", "https://sink.example.com/x"));
    assert_eq!(check(&mut b, &w, "one more pair").planned, 2);

    // A stream deleted: its subscription now names a missing stream.
    w.index.streams.remove(&Key::new("t", "extra"));
    let counts = check(&mut b, &w, "a stream deleted");
    assert_eq!(counts.planned, 1);
    let built = b.build(&w.index);
    let report = built
        .report(Kind::Subscription, &Key::new("t", "sub-extra"))
        .expect("a report");
    assert_eq!(report.problems[0].reason, Reason::StreamNotFound);

    // ... and created again: the subscription is valid again.
    w.stream("extra", stream_spec(100, None), json!({}));
    check(&mut b, &w, "the stream back");
    assert!(b.build(&w.index).is_valid());
}

#[test]
fn a_status_write_replans_nothing() {
    let mut w = world();
    let mut b = Builder::new(Defaults::default());
    check(&mut b, &w, "the first build");
    // The API server gives every write a new resourceVersion, status writes included; the
    // generation moves only with the spec.
    for es in w.index.streams.values_mut() {
        Arc::make_mut(es).metadata.resource_version = Some("999".into());
    }
    assert_eq!(check(&mut b, &w, "status written").planned, 0);
    // A label is read by plans (policies and selectors select by it): re-planned.
    let mut obj = EventStream::clone(&w.index.streams[&Key::new("t", "s2")]);
    obj.metadata.labels = Some([("tier".to_string(), "c".to_string())].into());
    w.index.streams.insert(Key::new("t", "s2"), Arc::new(obj));
    assert_eq!(check(&mut b, &w, "a label").planned, 2);
}

#[test]
fn a_secret_change_replans_its_readers() {
    let mut w = world();
    let mut b = Builder::new(Defaults::default());
    check(&mut b, &w, "the first build");
    // Every stream reads the broker Secret; their subscriptions follow their outcome.
    w.secret("amqp", "amqp://guest:guest@127.0.0.1:5673/%2f");
    assert_eq!(check(&mut b, &w, "the broker URL").planned, 2 * N);
    // A Secret nobody reads changes nothing.
    w.secret("unused", "x");
    assert_eq!(check(&mut b, &w, "an unread Secret").planned, 0);
    // A Secret made unreadable: every stream reports it, the next build still matches.
    w.secret("pg", "mysql://nope");
    check(&mut b, &w, "a bad database URL");
    assert!(!b.build(&w.index).is_valid());
}

#[test]
fn an_exchange_taken_by_another_stream() {
    let mut w = world();
    let mut b = Builder::new(Defaults::default());
    check(&mut b, &w, "the first build");
    // s9 claims s2's exchange: s2 is older (by name, without creation times) and keeps it.
    w.stream(
        "s9",
        stream_spec(100, Some("weir.t.s2")),
        json!({"tier": "a"}),
    );
    check(&mut b, &w, "s9 on s2's exchange");
    let built = b.build(&w.index);
    assert!(built.topology.streams.contains_key(&Key::new("t", "s2")));
    assert!(!built.topology.streams.contains_key(&Key::new("t", "s9")));
    // s2 leaves: s9 now owns the exchange, though neither its object nor its reads changed.
    w.index.streams.remove(&Key::new("t", "s2"));
    check(&mut b, &w, "s2 deleted");
    assert!(
        b.build(&w.index)
            .topology
            .streams
            .contains_key(&Key::new("t", "s9"))
    );
    // ... and its subscription, which reads its plan, follows.
    assert!(
        b.build(&w.index)
            .topology
            .subscriptions
            .contains_key(&Key::new("t", "sub9"))
    );
}

#[test]
fn a_stream_losing_its_exchange_replans_what_reads_its_plan() {
    // A subscription over two streams checks that their plans share a broker; a stream that
    // loses its exchange to an older one has no plan, so the check changes although neither
    // the stream's object nor anything it read did.
    let mut w = world();
    w.secret("amqp2", "amqp://guest:guest@127.0.0.1:5673/%2f");
    let mut other = stream_spec(100, Some("weir.t.zz"));
    other["broker"]["urlSecretRef"]["name"] = json!("amqp2");
    w.stream("zz", other.clone(), json!({}));
    w.subscription(
        "both",
        json!({"streams": ["s1", "zz"], "sink": {"uri": "https://sink.example.com/x"}}),
    );
    let mut b = Builder::new(Defaults::default());
    check(&mut b, &w, "the first build");
    let both = Key::new("t", "both");
    assert!(!b.build(&w.index).topology.subscriptions.contains_key(&both));
    // An older stream takes zz's exchange: zz has no plan, the subscription reads s1's alone.
    w.stream("aa", stream_spec(100, Some("weir.t.zz")), json!({}));
    check(&mut b, &w, "aa takes zz's exchange");
    assert!(b.build(&w.index).topology.subscriptions.contains_key(&both));
    // aa leaves: zz's plan is back, and so is the subscription's problem.
    w.index.streams.remove(&Key::new("t", "aa"));
    check(&mut b, &w, "aa deleted");
    assert!(!b.build(&w.index).topology.subscriptions.contains_key(&both));
}

#[test]
fn a_selector_subscription_follows_labels() {
    let mut w = world();
    w.subscription(
        "by-label",
        json!({"streamSelector": {"matchLabels": {"tier": "b"}},
               "sink": {"uri": "https://sink.example.com/x"}}),
    );
    let mut b = Builder::new(Defaults::default());
    check(&mut b, &w, "the first build");
    let reads = |b: &mut Builder, w: &World| {
        b.build(&w.index).topology.subscriptions[&Key::new("t", "by-label")]
            .streams
            .clone()
    };
    // A label on a stream the subscription does not name changes what it reads.
    w.stream("s4", stream_spec(100, None), json!({"tier": "b"}));
    check(&mut b, &w, "s4 labelled b");
    assert_eq!(reads(&mut b, &w), vec![Key::new("t", "s4")]);
    w.stream("s5", stream_spec(100, None), json!({"tier": "b"}));
    let counts = check(&mut b, &w, "s5 labelled b");
    // s5, its subscription, and the selector (always planned).
    assert_eq!(counts.planned, 3);
    assert_eq!(
        reads(&mut b, &w),
        vec![Key::new("t", "s4"), Key::new("t", "s5")]
    );
}

#[test]
fn objects_without_a_generation_are_always_planned() {
    let mut w = world();
    let mut obj = EventStream::clone(&w.index.streams[&Key::new("t", "s1")]);
    obj.metadata.generation = None;
    w.index.streams.insert(Key::new("t", "s1"), Arc::new(obj));
    let mut b = Builder::new(Defaults::default());
    check(&mut b, &w, "the first build");
    // s1 and sub1 (s1's outcome has a new revision each time).
    assert_eq!(check(&mut b, &w, "no change").planned, 2);
}

/// A long series of mixed changes, each checked against a fresh build.
#[test]
fn a_series_of_changes_matches_fresh_builds() {
    let mut w = world();
    let mut b = Builder::new(Defaults::default());
    check(&mut b, &w, "the first build");
    // A small linear congruential sequence: deterministic, no dependency.
    let mut x: u64 = 12345;
    let mut next = |m: u64| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) % m
    };
    for step in 0..200 {
        let i = next(N as u64 + 5);
        let name = format!("s{i}");
        let what = next(8);
        match what {
            0 => w.stream(&name, stream_spec(1 + next(500) as u32, None), json!({})),
            1 => w.stream(
                &name,
                stream_spec(100, Some(&format!("weir.t.s{}", next(N as u64)))),
                json!({}),
            ),
            2 => {
                w.index.streams.remove(&Key::new("t", &name));
            }
            3 => w.subscription(
                &format!("sub{i}"),
                sub_spec(
                    &format!("s{}", next(N as u64 + 5)),
                    "https://sink.example.com/z",
                ),
            ),
            4 => {
                w.index
                    .subscriptions
                    .remove(&Key::new("t", format!("sub{i}")));
            }
            5 => w.secret(
                "amqp",
                if next(2) == 0 {
                    "amqp://guest:guest@127.0.0.1:5672/%2f"
                } else {
                    "amqp://guest:guest@127.0.0.1:5674/%2f"
                },
            ),
            6 => w.subscription(
                &format!("sel{}", next(3)),
                json!({"streamSelector": {"matchLabels": {"tier": "a"}},
                       "sink": {"uri": "https://sink.example.com/x"}}),
            ),
            _ => w.stream(&name, stream_spec(100, None), json!({"tier": "a"})),
        }
        check(
            &mut b,
            &w,
            &format!("step {step} (change {what} on {name})"),
        );
    }
}
