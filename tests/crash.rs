//! Crash safety of the real binary: many SMTP clients send mail to
//! `mxspool serve` while the test SIGKILLs it at random moments, restarts it
//! on the same spool, and in the end lets the primary come back for good.
//!
//! What it proves:
//! - every message answered with `250` reaches the primary, byte for byte
//!   (duplicates are allowed, delivery being at least once; losses are not);
//! - after every kill the spool opens again, the server answers SMTP, and each
//!   acknowledged message is still queued or already at the primary;
//! - once the primary is back the queue drains completely and nothing ends up
//!   in the dead-letter table.
//!
//! Kills land both while the primary is down (mail only accumulates) and while
//! it is up (deliveries are in flight at kill time: where duplicates come
//! from). Set `CRASH_SEED` to replay a run's kill delays.

mod common;
mod primary;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::Instant;

use common::{TestConfig, dot_stuff, split_received, stored};
use mxspool::spool::Spool;
use primary::{Mode, Primary};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_mxspool");

/// The primary's mode during each round, i.e. at the moment of each kill.
const ROUNDS: [Mode; 8] = [
    Mode::Down,
    Mode::Up,
    Mode::Down,
    Mode::Down,
    Mode::Up,
    Mode::Down,
    Mode::Up,
    Mode::Down,
];
/// Concurrent SMTP clients per round.
const CLIENTS: usize = 20;
/// The most messages one client starts per round.
const PER_CLIENT: usize = 30;
/// A client's pause after each acknowledged message: sending [`PER_CLIENT`]
/// takes longer than the longest round, so however fast the machine, the
/// clients are still at work when the kill comes.
const PAUSE: Duration = Duration::from_millis(20);
/// The kill comes this many milliseconds after the clients start.
const KILL_AFTER_MS: std::ops::RangeInclusive<u64> = 50..=500;
/// How long a restarted server gets to answer SMTP and HTTP.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Any single network exchange with the server.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the final server gets to hand every acknowledged message over.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

const ADMIN_TOKEN: &str = "crash-test-admin-token";
const SENDER: &str = "sender@origin.test";
const RECIPIENT: &str = "user@example.com";

/// The message a client sends for `token`: the token in Subject and
/// Message-ID, and a line that needs dot-stuffing.
fn content(token: &str) -> Vec<u8> {
    format!(
        "From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: crash test {token}\r\n\
         Message-ID: <{token}@crash.test>\r\n\r\nbody of {token}\r\n.leading dot\r\n"
    )
    .into_bytes()
}

/// The token in the Message-ID of a body the primary received.
fn token_of(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let start = text.find("Message-ID: <")? + "Message-ID: <".len();
    let len = text[start..].find("@crash.test>")?;
    Some(text[start..start + len].to_owned())
}

/// A loopback address nobody listens on right now (bound, then released).
fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address")
}

// ---------------------------------------------------------------------------
// The server process.

/// A running `mxspool serve`; SIGKILLed when dropped, so a failing test leaves
/// no process behind.
struct Mx {
    child: Child,
    smtp: SocketAddr,
    http: SocketAddr,
}

enum StartError {
    /// Someone took one of the ports we picked: pick others.
    PortTaken,
    Failed(String),
}

