//! The SMTP conversation as a pure state machine: `(state, command line, policy)
//! -> (reply, step)`. No I/O, no clock, no spool: the connection shell in
//! `conn.rs` reads lines, asks this what to say, and performs the steps (read the
//! data, commit, flush the queue, close).
//!
//! BDAT (RFC 3030, CHUNKING): the reply to a BDAT comes after its chunk, so the
//! command yields [`Step::Chunk`]; the shell reads exactly that many octets into
//! [`Session::chunk`] and replies with what [`Session::end_chunk`] decides. A
//! refused chunk is still read to its end, or its octets would be taken for
//! commands. Refused are: a chunk without MAIL and an accepted RCPT (503), one
//! that would take the message over `max_message_size` (552), and a LAST chunk
//! completing a message that fails the checks DATA makes (size, hop count).
//! A refusal ends the transaction, and the chunks the client had pipelined
//! behind the refused one are read and refused with 503 too, until its BDAT
//! LAST, RSET, MAIL or EHLO/HELO (RFC 3030 §2: the client must send no more
//! chunks after an error, and the server must discard those already in the
//! pipeline). Postfix smtpd does the same, except that it answers 551 and
//! refuses MAIL until LAST or RSET. Those follow-on refusals are the client's
//! pipelining, not its mistakes: they do not count towards [`MAX_ERRORS`].
//! A malformed BDAT closes the connection after its 501: without a size, what
//! follows cannot be told apart from commands.

use std::net::IpAddr;

use smtp_proto::{
    Error as ParseError, MAIL_BODY_7BIT, MAIL_BODY_8BITMIME, MAIL_RET_FULL, MAIL_RET_HDRS,
    MAIL_SMTPUTF8, MailFrom, RCPT_NOTIFY_DELAY, RCPT_NOTIFY_FAILURE, RCPT_NOTIFY_NEVER,
    RCPT_NOTIFY_SUCCESS, RcptTo, Request,
};

use super::data::{ChunkReader, Data, count_received};
use super::policy::{Policy, Refusal};
use super::reply::Reply;
use crate::address;
use crate::config::UnknownRecipients;
pub use crate::knowledge::Knowledge;
use crate::spool::{BodyType, Notify, RcptStatus, Recipient, Ret};

/// Errors a client may make before we hang up (Postfix's `smtpd_hard_error_limit`).
pub const MAX_ERRORS: u32 = 20;

/// MAIL FROM flags we advertise an extension for; anything else is refused.
const MAIL_FLAGS_SUPPORTED: u64 =
    MAIL_BODY_7BIT | MAIL_BODY_8BITMIME | MAIL_RET_FULL | MAIL_RET_HDRS | MAIL_SMTPUTF8;
const RCPT_FLAGS_SUPPORTED: u64 =
    RCPT_NOTIFY_SUCCESS | RCPT_NOTIFY_FAILURE | RCPT_NOTIFY_DELAY | RCPT_NOTIFY_NEVER;

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
}

/// A mail transaction in progress: MAIL, then RCPTs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub sender: String,
    pub ret: Ret,
    pub envid: Option<String>,
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

/// Where the BDAT content of the current transaction stands.
#[derive(Debug)]
enum Chunks {
    /// No BDAT since MAIL: DATA is still possible.
    None,
    /// The content of the chunks accepted so far.
    Receiving(ChunkReader),
    /// A chunk was refused and the transaction ended; the client's chunks
    /// already in the pipeline behind it are read and refused.
    Failed,
}

/// What to do with the chunk being read, decided when its BDAT came.
#[derive(Debug)]
enum Fate {
    Keep,
    Refuse(Reply),
    Discard(Reply),
}

