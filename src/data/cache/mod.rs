//! The read side's caches, one per CachePolicy, shared by the streams the policy selects.
//!
//! What is cached: one event by position, full range pages, a subject's events (the whole
//! list, kept only while it fits one read page of 1000 events; pages, `version` and `asOf`
//! select from it in memory), and correlation traces. Values are the
//! encoded response bodies, weighed by their size for `maxBytes`. A trace spans a namespace's
//! streams: it is cached only while every stored stream of the namespace running here is
//! selected by a policy (so every append that can change it invalidates it), in the cache of
//! the first of them by name.
//!
//! Strategies: `LRU` and `TTL` run on moka (LRU eviction; TTL = moka's expiry with LRU only
//! when full). `LFU` and `FIFO` run on [`bounded::Bounded`], a small structure of ours,
//! because moka's TinyLFU only decides admission and its eviction is recency-based. `ttl`
//! bounds every entry's age whatever the strategy.
//!
//! Correctness: an event at a position never changes, and a full page never changes, so those
//! entries need no invalidation (a stream re-created after a prune has a new store id, part
//! of the key). A subject changes on every append to it:
//! - on this replica, the publish handler invalidates the subjects it appended before it
//!   answers 2xx, so a read after the answer sees the append;
//! - every append also sends `NOTIFY weir_subjects` with the stream, its subjects and its
//!   correlation ids in the append's transaction (traces of those ids are dropped from every
//!   policy's cache); each replica listens per database and invalidates on receipt
//!   (typically milliseconds after the commit, well within a second). While a replica's
//!   listener is not connected, its caches for that database are bypassed, and every cache
//!   of the replica is cleared when it connects or disconnects, because notifications sent
//!   meanwhile are lost (and a trace of that database's streams may sit in any cache).
//! - The listener connects where the store's pool connects; when the pool fails over to
//!   another URL of its Secret, the listener reconnects there within a quarter of a second
//!   (clearing the caches), so it never listens on a server that no longer takes the appends.
//! - A read that misses takes a [`Ticket`] (a generation of the key's stripe) before querying
//!   the database and stores its result only if no invalidation of that stripe happened
//!   since, so a slow read can never put back a list that an append made stale.

pub mod bounded;
mod listener;

use crate::poison::{MutexExt, RwLockExt};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use prometheus::{IntCounter, IntGauge};
use tokio_util::sync::CancellationToken;

use crate::data::event::StoredEvent;
use crate::metrics::Metrics;
use crate::topology::{CachePlan, CacheStrategy, Key};

use bounded::{Bounded, Order};
use listener::{Listener, SubjectsNotice, listen};

/// The PostgreSQL notification channel that carries the subjects an append changed.
pub use crate::data::store::notify::SUBJECTS_CHANNEL;

/// Invalidation stripes per cache. A miss's ticket conflicts with any invalidation in its
/// stripe; 64 stripes keep false conflicts rare under write load at a fixed, tiny cost.
const STRIPES: usize = 64;

/// What a cached read is keyed by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CacheKey {
    /// One event.
    One {
        stream: Key,
        stream_id: i64,
        position: i64,
    },
    /// A full page (`limit` events from `from`).
    Range {
        stream: Key,
        stream_id: i64,
        from: i64,
        limit: i64,
    },
    /// Every event of a subject (a subject of at most one read page).
    Subject {
        stream: Key,
        stream_id: i64,
        subject: String,
    },
    /// A correlation trace of a namespace (default limit only).
    Trace {
        namespace: String,
        correlation_id: String,
    },
}

/// A cached answer.
#[derive(Debug)]
pub struct Cached {
    /// The encoded response body.
    pub body: Bytes,
    /// The events, kept for subject reads so pages, `version` and `asOf` select from them in
    /// memory.
    pub events: Option<Vec<StoredEvent>>,
}

impl Cached {
    fn weight(&self) -> u64 {
        self.body.len() as u64
    }
}

/// The generation of a key's stripe when a miss started; see [`PolicyCache::put`].
#[derive(Clone, Copy, Debug)]
pub struct Ticket {
    stripe: usize,
    generation: u64,
}

/// The storage behind a policy, by strategy.
enum Backing {
    Moka(moka::sync::Cache<CacheKey, Arc<Cached>>),
    /// The lock guards a plain map; it is never held across an await.
    Own(Mutex<Bounded<CacheKey, Arc<Cached>>>),
}

