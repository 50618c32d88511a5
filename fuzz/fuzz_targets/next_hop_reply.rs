//! Replies from a next hop, pure: finding where a reply ends in the bytes
//! read so far, parsing it (smtp-proto's client side), reading EHLO
//! extensions, and classifying code and enhanced code.
//!
//! Checked: reply boundaries fall on line ends inside the input; a parsed
//! reply renders as one line (it goes into logs, `last_reply` and DSNs'
//! `Diagnostic-Code:`); a status derived from it is `class.subject.detail`
//! with the class of the reply code.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxspool::outbound::fuzz as out;
use mxspool::outbound::{Class, classify};

fn check_status(status: &str, code: u16) {
    let parts: Vec<&str> = status.split('.').collect();
    assert_eq!(parts.len(), 3, "{status:?}");
    assert!(
        parts
            .iter()
            .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit())),
        "{status:?}"
    );
    assert_eq!(parts[0], (code / 100).to_string(), "{status:?} for {code}");
}

fn check_class(class: &Class, code: u16) {
    match class {
        Class::Transient { status } | Class::Permanent { status } | Class::Closing { status } => {
            check_status(&status.to_string(), code)
        }
        Class::Success | Class::Intermediate | Class::Malformed => {}
    }
}

fuzz_target!(|input: &[u8]| {
    if let [a, b, rest @ ..] = input {
        let code = u16::from_le_bytes([*a, *b]) % 1000;
        let enhanced = String::from_utf8_lossy(rest);
        check_class(&classify(code, Some(&*enhanced)), code);
    }

    let mut rest = input;
    while let Some(end) = out::reply_end(rest) {
        assert!(end > 0 && end <= rest.len());
        assert_eq!(rest[end - 1], b'\n');
        let raw = &rest[..end];
        if let Ok(reply) = out::parse_reply(raw) {
            let line = reply.to_string();
            // One line, no control character (a bare CR once survived).
            assert!(!line.chars().any(char::is_control), "{line:?}");
            assert!(line.starts_with(&reply.code.to_string()), "{line:?}");
            check_class(&reply.class(), reply.code);
        }
        let _ = out::capabilities(raw);
        rest = &rest[end..];
    }
    let _ = out::parse_reply(rest);
});
