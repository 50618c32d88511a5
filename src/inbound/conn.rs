//! The async shell around [`Session`]: reads command lines and message data from
//! the socket, performs the session's steps (commit to the spool, ETRN), writes
//! replies, and enforces timeouts and shutdown. Generic over the stream so a TLS
//! stream or an in-memory pipe speak the same protocol code.
//!
//! Replies are buffered while more pipelined commands are already waiting and
//! flushed before every read that would block (RFC 2920). A BDAT chunk is read
//! by its announced length straight from the input buffer, where it may sit
//! together with the commands pipelined after it; nothing is allocated by the
//! length a client announces.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use smtp_proto::Request;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info, warn};

use super::Inbound;
use super::data::Data;
use super::dnsbl::Screen;
pub use super::io::MAX_LINE;
use super::io::{Input, Io, Stop};
use super::policy::Policy;
use super::received::Trace;
use super::reply::Reply;
use super::session::{Chunked, Env, Session, Step, Tls, Transaction};
use super::spf;
use crate::address::domain_of;
use crate::config;
use crate::knowledge::{Knowledge, Verdict};
use crate::shutdown::Shutdown;
use crate::spool::{Client, CommitError, Envelope};
use crate::status::Rejection;

/// Longest a whole session may last: slow-drip clients cannot hold a slot
/// indefinitely by sending one byte per timeout period.
pub const SESSION_LIMIT: Duration = Duration::from_secs(3600);

/// Serves one SMTP connection until QUIT, error, timeout or shutdown.
pub async fn serve<S>(stream: S, peer: SocketAddr, inbound: Arc<Inbound>, mut shutdown: Shutdown)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = tokio::time::Instant::now() + SESSION_LIMIT;
    let mut io = Io::new(stream, deadline);
    let acceptor = inbound.tls_acceptor();
    let tls = if acceptor.is_some() {
        Tls::Offered
    } else {
        Tls::Unavailable
    };
    // DNS lists are asked while we greet; the answer is needed at RCPT.
    let mut screen = inbound.dnsbl.start(peer.ip(), &inbound.policy().dnsbl);
    Session::greeting(&inbound.policy()).write_to(&mut io.output);
    let session = Session::with_tls(peer.ip(), tls);
    let stop = converse(&mut io, session, peer, &inbound, &mut screen, &mut shutdown).await;
    let (Stop::StartTls, Some(acceptor)) = (&stop, acceptor) else {
        return finish(io, stop, &inbound).await;
    };
    // What the client sent before the handshake was already dropped; the
    // conversation starts over inside TLS with a new EHLO (RFC 3207 §4.2).
    let handshake =
        tokio::time::timeout(inbound.policy().command_timeout, acceptor.accept(io.stream)).await;
    let stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return debug!(error = %e, "TLS handshake failed"),
        Err(_) => return debug!("TLS handshake timed out"),
    };
    debug!("TLS established");
    let mut io = Io::new(stream, deadline);
    let session = Session::with_tls(peer.ip(), Tls::Active);
    let stop = converse(&mut io, session, peer, &inbound, &mut screen, &mut shutdown).await;
    finish(io, stop, &inbound).await;
}

/// Says goodbye where one is due (timeout, shutdown) and closes.
async fn finish<S>(mut io: Io<S>, stop: Stop, inbound: &Inbound)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let policy = inbound.policy();
    let farewell = match &stop {
        Stop::Timeout => Some(Reply::refuse(
            Rejection::Timeout,
            421,
            "4.4.2",
            format!("{} Error: timeout exceeded", policy.hostname),
        )),
        // Our own goodbye, not a refusal of the client: not counted.
        Stop::Shutdown => Some(Reply::new(
            421,
            "4.3.2",
            format!(
                "{} Service shutting down, closing connection",
                policy.hostname
            ),
        )),
        Stop::Eof | Stop::Io(_) | Stop::StartTls => None,
    };
    if let Some(reply) = farewell {
        counted(inbound, reply).write_to(&mut io.output);
        let _ = tokio::time::timeout(Duration::from_secs(5), io.flush()).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), io.stream.shutdown()).await;
    match stop {
        Stop::Io(e) => debug!(error = %e, "connection lost"),
        stop => debug!(?stop, "disconnected"),
    }
}

