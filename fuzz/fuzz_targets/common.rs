//! What the fuzz targets share (each includes this file with `#[path]`): the
//! relay policy of the inbound targets, and checks on bytes and replies.
#![allow(dead_code)]

use std::path::Path;
use std::sync::LazyLock;

use mxspool::config::Config;
use mxspool::inbound::policy::Policy;
use mxspool::inbound::reply::Reply;

/// Small, so that inputs of a few kilobytes reach the limits.
pub const MAX_MESSAGE_SIZE: u64 = 2000;
pub const MAX_RECIPIENTS: usize = 5;
pub const MAX_RECEIVED_HEADERS: usize = 5;
pub const POSTMASTER: &str = "postmaster@example.net";

/// example.com takes anyone; example.org and its subdomains only alice and
/// bob@example.org; verify.test learns its users from the primary and
/// tempfails unseen ones while the primary is down. ETRN from loopback only.
pub const POLICY: &str = r#"
[server]
hostname = "mx2.test"
max_message_size = 2000
max_recipients = 5
max_received_headers = 5
etrn_allow = ["127.0.0.0/8"]

[delivery]
postmaster = "postmaster@example.net"

[[domain]]
name = "example.com"

[[domain]]
name = "example.org"
include_subdomains = true
recipients = ["alice", "bob@example.org"]

[[domain]]
name = "verify.test"
verify_recipients = true
unknown_recipients = "tempfail"
"#;

pub fn policy() -> &'static Policy {
    static POLICY_VALUE: LazyLock<Policy> = LazyLock::new(|| {
        let config = Config::parse(POLICY, Path::new("fuzz.toml")).expect("the fuzz policy parses");
        Policy::from_config(&config).expect("the fuzz policy builds")
    });
    &POLICY_VALUE
}

/// The relay domains of [`POLICY`], written out independently of the policy
/// code (`domain` as stored: lower case, no trailing dot).
pub fn is_relay_domain(domain: &str) -> bool {
    domain == "example.com"
        || domain == "example.org"
        || domain.ends_with(".example.org")
        || domain == "verify.test"
}

/// Only CRLF line endings: every CR is followed by LF, every LF preceded by CR.
pub fn only_crlf(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => bytes.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && bytes[i - 1] == b'\r',
        _ => true,
    })
}

/// A reply we send can go on the wire as it is: a 2xx–5xx code, an enhanced
/// code of the same class, text without control characters (HT aside), and
/// the rendered bytes one CRLF-terminated line per text line.
pub fn check_reply(reply: &Reply) {
    assert!((200..=599).contains(&reply.code), "{reply:?}");
    assert!(!reply.lines.is_empty(), "{reply:?}");
    for line in &reply.lines {
        assert!(
            !line.chars().any(|c| c.is_control() && c != '\t'),
            "control character in reply text: {reply:?}"
        );
    }
    if !reply.status.is_empty() {
        let parts: Vec<&str> = reply.status.split('.').collect();
        assert!(
            parts.len() == 3
                && parts
                    .iter()
                    .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit())),
            "{reply:?}"
        );
        assert_eq!(
            u16::from(parts[0].as_bytes()[0] - b'0'),
            reply.code / 100,
            "{reply:?}"
        );
    }
    let mut wire = Vec::new();
    reply.write_to(&mut wire);
    assert!(only_crlf(&wire) && wire.ends_with(b"\r\n"), "{wire:?}");
    let lines: Vec<&[u8]> = wire.split_inclusive(|&b| b == b'\n').collect();
    assert_eq!(lines.len(), reply.lines.len(), "{wire:?}");
    let code = reply.code.to_string();
    for (i, line) in lines.iter().enumerate() {
        assert!(line.starts_with(code.as_bytes()), "{wire:?}");
        let sep = if i + 1 == lines.len() { b' ' } else { b'-' };
        assert_eq!(line[3], sep, "{wire:?}");
    }
}
