//! What MAIL and RCPT may carry beyond smtp-proto's own checks: the values of
//! the DSN parameters, and the characters of a path.

/// RFC 3461 §4.4 and §4.2: an ENVID is at most 100 characters, an ORCPT
/// (address type included) at most 500 (smtp-proto already stops at 256).
pub(super) const MAX_ENVID: usize = 100;
pub(super) const MAX_ORCPT: usize = 500;

/// Whether a decoded `ENVID`/`ORCPT` value is printable US-ASCII within `max`
/// characters, as RFC 3461 requires. smtp-proto decodes the xtext and turns raw
/// 8-bit octets into U+FFFD and `+XX` escapes above 127 into Latin-1
/// characters: passed on, such a value would be re-encoded as other octets, or
/// grow past the limit and make the next hop refuse every recipient.
pub(super) fn is_dsn_text(value: &str, max: usize) -> bool {
    value.len() <= max && value.bytes().all(|b| (b' '..=b'~').contains(&b))
}

/// The value of the ESMTP parameter `key` (e.g. `ENVID`) exactly as the
/// client wrote it in the MAIL or RCPT `line`, if that is a faithful spelling
/// of `decoded`, the value smtp-proto decoded: what we pass on as received
/// (RFC 3461 §5.2.1). smtp-proto keeps only the decoded value. `None` when
/// the line cannot be read unambiguously (no `<path>`, the key twice): the
/// decoded value is then encoded afresh on the way out.
pub(super) fn as_received(
    line: &[u8],
    key: &str,
    decoded: &str,
    addr_type: bool,
) -> Option<String> {
    let line = std::str::from_utf8(line).ok()?;
    let params = &line[path_end(line)?..];
    let mut found = params
        .split_ascii_whitespace()
        .filter_map(|p| p.split_once('='))
        .filter(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v);
    let value = found.next()?;
    if found.next().is_some() {
        return None;
    }
    let text = if addr_type {
        let (kind, text) = value.split_once(';')?;
        if !kind.eq_ignore_ascii_case("rfc822") {
            return None;
        }
        text
    } else {
        value
    };
    crate::outbound::xtext::as_received(Some(text), decoded)?;
    Some(value.to_owned())
}

/// Where the `<path>` of a MAIL or RCPT line ends (after its `>`), quoted
/// local parts and escapes taken into account.
fn path_end(line: &str) -> Option<usize> {
    let start = line.find('<')?;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in line[start..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            '>' if !quoted => return Some(start + i + 1),
            _ => {}
        }
    }
    None
}

/// Whether a path holds a control character (C0 or DEL), which smtp-proto
/// lets through inside quoted local parts.
pub(super) fn has_control(address: &str) -> bool {
    address.chars().any(|c| c.is_ascii_control())
}

#[cfg(test)]
mod tests {
    use super::super::Step;
    use super::super::tests::{local, plain, run};
    use super::as_received;
    use crate::inbound::policy;

    #[test]
    fn envid_and_orcpt_must_be_printable_ascii_within_rfc_3461_limits() {
        // Found by the smtp_params fuzz target: 8-bit values were accepted and
        // then re-encoded as other octets (or grew past 100 characters), so a
        // DSN-capable next hop refused every recipient and we owed bounces.
        let p = policy::sample();
        let long_envid = format!("MAIL FROM:<a@b.test> ENVID={}", "x".repeat(101));
        let long_orcpt = format!("RCPT TO:<x@example.com> ORCPT=rfc822;{}@b", "y".repeat(500));
        let mut s = local();
        run(
            &mut s,
            &p,
            &[
                ("EHLO c", 250),
                ("MAIL FROM:<a@b.test> ENVID=j+C3+B6rg", 501),
                (&long_envid, 501),
                ("MAIL FROM:<a@b.test> ENVID=a+20b+2Bc", 250),
                (
                    "RCPT TO:<x@example.com> ORCPT=rfc822;j+C3+B6rg@example.com",
                    501,
                ),
                (
                    "RCPT TO:<x@example.com> ORCPT=rfc822;a+01b@example.com",
                    501,
                ),
                (&long_orcpt, 501),
                (
                    "RCPT TO:<x@example.com> ORCPT=rfc822;a+2Bb@example.com",
                    250,
                ),
            ],
        );
        let t = s.transaction.clone().unwrap();
        assert_eq!(t.envid.as_deref(), Some("a b+c"));
        assert_eq!(t.recipients.len(), 1);
        // Raw 8-bit octets, which reach us as U+FFFD.
        let env = plain(&p);
        let mut s = local();
        run(&mut s, &p, &[("EHLO c", 250)]);
        let step = s.command(b"MAIL FROM:<a@b.test> ENVID=a\xff\xfe\r\n", &env);
        assert!(matches!(&step, Step::Reply(r) if r.code == 501), "{step:?}");
    }

    #[test]
    fn parameters_are_kept_as_written_when_they_spell_the_decoded_value() {
        let line = b"MAIL FROM:<a@b.test> BODY=8BITMIME ENVID=Q+2BZ+3Dx+2Fy.42\r\n";
        assert_eq!(
            as_received(line, "ENVID", "Q+Z=x/y.42", false).as_deref(),
            Some("Q+2BZ+3Dx+2Fy.42")
        );
        let line = b"RCPT TO:<x@example.com> NOTIFY=FAILURE orcpt=RFC822;a+2bb@c.test\r\n";
        assert_eq!(
            as_received(line, "ORCPT", "a+b@c.test", true).as_deref(),
            Some("RFC822;a+2bb@c.test")
        );
        for (line, decoded) in [
            // In a quoted local part, not a parameter.
            (
                &b"RCPT TO:<\"> ORCPT=rfc822;e@f\"@example.com>\r\n"[..],
                "e@f",
            ),
            // Twice: which one smtp-proto took is not ours to guess.
            (
                b"RCPT TO:<x@example.com> ORCPT=rfc822;e@f ORCPT=rfc822;e@f\r\n",
                "e@f",
            ),
            // Not what smtp-proto decoded.
            (b"RCPT TO:<x@example.com> ORCPT=rfc822;e+40f\r\n", "e+40f"),
            (b"RCPT TO:<x@example.com> ORCPT=x400;e@f\r\n", "e@f"),
            (b"RCPT TO:x@example.com ORCPT=rfc822;e@f\r\n", "e@f"),
        ] {
            assert_eq!(
                as_received(line, "ORCPT", decoded, true),
                None,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }
}
