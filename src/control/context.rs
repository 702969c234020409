//! What every reconcile shares: the API client, the controllers' caches, the data plane, the
//! status queue and the leadership flag.

use crate::poison::MutexExt;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Client;
use kube::Resource;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;
use prometheus::IntCounterVec;

use crate::api::{ArchivePolicy, CachePolicy, EventStream, Subscription};
use crate::control::refs::{RefCache, Refs, refs_of};
use crate::control::status_writer::StatusQueue;
use crate::control::{CONTROLLER_NAME, ControlError, FINALIZER};
use crate::data::plane::{ApplyReport, Plane};
use crate::metrics::Metrics;
use crate::topology::{Defaults, Index, Key, Kind};

/// Tunables of the control plane.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How often a valid resource is reconciled again (status samples such as the head or the
    /// backlog) and how old a cached Secret may get before it is read again.
    pub refresh: Duration,
    /// Base URL shown as the streams' endpoint in status.
    pub endpoint_base: String,
    /// How long a reconcile waits for the controllers' caches to fill at startup.
    pub cache_sync_timeout: Duration,
    /// Label selector of the worker Pods, written as every Subscription's `status.selector`:
    /// the `/scale` subresource's selector, through which an HPA reads the metrics of the Pods
    /// that run the subscription's consumers (every worker runs every subscription).
    pub pod_selector: String,
}

/// The worker Pods' labels as the chart sets them (`--pod-selector` overrides).
pub const DEFAULT_POD_SELECTOR: &str =
    "app.kubernetes.io/name=weir,app.kubernetes.io/component=operator";

impl Default for Settings {
    fn default() -> Self {
        Settings {
            refresh: Duration::from_secs(60),
            endpoint_base: "http://weir:8080".to_string(),
            cache_sync_timeout: Duration::from_secs(30),
            pod_selector: DEFAULT_POD_SELECTOR.to_string(),
        }
    }
}

/// The controllers' caches (one per kind and watched namespace).
#[derive(Clone, Default)]
pub struct Stores {
    pub streams: Vec<Store<EventStream>>,
    pub subscriptions: Vec<Store<Subscription>>,
    pub archive_policies: Vec<Store<ArchivePolicy>>,
    pub cache_policies: Vec<Store<CachePolicy>>,
    /// The Secrets and ConfigMaps each object's spec references, by the object's uid and
    /// resourceVersion: finding them walks the spec as JSON, which an index of every object
    /// would otherwise do for all of them on every change.
    refs_memo: Arc<Mutex<HashMap<(Kind, Key), RefsMemo>>>,
}

/// The memo of one [`Stores::index`]: entries of the last one, and those of this one.
struct Memoized {
    old: HashMap<(Kind, Key), RefsMemo>,
    new: HashMap<(Kind, Key), RefsMemo>,
}

/// Adds the Secrets and ConfigMaps `spec` references to `refs`, from the memo when this
/// version of the object was seen before.
fn add_refs(
    refs: &mut Refs,
    memo: &mut Memoized,
    kind: Kind,
    key: &Key,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: &impl serde::Serialize,
) {
    let id = (kind, key.clone());
    let entry = match (memo.old.remove(&id), &meta.resource_version) {
        (Some(m), Some(v)) if &m.version == v && m.uid == meta.uid => m,
        _ => {
            let found = serde_json::to_value(spec)
                .map(|spec| refs_of(&key.namespace, &spec))
                .unwrap_or_default();
            match &meta.resource_version {
                Some(version) => RefsMemo {
                    uid: meta.uid.clone(),
                    version: version.clone(),
                    refs: found,
                },
                // Without a version it cannot be recognised next time: not kept.
                None => {
                    refs.extend(&found);
                    return;
                }
            }
        }
    };
    refs.extend(&entry.refs);
    memo.new.insert(id, entry);
}

/// [`Stores::refs_memo`]: one object's references, for one version of it.
#[derive(Clone)]
struct RefsMemo {
    uid: Option<String>,
    version: String,
    refs: Refs,
}

/// Waits for one cache's first list. A cache's readiness wakes only its latest waiter (the
/// controller itself waits on it too), so a second waiter polls again every 100 ms.
async fn ready<K>(store: &Store<K>)
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    while tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready())
        .await
        .is_err()
    {}
}

