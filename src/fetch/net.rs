//! The connection to a mailbox server: TCP, then TLS from the first byte
//! (`tls = "implicit"`) or after STARTTLS/STLS (the protocol modules ask
//! for it, then call [`upgrade`]). The server's certificate is always
//! verified (a password follows), against the system roots plus the
//! block's `ca_file`.

use std::net::IpAddr;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::FetchError;
use crate::config::{FetchConfig, FetchTls};
use crate::outbound::tls::{Stream, verifying_config};

/// Longest wait for a connection, a TLS handshake, or one reply.
pub(super) const TIMEOUT: Duration = Duration::from_secs(60);

/// A connected stream, already TLS with `tls = "implicit"`.
pub(super) async fn connect(account: &FetchConfig) -> Result<Stream, FetchError> {
    let target = (account.host.as_str(), account.port);
    let tcp = match tokio::time::timeout(TIMEOUT, TcpStream::connect(target)).await {
        Err(_) => return Err(FetchError::Connect("timed out".into())),
        Ok(Err(e)) => return Err(FetchError::Connect(e.to_string())),
        Ok(Ok(tcp)) => tcp,
    };
    let _ = tcp.set_nodelay(true);
    match account.tls {
        FetchTls::Implicit => upgrade(Stream::Plain(tcp), account).await,
        FetchTls::Starttls | FetchTls::None => Ok(Stream::Plain(tcp)),
    }
}

/// The server's address, for our `Received:` and logs.
pub(super) fn peer(stream: &Stream) -> Option<IpAddr> {
    let tcp = match stream {
        Stream::Plain(tcp) => tcp,
        Stream::Tls(tls) => tls.get_ref().0,
    };
    tcp.peer_addr().ok().map(|a| a.ip())
}

/// The TLS handshake on a plain stream, verifying the server's certificate
/// for the block's host name (or address).
pub(super) async fn upgrade(stream: Stream, account: &FetchConfig) -> Result<Stream, FetchError> {
    let Stream::Plain(tcp) = stream else {
        return Ok(stream);
    };
    let roots = extra_roots(account)?;
    let config = verifying_config(&roots).map_err(FetchError::Tls)?;
    let name = ServerName::try_from(account.host.clone())
        .map_err(|e| FetchError::Tls(format!("{}: {e}", account.host)))?;
    let handshake = TlsConnector::from(config).connect(name, tcp);
    match tokio::time::timeout(TIMEOUT, handshake).await {
        Err(_) => Err(FetchError::Tls("handshake timed out".into())),
        Ok(Err(e)) => Err(FetchError::Tls(e.to_string())),
        Ok(Ok(tls)) => Ok(Stream::Tls(Box::new(tls))),
    }
}

/// The certificates of `ca_file`, read at every connection (so a renewed
/// CA needs no restart).
fn extra_roots(account: &FetchConfig) -> Result<Vec<CertificateDer<'static>>, FetchError> {
    let Some(path) = &account.ca_file else {
        return Ok(Vec::new());
    };
    let unreadable = |e: &dyn std::fmt::Display| {
        FetchError::Tls(format!("cannot read ca_file {}: {e}", path.display()))
    };
    let roots = CertificateDer::pem_file_iter(path)
        .map_err(|e| unreadable(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unreadable(&e))?;
    if roots.is_empty() {
        return Err(unreadable(&"no certificate in it"));
    }
    Ok(roots)
}

/// The password, read at every connection (rotating it needs no restart);
/// surrounding whitespace, such as the newline `echo` writes, is not part of it.
pub(super) fn password(account: &FetchConfig) -> Result<String, FetchError> {
    let text = std::fs::read_to_string(&account.password_file).map_err(|e| {
        FetchError::Config(format!(
            "cannot read password_file {}: {e}",
            account.password_file.display()
        ))
    })?;
    let password = text.trim();
    if password.is_empty() {
        return Err(FetchError::Config(format!(
            "password_file {} is empty",
            account.password_file.display()
        )));
    }
    Ok(password.to_owned())
}
