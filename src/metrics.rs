//! (7) What Prometheus sees: the counters and histograms every part of the
//! pipeline bumps, and the queue gauges, which are read from the spool's own
//! running totals at scrape time (never from counters that could drift).
//!
//! Label values stay bounded: `domain` is a configured relay domain or
//! "other" (our own notices to the world), and `reason`/`result`/`kind` come
//! from fixed lists.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::config::Config;
pub use crate::domain::OTHER;
use crate::domain::RelayDomains;

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
    /// 1 while a configured domain is paused (by an operator or the drain guard).
    pub domain_paused: IntGaugeVec,
    /// Open delivery connections per destination (see [`Metrics::connections`]).
    delivery_connections: IntGaugeVec,
    pub sessions: IntGauge,
    pub delivery_seconds: Histogram,
    pub commit_seconds: Histogram,
    pub loops: IntCounterVec,
    pub callouts: IntCounterVec,
    queue_messages: IntGaugeVec,
    queue_bytes: IntGauge,
    oldest_age: GaugeVec,
    dead_letters: IntGauge,
    quarantined: IntGauge,
}

/// Why an SMTP client was refused, as counted.
pub const REJECT_REASONS: &[&str] = &[
    "relay",
    "unknown_user",
    "size",
    "too_many_recipients",
    "syntax",
    "loop",
    "spool_full",
    "spool_error",
    "access",
    "limits",
    "timeout",
    "too_many_errors",
    "smtputf8",
    "pipelining",
    "other",
];

impl Metrics {
    pub fn new(config: &Config) -> Arc<Metrics> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let oldest_age = GaugeVec::new(
            Opts::new(
                "mxspool_queue_oldest_age_seconds",
                "Age of the oldest queued message with a recipient at the domain (0: none)",
            ),
            &["domain"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(oldest_age.clone()))
            .expect("unique metric");

        let metrics = Metrics {
            relay: config.relay_domains(),
            accepted: counter(
                "mxspool_messages_accepted_total",
                "Messages accepted and committed to the spool",
            ),
            rejected: counter_vec(
                "mxspool_smtp_rejected_total",
                "SMTP commands, messages and connections refused, by reason",
                &["reason"],
            ),
            attempts: counter_vec(
                "mxspool_delivery_attempts_total",
                "Delivery attempts of a message to a domain, by result",
                &["domain", "result"],
            ),
            delivered: counter_vec(
                "mxspool_recipients_delivered_total",
                "Recipients handed to the next hop",
                &["domain"],
            ),
            failed: counter_vec(
                "mxspool_recipients_failed_total",
                "Recipients given up on, by reason",
                &["domain", "reason"],
            ),
            dsn_sent: counter_vec(
                "mxspool_dsn_sent_total",
                "Delivery status notifications queued, by kind",
                &["kind"],
            ),
            primary_up: gauge_vec(
                "mxspool_primary_up",
                "1 while the domain's primary is reachable (or not known to be down)",
                &["domain"],
            ),
            domain_paused: gauge_vec(
                "mxspool_domain_paused",
                "1 while delivery to the domain is paused, by an operator or the drain guard",
                &["domain"],
            ),
            delivery_connections: gauge_vec(
                "mxspool_delivery_connections",
                "Delivery connections open (or opening) to the domain's primary",
                &["domain"],
            ),
            sessions: gauge("mxspool_smtp_sessions_active", "SMTP sessions in progress"),
            delivery_seconds: histogram(
                "mxspool_delivery_duration_seconds",
                "Time to deliver one message over an open connection",
                vec![
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ],
            ),
            commit_seconds: histogram(
                "mxspool_spool_commit_seconds",
                "Time of one spool transaction including its fsync",
                vec![
                    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                ],
            ),
            loops: counter_vec(
                "mxspool_routing_loops_total",
                "Routing found us to be the best MX of the domain",
                &["domain"],
            ),
            callouts: counter_vec(
                "mxspool_recipient_callouts_total",
                "Recipients checked with a live primary at RCPT time, by verdict",
                &["result"],
            ),
            queue_messages: gauge_vec(
                "mxspool_queue_messages",
                "Queued messages with a recipient waiting at the domain",
                &["domain"],
            ),
            queue_bytes: gauge("mxspool_queue_bytes", "Bytes of queued messages"),
            oldest_age,
            dead_letters: gauge(
                "mxspool_dead_letters",
                "Messages that could neither be delivered nor bounced",
            ),
            quarantined: gauge(
                "mxspool_spool_quarantined",
                "Spool records set aside for an operator: undecodable, or their body missing",
            ),
            registry,
        };
        // Every series a dashboard needs exists from the start, at zero.
        for label in metrics.labels() {
            metrics.queue_messages.with_label_values(&[label]).set(0);
            metrics
                .delivery_connections
                .with_label_values(&[label])
                .set(0);
            metrics.oldest_age.with_label_values(&[label]).set(0.0);
            metrics.delivered.with_label_values(&[label]);
            metrics.loops.with_label_values(&[label]);
            for result in ["delivered", "deferred", "failed", "suspended"] {
                metrics.attempts.with_label_values(&[label, result]);
            }
            for reason in ["rejected", "expired", "routing", "policy"] {
                metrics.failed.with_label_values(&[label, reason]);
            }
        }
        for name in metrics.relay.names() {
            metrics.primary_up.with_label_values(&[name]).set(1);
            metrics.domain_paused.with_label_values(&[name]).set(0);
        }
        for reason in REJECT_REASONS {
            metrics.rejected.with_label_values(&[reason]);
        }
        for kind in ["failed", "delayed", "relayed"] {
            metrics.dsn_sent.with_label_values(&[kind]);
        }
        for verdict in crate::knowledge::Verdict::ALL {
            metrics.callouts.with_label_values(&[verdict.label()]);
        }
        Arc::new(metrics)
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
    pub fn reject(&self, reason: &str) {
        self.rejected.with_label_values(&[reason]).inc();
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