/// The cache of one CachePolicy.
pub struct PolicyCache {
    pub plan: CachePlan,
    backing: Backing,
    stripes: Box<[Mutex<u64>]>,
    hits: AtomicU64,
    misses: AtomicU64,
    hit_counter: IntCounter,
    miss_counter: IntCounter,
    evictions: IntCounter,
    entries: IntGauge,
}

fn stripe_of(key: &CacheKey) -> usize {
    let mut h = std::hash::DefaultHasher::new();
    match key {
        // Subject entries share the stripe of the subject, so its invalidation finds them.
        CacheKey::Subject {
            stream, subject, ..
        } => (stream, subject).hash(&mut h),
        other => other.hash(&mut h),
    }
    (h.finish() as usize) % STRIPES
}

fn subject_stripe(stream: &Key, subject: &str) -> usize {
    let mut h = std::hash::DefaultHasher::new();
    (stream, subject).hash(&mut h);
    (h.finish() as usize) % STRIPES
}

impl PolicyCache {
    /// A new, empty cache for `plan`, counting into `metrics`.
    pub fn new(plan: CachePlan, metrics: &Metrics) -> PolicyCache {
        let labels = [plan.key.namespace.as_str(), plan.key.name.as_str()];
        let hit_counter = metrics
            .cache_requests
            .with_label_values(&[labels[0], labels[1], "hit"]);
        let miss_counter = metrics
            .cache_requests
            .with_label_values(&[labels[0], labels[1], "miss"]);
        let evictions = metrics.cache_evictions.with_label_values(&labels);
        let entries = metrics.cache_entries.with_label_values(&labels);
        let items = usize::try_from(plan.max_items).unwrap_or(usize::MAX);
        let backing = match plan.strategy {
            CacheStrategy::Lru | CacheStrategy::Ttl => {
                let counter = evictions.clone();
                let mut b = moka::sync::Cache::builder()
                    .eviction_policy(moka::policy::EvictionPolicy::lru())
                    .time_to_live(plan.ttl)
                    .eviction_listener(move |_k, _v, cause| {
                        if cause.was_evicted() {
                            counter.inc();
                        }
                    });
                b = match plan.max_bytes {
                    // moka bounds one total weight. Weighing each entry at least the average
                    // share (maxBytes / maxItems) makes that one bound imply both: the bytes
                    // never exceed maxBytes and the entries never exceed maxItems.
                    Some(max_bytes) => {
                        let floor = max_bytes.div_ceil(plan.max_items.max(1));
                        b.max_capacity(max_bytes)
                            .weigher(move |_k, v: &Arc<Cached>| {
                                u32::try_from(v.weight().max(floor)).unwrap_or(u32::MAX)
                            })
                    }
                    None => b.max_capacity(plan.max_items),
                };
                Backing::Moka(b.build())
            }
            CacheStrategy::Lfu | CacheStrategy::Fifo => {
                let order = if plan.strategy == CacheStrategy::Lfu {
                    Order::Lfu
                } else {
                    Order::Fifo
                };
                Backing::Own(Mutex::new(Bounded::new(
                    order,
                    items,
                    plan.max_bytes,
                    Some(plan.ttl),
                )))
            }
        };
        PolicyCache {
            plan,
            backing,
            stripes: (0..STRIPES).map(|_| Mutex::new(0)).collect(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            hit_counter,
            miss_counter,
            evictions,
            entries,
        }
    }

    fn own(&self) -> Option<std::sync::MutexGuard<'_, Bounded<CacheKey, Arc<Cached>>>> {
        match &self.backing {
            Backing::Own(m) => Some(m.locked()),
            Backing::Moka(_) => None,
        }
    }

    /// Looks a key up without counting a hit or miss.
    fn peek(&self, key: &CacheKey) -> Option<Arc<Cached>> {
        match &self.backing {
            Backing::Moka(c) => c.get(key),
            Backing::Own(_) => {
                let (v, expired) = self.own().map(|mut b| b.get(key)).unwrap_or((None, 0));
                self.evictions.inc_by(expired);
                v
            }
        }
    }

