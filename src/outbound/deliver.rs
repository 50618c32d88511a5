//! Mail transactions on an open connection. With PIPELINING (RFC 2920) a
//! connection carries several messages at once: [`Connection::submit`] hands
//! one over (its commands are buffered, and with CHUNKING its content too),
//! [`Connection::advance`] sends what is buffered and reads replies until a
//! message's outcome is complete; `pipeline.rs` keeps the books. Without
//! PIPELINING, each message is one command per round trip, stopping early when
//! MAIL fails or no recipient was accepted.
//!
//! This file decides nothing about the message's future: it reports what the
//! next hop said. A 421 or a lost connection anywhere fails every message whose
//! outcome was not complete yet, since nothing is known for sure about them.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::Connection;
use super::body::{self, DotStuffer};
use super::error::{SessionError, Stage};
use super::mail::{self, EightBit};
use super::outcome::{Class, Outcome};
use super::pipeline::{Step, Ticket, Transfer, refusal};
use super::reply::Reply;
use super::{downgrade, lines};
use crate::spool::{Envelope, Notify};

/// How much goes into one write (each write has its own `data_block` time
/// limit); commands and small bodies collect in the buffer up to this size.
const BLOCK: usize = 64 * 1024;

/// What [`Connection::advance`] found.
#[derive(Debug)]
pub enum Progress {
    /// A message's last reply came: its outcome per recipient, by index.
    Done {
        ticket: Ticket,
        outcomes: Vec<(usize, Outcome)>,
    },
    /// There is room for another message before the next reply is read.
    Room,
    /// Nothing is in flight.
    Idle,
    /// The session failed; nothing is known about these messages (defer them).
    /// The connection can carry no more mail.
    Failed {
        tickets: Vec<Ticket>,
        error: SessionError,
    },
}

