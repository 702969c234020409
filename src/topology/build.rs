//! Turns an [`Index`] of raw resources into a [`Topology`] of plans, with a [`Report`] for every
//! resource listing all of its problems.
//!
//! Every rule the CRD schema and its CEL rules enforce is checked here again: in standalone
//! mode no API server stands in front of the manifests. Beyond those, this checks what CEL
//! cannot: durations and sizes, Secret/ConfigMap/stream references, JSON Schemas, and conflicts
//! between resources.
//!
//! A resource with any problem gets no plan. Secret values never appear in messages.
//!
//! A reference to another Weir resource only needs that resource to exist: a Subscription whose
//! EventStream has problems is still valid, since the stream's last good version keeps running.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

use crate::api;
use crate::api::archivepolicy::ArchivePolicySpec;
use crate::api::cachepolicy::CachePolicySpec;
use crate::api::common::selector_matches;
use crate::api::eventstream::{AuthMode, EventStreamSpec};
use crate::api::subscription::{DeadLetterSinkSpec, ServiceRef, SubscriptionSpec};
use crate::topology::Key;
use crate::topology::defaults::Defaults;
use crate::topology::filter::{is_attribute_name, parse_filters};
use crate::topology::index::{Index, Kind};
use crate::topology::plan::*;
use crate::topology::units::{parse_duration, parse_size};

/// The outcome of [`build`]: the plans of the valid resources, and one report per resource.
#[derive(Clone, Debug, Default)]
pub struct Built {
    pub topology: Topology,
    /// One per resource of the index (valid ones included, with no problems), ordered by kind
    /// (EventStream, Subscription, ArchivePolicy, CachePolicy) then namespace/name.
    pub reports: Vec<Report>,
}

impl Built {
    /// The report of one resource.
    pub fn report(&self, kind: Kind, key: &Key) -> Option<&Report> {
        self.reports
            .iter()
            .find(|r| r.kind == kind && &r.key == key)
    }

    /// Whether every resource is valid.
    pub fn is_valid(&self) -> bool {
        self.reports.iter().all(Report::is_valid)
    }
}

/// The problems of one resource (none: the resource is valid and has a plan).
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub kind: Kind,
    pub key: Key,
    /// `metadata.generation` of the resource checked (0 when the source sets none).
    pub generation: i64,
    pub problems: Vec<Problem>,
}

impl Report {
    /// Whether the resource has no problem (and so has a plan).
    pub fn is_valid(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One thing wrong with a resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Where, e.g. `spec.batching.maxDelay` or `spec.filters[1].any[0].exact`.
    pub path: String,
    /// What is wrong, naming the offending value (never a Secret's value).
    pub message: String,
    pub reason: Reason,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a resource is not valid; used as the reason of its `Ready=False` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Reason {
    /// The spec itself is wrong; only an edit of the resource fixes it.
    InvalidSpec,
    /// A referenced Secret, or a key of it, does not exist (yet).
    SecretNotFound,
    /// A referenced ConfigMap, or a key of it, does not exist (yet).
    ConfigMapNotFound,
    /// A referenced EventStream does not exist (yet).
    StreamNotFound,
    /// An older policy of the same kind already selects the stream.
    PolicyConflict,
}

impl Reason {
    /// The reason as a condition `reason` (CamelCase).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidSpec => "InvalidSpec",
            Reason::SecretNotFound => "SecretNotFound",
            Reason::ConfigMapNotFound => "ConfigMapNotFound",
            Reason::StreamNotFound => "StreamNotFound",
            Reason::PolicyConflict => "PolicyConflict",
        }
    }

