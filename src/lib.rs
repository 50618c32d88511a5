//! mxspool: a backup MX. While a domain's primary mail server is unreachable,
//! mxspool accepts the domain's mail, keeps it safe on disk, and hands it to the
//! primary the moment the primary is back. It never delivers to mailboxes and
//! never relays for anyone else.
//!
//! # Layout (in the order mail flows)
//! - [`inbound`]: (1) SMTP in. Sessions, relay policy, DATA handling; commits
//!   finished messages to the spool and says 250 only after the fsync.
//! - [`knowledge`]: what the primaries said about recipients (learned
//!   verdicts, served from memory) and callouts; inbound asks it.
//! - [`spool`]: (2) the durable queue on redb: envelopes, bodies, the due index.
//! - [`scheduler`]: (3) when: the due index, per-destination queues and
//!   workers, probes of down primaries, backoff, notices, pauses.
//! - [`route`]: (4) where: MX planning, the resolver, each destination's
//!   route and client settings.
//! - [`outbound`]: (5) SMTP out: connections to a next hop, pipelined
//!   transactions, a result per recipient.
//! - [`dsn`]: (6) delivery status notifications: a report about a message's
//!   recipients in, the RFC 3464 notice's bytes out (pure).
//! - [`http`], [`metrics`]: (7) `/metrics`, health, and the admin API.
//! - [`fetch`]: mail collected from catch-all mailboxes (POP3/IMAP) into
//!   the spool, for sites whose backup MX is their provider's mailbox.
//! - [`cli`]: the operator's `queue`, `dead`, `health`: an admin API client.
//! - [`doctor`]: `mxspool doctor`, the deployment as senders see it (DNS,
//!   TLS, MTA-STS, TLSA, the primaries).
//!
//! Leaf modules, used by any stage: [`config`] (the TOML file, validated into
//! a typed [`config::Config`]), [`address`] (the syntax of addresses and
//! domain names), [`domain`] (one normalisation of a domain name, and the
//! list of relay domains: which covers a name, its metric label),
//! [`health`] (whether each primary is up, since when, and its
//! recent changes: delivery reports, everyone else reads), [`shutdown`] (the
//! signal every task watches), [`status`] (RFC 3463 status codes, why a
//! recipient failed and why a client was refused: decided once, carried to
//! notices and metrics), [`clock`] (the one wall clock: delivery, health,
//! the admin API and queue IDs read it; tests move it forward).
//!
//! [`Server`] wires these together: the binary binds sockets, loads the config,
//! and calls [`Server::start`]; tests do the same on `127.0.0.1:0`.
#![forbid(unsafe_code)]

