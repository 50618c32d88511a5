//! Turning owed notices into DSN messages queued like any other mail, and
//! deciding when a failure cannot be reported to anyone (then the message
//! becomes a dead letter). Pure: the caller supplies IDs and the time.

use std::net::{IpAddr, Ipv4Addr};

use super::outcome::{Notice, NoticeKind};
use crate::config::BouncePolicy;
use crate::dsn::{self, Action, RecipientReport, Report};
use crate::spool::{
    BodyType, Client, Envelope, NewMessage, Notify, QueueId, RcptStatus, Recipient, Ret,
};

/// RET=FULL returns the whole message only up to this size (Postfix's
/// `bounce_size_limit` is 50 000); beyond it, headers only.
pub const MAX_RETURNED_BYTES: usize = 100_000;

/// Who may hear about a message, and how.
pub struct Policy<'a> {
    pub bounce: BouncePolicy,
    pub postmaster: &'a str,
    pub hostname: &'a str,
    /// `max_queue_lifetime`: delayed notices say until when we keep trying.
    pub lifetime_ms: u64,
}

/// Some recipient failed and nobody can be told: the sender is `<>` (a
/// bounce from elsewhere, or one of our own notices, to the sender or to the
/// postmaster, which the far side refused), and notices about notices are
/// never sent. Such a message is kept as a dead letter instead of vanishing,
/// whatever NOTIFY= said (our own notices carry NEVER to stop loops). With
/// `bounce = "drop"` the operator chose silence, so nothing is kept.
///
/// The rule this serves: a message leaves the spool only delivered, reported
/// to someone (its sender or the postmaster), dropped by `bounce = "drop"`
/// (or by the sender's own NOTIFY=NEVER), deleted by an operator, or kept
/// here as a dead letter.
pub fn unreportable(env: &Envelope, bounce: BouncePolicy) -> bool {
    bounce != BouncePolicy::Drop
        && env.sender.is_empty()
        && env.notices_to.is_none()
        && env
            .recipients
            .iter()
            .any(|r| r.status == RcptStatus::Failed)
}

/// Who is told about `env`: nobody with `bounce = "drop"`; the address the
/// message names for its notices (fetched mail: its fetch block's
/// postmaster); never the null sender (notices about notices loop); else
/// the sender or the postmaster, as `delivery.bounce` says.
fn notice_target(env: &Envelope, policy: &Policy<'_>) -> Option<String> {
    match (policy.bounce, &env.notices_to) {
        (BouncePolicy::Drop, _) => None,
        (_, Some(to)) => Some(to.clone()),
        _ if env.sender.is_empty() => None,
        (BouncePolicy::Sender, None) => Some(env.sender.clone()),
        (BouncePolicy::Postmaster, None) => Some(policy.postmaster.to_owned()),
    }
}

/// Builds one DSN per kind of notice (failed, delayed, relayed) that NOTIFY=
/// asks for. `env` must already carry the new recipient states; `next_id`
/// hands out queue IDs for the notices.
pub fn plan(
    env: &Envelope,
    original: &[u8],
    notices: &[Notice],
    policy: &Policy<'_>,
    now_ms: u64,
    next_id: &mut dyn FnMut() -> QueueId,
) -> Vec<(NoticeKind, NewMessage)> {
    let mut planned = Vec::new();
    for (kind, action) in [
        (NoticeKind::Failed, Action::Failed),
        (NoticeKind::Delayed, Action::Delayed),
        (NoticeKind::Relayed, Action::Relayed),
    ] {
        let owed: Vec<&Notice> = notices
            .iter()
            .filter(|n| n.kind == kind)
            .filter(|n| {
                env.recipients
                    .get(n.index)
                    .is_some_and(|r| dsn::wants(r.notify, action))
            })
            .collect();
        if owed.is_empty() {
            continue;
        }
        let Some(to) = notice_target(env, policy) else {
            continue;
        };
        let id = next_id();
        let message_id = format!("<{id}.dsn@{}>", policy.hostname);
        // The DSN is text: the status as it is written in it.
        let statuses: Vec<String> = owed.iter().map(|n| n.status.to_string()).collect();
        let recipients = owed
            .iter()
            .zip(&statuses)
            .filter_map(|(n, status)| {
                let recipient = env.recipients.get(n.index)?;
                Some(RecipientReport {
                    recipient,
                    action,
                    status,
                    remote_mta: n.remote.as_deref(),
                    diagnostic: n.diagnostic.as_deref(),
                    last_attempt_ms: Some(now_ms),
                    will_retry_until_ms: (action == Action::Delayed)
                        .then(|| env.arrived_ms.saturating_add(policy.lifetime_ms)),
                })
            })
            .collect();
        let body = dsn::build(&Report {
            reporting_mta: policy.hostname,
            envelope: env,
            original,
            recipients,
            now_ms,
            message_id: &message_id,
            max_full_bytes: MAX_RETURNED_BYTES,
        });
        planned.push((
            kind,
            notice_message(id, to, body, env.smtputf8, now_ms, policy.hostname),
        ));
    }
    planned
}

