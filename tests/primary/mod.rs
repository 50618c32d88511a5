//! A scriptable primary mail server for tests: an SMTP server on 127.0.0.1
//! whose behaviour a test changes while it runs (down, hanging, 421, replies
//! per recipient, extensions offered, STARTTLS) and which records what it was
//! sent, byte for byte.
//!
//! It is strict where a lax server would hide client bugs: it refuses
//! parameters it did not advertise (555), a SIZE= above its limit (552),
//! DATA with no accepted recipient (554), BDAT before MAIL or an accepted
//! RCPT (503, its octets still read) and DATA after BDAT (503), and it closes
//! the connection after BDAT it did not offer (502); with `set_line_limit` it
//! refuses content with a line too long (500). It can sit one round trip
//! away (`set_latency`) and counts its round trips (`turns`), so tests can see
//! whether a client pipelines. It stays on loopback.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

/// The name the primary greets with.
pub const NAME: &str = "primary.test";

/// An end-of-data "reply" that closes the connection without answering: the
/// primary reset in the middle of a pipeline.
pub const DROP: &str = "DROP";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Speaks SMTP.
    Up,
    /// No listening socket: connections are refused. Open sessions are cut.
    Down,
    /// Accepts, then never says a word.
    Hang,
    /// Greets with 421 and closes.
    Greet421,
    /// Greets with 220 and closes.
    DropAfterGreeting,
}

/// A certificate and key for STARTTLS, or a deliberately broken TLS service.
#[derive(Clone)]
pub struct TlsIdentity {
    /// `None`: answer STARTTLS with 220, then send bytes that are not TLS.
    config: Option<Arc<rustls::ServerConfig>>,
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.config.is_some() {
            "TlsIdentity"
        } else {
            "TlsIdentity(broken)"
        })
    }
}

impl TlsIdentity {
    /// A certificate for `names`, signed by a CA made for the occasion. Returns
    /// the identity and the CA's certificate, to trust in the client.
    pub fn generate(names: &[&str]) -> (TlsIdentity, CertificateDer<'static>) {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "mxspool test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        if let Some(first) = names.first() {
            params
                .distinguished_name
                .push(DnType::CommonName, first.as_str());
        }
        let cert = params.signed_by(&key, &ca).unwrap();

        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone(), ca.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
        (
            TlsIdentity {
                config: Some(Arc::new(config)),
            },
            ca.der().clone(),
        )
    }

    /// A given certificate chain (leaf first) and its key.
    pub fn from_chain(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> TlsIdentity {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        TlsIdentity {
            config: Some(Arc::new(config)),
        }
    }

    /// Offers STARTTLS, says 220, then answers the handshake with plain text.
    pub fn broken() -> TlsIdentity {
        TlsIdentity { config: None }
    }
}

/// What the primary offers in its EHLO reply (ENHANCEDSTATUSCODES always).
#[derive(Clone, Debug)]
pub struct Caps {
    pub eightbitmime: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub pipelining: bool,
    /// `SIZE n`; 0 means no limit.
    pub size: Option<u64>,
    pub starttls: Option<TlsIdentity>,
    /// `CHUNKING`: BDAT (RFC 3030). Off by default, so a client that never
    /// asked for it keeps sending DATA.
    pub chunking: bool,
}

/// Every extension but SIZE, STARTTLS and CHUNKING.
impl Default for Caps {
    fn default() -> Caps {
        Caps {
            eightbitmime: true,
            smtputf8: true,
            dsn: true,
            pipelining: true,
            size: None,
            starttls: None,
            chunking: false,
        }
    }
}

