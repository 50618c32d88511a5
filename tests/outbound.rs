//! The SMTP client against a real (scripted) primary over loopback sockets.

mod primary;

use std::time::Duration;

use mail_parser::{MessageParser, PartType};
use mxspool::config::TlsPolicy;
use mxspool::outbound::{self, Connection, Hop, Outcome, SessionError, Settings, Stage, Timeouts};
use mxspool::spool::{BodyType, Client, Envelope, Notify, QueueId, RcptStatus, Recipient, Ret};
use mxspool::status::{Failure, Status};
use primary::{Caps, Mode, Primary, TlsIdentity};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(5);

fn settings(tls: TlsPolicy) -> Settings {
    Settings {
        timeouts: Timeouts::uniform(WAIT),
        ..Settings::new("backup.test", tls)
    }
}

fn hop(primary: &Primary) -> Hop {
    Hop {
        name: "mx.test".into(),
        addr: primary.addr,
    }
}

fn envelope(rcpts: &[&str]) -> Envelope {
    Envelope {
        id: QueueId(7),
        sender: "sender@example.org".into(),
        ret: Ret::Unset,
        envid: None,
        envid_xtext: None,
        body_type: BodyType::Unset,
        smtputf8: false,
        has_8bit: false,
        arrived_ms: 0,
        size: 0,
        client: Client {
            ip: "192.0.2.7".parse().unwrap(),
            helo: "client.example.org".into(),
            tls: false,
        },
        recipients: rcpts
            .iter()
            .map(|address| Recipient {
                address: (*address).into(),
                orcpt: None,
                orcpt_xtext: None,
                notify: Notify::default(),
                status: RcptStatus::Queued,
                attempts: 0,
                next_attempt_ms: 0,
                last_reply: None,
                unreachable: false,
                delay_notified: false,
                suspect: false,
            })
            .collect(),
        notices_to: None,
    }
}

const BODY: &[u8] = b"Subject: test\r\n\r\nhello\r\n.leading dot\r\n..two dots\r\n.\r\nbye\r\n";

/// Connects with `settings`, delivers `env` to all its recipients, QUITs.
async fn send(
    primary: &Primary,
    settings: &Settings,
    env: &Envelope,
    body: &[u8],
) -> Result<Vec<(usize, Outcome)>, SessionError> {
    let mut conn = outbound::connect(&hop(primary), settings).await?;
    let all: Vec<usize> = (0..env.recipients.len()).collect();
    let outcomes = conn.deliver(env, body, &all).await?;
    conn.quit().await;
    Ok(outcomes)
}

fn status(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Delivered { .. } => "delivered".into(),
        Outcome::Failed { status, .. } | Outcome::Deferred { status, .. } => status.to_string(),
    }
}

fn statuses(outcomes: &[(usize, Outcome)]) -> Vec<(usize, String)> {
    outcomes.iter().map(|(i, o)| (*i, status(o))).collect()
}

fn want(list: &[(usize, &str)]) -> Vec<(usize, String)> {
    list.iter().map(|&(i, s)| (i, s.to_owned())).collect()
}

/// How many transactions the primary saw begin.
fn mail_commands(primary: &Primary) -> usize {
    primary
        .commands()
        .iter()
        .filter(|c| c.starts_with("MAIL"))
        .count()
}

#[tokio::test]
async fn delivers_two_recipients_byte_exact_and_dot_stuffed() {
    let primary = Primary::start().await;
    let env = envelope(&["a@example.com", "b@example.com"]);
    let outcomes = send(&primary, &settings(TlsPolicy::None), &env, BODY)
        .await
        .unwrap();
    let reply = "250 2.0.0 Ok: queued".to_string();
    let delivered = Outcome::Delivered {
        reply,
        relayed: false,
    };
    assert_eq!(outcomes, [(0, delivered.clone()), (1, delivered)]);

    let messages = primary.messages();
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert_eq!(m.body, BODY);
    assert_eq!(
        m.data,
        b"Subject: test\r\n\r\nhello\r\n..leading dot\r\n...two dots\r\n..\r\nbye\r\n"
    );
    assert_eq!(m.mail_from_line, "MAIL FROM:<sender@example.org>");
    assert_eq!(
        m.rcpt_lines,
        ["RCPT TO:<a@example.com>", "RCPT TO:<b@example.com>"]
    );
    assert!(!m.tls);
    assert_eq!(primary.commands().last().map(String::as_str), Some("QUIT"));
}

