//! The SMTP conversation as a pure state machine: `(state, command line, policy)
//! -> (reply, step)`. No I/O, no clock, no spool: the connection shell in
//! `conn.rs` reads lines, asks this what to say, and performs the steps (read the
//! data, commit, flush the queue, close).

mod bdat;
mod data;
mod ehlo;
mod etrn;
mod mail;
mod params;
mod rcpt;

use std::net::IpAddr;

use smtp_proto::{Error as ParseError, Request};

use self::bdat::{Chunk, Chunks, bdat_not_offered, is_bdat};
use self::ehlo::ehlo_reply;
use super::data::Data;
use super::dnsbl::Blocked;
use super::policy::Policy;
use super::reply::Reply;
use super::spf::Spf;
pub use crate::knowledge::Knowledge;
use crate::spool::{BodyType, Recipient, Ret};
use crate::status::Rejection;

/// Errors a client may make before we hang up (Postfix's `smtpd_hard_error_limit`).
pub const MAX_ERRORS: u32 = 20;

/// What the connection must do after a command.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send the reply and read the next command.
    Reply(Reply),
    /// Send the reply (354), then read message data and call [`Session::finish_data`].
    Data(Reply),
    /// Read exactly `size` octets of BDAT content, handing them to
    /// [`Session::chunk`] as they arrive, then reply as [`Session::end_chunk`]
    /// says. The octets are read even when the chunk is refused.
    Chunk { size: u64 },
    /// Send the reply, then ask the scheduler to release `domain`'s mail.
    Etrn { domain: String, reply: Reply },
    /// Send the reply and close the connection.
    Close(Reply),
    /// Send the reply (220), drop any input already buffered, and start the
    /// TLS handshake; the conversation starts over inside TLS.
    StartTls(Reply),
    /// Nothing changed: ask the primary about this never-seen recipient (a
    /// callout), then give the same command again with the answer known and
    /// no callout allowed.
    Verify(String),
}

/// Where the session stands with TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tls {
    /// No `[tls]` configured: STARTTLS is neither offered nor accepted.
    Unavailable,
    /// Offered in EHLO, not started.
    Offered,
    /// The session runs inside TLS.
    Active,
}

/// What the caller needs besides the command line.
pub struct Env<'a> {
    pub policy: &'a Policy,
    /// Whether the spool can take this many more bytes (`spool.max_size`).
    pub spool_has_room: &'a dyn Fn(u64) -> bool,
    /// For domains with `verify_recipients`: what the primary said about an
    /// address, as remembered (and not yet aged out).
    pub knowledge: &'a dyn Fn(&str) -> Knowledge,
    /// Whether the primary of an address's domain is known to be down.
    pub primary_down: &'a dyn Fn(&str) -> bool,
    /// Whether the primary may be asked about a never-seen recipient now.
    pub may_call_out: &'a dyn Fn(&str) -> bool,
    /// Whether RCPT for an (accepted) address waits because its domain defers
    /// mail while its primary is up, the primary's last check succeeded and
    /// is fresh, and the client is not trusted.
    pub primary_up: &'a dyn Fn(&str) -> bool,
    /// Whether RCPT of (sender, accepted address) is told to retry later by
    /// greylisting (its domain greylists, the client is neither trusted nor
    /// on a DNS allowlist, and the triplet has not passed). Asking records
    /// the attempt.
    pub greylisted: &'a dyn Fn(&str, &str) -> bool,
}

/// A mail transaction in progress: MAIL, then RCPTs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub sender: String,
    pub ret: Ret,
    pub envid: Option<String>,
    /// `ENVID=` as the client wrote it, when it spells `envid` (see
    /// `params::as_received`).
    pub envid_xtext: Option<String>,
    pub body_type: BodyType,
    pub smtputf8: bool,
    /// Accepted recipients, in order, without duplicates.
    pub recipients: Vec<Recipient>,
}

/// What became of a BDAT chunk, once its octets were read.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunked {
    /// Send the reply: 250 for a chunk kept, or a refusal.
    Reply(Reply),
    /// Send the reply, a refusal only because an earlier chunk was refused:
    /// the client had pipelined it before it could know. Not counted again.
    Discarded(Reply),
    /// The LAST chunk completed a message: commit it, then reply.
    Message(Transaction, Data),
}

