//! `[[fetch]]`: catch-all mailboxes (POP3 or IMAP) whose mail is fetched into
//! the spool. The typed block, its validation and its printing.
//!
//! Checked at load: every required key is there, the name is unique and fit
//! for a URL and a metric label, `tls = "none"` only towards loopback (a
//! password must not cross a network in the clear), each of `domains` is a
//! configured `[[domain]]`, and the password file can be read. The password
//! itself is read again at every connection, so rotating it needs no restart.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::validate::{Validator, normalise_name, one_of};
use super::{ConfigError, DomainConfig, file};
use crate::address::is_domain_name;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchConfig {
    /// Names the account in logs, metrics, the CLI and `/api/fetch/{name}`.
    pub name: String,
    pub protocol: FetchProtocol,
    /// Host name or address, as written (also the TLS server name).
    pub host: String,
    pub port: u16,
    pub tls: FetchTls,
    /// An extra trust anchor (PEM); without it, the system roots.
    pub ca_file: Option<PathBuf>,
    pub username: String,
    pub password_file: PathBuf,
    /// IMAP only.
    pub mailbox: String,
    pub interval: Duration,
    /// Delete on the server after the spool commit; false: remember what was seen.
    pub delete: bool,
    /// Relay domains (normalised names of configured `[[domain]]`s) whose
    /// recipients are taken from the message.
    pub domains: Vec<String>,
    /// Where mail with no usable recipient goes.
    pub postmaster: String,
    pub bounce: FetchBounce,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchProtocol {
    Imap,
    Pop3,
}

impl FetchProtocol {
    pub fn name(self) -> &'static str {
        match self {
            FetchProtocol::Imap => "imap",
            FetchProtocol::Pop3 => "pop3",
        }
    }

    /// The well-known port for this protocol with this kind of TLS.
    fn default_port(self, tls: FetchTls) -> u16 {
        match (self, tls) {
            (FetchProtocol::Imap, FetchTls::Implicit) => 993,
            (FetchProtocol::Imap, _) => 143,
            (FetchProtocol::Pop3, FetchTls::Implicit) => 995,
            (FetchProtocol::Pop3, _) => 110,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchTls {
    /// TLS from the first byte (ports 993, 995).
    Implicit,
    /// STARTTLS (IMAP) or STLS (POP3), required: no fallback to plaintext.
    Starttls,
    /// Plaintext; loopback only.
    None,
}

impl FetchTls {
    fn name(self) -> &'static str {
        match self {
            FetchTls::Implicit => "implicit",
            FetchTls::Starttls => "starttls",
            FetchTls::None => "none",
        }
    }
}

/// Who hears about a permanent failure at the primary for fetched mail: its
/// envelope sender came from a header anyone can forge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchBounce {
    Postmaster,
    Sender,
}

impl Validator<'_> {
    /// Every `[[fetch]]` block; names unique.
    pub(super) fn fetches(
        &self,
        all: &[file::Fetch],
        domains: &[DomainConfig],
        postmaster: &str,
    ) -> Result<Vec<FetchConfig>, ConfigError> {
        let mut fetches: Vec<FetchConfig> = Vec::new();
        for (i, f) in all.iter().enumerate() {
            let fetch = self.fetch(i, f, domains, postmaster)?;
            if fetches.iter().any(|o| o.name == fetch.name) {
                return Err(self.err(
                    format!("fetch[{i}].name"),
                    format!("duplicate fetch name {:?}", fetch.name),
                ));
            }
            fetches.push(fetch);
        }
        Ok(fetches)
    }

    fn fetch(
        &self,
        i: usize,
        f: &file::Fetch,
        domains: &[DomainConfig],
        postmaster: &str,
    ) -> Result<FetchConfig, ConfigError> {
        let key = |k: &str| format!("fetch[{i}].{k}");
        let name = self.fetch_name(&key("name"), &f.name)?;
        let protocol = match f.protocol.as_str() {
            "imap" => FetchProtocol::Imap,
            "pop3" => FetchProtocol::Pop3,
            other => return Err(self.err(key("protocol"), one_of(other, &["imap", "pop3"]))),
        };
        let tls = match f.tls.as_str() {
            "implicit" => FetchTls::Implicit,
            "starttls" => FetchTls::Starttls,
            "none" => FetchTls::None,
            other => {
                let allowed = &["implicit", "starttls", "none"];
                return Err(self.err(key("tls"), one_of(other, allowed)));
            }
        };
        let (host, port) = self.fetch_server(&key("server"), &f.server, protocol, tls)?;
        if tls == FetchTls::None && !is_loopback(&host) {
            return Err(self.err(
                key("tls"),
                format!("\"none\" sends the password in the clear: only allowed to a loopback server, not {host:?}"),
            ));
        }
        let ca_file = Some(f.ca_file.trim())
            .filter(|p| !p.is_empty())
            .map(PathBuf::from);
        if let Some(path) = &ca_file {
            self.readable(&key("ca_file"), path)?;
        }
        if f.username.is_empty() {
            return Err(self.err(key("username"), "is required"));
        }
        let password_file = PathBuf::from(f.password_file.trim());
        if f.password_file.trim().is_empty() {
            return Err(self.err(key("password_file"), "is required"));
        }
        self.readable(&key("password_file"), &password_file)?;
        if protocol == FetchProtocol::Imap && !valid_mailbox(&f.mailbox) {
            return Err(self.err(
                key("mailbox"),
                format!("{:?} is not a mailbox name", f.mailbox),
            ));
        }
        Ok(FetchConfig {
            name,
            protocol,
            host,
            port,
            tls,
            ca_file,
            username: f.username.clone(),
            password_file,
            mailbox: f.mailbox.clone(),
            interval: self.duration(&key("interval"), &f.interval)?,
            delete: f.delete,
            domains: self.fetch_domains(&key("domains"), &f.domains, domains)?,
            postmaster: self.fetch_postmaster(&key("postmaster"), &f.postmaster, postmaster)?,
            bounce: match f.bounce.as_str() {
                "postmaster" => FetchBounce::Postmaster,
                "sender" => FetchBounce::Sender,
                other => {
                    let allowed = &["postmaster", "sender"];
                    return Err(self.err(key("bounce"), one_of(other, allowed)));
                }
            },
        })
    }

    /// Letters, digits, `.`, `_`, `-`: it goes into URLs and metric labels.
    fn fetch_name(&self, key: &str, name: &str) -> Result<String, ConfigError> {
        let fits = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if name.is_empty() {
            return Err(self.err(key, "is required"));
        }
        if name.len() > 64 || !name.chars().all(fits) {
            return Err(self.err(
                key,
                format!("{name:?}: use at most 64 letters, digits, '.', '_' or '-'"),
            ));
        }
        Ok(name.to_owned())
    }

    /// `host`, `host:port`, `[v6]` or `[v6]:port`; the port defaults by
    /// protocol and TLS (993, 143, 995, 110).
    fn fetch_server(
        &self,
        key: &str,
        text: &str,
        protocol: FetchProtocol,
        tls: FetchTls,
    ) -> Result<(String, u16), ConfigError> {
        let text = text.trim();
        let bad = |why: &str| {
            self.err(
                key,
                format!("{text:?} {why}; write e.g. \"mail.isp.example:993\" or \"[::1]:143\""),
            )
        };
        if text.is_empty() {
            return Err(self.err(key, "is required"));
        }
        let (host, port) = match text.strip_prefix('[') {
            Some(rest) => {
                let (ip, after) = rest.split_once(']').ok_or_else(|| bad("lacks a ']'"))?;
                (ip, after.strip_prefix(':'))
            }
            None if text.matches(':').count() > 1 => (text, None),
            None => match text.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (text, None),
            },
        };
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad("has an invalid port"))?,
            None => protocol.default_port(tls),
        };
        if host.parse::<IpAddr>().is_err() && !is_domain_name(&normalise_name(host)) {
            return Err(bad("is not a host name or address"));
        }
        Ok((host.to_owned(), port))
    }

    /// Each must be a configured `[[domain]]` (or covered by one with
    /// `include_subdomains`): mail fetched for it is relayed like SMTP mail.
    fn fetch_domains(
        &self,
        key: &str,
        names: &[String],
        domains: &[DomainConfig],
    ) -> Result<Vec<String>, ConfigError> {
        if names.is_empty() {
            return Err(self.err(key, "needs at least one of the [[domain]] names"));
        }
        let mut out = Vec::new();
        for (j, name) in names.iter().enumerate() {
            let n = normalise_name(name);
            if !domains.iter().any(|d| d.relay().covers(&n)) {
                return Err(self.err(
                    format!("{key}[{j}]"),
                    format!("{name:?} is not one of the configured [[domain]]s"),
                ));
            }
            if !out.contains(&n) {
                out.push(n);
            }
        }
        Ok(out)
    }

    fn fetch_postmaster(
        &self,
        key: &str,
        text: &str,
        default: &str,
    ) -> Result<String, ConfigError> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(default.to_owned());
        }
        match text.rsplit_once('@') {
            Some((local, domain))
                if !local.is_empty()
                    && !local.contains(char::is_whitespace)
                    && is_domain_name(&normalise_name(domain)) =>
            {
                Ok(text.to_owned())
            }
            _ => Err(self.err(
                key,
                format!("{text:?} is not an address like postmaster@example.com"),
            )),
        }
    }

    fn readable(&self, key: &str, path: &std::path::Path) -> Result<(), ConfigError> {
        std::fs::read(path)
            .map(drop)
            .map_err(|e| self.err(key, format!("cannot read {}: {e}", path.display())))
    }
}

