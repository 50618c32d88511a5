//! SPF against a real DNS server on loopback: `spf = "tag"` records the
//! result in `Authentication-Results:` and `Received-SPF:`, `spf = "reject"`
//! also refuses `fail` at RCPT, `off` does nothing, and a forged
//! `Authentication-Results:` in our name never reaches the primary.

mod common;
mod dns_server;

use std::net::IpAddr;

use common::{Client, TestConfig, TestServer};
use dns_server::TestDns;
use hickory_proto::rr::RecordType;

/// A server asking `dns`, with `tagged.test` (tag) and `strict.test`
/// (reject) besides the default domains (SPF off), and the test zone's
/// SPF records: clients connect from 127.0.0.1 unless a test says otherwise.
async fn start() -> (TestDns, TestServer) {
    let dns = TestDns::start().await;
    dns.set_txt("pass.test", &["v=spf1 ip4:127.0.0.1 -all"]);
    dns.set_txt("fail.test", &["v=spf1 ip4:192.0.2.1 -all"]);
    dns.set_txt("soft.test", &["v=spf1 ip4:192.0.2.1 ~all"]);
    dns.set_txt("neutral.test", &["v=spf1 ?all"]);
    dns.set_txt("loop.test", &["v=spf1 include:loop2.test -all"]);
    dns.set_txt("loop2.test", &["v=spf1 include:loop.test -all"]);
    dns.set_servfail("broken.test", true);
    dns.set_txt("helo-pass.test", &["v=spf1 ip4:127.0.0.0/8 -all"]);
    dns.set_txt("helo-fail.test", &["v=spf1 -all"]);
    let config = TestConfig::default()
        .set("delivery", "nameservers", &format!("[\"{}\"]", dns.addr))
        .append(
            r#"
[[domain]]
name = "tagged.test"
route = "{route}"
spf = "tag"

[[domain]]
name = "strict.test"
route = "{route}"
spf = "reject"
"#,
        );
    let t = TestServer::start(config).await;
    (dns, t)
}

fn rejected_spf(t: &TestServer) -> u64 {
    t.server
        .metrics()
        .rejected
        .with_label_values(&["spf"])
        .get()
}

/// Sends one message and returns it as stored.
async fn stored_after(
    t: &TestServer,
    c: &mut Client,
    from: &str,
    to: &[&str],
    msg: &[u8],
) -> String {
    let before = t.stored().len();
    c.send_mail(from, to, msg).await.assert(250);
    let stored = t.stored();
    assert_eq!(stored.len(), before + 1);
    String::from_utf8(stored[before].1.clone()).unwrap()
}

const MESSAGE: &[u8] = b"Subject: s\r\n\r\nbody\r\n";

#[tokio::test]
async fn tag_records_each_result_above_our_received() {
    let (_dns, t) = start().await;
    let mut c = t.ehlo().await;
    let body = stored_after(&t, &mut c, "a@pass.test", &["u@tagged.test"], MESSAGE).await;
    assert!(
        body.starts_with(
            "Authentication-Results: mx2.test;\r\n\tspf=pass smtp.mailfrom=a@pass.test\r\n\
             Received-SPF: pass (mx2.test: domain of a@pass.test designates 127.0.0.1 as permitted sender)\r\n\
             \tclient-ip=127.0.0.1; envelope-from=a@pass.test;\r\n\
             \thelo=client.test; receiver=mx2.test; identity=mailfrom;\r\n\
             Received: from client.test"
        ),
        "{body}"
    );
    assert!(body.ends_with("\r\nSubject: s\r\n\r\nbody\r\n"), "{body}");

    for (sender, result) in [
        ("a@fail.test", "fail"),
        ("a@soft.test", "softfail"),
        ("a@neutral.test", "neutral"),
        ("a@loop.test", "permerror"),
        ("a@nowhere.test", "none"),
        ("a@broken.test", "temperror"),
    ] {
        // A message for a domain with SPF off as well: one tagging domain
        // among the recipients is enough.
        let body = stored_after(
            &t,
            &mut c,
            sender,
            &["u@example.com", "u@tagged.test"],
            MESSAGE,
        )
        .await;
        let ar = format!(
            "Authentication-Results: mx2.test;\r\n\tspf={result} smtp.mailfrom={sender}\r\n"
        );
        assert!(body.starts_with(&ar), "{sender}: {body}");
        assert!(
            body.contains(&format!("\r\nReceived-SPF: {result} (mx2.test: ")),
            "{sender}: {body}"
        );
    }
    c.quit().await;
}

