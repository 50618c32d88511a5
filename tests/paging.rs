//! `GET /api/queue` in pages: a queue of 10,000 messages walked 100 at a
//! time while new mail arrives and old mail leaves, every message seen once;
//! bad cursors and limits refused with a JSON error; counts from the running
//! totals or a scan, as the filters need.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;
use tokio::time::Instant;

use common::http::{Response, request};
use common::{TestConfig, TestServer};
use mxspool::spool::{Change, QueueId};
use serde_json::Value;

const TOKEN: &str = "paging-admin-token";
const QUEUED: usize = 10_000;

/// The tests of this file one at a time: one of them measures the
/// process's memory, which the others' servers would disturb.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn start() -> TestServer {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("admin-token"), format!("{TOKEN}\n")).unwrap();
    TestServer::start_in(
        dir,
        TestConfig::default()
            .set("http", "admin_token_file", r#""{dir}/admin-token""#)
            .set("spool", "max_size", "1000000000"),
    )
    .await
}

async fn get(t: &TestServer, path: &str) -> Response {
    let auth = format!("Bearer {TOKEN}");
    request(
        t.server.http_addr(),
        "GET",
        path,
        &[("Authorization", &auth)],
        None,
    )
    .await
    .expect("an answer")
}

/// Stores `n` messages, many commits at once (they share fsyncs).
async fn fill(t: &TestServer, n: usize, sender: impl Fn(usize) -> String) -> Vec<QueueId> {
    let mut ids = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let mut commits = Vec::new();
        for &i in chunk {
            let to = format!("user{}@example.com", i % 10);
            let body = format!("Subject: {i}\r\n\r\nx\r\n").into_bytes();
            let m = t.new_message(&sender(i), &to, body);
            ids.push(m.envelope.id);
            let spool = t.spool().clone();
            commits.push(tokio::spawn(async move { spool.commit(m).await }));
        }
        for c in commits {
            c.await.unwrap().expect("stored");
        }
    }
    ids
}

fn page_ids(v: &Value) -> Vec<String> {
    v["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["id"].as_str().expect("id").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_walk_every_message_once_while_the_queue_changes() {
    let _serial = SERIAL.lock().await;
    let t = start().await;
    let first = fill(&t, QUEUED, |i| format!("s{}@origin.test", i % 3)).await;
    let v = get(&t, "/api/queue?limit=100").await.expect(200);
    assert_eq!(v["count"], QUEUED as u64);
    assert_eq!(page_ids(&v).len(), 100);

    let mut seen: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    let mut slowest = Duration::ZERO;
    let mut deleted = BTreeSet::new();
    let mut added = Vec::new();
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/queue?limit=100&cursor={c}"),
            None => "/api/queue?limit=100".to_owned(),
        };
        let started = Instant::now();
        let v = get(&t, &path).await.expect(200);
        slowest = slowest.max(started.elapsed());
        seen.extend(page_ids(&v));
        pages += 1;
        if pages == 20 {
            // New mail arrives; old mail, seen and not yet seen, leaves.
            added = fill(&t, 150, |_| "late@origin.test".into()).await;
            for id in first.iter().step_by(97).take(60) {
                t.spool()
                    .change(*id, Change::Delete, Vec::new())
                    .await
                    .unwrap();
                deleted.insert(id.to_string());
            }
        }
        cursor = v["next_cursor"].as_str().map(str::to_owned);
        if cursor.is_none() {
            break;
        }
    }
    eprintln!("{pages} pages, slowest {slowest:?}");
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a message was listed twice");
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(sorted, seen, "pages are in arrival order");
    // Everything that stayed throughout was seen, and the late mail too.
    for id in first.iter().chain(&added) {
        let id = id.to_string();
        assert!(
            seen.contains(&id) || deleted.contains(&id),
            "{id} was never listed"
        );
    }
    // A message deleted before its page came was not listed.
    let late_deleted = deleted.iter().filter(|id| !seen.contains(id)).count();
    assert!(late_deleted > 0, "some deletions came before their page");
    assert!(slowest < Duration::from_secs(2), "a page took {slowest:?}");
}

