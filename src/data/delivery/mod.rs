//! Delivery of a subscription's events to its sink.
//!
//! # Topology on RabbitMQ (names in [`Names`])
//! - `weir.<ns>.<stream>.<subscription>`: the subscription's durable queue (type from the
//!   stream, quorum by default; `weir.<ns>._.<subscription>` for a subscription naming its
//!   streams by `streams` or `streamSelector`, bound to each of them), bound to the stream
//!   exchange with the narrowest topic
//!   patterns its `type` filters allow (`#` otherwise). Other filters run in the consumer:
//!   an event that does not match is acked and counted, never delivered.
//! - `ordering: perKey`: instead, the single-active-consumer intake queue
//!   `weir.<ns>.<stream>.<subscription>.intake`, bound to the stream exchange like the queue
//!   above, and one single-active-consumer queue `weir.<ns>.<stream>.<subscription>.p<i>` per
//!   partition (a *lane*). The worker holding the intake moves its messages, in order and
//!   confirmed, to lane `crc32(partition key) mod partitions` (see [`lane_of`]). Weir picks
//!   the lane itself because RabbitMQ's consistent-hash exchange (used before) rebuilds its
//!   ring in an arbitrary order when the broker restarts: keys then moved to other lanes while
//!   their earlier events still waited in the old ones, and were delivered out of order.
//! - `weir-retry.<ns>.<subscription>.<ms>ms`: one delay queue per delay bucket (see
//!   [`backoff`]), whose `x-message-ttl` dead-letters back to the subscription's queue through
//!   the default exchange. A retry is published there (confirmed) before the original is
//!   acked, so it survives a restart of every process and blocks nothing else.
//! - `weir-hold.<ns>.<subscription>.p<i>` (`ordering: perKey`): the hold queue of lane `i`,
//!   the durable record of the retry that lane waits on (see [`runner`]).
//! - `weir-dlq.<ns>.<subscription>`: dead letters. The `weir-` prefixes of retry, hold and
//!   dead letter queues never begin a subscription queue's name (`weir.`), so they cannot
//!   collide.
//!
//! # Contract
//! Attempts = `retry + 1`. The attempt count travels in the message header
//! [`ATTEMPTS_HEADER`]. After the last failed attempt (or at once for a non-retryable answer)
//! the event is published — confirmed — to the dead-letter queue with `weirerrordest`,
//! `weirerrorcode`, `weirerrordata` and `weirattempts`, and only then acked. Under
//! `ordering: perKey` a retry waits at the head of its lane, which blocks only that lane:
//! the message stays unacked (a crash returns it to the head of the queue), and the attempts
//! made and the time of the next one are recorded, confirmed, in the lane's hold queue, so
//! neither a crash nor RabbitMQ's consumer timeout resets them (see [`runner`]).

pub mod backoff;
pub mod guard;
pub mod runner;
pub mod sender;
pub mod step;

use std::future::Future;
use std::pin::Pin;

use lapin::types::AMQPValue;

use crate::data::event::CloudEvent;
use crate::topology::{Key, OrderingPlan, SubscriptionPlan};

pub use guard::{SinkGuard, SinkPolicy};
pub use runner::{Runner, Settings, SubState};
pub use sender::{Failure, Outcome, Sender};

/// Header holding the number of attempts already made (an AMQP long).
pub const ATTEMPTS_HEADER: &str = "weir-attempts";
/// The stream exchange a perKey event was published to, kept when it is moved from the
/// intake to its lane (through the default exchange).
pub const EXCHANGE_HEADER: &str = "weir-exchange";
/// Hold records (perKey): when the next attempt is due, in Unix milliseconds (an AMQP long).
pub const DUE_HEADER: &str = "weir-due";
/// Hold records (perKey): the `id` and `source` of the event the record is about.
pub const HOLD_ID_HEADER: &str = "weir-event-id";
pub const HOLD_SOURCE_HEADER: &str = "weir-event-source";
/// Extensions a dead-lettered event gains.
pub const EXT_ERROR_DEST: &str = "weirerrordest";
pub const EXT_ERROR_CODE: &str = "weirerrorcode";
pub const EXT_ERROR_DATA: &str = "weirerrordata";
pub const EXT_ATTEMPTS: &str = "weirattempts";
/// Extension naming the stream an event of a multi-stream subscription (`streams`,
/// `streamSelector`) comes from.
pub const EXT_STREAM: &str = "weirstream";
/// Type of the event appended to a `deadLetterSink: {stream}`.
pub const DELIVERY_FAILED_TYPE: &str = "dev.weir.delivery.failed";

