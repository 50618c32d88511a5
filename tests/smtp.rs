//! End-to-end SMTP tests: a real server on 127.0.0.1, a client over a real
//! socket, and the spool read back to prove what was (and was not) stored.

mod common;

use std::time::Duration;
use tokio::time::Instant;

use common::{
    Client, POSTMASTER, ReadError, TestConfig, TestServer, dot_stuff, only_crlf, recipients,
    split_received, stored,
};
use mxspool::spool::{Notify, RcptStatus, Ret, Spool};

#[tokio::test]
async fn full_transaction_is_stored_exactly() {
    let t = TestServer::start(TestConfig::default()).await;
    let mut c = Client::connect(t.addr).await;
    let greeting = c.expect(220).await;
    assert!(greeting.lines[0].starts_with("mx2.test "), "{greeting}");

    let ehlo = c.cmd("EHLO client.test").await;
    ehlo.assert(250);
    assert!(ehlo.lines[0].starts_with("mx2.test"), "{ehlo}");
    for keyword in [
        "PIPELINING",
        "SIZE 10000",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "DSN",
        "ETRN",
    ] {
        assert!(ehlo.has_line(keyword), "EHLO lacks {keyword}: {ehlo}");
    }
    assert!(
        !ehlo.has_line("STARTTLS"),
        "STARTTLS offered without [tls]: {ehlo}"
    );

    c.cmd("MAIL FROM:<sender@origin.test> RET=HDRS ENVID=abc BODY=8BITMIME")
        .await
        .assert_status(250, "2.1.0");
    c.cmd("RCPT TO:<user@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@example.com")
        .await
        .assert_status(250, "2.1.5");
    c.cmd("DATA").await.assert(354);
    let content: &[u8] =
        b"From: sender@origin.test\r\nTo: user@example.com\r\nSubject: hello\r\n\r\n\
        Hello,\r\n.a line that began with a dot\r\n..two dots\r\n\tcaf\xc3\xa9 \xff\r\n\r\nbye\r\n";
    c.send(dot_stuff(content)).await;
    let queued = c.reply().await;
    queued.assert_status(250, "2.0.0");
    let id = queued.queue_id();
    c.quit().await;

    let all = t.stored();
    assert_eq!(all.len(), 1, "exactly one message stored");
    let (env, body) = &all[0];
    assert_eq!(env.id, id);
    assert_eq!(env.sender, "sender@origin.test");
    assert_eq!(recipients(env), ["user@example.com"]);
    assert_eq!(env.ret, Ret::Headers);
    assert_eq!(env.envid.as_deref(), Some("abc"));
    assert!(env.has_8bit);
    assert_eq!(env.client.ip.to_string(), "127.0.0.1");
    assert_eq!(env.client.helo, "client.test");
    let rcpt = &env.recipients[0];
    assert_eq!(rcpt.notify, Notify(Notify::SUCCESS | Notify::FAILURE));
    let orcpt = rcpt.orcpt.as_deref().expect("ORCPT stored");
    assert!(orcpt.ends_with("x@example.com"), "ORCPT: {orcpt}");
    assert_eq!(rcpt.status, RcptStatus::Queued);

    let (received, rest) = split_received(body);
    assert_eq!(rest, content, "data stored byte for byte after Received:");
    assert!(received.contains("[127.0.0.1]"), "{received}");
    assert!(received.contains("by mx2.test"), "{received}");
    assert!(
        received.contains(&format!("with ESMTP id {id}")),
        "{received}"
    );
    assert!(received.contains("for <user@example.com>"), "{received}");
    assert!(received.contains("client.test"), "{received}");
    assert_eq!(env.size, body.len() as u64);
    assert_eq!(t.spool().stats().messages, 1);
    assert!(
        t.spool().due().unwrap().iter().any(|(_, due)| *due == id),
        "a new message is due for delivery"
    );
}

