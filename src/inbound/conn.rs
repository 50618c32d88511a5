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

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info, warn};

use super::Inbound;
use super::data::{Data, DataReader};
use super::policy::Policy;
use super::received::Trace;
use super::reply::Reply;
use super::session::{Chunked, Env, Session, Step, Tls, Transaction};
use crate::address::domain_of;
use crate::knowledge::{Knowledge, Verdict};
use crate::shutdown::Shutdown;
use crate::spool::{Client, CommitError, Envelope, NewMessage};

/// Longest command line we read (Postfix's `line_length_limit`); longer lines
/// are discarded up to their end and refused with 500 5.5.2.
pub const MAX_LINE: usize = 2048;
const READ_CHUNK: usize = 16 * 1024;
/// Longest a whole session may last: slow-drip clients cannot hold a slot
/// indefinitely by sending one byte per timeout period.
pub const SESSION_LIMIT: Duration = Duration::from_secs(3600);
/// Longest we wait for a client to take our replies off the socket.
const WRITE_TIMEOUT: Duration = Duration::from_secs(300);

enum Input {
    Line(Vec<u8>),
    TooLong,
}

#[derive(Debug)]
enum Stop {
    /// The client closed the connection.
    Eof,
    Timeout,
    Shutdown,
    Io(std::io::Error),
    /// The client asked for TLS: the caller does the handshake.
    StartTls,
}

/// The connection's bytes: what has been read but not used, and replies not yet sent.
struct Io<S> {
    stream: S,
    /// The whole session must end by then, however slowly the client trickles.
    deadline: tokio::time::Instant,
    input: Vec<u8>,
    /// Start of unconsumed bytes in `input`.
    start: usize,
    output: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Io<S> {
    fn new(stream: S, deadline: tokio::time::Instant) -> Io<S> {
        Io {
            stream,
            deadline,
            input: Vec::new(),
            start: 0,
            output: Vec::new(),
        }
    }

    fn pending(&self) -> &[u8] {
        &self.input[self.start..]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.input.len() {
            self.input.clear();
            self.start = 0;
        }
    }

    /// Time left for one read or write: `timeout`, but never past the deadline.
    fn limit(&self, timeout: Duration) -> Duration {
        timeout.min(
            self.deadline
                .saturating_duration_since(tokio::time::Instant::now()),
        )
    }

    async fn flush(&mut self) -> Result<(), Stop> {
        if !self.output.is_empty() {
            // A client that never reads its replies must not hold us forever.
            let limit = self.limit(WRITE_TIMEOUT);
            let write = async {
                self.stream.write_all(&self.output).await?;
                self.stream.flush().await
            };
            match tokio::time::timeout(limit, write).await {
                Err(_) => return Err(Stop::Timeout),
                Ok(Err(e)) => return Err(Stop::Io(e)),
                Ok(Ok(())) => {}
            }
            self.output.clear();
        }
        Ok(())
    }

    /// Sends pending replies, then waits for more input.
    async fn fill(&mut self, timeout: Duration, shutdown: &mut Shutdown) -> Result<(), Stop> {
        self.flush().await?;
        if self.start > 0 {
            self.input.drain(..self.start);
            self.start = 0;
        }
        let len = self.input.len();
        self.input.resize(len + READ_CHUNK, 0);
        let limit = self.limit(timeout);
        let read = tokio::select! {
            r = tokio::time::timeout(limit, self.stream.read(&mut self.input[len..])) => r,
            () = shutdown.wait() => {
                self.input.truncate(len);
                return Err(Stop::Shutdown);
            }
        };
        let n = match read {
            Err(_) => Err(Stop::Timeout),
            Ok(Err(e)) => Err(Stop::Io(e)),
            Ok(Ok(0)) => Err(Stop::Eof),
            Ok(Ok(n)) => Ok(n),
        };
        self.input.truncate(len + *n.as_ref().unwrap_or(&0));
        n.map(|_| ())
    }

    async fn next_line(
        &mut self,
        timeout: Duration,
        shutdown: &mut Shutdown,
    ) -> Result<Input, Stop> {
        let mut skipping = false;
        loop {
            let pending = self.pending();
            if let Some(pos) = memchr::memchr(b'\n', pending) {
                let line = pending[..=pos].to_vec();
                self.consume(pos + 1);
                return Ok(if skipping || line.len() > MAX_LINE {
                    Input::TooLong
                } else {
                    Input::Line(line)
                });
            }
            if pending.len() > MAX_LINE {
                skipping = true;
                let n = pending.len();
                self.consume(n);
            }
            self.fill(timeout, shutdown).await?;
        }
    }

    async fn read_data(
        &mut self,
        max: u64,
        timeout: Duration,
        shutdown: &mut Shutdown,
    ) -> Result<Data, Stop> {
        let mut reader = DataReader::new(max);
        loop {
            let (used, done) = reader.feed(self.pending());
            self.consume(used);
            if let Some(data) = done {
                return Ok(data);
            }
            self.fill(timeout, shutdown).await?;
        }
    }

    /// Reads exactly `size` octets, handing each piece to `sink` as it comes.
    async fn read_chunk(
        &mut self,
        size: u64,
        mut sink: impl FnMut(&[u8]),
        timeout: Duration,
        shutdown: &mut Shutdown,
    ) -> Result<(), Stop> {
        let mut left = size;
        while left > 0 {
            if self.pending().is_empty() {
                self.fill(timeout, shutdown).await?;
            }
            let n = usize::try_from(left)
                .map_or(self.pending().len(), |left| left.min(self.pending().len()));
            sink(&self.pending()[..n]);
            self.consume(n);
            left -= n as u64;
        }
        Ok(())
    }
}

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
    Session::greeting(&inbound.policy()).write_to(&mut io.output);
    let session = Session::with_tls(peer.ip(), tls);
    let stop = converse(&mut io, session, peer, &inbound, &mut shutdown).await;
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
    let stop = converse(&mut io, session, peer, &inbound, &mut shutdown).await;
    finish(io, stop, &inbound).await;
}