/// Errors of the delivery subsystem.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("sink: {0}")]
    Sink(String),
    #[error("broker: {0}")]
    Broker(#[from] crate::data::broker::BrokerError),
    #[error("store: {0}")]
    Store(#[from] crate::data::store::StoreError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("appending to stream {stream}: {message}")]
    Append { stream: Key, message: String },
    /// The target stream refuses an appended event (schema, validation, version conflict):
    /// retrying cannot help.
    #[error("{0}")]
    Rejected(String),
    #[error("subscription {0} is not running in this process")]
    NotRunning(Key),
    #[error("shutting down")]
    Shutdown,
    /// A perKey lane waited as long as it may hold its messages: it returns them and
    /// re-reads its hold queue (see the runner's documentation).
    #[error("lane returns its messages to stay under the broker's consumer timeout")]
    Refresh,
    #[error("{0}")]
    Other(String),
}

/// Appends events to an EventStream (replies and `deadLetterSink: {stream}`); implemented by
/// the subscription manager over the engine, by fakes in tests.
pub trait Appender: Send + Sync + 'static {
    /// Appends `events` durably (stored, or confirmed by the broker for broker-only streams).
    fn append<'a>(
        &'a self,
        stream: &'a Key,
        events: Vec<CloudEvent>,
    ) -> Pin<Box<dyn Future<Output = Result<(), DeliveryError>> + Send + 'a>>;
}

/// The RabbitMQ names of one subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    /// The queue consumed (`ordering: none`), or the prefix of the partition queues.
    pub queue: String,
    pub dead_letter_queue: String,
    /// The intake queue (`ordering: perKey` only): bound to the stream exchanges, moved to
    /// the lanes by the worker consuming it.
    pub intake: Option<String>,
    /// Partition queues (`ordering: perKey`); empty otherwise.
    pub partitions: Vec<String>,
    /// One hold queue per partition (`ordering: perKey`), same order: the durable record of
    /// the retry its lane is waiting on.
    pub holds: Vec<String>,
    retry_prefix: String,
}

impl Names {
    pub fn new(plan: &SubscriptionPlan) -> Names {
        let (ns, sub) = (&plan.key.namespace, &plan.key.name);
        // A multi-stream subscription's queue is named after it alone: `_` cannot be a stream
        // name (DNS labels), so it cannot collide with a single-stream one.
        let stream = if plan.multi {
            "_"
        } else {
            plan.stream().name.as_str()
        };
        let queue = format!("weir.{ns}.{stream}.{sub}");
        let (intake, partitions, holds) = match &plan.ordering {
            OrderingPlan::None => (None, vec![], vec![]),
            OrderingPlan::PerKey { partitions, .. } => (
                Some(format!("{queue}.intake")),
                (0..*partitions).map(|i| format!("{queue}.p{i}")).collect(),
                (0..*partitions)
                    .map(|i| Names::hold_name(ns, sub, i))
                    .collect(),
            ),
        };
        Names {
            queue,
            dead_letter_queue: format!("weir-dlq.{ns}.{sub}"),
            intake,
            partitions,
            holds,
            retry_prefix: format!("weir-retry.{ns}.{sub}."),
        }
    }

    /// The hold queue of partition `i`. Namespaces have no dots and the lane number is the
    /// last `.p<i>`, so two subscriptions' hold queues cannot share a name.
    pub fn hold_name(ns: &str, sub: &str, i: u32) -> String {
        format!("weir-hold.{ns}.{sub}.p{i}")
    }

    /// The delay queue of one bucket.
    pub fn retry_queue(&self, delay: std::time::Duration) -> String {
        format!("{}{}ms", self.retry_prefix, delay.as_millis())
    }

    /// The queues events wait in: the lanes, then the intake (`perKey`), or the queue. The
    /// first one exists once the subscription was provisioned.
    pub fn consumed(&self) -> Vec<String> {
        if self.partitions.is_empty() {
            vec![self.queue.clone()]
        } else {
            self.partitions
                .iter()
                .chain(&self.intake)
                .cloned()
                .collect()
        }
    }

    /// The queue the subscription's streams publish into: the intake under `perKey`.
    pub fn bound(&self) -> &str {
        self.intake.as_deref().unwrap_or(&self.queue)
    }

    /// The consistent-hash exchange earlier versions routed `perKey` subscriptions through;
    /// deleted (with its bindings) wherever it is still found.
    pub fn legacy_hash_exchange(plan: &SubscriptionPlan) -> String {
        format!("weir-hash.{}.{}", plan.key.namespace, plan.key.name)
    }
}