#[derive(Debug)]
pub struct Session {
    ip: IpAddr,
    tls: Tls,
    /// The name the client gave in EHLO/HELO, and whether it was EHLO.
    helo: Option<(String, bool)>,
    transaction: Option<Transaction>,
    /// BDAT content of the transaction; reset wherever the transaction is.
    chunks: Chunks,
    /// Set between [`Step::Chunk`] and [`Session::end_chunk`].
    reading: Option<Chunk>,
    errors: u32,
    /// The DNS lists refuse this client: RCPT says so, except to postmaster.
    blocked: Option<Blocked>,
    /// SPF of the latest sender, checked before RCPT for a domain with
    /// `spf` on; it counts only for the HELO name and sender it was
    /// computed with.
    spf: Option<Spf>,
    /// A `dnswl` zone lists the client: greylisting does not apply.
    allowlisted: bool,
}

impl Session {
    pub fn new(ip: IpAddr) -> Session {
        Session::with_tls(ip, Tls::Unavailable)
    }

    pub fn with_tls(ip: IpAddr, tls: Tls) -> Session {
        Session {
            ip,
            tls,
            helo: None,
            transaction: None,
            chunks: Chunks::None,
            reading: None,
            errors: 0,
            blocked: None,
            spf: None,
            allowlisted: false,
        }
    }

    /// What the DNS lists concluded about the client (`None`: not refused),
    /// learned before RCPT; the session itself never waits on DNS.
    pub fn screened(&mut self, blocked: Option<&Blocked>) {
        self.blocked = blocked.cloned();
    }

    /// What SPF said about the current sender, learned before RCPT; the
    /// session itself never waits on DNS.
    pub fn spf_checked(&mut self, spf: Spf) {
        self.spf = Some(spf);
    }

    /// SPF of the transaction in progress, if it was checked.
    pub fn spf(&self) -> Option<&Spf> {
        self.spf_for(self.sender()?)
    }

    /// SPF of `sender` from this client as it is greeted now, if it was
    /// checked (also once the transaction was handed over for commit).
    pub fn spf_for(&self, sender: &str) -> Option<&Spf> {
        self.spf
            .as_ref()
            .filter(|s| s.is_for(self.helo_name(), sender))
    }

    /// Whether a `dnswl` zone lists the client (it then skips greylisting).
    pub fn set_allowlisted(&mut self, allowlisted: bool) {
        self.allowlisted = allowlisted;
    }

    /// See [`Session::set_allowlisted`].
    pub fn allowlisted(&self) -> bool {
        self.allowlisted
    }

    /// The client's address.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// The reverse path of the transaction in progress, for logs.
    pub fn sender(&self) -> Option<&str> {
        self.transaction.as_ref().map(|t| t.sender.as_str())
    }

    /// The client's EHLO/HELO name (empty before it gave one).
    pub fn helo_name(&self) -> &str {
        self.helo.as_ref().map(|(h, _)| h.as_str()).unwrap_or("")
    }

    /// Whether the client may pipeline: it greeted with EHLO, whose reply
    /// offers PIPELINING.
    pub fn may_pipeline(&self) -> bool {
        self.is_esmtp()
    }

    /// Whether the session runs inside TLS (the `Received:` protocol says so).
    pub fn is_tls(&self) -> bool {
        self.tls == Tls::Active
    }

    /// Whether the client greeted with EHLO (the `Received:` protocol says so).
    pub fn is_esmtp(&self) -> bool {
        self.helo.as_ref().is_some_and(|(_, esmtp)| *esmtp)
    }

    /// Handles one command line (ending in LF).
    pub fn command(&mut self, line: &[u8], env: &Env<'_>) -> Step {
        let step = match Request::parse(&mut line.iter()) {
            Ok(request) => self.request(request.into_owned(), line, env),
            // Without a size, the chunk that follows cannot be skipped.
            Err(_) if is_bdat(line) && self.is_esmtp() => {
                return Step::Close(Reply::syntax(
                    501,
                    "5.5.4",
                    "Syntax: BDAT chunk-size [LAST]; closing connection",
                ));
            }
            Err(_) if is_bdat(line) => return Step::Close(bdat_not_offered()),
            Err(e) => Step::Reply(parse_error(e)),
        };
        self.count_errors(step)
    }

    /// The line exceeded the command length limit and was discarded.
    pub fn line_too_long(&mut self) -> Step {
        self.count_errors(Step::Reply(Reply::syntax(
            500,
            "5.5.2",
            "Error: line too long",
        )))
    }

    fn count_errors(&mut self, step: Step) -> Step {
        let Step::Reply(reply) = &step else {
            return step;
        };
        // "Too many recipients" and "storage full" are the server's limits, not
        // the client's mistakes.
        if reply.is_error() && !matches!(reply.code, 452) {
            self.errors += 1;
            if self.errors >= MAX_ERRORS {
                return Step::Close(too_many_errors());
            }
        }
        step
    }