#[tokio::test]
async fn bodies_with_bare_line_endings_go_out_as_crlf() {
    let primary = Primary::start().await;
    let env = envelope(&["a@example.com"]);
    send(
        &primary,
        &settings(TlsPolicy::None),
        &env,
        b"a\n.\nMAIL FROM:<evil@x>\rb",
    )
    .await
    .unwrap();
    let m = &primary.messages()[0];
    assert_eq!(m.data, b"a\r\n..\r\nMAIL FROM:<evil@x>\r\nb\r\n");
    assert_eq!(mail_commands(&primary), 1);
}

#[tokio::test]
async fn pipelines_when_offered() {
    let primary = Primary::start().await;
    let env = envelope(&["a@example.com", "b@example.com"]);
    send(&primary, &settings(TlsPolicy::None), &env, BODY)
        .await
        .unwrap();
    assert_eq!(
        primary.batches(),
        [
            vec!["EHLO backup.test".to_string()],
            vec![
                "MAIL FROM:<sender@example.org>".into(),
                "RCPT TO:<a@example.com>".into(),
                "RCPT TO:<b@example.com>".into(),
                "DATA".into()
            ],
            vec!["QUIT".into()],
        ]
    );
}

#[tokio::test]
async fn waits_for_each_reply_when_pipelining_is_not_offered() {
    let primary = Primary::start().await;
    primary.set_capabilities(Caps {
        pipelining: false,
        ..Caps::default()
    });
    let env = envelope(&["a@example.com", "b@example.com"]);
    let outcomes = send(&primary, &settings(TlsPolicy::None), &env, BODY)
        .await
        .unwrap();
    assert_eq!(
        statuses(&outcomes),
        want(&[(0, "delivered"), (1, "delivered")])
    );
    let batches = primary.batches();
    assert!(batches.iter().all(|b| b.len() == 1), "{batches:?}");
    assert_eq!(
        batches.len(),
        6,
        "EHLO MAIL RCPT RCPT DATA QUIT: {batches:?}"
    );
    assert_eq!(primary.messages()[0].body, BODY);
}

#[tokio::test]
async fn each_recipient_gets_its_own_outcome() {
    for pipelining in [true, false] {
        let primary = Primary::start().await;
        primary.set_capabilities(Caps {
            pipelining,
            ..Caps::default()
        });
        primary.set_rcpt_reply("b@example.com", "550 5.1.1 no such user");
        primary.set_rcpt_reply("c@example.com", "450 4.2.1 try later");
        let env = envelope(&["a@example.com", "b@example.com", "c@example.com"]);
        let outcomes = send(&primary, &settings(TlsPolicy::None), &env, BODY)
            .await
            .unwrap();
        assert_eq!(
            outcomes,
            [
                (
                    0,
                    Outcome::Delivered {
                        reply: "250 2.0.0 Ok: queued".into(),
                        relayed: false
                    }
                ),
                (
                    1,
                    Outcome::Failed {
                        status: Status::NO_SUCH_MAILBOX,
                        reply: "550 5.1.1 no such user".into(),
                        reason: Failure::Rejected,
                    }
                ),
                (
                    2,
                    Outcome::Deferred {
                        status: Status::transient(2, 1),
                        reply: "450 4.2.1 try later".into()
                    }
                ),
            ],
            "pipelining {pipelining}"
        );
        assert_eq!(primary.messages().len(), 1);
    }
}

#[tokio::test]
async fn no_accepted_recipient_means_no_message() {
    for pipelining in [true, false] {
        let primary = Primary::start().await;
        primary.set_capabilities(Caps {
            pipelining,
            ..Caps::default()
        });
        primary.set_rcpt_reply("a@example.com", "550 5.1.1 no such user");
        let env = envelope(&["a@example.com"]);
        let mut conn = outbound::connect(&hop(&primary), &settings(TlsPolicy::None))
            .await
            .unwrap();
        let outcomes = conn.deliver(&env, BODY, &[0]).await.unwrap();
        assert_eq!(statuses(&outcomes), want(&[(0, "5.1.1")]));
        assert!(conn.is_usable());
        assert!(primary.messages().is_empty());
        // The transaction was left open: RSET before the next one (pipelined
        // with it when the server pipelines).
        let next = envelope(&["b@example.com"]);
        let outcomes = conn.deliver(&next, BODY, &[0]).await.unwrap();
        assert_eq!(statuses(&outcomes), want(&[(0, "delivered")]));
        conn.quit().await;
        let commands = primary.commands();
        assert_eq!(primary.messages().len(), 1);
        let verbs: Vec<&str> = commands
            .iter()
            .map(|l| l.split([' ', ':']).next().unwrap())
            .collect();
        // Without pipelining DATA is not even sent.
        let expected: &[&str] = if pipelining {
            &[
                "EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA", "QUIT",
            ]
        } else {
            &[
                "EHLO", "MAIL", "RCPT", "RSET", "MAIL", "RCPT", "DATA", "QUIT",
            ]
        };
        assert_eq!(verbs, expected, "pipelining {pipelining}");
    }
}

