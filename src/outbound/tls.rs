//! TLS for STARTTLS: the stream type a connection runs on (plain TCP or TLS on
//! TCP), and the rustls client configuration for each policy. Only the `ring`
//! provider is used, named explicitly, so no other crate's choice of a process
//! default can change it.
//!
//! Trust for `verify` comes from the operating system's store (through
//! rustls-native-certs) plus `Settings::extra_roots`. The system store, rather
//! than a root list compiled into the binary, because a backup MX forwards to
//! the domain owner's own primary, which often has a certificate from a private
//! CA: operators trust that CA the usual way (the OS store, `SSL_CERT_FILE`,
//! `SSL_CERT_DIR`), and root updates arrive with the OS, not with a rebuild.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, ring};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::warn;

use super::error::{SessionError, Stage};
use super::{Hop, Settings};
use crate::config::TlsPolicy;

/// The stream under a [`super::Connection`]: TCP, upgraded in place by STARTTLS.
/// (Also under a mailbox fetch's POP3 or IMAP session.)
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    /// Boxed: a TLS stream carries rustls' buffers, far larger than a socket.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Runs the client handshake on a connection whose STARTTLS got 220.
pub(crate) async fn handshake(
    tcp: TcpStream,
    hop: &Hop,
    settings: &Settings,
) -> Result<TlsStream<TcpStream>, SessionError> {
    let verify = settings.tls == TlsPolicy::Verify;
    let config = client_config(verify, &settings.extra_roots)?;
    let name = server_name(hop, verify)?;
    let connect = TlsConnector::from(config).connect(name, tcp);
    match tokio::time::timeout(settings.timeouts.command, connect).await {
        Err(_) => Err(SessionError::Tls {
            reason: format!("timed out at {}", Stage::TlsHandshake),
        }),
        Ok(Err(e)) => Err(SessionError::Tls {
            reason: e.to_string(),
        }),
        Ok(Ok(stream)) => Ok(stream),
    }
}

/// A configuration that verifies the server's certificate against the
/// system roots plus `extra_roots` (mailbox fetch: a password follows).
pub(crate) fn verifying_config(
    extra_roots: &[CertificateDer<'static>],
) -> Result<Arc<ClientConfig>, String> {
    client_config(true, extra_roots).map_err(|e| e.to_string())
}

/// A configuration that takes any certificate (handshake signatures still
/// checked), for `mxspool doctor`, which looks at the certificate itself
/// after the handshake instead of failing it.
pub(crate) fn unverified_config() -> Result<Arc<ClientConfig>, String> {
    client_config(false, &[]).map_err(|e| e.to_string())
}

/// The certificates `verify` trusts: the system's roots plus `extra_roots`.
pub(crate) fn trusted_roots(
    extra_roots: &[CertificateDer<'static>],
) -> Result<RootCertStore, String> {
    let mut roots = SYSTEM_ROOTS.clone();
    for root in extra_roots {
        roots
            .add(root.clone())
            .map_err(|e| format!("unusable extra root certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no trusted root certificates to verify against".into());
    }
    Ok(roots)
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn tls_error(reason: impl ToString) -> SessionError {
    SessionError::Tls {
        reason: reason.to_string(),
    }
}

/// With `verify`, the certificate must chain to a trusted root and name the
/// hop. Without, any certificate is taken (RFC 7435 opportunistic security:
/// an unauthenticated encrypted channel still beats plain text, and MX hosts'
/// certificates often name something else), but the handshake signatures are
/// still checked, so the session key belongs to whoever holds that certificate.
fn client_config(
    verify: bool,
    extra_roots: &[CertificateDer<'static>],
) -> Result<Arc<ClientConfig>, SessionError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?;
    let config = if verify {
        let roots = trusted_roots(extra_roots).map_err(tls_error)?;
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
            .with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// The name the certificate must carry (with `verify`) and that goes out as
/// SNI. MX names may end in a dot; certificates never do. Without
/// verification a hop known only by address is fine.
fn server_name(hop: &Hop, verify: bool) -> Result<ServerName<'static>, SessionError> {
    let name = hop.name.trim_end_matches('.').to_owned();
    match ServerName::try_from(name) {
        Ok(name) => Ok(name),
        Err(_) if !verify => Ok(ServerName::IpAddress(hop.addr.ip().into())),
        Err(e) => Err(tls_error(format!(
            "cannot verify a certificate for {:?}: {e}",
            hop.name
        ))),
    }
}

/// Read and parsed once per process, not per connection: the store is files
/// on disk, and it does not change while we run in any way worth re-reading
/// it for.
static SYSTEM_ROOTS: LazyLock<RootCertStore> = LazyLock::new(|| {
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        warn!(%error, "reading the system's trusted certificates");
    }
    let mut roots = RootCertStore::empty();
    let (_, unusable) = roots.add_parsable_certificates(found.certs);
    if unusable > 0 {
        warn!(
            unusable,
            "the system store has certificates rustls cannot use"
        );
    }
    if roots.is_empty() {
        warn!("no trusted certificates in the system store; tls = \"verify\" will fail");
    }
    roots
});

/// Accepts every certificate, for the policies that encrypt without
/// authenticating; see [`client_config`].
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(name: &str) -> Hop {
        Hop {
            name: name.into(),
            addr: "192.0.2.1:25".parse().unwrap(),
        }
    }

    #[test]
    fn names_the_hop_for_sni_and_verification() {
        assert_eq!(
            server_name(&hop("mx.example.com."), true).unwrap(),
            ServerName::try_from("mx.example.com").unwrap()
        );
        assert_eq!(
            server_name(&hop("[192.0.2.1]"), false).unwrap(),
            ServerName::IpAddress("192.0.2.1".parse::<std::net::IpAddr>().unwrap().into())
        );
        assert!(server_name(&hop("not a name"), true).is_err());
    }

    #[test]
    fn builds_configs_for_every_policy() {
        assert!(client_config(false, &[]).is_ok());
        let garbage = CertificateDer::from(vec![1, 2, 3]);
        assert!(matches!(
            client_config(true, &[garbage]),
            Err(SessionError::Tls { .. })
        ));
    }
}
