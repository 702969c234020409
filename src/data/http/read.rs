//! The read side of the API: one event, a page of a stream, a subject's events, and a
//! correlation id's trace. Every bad parameter is a 400 naming it.

use std::sync::Arc;

use axum::extract::{Extension, Path, Query, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};
use serde::Deserialize;

use super::{
    DEFAULT_PAGE, HttpState, MAX_PAGE, StreamPath, authorize, batch_body, batch_response, follow,
    read_cache, readable, reveal, store_problem, subject,
};
use crate::data::access::Right;
use crate::data::cache::{CacheKey, Cached, read_through};
use crate::data::engine::StreamRuntime;
use crate::data::event::to_structured_json;
use crate::data::problem::HttpProblem;
use crate::data::trace::{MAX_TRACE, Trace};
use crate::openapi::{CloudEventJson, Text};
use crate::server::CloseConnection;

/// The query of a range read. Numbers are parsed by the handler, which names a bad one.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct RangeQuery {
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
pub(super) struct OneQuery {
    #[param(value_type = Option<Consistency>)]
    consistency: Option<String>,
}

/// The store a read goes to, and whether it is the read replica: the replica
/// (`readUrlSecretRef`, eventually consistent) unless `consistency=strong` asks for the
/// primary or the stream has no replica.
pub(super) fn read_store(
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

pub(super) fn parse_param(
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
pub(super) async fn read_range(
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
pub(super) async fn read_one(
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
pub(super) async fn read_subject(
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
pub(super) fn no_follow_params(params: &[(&str, &Option<String>)]) -> Result<(), HttpProblem> {
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
pub(super) fn no_nul(name: &str, value: &str) -> Result<(), HttpProblem> {
    if value.contains('\0') {
        return Err(HttpProblem::bad_request(format!(
            "{name} must not contain the NUL character (U+0000)"
        )));
    }
    Ok(())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct TraceQuery {
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
pub(super) async fn trace_handler(
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
