//! The ingest/read HTTP API (default port 8080): publish, and read by position, range and
//! subject. Every error is an RFC 7807 problem naming what is wrong.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Extension};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::data::access::{self, Right};
use crate::data::engine::{Engine, StreamRuntime};
use crate::data::event::{StoredEvent, to_batch_json};
use crate::data::plane::Plane;
use crate::data::problem::HttpProblem;
use crate::openapi::BearerScheme;

mod follow;
mod publish;
mod read;
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
        .routes(routes!(read::read_range, publish::publish))
        .routes(routes!(read::read_one))
        .routes(routes!(read::read_subject))
        .routes(routes!(read::trace_handler))
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
