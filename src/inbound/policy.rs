//! Who may connect, which recipients we take, and the limits of a session.
//!
//! Built from the configuration (and the recipient files it names) and swapped
//! whole on SIGHUP. Pure lookups: no I/O after construction, no DNS.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use crate::address::is_domain_name;
use crate::config::{Config, ConfigError, GreylistConfig, Spf, UnknownRecipients, WhenPrimaryUp};
use crate::domain::{Domain, RelayDomains};
use crate::inbound::dnsbl::Lists;

#[derive(Debug, Clone)]
pub struct Policy {
    /// Our name in the banner, EHLO reply and `Received:`.
    pub hostname: String,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_received_headers: usize,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    /// Where mail for the bare `<postmaster>` goes (RFC 5321 §4.5.1 requires us to
    /// take it).
    pub postmaster: String,
    /// The relay domains: which one a recipient's domain belongs to.
    relay: RelayDomains,
    /// Whom each relay domain (by name) takes.
    rules: HashMap<Domain, Rules>,
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    etrn_allow: Vec<IpNet>,
    /// DNS lists, their threshold, and the trusted clients never looked up;
    /// shared with the lookups a connection starts.
    pub dnsbl: Arc<Lists>,
    /// How long a primary's last good check counts as "up" for
    /// `when_primary_up = "defer"`: twice `health_interval` (or, with checks
    /// off, twice `probe_interval`).
    pub primary_fresh_for: Duration,
    /// `[greylist]`: the timings for domains with `greylist = true`.
    pub greylist: GreylistConfig,
}

#[derive(Debug, Clone)]
struct Rules {
    /// Lower-cased local parts and addresses; empty means "anyone at the domain".
    recipients: HashSet<String>,
    /// With `verify_recipients`: what to do with never-seen recipients while
    /// the primary is down.
    verify: Option<UnknownRecipients>,
    /// `when_primary_up = "defer"`: RCPT waits while the primary is up.
    defer_when_up: bool,
    spf: Spf,
    /// `greylist = true`: unseen triplets wait `[greylist] delay`.
    greylist: bool,
}

/// Why a recipient is refused; the session turns it into a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not an address we can judge (no domain, empty).
    Syntax,
    /// Not one of our relay domains, or a routing trick in the local part.
    Relay,
    /// A relay domain with a recipient list that does not name this address.
    UnknownUser,
}

impl Policy {
    /// Builds the policy; reads every `recipients_file`, so it is also the reload.
    pub fn from_config(config: &Config) -> Result<Policy, ConfigError> {
        let mut rules = HashMap::new();
        for d in &config.domains {
            let verify = d.verify_recipients.then_some(d.unknown_recipients);
            let recipients = d.load_recipients()?.into_iter().collect();
            let defer_when_up = d.when_primary_up == WhenPrimaryUp::Defer;
            let rules_of = Rules {
                recipients,
                verify,
                defer_when_up,
                spf: d.spf,
                greylist: d.greylist,
            };
            rules.insert(Domain::new(&d.name), rules_of);
        }
        Ok(Policy {
            hostname: config.server.hostname.clone(),
            max_message_size: config.server.max_message_size,
            max_recipients: config.server.max_recipients,
            max_received_headers: config.server.max_received_headers,
            command_timeout: config.server.command_timeout,
            data_timeout: config.server.data_timeout,
            postmaster: config.delivery.postmaster.clone(),
            relay: config.relay_domains(),
            rules,
            allow: config.server.allow.clone(),
            deny: config.server.deny.clone(),
            etrn_allow: config.server.etrn_allow.clone(),
            dnsbl: Arc::new(Lists::from_config(&config.server)),
            primary_fresh_for: 2 * config
                .delivery
                .health_interval
                .unwrap_or(config.delivery.probe_interval),
            greylist: config.greylist,
        })
    }

