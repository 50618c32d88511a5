//! The envelope of a fetched message, worked out from the message alone.
//!
//! Mail fetched from a catch-all mailbox has lost its SMTP envelope: the
//! provider delivered it to one mailbox, and all we get back is the message.
//! [`derive`] decides, as a pure function of the bytes, the account's texts
//! and a recipient check, what to do with it ([`Derived`]):
//!
//! - **Recipients** come first from the fields a provider adds when it
//!   delivers (`Delivered-To`, `X-Original-To`, `Envelope-To`,
//!   `X-Envelope-To`, and the `for` clause of the top `Received:`): they name
//!   the one recipient this copy was for, including a Bcc'd one, and a
//!   message to two of our users arrives once per user, so To/Cc would
//!   deliver each copy twice. Only when those fields name no address at our
//!   domains (none present, or only the provider's own mailbox name, which
//!   is Foreign) do `To`, `Cc`, `Bcc`, `Resent-To` and `Resent-Cc` count. An
//!   envelope field naming only addresses at our domains that the checker
//!   does not know ([`Verdict::Unknown`]) does *not* fall back to To/Cc:
//!   that copy was for the unknown recipient, and To/Cc would hand it to
//!   someone who got (or never should get) their own copy; it goes to the
//!   postmaster instead. Only [`Verdict::Ours`] addresses are kept, each once
//!   (ignoring case), in the order the fields appear.
//! - **Addresses that do not parse** are repaired where the intent is
//!   unambiguous (stray spaces around `@`, `@@`, trailing dots on the domain,
//!   angle-bracket, quote and `mailto:` noise); mail-parser reads each field
//!   first, and a field it gets nothing usable from is split and repaired
//!   from its raw value. What is still not `local@domain` with a valid domain
//!   name is ignored; a local part with `@`, `%` or `!` (source routing) is
//!   never produced.
//! - **The sender** is the first `Return-Path:` (`<>`, missing or invalid:
//!   the null sender).
//! - **The body** is the message with CRLF line endings and without its
//!   `Delivered-To:` and `Return-Path:` fields: a primary reading its own
//!   recipient in `Delivered-To:` takes the message for a mail loop, and the
//!   return path is the delivering server's to write. Every other byte is
//!   kept (8-bit headers, overlong lines and all); the caller prepends its
//!   own `Received:`.
//! - **No usable recipient**: the message goes to the postmaster with an
//!   `X-Mxspool-Fetch-Reason:` field saying why ([`Derived::Orphan`]).
//! - **Not a message** (empty, no header section, NUL in the header section,
//!   or mail-parser finds none): a new message to the postmaster carrying
//!   the original bytes as an attachment ([`Derived::Unparseable`]), so
//!   nothing fetched is ever dropped.
//!
//! It must not read the clock, the configuration or the spool, and must not
//! panic: the fetched bytes are untrusted input.

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};

use mail_builder::MessageBuilder;
use mail_builder::headers::address::Address as Mailbox;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::date::Date;
use mail_builder::headers::raw::Raw;
use mail_builder::mime::{BodyPart, MimePart};
use mail_parser::{Address, Header, HeaderValue, Message, MessageParser};

use super::repair::{repair, split_list};

/// How a fetched address relates to the block's domains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A recipient of ours: the address to deliver to, as the checker
    /// normalised it.
    Ours(String),
    /// At one of our domains, but not in its recipient list.
    Unknown,
    /// Not at any of the block's domains.
    Foreign,
}

/// What to do with one fetched message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Derived {
    /// Deliver to these recipients (each once, in the order found), with
    /// this envelope sender (`""` is `<>`).
    Deliver {
        sender: String,
        recipients: Vec<String>,
        body: Vec<u8>,
    },
    /// No usable recipient: deliver to the block's postmaster as it is.
    /// `reason` (one line of printable ASCII) says why; `body` already
    /// starts with an `X-Mxspool-Fetch-Reason:` field carrying it.
    Orphan {
        sender: String,
        reason: String,
        body: Vec<u8>,
    },
    /// Not a message at all: `body` is a new message to the postmaster,
    /// with the fetched bytes attached unchanged, to be sent from `<>`.
    Unparseable { reason: String, body: Vec<u8> },
}

/// What the texts of [`Derived`] say about where the message came from.
#[derive(Clone, Copy, Debug)]
pub struct Context<'a> {
    /// The `[[fetch]]` block's name, so the postmaster knows which mailbox.
    pub account: &'a str,
    /// The block's postmaster: `From:` and `To:` of the Unparseable wrapper.
    pub postmaster: &'a str,
    /// Our host name: the wrapper's `Message-ID:` domain.
    pub hostname: &'a str,
    /// Unix seconds: the wrapper's `Date:` (given, not read: a pure function).
    pub date: i64,
}

/// The field an Orphan's body starts with.
pub const REASON_FIELD: &str = "X-Mxspool-Fetch-Reason";
/// The file name of the original in the Unparseable wrapper.
pub const ATTACHMENT_NAME: &str = "fetched-message.eml";

/// Where a provider writes the recipient it delivered to, besides the top
/// `Received: … for`.
const ENVELOPE_FIELDS: [&str; 4] = [
    "Delivered-To",
    "X-Original-To",
    "Envelope-To",
    "X-Envelope-To",
];
/// Where the sender wrote the recipients: read when the envelope fields
/// name none of ours.
const HEADER_FIELDS: [&str; 5] = ["To", "Cc", "Bcc", "Resent-To", "Resent-Cc"];
/// Removed before delivery (see the module documentation).
const REMOVED_FIELDS: [&str; 2] = ["Delivered-To", "Return-Path"];
/// Addresses a reason lists before saying "and N more".
const LISTED: usize = 5;
/// A reason's length limit, far below a header line's 998 octets.
const MAX_REASON: usize = 400;
/// Where the reason field is folded.
const FOLD_AT: usize = 78;

