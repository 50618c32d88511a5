//! Primary health: whether each destination's primary was reachable at the
//! last try, since when, and the recent changes of each relay domain's
//! primary. The one place that keeps it: delivery reports what it saw
//! (a connection got past the greeting, or no host could be reached), and
//! inbound admission, callouts, `/metrics` and the admin API read it.
//!
//! What to do about a down primary (suspend its mail, probe it, release the
//! mail when it answers) is the scheduler's business, not this module's.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, RwLock};

use std::time::Duration;

use tracing::{info, warn};

use crate::metrics::{Metrics, OTHER};

/// State changes kept per relay domain.
const HISTORY: usize = 32;

/// A relay domain's primary as operators see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Primary {
    /// Up until an attempt or probe failed to reach it.
    pub up: bool,
    /// The last change, or the server's start, in Unix ms.
    pub since_ms: u64,
    /// When the last check, probe or delivery reported on it (`None`: not
    /// yet since the start).
    pub checked_ms: Option<u64>,
    /// Recent changes, oldest first.
    pub history: VecDeque<Change>,
}

/// One change of a primary's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub at_ms: u64,
    pub up: bool,
    /// For a change to down: why (the error or reply).
    pub reason: Option<String>,
}

/// Every destination's health, shared by the whole server.
pub struct Health {
    metrics: Arc<Metrics>,
    state: RwLock<State>,
}

#[derive(Default)]
struct State {
    /// Destinations (recipient domains) whose primary is down.
    down: HashSet<String>,
    /// Per relay domain (its metric label).
    primaries: HashMap<String, Primary>,
}

impl Health {
    /// Every relay domain's primary starts up as of `now_ms`.
    pub fn new(
        relay_domains: impl IntoIterator<Item = String>,
        metrics: Arc<Metrics>,
        now_ms: u64,
    ) -> Health {
        let primaries = relay_domains
            .into_iter()
            .map(|name| {
                metrics
                    .primary_last_change
                    .with_label_values(&[&name])
                    .set(seconds(now_ms));
                let primary = Primary {
                    up: true,
                    since_ms: now_ms,
                    checked_ms: None,
                    history: VecDeque::new(),
                };
                (name, primary)
            })
            .collect();
        Health {
            metrics,
            state: RwLock::new(State {
                down: HashSet::new(),
                primaries,
            }),
        }
    }

    /// Whether the primary of destination `domain` is down.
    pub fn is_down(&self, domain: &str) -> bool {
        self.read().down.contains(domain)
    }

    /// Whether any primary is down (cheap: inbound asks on every connection).
    pub fn any_down(&self) -> bool {
        !self.read().down.is_empty()
    }

    /// Whether relay domain `name`'s primary was up at its last report and
    /// that report is younger than `max_age` (what `when_primary_up =
    /// "defer"` needs: a stale "up" must not turn mail away).
    pub fn fresh_up(&self, name: &str, now_ms: u64, max_age: Duration) -> bool {
        self.read().primaries.get(name).is_some_and(|p| {
            p.up && p
                .checked_ms
                .is_some_and(|at| u128::from(now_ms.saturating_sub(at)) < max_age.as_millis())
        })
    }

    /// The primary of destination `domain` was reached (`up`, `detail`: the
    /// host that answered, when known) or could not be (`detail`: why), as
    /// of `now_ms`. Sets `mxspool_primary_up` of its relay
    /// domain and, on a change, records it, logs it once (`primary up` /
    /// `primary down`) and sets `mxspool_primary_last_change_timestamp_seconds`.
    pub fn report(&self, domain: &str, up: bool, detail: Option<&str>, now_ms: u64) {
        let reason = if up { None } else { detail };
        let label = self.metrics.label(domain);
        let mut state = self.write();
        if up {
            state.down.remove(domain);
        } else {
            state.down.insert(domain.to_owned());
        }
        if label == OTHER {
            return;
        }
        self.metrics
            .primary_up
            .with_label_values(&[label])
            .set(i64::from(up));
        let Some(primary) = state.primaries.get_mut(label) else {
            return;
        };
        primary.checked_ms = Some(now_ms);
        if primary.up == up {
            return;
        }
        if up {
            info!(domain = %label, destination = %domain, host = detail.unwrap_or(""), "primary up");
        } else {
            warn!(domain = %label, destination = %domain, reason = reason.unwrap_or(""), "primary down");
        }
        self.metrics
            .primary_last_change
            .with_label_values(&[label])
            .set(seconds(now_ms));
        primary.up = up;
        primary.since_ms = now_ms;
        if primary.history.len() == HISTORY {
            primary.history.pop_front();
        }
        primary.history.push_back(Change {
            at_ms: now_ms,
            up,
            reason: reason.map(str::to_owned),
        });
    }

