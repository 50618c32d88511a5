//! Validation: the file layer turned into the typed [`Config`].
//!
//! One method per table (`server`, `delivery`, `domain` …) parses the strings
//! of the file layer into durations, networks, addresses and enums, and checks
//! the ranges. The first problem found is the error, naming the file and the
//! key (`domain[1].route`), so the order of the checks is part of the
//! behaviour. Nothing here reads files besides checking that a domain's
//! `recipients_file` is readable.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use super::file;
use super::{
    BouncePolicy, Config, ConfigError, DeliveryConfig, DnsList, DnsListKind, DomainConfig,
    GreylistConfig, HttpConfig, LogConfig, LogFormat, Route, RouteHost, ServerConfig, Spf,
    SpoolConfig, TlsConfig, TlsPolicy, UnknownRecipients, WhenPrimaryUp,
};
use crate::address::is_domain_name;
use crate::domain::Domain;

/// The smallest `delivery.line_length_limit` but 0: RFC 5322 §2.1.1's 78
/// characters, which no line ever needs to be broken below.
const MIN_LINE_LENGTH_LIMIT: usize = 78;

/// The typed configuration in `f`; `source` names the file in errors.
pub(super) fn config(f: &file::File, source: &Path) -> Result<Config, ConfigError> {
    Validator { source }.config(f)
}

/// Holds the file name that every error names.
pub(super) struct Validator<'a> {
    pub(super) source: &'a Path,
}

