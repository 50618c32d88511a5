//! When to try again: staggered exponential backoff with jitter, and expiry.
//! Pure functions of the attempt count, the settings and an injected random
//! sample, so they can be tested exhaustively and the scheduler stays simple.

use std::time::Duration;

/// `delivery.retry_*` settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub factor: f64,
    pub max: Duration,
    /// Fraction in [0, 1]: delays are spread over `[d·(1−jitter), d]` so mail
    /// that failed together does not retry together.
    pub jitter: f64,
}

impl Backoff {
    /// The wait after the `attempt`-th failed attempt (1 = the first failure).
    /// `sample` is uniform in [0, 1). Never longer than `max`, never zero
    /// unless `initial` is.
    pub fn delay(&self, attempt: u32, sample: f64) -> Duration {
        let unit = |x: f64| {
            if x.is_finite() {
                x.clamp(0.0, 1.0)
            } else {
                0.0
            }
        };
        let factor = if self.factor.is_finite() {
            self.factor.max(1.0)
        } else {
            1.0
        };
        let exponent = attempt.saturating_sub(1).min(1_000) as i32;
        let base = self.initial.as_secs_f64() * factor.powi(exponent);
        // min() with a finite cap also tames an infinite base.
        let capped = base.min(self.max.as_secs_f64()).max(0.0);
        Duration::from_secs_f64(capped * (1.0 - unit(self.jitter) * unit(sample)))
    }
}

/// Whether a message that arrived at `arrived_ms` has outlived `lifetime` at `now_ms`.
pub fn expired(arrived_ms: u64, now_ms: u64, lifetime: Duration) -> bool {
    now_ms.saturating_sub(arrived_ms) >= lifetime.as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Backoff {
        Backoff {
            initial: Duration::from_secs(300),
            factor: 2.0,
            max: Duration::from_secs(3600),
            jitter: 0.2,
        }
    }

    #[test]
    fn grows_geometrically_up_to_the_cap() {
        let b = Backoff {
            jitter: 0.0,
            ..defaults()
        };
        let secs: Vec<u64> = (1..=7).map(|n| b.delay(n, 0.5).as_secs()).collect();
        assert_eq!(secs, [300, 600, 1200, 2400, 3600, 3600, 3600]);
        assert_eq!(b.delay(0, 0.0).as_secs(), 300);
        assert_eq!(b.delay(u32::MAX, 0.0).as_secs(), 3600);
    }

    #[test]
    fn jitter_spreads_below_the_nominal_delay() {
        let b = defaults();
        for attempt in 1..=10 {
            let nominal = Backoff { jitter: 0.0, ..b }.delay(attempt, 0.0);
            for sample in [0.0, 0.25, 0.5, 0.999] {
                let d = b.delay(attempt, sample);
                assert!(
                    d <= nominal && d >= nominal.mul_f64(0.8),
                    "{attempt} {sample} {d:?}"
                );
                assert!(d <= b.max);
            }
            assert!(b.delay(attempt, 0.9) < b.delay(attempt, 0.1));
        }
    }

    #[test]
    fn odd_settings_stay_sane() {
        let b = Backoff {
            initial: Duration::from_secs(10),
            factor: 0.5,
            max: Duration::from_secs(5),
            jitter: 3.0,
        };
        // factor < 1 is treated as 1, the cap wins, jitter is clamped to 1.
        assert_eq!(b.delay(5, 0.0), Duration::from_secs(5));
        assert_eq!(b.delay(5, 1.0), Duration::ZERO);
        assert_eq!(b.delay(5, f64::NAN), Duration::from_secs(5));
        let b = Backoff {
            factor: f64::INFINITY,
            jitter: f64::NAN,
            ..b
        };
        assert_eq!(b.delay(3, 0.5), Duration::from_secs(5));
    }

    #[test]
    fn expiry() {
        let life = Duration::from_secs(5 * 86_400);
        assert!(!expired(1_000, 1_000, life));
        assert!(!expired(1_000, 1_000 + 5 * 86_400_000 - 1, life));
        assert!(expired(1_000, 1_000 + 5 * 86_400_000, life));
        assert!(!expired(10_000, 5_000, life));
    }
}
