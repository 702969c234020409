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
mod registry;

use crate::poison::MutexExt;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use prometheus::{IntCounter, IntGauge};

use crate::data::event::StoredEvent;
use crate::metrics::Metrics;
use crate::topology::{CachePlan, CacheStrategy, Key};

use bounded::{Bounded, Order};
pub use registry::{Caches, StreamStore};
#[cfg(test)]
use registry::{Route, Shared};

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

#[cfg(test)]
mod tests;
