//! Who may publish to and read from a stream: the check every ingest and read handler makes
//! first (`spec.ingest.auth`, planned as an [`AccessPlan`]).
//!
//! - `Open`: anyone; the caller has no name.
//! - `Tokens`: `Authorization: Bearer <token>`; the token's Secret key names the caller.
//!   Publishers may publish and read, readers may only read.
//! - `ServiceAccounts`: the bearer is a service account token the API server authenticates
//!   (TokenReview, for the stream's audience); the account must be listed. The caller's name
//!   is the account's username, `system:serviceaccount:<namespace>:<name>`.
//!
//! Missing or unknown credentials are 401 (with `WWW-Authenticate: Bearer`); a known caller
//! without the right (a reader publishing, an authenticated but unlisted service account) is
//! 403; a TokenReview the API server cannot answer is 503, never a yes.

use http::{HeaderMap, header};

use crate::data::auth::Reviewer;
use crate::data::problem::HttpProblem;
use crate::topology::{AccessPlan, Key};

/// What a caller wants to do with a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Right {
    Publish,
    Read,
}

impl Right {
    fn verb(self) -> &'static str {
        match self {
            Right::Publish => "publish to",
            Right::Read => "read",
        }
    }
}

/// Why a caller was turned away.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Denied {
    #[error("stream {0} requires a bearer token (Authorization: Bearer <token>)")]
    Missing(Key),
    #[error("the bearer token is not valid for stream {0}")]
    Unknown(Key),
    #[error("{caller} may not {verb} stream {stream}")]
    Forbidden {
        caller: String,
        verb: &'static str,
        stream: Key,
    },
    #[error("the bearer token cannot be checked now: {0}")]
    Unavailable(String),
}

impl Denied {
    pub fn problem(&self) -> HttpProblem {
        match self {
            Denied::Missing(_) | Denied::Unknown(_) => HttpProblem::unauthorized(self.to_string()),
            Denied::Forbidden { .. } => HttpProblem::forbidden(self.to_string()),
            // One second: the API server is usually back quickly, and publishers retry.
            Denied::Unavailable(_) => HttpProblem::unavailable(self.to_string(), 1),
        }
    }
}

