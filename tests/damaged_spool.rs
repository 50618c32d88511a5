//! A spool file damaged from outside, opened by the real binary.
//!
//! Records inside a healthy spool are damaged with redb itself (an envelope
//! that no longer decodes, a body gone from under its envelope, a due-index
//! entry pointing to no message): `mxspool serve` must start, set each aside
//! or right, name their queue IDs in its log, count the quarantined ones in
//! `mxspool_spool_quarantined`, and deliver every healthy message.
//!
//! A file that is not a redb database at all, or a spool cut short, must stop
//! `mxspool serve` with exit status 1 and an error naming the file, which is
//! left byte for byte as it was.

mod common;
mod primary;

use std::collections::BTreeSet;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;
use tokio::time::Instant;

use common::TestConfig;
use mxspool::spool::{
    BodyType, Client, Envelope, NewMessage, Notify, QueueId, RcptStatus, Recipient, Ret, Spool,
};
use primary::Primary;
use redb::{Database, ReadableDatabase, TableDefinition};

const BIN: &str = env!("CARGO_BIN_EXE_mxspool");

// The spool's tables as `src/spool/mod.rs` lays them out.
const MESSAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("messages");
const BODY_CHUNKS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("body_chunks");
const DUE: TableDefinition<(u64, u64), ()> = TableDefinition::new("due");

/// Healthy messages written before the damage (two of them are then damaged).
const MESSAGES_WRITTEN: usize = 12;
/// How long the server gets to start, and then to deliver what it can.
const START_TIMEOUT: Duration = Duration::from_secs(10);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

fn now_ms() -> u64 {
    mxspool::clock::Clock::new().now_ms()
}

/// A loopback address nobody listens on right now (bound, then released).
fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address")
}

/// A message to `user@example.com`, due now, whose Message-ID carries `token`.
fn message(id: QueueId, token: &str) -> NewMessage {
    let body = format!(
        "Received: from client.test by mx2.test; Thu, 1 Jan 2026 00:00:00 +0000\r\n\
         From: <sender@origin.test>\r\nTo: <user@example.com>\r\n\
         Message-ID: <{token}@damaged.test>\r\nSubject: {token}\r\n\r\nbody of {token}\r\n"
    )
    .into_bytes();
    let now = now_ms();
    NewMessage {
        envelope: Envelope {
            id,
            sender: "sender@origin.test".into(),
            ret: Ret::Unset,
            envid: None,
            envid_xtext: None,
            body_type: BodyType::Unset,
            smtputf8: false,
            has_8bit: false,
            arrived_ms: now,
            size: body.len() as u64,
            client: Client {
                ip: "192.0.2.1".parse().expect("IP"),
                helo: "client.test".into(),
                tls: false,
            },
            recipients: vec![Recipient {
                address: "user@example.com".into(),
                orcpt: None,
                orcpt_xtext: None,
                notify: Notify::default(),
                status: RcptStatus::Queued,
                attempts: 0,
                next_attempt_ms: now,
                last_reply: None,
                unreachable: false,
                delay_notified: false,
                suspect: false,
            }],
            notices_to: None,
        },
        body,
    }
}

/// Writes `count` healthy messages into a new spool at `path` through the
/// spool's own API and closes it cleanly. Returns (ID, token) of each.
async fn healthy_spool(path: &Path, count: usize) -> Vec<(QueueId, String)> {
    let spool = Spool::open(path, 1 << 30).expect("open a new spool");
    let mut written = Vec::new();
    for i in 0..count {
        let id = spool.next_id(now_ms() * 1000);
        let token = format!("tok{i:03}");
        spool.commit(message(id, &token)).await.expect("commit");
        written.push((id, token));
    }
    let closing = spool.clone();
    tokio::task::spawn_blocking(move || closing.close())
        .await
        .expect("close the spool");
    drop(spool);
    written
}

/// The token in the Message-ID of a body the primary received.
fn token_of(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let start = text.find("Message-ID: <")? + "Message-ID: <".len();
    let len = text[start..].find("@damaged.test>")?;
    Some(text[start..start + len].to_owned())
}

