//! Recipient knowledge: what the primaries told us about their mailboxes.
//!
//! For a `verify_recipients` domain, a delivery's `250` or `5.1.1` and a
//! callout's answer (see [`callout`]) are remembered, so that inbound can
//! refuse a recipient the primary does not have instead of bouncing it later.
//! The spool keeps the verdicts across restarts; this module serves them from
//! memory, so an RCPT never waits on a disk read (or on the spool's writer
//! reopening the file). Verdicts age out: a mailbox that existed is trusted
//! for [`TRUST_EXISTS`], one that did not for [`TRUST_MISSING`].
//!
//! What is known about clients is kept the same way: [`greylist`]'s triplets
//! and the networks that passed, decided in memory, written through.

pub mod callout;
pub mod greylist;

use std::collections::HashMap;
use std::sync::RwLock;

use crate::spool::{ReadError, Spool};
pub use crate::spool::{TRUST_EXISTS, TRUST_MISSING};
pub use callout::Verdict;

/// Most verdicts held in memory. A callout is rate-limited and a delivery
/// teaches one verdict per recipient, so this is rarely reached; past it an
/// arbitrary verdict is forgotten (the spool still has it until it ages
/// out, and at worst the primary is asked again).
const MAX_REMEMBERED: usize = 200_000;

/// What the primary said about a recipient, as remembered now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Knowledge {
    /// It accepted the address.
    Exists,
    /// It said 5.1.1: no such user.
    DoesNotExist,
    /// Never seen (or forgotten).
    Unseen,
}

/// The learned verdicts: in memory for lookups, written through to the spool.
pub struct Learned {
    spool: Spool,
    /// Lower-cased address → (exists, when learned in Unix ms).
    verdicts: RwLock<HashMap<String, (bool, u64)>>,
}

impl Learned {
    /// Reads the verdicts the spool kept. Blocking: call it at startup, off
    /// the runtime's threads.
    pub fn load(spool: Spool) -> Result<Learned, ReadError> {
        let mut verdicts = HashMap::new();
        for (address, verdict) in spool.learned_all()? {
            if verdicts.len() >= MAX_REMEMBERED {
                break;
            }
            verdicts.insert(address, verdict);
        }
        Ok(Learned {
            spool,
            verdicts: RwLock::new(verdicts),
        })
    }

    /// What is known about `address` at `now_ms` (verdicts past their trust
    /// period count as unseen). Never touches the disk.
    pub fn lookup(&self, address: &str, now_ms: u64) -> Knowledge {
        let verdicts = self.verdicts.read().unwrap_or_else(|p| p.into_inner());
        match verdicts.get(&address.to_lowercase()) {
            Some(&(true, at)) if age(now_ms, at) < TRUST_EXISTS.as_millis() => Knowledge::Exists,
            Some(&(false, at)) if age(now_ms, at) < TRUST_MISSING.as_millis() => {
                Knowledge::DoesNotExist
            }
            _ => Knowledge::Unseen,
        }
    }

    /// Remembers verdicts learned at `at_ms` (address, exists), here and in
    /// the spool (not awaited: a verdict lost to a crash is only asked again).
    pub fn learn(&self, learned: Vec<(String, bool)>, at_ms: u64) {
        if learned.is_empty() {
            return;
        }
        {
            let mut verdicts = self.verdicts.write().unwrap_or_else(|p| p.into_inner());
            for (address, exists) in &learned {
                let key = address.to_lowercase();
                if verdicts.len() >= MAX_REMEMBERED && !verdicts.contains_key(&key) {
                    let evicted = verdicts.keys().next().cloned();
                    if let Some(evicted) = evicted {
                        verdicts.remove(&evicted);
                    }
                }
                verdicts.insert(key, (*exists, at_ms));
            }
        }
        self.spool.learn(learned, at_ms);
    }

    /// Drops verdicts past their trust period as of `now_ms`, here and in the
    /// spool.
    pub fn forget_stale(&self, now_ms: u64) {
        self.verdicts
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, &mut (exists, at)| {
                let trust = if exists { TRUST_EXISTS } else { TRUST_MISSING };
                age(now_ms, at) < trust.as_millis()
            });
        self.spool.forget_stale(now_ms);
    }

    /// How many verdicts are held in memory.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.verdicts.read().map(|v| v.len()).unwrap_or(0)
    }
}

fn age(now_ms: u64, at_ms: u64) -> u128 {
    u128::from(now_ms.saturating_sub(at_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 24 * 3600 * 1000;

    #[tokio::test]
    async fn verdicts_are_served_from_memory_age_out_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let now = 100 * DAY;
        {
            let spool = Spool::open(&path, 1 << 20).unwrap();
            let learned = Learned::load(spool.clone()).unwrap();
            assert_eq!(learned.len(), 0);
            learned.learn(
                vec![
                    ("Alice@Example.com".into(), true),
                    ("gone@example.com".into(), false),
                ],
                now,
            );
            learned.learn(vec![("old@example.com".into(), false)], now - 2 * DAY);
            assert_eq!(learned.lookup("alice@example.COM", now), Knowledge::Exists);
            assert_eq!(
                learned.lookup("gone@example.com", now),
                Knowledge::DoesNotExist
            );
            assert_eq!(learned.lookup("carol@example.com", now), Knowledge::Unseen);
            // Past its trust period a verdict counts as unseen, then goes.
            assert_eq!(learned.lookup("old@example.com", now), Knowledge::Unseen);
            assert_eq!(
                learned.lookup("gone@example.com", now + 2 * DAY),
                Knowledge::Unseen
            );
            assert_eq!(
                learned.lookup("alice@example.com", now + 2 * DAY),
                Knowledge::Exists
            );
            learned.forget_stale(now);
            assert_eq!(learned.len(), 2);
            // The spool's writer has the verdicts once a later write is done.
            spool.set_pause("example.com", None).await.unwrap();
            spool.close();
        }
        let spool = Spool::open(&path, 1 << 20).unwrap();
        let learned = Learned::load(spool).unwrap();
        assert_eq!(learned.len(), 2);
        assert_eq!(learned.lookup("ALICE@example.com", now), Knowledge::Exists);
        assert_eq!(
            learned.lookup("gone@example.com", now),
            Knowledge::DoesNotExist
        );
        assert_eq!(
            learned.lookup("old@example.com", now - 2 * DAY),
            Knowledge::Unseen
        );
    }
}
