//! `verify_recipients`: the primary's RCPT answers seen while delivering, or
//! asked for in a callout while a client waits, are remembered in the spool
//! and decide at RCPT.

mod common;
mod primary;

use std::time::Duration;

use common::{TestConfig, TestServer};
use primary::Primary;

#[tokio::test]
async fn deliveries_teach_which_recipients_exist() {
    let primary = Primary::start().await;
    primary.set_rcpt_reply(
        "bob@example.com",
        "550 5.1.1 <bob@example.com>: no such user",
    );
    primary.set_rcpt_reply("carol@example.com", "450 4.2.1 mailbox busy");
    let domains = |verify: bool| {
        format!(
            "[[domain]]\nname = \"example.com\"\nroute = \"[127.0.0.1]:{}\"\nverify_recipients = {verify}\n",
            primary.addr.port()
        )
    };
    // Accepted while the primary is down: no callout can answer then.
    primary.set_mode(primary::Mode::Down);
    let t = TestServer::start(TestConfig::default().domains(&domains(true))).await;
    let mut c = t.ehlo().await;
    c.send_mail(
        "",
        &["alice@example.com", "bob@example.com", "carol@example.com"],
        b"Subject: x\r\n\r\nx\r\n",
    )
    .await
    .queue_id();
    c.quit().await;
    primary.set_mode(primary::Mode::Up);
    t.server.flush(None);
    assert!(primary.wait_for_messages(1, Duration::from_secs(5)).await);

    let spool = t.spool();
    learned(spool, "bob@example.com").await;
    assert_eq!(
        spool.learned("Alice@example.com").unwrap().map(|v| v.0),
        Some(true)
    );
    assert_eq!(
        spool.learned("bob@example.com").unwrap().map(|v| v.0),
        Some(false)
    );
    // A temporary refusal says nothing about the mailbox.
    assert_eq!(spool.learned("carol@example.com").unwrap(), None);
}

#[tokio::test]
async fn nothing_is_learned_without_verify_recipients() {
    let primary = Primary::start().await;
    let t = TestServer::start(TestConfig::default().domains(&format!(
        "[[domain]]\nname = \"example.com\"\nroute = \"[127.0.0.1]:{}\"\n",
        primary.addr.port()
    )))
    .await;
    let mut c = t.ehlo().await;
    c.send_mail(
        "a@origin.test",
        &["alice@example.com"],
        b"Subject: x\r\n\r\nx\r\n",
    )
    .await
    .queue_id();
    c.quit().await;
    assert!(primary.wait_for_messages(1, Duration::from_secs(5)).await);
    // Once the outcome is recorded, nothing was learned.
    t.settled().await;
    assert!(t.stored().is_empty(), "{:?}", t.stored());
    assert_eq!(t.spool().learned("alice@example.com").unwrap(), None);
}

#[tokio::test]
async fn while_the_primary_is_down_learned_answers_decide_at_rcpt() {
    let primary = Primary::start().await;
    primary.set_rcpt_reply(
        "bob@example.com",
        "550 5.1.1 <bob@example.com>: no such user",
    );
    let t = TestServer::start(TestConfig::default().domains(&format!(
        "[[domain]]\nname = \"example.com\"\nroute = \"[127.0.0.1]:{}\"\n\
         verify_recipients = true\nunknown_recipients = \"tempfail\"\n",
        primary.addr.port()
    )))
    .await;
    // While the primary is up, callouts teach us alice exists and bob does not.
    let mut c = t.ehlo().await;
    c.cmd("MAIL FROM:<a@origin.test>").await.assert(250);
    c.cmd("RCPT TO:<alice@example.com>").await.assert(250);
    c.cmd("RCPT TO:<bob@example.com>")
        .await
        .assert_status(550, "5.1.1");
    c.cmd("RSET").await.assert(250);
    learned(t.spool(), "bob@example.com").await;

    // The primary goes away; the next delivery attempt finds it down.
    primary.set_mode(primary::Mode::Down);
    c.send_mail(
        "a@origin.test",
        &["alice@example.com"],
        b"Subject: y\r\n\r\ny\r\n",
    )
    .await
    .queue_id();
    // Once the primary is seen to be down, unseen recipients wait.
    common::eventually(Duration::from_secs(5), async || {
        c.cmd("MAIL FROM:<a@origin.test>").await.assert(250);
        let reply = c.cmd("RCPT TO:<carol@example.com>").await;
        c.cmd("RSET").await.assert(250);
        if reply.code == 450 {
            reply.assert_status(450, "4.1.1");
            return Ok(());
        }
        Err(format!("carol, never seen, never tempfailed: {reply:?}"))
    })
    .await;
    c.cmd("MAIL FROM:<a@origin.test>").await.assert(250);
    c.cmd("RCPT TO:<alice@example.com>").await.assert(250);
    c.cmd("RCPT TO:<bob@example.com>")
        .await
        .assert_status(550, "5.1.1");
    c.cmd("RCPT TO:<postmaster@example.com>").await.assert(250);
    c.quit().await;
}