/// A message the primary accepted (2xx after the final dot).
#[derive(Clone, Debug)]
pub struct Received {
    pub mail_from_line: String,
    /// Every RCPT line of the transaction, accepted or not.
    pub rcpt_lines: Vec<String>,
    /// As it came on the wire: after DATA still dot-stuffed, without the
    /// final `.` CRLF; after BDAT the chunks' octets, end to end.
    pub data: Vec<u8>,
    /// `data` with the dot-stuffing undone (BDAT has none: `body == data`).
    pub body: Vec<u8>,
    pub tls: bool,
    /// It came by BDAT, not DATA.
    pub bdat: bool,
}

struct State {
    mode: Mode,
    listener: Option<TcpListener>,
    /// The accept loop, to wake when the listener comes or goes.
    accept_waker: Option<Waker>,
    caps: Caps,
    /// Lower-cased address -> reply line (without CRLF).
    rcpt_replies: HashMap<String, String>,
    data_reply: String,
    /// Replies for the next ends of data, before `data_reply` applies again.
    data_replies: VecDeque<String>,
    /// How long each reply waits before it is written: the primary is this
    /// far away.
    latency: Duration,
    messages: Vec<Received>,
    connections: usize,
    /// Reply buffers written, per connection accepted (in every mode).
    turns: Vec<usize>,
    commands: Vec<String>,
    batches: Vec<Vec<String>>,
    sessions: Vec<AbortHandle>,
    /// Sessions now speaking SMTP (`Mode::Up`, admitted), and the most seen.
    active: usize,
    max_active: usize,
    /// Beyond this many active sessions a new one is greeted with 421.
    max_sessions: Option<usize>,
    /// Connections refused that way.
    refused: usize,
    /// Content with a line longer than this (CRLF included) is refused
    /// at its end.
    line_limit: Option<usize>,
    /// Contents refused for that.
    too_long: usize,
}

