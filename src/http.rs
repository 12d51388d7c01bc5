//! The operator HTTP endpoints: `/health/live`, `/health/ready` and `/metrics`.
//! (The FHIR API joins this router under `/fhir`.)

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::setting::{self, Invalid};
use crate::telemetry::Metrics;

/// The `http` section of the configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP server binds (health, metrics, and later the FHIR API).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Public base URL of the FHIR API as clients reach it (`https://gw.example.org/fhir`),
    /// used in Bundle links and fullUrls. Without it, the request's Host header is used.
    #[serde(default)]
    pub public_url: Option<String>,
}

fn default_listen() -> String {
    "127.0.0.1:8080".to_string()
}

impl Default for Config {
    fn default() -> Self {
        Config { listen: default_listen(), public_url: None }
    }
}

/// The validated `http` section.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Listen address.
    pub listen: SocketAddr,
    /// Public base URL of the FHIR API, without trailing slash.
    pub public_url: Option<String>,
}

impl Config {
    /// Checks the section without touching sockets.
    pub fn validate(&self) -> Result<Settings, Invalid> {
        let public_url = match &self.public_url {
            Some(url) if url.starts_with("https://") || url.starts_with("http://") => {
                Some(url.trim_end_matches('/').to_string())
            }
            Some(url) => {
                return Err(Invalid::new("http.public_url", format!("`{url}` is not an http(s) URL")));
            }
            None => None,
        };
        Ok(Settings { listen: setting::socket_address("http.listen", &self.listen)?, public_url })
    }
}

/// Answers whether the gateway can take messages now.
pub trait Readiness: Send + Sync {
    /// `Ok` when ready, otherwise the reason.
    fn check(&self) -> Result<(), String>;
}

/// Shared state of the operator endpoints.
#[derive(Clone)]
pub struct AppState {
    /// Metrics to expose.
    pub metrics: Arc<Metrics>,
    /// Readiness probe.
    pub readiness: Arc<dyn Readiness>,
}

/// The operator router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "live" }))
}

async fn ready(State(state): State<AppState>) -> Response {
    match state.readiness.check() {
        Ok(()) => Json(json!({ "status": "ready" })).into_response(),
        Err(reason) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "not_ready", "reason": reason }))).into_response()
        }
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.encode()).into_response()
}