    /// Relay domain `name`'s primary, if `name` is one.
    pub fn primary(&self, name: &str) -> Option<Primary> {
        self.read().primaries.get(name).cloned()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }
}

fn seconds(ms: u64) -> i64 {
    i64::try_from(ms / 1000).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    fn health() -> (Health, Arc<Metrics>) {
        let config = Config::parse(
            "[server]\nhostname = \"mx2.example.net\"\n\
             [[domain]]\nname = \"example.com\"\ninclude_subdomains = true\n\
             [[domain]]\nname = \"example.org\"\n",
            Path::new("test.toml"),
        )
        .unwrap();
        let metrics = Metrics::new(&config);
        let names = config.domains.iter().map(|d| d.name.clone());
        (Health::new(names, metrics.clone(), 1_000), metrics)
    }

    fn gauge(metrics: &Metrics, domain: &str) -> i64 {
        metrics.primary_up.with_label_values(&[domain]).get()
    }

    #[test]
    fn a_report_sets_the_state_the_gauge_and_the_time_of_the_change() {
        let (health, metrics) = health();
        assert!(!health.any_down());
        assert_eq!(health.primary("example.com").unwrap().since_ms, 1_000);

        health.report("example.com", false, Some("connection refused"), 2_000);
        assert!(health.is_down("example.com"));
        assert!(!health.is_down("example.org"));
        assert!(health.any_down());
        assert_eq!(gauge(&metrics, "example.com"), 0);
        let primary = health.primary("example.com").unwrap();
        assert!(!primary.up);
        assert_eq!(primary.since_ms, 2_000);
        assert_eq!(
            primary.history.back().unwrap().reason.as_deref(),
            Some("connection refused")
        );

        // The same state again is no change: the time stays.
        health.report("example.com", false, Some("timeout"), 3_000);
        assert_eq!(health.primary("example.com").unwrap().since_ms, 2_000);
        assert_eq!(health.primary("example.com").unwrap().history.len(), 1);

        health.report("example.com", true, None, 4_000);
        assert!(!health.any_down());
        assert_eq!(gauge(&metrics, "example.com"), 1);
        let primary = health.primary("example.com").unwrap();
        assert_eq!(
            (primary.up, primary.since_ms, primary.history.len()),
            (true, 4_000, 2)
        );
    }

    #[test]
    fn a_subdomain_reports_under_its_relay_domain_and_others_only_as_destinations() {
        let (health, metrics) = health();
        health.report("sub.example.com", false, Some("refused"), 2_000);
        assert!(health.is_down("sub.example.com"));
        assert!(!health.is_down("example.com"));
        assert_eq!(gauge(&metrics, "example.com"), 0);
        // A destination of no relay domain (a notice's) has no primary entry.
        health.report("elsewhere.test", false, Some("refused"), 2_000);
        assert!(health.is_down("elsewhere.test"));
        assert!(health.primary("elsewhere.test").is_none());
    }

    #[test]
    fn the_history_keeps_the_latest_changes() {
        let (health, _) = health();
        for i in 0..(HISTORY as u64 + 10) {
            health.report("example.org", i % 2 == 1, None, 10 + i);
        }
        let history = health.primary("example.org").unwrap().history;
        assert_eq!(history.len(), HISTORY);
        assert_eq!(history.back().unwrap().at_ms, 10 + HISTORY as u64 + 9);
        assert_eq!(history.front().unwrap().at_ms, 10 + 10);
    }
}