#[tokio::test]
async fn pipelined_commands_are_answered_in_order() {
    let t = TestServer::start(TestConfig::default()).await;
    let mut c = t.ehlo().await;

    c.send(
        "MAIL FROM:<a@origin.test>\r\nRCPT TO:<one@example.com>\r\n\
         RCPT TO:<two@example.com>\r\nDATA\r\n",
    )
    .await;
    c.expect(250).await;
    c.expect(250).await;
    c.expect(250).await;
    c.expect(354).await;
    let first: &[u8] = b"Subject: first\r\n\r\none\r\n";
    let mut rest = dot_stuff(first);
    rest.extend_from_slice(b"QUIT\r\n");
    c.send(rest).await;
    let first_id = c.reply().await.queue_id();
    c.expect(221).await;
    c.expect_closed().await;

    // A group with a refused recipient in the middle: the others still count.
    let mut c = t.ehlo().await;
    c.send(
        "MAIL FROM:<b@origin.test>\r\nRCPT TO:<three@example.com>\r\n\
         RCPT TO:<someone@evil.test>\r\nRCPT TO:<four@example.com>\r\nDATA\r\n",
    )
    .await;
    c.expect(250).await;
    c.expect(250).await;
    c.expect(550).await.assert_status(550, "5.7.1");
    c.expect(250).await;
    c.expect(354).await;
    let second: &[u8] = b"Subject: second\r\n\r\ntwo\r\n";
    c.send(dot_stuff(second)).await;
    let second_id = c.reply().await.queue_id();
    c.quit().await;

    let all = t.stored();
    assert_eq!(all.len(), 2);
    let (env, body) = &all[0];
    assert_eq!(env.id, first_id);
    assert_eq!(recipients(env), ["one@example.com", "two@example.com"]);
    let (received, rest) = split_received(body);
    assert_eq!(rest, first);
    assert!(
        !received.contains("for <"),
        "Received: names no recipient when there are several: {received}"
    );
    let (env, body) = &all[1];
    assert_eq!(env.id, second_id);
    assert_eq!(env.sender, "b@origin.test");
    assert_eq!(recipients(env), ["three@example.com", "four@example.com"]);
    assert_eq!(split_received(body).1, second);
}

#[tokio::test]
async fn relay_is_denied_for_foreign_and_disguised_recipients() {
    let t = TestServer::start(TestConfig::default()).await;
    let mut c = t.ehlo().await;
    c.cmd("MAIL FROM:<a@origin.test>").await.assert(250);
    for rcpt in [
        "<user@evil.test>",
        "<user@example.com.evil.test>",
        "<user@notexample.com>",
        "<user@sub.example.com>",
        "<user%evil.test@example.com>",
        "<evil.test!user@example.com>",
        "<\"user@evil.test\"@example.com>",
        "<\"user%evil.test\"@example.com>",
        "<@example.com:user@evil.test>",
        "<@example.com,@example.com:user@evil.test>",
        "<user@evil-wide.test>",
    ] {
        c.cmd(&format!("RCPT TO:{rcpt}"))
            .await
            .assert_status(550, "5.7.1");
    }
    let literal = c.cmd("RCPT TO:<user@[127.0.0.1]>").await;
    assert!(
        (500..600).contains(&literal.code),
        "address literal must be refused: {literal}"
    );
    let data = c.cmd("DATA").await;
    assert!(
        data.code == 554 || data.code == 503,
        "DATA with only refused recipients: {data}"
    );
    c.cmd("RSET").await.assert(250);

    // A source route is judged by its final address; subdomains only where allowed.
    c.cmd("MAIL FROM:<a@origin.test>").await.assert(250);
    c.cmd("RCPT TO:<@evil.test:user@example.com>")
        .await
        .assert_status(250, "2.1.5");
    c.cmd("RCPT TO:<user@deep.sub.wide.test>")
        .await
        .assert_status(250, "2.1.5");
    c.cmd("DATA").await.assert(354);
    c.send(dot_stuff(b"Subject: x\r\n\r\nx\r\n")).await;
    let id = c.reply().await.queue_id();
    c.quit().await;

    let all = t.stored();
    assert_eq!(all.len(), 1, "nothing stored for refused recipients");
    assert_eq!(all[0].0.id, id);
    assert_eq!(
        recipients(&all[0].0),
        ["user@example.com", "user@deep.sub.wide.test"]
    );
}

#[tokio::test]
async fn bare_postmaster_is_accepted_and_empty_recipient_refused() {
    let t = TestServer::start(TestConfig::default()).await;
    let mut c = t.ehlo().await;
    c.cmd("MAIL FROM:<>").await.assert(250);
    c.cmd("RCPT TO:<>").await.assert(501);
    c.cmd("RCPT TO:<postmaster>")
        .await
        .assert_status(250, "2.1.5");
    c.cmd("DATA").await.assert(354);
    c.send(dot_stuff(b"Subject: to the postmaster\r\n\r\nhi\r\n"))
        .await;
    let id = c.reply().await.queue_id();
    c.quit().await;

    let all = t.stored();
    assert_eq!(all.len(), 1);
    let env = &all[0].0;
    assert_eq!(env.id, id);
    assert_eq!(env.sender, "", "the null sender is kept as empty");
    assert_eq!(recipients(env), [POSTMASTER]);
}

