//! The dead-letter operations of the admin API (`weir dlq`): list, show, redrive, purge.
//! Redrive and purge are audited.

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use http::HeaderMap;

use super::AdminState;
use super::auth::Need;
use crate::audit::{self, Action};
use crate::data::problem::{HttpProblem, ProblemKind};
use crate::data::subscriptions::DeadLetter;
use crate::openapi::AdminAuthFailures;

#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct DeadLetterList {
    dead_letters: Vec<DeadLetter>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
struct Redriven {
    redriven: u64,
    /// Dead letters left in the queue.
    remaining: u64,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
struct Purged {
    purged: u64,
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ListQuery {
    /// At most this many (default 100, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
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

#[utoipa::path(
    get,
    path = "/v1/namespaces/{ns}/subscriptions/{name}/deadletters",
    tag = "deadletters",
    operation_id = "listDeadLetters",
    params(
        ("ns" = String, Path, description = "The Subscription's namespace"),
        ("name" = String, Path, description = "The Subscription's name"),
        ListQuery,
    ),
    responses(
        (status = 200, description = "The dead letters, oldest first; they stay in the queue", body = DeadLetterList),
        AdminAuthFailures,
        (status = 404, description = "The subscription does not run in this process", body = HttpProblem, content_type = "application/problem+json"),
        (status = 503, description = "RabbitMQ cannot be reached, or the API server could not review the token", body = HttpProblem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn dlq_list(
    State(st): State<AdminState>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<ListQuery>,
) -> Response {
    authorize!(st, headers, Need::ReadDeadLetters, ns, name);
    let key = crate::topology::Key::new(ns, name);
    let limit = q.limit.unwrap_or(100);
    match st.plane.subscriptions.dead_letters(&key, limit).await {
        Ok(list) => axum::Json(DeadLetterList { dead_letters: list }).into_response(),
        Err(e) => dlq_error(e),
    }
}

#[utoipa::path(
    get,
    path = "/v1/namespaces/{ns}/subscriptions/{name}/deadletters/{id}",
    tag = "deadletters",
    operation_id = "showDeadLetter",
    params(
        ("ns" = String, Path, description = "The Subscription's namespace"),
        ("name" = String, Path, description = "The Subscription's name"),
        ("id" = String, Path, description = "The dead letter's event id"),
    ),
    responses(
        (status = 200, description = "The dead letter (searched among the oldest 1000)", body = DeadLetter),
        AdminAuthFailures,
        (status = 404, description = "The subscription does not run in this process, or no such dead letter", body = HttpProblem, content_type = "application/problem+json"),
        (status = 503, description = "RabbitMQ cannot be reached, or the API server could not review the token", body = HttpProblem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn dlq_show(
    State(st): State<AdminState>,
    headers: HeaderMap,
    Path((ns, name, id)): Path<(String, String, String)>,
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

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct RedriveQuery {
    /// Redrive at most this many (the CLI works in chunks to show progress).
    limit: Option<u64>,
}

#[utoipa::path(
    post,
    path = "/v1/namespaces/{ns}/subscriptions/{name}/deadletters/redrive",
    tag = "deadletters",
    operation_id = "redriveDeadLetters",
    params(
        ("ns" = String, Path, description = "The Subscription's namespace"),
        ("name" = String, Path, description = "The Subscription's name"),
        RedriveQuery,
    ),
    responses(
        (status = 200, description = "The dead letters present at the start (at most `limit`) were published back to the subscription's queue and removed from the dead-letter queue", body = Redriven),
        AdminAuthFailures,
        (status = 404, description = "The subscription does not run in this process", body = HttpProblem, content_type = "application/problem+json"),
        (status = 503, description = "RabbitMQ cannot be reached, or the API server could not review the token", body = HttpProblem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn dlq_redrive(
    State(st): State<AdminState>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<RedriveQuery>,
) -> Response {
    let caller = authorize!(st, headers, Need::RedriveDeadLetters, ns, name);
    let key = crate::topology::Key::new(ns, name);
    let target = key.to_string();
    match st.plane.subscriptions.redrive(&key, q.limit, &|_| {}).await {
        Ok((n, remaining)) => {
            audit::record(caller.who(), Action::DeadLettersRedrive, &target, Ok(n));
            axum::Json(Redriven {
                redriven: n,
                remaining,
            })
            .into_response()
        }
        Err(e) => {
            let msg = e.to_string();
            audit::record(caller.who(), Action::DeadLettersRedrive, &target, Err(&msg));
            dlq_error(e)
        }
    }
}

#[utoipa::path(
    delete,
    path = "/v1/namespaces/{ns}/subscriptions/{name}/deadletters",
    tag = "deadletters",
    operation_id = "purgeDeadLetters",
    params(
        ("ns" = String, Path, description = "The Subscription's namespace"),
        ("name" = String, Path, description = "The Subscription's name"),
    ),
    responses(
        (status = 200, description = "Every dead letter was removed", body = Purged),
        AdminAuthFailures,
        (status = 404, description = "The subscription does not run in this process", body = HttpProblem, content_type = "application/problem+json"),
        (status = 503, description = "RabbitMQ cannot be reached, or the API server could not review the token", body = HttpProblem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn dlq_purge(
    State(st): State<AdminState>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    let caller = authorize!(st, headers, Need::PurgeDeadLetters, ns, name);
    let key = crate::topology::Key::new(ns, name);
    let target = key.to_string();
    match st.plane.subscriptions.purge(&key).await {
        Ok(n) => {
            audit::record(caller.who(), Action::DeadLettersPurge, &target, Ok(n));
            axum::Json(Purged { purged: n }).into_response()
        }
        Err(e) => {
            let msg = e.to_string();
            audit::record(caller.who(), Action::DeadLettersPurge, &target, Err(&msg));
            dlq_error(e)
        }
    }
}
