//! Mailbox fetch's envelope from a fetched message, on arbitrary bytes: the
//! message comes from an ISP's catch-all mailbox, so anyone can write it.
//!
//! Checked: no panic; the body to deliver has CRLF line endings only and
//! keeps no `Delivered-To:` or `Return-Path:` field; every recipient is one
//! the judge called ours, each once; an orphan names its reason first; an
//! unparseable message is wrapped so that the original comes back byte for
//! byte.
#![no_main]

#[path = "common.rs"]
mod common;

use common::only_crlf;
use libfuzzer_sys::fuzz_target;
use mail_parser::{MessageParser, MimeHeaders};
use mxspool::fetch::envelope::{self, Context, Derived, Verdict};

/// example.com is ours, except nobody@, whom its recipient list lacks.
fn judge(address: &str) -> Verdict {
    let lower = address.to_ascii_lowercase();
    match lower.rsplit_once('@') {
        Some(("nobody", "example.com")) => Verdict::Unknown,
        Some((local, "example.com")) if !local.is_empty() => Verdict::Ours(lower),
        _ => Verdict::Foreign,
    }
}

/// The header section's field names, lower-cased. A body that starts with
/// an empty line has none (every field was removed).
fn field_names(body: &[u8]) -> Vec<String> {
    if body.starts_with(b"\r\n") {
        return Vec::new();
    }
    let end = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(body.len(), |p| p + 2);
    body[..end]
        .split(|&b| b == b'\n')
        .filter(|line| !line.starts_with(b" ") && !line.starts_with(b"\t"))
        .filter_map(|line| {
            let colon = line.iter().position(|&b| b == b':')?;
            Some(
                String::from_utf8_lossy(&line[..colon])
                    .trim()
                    .to_ascii_lowercase(),
            )
        })
        .collect()
}

fn check_forwarded(body: &[u8]) {
    assert!(only_crlf(body), "{body:?}");
    for name in field_names(body) {
        assert!(
            name != "delivered-to" && name != "return-path",
            "{name} kept"
        );
    }
}

fuzz_target!(|raw: &[u8]| {
    let cx = Context {
        account: "isp",
        postmaster: common::POSTMASTER,
        hostname: "mx2.test",
        date: 1_800_000_000,
    };
    let _ = envelope::message_id(raw);
    match envelope::derive(raw, &cx, &judge) {
        Derived::Deliver {
            recipients, body, ..
        } => {
            check_forwarded(&body);
            assert!(!recipients.is_empty());
            for (i, r) in recipients.iter().enumerate() {
                assert!(matches!(judge(r), Verdict::Ours(_)), "{r}");
                assert!(
                    !recipients[..i].iter().any(|o| o.eq_ignore_ascii_case(r)),
                    "{r} twice"
                );
            }
        }
        Derived::Orphan { reason, body, .. } => {
            check_forwarded(&body);
            assert!(body.starts_with(envelope::REASON_FIELD.as_bytes()));
            assert!(
                reason.bytes().all(|b| (0x20..0x7f).contains(&b)),
                "{reason:?}"
            );
        }
        Derived::Unparseable { body, .. } => {
            assert!(only_crlf(&body));
            let wrapper = MessageParser::default()
                .parse(&body)
                .expect("the wrapper parses");
            let original = wrapper
                .attachments()
                .find(|a| a.attachment_name() == Some(envelope::ATTACHMENT_NAME))
                .expect("the original is attached");
            assert_eq!(original.contents(), raw);
        }
    }
});
