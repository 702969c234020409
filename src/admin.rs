//! The admin port (default 9090): health, readiness, metrics, status, and the dead-letter
//! operations of the CLI (`weir dlq`, `weir archive`), described in `docs/http-api.md`.
//! Who may use which endpoint: [`auth`] and `docs/security-admin.md`; what changed data is
//! recorded by [`crate::audit`].

pub mod auth;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderMap, StatusCode, header};

use crate::audit::{self, Action};
use auth::{AdminAuth, Need};

use crate::data::engine::Engine;
use crate::data::plane::Plane;
use crate::data::problem::{HttpProblem, ProblemKind};

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

// After `authorize!`, which it uses.
mod pii;

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route(
            "/v1/namespaces/{ns}/subscriptions/{name}/deadletters",
            get(dlq_list).delete(dlq_purge),
        )
        .route(
            "/v1/namespaces/{ns}/subscriptions/{name}/deadletters/redrive",
            axum::routing::post(dlq_redrive),
        )
        .route(
            "/v1/namespaces/{ns}/subscriptions/{name}/deadletters/{id}",
            get(dlq_show),
        )
        .route("/v1/archive", get(archive_list))
        .route(
            "/v1/namespaces/{ns}/streams/{name}/archive",
            get(archive_status),
        )
        .route(
            "/v1/namespaces/{ns}/streams/{name}/archive/run",
            axum::routing::post(archive_run),
        )
        .route(
            "/v1/namespaces/{ns}/streams/{name}/archive/verify",
            axum::routing::post(archive_verify),
        )
        .route(
            "/v1/namespaces/{ns}/streams/{name}/subjects/{subject}/key",
            axum::routing::delete(pii::forget),
        )
        .route(
            "/v1/namespaces/{ns}/streams/{name}/keys/rotate",
            axum::routing::post(pii::rotate),
        )
        .with_state(state)
}

/// Lines of reasons a not-ready answer lists (then a count): enough to name the trouble,
/// short enough for a probe's log.
const READYZ_REASONS: usize = 20;

/// Ready once the topology is loaded and applied and every stream can take a publish: its
/// store is set up and its database answers (broker-only streams: their broker is
/// connected). Not ready says why in the body, one line per stream. A store-backed stream
/// whose broker is down still takes publishes (they are stored and relayed later), so it
/// keeps the worker ready. Answered from memory, never waiting for a backend.
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
async fn status(State(st): State<AdminState>, headers: HeaderMap) -> Response {
    let resources = st.plane.resources();
    let ready = resources.iter().filter(|r| r.ready).count();
    let summary = serde_json::json!({
        "resources": resources.len(),
        "ready": ready,
        "notReady": resources.len() - ready,
    });
    let caller = match st.auth.authenticate(&headers).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            return axum::Json(serde_json::json!({ "summary": summary, "details": false }))
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
    axum::Json(serde_json::json!({
        "summary": summary,
        "details": true,
        "resources": shown,
        "problems": problems,
    }))
    .into_response()
}

#[derive(serde::Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

/// The answer to a dead-letter operation that failed: 404 when the subscription does not run
/// here, 503 when the broker cannot be reached.
fn dlq_error(e: crate::data::delivery::DeliveryError) -> Response {
    use crate::data::delivery::DeliveryError;
    let kind = match &e {
        DeliveryError::NotRunning(_) => ProblemKind::NotFound,
        _ => ProblemKind::Unavailable,
    };
    HttpProblem::new(kind, e.to_string()).into_response()
}

async fn dlq_list(
    State(st): State<AdminState>,
    headers: HeaderMap,
    axum::extract::Path((ns, name)): axum::extract::Path<(String, String)>,
    axum::extract::Query(q): axum::extract::Query<ListQuery>,
) -> Response {
    authorize!(st, headers, Need::ReadDeadLetters, ns, name);
    let key = crate::topology::Key::new(ns, name);
    let limit = q.limit.unwrap_or(100);
    match st.plane.subscriptions.dead_letters(&key, limit).await {
        Ok(list) => axum::Json(serde_json::json!({ "deadLetters": list })).into_response(),
        Err(e) => dlq_error(e),
    }
}

