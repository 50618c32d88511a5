//! One look at an SMTP server, as a sending MTA has it: greeting, EHLO,
//! STARTTLS if offered, the certificate it presents, QUIT. Nothing is sent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Longest reply line read; longer ones are cut (RFC 5321 §4.5.3.1.5: 512).
const MAX_LINE: u64 = 2048;
/// Most lines in one reply.
const MAX_LINES: usize = 100;

#[derive(Debug)]
pub struct Seen {
    /// The address that answered.
    pub addr: SocketAddr,
    /// The greeting's first line.
    pub greeting: String,
    /// `None`: STARTTLS not offered. Otherwise the handshake's result: the
    /// chain the server presented (leaf first), or why it failed.
    pub starttls: Option<Result<Vec<CertificateDer<'static>>, String>>,
}

/// Talks to the first of `addrs` that answers. `name` goes out as SNI; the
/// handshake takes any certificate (`tls`), so the chain can be judged
/// afterwards rather than the handshake just failing.
pub async fn probe(
    addrs: &[SocketAddr],
    helo: &str,
    name: &str,
    tls: Arc<ClientConfig>,
    timeout: Duration,
) -> Result<Seen, String> {
    let mut last = "no address".to_string();
    for &addr in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => return session(tcp, addr, helo, name, tls, timeout).await,
            Ok(Err(e)) => last = format!("{addr}: {e}"),
            Err(_) => last = format!("{addr}: connection timed out"),
        }
    }
    Err(last)
}

async fn session(
    tcp: TcpStream,
    addr: SocketAddr,
    helo: &str,
    name: &str,
    tls: Arc<ClientConfig>,
    timeout: Duration,
) -> Result<Seen, String> {
    let at = |e: String| format!("{addr}: {e}");
    let mut reader = BufReader::new(tcp);
    let (code, greeting) = reply(&mut reader, timeout).await.map_err(at)?;
    let greeting_line = greeting.first().cloned().unwrap_or_default();
    if code != 220 {
        return Err(at(format!("greeted with {code} {greeting_line}")));
    }
    send(&mut reader, &format!("EHLO {helo}\r\n"))
        .await
        .map_err(at)?;
    let (code, lines) = reply(&mut reader, timeout).await.map_err(at)?;
    if code != 250 {
        return Err(at(format!(
            "answered EHLO with {code} {}",
            lines.first().map(String::as_str).unwrap_or("")
        )));
    }
    let offers_starttls = lines.iter().skip(1).any(|line| {
        line.split_whitespace()
            .next()
            .is_some_and(|word| word.eq_ignore_ascii_case("STARTTLS"))
    });
    let mut seen = Seen {
        addr,
        greeting: greeting_line,
        starttls: None,
    };
    if !offers_starttls {
        let _ = send(&mut reader, "QUIT\r\n").await;
        return Ok(seen);
    }
    send(&mut reader, "STARTTLS\r\n").await.map_err(at)?;
    let (code, lines) = reply(&mut reader, timeout).await.map_err(at)?;
    if code != 220 {
        seen.starttls = Some(Err(format!(
            "answered STARTTLS with {code} {}",
            lines.first().map(String::as_str).unwrap_or("")
        )));
        return Ok(seen);
    }
    let server_name = match ServerName::try_from(name.trim_end_matches('.').to_owned()) {
        Ok(name) => name,
        Err(_) => ServerName::IpAddress(addr.ip().into()),
    };
    let handshake = TlsConnector::from(tls).connect(server_name, reader.into_inner());
    seen.starttls = Some(match tokio::time::timeout(timeout, handshake).await {
        Err(_) => Err("TLS handshake timed out".into()),
        Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
        Ok(Ok(mut stream)) => {
            let chain = stream
                .get_ref()
                .1
                .peer_certificates()
                .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default();
            let _ = stream.write_all(b"QUIT\r\n").await;
            let _ = stream.shutdown().await;
            Ok(chain)
        }
    });
    Ok(seen)
}

async fn send(reader: &mut BufReader<TcpStream>, line: &str) -> Result<(), String> {
    reader
        .get_mut()
        .write_all(line.as_bytes())
        .await
        .map_err(|e| format!("connection lost: {e}"))
}

/// One reply: its code and its lines' texts (after `NNN-` / `NNN `).
async fn reply<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    timeout: Duration,
) -> Result<(u16, Vec<String>), String> {
    tokio::time::timeout(timeout, read_reply(reader))
        .await
        .map_err(|_| "no reply (timed out)".to_string())?
}

async fn read_reply<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<(u16, Vec<String>), String> {
    let mut lines = Vec::new();
    loop {
        let mut raw = Vec::new();
        let n = (&mut *reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut raw)
            .await
            .map_err(|e| format!("connection lost: {e}"))?;
        if n == 0 {
            return Err("connection closed".into());
        }
        let line = String::from_utf8_lossy(&raw);
        let line = line.trim_end_matches(['\r', '\n']);
        let code = line
            .get(..3)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| format!("not an SMTP reply: {line:?}"))?;
        let last = line.as_bytes().get(3) != Some(&b'-');
        lines.push(line.get(4..).unwrap_or("").to_owned());
        if last {
            return Ok((code, lines));
        }
        if lines.len() >= MAX_LINES {
            return Err("reply too long".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replies() {
        let mut input: &[u8] = b"250-mx1.example.com\r\n250-STARTTLS\r\n250 SIZE 10\r\n221 bye\r\n";
        let (code, lines) = read_reply(&mut input).await.unwrap();
        assert_eq!(code, 250);
        assert_eq!(lines, ["mx1.example.com", "STARTTLS", "SIZE 10"]);
        let (code, lines) = read_reply(&mut input).await.unwrap();
        assert_eq!((code, lines.as_slice()), (221, &["bye".to_string()][..]));
        assert!(read_reply(&mut input).await.is_err());
        let mut garbage: &[u8] = b"HTTP/1.1 400 Bad Request\r\n";
        assert!(read_reply(&mut garbage).await.is_err());
    }
}
