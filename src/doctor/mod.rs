//! `mxspool doctor`: the deployment as the rest of the Internet sees it. A
//! backup MX that is configured correctly can still be useless: DNS may not
//! list it, or list it as the best host (a loop); an MTA-STS policy that
//! does not name it makes enforcing senders skip it; a TLSA record that does
//! not match its certificate makes DANE senders refuse it; a primary that no
//! longer answers, or whose certificate delivery will reject, leaves mail
//! stuck. Each of these is one [`Check`] with a verdict and, when it is not
//! ok, the fix.
//!
//! [`run`] reads DNS through the configured resolver (`delivery.nameservers`)
//! and talks to hosts on the network; it never opens the spool and needs no
//! running server.

mod cert;
mod mta_sts;
mod probe;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use rustls::ClientConfig;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::CertificateDer;
use serde::Serialize;

use crate::clock::Clock;
use crate::config::{Config, DomainConfig, RouteHost, TlsPolicy};
use crate::inbound::tls as inbound_tls;
use crate::outbound::tls as outbound_tls;
use crate::route::{self, Dns, Identity, Mx, MxAnswer, Patience, RouteError};

/// How long any one network step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Our certificate should outlive the next renewal window with room to act.
const MIN_DAYS_LEFT: i64 = 14;

/// What to check and with what.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Only this domain (default: every `[[domain]]`).
    pub domain: Option<String>,
    /// Trusted besides the system's roots (a private CA; tests' CA).
    pub ca_file: Option<PathBuf>,
    /// Port of the MTA-STS policy host (443 but in tests).
    pub mta_sts_port: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// Our host name for checks of the server itself, else the domain.
    pub subject: String,
    /// What was checked: `mx`, `mta-sts`, `primary mx1.example.com smtp`, …
    pub check: String,
    pub status: Verdict,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn count(&self, verdict: Verdict) -> usize {
        self.checks.iter().filter(|c| c.status == verdict).count()
    }

    pub fn failed(&self) -> bool {
        self.count(Verdict::Fail) > 0
    }

    /// One line per check, the fix indented under it, a summary last.
    pub fn text(&self) -> String {
        let subject = self
            .checks
            .iter()
            .map(|c| c.subject.len())
            .max()
            .unwrap_or(0);
        let check = self.checks.iter().map(|c| c.check.len()).max().unwrap_or(0);
        let mut out = String::new();
        for c in &self.checks {
            let mark = match c.status {
                Verdict::Ok => "ok",
                Verdict::Warn => "warn",
                Verdict::Fail => "FAIL",
            };
            let _ = writeln!(
                out,
                "{mark:<4}  {:<subject$}  {:<check$}  {}",
                c.subject, c.check, c.detail
            );
            if let Some(fix) = &c.fix {
                let _ = writeln!(out, "{:<4}  fix: {fix}", "");
            }
        }
        let _ = writeln!(
            out,
            "{} ok, {} warnings, {} failed",
            self.count(Verdict::Ok),
            self.count(Verdict::Warn),
            self.count(Verdict::Fail)
        );
        out
    }

    pub fn json(&self) -> String {
        let value = serde_json::json!({
            "checks": self.checks,
            "ok": self.count(Verdict::Ok),
            "warnings": self.count(Verdict::Warn),
            "failed": self.count(Verdict::Fail),
        });
        serde_json::to_string_pretty(&value).unwrap_or_default() + "\n"
    }
}

/// Why doctor could not run at all (as opposed to a check failing).
#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    #[error("--ca-file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("{0}")]
    Setup(String),
}

