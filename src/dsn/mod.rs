//! (6) Delivery status notifications: the RFC 3464 `multipart/report` a sender
//! gets when its mail failed, is delayed, or (if it asked) was delivered or
//! relayed.
//!
//! The scheduler decides *that* a notice is due (with [`wants`]) and hands the
//! finished bytes to the outbound side, sent from the null sender `<>` so a
//! notice can never cause another. This module only turns a [`Report`] into
//! those bytes: a pure function of its input, so the same report always gives
//! the same message.
//!
//! It must not read the clock, the host name or the spool, and must not panic:
//! every time, name and message comes in through [`Report`], and the stored
//! original is untrusted input (it may be empty, lack a header/body separator,
//! carry bare LFs or a huge header section).
//!
//! The message has three parts (RFC 6522): a text for people, the
//! machine-readable `message/delivery-status`, and the original message or its
//! header section as `RET=` asked. For SMTPUTF8 mail the RFC 6533 types
//! (`message/global-delivery-status`, `message/global`,
//! `message/global-headers`) are used instead. The output has CRLF line
//! endings only, and 8-bit bytes only where the input had them (an 8-bit
//! original returned in full, an SMTPUTF8 address), so a caller can decide on
//! `BODY=8BITMIME` and `SMTPUTF8` by looking at the bytes.
//!
//! - this file: the public API ([`Report`], [`wants`], [`build`]) and the
//!   notice's own header section.
//! - `human.rs`: the first part, the text for people.
//! - `status.rs`: the second part, the delivery-status fields, and making
//!   outside values safe to put in a field or a line.
//! - `returned.rs`: the third part, the original message or its header section.
//! - `mime.rs`: the three parts in one `multipart/report` body: content types,
//!   transfer encodings, the boundary.

mod human;
mod mime;
mod returned;
mod status;

#[cfg(test)]
mod fixtures;

use mail_builder::MessageBuilder;
use mail_builder::headers::address::Address;
use mail_builder::headers::date::Date;
use mail_builder::headers::raw::Raw;

use crate::spool::{Envelope, Notify, Recipient};
use status::{clean, word};

/// What happened to one recipient (RFC 3464 §2.3.3). `expanded` is left out:
/// a backup MX never expands lists or aliases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Given up: permanent failure, or the queue lifetime ran out.
    Failed,
    /// Still queued and being retried; a warning, nothing for the sender to do.
    Delayed,
    /// Final delivery was confirmed to us, e.g. by a next hop's own report.
    Delivered,
    /// Handed to a next hop that does not speak DSN, so no further notices
    /// will come for this recipient (RFC 3461 §6.2.1).
    Relayed,
}

impl Action {
    /// The `Action:` field value.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed",
        }
    }

    fn subject(self) -> &'static str {
        match self {
            Action::Failed => "Undelivered Mail Returned to Sender",
            Action::Delayed => "Delayed Mail (still being retried)",
            Action::Delivered => "Successful Mail Delivery Report",
            Action::Relayed => "Relayed mail delivery report",
        }
    }

    /// When one report mixes actions, the subject and the opening words speak
    /// of the one the sender most needs to hear about.
    fn urgency(self) -> u8 {
        match self {
            Action::Failed => 3,
            Action::Delayed => 2,
            Action::Delivered => 1,
            Action::Relayed => 0,
        }
    }

    /// Used when the caller's status is not a valid RFC 3463 code: the field
    /// is required, and a wrong class would contradict the action.
    fn fallback_status(self) -> &'static str {
        match self {
            Action::Failed => "5.0.0",
            Action::Delayed => "4.0.0",
            Action::Delivered | Action::Relayed => "2.0.0",
        }
    }
}