/// The bearer token of a request: `None` when there is no `Authorization` header or it is not
/// a bearer credential (scheme matched case-insensitively, RFC 7235).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Checks that the caller may do `right` on stream `key`. `Ok(None)` for an open stream,
/// `Ok(Some(name))` with the authenticated caller's name otherwise.
pub async fn authorize(
    access: &AccessPlan,
    key: &Key,
    headers: &HeaderMap,
    right: Right,
    reviewer: Option<&dyn Reviewer>,
) -> Result<Option<String>, Denied> {
    let token = || bearer(headers).ok_or_else(|| Denied::Missing(key.clone()));
    match access {
        AccessPlan::Open => Ok(None),
        AccessPlan::Tokens {
            publishers,
            readers,
        } => {
            let token = token()?;
            // Every token is compared (no early exit), so the time taken does not tell how
            // many tokens come before the matching one.
            let mut found: Option<(&str, bool)> = None;
            for (name, t) in publishers {
                if t.matches(token) {
                    found = Some((name, true));
                }
            }
            for (name, t) in readers {
                if t.matches(token) {
                    found = found.or(Some((name, false)));
                }
            }
            match found {
                None => Err(Denied::Unknown(key.clone())),
                Some((name, publisher)) => {
                    if right == Right::Publish && !publisher {
                        Err(Denied::Forbidden {
                            caller: format!("reader {name:?}"),
                            verb: right.verb(),
                            stream: key.clone(),
                        })
                    } else {
                        Ok(Some(name.to_string()))
                    }
                }
            }
        }
        AccessPlan::ServiceAccounts {
            audience,
            publishers,
            readers,
        } => {
            let token = token()?;
            let reviewer = reviewer.ok_or_else(|| {
                Denied::Unavailable("this worker has no Kubernetes API to review tokens".into())
            })?;
            let user = reviewer
                .review(token, audience)
                .await
                .map_err(|e| Denied::Unavailable(e.to_string()))?
                .ok_or_else(|| Denied::Unknown(key.clone()))?;
            let account = user
                .service_account()
                .map(|(ns, name)| (ns.to_string(), name.to_string()));
            let allowed = account.as_ref().is_some_and(|a| {
                publishers.contains(a) || (right == Right::Read && readers.contains(a))
            });
            if allowed {
                Ok(Some(user.username))
            } else {
                Err(Denied::Forbidden {
                    caller: user.username,
                    verb: right.verb(),
                    stream: key.clone(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::auth::{AccessCheck, ReviewError, ReviewedUser};
    use crate::topology::Token;
    use futures::future::BoxFuture;
    use std::collections::BTreeSet;

    fn key() -> Key {
        Key::new("shop", "orders")
    }

    fn with_bearer(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, v.parse().unwrap());
        h
    }

    fn tokens() -> AccessPlan {
        AccessPlan::Tokens {
            publishers: vec![("checkout".into(), Token::new("p-token-0123456789".into()))],
            readers: vec![("audit".into(), Token::new("r-token-0123456789".into()))],
        }
    }

    #[tokio::test]
    async fn tokens_name_the_caller_and_readers_cannot_publish() {
        let plan = tokens();
        let k = key();
        let p = with_bearer("Bearer p-token-0123456789");
        let r = with_bearer("bearer r-token-0123456789");
        assert_eq!(
            authorize(&plan, &k, &p, Right::Publish, None).await,
            Ok(Some("checkout".into()))
        );
        assert_eq!(
            authorize(&plan, &k, &p, Right::Read, None).await,
            Ok(Some("checkout".into()))
        );
        assert_eq!(
            authorize(&plan, &k, &r, Right::Read, None).await,
            Ok(Some("audit".into()))
        );
        assert!(matches!(
            authorize(&plan, &k, &r, Right::Publish, None).await,
            Err(Denied::Forbidden { .. })
        ));
        assert_eq!(
            authorize(&plan, &k, &HeaderMap::new(), Right::Read, None).await,
            Err(Denied::Missing(k.clone()))
        );
        assert_eq!(
            authorize(&plan, &k, &with_bearer("Bearer nope"), Right::Read, None).await,
            Err(Denied::Unknown(k.clone()))
        );
        assert_eq!(
            authorize(
                &plan,
                &k,
                &with_bearer("Basic p-token-0123456789"),
                Right::Read,
                None
            )
            .await,
            Err(Denied::Missing(k.clone()))
        );
        assert_eq!(
            authorize(
                &AccessPlan::Open,
                &k,
                &HeaderMap::new(),
                Right::Publish,
                None
            )
            .await,
            Ok(None)
        );
    }

    /// Knows one token per service account: `sa:<ns>:<name>`, for audience `weir` only.
    struct FakeReviewer;

    impl Reviewer for FakeReviewer {
        fn review<'a>(
            &'a self,
            token: &'a str,
            audience: &'a str,
        ) -> BoxFuture<'a, Result<Option<ReviewedUser>, ReviewError>> {
            Box::pin(async move {
                if token == "down" {
                    return Err(ReviewError("connection refused".into()));
                }
                Ok(token
                    .strip_prefix("sa:")
                    .filter(|_| audience == "weir")
                    .map(|rest| ReviewedUser {
                        username: format!("system:serviceaccount:{rest}"),
                        ..Default::default()
                    }))
            })
        }

        fn allowed<'a>(
            &'a self,
            _: &'a ReviewedUser,
            _: &'a AccessCheck,
        ) -> BoxFuture<'a, Result<bool, ReviewError>> {
            Box::pin(async { Ok(false) })
        }
    }

    #[tokio::test]
    async fn service_accounts_are_reviewed_and_must_be_listed() {
        let plan = AccessPlan::ServiceAccounts {
            audience: "weir".into(),
            publishers: BTreeSet::from([("shop".to_string(), "checkout".to_string())]),
            readers: BTreeSet::from([("ops".to_string(), "audit".to_string())]),
        };
        let k = key();
        let rv: Option<&dyn Reviewer> = Some(&FakeReviewer);
        let h = |t: &str| with_bearer(&format!("Bearer {t}"));
        assert_eq!(
            authorize(&plan, &k, &h("sa:shop:checkout"), Right::Publish, rv).await,
            Ok(Some("system:serviceaccount:shop:checkout".into()))
        );
        assert_eq!(
            authorize(&plan, &k, &h("sa:ops:audit"), Right::Read, rv).await,
            Ok(Some("system:serviceaccount:ops:audit".into()))
        );
        assert!(matches!(
            authorize(&plan, &k, &h("sa:ops:audit"), Right::Publish, rv).await,
            Err(Denied::Forbidden { .. })
        ));
        assert!(matches!(
            authorize(&plan, &k, &h("sa:shop:other"), Right::Publish, rv).await,
            Err(Denied::Forbidden { .. })
        ));
        assert_eq!(
            authorize(&plan, &k, &h("garbage"), Right::Publish, rv).await,
            Err(Denied::Unknown(k.clone()))
        );
        assert!(matches!(
            authorize(&plan, &k, &h("down"), Right::Publish, rv).await,
            Err(Denied::Unavailable(_))
        ));
        let other_audience = AccessPlan::ServiceAccounts {
            audience: "other".into(),
            publishers: BTreeSet::from([("shop".to_string(), "checkout".to_string())]),
            readers: BTreeSet::new(),
        };
        assert_eq!(
            authorize(
                &other_audience,
                &k,
                &h("sa:shop:checkout"),
                Right::Publish,
                rv
            )
            .await,
            Err(Denied::Unknown(k.clone()))
        );
    }
}
