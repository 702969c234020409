//! Eviction order of each strategy on a scripted access sequence, and the invalidation rules.

use super::*;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

fn plan(
    strategy: CacheStrategy,
    max_items: u64,
    max_bytes: Option<u64>,
    ttl: Duration,
) -> CachePlan {
    CachePlan {
        key: Key::new("test", "policy"),
        generation: 1,
        streams: vec![Key::new("test", "orders")],
        strategy,
        max_items,
        max_bytes,
        ttl,
    }
}

fn one(position: i64) -> CacheKey {
    CacheKey::One {
        stream: Key::new("test", "orders"),
        stream_id: 1,
        position,
    }
}

fn value(bytes: usize) -> Arc<Cached> {
    Arc::new(Cached {
        body: Bytes::from(vec![b'x'; bytes]),
        events: None,
    })
}

fn put(c: &PolicyCache, k: CacheKey) {
    let t = c.ticket(&k);
    c.put(t, k, value(10));
    c.run_pending_tasks();
}

/// Which of positions 1..=n are held, after pending maintenance.
fn held(c: &PolicyCache, n: i64) -> Vec<i64> {
    c.run_pending_tasks();
    (1..=n).filter(|p| c.contains(&one(*p))).collect()
}

const LONG: Duration = Duration::from_secs(3600);

#[test]
fn lru_evicts_the_least_recently_used() {
    let m = Metrics::new();
    let c = PolicyCache::new(plan(CacheStrategy::Lru, 3, None, LONG), &m);
    for p in 1..=3 {
        put(&c, one(p));
    }
    // Script: read 1, then 3 — 2 is now the least recently used.
    assert!(c.get(&one(1)).is_some());
    assert!(c.get(&one(3)).is_some());
    c.run_pending_tasks();
    put(&c, one(4));
    assert_eq!(held(&c, 4), [1, 3, 4]);
    // Then 1 (read before 3, 4 was inserted after).
    put(&c, one(5));
    assert_eq!(held(&c, 5), [3, 4, 5]);
    assert_eq!(c.evictions.get(), 2);
}

#[test]
fn lfu_evicts_the_least_frequently_used() {
    let m = Metrics::new();
    let c = PolicyCache::new(plan(CacheStrategy::Lfu, 3, None, LONG), &m);
    for p in 1..=3 {
        put(&c, one(p));
    }
    // Script: 1 read three times, 2 twice, 3 once.
    for p in [1, 1, 1, 2, 2, 3] {
        assert!(c.get(&one(p)).is_some());
    }
    put(&c, one(4));
    assert_eq!(held(&c, 4), [1, 2, 4], "3 was read least");
    // 4 has no reads: it goes before 1 and 2 although it is the newest (an LRU would keep it).
    put(&c, one(5));
    assert_eq!(held(&c, 5), [1, 2, 5]);
    assert_eq!(c.evictions.get(), 2);
}

#[test]
fn fifo_evicts_the_oldest_insertion_whatever_the_reads() {
    let m = Metrics::new();
    let c = PolicyCache::new(plan(CacheStrategy::Fifo, 3, None, LONG), &m);
    for p in 1..=3 {
        put(&c, one(p));
    }
    // Script: 1 read often — FIFO ignores it.
    for _ in 0..5 {
        assert!(c.get(&one(1)).is_some());
    }
    put(&c, one(4));
    assert_eq!(held(&c, 4), [2, 3, 4]);
    put(&c, one(5));
    assert_eq!(held(&c, 5), [3, 4, 5]);
}

#[test]
fn ttl_expires_entries_by_age_not_by_use() {
    let m = Metrics::new();
    // moka keeps its own clock (Tokio's paused time does not reach it): a real short TTL.
    let c = PolicyCache::new(
        plan(CacheStrategy::Ttl, 100, None, Duration::from_millis(400)),
        &m,
    );
    put(&c, one(1));
    std::thread::sleep(Duration::from_millis(250));
    put(&c, one(2));
    // Reading 1 does not extend its life.
    assert!(c.get(&one(1)).is_some());
    std::thread::sleep(Duration::from_millis(250));
    assert_eq!(held(&c, 2), [2], "1 is 500 ms old, 2 only 250 ms");
    assert!(c.get(&one(1)).is_none());
    std::thread::sleep(Duration::from_millis(250));
    assert_eq!(held(&c, 2), Vec::<i64>::new());
    assert_eq!(c.evictions.get(), 2);
}

#[test]
fn max_bytes_bounds_the_weight_for_moka_and_own_strategies() {
    for strategy in [CacheStrategy::Lru, CacheStrategy::Fifo] {
        let m = Metrics::new();
        // 1000 bytes and 100 items: ten 100-byte entries fit, not more.
        let c = PolicyCache::new(plan(strategy, 100, Some(1000), LONG), &m);
        for p in 1..=15 {
            let t = c.ticket(&one(p));
            c.put(t, one(p), value(100));
            c.run_pending_tasks();
        }
        let n = held(&c, 15).len();
        assert!((9..=10).contains(&n), "{strategy:?}: {n} entries held");
        assert!(c.contains(&one(15)), "{strategy:?}: the newest stays");
    }
}

