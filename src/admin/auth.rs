//! Who may use the admin API's protected endpoints (see `docs/security-admin.md`).
//!
//! - Standalone with `--admin-token-file`: one bearer token, compared in constant time.
//! - Standalone without it: open, which `weir run` allows only on a loopback listener.
//! - Operator: the bearer is a Kubernetes token, checked with TokenReview (audience
//!   `--admin-token-audience`, default `weir`) and SubjectAccessReview against the weir.dev
//!   resources of [`Need`], as kube-rbac-proxy does, so RBAC decides who may purge.
//!
//! `/healthz`, `/readyz` and `/metrics` never ask.

use std::path::PathBuf;
use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, header};

use crate::data::auth::{AccessCheck, ReviewedUser, Reviewer};
use crate::data::problem::HttpProblem;

/// The TokenReview audience of admin tokens by default: a token minted for Weir
/// (`kubectl create token NAME --audience weir`) is not one the API server itself accepts, so
/// Weir never holds a credential it could replay against the cluster.
pub const DEFAULT_AUDIENCE: &str = "weir";

/// The group of the resources admin checks are made against.
pub const GROUP: &str = "weir.dev";

/// Seconds a client is told to wait when the API server could not answer a review.
const RETRY_AFTER_SECONDS: u64 = 5;

/// How the admin API authenticates.
#[derive(Clone)]
pub enum AdminAuth {
    /// No token: every endpoint open (standalone on loopback only).
    Open,
    /// Standalone: the token in this file. The file is read on every protected request, so a
    /// rotated token takes effect at once; an unreadable or empty file refuses everyone (503).
    TokenFile(PathBuf),
    /// Operator: TokenReview for `audience`, then SubjectAccessReview.
    Kube {
        reviewer: Arc<dyn Reviewer>,
        audience: String,
    },
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminAuth::Open => write!(f, "open"),
            AdminAuth::TokenFile(p) => write!(f, "token file {}", p.display()),
            AdminAuth::Kube { audience, .. } => write!(f, "TokenReview (audience {audience})"),
        }
    }
}

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("the token file {path} cannot be read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the token file {0} is empty")]
    Empty(String),
}

/// The token in `path`, surrounding whitespace (a trailing newline) removed.
pub fn read_token_file(path: &std::path::Path) -> Result<String, TokenFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TokenFileError::Empty(path.display().to_string()));
    }
    Ok(token.to_string())
}

/// An authenticated caller.
#[derive(Clone, Debug)]
pub enum Caller {
    /// Standalone without a token file.
    Anonymous,
    /// Standalone: the holder of the admin token.
    AdminToken,
    /// Operator: a Kubernetes user.
    User(ReviewedUser),
}

impl Caller {
    /// The `who` of audit records.
    pub fn who(&self) -> &str {
        match self {
            Caller::Anonymous => "anonymous",
            Caller::AdminToken => "admin-token",
            Caller::User(u) => &u.username,
        }
    }
}

/// What an endpoint needs, as the RBAC check the operator makes (the table in
/// `docs/security-admin.md`). Standalone, the admin token allows all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// List or show dead letters: `get` `subscriptions/deadletters`.
    ReadDeadLetters,
    /// Redrive: `update` `subscriptions/deadletters`.
    RedriveDeadLetters,
    /// Purge: `delete` `subscriptions/deadletters`.
    PurgeDeadLetters,
    /// An archive's status: `get` `eventstreams/archive`.
    ReadArchive,
    /// Run or verify an archive (work on the store): `create` `eventstreams/archive`.
    RunArchive,
    /// Forget a subject's personal data: `delete` `eventstreams/subjects`.
    ForgetSubject,
    /// Re-wrap a stream's subject keys: `update` `eventstreams/keys`.
    RotateKeys,
}

