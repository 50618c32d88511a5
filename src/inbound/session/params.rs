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

/// Whether a path holds a control character (C0 or DEL), which smtp-proto
/// lets through inside quoted local parts.
pub(super) fn has_control(address: &str) -> bool {
    address.chars().any(|c| c.is_ascii_control())
}

#[cfg(test)]
mod tests {
    use super::super::Step;
    use super::super::tests::{local, plain, run};
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
}
