//! Greylisting: which (client network, sender, recipient) triplets were
//! seen and when, and which client networks passed.
//!
//! Spamware rarely retries a `450`; a real MTA does, minutes later. An
//! unseen triplet is told to come back after `[greylist] delay`; a retry
//! after that and within `window` passes, and its client network (IPv4 /24,
//! IPv6 /64: a sender's outbound pool retries from another address of it)
//! then skips greylisting for `remember`. The decision is the pure
//! [`decide`]; [`Greylist`] keeps the state in memory for RCPT and writes it
//! through to the spool, so a restart neither forgets who passed nor makes
//! a waiting sender start over. It never touches the disk on the caller's
//! thread: loading is for startup, off the runtime's threads.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use ipnet::IpNet;
use tracing::info;

use crate::config::GreylistConfig;
use crate::spool::{GreyWrite, ReadError, Spool};

/// Most triplets, and most passed networks, held in memory. Past it the
/// oldest tenth goes at once (a scan per that many inserts, not per insert):
/// a forgotten triplet only starts over, a forgotten network is greylisted
/// once more.
const MAX_REMEMBERED: usize = 200_000;

/// A remembered network's pass is renewed when it is older than this, so a
/// client that keeps sending stays remembered at one write a day.
const RENEW_AFTER: Duration = Duration::from_secs(24 * 3600);

/// What greylisting makes of one RCPT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The client's network passed within `remember`: accepted.
    Remembered,
    /// Never seen: `450`, and the attempt is recorded.
    Unseen,
    /// Seen, but `delay` has not passed yet: `450`.
    TooEarly,
    /// Retried after `delay` and within `window`: accepted, and the client's
    /// network is remembered.
    Retried,
    /// Seen, but longer ago than `window`: `450`, and it starts over.
    Expired,
}

impl Decision {
    /// Whether RCPT is told to retry later.
    pub fn refuses(self) -> bool {
        matches!(
            self,
            Decision::Unseen | Decision::TooEarly | Decision::Expired
        )
    }
}

/// The decision for a triplet first seen at `seen` whose client network last
/// passed at `passed` (Unix ms; `None`: never, or forgotten), at `now`.
pub fn decide(
    seen: Option<u64>,
    passed: Option<u64>,
    now: u64,
    config: &GreylistConfig,
) -> Decision {
    let age = |at: u64| Duration::from_millis(now.saturating_sub(at));
    if passed.is_some_and(|at| age(at) < config.remember) {
        return Decision::Remembered;
    }
    match seen {
        None => Decision::Unseen,
        Some(at) if age(at) < config.delay => Decision::TooEarly,
        Some(at) if age(at) <= config.window => Decision::Retried,
        Some(_) => Decision::Expired,
    }
}

/// The client network greylisting treats as one sender: IPv4 /24, IPv6 /64.
pub fn network(ip: IpAddr) -> IpNet {
    let ip = ip.to_canonical();
    let prefix = if ip.is_ipv4() { 24 } else { 64 };
    IpNet::new(ip, prefix).map_or(IpNet::from(ip), |n| n.trunc())
}

/// The state: in memory for RCPT, written through to the spool.
pub struct Greylist {
    spool: Spool,
    state: Mutex<State>,
}

struct State {
    /// "network sender recipient" (lower-cased) → first attempt, Unix ms.
    triplets: HashMap<String, u64>,
    /// Client network → when it last passed, Unix ms.
    passed: HashMap<String, u64>,
    /// The timings of the last check: a reload changes them, and the sweep
    /// uses what decisions use.
    config: GreylistConfig,
}

impl Greylist {
    /// Reads the state the spool kept. Blocking: call it at startup, off the
    /// runtime's threads.
    pub fn load(spool: Spool, config: GreylistConfig) -> Result<Greylist, ReadError> {
        let (triplets, passed) = spool.greylist_all()?;
        let mut triplets: HashMap<String, u64> = triplets.into_iter().collect();
        let mut passed: HashMap<String, u64> = passed.into_iter().collect();
        for map in [&mut triplets, &mut passed] {
            if map.len() > MAX_REMEMBERED {
                let excess = map.len() - MAX_REMEMBERED;
                drop_oldest(map, excess);
            }
        }
        Ok(Greylist {
            spool,
            state: Mutex::new(State {
                triplets,
                passed,
                config,
            }),
        })
    }