struct Shared {
    state: Mutex<State>,
    received: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Primary {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

fn bind(addr: SocketAddr) -> TcpListener {
    // Coming back up on the same port: while it was down, a short-lived
    // connection elsewhere may have been given that port for a moment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let std = loop {
        match std::net::TcpListener::bind(addr) {
            Ok(listener) => break listener,
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("test primary cannot bind {addr}: {e}"),
        }
    };
    std.set_nonblocking(true).unwrap();
    TcpListener::from_std(std).unwrap()
}

impl Primary {
    /// Up, on a free loopback port.
    pub async fn start() -> Primary {
        Primary::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    /// Up, on `addr` (the address of a primary that went away).
    pub async fn start_on(addr: SocketAddr) -> Primary {
        let listener = bind(addr);
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                mode: Mode::Up,
                listener: Some(listener),
                accept_waker: None,
                caps: Caps::default(),
                rcpt_replies: HashMap::new(),
                data_reply: "250 2.0.0 Ok: queued".into(),
                data_replies: VecDeque::new(),
                latency: Duration::ZERO,
                messages: Vec::new(),
                connections: 0,
                turns: Vec::new(),
                commands: Vec::new(),
                batches: Vec::new(),
                sessions: Vec::new(),
                active: 0,
                max_active: 0,
                max_sessions: None,
                refused: 0,
                line_limit: None,
                too_long: 0,
            }),
            received: Notify::new(),
        });
        let accept = tokio::spawn(accept_loop(shared.clone()));
        Primary {
            addr,
            shared,
            accept,
        }
    }

    /// Takes effect at once: `Down` closes the listening socket before it
    /// returns; the other modes apply to connections accepted from now on.
    pub fn set_mode(&self, mode: Mode) {
        let mut st = self.shared.lock();
        st.mode = mode;
        if mode == Mode::Down {
            st.listener = None;
            for session in st.sessions.drain(..) {
                session.abort();
            }
        } else if st.listener.is_none() {
            st.listener = Some(bind(self.addr));
        }
        if let Some(waker) = st.accept_waker.take() {
            waker.wake();
        }
    }

    /// The reply to `RCPT TO:<address>` (any case), e.g. "550 5.1.1 no such user".
    pub fn set_rcpt_reply(&self, address: &str, reply: &str) {
        self.shared
            .lock()
            .rcpt_replies
            .insert(address.to_ascii_lowercase(), reply.into());
    }

    /// The reply at the end of data (final dot, or BDAT LAST); the message
    /// is recorded only if it is 2xx. A 421 closes the connection after it,
    /// [`DROP`] closes it instead of replying.
    pub fn set_data_reply(&self, reply: &str) {
        self.shared.lock().data_reply = reply.into();
    }

    /// Replies for the next ends of data, one each, in order, on any
    /// connection; then `set_data_reply`'s applies again. Same rules as it:
    /// recorded if 2xx, closed after a 421, closed instead of a reply by
    /// [`DROP`] (the replies already due in that read still go out first).
    pub fn push_data_replies(&self, replies: &[&str]) {
        self.shared
            .lock()
            .data_replies
            .extend(replies.iter().map(|r| r.to_string()));
    }

    /// Every reply (the greeting too) is written this long after the read it
    /// answers, in order; reads go on meanwhile, so replies to reads that
    /// come close together arrive close together, as from a primary one
    /// round trip away. Applies to open sessions at once.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.lock().latency = latency;
    }

    /// For connections accepted from now on.
    pub fn set_capabilities(&self, caps: Caps) {
        self.shared.lock().caps = caps;
    }

    pub fn messages(&self) -> Vec<Received> {
        self.shared.lock().messages.clone()
    }

    /// Connections accepted, in every mode.
    pub fn connections(&self) -> usize {
        self.shared.lock().connections
    }

    /// Round trips as clients saw them: reply buffers written (greeting
    /// included), over every connection. A client that pipelines across
    /// messages needs k + 3 for k messages (greeting, EHLO, one per message,
    /// QUIT); one that waits at each DATA about 3k.
    pub fn turns(&self) -> usize {
        self.shared.lock().turns.iter().sum()
    }

    /// `turns` per connection accepted, in order of acceptance (0 for a
    /// connection that was never answered).
    pub fn turns_per_connection(&self) -> Vec<usize> {
        self.shared.lock().turns.clone()
    }

    /// Every command line received, in order, without CRLF (BDAT lines
    /// too, not the octets of their chunks).
    pub fn commands(&self) -> Vec<String> {
        self.shared.lock().commands.clone()
    }

    /// The command lines grouped by the read that completed them. A client
    /// that pipelines sends MAIL, its RCPTs and DATA as one group; one that
    /// does not waits for each reply, so each command is a group of its own.
    pub fn batches(&self) -> Vec<Vec<String>> {
        self.shared.lock().batches.clone()
    }

    /// The most sessions speaking SMTP at once so far (connections accepted
    /// in `Mode::Up` and admitted, from the greeting until they close).
    pub fn max_concurrent(&self) -> usize {
        self.shared.lock().max_active
    }

    /// Sessions speaking SMTP now.
    pub fn concurrent(&self) -> usize {
        self.shared.lock().active
    }

    /// With `Some(n)`, a connection accepted in `Mode::Up` while `n`
    /// sessions are open is greeted `421 4.7.0 too many connections` and
    /// closed: a primary with a connection limit. For connections from now on.
    pub fn set_max_sessions(&self, max: Option<usize>) {
        self.shared.lock().max_sessions = max;
    }

    /// With `Some(n)`, content (as on the wire) with a line longer than `n`
    /// octets, CRLF included, gets `500 5.5.0 Line too long` at its end and
    /// is not recorded: a primary that enforces RFC 5321's 1,000 octets.
    pub fn set_line_limit(&self, limit: Option<usize>) {
        self.shared.lock().line_limit = limit;
    }

    /// Contents refused by `set_line_limit`'s limit.
    pub fn too_long(&self) -> usize {
        self.shared.lock().too_long
    }

    /// Connections refused by `set_max_sessions`' limit.
    pub fn refused(&self) -> usize {
        self.shared.lock().refused
    }

    pub async fn wait_for_messages(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let received = self.shared.received.notified();
            if self.shared.lock().messages.len() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, received).await.is_err() {
                return self.shared.lock().messages.len() >= n;
            }
        }
    }
}

