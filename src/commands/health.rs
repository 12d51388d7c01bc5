//! `health`: asks a running gateway's `/health/ready` and exits 0 only when it is ready.
//! A minimal HTTP/1.1 client over plain TCP: the probe runs next to the gateway (container
//! health check), so it needs no TLS.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response read.
const MAX_RESPONSE_BYTES: u64 = 1024 * 1024;

/// An HTTP response: status and body.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Body text.
    pub body: String,
}

/// GETs `url` (`http://host:port/path`) and returns status and body.
pub async fn get(url: &str, timeout: Duration) -> anyhow::Result<Response> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("{url}: only http:// URLs are supported by the probe"))?;
    let (authority, path) = match rest.find('/') {
        Some(index) => (&rest[..index], &rest[index..]),
        None => (rest, "/"),
    };
    let exchange = async {
        let mut stream = TcpStream::connect(authority).await?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nAccept: application/json\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.take(MAX_RESPONSE_BYTES).read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("{url}: no answer within {timeout:?}"))?
        .map_err(|error| anyhow::anyhow!("{url}: {error}"))?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("{url}: not an HTTP response"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default();
    Ok(Response { status, body })
}

/// Base URL plus `/health/ready`; true when the gateway answers 200.
pub async fn check(base_url: &str) -> anyhow::Result<bool> {
    let url = format!("{}/health/ready", base_url.trim_end_matches('/'));
    let response = get(&url, Duration::from_secs(5)).await?;
    Ok(response.status == 200)
}
