//! The drain guard and domain pauses: the bookkeeping that keeps a
//! half-working primary (back after maintenance without its user database,
//! refusing everyone with 550) from turning the backlog into bounces.
//!
//! Per configured relay domain it counts the permanent refusals the primary
//! gives in a row; a delivery in between starts the count over. When the
//! count reaches `delivery.drain_guard` the domain is paused: later refusals
//! are held (the recipient stays queued, marked suspect) instead of failed,
//! and nothing more is delivered until an operator resumes the domain.
//! Operators pause and resume domains by hand too, e.g. before maintenance.
//!
//! Pure: results in, results out, `now` as an argument. It touches neither
//! the clock, the spool nor the network; workers, the scheduler and the admin
//! API share one [`Guard`] behind a lock and do the writing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::outcome::RcptResult;
use crate::spool::{Pause, PausedBy};
use crate::status::Failure;

/// One guard for the whole server, shared by every worker (refusals to one
/// domain arrive on many connections at once) and by the admin API.
#[derive(Clone)]
pub struct Shared(Arc<Mutex<Guard>>);

impl Shared {
    pub fn new(guard: Guard) -> Shared {
        Shared(Arc::new(Mutex::new(guard)))
    }

    /// The guard; a worker that panicked holding it left nothing half-done
    /// (every method finishes its change before returning).
    pub fn lock(&self) -> MutexGuard<'_, Guard> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn paused(&self, domain: &str) -> Option<Pause> {
        self.lock().paused(domain)
    }
}

#[derive(Debug)]
pub struct Guard {
    /// `delivery.drain_guard`; 0: the guard never pauses on its own.
    limit: u32,
    /// Every configured relay domain, and only those: the names operators
    /// pause and metrics label by. Anything else (notices to senders' own
    /// servers) is never judged.
    domains: HashMap<String, Tally>,
}

#[derive(Debug, Default)]
struct Tally {
    /// Permanent refusals from the primary since the last delivery (or resume).
    refusals: u32,
    pause: Option<Pause>,
}

/// Why a pause or resume did not happen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PauseError {
    #[error("{0} is not a relay domain of this server")]
    Unknown(String),
    #[error("{0} is already paused")]
    AlreadyPaused(String),
    #[error("{0} is not paused")]
    NotPaused(String),
}

impl Guard {
    /// A guard over the configured `domains`, with the pauses the spool kept
    /// (those of domains no longer configured are left out).
    pub fn new(
        limit: u32,
        domains: impl IntoIterator<Item = String>,
        paused: impl IntoIterator<Item = (String, Pause)>,
    ) -> Guard {
        let mut domains: HashMap<String, Tally> =
            domains.into_iter().map(|d| (d, Tally::default())).collect();
        for (domain, pause) in paused {
            if let Some(tally) = domains.get_mut(&domain) {
                tally.pause = Some(pause);
            }
        }
        Guard { limit, domains }
    }

    /// Whether (and since when, by whom) delivery to `domain` is paused.
    pub fn paused(&self, domain: &str) -> Option<Pause> {
        self.domains.get(domain).and_then(|t| t.pause)
    }

    /// Judges one attempt's results for configured domain `domain`, in
    /// order. While the domain is paused every result but a delivery becomes
    /// [`RcptResult::Paused`], a refusal from the primary marked suspect.
    /// Otherwise refusals from the primary are counted and deliveries reset
    /// the count; the refusal that reaches the limit still fails (it is the
    /// last bounce) and pauses the domain for the rest. Returns the pause
    /// this attempt caused, if it caused one.
    pub fn judge(
        &mut self,
        domain: &str,
        results: &mut [(usize, RcptResult)],
        now_ms: u64,
    ) -> Option<Pause> {
        let limit = self.limit;
        let tally = self.domains.get_mut(domain)?;
        let mut tripped = None;
        for (_, result) in results.iter_mut() {
            if tally.pause.is_some() {
                hold(result);
                continue;
            }
            if matches!(result, RcptResult::Delivered { .. }) {
                tally.refusals = 0;
            } else if refused_by_primary(result) {
                tally.refusals = tally.refusals.saturating_add(1);
                if limit > 0 && tally.refusals >= limit {
                    let pause = Pause {
                        by: PausedBy::Guard,
                        since_ms: now_ms,
                    };
                    tally.pause = Some(pause);
                    tripped = Some(pause);
                }
            }
        }
        tripped
    }