#[test]
fn hits_misses_and_ratio_are_counted() {
    let m = Metrics::new();
    let c = PolicyCache::new(plan(CacheStrategy::Lru, 10, None, LONG), &m);
    assert_eq!(c.hit_ratio(), None);
    assert!(c.get(&one(1)).is_none());
    put(&c, one(1));
    for _ in 0..3 {
        assert!(c.get(&one(1)).is_some());
    }
    assert_eq!(c.hit_ratio(), Some(0.75));
    let text = m.render();
    assert!(
        text.contains(
            r#"weir_cache_requests_total{namespace="test",policy="policy",result="hit"} 3"#
        ),
        "{text}"
    );
    c.sample();
    assert!(
        m.render()
            .contains(r#"weir_cache_entries{namespace="test",policy="policy"} 1"#)
    );
}

fn subject(s: &str) -> CacheKey {
    CacheKey::Subject {
        stream: Key::new("test", "orders"),
        stream_id: 1,
        subject: s.into(),
    }
}

#[test]
fn an_invalidation_drops_the_subject_and_beats_a_racing_read() {
    for strategy in [
        CacheStrategy::Lru,
        CacheStrategy::Lfu,
        CacheStrategy::Fifo,
        CacheStrategy::Ttl,
    ] {
        let m = Metrics::new();
        let c = PolicyCache::new(plan(strategy, 10, None, LONG), &m);
        let stream = Key::new("test", "orders");
        put(&c, subject("a"));
        put(&c, subject("b"));
        c.invalidate_subject(&stream, 1, "a");
        assert!(c.get(&subject("a")).is_none(), "{strategy:?}");
        assert!(
            c.get(&subject("b")).is_some(),
            "{strategy:?}: other subjects stay"
        );

        // A miss that read the database before an append must not store its stale list.
        let ticket = c.ticket(&subject("a"));
        c.invalidate_subject(&stream, 1, "a");
        c.put(ticket, subject("a"), value(1));
        assert!(
            !c.contains(&subject("a")),
            "{strategy:?}: stale read dropped"
        );
        // One taken after the invalidation stores normally.
        put(&c, subject("a"));
        assert!(c.contains(&subject("a")), "{strategy:?}");

        let ticket = c.ticket(&subject("b"));
        c.invalidate_all();
        c.put(ticket, subject("b"), value(1));
        assert_eq!(held(&c, 3), Vec::<i64>::new());
        assert!(!c.contains(&subject("a")) && !c.contains(&subject("b")));
    }
}

#[tokio::test]
async fn read_through_stores_only_cacheable_results() {
    let m = Metrics::new();
    let c = PolicyCache::new(plan(CacheStrategy::Lru, 10, None, LONG), &m);
    let loads = std::sync::atomic::AtomicUsize::new(0);
    let load = |cacheable: bool| {
        loads.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok::<_, ()>((
                Cached {
                    body: Bytes::from_static(b"[]"),
                    events: None,
                },
                cacheable,
            ))
        }
    };
    // A partial page (cacheable = false) is read every time.
    for _ in 0..2 {
        read_through(Some(&c), one(1), || load(false))
            .await
            .unwrap();
    }
    assert_eq!(loads.load(Ordering::SeqCst), 2);
    for _ in 0..3 {
        read_through(Some(&c), one(2), || load(true)).await.unwrap();
    }
    assert_eq!(loads.load(Ordering::SeqCst), 3, "one load, then hits");
    read_through(None, one(2), || load(true)).await.unwrap();
    assert_eq!(loads.load(Ordering::SeqCst), 4, "no cache: always loads");
}

#[tokio::test]
async fn a_notification_invalidates_the_subjects_it_names() {
    let shared = Shared::default();
    let m = Metrics::new();
    let cache = Arc::new(PolicyCache::new(
        plan(CacheStrategy::Lfu, 10, None, LONG),
        &m,
    ));
    shared
        .policies
        .write()
        .unwrap()
        .insert(cache.plan.key.clone(), cache.clone());
    shared.routes.write().unwrap().insert(
        Key::new("test", "orders"),
        Route {
            cache: cache.clone(),
            live: Arc::new(AtomicBool::new(true)),
        },
    );
    for s in ["a", "b", "c"] {
        put(&cache, subject(s));
    }
    shared.on_notification(
        r#"{"stream_id":1,"namespace":"test","name":"orders","subjects":["a","b"]}"#,
    );
    assert!(!cache.contains(&subject("a")) && !cache.contains(&subject("b")));
    assert!(cache.contains(&subject("c")));
    // Another stream's notification leaves this cache alone.
    shared.on_notification(r#"{"stream_id":9,"namespace":"test","name":"other","subjects":["c"]}"#);
    assert!(cache.contains(&subject("c")));
    // "Every subject" and an unreadable payload both clear.
    shared.on_notification(r#"{"stream_id":1,"namespace":"test","name":"orders","subjects":null}"#);
    assert!(!cache.contains(&subject("c")));
    put(&cache, subject("c"));
    shared.on_notification("garbage");
    assert!(!cache.contains(&subject("c")));
}
