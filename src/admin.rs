//! The admin port (default 9090): health, readiness, metrics, status, and the dead-letter
//! operations of the CLI (`weir dlq`, `weir archive`), described in `docs/http-api.md`.
//! Who may use which endpoint: [`auth`] and `docs/security-admin.md`; what changed data is
//! recorded by [`crate::audit`].

pub mod auth;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode, header};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::audit::{self, Action};
use auth::{AdminAuth, Need};

use crate::data::archive::{RunReport, StreamArchive, VerifyReport};
use crate::data::engine::Engine;
use crate::data::plane::Plane;
use crate::data::plane::ResourceStatus;
use crate::data::problem::{HttpProblem, ProblemKind};
use crate::openapi::AdminAuthFailures;
use crate::openapi::{BearerScheme, Text};

#[derive(Clone)]
pub struct AdminState {
    pub plane: Arc<Plane>,
    /// Who may use the protected endpoints.
    pub auth: AdminAuth,
}

/// Returns the caller of a protected request, or its 401/403/503 answer.
macro_rules! authorize {
    ($st:expr, $headers:expr, $need:expr, $ns:expr, $name:expr) => {
        match $st.auth.authorize(&$headers, $need, &$ns, &$name).await {
            Ok(caller) => caller,
            Err(denied) => return denied.into_response(),
        }
    };
}

// After `authorize!`, which they use.
mod deadletters;
mod pii;

/// The admin API's general description; the operations come from the handlers.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Weir admin API",
        description = "Health, readiness, metrics, status, dead letters, archives and \
                       personal-data keys. `/healthz`, `/readyz`, `/metrics` and \
                       `/openapi.json` are open; the rest need a bearer token (see \
                       docs/security-admin.md). Every error is an RFC 7807 problem \
                       (`application/problem+json`). See docs/http-api.md.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    modifiers(&BearerScheme),
    tags(
        (name = "health", description = "Probes and metrics (open)"),
        (name = "status", description = "Every resource and its conditions"),
        (name = "deadletters", description = "Dead letters of a subscription (`weir dlq`)"),
        (name = "archive", description = "Archive operations (`weir archive`)"),
        (name = "keys", description = "Personal-data keys (`weir forget`, `weir keys`)"),
        (name = "meta", description = "This document"),
    ),
)]
struct AdminApi;

/// Every route of the admin API with its operation, and the document they make.
pub(crate) fn routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::with_openapi(<AdminApi as utoipa::OpenApi>::openapi())
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(status))
        .routes(routes!(deadletters::dlq_list, deadletters::dlq_purge))
        .routes(routes!(deadletters::dlq_redrive))
        .routes(routes!(deadletters::dlq_show))
        .routes(routes!(archive_list))
        .routes(routes!(archive_status))
        .routes(routes!(archive_run))
        .routes(routes!(archive_verify))
        .routes(routes!(pii::forget))
        .routes(routes!(pii::rotate))
        .routes(routes!(crate::openapi::openapi_json))
}

pub fn router(state: AdminState) -> Router {
    let (router, doc) = routes().split_for_parts();
    router
        .layer(Extension(crate::openapi::Document::new(&doc)))
        .with_state(state)
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    operation_id = "healthz",
    responses((status = 200, description = "The process runs", body = Text, content_type = "text/plain")),
)]
async fn healthz() -> &'static str {
    "ok"
}

/// The resource counts every `/v1/status` answer holds.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct Summary {
    resources: usize,
    ready: usize,
    not_ready: usize,
}

/// `/v1/status`: the summary, and the details for a caller who may see them.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct StatusAnswer {
    summary: Summary,
    /// `false`: a caller without a token got the counts only.
    details: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    resources: Option<Vec<ResourceStatus>>,
    /// Problems of the manifest folder (standalone; empty for operator users).
    #[serde(skip_serializing_if = "Option::is_none")]
    problems: Option<Vec<String>>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
struct ArchiveList {
    streams: Vec<ArchiveListEntry>,
}

/// One stream of `GET /v1/archive`: its totals, or why they could not be read.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(untagged)]
enum ArchiveListEntry {
    Status(StreamArchive),
    Failed { stream: String, error: String },
}

/// Lines of reasons a not-ready answer lists (then a count): enough to name the trouble,
/// short enough for a probe's log.
const READYZ_REASONS: usize = 20;

