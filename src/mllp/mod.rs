//! MLLP ingress: the listener EMRs send to, and the client behind `send`.
//!
//! - [`codec`]: bytes ⇄ frames, bounded, tolerant of real senders. No HL7 knowledge.
//! - [`ingest`]: one frame → decode, check the header, journal, build the ACK.
//! - [`listener`]: accept loop, connection limit, per-connection task with idle timeout,
//!   pipelined frames answered in order.
//! - [`tls`]: rustls server and client configuration, mutual TLS.
//! - [`client`]: an MLLP client (the `send` command and tests).
//!
//! Invariant: an AA or CA leaves this module only after the journal has committed the
//! message's exact bytes to disk.

pub mod client;
pub mod codec;
pub mod ingest;
pub mod listener;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::hl7::Charset;
use crate::setting::{self, Invalid};

/// The `mllp` section of the configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the MLLP listener binds.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Largest message accepted, in bytes; a larger frame is answered AR and the
    /// connection is closed.
    #[serde(default = "default_max_frame_bytes")]
    pub max_frame_bytes: usize,
    /// Most connections open at once; further connections are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A connection that sends nothing for this long is closed.
    #[serde(default = "default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// Character set for messages whose MSH-18 is empty (HL7 table 0211 name, or a label
    /// such as `windows-1252`).
    #[serde(default = "default_charset")]
    pub default_charset: String,
    /// A message with the same sender (MSH-3, MSH-4), MSH-10 and content received again
    /// within this window is answered with the original ACK and not processed again.
    /// 0 disables duplicate detection.
    #[serde(default = "default_duplicate_window_secs")]
    pub duplicate_window_secs: u64,
    /// In enhanced mode, follow MSH-15 and send no accept acknowledgment when it says NE
    /// (or ER/SU and the outcome does not match). Off by default, as in Mirth Connect:
    /// most senders wait for an answer whatever MSH-15 says.
    #[serde(default)]
    pub honor_accept_ack_type: bool,
    /// TLS for the listener; absent means plain TCP.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// The `mllp.tls` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the server certificate chain.
    pub cert_file: PathBuf,
    /// PEM file with the server's private key.
    pub key_file: PathBuf,
    /// PEM file with the CAs that sign client certificates; when set, every client must
    /// present a certificate signed by one of them (mutual TLS).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// A TLS handshake that takes longer is abandoned.
    #[serde(default = "default_handshake_timeout_secs")]
    pub handshake_timeout_secs: u64,
}

fn default_listen() -> String {
    "0.0.0.0:2575".to_string()
}
fn default_max_frame_bytes() -> usize {
    10 * 1024 * 1024
}
fn default_max_connections() -> usize {
    256
}
fn default_idle_timeout_secs() -> u64 {
    600
}
fn default_charset() -> String {
    "UNICODE UTF-8".to_string()
}
fn default_duplicate_window_secs() -> u64 {
    24 * 60 * 60
}
fn default_handshake_timeout_secs() -> u64 {
    10
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: default_listen(),
            max_frame_bytes: default_max_frame_bytes(),
            max_connections: default_max_connections(),
            idle_timeout_secs: default_idle_timeout_secs(),
            default_charset: default_charset(),
            duplicate_window_secs: default_duplicate_window_secs(),
            honor_accept_ack_type: false,
            tls: None,
        }
    }
}

/// The validated `mllp` section.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Listen address.
    pub listen: SocketAddr,
    /// Frame size limit.
    pub max_frame_bytes: usize,
    /// Connection limit.
    pub max_connections: usize,
    /// Idle timeout.
    pub idle_timeout: Duration,
    /// Charset when MSH-18 is empty.
    pub default_charset: Charset,
    /// Duplicate window.
    pub duplicate_window: Duration,
    /// Follow MSH-15 in enhanced mode.
    pub honor_accept_ack_type: bool,
    /// TLS, when configured.
    pub tls: Option<TlsConfig>,
}

impl Config {
    /// Checks the section without touching files or sockets.
    pub fn validate(&self) -> Result<Settings, Invalid> {
        let listen = setting::socket_address("mllp.listen", &self.listen)?;
        if !(1024..=1024 * 1024 * 1024).contains(&self.max_frame_bytes) {
            return Err(Invalid::new("mllp.max_frame_bytes", "must be between 1024 and 1073741824"));
        }
        if self.max_connections == 0 {
            return Err(Invalid::new("mllp.max_connections", "must be at least 1"));
        }
        if self.idle_timeout_secs == 0 {
            return Err(Invalid::new("mllp.idle_timeout_secs", "must be at least 1"));
        }
        let default_charset = Charset::from_name(&self.default_charset).ok_or_else(|| {
            Invalid::new("mllp.default_charset", format!("`{}` is not a known character set", self.default_charset))
        })?;
        if let Some(tls) = &self.tls {
            if tls.handshake_timeout_secs == 0 {
                return Err(Invalid::new("mllp.tls.handshake_timeout_secs", "must be at least 1"));
            }
        }
        Ok(Settings {
            listen,
            max_frame_bytes: self.max_frame_bytes,
            max_connections: self.max_connections,
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
            default_charset,
            duplicate_window: Duration::from_secs(self.duplicate_window_secs),
            honor_accept_ack_type: self.honor_accept_ack_type,
            tls: self.tls.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let settings = Config::default().validate().unwrap();
        assert_eq!(settings.listen.port(), 2575);
        assert_eq!(settings.max_frame_bytes, 10 * 1024 * 1024);
        assert_eq!(settings.default_charset, Charset::Utf8);
    }

    #[test]
    fn bad_values_name_their_key() {
        let config = Config { listen: "localhost".to_string(), ..Config::default() };
        assert_eq!(config.validate().unwrap_err().key, "mllp.listen");
        let config = Config { default_charset: "klingon".to_string(), ..Config::default() };
        assert_eq!(config.validate().unwrap_err().key, "mllp.default_charset");
        let config = Config { max_connections: 0, ..Config::default() };
        assert_eq!(config.validate().unwrap_err().key, "mllp.max_connections");
    }
}