#[tokio::test]
async fn reject_refuses_fail_only_and_never_the_postmaster() {
    let (_dns, t) = start().await;
    let mut c = t.ehlo().await;
    c.cmd("MAIL FROM:<a@fail.test>").await.assert(250);
    let reply = c.cmd("RCPT TO:<u@strict.test>").await;
    reply.assert_status(550, "5.7.23");
    assert!(reply.lines[0].contains("fail.test"), "{reply}");
    assert!(reply.lines[0].contains("[127.0.0.1]"), "{reply}");
    c.cmd("RCPT TO:<postmaster@strict.test>").await.assert(250);
    // Tagging domains and domains with SPF off take it.
    c.cmd("RCPT TO:<u@tagged.test>").await.assert(250);
    c.cmd("RCPT TO:<u@example.com>").await.assert(250);
    c.cmd("RSET").await.assert(250);
    assert_eq!(rejected_spf(&t), 1);

    for sender in [
        "a@pass.test",
        "a@soft.test",
        "a@neutral.test",
        "a@loop.test",
        "a@nowhere.test",
        "a@broken.test",
    ] {
        let body = stored_after(&t, &mut c, sender, &["u@strict.test"], MESSAGE).await;
        assert!(
            body.starts_with("Authentication-Results: mx2.test;"),
            "{body}"
        );
    }
    c.quit().await;
    assert_eq!(rejected_spf(&t), 1);
    let text = t.server.metrics().render(&t.spool().gauges(), 0);
    assert!(
        text.contains("mxspool_smtp_rejected_total{reason=\"spf\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_client_elsewhere_passes_where_127_0_0_1_fails() {
    let (dns, t) = start().await;
    dns.set_txt("fail.test", &["v=spf1 ip4:127.0.0.5 -all"]);
    let mut c = t.connect_from("127.0.0.5".parse::<IpAddr>().unwrap()).await;
    c.cmd("EHLO client.test").await.assert(250);
    let body = stored_after(&t, &mut c, "a@fail.test", &["u@strict.test"], MESSAGE).await;
    assert!(
        body.contains("spf=pass smtp.mailfrom=a@fail.test"),
        "{body}"
    );
    assert!(body.contains("client-ip=127.0.0.5;"), "{body}");
    c.quit().await;
}

#[tokio::test]
async fn the_null_sender_is_judged_by_its_helo_name() {
    let (_dns, t) = start().await;
    let mut c = t.connect().await;
    c.cmd("EHLO helo-fail.test").await.assert(250);
    c.cmd("MAIL FROM:<>").await.assert(250);
    c.cmd("RCPT TO:<u@strict.test>")
        .await
        .assert_status(550, "5.7.23");
    c.cmd("RSET").await.assert(250);
    c.cmd("EHLO helo-pass.test").await.assert(250);
    let body = stored_after(&t, &mut c, "", &["u@strict.test"], MESSAGE).await;
    assert!(
        body.starts_with(
            "Authentication-Results: mx2.test;\r\n\tspf=pass smtp.helo=helo-pass.test\r\n\
             Received-SPF: pass (mx2.test: domain of postmaster@helo-pass.test designates 127.0.0.1 as permitted sender)\r\n\
             \tclient-ip=127.0.0.1; envelope-from=\"\";\r\n\
             \thelo=helo-pass.test; receiver=mx2.test; identity=helo;\r\n"
        ),
        "{body}"
    );
    c.quit().await;
    assert_eq!(rejected_spf(&t), 1);
}

#[tokio::test]
async fn forged_results_in_our_name_are_removed_others_stay() {
    let (_dns, t) = start().await;
    let mut c = t.ehlo().await;
    let msg = b"Authentication-Results: MX2.test; spf=pass smtp.mailfrom=a@fail.test\r\n\
        Authentication-Results: other.test; spf=pass smtp.mailfrom=a@fail.test\r\n\
        Authentication-Results:\r\n\tmx2.test;\r\n\tdkim=pass header.d=fail.test\r\n\
        Subject: s\r\n\
        \r\n\
        Authentication-Results: mx2.test; spf=pass (quoted in the body)\r\n";
    for to in ["u@tagged.test", "u@example.com"] {
        let body = stored_after(&t, &mut c, "a@fail.test", &[to], msg).await;
        let header = body.split("\r\n\r\n").next().unwrap();
        let ours = header.matches("Authentication-Results: mx2.test;").count();
        assert_eq!(ours, usize::from(to == "u@tagged.test"), "{body}");
        assert!(!header.contains("MX2.test"), "{body}");
        assert!(!header.contains("dkim=pass"), "{body}");
        assert!(
            header.contains("\r\nAuthentication-Results: other.test; spf=pass"),
            "{body}"
        );
        assert!(
            body.ends_with(
                "\r\n\r\nAuthentication-Results: mx2.test; spf=pass (quoted in the body)\r\n"
            ),
            "{body}"
        );
    }
    c.quit().await;
}

#[tokio::test]
async fn off_adds_nothing_and_asks_nothing() {
    let (dns, t) = start().await;
    let mut c = t.ehlo().await;
    let body = stored_after(&t, &mut c, "a@fail.test", &["u@example.com"], MESSAGE).await;
    assert!(body.starts_with("Received: from client.test"), "{body}");
    assert!(!body.contains("Received-SPF"), "{body}");
    assert!(!body.contains("Authentication-Results"), "{body}");
    c.quit().await;
    assert_eq!(dns.queries("fail.test", RecordType::TXT), 0);
}

#[tokio::test]
async fn a_message_sent_by_bdat_is_tagged_too() {
    let (_dns, t) = start().await;
    let mut c = t.ehlo().await;
    c.cmd("MAIL FROM:<a@soft.test>").await.assert(250);
    c.cmd("RCPT TO:<u@tagged.test>").await.assert(250);
    let mut chunk = format!("BDAT {} LAST\r\n", MESSAGE.len()).into_bytes();
    chunk.extend_from_slice(MESSAGE);
    c.send(chunk).await;
    c.expect(250).await;
    c.quit().await;
    let stored = t.stored();
    let body = String::from_utf8_lossy(&stored[0].1);
    assert!(
        body.starts_with(
            "Authentication-Results: mx2.test;\r\n\tspf=softfail smtp.mailfrom=a@soft.test\r\n"
        ),
        "{body}"
    );
}
