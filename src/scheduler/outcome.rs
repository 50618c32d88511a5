//! What an attempt means for each recipient: the pure bookkeeping between "the
//! next hop answered" and "the spool records it". Decides the new state, the next
//! attempt (backoff), expiry, and which notices (DSNs) are owed. Takes `now` and
//! the random sample as arguments; touches neither the clock nor the spool.
//! Whether a domain is paused is the drain guard's business (`guard.rs`): it
//! turns results into [`RcptResult::Paused`] before they get here.

use std::time::Duration;

use super::backoff::{Backoff, expired};
use crate::spool::{Envelope, Notify, PARKED, RcptStatus, Recipient};
use crate::status::{Failure, Status};

/// 4.4.7: the message stayed in the queue past its lifetime (RFC 3463).
const EXPIRED: Status = Status::transient(4, 7);

/// The result of one attempt for one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RcptResult {
    /// The next hop took responsibility (2xx after the final dot).
    Delivered {
        reply: String,
        /// The next hop lacks DSN and the sender asked for success notices:
        /// we owe a "relayed" notice (RFC 3461 §5.2.3).
        relayed: bool,
        remote: String,
    },
    /// Permanently refused (5xx, or a permanent routing failure).
    Failed {
        status: Status,
        reply: String,
        remote: Option<String>,
        /// Why, as counted; decided by whoever refused.
        reason: Failure,
    },
    /// Try again later (4xx, timeout, connection failure, DNS trouble).
    Deferred {
        status: Status,
        reply: String,
        remote: Option<String>,
        /// The primary could not be reached at all: release this recipient as
        /// soon as it answers again.
        unreachable: bool,
    },
    /// The recipient's domain is paused: whatever the answer, the recipient
    /// stays queued, out of the due order until a resume, and does not expire
    /// meanwhile.
    Paused {
        /// The answer, kept as the last reply.
        reply: String,
        /// The answer was a permanent refusal from the primary, held back
        /// instead of bounced: mark the recipient suspect.
        suspect: bool,
    },
}

/// `delivery.*` settings that decide what happens after an attempt.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    pub backoff: Backoff,
    pub lifetime: Duration,
    pub delay_warning: Option<Duration>,
}

/// A notice owed to the sender about one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub index: usize,
    pub kind: NoticeKind,
    pub status: Status,
    pub remote: Option<String>,
    pub diagnostic: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoticeKind {
    Failed,
    Delayed,
    Relayed,
}

/// New recipient states and the notices they call for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub recipients: Vec<(usize, Recipient)>,
    pub notices: Vec<Notice>,
    /// The recipients given up on by this attempt, and why (for the metrics).
    pub failures: Vec<(usize, Failure)>,
}

/// When an attempt happened, and what decides the next one.
struct At<'a> {
    arrived_ms: u64,
    now_ms: u64,
    rules: &'a Rules,
    sample: f64,
}

/// Applies `results` (recipient index, result) to a copy of the recipients of
/// `env` as of `now_ms`. `sample` is uniform in [0, 1) and staggers retries.
pub fn apply(
    env: &Envelope,
    results: &[(usize, RcptResult)],
    now_ms: u64,
    rules: &Rules,
    sample: f64,
) -> Applied {
    let at = At {
        arrived_ms: env.arrived_ms,
        now_ms,
        rules,
        sample,
    };
    let mut applied = Applied::default();
    for (index, result) in results {
        let Some(current) = env.recipients.get(*index) else {
            continue;
        };
        if current.status != RcptStatus::Queued {
            continue;
        }
        let mut r = current.clone();
        r.attempts = r.attempts.saturating_add(1);
        let (notice, failure) = settle(&mut r, result, &at);
        if let Some((kind, status, remote, diagnostic)) = notice {
            applied.notices.push(Notice {
                index: *index,
                kind,
                status,
                remote,
                diagnostic: Some(diagnostic),
            });
        }
        if let Some(failure) = failure {
            applied.failures.push((*index, failure));
        }
        applied.recipients.push((*index, r));
    }
    applied
}

/// A notice's kind, status, remote host and diagnostic.
type Owed = (NoticeKind, Status, Option<String>, String);

