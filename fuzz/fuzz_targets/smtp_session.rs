//! The inbound SMTP session fed arbitrary client bytes, as `conn.rs` feeds it:
//! command lines (with the 2048-byte limit), DATA content through the
//! `DataReader` and BDAT octets by their announced length, a callout answered
//! when the session asks for one, the session started over after STARTTLS.
//! The pipelining guard of `conn.rs` is not applied, so commands reach the
//! state machine in orders a real connection would cut short.
//!
//! Input: two bytes of circumstances (spool room, what the primary said about
//! recipients, whether it is down, callouts allowed and their answer, TLS
//! offered, the client's address, the size of the pieces content arrives in),
//! then the client's bytes.
//!
//! Checked: every reply is well-formed; every message handed over for commit
//! has CRLF line endings only, fits the size limit, and comes back unchanged
//! from dot-stuffing on the way out and DATA reading at the next hop (no
//! terminator injection); its recipients are relay recipients that can be
//! written as SMTP paths; our `Received:` is one header field; its envelope
//! survives the spool's encoding.
#![no_main]

#[path = "common.rs"]
mod common;

use std::net::IpAddr;

use common::{
    MAX_MESSAGE_SIZE, MAX_RECIPIENTS, POSTMASTER, check_reply, is_relay_domain, only_crlf,
};
use libfuzzer_sys::fuzz_target;
use mxspool::inbound::conn::MAX_LINE;
use mxspool::inbound::data::{Data, DataReader, count_received};
use mxspool::inbound::policy::Policy;
use mxspool::inbound::received::Trace;
use mxspool::inbound::session::{Chunked, Env, Knowledge, Session, Step, Tls, Transaction};
use mxspool::outbound::fuzz as out;
use mxspool::spool::{Client, Envelope, QueueId};

/// What the world outside the session says while it runs.
#[derive(Clone, Copy, Debug)]
struct World {
    room: bool,
    knowledge: Knowledge,
    primary_down: bool,
    may_call_out: bool,
    /// The callout's answer: `None` = the primary could not be reached.
    verdict: Option<bool>,
    tls: bool,
    ip: IpAddr,
    /// Content arrives in pieces of this many bytes.
    piece: usize,
}

impl World {
    fn new(flags: u8, more: u8) -> World {
        World {
            room: flags & 1 == 0,
            knowledge: match (flags >> 1) & 3 {
                1 => Knowledge::Exists,
                2 => Knowledge::DoesNotExist,
                _ => Knowledge::Unseen,
            },
            primary_down: flags & 8 != 0,
            may_call_out: flags & 16 != 0,
            verdict: match (flags >> 5) & 3 {
                1 => Some(true),
                2 => Some(false),
                _ => None,
            },
            tls: flags & 128 != 0,
            ip: if more & 128 != 0 {
                IpAddr::from([127, 0, 0, 1])
            } else {
                IpAddr::from([198, 51, 100, 7])
            },
            piece: usize::from(more & 127).max(1),
        }
    }
}

/// One command line, the way `conn.rs` runs it: a callout request is
/// answered and the command given again, with no second callout allowed.
fn command(session: &mut Session, policy: &Policy, world: &World, line: &[u8]) -> Step {
    let room = |_: u64| world.room;
    let knowledge = |_: &str| world.knowledge;
    let down = |_: &str| world.primary_down;
    let call_out = |_: &str| world.may_call_out;
    let env = Env {
        policy,
        spool_has_room: &room,
        knowledge: &knowledge,
        primary_down: &down,
        may_call_out: &call_out,
        primary_up: &|_| false,
        greylisted: &|_, _| false,
    };
    let step = session.command(line, &env);
    let Step::Verify(address) = step else {
        return step;
    };
    assert!(world.may_call_out, "a callout nobody allowed: {address:?}");
    let answer = match world.verdict {
        Some(true) => Knowledge::Exists,
        Some(false) => Knowledge::DoesNotExist,
        None => Knowledge::Unseen,
    };
    let knowledge = |a: &str| {
        if a == address {
            answer
        } else {
            world.knowledge
        }
    };
    let down = |a: &str| world.primary_down || (a == address && world.verdict.is_none());
    let never = |_: &str| false;
    let env = Env {
        policy,
        spool_has_room: &room,
        knowledge: &knowledge,
        primary_down: &down,
        may_call_out: &never,
        primary_up: &|_| false,
        greylisted: &|_, _| false,
    };
    let step = session.command(line, &env);
    assert!(
        !matches!(step, Step::Verify(_)),
        "a second callout for one command: {step:?}"
    );
    step
}