    fn request(&mut self, request: Request<String>, line: &[u8], env: &Env<'_>) -> Step {
        let policy = env.policy;
        let reply = match request {
            Request::Ehlo { host } => {
                self.helo = Some((host, true));
                self.reset();
                return Step::Reply(ehlo_reply(policy, self.tls == Tls::Offered));
            }
            Request::Helo { host } => {
                self.helo = Some((host, false));
                self.reset();
                Reply::new(250, "", policy.hostname.clone())
            }
            Request::Mail { from } => self.mail(from, line, env),
            Request::Rcpt { to } => match self.rcpt(to, line, env) {
                Ok(reply) => reply,
                Err(address) => return Step::Verify(address),
            },
            Request::Data | Request::Rset | Request::Quit if has_arguments(line) => {
                let verb = String::from_utf8_lossy(&line[..4]).to_ascii_uppercase();
                Reply::syntax(501, "5.5.4", format!("Syntax: {verb} takes no arguments"))
            }
            Request::Data => return self.data(),
            Request::Rset => {
                self.reset();
                Reply::new(250, "2.0.0", "Ok")
            }
            Request::Noop { .. } => Reply::new(250, "2.0.0", "Ok"),
            Request::Quit => return Step::Close(Reply::new(221, "2.0.0", "Bye")),
            Request::Vrfy { .. } => Reply::new(
                252,
                "2.5.2",
                "Cannot VRFY user, but will accept message and attempt delivery",
            ),
            Request::Help { .. } => Reply::new(
                214,
                "2.0.0",
                "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP ETRN",
            ),
            Request::Etrn { name } => return self.etrn(&name, policy),
            Request::Bdat {
                chunk_size,
                is_last,
            } => return self.bdat(chunk_size as u64, is_last, policy),
            Request::Lhlo { .. } => {
                Reply::syntax(500, "5.5.1", "Error: this is not an LMTP server")
            }
            Request::StartTls => return self.starttls(),
            Request::Auth { .. } => {
                Reply::syntax(502, "5.5.1", "Error: authentication not enabled")
            }
            Request::Expn { .. } | Request::Atrn { .. } | Request::Burl { .. } => {
                Reply::syntax(502, "5.5.1", "Error: command not implemented")
            }
        };
        Step::Reply(reply)
    }

    /// Ends the transaction and any BDAT content with it.
    fn reset(&mut self) {
        self.transaction = None;
        self.chunks = Chunks::None;
    }
}

fn no_room() -> Reply {
    let text = "Error: insufficient system storage";
    Reply::refuse(Rejection::SpoolFull, 452, "4.3.1", text)
}

fn too_big() -> Reply {
    Reply::refuse(
        Rejection::Size,
        552,
        "5.3.4",
        "Error: message size exceeds fixed maximum message size",
    )
}

fn too_many_errors() -> Reply {
    Reply::refuse(
        Rejection::TooManyErrors,
        421,
        "4.7.0",
        "Error: too many errors",
    )
}

fn need_helo() -> Reply {
    Reply::syntax(503, "5.5.1", "Error: send HELO/EHLO first")
}

fn parse_error(e: ParseError) -> Reply {
    match e {
        ParseError::UnknownCommand => Reply::syntax(500, "5.5.2", "Error: command not recognized"),
        ParseError::InvalidSenderAddress => {
            Reply::syntax(501, "5.1.7", "Error: bad sender address syntax")
        }
        ParseError::InvalidRecipientAddress => {
            Reply::syntax(501, "5.1.3", "Error: bad recipient address syntax")
        }
        ParseError::SyntaxError { syntax } => {
            Reply::syntax(501, "5.5.4", format!("Syntax: {syntax}"))
        }
        ParseError::InvalidParameter { param } => {
            Reply::syntax(501, "5.5.4", format!("Error: invalid {param} parameter"))
        }
        ParseError::UnsupportedParameter { param } => Reply::syntax(
            555,
            "5.5.4",
            format!(
                "Error: unsupported parameter {}",
                param.chars().take(40).collect::<String>()
            ),
        ),
        ParseError::ResponseTooLong => Reply::syntax(500, "5.5.2", "Error: line too long"),
        ParseError::NeedsMoreData { .. } | ParseError::InvalidResponse { .. } => {
            Reply::syntax(500, "5.5.2", "Error: syntax error")
        }
    }
}

/// Whether DATA, RSET or QUIT (each four letters, and in RFC 5321's grammar
/// the verb and CRLF alone) came with arguments: `DATA now` must not start
/// a message.
fn has_arguments(line: &[u8]) -> bool {
    line.get(4..)
        .is_some_and(|rest| rest.iter().any(|b| !b.is_ascii_whitespace()))
}

#[cfg(test)]
mod tests {
    use super::super::policy;
    use super::*;

