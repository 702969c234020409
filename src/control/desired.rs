//! The desired status of one resource, built without any API call from its build report,
//! what the data plane observes, and its previous conditions (so that `lastTransitionTime`
//! only moves when a condition's status changes).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde_json::{Map, Value, json};

use crate::api::common::{API_VERSION, READY, new_condition, set_condition};
use crate::topology::Kind;
use crate::topology::build::Report;

/// Reason of `Ready=True`.
pub const REASON_READY: &str = "Ready";
/// Reason of `Ready=False` on a Subscription whose EventStream is being deleted.
pub const REASON_STREAM_DELETED: &str = "StreamDeleted";

/// A condition as the data plane observes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub type_: String,
    pub ok: bool,
    pub reason: String,
    pub message: String,
    /// Whether `False` here makes the resource not ready (a dependency such as the broker),
    /// or is only information (a subscription still replaying, a sink answering errors).
    pub gates_ready: bool,
}

impl Observed {
    /// A dependency condition: `False` makes `Ready` false.
    pub fn new(type_: &str, ok: bool, reason: &str, message: impl Into<String>) -> Observed {
        Observed {
            type_: type_.into(),
            ok,
            reason: reason.into(),
            message: message.into(),
            gates_ready: true,
        }
    }

    /// An informational condition: shown, but `Ready` does not depend on it.
    pub fn info(type_: &str, ok: bool, reason: &str, message: impl Into<String>) -> Observed {
        Observed {
            gates_ready: false,
            ..Observed::new(type_, ok, reason, message)
        }
    }
}

/// What the data plane says about a resource.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Facts {
    /// Conditions besides `Ready` (BrokerReady, StoreReady, SinkReachable, CaughtUp...).
    pub conditions: Vec<Observed>,
    /// Why the resource is not ready even though its spec is valid (reason, message).
    pub not_ready: Option<(String, String)>,
    /// Kind-specific status fields (endpoint, exchange, head, queue, backlog...).
    pub fields: Map<String, Value>,
}

/// The desired status of a resource, and its `Ready` condition.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub status: Value,
    pub ready: Condition,
}

