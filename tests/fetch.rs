//! Mailbox fetch against a real Dovecot on loopback (POP3 and IMAP, plain,
//! STARTTLS and implicit TLS) and a real primary: what the catch-all holds
//! reaches the primary with the envelope the headers give, nothing is
//! fetched twice, and nothing fetched is dropped (DESIGN.md, "Mailbox fetch").
//!
//! What it proves, for POP3 and IMAP alike unless said otherwise:
//!
//! - **Envelope recipients**: `Delivered-To:` names the one recipient of a
//!   copy (a Bcc'd user too) and wins over `To:`; the sender is
//!   `Return-Path:`; `Delivered-To:` and `Return-Path:` (folded ones too) are
//!   removed, and every other byte, header and body, reaches the primary
//!   unchanged below our one `Received:`.
//!   `X-Original-To:` and the top `Received: … for` do the same; a
//!   `Delivered-To:` naming only the provider's own mailbox falls back to `To:`.
//! - **To/Cc**: without envelope fields, the addresses of `To:`/`Cc:` at
//!   our domains that the recipient lists take, each once (ignoring case).
//! - **Postmaster**: an unlisted user (in `To:` or in `Delivered-To:`,
//!   which then does not fall back to `To:`), or no address of ours at all,
//!   goes to the block's `postmaster` (or `delivery.postmaster`) with an
//!   `X-Mxspool-Fetch-Reason:` field; the report counts it as `postmaster`.
//! - **Repairs**: `<<fred@@example.com>>` and `jim @ example.com.` reach
//!   fred@ and jim@.
//! - **Unparseable** bytes reach the postmaster from `<>` as a multipart
//!   message whose attachment is the original, byte for byte.
//! - **Deletion**: `delete = true` empties the mailbox; `delete = false`
//!   leaves it (IMAP: unread), and neither a second run nor a restart
//!   queues anything again; a message over `server.max_message_size`
//!   stays on the server, counted as `left`.
//! - **Duplicates**: the same Message-ID and size twice is queued once and
//!   both copies are deleted; the same Message-ID with another size is not
//!   a duplicate.
//! - **Crash window**: stored but not deleted (`delete = false`, then a
//!   restart with `delete = true`): deleted, not delivered again.
//! - **Authentication**: a wrong password is reported, counted as
//!   `auth_failed`, SMTP keeps working, and fixing the password file (no
//!   restart) makes the next run succeed and sets the last-success time.
//! - **TLS**: STARTTLS (with Dovecot logging the TLS login) and plain
//!   (`tls = "none"` to 127.0.0.1) both work for both protocols; a
//!   certificate nobody trusts (no `ca_file`) stops the run with a TLS
//!   error before anything is fetched, implicit TLS or STARTTLS.
//! - **Bounces**: a 5xx at the primary is reported to the postmaster with
//!   `bounce = "postmaster"` (the default), to the `Return-Path:` sender
//!   with `bounce = "sender"`, and to the postmaster when that sender is
//!   `<>`.
//! - **API and metrics**: `POST /api/fetch/{name}` runs a fetch and answers
//!   its report (404 for an unknown name, 401 without the token); the three
//!   fetch series exist at 0 from startup and count runs and messages.
//! - **IMAP IDLE** picks new mail up within seconds.

mod common;
mod primary;

use std::path::PathBuf;
use std::time::Duration;

use common::dovecot::Dovecot;
use common::{TestConfig, TestServer, eventually};
use mail_parser::MimeHeaders;
use mxspool::fetch::Report;
use primary::{Primary, Received};

const WAIT: Duration = Duration::from_secs(10);
const USER: &str = "catchall";
const PASSWORD: &str = "s3cret pass";
/// The admin token written to `admin_token_file` before each start.
const TOKEN: &str = "fetch-test-t0ken";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Pop3,
    Imap,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Pop3 => "pop3",
            Proto::Imap => "imap",
        }
    }

    /// What our `Received:` says it came with.
    fn with(self) -> &'static str {
        match self {
            Proto::Pop3 => "with POP3 id",
            Proto::Imap => "with IMAP id",
        }
    }
}

/// One `[[fetch]]` block: by default "isp", implicit TLS with the test CA,
/// the right password, polled every hour (tests run fetches on demand).
struct Block {
    name: &'static str,
    user: &'static str,
    proto: Proto,
    tls: &'static str,
    trusted: bool,
    password_file: PathBuf,
    extra: String,
}

impl Block {
    fn new(dovecot: &Dovecot, proto: Proto) -> Block {
        Block {
            name: "isp",
            user: USER,
            proto,
            tls: "implicit",
            trusted: true,
            password_file: dovecot.password_file(PASSWORD),
            extra: String::new(),
        }
    }

    /// Named `name`, fetching `user`'s mailbox.
    fn named(mut self, name: &'static str, user: &'static str) -> Block {
        self.name = name;
        self.user = user;
        self
    }

    fn tls(mut self, tls: &'static str) -> Block {
        self.tls = tls;
        self
    }

    /// Without `ca_file`: only the system roots, which do not know the test CA.
    fn untrusted(mut self) -> Block {
        self.trusted = false;
        self
    }

    fn password_file(mut self, path: PathBuf) -> Block {
        self.password_file = path;
        self
    }

