//! Continuous primary health checks and admission by the primary's state,
//! against a real primary on loopback that goes down and comes back: the
//! gauge and its last-change time follow it with no mail queued, a domain
//! with `when_primary_up = "defer"` turns RCPT away only while its primary
//! answers, and trusted clients are never turned away.

mod common;
mod primary;

use std::net::IpAddr;
use std::time::Duration;

use common::{TestConfig, TestServer, eventually};
use primary::{Mode, Primary};

/// How long any one expected change may take (a few check intervals).
const WAIT: Duration = Duration::from_secs(10);

/// `example.com` routed to `primary`, checked every 200 ms; `defer`: with
/// `when_primary_up = "defer"`.
fn config_for(primary: &Primary, defer: bool) -> TestConfig {
    let when = if defer { "defer" } else { "accept" };
    TestConfig::default()
        .set("delivery", "health_interval", r#""200ms""#)
        .set("delivery", "probe_interval", r#""200ms""#)
        .set("delivery", "retry_initial", r#""1h""#)
        .set("delivery", "retry_max", r#""2h""#)
        .server("trusted", r#"["127.0.0.2/32"]"#)
        .domains(&format!(
            "[[domain]]\nname = \"example.com\"\nroute = \"[127.0.0.1]:{}\"\nwhen_primary_up = \"{when}\"\n",
            primary.addr.port()
        ))
}

/// The value of `name{domain="example.com"}` (or `name{reason=…}`) in `/metrics`.
fn metric(t: &TestServer, series: &str) -> Option<f64> {
    let text = t.server.metrics().render(&t.spool().gauges(), 0);
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

fn up(t: &TestServer) -> Option<f64> {
    metric(t, r#"mxspool_primary_up{domain="example.com"}"#)
}

fn last_change(t: &TestServer) -> f64 {
    metric(
        t,
        r#"mxspool_primary_last_change_timestamp_seconds{domain="example.com"}"#,
    )
    .expect("the series exists from the start")
}

#[tokio::test]
async fn checks_follow_the_primary_with_no_mail_queued() {
    let primary = Primary::start().await;
    primary.set_mode(Mode::Down);
    let t = TestServer::start(config_for(&primary, false)).await;
    let started = last_change(&t);
    assert!(started > 1_577_836_800.0, "the start time: {started}");

    eventually(WAIT, async || match up(&t) {
        Some(0.0) => Ok(()),
        other => Err(format!("primary_up {other:?}")),
    })
    .await;
    let went_down = last_change(&t);
    assert!(went_down >= started, "{went_down} < {started}");
    assert!(t.stored().is_empty(), "nothing was queued");

    primary.set_mode(Mode::Up);
    eventually(WAIT, async || match up(&t) {
        Some(1.0) => Ok(()),
        other => Err(format!("primary_up {other:?}")),
    })
    .await;
    assert!(last_change(&t) >= went_down);
    assert!(primary.connections() >= 1, "checked by connecting");
    assert!(primary.messages().is_empty(), "a check delivers nothing");
}

#[tokio::test]
async fn defer_turns_rcpt_away_only_while_the_primary_answers() {
    let primary = Primary::start().await;
    let t = TestServer::start(config_for(&primary, true)).await;
    // Once a check has succeeded: 450 4.7.1, counted as primary_up.
    eventually(WAIT, async || {
        let mut c = t.ehlo().await;
        c.cmd("MAIL FROM:<a@origin.test>").await.assert(250);
        let reply = c.cmd("RCPT TO:<user@example.com>").await;
        c.quit().await;
        match reply.code {
            450 => Ok(reply),
            _ => Err(format!("not deferred yet: {reply:?}")),
        }
    })
    .await
    .assert_status(450, "4.7.1");
    assert!(
        metric(&t, r#"mxspool_smtp_rejected_total{reason="primary_up"}"#) >= Some(1.0),
        "the deferral is counted"
    );

    // The primary stops answering: within a check or two, mail is taken.
    primary.set_mode(Mode::Down);
    let id = eventually(WAIT, async || {
        let mut c = t.ehlo().await;
        c.cmd("MAIL FROM:<a@origin.test>").await.assert(250);
        let reply = c.cmd("RCPT TO:<user@example.com>").await;
        if reply.code != 250 {
            c.quit().await;
            return Err(format!("still deferred: {reply:?}"));
        }
        c.cmd("DATA").await.assert(354);
        c.send("Subject: while down\r\n\r\nkept\r\n.\r\n").await;
        let id = c.reply().await.queue_id();
        c.quit().await;
        Ok(id)
    })
    .await;

    // It comes back: the check releases the mail, and deferral resumes.
    primary.set_mode(Mode::Up);
    assert!(
        primary.wait_for_messages(1, WAIT).await,
        "the mail taken while it was down was not delivered"
    );
    eventually(WAIT, async || match t.spool().envelope(id).expect("read") {
        None => Ok(()),
        Some(env) => Err(format!("still queued: {env:?}")),
    })
    .await;
    let mut c = t.ehlo().await;
    c.cmd("MAIL FROM:<a@origin.test>").await.assert(250);
    c.cmd("RCPT TO:<user@example.com>")
        .await
        .assert_status(450, "4.7.1");
    c.quit().await;
}

#[tokio::test]
async fn trusted_clients_are_never_deferred() {
    let primary = Primary::start().await;
    let t = TestServer::start(config_for(&primary, true)).await;
    eventually(WAIT, async || match up(&t) {
        Some(1.0) if primary.connections() >= 1 => Ok(()),
        other => Err(format!("not checked yet: {other:?}")),
    })
    .await;
    let trusted: IpAddr = "127.0.0.2".parse().unwrap();
    let mut c = t.connect_from(trusted).await;
    c.cmd("EHLO partner.test").await.assert(250);
    c.cmd("MAIL FROM:<a@partner.test>").await.assert(250);
    c.cmd("RCPT TO:<user@example.com>").await.assert(250);
    c.quit().await;

    let mut c = t.ehlo().await;
    c.cmd("MAIL FROM:<a@origin.test>").await.assert(250);
    c.cmd("RCPT TO:<user@example.com>")
        .await
        .assert_status(450, "4.7.1");
    c.quit().await;
}

#[tokio::test]
async fn without_checks_a_primary_never_seen_is_not_taken_for_up() {
    let primary = Primary::start().await;
    let t = TestServer::start(config_for(&primary, true).set(
        "delivery",
        "health_interval",
        r#""off""#,
    ))
    .await;
    let mut c = t.ehlo().await;
    c.cmd("MAIL FROM:<a@origin.test>").await.assert(250);
    c.cmd("RCPT TO:<user@example.com>").await.assert(250);
    c.quit().await;
    assert_eq!(
        primary.connections(),
        0,
        "no check runs with health_interval off"
    );
}
