//! The ingest/read HTTP API (default port 8080): publish, and read by position, range and
//! subject. Every error is an RFC 7807 problem naming what is wrong.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Deserialize;
use tokio::time::Instant;

use crate::data::access::{self, Right};
use crate::data::broker::Routing;
use crate::data::cache::{CacheKey, Cached, read_through};
use crate::data::engine::{Engine, StreamRuntime};
use crate::data::event::{EXT_PUBLISHER, ExtValue, StoredEvent, to_batch_json, to_structured_json};
use crate::data::ingest::{IngestContext, parse_request_bytes};
use crate::data::plane::{AppendError, AppendOutcome, Plane};
use crate::data::problem::HttpProblem;
use crate::data::store::{Appended, Conflict};
use crate::data::trace::MAX_TRACE;
use crate::data::tracecontext::Ingest;
use crate::server::CloseConnection;

mod follow;
mod subject;

pub use follow::Followers;

/// Largest page the read API returns; a client pages on with `from`.
const MAX_PAGE: i64 = 1000;
const DEFAULT_PAGE: i64 = 100;
/// `Retry-After` seconds sent with 503: long enough for a batch queue to drain or a broker
/// connection to come back, short enough not to idle publishers.
pub(crate) const RETRY_AFTER_SECS: u64 = 1;

#[derive(Clone)]
pub struct HttpState {
    /// For reads (streams, stores, caches).
    pub engine: Arc<Engine>,
    /// For publishes: the one append path.
    pub plane: Arc<Plane>,
    /// How long a publish may wait for durability before it is answered 503.
    pub request_timeout: Duration,
    /// The operator's TokenReview client (`ServiceAccounts` streams); `None` standalone.
    pub reviewer: Option<Arc<dyn crate::data::auth::Reviewer>>,
    /// How long a publish's body may take to arrive whole before it is answered 408.
    pub body_read_timeout: Duration,
    /// The worker's memory for publish bodies in flight (`--body-memory`).
    pub body_budget: Arc<crate::data::ingest::budget::BodyBudget>,
    /// The live follows (`?follow=true`) and their bounds.
    pub followers: Arc<Followers>,
    /// Cancelled when the worker stops: live follows end then.
    pub shutdown: tokio_util::sync::CancellationToken,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route(
            "/v1/namespaces/{ns}/streams/{stream}/events",
            get(read_range).post(publish),
        )
        .route(
            "/v1/namespaces/{ns}/streams/{stream}/events/{position}",
            get(read_one),
        )
        .route(
            "/v1/namespaces/{ns}/streams/{stream}/subjects/{subject}/events",
            get(read_subject),
        )
        .route(
            "/v1/namespaces/{ns}/correlations/{id}/events",
            get(trace_handler),
        )
        // Each stream enforces its own maxRequestBytes; axum's global 2 MB default must not.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// The caller's name if it may do `right` on the stream (`None`: an open stream).
async fn authorize(
    st: &HttpState,
    rt: &StreamRuntime,
    headers: &HeaderMap,
    right: Right,
) -> Result<Option<String>, HttpProblem> {
    access::authorize(
        &rt.access(),
        rt.key(),
        headers,
        right,
        st.reviewer.as_deref(),
    )
    .await
    .map_err(|d| d.problem())
}

fn stream_or_404(
    st: &HttpState,
    ns: &str,
    stream: &str,
) -> Result<Arc<StreamRuntime>, HttpProblem> {
    st.engine
        .stream(ns, stream)
        .ok_or_else(|| HttpProblem::stream_not_found(ns, stream))
}

#[derive(serde::Serialize)]
struct StoredResult<'a> {
    id: &'a str,
    source: &'a str,
    position: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<i64>,
    duplicate: bool,
}

#[derive(serde::Serialize)]
struct RoutedResult<'a> {
    id: &'a str,
    source: &'a str,
    routed: bool,
}

