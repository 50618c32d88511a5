//! A real Dovecot 2.3 on 127.0.0.1 for the mailbox-fetch tests: IMAP and POP3,
//! each plain (with STARTTLS/STLS offered) and with implicit TLS, a certificate
//! from a test CA, `{PLAIN}` accounts, and Maildir inboxes the test fills by
//! writing files, as a local delivery agent would.
//!
//! Everything lives in one short temporary directory (Dovecot's unix sockets
//! must fit in `sun_path`): config, certificates, sockets, state, log and
//! mail. The instance is a child process run with `-F`; dropping the handle
//! stops it and waits until every Dovecot process of it has gone. The system
//! Dovecot (if any) is never used.
//!
//! As root, the login processes run as `nobody` (Dovecot refuses to run them
//! as root) and so does mail access (it refuses uid 0 from the userdb); the
//! Maildirs the harness writes are owned accordingly. As any other user,
//! every process runs as that user.
#![allow(dead_code)] // each test binary uses its own subset

use std::fmt::Write as _;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::TcpStream;

const DOVECOT: &str = "/usr/sbin/dovecot";
/// How long Dovecot gets to open its four listeners and greet on each.
const START_LIMIT: Duration = Duration::from_secs(15);
/// Attempts with fresh ports when another process took one of ours between
/// our probe and Dovecot's bind.
const START_ATTEMPTS: usize = 5;
/// How long killed processes get to disappear (and the master to stop).
const STOP_LIMIT: Duration = Duration::from_secs(5);

/// A running Dovecot and the directory holding everything it uses.
pub struct Dovecot {
    /// Config, certificates, sockets, state, log and Maildirs; removed on drop
    /// (after the processes are gone, so nothing writes into it meanwhile).
    dir: TempDir,
    /// The master process (`dovecot -F`); its children are found through it.
    child: Child,
    /// Ports of the four listeners, in the order imap, imaps, pop3, pop3s.
    ports: [u16; 4],
    /// Who owns the mail: what the userdb returns and what `deliver` chowns to.
    mail_owner: Owner,
    /// Trusts the test CA only: for the TLS greetings and for tests.
    tls: Arc<rustls::ClientConfig>,
}

/// A numeric uid/gid pair.
#[derive(Clone, Copy, Debug)]
struct Owner {
    uid: u32,
    gid: u32,
}

/// The accounts Dovecot's processes run as.
struct Accounts {
    /// `default_internal_user` / `default_internal_group` (auth, anvil, stats…).
    internal_user: String,
    internal_group: String,
    /// `default_login_user`: never root, Dovecot insists.
    login_user: String,
    /// The userdb's uid/gid: never 0, Dovecot insists.
    mail: Owner,
}

impl Accounts {
    /// Root: internal processes as root, login and mail as `nobody`.
    /// Anyone else: everything as themselves.
    fn for_current_user(probe: &Path) -> Accounts {
        let meta = fs::metadata(probe).expect("stat the temporary directory");
        if meta.uid() == 0 {
            Accounts {
                internal_user: "root".into(),
                internal_group: id(&["-gn"]),
                login_user: "nobody".into(),
                mail: Owner {
                    uid: id(&["-u", "nobody"]).parse().expect("uid of nobody"),
                    gid: id(&["-g", "nobody"]).parse().expect("gid of nobody"),
                },
            }
        } else {
            let user = id(&["-un"]);
            Accounts {
                internal_group: id(&["-gn"]),
                login_user: user.clone(),
                internal_user: user,
                mail: Owner {
                    uid: meta.uid(),
                    gid: meta.gid(),
                },
            }
        }
    }
}

/// The output of `id ARGS` (user and group lookups through NSS, without libc).
fn id(args: &[&str]) -> String {
    let out = Command::new("id").args(args).output().expect("run id");
    assert!(out.status.success(), "id {args:?} failed");
    String::from_utf8(out.stdout)
        .expect("id prints UTF-8")
        .trim()
        .to_string()
}

/// Four distinct free loopback ports: bound together, then released.
fn free_ports() -> [u16; 4] {
    let listeners: Vec<_> = (0..4)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a probe port"))
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().expect("probe address").port())
}

/// Writes the test CA (`ca.pem`) and a leaf it signed for 127.0.0.1 and
/// localhost (`server.pem`, `server.key`) into `dir`; returns the CA.
fn certificates(dir: &Path) -> CertificateDer<'static> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "mxspool Dovecot test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let leaf = params.signed_by(&key, &ca).unwrap();

    fs::write(dir.join("ca.pem"), ca.pem()).expect("write ca.pem");
    fs::write(dir.join("server.pem"), leaf.pem()).expect("write server.pem");
    let key_path = dir.join("server.key");
    fs::write(&key_path, key.serialize_pem()).expect("write server.key");
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).expect("chmod key");
    ca.der().clone()
}

