//! Who is calling: the identities the ingest/read and admin APIs authenticate, and the
//! interface through which the operator asks Kubernetes about a bearer token (TokenReview)
//! and about a permission (SubjectAccessReview).
//!
//! The data plane stays kube-free: it only knows the [`Reviewer`] trait. The operator
//! implements it with the API server (`control::review`); standalone mode has no API server
//! and no reviewer, so the modes that need one are refused there at validation.

use std::collections::BTreeMap;

use futures::future::BoxFuture;

/// A user as the API server's TokenReview describes it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ReviewedUser {
    /// e.g. `system:serviceaccount:shop:checkout`.
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl ReviewedUser {
    /// `(namespace, name)` when the user is a service account.
    pub fn service_account(&self) -> Option<(&str, &str)> {
        let rest = self.username.strip_prefix("system:serviceaccount:")?;
        let (ns, name) = rest.split_once(':')?;
        (!ns.is_empty() && !name.is_empty() && !name.contains(':')).then_some((ns, name))
    }
}

/// One permission to check with a SubjectAccessReview (the resource attributes).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AccessCheck {
    pub namespace: String,
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub name: String,
}

/// Why a review could not be made (the API server did not answer, or answered an error). The
/// caller answers 503: an unknown answer is never taken as a yes.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ReviewError(pub String);

/// Asks the cluster who a bearer token belongs to and what that user may do.
pub trait Reviewer: Send + Sync {
    /// The user a token authenticates for `audience`, `None` when the API server says it does
    /// not authenticate (unknown, expired, wrong audience).
    fn review<'a>(
        &'a self,
        token: &'a str,
        audience: &'a str,
    ) -> BoxFuture<'a, Result<Option<ReviewedUser>, ReviewError>>;

    /// Whether `user` may do `check`.
    fn allowed<'a>(
        &'a self,
        user: &'a ReviewedUser,
        check: &'a AccessCheck,
    ) -> BoxFuture<'a, Result<bool, ReviewError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_names() {
        let u = |n: &str| ReviewedUser {
            username: n.into(),
            ..Default::default()
        };
        assert_eq!(
            u("system:serviceaccount:shop:checkout").service_account(),
            Some(("shop", "checkout"))
        );
        assert_eq!(u("alice").service_account(), None);
        assert_eq!(u("system:serviceaccount:shop").service_account(), None);
        assert_eq!(u("system:serviceaccount::x").service_account(), None);
    }
}
