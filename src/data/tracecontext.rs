//! W3C Trace Context carried with every event, and the spans of an event's journey through
//! Weir: ingest (the publish request), batch commit, relay publish and each delivery attempt.
//!
//! # What an event carries
//!
//! Every event Weir stores or publishes carries the CloudEvents distributed-tracing extension:
//! `traceparent` (always) and `tracestate` (when there is one). They are ordinary extension
//! attributes, so they are stored with the event's other extensions, travel to RabbitMQ as the
//! headers `cloudEvents:traceparent` and `cloudEvents:tracestate`, and reach a sink as
//! `ce-traceparent`/`ce-tracestate` (binary mode) or members of the event (structured mode).
//! As the CloudEvents extension asks, they name the context the event was *published in* and
//! are not changed from hop to hop; each hop's own context is the `traceparent` HTTP header
//! Weir sends to the sink (see [`Outgoing`]).
//!
//! Which context an event gets at ingest ([`Ingest::stamp`]), first match wins:
//!
//! 1. its own `traceparent` attribute (structured or batch member, binary `ce-traceparent`),
//!    when it is valid: an event's attribute is about that event, a request header about the
//!    whole request (a batch may hold events of many traces);
//! 2. the request's `traceparent` HTTP header (with its `tracestate`), when it is valid;
//! 3. a new trace: the ingest span's context when spans are exported, else new random ids
//!    (sampled flag set), one per request.
//!
//! A `traceparent` that breaks the W3C format (wrong lengths, upper-case or non-hex digits,
//! version `ff`, all-zero ids, a repeated header) is ignored as the W3C spec asks: it is as if
//! there were none, and its `tracestate` goes with it. It never fails the request.
//!
//! # Spans
//!
//! Spans are `tracing` spans of the target [`SPAN_TARGET`], exported over OTLP by the
//! `tracing-opentelemetry` layer that `crate::otel` installs when an OTLP endpoint is
//! configured. None is created otherwise ([`exporting`] is false): the hot path then builds
//! no span and no attribute. Each span's parent is the context carried with the event (the
//! ingest span's parent is the request's header, or the events' own context when all of them
//! carry the same trace), so every span of an event's journey is in the event's trace. A
//! batch commit or relay round holding events of several traces makes one span per trace (at
//! most [`MAX_SPANS_PER_ROUND`]).

use std::sync::atomic::{AtomicBool, Ordering};

use http::{HeaderMap, HeaderValue};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::data::event::{CloudEvent, ExtValue};
use crate::topology::Key;

/// The CloudEvents distributed-tracing extension attributes (and W3C header names).
pub const EXT_TRACEPARENT: &str = "traceparent";
pub const EXT_TRACESTATE: &str = "tracestate";
/// The `tracing` target of the journey spans: the only spans exported, and left out of the
/// log.
pub const SPAN_TARGET: &str = "weir::journey";
/// Spans one batch commit or relay round makes at most, one per trace among its events. A
/// round is up to 500 events (relay) or `maxEvents` (commit); past this many traces the
/// others get none, so the export's volume stays bounded however large a round is.
pub const MAX_SPANS_PER_ROUND: usize = 128;
/// Links an ingest span keeps to the traces of events that are not in its own (a batch of
/// events published from many traces); the SDK's default cap is 128 per span.
const MAX_LINKS: usize = 32;
/// Longest `tracestate` kept. W3C asks every platform to propagate at least 512 characters
/// and allows cutting whole list members beyond that.
const MAX_TRACESTATE: usize = 512;

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Turns span creation on (an OTLP exporter is installed) or off.
pub fn set_exporting(on: bool) {
    EXPORTING.store(on, Ordering::Release);
}

/// Whether journey spans are made: an exporter takes them.
#[inline]
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// A `traceparent` value and the `tracestate` that goes with it, parsed as W3C Trace Context
/// says. `None` when `traceparent` is not valid (the caller then starts a new trace).
///
/// Version `00` must be exactly `00-<32 hex>-<16 hex>-<2 hex>`, lower case, with non-zero
/// ids. A higher version (not `ff`) is read the same way from its first 55 characters, which
/// must be followed by `-` if anything follows. Only the sampled flag is kept: it is the only
/// flag version `00` defines, and the context is sent on as version `00`. An invalid
/// `tracestate` is dropped (the context stays); one longer than 512 characters is cut at a
/// list member.
pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    let b = traceparent.trim_matches([' ', '\t']).as_bytes();
    if b.len() < 55 {
        return None;
    }
    let version = hex_u8(&b[0..2])?;
    match version {
        0xff => return None,
        0 if b.len() != 55 => return None,
        _ if b.len() > 55 && b[55] != b'-' => return None,
        _ => {}
    }
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let trace_id = TraceId::from_bytes(hex_bytes::<16>(&b[3..35])?);
    let span_id = SpanId::from_bytes(hex_bytes::<8>(&b[36..52])?);
    let flags = TraceFlags::new(hex_u8(&b[53..55])?) & TraceFlags::SAMPLED;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let state = tracestate
        .and_then(|s| s.parse::<TraceState>().ok())
        .map(|s| cut_state(&s))
        .unwrap_or_default();
    Some(SpanContext::new(trace_id, span_id, flags, true, state))
}

