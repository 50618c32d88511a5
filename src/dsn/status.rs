//! The second part of a notice: the machine-readable `message/delivery-status`
//! fields (RFC 3464), and the rules that keep outside values (host names,
//! addresses, next-hop replies) from adding a field, a line or an 8-bit byte
//! where none belongs; the human text reuses those rules.

use std::fmt::Write as _;

use super::{Action, RecipientReport, Report, rfc5322_date};
use crate::spool::Envelope;

/// The `message/delivery-status` content (RFC 3464 §2.1): per-message fields,
/// then one blank-line separated group per recipient.
pub(super) fn delivery_status(report: &Report, host: &str) -> String {
    let global = report.envelope.smtputf8;
    let mut out = String::with_capacity(512 + 256 * report.recipients.len());
    message_fields(&mut out, report.envelope, host);
    for r in &report.recipients {
        out.push_str("\r\n");
        recipient_fields(&mut out, r, global);
    }
    out
}

/// The per-message fields (RFC 3464 §2.2): about the original message and
/// how it reached us.
fn message_fields(out: &mut String, envelope: &Envelope, host: &str) {
    let global = envelope.smtputf8;
    if let Some(envid) = &envelope.envid {
        // ENVID is xtext on the wire and always ASCII; anything else is noise.
        field(out, "Original-Envelope-Id", &clean(envid, false));
    }
    field(out, "Reporting-MTA", &format!("dns; {host}"));
    let helo = word(&clean(&envelope.client.helo, global));
    let ip = match envelope.client.ip.to_canonical() {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("IPv6:{v6}"),
    };
    field(
        out,
        "Received-From-MTA",
        &format!(
            "dns; {} ([{ip}])",
            if helo.is_empty() { "unknown" } else { &helo }
        ),
    );
    field(out, "Arrival-Date", &rfc5322_date(envelope.arrived_ms));
    // An extension field (RFC 3464 §2.4), last as the syntax wants: the queue
    // ID is what the operator greps the logs for when the sender asks.
    field(out, "X-Mxspool-Queue-ID", &envelope.id.to_string());
}

/// One recipient's group (RFC 3464 §2.3), without the blank line before it.
fn recipient_fields(out: &mut String, r: &RecipientReport, global: bool) {
    if let Some(orcpt) = &r.recipient.orcpt {
        field(
            out,
            "Original-Recipient",
            &original_recipient(orcpt, global),
        );
    }
    field(
        out,
        "Final-Recipient",
        &typed_address(&r.recipient.address, global),
    );
    field(out, "Action", r.action.as_str());
    field(out, "Status", status_code(r.status, r.action));
    if let Some(mta) = r.remote_mta.map(|m| word(&clean(m, global)))
        && !mta.is_empty()
    {
        field(out, "Remote-MTA", &format!("dns; {mta}"));
    }
    if let Some(diag) = r.diagnostic.map(|d| clean(d, global))
        && !diag.is_empty()
    {
        let kind = if is_smtp_reply(&diag) {
            "smtp"
        } else {
            "X-mxspool"
        };
        field(out, "Diagnostic-Code", &format!("{kind}; {diag}"));
    }
    if let Some(ms) = r.last_attempt_ms {
        field(out, "Last-Attempt-Date", &rfc5322_date(ms));
    }
    if let Some(ms) = r.will_retry_until_ms {
        field(out, "Will-Retry-Until", &rfc5322_date(ms));
    }
}

/// Whether a diagnostic is an SMTP reply (`550 5.1.1 …`, `421-…`), which
/// RFC 3464 §2.3.6 types `smtp`. Anything else (a refused connection, a DNS
/// failure) is our own words and gets our private type, as Postfix uses
/// `X-Postfix`.
pub(super) fn is_smtp_reply(text: &str) -> bool {
    let b = text.as_bytes();
    matches!(b.first(), Some(b'2'..=b'5'))
        && b.get(1).is_some_and(u8::is_ascii_digit)
        && b.get(2).is_some_and(u8::is_ascii_digit)
        && matches!(b.get(3), None | Some(b' ' | b'-'))
}

/// Target width of a folded field; lines may run longer only for a single
/// long word.
const FOLD_AT: usize = 78;
/// Longest unbroken piece written on a line, so no line reaches the 998-octet
/// limit of RFC 5322 §2.1.1 whatever the input.
const MAX_WORD: usize = 900;

/// Appends `Name: value` folded at spaces. `value` must be free of controls
/// (see [`clean`]); runs of spaces collapse, which no field here cares about,
/// and a word over [`MAX_WORD`] bytes (only junk is that long) is split by a
/// fold, gaining a space.
fn field(out: &mut String, name: &str, value: &str) {
    out.push_str(name);
    out.push(':');
    let mut column = name.len() + 1;
    let mut words_on_line = 0;
    for word in value.split(' ').filter(|w| !w.is_empty()) {
        for piece in pieces(word, MAX_WORD) {
            if words_on_line > 0 && column + 1 + piece.len() > FOLD_AT {
                out.push_str("\r\n");
                column = 0;
                words_on_line = 0;
            }
            out.push(' ');
            out.push_str(piece);
            column += 1 + piece.len();
            words_on_line += 1;
        }
    }
    out.push_str("\r\n");
}