    /// Like [`Guard::paused`], but an error for a domain that is not configured.
    pub fn paused_or_unknown(&self, domain: &str) -> Result<Option<Pause>, PauseError> {
        self.domains
            .get(domain)
            .map(|t| t.pause)
            .ok_or_else(|| PauseError::Unknown(domain.to_owned()))
    }

    /// An operator pauses `domain` (a configured domain's name).
    pub fn pause(&mut self, domain: &str, now_ms: u64) -> Result<Pause, PauseError> {
        let tally = self
            .domains
            .get_mut(domain)
            .ok_or_else(|| PauseError::Unknown(domain.to_owned()))?;
        if tally.pause.is_some() {
            return Err(PauseError::AlreadyPaused(domain.to_owned()));
        }
        let pause = Pause {
            by: PausedBy::Operator,
            since_ms: now_ms,
        };
        tally.pause = Some(pause);
        Ok(pause)
    }

    /// An operator resumes `domain`, however it was paused; the count of
    /// refusals starts over. Returns the pause that ended.
    pub fn resume(&mut self, domain: &str) -> Result<Pause, PauseError> {
        let tally = self
            .domains
            .get_mut(domain)
            .ok_or_else(|| PauseError::Unknown(domain.to_owned()))?;
        let pause = tally
            .pause
            .take()
            .ok_or_else(|| PauseError::NotPaused(domain.to_owned()))?;
        tally.refusals = 0;
        Ok(pause)
    }
}

/// A permanent refusal in the primary's own words (a 5xx reply), as opposed
/// to a failure we decided ourselves (no such domain, a size or 8-bit rule)
/// or an operator's return: only the primary's refusals say something about
/// the primary.
fn refused_by_primary(result: &RcptResult) -> bool {
    matches!(
        result,
        RcptResult::Failed {
            remote: Some(_),
            reason: Failure::Rejected,
            ..
        }
    )
}

