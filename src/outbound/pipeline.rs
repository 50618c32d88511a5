//! Messages in flight on one connection: a pure state machine over the queue
//! of replies still due (RFC 2920 pipelining, RFC 3030 chunking).
//!
//! The connection writes; this module remembers what every command sent was
//! for, and turns the replies, which come back in the order the commands went
//! out, into outcomes per recipient. So the end-of-data reply of one message
//! and the MAIL and RCPT replies of the next, arriving in one packet, each land
//! where they belong, and no recipient is reported delivered without the
//! reply that says so.
//!
//! Two ways to move the content, chosen by what the next hop offers:
//! - [`Transfer::Data`]: the body may only follow a 354, so one message waits
//!   for its DATA reply at a time. After the 354 its body and the final dot go
//!   out together with the next message's MAIL, RCPTs and DATA (RFC 2920 §3.1
//!   lets message content open a group and DATA close it): one round trip per
//!   message.
//! - [`Transfer::Chunking`]: `BDAT n LAST` needs no go-ahead, so up to
//!   [`WINDOW`] messages (commands and content) are in flight at once, and one
//!   round trip carries many of them.
//!
//! Nothing here does I/O, reads the clock or knows about the spool.

use std::collections::VecDeque;
use std::sync::Arc;

use super::error::{SessionError, Stage};
use super::mail::Plan;
use super::outcome::{Class, Outcome};
use super::reply::Reply;

/// Most messages in flight on one connection with CHUNKING.
pub(crate) const WINDOW: usize = 32;
/// Content bytes in flight on one connection beyond which no further message
/// is added (one message may be larger): the caller keeps every message in
/// flight in memory until its reply, for its record and any notice.
pub(crate) const MAX_BYTES: u64 = 4 * 1024 * 1024;
/// Most replies due at once. Replies we do not read pile up in the socket
/// buffers; kept well below their size, the server never blocks writing them
/// while we block writing to it.
pub(crate) const MAX_DUE: usize = 256;

/// Names a message handed to a connection, in the order they were handed.
pub type Ticket = u64;

/// How message content travels to the next hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transfer {
    /// DATA, 354, the dot-stuffed body and the final dot.
    Data,
    /// `BDAT n LAST` and the content as it is (RFC 3030).
    Chunking,
}

/// What a reply still due answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Due {
    Rset,
    Mail,
    /// The RCPT of the message's `n`-th recipient sent.
    Rcpt(usize),
    Data,
    EndOfData,
    Bdat,
}

impl Due {
    fn stage(self) -> Stage {
        match self {
            Due::Rset => Stage::Rset,
            Due::Mail => Stage::MailFrom,
            Due::Rcpt(_) => Stage::RcptTo,
            Due::Data => Stage::Data,
            Due::EndOfData => Stage::EndOfData,
            Due::Bdat => Stage::Bdat,
        }
    }
}

/// One message between its commands going out and its last reply.
struct Message {
    ticket: Ticket,
    /// Content bytes, for the bound on bytes in flight.
    size: u64,
    /// Outcomes known so far: settled before sending, refused recipients.
    outcomes: Vec<(usize, Outcome)>,
    /// Each RCPT sent: the envelope index, and whether a successful delivery
    /// owes the sender a "relayed" notice (NOTIFY=SUCCESS, next hop without DSN).
    rcpts: Vec<(usize, bool)>,
    /// MAIL's refusal, which speaks for every recipient.
    mail_refused: Option<Outcome>,
    /// Positions in `rcpts` the next hop accepted.
    accepted: Vec<usize>,
    /// The body, kept until the 354 says it may go (DATA only).
    body: Option<Arc<Vec<u8>>>,
    /// The content went out with no recipient to carry it (a 354 nobody should
    /// have given, or BDAT sent before the refusals came back): its reply means
    /// nothing.
    abandoned: bool,
    due: VecDeque<Due>,
}

impl Message {
    /// Whether the content carries the message to someone.
    fn carries(&self) -> bool {
        self.mail_refused.is_none() && !self.accepted.is_empty()
    }

