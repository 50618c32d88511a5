//! The three parts in one `multipart/report` body (RFC 6522): their content
//! types (the RFC 6533 `global` ones for SMTPUTF8 mail), their transfer
//! encodings, and a boundary that occurs in none of them.

use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::text::Text;
use mail_builder::mime::{BodyPart, MimePart};
use memchr::memmem;

use super::returned::Returned;
use super::{Action, Report};

/// The notice's body: `text` for people, the delivery-`status` fields and
/// the `returned` original, each with its type and description.
pub(super) fn multipart<'x>(
    report: &Report,
    headline: Action,
    text: String,
    status: String,
    returned: Returned<'x>,
) -> MimePart<'x> {
    let global = report.envelope.smtputf8;
    let (status_type, returned_type) = match (global, returned.full) {
        (false, true) => ("message/delivery-status", "message/rfc822"),
        (false, false) => ("message/delivery-status", "text/rfc822-headers"),
        (true, true) => ("message/global-delivery-status", "message/global"),
        (true, false) => ("message/global-delivery-status", "message/global-headers"),
    };
    let boundary = boundary(
        report,
        &[text.as_bytes(), status.as_bytes(), &returned.content],
    );

    let status_part = encoded(
        MimePart::new(status_type, status.into_bytes())
            .header("Content-Description", Text::new("Delivery report")),
        status_type,
    );
    let description = match (returned.full, headline) {
        (true, Action::Failed) => "Undelivered message",
        (false, Action::Failed) => "Undelivered message headers",
        (true, _) => "Original message",
        (false, _) => "Original message headers",
    };
    let returned_part = encoded(
        MimePart::new(returned_type, BodyPart::Binary(returned.content))
            .header("Content-Description", Text::new(description)),
        returned_type,
    );
    let text_part =
        MimePart::new("text/plain", text).header("Content-Description", Text::new("Notification"));

    MimePart::new(
        ContentType::new("multipart/report")
            .attribute("report-type", "delivery-status")
            .attribute("boundary", boundary),
        vec![text_part, status_part, returned_part],
    )
}

/// Sets the part's `Content-Transfer-Encoding` so mail-builder writes it
/// verbatim, or leaves the choice to mail-builder where encoding is allowed
/// and needed. `message/*` parts must not be quoted-printable or base64
/// (RFC 2046 §5.2.1), so a `message/rfc822` that is not 7-bit goes as `8bit`
/// or, with overlong lines or NULs, `binary`. 8-bit header sections of
/// non-SMTPUTF8 mail are encoded instead, keeping the notice 7-bit.
fn encoded<'x>(part: MimePart<'x>, content_type: &str) -> MimePart<'x> {
    let body: &[u8] = match &part.contents {
        BodyPart::Text(t) => t.as_bytes(),
        BodyPart::Binary(b) => b,
        BodyPart::Multipart(_) => return part,
    };
    let cte = match (line_form(body), content_type) {
        (Form::SevenBit, _) => Some("7bit"),
        (Form::EightBit, "text/rfc822-headers") => None,
        (Form::EightBit, _) => Some("8bit"),
        (Form::Binary, "message/rfc822") => Some("binary"),
        (Form::Binary, _) => None,
    };
    match cte {
        Some(cte) => part.transfer_encoding(cte),
        None => part,
    }
}

enum Form {
    SevenBit,
    EightBit,
    Binary,
}

/// RFC 2045 §2.7–2.9: lines of at most 998 octets and no NUL, and for 7bit
/// nothing above 127.
fn line_form(body: &[u8]) -> Form {
    let long_line = body
        .split(|&b| b == b'\n')
        .any(|line| line.strip_suffix(b"\r").unwrap_or(line).len() > 998);
    if long_line || body.contains(&0) {
        Form::Binary
    } else if body.is_ascii() {
        Form::SevenBit
    } else {
        Form::EightBit
    }
}

/// A boundary that occurs in none of the parts. Derived from the report, not
/// from a clock or a random source, so the output is reproducible; the
/// attempt counter moves it in the (unlikely) case of a collision.
fn boundary(report: &Report, bodies: &[&[u8]]) -> String {
    let mut seed = Fnv::new();
    seed.write(report.message_id.as_bytes());
    seed.write(&report.now_ms.to_be_bytes());
    seed.write(&report.envelope.id.0.to_be_bytes());
    let mut attempt: u64 = 0;
    loop {
        let mut h = seed;
        h.write(&attempt.to_be_bytes());
        let candidate = format!("{}.{:016x}/dsn", report.envelope.id, h.0);
        let delimiter = format!("--{candidate}");
        let clashes = bodies
            .iter()
            .any(|b| memmem::find(b, delimiter.as_bytes()).is_some());
        if !clashes || attempt == u64::MAX {
            return candidate;
        }
        attempt += 1;
    }
}

/// FNV-1a: a tiny stable hash; the boundary only needs to be unlikely to
/// appear in the content, not secret.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dsn::build;
    use crate::dsn::fixtures::*;
    use crate::spool::Ret;

    #[test]
    fn smtputf8_uses_the_global_types() {
        let original = "From: J\u{f6}rg <j\u{f6}rg@example.org>\r\nTo: \u{e9}l\u{e8}ve@example.com\r\nSubject: Gr\u{fc}\u{df}e\r\n\r\nHall\u{f6}chen\r\n".as_bytes();
        let mut env = envelope(Ret::Headers, true);
        env.sender = "j\u{f6}rg@example.org".into();
        let eleve = recipient(
            "\u{e9}l\u{e8}ve+x@example.com",
            Some("\u{e9}l\u{e8}ve+x@example.com"),
            0,
        );
        let out = build(&report(&env, original, vec![failed(&eleve)]));
        assert_crlf_only(&out);
        let p = parts(&out);
        let types: Vec<&str> = p.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            types,
            [
                "text/plain",
                "message/global-delivery-status",
                "message/global-headers"
            ]
        );
        let (_, recipients) = status_groups(&p[1].1);
        assert_eq!(
            get(&recipients[0], "Final-Recipient"),
            Some("utf-8; \u{e9}l\u{e8}ve\\x{2B}x@example.com")
        );
        assert_eq!(
            get(&recipients[0], "Original-Recipient"),
            Some("utf-8; \u{e9}l\u{e8}ve\\x{2B}x@example.com")
        );
        assert_eq!(
            p[2].1,
            &original[..original.len() - "Hall\u{f6}chen\r\n".len() - 2]
        );

        env.ret = Ret::Full;
        let p = parts(&build(&report(&env, original, vec![failed(&eleve)])));
        assert_eq!(p[2].0, "message/global");
        assert_eq!(p[2].1, original);
    }

    #[test]
    fn output_is_reproducible_and_boundary_avoids_content() {
        let env = envelope(Ret::Full, false);
        let alice = recipient("alice@example.com", None, 0);
        let r = report(&env, ORIGINAL, vec![failed(&alice)]);
        let once = build(&r);
        assert_eq!(once, build(&r), "same report, same bytes");

        // An original that contains the boundary the report would get.
        let first = boundary(&r, &[]);
        let trap = [ORIGINAL, format!("--{first}\r\n").as_bytes()].concat();
        let r = report(&env, &trap, vec![failed(&alice)]);
        let out = build(&r);
        let chosen = boundary(&r, &[&trap]);
        assert_ne!(chosen, first);
        let p = parts(&out);
        assert_eq!(p.len(), 3);
        assert_eq!(p[2].1, trap);
    }
}
