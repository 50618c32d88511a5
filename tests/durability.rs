//! The real binary: every message acknowledged with 250 survives a SIGKILL right
//! after the acknowledgement, byte for byte; and the command line reports a bad
//! config with exit code 2.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{Client, TestConfig, split_received, stored};
use mxspool::spool::{QueueId, Spool};

const BIN: &str = env!("CARGO_BIN_EXE_mxspool");

/// A running `mxspool serve`, killed when dropped so a failing test leaves no
/// process behind.
struct Process {
    child: Child,
    addr: SocketAddr,
}

impl Process {
    /// Starts `mxspool serve -c config` and waits for its "listening" log line.
    fn serve(config: &Path) -> Process {
        let mut child = Command::new(BIN)
            .args(["serve", "-c"])
            .arg(config)
            .env("NO_COLOR", "1")
            .env_remove("MXSPOOL_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mxspool");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Keeps draining the log so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            let mut seen = Vec::new();
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = listening_addr(&line) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(Ok(addr));
                    }
                } else if tx.is_some() {
                    seen.push(line);
                }
            }
            if let Some(tx) = tx {
                let _ = tx.send(Err(seen.join("\n")));
            }
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(addr)) => Process { child, addr },
            Ok(Err(log)) => {
                let status = child.wait();
                panic!("mxspool exited before listening ({status:?}); its log:\n{log}")
            }
            Err(_) => {
                let _ = child.kill();
                panic!("mxspool did not log its SMTP address within 10s")
            }
        }
    }

    /// SIGKILL: no shutdown code runs.
    fn kill(mut self) {
        self.child.kill().expect("kill mxspool");
        self.child.wait().expect("reap mxspool");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address in `... listening for SMTP on 127.0.0.1:PORT ...`.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let rest = line.split("listening for SMTP on ").nth(1)?;
    let addr: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
        .collect();
    addr.parse().ok()
}

/// A message the server acknowledged, as the client sent it.
struct Sent {
    id: QueueId,
    sender: String,
    recipients: Vec<String>,
    content: Vec<u8>,
}

