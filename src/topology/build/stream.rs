//! The plan of an EventStream: broker, store and its pools, batching, validation, ingest
//! limits and auth.

use super::*;

pub(super) fn stream_plan(
    cx: &mut Cx<'_>,
    key: &Key,
    meta: &ObjectMeta,
    spec: &EventStreamSpec,
) -> StreamPlan {
    // Broker.
    let url = cx
        .secret_text(&spec.broker.url_secret_ref, "spec.broker.urlSecretRef")
        .unwrap_or_default();
    if !url.is_empty() && !check_url(&url, &["amqp", "amqps"]) {
        // The URL holds a password: name where it came from, never the value.
        let r = &spec.broker.url_secret_ref;
        cx.invalid(
            "spec.broker.urlSecretRef",
            format!(
                "Secret {} key {:?} is not an amqp:// or amqps:// URL",
                cx.key(&r.name),
                r.key
            ),
        );
    }
    let exchange = match spec.broker.exchange.as_deref() {
        None | Some("") => default_exchange(key),
        Some(e) => {
            if let Err(why) = check_exchange(e) {
                cx.invalid("spec.broker.exchange", format!("exchange {e:?}: {why}"));
            } else if let Err(why) =
                check_exchange_scope(e, &key.namespace, cx.defaults.allow_custom_exchanges)
            {
                cx.invalid("spec.broker.exchange", why);
            }
            e.to_string()
        }
    };
    let queue_type = match spec.broker.queue_type {
        Some(api::eventstream::QueueType::Classic) => QueueType::Classic,
        Some(api::eventstream::QueueType::Quorum) | None => QueueType::Quorum,
    };

    // Store.
    let store = spec.store.as_ref().map(|store| {
        let urls = match &store.url_secret_ref {
            Some(r) => cx
                .secret_text(r, "spec.store.urlSecretRef")
                .map(|text| postgres_urls(cx, &text, r, "spec.store.urlSecretRef"))
                .unwrap_or_default(),
            None => match &cx.defaults.default_database_url {
                Some(url) => vec![url.clone()],
                None => {
                    cx.invalid(
                        "spec.store.urlSecretRef",
                        "not set, and the operator has no default database (DB_HOST is unset)",
                    );
                    Vec::new()
                }
            },
        };
        let read_urls = store.read_url_secret_ref.as_ref().map(|r| {
            cx.secret_text(r, "spec.store.readUrlSecretRef")
                .map(|text| postgres_urls(cx, &text, r, "spec.store.readUrlSecretRef"))
                .unwrap_or_default()
        });
        let pool = pool_plan(cx, store.pool.as_ref());
        StorePlan {
            urls,
            read_urls,
            pool,
        }
    });

    // Batching.
    let b = spec.batching.clone().unwrap_or_default();
    let d = BatchingPlan::default();
    let max_events = match b.max_events {
        None => cx.defaults.batch_max_events,
        Some(0) => {
            cx.invalid("spec.batching.maxEvents", "must be at least 1");
            1
        }
        // A u32 always fits the usize of the 64- and 32-bit targets Weir is built for.
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
    };
    let batching = BatchingPlan {
        max_events,
        max_bytes: cx.size(
            b.max_bytes.as_ref(),
            "spec.batching.maxBytes",
            d.max_bytes,
            false,
        ),
        max_delay: cx.duration(
            b.max_delay.as_ref(),
            "spec.batching.maxDelay",
            cx.defaults.batch_max_delay,
        ),
    };

    let validation = validation_plan(cx, spec.validation.as_ref());

    // Compression.
    let c = spec.compression.clone().unwrap_or_default();
    let dc = CompressionPlan::default();
    let compression = CompressionPlan {
        min_bytes: cx.size(
            c.min_bytes.as_ref(),
            "spec.compression.minBytes",
            dc.min_bytes,
            true,
        ),
        level: zstd_level(cx, c.level, dc.level, "spec.compression.level"),
    };

    check_ingest(cx, spec);
    let access = access_plan(cx, spec);
    let rate_limit = super::rate_limit::rate_limit_plan(cx, spec);

    StreamPlan {
        key: key.clone(),
        generation: generation(meta),
        labels: meta.labels.clone().unwrap_or_default(),
        broker: BrokerPlan {
            url,
            exchange,
            queue_type,
        },
        store,
        batching,
        validation,
        compression,
        deletion_policy: match spec.deletion_policy {
            Some(api::DeletionPolicy::Delete) => DeletionPolicy::Delete,
            Some(api::DeletionPolicy::Retain) | None => DeletionPolicy::Retain,
        },
        access,
        rate_limit,
    }
}

