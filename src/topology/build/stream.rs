//! The plan of an EventStream: broker, store and its pools, batching, validation, ingest
//! limits and auth.

use super::*;
use crate::topology::pii::PiiPlan;

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
    // amqps:// is TLS on rustls (data::broker::tls), with spec.broker.tls for extra trust.
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
        let all: Vec<&String> = urls.iter().chain(read_urls.iter().flatten()).collect();
        let tls = super::tls::store_tls(cx, store.tls.as_ref(), &all);
        StorePlan {
            urls,
            read_urls,
            pool,
            tls,
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

    let pii = pii_plan(cx, spec);
    let access = super::access::access_plan(cx, spec);
    let rate_limit = super::rate_limit::rate_limit_plan(cx, spec);

    StreamPlan {
        key: key.clone(),
        generation: generation(meta),
        labels: meta.labels.clone().unwrap_or_default(),
        broker: BrokerPlan {
            tls: super::tls::broker_tls(cx, spec.broker.tls.as_ref(), &url),
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
        pii,
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
        if let Err(why) = crate::data::store::tls::url_tls(url) {
            cx.invalid(
                path,
                format!(
                    "Secret {} key {:?}: URL {} of {}: {why}",
                    cx.key(&r.name),
                    r.key,
                    i + 1,
                    urls.len()
                ),
            );
            continue;
        }
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

/// `spec.pii`: the fields (JSON pointers into `data`) and the key ring from
/// `spec.pii.keySecretRef`. Keys live with the subjects' data keys in the store, so a
/// broker-only stream cannot encrypt and is refused. `None`: nothing to encrypt.
pub(super) fn pii_plan(cx: &mut Cx<'_>, spec: &EventStreamSpec) -> Option<PiiPlan> {
    let pii = spec.pii.as_ref()?;
    let fields = pii.fields.clone().unwrap_or_default();
    let mut ok = true;
    for (i, f) in fields.iter().enumerate() {
        if !f.starts_with('/') {
            ok = false;
            cx.invalid(
                format!("spec.pii.fields[{i}]"),
                format!("{f:?} is not a JSON pointer into data (it must start with '/')"),
            );
        } else if fields[..i].contains(f) {
            ok = false;
            cx.invalid(
                format!("spec.pii.fields[{i}]"),
                format!("{f:?} is listed twice"),
            );
        }
    }
    if !fields.is_empty() && spec.store.is_none() {
        ok = false;
        cx.invalid(
            "spec.pii.fields",
            "personal-data encryption needs spec.store: the subjects' data keys are kept in \
             the event store (a broker-only stream would publish these fields in clear)",
        );
    }
    let keys = match &pii.key_secret_ref {
        Some(r) => cx.secret_text(r, "spec.pii.keySecretRef").and_then(|text| {
            match crate::topology::pii::KeyRing::parse(&text) {
                Ok(ring) => Some(ring),
                Err(e) => {
                    // The error names a line number, never key bytes.
                    cx.invalid(
                        "spec.pii.keySecretRef",
                        format!("Secret {} key {:?}: {e}", cx.key(&r.name), r.key),
                    );
                    None
                }
            }
        }),
        None if !fields.is_empty() => {
            cx.invalid("spec.pii.keySecretRef", "required when fields are listed");
            None
        }
        None => None,
    };
    if fields.is_empty() {
        return None;
    }
    let keys = keys?;
    ok.then_some(PiiPlan { fields, keys })
}

// ----------------------------------------------------------------------------------------------
// Subscription
