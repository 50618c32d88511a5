//! The Dovecot harness itself, over raw sockets and no mxspool code: mail
//! written into the Maildir is what POP3 and IMAP report, passwords are
//! checked, IDLE notices a delivery, implicit TLS verifies against
//! `ca_file()`, and dropping the handle closes the listeners.

mod common;

use std::sync::Arc;

use common::dovecot::Dovecot;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const MESSAGE: &[u8] = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: hi\r\n\r\nbody\r\n";

/// A line-at-a-time POP3/IMAP conversation.
struct Conn<S> {
    stream: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(stream: S) -> Self {
        Conn {
            stream: BufReader::new(stream),
        }
    }

    async fn line(&mut self) -> String {
        let mut line = String::new();
        let n = tokio::time::timeout(common::REPLY_TIMEOUT, self.stream.read_line(&mut line))
            .await
            .expect("a line in time")
            .expect("read");
        assert!(n > 0, "connection closed");
        line
    }

    async fn send(&mut self, line: &str) {
        let stream = self.stream.get_mut();
        stream
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .expect("send");
        stream.flush().await.expect("flush");
    }

    /// A POP3 command and its one-line reply.
    async fn pop3(&mut self, line: &str) -> String {
        self.send(line).await;
        self.line().await
    }

    /// An IMAP command tagged with its first word; every line up to and
    /// including the tagged reply.
    async fn imap(&mut self, line: &str) -> String {
        self.send(line).await;
        self.until(&format!("{} ", line.split(' ').next().unwrap()))
            .await
    }

    /// Every line up to and including the first that starts with `start`.
    async fn until(&mut self, start: &str) -> String {
        let mut all = String::new();
        loop {
            let line = self.line().await;
            all.push_str(&line);
            if line.starts_with(start) {
                return all;
            }
        }
    }
}

async fn connect(addr: std::net::SocketAddr) -> Conn<TcpStream> {
    Conn::new(TcpStream::connect(addr).await.expect("connect"))
}

#[tokio::test]
async fn pop3_and_imap_see_delivered_mail_and_check_passwords() {
    let dovecot = Dovecot::start(&[("catchall@isp.test", "s3cret")]).await;
    assert_eq!(dovecot.count("catchall@isp.test"), 0);
    dovecot.deliver("catchall@isp.test", MESSAGE);
    dovecot.deliver("catchall@isp.test", MESSAGE);
    assert_eq!(dovecot.count("catchall@isp.test"), 2);

    let mut pop3 = connect(dovecot.pop3()).await;
    assert!(pop3.line().await.starts_with("+OK"));
    let capa = pop3.pop3("CAPA").await;
    assert!(capa.starts_with("+OK"), "{capa}");
    let mut stls = false;
    loop {
        let line = pop3.line().await;
        stls |= line.trim_end() == "STLS";
        if line == ".\r\n" {
            break;
        }
    }
    assert!(stls, "STLS offered on the plain POP3 port");
    assert!(pop3.pop3("USER catchall@isp.test").await.starts_with("+OK"));
    let pass = pop3.pop3("PASS s3cret").await;
    assert!(pass.starts_with("+OK"), "{pass}\n{}", dovecot.log());
    let stat = pop3.pop3("STAT").await;
    assert!(stat.starts_with("+OK 2 "), "{stat}");
    assert!(pop3.pop3("QUIT").await.starts_with("+OK"));

    let mut imap = connect(dovecot.imap()).await;
    let greeting = imap.line().await;
    assert!(greeting.starts_with("* OK"), "{greeting}");
    assert!(greeting.contains("STARTTLS"), "{greeting}");
    let login = imap.imap("a LOGIN catchall@isp.test s3cret").await;
    assert!(login.contains("a OK"), "{login}\n{}", dovecot.log());
    let select = imap.imap("b SELECT INBOX").await;
    assert!(select.contains("* 2 EXISTS"), "{select}");
    assert!(select.contains("b OK"), "{select}");
    imap.send("c IDLE").await;
    assert!(imap.line().await.starts_with("+ "));
    dovecot.deliver("catchall@isp.test", MESSAGE);
    imap.until("* 3 EXISTS").await;
    imap.send("DONE").await;
    let done = imap.until("c ").await;
    assert!(done.contains("c OK"), "{done}");
    imap.imap("d LOGOUT").await;

    let mut pop3 = connect(dovecot.pop3()).await;
    pop3.line().await;
    pop3.pop3("USER catchall@isp.test").await;
    let refused = pop3.pop3("PASS wrong").await;
    assert!(refused.starts_with("-ERR"), "{refused}");

    let mut imap = connect(dovecot.imap()).await;
    imap.line().await;
    let refused = imap.imap("a LOGIN catchall@isp.test wrong").await;
    assert!(refused.starts_with("a NO"), "{refused}");
    // No auth penalty: the next login from 127.0.0.1 is not held back
    // (Dovecot's default would make it wait 2 s or more).
    let asked = tokio::time::Instant::now();
    let login = imap.imap("b LOGIN catchall@isp.test s3cret").await;
    assert!(login.contains("b OK"), "{login}");
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(1),
        "login after a refused password took {:?}",
        asked.elapsed()
    );

    let log = dovecot.log();
    assert!(
        !["Error:", "Fatal:", "Panic:"]
            .iter()
            .any(|bad| log.contains(bad)),
        "Dovecot complained:\n{log}"
    );
}

#[tokio::test]
async fn implicit_tls_verifies_against_ca_file_and_drop_stops_dovecot() {
    let dovecot = Dovecot::start(&[("user", "pw")]).await;
    let ca = CertificateDer::from_pem_file(dovecot.ca_file()).expect("ca_file is PEM");
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

    for name in ["127.0.0.1", "localhost"] {
        let tcp = TcpStream::connect(dovecot.pop3s()).await.unwrap();
        let tls = connector
            .connect(ServerName::try_from(name).unwrap(), tcp)
            .await
            .unwrap_or_else(|e| panic!("TLS to pop3s as {name}: {e}"));
        let mut pop3 = Conn::new(tls);
        let greeting = pop3.line().await;
        assert!(greeting.starts_with("+OK"), "{greeting}");
    }

    let tcp = TcpStream::connect(dovecot.imaps()).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS to imaps");
    let mut imap = Conn::new(tls);
    assert!(imap.line().await.starts_with("* OK"));
    let login = imap.imap("a LOGIN user pw").await;
    assert!(login.contains("a OK"), "{login}");

    let password_file = dovecot.password_file("pw");
    assert_eq!(std::fs::read_to_string(&password_file).unwrap(), "pw\n");

    let addrs = [
        dovecot.imap(),
        dovecot.imaps(),
        dovecot.pop3(),
        dovecot.pop3s(),
    ];
    drop(imap);
    drop(dovecot);
    for addr in addrs {
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "{addr} still accepts after drop"
        );
    }
}