    /// More keys of the block, e.g. `delete = false`.
    fn with(mut self, toml: &str) -> Block {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    fn toml(&self, dovecot: &Dovecot) -> String {
        let server = match (self.proto, self.tls) {
            (Proto::Pop3, "implicit") => dovecot.pop3s(),
            (Proto::Pop3, _) => dovecot.pop3(),
            (Proto::Imap, "implicit") => dovecot.imaps(),
            (Proto::Imap, _) => dovecot.imap(),
        };
        let ca = if self.trusted {
            format!("ca_file = \"{}\"\n", dovecot.ca_file().display())
        } else {
            String::new()
        };
        format!(
            r#"
[[fetch]]
name = "{name}"
protocol = "{protocol}"
server = "127.0.0.1:{port}"
tls = "{tls}"
{ca}username = "{user}"
password_file = "{password}"
interval = "1h"
domains = ["example.com", "listed.test"]
{extra}"#,
            name = self.name,
            protocol = self.proto.name(),
            port = server.port(),
            tls = self.tls,
            user = self.user,
            password = self.password_file.display(),
            extra = self.extra,
        )
    }
}

/// `example.com` (anyone) and `listed.test` (alice, bob) routed to
/// `primary`, the `blocks`, and an admin token file.
fn config(primary: &Primary, dovecot: &Dovecot, blocks: &[Block]) -> TestConfig {
    let mut toml = format!(
        r#"
[[domain]]
name = "example.com"
route = "[127.0.0.1]:{port}"

[[domain]]
name = "listed.test"
route = "[127.0.0.1]:{port}"
recipients = ["alice", "bob"]
"#,
        port = primary.addr.port(),
    );
    for block in blocks {
        toml.push_str(&block.toml(dovecot));
    }
    TestConfig::default()
        .set("http", "admin_token_file", r#""{dir}/admin-token""#)
        .domains(&toml)
}

/// The usual setup: one block "isp" of `proto` plus `extra` keys.
fn config_for(primary: &Primary, dovecot: &Dovecot, proto: Proto, extra: &str) -> TestConfig {
    config(primary, dovecot, &[Block::new(dovecot, proto).with(extra)])
}

/// A server on `config` in a new directory holding the admin token.
async fn start(config: TestConfig) -> TestServer {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("admin-token"), format!("{TOKEN}\n")).expect("token");
    TestServer::start_in(dir, config).await
}

/// Shuts `t` down and starts a server on `config` over the same directory
/// (and so the same spool).
async fn restart(t: TestServer, config: TestConfig) -> TestServer {
    let TestServer { server, dir, .. } = t;
    server.shutdown(Duration::from_secs(5)).await;
    TestServer::start_in(dir, config).await
}

/// A fetch of block `name` now, and its report.
async fn fetch_named(t: &TestServer, name: &str) -> Report {
    t.server.fetch_now(name).await.expect("the block exists")
}

async fn fetch(t: &TestServer) -> Report {
    fetch_named(t, "isp").await
}

/// A report of a run that went through, with these counts.
#[track_caller]
fn assert_counts(report: &Report, dovecot: &Dovecot, expected: Counts) {
    assert_eq!(report.error, None, "{report:?}\n{}", dovecot.log());
    let got = Counts {
        fetched: report.fetched,
        queued: report.queued,
        postmaster: report.postmaster,
        duplicates: report.duplicates,
        left: report.left,
    };
    assert_eq!(got, expected, "{report:?}");
}

#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
struct Counts {
    fetched: u64,
    queued: u64,
    postmaster: u64,
    duplicates: u64,
    left: u64,
}

fn fetched_and_queued(n: u64) -> Counts {
    Counts {
        fetched: n,
        queued: n,
        ..Counts::default()
    }
}

fn to_postmaster(n: u64) -> Counts {
    Counts {
        fetched: n,
        postmaster: n,
        ..Counts::default()
    }
}

/// Waits until the primary holds `n` messages, then until delivery has
/// settled, and returns them: exactly `n`.
async fn delivered(t: &TestServer, primary: &Primary, n: usize) -> Vec<Received> {
    assert!(
        primary.wait_for_messages(n, WAIT).await,
        "the primary got {} of {n} messages",
        primary.messages().len()
    );
    t.settled().await;
    let messages = primary.messages();
    assert_eq!(messages.len(), n, "{:#?}", summary(&messages));
    messages
}

/// The envelope and subject of each message, for assertion messages.
fn summary(messages: &[Received]) -> Vec<String> {
    messages
        .iter()
        .map(|m| {
            let body = String::from_utf8_lossy(&m.body);
            let subject = body.lines().find(|l| l.starts_with("Subject:"));
            format!("{} {:?} {subject:?}", m.mail_from_line, m.rcpt_lines)
        })
        .collect()
}

/// The one message whose body contains `needle`.
#[track_caller]
fn find<'a>(messages: &'a [Received], needle: &str) -> &'a Received {
    let found: Vec<_> = messages
        .iter()
        .filter(|m| String::from_utf8_lossy(&m.body).contains(needle))
        .collect();
    assert_eq!(found.len(), 1, "{needle:?} in {:#?}", summary(messages));
    found[0]
}

fn rcpt(address: &str) -> String {
    format!("RCPT TO:<{address}>")
}

/// The path of a MAIL or RCPT line, without its angle brackets and parameters.
fn path(line: &str) -> &str {
    line.split_once('<')
        .and_then(|(_, rest)| rest.split_once('>'))
        .map_or(line, |(path, _)| path)
}

/// The body below our `Received:` (which must name `proto`).
#[track_caller]
fn below_received(got: &Received, proto: Proto) -> Vec<u8> {
    let (received, rest) = common::split_received(&got.body);
    assert!(received.contains(proto.with()), "{received}");
    rest.to_vec()
}

/// Waits until `user`'s mailbox holds `n` messages.
async fn mailbox_holds(dovecot: &Dovecot, user: &str, n: usize) {
    eventually(WAIT, async || match dovecot.count(user) {
        c if c == n => Ok(()),
        c => Err(format!("{c} messages in the mailbox of {user}, not {n}")),
    })
    .await;
}