/// What a result becomes while the domain is paused: nothing fails or
/// expires, and what was delivered stays delivered.
fn hold(result: &mut RcptResult) {
    let suspect = refused_by_primary(result);
    let reply = match result {
        RcptResult::Delivered { .. } | RcptResult::Paused { .. } => return,
        RcptResult::Failed { reply, .. } | RcptResult::Deferred { reply, .. } => {
            std::mem::take(reply)
        }
    };
    *result = RcptResult::Paused { reply, suspect };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Status;

    fn refused(n: usize) -> (usize, RcptResult) {
        (
            n,
            RcptResult::Failed {
                status: Status::NO_SUCH_MAILBOX,
                reply: "550 5.1.1 <u@example.com>: no such user".into(),
                remote: Some("primary.test".into()),
                reason: Failure::Rejected,
            },
        )
    }

    fn delivered(n: usize) -> (usize, RcptResult) {
        (
            n,
            RcptResult::Delivered {
                reply: "250 ok".into(),
                relayed: false,
                remote: "primary.test".into(),
            },
        )
    }

    fn deferred(n: usize) -> (usize, RcptResult) {
        (
            n,
            RcptResult::Deferred {
                status: Status::transient(2, 0),
                reply: "450 4.2.0 busy".into(),
                remote: Some("primary.test".into()),
                unreachable: false,
            },
        )
    }

    /// A failure we decided ourselves: no reply from the primary.
    fn nxdomain(n: usize) -> (usize, RcptResult) {
        (
            n,
            RcptResult::Failed {
                status: Status::permanent(1, 2),
                reply: "example.com: no such domain (NXDOMAIN)".into(),
                remote: None,
                reason: Failure::Routing,
            },
        )
    }

    fn guard(limit: u32) -> Guard {
        Guard::new(
            limit,
            ["example.com".to_string(), "example.org".to_string()],
            [],
        )
    }

    fn kinds(results: &[(usize, RcptResult)]) -> Vec<&'static str> {
        results
            .iter()
            .map(|(_, r)| match r {
                RcptResult::Delivered { .. } => "delivered",
                RcptResult::Failed { .. } => "failed",
                RcptResult::Deferred { .. } => "deferred",
                RcptResult::Paused { suspect: true, .. } => "suspect",
                RcptResult::Paused { suspect: false, .. } => "paused",
            })
            .collect()
    }

    #[test]
    fn the_limit_th_refusal_in_a_row_still_fails_and_pauses_for_the_rest() {
        let mut g = guard(3);
        let mut first = [refused(0), refused(1)];
        assert_eq!(g.judge("example.com", &mut first, 5), None);
        assert_eq!(kinds(&first), ["failed", "failed"]);
        // Temporary answers neither count nor reset.
        let mut second = [
            deferred(0),
            refused(1),
            refused(2),
            deferred(3),
            delivered(4),
        ];
        let tripped = g.judge("example.com", &mut second, 7);
        assert_eq!(
            tripped,
            Some(Pause {
                by: PausedBy::Guard,
                since_ms: 7
            })
        );
        // In flight when it tripped: the refusal is held, the 4xx parked,
        // the delivery stays one.
        assert_eq!(
            kinds(&second),
            ["deferred", "failed", "suspect", "paused", "delivered"]
        );
        assert_eq!(g.paused("example.com"), tripped);
        // Later attempts trip nothing more; the other domain is untouched.
        let mut third = [refused(0)];
        assert_eq!(g.judge("example.com", &mut third, 9), None);
        assert_eq!(kinds(&third), ["suspect"]);
        assert_eq!(g.paused("example.org"), None);
        let RcptResult::Paused { reply, .. } = &third[0].1 else {
            unreachable!()
        };
        assert!(reply.starts_with("550 5.1.1"), "the reply is kept: {reply}");
    }

    #[test]
    fn a_delivery_between_starts_the_count_over() {
        let mut g = guard(2);
        for _ in 0..10 {
            let mut r = [refused(0), delivered(1)];
            assert_eq!(g.judge("example.com", &mut r, 1), None);
            assert_eq!(kinds(&r), ["failed", "delivered"]);
        }
        let mut r = [refused(0), refused(1)];
        assert!(g.judge("example.com", &mut r, 2).is_some());
    }

    #[test]
    fn our_own_failures_and_other_destinations_do_not_count() {
        let mut g = guard(1);
        let mut ours = [nxdomain(0), nxdomain(1)];
        assert_eq!(g.judge("example.com", &mut ours, 1), None);
        assert_eq!(kinds(&ours), ["failed", "failed"]);
        // A notice refused by a sender's server: not a relay domain.
        let mut notice = [refused(0), refused(1)];
        assert_eq!(g.judge("other", &mut notice, 1), None);
        assert_eq!(kinds(&notice), ["failed", "failed"]);
        assert_eq!(g.paused("other"), None);
    }

    #[test]
    fn zero_turns_the_guard_off() {
        let mut g = guard(0);
        let mut many: Vec<_> = (0..1000).map(refused).collect();
        assert_eq!(g.judge("example.com", &mut many, 1), None);
        assert!(kinds(&many).iter().all(|k| *k == "failed"));
    }

    #[test]
    fn an_operator_pause_holds_everything_and_a_resume_starts_over() {
        let mut g = guard(2);
        let mut one = [refused(0)];
        g.judge("example.com", &mut one, 1);
        let pause = g.pause("example.com", 3).unwrap();
        assert_eq!(pause.by, PausedBy::Operator);
        assert_eq!(
            g.pause("example.com", 4),
            Err(PauseError::AlreadyPaused("example.com".into()))
        );
        let mut held = [refused(0), nxdomain(1), deferred(2)];
        assert_eq!(g.judge("example.com", &mut held, 5), None);
        assert_eq!(kinds(&held), ["suspect", "paused", "paused"]);

        assert_eq!(g.resume("example.com"), Ok(pause));
        assert_eq!(
            g.resume("example.com"),
            Err(PauseError::NotPaused("example.com".into()))
        );
        // The refusal before the pause no longer counts: one more is not enough.
        let mut again = [refused(0)];
        assert_eq!(g.judge("example.com", &mut again, 6), None);
        assert_eq!(kinds(&again), ["failed"]);
        assert!(g.judge("example.com", &mut [refused(0)], 7).is_some());
    }

    #[test]
    fn only_configured_domains_can_be_paused_and_stored_pauses_come_back() {
        let mut g = guard(2);
        assert_eq!(
            g.pause("elsewhere.test", 1),
            Err(PauseError::Unknown("elsewhere.test".into()))
        );
        assert_eq!(g.resume("other"), Err(PauseError::Unknown("other".into())));
        assert_eq!(
            g.paused_or_unknown("other"),
            Err(PauseError::Unknown("other".into()))
        );
        assert_eq!(g.paused_or_unknown("example.com"), Ok(None));
        let kept = Pause {
            by: PausedBy::Guard,
            since_ms: 9,
        };
        let g = Guard::new(
            10,
            ["example.com".to_string()],
            [
                ("example.com".to_string(), kept),
                ("gone.test".to_string(), kept),
            ],
        );
        assert_eq!(g.paused("example.com"), Some(kept));
        assert_eq!(g.paused("gone.test"), None);
    }
}
