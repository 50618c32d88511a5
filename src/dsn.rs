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

use std::borrow::Cow;
use std::fmt::Write as _;

use mail_builder::MessageBuilder;
use mail_builder::headers::address::Address;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::date::Date;
use mail_builder::headers::raw::Raw;
use mail_builder::headers::text::Text;
use mail_builder::mime::{BodyPart, MimePart};
use memchr::memmem;

use crate::spool::{Envelope, Notify, Recipient, Ret};

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
    let global = envelope.smtputf8;
    let host = word(&clean(report.reporting_mta, global));
    let headline = report
        .recipients
        .iter()
        .map(|r| r.action)
        .max_by_key(|a| a.urgency())
        .unwrap_or(Action::Failed);

    let returned = returned(report, crlf(report.original));
    let text = human_text(report, &host, headline, &returned);
    let status = delivery_status(report, &host);

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

    let body = MimePart::new(
        ContentType::new("multipart/report")
            .attribute("report-type", "delivery-status")
            .attribute("boundary", boundary),
        vec![text_part, status_part, returned_part],
    );

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

/// The third part's content, and whether it is the whole message.
struct Returned<'a> {
    full: bool,
    content: Cow<'a, [u8]>,
    /// `RET=FULL` was asked but the message was over `max_full_bytes`.
    cut: bool,
}

/// Most bytes of header section we return. A header section this large is
/// abuse or a broken client; the sender needs enough to recognise the
/// message, not all of it, and a notice must stay small enough to deliver.
const MAX_RETURNED_HEADERS: usize = 256 * 1024;

fn returned<'a>(report: &Report, original: Cow<'a, [u8]>) -> Returned<'a> {
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

/// The `message/delivery-status` content (RFC 3464 §2.1): per-message fields,
/// then one blank-line separated group per recipient.
fn delivery_status(report: &Report, host: &str) -> String {
    let envelope = report.envelope;
    let global = envelope.smtputf8;
    let mut out = String::with_capacity(512 + 256 * report.recipients.len());
    if let Some(envid) = &envelope.envid {
        // ENVID is xtext on the wire and always ASCII; anything else is noise.
        field(&mut out, "Original-Envelope-Id", &clean(envid, false));
    }
    field(&mut out, "Reporting-MTA", &format!("dns; {host}"));
    let helo = word(&clean(&envelope.client.helo, global));
    let ip = match envelope.client.ip.to_canonical() {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("IPv6:{v6}"),
    };
    field(
        &mut out,
        "Received-From-MTA",
        &format!(
            "dns; {} ([{ip}])",
            if helo.is_empty() { "unknown" } else { &helo }
        ),
    );
    field(&mut out, "Arrival-Date", &rfc5322_date(envelope.arrived_ms));
    // An extension field (RFC 3464 §2.4), last as the syntax wants: the queue
    // ID is what the operator greps the logs for when the sender asks.
    field(&mut out, "X-Mxspool-Queue-ID", &envelope.id.to_string());

    for r in &report.recipients {
        out.push_str("\r\n");
        if let Some(orcpt) = &r.recipient.orcpt {
            field(
                &mut out,
                "Original-Recipient",
                &original_recipient(orcpt, global),
            );
        }
        field(
            &mut out,
            "Final-Recipient",
            &typed_address(&r.recipient.address, global),
        );
        field(&mut out, "Action", r.action.as_str());
        field(&mut out, "Status", status_code(r.status, r.action));
        if let Some(mta) = r.remote_mta.map(|m| word(&clean(m, global)))
            && !mta.is_empty()
        {
            field(&mut out, "Remote-MTA", &format!("dns; {mta}"));
        }
        if let Some(diag) = r.diagnostic.map(|d| clean(d, global))
            && !diag.is_empty()
        {
            let kind = if is_smtp_reply(&diag) {
                "smtp"
            } else {
                "X-mxspool"
            };
            field(&mut out, "Diagnostic-Code", &format!("{kind}; {diag}"));
        }
        if let Some(ms) = r.last_attempt_ms {
            field(&mut out, "Last-Attempt-Date", &rfc5322_date(ms));
        }
        if let Some(ms) = r.will_retry_until_ms {
            field(&mut out, "Will-Retry-Until", &rfc5322_date(ms));
        }
    }
    out
}