/// Lower-case hex digit (W3C refuses upper case).
fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn hex_u8(two: &[u8]) -> Option<u8> {
    Some((hex_digit(two[0])? << 4) | hex_digit(two[1])?)
}

fn hex_bytes<const N: usize>(hex: &[u8]) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        out[i] = hex_u8(pair)?;
    }
    Some(out)
}

/// `state` cut to [`MAX_TRACESTATE`] characters at a list member.
fn cut_state(state: &TraceState) -> TraceState {
    let header = state.header();
    if header.len() <= MAX_TRACESTATE {
        return state.clone();
    }
    let mut kept = String::new();
    for member in header.split(',') {
        if kept.len() + 1 + member.len() > MAX_TRACESTATE {
            break;
        }
        if !kept.is_empty() {
            kept.push(',');
        }
        kept.push_str(member);
    }
    kept.parse().unwrap_or_default()
}

/// The version-00 `traceparent` of a context.
pub fn traceparent(sc: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags() & TraceFlags::SAMPLED
    )
}

/// The `tracestate` of a context, if it has one.
fn tracestate(sc: &SpanContext) -> Option<String> {
    let header = sc.trace_state().header();
    (!header.is_empty()).then_some(header)
}

/// The context of a request's `traceparent`/`tracestate` headers. Two `traceparent` headers
/// make it invalid (W3C); several `tracestate` headers are one list.
pub fn from_headers(headers: &HeaderMap) -> Option<SpanContext> {
    let mut parents = headers.get_all(EXT_TRACEPARENT).iter();
    let parent = parents.next()?.to_str().ok()?;
    if parents.next().is_some() {
        return None;
    }
    let mut states = headers.get_all(EXT_TRACESTATE).iter();
    let state = match (states.next(), states.next()) {
        (None, _) => None,
        (Some(one), None) => one.to_str().ok().map(std::borrow::Cow::Borrowed),
        (Some(_), Some(_)) => {
            let all: Option<Vec<&str>> = headers
                .get_all(EXT_TRACESTATE)
                .iter()
                .map(|v| v.to_str().ok())
                .collect();
            all.map(|v| std::borrow::Cow::Owned(v.join(",")))
        }
    };
    parse(parent, state.as_deref())
}

/// The context an event carries (its `traceparent` and `tracestate` extensions), if valid.
pub fn of_event(ev: &CloudEvent) -> Option<SpanContext> {
    let Some(ExtValue::String(parent)) = ev.extensions.get(EXT_TRACEPARENT) else {
        return None;
    };
    let state = match ev.extensions.get(EXT_TRACESTATE) {
        Some(ExtValue::String(s)) => Some(s.as_str()),
        _ => None,
    };
    parse(parent, state)
}

/// The trace id of an event, as 32 hex digits, if it carries a valid context.
pub fn trace_id(ev: &CloudEvent) -> Option<String> {
    of_event(ev).map(|sc| sc.trace_id().to_string())
}

/// Makes `sc` the context `ev` carries (its `tracestate` too, or none).
fn carry(ev: &mut CloudEvent, sc: &SpanContext) {
    ev.extensions.insert(
        EXT_TRACEPARENT.to_string(),
        ExtValue::String(traceparent(sc)),
    );
    match tracestate(sc) {
        Some(state) => {
            ev.extensions
                .insert(EXT_TRACESTATE.to_string(), ExtValue::String(state));
        }
        None => {
            ev.extensions.remove(EXT_TRACESTATE);
        }
    }
}

/// Gives `ev` the context `sc` unless it carries a valid one already (a sink's reply that
/// names no trace continues the delivery's).
pub fn carry_if_missing(ev: &mut CloudEvent, sc: Option<&SpanContext>) {
    if let Some(sc) = sc
        && of_event(ev).is_none()
    {
        carry(ev, sc);
    }
}