    /// Whether only an edit of the resource itself can fix the problem. The others wait on
    /// another object appearing or going away, so a controller should retry them.
    pub fn is_permanent(self) -> bool {
        matches!(self, Reason::InvalidSpec)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Builds the topology from `index`, filling unset fields from `defaults`.
pub fn build(index: &Index, defaults: &Defaults) -> Built {
    let mut built = Built::default();

    let mut stream_reports = Vec::new();
    for (key, es) in &index.streams {
        let mut cx = Cx::new(index, defaults, key);
        let plan = stream_plan(&mut cx, key, &es.metadata, &es.spec);
        stream_reports.push((key.clone(), generation(&es.metadata), cx.problems, plan));
    }
    // Two streams publishing to one exchange would mix their events: the older stream keeps it.
    let mut exchange_owner: BTreeMap<String, Key> = BTreeMap::new();
    let mut order: Vec<usize> = (0..stream_reports.len()).collect();
    order.sort_by_key(|&i| {
        creation_order(
            &index.streams[&stream_reports[i].0].metadata,
            &stream_reports[i].0,
        )
    });
    for i in order {
        let (key, _, problems, _) = &mut stream_reports[i];
        let exchange = index.streams[&*key]
            .spec
            .broker
            .exchange
            .clone()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| default_exchange(key));
        match exchange_owner.get(&exchange) {
            Some(owner) => problems.push(Problem {
                path: "spec.broker.exchange".into(),
                message: format!("exchange {exchange:?} is already used by EventStream {owner}"),
                reason: Reason::InvalidSpec,
            }),
            None => {
                exchange_owner.insert(exchange, key.clone());
            }
        }
    }
    for (key, generation, problems, plan) in stream_reports {
        finish(
            &mut built.reports,
            &mut built.topology.streams,
            Kind::EventStream,
            key,
            generation,
            problems,
            plan,
        );
    }

    for (key, sub) in &index.subscriptions {
        let mut cx = Cx::new(index, defaults, key);
        let plan = subscription_plan(&mut cx, key, &sub.metadata, &sub.spec);
        let problems = cx.problems;
        finish(
            &mut built.reports,
            &mut built.topology.subscriptions,
            Kind::Subscription,
            key.clone(),
            generation(&sub.metadata),
            problems,
            plan,
        );
    }

    let archive: Vec<(&Key, &ObjectMeta, &ArchivePolicySpec)> = index
        .archive_policies
        .iter()
        .map(|(k, p)| (k, &p.metadata, &p.spec))
        .collect();
    for (key, generation, problems, plan) in policies(
        index,
        &archive,
        |p| (p.streams.as_ref(), p.stream_names.as_deref()),
        archive_plan,
        defaults,
        "ArchivePolicy",
    ) {
        finish(
            &mut built.reports,
            &mut built.topology.archive_policies,
            Kind::ArchivePolicy,
            key,
            generation,
            problems,
            plan,
        );
    }

    let cache: Vec<(&Key, &ObjectMeta, &CachePolicySpec)> = index
        .cache_policies
        .iter()
        .map(|(k, p)| (k, &p.metadata, &p.spec))
        .collect();
    for (key, generation, problems, plan) in policies(
        index,
        &cache,
        |p| (p.streams.as_ref(), p.stream_names.as_deref()),
        cache_plan,
        defaults,
        "CachePolicy",
    ) {
        finish(
            &mut built.reports,
            &mut built.topology.cache_policies,
            Kind::CachePolicy,
            key,
            generation,
            problems,
            plan,
        );
    }

    built
}

/// Records the report of one resource and, if it has no problem, its plan.
fn finish<P>(
    reports: &mut Vec<Report>,
    plans: &mut BTreeMap<Key, P>,
    kind: Kind,
    key: Key,
    generation: i64,
    problems: Vec<Problem>,
    plan: P,
) {
    if problems.is_empty() {
        plans.insert(key.clone(), plan);
    }
    reports.push(Report {
        kind,
        key,
        generation,
        problems,
    });
}

fn generation(meta: &ObjectMeta) -> i64 {
    meta.generation.unwrap_or(0)
}

/// Older first; resources without a creation time (manifest files) by namespace/name.
fn creation_order(meta: &ObjectMeta, key: &Key) -> (Option<k8s_openapi::jiff::Timestamp>, Key) {
    (meta.creation_timestamp.as_ref().map(|t| t.0), key.clone())
}

fn default_exchange(key: &Key) -> String {
    format!("weir.{}.{}", key.namespace, key.name)
}

/// Collects the problems of one resource and resolves its references.
struct Cx<'a> {
    index: &'a Index,
    defaults: &'a Defaults,
    namespace: &'a str,
    problems: Vec<Problem>,
}

