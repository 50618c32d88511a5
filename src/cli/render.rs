//! What the operator reads: the admin API's JSON (docs/api.md) turned into
//! tables and text. Pure: values in, a `String` out; the current time is an
//! argument. Everything printed here came from the network, and much of it
//! from strangers (senders, remote servers' replies, headers), so control
//! characters are escaped before they reach a terminal.

use std::time::{Duration, UNIX_EPOCH};

use serde::Deserialize;

/// `{"messages": [...], "count": N}` from `GET /api/queue` and `GET /api/dead`.
#[derive(Debug, Deserialize)]
pub struct MessageList {
    pub messages: Vec<Message>,
    /// The page after this one, if any (`GET /api/queue` pages).
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// A message as listed, or as shown with the `show`-only fields filled in.
/// Fields the server adds later are ignored, so an older CLI keeps working.
#[derive(Debug, Deserialize)]
pub struct Message {
    pub id: String,
    pub sender: String,
    pub size: u64,
    pub arrived_ms: u64,
    /// By the server's clock, so a skewed client clock does not distort it.
    pub age_seconds: u64,
    #[serde(default)]
    pub held: bool,
    pub recipients: Vec<Recipient>,
    /// `show` only: the stored header section, CRLF line ends.
    #[serde(default)]
    pub headers: Option<String>,
    #[serde(default)]
    pub ret: Option<String>,
    #[serde(default)]
    pub envid: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Recipient {
    pub address: String,
    pub status: String,
    pub attempts: u32,
    #[serde(default)]
    pub next_attempt_ms: Option<u64>,
    #[serde(default)]
    pub last_reply: Option<String>,
    #[serde(default)]
    pub waiting_for_primary: bool,
    #[serde(default)]
    pub waiting_for_resume: bool,
    #[serde(default)]
    pub suspect: bool,
    #[serde(default)]
    pub orcpt: Option<String>,
    #[serde(default)]
    pub notify: Option<Vec<String>>,
}

/// `{"domains": [...], "count": N}` from `GET /api/domains`.
#[derive(Debug, Deserialize)]
pub struct DomainList {
    pub domains: Vec<Domain>,
}

#[derive(Debug, Deserialize)]
pub struct Domain {
    pub domain: String,
    pub primary: String,
    pub primary_since_ms: u64,
    #[serde(default)]
    pub paused_by: Option<String>,
    pub queued: u64,
    #[serde(default)]
    pub oldest_age_seconds: Option<u64>,
}

/// How much of a last reply fits on a table line; `queue show` has it all.
const REPLY_WIDTH: usize = 60;

/// What a listing is of, for its empty and count lines.
#[derive(Clone, Copy, Debug)]
pub struct Listing {
    /// Printed instead of a table when there is nothing.
    pub empty: &'static str,
    pub one: &'static str,
    pub many: &'static str,
}

pub const QUEUE: Listing = Listing {
    empty: "queue is empty",
    one: "message",
    many: "messages",
};

/// A filtered listing that found nothing: the queue itself may not be empty.
pub const QUEUE_FILTERED: Listing = Listing {
    empty: "no queued message matches",
    ..QUEUE
};

pub const DEAD: Listing = Listing {
    empty: "no dead letters",
    one: "dead letter",
    many: "dead letters",
};

/// One line per recipient (the message's columns on its first line only),
/// then a count.
pub fn list(list: &MessageList, what: Listing) -> String {
    if list.messages.is_empty() {
        return format!("{}\n", what.empty);
    }
    let mut out = rows(list, true);
    let held = list.messages.iter().filter(|m| m.held).count();
    out.push_str(&footer(list.messages.len(), held, what));
    out
}

/// The count line that ends a listing of `n` messages, `held` of them held.
pub fn footer(n: usize, held: usize, what: Listing) -> String {
    if n == 0 {
        return format!("{}\n", what.empty);
    }
    let mut out = format!("{n} {}", if n == 1 { what.one } else { what.many });
    if held > 0 {
        out.push_str(&format!(" ({held} held)"));
    }
    out.push('\n');
    out
}

/// The table lines of one page of a listing (with the column names on the
/// first page only).
pub fn rows(list: &MessageList, header: bool) -> String {
    let mut rows = vec![
        [
            "ID",
            "AGE",
            "SIZE",
            "SENDER",
            "RECIPIENT",
            "STATUS",
            "TRIES",
            "LAST REPLY",
        ]
        .map(String::from),
    ];
    for m in &list.messages {
        // The message's own columns on its first line only.
        let mut first = Some([
            one_line(&m.id),
            age(m.age_seconds),
            size(m.size),
            sender(&m.sender),
        ]);
        // A message with no recipients (not one the server keeps) still shows.
        let recipients: Vec<Option<&Recipient>> = match m.recipients.as_slice() {
            [] => vec![None],
            all => all.iter().map(Some).collect(),
        };
        for r in recipients {
            let [id, age, size, sender] = first.take().unwrap_or_default();
            let reply = r.and_then(|r| r.last_reply.as_deref()).unwrap_or("");
            rows.push([
                id,
                age,
                size,
                sender,
                r.map_or_else(String::new, |r| one_line(&r.address)),
                status(m, r),
                r.map_or_else(String::new, |r| r.attempts.to_string()),
                truncate(&one_line(reply), REPLY_WIDTH),
            ]);
        }
    }
    let out = table(&rows);
    if header {
        out
    } else {
        out.split_once('\n')
            .map(|(_, rest)| rest.to_owned())
            .unwrap_or_default()
    }
}

/// `queue domains`: one line per relay domain.
pub fn domains(list: &DomainList, now_ms: u64) -> String {
    if list.domains.is_empty() {
        return "no relay domains\n".to_owned();
    }
    let mut rows =
        vec![["DOMAIN", "PRIMARY", "SINCE", "PAUSED", "QUEUED", "OLDEST"].map(String::from)];
    for d in &list.domains {
        rows.push([
            one_line(&d.domain),
            one_line(&d.primary),
            age(now_ms.saturating_sub(d.primary_since_ms) / 1000),
            match &d.paused_by {
                None => "no".to_owned(),
                Some(by) => format!("by {}", one_line(by)),
            },
            d.queued.to_string(),
            d.oldest_age_seconds.map_or_else(|| "-".to_owned(), age),
        ]);
    }
    table(&rows)
}

/// `queue show`: the envelope, each recipient, then the headers as stored.
pub fn message(m: &Message, now_ms: u64) -> String {
    let mut out = String::new();
    let mut field = |name: &str, value: String| {
        out.push_str(&format!("{:<10}{}\n", format!("{name}:"), value));
    };
    field("ID", one_line(&m.id));
    field("Sender", sender(&m.sender));
    field("Size", format!("{} ({} bytes)", size(m.size), m.size));
    field(
        "Arrived",
        format!("{} ({} ago)", timestamp(m.arrived_ms), age(m.age_seconds)),
    );
    field(
        "State",
        if m.held {
            "held: out of delivery until released"
        } else {
            "in delivery"
        }
        .to_owned(),
    );
    if let Some(ret) = &m.ret {
        field("RET", one_line(ret));
    }
    if let Some(envid) = &m.envid {
        field("ENVID", one_line(envid));
    }

    out.push_str("\nRecipients:\n");
    for r in &m.recipients {
        recipient(&mut out, m, r, now_ms);
    }

    if let Some(headers) = &m.headers {
        out.push_str("\nHeaders:\n");
        for line in headers.lines() {
            out.push_str(&escape(line.trim_end_matches('\r'), &['\t']));
            out.push('\n');
        }
    }
    out
}

/// One recipient of [`message`]: its address, then its details indented.
fn recipient(out: &mut String, m: &Message, r: &Recipient, now_ms: u64) {
    out.push_str(&format!("  {}\n", one_line(&r.address)));
    let mut detail = |name: &str, value: String| {
        out.push_str(&format!("    {:<14}{}\n", format!("{name}:"), value));
    };
    let mut state = format!("{}, {}", status(m, Some(r)), attempts(r.attempts));
    if r.waiting_for_primary {
        state.push_str(", waiting for the primary");
    }
    if r.suspect {
        state.push_str(", suspect: refused while its domain was paused");
    }
    detail("status", state);
    if r.waiting_for_resume && r.status == "queued" {
        detail("next attempt", "when its domain is resumed".to_owned());
    } else if let Some(next) = r.next_attempt_ms.filter(|_| r.status == "queued") {
        detail(
            "next attempt",
            if m.held {
                "when released".to_owned()
            } else {
                relative(next, now_ms)
            },
        );
    }
    if let Some(reply) = &r.last_reply {
        detail("last reply", one_line(reply));
    }
    if let Some(notify) = r.notify.as_ref().filter(|n| !n.is_empty()) {
        detail("notify", one_line(&notify.join(", ")));
    }
    if let Some(orcpt) = &r.orcpt {
        detail("orcpt", one_line(orcpt));
    }
}

/// Valid JSON re-indented by two spaces, keys in the order they came: the
/// server's JSON as it is, where a parsed `serde_json::Value` would sort them.
pub fn indent_json(json: &str) -> String {
    let mut out = String::with_capacity(json.len() * 2);
    let mut depth = 0usize;
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.extend(std::iter::repeat_n("  ", depth));
    };
    let (mut in_string, mut escaped) = (false, false);
    let mut chars = json.chars().peekable();
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                while chars.next_if(|c| c.is_whitespace()).is_some() {}
                out.push(c);
                if chars.next_if_eq(&close).is_some() {
                    out.push(close);
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    out
}

/// An age or a wait in its two largest units: `42s`, `5m03s`, `3h12m`, `2d04h`.
pub fn age(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3_600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// Bytes in binary units with one decimal: `512 B`, `5.0 KiB`, `1.2 MiB`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    // Round first, so 1023.96 KiB shows as 1.0 MiB rather than 1024.0 KiB.
    while (value * 10.0).round() / 10.0 >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A moment relative to now: `in 4m10s`, or `due now` once it has passed
/// (the scheduler picks it up at once).
pub fn relative(at_ms: u64, now_ms: u64) -> String {
    if at_ms <= now_ms {
        return "due now".to_owned();
    }
    format!("in {}", age((at_ms - now_ms).div_ceil(1000)))
}

/// At most `max` characters, the last one `…` when something was cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// A value for a single line: line breaks and tabs become spaces, other
/// control characters are escaped, so a hostile reply cannot move the cursor
/// or forge table rows.
pub fn one_line(text: &str) -> String {
    let flat: String = text
        .chars()
        .map(|c| {
            if matches!(c, '\r' | '\n' | '\t') {
                ' '
            } else {
                c
            }
        })
        .collect();
    escape(flat.trim(), &[])
}

/// Escapes control characters except those in `keep`.
fn escape(text: &str, keep: &[char]) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && !keep.contains(&c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The null reverse-path (a notice) shows as `<>` rather than as nothing.
fn sender(address: &str) -> String {
    if address.is_empty() {
        "<>".to_owned()
    } else {
        one_line(address)
    }
}

/// A recipient's status; a held message's waiting recipients are `held`,
/// since nothing will happen to them until a release.
fn status(m: &Message, r: Option<&Recipient>) -> String {
    match r {
        Some(r) if !(m.held && r.status == "queued") => one_line(&r.status),
        _ if m.held => "held".to_owned(),
        _ => String::new(),
    }
}

fn attempts(n: u32) -> String {
    match n {
        0 => "not attempted yet".to_owned(),
        1 => "1 attempt".to_owned(),
        n => format!("{n} attempts"),
    }
}

/// RFC 3339 in UTC, to the second.
fn timestamp(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Left-aligned columns two spaces apart; the last column is not padded.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 < N {
                line.push_str(cell);
                line.extend(std::iter::repeat_n(
                    ' ',
                    widths[i] - cell.chars().count() + 2,
                ));
            } else {
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_keeps_its_key_order() {
        let compact = r#"{"messages":[{"id":"0KX","size":5,"held":false,"recipients":[],"n":null,"s":"a,b:{\"[x]\"}\\"}],"count":1,"e":{}}"#;
        let pretty = indent_json(compact);
        assert_eq!(
            pretty,
            r#"{
  "messages": [
    {
      "id": "0KX",
      "size": 5,
      "held": false,
      "recipients": [],
      "n": null,
      "s": "a,b:{\"[x]\"}\\"
    }
  ],
  "count": 1,
  "e": {}
}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&pretty).unwrap();
        assert_eq!(
            parsed,
            serde_json::from_str::<serde_json::Value>(compact).unwrap()
        );
        assert_eq!(indent_json(" [ 1 , { } ] "), "[\n  1,\n  {}\n]");
    }

    #[test]
    fn ages_in_two_units() {
        for (seconds, text) in [
            (0, "0s"),
            (42, "42s"),
            (59, "59s"),
            (60, "1m00s"),
            (303, "5m03s"),
            (3_599, "59m59s"),
            (3_600, "1h00m"),
            (3 * 3_600 + 12 * 60 + 59, "3h12m"),
            (86_399, "23h59m"),
            (86_400, "1d00h"),
            (2 * 86_400 + 4 * 3_600 + 59, "2d04h"),
            (400 * 86_400, "400d00h"),
        ] {
            assert_eq!(age(seconds), text, "{seconds}");
        }
    }

    #[test]
    fn sizes_in_binary_units() {
        for (bytes, text) in [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (5120, "5.0 KiB"),
            (1536, "1.5 KiB"),
            (1024 * 1024 - 1, "1.0 MiB"),
            (1_258_291, "1.2 MiB"),
            (10 * 1024 * 1024 * 1024, "10.0 GiB"),
            (u64::MAX, "16777216.0 TiB"),
        ] {
            assert_eq!(size(bytes), text, "{bytes}");
        }
    }

    #[test]
    fn relative_times() {
        assert_eq!(relative(1_000, 5_000), "due now");
        assert_eq!(relative(5_000, 5_000), "due now");
        assert_eq!(relative(5_001, 5_000), "in 1s");
        assert_eq!(relative(5_000 + 250_000, 5_000), "in 4m10s");
    }

    #[test]
    fn truncation_counts_characters() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("exactly10!", 10), "exactly10!");
        assert_eq!(truncate("eleven char", 10), "eleven ch…");
        assert_eq!(truncate("ééééééé", 4), "ééé…");
        assert_eq!(truncate("abc", 0), "…");
    }

    #[test]
    fn hostile_text_stays_on_one_line() {
        assert_eq!(one_line("451 4.3.0 a\r\n451 b"), "451 4.3.0 a  451 b");
        assert_eq!(one_line("\x1b[2Jgotcha\x07"), "\\u{1b}[2Jgotcha\\u{7}");
        assert_eq!(escape("Subject:\tx\x1b", &['\t']), "Subject:\tx\\u{1b}");
    }

    fn recipient(address: &str, status: &str, attempts: u32, reply: Option<&str>) -> Recipient {
        Recipient {
            address: address.into(),
            status: status.into(),
            attempts,
            next_attempt_ms: (status == "queued").then_some(1_795_412_945_678),
            last_reply: reply.map(Into::into),
            waiting_for_primary: reply.is_some() && status == "queued",
            waiting_for_resume: false,
            suspect: false,
            orcpt: None,
            notify: None,
        }
    }

    fn sample() -> Message {
        Message {
            id: "0KXW3J5M7P2QR".into(),
            sender: "alice@example.org".into(),
            size: 5120,
            arrived_ms: 1_795_412_345_678,
            age_seconds: 3 * 3_600 + 12 * 60 + 7,
            held: false,
            recipients: vec![
                recipient(
                    "bob@example.com",
                    "queued",
                    3,
                    Some(
                        "mx1.example.com[192.0.2.10]: cannot connect: Connection refused \
                         (os error 111) after waiting a long time",
                    ),
                ),
                recipient("carol@example.com", "delivered", 1, Some("250 2.0.0 Ok")),
            ],
            headers: None,
            ret: None,
            envid: None,
        }
    }

    #[test]
    fn list_table() {
        let mut notice = sample();
        notice.id = "0KXW3J5M7P2QS".into();
        notice.sender = String::new();
        notice.size = 300;
        notice.age_seconds = 42;
        notice.held = true;
        notice.recipients = vec![recipient("alice@example.org", "queued", 0, None)];
        let listing = MessageList {
            messages: vec![sample(), notice],
            next_cursor: None,
        };
        assert_eq!(
            list(&listing, QUEUE),
            "\
ID             AGE    SIZE     SENDER             RECIPIENT          STATUS     TRIES  LAST REPLY
0KXW3J5M7P2QR  3h12m  5.0 KiB  alice@example.org  bob@example.com    queued     3      mx1.example.com[192.0.2.10]: cannot connect: Connection ref…
                                                  carol@example.com  delivered  1      250 2.0.0 Ok
0KXW3J5M7P2QS  42s    300 B    <>                 alice@example.org  held       0
2 messages (1 held)
"
        );
    }

    #[test]
    fn empty_and_single_listings() {
        let empty = MessageList {
            messages: vec![],
            next_cursor: None,
        };
        assert_eq!(list(&empty, QUEUE), "queue is empty\n");
        assert_eq!(list(&empty, QUEUE_FILTERED), "no queued message matches\n");
        assert_eq!(list(&empty, DEAD), "no dead letters\n");
        let one = MessageList {
            messages: vec![sample()],
            next_cursor: None,
        };
        assert!(list(&one, DEAD).ends_with("\n1 dead letter\n"));
        // A later page has no column names; the footer comes once at the end.
        assert!(rows(&one, true).starts_with("ID "));
        assert!(rows(&one, false).starts_with("0KXW3J5M7P2QR"));
        assert_eq!(rows(&one, false).lines().count(), 2);
        assert_eq!(footer(1200, 3, QUEUE), "1200 messages (3 held)\n");
    }

    #[test]
    fn shown_message() {
        let mut m = sample();
        m.held = false;
        m.ret = Some("hdrs".into());
        m.recipients[0].notify = Some(vec!["failure".into(), "delay".into()]);
        m.recipients[0].orcpt = Some("bob@example.com".into());
        m.headers = Some("Received: from a\r\n\tby b\r\nSubject: hi\x1b[31m\r\n".into());
        let now = 1_795_412_945_678 - 250_000;
        assert_eq!(
            message(&m, now),
            "\
ID:       0KXW3J5M7P2QR
Sender:   alice@example.org
Size:     5.0 KiB (5120 bytes)
Arrived:  2026-11-23T05:39:05Z (3h12m ago)
State:    in delivery
RET:      hdrs

Recipients:
  bob@example.com
    status:       queued, 3 attempts, waiting for the primary
    next attempt: in 4m10s
    last reply:   mx1.example.com[192.0.2.10]: cannot connect: Connection refused (os error 111) after waiting a long time
    notify:       failure, delay
    orcpt:        bob@example.com
  carol@example.com
    status:       delivered, 1 attempt
    last reply:   250 2.0.0 Ok

Headers:
Received: from a
\tby b
Subject: hi\\u{1b}[31m
"
        );
    }

    #[test]
    fn domains_table() {
        let now = 10_000_000;
        let list: DomainList = serde_json::from_str(
            r#"{"domains": [
                {"domain": "example.com", "primary": "down", "primary_since_ms": 2800000,
                 "paused": true, "paused_by": "guard", "paused_since_ms": 9000000,
                 "queued": 1234, "oldest_arrived_ms": 1, "oldest_age_seconds": 9999},
                {"domain": "example.org", "primary": "up", "primary_since_ms": 9958000,
                 "paused": false, "paused_by": null, "paused_since_ms": null,
                 "queued": 0, "oldest_arrived_ms": null, "oldest_age_seconds": null}
            ], "count": 2}"#,
        )
        .unwrap();
        assert_eq!(
            domains(&list, now),
            "\
DOMAIN       PRIMARY  SINCE  PAUSED    QUEUED  OLDEST
example.com  down     2h00m  by guard  1234    2h46m
example.org  up       42s    no        0       -
"
        );
        assert_eq!(
            domains(&DomainList { domains: vec![] }, now),
            "no relay domains\n"
        );
    }

    #[test]
    fn a_paused_domains_recipient_waits_for_the_resume() {
        let mut m = sample();
        m.recipients[0].waiting_for_primary = false;
        m.recipients[0].waiting_for_resume = true;
        m.recipients[0].suspect = true;
        m.recipients[0].next_attempt_ms = None;
        let text = message(&m, 0);
        assert!(
            text.contains(
                "status:       queued, 3 attempts, suspect: refused while its domain was paused\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("next attempt: when its domain is resumed\n"),
            "{text}"
        );
    }

    #[test]
    fn held_message_waits_for_release() {
        let mut m = sample();
        m.held = true;
        let text = message(&m, 0);
        assert!(
            text.contains("State:    held: out of delivery until released\n"),
            "{text}"
        );
        assert!(text.contains("status:       held, 3 attempts"), "{text}");
        assert!(text.contains("next attempt: when released\n"), "{text}");
    }
}
