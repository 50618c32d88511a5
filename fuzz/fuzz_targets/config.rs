//! The config loader on arbitrary text: TOML parsing, the file layer with
//! `deny_unknown_fields` and defaults, and validation into the typed `Config`.
//!
//! Checked: every error names the file and a key; a config that validates
//! prints (`check-config`) to TOML that parses back to an equal `Config`; and
//! the relay policy builds from it and covers every configured domain, and
//! mail for every configured domain can be written as an SMTP path to its
//! primary.
//! Inputs naming a `recipients_file` are skipped: loading reads that file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mxspool::config::{Config, ConfigError};
use mxspool::inbound::policy::Policy;
use mxspool::outbound::fuzz as out;

/// Whether any `[[domain]]` names a recipients file (which the loader reads).
fn names_a_file(text: &str) -> bool {
    let Ok(table) = text.parse::<toml::Table>() else {
        return false;
    };
    let Some(domains) = table.get("domain").and_then(toml::Value::as_array) else {
        return false;
    };
    domains
        .iter()
        .filter_map(toml::Value::as_table)
        .filter_map(|d| d.get("recipients_file"))
        .any(|file| file.as_str() != Some(""))
}

fn check_error(e: &ConfigError) {
    let text = e.to_string();
    assert!(text.starts_with("fuzz.toml: "), "{text}");
    if let ConfigError::Invalid { key, reason, .. } = e {
        assert!(!key.is_empty() && !reason.is_empty(), "{text}");
    }
}

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    if names_a_file(text) {
        return;
    }
    let source = Path::new("fuzz.toml");
    let config = match Config::parse(text, source) {
        Ok(config) => config,
        Err(e) => return check_error(&e),
    };
    let printed = config.to_toml();
    let again = Config::parse(&printed, source)
        .unwrap_or_else(|e| panic!("the printed config does not load: {e}\n{printed}"));
    assert_eq!(
        again, config,
        "printing and loading changed the config:\n{printed}"
    );
    assert_eq!(again.to_toml(), printed);
    let policy = Policy::from_config(&config).expect("a valid config gives a policy");
    for domain in &config.domains {
        assert!(
            policy.relay_domain(&domain.name).is_some(),
            "{}",
            domain.name
        );
        // Mail accepted for a configured domain can be forwarded to its primary.
        let postmaster = format!("postmaster@{}", domain.name);
        assert!(
            out::path(&postmaster, true).is_some(),
            "mail for {:?} is accepted but cannot be forwarded",
            domain.name
        );
    }
});
