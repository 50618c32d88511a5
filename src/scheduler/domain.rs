//! What the scheduler knows of one destination: its queue and workers, its
//! primary's health, and how many connections it may have at once (a slow
//! start that backs off when the host pushes back). Plain state: nothing
//! here waits, spawns or touches the spool.

use std::collections::HashSet;
use std::net::IpAddr;

use super::worker::Queue;
use crate::spool::QueueId;

/// Connections a destination starts with; more follow as deliveries succeed.
const INITIAL_CONNECTIONS: usize = 5;
/// Once a host pushed back, deliveries it takes before we try one more
/// connection (each try may cost it a refused connection).
const DELIVERIES_PER_STEP: usize = 50;

#[derive(Default)]
pub(super) struct DomainState {
    pub(super) queue: Queue,
    pub(super) workers: usize,
    /// Why the primary is considered down; `None` when up (or never tried).
    pub(super) down: Option<String>,
    pub(super) probing: bool,
    /// Messages with recipients here that wait because it was unreachable.
    pub(super) waiting: HashSet<QueueId>,
    /// Messages that waited for it and are to be delivered now that it is
    /// back: handed to delivery as room allows, without being rewritten as
    /// due first (the outcome rewrites or removes them anyway). Ordered, so
    /// they go in arrival order: neighbours in the spool's trees, which keeps
    /// a million-message drain reading and deleting pages it has just used.
    pub(super) backlog: std::collections::BTreeSet<QueueId>,
    /// The primary's addresses, while down.
    pub(super) primary_ips: Vec<IpAddr>,
    /// The last routing attempt found us to be the best MX.
    pub(super) looping: bool,
    /// Connections the slow start allows now; 0: not started (see
    /// [`DomainState::allowed`]).
    concurrency: usize,
    /// The host refused a connection (or failed a session) since it came up:
    /// grow slowly from here.
    congested: bool,
    /// Deliveries since the last step up, while congested.
    credit: usize,
}

impl DomainState {
    /// Connections allowed now: a few at first, one more per delivery up to
    /// `cap`, halved when the host refuses one more or a session fails with
    /// mail in flight (Postfix's destination concurrency, simplified).
    pub(super) fn allowed(&self, cap: usize) -> usize {
        let allowed = if self.concurrency == 0 {
            INITIAL_CONNECTIONS
        } else {
            self.concurrency
        };
        allowed.clamp(1, cap.max(1))
    }

    /// A delivery succeeded: one more connection at once (slow start), or
    /// after [`DELIVERIES_PER_STEP`] more once the host pushed back. True if
    /// the allowance grew.
    pub(super) fn grow(&mut self, cap: usize) -> bool {
        let allowed = self.allowed(cap);
        if allowed >= cap {
            return false;
        }
        if self.congested {
            self.credit += 1;
            if self.credit < DELIVERIES_PER_STEP {
                return false;
            }
            self.credit = 0;
        }
        self.concurrency = allowed + 1;
        true
    }

    /// The host refused one more connection while `connected` others worked
    /// (`Some`), or a session failed with messages in flight (`None`): what
    /// the host took is its limit; a failed session halves. Growth is slow
    /// from here.
    pub(super) fn congest(&mut self, connected: Option<usize>, cap: usize) {
        let allowed = self.allowed(cap);
        let limit = connected.unwrap_or(allowed / 2).clamp(1, allowed);
        self.concurrency = limit;
        self.congested = true;
        self.credit = 0;
    }

    /// The primary went down: when it comes back, start slowly again.
    pub(super) fn restart_slowly(&mut self) {
        self.concurrency = 0;
        self.congested = false;
        self.credit = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_start_few_grow_per_delivery_and_slowly_after_push_back() {
        let mut state = DomainState::default();
        assert_eq!(state.allowed(20), INITIAL_CONNECTIONS);
        assert_eq!(state.allowed(2), 2, "never above the cap");
        assert_eq!(state.allowed(0), 1, "never below one");
        // Slow start: every delivery earns one more, up to the cap.
        for want in INITIAL_CONNECTIONS + 1..=20 {
            assert!(state.grow(20));
            assert_eq!(state.allowed(20), want);
        }
        assert!(!state.grow(20));
        assert_eq!(state.allowed(20), 20);

        // The host refused one more while 3 worked: 3 it is, and growth slows.
        state.concurrency = 3;
        state.congested = true;
        for _ in 1..DELIVERIES_PER_STEP {
            assert!(!state.grow(20));
        }
        assert!(state.grow(20));
        assert_eq!(state.allowed(20), 4);
    }

    #[test]
    fn push_back_sets_the_limit_a_failed_session_halves_and_down_restarts() {
        let mut state = DomainState::default();
        state.congest(Some(3), 20);
        assert_eq!(state.allowed(20), 3, "what the host took");
        state.congest(Some(9), 20);
        assert_eq!(state.allowed(20), 3, "never above what was allowed");
        state.congest(None, 20);
        assert_eq!(state.allowed(20), 1, "halved, never below one");
        assert!(!state.grow(20), "slow growth after push back");

        state.restart_slowly();
        assert_eq!(state.allowed(20), INITIAL_CONNECTIONS);
        assert!(state.grow(20), "slow start again: one more per delivery");
    }
}