impl Drop for Primary {
    fn drop(&mut self) {
        self.accept.abort();
        let mut st = self.shared.lock();
        st.listener = None;
        for session in st.sessions.drain(..) {
            session.abort();
        }
    }
}

async fn accept_loop(shared: Arc<Shared>) {
    loop {
        let accepted = poll_fn(|cx| {
            let mut st = shared.lock();
            st.accept_waker = Some(cx.waker().clone());
            match &st.listener {
                Some(listener) => listener.poll_accept(cx),
                None => Poll::Pending,
            }
        })
        .await;
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let mut st = shared.lock();
        st.connections += 1;
        st.turns.push(0);
        let conn = st.turns.len() - 1;
        let mode = st.mode;
        let session = tokio::spawn(serve(shared.clone(), stream, mode, conn));
        st.sessions.retain(|s| !s.is_finished());
        st.sessions.push(session.abort_handle());
    }
}

async fn serve(shared: Arc<Shared>, mut stream: TcpStream, mode: Mode, conn: usize) {
    match mode {
        Mode::Down => {}
        Mode::Hang => {
            let mut buf = [0u8; 1024];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        }
        Mode::Greet421 => {
            let greeting = format!("421 4.3.2 {NAME} Service not available\r\n");
            let _ = greet(&shared, &mut stream, conn, &greeting).await;
        }
        Mode::DropAfterGreeting => {
            let _ = greet(&shared, &mut stream, conn, &format!("220 {NAME} ESMTP\r\n")).await;
        }
        Mode::Up => {
            let admitted = {
                let mut st = shared.lock();
                if st.max_sessions.is_some_and(|max| st.active >= max) {
                    st.refused += 1;
                    false
                } else {
                    st.active += 1;
                    st.max_active = st.max_active.max(st.active);
                    true
                }
            };
            if !admitted {
                let greeting = format!("421 4.7.0 {NAME} too many connections\r\n");
                let _ = greet(&shared, &mut stream, conn, &greeting).await;
                return;
            }
            // Counted out however the session ends, aborted too.
            let _active = Active(shared.clone());
            converse(&shared, stream, conn).await
        }
    }
}

/// One admitted session, from its admission until it is dropped.
struct Active(Arc<Shared>);

impl Drop for Active {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.active = st.active.saturating_sub(1);
    }
}

/// The greeting, one latency after the connection.
async fn greet(
    shared: &Shared,
    stream: &mut TcpStream,
    conn: usize,
    greeting: &str,
) -> std::io::Result<()> {
    let latency = shared.lock().latency;
    tokio::time::sleep(latency).await;
    send(shared, stream, conn, greeting.as_bytes()).await
}

/// Writes one reply buffer, one round trip as the client sees it. Counted
/// before the write, so a client that has the reply also sees the count.
async fn send<S: AsyncWrite + Unpin>(
    shared: &Shared,
    stream: &mut S,
    conn: usize,
    replies: &[u8],
) -> std::io::Result<()> {
    if replies.is_empty() {
        return Ok(());
    }
    shared.lock().turns[conn] += 1;
    stream.write_all(replies).await?;
    stream.flush().await
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    Close,
    StartTls,
}

async fn converse(shared: &Shared, mut tcp: TcpStream, conn: usize) {
    let caps = shared.lock().caps.clone();
    if greet(shared, &mut tcp, conn, &format!("220 {NAME} ESMTP\r\n"))
        .await
        .is_err()
    {
        return;
    }
    if talk(shared, &mut tcp, conn, &caps, false).await == Next::Close {
        return;
    }
    let Some(identity) = caps.starttls.clone() else {
        return;
    };
    match identity.config {
        None => {
            let _ = tcp.write_all(b"this is not TLS at all\r\n").await;
        }
        Some(config) => {
            if let Ok(mut tls) = TlsAcceptor::from(config).accept(tcp).await {
                talk(shared, &mut tls, conn, &caps, true).await;
                let _ = tls.shutdown().await;
            }
        }
    }
}