/// What any reader (DATA or BDAT) hands over, kept or refused.
fn check_data(data: &Data) {
    assert!(only_crlf(&data.body), "stored content with a bare CR or LF");
    assert!(data.body.is_empty() || data.body.ends_with(b"\r\n"));
    if data.oversize {
        assert!(data.body.is_empty() && data.size > MAX_MESSAGE_SIZE);
    } else {
        assert_eq!(data.size, data.body.len() as u64);
        assert!(data.size <= MAX_MESSAGE_SIZE);
        assert_eq!(data.has_8bit, data.body.iter().any(|&b| b >= 0x80));
    }
    // What the next hop reads after our DATA is exactly what we stored: the
    // terminator comes at the end and nowhere before it.
    let wire = out::dot_stuff([data.body.as_slice()]);
    let (used, read) = DataReader::new(u64::MAX).feed(&wire);
    let read = read.expect("the stuffed body has its terminator");
    assert_eq!(used, wire.len(), "the data ended early on the wire");
    assert_eq!(read.body, data.body, "the body changed on the wire");
    assert!(!read.normalised);
    // And by BDAT it goes as it is.
    assert_eq!(out::crlf_clean(&data.body), data.body);
}

/// A message the session hands over for commit.
fn check_message(session: &Session, world: &World, policy: &Policy, t: Transaction, data: Data) {
    assert!(!data.oversize);
    assert!(count_received(&data.body) < policy.max_received_headers);
    assert!(!t.recipients.is_empty(), "a message without recipients");
    assert!(
        out::path(&t.sender, t.smtputf8).is_some(),
        "accepted sender {:?}, which cannot be forwarded",
        t.sender
    );
    assert!(t.recipients.len() <= MAX_RECIPIENTS);
    for (i, r) in t.recipients.iter().enumerate() {
        let a = &r.address;
        assert!(
            t.recipients[..i]
                .iter()
                .all(|o| !o.address.eq_ignore_ascii_case(a)),
            "duplicate recipient {a:?}"
        );
        // Every accepted recipient can be written as a path (a subdomain with
        // `!` in it was once accepted, then bounced).
        let path = out::path(a, t.smtputf8);
        assert!(
            path.as_deref().is_some_and(|p| !p.is_empty()),
            "accepted {a:?}, which cannot be forwarded (smtputf8: {})",
            t.smtputf8
        );
        if a == POSTMASTER {
            continue;
        }
        let (local, domain) = a.rsplit_once('@').expect("a recipient without a domain");
        assert!(is_relay_domain(domain), "relayed to {a:?}");
        assert!(
            !local.is_empty() && !local.contains(['@', '%', '!']),
            "routing trick accepted: {a:?}"
        );
        if domain == "example.org" || domain.ends_with(".example.org") {
            let l = local.to_lowercase();
            assert!(
                l == "alice" || l == "postmaster" || a.eq_ignore_ascii_case("bob@example.org"),
                "not on example.org's list: {a:?}"
            );
        }
    }

    // Our trace field, as `conn.rs` prepends it: one field, whatever the
    // client called itself.
    let id = QueueId(0x0123_4567_89ab);
    let header = Trace {
        helo: session.helo_name(),
        ip: world.ip,
        by: &policy.hostname,
        esmtp: session.is_esmtp(),
        tls: session.is_tls(),
        smtputf8: t.smtputf8,
        id,
        only_recipient: match t.recipients.as_slice() {
            [only] => Some(only.address.as_str()),
            _ => None,
        },
        date: 1_800_000_000,
        fetched_with: None,
    }
    .header();
    assert!(header.starts_with("Received: from "), "{header:?}");
    assert!(
        only_crlf(header.as_bytes()) && header.ends_with("\r\n"),
        "{header:?}"
    );
    for line in header.trim_end_matches("\r\n").split("\r\n").skip(1) {
        assert!(line.starts_with('\t'), "{header:?}");
    }
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(&data.body);
    assert_eq!(
        count_received(&body),
        count_received(&data.body) + 1,
        "{header:?}"
    );

    let envelope = Envelope {
        id,
        sender: t.sender,
        ret: t.ret,
        envid: t.envid,
        envid_xtext: t.envid_xtext,
        body_type: t.body_type,
        smtputf8: t.smtputf8,
        has_8bit: data.has_8bit,
        arrived_ms: 1_800_000_000_000,
        size: body.len() as u64,
        client: Client {
            ip: world.ip,
            helo: session.helo_name().to_owned(),
            tls: session.is_tls(),
        },
        recipients: t.recipients,
        notices_to: None,
    };
    assert_eq!(Envelope::decode(&envelope.encode()).as_ref(), Ok(&envelope));
}

