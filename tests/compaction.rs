//! The spool gives space back: a backlog fills the redb file, delivery
//! empties the queue, and once the spool is idle the file shrinks again,
//! while SMTP keeps answering and the spool keeps working after it.

mod common;

use std::time::Duration;
use tokio::time::Instant;

use common::{TestConfig, TestServer};
use mxspool::spool::{Change, NewMessage};

/// 1,200 bodies of 64 KiB: a 75 MiB backlog, past the 64 MiB below which
/// the file is left alone.
const MESSAGES: usize = 1_200;
const BODY: usize = 64 * 1024;

fn message(t: &TestServer, n: usize) -> NewMessage {
    let mut body = format!("Subject: {n}\r\n\r\n").into_bytes();
    body.resize(BODY, b'x');
    t.new_message("sender@origin.test", "alice@example.com", body)
}

fn file_len(t: &TestServer) -> u64 {
    std::fs::metadata(&t.spool_path).unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_shrinks_once_the_backlog_is_gone() {
    let t = TestServer::start(TestConfig::default().set("spool", "max_size", "1000000000")).await;
    let mut ids = Vec::new();
    for chunk in 0..MESSAGES / 100 {
        let mut commits = Vec::new();
        for n in 0..100 {
            let m = message(&t, chunk * 100 + n);
            ids.push(m.envelope.id);
            let spool = t.spool().clone();
            commits.push(tokio::spawn(async move { spool.commit(m).await }));
        }
        for c in commits {
            c.await.unwrap().expect("committed");
        }
    }
    let full = file_len(&t);
    assert!(full > 70 << 20, "the backlog fills the file: {full}");

    let deletes: Vec<_> = ids.iter().map(|id| (*id, Change::Delete)).collect();
    for result in t.spool().change_many(deletes).await {
        result.expect("deleted");
    }
    assert_eq!(t.spool().stats().messages, 0);

    // Idle now: within seconds the file is compacted. SMTP answers promptly
    // all along (greetings need no spool write, so they do not delay it).
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut greetings = 0;
    while file_len(&t) > 16 << 20 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the file is still {} MiB",
            file_len(&t) >> 20
        );
        let asked = Instant::now();
        let mut client = t.connect().await;
        client.cmd("QUIT").await.assert(221);
        slowest = slowest.max(asked.elapsed());
        greetings += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(greetings > 10, "SMTP was asked while waiting ({greetings})");
    assert!(
        slowest < Duration::from_secs(1),
        "a greeting took {slowest:?}"
    );
    let compacted = file_len(&t);
    assert!(compacted < full / 4, "{full} -> {compacted}");

    // The spool works as before: mail is accepted and stored.
    let mut client = t.ehlo().await;
    client.cmd("MAIL FROM:<a@origin.test>").await.assert(250);
    client.cmd("RCPT TO:<bob@example.com>").await.assert(250);
    client.cmd("DATA").await.assert(354);
    client
        .cmd("Subject: after\r\n\r\nhello\r\n.")
        .await
        .assert(250);
    let queued = t.stored();
    assert_eq!(queued.len(), 1);
    assert!(
        String::from_utf8_lossy(&queued[0].1).contains("hello"),
        "the body is stored"
    );
}
