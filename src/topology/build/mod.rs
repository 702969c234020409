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
use std::sync::Arc;

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

/// Builds the topology from `index`, filling unset fields from `defaults`: every resource
/// planned from scratch (`weir validate`, tests). A source that builds again and again keeps
/// a [`Builder`], which re-plans only what changed.
pub fn build(index: &Index, defaults: &Defaults) -> Built {
    Builder::new(defaults.clone()).build(index)
}

/// Builds topologies one after another, reusing the plan (and problems) of every EventStream
/// and Subscription whose inputs did not change since the previous build: its own object (its
/// generation, uid, labels and creation time: see [`Version`]), the Secrets and ConfigMaps it
/// read (compared by value), and for a Subscription the outcome of each EventStream it names.
/// So one change costs the plans it touches plus a walk of the index, not a build of every
/// resource.
///
/// What is always re-planned: objects without a generation, Subscriptions with a
/// `streamSelector` (they depend on every EventStream of their namespace), ArchivePolicies and
/// CachePolicies (few, and they select streams by label), and the exchange-ownership check
/// across streams (a map lookup per stream).
#[derive(Debug)]
pub struct Builder {
    defaults: Defaults,
    streams: BTreeMap<Key, Memo<Arc<StreamPlan>>>,
    subscriptions: BTreeMap<Key, Memo<Arc<SubscriptionPlan>>>,
    /// The last revision handed out (see [`Memo::revision`]).
    revision: u64,
    /// What the last build re-planned and reused.
    pub last: BuildCounts,
}

/// How many EventStreams and Subscriptions a build planned afresh and how many it reused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BuildCounts {
    pub planned: usize,
    pub reused: usize,
}

/// The outcome of one resource's plan, with what it was built from.
#[derive(Debug)]
struct Memo<P> {
    /// The object planned.
    version: Version,
    reads: Vec<Read>,
    /// Problems found by the resource's own plan (not the cross-stream exchange check).
    problems: Vec<Problem>,
    plan: P,
    /// EventStreams: the exchange-ownership problem of the last build, if any.
    exchange: Option<Problem>,
    /// EventStreams: a number that changes whenever the stream's outcome (problems or plan)
    /// may have changed; Subscriptions that name the stream compare it.
    revision: u64,
}

/// Something a plan read besides its own object, as it was when read.
#[derive(Clone, Debug, PartialEq)]
enum Read {
    Secret(Key, Option<BTreeMap<String, Vec<u8>>>),
    ConfigMap(Key, Option<BTreeMap<String, String>>),
    /// An EventStream by the revision of its outcome (`None`: absent).
    Stream(Key, Option<u64>),
}

impl Read {
    fn holds(&self, index: &Index, revisions: &Revisions<'_>) -> bool {
        match self {
            Read::Secret(k, v) => index.secrets.get(k) == v.as_ref(),
            Read::ConfigMap(k, v) => index.config_maps.get(k) == v.as_ref(),
            Read::Stream(k, r) => revisions.get(k) == *r,
        }
    }
}

/// What a plan reads of its own object besides the spec: an object whose generation (which
/// the API server, and the manifest folder's loader, raise on every spec change), uid, labels
/// and creation time are those of the memo is, for its plan, the same object. Not the
/// resourceVersion: every status write changes it, and re-planning every object whose status
/// was written since the last build would be most of them.
#[derive(Debug, PartialEq)]
struct Version {
    uid: Option<String>,
    generation: i64,
    labels: Option<BTreeMap<String, String>>,
    created: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

impl Version {
    /// `None` for an object without a generation: it cannot be recognised next time.
    fn of(meta: &ObjectMeta) -> Option<Version> {
        Some(Version {
            uid: meta.uid.clone(),
            generation: meta.generation?,
            labels: meta.labels.clone(),
            created: meta.creation_timestamp.clone(),
        })
    }

    fn matches(&self, meta: &ObjectMeta) -> bool {
        meta.generation == Some(self.generation)
            && meta.uid == self.uid
            && meta.labels == self.labels
            && meta.creation_timestamp == self.created
    }
}

impl<P: Clone> Memo<P> {
    /// The memo of `key`, if it was planned from this version of the object (`meta`) and
    /// nothing it read changed.
    fn reusable<'m>(
        memos: &'m BTreeMap<Key, Memo<P>>,
        key: &Key,
        meta: &ObjectMeta,
        index: &Index,
        revisions: &Revisions<'_>,
    ) -> Option<&'m Memo<P>> {
        memos.get(key).filter(|m| {
            m.version.matches(meta) && m.reads.iter().all(|r| r.holds(index, revisions))
        })
    }
}

