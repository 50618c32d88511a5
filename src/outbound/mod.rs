//! (5) SMTP out: how a message reaches the next hop. Given a hop (a name and an
//! address, chosen by the router) this module connects, greets, negotiates
//! STARTTLS per policy, and delivers messages over the same connection,
//! several at once where the next hop pipelines, returning an [`Outcome`] per
//! recipient of each.
//!
//! It never resolves DNS, never reads the clock, never touches the spool and
//! never decides when to retry: the caller owns all of that. A [`SessionError`]
//! means "nothing is known about any recipient of this attempt"; the caller
//! defers them all.
//!
//! - `session.rs`: bytes on the stream, replies in, 421 ends everything.
//! - `reply.rs`, `outcome.rs`: parsing replies and what they mean (pure).
//! - `mail.rs`: the MAIL/RCPT lines and the checks before them (pure).
//! - `body.rs`: dot-stuffing, CRLF-clean content for BDAT (pure).
//! - `lines.rs`, `downgrade.rs`: what is changed in transit so the next hop
//!   takes the message: over-long lines broken, declared 8-bit MIME made
//!   7-bit for a hop without 8BITMIME (pure).
//! - `pipeline.rs`: messages in flight and which reply answers what (pure).
//! - `tls.rs`: the stream type and rustls configuration.
//! - `deliver.rs`: submitting messages and reading their outcomes.
//! - `fuzz.rs`: entry points for the fuzz targets in `fuzz/` (not an API).
//! - this file: connecting, greeting, EHLO/HELO, STARTTLS, RSET, QUIT.

mod body;
mod deliver;
mod downgrade;
mod error;
#[doc(hidden)]
pub mod fuzz;
mod lines;
mod mail;
mod outcome;
mod pipeline;
mod reply;
mod session;
pub(crate) mod tls;
pub mod xtext;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::{debug, warn};

pub use deliver::{Changes, Progress};
pub use error::{SessionError, Stage};
pub use outcome::{Class, Outcome, classify};
pub use pipeline::Ticket;
pub use reply::Reply;
pub use tls::Stream;

use crate::config::TlsPolicy;
use crate::status::Status;
use session::Session;

/// Where to deliver: the name the router found (used for TLS verification, SNI
/// and DSNs' `Remote-MTA`) and the address to connect to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Hop {
    pub name: String,
    pub addr: SocketAddr,
}

/// How long to wait for each step. The defaults are RFC 5321 §4.5.3.2's: a
/// slow primary is not a dead one, and giving up early only duplicates mail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub greeting: Duration,
    /// EHLO, HELO, STARTTLS (and the handshake after it), MAIL, RCPT, RSET, QUIT.
    pub command: Duration,
    /// The reply to DATA.
    pub data_init: Duration,
    /// Each block of the message written to the socket.
    pub data_block: Duration,
    /// The reply to the final dot: the server may be scanning or storing.
    pub data_end: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        let minutes = |m: u64| Duration::from_secs(60 * m);
        Timeouts {
            connect: Duration::from_secs(30),
            greeting: minutes(5),
            command: minutes(5),
            data_init: minutes(2),
            data_block: minutes(3),
            data_end: minutes(10),
        }
    }
}

