//! A small bounded map with FIFO or LFU eviction, for the two strategies moka does not
//! offer: moka evicts by recency (its TinyLFU is an admission filter, not least-frequently-used
//! eviction) and has no pure insertion order.
//!
//! Eviction order is a `BTreeMap` keyed by a rank, so finding the victim is O(log n):
//! - FIFO: rank = (0, insertion tick). Reads do not move an entry.
//! - LFU: rank = (reads + 1, tick of the last use). The victim is the entry used least often;
//!   among equals the one used least recently.
//!
//! Every entry also leaves once older than `ttl` (checked on read and by [`Bounded::purge_expired`]).

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::time::Duration;

use tokio::time::Instant;

/// Which entry leaves first when the map is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// The oldest insertion.
    Fifo,
    /// The least frequently read (ties: the least recently used).
    Lfu,
}

struct Slot<V> {
    value: V,
    weight: u64,
    rank: (u64, u64),
    inserted: Instant,
}

/// A map bounded by entries and, optionally, by total weight (bytes).
pub struct Bounded<K, V> {
    order: Order,
    max_items: usize,
    max_weight: Option<u64>,
    ttl: Option<Duration>,
    map: HashMap<K, Slot<V>>,
    queue: BTreeMap<(u64, u64), K>,
    tick: u64,
    weight: u64,
}

