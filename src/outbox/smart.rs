//! SMART Backend Services: the client_credentials grant with a `private_key_jwt` client
//! assertion (RS384 or ES384), and the token cache (renewed shortly before expiry, and at
//! once after a 401).

use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use super::config::{SmartAlgorithm, SmartSettings};
use super::Error;

/// Lifetime of a client assertion (the spec allows at most five minutes).
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(300);
/// Largest token response read.
const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;

/// A token and when to stop using it.
#[derive(Clone)]
struct Cached {
    token: String,
    renew_at: Instant,
}

/// Obtains and caches access tokens.
pub struct Smart {
    settings: SmartSettings,
    key: EncodingKey,
    cached: tokio::sync::Mutex<Option<Cached>>,
}

impl std::fmt::Debug for Smart {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Smart").field("token_url", &self.settings.token_url.as_str()).finish_non_exhaustive()
    }
}

fn random_hex() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut text = String::new();
    for part in 0..2u64 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(part);
        hasher
            .write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
        text.push_str(&format!("{:016x}", hasher.finish()));
    }
    text
}

/// The claims of a client assertion: iss = sub = client_id, aud = token URL, a fresh jti,
/// exp five minutes ahead.
pub fn assertion_claims(settings: &SmartSettings, now_secs: u64) -> Value {
    json!({
        "iss": settings.client_id,
        "sub": settings.client_id,
        "aud": settings.token_url.as_str(),
        "jti": random_hex(),
        "iat": now_secs,
        "exp": now_secs + ASSERTION_LIFETIME.as_secs(),
    })
}

impl Smart {
    /// Reads the signing key.
    pub fn load(settings: &SmartSettings) -> Result<Smart, Error> {
        let pem = std::fs::read(&settings.private_key_file).map_err(|error| Error::Credentials {
            what: format!("private key {}", settings.private_key_file.display()),
            reason: error.to_string(),
        })?;
        let key = match settings.algorithm {
            SmartAlgorithm::RS384 => EncodingKey::from_rsa_pem(&pem),
            SmartAlgorithm::ES384 => EncodingKey::from_ec_pem(&pem),
        }
        .map_err(|error| Error::Credentials {
            what: format!("private key {}", settings.private_key_file.display()),
            reason: error.to_string(),
        })?;
        Ok(Smart { settings: settings.clone(), key, cached: tokio::sync::Mutex::new(None) })
    }

    /// A signed client assertion.
    pub fn assertion(&self) -> Result<String, Error> {
        let algorithm = match self.settings.algorithm {
            SmartAlgorithm::RS384 => Algorithm::RS384,
            SmartAlgorithm::ES384 => Algorithm::ES384,
        };
        let mut header = Header::new(algorithm);
        header.kid = self.settings.key_id.clone();
        header.typ = Some("JWT".to_string());
        let claims = assertion_claims(&self.settings, jsonwebtoken::get_current_timestamp());
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|error| Error::Credentials { what: "client assertion".to_string(), reason: error.to_string() })
    }

    /// The current token, fetching a new one when none is cached or it is about to expire.
    pub async fn token(&self, client: &reqwest::Client) -> Result<String, Error> {
        let mut cached = self.cached.lock().await;
        if let Some(current) = cached.as_ref() {
            if Instant::now() < current.renew_at {
                return Ok(current.token.clone());
            }
        }
        let fresh = self.fetch(client).await?;
        let token = fresh.token.clone();
        *cached = Some(fresh);
        Ok(token)
    }

    /// Forgets the cached token (after a 401), unless it was already replaced.
    pub async fn invalidate(&self, token: &str) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|current| current.token == token) {
            *cached = None;
        }
    }

    async fn fetch(&self, client: &reqwest::Client) -> Result<Cached, Error> {
        let failed = |reason: String| Error::Token { reason };
        let form = [
            ("grant_type", "client_credentials".to_string()),
            ("scope", self.settings.scope.clone()),
            ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_string()),
            ("client_assertion", self.assertion()?),
        ];
        let body = serde_urlencoded::to_string(form).map_err(|error| failed(error.to_string()))?;
        let requested = Instant::now();
        let mut response = client
            .post(self.settings.token_url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|error| failed(super::client::error_chain(&error)))?;
        let status = response.status();
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|error| failed(super::client::error_chain(&error)))? {
            if bytes.len() + chunk.len() > MAX_TOKEN_RESPONSE_BYTES {
                return Err(failed("token response too large".to_string()));
            }
            bytes.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            let error: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let code = error.get("error").and_then(Value::as_str).unwrap_or("");
            return Err(failed(format!("token endpoint answered {status} {code}")));
        }
        let answer: Value = serde_json::from_slice(&bytes).map_err(|_| failed("token response is not JSON".into()))?;
        let token = answer
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| failed("token response has no access_token".into()))?;
        let lifetime = Duration::from_secs(answer.get("expires_in").and_then(Value::as_u64).unwrap_or(300));
        // Renew a little before expiry: a fifth of the lifetime, at most a minute.
        let margin = (lifetime / 5).min(Duration::from_secs(60));
        tracing::debug!(expires_in = lifetime.as_secs(), "aggregator access token obtained");
        Ok(Cached { token: token.to_string(), renew_at: requested + lifetime - margin })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(key_file: std::path::PathBuf) -> SmartSettings {
        SmartSettings {
            token_url: reqwest::Url::parse("https://auth.example.org/token").unwrap(),
            client_id: "gateway-1".to_string(),
            private_key_file: key_file,
            algorithm: SmartAlgorithm::ES384,
            scope: "system/*.write".to_string(),
            key_id: Some("k1".to_string()),
        }
    }

    #[test]
    fn assertion_claims_follow_the_smart_profile() {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), pair.serialize_pem()).unwrap();
        let smart = Smart::load(&settings(file.path().to_path_buf())).unwrap();
        let first = smart.assertion().unwrap();
        let second = smart.assertion().unwrap();
        let key = jsonwebtoken::DecodingKey::from_ec_pem(pair.public_key_pem().as_bytes()).unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::ES384);
        validation.set_audience(&["https://auth.example.org/token"]);
        validation.set_issuer(&["gateway-1"]);
        let decoded = jsonwebtoken::decode::<Value>(&first, &key, &validation).unwrap();
        let other = jsonwebtoken::decode::<Value>(&second, &key, &validation).unwrap();
        assert_eq!(decoded.header.kid.as_deref(), Some("k1"));
        let claims = decoded.claims;
        assert_eq!(claims["sub"], "gateway-1");
        let lifetime = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
        assert!(lifetime <= 300);
        assert_ne!(claims["jti"], other.claims["jti"], "jti is unique");
        assert!(claims["jti"].as_str().unwrap().len() >= 16);
    }

    #[test]
    fn a_bad_key_is_named() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "not a key").unwrap();
        let error = Smart::load(&settings(file.path().to_path_buf())).unwrap_err().to_string();
        assert!(error.contains("private key"), "{error}");
    }
}