#[tokio::test]
async fn recipient_lists_refuse_unknown_users_and_reload_from_file() {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("filed.txt");
    std::fs::write(&list, "alice\n").unwrap();
    let config = TestConfig::default().append(
        r#"
[[domain]]
name = "filed.test"
route = "{route}"
recipients_file = "{dir}/filed.txt"
"#,
    );
    let mut t = TestServer::start_in(dir, config).await;

    let mut c = t.ehlo().await;
    c.cmd("MAIL FROM:<a@origin.test>").await.assert(250);
    c.cmd("RCPT TO:<carol@listed.test>")
        .await
        .assert_status(550, "5.1.1");
    c.cmd("RCPT TO:<alice@listed.test>").await.assert(250);
    c.cmd("RCPT TO:<bob@listed.test>").await.assert(250);
    c.cmd("RCPT TO:<alice@filed.test>").await.assert(250);
    c.cmd("RCPT TO:<dave@filed.test>")
        .await
        .assert_status(550, "5.1.1");
    c.cmd("DATA").await.assert(354);
    c.send(dot_stuff(b"Subject: x\r\n\r\nx\r\n")).await;
    c.reply().await.queue_id();
    c.quit().await;
    let all = t.stored();
    assert_eq!(all.len(), 1);
    assert_eq!(
        recipients(&all[0].0),
        ["alice@listed.test", "bob@listed.test", "alice@filed.test"]
    );

    std::fs::write(&list, "alice\ndave\n").unwrap();
    t.server.reload().expect("reload");
    let mut c = t.ehlo().await;
    c.cmd("MAIL FROM:<a@origin.test>").await.assert(250);
    c.cmd("RCPT TO:<dave@filed.test>").await.assert(250);
    c.cmd("RCPT TO:<erin@filed.test>")
        .await
        .assert_status(550, "5.1.1");
    c.quit().await;

    // A reload that fails keeps the running lists.
    std::fs::remove_file(&list).unwrap();
    assert!(
        t.server.reload().is_err(),
        "a missing recipients_file is an error"
    );
    let mut c = t.ehlo().await;
    c.cmd("MAIL FROM:<a@origin.test>").await.assert(250);
    c.cmd("RCPT TO:<dave@filed.test>").await.assert(250);
    c.cmd("RCPT TO:<erin@filed.test>")
        .await
        .assert_status(550, "5.1.1");
    c.quit().await;
}

#[tokio::test]
async fn size_limits_are_enforced_and_the_session_survives() {
    let t = TestServer::start(TestConfig::default()).await;
    let mut c = t.ehlo().await;
    c.cmd("MAIL FROM:<a@b.test> SIZE=20000")
        .await
        .assert_status(552, "5.3.4");
    // Nothing was started: a new MAIL is not "nested".
    c.cmd("MAIL FROM:<a@b.test> SIZE=10000").await.assert(250);
    c.cmd("RSET").await.assert(250);

    // 10001 bytes of content: over the limit, read to its end and refused.
    let big = content_of_len(10001);
    let reply = c.send_mail("a@b.test", &["user@example.com"], &big).await;
    reply.assert_status(552, "5.3.4");
    assert!(t.stored().is_empty(), "an oversized message is not stored");

    // Exactly the limit is fine, and the same session goes on working.
    let exact = content_of_len(10000);
    let id = c
        .send_mail("a@b.test", &["user@example.com"], &exact)
        .await
        .queue_id();
    let small: &[u8] = b"Subject: small\r\n\r\nsmall\r\n";
    let id2 = c
        .send_mail("a@b.test", &["user@example.com"], small)
        .await
        .queue_id();
    c.quit().await;

    let all = t.stored();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].0.id, id);
    assert_eq!(split_received(&all[0].1).1, exact.as_slice());
    assert_eq!(all[1].0.id, id2);
    assert_eq!(split_received(&all[1].1).1, small);
}

