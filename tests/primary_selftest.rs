//! The scripted primary itself, driven by a raw client over loopback: the
//! outbound tests trust what it records and counts, so it is checked here
//! byte by byte (BDAT framing, replies in order, latency, scripted ends of
//! data, round trips).

mod primary;

use std::time::Duration;

use primary::{Caps, DROP, Primary};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(5);

/// A client that writes exactly what it is given, when it is given it.
struct Client {
    stream: TcpStream,
    input: Vec<u8>,
}

impl Client {
    /// Connected, greeting read.
    async fn connect(primary: &Primary) -> Client {
        let stream = TcpStream::connect(primary.addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let mut client = Client {
            stream,
            input: Vec::new(),
        };
        let greeting = client.reply().await;
        assert!(greeting.starts_with("220 "), "{greeting}");
        client
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads more input; false at the end of the stream (or a reset).
    async fn fill(&mut self, timeout: Duration) -> Option<bool> {
        let mut buf = [0u8; 4096];
        match tokio::time::timeout(timeout, self.stream.read(&mut buf)).await {
            Err(_) => None,
            Ok(Ok(0) | Err(_)) => Some(false),
            Ok(Ok(n)) => {
                self.input.extend_from_slice(&buf[..n]);
                Some(true)
            }
        }
    }

    /// The next whole reply, its lines joined by "\n", without CRLF.
    async fn reply(&mut self) -> String {
        loop {
            let mut lines = Vec::new();
            let mut at = 0;
            while let Some(lf) = self.input[at..].iter().position(|&b| b == b'\n') {
                let line = String::from_utf8_lossy(&self.input[at..at + lf])
                    .trim_end_matches('\r')
                    .to_string();
                at += lf + 1;
                let last = line.as_bytes().get(3) != Some(&b'-');
                lines.push(line);
                if last {
                    self.input.drain(..at);
                    return lines.join("\n");
                }
            }
            let more = self.fill(WAIT).await;
            assert_eq!(
                more,
                Some(true),
                "no whole reply; have {:?}",
                String::from_utf8_lossy(&self.input)
            );
        }
    }

    async fn replies(&mut self, n: usize) -> Vec<String> {
        let mut replies = Vec::new();
        for _ in 0..n {
            replies.push(self.reply().await);
        }
        replies
    }

    async fn command(&mut self, line: &str) -> String {
        self.write(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// Nothing arrives for `d`.
    async fn silent_for(&mut self, d: Duration) -> bool {
        self.input.is_empty() && self.fill(d).await.is_none()
    }

    /// What arrives before the primary closes the connection.
    async fn rest_until_closed(&mut self) -> String {
        while self.fill(WAIT).await.expect("the primary closes") {}
        String::from_utf8_lossy(&std::mem::take(&mut self.input)).into_owned()
    }
}

async fn chunking_primary() -> Primary {
    let primary = Primary::start().await;
    primary.set_capabilities(Caps {
        chunking: true,
        ..Caps::default()
    });
    primary
}

/// `BDAT n [LAST]` and its octets.
fn bdat(octets: &[u8], last: bool) -> Vec<u8> {
    let mut out = format!(
        "BDAT {}{}\r\n",
        octets.len(),
        if last { " LAST" } else { "" }
    )
    .into_bytes();
    out.extend_from_slice(octets);
    out
}

fn mail_from(primary: &Primary) -> Vec<String> {
    primary
        .messages()
        .iter()
        .map(|m| m.mail_from_line.clone())
        .collect()
}

#[tokio::test]
async fn bdat_chunks_of_odd_sizes_make_one_message_byte_for_byte() {
    let primary = chunking_primary().await;
    let mut c = Client::connect(&primary).await;
    let ehlo = c.command("EHLO client.test").await;
    assert!(ehlo.lines().any(|l| l == "250-CHUNKING"), "{ehlo}");

    // Octets DATA would treat differently: a leading dot, a lone "."
    // line, bare LF, no final CRLF.
    let content: &[u8] = b"Subject: chunks\r\n\r\n.leading dot\r\n.\r\nbare\nLF, no end";
    c.write(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<b@example.com>\r\n")
        .await;
    assert_eq!(c.replies(2).await, ["250 2.1.0 Ok", "250 2.1.5 Ok"]);
    c.write(&bdat(&content[..1], false)).await;
    assert_eq!(c.reply().await, "250 2.0.0 Ok: 1 octets");
    let mut two = bdat(&content[1..3], false);
    two.extend(bdat(&content[3..20], false));
    c.write(&two).await;
    assert_eq!(
        c.replies(2).await,
        ["250 2.0.0 Ok: 2 octets", "250 2.0.0 Ok: 17 octets"]
    );

    // One chunk in two writes: no reply until its last octet.
    let split = bdat(&content[20..], false);
    let (first, second) = split.split_at(split.len() - 9);
    c.write(first).await;
    assert!(c.silent_for(Duration::from_millis(200)).await);
    c.write(second).await;
    let size = content.len() - 20;
    assert_eq!(c.reply().await, format!("250 2.0.0 Ok: {size} octets"));
    assert!(primary.messages().is_empty());

    c.write(&bdat(b"", true)).await;
    assert_eq!(c.reply().await, "250 2.0.0 Ok: queued");
    let messages = primary.messages();
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert!(m.bdat);
    assert_eq!(m.data, content);
    assert_eq!(m.body, content);
    assert_eq!(m.mail_from_line, "MAIL FROM:<a@origin.test>");
    assert_eq!(m.rcpt_lines, ["RCPT TO:<b@example.com>"]);
    assert_eq!(
        primary.commands(),
        [
            "EHLO client.test".to_string(),
            "MAIL FROM:<a@origin.test>".into(),
            "RCPT TO:<b@example.com>".into(),
            "BDAT 1".into(),
            "BDAT 2".into(),
            "BDAT 17".into(),
            format!("BDAT {size}"),
            "BDAT 0 LAST".into(),
        ]
    );
    // Greeting, EHLO, MAIL+RCPT, four writes with BDAT; the half chunk got
    // nothing.
    assert_eq!(primary.turns_per_connection(), [7]);

    // An empty message, in one chunk.
    c.write(b"MAIL FROM:<>\r\nRCPT TO:<b@example.com>\r\nBDAT 0 LAST\r\n")
        .await;
    assert_eq!(
        c.replies(3).await,
        ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.0.0 Ok: queued"]
    );
    let messages = primary.messages();
    assert_eq!(messages.len(), 2);
    assert_eq!((messages[1].bdat, messages[1].data.len()), (true, 0));
}

#[tokio::test]
async fn pipelined_bdat_transactions_in_one_write_are_two_messages_answered_in_order() {
    let primary = chunking_primary().await;
    primary.push_data_replies(&["250 2.0.0 first queued", "250 2.0.0 second queued"]);
    let mut c = Client::connect(&primary).await;
    c.command("EHLO client.test").await;
    let mut write = b"MAIL FROM:<one@origin.test>\r\nRCPT TO:<a@example.com>\r\n".to_vec();
    write.extend(bdat(b"first\r\nMAIL FROM:<evil@x>\r\n", true));
    write.extend(b"MAIL FROM:<two@origin.test>\r\nRCPT TO:<b@example.com>\r\n");
    write.extend(bdat(b"second\r\n", true));
    c.write(&write).await;
    assert_eq!(
        c.replies(6).await,
        [
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "250 2.0.0 first queued",
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "250 2.0.0 second queued",
        ]
    );
    let messages = primary.messages();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0].mail_from_line, "MAIL FROM:<one@origin.test>");
    assert_eq!(messages[0].rcpt_lines, ["RCPT TO:<a@example.com>"]);
    assert_eq!(messages[0].data, b"first\r\nMAIL FROM:<evil@x>\r\n");
    assert_eq!(messages[1].mail_from_line, "MAIL FROM:<two@origin.test>");
    assert_eq!(messages[1].rcpt_lines, ["RCPT TO:<b@example.com>"]);
    assert_eq!(messages[1].data, b"second\r\n");
    assert_eq!(
        primary.batches().last().unwrap(),
        &[
            "MAIL FROM:<one@origin.test>",
            "RCPT TO:<a@example.com>",
            "BDAT 27 LAST",
            "MAIL FROM:<two@origin.test>",
            "RCPT TO:<b@example.com>",
            "BDAT 8 LAST",
        ]
    );
    assert_eq!(primary.turns(), 3, "greeting, EHLO, one for both messages");
}

#[tokio::test]
async fn bdat_before_an_accepted_rcpt_is_refused_and_its_octets_are_skipped() {
    let primary = chunking_primary().await;
    primary.set_rcpt_reply("nobody@example.com", "550 5.1.1 no such user");
    let mut c = Client::connect(&primary).await;
    c.command("EHLO client.test").await;
    // Each chunk holds commands that must not be run.
    let mut write = bdat(b"NOOP\r\nNOOP\r\n", true);
    write.extend(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<nobody@example.com>\r\n");
    write.extend(bdat(b"RSET\r\n", false));
    write.extend(bdat(b"QUIT\r\n", true));
    write.extend(b"RSET\r\nNOOP\r\n");
    c.write(&write).await;
    assert_eq!(
        c.replies(7).await,
        [
            "503 5.5.1 Error: need MAIL command",
            "250 2.1.0 Ok",
            "550 5.1.1 no such user",
            "503 5.5.1 Error: need RCPT command",
            "503 5.5.1 Error: need RCPT command",
            "250 2.0.0 Ok",
            "250 2.0.0 Ok",
        ]
    );
    assert!(c.silent_for(Duration::from_millis(100)).await);
    assert_eq!(c.command("QUIT").await, "221 2.0.0 Bye");
    assert!(primary.messages().is_empty());
    assert_eq!(
        primary.commands(),
        [
            "EHLO client.test",
            "BDAT 12 LAST",
            "MAIL FROM:<a@origin.test>",
            "RCPT TO:<nobody@example.com>",
            "BDAT 6",
            "BDAT 6 LAST",
            "RSET",
            "NOOP",
            "QUIT",
        ]
    );
}

#[tokio::test]
async fn data_after_bdat_is_refused_and_data_works_in_the_next_transaction() {
    let primary = chunking_primary().await;
    let mut c = Client::connect(&primary).await;
    c.command("EHLO client.test").await;
    c.write(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<b@example.com>\r\n")
        .await;
    c.replies(2).await;
    c.write(&bdat(b"abc", false)).await;
    assert_eq!(c.reply().await, "250 2.0.0 Ok: 3 octets");
    assert_eq!(c.command("DATA").await, "503 5.5.1 Error: DATA after BDAT");
    c.write(&bdat(b"", true)).await;
    assert_eq!(c.reply().await, "250 2.0.0 Ok: queued");

    c.write(b"MAIL FROM:<c@origin.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        .await;
    assert_eq!(c.replies(3).await[2], "354 End data with <CR><LF>.<CR><LF>");
    c.write(b"..x\r\n.\r\n").await;
    assert_eq!(c.reply().await, "250 2.0.0 Ok: queued");

    let messages = primary.messages();
    assert_eq!(messages.len(), 2);
    assert_eq!(
        (messages[0].bdat, &messages[0].data[..]),
        (true, &b"abc"[..])
    );
    assert_eq!(
        (messages[1].bdat, &messages[1].data[..]),
        (false, &b"..x\r\n"[..])
    );
    assert_eq!(messages[1].body, b".x\r\n");
}

#[tokio::test]
async fn bdat_without_chunking_is_refused_and_the_connection_closed() {
    let primary = Primary::start().await;
    let mut c = Client::connect(&primary).await;
    let ehlo = c.command("EHLO client.test").await;
    assert!(ehlo.starts_with("250-"), "{ehlo}");
    assert!(!ehlo.contains("CHUNKING"), "{ehlo}");
    let mut write = b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<b@example.com>\r\n".to_vec();
    write.extend(bdat(b"NOOP\r\n", true));
    c.write(&write).await;
    assert_eq!(
        c.replies(3).await,
        [
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "502 5.5.2 Error: command not recognized"
        ]
    );
    assert_eq!(c.rest_until_closed().await, "");
    assert!(primary.messages().is_empty());
    assert_eq!(primary.commands().last().unwrap(), "BDAT 6 LAST");
}

#[tokio::test]
async fn replies_come_one_latency_after_their_read_in_order_and_not_serialized() {
    const LATENCY: Duration = Duration::from_millis(500);
    let primary = Primary::start().await;
    primary.set_latency(LATENCY);
    primary.set_rcpt_reply("a@example.com", "250 2.1.5 first");
    primary.set_rcpt_reply("b@example.com", "250 2.1.5 second");

    let started = Instant::now();
    let mut c = Client::connect(&primary).await;
    assert!(
        started.elapsed() >= LATENCY,
        "greeting after {:?}",
        started.elapsed()
    );

    let first = Instant::now();
    c.write(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<a@example.com>\r\n")
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = Instant::now();
    c.write(b"RCPT TO:<b@example.com>\r\n").await;
    assert_eq!(c.replies(2).await, ["250 2.1.0 Ok", "250 2.1.5 first"]);
    assert!(first.elapsed() >= LATENCY, "after {:?}", first.elapsed());
    assert_eq!(c.reply().await, "250 2.1.5 second");
    assert!(second.elapsed() >= LATENCY, "after {:?}", second.elapsed());
    // The second read's delay ran alongside the first's.
    assert!(
        first.elapsed() < 2 * LATENCY,
        "serialized: {:?}",
        first.elapsed()
    );

    primary.set_latency(Duration::ZERO);
    let noop = Instant::now();
    assert_eq!(c.command("NOOP").await, "250 2.0.0 Ok");
    assert!(noop.elapsed() < LATENCY, "after {:?}", noop.elapsed());
}

#[tokio::test]
async fn scripted_data_replies_come_in_order_and_drop_closes_mid_pipeline() {
    let primary = chunking_primary().await;
    primary.push_data_replies(&["451 4.3.0 first", "250 2.0.0 second", DROP]);
    primary.set_data_reply("250 2.0.0 fallback");
    let mut c = Client::connect(&primary).await;
    c.command("EHLO client.test").await;

    // One by DATA, then one by BDAT right after the dot.
    c.write(b"MAIL FROM:<one@origin.test>\r\nRCPT TO:<a@example.com>\r\nDATA\r\n")
        .await;
    c.replies(3).await;
    let mut write = b"one\r\n.\r\n".to_vec();
    write.extend(b"MAIL FROM:<two@origin.test>\r\nRCPT TO:<a@example.com>\r\n");
    write.extend(bdat(b"two\r\n", true));
    c.write(&write).await;
    assert_eq!(
        c.replies(4).await,
        [
            "451 4.3.0 first",
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "250 2.0.0 second"
        ]
    );

    // The third is dropped: what came before it is answered, nothing after.
    let mut write = b"MAIL FROM:<three@origin.test>\r\nRCPT TO:<a@example.com>\r\n".to_vec();
    write.extend(bdat(b"three\r\n", true));
    write.extend(b"MAIL FROM:<four@origin.test>\r\nRCPT TO:<a@example.com>\r\n");
    write.extend(bdat(b"four\r\n", true));
    c.write(&write).await;
    assert_eq!(
        c.rest_until_closed().await,
        "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
    );
    assert_eq!(mail_from(&primary), ["MAIL FROM:<two@origin.test>"]);
    assert_eq!(primary.commands().last().unwrap(), "BDAT 7 LAST");

    // The script is used up: the fallback again.
    let mut c = Client::connect(&primary).await;
    c.command("EHLO client.test").await;
    let mut write = b"MAIL FROM:<five@origin.test>\r\nRCPT TO:<a@example.com>\r\n".to_vec();
    write.extend(bdat(b"five\r\n", true));
    c.write(&write).await;
    assert_eq!(c.replies(3).await[2], "250 2.0.0 fallback");
    assert_eq!(
        mail_from(&primary),
        [
            "MAIL FROM:<two@origin.test>",
            "MAIL FROM:<five@origin.test>"
        ]
    );
}

#[tokio::test]
async fn a_421_data_reply_is_sent_then_the_connection_closed() {
    let primary = chunking_primary().await;
    primary.push_data_replies(&["421 4.3.2 going down"]);
    let mut c = Client::connect(&primary).await;
    c.command("EHLO client.test").await;
    let mut write = b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<b@example.com>\r\n".to_vec();
    write.extend(bdat(b"x\r\n", true));
    write.extend(b"NOOP\r\n");
    c.write(&write).await;
    assert_eq!(
        c.rest_until_closed().await,
        "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n421 4.3.2 going down\r\n"
    );
    assert!(primary.messages().is_empty());
}

#[tokio::test]
async fn turns_count_round_trips_per_connection() {
    let primary = Primary::start().await;

    // Pipelined across messages: the next MAIL, RCPT and DATA go with the dot.
    let mut c = Client::connect(&primary).await;
    c.command("EHLO client.test").await;
    c.write(b"MAIL FROM:<one@origin.test>\r\nRCPT TO:<a@example.com>\r\nDATA\r\n")
        .await;
    c.replies(3).await;
    c.write(b"one\r\n.\r\nMAIL FROM:<two@origin.test>\r\nRCPT TO:<a@example.com>\r\nDATA\r\n")
        .await;
    assert_eq!(c.replies(4).await[3], "354 End data with <CR><LF>.<CR><LF>");
    c.write(b"two\r\n.\r\nQUIT\r\n").await;
    assert_eq!(
        c.replies(2).await,
        ["250 2.0.0 Ok: queued", "221 2.0.0 Bye"]
    );
    assert_eq!(primary.turns(), 2 + 3, "k + 3 for k = 2");
    assert_eq!(
        primary.batches(),
        [
            vec!["EHLO client.test"],
            vec![
                "MAIL FROM:<one@origin.test>",
                "RCPT TO:<a@example.com>",
                "DATA"
            ],
            vec![
                "MAIL FROM:<two@origin.test>",
                "RCPT TO:<a@example.com>",
                "DATA"
            ],
            vec!["QUIT"],
        ]
    );

    // Waiting for every reply: a round trip per command.
    let mut c = Client::connect(&primary).await;
    for line in [
        "EHLO client.test",
        "MAIL FROM:<three@origin.test>",
        "RCPT TO:<a@example.com>",
        "DATA",
        "three\r\n.",
        "QUIT",
    ] {
        c.command(line).await;
    }
    assert_eq!(primary.turns_per_connection(), [5, 7]);
    assert_eq!(primary.turns(), 12);
    assert_eq!(primary.messages().len(), 3);
}
