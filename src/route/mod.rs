//! (4) Where: which hosts to hand a destination's mail to.
//!
//! [`plan`] is a pure function from MX records and our own names to the
//! exchanges to try (RFC 5321 §5.1: only hosts strictly better than us, or all
//! if we are not listed; none if we are the best, which is a loop). [`Router`]
//! adds the static routes of the configuration and turns exchanges into
//! addresses through the resolver. Routing never talks SMTP.

mod resolver;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::config::{Config, DomainConfig, Route, RouteHost};
use crate::domain::RelayDomains;
use crate::outbound;
pub use crate::outbound::Hop;
use crate::status::Status;
use resolver::normalise;
pub use resolver::{Dns, Patience};

/// Our own names: `server.hostname` and `also_known_as`, lower-case.
#[derive(Clone, Debug)]
pub struct Identity {
    pub names: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mx {
    pub preference: u16,
    /// Lower-case, without a trailing dot; "" for the null MX's ".".
    pub exchange: String,
}

/// What DNS said about a domain's MX records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MxAnswer {
    Records(Vec<Mx>),
    /// The name exists but has no MX: its own A/AAAA is the implicit MX.
    NoRecords,
    /// NXDOMAIN.
    NoSuchDomain,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// DNS is not answering properly (SERVFAIL, timeout, refused).
    #[error("DNS failure: {0}")]
    Dns(String),
    /// We are the best MX: delivering would send the mail back to ourselves.
    #[error("mail for this domain loops back to myself (we are its best MX)")]
    Loop,
    /// There are hosts to try, but none has an address.
    #[error("no address found for any mail exchanger")]
    NoAddresses,
    #[error("the domain does not exist (NXDOMAIN)")]
    NoSuchDomain,
    /// RFC 7505: the domain accepts no mail.
    #[error("the domain accepts no mail (null MX)")]
    NullMx,
}

impl RouteError {
    pub fn is_permanent(&self) -> bool {
        matches!(self, RouteError::NoSuchDomain | RouteError::NullMx)
    }

    /// RFC 3463 status for notices and logs.
    pub fn status(&self) -> Status {
        match self {
            RouteError::Dns(_) => Status::transient(4, 3),
            RouteError::Loop => Status::transient(4, 6),
            RouteError::NoAddresses => Status::transient(4, 4),
            RouteError::NoSuchDomain => Status::permanent(1, 2),
            RouteError::NullMx => Status::permanent(1, 10),
        }
    }
}

/// Most hosts one delivery tries before giving up for this round.
const MAX_HOPS: usize = 10;

/// The exchanges to try for `domain`, best first. `shuffle` randomises the
/// order among equal preferences (RFC 5321 §5.1); tests pass a fixed order.
pub fn plan(
    domain: &str,
    answer: &MxAnswer,
    me: &Identity,
    shuffle: &mut dyn FnMut(&mut [Mx]),
) -> Result<Vec<String>, RouteError> {
    let records = match answer {
        MxAnswer::NoSuchDomain => return Err(RouteError::NoSuchDomain),
        MxAnswer::NoRecords => return Ok(vec![normalise(domain)]),
        MxAnswer::Records(records) => records,
    };
    let is_root = |r: &Mx| r.exchange.is_empty() || r.exchange == ".";
    // RFC 7505: a lone "." means no mail. Beside real hosts it is a mistake
    // to step over, not a reason to refuse the domain.
    if records.iter().all(is_root) {
        return Err(RouteError::NullMx);
    }
    let records: Vec<Mx> = records.iter().filter(|r| !is_root(r)).cloned().collect();
    let records = &records;
    let ours = |name: &str| me.names.iter().any(|n| normalise(n) == normalise(name));
    let own_preference = records
        .iter()
        .filter(|r| ours(&r.exchange))
        .map(|r| r.preference)
        .min();
    let mut usable: Vec<Mx> = records
        .iter()
        .filter(|r| own_preference.is_none_or(|own| r.preference < own))
        .filter(|r| !ours(&r.exchange))
        .cloned()
        .collect();
    if usable.is_empty() {
        return Err(RouteError::Loop);
    }
    usable.sort_by_key(|r| r.preference);
    let mut start = 0;
    while start < usable.len() {
        let end = start
            + usable[start..]
                .iter()
                .take_while(|r| r.preference == usable[start].preference)
                .count();
        shuffle(&mut usable[start..end]);
        start = end;
    }
    let mut hosts: Vec<String> = Vec::new();
    for r in usable {
        if !hosts.contains(&r.exchange) {
            hosts.push(r.exchange);
        }
    }
    Ok(hosts)
}

