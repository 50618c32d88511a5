//! `mxspool doctor`, the real binary, against a real DNS server on loopback
//! (MX, A, TXT and TLSA records), a real SMTP primary with STARTTLS, and a
//! real HTTPS server for the MTA-STS policy, all with certificates from a CA
//! made for the test and passed with `--ca-file`. Every check is seen
//! passing and failing.

mod dns_server;
mod primary;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use dns_server::TestDns;
use primary::{Caps, Mode, Primary, TlsIdentity};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PublicKeyData,
};
use ring::digest;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

const HOST: &str = "mx2.example.net";
const DOMAIN: &str = "example.com";
const PRIMARY: &str = "mx1.example.com";
const GOOD_POLICY: &str = "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.com\r\nmx: *.example.net\r\nmax_age: 86400\r\n";

/// A CA made for the test, and leaf certificates it issues.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf: its chain (leaf, CA) and key, as DER and as PEM.
struct Leaf {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    chain_pem: String,
    key_pem: String,
    spki: Vec<u8>,
}

impl Ca {
    fn new() -> Ca {
        Ca::named("mxspool doctor test CA")
    }

    fn named(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// A leaf for `names`, valid for `days` more days.
    fn leaf(&self, names: &[&str], days: i64) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(days);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            chain: vec![cert.der().clone(), self.issuer.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            chain_pem: cert.pem() + &self.issuer.pem(),
            key_pem: key.serialize_pem(),
            spki: key.subject_public_key_info(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }
}

/// An HTTPS server for `https://mta-sts.example.com/.well-known/mta-sts.txt`
/// answering whatever status and body the test sets.
struct PolicyServer {
    port: u16,
    reply: Arc<Mutex<(u16, String)>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl PolicyServer {
    async fn start(leaf: &Leaf) -> PolicyServer {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(leaf.chain.clone(), leaf.key.clone_key())
        .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let reply = Arc::new(Mutex::new((200, GOOD_POLICY.to_string())));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (r, q) = (reply.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, reply, requests) = (acceptor.clone(), r.clone(), q.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    requests
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&request).into_owned());
                    let (status, body) = reply.lock().unwrap().clone();
                    let response = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(response.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        PolicyServer {
            port,
            reply,
            requests,
        }
    }

    fn set(&self, status: u16, body: &str) {
        *self.reply.lock().unwrap() = (status, body.to_string());
    }
}

/// Everything a deployment has: DNS, our certificate, the primary, the
/// policy host, and the config that ties them together.
struct World {
    dir: TempDir,
    dns: TestDns,
    ca: Ca,
    primary: Primary,
    policy: PolicyServer,
    /// Our own certificate (`[tls]`) as it sits in `dir`.
    own: Leaf,
    ca_file: PathBuf,
    /// `[tls]` in the config (`None`: no `[tls]` table).
    tls: Option<(PathBuf, PathBuf)>,
    /// `delivery.tls`.
    delivery_tls: &'static str,
    /// The `[[domain]]` tables.
    domains: String,
}

/// What one `mxspool doctor` run printed and how it exited.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.stdout, self.stderr))
    }

    /// The report's line for `check` about `subject`.
    fn find(&self, subject: &str, check: &str) -> Value {
        self.json()["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["subject"] == subject && c["check"] == check)
            .cloned()
            .unwrap_or_else(|| panic!("no check {subject} / {check} in {}", self.stdout))
    }

    /// The status of `check` about `subject`, and its detail.
    fn status(&self, subject: &str, check: &str) -> (String, String) {
        let found = self.find(subject, check);
        (
            found["status"].as_str().unwrap().to_string(),
            found["detail"].as_str().unwrap().to_string(),
        )
    }

    fn fix(&self, subject: &str, check: &str) -> String {
        self.find(subject, check)["fix"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    #[track_caller]
    fn expect(&self, subject: &str, check: &str, status: &str, detail_has: &str) {
        let (got, detail) = self.status(subject, check);
        assert_eq!(
            got, status,
            "{subject} / {check}: {detail}\nwhole report:\n{}",
            self.stdout
        );
        assert!(
            detail.contains(detail_has),
            "{subject} / {check}: {detail:?} should mention {detail_has:?}"
        );
    }
}

fn sha256(bytes: &[u8]) -> Vec<u8> {
    digest::digest(&digest::SHA256, bytes).as_ref().to_vec()
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

impl World {
    /// A sound deployment: we are MX 20 behind the primary at 10, the
    /// primary speaks STARTTLS with a valid certificate, our certificate is
    /// valid for 90 days and matches its TLSA record, and the enforced
    /// MTA-STS policy lists us.
    async fn sound() -> World {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new();
        let dns = TestDns::start().await;
        dns.set_mx(DOMAIN, &[(10, PRIMARY), (20, HOST)]);
        let loopback = ["127.0.0.1".parse().unwrap()];
        dns.set_ips(PRIMARY, &loopback);
        dns.set_ips(HOST, &loopback);
        dns.set_ips("mta-sts.example.com", &loopback);
        dns.set_txt("_mta-sts.example.com", &["v=STSv1; id=20261207T1"]);

        let primary = Primary::start().await;
        let primary_leaf = ca.leaf(&[PRIMARY], 90);
        primary.set_capabilities(Caps {
            starttls: Some(TlsIdentity::from_chain(
                primary_leaf.chain.clone(),
                primary_leaf.key.clone_key(),
            )),
            ..Caps::default()
        });
        let policy = PolicyServer::start(&ca.leaf(&["mta-sts.example.com"], 90)).await;

        let own = ca.leaf(&[HOST], 90);
        dns.set_tlsa(&format!("_25._tcp.{HOST}"), &[(3, 1, 1, sha256(&own.spki))]);
        let ca_file = dir.path().join("ca.pem");
        write(&ca_file, &ca.pem());
        let mut world = World {
            dir,
            dns,
            ca,
            primary,
            policy,
            own,
            ca_file,
            tls: None,
            delivery_tls: "verify",
            domains: format!("[[domain]]\nname = \"{DOMAIN}\"\nrecipients = [\"alice\"]\n"),
        };
        world.install_own(&world.own.chain_pem.clone(), &world.own.key_pem.clone());
        world
    }

    /// Writes our certificate and key and names them in `[tls]`.
    fn install_own(&mut self, chain_pem: &str, key_pem: &str) {
        let cert = self.dir.path().join("fullchain.pem");
        let key = self.dir.path().join("privkey.pem");
        write(&cert, chain_pem);
        write(&key, key_pem);
        self.tls = Some((cert, key));
    }

    fn config(&self) -> PathBuf {
        let tls = match &self.tls {
            Some((cert, key)) => format!(
                "[tls]\ncert = \"{}\"\nkey = \"{}\"\n\n",
                cert.display(),
                key.display()
            ),
            None => String::new(),
        };
        let text = format!(
            "[server]\nhostname = \"{HOST}\"\nlisten = [\"127.0.0.1:0\"]\n\n{tls}\
             [spool]\npath = \"{dir}/spool.redb\"\n\n\
             [delivery]\nport = {port}\nnameservers = [\"{dns}\"]\ntls = \"{policy}\"\n\
             postmaster = \"postmaster@example.com\"\n\n\
             [http]\nlisten = \"127.0.0.1:0\"\n\n{domains}",
            dir = self.dir.path().display(),
            port = self.primary.addr.port(),
            dns = self.dns.addr,
            policy = self.delivery_tls,
            domains = self.domains,
        );
        let path = self.dir.path().join("mxspool.toml");
        write(&path, &text);
        path
    }

    /// `mxspool doctor --json` plus `extra` arguments.
    async fn doctor(&self, extra: &[&str]) -> Run {
        let mut args = vec!["--json"];
        args.extend_from_slice(extra);
        self.run(&args).await
    }

    async fn run(&self, extra: &[&str]) -> Run {
        let config = self.config();
        let port = self.policy.port.to_string();
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_mxspool"))
            .arg("doctor")
            .arg("-c")
            .arg(&config)
            .arg("--ca-file")
            .arg(&self.ca_file)
            .args(["--mta-sts-port", &port])
            .args(extra)
            .env_remove("MXSPOOL_CONFIG")
            .output()
            .await
            .unwrap();
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

#[tokio::test]
async fn a_sound_deployment_passes_every_check() {
    let world = World::sound().await;
    let run = world.doctor(&[]).await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    run.expect(HOST, "address", "ok", "127.0.0.1");
    run.expect(HOST, "certificate", "ok", "valid for mx2.example.net");
    run.expect(HOST, "certificate expiry", "ok", "days");
    run.expect(HOST, "tlsa", "ok", "3 1 1");
    run.expect(
        DOMAIN,
        "mx",
        "ok",
        "preference 20, behind 10 mx1.example.com",
    );
    run.expect(DOMAIN, "primary mx1.example.com smtp", "ok", "127.0.0.1");
    run.expect(
        DOMAIN,
        "primary mx1.example.com starttls",
        "ok",
        "handshake",
    );
    run.expect(
        DOMAIN,
        "primary mx1.example.com certificate",
        "ok",
        "valid for",
    );
    run.expect(DOMAIN, "mta-sts", "ok", "mode enforce");
    run.expect(DOMAIN, "recipients", "ok", "refused at RCPT");
    let report = run.json();
    assert_eq!(report["failed"], 0);
    assert_eq!(report["warnings"], 0);
    // The policy was fetched as senders fetch it.
    let requests = world.policy.requests.lock().unwrap().clone();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("GET /.well-known/mta-sts.txt HTTP/1.1")
                && r.to_ascii_lowercase().contains("host: mta-sts.example.com")),
        "{requests:?}"
    );
    // The probe said EHLO as us, and sent no mail.
    let commands = world.primary.commands();
    assert!(
        commands.iter().any(|c| c == &format!("EHLO {HOST}")),
        "{commands:?}"
    );
    assert!(world.primary.messages().is_empty());

    // The text form: one line per check and a summary.
    let text = world.run(&[]).await;
    assert_eq!(text.code, 0);
    assert!(
        text.stdout
            .lines()
            .any(|l| l.starts_with("ok") && l.contains(DOMAIN) && l.contains("mta-sts")),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout
            .trim_end()
            .ends_with("10 ok, 0 warnings, 0 failed"),
        "{}",
        text.stdout
    );
}

#[tokio::test]
async fn mx_records_that_make_the_backup_useless_fail() {
    let world = World::sound().await;
    let only = ["--domain", DOMAIN];

    // Not listed at all: nobody ever sends here.
    world.dns.set_mx(DOMAIN, &[(10, PRIMARY)]);
    let run = world.doctor(&only).await;
    assert_eq!(run.code, 1, "{}", run.stdout);
    run.expect(DOMAIN, "mx", "fail", "do not list mx2.example.net");
    assert!(run.fix(DOMAIN, "mx").contains("IN MX 20 mx2.example.net."));
    assert!(run.stderr.contains("check(s) failed"), "{}", run.stderr);

    // The best MX: mail loops.
    world.dns.set_mx(DOMAIN, &[(10, HOST), (20, PRIMARY)]);
    let run = world.doctor(&only).await;
    assert_eq!(run.code, 1);
    run.expect(DOMAIN, "mx", "fail", "is the best MX");

    // Same preference as the primary: not better, so also a loop.
    world.dns.set_mx(DOMAIN, &[(10, HOST), (10, PRIMARY)]);
    world
        .doctor(&only)
        .await
        .expect(DOMAIN, "mx", "fail", "best MX");

    // No MX records: senders use the domain's own address.
    world.dns.set_mx(DOMAIN, &[]);
    let run = world.doctor(&only).await;
    run.expect(DOMAIN, "mx", "fail", "no MX records");

    // A domain that does not exist.
    world.dns.remove(DOMAIN);
    world
        .doctor(&only)
        .await
        .expect(DOMAIN, "mx", "fail", "NXDOMAIN");

    // Our own name without an address.
    world.dns.set_mx(DOMAIN, &[(10, PRIMARY), (20, HOST)]);
    world.dns.remove(HOST);
    let run = world.doctor(&only).await;
    run.expect(HOST, "address", "fail", "no A or AAAA record");
    run.expect(DOMAIN, "mx", "ok", "preference 20");
}

#[tokio::test]
async fn primaries_that_are_down_or_lack_tls_are_reported() {
    let mut world = World::sound().await;
    let only = ["--domain", DOMAIN];
    let smtp = "primary mx1.example.com smtp";
    let starttls = "primary mx1.example.com starttls";
    let certificate = "primary mx1.example.com certificate";

    world.primary.set_mode(Mode::Down);
    let run = world.doctor(&only).await;
    assert_eq!(run.code, 1);
    run.expect(DOMAIN, smtp, "fail", "does not answer EHLO");
    world.primary.set_mode(Mode::Greet421);
    world
        .doctor(&only)
        .await
        .expect(DOMAIN, smtp, "fail", "greeted with 421");
    world.primary.set_mode(Mode::Up);

    // No STARTTLS: fatal when delivery verifies, a warning otherwise.
    world.primary.set_capabilities(Caps::default());
    let run = world.doctor(&only).await;
    assert_eq!(run.code, 1);
    run.expect(DOMAIN, smtp, "ok", "answers");
    run.expect(DOMAIN, starttls, "fail", "delivery requires it");
    world.delivery_tls = "opportunistic";
    let run = world.doctor(&only).await;
    assert_eq!(run.code, 0, "{}", run.stdout);
    run.expect(DOMAIN, starttls, "warn", "clear text");

    // A certificate for another name, or from a CA nobody trusts.
    let wrong = world.ca.leaf(&["other.example.org"], 90);
    world.primary.set_capabilities(Caps {
        starttls: Some(TlsIdentity::from_chain(wrong.chain, wrong.key)),
        ..Caps::default()
    });
    world
        .doctor(&only)
        .await
        .expect(DOMAIN, certificate, "warn", "not valid for mx1.example.com");
    world.delivery_tls = "verify";
    let run = world.doctor(&only).await;
    assert_eq!(run.code, 1);
    run.expect(DOMAIN, starttls, "ok", "handshake");
    run.expect(DOMAIN, certificate, "fail", "not valid for mx1.example.com");
    let (stranger, _) = TlsIdentity::generate(&[PRIMARY]);
    world.primary.set_capabilities(Caps {
        starttls: Some(stranger),
        ..Caps::default()
    });
    world
        .doctor(&only)
        .await
        .expect(DOMAIN, certificate, "fail", "trusted root");
    // STARTTLS offered but the handshake is not TLS.
    world.primary.set_capabilities(Caps {
        starttls: Some(TlsIdentity::broken()),
        ..Caps::default()
    });
    world
        .doctor(&only)
        .await
        .expect(DOMAIN, starttls, "fail", "handshake failed");

    // A domain's own tls overrides delivery's.
    world.domains = format!(
        "[[domain]]\nname = \"{DOMAIN}\"\nrecipients = [\"alice\"]\ntls = \"opportunistic\"\n"
    );
    world
        .doctor(&only)
        .await
        .expect(DOMAIN, starttls, "warn", "handshake failed");
}

#[tokio::test]
async fn a_static_route_is_probed_instead_of_the_mx_hosts() {
    let mut world = World::sound().await;
    world.delivery_tls = "opportunistic";
    // The MX host is down; delivery goes to the route, which is up.
    let route = Primary::start().await;
    world.primary.set_mode(Mode::Down);
    world.domains = format!(
        "[[domain]]\nname = \"{DOMAIN}\"\nrecipients = [\"alice\"]\nroute = \"[127.0.0.1]:{}\"\n",
        route.addr.port()
    );
    let run = world.doctor(&[]).await;
    run.expect(DOMAIN, "primary 127.0.0.1 smtp", "ok", "answers");
    run.expect(DOMAIN, "primary 127.0.0.1 starttls", "warn", "clear text");
    assert!(
        !run.stdout.contains("primary mx1.example.com"),
        "{}",
        run.stdout
    );
    assert_eq!(
        route.commands().first().map(String::as_str),
        Some("EHLO mx2.example.net")
    );
}

#[tokio::test]
async fn our_certificate_must_exist_match_and_last() {
    let mut world = World::sound().await;
    let only = ["--domain", DOMAIN];

    // For another name.
    let other = world.ca.leaf(&["mail.example.org"], 90);
    world.install_own(&other.chain_pem, &other.key_pem);
    let run = world.doctor(&only).await;
    assert_eq!(run.code, 1);
    run.expect(HOST, "certificate", "fail", "not valid for mx2.example.net");

    // Valid, but only for five more days.
    let short = world.ca.leaf(&[HOST], 5);
    world.install_own(&short.chain_pem, &short.key_pem);
    let run = world.doctor(&only).await;
    run.expect(HOST, "certificate", "ok", "valid for");
    run.expect(HOST, "certificate expiry", "fail", "expires at");
    let (_, detail) = run.status(HOST, "certificate expiry");
    assert!(
        detail.ends_with("in 4 days") || detail.ends_with("in 5 days"),
        "{detail}"
    );
    let fifteen = world.ca.leaf(&[HOST], 15);
    world.install_own(&fifteen.chain_pem, &fifteen.key_pem);
    world
        .doctor(&only)
        .await
        .expect(HOST, "certificate expiry", "ok", "valid until");

    // Expired.
    let expired = world.ca.leaf(&[HOST], -1);
    world.install_own(&expired.chain_pem, &expired.key_pem);
    let run = world.doctor(&only).await;
    run.expect(HOST, "certificate", "fail", "expired");
    run.expect(HOST, "certificate expiry", "fail", "expired at");

    // From a CA senders do not trust (the test CA is not passed).
    world.install_own(&world.own.chain_pem.clone(), &world.own.key_pem.clone());
    let no_ca = World {
        ca_file: world.dir.path().join("empty-ca.pem"),
        ..world
    };
    write(&no_ca.ca_file, &Ca::named("some other CA").pem());
    no_ca.doctor(&only).await.expect(
        HOST,
        "certificate",
        "fail",
        "does not chain to a trusted root",
    );
    let mut world = no_ca;
    write(&world.ca_file, &world.ca.pem());

    // A key that is not the certificate's.
    let stranger = world.ca.leaf(&[HOST], 90);
    world.install_own(&world.own.chain_pem.clone(), &stranger.key_pem);
    world
        .doctor(&only)
        .await
        .expect(HOST, "certificate", "fail", "does not match tls.cert");

    // Missing.
    world.tls = Some((
        world.dir.path().join("missing.pem"),
        world.dir.path().join("privkey.pem"),
    ));
    world
        .doctor(&only)
        .await
        .expect(HOST, "certificate", "fail", "missing.pem");

    // No [tls] at all: a warning, but an enforced MTA-STS policy and a TLSA
    // record then fail.
    world.tls = None;
    let run = world.doctor(&only).await;
    run.expect(HOST, "certificate", "warn", "STARTTLS is not offered");
    run.expect(HOST, "tlsa", "fail", "no usable certificate");
    run.expect(DOMAIN, "mta-sts", "fail", "no [tls]");
}

#[tokio::test]
async fn tlsa_records_must_match_our_certificate() {
    let world = World::sound().await;
    let name = format!("_25._tcp.{HOST}");
    let only = ["--domain", DOMAIN];

    // A stale record (the key before a renewal).
    world.dns.set_tlsa(&name, &[(3, 1, 1, vec![0xab; 32])]);
    let run = world.doctor(&only).await;
    assert_eq!(run.code, 1);
    run.expect(HOST, "tlsa", "fail", "none of the 1 TLSA record(s)");
    let suggested = format!(
        "3 1 1 {}",
        sha256(&world.own.spki)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    assert!(
        run.fix(HOST, "tlsa").contains(&suggested),
        "{}",
        run.fix(HOST, "tlsa")
    );

    // One stale and one good (a rollover in progress): fine.
    world.dns.set_tlsa(
        &name,
        &[
            (3, 1, 1, vec![0xab; 32]),
            (2, 0, 1, sha256(&world.own.chain[1])),
        ],
    );
    world
        .doctor(&only)
        .await
        .expect(HOST, "tlsa", "ok", "2 0 1");

    // None: DANE is simply not used.
    world.dns.remove(&name);
    world
        .doctor(&only)
        .await
        .expect(HOST, "tlsa", "ok", "DANE not used");
}

#[tokio::test]
async fn an_mta_sts_policy_must_list_the_backup() {
    let world = World::sound().await;
    let only = ["--domain", DOMAIN];

    // Enforced without us: enforcing senders skip the backup.
    world.policy.set(
        200,
        "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmax_age: 604800\n",
    );
    let run = world.doctor(&only).await;
    assert_eq!(run.code, 1);
    run.expect(DOMAIN, "mta-sts", "fail", "skip this backup");
    assert!(run.fix(DOMAIN, "mta-sts").contains("mx: mx2.example.net"));

    // In testing mode it is a warning.
    world.policy.set(
        200,
        "version: STSv1\nmode: testing\nmx: mx1.example.com\nmax_age: 604800\n",
    );
    let run = world.doctor(&only).await;
    assert_eq!(run.code, 0, "{}", run.stdout);
    run.expect(DOMAIN, "mta-sts", "warn", "mode testing");

    // Mode none: nothing to match.
    world
        .policy
        .set(200, "version: STSv1\nmode: none\nmax_age: 604800\n");
    world
        .doctor(&only)
        .await
        .expect(DOMAIN, "mta-sts", "ok", "mode none");

    // Announced but not served, or not a policy.
    world.policy.set(404, "not found");
    let run = world.doctor(&only).await;
    assert_eq!(run.code, 1);
    run.expect(DOMAIN, "mta-sts", "fail", "HTTP 404");
    world.policy.set(301, "");
    world
        .doctor(&only)
        .await
        .expect(DOMAIN, "mta-sts", "fail", "redirects");
    world.policy.set(200, "<html>hello</html>");
    world
        .doctor(&only)
        .await
        .expect(DOMAIN, "mta-sts", "fail", "key: value");
    world.policy.set(200, GOOD_POLICY);
    world.dns.remove("mta-sts.example.com");
    world
        .doctor(&only)
        .await
        .expect(DOMAIN, "mta-sts", "fail", "has no address");

    // Two STSv1 records: senders ignore the policy.
    world
        .dns
        .set_txt("_mta-sts.example.com", &["v=STSv1; id=1", "v=STSv1; id=2"]);
    world
        .doctor(&only)
        .await
        .expect(DOMAIN, "mta-sts", "warn", "2 records");

    // No policy at all.
    world.dns.remove("_mta-sts.example.com");
    world
        .doctor(&only)
        .await
        .expect(DOMAIN, "mta-sts", "ok", "no MTA-STS policy");
}

#[tokio::test]
async fn a_domain_that_accepts_any_recipient_is_warned_about_backscatter() {
    let mut world = World::sound().await;
    world.domains = format!(
        "[[domain]]\nname = \"{DOMAIN}\"\n\n[[domain]]\nname = \"other.test\"\nverify_recipients = true\n"
    );
    world.dns.set_mx("other.test", &[(10, PRIMARY), (20, HOST)]);
    let run = world.doctor(&[]).await;
    assert_eq!(run.code, 0, "warnings alone do not fail: {}", run.stdout);
    run.expect(DOMAIN, "recipients", "warn", "backscatter");
    assert!(run.fix(DOMAIN, "recipients").contains("verify_recipients"));
    run.expect("other.test", "recipients", "ok", "refused at RCPT");
    assert_eq!(run.json()["warnings"], 1, "{}", run.stdout);

    // --domain checks one domain only.
    let run = world.doctor(&["--domain", "other.test"]).await;
    assert!(
        !run.stdout.contains("\"subject\": \"example.com\""),
        "{}",
        run.stdout
    );
    run.expect("other.test", "mx", "ok", "preference 20");
}

#[tokio::test]
async fn bad_arguments_are_explained() {
    let world = World::sound().await;
    let run = world.doctor(&["--domain", "unknown.test"]).await;
    assert_eq!(run.code, 1);
    run.expect("unknown.test", "config", "fail", "not a [[domain]]");

    let broken = world.dir.path().join("broken.pem");
    write(&broken, "not a certificate");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_mxspool"))
        .args(["doctor", "-c"])
        .arg(world.config())
        .arg("--ca-file")
        .arg(&broken)
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--ca-file") && stderr.contains("broken.pem"),
        "{stderr}"
    );

    // A bad config is the usual exit 2, naming the file.
    let bad = world.dir.path().join("bad.toml");
    write(&bad, "[server]\nhostname = 7\n");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_mxspool"))
        .args(["doctor", "-c"])
        .arg(&bad)
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("bad.toml"));
}