/// Lines of `x` ending in CRLF, `len` bytes in all.
fn content_of_len(len: usize) -> Vec<u8> {
    let mut content = Vec::with_capacity(len);
    while content.len() < len {
        let remaining = len - content.len();
        // Never leave a remainder too short for a line of its own.
        let line = if remaining > 100 && remaining < 103 {
            50
        } else {
            remaining.min(100)
        };
        assert!(line >= 3, "every line has at least one x");
        content.resize(content.len() + line - 2, b'x');
        content.extend_from_slice(b"\r\n");
    }
    assert_eq!(content.len(), len);
    content
}

#[tokio::test]
async fn full_spool_tempfails_and_stores_nothing() {
    // Bodies are counted as the file stores them, in pieces of 1,300 bytes
    // taking 1,366 each: 5,500 holds a first message of three pieces and a
    // one-piece message, not a two-piece one.
    let t = TestServer::start(TestConfig::default().set("spool", "max_size", "5500")).await;
    let mut c = t.ehlo().await;
    let first = content_of_len(2700);
    let id = c
        .send_mail("a@origin.test", &["user@example.com"], &first)
        .await
        .queue_id();
    c.cmd("MAIL FROM:<a@origin.test> SIZE=1500")
        .await
        .assert_status(452, "4.3.1");
    // Without SIZE the space is only known at the end of data.
    c.send_mail(
        "a@origin.test",
        &["user@example.com"],
        &content_of_len(1500),
    )
    .await
    .assert_status(452, "4.3.1");
    let all = t.stored();
    assert_eq!(all.len(), 1, "nothing of a refused message is kept");
    assert_eq!(all[0].0.id, id);
    // What still fits is still taken.
    c.send_mail(
        "a@origin.test",
        &["user@example.com"],
        b"Subject: tiny\r\n\r\nx\r\n",
    )
    .await
    .queue_id();
    c.quit().await;
    assert_eq!(t.stored().len(), 2);
}

#[tokio::test]
async fn too_many_recipients_are_deferred() {
    let t = TestServer::start(TestConfig::default()).await;
    let mut c = t.ehlo().await;
    c.cmd("MAIL FROM:<a@origin.test>").await.assert(250);
    for i in 1..=5 {
        c.cmd(&format!("RCPT TO:<r{i}@example.com>"))
            .await
            .assert(250);
    }
    c.cmd("RCPT TO:<r6@example.com>")
        .await
        .assert_status(452, "4.5.3");
    c.cmd("DATA").await.assert(354);
    c.send(dot_stuff(b"Subject: many\r\n\r\nmany\r\n")).await;
    let id = c.reply().await.queue_id();
    c.quit().await;

    let all = t.stored();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].0.id, id);
    assert_eq!(
        recipients(&all[0].0),
        [
            "r1@example.com",
            "r2@example.com",
            "r3@example.com",
            "r4@example.com",
            "r5@example.com"
        ]
    );
}

#[tokio::test]
async fn overlong_command_line_is_refused_and_the_session_continues() {
    let t = TestServer::start(TestConfig::default()).await;
    let mut c = t.ehlo().await;
    let long = format!("NOOP {}", "a".repeat(3000));
    c.cmd(&long).await.assert_status(500, "5.5.2");
    c.cmd("NOOP").await.assert(250);
    // The tail of the long line was not taken for a command either.
    let long_mail = format!("MAIL FROM:<{}@origin.test>", "a".repeat(3000));
    c.cmd(&long_mail).await.assert_status(500, "5.5.2");
    c.cmd("MAIL FROM:<a@origin.test>").await.assert(250);
    c.quit().await;
}