async fn dlq_show(
    State(st): State<AdminState>,
    headers: HeaderMap,
    axum::extract::Path((ns, name, id)): axum::extract::Path<(String, String, String)>,
) -> Response {
    authorize!(st, headers, Need::ReadDeadLetters, ns, name);
    let key = crate::topology::Key::new(ns, name);
    let max = crate::data::subscriptions::MAX_LIST;
    match st.plane.subscriptions.dead_letters(&key, max).await {
        Ok(list) => match list.into_iter().find(|d| d.id == id) {
            Some(d) => axum::Json(d).into_response(),
            None => HttpProblem::not_found(format!("no dead letter {id} in {key}")).into_response(),
        },
        Err(e) => dlq_error(e),
    }
}

#[derive(serde::Deserialize)]
struct RedriveQuery {
    /// Redrive at most this many (the CLI works in chunks to show progress).
    limit: Option<u64>,
}

async fn dlq_redrive(
    State(st): State<AdminState>,
    headers: HeaderMap,
    axum::extract::Path((ns, name)): axum::extract::Path<(String, String)>,
    axum::extract::Query(q): axum::extract::Query<RedriveQuery>,
) -> Response {
    let caller = authorize!(st, headers, Need::RedriveDeadLetters, ns, name);
    let key = crate::topology::Key::new(ns, name);
    let target = key.to_string();
    match st.plane.subscriptions.redrive(&key, q.limit, &|_| {}).await {
        Ok((n, remaining)) => {
            audit::record(caller.who(), Action::DeadLettersRedrive, &target, Ok(n));
            axum::Json(serde_json::json!({ "redriven": n, "remaining": remaining })).into_response()
        }
        Err(e) => {
            let msg = e.to_string();
            audit::record(caller.who(), Action::DeadLettersRedrive, &target, Err(&msg));
            dlq_error(e)
        }
    }
}

async fn dlq_purge(
    State(st): State<AdminState>,
    headers: HeaderMap,
    axum::extract::Path((ns, name)): axum::extract::Path<(String, String)>,
) -> Response {
    let caller = authorize!(st, headers, Need::PurgeDeadLetters, ns, name);
    let key = crate::topology::Key::new(ns, name);
    let target = key.to_string();
    match st.plane.subscriptions.purge(&key).await {
        Ok(n) => {
            audit::record(caller.who(), Action::DeadLettersPurge, &target, Ok(n));
            axum::Json(serde_json::json!({ "purged": n })).into_response()
        }
        Err(e) => {
            let msg = e.to_string();
            audit::record(caller.who(), Action::DeadLettersPurge, &target, Err(&msg));
            dlq_error(e)
        }
    }
}

/// The answer to an archive operation that failed: 404 when no ArchivePolicy selects the
/// stream here, 409 while another run holds the stream, 503 for store trouble.
fn archive_error(e: crate::data::archive::ArchiveError) -> Response {
    use crate::data::archive::ArchiveError;
    let kind = match &e {
        ArchiveError::NotArchived(_) => ProblemKind::NotFound,
        ArchiveError::Busy => ProblemKind::Busy,
        ArchiveError::NotRunning(_) | ArchiveError::Store(_) => ProblemKind::Unavailable,
        _ => ProblemKind::Internal,
    };
    HttpProblem::new(kind, e.to_string()).into_response()
}

/// Every stream archived by this process that the caller may see (`get`
/// `eventstreams/archive` in its namespace), with its totals.
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
        match st.plane.archives.stream_status(&key).await {
            Ok(s) => out.push(serde_json::to_value(s).unwrap_or_default()),
            Err(e) => {
                out.push(serde_json::json!({ "stream": key.to_string(), "error": e.to_string() }))
            }
        }
    }
    axum::Json(serde_json::json!({ "streams": out })).into_response()
}

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

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct RunQuery {
    /// Archive at most this many segments (the CLI works in steps to show progress).
    max_segments: Option<usize>,
}

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
