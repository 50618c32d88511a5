//! CHUNKING (RFC 3030) inbound, end to end on loopback: messages sent with
//! BDAT are stored as DATA would store them (our `Received:`, CRLF line
//! endings, nothing un-stuffed), with the same limits and the same "250 only
//! once it is on disk, nothing half-stored otherwise". Every chunk's octets
//! are read, even those of a refused chunk, so the session stays in step.

mod common;
mod primary;

use std::time::Duration;

use common::{Client, TestConfig, TestServer, only_crlf, split_received};
use primary::{Mode, Primary};

/// Sends `BDAT <len>[ LAST]` and the octets in one write; returns the reply.
async fn bdat(c: &mut Client, octets: &[u8], last: bool) -> common::Reply {
    c.send(chunk(octets, last)).await;
    c.reply().await
}

/// The bytes of one BDAT command and its chunk.
fn chunk(octets: &[u8], last: bool) -> Vec<u8> {
    let mut out = format!(
        "BDAT {}{}\r\n",
        octets.len(),
        if last { " LAST" } else { "" }
    )
    .into_bytes();
    out.extend_from_slice(octets);
    out
}

async fn envelope(c: &mut Client, to: &str) {
    c.cmd("MAIL FROM:<sender@origin.test>").await.assert(250);
    c.cmd(&format!("RCPT TO:<{to}>")).await.assert(250);
}

/// Waits until no SMTP session is open: the server has seen every close.
async fn sessions_ended(t: &TestServer) {
    common::eventually(Duration::from_secs(5), async || {
        match t.server.metrics().sessions.get() {
            0 => Ok(()),
            n => Err(format!("{n} sessions still open")),
        }
    })
    .await;
}

#[tokio::test]
async fn chunks_of_odd_sizes_are_stored_byte_exact() {
    let t = TestServer::start(TestConfig::default()).await;
    let mut c = t.connect().await;
    let ehlo = c.cmd("EHLO client.test").await;
    ehlo.assert(250);
    assert!(ehlo.has_line("CHUNKING"), "EHLO lacks CHUNKING: {ehlo}");

    // The 1|7 boundary falls between the CR and the LF of the first line.
    let mut content = b"From: a\r\nSubject: chunks\r\n\r\n".to_vec();
    for i in 0..60 {
        content.extend_from_slice(format!("line {i} .\r\n.\r\n..dots stay\r\n").as_bytes());
    }
    content.extend_from_slice("caf\u{e9}\r\nno newline at the end".as_bytes());
    assert!(content.len() > 1 + 7 + 1000 + 1);
    assert_eq!(&content[7..9], b"\r\n");

    envelope(&mut c, "user@example.com").await;
    let (first, rest) = content.split_at(1);
    let (second, rest) = rest.split_at(7);
    let (third, rest) = rest.split_at(1000);
    for piece in [first, second, third] {
        let reply = bdat(&mut c, piece, false).await;
        reply.assert_status(250, "2.0.0");
        assert!(
            reply.lines[0].contains(&format!("{} octets", piece.len())),
            "{reply}"
        );
    }
    let id = bdat(&mut c, rest, true).await.queue_id();
    assert_eq!(t.server.metrics().accepted.get(), 1);
    c.quit().await;

    let stored = t.stored();
    assert_eq!(stored.len(), 1);
    let (env, body) = &stored[0];
    assert_eq!(env.id, id);
    assert!(env.has_8bit);
    let (received, rest) = split_received(body);
    assert!(
        received.contains(&format!("with ESMTP id {id}")),
        "{received}"
    );
    assert!(received.contains("for <user@example.com>"), "{received}");
    // The last line lacked a line break: it gets CRLF, as DATA content
    // always ends in one.
    let mut want = content.clone();
    want.extend_from_slice(b"\r\n");
    assert_eq!(rest, want.as_slice(), "stored content differs");
}

