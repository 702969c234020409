//! The registry of caches: every policy's cache, the stream → cache routing, and the
//! invalidation listeners (one per database a cached stream uses).

use crate::poison::{MutexExt, RwLockExt};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio_util::sync::CancellationToken;

use super::listener::{Listener, SubjectsNotice, listen};
use super::{CacheKey, PolicyCache, SUBJECTS_CHANNEL};
use crate::metrics::Metrics;
use crate::topology::{CachePlan, Key};

/// A stream's cache and whether invalidations of its database currently arrive.
#[derive(Clone)]
pub(super) struct Route {
    pub(super) cache: Arc<PolicyCache>,
    pub(super) live: Arc<AtomicBool>,
}

#[derive(Default)]
pub(super) struct Shared {
    pub(super) policies: RwLock<HashMap<Key, Arc<PolicyCache>>>,
    pub(super) routes: RwLock<HashMap<Key, Route>>,
}

impl Shared {
    /// Drops the traces of `ids` in `namespace` from every policy's cache.
    pub(super) fn invalidate_traces<'a>(
        &self,
        namespace: &str,
        ids: impl IntoIterator<Item = &'a str>,
    ) {
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
    pub(super) fn clear_all(&self) {
        let policies: Vec<_> = self.policies.reading().values().cloned().collect();
        for p in policies {
            p.invalidate_all();
        }
    }

    pub(super) fn on_notification(&self, payload: &str) {
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
