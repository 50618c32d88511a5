//! Configuration: the TOML file, parsed and validated into a typed [`Config`].
//!
//! Two layers. The file layer (`file::*`) mirrors the TOML exactly, with
//! `deny_unknown_fields` and the documented default for every key, so a typo is
//! an error and printing it back gives the effective configuration. The typed
//! layer ([`Config`]) is what the rest of the program reads: durations, networks,
//! addresses and enums already parsed, no "must be set later" options.
//!
//! Every error names the file, the key and the reason. Nothing here does I/O
//! besides reading the config file and the recipient files it names.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use crate::address::is_domain_name;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this came from: errors and reloads name it.
    pub source: PathBuf,
    pub server: ServerConfig,
    /// `None` without a `[tls]` table: then STARTTLS is not offered.
    pub tls: Option<TlsConfig>,
    pub spool: SpoolConfig,
    pub delivery: DeliveryConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
    pub domains: Vec<DomainConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Banner and EHLO name; also how we find our own preference among MX records.
    pub hostname: String,
    /// Other names our MX records may use for this host.
    pub also_known_as: Vec<String>,
    pub listen: Vec<SocketAddr>,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// New connections one client address may open per minute; 0 = no limit.
    pub max_connection_rate_per_ip: u32,
    /// Loop guard: messages already carrying this many `Received:` are refused.
    pub max_received_headers: usize,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
    pub etrn_allow: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolConfig {
    pub path: PathBuf,
    /// Bytes of stored mail beyond which new mail is refused with 452 4.3.1.
    pub max_size: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryConfig {
    /// SMTP port of MX hosts (tests use another).
    pub port: u16,
    /// Empty: the system resolver.
    pub nameservers: Vec<SocketAddr>,
    pub retry_initial: Duration,
    pub retry_factor: f64,
    pub retry_max: Duration,
    pub retry_jitter: f64,
    /// While mail waits for an unreachable primary, probe it this often.
    pub probe_interval: Duration,
    /// Permanent refusals in a row from a domain's primary, with no delivery
    /// between, after which the domain is paused; 0: never.
    pub drain_guard: u32,
    pub max_queue_lifetime: Duration,
    /// `None` ("off"): no "delayed" notices.
    pub delay_warning_after: Option<Duration>,
    pub connections_per_domain: usize,
    pub messages_per_connection: usize,
    pub tls: TlsPolicy,
    pub bounce: BouncePolicy,
    pub postmaster: String,
}

/// How delivery uses STARTTLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsPolicy {
    None,
    /// Use it when offered; fall back to plaintext if the handshake fails.
    Opportunistic,
    /// Must be offered and succeed; the certificate is not checked.
    Required,
    /// Must succeed with a certificate valid for the host name.
    Verify,
}

/// Who hears about mail that cannot be delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BouncePolicy {
    Sender,
    Postmaster,
    Drop,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Absent: the admin API answers 403.
    pub admin_token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter: `info`, `debug`, `mxspool=debug,info` …
    pub level: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainConfig {
    /// Lower-case, without a trailing dot.
    pub name: String,
    pub include_subdomains: bool,
    /// A fixed next hop instead of the MX lookup.
    pub route: Option<Route>,
    /// Lower-cased local parts or addresses; with the file's, the only ones accepted.
    pub recipients: Vec<String>,
    /// One recipient per line; re-read on SIGHUP.
    pub recipients_file: Option<PathBuf>,
    pub verify_recipients: bool,
    pub unknown_recipients: UnknownRecipients,
    /// Overrides `delivery.tls` for this domain.
    pub tls: Option<TlsPolicy>,
}

impl DomainConfig {
    /// Whether `domain` is this domain, or one of its subdomains when
    /// `include_subdomains` is set.
    pub fn covers(&self, domain: &str) -> bool {
        covers(&self.name, self.include_subdomains, domain)
    }
}