/// Says goodbye where one is due (timeout, shutdown) and closes.
async fn finish<S>(mut io: Io<S>, stop: Stop, inbound: &Inbound)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let policy = inbound.policy();
    let farewell = match &stop {
        Stop::Timeout => Some(Reply::new(
            421,
            "4.4.2",
            format!("{} Error: timeout exceeded", policy.hostname),
        )),
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
        if matches!(stop, Stop::Timeout) {
            inbound.metrics.reject("timeout");
        }
        reply.write_to(&mut io.output);
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
        let step = next_step(io, &mut session, &input, inbound, &policy).await;
        let done = perform(io, &mut session, step, peer, inbound, &policy, shutdown).await;
        if let Err(stop) = done {
            return stop;
        }
    }
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
    let env = Env {
        policy,
        spool_has_room: &spool_has_room,
        knowledge: &knowledge,
        primary_down: &primary_down,
        may_call_out: &may_call_out,
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
            if reply.is_error() {
                info!(reply = %reply, "rejected");
                inbound.metrics.reject(reply.reason());
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
            io.input.clear();
            io.start = 0;
            return Err(Stop::StartTls);
        }
        Step::Verify(address) => {
            // The session asks only once per command; never loop on it.
            warn!(%address, "second callout request for one command");
            Reply::new(451, "4.3.0", "Error: try again later").write_to(&mut io.output);
        }
        Step::Close(reply) => {
            if reply.is_error() {
                inbound.metrics.reject(reply.reason());
            }
            reply.write_to(&mut io.output);
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
            inbound.metrics.reject(reply.reason());
            reply
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
            if reply.is_error() {
                info!(reply = %reply, size, "chunk refused");
                inbound.metrics.reject(reply.reason());
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

/// Prepends our `Received:` to a finished message and commits it; the reply
/// says how that went.
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
    };
    let header = trace.header();
    let mut body = Vec::with_capacity(header.len() + data.body.len());
    body.extend_from_slice(header.as_bytes());
    body.extend_from_slice(&data.body);
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
    };
    commit(inbound, envelope, body).await
}

fn out_of_sync() -> Reply {
    Reply::new(554, "5.5.0", "Error: SMTP protocol synchronization")
}

