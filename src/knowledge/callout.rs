//! Callouts: while a `verify_recipients` domain's primary is up, a recipient
//! never seen before is checked with the primary (MAIL FROM:<>, RCPT TO, QUIT)
//! while the client waits, so that mail for a mailbox the primary does not
//! have is refused at RCPT instead of bounced later. Answers are learned
//! like those of deliveries (see [`super::Learned`]), which makes them the
//! cache.
//!
//! Callouts are bounded three ways: each has a short deadline, they are
//! rate-limited server-wide (a spammer walking a dictionary through us must
//! not make us hammer the primary), and a primary that gave no answer is not
//! asked again for a while.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::Learned;
use crate::address::domain_of;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::outbound;
use crate::route::{Destinations, Router};

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

/// Asks primaries about recipients, within the bounds above.
pub struct Callouts {
    gate: Gate,
    learned: Arc<Learned>,
    health: Arc<Health>,
    router: Arc<Router>,
    dests: Arc<Destinations>,
    metrics: Arc<Metrics>,
}

impl Callouts {
    pub fn new(
        learned: Arc<Learned>,
        health: Arc<Health>,
        router: Arc<Router>,
        dests: Arc<Destinations>,
        metrics: Arc<Metrics>,
    ) -> Callouts {
        // Every verdict's series exists from the start, at zero.
        for verdict in Verdict::ALL {
            metrics.callouts.with_label_values(&[verdict.label()]);
        }
        Callouts {
            gate: Gate::new(Instant::now()),
            learned,
            health,
            router,
            dests,
            metrics,
        }
    }

    /// Asks the primary of `address`'s domain whether it has that mailbox
    /// (MAIL FROM:<>, RCPT TO, QUIT, within [`TIMEOUT`]), and remembers a
    /// definite answer as of `now_ms`.
    pub async fn verify(&self, address: &str, now_ms: u64) -> Verdict {
        let domain = domain_of(address);
        if self.health.is_down(&domain) {
            return Verdict::Unreachable;
        }
        if let Err(verdict) = self.gate.admit(&domain, Instant::now()) {
            return verdict;
        }
        let verdict = self.ask(&domain, address, now_ms).await;
        self.metrics
            .callouts
            .with_label_values(&[verdict.label()])
            .inc();
        verdict
    }

    async fn ask(&self, domain: &str, address: &str, now_ms: u64) -> Verdict {
        let dest = self.dests.get(domain);
        let ask = async {
            let hops = self.router.hops(domain, dest.route.as_ref()).await.ok()?;
            for hop in &hops {
                match outbound::verify(hop, &dest.settings, address).await {
                    Ok(answer) => return Some(answer),
                    Err(e) => {
                        tracing::debug!(%domain, hop = %hop.name, error = %e, "callout failed")
                    }
                }
            }
            None
        };
        match tokio::time::timeout(TIMEOUT, ask).await {
            Ok(Some(Some(exists))) => {
                self.learned
                    .learn(vec![(address.to_owned(), exists)], now_ms);
                if exists {
                    Verdict::Exists
                } else {
                    Verdict::DoesNotExist
                }
            }
            Ok(Some(None)) => Verdict::Unknown,
            Ok(None) | Err(_) => {
                self.gate.silent(domain, Instant::now());
                Verdict::Unreachable
            }
        }
    }
}

/// Which callouts may start now.
struct Gate {
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