    /// Looks a key up, counting a hit or a miss.
    pub fn get(&self, key: &CacheKey) -> Option<Arc<Cached>> {
        let v = self.peek(key);
        if v.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
            self.hit_counter.inc();
        } else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            self.miss_counter.inc();
        }
        v
    }

    /// Take before reading the database on a miss.
    pub fn ticket(&self, key: &CacheKey) -> Ticket {
        let stripe = stripe_of(key);
        let generation = *self.stripes[stripe].locked();
        Ticket { stripe, generation }
    }

    /// Stores a value read after `ticket` was taken, unless an invalidation of its stripe
    /// happened since (then the value may be stale and is dropped).
    pub fn put(&self, ticket: Ticket, key: CacheKey, value: Arc<Cached>) {
        let stripe = self.stripes[ticket.stripe].locked();
        if *stripe != ticket.generation {
            return;
        }
        // Inserted under the stripe lock: an invalidation cannot slip between check and insert.
        match &self.backing {
            Backing::Moka(c) => c.insert(key, value),
            Backing::Own(_) => {
                let weight = value.weight();
                let evicted = self
                    .own()
                    .map(|mut b| b.insert(key, value, weight))
                    .unwrap_or(0);
                self.evictions.inc_by(evicted);
            }
        }
    }

    /// Drops the cached events of a subject.
    pub fn invalidate_subject(&self, stream: &Key, stream_id: i64, subject: &str) {
        let key = CacheKey::Subject {
            stream: stream.clone(),
            stream_id,
            subject: subject.to_string(),
        };
        let mut stripe = self.stripes[subject_stripe(stream, subject)].locked();
        *stripe += 1;
        match &self.backing {
            Backing::Moka(c) => c.invalidate(&key),
            Backing::Own(_) => {
                if let Some(mut b) = self.own() {
                    b.remove(&key);
                }
            }
        }
    }

    /// Drops one entry (a trace), with the same protection against in-flight misses as a
    /// subject's invalidation.
    pub fn invalidate_key(&self, key: &CacheKey) {
        let mut stripe = self.stripes[stripe_of(key)].locked();
        *stripe += 1;
        match &self.backing {
            Backing::Moka(c) => c.invalidate(key),
            Backing::Own(_) => {
                if let Some(mut b) = self.own() {
                    b.remove(key);
                }
            }
        }
    }

    /// Drops everything (lost notifications, unreadable notification).
    pub fn invalidate_all(&self) {
        // Every stripe is held while clearing, so no miss that started earlier can insert.
        let mut guards: Vec<_> = self.stripes.iter().map(|s| s.locked()).collect();
        for g in &mut guards {
            **g += 1;
        }
        match &self.backing {
            Backing::Moka(c) => {
                c.invalidate_all();
                c.run_pending_tasks();
            }
            Backing::Own(_) => {
                if let Some(mut b) = self.own() {
                    b.clear();
                }
            }
        }
    }

    /// Runs moka's deferred maintenance (evictions, expiry) and purges expired own entries;
    /// tests call it before asserting, the metrics scrape before sampling.
    pub fn run_pending_tasks(&self) {
        match &self.backing {
            Backing::Moka(c) => c.run_pending_tasks(),
            Backing::Own(_) => {
                let n = self.own().map(|mut b| b.purge_expired()).unwrap_or(0);
                self.evictions.inc_by(n);
            }
        }
    }

    /// Entries held now.
    pub fn entry_count(&self) -> u64 {
        match &self.backing {
            Backing::Moka(c) => c.entry_count(),
            Backing::Own(_) => self.own().map_or(0, |b| b.len() as u64),
        }
    }

    /// Whether a key is held, without counting a hit or miss or touching LFU counts (tests).
    pub fn contains(&self, key: &CacheKey) -> bool {
        match &self.backing {
            Backing::Moka(c) => c.contains_key(key),
            Backing::Own(_) => self.own().is_some_and(|b| b.eviction_order().contains(key)),
        }
    }

    /// Hits over lookups since the cache was created; `None` before the first lookup.
    pub fn hit_ratio(&self) -> Option<f64> {
        let h = self.hits.load(Ordering::Relaxed);
        let m = self.misses.load(Ordering::Relaxed);
        (h + m > 0).then(|| h as f64 / (h + m) as f64)
    }

    /// Updates the entries gauge (at scrape time).
    pub fn sample(&self) {
        self.run_pending_tasks();
        self.entries.set(self.entry_count() as i64);
    }
}

