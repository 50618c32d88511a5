//! Mailbox fetch against a real Dovecot on loopback (POP3 and IMAP, plain,
//! STARTTLS and implicit TLS) and a real primary: what the catch-all holds
//! reaches the primary with the envelope the headers give, nothing is
//! fetched twice, and nothing fetched is dropped.

mod common;
mod primary;

use std::time::Duration;

use common::dovecot::Dovecot;
use common::{TestConfig, TestServer, eventually};
use primary::Primary;

const WAIT: Duration = Duration::from_secs(10);
const USER: &str = "catchall";
const PASSWORD: &str = "s3cret pass";

/// `example.com` (anyone) and `listed.test` (alice, bob) routed to
/// `primary`, and one `[[fetch]]` block "isp" for both, polled every hour
/// (tests run fetches on demand).
fn config(primary: &Primary, dovecot: &Dovecot, protocol: &str, extra: &str) -> TestConfig {
    let server = match protocol {
        "pop3" => dovecot.pop3s(),
        _ => dovecot.imaps(),
    };
    TestConfig::default().domains(&format!(
        r#"
[[domain]]
name = "example.com"
route = "[127.0.0.1]:{port}"

[[domain]]
name = "listed.test"
route = "[127.0.0.1]:{port}"
recipients = ["alice", "bob"]

[[fetch]]
name = "isp"
protocol = "{protocol}"
server = "127.0.0.1:{server_port}"
tls = "implicit"
ca_file = "{ca}"
username = "{USER}"
password_file = "{password}"
interval = "1h"
domains = ["example.com", "listed.test"]
{extra}
"#,
        port = primary.addr.port(),
        server_port = server.port(),
        ca = dovecot.ca_file().display(),
        password = dovecot.password_file(PASSWORD).display(),
    ))
}

fn message(headers: &str, body: &str) -> Vec<u8> {
    format!(
        "{headers}Subject: test\nMessage-ID: <{}@sender.test>\n\n{body}\n",
        unique()
    )
    .into_bytes()
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("m{}", N.fetch_add(1, Ordering::Relaxed))
}

#[tokio::test]
async fn pop3_fetch_delivers_to_the_envelope_recipient_and_deletes() {
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]).await;
    let primary = Primary::start().await;
    dovecot.deliver(
        USER,
        &message(
            "Return-Path: <sender@origin.test>\nDelivered-To: fred@example.com\nFrom: sender@origin.test\nTo: list@lists.test\n",
            "hello fred",
        ),
    );
    let t = TestServer::start(config(&primary, &dovecot, "pop3", "")).await;
    let report = t.server.fetch_now("isp").await.expect("the block exists");
    assert_eq!(report.error, None, "{}", dovecot.log());
    assert_eq!((report.fetched, report.queued), (1, 1));
    assert!(primary.wait_for_messages(1, WAIT).await);
    let got = &primary.messages()[0];
    assert_eq!(got.mail_from_line, "MAIL FROM:<sender@origin.test>");
    assert_eq!(got.rcpt_lines, vec!["RCPT TO:<fred@example.com>"]);
    let body = String::from_utf8_lossy(&got.body);
    assert!(
        body.starts_with("Received: from 127.0.0.1 ([127.0.0.1])"),
        "{body}"
    );
    assert!(body.contains("with POP3 id"), "{body}");
    assert!(!body.contains("Delivered-To:"), "{body}");
    eventually(WAIT, async || match dovecot.count(USER) {
        0 => Ok(()),
        n => Err(format!("{n} messages still in the mailbox")),
    })
    .await;
}

#[tokio::test]
async fn imap_idle_delivers_new_mail_within_seconds() {
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]).await;
    let primary = Primary::start().await;
    let t = TestServer::start(config(&primary, &dovecot, "imap", "")).await;
    // The first run (at startup) finds nothing, then waits in IDLE.
    let report = t.server.fetch_now("isp").await.expect("the block exists");
    assert_eq!(report.error, None, "{}", dovecot.log());
    let landed = tokio::time::Instant::now();
    dovecot.deliver(
        USER,
        &message(
            "To: Alice <alice@listed.test>, carol@elsewhere.test\n",
            "hi",
        ),
    );
    assert!(
        primary.wait_for_messages(1, Duration::from_secs(3)).await,
        "{}",
        dovecot.log()
    );
    assert!(landed.elapsed() < Duration::from_secs(3));
    let got = &primary.messages()[0];
    assert_eq!(got.mail_from_line, "MAIL FROM:<>");
    assert_eq!(got.rcpt_lines, vec!["RCPT TO:<alice@listed.test>"]);
    assert!(String::from_utf8_lossy(&got.body).contains("with IMAP id"));
    eventually(WAIT, async || match dovecot.count(USER) {
        0 => Ok(()),
        n => Err(format!("{n} messages still in the mailbox")),
    })
    .await;
}
