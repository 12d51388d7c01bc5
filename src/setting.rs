//! The error every module's `Config::validate` returns: which key, and why.

use std::fmt;

/// A configuration value that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    /// Dotted path of the key, e.g. `mllp.listen`.
    pub key: String,
    /// What is wrong with it.
    pub reason: String,
}

impl Invalid {
    /// An invalid value for `key`.
    pub fn new(key: &str, reason: impl Into<String>) -> Invalid {
        Invalid { key: key.to_string(), reason: reason.into() }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}: {}", self.key, self.reason)
    }
}

impl std::error::Error for Invalid {}

/// Parses a socket address such as `0.0.0.0:2575` or `[::1]:8080` for `key`.
pub fn socket_address(key: &str, value: &str) -> Result<std::net::SocketAddr, Invalid> {
    value
        .parse()
        .map_err(|_| Invalid::new(key, format!("`{value}` is not an IP address with a port, like 0.0.0.0:2575")))
}