/// One or more comma-separated PostgreSQL URLs.
pub(super) fn postgres_urls(
    cx: &mut Cx<'_>,
    text: &str,
    r: &api::SecretKeyRef,
    path: &str,
) -> Vec<String> {
    let urls: Vec<String> = text
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect();
    for (i, url) in urls.iter().enumerate() {
        if !check_url(url, &["postgres", "postgresql"]) {
            cx.invalid(
                path,
                format!(
                    "Secret {} key {:?}: URL {} of {} is not a postgres:// URL",
                    cx.key(&r.name),
                    r.key,
                    i + 1,
                    urls.len()
                ),
            );
        }
    }
    urls
}

pub(super) fn pool_plan(cx: &mut Cx<'_>, pool: Option<&api::eventstream::PoolSpec>) -> PoolPlan {
    let d = PoolPlan::default();
    let Some(p) = pool else { return d };
    let size = p.size.unwrap_or(d.size);
    let max_connections = p.max_connections.unwrap_or(d.max_connections);
    if max_connections == 0 {
        cx.invalid("spec.store.pool.maxConnections", "must be at least 1");
    }
    if size > max_connections {
        cx.invalid(
            "spec.store.pool",
            format!("size ({size}) must not exceed maxConnections ({max_connections})"),
        );
    }
    PoolPlan {
        size,
        max_connections,
        idle_timeout: cx.duration(
            p.idle_timeout.as_ref(),
            "spec.store.pool.idleTimeout",
            d.idle_timeout,
        ),
        connect_timeout: cx.positive_duration(
            p.connect_timeout.as_ref(),
            "spec.store.pool.connectTimeout",
            d.connect_timeout,
        ),
    }
}

pub(super) fn zstd_level(cx: &mut Cx<'_>, level: Option<i32>, default: i32, path: &str) -> i32 {
    match level {
        None => default,
        Some(l) if (1..=22).contains(&l) => l,
        Some(l) => {
            cx.invalid(path, format!("zstd level {l} is outside 1..=22"));
            default
        }
    }
}

pub(super) fn validation_plan(
    cx: &mut Cx<'_>,
    v: Option<&api::eventstream::ValidationSpec>,
) -> ValidationPlan {
    let d = ValidationPlan::default();
    let Some(v) = v else { return d };
    let required_extensions = v.required_extensions.clone().unwrap_or_default();
    for (i, name) in required_extensions.iter().enumerate() {
        if !is_attribute_name(name) {
            cx.invalid(
                format!("spec.validation.requiredExtensions[{i}]"),
                format!(
                    "{name:?} is not a CloudEvents attribute name (lowercase letters and digits)"
                ),
            );
        }
    }
    let mut schemas = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, s) in v.schemas.iter().flatten().enumerate() {
        let path = format!("spec.validation.schemas[{i}]");
        if s.type_.is_empty() {
            cx.invalid(format!("{path}.type"), "must not be empty");
        }
        if !seen.insert((s.type_.clone(), s.dataschema.clone())) {
            cx.invalid(
                path.clone(),
                format!(
                    "a second schema for type {:?}{}",
                    s.type_,
                    s.dataschema
                        .as_ref()
                        .map(|d| format!(" and dataschema {d:?}"))
                        .unwrap_or_default()
                ),
            );
        }
        let (doc, doc_path) = match (&s.schema, &s.schema_from) {
            (Some(_), Some(_)) | (None, None) => {
                cx.invalid(path, "exactly one of schema or schemaFrom must be set");
                continue;
            }
            (Some(doc), None) => (doc.clone(), format!("{path}.schema")),
            (None, Some(from)) => {
                let doc_path = format!("{path}.schemaFrom");
                let r = &from.config_map_key_ref;
                let Some(text) = cx.config_map(r, &doc_path) else {
                    continue;
                };
                match parse_json_or_yaml(&text) {
                    Ok(doc) => (doc, doc_path),
                    Err(e) => {
                        cx.invalid(
                            doc_path,
                            format!(
                                "ConfigMap {} key {:?} is neither JSON nor YAML: {e}",
                                cx.key(&r.name),
                                r.key
                            ),
                        );
                        continue;
                    }
                }
            }
        };
        if let Err(e) = jsonschema::validator_for(&doc) {
            cx.invalid(doc_path, format!("invalid JSON Schema: {e}"));
            continue;
        }
        schemas.push(SchemaPlan {
            event_type: s.type_.clone(),
            dataschema: s.dataschema.clone(),
            schema: doc,
        });
    }
    ValidationPlan {
        max_event_bytes: capped_size(
            cx,
            v.max_event_bytes.as_ref(),
            "spec.validation.maxEventBytes",
            d.max_event_bytes,
        ),
        max_request_bytes: capped_size(
            cx,
            v.max_request_bytes.as_ref(),
            "spec.validation.maxRequestBytes",
            d.max_request_bytes,
        ),
        required_extensions,
        allow_unknown_types: v.allow_unknown_types.unwrap_or(d.allow_unknown_types),
        schemas,
    }
}

