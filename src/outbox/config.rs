//! The `aggregator:` section of the configuration file and its validation (pure: no files,
//! sockets or database; secrets are read when the worker is built).

use std::path::PathBuf;
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;

use crate::setting::Invalid;

/// How Bundles are grouped for ordering: one ordered queue per patient or per sender.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OrderBy {
    /// The Patient the Bundle is about (else its sender).
    #[default]
    Patient,
    /// The sender, MSH-3^MSH-4.
    Sender,
}

/// The `aggregator` section: where and how transaction Bundles are pushed.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Base URL of the aggregator's FHIR endpoint (transactions are POSTed to it). https
    /// is required unless the host is loopback.
    pub endpoint: String,
    /// Ordering unit: `patient` (default) or `sender`.
    #[serde(default)]
    pub order_by: OrderBy,
    /// Partitions delivered in parallel.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Most messages of one partition merged into one Bundle when it has a backlog.
    #[serde(default = "default_max_bundle_messages")]
    pub max_bundle_messages: usize,
    /// Timeout of one POST, in seconds.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// Backoff of retries.
    #[serde(default)]
    pub retry: RetryConfig,
    /// `/health/ready` reports degraded when the oldest undelivered Bundle is older.
    #[serde(default = "default_degraded_after_secs")]
    pub degraded_after_secs: u64,
    /// Delivered rows are deleted after this many hours.
    #[serde(default = "default_retention_hours")]
    pub retention_hours: u64,
    /// How the gateway authenticates to the aggregator; absent = no auth.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// Custom CA bundle and client certificate (mutual TLS).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

fn default_max_in_flight() -> usize {
    8
}
fn default_max_bundle_messages() -> usize {
    20
}
fn default_timeout_secs() -> u64 {
    30
}
fn default_degraded_after_secs() -> u64 {
    300
}
fn default_retention_hours() -> u64 {
    7 * 24
}

/// `aggregator.retry`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// First retry delay, in milliseconds; doubled on each further attempt.
    #[serde(default = "default_initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    /// Longest delay between attempts, in seconds.
    #[serde(default = "default_max_backoff_secs")]
    pub max_backoff_secs: u64,
}

fn default_initial_backoff_ms() -> u64 {
    500
}
fn default_max_backoff_secs() -> u64 {
    300
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig { initial_backoff_ms: default_initial_backoff_ms(), max_backoff_secs: default_max_backoff_secs() }
    }
}

/// `aggregator.auth`: exactly one of the keys.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// File holding a static bearer token.
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
    /// Environment variable holding a static bearer token.
    #[serde(default)]
    pub bearer_token_env: Option<String>,
    /// SMART Backend Services (client credentials with a signed JWT assertion).
    #[serde(default)]
    pub smart: Option<SmartConfig>,
}

/// Signing algorithm of the SMART client assertion.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum SmartAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// ECDSA P-384 with SHA-384.
    ES384,
}

/// `aggregator.auth.smart`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmartConfig {
    /// The authorization server's token endpoint.
    pub token_url: String,
    /// Client id registered with the authorization server.
    pub client_id: String,
    /// PEM private key (PKCS#8, or PKCS#1/SEC1) that signs the assertion.
    pub private_key_file: PathBuf,
    /// RS384 or ES384.
    pub algorithm: SmartAlgorithm,
    /// Scopes requested, e.g. `system/*.write`.
    #[serde(default = "default_scope")]
    pub scope: String,
    /// `kid` of the key in the JWKS the client registered.
    #[serde(default)]
    pub key_id: Option<String>,
}

fn default_scope() -> String {
    "system/*.write".to_string()
}

/// `aggregator.tls`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM CAs to trust instead of the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain (mutual TLS).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM client private key (mutual TLS).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// Validated authentication settings.
#[derive(Clone, Debug)]
pub enum AuthSettings {
    /// No `Authorization` header.
    None,
    /// A static token read from this file at start.
    BearerFile(PathBuf),
    /// A static token read from this environment variable at start.
    BearerEnv(String),
    /// SMART Backend Services.
    Smart(SmartSettings),
}

