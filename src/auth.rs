//! Bearer-token authorization for the FHIR API (SMART App Launch 2.0 / SMART Backend Services).
//!
//! The gateway is a resource server: an external identity provider issues signed JWT access
//! tokens, and this module checks them against the provider's JSON Web Key Set.
//!
//! - [`Config`] / [`Settings`]: the `auth` section (issuer, audience, where the keys are).
//! - [`Verifier`]: loads the key set at start-up and verifies tokens: signature (RS*, PS*,
//!   ES256, ES384 only; the algorithm must fit the key), `iss`, `aud`, `exp` (required), `nbf`,
//!   with clock skew. A token signed by an unknown key makes it fetch the key set again, at most
//!   once per 30 seconds.
//! - [`bearer_token`]: the token from an `Authorization: Bearer …` header.
//! - [`Grant`]: what a verified token allows, answered per resource type as an [`Access`].
//! - [`AuthError`]: the HTTP status and `WWW-Authenticate` challenge of each failure (RFC 6750).
//! - [`smart_configuration`]: the `/.well-known/smart-configuration` document.
//!
//! # Scopes
//! SMART v1 (`patient/Observation.read`, `user/*.*`, `system/*.read`) and v2
//! (`patient/Observation.rs`, `system/*.cruds`) scopes are understood. v1 `read` and `*` grant
//! read and search; `write` grants neither. v2 `r` grants read and `s` grants search. `system/`
//! and `user/` scopes grant access to every resource of the type; `patient/` scopes only to the
//! compartment of the patient named by the token's `patient` claim, and nothing without one.
//! v2 scopes with a query suffix (`patient/Observation.rs?category=laboratory`) cannot be
//! enforced by this gateway and grant nothing. Unknown scopes (`openid`, `launch/patient`, …)
//! are ignored.
//!
//! Nothing here logs a token or a claim value.

use std::fmt;
use std::io::Read;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, StatusCode};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use reqwest::Url;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::setting::Invalid;

/// The admin scope when the configuration names none.
pub const DEFAULT_ADMIN_SCOPE: &str = "hl7gw/admin";

/// Clock skew tolerated on `exp` and `nbf` when the configuration names none.
pub const DEFAULT_CLOCK_SKEW_SECONDS: u64 = 60;

/// The largest clock skew the configuration accepts.
pub const MAX_CLOCK_SKEW_SECONDS: u64 = 300;

/// The shortest time between two fetches of the key set caused by unknown key ids.
const REFETCH_INTERVAL: Duration = Duration::from_secs(30);

/// The largest key set document read.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// The longest token looked at.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Time limits of a key set fetch.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Signature algorithms accepted. Never `none`, never HMAC.
const ACCEPTED_ALGORITHMS: [Algorithm; 8] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

/// The `auth` section of the configuration file.
///
/// ```yaml
/// auth:
///   issuer: https://idp.example.org
///   audience: https://gateway.example.org/fhir
///   jwks_url: https://idp.example.org/jwks      # or jwks_file: /etc/hl7gw/jwks.json
///   clock_skew_seconds: 60
///   admin_scope: hl7gw/admin
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The `iss` every token must carry, exactly.
    pub issuer: String,
    /// A value the token's `aud` (string or array) must contain, usually the FHIR base URL.
    pub audience: String,
    /// A JSON Web Key Set file with the issuer's public keys.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// The issuer's JSON Web Key Set URL (https; http only for loopback hosts).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// CA certificates (PEM) to trust for `jwks_url` instead of the system's roots.
    #[serde(default)]
    pub jwks_ca_file: Option<PathBuf>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds (default 60, at most 300).
    #[serde(default)]
    pub clock_skew_seconds: Option<u64>,
    /// The scope that grants the gateway's administrative operations (default `hl7gw/admin`).
    #[serde(default)]
    pub admin_scope: Option<String>,
    /// The issuer's token endpoint, advertised in `/.well-known/smart-configuration`.
    #[serde(default)]
    pub token_endpoint: Option<String>,
    /// The issuer's authorization endpoint, advertised in `/.well-known/smart-configuration`.
    #[serde(default)]
    pub authorization_endpoint: Option<String>,
    /// SMART capabilities to advertise instead of the ones derived from the endpoints.
    #[serde(default)]
    pub capabilities: Option<Vec<String>>,
}

/// Where the issuer's keys come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JwksSource {
    /// A file, read at start-up and again when a token names an unknown key.
    File(PathBuf),
    /// A URL, fetched at start-up and again when a token names an unknown key.
    Url(Url),
}

impl fmt::Display for JwksSource {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JwksSource::File(path) => write!(formatter, "{}", path.display()),
            JwksSource::Url(url) => write!(formatter, "{url}"),
        }
    }
}

/// The validated `auth` section.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Required `iss`.
    pub issuer: String,
    /// Required member of `aud`.
    pub audience: String,
    /// The key set.
    pub jwks: JwksSource,
    /// CA certificates for an https key set URL; the system's roots when absent.
    pub jwks_ca_file: Option<PathBuf>,
    /// Tolerated clock skew on `exp` and `nbf`, in seconds.
    pub clock_skew_seconds: u64,
    /// The administrative scope.
    pub admin_scope: String,
    /// Advertised token endpoint.
    pub token_endpoint: Option<Url>,
    /// Advertised authorization endpoint.
    pub authorization_endpoint: Option<Url>,
    /// Advertised capabilities, when configured explicitly.
    pub capabilities: Option<Vec<String>>,
    /// Shortest time between two refetches of the key set.
    refetch_interval: Duration,
}

impl Config {
    /// Checks the section without touching files or the network.
    pub fn validate(&self) -> Result<Settings, Invalid> {
        let issuer = self.issuer.trim();
        if issuer.is_empty() || issuer.len() != self.issuer.len() || issuer.contains(char::is_whitespace) {
            return Err(Invalid::new("auth.issuer", "must be the issuer's identifier (its `iss`), without spaces"));
        }
        let audience = self.audience.trim();
        if audience.is_empty() || audience.len() != self.audience.len() || audience.contains(char::is_whitespace) {
            return Err(Invalid::new(
                "auth.audience",
                "must be the `aud` tokens carry for this gateway, without spaces",
            ));
        }
        let jwks = match (&self.jwks_file, &self.jwks_url) {
            (Some(_), Some(_)) => {
                return Err(Invalid::new("auth.jwks_url", "set either jwks_file or jwks_url, not both"));
            }
            (None, None) => {
                return Err(Invalid::new("auth.jwks_file", "set jwks_file or jwks_url: where the issuer's keys are"));
            }
            (Some(path), None) => {
                if path.as_os_str().is_empty() {
                    return Err(Invalid::new("auth.jwks_file", "must not be empty"));
                }
                JwksSource::File(path.clone())
            }
            (None, Some(url)) => JwksSource::Url(https_url("auth.jwks_url", url)?),
        };
        if self.jwks_ca_file.is_some() && !matches!(jwks, JwksSource::Url(_)) {
            return Err(Invalid::new("auth.jwks_ca_file", "applies only with jwks_url"));
        }
        let clock_skew_seconds = self.clock_skew_seconds.unwrap_or(DEFAULT_CLOCK_SKEW_SECONDS);
        if clock_skew_seconds > MAX_CLOCK_SKEW_SECONDS {
            return Err(Invalid::new(
                "auth.clock_skew_seconds",
                format!("{clock_skew_seconds} is more than {MAX_CLOCK_SKEW_SECONDS}; fix the clocks instead"),
            ));
        }
        let admin_scope = self.admin_scope.clone().unwrap_or_else(|| DEFAULT_ADMIN_SCOPE.to_string());
        if admin_scope.is_empty() || admin_scope.contains(char::is_whitespace) || parse_scope(&admin_scope).is_some() {
            return Err(Invalid::new(
                "auth.admin_scope",
                "must be one scope without spaces, and not a SMART resource scope",
            ));
        }
        let token_endpoint =
            self.token_endpoint.as_deref().map(|url| https_url("auth.token_endpoint", url)).transpose()?;
        let authorization_endpoint = self
            .authorization_endpoint
            .as_deref()
            .map(|url| https_url("auth.authorization_endpoint", url))
            .transpose()?;
        if let Some(capabilities) = &self.capabilities {
            if let Some(bad) = capabilities.iter().find(|c| c.is_empty() || c.contains(char::is_whitespace)) {
                return Err(Invalid::new("auth.capabilities", format!("`{bad}` is not a SMART capability name")));
            }
        }
        Ok(Settings {
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            jwks,
            jwks_ca_file: self.jwks_ca_file.clone(),
            clock_skew_seconds,
            admin_scope,
            token_endpoint,
            authorization_endpoint,
            capabilities: self.capabilities.clone(),
            refetch_interval: REFETCH_INTERVAL,
        })
    }
}

