//! `verify_recipients`: the primary's RCPT answers seen while delivering are
//! remembered in the spool.

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
    assert!(primary.wait_for_messages(1, Duration::from_secs(5)).await);

    let spool = t.spool();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while spool.learned("bob@example.com").unwrap().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "nothing learned");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
    // Let the outcome be recorded, then check nothing was learned.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !t.stored().is_empty() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
    // While the primary is up, deliveries teach us alice exists and bob does not.
    let mut c = t.ehlo().await;
    c.send_mail(
        "a@origin.test",
        &["alice@example.com", "bob@example.com"],
        b"Subject: x\r\n\r\nx\r\n",
    )
    .await
    .queue_id();
    assert!(primary.wait_for_messages(1, Duration::from_secs(5)).await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while t.spool().learned("bob@example.com").unwrap().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "nothing learned");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Never-seen recipients are accepted while the primary is up.
    c.cmd("MAIL FROM:<a@origin.test>").await.assert(250);
    c.cmd("RCPT TO:<carol@example.com>").await.assert(250);
    c.cmd("RSET").await.assert(250);

    // The primary goes away; the next delivery attempt finds it down.
    primary.set_mode(primary::Mode::Down);
    c.send_mail(
        "a@origin.test",
        &["alice@example.com"],
        b"Subject: y\r\n\r\ny\r\n",
    )
    .await
    .queue_id();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        c.cmd("MAIL FROM:<a@origin.test>").await.assert(250);
        let reply = c.cmd("RCPT TO:<carol@example.com>").await;
        c.cmd("RSET").await.assert(250);
        if reply.code == 450 {
            reply.assert_status(450, "4.1.1");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "carol never tempfailed: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.cmd("MAIL FROM:<a@origin.test>").await.assert(250);
    c.cmd("RCPT TO:<alice@example.com>").await.assert(250);
    c.cmd("RCPT TO:<bob@example.com>")
        .await
        .assert_status(550, "5.1.1");
    c.cmd("RCPT TO:<postmaster@example.com>").await.assert(250);
    c.quit().await;
}
