//! The FHIR R4 REST API at `/fhir` and the operator API at `/admin`.
//!
//! The FHIR API is read-only: resources come from the HL7 v2 feeds through the pipeline,
//! so create, update, patch and delete are answered 405. Every error, including those of
//! axum's own extractors, is an OperationOutcome with the status that fits it
//! ([`ApiError`]). Responses are `application/fhir+json` (JSON is the only format; a
//! request for XML gets 406), compressed with gzip when the client accepts it and the
//! body has at least [`COMPRESS_FROM_BYTES`].
//!
//! Reads and vreads look the resource up on the calling thread's own connection
//! ([`crate::store::Store::point_read`]) and send the stored body as it is; searches and
//! history run on the store's blocking pool.
//!
//! Layout: [`read`] (read, vread, history), [`search`] (search, `$everything`),
//! [`metadata`] (CapabilityStatement, SMART configuration), [`admin`] (messages, replay,
//! mapping reload), [`render`] (Bundles, `_elements`, `_summary`, pretty printing).

pub mod admin;
pub mod metadata;
pub mod outbox;
pub mod read;
pub mod render;
pub mod search;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{FromRef, FromRequestParts, Request, State};
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use serde_json::json;
use tower_http::compression::predicate::SizeAbove;
use tower_http::compression::CompressionLayer;

use crate::auth::{self, Access, AuthError, Grant, Verifier};
use crate::store::{Store, StoreError};
use crate::telemetry::{Metrics, RequestLabels};

/// The media type of every FHIR response.
pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// Shared state of the FHIR and admin routes.
#[derive(Clone)]
pub struct ApiState {
    /// Read side of the resource store.
    pub store: Arc<Store>,
    /// Token verifier; `None` when auth is not configured (then the API is open, which the
    /// configuration allows only on a loopback address).
    pub verifier: Option<Arc<Verifier>>,
    /// The auth settings, for the SMART configuration document.
    pub auth: Option<auth::Settings>,
    /// Public base URL of the FHIR API (`https://host/fhir`); derived from the `Host`
    /// header when not configured.
    pub public_url: Option<String>,
    /// `https` when the listener serves TLS, else `http` (for links without `public_url`).
    pub scheme: &'static str,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// What the admin routes need.
    pub admin: Arc<admin::AdminState>,
}

/// The `/fhir` and `/admin` routes.
pub fn router(state: ApiState) -> Router {
    let fhir = Router::new()
        .route("/fhir/metadata", get(metadata::capability_statement))
        .route("/fhir/.well-known/smart-configuration", get(metadata::smart_configuration))
        .route("/fhir/_history", get(read::system_history).fallback(read_only))
        .route("/fhir/{resource_type}", get(search::search_get).fallback(read_only))
        .route("/fhir/{resource_type}/_search", post(search::search_post).fallback(read_only))
        .route("/fhir/{resource_type}/_history", get(read::type_history).fallback(read_only))
        .route("/fhir/{resource_type}/{id}", get(read::read).fallback(read_only))
        .route("/fhir/{resource_type}/{id}/_history", get(read::instance_history).fallback(read_only))
        .route("/fhir/{resource_type}/{id}/_history/{version}", get(read::vread).fallback(read_only))
        .route("/fhir/{resource_type}/{id}/{operation}", any(search::operation))
        .route("/fhir", any(read_only))
        .route("/fhir/", any(read_only))
        .fallback(not_found);
    let admin = admin::router().merge(outbox::router());
    let gate = Arc::new(Gate { verifier: state.verifier.clone(), metrics: state.metrics.clone() });
    fhir.merge(admin)
        .layer(axum::middleware::from_fn_with_state(gate, pass_gate))
        .layer(CompressionLayer::new().gzip(true).compress_when(SizeAbove::new(COMPRESS_FROM_BYTES)))
        .with_state(state)
}