async fn publish(
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
            let body = serde_json::json!({ "results": results });
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

fn unavailable(detail: &str) -> HttpProblem {
    HttpProblem::unavailable(detail.to_string(), RETRY_AFTER_SECS)
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
    let body = serde_json::json!({ "results": out });
    (
        (StatusCode::CREATED, axum::Json(body)).into_response(),
        results.len() - dups,
        dups,
    )
}

/// The stream to read and its store id, once the caller may read it.
async fn readable(
    st: &HttpState,
    ns: &str,
    stream: &str,
    headers: &HeaderMap,
) -> Result<(Arc<StreamRuntime>, i64), HttpProblem> {
    let rt = stream_or_404(st, ns, stream)?;
    authorize(st, &rt, headers, Right::Read).await?;
    if rt.store().is_none() {
        return Err(HttpProblem::not_found(format!(
            "stream {ns}/{stream} has no store (broker-only): it keeps no events to read"
        )));
    }
    let id = rt.stream_id().ok_or_else(|| {
        unavailable(
            &rt.health
                .error()
                .unwrap_or_else(|| "the event store is not provisioned yet".into()),
        )
    })?;
    Ok((rt, id))
}

fn store_problem(e: crate::data::store::StoreError) -> HttpProblem {
    if e.is_transient() {
        unavailable(&e.to_string())
    } else {
        HttpProblem::internal(e.to_string())
    }
}

/// Decrypts the personal-data fields of events the caller may read (`spec.pii`).
pub(crate) async fn reveal(
    rt: &StreamRuntime,
    stream_id: i64,
    events: &mut [StoredEvent],
) -> Result<(), HttpProblem> {
    if let Some(pii) = &rt.pii {
        pii.reveal(stream_id, events.iter_mut().map(|e| &mut e.event))
            .await
            .map_err(|e| e.problem())?;
    }
    Ok(())
}

/// The stream's read cache, if it has one. Streams with personal-data fields are never
/// cached: a cache would hold plaintext, and a forgotten subject must stop reading back at
/// once.
pub(crate) fn read_cache(
    st: &HttpState,
    rt: &StreamRuntime,
) -> Option<Arc<crate::data::cache::PolicyCache>> {
    if rt.pii.is_some() {
        return None;
    }
    st.engine.caches.route(&rt.plan.key)
}

fn batch_body(events: &[StoredEvent]) -> Bytes {
    let ces: Vec<_> = events.iter().map(StoredEvent::to_cloud_event).collect();
    Bytes::from(to_batch_json(&ces))
}

fn batch_response(body: Bytes) -> Response {
    let mut resp = body.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/cloudevents-batch+json"),
    );
    resp
}

#[derive(Deserialize)]
struct RangeQuery {
    from: Option<String>,
    limit: Option<String>,
    consistency: Option<String>,
    follow: Option<String>,
}

#[derive(Deserialize)]
struct OneQuery {
    consistency: Option<String>,
}

/// The store a read goes to, and whether it is the read replica: the replica
/// (`readUrlSecretRef`, eventually consistent) unless `consistency=strong` asks for the
/// primary or the stream has no replica.
fn read_store(
    st: &HttpState,
    rt: &StreamRuntime,
    consistency: Option<&str>,
) -> Result<(crate::data::store::Store, bool), HttpProblem> {
    let strong = match consistency {
        None | Some("eventual") => false,
        Some("strong") => true,
        Some(other) => {
            return Err(HttpProblem::bad_request(format!(
                "query parameter consistency: expected strong or eventual, got {other:?}"
            )));
        }
    };
    let primary = rt
        .store()
        .cloned()
        .ok_or_else(|| HttpProblem::internal("no store"))?;
    let replica = match (&rt.plan.store, strong) {
        (Some(plan), false) => st
            .engine
            .pools()
            .read_store_for(plan)
            .map_err(store_problem)?,
        _ => None,
    };
    Ok(match replica {
        Some(r) => (r, true),
        None => (primary, false),
    })
}

fn parse_param(
    name: &str,
    v: Option<&str>,
    default: i64,
    min: i64,
    max: i64,
) -> Result<i64, HttpProblem> {
    match v {
        None => Ok(default),
        Some(s) => match s.parse::<i64>() {
            Ok(n) if n >= min && n <= max => Ok(n),
            _ => Err(HttpProblem::bad_request(format!(
                "query parameter {name}: expected an integer from {min} to {max}, got {s:?}"
            ))),
        },
    }
}