impl Validator<'_> {
    pub(super) fn err(&self, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.source.to_owned(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// The tables in file order; the first error found is the one reported.
    fn config(&self, f: &file::File) -> Result<Config, ConfigError> {
        let server = self.server(&f.server)?;
        let tls = f.tls.as_ref().map(|t| self.tls(t)).transpose()?;
        let spool = self.spool(&f.spool)?;
        let delivery = self.delivery(&f.delivery)?;
        let http = self.http(&f.http)?;
        let log = self.log(&f.log)?;
        let greylist = self.greylist(&f.greylist)?;
        let domains = self.domains(&f.domain, delivery.port)?;
        let fetch = self.fetches(&f.fetch, &domains, &delivery.postmaster)?;
        Ok(Config {
            source: self.source.to_owned(),
            server,
            tls,
            spool,
            delivery,
            http,
            log,
            greylist,
            domains,
            fetch,
        })
    }

    fn greylist(&self, g: &file::Greylist) -> Result<GreylistConfig, ConfigError> {
        let delay = self.duration("greylist.delay", &g.delay)?;
        let window = self.duration("greylist.window", &g.window)?;
        let remember = self.duration("greylist.remember", &g.remember)?;
        if window <= delay {
            return Err(self.err(
                "greylist.window",
                "must be longer than greylist.delay (a retry must fit between them)",
            ));
        }
        Ok(GreylistConfig {
            delay,
            window,
            remember,
        })
    }

    fn server(&self, s: &file::Server) -> Result<ServerConfig, ConfigError> {
        let hostname = normalise_name(&s.hostname);
        if !is_domain_name(&hostname) {
            return Err(self.err(
                "server.hostname",
                format!("{:?} is not a host name", s.hostname),
            ));
        }
        let also_known_as = self.also_known_as(&s.also_known_as)?;
        if s.listen.is_empty() {
            return Err(self.err("server.listen", "needs at least one address"));
        }
        let listen = s
            .listen
            .iter()
            .enumerate()
            .map(|(i, a)| self.socket(&format!("server.listen[{i}]"), a, None))
            .collect::<Result<_, _>>()?;
        self.positive("server.max_message_size", s.max_message_size)?;
        self.positive("server.max_recipients", s.max_recipients as u64)?;
        self.positive("server.max_connections", s.max_connections as u64)?;
        self.positive(
            "server.max_connections_per_ip",
            s.max_connections_per_ip as u64,
        )?;
        self.positive("server.max_received_headers", s.max_received_headers as u64)?;
        Ok(ServerConfig {
            hostname,
            also_known_as,
            listen,
            max_message_size: s.max_message_size,
            max_recipients: s.max_recipients,
            max_connections: s.max_connections,
            max_connections_per_ip: s.max_connections_per_ip,
            max_connection_rate_per_ip: s.max_connection_rate_per_ip,
            max_received_headers: s.max_received_headers,
            command_timeout: self.duration("server.command_timeout", &s.command_timeout)?,
            data_timeout: self.duration("server.data_timeout", &s.data_timeout)?,
            allow: self.nets("server.allow", &s.allow)?,
            deny: self.nets("server.deny", &s.deny)?,
            etrn_allow: self.nets("server.etrn_allow", &s.etrn_allow)?,
            trusted: self.nets("server.trusted", &s.trusted)?,
            dnsbl: self.dns_lists("server.dnsbl", &s.dnsbl, DnsListKind::Block)?,
            dnswl: self.dns_lists("server.dnswl", &s.dnswl, DnsListKind::Allow)?,
            dnsbl_threshold: self.dnsbl_threshold(s.dnsbl_threshold)?,
        })
    }

    /// `server.dnsbl` or `server.dnswl`: postscreen's `zone[=filter][*weight]`.
    fn dns_lists(
        &self,
        key: &str,
        values: &[String],
        kind: DnsListKind,
    ) -> Result<Vec<DnsList>, ConfigError> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                DnsList::parse(v, kind).map_err(|why| {
                    self.err(
                        format!("{key}[{i}]"),
                        format!("invalid DNS list {v:?}: {why}"),
                    )
                })
            })
            .collect()
    }

    /// At least 1: a threshold of 0 or less would refuse every client.
    fn dnsbl_threshold(&self, threshold: i32) -> Result<i32, ConfigError> {
        if threshold < 1 {
            return Err(self.err(
                "server.dnsbl_threshold",
                "must be at least 1 (0 or less would refuse every client)",
            ));
        }
        Ok(threshold)
    }

    /// `server.also_known_as`, normalised like `server.hostname`.
    fn also_known_as(&self, names: &[String]) -> Result<Vec<String>, ConfigError> {
        let mut also_known_as = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let n = normalise_name(name);
            if !is_domain_name(&n) {
                return Err(self.err(
                    format!("server.also_known_as[{i}]"),
                    format!("{name:?} is not a host name"),
                ));
            }
            also_known_as.push(n);
        }
        Ok(also_known_as)
    }

    fn tls(&self, t: &file::Tls) -> Result<TlsConfig, ConfigError> {
        for (key, value) in [("tls.cert", &t.cert), ("tls.key", &t.key)] {
            if value.is_empty() {
                return Err(self.err(key, "must name a PEM file"));
            }
        }
        Ok(TlsConfig {
            cert: t.cert.clone().into(),
            key: t.key.clone().into(),
        })
    }

    fn spool(&self, s: &file::Spool) -> Result<SpoolConfig, ConfigError> {
        if s.path.is_empty() {
            return Err(self.err("spool.path", "must not be empty"));
        }
        self.positive("spool.max_size", s.max_size)?;
        Ok(SpoolConfig {
            path: s.path.clone().into(),
            max_size: s.max_size,
        })
    }

    fn delivery(&self, d: &file::Delivery) -> Result<DeliveryConfig, ConfigError> {
        self.positive("delivery.port", d.port as u64)?;
        let nameservers = d
            .nameservers
            .iter()
            .enumerate()
            .map(|(i, a)| self.socket(&format!("delivery.nameservers[{i}]"), a, Some(53)))
            .collect::<Result<_, _>>()?;
        let (retry_initial, retry_max) = self.retry(d)?;
        let probe_interval = self.duration("delivery.probe_interval", &d.probe_interval)?;
        let health_interval = match d.health_interval.as_str() {
            "off" => None,
            text => Some(self.duration("delivery.health_interval", text)?),
        };
        let max_queue_lifetime =
            self.duration("delivery.max_queue_lifetime", &d.max_queue_lifetime)?;
        let delay_warning_after = match d.delay_warning_after.as_str() {
            "off" | "" => None,
            text => Some(self.duration("delivery.delay_warning_after", text)?),
        };
        self.positive(
            "delivery.connections_per_domain",
            d.connections_per_domain as u64,
        )?;
        self.positive(
            "delivery.messages_per_connection",
            d.messages_per_connection as u64,
        )?;
        if d.line_length_limit != 0 && d.line_length_limit < MIN_LINE_LENGTH_LIMIT {
            // A typo such as 9 would cut every line of every message.
            return Err(self.err(
                "delivery.line_length_limit",
                format!("must be 0 (never break lines) or at least {MIN_LINE_LENGTH_LIMIT}"),
            ));
        }
        Ok(DeliveryConfig {
            port: d.port,
            nameservers,
            retry_initial,
            retry_factor: d.retry_factor,
            retry_max,
            retry_jitter: d.retry_jitter,
            probe_interval,
            health_interval,
            drain_guard: d.drain_guard,
            line_length_limit: d.line_length_limit,
            max_queue_lifetime,
            delay_warning_after,
            connections_per_domain: d.connections_per_domain,
            messages_per_connection: d.messages_per_connection,
            tls: self.tls_policy("delivery.tls", &d.tls)?,
            bounce: self.bounce(&d.bounce)?,
            postmaster: self.postmaster(&d.postmaster)?,
        })
    }

    /// The retry schedule's keys, checked together: `(retry_initial, retry_max)`.
    fn retry(&self, d: &file::Delivery) -> Result<(Duration, Duration), ConfigError> {
        let retry_initial = self.duration("delivery.retry_initial", &d.retry_initial)?;
        let retry_max = self.duration("delivery.retry_max", &d.retry_max)?;
        if !(d.retry_factor.is_finite() && d.retry_factor >= 1.0) {
            return Err(self.err("delivery.retry_factor", "must be a number >= 1.0"));
        }
        if retry_max < retry_initial {
            return Err(self.err(
                "delivery.retry_max",
                "must not be shorter than delivery.retry_initial",
            ));
        }
        if !(0.0..=1.0).contains(&d.retry_jitter) {
            return Err(self.err("delivery.retry_jitter", "must be between 0.0 and 1.0"));
        }
        Ok((retry_initial, retry_max))
    }

    fn bounce(&self, value: &str) -> Result<BouncePolicy, ConfigError> {
        match value {
            "sender" => Ok(BouncePolicy::Sender),
            "postmaster" => Ok(BouncePolicy::Postmaster),
            "drop" => Ok(BouncePolicy::Drop),
            other => Err(self.err(
                "delivery.bounce",
                one_of(other, &["sender", "postmaster", "drop"]),
            )),
        }
    }

    /// `delivery.postmaster`, trimmed: `local@domain`.
    fn postmaster(&self, text: &str) -> Result<String, ConfigError> {
        let postmaster = text.trim().to_owned();
        match postmaster.rsplit_once('@') {
            Some((local, domain))
                if !local.is_empty() && is_domain_name(&normalise_name(domain)) =>
            {
                Ok(postmaster)
            }
            _ => Err(self.err(
                "delivery.postmaster",
                format!("{text:?} is not an address like postmaster@example.net"),
            )),
        }
    }

    fn http(&self, h: &file::Http) -> Result<HttpConfig, ConfigError> {
        Ok(HttpConfig {
            listen: self.socket("http.listen", &h.listen, None)?,
            admin_token_file: Some(&h.admin_token_file)
                .filter(|p| !p.is_empty())
                .map(PathBuf::from),
        })
    }

    fn log(&self, l: &file::Log) -> Result<LogConfig, ConfigError> {
        let format = match l.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(self.err("log.format", one_of(other, &["text", "json"]))),
        };
        tracing_subscriber::EnvFilter::try_new(&l.level)
            .map_err(|e| self.err("log.level", format!("{:?}: {e}", l.level)))?;
        Ok(LogConfig {
            format,
            level: l.level.clone(),
        })
    }

    /// Every `[[domain]]`: at least one, no name twice.
    fn domains(&self, all: &[file::Domain], port: u16) -> Result<Vec<DomainConfig>, ConfigError> {
        if all.is_empty() {
            return Err(self.err(
                "domain",
                "at least one [[domain]] is required (the domains this host is backup MX for)",
            ));
        }
        let mut domains: Vec<DomainConfig> = Vec::new();
        for (i, d) in all.iter().enumerate() {
            let domain = self.domain(i, d, port)?;
            if domains.iter().any(|o| o.name == domain.name) {
                return Err(self.err(
                    format!("domain[{i}].name"),
                    format!("duplicate domain {:?}", domain.name),
                ));
            }
            domains.push(domain);
        }
        Ok(domains)
    }

    fn domain(&self, i: usize, d: &file::Domain, port: u16) -> Result<DomainConfig, ConfigError> {
        let key = |k: &str| format!("domain[{i}].{k}");
        let name = normalise_name(&d.name);
        if !is_domain_name(&name) {
            return Err(self.err(key("name"), format!("{:?} is not a domain name", d.name)));
        }
        let route = if d.route.trim().is_empty() {
            None
        } else {
            Some(parse_route(d.route.trim(), port).map_err(|why| self.err(key("route"), why))?)
        };
        let recipients = d
            .recipients
            .iter()
            .map(|r| r.trim().to_lowercase())
            .collect();
        let recipients_file = Some(d.recipients_file.trim())
            .filter(|p| !p.is_empty())
            .map(PathBuf::from);
        let domain = DomainConfig {
            name,
            include_subdomains: d.include_subdomains,
            route,
            recipients,
            recipients_file,
            verify_recipients: d.verify_recipients,
            unknown_recipients: self
                .unknown_recipients(&key("unknown_recipients"), &d.unknown_recipients)?,
            tls: match d.tls.as_str() {
                "" => None,
                other => Some(self.tls_policy(&key("tls"), other)?),
            },
            when_primary_up: self.when_primary_up(&key("when_primary_up"), &d.when_primary_up)?,
            spf: self.spf(&key("spf"), &d.spf)?,
            greylist: d.greylist,
        };
        if let Some(path) = &domain.recipients_file {
            std::fs::metadata(path)
                .and_then(|_| std::fs::read_to_string(path))
                .map_err(|e| {
                    self.err(
                        key("recipients_file"),
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
        }
        Ok(domain)
    }

    fn unknown_recipients(&self, key: &str, value: &str) -> Result<UnknownRecipients, ConfigError> {
        match value {
            "accept" => Ok(UnknownRecipients::Accept),
            "tempfail" => Ok(UnknownRecipients::Tempfail),
            other => Err(self.err(key, one_of(other, &["accept", "tempfail"]))),
        }
    }

    fn when_primary_up(&self, key: &str, value: &str) -> Result<WhenPrimaryUp, ConfigError> {
        match value {
            "accept" => Ok(WhenPrimaryUp::Accept),
            "defer" => Ok(WhenPrimaryUp::Defer),
            other => Err(self.err(key, one_of(other, &["accept", "defer"]))),
        }
    }

    fn spf(&self, key: &str, value: &str) -> Result<Spf, ConfigError> {
        match value {
            "off" => Ok(Spf::Off),
            "tag" => Ok(Spf::Tag),
            "reject" => Ok(Spf::Reject),
            other => Err(self.err(key, one_of(other, &["off", "tag", "reject"]))),
        }
    }

    fn tls_policy(&self, key: &str, value: &str) -> Result<TlsPolicy, ConfigError> {
        match value {
            "none" => Ok(TlsPolicy::None),
            "opportunistic" => Ok(TlsPolicy::Opportunistic),
            "required" => Ok(TlsPolicy::Required),
            "verify" => Ok(TlsPolicy::Verify),
            other => Err(self.err(
                key,
                one_of(other, &["none", "opportunistic", "required", "verify"]),
            )),
        }
    }

    fn positive(&self, key: &str, value: u64) -> Result<(), ConfigError> {
        if value == 0 {
            return Err(self.err(key, "must be greater than 0"));
        }
        Ok(())
    }

    pub(super) fn duration(&self, key: &str, text: &str) -> Result<Duration, ConfigError> {
        let d = humantime::parse_duration(text.trim()).map_err(|e| {
            self.err(
                key,
                format!(
                    "invalid duration {text:?} ({e}); write e.g. \"30s\", \"5m\", \"4h\", \"5d\""
                ),
            )
        })?;
        if d.is_zero() {
            return Err(self.err(key, "must be longer than zero"));
        }
        Ok(d)
    }

    /// `host:port`, `[v6]:port`; with `default_port`, a bare address too.
    fn socket(
        &self,
        key: &str,
        text: &str,
        default_port: Option<u16>,
    ) -> Result<SocketAddr, ConfigError> {
        let text = text.trim();
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(addr);
        }
        if let Some(port) = default_port {
            let bare = text.trim_start_matches('[').trim_end_matches(']');
            if let Ok(ip) = bare.parse::<IpAddr>() {
                return Ok(SocketAddr::new(ip, port));
            }
        }
        Err(self.err(
            key,
            format!("invalid socket address {text:?}; write e.g. \"127.0.0.1:25\" or \"[::1]:25\""),
        ))
    }

    fn nets(&self, key: &str, values: &[String]) -> Result<Vec<IpNet>, ConfigError> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                parse_net(v.trim()).ok_or_else(|| {
                    self.err(
                        format!("{key}[{i}]"),
                        format!("invalid network {v:?}; write e.g. \"192.0.2.0/24\", \"2001:db8::/32\" or an address"),
                    )
                })
            })
            .collect()
    }
}