/// The value of the series `series` (name and labels, as rendered).
fn metric(t: &TestServer, series: &str) -> Option<f64> {
    let text = t.server.metrics().render(&t.spool().gauges(), 0);
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[track_caller]
fn runs(t: &TestServer, result: &str) -> f64 {
    let series = format!(r#"mxspool_fetch_runs_total{{account="isp",result="{result}"}}"#);
    metric(t, &series).unwrap_or_else(|| panic!("no {series}"))
}

#[track_caller]
fn last_success(t: &TestServer) -> f64 {
    metric(
        t,
        r#"mxspool_fetch_last_success_timestamp_seconds{account="isp"}"#,
    )
    .expect("the last-success series exists")
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("m{}", N.fetch_add(1, Ordering::Relaxed))
}

/// A message with `headers` (LF-terminated lines), a Subject, a unique
/// Message-ID and `body`.
fn message(headers: &str, subject: &str, body: &str) -> Vec<u8> {
    format!(
        "{headers}Subject: {subject}\nMessage-ID: <{}@sender.test>\n\n{body}\n",
        unique()
    )
    .into_bytes()
}

/// Runs `$case(Proto::Pop3)` and `$case(Proto::Imap)` as two tests, `$case::pop3`
/// and `$case::imap`.
macro_rules! both_protocols {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test]
            async fn pop3() {
                super::$case(super::Proto::Pop3).await
            }

            #[tokio::test]
            async fn imap() {
                super::$case(super::Proto::Imap).await
            }
        }
    )*};
}

both_protocols!(
    delivered_to_names_the_recipient,
    to_and_cc_without_envelope_fields,
    other_envelope_fields_and_the_fallback,
    unlisted_users_go_to_the_postmaster,
    mail_for_nobody_of_ours_goes_to_the_postmaster,
    malformed_addresses_are_repaired,
    unparseable_mail_is_attached_for_the_postmaster,
    delete_true_empties_the_mailbox,
    delete_false_keeps_mail_and_takes_it_once,
    oversized_mail_stays_on_the_server,
    duplicates_are_queued_once_and_deleted,
    stored_but_not_deleted_is_deleted_not_redelivered,
    wrong_password_is_reported_and_recovers,
    failures_are_reported_to_the_postmaster_by_default,
    failures_are_reported_to_the_sender_with_bounce_sender,
);

/// Case 1: a Bcc'd user's copy (To: a list, Delivered-To: them) reaches only
/// them, from the Return-Path, with both fields gone and every other byte kept.
async fn delivered_to_names_the_recipient(proto: Proto) {
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]).await;
    let primary = Primary::start().await;
    // CRLF already, so what the primary gets can be compared byte for byte.
    let original = "Return-Path: <sender@origin.test>\r\n\
        Delivered-To: catchall@isp.test\r\n\
        Received: from mx.origin.test by mx.isp.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n\
        Delivered-To:\r\n bob@example.com\r\n\
        From: Sender <sender@origin.test>\r\n\
        To: list@lists.test\r\n\
        Subject: a subject\r\n folded over two lines\r\n\
        X-Spacing:  odd   spacing  \r\n\
        Message-ID: <bcc-copy@origin.test>\r\n\
        \r\n\
        hello bob\r\n\
        .a line with a leading dot\r\n\
        Delivered-To: in the body, kept\r\n\
        Return-Path: <also@kept.test>\r\n";
    let expected = "Received: from mx.origin.test by mx.isp.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n\
        From: Sender <sender@origin.test>\r\n\
        To: list@lists.test\r\n\
        Subject: a subject\r\n folded over two lines\r\n\
        X-Spacing:  odd   spacing  \r\n\
        Message-ID: <bcc-copy@origin.test>\r\n\
        \r\n\
        hello bob\r\n\
        .a line with a leading dot\r\n\
        Delivered-To: in the body, kept\r\n\
        Return-Path: <also@kept.test>\r\n";
    dovecot.deliver(USER, original.as_bytes());
    let t = start(config_for(&primary, &dovecot, proto, "")).await;
    assert_counts(&fetch(&t).await, &dovecot, fetched_and_queued(1));
    let got = &delivered(&t, &primary, 1).await[0];
    assert_eq!(got.mail_from_line, "MAIL FROM:<sender@origin.test>");
    assert_eq!(got.rcpt_lines, vec![rcpt("bob@example.com")]);
    let (received, _) = common::split_received(&got.body);
    assert!(received.contains("for <bob@example.com>"), "{received}");
    let rest = below_received(got, proto);
    assert_eq!(
        String::from_utf8_lossy(&rest),
        expected,
        "everything but Delivered-To and Return-Path arrives unchanged"
    );
    mailbox_holds(&dovecot, USER, 0).await;
}

/// Case 2: no envelope field: To and Cc addresses that are ours, each once.
async fn to_and_cc_without_envelope_fields(proto: Proto) {
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]).await;
    let primary = Primary::start().await;
    dovecot.deliver(
        USER,
        &message(
            "From: someone@origin.test\n\
             To: fred@example.com, james@foreign.test\n\
             Cc: alice@listed.test, Fred@Example.com, \"Alice again\" <ALICE@listed.test>\n",
            "to and cc",
            "hi all",
        ),
    );
    let t = start(config_for(&primary, &dovecot, proto, "")).await;
    assert_counts(&fetch(&t).await, &dovecot, fetched_and_queued(1));
    // One transaction per recipient domain.
    let messages = delivered(&t, &primary, 2).await;
    let mut rcpts: Vec<&str> = Vec::new();
    for got in &messages {
        assert_eq!(got.mail_from_line, "MAIL FROM:<>", "no Return-Path: <>");
        rcpts.extend(got.rcpt_lines.iter().map(String::as_str));
        let rest = String::from_utf8(below_received(got, proto)).unwrap();
        assert!(
            rest.starts_with(
                "From: someone@origin.test\r\nTo: fred@example.com, james@foreign.test\r\n"
            ),
            "{rest}"
        );
    }
    rcpts.sort();
    assert_eq!(
        rcpts,
        [rcpt("alice@listed.test"), rcpt("fred@example.com")],
        "each once, nobody else"
    );
    let spooled = t.stored();
    assert!(spooled.is_empty(), "all delivered: {spooled:?}");
    mailbox_holds(&dovecot, USER, 0).await;
}