/// Whether a diagnostic is an SMTP reply (`550 5.1.1 …`, `421-…`), which
/// RFC 3464 §2.3.6 types `smtp`. Anything else (a refused connection, a DNS
/// failure) is our own words and gets our private type, as Postfix uses
/// `X-Postfix`.
fn is_smtp_reply(text: &str) -> bool {
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
fn pieces(word: &str, max: usize) -> impl Iterator<Item = &str> {
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
fn clean(text: &str, keep_utf8: bool) -> String {
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
fn word(text: &str) -> String {
    text.chars().filter(|c| !c.is_whitespace()).collect()
}

/// An address as it goes in `<…>` of a header: one token without controls.
fn address_text(address: &str) -> String {
    word(address).replace(['<', '>'], "")
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
fn status_code(status: &str, action: Action) -> &str {
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

/// A phrase for the common RFC 3463 codes, so a person need not look them up.
fn describe(status: &str) -> Option<&'static str> {
    let mut parts = status.split('.');
    let class = parts.next()?;
    if class == "2" {
        return None;
    }
    let subject: u16 = parts.next()?.parse().ok()?;
    let detail: u16 = parts.next()?.parse().ok()?;
    Some(match (subject, detail) {
        (1, 1) => "the mailbox does not exist",
        (1, 2) => "the recipient's domain does not exist",
        (1, 3) => "the recipient's address is not valid",
        (1, 10) => "the recipient's domain accepts no mail",
        (1, _) => "there is a problem with the recipient's address",
        (2, 1) => "the mailbox is disabled",
        (2, 2) => "the mailbox is full",
        (2, 3) => "the message is too large for the mailbox",
        (2, _) => "there is a problem with the recipient's mailbox",
        (3, 1) => "the receiving mail system is full",
        (3, 4) => "the message is too large for the receiving system",
        (3, _) => "the receiving mail system has a problem",
        (4, 1) => "the receiving mail server did not answer",
        (4, 2) => "the connection to the receiving mail server broke",
        (4, 3) => "a DNS lookup failed",
        (4, 4) => "no route to the recipient's domain was found",
        (4, 6) => "a mail routing loop was detected",
        (4, 7) => "the message stayed in the queue too long",
        (4, _) => "a network or routing problem occurred",
        (5, _) => "the receiving mail server reported a protocol error",
        (6, _) => "the receiving mail server could not accept the message's content",
        (7, _) => "the receiving mail server refused the message for policy reasons",
        _ => return None,
    })
}

/// The part for people: what happened, to whom, what the remote server
/// said, and what happens next.
fn human_text(report: &Report, host: &str, headline: Action, returned: &Returned) -> String {
    let envelope = report.envelope;
    let global = envelope.smtputf8;
    let mut out = String::with_capacity(1024 + 300 * report.recipients.len());
    para(
        &mut out,
        &format!("This is the mail system at host {host}."),
    );

    let opening = match headline {
        Action::Failed => {
            "Your message could not be delivered to one or more of its recipients: \
             the mail system has stopped trying for those listed below."
        }
        Action::Delayed => {
            "Your message has not yet been delivered to one or more of its recipients. \
             This is only a warning: the mail system is still trying, and you do not \
             need to send the message again."
        }
        Action::Delivered => {
            "Your message was delivered to the recipients listed below, as you asked \
             to be told."
        }
        Action::Relayed => {
            "Your message was passed on to the recipients' mail system, which does not \
             send delivery notifications, so you will get no further notice about the \
             recipients listed below."
        }
    };
    para(&mut out, opening);

    let attached = match (returned.full, returned.cut) {
        (true, _) => "The message is attached below.",
        (false, true) => {
            "The message was too large to return in full; only its header section \
             is attached below."
        }
        (false, false) => "The header section of the message is attached below.",
    };
    let help = match headline {
        Action::Failed | Action::Delayed => {
            " If you need help, forward this notice to your postmaster or mail \
             administrator."
        }
        Action::Delivered | Action::Relayed => "",
    };
    para(&mut out, &format!("{attached}{help}"));

    let sender = if envelope.sender.is_empty() {
        "<>".to_string()
    } else {
        format!("<{}>", clean(&envelope.sender, true))
    };
    para(
        &mut out,
        &format!(
            "The message came from {sender} and was received here on {} with queue ID {}.",
            rfc5322_date(envelope.arrived_ms),
            envelope.id
        ),
    );

    let sections = [
        (
            Action::Failed,
            "Could not be delivered, no longer being tried:",
        ),
        (Action::Delayed, "Delayed, still being retried:"),
        (Action::Delivered, "Delivered:"),
        (
            Action::Relayed,
            "Relayed to a mail system that sends no notifications:",
        ),
    ];
    for (action, title) in sections {
        let mut listed = report
            .recipients
            .iter()
            .filter(|r| r.action == action)
            .peekable();
        if listed.peek().is_none() {
            continue;
        }
        out.push_str(title);
        out.push_str("\r\n\r\n");
        for r in listed {
            recipient_text(&mut out, r, global);
        }
    }
    while out.ends_with("\r\n\r\n") {
        out.truncate(out.len() - 2);
    }
    out
}

fn recipient_text(out: &mut String, r: &RecipientReport, global: bool) {
    let address = clean(&r.recipient.address, true);
    let status = status_code(r.status, r.action);
    let mut line = format!("<{address}>");
    if let Some(orcpt) = &r.recipient.orcpt {
        let original = orcpt
            .split_once(';')
            .filter(|(kind, _)| kind.trim().eq_ignore_ascii_case("rfc822"))
            .map_or(orcpt.as_str(), |(_, a)| a);
        let original = clean(original, true);
        if !original.is_empty() && !original.eq_ignore_ascii_case(&address) {
            let _ = write!(line, " (originally addressed to <{original}>)");
        }
    }
    match describe(status) {
        Some(why) => {
            let _ = write!(line, ": {why} ({status}).");
        }
        None => {
            let _ = write!(line, ": status {status}.");
        }
    }
    let indent = "    ";
    wrap(out, &line, "", indent);
    if let Some(diag) = r.diagnostic.map(|d| clean(d, global))
        && !diag.is_empty()
    {
        if is_smtp_reply(&diag) {
            let who = r
                .remote_mta
                .map(|m| word(&clean(m, global)))
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| "The remote server".to_string());
            line_in(out, &format!("{who} said: {diag}"), indent);
        } else {
            line_in(out, &format!("Reason: {diag}"), indent);
        }
    } else if let Some(mta) = r.remote_mta.map(|m| word(&clean(m, global)))
        && !mta.is_empty()
    {
        line_in(out, &format!("Remote server: {mta}"), indent);
    }
    if let Some(ms) = r.last_attempt_ms {
        line_in(out, &format!("Last attempt: {}", rfc5322_date(ms)), indent);
    }
    if let Some(ms) = r.will_retry_until_ms {
        let then = if wants(r.recipient.notify, Action::Failed) {
            "you will get another notice"
        } else {
            "it will be given up without further notice, as you asked"
        };
        line_in(
            out,
            &format!(
                "Next step: delivery will be retried until {}; if it still fails \
                 by then, {then}.",
                rfc5322_date(ms)
            ),
            indent,
        );
    }
    out.push_str("\r\n");
}

/// Width of the human text. mail-builder sends text with lines over 75
/// characters as quoted-printable; shorter lines keep an ASCII notice 7bit
/// and readable as it is.
const TEXT_WIDTH: usize = 72;

/// Appends `text` wrapped at spaces, then a blank line.
fn para(out: &mut String, text: &str) {
    wrap(out, text, "", "");
    out.push_str("\r\n");
}

/// Appends `text` wrapped, every line indented by `indent`, with no blank
/// line after it.
fn line_in(out: &mut String, text: &str, indent: &str) {
    wrap(out, text, indent, indent);
}

fn wrap(out: &mut String, text: &str, first: &str, rest: &str) {
    out.push_str(first);
    let mut column = first.len();
    let mut words_on_line = 0;
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        for piece in pieces(word, TEXT_WIDTH - rest.len()) {
            if words_on_line > 0 && column + 1 + piece.len() > TEXT_WIDTH {
                out.push_str("\r\n");
                out.push_str(rest);
                column = rest.len();
                words_on_line = 0;
            }
            if words_on_line > 0 {
                out.push(' ');
                column += 1;
            }
            out.push_str(piece);
            column += piece.len();
            words_on_line += 1;
        }
    }
    out.push_str("\r\n");
}

/// Angle brackets are the header's syntax, not part of the ID
/// (mail-builder adds them).
fn message_id(id: &str) -> String {
    let id = id.trim();
    let id = id.strip_prefix('<').unwrap_or(id);
    let id = id.split('>').next().unwrap_or(id);
    word(&clean(id, false))
}

fn unix_seconds(ms: u64) -> i64 {
    i64::try_from(ms / 1000).unwrap_or(i64::MAX)
}

fn rfc5322_date(ms: u64) -> String {
    Date::new(unix_seconds(ms)).to_rfc822()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{BodyType, Client, QueueId, RcptStatus};
    use mail_parser::{MessageParser, MimeHeaders};

    const HOST: &str = "mx2.example.net";
    const ORIGINAL: &[u8] = b"Received: from client.example.org ([192.0.2.7])\r\n\tby mx2.example.net (mxspool) with ESMTP id 0000000000001; Tue, 24 Nov 2026 10:00:00 +0000\r\nFrom: Sender <sender@example.org>\r\nTo: alice@example.com\r\nSubject: Quarterly figures\r\nMessage-ID: <orig-1@example.org>\r\n\r\nHello Alice,\r\n\r\nthe figures are attached.\r\n";

    fn envelope(ret: Ret, smtputf8: bool) -> Envelope {
        Envelope {
            id: QueueId(0x0123_4567_89ab),
            sender: "sender@example.org".into(),
            ret,
            envid: Some("QQ314159".into()),
            body_type: BodyType::SevenBit,
            smtputf8,
            has_8bit: false,
            arrived_ms: 1_795_000_000_000,
            size: ORIGINAL.len() as u64,
            client: Client {
                ip: "192.0.2.7".parse().unwrap(),
                helo: "client.example.org".into(),
                tls: false,
            },
            recipients: vec![],
        }
    }

    fn recipient(address: &str, orcpt: Option<&str>, notify: u8) -> Recipient {
        Recipient {
            address: address.into(),
            orcpt: orcpt.map(Into::into),
            notify: Notify(notify),
            status: RcptStatus::Queued,
            attempts: 3,
            next_attempt_ms: 0,
            last_reply: None,
            unreachable: false,
            delay_notified: false,
            suspect: false,
        }
    }

    fn failed(r: &Recipient) -> RecipientReport<'_> {
        RecipientReport {
            recipient: r,
            action: Action::Failed,
            status: "5.1.1",
            remote_mta: Some("mx1.example.com"),
            diagnostic: Some("550 5.1.1 <alice@example.com>: user unknown"),
            last_attempt_ms: Some(1_795_000_600_000),
            will_retry_until_ms: None,
        }
    }

    fn delayed(r: &Recipient) -> RecipientReport<'_> {
        RecipientReport {
            recipient: r,
            action: Action::Delayed,
            status: "4.4.1",
            remote_mta: None,
            diagnostic: Some("connect to mx1.example.com[192.0.2.10]:25: Connection refused"),
            last_attempt_ms: Some(1_795_000_600_000),
            will_retry_until_ms: Some(1_795_432_000_000),
        }
    }

    fn report<'a>(
        envelope: &'a Envelope,
        original: &'a [u8],
        recipients: Vec<RecipientReport<'a>>,
    ) -> Report<'a> {
        Report {
            reporting_mta: HOST,
            envelope,
            original,
            recipients,
            now_ms: 1_795_000_700_000,
            message_id: "<0KXXXXXXXXXXX.dsn@mx2.example.net>",
            max_full_bytes: 1 << 20,
        }
    }

    /// The three parts' (content type, raw content) in order.
    fn parts(out: &[u8]) -> Vec<(String, Vec<u8>)> {
        let msg = MessageParser::default().parse(out).expect("parses");
        let root = &msg.parts[0];
        let ids = root.sub_parts().expect("multipart");
        ids.iter()
            .map(|&id| {
                let part = &msg.parts[id as usize];
                let ct = part.content_type().expect("content type");
                (
                    format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or("")),
                    part.contents().to_vec(),
                )
            })
            .collect()
    }

    /// The delivery-status part as (per-message fields, per-recipient groups),
    /// each a list of (name, unfolded value).
    type Fields = Vec<(String, String)>;
    fn status_groups(content: &[u8]) -> (Fields, Vec<Fields>) {
        let text = std::str::from_utf8(content).unwrap();
        let mut groups = text
            .split("\r\n\r\n")
            .filter(|g| !g.trim().is_empty())
            .map(|g| {
                let unfolded = g.replace("\r\n ", " ").replace("\r\n\t", " ");
                unfolded
                    .lines()
                    .map(|l| {
                        let (n, v) = l.split_once(':').expect("a field");
                        (n.to_string(), v.trim().to_string())
                    })
                    .collect::<Fields>()
            });
        let first = groups.next().unwrap();
        (first, groups.collect())
    }

    fn get<'f>(fields: &'f Fields, name: &str) -> Option<&'f str> {
        fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn assert_crlf_only(out: &[u8]) {
        for (i, &b) in out.iter().enumerate() {
            if b == b'\n' {
                assert_eq!(out.get(i.wrapping_sub(1)), Some(&b'\r'), "bare LF at {i}");
            }
            if b == b'\r' {
                assert_eq!(out.get(i + 1), Some(&b'\n'), "bare CR at {i}");
            }
        }
        for line in out.split(|&b| b == b'\n') {
            assert!(line.len() <= 1000, "line of {} bytes", line.len());
        }
    }

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
    fn delayed_recipient_fields_and_text() {
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

        let text = String::from_utf8(parts[0].1.clone()).unwrap();
        assert!(text.contains("only a warning"), "{text}");
        assert!(text.contains("retried until"), "{text}");
        assert!(
            text.contains("Reason: connect to mx1.example.com"),
            "{text}"
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