/// Builds the status of the resource of `report`.
///
/// `Ready` is `False` with the first problem's reason (every problem in the message) when the
/// spec is invalid; `False` with the data plane's reason when it cannot run; `True` otherwise.
/// Every other observed condition follows; previous conditions keep their transition time
/// when their status is unchanged.
pub fn desired(report: &Report, facts: &Facts, previous: &[Condition], now: Time) -> Desired {
    let generation = Some(report.generation);
    let ready_cond = crate::topology::status::ready_condition(report);
    let (status, reason, message) = if !report.is_valid() {
        (
            "False",
            ready_cond.reason.clone(),
            ready_cond.message.clone(),
        )
    } else if let Some((reason, message)) = &facts.not_ready {
        ("False", reason.clone(), message.clone())
    } else if let Some(bad) = facts.conditions.iter().find(|c| c.gates_ready && !c.ok) {
        ("False", bad.reason.clone(), bad.message.clone())
    } else {
        ("True", REASON_READY.to_string(), String::new())
    };
    let mut conditions: Vec<Condition> = previous.to_vec();
    let ready = new_condition(READY, status, &reason, &message, generation, now.clone());
    set_condition(&mut conditions, ready);
    for c in &facts.conditions {
        set_condition(
            &mut conditions,
            new_condition(
                &c.type_,
                if c.ok { "True" } else { "False" },
                &c.reason,
                &c.message,
                generation,
                now.clone(),
            ),
        );
    }
    // Ready first, then the others in a stable order, as `kubectl describe` shows them.
    conditions.sort_by(|a, b| (a.type_ != READY, &a.type_).cmp(&(b.type_ != READY, &b.type_)));
    let ready = conditions
        .iter()
        .find(|c| c.type_ == READY)
        .cloned()
        // `set_condition` above inserted it: it is always present.
        .expect("Ready was just set");
    let mut status = Map::new();
    status.insert("observedGeneration".into(), json!(report.generation));
    status.insert(
        "conditions".into(),
        serde_json::to_value(&conditions).unwrap_or(Value::Null),
    );
    for (k, v) in &facts.fields {
        status.insert(k.clone(), v.clone());
    }
    Desired {
        status: Value::Object(status),
        ready,
    }
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
    use crate::topology::Key;
    use crate::topology::build::{Problem, Reason};

    fn t(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    fn report(problems: Vec<Problem>) -> Report {
        Report {
            kind: Kind::EventStream,
            key: Key::new("shop", "orders"),
            generation: 3,
            problems,
        }
    }

    #[test]
    fn invalid_spec_names_the_field_and_keeps_the_transition_time() {
        let r = report(vec![Problem {
            path: "spec.batching.maxDelay".into(),
            message: "not a duration: \"soon\"".into(),
            reason: Reason::InvalidSpec,
        }]);
        let first = desired(&r, &Facts::default(), &[], t("2026-01-01T00:00:00Z"));
        assert_eq!(first.ready.status, "False");
        assert_eq!(first.ready.reason, "InvalidSpec");
        assert!(first.ready.message.contains("spec.batching.maxDelay"));
        assert_eq!(first.status["observedGeneration"], 3);

        let prev: Vec<Condition> =
            serde_json::from_value(first.status["conditions"].clone()).unwrap();
        let again = desired(&r, &Facts::default(), &prev, t("2026-01-01T00:05:00Z"));
        assert_eq!(again.ready.last_transition_time, t("2026-01-01T00:00:00Z"));

        let fixed = desired(
            &report(vec![]),
            &Facts::default(),
            &prev,
            t("2026-01-01T00:06:00Z"),
        );
        assert_eq!(fixed.ready.status, "True");
        assert_eq!(fixed.ready.reason, REASON_READY);
        assert_eq!(fixed.ready.last_transition_time, t("2026-01-01T00:06:00Z"));
    }

    #[test]
    fn missing_secret_is_named() {
        let r = report(vec![Problem {
            path: "spec.broker.urlSecretRef".into(),
            message: "Secret shop/rabbitmq not found".into(),
            reason: Reason::SecretNotFound,
        }]);
        let d = desired(&r, &Facts::default(), &[], t("2026-01-01T00:00:00Z"));
        assert_eq!(d.ready.reason, "SecretNotFound");
        assert!(d.ready.message.contains("rabbitmq"));
    }

    #[test]
    fn a_failing_dependency_makes_a_valid_resource_not_ready() {
        let facts = Facts {
            conditions: vec![
                Observed::new(
                    "BrokerReady",
                    false,
                    "BrokerUnavailable",
                    "connection refused",
                ),
                Observed::new("StoreReady", true, "Connected", ""),
            ],
            not_ready: None,
            fields: [("exchange".to_string(), json!("weir.shop.orders"))]
                .into_iter()
                .collect(),
        };
        let d = desired(&report(vec![]), &facts, &[], t("2026-01-01T00:00:00Z"));
        assert_eq!(d.ready.status, "False");
        assert_eq!(d.ready.reason, "BrokerUnavailable");
        let types: Vec<_> = d.status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(types, ["Ready", "BrokerReady", "StoreReady"]);
        assert_eq!(d.status["exchange"], "weir.shop.orders");
        assert_eq!(d.status["conditions"][0]["observedGeneration"], 3);
    }

    #[test]
    fn stream_deleted_wins_over_ready() {
        let facts = Facts {
            not_ready: Some((
                REASON_STREAM_DELETED.into(),
                "EventStream shop/orders is being deleted".into(),
            )),
            ..Facts::default()
        };
        let d = desired(&report(vec![]), &facts, &[], t("2026-01-01T00:00:00Z"));
        assert_eq!(d.ready.reason, REASON_STREAM_DELETED);
    }

    #[test]
    fn apply_body_has_the_type_and_name() {
        let b = apply_body(Kind::Subscription, "notify", &json!({"consumers": 4}));
        assert_eq!(b["apiVersion"], "weir.dev/v1alpha1");
        assert_eq!(b["kind"], "Subscription");
        assert_eq!(b["metadata"]["name"], "notify");
        assert_eq!(b["status"]["consumers"], 4);
    }
}
