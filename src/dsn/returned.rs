//! The third part of a notice: the original message, or only its header
//! section, as `RET=` asked and `max_full_bytes` allows. The stored original
//! is untrusted: it may be empty, lack a header/body separator, carry bare CR
//! or LF, or have a header section too large to send back whole.

use std::borrow::Cow;

use memchr::memmem;

use super::Report;
use crate::spool::Ret;

/// The third part's content, and whether it is the whole message.
pub(super) struct Returned<'a> {
    pub(super) full: bool,
    pub(super) content: Cow<'a, [u8]>,
    /// `RET=FULL` was asked but the message was over `max_full_bytes`.
    pub(super) cut: bool,
}

/// Most bytes of header section we return. A header section this large is
/// abuse or a broken client; the sender needs enough to recognise the
/// message, not all of it, and a notice must stay small enough to deliver.
const MAX_RETURNED_HEADERS: usize = 256 * 1024;

/// What `RET=` asked for, as far as `max_full_bytes` allows, with CRLF
/// line endings only.
pub(super) fn returned<'a>(report: &Report<'a>) -> Returned<'a> {
    let original = crlf(report.original);
    let asked_full = report.envelope.ret == Ret::Full;
    let fits = report.original.len() <= report.max_full_bytes;
    if asked_full && fits && !original.is_empty() {
        return Returned {
            full: true,
            content: original,
            cut: false,
        };
    }
    let headers = header_section(&original);
    let headers = match headers.len() {
        n if n <= MAX_RETURNED_HEADERS => headers,
        _ => {
            // Cut after the last whole line that fits.
            let limit = &headers[..MAX_RETURNED_HEADERS];
            match memmem::rfind(limit, b"\r\n") {
                Some(end) => &headers[..end + 2],
                None => &[][..],
            }
        }
    };
    let len = headers.len();
    let content = match original {
        Cow::Borrowed(whole) => Cow::Borrowed(&whole[..len]),
        Cow::Owned(mut whole) => {
            whole.truncate(len);
            Cow::Owned(whole)
        }
    };
    Returned {
        full: false,
        content,
        cut: asked_full && !fits,
    }
}

/// The header section, including the CRLF ending its last field. Mail with no
/// blank line is all header section; mail starting with one has none.
fn header_section(message: &[u8]) -> &[u8] {
    if message.starts_with(b"\r\n") {
        return &[];
    }
    match memmem::find(message, b"\r\n\r\n") {
        Some(at) => &message[..at + 2],
        None => message,
    }
}

