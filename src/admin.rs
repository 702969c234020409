//! The admin port (default 9090): health, readiness, metrics and status.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{StatusCode, header};

use crate::data::engine::Engine;
use crate::status::StatusBoard;

#[derive(Clone)]
pub struct AdminState {
    pub engine: Arc<Engine>,
    pub board: Arc<StatusBoard>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .with_state(state)
}

/// Ready once the topology is loaded and applied. A stream whose broker or store is down
/// answers 503 on its own paths instead of taking the whole process out of the Service.
async fn readyz(State(st): State<AdminState>) -> Response {
    if st.board.loaded() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "topology not loaded yet").into_response()
    }
}

async fn metrics(State(st): State<AdminState>) -> Response {
    sample_pools(&st.engine);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.engine.metrics.render(),
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

async fn status(State(st): State<AdminState>) -> Response {
    let resources = st.board.resources(&st.engine).await;
    axum::Json(serde_json::json!({
        "resources": resources,
        "problems": st.board.manifest_problems(),
    }))
    .into_response()
}
