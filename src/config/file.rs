//! The file layer: the TOML as written, every default filled in.
//!
//! Each struct mirrors one table of the file with `deny_unknown_fields`, so a
//! misspelt key is an error, and a `Default` holding the documented defaults,
//! so printing it back (see `print`) shows every key. Values stay strings
//! here; `validate` gives them their types. Parsing names the failing key.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ConfigError;

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
    pub greylist: Greylist,
    pub domain: Vec<Domain>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fetch: Vec<Fetch>,
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
    pub trusted: Vec<String>,
    pub dnsbl: Vec<String>,
    pub dnswl: Vec<String>,
    pub dnsbl_threshold: i32,
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
            // RFC 5321 §6.3: a loop threshold of at least 100.
            max_received_headers: 100,
            command_timeout: "5m".into(),
            data_timeout: "10m".into(),
            allow: vec!["0.0.0.0/0".into(), "::/0".into()],
            deny: Vec::new(),
            etrn_allow: vec!["127.0.0.0/8".into()],
            trusted: Vec::new(),
            dnsbl: Vec::new(),
            dnswl: Vec::new(),
            dnsbl_threshold: 1,
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
    pub health_interval: String,
    pub drain_guard: u32,
    pub line_length_limit: usize,
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
            health_interval: "60s".into(),
            drain_guard: 10,
            line_length_limit: 998,
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
pub struct Greylist {
    pub delay: String,
    pub window: String,
    pub remember: String,
}

impl Default for Greylist {
    fn default() -> Self {
        Greylist {
            delay: "5m".into(),
            window: "24h".into(),
            remember: "35d".into(),
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
    pub when_primary_up: String,
    pub spf: String,
    pub greylist: bool,
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
            when_primary_up: "accept".into(),
            spf: "off".into(),
            greylist: false,
        }
    }
}

/// A `[[fetch]]` block. `name`, `protocol`, `server`, `username`,
/// `password_file` and `domains` have no default: `validate` requires them.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Fetch {
    pub name: String,
    pub protocol: String,
    pub server: String,
    pub tls: String,
    pub ca_file: String,
    pub username: String,
    pub password_file: String,
    pub mailbox: String,
    pub interval: String,
    pub delete: bool,
    pub domains: Vec<String>,
    pub postmaster: String,
    pub bounce: String,
}

impl Default for Fetch {
    fn default() -> Self {
        Fetch {
            name: String::new(),
            protocol: String::new(),
            server: String::new(),
            tls: "implicit".into(),
            ca_file: String::new(),
            username: String::new(),
            password_file: String::new(),
            mailbox: "INBOX".into(),
            interval: "1m".into(),
            delete: true,
            domains: Vec::new(),
            postmaster: String::new(),
            bounce: "postmaster".into(),
        }
    }
}

/// TOML -> file layer, with the failing key's path in the error.
pub(super) fn parse(text: &str, source: &Path) -> Result<File, ConfigError> {
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
            key: if path == "." || path.is_empty() {
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use ipnet::IpNet;

    use crate::config::tests::{MINIMAL, assert_errors, error, parse};
    use crate::config::{BouncePolicy, LogFormat, TlsPolicy, UnknownRecipients};

    #[test]
    fn defaults_match_the_design() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.server.listen, vec!["0.0.0.0:25".parse().unwrap()]);
        assert_eq!(c.server.max_message_size, 52_428_800);
        assert_eq!(c.server.max_recipients, 100);
        assert_eq!(c.server.max_connections, 1000);
        assert_eq!(c.server.max_connections_per_ip, 20);
        assert_eq!(c.server.max_received_headers, 100);
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
        assert_eq!(d.line_length_limit, 998);
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
    fn errors_name_the_file_and_the_key() {
        assert_errors(&[
            ("[server]\nlisten = \"x\"\n", "server.listen"),
            (
                "[server]\nbogus = 1\n",
                "server.bogus: unknown field `bogus`",
            ),
            ("bogus = 1\n", "unknown field `bogus`"),
            // An empty key still names where the error is.
            ("\"\" = \"\"\n", "test.toml: (top level): unknown field ``"),
            ("[spool]\nsize = 1\n", "spool.size: unknown field `size`"),
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
                "[delivery]\nline_length_limit = -1\n",
                "delivery.line_length_limit: invalid value",
            ),
            (
                "[server]\nmax_recipients = \"ten\"\n",
                "server.max_recipients: invalid type",
            ),
            ("[tls]\ncert = \"/c\"\n", "tls: missing field `key`"),
            (
                "[[domain]]\nname = \"a.example\"\nfoo = 1\n",
                "domain[0].foo: unknown field `foo`",
            ),
            ("[server\n", "(syntax)"),
        ]);
    }

    #[test]
    fn type_errors_carry_a_line_number() {
        let got = error("[server]\n\nmax_recipients = \"ten\"\n[[domain]]\nname = \"a.example\"\n");
        assert!(got.contains("(line 3)"), "{got}");
    }
}
