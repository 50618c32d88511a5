//! A scriptable primary mail server for tests: an SMTP server on 127.0.0.1
//! whose behaviour a test changes while it runs (down, hanging, 421, replies
//! per recipient, extensions offered, STARTTLS) and which records what it was
//! sent, byte for byte.
//!
//! It is strict where a lax server would hide client bugs: it refuses
//! parameters it did not advertise (555), a SIZE= above its limit (552), and
//! DATA with no accepted recipient (554). It stays on loopback.
#![allow(dead_code)]

use std::collections::HashMap;
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
use tokio_rustls::TlsAcceptor;

/// The name the primary greets with.
pub const NAME: &str = "primary.test";

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
}

/// Every extension but SIZE and STARTTLS.
impl Default for Caps {
    fn default() -> Caps {
        Caps {
            eightbitmime: true,
            smtputf8: true,
            dsn: true,
            pipelining: true,
            size: None,
            starttls: None,
        }
    }
}

/// A message the primary accepted (2xx after the final dot).
#[derive(Clone, Debug)]
pub struct Received {
    pub mail_from_line: String,
    /// Every RCPT line of the transaction, accepted or not.
    pub rcpt_lines: Vec<String>,
    /// As it came on the wire, still dot-stuffed, without the final `.` CRLF.
    pub data: Vec<u8>,
    /// `data` with the dot-stuffing undone.
    pub body: Vec<u8>,
    pub tls: bool,
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
    messages: Vec<Received>,
    connections: usize,
    commands: Vec<String>,
    batches: Vec<Vec<String>>,
    sessions: Vec<AbortHandle>,
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
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let std = loop {
        match std::net::TcpListener::bind(addr) {
            Ok(listener) => break listener,
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < deadline =>
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
                messages: Vec::new(),
                connections: 0,
                commands: Vec::new(),
                batches: Vec::new(),
                sessions: Vec::new(),
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

    /// The reply after the final dot; the message is recorded only if it is 2xx.
    pub fn set_data_reply(&self, reply: &str) {
        self.shared.lock().data_reply = reply.into();
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

    /// Every command line received, in order, without CRLF.
    pub fn commands(&self) -> Vec<String> {
        self.shared.lock().commands.clone()
    }

    /// The command lines grouped by the read that completed them. A client
    /// that pipelines sends MAIL, its RCPTs and DATA as one group; one that
    /// does not waits for each reply, so each command is a group of its own.
    pub fn batches(&self) -> Vec<Vec<String>> {
        self.shared.lock().batches.clone()
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
        let mode = st.mode;
        let session = tokio::spawn(serve(shared.clone(), stream, mode));
        st.sessions.retain(|s| !s.is_finished());
        st.sessions.push(session.abort_handle());
    }
}

async fn serve(shared: Arc<Shared>, mut stream: TcpStream, mode: Mode) {
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
            let _ = stream.write_all(greeting.as_bytes()).await;
        }
        Mode::DropAfterGreeting => {
            let _ = stream
                .write_all(format!("220 {NAME} ESMTP\r\n").as_bytes())
                .await;
        }
        Mode::Up => converse(&shared, stream).await,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    Close,
    StartTls,
}

async fn converse(shared: &Shared, mut tcp: TcpStream) {
    let caps = shared.lock().caps.clone();
    let greeting = format!("220 {NAME} ESMTP\r\n");
    if tcp.write_all(greeting.as_bytes()).await.is_err() {
        return;
    }
    if talk(shared, &mut tcp, &caps, false).await == Next::Close {
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
                talk(shared, &mut tls, &caps, true).await;
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
}

enum Effect {
    None,
    Data,
    StartTls,
    Close,
}

/// Reads commands and answers them; all replies to one read go out together,
/// as a pipelining server's do.
async fn talk<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    stream: &mut S,
    caps: &Caps,
    tls: bool,
) -> Next {
    let mut input = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut txn = Transaction::default();
    let mut in_data = false;
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return Next::Close,
            Ok(n) => n,
        };
        input.extend_from_slice(&buf[..n]);
        let mut batch = Vec::new();
        let mut out = String::new();
        let mut next = None;
        loop {
            if in_data {
                let Some((raw_len, used)) = data_end(&input) else {
                    break;
                };
                let data: Vec<u8> = input.drain(..used).take(raw_len).collect();
                in_data = false;
                let reply = shared.lock().data_reply.clone();
                if reply.starts_with('2') {
                    let message = Received {
                        mail_from_line: txn.mail.take().unwrap_or_default(),
                        rcpt_lines: std::mem::take(&mut txn.rcpts),
                        body: unstuff(&data),
                        data,
                        tls,
                    };
                    shared.lock().messages.push(message);
                    shared.received.notify_waiters();
                }
                txn = Transaction::default();
                out.push_str(&reply);
                out.push_str("\r\n");
                if reply.starts_with("421") {
                    next = Some(Next::Close);
                    break;
                }
                continue;
            }
            let Some(lf) = input.iter().position(|&b| b == b'\n') else {
                break;
            };
            let raw: Vec<u8> = input.drain(..=lf).collect();
            let line = String::from_utf8_lossy(&raw)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            batch.push(line.clone());
            shared.lock().commands.push(line.clone());
            let (reply, effect) = respond(shared, caps, &mut txn, &line, tls);
            out.push_str(&reply);
            out.push_str("\r\n");
            match effect {
                Effect::None => {}
                Effect::Data => in_data = true,
                Effect::StartTls => {
                    next = Some(Next::StartTls);
                    break;
                }
                Effect::Close => {
                    next = Some(Next::Close);
                    break;
                }
            }
        }
        if !batch.is_empty() {
            shared.lock().batches.push(batch);
        }
        if stream.write_all(out.as_bytes()).await.is_err() {
            return Next::Close;
        }
        match next {
            // Anything pipelined after STARTTLS would be read as plain text.
            Some(Next::StartTls) if !input.is_empty() => return Next::Close,
            Some(next) => return next,
            None => {}
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
            } else if txn.accepted == 0 {
                reply("554 5.5.1 Error: no valid recipients")
            } else {
                ("354 End data with <CR><LF>.<CR><LF>".into(), Effect::Data)
            }
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
