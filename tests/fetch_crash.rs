//! Crash safety of mailbox fetch with the real binary: `mxspool serve`
//! fetches a POP3 catch-all holding many messages from a real Dovecot and is
//! SIGKILLed in the middle of fetching, again and again; each restart picks
//! up where the last left off.
//!
//! What it proves: whatever moment the kill lands (a message retrieved but
//! not committed, committed but not yet deleted, deleted but the QUIT that
//! makes POP3 deletions real never sent), every message of the mailbox
//! reaches the primary exactly once, and the mailbox ends empty. The primary
//! stays down until the last round, so a duplicate could only come from the
//! fetch, not from a delivery cut short.

mod common;
mod primary;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::TestConfig;
use common::dovecot::Dovecot;
use mxspool::spool::Spool;
use primary::{Mode, Primary};

const BIN: &str = env!("CARGO_BIN_EXE_mxspool");
const USER: &str = "catchall";
const PASSWORD: &str = "crash-test-password";
const MESSAGES: usize = 300;
/// Each round's kill: as soon as the log shows this many more messages
/// taken. Progress, not a time, decides: a faster spool must not let the
/// whole mailbox through before the kill.
const KILL_AT: [usize; 4] = [1, 40, 10, 80];

/// A running `mxspool serve`, SIGKILLed when dropped.
struct Mx(Child);

impl Drop for Mx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &Path, config: &Path) -> Mx {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("mxspool.log"))
        .expect("open the log");
    let child = Command::new(BIN)
        .args(["serve", "-c"])
        .arg(config)
        .env_remove("MXSPOOL_CONFIG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start mxspool");
    Mx(child)
}

fn message(n: usize) -> Vec<u8> {
    format!(
        "Return-Path: <sender@origin.test>\nDelivered-To: user{}@example.com\n\
         From: sender@origin.test\nTo: list@lists.test\nSubject: crash {n}\n\
         Message-ID: <{n}@fetch-crash.test>\n\n{}\n",
        n % 7,
        "body line\n".repeat(50)
    )
    .into_bytes()
}

/// The message number in a body's Message-ID.
fn number_of(body: &[u8]) -> Option<usize> {
    let text = String::from_utf8_lossy(body);
    let start = text.find("Message-ID: <")? + "Message-ID: <".len();
    let len = text[start..].find("@fetch-crash.test>")?;
    text[start..start + len].parse().ok()
}

/// Messages in the spool, read while the server is not running.
fn stored(spool_path: &Path) -> usize {
    let spool = Spool::open(spool_path, 1 << 30).expect("the spool opens after a kill");
    let n = spool.stats().messages as usize;
    spool.close();
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_fetch_every_message_arrives_exactly_once() {
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]).await;
    for n in 0..MESSAGES {
        dovecot.deliver(USER, &message(n));
    }
    let primary = Primary::start().await;
    primary.set_mode(Mode::Down);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = TestConfig::default()
        .set("delivery", "probe_interval", r#""100ms""#)
        .set("delivery", "retry_initial", r#""1h""#)
        .set("delivery", "retry_max", r#""2h""#)
        .set("delivery", "bounce", r#""drop""#)
        .set("log", "level", r#""info""#)
        .domains(&format!(
            "[[domain]]\nname = \"example.com\"\nroute = \"[127.0.0.1]:{}\"\n\n\
             [[fetch]]\nname = \"isp\"\nprotocol = \"pop3\"\nserver = \"127.0.0.1:{}\"\n\
             tls = \"none\"\nusername = \"{USER}\"\npassword_file = \"{}\"\n\
             interval = \"1s\"\ndomains = [\"example.com\"]\n",
            primary.addr.port(),
            dovecot.pop3().port(),
            dovecot.password_file(PASSWORD).display(),
        ));
    let config_path = dir.path().join("mxspool.toml");
    std::fs::write(&config_path, config.render(dir.path())).unwrap();
    let spool_path = dir.path().join("spool.redb");

    let mut mid_fetch = 0;
    let log_path = dir.path().join("mxspool.log");
    let taken = || {
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .matches("fetched and queued")
            .count()
    };
    for (round, at) in KILL_AT.iter().enumerate() {
        let before = taken();
        let mx = start(dir.path(), &config_path);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while taken() < before + at {
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: the fetch did not get going"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(mx);
        let (in_spool, in_mailbox) = (stored(&spool_path), dovecot.count(USER));
        eprintln!("round {round}: {in_spool} stored, {in_mailbox} still in the mailbox");
        // Some taken, some (or all, before the QUIT) still on the server.
        if in_spool > 0 && in_mailbox > 0 {
            mid_fetch += 1;
        }
        assert!(primary.messages().is_empty(), "the primary is down");
    }
    let log = || std::fs::read_to_string(dir.path().join("mxspool.log")).unwrap_or_default();
    assert!(
        mid_fetch > 0,
        "no kill landed in the middle of a fetch; the log:\n{}",
        log()
    );

    // The last round: the primary comes back, nothing is killed.
    primary.set_mode(Mode::Up);
    let _mx = start(dir.path(), &config_path);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while primary.messages().len() < MESSAGES || dovecot.count(USER) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} delivered, {} still in the mailbox; the log:\n{}",
            primary.messages().len(),
            dovecot.count(USER),
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Give a duplicate the chance to show up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut seen: BTreeMap<usize, usize> = BTreeMap::new();
    for m in primary.messages() {
        let n = number_of(&m.body).expect("a message of this test");
        *seen.entry(n).or_default() += 1;
        assert_eq!(
            m.rcpt_lines,
            vec![format!("RCPT TO:<user{}@example.com>", n % 7)]
        );
    }
    let twice: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(seen.len(), MESSAGES, "every message arrived");
    assert_eq!(dovecot.count(USER), 0);
}
