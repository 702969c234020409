//! The ingest/read HTTP API (default port 8080): publish, and read by position, range and
//! subject. Every error is an RFC 7807 problem naming what is wrong.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::data::access::{self, Right};
use crate::data::cache::{CacheKey, Cached, read_through};
use crate::data::engine::{Engine, StreamRuntime};
use crate::data::event::{StoredEvent, to_batch_json, to_structured_json};
use crate::data::plane::Plane;
use crate::data::problem::HttpProblem;
use crate::data::trace::{MAX_TRACE, Trace};
use crate::openapi::{BearerScheme, CloudEventJson, Text};
use crate::server::CloseConnection;

mod follow;
mod publish;
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

/// The ingest/read API's general description; the operations come from the handlers.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Weir ingest/read API",
        description = "Publish CloudEvents to a stream and read them back (by position, range, \
                       subject or correlation id, or followed live). Every error is an RFC 7807 \
                       problem (`application/problem+json`). See docs/http-api.md.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    modifiers(&BearerScheme),
    tags(
        (name = "publish", description = "Publish events in one of four content modes"),
        (name = "read", description = "Read stored events (streams with a store)"),
        (name = "meta", description = "This document"),
    ),
)]
struct IngestApi;

/// Every route of the ingest/read API with its operation, and the document they make.
pub(crate) fn routes() -> OpenApiRouter<HttpState> {
    OpenApiRouter::with_openapi(<IngestApi as utoipa::OpenApi>::openapi())
        .routes(routes!(read_range, publish::publish))
        .routes(routes!(read_one))
        .routes(routes!(read_subject))
        .routes(routes!(trace_handler))
        .routes(routes!(crate::openapi::openapi_json))
}

pub fn router(state: HttpState) -> Router {
    let (router, doc) = routes().split_for_parts();
    router
        .layer(Extension(crate::openapi::Document::new(&doc)))
        // Each stream enforces its own maxRequestBytes; axum's global 2 MB default must not.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// The path parameters naming a stream.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // Parameters only: the handlers take the path as a tuple.
pub(crate) struct StreamPath {
    /// The stream's namespace.
    ns: String,
    /// The EventStream's name.
    stream: String,
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

fn unavailable(detail: &str) -> HttpProblem {
    HttpProblem::unavailable(detail.to_string(), RETRY_AFTER_SECS)
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

/// The query of a range read. Numbers are parsed by the handler, which names a bad one.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct RangeQuery {
    /// First position (default 1); with `follow=true`, where the follow starts.
    #[param(value_type = Option<i64>, minimum = 1)]
    from: Option<String>,
    /// Events in the page (default 100, at most 1000); refused with `follow=true`.
    #[param(value_type = Option<i64>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
    #[param(value_type = Option<Consistency>)]
    consistency: Option<String>,
    /// `true`: a live follow (Server-Sent Events) instead of a page.
    #[param(value_type = Option<bool>)]
    follow: Option<String>,
}

/// Which copy a read goes to: `eventual` (the default) reads the stream's read replica if it
/// has one, `strong` the primary.
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)] // A schema only: the handler reads the parameter as text.
pub(crate) enum Consistency {
    Eventual,
    Strong,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct OneQuery {
    #[param(value_type = Option<Consistency>)]
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

#[utoipa::path(
    get,
    path = "/v1/namespaces/{ns}/streams/{stream}/events",
    tag = "read",
    operation_id = "readRange",
    params(
        StreamPath,
        RangeQuery,
        ("Last-Event-ID" = Option<i64>, Header, description = "Follow only: resume after this position (wins over `from`)"),
    ),
    responses(
        (status = 200, description = "A page of events in position order; with `follow=true` a Server-Sent Events stream without end: each message's `id` is the event's position and its `data` the event as structured JSON, `: keep-alive` comments between, and `event: error` with a problem as `data` when the worker ends the follow",
            content(
                (Vec<CloudEventJson> = "application/cloudevents-batch+json"),
                (Text = "text/event-stream"),
            )),
        (status = 400, description = "A bad `from`, `limit`, `consistency` or `follow`, `limit` with `follow=true`, or a bad `Last-Event-ID`", body = HttpProblem, content_type = "application/problem+json"),
        (status = 401, description = "The stream has `ingest.auth` and the request has no bearer token, or one it does not know", body = HttpProblem, content_type = "application/problem+json",
            headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"weir\"`"))),
        (status = 403, description = "An authenticated service account that is not a publisher or reader of the stream", body = HttpProblem, content_type = "application/problem+json"),
        (status = 404, description = "No such stream, or a broker-only stream (it keeps no events)", body = HttpProblem, content_type = "application/problem+json"),
        (status = 500, description = "A fault inside Weir, or a damaged archive segment (named with its byte offset)", body = HttpProblem, content_type = "application/problem+json"),
        (status = 503, description = "The store is unreachable or not provisioned yet, a personal-data key id is missing, or (follow) too many follows", body = HttpProblem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ),
    security((), ("bearer" = [])),
)]
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

