//! `POST /v1/namespaces/{ns}/streams/{stream}/events`: publish, in any of the four content
//! modes, answered once the events are durable.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode, header};
use tokio::time::Instant;

use super::{HttpState, StreamPath, authorize, stream_or_404, unavailable};
use crate::data::access::Right;
use crate::data::broker::Routing;
use crate::data::event::{EXT_PUBLISHER, ExtValue};
use crate::data::ingest::{IngestContext, parse_request_bytes};
use crate::data::plane::{AppendError, AppendOutcome};
use crate::data::problem::HttpProblem;
use crate::data::store::{Appended, Conflict};
use crate::data::tracecontext::Ingest;
use crate::openapi::{BinaryData, CloudEventJson, SimplePublish};

/// The answer of a publish to a stream with a store.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct Stored<'a> {
    results: Vec<StoredResult<'a>>,
}

/// The answer of a publish to a broker-only stream.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct Routed<'a> {
    results: Vec<RoutedResult<'a>>,
}

/// One stored event of a `201 Created` publish answer.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct StoredResult<'a> {
    id: &'a str,
    source: &'a str,
    position: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<i64>,
    duplicate: bool,
}

/// One event of a broker-only stream's `202 Accepted` publish answer.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct RoutedResult<'a> {
    id: &'a str,
    source: &'a str,
    routed: bool,
}