/// The conversation: each line of input goes to the session, and what it
/// decides is carried out, until the connection must stop.
async fn converse<S>(
    io: &mut Io<S>,
    mut session: Session,
    peer: SocketAddr,
    inbound: &Inbound,
    screen: &mut Screen,
    shutdown: &mut Shutdown,
) -> Stop
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let input = match io
            .next_line(inbound.policy().command_timeout, shutdown)
            .await
        {
            Ok(input) => input,
            Err(stop) => return stop,
        };
        let policy = inbound.policy();
        if let Input::Line(line) = &input
            && is_rcpt(line)
        {
            session.screened(screen.verdict().await);
            session.set_allowlisted(screen.allowlisted());
            check_spf(&mut session, line, inbound, &policy).await;
        }
        let step = next_step(io, &mut session, &input, inbound, &policy).await;
        if let Step::Reply(reply) = &step
            && reply.rejection == Some(Rejection::Dnsbl)
        {
            log_listed(&session, &input, screen).await;
        }
        if let Step::Reply(reply) = &step
            && reply.rejection == Some(Rejection::Spf)
        {
            log_spf_fail(&session, &input, peer);
        }
        let done = perform(io, &mut session, step, peer, inbound, &policy, shutdown).await;
        if let Err(stop) = done {
            return stop;
        }
    }
}

/// Whether a command line is RCPT: the DNS lists' verdict is due then.
fn is_rcpt(line: &[u8]) -> bool {
    line.get(..4)
        .is_some_and(|verb| verb.eq_ignore_ascii_case(b"RCPT"))
}

/// Before RCPT for a domain with `spf` on: checks SPF of the transaction's
/// sender, unless that was done already, so the session can judge.
async fn check_spf(session: &mut Session, line: &[u8], inbound: &Inbound, policy: &Policy) {
    let Some(sender) = session.sender() else {
        return;
    };
    if session.spf().is_some() {
        return;
    }
    let Ok(Request::Rcpt { to }) = Request::parse(&mut line.iter()) else {
        return;
    };
    if policy.spf(&to.address) == config::Spf::Off {
        return;
    }
    let sender = sender.to_owned();
    let helo = session.helo_name().to_owned();
    let spf = inbound
        .spf
        .check(session.ip(), &helo, &sender, &policy.hostname)
        .await;
    debug!(result = spf.outcome.label(), %sender, %helo, "SPF");
    session.spf_checked(spf);
}

/// Logs an SPF refusal with who was refused, for whom, and for what.
fn log_spf_fail(session: &Session, input: &Input, peer: SocketAddr) {
    let Input::Line(line) = input else { return };
    let line = String::from_utf8_lossy(line);
    let rcpt = line.split_once(':').map_or(&*line, |(_, path)| path);
    info!(
        client = %peer.ip(),
        helo = session.helo_name(),
        sender = session.sender().unwrap_or(""),
        recipient = %rcpt.trim_end(),
        "refused: SPF fail"
    );
}

/// Logs a DNS list refusal with who was refused, for what, and which list
/// decided.
async fn log_listed(session: &Session, input: &Input, screen: &mut Screen) {
    let Input::Line(line) = input else { return };
    let line = String::from_utf8_lossy(line);
    let rcpt = line.split_once(':').map_or(&*line, |(_, path)| path);
    let (zone, score) = screen
        .verdict()
        .await
        .map_or(("", 0), |b| (b.zone.as_str(), b.score));
    info!(
        sender = session.sender().unwrap_or(""),
        recipient = %rcpt.trim_end(),
        zone,
        score,
        "refused: client blocked by DNS lists"
    );
}

/// What the session makes of one line of input. At most one callout per
/// command: the command is then given again with the primary's answer (or
/// lack of one) known.
async fn next_step<S>(
    io: &Io<S>,
    session: &mut Session,
    input: &Input,
    inbound: &Inbound,
    policy: &Policy,
) -> Step
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut asked: Option<(String, Verdict)> = None;
    loop {
        let step = ask(io, session, input, inbound, policy, asked.as_ref());
        match step {
            Step::Verify(address) if asked.is_none() => {
                let now = inbound.clock.now_ms();
                let verdict = inbound.callouts.verify(&address, now).await;
                debug!(%address, ?verdict, "callout");
                asked = Some((address, verdict));
            }
            step => return step,
        }
    }
}

