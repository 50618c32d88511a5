//! The shipped dashboard and alert rules against a real Prometheus scraping a
//! running mxspool with mail waiting for a primary that is down: the rules
//! pass `promtool check rules`, and every PromQL expression parses and returns
//! data, except those listed in `EXPECTED_EMPTY` with the reason.
//!
//! Needs Debian's `prometheus` package (`prometheus` and `promtool` on PATH);
//! `.ci/run` installs it.

mod common;
mod primary;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{TestConfig, TestServer};
use primary::{Mode, Primary};
use serde_json::Value;

/// Expressions that rightly return nothing in this scenario (queue waiting for
/// a primary that has been down for seconds, no failures, no loops), keyed by
/// the alert or a fragment of the expression.
const EXPECTED_EMPTY: &[(&str, &str)] = &[
    (
        "MxspoolPrimaryDown",
        "needs the primary down for 10 minutes",
    ),
    (
        "MxspoolQueueOld",
        "the oldest message is seconds old, not an hour",
    ),
    ("MxspoolQueueGrowing", "needs 30 minutes of history"),
    ("MxspoolBounceSpike", "no failure notices were sent"),
    ("MxspoolDeadLetters", "there are no dead letters"),
    ("MxspoolDown", "mxspool is up"),
    ("MxspoolSpoolErrors", "the spool is healthy"),
    ("MxspoolRoutingLoop", "there is no routing loop"),
    ("MxspoolDomainPaused", "no domain is paused"),
    (
        "MxspoolFetchFailing",
        "the mailbox fetch has failed for seconds, not 15 minutes",
    ),
    (
        "mxspool_fetch_last_success_timestamp_seconds{instance=~\".*\"} > 0",
        "no fetch has succeeded: the test's mailbox server does not exist",
    ),
];

fn tool(name: &str) -> String {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .expect("run sh");
    assert!(
        found.status.success(),
        "`{name}` is not installed: apt-get install prometheus (.ci/run does)"
    );
    String::from_utf8_lossy(&found.stdout).trim().to_owned()
}

/// Collects every string under a key named `expr` in a JSON document.
fn exprs_in(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(s)) if !s.trim().is_empty() => out.push(s.clone()),
                    _ => exprs_in(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| exprs_in(v, out)),
        _ => {}
    }
}

/// Grafana variables replaced by what they mean in this test.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s")
        .replace("$__interval", "30s")
        .replace("$__range", "5m")
        .replace("${domain:regex}", ".*")
        .replace("${domain}", ".*")
        .replace("$domain", ".*")
        .replace("${instance}", ".*")
        .replace("$instance", ".*")
}

/// `alert` name and `expr` of every rule in alerts.yml (a small, regular file).
fn alert_rules(text: &str) -> Vec<(String, String)> {
    let mut rules = Vec::new();
    let mut name = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim();
        if let Some(n) = t
            .strip_prefix("- alert:")
            .or_else(|| t.strip_prefix("alert:"))
        {
            name = n.trim().to_owned();
        } else if let Some(e) = t.strip_prefix("expr:") {
            let e = e.trim();
            let expr = if e == "|" || e == ">" || e == "|-" || e == ">-" {
                let indent = line.len() - line.trim_start().len();
                let mut body = Vec::new();
                while let Some(next) = lines.peek() {
                    let next_indent = next.len() - next.trim_start().len();
                    if next.trim().is_empty() || next_indent > indent {
                        body.push(next.trim().to_owned());
                        lines.next();
                    } else {
                        break;
                    }
                }
                body.join(" ")
            } else {
                e.trim_matches('\'').trim_matches('"').to_owned()
            };
            rules.push((name.clone(), expr));
        }
    }
    rules
}

