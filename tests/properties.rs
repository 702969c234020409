//! Properties of the parsers and codecs, checked on generated inputs (proptest): ingest in
//! every content mode (what is accepted reads back identically, what is refused is a 4xx
//! problem), the AMQP message codec (encode → decode is the identity), archive segments
//! (identity; every byte flip is caught; garbage never panics nor allocates past the block
//! cap), subscription filters against a reference model, and the duration and size units.
//!
//! Pure: no service is needed. Each property runs `WEIR_PROPTEST_CASES` cases (default 256,
//! a few seconds for the whole file); `WEIR_PROPTEST_CASES=20000 cargo test --test properties`
//! searches deeper. `WEIR_PROPTEST_SEED=<u64>` replays a fixed seed; otherwise each run draws
//! its own and a failure prints its minimal input.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use serde_json::Value;
use weir::data::archive::format::{
    BlockEntry, MAX_BLOCK_BYTES, build_segment, decode_block, decompress_block, parse_body,
};
use weir::data::broker::{AMQPValue, DATA_KIND_HEADER, FieldTable, from_delivery, to_message};
use weir::data::event::{
    CloudEvent, Data, ExtValue, StoredEvent, structured_json_len, to_batch_json, to_structured_json,
};
use weir::data::ingest::{IngestContext, parse_request, parse_request_bytes};
use weir::data::problem::HttpProblem;
use weir::topology::filter::{Filter, parse_filters};
use weir::topology::units::{parse_duration, parse_size};

#[path = "common/binary.rs"]
mod binary;
#[path = "../fuzz/harness.rs"]
mod harness;
use binary::to_binary;

// ---------------------------------------------------------------------------------------------
// Allocation watch: the largest single allocation made by the current thread, so a decoder fed
// garbage can be shown never to ask for more than its input justifies.

struct Watch;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: allocations during thread teardown find the slot gone; they are not ours.
    let _ = LARGEST.try_with(|l| {
        if size > l.get() {
            l.set(size);
        }
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged.
unsafe impl GlobalAlloc for Watch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Watch = Watch;

/// Runs `f` and returns its result with the largest single allocation it made.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    let out = f();
    (out, LARGEST.with(Cell::get))
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// Cases per property: `WEIR_PROPTEST_CASES`, or 256 (the whole file in seconds).
fn cases() -> u32 {
    std::env::var("WEIR_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn config() -> Config {
    let mut c = Config::with_cases(cases());
    // A failure prints its shrunk input; no regression files are written into the tree.
    c.failure_persistence = None;
    if let Some(seed) = std::env::var("WEIR_PROPTEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        c.rng_seed = RngSeed::Fixed(seed);
    }
    c
}

fn ctx() -> IngestContext {
    IngestContext::new(
        "shop",
        "orders",
        Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0).unwrap(),
    )
}

const STRUCTURED: &str = "application/cloudevents+json";
const BATCH: &str = "application/cloudevents-batch+json";

// ---------------------------------------------------------------------------------------------
// Generators

/// Any Unicode text (controls, quotes, astral planes included), `min..max` characters.
fn text(min: usize, max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), min..max).prop_map(|v| v.into_iter().collect())
}

/// Text for an attribute: anything but U+0000, which ingest refuses (PostgreSQL text cannot
/// hold it; see `nul_in_an_attribute_is_refused`).
fn attr(min: usize, max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(
        any::<char>().prop_filter("not NUL", |c| *c != '\0'),
        min..max,
    )
    .prop_map(|v| v.into_iter().collect())
}

/// A JSON value of bounded depth and size.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        text(0, 12).prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(text(0, 8), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// JSON text of a value, compact or with inner whitespace (which must be kept).
fn json_text() -> impl Strategy<Value = String> {
    (json_value(), any::<bool>()).prop_map(|(v, pretty)| {
        if pretty {
            serde_json::to_string_pretty(&v).unwrap()
        } else {
            v.to_string()
        }
    })
}

/// Extension names: CloudEvents' `a-z0-9`, none of the names Weir reserves or reads itself.
fn extension_name() -> impl Strategy<Value = String> {
    "[a-z0-9]{1,24}".prop_filter("not reserved", |n| {
        !weir::data::event::CONTEXT_ATTRIBUTES.contains(&n.as_str())
            && ![
                "data",
                "weirposition",
                "weirversion",
                "weirrecordedtime",
                "weirpublisher",
                "expectedversion",
            ]
            .contains(&n.as_str())
    })
}

