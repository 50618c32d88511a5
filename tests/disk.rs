//! A spool that cannot take more mail: on a really full filesystem (a 1 MiB
//! tmpfs, when we may mount one) and at `spool.max_size`. Either way clients
//! get a 4xx (451 4.3.0 for a write error, 452 4.3.1 for the size cap), never
//! 250 and never 5xx; the server keeps serving; nothing already acknowledged
//! is lost and nothing refused is kept; once space is back (the filesystem
//! grows, or delivery frees the spool) mail is accepted again; and in the end
//! every message that got 250 reaches the primary exactly once.

mod common;
mod primary;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Client, Reply, TestConfig, TestServer};
use primary::{Mode, Primary};
use tempfile::TempDir;

/// Every test message is about this big, so a few dozen fill 1 MiB.
const MESSAGE_SIZE: usize = 20_000;

/// A message of about [`MESSAGE_SIZE`] bytes carrying `token` in one header line.
fn message(token: &str) -> Vec<u8> {
    let mut m = format!("Subject: disk test\r\nX-Token: {token}\r\n\r\n").into_bytes();
    let line = format!("{token} {}\r\n", "y".repeat(60));
    while m.len() + line.len() <= MESSAGE_SIZE {
        m.extend_from_slice(line.as_bytes());
    }
    m
}

/// The token of a message as the primary received it.
fn token_of(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    text.lines()
        .find_map(|l| l.strip_prefix("X-Token: "))
        .map(str::to_owned)
}