/// The largest `maxEventBytes` and `maxRequestBytes` accepted: the cap on a decompressed
/// stored payload. An event over it could be stored but never read back, and a larger request
/// limit would only let one client hold that much of a worker's memory.
pub const MAX_BODY_CEILING: u64 = crate::data::store::MAX_DECOMPRESSED_BYTES;

/// A request or event size limit: positive and at most [`MAX_BODY_CEILING`].
fn capped_size(cx: &mut Cx<'_>, value: Option<&String>, path: &str, default: usize) -> usize {
    let n = cx.size(value, path, default, false);
    if n as u64 > MAX_BODY_CEILING {
        cx.invalid(
            path,
            format!(
                "{:?} is above the ceiling of {} MiB (the largest payload Weir decompresses)",
                value.map(String::as_str).unwrap_or_default(),
                MAX_BODY_CEILING >> 20
            ),
        );
        return default;
    }
    n
}

/// A schema document stored as JSON or YAML text (JSON is tried first for its better errors).
pub(super) fn parse_json_or_yaml(text: &str) -> Result<serde_json::Value, String> {
    match serde_json::from_str(text) {
        Ok(v) => Ok(v),
        Err(json_err) => crate::yaml::from_str::<serde_json::Value>(text).map_err(|yaml_err| {
            let yaml_err = crate::yaml::short_message(&yaml_err);
            format!("as JSON: {json_err}; as YAML: {yaml_err}")
        }),
    }
}

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
                    cx.invalid(
                        "spec.ingest.auth.tokensSecretRef",
                        "required with mode Tokens",
                    );
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
    let Some(data) = cx.index.secrets.get(&key) else {
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

/// The PII settings are not planned yet (they have no runtime), but their references are
/// checked now so that a manifest that will not work says so today.
pub(super) fn check_ingest(cx: &mut Cx<'_>, spec: &EventStreamSpec) {
    if let Some(pii) = &spec.pii {
        let fields = pii.fields.as_deref().unwrap_or_default();
        // Accepting the fields would promise encryption that nothing performs.
        if !fields.is_empty() {
            cx.invalid(
                "spec.pii.fields",
                "PII field encryption is not supported yet: these fields would be stored and \
                 delivered in clear. Remove spec.pii.fields (it comes with field encryption)",
            );
        }
        for (i, f) in fields.iter().enumerate() {
            if !f.starts_with('/') {
                cx.invalid(
                    format!("spec.pii.fields[{i}]"),
                    format!("{f:?} is not a JSON pointer into data (it must start with '/')"),
                );
            }
        }
        match &pii.key_secret_ref {
            Some(r) => {
                cx.secret(r, "spec.pii.keySecretRef");
            }
            None if !fields.is_empty() => {
                cx.invalid("spec.pii.keySecretRef", "required when fields are listed")
            }
            None => {}
        }
    }
}

// ----------------------------------------------------------------------------------------------
// Subscription