fn ext_value() -> impl Strategy<Value = ExtValue> {
    prop_oneof![
        any::<bool>().prop_map(ExtValue::Bool),
        any::<i32>().prop_map(|i| ExtValue::Integer(i.into())),
        attr(0, 16).prop_map(ExtValue::String),
    ]
}

/// An RFC 3339 timestamp in the forms producers send.
fn timestamp() -> impl Strategy<Value = String> {
    (0i64..4_102_444_800, 0u32..1_000_000_000, 0usize..3).prop_map(|(s, ns, form)| {
        let t = DateTime::from_timestamp(s, ns).unwrap();
        match form {
            0 => t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            1 => t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            _ => t
                .with_timezone(&chrono::FixedOffset::east_opt(5 * 3600 + 1800).unwrap())
                .to_rfc3339(),
        }
    })
}

/// A payload and a content type that agree on its kind, as ingest makes them.
fn data_and_type() -> impl Strategy<Value = (Option<Data>, Option<String>)> {
    let s = |v: &[&str]| -> Vec<Option<String>> { v.iter().map(|s| Some(s.to_string())).collect() };
    prop_oneof![
        // JSON (no content type means JSON in the CloudEvents JSON format).
        (
            json_text(),
            prop::sample::select(
                [
                    vec![None],
                    s(&[
                        "application/json",
                        "application/vnd.shop.order+json; charset=utf-8",
                        "text/json",
                    ])
                ]
                .concat()
            )
        )
            .prop_map(|(j, ct)| (Some(Data::Json(Bytes::from(j))), ct)),
        // Text in UTF-8.
        (
            text(1, 40),
            prop::sample::select(s(&["text/plain", "text/csv; charset=utf-8"]))
        )
            .prop_map(|(t, ct)| (Some(Data::Text(Bytes::from(t))), ct)),
        // Opaque bytes.
        (
            prop::collection::vec(any::<u8>(), 1..64),
            prop::sample::select(
                [vec![None], s(&["application/octet-stream", "image/png"])].concat()
            )
        )
            .prop_map(|(b, ct)| (Some(Data::Binary(Bytes::from(b))), ct)),
        // No data at all.
        prop::sample::select([vec![None], s(&["application/json", "text/plain"])].concat())
            .prop_map(|ct| (None, ct)),
    ]
}

/// A valid CloudEvent as ingest would accept and produce it.
fn cloud_event() -> impl Strategy<Value = CloudEvent> {
    (
        (attr(1, 16), attr(1, 16), attr(1, 16)),
        (
            prop::option::of(attr(1, 16)),
            prop::option::of(attr(1, 16)),
            prop::option::of(timestamp()),
        ),
        prop::collection::btree_map(extension_name(), ext_value(), 0..5),
        data_and_type(),
    )
        .prop_map(
            |((id, source, ty), (subject, dataschema, time), extensions, (data, ct))| {
                // JSON data without a content type is read as `application/json`.
                let datacontenttype = match (&ct, &data) {
                    (None, Some(Data::Json(_))) => Some("application/json".to_string()),
                    _ => ct,
                };
                CloudEvent {
                    id,
                    source,
                    ty,
                    datacontenttype,
                    dataschema,
                    subject,
                    time,
                    extensions,
                    data,
                }
            },
        )
}

fn content_type(ct: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("content-type", HeaderValue::from_str(ct).unwrap());
    h
}

/// A JSON payload without the whitespace around its value: structured mode has no room for
/// it (ingest's documented exception to byte-for-byte payloads).
fn trim_json(mut ev: CloudEvent) -> CloudEvent {
    if let Some(Data::Json(b)) = &ev.data {
        let ws = |c: &u8| matches!(c, b' ' | b'\t' | b'\n' | b'\r');
        let start = b.iter().position(|c| !ws(c)).unwrap_or(b.len());
        let end = b.iter().rposition(|c| !ws(c)).map_or(start, |e| e + 1);
        ev.data = Some(Data::Json(b.slice(start..end)));
    }
    ev
}

/// What every refusal must be: a client error with a problem body, never a server error.
fn assert_client_error(p: &HttpProblem) -> Result<(), TestCaseError> {
    prop_assert!(
        (400..500).contains(&p.status),
        "a refusal must be 4xx, got {}: {p:?}",
        p.status
    );
    Ok(())
}

