//! The `.status` the operator writes: the data plane's [`ResourceStatus`] (the same one
//! standalone mode serves at `/v1/status`) in the kind's typed status struct, with Kubernetes
//! conditions whose `lastTransitionTime` only moves when a condition's status changes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde_json::{Value, json};

use crate::api::common::{API_VERSION, new_condition, set_condition};
use crate::api::{ArchivePolicyStatus, CachePolicyStatus, EventStreamStatus, SubscriptionStatus};
use crate::data::plane::{Fields, ResourceStatus};
use crate::topology::Kind;

/// The Kubernetes conditions of `rs`: in its order (`Ready` first), each keeping the previous
/// transition time when its status is unchanged. Conditions no longer observed are dropped.
pub fn conditions(rs: &ResourceStatus, previous: &[Condition], now: &Time) -> Vec<Condition> {
    let mut out = Vec::with_capacity(rs.conditions.len());
    for c in &rs.conditions {
        let mut new = new_condition(
            c.type_.as_str(),
            c.status,
            &c.reason,
            &c.message,
            Some(rs.generation),
            now.clone(),
        );
        if let Some(old) = previous.iter().find(|p| p.type_ == new.type_) {
            let mut keep = vec![old.clone()];
            set_condition(&mut keep, new);
            new = keep.swap_remove(0);
        }
        out.push(new);
    }
    out
}

pub fn event_stream(rs: &ResourceStatus, conditions: Vec<Condition>) -> EventStreamStatus {
    let mut s = EventStreamStatus {
        observed_generation: Some(rs.generation),
        conditions: Some(conditions),
        ..EventStreamStatus::default()
    };
    if let Fields::EventStream(f) = &rs.fields {
        s.endpoint = f.endpoint.clone();
        s.exchange = f.exchange.clone();
        s.head = f.head.clone();
    }
    s
}

pub fn subscription(rs: &ResourceStatus, conditions: Vec<Condition>) -> SubscriptionStatus {
    let mut s = SubscriptionStatus {
        observed_generation: Some(rs.generation),
        conditions: Some(conditions),
        ..SubscriptionStatus::default()
    };
    if let Fields::Subscription(f) = &rs.fields {
        s.queue = f.queue.clone();
        s.partition_queues = f.partition_queues.clone();
        s.streams = f.streams.clone();
        s.dead_letter_queue = f.dead_letter_queue.clone();
        s.consumers = f.consumers;
        s.selector = f.selector.clone();
        s.backlog = f.backlog;
        s.position = f.position.clone();
        s.notice = f.notice.clone();
    }
    s
}

pub fn archive_policy(rs: &ResourceStatus, conditions: Vec<Condition>) -> ArchivePolicyStatus {
    let mut s = ArchivePolicyStatus {
        observed_generation: Some(rs.generation),
        conditions: Some(conditions),
        ..ArchivePolicyStatus::default()
    };
    if let Fields::ArchivePolicy(f) = &rs.fields {
        s.last_run = f.last_run.as_deref().and_then(|t| t.parse().ok()).map(Time);
        s.archived_events = f.archived_events.clone();
        s.archived_bytes = f.archived_bytes.clone();
        s.compression_ratio = f.compression_ratio.clone();
    }
    s
}

pub fn cache_policy(rs: &ResourceStatus, conditions: Vec<Condition>) -> CachePolicyStatus {
    let mut s = CachePolicyStatus {
        observed_generation: Some(rs.generation),
        conditions: Some(conditions),
        ..CachePolicyStatus::default()
    };
    if let Fields::CachePolicy(f) = &rs.fields {
        s.hit_ratio = f.hit_ratio.clone();
        s.entries = f.entries;
    }
    s
}

/// The server-side apply body that sets `status` of the resource `name` of `kind`.
pub fn apply_body(kind: Kind, name: &str, status: &Value) -> Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": kind.as_str(),
        "metadata": {"name": name},
        "status": status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::conditions::{ConditionType, StatusCondition, reason};
    use crate::data::plane::observe::StreamFields;

    fn t(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    fn stream(ready: bool, broker: bool) -> ResourceStatus {
        let ready = if ready {
            StatusCondition::new(ConditionType::Ready, true, reason::READY, "")
        } else {
            StatusCondition::new(
                ConditionType::Ready,
                false,
                reason::BROKER_UNAVAILABLE,
                "connection refused",
            )
        };
        ResourceStatus {
            kind: Kind::EventStream,
            namespace: "shop".into(),
            name: "orders".into(),
            generation: 3,
            ready: ready.is_true(),
            conditions: vec![
                ready,
                StatusCondition::new(
                    ConditionType::BrokerReady,
                    broker,
                    if broker {
                        reason::CONNECTED
                    } else {
                        reason::BROKER_UNAVAILABLE
                    },
                    "",
                ),
            ],
            fields: Fields::EventStream(StreamFields {
                exchange: Some("weir.shop.orders".into()),
                ..StreamFields::default()
            }),
        }
    }

    #[test]
    fn transition_times_move_only_when_a_status_changes() {
        let first = conditions(&stream(false, false), &[], &t("2026-01-01T00:00:00Z"));
        assert_eq!(first[0].type_, "Ready");
        assert_eq!(first[0].reason, "BrokerUnavailable");
        assert_eq!(first[0].observed_generation, Some(3));
        let again = conditions(&stream(false, false), &first, &t("2026-01-01T00:05:00Z"));
        assert_eq!(again, first, "nothing changed, nothing moves");
        let fixed = conditions(&stream(true, true), &again, &t("2026-01-01T00:06:00Z"));
        assert_eq!(fixed[0].status, "True");
        assert_eq!(fixed[0].last_transition_time, t("2026-01-01T00:06:00Z"));
        assert_eq!(fixed[1].type_, "BrokerReady");
        assert_eq!(fixed[1].last_transition_time, t("2026-01-01T00:06:00Z"));
    }

    #[test]
    fn a_condition_no_longer_observed_is_dropped() {
        let mut previous = conditions(&stream(true, true), &[], &t("2026-01-01T00:00:00Z"));
        previous.push(new_condition(
            "StoreReady",
            "True",
            "Connected",
            "",
            Some(2),
            t("2026-01-01T00:00:00Z"),
        ));
        let now = conditions(&stream(true, true), &previous, &t("2026-01-01T00:01:00Z"));
        assert!(now.iter().all(|c| c.type_ != "StoreReady"));
    }

    #[test]
    fn typed_status_carries_the_fields() {
        let rs = stream(true, true);
        let s = event_stream(&rs, conditions(&rs, &[], &t("2026-01-01T00:00:00Z")));
        assert_eq!(s.exchange.as_deref(), Some("weir.shop.orders"));
        assert_eq!(s.observed_generation, Some(3));
        let body = apply_body(
            Kind::EventStream,
            "orders",
            &serde_json::to_value(&s).unwrap(),
        );
        assert_eq!(body["apiVersion"], "weir.dev/v1alpha1");
        assert_eq!(body["kind"], "EventStream");
        assert_eq!(body["status"]["conditions"][0]["type"], "Ready");
    }
}