impl<'a> Cx<'a> {
    fn new(index: &'a Index, defaults: &'a Defaults, key: &'a Key) -> Cx<'a> {
        Cx {
            index,
            defaults,
            namespace: &key.namespace,
            problems: Vec::new(),
        }
    }

    fn push(&mut self, path: impl Into<String>, message: impl Into<String>, reason: Reason) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
            reason,
        });
    }

    fn invalid(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.push(path, message, Reason::InvalidSpec);
    }

    fn key(&self, name: &str) -> Key {
        Key::new(self.namespace, name)
    }

    /// A duration field, or `default` when unset. On error, records it and returns `default`
    /// (the plan is discarded anyway; going on finds the resource's other problems).
    fn duration(&mut self, value: Option<&String>, path: &str, default: Duration) -> Duration {
        match value.map(|v| parse_duration(v)) {
            None => default,
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                self.invalid(path, e.to_string());
                default
            }
        }
    }

    /// Like [`Cx::duration`], and zero is a problem.
    fn positive_duration(
        &mut self,
        value: Option<&String>,
        path: &str,
        default: Duration,
    ) -> Duration {
        let d = self.duration(value, path, default);
        if d.is_zero() {
            self.invalid(path, "must be greater than zero");
        }
        d
    }

    /// A byte size field, or `default` when unset; zero is a problem unless `zero_ok`.
    fn size(&mut self, value: Option<&String>, path: &str, default: usize, zero_ok: bool) -> usize {
        let Some(v) = value else { return default };
        match parse_size(v) {
            Err(e) => {
                self.invalid(path, e.to_string());
                default
            }
            Ok(0) if !zero_ok => {
                self.invalid(path, "must be greater than zero");
                default
            }
            Ok(n) => usize::try_from(n).unwrap_or_else(|_| {
                self.invalid(path, format!("size {v:?} is too large for this machine"));
                default
            }),
        }
    }

    /// The bytes of a Secret key, or a SecretNotFound problem.
    fn secret(&mut self, r: &api::SecretKeyRef, path: &str) -> Option<Vec<u8>> {
        let key = self.key(&r.name);
        let Some(secret) = self.index.secrets.get(&key) else {
            self.push(
                path,
                format!("Secret {key} not found"),
                Reason::SecretNotFound,
            );
            return None;
        };
        match secret.get(&r.key) {
            Some(v) => Some(v.clone()),
            None => {
                self.push(
                    path,
                    format!("Secret {key} has no key {:?}", r.key),
                    Reason::SecretNotFound,
                );
                None
            }
        }
    }

    /// A Secret key as text, surrounding whitespace removed (values written with `echo` end in
    /// a newline).
    fn secret_text(&mut self, r: &api::SecretKeyRef, path: &str) -> Option<String> {
        let bytes = self.secret(r, path)?;
        match String::from_utf8(bytes) {
            Ok(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
            Ok(_) => {
                self.invalid(
                    path,
                    format!("Secret {} key {:?} is empty", self.key(&r.name), r.key),
                );
                None
            }
            Err(_) => {
                self.invalid(
                    path,
                    format!(
                        "Secret {} key {:?} is not UTF-8 text",
                        self.key(&r.name),
                        r.key
                    ),
                );
                None
            }
        }
    }

    fn config_map(&mut self, r: &api::ConfigMapKeyRef, path: &str) -> Option<String> {
        let key = self.key(&r.name);
        let Some(cm) = self.index.config_maps.get(&key) else {
            self.push(
                path,
                format!("ConfigMap {key} not found"),
                Reason::ConfigMapNotFound,
            );
            return None;
        };
        match cm.get(&r.key) {
            Some(v) => Some(v.clone()),
            None => {
                self.push(
                    path,
                    format!("ConfigMap {key} has no key {:?}", r.key),
                    Reason::ConfigMapNotFound,
                );
                None
            }
        }
    }

    /// An EventStream of this namespace, or a StreamNotFound problem.
    fn stream(&mut self, name: &str, path: &str) -> Option<(Key, &'a api::EventStream)> {
        let key = self.key(name);
        match self.index.streams.get(&key) {
            Some(s) => Some((key, s)),
            None => {
                self.push(
                    path,
                    format!("EventStream {key} not found"),
                    Reason::StreamNotFound,
                );
                None
            }
        }
    }
}

/// Whether `s` is an absolute URL with one of `schemes` and a host.
fn check_url(s: &str, schemes: &[&str]) -> bool {
    let Ok(uri) = s.parse::<http::Uri>() else {
        return false;
    };
    uri.scheme_str().is_some_and(|sc| schemes.contains(&sc))
        && uri.authority().is_some_and(|a| !a.host().is_empty())
}

