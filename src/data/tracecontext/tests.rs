//! Parsing, precedence and what a sink is sent, without an exporter.

use http::{HeaderMap, HeaderValue};

use super::*;
use crate::topology::Key;

const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[test]
fn a_valid_traceparent_parses_and_prints_back() {
    let sc = parse(VALID, Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")).unwrap();
    assert_eq!(
        sc.trace_id().to_string(),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
    assert!(sc.is_sampled());
    assert_eq!(traceparent(&sc), VALID);
    assert_eq!(
        tracestate(&sc).as_deref(),
        Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
    );
    // Not sampled; unknown flags dropped.
    let sc = parse(&VALID.replace("-01", "-02"), None).unwrap();
    assert!(!sc.is_sampled());
    assert!(traceparent(&sc).ends_with("-00"));
}

#[test]
fn malformed_traceparents_are_ignored() {
    for bad in [
        "",
        "garbage",
        // Wrong lengths: trace id 30 and 34 digits, span id 14, flags 1 and 3.
        "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473600-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-011",
        // Upper case, non-hex, sign characters.
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0G",
        "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        // All-zero ids, the forbidden version, version 00 with more fields.
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        // Wrong separators; a higher version must separate what follows with '-'.
        "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
    ] {
        assert!(parse(bad, None).is_none(), "{bad:?} must be refused");
    }
}

#[test]
fn a_higher_version_is_read_from_its_first_fields() {
    let sc = parse(
        "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds",
        None,
    )
    .unwrap();
    assert_eq!(traceparent(&sc), VALID);
}

#[test]
fn tracestate_is_kept_when_valid_and_cut_when_long() {
    assert!(
        parse(VALID, Some("not a list member"))
            .map(|sc| tracestate(&sc))
            .unwrap()
            .is_none()
    );
    let long: Vec<String> = (0..30)
        .map(|i| format!("k{i}={}", "v".repeat(30)))
        .collect();
    let sc = parse(VALID, Some(&long.join(","))).unwrap();
    let kept = tracestate(&sc).unwrap();
    assert!(kept.len() <= MAX_TRACESTATE, "{}", kept.len());
    assert!(kept.starts_with("k0="), "{kept}");
}

#[test]
fn headers_a_repeated_traceparent_is_invalid_and_tracestates_join() {
    let mut h = HeaderMap::new();
    h.append(EXT_TRACEPARENT, HeaderValue::from_static(VALID));
    h.append(EXT_TRACESTATE, HeaderValue::from_static("a=1"));
    h.append(EXT_TRACESTATE, HeaderValue::from_static("b=2"));
    let sc = from_headers(&h).unwrap();
    assert_eq!(tracestate(&sc).as_deref(), Some("a=1,b=2"));
    h.append(EXT_TRACEPARENT, HeaderValue::from_static(VALID));
    assert!(from_headers(&h).is_none());
}

fn ev(traceparent: Option<&str>) -> CloudEvent {
    let mut e = CloudEvent::bare("1");
    if let Some(t) = traceparent {
        e.extensions
            .insert(EXT_TRACEPARENT.into(), ExtValue::String(t.into()));
        e.extensions
            .insert(EXT_TRACESTATE.into(), ExtValue::String("x=y".into()));
    }
    e
}

#[test]
fn stamping_follows_the_precedence() {
    let other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let mut headers = HeaderMap::new();
    headers.insert(EXT_TRACEPARENT, HeaderValue::from_static(other));
    let ingest = Ingest::start("ns", "s", &headers);
    let mut events = vec![ev(Some(VALID)), ev(None), ev(Some("00-bogus"))];
    ingest.stamp(&mut events);
    // Its own attribute wins; the header fills the others, a broken one included (and
    // the broken one's tracestate goes with it).
    assert_eq!(events[0].extension_str(EXT_TRACEPARENT).unwrap(), VALID);
    assert_eq!(events[0].extension_str(EXT_TRACESTATE).unwrap(), "x=y");
    for e in &events[1..] {
        assert_eq!(e.extension_str(EXT_TRACEPARENT).unwrap(), other);
        assert!(e.extension_str(EXT_TRACESTATE).is_none());
    }
}

#[test]
fn without_any_context_a_request_starts_one_trace() {
    let ingest = Ingest::start("ns", "s", &HeaderMap::new());
    let mut events = vec![ev(None), ev(None)];
    ingest.stamp(&mut events);
    let a = of_event(&events[0]).unwrap();
    let b = of_event(&events[1]).unwrap();
    assert_eq!(a, b);
    assert!(a.is_sampled());
    let mut more = vec![ev(None)];
    Ingest::internal().stamp(&mut more);
    assert_ne!(of_event(&more[0]).unwrap().trace_id(), a.trace_id());
}

#[test]
fn the_sink_is_sent_the_carried_context_when_nothing_is_exported() {
    let e = ev(Some(VALID));
    let attempt = Attempt::start(&e, &Key::new("ns", "sub"), 1);
    let mut h = HeaderMap::new();
    attempt.outgoing().apply(&mut h);
    assert_eq!(h[EXT_TRACEPARENT], VALID);
    assert_eq!(h[EXT_TRACESTATE], "x=y");
    let mut h = HeaderMap::new();
    Attempt::start(&ev(None), &Key::new("ns", "sub"), 1)
        .outgoing()
        .apply(&mut h);
    assert!(h.get(EXT_TRACEPARENT).is_none());
}

#[test]
fn a_reply_without_a_context_continues_the_delivery_trace() {
    let delivered = parse(VALID, None).unwrap();
    let mut reply = ev(None);
    carry_if_missing(&mut reply, Some(&delivered));
    assert_eq!(reply.extension_str(EXT_TRACEPARENT).unwrap(), VALID);
    let other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let mut own = ev(Some(other));
    carry_if_missing(&mut own, Some(&delivered));
    assert_eq!(own.extension_str(EXT_TRACEPARENT).unwrap(), other);
}