/// Reads through `cache`: a hit answers from memory; a miss runs `load`, whose result is stored
/// when it says it is cacheable (e.g. a full page) and no invalidation raced it.
pub async fn read_through<E, F, Fut>(
    cache: Option<&PolicyCache>,
    key: CacheKey,
    load: F,
) -> Result<Arc<Cached>, E>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<(Cached, bool), E>>,
{
    let Some(cache) = cache else {
        return Ok(Arc::new(load().await?.0));
    };
    if let Some(hit) = cache.get(&key) {
        return Ok(hit);
    }
    let ticket = cache.ticket(&key);
    let (value, cacheable) = load().await?;
    let value = Arc::new(value);
    if cacheable {
        cache.put(ticket, key, value.clone());
    }
    Ok(value)
}

/// A stream's cache and whether invalidations of its database currently arrive.
#[derive(Clone)]
struct Route {
    cache: Arc<PolicyCache>,
    live: Arc<AtomicBool>,
}

#[derive(Default)]
struct Shared {
    policies: RwLock<HashMap<Key, Arc<PolicyCache>>>,
    routes: RwLock<HashMap<Key, Route>>,
}

impl Shared {
    /// Drops the traces of `ids` in `namespace` from every policy's cache.
    fn invalidate_traces<'a>(&self, namespace: &str, ids: impl IntoIterator<Item = &'a str>) {
        let policies: Vec<_> = self.policies.reading().values().cloned().collect();
        for id in ids {
            let key = CacheKey::Trace {
                namespace: namespace.to_string(),
                correlation_id: id.to_string(),
            };
            for p in &policies {
                p.invalidate_key(&key);
            }
        }
    }

    /// Clears every policy's cache.
    fn clear_all(&self) {
        let policies: Vec<_> = self.policies.reading().values().cloned().collect();
        for p in policies {
            p.invalidate_all();
        }
    }

    fn on_notification(&self, payload: &str) {
        // An unreadable payload, or one with too many subjects and ids to list (both are sent
        // as null then), may stand for any subject or trace, and a trace may be cached in any
        // policy's cache: every cache goes.
        let Ok(n) = serde_json::from_str::<SubjectsNotice>(payload) else {
            tracing::warn!("unreadable {SUBJECTS_CHANNEL} notification: clearing caches");
            self.clear_all();
            return;
        };
        let Some(subjects) = n.subjects else {
            self.clear_all();
            return;
        };
        let stream = Key::new(n.namespace, n.name);
        // A notification without the field (sent by an older version) names no ids.
        self.invalidate_traces(
            &stream.namespace,
            n.correlations.iter().flatten().map(String::as_str),
        );
        let route = self.routes.reading().get(&stream).cloned();
        if let Some(route) = route {
            for s in &subjects {
                route.cache.invalidate_subject(&stream, n.stream_id, s);
            }
        }
    }
}

/// Every policy's cache, the stream → cache routing, and one invalidation listener per
/// database that a cached stream uses.
pub struct Caches {
    metrics: Metrics,
    shared: Arc<Shared>,
    listeners: Mutex<HashMap<String, Listener>>,
}

/// A running stream with a store, as the caches see it: invalidations are received per
/// database (named by its first URL, as its pool is).
pub struct StreamStore<'a> {
    pub key: &'a Key,
    pub url: &'a str,
    pub store: &'a crate::data::store::Store,
}

impl Caches {
    pub fn new(metrics: Metrics) -> Caches {
        Caches {
            metrics,
            shared: Arc::new(Shared::default()),
            listeners: Mutex::new(HashMap::new()),
        }
    }

