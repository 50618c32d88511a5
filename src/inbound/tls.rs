//! The server side of STARTTLS: the certificate and key from `[tls]`, loaded
//! into a rustls acceptor (ring provider), and loaded again on SIGHUP so a
//! renewed certificate needs no restart.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::{ConfigError, TlsConfig};

/// Builds the acceptor; errors name the config file, the key and the reason.
pub fn acceptor(tls: &TlsConfig, source: &Path) -> Result<TlsAcceptor, ConfigError> {
    let invalid = |key: &str, reason: String| ConfigError::Invalid {
        file: source.to_owned(),
        key: key.into(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|iter| iter.collect())
        .map_err(|e| invalid("tls.cert", format!("{}: {e}", tls.cert.display())))?;
    if certs.is_empty() {
        return Err(invalid(
            "tls.cert",
            format!("{}: no certificate in it", tls.cert.display()),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| invalid("tls.key", format!("{}: {e}", tls.key.display())))?;
    let config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("tls", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid("tls.key", format!("does not match tls.cert: {e}")))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