#[tokio::test]
async fn bdat_0_last_ends_a_message_after_chunks_and_on_its_own() {
    let t = TestServer::start(TestConfig::default()).await;
    let mut c = t.ehlo().await;

    envelope(&mut c, "user@example.com").await;
    bdat(&mut c, b"Subject: two\r\n\r\n", false)
        .await
        .assert(250);
    bdat(&mut c, b"body\r\n", false).await.assert(250);
    let with_content = bdat(&mut c, b"", true).await.queue_id();

    envelope(&mut c, "user@example.com").await;
    let empty = bdat(&mut c, b"", true).await.queue_id();
    c.quit().await;

    let stored = t.stored();
    assert_eq!(stored.len(), 2);
    let body = |id| {
        let (_, body) = stored.iter().find(|(e, _)| e.id == id).expect("stored");
        split_received(body).1.to_vec()
    };
    assert_eq!(body(with_content), b"Subject: two\r\n\r\nbody\r\n");
    assert_eq!(body(empty), b"");
}

#[tokio::test]
async fn a_whole_transaction_pipelined_in_one_write() {
    let t = TestServer::start(TestConfig::default()).await;
    let mut c = t.ehlo().await;
    // Two transactions and a NOOP in one write: the chunks sit in the
    // server's input buffer together with the commands around them.
    let mut wire = Vec::new();
    for n in 1..=2 {
        wire.extend_from_slice(
            format!("MAIL FROM:<sender@origin.test>\r\nRCPT TO:<user{n}@example.com>\r\n")
                .as_bytes(),
        );
        wire.extend(chunk(
            format!("Subject: {n}\r\n\r\nRCPT TO:<x@example.com>\r\n").as_bytes(),
            true,
        ));
    }
    wire.extend_from_slice(b"NOOP\r\n");
    c.send(&wire).await;
    let mut ids = Vec::new();
    for _ in 1..=2 {
        c.expect(250).await;
        c.expect(250).await;
        ids.push(c.reply().await.queue_id());
    }
    c.reply().await.assert_status(250, "2.0.0");
    c.quit().await;

    let stored = t.stored();
    assert_eq!(stored.len(), 2);
    for (n, id) in (1..=2).zip(&ids) {
        let (env, body) = stored.iter().find(|(e, _)| e.id == *id).unwrap();
        assert_eq!(common::recipients(env), [format!("user{n}@example.com")]);
        let want = format!("Subject: {n}\r\n\r\nRCPT TO:<x@example.com>\r\n");
        assert_eq!(split_received(body).1, want.as_bytes());
    }
}

#[tokio::test]
async fn a_chunk_over_the_limit_is_refused_and_the_session_goes_on() {
    // max_message_size is 10000 in the test config.
    let t = TestServer::start(TestConfig::default()).await;
    let mut c = t.ehlo().await;
    let metrics = t.server.metrics().clone();
    let size_refusals = || metrics.rejected.with_label_values(&["size"]).get();

    envelope(&mut c, "user@example.com").await;
    bdat(&mut c, &[b'a'; 6000], false).await.assert(250);
    // The chunk that would go over, and the ones pipelined behind it: each
    // read to its end (commands hidden in them stay unanswered).
    let mut wire = chunk(&[b'b'; 6000], false);
    wire.extend(chunk(b"QUIT\r\n", false));
    wire.extend(chunk(b"QUIT\r\n", true));
    c.send(&wire).await;
    c.reply().await.assert_status(552, "5.3.4");
    c.reply().await.assert_status(503, "5.5.1");
    c.reply().await.assert_status(503, "5.5.1");
    assert_eq!(size_refusals(), 1, "the follow-on refusals are not counted");

    // A single chunk over the limit on its own.
    envelope(&mut c, "user@example.com").await;
    bdat(&mut c, &[b'c'; 10001], true)
        .await
        .assert_status(552, "5.3.4");
    assert_eq!(size_refusals(), 2);

    // Exactly the limit is fine, and the session is in step.
    envelope(&mut c, "user@example.com").await;
    let mut full = vec![b'd'; 9998];
    full.extend_from_slice(b"\r\n");
    let id = bdat(&mut c, &full, true).await.queue_id();
    c.quit().await;

    let stored = t.stored();
    assert_eq!(stored.len(), 1, "only the last message is stored");
    assert_eq!(stored[0].0.id, id);
    assert_eq!(split_received(&stored[0].1).1, full.as_slice());
}

