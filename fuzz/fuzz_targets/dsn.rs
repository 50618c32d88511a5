//! Failure notices built from untrusted material: the stored original (any
//! bytes: no header/body separator, bare CR or LF, 8-bit, NULs, huge header
//! sections), the envelope as the spool holds it (sender, `ENVID=`, the
//! client's HELO, recipients with `ORCPT=`), and the next hop's words
//! (`Remote-MTA`, the diagnostic), all arbitrary.
//!
//! Checked: the notice has CRLF line endings only; it parses as a
//! `multipart/report` of exactly three parts (the boundary never collides
//! with content); no value adds a header field to the notice or a field or
//! group to the delivery-status part; without SMTPUTF8 and with a 7-bit
//! original and sender, the whole notice is 7-bit.
#![no_main]

#[path = "common.rs"]
mod common;

use std::net::IpAddr;

use arbitrary::{Arbitrary, Unstructured};
use common::only_crlf;
use libfuzzer_sys::fuzz_target;
use mail_parser::{MessageParser, MimeHeaders};
use mxspool::dsn::{self, Action, RecipientReport, Report};
use mxspool::spool::{BodyType, Client, Envelope, Notify, QueueId, RcptStatus, Recipient, Ret};

#[derive(Arbitrary, Debug)]
struct Rcpt<'a> {
    address: &'a str,
    orcpt: Option<&'a str>,
    notify: u8,
    action: u8,
    status: &'a str,
    remote_mta: Option<&'a str>,
    diagnostic: Option<&'a str>,
    last_attempt_ms: Option<u64>,
    will_retry_until_ms: Option<u64>,
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    reporting_mta: &'a str,
    sender: &'a str,
    envid: Option<&'a str>,
    helo: &'a str,
    ip: [u8; 4],
    id: u64,
    ret: u8,
    smtputf8: bool,
    arrived_ms: u64,
    now_ms: u64,
    message_id: &'a str,
    max_full_bytes: u16,
    recipients: Vec<Rcpt<'a>>,
    original: &'a [u8],
}

const TOP_FIELDS: &[&str] = &[
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "auto-submitted",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
];

const MESSAGE_FIELDS: &[&str] = &[
    "original-envelope-id",
    "reporting-mta",
    "received-from-mta",
    "arrival-date",
    "x-mxspool-queue-id",
];

const RECIPIENT_FIELDS: &[&str] = &[
    "original-recipient",
    "final-recipient",
    "action",
    "status",
    "remote-mta",
    "diagnostic-code",
    "last-attempt-date",
    "will-retry-until",
];

/// The delivery-status part's field names, group by group.
fn status_groups(content: &[u8]) -> Vec<Vec<String>> {
    let text = String::from_utf8_lossy(content);
    text.split("\r\n\r\n")
        .filter(|g| !g.trim().is_empty())
        .map(|g| {
            g.replace("\r\n ", " ")
                .replace("\r\n\t", " ")
                .lines()
                .map(|l| {
                    let (name, _) = l
                        .split_once(':')
                        .unwrap_or_else(|| panic!("not a field: {l:?}"));
                    name.to_ascii_lowercase()
                })
                .collect()
        })
        .collect()
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(bytes)) else {
        return;
    };
    let recipients: Vec<Recipient> = input
        .recipients
        .iter()
        .take(20)
        .map(|r| Recipient {
            address: r.address.into(),
            orcpt: r.orcpt.map(Into::into),
            orcpt_xtext: None,
            notify: Notify(r.notify),
            status: RcptStatus::Failed,
            attempts: 1,
            next_attempt_ms: 0,
            last_reply: r.diagnostic.map(Into::into),
            unreachable: false,
            delay_notified: false,
            suspect: false,
        })
        .collect();
    let envelope = Envelope {
        id: QueueId(input.id),
        sender: input.sender.into(),
        ret: match input.ret % 3 {
            0 => Ret::Unset,
            1 => Ret::Full,
            _ => Ret::Headers,
        },
        envid: input.envid.map(Into::into),
        envid_xtext: None,
        body_type: BodyType::Unset,
        smtputf8: input.smtputf8,
        has_8bit: !input.original.is_ascii(),
        arrived_ms: input.arrived_ms,
        size: input.original.len() as u64,
        client: Client {
            ip: IpAddr::from(input.ip),
            helo: input.helo.into(),
            tls: false,
        },
        recipients,
        notices_to: None,
    };
    let reports: Vec<RecipientReport> = envelope
        .recipients
        .iter()
        .zip(&input.recipients)
        .map(|(recipient, r)| RecipientReport {
            recipient,
            action: match r.action % 4 {
                0 => Action::Failed,
                1 => Action::Delayed,
                2 => Action::Delivered,
                _ => Action::Relayed,
            },
            status: r.status,
            remote_mta: r.remote_mta,
            diagnostic: r.diagnostic,
            last_attempt_ms: r.last_attempt_ms,
            will_retry_until_ms: r.will_retry_until_ms,
        })
        .collect();
    let count = reports.len();
    let report = Report {
        reporting_mta: input.reporting_mta,
        envelope: &envelope,
        original: input.original,
        recipients: reports,
        now_ms: input.now_ms,
        message_id: input.message_id,
        max_full_bytes: usize::from(input.max_full_bytes),
    };
    let out = dsn::build(&report);
    assert_eq!(out, dsn::build(&report), "the same report, other bytes");
    assert!(only_crlf(&out), "a bare CR or LF in the notice");
    if !envelope.smtputf8 && input.original.is_ascii() && input.sender.is_ascii() {
        assert!(out.is_ascii(), "8-bit bytes in a 7-bit notice");
    }

    let message = MessageParser::default()
        .parse(&out)
        .expect("the notice parses");
    for header in message.headers() {
        let name = header.name.as_str().to_ascii_lowercase();
        assert!(
            TOP_FIELDS.contains(&name.as_str()),
            "a header field was added: {name:?}"
        );
    }
    let root = &message.parts[0];
    let ct = root.content_type().expect("a content type");
    assert_eq!((ct.ctype(), ct.subtype()), ("multipart", Some("report")));
    let ids = root.sub_parts().expect("multipart");
    assert_eq!(ids.len(), 3, "the report has three parts");
    let status = &message.parts[ids[1] as usize];
    let groups = status_groups(status.contents());
    let (first, rest) = groups.split_first().expect("per-message fields");
    for name in first {
        assert!(
            MESSAGE_FIELDS.contains(&name.as_str()),
            "a field was added: {name:?}"
        );
    }
    assert_eq!(rest.len(), count, "a recipient group was added or lost");
    for group in rest {
        for name in group {
            assert!(
                RECIPIENT_FIELDS.contains(&name.as_str()),
                "a field was added: {name:?}"
            );
        }
    }
});