/// The whole `dovecot.conf`: nothing is read from /etc/dovecot.
fn config(dir: &Path, ports: [u16; 4], accounts: &Accounts) -> String {
    let d = dir.display();
    let [imap, imaps, pop3, pop3s] = ports;
    let Accounts {
        internal_user,
        internal_group,
        login_user,
        mail: Owner { uid, gid },
    } = accounts;
    format!(
        r#"# Written by tests/common/dovecot.rs for one test; loopback only.
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
listen = 127.0.0.1
protocols = imap pop3

default_internal_user = {internal_user}
default_internal_group = {internal_group}
default_login_user = {login_user}
first_valid_uid = {uid}
first_valid_gid = {gid}

ssl = yes
ssl_cert = <{d}/server.pem
ssl_key = <{d}/server.key

# Plain LOGIN/USER+PASS without TLS is what `tls = "none"` tests need.
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
# A refused password would otherwise hold its reply for 2 s.
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {d}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={d}/mail/%u
}}

mail_location = maildir:{d}/mail/%u/Maildir
pop3_uidl_format = %08Xu%08Xv
# IDLE notices mail written into the Maildir within a second even without inotify.
mailbox_idle_check_interval = 1 secs

# No chroot: it needs root, and buys a test nothing.
service anvil {{
  chroot =
  # No auth penalty: after a refused password, every login from 127.0.0.1
  # would wait 2 s and more (up to 15 s). Mode 0 leaves the socket out, and
  # auth then skips the penalty without a word.
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service ipc {{
  chroot =
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    port = {imap}
  }}
  inet_listener imaps {{
    port = {imaps}
    ssl = yes
  }}
}}
service pop3-login {{
  chroot =
  inet_listener pop3 {{
    port = {pop3}
  }}
  inet_listener pop3s {{
    port = {pop3s}
    ssl = yes
  }}
}}
"#
    )
}

/// Writes the config for `ports` and starts `dovecot -F` on it.
fn launch(dir: &Path, ports: [u16; 4], accounts: &Accounts) -> Child {
    let conf = dir.join("dovecot.conf");
    fs::write(&conf, config(dir, ports, accounts)).expect("write dovecot.conf");
    // Errors before the log process is up (a failed bind) go to stderr.
    let stderr = fs::File::create(dir.join("stderr.log")).expect("create stderr.log");
    Command::new(DOVECOT)
        .arg("-F")
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("start {DOVECOT}: {e}"))
}

/// Why one attempt to start did not give a running instance.
enum StartFailure {
    /// A port was taken between our probe and Dovecot's bind: try others.
    PortTaken,
}

impl Dovecot {
    /// Starts Dovecot with these (user, password) accounts; waits until all
    /// four ports accept and answer a greeting (over TLS for the implicit-TLS
    /// ones, checking the certificate against the test CA). Call it before
    /// any `tokio::time::pause()`: the waits here are for a real process.
    pub async fn start(users: &[(&str, &str)]) -> Dovecot {
        let version = Command::new(DOVECOT)
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("{DOVECOT}: {e} (install dovecot-imapd and dovecot-pop3d)"));
        let version = String::from_utf8_lossy(&version.stdout);
        assert!(
            version.starts_with("2.3."),
            "this harness writes a Dovecot 2.3 config; {DOVECOT} is {version}"
        );

