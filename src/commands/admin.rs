//! `messages`, `outbox` and `reload-mappings`: the operator commands, clients of a running gateway's
//! `/admin` API (so that they work from anywhere the API is reachable, with the same
//! bearer auth, and so that a requeue wakes the pipeline at once).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;

use crate::mllp::tls::{self, ClientTls};

/// How to reach the admin API.
#[derive(Clone, Debug)]
pub struct Target {
    /// Base URL of the gateway's HTTP listener (`http://127.0.0.1:8080`).
    pub base: String,
    /// Bearer token with the admin scope (needed when the gateway has auth configured).
    pub token: Option<String>,
    /// CA bundle for an https base URL (default: the system's roots).
    pub ca_file: Option<PathBuf>,
}

/// A client of the admin API.
pub struct AdminClient {
    target: Target,
    client: reqwest::Client,
}

impl AdminClient {
    /// Builds the HTTP client (TLS with ring, the system's or the given roots).
    pub fn new(target: Target) -> anyhow::Result<AdminClient> {
        let tls = tls::client_config(&ClientTls { ca_file: target.ca_file.clone(), ..ClientTls::default() })?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured((*tls).clone())
            .timeout(Duration::from_secs(60))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(AdminClient { target, client })
    }

    /// GETs `path` (with query) and returns the JSON answer.
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.client.get(self.url(path))).await
    }

    /// POSTs to `path` and returns the JSON answer.
    pub async fn post(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.client.post(self.url(path))).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.target.base.trim_end_matches('/'))
    }

    async fn send(&self, mut request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        if let Some(token) = &self.target.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.with_context(|| format!("cannot reach {}", self.target.base))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body);
        }
        let diagnostics: Vec<&str> = body
            .get("issue")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|issue| issue.get("diagnostics").and_then(Value::as_str))
            .collect();
        anyhow::bail!("the gateway answered {status}: {}", diagnostics.join("; "))
    }
}

/// One line per message: id, received, sender, type, control id, status, attempts, error.
pub fn format_list(answer: &Value) -> String {
    let mut text = String::new();
    for message in answer.get("messages").and_then(Value::as_array).into_iter().flatten() {
        let field = |name: &str| match message.get(name) {
            Some(Value::String(text)) => text.clone(),
            Some(Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        };
        text.push_str(&format!(
            "{:>8}  {}  {:<24}  {:<12}  {:<20}  {:<9}  {}  {}\n",
            field("id"),
            field("received_at"),
            field("sender"),
            field("message_type"),
            field("control_id"),
            field("status"),
            field("attempts"),
            field("error"),
        ));
    }
    text
}

/// One line per outbox row: id, message id, partition hash, status, attempts, created,
/// last HTTP status, last error.
pub fn format_outbox_list(answer: &Value) -> String {
    let mut text = String::new();
    for row in answer.get("outbox").and_then(Value::as_array).into_iter().flatten() {
        let field = |name: &str| match row.get(name) {
            Some(Value::String(text)) => text.clone(),
            Some(Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        };
        text.push_str(&format!(
            "{:>8}  {:>8}  {:<12}  {:<9}  {:>3}  {}  {:<3}  {}\n",
            field("id"),
            field("message_id"),
            field("partition"),
            field("status"),
            field("attempts"),
            field("created_at"),
            field("last_status"),
            field("last_error"),
        ));
    }
    text
}

/// Reads a token from a file (trimmed), for `--token-file`.
pub fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read token file {}", path.display()))?;
    Ok(text.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_one_line_per_message() {
        let answer = serde_json::json!({ "messages": [
            { "id": 7, "received_at": "2026-01-01T00:00:00Z", "sender": "EPIC^HOSP", "message_type": "ADT^A01",
              "control_id": "MSG7", "status": "failed", "attempts": 1, "error": "no mapping handles ZZZ" },
            { "id": 6, "status": "processed", "error": null }
        ]});
        let text = format_list(&answer);
        assert_eq!(text.lines().count(), 2);
        assert!(text.lines().next().unwrap().contains("no mapping handles ZZZ"));
        assert!(text.lines().nth(1).unwrap().contains("processed"));
    }
}