/// GET over plain HTTP/1.1; returns the body, or `None` if nothing answers.
async fn get(addr: SocketAddr, path_and_query: &str) -> Option<String> {
    let response = common::http::request(addr, "GET", path_and_query, &[], None)
        .await
        .ok()?;
    Some(response.body)
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

struct Prometheus {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_prometheus(dir: &Path, target: SocketAddr) -> Prometheus {
    let alerts = std::fs::canonicalize("dashboards/alerts.yml").expect("dashboards/alerts.yml");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: mxspool\n    static_configs:\n      - targets: ['{target}']\n",
            alerts.display()
        ),
    )
    .unwrap();
    let check = Command::new(tool("promtool"))
        .args(["check", "config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "promtool check config: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = Command::new(tool("prometheus"))
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    Prometheus { child, addr }
}

async fn try_query(prom: &Prometheus, expr: &str) -> Option<Value> {
    let body = get(prom.addr, &format!("/api/v1/query?query={}", encode(expr))).await?;
    serde_json::from_str(&body).ok()
}

async fn query(prom: &Prometheus, expr: &str) -> Value {
    try_query(prom, expr)
        .await
        .unwrap_or_else(|| panic!("{expr}: no JSON answer from prometheus"))
}

#[test]
fn alert_rules_pass_promtool() {
    let out = Command::new(tool("promtool"))
        .args(["check", "rules", "dashboards/alerts.yml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_expression_parses_and_has_data() {
    let primary = Primary::start().await;
    primary.set_mode(Mode::Down);
    // A mailbox fetch that fails (nothing listens there), so the fetch
    // series have data.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("isp.password"), "pw\n").unwrap();
    let t = TestServer::start_in(
        dir,
        TestConfig::default()
            .set("delivery", "probe_interval", r#""200ms""#)
            .domains(&format!(
                "[[domain]]\nname = \"example.com\"\nroute = \"[127.0.0.1]:{}\"\n\
                 [[fetch]]\nname = \"isp\"\nprotocol = \"pop3\"\nserver = \"127.0.0.1:{}\"\n\
                 tls = \"none\"\nusername = \"u\"\npassword_file = \"{{dir}}/isp.password\"\n\
                 domains = [\"example.com\"]\n",
                primary.addr.port(),
                free_port(),
            )),
    )
    .await;
    let mut c = t.ehlo().await;
    for i in 0..3 {
        c.send_mail(
            "a@origin.test",
            &["user@example.com"],
            format!("Subject: {i}\r\n\r\nx\r\n").as_bytes(),
        )
        .await
        .queue_id();
    }
    c.cmd("RCPT TO:<x@evil.test>").await;
    c.quit().await;

    let dir = tempfile::tempdir().unwrap();
    let prom = start_prometheus(dir.path(), t.server.http_addr());
    // Wait for several scrapes so rates have two samples.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let up = try_query(&prom, "up{job=\"mxspool\"} == 1");
        let ready = match tokio::time::timeout(Duration::from_secs(2), up).await {
            Ok(Some(v)) => v["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty()),
            _ => false,
        };
        if ready {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "prometheus never scraped mxspool"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;

    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string("dashboards/mxspool.json").unwrap())
            .expect("dashboard is JSON");
    let mut dashboard_exprs = Vec::new();
    exprs_in(&dashboard, &mut dashboard_exprs);
    assert!(
        dashboard_exprs.len() >= 10,
        "too few panels: {dashboard_exprs:?}"
    );
    let alerts = alert_rules(&std::fs::read_to_string("dashboards/alerts.yml").unwrap());
    assert!(alerts.len() >= 6, "too few alerts: {alerts:?}");

    let mut problems = Vec::new();
    let mut empty_seen = BTreeSet::new();
    let checks = dashboard_exprs
        .iter()
        .map(|e| (String::new(), e.clone()))
        .chain(alerts.iter().cloned());
    for (alert, expr) in checks {
        let q = substitute(&expr);
        let answer = query(&prom, &q).await;
        if answer["status"] != "success" {
            problems.push(format!("does not run: {q}: {}", answer["error"]));
            continue;
        }
        let empty = answer["data"]["result"]
            .as_array()
            .is_none_or(|r| r.is_empty());
        if empty {
            match EXPECTED_EMPTY
                .iter()
                .find(|(key, _)| alert == *key || (!key.starts_with("Mxspool") && q.contains(key)))
            {
                Some((key, _)) => {
                    empty_seen.insert(*key);
                }
                None => problems.push(format!(
                    "no data: {}{q}",
                    if alert.is_empty() {
                        String::new()
                    } else {
                        format!("{alert}: ")
                    }
                )),
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The queue really is visible.
    let depth = query(&prom, "mxspool_queue_messages{domain=\"example.com\"}").await;
    assert_eq!(depth["data"]["result"][0]["value"][1], "3", "{depth}");
}