fn key_of<K: Resource>(obj: &K) -> Option<Key> {
    Some(Key::new(
        obj.meta().namespace.clone()?,
        obj.meta().name.clone()?,
    ))
}

/// What of `obj` the topology is built from, hashed: identity, spec (through `generation`,
/// which the API server bumps on every spec change and never on a status write), labels
/// (policy selectors) and what decides its deletion. Status writes leave it unchanged.
fn fingerprint<K: Resource>(kind: Kind, obj: &K) -> u64 {
    let m = obj.meta();
    let mut h = std::hash::DefaultHasher::new();
    (
        kind,
        &m.namespace,
        &m.name,
        &m.uid,
        m.generation,
        // Finalizers matter only once deleting (see `gone`): the one every object gets on its
        // first reconcile must not make every other reconcile build again.
        m.deletion_timestamp.is_some().then_some(&m.finalizers),
        &m.labels,
    )
        .hash(&mut h);
    h.finish()
}

fn deleting<K: Resource>(obj: &K) -> bool {
    obj.meta().deletion_timestamp.is_some()
}

/// What a sync keeps of the objects being deleted.
pub struct Deleting<'a> {
    /// The object whose cleanup this sync is (it leaves the topology now, and is pruned).
    pub cleaning: Option<(Kind, &'a Key)>,
    /// Whether this replica holds the Lease. Only the holder runs cleanups, so only the holder
    /// keeps a deleting object running until its cleanup: a replica that kept its consumers
    /// would declare the queues again right after the holder's cleanup deleted them.
    pub leader: bool,
    /// uids whose cleanup finished here. The finalizer's removal reaches the cache a moment
    /// later; a sync in between must not start the object again (and re-declare its queues).
    pub cleaned: &'a HashSet<String>,
}

/// Whether a deleted object must leave the topology now: it is being deleted and either has
/// no cleanup finalizer left (its cleanup is done, or it never needed one), is being or has
/// been cleaned up here, or this replica does not hold the Lease. Until then it keeps running
/// on the holder, so that its cleanup finds it and can honour its deletionPolicy.
fn gone<K: Resource>(obj: &K, key: &Key, kind: Kind, d: &Deleting<'_>) -> bool {
    if !deleting(obj) {
        return false;
    }
    let finalized = obj
        .meta()
        .finalizers
        .iter()
        .flatten()
        .any(|f| f == FINALIZER);
    let cleaned = obj
        .meta()
        .uid
        .as_ref()
        .is_some_and(|uid| d.cleaned.contains(uid));
    !finalized || !d.leader || cleaned || d.cleaning == Some((kind, key))
}

impl Stores {
    /// Waits until every cache has completed its first list.
    pub async fn wait_until_ready(&self, timeout: Duration) -> Result<(), ControlError> {
        let all = async {
            for s in &self.streams {
                ready(s).await;
            }
            for s in &self.subscriptions {
                ready(s).await;
            }
            for s in &self.archive_policies {
                ready(s).await;
            }
            for s in &self.cache_policies {
                ready(s).await;
            }
        };
        tokio::time::timeout(timeout, all)
            .await
            .map_err(|_| ControlError::DataPlane("the watch caches did not fill in time".into()))
    }

    /// All EventStreams currently cached.
    pub fn streams(&self) -> Vec<Arc<EventStream>> {
        self.streams.iter().flat_map(Store::state).collect()
    }

    /// All Subscriptions currently cached.
    pub fn subscriptions(&self) -> Vec<Arc<Subscription>> {
        self.subscriptions.iter().flat_map(Store::state).collect()
    }

    /// Live (not deleting) Subscriptions of the stream `key`.
    pub fn subscriptions_of(&self, key: &Key) -> Vec<String> {
        self.subscriptions()
            .iter()
            .filter(|s| !deleting(s.as_ref()))
            .filter(|s| {
                s.metadata.namespace.as_deref() == Some(key.namespace.as_str())
                    && s.spec.named_streams().any(|n| n == key.name)
            })
            .filter_map(|s| s.metadata.name.clone())
            .collect()
    }

