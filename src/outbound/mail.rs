//! Planning one transaction, as a pure function of the envelope and what the
//! next hop offers: which recipients are settled before a byte is sent (SIZE,
//! SMTPUTF8, 8BITMIME rules, addresses that cannot be written as a path), and
//! the exact `MAIL FROM` and `RCPT TO` lines for the rest.
//!
//! BODY= is passed on as the client declared it, never added: content the
//! client did not declare 8-bit is relayed as received, to any next hop, as
//! Postfix does (RFC 5321 §2.4: a relay does not inspect content, and nearly
//! every server takes 8-bit anyway). Content declared `BODY=8BITMIME` that
//! really is 8-bit goes to a next hop without 8BITMIME only converted to 7-bit
//! (`downgrade.rs`); what cannot be converted fails with 5.6.3 rather than
//! going out raw under a broken promise.

use super::Capabilities;
use super::outcome::Outcome;
use super::xtext;
use crate::address::path;
use crate::spool::{BodyType, Envelope, Notify, Ret};
use crate::status::{Failure, Status};

/// What to send for one message, and what is already decided.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    /// Recipients that get no `RCPT TO`: their outcome is known already.
    pub settled: Vec<(usize, Outcome)>,
    /// The `MAIL FROM` line, CRLF included; meaningless if `rcpts` is empty.
    pub mail_from: String,
    /// The recipients to send, by index into the envelope, with their `RCPT TO`
    /// lines (CRLF included).
    pub rcpts: Vec<(usize, String)>,
}

/// A recipient we refuse to send: our own rule, not the next hop's answer.
fn failed(status: Status, reply: String) -> Outcome {
    Outcome::Failed {
        status,
        reply,
        reason: Failure::Policy,
    }
}

/// What became of content declared 8-bit (`BODY=8BITMIME`) on its way to a
/// next hop without 8BITMIME (see `downgrade.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum EightBit {
    /// The content goes as stored: no conversion was needed, or none tried.
    AsStored,
    /// Re-encoded as 7-bit MIME: nothing in it needs 8BITMIME any more.
    Converted,
    /// It could not be converted; why.
    Unconvertible(String),
}

/// Plans the delivery of `envelope` (a body of `body_len` bytes, sent as
/// stored) to the listed recipients. Indexes outside the envelope are ignored.
pub(crate) fn plan(
    envelope: &Envelope,
    body_len: u64,
    caps: &Capabilities,
    recipients: &[usize],
) -> Plan {
    plan_with(envelope, body_len, &EightBit::AsStored, caps, recipients)
}

/// [`plan`] for content of `body_len` bytes that went through conversion
/// as `eight_bit` says.
pub(crate) fn plan_with(
    envelope: &Envelope,
    body_len: u64,
    eight_bit: &EightBit,
    caps: &Capabilities,
    recipients: &[usize],
) -> Plan {
    let wanted = recipients
        .iter()
        .filter_map(|&i| envelope.recipients.get(i).map(|r| (i, r)));
    let refusal = refusal(envelope, body_len, eight_bit, caps);
    let sender = path(&envelope.sender, envelope.smtputf8);
    let refusal = refusal.or_else(|| {
        sender.is_none().then(|| {
            failed(
                Status::permanent(1, 7),
                "sender address cannot be written as an SMTP path".into(),
            )
        })
    });
    if let Some(outcome) = refusal {
        return Plan {
            settled: wanted.map(|(i, _)| (i, outcome.clone())).collect(),
            mail_from: String::new(),
            rcpts: Vec::new(),
        };
    }
    let mut settled = Vec::new();
    let mut rcpts = Vec::new();
    for (i, rcpt) in wanted {
        match path(&rcpt.address, envelope.smtputf8).filter(|p| !p.is_empty()) {
            None => settled.push((
                i,
                failed(
                    Status::permanent(1, 3),
                    format!(
                        "recipient {:?} cannot be written as an SMTP path",
                        rcpt.address
                    ),
                ),
            )),
            Some(p) => {
                let mut line = format!("RCPT TO:<{p}>");
                if caps.dsn {
                    if let Some(notify) = notify(rcpt.notify) {
                        line.push_str(" NOTIFY=");
                        line.push_str(&notify);
                    }
                    // The address as the session stored it: the text after
                    // `rfc822;` (which an address may itself start with).
                    if let Some(addr) = rcpt.orcpt.as_deref().filter(|a| !a.is_empty()) {
                        line.push_str(" ORCPT=");
                        match orcpt_as_received(rcpt.orcpt_xtext.as_deref(), addr) {
                            Some(raw) => line.push_str(raw),
                            None => {
                                line.push_str("rfc822;");
                                line.push_str(&xtext::encode(addr));
                            }
                        }
                    }
                }
                line.push_str("\r\n");
                rcpts.push((i, line));
            }
        }
    }
    Plan {
        settled,
        mail_from: mail_from(envelope, sender.unwrap_or_default(), body_len, caps),
        rcpts,
    }
}

