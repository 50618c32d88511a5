//! DNS blocklists and allowlists: is the client listed, and does its summed
//! weight reach `dnsbl_threshold`?
//!
//! The lookups start when the client connects, in parallel with our greeting,
//! and the verdict is consulted at RCPT ([`Screen::verdict`] waits for lookups
//! still running, never longer than [`LOOKUP_LIMIT`]). A list that does not
//! answer in time, or answers with an error, counts as "not listed" (fail
//! open: a broken list must not stop mail) and is counted in
//! `mxspool_dnsbl_lookup_errors_total{zone}`. Answers are cached for their
//! TTL by the resolver.
//!
//! The pure part (the query name, which answers count, the score) is what the
//! tests here aim at; the session only learns the verdict, never waits on DNS.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{Instrument, debug, info, warn};

use crate::config::{DnsList, ServerConfig};
use crate::metrics::Metrics;
use crate::route::{Dns, Patience, RouteError};

/// Longest the lookups of one client may take, all lists together.
pub const LOOKUP_LIMIT: Duration = Duration::from_secs(3);

/// One query's patience: a retry fits inside [`LOOKUP_LIMIT`].
const PATIENCE: Patience = Patience {
    timeout: Duration::from_millis(1400),
    attempts: 2,
};

/// What the configuration says about DNS lists; part of the reloadable policy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Lists {
    /// `dnsbl`, then `dnswl`: one weight each.
    lists: Vec<DnsList>,
    /// How many of `lists` are `dnsbl`; the rest are `dnswl`.
    blocklists: usize,
    threshold: i32,
    /// `trusted`: never looked up.
    trusted: Vec<IpNet>,
}

/// Why a client is refused: it reached the threshold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    /// The listing blocklist with the greatest weight: what the reply names.
    pub zone: String,
    pub score: i32,
}

impl Lists {
    pub fn from_config(server: &ServerConfig) -> Lists {
        Lists {
            lists: server.dnsbl.iter().chain(&server.dnswl).cloned().collect(),
            blocklists: server.dnsbl.len(),
            threshold: server.dnsbl_threshold,
            trusted: server.trusted.clone(),
        }
    }

    /// Whether `ip` is a partner relay from `trusted`.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted.iter().any(|n| n.contains(&ip))
    }

    /// Whether the lists are to be consulted about `ip` at all.
    pub fn apply_to(&self, ip: IpAddr) -> bool {
        !self.lists.is_empty() && !self.trusts(ip)
    }

    /// Whether any `dnswl` zone lists the client, by every list's answers:
    /// such a client skips greylisting.
    pub fn allowlisted(&self, answers: &[Vec<Ipv4Addr>]) -> bool {
        self.lists
            .iter()
            .zip(answers)
            .skip(self.blocklists)
            .any(|(list, answers)| listed(list, answers))
    }

    /// The verdict from every list's answers (`answers[i]` belongs to the
    /// i-th list; empty: not listed, or the lookup failed).
    pub fn decide(&self, answers: &[Vec<Ipv4Addr>]) -> Option<Blocked> {
        let mut score: i32 = 0;
        let mut decider: Option<&DnsList> = None;
        for (list, answers) in self.lists.iter().zip(answers) {
            if !listed(list, answers) {
                continue;
            }
            score = score.saturating_add(list.weight);
            if list.weight > 0 && decider.is_none_or(|d| list.weight > d.weight) {
                decider = Some(list);
            }
        }
        let decider = decider?;
        (score >= self.threshold).then(|| Blocked {
            zone: decider.zone.clone(),
            score,
        })
    }
}

/// The name to look up for `ip` in `zone` (RFC 5782 §2.1, §2.4): IPv4 octets
/// reversed, IPv6 as 32 reversed nibbles.
pub fn query_name(ip: IpAddr, zone: &str) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}.{zone}")
        }
        IpAddr::V6(v6) => {
            let mut name = String::with_capacity(64 + zone.len());
            for byte in v6.octets().iter().rev() {
                for nibble in [byte & 0x0f, byte >> 4] {
                    name.push(char::from_digit(u32::from(nibble), 16).unwrap_or('0'));
                    name.push('.');
                }
            }
            name.push_str(zone);
            name
        }
    }
}