async fn read_range(
    State(st): State<HttpState>,
    Path((ns, stream)): Path<(String, String)>,
    Query(q): Query<RangeQuery>,
    headers: HeaderMap,
    close: Option<Extension<CloseConnection>>,
) -> Result<Response, HttpProblem> {
    let from = parse_param("from", q.from.as_deref(), 1, 1, i64::MAX)?;
    if follow::wants_follow(q.follow.as_deref())? {
        no_follow_params(&[("limit", &q.limit)])?;
        let resume = follow::last_event_id(&headers)?;
        let (rt, id) = readable(&st, &ns, &stream, &headers).await?;
        let target = follow::Target::Stream { from };
        return follow::follow(&st, rt, id, target, resume, close.map(|c| c.0)).await;
    }
    let limit = parse_param("limit", q.limit.as_deref(), DEFAULT_PAGE, 1, MAX_PAGE)?;
    let (rt, id) = readable(&st, &ns, &stream, &headers).await?;
    let (store, _) = read_store(&st, &rt, q.consistency.as_deref())?;
    let store = &store;
    // Full pages and stored events never change, so a replica's answer caches as well.
    let cache = read_cache(&st, &rt);
    let key = CacheKey::Range {
        stream: rt.plan.key.clone(),
        stream_id: id,
        from,
        limit,
    };
    let page = read_through(cache.as_deref(), key, || async {
        let mut events = store
            .read_range(id, from, limit)
            .await
            .map_err(store_problem)?;
        reveal(&rt, id, &mut events).await?;
        // Only a full page is final: a short one grows with the next append.
        let full = events.len() as i64 == limit;
        Ok::<_, HttpProblem>((
            Cached {
                body: batch_body(&events),
                events: None,
            },
            full,
        ))
    })
    .await?;
    Ok(batch_response(page.body.clone()))
}

async fn read_one(
    State(st): State<HttpState>,
    Path((ns, stream, position)): Path<(String, String, String)>,
    Query(q): Query<OneQuery>,
    headers: HeaderMap,
) -> Result<Response, HttpProblem> {
    let position = parse_param("position", Some(&position), 1, 1, i64::MAX)?;
    let (rt, id) = readable(&st, &ns, &stream, &headers).await?;
    let (store, _) = read_store(&st, &rt, q.consistency.as_deref())?;
    let store = &store;
    let cache = read_cache(&st, &rt);
    let key = CacheKey::One {
        stream: rt.plan.key.clone(),
        stream_id: id,
        position,
    };
    // A stored event never changes; a missing one is an error, never cached.
    let one = read_through(cache.as_deref(), key, || async {
        let mut ev = store
            .read_one(id, position)
            .await
            .map_err(store_problem)?
            .ok_or_else(|| {
                HttpProblem::not_found(format!(
                    "stream {ns}/{stream} has no event at position {position}"
                ))
            })?;
        reveal(&rt, id, std::slice::from_mut(&mut ev)).await?;
        let body = Bytes::from(to_structured_json(&ev.to_cloud_event()));
        Ok::<_, HttpProblem>((Cached { body, events: None }, true))
    })
    .await?;
    let mut resp = one.body.clone().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/cloudevents+json"),
    );
    Ok(resp)
}

/// One page of a subject's events; see [`subject`].
async fn read_subject(
    State(st): State<HttpState>,
    Path((ns, stream, subject)): Path<(String, String, String)>,
    Query(q): Query<subject::SubjectQuery>,
    headers: HeaderMap,
    close: Option<Extension<CloseConnection>>,
) -> Result<Response, HttpProblem> {
    no_nul("subject", &subject)?;
    if follow::wants_follow(q.follow.as_deref())? {
        let from = parse_param("from", q.from.as_deref(), 1, 1, i64::MAX)?;
        no_follow_params(&[
            ("limit", &q.limit),
            ("version", &q.version),
            ("asOf", &q.as_of),
        ])?;
        let resume = follow::last_event_id(&headers)?;
        let (rt, id) = readable(&st, &ns, &stream, &headers).await?;
        let target = follow::Target::Subject { subject, from };
        return follow::follow(&st, rt, id, target, resume, close.map(|c| c.0)).await;
    }
    subject::read_subject_page(&st, &ns, &stream, &subject, &q, &headers).await
}