#[derive(Default)]
struct Transaction {
    mail: Option<String>,
    rcpts: Vec<String>,
    accepted: usize,
    /// The octets of the BDAT chunks so far; `Some` from the first accepted
    /// BDAT on, which rules DATA out for this transaction.
    chunks: Option<Vec<u8>>,
}

enum Effect {
    None,
    Data,
    /// The reply waits until the chunk's octets are read.
    Chunk(Chunk),
    StartTls,
    Close,
}

/// A BDAT chunk being read.
struct Chunk {
    size: usize,
    /// Octets still to come.
    remaining: usize,
    last: bool,
    /// The reply when the chunk is refused: its octets are read and dropped,
    /// so the next command is still found where the client put it.
    refusal: Option<String>,
}

/// What the next input is.
enum Reading {
    Commands,
    /// DATA content, up to CRLF . CRLF.
    Data,
    Chunk(Chunk),
}

/// The replies to one read and what happens after they are written.
struct Answer {
    replies: String,
    next: Option<Next>,
}

/// One conversation's state between reads; pure, so the async shell
/// (`talk`) only reads, waits and writes.
struct Session<'a> {
    shared: &'a Shared,
    caps: &'a Caps,
    tls: bool,
    txn: Transaction,
    reading: Reading,
    /// Received and not yet consumed: an incomplete line, data or chunk.
    input: Vec<u8>,
}