/// Gives the session one line, with what it may consult: room in the spool,
/// what primaries told us (`asked`: the callout made for this command, if
/// any), whether they are down.
fn ask<S>(
    io: &Io<S>,
    session: &mut Session,
    input: &Input,
    inbound: &Inbound,
    policy: &Policy,
    asked: Option<&(String, Verdict)>,
) -> Step
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let spool_has_room = |size| inbound.spool.has_room(size);
    let now = inbound.clock.now_ms();
    let answer = |address: &str| match &asked {
        Some((a, verdict)) if a == address => Some(*verdict),
        _ => None,
    };
    let knowledge = |address: &str| match answer(address) {
        Some(Verdict::Exists) => Knowledge::Exists,
        Some(Verdict::DoesNotExist) => Knowledge::DoesNotExist,
        _ => inbound.learned.lookup(address, now),
    };
    let primary_down = |address: &str| {
        answer(address) == Some(Verdict::Unreachable) || inbound.health.is_down(&domain_of(address))
    };
    let may_call_out = |_: &str| asked.is_none();
    // Asked only for a recipient of a domain that defers or greylists, not
    // for every line.
    let ip = session.ip();
    let trusted = || policy.dnsbl.trusts(ip);
    let primary_up = |address: &str| {
        policy.defers_when_up(address).is_some_and(|domain| {
            !trusted()
                && inbound
                    .health
                    .fresh_up(domain, now, policy.primary_fresh_for)
        })
    };
    let allowlisted = session.allowlisted();
    let greylisted = |sender: &str, address: &str| {
        policy.greylists(address)
            && !allowlisted
            && !trusted()
            && inbound
                .greylist
                .check(ip, sender, address, now, &policy.greylist)
                .refuses()
    };
    let env = Env {
        policy,
        spool_has_room: &spool_has_room,
        knowledge: &knowledge,
        primary_down: &primary_down,
        may_call_out: &may_call_out,
        primary_up: &primary_up,
        greylisted: &greylisted,
    };
    match input {
        // RFC 2920: only after our EHLO reply offered PIPELINING may a
        // client send a command before the previous reply arrived.
        // Spamware that talks without listening is refused, as with
        // Postfix's smtpd_forbid_unauth_pipelining.
        Input::Line(_) if !io.pending().is_empty() && !session.may_pipeline() => {
            Step::Close(out_of_sync())
        }
        Input::Line(line) => {
            if asked.is_none() {
                debug!(command = %String::from_utf8_lossy(line).trim_end(), "client");
            }
            match session.command(line, &env) {
                // DATA ends a group: content before our 354 is out of turn.
                Step::Data(_) if !io.pending().is_empty() => Step::Close(out_of_sync()),
                step => step,
            }
        }
        Input::TooLong => session.line_too_long(),
    }
}

/// Carries out what the session decided: queue the reply, flush ETRN's
/// domain, hand over to the TLS handshake, close, or read a message's content
/// and commit it. `Err` says why the conversation stops.
async fn perform<S>(
    io: &mut Io<S>,
    session: &mut Session,
    step: Step,
    peer: SocketAddr,
    inbound: &Inbound,
    policy: &Policy,
    shutdown: &mut Shutdown,
) -> Result<(), Stop>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match step {
        Step::Reply(reply) => {
            debug!(%reply, "server");
            if let Some(why) = reply.rejection {
                info!(reply = %reply, "rejected");
                inbound.metrics.reject(why);
            }
            reply.write_to(&mut io.output);
        }
        Step::Etrn { domain, reply } => {
            info!(%domain, "ETRN");
            inbound.request_flush(domain);
            reply.write_to(&mut io.output);
        }
        Step::StartTls(reply) => {
            reply.write_to(&mut io.output);
            io.flush().await?;
            // Plaintext pipelined after STARTTLS must not be read as if it
            // came inside TLS (CVE-2011-0411).
            if !io.pending().is_empty() {
                info!(
                    bytes = io.pending().len(),
                    "discarding input sent before the TLS handshake"
                );
            }
            io.discard_input();
            return Err(Stop::StartTls);
        }
        Step::Verify(address) => {
            // The session asks only once per command; never loop on it.
            warn!(%address, "second callout request for one command");
            Reply::refuse(Rejection::Other, 451, "4.3.0", "Error: try again later")
                .write_to(&mut io.output);
        }
        Step::Close(reply) => {
            counted(inbound, reply).write_to(&mut io.output);
            return Err(io.flush().await.err().unwrap_or(Stop::Eof));
        }
        Step::Data(reply) => {
            reply.write_to(&mut io.output);
            let reply = receive_data(io, session, peer, inbound, policy, shutdown).await?;
            reply.write_to(&mut io.output);
        }
        Step::Chunk { size } => {
            let reply = receive_chunk(io, session, size, peer, inbound, policy, shutdown).await?;
            reply.write_to(&mut io.output);
        }
    }
    Ok(())
}

/// After our 354: reads the message, then commits it or says why not.
async fn receive_data<S>(
    io: &mut Io<S>,
    session: &mut Session,
    peer: SocketAddr,
    inbound: &Inbound,
    policy: &Policy,
    shutdown: &mut Shutdown,
) -> Result<Reply, Stop>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let data = io
        .read_data(policy.max_message_size, policy.data_timeout, shutdown)
        .await?;
    let reply = match session.finish_data(&data, policy) {
        Err(reply) => {
            info!(reply = %reply, size = data.size, "message refused");
            counted(inbound, reply)
        }
        Ok(transaction) => store(inbound, session, peer, policy, transaction, data).await,
    };
    Ok(reply)
}

