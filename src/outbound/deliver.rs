//! One mail transaction on an open connection: MAIL, RCPT for each recipient,
//! DATA, the body, and a result per recipient. With PIPELINING (RFC 2920) the
//! commands up to DATA go out in one write and the replies are read in order;
//! without it, one command per round trip, stopping early when MAIL fails or
//! no recipient was accepted.
//!
//! This file decides nothing about the message's future: it reports what the
//! next hop said. A 421 or a lost connection anywhere is an `Err`, since then
//! nothing is known for sure about any recipient.

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::Connection;
use super::body::DotStuffer;
use super::error::{SessionError, Stage};
use super::mail;
use super::outcome::{Class, Outcome};
use super::reply::Reply;
use crate::spool::{Envelope, Notify};

/// How much of the body goes into one write (each write has its own
/// `data_block` time limit).
const BLOCK: usize = 64 * 1024;

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Delivers `body` to the listed recipients of `envelope` (indexes into
    /// `envelope.recipients`) and returns an outcome for each, ordered by index.
    /// After an `Err` the connection is unusable; after `Ok`, call
    /// [`Connection::reset`] before the next message.
    pub async fn deliver(
        &mut self,
        envelope: &Envelope,
        body: &[u8],
        recipients: &[usize],
    ) -> Result<Vec<(usize, Outcome)>, SessionError> {
        if self.broken {
            return Err(SessionError::Unusable);
        }
        let result = self.transaction(envelope, body, recipients).await;
        if result.is_err() {
            self.broken = true;
        }
        result.map(|mut outcomes| {
            outcomes.sort_by_key(|(i, _)| *i);
            outcomes
        })
    }

    async fn transaction(
        &mut self,
        envelope: &Envelope,
        body: &[u8],
        recipients: &[usize],
    ) -> Result<Vec<(usize, Outcome)>, SessionError> {
        let plan = mail::plan(envelope, body.len() as u64, &self.caps, recipients);
        let mut outcomes = plan.settled;
        if plan.rcpts.is_empty() {
            return Ok(outcomes);
        }
        let replies = if self.caps.pipelining {
            self.pipelined(&plan.mail_from, &plan.rcpts).await?
        } else {
            self.lockstep(&plan.mail_from, &plan.rcpts).await?
        };

        if replies.mail.class() != Class::Success {
            // MAIL refused: its reply speaks for every recipient.
            let outcome = refusal(&replies.mail, Stage::MailFrom)?;
            outcomes.extend(plan.rcpts.iter().map(|(i, _)| (*i, outcome.clone())));
            self.abandon(replies.data).await;
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
        let data = match replies.data {
            Some(data) if !accepted.is_empty() => data,
            data => {
                self.abandon(data).await;
                return Ok(outcomes);
            }
        };
        if data.class() != Class::Intermediate {
            let outcome = refusal(&data, Stage::Data)?;
            outcomes.extend(accepted.iter().map(|i| (*i, outcome.clone())));
            self.abandon(None).await;
            return Ok(outcomes);
        }

        self.send_body(body).await?;
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

    /// MAIL, every RCPT and DATA in one write; then their replies, in order.
    async fn pipelined(
        &mut self,
        mail_from: &str,
        rcpts: &[(usize, String)],
    ) -> Result<Replies, SessionError> {
        let t = self.timeouts;
        let mut batch = String::with_capacity(mail_from.len() + 64 * rcpts.len() + 6);
        batch.push_str(mail_from);
        for (_, line) in rcpts {
            batch.push_str(line);
        }
        batch.push_str("DATA\r\n");
        self.session
            .send(batch.as_bytes(), t.command, Stage::MailFrom)
            .await?;
        let mail = self.session.read_reply(t.command, Stage::MailFrom).await?;
        let mut replies = Vec::with_capacity(rcpts.len());
        for _ in rcpts {
            replies.push(self.session.read_reply(t.command, Stage::RcptTo).await?);
        }
        let data = self.session.read_reply(t.data_init, Stage::Data).await?;
        Ok(Replies {
            mail,
            rcpts: replies,
            data: Some(data),
        })
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

    async fn send_body(&mut self, body: &[u8]) -> Result<(), SessionError> {
        let limit = self.timeouts.data_block;
        let mut stuffer = DotStuffer::new();
        let mut out = Vec::with_capacity(BLOCK + BLOCK / 8);
        for piece in body.chunks(BLOCK) {
            stuffer.feed(piece, &mut out);
            if out.len() >= BLOCK {
                self.session.send(&out, limit, Stage::Body).await?;
                out.clear();
            }
        }
        stuffer.finish(&mut out);
        self.session.send(&out, limit, Stage::Body).await
    }

    /// Leaves a transaction that will carry no message, so the connection can
    /// carry the next one. A 354 nobody should have given (a pipelined DATA
    /// after every RCPT failed) gets an empty body ended at once. The outcomes
    /// are known by now, so a failure here only retires the connection.
    async fn abandon(&mut self, data: Option<Reply>) {
        let t = self.timeouts;
        let result = async {
            if data.is_some_and(|d| d.class() == Class::Intermediate) {
                self.session
                    .send(b".\r\n", t.data_block, Stage::Body)
                    .await?;
                self.session
                    .read_reply(t.data_end, Stage::EndOfData)
                    .await?;
            }
            let reply = self
                .session
                .command("RSET\r\n", t.command, Stage::Rset)
                .await?;
            if reply.class() == Class::Success {
                Ok(())
            } else {
                Err(SessionError::Rejected {
                    stage: Stage::Rset,
                    reply,
                })
            }
        }
        .await;
        if let Err(e) = result {
            debug!(hop = %self.hop.name, error = %e, "cannot reset the session; retiring it");
            self.broken = true;
        }
    }
}

/// The replies of one transaction up to DATA. `rcpts` may be shorter than the
/// recipients sent (lockstep stops after a refused MAIL); `data` is `None`
/// when DATA was not sent.
struct Replies {
    mail: Reply,
    rcpts: Vec<Reply>,
    data: Option<Reply>,
}

/// The outcome of a refusal; a reply that is neither success nor refusal
/// where one was due (a 354 to RCPT, a 250 to DATA) means the peer does not
/// follow the protocol, and nothing it said can be trusted.
fn refusal(reply: &Reply, stage: Stage) -> Result<Outcome, SessionError> {
    reply.refusal().ok_or_else(|| SessionError::Protocol {
        stage,
        reason: format!("unexpected reply {reply}"),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    use super::super::{Capabilities, Hop, Timeouts};
    use super::*;
    use crate::spool::{BodyType, Client, QueueId, RcptStatus, Recipient, Ret};

    fn envelope(rcpts: &[&str]) -> Envelope {
        Envelope {
            id: QueueId(1),
            sender: "s@example.org".into(),
            ret: Ret::Unset,
            envid: None,
            body_type: BodyType::Unset,
            smtputf8: false,
            has_8bit: false,
            arrived_ms: 0,
            size: 0,
            client: Client {
                ip: "192.0.2.7".parse().unwrap(),
                helo: "c.example.org".into(),
                tls: false,
            },
            recipients: rcpts
                .iter()
                .map(|a| Recipient {
                    address: (*a).into(),
                    orcpt: None,
                    notify: Notify::default(),
                    status: RcptStatus::Queued,
                    attempts: 0,
                    next_attempt_ms: 0,
                    last_reply: None,
                    unreachable: false,
                    delay_notified: false,
                })
                .collect(),
        }
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
    async fn pipelined_all_refused_gets_the_dot_and_rset_and_stays_usable() {
        // A server that answers DATA with 354 even though no RCPT was accepted.
        let (mut conn, peer) = connection(
            PIPELINING,
            vec![
                "250 ok\r\n",
                "550 5.1.1 no\r\n",
                "354 go ahead anyway\r\n",
                "554 5.5.1 no recipients\r\n",
                "250 reset\r\n",
            ],
        )
        .await;
        assert!(conn.capabilities().pipelining);
        let outcomes = conn
            .deliver(&envelope(&["a@x.test"]), b"hi\r\n", &[0])
            .await
            .unwrap();
        assert!(
            matches!(&outcomes[..], [(0, Outcome::Failed { status, .. })] if status == "5.1.1")
        );
        assert!(conn.is_usable());
        drop(conn);
        assert_eq!(
            peer.await.unwrap(),
            [
                "EHLO us.test",
                "MAIL FROM:<s@example.org>",
                "RCPT TO:<a@x.test>",
                "DATA",
                "RSET"
            ]
        );
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
                    status: "4.3.0".into(),
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
        let outcomes = conn.deliver(&env, b"caf\xc3\xa9\r\n", &[0]).await.unwrap();
        assert!(
            matches!(&outcomes[..], [(0, Outcome::Failed { status, .. })] if status == "5.6.3")
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