    /// The end-of-data (or BDAT LAST) reply settles every accepted recipient.
    fn settle(&mut self, reply: &Reply, stage: Stage) -> Result<(), SessionError> {
        if self.abandoned || !self.carries() {
            return Ok(());
        }
        let outcomes: Vec<(usize, Outcome)> = if reply.class() == Class::Success {
            let text = reply.to_string();
            self.accepted
                .iter()
                .map(|&at| {
                    let (i, relayed) = self.rcpts[at];
                    (
                        i,
                        Outcome::Delivered {
                            reply: text.clone(),
                            relayed,
                        },
                    )
                })
                .collect()
        } else {
            let outcome = refusal(reply, stage)?;
            self.accepted
                .iter()
                .map(|&at| (self.rcpts[at].0, outcome.clone()))
                .collect()
        };
        self.outcomes.extend(outcomes);
        Ok(())
    }

    fn into_outcomes(mut self) -> Vec<(usize, Outcome)> {
        if let Some(outcome) = self.mail_refused.take() {
            let refused = self.rcpts.iter().map(|&(i, _)| (i, outcome.clone()));
            self.outcomes.extend(refused);
        }
        self.outcomes.sort_by_key(|(i, _)| *i);
        self.outcomes
    }
}

/// What the connection must do after a reply.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Nothing yet: read on (or hand over another message).
    Wait,
    /// A 354: write this body, dot-stuffed, and the final dot. `None`: no
    /// recipient was accepted, so write only the dot.
    Body(Option<Arc<Vec<u8>>>),
    /// The message's last reply came: its outcome per recipient, by index.
    Done(Ticket, Vec<(usize, Outcome)>),
}

/// The messages in flight on one connection, oldest first.
#[derive(Default)]
pub(crate) struct Flight {
    messages: VecDeque<Message>,
    /// The previous transaction may still be open on the server (its content
    /// was never sent, or it is still in flight): the next one starts with RSET.
    rset: bool,
    /// A DATA is waiting for its 354 (DATA transfer): nothing else may be sent.
    awaiting_go_ahead: bool,
    due: usize,
    /// Content bytes of the messages in flight.
    bytes: u64,
}

impl Flight {
    pub(crate) fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Whether another message may go out before the next reply is read.
    pub(crate) fn has_room(&self, transfer: Transfer) -> bool {
        match transfer {
            Transfer::Data => !self.awaiting_go_ahead,
            Transfer::Chunking => {
                self.messages.len() < WINDOW && self.due < MAX_DUE && self.bytes < MAX_BYTES
            }
        }
    }

    /// Hands over a message: appends its commands to `out`. `chunk`: the
    /// content goes as `BDAT n LAST` with this `n`, written by the caller right
    /// after the commands; `None`: DATA, and the body is kept for the 354.
    /// `relayed[k]` belongs to `plan.rcpts[k]`. Returns `Err` with the outcomes
    /// when the plan sends nothing (every recipient settled already).
    pub(crate) fn submit(
        &mut self,
        ticket: Ticket,
        plan: Plan,
        relayed: &[bool],
        body: Arc<Vec<u8>>,
        chunk: Option<u64>,
        out: &mut Vec<u8>,
    ) -> Result<(), Vec<(usize, Outcome)>> {
        if plan.rcpts.is_empty() {
            let mut outcomes = plan.settled;
            outcomes.sort_by_key(|(i, _)| *i);
            return Err(outcomes);
        }
        let size = body.len() as u64;
        let mut due = VecDeque::with_capacity(plan.rcpts.len() + 3);
        if std::mem::take(&mut self.rset) {
            out.extend_from_slice(b"RSET\r\n");
            due.push_back(Due::Rset);
        }
        out.extend_from_slice(plan.mail_from.as_bytes());
        due.push_back(Due::Mail);
        let mut rcpts = Vec::with_capacity(plan.rcpts.len());
        for (k, (i, line)) in plan.rcpts.into_iter().enumerate() {
            out.extend_from_slice(line.as_bytes());
            due.push_back(Due::Rcpt(k));
            rcpts.push((i, relayed.get(k).copied().unwrap_or(false)));
        }
        let kept = match chunk {
            None => {
                out.extend_from_slice(b"DATA\r\n");
                due.push_back(Due::Data);
                self.awaiting_go_ahead = true;
                Some(body)
            }
            Some(len) => {
                out.extend_from_slice(format!("BDAT {len} LAST\r\n").as_bytes());
                due.push_back(Due::Bdat);
                // Until its reply is in, the server's state is not known.
                self.rset = true;
                None
            }
        };
        self.due += due.len();
        self.bytes += size;
        self.messages.push_back(Message {
            ticket,
            size,
            outcomes: plan.settled,
            rcpts,
            mail_refused: None,
            accepted: Vec::new(),
            body: kept,
            abandoned: false,
            due,
        });
        Ok(())
    }

