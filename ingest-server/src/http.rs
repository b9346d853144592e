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
        .route("/healthz", get(healthz))
        .with_state(metrics)
        .nest("/api", api.router())
        .merge(crate::dashboard::router())
}

/// 200 `ok`, or 503 while inserts are stalled (the process is alive; the
/// stage behind it is not making progress).
async fn healthz(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    if metrics.insert_stalled.get() == 1 {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "stalled: no insert completed for insert_timeout_secs (ClickHouse slow or down)\n",
        )
    } else {
        (axum::http::StatusCode::OK, "ok\n")
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn healthz_is_503_while_inserts_are_stalled() {
        let metrics = Arc::new(Metrics::new());
        let status = |m: &Arc<Metrics>| {
            let m = m.clone();
            async move { healthz(State(m)).await.into_response().status() }
        };
        assert_eq!(status(&metrics).await, axum::http::StatusCode::OK);
        metrics.insert_stalled.set(1);
        assert_eq!(status(&metrics).await, axum::http::StatusCode::SERVICE_UNAVAILABLE);
    }
}
