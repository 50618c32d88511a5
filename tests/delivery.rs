//! Delivery end to end: the real server, a scriptable primary, a real DNS
//! server, all on loopback.

mod common;
mod dns_server;
mod primary;

use std::time::Duration;

use common::{TestConfig, TestServer};
use primary::{Mode, Primary};

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
