//! TEMPORARY stub of the auth interface (replaced by the real module before merge).
#![allow(missing_docs, dead_code)]
use std::path::PathBuf;
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub issuer: String,
    pub audience: String,
    pub jwks_file: Option<PathBuf>,
    pub jwks_url: Option<String>,
    #[serde(default)]
    pub clock_skew_seconds: Option<u64>,
    #[serde(default)]
    pub admin_scope: Option<String>,
}
impl Config {
    pub fn validate(&self) -> Result<Settings, crate::setting::Invalid> {
        Ok(Settings {})
    }
}
#[derive(Clone, Debug)]
pub struct Settings {}
pub struct Verifier {}
impl Verifier {
    pub async fn load(_settings: &Settings) -> Result<Verifier, AuthError> {
        Ok(Verifier {})
    }
    pub async fn verify(&self, _token: &str) -> Result<Grant, AuthError> {
        Err(AuthError::Missing)
    }
}
pub fn bearer_token(_headers: &axum::http::HeaderMap) -> Result<&str, AuthError> {
    Err(AuthError::Missing)
}
#[derive(Clone, Debug)]
pub struct Grant {
    pub subject: Option<String>,
    pub client_id: Option<String>,
    pub patient: Option<String>,
}
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    Denied,
    All,
    Patient(String),
}
impl Grant {
    pub fn can_read(&self, _t: &str) -> Access {
        Access::All
    }
    pub fn can_search(&self, _t: &str) -> Access {
        Access::All
    }
    pub fn is_admin(&self) -> bool {
        true
    }
    pub fn open() -> Grant {
        Grant { subject: None, client_id: None, patient: None }
    }
}
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing")]
    Missing,
    #[error("forbidden {0}")]
    Forbidden(String),
}
impl AuthError {
    pub fn status(&self) -> axum::http::StatusCode {
        axum::http::StatusCode::UNAUTHORIZED
    }
    pub fn www_authenticate(&self) -> String {
        String::new()
    }
}
pub fn smart_configuration(_settings: &Settings) -> serde_json::Value {
    serde_json::Value::Null
}