    /// Runs a script of (command, expected reply code) against one session.
    pub(super) fn run(session: &mut Session, policy: &Policy, script: &[(&str, u16)]) {
        let env = plain(policy);
        for (command, want) in script {
            let step = session.command(format!("{command}\r\n").as_bytes(), &env);
            let code = match &step {
                Step::Reply(r) | Step::Data(r) | Step::Close(r) | Step::StartTls(r) => r.code,
                Step::Etrn { reply, .. } => reply.code,
                Step::Verify(_) => panic!("{command:?}: no callout was allowed"),
                Step::Chunk { .. } => panic!("{command:?}: a chunk; use `bdat`"),
            };
            assert_eq!(code, *want, "{command:?} -> {step:?}");
        }
    }

    /// Room in the spool, nothing learned, every primary up, no callouts.
    pub(super) fn plain(policy: &Policy) -> Env<'_> {
        Env {
            policy,
            spool_has_room: &|_| true,
            knowledge: &|_| Knowledge::Unseen,
            primary_down: &|_| false,
            may_call_out: &|_| false,
            primary_up: &|_| false,
            greylisted: &|_, _| false,
        }
    }

    pub(super) fn local() -> Session {
        Session::new("127.0.0.1".parse().unwrap())
    }

    #[test]
    fn order_of_commands() {
        let p = policy::sample();
        run(
            &mut local(),
            &p,
            &[
                ("MAIL FROM:<a@b.test>", 503),
                ("RCPT TO:<x@example.com>", 503),
                ("DATA", 503),
                ("EHLO client.test", 250),
                ("RCPT TO:<x@example.com>", 503),
                ("DATA", 503),
                ("MAIL FROM:<a@b.test>", 250),
                ("MAIL FROM:<a@b.test>", 503),
                ("DATA", 554),
                ("RCPT TO:<x@example.com>", 250),
                ("RSET", 250),
                ("RCPT TO:<x@example.com>", 503),
                ("MAIL FROM:<>", 250),
                ("RCPT TO:<x@example.com>", 250),
                // The verb and CRLF alone (RFC 5321 §4.1.1): nothing starts,
                // nothing is reset, the session goes on.
                ("DATA now", 501),
                ("RSET please", 501),
                ("QUIT later", 501),
                ("DATA  ", 354),
            ],
        );
    }

    #[test]
    fn every_reply_but_ehlo_carries_an_enhanced_code() {
        let p = policy::sample();
        let env = plain(&p);
        let mut s = local();
        for command in [
            "HELO x",
            "NOOP",
            "VRFY a",
            "HELP",
            "RSET",
            "BOGUS",
            "MAIL FROM:<",
            "EXPN x",
            "STARTTLS",
            "AUTH PLAIN",
            "ETRN example.com",
        ] {
            let step = s.command(format!("{command}\r\n").as_bytes(), &env);
            let (Step::Reply(r) | Step::Etrn { reply: r, .. }) = step else {
                panic!("{command}: {step:?}");
            };
            if command != "HELO x" {
                assert!(!r.status.is_empty(), "{command}: {r}");
            }
        }
    }

    #[test]
    fn too_many_errors_closes() {
        let p = policy::sample();
        let env = plain(&p);
        let mut s = local();
        for i in 1..=MAX_ERRORS {
            let step = s.command(b"BOGUS\r\n", &env);
            if i < MAX_ERRORS {
                assert!(
                    matches!(step, Step::Reply(ref r) if r.code == 500),
                    "{step:?}"
                );
            } else {
                assert!(
                    matches!(step, Step::Close(ref r) if r.code == 421),
                    "{step:?}"
                );
            }
        }
    }

    #[test]
    fn each_refusal_says_why_where_it_is_made() {
        let p = policy::sample();
        let env = plain(&p);
        let mut s = local();
        for (command, why) in [
            ("MAIL FROM:<a@b.test>", Some(Rejection::Syntax)),
            ("EHLO c", None),
            ("MAIL FROM:<a@b.test> SIZE=2000", Some(Rejection::Size)),
            ("MAIL FROM:<j\u{f6}rg@b.test>", Some(Rejection::Smtputf8)),
            ("MAIL FROM:<a@b.test>", None),
            ("RCPT TO:<x@example.net>", Some(Rejection::Relay)),
            ("RCPT TO:<carol@example.org>", Some(Rejection::UnknownUser)),
            ("BOGUS", Some(Rejection::Syntax)),
        ] {
            let step = s.command(format!("{command}\r\n").as_bytes(), &env);
            let Step::Reply(r) = step else {
                panic!("{command}: {step:?}");
            };
            assert_eq!(r.rejection, why, "{command}: {r}");
            assert_eq!(r.is_error(), why.is_some(), "{command}: {r}");
        }
    }
}