/// Splits `word` into pieces of at most `max` bytes, on character boundaries.
pub(super) fn pieces(word: &str, max: usize) -> impl Iterator<Item = &str> {
    let mut rest = word;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = rest.len().min(max);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        if end == 0 {
            // A max below one character's width: take the character anyway.
            end = rest.chars().next().map_or(rest.len(), char::len_utf8);
        }
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
}

/// Controls (CR and LF first: nothing from outside may start a field of its
/// own) become spaces; without SMTPUTF8, non-ASCII becomes `?` so the
/// delivery-status stays 7-bit as RFC 3464 requires.
pub(super) fn clean(text: &str, keep_utf8: bool) -> String {
    text.chars()
        .map(|c| match c {
            c if c.is_control() => ' ',
            c if !c.is_ascii() && !keep_utf8 => '?',
            c => c,
        })
        .collect::<String>()
        .trim()
        .to_string()
}

/// A value that must be one token (host names): spaces removed.
pub(super) fn word(text: &str) -> String {
    text.chars().filter(|c| !c.is_whitespace()).collect()
}

/// `rfc822; addr` for ASCII addresses; `utf-8; …` otherwise (RFC 6533 §3),
/// as utf-8-addr-unitext in the global report and utf-8-addr-xtext (every
/// non-ASCII character as `\x{HEX}`) in the 7-bit one.
fn typed_address(address: &str, global: bool) -> String {
    let address: String = address
        .chars()
        .filter(|c| !c.is_control() && !c.is_whitespace())
        .collect();
    if address.is_ascii() {
        return format!("rfc822; {address}");
    }
    let mut out = String::from("utf-8; ");
    for c in address.chars() {
        let plain = match c {
            '+' | '=' | '\\' => false,
            c if c.is_ascii() => c.is_ascii_graphic(),
            _ => global,
        };
        if plain {
            out.push(c);
        } else {
            let _ = write!(out, "\\x{{{:X}}}", u32::from(c));
        }
    }
    out
}

/// The `Original-Recipient` value. A typed ASCII `ORCPT` (`rfc822;a@b`) is
/// quoted as given; a bare address (what the SMTP parser hands the spool) or
/// a non-ASCII one is typed like `Final-Recipient`.
fn original_recipient(orcpt: &str, global: bool) -> String {
    let orcpt = orcpt.trim();
    if let Some((kind, address)) = orcpt.split_once(';') {
        let known = ["rfc822", "utf-8", "x400", "unknown"]
            .iter()
            .any(|k| k.eq_ignore_ascii_case(kind.trim()));
        if known {
            if orcpt.is_ascii() && !orcpt.chars().any(|c| c.is_ascii_control()) {
                return orcpt.to_string();
            }
            return typed_address(address.trim(), global);
        }
    }
    typed_address(orcpt, global)
}

/// The caller's code if it is RFC 3463 syntax (`class.subject.detail`),
/// else a generic one of the action's class.
pub(super) fn status_code(status: &str, action: Action) -> &str {
    let status = status.trim();
    let mut parts = status.split('.');
    let valid = matches!(parts.next(), Some("2" | "4" | "5"))
        && parts.by_ref().take(2).all(|p| {
            (1..=3).contains(&p.len())
                && p.bytes().all(|b| b.is_ascii_digit())
                && (p == "0" || !p.starts_with('0'))
        })
        && status.split('.').count() == 3;
    if valid {
        status
    } else {
        action.fallback_status()
    }
}

#[cfg(test)]
mod tests {
    use mail_parser::MessageParser;

    use super::*;
    use crate::dsn::build;
    use crate::dsn::fixtures::*;
    use crate::spool::Ret;