#[tokio::test]
async fn idle_clients_are_timed_out() {
    let t = TestServer::start(
        TestConfig::default()
            .server("command_timeout", r#""1s""#)
            .server("data_timeout", r#""1s""#),
    )
    .await;

    let started = Instant::now();
    let mut c = t.connect().await;
    let reply = c
        .try_reply(Duration::from_secs(5))
        .await
        .expect("a reply before closing");
    reply.assert_status(421, "4.4.2");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "timed out after {waited:?}"
    );
    c.expect_closed().await;

    // Stalling in the middle of DATA: same answer, and nothing is stored.
    let mut c = t.ehlo().await;
    c.cmd("MAIL FROM:<a@origin.test>").await.assert(250);
    c.cmd("RCPT TO:<user@example.com>").await.assert(250);
    c.cmd("DATA").await.assert(354);
    c.send("Subject: stalled\r\n\r\nhalf a mess").await;
    c.expect(421).await.assert_status(421, "4.4.2");
    c.expect_closed().await;
    assert!(t.stored().is_empty());
}

#[tokio::test]
async fn smuggled_end_of_data_stays_content() {
    let t = TestServer::start(TestConfig::default()).await;
    let smuggled: &[u8] =
        b"MAIL FROM:<evil@evil.test>\r\nRCPT TO:<x@example.com>\r\nDATA\r\nsmuggled";
    // Bare LF (the published attacks) and bare CR variants.
    let fake_ends = [
        &b"\n.\n"[..],
        b"\r\n.\n",
        b"\n.\r\n",
        b"\r.\r\n",
        b"\r\n.\r",
    ];
    for (attempt, fake_end) in fake_ends.into_iter().enumerate() {
        let what = String::from_utf8_lossy(fake_end).into_owned();
        let mut c = t.ehlo().await;
        c.cmd("MAIL FROM:<honest@origin.test>").await.assert(250);
        c.cmd("RCPT TO:<victim@example.com>").await.assert(250);
        c.cmd("DATA").await.assert(354);
        let mut data = b"Subject: s\r\n\r\nbefore".to_vec();
        data.extend_from_slice(fake_end);
        data.extend_from_slice(smuggled);
        data.extend_from_slice(b"\r\n.\r\n");
        c.send(&data).await;
        let id = c.reply().await.queue_id();
        // Nothing else was answered: the next reply is QUIT's.
        c.quit().await;

        let all = t.stored();
        assert_eq!(all.len(), attempt + 1, "{what:?}: exactly one more message");
        assert!(
            all.iter()
                .all(|(env, _)| env.sender == "honest@origin.test"),
            "{what:?}: a smuggled message was stored"
        );
        let (env, body) = all
            .iter()
            .find(|(env, _)| env.id == id)
            .expect("acknowledged message");
        assert_eq!(recipients(env), ["victim@example.com"], "{what:?}");
        let (_, content) = split_received(body);
        assert!(
            only_crlf(body),
            "{what:?}: only CRLF line endings: {body:?}"
        );
        assert!(
            content.starts_with(b"Subject: s\r\n\r\nbefore\r\n"),
            "{what:?}: {:?}",
            String::from_utf8_lossy(content)
        );
        assert!(
            content.ends_with(
                b"\r\nMAIL FROM:<evil@evil.test>\r\nRCPT TO:<x@example.com>\r\nDATA\r\nsmuggled\r\n"
            ),
            "{what:?}: the smuggled commands are content: {:?}",
            String::from_utf8_lossy(content)
        );
    }
}

#[tokio::test]
async fn helo_and_smtputf8_are_recorded() {
    let t = TestServer::start(TestConfig::default()).await;
    // Plain SMTP: no ESMTP parameters, "with SMTP" in the trace field.
    let mut c = t.connect().await;
    c.cmd("HELO old.client.test").await.assert(250);
    c.cmd("MAIL FROM:<a@origin.test> BODY=8BITMIME")
        .await
        .assert(555);
    let plain = c
        .send_mail(
            "a@origin.test",
            &["user@example.com"],
            b"Subject: plain\r\n\r\nx\r\n",
        )
        .await
        .queue_id();
    c.quit().await;

    // Unicode addresses need SMTPUTF8.
    let mut c = t.ehlo().await;
    c.cmd("MAIL FROM:<j\u{f6}rg@origin.test>")
        .await
        .assert_status(553, "5.6.7");
    c.cmd("MAIL FROM:<j\u{f6}rg@origin.test> SMTPUTF8")
        .await
        .assert(250);
    c.cmd("RCPT TO:<m\u{fc}ller@example.com>").await.assert(250);
    c.cmd("DATA").await.assert(354);
    c.send(dot_stuff(
        "Subject: gr\u{fc}\u{df}e\r\n\r\nx\r\n".as_bytes(),
    ))
    .await;
    let utf8 = c.reply().await.queue_id();
    c.quit().await;

    let all = t.stored();
    assert_eq!(all.len(), 2);
    let (env, body) = &all[0];
    assert_eq!(env.id, plain);
    let (received, _) = split_received(body);
    assert!(
        received.contains(&format!("with SMTP id {plain}")),
        "{received}"
    );
    assert!(received.contains("old.client.test"), "{received}");
    let (env, body) = &all[1];
    assert_eq!(env.id, utf8);
    assert!(env.smtputf8);
    assert_eq!(env.sender, "j\u{f6}rg@origin.test");
    assert_eq!(recipients(env), ["m\u{fc}ller@example.com"]);
    let (received, _) = split_received(body);
    assert!(
        received.contains(&format!("with UTF8SMTP id {utf8}")),
        "{received}"
    );
}

#[tokio::test]
async fn hop_count_guards_against_loops() {
    let t = TestServer::start(TestConfig::default()).await;
    let mut c = t.ehlo().await;
    let message = |hops: usize| {
        let mut m = Vec::new();
        for i in 0..hops {
            m.extend_from_slice(
                format!(
                    "Received: from hop{i}.test by hop{}.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n",
                    i + 1
                )
                .as_bytes(),
            );
        }
        m.extend_from_slice(b"Subject: loop?\r\n\r\nbody\r\n");
        m
    };
    c.send_mail("a@origin.test", &["user@example.com"], &message(10))
        .await
        .assert_status(554, "5.4.6");
    assert!(t.stored().is_empty(), "a looping message is not stored");

    let nine = message(9);
    let id = c
        .send_mail("a@origin.test", &["user@example.com"], &nine)
        .await
        .queue_id();
    // Received: lines in the body are not trace fields.
    let mut in_body = b"Subject: quoting\r\n\r\n".to_vec();
    in_body.extend_from_slice(&message(12));
    c.send_mail("a@origin.test", &["user@example.com"], &in_body)
        .await
        .queue_id();
    c.quit().await;

    let all = t.stored();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].0.id, id);
    assert_eq!(split_received(&all[0].1).1, nine.as_slice());
}

