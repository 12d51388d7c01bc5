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