/// Responses smaller than this go uncompressed even to clients that accept gzip: setting up
/// a gzip stream costs more than sending the few hundred bytes it would save.
pub const COMPRESS_FROM_BYTES: u64 = 1024;

/// The name of an interaction, set by handlers as a response extension for metrics.
#[derive(Clone, Copy, Debug)]
pub struct Interaction(pub &'static str);

/// Handlers that need only the store take `State<Arc<Store>>`, not a copy of the state.
impl FromRef<ApiState> for Arc<Store> {
    fn from_ref(state: &ApiState) -> Self {
        state.store.clone()
    }
}

/// What every `/fhir` and `/admin` request passes before its handler.
struct Gate {
    verifier: Option<Arc<Verifier>>,
    metrics: Arc<Metrics>,
}

/// One middleware for every route: verifies the bearer token (when auth is configured)
/// and puts the [`Grant`] into the request for handlers; turns the error responses axum
/// makes itself into OperationOutcomes; counts and times the request.
async fn pass_gate(State(gate): State<Arc<Gate>>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let response = match authenticate(&gate, request.uri().path(), request.headers()).await {
        Ok(grant) => {
            request.extensions_mut().insert(grant);
            outcome_for_every_error(next.run(request).await).await
        }
        Err(error) => ApiError::Auth(error).into_response(),
    };
    let interaction = response.extensions().get::<Interaction>().map_or("other", |interaction| interaction.0);
    gate.metrics.fhir_requests.get_or_create(&RequestLabels { interaction, status: response.status().as_u16() }).inc();
    gate.metrics.fhir_request_duration.observe(started.elapsed().as_secs_f64());
    response
}

/// Turns the error responses axum makes itself (extractor rejections such as a path that
/// is not UTF-8, 405 from method routing) into OperationOutcomes, keeping their status and
/// headers (`Allow`...). Errors that already are FHIR pass unchanged.
async fn outcome_for_every_error(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_fhir = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|media| media.starts_with("application/fhir+json"));
    if is_fhir {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_string())
        .unwrap_or_default();
    let diagnostics = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_string() } else { text };
    let code = match status {
        StatusCode::BAD_REQUEST => "invalid",
        StatusCode::UNAUTHORIZED => "login",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not-found",
        StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_ACCEPTABLE | StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            "not-supported"
        }
        StatusCode::PAYLOAD_TOO_LARGE => "too-long",
        status if status.is_server_error() => "exception",
        _ => "processing",
    };
    let body = operation_outcome("error", code, &[diagnostics]).to_string();
    let mut converted = Response::from_parts(parts, axum::body::Body::from(body));
    converted.headers_mut().remove(header::CONTENT_LENGTH);
    converted.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    converted
}

/// Paths anyone may fetch: the CapabilityStatement and the SMART configuration (clients
/// need them to learn how to authenticate).
fn is_public(path: &str) -> bool {
    matches!(path, "/fhir/metadata" | "/fhir/.well-known/smart-configuration")
}

/// The caller's [`Grant`]: everything when auth is not configured or for a public path,
/// else what the bearer token allows.
async fn authenticate(gate: &Gate, path: &str, headers: &HeaderMap) -> Result<Grant, AuthError> {
    match &gate.verifier {
        Some(verifier) if !is_public(path) => verifier.verify(auth::bearer_token(headers)?).await,
        _ => Ok(Grant::open()),
    }
}

async fn read_only(method: Method) -> Response {
    if method == Method::GET || method == Method::HEAD {
        return ApiError::NotFound("no such FHIR endpoint".to_string()).into_response();
    }
    ApiError::MethodNotAllowed(format!(
        "{method} is not supported: this FHIR API is read-only; its resources come from the HL7 v2 feeds"
    ))
    .into_response()
}

async fn not_found() -> Response {
    ApiError::NotFound("no such endpoint".to_string()).into_response()
}