impl Session<'_> {
    /// Consumes what `read` completes and answers it; all replies to one
    /// read go out together, as a pipelining server's do. Stops at the
    /// first thing after which the connection closes or turns to TLS.
    fn answer(&mut self, read: &[u8]) -> Answer {
        self.input.extend_from_slice(read);
        let mut batch = Vec::new();
        let mut replies = String::new();
        let next = self.consume(&mut batch, &mut replies);
        if !batch.is_empty() {
            self.shared.lock().batches.push(batch);
        }
        Answer { replies, next }
    }

    /// Consumes the input while it completes a command, data or a chunk,
    /// appending the replies. `Some` when the connection closes or turns to
    /// TLS after them; `None` (also from the `?`s) when the rest of the
    /// input is incomplete.
    fn consume(&mut self, batch: &mut Vec<String>, replies: &mut String) -> Option<Next> {
        loop {
            let (reply, next) = match &mut self.reading {
                Reading::Data => {
                    let (raw_len, used) = data_end(&self.input)?;
                    let data: Vec<u8> = self.input.drain(..used).take(raw_len).collect();
                    self.reading = Reading::Commands;
                    let body = unstuff(&data);
                    self.end_of_data(data, body, false)
                }
                Reading::Chunk(chunk) => {
                    let take = chunk.remaining.min(self.input.len());
                    let octets = self.input.drain(..take);
                    chunk.remaining -= take;
                    match &mut self.txn.chunks {
                        Some(chunks) if chunk.refusal.is_none() => chunks.extend(octets),
                        _ => drop(octets),
                    }
                    if chunk.remaining > 0 {
                        return None;
                    }
                    let Reading::Chunk(chunk) =
                        std::mem::replace(&mut self.reading, Reading::Commands)
                    else {
                        unreachable!("reading a chunk")
                    };
                    if let Some(refusal) = chunk.refusal {
                        (Some(refusal), None)
                    } else if chunk.last {
                        let data = self.txn.chunks.take().unwrap_or_default();
                        self.end_of_data(data.clone(), data, true)
                    } else {
                        (Some(format!("250 2.0.0 Ok: {} octets", chunk.size)), None)
                    }
                }
                Reading::Commands => {
                    let lf = self.input.iter().position(|&b| b == b'\n')?;
                    let raw: Vec<u8> = self.input.drain(..=lf).collect();
                    let line = String::from_utf8_lossy(&raw)
                        .trim_end_matches(['\r', '\n'])
                        .to_string();
                    batch.push(line.clone());
                    self.shared.lock().commands.push(line.clone());
                    let (reply, effect) =
                        respond(self.shared, self.caps, &mut self.txn, &line, self.tls);
                    match effect {
                        Effect::None => (Some(reply), None),
                        Effect::Data => {
                            self.reading = Reading::Data;
                            (Some(reply), None)
                        }
                        // Answered once its octets are in.
                        Effect::Chunk(chunk) => {
                            self.reading = Reading::Chunk(chunk);
                            (None, None)
                        }
                        Effect::StartTls => (Some(reply), Some(Next::StartTls)),
                        Effect::Close => (Some(reply), Some(Next::Close)),
                    }
                }
            };
            if let Some(reply) = reply {
                replies.push_str(&reply);
                replies.push_str("\r\n");
            }
            if next.is_some() {
                return next;
            }
        }
    }

    /// The end-of-data reply and whether the connection closes after it
    /// (421) or instead of it ([`DROP`]); a 2xx records the message. Either
    /// way the transaction is over.
    fn end_of_data(
        &mut self,
        data: Vec<u8>,
        body: Vec<u8>,
        bdat: bool,
    ) -> (Option<String>, Option<Next>) {
        let txn = std::mem::take(&mut self.txn);
        let reply = {
            let mut st = self.shared.lock();
            let too_long = st.line_limit.is_some_and(|limit| {
                data.split_inclusive(|&b| b == b'\n')
                    .any(|line| line.len() > limit)
            });
            if too_long {
                st.too_long += 1;
                return (Some("500 5.5.0 Line too long".into()), None);
            }
            st.data_replies
                .pop_front()
                .unwrap_or_else(|| st.data_reply.clone())
        };
        if reply == DROP {
            return (None, Some(Next::Close));
        }
        if reply.starts_with('2') {
            let message = Received {
                mail_from_line: txn.mail.unwrap_or_default(),
                rcpt_lines: txn.rcpts,
                data,
                body,
                tls: self.tls,
                bdat,
            };
            self.shared.lock().messages.push(message);
            self.shared.received.notify_waiters();
        }
        let next = reply.starts_with("421").then_some(Next::Close);
        (Some(reply), next)
    }
}

/// Replies waiting for their time to be written.
struct Pending {
    due: Instant,
    replies: String,
    next: Option<Next>,
}

