//! The spans of an event's journey and the contexts they hand on: the request's
//! ([`Ingest`]), a batch commit's or relay round's ([`Round`]), a delivery attempt's
//! ([`Attempt`]) and what the sink is sent ([`Outgoing`]).

use http::{HeaderMap, HeaderValue};
use opentelemetry::trace::{SpanContext, TraceContextExt as _};
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::{
    EXT_TRACEPARENT, EXT_TRACESTATE, MAX_LINKS, MAX_SPANS_PER_ROUND, SPAN_TARGET, carry, exporting,
    from_headers, new_root, of_event, traceparent, tracestate,
};
use crate::data::event::CloudEvent;
use crate::topology::Key;

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