/// Writes the config for a server whose one domain is routed to `route`,
/// with its log going to `dir/mxspool.log`. Returns the config path.
fn write_config(dir: &Path, smtp: SocketAddr, http: SocketAddr, route: SocketAddr) -> PathBuf {
    let config = TestConfig::default()
        .server("listen", &format!(r#"["{smtp}"]"#))
        .set("http", "listen", &format!(r#""{http}""#))
        .set("delivery", "probe_interval", r#""100ms""#)
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
            route.port()
        ));
    let path = dir.join("mxspool.toml");
    std::fs::write(&path, config.render(dir)).expect("write config");
    path
}

/// Starts `mxspool serve -c config`, its stderr going to `log`.
fn spawn(config: &Path, log: &Path) -> Child {
    Command::new(BIN)
        .arg("serve")
        .arg("-c")
        .arg(config)
        .env("NO_COLOR", "1")
        .env_remove("MXSPOOL_CONFIG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(log).expect("create log"))
        .spawn()
        .expect("start mxspool")
}

/// A running server, killed if the test fails before stopping it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for the child to exit on its own; kills it after `timeout`.
fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("poll mxspool") {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM, as an operator's `systemctl stop` would send.
fn terminate(child: &Child) {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM failed");
}

/// The value of an unlabelled metric, or the sum over a labelled one's series.
fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if series == name || series.starts_with(&format!("{name}{{")) {
            let value: f64 = value.parse().ok()?;
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

async fn scrape(http: SocketAddr) -> Result<String, String> {
    let answer = common::http::request(http, "GET", "/metrics", &[], None).await?;
    if answer.status != 200 {
        return Err(format!("GET /metrics: {}", answer.status));
    }
    Ok(answer.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_records_are_set_aside_and_healthy_mail_is_delivered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool_path = dir.path().join("spool.redb");
    let written = healthy_spool(&spool_path, MESSAGES_WRITTEN).await;
    let (undecodable, _) = written[3].clone();
    let (bodiless, _) = written[7].clone();
    let nowhere = QueueId(written.last().expect("messages").0.0 + 1_000_000);

    // The damage, done with redb itself so the file stays a valid database.
    {
        let db = Database::create(&spool_path).expect("open the spool with redb");
        let txn = db.begin_write().expect("write transaction");
        {
            let mut messages = txn.open_table(MESSAGES).expect("messages table");
            messages
                .insert(undecodable.0, &[1u8, 0xff, 0xff, 0xff, 0x07][..])
                .expect("garble an envelope");
            let mut bodies = txn.open_table(BODY_CHUNKS).expect("body_chunks table");
            assert!(
                bodies
                    .remove((bodiless.0, 0))
                    .expect("remove a body")
                    .is_some(),
                "the body to remove exists"
            );
            let mut n = 1;
            while bodies.remove((bodiless.0, n)).expect("remove").is_some() {
                n += 1;
            }
            let mut due = txn.open_table(DUE).expect("due table");
            due.insert((now_ms(), nowhere.0), ())
                .expect("index entry pointing nowhere");
        }
        txn.commit().expect("commit the damage");
        // Check the damage is in place before mxspool sees it.
        let read = db.begin_read().expect("read transaction");
        let bodies = read.open_table(BODY_CHUNKS).expect("body_chunks table");
        assert!(bodies.get((bodiless.0, 0)).expect("read").is_none());
    }
    let healthy: BTreeSet<String> = written
        .iter()
        .filter(|(id, _)| *id != undecodable && *id != bodiless)
        .map(|(_, token)| token.clone())
        .collect();
    assert_eq!(healthy.len(), MESSAGES_WRITTEN - 2);

    let primary = Primary::start().await;
    let (smtp, http) = (free_addr(), free_addr());
    let config = write_config(dir.path(), smtp, http, primary.addr);
    let log_path = dir.path().join("mxspool.log");
    let mut server = Running(spawn(&config, &log_path));
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // Wait until every healthy message reached the primary, both damaged
    // messages are counted as quarantined and nothing is left queued.
    let deadline = Instant::now() + START_TIMEOUT + DRAIN_TIMEOUT;
    let mut last;
    loop {
        if let Some(status) = server.0.try_wait().expect("poll mxspool") {
            panic!("mxspool exited ({status}); its log:\n{}", log());
        }
        let delivered: BTreeSet<String> = primary
            .messages()
            .iter()
            .filter_map(|m| token_of(&m.body))
            .collect();
        match scrape(http).await {
            Ok(text) => {
                let quarantined = metric(&text, "mxspool_spool_quarantined");
                let queued = metric(&text, "mxspool_queue_messages");
                if delivered == healthy && quarantined == Some(2.0) && queued == Some(0.0) {
                    break;
                }
                last = format!(
                    "delivered {} of {}, quarantined {quarantined:?}, queued {queued:?}",
                    delivered.len(),
                    healthy.len()
                );
            }
            Err(e) => last = e,
        }
        assert!(
            Instant::now() < deadline,
            "not done in time ({last}); log:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing damaged was delivered, and no healthy message twice.
    let tokens: Vec<String> = primary
        .messages()
        .iter()
        .filter_map(|m| token_of(&m.body))
        .collect();
    assert_eq!(tokens.len(), healthy.len(), "delivered: {tokens:?}");

    terminate(&server.0);
    let status =
        wait_exit(&mut server.0, Duration::from_secs(15)).expect("mxspool stops on SIGTERM");
    assert!(status.success(), "exit after SIGTERM: {status}");

    let log = log();
    for id in [undecodable, bodiless, nowhere] {
        assert!(
            log.contains(&id.to_string()),
            "the log does not name {id}:\n{log}"
        );
    }
    assert!(!log.contains("panicked"), "a panic:\n{log}");

    // What was set aside is still there for an operator; nothing is queued.
    let spool = Spool::open(&spool_path, 1 << 30).expect("reopen");
    let aside: BTreeSet<QueueId> = spool
        .quarantined()
        .expect("quarantine")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(aside, BTreeSet::from([undecodable, bodiless]));
    assert!(spool.envelopes().expect("envelopes").is_empty());
    assert!(spool.due().expect("due").is_empty());
    assert_eq!(spool.stats().quarantined, 2);
    assert_eq!(spool.stats().messages, 0);
    assert_eq!(spool.stats().bytes, 0);
}

/// Runs `mxspool serve` on `spool_path` (which must not open) and checks it
/// fails cleanly: exit status 1, the path in its error, the file untouched.
fn refuses_untouched(dir: &Path, spool_path: &Path, what: &str) {
    let before = std::fs::read(spool_path).expect("read the file");
    let config = write_config(dir, free_addr(), free_addr(), free_addr());
    let log_path = dir.join(format!("{what}.log"));
    let mut child = spawn(&config, &log_path);
    let status = wait_exit(&mut child, START_TIMEOUT);
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("{what}: mxspool kept running; log:\n{log}"));
    assert_eq!(status.code(), Some(1), "{what}: exit {status}; log:\n{log}");
    let path = spool_path.display().to_string();
    let named = log.lines().any(|l| {
        l.starts_with("mxspool: ")
            && l.contains(&path)
            && l.contains("the spool file is damaged or not a spool")
    });
    assert!(named, "{what}: no error naming {path}:\n{log}");
    assert!(!log.contains("panicked"), "{what}: a panic:\n{log}");
    let after = std::fs::read(spool_path).expect("read the file again");
    assert!(
        before == after,
        "{what}: the file changed ({} bytes before, {} after)",
        before.len(),
        after.len()
    );
}

#[test]
fn a_file_that_is_not_a_database_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool_path = dir.path().join("spool.redb");
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let noise: Vec<u8> = (0..256 * 1024).map(|_| rng.u8(..)).collect();
    std::fs::write(&spool_path, &noise).expect("write noise");
    refuses_untouched(dir.path(), &spool_path, "random bytes");

    std::fs::write(&spool_path, b"not a spool\n").expect("write text");
    refuses_untouched(dir.path(), &spool_path, "a short text file");
}

#[tokio::test]
async fn a_truncated_spool_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool_path = dir.path().join("spool.redb");
    healthy_spool(&spool_path, 200).await;
    let whole = std::fs::read(&spool_path).expect("read the spool");
    for keep in [whole.len() / 2, whole.len() - 4096, 8192, 100] {
        std::fs::write(&spool_path, &whole[..keep]).expect("write the cut file");
        refuses_untouched(
            dir.path(),
            &spool_path,
            &format!("cut to {keep} of {} bytes", whole.len()),
        );
    }
}