/// Resolves destinations to hops.
pub struct Router {
    dns: Dns,
    identity: Identity,
    /// SMTP port of MX hosts (`delivery.port`).
    port: u16,
}

impl Router {
    /// The router `config` describes: its nameservers, our names
    /// (`server.hostname`, `also_known_as`) and the delivery port.
    pub fn for_config(config: &Config) -> Result<Router, RouteError> {
        let mut names = vec![config.server.hostname.clone()];
        names.extend(config.server.also_known_as.iter().cloned());
        Router::new(
            &config.delivery.nameservers,
            Identity { names },
            config.delivery.port,
        )
    }

    pub fn new(
        nameservers: &[SocketAddr],
        identity: Identity,
        port: u16,
    ) -> Result<Router, RouteError> {
        Ok(Router {
            dns: Dns::new(nameservers)?,
            identity,
            port,
        })
    }

    /// The hosts to try for `domain`, best first: the static route if given,
    /// otherwise the MX plan, each exchange with its addresses.
    pub async fn hops(&self, domain: &str, route: Option<&Route>) -> Result<Vec<Hop>, RouteError> {
        let (names, port) = match route {
            Some(Route {
                host: RouteHost::Ip(ip),
                port,
            }) => {
                return Ok(vec![Hop {
                    name: ip.to_string(),
                    addr: SocketAddr::new(*ip, *port),
                }]);
            }
            Some(Route {
                host: RouteHost::Name(name),
                port,
            }) => (vec![name.clone()], *port),
            None => {
                let answer = self.dns.mx(domain).await?;
                let names = plan(domain, &answer, &self.identity, &mut |slice| {
                    fastrand::shuffle(slice)
                })?;
                (names, self.port)
            }
        };
        let mut hops = Vec::new();
        let mut dns_error = None;
        for name in names {
            match self.dns.ips(&name).await {
                Ok(ips) => hops.extend(ips.into_iter().map(|ip| Hop {
                    name: name.clone(),
                    addr: SocketAddr::new(ip, port),
                })),
                // One broken exchange must not hide the others.
                Err(e) => dns_error = Some(e),
            }
            if hops.len() >= MAX_HOPS {
                break;
            }
        }
        hops.truncate(MAX_HOPS);
        if hops.is_empty() {
            return Err(dns_error.unwrap_or(RouteError::NoAddresses));
        }
        Ok(hops)
    }

    /// The addresses `hops` would use, to recognise the primary connecting to us.
    pub async fn addresses(
        &self,
        domain: &str,
        route: Option<&Route>,
    ) -> Result<Vec<IpAddr>, RouteError> {
        Ok(self
            .hops(domain, route)
            .await?
            .into_iter()
            .map(|h| h.addr.ip().to_canonical())
            .collect())
    }
}

/// How to reach one destination: its static route, if any, and the client
/// settings (the TLS policy may differ per domain).
pub struct Destination {
    pub route: Option<Route>,
    pub settings: outbound::Settings,
}

/// Every configured domain's route and client settings.
pub struct Destinations {
    pub configured: Vec<DomainConfig>,
    /// `configured`'s names: which of them a destination belongs to.
    pub relay: RelayDomains,
    /// Client settings for destinations without an override.
    pub default_settings: outbound::Settings,
}

impl Destinations {
    /// `config`'s domains, reached with `settings` (tests shorten timeouts
    /// and add roots), `delivery.tls` and `delivery.line_length_limit`.
    pub fn for_config(config: &Config, settings: outbound::Settings) -> Self {
        Destinations::new(
            config.domains.clone(),
            outbound::Settings {
                tls: config.delivery.tls,
                line_length_limit: config.delivery.line_length_limit,
                ..settings
            },
        )
    }

    pub fn new(configured: Vec<DomainConfig>, default_settings: outbound::Settings) -> Self {
        Destinations {
            relay: RelayDomains::new(configured.iter().map(DomainConfig::relay)),
            configured,
            default_settings,
        }
    }