    /// The stage of the next reply due, for its time limit and for errors.
    pub(crate) fn next_stage(&self) -> Option<Stage> {
        self.messages
            .front()
            .and_then(|m| m.due.front())
            .map(|d| d.stage())
    }

    /// Takes the next reply. An `Err` means the session cannot go on: the
    /// caller defers every message still in flight ([`Flight::abort`]).
    pub(crate) fn on_reply(&mut self, reply: &Reply) -> Result<Step, SessionError> {
        let last = self.messages.len() == 1;
        let Some(message) = self.messages.front_mut() else {
            return Err(SessionError::Protocol {
                stage: Stage::Quit,
                reason: format!("reply nobody asked for: {reply}"),
            });
        };
        let due = message
            .due
            .pop_front()
            .expect("a message in flight has replies due");
        self.due -= 1;
        let class = reply.class();
        let mut step = Step::Wait;
        match due {
            Due::Rset => {
                if class != Class::Success {
                    return Err(SessionError::Rejected {
                        stage: Stage::Rset,
                        reply: reply.clone(),
                    });
                }
            }
            Due::Mail => {
                if class != Class::Success {
                    message.mail_refused = Some(refusal(reply, Stage::MailFrom)?);
                }
            }
            Due::Rcpt(k) => {
                // After a refused MAIL the RCPT replies (503s) say nothing.
                if message.mail_refused.is_none() {
                    if class == Class::Success {
                        message.accepted.push(k);
                    } else {
                        let outcome = refusal(reply, Stage::RcptTo)?;
                        message.outcomes.push((message.rcpts[k].0, outcome));
                    }
                }
            }
            Due::Data => {
                self.awaiting_go_ahead = false;
                let body = message.body.take();
                if class == Class::Intermediate {
                    message.due.push_back(Due::EndOfData);
                    self.due += 1;
                    message.abandoned = !message.carries();
                    step = Step::Body(body.filter(|_| !message.abandoned));
                } else {
                    if message.carries() {
                        let outcome = refusal(reply, Stage::Data)?;
                        let refused: Vec<_> = message
                            .accepted
                            .iter()
                            .map(|&at| (message.rcpts[at].0, outcome.clone()))
                            .collect();
                        message.outcomes.extend(refused);
                    }
                    // MAIL may have succeeded: the transaction is still open.
                    self.rset = true;
                }
            }
            Due::EndOfData => message.settle(reply, Stage::EndOfData)?,
            Due::Bdat => {
                message.settle(reply, Stage::Bdat)?;
                if class == Class::Success && message.carries() && last {
                    // Every transaction sent is complete: no RSET needed.
                    self.rset = false;
                }
            }
        }
        if message.due.is_empty() {
            let message = self.messages.pop_front().expect("checked above");
            self.bytes -= message.size;
            return Ok(Step::Done(message.ticket, message.into_outcomes()));
        }
        Ok(step)
    }

    /// The session failed: every message still in flight, to be deferred.
    pub(crate) fn abort(&mut self) -> Vec<Ticket> {
        self.due = 0;
        self.bytes = 0;
        self.awaiting_go_ahead = false;
        self.messages.drain(..).map(|m| m.ticket).collect()
    }
}