/// A domain with `verify_recipients` whose primary is at `primary`.
/// Waits until the spool has a verdict about `address`.
async fn learned(spool: &mxspool::spool::Spool, address: &str) {
    common::eventually(Duration::from_secs(5), async || {
        match spool.learned(address).expect("read the spool") {
            Some(_) => Ok(()),
            None => Err(format!("nothing learned about {address}")),
        }
    })
    .await;
}

fn verifying(primary: &Primary, unknown: &str) -> TestConfig {
    TestConfig::default().domains(&format!(
        "[[domain]]\nname = \"example.com\"\nroute = \"[127.0.0.1]:{}\"\n\
         verify_recipients = true\nunknown_recipients = \"{unknown}\"\n",
        primary.addr.port()
    ))
}

#[tokio::test]
async fn while_the_primary_is_up_unseen_recipients_are_asked_about_once() {
    let primary = Primary::start().await;
    primary.set_rcpt_reply(
        "bob@example.com",
        "550 5.1.1 <bob@example.com>: no such user",
    );
    primary.set_rcpt_reply("carol@example.com", "450 4.2.1 mailbox busy");
    let t = TestServer::start(verifying(&primary, "tempfail")).await;
    let mut c = t.ehlo().await;
    c.cmd("MAIL FROM:<a@origin.test>").await.assert(250);
    c.cmd("RCPT TO:<alice@example.com>").await.assert(250);
    c.cmd("RCPT TO:<Bob@example.com>")
        .await
        .assert_status(550, "5.1.1");
    // No answer either way: the primary is up, so the mail is taken.
    c.cmd("RCPT TO:<carol@example.com>").await.assert(250);
    c.cmd("RSET").await.assert(250);
    let asked = primary.connections();
    assert_eq!(asked, 3, "one callout per unseen recipient");
    let commands = primary.commands();
    for expected in [
        "MAIL FROM:<>",
        "RCPT TO:<alice@example.com>",
        "RCPT TO:<Bob@example.com>",
    ] {
        assert!(
            commands.iter().any(|c| c == expected),
            "{expected} not in {commands:?}"
        );
    }
    assert!(
        !commands.iter().any(|c| c == "DATA"),
        "a callout sends no message"
    );

    // The answers are remembered: no second callout.
    learned(t.spool(), "bob@example.com").await;
    c.cmd("MAIL FROM:<a@origin.test>").await.assert(250);
    c.cmd("RCPT TO:<alice@example.com>").await.assert(250);
    c.cmd("RCPT TO:<bob@example.com>")
        .await
        .assert_status(550, "5.1.1");
    c.quit().await;
    assert_eq!(primary.connections(), asked, "answers come from the spool");
    assert!(primary.messages().is_empty(), "nothing was delivered");

    let metrics = t.server.metrics().render(&t.spool().gauges(), 0);
    for line in [
        r#"mxspool_recipient_callouts_total{result="exists"} 1"#,
        r#"mxspool_recipient_callouts_total{result="unknown_user"} 1"#,
        r#"mxspool_recipient_callouts_total{result="inconclusive"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} missing");
    }
}

#[tokio::test]
async fn a_primary_that_does_not_answer_callouts_delays_rcpt_briefly() {
    let primary = Primary::start().await;
    primary.set_mode(primary::Mode::Hang);
    let t = TestServer::start(verifying(&primary, "tempfail")).await;
    let mut c = t.ehlo().await;
    c.cmd("MAIL FROM:<a@origin.test>").await.assert(250);
    let started = tokio::time::Instant::now();
    c.line("RCPT TO:<alice@example.com>").await;
    let reply = c.try_reply(Duration::from_secs(15)).await.expect("a reply");
    let waited = started.elapsed();
    // Unverifiable while the primary does not answer: `tempfail` says 450.
    reply.assert_status(450, "4.1.1");
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(8),
        "the callout is bounded: {waited:?}"
    );
    // The silent primary is not asked again for a while: the next answer is quick.
    let started = tokio::time::Instant::now();
    c.cmd("RCPT TO:<bob@example.com>")
        .await
        .assert_status(450, "4.1.1");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(primary.connections(), 1);
    c.quit().await;
}