    /// Decides an RCPT from the client at `ip`, for `sender` and `recipient`,
    /// at `now_ms`, records what the decision changes (here and in the
    /// spool, not awaited) and logs a refusal. Never touches the disk.
    pub fn check(
        &self,
        ip: IpAddr,
        sender: &str,
        recipient: &str,
        now_ms: u64,
        config: &GreylistConfig,
    ) -> Decision {
        let network = network(ip).to_string();
        let triplet = format!(
            "{network} {} {}",
            sender.to_lowercase(),
            recipient.to_lowercase()
        );
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.config = *config;
        let passed = state.passed.get(&network).copied();
        let decision = decide(
            state.triplets.get(&triplet).copied(),
            passed,
            now_ms,
            config,
        );
        let write = match decision {
            Decision::Remembered => passed
                .filter(|&at| Duration::from_millis(now_ms.saturating_sub(at)) > RENEW_AFTER)
                .map(|_| {
                    insert(&mut state.passed, network.clone(), now_ms);
                    GreyWrite::Passed {
                        triplet: None,
                        network,
                        at_ms: now_ms,
                    }
                }),
            Decision::Unseen | Decision::Expired => {
                insert(&mut state.triplets, triplet.clone(), now_ms);
                Some(GreyWrite::Seen {
                    triplet,
                    at_ms: now_ms,
                })
            }
            Decision::TooEarly => None,
            Decision::Retried => {
                state.triplets.remove(&triplet);
                insert(&mut state.passed, network.clone(), now_ms);
                Some(GreyWrite::Passed {
                    triplet: Some(triplet),
                    network,
                    at_ms: now_ms,
                })
            }
        };
        drop(state);
        if decision.refuses() {
            info!(
                client = %ip,
                sender,
                recipient,
                ?decision,
                "refused: greylisted"
            );
        }
        if let Some(write) = write {
            self.spool.greylist(write);
        }
        decision
    }

    /// Drops triplets older than `window` and networks that passed longer
    /// than `remember` ago as of `now_ms`, here and in the spool.
    pub fn forget_stale(&self, now_ms: u64) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let config = state.config;
        let before =
            |d: Duration| now_ms.saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let seen_before = before(config.window);
        let passed_before = before(config.remember);
        state.triplets.retain(|_, at| *at >= seen_before);
        state.passed.retain(|_, at| *at >= passed_before);
        drop(state);
        self.spool.greylist(GreyWrite::Sweep {
            seen_before,
            passed_before,
        });
    }

    /// How many triplets and passed networks are held in memory.
    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (state.triplets.len(), state.passed.len())
    }
}

/// Inserts, first making room by dropping the oldest tenth when full.
fn insert(map: &mut HashMap<String, u64>, key: String, at_ms: u64) {
    if map.len() >= MAX_REMEMBERED && !map.contains_key(&key) {
        drop_oldest(map, MAX_REMEMBERED / 10);
    }
    map.insert(key, at_ms);
}

