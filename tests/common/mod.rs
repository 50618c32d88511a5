//! The harness every end-to-end test shares: a real server on 127.0.0.1 with a
//! config written to a temporary directory, a small SMTP client over a real
//! socket, and helpers to read what the spool holds.
#![allow(dead_code)] // each test binary uses its own subset

pub mod dovecot;
pub mod http;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mxspool::clock::Clock;
use mxspool::config::Config;
use mxspool::spool::{
    BodyType, Client as SpoolClient, Envelope, NewMessage, QueueId, Recipient, Ret, Spool,
};
use mxspool::{Options, Server};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long a test waits for any single reply before calling the server stuck.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a test waits for delivery to settle (a hung primary holds it up
/// for the outbound timeouts).
pub const SETTLE_LIMIT: Duration = Duration::from_secs(30);

/// Where mail to the bare `<postmaster>` goes in every test config.
pub const POSTMASTER: &str = "hostmaster@example.com";

/// A test configuration: the keys of the single tables (`[server]`, `[spool]`,
/// `[delivery]`, `[http]`), each set once, then the `[[domain]]` tables. `{dir}`
/// anywhere in a value is the test's directory; `{route}` is a next hop on
/// 127.0.0.1 where nothing listens, so queued mail is only ever deferred and
/// never leaves the machine. Primary health checks are off
/// (`health_interval`) unless a test sets them.
pub struct TestConfig {
    tables: BTreeMap<&'static str, BTreeMap<&'static str, String>>,
    domains: String,
}

impl Default for TestConfig {
    fn default() -> Self {
        let config = TestConfig {
            tables: BTreeMap::new(),
            domains: r#"
[[domain]]
name = "example.com"
route = "{route}"

[[domain]]
name = "listed.test"
route = "{route}"
recipients = ["alice", "bob@listed.test"]

[[domain]]
name = "wide.test"
route = "{route}"
include_subdomains = true
"#
            .to_string(),
        };
        config
            .server("hostname", r#""mx2.test""#)
            .server("listen", r#"["127.0.0.1:0"]"#)
            .server("command_timeout", r#""2s""#)
            .server("data_timeout", r#""2s""#)
            .server("max_message_size", "10000")
            .server("max_recipients", "5")
            .server("max_received_headers", "10")
            .server("etrn_allow", r#"["127.0.0.0/8"]"#)
            .set("spool", "path", r#""{dir}/spool.redb""#)
            .set("delivery", "postmaster", &format!("{POSTMASTER:?}"))
            // Continuous checks would add connections to every test's
            // primary; tests/health.rs turns them on.
            .set("delivery", "health_interval", r#""off""#)
            .set("http", "listen", r#""127.0.0.1:0""#)
    }
}

impl TestConfig {
    /// Sets `key` of `[table]` to a TOML value, e.g. `.set("spool", "max_size", "2000")`.
    pub fn set(mut self, table: &'static str, key: &'static str, value: &str) -> Self {
        self.tables
            .entry(table)
            .or_default()
            .insert(key, value.to_string());
        self
    }

    /// Sets one `[server]` key, e.g. `.server("deny", r#"["127.0.0.0/8"]"#)`.
    pub fn server(self, key: &'static str, value: &str) -> Self {
        self.set("server", key, value)
    }

    /// Replaces the default domains with `toml` (`[[domain]]` tables).
    pub fn domains(mut self, toml: &str) -> Self {
        self.domains = toml.to_string();
        self
    }

    /// Appends TOML after the default domains (more `[[domain]]` tables).
    pub fn append(mut self, toml: &str) -> Self {
        self.domains.push_str(toml);
        self
    }

    pub fn render(&self, dir: &std::path::Path) -> String {
        let mut text = String::new();
        for (table, keys) in &self.tables {
            text.push_str(&format!("[{table}]\n"));
            for (key, value) in keys {
                text.push_str(&format!("{key} = {value}\n"));
            }
            text.push('\n');
        }
        text.push_str(&self.domains);
        text.replace("{dir}", &dir.display().to_string())
            .replace("{route}", &format!("[127.0.0.1]:{}", closed_port()))
    }
}

/// A local port nobody listens on (bound, then released).
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("local address").port()
}

/// A running server and the directory holding its config and spool.
pub struct TestServer {
    pub server: Server,
    pub dir: TempDir,
    pub config_path: PathBuf,
    pub spool_path: PathBuf,
    pub addr: SocketAddr,
    /// The server's clock: move it forward to make mail due or expire.
    pub clock: Clock,
}

impl TestServer {
    pub async fn start(config: TestConfig) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        TestServer::start_in(dir, config).await
    }

    /// Starts with files already placed in `dir` (recipient lists and the like).
    pub async fn start_in(dir: TempDir, config: TestConfig) -> TestServer {
        TestServer::start_with(dir, config, None).await
    }

    /// Starts with the outbound client's settings given (short timeouts, a
    /// test CA); `None` means the defaults.
    pub async fn start_with(
        dir: TempDir,
        config: TestConfig,
        outbound: Option<mxspool::outbound::Settings>,
    ) -> TestServer {
        let config_path = dir.path().join("mxspool.toml");
        let text = config.render(dir.path());
        std::fs::write(&config_path, &text).expect("write config");
        let config = Config::parse(&text, &config_path)
            .unwrap_or_else(|e| panic!("test config does not parse: {e}\n{text}"));
        let spool_path = config.spool.path.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut options = Options::for_config(&config);
        if let Some(settings) = outbound {
            options.outbound = settings;
        }
        let clock = options.clock.clone();
        let server = Server::start_with(config, vec![listener], options)
            .await
            .expect("server starts");
        let addr = server.smtp_addrs()[0];
        TestServer {
            server,
            dir,
            config_path,
            spool_path,
            addr,
            clock,
        }
    }

    pub fn spool(&self) -> &Spool {
        self.server.spool()
    }

    /// Waits until delivery has done everything due by the server's clock
    /// (records and notices included) and has nothing in hand: what a test
    /// asserts next has either happened or never will without a clock move.
    pub async fn settled(&self) {
        tokio::time::timeout(SETTLE_LIMIT, self.server.settled())
            .await
            .unwrap_or_else(|_| panic!("delivery still busy after {SETTLE_LIMIT:?}"));
    }

    /// Moves the server's clock forward by `by` and waits for delivery to
    /// settle at the new time.
    pub async fn advance(&self, by: Duration) {
        self.clock.advance(by);
        self.settled().await;
    }

    /// A connection whose greeting has been read and checked.
    pub async fn connect(&self) -> Client {
        let mut client = Client::connect(self.addr).await;
        client.expect(220).await;
        client
    }

    /// A connection from `source` (any 127.x.y.z: every one is this host's),
    /// its greeting read and checked.
    pub async fn connect_from(&self, source: std::net::IpAddr) -> Client {
        let mut client = Client::connect_from(self.addr, source).await;
        client.expect(220).await;
        client
    }

    /// A connection after greeting and `EHLO client.test`.
    pub async fn ehlo(&self) -> Client {
        let mut client = self.connect().await;
        client.cmd("EHLO client.test").await.assert(250);
        client
    }

    /// A message from `sender` to `to` with `body`, to store straight into
    /// the spool (`spool().commit`): queued, not due for a day, so the
    /// scheduler leaves it alone.
    pub fn new_message(&self, sender: &str, to: &str, body: Vec<u8>) -> NewMessage {
        let id = self.spool().next_id(self.clock.now_micros());
        NewMessage {
            envelope: Envelope {
                id,
                sender: sender.into(),
                ret: Ret::Unset,
                envid: None,
                envid_xtext: None,
                body_type: BodyType::Unset,
                smtputf8: false,
                has_8bit: false,
                arrived_ms: self.clock.now_ms(),
                size: body.len() as u64,
                client: SpoolClient {
                    ip: "192.0.2.1".parse().unwrap(),
                    helo: "client.test".into(),
                    tls: false,
                },
                recipients: vec![Recipient::queued(
                    to.into(),
                    self.clock.now_ms() + 86_400_000,
                )],
                notices_to: None,
            },
            body,
        }
    }

    /// Everything queued, in arrival order, with bodies.
    pub fn stored(&self) -> Vec<(Envelope, Vec<u8>)> {
        stored(self.spool())
    }
}

/// Every queued message of `spool` with its body, in ID order.
pub fn stored(spool: &Spool) -> Vec<(Envelope, Vec<u8>)> {
    spool
        .envelopes()
        .expect("read envelopes")
        .into_iter()
        .filter_map(|env| {
            let Some(body) = spool.body(env.id).expect("read body") else {
                // Delivered and removed between the two reads: gone, not broken.
                assert!(
                    spool.envelope(env.id).expect("read envelope").is_none(),
                    "message {} has an envelope but no body",
                    env.id
                );
                return None;
            };
            Some((env, body))
        })
        .collect()
}

/// The addresses of an envelope's recipients, in order.
pub fn recipients(env: &Envelope) -> Vec<&str> {
    env.recipients.iter().map(|r| r.address.as_str()).collect()
}

/// Splits a stored body into our `Received:` field (with its folded
/// continuation lines, ending in CRLF) and what follows it.
pub fn split_received(body: &[u8]) -> (String, &[u8]) {
    assert!(
        body.starts_with(b"Received: "),
        "stored body does not start with Received: {:?}",
        String::from_utf8_lossy(&body[..body.len().min(200)])
    );
    let mut end = 0;
    loop {
        let crlf = body[end..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("Received: field ends in CRLF");
        end += crlf + 2;
        if !matches!(body.get(end), Some(b' ' | b'\t')) {
            break;
        }
    }
    let header = String::from_utf8(body[..end].to_vec()).expect("Received: is ASCII");
    (header, &body[end..])
}

/// Fake ends of data: bare LF, bare CR, mixed, and with a NUL or blank beside
/// the dot. None of them is CRLF "." CRLF.
pub const FAKE_ENDS_OF_DATA: &[&[u8]] = &[
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r\n.\n",
    b"\r\n.\r",
    b"\r.\n",
    b"\n.\r",
    b"\r.\r",
    b"\r\n.\x00\r\n",
    b"\r\n\x00.\r\n",
    b"\r\n .\r\n",
    b"\r\n. \r\n",
    b"\r\n.\t\r\n",
    b"\r\n.\r\r\n",
    b"\r\n.\n\r\n",
    b"\n\n.\n\n",
];

/// RFC 5321 §4.1.1.4 and §4.5.2 from the wire's point of view, independent of
/// mxspool's reader: the data ends at the first CRLF "." CRLF (or at "." CRLF
/// right after the 354). Lines are what CRLF delimits; a leading dot is
/// stuffing and goes; a bare CR or LF left inside a line becomes CRLF.
/// Returns (bytes up to and including the terminator, the content to store).
pub fn reference_data(input: &[u8]) -> Option<(usize, Vec<u8>)> {
    let (content, used) = if input.starts_with(b".\r\n") {
        (&input[..0], 3)
    } else {
        let at = input.windows(5).position(|w| w == b"\r\n.\r\n")?;
        (&input[..at + 2], at + 5)
    };
    let mut body = Vec::new();
    let mut rest = content;
    while !rest.is_empty() {
        let end = rest.windows(2).position(|w| w == b"\r\n").expect("CRLF");
        let line = &rest[..end];
        for &b in line.strip_prefix(b".").unwrap_or(line) {
            if b == b'\r' || b == b'\n' {
                body.extend_from_slice(b"\r\n");
            } else {
                body.push(b);
            }
        }
        body.extend_from_slice(b"\r\n");
        rest = &rest[end + 2..];
    }
    Some((used, body))
}

/// Every CR is followed by LF and every LF preceded by CR.
pub fn only_crlf(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => bytes.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && bytes[i - 1] == b'\r',
        _ => true,
    })
}

/// Stuffs leading dots and appends the terminator: the bytes a client sends
/// after 354 for `content` (which must end in CRLF).
pub fn dot_stuff(content: &[u8]) -> Vec<u8> {
    assert!(content.is_empty() || content.ends_with(b"\r\n"));
    let mut out = Vec::with_capacity(content.len() + 8);
    for line in content.split_inclusive(|&b| b == b'\n') {
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// One SMTP reply: its code and the text of each line (after `NNN-`/`NNN `).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    /// Panics unless the code is `code`.
    #[track_caller]
    pub fn assert(&self, code: u16) -> &Reply {
        assert_eq!(self.code, code, "unexpected reply: {self}");
        self
    }

    /// Panics unless the code is `code` and the first line starts with the
    /// enhanced status code `status`.
    #[track_caller]
    pub fn assert_status(&self, code: u16, status: &str) -> &Reply {
        assert!(
            self.code == code && self.lines[0].starts_with(&format!("{status} ")),
            "expected {code} {status}, got: {self}"
        );
        self
    }

    /// The queue ID of a `250 2.0.0 Ok: queued as ID` reply.
    #[track_caller]
    pub fn queue_id(&self) -> QueueId {
        self.assert(250);
        let text = &self.lines[0];
        let id = text
            .split("queued as ")
            .nth(1)
            .unwrap_or_else(|| panic!("no queue ID in: {self}"))
            .trim();
        assert_eq!(id.len(), 13, "queue ID is 13 characters: {self}");
        id.parse()
            .unwrap_or_else(|e| panic!("bad queue ID in {self}: {e}"))
    }

    pub fn has_line(&self, text: &str) -> bool {
        self.lines.iter().any(|l| l == text)
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i + 1 == self.lines.len() { ' ' } else { '-' };
            write!(f, "{}{sep}{line}", self.code)?;
            if i + 1 < self.lines.len() {
                f.write_str(" | ")?;
            }
        }
        Ok(())
    }
}

/// How reading a reply failed.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    /// The server closed the connection (orderly, or reset).
    Closed,
    Timeout,
    Garbled(String),
}

/// A line-oriented SMTP client over a real socket.
pub struct Client {
    stream: TcpStream,
    /// Bytes read but not yet parsed into replies.
    buffer: Vec<u8>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Client::from_stream(stream)
    }

    /// Connects from the local address `source` rather than the default one.
    pub async fn connect_from(addr: SocketAddr, source: std::net::IpAddr) -> Client {
        let socket = if source.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .expect("socket");
        socket
            .bind(SocketAddr::new(source, 0))
            .unwrap_or_else(|e| panic!("bind to {source}: {e}"));
        let stream = socket.connect(addr).await.expect("connect");
        Client::from_stream(stream)
    }

    pub fn from_stream(stream: TcpStream) -> Client {
        Client {
            stream,
            buffer: Vec::new(),
        }
    }

    /// Sends bytes as they are.
    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.stream
            .write_all(bytes.as_ref())
            .await
            .expect("send to server");
    }

    /// Sends `line` followed by CRLF.
    pub async fn line(&mut self, line: &str) {
        self.send(format!("{line}\r\n")).await;
    }

    /// Sends a command and reads its reply.
    pub async fn cmd(&mut self, line: &str) -> Reply {
        self.line(line).await;
        self.reply().await
    }

    /// Reads one whole (possibly multi-line) reply, panicking on timeout or close.
    #[track_caller]
    pub fn reply(&mut self) -> impl Future<Output = Reply> + '_ {
        let caller = std::panic::Location::caller();
        async move {
            match self.try_reply(REPLY_TIMEOUT).await {
                Ok(reply) => reply,
                Err(e) => panic!("{caller}: no reply from the server: {e:?}"),
            }
        }
    }

    /// Reads a reply and checks its code.
    #[track_caller]
    pub fn expect(&mut self, code: u16) -> impl Future<Output = Reply> + '_ {
        let caller = std::panic::Location::caller();
        async move {
            let reply = match self.try_reply(REPLY_TIMEOUT).await {
                Ok(reply) => reply,
                Err(e) => panic!("{caller}: expected {code}, got no reply: {e:?}"),
            };
            assert_eq!(reply.code, code, "{caller}: unexpected reply: {reply}");
            reply
        }
    }

    /// Reads one whole reply within `timeout`.
    pub async fn try_reply(&mut self, timeout: Duration) -> Result<Reply, ReadError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut lines = Vec::new();
        loop {
            let line = self.read_line(deadline).await?;
            let text = String::from_utf8_lossy(&line);
            let text = text
                .strip_suffix("\r\n")
                .ok_or_else(|| ReadError::Garbled(format!("reply line without CRLF: {text:?}")))?;
            let code = text
                .get(..3)
                .and_then(|c| c.parse::<u16>().ok())
                .ok_or_else(|| ReadError::Garbled(format!("no reply code: {text:?}")))?;
            let sep = text.as_bytes().get(3).copied();
            lines.push((code, text.get(4..).unwrap_or("").to_string()));
            match sep {
                Some(b'-') => continue,
                Some(b' ') | None => break,
                Some(_) => return Err(ReadError::Garbled(format!("bad separator: {text:?}"))),
            }
        }
        let code = lines[0].0;
        if lines.iter().any(|(c, _)| *c != code) {
            return Err(ReadError::Garbled(format!(
                "mixed codes in one reply: {lines:?}"
            )));
        }
        Ok(Reply {
            code,
            lines: lines.into_iter().map(|(_, text)| text).collect(),
        })
    }

    async fn read_line(&mut self, deadline: tokio::time::Instant) -> Result<Vec<u8>, ReadError> {
        loop {
            if let Some(pos) = self.buffer.iter().position(|&b| b == b'\n') {
                return Ok(self.buffer.drain(..=pos).collect());
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk))
                .await
                .map_err(|_| ReadError::Timeout)?
                .map_err(|_| ReadError::Closed)?;
            if n == 0 {
                return Err(ReadError::Closed);
            }
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }

    /// Panics unless the server closes the connection (without sending anything
    /// more) within the reply timeout.
    #[track_caller]
    pub fn expect_closed(&mut self) -> impl Future<Output = ()> + '_ {
        let caller = std::panic::Location::caller();
        async move {
            match self.try_reply(REPLY_TIMEOUT).await {
                Err(ReadError::Closed) => {}
                other => panic!("{caller}: expected the server to close, got {other:?}"),
            }
        }
    }

    /// Sends QUIT, expects 221 and the connection to close, with no other reply
    /// in between.
    pub async fn quit(mut self) {
        self.cmd("QUIT").await.assert_status(221, "2.0.0");
        self.expect_closed().await;
    }

    /// One transaction from MAIL to the end of data; returns the final reply.
    /// `content` is the message as it should be stored (it is dot-stuffed here).
    pub async fn send_mail(&mut self, from: &str, to: &[&str], content: &[u8]) -> Reply {
        self.cmd(&format!("MAIL FROM:<{from}>")).await.assert(250);
        for rcpt in to {
            self.cmd(&format!("RCPT TO:<{rcpt}>")).await.assert(250);
        }
        self.cmd("DATA").await.assert(354);
        self.send(dot_stuff(content)).await;
        self.reply().await
    }
}

/// Polls `check` every 20 ms until it gives a value; panics with its last
/// complaint after `within`. The one way tests wait for something to happen.
pub async fn eventually<T>(
    within: Duration,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(why) if tokio::time::Instant::now() >= deadline => {
                panic!("still not so after {within:?}: {why}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}
