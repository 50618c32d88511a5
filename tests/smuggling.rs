//! SMTP smuggling in both directions, end to end on loopback.
//!
//! Inbound: only CRLF "." CRLF ends DATA (DESIGN.md: bare LF/CR never ends data
//! and is normalised or refused; mxspool normalises). Fake ends from the
//! smuggling research, followed by a whole smuggled transaction, must leave
//! exactly one stored message per transaction, with the smuggled commands as
//! content, the intended envelope only, and CRLF-only line endings.
//!
//! Outbound: what mxspool forwards is CRLF-clean and dot-stuffed, so the
//! primary sees the message end exactly where it ends, and un-stuffed it is
//! byte for byte what was stored (our `Received:` plus the normalised content).
//! `tests/smtp.rs` (`smuggled_end_of_data_stays_content`) covers the basic
//! inbound case; this goes further.

mod common;
mod primary;

use std::time::Duration;

use common::{
    Client, FAKE_ENDS_OF_DATA, ReadError, TestConfig, TestServer, dot_stuff, only_crlf,
    reference_data, split_received,
};
use mxspool::spool::QueueId;
use primary::{Mode, Primary};
use tokio::net::TcpStream;

/// A whole transaction hidden in the data after a fake end.
const SMUGGLED: &[u8] = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n\
Subject: smuggled\r\n\r\nsmuggled body";

/// What the smuggled commands look like once they are (harmless) content.
const SMUGGLED_AS_CONTENT: &[u8] =
    b"\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n";

/// Fake ends right after the 354, where the DATA command's own CRLF is the
/// line start.
const START_VARIANTS: &[&[u8]] = &[b".\n", b".\r", b".\x00\r\n", b" .\r\n", b"\n.\n"];

/// Checks that a stored `body` is our `Received:` field for `id` followed by
/// exactly `want`. (Content that begins with a blank would read as a
/// continuation of the field, so the field is judged on what precedes `want`.)
fn assert_received_then(body: &[u8], id: QueueId, want: &[u8], what: &str) {
    assert!(
        body.ends_with(want),
        "{what}: stored content differs from the normalised data:\n{:?}\nwant the end to be\n{:?}",
        show(body),
        show(want)
    );
    let prefix = &body[..body.len() - want.len()];
    let (received, rest) = split_received(prefix);
    assert!(
        rest.is_empty(),
        "{what}: more than Received: before the content: {:?}",
        show(prefix)
    );
    assert!(
        received.contains(&format!(" id {id}")),
        "{what}: {received}"
    );
}

/// The bytes a client sends after 354 with `variant` hidden in them; the only
/// real terminator is the last five bytes.
fn attack(subject: &str, variant: &[u8]) -> Vec<u8> {
    let mut raw = format!("Subject: {subject}\r\n\r\nbefore").into_bytes();
    raw.extend_from_slice(variant);
    raw.extend_from_slice(SMUGGLED);
    raw.extend_from_slice(b"\r\n.\r\n");
    raw
}

fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Nothing more arrives from the server: no reply to anything smuggled.
async fn assert_silent(c: &mut Client, what: &str) {
    match c.try_reply(Duration::from_millis(150)).await {
        Err(ReadError::Timeout) => {}
        other => panic!("{what}: the server said more: {other:?}"),
    }
}

/// MAIL, RCPT and DATA for `to`, then `raw` as it is; returns the final reply.
async fn transaction(c: &mut Client, to: &str, raw: &[u8]) -> common::Reply {
    c.cmd("MAIL FROM:<honest@origin.test>").await.assert(250);
    c.cmd(&format!("RCPT TO:<{to}>")).await.assert(250);
    c.cmd("DATA").await.assert(354);
    c.send(raw).await;
    c.reply().await
}

