//! The HTTP side end to end (docs/api.md, DESIGN.md "Observability"): health,
//! the admin API and `/metrics` of a real server, spoken to over loopback TCP
//! by a small HTTP/1.1 client, with scriptable primaries behind it.

mod common;
mod primary;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::http::Response;
use common::{TestConfig, TestServer};
use primary::{Mode, Primary};
use serde_json::{Value, json};

/// How long a test waits for something the server does in the background.
const WAIT: Duration = Duration::from_secs(10);

/// The admin token the tests write to `admin_token_file`.
const TOKEN: &str = "t0ken-for-the-tests";

/// Polls `$cond` (which may `.await`) until it holds, or fails after [`WAIT`].
macro_rules! wait_for {
    ($what:expr, $cond:expr) => {{
        common::eventually(WAIT, async || {
            if $cond {
                Ok(())
            } else {
                Err(format!("waiting for {}", $what))
            }
        })
        .await
    }};
}

/// The server's HTTP side, with or without a token to offer.
struct Http {
    addr: SocketAddr,
    token: Option<String>,
}

impl Http {
    fn of(t: &TestServer) -> Http {
        Http {
            addr: t.server.http_addr(),
            token: Some(TOKEN.to_owned()),
        }
    }

    fn without_token(t: &TestServer) -> Http {
        Http {
            addr: t.server.http_addr(),
            token: None,
        }
    }

    async fn send(&self, method: &str, path: &str, body: Option<&str>) -> Response {
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if let Some(auth) = &auth {
            headers.push(("Authorization", auth));
        }
        if body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        common::http::request(self.addr, method, path, &headers, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    async fn get(&self, path: &str) -> Response {
        self.send("GET", path, None).await
    }

    async fn post(&self, path: &str) -> Response {
        self.send("POST", path, None).await
    }

    async fn delete(&self, path: &str) -> Response {
        self.send("DELETE", path, None).await
    }

    /// `GET /api/queue{query}`, checked: 200, `count` equal to the list's length.
    async fn list(&self, query: &str) -> Vec<Value> {
        let v = self.get(&format!("/api/queue{query}")).await.expect(200);
        let messages = v["messages"].as_array().expect("messages").clone();
        assert_eq!(v["count"], json!(messages.len()), "count of {v}");
        messages
    }

    /// The IDs `GET /api/queue{query}` lists, in order.
    async fn list_ids(&self, query: &str) -> Vec<String> {
        ids(&self.list(query).await)
    }

    /// `GET /api/dead`, checked like [`Http::list`].
    async fn dead(&self) -> Vec<Value> {
        let v = self.get("/api/dead").await.expect(200);
        let messages = v["messages"].as_array().expect("messages").clone();
        assert_eq!(v["count"], json!(messages.len()), "count of {v}");
        messages
    }

    async fn metrics(&self) -> Scrape {
        let r = self.get("/metrics").await;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            r.header("content-type")
                .is_some_and(|t| t.starts_with("text/plain")),
            "{r:?}"
        );
        Scrape::parse(&r.body)
    }
}

fn ids(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["id"].as_str().expect("id").to_owned())
        .collect()
}

// ---------------------------------------------------------------------------
// The Prometheus text format, as far as these tests read it.