pub mod address;
pub mod cli;
pub mod clock;
pub mod config;
pub mod doctor;
pub mod domain;
pub mod dsn;
pub mod fetch;
pub mod health;
pub mod http;
pub mod inbound;
pub mod knowledge;
pub mod metrics;
pub mod outbound;
pub mod route;
pub mod scheduler;
pub mod shutdown;
pub mod spool;
pub mod status;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use clock::Clock;
use config::{Config, ConfigError};
use fetch::Fetchers;
use health::Health;
use inbound::policy::Policy;
use inbound::{Inbound, Limits};
use knowledge::Learned;
use knowledge::callout::Callouts;
use knowledge::greylist::Greylist;
use metrics::Metrics;
use route::{Destinations, Router};
use scheduler::Scheduler;
use spool::{OpenError, Spool};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Spool(#[from] OpenError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot set up delivery: {0}")]
    Route(#[from] route::RouteError),
    #[error("cannot listen for HTTP on {0} (http.listen): {1}")]
    Http(SocketAddr, std::io::Error),
    #[error("cannot read the address of a listening socket: {0}")]
    Socket(std::io::Error),
}

/// What [`Server::start_with`] takes besides the config: the parts tests
/// replace.
pub struct Options {
    /// The outbound client's settings (tests use short timeouts and their
    /// own certificate authority).
    pub outbound: outbound::Settings,
    /// Where delivery, health and the admin API read the time (tests move it
    /// forward).
    pub clock: Clock,
}

impl Options {
    /// What [`Server::start`] uses: `config`'s client settings, the system clock.
    pub fn for_config(config: &Config) -> Options {
        Options {
            outbound: outbound::Settings::new(config.server.hostname.clone(), config.delivery.tls),
            clock: Clock::new(),
        }
    }
}

/// A running mxspool: listeners, sessions and the spool.
pub struct Server {
    config: Config,
    inbound: Arc<Inbound>,
    smtp_addrs: Vec<SocketAddr>,
    trigger: shutdown::Trigger,
    /// Closes once every listener and session has finished.
    running: mpsc::Receiver<()>,
    listeners: Vec<JoinHandle<()>>,
    scheduler: JoinHandle<()>,
    /// One per `[[fetch]]` block.
    fetch_tasks: Vec<JoinHandle<()>>,
    fetchers: Fetchers,
    delivery: scheduler::Handle,
    http: JoinHandle<()>,
    http_addr: SocketAddr,
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl Server {
    /// Opens the spool, starts delivery, and serves SMTP on the given (already
    /// bound) listeners.
    pub async fn start(config: Config, smtp: Vec<TcpListener>) -> Result<Server, StartError> {
        let options = Options::for_config(&config);
        Server::start_with(config, smtp, options).await
    }

    /// [`Server::start`] with the parts tests replace given.
    pub async fn start_with(
        config: Config,
        smtp: Vec<TcpListener>,
        options: Options,
    ) -> Result<Server, StartError> {
        let Options { outbound, clock } = options;
        let policy = Policy::from_config(&config)?;
        let tls = config
            .tls
            .as_ref()
            .map(|t| inbound::tls::acceptor(t, &config.source))
            .transpose()?;
        let token = admin_token(&config)?;
        let http_listener = TcpListener::bind(config.http.listen)
            .await
            .map_err(|e| StartError::Http(config.http.listen, e))?;
        let http_addr = http_listener.local_addr().map_err(StartError::Socket)?;
        let metrics = Metrics::new(&config);
        let opened = open_spool(&config, &metrics).await?;

        let (trigger, shutdown) = shutdown::channel();
        let (scheduler, services) =
            start_delivery(&config, outbound, opened, &metrics, &shutdown, &clock)?;
        let delivery = services.delivery.clone();
        let inbound = Arc::new(Inbound::new(policy, limits(&config), tls, services));
        let (fetchers, fetch_tasks) = Fetchers::start(&config.fetch, inbound.clone(), &shutdown);
        let (running_tx, running) = mpsc::channel(1);
        let mut smtp_addrs = Vec::new();
        let mut listeners = Vec::new();
        for listener in smtp {
            smtp_addrs.push(listener.local_addr().map_err(StartError::Socket)?);
            listeners.push(tokio::spawn(inbound::listen(
                listener,
                inbound.clone(),
                shutdown.clone(),
                running_tx.clone(),
            )));
        }
        let ready = Arc::new(AtomicBool::new(true));
        let http = tokio::spawn(http::serve(
            http_listener,
            Arc::new(http::AppState {
                spool: inbound.spool.clone(),
                metrics: metrics.clone(),
                delivery: delivery.clone(),
                token,
                ready: ready.clone(),
                clock: clock.clone(),
                fetchers: fetchers.clone(),
                sessions: Arc::default(),
            }),
            shutdown.clone(),
        ));
        info!(%http_addr, "HTTP on /metrics /healthz /readyz /api");
        Ok(Server {
            config,
            inbound,
            smtp_addrs,
            trigger,
            running,
            listeners,
            scheduler,
            fetch_tasks,
            fetchers,
            delivery,
            http,
            http_addr,
            ready,
            metrics,
        })
    }

    /// Where `/metrics`, `/healthz`, `/readyz` and `/api` are served.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn smtp_addrs(&self) -> &[SocketAddr] {
        &self.smtp_addrs
    }

    pub fn spool(&self) -> &Spool {
        &self.inbound.spool
    }

    /// Re-reads the config file and the recipient files it names (SIGHUP). On
    /// error the running policy stays. Listeners and the spool keep their
    /// startup settings; a change to those needs a restart.
    pub fn reload(&mut self) -> Result<(), ConfigError> {
        let fresh = Config::load(&self.config.source)?;
        let policy = Policy::from_config(&fresh)?;
        let tls = fresh
            .tls
            .as_ref()
            .map(|t| inbound::tls::acceptor(t, &fresh.source))
            .transpose()?;
        if fresh.server.listen != self.config.server.listen
            || fresh.spool.path != self.config.spool.path
        {
            warn!("server.listen and spool.path changes take effect after a restart");
        }
        if fresh.fetch != self.config.fetch {
            warn!("[[fetch]] changes take effect after a restart");
        }
        self.inbound.set_policy(policy);
        self.inbound.set_tls(tls);
        self.config = fresh;
        info!("configuration reloaded");
        Ok(())
    }

    /// Waits until delivery has done everything due now and has nothing in
    /// hand (see [`scheduler::Handle::settled`]).
    pub async fn settled(&self) {
        self.delivery.settled().await;
    }

    /// Runs the fetch of `[[fetch]]` block `name` now and returns its report
    /// (`None`: no such block).
    pub async fn fetch_now(&self, name: &str) -> Option<fetch::Report> {
        self.fetchers.run_now(name).await
    }

    /// Makes a domain's queued mail (or all of it) due now.
    pub fn flush(&self, domain: Option<String>) {
        self.delivery.flush(domain);
    }

    /// Stops accepting, tells sessions to finish (421 to idle ones; a commit in
    /// progress completes and is acknowledged), waits up to `grace` for them,
    /// then closes the spool.
    pub async fn shutdown(mut self, grace: Duration) {
        self.ready.store(false, Ordering::Relaxed);
        self.trigger.fire();
        for listener in self.listeners.drain(..) {
            let _ = listener.await;
        }
        if tokio::time::timeout(grace, self.running.recv())
            .await
            .is_err()
        {
            warn!("sessions still open after the grace period; closing anyway");
        }
        // A fetch finishes the message in hand (its commit is awaited) and logs out.
        for task in self.fetch_tasks.drain(..) {
            if tokio::time::timeout(grace, task).await.is_err() {
                warn!("a mailbox fetch did not stop within the grace period");
            }
        }
        let _ = self.scheduler.await;
        let _ = self.http.await;
        let spool = self.inbound.spool.clone();
        let _ = tokio::task::spawn_blocking(move || spool.close()).await;
        info!("stopped");
    }
}

/// The admin API's bearer token, from `http.admin_token_file` (none: the API
/// is disabled: it answers 403). A file that does not exist yet is created
/// with a new random token, so the operator's commands work on the first run.
fn admin_token(config: &Config) -> Result<Option<http::Token>, ConfigError> {
    let Some(path) = &config.http.admin_token_file else {
        return Ok(None);
    };
    if !path.exists() {
        create_token_file(path).map_err(|e| ConfigError::Invalid {
            file: config.source.clone(),
            key: "http.admin_token_file".into(),
            reason: format!("cannot create {}: {e}", path.display()),
        })?;
        info!(path = %path.display(), "created a new admin token for /api and the mxspool commands");
    }
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
        file: config.source.clone(),
        key: "http.admin_token_file".into(),
        reason: format!("cannot read {}: {e}", path.display()),
    })?;
    let token = http::Token::new(&text).ok_or_else(|| ConfigError::Invalid {
        file: config.source.clone(),
        key: "http.admin_token_file".into(),
        reason: format!("{} is empty", path.display()),
    })?;
    Ok(Some(token))
}

