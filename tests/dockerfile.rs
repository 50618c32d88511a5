//! The Docker image cannot be built on machines without a Docker engine, so
//! the Dockerfile is checked against what it relies on: the commands its
//! ENTRYPOINT, CMD and HEALTHCHECK run exist in the CLI, the config it copies
//! is valid, and it builds the way CI does (`cargo build --release --locked`).

use std::process::Command;

fn dockerfile() -> String {
    std::fs::read_to_string("Dockerfile").expect("Dockerfile")
}

/// The JSON-array arguments of the first line starting with `instruction`.
fn exec_form(text: &str, instruction: &str) -> Vec<String> {
    let joined = text.replace("\\\n", " ");
    let line = joined
        .lines()
        .find(|l| l.trim_start().starts_with(instruction))
        .unwrap_or_else(|| panic!("no {instruction} in the Dockerfile"));
    let array = &line[line.find('[').expect("exec form")..=line.rfind(']').expect("exec form")];
    serde_json::from_str(array).unwrap_or_else(|e| panic!("{instruction}: {array}: {e}"))
}

#[test]
fn entrypoint_cmd_and_healthcheck_are_real_commands() {
    let text = dockerfile();
    let entrypoint = exec_form(&text, "ENTRYPOINT");
    let cmd = exec_form(&text, "CMD");
    let health = exec_form(&text, "HEALTHCHECK");
    assert_eq!(entrypoint, ["mxspool"]);
    assert_eq!(health[0], "mxspool");
    let bin = env!("CARGO_BIN_EXE_mxspool");
    for args in [cmd.clone(), health[1..].to_vec()] {
        let out = Command::new(bin)
            .args(&args)
            .arg("--help")
            .output()
            .expect("run mxspool");
        assert!(
            out.status.success(),
            "`mxspool {} --help` fails: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(cmd, ["serve"]);
}

#[test]
fn builds_like_ci_runs_unprivileged_and_keeps_the_spool_in_a_volume() {
    let text = dockerfile();
    assert!(text.contains("cargo build --release --locked"));
    assert!(text.contains("target/release/mxspool"));
    assert!(
        text.contains("FROM rust:1.95-"),
        "build stage matches the toolchain"
    );
    assert!(text.lines().any(|l| l.trim() == "USER mxspool"));
    assert!(text.contains("VOLUME [\"/var/lib/mxspool\"]"));
    assert!(text.contains("ENV MXSPOOL_CONFIG=/etc/mxspool/config.toml"));
    assert!(text.contains("COPY docker/config.toml /etc/mxspool/config.toml"));
    let ci = std::fs::read_to_string(".ci/run").unwrap();
    assert!(ci.contains("cargo test --locked"));
}