/// The lane of a `perKey` event: the CRC-32 of its partition-key value (as the
/// `cloudEvents:<key>` header carries it) modulo `partitions`. Stable across workers,
/// versions and broker restarts, so a key's events always share one lane. An event without
/// the attribute goes to lane 0.
pub fn lane_of(value: Option<&AMQPValue>, partitions: u32) -> u32 {
    let hash = match value {
        None => return 0,
        Some(AMQPValue::LongString(s)) => crc32fast::hash(s.as_bytes()),
        Some(AMQPValue::ShortString(s)) => crc32fast::hash(s.as_str().as_bytes()),
        Some(AMQPValue::Boolean(b)) => crc32fast::hash(if *b { b"true" } else { b"false" }),
        Some(AMQPValue::LongLongInt(i)) => crc32fast::hash(i.to_string().as_bytes()),
        Some(AMQPValue::LongInt(i)) => crc32fast::hash(i.to_string().as_bytes()),
        Some(other) => crc32fast::hash(format!("{other:?}").as_bytes()),
    };
    hash % partitions.max(1)
}

/// The topic patterns that bind a subscription's queue to the stream exchange: when every
/// event the filters accept must have a `type` from a known set (a top-level `exact` on
/// `type`, or a `prefix` ending in `.`), bind just those; otherwise `#`. The consumer still
/// applies every filter, so a wider binding is only less efficient, never wrong.
pub fn binding_keys(plan: &SubscriptionPlan) -> Vec<String> {
    use crate::topology::filter::Filter;
    let topic_safe = |s: &str| {
        !s.is_empty()
            && s.len() <= 200
            && !s.contains(['*', '#'])
            && !s.split('.').any(str::is_empty)
    };
    for f in &plan.filters {
        match f {
            Filter::Exact(m) => {
                if let Some(t) = m.get("type")
                    && topic_safe(t)
                {
                    return vec![t.clone()];
                }
            }
            Filter::Prefix(m) => {
                if let Some(p) = m.get("type")
                    && let Some(stem) = p.strip_suffix('.')
                    && topic_safe(stem)
                {
                    return vec![format!("{stem}.#")];
                }
            }
            Filter::Any(fs) => {
                let keys: Vec<Option<String>> = fs
                    .iter()
                    .map(|f| match f {
                        Filter::Exact(m) if m.len() == 1 => {
                            m.get("type").filter(|t| topic_safe(t)).cloned()
                        }
                        _ => None,
                    })
                    .collect();
                if !keys.is_empty() && keys.iter().all(Option::is_some) {
                    return keys.into_iter().flatten().collect();
                }
            }
            _ => {}
        }
    }
    vec!["#".to_string()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::filter::parse_filters;

    fn plan(filters: serde_json::Value, ordering: OrderingPlan) -> SubscriptionPlan {
        SubscriptionPlan {
            key: Key::new("shop", "notify"),
            generation: 1,
            streams: vec![Key::new("shop", "orders")],
            multi: false,
            filters: parse_filters(filters.as_array().unwrap(), "spec.filters").unwrap(),
            sink: crate::topology::SinkPlan {
                url: "http://x/".into(),
                format: crate::topology::SinkFormat::Binary,
                auth_token: None,
            },
            delivery: Default::default(),
            start_from: crate::topology::StartFrom::Latest,
            ordering,
            consumers: 4,
            rate_limit: None,
            reply: None,
            deletion_policy: crate::topology::DeletionPolicy::Delete,
        }
    }

    #[test]
    fn names_follow_the_api_and_cannot_collide() {
        let n = Names::new(&plan(serde_json::json!([]), OrderingPlan::None));
        assert_eq!(n.queue, "weir.shop.orders.notify");
        assert_eq!(n.dead_letter_queue, "weir-dlq.shop.notify");
        assert_eq!(
            n.retry_queue(std::time::Duration::from_millis(400)),
            "weir-retry.shop.notify.400ms"
        );
        let p = Names::new(&plan(
            serde_json::json!([]),
            OrderingPlan::PerKey {
                partition_key: "subject".into(),
                partitions: 2,
            },
        ));
        assert_eq!(
            p.consumed(),
            [
                "weir.shop.orders.notify.p0",
                "weir.shop.orders.notify.p1",
                "weir.shop.orders.notify.intake"
            ]
        );
        assert_eq!(p.bound(), "weir.shop.orders.notify.intake");
    }

    /// Every broker name of a subscription `sub` on stream `stream` of namespace `shop`.
    fn all_names(stream: &str, sub: &str, ordering: OrderingPlan) -> Vec<String> {
        let mut p = plan(serde_json::json!([]), ordering);
        p.streams = vec![Key::new("shop", stream)];
        p.key = Key::new("shop", sub);
        let n = Names::new(&p);
        let mut out = vec![
            format!("queue {}", n.queue),
            format!("queue {}", n.dead_letter_queue),
            format!(
                "queue {}",
                n.retry_queue(std::time::Duration::from_millis(100))
            ),
        ];
        out.extend(n.partitions.iter().map(|q| format!("queue {q}")));
        out.extend(n.holds.iter().map(|q| format!("queue {q}")));
        out.extend(n.intake.iter().map(|q| format!("queue {q}")));
        out
    }

    /// The lane of a key is part of the stored state (events wait in their lane across a
    /// restart of every worker, and of a rolling upgrade): these values must never change.
    #[test]
    fn lanes_are_the_crc32_of_the_key_and_never_change() {
        let s = |v: &str| AMQPValue::LongString(v.into());
        assert_eq!(lane_of(Some(&s("order-1")), 4), 3769860079 % 4);
        assert_eq!(lane_of(Some(&s("order-2")), 4), 2042244693 % 4);
        assert_eq!(lane_of(Some(&s("order-1")), 1), 0);
        assert_eq!(lane_of(None, 4), 0);
        // An integer or boolean extension hashes as its JSON text.
        assert_eq!(lane_of(Some(&AMQPValue::LongLongInt(42)), 4), 0);
        assert_eq!(lane_of(Some(&AMQPValue::Boolean(true)), 4), 1);
        // Spread: 1000 keys over 8 lanes, none empty or holding more than twice its share.
        let mut counts = [0u32; 8];
        for i in 0..1000 {
            counts[lane_of(Some(&s(&format!("key-{i}"))), 8) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (1..=250).contains(c)), "{counts:?}");
    }

    #[test]
    fn dotted_names_collide_and_dns_labels_cannot() {
        let per_key = || OrderingPlan::PerKey {
            partition_key: "subject".into(),
            partitions: 2,
        };
        // Why names with '.' are refused: each pair, in either order, shares a queue.
        let pairs = [
            (
                ("a.b", "c", OrderingPlan::None),
                ("a", "b.c", OrderingPlan::None),
            ),
            (("s", "x", per_key()), ("s", "x.p0", OrderingPlan::None)),
        ];
        for ((s1, n1, o1), (s2, n2, o2)) in pairs {
            let first = all_names(s1, n1, o1);
            let second = all_names(s2, n2, o2);
            for (a, b) in [(&first, &second), (&second, &first)] {
                assert!(
                    a.iter().any(|n| b.contains(n)),
                    "{s1}/{n1} and {s2}/{n2} were expected to collide"
                );
            }
        }
        // With DNS labels, every name belongs to one (stream, subscription) only: all pairs of
        // a set of labels chosen to look like the colliding ones, both orderings.
        let labels = ["a", "b", "c", "a-b", "b-c", "x", "p0", "x-p0", "p1"];
        let mut owner: std::collections::HashMap<String, (String, String)> = Default::default();
        for stream in labels {
            for sub in labels {
                // One subscription name per namespace: its ordering is one or the other.
                let ordering = if sub.len() % 2 == 0 {
                    per_key()
                } else {
                    OrderingPlan::None
                };
                for name in all_names(stream, sub, ordering) {
                    let who = (stream.to_string(), sub.to_string());
                    if let Some(first) = owner.insert(name.clone(), who.clone()) {
                        // Names without the stream (dead letters, retries, holds, hash
                        // exchange) are per subscription name, which is unique per namespace.
                        assert_eq!(first.1, who.1, "{name}: {first:?} and {who:?}");
                        assert!(!name.starts_with("queue weir.shop."), "{name}");
                    }
                }
            }
        }
    }

    #[test]
    fn bindings_are_narrowed_by_type_filters_only_when_safe() {
        let keys = |f: serde_json::Value| binding_keys(&plan(f, OrderingPlan::None));
        assert_eq!(keys(serde_json::json!([])), ["#"]);
        assert_eq!(
            keys(serde_json::json!([{"exact": {"type": "order.created"}}])),
            ["order.created"]
        );
        assert_eq!(
            keys(serde_json::json!([{"prefix": {"type": "order."}}])),
            ["order.#"]
        );
        // A prefix that does not end at a word boundary cannot be a topic pattern.
        assert_eq!(
            keys(serde_json::json!([{"prefix": {"type": "ord"}}])),
            ["#"]
        );
        assert_eq!(keys(serde_json::json!([{"exact": {"type": "a.*"}}])), ["#"]);
        assert_eq!(
            keys(
                serde_json::json!([{"any": [{"exact": {"type": "a"}}, {"exact": {"type": "b"}}]}])
            ),
            ["a", "b"]
        );
        assert_eq!(
            keys(
                serde_json::json!([{"any": [{"exact": {"type": "a"}}, {"prefix": {"type": "b"}}]}])
            ),
            ["#"]
        );
        assert_eq!(
            keys(serde_json::json!([{"not": {"exact": {"type": "a"}}}])),
            ["#"]
        );
    }
}
