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

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

use crate::api;
use crate::api::archivepolicy::ArchivePolicySpec;
use crate::api::cachepolicy::CachePolicySpec;
use crate::api::common::selector_matches;
use crate::api::eventstream::{AuthMode, EventStreamSpec, ServiceAccountRef};
use crate::api::subscription::{DeadLetterSinkSpec, ServiceRef, SubscriptionSpec};
use crate::topology::Key;
use crate::topology::defaults::Defaults;
use crate::topology::filter::{is_attribute_name, parse_filters};
use crate::topology::index::{Index, Kind};
use crate::topology::plan::*;
use crate::topology::report::{Problem, Reason, Report};
use crate::topology::units::{is_dns_label, parse_duration, parse_size, resource_name_problem};

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

mod access;
mod policy;
mod rate_limit;
mod stream;
mod subscription;
mod tls;

use policy::{archive_plan, cache_plan, policies};
use stream::stream_plan;
pub use subscription::parse_start_from;
use subscription::subscription_plan;

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
        let plan = subscription_plan(
            &mut cx,
            key,
            &sub.metadata,
            &sub.spec,
            &built.topology.streams,
        );
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
        let mut cx = Cx {
            index,
            defaults,
            namespace: &key.namespace,
            problems: Vec::new(),
        };
        // Folder mode refuses such a name when loading; the API server allows dots in custom
        // resource names, so the operator's resources are checked here.
        if let Some(message) = resource_name_problem(&key.name) {
            cx.invalid("metadata.name", message);
        }
        cx
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

/// Whether a stream of `namespace` may publish to the exchange `name`: one under the
/// namespace's own prefix `weir.<namespace>.` always; another under `weir.` or `weir-` (other
/// namespaces' exchanges and Weir's own hash exchanges) never, so that one namespace cannot
/// claim or feed another's exchange; any other name only when the operator-wide setting
/// `allow_custom` (`--allow-custom-exchanges`) is on.
fn check_exchange_scope(name: &str, namespace: &str, allow_custom: bool) -> Result<(), String> {
    let prefix = format!("weir.{namespace}.");
    if name.len() > prefix.len() && name.starts_with(&prefix) {
        return Ok(());
    }
    if name.starts_with("weir.") || name.starts_with("weir-") {
        return Err(format!(
            "exchange {name:?} is outside this namespace's prefix {prefix:?}: names under \"weir.\" \
             and \"weir-\" belong to other namespaces and to Weir itself"
        ));
    }
    if allow_custom {
        return Ok(());
    }
    Err(format!(
        "exchange {name:?} is outside this namespace's prefix {prefix:?}; use a name starting with \
         {prefix:?}, or have the operator allow other names (--allow-custom-exchanges, \
         WEIR_ALLOW_CUSTOM_EXCHANGES=true, chart value operator.allowCustomExchanges)"
    ))
}

// ----------------------------------------------------------------------------------------------
// EventStream

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