/// Parses an https URL for `key`; plain http is accepted for loopback hosts only.
fn https_url(key: &str, value: &str) -> Result<Url, Invalid> {
    let url = Url::parse(value).map_err(|error| Invalid::new(key, format!("not a URL: {error}")))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Invalid::new(key, "must not carry a user name or password"));
    }
    if url.fragment().is_some() {
        return Err(Invalid::new(key, "must not have a #fragment"));
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        "http" => Err(Invalid::new(key, "must use https (plain http only for localhost, 127.0.0.0/8 or [::1])")),
        other => Err(Invalid::new(key, format!("scheme `{other}` is not https"))),
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host_str() {
        Some(host) if host.eq_ignore_ascii_case("localhost") => true,
        Some(host) => {
            host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
        None => false,
    }
}

/// Why a request is not authorized. See [`AuthError::status`] and [`AuthError::www_authenticate`].
///
/// The messages never contain the token or claim values.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No bearer token: no `Authorization` header, or another scheme (401).
    #[error("no bearer token")]
    Missing,
    /// The `Authorization` header says Bearer but is unusable (400, `invalid_request`).
    #[error("malformed authorization: {0}")]
    Malformed(String),
    /// The token is not acceptable: signature, issuer, audience, key, format (401, `invalid_token`).
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The token's `exp` has passed (401, `invalid_token`).
    #[error("token expired")]
    Expired,
    /// The token is valid but its scopes do not allow the request (403, `insufficient_scope`).
    /// Decided by the caller from [`Grant::can_read`] and friends.
    #[error("insufficient scope: {0}")]
    Forbidden(String),
    /// The issuer's keys cannot be read or fetched (503).
    #[error("signing keys unavailable: {0}")]
    Jwks(String),
}

impl AuthError {
    /// The HTTP status: 401 for a missing, invalid or expired token, 400 for a malformed
    /// `Authorization` header, 403 for a missing scope, 503 when the keys cannot be fetched.
    pub fn status(&self) -> StatusCode {
        match self {
            AuthError::Missing | AuthError::Invalid(_) | AuthError::Expired => StatusCode::UNAUTHORIZED,
            AuthError::Malformed(_) => StatusCode::BAD_REQUEST,
            AuthError::Forbidden(_) => StatusCode::FORBIDDEN,
            AuthError::Jwks(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `WWW-Authenticate` header value (RFC 6750 §3), e.g.
    /// `Bearer error="invalid_token", error_description="token expired"`. A missing token, and
    /// unavailable keys (whose details are for the log, not the client), get a bare `Bearer`.
    pub fn www_authenticate(&self) -> String {
        let (error, description) = match self {
            AuthError::Missing | AuthError::Jwks(_) => return "Bearer".to_string(),
            AuthError::Malformed(description) => ("invalid_request", description.as_str()),
            AuthError::Invalid(description) => ("invalid_token", description.as_str()),
            AuthError::Expired => ("invalid_token", "token expired"),
            AuthError::Forbidden(description) => ("insufficient_scope", description.as_str()),
        };
        format!("Bearer error=\"{error}\", error_description=\"{}\"", quotable(description))
    }
}

/// Keeps the characters RFC 6750 allows in `error_description`.
fn quotable(text: &str) -> String {
    text.chars().filter(|c| matches!(c, ' '..='~') && *c != '"' && *c != '\\').collect()
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
///
/// No header, or a header with another scheme (`Basic …`), is [`AuthError::Missing`]; several
/// `Authorization` headers, an empty token or one with characters outside RFC 6750's
/// `b64token` are [`AuthError::Malformed`].
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(AuthError::Missing);
    };
    if values.next().is_some() {
        return Err(AuthError::Malformed("more than one Authorization header".to_string()));
    }
    let value = value
        .to_str()
        .map_err(|_| AuthError::Malformed("the Authorization header is not printable ASCII".to_string()))?;
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Missing);
    }
    let token = token.trim_matches(' ');
    if token.is_empty() {
        return Err(AuthError::Malformed("the bearer token is empty".to_string()));
    }
    let b64token = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/' | b'=');
    if !token.bytes().all(b64token) {
        return Err(AuthError::Malformed("the bearer token has characters a token cannot have".to_string()));
    }
    Ok(token)
}

/// One usable public key of the key set.
struct Key {
    kid: Option<String>,
    /// Algorithms this key verifies: its `alg`, or every accepted one of its type.
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

/// The usable keys of one key set document.
struct KeySet {
    keys: Vec<Key>,
}

impl KeySet {
    /// Keys that may have signed a token with this header.
    fn candidates<'a>(&'a self, kid: Option<&'a str>, algorithm: Algorithm) -> impl Iterator<Item = &'a Key> + 'a {
        self.keys
            .iter()
            .filter(move |key| (kid.is_none() || key.kid.as_deref() == kid) && key.algorithms.contains(&algorithm))
    }
}

fn algorithm_of(key_algorithm: KeyAlgorithm) -> Option<Algorithm> {
    Some(match key_algorithm {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        _ => return None,
    })
}

/// A signing key of an accepted type, or `None` (encryption keys, HMAC secrets, other curves).
fn key_from_jwk(jwk: &Jwk) -> Option<Key> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))) {
        return None;
    }
    let of_type: &[Algorithm] = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => &ACCEPTED_ALGORITHMS[..6],
        AlgorithmParameters::EllipticCurve(parameters) => match parameters.curve {
            EllipticCurve::P256 => &[Algorithm::ES256],
            EllipticCurve::P384 => &[Algorithm::ES384],
            _ => return None,
        },
        _ => return None,
    };
    let algorithms = match jwk.common.key_algorithm {
        None => of_type.to_vec(),
        Some(key_algorithm) => {
            let algorithm = algorithm_of(key_algorithm)?;
            if !of_type.contains(&algorithm) {
                return None;
            }
            vec![algorithm]
        }
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(Key { kid: jwk.common.key_id.clone(), algorithms, key })
}

/// Reads a key set document; keys that are not usable signing keys are skipped.
fn parse_jwks(bytes: &[u8]) -> Result<KeySet, String> {
    let document: Value = serde_json::from_slice(bytes).map_err(|error| format!("not JSON: {error}"))?;
    let Some(entries) = document.get("keys").and_then(Value::as_array) else {
        return Err("not a JSON Web Key Set: no `keys` array".to_string());
    };
    let keys: Vec<Key> = entries
        .iter()
        .filter_map(|entry| serde_json::from_value::<Jwk>(entry.clone()).ok())
        .filter_map(|jwk| key_from_jwk(&jwk))
        .collect();
    if keys.is_empty() {
        return Err(format!(
            "none of its {} keys is a usable signing key (RSA, or EC P-256/P-384, with an accepted `alg`)",
            entries.len()
        ));
    }
    Ok(KeySet { keys })
}

/// The message of an error and of its sources.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

fn http_client(settings: &Settings, url: &Url) -> Result<reqwest::Client, AuthError> {
    let tls = crate::mllp::tls::client_config(&crate::mllp::tls::ClientTls {
        ca_file: settings.jwks_ca_file.clone(),
        ..Default::default()
    })
    .map_err(|error| AuthError::Jwks(format!("TLS set-up for {url}: {error}")))?;
    let mut builder = reqwest::Client::builder()
        .tls_backend_preconfigured(Arc::unwrap_or_clone(tls))
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(FETCH_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("hl7-fhir-gateway/", env!("CARGO_PKG_VERSION")));
    if is_loopback(url) {
        builder = builder.no_proxy();
    }
    builder.build().map_err(|error| AuthError::Jwks(format!("HTTP client for {url}: {}", error_chain(&error))))
}