/// What was changed in messages on their way to the next hop, for the
/// metrics: counted per message submitted, whether or not it was accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Lines longer than the limit, broken (see `lines.rs`).
    pub lines_broken: u64,
    /// Messages whose declared 8-bit MIME was converted to 7-bit.
    pub converted: u64,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// What was changed in transit since the last call.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// The content as it goes to this next hop: declared 8-bit MIME made
    /// 7-bit if the hop lacks 8BITMIME, then over-long lines broken. The
    /// stored body itself is returned (no copy) when nothing changes.
    fn content(&mut self, envelope: &Envelope, body: Arc<Vec<u8>>) -> (Arc<Vec<u8>>, EightBit) {
        let (body, eight_bit) = if mail::needs_8bitmime(envelope) && !self.caps.eightbitmime {
            match downgrade::to_7bit(&body) {
                Ok(converted) => {
                    self.changes.converted += 1;
                    (Arc::new(converted), EightBit::Converted)
                }
                // Refused in the plan: nothing is sent.
                Err(why) => return (body, EightBit::Unconvertible(why.to_string())),
            }
        } else {
            (body, EightBit::AsStored)
        };
        match lines::break_long(&body, self.line_limit) {
            Some((broken, count)) => {
                self.changes.lines_broken += count as u64;
                (broken, eight_bit)
            }
            None => (body, eight_bit),
        }
    }

    /// Delivers one message and waits for its outcome: [`Connection::submit`]
    /// and [`Connection::advance`] for a connection that carries one message
    /// at a time. Outcomes are ordered by index; after an `Err` the
    /// connection is unusable.
    pub async fn deliver(
        &mut self,
        envelope: &Envelope,
        body: &[u8],
        recipients: &[usize],
    ) -> Result<Vec<(usize, Outcome)>, SessionError> {
        if self.broken {
            return Err(SessionError::Unusable);
        }
        let wanted = self
            .submit(envelope, Arc::new(body.to_vec()), recipients)
            .await;
        loop {
            match self.advance().await {
                Progress::Done { ticket, outcomes } if ticket == wanted => return Ok(outcomes),
                Progress::Done { .. } | Progress::Room => {}
                Progress::Idle => return Err(SessionError::Unusable),
                Progress::Failed { error, .. } => return Err(error),
            }
        }
    }

    /// Whether another message may be submitted before [`Connection::advance`]
    /// reads a reply.
    pub fn has_room(&self) -> bool {
        !self.broken
            && self.failure.is_none()
            && match self.transfer() {
                Some(transfer) => self.flight.has_room(transfer),
                // Each submit runs a whole transaction: collect its outcome first.
                None => self.ready.is_empty(),
            }
    }

    /// Hands over a message for the listed recipients of `envelope` (indexes
    /// into `envelope.recipients`). Its outcome comes out of
    /// [`Connection::advance`] under the returned ticket, as does a failure.
    pub async fn submit(
        &mut self,
        envelope: &Envelope,
        body: Arc<Vec<u8>>,
        recipients: &[usize],
    ) -> Ticket {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        if self.broken || self.failure.is_some() {
            self.lost.push(ticket);
            self.failure.get_or_insert(SessionError::Unusable);
            return ticket;
        }
        let (body, eight_bit) = self.content(envelope, body);
        let Some(transfer) = self.transfer() else {
            let result = self
                .lockstep_transaction(envelope, &body, &eight_bit, recipients)
                .await;
            match result {
                Ok(mut outcomes) => {
                    outcomes.sort_by_key(|(i, _)| *i);
                    self.ready.push_back((ticket, outcomes));
                }
                Err(error) => self.fail(error, Some(ticket)),
            }
            return ticket;
        };
        let content = match transfer {
            Transfer::Chunking => Some(body::crlf_clean(&body)),
            Transfer::Data => None,
        };
        let chunk = content.as_ref().map(|c| c.len() as u64);
        let plan = mail::plan_with(
            envelope,
            body.len() as u64,
            &eight_bit,
            &self.caps,
            recipients,
        );
        let relayed: Vec<bool> = plan
            .rcpts
            .iter()
            .map(|&(i, _)| envelope.recipients[i].notify.has(Notify::SUCCESS) && !self.caps.dsn)
            .collect();
        let submitted =
            self.flight
                .submit(ticket, plan, &relayed, body.clone(), chunk, &mut self.out);
        match submitted {
            Err(settled) => self.ready.push_back((ticket, settled)),
            Ok(()) => {
                if let Some(content) = content {
                    let sent = self.buffer(&content).await;
                    if let Err(error) = sent {
                        self.fail(error, None);
                    }
                }
            }
        }
        ticket
    }

    /// Sends what is buffered now, so the round trip runs while the caller
    /// prepares the next message. A failure comes out of the next
    /// [`Connection::advance`].
    pub async fn send(&mut self) {
        if self.failure.is_none()
            && let Err(error) = self.flush().await
        {
            self.fail(error, None);
        }
    }

    /// Sends what is buffered and reads replies until a message's outcome is
    /// complete, or (DATA) a 354 made room for the next message's commands to
    /// go out with this one's body.
    pub async fn advance(&mut self) -> Progress {
        if let Some((ticket, outcomes)) = self.ready.pop_front() {
            return Progress::Done { ticket, outcomes };
        }
        if let Some(failed) = self.take_failure() {
            return failed;
        }
        if self.flight.is_empty() {
            return Progress::Idle;
        }
        match self.exchange().await {
            Ok(Some((ticket, outcomes))) => Progress::Done { ticket, outcomes },
            Ok(None) => Progress::Room,
            Err(error) => {
                self.fail(error, None);
                self.take_failure().expect("just failed")
            }
        }
    }

    /// The failure and every message it took down, once.
    fn take_failure(&mut self) -> Option<Progress> {
        let error = self.failure.take()?;
        let mut tickets = std::mem::take(&mut self.lost);
        tickets.extend(self.flight.abort());
        tickets.sort_unstable();
        Some(Progress::Failed { tickets, error })
    }

    /// How content travels, or `None` for one command per round trip.
    fn transfer(&self) -> Option<Transfer> {
        match (self.caps.pipelining, self.caps.chunking) {
            (false, _) => None,
            (true, false) => Some(Transfer::Data),
            (true, true) => Some(Transfer::Chunking),
        }
    }

    /// Marks the session failed; `ticket`: a message not in the flight that
    /// fails with it.
    fn fail(&mut self, error: SessionError, ticket: Option<Ticket>) {
        debug!(hop = %self.hop.name, %error, "session failed");
        self.broken = true;
        self.lost.extend(ticket);
        self.failure.get_or_insert(error);
    }

    /// One turn of the pipeline: flush, then read replies until one completes
    /// a message (`Some`) or asks for a body (`None`, after buffering it).
    async fn exchange(&mut self) -> Result<Option<(Ticket, Vec<(usize, Outcome)>)>, SessionError> {
        self.flush().await?;
        loop {
            let stage = self.flight.next_stage().unwrap_or(Stage::Quit);
            let limit = match stage {
                Stage::Data => self.timeouts.data_init,
                Stage::EndOfData | Stage::Bdat => self.timeouts.data_end,
                _ => self.timeouts.command,
            };
            let reply = self.session.read_reply(limit, stage).await?;
            match self.flight.on_reply(&reply)? {
                Step::Wait => {}
                Step::Done(ticket, outcomes) => return Ok(Some((ticket, outcomes))),
                Step::Body(body) => {
                    self.stuff(body.as_deref().map(Vec::as_slice)).await?;
                    return Ok(None);
                }
            }
        }
    }

    /// Writes whatever is buffered.
    async fn flush(&mut self) -> Result<(), SessionError> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        let sent = self
            .session
            .send(&out, self.timeouts.data_block, Stage::Body)
            .await;
        self.out = out;
        self.out.clear();
        sent
    }

    /// Appends bytes to the buffer, writing full blocks as they fill.
    async fn buffer(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        for piece in bytes.chunks(BLOCK) {
            self.out.extend_from_slice(piece);
            if self.out.len() >= BLOCK {
                self.flush().await?;
            }
        }
        Ok(())
    }

    /// Buffers a body after 354, dot-stuffed, and the final dot; `None`: only
    /// the dot (a transaction that carries nothing).
    async fn stuff(&mut self, body: Option<&[u8]>) -> Result<(), SessionError> {
        let mut stuffer = DotStuffer::new();
        for piece in body.unwrap_or_default().chunks(BLOCK) {
            stuffer.feed(piece, &mut self.out);
            if self.out.len() >= BLOCK {
                self.flush().await?;
            }
        }
        stuffer.finish(&mut self.out);
        Ok(())
    }

    /// One transaction without PIPELINING.
    async fn lockstep_transaction(
        &mut self,
        envelope: &Envelope,
        body: &[u8],
        eight_bit: &EightBit,
        recipients: &[usize],
    ) -> Result<Vec<(usize, Outcome)>, SessionError> {
        let plan = mail::plan_with(
            envelope,
            body.len() as u64,
            eight_bit,
            &self.caps,
            recipients,
        );
        let mut outcomes = plan.settled;
        if plan.rcpts.is_empty() {
            return Ok(outcomes);
        }
        let replies = self.lockstep(&plan.mail_from, &plan.rcpts).await?;

        if replies.mail.class() != Class::Success {
            // MAIL refused: its reply speaks for every recipient.
            let outcome = refusal(&replies.mail, Stage::MailFrom)?;
            outcomes.extend(plan.rcpts.iter().map(|(i, _)| (*i, outcome.clone())));
            self.abandon().await;
            return Ok(outcomes);
        }
        let mut accepted = Vec::new();
        for ((i, _), reply) in plan.rcpts.iter().zip(&replies.rcpts) {
            if reply.class() == Class::Success {
                accepted.push(*i);
            } else {
                outcomes.push((*i, refusal(reply, Stage::RcptTo)?));
            }
        }
        let Some(data) = replies.data else {
            self.abandon().await;
            return Ok(outcomes);
        };
        if data.class() != Class::Intermediate {
            let outcome = refusal(&data, Stage::Data)?;
            outcomes.extend(accepted.iter().map(|i| (*i, outcome.clone())));
            self.abandon().await;
            return Ok(outcomes);
        }

        self.stuff(Some(body)).await?;
        self.flush().await?;
        let end = self
            .session
            .read_reply(self.timeouts.data_end, Stage::EndOfData)
            .await?;
        if end.class() == Class::Success {
            let reply = end.to_string();
            outcomes.extend(accepted.iter().map(|&i| {
                let notify = envelope.recipients[i].notify;
                (
                    i,
                    Outcome::Delivered {
                        reply: reply.clone(),
                        relayed: notify.has(Notify::SUCCESS) && !self.caps.dsn,
                    },
                )
            }));
        } else {
            let outcome = refusal(&end, Stage::EndOfData)?;
            outcomes.extend(accepted.iter().map(|i| (*i, outcome.clone())));
        }
        Ok(outcomes)
    }

    /// One command per round trip. Stops after a refused MAIL, and sends no
    /// DATA when no recipient was accepted.
    async fn lockstep(
        &mut self,
        mail_from: &str,
        rcpts: &[(usize, String)],
    ) -> Result<Replies, SessionError> {
        let t = self.timeouts;
        let mail = self
            .session
            .command(mail_from, t.command, Stage::MailFrom)
            .await?;
        let mut replies = Vec::with_capacity(rcpts.len());
        if mail.class() != Class::Success {
            return Ok(Replies {
                mail,
                rcpts: replies,
                data: None,
            });
        }
        for (_, line) in rcpts {
            replies.push(self.session.command(line, t.command, Stage::RcptTo).await?);
        }
        let data = if replies.iter().any(|r| r.class() == Class::Success) {
            Some(
                self.session
                    .command("DATA\r\n", t.data_init, Stage::Data)
                    .await?,
            )
        } else {
            None
        };
        Ok(Replies {
            mail,
            rcpts: replies,
            data,
        })
    }

    /// Leaves a transaction that will carry no message (RSET), so the
    /// connection can carry the next one. The outcomes are known by now, so a
    /// failure here only retires the connection.
    async fn abandon(&mut self) {
        if let Err(e) = self.reset().await {
            debug!(hop = %self.hop.name, error = %e, "cannot reset the session; retiring it");
        }
    }
}