/// A reason the next hop must not get this message at all (RFC 1870, RFC 6531
/// §3.2, RFC 6152 §3), checked in that order.
fn refusal(
    envelope: &Envelope,
    body_len: u64,
    eight_bit: &EightBit,
    caps: &Capabilities,
) -> Option<Outcome> {
    if let Some(limit) = caps.size.filter(|&limit| limit > 0 && body_len > limit) {
        return Some(failed(
            Status::permanent(3, 4),
            format!("message of {body_len} bytes exceeds the next hop's limit of {limit} bytes"),
        ));
    }
    if envelope.smtputf8 && !caps.smtputf8 {
        return Some(failed(
            Status::permanent(6, 7),
            "message needs SMTPUTF8, which the next hop does not offer".into(),
        ));
    }
    if needs_8bitmime(envelope) && !caps.eightbitmime {
        let why = match eight_bit {
            EightBit::Converted => return None,
            EightBit::AsStored => String::new(),
            EightBit::Unconvertible(why) => format!(", and it cannot be converted to 7-bit: {why}"),
        };
        return Some(failed(
            Status::permanent(6, 3),
            format!("message has 8-bit content and the next hop does not offer 8BITMIME{why}"),
        ));
    }
    None
}

/// Declared 8-bit MIME that is 8-bit indeed: a next hop without 8BITMIME
/// gets it only converted (RFC 6152 §3). Undeclared 8-bit is relayed as
/// received, as Postfix does.
pub(crate) fn needs_8bitmime(envelope: &Envelope) -> bool {
    envelope.has_8bit && envelope.body_type == BodyType::EightBitMime
}

fn mail_from(envelope: &Envelope, sender: String, body_len: u64, caps: &Capabilities) -> String {
    let mut line = format!("MAIL FROM:<{sender}>");
    if caps.size.is_some() {
        line.push_str(&format!(" SIZE={body_len}"));
    }
    if caps.eightbitmime {
        // As the client declared it: nothing is added to what it did not.
        match envelope.body_type {
            BodyType::EightBitMime => line.push_str(" BODY=8BITMIME"),
            BodyType::SevenBit => line.push_str(" BODY=7BIT"),
            BodyType::Unset => {}
        }
    }
    if envelope.smtputf8 {
        line.push_str(" SMTPUTF8");
    }
    if caps.dsn {
        match envelope.ret {
            Ret::Full => line.push_str(" RET=FULL"),
            Ret::Headers => line.push_str(" RET=HDRS"),
            Ret::Unset => {}
        }
        if let Some(envid) = envelope.envid.as_deref().filter(|e| !e.is_empty()) {
            line.push_str(" ENVID=");
            match xtext::as_received(envelope.envid_xtext.as_deref(), envid) {
                Some(raw) => line.push_str(raw),
                None => line.push_str(&xtext::encode(envid)),
            }
        }
    }
    line.push_str("\r\n");
    line
}

/// The `NOTIFY=` value (RFC 3461 §4.1), or `None` when the sender gave none.
fn notify(notify: Notify) -> Option<String> {
    if notify.0 == 0 {
        return None;
    }
    if notify.has(Notify::NEVER) {
        return Some("NEVER".into());
    }
    let words: Vec<&str> = [
        (Notify::SUCCESS, "SUCCESS"),
        (Notify::FAILURE, "FAILURE"),
        (Notify::DELAY, "DELAY"),
    ]
    .into_iter()
    .filter(|&(flag, _)| notify.has(flag))
    .map(|(_, word)| word)
    .collect();
    (!words.is_empty()).then(|| words.join(","))
}