/// The outcome of a refusal; a reply that is neither success nor refusal
/// where one was due (a 354 to RCPT, a 250 to DATA) means the peer does not
/// follow the protocol, and nothing it said can be trusted.
pub(crate) fn refusal(reply: &Reply, stage: Stage) -> Result<Outcome, SessionError> {
    reply.refusal().ok_or_else(|| SessionError::Protocol {
        stage,
        reason: format!("unexpected reply {reply}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::reply::parse;
    use crate::status::{Failure, Status};

    fn plan(rcpts: &[usize]) -> Plan {
        Plan {
            settled: Vec::new(),
            mail_from: "MAIL FROM:<s@example.org>\r\n".into(),
            rcpts: rcpts
                .iter()
                .map(|&i| (i, format!("RCPT TO:<r{i}@example.com>\r\n")))
                .collect(),
        }
    }

    fn reply(text: &str) -> Reply {
        parse(format!("{text}\r\n").as_bytes()).unwrap()
    }

    fn body() -> Arc<Vec<u8>> {
        Arc::new(b"Subject: x\r\n\r\nhi\r\n".to_vec())
    }

    fn delivered(i: usize, reply: &str) -> (usize, Outcome) {
        (
            i,
            Outcome::Delivered {
                reply: reply.into(),
                relayed: false,
            },
        )
    }

    fn failed(i: usize, status: &str, reply: &str) -> (usize, Outcome) {
        (
            i,
            Outcome::Failed {
                status: Status::parse(status).expect("a status"),
                reply: reply.into(),
                reason: Failure::Rejected,
            },
        )
    }

    /// Feeds replies one by one and returns the steps.
    fn feed(flight: &mut Flight, replies: &[&str]) -> Vec<Step> {
        replies
            .iter()
            .map(|r| flight.on_reply(&reply(r)).unwrap())
            .collect()
    }

    fn lines(out: &mut Vec<u8>) -> Vec<String> {
        let text = String::from_utf8(std::mem::take(out)).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn data_transfer_sends_the_next_commands_with_the_body_and_sorts_the_replies() {
        let mut flight = Flight::default();
        let mut out = Vec::new();
        assert!(flight.has_room(Transfer::Data));
        flight
            .submit(1, plan(&[0, 1]), &[false, false], body(), None, &mut out)
            .unwrap();
        assert_eq!(
            lines(&mut out),
            [
                "MAIL FROM:<s@example.org>",
                "RCPT TO:<r0@example.com>",
                "RCPT TO:<r1@example.com>",
                "DATA"
            ]
        );
        // Only one DATA may wait for its go-ahead.
        assert!(!flight.has_room(Transfer::Data));
        assert_eq!(flight.next_stage(), Some(Stage::MailFrom));
        let steps = feed(&mut flight, &["250 ok", "250 ok", "550 5.1.1 no such user"]);
        assert_eq!(steps, [Step::Wait, Step::Wait, Step::Wait]);
        assert_eq!(flight.next_stage(), Some(Stage::Data));
        assert_eq!(feed(&mut flight, &["354 go"]), [Step::Body(Some(body()))]);
        assert!(flight.has_room(Transfer::Data));
        assert_eq!(flight.next_stage(), Some(Stage::EndOfData));

        // The next message goes out behind the body: no RSET needed.
        flight
            .submit(2, plan(&[3]), &[false], body(), None, &mut out)
            .unwrap();
        assert_eq!(
            lines(&mut out),
            [
                "MAIL FROM:<s@example.org>",
                "RCPT TO:<r3@example.com>",
                "DATA"
            ]
        );
        // Message 1's end of data and message 2's replies, in one read.
        let steps = feed(&mut flight, &["250 2.0.0 queued as A", "250 ok", "250 ok"]);
        assert_eq!(
            steps[0],
            Step::Done(
                1,
                vec![
                    delivered(0, "250 2.0.0 queued as A"),
                    failed(1, "5.1.1", "550 5.1.1 no such user"),
                ]
            )
        );
        assert_eq!(steps[1..], [Step::Wait, Step::Wait]);
        assert_eq!(feed(&mut flight, &["354 go"]), [Step::Body(Some(body()))]);
        let steps = feed(&mut flight, &["554 5.7.1 spam"]);
        assert_eq!(
            steps,
            [Step::Done(2, vec![failed(3, "5.7.1", "554 5.7.1 spam")])]
        );
        assert!(flight.is_empty());
        assert_eq!(flight.next_stage(), None);
    }

    #[test]
    fn a_transaction_left_open_is_reset_before_the_next() {
        let mut flight = Flight::default();
        let mut out = Vec::new();
        // MAIL refused: it speaks for every recipient; the 503s say nothing.
        flight
            .submit(1, plan(&[0, 1]), &[false, false], body(), None, &mut out)
            .unwrap();
        out.clear();
        let steps = feed(
            &mut flight,
            &[
                "451 4.3.0 try later",
                "503 5.5.1 need MAIL",
                "503 5.5.1 need MAIL",
                "503 5.5.1 need MAIL",
            ],
        );
        let deferred = |i| {
            (
                i,
                Outcome::Deferred {
                    status: Status::transient(3, 0),
                    reply: "451 4.3.0 try later".into(),
                },
            )
        };
        assert_eq!(steps[3], Step::Done(1, vec![deferred(0), deferred(1)]));
        flight
            .submit(2, plan(&[0]), &[false], body(), None, &mut out)
            .unwrap();
        assert_eq!(lines(&mut out)[0], "RSET");
        assert_eq!(flight.next_stage(), Some(Stage::Rset));
        // Every recipient refused, and DATA refused: RSET again.
        let steps = feed(
            &mut flight,
            &[
                "250 reset",
                "250 ok",
                "550 5.1.1 no",
                "554 5.5.1 no recipients",
            ],
        );
        assert_eq!(
            steps[3],
            Step::Done(2, vec![failed(0, "5.1.1", "550 5.1.1 no")])
        );
        flight
            .submit(3, plan(&[0]), &[false], body(), None, &mut out)
            .unwrap();
        assert_eq!(lines(&mut out)[0], "RSET");
        // A 354 nobody should have given gets only the dot; its reply is moot.
        let steps = feed(
            &mut flight,
            &["250 reset", "250 ok", "550 5.1.1 no", "354 go"],
        );
        assert_eq!(steps[3], Step::Body(None));
        let steps = feed(&mut flight, &["554 5.5.1 no valid recipients"]);
        assert_eq!(
            steps,
            [Step::Done(3, vec![failed(0, "5.1.1", "550 5.1.1 no")])]
        );
        // The dot ended that transaction: no RSET.
        flight
            .submit(4, plan(&[0]), &[false], body(), None, &mut out)
            .unwrap();
        assert!(lines(&mut out)[0].starts_with("MAIL"), "the dot ended it");
    }

    #[test]
    fn chunking_keeps_many_messages_in_flight_and_a_refusal_stays_with_its_message() {
        let mut flight = Flight::default();
        let mut out = Vec::new();
        for ticket in 1..=3 {
            assert!(flight.has_room(Transfer::Chunking));
            flight
                .submit(
                    ticket,
                    plan(&[0]),
                    &[ticket == 3],
                    body(),
                    Some(19),
                    &mut out,
                )
                .unwrap();
        }
        assert_eq!(
            lines(&mut out),
            [
                "MAIL FROM:<s@example.org>",
                "RCPT TO:<r0@example.com>",
                "BDAT 19 LAST",
                "RSET",
                "MAIL FROM:<s@example.org>",
                "RCPT TO:<r0@example.com>",
                "BDAT 19 LAST",
                "RSET",
                "MAIL FROM:<s@example.org>",
                "RCPT TO:<r0@example.com>",
                "BDAT 19 LAST",
            ]
        );
        // All replies in one packet.
        let steps = feed(
            &mut flight,
            &[
                "250 ok",
                "250 ok",
                "250 2.0.0 queued as A",
                "250 reset",
                "250 ok",
                "250 ok",
                "552 5.3.4 too big",
                "250 reset",
                "250 ok",
                "250 ok",
                "250 2.0.0 queued as C",
            ],
        );
        let done: Vec<&Step> = steps.iter().filter(|s| **s != Step::Wait).collect();
        assert_eq!(
            done,
            [
                &Step::Done(1, vec![delivered(0, "250 2.0.0 queued as A")]),
                &Step::Done(2, vec![failed(0, "5.3.4", "552 5.3.4 too big")]),
                &Step::Done(
                    3,
                    vec![(
                        0,
                        Outcome::Delivered {
                            reply: "250 2.0.0 queued as C".into(),
                            relayed: true
                        }
                    )]
                ),
            ]
        );
        // Everything sent is complete: the next starts without RSET.
        flight
            .submit(4, plan(&[0]), &[false], body(), Some(19), &mut out)
            .unwrap();
        assert!(lines(&mut out)[0].starts_with("MAIL"));
    }

    #[test]
    fn chunking_room_is_bounded_by_messages_bytes_and_replies() {
        let mut flight = Flight::default();
        let mut out = Vec::new();
        for ticket in 0..WINDOW as u64 {
            assert!(flight.has_room(Transfer::Chunking), "{ticket}");
            flight
                .submit(ticket, plan(&[0]), &[false], body(), Some(19), &mut out)
                .unwrap();
        }
        assert!(!flight.has_room(Transfer::Chunking));

        // Bytes: one big message may go alone, but nothing joins it.
        let mut flight = Flight::default();
        let big = Arc::new(vec![b'x'; MAX_BYTES as usize]);
        flight
            .submit(0, plan(&[0]), &[false], big, Some(MAX_BYTES), &mut out)
            .unwrap();
        assert!(!flight.has_room(Transfer::Chunking));
        feed(&mut flight, &["250 ok", "250 ok", "250 ok"]);
        assert!(flight.is_empty());
        assert!(
            flight.has_room(Transfer::Chunking),
            "its bytes are released"
        );

        let mut flight = Flight::default();
        let many: Vec<usize> = (0..MAX_DUE).collect();
        flight
            .submit(
                0,
                plan(&many),
                &vec![false; MAX_DUE],
                body(),
                Some(19),
                &mut out,
            )
            .unwrap();
        assert!(!flight.has_room(Transfer::Chunking));
        assert_eq!(flight.abort(), [0]);
        assert!(flight.is_empty());
        assert!(flight.has_room(Transfer::Chunking));
    }

    #[test]
    fn nothing_to_send_is_settled_at_once() {
        let mut flight = Flight::default();
        let mut out = Vec::new();
        let mut p = plan(&[]);
        p.settled = vec![
            failed(1, "5.6.7", "needs SMTPUTF8"),
            failed(0, "5.6.7", "x"),
        ];
        let settled = flight
            .submit(9, p, &[], body(), None, &mut out)
            .unwrap_err();
        assert_eq!(settled[0].0, 0, "sorted by index");
        assert!(out.is_empty());
        assert!(flight.is_empty());
    }

    #[test]
    fn replies_out_of_place_end_the_session() {
        let cases: [(&[&str], Stage); 4] = [
            (&["354 what"], Stage::MailFrom),
            (&["250 ok", "354 what"], Stage::RcptTo),
            (&["250 ok", "250 ok", "250 data?"], Stage::Data),
            (
                &["250 ok", "250 ok", "354 go", "354 again"],
                Stage::EndOfData,
            ),
        ];
        for (replies, stage) in cases {
            let mut flight = Flight::default();
            flight
                .submit(1, plan(&[0]), &[false], body(), None, &mut Vec::new())
                .unwrap();
            let (last, first) = replies.split_last().unwrap();
            feed(&mut flight, first);
            match flight.on_reply(&reply(last)) {
                Err(SessionError::Protocol { stage: s, .. }) => assert_eq!(s, stage),
                other => panic!("{replies:?}: {other:?}"),
            }
            assert_eq!(flight.abort(), [1]);
        }
        let mut flight = Flight::default();
        flight
            .submit(1, plan(&[0]), &[false], body(), Some(3), &mut Vec::new())
            .unwrap();
        feed(&mut flight, &["250 ok", "250 ok"]);
        assert!(flight.on_reply(&reply("354 go")).is_err());
        assert!(
            Flight::default().on_reply(&reply("250 ok")).is_err(),
            "a reply nobody asked for"
        );
        let mut flight = Flight {
            rset: true,
            ..Flight::default()
        };
        flight
            .submit(1, plan(&[0]), &[false], body(), None, &mut Vec::new())
            .unwrap();
        assert!(matches!(
            flight.on_reply(&reply("500 what")),
            Err(SessionError::Rejected {
                stage: Stage::Rset,
                ..
            })
        ));
    }
}