/// A new trace with random ids, sampled: what an event gets when nothing names a trace and no
/// span is exported.
fn new_root() -> SpanContext {
    loop {
        let trace_id = TraceId::from_bytes(rand::random());
        let span_id = SpanId::from_bytes(rand::random());
        if trace_id != TraceId::INVALID && span_id != SpanId::INVALID {
            return SpanContext::new(
                trace_id,
                span_id,
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            );
        }
    }
}

fn remote_parent(sc: &SpanContext) -> opentelemetry::Context {
    opentelemetry::Context::new().with_remote_span_context(sc.clone())
}

/// The context a span was given (its own ids, in its parent's trace).
fn span_context(span: &Span) -> Option<SpanContext> {
    let sc = span.context().span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// The trace context of one append request: the publish request's header and its ingest
/// span, or nothing (replies and dead letters Weir appends itself).
pub struct Ingest {
    header: Option<SpanContext>,
    span: Option<Span>,
}

impl Ingest {
    /// The context of a publish request: its `traceparent` header and, when spans are
    /// exported, the ingest span (a child of that header's context).
    pub fn start(namespace: &str, stream: &str, headers: &HeaderMap) -> Ingest {
        let header = from_headers(headers);
        let span = exporting().then(|| {
            let span = tracing::info_span!(
                target: SPAN_TARGET,
                parent: None,
                "weir.ingest",
                otel.kind = "server",
                weir.namespace = namespace,
                weir.stream = stream,
                weir.events = Empty,
                http.response.status_code = Empty,
                otel.status_code = Empty,
            );
            if let Some(h) = &header {
                let _ = span.set_parent(remote_parent(h));
            }
            span
        });
        Ingest { header, span }
    }

    /// An append Weir makes itself (a reply, a dead letter): no header, no ingest span.
    pub fn internal() -> Ingest {
        Ingest {
            header: None,
            span: None,
        }
    }

    /// Gives every event the context it is to carry (see the [module docs](self)); call once
    /// the stream's validation has passed.
    pub fn stamp(&self, events: &mut [CloudEvent]) {
        let mut parent_trace = self.header.as_ref().map(|h| h.trace_id());
        if let Some(span) = &self.span {
            span.record("weir.events", events.len());
            // Without a header, a request whose events all carry one trace is that trace's
            // (a single event published with only the attribute, the common case).
            if parent_trace.is_none() {
                let mut contexts = events.iter().map(of_event);
                if let Some(Some(first)) = contexts.next()
                    && contexts.all(|c| c.is_some_and(|c| c.trace_id() == first.trace_id()))
                {
                    parent_trace = Some(first.trace_id());
                    let _ = span.set_parent(remote_parent(&first));
                }
            }
        }
        let mut fallback = self.header.clone();
        let mut links = 0;
        for ev in events.iter_mut() {
            match of_event(ev) {
                Some(own) => {
                    if let Some(span) = &self.span
                        && parent_trace != Some(own.trace_id())
                        && links < MAX_LINKS
                    {
                        span.add_link(own);
                        links += 1;
                    }
                }
                None => {
                    let sc = fallback.get_or_insert_with(|| {
                        self.span
                            .as_ref()
                            .and_then(span_context)
                            .unwrap_or_else(new_root)
                    });
                    carry(ev, sc);
                }
            }
        }
    }

    /// Records the answer's status on the ingest span.
    pub fn answered(&self, status: u16) {
        if let Some(span) = &self.span {
            span.record("http.response.status_code", status);
            if status >= 500 {
                span.record("otel.status_code", "ERROR");
            }
        }
    }
}

/// A stage of the journey that handles events in rounds.
#[derive(Clone, Copy, Debug)]
pub enum Stage {
    /// One batch's commit to the store.
    Commit,
    /// One relay round's publish to the stream's exchange, until confirmed.
    Relay,
}

/// The spans of one round (a batch commit, a relay publish): one per trace among its events,
/// each a child of the context its events carry. Ended when dropped.
pub struct Round(Vec<Span>);

impl Round {
    /// Starts the round's spans (none unless [`exporting`]).
    pub fn start<'a>(
        stage: Stage,
        [namespace, stream]: [&str; 2],
        events: impl IntoIterator<Item = &'a CloudEvent>,
    ) -> Round {
        if !exporting() {
            return Round(Vec::new());
        }
        let mut traces: Vec<(SpanContext, usize)> = Vec::new();
        for ev in events {
            let Some(sc) = of_event(ev) else { continue };
            let full = traces.len() >= MAX_SPANS_PER_ROUND;
            match traces
                .iter_mut()
                .find(|(t, _)| t.trace_id() == sc.trace_id() && t.span_id() == sc.span_id())
            {
                Some((_, n)) => *n += 1,
                None if !full => traces.push((sc, 1)),
                None => {}
            }
        }
        Round(
            traces
                .into_iter()
                .map(|(sc, n)| {
                    let span = match stage {
                        Stage::Commit => tracing::info_span!(
                            target: SPAN_TARGET,
                            parent: None,
                            "weir.commit",
                            otel.kind = "internal",
                            weir.namespace = namespace,
                            weir.stream = stream,
                            weir.events = n,
                            otel.status_code = Empty,
                            otel.status_description = Empty,
                        ),
                        Stage::Relay => tracing::info_span!(
                            target: SPAN_TARGET,
                            parent: None,
                            "weir.relay",
                            otel.kind = "producer",
                            weir.namespace = namespace,
                            weir.stream = stream,
                            weir.events = n,
                            otel.status_code = Empty,
                            otel.status_description = Empty,
                        ),
                    };
                    let _ = span.set_parent(remote_parent(&sc));
                    span
                })
                .collect(),
        )
    }

    /// Marks the round failed (it is tried again in a new round).
    pub fn failed(&self, why: &dyn std::fmt::Display) {
        for span in &self.0 {
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_description", tracing::field::display(why));
        }
    }
}