/// A notice as a queued message: from `<>`, to one recipient, due now.
fn notice_message(
    id: QueueId,
    to: String,
    body: Vec<u8>,
    smtputf8: bool,
    now_ms: u64,
    hostname: &str,
) -> NewMessage {
    let has_8bit = body.iter().any(|&b| b >= 0x80);
    NewMessage {
        envelope: Envelope {
            id,
            sender: String::new(),
            ret: Ret::Unset,
            envid: None,
            envid_xtext: None,
            body_type: if has_8bit {
                BodyType::EightBitMime
            } else {
                BodyType::SevenBit
            },
            smtputf8: smtputf8 && !to.is_ascii(),
            has_8bit,
            arrived_ms: now_ms,
            size: body.len() as u64,
            client: Client {
                ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                helo: hostname.to_owned(),
                tls: false,
            },
            recipients: vec![Recipient {
                // A notice about a notice is never wanted.
                notify: Notify(Notify::NEVER),
                ..Recipient::queued(to, now_ms)
            }],
            notices_to: None,
        },
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::testing;
    use crate::status::Status;

    fn envelope(sender: &str, notify: u8) -> Envelope {
        let mut env = testing::envelope(sender, &["r0@example.com", "r1@example.com"]);
        env.id = QueueId(7);
        env.size = 20;
        for r in &mut env.recipients {
            r.notify = Notify(notify);
            r.status = RcptStatus::Failed;
            r.attempts = 1;
            r.last_reply = Some("550 5.1.1 unknown".into());
        }
        env
    }

    fn failed(index: usize) -> Notice {
        Notice {
            index,
            kind: NoticeKind::Failed,
            status: Status::NO_SUCH_MAILBOX,
            remote: Some("mx1.example.com".into()),
            diagnostic: Some("550 5.1.1 unknown".into()),
        }
    }

    fn run(env: &Envelope, notices: &[Notice], bounce: BouncePolicy) -> Vec<NewMessage> {
        let mut n = 100;
        let planned: Vec<(NoticeKind, NewMessage)> = plan(
            env,
            b"Subject: x\r\n\r\nbody\r\n",
            notices,
            &Policy {
                bounce,
                postmaster: "pm@example.net",
                hostname: "mx2.example.net",
                lifetime_ms: 86_400_000,
            },
            5_000,
            &mut || {
                n += 1;
                QueueId(n)
            },
        );
        planned.into_iter().map(|(_, m)| m).collect()
    }

    #[test]
    fn one_failure_notice_to_the_sender_for_all_failed_recipients() {
        let env = envelope("s@example.org", 0);
        let p = run(&env, &[failed(0), failed(1)], BouncePolicy::Sender);
        assert!(!unreportable(&env, BouncePolicy::Sender));
        assert_eq!(p.len(), 1);
        let m = &p[0];
        assert_eq!(m.envelope.sender, "");
        assert_eq!(m.envelope.recipients[0].address, "s@example.org");
        assert_eq!(m.envelope.recipients[0].notify, Notify(Notify::NEVER));
        assert_eq!(m.envelope.id, QueueId(101));
        assert_eq!(m.envelope.size, m.body.len() as u64);
        let text = String::from_utf8_lossy(&m.body);
        assert!(text.contains("r0@example.com") && text.contains("r1@example.com"));
        assert!(
            text.contains("<0000000000035.dsn@mx2.example.net>"),
            "{text}"
        );
    }

    #[test]
    fn bounce_policies() {
        let env = envelope("s@example.org", 0);
        let p = run(&env, &[failed(0)], BouncePolicy::Postmaster);
        assert_eq!(p[0].envelope.recipients[0].address, "pm@example.net");
        let p = run(&env, &[failed(0)], BouncePolicy::Drop);
        assert!(p.is_empty());
    }

    #[test]
    fn fetched_mail_is_reported_where_it_says() {
        let mut env = envelope("forged@example.org", 0);
        env.notices_to = Some("pm@example.com".into());
        let p = run(&env, &[failed(0)], BouncePolicy::Sender);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].envelope.recipients[0].address, "pm@example.com");
        assert_eq!(p[0].envelope.sender, "");
        // Even from <>: the postmaster hears of it, nothing becomes a dead letter.
        env.sender = String::new();
        let p = run(&env, &[failed(0)], BouncePolicy::Postmaster);
        assert_eq!(p[0].envelope.recipients[0].address, "pm@example.com");
        assert!(!unreportable(&env, BouncePolicy::Sender));
        // The operator's `bounce = "drop"` still means silence.
        assert!(run(&env, &[failed(0)], BouncePolicy::Drop).is_empty());
    }

    #[test]
    fn never_to_the_null_sender() {
        let env = envelope("", 0);
        assert!(run(&env, &[failed(0)], BouncePolicy::Sender).is_empty());
        assert!(unreportable(&env, BouncePolicy::Sender));
        assert!(unreportable(&env, BouncePolicy::Postmaster));
        assert!(!unreportable(&env, BouncePolicy::Drop));
    }

    #[test]
    fn notify_never_means_no_notice_but_a_failed_notice_is_still_kept() {
        // Our own notices carry NOTIFY=NEVER: when one fails, nobody can be
        // told, and it must not vanish.
        let env = envelope("", Notify::NEVER);
        assert!(run(&env, &[failed(0)], BouncePolicy::Sender).is_empty());
        assert!(unreportable(&env, BouncePolicy::Sender));
        assert!(unreportable(&env, BouncePolicy::Postmaster));
        assert!(!unreportable(&env, BouncePolicy::Drop));
        // A sender who said NEVER chose to hear nothing: no notice, no dead letter.
        let env = envelope("s@example.org", Notify::NEVER);
        assert!(run(&env, &[failed(0)], BouncePolicy::Sender).is_empty());
        assert!(!unreportable(&env, BouncePolicy::Sender));
    }

    #[test]
    fn delays_and_relays_only_when_asked() {
        let env = envelope("s@example.org", Notify::FAILURE);
        let delayed = Notice {
            kind: NoticeKind::Delayed,
            status: Status::transient(4, 1),
            ..failed(0)
        };
        assert!(run(&env, std::slice::from_ref(&delayed), BouncePolicy::Sender).is_empty());
        let env = envelope("s@example.org", 0);
        let p = run(&env, &[delayed], BouncePolicy::Sender);
        assert_eq!(p.len(), 1);
        assert!(String::from_utf8_lossy(&p[0].body).contains("Will-Retry-Until:"));
        let relayed = Notice {
            kind: NoticeKind::Relayed,
            status: Status::success(0, 0),
            ..failed(1)
        };
        assert!(run(&env, std::slice::from_ref(&relayed), BouncePolicy::Sender).is_empty());
        let env = envelope("s@example.org", Notify::SUCCESS);
        assert_eq!(run(&env, &[relayed], BouncePolicy::Sender).len(), 1);
    }
}