/// Whether a list's answers list the client. With a filter, an answer must
/// match it. Without one, any answer in 127.0.0.0/8 counts (RFC 5782 §2.3)
/// except 127.255.255.0/24, which lists such as Spamhaus use to say "your
/// query was refused" (an open resolver, over quota): that is not a listing.
pub fn listed(list: &DnsList, answers: &[Ipv4Addr]) -> bool {
    answers.iter().any(|&a| match &list.filter {
        Some(filter) => filter.matches(a),
        None => {
            let [first, second, third, _] = a.octets();
            first == 127 && (second, third) != (255, 255)
        }
    })
}

/// Looks clients up in the configured lists.
pub struct Lookups {
    dns: Arc<Dns>,
    metrics: Arc<Metrics>,
}

impl Lookups {
    /// Asks the same nameservers as delivery (`delivery.nameservers`).
    pub fn new(nameservers: &[SocketAddr], metrics: Arc<Metrics>) -> Result<Lookups, RouteError> {
        Ok(Lookups {
            dns: Arc::new(Dns::with_patience(nameservers, PATIENCE)?),
            metrics,
        })
    }

    /// Starts looking `ip` up in `lists`, unless they do not apply to it
    /// (none configured, or a trusted client).
    pub fn start(&self, ip: IpAddr, lists: &Arc<Lists>) -> Screen {
        if !lists.apply_to(ip) {
            return Screen::Known(Verdict::default());
        }
        let dns = self.dns.clone();
        let metrics = self.metrics.clone();
        let lists = lists.clone();
        Screen::Pending(tokio::spawn(
            async move {
                let answers = lookup_all(&dns, &metrics, ip, &lists).await;
                Verdict {
                    blocked: lists.decide(&answers),
                    allowlisted: lists.allowlisted(&answers),
                }
            }
            .in_current_span(),
        ))
    }
}

/// Every list's answers for `ip`, queried in parallel; a list that failed or
/// did not answer within [`LOOKUP_LIMIT`] has none, and is counted. Failures
/// are logged at debug only: a list that is down fails for every client, and
/// the counter is what an alert should watch.
async fn lookup_all(
    dns: &Arc<Dns>,
    metrics: &Metrics,
    ip: IpAddr,
    lists: &Lists,
) -> Vec<Vec<Ipv4Addr>> {
    let deadline = tokio::time::Instant::now() + LOOKUP_LIMIT;
    let mut queries = JoinSet::new();
    for (i, list) in lists.lists.iter().enumerate() {
        let dns = dns.clone();
        let name = query_name(ip, &list.zone);
        queries.spawn(async move { (i, dns.ipv4(&name).await) });
    }
    let mut answers: Vec<Option<Vec<Ipv4Addr>>> = vec![None; lists.lists.len()];
    while let Ok(Some(done)) = tokio::time::timeout_at(deadline, queries.join_next()).await {
        let Ok((i, result)) = done else { continue };
        let (Some(list), Some(slot)) = (lists.lists.get(i), answers.get_mut(i)) else {
            continue;
        };
        match result {
            Ok(found) => {
                debug!(zone = %list.zone, answers = ?found, "DNS list answered");
                *slot = Some(found);
            }
            Err(e) => {
                debug!(zone = %list.zone, error = %e, "DNS list lookup failed; taken as not listed");
                metrics.dnsbl_errors.with_label_values(&[&list.zone]).inc();
                *slot = Some(Vec::new());
            }
        }
    }
    // Dropping the set cancels what is still running.
    for (list, answer) in lists.lists.iter().zip(&answers) {
        if answer.is_none() {
            debug!(zone = %list.zone, "DNS list did not answer in time; taken as not listed");
            metrics.dnsbl_errors.with_label_values(&[&list.zone]).inc();
        }
    }
    answers.into_iter().map(Option::unwrap_or_default).collect()
}

/// What the DNS lists said about one client.
#[derive(Clone, Debug, Default)]
pub struct Verdict {
    /// Refused: the score reached the threshold.
    pub blocked: Option<Blocked>,
    /// A `dnswl` zone lists it.
    pub allowlisted: bool,
}

/// The DNS list verdict on one client: pending while the lookups run.
/// Dropping it (the client left) cancels them.
pub enum Screen {
    Pending(JoinHandle<Verdict>),
    Known(Verdict),
}

impl Screen {
    /// The verdict, waiting for the lookups if they still run (they end
    /// within [`LOOKUP_LIMIT`]). `None`: not refused.
    pub async fn verdict(&mut self) -> Option<&Blocked> {
        if let Screen::Pending(handle) = self {
            let verdict = handle.await.unwrap_or_else(|e| {
                warn!(error = %e, "DNS list lookups ended abnormally; taken as not listed");
                Verdict::default()
            });
            if let Some(blocked) = &verdict.blocked {
                info!(zone = %blocked.zone, score = blocked.score, "client listed");
            }
            *self = Screen::Known(verdict);
        }
        match self {
            Screen::Known(verdict) => verdict.blocked.as_ref(),
            Screen::Pending(_) => None,
        }
    }