    /// The uids of every cached object being deleted.
    pub fn deleting_uids(&self) -> HashSet<String> {
        fn uids<K>(stores: &[Store<K>]) -> Vec<String>
        where
            K: Resource<DynamicType = ()> + Clone + 'static,
        {
            stores
                .iter()
                .flat_map(Store::state)
                .filter(|o| deleting(o.as_ref()))
                .filter_map(|o| o.meta().uid.clone())
                .collect()
        }
        let mut out: HashSet<String> = uids(&self.streams).into_iter().collect();
        out.extend(uids(&self.subscriptions));
        out.extend(uids(&self.archive_policies));
        out.extend(uids(&self.cache_policies));
        out
    }

    /// The EventStreams being deleted.
    pub fn deleting_streams(&self) -> BTreeSet<Key> {
        self.streams()
            .iter()
            .filter(|s| deleting(s.as_ref()))
            .filter_map(|s| key_of(s.as_ref()))
            .collect()
    }

    /// The kind and key of every cached object, those being deleted included.
    pub fn keys(&self) -> HashSet<(Kind, Key)> {
        fn add<K>(kind: Kind, stores: &[Store<K>], out: &mut HashSet<(Kind, Key)>)
        where
            K: Resource<DynamicType = ()> + Clone + 'static,
        {
            let keys = stores.iter().flat_map(Store::state);
            out.extend(keys.filter_map(|o| key_of(o.as_ref())).map(|k| (kind, k)));
        }
        let mut out = HashSet::new();
        add(Kind::EventStream, &self.streams, &mut out);
        add(Kind::Subscription, &self.subscriptions, &mut out);
        add(Kind::ArchivePolicy, &self.archive_policies, &mut out);
        add(Kind::CachePolicy, &self.cache_policies, &mut out);
        out
    }

    /// The objects the topology is built from, summarised: equal fingerprints mean the same
    /// objects in the same state as far as a build is concerned (a sum of per-object hashes,
    /// so the caches' iteration order does not matter). O(objects), without cloning them.
    pub fn fingerprint(&self) -> (usize, u64) {
        let mut n = 0;
        let mut sum = 0u64;
        let mut add = |h: u64| {
            n += 1;
            sum = sum.wrapping_add(h);
        };
        for o in self.streams.iter().flat_map(Store::state) {
            add(fingerprint(Kind::EventStream, o.as_ref()));
        }
        for o in self.subscriptions.iter().flat_map(Store::state) {
            add(fingerprint(Kind::Subscription, o.as_ref()));
        }
        for o in self.archive_policies.iter().flat_map(Store::state) {
            add(fingerprint(Kind::ArchivePolicy, o.as_ref()));
        }
        for o in self.cache_policies.iter().flat_map(Store::state) {
            add(fingerprint(Kind::CachePolicy, o.as_ref()));
        }
        (n, sum)
    }

    /// The index of every resource that should run, and the Secrets/ConfigMaps they
    /// reference (to be filled in by the caller). Objects being deleted are left out once
    /// their cleanup is done, or when `cleaning` names them; an EventStream that still has
    /// live Subscriptions keeps running under them regardless.
    pub fn index(&self, d: &Deleting<'_>) -> (Index, Refs) {
        let mut index = Index::default();
        let mut refs = Refs::default();
        let mut memo = Memoized {
            old: std::mem::take(&mut *self.refs_memo.locked()),
            new: HashMap::new(),
        };
        let live_subs: BTreeSet<Key> = self
            .subscriptions()
            .iter()
            .filter(|s| !deleting(s.as_ref()))
            .flat_map(|s| {
                let ns = s.metadata.namespace.clone().unwrap_or_default();
                s.spec
                    .named_streams()
                    .map(|n| Key::new(ns.clone(), n))
                    .collect::<Vec<_>>()
            })
            .collect();
        for s in self.streams() {
            let Some(key) = key_of(s.as_ref()) else {
                continue;
            };
            if gone(s.as_ref(), &key, Kind::EventStream, d) && !live_subs.contains(&key) {
                continue;
            }
            add_refs(
                &mut refs,
                &mut memo,
                Kind::EventStream,
                &key,
                &s.metadata,
                &s.spec,
            );
            index.streams.insert(key, s.clone());
        }
        for s in self.subscriptions() {
            let Some(key) = key_of(s.as_ref()) else {
                continue;
            };
            if gone(s.as_ref(), &key, Kind::Subscription, d) {
                continue;
            }
            add_refs(
                &mut refs,
                &mut memo,
                Kind::Subscription,
                &key,
                &s.metadata,
                &s.spec,
            );
            index.subscriptions.insert(key, s.clone());
        }
        for p in self.archive_policies.iter().flat_map(Store::state) {
            if let Some(key) = key_of(p.as_ref())
                && !gone(p.as_ref(), &key, Kind::ArchivePolicy, d)
            {
                index.archive_policies.insert(key, p.clone());
            }
        }
        for p in self.cache_policies.iter().flat_map(Store::state) {
            if let Some(key) = key_of(p.as_ref())
                && !gone(p.as_ref(), &key, Kind::CachePolicy, d)
            {
                index.cache_policies.insert(key, p.clone());
            }
        }
        // Objects that left the caches leave the memo.
        *self.refs_memo.locked() = memo.new;
        (index, refs)
    }
}

