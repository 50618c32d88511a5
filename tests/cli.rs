//! The operator's commands end to end: the real `mxspool` binary, given a
//! config file, against a real server's admin API on loopback. Checks what
//! the operator sees (stdout, the one-line reason on stderr, the exit status)
//! and, through the spool, that the commands did what they said.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{TestConfig, TestServer};
use mxspool::spool::{Change, Envelope, QueueId};
use serde_json::Value;

const TOKEN: &str = "s3cret-admin-token";

/// What one run of the binary left behind.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    #[track_caller]
    fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "{self:?}");
        assert_eq!(self.stderr, "", "{self:?}");
        &self.stdout
    }

    /// Exit status `code` and exactly one line on stderr; returns it without
    /// the newline.
    #[track_caller]
    fn failed(&self, code: i32) -> &str {
        assert_eq!(self.code, code, "{self:?}");
        assert_eq!(self.stdout, "", "{self:?}");
        let line = self
            .stderr
            .strip_suffix('\n')
            .unwrap_or_else(|| panic!("stderr ends in a newline: {self:?}"));
        assert!(!line.contains('\n'), "one line on stderr: {self:?}");
        line
    }

    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(self.ok()).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// Runs `mxspool -c CONFIG ARGS…` with no help from the environment.
async fn mxspool(config: &Path, args: &[&str]) -> Run {
    run(&[&["-c", config.to_str().unwrap()], args].concat(), None).await
}

