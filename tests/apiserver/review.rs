//! TokenReview and SubjectAccessReview: the server knows the service-account tokens that
//! tests issued (and for which audiences), and decides access from a grant table the tests
//! fill, the way RBAC would.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::store::ApiError;

/// One permission a test granted (the RBAC rule and its binding in one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// A user name or a group name (`system:serviceaccounts:shop`).
    pub subject: String,
    /// The verb, or `*`.
    pub verb: String,
    pub group: String,
    /// The resource, or `*`.
    pub resource: String,
    /// The subresource (`""` for none), or `*`.
    pub subresource: String,
    /// The namespace; `""` grants it in every namespace (a ClusterRoleBinding).
    pub namespace: String,
}

impl Grant {
    fn matches(&self, user: &str, groups: &[String], attrs: &Value) -> bool {
        let attr = |k: &str| attrs.get(k).and_then(Value::as_str).unwrap_or_default();
        let field = |want: &str, have: &str| want == "*" || want == have;
        (self.subject == user || groups.contains(&self.subject))
            && field(&self.verb, attr("verb"))
            && self.group == attr("group")
            && field(&self.resource, attr("resource"))
            && field(&self.subresource, attr("subresource"))
            && (self.namespace.is_empty() || self.namespace == attr("namespace"))
    }
}

/// A token the server issued.
#[derive(Clone, Debug)]
struct Issued {
    namespace: String,
    name: String,
    uid: String,
    audiences: Vec<String>,
}

/// The tokens issued and the permissions granted so far.
#[derive(Default)]
pub struct Reviews {
    tokens: HashMap<String, Issued>,
    /// Service accounts keep one uid across the tokens issued for them.
    uids: HashMap<(String, String), String>,
    grants: Vec<Grant>,
}

/// The audiences a token gets when the caller names none (a real server uses its
/// `--api-audiences`, usually the issuer URL).
pub const DEFAULT_AUDIENCE: &str = "https://kubernetes.default.svc";

impl Reviews {
    pub fn issue(&mut self, namespace: &str, name: &str, audiences: &[&str]) -> String {
        let uid = self
            .uids
            .entry((namespace.into(), name.into()))
            .or_insert_with(|| uuid::Uuid::now_v7().to_string())
            .clone();
        let token = format!("test-sa-token.{}", uuid::Uuid::now_v7().simple());
        let audiences = if audiences.is_empty() {
            vec![DEFAULT_AUDIENCE.to_string()]
        } else {
            audiences.iter().map(|a| a.to_string()).collect()
        };
        self.tokens.insert(
            token.clone(),
            Issued {
                namespace: namespace.into(),
                name: name.into(),
                uid,
                audiences,
            },
        );
        token
    }

    /// The user and groups a bearer token authenticates as (any audience: the API server's
    /// own authenticator accepts its default audience, which every issued token has unless a
    /// test chose others).
    pub fn identity(&self, token: &str) -> Option<(String, Vec<String>)> {
        let issued = self.tokens.get(token)?;
        Some((
            format!("system:serviceaccount:{}:{}", issued.namespace, issued.name),
            vec![
                "system:serviceaccounts".to_string(),
                format!("system:serviceaccounts:{}", issued.namespace),
                "system:authenticated".to_string(),
            ],
        ))
    }

    pub fn revoke(&mut self, token: &str) {
        self.tokens.remove(token);
    }

    pub fn grant(&mut self, grant: Grant) {
        self.grants.push(grant);
    }

    pub fn revoke_grants(&mut self, subject: &str) {
        self.grants.retain(|g| g.subject != subject);
    }

    /// Answers a TokenReview: `spec.token` against the issued tokens, `spec.audiences`
    /// (default: the server's audience) against the token's. As on a real server, the
    /// status's `audiences` are the requested ones the token is valid for.
    pub fn token_review(&self, body: &Value) -> Result<Value, ApiError> {
        let spec = body
            .get("spec")
            .ok_or_else(|| ApiError::bad_request("a TokenReview needs a spec"))?;
        let token = spec
            .get("token")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let wanted: Vec<String> = match spec.get("audiences").and_then(Value::as_array) {
            Some(a) if !a.is_empty() => a
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            _ => vec![DEFAULT_AUDIENCE.to_string()],
        };
        let status = match self.tokens.get(token) {
            None => json!({ "authenticated": false, "error": "invalid bearer token" }),
            Some(issued) => {
                let valid: Vec<&String> = wanted
                    .iter()
                    .filter(|a| issued.audiences.contains(a))
                    .collect();
                if valid.is_empty() {
                    json!({
                        "authenticated": false,
                        "error": "token audiences are invalid for the target audiences",
                    })
                } else {
                    json!({
                        "authenticated": true,
                        "user": {
                            "username": format!("system:serviceaccount:{}:{}", issued.namespace, issued.name),
                            "uid": issued.uid,
                            "groups": [
                                "system:serviceaccounts",
                                format!("system:serviceaccounts:{}", issued.namespace),
                                "system:authenticated",
                            ],
                        },
                        "audiences": valid,
                    })
                }
            }
        };
        Ok(answer(
            body,
            "TokenReview",
            "authentication.k8s.io/v1",
            status,
        ))
    }

    /// Answers a SubjectAccessReview from the grant table (resource attributes only; a
    /// non-resource request is denied with a reason saying so).
    pub fn access_review(&self, body: &Value) -> Result<Value, ApiError> {
        let spec = body
            .get("spec")
            .ok_or_else(|| ApiError::bad_request("a SubjectAccessReview needs a spec"))?;
        let user = spec.get("user").and_then(Value::as_str).unwrap_or_default();
        let groups: Vec<String> = spec
            .get("groups")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        if user.is_empty() && groups.is_empty() {
            return Err(ApiError::bad_request(
                "spec.user or spec.groups must be set (as a real server requires)",
            ));
        }
        let status = match spec.get("resourceAttributes") {
            None => json!({
                "allowed": false,
                "reason": "the test API server decides resource attributes only",
            }),
            Some(attrs) => match self.grants.iter().find(|g| g.matches(user, &groups, attrs)) {
                Some(g) => json!({
                    "allowed": true,
                    "reason": format!("granted to {} by the test", g.subject),
                }),
                None => json!({ "allowed": false, "reason": "no grant matches" }),
            },
        };
        Ok(answer(
            body,
            "SubjectAccessReview",
            "authorization.k8s.io/v1",
            status,
        ))
    }
}

/// The request echoed back with its `status` (reviews are not stored).
fn answer(body: &Value, kind: &str, api_version: &str, status: Value) -> Value {
    let mut out = body.clone();
    if let Some(o) = out.as_object_mut() {
        o.insert("kind".into(), kind.into());
        o.insert("apiVersion".into(), api_version.into());
        o.entry("metadata").or_insert_with(|| json!({}));
        o.insert("status".into(), status);
    }
    out
}