/// Writes 32 random bytes, hex-encoded, to a new file readable by its owner
/// only (its directory created if need be). A file that appeared meanwhile
/// is left alone.
fn create_token_file(path: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| std::io::Error::other("the system's random source failed"))?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    let mut file = match file {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        other => other?,
    };
    file.write_all(format!("{token}\n").as_bytes())?;
    file.sync_all()
}

/// The opened spool, with what it kept besides the queue: the domain pauses,
/// the recipient verdicts learned from the primaries, and greylisting's state.
struct Opened {
    spool: Spool,
    paused: Vec<(String, spool::Pause)>,
    learned: Learned,
    greylist: Greylist,
}

/// Opens the spool and reads what it kept, off the async threads (blocking
/// file work).
async fn open_spool(config: &Config, metrics: &Arc<Metrics>) -> Result<Opened, OpenError> {
    let options = spool::Options {
        max_size: config.spool.max_size,
        labeler: metrics.labeler(),
        on_commit: Some({
            let metrics = metrics.clone();
            Arc::new(move |elapsed| metrics.observe_commit(elapsed))
        }),
    };
    let path = config.spool.path.clone();
    let greylist = config.greylist;
    tokio::task::spawn_blocking(move || {
        let spool = Spool::open_with(&path, options)?;
        let unreadable = |e: spool::ReadError| OpenError::Io {
            path: path.clone(),
            reason: e.to_string(),
        };
        // A pause that could not be read must not be taken for none.
        let paused = spool.pauses().map_err(unreadable)?;
        let learned = Learned::load(spool.clone()).map_err(unreadable)?;
        let greylist = Greylist::load(spool.clone(), greylist).map_err(unreadable)?;
        Ok::<_, OpenError>(Opened {
            spool,
            paused,
            learned,
            greylist,
        })
    })
    .await
    .map_err(|e| OpenError::Io {
        path: config.spool.path.clone(),
        reason: e.to_string(),
    })?
}