#[utoipa::path(
    post,
    path = "/v1/namespaces/{ns}/streams/{stream}/events",
    tag = "publish",
    operation_id = "publish",
    params(
        StreamPath,
        ("ce-specversion" = Option<String>, Header, description = "Binary mode: `1.0`; with the other `ce-` headers the body is the event's data"),
        ("ce-id" = Option<String>, Header, description = "Binary mode: the event's id"),
        ("ce-source" = Option<String>, Header, description = "Binary mode: the event's source"),
        ("ce-type" = Option<String>, Header, description = "Binary mode: the event's type"),
        ("ce-subject" = Option<String>, Header, description = "Binary mode: the event's subject"),
        ("ce-time" = Option<String>, Header, description = "Binary mode: the event's time (RFC 3339)"),
        ("ce-expectedversion" = Option<String>, Header, description = "Binary mode: the subject's current version must equal this (`0`: the subject must not exist); any other `ce-<name>` header is an extension"),
        ("traceparent" = Option<String>, Header, description = "W3C Trace Context: the publisher's trace, kept with each event that does not carry its own `traceparent` extension and sent on to sinks; without a valid one (a malformed header is ignored, as W3C asks), each request starts a new trace"),
        ("tracestate" = Option<String>, Header, description = "W3C Trace Context: vendor state that travels with `traceparent`"),
    ),
    request_body(
        description = "Structured (`application/cloudevents+json`), batched \
                       (`application/cloudevents-batch+json`), binary (any content type with \
                       `ce-specversion` and the other `ce-` headers) or Weir's simple shape \
                       (`application/json` without `ce-` headers)",
        content(
            (CloudEventJson = "application/cloudevents+json"),
            (Vec<CloudEventJson> = "application/cloudevents-batch+json"),
            (SimplePublish = "application/json"),
            (BinaryData = "*/*"),
        ),
    ),
    responses(
        (status = 201, description = "Stream with a store: every event is committed (or was already: `duplicate`)", body = Stored),
        (status = 202, description = "Broker-only stream: every event was confirmed by the broker", body = Routed),
        (status = 400, description = "Malformed JSON, an invalid CloudEvent or extension, a body that could not be read to its end", body = HttpProblem, content_type = "application/problem+json"),
        (status = 401, description = "The stream has `ingest.auth` and the request has no bearer token, or one it does not know", body = HttpProblem, content_type = "application/problem+json",
            headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"weir\"`"))),
        (status = 403, description = "The token is valid but its holder may not publish", body = HttpProblem, content_type = "application/problem+json"),
        (status = 404, description = "No such stream in this namespace", body = HttpProblem, content_type = "application/problem+json"),
        (status = 408, description = "The body did not arrive whole within the body read timeout", body = HttpProblem, content_type = "application/problem+json"),
        (status = 409, description = "`expectedversion` does not match (`version-conflict`), or an id stored by another publisher (`id-conflict`)", body = HttpProblem, content_type = "application/problem+json"),
        (status = 413, description = "The body exceeds `maxRequestBytes`, an event `maxEventBytes`, or the request holds more events than the rate limit's burst", body = HttpProblem, content_type = "application/problem+json"),
        (status = 415, description = "A content type ingest does not read", body = HttpProblem, content_type = "application/problem+json"),
        (status = 422, description = "A required extension is missing, `data` breaks its type's schema, an unknown type is refused, or personal data cannot be encrypted", body = HttpProblem, content_type = "application/problem+json"),
        (status = 429, description = "The stream's rate limit holds fewer tokens than the request has events; nothing is stored", body = HttpProblem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds until the request would fit"))),
        (status = 500, description = "A fault inside Weir", body = HttpProblem, content_type = "application/problem+json"),
        (status = 503, description = "Body memory spent, store or broker unreachable, batch queue full, or durability not reached within the request timeout", body = HttpProblem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying (with the same ids)"))),
    ),
    security((), ("bearer" = [])),
)]
pub(super) async fn publish(
    State(st): State<HttpState>,
    Path((ns, stream)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let trace = Ingest::start(&ns, &stream, &headers);
    let result = publish_inner(&st, &ns, &stream, &headers, body, &trace).await;
    let (response, outcome_events) = match result {
        Ok((resp, accepted, duplicates)) => (resp, Some((accepted, duplicates))),
        Err((p, rejected)) => {
            if rejected > 0 {
                st.engine
                    .metrics
                    .ingest_events
                    .with_label_values(&[&ns, &stream, "rejected"])
                    .inc_by(rejected as u64);
            }
            (p.into_response(), None)
        }
    };
    trace.answered(response.status().as_u16());
    // Only label known streams: an unknown stream name must not create label values.
    if st.engine.stream(&ns, &stream).is_some() {
        let m = &st.engine.metrics;
        m.ingest_requests
            .with_label_values(&[&ns, &stream, response.status().as_str()])
            .inc();
        m.ingest_request_duration
            .with_label_values(&[&ns, &stream])
            .observe(started.elapsed().as_secs_f64());
        if let Some((accepted, duplicates)) = outcome_events {
            m.ingest_events
                .with_label_values(&[&ns, &stream, "accepted"])
                .inc_by(accepted as u64);
            m.ingest_events
                .with_label_values(&[&ns, &stream, "duplicate"])
                .inc_by(duplicates as u64);
        }
    }
    response
}

type PublishResult = Result<(Response, usize, usize), (HttpProblem, usize)>;

async fn publish_inner(
    st: &HttpState,
    ns: &str,
    stream: &str,
    headers: &HeaderMap,
    body: Body,
    trace: &Ingest,
) -> PublishResult {
    let rt = stream_or_404(st, ns, stream).map_err(|p| (p, 0))?;
    // Who is publishing comes first: nothing of an unauthenticated request is read.
    let publisher = authorize(st, &rt, headers, Right::Publish)
        .await
        .map_err(|p| (p, 0))?;
    crate::data::ingest::check_content_type(headers).map_err(|p| (p, 0))?;
    let limit = rt.plan.validation.max_request_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(n) = declared.filter(|n| *n > limit) {
        return Err((HttpProblem::payload_too_large(Some(n), limit), 0));
    }
    // Held until the request is answered: its bytes live that long.
    let mut hold = st.body_budget.hold();
    let bytes = crate::data::ingest::body::read_body(
        body,
        limit,
        Instant::now() + st.body_read_timeout,
        &mut hold,
    )
    .await
    .map_err(|e| (e.problem(limit), 0))?;
    // Announce the request to the batcher while it is parsed, so a batch being formed waits
    // for it (up to maxDelay) instead of leaving without it. Only once the body is in: a
    // body still on the network may take up to the body read timeout, and while it was
    // announced every batch of the stream waited its full maxDelay for it.
    let joining = rt.batcher().as_ref().map(|b| b.joining());
    let ctx = IngestContext {
        namespace: ns.to_string(),
        stream: stream.to_string(),
        now: chrono::Utc::now(),
    };
    let mut events = parse_request_bytes(headers, &bytes, &ctx).map_err(|p| (p, 0))?;
    if let Some(name) = publisher {
        // Parsing refused a `weirpublisher` sent by the client: this one is Weir's.
        for ev in &mut events {
            ev.extensions
                .insert(EXT_PUBLISHER.into(), ExtValue::String(name.clone()));
        }
    }
    let n = events.len();
    crate::data::ingest::limit::admit(&st.engine.metrics, &rt, None, n).map_err(|p| (p, n))?;
    // The response names each event; keep just that, the events move to the append.
    let names: Vec<(String, String)> = events
        .iter()
        .map(|e| (e.id.clone(), e.source.clone()))
        .collect();
    let deadline = started_deadline(st);
    match st.plane.append(&rt, events, deadline, joining, trace).await {
        Ok(AppendOutcome::Stored(results)) => Ok(stored_response(&names, &results)),
        Ok(AppendOutcome::Published(routing)) => {
            let results: Vec<_> = names
                .iter()
                .zip(&routing)
                .map(|((id, source), r)| RoutedResult {
                    id,
                    source,
                    routed: matches!(r, Routing::Routed),
                })
                .collect();
            let body = Routed { results };
            Ok((
                (StatusCode::ACCEPTED, axum::Json(body)).into_response(),
                n,
                0,
            ))
        }
        Err(AppendError::Invalid(p)) => Err((p, n)),
        Err(AppendError::Conflict(Conflict::Version {
            index,
            subject,
            expected,
            actual,
        })) => Err((
            HttpProblem::version_conflict(index, &subject, expected, actual),
            0,
        )),
        Err(AppendError::Conflict(Conflict::ForeignId { index, source, id })) => {
            Err((HttpProblem::foreign_id(index, &source, &id), 0))
        }
        Err(AppendError::Failed(e)) => Err((HttpProblem::internal(e), 0)),
        Err(AppendError::Problem(p)) => Err((p, 0)),
        Err(AppendError::NotFound(_)) => Err((HttpProblem::stream_not_found(ns, stream), 0)),
        Err(AppendError::Unavailable(why)) => Err((unavailable(&why), 0)),
    }
}

fn started_deadline(st: &HttpState) -> Instant {
    Instant::now() + st.request_timeout
}

fn stored_response(names: &[(String, String)], results: &[Appended]) -> (Response, usize, usize) {
    let out: Vec<_> = names
        .iter()
        .zip(results)
        .map(|((id, source), r)| StoredResult {
            id,
            source,
            position: r.position,
            version: r.version,
            duplicate: r.duplicate,
        })
        .collect();
    let dups = results.iter().filter(|r| r.duplicate).count();
    let body = Stored { results: out };
    (
        (StatusCode::CREATED, axum::Json(body)).into_response(),
        results.len() - dups,
        dups,
    )
}