/// What one result does to recipient `r`: the notice it calls for, and why
/// the recipient was given up on, if it was.
fn settle(r: &mut Recipient, result: &RcptResult, at: &At) -> (Option<Owed>, Option<Failure>) {
    match result {
        RcptResult::Delivered {
            reply,
            relayed,
            remote,
        } => {
            r.status = RcptStatus::Delivered;
            r.last_reply = Some(reply.clone());
            r.unreachable = false;
            r.suspect = false;
            let owed = (*relayed && r.notify.has(Notify::SUCCESS)).then(|| {
                let status = Status::success(0, 0);
                (
                    NoticeKind::Relayed,
                    status,
                    Some(remote.clone()),
                    reply.clone(),
                )
            });
            (owed, None)
        }
        RcptResult::Failed {
            status,
            reply,
            remote,
            reason,
        } => {
            r.status = RcptStatus::Failed;
            r.last_reply = Some(reply.clone());
            r.unreachable = false;
            r.suspect = false;
            let owed = (NoticeKind::Failed, *status, remote.clone(), reply.clone());
            (Some(owed), Some(*reason))
        }
        RcptResult::Deferred {
            status,
            reply,
            remote,
            unreachable,
        } => {
            r.last_reply = Some(reply.clone());
            r.suspect = false;
            if expired(at.arrived_ms, at.now_ms, at.rules.lifetime) {
                r.status = RcptStatus::Failed;
                r.unreachable = false;
                let why = format!("message expired in the queue; last reply: {reply}");
                r.last_reply = Some(why.clone());
                let owed = (NoticeKind::Failed, EXPIRED, remote.clone(), why);
                return (Some(owed), Some(Failure::Expired));
            }
            let delay = at.rules.backoff.delay(r.attempts, at.sample);
            r.next_attempt_ms = at.now_ms.saturating_add(delay.as_millis() as u64);
            r.unreachable = *unreachable;
            let warn = at.rules.delay_warning.is_some_and(|after| {
                at.now_ms.saturating_sub(at.arrived_ms) >= after.as_millis() as u64
            });
            if !warn || r.delay_notified {
                return (None, None);
            }
            r.delay_notified = true;
            let owed = (NoticeKind::Delayed, *status, remote.clone(), reply.clone());
            (Some(owed), None)
        }
        RcptResult::Paused { reply, suspect } => {
            r.last_reply = Some(reply.clone());
            r.next_attempt_ms = PARKED;
            r.unreachable = false;
            r.suspect = *suspect;
            (None, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::testing;

    const MIN: u64 = 60_000;

    fn envelope(n: usize) -> Envelope {
        let names: Vec<String> = (0..n).map(|i| format!("r{i}@example.com")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut env = testing::envelope("s@example.org", &names);
        env.size = 10;
        env
    }

    fn rules() -> Rules {
        Rules {
            backoff: Backoff {
                initial: Duration::from_secs(300),
                factor: 2.0,
                max: Duration::from_secs(3600),
                jitter: 0.0,
            },
            lifetime: Duration::from_secs(5 * 86_400),
            delay_warning: Some(Duration::from_secs(4 * 3600)),
        }
    }

    fn deferred(unreachable: bool) -> RcptResult {
        RcptResult::Deferred {
            status: Status::transient(4, 1),
            reply: "connection refused".into(),
            remote: None,
            unreachable,
        }
    }

    #[test]
    fn each_kind_of_result() {
        let env = envelope(3);
        let results = [
            (
                0,
                RcptResult::Delivered {
                    reply: "250 ok".into(),
                    relayed: false,
                    remote: "mx1".into(),
                },
            ),
            (
                1,
                RcptResult::Failed {
                    status: Status::NO_SUCH_MAILBOX,
                    reply: "550 5.1.1 unknown".into(),
                    remote: Some("mx1".into()),
                    reason: Failure::Rejected,
                },
            ),
            (2, deferred(true)),
        ];
        let a = apply(&env, &results, 10 * MIN, &rules(), 0.5);
        let states: Vec<RcptStatus> = a.recipients.iter().map(|(_, r)| r.status).collect();
        assert_eq!(
            states,
            [
                RcptStatus::Delivered,
                RcptStatus::Failed,
                RcptStatus::Queued
            ]
        );
        let third = &a.recipients[2].1;
        assert_eq!(third.attempts, 1);
        assert_eq!(third.next_attempt_ms, 15 * MIN);
        assert!(third.unreachable);
        assert_eq!(a.notices.len(), 1);
        assert_eq!(a.notices[0].kind, NoticeKind::Failed);
        assert_eq!(a.notices[0].index, 1);
        assert_eq!(a.notices[0].status, Status::NO_SUCH_MAILBOX);
        assert_eq!(a.failures, [(1, Failure::Rejected)]);
    }

    #[test]
    fn backoff_grows_with_attempts() {
        let mut env = envelope(1);
        env.recipients[0].attempts = 3;
        let a = apply(&env, &[(0, deferred(false))], 0, &rules(), 0.0);
        assert_eq!(a.recipients[0].1.next_attempt_ms, 40 * MIN);
        assert!(!a.recipients[0].1.unreachable);
    }

    #[test]
    fn expiry_fails_with_4_4_7() {
        let env = envelope(1);
        let a = apply(&env, &[(0, deferred(true))], 5 * 1440 * MIN, &rules(), 0.0);
        assert_eq!(a.recipients[0].1.status, RcptStatus::Failed);
        assert_eq!(a.notices[0].status.to_string(), "4.4.7");
        assert_eq!(a.failures, [(0, Failure::Expired)]);
        assert_eq!(a.notices[0].kind, NoticeKind::Failed);
    }

    #[test]
    fn one_delay_warning_only() {
        let env = envelope(1);
        let early = apply(&env, &[(0, deferred(false))], 60 * MIN, &rules(), 0.0);
        assert!(early.notices.is_empty());
        let late = apply(&env, &[(0, deferred(false))], 241 * MIN, &rules(), 0.0);
        assert_eq!(late.notices[0].kind, NoticeKind::Delayed);
        assert!(late.recipients[0].1.delay_notified);

        let mut again = envelope(1);
        again.recipients[0] = late.recipients[0].1.clone();
        let later = apply(&again, &[(0, deferred(false))], 300 * MIN, &rules(), 0.0);
        assert!(later.notices.is_empty());

        let off = Rules {
            delay_warning: None,
            ..rules()
        };
        assert!(
            apply(&env, &[(0, deferred(false))], 600 * MIN, &off, 0.0)
                .notices
                .is_empty()
        );
    }

    #[test]
    fn relayed_notice_only_when_success_was_asked() {
        let mut env = envelope(2);
        env.recipients[0].notify = Notify(Notify::SUCCESS | Notify::FAILURE);
        let relayed = |relayed| RcptResult::Delivered {
            reply: "250 ok".into(),
            relayed,
            remote: "mx1".into(),
        };
        let a = apply(
            &env,
            &[(0, relayed(true)), (1, relayed(true))],
            0,
            &rules(),
            0.0,
        );
        assert_eq!(a.notices.len(), 1);
        assert_eq!(a.notices[0].kind, NoticeKind::Relayed);
        assert_eq!(a.notices[0].index, 0);
        let b = apply(&env, &[(0, relayed(false))], 0, &rules(), 0.0);
        assert!(b.notices.is_empty());
    }

    #[test]
    fn a_paused_result_parks_without_notice_or_expiry() {
        let mut env = envelope(2);
        env.recipients[1].unreachable = true;
        let long_after = 30 * 1440 * MIN;
        let paused = |suspect| RcptResult::Paused {
            reply: "550 5.1.1 no such user".into(),
            suspect,
        };
        let a = apply(
            &env,
            &[(0, paused(true)), (1, paused(false))],
            long_after,
            &rules(),
            0.0,
        );
        assert!(a.notices.is_empty(), "{a:?}");
        for (i, r) in &a.recipients {
            assert_eq!(
                r.status,
                RcptStatus::Queued,
                "past the lifetime, still queued"
            );
            assert_eq!(r.next_attempt_ms, PARKED);
            assert_eq!(r.attempts, 1);
            assert!(!r.unreachable);
            assert_eq!(r.suspect, *i == 0);
            assert_eq!(r.last_reply.as_deref(), Some("550 5.1.1 no such user"));
        }

        // The next real answer replaces the mark.
        let mut again = envelope(1);
        again.recipients[0] = a.recipients[0].1.clone();
        let b = apply(&again, &[(0, deferred(false))], 0, &rules(), 0.0);
        assert!(!b.recipients[0].1.suspect);
        assert_ne!(b.recipients[0].1.next_attempt_ms, PARKED);
    }

    #[test]
    fn finished_or_unknown_recipients_are_left_alone() {
        let mut env = envelope(1);
        env.recipients[0].status = RcptStatus::Delivered;
        let a = apply(
            &env,
            &[(0, deferred(false)), (7, deferred(false))],
            0,
            &rules(),
            0.0,
        );
        assert_eq!(a, Applied::default());
    }
}
