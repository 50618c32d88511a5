//! Delivery pipelined across messages on one connection, end to end: the real
//! server against the scripted primary. One round trip per message with
//! PIPELINING, many per round trip with CHUNKING, replies landing on the
//! message and recipient they answer, failures mid-pipeline deferring exactly
//! the messages still unanswered, and the number of connections per domain
//! following the backlog and the primary's limits.
//!
//! Mail is always queued while the primary is down and released at once when
//! it comes back, so a whole backlog meets one connection (or a few).

mod common;
mod primary;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{TestConfig, TestServer, dot_stuff, eventually, only_crlf};
use mxspool::config::TlsPolicy;
use mxspool::outbound::{Settings, Timeouts};
use mxspool::spool::{QueueId, RcptStatus};
use primary::{Caps, DROP, Mode, Primary, Received};

/// The envelope sender of all test mail. `origin.test` is routed to its own
/// primary ([`World::bounces`]), where failure notices arrive.
const SENDER: &str = "sender@origin.test";

/// How long any single expected event may take.
const WAIT: Duration = Duration::from_secs(10);

/// The relay domain's primary (down at first), the sender's mail server, and
/// the server, with the relay domain's mail going over at most
/// `connections_per_domain` (1 unless a test says otherwise) connections.
struct World {
    t: TestServer,
    relay: Primary,
    bounces: Primary,
}