/// The other envelope fields (the top `Received: … for`, `X-Original-To`)
/// name the recipient too, over `To:`; a `Delivered-To:` naming only the
/// provider's own mailbox (not ours) falls back to `To:`.
async fn other_envelope_fields_and_the_fallback(proto: Proto) {
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]).await;
    let primary = Primary::start().await;
    let cases = [
        (
            "Received: from mx.origin.test by mx.isp.test\n for <bob@listed.test>; Mon, 1 Jan 2024 00:00:00 +0000\n\
             Received: from a.test by mx.origin.test for <fred@example.com>; Mon, 1 Jan 2024 00:00:00 +0000\n\
             To: alice@listed.test\n",
            "received for",
            "bob@listed.test",
        ),
        (
            "X-Original-To: fred@example.com\nTo: alice@listed.test\n",
            "original to",
            "fred@example.com",
        ),
        (
            "Delivered-To: catchall@isp.test\nTo: alice@listed.test\n",
            "provider's mailbox only",
            "alice@listed.test",
        ),
    ];
    for (headers, subject, _) in cases {
        dovecot.deliver(USER, &message(headers, subject, "x"));
    }
    let t = start(config_for(&primary, &dovecot, proto, "")).await;
    assert_counts(&fetch(&t).await, &dovecot, fetched_and_queued(3));
    let messages = delivered(&t, &primary, 3).await;
    for (_, subject, to) in cases {
        let got = find(&messages, &format!("Subject: {subject}\r\n"));
        assert_eq!(got.rcpt_lines, vec![rcpt(to)], "{subject}");
    }
    mailbox_holds(&dovecot, USER, 0).await;
}

/// Case 3: an address at a listed domain that its list does not have goes to
/// the postmaster, with the reason; an unlisted `Delivered-To:` does not fall
/// back to a listed `To:`. POP3 names the block's own postmaster, IMAP uses
/// `delivery.postmaster`.
async fn unlisted_users_go_to_the_postmaster(proto: Proto) {
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]).await;
    let primary = Primary::start().await;
    let (postmaster, extra) = match proto {
        Proto::Pop3 => (
            "fetchmaster@example.com",
            r#"postmaster = "fetchmaster@example.com""#,
        ),
        Proto::Imap => (common::POSTMASTER, ""),
    };
    dovecot.deliver(
        USER,
        &message(
            "Return-Path: <sender@origin.test>\nTo: zed@listed.test\n",
            "for zed",
            "who is zed?",
        ),
    );
    dovecot.deliver(
        USER,
        &message(
            "Delivered-To: zoe@listed.test\nTo: alice@listed.test\n",
            "copy for zoe",
            "zoe's copy, not alice's",
        ),
    );
    let t = start(config_for(&primary, &dovecot, proto, extra)).await;
    assert_counts(&fetch(&t).await, &dovecot, to_postmaster(2));
    let messages = delivered(&t, &primary, 2).await;
    for (subject, user, from) in [
        (
            "for zed",
            "zed@listed.test",
            "MAIL FROM:<sender@origin.test>",
        ),
        ("copy for zoe", "zoe@listed.test", "MAIL FROM:<>"),
    ] {
        let got = find(&messages, &format!("Subject: {subject}"));
        assert_eq!(got.rcpt_lines, vec![rcpt(postmaster)], "{subject}");
        assert_eq!(got.mail_from_line, from, "{subject}");
        let rest = String::from_utf8(below_received(got, proto)).unwrap();
        let reason = rest.lines().next().unwrap_or_default();
        assert!(
            reason.starts_with("X-Mxspool-Fetch-Reason: ")
                && rest.contains("not in the recipient list")
                && rest.contains(user),
            "{rest}"
        );
    }
    mailbox_holds(&dovecot, USER, 0).await;
}

/// Case 4: no address at our domains anywhere: to the postmaster, with why.
async fn mail_for_nobody_of_ours_goes_to_the_postmaster(proto: Proto) {
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]).await;
    let primary = Primary::start().await;
    dovecot.deliver(
        USER,
        &message(
            "Delivered-To: catchall@isp.test\nTo: someone@foreign.test\n",
            "for a stranger",
            "not ours",
        ),
    );
    let t = start(config_for(&primary, &dovecot, proto, "")).await;
    assert_counts(&fetch(&t).await, &dovecot, to_postmaster(1));
    let got = &delivered(&t, &primary, 1).await[0];
    assert_eq!(got.rcpt_lines, vec![rcpt(common::POSTMASTER)]);
    let rest = String::from_utf8(below_received(got, proto)).unwrap();
    assert!(
        rest.starts_with("X-Mxspool-Fetch-Reason: no recipient at our domains"),
        "{rest}"
    );
    assert!(rest.contains("someone@foreign.test"), "{rest}");
    assert!(rest.contains("Subject: for a stranger\r\n"), "{rest}");
    assert!(!rest.contains("Delivered-To:"), "{rest}");
    mailbox_holds(&dovecot, USER, 0).await;
}