impl Builder {
    pub fn new(defaults: Defaults) -> Builder {
        Builder {
            defaults,
            streams: BTreeMap::new(),
            subscriptions: BTreeMap::new(),
            revision: 0,
            last: BuildCounts::default(),
        }
    }

    pub fn defaults(&self) -> &Defaults {
        &self.defaults
    }

    /// Builds the topology of `index` (see the type's docs for what is reused). The memos
    /// are updated in place: a reused resource costs lookups, not copies.
    pub fn build(&mut self, index: &Index) -> Built {
        let defaults = self.defaults.clone();
        let defaults = &defaults;
        let mut built = Built::default();
        let mut counts = BuildCounts::default();
        // Memos of resources that left the index go first: a stream's memo is also its
        // revision, which Subscriptions compare.
        self.streams.retain(|k, _| index.streams.contains_key(k));
        self.subscriptions
            .retain(|k, _| index.subscriptions.contains_key(k));
        let unversioned = BTreeMap::new();
        let none = Revisions {
            memos: &BTreeMap::new(),
            unversioned: &unversioned,
        };

        // EventStreams: (key, generation, own problems, plan, what a fresh plan read).
        let mut stream_out = Vec::with_capacity(index.streams.len());
        for (key, es) in &index.streams {
            let reused = Memo::reusable(&self.streams, key, &es.metadata, index, &none);
            let (problems, plan, fresh) = match reused {
                Some(m) => {
                    counts.reused += 1;
                    (m.problems.clone(), m.plan.clone(), None)
                }
                None => {
                    counts.planned += 1;
                    let mut cx = Cx::new(index, defaults, key);
                    let plan = Arc::new(stream_plan(&mut cx, key, &es.metadata, &es.spec));
                    (cx.problems, plan, Some(cx.reads))
                }
            };
            stream_out.push((key, es, problems, plan, fresh));
        }
        // Two streams publishing to one exchange would mix their events: the older stream
        // keeps it.
        let mut exchange_owner: BTreeMap<std::borrow::Cow<'_, str>, &Key> = BTreeMap::new();
        // (creation time, key, position) of each stream, oldest first.
        let mut order: Vec<(_, &Key, usize)> = stream_out
            .iter()
            .enumerate()
            .map(|(i, (key, es, ..))| {
                let (created, key) = creation_order(&es.metadata, key);
                (created, key, i)
            })
            .collect();
        order.sort_unstable();
        let mut exchange_problems: Vec<Option<Problem>> = vec![None; stream_out.len()];
        for (_, key, i) in order {
            let exchange: std::borrow::Cow<'_, str> =
                match index.streams[key].spec.broker.exchange.as_deref() {
                    Some(e) if !e.is_empty() => e.into(),
                    _ => default_exchange(key).into(),
                };
            match exchange_owner.get(&exchange) {
                Some(owner) => {
                    exchange_problems[i] = Some(Problem {
                        path: "spec.broker.exchange".into(),
                        message: format!(
                            "exchange {exchange:?} is already used by EventStream {owner}"
                        ),
                        reason: Reason::InvalidSpec,
                    })
                }
                None => {
                    exchange_owner.insert(exchange, key);
                }
            }
        }
        let mut revision = self.revision;
        let mut next = || {
            revision += 1;
            revision
        };
        let mut unversioned = BTreeMap::new();
        for ((key, es, own, plan, fresh), exchange) in stream_out.into_iter().zip(exchange_problems)
        {
            let mut problems = own.clone();
            problems.extend(exchange.clone());
            match (fresh, Version::of(&es.metadata)) {
                (None, _) => {
                    // Reused: the same outcome unless the exchange check now says otherwise.
                    if let Some(m) = self.streams.get_mut(key)
                        && m.exchange != exchange
                    {
                        m.exchange = exchange;
                        m.revision = next();
                    }
                }
                (Some(reads), Some(version)) => {
                    let memo = Memo {
                        version,
                        reads,
                        problems: own,
                        plan: plan.clone(),
                        exchange,
                        revision: next(),
                    };
                    self.streams.insert(key.clone(), memo);
                }
                // Without a generation it cannot be recognised next time: a new outcome on
                // every build.
                (Some(_), None) => {
                    self.streams.remove(key);
                    unversioned.insert(key.clone(), next());
                }
            }
            finish(
                &mut built.reports,
                &mut built.topology.streams,
                Kind::EventStream,
                key.clone(),
                generation(&es.metadata),
                problems,
                plan,
            );
        }
        self.revision = revision;

        let revisions = Revisions {
            memos: &self.streams,
            unversioned: &unversioned,
        };
        for (key, sub) in &index.subscriptions {
            let reused = Memo::reusable(&self.subscriptions, key, &sub.metadata, index, &revisions);
            let (problems, plan) = match reused {
                Some(m) => {
                    counts.reused += 1;
                    (m.problems.clone(), m.plan.clone())
                }
                None => {
                    counts.planned += 1;
                    let mut cx = Cx::new(index, defaults, key);
                    cx.revisions = Some(&revisions);
                    let plan = Arc::new(subscription_plan(
                        &mut cx,
                        key,
                        &sub.metadata,
                        &sub.spec,
                        &built.topology.streams,
                    ));
                    match Version::of(&sub.metadata).filter(|_| !cx.volatile) {
                        Some(version) => {
                            let memo = Memo {
                                version,
                                reads: cx.reads,
                                problems: cx.problems.clone(),
                                plan: plan.clone(),
                                exchange: None,
                                revision: 0,
                            };
                            self.subscriptions.insert(key.clone(), memo);
                        }
                        None => {
                            self.subscriptions.remove(key);
                        }
                    }
                    (cx.problems, plan)
                }
            };
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
        self.last = counts;
        policies_into(&mut built, index, defaults);
        built
    }
}

/// The revision of each EventStream's outcome in this build: its memo's, or for a stream
/// without a generation, the one it got this time.
struct Revisions<'a> {
    memos: &'a BTreeMap<Key, Memo<Arc<StreamPlan>>>,
    unversioned: &'a BTreeMap<Key, u64>,
}

