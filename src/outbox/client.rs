//! The HTTP side: a reqwest client over rustls (ring; HTTP/2 by ALPN, else HTTP/1.1) with
//! the configured CA and client certificate, the `Authorization` header, and one POST of
//! a transaction Bundle turned into an [`Attempt`].

use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::Url;
use serde_json::Value;

use super::config::{is_loopback, AuthSettings, Settings};
use super::policy::{self, Verdict};
use super::smart::Smart;
use super::Error;

/// The media type sent and accepted.
pub const FHIR_JSON_R4: &str = "application/fhir+json; fhirVersion=4.0";
/// Largest aggregator answer read; the rest is dropped.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// Time allowed to open a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The outcome of one POST.
#[derive(Clone, Debug)]
pub struct Attempt {
    /// What to do with the rows.
    pub verdict: Verdict,
    /// HTTP status, when an answer came.
    pub status: Option<u16>,
    /// Why it failed (no payload data: status line, error kind, entry status).
    pub error: String,
    /// `Retry-After`, when given.
    pub retry_after: Option<Duration>,
    /// The answer body (OperationOutcome or transaction-response), possibly cut.
    pub response: String,
}

enum Auth {
    None,
    Static(String),
    Smart(Box<Smart>),
}

/// A client of the aggregator.
pub struct Client {
    http: reqwest::Client,
    endpoint: Url,
    auth: Auth,
}

/// The error and its sources in one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
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

impl Client {
    /// Builds the client: reads the TLS files, the static token or the SMART key.
    pub fn build(settings: &Settings) -> Result<Client, Error> {
        let tls = crate::mllp::tls::client_config(&crate::mllp::tls::ClientTls {
            ca_file: settings.tls.ca_file.clone(),
            cert_file: settings.tls.cert_file.clone(),
            key_file: settings.tls.key_file.clone(),
        })
        .map_err(|error| Error::Credentials { what: "aggregator TLS files".to_string(), reason: error.to_string() })?;
        let mut tls = std::sync::Arc::unwrap_or_clone(tls);
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let mut builder = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(CONNECT_TIMEOUT.min(settings.timeout))
            .timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(settings.max_in_flight)
            .user_agent(concat!("hl7-fhir-gateway/", env!("CARGO_PKG_VERSION")));
        if is_loopback(&settings.endpoint) {
            builder = builder.no_proxy();
        }
        let http = builder
            .build()
            .map_err(|error| Error::Credentials { what: "HTTP client".to_string(), reason: error_chain(&error) })?;
        let auth = match &settings.auth {
            AuthSettings::None => Auth::None,
            AuthSettings::BearerFile(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| Error::Credentials {
                    what: format!("bearer token file {}", path.display()),
                    reason: error.to_string(),
                })?;
                Auth::Static(checked_token(text.trim(), "bearer token file")?)
            }
            AuthSettings::BearerEnv(variable) => {
                let text = std::env::var(variable).map_err(|_| Error::Credentials {
                    what: format!("environment variable {variable}"),
                    reason: "not set or not UTF-8".to_string(),
                })?;
                Auth::Static(checked_token(text.trim(), "bearer token variable")?)
            }
            AuthSettings::Smart(smart) => Auth::Smart(Box::new(Smart::load(smart)?)),
        };
        Ok(Client { http, endpoint: settings.endpoint.clone(), auth })
    }

    async fn authorization(&self) -> Result<Option<String>, Error> {
        match &self.auth {
            Auth::None => Ok(None),
            Auth::Static(token) => Ok(Some(token.clone())),
            Auth::Smart(smart) => smart.token(&self.http).await.map(Some),
        }
    }

    /// POSTs `body` once; with SMART auth, a 401 renews the token and tries once more.
    pub async fn post(&self, body: &bytes::Bytes, request_id: &str) -> Attempt {
        let first = self.post_once(body, request_id).await;
        if first.attempt.status == Some(401) {
            if let (Auth::Smart(smart), Some(token)) = (&self.auth, first.token.as_deref()) {
                smart.invalidate(token).await;
                tracing::info!("aggregator answered 401; renewing the access token");
                return self.post_once(body, request_id).await.attempt;
            }
        }
        first.attempt
    }

    async fn post_once(&self, body: &bytes::Bytes, request_id: &str) -> Posted {
        let token = match self.authorization().await {
            Ok(token) => token,
            Err(error) => {
                return Posted {
                    attempt: Attempt {
                        verdict: Verdict::Retry,
                        status: None,
                        error: error.to_string(),
                        retry_after: None,
                        response: String::new(),
                    },
                    token: None,
                }
            }
        };
        let mut request = self
            .http
            .post(self.endpoint.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON_R4))
            .header(ACCEPT, HeaderValue::from_static(FHIR_JSON_R4))
            .header("x-request-id", request_id)
            .header("idempotency-key", request_id)
            .body(body.clone());
        if let Some(token) = &token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let attempt = match request.send().await {
            Err(error) => Attempt {
                verdict: Verdict::Retry,
                status: None,
                error: if error.is_timeout() { "timeout".to_string() } else { error_chain(&error) },
                retry_after: None,
                response: String::new(),
            },
            Ok(response) => judge(response).await,
        };
        Posted { attempt, token }
    }
}

struct Posted {
    attempt: Attempt,
    token: Option<String>,
}

fn checked_token(token: &str, what: &str) -> Result<String, Error> {
    if token.is_empty() || HeaderValue::from_str(&format!("Bearer {token}")).is_err() {
        return Err(Error::Credentials { what: what.to_string(), reason: "empty or not a valid header value".into() });
    }
    Ok(token.to_string())
}

async fn judge(mut response: reqwest::Response) -> Attempt {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| policy::retry_after(value, SystemTime::now()));
    let mut body = Vec::new();
    let mut read_error = None;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    break;
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(error) => {
                read_error = Some(if error.is_timeout() { "timeout".to_string() } else { error_chain(&error) });
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&body).into_owned();
    let mut verdict = policy::classify(status);
    let mut error = if verdict == Verdict::Delivered { String::new() } else { format!("HTTP {status}") };
    if verdict == Verdict::Delivered {
        if let Some(read_error) = read_error {
            // The answer was cut: the transaction may or may not have been applied; PUTs
            // with fixed ids make a repeat harmless.
            verdict = Verdict::Retry;
            error = format!("HTTP {status}, answer cut: {read_error}");
        } else if let Ok(parsed) = serde_json::from_slice::<Value>(&body) {
            if let Some(entry_status) = policy::failed_entry(&parsed) {
                verdict = Verdict::Reject;
                error = format!("HTTP {status} with a failed entry: {entry_status}");
            }
        }
    }
    Attempt { verdict, status: Some(status), error, retry_after, response: text }
}