    /// How to reach `domain`: the route and TLS override of the configured
    /// domain it belongs to (exactly, or as a subdomain), if any.
    pub fn get(&self, domain: &str) -> Arc<Destination> {
        let configured = self
            .relay
            .covering(domain)
            .and_then(|r| self.configured.iter().find(|d| r.name == *d.name));
        let mut settings = self.default_settings.clone();
        if let Some(tls) = configured.and_then(|d| d.tls) {
            settings.tls = tls;
        }
        Arc::new(Destination {
            route: configured.and_then(|d| d.route.clone()),
            settings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Identity {
        Identity {
            names: vec!["mx2.example.net".into(), "backup.example.net".into()],
        }
    }

    fn mx(records: &[(u16, &str)]) -> MxAnswer {
        MxAnswer::Records(
            records
                .iter()
                .map(|(p, e)| Mx {
                    preference: *p,
                    exchange: normalise(e),
                })
                .collect(),
        )
    }

    fn keep(_: &mut [Mx]) {}

    #[test]
    fn plans() {
        let cases: &[(MxAnswer, Result<Vec<&str>, RouteError>)] = &[
            // Sorted by preference.
            (
                mx(&[(20, "b.example.com"), (10, "a.example.com")]),
                Ok(vec!["a.example.com", "b.example.com"]),
            ),
            // We are listed at 20: only strictly better hosts.
            (
                mx(&[
                    (10, "mx1.example.com"),
                    (20, "mx2.example.net"),
                    (30, "mx3.example.com"),
                ]),
                Ok(vec!["mx1.example.com"]),
            ),
            // Listed twice: our best preference counts.
            (
                mx(&[
                    (10, "mx1.example.com"),
                    (15, "BACKUP.example.net."),
                    (12, "mx12.example.com"),
                    (20, "mx2.example.net"),
                ]),
                Ok(vec!["mx1.example.com", "mx12.example.com"]),
            ),
            // We are the best, alone or tied.
            (
                mx(&[(10, "mx2.example.net"), (20, "mx3.example.com")]),
                Err(RouteError::Loop),
            ),
            (
                mx(&[(10, "mx2.example.net"), (10, "mx1.example.com")]),
                Err(RouteError::Loop),
            ),
            (mx(&[(5, "mx2.example.net.")]), Err(RouteError::Loop)),
            // Not listed: all hosts.
            (
                mx(&[(30, "c.example.com"), (10, "a.example.com")]),
                Ok(vec!["a.example.com", "c.example.com"]),
            ),
            // Null MX.
            (mx(&[(0, ".")]), Err(RouteError::NullMx)),
            (
                mx(&[(0, "."), (10, "a.example.com")]),
                Ok(vec!["a.example.com"]),
            ),
            (MxAnswer::NoRecords, Ok(vec!["example.com"])),
            (MxAnswer::NoSuchDomain, Err(RouteError::NoSuchDomain)),
        ];
        for (answer, want) in cases {
            let got = plan("Example.COM.", answer, &me(), &mut keep);
            let want: Result<Vec<String>, RouteError> = want
                .clone()
                .map(|v| v.into_iter().map(String::from).collect());
            assert_eq!(got, want, "{answer:?}");
        }
    }

    #[test]
    fn ties_are_shuffled_only_within_a_preference() {
        let answer = mx(&[
            (10, "a.example.com"),
            (10, "b.example.com"),
            (20, "c.example.com"),
            (20, "d.example.com"),
        ]);
        let got = plan("example.com", &answer, &me(), &mut |slice| slice.reverse()).unwrap();
        assert_eq!(
            got,
            [
                "b.example.com",
                "a.example.com",
                "d.example.com",
                "c.example.com"
            ]
        );
    }

    #[test]
    fn errors_say_whether_they_are_permanent() {
        assert!(RouteError::NoSuchDomain.is_permanent());
        assert!(RouteError::NullMx.is_permanent());
        for temporary in [
            RouteError::Dns("x".into()),
            RouteError::Loop,
            RouteError::NoAddresses,
        ] {
            assert!(!temporary.is_permanent());
            assert_eq!(temporary.status().class(), 4);
        }
    }
}