/// Ready once the topology is loaded and applied and every stream can take a publish: its
/// store is set up and its database answers (broker-only streams: their broker is
/// connected). Not ready says why in the body, one line per stream. A store-backed stream
/// whose broker is down still takes publishes (they are stored and relayed later), so it
/// keeps the worker ready. Answered from memory, never waiting for a backend.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    operation_id = "readyz",
    responses(
        (status = 200, description = "The manifests are loaded and applied and every stream can take a publish", body = Text, content_type = "text/plain"),
        (status = 503, description = "Not ready: one line per stream that cannot take a publish and why (at most 20, then a count)", body = Text, content_type = "text/plain"),
    ),
)]
async fn readyz(State(st): State<AdminState>) -> Response {
    if !st.plane.loaded() {
        return (StatusCode::SERVICE_UNAVAILABLE, "topology not loaded yet").into_response();
    }
    let unserved = st.plane.engine.unserved(READYZ_REASONS);
    if unserved.is_empty() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{}\n", unserved.join("\n")),
        )
            .into_response()
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    operation_id = "metrics",
    responses(
        (status = 200, description = "Prometheus text format", body = Text, content_type = "text/plain"),
    ),
)]
async fn metrics(State(st): State<AdminState>) -> Response {
    let engine = &st.plane.engine;
    sample_pools(engine);
    engine.caches.sample();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        engine.metrics.render(),
    )
        .into_response()
}

/// Pool gauges are sampled at scrape time: they are cheap reads of the pools' counters.
fn sample_pools(engine: &Engine) {
    let m = &engine.metrics;
    for (label, pool) in engine.pools().snapshot() {
        let size = pool.size() as i64;
        let idle = pool.num_idle() as i64;
        m.db_connections
            .with_label_values(&[label.as_str(), "active"])
            .set(size - idle);
        m.db_connections
            .with_label_values(&[label.as_str(), "idle"])
            .set(idle);
    }
}

/// Every resource with its conditions and fields, and the folder's problems, for a caller who
/// may see them (open mode and the admin token: all; operator: the resources whose object
/// the caller may `get`). Without a token, only the summary (counts), which reveals no
/// names, messages or payloads; a wrong token is 401 as everywhere.
#[utoipa::path(
    get,
    path = "/v1/status",
    tag = "status",
    operation_id = "status",
    responses(
        (status = 200, description = "Without a token where one is needed: the summary only (`details: false`). With one: the resources the caller may `get`, their conditions and fields", body = StatusAnswer),
        (status = 401, description = "A wrong or unknown bearer token", body = HttpProblem, content_type = "application/problem+json",
            headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"weir\"`"))),
        (status = 503, description = "The API server could not review the token", body = HttpProblem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ),
    security((), ("bearer" = [])),
)]
async fn status(State(st): State<AdminState>, headers: HeaderMap) -> Response {
    let resources = st.plane.resources();
    let ready = resources.iter().filter(|r| r.ready).count();
    let summary = Summary {
        resources: resources.len(),
        ready,
        not_ready: resources.len() - ready,
    };
    let caller = match st.auth.authenticate(&headers).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            return axum::Json(StatusAnswer {
                summary,
                details: false,
                resources: None,
                problems: None,
            })
            .into_response();
        }
        Err(denied) => return denied.into_response(),
    };
    let mut shown = Vec::with_capacity(resources.len());
    for r in resources {
        let check = auth::status_check(&r.namespace, r.kind);
        match st.auth.may(&caller, &check).await {
            Ok(true) => shown.push(r),
            Ok(false) => {}
            Err(denied) => return denied.into_response(),
        }
    }
    // Source problems name files of the folder (standalone only): for the admin.
    let problems = match caller {
        auth::Caller::User(_) => Vec::new(),
        _ => st.plane.source_problems(),
    };
    axum::Json(StatusAnswer {
        summary,
        details: true,
        resources: Some(shown),
        problems: Some(problems),
    })
    .into_response()
}

/// The answer to an archive operation that failed: 404 when no ArchivePolicy selects the
/// stream here, 409 while another run holds the stream, 503 for store trouble.
fn archive_error(e: crate::data::archive::ArchiveError) -> Response {
    use crate::data::archive::ArchiveError;
    let problem = match &e {
        ArchiveError::NotArchived(_) => HttpProblem::new(ProblemKind::NotFound, e.to_string()),
        ArchiveError::Busy => HttpProblem::new(ProblemKind::Busy, e.to_string()),
        // With `Retry-After`, as documented: the store may be back in a moment.
        ArchiveError::NotRunning(_) | ArchiveError::Store(_) => {
            HttpProblem::unavailable(e.to_string(), crate::data::http::RETRY_AFTER_SECS)
        }
        _ => HttpProblem::new(ProblemKind::Internal, e.to_string()),
    };
    problem.into_response()
}

/// Every stream archived by this process that the caller may see (`get`
/// `eventstreams/archive` in its namespace), with its totals.
#[utoipa::path(
    get,
    path = "/v1/archive",
    tag = "archive",
    operation_id = "listArchives",
    responses(
        (status = 200, description = "Every stream archived by this process that the caller may `get`", body = ArchiveList),
        AdminAuthFailures,
        (status = 503, description = "The API server could not review the token", body = HttpProblem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ),
    security(("bearer" = [])),
)]
async fn archive_list(State(st): State<AdminState>, headers: HeaderMap) -> Response {
    let caller = match st.auth.require(&headers).await {
        Ok(c) => c,
        Err(denied) => return denied.into_response(),
    };
    let mut out = Vec::new();
    for key in st.plane.archives.streams() {
        match st
            .auth
            .may(&caller, &Need::ReadArchive.check(&key.namespace, &key.name))
            .await
        {
            Ok(true) => {}
            Ok(false) => continue,
            Err(denied) => return denied.into_response(),
        }
        out.push(match st.plane.archives.stream_status(&key).await {
            Ok(s) => ArchiveListEntry::Status(s),
            Err(e) => ArchiveListEntry::Failed {
                stream: key.to_string(),
                error: e.to_string(),
            },
        });
    }
    axum::Json(ArchiveList { streams: out }).into_response()
}

