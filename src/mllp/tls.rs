//! TLS for MLLP with rustls (ring provider): the listener's server configuration, with
//! optional mutual TLS, and the `send` client's configuration.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::TlsConfig;

/// TLS set-up errors; each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client certificate verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem_error = |reason: String| Error::Pem { path: path.to_path_buf(), reason };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|error| pem_error(error.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| pem_error(error.to_string()))?;
    if certificates.is_empty() {
        return Err(pem_error("no certificate found".to_string()));
    }
    Ok(certificates)
}

/// Reads the private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|error| Error::Pem { path: path.to_path_buf(), reason: error.to_string() })
}

fn root_store(path: &Path) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for certificate in load_certificates(path)? {
        roots.add(certificate).map_err(|error| Error::Pem { path: path.to_path_buf(), reason: error.to_string() })?;
    }
    Ok(roots)
}

/// A server configuration that offers `protocols` by ALPN (HTTPS: `h2`, `http/1.1`).
pub fn server_config_with_alpn(tls: &TlsConfig, protocols: &[Vec<u8>]) -> Result<Arc<ServerConfig>, Error> {
    let mut config = Arc::unwrap_or_clone(server_config(tls)?);
    config.alpn_protocols = protocols.to_vec();
    Ok(Arc::new(config))
}

/// The listener's rustls configuration.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, Error> {
    let certificates = load_certificates(&tls.cert_file)?;
    let key = load_private_key(&tls.key_file)?;
    let builder = ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let config = match &tls.client_ca_file {
        Some(ca_file) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(ca_file)?), provider())
                .build()
                .map_err(|error| Error::Verifier(error.to_string()))?;
            builder.with_client_cert_verifier(verifier).with_single_cert(certificates, key)?
        }
        None => builder.with_no_client_auth().with_single_cert(certificates, key)?,
    };
    Ok(Arc::new(config))
}

/// A client's TLS options.
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    /// CAs to trust; the system's roots when absent.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// Client private key for mutual TLS.
    pub key_file: Option<PathBuf>,
}

/// The client's rustls configuration.
pub fn client_config(options: &ClientTls) -> Result<Arc<ClientConfig>, Error> {
    let roots = match &options.ca_file {
        Some(ca_file) => root_store(ca_file)?,
        None => {
            let mut roots = RootCertStore::empty();
            let native = rustls_native_certs::load_native_certs();
            for certificate in native.certs {
                // A system root that rustls cannot parse is skipped, like every TLS client does.
                let _ = roots.add(certificate);
            }
            roots
        }
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match (&options.cert_file, &options.key_file) {
        (Some(cert_file), Some(key_file)) => {
            builder.with_client_auth_cert(load_certificates(cert_file)?, load_private_key(key_file)?)?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}