/// Case 5: addresses broken in ways whose intent is clear are repaired.
async fn malformed_addresses_are_repaired(proto: Proto) {
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]).await;
    let primary = Primary::start().await;
    dovecot.deliver(
        USER,
        &message("To: <<fred@@example.com>>\n", "doubled", "for fred"),
    );
    dovecot.deliver(
        USER,
        &message("To: Jim <jim @ example.com.>\n", "spaced", "for jim"),
    );
    let t = start(config_for(&primary, &dovecot, proto, "")).await;
    assert_counts(&fetch(&t).await, &dovecot, fetched_and_queued(2));
    let messages = delivered(&t, &primary, 2).await;
    assert_eq!(
        find(&messages, "Subject: doubled").rcpt_lines,
        vec![rcpt("fred@example.com")]
    );
    assert_eq!(
        find(&messages, "Subject: spaced").rcpt_lines,
        vec![rcpt("jim@example.com")]
    );
    mailbox_holds(&dovecot, USER, 0).await;
}

/// Case 6: bytes without a header section reach the postmaster attached,
/// unchanged, to a message from `<>`.
async fn unparseable_mail_is_attached_for_the_postmaster(proto: Proto) {
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]).await;
    let primary = Primary::start().await;
    // No colon on the first line, 8-bit and control octets; CRLF, no NUL and
    // no leading dot, which the servers would be entitled to rewrite.
    let garbage: &[u8] =
        b"\xff\xfe\x01\x02 binary garbage \x7f\x1b[0m without a header\r\n\xc3\x28\x80\x81\xfa more\r\n\r\nend\r\n";
    dovecot.deliver(USER, garbage);
    let t = start(config_for(&primary, &dovecot, proto, "")).await;
    assert_counts(&fetch(&t).await, &dovecot, to_postmaster(1));
    let got = &delivered(&t, &primary, 1).await[0];
    assert_eq!(got.mail_from_line, "MAIL FROM:<>");
    assert_eq!(got.rcpt_lines, vec![rcpt(common::POSTMASTER)]);
    let rest = below_received(got, proto);
    let parsed = mail_parser::MessageParser::default()
        .parse(&rest)
        .expect("the wrapper parses");
    assert!(
        parsed
            .content_type()
            .is_some_and(|c| c.ctype() == "multipart" && c.subtype() == Some("mixed")),
        "{:?}",
        parsed.content_type()
    );
    assert!(
        parsed
            .subject()
            .is_some_and(|s| s.contains("could not be parsed")),
        "{:?}",
        parsed.subject()
    );
    assert_eq!(parsed.attachment_count(), 1);
    let attachment = parsed.attachment(0).expect("one attachment");
    assert_eq!(attachment.attachment_name(), Some("fetched-message.eml"));
    assert_eq!(
        attachment.contents(),
        garbage,
        "the original, byte for byte"
    );
    mailbox_holds(&dovecot, USER, 0).await;
}

/// Case 7a: with the default `delete = true` every message taken is gone.
async fn delete_true_empties_the_mailbox(proto: Proto) {
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]).await;
    let primary = Primary::start().await;
    for n in 0..3 {
        dovecot.deliver(
            USER,
            &message("To: fred@example.com\n", &format!("number {n}"), "x"),
        );
    }
    let t = start(config_for(&primary, &dovecot, proto, "")).await;
    assert_counts(&fetch(&t).await, &dovecot, fetched_and_queued(3));
    mailbox_holds(&dovecot, USER, 0).await;
    let messages = delivered(&t, &primary, 3).await;
    for n in 0..3 {
        find(&messages, &format!("Subject: number {n}"));
    }
    // Nothing left, nothing new.
    assert_counts(&fetch(&t).await, &dovecot, Counts::default());
}

/// Case 7b: `delete = false` leaves the mail (IMAP: unread) and takes each
/// message once, across runs and a restart.
async fn delete_false_keeps_mail_and_takes_it_once(proto: Proto) {
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]).await;
    let primary = Primary::start().await;
    for n in 0..2 {
        dovecot.deliver(
            USER,
            &message("To: fred@example.com\n", &format!("kept {n}"), "x"),
        );
    }
    let config = || config_for(&primary, &dovecot, proto, "delete = false");
    let t = start(config()).await;
    assert_counts(&fetch(&t).await, &dovecot, fetched_and_queued(2));
    assert_eq!(
        t.spool().fetch_seen("isp").unwrap().len(),
        2,
        "marked taken"
    );
    assert_counts(&fetch(&t).await, &dovecot, Counts::default());
    delivered(&t, &primary, 2).await;
    mailbox_holds(&dovecot, USER, 2).await;
    if proto == Proto::Imap {
        // Dovecot moved both into cur/ when it gave them UIDs; flags follow ":2,".
        let flags = maildir_flags(&dovecot);
        assert_eq!(flags.len(), 2, "{flags:?}");
        assert!(
            flags.iter().all(|f| !f.contains('S')),
            "BODY.PEEK leaves mail unread: {flags:?}"
        );
    }

    let t = restart(t, config()).await;
    assert_counts(&fetch(&t).await, &dovecot, Counts::default());
    // Once more, after a run of the restarted server.
    assert_counts(&fetch(&t).await, &dovecot, Counts::default());
    t.settled().await;
    let messages = primary.messages();
    assert_eq!(messages.len(), 2, "{:#?}", summary(&messages));
    find(&messages, "Subject: kept 0");
    find(&messages, "Subject: kept 1");
    mailbox_holds(&dovecot, USER, 2).await;
}