/// Message `n`'s content: distinct for every `n`, with the bytes that trip up
/// careless code (dots at line starts, NUL, 8-bit, tabs, long and empty lines).
fn content(n: usize) -> Vec<u8> {
    let mut m = format!("Subject: message {n}\r\nX-Seq: {n}\r\n\r\nbody of {n}\r\n").into_bytes();
    match n % 5 {
        0 => m.extend_from_slice(b".leading dot\r\n..two\r\n.\r\n"),
        1 => m.extend_from_slice(b"nul \0 and 8-bit \x80\xfe\xff caf\xc3\xa9\r\n"),
        2 => m.extend_from_slice(&[b'L'; 990]),
        3 => m.extend_from_slice(b"\t tab \x7f del\r\n\r\n\r\n"),
        _ => m.extend_from_slice(b"Received: in the body is content\r\n"),
    }
    if !m.ends_with(b"\r\n") {
        m.extend_from_slice(b"\r\n");
    }
    m.extend_from_slice(format!("end {n}\r\n").as_bytes());
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_mail_survives_sigkill() {
    const CONNECTIONS: usize = 5;
    const PER_CONNECTION: usize = 10;
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("mxspool.toml");
    let text = TestConfig::default()
        .server("max_message_size", "100000")
        .render(dir.path());
    std::fs::write(&config_path, text).unwrap();

    let server = Process::serve(&config_path);
    let addr = server.addr;
    let mut sessions = Vec::new();
    for conn in 0..CONNECTIONS {
        sessions.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            c.expect(220).await;
            c.cmd("EHLO client.test").await.assert(250);
            let mut sent = Vec::new();
            for i in 0..PER_CONNECTION {
                let n = conn * PER_CONNECTION + i;
                let sender = format!("sender{n}@origin.test");
                let recipients: Vec<String> = (0..=n % 3)
                    .map(|r| format!("rcpt{n}.{r}@example.com"))
                    .collect();
                let rcpt_refs: Vec<&str> = recipients.iter().map(String::as_str).collect();
                c.cmd(&format!("MAIL FROM:<{sender}> BODY=8BITMIME"))
                    .await
                    .assert(250);
                for rcpt in &rcpt_refs {
                    c.cmd(&format!("RCPT TO:<{rcpt}>")).await.assert(250);
                }
                c.cmd("DATA").await.assert(354);
                let content = content(n);
                c.send(common::dot_stuff(&content)).await;
                let id = c.reply().await.queue_id();
                sent.push(Sent {
                    id,
                    sender,
                    recipients,
                    content,
                });
            }
            sent
        }));
    }
    let mut sent = Vec::new();
    for session in sessions {
        sent.extend(session.await.expect("session task"));
    }
    server.kill();
    assert_eq!(sent.len(), CONNECTIONS * PER_CONNECTION);

    // The killed server's spool opens again and it serves.
    let restarted = Process::serve(&config_path);
    let mut c = Client::connect(restarted.addr).await;
    c.expect(220).await;
    c.cmd("EHLO client.test").await.assert(250);
    let after = c
        .send_mail(
            "late@origin.test",
            &["late@example.com"],
            b"Subject: late\r\n\r\nlate\r\n",
        )
        .await
        .queue_id();
    assert!(
        sent.iter().all(|s| s.id < after),
        "queue IDs keep increasing across a restart"
    );
    restarted.kill();

    let spool_path = dir.path().join("spool.redb");
    let spool = tokio::task::spawn_blocking(move || Spool::open(&spool_path, 1 << 30))
        .await
        .unwrap()
        .expect("the spool opens after SIGKILL");
    let all = stored(&spool);
    assert_eq!(
        all.len(),
        sent.len() + 1,
        "every acknowledged message, once"
    );
    for s in &sent {
        let (env, body) = all
            .iter()
            .find(|(env, _)| env.id == s.id)
            .unwrap_or_else(|| panic!("acknowledged message {} is missing", s.id));
        assert_eq!(env.sender, s.sender, "{}", s.id);
        let rcpts: Vec<&str> = env.recipients.iter().map(|r| r.address.as_str()).collect();
        assert_eq!(rcpts, s.recipients, "{}", s.id);
        let (received, rest) = split_received(body);
        assert!(received.contains(&format!("id {}", s.id)), "{received}");
        assert!(
            rest == s.content.as_slice(),
            "{}: stored content differs from what was sent:\n sent {:?}\n got {:?}",
            s.id,
            String::from_utf8_lossy(&s.content),
            String::from_utf8_lossy(rest)
        );
        assert_eq!(env.size, body.len() as u64, "{}", s.id);
    }
    spool.close();
}

#[test]
fn check_config_rejects_a_bad_file_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[server]\nhostname = \"mx2.test\"\nno_such_key = 1\n\n[[domain]]\nname = \"example.com\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "-c"])
        .arg(&bad)
        .env_remove("MXSPOOL_CONFIG")
        .output()
        .expect("run mxspool");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains(&bad.display().to_string()),
        "the message names the file: {stderr}"
    );
    assert!(
        stderr.contains("no_such_key"),
        "the message names the key: {stderr}"
    );

    // A missing file is a config error too.
    let missing = dir.path().join("missing.toml");
    let out = Command::new(BIN)
        .args(["check-config", "-c"])
        .arg(&missing)
        .env_remove("MXSPOOL_CONFIG")
        .output()
        .expect("run mxspool");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
}

#[test]
fn check_config_accepts_a_good_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, TestConfig::default().render(dir.path())).unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "-c"])
        .arg(&good)
        .env_remove("MXSPOOL_CONFIG")
        .output()
        .expect("run mxspool");
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("listed.test"),
        "prints the effective config: {stdout}"
    );
}