/// Every way a FHIR or admin request can fail, each with its HTTP status and
/// OperationOutcome issue code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: malformed request or search.
    #[error("{}", .0.join("; "))]
    BadRequest(Vec<String>),
    /// 401/403/503 from token verification.
    #[error(transparent)]
    Auth(AuthError),
    /// 403: the token's scopes do not allow it.
    #[error("{0}")]
    Forbidden(String),
    /// 404: unknown resource, type or endpoint.
    #[error("{0}")]
    NotFound(String),
    /// 405: write interactions.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 406: a format other than JSON was asked for.
    #[error("{0}")]
    NotAcceptable(String),
    /// 410: the resource was deleted.
    #[error("{0}")]
    Gone(String),
    /// 415: a body in an unsupported media type.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422: understood but cannot be done (e.g. mappings that do not compile).
    #[error("{}", .0.join("; "))]
    Unprocessable(Vec<String>),
    /// 500: the store failed.
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        tracing::error!(error = %error, "resource store failed");
        ApiError::Internal("the resource store failed; see the gateway log".to_string())
    }
}

impl From<crate::pipeline::Error> for ApiError {
    fn from(error: crate::pipeline::Error) -> Self {
        tracing::error!(error = %error, "journal access failed");
        ApiError::Internal("the message journal failed; see the gateway log".to_string())
    }
}

impl ApiError {
    /// HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Auth(error) => error.status(),
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OperationOutcome `issue.code`.
    fn issue_code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "invalid",
            ApiError::Auth(error) if error.status() == StatusCode::FORBIDDEN => "forbidden",
            ApiError::Auth(error) if error.status().is_server_error() => "transient",
            ApiError::Auth(_) => "login",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not-found",
            ApiError::MethodNotAllowed(_) | ApiError::NotAcceptable(_) | ApiError::UnsupportedMediaType(_) => {
                "not-supported"
            }
            ApiError::Gone(_) => "deleted",
            ApiError::Unprocessable(_) => "processing",
            ApiError::Internal(_) => "exception",
        }
    }

    fn diagnostics(&self) -> Vec<String> {
        match self {
            ApiError::BadRequest(issues) | ApiError::Unprocessable(issues) => issues.clone(),
            other => vec![other.to_string()],
        }
    }
}

/// An OperationOutcome with one issue per line of `diagnostics`.
pub fn operation_outcome(severity: &str, code: &str, diagnostics: &[String]) -> serde_json::Value {
    let issues: Vec<serde_json::Value> =
        diagnostics.iter().map(|text| json!({ "severity": severity, "code": code, "diagnostics": text })).collect();
    json!({ "resourceType": "OperationOutcome", "issue": issues })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = operation_outcome("error", self.issue_code(), &self.diagnostics());
        let mut response =
            (status, [(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON))], body.to_string()).into_response();
        if let ApiError::Auth(error) = &self {
            if let Ok(value) = HeaderValue::from_str(&error.www_authenticate()) {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, value);
            }
        }
        response
    }
}

/// What every FHIR handler needs from the request: the caller's grant, the negotiated
/// format and the base URL for links.
#[derive(Clone, Debug)]
pub struct FhirRequest {
    /// The caller's rights.
    pub grant: Grant,
    /// `_pretty=true`.
    pub pretty: bool,
    /// Base URL of the API, without trailing slash.
    pub base: String,
    /// `Prefer: handling=strict`.
    pub strict: bool,
}

impl FromRequestParts<ApiState> for FhirRequest {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        let mut format: Option<String> = None;
        let mut pretty = false;
        for (name, value) in form_pairs(query) {
            match name.as_str() {
                "_format" => format = Some(value),
                "_pretty" => pretty = value == "true",
                _ => {}
            }
        }
        negotiate(format.as_deref(), &parts.headers)?;
        let grant = parts.extensions.get::<Grant>().cloned().unwrap_or_else(Grant::open);
        let strict = parts
            .headers
            .get_all("prefer")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split([',', ';']))
            .any(|token| token.trim().eq_ignore_ascii_case("handling=strict"));
        Ok(FhirRequest { grant, pretty, base: base_url(state, &parts.headers), strict })
    }
}