/// A CIDR network, or a single address (as /32 or /128).
fn parse_net(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .map(|n| n.trunc())
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

fn parse_route(text: &str, default_port: u16) -> Result<Route, String> {
    let bad = || {
        format!(
            "invalid route {text:?}; write \"host:port\", \"[192.0.2.1]:25\" or \"[2001:db8::1]:25\""
        )
    };
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or_else(bad)?;
        let ip: IpAddr = inside.parse().map_err(|_| bad())?;
        let port = match after {
            "" => default_port,
            p => p
                .strip_prefix(':')
                .and_then(|p| p.parse().ok())
                .ok_or_else(bad)?,
        };
        (RouteHost::Ip(ip), port)
    } else {
        let (name, port) = match text.rsplit_once(':') {
            Some((name, p)) => (name, p.parse::<u16>().map_err(|_| bad())?),
            None => (text, default_port),
        };
        let host = match name.parse::<IpAddr>() {
            Ok(ip) => RouteHost::Ip(ip),
            Err(_) => {
                let name = normalise_name(name);
                if !is_domain_name(&name) {
                    return Err(bad());
                }
                RouteHost::Name(name)
            }
        };
        (host, port)
    };
    if port == 0 {
        return Err(bad());
    }
    Ok(Route { host, port })
}