/// Shared state of every reconcile.
pub struct Context {
    pub client: Client,
    /// Builds every sync's topology (with the operator's defaults), re-planning only what
    /// changed; held only while building, under `apply_lock`.
    pub builder: Mutex<crate::topology::Builder>,
    pub plane: Arc<Plane>,
    pub stores: Stores,
    pub refs: RefCache,
    pub status: StatusQueue,
    pub recorder: Recorder,
    pub settings: Settings,
    /// Whether this replica holds the Lease (status, finalizers, Events, data removal).
    pub leader: Arc<AtomicBool>,
    /// Serialises topology applies: the data plane moves from one whole topology to the next.
    pub apply_lock: tokio::sync::Mutex<()>,
    /// uids of deleting objects whose cleanup finished on this replica (see [`Deleting`]);
    /// entries leave once their object has left the caches, so it holds at most the objects
    /// being deleted.
    pub cleaned: Mutex<HashSet<String>>,
    /// Consecutive failures per resource, for the exponential backoff of transient errors.
    /// Keyed by kind too: a stream and a subscription may share a name, not a backoff.
    pub failures: Mutex<HashMap<(Kind, Key), u32>>,
    /// Since when each valid resource that is not Ready yet has been found so, for the
    /// spacing of its re-checks.
    pub settling: Mutex<HashMap<(Kind, Key), std::time::Instant>>,
    /// The last sync that applied cleanly (see [`SyncStamp`]).
    pub last_sync: Mutex<Option<LastSync>>,
    /// `weir_operator_syncs_total{outcome}`: `applied` (built and applied) or `unchanged`
    /// (the inputs were those of the last clean apply: nothing built).
    pub syncs: IntCounterVec,
}

/// A sync that applied cleanly: what it was built from and what it reported.
#[derive(Clone, Debug)]
pub struct LastSync {
    pub stamp: SyncStamp,
    /// The Secrets and ConfigMaps its objects reference.
    pub refs: Refs,
    pub report: ApplyReport,
}

/// Everything a sync's topology depends on. Each reconcile syncs the whole topology, so N
/// objects reconciled after one change (a start, a relist, the Lease changing hands) would
/// build and apply N times, O(N) each; with an unchanged stamp the topology running is already
/// the one a build would give, and the sync costs one pass over the caches instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncStamp {
    /// [`Stores::fingerprint`].
    pub objects: (usize, u64),
    /// [`RefCache::version`].
    pub refs: u64,
    pub leader: bool,
    /// [`Context::cleaned`] (it decides which deleting objects still run).
    pub cleaned: HashSet<String>,
}

/// The `weir_operator_syncs_total` counter, registered on `registry` (a second registration
/// on the same registry is ignored).
pub fn syncs_counter(registry: &prometheus::Registry) -> IntCounterVec {
    // The metric name and label are static and valid: construction cannot fail.
    let c = IntCounterVec::new(
        prometheus::Opts::new(
            "weir_operator_syncs_total",
            "Topology syncs of the operator's reconciles by outcome: applied, or unchanged \
             (nothing changed since the last clean apply: no build)",
        ),
        &["outcome"],
    )
    .expect("static metric definition");
    let _ = registry.register(Box::new(c.clone()));
    c
}

