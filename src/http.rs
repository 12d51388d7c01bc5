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
    /// HTTPS for the whole HTTP listener (FHIR, admin, health, metrics); absent = plain
    /// HTTP. Same keys as `mllp.tls` (`client_ca_file` requires client certificates).
    #[serde(default)]
    pub tls: Option<crate::mllp::TlsConfig>,
}

fn default_listen() -> String {
    "127.0.0.1:8080".to_string()
}

impl Default for Config {
    fn default() -> Self {
        Config { listen: default_listen(), public_url: None, tls: None }
    }
}

/// The validated `http` section.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Listen address.
    pub listen: SocketAddr,
    /// Public base URL of the FHIR API, without trailing slash.
    pub public_url: Option<String>,
    /// HTTPS settings.
    pub tls: Option<crate::mllp::TlsConfig>,
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
        if let Some(tls) = &self.tls {
            if tls.handshake_timeout_secs == 0 {
                return Err(Invalid::new("http.tls.handshake_timeout_secs", "must be at least 1"));
            }
        }
        Ok(Settings {
            listen: setting::socket_address("http.listen", &self.listen)?,
            public_url,
            tls: self.tls.clone(),
        })
    }
}

/// Answers whether the gateway can take messages now.
pub trait Readiness: Send + Sync {
    /// `Ok` when ready, otherwise the reason.
    fn check(&self) -> Result<(), String>;

    /// When ready but something needs attention (e.g. the aggregator push is behind):
    /// the reason. `/health/ready` then answers 200 with `"status": "degraded"`, so that
    /// orchestrators keep routing messages (ingest is unaffected) while monitors alert.
    fn degraded(&self) -> Option<String> {
        None
    }
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
        Ok(()) => match state.readiness.degraded() {
            None => Json(json!({ "status": "ready" })).into_response(),
            Some(reason) => Json(json!({ "status": "degraded", "reason": reason })).into_response(),
        },
        Err(reason) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "not_ready", "reason": reason }))).into_response()
        }
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.encode()).into_response()
}

/// Serves `router` over TLS on `listener` until `stop` is cancelled; then lets open
/// connections finish their requests. Handshakes that take longer than `handshake_timeout`
/// are dropped, so that idle sockets cannot pile up.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    handshake_timeout: std::time::Duration,
    router: Router,
    stop: tokio_util::sync::CancellationToken,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(error = %error, "https accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::debug!(peer = %peer, error = %error, "https handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %peer, "https handshake timed out");
                    return;
                }
            };
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(error) = watcher.watch(connection.into_owned()).await {
                tracing::debug!(peer = %peer, error = %error, "https connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(std::time::Duration::from_secs(10), graceful.shutdown()).await.is_err() {
        tracing::warn!("https connections still open after 10 s; closing them");
    }
}
