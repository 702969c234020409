//! Types shared by the four Weir resources: references to Secrets and ConfigMaps, the deletion
//! policy, stream selection, schema helpers for free-form fields, and condition helpers.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::core::{Selector, SelectorExt};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// The API group of every Weir resource.
pub const GROUP: &str = "weir.dev";
/// The served and stored version of every Weir resource.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of every Weir resource.
pub const API_VERSION: &str = "weir.dev/v1alpha1";

/// A key of a Secret in the resource's own namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the same namespace as this resource.
    pub name: String,
    /// Key within the Secret whose value is used.
    pub key: String,
}

/// A whole Secret in the resource's own namespace (every key is used).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret, in the same namespace as this resource.
    pub name: String,
}

/// A key of a ConfigMap in the resource's own namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKeyRef {
    /// Name of the ConfigMap, in the same namespace as this resource.
    pub name: String,
    /// Key within the ConfigMap whose value is used.
    pub key: String,
}

/// TLS settings of a connection to RabbitMQ or PostgreSQL, beyond what the URL says.
///
/// The server is always verified against the system's roots (`SSL_CERT_FILE`/`SSL_CERT_DIR`
/// honoured) plus the CA bundle given here. Setting `tls` on a connection whose URL would not
/// use TLS (`amqp://`, or `sslmode` other than `require`/`verify-ca`/`verify-full`) is refused:
/// the certificates would be ignored.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// Secret key holding a PEM bundle of CA certificates trusted for this connection, in
    /// addition to the system's roots (e.g. the `ca.crt` key of the Secret holding the URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// Secret holding a client certificate for mutual TLS, in the shape of a
    /// `kubernetes.io/tls` Secret: `tls.crt` (PEM certificate chain, leaf first) and `tls.key`
    /// (PEM private key: PKCS#8, PKCS#1 or SEC1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_secret_ref: Option<SecretRef>,
}

/// What happens to the RabbitMQ objects and stored data of a resource when it is deleted.
///
/// The variants carry no doc comments on purpose: documented unit variants make schemars emit a
/// `oneOf` per value, and a plain `enum` list is what a structural schema wants.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    // Keep exchanges, queues and stored events.
    Retain,
    // Delete them together with the resource.
    Delete,
}

/// Returns whether `selector` selects an object carrying `labels`.
///
/// An empty selector selects everything (Kubernetes semantics). An invalid selector (e.g. an
/// unknown operator in `matchExpressions`) is an error carrying the reason.
pub fn selector_matches(
    selector: &LabelSelector,
    labels: &BTreeMap<String, String>,
) -> Result<bool, String> {
    let selector = Selector::try_from(selector.clone()).map_err(|e| e.to_string())?;
    Ok(selector.matches(labels))
}

/// Schema of a free-form JSON object (kept as is by the API server).
///
/// Used where a recursive or user-supplied structure cannot be described by a structural
/// schema (inline JSON Schemas); its content is checked by Weir itself.
pub fn free_form_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// Schema of a list of free-form JSON objects (see [`free_form_object`]).
///
/// Used for Subscription filters: they nest (`all`, `any`, `not`), and a recursive schema
/// cannot be structural.
pub fn free_form_object_list(generator: &mut SchemaGenerator) -> Schema {
    let item = free_form_object(generator);
    json_schema!({
        "type": "array",
        "items": item
    })
}

/// The condition type every Weir resource reports.
pub const READY: &str = "Ready";

/// Returns the condition of type `type_`, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Builds a condition with `lastTransitionTime` set to `now`.
pub fn new_condition(
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    observed_generation: Option<i64>,
    now: Time,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        observed_generation,
        last_transition_time: now,
    }
}

/// Inserts or replaces the condition of the same type, following KEP-1623:
/// `lastTransitionTime` only moves when `status` changes, so that a resync that finds the same
/// state does not make the condition look fresh. Returns whether anything changed, so callers can
/// skip a status write that would be a no-op.
pub fn set_condition(conditions: &mut Vec<Condition>, new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        None => {
            conditions.push(new);
            true
        }
        Some(old) => {
            let mut new = new;
            if old.status == new.status {
                new.last_transition_time = old.last_transition_time.clone();
            }
            if *old == new {
                false
            } else {
                *old = new;
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        // Small constant offsets from the epoch are always representable.
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn set_condition_keeps_transition_time_while_status_holds() {
        let mut conds = Vec::new();
        assert!(set_condition(
            &mut conds,
            new_condition(READY, "False", "InvalidSpec", "a", Some(1), at(10))
        ));
        // Same status, new message: the message changes, the transition time does not.
        assert!(set_condition(
            &mut conds,
            new_condition(READY, "False", "InvalidSpec", "b", Some(2), at(20))
        ));
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].message, "b");
        assert_eq!(conds[0].last_transition_time, at(10));
        // Nothing new at all: reported as unchanged.
        assert!(!set_condition(
            &mut conds,
            new_condition(READY, "False", "InvalidSpec", "b", Some(2), at(30))
        ));
        // Status flips: the transition time moves.
        assert!(set_condition(
            &mut conds,
            new_condition(READY, "True", "Ready", "", Some(2), at(40))
        ));
        assert_eq!(
            find_condition(&conds, READY).map(|c| c.last_transition_time.clone()),
            Some(at(40))
        );
    }

    #[test]
    fn selectors() {
        let labels: BTreeMap<String, String> = [("tier".to_string(), "business".to_string())]
            .into_iter()
            .collect();
        let sel: LabelSelector =
            serde_json::from_value(serde_json::json!({"matchLabels": {"tier": "business"}}))
                .unwrap();
        assert_eq!(selector_matches(&sel, &labels), Ok(true));
        let sel: LabelSelector = serde_json::from_value(serde_json::json!({
            "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["business"]}]
        }))
        .unwrap();
        assert_eq!(selector_matches(&sel, &labels), Ok(false));
        assert_eq!(
            selector_matches(&LabelSelector::default(), &labels),
            Ok(true)
        );
        let bad: LabelSelector = serde_json::from_value(serde_json::json!({
            "matchExpressions": [{"key": "tier", "operator": "Near", "values": ["x"]}]
        }))
        .unwrap();
        assert!(selector_matches(&bad, &labels).is_err());
    }
}
