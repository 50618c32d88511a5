//! Clients that do not wait for replies (spamware, SMTP smuggling probes) are
//! refused: commands pipelined before EHLO offered PIPELINING, or message
//! content sent before the 354, end the session with 554 5.5.0.

mod common;

use common::{TestConfig, TestServer};

#[tokio::test]
async fn talking_ahead_before_ehlo_is_refused() {
    let t = TestServer::start(TestConfig::default()).await;
    let mut c = t.connect().await;
    c.send("EHLO client.test\r\nMAIL FROM:<a@origin.test>\r\n")
        .await;
    c.expect(554).await.assert_status(554, "5.5.0");
    c.expect_closed().await;

    // After HELO nothing was offered: pipelining is still out of turn.
    let mut c = t.connect().await;
    c.cmd("HELO client.test").await.assert(250);
    c.send("MAIL FROM:<a@origin.test>\r\nRCPT TO:<user@example.com>\r\n")
        .await;
    c.expect(554).await;
    c.expect_closed().await;
    assert!(t.stored().is_empty());
}

#[tokio::test]
async fn content_before_the_354_is_refused_and_not_stored() {
    let t = TestServer::start(TestConfig::default()).await;
    let mut c = t.ehlo().await;
    c.send("MAIL FROM:<a@origin.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\nSubject: early\r\n\r\nx\r\n.\r\n")
        .await;
    c.expect(250).await;
    c.expect(250).await;
    c.expect(554).await.assert_status(554, "5.5.0");
    c.expect_closed().await;
    assert!(t.stored().is_empty());
}

#[tokio::test]
async fn proper_pipelining_after_ehlo_is_fine() {
    let t = TestServer::start(TestConfig::default()).await;
    let mut c = t.ehlo().await;
    c.send("MAIL FROM:<a@origin.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
        .await;
    c.expect(250).await;
    c.expect(250).await;
    c.expect(354).await;
    c.send("Subject: ok\r\n\r\nx\r\n.\r\nQUIT\r\n").await;
    c.expect(250).await;
    c.expect(221).await;
    assert_eq!(t.stored().len(), 1);
}