async fn read_url(client: &reqwest::Client, url: &Url) -> Result<Vec<u8>, String> {
    let mut response = client
        .get(url.clone())
        .header(header::ACCEPT, "application/jwk-set+json, application/json")
        .send()
        .await
        .map_err(|error| error_chain(&error))?;
    if !response.status().is_success() {
        return Err(format!("HTTP status {}", response.status()));
    }
    if response.content_length().is_some_and(|length| length > MAX_JWKS_BYTES as u64) {
        return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|error| error_chain(&error))? {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn read_file(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|error| error.to_string())?;
    let mut body = Vec::new();
    file.take(MAX_JWKS_BYTES as u64 + 1).read_to_end(&mut body).map_err(|error| error.to_string())?;
    if body.len() > MAX_JWKS_BYTES {
        return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
    }
    Ok(body)
}

async fn fetch(source: &JwksSource, client: Option<&reqwest::Client>) -> Result<KeySet, AuthError> {
    let bytes = match (source, client) {
        (JwksSource::File(path), _) => read_file(path),
        (JwksSource::Url(url), Some(client)) => read_url(client, url).await,
        (JwksSource::Url(_), None) => Err("no HTTP client".to_string()),
    };
    bytes.and_then(|bytes| parse_jwks(&bytes)).map_err(|reason| AuthError::Jwks(format!("JWKS {source}: {reason}")))
}

struct Inner {
    settings: Settings,
    client: Option<reqwest::Client>,
    keys: RwLock<Arc<KeySet>>,
    /// When the key set was last read; held while reading it again.
    fetched: tokio::sync::Mutex<Instant>,
}

/// Verifies access tokens against the issuer's keys. Cheap to clone; clones share the keys.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Verifier")
            .field("issuer", &self.inner.settings.issuer)
            .field("jwks", &self.inner.settings.jwks)
            .field("keys", &self.current().keys.len())
            .finish()
    }
}

/// The claims a grant is built from.
struct Claims(Map<String, Value>);

impl Claims {
    fn string(&self, name: &str) -> Option<String> {
        self.0.get(name).and_then(Value::as_str).filter(|value| !value.is_empty()).map(str::to_string)
    }

    /// Scopes of `scope` and `scp`, each a space-separated string or an array of strings.
    fn scopes(&self) -> Vec<&str> {
        let mut scopes = Vec::new();
        for name in ["scope", "scp"] {
            match self.0.get(name) {
                Some(Value::String(list)) => scopes.extend(list.split(' ').filter(|scope| !scope.is_empty())),
                Some(Value::Array(items)) => {
                    scopes.extend(items.iter().filter_map(Value::as_str).flat_map(|item| item.split(' ')))
                }
                _ => {}
            }
        }
        scopes.retain(|scope| !scope.is_empty());
        scopes
    }
}

fn token_error(error: &jsonwebtoken::errors::Error) -> AuthError {
    let reason = match error.kind() {
        ErrorKind::ExpiredSignature => return AuthError::Expired,
        ErrorKind::ImmatureSignature => "token is not valid yet (nbf)".to_string(),
        ErrorKind::InvalidIssuer => "wrong issuer".to_string(),
        ErrorKind::InvalidAudience => "wrong audience".to_string(),
        ErrorKind::InvalidSignature => "signature does not verify".to_string(),
        ErrorKind::InvalidAlgorithm => "algorithm does not fit the key".to_string(),
        ErrorKind::MissingRequiredClaim(claim) => format!("token has no {} claim", quotable(claim)),
        ErrorKind::InvalidClaimFormat(claim) => format!("malformed {} claim", quotable(claim)),
        _ => "malformed token".to_string(),
    };
    AuthError::Invalid(reason)
}

impl Verifier {
    /// Reads the key set (the file, or the URL fetched), failing with a clear
    /// [`AuthError::Jwks`] when it cannot be read or holds no usable signing key.
    pub async fn load(settings: &Settings) -> Result<Verifier, AuthError> {
        let client = match &settings.jwks {
            JwksSource::Url(url) => Some(http_client(settings, url)?),
            JwksSource::File(_) => None,
        };
        let keys = fetch(&settings.jwks, client.as_ref()).await?;
        tracing::info!(source = %settings.jwks, keys = keys.keys.len(), "token signing keys loaded");
        Ok(Verifier {
            inner: Arc::new(Inner {
                settings: settings.clone(),
                client,
                keys: RwLock::new(Arc::new(keys)),
                fetched: tokio::sync::Mutex::new(Instant::now()),
            }),
        })
    }

    /// The settings this verifier was loaded with.
    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    fn current(&self) -> Arc<KeySet> {
        Arc::clone(&self.inner.keys.read().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// Reads the key set again unless that happened less than the refetch interval ago.
    async fn refetch(&self) -> Result<(), AuthError> {
        let mut fetched = self.inner.fetched.lock().await;
        if fetched.elapsed() < self.inner.settings.refetch_interval {
            return Ok(());
        }
        *fetched = Instant::now();
        let keys = fetch(&self.inner.settings.jwks, self.inner.client.as_ref()).await.inspect_err(|error| {
            tracing::warn!(%error, "token signing keys could not be refetched");
        })?;
        tracing::info!(source = %self.inner.settings.jwks, keys = keys.keys.len(), "token signing keys refetched");
        *self.inner.keys.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(keys);
        Ok(())
    }

    /// Verifies a token and returns what it grants.
    ///
    /// Checks the signature with the key named by `kid` (or every key when there is no `kid`),
    /// accepting RS256/384/512, PS256/384/512, ES256 and ES384 only, and only an algorithm that
    /// fits the key; then `iss`, `aud` (a string or an array), `exp` (required) and `nbf`, with
    /// the configured clock skew. An unknown `kid` makes it read the key set again (at most once
    /// per 30 seconds) before failing.
    pub async fn verify(&self, token: &str) -> Result<Grant, AuthError> {
        let result = self.verify_token(token).await;
        if let Err(error) = &result {
            tracing::debug!(%error, "bearer token rejected");
        }
        result
    }

    async fn verify_token(&self, token: &str) -> Result<Grant, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Invalid("token too long".to_string()));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Invalid("malformed token header or unsupported algorithm".to_string()))?;
        if !ACCEPTED_ALGORITHMS.contains(&header.alg) {
            return Err(AuthError::Invalid(format!("algorithm {:?} is not accepted", header.alg)));
        }
        let kid = header.kid.as_deref();
        let mut keys = self.current();
        if keys.candidates(kid, header.alg).next().is_none() {
            if keys.keys.iter().any(|key| kid.is_some() && key.kid.as_deref() == kid) {
                return Err(AuthError::Invalid("algorithm does not fit the key".to_string()));
            }
            self.refetch().await?;
            keys = self.current();
        }
        let settings = &self.inner.settings;
        let mut validation = Validation::new(header.alg);
        validation.leeway = settings.clock_skew_seconds;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.set_issuer(&[&settings.issuer]);
        validation.set_audience(&[&settings.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let mut failure = AuthError::Invalid("no known key signed this token".to_string());
        for key in keys.candidates(kid, header.alg) {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation) {
                Ok(data) => return Ok(Grant::from_claims(&Claims(data.claims), &settings.admin_scope)),
                Err(error) if matches!(error.kind(), ErrorKind::InvalidSignature) => failure = token_error(&error),
                Err(error) => return Err(token_error(&error)),
            }
        }
        Err(failure)
    }
}

/// The context part of a SMART scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Context {
    Patient,
    User,
    System,
}

/// A SMART resource scope, reduced to what this gateway enforces.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Scope {
    context: Context,
    /// `None` for `*`.
    resource_type: Option<String>,
    read: bool,
    search: bool,
}