#[utoipa::path(
    get,
    path = "/v1/namespaces/{ns}/streams/{name}/archive",
    tag = "archive",
    operation_id = "archiveStatus",
    params(
        ("ns" = String, Path, description = "The stream's namespace"),
        ("name" = String, Path, description = "The EventStream's name"),
    ),
    responses(
        (status = 200, description = "The stream's archive totals", body = StreamArchive),
        AdminAuthFailures,
        (status = 404, description = "No ArchivePolicy selects the stream in this process", body = HttpProblem, content_type = "application/problem+json"),
        (status = 503, description = "The stream's store is unreachable, or the API server could not review the token", body = HttpProblem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ),
    security(("bearer" = [])),
)]
async fn archive_status(
    State(st): State<AdminState>,
    headers: HeaderMap,
    axum::extract::Path((ns, name)): axum::extract::Path<(String, String)>,
) -> Response {
    authorize!(st, headers, Need::ReadArchive, ns, name);
    let key = crate::topology::Key::new(ns, name);
    match st.plane.archives.stream_status(&key).await {
        Ok(s) => axum::Json(s).into_response(),
        Err(e) => archive_error(e),
    }
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
struct RunQuery {
    /// Archive at most this many segments (the CLI works in steps to show progress).
    max_segments: Option<usize>,
}

#[utoipa::path(
    post,
    path = "/v1/namespaces/{ns}/streams/{name}/archive/run",
    tag = "archive",
    operation_id = "runArchive",
    params(
        ("ns" = String, Path, description = "The stream's namespace"),
        ("name" = String, Path, description = "The EventStream's name"),
        RunQuery,
    ),
    responses(
        (status = 200, description = "What the run archived and deleted", body = RunReport),
        AdminAuthFailures,
        (status = 404, description = "No ArchivePolicy selects the stream in this process", body = HttpProblem, content_type = "application/problem+json"),
        (status = 409, description = "Another run (scheduled, or another replica's) holds the stream", body = HttpProblem, content_type = "application/problem+json"),
        (status = 500, description = "A fault inside Weir", body = HttpProblem, content_type = "application/problem+json"),
        (status = 503, description = "The stream's store is unreachable, or the API server could not review the token", body = HttpProblem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ),
    security(("bearer" = [])),
)]
async fn archive_run(
    State(st): State<AdminState>,
    headers: HeaderMap,
    axum::extract::Path((ns, name)): axum::extract::Path<(String, String)>,
    axum::extract::Query(q): axum::extract::Query<RunQuery>,
) -> Response {
    let caller = authorize!(st, headers, Need::RunArchive, ns, name);
    let key = crate::topology::Key::new(ns, name);
    let target = key.to_string();
    match st.plane.archives.run_now(&key, q.max_segments).await {
        Ok(r) => {
            audit::record(caller.who(), Action::ArchiveRun, &target, Ok(r.events));
            axum::Json(r).into_response()
        }
        Err(e) => {
            let msg = e.to_string();
            audit::record(caller.who(), Action::ArchiveRun, &target, Err(&msg));
            archive_error(e)
        }
    }
}

#[utoipa::path(
    post,
    path = "/v1/namespaces/{ns}/streams/{name}/archive/verify",
    tag = "archive",
    operation_id = "verifyArchive",
    params(
        ("ns" = String, Path, description = "The stream's namespace"),
        ("name" = String, Path, description = "The EventStream's name"),
    ),
    responses(
        (status = 200, description = "Every segment read back and checked; `problems` names each fault by segment and byte offset", body = VerifyReport),
        AdminAuthFailures,
        (status = 404, description = "No ArchivePolicy selects the stream in this process", body = HttpProblem, content_type = "application/problem+json"),
        (status = 409, description = "Another run holds the stream", body = HttpProblem, content_type = "application/problem+json"),
        (status = 500, description = "A fault inside Weir", body = HttpProblem, content_type = "application/problem+json"),
        (status = 503, description = "The stream's store is unreachable, or the API server could not review the token", body = HttpProblem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ),
    security(("bearer" = [])),
)]
async fn archive_verify(
    State(st): State<AdminState>,
    headers: HeaderMap,
    axum::extract::Path((ns, name)): axum::extract::Path<(String, String)>,
) -> Response {
    authorize!(st, headers, Need::RunArchive, ns, name);
    let key = crate::topology::Key::new(ns, name);
    match st.plane.archives.verify(&key).await {
        Ok(r) => axum::Json(r).into_response(),
        Err(e) => archive_error(e),
    }
}