/// Runs every check for the server and the chosen domains.
pub async fn run(config: &Config, options: &Options) -> Result<Report, DoctorError> {
    let extra_roots = match &options.ca_file {
        None => Vec::new(),
        Some(path) => cert::load_chain(path).map_err(|reason| DoctorError::CaFile {
            path: path.display().to_string(),
            reason,
        })?,
    };
    let roots = outbound_tls::trusted_roots(&extra_roots).map_err(DoctorError::Setup)?;
    let verifier =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), outbound_tls::provider())
            .build()
            .map_err(|e| DoctorError::Setup(e.to_string()))?;
    let dns = Dns::with_patience(
        &config.delivery.nameservers,
        Patience {
            timeout: Duration::from_secs(5),
            attempts: 2,
        },
    )
    .map_err(|e| DoctorError::Setup(e.to_string()))?;
    let mut doctor = Doctor {
        config,
        dns,
        verifier,
        verifying: outbound_tls::verifying_config(&extra_roots).map_err(DoctorError::Setup)?,
        unverified: outbound_tls::unverified_config().map_err(DoctorError::Setup)?,
        mta_sts_port: options.mta_sts_port,
        own_chain: None,
        checks: Vec::new(),
    };
    doctor.server().await;
    let domains: Vec<DomainConfig> = match &options.domain {
        Some(name) => match config
            .domains
            .iter()
            .find(|d| d.name.eq_ignore_ascii_case(name.trim_end_matches('.')))
        {
            Some(domain) => vec![domain.clone()],
            None => {
                doctor.add(
                    name,
                    "config",
                    Verdict::Fail,
                    format!("not a [[domain]] in {}", config.source.display()),
                    Some(format!(
                        "add [[domain]] name = \"{name}\" to {}",
                        config.source.display()
                    )),
                );
                Vec::new()
            }
        },
        None => config.domains.clone(),
    };
    if domains.is_empty() && options.domain.is_none() {
        doctor.add(
            &config.server.hostname,
            "domains",
            Verdict::Warn,
            "no [[domain]]: this server accepts no mail".into(),
            Some(format!(
                "add a [[domain]] table to {}",
                config.source.display()
            )),
        );
    }
    for domain in &domains {
        doctor.domain(domain).await;
    }
    Ok(Report {
        checks: doctor.checks,
    })
}

struct Doctor<'a> {
    config: &'a Config,
    dns: Dns,
    verifier: Arc<WebPkiServerVerifier>,
    /// For the MTA-STS policy host: verified, as senders fetch it.
    verifying: Arc<ClientConfig>,
    /// For STARTTLS probes: the chain is judged after the handshake.
    unverified: Arc<ClientConfig>,
    mta_sts_port: u16,
    /// Our certificate chain, when `[tls]` names one that loads.
    own_chain: Option<Vec<CertificateDer<'static>>>,
    checks: Vec<Check>,
}