/// The `ORCPT=` value as received (`rfc822;` in any case, then xtext), if
/// it may go out as it is (see [`xtext::as_received`]).
fn orcpt_as_received<'a>(raw: Option<&'a str>, addr: &str) -> Option<&'a str> {
    let raw = raw?;
    let (kind, text) = raw.split_once(';')?;
    (kind.eq_ignore_ascii_case("rfc822") && xtext::as_received(Some(text), addr).is_some())
        .then_some(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::testing;

    fn envelope(rcpts: &[&str]) -> Envelope {
        let mut env = testing::envelope("sender@example.org", rcpts);
        env.ret = Ret::Headers;
        env.envid = Some("env 1".into());
        for r in &mut env.recipients {
            r.orcpt = Some(r.address.clone());
            r.notify = Notify(Notify::FAILURE | Notify::DELAY);
        }
        env
    }

    fn all() -> Capabilities {
        Capabilities {
            eightbitmime: true,
            smtputf8: true,
            dsn: true,
            pipelining: true,
            chunking: false,
            size: Some(1000),
            starttls: false,
            tls: false,
        }
    }

    fn want(list: &[(usize, &str)]) -> Vec<(usize, String)> {
        list.iter().map(|&(i, s)| (i, s.to_owned())).collect()
    }

    fn statuses(plan: &Plan) -> Vec<(usize, String)> {
        plan.settled
            .iter()
            .map(|(i, o)| match o {
                Outcome::Failed {
                    status,
                    reason: Failure::Policy,
                    ..
                } => (*i, status.to_string()),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn passes_dsn_size_and_body_parameters_when_offered() {
        let mut env = envelope(&["a@example.com", "b+x=y@example.com"]);
        env.body_type = BodyType::EightBitMime;
        env.has_8bit = true;
        env.recipients[1].notify = Notify(Notify::SUCCESS | Notify::FAILURE);
        env.recipients[1].orcpt = Some("b+x=y@example.com".into());
        let plan = plan(&env, 500, &all(), &[0, 1]);
        assert!(plan.settled.is_empty());
        assert_eq!(
            plan.mail_from,
            "MAIL FROM:<sender@example.org> SIZE=500 BODY=8BITMIME RET=HDRS ENVID=env+201\r\n"
        );
        assert_eq!(
            plan.rcpts,
            [
                (
                    0,
                    "RCPT TO:<a@example.com> NOTIFY=FAILURE,DELAY ORCPT=rfc822;a@example.com\r\n"
                        .to_string()
                ),
                (
                    1,
                    "RCPT TO:<b+x=y@example.com> NOTIFY=SUCCESS,FAILURE \
                     ORCPT=rfc822;b+2Bx+3Dy@example.com\r\n"
                        .to_string()
                ),
            ]
        );
    }

    #[test]
    fn envid_and_orcpt_go_out_exactly_as_received() {
        let mut env = envelope(&["a+b@example.com", "c@example.com"]);
        env.envid = Some("Q+Z=x/y.42".into());
        env.envid_xtext = Some("Q+2BZ+3Dx+2Fy.42".into());
        env.recipients[0].orcpt = Some("a+b@example.com".into());
        env.recipients[0].orcpt_xtext = Some("RFC822;a+2bb@example.com".into());
        // Not what the stored value decodes from: encoded afresh.
        env.recipients[1].orcpt = Some("c@example.com".into());
        env.recipients[1].orcpt_xtext = Some("rfc822;other@example.com".into());
        let plan = plan(&env, 1, &all(), &[0, 1]);
        assert_eq!(
            plan.mail_from,
            "MAIL FROM:<sender@example.org> SIZE=1 RET=HDRS ENVID=Q+2BZ+3Dx+2Fy.42\r\n"
        );
        assert_eq!(
            plan.rcpts,
            want(&[
                (
                    0,
                    "RCPT TO:<a+b@example.com> NOTIFY=FAILURE,DELAY ORCPT=RFC822;a+2bb@example.com\r\n"
                ),
                (
                    1,
                    "RCPT TO:<c@example.com> NOTIFY=FAILURE,DELAY ORCPT=rfc822;c@example.com\r\n"
                ),
            ])
        );
        // A value as received that could split the line is never sent.
        let mut env = envelope(&["a@example.com"]);
        env.envid = Some("x\r\nRSET".into());
        env.envid_xtext = Some("x\r\nRSET".into());
        let plan = super::plan(&env, 1, &all(), &[0]);
        assert!(
            plan.mail_from.ends_with(" ENVID=x+0D+0ARSET\r\n"),
            "{}",
            plan.mail_from
        );
    }

    #[test]
    fn leaves_out_what_the_next_hop_does_not_offer() {
        let mut env = envelope(&["a@example.com"]);
        env.body_type = BodyType::SevenBit;
        env.ret = Ret::Full;
        let bare = Capabilities::default();
        let plan = plan(&env, 500, &bare, &[0]);
        assert_eq!(plan.mail_from, "MAIL FROM:<sender@example.org>\r\n");
        assert_eq!(plan.rcpts, [(0, "RCPT TO:<a@example.com>\r\n".to_string())]);

        let caps = Capabilities {
            dsn: false,
            ..all()
        };
        let plan = super::plan(&env, 500, &caps, &[0]);
        assert_eq!(
            plan.mail_from,
            "MAIL FROM:<sender@example.org> SIZE=500 BODY=7BIT\r\n"
        );
        assert_eq!(plan.rcpts, [(0, "RCPT TO:<a@example.com>\r\n".to_string())]);
    }

    #[test]
    fn body_is_passed_on_as_declared_never_added() {
        let mut env = envelope(&["a@example.com"]);
        env.has_8bit = true;
        env.body_type = BodyType::Unset;
        let undeclared = plan(&env, 1, &all(), &[0]);
        assert!(
            !undeclared.mail_from.contains("BODY="),
            "{}",
            undeclared.mail_from
        );
        assert!(undeclared.settled.is_empty());
        // Undeclared 8-bit goes even to a next hop without 8BITMIME.
        let no_8bit = Capabilities {
            eightbitmime: false,
            ..all()
        };
        let plain = plan(&env, 1, &no_8bit, &[0]);
        assert!(plain.settled.is_empty());
        assert!(!plain.mail_from.contains("BODY="), "{}", plain.mail_from);
        env.body_type = BodyType::SevenBit;
        assert!(plan(&env, 1, &all(), &[0]).mail_from.contains(" BODY=7BIT"));
    }

    #[test]
    fn null_sender_utf8_and_notify_never() {
        let mut env = envelope(&["j\u{f6}rg@example.com"]);
        env.sender = String::new();
        env.smtputf8 = true;
        env.envid = None;
        env.ret = Ret::Unset;
        env.recipients[0].notify = Notify(Notify::NEVER);
        env.recipients[0].orcpt = None;
        let plan = plan(&env, 1, &all(), &[0]);
        assert_eq!(plan.mail_from, "MAIL FROM:<> SIZE=1 SMTPUTF8\r\n");
        assert_eq!(
            plan.rcpts,
            [(
                0,
                "RCPT TO:<j\u{f6}rg@example.com> NOTIFY=NEVER\r\n".to_string()
            )]
        );
    }

    #[test]
    fn refuses_before_sending_in_a_fixed_order() {
        let mut env = envelope(&["a@example.com", "b@example.com"]);
        // SIZE: larger than the limit fails; equal passes; 0 means no limit.
        let p = plan(&env, 1001, &all(), &[0, 1]);
        assert_eq!(statuses(&p), want(&[(0, "5.3.4"), (1, "5.3.4")]));
        assert!(p.rcpts.is_empty());
        assert!(plan(&env, 1000, &all(), &[0]).settled.is_empty());
        let unlimited = Capabilities {
            size: Some(0),
            ..all()
        };
        assert!(plan(&env, 1 << 40, &unlimited, &[0]).settled.is_empty());

        env.smtputf8 = true;
        env.has_8bit = true;
        let neither = Capabilities {
            smtputf8: false,
            eightbitmime: false,
            ..all()
        };
        assert_eq!(
            statuses(&plan(&env, 1001, &neither, &[1])),
            want(&[(1, "5.3.4")])
        );
        assert_eq!(
            statuses(&plan(&env, 10, &neither, &[1])),
            want(&[(1, "5.6.7")])
        );
        env.smtputf8 = false;
        // Declared 8BITMIME and 8-bit indeed: not sent raw.
        env.body_type = BodyType::EightBitMime;
        assert_eq!(
            statuses(&plan(&env, 10, &neither, &[0])),
            want(&[(0, "5.6.3")])
        );
        // Converted to 7-bit it goes, without BODY=; what could not be
        // converted fails with the reason.
        let converted = plan_with(&env, 10, &EightBit::Converted, &neither, &[0]);
        assert!(converted.settled.is_empty());
        assert_eq!(
            converted.mail_from,
            "MAIL FROM:<sender@example.org> SIZE=10 RET=HDRS ENVID=env+201\r\n"
        );
        let why = EightBit::Unconvertible("a header holds 8-bit octets".into());
        let refused = plan_with(&env, 10, &why, &neither, &[0]);
        assert_eq!(statuses(&refused), want(&[(0, "5.6.3")]));
        assert!(
            refused.settled[0]
                .1
                .reply()
                .ends_with("a header holds 8-bit octets"),
            "{:?}",
            refused.settled
        );
        env.has_8bit = false;
        assert!(plan(&env, 10, &neither, &[0]).settled.is_empty());
        // Undeclared 8-bit is relayed as received.
        env.has_8bit = true;
        env.body_type = BodyType::Unset;
        assert!(plan(&env, 10, &neither, &[0]).settled.is_empty());
    }

    #[test]
    fn unwritable_addresses_are_settled_not_sent() {
        let mut env = envelope(&["ok@example.com", "bad\r\nRSET@example.com", ""]);
        let p = plan(&env, 1, &all(), &[0, 1, 2, 7]);
        assert_eq!(statuses(&p), want(&[(1, "5.1.3"), (2, "5.1.3")]));
        assert_eq!(p.rcpts.len(), 1);

        env.sender = "evil>\r\nRCPT TO:<x@y".into();
        let p = plan(&env, 1, &all(), &[0]);
        assert_eq!(statuses(&p), want(&[(0, "5.1.7")]));
        assert!(p.rcpts.is_empty());
    }
}
