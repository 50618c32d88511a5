//! Greylisting over real sockets: an unseen (client network, sender,
//! recipient) is told 450 4.7.1 until `[greylist] delay` has passed, its
//! retry within `window` is accepted and its network remembered; a retry
//! after the window starts over; the state survives a restart; trusted
//! clients, clients a `dnswl` zone lists, postmaster and domains without
//! `greylist` are never delayed.
//! Time moves with the server's clock, not by waiting.

mod common;
mod dns_server;

use std::net::IpAddr;
use std::time::Duration;

use common::{Client, TestConfig, TestServer};
use dns_server::TestDns;

const DELAY: Duration = Duration::from_secs(5 * 60);
const WINDOW: Duration = Duration::from_secs(24 * 3600);

/// `grey.test` greylists; `example.com` (from the defaults) does not;
/// 127.0.2.1 is trusted.
fn config() -> TestConfig {
    TestConfig::default()
        .server("trusted", r#"["127.0.2.1/32"]"#)
        .append("\n[[domain]]\nname = \"grey.test\"\nroute = \"{route}\"\ngreylist = true\n")
}

async fn restart(t: TestServer) -> TestServer {
    let TestServer { server, dir, .. } = t;
    server.shutdown(Duration::from_secs(5)).await;
    TestServer::start_in(dir, config()).await
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("an address")
}

/// A client from `source` after EHLO, with MAIL FROM `sender` accepted.
async fn mail_from(t: &TestServer, source: &str, sender: &str) -> Client {
    let mut c = t.connect_from(ip(source)).await;
    c.cmd("EHLO client.test").await.assert(250);
    c.cmd(&format!("MAIL FROM:<{sender}>")).await.assert(250);
    c
}

/// The RCPT reply's code for one attempt from `source`.
async fn attempt(t: &TestServer, source: &str, sender: &str, rcpt: &str) -> u16 {
    let mut c = mail_from(t, source, sender).await;
    let reply = c.cmd(&format!("RCPT TO:<{rcpt}>")).await;
    if reply.code == 450 {
        reply.assert_status(450, "4.7.1");
    }
    c.quit().await;
    reply.code
}

fn greylisted_count(t: &TestServer) -> f64 {
    let text = t.server.metrics().render(&t.spool().gauges(), 0);
    text.lines()
        .find_map(|l| {
            l.strip_prefix(r#"mxspool_smtp_rejected_total{reason="greylist"}"#)?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

#[tokio::test]
async fn an_unseen_triplet_waits_then_passes_and_its_network_is_remembered() {
    let t = TestServer::start(config()).await;
    assert_eq!(
        attempt(&t, "127.0.0.1", "a@origin.test", "user@grey.test").await,
        450
    );
    // A retry before the delay has passed: still 450.
    t.advance(DELAY - Duration::from_secs(10)).await;
    assert_eq!(
        attempt(&t, "127.0.0.1", "A@origin.test", "User@grey.test").await,
        450
    );
    assert_eq!(greylisted_count(&t), 2.0);

    // After the delay, from another address of the same /24: accepted.
    t.advance(Duration::from_secs(10)).await;
    let mut c = mail_from(&t, "127.0.0.2", "a@origin.test").await;
    c.cmd("RCPT TO:<user@grey.test>").await.assert(250);
    c.cmd("DATA").await.assert(354);
    c.send("Subject: retried\r\n\r\nhello\r\n.\r\n").await;
    c.reply().await.assert(250);
    c.quit().await;
    let stored = t.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(common::recipients(&stored[0].0), ["user@grey.test"]);

    // The network passed: other senders and recipients go straight in.
    assert_eq!(
        attempt(&t, "127.0.0.9", "b@elsewhere.test", "other@grey.test").await,
        250
    );
    // Another network is greylisted.
    assert_eq!(
        attempt(&t, "127.0.1.1", "b@elsewhere.test", "other@grey.test").await,
        450
    );
    assert_eq!(greylisted_count(&t), 3.0);
}

#[tokio::test]
async fn a_retry_after_the_window_starts_over() {
    let t = TestServer::start(config()).await;
    let from = "127.0.3.1";
    assert_eq!(
        attempt(&t, from, "a@origin.test", "user@grey.test").await,
        450
    );
    t.advance(WINDOW + Duration::from_secs(60)).await;
    // Too late: a new first attempt.
    assert_eq!(
        attempt(&t, from, "a@origin.test", "user@grey.test").await,
        450
    );
    t.advance(DELAY).await;
    assert_eq!(
        attempt(&t, from, "a@origin.test", "user@grey.test").await,
        250
    );
}

#[tokio::test]
async fn the_state_survives_a_restart() {
    let t = TestServer::start(config()).await;
    assert_eq!(
        attempt(&t, "127.0.0.1", "a@origin.test", "user@grey.test").await,
        450
    );
    // The first attempt is remembered: after the delay the retry passes.
    let t = restart(t).await;
    t.advance(DELAY).await;
    assert_eq!(
        attempt(&t, "127.0.0.1", "a@origin.test", "user@grey.test").await,
        250
    );
    // And the network that passed is remembered too.
    let t = restart(t).await;
    assert_eq!(
        attempt(&t, "127.0.0.5", "c@third.test", "x@grey.test").await,
        250
    );
}

#[tokio::test]
async fn trusted_clients_postmaster_and_other_domains_skip_it() {
    let t = TestServer::start(config()).await;
    assert_eq!(
        attempt(&t, "127.0.2.1", "a@origin.test", "user@grey.test").await,
        250
    );
    assert_eq!(
        attempt(&t, "127.0.0.1", "a@origin.test", "postmaster@grey.test").await,
        250
    );
    assert_eq!(
        attempt(&t, "127.0.0.1", "a@origin.test", "user@example.com").await,
        250
    );
    assert_eq!(greylisted_count(&t), 0.0);
    // The network has not passed greylisting by any of these.
    assert_eq!(
        attempt(&t, "127.0.0.1", "a@origin.test", "user@grey.test").await,
        450
    );
}

#[tokio::test]
async fn clients_a_dns_allowlist_lists_skip_it() {
    let dns = TestDns::start().await;
    dns.set_ips("1.5.0.127.wl.test", &[ip("127.0.0.2")]);
    let t = TestServer::start(
        config()
            .set("delivery", "nameservers", &format!("[\"{}\"]", dns.addr))
            .server("dnswl", r#"["wl.test"]"#),
    )
    .await;
    assert_eq!(
        attempt(&t, "127.0.5.1", "a@origin.test", "user@grey.test").await,
        250
    );
    // Its neighbour is not listed.
    assert_eq!(
        attempt(&t, "127.0.6.1", "a@origin.test", "user@grey.test").await,
        450
    );
}
