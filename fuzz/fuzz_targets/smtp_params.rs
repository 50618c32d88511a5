//! Addresses and ESMTP parameters, both ways: arbitrary `MAIL FROM` and
//! `RCPT TO` lines go through the real session (smtp-proto's parser, our
//! relay policy and parameter checks) after an EHLO; what it accepts is
//! planned for delivery as the outbound client would send it, and the lines
//! we would send are parsed again (smtp-proto standing in for the next hop).
//!
//! Input: one byte of next-hop capabilities (DSN, SMTPUTF8, 8BITMIME, SIZE)
//! and whether the content is 8-bit, then command lines.
//!
//! Checked: every reply is well-formed; every recipient is either settled or
//! gets exactly one `RCPT TO`; each line we send is one CRLF-terminated line
//! that the next hop parses back into the same address, `ENVID=`, `ORCPT=`,
//! `NOTIFY=`, `RET=`, `BODY=` and `SMTPUTF8` that we accepted.
#![no_main]

#[path = "common.rs"]
mod common;

use std::net::IpAddr;

use common::{MAX_RECIPIENTS, check_reply};
use libfuzzer_sys::fuzz_target;
use mxspool::inbound::conn::MAX_LINE;
use mxspool::inbound::data::Data;
use mxspool::inbound::session::{Env, Knowledge, Session, Step};
use mxspool::outbound::Capabilities;
use mxspool::outbound::fuzz as out;
use mxspool::spool::{BodyType, Client, Envelope, Notify, QueueId, Ret};
use smtp_proto::{
    MAIL_BODY_7BIT, MAIL_BODY_8BITMIME, MAIL_RET_FULL, MAIL_RET_HDRS, MAIL_SMTPUTF8,
    RCPT_NOTIFY_DELAY, RCPT_NOTIFY_FAILURE, RCPT_NOTIFY_NEVER, RCPT_NOTIFY_SUCCESS, Request,
};

/// One line as the next hop reads it.
fn reparse(line: &str) -> Request<String> {
    assert!(line.ends_with("\r\n"), "{line:?}");
    assert!(
        !line[..line.len() - 2].contains(['\r', '\n']),
        "a line break inside a command we send: {line:?}"
    );
    match Request::parse(&mut line.as_bytes().iter()) {
        Ok(request) => request.into_owned(),
        Err(e) => panic!("the next hop cannot read {line:?}: {e:?}"),
    }
}

fn starts_with_ignore_case(line: &[u8], word: &[u8]) -> bool {
    line.len() >= word.len() && line[..word.len()].eq_ignore_ascii_case(word)
}