/// Stores the message and says how it went; 250 only once it is on disk.
async fn commit(inbound: &Inbound, mut envelope: Envelope, body: Vec<u8>) -> Reply {
    let id = envelope.id;
    let sender = envelope.sender.clone();
    let recipients = envelope.recipients.len();
    let size = envelope.size;
    // Mail for a primary known to be down is stored already waiting for it,
    // rather than stored due and rewritten by the scheduler a moment later.
    let waiting = inbound.delivery().suspend_new(&mut envelope);
    let due_now = envelope.recipients.iter().any(|r| !r.unreachable);
    match inbound.spool.commit(NewMessage { envelope, body }).await {
        Ok(()) => {
            info!(queue_id = %id, from = %sender, recipients, size, "queued");
            inbound.metrics.accepted.inc();
            if !waiting.is_empty() {
                inbound.delivery().waiting(id, waiting);
            }
            if due_now {
                inbound.notify_queued();
            }
            Reply::new(250, "2.0.0", format!("Ok: queued as {id}"))
        }
        Err(CommitError::Full) => {
            warn!(queue_id = %id, size, "spool full, message refused");
            inbound.metrics.reject("spool_full");
            Reply::new(452, "4.3.1", "Error: insufficient system storage")
        }
        Err(e) => {
            warn!(queue_id = %id, error = %e, "message not stored");
            inbound.metrics.reject("spool_error");
            Reply::new(451, "4.3.0", "Error: queue file write error")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client dripping one byte just inside every per-read timeout is still
    /// cut off at the session deadline.
    #[tokio::test(start_paused = true)]
    async fn the_session_deadline_stops_slow_drip_clients() {
        let (client, server) = tokio::io::duplex(64);
        let started = tokio::time::Instant::now();
        let mut io = Io::new(server, started + Duration::from_secs(10));
        let (_trigger, mut shutdown) = crate::shutdown::channel();
        let drip = tokio::spawn(async move {
            let mut client = client;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if client.write_all(b"x").await.is_err() {
                    return;
                }
            }
        });
        let result = io.next_line(Duration::from_secs(2), &mut shutdown).await;
        assert!(matches!(result, Err(Stop::Timeout)), "{:?}", result.err());
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_secs(10) && elapsed < Duration::from_secs(12),
            "{elapsed:?}"
        );
        drip.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_reads_cannot_block_replies_forever() {
        let (_client, server) = tokio::io::duplex(16);
        let mut io = Io::new(
            server,
            tokio::time::Instant::now() + Duration::from_secs(3600),
        );
        io.output = vec![b'x'; 1024];
        assert!(matches!(io.flush().await, Err(Stop::Timeout)));
    }

    /// A chunk is taken by its length from whatever the reads return: what
    /// looks like commands inside it is content, and the command pipelined
    /// right after it is the next line.
    #[tokio::test]
    async fn a_chunk_is_read_by_its_length_whatever_the_reads() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = Io::new(
            server,
            tokio::time::Instant::now() + Duration::from_secs(60),
        );
        let (_trigger, mut shutdown) = crate::shutdown::channel();
        let content = b"NOOP\r\n".repeat(50);
        let mut wire = b"BDAT 300\r\n".to_vec();
        wire.extend_from_slice(&content);
        wire.extend_from_slice(b"QUIT\r\n");
        let writer = tokio::spawn(async move {
            client.write_all(&wire).await.unwrap();
            client
        });
        let timeout = Duration::from_secs(5);
        let Ok(Input::Line(line)) = io.next_line(timeout, &mut shutdown).await else {
            panic!("no BDAT line")
        };
        assert_eq!(line, b"BDAT 300\r\n");
        let mut got = Vec::new();
        let read = io
            .read_chunk(300, |o| got.extend_from_slice(o), timeout, &mut shutdown)
            .await;
        assert!(read.is_ok(), "{:?}", read.err());
        assert_eq!(got, content);
        let Ok(Input::Line(line)) = io.next_line(timeout, &mut shutdown).await else {
            panic!("no line after the chunk")
        };
        assert_eq!(line, b"QUIT\r\n");
        drop(writer.await);
    }

    /// A client announcing a huge chunk gets nothing allocated for it: the
    /// input buffer stays at its reading size until the client gives up.
    #[tokio::test]
    async fn an_announced_size_is_never_allocated() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = Io::new(
            server,
            tokio::time::Instant::now() + Duration::from_secs(60),
        );
        let (_trigger, mut shutdown) = crate::shutdown::channel();
        tokio::spawn(async move {
            client.write_all(&[b'x'; 1000]).await.unwrap();
        });
        let mut seen = 0;
        let read = io
            .read_chunk(
                4_000_000_000,
                |o| seen += o.len(),
                Duration::from_secs(5),
                &mut shutdown,
            )
            .await;
        assert!(matches!(read, Err(Stop::Eof)), "{:?}", read.err());
        assert_eq!(seen, 1000);
        assert!(
            io.input.capacity() <= 2 * READ_CHUNK,
            "{}",
            io.input.capacity()
        );
    }
}