fn is_loopback(host: &str) -> bool {
    match host.parse::<IpAddr>() {
        Ok(ip) => ip.to_canonical().is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

/// Printable ASCII without quotes or CR/LF (sent as an IMAP quoted string).
fn valid_mailbox(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// The block as the file spells it (for `check-config`).
pub(super) fn to_file(f: &FetchConfig) -> file::Fetch {
    let server = if f.host.contains(':') {
        format!("[{}]:{}", f.host, f.port)
    } else {
        format!("{}:{}", f.host, f.port)
    };
    file::Fetch {
        name: f.name.clone(),
        protocol: f.protocol.name().into(),
        server,
        tls: f.tls.name().into(),
        ca_file: f
            .ca_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        username: f.username.clone(),
        password_file: f.password_file.display().to_string(),
        mailbox: f.mailbox.clone(),
        interval: super::print::format_duration(f.interval),
        delete: f.delete,
        domains: f.domains.clone(),
        postmaster: f.postmaster.clone(),
        bounce: match f.bounce {
            FetchBounce::Postmaster => "postmaster",
            FetchBounce::Sender => "sender",
        }
        .into(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::config::tests::{MINIMAL, assert_errors, parse};

    fn password_file() -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"secret\n").unwrap();
        f
    }

    fn block(pw: &tempfile::NamedTempFile, extra: &str) -> String {
        format!(
            "{MINIMAL}[[fetch]]\nname = \"isp\"\nprotocol = \"imap\"\nserver = \"mail.isp.example\"\nusername = \"u\"\npassword_file = \"{}\"\ndomains = [\"Example.COM.\"]\n{extra}",
            pw.path().display()
        )
    }

    #[test]
    fn defaults_and_normalisation() {
        let pw = password_file();
        let c = parse(&block(&pw, "")).unwrap();
        let f = &c.fetch[0];
        assert_eq!(f.name, "isp");
        assert_eq!(f.protocol, FetchProtocol::Imap);
        assert_eq!((f.host.as_str(), f.port), ("mail.isp.example", 993));
        assert_eq!(f.tls, FetchTls::Implicit);
        assert_eq!(f.mailbox, "INBOX");
        assert_eq!(f.interval, Duration::from_secs(60));
        assert!(f.delete);
        assert_eq!(f.domains, vec!["example.com".to_string()]);
        assert_eq!(f.postmaster, "postmaster@example.net");
        assert_eq!(f.bounce, FetchBounce::Postmaster);
        assert_eq!(f.ca_file, None);

        let c = parse(
            &block(&pw, "tls = \"starttls\"\nbounce = \"sender\"\npostmaster = \"pm@example.com\"\ninterval = \"30s\"\ndelete = false\n")
                .replace("protocol = \"imap\"", "protocol = \"pop3\""),
        )
        .unwrap();
        let f = &c.fetch[0];
        assert_eq!(
            (f.protocol, f.port, f.tls),
            (FetchProtocol::Pop3, 110, FetchTls::Starttls)
        );
        assert_eq!(f.bounce, FetchBounce::Sender);
        assert_eq!(f.postmaster, "pm@example.com");
        assert!(!f.delete);
        assert_eq!(parse(&c.to_toml()).unwrap(), c, "{}", c.to_toml());
    }

    #[test]
    fn servers_with_ports_and_v6_round_trip() {
        let pw = password_file();
        for (server, host, port) in [
            ("127.0.0.1:1143", "127.0.0.1", 1143),
            ("[::1]:1143", "::1", 1143),
            ("[::1]", "::1", 993),
            ("imap.example:143", "imap.example", 143),
        ] {
            let c = parse(&block(&pw, "").replace("mail.isp.example", server)).unwrap();
            assert_eq!((c.fetch[0].host.as_str(), c.fetch[0].port), (host, port));
            assert_eq!(parse(&c.to_toml()).unwrap(), c);
        }
    }

    #[test]
    fn errors_name_the_block_and_key() {
        let pw = password_file();
        let b = |extra: &str| block(&pw, extra);
        let twice = format!(
            "{}[[fetch]]\nname = \"isp\"\nprotocol = \"pop3\"\nserver = \"x.example\"\nusername = \"u\"\npassword_file = \"{}\"\ndomains = [\"example.com\"]\n",
            b(""),
            pw.path().display()
        );
        let cases = [
            (
                b("").replace("name = \"isp\"\n", ""),
                "fetch[0].name: is required",
            ),
            (b("").replace("\"isp\"", "\"a b\""), "fetch[0].name"),
            (b("").replace("\"imap\"", "\"smtp\""), "fetch[0].protocol"),
            (
                b("tls = \"none\"\n"),
                "fetch[0].tls: \"none\" sends the password in the clear",
            ),
            (b("tls = \"ssl\"\n"), "fetch[0].tls"),
            (
                b("").replace("mail.isp.example", "mail.isp.example:0"),
                "fetch[0].server",
            ),
            (
                b("").replace("mail.isp.example", "bad host"),
                "fetch[0].server",
            ),
            (
                b("").replace("username = \"u\"\n", ""),
                "fetch[0].username: is required",
            ),
            (
                b("").replace(&pw.path().display().to_string(), "/nonexistent/pw"),
                "fetch[0].password_file: cannot read /nonexistent/pw",
            ),
            (
                b("").replace("Example.COM.", "other.example"),
                "fetch[0].domains[0]: \"other.example\" is not one of",
            ),
            (
                b("").replace("[\"Example.COM.\"]", "[]"),
                "fetch[0].domains: needs at least one",
            ),
            (b("postmaster = \"nobody\"\n"), "fetch[0].postmaster"),
            (b("bounce = \"drop\"\n"), "fetch[0].bounce"),
            (b("interval = \"soon\"\n"), "fetch[0].interval"),
            (b("mailbox = \"\"\n"), "fetch[0].mailbox"),
            (b("bogus = 1\n"), "fetch[0].bogus: unknown field"),
            (twice, "fetch[1].name: duplicate fetch name \"isp\""),
        ];
        let cases: Vec<(&str, &str)> = cases.iter().map(|(t, e)| (t.as_str(), *e)).collect();
        assert_errors(&cases);
    }

    #[test]
    fn plaintext_is_allowed_to_loopback() {
        let pw = password_file();
        for host in ["127.0.0.1:143", "[::1]:143", "localhost:143"] {
            let c = parse(&block(&pw, "tls = \"none\"\n").replace("mail.isp.example", host));
            assert!(c.is_ok(), "{host}: {c:?}");
        }
    }
}
