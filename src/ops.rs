//! Operational endpoints: health, readiness, metrics and the API reference.
//!
//! `/docs` serves a vendored Swagger UI (see `assets/docs/README.md`) built
//! into the binary, so the page works with no internet access.

use std::sync::OnceLock;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::app::AppState;
use crate::error::{ApiError, ApiResult};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_healthz))
        .routes(routes!(get_readyz))
        .routes(routes!(get_metrics))
        .routes(routes!(get_openapi))
        .routes(routes!(docs_page))
}

/// The reference page's other addresses and assets, which the API
/// description leaves out.
pub fn docs_router() -> Router<AppState> {
    Router::new()
        .route("/docs/", axum::routing::get(docs_page))
        .route("/docs/swagger-ui.css", axum::routing::get(docs_css))
        .route("/docs/swagger-ui-bundle.js", axum::routing::get(docs_js))
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok`.
    status: &'static str,
    /// `memory` or `redis`.
    engine: &'static str,
    version: &'static str,
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations", security(()),
    responses((status = 200, body = Health)))]
async fn get_healthz(State(state): State<AppState>) -> axum::Json<Health> {
    axum::Json(Health {
        status: "ok",
        engine: state.engine.name(),
        version: env!("CARGO_PKG_VERSION"),
    })
}

/// The storage engine answers; 503 when it does not.
#[utoipa::path(get, path = "/readyz", tag = "operations", security(()),
    responses((status = 200, body = Health), (status = 503, body = crate::error::Problem)))]
async fn get_readyz(State(state): State<AppState>) -> ApiResult<axum::Json<Health>> {
    if state.shutdown.is_cancelled() {
        return Err(ApiError::Unavailable("shutting down".into()));
    }
    state.engine.ping().await?;
    Ok(axum::Json(Health {
        status: "ok",
        engine: state.engine.name(),
        version: env!("CARGO_PKG_VERSION"),
    }))
}

/// The process-wide Prometheus recorder (installed once, shared by every
/// app in the process, which matters only in tests).
pub fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("duration_seconds".into()),
                &[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0,
                ],
            )
            .expect("bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (embedding); then this
        // handle simply renders nothing of ours.
        let _ = metrics::set_global_recorder(recorder);
        // Failure counters are on the first scrape at 0, so that a rate or
        // an alert over them has a series before the first failure.
        metrics::counter!("attune_engine_errors_total", "op" => "request").absolute(0);
        metrics::counter!("attune_panics_total").absolute(0);
        metrics::counter!("attune_redis_reconnects_total").absolute(0);
        metrics::counter!("attune_events_unreadable_total").absolute(0);
        for kind in ["agent", "approval", "run"] {
            metrics::counter!("attune_records_unreadable_total", "kind" => kind).absolute(0);
        }
        handle
    })
}

/// Prometheus metrics: requests and latency by route, agents by state,
/// pending approvals, live event subscribers, engine errors.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, content_type = "text/plain", body = String),
              (status = 401, body = crate::error::Problem),
              (status = 403, description = "An agent key", body = crate::error::Problem)))]
async fn get_metrics(
    _caller: crate::auth::Caller<crate::auth::Viewer>,
    State(state): State<AppState>,
) -> Response {
    // Gauges read from storage at scrape time, both at once (a hung Redis
    // costs one bound, not two); a failure is counted, not fatal.
    let (agents, pending) = tokio::join!(
        crate::agents::state_counts(&state),
        crate::approvals::pending_count(&state.engine)
    );
    if let Ok(counts) = &agents {
        for &(agent_state, n) in counts {
            metrics::gauge!("attune_agents", "state" => agent_state).set(n as f64);
        }
    }
    if let Ok(n) = pending {
        metrics::gauge!("attune_approvals_pending").set(n as f64);
    }
    // One per scrape that could not read them all.
    if agents.is_err() || pending.is_err() {
        metrics::counter!("attune_engine_errors_total", "op" => "metrics").increment(1);
    }
    metrics::gauge!("attune_event_subscribers").set(state.hub.subscriber_count() as f64);
    let body = metrics_handle().render();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        body,
    )
        .into_response()
}

/// Drains recorded histogram samples into their buckets every few seconds,
/// so that memory stays flat even when nobody scrapes `/metrics`.
pub fn spawn_metrics_upkeep(
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => metrics_handle().run_upkeep(),
            }
        }
    })
}

const CACHE: HeaderValue = HeaderValue::from_static("public, max-age=3600");

/// This OpenAPI document.
///
/// The same as `openapi/openapi.json` in the repository.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document of this API",
        content_type = "application/json")))]
async fn get_openapi() -> ApiResult<Response> {
    // Written once: the document describes the build, not the deployment.
    static DOCUMENT: OnceLock<Result<String, String>> = OnceLock::new();
    let json = DOCUMENT.get_or_init(|| crate::app::openapi().to_json().map_err(|e| e.to_string()));
    let json = json
        .as_ref()
        .map_err(|e| ApiError::Internal(format!("the OpenAPI document: {e}")))?;
    let content_type = HeaderValue::from_static("application/json");
    Ok(([(header::CONTENT_TYPE, content_type)], json.as_str()).into_response())
}

/// The API reference page.
///
/// This document as a page that works offline (no CDN); also at `/docs/`.
#[utoipa::path(get, path = "/docs", tag = "operations", security(()),
    responses((status = 200, description = "An HTML page", content_type = "text/html")))]
async fn docs_page() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        include_str!("../assets/docs/index.html"),
    )
        .into_response()
}

async fn docs_css() -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("text/css")),
            (header::CACHE_CONTROL, CACHE),
        ],
        include_str!("../assets/docs/swagger-ui.css"),
    )
        .into_response()
}

async fn docs_js() -> Response {
    (
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/javascript"),
            ),
            (header::CACHE_CONTROL, CACHE),
        ],
        include_str!("../assets/docs/swagger-ui-bundle.js"),
    )
        .into_response()
}
