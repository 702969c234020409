//! The access plan of an EventStream (`spec.ingest.auth`): who may publish and read.

use super::*;

/// The audience service account tokens must name when `spec.ingest.auth.audience` is unset.
pub const DEFAULT_AUDIENCE: &str = "weir";

/// Who may publish and read (`spec.ingest.auth`).
pub(super) fn access_plan(cx: &mut Cx<'_>, spec: &EventStreamSpec) -> AccessPlan {
    let Some(auth) = spec.ingest.as_ref().and_then(|i| i.auth.as_ref()) else {
        return AccessPlan::Open;
    };
    let readers = auth.readers.clone().unwrap_or_default();
    let mode = auth.mode.unwrap_or(AuthMode::None);
    // Fields only one mode reads: set under another mode they would do nothing, so say so.
    let only_in: [(bool, &str, &[AuthMode], &str); 6] = [
        (
            auth.tokens_secret_ref.is_some(),
            "spec.ingest.auth.tokensSecretRef",
            &[AuthMode::Tokens],
            "Tokens",
        ),
        (
            readers.tokens_secret_ref.is_some(),
            "spec.ingest.auth.readers.tokensSecretRef",
            &[AuthMode::Tokens],
            "Tokens",
        ),
        (
            auth.service_accounts.is_some(),
            "spec.ingest.auth.serviceAccounts",
            &[AuthMode::ServiceAccounts],
            "ServiceAccounts",
        ),
        (
            readers.service_accounts.is_some(),
            "spec.ingest.auth.readers.serviceAccounts",
            &[AuthMode::ServiceAccounts],
            "ServiceAccounts",
        ),
        (
            auth.audience.is_some(),
            "spec.ingest.auth.audience",
            &[AuthMode::ServiceAccounts],
            "ServiceAccounts",
        ),
        (
            auth.readers.is_some(),
            "spec.ingest.auth.readers",
            &[AuthMode::Tokens, AuthMode::ServiceAccounts],
            "Tokens or ServiceAccounts",
        ),
    ];
    for (set, path, modes, names) in only_in {
        if set && !modes.contains(&mode) {
            cx.invalid(path, format!("only used with mode {names}"));
        }
    }
    match mode {
        AuthMode::None => AccessPlan::Open,
        AuthMode::Tokens => {
            let publishers = match &auth.tokens_secret_ref {
                None => {
                    // The CRD's validation rule says the same at the same path.
                    cx.invalid("spec.ingest.auth", "mode Tokens requires tokensSecretRef");
                    Vec::new()
                }
                Some(r) => tokens(cx, &r.name, "spec.ingest.auth.tokensSecretRef"),
            };
            let readers = match &readers.tokens_secret_ref {
                None => Vec::new(),
                Some(r) => tokens(cx, &r.name, "spec.ingest.auth.readers.tokensSecretRef"),
            };
            // A token must name one caller: the same token as publisher and reader would make
            // "who sent this" ambiguous.
            for (name, t) in &readers {
                if let Some((p, _)) = publishers.iter().find(|(_, pt)| pt == t) {
                    cx.invalid(
                        "spec.ingest.auth.readers.tokensSecretRef",
                        format!("reader {name:?} has the same token as publisher {p:?}"),
                    );
                }
            }
            AccessPlan::Tokens {
                publishers,
                readers,
            }
        }
        AuthMode::ServiceAccounts => {
            if !cx.defaults.token_review {
                cx.invalid(
                    "spec.ingest.auth.mode",
                    "ServiceAccounts needs the Kubernetes TokenReview API, which only operator \
                     mode has; standalone mode (weir run) supports None and Tokens",
                );
            }
            let accounts = |cx: &mut Cx<'_>, list: Option<&Vec<ServiceAccountRef>>, path: &str| {
                let mut set = BTreeSet::new();
                for (i, sa) in list.into_iter().flatten().enumerate() {
                    for (field, v) in [("namespace", &sa.namespace), ("name", &sa.name)] {
                        if !is_dns_label(v) && !is_dns_subdomain(v) {
                            cx.invalid(
                                format!("{path}[{i}].{field}"),
                                format!("{v:?} is not a valid Kubernetes name"),
                            );
                        }
                    }
                    set.insert((sa.namespace.clone(), sa.name.clone()));
                }
                set
            };
            let publishers = accounts(
                cx,
                auth.service_accounts.as_ref(),
                "spec.ingest.auth.serviceAccounts",
            );
            if publishers.is_empty() {
                cx.invalid(
                    "spec.ingest.auth.serviceAccounts",
                    "at least one service account is required with mode ServiceAccounts",
                );
            }
            let readers = accounts(
                cx,
                readers.service_accounts.as_ref(),
                "spec.ingest.auth.readers.serviceAccounts",
            );
            let audience = match auth.audience.as_deref() {
                None => DEFAULT_AUDIENCE.to_string(),
                Some(a) if a.trim().is_empty() => {
                    cx.invalid("spec.ingest.auth.audience", "must not be empty");
                    DEFAULT_AUDIENCE.to_string()
                }
                Some(a) => a.to_string(),
            };
            AccessPlan::ServiceAccounts {
                audience,
                publishers,
                readers,
            }
        }
    }
}

/// Whether `s` is a DNS subdomain (service account names may contain dots).
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// The `(name, token)` pairs of a tokens Secret: every key names a caller.
fn tokens(cx: &mut Cx<'_>, secret: &str, path: &str) -> Vec<(String, Token)> {
    let key = cx.key(secret);
    let Some(data) = cx.secret_data(&key) else {
        cx.push(
            path,
            format!("Secret {key} not found"),
            Reason::SecretNotFound,
        );
        return Vec::new();
    };
    let data = data.clone();
    if data.is_empty() {
        cx.invalid(path, format!("Secret {key} holds no token"));
        return Vec::new();
    }
    let mut out: Vec<(String, Token)> = Vec::new();
    for (name, value) in data {
        // Token files written by hand end in a newline: it is not part of the token.
        let token = match String::from_utf8(value) {
            Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
            Ok(_) => {
                cx.invalid(path, format!("Secret {key} key {name:?} is an empty token"));
                continue;
            }
            Err(_) => {
                cx.invalid(path, format!("Secret {key} key {name:?} is not UTF-8 text"));
                continue;
            }
        };
        // A short token can be guessed; 16 characters is the least a generated token has.
        if token.len() < MIN_TOKEN_LEN {
            cx.invalid(
                path,
                format!(
                    "Secret {key} key {name:?}: a token must be at least {MIN_TOKEN_LEN} characters"
                ),
            );
            continue;
        }
        let token = Token::new(token);
        if let Some((other, _)) = out.iter().find(|(_, t)| *t == token) {
            cx.invalid(
                path,
                format!("Secret {key} keys {other:?} and {name:?} hold the same token"),
            );
            continue;
        }
        out.push((name, token));
    }
    out
}

/// Shortest bearer token accepted.
pub const MIN_TOKEN_LEN: usize = 16;