        // Short: base_dir holds unix sockets, whose paths are limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("dc")
            .tempdir_in("/tmp")
            .expect("temporary directory");
        // Login and mail processes may run as another user and must get in.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let accounts = Accounts::for_current_user(dir.path());
        let ca = certificates(dir.path());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).expect("trust the test CA");
        let tls = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        );

        let mut passwd = String::new();
        for (user, password) in users {
            assert!(
                !user.contains([':', '/', '\n']) && !password.contains([':', '\n']),
                "passwd-file cannot hold {user:?} / {password:?}"
            );
            writeln!(passwd, "{user}:{{PLAIN}}{password}::::::").unwrap();
        }
        fs::write(dir.path().join("passwd"), passwd).expect("write passwd");
        fs::create_dir(dir.path().join("mail")).expect("create mail directory");

        let ports = free_ports();
        let child = launch(dir.path(), ports, &accounts);
        let mut dovecot = Dovecot {
            dir,
            child,
            ports,
            mail_owner: accounts.mail,
            tls,
        };
        for (user, _) in users {
            dovecot.create_maildir(user);
        }
        for _ in 1..START_ATTEMPTS {
            match dovecot.ready().await {
                Ok(()) => return dovecot,
                Err(StartFailure::PortTaken) => {
                    dovecot.stop();
                    // Its complaint must not be taken for the next attempt's.
                    let _ = fs::remove_file(dovecot.dir.path().join("dovecot.log"));
                    dovecot.ports = free_ports();
                    dovecot.child = launch(dovecot.dir.path(), dovecot.ports, &accounts);
                }
            }
        }
        match dovecot.ready().await {
            Ok(()) => dovecot,
            Err(StartFailure::PortTaken) => panic!(
                "Dovecot found a port taken on each of {START_ATTEMPTS} attempts:\n{}",
                dovecot.log()
            ),
        }
    }

    /// Waits until every listener greets; panics with the log if Dovecot
    /// exits or stays silent.
    async fn ready(&mut self) -> Result<(), StartFailure> {
        let deadline = tokio::time::Instant::now() + START_LIMIT;
        let mut waiting: Vec<SocketAddr> = self.addrs().to_vec();
        loop {
            if let Some(status) = self.child.try_wait().expect("poll dovecot") {
                let log = self.log();
                if log.contains("Address already in use") {
                    return Err(StartFailure::PortTaken);
                }
                panic!("Dovecot exited during start-up ({status}):\n{log}");
            }
            let mut still = Vec::new();
            for addr in waiting {
                if self.greeting(addr).await.is_err() {
                    still.push(addr);
                }
            }
            waiting = still;
            if waiting.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "Dovecot did not greet on {waiting:?} within {START_LIMIT:?}:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Connects to `addr` (over TLS for imaps and pop3s) and reads the greeting.
    async fn greeting(&self, addr: SocketAddr) -> Result<(), String> {
        let attempt = async {
            let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let line = if addr == self.imaps() || addr == self.pop3s() {
                let tls = self
                    .tls_connector()
                    .connect(ServerName::IpAddress(Ipv4Addr::LOCALHOST.into()), tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                first_line(tls).await?
            } else {
                first_line(tcp).await?
            };
            let expected = if addr == self.imap() || addr == self.imaps() {
                "* OK"
            } else {
                "+OK"
            };
            if line.starts_with(expected) {
                Ok(())
            } else {
                Err(format!("greeting {line:?}"))
            }
        };
        tokio::time::timeout(Duration::from_secs(3), attempt)
            .await
            .map_err(|_| "no greeting".to_string())?
    }

    fn addrs(&self) -> [SocketAddr; 4] {
        self.ports
            .map(|port| SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    }

    /// IMAP, plain; STARTTLS offered.
    pub fn imap(&self) -> SocketAddr {
        self.addrs()[0]
    }

    /// IMAP over implicit TLS.
    pub fn imaps(&self) -> SocketAddr {
        self.addrs()[1]
    }

    /// POP3, plain; STLS offered.
    pub fn pop3(&self) -> SocketAddr {
        self.addrs()[2]
    }

    /// POP3 over implicit TLS.
    pub fn pop3s(&self) -> SocketAddr {
        self.addrs()[3]
    }

    /// PEM file of the test CA that issued the server certificate (a leaf for
    /// IP 127.0.0.1 and DNS localhost), for mxspool's `ca_file`.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A TLS client that trusts the test CA and nothing else: connect with
    /// server name `127.0.0.1` or `localhost`.
    pub fn tls_connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.tls.clone())
    }

    /// Writes a password file holding `password` and a newline (as `echo`
    /// would write it), mode 0600, for mxspool's `password_file`; returns its
    /// path. Each call makes a new file.
    pub fn password_file(&self, password: &str) -> PathBuf {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = self
            .dir
            .path()
            .join(format!("password-{}", NEXT.fetch_add(1, Ordering::Relaxed)));
        fs::write(&path, format!("{password}\n")).expect("write password file");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        path
    }

    /// The user's Maildir (its INBOX).
    pub fn maildir(&self, user: &str) -> PathBuf {
        self.dir.path().join("mail").join(user).join("Maildir")
    }

    /// Creates the user's home and Maildir (`cur`, `new`, `tmp`) owned by
    /// the mail uid/gid, unless they exist.
    fn create_maildir(&self, user: &str) {
        let home = self.dir.path().join("mail").join(user);
        let maildir = self.maildir(user);
        for path in [
            home.clone(),
            maildir.clone(),
            maildir.join("cur"),
            maildir.join("new"),
            maildir.join("tmp"),
        ] {
            if !path.exists() {
                fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
                self.chown(&path);
            }
        }
    }

    fn chown(&self, path: &Path) {
        std::os::unix::fs::chown(path, Some(self.mail_owner.uid), Some(self.mail_owner.gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }

    /// Puts `message` (bytes as given; CRLF or LF both do) into the user's
    /// INBOX the way a delivery agent does: written into `tmp/`, then renamed
    /// into `new/`, so Dovecot never sees half a message. The new name starts
    /// with the file's modification time (`secs.Musecs`, as Maildir names do)
    /// and a zero-padded sequence number, so Dovecot, which sorts new mail by
    /// name, numbers messages in the order they were delivered.
    pub fn deliver(&self, user: &str, message: &[u8]) {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        self.create_maildir(user);
        let unique = format!(
            "P{}Q{:06}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let maildir = self.maildir(user);
        let tmp = maildir.join("tmp").join(&unique);
        fs::write(&tmp, message).expect("write message into tmp/");
        self.chown(&tmp);
        let written = fs::metadata(&tmp).expect("stat the new message");
        let name = format!(
            "{}.M{:06}{unique}.mxspool-test",
            written.mtime(),
            written.mtime_nsec() / 1000
        );
        fs::rename(&tmp, maildir.join("new").join(name)).expect("move message into new/");
    }

    /// How many messages the user's INBOX holds: files in `new/` and `cur/`
    /// (a message flagged deleted but not yet expunged still counts).
    pub fn count(&self, user: &str) -> usize {
        let maildir = self.maildir(user);
        ["new", "cur"]
            .iter()
            .map(|sub| match fs::read_dir(maildir.join(sub)) {
                Ok(entries) => entries
                    .filter(|e| e.as_ref().is_ok_and(|e| e.path().is_file()))
                    .count(),
                Err(_) => 0,
            })
            .sum()
    }

    /// The Dovecot log so far (and anything it wrote to stderr), for
    /// assertion messages.
    pub fn log(&self) -> String {
        let mut log = fs::read_to_string(self.dir.path().join("dovecot.log")).unwrap_or_default();
        let stderr = fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default();
        if !stderr.is_empty() {
            log.push_str("\n--- stderr\n");
            log.push_str(&stderr);
        }
        log
    }

    /// Kills the instance at once: the master is stopped first so that it
    /// forks nothing more, then it and every child it has get SIGKILL (a
    /// polite SIGTERM costs a second, and login processes with a client
    /// connected outlive it). Returns when none of them runs any more.
    fn stop(&mut self) {
        // Polls counted rather than timed: a test may have paused tokio's
        // clock, and this runs outside any runtime anyway.
        const POLL: Duration = Duration::from_millis(5);
        let polls = STOP_LIMIT.as_millis() / POLL.as_millis();
        let mut victims = Vec::new();
        if matches!(self.child.try_wait(), Ok(None)) {
            let master = self.child.id();
            signal("STOP", &[master]);
            for _ in 0..polls {
                if stat(master).is_none_or(|s| matches!(s.state, 'T' | 'Z' | 'X')) {
                    break;
                }
                std::thread::sleep(POLL);
            }
            victims = children_of(master);
            victims.push(master);
            signal("KILL", &victims);
        }
        let _ = self.child.wait();
        for _ in 0..polls {
            if !victims.iter().any(|&pid| alive(pid)) {
                return;
            }
            std::thread::sleep(POLL);
        }
        // Not a panic: this runs in Drop, perhaps while unwinding.
        eprintln!("Dovecot processes survived SIGKILL for {STOP_LIMIT:?}: {victims:?}");
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- Dovecot log ({})\n{}",
                self.dir.path().display(),
                self.log()
            );
        }
    }
}

/// Sends `signal` (a name such as `KILL`) to `pids` with kill(1): the crate
/// has no libc binding, and a test can afford the process.
fn signal(signal: &str, pids: &[u32]) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .args(pids.iter().map(u32::to_string))
        .stderr(Stdio::null())
        .status();
}

/// Processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| stat(child).is_some_and(|s| s.ppid == pid))
        .collect()
}

/// Still running: a zombie has finished, whether or not anyone reaps it.
fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|s| s.state != 'Z' && s.state != 'X')
}

/// What `/proc/PID/stat` says of a process.
struct Stat {
    state: char,
    ppid: u32,
}

fn stat(pid: u32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    let mut fields = text[text.rfind(')')? + 2..].split(' ');
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some(Stat { state, ppid })
}

/// The first line a server sends, without its line end.
async fn first_line(stream: impl AsyncRead + Unpin) -> Result<String, String> {
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .await
        .map_err(|e| e.to_string())?;
    Ok(line.trim_end().to_string())
}