/// The decoded query parameters, in order (repeats kept).
#[derive(Clone, Debug, Default)]
pub struct Params(pub Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        serde_urlencoded::from_str::<Vec<(String, String)>>(query)
            .map(Params)
            .map_err(|error| ApiError::BadRequest(vec![format!("the query string cannot be decoded: {error}")]))
    }
}

/// Decoded `name=value` pairs of a query string or form body, in order.
pub fn form_pairs(text: &str) -> Vec<(String, String)> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(text).unwrap_or_default()
}

/// Checks that the client accepts JSON. `_format` wins over `Accept`.
fn negotiate(format: Option<&str>, headers: &HeaderMap) -> Result<(), ApiError> {
    if let Some(format) = format {
        // An unencoded `+` (`_format=application/fhir+json`) arrives decoded as a space.
        let media = format.split(';').next().unwrap_or("").trim().to_ascii_lowercase().replace(' ', "+");
        return match media.as_str() {
            "json" | "application/json" | "application/fhir+json" | "application/json+fhir" => Ok(()),
            _ => Err(ApiError::NotAcceptable(format!("_format={format} is not supported; this server speaks JSON"))),
        };
    }
    let accepted = || {
        headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(|media| media.split(';').next().unwrap_or("").trim())
            .filter(|media| !media.is_empty())
    };
    const JSON: [&str; 5] =
        ["*/*", "application/*", "application/json", "application/fhir+json", "application/json+fhir"];
    let mut listed = accepted().peekable();
    if listed.peek().is_none() || listed.any(|media| JSON.iter().any(|json| media.eq_ignore_ascii_case(json))) {
        return Ok(());
    }
    let accepts: Vec<String> = accepted().map(str::to_ascii_lowercase).collect();
    Err(ApiError::NotAcceptable(format!(
        "Accept: {} cannot be served; this server returns application/fhir+json",
        accepts.join(", ")
    )))
}

fn base_url(state: &ApiState, headers: &HeaderMap) -> String {
    if let Some(url) = &state.public_url {
        return url.trim_end_matches('/').to_string();
    }
    let host = headers.get(header::HOST).and_then(|value| value.to_str().ok()).unwrap_or("localhost");
    // The Host header is the client's; keep only characters a host and port can have.
    let host: String =
        host.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']')).collect();
    format!("{}://{host}/fhir", state.scheme)
}

/// Access check: 403 unless the grant can read (or search) `resource_type`; `what` names
/// the refused action.
pub fn require(access: Access, what: impl FnOnce() -> String) -> Result<Access, ApiError> {
    match access {
        Access::Denied => Err(ApiError::Forbidden(format!("the token's scopes do not allow {}", what()))),
        other => Ok(other),
    }
}

/// The types this API serves: those with search parameter definitions.
pub fn check_type(resource_type: &str) -> Result<(), ApiError> {
    if crate::store::params::searchable_types().binary_search(&resource_type).is_ok() {
        Ok(())
    } else {
        Err(ApiError::NotFound(format!("resource type {resource_type} is not supported by this server")))
    }
}

/// A FHIR logical id: 1–64 of `A-Z a-z 0-9 - .`.
pub fn check_id(id: &str) -> Result<(), ApiError> {
    let valid = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'.');
    if valid {
        Ok(())
    } else {
        Err(ApiError::BadRequest(vec![format!("`{id}` is not a valid FHIR id")]))
    }
}

/// A response with the FHIR media type.
pub fn fhir_response(status: StatusCode, body: String, interaction: &'static str) -> Response {
    let mut response = (status, [(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON))], body).into_response();
    response.extensions_mut().insert(Interaction(interaction));
    response
}
