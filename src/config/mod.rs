//! Configuration: the TOML file, parsed and validated into a typed [`Config`].
//!
//! Two layers. The file layer (`file`) mirrors the TOML exactly, with
//! `deny_unknown_fields` and the documented default for every key, so a typo is
//! an error and printing it back gives the effective configuration. The typed
//! layer ([`Config`]) is what the rest of the program reads: durations, networks,
//! addresses and enums already parsed, no "must be set later" options.
//!
//! Every error names the file, the key and the reason. Nothing here does I/O
//! besides reading the config file and the recipient files it names.
//!
//! # Layout
//! - this file: the typed [`Config`], its errors, and the entry points
//!   ([`Config::load`], [`Config::parse`], [`Config::to_toml`]);
//! - `file`: the TOML as written, every default filled in;
//! - `validate`: the file layer turned into a [`Config`], or an error naming
//!   the key;
//! - `fetch`: the `[[fetch]]` blocks, typed, validated and printed;
//! - `print`: a [`Config`] turned back into the file layer, for `check-config`.

mod dnslist;
mod fetch;
mod file;
mod print;
mod validate;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use crate::domain::{RelayDomain, RelayDomains};
pub use dnslist::{AnswerFilter, DnsList, Kind as DnsListKind};
pub use fetch::{FetchBounce, FetchConfig, FetchProtocol, FetchTls};

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
    pub greylist: GreylistConfig,
    pub domains: Vec<DomainConfig>,
    /// `[[fetch]]`: catch-all mailboxes fetched into the spool.
    pub fetch: Vec<FetchConfig>,
}

/// `[greylist]`: how long an unseen (client network, sender, recipient)
/// waits, and what is remembered, for domains with `greylist = true`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GreylistConfig {
    /// A retry is accepted only this long after the first attempt.
    pub delay: Duration,
    /// … and only within this long of it; later, the triplet starts over.
    pub window: Duration,
    /// A client network that passed once skips greylisting this long.
    pub remember: Duration,
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
    /// Partner relays: never checked against DNS lists (nor, later,
    /// greylisted or deferred).
    pub trusted: Vec<IpNet>,
    /// DNS blocklists consulted about every other client at connect.
    pub dnsbl: Vec<DnsList>,
    /// DNS allowlists: their (negative) weights offset the blocklists'.
    pub dnswl: Vec<DnsList>,
    /// A client whose summed weight reaches this is refused at RCPT.
    pub dnsbl_threshold: i32,
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
    /// Every primary is checked this often, mail or not (`None`: "off", only
    /// while mail waits).
    pub health_interval: Option<Duration>,
    /// Permanent refusals in a row from a domain's primary, with no delivery
    /// between, after which the domain is paused; 0: never.
    pub drain_guard: u32,
    /// Forwarded lines longer than this many octets (CRLF not counted) are
    /// broken with CRLF and a space, as Postfix's `smtp_line_length_limit`;
    /// 0: never.
    pub line_length_limit: usize,
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

impl TlsPolicy {
    /// As the config file spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsPolicy::None => "none",
            TlsPolicy::Opportunistic => "opportunistic",
            TlsPolicy::Required => "required",
            TlsPolicy::Verify => "verify",
        }
    }
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
    /// Normalised as a [`crate::domain::Domain`]: lower-case, without a
    /// trailing dot.
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
    pub when_primary_up: WhenPrimaryUp,
    pub spf: Spf,
    /// Unseen (client network, sender, recipient) triplets get `450 4.7.1`
    /// until they retry after `[greylist] delay`.
    pub greylist: bool,
    /// Overrides `delivery.tls` for this domain.
    pub tls: Option<TlsPolicy>,
}

impl DomainConfig {
    /// The name and reach of this domain, for a [`RelayDomains`].
    pub fn relay(&self) -> RelayDomain {
        RelayDomain::new(&self.name, self.include_subdomains)
    }
}

/// What to do, while the primary is down, with a recipient never seen before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnknownRecipients {
    Accept,
    Tempfail,
}

/// What RCPT gets while the domain's primary is known to be up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenPrimaryUp {
    Accept,
    /// `450 4.7.1`: real senders retry and reach the primary; bots aiming
    /// only at the backup get nothing.
    Defer,
}

/// What SPF (RFC 7208) of the client's MAIL FROM, or HELO for the null
/// sender, does for mail to a domain. The primary sees only our address, so
/// the backup is the last hop that can check it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Spf {
    #[default]
    Off,
    /// `Authentication-Results:` and `Received-SPF:` say what we found.
    Tag,
    /// As `Tag`, and RCPT gets `550 5.7.23` when SPF says `fail`.
    Reject,
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
        let mut file = file::parse(text, source)?;
        if file.server.hostname.is_empty() {
            file.server.hostname = gethostname::gethostname().to_string_lossy().into_owned();
        }
        validate::config(&file, source)
    }

    /// The relay domains, in the file's order.
    pub fn relay_domains(&self) -> RelayDomains {
        RelayDomains::new(self.domains.iter().map(DomainConfig::relay))
    }

    /// The effective configuration as TOML: every key, defaults filled in.
    /// Parsing this text again gives an equal `Config`.
    pub fn to_toml(&self) -> String {
        print::to_toml(self)
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

#[cfg(test)]
mod tests {
    //! Also the helpers the tests of `file`, `validate` and `print` share.

    use super::*;

    /// The smallest valid configuration.
    pub(super) const MINIMAL: &str =
        "[server]\nhostname = \"mx2.example.net\"\n[[domain]]\nname = \"example.com\"\n";

    pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    pub(super) fn error(text: &str) -> String {
        parse(text).err().map(|e| e.to_string()).unwrap_or_default()
    }

    /// Each `(text, want)`: parsing `text` (plus a `[[domain]]` unless it has
    /// one or the error is about its absence) fails with an error that names
    /// the file and contains `want`.
    pub(super) fn assert_errors(cases: &[(&str, &str)]) {
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
    fn hostname_defaults_to_the_system_name() {
        let c = parse("[[domain]]\nname = \"example.com\"\n").unwrap();
        assert!(!c.server.hostname.is_empty());
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