impl Need {
    /// The SubjectAccessReview for `namespace`/`name` (`name` empty: any object of the
    /// namespace).
    pub fn check(self, namespace: &str, name: &str) -> AccessCheck {
        let (verb, resource, subresource) = match self {
            Need::ReadDeadLetters => ("get", "subscriptions", "deadletters"),
            Need::RedriveDeadLetters => ("update", "subscriptions", "deadletters"),
            Need::PurgeDeadLetters => ("delete", "subscriptions", "deadletters"),
            Need::ReadArchive => ("get", "eventstreams", "archive"),
            Need::RunArchive => ("create", "eventstreams", "archive"),
            Need::ForgetSubject => ("delete", "eventstreams", "subjects"),
            Need::RotateKeys => ("update", "eventstreams", "keys"),
        };
        AccessCheck {
            namespace: namespace.into(),
            verb: verb.into(),
            group: GROUP.into(),
            resource: resource.into(),
            subresource: subresource.into(),
            name: name.into(),
        }
    }
}

/// The status details of a resource of `kind` in `namespace`: `get` on its kind in the
/// namespace, the permission that shows the same status through the API server.
pub fn status_check(namespace: &str, kind: crate::topology::Kind) -> AccessCheck {
    use crate::topology::Kind;
    let plural = match kind {
        Kind::EventStream => "eventstreams",
        Kind::Subscription => "subscriptions",
        Kind::ArchivePolicy => "archivepolicies",
        Kind::CachePolicy => "cachepolicies",
    };
    AccessCheck {
        namespace: namespace.into(),
        verb: "get".into(),
        group: GROUP.into(),
        resource: plural.into(),
        subresource: String::new(),
        name: String::new(),
    }
}

/// Why a request is refused; answered as a problem (see [`IntoResponse`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// 401 with `WWW-Authenticate: Bearer` (RFC 6750; `invalid_token` when one was `sent`).
    Unauthorized { detail: String, sent: bool },
    /// 403: authenticated, not allowed.
    Forbidden(String),
    /// 503 with `Retry-After`: the token or permission could not be checked.
    Unavailable(String),
}

fn unauthorized(detail: &str, sent: bool) -> Denied {
    Denied::Unauthorized {
        detail: detail.to_string(),
        sent,
    }
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        match self {
            Denied::Unauthorized { detail, sent } => {
                let mut r = HttpProblem::unauthorized(detail).into_response();
                let challenge = if sent {
                    r#"Bearer realm="weir-admin", error="invalid_token""#
                } else {
                    r#"Bearer realm="weir-admin""#
                };
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(challenge),
                );
                r
            }
            Denied::Forbidden(detail) => HttpProblem::forbidden(detail).into_response(),
            Denied::Unavailable(detail) => {
                HttpProblem::unavailable(detail, RETRY_AFTER_SECONDS).into_response()
            }
        }
    }
}

