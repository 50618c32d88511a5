//! Why a session with a next hop ended early. Every variant is temporary for
//! the mail involved (the caller defers each recipient of the message); what the
//! variants tell apart is whether the primary looks down, which is what the
//! scheduler's "down, probe it" state hangs on.

use std::fmt;
use std::net::SocketAddr;

use super::reply::Reply;

/// Where in the session something went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Connect,
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    TlsHandshake,
    MailFrom,
    RcptTo,
    Data,
    /// Sending the message itself, after 354.
    Body,
    /// Waiting for the reply to the final dot.
    EndOfData,
    /// Waiting for the reply to `BDAT n LAST` (RFC 3030).
    Bdat,
    Rset,
    Quit,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Connect => "connect",
            Stage::Greeting => "greeting",
            Stage::Ehlo => "EHLO",
            Stage::Helo => "HELO",
            Stage::StartTls => "STARTTLS",
            Stage::TlsHandshake => "TLS handshake",
            Stage::MailFrom => "MAIL FROM",
            Stage::RcptTo => "RCPT TO",
            Stage::Data => "DATA",
            Stage::Body => "message body",
            Stage::EndOfData => "end of data",
            Stage::Bdat => "BDAT",
            Stage::Rset => "RSET",
            Stage::Quit => "QUIT",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Refused, unreachable network, and the like.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out at {stage}")]
    Timeout { stage: Stage },
    /// The peer closed the connection where a reply was due.
    #[error("connection closed by the peer at {stage}")]
    Closed { stage: Stage },
    /// Reset, broken pipe and other errors of an established connection.
    #[error("connection lost at {stage}: {source}")]
    Io {
        stage: Stage,
        #[source]
        source: std::io::Error,
    },
    /// A reply that ends the session: a 421 anywhere, a refused greeting, EHLO
    /// and HELO both refused, STARTTLS refused when TLS is required.
    #[error("{stage} answered: {reply}")]
    Rejected { stage: Stage, reply: Reply },
    #[error("the next hop does not offer STARTTLS and TLS is required")]
    TlsNotOffered,
    /// The handshake failed, or the certificate did not verify (policy `verify`).
    #[error("TLS failed: {reason}")]
    Tls { reason: String },
    /// Bytes that are no SMTP reply, or a reply that makes no sense where it came.
    #[error("protocol error at {stage}: {reason}")]
    Protocol { stage: Stage, reason: String },
    /// An earlier error left the session in an unknown state; the connection
    /// must be dropped.
    #[error("the connection failed earlier and cannot carry more mail")]
    Unusable,
}

impl SessionError {
    /// The primary looks down rather than busy or picky: nothing listens, nothing
    /// greets, or it greets with 421. A listener that accepts and closes without
    /// a word counts as down too. Once past the greeting, the server is up, even
    /// if this session failed.
    pub fn unreachable(&self) -> bool {
        match self {
            SessionError::Connect { .. } => true,
            SessionError::Timeout { stage }
            | SessionError::Closed { stage }
            | SessionError::Io { stage, .. } => {
                matches!(stage, Stage::Connect | Stage::Greeting)
            }
            SessionError::Rejected { stage, reply } => {
                *stage == Stage::Greeting && reply.code == 421
            }
            _ => false,
        }
    }

    /// The next hop's reply that ended the session, if one did.
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            SessionError::Rejected { reply, .. } => Some(reply),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_to_reach_a_greeting_server_mean_down() {
        let reply = |code| Reply {
            code,
            enhanced: None,
            text: "bye".into(),
        };
        let refused = SessionError::Connect {
            addr: "127.0.0.1:25".parse().unwrap(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        };
        let cases = [
            (refused, true),
            (
                SessionError::Timeout {
                    stage: Stage::Connect,
                },
                true,
            ),
            (
                SessionError::Timeout {
                    stage: Stage::Greeting,
                },
                true,
            ),
            (
                SessionError::Closed {
                    stage: Stage::Greeting,
                },
                true,
            ),
            (
                SessionError::Rejected {
                    stage: Stage::Greeting,
                    reply: reply(421),
                },
                true,
            ),
            (
                SessionError::Rejected {
                    stage: Stage::Greeting,
                    reply: reply(554),
                },
                false,
            ),
            (
                SessionError::Rejected {
                    stage: Stage::RcptTo,
                    reply: reply(421),
                },
                false,
            ),
            (
                SessionError::Timeout {
                    stage: Stage::EndOfData,
                },
                false,
            ),
            (SessionError::Closed { stage: Stage::Ehlo }, false),
            (
                SessionError::Tls {
                    reason: "bad".into(),
                },
                false,
            ),
            (SessionError::Unusable, false),
        ];
        for (error, down) in cases {
            assert_eq!(error.unreachable(), down, "{error}");
        }
    }

    #[test]
    fn names_the_stage_and_the_reply() {
        let e = SessionError::Rejected {
            stage: Stage::Greeting,
            reply: Reply {
                code: 421,
                enhanced: Some("4.3.2".into()),
                text: "maintenance".into(),
            },
        };
        assert_eq!(e.to_string(), "greeting answered: 421 4.3.2 maintenance");
        assert_eq!(e.reply().map(|r| r.code), Some(421));
        assert_eq!(SessionError::Unusable.reply(), None);
    }
}
