//! STARTTLS on the listener: offered only with `[tls]`, a real handshake with
//! a rustls client, plaintext pipelined after STARTTLS discarded, a new EHLO
//! required, and `Received: ... with ESMTPS`.

mod common;

use std::sync::Arc;

use common::{TestConfig, TestServer};
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Writes a self-signed certificate and key for `mx2.test` into `dir`.
fn certificate(dir: &std::path::Path) -> CertificateDer<'static> {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["mx2.test".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    cert.der().clone()
}

async fn reply<R: AsyncRead + Unpin>(reader: &mut BufReader<R>) -> String {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(common::REPLY_TIMEOUT, reader.read_line(&mut line))
            .await
            .expect("reply in time")
            .unwrap();
        assert!(n > 0, "connection closed; got so far {all:?}");
        all.push_str(&line);
        if line.as_bytes().get(3) == Some(&b' ') {
            return all;
        }
    }
}

async fn cmd<S: AsyncRead + AsyncWrite + Unpin>(s: &mut BufReader<S>, line: &str) -> String {
    s.get_mut()
        .write_all(format!("{line}\r\n").as_bytes())
        .await
        .unwrap();
    reply(s).await
}

#[tokio::test]
async fn starttls_upgrades_discards_pipelined_plaintext_and_marks_esmtps() {
    let dir = tempfile::tempdir().unwrap();
    let ca = certificate(dir.path());
    let config = TestConfig::default()
        .set("tls", "cert", r#""{dir}/cert.pem""#)
        .set("tls", "key", r#""{dir}/key.pem""#);
    let t = TestServer::start_in(dir, config).await;

    let stream = TcpStream::connect(t.addr).await.unwrap();
    let mut plain = BufReader::new(stream);
    assert!(reply(&mut plain).await.starts_with("220 "));
    let ehlo = cmd(&mut plain, "EHLO client.test").await;
    assert!(ehlo.contains("250-STARTTLS\r\n"), "{ehlo}");

    // A command smuggled after STARTTLS in the same packet must be ignored.
    plain
        .get_mut()
        .write_all(b"STARTTLS\r\nMAIL FROM:<smuggled@evil.test>\r\n")
        .await
        .unwrap();
    assert!(reply(&mut plain).await.starts_with("220 2.0.0"));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tls = connector
        .connect(
            ServerName::try_from("mx2.test").unwrap(),
            plain.into_inner(),
        )
        .await
        .expect("handshake");
    let mut tls = BufReader::new(tls);

    // The session starts over: a new EHLO is needed and STARTTLS is gone.
    assert!(
        cmd(&mut tls, "MAIL FROM:<a@origin.test>")
            .await
            .starts_with("503")
    );
    let ehlo = cmd(&mut tls, "EHLO client.test").await;
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    assert!(cmd(&mut tls, "STARTTLS").await.starts_with("503"));
    // Had the smuggled MAIL counted, this would be a nested MAIL (503).
    assert!(
        cmd(&mut tls, "MAIL FROM:<a@origin.test>")
            .await
            .starts_with("250")
    );
    assert!(
        cmd(&mut tls, "RCPT TO:<user@example.com>")
            .await
            .starts_with("250")
    );
    assert!(cmd(&mut tls, "DATA").await.starts_with("354"));
    let queued = cmd(&mut tls, "Subject: over tls\r\n\r\nhello\r\n.").await;
    assert!(queued.starts_with("250 2.0.0 Ok: queued as"), "{queued}");
    cmd(&mut tls, "QUIT").await;

    let stored = t.stored();
    assert_eq!(stored.len(), 1);
    let (env, body) = &stored[0];
    assert_eq!(env.sender, "a@origin.test");
    assert!(env.client.tls);
    let text = String::from_utf8_lossy(body);
    assert!(text.contains("with ESMTPS id"), "{text}");
}

#[tokio::test]
async fn no_starttls_without_tls_config_and_bad_files_are_config_errors() {
    let t = TestServer::start(TestConfig::default()).await;
    let mut c = t.connect().await;
    let ehlo = c.cmd("EHLO client.test").await;
    assert!(!format!("{ehlo:?}").contains("STARTTLS"));
    c.cmd("STARTTLS").await.assert(502);

    let text = "[tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n[[domain]]\nname = \"example.com\"\n";
    let config = mxspool::config::Config::parse(text, std::path::Path::new("tls.toml")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = mxspool::Server::start(config, vec![listener])
        .await
        .err()
        .expect("a missing certificate stops startup")
        .to_string();
    assert!(err.contains("tls.toml: tls.cert"), "{err}");
}

#[tokio::test]
async fn a_failed_handshake_ends_only_that_session() {
    let dir = tempfile::tempdir().unwrap();
    certificate(dir.path());
    let config = TestConfig::default()
        .set("tls", "cert", r#""{dir}/cert.pem""#)
        .set("tls", "key", r#""{dir}/key.pem""#);
    let t = TestServer::start_in(dir, config).await;

    // A client that asks for TLS and then speaks plain text (or garbage).
    let stream = TcpStream::connect(t.addr).await.unwrap();
    let mut plain = BufReader::new(stream);
    assert!(reply(&mut plain).await.starts_with("220 "));
    cmd(&mut plain, "EHLO client.test").await;
    assert!(cmd(&mut plain, "STARTTLS").await.starts_with("220 2.0.0"));
    plain
        .get_mut()
        .write_all(b"MAIL FROM:<a@origin.test>\r\nthis is not a TLS ClientHello\r\n")
        .await
        .unwrap();
    // The server drops the connection without answering in plain text.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(
        common::REPLY_TIMEOUT,
        tokio::io::AsyncReadExt::read_to_end(&mut plain, &mut rest),
    )
    .await
    .expect("the connection is closed in time");
    assert!(
        read.is_err() || !String::from_utf8_lossy(&rest).contains("250"),
        "nothing is accepted outside TLS: {rest:?}"
    );

    // A client whose handshake fails on its side (it trusts nothing).
    let stream = TcpStream::connect(t.addr).await.unwrap();
    let mut plain = BufReader::new(stream);
    reply(&mut plain).await;
    cmd(&mut plain, "EHLO client.test").await;
    assert!(cmd(&mut plain, "STARTTLS").await.starts_with("220 2.0.0"));
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let failed = connector
        .connect(
            ServerName::try_from("mx2.test").unwrap(),
            plain.into_inner(),
        )
        .await;
    assert!(failed.is_err(), "an untrusted certificate must fail");

    // The server carries on for everyone else, and stored nothing.
    let mut c = t.ehlo().await;
    c.cmd("NOOP").await.assert(250);
    c.quit().await;
    assert!(t.stored().is_empty());
}