/// Validated SMART settings.
#[derive(Clone, Debug)]
pub struct SmartSettings {
    /// Token endpoint (also the assertion's `aud`).
    pub token_url: Url,
    /// `iss` and `sub` of the assertion, `client_id` of the request.
    pub client_id: String,
    /// Signing key file.
    pub private_key_file: PathBuf,
    /// Signing algorithm.
    pub algorithm: SmartAlgorithm,
    /// Scopes requested.
    pub scope: String,
    /// `kid` header of the assertion.
    pub key_id: Option<String>,
}

/// The validated `aggregator` section.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where Bundles are POSTed.
    pub endpoint: Url,
    /// Partitioning.
    pub order_by: OrderBy,
    /// Parallel partitions.
    pub max_in_flight: usize,
    /// Messages merged into one Bundle at most.
    pub max_bundle_messages: usize,
    /// Timeout of one request.
    pub timeout: Duration,
    /// First retry delay.
    pub initial_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// Readiness threshold on the oldest undelivered Bundle.
    pub degraded_after: Duration,
    /// How long delivered rows are kept.
    pub retention: Duration,
    /// Authentication.
    pub auth: AuthSettings,
    /// TLS files.
    pub tls: TlsConfig,
}

/// Parses an https URL for `key`; plain http only for a loopback host.
fn https_url(key: &str, value: &str) -> Result<Url, Invalid> {
    let url = Url::parse(value).map_err(|error| Invalid::new(key, format!("not a URL: {error}")))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Invalid::new(key, "must not carry a user name or password"));
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        "http" => Err(Invalid::new(key, "must use https (plain http only for localhost, 127.0.0.0/8 or [::1])")),
        other => Err(Invalid::new(key, format!("scheme `{other}` is not https"))),
    }
}

