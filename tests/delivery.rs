//! Delivery end to end: the real server, a scriptable primary, a real DNS
//! server, all on loopback.

mod common;
mod dns_server;
mod primary;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use common::{Client, POSTMASTER, TestConfig, TestServer, dot_stuff, eventually};
use dns_server::TestDns;
use hickory_proto::rr::RecordType;
use mxspool::config::TlsPolicy;
use mxspool::outbound::{Settings, Timeouts};
use mxspool::spool::{QueueId, RcptStatus, Recipient};
use primary::{Caps, Mode, Primary, Received};
use tokio::time::Instant;

fn message(subject: &str) -> Vec<u8> {
    format!("Subject: {subject}\r\n\r\nhello\r\n.leading dot\r\n").into_bytes()
}

/// A config whose only domain routes to `primary`, with fast retries and probes.
fn config_for(primary: &Primary) -> TestConfig {
    TestConfig::default()
        .set("delivery", "probe_interval", r#""200ms""#)
        .set("delivery", "retry_initial", r#""1h""#)
        .set("delivery", "retry_max", r#""2h""#)
        .domains(&format!(
            "[[domain]]\nname = \"example.com\"\nroute = \"[127.0.0.1]:{}\"\n",
            primary.addr.port()
        ))
}

#[tokio::test]
async fn mail_waits_while_the_primary_is_down_and_drains_once_it_is_back() {
    let primary = Primary::start().await;
    primary.set_mode(Mode::Down);
    let t = TestServer::start(config_for(&primary)).await;
    let mut c = t.ehlo().await;
    for i in 0..3 {
        c.send_mail(
            "a@origin.test",
            &["user@example.com"],
            &message(&format!("m{i}")),
        )
        .await
        .queue_id();
    }
    c.quit().await;

    // Deferred as unreachable, with an hour of backoff ahead.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let stored = t.stored();
        if stored.len() == 3 && stored.iter().all(|(e, _)| e.recipients[0].attempts >= 1) {
            assert!(stored.iter().all(|(e, _)| e.recipients[0].unreachable));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not deferred: {stored:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(primary.messages().is_empty());

    // Back: the probe notices within probe_interval and the queue drains.
    primary.set_mode(Mode::Up);
    assert!(
        primary.wait_for_messages(3, Duration::from_secs(5)).await,
        "queue did not drain; got {}",
        primary.messages().len()
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !t.stored().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "delivered mail stays queued"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = primary.messages();
    assert!(got[0].body.starts_with(b"Received: from client.test"));
    assert!(
        got.iter()
            .any(|m| m.data.windows(14).any(|w| w == b"\r\n..leading do"))
    );
}

// ---------------------------------------------------------------------------
// Shared set-up for the tests below.

/// The envelope sender of most test mail. Its domain is not ours: notices to
/// it are routed like any other mail, by MX lookup through the test DNS
/// server, and land on the sender's own mail server ([`Net::bounces`]).
const SENDER: &str = "sender@origin.test";

/// A small world on loopback: a DNS server, the primary of the relay domain
/// `example.com` (reached by a static route) and the sender's mail server
/// (`origin.test MX 10 mx.origin.test`, `mx.origin.test A 127.0.0.1`, on
/// `delivery.port`).
struct Net {
    dns: TestDns,
    /// example.com's primary.
    relay: Primary,
    /// origin.test's mail server: where notices to [`SENDER`] arrive.
    bounces: Primary,
}

impl Net {
    async fn start() -> Net {
        let dns = TestDns::start().await;
        let relay = Primary::start().await;
        let bounces = Primary::start().await;
        dns.set_mx("origin.test", &[(10, "mx.origin.test")]);
        dns.set_ips("mx.origin.test", &[LOCALHOST]);
        Net {
            dns,
            relay,
            bounces,
        }
    }

    /// Fast probes, an hour of backoff, DNS and `delivery.port` as above, and
    /// `example.com` routed to [`Net::relay`].
    fn config(&self) -> TestConfig {
        TestConfig::default()
            .set("delivery", "probe_interval", r#""200ms""#)
            .set("delivery", "retry_initial", r#""1h""#)
            .set("delivery", "retry_max", r#""2h""#)
            .set(
                "delivery",
                "nameservers",
                &format!(r#"["{}"]"#, self.dns.addr),
            )
            .set("delivery", "port", &self.bounces.addr.port().to_string())
            .domains(&format!(
                "[[domain]]\nname = \"example.com\"\nroute = \"[127.0.0.1]:{}\"\n",
                self.relay.addr.port()
            ))
    }
}

const LOCALHOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Outbound settings with every timeout set to `limit`.
/// How many spool transactions (each with its fsync) the server has committed.
fn commits(t: &TestServer) -> u64 {
    let text = t.server.metrics().render(&t.spool().gauges(), 0);
    text.lines()
        .find_map(|l| l.strip_prefix("mxspool_spool_commit_seconds_count "))
        .and_then(|v| v.trim().parse().ok())
        .expect("commit count in /metrics")
}

#[tokio::test]
async fn mail_for_a_primary_known_to_be_down_is_written_once() {
    let primary = Primary::start().await;
    primary.set_mode(Mode::Down);
    let t = TestServer::start(config_for(&primary)).await;
    let first = send(
        &t,
        "a@origin.test",
        &["user@example.com"],
        &message("first"),
    )
    .await;
    wait_attempts(&t, first, "user@example.com", 1).await;
    // The primary is now known to be down: new mail is stored already
    // waiting for it, one transaction per message and no rewrite after.
    let before = commits(&t);
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            send(
                &t,
                "a@origin.test",
                &["user@example.com"],
                &message(&format!("m{i}")),
            )
            .await,
        );
    }
    t.settled().await;
    assert_eq!(commits(&t) - before, 5, "one commit per message");
    for id in &ids {
        let r = queued_rcpt(&t, *id, "user@example.com").expect("queued");
        assert!(r.unreachable && r.attempts == 1, "{r:?}");
    }
    assert_eq!(primary.connections(), 0, "no attempt while it is down");
    primary.set_mode(Mode::Up);
    assert!(
        primary.wait_for_messages(6, Duration::from_secs(5)).await,
        "got {}",
        primary.messages().len()
    );
    for id in ids.iter().chain([&first]) {
        wait_gone(&t, *id).await;
    }
}

fn timeouts(limit: Duration) -> Settings {
    Settings {
        timeouts: Timeouts::uniform(limit),
        ..Settings::new("mx2.test", TlsPolicy::Opportunistic)
    }
}

/// A message with a recognisable Subject and Message-ID.
fn tagged(tag: &str) -> Vec<u8> {
    format!(
        "From: <{SENDER}>\r\nSubject: {tag}\r\nMessage-ID: <{tag}@origin.test>\r\n\r\nbody of {tag}\r\n"
    )
    .into_bytes()
}

/// One transaction with the MAIL and RCPT lines written out (parameters and
/// all); returns the queue ID.
async fn send_raw(c: &mut Client, mail: &str, rcpts: &[&str], content: &[u8]) -> QueueId {
    c.cmd(mail).await.assert(250);
    for rcpt in rcpts {
        c.cmd(rcpt).await.assert(250);
    }
    c.cmd("DATA").await.assert(354);
    c.send(dot_stuff(content)).await;
    c.reply().await.queue_id()
}

/// Sends one message in its own session; returns the queue ID.
async fn send(t: &TestServer, from: &str, to: &[&str], content: &[u8]) -> QueueId {
    let mut c = t.ehlo().await;
    let id = c.send_mail(from, to, content).await.queue_id();
    c.quit().await;
    id
}

/// The recipient `address` of queued message `id`, if the message is still queued.
fn queued_rcpt(t: &TestServer, id: QueueId, address: &str) -> Option<Recipient> {
    let env = t.spool().envelope(id).expect("read envelope")?;
    env.recipients.into_iter().find(|r| r.address == address)
}

/// Waits until recipient `address` of `id` has been tried `attempts` times
/// and is still queued; returns it.
async fn wait_attempts(t: &TestServer, id: QueueId, address: &str, attempts: u32) -> Recipient {
    eventually(WAIT, async || match queued_rcpt(t, id, address) {
        Some(r) if r.status == RcptStatus::Queued && r.attempts >= attempts => Ok(r),
        other => Err(format!("{address} of {id}: {other:?}")),
    })
    .await
}

/// Waits until message `id` has left the queue.
async fn wait_gone(t: &TestServer, id: QueueId) {
    eventually(WAIT, async || {
        match t.spool().envelope(id).expect("read envelope") {
            None => Ok(()),
            Some(env) => Err(format!("{id} is still queued: {env:?}")),
        }
    })
    .await
}

/// The messages `primary` accepted for `address` (by RCPT line).
fn received_for(primary: &Primary, address: &str) -> Vec<Received> {
    let path = format!("RCPT TO:<{address}>");
    primary
        .messages()
        .into_iter()
        .filter(|m| m.rcpt_lines.iter().any(|l| l.starts_with(&path)))
        .collect()
}

/// How many `RCPT TO:<address>` commands `primary` was sent.
fn rcpt_commands(primary: &Primary, address: &str) -> usize {
    let path = format!("RCPT TO:<{address}>");
    primary
        .commands()
        .iter()
        .filter(|l| l.starts_with(&path))
        .count()
}

/// A delivery status notification as a primary received it.
struct Notice {
    /// The message with folded header lines joined and quotes dropped.
    text: String,
}

impl Notice {
    /// Checks the envelope (from `<>`, to `to` only) and the report's MIME
    /// type, and returns the notice.
    #[track_caller]
    fn of(m: &Received, to: &str) -> Notice {
        assert!(
            m.mail_from_line.starts_with("MAIL FROM:<>"),
            "a notice is sent from the null sender: {}",
            m.mail_from_line
        );
        assert_eq!(m.rcpt_lines.len(), 1, "{:?}", m.rcpt_lines);
        assert!(
            m.rcpt_lines[0].starts_with(&format!("RCPT TO:<{to}>")),
            "notice to {to} expected: {:?}",
            m.rcpt_lines
        );
        let text = String::from_utf8_lossy(&m.body)
            .replace("\r\n\t", " ")
            .replace("\r\n ", " ")
            .replace('"', "");
        let notice = Notice { text };
        let content_type = notice.fields("Content-Type");
        assert!(
            content_type.first().is_some_and(|ct| {
                let ct = ct.to_ascii_lowercase();
                ct.starts_with("multipart/report") && ct.contains("report-type=delivery-status")
            }),
            "not a delivery status report: {content_type:?}\n{}",
            notice.text
        );
        notice
    }

    /// The values of every `name:` line (header or report field), in order.
    fn fields(&self, name: &str) -> Vec<String> {
        self.text
            .split("\r\n")
            .filter_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.eq_ignore_ascii_case(name)
                    .then(|| value.trim().to_string())
            })
            .collect()
    }

    /// The single recipient block: (Final-Recipient, Action, Status).
    #[track_caller]
    fn single(&self) -> (String, String, String) {
        let one = |name: &str| {
            let values = self.fields(name);
            assert_eq!(values.len(), 1, "{name}: {values:?}\n{}", self.text);
            values[0].clone()
        };
        (one("Final-Recipient"), one("Action"), one("Status"))
    }

    fn mentions(&self, text: &str) -> bool {
        self.text.contains(text)
    }
}

/// How long any single expected event may take.
const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Routing

#[tokio::test]
async fn mail_follows_the_mx_records_to_the_better_primary() {
    let dns = TestDns::start().await;
    let primary = Primary::start().await;
    dns.set_mx("example.com", &[(10, "mx1.example.com"), (20, "mx2.test")]);
    dns.set_ips("mx1.example.com", &[LOCALHOST]);
    let config = TestConfig::default()
        .set("delivery", "probe_interval", r#""200ms""#)
        .set("delivery", "nameservers", &format!(r#"["{}"]"#, dns.addr))
        .set("delivery", "port", &primary.addr.port().to_string())
        .domains("[[domain]]\nname = \"example.com\"\n");
    let t = TestServer::start(config).await;
    let id = send(&t, SENDER, &["user@example.com"], &tagged("via-mx")).await;
    assert!(
        primary.wait_for_messages(1, WAIT).await,
        "nothing delivered via MX"
    );
    let got = primary.messages();
    assert_eq!(got[0].rcpt_lines, vec!["RCPT TO:<user@example.com>"]);
    assert_eq!(
        got[0].mail_from_line.split(' ').nth(1),
        Some("FROM:<sender@origin.test>")
    );
    wait_gone(&t, id).await;
    assert!(dns.queries("example.com", RecordType::MX) >= 1);
}

#[tokio::test]
async fn being_the_best_mx_defers_the_mail_as_a_loop() {
    let dns = TestDns::start().await;
    // Everything routed by MX lands here: the sender's server, and the
    // loop domain's if we ever (wrongly) delivered to it.
    let primary = Primary::start().await;
    dns.set_mx("loop.test", &[(10, "mx2.test")]);
    dns.set_ips("mx2.test", &[LOCALHOST]);
    dns.set_mx("origin.test", &[(10, "mx.origin.test")]);
    dns.set_ips("mx.origin.test", &[LOCALHOST]);
    let config = TestConfig::default()
        .set("delivery", "probe_interval", r#""200ms""#)
        .set("delivery", "retry_initial", r#""200ms""#)
        .set("delivery", "retry_max", r#""200ms""#)
        // A warning after the second attempt says which status the loop has.
        .set("delivery", "delay_warning_after", r#""100ms""#)
        .set("delivery", "nameservers", &format!(r#"["{}"]"#, dns.addr))
        .set("delivery", "port", &primary.addr.port().to_string())
        .domains("[[domain]]\nname = \"loop.test\"\n");
    let t = TestServer::start(config).await;
    let id = send(&t, SENDER, &["user@loop.test"], &tagged("loop")).await;

    let r = wait_attempts(&t, id, "user@loop.test", 2).await;
    let reply = r.last_reply.clone().unwrap_or_default();
    assert!(reply.contains("loop"), "last reply: {reply:?}");
    assert!(
        !r.unreachable,
        "a loop is not an unreachable primary: {r:?}"
    );
    assert!(
        primary.wait_for_messages(1, WAIT).await,
        "no delay notice for the looping mail"
    );
    let got = primary.messages();
    assert_eq!(
        rcpt_commands(&primary, "user@loop.test"),
        0,
        "delivered to ourselves?"
    );
    let dsn = Notice::of(&got[0], SENDER);
    let (rcpt, action, status) = dsn.single();
    assert!(rcpt.ends_with("user@loop.test"), "{rcpt}");
    assert_eq!(action, "delayed");
    assert_eq!(status, "4.4.6", "a routing loop is 4.4.6 (RFC 3463)");
    // Still queued, still not delivered.
    assert!(queued_rcpt(&t, id, "user@loop.test").is_some());
}

#[tokio::test]
async fn a_domain_that_does_not_exist_fails_with_a_notice_to_the_sender() {
    let net = Net::start().await;
    // gone.test is ours to relay for, but DNS says it does not exist.
    let t = TestServer::start(net.config().append("[[domain]]\nname = \"gone.test\"\n")).await;
    let id = send(&t, SENDER, &["user@gone.test"], &tagged("nxdomain")).await;
    wait_gone(&t, id).await;
    assert!(
        net.bounces.wait_for_messages(1, WAIT).await,
        "no failure notice"
    );
    let got = net.bounces.messages();
    assert_eq!(got.len(), 1);
    let dsn = Notice::of(&got[0], SENDER);
    let (rcpt, action, status) = dsn.single();
    assert!(rcpt.ends_with("user@gone.test"), "{rcpt}");
    assert_eq!(action, "failed");
    assert!(status.starts_with("5."), "NXDOMAIN is permanent: {status}");
    assert!(dsn.mentions("Message-ID: <nxdomain@origin.test>"));
    assert!(net.relay.messages().is_empty());
}

#[tokio::test]
async fn a_null_mx_fails_and_a_dns_failure_defers() {
    let net = Net::start().await;
    net.dns.set_null_mx("nomail.test");
    net.dns.set_servfail("broken.test", true);
    let config = net
        .config()
        .append("[[domain]]\nname = \"nomail.test\"\n[[domain]]\nname = \"broken.test\"\n");
    let t = TestServer::start(config).await;
    let nomail = send(&t, SENDER, &["user@nomail.test"], &tagged("null-mx")).await;
    let broken = send(&t, SENDER, &["user@broken.test"], &tagged("servfail")).await;

    wait_gone(&t, nomail).await;
    let r = wait_attempts(&t, broken, "user@broken.test", 1).await;
    assert!(r.next_attempt_ms > t.clock.now_ms() + 1_800_000, "{r:?}");
    assert!(
        net.bounces.wait_for_messages(1, WAIT).await,
        "no failure notice"
    );
    t.settled().await;
    let got = net.bounces.messages();
    assert_eq!(got.len(), 1, "a DNS failure is not a reason to give up");
    let dsn = Notice::of(&got[0], SENDER);
    let (rcpt, action, status) = dsn.single();
    assert!(rcpt.ends_with("user@nomail.test"), "{rcpt}");
    assert_eq!(action, "failed");
    assert!(status.starts_with("5."), "a null MX is permanent: {status}");
    assert_eq!(
        queued_rcpt(&t, broken, "user@broken.test").unwrap().status,
        RcptStatus::Queued
    );
}

#[tokio::test]
async fn a_dead_better_mx_host_is_skipped_for_the_next_one() {
    let dns = TestDns::start().await;
    let primary = Primary::start().await;
    // Nothing listens on 127.0.0.2 at the primary's port.
    let dead = std::net::TcpListener::bind((Ipv4Addr::new(127, 0, 0, 2), primary.addr.port()))
        .map(drop)
        .is_ok();
    assert!(dead, "127.0.0.2:{} is taken", primary.addr.port());
    dns.set_mx(
        "example.com",
        &[
            (10, "dead.example.com"),
            (15, "live.example.com"),
            (20, "mx2.test"),
        ],
    );
    dns.set_ips(
        "dead.example.com",
        &[IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))],
    );
    dns.set_ips("live.example.com", &[LOCALHOST]);
    let config = TestConfig::default()
        .set("delivery", "nameservers", &format!(r#"["{}"]"#, dns.addr))
        .set("delivery", "port", &primary.addr.port().to_string())
        .domains("[[domain]]\nname = \"example.com\"\n");
    let t = TestServer::start(config).await;
    let id = send(&t, SENDER, &["user@example.com"], &tagged("fallback")).await;
    assert!(
        primary.wait_for_messages(1, WAIT).await,
        "not delivered to the second-best MX"
    );
    wait_gone(&t, id).await;
}

// ---------------------------------------------------------------------------
// Results per recipient, and who hears about failures

#[tokio::test]
async fn each_recipient_gets_its_own_result() {
    let net = Net::start().await;
    net.relay.set_rcpt_reply(
        "gone@example.com",
        "550 5.1.1 <gone@example.com>: no such user",
    );
    net.relay.set_rcpt_reply(
        "later@example.com",
        "450 4.2.0 <later@example.com>: try later",
    );
    let t = TestServer::start(net.config()).await;
    let before = t.clock.now_ms();
    let id = send(
        &t,
        SENDER,
        &["gone@example.com", "later@example.com", "ok@example.com"],
        &tagged("per-recipient"),
    )
    .await;

    // The 250 one is delivered, alone.
    assert!(
        net.relay.wait_for_messages(1, WAIT).await,
        "nothing delivered"
    );
    // The 450 one waits its backoff: one attempt, next one within
    // retry_initial (1h) less at most 20 % jitter.
    let later = wait_attempts(&t, id, "later@example.com", 1).await;
    let after = t.clock.now_ms();
    assert_eq!(later.attempts, 1);
    let hour = 3_600_000;
    assert!(
        later.next_attempt_ms >= before + hour * 8 / 10 && later.next_attempt_ms <= after + hour,
        "next attempt {} not within [{}, {}]",
        later.next_attempt_ms,
        before + hour * 8 / 10,
        after + hour
    );
    assert!(!later.unreachable);
    assert!(
        later.last_reply.as_deref().unwrap_or("").contains("450"),
        "{later:?}"
    );
    let env = t.spool().envelope(id).unwrap().expect("still queued");
    let status = |a: &str| {
        env.recipients
            .iter()
            .find(|r| r.address == a)
            .unwrap()
            .status
    };
    assert_eq!(status("gone@example.com"), RcptStatus::Failed);
    assert_eq!(status("ok@example.com"), RcptStatus::Delivered);
    let delivered = net.relay.messages();
    assert_eq!(delivered.len(), 1);
    assert!(delivered[0].body.ends_with(b"body of per-recipient\r\n"));

    // The 550 one: a failure notice to the sender, about it alone.
    assert!(
        net.bounces.wait_for_messages(1, WAIT).await,
        "no failure notice"
    );
    let got = net.bounces.messages();
    assert_eq!(got.len(), 1, "one notice");
    let dsn = Notice::of(&got[0], SENDER);
    let (rcpt, action, status) = dsn.single();
    assert!(rcpt.ends_with("gone@example.com"), "{rcpt}");
    assert_eq!(action, "failed");
    assert_eq!(status, "5.1.1");
    assert!(
        dsn.mentions("no such user"),
        "the primary's reply is quoted"
    );
    // The original's header section comes back.
    assert!(dsn.mentions("Subject: per-recipient\r\n"));
    assert!(dsn.mentions("Message-ID: <per-recipient@origin.test>"));
    // Nothing more for the relay primary later on: one RCPT for the 450'd.
    t.settled().await;
    assert_eq!(rcpt_commands(&net.relay, "later@example.com"), 1);
}

#[tokio::test]
async fn mail_from_the_null_sender_is_never_bounced_but_kept_as_a_dead_letter() {
    let net = Net::start().await;
    net.relay
        .set_rcpt_reply("user@example.com", "550 5.1.1 no such user");
    let t = TestServer::start(net.config()).await;
    let id = send(&t, "", &["user@example.com"], &tagged("null-sender")).await;
    wait_gone(&t, id).await;
    let dead = t.spool().dead_letters().unwrap();
    assert_eq!(dead.iter().map(|e| e.id).collect::<Vec<_>>(), vec![id]);
    assert_eq!(dead[0].recipients[0].status, RcptStatus::Failed);
    // No notice queued or sent to anyone (not to <>, not to the postmaster).
    assert!(t.stored().is_empty(), "something queued: {:?}", t.stored());
    t.settled().await;
    assert!(net.relay.messages().is_empty());
    assert!(net.bounces.messages().is_empty());
}

/// Polls until the spool holds `n` dead letters, and returns them.
async fn wait_dead(t: &TestServer, n: usize) -> Vec<mxspool::spool::Envelope> {
    let deadline = Instant::now() + WAIT;
    loop {
        let dead = t.spool().dead_letters().unwrap();
        if dead.len() >= n {
            return dead;
        }
        assert!(Instant::now() < deadline, "{} dead letters", dead.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_notice_the_senders_mx_refuses_is_kept_as_a_dead_letter() {
    let net = Net::start().await;
    net.relay
        .set_rcpt_reply("user@example.com", "550 5.1.1 no such user");
    net.bounces
        .set_rcpt_reply(SENDER, "550 5.1.1 no such sender here");
    let t = TestServer::start(net.config()).await;
    let id = send(&t, SENDER, &["user@example.com"], &tagged("notice-refused")).await;
    wait_gone(&t, id).await;
    let dead = wait_dead(&t, 1).await;
    assert_eq!(dead.len(), 1);
    let notice = &dead[0];
    assert_ne!(
        notice.id, id,
        "the original was reported, the notice is kept"
    );
    assert!(notice.sender.is_empty(), "a notice, from <>");
    assert_eq!(notice.recipients[0].address, SENDER);
    assert_eq!(notice.recipients[0].status, RcptStatus::Failed);
    assert!(
        notice.recipients[0]
            .last_reply
            .as_deref()
            .is_some_and(|r| r.contains("no such sender here")),
        "{:?}",
        notice.recipients[0].last_reply
    );
    assert_eq!(rcpt_commands(&net.bounces, SENDER), 1, "it was tried");
    assert!(t.stored().is_empty(), "nothing left in the queue");
    assert!(net.bounces.messages().is_empty());
}

#[tokio::test]
async fn a_notice_to_the_postmaster_that_fails_is_kept_as_a_dead_letter() {
    let net = Net::start().await;
    net.relay
        .set_rcpt_reply("user@example.com", "550 5.1.1 no such user");
    // The postmaster's own mailbox is behind the same broken primary.
    net.relay
        .set_rcpt_reply(POSTMASTER, "550 5.1.1 no postmaster either");
    let t = TestServer::start(net.config().set("delivery", "bounce", r#""postmaster""#)).await;
    let id = send(&t, SENDER, &["user@example.com"], &tagged("pm-refused")).await;
    wait_gone(&t, id).await;
    let dead = wait_dead(&t, 1).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].recipients[0].address, POSTMASTER);
    assert_eq!(dead[0].recipients[0].status, RcptStatus::Failed);
    assert!(t.stored().is_empty());
    t.settled().await;
    assert!(net.bounces.messages().is_empty(), "the sender got one");
}

#[tokio::test]
async fn notify_never_means_no_notice() {
    let net = Net::start().await;
    net.relay
        .set_rcpt_reply("user@example.com", "550 5.1.1 no such user");
    let t = TestServer::start(net.config()).await;
    let mut c = t.ehlo().await;
    let id = send_raw(
        &mut c,
        &format!("MAIL FROM:<{SENDER}>"),
        &["RCPT TO:<user@example.com> NOTIFY=NEVER"],
        &tagged("never"),
    )
    .await;
    c.quit().await;
    wait_gone(&t, id).await;
    assert_tried_without_notice(&t, &net).await;
}

/// user@example.com was tried once and refused, and nobody was told: no
/// notice queued, sent, or kept as a dead letter.
async fn assert_tried_without_notice(t: &TestServer, net: &Net) {
    assert_eq!(
        rcpt_commands(&net.relay, "user@example.com"),
        1,
        "it was tried"
    );
    assert!(
        t.stored().is_empty(),
        "a notice was queued: {:?}",
        t.stored()
    );
    assert!(t.spool().dead_letters().unwrap().is_empty());
    t.settled().await;
    assert!(net.bounces.messages().is_empty());
    assert!(net.relay.messages().is_empty());
}

#[tokio::test]
async fn bounce_postmaster_sends_the_notice_to_the_postmaster() {
    let net = Net::start().await;
    net.relay
        .set_rcpt_reply("user@example.com", "550 5.1.1 no such user");
    // The postmaster (hostmaster@example.com) is behind the relay primary.
    let t = TestServer::start(net.config().set("delivery", "bounce", r#""postmaster""#)).await;
    let id = send(&t, SENDER, &["user@example.com"], &tagged("to-postmaster")).await;
    wait_gone(&t, id).await;
    assert!(net.relay.wait_for_messages(1, WAIT).await, "no notice");
    let got = net.relay.messages();
    assert_eq!(got.len(), 1);
    let dsn = Notice::of(&got[0], POSTMASTER);
    let (rcpt, action, status) = dsn.single();
    assert!(rcpt.ends_with("user@example.com"), "{rcpt}");
    assert_eq!((action.as_str(), status.as_str()), ("failed", "5.1.1"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(net.bounces.messages().is_empty(), "the sender got one too");
}

#[tokio::test]
async fn bounce_drop_sends_no_notice() {
    let net = Net::start().await;
    net.relay
        .set_rcpt_reply("user@example.com", "550 5.1.1 no such user");
    let t = TestServer::start(net.config().set("delivery", "bounce", r#""drop""#)).await;
    let id = send(&t, SENDER, &["user@example.com"], &tagged("dropped")).await;
    wait_gone(&t, id).await;
    assert_tried_without_notice(&t, &net).await;
}

// ---------------------------------------------------------------------------
// Releasing mail early: ETRN and flush

/// Queues one message whose recipient the live primary defers (450) with an
/// hour of backoff, then makes the primary accept it; returns its ID.
async fn deferred_by_a_live_primary(net: &Net, t: &TestServer, rcpt: &str) -> QueueId {
    net.relay.set_rcpt_reply(rcpt, "450 4.2.0 mailbox busy");
    let id = send(t, SENDER, &[rcpt], &tagged("deferred")).await;
    let r = wait_attempts(t, id, rcpt, 1).await;
    assert!(r.next_attempt_ms > t.clock.now_ms() + 1_800_000, "{r:?}");
    net.relay.set_rcpt_reply(rcpt, "250 2.1.5 Ok");
    // It keeps its backoff until asked.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(net.relay.messages().is_empty());
    assert_eq!(queued_rcpt(t, id, rcpt).unwrap().attempts, 1);
    id
}

#[tokio::test]
async fn etrn_releases_the_domains_mail_at_once() {
    let net = Net::start().await;
    let t = TestServer::start(net.config()).await;
    let id = deferred_by_a_live_primary(&net, &t, "user@example.com").await;
    let mut c = t.ehlo().await;
    let asked = Instant::now();
    c.cmd("ETRN example.com").await.assert(250);
    assert!(
        net.relay.wait_for_messages(1, Duration::from_secs(2)).await,
        "ETRN did not release the mail"
    );
    assert!(asked.elapsed() < Duration::from_secs(2));
    c.quit().await;
    wait_gone(&t, id).await;
    assert_eq!(received_for(&net.relay, "user@example.com").len(), 1);
}

#[tokio::test]
async fn flush_releases_the_domains_mail_at_once() {
    let net = Net::start().await;
    let t = TestServer::start(net.config()).await;
    let id = deferred_by_a_live_primary(&net, &t, "user@example.com").await;
    t.server.flush(Some("example.com".into()));
    assert!(
        net.relay.wait_for_messages(1, Duration::from_secs(2)).await,
        "flush did not release the mail"
    );
    wait_gone(&t, id).await;
}

#[tokio::test]
async fn etrn_from_a_primary_that_was_down_delivers_and_marks_it_up() {
    let primary = Primary::start().await;
    primary.set_mode(Mode::Greet421);
    // No timer probe during the test: only ETRN brings the mail out.
    let config = config_for(&primary).set("delivery", "probe_interval", r#""1h""#);
    let t = TestServer::start(config).await;
    let id = send(&t, SENDER, &["user@example.com"], &tagged("etrn-down")).await;
    let r = wait_attempts(&t, id, "user@example.com", 1).await;
    assert!(r.unreachable, "{r:?}");
    let up = || {
        t.server
            .metrics()
            .primary_up
            .with_label_values(&["example.com"])
            .get()
    };
    eventually(WAIT, async || match up() {
        0 => Ok(()),
        v => Err(format!("mxspool_primary_up = {v} while it greets with 421")),
    })
    .await;

    // Back; the primary asks for its mail.
    primary.set_mode(Mode::Up);
    let mut c = t.ehlo().await;
    c.cmd("ETRN example.com").await.assert(250);
    c.quit().await;
    assert!(
        primary.wait_for_messages(1, Duration::from_secs(2)).await,
        "ETRN did not release the mail"
    );
    wait_gone(&t, id).await;
    // A delivery just succeeded: the primary is up.
    eventually(Duration::from_secs(1), async || match up() {
        1 => Ok(()),
        v => Err(format!(
            "mxspool_primary_up = {v} after a successful delivery"
        )),
    })
    .await;
}

// ---------------------------------------------------------------------------
// Domains are independent; primary health

#[tokio::test]
async fn a_hanging_primary_does_not_delay_another_domains_mail() {
    let hanging = Primary::start().await;
    hanging.set_mode(Mode::Hang);
    let fine = Primary::start().await;
    let config = TestConfig::default()
        .set("delivery", "probe_interval", r#""200ms""#)
        .set("delivery", "retry_initial", r#""1h""#)
        .set("delivery", "retry_max", r#""2h""#)
        .domains(&format!(
            "[[domain]]\nname = \"slow.test\"\nroute = \"[127.0.0.1]:{}\"\n\
             [[domain]]\nname = \"fast.test\"\nroute = \"[127.0.0.1]:{}\"\n",
            hanging.addr.port(),
            fine.addr.port()
        ));
    // Long enough that waiting for the hanging primary would show.
    let dir = tempfile::tempdir().unwrap();
    let t = TestServer::start_with(dir, config, Some(timeouts(Duration::from_secs(4)))).await;
    let stuck = send(&t, SENDER, &["a@slow.test"], &tagged("stuck")).await;
    eventually(WAIT, async || {
        (hanging.connections() >= 1)
            .then_some(())
            .ok_or_else(|| "no connection to the hanging primary".to_string())
    })
    .await;

    let sent = Instant::now();
    send(&t, SENDER, &["b@fast.test"], &tagged("fast")).await;
    // One message for both: its fast.test part must not wait for slow.test.
    let both = send(&t, SENDER, &["c@slow.test", "d@fast.test"], &tagged("both")).await;
    assert!(
        fine.wait_for_messages(2, Duration::from_millis(1500)).await,
        "fast.test's mail waited for slow.test's primary: {} delivered",
        fine.messages().len()
    );
    let elapsed = sent.elapsed();
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
    // Meanwhile slow.test's first attempt is still hanging.
    assert_eq!(queued_rcpt(&t, stuck, "a@slow.test").unwrap().attempts, 0);
    // The primary has it; the spool records it a moment later.
    let env = eventually(Duration::from_millis(500), async || {
        let env = t.spool().envelope(both).unwrap().expect("both is queued");
        match env.recipients[1].status {
            RcptStatus::Delivered => Ok(env),
            _ => Err(format!("{:?}", env.recipients)),
        }
    })
    .await;
    assert_eq!(env.recipients[0].status, RcptStatus::Queued);
    assert_eq!(env.recipients[0].attempts, 0);
    assert!(hanging.messages().is_empty());
}

#[tokio::test]
async fn a_421_greeting_marks_the_primary_down_until_a_probe_finds_it_back() {
    let primary = Primary::start().await;
    primary.set_mode(Mode::Greet421);
    let t = TestServer::start(config_for(&primary)).await;
    let id = send(&t, SENDER, &["user@example.com"], &tagged("421")).await;
    let r = wait_attempts(&t, id, "user@example.com", 1).await;
    assert!(r.unreachable, "a 421 greeting means unreachable: {r:?}");
    assert!(r.next_attempt_ms > t.clock.now_ms() + 1_800_000, "{r:?}");
    let up = || {
        t.server
            .metrics()
            .primary_up
            .with_label_values(&["example.com"])
            .get()
    };
    eventually(WAIT, async || match up() {
        0 => Ok(()),
        v => Err(format!("mxspool_primary_up = {v}")),
    })
    .await;
    // Probes keep failing while it says 421.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(primary.messages().is_empty());
    assert!(
        primary.connections() >= 2,
        "not probed: {}",
        primary.connections()
    );

    primary.set_mode(Mode::Up);
    let back = Instant::now();
    assert!(
        primary.wait_for_messages(1, Duration::from_secs(2)).await,
        "not released after the primary came back"
    );
    assert!(back.elapsed() < Duration::from_secs(2));
    wait_gone(&t, id).await;
    assert_eq!(up(), 1);
}

#[tokio::test]
async fn a_hanging_primary_is_marked_down_and_its_mail_released_when_it_answers() {
    let primary = Primary::start().await;
    primary.set_mode(Mode::Hang);
    let dir = tempfile::tempdir().unwrap();
    let t = TestServer::start_with(
        dir,
        config_for(&primary),
        Some(timeouts(Duration::from_millis(500))),
    )
    .await;
    let id = send(&t, SENDER, &["user@example.com"], &tagged("hang")).await;
    let r = wait_attempts(&t, id, "user@example.com", 1).await;
    assert!(r.unreachable, "a greeting timeout means unreachable: {r:?}");
    primary.set_mode(Mode::Up);
    assert!(
        primary.wait_for_messages(1, Duration::from_secs(3)).await,
        "not released after the primary answered again"
    );
    wait_gone(&t, id).await;
}

#[tokio::test]
async fn a_connection_from_the_primary_prompts_a_probe_at_once() {
    let primary = Primary::start().await;
    primary.set_mode(Mode::Greet421);
    // Probes on the timer are an hour apart: only the hint can help.
    let config = config_for(&primary).set("delivery", "probe_interval", r#""1h""#);
    let t = TestServer::start(config).await;
    let id = send(&t, SENDER, &["user@example.com"], &tagged("hint")).await;
    let r = wait_attempts(&t, id, "user@example.com", 1).await;
    assert!(r.unreachable, "{r:?}");
    // Give the scheduler a moment to learn the primary's address.
    tokio::time::sleep(Duration::from_millis(200)).await;
    primary.set_mode(Mode::Up);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(primary.messages().is_empty(), "released without a reason");

    // The primary (127.0.0.1) connects to us, e.g. to send mail.
    let c = t.connect().await;
    assert!(
        primary.wait_for_messages(1, Duration::from_secs(2)).await,
        "a connection from the primary did not prompt a probe"
    );
    c.quit().await;
    wait_gone(&t, id).await;
}

#[tokio::test]
async fn a_probe_does_not_release_mail_a_live_primary_deferred() {
    let primary = Primary::start().await;
    primary.set_rcpt_reply("busy@example.com", "450 4.2.0 mailbox busy");
    let t = TestServer::start(config_for(&primary)).await;
    // Deferred by the live primary: its own backoff.
    let busy = send(&t, SENDER, &["busy@example.com"], &tagged("busy")).await;
    wait_attempts(&t, busy, "busy@example.com", 1).await;
    // Then the primary goes away; new mail waits for it as unreachable.
    primary.set_mode(Mode::Greet421);
    let waiting = send(&t, SENDER, &["user@example.com"], &tagged("waiting")).await;
    let r = wait_attempts(&t, waiting, "user@example.com", 1).await;
    assert!(r.unreachable, "{r:?}");

    // Back, and willing to take both.
    primary.set_rcpt_reply("busy@example.com", "250 2.1.5 Ok");
    primary.set_mode(Mode::Up);
    assert!(
        primary.wait_for_messages(1, Duration::from_secs(2)).await,
        "the unreachable-deferred mail was not released"
    );
    wait_gone(&t, waiting).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        received_for(&primary, "busy@example.com").is_empty(),
        "the 450'd message was released with the others"
    );
    assert_eq!(rcpt_commands(&primary, "busy@example.com"), 1);
    let r = queued_rcpt(&t, busy, "busy@example.com").expect("still queued");
    assert_eq!(r.attempts, 1);
    assert!(r.next_attempt_ms > t.clock.now_ms() + 1_800_000, "{r:?}");
}

#[tokio::test]
async fn a_restart_keeps_the_backoff() {
    let primary = Primary::start().await;
    primary.set_rcpt_reply("user@example.com", "450 4.2.0 mailbox busy");
    let t = TestServer::start(config_for(&primary)).await;
    let id = send(&t, SENDER, &["user@example.com"], &tagged("restart")).await;
    let before = wait_attempts(&t, id, "user@example.com", 1).await;
    let TestServer { server, dir, .. } = t;
    server.shutdown(Duration::from_secs(5)).await;

    // A retry now would succeed: none may happen.
    primary.set_rcpt_reply("user@example.com", "250 2.1.5 Ok");
    let t = TestServer::start_in(dir, config_for(&primary)).await;
    let after = queued_rcpt(&t, id, "user@example.com").expect("still queued");
    assert_eq!(after.attempts, before.attempts);
    assert_eq!(after.next_attempt_ms, before.next_attempt_ms);
    assert_eq!(after.last_reply, before.last_reply);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        primary.messages().is_empty(),
        "retried right after the restart"
    );
    assert_eq!(rcpt_commands(&primary, "user@example.com"), 1);
    let now = queued_rcpt(&t, id, "user@example.com").expect("still queued");
    assert_eq!(
        (now.attempts, now.next_attempt_ms),
        (1, before.next_attempt_ms)
    );
}

#[tokio::test]
async fn after_a_restart_mail_waiting_for_the_primary_goes_as_soon_as_it_answers() {
    let primary = Primary::start().await;
    primary.set_mode(Mode::Down);
    let t = TestServer::start(config_for(&primary)).await;
    let id = send(&t, SENDER, &["user@example.com"], &tagged("restart-down")).await;
    let r = wait_attempts(&t, id, "user@example.com", 1).await;
    assert!(
        r.unreachable && r.next_attempt_ms > t.clock.now_ms() + 1_800_000,
        "{r:?}"
    );
    let TestServer { server, dir, .. } = t;
    server.shutdown(Duration::from_secs(5)).await;

    primary.set_mode(Mode::Up);
    let t = TestServer::start_in(dir, config_for(&primary)).await;
    assert!(
        primary.wait_for_messages(1, Duration::from_secs(2)).await,
        "the restarted server did not probe the primary its mail waited for"
    );
    wait_gone(&t, id).await;
}

#[tokio::test]
async fn a_primary_coming_back_releases_only_its_own_domains_recipients() {
    let relay = Primary::start().await;
    relay.set_rcpt_reply("busy@example.com", "450 4.2.0 mailbox busy");
    let other = Primary::start().await;
    other.set_mode(Mode::Greet421);
    let config = config_for(&relay).append(&format!(
        "[[domain]]\nname = \"other.test\"\nroute = \"[127.0.0.1]:{}\"\n",
        other.addr.port()
    ));
    let t = TestServer::start(config).await;
    let id = send(
        &t,
        SENDER,
        &["busy@example.com", "user@other.test"],
        &tagged("split"),
    )
    .await;
    wait_attempts(&t, id, "busy@example.com", 1).await;
    let r = wait_attempts(&t, id, "user@other.test", 1).await;
    assert!(r.unreachable, "{r:?}");

    relay.set_rcpt_reply("busy@example.com", "250 2.1.5 Ok");
    other.set_mode(Mode::Up);
    assert!(
        other.wait_for_messages(1, Duration::from_secs(2)).await,
        "other.test's recipient was not released"
    );
    eventually(Duration::from_secs(1), async || {
        match queued_rcpt(&t, id, "user@other.test").map(|r| r.status) {
            Some(RcptStatus::Delivered) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        relay.messages().is_empty(),
        "example.com's 450 was released too"
    );
    let busy = queued_rcpt(&t, id, "busy@example.com").expect("still queued");
    assert_eq!(busy.attempts, 1);
    assert!(
        busy.next_attempt_ms > t.clock.now_ms() + 1_800_000,
        "{busy:?}"
    );
}

#[tokio::test]
async fn one_connection_carries_the_queued_messages_back_to_back() {
    let primary = Primary::start().await;
    primary.set_mode(Mode::Down);
    let config = config_for(&primary)
        .set("delivery", "messages_per_connection", "100")
        .set("delivery", "connections_per_domain", "1");
    let t = TestServer::start(config).await;
    let mut ids = Vec::new();
    let mut c = t.ehlo().await;
    for i in 0..5 {
        ids.push(
            c.send_mail(SENDER, &["user@example.com"], &tagged(&format!("reuse{i}")))
                .await
                .queue_id(),
        );
    }
    c.quit().await;
    for id in &ids {
        wait_attempts(&t, *id, "user@example.com", 1).await;
    }
    assert_eq!(primary.connections(), 0);

    primary.set_mode(Mode::Up);
    assert!(
        primary.wait_for_messages(5, WAIT).await,
        "got {}",
        primary.messages().len()
    );
    for id in &ids {
        wait_gone(&t, *id).await;
    }
    // A probe may have found the primary back: at most one more connection.
    assert!(
        primary.connections() <= 2,
        "{} connections",
        primary.connections()
    );
    // The outcomes are recorded before the idle connection says QUIT.
    let deadline = tokio::time::Instant::now() + WAIT;
    while primary.commands().last().map(String::as_str) != Some("QUIT")
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let commands = primary.commands();
    let sessions: Vec<&[String]> = commands
        .split(|l| l.to_ascii_uppercase().starts_with("EHLO"))
        .filter(|s| s.iter().any(|l| l.starts_with("MAIL")))
        .collect();
    assert_eq!(sessions.len(), 1, "{commands:?}");
    let count = |verb: &str| sessions[0].iter().filter(|l| l.starts_with(verb)).count();
    assert_eq!(count("MAIL"), 5, "{commands:?}");
    // Each transaction ends with its data: no RSET between them.
    assert_eq!(count("RSET"), 0, "{commands:?}");
    assert_eq!(
        sessions[0].last().map(String::as_str),
        Some("QUIT"),
        "{commands:?}"
    );
}

// ---------------------------------------------------------------------------
// Giving up, and warning

#[tokio::test]
async fn mail_that_outlives_the_queue_lifetime_fails_with_4_4_7() {
    let net = Net::start().await;
    net.relay
        .set_rcpt_reply("user@example.com", "450 4.2.0 mailbox busy");
    let config = net
        .config()
        .set("delivery", "max_queue_lifetime", r#""5d""#)
        .set("delivery", "retry_initial", r#""1h""#)
        .set("delivery", "retry_max", r#""1d""#)
        .set("delivery", "retry_jitter", "0.0");
    let t = TestServer::start(config).await;
    let id = send(&t, SENDER, &["user@example.com"], &tagged("expiring")).await;
    t.settled().await;
    assert_eq!(rcpt_commands(&net.relay, "user@example.com"), 1);
    // A day later: retried, still within its lifetime.
    t.advance(Duration::from_secs(24 * 3600)).await;
    let r = queued_rcpt(&t, id, "user@example.com").expect("still queued");
    assert_eq!(r.attempts, 2, "{r:?}");
    assert!(net.bounces.messages().is_empty(), "gave up early");
    // Past five days: the next attempt's 450 is the last.
    t.advance(Duration::from_secs(4 * 24 * 3600)).await;
    assert!(
        queued_rcpt(&t, id, "user@example.com").is_none(),
        "still queued"
    );
    assert_eq!(rcpt_commands(&net.relay, "user@example.com"), 3);
    let got = net.bounces.messages();
    assert_eq!(got.len(), 1);
    let dsn = Notice::of(&got[0], SENDER);
    let (rcpt, action, status) = dsn.single();
    assert!(rcpt.ends_with("user@example.com"), "{rcpt}");
    assert_eq!(action, "failed");
    assert_eq!(status, "4.4.7");
    assert!(dsn.mentions("Message-ID: <expiring@origin.test>"));
}

#[tokio::test]
async fn one_delay_warning_however_many_retries() {
    let net = Net::start().await;
    net.relay
        .set_rcpt_reply("user@example.com", "450 4.2.0 mailbox busy");
    let config = net
        .config()
        .set("delivery", "delay_warning_after", r#""4h""#)
        .set("delivery", "retry_initial", r#""30m""#)
        .set("delivery", "retry_max", r#""30m""#)
        .set("delivery", "retry_jitter", "0.0");
    let t = TestServer::start(config).await;
    let id = send(&t, SENDER, &["user@example.com"], &tagged("slow")).await;
    t.settled().await;
    // Half-hourly retries: no warning until four hours have passed (the
    // notice is recorded with the attempt that calls for it), then one.
    for half_hours in 1..=12u32 {
        t.advance(Duration::from_secs(30 * 60)).await;
        let r = queued_rcpt(&t, id, "user@example.com").expect("queued");
        assert_eq!(r.attempts, half_hours + 1, "{r:?}");
        assert_eq!(
            r.delay_notified,
            half_hours >= 8,
            "after {half_hours} half hours: {r:?}"
        );
    }
    let got = net.bounces.messages();
    assert_eq!(got.len(), 1, "exactly one delay notice");
    let dsn = Notice::of(&got[0], SENDER);
    let (rcpt, action, status) = dsn.single();
    assert!(rcpt.ends_with("user@example.com"), "{rcpt}");
    assert_eq!(action, "delayed");
    assert!(status.starts_with("4."), "{status}");
    assert_eq!(dsn.fields("Will-Retry-Until").len(), 1);
    assert!(net.relay.messages().is_empty());
}

// ---------------------------------------------------------------------------
// What the next hop can take

/// The value of an unlabelled or `domain="example.com"` series on /metrics.
fn metric(t: &TestServer, name: &str) -> u64 {
    let text = t.server.metrics().render(&t.spool().gauges(), 0);
    let prefix = format!("{name}{{domain=\"example.com\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in /metrics"))
}

#[tokio::test]
async fn eight_bit_mail_to_a_primary_without_8bitmime_is_converted_or_fails_with_5_6_3() {
    let net = Net::start().await;
    net.relay.set_capabilities(Caps {
        eightbitmime: false,
        ..Caps::default()
    });
    let t = TestServer::start(net.config()).await;
    assert_eq!(metric(&t, "mxspool_delivery_8bit_converted_total"), 0);
    let mut c = t.ehlo().await;
    let text = "Content-Type: text/plain; charset=utf-8\r\n\
                Content-Transfer-Encoding: 8bit\r\n\r\ncaf\u{e9}\r\n";
    let converted = send_raw(
        &mut c,
        &format!("MAIL FROM:<{SENDER}> BODY=8BITMIME"),
        &["RCPT TO:<user@example.com>"],
        format!("Subject: eight bit\r\nMIME-Version: 1.0\r\n{text}").as_bytes(),
    )
    .await;
    // 8-bit in a header cannot be made 7-bit: refused, not sent raw.
    let content = b"Subject: caf\xc3\xa9\r\nMessage-ID: <8bit@origin.test>\r\n\r\ncaf\xc3\xa9\r\n";
    let id = send_raw(
        &mut c,
        &format!("MAIL FROM:<{SENDER}> BODY=8BITMIME"),
        &["RCPT TO:<user@example.com>"],
        content,
    )
    .await;
    c.quit().await;
    wait_gone(&t, converted).await;
    wait_gone(&t, id).await;
    let got = net.relay.messages();
    assert_eq!(got.len(), 1, "only the convertible message");
    assert!(got[0].body.is_ascii());
    assert!(
        String::from_utf8_lossy(&got[0].body)
            .contains("Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\n"),
        "{}",
        String::from_utf8_lossy(&got[0].body)
    );
    assert!(
        !got[0].mail_from_line.contains("BODY="),
        "{}",
        got[0].mail_from_line
    );
    assert_eq!(metric(&t, "mxspool_delivery_8bit_converted_total"), 1);
    assert!(
        net.bounces.wait_for_messages(1, WAIT).await,
        "no failure notice"
    );
    let dsn = Notice::of(&net.bounces.messages()[0], SENDER);
    let (rcpt, action, status) = dsn.single();
    assert!(rcpt.ends_with("user@example.com"), "{rcpt}");
    assert_eq!((action.as_str(), status.as_str()), ("failed", "5.6.3"));
    // Only one transaction reached the primary.
    let mails = net
        .relay
        .commands()
        .iter()
        .filter(|l| l.starts_with("MAIL"))
        .count();
    assert_eq!(mails, 1, "{:?}", net.relay.commands());
}

#[tokio::test]
async fn long_lines_are_broken_at_delivery_line_length_limit_and_counted() {
    let primary = Primary::start().await;
    primary.set_line_limit(Some(1000));
    let t = TestServer::start(config_for(&primary)).await;
    let long = "x".repeat(1002);
    let id = send(
        &t,
        "a@origin.test",
        &["user@example.com"],
        format!("Subject: long\r\n\r\n{long}\r\n").as_bytes(),
    )
    .await;
    wait_gone(&t, id).await;
    let got = primary.messages();
    assert_eq!(got.len(), 1);
    assert!(got[0].data.split(|&b| b == b'\n').all(|l| l.len() <= 1000));
    // 998 octets, then CRLF, a space and the other four.
    let body = String::from_utf8_lossy(&got[0].body).into_owned();
    assert!(
        body.contains(&format!("\r\n{}\r\n xxxx\r\n", &long[..998])),
        "{body}"
    );
    assert_eq!(metric(&t, "mxspool_delivery_lines_broken_total"), 1);

    // With the limit off the line goes as it is, and this primary refuses it.
    let primary = Primary::start().await;
    primary.set_line_limit(Some(1000));
    let t = TestServer::start(config_for(&primary).set("delivery", "line_length_limit", "0")).await;
    let id = send(
        &t,
        "a@origin.test",
        &["user@example.com"],
        format!("Subject: long\r\n\r\n{long}\r\n").as_bytes(),
    )
    .await;
    wait_gone(&t, id).await;
    assert_eq!(primary.too_long(), 1);
    assert!(primary.messages().is_empty());
    assert_eq!(metric(&t, "mxspool_delivery_lines_broken_total"), 0);
}

#[tokio::test]
async fn smtputf8_mail_to_a_primary_without_smtputf8_fails_with_5_6_7() {
    let net = Net::start().await;
    net.relay.set_capabilities(Caps {
        smtputf8: false,
        ..Caps::default()
    });
    let t = TestServer::start(net.config()).await;
    let mut c = t.ehlo().await;
    let content = "Subject: grüße\r\nMessage-ID: <utf8@origin.test>\r\n\r\nhallo\r\n";
    let id = send_raw(
        &mut c,
        &format!("MAIL FROM:<{SENDER}> SMTPUTF8"),
        &["RCPT TO:<jürgen@example.com>"],
        content.as_bytes(),
    )
    .await;
    c.quit().await;
    wait_gone(&t, id).await;
    assert!(
        net.bounces.wait_for_messages(1, WAIT).await,
        "no failure notice"
    );
    let dsn = Notice::of(&net.bounces.messages()[0], SENDER);
    let (_, action, status) = dsn.single();
    assert_eq!((action.as_str(), status.as_str()), ("failed", "5.6.7"));
    assert!(net.relay.messages().is_empty());
    assert!(!net.relay.commands().iter().any(|l| l.starts_with("MAIL")));
}

/// Sends a message with every DSN parameter; returns its ID.
async fn send_with_dsn_parameters(t: &TestServer, tag: &str) -> QueueId {
    let mut c = t.ehlo().await;
    let id = send_raw(
        &mut c,
        &format!("MAIL FROM:<{SENDER}> RET=HDRS ENVID=env-{tag}"),
        &["RCPT TO:<user@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;user@example.com"],
        &tagged(tag),
    )
    .await;
    c.quit().await;
    id
}

#[tokio::test]
async fn dsn_parameters_are_passed_on_to_a_primary_that_offers_dsn() {
    let net = Net::start().await;
    let t = TestServer::start(net.config()).await;
    let id = send_with_dsn_parameters(&t, "with-dsn").await;
    assert!(net.relay.wait_for_messages(1, WAIT).await);
    wait_gone(&t, id).await;
    let m = &net.relay.messages()[0];
    assert!(
        m.mail_from_line.contains(" RET=HDRS"),
        "{}",
        m.mail_from_line
    );
    assert!(
        m.mail_from_line.contains(" ENVID=env-with-dsn"),
        "{}",
        m.mail_from_line
    );
    let rcpt = &m.rcpt_lines[0];
    let notify = rcpt
        .split(' ')
        .find_map(|p| p.strip_prefix("NOTIFY="))
        .unwrap_or_else(|| panic!("no NOTIFY= in {rcpt}"));
    let mut words: Vec<&str> = notify.split(',').collect();
    words.sort();
    assert_eq!(words, ["FAILURE", "SUCCESS"], "{rcpt}");
    assert!(rcpt.contains(" ORCPT=rfc822;user@example.com"), "{rcpt}");
    // The primary took over the sender's request: no notice from us.
    assert!(t.stored().is_empty());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(net.bounces.messages().is_empty());
}

#[tokio::test]
async fn without_dsn_at_the_primary_no_parameters_and_a_relayed_notice() {
    let net = Net::start().await;
    net.relay.set_capabilities(Caps {
        dsn: false,
        ..Caps::default()
    });
    let t = TestServer::start(net.config()).await;
    let id = send_with_dsn_parameters(&t, "without-dsn").await;
    assert!(net.relay.wait_for_messages(1, WAIT).await);
    wait_gone(&t, id).await;
    let m = &net.relay.messages()[0];
    for param in ["RET=", "ENVID="] {
        assert!(!m.mail_from_line.contains(param), "{}", m.mail_from_line);
    }
    assert_eq!(m.rcpt_lines, ["RCPT TO:<user@example.com>"]);

    // NOTIFY=SUCCESS could not be passed on: we say "relayed".
    assert!(
        net.bounces.wait_for_messages(1, WAIT).await,
        "no relayed notice"
    );
    let got = net.bounces.messages();
    assert_eq!(got.len(), 1);
    let dsn = Notice::of(&got[0], SENDER);
    let (rcpt, action, status) = dsn.single();
    assert!(rcpt.ends_with("user@example.com"), "{rcpt}");
    assert_eq!(action, "relayed");
    assert!(status.starts_with("2."), "{status}");
    assert_eq!(dsn.fields("Original-Envelope-Id"), ["env-without-dsn"]);
}

#[tokio::test]
async fn envid_and_orcpt_reach_the_primary_exactly_as_received() {
    let net = Net::start().await;
    // Down at first, so the stored envelope can be read.
    net.relay.set_mode(Mode::Down);
    let t = TestServer::start(net.config()).await;
    let mut c = t.ehlo().await;
    let id = send_raw(
        &mut c,
        &format!("MAIL FROM:<{SENDER}> RET=HDRS ENVID=Q+2BZ+3Dx+2Fy.42"),
        &["RCPT TO:<user@example.com> NOTIFY=FAILURE ORCPT=rfc822;a+2bb@example.com"],
        &tagged("exact"),
    )
    .await;
    c.quit().await;
    // Decoded in the spool, for notices; as received besides.
    let env = t.spool().envelope(id).unwrap().expect("queued");
    assert_eq!(env.envid.as_deref(), Some("Q+Z=x/y.42"));
    assert_eq!(env.envid_xtext.as_deref(), Some("Q+2BZ+3Dx+2Fy.42"));
    let rcpt = &env.recipients[0];
    assert_eq!(rcpt.orcpt.as_deref(), Some("a+b@example.com"));
    assert_eq!(
        rcpt.orcpt_xtext.as_deref(),
        Some("rfc822;a+2bb@example.com")
    );
    net.relay.set_mode(Mode::Up);
    assert!(net.relay.wait_for_messages(1, WAIT).await);
    wait_gone(&t, id).await;
    let m = &net.relay.messages()[0];
    assert_eq!(
        m.mail_from_line,
        format!("MAIL FROM:<{SENDER}> RET=HDRS ENVID=Q+2BZ+3Dx+2Fy.42")
    );
    assert_eq!(
        m.rcpt_lines,
        ["RCPT TO:<user@example.com> NOTIFY=FAILURE ORCPT=rfc822;a+2bb@example.com"]
    );
}
