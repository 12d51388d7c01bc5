//! An MLLP client: connect (TCP or TLS), send a message, wait for its acknowledgment.
//! Used by the `send` command and by the tests.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::codec::{self, Decoder};
use super::tls::{self, ClientTls};

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection could not be opened.
    #[error("cannot connect to {address}: {reason}")]
    Connect {
        /// host:port.
        address: String,
        /// Why.
        reason: String,
    },
    /// TLS set-up failed.
    #[error(transparent)]
    Tls(#[from] tls::Error),
    /// Reading or writing failed.
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// No acknowledgment arrived in time.
    #[error("no acknowledgment within {0:?}")]
    Timeout(Duration),
    /// The server closed the connection before acknowledging.
    #[error("connection closed by the server before an acknowledgment arrived")]
    Closed,
    /// The acknowledgment was larger than allowed.
    #[error("acknowledgment larger than {0} bytes")]
    AckTooLarge(usize),
}

/// Connection options.
#[derive(Clone, Debug)]
pub struct Options {
    /// `host:port` to connect to.
    pub address: String,
    /// TLS, when wanted.
    pub tls: Option<ClientTls>,
    /// Server name to verify (defaults to the host part of `address`).
    pub server_name: Option<String>,
    /// Time allowed to connect.
    pub connect_timeout: Duration,
    /// Time allowed for each acknowledgment.
    pub ack_timeout: Duration,
}

impl Options {
    /// Plain TCP to `address` with 10 s / 30 s timeouts.
    pub fn plain(address: impl Into<String>) -> Options {
        Options {
            address: address.into(),
            tls: None,
            server_name: None,
            connect_timeout: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(30),
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Largest acknowledgment accepted.
const MAX_ACK_BYTES: usize = 1024 * 1024;

/// An open MLLP connection.
pub struct Client {
    stream: Box<dyn Stream>,
    decoder: Decoder,
    buffer: BytesMut,
    ack_timeout: Duration,
}

impl Client {
    /// Connects as `options` say.
    pub async fn connect(options: &Options) -> Result<Client, Error> {
        let connect_error = |reason: String| Error::Connect { address: options.address.clone(), reason };
        let tcp = tokio::time::timeout(options.connect_timeout, TcpStream::connect(&options.address))
            .await
            .map_err(|_| connect_error("timed out".to_string()))?
            .map_err(|error| connect_error(error.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let stream: Box<dyn Stream> = match &options.tls {
            None => Box::new(tcp),
            Some(client_tls) => {
                let config = tls::client_config(client_tls)?;
                let host = options.server_name.clone().unwrap_or_else(|| host_part(&options.address).to_string());
                let server_name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|_| connect_error(format!("`{host}` is not a valid TLS server name")))?;
                let connector = TlsConnector::from(config);
                let handshake = connector.connect(server_name, tcp);
                let tls_stream = tokio::time::timeout(options.connect_timeout, handshake)
                    .await
                    .map_err(|_| connect_error("tls handshake timed out".to_string()))?
                    .map_err(|error| connect_error(format!("tls handshake failed: {error}")))?;
                Box::new(tls_stream)
            }
        };
        Ok(Client {
            stream,
            decoder: Decoder::new(MAX_ACK_BYTES),
            buffer: BytesMut::new(),
            ack_timeout: options.ack_timeout,
        })
    }

    /// Sends one message (unframed bytes) and returns the acknowledgment payload.
    pub async fn send(&mut self, message: &[u8]) -> Result<Bytes, Error> {
        self.stream.write_all(&codec::encode(message)).await?;
        self.stream.flush().await?;
        self.receive().await
    }

    /// Writes raw bytes as they are (tests use it for odd framing).
    pub async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Waits for the next acknowledgment frame.
    pub async fn receive(&mut self) -> Result<Bytes, Error> {
        let deadline = tokio::time::Instant::now() + self.ack_timeout;
        loop {
            match self.decoder.decode(&mut self.buffer) {
                Ok(Some(frame)) => return Ok(frame),
                Ok(None) => {}
                Err(_) => return Err(Error::AckTooLarge(MAX_ACK_BYTES)),
            }
            let read = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buffer))
                .await
                .map_err(|_| Error::Timeout(self.ack_timeout))??;
            if read == 0 {
                return Err(Error::Closed);
            }
        }
    }
}

fn host_part(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::host_part;

    #[test]
    fn host_part_strips_port_and_brackets() {
        assert_eq!(host_part("mllp.example.org:2575"), "mllp.example.org");
        assert_eq!(host_part("[::1]:2575"), "::1");
        assert_eq!(host_part("localhost"), "localhost");
    }
}