fuzz_target!(|input: &[u8]| {
    let [bits, commands @ ..] = input else {
        return;
    };
    let policy = common::policy();
    let room = |_: u64| true;
    let knowledge = |_: &str| Knowledge::Unseen;
    let up = |_: &str| false;
    let env = Env {
        policy,
        spool_has_room: &room,
        knowledge: &knowledge,
        primary_down: &up,
        may_call_out: &up,
        primary_up: &|_| false,
        greylisted: &|_, _| false,
    };
    let mut session = Session::new(IpAddr::from([198, 51, 100, 7]));
    let Step::Reply(ehlo) = session.command(b"EHLO client.test\r\n", &env) else {
        panic!("EHLO");
    };
    assert_eq!(ehlo.code, 250);
    let lines = commands
        .split_inclusive(|&b| b == b'\n')
        .filter(|l| l.ends_with(b"\n") && l.len() <= MAX_LINE)
        .filter(|l| starts_with_ignore_case(l, b"MAIL") || starts_with_ignore_case(l, b"RCPT"))
        .take(2 * MAX_RECIPIENTS + 2);
    for line in lines {
        match session.command(line, &env) {
            Step::Reply(reply) => check_reply(&reply),
            Step::Close(reply) => {
                check_reply(&reply);
                return;
            }
            other => panic!("{other:?}"),
        }
    }
    if !matches!(session.command(b"DATA\r\n", &env), Step::Data(_)) {
        return;
    }
    let data = Data {
        body: Vec::new(),
        size: 0,
        oversize: false,
        has_8bit: false,
        normalised: false,
    };
    let t = session
        .finish_data(&data, policy)
        .expect("an empty message is taken");

    let envelope = Envelope {
        id: QueueId(1),
        sender: t.sender,
        ret: t.ret,
        envid: t.envid,
        envid_xtext: t.envid_xtext,
        body_type: t.body_type,
        smtputf8: t.smtputf8,
        has_8bit: bits & 16 != 0,
        arrived_ms: 0,
        size: 100,
        client: Client {
            ip: IpAddr::from([198, 51, 100, 7]),
            helo: "client.test".into(),
            tls: false,
        },
        recipients: t.recipients,
        notices_to: None,
    };
    let caps = Capabilities {
        dsn: bits & 1 != 0,
        smtputf8: bits & 2 != 0,
        eightbitmime: bits & 4 != 0,
        size: (bits & 8 != 0).then_some(1_000_000),
        pipelining: true,
        chunking: false,
        starttls: false,
        tls: false,
    };
    let all: Vec<usize> = (0..envelope.recipients.len()).collect();
    let plan = out::plan(&envelope, 100, &caps, &all);
    let mut seen: Vec<usize> = plan
        .settled
        .iter()
        .map(|(i, _)| *i)
        .chain(plan.rcpts.iter().map(|(i, _)| *i))
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, all, "each recipient settled or sent, once");
    if plan.rcpts.is_empty() {
        return;
    }
    // What the session accepted as ENVID/ORCPT is printable ASCII within RFC
    // 3461's limits (8-bit values were once accepted and passed on mangled).
    let printable = |v: &Option<String>, max: usize| {
        v.as_deref()
            .is_none_or(|v| v.len() <= max && v.bytes().all(|b| (b' '..=b'~').contains(&b)))
    };
    assert!(printable(&envelope.envid, 100), "{:?}", envelope.envid);
    for r in &envelope.recipients {
        assert!(printable(&r.orcpt, 500), "{:?}", r.orcpt);
    }

    let Request::Mail { from } = reparse(&plan.mail_from) else {
        panic!("not a MAIL command: {:?}", plan.mail_from);
    };
    assert_eq!(from.address, envelope.sender, "{:?}", plan.mail_from);
    assert_eq!(from.flags & MAIL_SMTPUTF8 != 0, envelope.smtputf8);
    if caps.eightbitmime {
        let declared = if from.flags & MAIL_BODY_8BITMIME != 0 {
            BodyType::EightBitMime
        } else if from.flags & MAIL_BODY_7BIT != 0 {
            BodyType::SevenBit
        } else {
            BodyType::Unset
        };
        // BODY= goes on exactly as the client declared it, 8-bit content or not.
        assert_eq!(declared, envelope.body_type);
    }
    if caps.dsn {
        let ret = if from.flags & MAIL_RET_FULL != 0 {
            Ret::Full
        } else if from.flags & MAIL_RET_HDRS != 0 {
            Ret::Headers
        } else {
            Ret::Unset
        };
        assert_eq!(ret, envelope.ret);
        // xtext carries octets; smtp-proto reads each one as a character, so
        // only ASCII values can come back as they were.
        if let Some(envid) = envelope
            .envid
            .as_deref()
            .filter(|e| !e.is_empty() && e.is_ascii())
        {
            assert_eq!(from.env_id.as_deref(), Some(envid), "{:?}", plan.mail_from);
        }
    }
    for (i, line) in &plan.rcpts {
        let r = &envelope.recipients[*i];
        let Request::Rcpt { to } = reparse(line) else {
            panic!("not a RCPT command: {line:?}");
        };
        assert_eq!(to.address, r.address, "{line:?}");
        if caps.dsn {
            let mut notify = 0;
            for (flag, bit) in [
                (RCPT_NOTIFY_SUCCESS, Notify::SUCCESS),
                (RCPT_NOTIFY_FAILURE, Notify::FAILURE),
                (RCPT_NOTIFY_DELAY, Notify::DELAY),
                (RCPT_NOTIFY_NEVER, Notify::NEVER),
            ] {
                if to.flags & flag != 0 {
                    notify |= bit;
                }
            }
            if !r.notify.has(Notify::NEVER) {
                assert_eq!(notify, r.notify.0, "{line:?}");
            } else {
                assert_eq!(notify, Notify::NEVER, "{line:?}");
            }
            if let Some(orcpt) = r.orcpt.as_deref().filter(|o| !o.is_empty() && o.is_ascii()) {
                assert_eq!(to.orcpt.as_deref(), Some(orcpt), "{line:?}");
            }
        }
    }
});