#[tokio::test]
async fn a_4xx_after_the_dot_defers_every_accepted_recipient() {
    let primary = Primary::start().await;
    primary.set_data_reply("452 4.3.1 insufficient system storage");
    primary.set_rcpt_reply("c@example.com", "550 5.1.1 no such user");
    let env = envelope(&["a@example.com", "b@example.com", "c@example.com"]);
    let outcomes = send(&primary, &settings(TlsPolicy::None), &env, BODY)
        .await
        .unwrap();
    assert_eq!(
        statuses(&outcomes),
        want(&[(0, "4.3.1"), (1, "4.3.1"), (2, "5.1.1")])
    );
    assert!(matches!(&outcomes[0].1, Outcome::Deferred { reply, .. }
        if reply == "452 4.3.1 insufficient system storage"));

    primary.set_data_reply("554 5.7.1 spam");
    let outcomes = send(&primary, &settings(TlsPolicy::None), &env, BODY)
        .await
        .unwrap();
    assert!(
        matches!(&outcomes[1].1, Outcome::Failed { status, .. } if status.to_string() == "5.7.1")
    );
    assert!(primary.messages().is_empty());
}

#[tokio::test]
async fn a_421_greeting_means_the_primary_is_down() {
    let primary = Primary::start().await;
    primary.set_mode(Mode::Greet421);
    let e = outbound::connect(&hop(&primary), &settings(TlsPolicy::None))
        .await
        .err()
        .unwrap();
    assert!(e.unreachable(), "{e}");
    let reply = e.reply().unwrap();
    assert_eq!(
        (reply.code, reply.enhanced.as_deref()),
        (421, Some("4.3.2"))
    );
}

#[tokio::test]
async fn a_refused_connection_means_down_until_the_primary_is_back() {
    let primary = Primary::start().await;
    primary.set_mode(Mode::Down);
    let e = outbound::connect(&hop(&primary), &settings(TlsPolicy::None))
        .await
        .err()
        .unwrap();
    assert!(matches!(e, SessionError::Connect { .. }), "{e}");
    assert!(e.unreachable());
    assert!(
        outbound::probe(&hop(&primary), &settings(TlsPolicy::None))
            .await
            .is_err_and(|e| e.unreachable())
    );
    assert_eq!(primary.connections(), 0);

    primary.set_mode(Mode::Up);
    outbound::probe(&hop(&primary), &settings(TlsPolicy::None))
        .await
        .unwrap();
    assert_eq!(primary.commands(), ["EHLO backup.test", "QUIT"]);

    // A primary that went away entirely comes back on the same port.
    let addr = primary.addr;
    drop(primary);
    assert!(
        outbound::connect(
            &Hop {
                name: "mx.test".into(),
                addr
            },
            &settings(TlsPolicy::None)
        )
        .await
        .is_err_and(|e| e.unreachable())
    );
    let primary = Primary::start_on(addr).await;
    let env = envelope(&["a@example.com"]);
    send(&primary, &settings(TlsPolicy::None), &env, BODY)
        .await
        .unwrap();
    assert!(primary.wait_for_messages(1, WAIT).await);
}

#[tokio::test]
async fn a_hanging_primary_times_out_as_down() {
    let primary = Primary::start().await;
    primary.set_mode(Mode::Hang);
    let mut settings = settings(TlsPolicy::None);
    settings.timeouts.greeting = Duration::from_millis(200);
    let started = Instant::now();
    let e = outbound::connect(&hop(&primary), &settings)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(
            e,
            SessionError::Timeout {
                stage: Stage::Greeting
            }
        ),
        "{e}"
    );
    assert!(e.unreachable());
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(primary.connections(), 1);
}