/// Reads commands and answers them, each read's replies one latency after
/// it. Reading goes on while replies wait, so a slow primary is not also a
/// serial one; it stops at QUIT, a close or STARTTLS.
async fn talk<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    stream: &mut S,
    conn: usize,
    caps: &Caps,
    tls: bool,
) -> Next {
    let mut session = Session {
        shared,
        caps,
        tls,
        txn: Transaction::default(),
        reading: Reading::Commands,
        input: Vec::new(),
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut reading = true;
    loop {
        let due = pending.front().map(|p| p.due);
        if reading {
            let read = match due {
                Some(due) => tokio::time::timeout_at(due, stream.read(&mut buf))
                    .await
                    .ok(),
                None => Some(stream.read(&mut buf).await),
            };
            match read {
                None => {}
                Some(Err(_)) => return Next::Close,
                // The client is done sending; it may still be reading.
                Some(Ok(0)) => reading = false,
                Some(Ok(n)) => {
                    let answer = session.answer(&buf[..n]);
                    if answer.next.is_some() {
                        reading = false;
                    }
                    if !answer.replies.is_empty() || answer.next.is_some() {
                        let latency = shared.lock().latency;
                        pending.push_back(Pending {
                            due: Instant::now() + latency,
                            replies: answer.replies,
                            next: answer.next,
                        });
                    }
                }
            }
        } else {
            let Some(due) = due else {
                return Next::Close;
            };
            tokio::time::sleep_until(due).await;
        }
        while let Some(front) = pending.front()
            && front.due <= Instant::now()
        {
            let Pending { replies, next, .. } = pending.pop_front().expect("a front");
            if send(shared, stream, conn, replies.as_bytes())
                .await
                .is_err()
            {
                return Next::Close;
            }
            match next {
                // Anything pipelined after STARTTLS would be read as plain text.
                Some(Next::StartTls) if !session.input.is_empty() => return Next::Close,
                Some(next) => return next,
                None => {}
            }
        }
    }
}

fn respond(
    shared: &Shared,
    caps: &Caps,
    txn: &mut Transaction,
    line: &str,
    tls: bool,
) -> (String, Effect) {
    let verb = line
        .split([' ', ':'])
        .next()
        .unwrap_or("")
        .to_ascii_uppercase();
    let reply = |text: &str| (text.to_string(), Effect::None);
    match verb.as_str() {
        "EHLO" => {
            *txn = Transaction::default();
            let mut lines = vec![NAME.to_string()];
            if caps.pipelining {
                lines.push("PIPELINING".into());
            }
            if let Some(size) = caps.size {
                lines.push(format!("SIZE {size}"));
            }
            if caps.eightbitmime {
                lines.push("8BITMIME".into());
            }
            if caps.smtputf8 {
                lines.push("SMTPUTF8".into());
            }
            if caps.dsn {
                lines.push("DSN".into());
            }
            if caps.chunking {
                lines.push("CHUNKING".into());
            }
            if caps.starttls.is_some() && !tls {
                lines.push("STARTTLS".into());
            }
            lines.push("ENHANCEDSTATUSCODES".into());
            let last = lines.len() - 1;
            let text: Vec<String> = lines
                .iter()
                .enumerate()
                .map(|(i, l)| format!("250{}{l}", if i == last { ' ' } else { '-' }))
                .collect();
            (text.join("\r\n"), Effect::None)
        }
        "HELO" => {
            *txn = Transaction::default();
            reply(&format!("250 {NAME}"))
        }
        "MAIL" => {
            if txn.mail.is_some() {
                return reply("503 5.5.1 Error: nested MAIL command");
            }
            if let Some(refusal) = mail_parameters(caps, line) {
                return reply(&refusal);
            }
            txn.mail = Some(line.to_string());
            reply("250 2.1.0 Ok")
        }
        "RCPT" => {
            if txn.mail.is_none() {
                return reply("503 5.5.1 Error: need MAIL command");
            }
            if let Some(refusal) = rcpt_parameters(caps, line) {
                return reply(&refusal);
            }
            txn.rcpts.push(line.to_string());
            let address = line
                .split_once('<')
                .and_then(|(_, rest)| rest.split_once('>'))
                .map(|(address, _)| address.to_ascii_lowercase())
                .unwrap_or_default();
            let answer = shared
                .lock()
                .rcpt_replies
                .get(&address)
                .cloned()
                .unwrap_or_else(|| "250 2.1.5 Ok".into());
            if answer.starts_with('2') {
                txn.accepted += 1;
            }
            let effect = if answer.starts_with("421") {
                Effect::Close
            } else {
                Effect::None
            };
            (answer, effect)
        }
        "DATA" => {
            if txn.mail.is_none() {
                reply("503 5.5.1 Error: need RCPT command")
            } else if txn.chunks.is_some() {
                reply("503 5.5.1 Error: DATA after BDAT")
            } else if txn.accepted == 0 {
                reply("554 5.5.1 Error: no valid recipients")
            } else {
                ("354 End data with <CR><LF>.<CR><LF>".into(), Effect::Data)
            }
        }
        // Without CHUNKING the octets that follow would be read as commands:
        // there is no staying in sync, so the connection ends.
        "BDAT" if !caps.chunking => (
            "502 5.5.2 Error: command not recognized".into(),
            Effect::Close,
        ),
        "BDAT" => {
            let Some((size, last)) = bdat_arguments(line) else {
                return ("501 5.5.4 Syntax: BDAT size [LAST]".into(), Effect::Close);
            };
            let refusal = if txn.mail.is_none() {
                Some("503 5.5.1 Error: need MAIL command".to_string())
            } else if txn.accepted == 0 {
                Some("503 5.5.1 Error: need RCPT command".to_string())
            } else {
                txn.chunks.get_or_insert_with(Vec::new);
                None
            };
            let chunk = Chunk {
                size,
                remaining: size,
                last,
                refusal,
            };
            (String::new(), Effect::Chunk(chunk))
        }
        "RSET" => {
            *txn = Transaction::default();
            reply("250 2.0.0 Ok")
        }
        "NOOP" => reply("250 2.0.0 Ok"),
        "QUIT" => ("221 2.0.0 Bye".into(), Effect::Close),
        "STARTTLS" if caps.starttls.is_some() && !tls => {
            ("220 2.0.0 Ready to start TLS".into(), Effect::StartTls)
        }
        _ => reply("502 5.5.2 Error: command not recognized"),
    }
}

/// `BDAT <size> [LAST]` (RFC 3030 §4): the size and whether it is the last.
fn bdat_arguments(line: &str) -> Option<(usize, bool)> {
    let mut words = line.split(' ');
    words.next()?;
    let size = words.next()?;
    if size.is_empty() || !size.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let last = match words.next() {
        None => false,
        Some(word) if word.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return None,
    };
    if words.next().is_some() {
        return None;
    }
    Some((size.parse().ok()?, last))
}

/// The parameters after the path, as (upper-cased keyword, value).
fn parameters(line: &str) -> Vec<(String, String)> {
    let rest = line.rsplit_once('>').map(|(_, rest)| rest).unwrap_or("");
    rest.split_whitespace()
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_ascii_uppercase(), v.to_string()),
            None => (p.to_ascii_uppercase(), String::new()),
        })
        .collect()
}