/// What to do with the fetched message `raw`. `judge` tells whether a
/// candidate address (already repaired, `local@domain`) is ours.
pub fn derive(raw: &[u8], cx: &Context<'_>, judge: &dyn Fn(&str) -> Verdict) -> Derived {
    let text = crlf(raw);
    let message = match parse(raw, &text) {
        Ok(message) => message,
        Err(reason) => {
            return Derived::Unparseable {
                reason: reason.to_owned(),
                body: wrapper(raw, cx, reason),
            };
        }
    };
    let sender = sender(&message, &text);
    let body = without_removed_fields(&text);
    match recipients(&message, &text, judge) {
        Ok(recipients) => Derived::Deliver {
            sender,
            recipients,
            body,
        },
        Err(reason) => {
            let reason = reason_line(&reason);
            let mut with_reason = fold(REASON_FIELD, &reason).into_bytes();
            with_reason.extend_from_slice(&body);
            Derived::Orphan {
                sender,
                reason,
                body: with_reason,
            }
        }
    }
}

/// The Message-ID (without angle brackets, trimmed), for duplicate
/// detection; `None` if absent or empty. With several IDs, the first.
pub fn message_id(raw: &[u8]) -> Option<String> {
    let message = MessageParser::default().parse(raw)?;
    let id = match message.header("Message-ID")? {
        HeaderValue::Text(id) => id.as_ref(),
        HeaderValue::TextList(ids) => ids.first()?.as_ref(),
        _ => return None,
    };
    let id = id
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim();
    (!id.is_empty()).then(|| id.to_owned())
}

/// `raw` with CRLF line endings only: a bare LF or a lone CR becomes CRLF,
/// and the last line ends with one.
fn crlf(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 32 + 2);
    let mut bytes = raw.iter().copied().peekable();
    while let Some(b) = bytes.next() {
        match b {
            b'\r' => {
                bytes.next_if_eq(&b'\n');
                out.extend_from_slice(b"\r\n");
            }
            b'\n' => out.extend_from_slice(b"\r\n"),
            _ => out.push(b),
        }
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The parsed message, or why `raw` is not one. `text` is `raw` after
/// [`crlf`]: the offsets of the fields read later point into it.
fn parse<'a>(raw: &[u8], text: &'a [u8]) -> Result<Message<'a>, &'static str> {
    if raw.is_empty() {
        return Err("the fetched message is empty");
    }
    let section = header_section(text);
    let first = section.split(|&b| b == b'\n').next().unwrap_or_default();
    if field_name(first).is_none() {
        return Err("no header section: the first line is not a header field");
    }
    if section.contains(&0) {
        return Err("the header section contains a NUL byte");
    }
    MessageParser::default()
        .parse(text)
        .ok_or("the message parser found no message")
}

/// The header section of CRLF `text`: every line before the first empty
/// one, with its CRLF (all of `text` when there is no empty line).
fn header_section(text: &[u8]) -> &[u8] {
    if text.starts_with(b"\r\n") {
        return &[];
    }
    match memchr::memmem::find(text, b"\r\n\r\n") {
        Some(at) => text.get(..at + 2).unwrap_or(text),
        None => text,
    }
}

/// The name of the field `line` starts, if it starts one: the text before
/// the first colon (space before the colon allowed, RFC 5322 §4.5), at least
/// one octet of printable ASCII.
fn field_name(line: &[u8]) -> Option<&[u8]> {
    let colon = memchr::memchr(b':', line)?;
    let name = line.get(..colon)?;
    let end = name.iter().rposition(|&b| b != b' ' && b != b'\t')? + 1;
    let name = name.get(..end)?;
    name.iter()
        .all(|&b| (33..=126).contains(&b))
        .then_some(name)
}

