//! The agent's small HTTP listener: `/metrics` (Prometheus text) and
//! `/healthz` (JSON: broker connection and outbox backlog).

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::shared::Shared;

/// The router, for tests and for embedding.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new().route("/metrics", get(metrics)).route("/healthz", get(healthz)).with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], shared.metrics.render())
}

/// Always 200 while the process serves: a broker or database outage is
/// the agent's normal operating condition (it buffers), not ill health.
async fn healthz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let (rows, bytes) = shared.outbox_size();
    Json(serde_json::json!({
        "status": "ok",
        "mqtt_connected": shared.connected(),
        "outbox_rows": rows,
        "outbox_bytes": bytes,
        "ingest_present": shared.metrics.ingest_present.get() == 1,
        "echo_held_batches": shared.metrics.echo_held_batches.get(),
        "echo_ahead_readings": shared.metrics.echo_ahead_readings.get(),
    }))
}

/// Serves until `cancel`.
pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>, cancel: CancellationToken) {
    let result = axum::serve(listener, router(shared)).with_graceful_shutdown(cancel.cancelled_owned()).await;
    if let Err(error) = result {
        tracing::error!(%error, "HTTP listener failed");
    }
}