/// One recipient's line in the report.
#[derive(Clone, Debug)]
pub struct RecipientReport<'a> {
    /// The spooled recipient: its address, `ORCPT=` and `NOTIFY=`.
    pub recipient: &'a Recipient,
    pub action: Action,
    /// RFC 3463 enhanced status code, e.g. `5.1.1`, `4.4.1`.
    pub status: &'a str,
    /// The next hop's host name, when one answered (`Remote-MTA: dns; …`).
    pub remote_mta: Option<&'a str>,
    /// The next hop's reply as received, e.g. `550 5.1.1 <a@x>: user unknown`;
    /// quoted to the sender because it is usually the most useful line of all.
    pub diagnostic: Option<&'a str>,
    /// Unix milliseconds of the last delivery attempt.
    pub last_attempt_ms: Option<u64>,
    /// Unix milliseconds until which a delayed recipient will be retried, so
    /// the sender knows how long to wait before worrying.
    pub will_retry_until_ms: Option<u64>,
}

/// Everything one notice says. Times are Unix milliseconds chosen by the
/// caller, so the output depends on nothing else.
#[derive(Clone, Debug)]
pub struct Report<'a> {
    /// Our host name: `Reporting-MTA`, and the domain of `MAILER-DAEMON@`.
    pub reporting_mta: &'a str,
    /// The original message's envelope: sender, `ENVID=`, `RET=`, arrival,
    /// queue ID, SMTPUTF8 and the client that sent it.
    pub envelope: &'a Envelope,
    /// The stored original message (header section and body, CRLF line endings).
    pub original: &'a [u8],
    pub recipients: Vec<RecipientReport<'a>>,
    /// The notice's `Date:`.
    pub now_ms: u64,
    /// The notice's `Message-ID:`, with or without angle brackets; chosen by
    /// the caller so it can be logged before the notice is queued.
    pub message_id: &'a str,
    /// `RET=FULL` returns the whole original only up to this many bytes, so a
    /// bounce never doubles a huge message back at the sender; beyond it the
    /// header section is returned.
    pub max_full_bytes: usize,
}

/// Whether a recipient whose `NOTIFY=` was `notify` should be told about
/// `action` (RFC 3461 §4.1). `NEVER` silences everything. Without `NOTIFY=`
/// failures and delays are reported (the RFC leaves the default to us) and
/// successes are not: an unasked success notice is noise. `relayed` answers a
/// request for `SUCCESS` that the next hop can no longer honour (§6.2.1).
pub fn wants(notify: Notify, action: Action) -> bool {
    if notify.has(Notify::NEVER) {
        return false;
    }
    if notify.0 == 0 {
        return matches!(action, Action::Failed | Action::Delayed);
    }
    match action {
        Action::Failed => notify.has(Notify::FAILURE),
        Action::Delayed => notify.has(Notify::DELAY),
        Action::Delivered | Action::Relayed => notify.has(Notify::SUCCESS),
    }
}

/// Builds the complete notice (RFC 5322 header and RFC 6522 body, CRLF line
/// endings). To be sent from `<>` to the envelope sender; a report about mail
/// from the null sender must not be sent at all (the caller's check: this
/// builds it anyway, addressed to `<>`). A report without recipients, also
/// the caller's mistake, still gives a well-formed failure notice.
pub fn build(report: &Report) -> Vec<u8> {
    let envelope = report.envelope;
    let host = word(&clean(report.reporting_mta, envelope.smtputf8));
    let headline = report
        .recipients
        .iter()
        .map(|r| r.action)
        .max_by_key(|a| a.urgency())
        .unwrap_or(Action::Failed);

    let returned = returned::returned(report);
    let text = human::human_text(report, &host, headline, &returned);
    let status = status::delivery_status(report, &host);
    let body = mime::multipart(report, headline, text, status, returned);

    let from = format!("MAILER-DAEMON@{}", address_text(&host));
    let message = MessageBuilder::new()
        .from(Address::new_address(Some("Mail Delivery System"), from))
        .to(Address::new_address(
            None::<&str>,
            // The real address even without SMTPUTF8: a `?` would send the
            // notice to someone else, or nowhere.
            address_text(&clean(&envelope.sender, true)),
        ))
        .subject(headline.subject())
        .date(Date::new(unix_seconds(report.now_ms)))
        .message_id(message_id(report.message_id))
        .header("Auto-Submitted", Raw::new("auto-replied"))
        .header("MIME-Version", Raw::new("1.0"))
        .body(body);
    let mut out = Vec::with_capacity(4096 + report.original.len().min(report.max_full_bytes));
    message.serialize(&mut out);
    out
}

