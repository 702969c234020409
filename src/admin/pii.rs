//! The personal-data operations of the admin API (`weir forget`, `weir keys rotate`):
//! `docs/security-encryption.md`. Both are audited.

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use http::HeaderMap;

use super::AdminState;
use super::auth::Need;
use crate::audit::{self, Action};
use crate::data::engine::StreamRuntime;
use crate::data::pii::{Pii, Rotated};
use crate::data::problem::{HttpProblem, ProblemKind};
use crate::openapi::AdminAuthFailures;

/// Subject keys re-wrapped per rotation request by default, and at most: one request stays
/// well under a second (one UPDATE per key), and the CLI shows progress between requests.
const ROTATE_CHUNK: i64 = 500;
const ROTATE_CHUNK_MAX: i64 = 10_000;

/// The stream's runtime, its encryption and store id, or the answer saying why not.
fn pii_of(
    st: &AdminState,
    ns: &str,
    name: &str,
) -> Result<(std::sync::Arc<StreamRuntime>, std::sync::Arc<Pii>, i64), HttpProblem> {
    let rt = st
        .plane
        .engine
        .stream(ns, name)
        .ok_or_else(|| HttpProblem::stream_not_found(ns, name))?;
    let pii = rt.pii.clone().ok_or_else(|| {
        HttpProblem::not_found(format!(
            "stream {ns}/{name} has no personal-data fields (spec.pii.fields)"
        ))
    })?;
    let id = rt
        .stream_id()
        .ok_or_else(|| HttpProblem::unavailable("the event store is not provisioned yet", 1))?;
    Ok((rt, pii, id))
}

/// The answer of a forget.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct Forgotten {
    /// `<namespace>/<stream>`.
    stream: String,
    subject: String,
    /// Whether the subject had a data key.
    forgotten: bool,
    /// Other workers stop decrypting the subject within this many seconds (their key cache).
    other_workers_within_seconds: u64,
}

/// The failures both key operations share, documented once.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // Documentation only: the handlers answer `HttpProblem`s.
enum KeyFailures {
    #[response(
        status = 404,
        description = "No such stream, or a stream without personal-data fields",
        content_type = "application/problem+json"
    )]
    NotFound(HttpProblem),
    #[response(
        status = 500,
        description = "A fault inside Weir",
        content_type = "application/problem+json"
    )]
    Internal(HttpProblem),
    #[response(
        status = 503,
        description = "The store is unreachable or not provisioned yet, a key id is missing from the Secret, or the API server could not review the token",
        content_type = "application/problem+json",
        headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))
    )]
    Unavailable(HttpProblem),
}

/// `DELETE /v1/namespaces/{ns}/streams/{name}/subjects/{subject}/key`: forgets the subject.
#[utoipa::path(
    delete,
    path = "/v1/namespaces/{ns}/streams/{name}/subjects/{subject}/key",
    tag = "keys",
    operation_id = "forgetSubject",
    params(
        ("ns" = String, Path, description = "The stream's namespace"),
        ("name" = String, Path, description = "The EventStream's name"),
        ("subject" = String, Path, description = "The event `subject` to forget"),
    ),
    responses(
        (status = 200, description = "The subject's data key is deleted (`forgotten: false`: there was none)", body = Forgotten),
        AdminAuthFailures,
        KeyFailures,
    ),
    security(("bearer" = [])),
)]
pub(super) async fn forget(
    State(st): State<AdminState>,
    headers: HeaderMap,
    Path((ns, name, subject)): Path<(String, String, String)>,
) -> Response {
    let caller = authorize!(st, headers, Need::ForgetSubject, ns, name);
    let target = format!("{ns}/{name}/subjects/{subject}");
    let (_, pii, id) = match pii_of(&st, &ns, &name) {
        Ok(x) => x,
        Err(p) => return p.into_response(),
    };
    match pii.forget(id, &subject).await {
        Ok(existed) => {
            audit::record(
                caller.who(),
                Action::SubjectForget,
                &target,
                Ok(u64::from(existed)),
            );
            axum::Json(Forgotten {
                stream: format!("{ns}/{name}"),
                subject,
                forgotten: existed,
                other_workers_within_seconds: crate::data::pii::DEK_TTL.as_secs(),
            })
            .into_response()
        }
        Err(e) => {
            let msg = e.to_string();
            audit::record(caller.who(), Action::SubjectForget, &target, Err(&msg));
            e.problem().into_response()
        }
    }
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct RotateQuery {
    /// Re-wrap at most this many keys (default 500, at most 10,000; the CLI works in steps to
    /// show progress).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<i64>,
}

/// `POST /v1/namespaces/{ns}/streams/{name}/keys/rotate[?limit=N]`: re-wraps up to `limit`
/// subject keys with the newest key id; answers what remains.
#[utoipa::path(
    post,
    path = "/v1/namespaces/{ns}/streams/{name}/keys/rotate",
    tag = "keys",
    operation_id = "rotateKeys",
    params(
        ("ns" = String, Path, description = "The stream's namespace"),
        ("name" = String, Path, description = "The EventStream's name"),
        RotateQuery,
    ),
    responses(
        (status = 200, description = "Up to `limit` subject keys re-wrapped with the newest key id", body = Rotated),
        (status = 400, description = "A bad `limit`", body = HttpProblem, content_type = "application/problem+json"),
        AdminAuthFailures,
        KeyFailures,
    ),
    security(("bearer" = [])),
)]
pub(super) async fn rotate(
    State(st): State<AdminState>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<RotateQuery>,
) -> Response {
    let caller = authorize!(st, headers, Need::RotateKeys, ns, name);
    let target = format!("{ns}/{name}");
    let limit = q.limit.unwrap_or(ROTATE_CHUNK);
    if !(1..=ROTATE_CHUNK_MAX).contains(&limit) {
        return HttpProblem::new(
            ProblemKind::BadRequest,
            format!("query parameter limit: expected an integer from 1 to {ROTATE_CHUNK_MAX}"),
        )
        .into_response();
    }
    let (_, pii, id) = match pii_of(&st, &ns, &name) {
        Ok(x) => x,
        Err(p) => return p.into_response(),
    };
    match pii.rotate_chunk(id, limit).await {
        Ok(r) => {
            audit::record(caller.who(), Action::KeysRotate, &target, Ok(r.rewrapped));
            axum::Json(r).into_response()
        }
        Err(e) => {
            let msg = e.to_string();
            audit::record(caller.who(), Action::KeysRotate, &target, Err(&msg));
            e.problem().into_response()
        }
    }
}