/// A host or domain name as written in the file: surrounding whitespace
/// ignored, then normalised as every [`Domain`] is.
pub(super) fn normalise_name(name: &str) -> String {
    Domain::new(name.trim()).into()
}

pub(super) fn one_of(got: &str, allowed: &[&str]) -> String {
    format!("{got:?} is not one of {}", allowed.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{assert_errors, parse};

    #[test]
    fn greylisting() {
        let c = parse("[[domain]]\nname = \"example.com\"\n").expect("valid");
        assert_eq!(
            c.greylist,
            GreylistConfig {
                delay: Duration::from_secs(300),
                window: Duration::from_secs(24 * 3600),
                remember: Duration::from_secs(35 * 24 * 3600),
            }
        );
        assert!(!c.domains[0].greylist);
        let c = parse(
            r#"
            [greylist]
            delay = "1m"
            window = "4h"
            remember = "7d"
            [[domain]]
            name = "example.com"
            greylist = true
            "#,
        )
        .expect("valid");
        assert_eq!(c.greylist.delay, Duration::from_secs(60));
        assert_eq!(c.greylist.window, Duration::from_secs(4 * 3600));
        assert_eq!(c.greylist.remember, Duration::from_secs(7 * 24 * 3600));
        assert!(c.domains[0].greylist);
        assert_errors(&[
            (
                "[greylist]\ndelay = \"soon\"\n",
                "greylist.delay: invalid duration",
            ),
            (
                "[greylist]\nremember = \"0s\"\n",
                "greylist.remember: must be longer than zero",
            ),
            (
                "[greylist]\ndelay = \"2h\"\nwindow = \"1h\"\n",
                "greylist.window: must be longer than greylist.delay",
            ),
            ("[greylist]\nwait = \"1m\"\n", "greylist.wait"),
        ]);
    }

    #[test]
    fn line_length_limit_is_zero_or_at_least_78() {
        let c = parse("[[domain]]\nname = \"example.com\"\n").expect("valid");
        assert_eq!(c.delivery.line_length_limit, 998);
        for ok in [0, 78, 998, 5000] {
            let text =
                format!("[delivery]\nline_length_limit = {ok}\n[[domain]]\nname = \"a.test\"\n");
            assert_eq!(parse(&text).expect("valid").delivery.line_length_limit, ok);
        }
        assert_errors(&[(
            "[delivery]\nline_length_limit = 77\n",
            "delivery.line_length_limit: must be 0 (never break lines) or at least 78",
        )]);
    }

    #[test]
    fn health_checks_and_admission_by_primary_state() {
        let c = parse("[[domain]]\nname = \"example.com\"\n").expect("valid");
        assert_eq!(c.delivery.health_interval, Some(Duration::from_secs(60)));
        assert_eq!(c.domains[0].when_primary_up, WhenPrimaryUp::Accept);
        let c = parse(
            r#"
            [delivery]
            health_interval = "off"
            [[domain]]
            name = "example.com"
            when_primary_up = "defer"
            "#,
        )
        .expect("valid");
        assert_eq!(c.delivery.health_interval, None);
        assert_eq!(c.domains[0].when_primary_up, WhenPrimaryUp::Defer);
        assert_errors(&[
            (
                "[delivery]\nhealth_interval = \"often\"\n",
                "delivery.health_interval: invalid duration",
            ),
            (
                "[delivery]\nhealth_interval = \"0s\"\n",
                "delivery.health_interval: must be longer than zero",
            ),
            (
                "[[domain]]\nname = \"example.com\"\nwhen_primary_up = \"refuse\"\n",
                "domain[0].when_primary_up: \"refuse\" is not one of accept, defer",
            ),
        ]);
    }

    #[test]
    fn spf_per_domain() {
        let c = parse(
            "[[domain]]\nname = \"a.test\"\n[[domain]]\nname = \"b.test\"\nspf = \"reject\"\n",
        )
        .expect("valid");
        assert_eq!(c.domains[0].spf, Spf::Off);
        assert_eq!(c.domains[1].spf, Spf::Reject);
        let c = parse("[[domain]]\nname = \"a.test\"\nspf = \"tag\"\n").expect("valid");
        assert_eq!(c.domains[0].spf, Spf::Tag);
        assert_errors(&[(
            "[[domain]]\nname = \"example.com\"\nspf = \"on\"\n",
            "domain[0].spf: \"on\" is not one of off, tag, reject",
        )]);
    }

    #[test]
    fn values_are_parsed_and_normalised() {
        let c = parse(
            r#"
            [server]
            hostname = "MX2.Example.NET."
            also_known_as = ["mx-backup.example.net"]
            allow = ["10.0.0.0/8", "192.0.2.7", "2001:db8::1", "10.1.2.3/8"]
            command_timeout = "90s"
            [delivery]
            nameservers = ["127.0.0.1:5353", "192.0.2.53", "[::1]:53"]
            delay_warning_after = "4h"
            max_queue_lifetime = "1d 12h"
            tls = "verify"
            bounce = "postmaster"
            [tls]
            cert = "/c.pem"
            key = "/k.pem"
            [[domain]]
            name = "Example.COM."
            route = "[2001:db8::25]:2525"
            tls = "none"
            recipients = ["Alice", "BOB@example.com"]
            [[domain]]
            name = "b.example"
            route = "mail.b.example"
            unknown_recipients = "tempfail"
            [[domain]]
            name = "c.example"
            route = "192.0.2.9:26"
            "#,
        )
        .unwrap();
        assert_eq!(c.server.hostname, "mx2.example.net");
        assert_eq!(
            c.server.allow,
            [
                "10.0.0.0/8",
                "192.0.2.7/32",
                "2001:db8::1/128",
                "10.0.0.0/8"
            ]
            .map(|n| n.parse::<IpNet>().unwrap())
        );
        assert_eq!(c.server.command_timeout, Duration::from_secs(90));
        assert_eq!(
            c.delivery.nameservers,
            ["127.0.0.1:5353", "192.0.2.53:53", "[::1]:53"]
                .map(|a| a.parse::<SocketAddr>().unwrap())
        );
        assert_eq!(
            c.delivery.delay_warning_after,
            Some(Duration::from_secs(4 * 3600))
        );
        assert_eq!(
            c.delivery.max_queue_lifetime,
            Duration::from_secs(36 * 3600)
        );
        assert_eq!(c.delivery.tls, TlsPolicy::Verify);
        assert_eq!(c.delivery.bounce, BouncePolicy::Postmaster);
        assert_eq!(c.tls.as_ref().unwrap().cert, PathBuf::from("/c.pem"));
        let [a, b, cc] = &c.domains[..] else { panic!() };
        assert_eq!(a.name, "example.com");
        assert_eq!(
            a.route,
            Some(Route {
                host: RouteHost::Ip("2001:db8::25".parse().unwrap()),
                port: 2525
            })
        );
        assert_eq!(a.tls, Some(TlsPolicy::None));
        assert_eq!(a.recipients, ["alice", "bob@example.com"]);
        assert_eq!(
            b.route,
            Some(Route {
                host: RouteHost::Name("mail.b.example".into()),
                port: 25
            })
        );
        assert_eq!(b.unknown_recipients, UnknownRecipients::Tempfail);
        assert_eq!(
            cc.route,
            Some(Route {
                host: RouteHost::Ip("192.0.2.9".parse().unwrap()),
                port: 26
            })
        );
    }

    #[test]
    fn dns_lists_and_trusted_clients() {
        let c = parse(
            r#"
            [server]
            hostname = "mx2.example.net"
            trusted = ["198.51.100.0/24", "2001:db8::7"]
            dnsbl = ["zen.spamhaus.org*2", "bl.spamcop.net=127.0.0.2*1"]
            dnswl = ["list.dnswl.org*-2", "swl.example.org"]
            dnsbl_threshold = 2
            [[domain]]
            name = "example.com"
            "#,
        )
        .unwrap();
        let s = &c.server;
        assert_eq!(
            s.trusted,
            ["198.51.100.0/24", "2001:db8::7/128"].map(|n| n.parse::<IpNet>().unwrap())
        );
        let show = |lists: &[DnsList]| lists.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(
            show(&s.dnsbl),
            ["zen.spamhaus.org*2", "bl.spamcop.net=127.0.0.2*1"]
        );
        assert_eq!(show(&s.dnswl), ["list.dnswl.org*-2", "swl.example.org*-1"]);
        assert_eq!(s.dnsbl_threshold, 2);
        // Printed and parsed again: the same lists.
        let again = parse(&c.to_toml()).unwrap();
        assert_eq!(again.server, c.server);

        let d = parse(crate::config::tests::MINIMAL).unwrap();
        assert!(d.server.trusted.is_empty() && d.server.dnsbl.is_empty());
        assert!(d.server.dnswl.is_empty());
        assert_eq!(d.server.dnsbl_threshold, 1);
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        assert_errors(&[
            (
                "[server]\ndnsbl = [\"zen.spamhaus.org\", \"bl.example=127.0.0\"]\n",
                "server.dnsbl[1]: invalid DNS list \"bl.example=127.0.0\"",
            ),
            (
                "[server]\ndnsbl = [\"zen.spamhaus.org*x\"]\n",
                "server.dnsbl[0]: invalid DNS list",
            ),
            (
                "[server]\ndnswl = [\"list.dnswl.org*2\"]\n",
                "server.dnswl[0]: invalid DNS list \"list.dnswl.org*2\": an allowlist",
            ),
            (
                "[server]\ndnsbl_threshold = 0\n",
                "server.dnsbl_threshold: must be at least 1",
            ),
            ("[server]\ntrusted = [\"partner\"]\n", "server.trusted[0]"),
            ("[server]\nlisten = [\"nope\"]\n", "server.listen[0]"),
            ("[delivery]\nretry_factor = 0.5\n", "delivery.retry_factor"),
            (
                "[delivery]\nretry_initial = \"soon\"\n",
                "delivery.retry_initial: invalid duration",
            ),
            (
                "[delivery]\nretry_max = \"1m\"\n",
                "delivery.retry_max: must not be shorter",
            ),
            ("[delivery]\nretry_jitter = 2.0\n", "delivery.retry_jitter"),
            (
                "[delivery]\ntls = \"sometimes\"\n",
                "delivery.tls: \"sometimes\" is not one of",
            ),
            ("[delivery]\nbounce = \"back\"\n", "delivery.bounce"),
            (
                "[delivery]\npostmaster = \"nobody\"\n",
                "delivery.postmaster",
            ),
            (
                "[delivery]\nnameservers = [\"dns.google\"]\n",
                "delivery.nameservers[0]",
            ),
            ("[server]\nallow = [\"10.0.0.0/99\"]\n", "server.allow[0]"),
            (
                "[server]\nmax_recipients = 0\n",
                "server.max_recipients: must be greater than 0",
            ),
            ("[server]\nhostname = \"bad host\"\n", "server.hostname"),
            ("[log]\nlevel = \"mxspool=shouty\"\n", "log.level"),
            ("[log]\nformat = \"xml\"\n", "log.format"),
            ("[[domain]]\nname = \"bad domain\"\n", "domain[0].name"),
            (
                "[[domain]]\nname = \"a.example\"\nroute = \"host:notaport\"\n",
                "domain[0].route",
            ),
            (
                "[[domain]]\nname = \"a.example\"\nroute = \"[nope]:25\"\n",
                "domain[0].route",
            ),
            (
                "[[domain]]\nname = \"a.example\"\nunknown_recipients = \"maybe\"\n",
                "domain[0].unknown_recipients",
            ),
            (
                "[[domain]]\nname = \"a.example\"\nrecipients_file = \"/nonexistent/users\"\n",
                "domain[0].recipients_file: cannot read /nonexistent/users",
            ),
            (
                "[[domain]]\nname = \"a.example\"\n[[domain]]\nname = \"A.example.\"\n",
                "domain[1].name: duplicate",
            ),
            (
                "[server]\nhostname = \"mx\"\n",
                "domain: at least one [[domain]] is required",
            ),
        ]);
    }
}
