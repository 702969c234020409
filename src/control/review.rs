//! The operator's [`Reviewer`]: asks the API server who a bearer token belongs to
//! (`authentication.k8s.io/v1` TokenReview) and whether that user may do something
//! (`authorization.k8s.io/v1` SubjectAccessReview), the way kube-rbac-proxy does.
//!
//! Both answers are cached briefly so that a client sending many requests does not cost an API
//! round-trip each: [`CACHE_TTL`] (10 s) and [`CACHE_ENTRIES`] (10 000) per cache. Only
//! positive answers are kept:
//! - a revoked token, or a removed RoleBinding, stops working within 10 s — the time a client
//!   may keep a privilege it just lost, short enough for an incident response;
//! - a refused token or a denied permission is asked again every time, so a token just
//!   created or a RoleBinding just granted works at once, and a flood of distinct bogus
//!   tokens cannot fill the cache (it only ever holds tokens the API server vouched for);
//! - the bound keeps memory small (an entry is a user of a few hundred bytes) even with many
//!   valid clients; past it, the least recently used entries go first.
//!
//! Tokens are never kept: the cache key is a SHA-256 of the audience and the token.
//! Errors of the API server are [`ReviewError`]s (the caller answers 503), never a yes.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::Client;
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};

use crate::data::auth::{AccessCheck, ReviewError, ReviewedUser, Reviewer};

/// How long a positive answer is trusted (see the module doc).
pub const CACHE_TTL: Duration = Duration::from_secs(10);
/// Entries per cache (see the module doc).
pub const CACHE_ENTRIES: u64 = 10_000;
/// Reviews in flight at once: the API server's own client-side rate limits and priority
/// levels would only queue more, and a flood of bogus tokens (never cached) must not open an
/// unbounded number of API requests; the others wait their turn.
const IN_FLIGHT: usize = 16;

type Key = [u8; 32];

/// TokenReview and SubjectAccessReview through the kube client, with the caches described in
/// the module doc.
pub struct KubeReviewer {
    client: Client,
    tokens: moka::future::Cache<Key, ReviewedUser>,
    access: moka::future::Cache<Key, ()>,
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl KubeReviewer {
    pub fn new(client: Client) -> Self {
        Self::with_ttl(client, CACHE_TTL)
    }

    /// With another cache lifetime (tests: moka keeps its own clock, so they use a short
    /// real one).
    pub fn with_ttl(client: Client, ttl: Duration) -> Self {
        Self {
            client,
            tokens: bounded(ttl),
            access: bounded(ttl),
            in_flight: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT)),
        }
    }

    async fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ReviewError> {
        self.in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ReviewError("the reviewer is shutting down".into()))
    }

    async fn token_review(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<Option<ReviewedUser>, ReviewError> {
        let key = token_key(token, audience);
        if let Some(user) = self.tokens.get(&key).await {
            return Ok(Some(user));
        }
        let _permit = self.permit().await?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![audience.to_string()]),
            },
            ..Default::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ReviewError(format!("TokenReview: {e}")))?;
        let Some(status) = answer.status else {
            return Err(ReviewError("TokenReview answered without a status".into()));
        };
        // An answer for other audiences than the one asked for is no answer for this one
        // (an API server that ignores `spec.audiences` would otherwise vouch for any token).
        let audience_ok = status
            .audiences
            .as_ref()
            .is_none_or(|a| a.iter().any(|x| x == audience));
        let user = match (status.authenticated, status.user) {
            (Some(true), Some(u)) if audience_ok => u,
            _ => return Ok(None),
        };
        let user = ReviewedUser {
            username: user.username.unwrap_or_default(),
            uid: user.uid.unwrap_or_default(),
            groups: user.groups.unwrap_or_default(),
            extra: user.extra.unwrap_or_default().into_iter().collect(),
        };
        if user.username.is_empty() {
            return Err(ReviewError(
                "TokenReview authenticated a token without a user name".into(),
            ));
        }
        self.tokens.insert(key, user.clone()).await;
        Ok(Some(user))
    }

    async fn access_review(
        &self,
        user: &ReviewedUser,
        check: &AccessCheck,
    ) -> Result<bool, ReviewError> {
        let key = access_key(user, check);
        if self.access.get(&key).await.is_some() {
            return Ok(true);
        }
        let _permit = self.permit().await?;
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.username.clone()),
                uid: opt(&user.uid),
                groups: Some(user.groups.clone()),
                extra: (!user.extra.is_empty()).then(|| user.extra.clone().into_iter().collect()),
                resource_attributes: Some(ResourceAttributes {
                    namespace: opt(&check.namespace),
                    verb: Some(check.verb.clone()),
                    group: Some(check.group.clone()),
                    resource: Some(check.resource.clone()),
                    subresource: opt(&check.subresource),
                    name: opt(&check.name),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ReviewError(format!("SubjectAccessReview: {e}")))?;
        let Some(status) = answer.status else {
            return Err(ReviewError(
                "SubjectAccessReview answered without a status".into(),
            ));
        };
        // `denied` only matters with `allowed: false`; an evaluation error with `allowed:
        // false` is a no (the API server could not find a rule that allows).
        let allowed = status.allowed && status.denied != Some(true);
        if allowed {
            self.access.insert(key, ()).await;
        }
        Ok(allowed)
    }
}

fn bounded<V: Clone + Send + Sync + 'static>(ttl: Duration) -> moka::future::Cache<Key, V> {
    moka::future::Cache::builder()
        .max_capacity(CACHE_ENTRIES)
        .time_to_live(ttl)
        .build()
}

impl Reviewer for KubeReviewer {
    fn review<'a>(
        &'a self,
        token: &'a str,
        audience: &'a str,
    ) -> BoxFuture<'a, Result<Option<ReviewedUser>, ReviewError>> {
        self.token_review(token, audience).boxed()
    }

    fn allowed<'a>(
        &'a self,
        user: &'a ReviewedUser,
        check: &'a AccessCheck,
    ) -> BoxFuture<'a, Result<bool, ReviewError>> {
        self.access_review(user, check).boxed()
    }
}

/// Length-prefixed fields, so no two different inputs hash alike by shifting a separator.
fn hash_fields<'a>(fields: impl IntoIterator<Item = &'a str>) -> Key {
    let mut h = Sha256::new();
    for f in fields {
        h.update((f.len() as u64).to_le_bytes());
        h.update(f.as_bytes());
    }
    h.finalize().into()
}

fn token_key(token: &str, audience: &str) -> Key {
    hash_fields(["token", audience, token])
}

/// Everything the SubjectAccessReview is asked about: the same user with other groups (a
/// token of another account) or another check is another entry. JSON keeps the fields apart.
fn access_key(user: &ReviewedUser, check: &AccessCheck) -> Key {
    let all = serde_json::json!([
        user.username,
        user.uid,
        user.groups,
        user.extra,
        [
            check.namespace,
            check.verb,
            check.group,
            check.resource,
            check.subresource,
            check.name
        ],
    ]);
    hash_fields(["access", &all.to_string()])
}

#[cfg(test)]
#[path = "review_tests.rs"]
mod tests;