async fn run(args: &[&str], env_config: Option<&Path>) -> Run {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_mxspool"));
    command.args(args).env_remove("MXSPOOL_CONFIG");
    for proxy in ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"] {
        command.env(proxy, "http://127.0.0.1:9/");
    }
    if let Some(path) = env_config {
        command.env("MXSPOOL_CONFIG", path);
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

/// The test config plus an admin token file holding [`TOKEN`].
async fn start() -> TestServer {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("admin-token"), format!("{TOKEN}\n")).unwrap();
    TestServer::start_in(
        dir,
        TestConfig::default().set("http", "admin_token_file", r#""{dir}/admin-token""#),
    )
    .await
}

/// Writes `name`, a config for the CLI: the server's, but with `http.listen`
/// where the server really listens (it bound port 0) and `token_file` (a
/// file in the test's directory) as the admin token.
fn cli_config(t: &TestServer, name: &str, listen: SocketAddr, token: Option<&str>) -> PathBuf {
    let mut config = TestConfig::default().set("http", "listen", &format!("\"{listen}\""));
    if let Some(token) = token {
        let file = t.dir.path().join(format!("{name}.token"));
        std::fs::write(&file, format!("  {token}\n")).unwrap();
        config = config.set("http", "admin_token_file", &format!("{:?}", file));
    }
    let path = t.dir.path().join(name);
    std::fs::write(&path, config.render(t.dir.path())).unwrap();
    path
}

/// The config an operator on the server's host would use.
fn operator(t: &TestServer) -> PathBuf {
    cli_config(t, "operator.toml", t.server.http_addr(), Some(TOKEN))
}

/// A loopback port where nothing listens.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

async fn send(t: &TestServer, from: &str, to: &[&str], subject: &str) -> QueueId {
    let mut c = t.ehlo().await;
    let content = format!("Subject: {subject}\r\nFrom: <{from}>\r\n\r\nhello\r\n");
    let id = c.send_mail(from, to, content.as_bytes()).await.queue_id();
    c.quit().await;
    id
}

/// Waits until `id`'s envelope satisfies `done` (nothing listens at the
/// test route, so attempts fail fast and the mail stays).
async fn wait_for(t: &TestServer, id: QueueId, done: impl Fn(&Envelope) -> bool) -> Envelope {
    common::eventually(Duration::from_secs(10), async || {
        match t.spool().envelope(id).expect("read spool") {
            Some(env) if done(&env) => Ok(env),
            other => Err(format!("{id} not there yet: {other:?}")),
        }
    })
    .await
}

fn attempted(env: &Envelope) -> bool {
    env.recipients.iter().all(|r| r.attempts >= 1)
}

fn ids(list: &Value) -> Vec<&str> {
    list["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["id"].as_str().expect("id"))
        .collect()
}

#[tokio::test]
async fn an_empty_queue() {
    let t = start().await;
    let cli = operator(&t);
    assert_eq!(
        mxspool(&cli, &["queue", "list"]).await.ok(),
        "queue is empty\n"
    );
    let json = mxspool(&cli, &["queue", "list", "--json"]).await;
    assert_eq!(json.json(), serde_json::json!({"messages": [], "count": 0}));
    assert_eq!(json.stdout, "{\n  \"count\": 0,\n  \"messages\": []\n}\n");
    assert_eq!(
        mxspool(&cli, &["dead", "list"]).await.ok(),
        "no dead letters\n"
    );
}

#[tokio::test]
async fn listing_queued_mail() {
    let t = start().await;
    let cli = operator(&t);
    let first = send(
        &t,
        "alice@origin.test",
        &["bob@example.com", "carol@example.com"],
        "one",
    )
    .await;
    let second = send(&t, "dave@origin.test", &["alice@listed.test"], "two").await;
    wait_for(&t, first, attempted).await;
    wait_for(&t, second, attempted).await;

    let table = mxspool(&cli, &["queue", "list"]).await;
    let lines: Vec<&str> = table.ok().lines().collect();
    assert_eq!(lines.len(), 5, "header, three recipients, count: {table:?}");
    for column in [
        "ID",
        "AGE",
        "SIZE",
        "SENDER",
        "RECIPIENT",
        "STATUS",
        "TRIES",
        "LAST REPLY",
    ] {
        assert!(lines[0].contains(column), "{table:?}");
    }
    assert!(lines[1].starts_with(&first.to_string()), "{table:?}");
    for text in ["alice@origin.test", "bob@example.com", "queued", " B  "] {
        assert!(lines[1].contains(text), "{text}: {table:?}");
    }
    assert!(lines[1].contains("s  "), "an age in seconds: {table:?}");
    assert!(
        lines[2].trim_start().starts_with("carol@example.com"),
        "{table:?}"
    );
    assert!(lines[3].starts_with(&second.to_string()), "{table:?}");
    assert_eq!(lines[4], "2 messages");

    let all = mxspool(&cli, &["queue", "list", "--json"]).await;
    let all_text = all.ok();
    let all = all.json();
    assert_eq!(
        all_text,
        serde_json::to_string_pretty(&all).unwrap() + "\n",
        "the server's JSON, indented"
    );
    assert_eq!(all["count"], 2);
    assert_eq!(ids(&all), [first.to_string(), second.to_string()]);
    let bob = &all["messages"][0]["recipients"][0];
    assert_eq!(bob["address"], "bob@example.com");
    assert_eq!(bob["status"], "queued");
    assert!(bob["attempts"].as_u64().unwrap() >= 1, "{bob}");
    assert!(bob["last_reply"].is_string(), "{bob}");

    // Filters reach the server; -c also works after the subcommand.
    let listed = run(
        &[
            "queue",
            "list",
            "--domain",
            "listed.test",
            "--json",
            "-c",
            cli.to_str().unwrap(),
        ],
        None,
    )
    .await
    .json();
    assert_eq!(ids(&listed), [second.to_string()]);
    let held = mxspool(&cli, &["queue", "list", "--state", "held"]).await;
    assert_eq!(held.ok(), "no queued message matches\n");
    let deferred = mxspool(&cli, &["queue", "list", "--state", "deferred", "--json"]).await;
    assert_eq!(deferred.json()["count"], 2);
    let bad = mxspool(&cli, &["queue", "list", "--state", "stuck"]).await;
    assert_eq!(bad.code, 2, "clap rejects it: {bad:?}");

    // $MXSPOOL_CONFIG stands in for -c.
    let from_env = run(&["queue", "list"], Some(&cli)).await;
    assert_eq!(from_env.ok(), table.stdout);
}

#[tokio::test]
async fn showing_a_message() {
    let t = start().await;
    let cli = operator(&t);
    let id = send(&t, "alice@origin.test", &["bob@example.com"], "hello there").await;
    wait_for(&t, id, attempted).await;
    let id = id.to_string();

    let shown = mxspool(&cli, &["queue", "show", &id]).await;
    let text = shown.ok();
    for expected in [
        format!("ID:       {id}\n"),
        "Sender:   alice@origin.test\n".to_owned(),
        "State:    in delivery\n".to_owned(),
        "\nRecipients:\n  bob@example.com\n    status:       queued, 1 attempt".to_owned(),
        "    next attempt: in ".to_owned(),
        "    last reply:   ".to_owned(),
        "\nHeaders:\nReceived: from client.test".to_owned(),
        "Subject: hello there\n".to_owned(),
    ] {
        assert!(text.contains(&expected), "{expected:?} in:\n{text}");
    }
    assert!(!text.contains('\r'), "{text:?}");

    let json = mxspool(&cli, &["queue", "show", &id, "--json"])
        .await
        .json();
    assert_eq!(json["id"], id.as_str());
    assert!(
        json["headers"]
            .as_str()
            .unwrap()
            .contains("Subject: hello there\r\n")
    );
    assert_eq!(json["recipients"][0]["notify"], serde_json::json!([]));

    // Unparsable: the server's reason. Gone: "no message".
    let bad = mxspool(&cli, &["queue", "show", "not-an-id"]).await;
    assert!(bad.failed(1).starts_with("mxspool: "), "{bad:?}");
    mxspool(&cli, &["queue", "delete", &id]).await.ok();
    let gone = mxspool(&cli, &["queue", "show", &id]).await;
    assert_eq!(gone.failed(1), format!("mxspool: no message {id}"));
}

#[tokio::test]
async fn hold_release_and_delete() {
    let t = start().await;
    let cli = operator(&t);
    let id = send(&t, "alice@origin.test", &["bob@example.com"], "hold me").await;
    wait_for(&t, id, attempted).await;
    let id = id.to_string();

    assert_eq!(
        mxspool(&cli, &["queue", "hold", &id]).await.ok(),
        format!("held {id}\n")
    );
    let held = mxspool(&cli, &["queue", "list", "--state", "held", "--json"])
        .await
        .json();
    assert_eq!(ids(&held), [id.as_str()]);
    assert_eq!(held["messages"][0]["held"], true);
    let table = mxspool(&cli, &["queue", "list"]).await;
    assert!(table.ok().contains(" held "), "{table:?}");
    assert!(table.stdout.ends_with("1 message (1 held)\n"), "{table:?}");
    let shown = mxspool(&cli, &["queue", "show", &id]).await;
    assert!(
        shown.ok().contains("next attempt: when released\n"),
        "{shown:?}"
    );
    let again = mxspool(&cli, &["queue", "hold", &id]).await;
    assert_eq!(again.failed(1), format!("mxspool: {id} is already held"));

    let released = mxspool(&cli, &["queue", "release", &id]).await;
    assert_eq!(released.ok(), format!("released {id}: due now\n"));
    let queued = mxspool(&cli, &["queue", "list", "--state", "held", "--json"])
        .await
        .json();
    assert_eq!(queued["count"], 0);
    let again = mxspool(&cli, &["queue", "release", &id]).await;
    assert_eq!(again.failed(1), format!("mxspool: {id} is not held"));

    assert_eq!(
        mxspool(&cli, &["queue", "delete", &id]).await.ok(),
        format!("deleted {id}\n")
    );
    assert!(t.stored().is_empty());
    assert_eq!(
        mxspool(&cli, &["queue", "list"]).await.ok(),
        "queue is empty\n"
    );
    for verb in ["delete", "hold", "release", "bounce"] {
        let gone = mxspool(&cli, &["queue", verb, &id]).await;
        assert_eq!(
            gone.failed(1),
            format!("mxspool: no message {id}"),
            "{verb}"
        );
    }
}

#[tokio::test]
async fn flush_makes_deferred_mail_due_now() {
    let t = start().await;
    let cli = operator(&t);
    let id = send(&t, "alice@origin.test", &["bob@example.com"], "again").await;
    let before = wait_for(&t, id, attempted).await.recipients[0].attempts;

    let all = mxspool(&cli, &["queue", "flush"]).await;
    assert_eq!(all.ok(), "all queued mail is due now\n");
    wait_for(&t, id, |e| e.recipients[0].attempts > before).await;

    let before = before + 1;
    let one = mxspool(&cli, &["queue", "flush", "Example.COM"]).await;
    assert_eq!(one.ok(), "queued mail for example.com is due now\n");
    wait_for(&t, id, |e| e.recipients[0].attempts > before).await;
}

#[tokio::test]
async fn bounce_returns_mail_to_the_sender() {
    let t = start().await;
    let cli = operator(&t);
    let id = send(
        &t,
        "alice@example.com",
        &["bob@example.com", "carol@example.com"],
        "back",
    )
    .await;
    wait_for(&t, id, attempted).await;
    let id = id.to_string();

    let bounced = mxspool(&cli, &["queue", "bounce", &id]).await;
    assert_eq!(bounced.ok(), format!("bounced {id}: 2 recipients failed\n"));
    let list = mxspool(&cli, &["queue", "list", "--json"]).await.json();
    assert!(!ids(&list).contains(&id.as_str()), "{list}");
    let notice = &list["messages"][0];
    assert_eq!(notice["sender"], "", "{list}");
    assert_eq!(notice["recipients"][0]["address"], "alice@example.com");
    let table = mxspool(&cli, &["queue", "list"]).await;
    assert!(table.ok().contains("  <>  "), "{table:?}");
}

#[tokio::test]
async fn dead_letters() {
    let t = start().await;
    let cli = operator(&t);
    let id = send(&t, "alice@origin.test", &["bob@example.com"], "nowhere").await;
    wait_for(&t, id, attempted).await;
    t.spool()
        .change(id, Change::Bury, Vec::new())
        .await
        .unwrap();
    let id_text = id.to_string();

    let table = mxspool(&cli, &["dead", "list"]).await;
    let text = table.ok();
    assert!(text.contains(&id_text), "{table:?}");
    assert!(text.ends_with("\n1 dead letter\n"), "{table:?}");
    let json = mxspool(&cli, &["dead", "list", "--json"]).await.json();
    assert_eq!(ids(&json), [id_text.as_str()]);
    assert_eq!(
        mxspool(&cli, &["queue", "list"]).await.ok(),
        "queue is empty\n"
    );

    let requeued = mxspool(&cli, &["dead", "requeue", &id_text]).await;
    assert_eq!(requeued.ok(), format!("requeued {id_text}: due now\n"));
    assert_eq!(
        mxspool(&cli, &["dead", "list"]).await.ok(),
        "no dead letters\n"
    );
    let queued = mxspool(&cli, &["queue", "list", "--json"]).await.json();
    assert_eq!(ids(&queued), [id_text.as_str()]);

    wait_for(&t, id, attempted).await;
    t.spool()
        .change(id, Change::Bury, Vec::new())
        .await
        .unwrap();
    let deleted = mxspool(&cli, &["dead", "delete", &id_text]).await;
    assert_eq!(deleted.ok(), format!("deleted {id_text}\n"));
    assert_eq!(
        mxspool(&cli, &["dead", "list"]).await.ok(),
        "no dead letters\n"
    );
    let gone = mxspool(&cli, &["dead", "delete", &id_text]).await;
    assert_eq!(gone.failed(1), format!("mxspool: no message {id_text}"));
}

#[tokio::test]
async fn a_wrong_or_missing_token_is_refused() {
    let t = start().await;
    let wrong = cli_config(&t, "wrong.toml", t.server.http_addr(), Some("guess"));
    for args in [
        &["queue", "list"][..],
        &["queue", "flush"],
        &["dead", "list", "--json"],
    ] {
        let run = mxspool(&wrong, args).await;
        assert_eq!(
            run.failed(1),
            "mxspool: the admin token was refused (http.admin_token_file)",
            "{args:?}"
        );
    }
    let none = cli_config(&t, "none.toml", t.server.http_addr(), None);
    let run = mxspool(&none, &["queue", "list"]).await;
    assert_eq!(
        run.failed(1),
        "mxspool: the server wants an admin token: set http.admin_token_file"
    );
}

#[tokio::test]
async fn a_disabled_api_says_so() {
    let t = TestServer::start(TestConfig::default()).await;
    let cli = operator(&t);
    let run = mxspool(&cli, &["queue", "list"]).await;
    assert_eq!(
        run.failed(1),
        "mxspool: the admin API is disabled: set http.admin_token_file"
    );
}

#[tokio::test]
async fn an_unreadable_token_file_is_a_config_error() {
    let t = start().await;
    let cli = cli_config(&t, "operator.toml", t.server.http_addr(), None);
    let text = std::fs::read_to_string(&cli).unwrap().replace(
        "[http]\n",
        &format!(
            "[http]\nadmin_token_file = \"{}/missing\"\n",
            t.dir.path().display()
        ),
    );
    std::fs::write(&cli, text).unwrap();
    let run = mxspool(&cli, &["queue", "list"]).await;
    let line = run.failed(2);
    assert!(
        line.starts_with(&format!(
            "mxspool: {}: http.admin_token_file: cannot read ",
            cli.display()
        )),
        "{run:?}"
    );
}

#[tokio::test]
async fn a_server_that_is_not_there() {
    let t = start().await;
    let port = closed_port();
    let cli = cli_config(
        &t,
        "down.toml",
        SocketAddr::from(([127, 0, 0, 1], port)),
        Some(TOKEN),
    );
    let expected =
        format!("mxspool: cannot reach the server at http://127.0.0.1:{port}: connection refused");
    for args in [
        &["queue", "list"][..],
        &["queue", "hold", "0KXW3J5M7P2QR"],
        &["dead", "list"],
        &["health"],
    ] {
        assert_eq!(mxspool(&cli, args).await.failed(1), expected, "{args:?}");
    }
}

#[tokio::test]
async fn health() {
    let t = start().await;
    // No token needed; a wildcard listen address means loopback.
    let port = t.server.http_addr().port();
    let wildcard = cli_config(&t, "any.toml", SocketAddr::from(([0, 0, 0, 0], port)), None);
    let up = mxspool(&wildcard, &["health"]).await;
    assert_eq!(
        (up.code, up.stdout.as_str(), up.stderr.as_str()),
        (0, "", "")
    );
    assert_eq!(mxspool(&wildcard, &["queue", "list"]).await.code, 1);
    assert_eq!(
        mxspool(&operator(&t), &["queue", "list"]).await.ok(),
        "queue is empty\n"
    );

    let t = start().await;
    let cli = operator(&t);
    let addr = t.server.http_addr();
    t.server.shutdown(Duration::from_secs(5)).await;
    let down = mxspool(&cli, &["health"]).await;
    assert_eq!(
        down.failed(1),
        format!("mxspool: cannot reach the server at http://{addr}: connection refused")
    );
}

#[tokio::test]
async fn a_bad_config_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(&path, "[http]\nlisten = \"not an address\"\n").unwrap();
    for args in [
        &["queue", "list"][..],
        &["queue", "show", "0KXW3J5M7P2QR"],
        &["dead", "list"],
    ] {
        let run = mxspool(&path, args).await;
        let line = run.failed(2);
        assert!(
            line.starts_with(&format!("mxspool: {}: ", path.display())),
            "{run:?}"
        );
    }
    let missing = mxspool(&dir.path().join("absent.toml"), &["queue", "list"]).await;
    assert!(missing.failed(2).contains("absent.toml"), "{missing:?}");
    // Docker reserves a HEALTHCHECK's status 2: health fails with 1.
    let health = mxspool(&path, &["health"]).await;
    assert!(health.failed(1).starts_with("mxspool: "), "{health:?}");
}

#[tokio::test]
async fn fetch_now_runs_a_fetch_and_says_how_it_went() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("admin-token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(dir.path().join("isp.password"), "pw\n").unwrap();
    // A mailbox server nobody runs: every run fails to connect.
    let t = TestServer::start_in(
        dir,
        TestConfig::default()
            .set("http", "admin_token_file", r#""{dir}/admin-token""#)
            .append(&format!(
                "[[fetch]]\nname = \"isp\"\nprotocol = \"pop3\"\nserver = \"127.0.0.1:{}\"\n\
                 tls = \"none\"\nusername = \"u\"\npassword_file = \"{{dir}}/isp.password\"\n\
                 domains = [\"example.com\"]\ninterval = \"1h\"\n",
                closed_port()
            )),
    )
    .await;
    // The operator's own config has no [[fetch]] block to run "all" of.
    let config = operator(&t);
    let none = mxspool(&config, &["fetch", "now"]).await;
    assert!(
        none.failed(1).contains("has no [[fetch]] blocks"),
        "{none:?}"
    );

    let run = mxspool(&config, &["fetch", "now", "isp"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stdout
            .starts_with("isp: fetched 0, queued 0, to the postmaster 0"),
        "{run:?}"
    );
    assert!(run.stdout.contains("failed: cannot connect"), "{run:?}");
    assert_eq!(run.stderr, "mxspool: fetch failed: isp\n", "{run:?}");

    let missing = mxspool(&config, &["fetch", "now", "nope"]).await;
    assert!(
        missing
            .failed(1)
            .contains("no [[fetch]] block named \"nope\" (configured: isp)"),
        "{missing:?}"
    );
}

/// What a newcomer does first: `serve` on a fresh directory with a config
/// that names an admin token file that does not exist yet, then `queue list`
/// with the same config. The server creates the token (owner-only), and the
/// command finds it there.
#[tokio::test]
async fn the_first_run_needs_no_token_set_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let http = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let config = TestConfig::default()
        .set("http", "listen", &format!("\"{http}\""))
        .set("http", "admin_token_file", r#""{dir}/data/admin-token""#);
    let path = dir.path().join("mxspool.toml");
    std::fs::write(&path, config.render(dir.path())).unwrap();
    let token_file = dir.path().join("data/admin-token");
    assert!(!token_file.exists());

    let mut server = std::process::Command::new(env!("CARGO_BIN_EXE_mxspool"))
        .args(["serve", "-c"])
        .arg(&path)
        .env_remove("MXSPOOL_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start mxspool");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let listed = loop {
        let run = mxspool(&path, &["queue", "list"]).await;
        if run.code == 0 || tokio::time::Instant::now() > deadline {
            break run;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = server.kill();
    let output = server.wait_with_output().expect("mxspool stopped");
    let log = String::from_utf8_lossy(&output.stderr);
    assert_eq!(listed.ok(), "queue is empty\n", "{listed:?}\n{log}");

    let token = std::fs::read_to_string(&token_file).unwrap();
    assert_eq!(token.trim().len(), 64, "{token:?}");
    assert!(token.trim().bytes().all(|b| b.is_ascii_hexdigit()));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // The log names the file, never the token.
    assert!(log.contains("created a new admin token"), "{log}");
    assert!(log.contains("data/admin-token"), "{log}");
    assert!(!log.contains(token.trim()), "{log}");
}

/// A token file that exists is the operator's: a restart never replaces it.
#[tokio::test]
async fn an_existing_token_file_is_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config =
        || TestConfig::default().set("http", "admin_token_file", r#""{dir}/data/admin-token""#);
    let t = TestServer::start_in(dir, config()).await;
    let file = t.dir.path().join("data/admin-token");
    let first = std::fs::read_to_string(&file).expect("created at startup");
    let dir = t.dir;
    t.server.shutdown(Duration::from_secs(5)).await;
    let t = TestServer::start_in(dir, config()).await;
    assert_eq!(std::fs::read_to_string(&file).unwrap(), first);
    // The commands use the same file and are let in.
    let own = cli_config(&t, "own.toml", t.server.http_addr(), None);
    let mut text = std::fs::read_to_string(&own).unwrap();
    text = text.replace(
        "[http]\n",
        &format!(
            "[http]\nadmin_token_file = {:?}\n",
            file.display().to_string()
        ),
    );
    std::fs::write(&own, text).unwrap();
    assert_eq!(
        mxspool(&own, &["queue", "list"]).await.ok(),
        "queue is empty\n"
    );
}