/// The replies of one lockstep transaction up to DATA. `rcpts` may be shorter
/// than the recipients sent (it stops after a refused MAIL); `data` is `None`
/// when DATA was not sent.
struct Replies {
    mail: Reply,
    rcpts: Vec<Reply>,
    data: Option<Reply>,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    use super::super::{Capabilities, Hop, Timeouts};
    use super::*;
    use crate::spool::testing;
    use crate::status::Status;

    fn envelope(rcpts: &[&str]) -> Envelope {
        testing::envelope("s@example.org", rcpts)
    }

    /// A connection over an in-memory pipe to a peer that answers the n-th
    /// command line with the n-th reply (ignoring message data) and reports
    /// the command lines it saw.
    async fn connection(
        ehlo: &'static str,
        replies: Vec<&'static str>,
    ) -> (
        Connection<tokio::io::DuplexStream>,
        tokio::task::JoinHandle<Vec<String>>,
    ) {
        let (client, server) = tokio::io::duplex(1 << 16);
        let peer = tokio::spawn(async move {
            let (read, mut write) = tokio::io::split(server);
            let mut lines = BufReader::new(read).lines();
            write.write_all(b"220 peer.test\r\n").await.unwrap();
            let mut seen = Vec::new();
            let mut in_data = false;
            let mut replies = std::iter::once(ehlo).chain(replies);
            while let Ok(Some(line)) = lines.next_line().await {
                if in_data {
                    if line != "." {
                        continue;
                    }
                } else {
                    seen.push(line.clone());
                }
                let Some(reply) = replies.next() else { break };
                in_data = reply.starts_with("354");
                write.write_all(reply.as_bytes()).await.unwrap();
            }
            seen
        });
        let hop = Hop {
            name: "peer.test".into(),
            addr: "127.0.0.1:25".parse().unwrap(),
        };
        let conn = Connection::start(client, hop, "us.test", Timeouts::uniform(SECOND))
            .await
            .unwrap();
        (conn, peer)
    }