impl Revisions<'_> {
    fn get(&self, key: &Key) -> Option<u64> {
        self.memos
            .get(key)
            .map(|m| m.revision)
            .or_else(|| self.unversioned.get(key).copied())
    }
}

/// Plans the ArchivePolicies and CachePolicies of `index` into `built`.
fn policies_into(built: &mut Built, index: &Index, defaults: &Defaults) {
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
fn creation_order<'k>(
    meta: &ObjectMeta,
    key: &'k Key,
) -> (Option<k8s_openapi::jiff::Timestamp>, &'k Key) {
    (meta.creation_timestamp.as_ref().map(|t| t.0), key)
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
    /// What the plan read besides its own object (see [`Builder`]).
    reads: Vec<Read>,
    /// Set when the plan depends on more than it can list in `reads` (a label selector over
    /// a namespace's streams): it is planned again on every build.
    volatile: bool,
    /// The revisions of the streams' outcomes, once they are built (Subscriptions).
    revisions: Option<&'a Revisions<'a>>,
}

impl<'a> Cx<'a> {
    fn new(index: &'a Index, defaults: &'a Defaults, key: &'a Key) -> Cx<'a> {
        let mut cx = Cx {
            index,
            defaults,
            namespace: &key.namespace,
            problems: Vec::new(),
            reads: Vec::new(),
            volatile: false,
            revisions: None,
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

    fn read(&mut self, read: Read) {
        if !self.reads.contains(&read) {
            self.reads.push(read);
        }
    }

    /// A Secret's data, recorded as read.
    fn secret_data(&mut self, key: &Key) -> Option<&'a BTreeMap<String, Vec<u8>>> {
        let data = self.index.secrets.get(key);
        self.read(Read::Secret(key.clone(), data.cloned()));
        data
    }

    /// The bytes of a Secret key, or a SecretNotFound problem.
    fn secret(&mut self, r: &api::SecretKeyRef, path: &str) -> Option<Vec<u8>> {
        let key = self.key(&r.name);
        let Some(secret) = self.secret_data(&key) else {
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
        let cm = self.index.config_maps.get(&key);
        self.read(Read::ConfigMap(key.clone(), cm.cloned()));
        let Some(cm) = cm else {
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
        let revision = self.revisions.and_then(|r| r.get(&key));
        self.read(Read::Stream(key.clone(), revision));
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

#[cfg(test)]
mod incremental_tests;