/// CRLF `text` without its `Delivered-To:` and `Return-Path:` fields (and
/// their continuation lines); everything else byte for byte. Names compare
/// ignoring case and white space, as mail-parser reads them.
fn without_removed_fields(text: &[u8]) -> Vec<u8> {
    let section = header_section(text);
    let mut out = Vec::with_capacity(text.len());
    let mut dropping = false;
    for line in section.split_inclusive(|&b| b == b'\n') {
        if !matches!(line.first(), Some(b' ' | b'\t')) {
            dropping = REMOVED_FIELDS.iter().any(|name| is_named(line, name));
        }
        if !dropping {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(text.get(section.len()..).unwrap_or_default());
    out
}

/// Whether the field starting on `line` is called `name`.
fn is_named(line: &[u8], name: &str) -> bool {
    let Some(colon) = memchr::memchr(b':', line) else {
        return false;
    };
    line.iter()
        .take(colon)
        // Spaces and control bytes in a name are no part of it for a
        // lenient parser downstream: `\x0cReturn-Path:` must go too.
        .filter(|&&b| b > b' ' && b != 0x7f)
        .map(u8::to_ascii_lowercase)
        .eq(name.bytes().map(|b| b.to_ascii_lowercase()))
}

/// The addresses one group of fields named, by verdict, each once.
#[derive(Default)]
struct Found {
    ours: Vec<String>,
    unknown: Vec<String>,
    foreign: Vec<String>,
}

impl Found {
    /// Asks `judge` about each address once (ignoring case), keeping the
    /// order; two addresses the checker turns into one count once.
    fn by_verdict(addresses: Vec<String>, judge: &dyn Fn(&str) -> Verdict) -> Found {
        let mut found = Found::default();
        let mut asked = HashSet::new();
        let mut kept = HashSet::new();
        for address in addresses {
            if !asked.insert(address.to_lowercase()) {
                continue;
            }
            match judge(&address) {
                Verdict::Ours(to) => {
                    if kept.insert(to.to_lowercase()) {
                        found.ours.push(to);
                    }
                }
                Verdict::Unknown => found.unknown.push(address),
                Verdict::Foreign => found.foreign.push(address),
            }
        }
        found
    }
}

/// The recipients (see the module documentation), or why there are none.
fn recipients(
    message: &Message<'_>,
    text: &[u8],
    judge: &dyn Fn(&str) -> Verdict,
) -> Result<Vec<String>, String> {
    let envelope = Found::by_verdict(envelope_addresses(message, text), judge);
    if !envelope.ours.is_empty() {
        return Ok(envelope.ours);
    }
    if !envelope.unknown.is_empty() {
        return Err(not_listed(&envelope.unknown));
    }
    let headers = Found::by_verdict(named_addresses(message, text, &HEADER_FIELDS), judge);
    if !headers.ours.is_empty() {
        return Ok(headers.ours);
    }
    if !headers.unknown.is_empty() {
        return Err(not_listed(&headers.unknown));
    }
    Err(none_ours(&envelope.foreign, &headers.foreign))
}

/// The addresses of the envelope fields and of the top `Received:`'s
/// `for`, in the order the fields appear.
fn envelope_addresses(message: &Message<'_>, text: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut top = true;
    for header in message.headers() {
        let name = header.name.as_str();
        if ENVELOPE_FIELDS.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            out.extend(addresses(header, text));
        } else if top && name.eq_ignore_ascii_case("Received") {
            top = false;
            out.extend(received_for(header, text));
        }
    }
    out
}

/// The addresses of the fields called one of `names`, in order.
fn named_addresses(message: &Message<'_>, text: &[u8], names: &[&str]) -> Vec<String> {
    message
        .headers()
        .iter()
        .filter(|h| {
            names
                .iter()
                .any(|n| n.eq_ignore_ascii_case(h.name.as_str()))
        })
        .flat_map(|h| addresses(h, text))
        .collect()
}

/// One address field's addresses, repaired: as mail-parser read them, or,
/// when that gives none, as its raw value lists them.
fn addresses(header: &Header<'_>, text: &[u8]) -> Vec<String> {
    let parsed: Vec<String> = parsed_addresses(&header.value).filter_map(repair).collect();
    if !parsed.is_empty() {
        return parsed;
    }
    split_list(&raw_value(header, text))
        .iter()
        .filter_map(|piece| repair(piece))
        .collect()
}

/// The addresses mail-parser found in an address field, groups included.
fn parsed_addresses<'v>(value: &'v HeaderValue<'_>) -> impl Iterator<Item = &'v str> {
    let addrs: Vec<_> = match value {
        HeaderValue::Address(Address::List(list)) => list.iter().collect(),
        HeaderValue::Address(Address::Group(groups)) => {
            groups.iter().flat_map(|g| &g.addresses).collect()
        }
        _ => Vec::new(),
    };
    addrs.into_iter().filter_map(|a| a.address.as_deref())
}

/// The `for` address of a `Received:` field: mail-parser's reading, else
/// the word after `for` in the raw value.
fn received_for(header: &Header<'_>, text: &[u8]) -> Option<String> {
    if let HeaderValue::Received(received) = &header.value
        && let Some(address) = received.for_.as_deref().and_then(repair)
    {
        return Some(address);
    }
    let value = raw_value(header, text);
    let words: Vec<&str> = value.split_whitespace().collect();
    words.windows(2).find_map(|pair| match pair {
        [word, next] if word.eq_ignore_ascii_case("for") => {
            repair(next.trim_matches(|c| matches!(c, ';' | ',' | '(' | ')')))
        }
        _ => None,
    })
}

/// The envelope sender: the first `Return-Path:`, repaired; `""` (`<>`)
/// when it is missing, `<>` or not an address.
fn sender(message: &Message<'_>, text: &[u8]) -> String {
    let Some(header) = message
        .headers()
        .iter()
        .find(|h| h.name.as_str().eq_ignore_ascii_case("Return-Path"))
    else {
        return String::new();
    };
    let parsed = match &header.value {
        HeaderValue::Text(path) => repair(path),
        HeaderValue::TextList(paths) => paths.first().and_then(|p| repair(p)),
        _ => None,
    };
    parsed
        .or_else(|| {
            split_list(&raw_value(header, text))
                .first()
                .and_then(|p| repair(p))
        })
        .unwrap_or_default()
}

/// A field's value as it stands in the message, unfolded.
fn raw_value(header: &Header<'_>, text: &[u8]) -> String {
    let range = header.offset_start as usize..header.offset_end as usize;
    let bytes = text.get(range).unwrap_or_default();
    String::from_utf8_lossy(bytes).replace(['\r', '\n'], "")
}

/// Why addresses at our domains were not delivered to.
fn not_listed(unknown: &[String]) -> String {
    format!(
        "recipients at our domains not in the recipient list: {}",
        listing(unknown)
    )
}

/// Why no field named a recipient of ours, with what they did name.
fn none_ours(envelope: &[String], headers: &[String]) -> String {
    let mut seen = HashSet::new();
    let named: Vec<String> = envelope
        .iter()
        .chain(headers)
        .filter(|a| seen.insert(a.to_lowercase()))
        .cloned()
        .collect();
    if named.is_empty() {
        return "no recipient address in the envelope fields or To/Cc".to_owned();
    }
    format!(
        "no recipient at our domains in the envelope fields or To/Cc (seen: {})",
        listing(&named)
    )
}

/// The first few addresses, and how many more there were.
fn listing(addresses: &[String]) -> String {
    let shown = addresses
        .iter()
        .take(LISTED)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    match addresses.len().saturating_sub(LISTED) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

/// `text` as one line of printable ASCII: white space runs become one
/// space, anything else outside ASCII a `?`; cut to [`MAX_REASON`].
fn reason_line(text: &str) -> String {
    let ascii: String = text
        .chars()
        .map(|c| match c {
            ' '..='~' => c,
            _ if c.is_whitespace() => ' ',
            _ => '?',
        })
        .collect();
    let mut line = ascii.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.len() > MAX_REASON {
        line.truncate(MAX_REASON - 3);
        line.push_str("...");
    }
    line
}

/// The header field `name: value`, folded at spaces before [`FOLD_AT`]
/// columns (a word longer than that stays whole: [`MAX_REASON`] keeps it
/// under 998), ending in CRLF. Unfolded, the value is `value` again.
fn fold(name: &str, value: &str) -> String {
    let mut out = format!("{name}:");
    let mut column = out.len();
    let mut first = true;
    for word in value.split(' ').filter(|w| !w.is_empty()) {
        if !first && column + 1 + word.len() > FOLD_AT {
            out.push_str("\r\n");
            column = 0;
        }
        out.push(' ');
        out.push_str(word);
        column += 1 + word.len();
        first = false;
    }
    out.push_str("\r\n");
    out
}

/// The message telling the postmaster that a fetched message could not be
/// read, with its bytes attached unchanged (base64, so nothing on the way
/// alters them). Deterministic: the boundary and the Message-ID come from
/// the bytes and the date.
fn wrapper(raw: &[u8], cx: &Context<'_>, reason: &str) -> Vec<u8> {
    let mut hasher = DefaultHasher::new();
    raw.hash(&mut hasher);
    cx.date.hash(&mut hasher);
    let seed = hasher.finish();
    let text = format!(
        "mxspool fetched a message from the mailbox of the fetch account \"{}\"\r\n\
         that it could not read as an e-mail message: {reason}.\r\n\
         \r\n\
         The fetched bytes ({} octets) are attached unchanged as {ATTACHMENT_NAME}.\r\n",
        cx.account,
        raw.len(),
    );
    let parts = vec![
        MimePart::new("text/plain", text),
        MimePart::new("application/octet-stream", BodyPart::Binary(raw.into()))
            .attachment(ATTACHMENT_NAME),
    ];
    let boundary = format!("mxspool-fetch-{seed:016x}");
    let body = MimePart::new(
        ContentType::new("multipart/mixed").attribute("boundary", boundary),
        parts,
    );
    let mut out = Vec::with_capacity(raw.len() * 4 / 3 + 2048);
    MessageBuilder::new()
        .from(Mailbox::new_address(Some("mxspool"), cx.postmaster))
        .to(Mailbox::new_address(None::<&str>, cx.postmaster))
        .subject(format!(
            "Fetched message could not be parsed ({})",
            cx.account
        ))
        .date(Date::new(cx.date))
        .message_id(format!("{seed:016x}.{}.fetch@{}", cx.date, cx.hostname))
        .header("Auto-Submitted", Raw::new("auto-generated"))
        .body(body)
        .serialize(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use mail_parser::MimeHeaders;

    use super::*;

    const CX: Context<'static> = Context {
        account: "isp-catchall",
        postmaster: "postmaster@example.com",
        hostname: "mx2.example.net",
        date: 1_795_000_000,
    };

    /// Our domain is example.com, whose list lacks nobody@.
    fn judge(address: &str) -> Verdict {
        let lower = address.to_lowercase();
        if lower == "nobody@example.com" {
            Verdict::Unknown
        } else if lower.ends_with("@example.com") {
            Verdict::Ours(lower)
        } else {
            Verdict::Foreign
        }
    }

    fn derived(raw: &str) -> Derived {
        derive(raw.as_bytes(), &CX, &judge)
    }

    /// (sender, recipients, body) of a message that must be delivered.
    fn delivered(raw: &str) -> (String, Vec<String>, String) {
        match derived(raw) {
            Derived::Deliver {
                sender,
                recipients,
                body,
            } => (sender, recipients, String::from_utf8(body).unwrap()),
            other => panic!("not delivered: {other:?}"),
        }
    }

    fn recipients_of(raw: &str) -> Vec<String> {
        delivered(raw).1
    }

    /// (reason, body) of a message that must go to the postmaster as it is.
    fn orphaned(raw: &str) -> (String, String) {
        match derived(raw) {
            Derived::Orphan { reason, body, .. } => (reason, String::from_utf8(body).unwrap()),
            other => panic!("not an orphan: {other:?}"),
        }
    }

    fn unparseable(raw: &[u8]) -> (String, Vec<u8>) {
        match derive(raw, &CX, &judge) {
            Derived::Unparseable { reason, body } => (reason, body),
            other => panic!("parsed: {other:?}"),
        }
    }

    fn assert_crlf_only(body: &[u8]) {
        assert!(body.ends_with(b"\r\n"), "{body:?}");
        for (i, &b) in body.iter().enumerate() {
            if b == b'\r' {
                assert_eq!(body.get(i + 1), Some(&b'\n'), "lone CR at {i}");
            }
            if b == b'\n' {
                assert_eq!(body.get(i.wrapping_sub(1)), Some(&b'\r'), "bare LF at {i}");
            }
        }
    }

    #[test]
    fn delivered_to_names_a_bcc_recipient_missing_from_to() {
        let raw = "Delivered-To: carol@example.com\r\nFrom: a@example.org\r\n\
                   To: fred@example.com\r\nSubject: hi\r\n\r\nbody\r\n";
        assert_eq!(recipients_of(raw), ["carol@example.com"]);
    }

    #[test]
    fn every_delivered_to_counts_once_in_order() {
        let raw = "Delivered-To: fred@example.com\r\nDelivered-To: carol@example.com\r\n\
                   Delivered-To: FRED@example.com\r\nTo: x@example.org\r\n\r\nbody\r\n";
        assert_eq!(
            recipients_of(raw),
            ["fred@example.com", "carol@example.com"]
        );
    }

    #[test]
    fn each_envelope_field_names_the_recipient() {
        for field in [
            "X-Original-To",
            "Envelope-To",
            "X-Envelope-To",
            "x-original-to",
        ] {
            let raw = format!("{field}: carol@example.com\r\nTo: fred@example.com\r\n\r\nbody\r\n");
            assert_eq!(recipients_of(&raw), ["carol@example.com"], "{field}");
        }
    }

    #[test]
    fn only_the_top_received_for_counts() {
        let raw = "Received: from a.example.org by isp.example.net\r\n\
                   \tfor <carol@example.com>; Tue, 1 Jul 2025 10:00:00 +0000\r\n\
                   Received: from b.example.org by a.example.org\r\n\
                   \tfor <dave@example.com>; Tue, 1 Jul 2025 09:59:00 +0000\r\n\
                   To: fred@example.com\r\n\r\nbody\r\n";
        assert_eq!(recipients_of(raw), ["carol@example.com"]);

        // The top one without `for`: the lower one's is not read.
        let raw = "Received: from a.example.org by isp.example.net; Tue, 1 Jul 2025 10:00:00 +0000\r\n\
                   Received: from b by a for <dave@example.com>; Tue, 1 Jul 2025 09:59:00 +0000\r\n\
                   To: fred@example.com\r\n\r\nbody\r\n";
        assert_eq!(recipients_of(raw), ["fred@example.com"]);
    }

    #[test]
    fn received_for_is_read_from_the_raw_value_when_the_parser_misses_it() {
        let raw = "Received: (qmail 1234 invoked for carol@example.com); 1 Jul 2025\r\n\
                   To: fred@example.com\r\n\r\nbody\r\n";
        let parsed = MessageParser::default().parse(raw.as_bytes()).unwrap();
        // mail-parser reads no `for` out of a comment.
        let value = &parsed.headers()[0].value;
        assert!(
            !matches!(value, HeaderValue::Received(r) if r.for_.is_some()),
            "{value:?}"
        );
        assert_eq!(recipients_of(raw), ["carol@example.com"]);
    }

    #[test]
    fn envelope_fields_with_foreign_addresses_only_fall_back_to_to_and_cc() {
        // The provider's own mailbox name is all Delivered-To says.
        let raw = "Delivered-To: catchall-4711@isp.example.net\r\n\
                   Received: from x by isp.example.net for <catchall-4711@isp.example.net>; 1 Jul 2025\r\n\
                   To: fred@example.com, james@example.org\r\nCc: ann@example.com\r\n\r\nbody\r\n";
        assert_eq!(recipients_of(raw), ["fred@example.com", "ann@example.com"]);
    }

    #[test]
    fn envelope_fields_naming_only_unknown_recipients_go_to_the_postmaster() {
        let raw = "Delivered-To: nobody@example.com\r\nTo: fred@example.com\r\n\r\nbody\r\n";
        let (reason, _) = orphaned(raw);
        assert_eq!(
            reason,
            "recipients at our domains not in the recipient list: nobody@example.com"
        );
    }

    #[test]
    fn an_unknown_recipient_beside_a_known_one_is_dropped() {
        let raw = "Delivered-To: nobody@example.com\r\nDelivered-To: fred@example.com\r\n\r\nx\r\n";
        assert_eq!(recipients_of(raw), ["fred@example.com"]);
        let raw = "To: nobody@example.com, fred@example.com\r\n\r\nx\r\n";
        assert_eq!(recipients_of(raw), ["fred@example.com"]);
    }

    #[test]
    fn to_cc_bcc_and_resent_fields_count_without_envelope_fields() {
        let raw = "To: fred@example.com, james@example.org\r\nCc: Ann <ann@example.com>\r\n\
                   Bcc: bob@example.com\r\nResent-To: rita@example.com\r\n\
                   Resent-Cc: rick@example.com\r\nReply-To: rudi@example.com\r\n\
                   From: frank@example.com\r\n\r\nbody\r\n";
        assert_eq!(
            recipients_of(raw),
            [
                "fred@example.com",
                "ann@example.com",
                "bob@example.com",
                "rita@example.com",
                "rick@example.com"
            ]
        );
    }

    #[test]
    fn groups_display_names_and_comments_are_read() {
        let cases = [
            (
                "Fred <fred@example.com>, undisclosed-recipients:;",
                vec!["fred@example.com"],
            ),
            (
                "\"Doe, John\" <john@example.com>, x@example.org (was: y@example.com)",
                vec!["john@example.com"],
            ),
            (
                "team: a@example.com, b@example.com;, c@example.com",
                vec!["a@example.com", "b@example.com", "c@example.com"],
            ),
            (
                "=?utf-8?q?J=C3=B6rg?= <jorg@example.com>",
                vec!["jorg@example.com"],
            ),
        ];
        for (to, expected) in cases {
            let raw = format!("To: {to}\r\n\r\nbody\r\n");
            assert_eq!(recipients_of(&raw), expected, "{to}");
        }
    }

    #[test]
    fn duplicates_across_fields_count_once_in_the_checkers_form() {
        let raw = "To: Fred@Example.COM, ann@example.com\r\nCc: fred@example.com\r\n\
                   Bcc: ANN@EXAMPLE.COM\r\n\r\nbody\r\n";
        assert_eq!(recipients_of(raw), ["fred@example.com", "ann@example.com"]);
        let raw = "Delivered-To: Fred@Example.com\r\nX-Original-To: fred@example.com\r\n\
                   Received: by isp for <FRED@example.com>; 1 Jul 2025\r\n\r\nbody\r\n";
        assert_eq!(recipients_of(raw), ["fred@example.com"]);
    }

    #[test]
    fn unknown_recipients_in_to_go_to_the_postmaster_with_the_reason() {
        let raw = "To: nobody@example.com, james@example.org\r\n\r\nbody\r\n";
        let (reason, body) = orphaned(raw);
        assert_eq!(
            reason,
            "recipients at our domains not in the recipient list: nobody@example.com"
        );
        let unfolded = body.replacen("\r\n ", " ", 1);
        assert_eq!(unfolded, format!("{REASON_FIELD}: {reason}\r\n{raw}"));
    }

    #[test]
    fn no_recipient_at_our_domains_lists_a_few_of_those_seen() {
        let raw = "Delivered-To: box@isp.example.net\r\n\
                   To: a@x.example.org, b@y.example.org, c@z.example.org\r\n\
                   Cc: d@x.example.org, e@x.example.org, f@x.example.org, A@X.example.org\r\n\r\nbody\r\n";
        let (reason, _) = orphaned(raw);
        assert_eq!(
            reason,
            "no recipient at our domains in the envelope fields or To/Cc (seen: \
             box@isp.example.net, a@x.example.org, b@y.example.org, c@z.example.org, \
             d@x.example.org and 2 more)"
        );
    }

    #[test]
    fn no_address_at_all_goes_to_the_postmaster() {
        let raw =
            "From: a@example.org\r\nTo: undisclosed-recipients:;\r\nSubject: hi\r\n\r\nbody\r\n";
        let (reason, body) = orphaned(raw);
        assert_eq!(
            reason,
            "no recipient address in the envelope fields or To/Cc"
        );
        assert!(body.starts_with("X-Mxspool-Fetch-Reason: no recipient address"));
    }

    #[test]
    fn repairs_apply_to_the_fields_too() {
        let cases = [
            ("To", "fred @ example.com"),
            ("To", "fred@@example.com"),
            ("To", "fred@example.com."),
            ("To", "<<fred@example.com>>"),
            ("To", "<fred@example.com"),
            ("To", "'fred@example.com'"),
            ("To", "mailto:fred@example.com"),
            ("Delivered-To", " <fred @ example.com>"),
            ("X-Original-To", "fred@example.com."),
        ];
        for (field, value) in cases {
            let raw = format!("{field}: {value}\r\n\r\nbody\r\n");
            assert_eq!(
                recipients_of(&raw),
                ["fred@example.com"],
                "{field}: {value}"
            );
        }
        // mail-parser drops the quoted local part; the raw value has it.
        let raw = "To: \"fred smith\"@example.com\r\n\r\nbody\r\n";
        assert_eq!(recipients_of(raw), ["fred smith@example.com"]);
    }

    #[test]
    fn unrepairable_addresses_are_ignored_beside_good_ones() {
        let raw = "To: fred, a@b@example.com, carol@example.com, x%y@example.com\r\n\r\nbody\r\n";
        assert_eq!(recipients_of(raw), ["carol@example.com"]);
        let raw = "Delivered-To: bogus\r\nTo: carol@example.com\r\n\r\nbody\r\n";
        assert_eq!(recipients_of(raw), ["carol@example.com"]);
    }

    #[test]
    fn undecodable_display_names_do_not_hide_the_address() {
        let raw = b"Delivered-To: J\xfcrgen <juergen@example.com>\r\n\r\nbody\r\n";
        match derive(raw, &CX, &judge) {
            Derived::Deliver { recipients, .. } => assert_eq!(recipients, ["juergen@example.com"]),
            other => panic!("{other:?}"),
        }
        let raw = b"To: J\xfcrgen <\"j s\"@example.com>\r\n\r\nbody\r\n";
        match derive(raw, &CX, &judge) {
            Derived::Deliver { recipients, .. } => assert_eq!(recipients, ["j s@example.com"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_sender_is_the_first_return_path() {
        let cases = [
            ("Return-Path: <bob@example.org>\r\n", "bob@example.org"),
            (
                "Return-Path: <bob@example.org>\r\nReturn-Path: <eve@example.org>\r\n",
                "bob@example.org",
            ),
            ("Return-Path: <bob @ example.org.>\r\n", "bob@example.org"),
            ("Return-Path: <<bob@example.org>>\r\n", "bob@example.org"),
            (
                "Return-Path: <bob@example.org> <eve@example.org>\r\n",
                "bob@example.org",
            ),
            ("Return-Path: <>\r\n", ""),
            ("Return-Path: <garbage>\r\n", ""),
            ("Return-Path:\r\n", ""),
            ("", ""),
        ];
        for (field, sender) in cases {
            let raw = format!("{field}To: fred@example.com\r\n\r\nbody\r\n");
            assert_eq!(delivered(&raw).0, sender, "{field:?}");
        }
        let raw = "Return-Path: <bob@example.org>\r\nTo: x@example.org\r\n\r\nbody\r\n";
        match derived(raw) {
            Derived::Orphan { sender, .. } => assert_eq!(sender, "bob@example.org"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn delivered_to_and_return_path_are_removed_and_the_rest_kept_byte_for_byte() {
        let raw = "Return-Path: <bob@example.org>\r\n\
                   Delivered-To: fred@example.com\r\n\
                   Received: from a.example.org by isp.example.net;\r\n\
                   \tTue, 1 Jul 2025 10:00:00 +0000\r\n\
                   delivered-to:\r\n\
                   \tfred@example.com\r\n\
                   Subject:  odd   spacing\t \r\n\
                   Delivered-To : carol@example.com\r\n\
                   X-Delivered-To: kept@example.com\r\n\
                   Return-Path: <eve@example.org>\r\n \r\n\
                   \x0c\x0cReturn-Path: <mallory@example.org>\r\n\
                   To: fred@example.com\r\n\
                   \r\n\
                   Delivered-To: in the body stays\r\n\
                   Return-Path: so does this\r\n";
        let (_, recipients, body) = delivered(raw);
        assert_eq!(recipients, ["fred@example.com", "carol@example.com"]);
        assert_eq!(
            body,
            "Received: from a.example.org by isp.example.net;\r\n\
             \tTue, 1 Jul 2025 10:00:00 +0000\r\n\
             Subject:  odd   spacing\t \r\n\
             X-Delivered-To: kept@example.com\r\n\
             To: fred@example.com\r\n\
             \r\n\
             Delivered-To: in the body stays\r\n\
             Return-Path: so does this\r\n"
        );
    }

    #[test]
    fn a_message_of_removed_fields_only_keeps_its_empty_header_section() {
        let (_, recipients, body) =
            delivered("Return-Path: <s@o.test>\nDelivered-To: bob@example.com\n\nhello\n");
        assert_eq!(recipients, ["bob@example.com"]);
        assert_eq!(body, "\r\nhello\r\n");
    }

    #[test]
    fn line_endings_become_crlf() {
        let raw = "Delivered-To: fred@example.com\nSubject: lf\n\nline one\nline\rtwo\r\nend";
        let (_, _, body) = delivered(raw);
        assert_eq!(
            body,
            "Subject: lf\r\n\r\nline one\r\nline\r\ntwo\r\nend\r\n"
        );
        let (_, _, body) = delivered("To: fred@example.com\r\n\r\n");
        assert_eq!(body, "To: fred@example.com\r\n\r\n");
        let (_, _, body) = delivered("To: fred@example.com");
        assert_eq!(body, "To: fred@example.com\r\n");
    }

    #[test]
    fn eight_bit_headers_and_long_lines_are_left_alone() {
        let long = "x".repeat(1200);
        let raw = format!(
            "To: fred@example.com\r\nSubject: Gr\u{fc}\u{df}e aus K\u{f6}ln\r\n\
             X-Long: {long}\r\n\r\nbody \u{e9}\r\n"
        );
        let (_, recipients, body) = delivered(&raw);
        assert_eq!(recipients, ["fred@example.com"]);
        assert_eq!(body, raw);
        let mut latin1 = b"To: fred@example.com\r\nSubject: Gr\xfc\xdfe\r\n\r\nb\xe4r\r\n".to_vec();
        match derive(&latin1, &CX, &judge) {
            Derived::Deliver { body, .. } => assert_eq!(body, latin1),
            other => panic!("{other:?}"),
        }
        latin1.insert(0, b'\n');
        assert!(matches!(
            derive(&latin1, &CX, &judge),
            Derived::Unparseable { .. }
        ));
    }

    #[test]
    fn the_reason_field_is_one_line_of_ascii_folded_under_the_limit() {
        let to: Vec<String> = (0..9)
            .map(|i| format!("{}{i}@b\u{fc}cher.example", "j\u{f6}rg".repeat(12)))
            .collect();
        let raw = format!("To: {}\r\n\r\nbody\r\n", to.join(", "));
        let (reason, body) = orphaned(&raw);
        assert!(
            reason.bytes().all(|b| (b' '..=b'~').contains(&b)),
            "{reason}"
        );
        assert!(reason.len() <= MAX_REASON, "{}", reason.len());
        assert!(reason.ends_with("..."), "{reason}");
        assert!(reason.contains("j?rgj?rg"), "{reason}");
        let (field, rest) = body.split_once("\r\nTo: ").unwrap();
        assert_eq!(rest, raw.strip_prefix("To: ").unwrap());
        assert!(
            field.split("\r\n").all(|line| line.len() <= FOLD_AT),
            "{field}"
        );
        let unfolded = field.replace("\r\n", "");
        assert_eq!(unfolded, format!("{REASON_FIELD}: {reason}"));
        let parsed = MessageParser::default().parse(body.as_bytes()).unwrap();
        assert_eq!(parsed.headers()[0].name.as_str(), REASON_FIELD);
    }

    #[test]
    fn reason_lines_are_sanitised() {
        assert_eq!(reason_line("a\r\nb\t c\u{0}d\u{e9}"), "a b c?d?");
        let long = reason_line(&"word ".repeat(200));
        assert_eq!(long.len(), MAX_REASON);
        assert!(long.ends_with("..."));
        assert_eq!(fold("X", ""), "X:\r\n");
        let one_word = "w".repeat(100);
        assert_eq!(fold("X", &one_word), format!("X: {one_word}\r\n"));
    }

    #[test]
    fn what_is_no_message_is_wrapped_for_the_postmaster() {
        let cases: [(&[u8], &str); 7] = [
            (b"", "empty"),
            (b"\x00\x00\x01\xff binary\x00garbage", "first line"),
            (b"Hello there,\nthis is just text\n", "first line"),
            (b"\r\nbody without a header section\r\n", "first line"),
            (
                b"hello world: a field name with a space\r\n\r\nx\r\n",
                "first line",
            ),
            (b"Subject: hi\r\nX-Bad: a\x00b\r\n\r\nbody\r\n", "NUL"),
            (
                b"From sender@example.org Tue Jul  1 10:00:00 2025\nTo: a@example.com\n\nx\n",
                "first line",
            ),
        ];
        for (raw, why) in cases {
            let (reason, body) = unparseable(raw);
            assert!(reason.contains(why), "{raw:?}: {reason}");
            assert_crlf_only(&body);
            assert_wraps(&body, raw, &reason);
        }
    }

    /// The wrapper is a message to the postmaster that explains, and its
    /// attachment is `raw` exactly.
    fn assert_wraps(wrapper: &[u8], raw: &[u8], reason: &str) {
        let msg = MessageParser::default()
            .parse(wrapper)
            .expect("wrapper parses");
        let from = msg.from().unwrap().first().unwrap();
        assert_eq!(from.address(), Some(CX.postmaster));
        let to = msg.to().unwrap().first().unwrap();
        assert_eq!(to.address(), Some(CX.postmaster));
        assert_eq!(
            msg.subject(),
            Some("Fetched message could not be parsed (isp-catchall)")
        );
        assert_eq!(msg.date().unwrap().to_timestamp(), CX.date);
        assert!(msg.message_id().unwrap().ends_with("@mx2.example.net"));
        let ct = msg.content_type().unwrap();
        assert_eq!((ct.ctype(), ct.subtype()), ("multipart", Some("mixed")));
        let text = msg.body_text(0).unwrap();
        assert!(text.contains("\"isp-catchall\""), "{text}");
        assert!(text.contains(reason), "{text}");
        let attachment = msg.attachment(0).expect("attachment");
        assert_eq!(attachment.attachment_name(), Some(ATTACHMENT_NAME));
        let ct = attachment.content_type().unwrap();
        assert_eq!(
            (ct.ctype(), ct.subtype()),
            ("application", Some("octet-stream"))
        );
        assert_eq!(attachment.contents(), raw);
    }

    #[test]
    fn the_wrapper_is_the_same_for_the_same_input() {
        let raw = b"not a message\n";
        assert_eq!(unparseable(raw), unparseable(raw));
        let big: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        let (reason, body) = unparseable(&big);
        assert_wraps(&body, &big, &reason);
    }

    #[test]
    fn message_id_is_read_without_brackets() {
        let cases: [(&str, Option<&str>); 8] = [
            ("Message-ID: <abc@example.org>\r\n", Some("abc@example.org")),
            (
                "Message-Id:   <abc@example.org>  \r\n",
                Some("abc@example.org"),
            ),
            (
                "Message-ID:\r\n <folded@example.org>\r\n",
                Some("folded@example.org"),
            ),
            ("Message-ID: bare@example.org\r\n", Some("bare@example.org")),
            (
                "Message-ID: <a@example.org> <b@example.org>\r\n",
                Some("a@example.org"),
            ),
            ("Message-ID: <>\r\n", None),
            ("Message-ID:   \r\n", None),
            ("", None),
        ];
        for (field, id) in cases {
            let raw =
                format!("From: a@example.org\r\n{field}Subject: x\r\n\r\nMessage-ID: <body@x>\r\n");
            assert_eq!(message_id(raw.as_bytes()).as_deref(), id, "{field:?}");
        }
        assert_eq!(message_id(b""), None);
    }

    proptest::proptest! {
        /// Whatever the bytes: no panic, CRLF-only bodies without the
        /// removed fields, recipients the checker said are ours, and a
        /// wrapper that gives the bytes back.
        #[test]
        fn any_input_gives_a_sound_result(raw in message_like()) {
            match derive(&raw, &CX, &judge) {
                Derived::Deliver { recipients, body, .. } => {
                    assert_crlf_only(&body);
                    assert!(!recipients.is_empty());
                    for r in &recipients {
                        assert_eq!(judge(r), Verdict::Ours(r.clone()));
                    }
                    assert_no_removed_fields(&body);
                }
                Derived::Orphan { reason, body, .. } => {
                    assert_crlf_only(&body);
                    assert!(body.starts_with(REASON_FIELD.as_bytes()));
                    assert!(reason.bytes().all(|b| (b' '..=b'~').contains(&b)));
                    assert_no_removed_fields(&body);
                }
                Derived::Unparseable { reason, body } => {
                    assert_crlf_only(&body);
                    assert_wraps(&body, &raw, &reason);
                }
            }
            let _ = message_id(&raw);
        }

        #[test]
        fn repair_gives_plain_addresses_or_nothing(candidate in "\\PC{0,40}") {
            if let Some(address) = repair(&candidate) {
                let (local, domain) = address.rsplit_once('@').unwrap();
                assert!(!local.is_empty() && !local.contains(['@', '%', '!']), "{address}");
                assert!(crate::address::is_domain_name(domain), "{address}");
                let atom = local
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "#$&*+-/=?^_`{|}~.".contains(c));
                if atom {
                    assert_eq!(repair(&address), Some(address.clone()));
                }
            }
        }
    }

    /// Header-like lines (the fields this module reads, odd names, folds,
    /// bare LFs and CRs) and a body, or plain bytes.
    fn message_like() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let name = prop_oneof![
            Just("To"),
            Just("Cc"),
            Just("Delivered-To"),
            Just("Return-Path"),
            Just("Received"),
            Just("X-Original-To"),
            Just("Message-ID"),
            Just("Subject"),
            Just(" folded"),
            Just("bad name"),
        ];
        let value = "[ -~\\t\u{e9}]{0,40}";
        let eol = prop_oneof![Just("\r\n"), Just("\n"), Just("\r")];
        let line = (name, value, eol).prop_map(|(n, v, e)| format!("{n}: {v}{e}"));
        let structured = (proptest::collection::vec(line, 0..8), "[ -~\\r\\n]{0,40}")
            .prop_map(|(lines, body)| format!("{}\r\n{body}", lines.concat()).into_bytes());
        prop_oneof![structured, proptest::collection::vec(any::<u8>(), 0..200)]
    }

    fn assert_no_removed_fields(body: &[u8]) {
        let text = String::from_utf8_lossy(body);
        let section = text.split("\r\n\r\n").next().unwrap_or_default();
        for line in section.split("\r\n") {
            for name in REMOVED_FIELDS {
                assert!(
                    !is_named(line.as_bytes(), name) || line.starts_with([' ', '\t']),
                    "{line:?}"
                );
            }
        }
    }
}