/// Parses a SMART v1 or v2 resource scope; anything else, including a v2 scope with a query
/// suffix, is `None`.
fn parse_scope(scope: &str) -> Option<Scope> {
    if scope.contains('?') {
        return None;
    }
    let (context, rest) = scope.split_once('/')?;
    let context = match context {
        "patient" => Context::Patient,
        "user" => Context::User,
        "system" => Context::System,
        _ => return None,
    };
    let (resource_type, permissions) = rest.split_once('.')?;
    let resource_type = match resource_type {
        "*" => None,
        name if name.starts_with(|c: char| c.is_ascii_uppercase())
            && name.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            Some(name.to_string())
        }
        _ => return None,
    };
    let (read, search) = match permissions {
        "read" | "*" => (true, true),
        "write" => (false, false),
        v2 => {
            // SMART v2: a non-empty subsequence of "cruds", in that order.
            let mut rest = "cruds";
            for letter in v2.chars() {
                let at = rest.find(letter)?;
                rest = &rest[at + 1..];
            }
            if v2.is_empty() {
                return None;
            }
            (v2.contains('r'), v2.contains('s'))
        }
    };
    Some(Scope { context, resource_type, read, search })
}

/// Whether a FHIR id is well-formed (`[A-Za-z0-9\-\.]{1,64}`).
fn is_fhir_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// What a caller may reach for one resource type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// Nothing.
    Denied,
    /// Every resource of the type.
    All,
    /// Only resources in this patient's compartment (the id of the Patient).
    Patient(String),
}

/// What a verified token allows.
#[derive(Clone)]
pub struct Grant {
    /// The token's `sub`.
    pub subject: Option<String>,
    /// The token's `client_id` (or, failing that, `azp`).
    pub client_id: Option<String>,
    /// The SMART launch context `patient` claim; absent when it is not a valid FHIR id.
    pub patient: Option<String>,
    scopes: Vec<Scope>,
    admin: bool,
}

/// Shows whether there is a patient context, not whose.
impl fmt::Debug for Grant {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Grant")
            .field("subject", &self.subject)
            .field("client_id", &self.client_id)
            .field("patient", &self.patient.as_ref().map(|_| "…"))
            .field("scopes", &self.scopes)
            .field("admin", &self.admin)
            .finish()
    }
}

impl Grant {
    fn from_claims(claims: &Claims, admin_scope: &str) -> Grant {
        let scopes = claims.scopes();
        Grant {
            subject: claims.string("sub"),
            client_id: claims.string("client_id").or_else(|| claims.string("azp")),
            patient: claims.string("patient").filter(|patient| is_fhir_id(patient)),
            admin: scopes.contains(&admin_scope),
            scopes: scopes.into_iter().filter_map(parse_scope).collect(),
        }
    }

    /// A grant from a space-separated scope list and an optional patient context, as a
    /// verified token would give; the admin scope is [`DEFAULT_ADMIN_SCOPE`]. For tests and
    /// tools.
    pub fn from_scopes(scope: &str, patient: Option<&str>) -> Grant {
        let mut claims = Map::new();
        claims.insert("scope".to_string(), Value::from(scope));
        if let Some(patient) = patient {
            claims.insert("patient".to_string(), Value::from(patient));
        }
        Grant::from_claims(&Claims(claims), DEFAULT_ADMIN_SCOPE)
    }

    /// A grant with every right, admin included, for when auth is not configured (the API then
    /// listens on loopback only).
    pub fn open() -> Grant {
        Grant {
            subject: None,
            client_id: None,
            patient: None,
            scopes: vec![Scope { context: Context::System, resource_type: None, read: true, search: true }],
            admin: true,
        }
    }

    fn access(&self, resource_type: &str, allows: impl Fn(&Scope) -> bool) -> Access {
        let mut patient_scope = false;
        let matching = self.scopes.iter().filter(|scope| {
            scope.resource_type.as_deref().is_none_or(|granted| granted == resource_type) && allows(scope)
        });
        for scope in matching {
            match scope.context {
                Context::System | Context::User => return Access::All,
                Context::Patient => patient_scope = true,
            }
        }
        match (&self.patient, patient_scope) {
            (Some(patient), true) => Access::Patient(patient.clone()),
            _ => Access::Denied,
        }
    }

    /// Read access (`GET [type]/[id]`, history) to `resource_type`: v1 `.read`/`.*`, v2 `r`.
    /// `system/` and `user/` scopes give [`Access::All`]; `patient/` scopes give
    /// [`Access::Patient`] with the `patient` claim, or [`Access::Denied`] without one.
    /// Scopes with a query suffix grant nothing.
    pub fn can_read(&self, resource_type: &str) -> Access {
        self.access(resource_type, |scope| scope.read)
    }

    /// Search access (`GET [type]?…`) to `resource_type`: v1 `.read`/`.*`, v2 `s`; otherwise
    /// as [`Grant::can_read`].
    pub fn can_search(&self, resource_type: &str) -> Access {
        self.access(resource_type, |scope| scope.search)
    }

    /// Whether the token holds the admin scope (default `hl7gw/admin`).
    pub fn is_admin(&self) -> bool {
        self.admin
    }
}