struct Scrape {
    text: String,
    types: BTreeMap<String, String>,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut types = BTreeMap::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE line");
                types.insert(name.to_owned(), kind.trim().to_owned());
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let (name, labels) = match series.split_once('{') {
                None => (series.to_owned(), BTreeMap::new()),
                Some((name, rest)) => {
                    let rest = rest.strip_suffix('}').expect("labels end in }");
                    (name.to_owned(), parse_labels(rest))
                }
            };
            samples.push((name, labels, value));
        }
        Scrape {
            text: text.to_owned(),
            types,
            samples,
        }
    }

    /// The sample `name` with exactly the labels `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples
            .iter()
            .find(|(n, l, _)| n == name && *l == want)
            .map(|(_, _, v)| *v)
    }

    #[track_caller]
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in:\n{}", self.text))
    }

    fn has_sample(&self, name: &str) -> bool {
        self.samples.iter().any(|(n, _, _)| n == name)
    }
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").expect("label=\"value\"");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, next)) = chars.next() {
                        value.push(match next {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end.expect("closing quote");
        labels.insert(key.trim_start_matches(',').trim().to_owned(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    labels
}

// ---------------------------------------------------------------------------
// Servers, primaries and mail.

fn route(p: &Primary) -> String {
    format!("[127.0.0.1]:{}", p.addr.port())
}

/// A config whose domains route each to its primary, with an admin token file
/// in the test directory, fast probes and an hour of backoff (so nothing is
/// retried by the clock during a test).
fn config(domains: &[(&str, &Primary)]) -> TestConfig {
    let mut toml = String::new();
    for (name, primary) in domains {
        toml.push_str(&format!(
            "[[domain]]\nname = \"{name}\"\nroute = \"{}\"\n\n",
            route(primary)
        ));
    }
    TestConfig::default()
        .set("delivery", "probe_interval", r#""200ms""#)
        .set("delivery", "retry_initial", r#""1h""#)
        .set("delivery", "retry_max", r#""2h""#)
        .set("http", "admin_token_file", r#""{dir}/admin-token""#)
        .domains(&toml)
}

/// Starts a server for `config`, with the token file (padded with whitespace,
/// which is ignored) in place.
async fn start(config: TestConfig) -> TestServer {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("admin-token"), format!("  {TOKEN}\n\n")).expect("token");
    TestServer::start_in(dir, config).await
}

fn message(subject: &str) -> Vec<u8> {
    format!("Subject: {subject}\r\nFrom: <sender@origin.test>\r\n\r\nbody of {subject}\r\n")
        .into_bytes()
}

/// Sends one message over a fresh session; returns its queue ID.
async fn send(t: &TestServer, from: &str, to: &[&str], subject: &str) -> String {
    let mut c = t.ehlo().await;
    let id = c
        .send_mail(from, to, &message(subject))
        .await
        .queue_id()
        .to_string();
    c.quit().await;
    id
}

/// The message `id` as listed, if it is.
async fn listed(http: &Http, id: &str) -> Option<Value> {
    http.list("")
        .await
        .into_iter()
        .find(|m| m["id"] == json!(id))
}

/// Whether every queued recipient of `id` was attempted at least once.
async fn attempted(http: &Http, id: &str) -> bool {
    listed(http, id).await.is_some_and(|m| {
        m["recipients"]
            .as_array()
            .expect("recipients")
            .iter()
            .all(|r| r["attempts"].as_u64().unwrap_or(0) >= 1)
    })
}

/// A well-formed queue ID no message has.
const UNKNOWN_ID: &str = "0000000000001";
/// Not a queue ID at all (I, L, O, U are not in the alphabet; wrong length).
const MALFORMED_IDS: &[&str] = &[
    "not-an-id",
    "0000000000000I",
    "OOOOOOOOOOOOO",
    "Z000000000000",
];

// ---------------------------------------------------------------------------
// Health.

#[tokio::test]
async fn health_and_readiness_until_shutdown() {
    let t = TestServer::start(TestConfig::default()).await;
    let addr = t.server.http_addr();
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    let http = Http::without_token(&t);

    let r = http.get("/healthz").await;
    assert_eq!((r.status, r.body.trim()), (200, "ok"), "{r:?}");
    let r = http.get("/readyz").await;
    assert_eq!((r.status, r.body.trim()), (200, "ready"), "{r:?}");
    // An unknown path is a JSON 404, not a crash or an empty answer.
    http.get("/nowhere").await.expect_error(404);

    let TestServer { server, dir, .. } = t;
    tokio::time::timeout(WAIT, server.shutdown(Duration::from_secs(2)))
        .await
        .expect("shutdown finishes");
    // Once shut down, the HTTP port no longer answers (readiness flips to 503
    // only for the instant between the flag and the listener closing, which a
    // client cannot hit).
    for path in ["/healthz", "/readyz"] {
        match common::http::request(addr, "GET", path, &[], None).await {
            Err(_) => {}
            Ok(r) => panic!("{path} still answers after shutdown: {r:?}"),
        }
    }
    drop(dir);
}

// ---------------------------------------------------------------------------
// Authorisation.

#[tokio::test]
async fn admin_api_is_forbidden_without_a_token_file() {
    let t = TestServer::start(TestConfig::default()).await;
    let http = Http::without_token(&t);
    let with_some_token = Http {
        addr: t.server.http_addr(),
        token: Some("anything".into()),
    };
    for client in [&http, &with_some_token] {
        for (method, path) in [
            ("GET", "/api/queue"),
            ("GET", format!("/api/queue/{UNKNOWN_ID}").as_str()),
            ("POST", "/api/queue/flush"),
            ("DELETE", format!("/api/queue/{UNKNOWN_ID}").as_str()),
            ("GET", "/api/dead"),
        ] {
            let error = client.send(method, path, None).await.expect_error(403);
            assert!(
                error.contains("admin_token_file"),
                "{method} {path}: error does not say how to enable the API: {error:?}"
            );
        }
    }
    // The rest needs no token.
    let r = http.get("/healthz").await;
    assert_eq!(r.status, 200);
    assert!(http.metrics().await.has_sample("mxspool_queue_bytes"));
}

#[tokio::test]
async fn admin_api_needs_the_bearer_token() {
    let primary = Primary::start().await;
    primary.set_mode(Mode::Down);
    let t = start(config(&[("example.com", &primary)])).await;
    let id = send(&t, "a@origin.test", &["u@example.com"], "kept").await;
    let addr = t.server.http_addr();

    let without = Http::without_token(&t);
    without.get("/api/queue").await.expect_error(401);
    without.get("/api/dead").await.expect_error(401);
    without.post("/api/queue/flush").await.expect_error(401);

    let wrong_tokens = [
        "wrong".to_owned(),
        String::new(),
        format!("{TOKEN}x"),
        TOKEN[..TOKEN.len() - 1].to_owned(),
        TOKEN.to_uppercase(),
    ];
    for wrong in wrong_tokens {
        let http = Http {
            addr,
            token: Some(wrong.clone()),
        };
        http.get("/api/queue").await.expect_error(401);
        // Refused requests change nothing.
        http.delete(&format!("/api/queue/{id}"))
            .await
            .expect_error(401);
        http.post(&format!("/api/queue/{id}/hold"))
            .await
            .expect_error(401);
    }
    // The token under another scheme, or bare, is not accepted either.
    for header in [format!("Basic {TOKEN}"), TOKEN.to_owned()] {
        let r = common::http::request(
            addr,
            "GET",
            "/api/queue",
            &[("Authorization", header.as_str())],
            None,
        )
        .await
        .unwrap();
        r.expect_error(401);
    }

    let http = Http::of(&t);
    let messages = http.list("").await;
    assert_eq!(ids(&messages), vec![id.clone()]);
    assert_eq!(messages[0]["held"], json!(false), "{messages:?}");

    // Health and metrics stay open to all.
    assert_eq!(without.get("/healthz").await.status, 200);
    assert_eq!(without.get("/readyz").await.status, 200);
    assert!(without.metrics().await.has_sample("mxspool_queue_messages"));
}

// ---------------------------------------------------------------------------
// The queue.

#[tokio::test]
async fn list_shows_the_queue_and_filters_by_domain_and_state() {
    // example.com's primary is down: its mail is attempted and deferred.
    // slow.test's primary accepts and then never greets: its mail stays
    // queued with no attempt recorded yet.
    let down = Primary::start().await;
    down.set_mode(Mode::Down);
    let slow = Primary::start().await;
    slow.set_mode(Mode::Hang);
    let t = start(config(&[("example.com", &down), ("slow.test", &slow)])).await;
    let http = Http::of(&t);

    let v = http.get("/api/queue").await.expect(200);
    assert_eq!(v, json!({"messages": [], "count": 0, "next_cursor": null}));

    let m1 = send(
        &t,
        "alice@origin.test",
        &["u1@example.com", "U2@Example.com"],
        "one",
    )
    .await;
    let m2 = send(&t, "bob@origin.test", &["u3@example.com"], "two").await;
    let m3 = send(&t, "carol@origin.test", &["w@slow.test"], "three").await;

    let messages = http.list("").await;
    assert_eq!(ids(&messages), vec![m1.clone(), m2.clone(), m3.clone()]);
    let first = &messages[0];
    assert_eq!(first["sender"], json!("alice@origin.test"));
    assert_eq!(first["held"], json!(false));
    let stored = t.stored();
    assert_eq!(first["size"], json!(stored[0].1.len()), "{first}");
    assert!(first["arrived_ms"].as_u64().unwrap() > 1_600_000_000_000);
    assert!(first["age_seconds"].is_u64());
    let rcpts = first["recipients"].as_array().unwrap();
    let addresses: Vec<&str> = rcpts
        .iter()
        .map(|r| r["address"].as_str().unwrap())
        .collect();
    assert_eq!(addresses.len(), 2, "{first}");
    assert_eq!(addresses[0], "u1@example.com");
    assert!(
        addresses[1].eq_ignore_ascii_case("u2@example.com"),
        "{first}"
    );
    for r in rcpts {
        assert_eq!(r["status"], json!("queued"), "{r}");
        assert_eq!(r["domain"], json!("example.com"), "{r}");
    }
    assert_eq!(messages[1]["sender"], json!("bob@origin.test"));
    assert_eq!(
        messages[2]["recipients"][0]["address"],
        json!("w@slow.test")
    );

    // Wait for the first attempts on the down primary.
    wait_for!(format!("deferral of {m1}"), attempted(&http, &m1).await);
    wait_for!(format!("deferral of {m2}"), attempted(&http, &m2).await);
    let m = listed(&http, &m1).await.unwrap();
    for r in m["recipients"].as_array().unwrap() {
        assert_eq!(r["status"], json!("queued"), "{r}");
        assert_eq!(r["waiting_for_primary"], json!(true), "{r}");
        assert!(r["last_reply"].is_string(), "{r}");
        assert!(
            r["next_attempt_ms"].as_u64().unwrap() > m["arrived_ms"].as_u64().unwrap(),
            "{r}"
        );
    }
    let m = listed(&http, &m3).await.unwrap();
    assert_eq!(m["recipients"][0]["attempts"], json!(0), "{m}");

    // By domain (case does not matter).
    assert_eq!(
        http.list_ids("?domain=example.com").await,
        vec![m1.clone(), m2.clone()]
    );
    assert_eq!(
        http.list_ids("?domain=EXAMPLE.COM").await,
        vec![m1.clone(), m2.clone()]
    );
    assert_eq!(http.list_ids("?domain=slow.test").await, vec![m3.clone()]);
    assert!(http.list_ids("?domain=nowhere.test").await.is_empty());

    // By state.
    assert_eq!(
        http.list_ids("?state=queued").await,
        vec![m1.clone(), m2.clone(), m3.clone()]
    );
    assert_eq!(
        http.list_ids("?state=deferred").await,
        vec![m1.clone(), m2.clone()]
    );
    assert!(http.list_ids("?state=held").await.is_empty());
    http.post(&format!("/api/queue/{m2}/hold"))
        .await
        .expect(200);
    assert_eq!(http.list_ids("?state=held").await, vec![m2.clone()]);
    assert_eq!(
        http.list_ids("?state=queued").await,
        vec![m1.clone(), m3.clone()]
    );
    assert_eq!(http.list_ids("?state=deferred").await, vec![m1.clone()]);
    // Both filters at once.
    assert_eq!(
        http.list_ids("?domain=example.com&state=held").await,
        vec![m2.clone()]
    );
    assert!(
        http.list_ids("?domain=slow.test&state=deferred")
            .await
            .is_empty()
    );

    for bad in ["bogus", "HELD", "all"] {
        let error = http
            .get(&format!("/api/queue?state={bad}"))
            .await
            .expect_error(400);
        assert!(error.contains(bad), "{error:?}");
    }
}

#[tokio::test]
async fn list_by_domain_counts_only_recipients_still_queued_there() {
    let up = Primary::start().await;
    let down = Primary::start().await;
    down.set_mode(Mode::Down);
    let t = start(
        config(&[("up.test", &up), ("example.com", &down)]).append(&format!(
            "[[domain]]\nname = \"wide.test\"\ninclude_subdomains = true\nroute = \"{}\"\n",
            route(&down)
        )),
    )
    .await;
    let http = Http::of(&t);
    let split = send(
        &t,
        "s@origin.test",
        &["x@up.test", "y@example.com"],
        "split",
    )
    .await;
    let sub = send(&t, "s@origin.test", &["z@mail.wide.test"], "sub").await;
    assert!(up.wait_for_messages(1, WAIT).await, "up.test not delivered");
    wait_for!("the delivery to be recorded", {
        listed(&http, &split)
            .await
            .is_some_and(|m| m["recipients"][0]["status"] == json!("delivered"))
    });
    wait_for!(format!("deferral of {split}"), {
        listed(&http, &split)
            .await
            .is_some_and(|m| m["recipients"][1]["attempts"].as_u64() >= Some(1))
    });
    wait_for!(format!("deferral of {sub}"), attempted(&http, &sub).await);
    let m = listed(&http, &split).await.unwrap();
    let statuses: Vec<&Value> = m["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["status"])
        .collect();
    assert_eq!(statuses, [&json!("delivered"), &json!("queued")], "{m}");
    assert_eq!(
        m["recipients"][0].get("next_attempt_ms"),
        Some(&Value::Null),
        "{m}"
    );
    assert_eq!(m["recipients"][0]["waiting_for_primary"], json!(false));
    assert_eq!(m["recipients"][1]["waiting_for_primary"], json!(true));

    // Nothing waits at up.test any more; the message waits at example.com.
    assert!(http.list_ids("?domain=up.test").await.is_empty());
    assert_eq!(
        http.list_ids("?domain=example.com").await,
        vec![split.clone()]
    );
    // A subdomain of a domain with include_subdomains belongs to it.
    assert_eq!(http.list_ids("?domain=wide.test").await, vec![sub.clone()]);
    assert_eq!(
        http.list_ids("?domain=mail.wide.test").await,
        vec![sub.clone()]
    );
    assert_eq!(
        http.list_ids("?state=deferred").await,
        vec![split.clone(), sub.clone()]
    );
}

#[tokio::test]
async fn show_returns_the_message_with_its_headers_and_dsn_parameters() {
    let down = Primary::start().await;
    down.set_mode(Mode::Down);
    let t = start(config(&[("example.com", &down)])).await;
    let http = Http::of(&t);

    let mut c = t.ehlo().await;
    c.cmd("MAIL FROM:<alice@origin.test> RET=HDRS ENVID=env-42")
        .await
        .assert(250);
    c.cmd("RCPT TO:<bob@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.com")
        .await
        .assert(250);
    c.cmd("RCPT TO:<carol@example.com>").await.assert(250);
    c.cmd("DATA").await.assert(354);
    c.send(common::dot_stuff(
        b"Subject: show me\r\nX-Test: 1\r\n\r\nthe body text\r\n",
    ))
    .await;
    let id = c.reply().await.queue_id().to_string();
    c.quit().await;

    let v = http.get(&format!("/api/queue/{id}")).await.expect(200);
    assert_eq!(v["id"], json!(id));
    assert_eq!(v["sender"], json!("alice@origin.test"));
    assert_eq!(v["held"], json!(false));
    assert_eq!(v["ret"], json!("hdrs"));
    assert_eq!(v["envid"], json!("env-42"));
    let headers = v["headers"].as_str().expect("headers");
    assert!(
        headers.starts_with("Received: from client.test"),
        "{headers:?}"
    );
    assert!(headers.contains("by mx2.test"), "{headers:?}");
    assert!(headers.contains(&format!(" id {id}")), "{headers:?}");
    assert!(headers.contains("Subject: show me\r\n"), "{headers:?}");
    assert!(headers.contains("X-Test: 1\r\n"), "{headers:?}");
    assert!(!headers.contains("the body text"), "{headers:?}");
    assert!(common::only_crlf(headers.as_bytes()), "{headers:?}");
    let stored = t.stored();
    assert_eq!(v["size"], json!(stored[0].1.len()));
    let rcpts = v["recipients"].as_array().unwrap();
    assert_eq!(rcpts.len(), 2);
    assert_eq!(rcpts[0]["address"], json!("bob@example.com"));
    assert_eq!(rcpts[0]["notify"], json!(["success", "failure"]));
    assert!(
        rcpts[0]["orcpt"]
            .as_str()
            .is_some_and(|o| o.to_ascii_lowercase().contains("bob@example.com")),
        "{v}"
    );
    assert_eq!(rcpts[1]["address"], json!("carol@example.com"));
    assert_eq!(rcpts[1]["notify"], json!([]), "{v}");
    assert!(rcpts[1].get("orcpt").is_none(), "no ORCPT given: {v}");

    // A message sent without DSN parameters.
    let plain = send(&t, "dave@origin.test", &["erin@example.com"], "plain").await;
    let v = http.get(&format!("/api/queue/{plain}")).await.expect(200);
    assert_eq!(v["ret"], Value::Null);
    assert_eq!(v["envid"], Value::Null);

    // IDs are case-insensitive text.
    let lower = http
        .get(&format!("/api/queue/{}", id.to_ascii_lowercase()))
        .await
        .expect(200);
    assert_eq!(lower["id"], json!(id));

    let error = http
        .get(&format!("/api/queue/{UNKNOWN_ID}"))
        .await
        .expect_error(404);
    assert!(error.contains(UNKNOWN_ID), "{error:?}");
    for bad in MALFORMED_IDS {
        http.get(&format!("/api/queue/{bad}"))
            .await
            .expect_error(400);
    }
}

#[tokio::test]
async fn hold_and_release() {
    let primary = Primary::start().await;
    primary.set_mode(Mode::Down);
    let t = start(config(&[("example.com", &primary)])).await;
    let http = Http::of(&t);
    let id = send(&t, "a@origin.test", &["u@example.com"], "held").await;
    let other = send(&t, "b@origin.test", &["v@example.com"], "not held").await;
    wait_for!("deferral", attempted(&http, &id).await);

    let v = http
        .post(&format!("/api/queue/{id}/hold"))
        .await
        .expect(200);
    assert_eq!(v, json!({ "held": id }));
    let m = listed(&http, &id).await.expect("still queued");
    assert_eq!(m["held"], json!(true));
    assert_eq!(http.list_ids("?state=held").await, vec![id.clone()]);
    let error = http
        .post(&format!("/api/queue/{id}/hold"))
        .await
        .expect_error(409);
    assert!(error.contains(&id), "{error:?}");

    // A held message stays put while its primary comes back; the other goes.
    primary.set_mode(Mode::Up);
    assert!(primary.wait_for_messages(1, WAIT).await, "not delivered");
    wait_for!(
        "delivery of the message not held",
        listed(&http, &other).await.is_none()
    );
    t.settled().await;
    assert_eq!(primary.messages().len(), 1, "a held message was delivered");
    assert!(listed(&http, &id).await.is_some());

    let error = http
        .post(&format!("/api/queue/{other}/release"))
        .await
        .expect_error(404);
    assert!(error.contains(&other), "{error:?}");

    // Release: due now, so it goes out at once despite an hour of backoff.
    let v = http
        .post(&format!("/api/queue/{id}/release"))
        .await
        .expect(200);
    assert_eq!(v, json!({ "released": id }));
    assert!(
        primary.wait_for_messages(2, WAIT).await,
        "released message not delivered"
    );
    let body = String::from_utf8_lossy(&primary.messages()[1].body).into_owned();
    assert!(body.contains("Subject: held"), "{body}");
    wait_for!("the queue to empty", http.list("").await.is_empty());

    // 409 for a queued message that is not held.
    primary.set_mode(Mode::Down);
    let fourth = send(&t, "c@origin.test", &["w@example.com"], "fourth").await;
    wait_for!("fourth deferred", attempted(&http, &fourth).await);
    let error = http
        .post(&format!("/api/queue/{fourth}/release"))
        .await
        .expect_error(409);
    assert!(error.contains(&fourth), "{error:?}");
    for action in ["hold", "release"] {
        http.post(&format!("/api/queue/{UNKNOWN_ID}/{action}"))
            .await
            .expect_error(404);
        for bad in MALFORMED_IDS {
            http.post(&format!("/api/queue/{bad}/{action}"))
                .await
                .expect_error(400);
        }
    }
}

#[tokio::test]
async fn delete_removes_a_message_without_notice() {
    let down = Primary::start().await;
    down.set_mode(Mode::Down);
    let senders = Primary::start().await;
    let t = start(config(&[("example.com", &down), ("origin.test", &senders)])).await;
    let http = Http::of(&t);
    let id = send(&t, "a@origin.test", &["u@example.com"], "doomed").await;
    let kept = send(&t, "a@origin.test", &["v@example.com"], "kept").await;
    let before = http.metrics().await;

    let v = http.delete(&format!("/api/queue/{id}")).await.expect(200);
    assert_eq!(v, json!({ "deleted": id }));
    assert_eq!(http.list_ids("").await, vec![kept.clone()]);
    assert!(
        t.stored().iter().all(|(e, _)| e.id.to_string() != id),
        "still in the spool"
    );
    http.get(&format!("/api/queue/{id}"))
        .await
        .expect_error(404);
    http.delete(&format!("/api/queue/{id}"))
        .await
        .expect_error(404);
    http.delete(&format!("/api/queue/{UNKNOWN_ID}"))
        .await
        .expect_error(404);
    for bad in MALFORMED_IDS {
        http.delete(&format!("/api/queue/{bad}"))
            .await
            .expect_error(400);
    }
    // A held message can be deleted too.
    http.post(&format!("/api/queue/{kept}/hold"))
        .await
        .expect(200);
    http.delete(&format!("/api/queue/{kept}")).await.expect(200);
    assert!(http.list("").await.is_empty());
    assert!(t.stored().is_empty());

    // Without notice: nothing queued for or sent to the sender.
    t.settled().await;
    let after = http.metrics().await;
    let failed = [("kind", "failed")];
    assert_eq!(
        after.value("mxspool_dsn_sent_total", &failed),
        before.value("mxspool_dsn_sent_total", &failed)
    );
    assert!(senders.messages().is_empty());
    assert_eq!(after.value("mxspool_queue_bytes", &[]), 0.0);
}

#[tokio::test]
async fn flush_makes_deferred_mail_due_now() {
    // One live primary for two domains; it tempfails two recipients, so each
    // message is deferred for an hour with the primary known to be up.
    let primary = Primary::start().await;
    primary.set_rcpt_reply("a@example.com", "450 4.2.1 try again later");
    primary.set_rcpt_reply("b@second.test", "450 4.2.1 try again later");
    let t = start(config(&[
        ("example.com", &primary),
        ("second.test", &primary),
    ]))
    .await;
    let http = Http::of(&t);
    let first = send(&t, "s@origin.test", &["a@example.com"], "first").await;
    let second = send(&t, "s@origin.test", &["b@second.test"], "second").await;
    for id in [&first, &second] {
        wait_for!(format!("deferral of {id}"), attempted(&http, id).await);
        let m = listed(&http, id).await.unwrap();
        let r = &m["recipients"][0];
        assert_eq!(r["waiting_for_primary"], json!(false), "{m}");
        assert!(
            r["last_reply"].as_str().is_some_and(|t| t.contains("450")),
            "{m}"
        );
    }
    // The primary would accept now, but the backoff holds the mail back.
    primary.set_rcpt_reply("a@example.com", "250 2.1.5 Ok");
    primary.set_rcpt_reply("b@second.test", "250 2.1.5 Ok");
    t.settled().await;
    assert!(primary.messages().is_empty(), "delivered before any flush");

    // One domain: only its mail goes.
    let r = http
        .send(
            "POST",
            "/api/queue/flush",
            Some(r#"{"domain": "Example.COM"}"#),
        )
        .await;
    assert_eq!(r.expect(202), json!({ "flushed": "example.com" }));
    assert!(
        primary.wait_for_messages(1, WAIT).await,
        "flushed mail was not delivered"
    );
    wait_for!(
        "the flushed message to leave the queue",
        listed(&http, &first).await.is_none()
    );
    assert!(
        String::from_utf8_lossy(&primary.messages()[0].body).contains("Subject: first"),
        "the wrong message went out"
    );
    t.settled().await;
    assert_eq!(
        primary.messages().len(),
        1,
        "another domain was flushed too"
    );
    assert_eq!(http.list_ids("").await, vec![second.clone()]);

    // Everything: no body at all.
    let r = http.post("/api/queue/flush").await;
    assert_eq!(r.expect(202), json!({ "flushed": "all" }));
    assert!(
        primary.wait_for_messages(2, WAIT).await,
        "flush of all did not deliver"
    );
    wait_for!("the queue to empty", http.list("").await.is_empty());

    // An empty JSON body is "all" too.
    let r = http.send("POST", "/api/queue/flush", Some("{}")).await;
    assert_eq!(r.expect(202), json!({ "flushed": "all" }));
}

#[tokio::test]
async fn bounce_fails_every_queued_recipient_and_notifies_the_sender() {
    let down = Primary::start().await;
    down.set_mode(Mode::Down);
    let senders = Primary::start().await;
    let t = start(config(&[("example.com", &down), ("origin.test", &senders)])).await;
    let http = Http::of(&t);
    let id = send(
        &t,
        "alice@origin.test",
        &["u1@example.com", "u2@example.com"],
        "returned",
    )
    .await;
    wait_for!("deferral", attempted(&http, &id).await);
    let before = http.metrics().await;
    let failed_kind = [("kind", "failed")];

    let v = http
        .post(&format!("/api/queue/{id}/bounce"))
        .await
        .expect(200);
    assert_eq!(v, json!({ "bounced": id, "recipients": 2 }));
    assert!(
        listed(&http, &id).await.is_none(),
        "bounced message still queued"
    );
    http.get(&format!("/api/queue/{id}"))
        .await
        .expect_error(404);

    // The notice: counted, and delivered to the sender's own primary.
    let after = http.metrics().await;
    assert_eq!(
        after.value("mxspool_dsn_sent_total", &failed_kind),
        before.value("mxspool_dsn_sent_total", &failed_kind) + 1.0
    );
    assert!(
        senders.wait_for_messages(1, WAIT).await,
        "no failure notice reached the sender"
    );
    let notice = &senders.messages()[0];
    assert!(
        notice.mail_from_line.starts_with("MAIL FROM:<>"),
        "{}",
        notice.mail_from_line
    );
    assert_eq!(notice.rcpt_lines.len(), 1, "{:?}", notice.rcpt_lines);
    assert!(
        notice.rcpt_lines[0].starts_with("RCPT TO:<alice@origin.test>"),
        "{:?}",
        notice.rcpt_lines
    );
    let body = String::from_utf8_lossy(&notice.body);
    assert!(body.contains("multipart/report"), "{body}");
    assert!(body.contains("u1@example.com"), "{body}");
    assert!(body.contains("u2@example.com"), "{body}");
    assert!(body.contains("5.0.0"), "{body}");
    assert!(body.contains("Subject: returned"), "{body}");
    wait_for!(
        "the notice to leave the queue",
        http.list("").await.is_empty()
    );
    assert!(http.dead().await.is_empty());

    // Nothing left to bounce.
    http.post(&format!("/api/queue/{id}/bounce"))
        .await
        .expect_error(404);
    http.post(&format!("/api/queue/{UNKNOWN_ID}/bounce"))
        .await
        .expect_error(404);
    for bad in MALFORMED_IDS {
        http.post(&format!("/api/queue/{bad}/bounce"))
            .await
            .expect_error(400);
    }
    assert!(down.messages().is_empty());
}

#[tokio::test]
async fn dead_letters_can_be_listed_requeued_and_deleted() {
    // The primary refuses the recipient for good and the sender is <>: the
    // failure can be reported to nobody, so the message becomes a dead letter.
    let primary = Primary::start().await;
    primary.set_rcpt_reply("nobody@example.com", "550 5.1.1 no such user");
    let t = start(config(&[("example.com", &primary)])).await;
    let http = Http::of(&t);
    assert!(http.dead().await.is_empty());

    let a = send(&t, "", &["nobody@example.com"], "dead one").await;
    let b = send(&t, "", &["nobody@example.com"], "dead two").await;
    wait_for!("two dead letters", http.dead().await.len() == 2);
    let dead = http.dead().await;
    assert_eq!(ids(&dead), vec![a.clone(), b.clone()]);
    for m in &dead {
        assert_eq!(m["sender"], json!(""), "{m}");
        let r = &m["recipients"][0];
        assert_eq!(r["address"], json!("nobody@example.com"), "{m}");
        assert_eq!(r["status"], json!("failed"), "{m}");
        assert!(
            r["last_reply"].as_str().is_some_and(|t| t.contains("550")),
            "{m}"
        );
    }
    assert!(
        http.list("").await.is_empty(),
        "dead letters listed as queued"
    );
    let m = http.metrics().await;
    assert_eq!(m.value("mxspool_dead_letters", &[]), 2.0);
    // Dead letters are not the queue.
    assert_eq!(m.value("mxspool_queue_bytes", &[]), 0.0);
    assert_eq!(
        m.value("mxspool_queue_messages", &[("domain", "example.com")]),
        0.0
    );
    assert!(primary.messages().is_empty());

    // Requeue `a` while the primary is down: it is back in the queue, queued.
    primary.set_mode(Mode::Down);
    let v = http
        .post(&format!("/api/dead/{a}/requeue"))
        .await
        .expect(200);
    assert_eq!(v, json!({ "requeued": a }));
    assert_eq!(ids(&http.dead().await), vec![b.clone()]);
    let m = listed(&http, &a).await.expect("requeued message is queued");
    assert_eq!(m["recipients"][0]["status"], json!("queued"), "{m}");
    assert_eq!(m["sender"], json!(""));
    http.post(&format!("/api/dead/{a}/requeue"))
        .await
        .expect_error(404);

    // Delete `b`.
    let v = http.delete(&format!("/api/dead/{b}")).await.expect(200);
    assert_eq!(v, json!({ "deleted": b }));
    assert!(http.dead().await.is_empty());
    http.delete(&format!("/api/dead/{b}"))
        .await
        .expect_error(404);
    http.post(&format!("/api/dead/{b}/requeue"))
        .await
        .expect_error(404);
    assert_eq!(http.metrics().await.value("mxspool_dead_letters", &[]), 0.0);
    // A queued message is not a dead letter.
    http.delete(&format!("/api/dead/{a}"))
        .await
        .expect_error(404);
    assert!(listed(&http, &a).await.is_some());

    for bad in MALFORMED_IDS {
        http.post(&format!("/api/dead/{bad}/requeue"))
            .await
            .expect_error(400);
        http.delete(&format!("/api/dead/{bad}"))
            .await
            .expect_error(400);
    }
    http.post(&format!("/api/dead/{UNKNOWN_ID}/requeue"))
        .await
        .expect_error(404);
    http.delete(&format!("/api/dead/{UNKNOWN_ID}"))
        .await
        .expect_error(404);

    // The requeued message really is due: once the primary is back and
    // accepts the recipient, it is delivered.
    primary.set_rcpt_reply("nobody@example.com", "250 2.1.5 Ok");
    primary.set_mode(Mode::Up);
    assert!(
        primary.wait_for_messages(1, WAIT).await,
        "requeued message not delivered"
    );
    assert!(String::from_utf8_lossy(&primary.messages()[0].body).contains("Subject: dead one"));
    wait_for!("the queue to empty", http.list("").await.is_empty());
    assert!(http.dead().await.is_empty());
}

// ---------------------------------------------------------------------------
// Metrics.

/// Every metric DESIGN.md names, with its Prometheus type.
const METRICS: &[(&str, &str)] = &[
    ("mxspool_queue_messages", "gauge"),
    ("mxspool_queue_bytes", "gauge"),
    ("mxspool_queue_oldest_age_seconds", "gauge"),
    ("mxspool_messages_accepted_total", "counter"),
    ("mxspool_smtp_rejected_total", "counter"),
    ("mxspool_delivery_attempts_total", "counter"),
    ("mxspool_recipients_delivered_total", "counter"),
    ("mxspool_recipients_failed_total", "counter"),
    ("mxspool_dsn_sent_total", "counter"),
    ("mxspool_primary_up", "gauge"),
    ("mxspool_smtp_sessions_active", "gauge"),
    ("mxspool_delivery_duration_seconds", "histogram"),
    ("mxspool_spool_commit_seconds", "histogram"),
    ("mxspool_dead_letters", "gauge"),
];

#[tokio::test]
async fn metrics_name_every_series_from_startup() {
    let a = Primary::start().await;
    let b = Primary::start().await;
    let t = start(config(&[("alpha.test", &a), ("beta.test", &b)])).await;
    let http = Http::without_token(&t);
    let r = http.get("/metrics").await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain") && t.contains("version=0.0.4")),
        "{r:?}"
    );
    let m = Scrape::parse(&r.body);

    for (name, kind) in METRICS {
        assert_eq!(
            m.types.get(*name).map(String::as_str),
            Some(*kind),
            "TYPE of {name} in:\n{}",
            m.text
        );
        assert!(
            m.text.contains(&format!("# HELP {name} ")),
            "no HELP for {name}"
        );
        if *kind == "histogram" {
            for suffix in ["_sum", "_count"] {
                assert!(m.has_sample(&format!("{name}{suffix}")), "{name}{suffix}");
            }
            let inf = m.value(&format!("{name}_bucket"), &[("le", "+Inf")]);
            assert_eq!(inf, m.value(&format!("{name}_count"), &[]), "{name}");
        } else {
            assert!(m.has_sample(name), "no sample of {name}:\n{}", m.text);
        }
    }

    // Per-domain series from the start, at zero, for each configured domain and
    // for "other".
    for domain in ["alpha.test", "beta.test", "other"] {
        let d = [("domain", domain)];
        assert_eq!(m.value("mxspool_queue_messages", &d), 0.0, "{domain}");
        assert_eq!(m.value("mxspool_queue_oldest_age_seconds", &d), 0.0);
        assert_eq!(m.value("mxspool_recipients_delivered_total", &d), 0.0);
        for result in ["delivered", "deferred", "failed"] {
            assert_eq!(
                m.value(
                    "mxspool_delivery_attempts_total",
                    &[("domain", domain), ("result", result)]
                ),
                0.0
            );
        }
        assert!(
            m.samples
                .iter()
                .any(|(n, l, v)| n == "mxspool_recipients_failed_total"
                    && l.get("domain").map(String::as_str) == Some(domain)
                    && *v == 0.0),
            "no failed series for {domain}"
        );
    }
    for domain in ["alpha.test", "beta.test"] {
        assert_eq!(m.value("mxspool_primary_up", &[("domain", domain)]), 1.0);
    }
    // Only configured domains and "other" as labels: nothing else leaks in.
    for (name, labels, _) in &m.samples {
        if let Some(d) = labels.get("domain") {
            assert!(
                ["alpha.test", "beta.test", "other"].contains(&d.as_str()),
                "{name} has domain {d:?}"
            );
        }
    }
    assert_eq!(m.value("mxspool_queue_bytes", &[]), 0.0);
    assert_eq!(m.value("mxspool_dead_letters", &[]), 0.0);
    assert_eq!(m.value("mxspool_messages_accepted_total", &[]), 0.0);
    assert_eq!(m.value("mxspool_smtp_sessions_active", &[]), 0.0);
    assert_eq!(
        m.value("mxspool_smtp_rejected_total", &[("reason", "relay")]),
        0.0
    );
    assert_eq!(
        m.value("mxspool_dsn_sent_total", &[("kind", "failed")]),
        0.0
    );
}

#[tokio::test]
async fn metrics_follow_the_queue_while_primaries_are_down_and_after_the_drain() {
    const N: usize = 3;
    const M: usize = 2;
    let a = Primary::start().await;
    let b = Primary::start().await;
    a.set_mode(Mode::Down);
    b.set_mode(Mode::Down);
    let t = start(config(&[("alpha.test", &a), ("beta.test", &b)])).await;
    let http = Http::of(&t);
    let base = http.metrics().await;
    let alpha = [("domain", "alpha.test")];
    let beta = [("domain", "beta.test")];
    let other = [("domain", "other")];

    // A session in progress is counted, and a relay attempt refused.
    let mut c = t.ehlo().await;
    wait_for!(
        "the session to be counted",
        http.metrics()
            .await
            .value("mxspool_smtp_sessions_active", &[])
            == 1.0
    );
    c.cmd("MAIL FROM:<s@origin.test>").await.assert(250);
    c.cmd("RCPT TO:<someone@elsewhere.test>")
        .await
        .assert_status(550, "5.7.1");
    c.cmd("RSET").await.assert(250);
    for i in 0..N {
        c.send_mail(
            "s@origin.test",
            &[format!("a{i}@alpha.test").as_str()],
            &message(&format!("alpha {i}")),
        )
        .await
        .queue_id();
    }
    for i in 0..M {
        c.send_mail(
            "s@origin.test",
            &[format!("b{i}@beta.test").as_str()],
            &message(&format!("beta {i}")),
        )
        .await
        .queue_id();
    }
    c.quit().await;
    wait_for!(
        "the session to end",
        http.metrics()
            .await
            .value("mxspool_smtp_sessions_active", &[])
            == 0.0
    );

    let m = http.metrics().await;
    assert_eq!(
        m.value("mxspool_messages_accepted_total", &[]),
        base.value("mxspool_messages_accepted_total", &[]) + (N + M) as f64
    );
    let relay = [("reason", "relay")];
    assert_eq!(
        m.value("mxspool_smtp_rejected_total", &relay),
        base.value("mxspool_smtp_rejected_total", &relay) + 1.0
    );
    assert!(m.value("mxspool_spool_commit_seconds_count", &[]) >= (N + M) as f64);

    // The queue gauges are the queue, whatever delivery is doing.
    assert_eq!(m.value("mxspool_queue_messages", &alpha), N as f64);
    assert_eq!(m.value("mxspool_queue_messages", &beta), M as f64);
    assert_eq!(m.value("mxspool_queue_messages", &other), 0.0);
    let stored = t.stored();
    assert_eq!(stored.len(), N + M);
    let bytes: usize = stored.iter().map(|(_, body)| body.len()).sum();
    assert_eq!(m.value("mxspool_queue_bytes", &[]), bytes as f64);
    let listed_bytes: u64 = http
        .list("")
        .await
        .iter()
        .map(|m| m["size"].as_u64().unwrap())
        .sum();
    assert_eq!(listed_bytes, bytes as u64);

    // Both primaries are seen to be down.
    wait_for!("primary_up to drop", {
        let m = http.metrics().await;
        m.value("mxspool_primary_up", &alpha) == 0.0 && m.value("mxspool_primary_up", &beta) == 0.0
    });
    t.clock.advance(Duration::from_secs(2));
    let m = http.metrics().await;
    for d in [&alpha, &beta] {
        let age = m.value("mxspool_queue_oldest_age_seconds", d);
        assert!((1.0..60.0).contains(&age), "oldest age {age} for {d:?}");
    }
    assert_eq!(m.value("mxspool_queue_oldest_age_seconds", &other), 0.0);
    assert_eq!(m.value("mxspool_queue_messages", &alpha), N as f64);
    assert_eq!(m.value("mxspool_queue_messages", &beta), M as f64);
    assert!(
        m.value(
            "mxspool_delivery_attempts_total",
            &[("domain", "alpha.test"), ("result", "deferred")]
        ) >= 1.0
    );
    assert_eq!(m.value("mxspool_recipients_delivered_total", &alpha), 0.0);

    // Back up: everything drains, and the gauges say so.
    a.set_mode(Mode::Up);
    b.set_mode(Mode::Up);
    assert!(a.wait_for_messages(N, WAIT).await, "alpha did not drain");
    assert!(b.wait_for_messages(M, WAIT).await, "beta did not drain");
    wait_for!("the gauges to return to zero", {
        let m = http.metrics().await;
        m.value("mxspool_queue_messages", &alpha) == 0.0
            && m.value("mxspool_queue_messages", &beta) == 0.0
    });
    let m = http.metrics().await;
    assert_eq!(m.value("mxspool_queue_bytes", &[]), 0.0);
    for d in [&alpha, &beta, &other] {
        assert_eq!(m.value("mxspool_queue_oldest_age_seconds", d), 0.0);
    }
    assert_eq!(m.value("mxspool_primary_up", &alpha), 1.0);
    assert_eq!(m.value("mxspool_primary_up", &beta), 1.0);
    let delivered =
        |s: &Scrape, d: &[(&str, &str)]| s.value("mxspool_recipients_delivered_total", d);
    assert_eq!(delivered(&m, &alpha) - delivered(&base, &alpha), N as f64);
    assert_eq!(delivered(&m, &beta) - delivered(&base, &beta), M as f64);
    assert_eq!(
        delivered(&m, &alpha) + delivered(&m, &beta)
            - delivered(&base, &alpha)
            - delivered(&base, &beta),
        (N + M) as f64
    );
    assert!(
        m.value(
            "mxspool_delivery_attempts_total",
            &[("domain", "alpha.test"), ("result", "delivered")]
        ) >= 1.0
    );
    assert!(m.value("mxspool_delivery_duration_seconds_count", &[]) >= 1.0);
    assert_eq!(
        m.value(
            "mxspool_delivery_duration_seconds_bucket",
            &[("le", "+Inf")]
        ),
        m.value("mxspool_delivery_duration_seconds_count", &[])
    );
    assert_eq!(m.value("mxspool_dead_letters", &[]), 0.0);
    assert_eq!(
        m.value("mxspool_messages_accepted_total", &[]),
        base.value("mxspool_messages_accepted_total", &[]) + (N + M) as f64
    );
    assert!(http.list("").await.is_empty());
}

// ---------------------------------------------------------------------------
// Edge cases of the contract.

#[tokio::test]
async fn flushing_a_domain_whose_primary_is_back_marks_it_up() {
    // No probe in this test's time frame: only the flush brings the mail out.
    let primary = Primary::start().await;
    primary.set_mode(Mode::Down);
    let t =
        start(config(&[("example.com", &primary)]).set("delivery", "probe_interval", r#""1h""#))
            .await;
    let http = Http::of(&t);
    let up = [("domain", "example.com")];
    let id = send(&t, "s@origin.test", &["u@example.com"], "waiting").await;
    wait_for!("deferral", attempted(&http, &id).await);
    wait_for!(
        "primary_up to drop",
        http.metrics().await.value("mxspool_primary_up", &up) == 0.0
    );

    primary.set_mode(Mode::Up);
    let r = http
        .send(
            "POST",
            "/api/queue/flush",
            Some(r#"{"domain": "example.com"}"#),
        )
        .await;
    assert_eq!(r.expect(202), json!({ "flushed": "example.com" }));
    assert!(
        primary.wait_for_messages(1, WAIT).await,
        "flush did not deliver"
    );
    wait_for!("the queue to empty", http.list("").await.is_empty());
    // The primary just took the mail: it is up.
    wait_for!(
        "mxspool_primary_up{domain=\"example.com\"} to return to 1 after a delivery",
        http.metrics().await.value("mxspool_primary_up", &up) == 1.0
    );
}

#[tokio::test]
async fn malformed_input_gets_a_json_400_like_every_other_error() {
    let primary = Primary::start().await;
    let t = start(config(&[("example.com", &primary)])).await;
    let http = Http::of(&t);
    for body in [
        r#"{"domain": "#,
        "not json",
        r#"{"domain": 5}"#,
        r#""example.com""#,
    ] {
        let r = http.send("POST", "/api/queue/flush", Some(body)).await;
        assert!(
            r.status == 400 && r.json_error().is_some(),
            "flush with body {body:?}: want 400 {{\"error\": ...}}, got {r:?}"
        );
    }
    let r = http.get("/api/queue?domain=a.test&domain=b.test").await;
    assert!(
        r.status == 400 && r.json_error().is_some(),
        "duplicate query parameter: want 400 {{\"error\": ...}}, got {r:?}"
    );
    // A method a path does not take, or a path that does not exist, is an
    // error too, and says so in JSON.
    for (method, path, status) in [
        ("PUT", "/api/queue", 405),
        ("DELETE", "/api/queue/flush", 405),
        ("GET", "/api/queue/flush/x", 404),
    ] {
        let r = http.send(method, path, None).await;
        assert!(
            r.status == status && r.json_error().is_some(),
            "{method} {path}: want {status} {{\"error\": ...}}, got {r:?}"
        );
    }
}

#[tokio::test]
async fn requests_without_the_token_are_refused_before_their_input_is_read() {
    let primary = Primary::start().await;
    let t = start(config(&[("example.com", &primary)])).await;
    let http = Http::without_token(&t);
    for body in [r#"{"domain": "#, r#"{"domain": 5}"#] {
        let r = http.send("POST", "/api/queue/flush", Some(body)).await;
        assert_eq!(
            r.status, 401,
            "flush with body {body:?} and no token: {r:?}"
        );
    }
    let r = http.get("/api/queue?domain=a.test&domain=b.test").await;
    assert_eq!(r.status, 401, "list with a bad query and no token: {r:?}");
}

/// The console's sign-in: the token gives an HttpOnly, SameSite=Strict
/// session cookie that `/api` takes instead of the bearer token; with it,
/// anything that changes state must come from our own origin.
#[tokio::test]
async fn console_sessions_and_the_origin_check() {
    let primary = Primary::start().await;
    primary.set_mode(Mode::Down);
    let t = start(config(&[("example.com", &primary)])).await;
    let addr = t.server.http_addr();
    let origin = format!("http://{addr}");
    let send = async |method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>| {
        common::http::request(addr, method, path, headers, body)
            .await
            .expect("an answer")
    };

    // Wrong token, or from another site: no session.
    let wrong = send(
        "POST",
        "/api/session",
        &[("Origin", &origin)],
        Some(r#"{"token": "guess"}"#),
    )
    .await;
    assert!(wrong.expect_error(401).contains("wrong admin token"));
    assert!(wrong.header("set-cookie").is_none());
    let elsewhere = format!(r#"{{"token": "{TOKEN}"}}"#);
    let foreign = send(
        "POST",
        "/api/session",
        &[("Origin", "http://evil.test")],
        Some(&elsewhere),
    )
    .await;
    assert!(foreign.expect_error(403).contains("cross-origin"));

    let signed_in = send(
        "POST",
        "/api/session",
        &[("Origin", &origin)],
        Some(&elsewhere),
    )
    .await;
    signed_in.expect(200);
    let set = signed_in.header("set-cookie").expect("a cookie").to_owned();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap().to_owned();
    assert!(cookie.starts_with("mxspool_session="), "{cookie}");

    // Reading needs only the cookie.
    let listed = send("GET", "/api/queue", &[("Cookie", &cookie)], None).await;
    assert_eq!(listed.expect(200)["count"], 0);
    // Changing needs our own Origin too.
    let no_origin = send("POST", "/api/queue/flush", &[("Cookie", &cookie)], None).await;
    assert!(no_origin.expect_error(403).contains("cross-origin"));
    let forged = send(
        "POST",
        "/api/queue/flush",
        &[("Cookie", &cookie), ("Origin", "http://evil.test")],
        None,
    )
    .await;
    forged.expect_error(403);
    let ours = send(
        "POST",
        "/api/queue/flush",
        &[("Cookie", &cookie), ("Origin", &origin)],
        None,
    )
    .await;
    ours.expect(202);
    // The bearer token needs no Origin (the CLI sends none).
    let auth = format!("Bearer {TOKEN}");
    send(
        "POST",
        "/api/queue/flush",
        &[("Authorization", &auth)],
        None,
    )
    .await
    .expect(202);
    // A forged cookie is no session.
    let fake = send(
        "GET",
        "/api/queue",
        &[("Cookie", "mxspool_session=0123456789abcdef")],
        None,
    )
    .await;
    fake.expect_error(401);

    // Signing out ends it.
    let out = send("DELETE", "/api/session", &[("Cookie", &cookie)], None).await;
    out.expect(200);
    assert!(out.header("set-cookie").unwrap().contains("Max-Age=0"));
    send("GET", "/api/queue", &[("Cookie", &cookie)], None)
        .await
        .expect_error(401);
}