/// What the spool holds now: exactly `sent` messages, one per (queue ID,
/// intended recipient, bytes sent after 354), with nothing of the smuggled
/// envelope; each body our `Received:` and then the reference content.
fn check_stored(t: &TestServer, sent: &[(QueueId, String, Vec<u8>)]) {
    let stored = t.stored();
    assert_eq!(
        stored.len(),
        sent.len(),
        "one message per transaction: {:?}",
        stored
            .iter()
            .map(|(e, _)| (&e.sender, &e.recipients))
            .collect::<Vec<_>>()
    );
    for (env, _) in &stored {
        assert_eq!(env.sender, "honest@origin.test", "a smuggled sender");
        assert!(
            env.recipients
                .iter()
                .all(|r| r.address.starts_with("intended")),
            "a smuggled recipient: {:?}",
            env.recipients
        );
    }
    for (id, to, raw) in sent {
        let (env, body) = stored
            .iter()
            .find(|(e, _)| e.id == *id)
            .unwrap_or_else(|| panic!("{to}: acknowledged {id} is not stored"));
        let addresses: Vec<&str> = env.recipients.iter().map(|r| r.address.as_str()).collect();
        assert_eq!(addresses, [to.as_str()], "{to}: the envelope");
        assert!(only_crlf(body), "{to}: a bare CR or LF stored: {body:?}");
        let (used, want) = reference_data(raw).expect("the test sends a real end");
        assert_eq!(used, raw.len(), "{to}: the test's data has an early end");
        assert_received_then(body, *id, &want, to);
    }
}

#[tokio::test]
async fn fake_ends_of_data_never_end_it() {
    let t = TestServer::start(TestConfig::default()).await;
    let mut c = t.ehlo().await;
    let mut sent = Vec::new();
    // Each fake end mid-message, then each right after the 354: every one in
    // its own transaction on the same connection, so a smuggled command that
    // ran would put an extra reply in the stream.
    let starts = START_VARIANTS.iter().map(|v| {
        let mut raw = v.to_vec();
        raw.extend_from_slice(SMUGGLED);
        raw.extend_from_slice(b"\r\n.\r\n");
        (*v, raw)
    });
    let cases: Vec<(&[u8], Vec<u8>)> = FAKE_ENDS_OF_DATA
        .iter()
        .enumerate()
        .map(|(i, v)| (*v, attack(&format!("variant {i}"), v)))
        .chain(starts)
        .collect();
    for (i, (variant, raw)) in cases.iter().enumerate() {
        let what = format!("{:?}", show(variant));
        let to = format!("intended{i}@example.com");
        let reply = transaction(&mut c, &to, raw).await;
        let id = reply.queue_id();
        assert_silent(&mut c, &what).await;
        sent.push((id, to, raw.clone()));
        let stored = t.stored();
        let (_, body) = stored.iter().find(|(e, _)| e.id == id).expect("stored");
        assert!(
            contains(body, SMUGGLED_AS_CONTENT),
            "{what}: the smuggled commands are not content: {:?}",
            show(body)
        );
    }
    // All of them in one message: still one message.
    let mut raw = b"Subject: all at once\r\n\r\n".to_vec();
    for variant in FAKE_ENDS_OF_DATA {
        raw.extend_from_slice(b"x");
        raw.extend_from_slice(variant);
        raw.extend_from_slice(SMUGGLED);
    }
    raw.extend_from_slice(b"\r\n.\r\n");
    let to = "intended-all@example.com".to_string();
    let id = transaction(&mut c, &to, &raw).await.queue_id();
    assert_silent(&mut c, "all variants").await;
    sent.push((id, to, raw));
    c.quit().await;
    check_stored(&t, &sent);
}