/// RFC 1123 label, as Kubernetes names of Services are.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// AMQP 0-9-1 exchange names: up to 255 bytes of letters, digits, `-`, `_`, `.`, `:`; `amq.`
/// is reserved by the broker.
fn check_exchange(name: &str) -> Result<(), &'static str> {
    if name.len() > 255 {
        return Err("must be at most 255 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return Err("may contain only letters, digits, '-', '_', '.' and ':'");
    }
    if name.starts_with("amq.") {
        return Err("names starting with \"amq.\" are reserved by RabbitMQ");
    }
    Ok(())
}

// ----------------------------------------------------------------------------------------------
// EventStream

fn stream_plan(
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
    }
}

/// One or more comma-separated PostgreSQL URLs.
fn postgres_urls(cx: &mut Cx<'_>, text: &str, r: &api::SecretKeyRef, path: &str) -> Vec<String> {
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

fn pool_plan(cx: &mut Cx<'_>, pool: Option<&api::eventstream::PoolSpec>) -> PoolPlan {
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

fn zstd_level(cx: &mut Cx<'_>, level: Option<i32>, default: i32, path: &str) -> i32 {
    match level {
        None => default,
        Some(l) if (1..=22).contains(&l) => l,
        Some(l) => {
            cx.invalid(path, format!("zstd level {l} is outside 1..=22"));
            default
        }
    }
}

fn validation_plan(
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
        max_event_bytes: cx.size(
            v.max_event_bytes.as_ref(),
            "spec.validation.maxEventBytes",
            d.max_event_bytes,
            false,
        ),
        max_request_bytes: cx.size(
            v.max_request_bytes.as_ref(),
            "spec.validation.maxRequestBytes",
            d.max_request_bytes,
            false,
        ),
        required_extensions,
        allow_unknown_types: v.allow_unknown_types.unwrap_or(d.allow_unknown_types),
        schemas,
    }
}

/// A schema document stored as JSON or YAML text (JSON is tried first for its better errors).
fn parse_json_or_yaml(text: &str) -> Result<serde_json::Value, String> {
    match serde_json::from_str(text) {
        Ok(v) => Ok(v),
        Err(json_err) => serde_yaml::from_str::<serde_json::Value>(text)
            .map_err(|yaml_err| format!("as JSON: {json_err}; as YAML: {yaml_err}")),
    }
}

/// The ingest and PII settings are not planned yet (they have no runtime), but their references
/// are checked now so that a manifest that will not work says so today.
fn check_ingest(cx: &mut Cx<'_>, spec: &EventStreamSpec) {
    if let Some(auth) = spec.ingest.as_ref().and_then(|i| i.auth.as_ref()) {
        match auth.mode.unwrap_or(AuthMode::None) {
            AuthMode::None => {}
            AuthMode::Tokens => match &auth.tokens_secret_ref {
                None => cx.invalid(
                    "spec.ingest.auth.tokensSecretRef",
                    "required with mode Tokens",
                ),
                Some(r) => {
                    let key = cx.key(&r.name);
                    match cx.index.secrets.get(&key) {
                        None => cx.push(
                            "spec.ingest.auth.tokensSecretRef",
                            format!("Secret {key} not found"),
                            Reason::SecretNotFound,
                        ),
                        Some(s) if s.is_empty() => cx.invalid(
                            "spec.ingest.auth.tokensSecretRef",
                            format!("Secret {key} holds no token"),
                        ),
                        Some(_) => {}
                    }
                }
            },
            AuthMode::ServiceAccounts => {
                if auth.service_accounts.as_ref().is_none_or(|s| s.is_empty()) {
                    cx.invalid(
                        "spec.ingest.auth.serviceAccounts",
                        "at least one service account is required with mode ServiceAccounts",
                    );
                }
            }
        }
    }
    if let Some(pii) = &spec.pii {
        let fields = pii.fields.as_deref().unwrap_or_default();
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

fn subscription_plan(
    cx: &mut Cx<'_>,
    key: &Key,
    meta: &ObjectMeta,
    spec: &SubscriptionSpec,
) -> SubscriptionPlan {
    let stream = cx.stream(&spec.stream, "spec.stream");
    let broker_only = stream.as_ref().is_some_and(|(_, s)| s.spec.store.is_none());
    let stream_key = stream
        .map(|(k, _)| k)
        .unwrap_or_else(|| cx.key(&spec.stream));

    let filters = match parse_filters(spec.filters.as_deref().unwrap_or_default(), "spec.filters") {
        Ok(f) => f,
        Err(problems) => {
            cx.problems.extend(problems);
            Vec::new()
        }
    };

    // Sink.
    let s = &spec.sink;
    let url =
        destination_url(cx, s.uri.as_deref(), s.ref_.as_ref(), "spec.sink").unwrap_or_default();
    let auth_token = s
        .auth_secret_ref
        .as_ref()
        .and_then(|r| cx.secret_text(r, "spec.sink.authSecretRef"));
    let sink = SinkPlan {
        url,
        format: match s.format {
            Some(api::subscription::SinkFormat::Structured) => SinkFormat::Structured,
            Some(api::subscription::SinkFormat::Binary) | None => SinkFormat::Binary,
        },
        auth_token,
    };

    // Delivery.
    let d = DeliveryPlan::default();
    let dl = spec.delivery.clone().unwrap_or_default();
    let delivery = DeliveryPlan {
        timeout: cx.positive_duration(dl.timeout.as_ref(), "spec.delivery.timeout", d.timeout),
        retry: dl.retry.unwrap_or(d.retry),
        backoff_policy: match dl.backoff_policy {
            Some(api::subscription::BackoffPolicy::Linear) => BackoffPolicy::Linear,
            Some(api::subscription::BackoffPolicy::Exponential) | None => {
                BackoffPolicy::Exponential
            }
        },
        backoff_delay: cx.duration(
            dl.backoff_delay.as_ref(),
            "spec.delivery.backoffDelay",
            d.backoff_delay,
        ),
        backoff_max: cx.duration(
            dl.backoff_max.as_ref(),
            "spec.delivery.backoffMax",
            d.backoff_max,
        ),
        retry_after_max: cx.duration(
            dl.retry_after_max.as_ref(),
            "spec.delivery.retryAfterMax",
            d.retry_after_max,
        ),
        dead_letter: dl
            .dead_letter_sink
            .as_ref()
            .and_then(|dls| dead_letter_plan(cx, dls)),
    };
    if delivery.backoff_delay > delivery.backoff_max {
        cx.invalid(
            "spec.delivery.backoffDelay",
            format!(
                "{:?} exceeds backoffMax ({:?})",
                dl.backoff_delay.as_deref().unwrap_or("200ms"),
                dl.backoff_max.as_deref().unwrap_or("5m")
            ),
        );
    }

    let start_from = match parse_start_from(spec.start_from.as_deref().unwrap_or("latest")) {
        Ok(sf) => sf,
        Err(msg) => {
            cx.invalid("spec.startFrom", msg);
            StartFrom::Latest
        }
    };
    if start_from != StartFrom::Latest && broker_only {
        cx.invalid(
            "spec.startFrom",
            format!(
                "{:?} replays stored events, but EventStream {stream_key} has no store (use latest, or give the stream a store)",
                spec.start_from.as_deref().unwrap_or_default()
            ),
        );
    }

    let partition_key = spec
        .partition_key
        .clone()
        .unwrap_or_else(|| "subject".to_string());
    if !is_attribute_name(&partition_key) {
        cx.invalid(
            "spec.partitionKey",
            format!("{partition_key:?} is not a CloudEvents attribute name (lowercase letters and digits)"),
        );
    }
    let partitions = spec.partitions.unwrap_or(4);
    if partitions == 0 {
        cx.invalid("spec.partitions", "must be at least 1");
    }
    let ordering = match spec.ordering {
        Some(api::subscription::DeliveryOrdering::PerKey) => OrderingPlan::PerKey {
            partition_key,
            partitions,
        },
        Some(api::subscription::DeliveryOrdering::None) | None => OrderingPlan::None,
    };
    let consumers = spec.consumers.unwrap_or(4);
    if consumers == 0 {
        cx.invalid("spec.consumers", "must be at least 1");
    }
    let reply = spec
        .reply
        .as_ref()
        .and_then(|r| cx.stream(&r.stream, "spec.reply.stream"))
        .map(|(k, _)| k);

    SubscriptionPlan {
        key: key.clone(),
        generation: generation(meta),
        stream: stream_key,
        filters,
        sink,
        delivery,
        start_from,
        ordering,
        consumers,
        rate_limit: spec
            .rate_limit
            .as_ref()
            .and_then(|r| r.events_per_second)
            .filter(|n| *n > 0),
        reply,
        deletion_policy: match spec.deletion_policy {
            Some(api::DeletionPolicy::Retain) => DeletionPolicy::Retain,
            Some(api::DeletionPolicy::Delete) | None => DeletionPolicy::Delete,
        },
    }
}

/// The URL of a sink given as exactly one of `uri` or `ref`.
fn destination_url(
    cx: &mut Cx<'_>,
    uri: Option<&str>,
    service: Option<&ServiceRef>,
    path: &str,
) -> Option<String> {
    match (uri, service) {
        (Some(uri), None) => {
            if check_url(uri, &["http", "https"]) {
                Some(uri.to_string())
            } else {
                cx.invalid(
                    format!("{path}.uri"),
                    format!("{uri:?} is not an absolute http:// or https:// URL"),
                );
                None
            }
        }
        (None, Some(r)) => {
            let before = cx.problems.len();
            if let Some(kind) = r.kind.as_deref().filter(|k| *k != "Service") {
                cx.invalid(
                    format!("{path}.ref.kind"),
                    format!("kind {kind:?} is not supported: only Service"),
                );
            }
            if !is_dns_label(&r.name) {
                cx.invalid(
                    format!("{path}.ref.name"),
                    format!("{:?} is not a valid Service name", r.name),
                );
            }
            let port = r.port.unwrap_or(80);
            if port == 0 {
                cx.invalid(format!("{path}.ref.port"), "must be 1-65535");
            }
            let p = r.path.as_deref().unwrap_or("/");
            if !p.starts_with('/') || p.parse::<http::uri::PathAndQuery>().is_err() {
                cx.invalid(
                    format!("{path}.ref.path"),
                    format!("{p:?} is not an absolute URL path"),
                );
            }
            (cx.problems.len() == before)
                .then(|| format!("http://{}.{}.svc:{port}{p}", r.name, cx.namespace))
        }
        (None, None) | (Some(_), Some(_)) => {
            cx.invalid(path, "exactly one of uri or ref must be set");
            None
        }
    }
}

fn dead_letter_plan(cx: &mut Cx<'_>, dls: &DeadLetterSinkSpec) -> Option<DeadLetterPlan> {
    const PATH: &str = "spec.delivery.deadLetterSink";
    let set = [dls.uri.is_some(), dls.ref_.is_some(), dls.stream.is_some()]
        .into_iter()
        .filter(|x| *x)
        .count();
    if set != 1 {
        cx.invalid(PATH, "exactly one of uri, ref or stream must be set");
        return None;
    }
    match &dls.stream {
        Some(name) => cx
            .stream(name, &format!("{PATH}.stream"))
            .map(|(k, _)| DeadLetterPlan::Stream(k)),
        None => destination_url(cx, dls.uri.as_deref(), dls.ref_.as_ref(), PATH)
            .map(DeadLetterPlan::Sink),
    }
}

/// `latest` | `earliest` | an RFC 3339 time | a position (digits, >= 1).
pub fn parse_start_from(s: &str) -> Result<StartFrom, String> {
    match s {
        "latest" => return Ok(StartFrom::Latest),
        "earliest" => return Ok(StartFrom::Earliest),
        _ => {}
    }
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return match s.parse::<i64>() {
            Ok(p) if p >= 1 => Ok(StartFrom::Position(p)),
            _ => Err(format!("position {s:?} must be between 1 and {}", i64::MAX)),
        };
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| StartFrom::Time(t.with_timezone(&chrono::Utc)))
        .map_err(|_| {
            format!(
                "invalid startFrom {s:?}: expected latest, earliest, an RFC 3339 time (e.g. \"2024-05-01T00:00:00Z\") or a position (e.g. \"1200\")"
            )
        })
}

// ----------------------------------------------------------------------------------------------
// ArchivePolicy and CachePolicy

/// The streams a policy selects, each with the path of the field that selected it.
fn select_streams(
    cx: &mut Cx<'_>,
    selector: Option<&LabelSelector>,
    names: Option<&[String]>,
    kind: &str,
) -> Vec<(Key, String)> {
    match (selector, names) {
        (Some(_), Some(_)) | (None, None) => {
            cx.invalid("spec", "exactly one of streams or streamNames must be set");
            Vec::new()
        }
        (Some(sel), None) => {
            let mut out = Vec::new();
            let ns = cx.namespace.to_string();
            for (key, es) in cx.index.streams.range(Key::new(ns.clone(), "")..) {
                if key.namespace != ns {
                    break;
                }
                let labels = es.metadata.labels.clone().unwrap_or_default();
                match selector_matches(sel, &labels) {
                    Err(e) => {
                        cx.invalid("spec.streams", format!("invalid label selector: {e}"));
                        return Vec::new();
                    }
                    // A selector naturally matches broker-only streams too; they have nothing
                    // to archive or cache, so they are left out rather than reported.
                    Ok(true) if es.spec.store.is_some() => {
                        out.push((key.clone(), "spec.streams".to_string()))
                    }
                    Ok(_) => {}
                }
            }
            out
        }
        (None, Some(names)) => {
            let mut out = Vec::new();
            for (i, name) in names.iter().enumerate() {
                let path = format!("spec.streamNames[{i}]");
                if let Some((key, es)) = cx.stream(name, &path) {
                    if es.spec.store.is_none() {
                        cx.invalid(
                            path,
                            format!("EventStream {key} has no store: a {kind} applies only to stored events"),
                        );
                    } else if !out.iter().any(|(k, _)| k == &key) {
                        out.push((key, path));
                    }
                }
            }
            out
        }
    }
}

type PolicyOutcome<P> = (Key, i64, Vec<Problem>, P);

/// Builds the policies of one kind. A stream may be selected by one policy of a kind only: the
/// oldest (by creation time, then namespace/name) keeps it and every later one reports a
/// PolicyConflict. Claims are made whatever the rest of a policy's validity, so that fixing an
/// unrelated mistake in an older policy does not suddenly break a newer one.
fn policies<S, P>(
    index: &Index,
    items: &[(&Key, &ObjectMeta, &S)],
    selection: impl Fn(&S) -> (Option<&LabelSelector>, Option<&[String]>),
    plan: impl Fn(&mut Cx<'_>, &Key, &ObjectMeta, &S, Vec<Key>) -> P,
    defaults: &Defaults,
    kind: &str,
) -> Vec<PolicyOutcome<P>> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| creation_order(items[i].1, items[i].0));
    let mut claimed: BTreeMap<Key, Key> = BTreeMap::new();
    let mut out: BTreeMap<Key, PolicyOutcome<P>> = BTreeMap::new();
    for i in order {
        let (key, meta, spec) = items[i];
        let mut cx = Cx::new(index, defaults, key);
        let (selector, names) = selection(spec);
        let mut streams = Vec::new();
        for (stream, path) in select_streams(&mut cx, selector, names, kind) {
            match claimed.get(&stream) {
                Some(owner) => cx.push(
                    path,
                    format!("EventStream {stream} is already selected by {kind} {owner}"),
                    Reason::PolicyConflict,
                ),
                None => {
                    claimed.insert(stream.clone(), key.clone());
                    streams.push(stream);
                }
            }
        }
        streams.sort();
        let p = plan(&mut cx, key, meta, spec, streams);
        out.insert(key.clone(), (key.clone(), generation(meta), cx.problems, p));
    }
    out.into_values().collect()
}

fn archive_plan(
    cx: &mut Cx<'_>,
    key: &Key,
    meta: &ObjectMeta,
    spec: &ArchivePolicySpec,
    streams: Vec<Key>,
) -> ArchivePlan {
    let archive_after = cx.positive_duration(
        spec.archive_after.as_ref(),
        "spec.archiveAfter",
        cx.defaults.archive_after,
    );
    let delete_after = spec
        .delete_after
        .as_ref()
        .map(|v| cx.positive_duration(Some(v), "spec.deleteAfter", Duration::MAX));
    if let Some(del) = delete_after
        && del != Duration::MAX
        && del <= archive_after
    {
        cx.invalid(
            "spec.deleteAfter",
            format!(
                "{:?} must exceed archiveAfter ({})",
                spec.delete_after.as_deref().unwrap_or_default(),
                spec.archive_after
                    .clone()
                    .unwrap_or_else(|| format!("{}d", archive_after.as_secs() / 86_400))
            ),
        );
    }
    let segment = spec.segment.clone().unwrap_or_default();
    let segment_max_events = match segment.max_events {
        None => 100_000,
        Some(0) => {
            cx.invalid("spec.segment.maxEvents", "must be at least 1");
            1
        }
        // A u32 always fits the usize of the 64- and 32-bit targets Weir is built for.
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
    };
    let compression = spec.compression.clone().unwrap_or_default();
    let destination = match &spec.destination {
        None => ArchiveDestinationPlan::Store,
        Some(d) => match (&d.store, &d.volume) {
            (Some(_), None) => ArchiveDestinationPlan::Store,
            (None, Some(v)) => {
                if !v.path.starts_with('/') {
                    cx.invalid(
                        "spec.destination.volume.path",
                        format!("{:?} must be an absolute path", v.path),
                    );
                }
                ArchiveDestinationPlan::Volume(PathBuf::from(&v.path))
            }
            _ => {
                cx.invalid(
                    "spec.destination",
                    "exactly one of store or volume must be set",
                );
                ArchiveDestinationPlan::Store
            }
        },
    };
    ArchivePlan {
        key: key.clone(),
        generation: generation(meta),
        streams,
        archive_after,
        delete_after,
        schedule: cx.positive_duration(
            spec.schedule.as_ref(),
            "spec.schedule",
            Duration::from_secs(3600),
        ),
        segment_max_events,
        segment_max_bytes: cx.size(
            segment.max_bytes.as_ref(),
            "spec.segment.maxBytes",
            64 << 20,
            false,
        ),
        compression_level: zstd_level(cx, compression.level, 6, "spec.compression.level"),
        dictionary: compression.dictionary.unwrap_or(true),
        destination,
    }
}

fn cache_plan(
    cx: &mut Cx<'_>,
    key: &Key,
    meta: &ObjectMeta,
    spec: &CachePolicySpec,
    streams: Vec<Key>,
) -> CachePlan {
    use api::cachepolicy::CacheStrategy as S;
    let max_items = match spec.max_items {
        None => cx.defaults.cache_max_items,
        Some(0) => {
            cx.invalid("spec.maxItems", "must be at least 1");
            1
        }
        Some(n) => n,
    };
    let max_bytes = spec.max_bytes.as_ref().map(|v| match parse_size(v) {
        Ok(0) => {
            cx.invalid("spec.maxBytes", "must be greater than zero");
            0
        }
        Ok(n) => n,
        Err(e) => {
            cx.invalid("spec.maxBytes", e.to_string());
            0
        }
    });
    CachePlan {
        key: key.clone(),
        generation: generation(meta),
        streams,
        strategy: match spec.strategy {
            Some(S::Lru) | None => CacheStrategy::Lru,
            Some(S::Lfu) => CacheStrategy::Lfu,
            Some(S::Fifo) => CacheStrategy::Fifo,
            Some(S::Ttl) => CacheStrategy::Ttl,
        },
        max_items,
        max_bytes,
        ttl: cx.positive_duration(spec.ttl.as_ref(), "spec.ttl", cx.defaults.cache_ttl),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_from_forms() {
        assert_eq!(parse_start_from("latest"), Ok(StartFrom::Latest));
        assert_eq!(parse_start_from("earliest"), Ok(StartFrom::Earliest));
        assert_eq!(parse_start_from("1200"), Ok(StartFrom::Position(1200)));
        assert_eq!(
            parse_start_from("2024-05-01T02:00:00+02:00"),
            Ok(StartFrom::Time(
                chrono::DateTime::parse_from_rfc3339("2024-05-01T00:00:00Z")
                    .unwrap()
                    .with_timezone(&chrono::Utc)
            ))
        );
        for bad in [
            "0",
            "99999999999999999999",
            "Latest",
            "",
            "yesterday",
            "-5",
            "2024-05-01",
        ] {
            assert!(parse_start_from(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_and_urls() {
        assert!(check_url(
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            &["amqp", "amqps"]
        ));
        assert!(check_url(
            "postgres://u:p@db:5432/x",
            &["postgres", "postgresql"]
        ));
        assert!(!check_url("http://x", &["amqp"]));
        assert!(!check_url("amqp:///vhost", &["amqp"]));
        assert!(!check_url("not a url", &["http"]));
        assert!(is_dns_label("notifier-2"));
        assert!(!is_dns_label("Notifier") && !is_dns_label("-a") && !is_dns_label(""));
        assert!(check_exchange("weir.shop.orders").is_ok());
        assert!(check_exchange("amq.topic").is_err());
        assert!(check_exchange("has space").is_err());
    }

    #[test]
    fn reasons() {
        assert!(Reason::InvalidSpec.is_permanent());
        assert!(!Reason::SecretNotFound.is_permanent());
        assert_eq!(Reason::PolicyConflict.to_string(), "PolicyConflict");
    }
}