    /// May this address talk to us at all (`allow` and not `deny`)?
    pub fn admits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.allow.iter().any(|n| n.contains(&ip)) && !self.deny.iter().any(|n| n.contains(&ip))
    }

    pub fn etrn_allowed(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.etrn_allow.iter().any(|n| n.contains(&ip))
    }

    /// The configured relay domain `domain` belongs to, if any.
    pub fn relay_domain(&self, domain: &str) -> Option<&str> {
        self.relay.covering(domain).map(|r| r.name.as_str())
    }

    /// The rules of the relay domain `domain` belongs to, if any.
    fn find(&self, domain: &str) -> Option<&Rules> {
        self.rules.get(&self.relay.covering(domain)?.name)
    }

    /// For an accepted address: whether its domain verifies recipients, and
    /// what it does with unseen ones while the primary is down.
    pub fn verification(&self, address: &str) -> Option<UnknownRecipients> {
        let domain = address.rsplit_once('@').map(|(_, d)| d)?;
        self.find(domain)?.verify
    }

    /// What SPF does for mail to `address` (`Off` outside our domains).
    pub fn spf(&self, address: &str) -> Spf {
        address
            .rsplit_once('@')
            .and_then(|(_, d)| self.find(d))
            .map_or(Spf::Off, |r| r.spf)
    }

    /// For an accepted address: the relay domain it belongs to, if that
    /// domain defers mail while its primary is up (`when_primary_up`).
    pub fn defers_when_up(&self, address: &str) -> Option<&str> {
        let domain = address.rsplit_once('@').map(|(_, d)| d)?;
        let relay = self.relay.covering(domain)?;
        self.rules
            .get(&relay.name)
            .filter(|r| r.defer_when_up)
            .map(|_| relay.name.as_str())
    }

    /// Whether an accepted address belongs to a relay domain that greylists.
    pub fn greylists(&self, address: &str) -> bool {
        let Some((_, domain)) = address.rsplit_once('@') else {
            return false;
        };
        self.relay
            .covering(domain)
            .and_then(|relay| self.rules.get(&relay.name))
            .is_some_and(|r| r.greylist)
    }

    /// Judges a forward path as smtp-proto parsed it (quotes and source route
    /// already stripped). Returns the address to store: local part as sent,
    /// domain lower-cased without a trailing dot.
    pub fn check_recipient(&self, address: &str) -> Result<String, Refusal> {
        let Some((local, domain)) = address.rsplit_once('@') else {
            return Err(Refusal::Syntax);
        };
        let domain = Domain::new(domain);
        if local.is_empty() || domain.is_empty() {
            return Err(Refusal::Syntax);
        }
        let relay = self.find(domain.as_str()).ok_or(Refusal::Relay)?;
        // A subdomain matched by `include_subdomains` may still be no domain
        // name (`a!b.example.org`): delivery could not write it in a path, so
        // taking it would only owe the sender a bounce.
        if !is_domain_name(domain.as_str()) {
            return Err(Refusal::Syntax);
        }
        // `user%other@us`, `other!user@us` and `"user@other"@us` (which arrives as
        // `user@other@us`) ask us to route onward: the classic open-relay tricks.
        if local.contains(['@', '%', '!']) {
            return Err(Refusal::Relay);
        }
        let address = format!("{local}@{domain}");
        // RFC 5321 §4.5.1: postmaster at a domain we take mail for is always valid.
        if !relay.recipients.is_empty() && !local.eq_ignore_ascii_case("postmaster") {
            let lower = address.to_lowercase();
            let local_lower = local.to_lowercase();
            if !relay.recipients.contains(&lower) && !relay.recipients.contains(&local_lower) {
                return Err(Refusal::UnknownUser);
            }
        }
        Ok(address)
    }
}