impl<K: Clone + Eq + Hash, V: Clone> Bounded<K, V> {
    /// `max_items` is at least 1 (a zero is treated as 1).
    pub fn new(
        order: Order,
        max_items: usize,
        max_weight: Option<u64>,
        ttl: Option<Duration>,
    ) -> Self {
        Bounded {
            order,
            max_items: max_items.max(1),
            max_weight,
            ttl,
            map: HashMap::new(),
            queue: BTreeMap::new(),
            tick: 0,
            weight: 0,
        }
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn expired(&self, slot: &Slot<V>, now: Instant) -> bool {
        self.ttl
            .is_some_and(|ttl| now.saturating_duration_since(slot.inserted) >= ttl)
    }

    /// The value, if present and not expired. Returns `(value, expired_evictions)`.
    pub fn get(&mut self, key: &K) -> (Option<V>, u64) {
        let now = Instant::now();
        let Some(slot) = self.map.get(key) else {
            return (None, 0);
        };
        if self.expired(slot, now) {
            self.remove(key);
            return (None, 1);
        }
        if self.order == Order::Lfu {
            let tick = self.next_tick();
            // The key is present: checked just above.
            if let Some(slot) = self.map.get_mut(key) {
                let old = slot.rank;
                slot.rank = (old.0 + 1, tick);
                let rank = slot.rank;
                let value = slot.value.clone();
                if let Some(k) = self.queue.remove(&old) {
                    self.queue.insert(rank, k);
                }
                return (Some(value), 0);
            }
        }
        (self.map.get(key).map(|s| s.value.clone()), 0)
    }

    /// Inserts (or replaces) an entry and evicts until the bounds hold again. An entry heavier
    /// than the whole weight bound is not stored. Returns the number of evicted entries.
    pub fn insert(&mut self, key: K, value: V, weight: u64) -> u64 {
        if self.max_weight.is_some_and(|max| weight > max) {
            self.remove(&key);
            return 0;
        }
        self.remove(&key);
        let tick = self.next_tick();
        let rank = match self.order {
            Order::Fifo => (0, tick),
            Order::Lfu => (1, tick),
        };
        let mut evicted = 0;
        while self.map.len() >= self.max_items
            || self
                .max_weight
                .is_some_and(|max| self.weight + weight > max && !self.map.is_empty())
        {
            if !self.evict_one() {
                break;
            }
            evicted += 1;
        }
        self.queue.insert(rank, key.clone());
        self.weight += weight;
        self.map.insert(
            key,
            Slot {
                value,
                weight,
                rank,
                inserted: Instant::now(),
            },
        );
        evicted
    }

    fn evict_one(&mut self) -> bool {
        let Some((_, key)) = self.queue.pop_first() else {
            return false;
        };
        if let Some(slot) = self.map.remove(&key) {
            self.weight -= slot.weight;
        }
        true
    }

    /// Removes an entry (invalidation); true if it was present.
    pub fn remove(&mut self, key: &K) -> bool {
        match self.map.remove(key) {
            Some(slot) => {
                self.queue.remove(&slot.rank);
                self.weight -= slot.weight;
                true
            }
            None => false,
        }
    }

    /// Removes every entry.
    pub fn clear(&mut self) {
        self.map.clear();
        self.queue.clear();
        self.weight = 0;
    }

    /// Drops expired entries; returns how many.
    pub fn purge_expired(&mut self) -> u64 {
        let now = Instant::now();
        let dead: Vec<K> = self
            .map
            .iter()
            .filter(|(_, s)| self.expired(s, now))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &dead {
            self.remove(k);
        }
        dead.len() as u64
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Total weight of the entries.
    pub fn weight(&self) -> u64 {
        self.weight
    }

    /// Keys in eviction order (the next victim first); for tests and diagnostics.
    pub fn eviction_order(&self) -> Vec<K> {
        self.queue.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(b: &Bounded<&'static str, u32>) -> Vec<&'static str> {
        let mut k: Vec<_> = b.map.keys().copied().collect();
        k.sort();
        k
    }

    #[test]
    fn fifo_evicts_in_insertion_order_whatever_the_reads() {
        let mut b = Bounded::new(Order::Fifo, 3, None, None);
        for k in ["a", "b", "c"] {
            assert_eq!(b.insert(k, 0, 1), 0);
        }
        // Reading "a" often does not save it: FIFO ignores use.
        for _ in 0..5 {
            assert_eq!(b.get(&"a").0, Some(0));
        }
        assert_eq!(b.insert("d", 0, 1), 1);
        assert_eq!(keys(&b), ["b", "c", "d"]);
        assert_eq!(b.insert("e", 0, 1), 1);
        assert_eq!(keys(&b), ["c", "d", "e"]);
        assert_eq!(b.eviction_order(), ["c", "d", "e"]);
    }

    #[test]
    fn lfu_evicts_the_least_read_then_the_least_recent() {
        let mut b = Bounded::new(Order::Lfu, 3, None, None);
        for k in ["a", "b", "c"] {
            b.insert(k, 0, 1);
        }
        // a: 3 reads, b: 1 read, c: 2 reads.
        for k in ["a", "a", "a", "b", "c", "c"] {
            assert!(b.get(&k).0.is_some());
        }
        b.insert("d", 0, 1);
        assert_eq!(keys(&b), ["a", "c", "d"], "b was read least");
        // d (no reads) goes next, even though it is the newest: frequency, not recency.
        b.insert("e", 0, 1);
        assert_eq!(keys(&b), ["a", "c", "e"]);
        // e and a new f tie at zero reads: the least recently used (e) leaves.
        b.get(&"c");
        b.insert("f", 0, 1);
        assert_eq!(keys(&b), ["a", "c", "f"]);
        assert_eq!(b.eviction_order(), ["f", "a", "c"]);
    }

    #[test]
    fn weight_bound_evicts_until_it_fits_and_refuses_giants() {
        let mut b = Bounded::new(Order::Fifo, 100, Some(10), None);
        b.insert("a", 0, 4);
        b.insert("b", 0, 4);
        assert_eq!(b.insert("c", 0, 6), 1, "a leaves: 4 + 6 fits in 10");
        assert_eq!(b.insert("d", 0, 7), 2, "b and c leave to make room for 7");
        assert_eq!((keys(&b), b.weight()), (vec!["d"], 7));
        assert_eq!(b.insert("giant", 0, 11), 0);
        assert_eq!(keys(&b), ["d"]);
        b.insert("d", 1, 2);
        assert_eq!((b.len(), b.weight()), (1, 2), "replacing re-weighs");
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_ttl() {
        let mut b = Bounded::new(Order::Lfu, 10, None, Some(Duration::from_secs(5)));
        b.insert("a", 1, 1);
        tokio::time::advance(Duration::from_secs(3)).await;
        b.insert("b", 2, 1);
        assert_eq!(b.get(&"a"), (Some(1), 0));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(b.get(&"a"), (None, 1), "a is 5 s old");
        assert_eq!(b.get(&"b"), (Some(2), 0));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(b.purge_expired(), 1);
        assert!(b.is_empty());
    }

    #[test]
    fn remove_and_clear() {
        let mut b = Bounded::new(Order::Lfu, 3, Some(100), None);
        b.insert("a", 0, 10);
        b.insert("b", 0, 10);
        assert!(b.remove(&"a"));
        assert!(!b.remove(&"a"));
        assert_eq!(
            (b.len(), b.weight(), b.eviction_order()),
            (1, 10, vec!["b"])
        );
        b.clear();
        assert!(b.is_empty() && b.weight() == 0 && b.eviction_order().is_empty());
    }
}