/// True for `localhost`, 127.0.0.0/8 and `[::1]`.
pub fn is_loopback(url: &Url) -> bool {
    match url.host_str() {
        Some(host) if host.eq_ignore_ascii_case("localhost") => true,
        Some(host) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

impl Config {
    /// A section with only the endpoint set and every default.
    pub fn new(endpoint: impl Into<String>) -> Config {
        Config {
            endpoint: endpoint.into(),
            order_by: OrderBy::default(),
            max_in_flight: default_max_in_flight(),
            max_bundle_messages: default_max_bundle_messages(),
            timeout_secs: default_timeout_secs(),
            retry: RetryConfig::default(),
            degraded_after_secs: default_degraded_after_secs(),
            retention_hours: default_retention_hours(),
            auth: None,
            tls: None,
        }
    }

    /// Checks the section without touching files or sockets.
    pub fn validate(&self) -> Result<Settings, Invalid> {
        let endpoint = https_url("aggregator.endpoint", &self.endpoint)?;
        if !(1..=256).contains(&self.max_in_flight) {
            return Err(Invalid::new("aggregator.max_in_flight", "must be between 1 and 256"));
        }
        if !(1..=1000).contains(&self.max_bundle_messages) {
            return Err(Invalid::new("aggregator.max_bundle_messages", "must be between 1 and 1000"));
        }
        if self.timeout_secs == 0 {
            return Err(Invalid::new("aggregator.timeout_secs", "must be at least 1"));
        }
        if self.retry.initial_backoff_ms == 0 {
            return Err(Invalid::new("aggregator.retry.initial_backoff_ms", "must be at least 1"));
        }
        if self.retry.max_backoff_secs == 0 || self.retry.max_backoff_secs * 1000 < self.retry.initial_backoff_ms {
            return Err(Invalid::new(
                "aggregator.retry.max_backoff_secs",
                "must be at least 1 and not below initial_backoff_ms",
            ));
        }
        if self.degraded_after_secs == 0 {
            return Err(Invalid::new("aggregator.degraded_after_secs", "must be at least 1"));
        }
        let auth = match &self.auth {
            None => AuthSettings::None,
            Some(auth) => validate_auth(auth)?,
        };
        let tls = self.tls.clone().unwrap_or_default();
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            return Err(Invalid::new("aggregator.tls", "cert_file and key_file go together"));
        }
        Ok(Settings {
            endpoint,
            order_by: self.order_by,
            max_in_flight: self.max_in_flight,
            max_bundle_messages: self.max_bundle_messages,
            timeout: Duration::from_secs(self.timeout_secs),
            initial_backoff: Duration::from_millis(self.retry.initial_backoff_ms),
            max_backoff: Duration::from_secs(self.retry.max_backoff_secs),
            degraded_after: Duration::from_secs(self.degraded_after_secs),
            retention: Duration::from_secs(self.retention_hours.saturating_mul(3600)),
            auth,
            tls,
        })
    }
}

fn validate_auth(auth: &AuthConfig) -> Result<AuthSettings, Invalid> {
    let chosen = [auth.bearer_token_file.is_some(), auth.bearer_token_env.is_some(), auth.smart.is_some()]
        .iter()
        .filter(|set| **set)
        .count();
    if chosen != 1 {
        return Err(Invalid::new("aggregator.auth", "set exactly one of bearer_token_file, bearer_token_env or smart"));
    }
    if let Some(file) = &auth.bearer_token_file {
        return Ok(AuthSettings::BearerFile(file.clone()));
    }
    if let Some(variable) = &auth.bearer_token_env {
        if variable.is_empty() {
            return Err(Invalid::new("aggregator.auth.bearer_token_env", "must name a variable"));
        }
        return Ok(AuthSettings::BearerEnv(variable.clone()));
    }
    let Some(smart) = &auth.smart else {
        return Ok(AuthSettings::None);
    };
    if smart.client_id.is_empty() {
        return Err(Invalid::new("aggregator.auth.smart.client_id", "must not be empty"));
    }
    Ok(AuthSettings::Smart(SmartSettings {
        token_url: https_url("aggregator.auth.smart.token_url", &smart.token_url)?,
        client_id: smart.client_id.clone(),
        private_key_file: smart.private_key_file.clone(),
        algorithm: smart.algorithm,
        scope: smart.scope.clone(),
        key_id: smart.key_id.clone(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_is_required_off_loopback() {
        assert!(Config::new("https://central.example.org/fhir").validate().is_ok());
        assert!(Config::new("http://127.0.0.1:9000/fhir").validate().is_ok());
        assert!(Config::new("http://localhost/fhir").validate().is_ok());
        let error = Config::new("http://central.example.org/fhir").validate().unwrap_err();
        assert_eq!(error.key, "aggregator.endpoint");
    }

    #[test]
    fn defaults_and_auth_choice() {
        let settings = Config::new("https://a.example/fhir").validate().unwrap();
        assert_eq!(settings.order_by, OrderBy::Patient);
        assert_eq!((settings.max_in_flight, settings.max_bundle_messages), (8, 20));
        assert_eq!(settings.degraded_after, Duration::from_secs(300));
        let mut config = Config::new("https://a.example/fhir");
        config.auth = Some(AuthConfig {
            bearer_token_env: Some("TOKEN".into()),
            bearer_token_file: Some("/x".into()),
            smart: None,
        });
        assert_eq!(config.validate().unwrap_err().key, "aggregator.auth");
        config.auth = Some(AuthConfig { bearer_token_env: Some("TOKEN".into()), ..AuthConfig::default() });
        assert!(matches!(config.validate().unwrap().auth, AuthSettings::BearerEnv(_)));
    }

    #[test]
    fn parses_yaml() {
        let text = "endpoint: https://a.example/fhir\norder_by: sender\nretry:\n  initial_backoff_ms: 100\n\
                    auth:\n  smart:\n    token_url: https://a.example/token\n    client_id: gw\n    \
                    private_key_file: /k.pem\n    algorithm: ES384\n";
        let config: Config = serde_saphyr::from_str(text).unwrap();
        let settings = config.validate().unwrap();
        assert_eq!(settings.order_by, OrderBy::Sender);
        assert_eq!(settings.initial_backoff, Duration::from_millis(100));
        assert!(matches!(settings.auth, AuthSettings::Smart(SmartSettings { algorithm: SmartAlgorithm::ES384, .. })));
    }
}