/// The flags (what follows `:2,` in the file name) of each message in the
/// Maildir's `cur/`.
fn maildir_flags(dovecot: &Dovecot) -> Vec<String> {
    std::fs::read_dir(dovecot.maildir(USER).join("cur"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .map(|name| name.rsplit_once(":2,").map_or("", |(_, f)| f).to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A message over `server.max_message_size` (10 000 in tests) is left on the
/// server, every run, while the rest is taken.
async fn oversized_mail_stays_on_the_server(proto: Proto) {
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]).await;
    let primary = Primary::start().await;
    let line = "x".repeat(70);
    let big = vec![line.as_str(); 200].join("\n");
    dovecot.deliver(USER, &message("To: fred@example.com\n", "too big", &big));
    dovecot.deliver(USER, &message("To: fred@example.com\n", "small", "x"));
    let t = start(config_for(&primary, &dovecot, proto, "")).await;
    let left = Counts {
        left: 1,
        ..fetched_and_queued(1)
    };
    assert_counts(&fetch(&t).await, &dovecot, left);
    mailbox_holds(&dovecot, USER, 1).await;
    let messages = delivered(&t, &primary, 1).await;
    find(&messages, "Subject: small");
    let again = Counts {
        left: 1,
        ..Counts::default()
    };
    assert_counts(&fetch(&t).await, &dovecot, again);
    mailbox_holds(&dovecot, USER, 1).await;
}

/// Case 8: the provider's second copy (same Message-ID and size) is queued
/// once, and both copies are deleted; a different size is another message.
async fn duplicates_are_queued_once_and_deleted(proto: Proto) {
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]).await;
    let primary = Primary::start().await;
    let copy = b"To: fred@example.com\nSubject: twice\nMessage-ID: <same@origin.test>\n\nbody\n";
    let longer =
        b"To: fred@example.com\nSubject: longer\nMessage-ID: <same@origin.test>\n\nbody, longer\n";
    dovecot.deliver(USER, copy);
    dovecot.deliver(USER, copy);
    dovecot.deliver(USER, longer);
    let t = start(config_for(&primary, &dovecot, proto, "")).await;
    let counts = Counts {
        fetched: 3,
        queued: 2,
        duplicates: 1,
        ..Counts::default()
    };
    assert_counts(&fetch(&t).await, &dovecot, counts);
    mailbox_holds(&dovecot, USER, 0).await;
    let messages = delivered(&t, &primary, 2).await;
    find(&messages, "Subject: twice");
    find(&messages, "Subject: longer");
}

/// Case 9: the crash window between the spool commit and the deletion,
/// simulated: stored with `delete = false`, then a restart with `delete =
/// true` deletes the message without delivering it again.
async fn stored_but_not_deleted_is_deleted_not_redelivered(proto: Proto) {
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]).await;
    let primary = Primary::start().await;
    dovecot.deliver(USER, &message("To: fred@example.com\n", "stored once", "x"));
    let t = start(config_for(&primary, &dovecot, proto, "delete = false")).await;
    assert_counts(&fetch(&t).await, &dovecot, fetched_and_queued(1));
    delivered(&t, &primary, 1).await;
    mailbox_holds(&dovecot, USER, 1).await;

    let t = restart(t, config_for(&primary, &dovecot, proto, "delete = true")).await;
    assert_counts(&fetch(&t).await, &dovecot, Counts::default());
    mailbox_holds(&dovecot, USER, 0).await;
    t.settled().await;
    assert_eq!(primary.messages().len(), 1, "delivered exactly once");
    assert!(t.stored().is_empty(), "nothing queued again");
}

/// Case 10: a wrong password is an authentication failure, counted as such;
/// SMTP goes on; the right password in the same file (no restart) works.
async fn wrong_password_is_reported_and_recovers(proto: Proto) {
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]).await;
    let primary = Primary::start().await;
    dovecot.deliver(USER, &message("To: fred@example.com\n", "waiting", "x"));
    let password_file = dovecot.password_file("not the password");
    let block = Block::new(&dovecot, proto).password_file(password_file.clone());
    let t = start(config(&primary, &dovecot, &[block])).await;

    let report = fetch(&t).await;
    let error = report.error.clone().expect("the run fails");
    assert!(error.starts_with("authentication failed"), "{error}");
    assert_eq!((report.fetched, report.queued), (0, 0));
    assert_eq!(runs(&t, "auth_failed"), 1.0);
    assert_eq!(runs(&t, "ok"), 0.0);
    assert_eq!(runs(&t, "error"), 0.0);
    assert_eq!(last_success(&t), 0.0);
    // Again: counted again.
    assert!(fetch(&t).await.error.is_some());
    assert_eq!(runs(&t, "auth_failed"), 2.0);
    mailbox_holds(&dovecot, USER, 1).await;

    let mut client = t.ehlo().await;
    client
        .send_mail(
            "someone@origin.test",
            &["fred@example.com"],
            b"Subject: over SMTP\r\n\r\nstill working\r\n",
        )
        .await
        .assert(250);
    client.quit().await;

    std::fs::write(&password_file, format!("{PASSWORD}\n")).expect("rewrite the password");
    assert_counts(&fetch(&t).await, &dovecot, fetched_and_queued(1));
    assert_eq!(runs(&t, "ok"), 1.0);
    assert_eq!(runs(&t, "auth_failed"), 2.0);
    assert!(last_success(&t) > 0.0);
    assert_eq!(
        metric(&t, r#"mxspool_fetched_messages_total{account="isp"}"#),
        Some(1.0)
    );
    let messages = delivered(&t, &primary, 2).await;
    find(&messages, "Subject: over SMTP");
    find(&messages, "Subject: waiting");
    mailbox_holds(&dovecot, USER, 0).await;
}