/// Whether `domain` is `name`, or (with `subdomains`) ends in `.name`;
/// ASCII case is ignored.
pub fn covers(name: &str, subdomains: bool, domain: &str) -> bool {
    if domain.eq_ignore_ascii_case(name) {
        return true;
    }
    let Some(at) = domain.len().checked_sub(name.len() + 1) else {
        return false;
    };
    subdomains
        && domain.as_bytes()[at] == b'.'
        && domain.is_char_boundary(at + 1)
        && domain[at + 1..].eq_ignore_ascii_case(name)
}

/// What to do, while the primary is down, with a recipient never seen before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnknownRecipients {
    Accept,
    Tempfail,
}

/// A static next hop: `host:port`, `[ip]:port`, or either without a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub host: RouteHost,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteHost {
    Name(String),
    Ip(IpAddr),
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            RouteHost::Name(name) => write!(f, "{name}:{}", self.port),
            RouteHost::Ip(ip) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {reason}")]
    Read { file: PathBuf, reason: String },
    #[error("{file}: {key}: {reason}")]
    Invalid {
        file: PathBuf,
        key: String,
        reason: String,
    },
}

/// The file layer: the TOML as written, every default filled in.
mod file {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Default, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct File {
        pub server: Server,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub tls: Option<Tls>,
        pub spool: Spool,
        pub delivery: Delivery,
        pub http: Http,
        pub log: Log,
        pub domain: Vec<Domain>,
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Server {
        pub hostname: String,
        pub also_known_as: Vec<String>,
        pub listen: Vec<String>,
        pub max_message_size: u64,
        pub max_recipients: usize,
        pub max_connections: usize,
        pub max_connections_per_ip: usize,
        pub max_connection_rate_per_ip: u32,
        pub max_received_headers: usize,
        pub command_timeout: String,
        pub data_timeout: String,
        pub allow: Vec<String>,
        pub deny: Vec<String>,
        pub etrn_allow: Vec<String>,
    }

