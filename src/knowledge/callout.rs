//! Callouts: while a `verify_recipients` domain's primary is up, a recipient
//! never seen before is checked with the primary (MAIL FROM:<>, RCPT TO, QUIT)
//! while the client waits, so that mail for a mailbox the primary does not
//! have is refused at RCPT instead of bounced later. Answers are kept in the
//! spool like those learned while delivering, which makes them the cache.
//!
//! Callouts are bounded three ways: each has a short deadline, they are
//! rate-limited server-wide (a spammer walking a dictionary through us must
//! not make us hammer the primary), and a primary that gave no answer is not
//! asked again for a while.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Longest a client waits for the primary's answer.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// Callouts per second, server-wide, with bursts of [`BURST`].
const RATE: f64 = 10.0;
const BURST: f64 = 20.0;
/// After a callout got no answer from a domain's primary, how long its
/// recipients are taken without asking.
const HOLDOFF: Duration = Duration::from_secs(60);

/// What a callout found out about a recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The primary accepted the address.
    Exists,
    /// The primary said 5.1.1.
    DoesNotExist,
    /// The primary answered something else, or it was not asked (rate limit,
    /// hold-off): nothing is known.
    Unknown,
    /// The primary could not be reached, or did not answer in time.
    Unreachable,
}

impl Verdict {
    pub const ALL: [Verdict; 4] = [
        Verdict::Exists,
        Verdict::DoesNotExist,
        Verdict::Unknown,
        Verdict::Unreachable,
    ];

    /// The `result` label of `mxspool_recipient_callouts_total`.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Exists => "exists",
            Verdict::DoesNotExist => "unknown_user",
            Verdict::Unknown => "inconclusive",
            Verdict::Unreachable => "no_answer",
        }
    }
}

/// Which callouts may start now.
pub(super) struct Gate {
    state: Mutex<GateState>,
}

struct GateState {
    tokens: f64,
    refilled: Instant,
    /// Domains whose primary gave no answer, and since when.
    silent: HashMap<String, Instant>,
}

impl Gate {
    pub fn new(now: Instant) -> Gate {
        Gate {
            state: Mutex::new(GateState {
                tokens: BURST,
                refilled: now,
                silent: HashMap::new(),
            }),
        }
    }

    /// Whether a callout for `domain` may start at `now` (taking a token), or
    /// what to conclude without one: `Unreachable` while the domain's primary
    /// is in its hold-off, `Unknown` over the rate.
    pub fn admit(&self, domain: &str, now: Instant) -> Result<(), Verdict> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.silent
            .retain(|_, since| now.saturating_duration_since(*since) < HOLDOFF);
        if s.silent.contains_key(domain) {
            return Err(Verdict::Unreachable);
        }
        let elapsed = now.saturating_duration_since(s.refilled).as_secs_f64();
        s.tokens = (s.tokens + elapsed * RATE).min(BURST);
        s.refilled = now;
        if s.tokens < 1.0 {
            return Err(Verdict::Unknown);
        }
        s.tokens -= 1.0;
        Ok(())
    }

    /// `domain`'s primary did not answer a callout: leave it alone a while.
    pub fn silent(&self, domain: &str, now: Instant) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.silent.insert(domain.to_owned(), now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callouts_are_rate_limited_with_a_burst() {
        let t0 = Instant::now();
        let gate = Gate::new(t0);
        let admitted = |at| {
            (0..100)
                .filter(|_| gate.admit("example.com", at).is_ok())
                .count()
        };
        assert_eq!(admitted(t0), BURST as usize);
        assert_eq!(gate.admit("example.com", t0), Err(Verdict::Unknown));
        // A second refills RATE tokens.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(admitted(t1), RATE as usize);
        // Never more than the burst, however long it was quiet.
        assert_eq!(admitted(t1 + Duration::from_secs(3600)), BURST as usize);
    }

    #[test]
    fn a_silent_primary_is_left_alone_for_the_hold_off() {
        let t0 = Instant::now();
        let gate = Gate::new(t0);
        gate.silent("example.com", t0);
        assert_eq!(
            gate.admit("example.com", t0 + HOLDOFF / 2),
            Err(Verdict::Unreachable)
        );
        assert_eq!(gate.admit("example.org", t0), Ok(()), "others are asked");
        assert_eq!(gate.admit("example.com", t0 + HOLDOFF), Ok(()));
    }
}
