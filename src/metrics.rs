//! (7) What Prometheus sees: the counters and histograms every part of the
//! pipeline bumps, and the queue gauges, which are read from the spool's own
//! running totals at scrape time (never from counters that could drift).
//!
//! Label values stay bounded: `domain` is a configured relay domain or
//! "other" (our own notices to the world), and `reason`/`result`/`kind` come
//! from fixed lists.

use std::sync::Arc;
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::config::Config;
pub use crate::domain::OTHER;
use crate::domain::RelayDomains;
use crate::status::{Failure, Rejection};

/// Maps a recipient domain to its metric label (the configured relay
/// domain it belongs to, or "other"), so per-domain gauges stay exact and
/// their labels bounded. [`Metrics::labeler`] builds it from the relay domains.
pub type Labeler = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// The queue as the gauges show it, read from the spool's running totals.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueGauges {
    /// Body bytes of queued messages.
    pub queued_bytes: u64,
    pub dead: u64,
    pub quarantined: u64,
    /// Per label: queued messages, and the arrival of the oldest (Unix ms).
    pub by_label: Vec<(String, u64, Option<u64>)>,
}

pub struct Metrics {
    registry: Registry,
    /// The configured relay domains: the `domain` label values.
    relay: RelayDomains,
    pub accepted: IntCounter,
    pub rejected: IntCounterVec,
    pub attempts: IntCounterVec,
    pub delivered: IntCounterVec,
    pub failed: IntCounterVec,
    pub dsn_sent: IntCounterVec,
    pub primary_up: IntGaugeVec,
    /// When each relay domain's primary last changed state (Unix seconds).
    pub primary_last_change: IntGaugeVec,
    /// 1 while a configured domain is paused (by an operator or the drain guard).
    pub domain_paused: IntGaugeVec,
    /// Open delivery connections per destination (see [`Metrics::connections`]).
    delivery_connections: IntGaugeVec,
    pub sessions: IntGauge,
    pub delivery_seconds: Histogram,
    pub commit_seconds: Histogram,
    pub loops: IntCounterVec,
    /// Over-long lines broken on the way to a next hop, per destination.
    pub lines_broken: IntCounterVec,
    /// Messages whose declared 8-bit MIME was made 7-bit for a next hop.
    pub converted: IntCounterVec,
    pub callouts: IntCounterVec,
    queue_messages: IntGaugeVec,
    queue_bytes: IntGauge,
    oldest_age: GaugeVec,
    dead_letters: IntGauge,
    quarantined: IntGauge,
    /// DNS list lookups that failed or timed out (taken as "not listed").
    pub dnsbl_errors: IntCounterVec,
    /// Mailbox fetch: runs by account and result, messages taken, last success.
    pub fetch_runs: IntCounterVec,
    pub fetched: IntCounterVec,
    pub fetch_last_success: IntGaugeVec,
    /// The `[[fetch]]` names: the `account` label values.
    accounts: Vec<String>,
}

/// A metric family as exposed: name, help and label names.
struct Family {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
}

// SMTP in.
const ACCEPTED: Family = Family {
    name: "mxspool_messages_accepted_total",
    help: "Messages accepted and committed to the spool",
    labels: &[],
};
const REJECTED: Family = Family {
    name: "mxspool_smtp_rejected_total",
    help: "SMTP commands, messages and connections refused, by reason",
    labels: &["reason"],
};
const SESSIONS: Family = Family {
    name: "mxspool_smtp_sessions_active",
    help: "SMTP sessions in progress",
    labels: &[],
};
const CALLOUTS: Family = Family {
    name: "mxspool_recipient_callouts_total",
    help: "Recipients checked with a live primary at RCPT time, by verdict",
    labels: &["result"],
};

