//! Queue IDs: unique, time-ordered, and safe to print in logs and put in URLs.
//!
//! An ID is a `u64` of microseconds since the Unix epoch, bumped by one when two
//! messages arrive in the same microsecond, so IDs sort in arrival order both as
//! numbers (the spool's keys) and as text (13 Crockford base32 characters).

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Crockford's base32 alphabet: no I, L, O, U, so IDs survive being read aloud or
/// retyped, and ASCII order equals numeric order.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// 13 characters × 5 bits covers all 64 bits, and a fixed width keeps text order.
const WIDTH: usize = 13;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QueueId(pub u64);

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = [0u8; WIDTH];
        let mut v = self.0;
        for slot in out.iter_mut().rev() {
            *slot = ALPHABET[(v & 31) as usize];
            v >>= 5;
        }
        // Every byte comes from ALPHABET, which is ASCII.
        f.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a queue ID: {0:?} (expected {WIDTH} characters of 0-9 and A-Z without I, L, O, U)")]
pub struct ParseIdError(String);

impl FromStr for QueueId {
    type Err = ParseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseIdError(s.chars().take(40).collect());
        if s.len() != WIDTH {
            return Err(err());
        }
        let mut v: u64 = 0;
        for (i, c) in s.bytes().enumerate() {
            let digit = ALPHABET
                .iter()
                .position(|&a| a == c.to_ascii_uppercase())
                .ok_or_else(err)? as u64;
            // The first character carries only the top 4 bits (13 × 5 = 65).
            if i == 0 && digit > 15 {
                return Err(err());
            }
            v = (v << 5) | digit;
        }
        Ok(QueueId(v))
    }
}

/// Hands out IDs that never repeat within a spool, even if the clock steps back.
#[derive(Debug)]
pub struct IdGen {
    /// The last ID handed out (or the largest found in the spool at open).
    last: AtomicU64,
}

impl IdGen {
    pub fn new(largest_existing: u64) -> Self {
        IdGen {
            last: AtomicU64::new(largest_existing),
        }
    }

    /// The next ID: `now_micros` unless that is not above the last one.
    pub fn next(&self, now_micros: u64) -> QueueId {
        let mut prev = self.last.load(Ordering::Relaxed);
        loop {
            let next = now_micros.max(prev + 1);
            match self
                .last
                .compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return QueueId(next),
                Err(actual) => prev = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_sorts_like_numbers() {
        let ids = [0, 1, 31, 32, 1_700_000_000_000_000, u64::MAX - 1, u64::MAX];
        let mut texts = Vec::new();
        for v in ids {
            let t = QueueId(v).to_string();
            assert_eq!(t.len(), WIDTH);
            assert_eq!(t.parse::<QueueId>(), Ok(QueueId(v)));
            assert_eq!(t.to_lowercase().parse::<QueueId>(), Ok(QueueId(v)));
            texts.push(t);
        }
        let mut sorted = texts.clone();
        sorted.sort();
        assert_eq!(texts, sorted);
    }

    #[test]
    fn rejects_bad_text() {
        for bad in [
            "",
            "ABC",
            "0000000000000I",
            "000000000000I",
            "Z000000000000",
            "../../etc/pa",
        ] {
            assert!(bad.parse::<QueueId>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn ids_are_unique_and_increasing_even_when_the_clock_stalls_or_steps_back() {
        let ids = IdGen::new(0);
        let a = ids.next(1_000);
        let b = ids.next(1_000);
        let c = ids.next(500);
        let d = ids.next(2_000);
        assert_eq!([a.0, b.0, c.0, d.0], [1_000, 1_001, 1_002, 2_000]);

        let resumed = IdGen::new(5_000);
        assert_eq!(resumed.next(10).0, 5_001);
    }
}