impl Mx {
    /// Starts the server on `dir`'s spool with fresh ports and waits until it
    /// answers SMTP and its admin API.
    async fn start(dir: &Path, primary: &Primary, label: &str) -> Mx {
        for _ in 0..3 {
            let smtp = free_addr();
            let http = free_addr();
            let config = TestConfig::default()
                .server("listen", &format!(r#"["{smtp}"]"#))
                .server("max_connections_per_ip", "200")
                .server("command_timeout", r#""10s""#)
                .server("data_timeout", r#""10s""#)
                .set("http", "listen", &format!(r#""{http}""#))
                .set("http", "admin_token_file", r#""{dir}/admin-token""#)
                // Fast probes, slow retries: mail that waited for the primary
                // must be released the moment it answers, not on a retry timer,
                // even when it answers while the backlog is still being
                // deferred after a restart.
                .set("delivery", "probe_interval", r#""100ms""#)
                .set("delivery", "retry_initial", r#""1h""#)
                .set("delivery", "retry_max", r#""2h""#)
                // Nothing may leave loopback: no DNS, no notices.
                .set(
                    "delivery",
                    "nameservers",
                    &format!(r#"["{}"]"#, free_addr()),
                )
                .set("delivery", "bounce", r#""drop""#)
                .set("log", "level", r#""info""#)
                .domains(&format!(
                    "[[domain]]\nname = \"example.com\"\nroute = \"[127.0.0.1]:{}\"\n",
                    primary.addr.port()
                ));
            let config_path = dir.join("mxspool.toml");
            std::fs::write(&config_path, config.render(dir)).expect("write config");
            let mut log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("mxspool.log"))
                .expect("open log");
            writeln!(log, "=== {label}").expect("write log");
            let child = Command::new(BIN)
                .arg("serve")
                .arg("-c")
                .arg(&config_path)
                .env("NO_COLOR", "1")
                .env_remove("MXSPOOL_CONFIG")
                .env_remove("RUST_LOG")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start mxspool");
            let mut mx = Mx { child, smtp, http };
            match mx.wait_ready(dir).await {
                Ok(()) => return mx,
                Err(StartError::PortTaken) => continue,
                Err(StartError::Failed(why)) => panic!("{label}: {why}"),
            }
        }
        panic!("{label}: three times a picked port was taken before mxspool bound it")
    }

    /// Polls until the server greets, answers EHLO and `GET /api/queue`.
    async fn wait_ready(&mut self, dir: &Path) -> Result<(), StartError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll mxspool") {
                let log = log_tail(dir);
                if log.contains("cannot listen") {
                    return Err(StartError::PortTaken);
                }
                return Err(StartError::Failed(format!(
                    "mxspool exited while starting ({status}); its log:\n{log}"
                )));
            }
            let last = match self.handshake().await {
                Ok(()) => match api_get(self.http, "/api/queue").await {
                    Ok((200, _)) => return Ok(()),
                    Ok((status, body)) => format!("GET /api/queue: {status} {body}"),
                    Err(e) => format!("GET /api/queue: {e}"),
                },
                Err(e) => e,
            };
            if Instant::now() > deadline {
                return Err(StartError::Failed(format!(
                    "mxspool does not answer within {START_TIMEOUT:?} (last: {last}); its log:\n{}",
                    log_tail(dir)
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Greeting, EHLO, QUIT.
    async fn handshake(&self) -> Result<(), String> {
        let stream = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(self.smtp))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| format!("connect: {e}"))?;
        let mut s = Smtp::new(stream);
        let greeting = s.reply().await.map_err(|e| format!("greeting: {e}"))?;
        if greeting.code != 220 {
            return Err(format!("greeting: {greeting}"));
        }
        let ehlo = s
            .cmd("EHLO probe.test")
            .await
            .map_err(|e| format!("EHLO: {e}"))?;
        if ehlo.code != 250 {
            return Err(format!("EHLO: {ehlo}"));
        }
        let _ = s.cmd("QUIT").await;
        Ok(())
    }

    /// SIGKILL: no shutdown code runs.
    fn kill(mut self) {
        self.child.kill().expect("SIGKILL mxspool");
        self.child.wait().expect("reap mxspool");
    }
}

impl Drop for Mx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The log of the latest start.
fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("mxspool.log")).unwrap_or_default();
    let latest = log.rsplit("=== ").next().unwrap_or("");
    let lines: Vec<&str> = latest.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

// ---------------------------------------------------------------------------
// A small SMTP client that expects the server to vanish at any moment.

struct Reply {
    code: u16,
    text: String,
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

struct Smtp {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl Smtp {
    fn new(stream: TcpStream) -> Smtp {
        Smtp {
            stream,
            buffer: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        tokio::time::timeout(IO_TIMEOUT, self.stream.write_all(bytes))
            .await
            .map_err(|_| "send timed out".to_string())?
            .map_err(|e| format!("send: {e}"))
    }

    async fn cmd(&mut self, line: &str) -> Result<Reply, String> {
        self.send(format!("{line}\r\n").as_bytes()).await?;
        self.reply().await
    }

    /// One whole reply (the last line's code and the lines' text).
    async fn reply(&mut self) -> Result<Reply, String> {
        let mut text = Vec::new();
        loop {
            let line = self.line().await?;
            let code = line
                .get(..3)
                .and_then(|c| c.parse::<u16>().ok())
                .ok_or_else(|| format!("garbled reply line {line:?}"))?;
            text.push(line.get(4..).unwrap_or("").to_owned());
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(Reply {
                    code,
                    text: text.join(" | "),
                });
            }
        }
    }

    async fn line(&mut self) -> Result<String, String> {
        loop {
            if let Some(lf) = self.buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=lf).collect();
                return Ok(String::from_utf8_lossy(&line)
                    .trim_end_matches(['\r', '\n'])
                    .to_owned());
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(IO_TIMEOUT, self.stream.read(&mut chunk))
                .await
                .map_err(|_| "no reply in time".to_string())?
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("connection closed".into());
            }
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }

    /// One transaction. `Ok` carries the reply that ended it: the one after
    /// the final dot, or an earlier refusal.
    async fn send_mail(&mut self, token: &str) -> Result<Reply, String> {
        for (line, want) in [
            (format!("MAIL FROM:<{SENDER}>"), 250),
            (format!("RCPT TO:<{RECIPIENT}>"), 250),
            ("DATA".to_owned(), 354),
        ] {
            let reply = self.cmd(&line).await?;
            if reply.code != want {
                return Ok(reply);
            }
        }
        self.send(&dot_stuff(&content(token))).await?;
        self.reply().await
    }
}

/// What one client saw in one round.
#[derive(Default)]
struct Outcome {
    /// Every token a transaction was started for.
    started: Vec<String>,
    /// (token, queue ID) of every `250` after the final dot.
    acked: Vec<(String, String)>,
    /// Permanent refusals (never expected).
    refused: Vec<String>,
}

/// Sends up to [`PER_CLIENT`] messages, reconnecting after any failure,
/// until `stop`. A transaction cut short simply does not count as acked.
async fn client(addr: SocketAddr, round: usize, id: usize, stop: Arc<AtomicBool>) -> Outcome {
    let mut out = Outcome::default();
    let mut n = 0;
    while n < PER_CLIENT && !stop.load(Ordering::SeqCst) {
        let Ok(Ok(stream)) = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr)).await
        else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let mut s = Smtp::new(stream);
        let greeted = match s.reply().await {
            Ok(r) if r.code == 220 => s.cmd("EHLO client.test").await.map(|r| r.code == 250),
            _ => Ok(false),
        };
        if greeted != Ok(true) {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        while n < PER_CLIENT && !stop.load(Ordering::SeqCst) {
            let token = format!("r{round}-c{id}-m{n}");
            n += 1;
            out.started.push(token.clone());
            match s.send_mail(&token).await {
                Ok(reply) if reply.code == 250 => {
                    let queue_id = reply
                        .text
                        .split("queued as ")
                        .nth(1)
                        .map(|id| id.trim().to_ascii_uppercase())
                        .unwrap_or_else(|| panic!("{token}: no queue ID in {reply}"));
                    out.acked.push((token, queue_id));
                    tokio::time::sleep(PAUSE).await;
                }
                Ok(reply) => {
                    if reply.code >= 500 {
                        out.refused.push(format!("{token}: {reply}"));
                    }
                    // Start afresh after any refusal.
                    break;
                }
                Err(_) => break,
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The admin API.

/// `GET path` with the admin token; (status, body).
async fn api_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let response =
        common::http::request(addr, "GET", path, &[("Authorization", auth.as_str())], None).await?;
    Ok((response.status, response.body))
}

/// The IDs of a listing (`/api/queue`, every page, or `/api/dead`),
/// checked for consistency.
async fn listed_ids(mx: &Mx, path: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page_path = match (&cursor, path == "/api/queue") {
            (Some(c), _) => format!("{path}?limit=1000&cursor={c}"),
            (None, true) => format!("{path}?limit=1000"),
            (None, false) => path.to_owned(),
        };
        let (status, body) = api_get(mx.http, &page_path)
            .await
            .unwrap_or_else(|e| panic!("GET {page_path}: {e}"));
        assert_eq!(status, 200, "GET {page_path}: {body}");
        let v: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{page_path}: {e}: {body}"));
        let messages = v["messages"]
            .as_array()
            .unwrap_or_else(|| panic!("{page_path}: no messages list: {body}"));
        cursor = v["next_cursor"].as_str().map(str::to_owned);
        if ids.is_empty() && cursor.is_none() {
            // One page: the count is exactly what it lists.
            assert_eq!(
                v["count"].as_u64(),
                Some(messages.len() as u64),
                "{page_path}: count differs from the list: {body}"
            );
        }
        ids.extend(messages.iter().map(|m| {
            m["id"]
                .as_str()
                .unwrap_or_else(|| panic!("{page_path}: message without id: {m}"))
                .to_ascii_uppercase()
        }));
        if cursor.is_none() {
            return ids;
        }
    }
}

// ---------------------------------------------------------------------------
// Bookkeeping.

/// The first few items of a long list, for a failure message.
fn some<T: std::fmt::Display>(items: &[T]) -> String {
    let shown: Vec<String> = items.iter().take(20).map(T::to_string).collect();
    match items.len().saturating_sub(shown.len()) {
        0 => format!("[{}]", shown.join(", ")),
        more => format!("[{}, and {more} more]", shown.join(", ")),
    }
}

/// The tokens the primary received, with how often.
fn delivered(primary: &Primary) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for m in primary.messages() {
        let token = token_of(&m.body).unwrap_or_else(|| {
            panic!(
                "the primary got mail without a test token: {:?}",
                String::from_utf8_lossy(&m.body)
            )
        });
        *counts.entry(token).or_insert(0) += 1;
    }
    counts
}

/// The test's directory (config, spool, server log), kept if the test fails.
struct Workdir(Option<tempfile::TempDir>);

impl Workdir {
    fn path(&self) -> &Path {
        self.0.as_ref().expect("not dropped yet").path()
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.0.take()
        {
            let kept = dir.keep();
            eprintln!(
                "crash test failed: its server log and spool are in {}",
                kept.display()
            );
        }
    }
}

/// Every acknowledged message is queued or already at the primary. The
/// queue is read first: a message gone from it had reached the primary
/// before, since the primary records mail before answering the final dot.
async fn assert_nothing_lost(
    mx: &Mx,
    primary: &Primary,
    acked: &BTreeMap<String, String>,
    when: &str,
) {
    let queued: HashSet<String> = listed_ids(mx, "/api/queue").await.into_iter().collect();
    let delivered = delivered(primary);
    let lost: Vec<String> = acked
        .iter()
        .filter(|(token, id)| !queued.contains(*id) && !delivered.contains_key(*token))
        .map(|(token, id)| format!("{token} (queued as {id})"))
        .collect();
    assert!(
        lost.is_empty(),
        "{when}: {} acknowledged message(s) are neither in the queue nor at the primary: {}",
        lost.len(),
        some(&lost)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_mail_survives_random_sigkills() {
    let began = Instant::now();
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("crash test: CRASH_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);

    let dir = Workdir(Some(tempfile::tempdir().expect("tempdir")));
    std::fs::write(dir.path().join("admin-token"), ADMIN_TOKEN).expect("write token");
    let primary = Primary::start().await;

    // token -> queue ID of every message answered with 250.
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    // queue ID -> token, to catch an ID given twice.
    let mut by_id: HashMap<String, String> = HashMap::new();
    let mut started: HashSet<String> = HashSet::new();
    let mut refused: Vec<String> = Vec::new();
    let mut cut_total = 0;
    let mut delivered_in_up_rounds = 0;

    for (round, &mode) in ROUNDS.iter().enumerate() {
        primary.set_mode(mode);
        let at_primary_before = primary.messages().len();
        let mx = Mx::start(dir.path(), &primary, &format!("start {round}")).await;
        assert_nothing_lost(&mx, &primary, &acked, &format!("restart {round}")).await;

        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| tokio::spawn(client(mx.smtp, round, c, stop.clone())))
            .collect();
        let delay = rng.u64(KILL_AFTER_MS);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        mx.kill();
        stop.store(true, Ordering::SeqCst);
        let at_primary_after = primary.messages().len();

        let (mut round_started, mut round_acked) = (0, 0);
        for task in clients {
            let out = task.await.expect("client task");
            round_started += out.started.len();
            round_acked += out.acked.len();
            refused.extend(out.refused);
            started.extend(out.started);
            for (token, id) in out.acked {
                if let Some(other) = by_id.insert(id.clone(), token.clone()) {
                    panic!("queue ID {id} was given to both {other} and {token}");
                }
                acked.insert(token, id);
            }
        }
        let cut = round_started - round_acked;
        cut_total += cut;
        let delivered_now = at_primary_after - at_primary_before;
        if mode == Mode::Up {
            delivered_in_up_rounds += delivered_now;
        }
        eprintln!(
            "round {round}: primary {mode:?}, killed after {delay} ms: {round_acked} acked, \
             {cut} not acknowledged, {delivered_now} delivered during the round"
        );
    }
    assert!(
        refused.is_empty(),
        "valid mail was refused permanently: {refused:?}"
    );
    assert!(
        acked.len() >= 50,
        "only {} messages were acknowledged in all rounds: the test proves little",
        acked.len()
    );
    assert!(
        cut_total > 0,
        "no transaction was cut short by a kill: the kills came too late"
    );
    assert!(
        delivered_in_up_rounds > 0,
        "nothing was delivered during the rounds with the primary up"
    );

    // The primary is back for good: everything acknowledged must arrive.
    primary.set_mode(Mode::Up);
    let mx = Mx::start(dir.path(), &primary, "final start").await;
    assert_nothing_lost(&mx, &primary, &acked, "final restart").await;
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let delivered = delivered(&primary);
        let missing: Vec<&String> = acked
            .keys()
            .filter(|t| !delivered.contains_key(*t))
            .collect();
        if missing.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let queued: HashSet<String> = listed_ids(&mx, "/api/queue").await.into_iter().collect();
            let (stuck, lost): (Vec<&String>, Vec<&String>) =
                missing.iter().partition(|t| queued.contains(&acked[**t]));
            panic!(
                "{} acknowledged message(s) did not reach the primary within {DRAIN_TIMEOUT:?}: \
                 {} lost (not queued): {}; {} still queued: {}",
                missing.len(),
                lost.len(),
                some(&lost),
                stuck.len(),
                some(&stuck)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Also whatever was committed without a 250 reaching the client.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let queued = listed_ids(&mx, "/api/queue").await;
        if queued.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the queue does not drain with the primary up: {}",
            some(&queued)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dead = listed_ids(&mx, "/api/dead").await;
    assert!(dead.is_empty(), "dead letters: {dead:?}");

    // What arrived is what was sent, and only that.
    let messages = primary.messages();
    for m in &messages {
        let token = token_of(&m.body).expect("token checked above");
        assert!(
            started.contains(&token),
            "the primary got {token}, which no client sent"
        );
        let (_, rest) = split_received(&m.body);
        assert!(
            rest == content(&token).as_slice(),
            "{token} arrived altered: {:?}",
            String::from_utf8_lossy(&m.body)
        );
        assert!(
            m.rcpt_lines.len() == 1 && m.rcpt_lines[0].contains(&format!("<{RECIPIENT}>")),
            "{token}: {:?}",
            m.rcpt_lines
        );
    }
    let counts = delivered(&primary);
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    let duplicated = counts.values().filter(|&&n| n > 1).count();
    let unacked = counts.keys().filter(|t| !acked.contains_key(*t)).count();

    // The spool itself, read directly after one more SIGKILL: empty.
    mx.kill();
    let spool_path = dir.path().join("spool.redb");
    let spool = tokio::task::spawn_blocking(move || Spool::open(&spool_path, 1 << 30))
        .await
        .expect("open task")
        .expect("the spool opens after SIGKILL");
    let left = stored(&spool);
    spool.close();
    assert!(
        left.is_empty(),
        "the spool still holds {} message(s) after the queue drained",
        left.len()
    );

    eprintln!(
        "crash test: {} rounds, {} messages started, {} acked, {} delivered \
         ({} also delivered without a 250 reaching the client); \
         {duplicates} duplicate deliveries of {duplicated} message(s); {:.1} s",
        ROUNDS.len(),
        started.len(),
        acked.len(),
        messages.len(),
        unacked,
        began.elapsed().as_secs_f64()
    );
}
