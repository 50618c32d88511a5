//! A thin wrapper over hickory's resolver that answers in plain types and
//! tells "this name does not exist" (permanent) from "DNS is not answering"
//! (temporary). Nothing here knows about MX preferences or about us.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::rdata::TLSA;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::{Resolver, TokioResolver};

use super::{Mx, MxAnswer, RouteError};
use crate::domain::Domain;

/// How long one query may take, and how often it is tried.
#[derive(Clone, Copy, Debug)]
pub struct Patience {
    pub timeout: Duration,
    pub attempts: usize,
}

/// Delivery's: a slow answer only delays mail that waits anyway.
const DELIVERY: Patience = Patience {
    timeout: Duration::from_secs(5),
    attempts: 2,
};
/// Negative answers are cached briefly: a DNS fix should be seen soon.
const NEGATIVE_TTL: Duration = Duration::from_secs(5);

pub struct Dns {
    resolver: TokioResolver,
}

impl Dns {
    /// `nameservers` empty: the system's configuration (/etc/resolv.conf).
    pub fn new(nameservers: &[SocketAddr]) -> Result<Dns, RouteError> {
        Dns::with_patience(nameservers, DELIVERY)
    }

    /// [`Dns::new`] with its own timeout: a client waiting at RCPT cannot
    /// wait as long as delivery can. Answers are cached for their TTL (and
    /// negative ones briefly), in a cache of hickory's default size.
    pub fn with_patience(
        nameservers: &[SocketAddr],
        patience: Patience,
    ) -> Result<Dns, RouteError> {
        let mut builder = if nameservers.is_empty() {
            Resolver::builder_tokio()
                .map_err(|e| RouteError::Dns(format!("resolver setup: {e}")))?
        } else {
            let servers = nameservers
                .iter()
                .map(|addr| {
                    let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                    for connection in &mut server.connections {
                        connection.port = addr.port();
                    }
                    server
                })
                .collect();
            Resolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let options = builder.options_mut();
        options.timeout = patience.timeout;
        options.attempts = patience.attempts;
        options.negative_max_ttl = Some(NEGATIVE_TTL);
        // Names are always absolute here: no search-list expansion.
        options.ndots = 0;
        let resolver = builder
            .build()
            .map_err(|e| RouteError::Dns(format!("resolver setup: {e}")))?;
        Ok(Dns { resolver })
    }

    /// hickory's resolver itself, for a library that takes one (SPF).
    pub fn resolver(&self) -> TokioResolver {
        self.resolver.clone()
    }

    pub async fn mx(&self, domain: &str) -> Result<MxAnswer, RouteError> {
        match self.resolver.mx_lookup(fqdn(domain)).await {
            Ok(lookup) => {
                let records: Vec<Mx> = lookup
                    .answers()
                    .iter()
                    .filter_map(|record| match &record.data {
                        RData::MX(mx) => Some(Mx {
                            preference: mx.preference,
                            exchange: normalise(&mx.exchange.to_ascii()),
                        }),
                        _ => None,
                    })
                    .collect();
                Ok(if records.is_empty() {
                    MxAnswer::NoRecords
                } else {
                    MxAnswer::Records(records)
                })
            }
            Err(e) if e.is_nx_domain() => Ok(MxAnswer::NoSuchDomain),
            Err(e) if e.is_no_records_found() => Ok(MxAnswer::NoRecords),
            Err(e) => Err(temporary(domain, "MX", &e)),
        }
    }

    /// A and AAAA addresses of `name`; a name without any is an empty list.
    pub async fn ips(&self, name: &str) -> Result<Vec<IpAddr>, RouteError> {
        match self.resolver.lookup_ip(fqdn(name)).await {
            Ok(lookup) => Ok(lookup.iter().collect()),
            Err(e) if e.is_no_records_found() => Ok(Vec::new()),
            Err(e) => Err(temporary(name, "A/AAAA", &e)),
        }
    }
}

impl Dns {
    /// The IPv4 addresses `name` has; none (NXDOMAIN, no A records) is an
    /// empty list, not an error.
    pub async fn ipv4(&self, name: &str) -> Result<Vec<Ipv4Addr>, RouteError> {
        match self.resolver.lookup(fqdn(name), RecordType::A).await {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|record| match &record.data {
                    RData::A(a) => Some(a.0),
                    _ => None,
                })
                .collect()),
            Err(e) if e.is_no_records_found() => Ok(Vec::new()),
            Err(e) => Err(temporary(name, "A", &e)),
        }
    }
}

impl Dns {
    /// The TXT records of `name`, each one's strings joined (RFC 7208 §3.3,
    /// RFC 8461 §3.1); none (NXDOMAIN, no TXT) is an empty list.
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, RouteError> {
        match self.resolver.lookup(fqdn(name), RecordType::TXT).await {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|record| match &record.data {
                    RData::TXT(txt) => Some(
                        txt.txt_data
                            .iter()
                            .map(|part| String::from_utf8_lossy(part))
                            .collect(),
                    ),
                    _ => None,
                })
                .collect()),
            Err(e) if e.is_no_records_found() => Ok(Vec::new()),
            Err(e) => Err(temporary(name, "TXT", &e)),
        }
    }

    /// The TLSA records of `name` (RFC 6698), e.g. `_25._tcp.mx2.example.net`;
    /// none is an empty list.
    pub async fn tlsa(&self, name: &str) -> Result<Vec<TLSA>, RouteError> {
        match self.resolver.lookup(fqdn(name), RecordType::TLSA).await {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|record| match &record.data {
                    RData::TLSA(tlsa) => Some(tlsa.clone()),
                    _ => None,
                })
                .collect()),
            Err(e) if e.is_no_records_found() => Ok(Vec::new()),
            Err(e) => Err(temporary(name, "TLSA", &e)),
        }
    }
}

fn temporary(name: &str, what: &str, e: &NetError) -> RouteError {
    RouteError::Dns(format!("{what} lookup of {name} failed: {e}"))
}

fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_owned()
    } else {
        format!("{name}.")
    }
}

/// Normalised as a [`Domain`]: lower-case, without the trailing dot ("."
/// itself becomes "").
pub(super) fn normalise(name: &str) -> String {
    Domain::new(name).into()
}
