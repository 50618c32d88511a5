//! The drain guard and domain pauses end to end (DESIGN.md "Drain guard and
//! pause"): a real server, a scriptable primary that comes back from an
//! outage refusing everyone, the sender's own mail server behind a real DNS
//! server (where failure notices land), the admin API over loopback HTTP and
//! the `mxspool` binary.

mod common;
mod dns_server;
mod primary;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::http::Response;
use common::{TestConfig, TestServer, eventually};
use dns_server::TestDns;
use mxspool::spool::{Envelope, PARKED, QueueId, RcptStatus, Recipient};
use primary::{Mode, Primary, Received};
use serde_json::{Value, json};

/// The envelope sender of the test mail; notices to it are routed by MX to
/// [`Net::bounces`].
const SENDER: &str = "sender@origin.test";
const TOKEN: &str = "guard-test-token";
/// How long any single expected event may take.
const WAIT: Duration = Duration::from_secs(10);

/// Loopback world: a DNS server, `example.com`'s primary (a static route)
/// and `origin.test`'s mail server (MX through the DNS server, on
/// `delivery.port`).
struct Net {
    dns: TestDns,
    relay: Primary,
    bounces: Primary,
}

impl Net {
    async fn start() -> Net {
        let dns = TestDns::start().await;
        let relay = Primary::start().await;
        let bounces = Primary::start().await;
        dns.set_mx("origin.test", &[(10, "mx.origin.test")]);
        dns.set_ips("mx.origin.test", &[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        Net {
            dns,
            relay,
            bounces,
        }
    }

    /// Fast probes, an hour of backoff, the admin token, `example.com`
    /// routed to [`Net::relay`], and the drain guard at `drain_guard`.
    fn config(&self, drain_guard: u32) -> TestConfig {
        TestConfig::default()
            .set("delivery", "probe_interval", r#""200ms""#)
            .set("delivery", "retry_initial", r#""1h""#)
            .set("delivery", "retry_max", r#""2h""#)
            .set("delivery", "drain_guard", &drain_guard.to_string())
            .set(
                "delivery",
                "nameservers",
                &format!(r#"["{}"]"#, self.dns.addr),
            )
            .set("delivery", "port", &self.bounces.addr.port().to_string())
            .set("http", "admin_token_file", r#""{dir}/admin-token""#)
            .domains(&format!(
                "[[domain]]\nname = \"example.com\"\nroute = \"[127.0.0.1]:{}\"\n\n\
                 [[domain]]\nname = \"example.org\"\nroute = \"{{route}}\"\n",
                self.relay.addr.port()
            ))
    }
}

/// Starts a server for `config` with the admin token file in place.
async fn start(config: TestConfig) -> TestServer {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("admin-token"), format!("{TOKEN}\n")).expect("token");
    TestServer::start_in(dir, config).await
}

/// Stops `t` and starts a server on the same directory (spool, token).
async fn restart(t: TestServer, config: TestConfig) -> TestServer {
    let TestServer { server, dir, .. } = t;
    server.shutdown(Duration::from_secs(5)).await;
    TestServer::start_in(dir, config).await
}

async fn send(t: &TestServer, to: &[&str], subject: &str) -> QueueId {
    let mut c = t.ehlo().await;
    let content = format!(
        "From: <{SENDER}>\r\nSubject: {subject}\r\nMessage-ID: <{subject}@origin.test>\r\n\r\nhello\r\n"
    );
    let id = c.send_mail(SENDER, to, content.as_bytes()).await.queue_id();
    c.quit().await;
    id
}

/// Every queued recipient, with its message's ID.
fn queued(t: &TestServer) -> Vec<(QueueId, Recipient)> {
    t.spool()
        .envelopes()
        .expect("read spool")
        .into_iter()
        .flat_map(|env: Envelope| {
            let id = env.id;
            env.recipients
                .into_iter()
                .filter(|r| r.status == RcptStatus::Queued)
                .map(move |r| (id, r))
        })
        .collect()
}

fn parked(r: &Recipient) -> bool {
    r.status == RcptStatus::Queued && r.next_attempt_ms == PARKED
}

/// The `Final-Recipient` addresses the notices `got` report, in order.
fn reported(got: &[Received]) -> Vec<String> {
    let mut out = Vec::new();
    for m in got {
        assert!(
            m.mail_from_line.starts_with("MAIL FROM:<>"),
            "a notice comes from <>: {}",
            m.mail_from_line
        );
        assert!(
            m.rcpt_lines
                .iter()
                .all(|l| l.starts_with(&format!("RCPT TO:<{SENDER}>"))),
            "{:?}",
            m.rcpt_lines
        );
        let text = String::from_utf8_lossy(&m.body).replace("\r\n ", " ");
        for line in text.split("\r\n") {
            if let Some((key, value)) = line.split_once(':')
                && key.eq_ignore_ascii_case("Final-Recipient")
            {
                out.push(value.trim().trim_start_matches("rfc822;").trim().to_owned());
            }
        }
    }
    out
}

/// The MAIL and RCPT commands `primary` was sent.
fn transactions(primary: &Primary) -> usize {
    primary
        .commands()
        .iter()
        .filter(|c| c.starts_with("MAIL") || c.starts_with("RCPT"))
        .count()
}

/// The admin API of `t`.
struct Api {
    addr: SocketAddr,
    token: Option<&'static str>,
}

impl Api {
    fn of(t: &TestServer) -> Api {
        Api {
            addr: t.server.http_addr(),
            token: Some(TOKEN),
        }
    }

    async fn send(&self, method: &str, path: &str) -> Response {
        let auth = self.token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        common::http::request(self.addr, method, path, &headers, None)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    async fn post(&self, path: &str) -> Response {
        self.send("POST", path).await
    }

    /// `GET /api/domains`, checked: 200, `count` equal to the list's length;
    /// returns the entry of `domain`.
    async fn domain(&self, domain: &str) -> Value {
        let v = self.send("GET", "/api/domains").await.expect(200);
        let list = v["domains"].as_array().expect("domains").clone();
        assert_eq!(v["count"], json!(list.len()), "{v}");
        list.into_iter()
            .find(|d| d["domain"] == json!(domain))
            .unwrap_or_else(|| panic!("{domain} not listed: {v}"))
    }
}

/// `mxspool_domain_paused{domain=…}` as the server would export it now.
fn paused_gauge(t: &TestServer, domain: &str) -> f64 {
    sample(t, &format!("mxspool_domain_paused{{domain=\"{domain}\"}}"))
}

#[track_caller]
fn sample(t: &TestServer, series: &str) -> f64 {
    let text = t.server.metrics().render(&t.spool().gauges(), 0);
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        .trim()
        .parse()
        .expect("a number")
}

// ---------------------------------------------------------------------------
// The drain guard

#[tokio::test]
async fn a_primary_refusing_everyone_after_an_outage_bounces_only_drain_guard_recipients() {
    let net = Net::start().await;
    net.relay.set_mode(Mode::Down);
    let t = start(net.config(3)).await;
    let api = Api::of(&t);
    // Every series is there from startup, at 0.
    assert_eq!(paused_gauge(&t, "example.com"), 0.0);
    assert_eq!(paused_gauge(&t, "example.org"), 0.0);

    // The backlog of an outage: four messages, two recipients each. Every
    // attempt records two refusals, so the third refusal in a row (the one
    // that trips the guard) always has a fourth beside it, held.
    let users: Vec<String> = (0..8).map(|i| format!("user{i}@example.com")).collect();
    let mut ids = Vec::new();
    for pair in users.chunks(2) {
        let to: Vec<&str> = pair.iter().map(String::as_str).collect();
        ids.push(send(&t, &to, &format!("backlog-{}", ids.len())).await);
    }
    eventually(WAIT, async || {
        let q = queued(&t);
        if q.len() == 8 && q.iter().all(|(_, r)| r.attempts >= 1 && r.unreachable) {
            Ok(())
        } else {
            Err(format!("not all waiting for the primary: {q:?}"))
        }
    })
    .await;
    assert_eq!(api.domain("example.com").await["primary"], json!("down"));

    // Back after maintenance, without its user database.
    for user in &users {
        net.relay
            .set_rcpt_reply(user, "550 5.1.1 <user>: Recipient address rejected");
    }
    net.relay.set_mode(Mode::Up);

    // Exactly three recipients fail, with notices to the sender; then the
    // domain is paused and the other five wait, none bounced.
    let domain = eventually(WAIT, async || {
        let q = queued(&t);
        if q.len() == 5 && q.iter().all(|(_, r)| parked(r)) {
            Ok(q)
        } else {
            Err(format!("not paused with five waiting: {q:?}"))
        }
    })
    .await;
    let suspects: Vec<&Recipient> = domain
        .iter()
        .map(|(_, r)| r)
        .filter(|r| r.suspect)
        .collect();
    assert!(!suspects.is_empty(), "no refusal was held: {domain:?}");
    for (_, r) in &domain {
        let refused = r
            .last_reply
            .as_deref()
            .is_some_and(|reply| reply.starts_with("550 5.1.1"));
        // A suspect is one the primary refused; the rest were never tried again.
        assert_eq!(r.suspect, refused, "{r:?}");
    }
    let notices = eventually(WAIT, async || {
        let about = reported(&net.bounces.messages());
        if about.len() >= 3 {
            Ok(about)
        } else {
            Err(format!("notices so far about {about:?}"))
        }
    })
    .await;
    assert_eq!(notices.len(), 3, "{notices:?}");
    let mut expected: Vec<String> = users
        .iter()
        .filter(|u| !domain.iter().any(|(_, r)| r.address == **u))
        .cloned()
        .collect();
    let mut got = notices.clone();
    expected.sort();
    got.sort();
    assert_eq!(got, expected, "the notices are about the failed recipients");
    assert_eq!(
        sample(
            &t,
            "mxspool_recipients_failed_total{domain=\"example.com\",reason=\"rejected\"}"
        ),
        3.0
    );
    assert!(net.relay.messages().is_empty());

    let listed = api.domain("example.com").await;
    assert_eq!(listed["paused"], json!(true), "{listed}");
    assert_eq!(listed["paused_by"], json!("guard"), "{listed}");
    assert_eq!(listed["primary"], json!("up"), "{listed}");
    assert_eq!(listed["queued"], json!(ids.len() - 1), "{listed}");
    assert_eq!(paused_gauge(&t, "example.com"), 1.0);
    assert_eq!(paused_gauge(&t, "example.org"), 0.0);
    // The admin API shows the suspects and what they wait for.
    let suspect_id = domain.iter().find(|(_, r)| r.suspect).expect("a suspect").0;
    let shown = api
        .send("GET", &format!("/api/queue/{suspect_id}"))
        .await
        .expect(200);
    let rcpt = shown["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["suspect"] == json!(true))
        .unwrap_or_else(|| panic!("no suspect in {shown}"))
        .clone();
    assert_eq!(rcpt["waiting_for_resume"], json!(true), "{rcpt}");
    assert_eq!(rcpt["next_attempt_ms"], Value::Null, "{rcpt}");

    // Nothing more goes to the paused domain, new mail neither.
    let commands = transactions(&net.relay);
    let late = send(&t, &["late@example.com"], "late").await;
    eventually(WAIT, async || {
        let q = queued(&t);
        match q.iter().find(|(id, _)| *id == late) {
            Some((_, r)) if parked(r) => Ok(()),
            other => Err(format!("late mail not waiting for the resume: {other:?}")),
        }
    })
    .await;
    t.settled().await;
    assert_eq!(
        transactions(&net.relay),
        commands,
        "mail for a paused domain"
    );
    assert_eq!(reported(&net.bounces.messages()).len(), 3);

    // Fixed; the operator resumes: everything is delivered, no more notices.
    for user in users.iter().map(String::as_str).chain(["late@example.com"]) {
        net.relay.set_rcpt_reply(user, "250 2.1.5 Ok");
    }
    let answer = api
        .post("/api/domains/example.com/resume")
        .await
        .expect(200);
    assert_eq!(
        answer,
        json!({"resumed": "example.com", "paused_by": "guard"})
    );
    eventually(WAIT, async || {
        let q = queued(&t);
        if q.is_empty() {
            Ok(())
        } else {
            Err(format!("still queued after the resume: {q:?}"))
        }
    })
    .await;
    let delivered: Vec<String> = net
        .relay
        .messages()
        .iter()
        .flat_map(|m| m.rcpt_lines.clone())
        .collect();
    for (_, r) in &domain {
        assert!(
            delivered
                .iter()
                .any(|l| l.starts_with(&format!("RCPT TO:<{}>", r.address))),
            "{} not delivered: {delivered:?}",
            r.address
        );
    }
    assert!(
        delivered
            .iter()
            .any(|l| l.starts_with("RCPT TO:<late@example.com>"))
    );
    t.settled().await;
    assert_eq!(
        reported(&net.bounces.messages()).len(),
        3,
        "no notice after the resume"
    );
    let listed = api.domain("example.com").await;
    assert_eq!(listed["paused"], json!(false), "{listed}");
    assert_eq!(listed["paused_by"], Value::Null, "{listed}");
    assert_eq!(listed["queued"], json!(0), "{listed}");
    assert_eq!(paused_gauge(&t, "example.com"), 0.0);
}

#[tokio::test]
async fn after_a_resume_refusals_bounce_again_and_the_count_starts_over() {
    let net = Net::start().await;
    let t = start(net.config(2)).await;
    let api = Api::of(&t);
    for user in ["a", "b", "c", "d", "e"] {
        net.relay
            .set_rcpt_reply(&format!("{user}@example.com"), "550 5.1.1 no such user");
    }
    // Two refusals in one attempt trip the guard; the second still bounces.
    send(&t, &["a@example.com", "b@example.com"], "first").await;
    eventually(WAIT, async || {
        match t.spool().pauses().expect("pauses").as_slice() {
            [(domain, _)] if domain == "example.com" => Ok(()),
            other => Err(format!("not paused: {other:?}")),
        }
    })
    .await;
    eventually(WAIT, async || {
        let n = reported(&net.bounces.messages()).len();
        if n == 2 {
            Ok(())
        } else {
            Err(format!("{n} reported"))
        }
    })
    .await;

    api.post("/api/domains/example.com/resume")
        .await
        .expect(200);
    // One refusal after the resume bounces normally and does not trip it…
    let one = send(&t, &["c@example.com"], "second").await;
    eventually(WAIT, async || {
        match t.spool().envelope(one).expect("read") {
            None => Ok(()),
            Some(env) => Err(format!("still queued: {env:?}")),
        }
    })
    .await;
    eventually(WAIT, async || {
        let n = reported(&net.bounces.messages()).len();
        if n == 3 {
            Ok(())
        } else {
            Err(format!("{n} reported"))
        }
    })
    .await;
    assert_eq!(api.domain("example.com").await["paused"], json!(false));
    // …two in a row do.
    send(&t, &["d@example.com", "e@example.com"], "third").await;
    eventually(WAIT, async || {
        let q = queued(&t);
        match q.as_slice() {
            [(_, r)] if r.address == "e@example.com" && r.suspect && parked(r) => Ok(()),
            _ => Err(format!("e@example.com not held: {q:?}")),
        }
    })
    .await;
    assert_eq!(api.domain("example.com").await["paused_by"], json!("guard"));
}

#[tokio::test]
async fn with_drain_guard_zero_every_refusal_bounces() {
    let net = Net::start().await;
    let t = start(net.config(0)).await;
    let users: Vec<String> = (0..5).map(|i| format!("u{i}@example.com")).collect();
    for user in &users {
        net.relay.set_rcpt_reply(user, "550 5.1.1 no such user");
    }
    let to: Vec<&str> = users.iter().map(String::as_str).collect();
    let id = send(&t, &to, "unguarded").await;
    eventually(WAIT, async || match t.spool().envelope(id).expect("read") {
        None => Ok(()),
        Some(env) => Err(format!("still queued: {env:?}")),
    })
    .await;
    eventually(WAIT, async || {
        let n = reported(&net.bounces.messages()).len();
        if n == 5 {
            Ok(())
        } else {
            Err(format!("{n} reported"))
        }
    })
    .await;
    assert!(t.spool().pauses().unwrap().is_empty());
    assert_eq!(paused_gauge(&t, "example.com"), 0.0);
}

// ---------------------------------------------------------------------------
// Operator pauses

#[tokio::test]
async fn a_manual_pause_survives_a_restart_and_delivers_nothing_until_resumed() {
    let net = Net::start().await;
    let t = start(net.config(10)).await;
    let api = Api::of(&t);
    let answer = api
        .post("/api/domains/EXAMPLE.com./pause")
        .await
        .expect(200);
    assert_eq!(answer["paused"], json!("example.com"), "{answer}");

    // Still accepted and queued, waiting for the resume.
    let id = send(&t, &["user@example.com"], "during-maintenance").await;
    eventually(WAIT, async || match t.spool().envelope(id).expect("read") {
        Some(env) if parked(&env.recipients[0]) => Ok(()),
        other => Err(format!("not waiting for the resume: {other:?}")),
    })
    .await;
    let listed = api.domain("example.com").await;
    assert_eq!(listed["paused_by"], json!("operator"), "{listed}");
    assert_eq!(listed["queued"], json!(1), "{listed}");
    assert!(listed["oldest_age_seconds"].is_u64(), "{listed}");

    let t = restart(t, net.config(10)).await;
    let api = Api::of(&t);
    let listed = api.domain("example.com").await;
    assert_eq!(listed["paused"], json!(true), "{listed}");
    assert_eq!(listed["paused_by"], json!("operator"), "{listed}");
    assert_eq!(listed["queued"], json!(1), "{listed}");
    assert_eq!(paused_gauge(&t, "example.com"), 1.0);
    t.settled().await;
    assert_eq!(net.relay.connections(), 0, "delivered while paused");
    assert!(parked(
        &t.spool().envelope(id).unwrap().expect("queued").recipients[0]
    ));

    let answer = api
        .post("/api/domains/example.com/resume")
        .await
        .expect(200);
    assert_eq!(answer["paused_by"], json!("operator"), "{answer}");
    assert!(
        net.relay.wait_for_messages(1, WAIT).await,
        "not delivered after the resume"
    );
    eventually(WAIT, async || match t.spool().envelope(id).expect("read") {
        None => Ok(()),
        Some(env) => Err(format!("still queued: {env:?}")),
    })
    .await;
    assert_eq!(paused_gauge(&t, "example.com"), 0.0);

    // The resume outlives a restart too.
    let t = restart(t, net.config(10)).await;
    assert_eq!(
        Api::of(&t).domain("example.com").await["paused"],
        json!(false)
    );
    assert!(t.spool().pauses().unwrap().is_empty());
}

#[tokio::test]
async fn nothing_expires_while_paused_and_expiry_applies_after_the_resume() {
    let net = Net::start().await;
    net.relay
        .set_rcpt_reply("user@example.com", "450 4.2.0 mailbox busy");
    let config = || {
        net.config(10)
            .set("delivery", "max_queue_lifetime", r#""1h""#)
            .set("delivery", "retry_initial", r#""200ms""#)
            .set("delivery", "retry_max", r#""200ms""#)
            .set("delivery", "retry_jitter", "0.0")
    };
    let t = start(config()).await;
    let api = Api::of(&t);
    let id = send(&t, &["user@example.com"], "expiring").await;
    eventually(WAIT, async || match t.spool().envelope(id).expect("read") {
        Some(env) if env.recipients[0].attempts >= 1 => Ok(()),
        other => Err(format!("not tried yet: {other:?}")),
    })
    .await;
    api.post("/api/domains/example.com/pause").await.expect(200);
    // Well past the lifetime: still queued, parked, no notice.
    eventually(WAIT, async || match t.spool().envelope(id).expect("read") {
        Some(env) if parked(&env.recipients[0]) => Ok(()),
        other => Err(format!("not parked: {other:?}")),
    })
    .await;
    t.advance(Duration::from_secs(2 * 3600)).await;
    let env = t.spool().envelope(id).unwrap().expect("still queued");
    assert_eq!(env.recipients[0].status, RcptStatus::Queued);
    assert!(parked(&env.recipients[0]), "{env:?}");
    assert!(net.bounces.messages().is_empty(), "expired while paused");

    api.post("/api/domains/example.com/resume")
        .await
        .expect(200);
    eventually(WAIT, async || {
        let got = net.bounces.messages();
        if got.is_empty() {
            return Err("no notice after the resume".to_owned());
        }
        Ok(got)
    })
    .await;
    let got = net.bounces.messages();
    assert_eq!(reported(&got), vec!["user@example.com".to_owned()]);
    let text = String::from_utf8_lossy(&got[0].body).into_owned();
    assert!(text.contains("4.4.7"), "{text}");
    eventually(WAIT, async || match t.spool().envelope(id).expect("read") {
        None => Ok(()),
        Some(env) => Err(format!("still queued: {env:?}")),
    })
    .await;
}

#[tokio::test]
async fn the_domains_api_answers_who_asks_with_the_token_only() {
    let net = Net::start().await;
    let t = start(net.config(10)).await;
    let api = Api::of(&t);
    let stranger = Api {
        addr: t.server.http_addr(),
        token: None,
    };
    let wrong = Api {
        addr: t.server.http_addr(),
        token: Some("not-the-token"),
    };
    for who in [&stranger, &wrong] {
        who.send("GET", "/api/domains").await.expect_error(401);
        who.post("/api/domains/example.com/pause")
            .await
            .expect_error(401);
        who.post("/api/domains/example.com/resume")
            .await
            .expect_error(401);
    }
    assert!(
        t.spool().pauses().unwrap().is_empty(),
        "a stranger paused it"
    );

    // Every configured domain, in the config's order.
    let v = api.send("GET", "/api/domains").await.expect(200);
    let names: Vec<&str> = v["domains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["domain"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["example.com", "example.org"]);
    let d = &v["domains"][0];
    assert_eq!(d["primary"], json!("up"), "{d}");
    assert!(d["primary_since_ms"].is_u64(), "{d}");
    assert_eq!(d["paused"], json!(false), "{d}");
    assert_eq!(d["queued"], json!(0), "{d}");
    assert_eq!(d["oldest_age_seconds"], Value::Null, "{d}");

    // Only configured domains, each pause and resume once.
    let e = api
        .post("/api/domains/elsewhere.test/pause")
        .await
        .expect_error(404);
    assert!(e.contains("elsewhere.test"), "{e}");
    api.post("/api/domains/sub.example.com/pause")
        .await
        .expect_error(404);
    api.post("/api/domains/example.org/resume")
        .await
        .expect_error(409);
    api.post("/api/domains/example.org/pause").await.expect(200);
    let e = api
        .post("/api/domains/example.org/pause")
        .await
        .expect_error(409);
    assert!(e.contains("already paused"), "{e}");
    api.send("GET", "/api/domains/example.org/pause")
        .await
        .expect_error(405);
    assert_eq!(paused_gauge(&t, "example.org"), 1.0);
    assert_eq!(paused_gauge(&t, "example.com"), 0.0);

    // Without a token file the API is off, pauses included.
    let open = TestServer::start(net.config(10).set("http", "admin_token_file", r#""""#)).await;
    let anyone = Api {
        addr: open.server.http_addr(),
        token: Some(TOKEN),
    };
    anyone.send("GET", "/api/domains").await.expect_error(403);
    anyone
        .post("/api/domains/example.com/pause")
        .await
        .expect_error(403);
}

// ---------------------------------------------------------------------------
// The operator's commands

/// What one run of the binary left behind.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `mxspool -c CONFIG ARGS…` with no help from the environment.
async fn mxspool(config: &Path, args: &[&str]) -> Run {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_mxspool"));
    command
        .arg("-c")
        .arg(config)
        .args(args)
        .env_remove("MXSPOOL_CONFIG");
    for proxy in ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"] {
        command.env(proxy, "http://127.0.0.1:9/");
    }
    let output = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("mxspool finishes")
        .expect("run mxspool");
    Run {
        code: output.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(output.stdout).expect("UTF-8 stdout"),
        stderr: String::from_utf8(output.stderr).expect("UTF-8 stderr"),
    }
}

/// The server's config with `http.listen` where it really listens, for the CLI.
fn operator(t: &TestServer, net: &Net) -> PathBuf {
    let config = net
        .config(10)
        .set("http", "listen", &format!("\"{}\"", t.server.http_addr()));
    let path = t.dir.path().join("operator.toml");
    std::fs::write(&path, config.render(t.dir.path())).unwrap();
    path
}

#[tokio::test]
async fn pause_resume_and_domains_from_the_command_line() {
    let net = Net::start().await;
    let t = start(net.config(10)).await;
    let config = operator(&t, &net);

    let run = mxspool(&config, &["queue", "domains"]).await;
    assert_eq!((run.code, run.stderr.as_str()), (0, ""), "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{run:?}");
    let columns = |line: &str| {
        line.split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        columns(lines[0]),
        ["DOMAIN", "PRIMARY", "SINCE", "PAUSED", "QUEUED", "OLDEST"]
    );
    let com = columns(lines[1]);
    assert_eq!(com[0], "example.com");
    assert_eq!(com[1], "up");
    assert_eq!(&com[3..], ["no", "0", "-"]);

    let run = mxspool(&config, &["queue", "pause", "example.com"]).await;
    assert_eq!((run.code, run.stderr.as_str()), (0, ""), "{run:?}");
    assert_eq!(
        run.stdout,
        "paused example.com: mail is accepted and queued, nothing is delivered until \
         `mxspool queue resume example.com`\n"
    );
    assert_eq!(t.spool().pauses().unwrap().len(), 1);
    send(&t, &["user@example.com"], "while-paused").await;

    let run = mxspool(&config, &["queue", "domains", "--json"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let v: Value = serde_json::from_str(&run.stdout).expect("JSON");
    assert_eq!(v["domains"][0]["paused_by"], json!("operator"), "{v}");
    assert_eq!(v["domains"][0]["queued"], json!(1), "{v}");
    let run = mxspool(&config, &["queue", "domains"]).await;
    let com = columns(run.stdout.lines().nth(1).unwrap());
    assert_eq!(&com[3..6], ["by", "operator", "1"], "{run:?}");

    let run = mxspool(&config, &["queue", "pause", "example.com"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(run.stderr, "mxspool: example.com is already paused\n");
    let run = mxspool(&config, &["queue", "pause", "elsewhere.test"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(
        run.stderr,
        "mxspool: elsewhere.test is not a relay domain of this server\n"
    );
    assert_eq!(run.stdout, "");

    let run = mxspool(&config, &["queue", "resume", "example.com"]).await;
    assert_eq!((run.code, run.stderr.as_str()), (0, ""), "{run:?}");
    assert_eq!(
        run.stdout,
        "resumed example.com: its queued mail is due now\n"
    );
    assert!(
        net.relay.wait_for_messages(1, WAIT).await,
        "not delivered after the resume"
    );
    assert!(t.spool().pauses().unwrap().is_empty());
    let run = mxspool(&config, &["queue", "resume", "example.com"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(run.stderr, "mxspool: example.com is not paused\n");
}