// Delivery.
const ATTEMPTS: Family = Family {
    name: "mxspool_delivery_attempts_total",
    help: "Delivery attempts of a message to a domain, by result",
    labels: &["domain", "result"],
};
const DELIVERED: Family = Family {
    name: "mxspool_recipients_delivered_total",
    help: "Recipients handed to the next hop",
    labels: &["domain"],
};
const FAILED: Family = Family {
    name: "mxspool_recipients_failed_total",
    help: "Recipients given up on, by reason",
    labels: &["domain", "reason"],
};
const DSN_SENT: Family = Family {
    name: "mxspool_dsn_sent_total",
    help: "Delivery status notifications queued, by kind",
    labels: &["kind"],
};
const DELIVERY_CONNECTIONS: Family = Family {
    name: "mxspool_delivery_connections",
    help: "Delivery connections open (or opening) to the domain's primary",
    labels: &["domain"],
};
const DELIVERY_SECONDS: Family = Family {
    name: "mxspool_delivery_duration_seconds",
    help: "Time to deliver one message over an open connection",
    labels: &[],
};
const DELIVERY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const LINES_BROKEN: Family = Family {
    name: "mxspool_delivery_lines_broken_total",
    help: "Lines longer than delivery.line_length_limit broken on the way to the next hop",
    labels: &["domain"],
};
const CONVERTED: Family = Family {
    name: "mxspool_delivery_8bit_converted_total",
    help: "Messages declared 8BITMIME converted to 7-bit MIME for a next hop without 8BITMIME",
    labels: &["domain"],
};
const LOOPS: Family = Family {
    name: "mxspool_routing_loops_total",
    help: "Routing found us to be the best MX of the domain",
    labels: &["domain"],
};

// Primaries and pauses.
const PRIMARY_UP: Family = Family {
    name: "mxspool_primary_up",
    help: "1 while the domain's primary is reachable (or not known to be down)",
    labels: &["domain"],
};
const PRIMARY_LAST_CHANGE: Family = Family {
    name: "mxspool_primary_last_change_timestamp_seconds",
    help: "When the domain's primary last went up or down (or the server started), Unix time",
    labels: &["domain"],
};
const DOMAIN_PAUSED: Family = Family {
    name: "mxspool_domain_paused",
    help: "1 while delivery to the domain is paused, by an operator or the drain guard",
    labels: &["domain"],
};

// The queue and the spool.
const QUEUE_MESSAGES: Family = Family {
    name: "mxspool_queue_messages",
    help: "Queued messages with a recipient waiting at the domain",
    labels: &["domain"],
};
const QUEUE_BYTES: Family = Family {
    name: "mxspool_queue_bytes",
    help: "Bytes of queued messages",
    labels: &[],
};
const OLDEST_AGE: Family = Family {
    name: "mxspool_queue_oldest_age_seconds",
    help: "Age of the oldest queued message with a recipient at the domain (0: none)",
    labels: &["domain"],
};
const DEAD_LETTERS: Family = Family {
    name: "mxspool_dead_letters",
    help: "Messages that could neither be delivered nor bounced",
    labels: &[],
};
const QUARANTINED: Family = Family {
    name: "mxspool_spool_quarantined",
    help: "Spool records set aside for an operator: undecodable, or their body missing",
    labels: &[],
};
const COMMIT_SECONDS: Family = Family {
    name: "mxspool_spool_commit_seconds",
    help: "Time of one spool transaction including its fsync",
    labels: &[],
};
const COMMIT_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

// Mailbox fetch.
const FETCH_RUNS: Family = Family {
    name: "mxspool_fetch_runs_total",
    help: "Mailbox fetch runs, by account and result (ok, auth_failed, error)",
    labels: &["account", "result"],
};
const FETCHED: Family = Family {
    name: "mxspool_fetched_messages_total",
    help: "Messages fetched from the account's mailbox and committed to the spool",
    labels: &["account"],
};
const FETCH_LAST_SUCCESS: Family = Family {
    name: "mxspool_fetch_last_success_timestamp_seconds",
    help: "When a fetch of the account last succeeded, Unix time (0: not since start)",
    labels: &["account"],
};
/// The `result` values of [`FETCH_RUNS`].
pub const FETCH_RESULTS: [&str; 3] = ["ok", "auth_failed", "error"];

/// Makes metrics and registers each as it is made.
struct Registrar<'r>(&'r Registry);