/// A policy for unit tests: example.com (anyone), example.org with subdomains
/// and the list {alice, bob@example.org}; 192.0.2.0/24 denied; ETRN from loopback.
#[cfg(test)]
pub(crate) fn sample() -> Policy {
    Policy {
        hostname: "mx2.example.net".into(),
        max_message_size: 1000,
        max_recipients: 10,
        max_received_headers: 5,
        command_timeout: Duration::from_secs(300),
        data_timeout: Duration::from_secs(600),
        postmaster: "postmaster@example.net".into(),
        relay: RelayDomains::new([
            crate::domain::RelayDomain::new("example.com", false),
            crate::domain::RelayDomain::new("example.org", true),
        ]),
        rules: [
            (
                Domain::new("example.com"),
                Rules {
                    recipients: HashSet::new(),
                    verify: None,
                    defer_when_up: false,
                    spf: Spf::Off,
                    greylist: false,
                },
            ),
            (
                Domain::new("example.org"),
                Rules {
                    recipients: ["alice".to_string(), "bob@example.org".to_string()]
                        .into_iter()
                        .collect(),
                    verify: None,
                    defer_when_up: false,
                    spf: Spf::Off,
                    greylist: false,
                },
            ),
        ]
        .into(),
        allow: vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()],
        deny: vec!["192.0.2.0/24".parse().unwrap()],
        etrn_allow: vec!["127.0.0.0/8".parse().unwrap()],
        dnsbl: Arc::default(),
        primary_fresh_for: Duration::from_secs(120),
        greylist: GreylistConfig {
            delay: Duration::from_secs(300),
            window: Duration::from_secs(24 * 3600),
            remember: Duration::from_secs(35 * 24 * 3600),
        },
    }
}

/// [`sample`] with example.com verifying recipients (unseen: tempfail).
#[cfg(test)]
pub(crate) fn sample_verifying() -> Policy {
    let mut p = sample();
    let rules = p.rules.get_mut("example.com").expect("in the sample");
    rules.verify = Some(UnknownRecipients::Tempfail);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        sample()
    }

    #[test]
    fn recipients() {
        use Refusal::*;
        let p = policy();
        let cases: &[(&str, Result<&str, Refusal>)] = &[
            ("user@example.com", Ok("user@example.com")),
            ("User@EXAMPLE.com.", Ok("User@example.com")),
            ("user@sub.example.com", Err(Relay)),
            ("user@example.com.evil.net", Err(Relay)),
            ("user@notexample.com", Err(Relay)),
            ("user@example.net", Err(Relay)),
            ("user%other.net@example.com", Err(Relay)),
            ("other.net!user@example.com", Err(Relay)),
            ("user@other.net@example.com", Err(Relay)),
            ("user", Err(Syntax)),
            ("", Err(Syntax)),
            ("@example.com", Err(Syntax)),
            ("alice@example.org", Ok("alice@example.org")),
            ("ALICE@Example.ORG", Ok("ALICE@example.org")),
            (
                "alice@deep.sub.example.org",
                Ok("alice@deep.sub.example.org"),
            ),
            ("bob@example.org", Ok("bob@example.org")),
            ("bob@sub.example.org", Err(UnknownUser)),
            ("carol@example.org", Err(UnknownUser)),
            ("carol@badexample.org", Err(Relay)),
            ("PostMaster@example.org", Ok("PostMaster@example.org")),
        ];
        for (input, want) in cases {
            let got = p.check_recipient(input);
            assert_eq!(got.as_deref(), want.as_ref().map(|s| *s), "{input}");
        }
    }

    #[test]
    fn connection_lists() {
        let p = policy();
        assert!(p.admits("127.0.0.1".parse().unwrap()));
        assert!(p.admits("2001:db8::1".parse().unwrap()));
        assert!(!p.admits("192.0.2.9".parse().unwrap()));
        assert!(!p.admits("::ffff:192.0.2.9".parse().unwrap()));
        assert!(p.etrn_allowed("127.0.0.2".parse().unwrap()));
        assert!(p.etrn_allowed("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!p.etrn_allowed("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn relay_domain_lookup() {
        let p = policy();
        assert_eq!(p.relay_domain("Example.COM."), Some("example.com"));
        assert_eq!(p.relay_domain("a.example.org"), Some("example.org"));
        assert_eq!(p.relay_domain("a.example.com"), None);
    }
}