    const SECOND: Duration = Duration::from_secs(1);
    const PIPELINING: &str = "250-peer.test\r\n250 PIPELINING\r\n";
    const PLAIN: &str = "250 peer.test\r\n";

    #[tokio::test]
    async fn pipelined_all_refused_gets_the_dot_and_stays_usable() {
        // A server that answers DATA with 354 even though no RCPT was accepted.
        let (mut conn, peer) = connection(
            PIPELINING,
            vec![
                "250 ok\r\n",
                "550 5.1.1 no\r\n",
                "354 go ahead anyway\r\n",
                "554 5.5.1 no recipients\r\n",
            ],
        )
        .await;
        assert!(conn.capabilities().pipelining);
        let outcomes = conn
            .deliver(&envelope(&["a@x.test"]), b"hi\r\n", &[0])
            .await
            .unwrap();
        assert!(
            matches!(&outcomes[..], [(0, Outcome::Failed { status, .. })] if *status == Status::NO_SUCH_MAILBOX)
        );
        assert!(conn.is_usable());
        drop(conn);
        assert_eq!(
            peer.await.unwrap(),
            [
                "EHLO us.test",
                "MAIL FROM:<s@example.org>",
                "RCPT TO:<a@x.test>",
                "DATA"
            ]
        );
    }