impl Context {
    /// A context for reconciler tests: a fresh data plane, empty caches, leadership held, a
    /// status queue whose receiver is returned.
    pub fn test(
        client: Client,
        stores: Stores,
    ) -> (
        Arc<Context>,
        tokio::sync::mpsc::Receiver<crate::control::status_writer::StatusUpdate>,
    ) {
        let plane = Arc::new(Plane::new(
            Metrics::new(),
            crate::data::batcher::Limits::default().queue_requests,
            Settings::default().endpoint_base,
            crate::data::delivery::SinkGuard::new(Default::default(), &[]),
        ));
        let (status, rx) = StatusQueue::new(64, &plane.engine.metrics.registry);
        let plane_registry = plane.engine.metrics.registry.clone();
        let ctx = Context {
            recorder: Recorder::new(client.clone(), reporter(None)),
            client,
            builder: Mutex::new(crate::topology::Builder::new(Defaults::default())),
            plane,
            stores,
            refs: RefCache::default(),
            status,
            settings: Settings::default(),
            leader: Arc::new(AtomicBool::new(true)),
            apply_lock: tokio::sync::Mutex::new(()),
            cleaned: Mutex::new(HashSet::new()),
            failures: Mutex::new(HashMap::new()),
            settling: Mutex::new(HashMap::new()),
            last_sync: Mutex::new(None),
            syncs: syncs_counter(&plane_registry),
        };
        (Arc::new(ctx), rx)
    }

    /// Whether this replica holds the Lease.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Acquire)
    }

    /// Records a failure of the `kind` resource `key` and returns how many in a row.
    pub fn failed(&self, kind: Kind, key: &Key) -> u32 {
        let mut f = self.failures.locked();
        let n = f.entry((kind, key.clone())).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    /// Forgets the failures of the `kind` resource `key` after a successful reconcile.
    pub fn succeeded(&self, kind: Kind, key: &Key) {
        self.failures.locked().remove(&(kind, key.clone()));
    }

    /// Drops the backoff and settling entries of objects that have left the caches. A
    /// finalized object's cleanup removes its own; a policy (no finalizer), or any object on
    /// a replica that does not hold the Lease, leaves without a cleanup here, and its
    /// entries would otherwise stay for the life of the process.
    pub fn forget_departed(&self) {
        let present = self.stores.keys();
        self.failures.locked().retain(|k, _| present.contains(k));
        self.settling.locked().retain(|k, _| present.contains(k));
    }
}

/// The reporter of Events: the controller name and this replica's Pod.
pub fn reporter(instance: Option<String>) -> Reporter {
    Reporter {
        controller: CONTROLLER_NAME.to_string(),
        instance,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn subscription(deleting: bool, finalized: bool) -> Subscription {
        let mut s: Subscription = serde_json::from_value(serde_json::json!({
            "apiVersion": "weir.dev/v1alpha1",
            "kind": "Subscription",
            "metadata": {"name": "audit", "namespace": "shop", "uid": "u-1"},
            "spec": {"stream": "orders", "sink": {"uri": "http://sink/"}},
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        if deleting {
            s.metadata.deletion_timestamp = Some(Time(
                "2026-01-01T00:00:00Z"
                    .parse()
                    .unwrap_or_else(|e| panic!("{e}")),
            ));
        }
        if finalized {
            s.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
        }
        s
    }

    #[test]
    fn who_keeps_a_deleting_object_running() {
        let key = Key::new("shop", "audit");
        let none = HashSet::new();
        let cleaned = HashSet::from(["u-1".to_string()]);
        let d = |leader, cleaned, cleaning| Deleting {
            cleaning,
            leader,
            cleaned,
        };
        let sub = Kind::Subscription;
        // Not being deleted: runs everywhere.
        assert!(!gone(
            &subscription(false, true),
            &key,
            sub,
            &d(false, &none, None)
        ));
        // Being deleted, cleanup pending: only the Lease holder keeps it (for the cleanup).
        let pending = subscription(true, true);
        assert!(!gone(&pending, &key, sub, &d(true, &none, None)));
        assert!(gone(&pending, &key, sub, &d(false, &none, None)));
        // Its own cleanup, and every sync after it until the finalizer's removal is cached.
        assert!(gone(
            &pending,
            &key,
            sub,
            &d(true, &none, Some((sub, &key)))
        ));
        assert!(gone(&pending, &key, sub, &d(true, &cleaned, None)));
        // Another kind with the same name is not the one being cleaned.
        assert!(!gone(
            &pending,
            &key,
            sub,
            &d(true, &none, Some((Kind::EventStream, &key)))
        ));
        // Finalizer gone: gone everywhere.
        assert!(gone(
            &subscription(true, false),
            &key,
            sub,
            &d(true, &none, None)
        ));
    }
}
