//! The outbound SMTP client against a next hop that answers with arbitrary
//! bytes: greeting, EHLO (HELO fallback), then three messages on one
//! connection, pipelined, chunked (BDAT) or in lockstep as the EHLO reply
//! decides, the replies arriving in pieces of a size the input chooses.
//! Nothing is real but the stream: the code is what delivers mail.
//!
//! Input: one byte (the size of the pieces replies arrive in, whether the
//! message is 8-bit), then everything the next hop says.
//!
//! Checked: every message handed over ends exactly once, either with one
//! outcome for each recipient it was given or in a session failure; nothing
//! is left unaccounted for when the session ends; every outcome's status is
//! an RFC 3463 code of its kind and its reply text is one line.
#![no_main]

use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mxspool::outbound::fuzz as out;
use mxspool::outbound::{Hop, Outcome, Progress, Ticket, Timeouts};
use mxspool::spool::{BodyType, Client, Envelope, Notify, QueueId, RcptStatus, Recipient, Ret};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime")
});

const BODY: &[u8] = b"Subject: fuzz\r\n\r\n.a line with a leading dot\r\n.\r\nlast\r\n";

/// A next hop that says the input, in pieces, and hears everything.
struct Peer<'a> {
    says: &'a [u8],
    piece: usize,
}

impl AsyncRead for Peer<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.piece.min(self.says.len()).min(buf.remaining());
        let (now, later) = self.says.split_at(n);
        buf.put_slice(now);
        self.says = later;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Peer<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn recipient(address: &str, notify: u8) -> Recipient {
    Recipient {
        address: address.into(),
        orcpt: Some(format!("rfc822;{address}")),
        orcpt_xtext: None,
        notify: Notify(notify),
        status: RcptStatus::Queued,
        attempts: 0,
        next_attempt_ms: 0,
        last_reply: None,
        unreachable: false,
        delay_notified: false,
        suspect: false,
    }
}

fn envelope(id: u64, has_8bit: bool) -> Envelope {
    Envelope {
        id: QueueId(id),
        sender: "sender@example.org".into(),
        ret: Ret::Headers,
        envid: Some(format!("env {id}")),
        envid_xtext: None,
        body_type: BodyType::EightBitMime,
        smtputf8: false,
        has_8bit,
        arrived_ms: 0,
        size: BODY.len() as u64,
        client: Client {
            ip: IpAddr::from([192, 0, 2, 7]),
            helo: "client.example.org".into(),
            tls: false,
        },
        recipients: vec![
            recipient("a@example.com", 0),
            recipient("b@example.com", Notify::SUCCESS | Notify::FAILURE),
            recipient("c d@example.com", Notify::NEVER),
        ],
        notices_to: None,
    }
}

fn check_outcome(outcome: &Outcome) {
    let (status, class) = match outcome {
        Outcome::Delivered { .. } => (None, 2),
        Outcome::Failed { status, .. } => (Some(status), 5),
        Outcome::Deferred { status, .. } => (Some(status), 4),
    };
    if let Some(status) = status.map(ToString::to_string) {
        let parts: Vec<&str> = status.split('.').collect();
        assert!(
            parts.len() == 3
                && parts
                    .iter()
                    .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit())),
            "{outcome:?}"
        );
        assert_eq!(parts[0], class.to_string(), "{outcome:?}");
    }
    // What is stored as `last_reply` and logged is one line without control
    // characters (a bare CR from the next hop once reached it).
    assert!(
        !outcome.reply().chars().any(char::is_control),
        "{outcome:?}"
    );
}

async fn deliver(knob: u8, says: &[u8]) {
    let peer = Peer {
        says,
        piece: usize::from(knob & 127).max(1),
    };
    let hop = Hop {
        name: "mx.example.com".into(),
        addr: "192.0.2.25:25".parse().expect("an address"),
    };
    let timeouts = Timeouts::uniform(Duration::from_secs(60));
    let Ok(mut conn) = out::start(peer, hop, "mx2.test", timeouts).await else {
        return;
    };
    let messages: [(Envelope, Vec<usize>); 3] = [
        (envelope(1, knob & 128 != 0), vec![0, 1, 2]),
        (envelope(2, false), vec![1]),
        (envelope(3, false), vec![2, 0, 7]),
    ];
    let body = Arc::new(BODY.to_vec());
    let mut open: BTreeMap<Ticket, Vec<usize>> = BTreeMap::new();
    let mut submitted = 0;
    for turn in 0.. {
        assert!(turn < 10_000, "no progress");
        if submitted < messages.len() && conn.has_room() {
            let (envelope, wanted) = &messages[submitted];
            let ticket = conn.submit(envelope, body.clone(), wanted).await;
            // Indexes outside the envelope are ignored.
            let known = wanted
                .iter()
                .copied()
                .filter(|&i| i < envelope.recipients.len())
                .collect();
            assert!(
                open.insert(ticket, known).is_none(),
                "ticket {ticket} twice"
            );
            submitted += 1;
            continue;
        }
        match conn.advance().await {
            Progress::Done { ticket, outcomes } => {
                let mut wanted = open
                    .remove(&ticket)
                    .unwrap_or_else(|| panic!("an outcome for ticket {ticket}, not open"));
                let mut got: Vec<usize> = outcomes.iter().map(|(i, _)| *i).collect();
                wanted.sort_unstable();
                got.sort_unstable();
                assert_eq!(got, wanted, "one outcome per recipient: {outcomes:?}");
                for (_, outcome) in &outcomes {
                    check_outcome(outcome);
                }
            }
            Progress::Room => {}
            // Idle on a connection an error left unusable (a refused RSET
            // after a lockstep transaction): the caller opens another.
            Progress::Idle if submitted < messages.len() && conn.has_room() => {}
            Progress::Idle => break,
            Progress::Failed { tickets, error: _ } => {
                for ticket in tickets {
                    assert!(
                        open.remove(&ticket).is_some(),
                        "ticket {ticket} failed, not open"
                    );
                }
                assert!(!conn.is_usable());
                break;
            }
        }
    }
    assert!(open.is_empty(), "messages never finished: {open:?}");
    conn.quit().await;
}

fuzz_target!(|input: &[u8]| {
    let [knob, says @ ..] = input else {
        return;
    };
    RUNTIME.block_on(deliver(*knob, says));
});
