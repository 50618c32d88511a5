//! Every shipped configuration parses, and every broken fixture fails with the
//! message it promises (its first line: `# expect: <text>`).

use std::path::{Path, PathBuf};

use mxspool::config::Config;

fn toml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn example_config_is_valid_and_runs_without_root() {
    let config = Config::load(Path::new("config.example.toml")).unwrap();
    assert!(config.server.listen.iter().all(|a| a.port() >= 1024));
    assert!(config.spool.path.starts_with("./data"));
    assert_eq!(config.http.listen.to_string(), "127.0.0.1:9090");
    // The printed effective config is itself a valid config.
    let printed = config.to_toml();
    assert_eq!(
        Config::parse(&printed, Path::new("printed"))
            .unwrap()
            .server,
        config.server
    );
}

#[test]
fn container_config_is_valid() {
    let config = Config::load(Path::new("docker/config.toml")).unwrap();
    assert_eq!(config.spool.path, Path::new("/var/lib/mxspool/spool.redb"));
    // Reachable from other containers; SMTP above 1024 so no root is needed.
    assert!(config.http.listen.ip().is_unspecified());
    assert!(config.server.listen.iter().all(|a| a.port() == 2525));
}

#[test]
fn valid_fixtures_parse() {
    let files = toml_files("tests/fixtures/config/valid");
    assert!(files.len() >= 3, "found only {files:?}");
    for file in files {
        if let Err(e) = Config::load(&file) {
            panic!("{}: {e}", file.display());
        }
    }
}

#[test]
fn invalid_fixtures_fail_with_their_promised_message() {
    let files = toml_files("tests/fixtures/config/invalid");
    assert!(files.len() >= 10, "found only {files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: first line must be '# expect: ...'", file.display()));
        match Config::load(&file) {
            Ok(_) => panic!("{} parsed but should fail", file.display()),
            Err(e) => {
                let message = e.to_string();
                assert!(
                    message.starts_with(&file.display().to_string()),
                    "{}: error does not name the file: {message}",
                    file.display()
                );
                assert!(
                    message.contains(expect),
                    "{}: expected {expect:?} in {message:?}",
                    file.display()
                );
            }
        }
    }
}