/// An address as it goes in `<…>` of a header: one token without controls.
fn address_text(address: &str) -> String {
    word(address).replace(['<', '>'], "")
}

/// Angle brackets are the header's syntax, not part of the ID
/// (mail-builder adds them).
fn message_id(id: &str) -> String {
    let id = id.trim();
    let id = id.strip_prefix('<').unwrap_or(id);
    let id = id.split('>').next().unwrap_or(id);
    word(&clean(id, false))
}

/// Dates beyond what the date type holds saturate rather than panic.
fn unix_seconds(ms: u64) -> i64 {
    i64::try_from(ms / 1000).unwrap_or(i64::MAX)
}

/// An RFC 5322 date, as the header, the delivery-status fields and the
/// text all write it.
fn rfc5322_date(ms: u64) -> String {
    Date::new(unix_seconds(ms)).to_rfc822()
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use crate::spool::Ret;
    use mail_parser::{MessageParser, MimeHeaders};

    #[test]
    fn wants_follows_notify() {
        use Action::*;
        let n = |flags: u8| Notify(flags);
        let table: &[(u8, [bool; 4])] = &[
            // NOTIFY=            Failed Delayed Delivered Relayed
            (0, [true, true, false, false]),
            (Notify::NEVER, [false, false, false, false]),
            (Notify::FAILURE, [true, false, false, false]),
            (Notify::DELAY, [false, true, false, false]),
            (Notify::SUCCESS, [false, false, true, true]),
            (Notify::SUCCESS | Notify::DELAY, [false, true, true, true]),
            (Notify::FAILURE | Notify::DELAY, [true, true, false, false]),
            (
                Notify::SUCCESS | Notify::FAILURE | Notify::DELAY,
                [true, true, true, true],
            ),
            // NEVER with anything else (the parser should refuse it) still wins.
            (
                Notify::NEVER | Notify::FAILURE,
                [false, false, false, false],
            ),
        ];
        for &(flags, expected) in table {
            let got = [Failed, Delayed, Delivered, Relayed].map(|a| wants(n(flags), a));
            assert_eq!(got, expected, "NOTIFY bits {flags:#b}");
        }
    }

    #[test]
    fn failure_notice_headers_and_structure() {
        let env = envelope(Ret::Headers, false);
        let alice = recipient("alice@example.com", Some("rfc822;alice@example.com"), 2);
        let out = build(&report(&env, ORIGINAL, vec![failed(&alice)]));
        assert_crlf_only(&out);

        let msg = MessageParser::default().parse(&out).unwrap();
        let from = msg.from().unwrap().first().unwrap();
        assert_eq!(from.address(), Some("MAILER-DAEMON@mx2.example.net"));
        assert_eq!(from.name(), Some("Mail Delivery System"));
        assert_eq!(
            msg.to().unwrap().first().unwrap().address(),
            Some("sender@example.org")
        );
        assert_eq!(msg.subject(), Some("Undelivered Mail Returned to Sender"));
        assert_eq!(msg.message_id(), Some("0KXXXXXXXXXXX.dsn@mx2.example.net"));
        assert_eq!(
            msg.date().unwrap().to_timestamp(),
            1_795_000_700,
            "Date: is now_ms"
        );
        assert_eq!(
            msg.header_raw("Auto-Submitted").map(str::trim),
            Some("auto-replied")
        );
        assert_eq!(msg.header_raw("MIME-Version").map(str::trim), Some("1.0"));
        let ct = msg.content_type().unwrap();
        assert_eq!((ct.ctype(), ct.subtype()), ("multipart", Some("report")));
        assert_eq!(ct.attribute("report-type"), Some("delivery-status"));

        let parts = parts(&out);
        let types: Vec<&str> = parts.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            types,
            [
                "text/plain",
                "message/delivery-status",
                "text/rfc822-headers"
            ]
        );
        let msg = MessageParser::default().parse(&out).unwrap();
        let ids = msg.parts[0].sub_parts().unwrap();
        assert_eq!(
            msg.parts[ids[0] as usize].content_transfer_encoding(),
            Some("7bit"),
            "an ASCII notice stays readable as sent"
        );
        let text = String::from_utf8(parts[0].1.clone()).unwrap();
        assert!(text.contains("mx2.example.net"), "{text}");
        assert!(text.contains("<alice@example.com>"), "{text}");
        assert!(
            text.contains("the mailbox does not exist (5.1.1)"),
            "{text}"
        );
        assert!(
            text.contains("mx1.example.com said: 550 5.1.1 <alice@example.com>: user unknown"),
            "{text}"
        );
    }

    #[test]
    fn success_and_relay_subjects() {
        let env = envelope(Ret::Headers, false);
        let alice = recipient("alice@example.com", None, Notify::SUCCESS);
        for (action, subject) in [
            (Action::Delivered, "Successful Mail Delivery Report"),
            (Action::Relayed, "Relayed mail delivery report"),
        ] {
            let r = RecipientReport {
                recipient: &alice,
                action,
                status: "2.0.0",
                remote_mta: Some("mx1.example.com"),
                diagnostic: Some("250 2.0.0 Ok: queued as 4XyZ"),
                last_attempt_ms: Some(1_795_000_600_000),
                will_retry_until_ms: None,
            };
            let out = build(&report(&env, ORIGINAL, vec![r]));
            let msg = MessageParser::default().parse(&out).unwrap();
            assert_eq!(msg.subject(), Some(subject));
            let (_, recipients) = status_groups(&parts(&out)[1].1);
            assert_eq!(get(&recipients[0], "Action"), Some(action.as_str()));
            assert_eq!(get(&recipients[0], "Status"), Some("2.0.0"));
        }
    }

    #[test]
    fn hostile_values_cannot_add_fields_or_lines() {
        let mut env = envelope(Ret::Headers, false);
        env.envid = Some("id\r\nX-Injected: 1".into());
        env.client.helo = "evil\r\nhost".into();
        let alice = recipient("alice@example.com\r\nX-Injected: 2", None, 0);
        let long = format!("550 5.7.1 {} {}", "x".repeat(3000), "word ".repeat(400));
        let r = RecipientReport {
            recipient: &alice,
            action: Action::Failed,
            status: "5.7.1\r\nX-Injected: 3",
            remote_mta: Some("mx1.example.com\r\nX-Injected: 4"),
            diagnostic: Some(&long),
            last_attempt_ms: None,
            will_retry_until_ms: None,
        };
        let mut rep = report(&env, ORIGINAL, vec![r]);
        rep.reporting_mta = "mx2.example.net\r\nX-Injected: 5";
        rep.message_id = "<id@host>\r\nX-Injected: 6";
        let out = build(&rep);
        assert_crlf_only(&out);
        let p = parts(&out);
        let (message, recipients) = status_groups(&p[1].1);
        for fields in std::iter::once(&message).chain(&recipients) {
            assert!(get(fields, "X-Injected").is_none(), "{fields:?}");
        }
        assert_eq!(get(&recipients[0], "Status"), Some("5.0.0"));
        let diag = get(&recipients[0], "Diagnostic-Code").unwrap();
        assert!(diag.starts_with("smtp; 550 5.7.1 xxx"), "{diag}");
        let msg = MessageParser::default().parse(&out).unwrap();
        assert!(msg.header_raw("X-Injected").is_none());
    }

    #[test]
    fn no_recipients_or_extreme_times_do_not_panic() {
        let env = envelope(Ret::Headers, false);
        let mut r = report(&env, ORIGINAL, vec![]);
        r.now_ms = u64::MAX;
        let out = build(&r);
        assert_eq!(parts(&out).len(), 3);

        let alice = recipient("", Some(";"), 0);
        let mut odd = failed(&alice);
        odd.last_attempt_ms = Some(u64::MAX);
        odd.will_retry_until_ms = Some(0);
        odd.status = "";
        let out = build(&report(&env, b"", vec![odd]));
        assert_eq!(parts(&out).len(), 3);
    }
}
