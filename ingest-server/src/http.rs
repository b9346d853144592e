//! The HTTP listener: the dashboard at `/` ([`crate::dashboard`]), the JSON
//! API under `/api/` ([`crate::api`]), `/metrics` (Prometheus text) and
//! `/healthz`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::api::Api;
use crate::metrics::Metrics;

/// The router, for tests and for embedding.
pub fn router(metrics: Arc<Metrics>, api: Api) -> Router {
    Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(metrics)
        .nest("/api", api.router())
        .merge(crate::dashboard::router())
}

async fn render(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], metrics.render())
}

/// Serves until `stop`.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, api: Api, stop: CancellationToken) {
    let result = axum::serve(listener, router(metrics, api)).with_graceful_shutdown(stop.cancelled_owned()).await;
    if let Err(error) = result {
        tracing::error!(%error, "HTTP listener failed");
    }
}