impl Timeouts {
    /// The same limit for every step; tests use it to fail fast.
    pub fn uniform(limit: Duration) -> Timeouts {
        Timeouts {
            connect: limit,
            greeting: limit,
            command: limit,
            data_init: limit,
            data_block: limit,
            data_end: limit,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Settings {
    /// Our name in EHLO/HELO.
    pub helo_name: String,
    pub tls: TlsPolicy,
    /// Trusted in addition to the system's roots under [`TlsPolicy::Verify`]
    /// (a private CA; the tests' CA).
    pub extra_roots: Vec<CertificateDer<'static>>,
    pub timeouts: Timeouts,
    /// `delivery.line_length_limit`: lines longer than this many octets
    /// (CRLF not counted) are broken before they go; 0: never.
    pub line_length_limit: usize,
}

/// RFC 5321 §4.5.3.1.6: 1,000 octets with CRLF.
pub const LINE_LENGTH_LIMIT: usize = 998;

impl Settings {
    /// RFC timeouts and no extra roots.
    pub fn new(helo_name: impl Into<String>, tls: TlsPolicy) -> Settings {
        Settings {
            helo_name: helo_name.into(),
            tls,
            extra_roots: Vec::new(),
            timeouts: Timeouts::default(),
            line_length_limit: LINE_LENGTH_LIMIT,
        }
    }
}

/// What the next hop offers, as far as our rules care.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub eightbitmime: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub pipelining: bool,
    /// `CHUNKING` (RFC 3030): content may go as `BDAT n LAST`, without waiting
    /// for a go-ahead. Used only together with PIPELINING.
    pub chunking: bool,
    /// `SIZE` was offered, with its limit in bytes; 0 means no fixed limit.
    pub size: Option<u64>,
    pub starttls: bool,
    /// The session runs over TLS (after STARTTLS).
    pub tls: bool,
}

/// An open SMTP session with a next hop, ready for a transaction.
pub struct Connection<S = Stream> {
    session: Session<S>,
    hop: Hop,
    caps: Capabilities,
    timeouts: Timeouts,
    /// An error left the session in an unknown state; it must not carry mail.
    broken: bool,
    /// Messages whose commands went out and whose replies are still due.
    flight: pipeline::Flight,
    /// Commands and content not yet written: a pipelined group goes out as
    /// one write.
    out: Vec<u8>,
    /// Outcomes known without waiting for a reply (every recipient settled
    /// before sending, or a lockstep transaction), to hand out in order.
    ready: VecDeque<(Ticket, Vec<(usize, Outcome)>)>,
    /// The error that ended the session, until it is reported with the
    /// messages it took down.
    failure: Option<SessionError>,
    /// Messages that failed with the session outside the flight.
    lost: Vec<Ticket>,
    next_ticket: Ticket,
    /// See [`Settings::line_length_limit`].
    line_limit: usize,
    /// What was changed in transit since [`Connection::take_changes`].
    changes: Changes,
}

/// Connects to `hop` and makes the session ready for mail: greeting, EHLO (HELO
/// if EHLO is refused) and STARTTLS as `settings.tls` says. Under
/// `Opportunistic`, a failed handshake costs one reconnect, and the new session
/// stays in plain text.
pub async fn connect(hop: &Hop, settings: &Settings) -> Result<Connection, SessionError> {
    let starttls = settings.tls != TlsPolicy::None;
    match open(hop, settings, starttls).await {
        Err(SessionError::Tls { reason }) if settings.tls == TlsPolicy::Opportunistic => {
            warn!(hop = %hop.name, addr = %hop.addr, %reason,
                "TLS handshake failed; reconnecting without STARTTLS");
            open(hop, settings, false).await
        }
        other => other,
    }
}

/// Whether the primary is up: connect (with the configured TLS, so "up" means
/// "a delivery could start"), EHLO, QUIT.
pub async fn probe(hop: &Hop, settings: &Settings) -> Result<(), SessionError> {
    connect(hop, settings).await?.quit().await;
    Ok(())
}

/// Asks `hop` whether it has a mailbox for `address` (a callout): MAIL FROM:<>,
/// RCPT TO, then QUIT, no message. `Some(true)`: accepted; `Some(false)`: "no
/// such user" (5.1.1); `None`: any other answer, which proves nothing.
pub async fn verify(
    hop: &Hop,
    settings: &Settings,
    address: &str,
) -> Result<Option<bool>, SessionError> {
    let mut conn = connect(hop, settings).await?;
    let verdict = conn.ask_rcpt(address).await;
    conn.quit().await;
    verdict
}

async fn open(hop: &Hop, settings: &Settings, starttls: bool) -> Result<Connection, SessionError> {
    let timeouts = settings.timeouts;
    let tcp = match tokio::time::timeout(timeouts.connect, TcpStream::connect(hop.addr)).await {
        Err(_) => {
            return Err(SessionError::Timeout {
                stage: Stage::Connect,
            });
        }
        Ok(Err(source)) => {
            return Err(SessionError::Connect {
                addr: hop.addr,
                source,
            });
        }
        Ok(Ok(tcp)) => tcp,
    };
    // Commands are small and each waits for a reply: don't let Nagle hold them.
    let _ = tcp.set_nodelay(true);
    let mut conn = Connection::start(
        Stream::Plain(tcp),
        hop.clone(),
        &settings.helo_name,
        timeouts,
    )
    .await?;
    conn.line_limit = settings.line_length_limit;
    if !starttls {
        return Ok(conn);
    }
    let must = matches!(settings.tls, TlsPolicy::Required | TlsPolicy::Verify);
    if !conn.caps.starttls {
        if must {
            conn.quit().await;
            return Err(SessionError::TlsNotOffered);
        }
        return Ok(conn);
    }
    let reply = conn
        .session
        .command("STARTTLS\r\n", timeouts.command, Stage::StartTls)
        .await?;
    if reply.code != 220 {
        if must {
            conn.quit().await;
            return Err(SessionError::Rejected {
                stage: Stage::StartTls,
                reply,
            });
        }
        debug!(hop = %hop.name, %reply, "STARTTLS refused; staying in plain text");
        return Ok(conn);
    }
    conn.start_tls(settings).await
}

impl Connection<Stream> {
    /// The handshake after a 220 to STARTTLS, then EHLO afresh: what the server
    /// offered in plain text no longer counts (RFC 3207 §4.2).
    async fn start_tls(self, settings: &Settings) -> Result<Connection, SessionError> {
        let Connection {
            session,
            hop,
            timeouts,
            ..
        } = self;
        let (stream, early) = session.into_parts();
        let Stream::Plain(tcp) = stream else {
            return Err(SessionError::Protocol {
                stage: Stage::StartTls,
                reason: "STARTTLS on a session that already runs TLS".into(),
            });
        };
        if !early.is_empty() {
            // Bytes after the 220, before any handshake: an injection attempt
            // (CVE-2011-0411 in reverse) or a broken server. Never read them.
            return Err(SessionError::Tls {
                reason: "the server sent data after its STARTTLS reply".into(),
            });
        }
        let tls = tls::handshake(tcp, &hop, settings).await?;
        debug!(hop = %hop.name, "TLS established");
        let mut conn = Connection::new(Session::new(Stream::Tls(Box::new(tls))), hop, timeouts);
        conn.hello(&settings.helo_name).await?;
        conn.caps.tls = true;
        conn.line_limit = settings.line_length_limit;
        Ok(conn)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Greeting and EHLO over a stream that is already open: everything of
    /// [`connect`] but TCP and TLS.
    pub(crate) async fn start(
        stream: S,
        hop: Hop,
        helo_name: &str,
        timeouts: Timeouts,
    ) -> Result<Connection<S>, SessionError> {
        let mut session = Session::new(stream);
        let greeting = session
            .read_reply(timeouts.greeting, Stage::Greeting)
            .await?;
        if greeting.code != 220 {
            return Err(SessionError::Rejected {
                stage: Stage::Greeting,
                reply: greeting,
            });
        }
        let mut conn = Connection::new(session, hop, timeouts);
        conn.hello(helo_name).await?;
        Ok(conn)
    }

    fn new(session: Session<S>, hop: Hop, timeouts: Timeouts) -> Connection<S> {
        Connection {
            session,
            hop,
            caps: Capabilities::default(),
            timeouts,
            broken: false,
            flight: pipeline::Flight::default(),
            out: Vec::new(),
            ready: VecDeque::new(),
            failure: None,
            lost: Vec::new(),
            next_ticket: 0,
            line_limit: LINE_LENGTH_LIMIT,
            changes: Changes::default(),
        }
    }

    /// EHLO, or HELO when EHLO gets a 5xx (an RFC 821 server): then no
    /// extensions at all.
    async fn hello(&mut self, helo_name: &str) -> Result<(), SessionError> {
        let limit = self.timeouts.command;
        self.session
            .send(
                format!("EHLO {helo_name}\r\n").as_bytes(),
                limit,
                Stage::Ehlo,
            )
            .await?;
        let (reply, raw) = self.session.read_reply_raw(limit, Stage::Ehlo).await?;
        match reply.class() {
            Class::Success => {
                self.caps = reply::capabilities(&raw);
                Ok(())
            }
            Class::Permanent { .. } => {
                let reply = self
                    .session
                    .command(&format!("HELO {helo_name}\r\n"), limit, Stage::Helo)
                    .await?;
                if reply.class() != Class::Success {
                    return Err(SessionError::Rejected {
                        stage: Stage::Helo,
                        reply,
                    });
                }
                self.caps = Capabilities::default();
                Ok(())
            }
            _ => Err(SessionError::Rejected {
                stage: Stage::Ehlo,
                reply,
            }),
        }
    }

    /// What the next hop offers (from its latest EHLO), and whether TLS is on.
    pub fn capabilities(&self) -> Capabilities {
        self.caps
    }

    /// The hop's name as the router gave it.
    pub fn remote_name(&self) -> &str {
        &self.hop.name
    }

    /// False once an error (even one inside an otherwise finished delivery,
    /// such as a failed RSET) left the session in an unknown state.
    pub fn is_usable(&self) -> bool {
        !self.broken
    }

    /// RSET, so the connection can carry the next message.
    pub async fn reset(&mut self) -> Result<(), SessionError> {
        if self.broken {
            return Err(SessionError::Unusable);
        }
        let result = match self
            .session
            .command("RSET\r\n", self.timeouts.command, Stage::Rset)
            .await
        {
            Ok(reply) if reply.class() == Class::Success => Ok(()),
            Ok(reply) => Err(SessionError::Rejected {
                stage: Stage::Rset,
                reply,
            }),
            Err(e) => Err(e),
        };
        self.broken = result.is_err();
        result
    }

    /// The RCPT half of a transaction, for [`verify`].
    async fn ask_rcpt(&mut self, address: &str) -> Result<Option<bool>, SessionError> {
        let limit = self.timeouts.command;
        let utf8 = !address.is_ascii();
        if utf8 && !self.caps.smtputf8 {
            return Ok(None);
        }
        let mail = if utf8 {
            "MAIL FROM:<> SMTPUTF8\r\n"
        } else {
            "MAIL FROM:<>\r\n"
        };
        let reply = self.session.command(mail, limit, Stage::MailFrom).await;
        self.broken = reply.is_err();
        if reply?.class() != Class::Success {
            return Ok(None);
        }
        let reply = self
            .session
            .command(&format!("RCPT TO:<{address}>\r\n"), limit, Stage::RcptTo)
            .await;
        self.broken = reply.is_err();
        let reply = reply?;
        Ok(match reply.class() {
            Class::Success => Some(true),
            Class::Permanent { status } if status == Status::NO_SUCH_MAILBOX => Some(false),
            _ => None,
        })
    }

    /// QUIT and close. Errors are ignored: the mail is settled either way.
    /// Messages still in flight are abandoned (their outcomes never read);
    /// callers finish them with [`Connection::advance`] first.
    pub async fn quit(mut self) {
        let limit = self.timeouts.command;
        if !self.broken && self.flight.is_empty() {
            let _ = self.session.command("QUIT\r\n", limit, Stage::Quit).await;
        }
        self.session.close(limit).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn default_timeouts_are_rfc_5321s() {
        let t = Timeouts::default();
        assert_eq!(t.connect, Duration::from_secs(30));
        assert_eq!(t.greeting, Duration::from_secs(300));
        assert_eq!(t.command, Duration::from_secs(300));
        assert_eq!(t.data_init, Duration::from_secs(120));
        assert_eq!(t.data_block, Duration::from_secs(180));
        assert_eq!(t.data_end, Duration::from_secs(600));
        let settings = Settings::new("mx2.example.net", TlsPolicy::Opportunistic);
        assert_eq!(settings.timeouts, t);
        assert!(settings.extra_roots.is_empty());
        assert_eq!(settings.line_length_limit, 998);
    }

    /// A peer that answers each line it reads with the next canned reply and
    /// returns the lines it read.
    fn scripted(
        server: tokio::io::DuplexStream,
        greeting: &'static str,
        replies: Vec<&'static str>,
    ) -> tokio::task::JoinHandle<Vec<String>> {
        tokio::spawn(async move {
            let (read, mut write) = tokio::io::split(server);
            let mut lines = BufReader::new(read).lines();
            write.write_all(greeting.as_bytes()).await.unwrap();
            let mut seen = Vec::new();
            for reply in replies {
                let Ok(Some(line)) = lines.next_line().await else {
                    break;
                };
                seen.push(line);
                write.write_all(reply.as_bytes()).await.unwrap();
            }
            seen
        })
    }

    fn hop() -> Hop {
        Hop {
            name: "mx.test".into(),
            addr: "127.0.0.1:25".parse().unwrap(),
        }
    }

    #[tokio::test]
    async fn falls_back_to_helo_when_ehlo_is_refused() {
        let (client, server) = tokio::io::duplex(1024);
        let peer = scripted(
            server,
            "220 old.test SMTP\r\n",
            vec![
                "502 5.5.2 what?\r\n",
                "250 old.test\r\n",
                "221 2.0.0 bye\r\n",
            ],
        );
        let conn = Connection::start(client, hop(), "us.test", Timeouts::uniform(SECOND))
            .await
            .unwrap();
        assert_eq!(conn.capabilities(), Capabilities::default());
        assert_eq!(conn.remote_name(), "mx.test");
        conn.quit().await;
        assert_eq!(
            peer.await.unwrap(),
            ["EHLO us.test", "HELO us.test", "QUIT"]
        );
    }

    #[tokio::test]
    async fn a_refused_greeting_or_helo_is_an_error() {
        let (client, server) = tokio::io::duplex(1024);
        let _peer = scripted(server, "554 5.3.2 not here\r\n", vec![]);
        let e = Connection::start(client, hop(), "us.test", Timeouts::uniform(SECOND))
            .await
            .err()
            .unwrap();
        assert!(matches!(
            e,
            SessionError::Rejected {
                stage: Stage::Greeting,
                ..
            }
        ));
        assert!(!e.unreachable());

        let (client, server) = tokio::io::duplex(1024);
        let _peer = scripted(
            server,
            "220 x\r\n",
            vec!["500 no\r\n", "501 5.5.4 no either\r\n"],
        );
        let e = Connection::start(client, hop(), "us.test", Timeouts::uniform(SECOND))
            .await
            .err()
            .unwrap();
        assert_eq!(e.to_string(), "HELO answered: 501 5.5.4 no either");
    }
}