#[tokio::test]
async fn a_connection_dropped_mid_chunk_leaves_nothing() {
    let t = TestServer::start(TestConfig::default()).await;
    for earlier_chunks in [0, 2] {
        let mut c = t.ehlo().await;
        envelope(&mut c, "user@example.com").await;
        for _ in 0..earlier_chunks {
            bdat(&mut c, b"Subject: x\r\n", false).await.assert(250);
        }
        // A LAST chunk that never completes; a huge one is never allocated.
        c.send(b"BDAT 4000000000 LAST\r\nSubject: cut\r\n\r\npartial")
            .await;
        drop(c);
        sessions_ended(&t).await;
    }
    let mut c = t.ehlo().await;
    envelope(&mut c, "user@example.com").await;
    c.send(b"BDAT 10 LAST\r\nhalf").await;
    drop(c);
    sessions_ended(&t).await;

    assert!(
        t.stored().is_empty(),
        "something of a cut message was stored"
    );
    assert_eq!(t.server.metrics().accepted.get(), 0);
}

#[tokio::test]
async fn rset_drops_the_chunks_received() {
    let t = TestServer::start(TestConfig::default()).await;
    let mut c = t.ehlo().await;
    envelope(&mut c, "user@example.com").await;
    bdat(&mut c, b"Subject: dropped\r\n", false)
        .await
        .assert(250);
    c.cmd("RSET").await.assert(250);
    envelope(&mut c, "user@example.com").await;
    let id = bdat(&mut c, b"Subject: kept\r\n", true).await.queue_id();
    c.quit().await;
    let stored = t.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].0.id, id);
    assert_eq!(split_received(&stored[0].1).1, b"Subject: kept\r\n");
}

#[tokio::test]
async fn data_after_bdat_is_refused() {
    let t = TestServer::start(TestConfig::default()).await;
    let mut c = t.ehlo().await;
    envelope(&mut c, "user@example.com").await;
    bdat(&mut c, b"Subject: x\r\n\r\n", false).await.assert(250);
    c.cmd("DATA").await.assert_status(503, "5.5.1");
    // The transaction goes on by BDAT.
    let id = bdat(&mut c, b"body\r\n", true).await.queue_id();
    c.quit().await;
    let stored = t.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].0.id, id);
    assert_eq!(
        split_received(&stored[0].1).1,
        b"Subject: x\r\n\r\nbody\r\n"
    );
}

#[tokio::test]
async fn bdat_before_rcpt_is_refused_and_its_octets_consumed() {
    let t = TestServer::start(TestConfig::default()).await;
    let mut c = t.ehlo().await;
    // Commands inside a refused chunk are content to skip, never commands.
    let hidden = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@example.com>\r\n";
    bdat(&mut c, hidden, true).await.assert_status(503, "5.5.1");
    c.cmd("MAIL FROM:<sender@origin.test>").await.assert(250);
    bdat(&mut c, hidden, true).await.assert_status(503, "5.5.1");
    c.cmd("RCPT TO:<user@example.com>").await.assert(503);
    c.cmd("NOOP").await.assert_status(250, "2.0.0");
    c.quit().await;
    assert!(t.stored().is_empty());
    assert_eq!(
        t.server
            .metrics()
            .rejected
            .with_label_values(&["syntax"])
            .get(),
        3,
        "two chunks and one RCPT refused"
    );
}

