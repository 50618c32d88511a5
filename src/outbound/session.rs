//! The byte level of a client session, generic over the stream so plain TCP,
//! TLS and in-memory pipes run the same code: send a command (or a whole
//! pipelined batch), read the next complete reply, each within a time limit.
//!
//! A 421 is turned into an error right here, whatever was asked: RFC 5321 §3.8
//! lets a server say it at any point, and after it the session is over.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::{SessionError, Stage};
use super::outcome::Class;
use super::reply::{self, Reply};

/// A reply longer than this is not an SMTP server talking; stop reading.
const MAX_REPLY: usize = 64 * 1024;
const READ_CHUNK: usize = 8 * 1024;

pub(crate) struct Session<S> {
    stream: S,
    /// Bytes read that are not yet part of a parsed reply. Only ever more than
    /// one reply's worth while pipelined replies arrive together.
    input: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub(crate) fn new(stream: S) -> Session<S> {
        Session {
            stream,
            input: Vec::new(),
        }
    }

    /// The stream and whatever was read past the last reply (STARTTLS must
    /// refuse such bytes: they could be an attacker's injected replies).
    pub(crate) fn into_parts(self) -> (S, Vec<u8>) {
        (self.stream, self.input)
    }

    pub(crate) async fn send(
        &mut self,
        bytes: &[u8],
        limit: Duration,
        stage: Stage,
    ) -> Result<(), SessionError> {
        if stage != Stage::Body {
            tracing::debug!(%stage, command = %String::from_utf8_lossy(bytes).trim_end(), "to next hop");
        }
        let write = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(limit, write).await {
            Err(_) => Err(SessionError::Timeout { stage }),
            Ok(Err(source)) => Err(SessionError::Io { stage, source }),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Sends one command and reads its reply, each within `limit`.
    pub(crate) async fn command(
        &mut self,
        line: &str,
        limit: Duration,
        stage: Stage,
    ) -> Result<Reply, SessionError> {
        self.send(line.as_bytes(), limit, stage).await?;
        self.read_reply(limit, stage).await
    }

    pub(crate) async fn read_reply(
        &mut self,
        limit: Duration,
        stage: Stage,
    ) -> Result<Reply, SessionError> {
        self.read_reply_raw(limit, stage)
            .await
            .map(|(reply, _)| reply)
    }

    /// The next reply, parsed and as it came (EHLO needs the raw lines).
    pub(crate) async fn read_reply_raw(
        &mut self,
        limit: Duration,
        stage: Stage,
    ) -> Result<(Reply, Vec<u8>), SessionError> {
        let raw = match tokio::time::timeout(limit, self.next_raw(stage)).await {
            Err(_) => return Err(SessionError::Timeout { stage }),
            Ok(raw) => raw?,
        };
        let reply =
            reply::parse(&raw).map_err(|reason| SessionError::Protocol { stage, reason })?;
        tracing::debug!(%stage, %reply, "from next hop");
        match reply.class() {
            Class::Closing { .. } => Err(SessionError::Rejected { stage, reply }),
            Class::Malformed => Err(SessionError::Protocol {
                stage,
                reason: format!("not a reply code: {reply}"),
            }),
            _ => Ok((reply, raw)),
        }
    }

    async fn next_raw(&mut self, stage: Stage) -> Result<Vec<u8>, SessionError> {
        loop {
            if let Some(end) = reply::reply_end(&self.input) {
                let rest = self.input.split_off(end);
                return Ok(std::mem::replace(&mut self.input, rest));
            }
            if self.input.len() > MAX_REPLY {
                return Err(SessionError::Protocol {
                    stage,
                    reason: format!("reply longer than {MAX_REPLY} bytes"),
                });
            }
            let len = self.input.len();
            self.input.resize(len + READ_CHUNK, 0);
            let read = self.stream.read(&mut self.input[len..]).await;
            self.input.truncate(len + *read.as_ref().unwrap_or(&0));
            match read {
                Ok(0) => return Err(SessionError::Closed { stage }),
                Ok(_) => {}
                Err(source) => return Err(SessionError::Io { stage, source }),
            }
        }
    }

    /// Closes our side, politely for TLS (close_notify); errors do not matter.
    pub(crate) async fn close(&mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.stream.shutdown()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn reads_replies_that_arrive_in_pieces_or_together() {
        let (client, mut server) = tokio::io::duplex(64);
        let mut session = Session::new(client);
        let peer = tokio::spawn(async move {
            for piece in [
                &b"25"[..],
                b"0-first\r",
                b"\n250 2.0.0 second\r\n354 go\r\n",
            ] {
                server.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            server
        });
        let a = session.read_reply(SECOND, Stage::Ehlo).await.unwrap();
        assert_eq!((a.code, a.text.as_str()), (250, "first\nsecond"));
        let b = session.read_reply(SECOND, Stage::Data).await.unwrap();
        assert_eq!(b.code, 354);
        let _server = peer.await.unwrap();
        assert!(session.into_parts().1.is_empty());
    }

    #[tokio::test]
    async fn a_421_anywhere_ends_the_session() {
        let (client, mut server) = tokio::io::duplex(64);
        server
            .write_all(b"421 4.4.2 idle too long\r\n")
            .await
            .unwrap();
        let mut session = Session::new(client);
        let e = session.read_reply(SECOND, Stage::RcptTo).await.unwrap_err();
        assert!(matches!(
            e,
            SessionError::Rejected {
                stage: Stage::RcptTo,
                ..
            }
        ));
        assert!(!e.unreachable());
    }

    #[tokio::test]
    async fn eof_garbage_and_silence_are_errors() {
        let (client, server) = tokio::io::duplex(64);
        drop(server);
        let e = Session::new(client)
            .read_reply(SECOND, Stage::MailFrom)
            .await
            .unwrap_err();
        assert!(matches!(e, SessionError::Closed { .. }), "{e}");

        let (client, mut server) = tokio::io::duplex(64);
        server.write_all(b"HTTP/1.1 400 Bad\r\n").await.unwrap();
        let e = Session::new(client)
            .read_reply(SECOND, Stage::Greeting)
            .await
            .unwrap_err();
        assert!(matches!(e, SessionError::Protocol { .. }), "{e}");

        let (client, _server) = tokio::io::duplex(64);
        let e = Session::new(client)
            .read_reply(Duration::from_millis(20), Stage::Greeting)
            .await
            .unwrap_err();
        assert!(matches!(e, SessionError::Timeout { .. }), "{e}");
        assert!(e.unreachable());
    }
}