/// Case 12, default: the primary's 5xx for fetched mail is reported to the
/// block's postmaster, not to the Return-Path sender (a header anyone forges).
async fn failures_are_reported_to_the_postmaster_by_default(proto: Proto) {
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]).await;
    let primary = Primary::start().await;
    primary.set_rcpt_reply("victim@example.com", "550 5.1.1 no such user");
    dovecot.deliver(
        USER,
        &message(
            "Return-Path: <author@example.com>\nTo: victim@example.com\n",
            "refused",
            "x",
        ),
    );
    let t = start(config_for(&primary, &dovecot, proto, "")).await;
    assert_counts(&fetch(&t).await, &dovecot, fetched_and_queued(1));
    let notice = &delivered(&t, &primary, 1).await[0];
    assert_notice(notice, common::POSTMASTER);
}

/// Case 12, `bounce = "sender"`: the notice goes to the Return-Path sender;
/// without one (`<>`), to the postmaster.
async fn failures_are_reported_to_the_sender_with_bounce_sender(proto: Proto) {
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]).await;
    let primary = Primary::start().await;
    primary.set_rcpt_reply("victim@example.com", "550 5.1.1 no such user");
    dovecot.deliver(
        USER,
        &message(
            "Return-Path: <author@example.com>\nTo: victim@example.com\n",
            "refused",
            "x",
        ),
    );
    dovecot.deliver(
        USER,
        &message("To: victim@example.com\n", "refused, from nobody", "x"),
    );
    let t = start(config_for(
        &primary,
        &dovecot,
        proto,
        r#"bounce = "sender""#,
    ))
    .await;
    assert_counts(&fetch(&t).await, &dovecot, fetched_and_queued(2));
    let notices = delivered(&t, &primary, 2).await;
    let to_author = find(&notices, "Subject: refused\r\n");
    assert_notice(to_author, "author@example.com");
    let to_postmaster = find(&notices, "Subject: refused, from nobody\r\n");
    assert_notice(to_postmaster, common::POSTMASTER);
}

/// A failure notice (from `<>`, to `to` only) about victim@example.com's 550.
#[track_caller]
fn assert_notice(notice: &Received, to: &str) {
    assert!(
        notice.mail_from_line.starts_with("MAIL FROM:<>"),
        "{}",
        notice.mail_from_line
    );
    assert_eq!(path(&notice.mail_from_line), "");
    let to_only: Vec<&str> = notice.rcpt_lines.iter().map(|l| path(l)).collect();
    assert_eq!(to_only, [to], "{:?}", notice.rcpt_lines);
    let body = String::from_utf8_lossy(&notice.body);
    assert!(
        body.contains("victim@example.com") && body.contains("5.1.1"),
        "{body}"
    );
    assert!(body.contains("multipart/report"), "{body}");
}

/// Case 11: STARTTLS and plain, both protocols, in one server with four
/// blocks on four mailboxes; Dovecot confirms which logins used TLS.
#[tokio::test]
async fn starttls_and_plain_work_for_both_protocols() {
    const CASES: [(&str, &str, Proto, &str); 4] = [
        ("pop3-starttls", "u1", Proto::Pop3, "starttls"),
        ("pop3-plain", "u2", Proto::Pop3, "none"),
        ("imap-starttls", "u3", Proto::Imap, "starttls"),
        ("imap-plain", "u4", Proto::Imap, "none"),
    ];
    let users: Vec<(&str, &str)> = CASES.iter().map(|c| (c.1, PASSWORD)).collect();
    let dovecot = Dovecot::start(&users).await;
    let primary = Primary::start().await;
    let mut blocks = Vec::new();
    for (name, user, proto, tls) in CASES {
        dovecot.deliver(
            user,
            &message(
                &format!("Delivered-To: {user}@example.com\n"),
                &format!("via {name}"),
                "x",
            ),
        );
        blocks.push(Block::new(&dovecot, proto).named(name, user).tls(tls));
    }
    let t = start(config(&primary, &dovecot, &blocks)).await;
    // Each block's task starts with a run of its own, so which run takes a
    // message is not known: each run must succeed, and all the mail arrive.
    for (name, user, _, _) in CASES {
        let report = fetch_named(&t, name).await;
        assert_eq!(report.error, None, "{name}: {report:?}\n{}", dovecot.log());
        mailbox_holds(&dovecot, user, 0).await;
    }
    let messages = delivered(&t, &primary, CASES.len()).await;
    for (name, user, proto, _) in CASES {
        let got = find(&messages, &format!("Subject: via {name}"));
        assert_eq!(got.rcpt_lines, vec![rcpt(&format!("{user}@example.com"))]);
        below_received(got, proto);
    }
    // Dovecot's login lines say whether the session was TLS.
    let log = dovecot.log();
    for (name, user, _, tls) in CASES {
        let logins: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&format!("-login: Info: Login: user=<{user}>,")))
            .collect();
        assert!(!logins.is_empty(), "{name}: no login logged\n{log}");
        for login in logins {
            assert_eq!(
                login.contains(", TLS"),
                tls == "starttls",
                "{name}: {login}"
            );
        }
    }
}

