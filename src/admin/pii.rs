//! The personal-data operations of the admin API (`weir forget`, `weir keys rotate`):
//! `docs/security-encryption.md`. Both are audited.

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use http::HeaderMap;

use super::AdminState;
use super::auth::Need;
use crate::audit::{self, Action};
use crate::data::engine::StreamRuntime;
use crate::data::pii::Pii;
use crate::data::problem::{HttpProblem, ProblemKind};

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

/// `DELETE /v1/namespaces/{ns}/streams/{name}/subjects/{subject}/key`: forgets the subject.
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
            axum::Json(serde_json::json!({
                "stream": format!("{ns}/{name}"),
                "subject": subject,
                "forgotten": existed,
                "otherWorkersWithinSeconds": crate::data::pii::DEK_TTL.as_secs(),
            }))
            .into_response()
        }
        Err(e) => {
            let msg = e.to_string();
            audit::record(caller.who(), Action::SubjectForget, &target, Err(&msg));
            e.problem().into_response()
        }
    }
}

#[derive(serde::Deserialize)]
pub(super) struct RotateQuery {
    /// Re-wrap at most this many keys (the CLI works in steps to show progress).
    limit: Option<i64>,
}

/// `POST /v1/namespaces/{ns}/streams/{name}/keys/rotate[?limit=N]`: re-wraps up to `limit`
/// subject keys with the newest key id; answers what remains.
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