fuzz_target!(|input: &[u8]| {
    let [flags, more, client @ ..] = input else {
        return;
    };
    let world = World::new(*flags, *more);
    let policy = common::policy();
    let offered = if world.tls {
        Tls::Offered
    } else {
        Tls::Unavailable
    };
    let mut session = Session::with_tls(world.ip, offered);
    check_reply(&Session::greeting(policy));
    let mut at = 0;
    loop {
        let rest = &client[at..];
        let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
            return;
        };
        let line = &rest[..=lf];
        at += lf + 1;
        let step = if line.len() > MAX_LINE {
            session.line_too_long()
        } else {
            command(&mut session, policy, &world, line)
        };
        match step {
            Step::Reply(reply) => check_reply(&reply),
            Step::Etrn { domain, reply } => {
                check_reply(&reply);
                assert_eq!(policy.relay_domain(&domain), Some(domain.as_str()));
            }
            Step::Close(reply) => {
                check_reply(&reply);
                return;
            }
            Step::StartTls(reply) => {
                check_reply(&reply);
                assert!(world.tls && !session.is_tls());
                // What follows arrives inside TLS, to a new session.
                session = Session::with_tls(world.ip, Tls::Active);
            }
            Step::Verify(address) => unreachable!("answered in command(): {address}"),
            Step::Data(reply) => {
                check_reply(&reply);
                assert_eq!(reply.code, 354);
                let mut reader = DataReader::new(policy.max_message_size);
                let mut done = None;
                while done.is_none() && at < client.len() {
                    let end = (at + world.piece).min(client.len());
                    let (used, data) = reader.feed(&client[at..end]);
                    assert!(used <= end - at);
                    if data.is_none() {
                        assert_eq!(used, end - at, "a piece is consumed whole until the end");
                    }
                    at += used;
                    done = data;
                }
                // The client went away in the middle of the data.
                let Some(data) = done else { return };
                check_data(&data);
                match session.finish_data(&data, policy) {
                    Ok(t) => check_message(&session, &world, policy, t, data),
                    Err(reply) => check_reply(&reply),
                }
            }
            Step::Chunk { size } => {
                let end = usize::try_from(size)
                    .ok()
                    .and_then(|n| at.checked_add(n))
                    .filter(|&end| end <= client.len());
                let Some(end) = end else {
                    // The client went away in the middle of the chunk.
                    for piece in client[at..].chunks(world.piece) {
                        session.chunk(piece);
                    }
                    return;
                };
                for piece in client[at..end].chunks(world.piece) {
                    session.chunk(piece);
                }
                at = end;
                match session.end_chunk(policy) {
                    Chunked::Reply(reply) | Chunked::Discarded(reply) => check_reply(&reply),
                    Chunked::Message(t, data) => {
                        check_data(&data);
                        check_message(&session, &world, policy, t, data);
                    }
                }
            }
        }
    }
});