/// Case 11: a certificate no configured root vouches for stops the run at
/// TLS, before the password is sent: nothing fetched, mailbox untouched.
#[tokio::test]
async fn an_untrusted_certificate_stops_the_run() {
    const CASES: [(&str, Proto, &str); 4] = [
        ("pop3s", Proto::Pop3, "implicit"),
        ("pop3-starttls", Proto::Pop3, "starttls"),
        ("imaps", Proto::Imap, "implicit"),
        ("imap-starttls", Proto::Imap, "starttls"),
    ];
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]).await;
    let primary = Primary::start().await;
    dovecot.deliver(USER, &message("To: fred@example.com\n", "waiting", "x"));
    let blocks: Vec<Block> = CASES
        .iter()
        .map(|&(name, proto, tls)| {
            Block::new(&dovecot, proto)
                .named(name, USER)
                .tls(tls)
                .untrusted()
        })
        .collect();
    let t = start(config(&primary, &dovecot, &blocks)).await;
    for (name, _, _) in CASES {
        let report = fetch_named(&t, name).await;
        let error = report.error.clone().unwrap_or_default();
        assert!(
            error.starts_with("TLS: ") && error.to_lowercase().contains("certificate"),
            "{name}: {report:?}"
        );
        assert_eq!(report.fetched, 0, "{name}");
        let series = format!(r#"mxspool_fetch_runs_total{{account="{name}",result="error"}}"#);
        assert!(metric(&t, &series).is_some_and(|n| n >= 1.0), "{name}");
    }
    mailbox_holds(&dovecot, USER, 1).await;
    assert!(t.stored().is_empty());
    assert!(
        !dovecot.log().contains("Login: "),
        "nobody logged in:\n{}",
        dovecot.log()
    );
    t.settled().await;
    assert!(primary.messages().is_empty());
}

/// Case 13: the admin API runs a fetch and answers its report.
#[tokio::test]
async fn api_runs_a_fetch_and_answers_its_report() {
    use common::http::request;
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]).await;
    let primary = Primary::start().await;
    let t = start(config_for(&primary, &dovecot, Proto::Pop3, "")).await;
    // The run at startup, done before the mail comes (POP3: no IDLE, and the
    // next run is an hour away).
    assert_counts(&fetch(&t).await, &dovecot, Counts::default());
    dovecot.deliver(USER, &message("To: fred@example.com\n", "via the API", "x"));
    dovecot.deliver(USER, &message("To: nobody@foreign.test\n", "orphan", "x"));
    let addr = t.server.http_addr();
    let auth = format!("Bearer {TOKEN}");
    let with_token = [("Authorization", auth.as_str())];

    let denied = request(addr, "POST", "/api/fetch/isp", &[], None)
        .await
        .unwrap();
    denied.expect_error(401);

    let answer = request(addr, "POST", "/api/fetch/isp", &with_token, None)
        .await
        .unwrap();
    let json = answer.expect(200);
    assert_eq!(json["account"], "isp", "{json}");
    let report = &json["report"];
    assert_eq!(
        report,
        &serde_json::json!({
            "fetched": 2, "queued": 1, "postmaster": 1, "duplicates": 0, "left": 0,
            "error": null
        }),
        "{json}"
    );
    mailbox_holds(&dovecot, USER, 0).await;
    delivered(&t, &primary, 2).await;

    let missing = request(addr, "POST", "/api/fetch/nope", &with_token, None)
        .await
        .unwrap();
    let error = missing.expect_error(404);
    assert!(error.contains("nope") && error.contains("isp"), "{error}");
    assert!(t.server.fetch_now("nope").await.is_none());
}

/// Case 14: every fetch series of the account exists from startup at 0, and
/// then counts what runs did.
#[tokio::test]
async fn metrics_exist_from_startup_and_count() {
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]).await;
    let primary = Primary::start().await;
    dovecot.deliver(USER, &message("To: fred@example.com\n", "one", "x"));
    dovecot.deliver(USER, &message("To: fred@example.com\n", "two", "x"));
    let t = start(config_for(&primary, &dovecot, Proto::Imap, "")).await;
    // Before anything ran (the startup run has not had a turn yet: this
    // test's runtime is single-threaded and nothing was awaited since).
    for result in ["ok", "auth_failed", "error"] {
        assert_eq!(runs(&t, result), 0.0, "{result}");
    }
    assert_eq!(
        metric(&t, r#"mxspool_fetched_messages_total{account="isp"}"#),
        Some(0.0)
    );
    assert_eq!(last_success(&t), 0.0);

    assert_counts(&fetch(&t).await, &dovecot, fetched_and_queued(2));
    assert_eq!(runs(&t, "ok"), 1.0);
    assert_eq!(runs(&t, "error") + runs(&t, "auth_failed"), 0.0);
    assert_eq!(
        metric(&t, r#"mxspool_fetched_messages_total{account="isp"}"#),
        Some(2.0)
    );
    // The server's clock, in whole seconds, as of the run just done.
    let now = (t.clock.now_ms() / 1000) as f64;
    let at = last_success(&t);
    assert!(
        at > 0.0 && at <= now && now - at < 60.0,
        "last success {at}, now {now}"
    );
    delivered(&t, &primary, 2).await;
}

/// New mail is fetched during IMAP IDLE without asking, long before the
/// interval is up.
#[tokio::test]
async fn imap_idle_delivers_new_mail_within_seconds() {
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]).await;
    let primary = Primary::start().await;
    let t = start(config_for(&primary, &dovecot, Proto::Imap, "")).await;
    // The first run (at startup) finds nothing, then waits in IDLE.
    assert_counts(&fetch(&t).await, &dovecot, Counts::default());
    dovecot.deliver(
        USER,
        &message(
            "To: Alice <alice@listed.test>, carol@elsewhere.test\n",
            "idle",
            "hi",
        ),
    );
    // Nobody asks and the interval is an hour: only IDLE can bring it, and
    // it does within 3 s of the message landing in the mailbox.
    let landed = tokio::time::Instant::now();
    assert!(
        primary.wait_for_messages(1, Duration::from_secs(3)).await,
        "not delivered within 3 s of landing; {}",
        dovecot.log()
    );
    assert!(landed.elapsed() <= Duration::from_secs(3));
    let got = &primary.messages()[0];
    assert_eq!(got.mail_from_line, "MAIL FROM:<>");
    assert_eq!(got.rcpt_lines, vec![rcpt("alice@listed.test")]);
    below_received(got, Proto::Imap);
    mailbox_holds(&dovecot, USER, 0).await;
}