impl Registrar<'_> {
    fn add<C: Collector + Clone + 'static>(&self, metric: C) -> C {
        self.0
            .register(Box::new(metric.clone()))
            .expect("unique metric");
        metric
    }

    fn counter(&self, f: &Family) -> IntCounter {
        self.add(IntCounter::new(f.name, f.help).expect("valid metric"))
    }

    fn counter_vec(&self, f: &Family) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(f.name, f.help), f.labels).expect("valid metric"))
    }

    fn gauge(&self, f: &Family) -> IntGauge {
        self.add(IntGauge::new(f.name, f.help).expect("valid metric"))
    }

    fn gauge_vec(&self, f: &Family) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(f.name, f.help), f.labels).expect("valid metric"))
    }

    fn float_gauge_vec(&self, f: &Family) -> GaugeVec {
        self.add(GaugeVec::new(Opts::new(f.name, f.help), f.labels).expect("valid metric"))
    }

    fn histogram(&self, f: &Family, buckets: &[f64]) -> Histogram {
        let opts = HistogramOpts::new(f.name, f.help).buckets(buckets.to_vec());
        self.add(Histogram::with_opts(opts).expect("valid metric"))
    }
}

impl Metrics {
    pub fn new(config: &Config) -> Arc<Metrics> {
        let registry = Registry::new();
        let r = Registrar(&registry);
        let metrics = Metrics {
            relay: config.relay_domains(),
            accepted: r.counter(&ACCEPTED),
            rejected: r.counter_vec(&REJECTED),
            attempts: r.counter_vec(&ATTEMPTS),
            delivered: r.counter_vec(&DELIVERED),
            failed: r.counter_vec(&FAILED),
            dsn_sent: r.counter_vec(&DSN_SENT),
            primary_up: r.gauge_vec(&PRIMARY_UP),
            primary_last_change: r.gauge_vec(&PRIMARY_LAST_CHANGE),
            domain_paused: r.gauge_vec(&DOMAIN_PAUSED),
            delivery_connections: r.gauge_vec(&DELIVERY_CONNECTIONS),
            sessions: r.gauge(&SESSIONS),
            delivery_seconds: r.histogram(&DELIVERY_SECONDS, DELIVERY_BUCKETS),
            commit_seconds: r.histogram(&COMMIT_SECONDS, COMMIT_BUCKETS),
            loops: r.counter_vec(&LOOPS),
            lines_broken: r.counter_vec(&LINES_BROKEN),
            converted: r.counter_vec(&CONVERTED),
            callouts: r.counter_vec(&CALLOUTS),
            queue_messages: r.gauge_vec(&QUEUE_MESSAGES),
            queue_bytes: r.gauge(&QUEUE_BYTES),
            oldest_age: r.float_gauge_vec(&OLDEST_AGE),
            dead_letters: r.gauge(&DEAD_LETTERS),
            quarantined: r.gauge(&QUARANTINED),
            dnsbl_errors: dnsbl_errors(&registry, config),
            fetch_runs: r.counter_vec(&FETCH_RUNS),
            fetched: r.counter_vec(&FETCHED),
            fetch_last_success: r.gauge_vec(&FETCH_LAST_SUCCESS),
            accounts: config.fetch.iter().map(|f| f.name.clone()).collect(),
            registry,
        };
        metrics.start_at_zero();
        Arc::new(metrics)
    }

    /// Every series a dashboard needs exists from the start, at zero.
    fn start_at_zero(&self) {
        for label in self.labels() {
            self.queue_messages.with_label_values(&[label]).set(0);
            self.delivery_connections.with_label_values(&[label]).set(0);
            self.oldest_age.with_label_values(&[label]).set(0.0);
            self.delivered.with_label_values(&[label]);
            self.loops.with_label_values(&[label]);
            self.lines_broken.with_label_values(&[label]);
            self.converted.with_label_values(&[label]);
            for result in ["delivered", "deferred", "failed", "suspended"] {
                self.attempts.with_label_values(&[label, result]);
            }
            for reason in Failure::ALL {
                self.failed.with_label_values(&[label, reason.label()]);
            }
        }
        for name in self.relay.names() {
            self.primary_up.with_label_values(&[name]).set(1);
            self.domain_paused.with_label_values(&[name]).set(0);
        }
        for reason in Rejection::ALL {
            self.rejected.with_label_values(&[reason.label()]);
        }
        for kind in ["failed", "delayed", "relayed"] {
            self.dsn_sent.with_label_values(&[kind]);
        }
        for account in &self.accounts {
            for result in FETCH_RESULTS {
                self.fetch_runs
                    .with_label_values(&[account.as_str(), result]);
            }
            self.fetched.with_label_values(&[account]);
            self.fetch_last_success.with_label_values(&[account]).set(0);
        }
    }