    impl Default for Server {
        fn default() -> Self {
            Server {
                hostname: String::new(),
                also_known_as: Vec::new(),
                listen: vec!["0.0.0.0:25".into()],
                max_message_size: 52_428_800,
                max_recipients: 100,
                max_connections: 1000,
                max_connections_per_ip: 20,
                max_connection_rate_per_ip: 0,
                max_received_headers: 50,
                command_timeout: "5m".into(),
                data_timeout: "10m".into(),
                allow: vec!["0.0.0.0/0".into(), "::/0".into()],
                deny: Vec::new(),
                etrn_allow: vec!["127.0.0.0/8".into()],
            }
        }
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct Tls {
        pub cert: String,
        pub key: String,
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Spool {
        pub path: String,
        pub max_size: u64,
    }

    impl Default for Spool {
        fn default() -> Self {
            Spool {
                path: "/var/lib/mxspool/spool.redb".into(),
                max_size: 10_737_418_240,
            }
        }
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Delivery {
        pub port: u16,
        pub nameservers: Vec<String>,
        pub retry_initial: String,
        pub retry_factor: f64,
        pub retry_max: String,
        pub retry_jitter: f64,
        pub probe_interval: String,
        pub drain_guard: u32,
        pub max_queue_lifetime: String,
        pub delay_warning_after: String,
        pub connections_per_domain: usize,
        pub messages_per_connection: usize,
        pub tls: String,
        pub bounce: String,
        pub postmaster: String,
    }

    impl Default for Delivery {
        fn default() -> Self {
            Delivery {
                port: 25,
                nameservers: Vec::new(),
                retry_initial: "5m".into(),
                retry_factor: 2.0,
                retry_max: "1h".into(),
                retry_jitter: 0.2,
                probe_interval: "5s".into(),
                drain_guard: 10,
                max_queue_lifetime: "5d".into(),
                delay_warning_after: "off".into(),
                connections_per_domain: 20,
                messages_per_connection: 100,
                tls: "opportunistic".into(),
                bounce: "sender".into(),
                postmaster: "postmaster@example.net".into(),
            }
        }
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Http {
        pub listen: String,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub admin_token_file: String,
    }

    impl Default for Http {
        fn default() -> Self {
            Http {
                listen: "127.0.0.1:9090".into(),
                admin_token_file: String::new(),
            }
        }
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Log {
        pub format: String,
        pub level: String,
    }

    impl Default for Log {
        fn default() -> Self {
            Log {
                format: "text".into(),
                level: "info".into(),
            }
        }
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Domain {
        pub name: String,
        pub include_subdomains: bool,
        pub route: String,
        pub recipients: Vec<String>,
        pub recipients_file: String,
        pub verify_recipients: bool,
        pub unknown_recipients: String,
        pub tls: String,
    }

    impl Default for Domain {
        fn default() -> Self {
            Domain {
                name: String::new(),
                include_subdomains: false,
                route: String::new(),
                recipients: Vec::new(),
                recipients_file: String::new(),
                verify_recipients: false,
                unknown_recipients: "accept".into(),
                tls: String::new(),
            }
        }
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            file: path.to_owned(),
            reason: e.to_string(),
        })?;
        Config::parse(&text, path)
    }

    /// Validates `text`; `source` names the file in errors.
    pub fn parse(text: &str, source: &Path) -> Result<Config, ConfigError> {
        let mut file = parse_file(text, source)?;
        if file.server.hostname.is_empty() {
            file.server.hostname = gethostname::gethostname().to_string_lossy().into_owned();
        }
        Validator { source }.config(&file)
    }

    /// The effective configuration as TOML: every key, defaults filled in.
    /// Parsing this text again gives an equal `Config`.
    pub fn to_toml(&self) -> String {
        let file = self.to_file();
        toml::to_string(&file).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }

    fn to_file(&self) -> file::File {
        let nets = |v: &[IpNet]| v.iter().map(IpNet::to_string).collect();
        let s = &self.server;
        let d = &self.delivery;
        file::File {
            server: file::Server {
                hostname: s.hostname.clone(),
                also_known_as: s.also_known_as.clone(),
                listen: s.listen.iter().map(SocketAddr::to_string).collect(),
                max_message_size: s.max_message_size,
                max_recipients: s.max_recipients,
                max_connections: s.max_connections,
                max_connections_per_ip: s.max_connections_per_ip,
                max_connection_rate_per_ip: s.max_connection_rate_per_ip,
                max_received_headers: s.max_received_headers,
                command_timeout: format_duration(s.command_timeout),
                data_timeout: format_duration(s.data_timeout),
                allow: nets(&s.allow),
                deny: nets(&s.deny),
                etrn_allow: nets(&s.etrn_allow),
            },
            tls: self.tls.as_ref().map(|t| file::Tls {
                cert: t.cert.display().to_string(),
                key: t.key.display().to_string(),
            }),
            spool: file::Spool {
                path: self.spool.path.display().to_string(),
                max_size: self.spool.max_size,
            },
            delivery: file::Delivery {
                port: d.port,
                nameservers: d.nameservers.iter().map(SocketAddr::to_string).collect(),
                retry_initial: format_duration(d.retry_initial),
                retry_factor: d.retry_factor,
                retry_max: format_duration(d.retry_max),
                retry_jitter: d.retry_jitter,
                probe_interval: format_duration(d.probe_interval),
                drain_guard: d.drain_guard,
                max_queue_lifetime: format_duration(d.max_queue_lifetime),
                delay_warning_after: d
                    .delay_warning_after
                    .map(format_duration)
                    .unwrap_or_else(|| "off".into()),
                connections_per_domain: d.connections_per_domain,
                messages_per_connection: d.messages_per_connection,
                tls: tls_policy_name(d.tls).into(),
                bounce: match d.bounce {
                    BouncePolicy::Sender => "sender",
                    BouncePolicy::Postmaster => "postmaster",
                    BouncePolicy::Drop => "drop",
                }
                .into(),
                postmaster: d.postmaster.clone(),
            },
            http: file::Http {
                listen: self.http.listen.to_string(),
                admin_token_file: self
                    .http
                    .admin_token_file
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            },
            log: file::Log {
                format: match self.log.format {
                    LogFormat::Text => "text",
                    LogFormat::Json => "json",
                }
                .into(),
                level: self.log.level.clone(),
            },
            domain: self
                .domains
                .iter()
                .map(|dom| file::Domain {
                    name: dom.name.clone(),
                    include_subdomains: dom.include_subdomains,
                    route: dom.route.as_ref().map(Route::to_string).unwrap_or_default(),
                    recipients: dom.recipients.clone(),
                    recipients_file: dom
                        .recipients_file
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    verify_recipients: dom.verify_recipients,
                    unknown_recipients: match dom.unknown_recipients {
                        UnknownRecipients::Accept => "accept",
                        UnknownRecipients::Tempfail => "tempfail",
                    }
                    .into(),
                    tls: dom.tls.map(tls_policy_name).unwrap_or_default().into(),
                })
                .collect(),
        }
    }
}

impl DomainConfig {
    /// `recipients` plus the lines of `recipients_file` (blank lines and `#`
    /// comments skipped), lower-cased. Called at startup and on every reload.
    pub fn load_recipients(&self) -> Result<Vec<String>, ConfigError> {
        let mut all = self.recipients.clone();
        if let Some(path) = &self.recipients_file {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                file: path.clone(),
                reason: e.to_string(),
            })?;
            all.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_lowercase),
            );
        }
        Ok(all)
    }
}

fn tls_policy_name(p: TlsPolicy) -> &'static str {
    match p {
        TlsPolicy::None => "none",
        TlsPolicy::Opportunistic => "opportunistic",
        TlsPolicy::Required => "required",
        TlsPolicy::Verify => "verify",
    }
}