    /// Moves the caches to `plans`: a new or changed policy gets a new (empty) cache of its new
    /// size and strategy, a removed one is dropped. `streams` are the running streams (after
    /// the engine applied the same topology). Must run inside the Tokio runtime.
    pub fn apply(&self, plans: &BTreeMap<Key, CachePlan>, streams: &[StreamStore<'_>]) {
        let mut policies = self.shared.policies.writing();
        let gone: Vec<Key> = policies
            .keys()
            .filter(|k| !plans.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            policies.remove(&k);
            let l = [k.namespace.as_str(), k.name.as_str()];
            let m = &self.metrics;
            let _ = m.cache_requests.remove_label_values(&[l[0], l[1], "hit"]);
            let _ = m.cache_requests.remove_label_values(&[l[0], l[1], "miss"]);
            let _ = m.cache_evictions.remove_label_values(&l);
            let _ = m.cache_entries.remove_label_values(&l);
        }
        for (k, plan) in plans {
            if policies.get(k).is_some_and(|c| c.plan == *plan) {
                continue;
            }
            tracing::info!(policy = %k, strategy = ?plan.strategy, max_items = plan.max_items, "cache policy applied");
            policies.insert(
                k.clone(),
                Arc::new(PolicyCache::new(plan.clone(), &self.metrics)),
            );
        }
        // A database is named by its first URL (as its pool is); the listener connects where
        // that pool connects now, which after a failover is another of the URLs.
        let urls: HashMap<&Key, (&str, &crate::data::store::Store)> =
            streams.iter().map(|s| (s.key, (s.url, s.store))).collect();
        let mut listeners = self.listeners.locked();
        let mut routes = HashMap::new();
        let mut needed = HashSet::new();
        for cache in policies.values() {
            for s in &cache.plan.streams {
                let Some(&(url, store)) = urls.get(s) else {
                    continue;
                };
                needed.insert(url.to_string());
                let live = listeners
                    .entry(url.to_string())
                    .or_insert_with(|| self.spawn_listener(store))
                    .live
                    .clone();
                routes.insert(
                    s.clone(),
                    Route {
                        cache: cache.clone(),
                        live,
                    },
                );
            }
        }
        listeners.retain(|url, l| {
            let keep = needed.contains(url);
            if !keep {
                l.cancel.cancel();
            }
            keep
        });
        *self.shared.routes.writing() = routes;
    }

    fn spawn_listener(&self, store: &crate::data::store::Store) -> Listener {
        let cancel = CancellationToken::new();
        let live = Arc::new(AtomicBool::new(false));
        tokio::spawn(listen(
            store.notifier().clone(),
            self.shared.clone(),
            live.clone(),
            cancel.clone(),
        ));
        Listener { cancel, live }
    }

    /// The cache for reads of `stream`, if a policy selects it and its invalidations arrive.
    pub fn route(&self, stream: &Key) -> Option<Arc<PolicyCache>> {
        let routes = self.shared.routes.reading();
        let r = routes.get(stream)?;
        r.live.load(Ordering::Acquire).then(|| r.cache.clone())
    }

    /// Whether a policy selects `stream` (its publishes then invalidate subjects).
    pub fn covers(&self, stream: &Key) -> bool {
        self.shared.routes.reading().contains_key(stream)
    }

    /// The cache of a policy (status, tests).
    pub fn policy(&self, key: &Key) -> Option<Arc<PolicyCache>> {
        self.shared.policies.reading().get(key).cloned()
    }

    /// The cache for a trace of `namespace` whose stored streams here are `streams`: only
    /// when every one of them has a live route (so every append that can change the trace
    /// invalidates it here and on the other replicas); the first stream's cache holds it.
    pub fn trace_cache(&self, streams: &[Key]) -> Option<Arc<PolicyCache>> {
        let mut sorted: Vec<&Key> = streams.iter().collect();
        sorted.sort();
        let first = sorted.first()?;
        if sorted.iter().all(|k| self.route(k).is_some()) {
            self.route(first)
        } else {
            None
        }
    }

    /// Invalidates subjects and traces just appended to `stream` on this replica (before the
    /// 2xx).
    pub fn appended<'a>(
        &self,
        stream: &Key,
        stream_id: i64,
        subjects: impl IntoIterator<Item = &'a str>,
        correlations: impl IntoIterator<Item = &'a str>,
    ) {
        self.shared
            .invalidate_traces(&stream.namespace, correlations);
        let cache = {
            let routes = self.shared.routes.reading();
            routes.get(stream).map(|r| r.cache.clone())
        };
        if let Some(cache) = cache {
            for s in subjects {
                cache.invalidate_subject(stream, stream_id, s);
            }
        }
    }

    /// Updates the entries gauges (at scrape time).
    pub fn sample(&self) {
        let policies: Vec<_> = self.shared.policies.reading().values().cloned().collect();
        for p in policies {
            p.sample();
        }
    }

    /// Stops the listeners (shutdown).
    pub fn shutdown(&self) {
        let mut listeners = self.listeners.locked();
        for (_, l) in listeners.drain() {
            l.cancel.cancel();
        }
    }
}

#[cfg(test)]
mod tests;