#[tokio::test]
async fn a_drop_after_the_greeting_is_an_error_but_not_down() {
    let primary = Primary::start().await;
    primary.set_mode(Mode::DropAfterGreeting);
    let e = outbound::connect(&hop(&primary), &settings(TlsPolicy::None))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(
            e,
            SessionError::Closed { stage: Stage::Ehlo }
                | SessionError::Io {
                    stage: Stage::Ehlo,
                    ..
                }
        ),
        "{e}"
    );
    assert!(!e.unreachable());
}

#[tokio::test]
async fn a_421_mid_transaction_fails_the_whole_attempt() {
    let primary = Primary::start().await;
    primary.set_rcpt_reply("b@example.com", "421 4.3.2 shutting down");
    let env = envelope(&["a@example.com", "b@example.com"]);
    let mut conn = outbound::connect(&hop(&primary), &settings(TlsPolicy::None))
        .await
        .unwrap();
    let e = conn.deliver(&env, BODY, &[0, 1]).await.unwrap_err();
    assert!(
        matches!(
            e,
            SessionError::Rejected {
                stage: Stage::RcptTo,
                ..
            }
        ),
        "{e}"
    );
    assert!(!e.unreachable());
    assert!(!conn.is_usable());
    assert!(primary.messages().is_empty());
}

/// A primary that offers neither 8BITMIME nor SMTPUTF8, and the SIZE it
/// takes (so MAIL FROM says SIZE=).
fn seven_bit_caps() -> Caps {
    Caps {
        eightbitmime: false,
        size: Some(0),
        ..Caps::default()
    }
}