/// A follow has no page and no end: it refuses the parameters that bound one.
fn no_follow_params(params: &[(&str, &Option<String>)]) -> Result<(), HttpProblem> {
    match params.iter().find(|(_, v)| v.is_some()) {
        Some((name, _)) => Err(HttpProblem::bad_request(format!(
            "query parameter {name} does not apply to follow=true (a follow has no page and \
             no end)"
        ))),
        None => Ok(()),
    }
}

/// Refuses a path parameter holding U+0000 (`%00`): ingest refuses it in attributes, so no
/// stored event has one, and PostgreSQL refuses it in a query (which was answered 500).
fn no_nul(name: &str, value: &str) -> Result<(), HttpProblem> {
    if value.contains('\0') {
        return Err(HttpProblem::bad_request(format!(
            "{name} must not contain the NUL character (U+0000)"
        )));
    }
    Ok(())
}

#[derive(Deserialize)]
struct TraceQuery {
    limit: Option<String>,
}

/// `GET /v1/namespaces/{ns}/correlations/{id}/events[?limit=N]`.
async fn trace_handler(
    State(st): State<HttpState>,
    Path((ns, id)): Path<(String, String)>,
    Query(q): Query<TraceQuery>,
    headers: HeaderMap,
) -> Result<Response, HttpProblem> {
    no_nul("correlation id", &id)?;
    let limit = match q.limit.as_deref() {
        None => MAX_TRACE,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=MAX_TRACE).contains(&n) => n,
            _ => {
                return Err(HttpProblem::bad_request(format!(
                    "query parameter limit: expected an integer from 1 to {MAX_TRACE}, got {s:?}"
                )));
            }
        },
    };
    // The trace holds only the streams the caller may read: those that are open, and those
    // the caller's credentials open. A stream it may not read is left out without a word
    // (the answer must not tell what the caller cannot see).
    let stored: Vec<Arc<StreamRuntime>> = st
        .engine
        .streams()
        .into_iter()
        .filter(|rt| rt.plan.key.namespace == ns && rt.store().is_some())
        .collect();
    let mut readable_streams = std::collections::BTreeSet::new();
    for rt in &stored {
        match authorize(&st, rt, &headers, Right::Read).await {
            Ok(_) => {
                readable_streams.insert(rt.plan.key.name.clone());
            }
            // A review the API server could not make is not a "no": say so.
            Err(p) if p.status == 503 => return Err(p),
            Err(_) => {}
        }
    }
    let every = readable_streams.len() == stored.len();
    // Only the default (whole) trace over every stream is cached: one entry per id, one key
    // to invalidate; a partial view is read each time.
    let cache = if q.limit.is_none() && every && stored.iter().all(|rt| rt.pii.is_none()) {
        let streams: Vec<crate::topology::Key> =
            stored.iter().map(|rt| rt.plan.key.clone()).collect();
        st.engine.caches.trace_cache(&streams)
    } else {
        None
    };
    let only = (!every).then_some(&readable_streams);
    let key = CacheKey::Trace {
        namespace: ns.clone(),
        correlation_id: id.clone(),
    };
    let answer = read_through(cache.as_deref(), key, || async {
        let trace = crate::data::trace::correlation(&st.engine, &ns, &id, limit, only)
            .await
            .map_err(|e| e.problem())?;
        let body = serde_json::to_vec(&trace).map_err(|e| HttpProblem::internal(e.to_string()))?;
        Ok::<_, HttpProblem>((
            Cached {
                body: body.into(),
                events: None,
            },
            true,
        ))
    })
    .await?;
    Ok((
        [(http::header::CONTENT_TYPE, "application/json")],
        answer.body.clone(),
    )
        .into_response())
}
