//! The archive's cache of decoded blocks is bounded in bytes; those bytes must be the memory
//! the blocks hold, or the bound is not one. Decoded events are measured here with a counting
//! allocator (its own test binary: the allocator is process-wide) against the weight the
//! cache gives them. Weighed by their text (256 bytes an event plus the payload), the soak's
//! events held nearly four times their weight and the cache grew each worker by ~120 MiB
//! (RELIABILITY.md, "The soak").

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicIsize, Ordering};

use bytes::Bytes;
use weir::data::archive::format::{build_segment, decompress_block};
use weir::data::event::{CloudEvent, Data, ExtValue, StoredEvent};
use weir::data::store::block_weight;

/// The system allocator, counting the bytes live.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::SeqCst);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::SeqCst);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::SeqCst);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// An event as the soak publishes it: a short id, the default source, a key as subject, a
/// tiny JSON payload and the `traceparent` every stored event carries.
fn soak_event(position: i64) -> StoredEvent {
    let mut extensions = BTreeMap::new();
    extensions.insert(
        "traceparent".to_string(),
        ExtValue::String(format!("00-{:032x}-{:016x}-01", position + 1, position + 1)),
    );
    StoredEvent {
        position,
        version: Some(position / 16 + 1),
        recorded_time: chrono::DateTime::from_timestamp(1_800_000_000 + position, 0).unwrap(),
        event: CloudEvent {
            id: format!("p-mwd3k2-{position}"),
            source: "/weir/namespaces/test/streams/p-mwd3k2-stored".into(),
            ty: "probe.event".into(),
            datacontenttype: Some("application/json".into()),
            dataschema: None,
            subject: Some(format!("k{}", position % 16)),
            time: None,
            extensions,
            data: Some(Data::Json(Bytes::from(format!("{{\"n\":{position}}}")))),
        },
    }
}

/// A larger event: more extensions (a B-tree of two levels), a time and a 2 KiB payload.
fn rich_event(position: i64) -> StoredEvent {
    let mut ev = soak_event(position);
    for i in 0..14 {
        ev.event.extensions.insert(
            format!("attr{i}"),
            if i % 2 == 0 {
                ExtValue::String(format!("value-{i}-{position}"))
            } else {
                ExtValue::Integer(position * i)
            },
        );
    }
    ev.event.time = Some("2027-01-01T00:00:00.123456Z".into());
    ev.event.data = Some(Data::Text(Bytes::from("x".repeat(2048))));
    ev
}

/// For every block of a segment of `events`: the bytes its decoded events hold (decoded and
/// shrunk as the store caches them) and the weight the cache gives them.
fn measure(events: &[StoredEvent]) -> Vec<(usize, isize, u32)> {
    let seg = build_segment(events, 3, None).unwrap();
    seg.index
        .iter()
        .map(|entry| {
            let start = entry.offset as usize;
            let frame = &seg.body[start..start + entry.len as usize];
            let before = LIVE.load(Ordering::SeqCst);
            let mut decoded = decompress_block(frame, entry, None).unwrap();
            decoded.shrink_to_fit();
            let held = LIVE.load(Ordering::SeqCst) - before;
            let weight = block_weight(&decoded, decoded.capacity());
            (decoded.len(), held, weight)
        })
        .collect()
}

/// One test in this binary: the allocator counts every thread, so nothing else may run.
#[test]
fn the_block_cache_weighs_what_decoded_events_hold() {
    for (shape, events) in [
        ("soak", (1..=3000).map(soak_event).collect::<Vec<_>>()),
        ("rich", (1..=300).map(rich_event).collect()),
    ] {
        let blocks = measure(&events);
        assert!(blocks.len() > 1, "{shape}: one block only");
        for (i, (n, held, weight)) in blocks.into_iter().enumerate() {
            let weight = weight as isize;
            eprintln!(
                "{shape} block {i}: {n} events hold {held} bytes ({} each), weigh {weight}",
                held / n as isize
            );
            // Never under (the bound must hold); not grossly over (the cache must still hold
            // what its size promises).
            assert!(
                weight >= held,
                "{shape} block {i}: holds {held} bytes but weighs {weight}"
            );
            assert!(
                weight <= held * 2,
                "{shape} block {i}: holds {held} bytes but weighs {weight}"
            );
        }
    }
}