/// After a BDAT: reads its `size` octets into the session, then replies as
/// the session says, committing the message a LAST chunk completed.
async fn receive_chunk<S>(
    io: &mut Io<S>,
    session: &mut Session,
    size: u64,
    peer: SocketAddr,
    inbound: &Inbound,
    policy: &Policy,
    shutdown: &mut Shutdown,
) -> Result<Reply, Stop>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    io.read_chunk(
        size,
        |octets| session.chunk(octets),
        policy.data_timeout,
        shutdown,
    )
    .await?;
    let reply = match session.end_chunk(policy) {
        Chunked::Reply(reply) => {
            if let Some(why) = reply.rejection {
                info!(reply = %reply, size, "chunk refused");
                inbound.metrics.reject(why);
            }
            reply
        }
        Chunked::Discarded(reply) => {
            debug!(reply = %reply, size, "chunk discarded");
            reply
        }
        Chunked::Message(transaction, data) => {
            store(inbound, session, peer, policy, transaction, data).await
        }
    };
    Ok(reply)
}

/// Prepends our `Received:` to a finished message (and, for domains with
/// `spf` on, what SPF said) and commits it; the reply says how that went.
/// `Authentication-Results:` claiming to be ours are removed whatever the
/// domain (RFC 8601 §5): a primary that trusts our results must be able to
/// trust every one of them.
async fn store(
    inbound: &Inbound,
    session: &Session,
    peer: SocketAddr,
    policy: &Policy,
    transaction: Transaction,
    data: Data,
) -> Reply {
    let now_micros = inbound.clock.now_micros();
    let id = inbound.spool.next_id(now_micros);
    let trace = Trace {
        helo: session.helo_name(),
        ip: peer.ip(),
        by: &policy.hostname,
        esmtp: session.is_esmtp(),
        tls: session.is_tls(),
        smtputf8: transaction.smtputf8,
        id,
        only_recipient: match transaction.recipients.as_slice() {
            [only] => Some(only.address.as_str()),
            _ => None,
        },
        date: (now_micros / 1_000_000) as i64,
        fetched_with: None,
    };
    let mut header = String::new();
    if let Some(spf) = session.spf_for(&transaction.sender)
        && transaction
            .recipients
            .iter()
            .any(|r| policy.spf(&r.address) != config::Spf::Off)
    {
        // Above our `Received:` (RFC 7208 §9.1).
        header.push_str(&spf.header(&policy.hostname));
    }
    header.push_str(&trace.header());
    let content = spf::strip_claims(&data.body, &policy.hostname);
    let mut body = Vec::with_capacity(header.len() + content.len());
    body.extend_from_slice(header.as_bytes());
    body.extend_from_slice(&content);
    let now_ms = now_micros / 1000;
    let mut recipients = transaction.recipients;
    for r in &mut recipients {
        r.next_attempt_ms = now_ms;
    }
    let envelope = Envelope {
        id,
        sender: transaction.sender,
        ret: transaction.ret,
        envid: transaction.envid,
        envid_xtext: transaction.envid_xtext,
        body_type: transaction.body_type,
        smtputf8: transaction.smtputf8,
        has_8bit: data.has_8bit,
        arrived_ms: now_ms,
        size: body.len() as u64,
        client: Client {
            ip: peer.ip(),
            helo: session.helo_name().to_owned(),
            tls: session.is_tls(),
        },
        recipients,
        notices_to: None,
    };
    commit(inbound, envelope, body).await
}

/// `reply`, its refusal (if it is one) counted.
fn counted(inbound: &Inbound, reply: Reply) -> Reply {
    if let Some(why) = reply.rejection {
        inbound.metrics.reject(why);
    }
    reply
}

fn out_of_sync() -> Reply {
    Reply::refuse(
        Rejection::Pipelining,
        554,
        "5.5.0",
        "Error: SMTP protocol synchronization",
    )
}

/// Stores the message and says how it went; 250 only once it is on disk.
async fn commit(inbound: &Inbound, envelope: Envelope, body: Vec<u8>) -> Reply {
    let id = envelope.id;
    let sender = envelope.sender.clone();
    let recipients = envelope.recipients.len();
    let size = envelope.size;
    match inbound.enqueue(envelope, body, None).await {
        Ok(()) => {
            info!(queue_id = %id, from = %sender, recipients, size, "queued");
            inbound.metrics.accepted.inc();
            Reply::new(250, "2.0.0", format!("Ok: queued as {id}"))
        }
        Err(CommitError::Full) => {
            warn!(queue_id = %id, size, "spool full, message refused");
            let text = "Error: insufficient system storage";
            counted(
                inbound,
                Reply::refuse(Rejection::SpoolFull, 452, "4.3.1", text),
            )
        }
        Err(e) => {
            warn!(queue_id = %id, error = %e, "message not stored");
            let text = "Error: queue file write error";
            counted(
                inbound,
                Reply::refuse(Rejection::SpoolError, 451, "4.3.0", text),
            )
        }
    }
}