impl World {
    async fn start(caps: Caps, tweak: impl FnOnce(TestConfig) -> TestConfig) -> World {
        let relay = Primary::start().await;
        relay.set_capabilities(caps);
        relay.set_mode(Mode::Down);
        let bounces = Primary::start().await;
        let config = TestConfig::default()
            .set("delivery", "probe_interval", r#""200ms""#)
            .set("delivery", "retry_initial", r#""1h""#)
            .set("delivery", "retry_max", r#""2h""#)
            .set("delivery", "connections_per_domain", "1")
            .domains(&format!(
                "[[domain]]\nname = \"example.com\"\nroute = \"[127.0.0.1]:{}\"\n\n\
                 [[domain]]\nname = \"origin.test\"\nroute = \"[127.0.0.1]:{}\"\n",
                relay.addr.port(),
                bounces.addr.port()
            ));
        let settings = Settings {
            timeouts: Timeouts::uniform(Duration::from_secs(5)),
            ..Settings::new("mx2.test", TlsPolicy::Opportunistic)
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let t = TestServer::start_with(dir, tweak(config), Some(settings)).await;
        World { t, relay, bounces }
    }

    /// Queues `n` messages tagged `{prefix}-{i}` for `rcpts(i)` while the
    /// primary is down, and waits until each has been tried (and deferred)
    /// once. Returns them in the order they were queued.
    async fn queue(
        &self,
        n: usize,
        prefix: &str,
        rcpts: impl Fn(usize) -> Vec<String>,
    ) -> Vec<Msg> {
        let mut msgs = Vec::new();
        // Sessions of 50 messages, MAIL, RCPT and DATA pipelined.
        for start in (0..n).step_by(50) {
            let mut c = self.t.ehlo().await;
            for i in start..n.min(start + 50) {
                let tag = format!("{prefix}-{i}");
                let to = rcpts(i);
                let mut commands = format!("MAIL FROM:<{SENDER}>\r\n");
                for r in &to {
                    commands.push_str(&format!("RCPT TO:<{r}>\r\n"));
                }
                commands.push_str("DATA\r\n");
                c.send(commands).await;
                c.expect(250).await;
                for _ in &to {
                    c.expect(250).await;
                }
                c.expect(354).await;
                c.send(dot_stuff(&tagged(&tag))).await;
                let id = c.reply().await.queue_id();
                msgs.push(Msg { tag, id, rcpts: to });
            }
            c.quit().await;
        }
        assert!(self.relay.messages().is_empty());
        let ids: HashSet<QueueId> = msgs.iter().map(|m| m.id).collect();
        eventually(WAIT, async || {
            let stored = self.envelopes();
            let tried = stored
                .iter()
                .filter(|e| ids.contains(&e.id))
                .filter(|e| e.recipients.iter().all(|r| r.attempts >= 1))
                .count();
            if tried == ids.len() {
                Ok(())
            } else {
                Err(format!("{tried} of {} tried while down", ids.len()))
            }
        })
        .await;
        msgs
    }

    /// Every queued message's body, by queue ID, as the spool holds it.
    fn bodies(&self) -> HashMap<QueueId, Vec<u8>> {
        self.t
            .stored()
            .into_iter()
            .map(|(e, body)| (e.id, body))
            .collect()
    }

    /// The attempts so far of each message's first recipient.
    fn attempts(&self) -> HashMap<QueueId, u32> {
        self.envelopes()
            .into_iter()
            .map(|e| (e.id, e.recipients[0].attempts))
            .collect()
    }

    /// The queued envelopes (without bodies: delivery may remove a message
    /// between reading its envelope and its body).
    fn envelopes(&self) -> Vec<mxspool::spool::Envelope> {
        self.t.spool().envelopes().expect("read envelopes")
    }

    /// Waits until the primary holds every one of `msgs` and nothing is
    /// queued any more (notices included), then checks each arrived exactly
    /// once.
    async fn wait_drained(&self, msgs: &[Msg], within: Duration) {
        eventually(within, async || {
            let counts = counts(&self.relay);
            let missing = msgs.iter().filter(|m| !counts.contains_key(&m.tag)).count();
            let queued = self.t.spool().envelopes().expect("envelopes").len();
            if missing == 0 && queued == 0 {
                Ok(())
            } else {
                Err(format!(
                    "{missing} of {} not delivered, {queued} still queued",
                    msgs.len()
                ))
            }
        })
        .await;
        let counts = counts(&self.relay);
        let twice: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
        assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    }
}

/// A message queued by [`World::queue`].
#[derive(Clone, Debug)]
struct Msg {
    tag: String,
    id: QueueId,
    rcpts: Vec<String>,
}

fn one_rcpt(i: usize) -> Vec<String> {
    vec![format!("u{i}@example.com")]
}

/// A message with a recognisable Subject and a line that needs dot-stuffing.
fn tagged(tag: &str) -> Vec<u8> {
    format!(
        "From: <{SENDER}>\r\nSubject: {tag}\r\nMessage-ID: <{tag}@origin.test>\r\n\r\n\
         body of {tag}\r\n.leading dot\r\nlast line\r\n"
    )
    .into_bytes()
}

/// The Subject of a received message (its tag).
fn subject(m: &Received) -> String {
    String::from_utf8_lossy(&m.body)
        .split("\r\n")
        .find_map(|l| l.strip_prefix("Subject: "))
        .unwrap_or("")
        .to_string()
}

/// How many times the primary accepted each tag.
fn counts(primary: &Primary) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for m in primary.messages() {
        *counts.entry(subject(&m)).or_insert(0) += 1;
    }
    counts
}

/// The command's verb, upper-cased.
fn verb(line: &str) -> String {
    line.split([' ', ':'])
        .next()
        .unwrap_or("")
        .to_ascii_uppercase()
}

/// Turns of the connections that carried mail. A probe (greeting, EHLO,
/// QUIT) takes 3; a connection that carried a message at least 5.
fn delivering_turns(primary: &Primary) -> Vec<usize> {
    primary
        .turns_per_connection()
        .into_iter()
        .filter(|&t| t > 3)
        .collect()
}

/// The RCPT addresses the primary was sent, in order.
fn rcpt_order(primary: &Primary) -> Vec<String> {
    primary
        .commands()
        .iter()
        .filter(|l| verb(l) == "RCPT")
        .filter_map(|l| {
            l.split_once('<')?
                .1
                .split_once('>')
                .map(|(a, _)| a.to_string())
        })
        .collect()
}

/// A failure notice as the sender's server received it: the values of its
/// `Final-Recipient` and `Status` fields and its text.
struct Notice {
    final_recipients: Vec<String>,
    statuses: Vec<String>,
    text: String,
}

impl Notice {
    fn of(m: &Received) -> Notice {
        assert!(
            m.mail_from_line.starts_with("MAIL FROM:<>"),
            "a notice comes from <>: {}",
            m.mail_from_line
        );
        let text = String::from_utf8_lossy(&m.body)
            .replace("\r\n\t", " ")
            .replace("\r\n ", " ");
        let field = |name: &str| -> Vec<String> {
            text.split("\r\n")
                .filter_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                })
                .collect()
        };
        Notice {
            final_recipients: field("Final-Recipient"),
            statuses: field("Status"),
            text: text.clone(),
        }
    }
}

/// Checks that exactly one failure notice reached the sender, about
/// `rcpt` alone, with `status`, quoting the header of the message `tag`.
async fn assert_one_notice(w: &World, rcpt: &str, status: &str, tag: &str) {
    let got = w.bounces.messages();
    assert_eq!(
        got.len(),
        1,
        "one failure notice expected, got {}: {:?}",
        got.len(),
        got.iter()
            .map(|m| Notice::of(m).final_recipients)
            .collect::<Vec<_>>()
    );
    let notice = Notice::of(&got[0]);
    assert_eq!(notice.final_recipients.len(), 1, "{}", notice.text);
    assert!(
        notice.final_recipients[0].ends_with(&format!(";{rcpt}"))
            || notice.final_recipients[0].ends_with(&format!("; {rcpt}")),
        "notice about {rcpt} expected: {:?}",
        notice.final_recipients
    );
    assert_eq!(notice.statuses, [status], "{}", notice.text);
    assert!(
        notice.text.contains(&format!("Subject: {tag}\r\n")),
        "the notice quotes {tag}'s header:\n{}",
        notice.text
    );
}

// ---------------------------------------------------------------------------
// Round trips

/// Checks that the primary got each message's content exactly as the spool
/// held it (`Received:` field and all), by the transfer expected.
fn assert_bodies(w: &World, msgs: &[Msg], bodies: &HashMap<QueueId, Vec<u8>>, bdat: bool) {
    let got = w.relay.messages();
    for m in msgs {
        let r = got
            .iter()
            .find(|r| subject(r) == m.tag)
            .unwrap_or_else(|| panic!("{} not received", m.tag));
        assert_eq!(r.bdat, bdat, "{}: transfer", m.tag);
        let stored = &bodies[&m.id];
        assert!(
            r.body == *stored,
            "{}: body differs from the spool's\n got: {:?}\nwant: {:?}",
            m.tag,
            String::from_utf8_lossy(&r.body),
            String::from_utf8_lossy(stored)
        );
        assert!(only_crlf(&r.body), "{}: bare CR or LF", m.tag);
        assert!(
            r.body.ends_with(
                format!("body of {}\r\n.leading dot\r\nlast line\r\n", m.tag).as_bytes()
            ),
            "{}: {:?}",
            m.tag,
            String::from_utf8_lossy(&r.body)
        );
    }
}

#[tokio::test]
async fn with_pipelining_each_message_costs_one_round_trip_and_no_rset() {
    let w = World::start(Caps::default(), |c| c).await;
    let msgs = w.queue(20, "rt", one_rcpt).await;
    let bodies = w.bodies();
    w.relay.set_mode(Mode::Up);
    w.wait_drained(&msgs, WAIT).await;

    assert_bodies(&w, &msgs, &bodies, false);
    let turns = delivering_turns(&w.relay);
    assert_eq!(
        turns.len(),
        1,
        "one connection carries the mail: turns per connection {:?}",
        w.relay.turns_per_connection()
    );
    // Greeting, EHLO, the first MAIL group, one per message, QUIT: 23.
    assert!(
        turns[0] <= 20 + 5,
        "{} round trips for 20 messages (one per message expected)",
        turns[0]
    );
    let commands = w.relay.commands();
    assert!(
        !commands.iter().any(|l| verb(l) == "RSET"),
        "no RSET between completed transactions: {commands:?}"
    );
    let batches = w.relay.batches();
    let with_mail: Vec<&Vec<String>> = batches
        .iter()
        .filter(|b| b.iter().any(|l| verb(l) == "MAIL"))
        .collect();
    assert_eq!(with_mail.len(), 20, "{batches:?}");
    for b in with_mail {
        let verbs: Vec<String> = b.iter().map(|l| verb(l)).collect();
        assert_eq!(
            verbs,
            ["MAIL", "RCPT", "DATA"],
            "batch {b:?} in {batches:?}"
        );
    }
}

#[tokio::test]
async fn with_chunking_several_messages_share_a_round_trip() {
    let caps = Caps {
        chunking: true,
        ..Caps::default()
    };
    let w = World::start(caps, |c| c).await;
    let msgs = w.queue(20, "chunk", one_rcpt).await;
    let bodies = w.bodies();
    w.relay.set_mode(Mode::Up);
    w.wait_drained(&msgs, WAIT).await;

    // By BDAT, byte for byte what the spool holds: what DATA delivers after
    // its dot-stuffing is undone (checked by the test above), and no stuffing.
    assert_bodies(&w, &msgs, &bodies, true);
    let commands = w.relay.commands();
    assert!(!commands.iter().any(|l| verb(l) == "DATA"), "{commands:?}");
    // Every connection counted, probes (greeting, EHLO, QUIT) included: a
    // whole batch of BDATs can go out in one write, so a delivering
    // connection may take no more turns than a probe. Unloaded, about 4 in
    // all; by DATA it takes 24 (one per message, plus greeting, EHLO, the
    // last body and QUIT). A loaded machine splits reads and may start a
    // second connection, so the bound only asks for fewer round trips than
    // messages.
    let per_connection = w.relay.turns_per_connection();
    assert!(per_connection.len() <= 3, "{per_connection:?}");
    let total: usize = per_connection.iter().sum();
    assert!(
        total < 20,
        "{total} round trips for 20 messages by BDAT (several per round trip expected): {per_connection:?}"
    );
}

// ---------------------------------------------------------------------------
// Replies land where they belong

async fn refused_recipient_of_the_third_message(caps: Caps) {
    let w = World::start(caps, |c| c).await;
    let two = |i: usize| vec![format!("a{i}@example.com"), format!("b{i}@example.com")];
    w.relay
        .set_rcpt_reply("b2@example.com", "550 5.1.1 <b2@example.com>: no such user");
    let msgs = w.queue(6, "rcpt", two).await;
    w.relay.set_mode(Mode::Up);
    // The original leaves the spool once its notice is queued, the notice
    // once the sender's server has it.
    w.wait_drained(&msgs, WAIT).await;
    assert!(
        w.bounces.wait_for_messages(1, WAIT).await,
        "no failure notice"
    );

    // Each message once, with both its recipients; the third's b refused.
    for m in &msgs {
        let got: Vec<Received> = w
            .relay
            .messages()
            .into_iter()
            .filter(|r| subject(r) == m.tag)
            .collect();
        assert_eq!(got.len(), 1, "{}", m.tag);
        assert_eq!(
            got[0].rcpt_lines.len(),
            2,
            "{}: {:?}",
            m.tag,
            got[0].rcpt_lines
        );
    }
    assert_eq!(
        rcpt_order(&w.relay),
        (0..6).flat_map(two).collect::<Vec<_>>(),
        "each recipient asked for once"
    );
    // b2 failed, and only b2: a2 was delivered (no notice about it, no retry).
    assert_one_notice(&w, "b2@example.com", "5.1.1", "rcpt-2").await;
}

#[tokio::test]
async fn a_refused_recipient_fails_alone_with_replies_for_two_messages_in_one_packet() {
    refused_recipient_of_the_third_message(Caps::default()).await;
}

#[tokio::test]
async fn a_refused_recipient_fails_alone_with_chunking() {
    refused_recipient_of_the_third_message(Caps {
        chunking: true,
        ..Caps::default()
    })
    .await;
}

async fn data_refused_for_the_second_message(caps: Caps) {
    let w = World::start(caps, |c| c).await;
    let msgs = w.queue(6, "eod", one_rcpt).await;
    w.relay
        .push_data_replies(&["250 2.0.0 ok", "554 5.6.0 rejected"]);
    w.relay.set_mode(Mode::Up);
    assert!(
        w.bounces.wait_for_messages(1, WAIT).await,
        "no failure notice"
    );
    let order = rcpt_order(&w.relay);
    assert!(order.len() >= 2, "{order:?}");
    let second = msgs
        .iter()
        .find(|m| m.rcpts[0] == order[1])
        .expect("the second message on the wire")
        .clone();
    let others: Vec<Msg> = msgs.iter().filter(|m| m.id != second.id).cloned().collect();
    w.wait_drained(&others, WAIT).await;
    assert!(
        !counts(&w.relay).contains_key(&second.tag),
        "{} was refused, yet recorded",
        second.tag
    );
    assert_eq!(
        w.relay.messages().len(),
        5,
        "the other five delivered, once each"
    );
    assert_one_notice(&w, &second.rcpts[0], "5.6.0", &second.tag).await;
    // Never tried again.
    assert_eq!(
        order.iter().filter(|a| **a == second.rcpts[0]).count(),
        1,
        "{order:?}"
    );
    assert_eq!(rcpt_order(&w.relay).len(), 6);
}

#[tokio::test]
async fn a_5xx_for_one_messages_data_mid_pipeline_fails_only_that_message() {
    data_refused_for_the_second_message(Caps::default()).await;
}

#[tokio::test]
async fn a_5xx_for_one_messages_bdat_mid_pipeline_fails_only_that_message() {
    data_refused_for_the_second_message(Caps {
        chunking: true,
        ..Caps::default()
    })
    .await;
}

// ---------------------------------------------------------------------------
// A connection lost mid-pipeline

/// Ten messages over one connection; the 4th end of data is answered by
/// `failure` (a 421, or the connection closing). The first three are
/// recorded delivered; the 4th, and every other message already in flight,
/// deferred by one attempt and still queued; after a flush all arrive, each
/// exactly once (this primary records nothing it did not answer with 2xx,
/// so a second copy would mean a message sent again after its 250).
async fn lost_mid_pipeline(caps: Caps, failure: &str) {
    let chunking = caps.chunking;
    let w = World::start(caps, |c| c).await;
    let msgs = w.queue(10, "lost", one_rcpt).await;
    let before = w.attempts();
    w.relay
        .push_data_replies(&["250 2.0.0 ok", "250 2.0.0 ok", "250 2.0.0 ok", failure]);
    w.relay.set_mode(Mode::Up);
    assert!(w.relay.wait_for_messages(3, WAIT).await, "no delivery");

    // Settled: every message delivered (gone) or deferred by this attempt.
    let deferred: HashSet<QueueId> = eventually(WAIT, async || {
        let stored = w.envelopes();
        let mut deferred = HashSet::new();
        for env in &stored {
            let r = &env.recipients[0];
            if r.status == RcptStatus::Queued && r.attempts == before[&env.id] + 1 {
                deferred.insert(env.id);
            } else {
                return Err(format!("{} not settled: {r:?}", env.id));
            }
        }
        if deferred.is_empty() {
            return Err("nothing deferred".into());
        }
        Ok(deferred)
    })
    .await;

    let order = rcpt_order(&w.relay);
    let by_rcpt = |a: &str| msgs.iter().find(|m| m.rcpts[0] == a).unwrap().clone();
    let first_three: Vec<Msg> = order[..3].iter().map(|a| by_rcpt(a)).collect();
    let fourth = by_rcpt(&order[3]);
    // The first three once, on the connection that failed, and gone.
    let got = counts(&w.relay);
    for m in &first_three {
        assert_eq!(got.get(&m.tag), Some(&1), "{}: {got:?}", m.tag);
        assert!(
            !deferred.contains(&m.id),
            "{} delivered, yet deferred",
            m.tag
        );
        assert!(
            w.t.spool().envelope(m.id).unwrap().is_none(),
            "{} delivered, yet queued",
            m.tag
        );
    }
    assert!(
        deferred.contains(&fourth.id),
        "{}, whose end of data was answered by {failure:?}, is not deferred",
        fourth.tag
    );
    for env in w.envelopes() {
        let r = &env.recipients[0];
        assert!(!r.unreachable, "a live primary deferred it: {r:?}");
    }
    // In flight when the 4th end of data was answered: with CHUNKING all ten
    // (the window is 32), so the 4th to the 10th are deferred; with DATA the
    // 4th and the 5th, whose MAIL, RCPT and DATA went with the 4th's body.
    // The rest were never sent and may go over a new connection.
    let in_flight = if chunking { 7 } else { 2 };
    assert_eq!(
        deferred.len(),
        in_flight,
        "deferred {} messages, delivered {:?}",
        deferred.len(),
        counts(&w.relay)
    );
    // Nothing deferred was delivered; nothing delivered is deferred.
    for m in &msgs {
        assert_ne!(
            deferred.contains(&m.id),
            counts(&w.relay).contains_key(&m.tag),
            "{}: deferred and delivered, or neither",
            m.tag
        );
    }

    w.t.server.flush(Some("example.com".into()));
    w.wait_drained(&msgs, WAIT).await;
    assert!(
        w.bounces.messages().is_empty(),
        "no notice for deferred mail"
    );
}

#[tokio::test]
async fn a_421_mid_pipeline_defers_exactly_the_unanswered_messages() {
    lost_mid_pipeline(Caps::default(), "421 4.3.0 closing").await;
}

#[tokio::test]
async fn a_dropped_connection_mid_pipeline_defers_exactly_the_unanswered_messages() {
    lost_mid_pipeline(Caps::default(), DROP).await;
}

#[tokio::test]
async fn a_421_mid_bdat_pipeline_defers_exactly_the_unanswered_messages() {
    lost_mid_pipeline(
        Caps {
            chunking: true,
            ..Caps::default()
        },
        "421 4.3.0 closing",
    )
    .await;
}

#[tokio::test]
async fn a_dropped_connection_mid_bdat_pipeline_defers_exactly_the_unanswered_messages() {
    lost_mid_pipeline(
        Caps {
            chunking: true,
            ..Caps::default()
        },
        DROP,
    )
    .await;
}

// ---------------------------------------------------------------------------
// Connections per domain

/// `mxspool_delivery_connections{domain="example.com"}` on /metrics.
fn connections_gauge(t: &TestServer) -> i64 {
    let text = t.server.metrics().render(&t.spool().gauges(), 0);
    text.lines()
        .find_map(|l| l.strip_prefix(r#"mxspool_delivery_connections{domain="example.com"} "#))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no connections gauge for example.com in /metrics:\n{text}"))
}

#[tokio::test]
async fn connections_grow_with_the_backlog_up_to_the_cap() {
    let w = World::start(Caps::default(), |c| {
        c.set("delivery", "connections_per_domain", "10")
    })
    .await;
    let msgs = w.queue(300, "grow", one_rcpt).await;
    w.relay.set_latency(Duration::from_millis(50));
    w.relay.set_mode(Mode::Up);

    let mut gauge_max = 0;
    eventually(Duration::from_secs(20), async || {
        gauge_max = gauge_max.max(connections_gauge(&w.t));
        let n = w.relay.messages().len();
        if n >= msgs.len() {
            Ok(())
        } else {
            Err(format!("{n} of {} delivered", msgs.len()))
        }
    })
    .await;
    w.wait_drained(&msgs, WAIT).await;
    let max = w.relay.max_concurrent();
    assert!(
        max > 5,
        "at most {max} sessions at once: no growth past the slow start"
    );
    assert!(max <= 10, "{max} sessions at once, above the cap of 10");
    assert!(gauge_max <= 10, "the gauge showed {gauge_max} connections");
    assert!(gauge_max > 0, "the gauge never showed a connection");
    // Back to 0 once the workers have said QUIT.
    eventually(WAIT, async || match connections_gauge(&w.t) {
        0 => Ok(()),
        n => Err(format!("{n} connections still counted")),
    })
    .await;
}

#[tokio::test]
async fn connections_shrink_when_the_primary_refuses_more() {
    let w = World::start(Caps::default(), |c| {
        c.set("delivery", "connections_per_domain", "10")
    })
    .await;
    let msgs = w.queue(200, "shrink", one_rcpt).await;
    let before = w.attempts();
    w.relay.set_max_sessions(Some(2));
    w.relay.set_latency(Duration::from_millis(10));
    w.relay.set_mode(Mode::Up);

    // Refused connections put their mail back untried: no message is ever
    // deferred again, marked unreachable or failed.
    let mut retried: Option<String> = None;
    eventually(Duration::from_secs(20), async || {
        for env in w.envelopes() {
            for r in &env.recipients {
                if retried.is_none()
                    && (r.attempts > before.get(&env.id).copied().unwrap_or(1)
                        || r.status == RcptStatus::Failed)
                {
                    retried = Some(format!(
                        "{} after {} refused connections: {r:?}",
                        env.id,
                        w.relay.refused()
                    ));
                }
            }
        }
        let n = w.relay.messages().len();
        if n >= msgs.len() {
            Ok(())
        } else {
            Err(format!(
                "{n} of {} delivered, {} connections refused, first retried: {retried:?}",
                msgs.len(),
                w.relay.refused()
            ))
        }
    })
    .await;
    w.wait_drained(&msgs, WAIT).await;
    assert!(
        retried.is_none(),
        "deferred by a refused connection: {retried:?}; {} connections refused in all, {} accepted",
        w.relay.refused(),
        w.relay.connections()
    );
    assert!(w.bounces.messages().is_empty(), "no notices");
    assert!(w.relay.max_concurrent() <= 2);
    let refused = w.relay.refused();
    assert!(
        refused < 15,
        "{refused} connections refused over the drain (of {} accepted); the allowance does not stay down",
        w.relay.connections()
    );
}