/// Bare LF and bare CR become CRLF: the notice must not carry either, whatever
/// the spool held. Borrowed when there was nothing to fix, the usual case.
fn crlf(bytes: &[u8]) -> Cow<'_, [u8]> {
    let clean = {
        let mut prev = 0u8;
        let mut ok = true;
        for (i, &b) in bytes.iter().enumerate() {
            let next = bytes.get(i + 1).copied();
            if (b == b'\n' && prev != b'\r') || (b == b'\r' && next != Some(b'\n')) {
                ok = false;
                break;
            }
            prev = b;
        }
        ok
    };
    if clean {
        return Cow::Borrowed(bytes);
    }
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 32);
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                if bytes.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => out.extend_from_slice(b"\r\n"),
            _ => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use mail_parser::{MessageParser, MimeHeaders};

    use super::*;
    use crate::dsn::build;
    use crate::dsn::fixtures::*;

    #[test]
    fn ret_hdrs_and_unset_return_the_header_section() {
        for ret in [Ret::Headers, Ret::Unset] {
            let env = envelope(ret, false);
            let alice = recipient("alice@example.com", None, 0);
            let out = build(&report(&env, ORIGINAL, vec![failed(&alice)]));
            let parts = parts(&out);
            assert_eq!(parts[2].0, "text/rfc822-headers", "{ret:?}");
            let headers = &parts[2].1;
            assert!(headers.ends_with(b"Message-ID: <orig-1@example.org>\r\n"));
            assert!(
                memmem::find(headers, b"the figures").is_none(),
                "{ret:?}: body returned"
            );
        }
    }

    #[test]
    fn ret_full_returns_the_message() {
        let env = envelope(Ret::Full, false);
        let alice = recipient("alice@example.com", None, 0);
        let out = build(&report(&env, ORIGINAL, vec![failed(&alice)]));
        assert_crlf_only(&out);
        let msg = MessageParser::default().parse(&out).unwrap();
        let ids = msg.parts[0].sub_parts().unwrap();
        let third = &msg.parts[ids[2] as usize];
        let ct = third.content_type().unwrap();
        assert_eq!((ct.ctype(), ct.subtype()), ("message", Some("rfc822")));
        let nested = third.message().expect("a nested message");
        assert_eq!(nested.subject(), Some("Quarterly figures"));
        assert_eq!(nested.raw_message(), ORIGINAL);
        let text = String::from_utf8(parts(&out)[0].1.clone()).unwrap();
        assert!(text.contains("The message is attached"), "{text}");
    }

    #[test]
    fn ret_full_over_the_cap_returns_headers() {
        let env = envelope(Ret::Full, false);
        let alice = recipient("alice@example.com", None, 0);
        let mut r = report(&env, ORIGINAL, vec![failed(&alice)]);
        r.max_full_bytes = ORIGINAL.len();
        assert_eq!(parts(&build(&r))[2].0, "message/rfc822", "at the cap: full");
        r.max_full_bytes = ORIGINAL.len() - 1;
        let out = build(&r);
        let parts = parts(&out);
        assert_eq!(parts[2].0, "text/rfc822-headers");
        assert!(memmem::find(&parts[2].1, b"the figures").is_none());
        let text = String::from_utf8(parts[0].1.clone()).unwrap();
        assert!(text.contains("too large to return in full"), "{text}");
    }

    #[test]
    fn odd_originals_do_not_panic() {
        let huge_header = {
            let mut h = Vec::new();
            for i in 0..40_000 {
                h.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "y".repeat(10)).as_bytes());
            }
            h.extend_from_slice(b"\r\nbody\r\n");
            h
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            (
                "no separator",
                b"Subject: only headers\r\nFrom: a@b".to_vec(),
            ),
            ("starts with a blank line", b"\r\nbody only\r\n".to_vec()),
            ("bare LF", b"Subject: x\nFrom: a@b\n\nbody\nline\r".to_vec()),
            ("bare CR", b"Subject: x\rFrom: a@b\r\r\rbody".to_vec()),
            ("huge header", huge_header),
            (
                "8-bit and NUL",
                b"Subject: \xff\x00\r\n\r\n\xfe\r\n".to_vec(),
            ),
            (
                "long line",
                [b"Subject: ".as_slice(), &[b'a'; 5000], b"\r\n\r\nb"].concat(),
            ),
        ];
        for (name, original) in &cases {
            for ret in [Ret::Full, Ret::Headers, Ret::Unset] {
                for utf8 in [false, true] {
                    let env = envelope(ret, utf8);
                    let alice = recipient("alice@example.com", None, 0);
                    let out = build(&report(&env, original, vec![failed(&alice)]));
                    for (i, &b) in out.iter().enumerate() {
                        if b == b'\n' {
                            assert_eq!(out.get(i.wrapping_sub(1)), Some(&b'\r'), "{name}");
                        }
                        if b == b'\r' {
                            assert_eq!(out.get(i + 1), Some(&b'\n'), "{name}");
                        }
                    }
                    let p = parts(&out);
                    assert_eq!(p.len(), 3, "{name} {ret:?}");
                    if *name == "huge header" {
                        assert!(p[2].1.len() <= MAX_RETURNED_HEADERS, "{name}");
                    }
                }
            }
        }
    }
}