/// "5m", "1h 30m", "5d": the largest units that divide the duration exactly.
fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string().replace(' ', "")
}

/// TOML -> file layer, with the failing key's path in the error.
fn parse_file(text: &str, source: &Path) -> Result<file::File, ConfigError> {
    let deserializer = toml::Deserializer::parse(text).map_err(|e| ConfigError::Invalid {
        file: source.to_owned(),
        key: "(syntax)".into(),
        reason: one_line(&e.to_string()),
    })?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let line = inner
            .span()
            .map(|span| {
                let before = text.get(..span.start).unwrap_or(text);
                format!(" (line {})", before.matches('\n').count() + 1)
            })
            .unwrap_or_default();
        ConfigError::Invalid {
            file: source.to_owned(),
            key: if path == "." {
                "(top level)".into()
            } else {
                path
            },
            reason: format!("{}{line}", inner.message()),
        }
    })
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

struct Validator<'a> {
    source: &'a Path,
}

impl Validator<'_> {
    fn err(&self, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.source.to_owned(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    fn config(&self, f: &file::File) -> Result<Config, ConfigError> {
        let server = self.server(&f.server)?;
        let tls = f
            .tls
            .as_ref()
            .map(|t| {
                for (key, value) in [("tls.cert", &t.cert), ("tls.key", &t.key)] {
                    if value.is_empty() {
                        return Err(self.err(key, "must name a PEM file"));
                    }
                }
                Ok(TlsConfig {
                    cert: t.cert.clone().into(),
                    key: t.key.clone().into(),
                })
            })
            .transpose()?;
        if f.spool.path.is_empty() {
            return Err(self.err("spool.path", "must not be empty"));
        }
        self.positive("spool.max_size", f.spool.max_size)?;
        let delivery = self.delivery(&f.delivery)?;
        let http = HttpConfig {
            listen: self.socket("http.listen", &f.http.listen, None)?,
            admin_token_file: Some(&f.http.admin_token_file)
                .filter(|p| !p.is_empty())
                .map(PathBuf::from),
        };
        let log = LogConfig {
            format: match f.log.format.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => return Err(self.err("log.format", one_of(other, &["text", "json"]))),
            },
            level: {
                tracing_subscriber::EnvFilter::try_new(&f.log.level)
                    .map_err(|e| self.err("log.level", format!("{:?}: {e}", f.log.level)))?;
                f.log.level.clone()
            },
        };
        if f.domain.is_empty() {
            return Err(self.err(
                "domain",
                "at least one [[domain]] is required (the domains this host is backup MX for)",
            ));
        }
        let mut domains: Vec<DomainConfig> = Vec::new();
        for (i, d) in f.domain.iter().enumerate() {
            let domain = self.domain(i, d, delivery.port)?;
            if domains.iter().any(|o| o.name == domain.name) {
                return Err(self.err(
                    format!("domain[{i}].name"),
                    format!("duplicate domain {:?}", domain.name),
                ));
            }
            domains.push(domain);
        }
        Ok(Config {
            source: self.source.to_owned(),
            server,
            tls,
            spool: SpoolConfig {
                path: f.spool.path.clone().into(),
                max_size: f.spool.max_size,
            },
            delivery,
            http,
            log,
            domains,
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
        let mut also_known_as = Vec::new();
        for (i, name) in s.also_known_as.iter().enumerate() {
            let n = normalise_name(name);
            if !is_domain_name(&n) {
                return Err(self.err(
                    format!("server.also_known_as[{i}]"),
                    format!("{name:?} is not a host name"),
                ));
            }
            also_known_as.push(n);
        }
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
        let probe_interval = self.duration("delivery.probe_interval", &d.probe_interval)?;
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
        let tls = self.tls_policy("delivery.tls", &d.tls)?;
        let bounce = match d.bounce.as_str() {
            "sender" => BouncePolicy::Sender,
            "postmaster" => BouncePolicy::Postmaster,
            "drop" => BouncePolicy::Drop,
            other => {
                return Err(self.err(
                    "delivery.bounce",
                    one_of(other, &["sender", "postmaster", "drop"]),
                ));
            }
        };
        let postmaster = d.postmaster.trim().to_owned();
        match postmaster.rsplit_once('@') {
            Some((local, domain))
                if !local.is_empty() && is_domain_name(&normalise_name(domain)) => {}
            _ => {
                return Err(self.err(
                    "delivery.postmaster",
                    format!(
                        "{:?} is not an address like postmaster@example.net",
                        d.postmaster
                    ),
                ));
            }
        }
        Ok(DeliveryConfig {
            port: d.port,
            nameservers,
            retry_initial,
            retry_factor: d.retry_factor,
            retry_max,
            retry_jitter: d.retry_jitter,
            probe_interval,
            drain_guard: d.drain_guard,
            max_queue_lifetime,
            delay_warning_after,
            connections_per_domain: d.connections_per_domain,
            messages_per_connection: d.messages_per_connection,
            tls,
            bounce,
            postmaster,
        })
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
            unknown_recipients: match d.unknown_recipients.as_str() {
                "accept" => UnknownRecipients::Accept,
                "tempfail" => UnknownRecipients::Tempfail,
                other => {
                    return Err(self.err(
                        key("unknown_recipients"),
                        one_of(other, &["accept", "tempfail"]),
                    ));
                }
            },
            tls: match d.tls.as_str() {
                "" => None,
                other => Some(self.tls_policy(&key("tls"), other)?),
            },
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

    fn duration(&self, key: &str, text: &str) -> Result<Duration, ConfigError> {
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

fn normalise_name(name: &str) -> String {
    let name = name.trim();
    name.strip_suffix('.').unwrap_or(name).to_lowercase()
}

fn one_of(got: &str, allowed: &[&str]) -> String {
    format!("{got:?} is not one of {}", allowed.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_domain_covers_itself_and_subdomains_only_when_asked() {
        assert!(covers("example.com", false, "example.com"));
        assert!(covers("example.com", false, "Example.COM"));
        assert!(!covers("example.com", false, "a.example.com"));
        assert!(covers("example.com", true, "a.b.Example.com"));
        assert!(!covers("example.com", true, "badexample.com"));
        assert!(!covers("example.com", true, ".example.com.evil"));
        assert!(!covers("example.com", true, "com"));
        assert!(!covers("example.com", true, "\u{e9}xample.com"));
    }

    const MINIMAL: &str =
        "[server]\nhostname = \"mx2.example.net\"\n[[domain]]\nname = \"example.com\"\n";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    fn error(text: &str) -> String {
        parse(text).err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn defaults_match_the_design() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.server.listen, vec!["0.0.0.0:25".parse().unwrap()]);
        assert_eq!(c.server.max_message_size, 52_428_800);
        assert_eq!(c.server.max_recipients, 100);
        assert_eq!(c.server.max_connections, 1000);
        assert_eq!(c.server.max_connections_per_ip, 20);
        assert_eq!(c.server.max_received_headers, 50);
        assert_eq!(c.server.command_timeout, Duration::from_secs(300));
        assert_eq!(c.server.data_timeout, Duration::from_secs(600));
        assert_eq!(c.server.allow.len(), 2);
        assert!(c.server.deny.is_empty());
        assert_eq!(
            c.server.etrn_allow,
            vec!["127.0.0.0/8".parse::<IpNet>().unwrap()]
        );
        assert!(c.tls.is_none());
        assert_eq!(c.spool.path, PathBuf::from("/var/lib/mxspool/spool.redb"));
        assert_eq!(c.spool.max_size, 10_737_418_240);
        let d = &c.delivery;
        assert_eq!(d.port, 25);
        assert!(d.nameservers.is_empty());
        assert_eq!(d.retry_initial, Duration::from_secs(300));
        assert_eq!(d.retry_factor, 2.0);
        assert_eq!(d.retry_max, Duration::from_secs(3600));
        assert_eq!(d.retry_jitter, 0.2);
        assert_eq!(d.probe_interval, Duration::from_secs(5));
        assert_eq!(d.drain_guard, 10);
        assert_eq!(d.max_queue_lifetime, Duration::from_secs(5 * 86_400));
        assert_eq!(d.delay_warning_after, None);
        assert_eq!(d.connections_per_domain, 20);
        assert_eq!(d.messages_per_connection, 100);
        assert_eq!(d.tls, TlsPolicy::Opportunistic);
        assert_eq!(d.bounce, BouncePolicy::Sender);
        assert_eq!(d.postmaster, "postmaster@example.net");
        assert_eq!(c.http.listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.http.admin_token_file, None);
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.log.level, "info");
        let dom = &c.domains[0];
        assert_eq!(dom.name, "example.com");
        assert!(!dom.include_subdomains);
        assert_eq!(dom.route, None);
        assert_eq!(dom.unknown_recipients, UnknownRecipients::Accept);
        assert_eq!(dom.tls, None);
    }

    #[test]
    fn hostname_defaults_to_the_system_name() {
        let c = parse("[[domain]]\nname = \"example.com\"\n").unwrap();
        assert!(!c.server.hostname.is_empty());
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
    fn errors_name_the_file_and_the_key() {
        let cases: &[(&str, &str)] = &[
            ("[server]\nlisten = \"x\"\n", "server.listen"),
            ("[server]\nlisten = [\"nope\"]\n", "server.listen[0]"),
            (
                "[server]\nbogus = 1\n",
                "server.bogus: unknown field `bogus`",
            ),
            ("bogus = 1\n", "unknown field `bogus`"),
            ("[spool]\nsize = 1\n", "spool.size: unknown field `size`"),
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
                "[delivery]\ndrain_guard = -1\n",
                "delivery.drain_guard: invalid value",
            ),
            (
                "[delivery]\ndrain_guard = \"10\"\n",
                "delivery.drain_guard: invalid type",
            ),
            (
                "[delivery]\ndrain_guard = 1.5\n",
                "delivery.drain_guard: invalid type",
            ),
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
            (
                "[server]\nmax_recipients = \"ten\"\n",
                "server.max_recipients: invalid type",
            ),
            ("[server]\nhostname = \"bad host\"\n", "server.hostname"),
            ("[log]\nlevel = \"mxspool=shouty\"\n", "log.level"),
            ("[log]\nformat = \"xml\"\n", "log.format"),
            ("[tls]\ncert = \"/c\"\n", "tls: missing field `key`"),
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
                "[[domain]]\nname = \"a.example\"\nfoo = 1\n",
                "domain[0].foo: unknown field `foo`",
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
            ("[server\n", "(syntax)"),
        ];
        for (text, want) in cases {
            let with_domain = if text.contains("[[domain]]") || want.starts_with("domain:") {
                text.to_string()
            } else {
                format!("{text}\n[[domain]]\nname = \"example.com\"\n")
            };
            let got = error(&with_domain);
            assert!(got.starts_with("test.toml: "), "{text:?}: {got}");
            assert!(got.contains(want), "{text:?}: expected {want:?} in {got:?}");
        }
    }

    #[test]
    fn type_errors_carry_a_line_number() {
        let got = error("[server]\n\nmax_recipients = \"ten\"\n[[domain]]\nname = \"a.example\"\n");
        assert!(got.contains("(line 3)"), "{got}");
    }

    #[test]
    fn effective_config_round_trips() {
        let c = parse(
            r#"
            [server]
            hostname = "mx2.example.net"
            deny = ["192.0.2.0/24"]
            [delivery]
            delay_warning_after = "4h"
            max_queue_lifetime = "1d 12h"
            retry_jitter = 0.0
            drain_guard = 0
            [http]
            admin_token_file = "/etc/mxspool/admin-token"
            [tls]
            cert = "/c.pem"
            key = "/k.pem"
            [[domain]]
            name = "example.com"
            route = "[::1]:2526"
            tls = "required"
            [[domain]]
            name = "example.org"
            include_subdomains = true
            route = "mx.example.org:25"
            "#,
        )
        .unwrap();
        let printed = c.to_toml();
        let again = parse(&printed).unwrap();
        assert_eq!(again, c, "{printed}");
        assert!(
            printed.contains("max_queue_lifetime = \"1day12h\""),
            "{printed}"
        );

        let plain = parse(MINIMAL).unwrap();
        let printed = plain.to_toml();
        assert!(
            printed.contains("delay_warning_after = \"off\""),
            "{printed}"
        );
        assert!(!printed.contains("[tls]"));
        assert_eq!(parse(&printed).unwrap(), plain);
    }

    #[test]
    fn recipients_file_is_merged_and_reloadable() {
        let dir = tempfile::tempdir().unwrap();
        let users = dir.path().join("users");
        std::fs::write(&users, "# staff\nCarol\n\n  dave@example.com  \n").unwrap();
        let text = format!(
            "{MINIMAL}recipients = [\"alice\"]\nrecipients_file = \"{}\"\n",
            users.display()
        );
        let c = parse(&text).unwrap();
        assert_eq!(
            c.domains[0].load_recipients().unwrap(),
            ["alice", "carol", "dave@example.com"]
        );
        std::fs::write(&users, "erin\n").unwrap();
        assert_eq!(c.domains[0].load_recipients().unwrap(), ["alice", "erin"]);
        std::fs::remove_file(&users).unwrap();
        let err = c.domains[0].load_recipients().unwrap_err().to_string();
        assert!(err.contains(&users.display().to_string()), "{err}");
    }

    #[test]
    fn load_names_a_missing_file() {
        let err = Config::load(Path::new("/nonexistent/mxspool.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/nonexistent/mxspool.toml: cannot read"),
            "{err}"
        );
    }
}
