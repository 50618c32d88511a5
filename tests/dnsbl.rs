//! DNS blocklists and allowlists against a real DNS server on loopback:
//! clients connect from different 127.x.y.z addresses, the lists answer (or
//! do not), and RCPT says what the summed weights decided.

mod common;
mod dns_server;

use std::net::IpAddr;
use std::time::Duration;

use common::{Client, TestConfig, TestServer};
use dns_server::TestDns;
use hickory_proto::rr::RecordType;

/// A server asking `dns` and consulting the lists `keys` set (`dnsbl`,
/// `dnswl`, `dnsbl_threshold`, `trusted`).
async fn start(dns: &TestDns, keys: &[(&'static str, &str)]) -> TestServer {
    let mut config =
        TestConfig::default().set("delivery", "nameservers", &format!("[\"{}\"]", dns.addr));
    for (key, value) in keys {
        config = config.server(key, value);
    }
    TestServer::start(config).await
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The name a list `zone` is asked about an IPv4 `client`.
fn query(zone: &str, client: &str) -> String {
    let [a, b, c, d] = match ip(client) {
        IpAddr::V4(v4) => v4.octets(),
        IpAddr::V6(_) => panic!("IPv4 clients only"),
    };
    format!("{d}.{c}.{b}.{a}.{zone}")
}

/// Lists `client` in `zone` with the answer `answer` (127.0.0.2 and the like).
fn list(dns: &TestDns, zone: &str, client: &str, answer: &str) {
    dns.set_ips(&query(zone, client), &[ip(answer)]);
}

/// A connection from `client` after EHLO and MAIL FROM.
async fn mail_from(t: &TestServer, client: &str) -> Client {
    let mut c = t.connect_from(ip(client)).await;
    c.cmd("EHLO client.test").await.assert(250);
    c.cmd("MAIL FROM:<sender@origin.test>").await.assert(250);
    c
}

fn rejected_dnsbl(t: &TestServer) -> u64 {
    t.server
        .metrics()
        .rejected
        .with_label_values(&["dnsbl"])
        .get()
}

fn lookup_errors(t: &TestServer, zone: &str) -> u64 {
    t.server
        .metrics()
        .dnsbl_errors
        .with_label_values(&[zone])
        .get()
}

#[tokio::test]
async fn a_listed_client_is_refused_at_rcpt_but_may_write_to_postmaster() {
    let dns = TestDns::start().await;
    let t = start(&dns, &[("dnsbl", r#"["bl.test*2"]"#)]).await;
    list(&dns, "bl.test", "127.0.0.2", "127.0.0.2");

    let mut c = mail_from(&t, "127.0.0.2").await;
    let reply = c.cmd("RCPT TO:<user@example.com>").await;
    reply.assert_status(550, "5.7.1");
    assert!(
        reply.lines[0].contains("client [127.0.0.2] blocked using bl.test"),
        "{reply}"
    );
    c.cmd("RCPT TO:<user@elsewhere.test>")
        .await
        .assert_status(550, "5.7.1");
    // RFC 5321 §4.5.1: the postmaster of a domain we take mail for is
    // reachable even for a listed client.
    c.cmd("RCPT TO:<postmaster@example.com>").await.assert(250);
    c.cmd("RCPT TO:<postmaster>").await.assert(250);
    c.cmd("DATA").await.assert(354);
    c.send(common::dot_stuff(b"Subject: delisting\r\n\r\nplease\r\n"))
        .await;
    c.expect(250).await;
    c.quit().await;

    let stored = t.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(
        common::recipients(&stored[0].0),
        ["postmaster@example.com", common::POSTMASTER]
    );
    assert_eq!(rejected_dnsbl(&t), 2);
    let text = t.server.metrics().render(&t.spool().gauges(), 0);
    assert!(
        text.contains("mxspool_smtp_rejected_total{reason=\"dnsbl\"} 2"),
        "{text}"
    );
}

#[tokio::test]
async fn an_unlisted_client_is_accepted() {
    let dns = TestDns::start().await;
    let t = start(&dns, &[("dnsbl", r#"["bl.test"]"#)]).await;
    list(&dns, "bl.test", "127.0.0.2", "127.0.0.2");

    let mut c = mail_from(&t, "127.0.0.3").await;
    c.cmd("RCPT TO:<user@example.com>").await.assert(250);
    c.quit().await;
    assert_eq!(dns.queries("3.0.0.127.bl.test", RecordType::A), 1);
    assert_eq!(rejected_dnsbl(&t), 0);
    assert_eq!(lookup_errors(&t, "bl.test"), 0);
}

#[tokio::test]
async fn weights_add_up_to_the_threshold() {
    let dns = TestDns::start().await;
    let t = start(
        &dns,
        &[
            ("dnsbl", r#"["one.test", "two.test*1"]"#),
            ("dnsbl_threshold", "2"),
        ],
    )
    .await;
    list(&dns, "one.test", "127.0.0.4", "127.0.0.2");
    list(&dns, "one.test", "127.0.0.5", "127.0.0.2");
    list(&dns, "two.test", "127.0.0.5", "127.0.0.2");

    let mut c = mail_from(&t, "127.0.0.4").await;
    c.cmd("RCPT TO:<user@example.com>").await.assert(250);
    let mut c = mail_from(&t, "127.0.0.5").await;
    let reply = c.cmd("RCPT TO:<user@example.com>").await;
    reply.assert_status(550, "5.7.1");
    assert!(
        reply.lines[0].ends_with("blocked using one.test"),
        "{reply}"
    );
    assert_eq!(rejected_dnsbl(&t), 1);
}

#[tokio::test]
async fn an_allowlist_cancels_a_listing() {
    let dns = TestDns::start().await;
    let t = start(
        &dns,
        &[
            ("dnsbl", r#"["bl.test*2"]"#),
            ("dnswl", r#"["wl.test*-2"]"#),
        ],
    )
    .await;
    for client in ["127.0.0.6", "127.0.0.7"] {
        list(&dns, "bl.test", client, "127.0.0.2");
    }
    list(&dns, "wl.test", "127.0.0.6", "127.0.10.3");

    let mut c = mail_from(&t, "127.0.0.6").await;
    c.cmd("RCPT TO:<user@example.com>").await.assert(250);
    let mut c = mail_from(&t, "127.0.0.7").await;
    c.cmd("RCPT TO:<user@example.com>")
        .await
        .assert_status(550, "5.7.1");
}

#[tokio::test]
async fn only_answers_matching_the_filter_count() {
    let dns = TestDns::start().await;
    let t = start(
        &dns,
        &[(
            "dnsbl",
            r#"["bl.test=127.0.0.2", "ranges.test=127.0.0.[4..6;9]"]"#,
        )],
    )
    .await;
    list(&dns, "bl.test", "127.0.0.8", "127.0.0.3");
    list(&dns, "ranges.test", "127.0.0.8", "127.0.0.7");
    list(&dns, "bl.test", "127.0.0.9", "127.0.0.2");
    list(&dns, "ranges.test", "127.0.0.10", "127.0.0.5");

    let mut c = mail_from(&t, "127.0.0.8").await;
    c.cmd("RCPT TO:<user@example.com>").await.assert(250);
    let mut c = mail_from(&t, "127.0.0.9").await;
    let reply = c.cmd("RCPT TO:<user@example.com>").await;
    assert!(reply.lines[0].ends_with("blocked using bl.test"), "{reply}");
    let mut c = mail_from(&t, "127.0.0.10").await;
    let reply = c.cmd("RCPT TO:<user@example.com>").await;
    assert!(
        reply.lines[0].ends_with("blocked using ranges.test"),
        "{reply}"
    );
}

/// A list that never answers, or answers SERVFAIL, counts as "not listed"
/// (and is counted); the lists that do answer still decide, and RCPT waits
/// for them no longer than the lookup limit.
#[tokio::test]
async fn lists_that_fail_count_as_not_listed() {
    let dns = TestDns::start().await;
    let t = start(
        &dns,
        &[("dnsbl", r#"["dead.test", "broken.test", "bl.test"]"#)],
    )
    .await;
    dns.set_silent("dead.test");
    for client in ["127.0.0.11", "127.0.0.12"] {
        dns.set_servfail(&query("broken.test", client), true);
    }
    list(&dns, "bl.test", "127.0.0.12", "127.0.0.2");

    let started = tokio::time::Instant::now();
    let mut c = mail_from(&t, "127.0.0.11").await;
    c.cmd("RCPT TO:<user@example.com>").await.assert(250);
    let waited = started.elapsed();
    assert!(
        waited <= mxspool::inbound::dnsbl::LOOKUP_LIMIT + Duration::from_secs(2),
        "{waited:?}"
    );
    let mut c = mail_from(&t, "127.0.0.12").await;
    let reply = c.cmd("RCPT TO:<user@example.com>").await;
    reply.assert_status(550, "5.7.1");
    assert!(reply.lines[0].ends_with("blocked using bl.test"), "{reply}");

    assert!(dns.queries("11.0.0.127.dead.test", RecordType::A) >= 1);
    assert_eq!(lookup_errors(&t, "dead.test"), 2);
    assert_eq!(lookup_errors(&t, "broken.test"), 2);
    assert_eq!(lookup_errors(&t, "bl.test"), 0);
    let text = t.server.metrics().render(&t.spool().gauges(), 0);
    assert!(
        text.contains("mxspool_dnsbl_lookup_errors_total{zone=\"dead.test\"} 2"),
        "{text}"
    );
}

#[tokio::test]
async fn trusted_clients_are_not_looked_up() {
    let dns = TestDns::start().await;
    let t = start(
        &dns,
        &[
            ("dnsbl", r#"["bl.test"]"#),
            ("trusted", r#"["127.0.0.13", "127.0.1.0/24"]"#),
        ],
    )
    .await;
    for client in ["127.0.0.13", "127.0.1.13"] {
        list(&dns, "bl.test", client, "127.0.0.2");
        let mut c = mail_from(&t, client).await;
        c.cmd("RCPT TO:<user@example.com>").await.assert(250);
        c.quit().await;
    }
    assert_eq!(dns.queries("13.0.0.127.bl.test", RecordType::A), 0);
    assert_eq!(dns.queries("13.1.0.127.bl.test", RecordType::A), 0);
    assert_eq!(rejected_dnsbl(&t), 0);
}

#[tokio::test]
async fn answers_are_cached_for_their_ttl() {
    let dns = TestDns::start().await;
    let t = start(&dns, &[("dnsbl", r#"["bl.test"]"#)]).await;
    dns.set_ttl(300);
    list(&dns, "bl.test", "127.0.0.14", "127.0.0.2");
    for _ in 0..3 {
        let mut c = mail_from(&t, "127.0.0.14").await;
        c.cmd("RCPT TO:<user@example.com>")
            .await
            .assert_status(550, "5.7.1");
        c.quit().await;
    }
    assert_eq!(dns.queries("14.0.0.127.bl.test", RecordType::A), 1);
    assert_eq!(rejected_dnsbl(&t), 3);
}

/// SIGHUP's reload brings new lists (and a new threshold) to the next
/// connection.
#[tokio::test]
async fn a_reload_changes_the_lists() {
    let dns = TestDns::start().await;
    let mut t = start(&dns, &[]).await;
    list(&dns, "bl.test", "127.0.0.15", "127.0.0.2");
    let mut c = mail_from(&t, "127.0.0.15").await;
    c.cmd("RCPT TO:<user@example.com>").await.assert(250);
    c.quit().await;

    let config = TestConfig::default()
        .set("delivery", "nameservers", &format!("[\"{}\"]", dns.addr))
        .server("dnsbl", r#"["bl.test"]"#);
    std::fs::write(&t.config_path, config.render(t.dir.path())).unwrap();
    t.server.reload().expect("reload");
    let mut c = mail_from(&t, "127.0.0.15").await;
    c.cmd("RCPT TO:<user@example.com>")
        .await
        .assert_status(550, "5.7.1");
}