/// One delivery attempt's span (a child of the context the event carries) and the context
/// sent to the sink with it.
pub struct Attempt {
    span: Option<Span>,
    out: Outgoing,
}

impl Attempt {
    /// Starts attempt number `attempt` of delivering `ev` for `subscription`.
    pub fn start(ev: &CloudEvent, subscription: &Key, attempt: u32) -> Attempt {
        let carried = of_event(ev);
        if !exporting() {
            // Weir records nothing: the sink is told the publisher's context as it came.
            return Attempt {
                span: None,
                out: Outgoing(carried),
            };
        }
        let span = tracing::info_span!(
            target: SPAN_TARGET,
            parent: None,
            "weir.deliver",
            otel.kind = "client",
            weir.namespace = subscription.namespace.as_str(),
            weir.subscription = subscription.name.as_str(),
            weir.attempt = attempt,
            http.response.status_code = Empty,
            otel.status_code = Empty,
            otel.status_description = Empty,
        );
        if let Some(c) = &carried {
            let _ = span.set_parent(remote_parent(c));
        }
        let out = Outgoing(span_context(&span).or(carried));
        Attempt {
            span: Some(span),
            out,
        }
    }

    /// What the sink is sent as `traceparent`/`tracestate`.
    pub fn outgoing(&self) -> &Outgoing {
        &self.out
    }

    /// Records the sink's answer (`status`, if it answered) and the failure, if it failed.
    pub fn answered(&self, status: Option<u16>, failure: Option<&str>) {
        if let Some(span) = &self.span {
            if let Some(s) = status {
                span.record("http.response.status_code", s);
            }
            if let Some(f) = failure {
                span.record("otel.status_code", "ERROR");
                span.record("otel.status_description", f);
            }
        }
    }
}

/// The context sent to a sink in the W3C `traceparent`/`tracestate` headers: the delivery
/// attempt's span when spans are exported (the sink's span becomes its child), else the
/// context the event carries.
#[derive(Clone, Debug, Default)]
pub struct Outgoing(Option<SpanContext>);

impl Outgoing {
    /// The context an event carries, sent on as it is (dead-letter sinks).
    pub fn of_event(ev: &CloudEvent) -> Outgoing {
        Outgoing(of_event(ev))
    }

    pub fn context(&self) -> Option<&SpanContext> {
        self.0.as_ref()
    }

    /// Sets the `traceparent` (and `tracestate`) headers.
    pub fn apply(&self, headers: &mut HeaderMap) {
        let Some(sc) = &self.0 else { return };
        if let Ok(v) = HeaderValue::try_from(traceparent(sc)) {
            headers.insert(EXT_TRACEPARENT, v);
        }
        match tracestate(sc).and_then(|s| HeaderValue::try_from(s).ok()) {
            Some(v) => {
                headers.insert(EXT_TRACESTATE, v);
            }
            None => {
                headers.remove(EXT_TRACESTATE);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
