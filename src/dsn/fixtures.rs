//! Test fixtures shared by the notice's unit tests: a sample envelope,
//! recipients and report, and readers that take a built notice apart.

use mail_parser::{MessageParser, MimeHeaders};

use super::{Action, RecipientReport, Report};
use crate::spool::{BodyType, Envelope, Notify, QueueId, Recipient, Ret, testing};

pub(super) const HOST: &str = "mx2.example.net";
pub(super) const ORIGINAL: &[u8] = b"Received: from client.example.org ([192.0.2.7])\r\n\tby mx2.example.net (mxspool) with ESMTP id 0000000000001; Tue, 24 Nov 2026 10:00:00 +0000\r\nFrom: Sender <sender@example.org>\r\nTo: alice@example.com\r\nSubject: Quarterly figures\r\nMessage-ID: <orig-1@example.org>\r\n\r\nHello Alice,\r\n\r\nthe figures are attached.\r\n";

pub(super) fn envelope(ret: Ret, smtputf8: bool) -> Envelope {
    let mut env = testing::envelope("sender@example.org", &[]);
    env.id = QueueId(0x0123_4567_89ab);
    env.ret = ret;
    env.envid = Some("QQ314159".into());
    env.body_type = BodyType::SevenBit;
    env.smtputf8 = smtputf8;
    env.arrived_ms = 1_795_000_000_000;
    env.size = ORIGINAL.len() as u64;
    env
}

pub(super) fn recipient(address: &str, orcpt: Option<&str>, notify: u8) -> Recipient {
    let mut r = testing::recipient(address);
    r.orcpt = orcpt.map(Into::into);
    r.notify = Notify(notify);
    r.attempts = 3;
    r
}

pub(super) fn failed(r: &Recipient) -> RecipientReport<'_> {
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

pub(super) fn delayed(r: &Recipient) -> RecipientReport<'_> {
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

pub(super) fn report<'a>(
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
pub(super) fn parts(out: &[u8]) -> Vec<(String, Vec<u8>)> {
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
pub(super) type Fields = Vec<(String, String)>;
pub(super) fn status_groups(content: &[u8]) -> (Fields, Vec<Fields>) {
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

pub(super) fn get<'f>(fields: &'f Fields, name: &str) -> Option<&'f str> {
    fields
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

pub(super) fn assert_crlf_only(out: &[u8]) {
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
