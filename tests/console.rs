//! The web console in a real browser: Debian's Chromium, driven by
//! Playwright (`tests/console/drive.mjs`, `playwright-core` from npm, which
//! `.ci/run` installs), against a real server and primary. Sign-in (a wrong
//! token refused), three queued messages for a domain whose primary is down,
//! one held, a flush that delivers the other two once the primary is up, the
//! release of the held one; no error in the page. Also the assets' headers.

mod common;
mod primary;

use std::process::Stdio;
use std::time::Duration;

use common::http::request;
use common::{TestConfig, TestServer};
use primary::{Mode, Primary};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const TOKEN: &str = "console-admin-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_signs_in_shows_the_queue_and_acts_on_it() {
    let primary = Primary::start().await;
    primary.set_mode(Mode::Down);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("admin-token"), format!("{TOKEN}\n")).unwrap();
    let t = TestServer::start_in(
        dir,
        TestConfig::default()
            .set("http", "admin_token_file", r#""{dir}/admin-token""#)
            .set("delivery", "probe_interval", r#""200ms""#)
            .set("delivery", "retry_initial", r#""1h""#)
            .set("delivery", "retry_max", r#""2h""#)
            .domains(&format!(
                "[[domain]]\nname = \"example.com\"\nroute = \"[127.0.0.1]:{}\"\n",
                primary.addr.port()
            )),
    )
    .await;
    let mut c = t.ehlo().await;
    for i in 0..3 {
        c.send_mail(
            "sender@origin.test",
            &[&format!("user{i}@example.com")],
            format!("Subject: console {i}\r\n\r\nbody {i}\r\n").as_bytes(),
        )
        .await
        .assert(250);
    }
    c.quit().await;

    // The page and its assets come with a strict policy.
    let addr = t.server.http_addr();
    let page = request(addr, "GET", "/", &[], None).await.unwrap();
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<title>mxspool</title>"));
    let csp = page.header("content-security-policy").unwrap_or_default();
    assert!(csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"));
    let script = request(addr, "GET", "/console.js", &[], None)
        .await
        .unwrap();
    assert!(
        script
            .header("content-type")
            .unwrap()
            .starts_with("text/javascript")
    );

    let screenshot = t.dir.path().join("overview.png");
    let mut node = tokio::process::Command::new("node")
        .arg("drive.mjs")
        .arg(format!("http://{addr}/"))
        .arg(TOKEN)
        .arg(&screenshot)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/console"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs (and tests/console has playwright-core: npm ci there)");
    let mut stdin = node.stdin.take().unwrap();
    let mut out = BufReader::new(node.stdout.take().unwrap()).lines();
    let mut transcript = Vec::new();
    let run = async {
        while let Some(line) = out.next_line().await.unwrap() {
            if line.starts_with("HELD ") {
                primary.set_mode(Mode::Up);
                stdin.write_all(b"go\n").await.unwrap();
            }
            transcript.push(line);
        }
        node.wait().await.unwrap()
    };
    let status = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("the browser run finishes within 4 minutes");
    assert!(
        status.success() && transcript.last().map(String::as_str) == Some("OK"),
        "{}",
        transcript.join("\n")
    );
    assert!(std::fs::metadata(&screenshot).unwrap().len() > 1000);
    // `MXSPOOL_CONSOLE_SCREENSHOT=docs/console.png` refreshes the picture
    // in the documentation.
    if let Some(keep) = std::env::var_os("MXSPOOL_CONSOLE_SCREENSHOT") {
        std::fs::copy(&screenshot, keep).expect("copy the screenshot");
    }
    // All three reached the primary: two by the flush, the held one on release.
    assert!(primary.wait_for_messages(3, Duration::from_secs(10)).await);
    assert_eq!(t.spool().stats().messages, 0);
}