/// Drops (at least) the `count` oldest entries.
fn drop_oldest(map: &mut HashMap<String, u64>, count: usize) {
    if count == 0 || map.is_empty() {
        return;
    }
    let mut times: Vec<u64> = map.values().copied().collect();
    let nth = count.min(times.len()) - 1;
    let (_, &mut cutoff, _) = times.select_nth_unstable(nth);
    map.retain(|_, at| *at > cutoff);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60 * 1000;
    const DAY: u64 = 24 * 60 * MIN;

    fn config() -> GreylistConfig {
        GreylistConfig {
            delay: Duration::from_secs(300),
            window: Duration::from_secs(24 * 3600),
            remember: Duration::from_secs(35 * 24 * 3600),
        }
    }

    #[test]
    fn decisions() {
        let now = 100 * DAY;
        let c = config();
        let cases = [
            // (first seen, network passed, decision)
            (None, None, Decision::Unseen),
            (Some(now), None, Decision::TooEarly),
            (Some(now - 4 * MIN), None, Decision::TooEarly),
            (Some(now - 5 * MIN), None, Decision::Retried),
            (Some(now - DAY), None, Decision::Retried),
            (Some(now - DAY - 1), None, Decision::Expired),
            (None, Some(now - 34 * DAY), Decision::Remembered),
            (Some(now), Some(now - DAY), Decision::Remembered),
            (None, Some(now - 35 * DAY), Decision::Unseen),
            (Some(now - MIN), Some(now - 40 * DAY), Decision::TooEarly),
        ];
        for (seen, passed, want) in cases {
            assert_eq!(decide(seen, passed, now, &c), want, "{seen:?} {passed:?}");
        }
        assert!(Decision::Unseen.refuses());
        assert!(Decision::TooEarly.refuses());
        assert!(Decision::Expired.refuses());
        assert!(!Decision::Retried.refuses());
        assert!(!Decision::Remembered.refuses());
    }

    #[test]
    fn networks_are_a_24_or_a_64() {
        let net = |ip: &str| network(ip.parse().unwrap()).to_string();
        assert_eq!(net("192.0.2.77"), "192.0.2.0/24");
        assert_eq!(net("::ffff:192.0.2.77"), "192.0.2.0/24");
        assert_eq!(net("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64");
    }

    #[test]
    fn the_oldest_go_first() {
        let mut map: HashMap<String, u64> = (0..10).map(|i| (i.to_string(), i)).collect();
        drop_oldest(&mut map, 3);
        assert_eq!(map.len(), 7);
        assert!(!map.contains_key("2") && map.contains_key("3"));
    }

    #[tokio::test]
    async fn state_is_written_through_swept_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let now = 100 * DAY;
        let c = config();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "198.51.100.1".parse().unwrap();
        {
            let spool = Spool::open(&path, 1 << 20).unwrap();
            let grey = Greylist::load(spool.clone(), c).unwrap();
            assert_eq!(
                grey.check(ip, "A@x.org", "b@example.com", now, &c),
                Decision::Unseen
            );
            assert_eq!(
                grey.check(ip, "a@x.org", "B@example.com", now + MIN, &c),
                Decision::TooEarly
            );
            // Another address of the same /24 is the same sender.
            let neighbour: IpAddr = "192.0.2.200".parse().unwrap();
            assert_eq!(
                grey.check(neighbour, "a@x.org", "b@example.com", now + 6 * MIN, &c),
                Decision::Retried
            );
            assert_eq!(
                grey.check(ip, "c@y.org", "d@example.com", now + 7 * MIN, &c),
                Decision::Remembered
            );
            assert_eq!(
                grey.check(other, "a@x.org", "b@example.com", now, &c),
                Decision::Unseen
            );
            assert_eq!(
                grey.check(other, "old@x.org", "b@example.com", now - 2 * DAY, &c),
                Decision::Unseen
            );
            assert_eq!(grey.len(), (2, 1));
            grey.forget_stale(now);
            assert_eq!(grey.len(), (1, 1));
            // The spool's writer has it all once a later write is done.
            spool.set_pause("example.com", None).await.unwrap();
            spool.close();
        }
        let spool = Spool::open(&path, 1 << 20).unwrap();
        let grey = Greylist::load(spool, c).unwrap();
        assert_eq!(grey.len(), (1, 1));
        assert_eq!(
            grey.check(other, "a@x.org", "b@example.com", now + 10 * MIN, &c),
            Decision::Retried
        );
        assert_eq!(
            grey.check(ip, "e@z.org", "f@example.com", now + DAY, &c),
            Decision::Remembered
        );
    }
}