    /// Every `domain` label value: the configured domains, then "other".
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.relay.labels()
    }

    /// The label of a recipient domain: its configured domain, or "other".
    pub fn label(&self, domain: &str) -> &str {
        self.relay.label(domain)
    }

    /// The same mapping for the spool's per-label totals.
    pub fn labeler(&self) -> Labeler {
        let relay = self.relay.clone();
        Arc::new(move |domain: &str| relay.label(domain).to_owned())
    }

    /// The open-connections gauge of the configured domain `domain` belongs
    /// to (`other` for the rest, shared: only ever incremented and decremented).
    pub fn connections(&self, domain: &str) -> IntGauge {
        self.delivery_connections
            .with_label_values(&[self.label(domain)])
    }

    /// Counts an SMTP refusal.
    pub fn reject(&self, reason: Rejection) {
        self.rejected.with_label_values(&[reason.label()]).inc();
    }

    pub fn observe_commit(&self, elapsed: Duration) {
        self.commit_seconds.observe(elapsed.as_secs_f64());
    }

    /// The Prometheus text exposition, with the queue gauges set from
    /// `queue` (the spool's totals, read just before).
    pub fn render(&self, queue: &QueueGauges, now_ms: u64) -> String {
        for label in self.labels() {
            self.queue_messages.with_label_values(&[label]).set(0);
            self.oldest_age.with_label_values(&[label]).set(0.0);
        }
        for (label, messages, oldest) in &queue.by_label {
            self.queue_messages
                .with_label_values(&[label])
                .set(*messages as i64);
            let age = oldest.map_or(0.0, |arrived| {
                now_ms.saturating_sub(arrived) as f64 / 1000.0
            });
            self.oldest_age.with_label_values(&[label]).set(age);
        }
        self.queue_bytes.set(queue.queued_bytes as i64);
        self.dead_letters.set(queue.dead as i64);
        self.quarantined.set(queue.quarantined as i64);
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// `mxspool_dnsbl_lookup_errors_total{zone}`, a series per configured list
/// from the start (zones come from the config: the label stays bounded).
fn dnsbl_errors(registry: &Registry, config: &Config) -> IntCounterVec {
    let errors = IntCounterVec::new(
        Opts::new(
            "mxspool_dnsbl_lookup_errors_total",
            "DNS list lookups that failed or timed out, taken as not listed",
        ),
        &["zone"],
    )
    .expect("valid metric");
    registry
        .register(Box::new(errors.clone()))
        .expect("unique metric");
    for list in config.server.dnsbl.iter().chain(&config.server.dnswl) {
        errors.with_label_values(&[&list.zone]);
    }
    errors
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn labels_are_configured_domains_or_other() {
        let config = Config::parse(
            "[server]\nhostname = \"mx2.example.net\"\n\
             [[domain]]\nname = \"example.com\"\n\
             [[domain]]\nname = \"example.org\"\ninclude_subdomains = true\n",
            Path::new("test.toml"),
        )
        .unwrap();
        let metrics = Metrics::new(&config);
        let labeler = metrics.labeler();
        for (domain, want) in [
            ("example.com", "example.com"),
            ("EXAMPLE.com.", "example.com"),
            ("sub.example.com", OTHER),
            ("a.b.example.org", "example.org"),
            ("badexample.org", OTHER),
            ("gmail.com", OTHER),
        ] {
            assert_eq!(metrics.label(domain), want, "{domain}");
            assert_eq!(labeler(domain), want, "{domain}");
        }
        assert_eq!(
            metrics.labels().collect::<Vec<_>>(),
            ["example.com", "example.org", OTHER]
        );
    }
}