fn mail_parameters(caps: &Caps, line: &str) -> Option<String> {
    for (key, value) in parameters(line) {
        let offered = match key.as_str() {
            "SIZE" => {
                if let (Some(limit), Ok(size)) = (caps.size, value.parse::<u64>())
                    && limit > 0
                    && size > limit
                {
                    return Some("552 5.3.4 Message size exceeds fixed limit".into());
                }
                caps.size.is_some()
            }
            "BODY" => caps.eightbitmime,
            "SMTPUTF8" => caps.smtputf8,
            "RET" | "ENVID" => caps.dsn,
            _ => false,
        };
        if !offered {
            return Some(format!("555 5.5.4 Unsupported option: {key}"));
        }
    }
    None
}

fn rcpt_parameters(caps: &Caps, line: &str) -> Option<String> {
    parameters(line)
        .into_iter()
        .find(|(key, _)| !(matches!(key.as_str(), "NOTIFY" | "ORCPT") && caps.dsn))
        .map(|(key, _)| format!("555 5.5.4 Unsupported option: {key}"))
}

/// Where the data ends in `input`: (bytes of data, bytes to consume with the
/// terminator). Only CRLF . CRLF ends it.
fn data_end(input: &[u8]) -> Option<(usize, usize)> {
    if input.starts_with(b".\r\n") {
        return Some((0, 3));
    }
    input
        .windows(5)
        .position(|w| w == b"\r\n.\r\n")
        .map(|at| (at + 2, at + 5))
}

fn unstuff(data: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(data.len());
    for line in data.split_inclusive(|&b| b == b'\n') {
        body.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
    }
    body
}