    /// Whether a `dnswl` zone lists the client; false until [`Screen::verdict`]
    /// has the answers.
    pub fn allowlisted(&self) -> bool {
        matches!(self, Screen::Known(v) if v.allowlisted)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        if let Screen::Pending(handle) = self {
            handle.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DnsListKind;

    fn lists(block: &[&str], allow: &[&str], threshold: i32) -> Lists {
        let parse = |kind| move |t: &&str| DnsList::parse(t, kind).unwrap();
        Lists {
            lists: block
                .iter()
                .map(parse(DnsListKind::Block))
                .chain(allow.iter().map(parse(DnsListKind::Allow)))
                .collect(),
            blocklists: block.len(),
            threshold,
            trusted: vec!["198.51.100.0/24".parse().unwrap()],
        }
    }

    fn ips(list: &[&str]) -> Vec<Ipv4Addr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn query_names_reverse_the_address() {
        for (ip, want) in [
            ("192.0.2.99", "99.2.0.192.zen.example"),
            ("::ffff:192.0.2.99", "99.2.0.192.zen.example"),
            (
                "2001:db8:1:2:3:4:567:89ab",
                "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.zen.example",
            ),
        ] {
            assert_eq!(query_name(ip.parse().unwrap(), "zen.example"), want, "{ip}");
        }
    }

    #[test]
    fn which_answers_are_listings() {
        let any = DnsList::parse("bl.example", DnsListKind::Block).unwrap();
        let only2 = DnsList::parse("bl.example=127.0.0.2", DnsListKind::Block).unwrap();
        for (answers, want_any, want_only2) in [
            (&[][..], false, false),
            (&["127.0.0.2"][..], true, true),
            (&["127.0.0.3"][..], true, false),
            (&["127.0.0.3", "127.0.0.2"][..], true, true),
            (&["127.255.255.254"][..], false, false),
            (&["10.0.0.1"][..], false, false),
        ] {
            let answers = ips(answers);
            assert_eq!(listed(&any, &answers), want_any, "{answers:?}");
            assert_eq!(listed(&only2, &answers), want_only2, "{answers:?}");
        }
    }

    #[test]
    fn weights_add_up_to_the_threshold() {
        let two = lists(&["a.example", "b.example"], &[], 2);
        let hit = || ips(&["127.0.0.2"]);
        assert_eq!(two.decide(&[hit(), vec![]]), None);
        assert_eq!(
            two.decide(&[hit(), hit()]),
            Some(Blocked {
                zone: "a.example".into(),
                score: 2
            })
        );
        // The heaviest listing names the refusal.
        let heavy = lists(&["a.example", "b.example*3"], &[], 1);
        assert_eq!(
            heavy.decide(&[hit(), hit()]).map(|b| b.zone),
            Some("b.example".into())
        );
        // An allowlist cancels a listing.
        let wl = lists(&["a.example*2"], &["wl.example*-2"], 1);
        assert_eq!(wl.decide(&[hit(), hit()]), None);
        assert!(wl.decide(&[hit(), vec![]]).is_some());
        // Listed only in an allowlist: never refused.
        assert_eq!(wl.decide(&[vec![], hit()]), None);
        // Fewer answers than lists (cannot happen; still no panic).
        assert_eq!(two.decide(&[]), None);
    }

    #[test]
    fn only_a_dnswl_listing_makes_a_client_allowlisted() {
        let l = lists(&["a.example*-1"], &["wl.example"], 1);
        let hit = || ips(&["127.0.0.2"]);
        assert!(!l.allowlisted(&[vec![], vec![]]));
        assert!(!l.allowlisted(&[hit(), vec![]]));
        assert!(l.allowlisted(&[vec![], hit()]));
        assert!(!l.allowlisted(&[]));
    }

    #[test]
    fn trusted_clients_and_empty_lists_are_not_looked_up() {
        let l = lists(&["a.example"], &[], 1);
        assert!(l.apply_to("192.0.2.1".parse().unwrap()));
        assert!(!l.apply_to("198.51.100.7".parse().unwrap()));
        assert!(!l.apply_to("::ffff:198.51.100.7".parse().unwrap()));
        assert!(!Lists::default().apply_to("192.0.2.1".parse().unwrap()));
    }
}