/// ETRN's replies; that an accepted ETRN really releases mail is shown in
/// `tests/delivery.rs`.
#[tokio::test]
async fn etrn_is_answered_per_client_and_domain() {
    let t = TestServer::start(TestConfig::default()).await;
    let mut c = t.ehlo().await;
    c.cmd("ETRN example.com").await.assert(250);
    c.cmd("ETRN @wide.test").await.assert(250);
    c.cmd("ETRN unknown.test").await.assert(458);
    c.cmd("ETRN #queue").await.assert(458);
    c.quit().await;

    let t =
        TestServer::start(TestConfig::default().server("etrn_allow", r#"["10.0.0.0/8"]"#)).await;
    let mut c = t.ehlo().await;
    c.cmd("ETRN example.com").await.assert(459);
    c.quit().await;
}

#[tokio::test]
async fn protocol_errors() {
    let t = TestServer::start(TestConfig::default()).await;
    let mut c = t.connect().await;
    c.cmd("MAIL FROM:<a@origin.test>")
        .await
        .assert_status(503, "5.5.1");
    c.cmd("EHLO client.test").await.assert(250);
    c.cmd("DATA").await.assert(503);
    c.cmd("MAIL FROM:<a@origin.test>").await.assert(250);
    let data = c.cmd("DATA").await;
    assert!(
        data.code == 554 || data.code == 503,
        "DATA without RCPT: {data}"
    );
    c.cmd("FROBNICATE now").await.assert_status(500, "5.5.2");
    c.quit().await;

    // A client that only makes mistakes is sent away.
    let mut c = t.ehlo().await;
    let mut errors = 0;
    loop {
        let reply = c.cmd("FROBNICATE").await;
        if reply.code == 421 {
            break;
        }
        reply.assert_status(500, "5.5.2");
        errors += 1;
        assert!(errors < 100, "still talking after {errors} errors");
    }
    c.expect_closed().await;
}

#[tokio::test]
async fn connections_per_address_are_limited() {
    let t = TestServer::start(TestConfig::default().server("max_connections_per_ip", "2")).await;
    let first = t.connect().await;
    let _second = t.connect().await;
    let mut third = Client::connect(t.addr).await;
    third.expect(421).await.assert_status(421, "4.7.0");
    third.expect_closed().await;

    // A slot comes back when a session ends.
    first.quit().await;
    common::eventually(Duration::from_secs(3), async || {
        let mut again = Client::connect(t.addr).await;
        let reply = again.reply().await;
        if reply.code == 220 {
            return Ok(());
        }
        reply.assert_status(421, "4.7.0");
        Err("the slot was never given back".to_owned())
    })
    .await;
}

#[tokio::test]
async fn connection_rate_per_address_is_limited() {
    let t =
        TestServer::start(TestConfig::default().server("max_connection_rate_per_ip", "3")).await;
    // Sessions that end still count: the limit is on how often, not how many.
    for _ in 0..3 {
        t.connect().await.quit().await;
    }
    let mut fourth = Client::connect(t.addr).await;
    fourth.expect(421).await.assert_status(421, "4.7.0");
    fourth.expect_closed().await;
    let metrics = t.server.metrics().render(&t.spool().gauges(), 0);
    assert!(
        metrics.contains(r#"mxspool_smtp_rejected_total{reason="limits"} 1"#),
        "the refusal is counted: {metrics}"
    );
}

#[tokio::test]
async fn connections_are_limited_server_wide() {
    let t = TestServer::start(TestConfig::default().server("max_connections", "1")).await;
    let first = t.connect().await;
    let mut second = Client::connect(t.addr).await;
    second.expect(421).await.assert_status(421, "4.7.0");
    second.expect_closed().await;
    first.quit().await;
}

#[tokio::test]
async fn a_flood_beyond_max_connections_is_refused_without_a_task_each() {
    let t = TestServer::start(TestConfig::default().server("max_connections", "3")).await;
    let held = [t.ehlo().await, t.ehlo().await, t.ehlo().await];
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let before = tasks();
    // Clients that connect and never read.
    let mut flood = Vec::new();
    let mut most = before;
    for _ in 0..300 {
        flood.push(tokio::net::TcpStream::connect(t.addr).await.unwrap());
        most = most.max(tasks());
    }
    assert!(
        most <= before + 5,
        "alive tasks went from {before} to {most} during the flood"
    );
    // Each got its 421 and was closed, without anyone waiting on it.
    for stream in flood {
        let mut c = Client::from_stream(stream);
        c.expect(421).await.assert_status(421, "4.7.0");
        c.expect_closed().await;
    }
    let metrics = t.server.metrics().render(&t.spool().gauges(), 0);
    assert!(
        metrics.contains(r#"mxspool_smtp_rejected_total{reason="limits"} 300"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("mxspool_smtp_sessions_active 3"),
        "{metrics}"
    );
    for c in held {
        c.quit().await;
    }
}

#[tokio::test]
async fn denied_addresses_are_refused_at_connect() {
    let t = TestServer::start(TestConfig::default().server("deny", r#"["127.0.0.0/8"]"#)).await;
    let mut c = Client::connect(t.addr).await;
    c.expect(554).await.assert_status(554, "5.7.1");
    c.expect_closed().await;
}

#[tokio::test]
async fn shutdown_says_goodbye_and_keeps_what_was_acknowledged() {
    let t = TestServer::start(TestConfig::default()).await;
    let content: &[u8] = b"Subject: before shutdown\r\n\r\nkept\r\n";
    let mut sender = t.ehlo().await;
    let id = sender
        .send_mail("a@origin.test", &["user@example.com"], content)
        .await
        .queue_id();
    let mut idle = t.ehlo().await;
    let mut midway = t.ehlo().await;
    midway.cmd("MAIL FROM:<b@origin.test>").await.assert(250);
    midway.cmd("RCPT TO:<user@example.com>").await.assert(250);
    midway.cmd("DATA").await.assert(354);
    midway.send("Subject: unfinished\r\n\r\nhalf").await;
    // Let the server read what was sent before it is told to stop.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let TestServer {
        server,
        dir,
        spool_path,
        addr,
        ..
    } = t;
    let stopping = tokio::spawn(server.shutdown(Duration::from_secs(5)));
    for client in [&mut idle, &mut sender, &mut midway] {
        client.expect(421).await.assert_status(421, "4.3.2");
        client.expect_closed().await;
    }
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown finishes")
        .unwrap();
    match tokio::net::TcpStream::connect(addr).await {
        Err(_) => {}
        Ok(stream) => {
            let mut c = Client::from_stream(stream);
            assert_eq!(
                c.try_reply(Duration::from_secs(2)).await,
                Err(ReadError::Closed),
                "no greeting after shutdown"
            );
        }
    }

    let spool = tokio::task::spawn_blocking(move || Spool::open(&spool_path, 1 << 30))
        .await
        .unwrap()
        .expect("the spool reopens after shutdown");
    let all = stored(&spool);
    assert_eq!(all.len(), 1, "only the acknowledged message is kept");
    assert_eq!(all[0].0.id, id);
    assert_eq!(split_received(&all[0].1).1, content);
    spool.close();
    drop(dir);
}