#[tokio::test]
async fn filters_count_every_match_and_bad_paging_is_refused() {
    let _serial = SERIAL.lock().await;
    let t = start().await;
    fill(&t, 250, |i| {
        if i % 5 == 0 {
            "Rare.Sender@origin.test".into()
        } else {
            "common@origin.test".into()
        }
    })
    .await;
    // A filter needs a scan: count is every match, the page the first 20.
    let v = get(&t, "/api/queue?sender=rare.sender&limit=20")
        .await
        .expect(200);
    assert_eq!(v["count"], 50);
    assert_eq!(page_ids(&v).len(), 20);
    let cursor = v["next_cursor"].as_str().expect("more pages").to_owned();
    let v = get(
        &t,
        &format!("/api/queue?sender=rare.sender&limit=40&cursor={cursor}"),
    )
    .await
    .expect(200);
    assert_eq!(v["count"], 50);
    assert_eq!(page_ids(&v).len(), 30);
    assert_eq!(v["next_cursor"], Value::Null);
    // The recipient filter matches part of an address.
    let v = get(&t, "/api/queue?recipient=USER3@&limit=1000")
        .await
        .expect(200);
    assert_eq!(v["count"], 25);
    assert_eq!(page_ids(&v).len(), 25);
    // A configured domain alone is counted from the running totals.
    let v = get(&t, "/api/queue?domain=example.com&limit=1")
        .await
        .expect(200);
    assert_eq!(v["count"], 250);

    for (path, want) in [
        ("/api/queue?cursor=not-an-id", "invalid cursor"),
        (
            "/api/queue?limit=1001",
            "limit must be a number from 1 to 1000",
        ),
        ("/api/queue?limit=0", "limit must be"),
        ("/api/queue?limit=many", "limit must be"),
    ] {
        let error = get(&t, path).await.expect_error(400);
        assert!(error.contains(want), "{path}: {error}");
    }
}

/// `mxspool queue list` walks the pages: one header, every message once,
/// and the total at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_a_queue_longer_than_a_page() {
    let _serial = SERIAL.lock().await;
    let t = start().await;
    fill(&t, 1_200, |_| "a@origin.test".into()).await;
    let config = TestConfig::default()
        .set("http", "listen", &format!("\"{}\"", t.server.http_addr()))
        .set("http", "admin_token_file", r#""{dir}/admin-token""#);
    let path = t.dir.path().join("operator.toml");
    std::fs::write(&path, config.render(t.dir.path())).unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_mxspool"))
        .args(["queue", "list", "-c"])
        .arg(&path)
        .env_remove("MXSPOOL_CONFIG")
        .output()
        .await
        .expect("run mxspool");
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.iter().filter(|l| l.starts_with("ID ")).count(), 1);
    assert_eq!(lines.len(), 1 + 1_200 + 1, "header, a line each, total");
    assert_eq!(lines.last(), Some(&"1200 messages"));
    let ids: BTreeSet<&str> = lines[1..=1_200]
        .iter()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(ids.len(), 1_200);
}

/// Resident and peak resident memory of this process, in KiB.
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/self/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Walks the whole queue in pages of `limit`; returns how many it saw.
async fn walk(t: &TestServer, limit: usize) -> usize {
    let mut seen = 0;
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/queue?limit={limit}&cursor={c}"),
            None => format!("/api/queue?limit={limit}"),
        };
        let v = get(t, &path).await.expect(200);
        seen += page_ids(&v).len();
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return seen,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_a_large_queue_does_not_grow_the_server() {
    let _serial = SERIAL.lock().await;
    const LARGE: usize = 20_000;
    let t = start().await;
    fill(&t, LARGE, |i| format!("s{i}@origin.test")).await;
    // A first walk warms what is meant to stay (the spool's page cache).
    assert_eq!(walk(&t, 1000).await, LARGE);
    // The peak from here on: the kernel resets VmHWM to the current RSS.
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
    let (before, _) = memory_kib();
    for _ in 0..3 {
        assert_eq!(walk(&t, 1000).await, LARGE);
    }
    let (after, peak) = memory_kib();
    // The whole queue as JSON is about 7 MB and its envelopes more; a page
    // is 1,000 rows.
    assert!(
        peak.saturating_sub(before) < 6 * 1024,
        "listing {LARGE} messages raised the peak RSS from {before} to {peak} KiB (now {after})"
    );
}