#[tokio::test]
async fn fake_ends_split_across_reads_and_commands_pipelined_after_the_real_end() {
    let t = TestServer::start(TestConfig::default()).await;
    let stream = TcpStream::connect(t.addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut c = Client::from_stream(stream);
    c.expect(220).await;
    c.cmd("EHLO client.test").await.assert(250);
    let mut sent = Vec::new();
    for (i, variant) in FAKE_ENDS_OF_DATA.iter().enumerate() {
        let to = format!("intended{i}@example.com");
        let raw = attack(&format!("split {i}"), variant);
        c.cmd("MAIL FROM:<honest@origin.test>").await.assert(250);
        c.cmd(&format!("RCPT TO:<{to}>")).await.assert(250);
        c.cmd("DATA").await.assert(354);
        // The fake end a byte per write, so the server's reads end inside it
        // (a CR waiting for its LF, a dot waiting for its line's end).
        let at = raw
            .windows(variant.len())
            .position(|w| w == *variant)
            .unwrap();
        c.send(&raw[..at]).await;
        for b in &raw[at..at + variant.len()] {
            tokio::time::sleep(Duration::from_millis(2)).await;
            c.send([*b]).await;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        // The rest, with a real command pipelined after the real end: it must
        // be answered, after the message, and nothing in between.
        let mut rest = raw[at + variant.len()..].to_vec();
        rest.extend_from_slice(b"RSET\r\n");
        c.send(&rest).await;
        let id = c.reply().await.queue_id();
        c.reply().await.assert_status(250, "2.0.0");
        assert_silent(&mut c, &format!("{:?}", show(variant))).await;
        sent.push((id, to, raw));
    }
    c.quit().await;
    check_stored(&t, &sent);
}

// ---------------------------------------------------------------------------
// Outbound

/// One message to forward: the recipient names it, `raw` is what the client
/// sends after 354 (dot-stuffed or not, bare line endings and all).
struct Case {
    name: String,
    raw: Vec<u8>,
}

impl Case {
    /// A message whose stored content is `content` (CRLF), properly stuffed.
    fn stuffed(name: &str, content: &[u8]) -> Case {
        Case {
            name: name.into(),
            raw: dot_stuff(content),
        }
    }

    fn raw(name: &str, raw: &[u8]) -> Case {
        Case {
            name: name.into(),
            raw: raw.to_vec(),
        }
    }
}

/// Lines of ".": one starts every three bytes, so over three messages whose
/// content is shifted by 0, 1 and 2 bytes, the 64 KiB block in which mxspool
/// sends a body ends before a dot, between the dot and its CR, and between
/// the CR and the LF, wherever the `Received:` field puts the region.
fn block_boundary(shift: usize) -> Vec<u8> {
    let mut content = format!("Subject: boundary {shift}\r\n\r\n").into_bytes();
    content.extend(std::iter::repeat_n(b'x', shift));
    content.extend_from_slice(b"\r\n");
    // A fixed count, so the shift alone moves the region.
    for _ in 0..2_140 {
        content.extend_from_slice(b"filler line of some length\r\n");
    }
    for _ in 0..3_000 {
        content.extend_from_slice(b".\r\n");
    }
    content.extend_from_slice(b"end\r\n");
    content
}

fn outbound_cases() -> Vec<Case> {
    let mut cases = vec![
        Case::stuffed(
            "dots",
            b"Subject: dots\r\n\r\n.leading\r\n.\r\n..\r\n...\r\n. \r\n.   \r\n.\t\r\n\
              middle.\r\nend.\r\n\r\n.\r\n",
        ),
        // A client that does not stuff: the receiver's rule removes the dot.
        Case::raw(
            "unstuffed",
            b"Subject: unstuffed\r\n\r\n.leading\r\n..\r\n. x\r\n.\r\n",
        ),
        Case::raw(
            "bare-endings",
            b"Subject: bare\r\n\r\nlf\nline\ncr\rline\rmixed\n\r\r\n\nlast bare lf\n\r\n.\r\n",
        ),
        Case::raw("ends-in-bare-cr", b"Subject: cr\r\n\r\nlast\r\r\n.\r\n"),
        Case::raw("ends-in-bare-lf", b"Subject: lf\r\n\r\nlast\n\r\n.\r\n"),
        Case::raw("empty", b".\r\n"),
        Case::raw(
            "nul-and-8bit",
            b"Subject: bytes\r\n\r\nnul\x00byte\r\ncaf\xc3\xa9\r\n.\x00\r\n\r\n.\r\n",
        ),
    ];
    // Every smuggling variant, which inbound turns into CRLF content: several
    // become a lone "." line that outbound must stuff.
    let mut smuggled = b"Subject: smuggled\r\n\r\n".to_vec();
    for variant in FAKE_ENDS_OF_DATA {
        smuggled.extend_from_slice(b"x");
        smuggled.extend_from_slice(variant);
        smuggled.extend_from_slice(SMUGGLED);
    }
    smuggled.extend_from_slice(b"\r\n.\r\n");
    cases.push(Case::raw("smuggled", &smuggled));
    // Very long lines, one of them all dots.
    let mut long = b"Subject: long\r\n\r\n".to_vec();
    long.extend(std::iter::repeat_n(b'a', 100_000));
    long.extend_from_slice(b"\r\n.");
    long.extend(std::iter::repeat_n(b'b', 70_000));
    long.extend_from_slice(b"\r\n");
    long.extend(std::iter::repeat_n(b'.', 70_000));
    long.extend_from_slice(b"\r\nend\r\n");
    cases.push(Case::stuffed("long-lines", &long));
    for shift in 0..3 {
        cases.push(Case::stuffed(
            &format!("boundary{shift}"),
            &block_boundary(shift),
        ));
    }
    cases
}

/// Whether the 64 KiB block boundaries of a stored body fall inside the
/// region of "." lines, and at which phase of a ".\r\n" line.
fn boundary_phase(body: &[u8]) -> Option<usize> {
    let pattern = b"\r\n.\r\n.\r\n";
    let region = body.windows(pattern.len()).position(|w| w == pattern)? + 2;
    let offset = 64 * 1024;
    (offset > region && offset < region + 3 * 2_900).then(|| (offset - region) % 3)
}

#[tokio::test]
async fn what_is_forwarded_is_crlf_clean_and_dot_stuffed() {
    let primary = Primary::start().await;
    primary.set_mode(Mode::Down);
    let config = TestConfig::default()
        .server("max_message_size", "2000000")
        .set("delivery", "probe_interval", r#""200ms""#)
        .set("delivery", "retry_initial", r#""1h""#)
        .set("delivery", "retry_max", r#""2h""#)
        .domains(&format!(
            "[[domain]]\nname = \"example.com\"\nroute = \"[127.0.0.1]:{}\"\n",
            primary.addr.port()
        ));
    let t = TestServer::start(config).await;
    let cases = outbound_cases();
    let mut c = t.ehlo().await;
    let mut ids = Vec::new();
    for case in &cases {
        let to = format!("intended-{}@example.com", case.name);
        ids.push(transaction(&mut c, &to, &case.raw).await.queue_id());
    }
    // A bare CR inside the paths: mxspool takes the path without it, and
    // what it sends on is a clean command line either way.
    c.cmd("MAIL FROM:<\"hon\rest\"@origin.test>")
        .await
        .assert(250);
    c.cmd("RCPT TO:<intended-envel\rope@example.com>")
        .await
        .assert(250);
    c.cmd("DATA").await.assert(354);
    c.send(b"Subject: envelope\r\n\r\nx\r\n.\r\n").await;
    let envelope_id = c.reply().await.queue_id();
    c.quit().await;

    // What is stored, before anything leaves.
    let stored = t.stored();
    assert_eq!(stored.len(), cases.len() + 1);
    for (case, id) in cases.iter().zip(&ids) {
        let (_, body) = stored.iter().find(|(e, _)| e.id == *id).expect("stored");
        assert!(
            only_crlf(body),
            "{}: stored with a bare CR or LF",
            case.name
        );
        let (used, want) = reference_data(&case.raw).expect("a real end");
        assert_eq!(
            used,
            case.raw.len(),
            "{}: the test's data has an early end",
            case.name
        );
        assert_received_then(body, *id, &want, &case.name);
    }
    let phases: Vec<usize> = cases
        .iter()
        .zip(&ids)
        .filter(|(case, _)| case.name.starts_with("boundary"))
        .filter_map(|(_, id)| {
            let (_, body) = stored.iter().find(|(e, _)| e.id == *id)?;
            boundary_phase(body)
        })
        .collect();
    let mut seen = phases.clone();
    seen.sort_unstable();
    assert_eq!(
        seen,
        [0, 1, 2],
        "the block boundary does not hit every phase of a dot line: {phases:?}"
    );

    primary.set_mode(Mode::Up);
    let want = cases.len() + 1;
    assert!(
        primary
            .wait_for_messages(want, Duration::from_secs(15))
            .await,
        "forwarded {} of {want}",
        primary.messages().len()
    );
    let messages = primary.messages();
    assert_eq!(messages.len(), want, "one delivery per message");
    for (env, stored_body) in &stored {
        let name = env.recipients[0].address.clone();
        let got = messages
            .iter()
            .find(|m| {
                m.body.starts_with(b"Received:")
                    && contains(&m.body, format!(" id {}", env.id).as_bytes())
            })
            .unwrap_or_else(|| panic!("{name}: not forwarded"));
        // The data section on the wire, terminator included.
        let mut wire = got.data.clone();
        wire.extend_from_slice(b".\r\n");
        assert!(only_crlf(&wire), "{name}: a bare CR or LF on the wire");
        let lines: Vec<&[u8]> = wire.split_inclusive(|&b| b == b'\n').collect();
        let (last, data_lines) = lines.split_last().expect("lines");
        assert_eq!(*last, b".\r\n", "{name}: the terminator");
        for (i, line) in data_lines.iter().enumerate() {
            assert!(
                !line.starts_with(b".") || line.starts_with(b".."),
                "{name}: line {i} starts with an unstuffed dot: {:?}",
                show(&line[..line.len().min(40)])
            );
        }
        assert_eq!(
            wire.windows(5).position(|w| w == b"\r\n.\r\n"),
            Some(wire.len() - 5),
            "{name}: CRLF.CRLF before the end"
        );
        // No line over RFC 5321's 1,000 octets on the wire: longer ones
        // were broken with CRLF and a space (delivery.line_length_limit),
        // the only difference from what was stored.
        assert!(
            data_lines.iter().all(|l| l.len() <= 1000),
            "{name}: a line over 1,000 octets on the wire"
        );
        let unbroken = |body: &[u8]| -> Vec<u8> {
            let mut out = Vec::with_capacity(body.len());
            let mut i = 0;
            while i < body.len() {
                if body[i..].starts_with(b"\r\n ") {
                    i += 3;
                } else {
                    out.push(body[i]);
                    i += 1;
                }
            }
            out
        };
        assert_eq!(
            got.body == *stored_body,
            !name.contains("long-lines"),
            "{name}: only long lines are changed"
        );
        assert!(
            unbroken(&got.body) == unbroken(stored_body),
            "{name}: the primary got {} bytes that differ from the {} stored",
            got.body.len(),
            stored_body.len()
        );
        assert_eq!(got.rcpt_lines.len(), 1, "{name}: {:?}", got.rcpt_lines);
        assert!(
            got.rcpt_lines[0].starts_with(&format!("RCPT TO:<{name}>")),
            "{name}: {:?}",
            got.rcpt_lines
        );
    }
    let envelope = stored.iter().find(|(e, _)| e.id == envelope_id).unwrap();
    assert_eq!(envelope.0.sender, "honest@origin.test");
    assert_eq!(
        envelope.0.recipients[0].address,
        "intended-envelope@example.com"
    );
    // Every command the primary saw is one of a client's, on a line of its
    // own: nothing from inside a message, nothing with a stray CR.
    for command in primary.commands() {
        let verb = command.split([' ', ':']).next().unwrap_or("");
        assert!(
            ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "QUIT", "NOOP"].contains(&verb),
            "the primary was sent {command:?}"
        );
        assert!(!command.contains(['\r', '\n', '\0']), "{command:?}");
        if verb == "MAIL" {
            assert!(
                command.starts_with("MAIL FROM:<honest@origin.test>"),
                "{command:?}"
            );
        }
    }
}