/// Every text part of `message`, decoded, in order.
fn texts(message: &[u8]) -> Vec<String> {
    let parsed = MessageParser::default().parse(message).expect("parses");
    parsed
        .parts
        .iter()
        .filter_map(|p| match &p.body {
            PartType::Text(t) => Some(t.to_string()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn declared_eight_bit_content_is_converted_for_a_primary_without_8bitmime() {
    let primary = Primary::start().await;
    primary.set_capabilities(seven_bit_caps());
    let mut env = envelope(&["a@example.com"]);
    env.has_8bit = true;
    env.body_type = BodyType::EightBitMime;
    let plain = "Subject: plain\r\nMIME-Version: 1.0\r\n\
                 Content-Type: text/plain; charset=utf-8\r\n\
                 Content-Transfer-Encoding: 8bit\r\n\r\n\
                 Gr\u{fc}\u{df}e aus K\u{f6}ln\r\n.dot first = equals\r\n";
    let multipart = "Subject: multipart\r\nMIME-Version: 1.0\r\n\
                     Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
                     --b1\r\nContent-Type: text/plain\r\n\r\nseven bit\r\n\
                     --b1\r\nContent-Type: text/plain; charset=utf-8\r\n\
                     Content-Transfer-Encoding: 8bit\r\n\r\n\u{e9}t\u{e9} \u{e0} Paris\r\n\
                     --b1--\r\n";
    for (n, message) in [plain, multipart].into_iter().enumerate() {
        let outcomes = send(
            &primary,
            &settings(TlsPolicy::None),
            &env,
            message.as_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(statuses(&outcomes), want(&[(0, "delivered")]));
        let m = &primary.messages()[n];
        assert!(m.body.is_ascii(), "{}", String::from_utf8_lossy(&m.body));
        // No BODY= to a hop without 8BITMIME; SIZE= of what was sent.
        assert_eq!(
            m.mail_from_line,
            format!("MAIL FROM:<sender@example.org> SIZE={}", m.body.len())
        );
        let sent = texts(message.as_bytes());
        assert!(sent.iter().any(|t| !t.is_ascii()), "{sent:?}");
        assert_eq!(texts(&m.body), sent);
    }
    // The 7-bit part of the multipart went byte for byte.
    let body = String::from_utf8(primary.messages()[1].body.clone()).unwrap();
    assert!(
        body.contains("--b1\r\nContent-Type: text/plain\r\n\r\nseven bit\r\n--b1\r\n"),
        "{body}"
    );
}

#[tokio::test]
async fn declared_eight_bit_that_cannot_be_converted_fails_with_5_6_3_and_sends_nothing() {
    let primary = Primary::start().await;
    primary.set_capabilities(seven_bit_caps());
    let mut env = envelope(&["a@example.com", "b@example.com"]);
    env.has_8bit = true;
    env.body_type = BodyType::EightBitMime;
    // 8-bit in a header: only SMTPUTF8 could carry it.
    let outcomes = send(
        &primary,
        &settings(TlsPolicy::None),
        &env,
        "Subject: caf\u{e9}\r\n\r\ncaf\u{e9}\r\n".as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(statuses(&outcomes), want(&[(0, "5.6.3"), (1, "5.6.3")]));
    assert!(
        outcomes[0].1.reply().contains("header"),
        "{:?}",
        outcomes[0].1
    );
    assert_eq!(mail_commands(&primary), 0);
}

/// A header line of 2,000 octets (a Subject of words), a body line of
/// 1,002 (one word); the Subject.
fn long_lines() -> (String, Vec<u8>) {
    let value: String = (0..400)
        .map(|i| format!("w{i:03}"))
        .collect::<Vec<_>>()
        .join(" ");
    let value = value[..2000 - "Subject: ".len()].to_string();
    let body_line = "b".repeat(1002);
    let message = format!("Subject: {value}\r\nX-Tag: long\r\n\r\n{body_line}\r\n.end\r\n");
    assert_eq!(message.find("\r\n"), Some(2000));
    (value, message.into_bytes())
}

#[tokio::test]
async fn long_lines_are_broken_for_a_primary_that_enforces_the_limit() {
    let primary = Primary::start().await;
    primary.set_line_limit(Some(1000));
    let (value, message) = long_lines();
    assert!(message.split(|&b| b == b'\n').any(|l| l.len() > 1500));
    let env = envelope(&["a@example.com"]);
    for chunking in [false, true] {
        primary.set_capabilities(Caps {
            chunking,
            size: Some(0),
            ..Caps::default()
        });
        let outcomes = send(&primary, &settings(TlsPolicy::None), &env, &message)
            .await
            .unwrap();
        assert_eq!(
            statuses(&outcomes),
            want(&[(0, "delivered")]),
            "chunking {chunking}"
        );
    }
    assert_eq!(primary.too_long(), 0);
    for m in primary.messages() {
        assert!(m.data.split(|&b| b == b'\n').all(|l| l.len() <= 1000));
        assert_eq!(
            m.mail_from_line,
            format!("MAIL FROM:<sender@example.org> SIZE={}", m.body.len())
        );
        // Broken before a space: one folded header, which unfolds to the
        // original line.
        let parsed = MessageParser::default().parse(&m.body).expect("parses");
        assert_eq!(parsed.subject(), Some(value.as_str()));
        assert_eq!(
            parsed
                .header("X-Tag")
                .and_then(|h| h.as_text())
                .map(str::trim),
            Some("long")
        );
        // The body line got CRLF and a space inserted, nothing else.
        let body = String::from_utf8(m.body.clone()).unwrap();
        let (_, text) = body.split_once("\r\n\r\n").unwrap();
        assert_eq!(
            text.replace("\r\n ", ""),
            format!("{}\r\n.end\r\n", "b".repeat(1002))
        );
    }
}

#[tokio::test]
async fn with_line_length_limit_0_long_lines_go_as_they_are() {
    let primary = Primary::start().await;
    let (_, message) = long_lines();
    let env = envelope(&["a@example.com"]);
    let unlimited = Settings {
        line_length_limit: 0,
        ..settings(TlsPolicy::None)
    };
    send(&primary, &unlimited, &env, &message).await.unwrap();
    assert_eq!(primary.messages()[0].body, message);
    // A primary that enforces the limit refuses it, then.
    primary.set_line_limit(Some(1000));
    let outcomes = send(&primary, &unlimited, &env, &message).await.unwrap();
    assert_eq!(statuses(&outcomes), want(&[(0, "5.5.0")]));
    assert_eq!(primary.too_long(), 1);
}

#[tokio::test]
async fn undeclared_eight_bit_content_is_relayed_as_received() {
    let primary = Primary::start().await;
    primary.set_capabilities(Caps {
        eightbitmime: false,
        ..Caps::default()
    });
    let mut env = envelope(&["a@example.com"]);
    env.has_8bit = true;
    let body = "Subject: caf\u{e9}\r\n\r\n\u{fc}ber\r\n".as_bytes();
    let outcomes = send(&primary, &settings(TlsPolicy::None), &env, body)
        .await
        .unwrap();
    assert!(
        matches!(&outcomes[..], [(0, Outcome::Delivered { .. })]),
        "{outcomes:?}"
    );
    let m = &primary.messages()[0];
    // No BODY= the client did not give, and the bytes as they came.
    assert_eq!(m.mail_from_line, "MAIL FROM:<sender@example.org>");
    assert_eq!(m.body, body);
}

#[tokio::test]
async fn eight_bit_content_is_declared_to_a_primary_with_8bitmime() {
    let primary = Primary::start().await;
    let mut env = envelope(&["a@example.com"]);
    env.has_8bit = true;
    env.body_type = BodyType::EightBitMime;
    let body = "Subject: caf\u{e9}\r\n\r\n\u{fc}ber\r\n".as_bytes();
    send(&primary, &settings(TlsPolicy::None), &env, body)
        .await
        .unwrap();
    let m = &primary.messages()[0];
    assert_eq!(
        m.mail_from_line,
        "MAIL FROM:<sender@example.org> BODY=8BITMIME"
    );
    assert_eq!(m.body, body);
}

#[tokio::test]
async fn smtputf8_mail_needs_smtputf8() {
    let primary = Primary::start().await;
    let mut env = envelope(&["j\u{f6}rg@example.com"]);
    env.smtputf8 = true;
    send(&primary, &settings(TlsPolicy::None), &env, BODY)
        .await
        .unwrap();
    assert_eq!(
        primary.messages()[0].mail_from_line,
        "MAIL FROM:<sender@example.org> SMTPUTF8"
    );
    assert_eq!(
        primary.messages()[0].rcpt_lines,
        ["RCPT TO:<j\u{f6}rg@example.com>"]
    );

    primary.set_capabilities(Caps {
        smtputf8: false,
        ..Caps::default()
    });
    let outcomes = send(&primary, &settings(TlsPolicy::None), &env, BODY)
        .await
        .unwrap();
    assert_eq!(statuses(&outcomes), want(&[(0, "5.6.7")]));
    assert_eq!(mail_commands(&primary), 1);
}

#[tokio::test]
async fn a_message_over_the_size_limit_fails_with_5_3_4_and_sends_nothing() {
    let primary = Primary::start().await;
    primary.set_capabilities(Caps {
        size: Some(BODY.len() as u64 - 1),
        ..Caps::default()
    });
    let env = envelope(&["a@example.com", "b@example.com"]);
    let outcomes = send(&primary, &settings(TlsPolicy::None), &env, BODY)
        .await
        .unwrap();
    assert_eq!(statuses(&outcomes), want(&[(0, "5.3.4"), (1, "5.3.4")]));
    assert_eq!(mail_commands(&primary), 0);

    primary.set_capabilities(Caps {
        size: Some(BODY.len() as u64),
        ..Caps::default()
    });
    send(&primary, &settings(TlsPolicy::None), &env, BODY)
        .await
        .unwrap();
    assert_eq!(
        primary.messages()[0].mail_from_line,
        format!("MAIL FROM:<sender@example.org> SIZE={}", BODY.len())
    );
}

fn dsn_envelope() -> Envelope {
    let mut env = envelope(&["a@example.com", "b@example.com"]);
    env.ret = Ret::Full;
    env.envid = Some("id 1".into());
    env.recipients[0].notify = Notify(Notify::FAILURE | Notify::DELAY);
    env.recipients[0].orcpt = Some("A+x@example.com".into());
    env.recipients[1].notify = Notify(Notify::SUCCESS);
    env
}

#[tokio::test]
async fn dsn_parameters_go_only_to_a_primary_that_offers_dsn() {
    let primary = Primary::start().await;
    let env = dsn_envelope();
    send(&primary, &settings(TlsPolicy::None), &env, BODY)
        .await
        .unwrap();
    let m = &primary.messages()[0];
    assert_eq!(
        m.mail_from_line,
        "MAIL FROM:<sender@example.org> RET=FULL ENVID=id+201"
    );
    assert_eq!(
        m.rcpt_lines,
        [
            "RCPT TO:<a@example.com> NOTIFY=FAILURE,DELAY ORCPT=rfc822;A+2Bx@example.com",
            "RCPT TO:<b@example.com> NOTIFY=SUCCESS",
        ]
    );

    // This primary answers 555 to parameters it did not offer.
    primary.set_capabilities(Caps {
        dsn: false,
        ..Caps::default()
    });
    let outcomes = send(&primary, &settings(TlsPolicy::None), &env, BODY)
        .await
        .unwrap();
    assert_eq!(
        statuses(&outcomes),
        want(&[(0, "delivered"), (1, "delivered")])
    );
    let m = &primary.messages()[1];
    assert_eq!(m.mail_from_line, "MAIL FROM:<sender@example.org>");
    assert_eq!(
        m.rcpt_lines,
        ["RCPT TO:<a@example.com>", "RCPT TO:<b@example.com>"]
    );
}

#[tokio::test]
async fn success_notices_are_ours_to_send_when_the_primary_lacks_dsn() {
    let relayed = |outcomes: &[(usize, Outcome)]| -> Vec<bool> {
        outcomes
            .iter()
            .map(|(_, o)| matches!(o, Outcome::Delivered { relayed: true, .. }))
            .collect()
    };
    let primary = Primary::start().await;
    let env = dsn_envelope();
    let outcomes = send(&primary, &settings(TlsPolicy::None), &env, BODY)
        .await
        .unwrap();
    assert_eq!(relayed(&outcomes), [false, false]);

    primary.set_capabilities(Caps {
        dsn: false,
        ..Caps::default()
    });
    let outcomes = send(&primary, &settings(TlsPolicy::None), &env, BODY)
        .await
        .unwrap();
    // Only b asked for NOTIFY=SUCCESS.
    assert_eq!(relayed(&outcomes), [false, true]);
}

#[tokio::test]
async fn one_connection_carries_several_messages_with_rset_between() {
    let primary = Primary::start().await;
    let mut conn = outbound::connect(&hop(&primary), &settings(TlsPolicy::None))
        .await
        .unwrap();
    let first = envelope(&["a@example.com"]);
    let mut second = envelope(&["b@example.com", "c@example.com"]);
    second.sender = String::new();
    let outcomes = conn.deliver(&first, b"one\r\n", &[0]).await.unwrap();
    assert_eq!(statuses(&outcomes), want(&[(0, "delivered")]));
    conn.reset().await.unwrap();
    // Only the recipients asked for are attempted.
    let outcomes = conn.deliver(&second, b"two\r\n", &[1]).await.unwrap();
    assert_eq!(statuses(&outcomes), want(&[(1, "delivered")]));
    conn.quit().await;

    assert_eq!(primary.connections(), 1);
    let messages = primary.messages();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0].body, b"one\r\n");
    assert_eq!(messages[1].body, b"two\r\n");
    assert_eq!(messages[1].mail_from_line, "MAIL FROM:<>");
    assert_eq!(messages[1].rcpt_lines, ["RCPT TO:<c@example.com>"]);
    let verbs: Vec<String> = primary
        .commands()
        .iter()
        .map(|c| c.split([' ', ':']).next().unwrap().to_string())
        .collect();
    assert_eq!(
        verbs,
        [
            "EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA", "QUIT"
        ]
    );
}

fn tls_caps(identity: TlsIdentity) -> Caps {
    Caps {
        starttls: Some(identity),
        ..Caps::default()
    }
}

#[tokio::test]
async fn policy_none_never_starts_tls() {
    let primary = Primary::start().await;
    let (identity, _) = TlsIdentity::generate(&["mx.test"]);
    primary.set_capabilities(tls_caps(identity));
    let conn = outbound::connect(&hop(&primary), &settings(TlsPolicy::None))
        .await
        .unwrap();
    let caps = conn.capabilities();
    assert!(caps.starttls && !caps.tls);
    conn.quit().await;
    assert!(!primary.commands().contains(&"STARTTLS".to_string()));
}

#[tokio::test]
async fn opportunistic_tls_is_used_when_offered() {
    let primary = Primary::start().await;
    let (identity, _) = TlsIdentity::generate(&["some-other-name.test"]);
    primary.set_capabilities(tls_caps(identity));
    let env = envelope(&["a@example.com"]);
    let mut conn = outbound::connect(&hop(&primary), &settings(TlsPolicy::Opportunistic))
        .await
        .unwrap();
    let caps = conn.capabilities();
    assert!(caps.tls, "{caps:?}");
    assert!(!caps.starttls, "not offered again inside TLS");
    assert!(caps.pipelining, "the EHLO after TLS counts");
    conn.deliver(&env, BODY, &[0]).await.unwrap();
    conn.quit().await;
    let m = &primary.messages()[0];
    assert!(m.tls);
    assert_eq!(m.body, BODY);
    assert_eq!(
        primary.commands()[..3],
        ["EHLO backup.test", "STARTTLS", "EHLO backup.test"]
    );
}

#[tokio::test]
async fn opportunistic_stays_plain_when_tls_is_not_offered() {
    let primary = Primary::start().await;
    let env = envelope(&["a@example.com"]);
    send(&primary, &settings(TlsPolicy::Opportunistic), &env, BODY)
        .await
        .unwrap();
    assert!(!primary.messages()[0].tls);
    assert_eq!(primary.connections(), 1);
}

#[tokio::test]
async fn opportunistic_falls_back_to_plain_text_when_the_handshake_fails() {
    let primary = Primary::start().await;
    primary.set_capabilities(tls_caps(TlsIdentity::broken()));
    let env = envelope(&["a@example.com"]);
    let outcomes = send(&primary, &settings(TlsPolicy::Opportunistic), &env, BODY)
        .await
        .unwrap();
    assert_eq!(statuses(&outcomes), want(&[(0, "delivered")]));
    assert!(!primary.messages()[0].tls);
    assert_eq!(primary.connections(), 2);
    let starttls = primary
        .commands()
        .iter()
        .filter(|c| *c == "STARTTLS")
        .count();
    assert_eq!(starttls, 1, "{:?}", primary.commands());
}

#[tokio::test]
async fn required_tls_fails_when_not_offered_or_broken() {
    let primary = Primary::start().await;
    let e = outbound::connect(&hop(&primary), &settings(TlsPolicy::Required))
        .await
        .err()
        .unwrap();
    assert!(matches!(e, SessionError::TlsNotOffered), "{e}");
    assert!(!e.unreachable());

    primary.set_capabilities(tls_caps(TlsIdentity::broken()));
    let e = outbound::connect(&hop(&primary), &settings(TlsPolicy::Required))
        .await
        .err()
        .unwrap();
    assert!(matches!(e, SessionError::Tls { .. }), "{e}");
    assert_eq!(primary.connections(), 2, "no plain-text retry");
    assert!(primary.messages().is_empty());
}

#[tokio::test]
async fn required_tls_does_not_verify_the_certificate() {
    let primary = Primary::start().await;
    let (identity, _) = TlsIdentity::generate(&["some-other-name.test"]);
    primary.set_capabilities(tls_caps(identity));
    let env = envelope(&["a@example.com"]);
    send(&primary, &settings(TlsPolicy::Required), &env, BODY)
        .await
        .unwrap();
    assert!(primary.messages()[0].tls);
}

#[tokio::test]
async fn verify_accepts_a_trusted_certificate_for_the_hop_name_only() {
    let primary = Primary::start().await;
    let (identity, ca) = TlsIdentity::generate(&["mx.test"]);
    primary.set_capabilities(tls_caps(identity));
    let mut settings = settings(TlsPolicy::Verify);

    // Not trusted: the test CA is in no system store.
    let e = outbound::connect(&hop(&primary), &settings)
        .await
        .err()
        .unwrap();
    assert!(matches!(e, SessionError::Tls { .. }), "{e}");

    settings.extra_roots = vec![ca];
    let env = envelope(&["a@example.com"]);
    send(&primary, &settings, &env, BODY).await.unwrap();
    assert!(primary.messages()[0].tls);

    // Trusted, but for another name.
    let wrong = Hop {
        name: "wrong.test".into(),
        addr: primary.addr,
    };
    let e = outbound::connect(&wrong, &settings).await.err().unwrap();
    assert!(matches!(e, SessionError::Tls { .. }), "{e}");
    assert!(!e.unreachable());
    assert_eq!(primary.messages().len(), 1);
}

#[tokio::test]
async fn the_connection_reports_its_remote() {
    let primary = Primary::start().await;
    primary.set_capabilities(Caps {
        size: Some(1 << 20),
        ..Caps::default()
    });
    let conn: Connection = outbound::connect(&hop(&primary), &settings(TlsPolicy::None))
        .await
        .unwrap();
    assert_eq!(conn.remote_name(), "mx.test");
    let caps = conn.capabilities();
    assert!(caps.eightbitmime && caps.smtputf8 && caps.dsn && caps.pipelining);
    assert_eq!(caps.size, Some(1 << 20));
    assert!(!caps.starttls && !caps.tls);
    conn.quit().await;
}