/// A config whose only domain routes to `primary`, with fast probes and an
/// hour of backoff (so only the probe releases mail), 20 KB messages allowed.
fn config_for(primary: &Primary) -> TestConfig {
    TestConfig::default()
        .server("max_message_size", "100000")
        .set("delivery", "probe_interval", r#""200ms""#)
        .set("delivery", "retry_initial", r#""1h""#)
        .set("delivery", "retry_max", r#""2h""#)
        .domains(&format!(
            "[[domain]]\nname = \"example.com\"\nroute = \"[127.0.0.1]:{}\"\n",
            primary.addr.port()
        ))
}

/// One transaction that may be refused at any step: the first reply that is
/// not the expected one (250 to MAIL and RCPT, 354 to DATA), or the final one.
async fn try_mail(c: &mut Client, token: &str) -> Reply {
    let r = c.cmd("MAIL FROM:<sender@origin.test>").await;
    if r.code != 250 {
        return r;
    }
    let r = c.cmd("RCPT TO:<user@example.com>").await;
    if r.code != 250 {
        c.cmd("RSET").await.assert(250);
        return r;
    }
    let r = c.cmd("DATA").await;
    if r.code != 354 {
        c.cmd("RSET").await.assert(250);
        return r;
    }
    c.send(common::dot_stuff(&message(token))).await;
    c.reply().await
}

/// The server is still there: a new connection is greeted, EHLO works.
async fn assert_serving(t: &TestServer) {
    let mut c = Client::connect(t.addr).await;
    c.expect(220).await;
    c.cmd("EHLO again.test").await.assert(250);
    c.quit().await;
}

/// What was acknowledged: token -> queue ID (as text).
type Acked = BTreeMap<String, String>;

fn record_ack(acked: &mut Acked, token: &str, reply: &Reply) {
    let id = reply.queue_id().to_string();
    assert!(
        acked.insert(token.to_owned(), id).is_none(),
        "token {token} used twice"
    );
}

/// The spool holds exactly the acknowledged messages, each with its own body.
fn assert_spool_holds(t: &TestServer, acked: &Acked) {
    let stored = t.stored();
    let mut found = Acked::new();
    for (env, body) in &stored {
        let token =
            token_of(body).unwrap_or_else(|| panic!("stored message {} has no token", env.id));
        assert!(
            found.insert(token.clone(), env.id.to_string()).is_none(),
            "token {token} stored twice"
        );
    }
    assert_eq!(
        &found, acked,
        "the spool must hold every acknowledged message and nothing refused"
    );
}

/// Waits until the primary has every acknowledged message and the queue is
/// empty, then checks each arrived exactly once and nothing else arrived.
async fn assert_all_delivered_once(t: &TestServer, primary: &Primary, acked: &Acked) {
    let arrived = primary
        .wait_for_messages(acked.len(), Duration::from_secs(10))
        .await;
    assert!(
        arrived,
        "only {} of {} acknowledged messages reached the primary",
        primary.messages().len(),
        acked.len()
    );
    let stats = common::eventually(Duration::from_secs(5), async || {
        let stats = t.spool().stats();
        if stats.messages == 0 && t.stored().is_empty() {
            Ok(stats)
        } else {
            Err(format!("delivered mail stays queued: {stats:?}"))
        }
    })
    .await;
    assert_eq!(stats.bytes, 0, "an empty queue holds no bytes: {stats:?}");
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for m in primary.messages() {
        let token = token_of(&m.body).expect("every delivered message has its token");
        *counts.entry(token).or_default() += 1;
    }
    for token in acked.keys() {
        assert_eq!(
            counts.get(token).copied().unwrap_or(0),
            1,
            "acknowledged message {token} must arrive exactly once"
        );
    }
    for token in counts.keys() {
        assert!(
            acked.contains_key(token),
            "message {token} was refused yet delivered"
        );
    }
}

/// `mxspool_smtp_rejected_total{reason=...}` as `/metrics` reports it.
async fn rejected(t: &TestServer, reason: &str) -> f64 {
    let response = common::http::request(t.server.http_addr(), "GET", "/metrics", &[], None)
        .await
        .expect("GET /metrics");
    assert_eq!(response.status, 200, "GET /metrics: {response:?}");
    let body = response.body;
    let series = format!("mxspool_smtp_rejected_total{{reason=\"{reason}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .unwrap_or_else(|| panic!("no {series:?} in /metrics"))
        .trim()
        .parse()
        .expect("a number")
}

// ---------------------------------------------------------------------------
// Variant 1: the filesystem under the spool really fills up.

/// A tmpfs mounted on a fresh directory; lazily unmounted (then the directory
/// removed) when dropped, whatever happened.
struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    /// `Err(why)` if we may not or cannot mount.
    fn mount(size: &str) -> Result<Tmpfs, String> {
        if !is_root() {
            return Err("not running as root".into());
        }
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.path())
            .output()
            .expect("run mount -o remount");
        assert!(
            out.status.success(),
            "remount to {size} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_filesystem_tempfails_keeps_what_was_acked_and_recovers() {
    let mount = match Tmpfs::mount("1m") {
        Ok(m) => m,
        Err(why) => {
            println!(
                "SKIPPED a_full_filesystem_tempfails_keeps_what_was_acked_and_recovers: \
                 cannot mount a small tmpfs to fill ({why}); the max_size variant still runs"
            );
            return;
        }
    };
    let spool_path: PathBuf = mount.path().join("spool.redb");
    let primary = Primary::start().await;
    primary.set_mode(Mode::Down);
    let config = config_for(&primary).set("spool", "path", &format!("{spool_path:?}"));
    let t = TestServer::start(config).await;
    assert_eq!(t.spool_path, spool_path);

    // Fill the filesystem until the spool's writes fail.
    let mut acked = Acked::new();
    let mut refusals = 0usize;
    let mut c = t.ehlo().await;
    let mut n = 0;
    while refusals == 0 {
        assert!(
            n < 200,
            "1 MiB took 200 messages of 20 KB without a refusal"
        );
        let token = format!("full-fs-{n:04}");
        n += 1;
        let reply = try_mail(&mut c, &token).await;
        match reply.code {
            250 => record_ack(&mut acked, &token, &reply),
            _ => {
                reply.assert_status(451, "4.3.0");
                refusals += 1;
            }
        }
    }
    assert!(!acked.is_empty(), "not even one message fit in 1 MiB");
    // While the disk stays full: more mail is refused the same way (or, if
    // the failed write happened to leave room, acked), never 5xx.
    for _ in 0..3 {
        let token = format!("full-fs-{n:04}");
        n += 1;
        let reply = try_mail(&mut c, &token).await;
        match reply.code {
            250 => record_ack(&mut acked, &token, &reply),
            _ => {
                reply.assert_status(451, "4.3.0");
                refusals += 1;
            }
        }
    }
    // The session survives its refusals, and so does the server.
    c.cmd("RSET").await.assert(250);
    c.cmd("NOOP").await.assert(250);
    assert_serving(&t).await;
    assert_eq!(
        rejected(&t, "spool_error").await,
        refusals as f64,
        "every 451 is counted"
    );
    println!(
        "full filesystem: {} acked, {refusals} refused with 451 4.3.0",
        acked.len()
    );
    // Even while the disk is full, what was acked is there and readable.
    assert_spool_holds(&t, &acked);

    // The primary comes back while the disk is still full: releasing its
    // mail cannot be written yet, and must not be forgotten.
    primary.set_mode(Mode::Up);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Space comes back: mail is taken again, at once.
    mount.resize("64m");
    for _ in 0..3 {
        let token = format!("full-fs-{n:04}");
        n += 1;
        let reply = try_mail(&mut c, &token).await;
        assert_eq!(reply.code, 250, "after space was freed: {reply}");
        record_ack(&mut acked, &token, &reply);
    }
    c.quit().await;

    // Without a flush, everything acked arrives once, and the queue empties.
    assert_all_delivered_once(&t, &primary, &acked).await;
    let TestServer { server, .. } = t;
    server.shutdown(Duration::from_secs(2)).await;
    drop(mount);
}

// ---------------------------------------------------------------------------
// Variant 2: spool.max_size is reached; delivery makes room again.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spool_at_max_size_tempfails_then_accepts_once_delivery_frees_it() {
    let primary = Primary::start().await;
    primary.set_mode(Mode::Down);
    let t = TestServer::start(config_for(&primary).set("spool", "max_size", "200000")).await;
    assert_eq!(rejected(&t, "spool_full").await, 0.0);

    // Fill to the cap.
    let mut acked = Acked::new();
    let mut full = 0usize;
    let mut c = t.ehlo().await;
    let mut n = 0;
    while full == 0 {
        assert!(n < 20, "200 kB took 20 messages of 20 KB without a refusal");
        let token = format!("cap-{n:04}");
        n += 1;
        let reply = try_mail(&mut c, &token).await;
        match reply.code {
            250 => record_ack(&mut acked, &token, &reply),
            _ => {
                reply.assert_status(452, "4.3.1");
                full += 1;
            }
        }
    }
    // 200000 / ~20 KB: nine fit, the tenth does not.
    assert_eq!(acked.len(), 9, "messages that fit under max_size");
    let used = t.spool().stats().bytes;
    assert!(
        used <= 200_000 && used + MESSAGE_SIZE as u64 > 200_000,
        "the cap was honoured and reached: {used} bytes"
    );
    // Still full: with SIZE= it is refused at MAIL, without at the end of data.
    c.cmd(&format!(
        "MAIL FROM:<sender@origin.test> SIZE={MESSAGE_SIZE}"
    ))
    .await
    .assert_status(452, "4.3.1");
    full += 1;
    try_mail(&mut c, "cap-refused")
        .await
        .assert_status(452, "4.3.1");
    full += 1;
    c.cmd("NOOP").await.assert(250);
    c.quit().await;
    assert_serving(&t).await;
    assert_eq!(
        rejected(&t, "spool_full").await,
        full as f64,
        "every 452 4.3.1 is counted under reason=\"spool_full\""
    );
    assert_eq!(rejected(&t, "spool_error").await, 0.0);
    assert_spool_holds(&t, &acked);
    assert!(primary.messages().is_empty());

    // The primary comes back; delivery empties the spool.
    primary.set_mode(Mode::Up);
    assert_all_delivered_once(&t, &primary, &acked).await;

    // The freed space takes a full spool's worth of new mail again.
    let mut c = t.ehlo().await;
    for _ in 0..9 {
        let token = format!("cap-{n:04}");
        n += 1;
        let reply = try_mail(&mut c, &token).await;
        assert_eq!(reply.code, 250, "after delivery freed the spool: {reply}");
        record_ack(&mut acked, &token, &reply);
    }
    c.quit().await;
    assert_all_delivered_once(&t, &primary, &acked).await;
    assert_eq!(
        rejected(&t, "spool_full").await,
        full as f64,
        "no refusal once there was room"
    );
    let TestServer { server, .. } = t;
    server.shutdown(Duration::from_secs(2)).await;
}
