//! The one source of wall-clock time. Delivery (due times, backoff, expiry,
//! delay notices), health, learned verdicts, the admin API and inbound's
//! queue IDs read the time from a [`Clock`], never from the system directly,
//! so a test can move it forward: mail comes due, expires or is owed a notice
//! at once instead of after a real wait, while sockets and timeouts keep
//! running on real time. Durations (timeouts, rate windows, latency) use
//! `tokio::time::Instant`, which tests can pause; `clippy.toml` bans the
//! `std::time` clocks everywhere else.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;

/// The wall clock, in Unix milliseconds (what the spool stores), plus however
/// far it has been moved ahead. Cheap to clone; clones share the offset.
#[derive(Clone, Debug)]
pub struct Clock {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// How far this clock runs ahead of the system's: 0 unless a test moved it.
    ahead_ms: AtomicU64,
    /// Bumped on every move, so sleepers recompute their deadlines.
    moved: watch::Sender<u64>,
}

impl Default for Clock {
    fn default() -> Clock {
        Clock::new()
    }
}

impl Clock {
    /// The system's clock.
    pub fn new() -> Clock {
        Clock {
            inner: Arc::new(Inner {
                ahead_ms: AtomicU64::new(0),
                moved: watch::Sender::new(0),
            }),
        }
    }

    /// Now, in Unix milliseconds.
    pub fn now_ms(&self) -> u64 {
        self.now_micros() / 1000
    }

    /// Now, in Unix microseconds (queue IDs carry them).
    pub fn now_micros(&self) -> u64 {
        let ahead = self.inner.ahead_ms.load(Ordering::Relaxed);
        system_micros().saturating_add(ahead.saturating_mul(1000))
    }

    /// Moves the clock (and every clone) forward by `by`, and wakes whoever
    /// waits in [`Clock::moved`]. Only tests do this.
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.inner.ahead_ms.fetch_add(by, Ordering::Relaxed);
        self.inner.moved.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that changes whenever the clock is moved: a task that
    /// sleeps until a wall-clock time selects on it to wake and recompute.
    pub fn moves(&self) -> watch::Receiver<u64> {
        self.inner.moved.subscribe()
    }

    /// How long until `at_ms` by this clock (zero if it has passed).
    pub fn until(&self, at_ms: u64) -> Duration {
        Duration::from_millis(at_ms.saturating_sub(self.now_ms()))
    }
}

/// The system's wall clock in Unix microseconds (0 before 1970).
#[allow(clippy::disallowed_types)]
fn system_micros() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_system_time_until_moved() {
        let clock = Clock::new();
        let before = system_micros() / 1000;
        let now = clock.now_ms();
        assert!(
            now >= before && now <= system_micros() / 1000,
            "{before} {now}"
        );
        // 2020-01-01: a clock that is not the system's would be far off.
        assert!(now > 1_577_836_800_000);
    }

    #[tokio::test]
    async fn moving_moves_every_clone_and_wakes_watchers() {
        let clock = Clock::new();
        let other = clock.clone();
        let mut moves = other.moves();
        let before = other.now_ms();
        clock.advance(Duration::from_secs(5 * 24 * 3600));
        let after = other.now_ms();
        assert!(after >= before + 5 * 24 * 3600 * 1000, "{before} {after}");
        tokio::time::timeout(Duration::from_secs(1), moves.changed())
            .await
            .expect("a move wakes the watcher")
            .expect("the clock is alive");
        assert_eq!(clock.until(after - 10), Duration::ZERO);
        assert!(clock.until(after + 60_000) > Duration::from_secs(59));
    }
}
