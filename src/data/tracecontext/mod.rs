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

use crate::data::event::{CloudEvent, ExtValue};
use http::HeaderMap;
use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

mod spans;
#[cfg(test)]
mod tests;

pub use spans::{Attempt, Ingest, Outgoing, Round, Stage};

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