/// Whatever ingest accepts, written out again in structured mode, reads back the same.
fn assert_accepted_round_trips(events: &[CloudEvent]) -> Result<(), TestCaseError> {
    for ev in events {
        prop_assert!(!ev.id.is_empty() && !ev.source.is_empty() && !ev.ty.is_empty());
        let text = to_structured_json(ev);
        let again = parse_request(&content_type(STRUCTURED), &text, &ctx());
        let want = vec![trim_json(ev.clone())];
        prop_assert_eq!(
            again.map_err(|p| p.detail),
            Ok(want),
            "{}",
            String::from_utf8_lossy(&text)
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Ingest

proptest! {
    #![proptest_config(config())]

    /// Structured mode: the event serialised in the CloudEvents JSON format reads back equal,
    /// from a copied body and from a shared one.
    #[test]
    fn structured_events_round_trip(ev in cloud_event()) {
        let body = to_structured_json(&ev);
        let copied = parse_request(&content_type(STRUCTURED), &body, &ctx());
        prop_assert_eq!(copied.map_err(|p| p.detail), Ok(vec![ev.clone()]));
        let shared = parse_request_bytes(&content_type(STRUCTURED), &Bytes::from(body), &ctx());
        prop_assert_eq!(shared.map_err(|p| p.detail), Ok(vec![ev]));
    }

    /// Batched mode: the array reads back as the same events in the same order.
    #[test]
    fn batches_round_trip(evs in prop::collection::vec(cloud_event(), 1..6)) {
        let body = to_batch_json(&evs);
        let parsed = parse_request(&content_type(BATCH), &body, &ctx());
        prop_assert_eq!(parsed.map_err(|p| p.detail), Ok(evs));
    }

    /// Binary mode: attributes from the `ce-` headers (extensions as strings, as the HTTP
    /// binding carries them), the body is the data byte for byte.
    #[test]
    fn binary_events_round_trip(ev in cloud_event()) {
        let (headers, body) = to_binary(&ev);
        let mut want = ev.clone();
        for v in want.extensions.values_mut() {
            *v = ExtValue::String(v.as_string());
        }
        let parsed = parse_request(&headers, &body, &ctx());
        prop_assert_eq!(parsed.map_err(|p| p.detail), Ok(vec![want]));
    }

    /// The plain `application/json` shape: given members read back, the rest defaulted.
    #[test]
    fn plain_events_round_trip(
        ty in attr(1, 16),
        data in json_text(),
        source in prop::option::of(attr(1, 16)),
        id in prop::option::of(attr(1, 16)),
        subject in prop::option::of(attr(1, 16)),
        correlation in prop::option::of(attr(1, 16)),
        as_array in any::<bool>(),
    ) {
        let mut body = format!("{{\"type\":{}", Value::from(ty.as_str()));
        for (k, v) in [("source", &source), ("id", &id), ("subject", &subject), ("correlationId", &correlation)] {
            if let Some(v) = v {
                body.push_str(&format!(",\"{k}\":{}", Value::from(v.as_str())));
            }
        }
        body.push_str(&format!(",\"data\":{data}}}"));
        if as_array {
            body = format!("[{body}]");
        }
        let parsed = parse_request(&content_type("application/json"), body.as_bytes(), &ctx());
        let evs = parsed.map_err(|p| TestCaseError::fail(format!("{p:?}\n{body}")))?;
        prop_assert_eq!(evs.len(), 1);
        let ev = &evs[0];
        prop_assert_eq!(&ev.ty, &ty);
        prop_assert_eq!(ev.data.as_ref(), Some(&Data::Json(Bytes::from(data))));
        prop_assert_eq!(ev.source.clone(), source.unwrap_or_else(|| ctx().default_source()));
        match id {
            Some(id) => prop_assert_eq!(&ev.id, &id),
            None => prop_assert!(uuid::Uuid::parse_str(&ev.id).is_ok(), "a UUID id: {}", ev.id),
        }
        prop_assert_eq!(&ev.subject, &subject);
        prop_assert_eq!(ev.correlation_id(), correlation);
        prop_assert_eq!(ev.datacontenttype.as_deref(), Some("application/json"));
        prop_assert_eq!(ev.time.as_deref(), Some("2024-05-01T12:00:00.000000Z"));
        assert_accepted_round_trips(&evs)?;
    }

    /// Any body under any content type and `ce-` headers: never a panic; a refusal is a 4xx;
    /// what is accepted round-trips through structured mode.
    #[test]
    fn any_request_is_answered_without_panic(
        ct in prop::option::of(prop::sample::select(vec![
            STRUCTURED, BATCH, "application/json", "text/plain", "application/octet-stream",
            "application/cloudevents+json; charset=latin1", "application/json; charset=utf-8",
            "text/plain; charset=latin1", "application/x+json", "foo/json", "application/json;;",
        ])),
        ce in prop::collection::vec((
            prop::sample::select(vec!["specversion", "id", "source", "type", "subject", "time",
                "datacontenttype", "dataschema", "expectedversion", "weirposition", "x", "Bad",
                "correlationid", ""]),
            prop::sample::select(vec!["1.0", "0.3", "", "a", "%", "%zz", "%C3%A9", "%FF", "7",
                "2024-05-01T00:00:00Z", "yesterday", "-1"]),
        ), 0..6),
        body in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            json_value().prop_map(|v| v.to_string().into_bytes()),
            cloud_event().prop_map(|e| to_structured_json(&e)),
        ],
    ) {
        let mut headers = HeaderMap::new();
        if let Some(ct) = ct {
            headers.insert("content-type", HeaderValue::from_static(ct));
        }
        for (name, value) in ce {
            if let Ok(n) = HeaderName::from_bytes(format!("ce-{name}").as_bytes()) {
                headers.append(n, HeaderValue::from_static(value));
            }
        }
        match parse_request(&headers, &body, &ctx()) {
            Ok(evs) => assert_accepted_round_trips(&evs)?,
            Err(p) => assert_client_error(&p)?,
        }
    }

    /// A valid event's encoding, damaged (bytes flipped, cut, spliced): never a panic, a 4xx
    /// or an event that round-trips.
    #[test]
    fn damaged_events_are_refused_or_round_trip(
        evs in prop::collection::vec(cloud_event(), 1..4),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..6),
        batch in any::<bool>(),
    ) {
        let mut body = if batch { to_batch_json(&evs) } else { to_structured_json(&evs[0]) };
        harness::damage(&mut body, edits.iter().map(|(i, b, op)| (i.index(usize::MAX), *b, *op)));
        let ct = if batch { BATCH } else { STRUCTURED };
        match parse_request(&content_type(ct), &body, &ctx()) {
            Ok(evs) => assert_accepted_round_trips(&evs)?,
            Err(p) => assert_client_error(&p)?,
        }
    }

    /// U+0000 in any string attribute (or the correlation id) is a 400 naming it, in every
    /// mode. Regression: such an event reached PostgreSQL, whose refusal failed the whole
    /// batch's commit, a 500 for every publisher in it.
    #[test]
    fn nul_in_an_attribute_is_refused(
        ev in cloud_event(),
        which in prop::sample::select(vec!["id", "source", "type", "subject", "dataschema", "correlationid"]),
        at in any::<prop::sample::Index>(),
        binary in any::<bool>(),
    ) {
        let mut ev = ev;
        let slot = match which {
            "id" => &mut ev.id,
            "source" => &mut ev.source,
            "type" => &mut ev.ty,
            "subject" => ev.subject.get_or_insert_with(|| "s".into()),
            "dataschema" => ev.dataschema.get_or_insert_with(|| "/schema".into()),
            _ => {
                ev.extensions.insert("correlationid".into(), ExtValue::String(String::new()));
                match ev.extensions.get_mut("correlationid") {
                    Some(ExtValue::String(s)) => s,
                    _ => unreachable!("just inserted"),
                }
            }
        };
        let i = slot.char_indices().map(|(i, _)| i).nth(at.index(slot.chars().count() + 1)).unwrap_or(slot.len());
        slot.insert(i, '\0');
        let result = if binary {
            let (headers, body) = to_binary(&ev);
            parse_request(&headers, &body, &ctx())
        } else {
            parse_request(&content_type(STRUCTURED), &to_structured_json(&ev), &ctx())
        };
        let p = match result {
            Ok(evs) => return Err(TestCaseError::fail(format!("accepted {evs:?}"))),
            Err(p) => p,
        };
        prop_assert_eq!(p.status, 400);
        let pointer = format!("/{which}");
        prop_assert!(p.errors.iter().any(|e| e.pointer.as_deref() == Some(pointer.as_str())), "{p:?}");
    }

    /// The size estimate the archive measures against is the structured encoding's length.
    #[test]
    fn structured_json_len_is_exact(ev in cloud_event()) {
        prop_assert_eq!(structured_json_len(&ev), to_structured_json(&ev).len());
    }
}

/// Regression (found by the fuzz corpus test): a binary-mode JSON body with invalid UTF-8
/// inside a string was accepted as JSON data, which the structured mode (the read API,
/// structured sinks) then left out. It is a 400 now.
#[test]
fn binary_json_with_invalid_utf8_is_refused() {
    for body in [&b"{\"\xff\": 1}"[..], b"[\"a\xc3\"]", b"\"\xed\xa0\x80\""] {
        let mut headers = content_type("application/json");
        for (k, v) in [
            ("ce-specversion", "1.0"),
            ("ce-id", "e"),
            ("ce-source", "/s"),
            ("ce-type", "t"),
        ] {
            headers.insert(k, HeaderValue::from_static(v));
        }
        let p = parse_request(&headers, body, &ctx()).expect_err("invalid UTF-8 is not JSON");
        assert_eq!(p.status, 400, "{p:?}");
        assert!(
            p.errors
                .iter()
                .any(|e| e.pointer.as_deref() == Some("/data")),
            "{p:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// AMQP codec

proptest! {
    #![proptest_config(config())]

    /// Every event ingest can produce comes back from its AMQP message exactly, whatever the
    /// mode it was published in (binary mode's string extensions included).
    #[test]
    fn amqp_messages_decode_to_the_same_event(ev in cloud_event(), binary in any::<bool>()) {
        let ev = if binary {
            let (headers, body) = to_binary(&ev);
            parse_request(&headers, &body, &ctx()).map_err(|p| TestCaseError::fail(p.detail))?.remove(0)
        } else {
            ev
        };
        let m = to_message(&ev);
        let back = from_delivery(Some(&m.headers), m.content_type.as_deref(), &m.body);
        prop_assert_eq!(back.map_err(|e| e.to_string()), Ok(ev));
    }

    /// Payload kinds the content type does not imply (a `data_base64` declared JSON, a JSON
    /// string declared as Latin-1 text) survive too: the bug this property found lost the
    /// data of such events on the way to a structured-mode sink.
    #[test]
    fn amqp_keeps_kinds_the_content_type_does_not_imply(
        ev in cloud_event(),
        bytes in prop::collection::vec(any::<u8>(), 1..40),
        kind in 1i16..=3,
        ct in prop::option::of(prop::sample::select(vec![
            "application/json", "text/plain", "text/plain; charset=latin1", "image/png",
            "application/json; =x",
        ])),
    ) {
        let mut ev = ev;
        ev.datacontenttype = ct.map(str::to_string);
        ev.data = Data::from_kind_code(kind, Bytes::from(bytes));
        let m = to_message(&ev);
        let back = from_delivery(Some(&m.headers), m.content_type.as_deref(), &m.body);
        prop_assert_eq!(back.map_err(|e| e.to_string()), Ok(ev));
    }

    /// Any header table and body: decoding answers, never panics.
    #[test]
    fn any_amqp_message_decodes_or_is_refused(
        headers in prop::collection::vec((
            prop_oneof![
                Just("cloudEvents:specversion".to_string()),
                Just("cloudEvents:id".to_string()),
                Just("cloudEvents:source".to_string()),
                Just("cloudEvents:type".to_string()),
                Just("cloudEvents_time".to_string()),
                Just(DATA_KIND_HEADER.to_string()),
                "cloudEvents:[a-zA-Z0-9_:]{0,12}",
                "[a-z-]{1,12}",
            ],
            amqp_value(),
        ), 0..10),
        content_type in prop::option::of("[ -~]{0,40}"),
        body in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut table = FieldTable::default();
        for (k, v) in headers {
            table.insert(k.into(), v);
        }
        let _ = from_delivery(Some(&table), content_type.as_deref(), &body);
    }
}

fn amqp_value() -> impl Strategy<Value = AMQPValue> {
    prop_oneof![
        Just(AMQPValue::LongString("1.0".into())),
        text(0, 12).prop_map(|s| AMQPValue::LongString(s.as_str().into())),
        prop::collection::vec(any::<u8>(), 0..12).prop_map(|b| AMQPValue::LongString(b.into())),
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<i16>().prop_map(AMQPValue::ShortInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        any::<f64>().prop_map(AMQPValue::Double),
        Just(AMQPValue::Void),
    ]
}

// ---------------------------------------------------------------------------------------------
// Archive segments

fn stored_events() -> impl Strategy<Value = Vec<StoredEvent>> {
    (
        1i64..1_000_000_000_000,
        prop::collection::vec(
            (
                cloud_event(),
                prop::option::of(any::<i64>()),
                // Commit times between 2000 and 2100, in any order.
                946_684_800_000_000_000i64..4_102_444_800_000_000_000,
            ),
            1..40,
        ),
    )
        .prop_map(|(first, evs)| {
            evs.into_iter()
                .enumerate()
                .map(|(i, (event, version, nanos))| StoredEvent {
                    position: first + i as i64,
                    version,
                    recorded_time: DateTime::from_timestamp_nanos(nanos),
                    event,
                })
                .collect()
        })
}

/// Every event of a segment, decoded block by block.
fn read_segment(body: &[u8]) -> Result<Vec<StoredEvent>, String> {
    let (index, _) = parse_body(body).map_err(|(at, e)| format!("byte {at}: {e}"))?;
    let mut out = Vec::new();
    for b in &index {
        let frame = b.frame(body).ok_or("block past the end")?;
        out.extend(decompress_block(frame, b, None)?);
    }
    Ok(out)
}

proptest! {
    #![proptest_config(config())]

    /// A segment reads back as the events it was built from.
    #[test]
    fn segments_round_trip(events in stored_events(), level in 1i32..4) {
        let seg = build_segment(&events, level, None).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(read_segment(&seg.body), Ok(events));
    }

    /// Any one byte changed anywhere in a segment is refused (the CRC covers every byte before
    /// the trailer, the magics and the checksum itself are compared), and a flipped block
    /// frame is refused by its own CRC even when read alone, as reads do.
    #[test]
    fn any_byte_flip_is_detected(
        events in stored_events(),
        at in any::<prop::sample::Index>(),
        mask in 1u8..=255,
    ) {
        let seg = build_segment(&events, 1, None).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut body = seg.body.clone();
        let i = at.index(body.len());
        body[i] ^= mask;
        prop_assert!(parse_body(&body).is_err(), "flip at {i} of {} not detected", body.len());
        for b in &seg.index {
            if let Some(frame) = b.frame(&body) {
                let changed = frame != b.frame(&seg.body).unwrap();
                let result = decompress_block(frame, b, None);
                prop_assert!(!changed || result.is_err(), "flip at {i} read as {result:?}");
            }
        }
    }

    /// Garbage as a decompressed block, or as a frame its index vouches for: never a panic,
    /// and no allocation beyond what the input (or the block cap) justifies.
    #[test]
    fn garbage_blocks_are_refused_within_bounds(
        raw in prop::collection::vec(any::<u8>(), 0..512),
        first in any::<i64>(),
        raw_len in prop_oneof![0u32..4096, Just(u32::MAX), Just(MAX_BLOCK_BYTES as u32 + 1)],
        count in any::<u32>(),
    ) {
        let (_, largest) = largest_allocation(|| decode_block(&raw, first));
        // Each record's strings and payload are copies of parts of the input; the event
        // vector grows by doubling. Nothing may scale with a number read from the input.
        prop_assert!(largest <= 1024 * raw.len().max(64), "decode_block allocated {largest}");
        let entry = BlockEntry {
            offset: 0,
            len: raw.len() as u32,
            raw_len,
            first_position: first,
            count,
            crc32: crc32fast::hash(&raw),
        };
        let (result, largest) = largest_allocation(|| decompress_block(&raw, &entry, None));
        prop_assert!(largest <= MAX_BLOCK_BYTES + 64 * 1024, "decompress_block allocated {largest}");
        if raw_len as usize > MAX_BLOCK_BYTES {
            prop_assert!(result.is_err());
        }
        harness::archive_block(&raw);
    }
}

/// Regression: a block whose first position is near the top of the range used to overflow
/// (a panic in debug builds) instead of being refused.
#[test]
fn a_block_numbered_past_the_range_is_refused() {
    let ev = StoredEvent {
        position: i64::MAX,
        version: None,
        recorded_time: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        event: CloudEvent {
            id: "e".into(),
            source: "/s".into(),
            ty: "t".into(),
            datacontenttype: None,
            dataschema: None,
            subject: None,
            time: None,
            extensions: BTreeMap::new(),
            data: None,
        },
    };
    let mut two = build_segment(std::slice::from_ref(&ev), 1, None).unwrap();
    // The same record twice in one block, numbered from i64::MAX.
    let (index, _) = parse_body(&two.body).unwrap();
    let frame = index[0].frame(&two.body).unwrap().to_vec();
    let raw = zstd::bulk::decompress(&frame, 1 << 20).unwrap();
    let doubled = [raw.clone(), raw].concat();
    assert!(decode_block(&doubled, i64::MAX).is_err());
    let packed = zstd::bulk::compress(&doubled, 1).unwrap();
    let entry = BlockEntry {
        offset: 0,
        len: packed.len() as u32,
        raw_len: doubled.len() as u32,
        first_position: i64::MAX,
        count: 2,
        crc32: crc32fast::hash(&packed),
    };
    assert!(decompress_block(&packed, &entry, None).is_err());
    // Saturates at the top of the range instead of overflowing (a panic in debug builds).
    assert_eq!(entry.last_position(), i64::MAX - 1);
    // An index entry pointing past the end of the body has no frame (it used to overflow).
    two.index[0].offset = u64::MAX;
    assert_eq!(two.index[0].frame(&two.body), None);
}

// ---------------------------------------------------------------------------------------------
// Filters

/// A filter tree together with the JSON that declares it.
fn filter_json() -> impl Strategy<Value = Value> {
    let attr = prop::sample::select(vec!["type", "source", "subject", "x", "y"]);
    let value = prop::sample::select(vec!["a", "ab", "b", "ba", "abc", "", "c"]);
    let map = prop::collection::btree_map(attr, value, 1..3).prop_map(|m| {
        Value::Object(
            m.into_iter()
                .map(|(k, v)| (k.to_string(), Value::from(v)))
                .collect(),
        )
    });
    let leaf = (prop::sample::select(vec!["exact", "prefix", "suffix"]), map)
        .prop_map(|(op, m)| operator(op, m));
    leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 1..4)
                .prop_map(|l| operator("all", Value::from(l))),
            prop::collection::vec(inner.clone(), 1..4)
                .prop_map(|l| operator("any", Value::from(l))),
            inner.prop_map(|f| operator("not", f)),
        ]
    })
}

/// `{op: arg}`.
fn operator(op: &str, arg: Value) -> Value {
    let mut m = serde_json::Map::new();
    m.insert(op.to_string(), arg);
    Value::Object(m)
}

/// The documented semantics, written from the JSON directly: `None` when the filter is
/// invalid (an empty `prefix`/`suffix` value matches everything and is refused).
fn reference(f: &Value, attrs: &BTreeMap<&str, &str>) -> Option<bool> {
    let (op, arg) = f.as_object()?.iter().next()?;
    let each = |test: &dyn Fn(&str, &str) -> bool, empty_ok: bool| -> Option<bool> {
        let m = arg.as_object()?;
        let mut all = true;
        for (k, v) in m {
            let want = v.as_str()?;
            if !empty_ok && want.is_empty() {
                return None;
            }
            all &= attrs.get(k.as_str()).is_some_and(|have| test(have, want));
        }
        Some(all)
    };
    match op.as_str() {
        "exact" => each(&|h, w| h == w, true),
        "prefix" => each(&|h, w| h.starts_with(w), false),
        "suffix" => each(&|h, w| h.ends_with(w), false),
        "all" | "any" => {
            let rs: Option<Vec<bool>> = arg
                .as_array()?
                .iter()
                .map(|g| reference(g, attrs))
                .collect();
            let rs = rs?;
            Some(if op == "all" {
                rs.iter().all(|b| *b)
            } else {
                rs.iter().any(|b| *b)
            })
        }
        "not" => reference(arg, attrs).map(|b| !b),
        _ => None,
    }
}

proptest! {
    #![proptest_config(config())]

    /// Parsed filters match exactly where the reference model says, invalid ones are refused,
    /// and an attribute the event lacks never matches.
    #[test]
    fn filters_follow_the_reference_model(
        list in prop::collection::vec(filter_json(), 0..3),
        attrs in prop::collection::btree_map(
            prop::sample::select(vec!["type", "source", "subject", "x"]),
            prop::sample::select(vec!["a", "ab", "b", "ba", "abc", "", "cab"]),
            0..4,
        ),
    ) {
        let want: Option<Vec<bool>> = list.iter().map(|f| reference(f, &attrs)).collect();
        match (parse_filters(&list, "spec.filters"), want) {
            (Ok(filters), Some(want)) => {
                let attr = |name: &str| attrs.get(name).map(|v| v.to_string());
                let got: Vec<bool> = filters.iter().map(|f| f.matches(&attr)).collect();
                prop_assert_eq!(&got, &want);
                prop_assert_eq!(
                    weir::topology::filter::matches_all(&filters, &attr),
                    want.iter().all(|b| *b)
                );
            }
            (Err(_), None) => {}
            (got, want) => prop_assert!(false, "parse {got:?}, reference {want:?} for {list:?}"),
        }
    }

    /// Any JSON as a filter list: never a panic.
    #[test]
    fn any_json_filter_list_is_parsed_or_refused(list in prop::collection::vec(json_value(), 0..4)) {
        if let Ok(filters) = parse_filters(&list, "spec.filters") {
            let _ = weir::topology::filter::matches_all(&filters, &|_| None);
            prop_assert!(filters.iter().all(|f| !matches!(f, Filter::Exact(m) | Filter::Prefix(m) | Filter::Suffix(m) if m.is_empty())));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Units

proptest! {
    #![proptest_config(config())]

    /// `<integer><unit>` parses to the integer times the unit, or is refused when that
    /// overflows; nothing else parses.
    #[test]
    fn durations_follow_their_grammar(n in any::<u64>(), unit in prop::sample::select(vec!["ms", "s", "m", "h", "d"])) {
        let per: u64 = match unit { "ms" => 1, "s" => 1_000, "m" => 60_000, "h" => 3_600_000, _ => 86_400_000 };
        let got = parse_duration(&format!("{n}{unit}"));
        match n.checked_mul(per) {
            Some(ms) => prop_assert_eq!(got, Ok(std::time::Duration::from_millis(ms))),
            None => prop_assert!(got.is_err()),
        }
    }

    #[test]
    fn sizes_follow_their_grammar(n in any::<u64>(), unit in prop::sample::select(vec!["", "B", "KiB", "MiB", "GiB", "KB", "kB", "MB", "GB"])) {
        let mult: u64 = match unit {
            "" | "B" => 1, "KiB" => 1 << 10, "MiB" => 1 << 20, "GiB" => 1 << 30,
            "KB" | "kB" => 1_000, "MB" => 1_000_000, _ => 1_000_000_000,
        };
        let got = parse_size(&format!("{n}{unit}"));
        match n.checked_mul(mult) {
            Some(b) => prop_assert_eq!(got, Ok(b)),
            None => prop_assert!(got.is_err()),
        }
    }

    /// Strings outside the grammar (spaces, signs, fractions, other units, empty) are refused.
    #[test]
    fn anything_else_is_not_a_unit(s in "[ 0-9a-zA-Z.+-]{0,8}") {
        let digits = s.bytes().take_while(u8::is_ascii_digit).count();
        let (num, unit) = s.split_at(digits);
        let dur_ok = !num.is_empty() && ["ms", "s", "m", "h", "d"].contains(&unit);
        let size_ok = !num.is_empty() && ["", "B", "KiB", "MiB", "GiB", "KB", "kB", "MB", "GB"].contains(&unit);
        // The reference says only which strings are in the grammar; overflow is covered above.
        if !dur_ok {
            prop_assert!(parse_duration(&s).is_err(), "{s:?} parsed as a duration");
        }
        if !size_ok {
            prop_assert!(parse_size(&s).is_err(), "{s:?} parsed as a size");
        }
        if dur_ok && num.len() < 10 {
            prop_assert!(parse_duration(&s).is_ok());
        }
        if size_ok && num.len() < 10 {
            prop_assert!(parse_size(&s).is_ok());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The fuzz targets' committed seed corpus, run on stable (see fuzz/README.md).

/// Every file of `fuzz/corpus/<target>/`, and each of them damaged in seeded ways, through
/// the same harness the `cargo fuzz` targets call.
#[test]
fn fuzz_corpus_runs_clean() {
    use rand::{Rng, SeedableRng};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mutations: usize = std::env::var("WEIR_FUZZ_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let mut total = 0;
    for (target, run) in harness::TARGETS {
        let dir = root.join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(files.len() >= 3, "{target}: the seed corpus is missing");
        for f in files {
            let seed = std::fs::read(&f).unwrap();
            run(&seed);
            let mut rng = rand::rngs::StdRng::seed_from_u64(crc32fast::hash(&seed).into());
            for _ in 0..mutations {
                let mut input = seed.clone();
                let n = rng.random_range(1..6);
                let edits: Vec<_> = (0..n)
                    .map(|_| {
                        (
                            rng.random::<u64>() as usize,
                            rng.random(),
                            rng.random_range(0..4),
                        )
                    })
                    .collect();
                harness::damage(&mut input, edits.into_iter());
                run(&input);
                total += 1;
            }
        }
    }
    println!(
        "fuzz corpus: {total} mutated inputs through {} targets",
        harness::TARGETS.len()
    );
}
