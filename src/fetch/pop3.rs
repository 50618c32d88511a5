//! A small POP3 client (RFC 1939, STLS from RFC 2595): just what a fetch
//! needs. USER/PASS, UIDL and LIST to see what is there, RETR, DELE, QUIT.
//! Deletions take effect only at QUIT, so a session that breaks off deletes
//! nothing (and the spool's marks keep what was stored from being stored
//! twice).

use std::collections::HashMap;
use std::net::IpAddr;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::net::{self, TIMEOUT};
use super::{FetchError, Listed};
use crate::config::{FetchConfig, FetchTls};
use crate::outbound::tls::Stream;

pub(super) struct Pop3 {
    io: BufReader<Stream>,
    /// The server's address.
    pub(super) peer: Option<IpAddr>,
    /// Largest message body read into memory; a bigger one breaks the session.
    max_size: u64,
    /// The server takes several commands before answering (CAPA PIPELINING).
    pipelining: bool,
}

/// Commands sent before their replies are read, when pipelining.
const PIPELINE: usize = 64;

impl Pop3 {
    /// Connected, TLS as configured, and logged in.
    pub(super) async fn open(
        account: &FetchConfig,
        password: &str,
        max_size: u64,
    ) -> Result<Pop3, FetchError> {
        let stream = net::connect(account).await?;
        let mut pop = Pop3 {
            peer: net::peer(&stream),
            io: BufReader::new(stream),
            max_size,
            pipelining: false,
        };
        pop.status().await?;
        if account.tls == FetchTls::Starttls {
            pop.command("STLS").await?;
            let stream = net::upgrade(pop.io.into_inner(), account).await?;
            pop.io = BufReader::new(stream);
        }
        pop.send(&format!("USER {}", account.username)).await?;
        pop.status().await.map_err(auth_failed)?;
        pop.send(&format!("PASS {password}")).await?;
        pop.status().await.map_err(auth_failed)?;
        pop.pipelining = pop.capabilities().await?.iter().any(|c| c == "PIPELINING");
        Ok(pop)
    }

    /// CAPA (RFC 2449): the capability names; none if the server lacks CAPA.
    async fn capabilities(&mut self) -> Result<Vec<String>, FetchError> {
        match self.command("CAPA").await {
            Ok(()) => {}
            Err(FetchError::Refused(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        }
        Ok(self
            .text_lines()
            .await?
            .iter()
            .filter_map(|line| line.split_whitespace().next())
            .map(str::to_ascii_uppercase)
            .collect())
    }

    /// Every message with its unique ID and size.
    pub(super) async fn list(&mut self) -> Result<Vec<Listed>, FetchError> {
        self.command("UIDL").await.map_err(|e| match e {
            FetchError::Refused(why) => FetchError::Protocol(format!(
                "the server does not support UIDL ({why}); without it a message cannot be recognised again"
            )),
            other => other,
        })?;
        let uids = self.lines().await?;
        self.command("LIST").await?;
        let sizes: HashMap<u32, u64> = self
            .lines()
            .await?
            .iter()
            .filter_map(|(n, rest)| Some((*n, rest.parse().ok()?)))
            .collect();
        Ok(uids
            .into_iter()
            .filter(|(_, uid)| !uid.is_empty())
            .map(|(number, uid)| Listed {
                size: sizes.get(&number).copied().unwrap_or(0),
                number,
                uid,
            })
            .collect())
    }

    /// The message's bytes, dot-unstuffed, with CRLF line ends.
    pub(super) async fn retrieve(&mut self, message: &Listed) -> Result<Vec<u8>, FetchError> {
        self.command(&format!("RETR {}", message.number)).await?;
        let mut out = Vec::with_capacity(message.size as usize);
        let mut line = Vec::new();
        loop {
            line.clear();
            self.read_line(&mut line).await?;
            if line == b".\r\n" || line == b".\n" {
                return Ok(out);
            }
            let content = line.strip_prefix(b".").unwrap_or(&line);
            out.extend_from_slice(content);
            if out.len() as u64 > self.max_size.saturating_mul(2) {
                return Err(FetchError::Protocol(format!(
                    "message {} is larger than its listed size",
                    message.number
                )));
            }
        }
    }

    /// DELE for each (pipelined when the server offers PIPELINING, RFC
    /// 2449); they take effect at QUIT.
    pub(super) async fn delete(&mut self, messages: &[Listed]) -> Result<(), FetchError> {
        if !self.pipelining {
            for message in messages {
                self.command(&format!("DELE {}", message.number)).await?;
            }
            return Ok(());
        }
        for chunk in messages.chunks(PIPELINE) {
            let lines: String = chunk
                .iter()
                .map(|m| format!("DELE {}\r\n", m.number))
                .collect();
            self.send(lines.trim_end()).await?;
            for _ in chunk {
                self.status().await?;
            }
        }
        Ok(())
    }

    /// QUIT: the deletions take effect.
    pub(super) async fn quit(mut self) -> Result<(), FetchError> {
        self.command("QUIT").await
    }

    async fn command(&mut self, line: &str) -> Result<(), FetchError> {
        self.send(line).await?;
        self.status().await
    }

    async fn send(&mut self, line: &str) -> Result<(), FetchError> {
        let io = self.io.get_mut();
        let write = async {
            io.write_all(format!("{line}\r\n").as_bytes()).await?;
            io.flush().await
        };
        match tokio::time::timeout(TIMEOUT, write).await {
            Err(_) => Err(FetchError::Protocol("timed out sending a command".into())),
            Ok(r) => r.map_err(|e| FetchError::Protocol(e.to_string())),
        }
    }

    /// One status line: `+OK` or the server's `-ERR` text as `Refused`.
    async fn status(&mut self) -> Result<(), FetchError> {
        let mut line = Vec::new();
        self.read_line(&mut line).await?;
        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
        if text.starts_with("+OK") {
            Ok(())
        } else if let Some(why) = text.strip_prefix("-ERR") {
            Err(FetchError::Refused(why.trim().to_owned()))
        } else {
            Err(FetchError::Protocol(format!("unexpected reply {text:?}")))
        }
    }

    /// A multi-line listing: `number rest` per line, up to the lone dot.
    async fn lines(&mut self) -> Result<Vec<(u32, String)>, FetchError> {
        Ok(self
            .text_lines()
            .await?
            .iter()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                Some((words.next()?.parse().ok()?, words.next()?.to_owned()))
            })
            .collect())
    }

    /// The lines of a multi-line answer up to the lone dot, without line ends.
    async fn text_lines(&mut self) -> Result<Vec<String>, FetchError> {
        let mut out = Vec::new();
        let mut line = Vec::new();
        loop {
            line.clear();
            self.read_line(&mut line).await?;
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end();
            if text == "." {
                return Ok(out);
            }
            out.push(text.to_owned());
        }
    }

    async fn read_line(&mut self, line: &mut Vec<u8>) -> Result<(), FetchError> {
        match tokio::time::timeout(TIMEOUT, self.io.read_until(b'\n', line)).await {
            Err(_) => Err(FetchError::Protocol(
                "timed out waiting for the server".into(),
            )),
            Ok(Err(e)) => Err(FetchError::Protocol(e.to_string())),
            Ok(Ok(0)) => Err(FetchError::Protocol(
                "the server closed the connection".into(),
            )),
            Ok(Ok(_)) => Ok(()),
        }
    }
}

/// A refusal of USER or PASS is an authentication failure.
fn auth_failed(e: FetchError) -> FetchError {
    match e {
        FetchError::Refused(why) => FetchError::Auth(why),
        other => other,
    }
}