    #[tokio::test]
    async fn a_421_mid_pipeline_fails_exactly_the_unanswered_messages() {
        let (mut conn, peer) = connection(
            PIPELINING,
            vec![
                "250 ok\r\n",
                "250 ok\r\n",
                "354 go\r\n",
                "250 2.0.0 first\r\n",
                "250 ok\r\n",
                "250 ok\r\n",
                "354 go\r\n",
                "421 4.3.2 shutting down\r\n",
            ],
        )
        .await;
        let body = Arc::new(b"hi\r\n".to_vec());
        let env = envelope(&["a@x.test"]);
        let first = conn.submit(&env, body.clone(), &[0]).await;
        assert!(!conn.has_room(), "one DATA waits for its 354 at a time");
        assert!(matches!(conn.advance().await, Progress::Room));
        let second = conn.submit(&env, body.clone(), &[0]).await;
        let third_in_line = loop {
            match conn.advance().await {
                Progress::Done { ticket, outcomes } => {
                    assert_eq!(ticket, first);
                    assert!(matches!(&outcomes[..], [(0, Outcome::Delivered { .. })]));
                }
                Progress::Room => break conn.submit(&env, body.clone(), &[0]).await,
                other => panic!("{other:?}"),
            }
        };
        match conn.advance().await {
            Progress::Failed { tickets, error } => {
                assert_eq!(tickets, [second, third_in_line]);
                assert!(error.to_string().contains("421"), "{error}");
            }
            other => panic!("{other:?}"),
        }
        assert!(!conn.is_usable());
        assert!(matches!(conn.advance().await, Progress::Idle));
        drop(conn);
        let seen = peer.await.unwrap();
        let mails = seen.iter().filter(|l| l.starts_with("MAIL")).count();
        assert_eq!(mails, 3, "{seen:?}");
        assert!(!seen.iter().any(|l| l == "RSET"), "{seen:?}");
    }

    #[tokio::test]
    async fn lockstep_mail_refused_speaks_for_everyone() {
        let (mut conn, peer) =
            connection(PLAIN, vec!["451 4.3.0 try later\r\n", "250 reset\r\n"]).await;
        let outcomes = conn
            .deliver(&envelope(&["a@x.test", "b@x.test"]), b"hi\r\n", &[1, 0])
            .await
            .unwrap();
        let deferred = |i| {
            (
                i,
                Outcome::Deferred {
                    status: Status::transient(3, 0),
                    reply: "451 4.3.0 try later".into(),
                },
            )
        };
        assert_eq!(outcomes, [deferred(0), deferred(1)]);
        drop(conn);
        assert_eq!(
            peer.await.unwrap(),
            ["EHLO us.test", "MAIL FROM:<s@example.org>", "RSET"]
        );
    }

    #[tokio::test]
    async fn a_reply_out_of_place_is_a_protocol_error_and_retires_the_connection() {
        let (mut conn, _peer) = connection(PLAIN, vec!["250 ok\r\n", "354 what?\r\n"]).await;
        let e = conn
            .deliver(&envelope(&["a@x.test"]), b"hi\r\n", &[0])
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                SessionError::Protocol {
                    stage: Stage::RcptTo,
                    ..
                }
            ),
            "{e}"
        );
        assert!(!conn.is_usable());
        assert!(matches!(
            conn.deliver(&envelope(&["a@x.test"]), b"hi\r\n", &[0])
                .await,
            Err(SessionError::Unusable)
        ));
        assert!(matches!(conn.reset().await, Err(SessionError::Unusable)));
    }

    #[tokio::test]
    async fn settled_recipients_send_nothing() {
        let (mut conn, peer) = connection(PLAIN, vec![]).await;
        let mut env = envelope(&["a@x.test"]);
        env.has_8bit = true;
        env.body_type = crate::spool::BodyType::EightBitMime;
        // 8-bit in a header: no conversion to 7-bit can help.
        let outcomes = conn
            .deliver(&env, b"Subject: caf\xc3\xa9\r\n\r\nx\r\n", &[0])
            .await
            .unwrap();
        assert!(
            matches!(&outcomes[..], [(0, Outcome::Failed { status, .. })] if status.to_string() == "5.6.3")
        );
        assert_eq!(
            conn.capabilities(),
            Capabilities::default(),
            "a bare EHLO reply offers nothing"
        );
        drop(conn);
        assert_eq!(peer.await.unwrap(), ["EHLO us.test"]);
    }
}