#[utoipa::path(
    get,
    path = "/v1/namespaces/{ns}/streams/{stream}/events/{position}",
    tag = "read",
    operation_id = "readOne",
    params(
        StreamPath,
        ("position" = i64, Path, minimum = 1, description = "The event's position in the stream"),
        OneQuery,
    ),
    responses(
        (status = 200, description = "The event", body = CloudEventJson, content_type = "application/cloudevents+json"),
        (status = 400, description = "A bad `position` or `consistency`", body = HttpProblem, content_type = "application/problem+json"),
        (status = 401, description = "The stream has `ingest.auth` and the request has no bearer token, or one it does not know", body = HttpProblem, content_type = "application/problem+json",
            headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"weir\"`"))),
        (status = 403, description = "An authenticated service account that is not a publisher or reader of the stream", body = HttpProblem, content_type = "application/problem+json"),
        (status = 404, description = "No such stream, a broker-only stream, or no event at that position (never stored, or removed by `deleteAfter`)", body = HttpProblem, content_type = "application/problem+json"),
        (status = 500, description = "A fault inside Weir, or a damaged archive segment (named with its byte offset)", body = HttpProblem, content_type = "application/problem+json"),
        (status = 503, description = "The store is unreachable or not provisioned yet, a personal-data key id is missing, or (follow) too many follows", body = HttpProblem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ),
    security((), ("bearer" = [])),
)]
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
#[utoipa::path(
    get,
    path = "/v1/namespaces/{ns}/streams/{stream}/subjects/{subject}/events",
    tag = "read",
    operation_id = "readSubject",
    params(
        StreamPath,
        ("subject" = String, Path, description = "The events' `subject`"),
        subject::SubjectQuery,
        ("Last-Event-ID" = Option<i64>, Header, description = "Follow only: resume after this position (one of the subject's events)"),
    ),
    responses(
        (status = 200, description = "One page of the subject's events in version order; with `follow=true` a Server-Sent Events stream without end (see readRange)",
            headers(("Link" = Option<String>, description = "`<…?from=…>; rel=\"next\"` while more events follow; absent on the last page")),
            content(
                (Vec<CloudEventJson> = "application/cloudevents-batch+json"),
                (Text = "text/event-stream"),
            )),
        (status = 400, description = "A bad `from`, `limit`, `version`, `asOf`, `consistency` or `follow`, a page parameter with `follow=true`, a bad `Last-Event-ID`, or a subject holding U+0000", body = HttpProblem, content_type = "application/problem+json"),
        (status = 401, description = "The stream has `ingest.auth` and the request has no bearer token, or one it does not know", body = HttpProblem, content_type = "application/problem+json",
            headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"weir\"`"))),
        (status = 403, description = "An authenticated service account that is not a publisher or reader of the stream", body = HttpProblem, content_type = "application/problem+json"),
        (status = 404, description = "No such stream, or a broker-only stream", body = HttpProblem, content_type = "application/problem+json"),
        (status = 500, description = "A fault inside Weir, or a damaged archive segment (named with its byte offset)", body = HttpProblem, content_type = "application/problem+json"),
        (status = 503, description = "The store is unreachable or not provisioned yet, a personal-data key id is missing, or (follow) too many follows", body = HttpProblem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ),
    security((), ("bearer" = [])),
)]
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

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct TraceQuery {
    /// At most this many events (default and maximum 1000); `truncated` says more exist.
    #[param(value_type = Option<i64>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
}

/// `GET /v1/namespaces/{ns}/correlations/{id}/events[?limit=N]`.
#[utoipa::path(
    get,
    path = "/v1/namespaces/{ns}/correlations/{id}/events",
    tag = "read",
    operation_id = "trace",
    params(
        ("ns" = String, Path, description = "The namespace whose streams are searched"),
        ("id" = String, Path, description = "The `correlationid`"),
        TraceQuery,
    ),
    responses(
        (status = 200, description = "Every stored event of the namespace's streams the caller may read (open ones, and those its bearer token opens; the others are left out without a mark) carrying this correlation id, in commit-time order", body = Trace),
        (status = 400, description = "A bad `limit`, or an id holding U+0000", body = HttpProblem, content_type = "application/problem+json"),
        (status = 500, description = "A fault inside Weir", body = HttpProblem, content_type = "application/problem+json"),
        (status = 503, description = "A store is unreachable, a personal-data key id is missing, or the API server could not review a token", body = HttpProblem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ),
    security((), ("bearer" = [])),
)]
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