impl Doctor<'_> {
    fn add(
        &mut self,
        subject: &str,
        check: &str,
        status: Verdict,
        detail: String,
        fix: Option<String>,
    ) {
        self.checks.push(Check {
            subject: subject.to_owned(),
            check: check.to_owned(),
            status,
            detail,
            fix,
        });
    }

    fn hostname(&self) -> &str {
        &self.config.server.hostname
    }

    fn our_names(&self) -> Vec<String> {
        let mut names = vec![self.config.server.hostname.clone()];
        names.extend(self.config.server.also_known_as.iter().cloned());
        names
    }

    // ---- the server itself -------------------------------------------------

    async fn server(&mut self) {
        let host = self.hostname().to_owned();
        match self.dns.ips(&host).await {
            Ok(ips) if ips.is_empty() => self.add(
                &host,
                "address",
                Verdict::Fail,
                format!("{host} has no A or AAAA record: senders cannot reach this backup"),
                Some(format!(
                    "publish an A (and AAAA) record for {host}, or set server.hostname to the name that has them"
                )),
            ),
            Ok(ips) => self.add(&host, "address", Verdict::Ok, join(&ips), None),
            Err(e) => self.add(&host, "address", Verdict::Fail, e.to_string(), None),
        }
        self.own_certificate();
        self.tlsa().await;
    }

    fn own_certificate(&mut self) {
        let host = self.hostname().to_owned();
        let Some(tls) = self.config.tls.clone() else {
            self.add(
                &host,
                "certificate",
                Verdict::Warn,
                "no [tls]: STARTTLS is not offered, so mail reaches this backup in clear text \
                 and senders that require TLS skip it"
                    .into(),
                Some(
                    "set [tls] cert and key (e.g. a Let's Encrypt certificate for this host name)"
                        .into(),
                ),
            );
            return;
        };
        let chain = match cert::load_chain(&tls.cert) {
            Ok(chain) => chain,
            Err(reason) => {
                self.add(
                    &host,
                    "certificate",
                    Verdict::Fail,
                    format!("tls.cert: {reason}"),
                    Some(
                        "point tls.cert at a PEM file holding the certificate and its chain".into(),
                    ),
                );
                return;
            }
        };
        if let Err(e) = inbound_tls::acceptor(&tls, &self.config.source) {
            self.add(&host, "certificate", Verdict::Fail, e.to_string(), None);
            return;
        }
        match cert::verify(&self.verifier, &chain, &host) {
            Ok(()) => {
                let others: Vec<String> = self
                    .config
                    .server
                    .also_known_as
                    .iter()
                    .filter(|name| cert::verify(&self.verifier, &chain, name).is_err())
                    .cloned()
                    .collect();
                if others.is_empty() {
                    self.add(
                        &host,
                        "certificate",
                        Verdict::Ok,
                        format!("{}: valid for {}", tls.cert.display(), self.our_names().join(", ")),
                        None,
                    );
                } else {
                    self.add(
                        &host,
                        "certificate",
                        Verdict::Warn,
                        format!(
                            "{}: valid for {host} but not for {} (also_known_as): senders that \
                             reach us by that name and verify will fail",
                            tls.cert.display(),
                            others.join(", ")
                        ),
                        Some("add those names to the certificate".into()),
                    );
                }
            }
            Err(reason) => self.add(
                &host,
                "certificate",
                Verdict::Fail,
                format!("{}: {reason}", tls.cert.display()),
                Some(format!(
                    "use a certificate for {host} from a public CA, with its intermediates in the file"
                )),
            ),
        }
        match cert::not_after(&chain[0]) {
            Ok(end) => {
                let now = (Clock::new().now_ms() / 1000) as i64;
                let days = (end - now).div_euclid(86_400);
                let when = humantime::format_rfc3339_seconds(
                    UNIX_EPOCH + Duration::from_secs(end.max(0) as u64),
                );
                if days < MIN_DAYS_LEFT {
                    self.add(
                        &host,
                        "certificate expiry",
                        Verdict::Fail,
                        if days < 0 {
                            format!("expired at {when}")
                        } else {
                            format!("expires at {when}, in {days} days")
                        },
                        Some("renew it (mxspool reloads [tls] on SIGHUP)".into()),
                    );
                } else {
                    self.add(
                        &host,
                        "certificate expiry",
                        Verdict::Ok,
                        format!("valid until {when} ({days} days)"),
                        None,
                    );
                }
            }
            Err(reason) => self.add(&host, "certificate expiry", Verdict::Fail, reason, None),
        }
        self.own_chain = Some(chain);
    }

    async fn tlsa(&mut self) {
        let host = self.hostname().to_owned();
        let name = format!("_25._tcp.{host}");
        let records = match self.dns.tlsa(&name).await {
            Ok(records) => records,
            Err(e) => {
                self.add(&host, "tlsa", Verdict::Fail, e.to_string(), None);
                return;
            }
        };
        if records.is_empty() {
            self.add(
                &host,
                "tlsa",
                Verdict::Ok,
                format!("no TLSA records at {name} (DANE not used)"),
                None,
            );
            return;
        }
        let Some(chain) = self.own_chain.clone() else {
            self.add(
                &host,
                "tlsa",
                Verdict::Fail,
                format!(
                    "{name} has {} TLSA record(s) but no usable certificate is configured: \
                     DANE senders will not deliver here",
                    records.len()
                ),
                Some("configure [tls], or remove the TLSA records".into()),
            );
            return;
        };
        let matching: Vec<String> = records
            .iter()
            .filter(|r| cert::tlsa_matches(r, &chain))
            .map(cert::tlsa_text)
            .collect();
        if matching.is_empty() {
            let suggestion = cert::suggested_tlsa(&chain[0])
                .map(|r| format!("publish {name}. IN TLSA {r} (and remove stale records)"));
            self.add(
                &host,
                "tlsa",
                Verdict::Fail,
                format!(
                    "none of the {} TLSA record(s) at {name} matches the certificate: DANE senders \
                     will refuse to deliver here",
                    records.len()
                ),
                suggestion,
            );
        } else {
            self.add(
                &host,
                "tlsa",
                Verdict::Ok,
                format!("{name} {} matches the certificate", matching.join(", ")),
                None,
            );
        }
    }

    // ---- one relay domain -----------------------------------------------------

    async fn domain(&mut self, domain: &DomainConfig) {
        let name = domain.name.clone();
        let primaries = self.mx(&name).await;
        let targets: Vec<(String, u16)> = match &domain.route {
            Some(route) => {
                let host = match &route.host {
                    RouteHost::Name(host) => host.clone(),
                    RouteHost::Ip(ip) => ip.to_string(),
                };
                vec![(host, route.port)]
            }
            None => primaries
                .into_iter()
                .map(|host| (host, self.config.delivery.port))
                .collect(),
        };
        let policy = domain.tls.unwrap_or(self.config.delivery.tls);
        for (host, port) in targets {
            self.primary(&name, &host, port, policy).await;
        }
        self.mta_sts(&name).await;
        self.backscatter(domain);
    }

    /// The MX check; returns the hosts better than us (the primaries).
    async fn mx(&mut self, domain: &str) -> Vec<String> {
        let me = Identity {
            names: self.our_names(),
        };
        let answer = match self.dns.mx(domain).await {
            Ok(answer) => answer,
            Err(e) => {
                self.add(domain, "mx", Verdict::Fail, e.to_string(), None);
                return Vec::new();
            }
        };
        let add_us = format!(
            "publish {domain}. IN MX 20 {}. with a preference number higher than the primary's",
            self.hostname()
        );
        let records = match &answer {
            MxAnswer::NoSuchDomain => {
                self.add(
                    domain,
                    "mx",
                    Verdict::Fail,
                    "the domain does not exist in DNS (NXDOMAIN)".into(),
                    Some("check the domain name in the config".into()),
                );
                return Vec::new();
            }
            MxAnswer::NoRecords => {
                self.add(
                    domain,
                    "mx",
                    Verdict::Fail,
                    "no MX records: senders deliver to the domain's own address and never to this backup"
                        .into(),
                    Some(add_us),
                );
                return Vec::new();
            }
            MxAnswer::Records(records) => records.clone(),
        };
        let listed = |r: &Mx| {
            me.names
                .iter()
                .any(|n| n.trim_end_matches('.').eq_ignore_ascii_case(&r.exchange))
        };
        let ours = records
            .iter()
            .filter(|r| listed(r))
            .map(|r| r.preference)
            .min();
        match route::plan(domain, &answer, &me, &mut |_| {}) {
            Err(RouteError::NullMx) => {
                self.add(
                    domain,
                    "mx",
                    Verdict::Fail,
                    "null MX (RFC 7505): the domain says it accepts no mail".into(),
                    Some(add_us),
                );
                Vec::new()
            }
            Err(RouteError::Loop) => {
                self.add(
                    domain,
                    "mx",
                    Verdict::Fail,
                    format!(
                        "{} is the best MX ({}): senders come here first and mail for the domain \
                         has nowhere to go (a loop)",
                        self.hostname(),
                        describe(&records)
                    ),
                    Some("give the primary a lower preference number than this backup".into()),
                );
                Vec::new()
            }
            Err(e) => {
                self.add(domain, "mx", Verdict::Fail, e.to_string(), None);
                Vec::new()
            }
            Ok(hosts) => {
                match ours {
                    None => self.add(
                        domain,
                        "mx",
                        Verdict::Fail,
                        format!(
                            "the MX records ({}) do not list {}: senders never use this backup",
                            describe(&records),
                            me.names.join(" or ")
                        ),
                        Some(add_us),
                    ),
                    Some(preference) => self.add(
                        domain,
                        "mx",
                        Verdict::Ok,
                        format!(
                            "listed at preference {preference}, behind {}",
                            describe(
                                &records
                                    .iter()
                                    .filter(|r| r.preference < preference && !listed(r))
                                    .cloned()
                                    .collect::<Vec<_>>()
                            )
                        ),
                        None,
                    ),
                }
                hosts
            }
        }
    }

    /// A primary: does it answer now, offer STARTTLS, and present a
    /// certificate delivery under `policy` accepts?
    async fn primary(&mut self, domain: &str, host: &str, port: u16, policy: TlsPolicy) {
        let label = format!("primary {host}");
        let addrs: Vec<SocketAddr> = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => match self.dns.ips(host).await {
                Ok(ips) if ips.is_empty() => {
                    self.add(
                        domain,
                        &format!("{label} smtp"),
                        Verdict::Fail,
                        format!("{host} has no A or AAAA record"),
                        Some(format!("publish an address for {host}")),
                    );
                    return;
                }
                Ok(ips) => ips
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, port))
                    .collect(),
                Err(e) => {
                    self.add(
                        domain,
                        &format!("{label} smtp"),
                        Verdict::Fail,
                        e.to_string(),
                        None,
                    );
                    return;
                }
            },
        };
        let helo = self.hostname().to_owned();
        let seen =
            match probe::probe(&addrs, &helo, host, self.unverified.clone(), STEP_TIMEOUT).await {
                Ok(seen) => seen,
                Err(reason) => {
                    self.add(
                        domain,
                        &format!("{label} smtp"),
                        Verdict::Fail,
                        format!("does not answer EHLO: {reason}"),
                        Some(
                            "mail queues here until it does; check the primary and the path to it"
                                .into(),
                        ),
                    );
                    return;
                }
            };
        self.add(
            domain,
            &format!("{label} smtp"),
            Verdict::Ok,
            format!("{} answers: {}", seen.addr, seen.greeting),
            None,
        );
        let needs_tls = matches!(policy, TlsPolicy::Required | TlsPolicy::Verify);
        let policy_name = policy.as_str();
        let chain = match seen.starttls {
            None => {
                self.add(
                    domain,
                    &format!("{label} starttls"),
                    if needs_tls { Verdict::Fail } else { Verdict::Warn },
                    if needs_tls {
                        format!("STARTTLS not offered, and delivery requires it (tls = \"{policy_name}\"): mail will not leave")
                    } else {
                        "STARTTLS not offered: mail goes to the primary in clear text".into()
                    },
                    Some("enable STARTTLS on the primary".into()),
                );
                return;
            }
            Some(Err(reason)) => {
                self.add(
                    domain,
                    &format!("{label} starttls"),
                    if needs_tls {
                        Verdict::Fail
                    } else {
                        Verdict::Warn
                    },
                    reason,
                    Some("fix TLS on the primary".into()),
                );
                return;
            }
            Some(Ok(chain)) => chain,
        };
        self.add(
            domain,
            &format!("{label} starttls"),
            Verdict::Ok,
            "offered, handshake completes".into(),
            None,
        );
        let verdict = match cert::verify(&self.verifier, &chain, host) {
            Ok(()) => (Verdict::Ok, format!("valid for {host}"), None),
            Err(reason) if policy == TlsPolicy::Verify => (
                Verdict::Fail,
                format!("{reason}, and delivery verifies (tls = \"verify\"): mail will not leave"),
                Some(format!(
                    "give the primary a certificate for {host}, or relax this domain's tls"
                )),
            ),
            Err(reason) => (
                Verdict::Warn,
                format!("{reason} (delivery does not verify: tls = \"{policy_name}\")"),
                Some(format!("give the primary a certificate for {host}")),
            ),
        };
        self.add(
            domain,
            &format!("{label} certificate"),
            verdict.0,
            verdict.1,
            verdict.2,
        );
    }

    async fn mta_sts(&mut self, domain: &str) {
        let txt_name = format!("_mta-sts.{domain}");
        let txt = match self.dns.txt(&txt_name).await {
            Ok(txt) => txt,
            Err(e) => {
                self.add(domain, "mta-sts", Verdict::Fail, e.to_string(), None);
                return;
            }
        };
        let id = match mta_sts::record(&txt) {
            mta_sts::Record::Absent => {
                self.add(
                    domain,
                    "mta-sts",
                    Verdict::Ok,
                    format!("no MTA-STS policy published ({txt_name} has no v=STSv1 record)"),
                    None,
                );
                return;
            }
            mta_sts::Record::Unusable(reason) => {
                self.add(
                    domain,
                    "mta-sts",
                    Verdict::Warn,
                    format!("{txt_name}: {reason}: senders ignore the policy"),
                    Some(format!(
                        "publish exactly one \"v=STSv1; id=<letters and digits>\" TXT record at {txt_name}"
                    )),
                );
                return;
            }
            mta_sts::Record::Valid { id } => id,
        };
        let url = format!("https://mta-sts.{domain}/.well-known/mta-sts.txt");
        let text = match mta_sts::fetch(
            &self.dns,
            domain,
            self.mta_sts_port,
            self.verifying.clone(),
            STEP_TIMEOUT,
        )
        .await
        {
            Ok(text) => text,
            Err(reason) => {
                self.add(
                    domain,
                    "mta-sts",
                    Verdict::Fail,
                    format!("{txt_name} announces a policy (id {id}) but {url} cannot be fetched: {reason}"),
                    Some(format!(
                        "serve the policy at {url} with a valid certificate, or remove {txt_name}"
                    )),
                );
                return;
            }
        };
        let policy = match mta_sts::parse(&text) {
            Ok(policy) => policy,
            Err(reason) => {
                self.add(
                    domain,
                    "mta-sts",
                    Verdict::Fail,
                    format!("{url}: {reason}"),
                    Some("fix the policy file (RFC 8461 section 3.2)".into()),
                );
                return;
            }
        };
        let mode = match policy.mode {
            mta_sts::Mode::Enforce => "enforce",
            mta_sts::Mode::Testing => "testing",
            mta_sts::Mode::None => "none",
        };
        if policy.mode == mta_sts::Mode::None {
            self.add(
                domain,
                "mta-sts",
                Verdict::Ok,
                "policy mode none: senders do not apply it".into(),
                None,
            );
            return;
        }
        let names = self.our_names();
        let covered = names
            .iter()
            .any(|name| policy.mx.iter().any(|p| mta_sts::matches(p, name)));
        if !covered {
            let verdict = if policy.mode == mta_sts::Mode::Enforce {
                Verdict::Fail
            } else {
                Verdict::Warn
            };
            let effect = if verdict == Verdict::Fail {
                "senders that enforce MTA-STS skip this backup"
            } else {
                "once the mode is enforce, senders will skip this backup"
            };
            self.add(
                domain,
                "mta-sts",
                verdict,
                format!(
                    "mode {mode}, mx: {} does not match {}: {effect}",
                    policy.mx.join(", "),
                    self.hostname()
                ),
                Some(format!(
                    "add \"mx: {}\" to {url} and change the id in {txt_name}",
                    self.hostname()
                )),
            );
            return;
        }
        if policy.mode == mta_sts::Mode::Enforce && self.config.tls.is_none() {
            self.add(
                domain,
                "mta-sts",
                Verdict::Fail,
                format!(
                    "mode enforce lists {} but this server has no [tls]: enforcing senders \
                     require STARTTLS and skip it",
                    self.hostname()
                ),
                Some("set [tls] cert and key".into()),
            );
            return;
        }
        self.add(
            domain,
            "mta-sts",
            Verdict::Ok,
            format!(
                "mode {mode}, mx: {} covers {}",
                policy.mx.join(", "),
                self.hostname()
            ),
            None,
        );
    }

    fn backscatter(&mut self, domain: &DomainConfig) {
        let knows_recipients = !domain.recipients.is_empty()
            || domain.recipients_file.is_some()
            || domain.verify_recipients;
        if knows_recipients {
            self.add(
                &domain.name,
                "recipients",
                Verdict::Ok,
                "unknown recipients are refused at RCPT".into(),
                None,
            );
        } else {
            self.add(
                &domain.name,
                "recipients",
                Verdict::Warn,
                "no recipient list and verify_recipients = false: mail to any address is \
                 accepted, and when the primary refuses it the bounce goes to a sender that \
                 is usually forged (backscatter)"
                    .into(),
                Some("set recipients, recipients_file or verify_recipients = true".into()),
            );
        }
    }
}

fn describe(records: &[Mx]) -> String {
    if records.is_empty() {
        return "nothing".into();
    }
    let mut sorted = records.to_vec();
    sorted.sort_by_key(|r| r.preference);
    sorted
        .iter()
        .map(|r| format!("{} {}", r.preference, r.exchange))
        .collect::<Vec<_>>()
        .join(", ")
}

fn join(ips: &[std::net::IpAddr]) -> String {
    ips.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