/// The bearer token of `Authorization`, if any (`Err` when the header is not a bearer).
fn bearer(headers: &HeaderMap) -> Result<Option<&str>, Denied> {
    if !headers.contains_key(header::AUTHORIZATION) {
        return Ok(None);
    }
    crate::data::access::bearer(headers)
        .map(Some)
        .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`", true))
}

impl AdminAuth {
    /// Whether every endpoint is open.
    pub fn is_open(&self) -> bool {
        matches!(self, AdminAuth::Open)
    }

    /// The caller of a request: `Ok(None)` when it sent no token (the caller decides whether
    /// that is enough), 401 for a wrong or unknown token, 503 when it cannot be checked.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Caller>, Denied> {
        if self.is_open() {
            return Ok(Some(Caller::Anonymous));
        }
        let token = bearer(headers)?;
        match self {
            AdminAuth::Open => Ok(Some(Caller::Anonymous)),
            AdminAuth::TokenFile(path) => {
                let Some(token) = token else { return Ok(None) };
                let expected = read_token_file(path).map_err(|e| {
                    tracing::warn!(error = %e, "admin API: the token file is unusable; refusing");
                    // The path stays in the log: the caller has not authenticated.
                    Denied::Unavailable(
                        "the admin token file is unusable (weir's log says why)".into(),
                    )
                })?;
                if crate::topology::same_token(token, &expected) {
                    Ok(Some(Caller::AdminToken))
                } else {
                    Err(unauthorized(
                        "the bearer token is not the admin token",
                        true,
                    ))
                }
            }
            AdminAuth::Kube { reviewer, audience } => {
                let Some(token) = token else { return Ok(None) };
                match reviewer.review(token, audience).await {
                    Ok(Some(user)) => Ok(Some(Caller::User(user))),
                    Ok(None) => Err(unauthorized(
                        &format!(
                            "the bearer token is not a valid Kubernetes token for audience {audience:?} \
                             (e.g. `kubectl create token NAME --audience {audience}`)"
                        ),
                        true,
                    )),
                    Err(e) => Err(Denied::Unavailable(format!(
                        "the token cannot be checked now (TokenReview failed: {e})"
                    ))),
                }
            }
        }
    }

    /// The caller, who must have sent a token (401 without one).
    pub async fn require(&self, headers: &HeaderMap) -> Result<Caller, Denied> {
        match self.authenticate(headers).await? {
            Some(c) => Ok(c),
            None => Err(unauthorized(
                "this admin endpoint needs `Authorization: Bearer <token>` (weir CLI: --token-file)",
                false,
            )),
        }
    }

    /// Whether `caller` may do `check` (the admin token and open mode may do everything);
    /// 503 when the API server cannot answer.
    pub async fn may(&self, caller: &Caller, check: &AccessCheck) -> Result<bool, Denied> {
        match (self, caller) {
            (AdminAuth::Kube { reviewer, .. }, Caller::User(user)) => {
                reviewer.allowed(user, check).await.map_err(|e| {
                    Denied::Unavailable(format!(
                        "the permission cannot be checked now (SubjectAccessReview failed: {e})"
                    ))
                })
            }
            (AdminAuth::Kube { .. }, _) => Ok(false),
            _ => Ok(true),
        }
    }

    /// The caller of a request that needs `need` on `namespace`/`name`: 401 without a valid
    /// token, 403 when RBAC does not allow it, 503 when it cannot be checked.
    pub async fn authorize(
        &self,
        headers: &HeaderMap,
        need: Need,
        namespace: &str,
        name: &str,
    ) -> Result<Caller, Denied> {
        let caller = self.require(headers).await?;
        let check = need.check(namespace, name);
        if self.may(&caller, &check).await? {
            Ok(caller)
        } else {
            let sub = if check.subresource.is_empty() {
                String::new()
            } else {
                format!("/{}", check.subresource)
            };
            Err(Denied::Forbidden(format!(
                "{} may not {} {}{sub} ({}) {namespace}/{name}",
                caller.who(),
                check.verb,
                check.resource,
                check.group,
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(crate::topology::same_token("abc", "abc"));
        assert!(!crate::topology::same_token("abc", "abcd"));
        assert!(!crate::topology::same_token("", "abc"));
    }

    #[test]
    fn bearer_parsing() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            m
        };
        assert_eq!(bearer(&HeaderMap::new()).ok(), Some(None));
        assert_eq!(bearer(&h("Bearer t0k")).ok(), Some(Some("t0k")));
        assert_eq!(bearer(&h("bearer  t0k ")).ok(), Some(Some("t0k")));
        assert!(bearer(&h("Basic dTpw")).is_err());
        assert!(bearer(&h("Bearer ")).is_err());
    }

    #[test]
    fn token_files_are_trimmed_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, "s3cret\n").unwrap();
        assert_eq!(read_token_file(&p).unwrap(), "s3cret");
        std::fs::write(&p, " \n").unwrap();
        assert!(matches!(read_token_file(&p), Err(TokenFileError::Empty(_))));
        assert!(matches!(
            read_token_file(&dir.path().join("missing")),
            Err(TokenFileError::Read { .. })
        ));
    }
}