/// The BDAT whose octets are being read.
#[derive(Debug)]
struct Chunk {
    size: u64,
    last: bool,
    fate: Fate,
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
        }
    }

    pub fn greeting(policy: &Policy) -> Reply {
        Reply::new(220, "", format!("{} ESMTP mxspool", policy.hostname))
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
                return Step::Close(Reply::new(
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
        self.count_errors(Step::Reply(Reply::new(
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
            Request::Mail { from } => self.mail(from, env),
            Request::Rcpt { to } => match self.rcpt(to, line, env) {
                Ok(reply) => reply,
                Err(address) => return Step::Verify(address),
            },
            Request::Data => match &self.transaction {
                _ if self.helo.is_none() => need_helo(),
                None => Reply::new(503, "5.5.1", "Error: need MAIL command"),
                Some(_) if matches!(self.chunks, Chunks::Receiving(_)) => {
                    Reply::new(503, "5.5.1", "Error: DATA after BDAT")
                }
                Some(t) if t.recipients.is_empty() => {
                    Reply::new(554, "5.5.1", "Error: no valid recipients")
                }
                Some(_) => {
                    return Step::Data(Reply::new(354, "", "End data with <CR><LF>.<CR><LF>"));
                }
            },
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
            Request::Lhlo { .. } => Reply::new(500, "5.5.1", "Error: this is not an LMTP server"),
            Request::StartTls => match self.tls {
                Tls::Unavailable => Reply::new(502, "5.5.1", "Error: STARTTLS not available"),
                Tls::Active => Reply::new(503, "5.5.1", "Error: TLS already active"),
                Tls::Offered if self.helo.is_none() => need_helo(),
                Tls::Offered if self.transaction.is_some() => {
                    Reply::new(503, "5.5.1", "Error: MAIL transaction in progress")
                }
                Tls::Offered => {
                    return Step::StartTls(Reply::new(220, "2.0.0", "Ready to start TLS"));
                }
            },
            Request::Auth { .. } => Reply::new(502, "5.5.1", "Error: authentication not enabled"),
            Request::Expn { .. } | Request::Atrn { .. } | Request::Burl { .. } => {
                Reply::new(502, "5.5.1", "Error: command not implemented")
            }
        };
        Step::Reply(reply)
    }

    fn mail(&mut self, from: MailFrom<String>, env: &Env<'_>) -> Reply {
        let Some((_, esmtp)) = &self.helo else {
            return need_helo();
        };
        if self.transaction.is_some() {
            return Reply::new(503, "5.5.1", "Error: nested MAIL command");
        }
        let has_params = from.flags != 0 || from.size != 0 || from.env_id.is_some();
        if has_params && !esmtp {
            return Reply::new(555, "5.5.4", "Error: MAIL parameters need EHLO");
        }
        if from.flags & !MAIL_FLAGS_SUPPORTED != 0
            || from.trans_id.is_some()
            || from.by != 0
            || from.solicit.is_some()
            || from.mtrk.is_some()
            || from.auth.is_some()
            || from.hold_for != 0
            || from.hold_until != 0
            || from.mt_priority != 0
        {
            return Reply::new(555, "5.5.4", "Error: unsupported MAIL parameter");
        }
        if from
            .env_id
            .as_deref()
            .is_some_and(|v| !is_dsn_text(v, MAX_ENVID))
        {
            return Reply::new(501, "5.5.4", "Error: bad ENVID parameter");
        }
        if has_control(&from.address) {
            // RFC 5321 paths hold no control characters; the next hop would
            // refuse the address, and we would owe a bounce.
            return Reply::new(501, "5.1.7", "Error: bad sender address syntax");
        }
        let smtputf8 = from.flags & MAIL_SMTPUTF8 != 0;
        if !from.address.is_ascii() && !smtputf8 {
            return Reply::new(
                553,
                "5.6.7",
                "Error: must declare SMTPUTF8 to send unicode address",
            );
        }
        // `a@example.com.` means `a@example.com`; anything else must be what
        // delivery can write as a path, or every recipient would fail there.
        let mut sender = from.address;
        if sender.ends_with('.') && sender.contains('@') {
            sender.pop();
        }
        if address::path(&sender, smtputf8).is_none() {
            return Reply::new(501, "5.1.7", "Error: bad sender address syntax");
        }
        let size = from.size as u64;
        if size > env.policy.max_message_size {
            return too_big();
        }
        if !(env.spool_has_room)(size) {
            return Reply::new(452, "4.3.1", "Error: insufficient system storage");
        }
        self.transaction = Some(Transaction {
            sender,
            ret: if from.flags & MAIL_RET_FULL != 0 {
                Ret::Full
            } else if from.flags & MAIL_RET_HDRS != 0 {
                Ret::Headers
            } else {
                Ret::Unset
            },
            envid: from.env_id,
            body_type: if from.flags & MAIL_BODY_8BITMIME != 0 {
                BodyType::EightBitMime
            } else if from.flags & MAIL_BODY_7BIT != 0 {
                BodyType::SevenBit
            } else {
                BodyType::Unset
            },
            smtputf8,
            recipients: Vec::new(),
        });
        self.chunks = Chunks::None;
        Reply::new(250, "2.1.0", "Ok")
    }

    /// The reply to RCPT, or `Err(address)` when the primary should be asked
    /// about `address` first (see [`Step::Verify`]).
    fn rcpt(&mut self, to: RcptTo<String>, line: &[u8], env: &Env<'_>) -> Result<Reply, String> {
        let policy = env.policy;
        let esmtp = self.is_esmtp();
        let receiving = matches!(self.chunks, Chunks::Receiving(_));
        let Some(transaction) = &mut self.transaction else {
            return Ok(Reply::new(503, "5.5.1", "Error: need MAIL command"));
        };
        if let Some(refusal) = rcpt_refusal(&to, esmtp, receiving, transaction, policy) {
            return Ok(refusal);
        }
        let address = match relay_address(&to, line, policy, transaction.smtputf8) {
            Ok(address) => address,
            Err(refusal) => return Ok(refusal),
        };
        if let Some(answer) = unverified(&address, &to.address, policy, env) {
            return answer;
        }
        add_recipient(transaction, address, &to);
        Ok(Reply::new(250, "2.1.5", "Ok"))
    }

    fn etrn(&mut self, name: &str, policy: &Policy) -> Step {
        let reply = if self.helo.is_none() {
            need_helo()
        } else if self.transaction.is_some() {
            Reply::new(503, "5.5.1", "Error: MAIL transaction in progress")
        } else if !policy.etrn_allowed(self.ip) {
            Reply::new(
                459,
                "4.7.1",
                format!("<{name}>: ETRN not allowed from this client"),
            )
        } else if let Some(domain) = policy.relay_domain(name.trim_start_matches('@')) {
            return Step::Etrn {
                domain: domain.to_owned(),
                reply: Reply::new(250, "2.0.0", format!("Queuing for node <{name}> started")),
            };
        } else {
            Reply::new(
                458,
                "4.5.4",
                format!("Unable to queue messages for node <{name}>"),
            )
        };
        // `command` counts the refusal towards the error limit.
        Step::Reply(reply)
    }

    /// Ends the transaction and any BDAT content with it.
    fn reset(&mut self) {
        self.transaction = None;
        self.chunks = Chunks::None;
    }

    /// `BDAT size [LAST]`: decides the chunk's fate now; its octets follow.
    fn bdat(&mut self, size: u64, last: bool, policy: &Policy) -> Step {
        if !self.is_esmtp() {
            return Step::Close(bdat_not_offered());
        }
        let fate = match (&self.chunks, &self.transaction) {
            (Chunks::Failed, _) => Fate::Discard(Reply::new(
                503,
                "5.5.1",
                format!("Error: {size} octets discarded after an earlier error"),
            )),
            (_, None) => Fate::Refuse(Reply::new(503, "5.5.1", "Error: need MAIL command")),
            (_, Some(t)) if t.recipients.is_empty() => {
                Fate::Refuse(Reply::new(503, "5.5.1", "Error: need RCPT command"))
            }
            (Chunks::Receiving(content), _)
                if content.octets().saturating_add(size) > policy.max_message_size =>
            {
                Fate::Refuse(too_big())
            }
            (Chunks::None, _) if size > policy.max_message_size => Fate::Refuse(too_big()),
            _ => Fate::Keep,
        };
        if let Fate::Refuse(reply) = &fate
            && reply.code == 503
        {
            // Out of order is the client's mistake (the size limit is ours).
            self.errors += 1;
            if self.errors >= MAX_ERRORS {
                return Step::Close(too_many_errors());
            }
        }
        if matches!(fate, Fate::Keep) && matches!(self.chunks, Chunks::None) {
            self.chunks = Chunks::Receiving(ChunkReader::new(policy.max_message_size));
        }
        self.reading = Some(Chunk { size, last, fate });
        Step::Chunk { size }
    }

    /// The next octets of the chunk being read (all of them, in order, in
    /// pieces of any size). Octets of a refused chunk are dropped.
    pub fn chunk(&mut self, octets: &[u8]) {
        if let (
            Some(Chunk {
                fate: Fate::Keep, ..
            }),
            Chunks::Receiving(content),
        ) = (&self.reading, &mut self.chunks)
        {
            content.feed(octets);
        }
    }

    /// The chunk's octets have all been read: what to answer, or the message
    /// to commit after a LAST chunk. The transaction ends with a LAST chunk
    /// and with any refusal.
    pub fn end_chunk(&mut self, policy: &Policy) -> Chunked {
        let Some(Chunk { size, last, fate }) = self.reading.take() else {
            return Chunked::Reply(Reply::new(503, "5.5.1", "Error: no chunk was announced"));
        };
        let refused = match fate {
            Fate::Keep if matches!(&self.chunks, Chunks::Receiving(c) if c.oversize()) => {
                Some(Chunked::Reply(too_big()))
            }
            Fate::Keep => None,
            Fate::Refuse(reply) => Some(Chunked::Reply(reply)),
            Fate::Discard(reply) => Some(Chunked::Discarded(reply)),
        };
        if let Some(refused) = refused {
            self.transaction = None;
            self.chunks = if last { Chunks::None } else { Chunks::Failed };
            return refused;
        }
        if !last {
            return Chunked::Reply(Reply::new(250, "2.0.0", format!("Ok: {size} octets")));
        }
        let Chunks::Receiving(content) = std::mem::replace(&mut self.chunks, Chunks::None) else {
            return Chunked::Reply(Reply::new(503, "5.5.1", "Error: need MAIL command"));
        };
        let data = content.finish();
        match self.finish_data(&data, policy) {
            Ok(transaction) => Chunked::Message(transaction, data),
            Err(reply) => Chunked::Reply(reply),
        }
    }

    /// The client finished sending data. On success, returns the transaction to
    /// commit (the caller replies after the commit); on refusal, the reply. The
    /// transaction ends either way.
    pub fn finish_data(&mut self, data: &Data, policy: &Policy) -> Result<Transaction, Reply> {
        let transaction = self
            .transaction
            .take()
            .ok_or_else(|| Reply::new(503, "5.5.1", "Error: need MAIL command"))?;
        if data.oversize {
            return Err(too_big());
        }
        // Our own Received: makes one more; refuse before it would exceed the limit.
        if count_received(&data.body) >= policy.max_received_headers {
            return Err(Reply::new(
                554,
                "5.4.6",
                "Error: too many hops (mail forwarding loop?)",
            ));
        }
        Ok(transaction)
    }
}

/// Whether a path holds a control character (C0 or DEL), which smtp-proto
/// lets through inside quoted local parts.
/// Why RCPT's command itself is refused (its parameters, its address's form,
/// the recipient limit), if it is.
fn rcpt_refusal(
    to: &RcptTo<String>,
    esmtp: bool,
    receiving: bool,
    transaction: &Transaction,
    policy: &Policy,
) -> Option<Reply> {
    if receiving {
        // The content has begun: its envelope is settled.
        return Some(Reply::new(503, "5.5.1", "Error: RCPT after BDAT"));
    }
    if (to.flags != 0 || to.orcpt.is_some()) && !esmtp {
        return Some(Reply::new(555, "5.5.4", "Error: RCPT parameters need EHLO"));
    }
    if to.flags & !RCPT_FLAGS_SUPPORTED != 0 || to.rrvs != 0 {
        return Some(Reply::new(
            555,
            "5.5.4",
            "Error: unsupported RCPT parameter",
        ));
    }
    if to
        .orcpt
        .as_deref()
        .is_some_and(|v| !is_dsn_text(v, MAX_ORCPT))
    {
        return Some(Reply::new(501, "5.5.4", "Error: bad ORCPT parameter"));
    }
    if has_control(&to.address) {
        return Some(Reply::new(
            501,
            "5.1.3",
            "Error: bad recipient address syntax",
        ));
    }
    if !to.address.is_ascii() && !transaction.smtputf8 {
        return Some(Reply::new(
            553,
            "5.6.7",
            "Error: must declare SMTPUTF8 to send unicode address",
        ));
    }
    if transaction.recipients.len() >= policy.max_recipients {
        return Some(Reply::new(452, "4.5.3", "Error: too many recipients"));
    }
    None
}

/// The recipient as we will store it (`<postmaster>` made ours, the relay
/// policy's normal form), or the refusal: not ours to relay, unknown, or not
/// an address delivery could write as a path.
fn relay_address(
    to: &RcptTo<String>,
    line: &[u8],
    policy: &Policy,
    smtputf8: bool,
) -> Result<String, Reply> {
    // smtp-proto parses both `<>` and `<postmaster>` to "": only the raw line
    // tells them apart. The bare postmaster must be accepted (RFC 5321 §4.5.1).
    let address = if to.address.is_empty() {
        if !is_bare_postmaster(line) {
            return Err(Reply::new(
                501,
                "5.1.3",
                "Error: bad recipient address syntax",
            ));
        }
        policy.postmaster.clone()
    } else {
        match policy.check_recipient(&to.address) {
            Ok(address) => address,
            Err(Refusal::Syntax) => {
                return Err(Reply::new(
                    501,
                    "5.1.3",
                    "Error: bad recipient address syntax",
                ));
            }
            Err(Refusal::Relay) => {
                return Err(Reply::new(
                    550,
                    "5.7.1",
                    format!("<{}>: Relay access denied", to.address),
                ));
            }
            Err(Refusal::UnknownUser) => {
                return Err(Reply::new(
                    550,
                    "5.1.1",
                    format!(
                        "<{}>: Recipient address rejected: User unknown in relay recipient table",
                        to.address
                    ),
                ));
            }
        }
    };
    if address::path(&address, smtputf8).is_none_or(|p| p.is_empty()) {
        return Err(Reply::new(
            501,
            "5.1.3",
            "Error: bad recipient address syntax",
        ));
    }
    Ok(address)
}

/// For a `verify_recipients` domain: the refusal or the callout (`Err`) that
/// what the primary told us (or not) calls for; `None` to take it.
fn unverified(
    address: &str,
    given: &str,
    policy: &Policy,
    env: &Env<'_>,
) -> Option<Result<Reply, String>> {
    // A backup MX without the primary's user list would accept mail it can
    // only bounce later (backscatter): use what the primary told us.
    let (local, _) = address.rsplit_once('@').unwrap_or(("", ""));
    if let Some(unknown) = policy.verification(address)
        && !local.eq_ignore_ascii_case("postmaster")
    {
        match (env.knowledge)(address) {
            Knowledge::Exists => {}
            Knowledge::DoesNotExist => {
                return Some(Ok(Reply::new(
                    550,
                    "5.1.1",
                    format!("<{given}>: Recipient address rejected: User unknown"),
                )));
            }
            Knowledge::Unseen if !(env.primary_down)(address) => {
                if (env.may_call_out)(address) {
                    return Some(Err(address.to_owned()));
                }
            }
            Knowledge::Unseen => {
                if unknown == UnknownRecipients::Tempfail {
                    return Some(Ok(Reply::new(
                        450,
                        "4.1.1",
                        format!(
                            "<{given}>: Recipient address rejected: unverified address, try again later"
                        ),
                    )));
                }
            }
        }
    }
    None
}

/// Adds the recipient with its NOTIFY=/ORCPT=, once (a repeat is accepted
/// and ignored).
fn add_recipient(transaction: &mut Transaction, address: String, to: &RcptTo<String>) {
    let duplicate = transaction
        .recipients
        .iter()
        .any(|r| r.address.eq_ignore_ascii_case(&address));
    if !duplicate {
        let mut notify = 0;
        for (flag, bit) in [
            (RCPT_NOTIFY_SUCCESS, Notify::SUCCESS),
            (RCPT_NOTIFY_FAILURE, Notify::FAILURE),
            (RCPT_NOTIFY_DELAY, Notify::DELAY),
            (RCPT_NOTIFY_NEVER, Notify::NEVER),
        ] {
            if to.flags & flag != 0 {
                notify |= bit;
            }
        }
        transaction.recipients.push(Recipient {
            address,
            orcpt: to.orcpt.clone(),
            notify: Notify(notify),
            status: RcptStatus::Queued,
            attempts: 0,
            next_attempt_ms: 0,
            last_reply: None,
            unreachable: false,
            delay_notified: false,
            suspect: false,
        });
    }
}

/// RFC 3461 §4.4 and §4.2: an ENVID is at most 100 characters, an ORCPT
/// (address type included) at most 500 (smtp-proto already stops at 256).
const MAX_ENVID: usize = 100;
const MAX_ORCPT: usize = 500;

/// Whether a decoded `ENVID`/`ORCPT` value is printable US-ASCII within `max`
/// characters, as RFC 3461 requires. smtp-proto decodes the xtext and turns raw
/// 8-bit octets into U+FFFD and `+XX` escapes above 127 into Latin-1
/// characters: passed on, such a value would be re-encoded as other octets, or
/// grow past the limit and make the next hop refuse every recipient.
fn is_dsn_text(value: &str, max: usize) -> bool {
    value.len() <= max && value.bytes().all(|b| (b' '..=b'~').contains(&b))
}

fn has_control(address: &str) -> bool {
    address.chars().any(|c| c.is_ascii_control())
}

fn too_big() -> Reply {
    Reply::new(
        552,
        "5.3.4",
        "Error: message size exceeds fixed maximum message size",
    )
}

fn too_many_errors() -> Reply {
    Reply::new(421, "4.7.0", "Error: too many errors")
}

/// CHUNKING is offered in the EHLO reply only. The chunk's octets follow the
/// command, and without the extension we cannot tell them from commands: stop
/// listening rather than guess.
fn bdat_not_offered() -> Reply {
    Reply::new(
        503,
        "5.5.1",
        "Error: BDAT without CHUNKING; closing connection",
    )
}

/// Whether a line is a BDAT command, well-formed or not.
fn is_bdat(line: &[u8]) -> bool {
    line.len() >= 4
        && line[..4].eq_ignore_ascii_case(b"BDAT")
        && matches!(line.get(4), None | Some(b' ' | b'\t' | b'\r' | b'\n'))
}

fn need_helo() -> Reply {
    Reply::new(503, "5.5.1", "Error: send HELO/EHLO first")
}

fn ehlo_reply(policy: &Policy, starttls: bool) -> Reply {
    let mut lines = vec![
        policy.hostname.clone(),
        "PIPELINING".into(),
        format!("SIZE {}", policy.max_message_size),
        "ETRN".into(),
    ];
    if starttls {
        lines.push("STARTTLS".into());
    }
    lines.extend([
        "ENHANCEDSTATUSCODES".into(),
        "8BITMIME".into(),
        "DSN".into(),
        "SMTPUTF8".into(),
        "CHUNKING".into(),
    ]);
    Reply::multiline(250, lines)
}

fn parse_error(e: ParseError) -> Reply {
    match e {
        ParseError::UnknownCommand => Reply::new(500, "5.5.2", "Error: command not recognized"),
        ParseError::InvalidSenderAddress => {
            Reply::new(501, "5.1.7", "Error: bad sender address syntax")
        }
        ParseError::InvalidRecipientAddress => {
            Reply::new(501, "5.1.3", "Error: bad recipient address syntax")
        }
        ParseError::SyntaxError { syntax } => Reply::new(501, "5.5.4", format!("Syntax: {syntax}")),
        ParseError::InvalidParameter { param } => {
            Reply::new(501, "5.5.4", format!("Error: invalid {param} parameter"))
        }
        ParseError::UnsupportedParameter { param } => Reply::new(
            555,
            "5.5.4",
            format!(
                "Error: unsupported parameter {}",
                param.chars().take(40).collect::<String>()
            ),
        ),
        ParseError::ResponseTooLong => Reply::new(500, "5.5.2", "Error: line too long"),
        ParseError::NeedsMoreData { .. } | ParseError::InvalidResponse { .. } => {
            Reply::new(500, "5.5.2", "Error: syntax error")
        }
    }
}

/// `RCPT TO:<postmaster>` (any case, optional space after the colon).
fn is_bare_postmaster(line: &[u8]) -> bool {
    let text = String::from_utf8_lossy(line).to_ascii_lowercase();
    text.split_once(':')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with("<postmaster>"))
}

#[cfg(test)]
mod tests {
    use super::super::policy;
    use super::*;

    /// Runs a script of (command, expected reply code) against one session.
    fn run(session: &mut Session, policy: &Policy, script: &[(&str, u16)]) {
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
    fn plain(policy: &Policy) -> Env<'_> {
        Env {
            policy,
            spool_has_room: &|_| true,
            knowledge: &|_| Knowledge::Unseen,
            primary_down: &|_| false,
            may_call_out: &|_| false,
        }
    }

    fn local() -> Session {
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
                ("DATA", 354),
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
    fn recipients_and_parameters() {
        let p = policy::sample();
        run(
            &mut local(),
            &p,
            &[
                ("EHLO c", 250),
                ("MAIL FROM:<a@b.test> SIZE=2000", 552),
                ("MAIL FROM:<a@b.test> BODY=BINARYMIME", 555),
                ("MAIL FROM:<a@b.test> REQUIRETLS", 555),
                ("MAIL FROM:<j\u{f6}rg@b.test>", 553),
                (
                    "MAIL FROM:<a@b.test> SIZE=100 BODY=8BITMIME RET=HDRS ENVID=x",
                    250,
                ),
                ("RCPT TO:<x@example.net>", 550),
                ("RCPT TO:<x%y@example.com>", 550),
                ("RCPT TO:<\"x@y.test\"@example.com>", 550),
                ("RCPT TO:<@a.test,@b.test:x@example.com>", 250),
                ("RCPT TO:<@example.com:x@evil.test>", 550),
                ("RCPT TO:<carol@example.org>", 550),
                (
                    "RCPT TO:<alice@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@b",
                    250,
                ),
                ("RCPT TO:<x@[192.0.2.1]>", 501),
                ("RCPT TO:<>", 501),
                ("RCPT TO:<Postmaster>", 250),
                ("RCPT TO:<j\u{f6}rg@example.com>", 553),
            ],
        );
    }

    #[test]
    fn stores_dsn_parameters_and_deduplicates() {
        let p = policy::sample();
        let mut s = local();
        run(
            &mut s,
            &p,
            &[
                ("EHLO c", 250),
                ("MAIL FROM:<a@b.test> RET=FULL ENVID=QQ314159 SMTPUTF8", 250),
                ("RCPT TO:<x@example.com> NOTIFY=NEVER", 250),
                ("RCPT TO:<X@Example.com>", 250),
                ("RCPT TO:<postmaster>", 250),
                ("RCPT TO:<j\u{f6}rg@example.com>", 250),
            ],
        );
        let t = s.transaction.clone().unwrap();
        assert_eq!(t.ret, Ret::Full);
        assert_eq!(t.envid.as_deref(), Some("QQ314159"));
        assert!(t.smtputf8);
        let addrs: Vec<&str> = t.recipients.iter().map(|r| r.address.as_str()).collect();
        assert_eq!(
            addrs,
            [
                "x@example.com",
                "postmaster@example.net",
                "j\u{f6}rg@example.com"
            ]
        );
        assert_eq!(t.recipients[0].notify, Notify(Notify::NEVER));
    }

    #[test]
    fn envid_and_orcpt_must_be_printable_ascii_within_rfc_3461_limits() {
        // Found by the smtp_params fuzz target: 8-bit values were accepted and
        // then re-encoded as other octets (or grew past 100 characters), so a
        // DSN-capable next hop refused every recipient and we owed bounces.
        let p = policy::sample();
        let long_envid = format!("MAIL FROM:<a@b.test> ENVID={}", "x".repeat(101));
        let long_orcpt = format!("RCPT TO:<x@example.com> ORCPT=rfc822;{}@b", "y".repeat(500));
        let mut s = local();
        run(
            &mut s,
            &p,
            &[
                ("EHLO c", 250),
                ("MAIL FROM:<a@b.test> ENVID=j+C3+B6rg", 501),
                (&long_envid, 501),
                ("MAIL FROM:<a@b.test> ENVID=a+20b+2Bc", 250),
                (
                    "RCPT TO:<x@example.com> ORCPT=rfc822;j+C3+B6rg@example.com",
                    501,
                ),
                (
                    "RCPT TO:<x@example.com> ORCPT=rfc822;a+01b@example.com",
                    501,
                ),
                (&long_orcpt, 501),
                (
                    "RCPT TO:<x@example.com> ORCPT=rfc822;a+2Bb@example.com",
                    250,
                ),
            ],
        );
        let t = s.transaction.clone().unwrap();
        assert_eq!(t.envid.as_deref(), Some("a b+c"));
        assert_eq!(t.recipients.len(), 1);
        // Raw 8-bit octets, which reach us as U+FFFD.
        let env = plain(&p);
        let mut s = local();
        run(&mut s, &p, &[("EHLO c", 250)]);
        let step = s.command(b"MAIL FROM:<a@b.test> ENVID=a\xff\xfe\r\n", &env);
        assert!(matches!(&step, Step::Reply(r) if r.code == 501), "{step:?}");
    }

    #[test]
    fn takes_only_addresses_that_delivery_can_write_as_a_path() {
        // Found by the smtp_session fuzz target: with include_subdomains,
        // `alice@a!b.example.org` passed the relay check, and delivery then
        // failed it with 5.1.3: a bounce for mail we had taken.
        let p = policy::sample();
        let label64 = "l".repeat(64);
        let long_rcpt = format!("RCPT TO:<alice@{label64}.example.org>");
        let long_sender = format!("MAIL FROM:<a@{label64}.test>");
        let mut s = local();
        run(
            &mut s,
            &p,
            &[
                ("EHLO c", 250),
                (&long_sender, 501),
                ("MAIL FROM:<a@b!c.test>", 501),
                ("MAIL FROM:<a@b..c.test>", 501),
                ("MAIL FROM:<a@b.test.>", 250),
                ("RCPT TO:<alice@a!b.example.org>", 501),
                ("RCPT TO:<alice@-a.example.org>", 501),
                (&long_rcpt, 501),
                ("RCPT TO:<alice@a_b.example.org>", 250),
                ("RCPT TO:<alice@sub.example.org.>", 250),
            ],
        );
        let t = s.transaction.clone().unwrap();
        assert_eq!(t.sender, "a@b.test");
        let addrs: Vec<&str> = t.recipients.iter().map(|r| r.address.as_str()).collect();
        assert_eq!(addrs, ["alice@a_b.example.org", "alice@sub.example.org"]);
    }

    #[test]
    fn helo_clients_get_no_esmtp_parameters() {
        let p = policy::sample();
        run(
            &mut local(),
            &p,
            &[
                ("HELO c", 250),
                ("MAIL FROM:<a@b.test> SIZE=10", 555),
                ("MAIL FROM:<a@b.test>", 250),
                ("RCPT TO:<x@example.com> NOTIFY=NEVER", 555),
            ],
        );
    }

    #[test]
    fn recipient_limit_is_a_temporary_refusal_not_an_error() {
        let mut p = policy::sample();
        p.max_recipients = 2;
        let mut s = local();
        let mut script = vec![("EHLO c", 250), ("MAIL FROM:<a@b.test>", 250)];
        script.push(("RCPT TO:<a@example.com>", 250));
        script.push(("RCPT TO:<b@example.com>", 250));
        for _ in 0..MAX_ERRORS + 5 {
            script.push(("RCPT TO:<c@example.com>", 452));
        }
        run(&mut s, &p, &script);
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
    fn starttls_only_when_offered_and_only_once() {
        let p = policy::sample();
        let env = plain(&p);
        let ehlo_lines = |s: &mut Session| match s.command(b"EHLO c\r\n", &env) {
            Step::Reply(r) => r.lines,
            other => panic!("{other:?}"),
        };
        let mut plain = local();
        assert!(!ehlo_lines(&mut plain).contains(&"STARTTLS".to_string()));
        assert!(
            matches!(plain.command(b"STARTTLS\r\n", &env), Step::Reply(ref r) if r.code == 502)
        );

        let mut offered = Session::with_tls("127.0.0.1".parse().unwrap(), Tls::Offered);
        assert!(
            matches!(offered.command(b"STARTTLS\r\n", &env), Step::Reply(ref r) if r.code == 503)
        );
        assert!(ehlo_lines(&mut offered).contains(&"STARTTLS".to_string()));
        offered.command(b"MAIL FROM:<a@b.test>\r\n", &env);
        assert!(
            matches!(offered.command(b"STARTTLS\r\n", &env), Step::Reply(ref r) if r.code == 503)
        );
        offered.command(b"RSET\r\n", &env);
        assert!(
            matches!(offered.command(b"STARTTLS\r\n", &env), Step::StartTls(ref r) if r.code == 220)
        );

        let mut active = Session::with_tls("127.0.0.1".parse().unwrap(), Tls::Active);
        assert!(!ehlo_lines(&mut active).contains(&"STARTTLS".to_string()));
        assert!(active.is_tls());
        assert!(
            matches!(active.command(b"STARTTLS\r\n", &env), Step::Reply(ref r) if r.code == 503)
        );
    }

    #[test]
    fn learned_recipients_decide_while_the_primary_is_down() {
        let p = policy::sample_verifying();
        let room = |_| true;
        let knowledge = |address: &str| match address {
            "known@example.com" => Knowledge::Exists,
            "gone@example.com" => Knowledge::DoesNotExist,
            _ => Knowledge::Unseen,
        };
        for (down, unseen_code) in [(true, 450), (false, 250)] {
            let primary_down = move |_: &str| down;
            let env = Env {
                policy: &p,
                spool_has_room: &room,
                knowledge: &knowledge,
                primary_down: &primary_down,
                may_call_out: &|_| false,
            };
            let mut s = local();
            s.command(b"EHLO c\r\n", &env);
            s.command(b"MAIL FROM:<a@b.test>\r\n", &env);
            let code = |s: &mut Session, rcpt: &str| match s
                .command(format!("RCPT TO:<{rcpt}>\r\n").as_bytes(), &env)
            {
                Step::Reply(r) => (r.code, r.status),
                other => panic!("{other:?}"),
            };
            assert_eq!(code(&mut s, "known@example.com"), (250, "2.1.5"));
            assert_eq!(code(&mut s, "gone@example.com"), (550, "5.1.1"));
            assert_eq!(code(&mut s, "new@example.com").0, unseen_code);
            assert_eq!(code(&mut s, "postmaster@example.com").0, 250);
            // example.org does not verify: learned knowledge is not consulted.
            assert_eq!(code(&mut s, "alice@example.org").0, 250);
        }
    }

    #[test]
    fn unseen_recipients_are_checked_with_the_primary_while_it_is_up() {
        let p = policy::sample_verifying();
        let room = |_| true;
        let knowledge = |address: &str| match address {
            "known@example.com" => Knowledge::Exists,
            _ => Knowledge::Unseen,
        };
        for down in [false, true] {
            let primary_down = move |_: &str| down;
            let env = Env {
                policy: &p,
                spool_has_room: &room,
                knowledge: &knowledge,
                primary_down: &primary_down,
                may_call_out: &|_| true,
            };
            let mut s = local();
            s.command(b"EHLO c\r\n", &env);
            s.command(b"MAIL FROM:<a@b.test>\r\n", &env);
            let step = s.command(b"RCPT TO:<New@example.com>\r\n", &env);
            if down {
                // A callout can only fail while the primary is down.
                assert!(
                    matches!(step, Step::Reply(ref r) if r.code == 450),
                    "{step:?}"
                );
            } else {
                assert_eq!(step, Step::Verify("New@example.com".into()));
            }
            // Known, non-verifying and postmaster recipients need no callout.
            for rcpt in [
                "known@example.com",
                "alice@example.org",
                "postmaster@example.com",
            ] {
                let step = s.command(format!("RCPT TO:<{rcpt}>\r\n").as_bytes(), &env);
                assert!(
                    matches!(step, Step::Reply(ref r) if r.code == 250),
                    "{rcpt}: {step:?}"
                );
            }
            let Some(t) = &s.transaction else {
                panic!("the transaction was lost")
            };
            assert_eq!(t.recipients.len(), 3, "asking changed nothing");
        }
    }

    #[test]
    fn etrn() {
        let p = policy::sample();
        let env = plain(&p);
        let mut s = local();
        s.command(b"EHLO c\r\n", &env);
        assert_eq!(
            s.command(b"ETRN Example.COM\r\n", &env),
            Step::Etrn {
                domain: "example.com".into(),
                reply: Reply::new(250, "2.0.0", "Queuing for node <Example.COM> started"),
            }
        );
        assert!(matches!(
            s.command(b"ETRN @sub.example.org\r\n", &env),
            Step::Etrn { ref domain, .. } if domain == "example.org"
        ));
        assert!(
            matches!(s.command(b"ETRN other.test\r\n", &env), Step::Reply(ref r) if r.code == 458)
        );
        assert!(matches!(s.command(b"ETRN #queue\r\n", &env), Step::Reply(ref r) if r.code == 458));

        let mut remote = Session::new("198.51.100.1".parse().unwrap());
        remote.command(b"EHLO c\r\n", &env);
        assert!(
            matches!(remote.command(b"ETRN example.com\r\n", &env), Step::Reply(ref r) if r.code == 459)
        );
    }

    #[test]
    fn full_spool_refuses_mail_temporarily() {
        let p = policy::sample();
        let full = |_| false;
        let env = Env {
            policy: &p,
            spool_has_room: &full,
            knowledge: &|_| Knowledge::Unseen,
            primary_down: &|_| false,
            may_call_out: &|_| false,
        };
        let mut s = local();
        s.command(b"EHLO c\r\n", &env);
        assert!(matches!(
            s.command(b"MAIL FROM:<a@b.test>\r\n", &env),
            Step::Reply(ref r) if r.code == 452 && r.status == "4.3.1"
        ));
    }

    #[test]
    fn finish_data_checks_size_and_hops() {
        let p = policy::sample();
        let env = plain(&p);
        let data = |body: &[u8], oversize| Data {
            body: body.to_vec(),
            size: body.len() as u64,
            oversize,
            has_8bit: false,
            normalised: false,
        };
        let mut s = local();
        for (body, oversize, want) in [
            (b"Subject: hi\r\n\r\nx\r\n".to_vec(), false, None),
            (Vec::new(), true, Some(552)),
            ("Received: x\r\n".repeat(5).into_bytes(), false, Some(554)),
            ("Received: x\r\n".repeat(4).into_bytes(), false, None),
        ] {
            run(
                &mut s,
                &p,
                &[
                    ("EHLO c", 250),
                    ("MAIL FROM:<a@b.test>", 250),
                    ("RCPT TO:<x@example.com>", 250),
                ],
            );
            let got = s.finish_data(&data(&body, oversize), &p);
            assert_eq!(got.err().map(|r| r.code), want);
            // The transaction is over either way.
            assert!(matches!(s.command(b"DATA\r\n", &env), Step::Reply(ref r) if r.code == 503));
        }
    }

    /// Gives `command` (a BDAT) and then `octets` in pieces of 3; returns what
    /// became of the chunk.
    fn bdat(s: &mut Session, p: &Policy, command: &str, octets: &[u8]) -> Chunked {
        let step = s.command(format!("{command}\r\n").as_bytes(), &plain(p));
        let Step::Chunk { size } = step else {
            panic!("{command}: {step:?}");
        };
        assert_eq!(size, octets.len() as u64, "{command}");
        for piece in octets.chunks(3) {
            s.chunk(piece);
        }
        s.end_chunk(p)
    }

    /// The reply code of a chunk's outcome; 0 for a message to commit.
    fn chunk_code(outcome: &Chunked) -> u16 {
        match outcome {
            Chunked::Reply(r) | Chunked::Discarded(r) => r.code,
            Chunked::Message(..) => 0,
        }
    }

    fn ready(s: &mut Session, p: &Policy) {
        run(
            s,
            p,
            &[
                ("MAIL FROM:<a@b.test>", 250),
                ("RCPT TO:<x@example.com>", 250),
            ],
        );
    }

    #[test]
    fn chunking_is_offered_to_ehlo_clients_only() {
        let p = policy::sample();
        let env = plain(&p);
        let mut s = local();
        let Step::Reply(ehlo) = s.command(b"EHLO c\r\n", &env) else {
            panic!("EHLO")
        };
        assert!(ehlo.lines.contains(&"CHUNKING".to_string()), "{ehlo}");

        for greeting in [None, Some("HELO c")] {
            let mut s = local();
            if let Some(g) = greeting {
                run(&mut s, &p, &[(g, 250), ("MAIL FROM:<a@b.test>", 250)]);
            }
            let step = s.command(b"BDAT 10 LAST\r\n", &env);
            assert!(
                matches!(step, Step::Close(ref r) if r.code == 503),
                "{greeting:?}: {step:?}"
            );
        }
    }

    #[test]
    fn chunks_make_one_message_with_crlf_line_endings() {
        let p = policy::sample();
        let mut s = local();
        run(&mut s, &p, &[("EHLO c", 250)]);
        ready(&mut s, &p);
        let first = bdat(&mut s, &p, "BDAT 6", b"ab\r\n.\r");
        assert_eq!(
            first,
            Chunked::Reply(Reply::new(250, "2.0.0", "Ok: 6 octets"))
        );
        // The envelope is settled and DATA is over once content has begun;
        // these refusals leave the transaction alone.
        run(
            &mut s,
            &p,
            &[
                ("RCPT TO:<y@example.com>", 503),
                ("DATA", 503),
                ("MAIL FROM:<a@b.test>", 503),
                ("NOOP", 250),
            ],
        );
        assert_eq!(chunk_code(&bdat(&mut s, &p, "bdat 0", b"")), 250);
        let last = bdat(&mut s, &p, "BDAT 4 last", b"\nx\r\xe9");
        let Chunked::Message(t, data) = last else {
            panic!("{last:?}")
        };
        assert_eq!(t.recipients.len(), 1);
        // The last line gets the line break it lacked.
        assert_eq!(data.body, b"ab\r\n.\r\nx\r\n\xe9\r\n");
        assert!(data.normalised);
        assert!(data.has_8bit);
        // The transaction is over: a chunk after LAST is out of order.
        assert_eq!(chunk_code(&bdat(&mut s, &p, "BDAT 1 LAST", b"x")), 503);
    }

    #[test]
    fn bdat_0_last_alone_is_an_empty_message() {
        let p = policy::sample();
        let mut s = local();
        run(&mut s, &p, &[("EHLO c", 250)]);
        ready(&mut s, &p);
        let Chunked::Message(_, data) = bdat(&mut s, &p, "BDAT 0 LAST", b"") else {
            panic!("BDAT 0 LAST")
        };
        assert!(data.body.is_empty());
    }

    #[test]
    fn chunks_out_of_order_are_read_and_refused() {
        let p = policy::sample();
        let mut s = local();
        run(&mut s, &p, &[("EHLO c", 250)]);
        let no_mail = bdat(&mut s, &p, "BDAT 3 LAST", b"abc");
        assert_eq!(
            no_mail,
            Chunked::Reply(Reply::new(503, "5.5.1", "Error: need MAIL command"))
        );
        run(&mut s, &p, &[("MAIL FROM:<a@b.test>", 250)]);
        let no_rcpt = bdat(&mut s, &p, "BDAT 3 LAST", b"abc");
        assert_eq!(
            no_rcpt,
            Chunked::Reply(Reply::new(503, "5.5.1", "Error: need RCPT command"))
        );
        // Either refusal ended the transaction.
        run(&mut s, &p, &[("RCPT TO:<x@example.com>", 503)]);
    }

    #[test]
    fn after_a_refused_chunk_the_pipelined_ones_are_discarded_until_last() {
        let p = policy::sample();
        let mut s = local();
        run(&mut s, &p, &[("EHLO c", 250)]);
        ready(&mut s, &p);
        assert_eq!(chunk_code(&bdat(&mut s, &p, "BDAT 600", &[b'a'; 600])), 250);
        // 600 + 401 > 1000: refused, the transaction is over.
        let over = bdat(&mut s, &p, "BDAT 401", &[b'a'; 401]);
        assert_eq!(over, Chunked::Reply(too_big()));
        // More than MAX_ERRORS of them: the client's pipeline, not its errors.
        for _ in 0..MAX_ERRORS + 2 {
            let next = bdat(&mut s, &p, "BDAT 2", b"ab");
            assert!(
                matches!(&next, Chunked::Discarded(r) if r.code == 503),
                "{next:?}"
            );
        }
        let last = bdat(&mut s, &p, "BDAT 1 LAST", b"b");
        assert!(
            matches!(&last, Chunked::Discarded(r) if r.code == 503),
            "{last:?}"
        );
        // After LAST the client starts afresh; exactly the limit is fine.
        ready(&mut s, &p);
        let mut full = vec![b'a'; 998];
        full.extend_from_slice(b"\r\n");
        assert_eq!(chunk_code(&bdat(&mut s, &p, "BDAT 1000 LAST", &full)), 0);

        // RSET and MAIL end the discarding too.
        for restart in ["RSET", "MAIL FROM:<a@b.test>"] {
            ready(&mut s, &p);
            assert_eq!(
                chunk_code(&bdat(&mut s, &p, "BDAT 1001", &[b'a'; 1001])),
                552
            );
            run(&mut s, &p, &[(restart, 250)]);
            if restart == "RSET" {
                run(&mut s, &p, &[("MAIL FROM:<a@b.test>", 250)]);
            }
            run(&mut s, &p, &[("RCPT TO:<x@example.com>", 250)]);
            assert_eq!(chunk_code(&bdat(&mut s, &p, "BDAT 1 LAST", b"z")), 0);
        }
    }

    #[test]
    fn normalisation_can_take_chunks_over_the_limit() {
        let p = policy::sample();
        let mut s = local();
        run(&mut s, &p, &[("EHLO c", 250)]);
        ready(&mut s, &p);
        // 600 bare LFs are 1200 octets stored.
        let over = bdat(&mut s, &p, "BDAT 600 LAST", &[b'\n'; 600]);
        assert_eq!(over, Chunked::Reply(too_big()));
    }

    #[test]
    fn rset_drops_the_chunks_received() {
        let p = policy::sample();
        let mut s = local();
        run(&mut s, &p, &[("EHLO c", 250)]);
        ready(&mut s, &p);
        assert_eq!(chunk_code(&bdat(&mut s, &p, "BDAT 3", b"old")), 250);
        run(&mut s, &p, &[("RSET", 250)]);
        ready(&mut s, &p);
        let Chunked::Message(_, data) = bdat(&mut s, &p, "BDAT 3 LAST", b"new") else {
            panic!("BDAT 3 LAST")
        };
        assert_eq!(data.body, b"new\r\n");
    }

    #[test]
    fn the_last_chunk_gets_the_loop_check() {
        let p = policy::sample();
        let mut s = local();
        run(&mut s, &p, &[("EHLO c", 250)]);
        ready(&mut s, &p);
        let hops = "Received: x\r\n".repeat(5);
        let looped = bdat(
            &mut s,
            &p,
            &format!("BDAT {} LAST", hops.len()),
            hops.as_bytes(),
        );
        assert_eq!(chunk_code(&looped), 554);
    }

    #[test]
    fn a_malformed_bdat_closes_the_connection() {
        let p = policy::sample();
        let env = plain(&p);
        for line in [
            "BDAT",
            "BDAT x",
            "BDAT 12x LAST",
            "BDAT 5 FIRST",
            "BDAT -1",
            "bdat LAST",
        ] {
            let mut s = local();
            run(&mut s, &p, &[("EHLO c", 250)]);
            ready(&mut s, &p);
            let step = s.command(format!("{line}\r\n").as_bytes(), &env);
            assert!(
                matches!(step, Step::Close(ref r) if r.code == 501 && r.status == "5.5.4"),
                "{line}: {step:?}"
            );
        }
    }

    #[test]
    fn out_of_order_chunks_count_towards_the_error_limit() {
        let p = policy::sample();
        let env = plain(&p);
        let mut s = local();
        run(&mut s, &p, &[("EHLO c", 250)]);
        for _ in 1..MAX_ERRORS {
            assert_eq!(chunk_code(&bdat(&mut s, &p, "BDAT 1 LAST", b"x")), 503);
        }
        let step = s.command(b"BDAT 1 LAST\r\n", &env);
        assert!(
            matches!(step, Step::Close(ref r) if r.code == 421),
            "{step:?}"
        );
    }
}