    #[test]
    fn failed_recipient_fields() {
        let env = envelope(Ret::Headers, false);
        let alice = recipient("alice@example.com", Some("rfc822;alice@example.com"), 2);
        let out = build(&report(&env, ORIGINAL, vec![failed(&alice)]));
        let parts = parts(&out);
        let (message, recipients) = status_groups(&parts[1].1);

        assert_eq!(get(&message, "Reporting-MTA"), Some("dns; mx2.example.net"));
        assert_eq!(get(&message, "Original-Envelope-Id"), Some("QQ314159"));
        assert_eq!(
            get(&message, "Arrival-Date"),
            Some(rfc5322_date(env.arrived_ms).as_str())
        );
        assert_eq!(
            get(&message, "X-Mxspool-Queue-ID"),
            Some(&*env.id.to_string())
        );
        assert_eq!(
            get(&message, "Received-From-MTA"),
            Some("dns; client.example.org ([192.0.2.7])")
        );

        assert_eq!(recipients.len(), 1);
        let r = &recipients[0];
        let names: Vec<&str> = r.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "Original-Recipient",
                "Final-Recipient",
                "Action",
                "Status",
                "Remote-MTA",
                "Diagnostic-Code",
                "Last-Attempt-Date"
            ]
        );
        assert_eq!(
            get(r, "Original-Recipient"),
            Some("rfc822;alice@example.com")
        );
        assert_eq!(get(r, "Final-Recipient"), Some("rfc822; alice@example.com"));
        assert_eq!(get(r, "Action"), Some("failed"));
        assert_eq!(get(r, "Status"), Some("5.1.1"));
        assert_eq!(get(r, "Remote-MTA"), Some("dns; mx1.example.com"));
        assert_eq!(
            get(r, "Diagnostic-Code"),
            Some("smtp; 550 5.1.1 <alice@example.com>: user unknown")
        );
        assert_eq!(
            get(r, "Last-Attempt-Date"),
            Some("Wed, 18 Nov 2026 11:16:40 +0000")
        );
    }

    #[test]
    fn delayed_recipient_fields() {
        let env = envelope(Ret::Unset, false);
        let bob = recipient("bob@example.com", None, 0);
        let out = build(&report(&env, ORIGINAL, vec![delayed(&bob)]));
        assert_crlf_only(&out);
        let msg = MessageParser::default().parse(&out).unwrap();
        assert_eq!(msg.subject(), Some("Delayed Mail (still being retried)"));

        let parts = parts(&out);
        let (_, recipients) = status_groups(&parts[1].1);
        let r = &recipients[0];
        assert_eq!(get(r, "Original-Recipient"), None, "no ORCPT, no field");
        assert_eq!(get(r, "Final-Recipient"), Some("rfc822; bob@example.com"));
        assert_eq!(get(r, "Action"), Some("delayed"));
        assert_eq!(get(r, "Status"), Some("4.4.1"));
        assert_eq!(get(r, "Remote-MTA"), None);
        assert_eq!(
            get(r, "Will-Retry-Until"),
            Some(rfc5322_date(1_795_432_000_000).as_str())
        );

        // Our own words, not a remote reply: not typed `smtp`.
        assert_eq!(
            get(r, "Diagnostic-Code"),
            Some("X-mxspool; connect to mx1.example.com[192.0.2.10]:25: Connection refused")
        );
    }

    #[test]
    fn mixed_report_groups_each_recipient() {
        let env = envelope(Ret::Headers, false);
        let alice = recipient("alice@example.com", Some("rfc822;alice@example.com"), 6);
        let bob = recipient("bob@example.com", Some("bob@example.com"), 6);
        let out = build(&report(&env, ORIGINAL, vec![delayed(&bob), failed(&alice)]));
        let msg = MessageParser::default().parse(&out).unwrap();
        assert_eq!(msg.subject(), Some("Undelivered Mail Returned to Sender"));
        let parts = parts(&out);
        let (_, recipients) = status_groups(&parts[1].1);
        assert_eq!(recipients.len(), 2);
        assert_eq!(get(&recipients[0], "Action"), Some("delayed"));
        // A bare ORCPT (as the SMTP parser stores it) gets its type.
        assert_eq!(
            get(&recipients[0], "Original-Recipient"),
            Some("rfc822; bob@example.com")
        );
        assert_eq!(get(&recipients[1], "Action"), Some("failed"));
    }

    #[test]
    fn non_ascii_address_without_smtputf8_is_xtext() {
        let env = envelope(Ret::Headers, false);
        let eleve = recipient("\u{e9}l\u{e8}ve@example.com", None, 0);
        let out = build(&report(&env, ORIGINAL, vec![failed(&eleve)]));
        let p = parts(&out);
        assert_eq!(p[1].0, "message/delivery-status");
        assert!(p[1].1.is_ascii(), "delivery-status must be 7-bit");
        let (_, recipients) = status_groups(&p[1].1);
        assert_eq!(
            get(&recipients[0], "Final-Recipient"),
            Some("utf-8; \\x{E9}l\\x{E8}ve@example.com")
        );
    }

    #[test]
    fn status_codes_are_validated() {
        assert_eq!(status_code("5.1.1", Action::Failed), "5.1.1");
        assert_eq!(status_code("4.4.7", Action::Failed), "4.4.7");
        assert_eq!(status_code("5.1.10", Action::Failed), "5.1.10");
        assert_eq!(status_code("5.100.100", Action::Failed), "5.100.100");
        for bad in [
            "", "5", "5.1", "5.1.1.1", "3.1.1", "5.01.1", "5.1.1000", "5.a.1",
        ] {
            assert_eq!(status_code(bad, Action::Delayed), "4.0.0", "{bad:?}");
        }
    }

    #[test]
    fn long_fields_are_folded() {
        let mut out = String::new();
        let value = format!("smtp; {}", "word ".repeat(100));
        field(&mut out, "Diagnostic-Code", &value);
        let lines: Vec<&str> = out.trim_end().split("\r\n").collect();
        assert!(lines.len() > 1);
        for (i, line) in lines.iter().enumerate() {
            assert!(line.len() <= FOLD_AT, "{line:?}");
            assert_eq!(i > 0, line.starts_with(' '), "{line:?}");
        }
        assert_eq!(lines.concat(), format!("Diagnostic-Code: {}", value.trim()));
    }
}