#[tokio::test]
async fn bare_line_endings_in_chunks_are_stored_as_crlf() {
    let t = TestServer::start(TestConfig::default()).await;
    let mut c = t.ehlo().await;
    envelope(&mut c, "user@example.com").await;
    // The CR ending the first chunk and the LF starting the second are one
    // line break; the other CRs and LFs are bare.
    bdat(&mut c, b"Subject: bare\n\nline one\r", false)
        .await
        .assert(250);
    let id = bdat(&mut c, b"\nline two\rline three\n", true)
        .await
        .queue_id();
    c.quit().await;
    let stored = t.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].0.id, id);
    let body = &stored[0].1;
    assert!(only_crlf(body), "a bare CR or LF stored: {body:?}");
    assert_eq!(
        split_received(body).1,
        b"Subject: bare\r\n\r\nline one\r\nline two\r\nline three\r\n"
    );
}

/// Fake and real ends of data inside BDAT content are content: one message
/// is stored, and forwarded by DATA it reaches the primary as one message,
/// byte for byte what was stored, with no command of its own.
#[tokio::test]
async fn smuggled_commands_in_chunks_stay_one_message_when_forwarded() {
    let primary = Primary::start().await;
    primary.set_mode(Mode::Down);
    let config = TestConfig::default()
        .set("delivery", "probe_interval", r#""200ms""#)
        .set("delivery", "retry_initial", r#""1h""#)
        .set("delivery", "retry_max", r#""2h""#)
        .domains(&format!(
            "[[domain]]\nname = \"example.com\"\nroute = \"[127.0.0.1]:{}\"\n",
            primary.addr.port()
        ));
    let t = TestServer::start(config).await;
    let mut c = t.ehlo().await;
    c.cmd("MAIL FROM:<honest@origin.test>").await.assert(250);
    c.cmd("RCPT TO:<intended@example.com>").await.assert(250);
    let smuggled = b"\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n\
Subject: smuggled\r\n\r\nsmuggled body\r\n";
    let mut content = b"Subject: honest\r\n\r\nbefore".to_vec();
    for end in [&b"\r\n.\r\n"[..], b"\n.\n", b"\r\n.\n", b"\r.\r"] {
        content.extend_from_slice(end);
        content.extend_from_slice(smuggled);
    }
    content.extend_from_slice(b".\r\nafter\r\n");
    // Split so that chunk ends fall inside the fake ends.
    let (a, rest) = content.split_at(27);
    let (b, rest) = rest.split_at(100);
    bdat(&mut c, a, false).await.assert(250);
    bdat(&mut c, b, false).await.assert(250);
    let id = bdat(&mut c, rest, true).await.queue_id();
    c.quit().await;

    let stored = t.stored();
    assert_eq!(stored.len(), 1, "one message, whatever it holds");
    let (env, body) = &stored[0];
    assert_eq!(env.id, id);
    assert_eq!(env.sender, "honest@origin.test");
    assert_eq!(common::recipients(env), ["intended@example.com"]);
    assert!(only_crlf(body), "a bare CR or LF stored");
    let mut want = b"Subject: honest\r\n\r\nbefore".to_vec();
    for _ in 0..4 {
        want.extend_from_slice(b"\r\n.\r\n");
        want.extend_from_slice(smuggled);
    }
    want.extend_from_slice(b".\r\nafter\r\n");
    assert_eq!(
        String::from_utf8_lossy(split_received(body).1),
        String::from_utf8_lossy(&want)
    );

    primary.set_mode(Mode::Up);
    assert!(
        primary.wait_for_messages(1, Duration::from_secs(15)).await,
        "not forwarded"
    );
    let messages = primary.messages();
    assert_eq!(messages.len(), 1, "the primary got more than one message");
    assert!(
        messages[0].body == *body,
        "the primary got other bytes than were stored:\n{}",
        String::from_utf8_lossy(&messages[0].body)
    );
    for command in primary.commands() {
        assert!(
            !command.contains("evil") && !command.contains("victim"),
            "the primary was sent {command:?}"
        );
    }
}