/// Starts the scheduler (delivery, probes, notices) on the opened spool, and
/// returns its task with what inbound needs of the delivery side.
fn start_delivery(
    config: &Config,
    outbound: outbound::Settings,
    opened: Opened,
    metrics: &Arc<Metrics>,
    shutdown: &shutdown::Shutdown,
    clock: &Clock,
) -> Result<(JoinHandle<()>, inbound::Services), StartError> {
    let Opened {
        spool,
        paused,
        learned,
        greylist,
    } = opened;
    let router = Arc::new(Router::for_config(config)?);
    let dests = Arc::new(Destinations::for_config(config, outbound));
    let health = Arc::new(Health::new(
        config.domains.iter().map(|d| d.name.clone()),
        metrics.clone(),
        clock.now_ms(),
    ));
    let learned = Arc::new(learned);
    let greylist = Arc::new(greylist);
    let callouts = Arc::new(Callouts::new(
        learned.clone(),
        health.clone(),
        router.clone(),
        dests.clone(),
        metrics.clone(),
    ));
    let (scheduler, delivery) = Scheduler::new(
        config,
        scheduler::Parts {
            spool: spool.clone(),
            paused,
            router,
            dests,
            health: health.clone(),
            learned: learned.clone(),
            greylist: greylist.clone(),
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
            clock: clock.clone(),
        },
    );
    let scheduler = tokio::spawn(scheduler.run());
    let services = inbound::Services {
        spool,
        delivery,
        health,
        learned,
        greylist,
        callouts,
        dnsbl: Arc::new(inbound::dnsbl::Lookups::new(
            &config.delivery.nameservers,
            metrics.clone(),
        )?),
        spf: Arc::new(inbound::spf::Checker::new(&config.delivery.nameservers)?),
        metrics: metrics.clone(),
        clock: clock.clone(),
    };
    Ok((scheduler, services))
}

/// The connection limits of `server.*`.
fn limits(config: &Config) -> Limits {
    Limits {
        max_connections: config.server.max_connections,
        max_connections_per_ip: config.server.max_connections_per_ip,
        max_connection_rate_per_ip: config.server.max_connection_rate_per_ip,
    }
}