/// The `/.well-known/smart-configuration` document (SMART App Launch 2.0) describing the
/// configured issuer.
///
/// Always: `issuer`, `grant_types_supported`, `scopes_supported`, `capabilities`,
/// `code_challenge_methods_supported` and `token_endpoint_auth_methods_supported` (empty when
/// nothing applies). `jwks_uri` with `jwks_url`; `token_endpoint` (with `client_credentials`,
/// `private_key_jwt`, `client-confidential-asymmetric`) and `authorization_endpoint` (with
/// `authorization_code`, `S256`, `launch-standalone`, `context-standalone-patient`) when
/// configured. Configured `capabilities` replace the derived ones.
pub fn smart_configuration(settings: &Settings) -> Value {
    let mut grant_types = Vec::new();
    let mut capabilities = vec!["permission-v1", "permission-v2", "permission-patient", "permission-user"];
    let mut auth_methods = Vec::new();
    let mut challenge_methods = Vec::new();
    let mut document = Map::new();
    document.insert("issuer".to_string(), Value::from(settings.issuer.as_str()));
    if let JwksSource::Url(url) = &settings.jwks {
        document.insert("jwks_uri".to_string(), Value::from(url.as_str()));
    }
    if let Some(url) = &settings.authorization_endpoint {
        document.insert("authorization_endpoint".to_string(), Value::from(url.as_str()));
        grant_types.push("authorization_code");
        capabilities.extend(["launch-standalone", "context-standalone-patient"]);
        challenge_methods.push("S256");
        document.insert("response_types_supported".to_string(), json!(["code"]));
    }
    if let Some(url) = &settings.token_endpoint {
        document.insert("token_endpoint".to_string(), Value::from(url.as_str()));
        grant_types.push("client_credentials");
        capabilities.push("client-confidential-asymmetric");
        auth_methods.push("private_key_jwt");
        document.insert("token_endpoint_auth_signing_alg_values_supported".to_string(), json!(["RS384", "ES384"]));
    }
    let capabilities = match &settings.capabilities {
        Some(configured) => json!(configured),
        None => json!(capabilities),
    };
    document.insert("grant_types_supported".to_string(), json!(grant_types));
    document.insert("token_endpoint_auth_methods_supported".to_string(), json!(auth_methods));
    document.insert(
        "scopes_supported".to_string(),
        json!([
            "openid",
            "fhirUser",
            "launch/patient",
            "offline_access",
            "patient/*.rs",
            "user/*.rs",
            "system/*.rs",
            "patient/*.read",
            "user/*.read",
            "system/*.read",
            settings.admin_scope,
        ]),
    );
    document.insert("capabilities".to_string(), capabilities);
    document.insert("code_challenge_methods_supported".to_string(), json!(challenge_methods));
    Value::Object(document)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use jsonwebtoken::{EncodingKey, Header};
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    const ISSUER: &str = "https://idp.example.org";
    const AUDIENCE: &str = "https://gateway.example.org/fhir";

    fn base64url(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            }
        }
        out
    }

    /// A signing key and its public JWK.
    struct Signer {
        kid: String,
        algorithm: Algorithm,
        encoding: EncodingKey,
        jwk: Value,
    }

    fn ec_signer(kid: &str, algorithm: Algorithm) -> Signer {
        let (curve, crv, size) = match algorithm {
            Algorithm::ES256 => (&rcgen::PKCS_ECDSA_P256_SHA256, "P-256", 32),
            _ => (&rcgen::PKCS_ECDSA_P384_SHA384, "P-384", 48),
        };
        let pair = rcgen::KeyPair::generate_for(curve).unwrap();
        let raw = pair.public_key_raw();
        assert_eq!(raw.len(), 1 + 2 * size);
        assert_eq!(raw[0], 4);
        let jwk = json!({
            "kty": "EC", "crv": crv, "kid": kid, "use": "sig",
            "x": base64url(&raw[1..1 + size]), "y": base64url(&raw[1 + size..]),
        });
        Signer {
            kid: kid.to_string(),
            algorithm,
            encoding: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
            jwk,
        }
    }

    fn rsa_signer(algorithm: Algorithm) -> Signer {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/auth");
        let pem = std::fs::read(format!("{dir}/rsa-test-key.pem")).unwrap();
        let jwk: Value = serde_json::from_slice(&std::fs::read(format!("{dir}/rsa-test-jwk.json")).unwrap()).unwrap();
        Signer {
            kid: jwk["kid"].as_str().unwrap().to_string(),
            algorithm,
            encoding: EncodingKey::from_rsa_pem(&pem).unwrap(),
            jwk,
        }
    }

    fn jwks(signers: &[&Signer]) -> String {
        json!({ "keys": signers.iter().map(|signer| signer.jwk.clone()).collect::<Vec<_>>() }).to_string()
    }

    fn now() -> i64 {
        jsonwebtoken::get_current_timestamp() as i64
    }

    fn claims() -> Value {
        json!({
            "iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "client_id": "app-1",
            "exp": now() + 300, "iat": now(), "scope": "patient/Observation.rs", "patient": "p-1",
        })
    }

    fn sign(signer: &Signer, claims: &Value) -> String {
        sign_as(signer, signer.algorithm, Some(&signer.kid), claims)
    }

    fn sign_as(signer: &Signer, algorithm: Algorithm, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(algorithm);
        header.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&header, claims, &signer.encoding).unwrap()
    }

    fn config() -> Config {
        Config {
            issuer: ISSUER.to_string(),
            audience: AUDIENCE.to_string(),
            jwks_file: Some(PathBuf::from("/etc/hl7gw/jwks.json")),
            jwks_url: None,
            jwks_ca_file: None,
            clock_skew_seconds: None,
            admin_scope: None,
            token_endpoint: None,
            authorization_endpoint: None,
            capabilities: None,
        }
    }

    /// A verifier reading the key set from a temporary file.
    async fn file_verifier(jwks: &str, skew: Option<u64>) -> (Verifier, tempfile::NamedTempFile) {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), jwks).unwrap();
        let mut config = config();
        config.jwks_file = Some(file.path().to_path_buf());
        config.clock_skew_seconds = skew;
        let verifier = Verifier::load(&config.validate().unwrap()).await.unwrap();
        (verifier, file)
    }

    fn invalid(result: Result<Grant, AuthError>) -> String {
        match result {
            Err(AuthError::Invalid(reason)) => reason,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn accepts_es256_and_es384_tokens() {
        let es256 = ec_signer("k256", Algorithm::ES256);
        let es384 = ec_signer("k384", Algorithm::ES384);
        let (verifier, _file) = file_verifier(&jwks(&[&es256, &es384]), None).await;
        for signer in [&es256, &es384] {
            let grant = verifier.verify(&sign(signer, &claims())).await.unwrap();
            assert_eq!(grant.subject.as_deref(), Some("user-1"));
            assert_eq!(grant.client_id.as_deref(), Some("app-1"));
            assert_eq!(grant.patient.as_deref(), Some("p-1"));
            assert_eq!(grant.can_read("Observation"), Access::Patient("p-1".to_string()));
            assert!(!grant.is_admin());
        }
        // Without a kid every key of the right type is tried.
        let grant = verifier.verify(&sign_as(&es384, Algorithm::ES384, None, &claims())).await.unwrap();
        assert_eq!(grant.subject.as_deref(), Some("user-1"));
    }

    #[tokio::test]
    async fn accepts_rsa_tokens_from_the_fixture_key() {
        let es256 = ec_signer("k256", Algorithm::ES256);
        let rs256 = rsa_signer(Algorithm::RS256);
        let (verifier, _file) = file_verifier(&jwks(&[&es256, &rs256]), None).await;
        for algorithm in [Algorithm::RS256, Algorithm::RS384, Algorithm::RS512, Algorithm::PS256] {
            let token = sign_as(&rs256, algorithm, Some("rsa-test"), &claims());
            verifier.verify(&token).await.unwrap_or_else(|error| panic!("{algorithm:?}: {error}"));
        }
        // An RSA algorithm with the kid of an EC key: refused without trying.
        let token = sign_as(&rs256, Algorithm::RS256, Some("k256"), &claims());
        assert_eq!(invalid(verifier.verify(&token).await), "algorithm does not fit the key");
    }

    #[tokio::test]
    async fn a_jwk_alg_restricts_the_key() {
        let mut rs = rsa_signer(Algorithm::RS256);
        rs.jwk["alg"] = json!("RS256");
        let (verifier, _file) = file_verifier(&jwks(&[&rs]), None).await;
        verifier.verify(&sign(&rs, &claims())).await.unwrap();
        let token = sign_as(&rs, Algorithm::PS256, Some("rsa-test"), &claims());
        assert!(matches!(verifier.verify(&token).await, Err(AuthError::Invalid(_))));
    }

    #[tokio::test]
    async fn rejects_wrong_issuer_audience_and_missing_claims() {
        let signer = ec_signer("k", Algorithm::ES256);
        let (verifier, _file) = file_verifier(&jwks(&[&signer]), None).await;
        let mut wrong = claims();
        wrong["iss"] = json!("https://evil.example.org");
        assert_eq!(invalid(verifier.verify(&sign(&signer, &wrong)).await), "wrong issuer");
        let mut wrong = claims();
        wrong["aud"] = json!("https://other.example.org/fhir");
        assert_eq!(invalid(verifier.verify(&sign(&signer, &wrong)).await), "wrong audience");
        for claim in ["exp", "iss", "aud"] {
            let mut missing = claims();
            missing.as_object_mut().unwrap().remove(claim);
            assert_eq!(invalid(verifier.verify(&sign(&signer, &missing)).await), format!("token has no {claim} claim"));
        }
        let mut malformed = claims();
        malformed["exp"] = json!("tomorrow");
        assert_eq!(invalid(verifier.verify(&sign(&signer, &malformed)).await), "token has no exp claim");
    }

    #[tokio::test]
    async fn accepts_an_audience_array_containing_ours() {
        let signer = ec_signer("k", Algorithm::ES256);
        let (verifier, _file) = file_verifier(&jwks(&[&signer]), None).await;
        let mut array = claims();
        array["aud"] = json!(["https://other.example.org", AUDIENCE]);
        verifier.verify(&sign(&signer, &array)).await.unwrap();
        array["aud"] = json!(["https://other.example.org"]);
        assert_eq!(invalid(verifier.verify(&sign(&signer, &array)).await), "wrong audience");
    }

    #[tokio::test]
    async fn checks_exp_and_nbf_with_clock_skew() {
        let signer = ec_signer("k", Algorithm::ES256);
        let (verifier, _file) = file_verifier(&jwks(&[&signer]), Some(60)).await;
        let (strict, _strict_file) = file_verifier(&jwks(&[&signer]), Some(0)).await;
        let mut recent = claims();
        recent["exp"] = json!(now() - 30);
        verifier.verify(&sign(&signer, &recent)).await.unwrap();
        assert!(matches!(strict.verify(&sign(&signer, &recent)).await, Err(AuthError::Expired)));
        let mut expired = claims();
        expired["exp"] = json!(now() - 120);
        let error = verifier.verify(&sign(&signer, &expired)).await.unwrap_err();
        assert!(matches!(error, AuthError::Expired));
        assert_eq!(error.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(error.www_authenticate(), r#"Bearer error="invalid_token", error_description="token expired""#);

        let mut soon = claims();
        soon["nbf"] = json!(now() + 30);
        verifier.verify(&sign(&signer, &soon)).await.unwrap();
        assert_eq!(invalid(strict.verify(&sign(&signer, &soon)).await), "token is not valid yet (nbf)");
        let mut later = claims();
        later["nbf"] = json!(now() + 120);
        assert_eq!(invalid(verifier.verify(&sign(&signer, &later)).await), "token is not valid yet (nbf)");
    }

    #[tokio::test]
    async fn rejects_none_and_hmac_algorithms() {
        let signer = ec_signer("k", Algorithm::ES256);
        // An HMAC secret published in the set must not make HS256 acceptable.
        let secret = b"0123456789abcdef0123456789abcdef";
        let mut set: Value = serde_json::from_str(&jwks(&[&signer])).unwrap();
        set["keys"].as_array_mut().unwrap().push(json!({ "kty": "oct", "kid": "hmac", "k": base64url(secret) }));
        let (verifier, _file) = file_verifier(&set.to_string(), None).await;

        let header = base64url(br#"{"alg":"none","typ":"JWT","kid":"k"}"#);
        let body = base64url(claims().to_string().as_bytes());
        for token in [format!("{header}.{body}."), format!("{header}.{body}")] {
            assert!(matches!(verifier.verify(&token).await, Err(AuthError::Invalid(_))), "{token}");
        }
        let hmac = EncodingKey::from_secret(secret).unwrap();
        for kid in ["k", "hmac"] {
            let mut header = Header::new(Algorithm::HS256);
            header.kid = Some(kid.to_string());
            let token = jsonwebtoken::encode(&header, &claims(), &hmac).unwrap();
            assert_eq!(invalid(verifier.verify(&token).await), "algorithm HS256 is not accepted");
        }
    }

    #[tokio::test]
    async fn rejects_tampered_signatures_and_unknown_keys() {
        let signer = ec_signer("k", Algorithm::ES256);
        let stranger = ec_signer("k", Algorithm::ES256);
        let (verifier, _file) = file_verifier(&jwks(&[&signer]), None).await;
        let token = sign(&signer, &claims());
        let (message, signature) = token.rsplit_once('.').unwrap();
        let mut bytes = signature.as_bytes().to_vec();
        bytes[5] = if bytes[5] == b'A' { b'B' } else { b'A' };
        let tampered = format!("{message}.{}", String::from_utf8(bytes).unwrap());
        assert_eq!(invalid(verifier.verify(&tampered).await), "signature does not verify");
        // Claims changed under the original signature.
        let mut raised = claims();
        raised["scope"] = json!("system/*.*");
        let forged = sign(&signer, &raised);
        let forged = format!("{}.{signature}", forged.rsplit_once('.').unwrap().0);
        assert_eq!(invalid(verifier.verify(&forged).await), "signature does not verify");
        // Same kid, other key.
        assert_eq!(invalid(verifier.verify(&sign(&stranger, &claims())).await), "signature does not verify");
        let unknown = sign_as(&signer, Algorithm::ES256, Some("nope"), &claims());
        assert_eq!(invalid(verifier.verify(&unknown).await), "no known key signed this token");
        assert!(matches!(verifier.verify("not.a.jwt").await, Err(AuthError::Invalid(_))));
        assert!(matches!(verifier.verify("").await, Err(AuthError::Invalid(_))));
        assert!(matches!(verifier.verify(&"a".repeat(MAX_TOKEN_BYTES + 1)).await, Err(AuthError::Invalid(_))));
    }

    #[tokio::test]
    async fn reads_scope_and_scp_claims_and_the_admin_scope() {
        let signer = ec_signer("k", Algorithm::ES256);
        let (verifier, _file) = file_verifier(&jwks(&[&signer]), None).await;
        let mut scp = claims();
        scp.as_object_mut().unwrap().remove("scope");
        scp["scp"] = json!(["system/Patient.rs", "hl7gw/admin"]);
        let grant = verifier.verify(&sign(&signer, &scp)).await.unwrap();
        assert_eq!(grant.can_search("Patient"), Access::All);
        assert_eq!(grant.can_read("Observation"), Access::Denied);
        assert!(grant.is_admin());

        let mut config = config();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), jwks(&[&signer])).unwrap();
        config.jwks_file = Some(file.path().to_path_buf());
        config.admin_scope = Some("gateway.admin".to_string());
        let custom = Verifier::load(&config.validate().unwrap()).await.unwrap();
        assert!(!custom.verify(&sign(&signer, &scp)).await.unwrap().is_admin());
        let mut admin = claims();
        admin["scope"] = json!("openid gateway.admin");
        assert!(custom.verify(&sign(&signer, &admin)).await.unwrap().is_admin());
    }

    #[tokio::test]
    async fn a_malformed_patient_claim_is_no_patient() {
        let signer = ec_signer("k", Algorithm::ES256);
        let (verifier, _file) = file_verifier(&jwks(&[&signer]), None).await;
        for patient in [json!("a/b"), json!(42), json!(""), json!("x".repeat(65))] {
            let mut odd = claims();
            odd["patient"] = patient;
            let grant = verifier.verify(&sign(&signer, &odd)).await.unwrap();
            assert_eq!(grant.patient, None);
            assert_eq!(grant.can_read("Observation"), Access::Denied);
        }
    }

    #[test]
    fn scope_rules() {
        let patient = |scope: &str| Grant::from_scopes(scope, Some("p-1"));
        let p1 = Access::Patient("p-1".to_string());
        // SMART v1
        let grant = patient("openid fhirUser launch/patient patient/Observation.read");
        assert_eq!(grant.can_read("Observation"), p1);
        assert_eq!(grant.can_search("Observation"), p1);
        assert_eq!(grant.can_read("Patient"), Access::Denied);
        assert_eq!(patient("patient/*.read").can_search("Encounter"), p1);
        assert_eq!(patient("patient/*.*").can_read("Encounter"), p1);
        assert_eq!(patient("patient/Observation.*").can_read("Observation"), p1);
        assert_eq!(patient("patient/*.write").can_read("Observation"), Access::Denied);
        assert_eq!(patient("user/Observation.read").can_read("Observation"), Access::All);
        assert_eq!(patient("user/*.*").can_search("Patient"), Access::All);
        assert_eq!(patient("system/*.read").can_read("Patient"), Access::All);
        // SMART v2: r is read, s is search.
        let grant = patient("patient/Observation.rs");
        assert_eq!((grant.can_read("Observation"), grant.can_search("Observation")), (p1.clone(), p1.clone()));
        let grant = patient("patient/Observation.r");
        assert_eq!((grant.can_read("Observation"), grant.can_search("Observation")), (p1.clone(), Access::Denied));
        let grant = patient("patient/Observation.s");
        assert_eq!((grant.can_read("Observation"), grant.can_search("Observation")), (Access::Denied, p1.clone()));
        assert_eq!(patient("system/*.cruds").can_search("Patient"), Access::All);
        assert_eq!(patient("user/*.cud").can_read("Patient"), Access::Denied);
        assert_eq!(patient("patient/*.c").can_read("Patient"), Access::Denied);
        // Malformed or out-of-order permissions grant nothing.
        for scope in
            ["patient/Observation.sr", "patient/Observation.rr", "patient/Observation.", "patient/Observation.x"]
        {
            assert_eq!(patient(scope).can_read("Observation"), Access::Denied, "{scope}");
            assert_eq!(patient(scope).can_search("Observation"), Access::Denied, "{scope}");
        }
        for scope in ["observation/*.read", "patient/observation.read", "*.*", "patient/*", "Observation.read"] {
            assert_eq!(patient(scope).can_read("observation"), Access::Denied, "{scope}");
            assert_eq!(patient(scope).can_read("Observation"), Access::Denied, "{scope}");
        }
        // Query-suffixed v2 scopes cannot be enforced here: they grant nothing.
        let grant = patient("patient/Observation.rs?category=laboratory system/Observation.rs?code=http://loinc.org|1");
        assert_eq!(grant.can_read("Observation"), Access::Denied);
        assert_eq!(grant.can_search("Observation"), Access::Denied);
        // The widest scope wins.
        assert_eq!(patient("patient/*.rs user/Observation.rs").can_read("Observation"), Access::All);
        assert_eq!(patient("patient/*.rs user/Observation.rs").can_read("Patient"), p1);
        // Patient scopes without a patient context grant nothing.
        let grant = Grant::from_scopes("patient/*.read patient/Observation.rs", None);
        assert_eq!(grant.can_read("Observation"), Access::Denied);
        assert_eq!(grant.can_search("Observation"), Access::Denied);
        assert_eq!(Grant::from_scopes("system/*.rs", None).can_read("Observation"), Access::All);
        // Admin
        assert!(Grant::from_scopes("openid hl7gw/admin", None).is_admin());
        assert!(!Grant::from_scopes("system/*.cruds", None).is_admin());
        assert_eq!(Grant::from_scopes("hl7gw/admin", None).can_read("Patient"), Access::Denied);
        // Open
        let open = Grant::open();
        assert_eq!((open.can_read("Patient"), open.can_search("Observation")), (Access::All, Access::All));
        assert!(open.is_admin());
    }

    #[test]
    fn debug_output_hides_the_patient() {
        let text = format!("{:?}", Grant::from_scopes("patient/*.rs", Some("secret-patient-id")));
        assert!(!text.contains("secret-patient-id"), "{text}");
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            map.append(header::AUTHORIZATION, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn bearer_token_parsing() {
        assert_eq!(bearer_token(&headers(&["Bearer abc.def-_~+/="])).unwrap(), "abc.def-_~+/=");
        assert_eq!(bearer_token(&headers(&["bearer abc"])).unwrap(), "abc");
        assert_eq!(bearer_token(&headers(&["BEARER   abc  "])).unwrap(), "abc");
        assert!(matches!(bearer_token(&HeaderMap::new()), Err(AuthError::Missing)));
        assert!(matches!(bearer_token(&headers(&["Basic dXNlcjpwYXNz"])), Err(AuthError::Missing)));
        assert!(matches!(bearer_token(&headers(&["Bearerabc"])), Err(AuthError::Missing)));
        for malformed in [&["Bearer"][..], &["Bearer  "], &["Bearer a b"], &["Bearer a\"b"], &["Bearer a", "Bearer b"]]
        {
            let error = bearer_token(&headers(malformed)).unwrap_err();
            assert!(matches!(error, AuthError::Malformed(_)), "{malformed:?}");
            assert_eq!(error.status(), StatusCode::BAD_REQUEST);
            assert!(error.www_authenticate().starts_with(r#"Bearer error="invalid_request""#));
        }
        let mut map = HeaderMap::new();
        map.insert(header::AUTHORIZATION, axum::http::HeaderValue::from_bytes(b"Bearer \xe9t\xe9").unwrap());
        assert!(matches!(bearer_token(&map), Err(AuthError::Malformed(_))));
    }

    #[test]
    fn error_statuses_and_challenges() {
        assert_eq!(AuthError::Missing.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(AuthError::Missing.www_authenticate(), "Bearer");
        let invalid = AuthError::Invalid("wrong \"issuer\"\n".to_string());
        assert_eq!(invalid.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(invalid.www_authenticate(), r#"Bearer error="invalid_token", error_description="wrong issuer""#);
        let forbidden = AuthError::Forbidden("no scope grants read access to Observation".to_string());
        assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            forbidden.www_authenticate(),
            r#"Bearer error="insufficient_scope", error_description="no scope grants read access to Observation""#
        );
        let jwks = AuthError::Jwks("http://10.0.0.1/jwks: connection refused".to_string());
        assert_eq!(jwks.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(jwks.www_authenticate(), "Bearer");
    }

    fn invalid_key(config: &Config) -> String {
        config.validate().unwrap_err().key
    }

    #[test]
    fn config_validation() {
        let settings = config().validate().unwrap();
        assert_eq!(settings.clock_skew_seconds, DEFAULT_CLOCK_SKEW_SECONDS);
        assert_eq!(settings.admin_scope, DEFAULT_ADMIN_SCOPE);
        assert_eq!(settings.jwks, JwksSource::File(PathBuf::from("/etc/hl7gw/jwks.json")));

        let mut both = config();
        both.jwks_url = Some("https://idp.example.org/jwks".to_string());
        assert_eq!(invalid_key(&both), "auth.jwks_url");
        let mut neither = config();
        neither.jwks_file = None;
        assert_eq!(invalid_key(&neither), "auth.jwks_file");

        let with_url = |url: &str| {
            let mut config = config();
            config.jwks_file = None;
            config.jwks_url = Some(url.to_string());
            config.validate()
        };
        assert!(with_url("https://idp.example.org/jwks").is_ok());
        for loopback in ["http://127.0.0.1:8081/jwks", "http://localhost/jwks", "http://[::1]:9000/jwks"] {
            assert!(with_url(loopback).is_ok(), "{loopback}");
        }
        for bad in [
            "http://idp.example.org/jwks",
            "http://10.0.0.1/jwks",
            "ftp://idp.example.org/jwks",
            "https://user:secret@idp.example.org/jwks",
            "https://idp.example.org/jwks#x",
            "idp.example.org/jwks",
        ] {
            let error = with_url(bad).unwrap_err();
            assert_eq!(error.key, "auth.jwks_url", "{bad}");
            assert!(!error.reason.contains("secret"), "{}", error.reason);
        }

        let mut skew = config();
        skew.clock_skew_seconds = Some(MAX_CLOCK_SKEW_SECONDS + 1);
        assert_eq!(invalid_key(&skew), "auth.clock_skew_seconds");
        let mut issuer = config();
        issuer.issuer = " ".to_string();
        assert_eq!(invalid_key(&issuer), "auth.issuer");
        let mut audience = config();
        audience.audience = String::new();
        assert_eq!(invalid_key(&audience), "auth.audience");
        let mut admin = config();
        admin.admin_scope = Some("system/*.read".to_string());
        assert_eq!(invalid_key(&admin), "auth.admin_scope");
        let mut endpoint = config();
        endpoint.token_endpoint = Some("http://idp.example.org/token".to_string());
        assert_eq!(invalid_key(&endpoint), "auth.token_endpoint");
        let mut ca = config();
        ca.jwks_ca_file = Some(PathBuf::from("/etc/ca.pem"));
        assert_eq!(invalid_key(&ca), "auth.jwks_ca_file");
    }

    #[test]
    fn config_from_yaml() {
        let yaml = "issuer: https://idp.example.org\naudience: https://gateway.example.org/fhir\n\
                    jwks_url: https://idp.example.org/jwks\nclock_skew_seconds: 30\nadmin_scope: hl7gw/admin\n";
        let config: Config = serde_saphyr::from_str(yaml).unwrap();
        let settings = config.validate().unwrap();
        assert_eq!(settings.clock_skew_seconds, 30);
        assert!(matches!(settings.jwks, JwksSource::Url(_)));
        assert!(serde_saphyr::from_str::<Config>(&format!("{yaml}colour: blue\n")).is_err());
    }

    #[tokio::test]
    async fn load_fails_clearly() {
        let mut missing = config();
        missing.jwks_file = Some(PathBuf::from("/nonexistent/jwks.json"));
        let error = Verifier::load(&missing.validate().unwrap()).await.unwrap_err();
        assert!(matches!(&error, AuthError::Jwks(reason) if reason.contains("/nonexistent/jwks.json")), "{error}");
        assert_eq!(error.status(), StatusCode::SERVICE_UNAVAILABLE);

        let file = tempfile::NamedTempFile::new().unwrap();
        for (document, expected) in [
            ("{", "not JSON"),
            ("{\"kid\": 1}", "no `keys` array"),
            (
                r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"},{"kty":"RSA","use":"enc","n":"AQAB","e":"AQAB"}]}"#,
                "none of its 2",
            ),
        ] {
            std::fs::write(file.path(), document).unwrap();
            let mut config = config();
            config.jwks_file = Some(file.path().to_path_buf());
            let error = Verifier::load(&config.validate().unwrap()).await.unwrap_err();
            assert!(error.to_string().contains(expected), "{error}");
        }

        // Nothing listens on the port of a listener just closed.
        let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
        let mut config = config();
        config.jwks_file = None;
        config.jwks_url = Some(format!("http://127.0.0.1:{port}/jwks"));
        let error = Verifier::load(&config.validate().unwrap()).await.unwrap_err();
        assert!(matches!(error, AuthError::Jwks(_)), "{error}");
    }

    /// A tiny HTTP server answering every request with the current body.
    struct JwksServer {
        url: String,
        body: Arc<Mutex<(u16, String)>>,
        hits: Arc<AtomicUsize>,
    }

    impl JwksServer {
        async fn start(body: String, tls: Option<tokio_rustls::TlsAcceptor>) -> JwksServer {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let scheme = if tls.is_some() { "https" } else { "http" };
            let url = format!("{scheme}://127.0.0.1:{}/jwks", listener.local_addr().unwrap().port());
            let body = Arc::new(Mutex::new((200, body)));
            let hits = Arc::new(AtomicUsize::new(0));
            let (served, counted) = (Arc::clone(&body), Arc::clone(&hits));
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (body, hits, tls) = (Arc::clone(&served), Arc::clone(&counted), tls.clone());
                    tokio::spawn(async move {
                        match tls {
                            Some(acceptor) => {
                                if let Ok(stream) = acceptor.accept(stream).await {
                                    respond(stream, &body, &hits).await;
                                }
                            }
                            None => respond(stream, &body, &hits).await,
                        }
                    });
                }
            });
            JwksServer { url, body, hits }
        }

        fn serve(&self, status: u16, body: String) {
            *self.body.lock().unwrap() = (status, body);
        }

        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }

        fn config(&self) -> Config {
            let mut config = config();
            config.jwks_file = None;
            config.jwks_url = Some(self.url.clone());
            config
        }
    }

    async fn respond<S: AsyncRead + AsyncWrite + Unpin>(
        mut stream: S,
        body: &Mutex<(u16, String)>,
        hits: &AtomicUsize,
    ) {
        let mut request = Vec::new();
        let mut buffer = [0u8; 1024];
        while !request.windows(4).any(|window| window == b"\r\n\r\n") {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&buffer[..n]),
            }
        }
        hits.fetch_add(1, Ordering::SeqCst);
        let (status, body) = body.lock().unwrap().clone();
        let response = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    }

    #[tokio::test]
    async fn fetches_the_key_set_from_a_url_and_refetches_for_unknown_kids() {
        let old = ec_signer("old", Algorithm::ES256);
        let new = ec_signer("new", Algorithm::ES384);
        let server = JwksServer::start(jwks(&[&old]), None).await;
        let mut settings = server.config().validate().unwrap();
        settings.refetch_interval = Duration::ZERO;
        let verifier = Verifier::load(&settings).await.unwrap();
        assert_eq!(server.hits(), 1);
        verifier.verify(&sign(&old, &claims())).await.unwrap();
        assert_eq!(server.hits(), 1, "a known kid needs no fetch");

        // The issuer rotates its keys: the unknown kid makes the verifier fetch them again.
        server.serve(200, jwks(&[&new]));
        verifier.verify(&sign(&new, &claims())).await.unwrap();
        assert_eq!(server.hits(), 2);
        let error = verifier.verify(&sign(&old, &claims())).await.unwrap_err();
        assert!(matches!(error, AuthError::Invalid(_)), "{error}");
        assert_eq!(server.hits(), 3);

        // The key set cannot be fetched: keys unavailable, and the known keys keep working.
        server.serve(500, "oops".to_string());
        let error = verifier.verify(&sign(&old, &claims())).await.unwrap_err();
        assert!(matches!(&error, AuthError::Jwks(reason) if reason.contains("500")), "{error}");
        verifier.verify(&sign(&new, &claims())).await.unwrap();
    }

    #[tokio::test]
    async fn refetches_at_most_once_per_interval() {
        let old = ec_signer("old", Algorithm::ES256);
        let new = ec_signer("new", Algorithm::ES256);
        let server = JwksServer::start(jwks(&[&old]), None).await;
        let verifier = Verifier::load(&server.config().validate().unwrap()).await.unwrap();
        server.serve(200, jwks(&[&old, &new]));
        for _ in 0..3 {
            let unknown = sign_as(&new, Algorithm::ES256, Some("new"), &claims());
            assert_eq!(invalid(verifier.verify(&unknown).await), "no known key signed this token");
        }
        assert_eq!(server.hits(), 1, "the load was less than 30 s ago");
    }

    #[tokio::test]
    async fn fetches_over_https_with_a_configured_ca() {
        let signer = ec_signer("k", Algorithm::ES256);
        let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der()).unwrap();
        let server_config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![certified.cert.der().clone()], key)
                .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        let server = JwksServer::start(jwks(&[&signer]), Some(acceptor)).await;
        let ca = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(ca.path(), certified.cert.pem()).unwrap();
        let mut config = server.config();
        config.jwks_ca_file = Some(ca.path().to_path_buf());
        let verifier = Verifier::load(&config.validate().unwrap()).await.unwrap();
        verifier.verify(&sign(&signer, &claims())).await.unwrap();

        // Without the CA the self-signed certificate is refused.
        let error = Verifier::load(&server.config().validate().unwrap()).await.unwrap_err();
        assert!(matches!(error, AuthError::Jwks(_)), "{error}");
    }

    #[test]
    fn smart_configuration_document() {
        let mut config = config();
        config.jwks_file = None;
        config.jwks_url = Some("https://idp.example.org/jwks".to_string());
        let minimal = smart_configuration(&config.validate().unwrap());
        assert_eq!(minimal["issuer"], ISSUER);
        assert_eq!(minimal["jwks_uri"], "https://idp.example.org/jwks");
        assert!(minimal.get("token_endpoint").is_none());
        assert!(minimal.get("authorization_endpoint").is_none());
        assert_eq!(minimal["code_challenge_methods_supported"], json!([]));
        assert_eq!(
            minimal["capabilities"],
            json!(["permission-v1", "permission-v2", "permission-patient", "permission-user"])
        );
        assert!(minimal["scopes_supported"].as_array().unwrap().contains(&json!("hl7gw/admin")));

        config.token_endpoint = Some("https://idp.example.org/token".to_string());
        config.authorization_endpoint = Some("https://idp.example.org/authorize".to_string());
        let full = smart_configuration(&config.validate().unwrap());
        assert_eq!(full["token_endpoint"], "https://idp.example.org/token");
        assert_eq!(full["authorization_endpoint"], "https://idp.example.org/authorize");
        assert_eq!(full["grant_types_supported"], json!(["authorization_code", "client_credentials"]));
        assert_eq!(full["code_challenge_methods_supported"], json!(["S256"]));
        assert_eq!(full["token_endpoint_auth_methods_supported"], json!(["private_key_jwt"]));
        let capabilities = full["capabilities"].as_array().unwrap();
        for capability in
            ["client-confidential-asymmetric", "context-standalone-patient", "launch-standalone", "permission-v2"]
        {
            assert!(capabilities.contains(&json!(capability)), "{capability}");
        }

        config.capabilities = Some(vec!["permission-v2".to_string()]);
        assert_eq!(smart_configuration(&config.validate().unwrap())["capabilities"], json!(["permission-v2"]));
        let from_file = smart_configuration(&super::tests::config().validate().unwrap());
        assert!(from_file.get("jwks_uri").is_none());
    }
}
