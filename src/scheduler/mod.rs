//! (3) When: one task decides what is due and hands it to delivery workers.
//!
//! The spool's due index is the schedule. The scheduler sleeps until the next
//! due time (or new mail, an ETRN/flush, a worker's report, a probe tick,
//! shutdown), loads what is due into per-destination queues, and starts
//! workers up to `connections_per_domain` per destination. Workers record
//! outcomes themselves; the scheduler only tracks what is in flight and each
//! destination's health.
//!
//! Health: a destination whose primary could not be reached is marked down.
//! Mail that comes due for it meanwhile is deferred without a connection
//! attempt, and the primary is probed every `probe_interval`; the first
//! success (a probe, or an inbound connection from one of the primary's
//! addresses prompting a probe) marks it up and releases at once all mail that
//! waited because it was unreachable. Mail a live primary deferred keeps its
//! own backoff.
//!
//! Pauses: a configured domain paused by an operator or by the drain guard
//! (see `guard.rs`) gets no delivery. Its mail that comes due is parked
//! without an attempt (out of the due order, never expiring), and a resume
//! makes all of it due at once.
//!
//! The scheduler never speaks SMTP and never decides what a reply means.

pub mod backoff;
mod check;
mod dispatch;
mod domain;
pub mod guard;
mod handle;
pub mod notice;
pub mod outcome;
mod primary;
mod record;
mod release;
mod worker;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::address::domain_of;
use crate::clock::Clock;
use crate::config::{Config, DeliveryConfig, DomainConfig};
use crate::domain::RelayDomains;
use crate::health::Health;
use crate::knowledge::Learned;
use crate::knowledge::greylist::Greylist;
use crate::metrics::Metrics;
use crate::route::{Destination, Destinations, Router};
use crate::shutdown::Shutdown;
use crate::spool::{CommitError, PARKED, Pause, QueueId, RcptStatus, Recipient, Spool};
use backoff::Backoff;
use domain::DomainState;
pub use handle::{DomainError, DomainStatus, Handle};
use outcome::Rules;
use worker::Ctx;

/// After workers report, look for more due mail at most this often.
const RESCAN_DELAY: Duration = Duration::from_millis(20);
/// While a returning primary's backlog drains, every finished job asks for a
/// scan (see [`RESCAN_DELAY`]); the backlog is topped up each time, the due
/// index (thousands of entries to skip past the backlog's own) read only
/// this often.
const DUE_SCAN_DURING_BACKLOG: Duration = Duration::from_millis(250);
/// Longest sleep without looking at the due index (it is cheap to look).
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// How long shutdown waits for workers to finish the message in hand.
const WORKER_GRACE: Duration = Duration::from_secs(10);

/// A message's recipients at one destination, ready to be tried.
#[derive(Debug)]
pub struct Job {
    pub id: QueueId,
    pub domain: Arc<str>,
    /// Indexes into the envelope's recipients.
    pub rcpts: Vec<usize>,
}

/// What workers and helper tasks tell the scheduler.
#[derive(Debug)]
pub(crate) enum Event {
    /// The job's outcome is recorded (or it needed none). `unreachable`: some
    /// recipient now waits for the primary to come back.
    Done {
        id: QueueId,
        domain: Arc<str>,
        unreachable: bool,
        /// Some recipient was delivered: the destination takes mail.
        delivered: bool,
    },
    /// A job's message could not be read (a `Done` follows): it is handed to
    /// delivery again, as if it had waited for its primary.
    Unread {
        id: QueueId,
        domain: Arc<str>,
    },
    /// The destination refused one more connection while `connected` others
    /// worked (`Some`), or a session failed with messages in flight (`None`):
    /// open fewer.
    Congested {
        domain: Arc<str>,
        connected: Option<usize>,
    },
    WorkerExit {
        domain: Arc<str>,
    },
    /// A connection to the destination got past the greeting.
    Reachable {
        domain: Arc<str>,
    },
    Unreachable {
        domain: Arc<str>,
        reason: String,
    },
    /// We are the best MX for the domain.
    Loop {
        domain: Arc<str>,
    },
    Probed {
        domain: Arc<str>,
        up: bool,
    },
    /// A health check of the domain's primary: the host that answered, or
    /// why none did.
    Checked {
        domain: Arc<str>,
        answer: Result<String, String>,
    },
    /// Mail was made due now (release after recovery, ETRN, flush).
    Released,
    /// The addresses of a down destination's hosts, to recognise it connecting.
    PrimaryAddresses {
        domain: Arc<str>,
        ips: Vec<IpAddr>,
    },
    /// Configured domain `domain` was paused: take its jobs out of delivery.
    Paused {
        domain: Arc<str>,
    },
}

/// What the rest of the server asks of the scheduler: one channel, handled
/// in order. (New mail rings [`Handle::queued`] instead: a doorbell that
/// coalesces thousands of commits a second into one wake-up.)
pub(crate) enum Command {
    /// Make a destination's mail (or all mail) due now: ETRN, an operator's
    /// flush.
    Flush(Option<String>),
    /// A client connected from this address (perhaps a down primary).
    Hint(IpAddr),
    /// A message was stored already waiting for these down destinations.
    Waiting(QueueId, Vec<String>),
    /// An operator returns a message to its sender.
    Bounce {
        id: QueueId,
        done: oneshot::Sender<Result<Option<usize>, CommitError>>,
    },
    /// Answer once a look at the due index (after everything sent before
    /// this) finds nothing to do and nothing is in hand: what is due by the
    /// clock now has been tried and recorded, notices included.
    Settle(oneshot::Sender<()>),
}

pub struct Scheduler {
    ctx: Arc<Ctx>,
    domains: HashMap<Arc<str>, DomainState>,
    /// Configured domains' routes and client settings.
    dests: Arc<Destinations>,
    probe_interval: Duration,
    /// `delivery.health_interval`: every primary checked this often.
    health_interval: Option<Duration>,
    /// Greylisting's state, swept with the learned verdicts.
    greylist: Arc<Greylist>,
    connections_per_domain: usize,
    in_flight: HashSet<(QueueId, Arc<str>)>,
    events: mpsc::UnboundedReceiver<Event>,
    commands: mpsc::UnboundedReceiver<Command>,
    queued: Arc<Notify>,
    /// Every task the scheduler starts (workers, releases, probes, …):
    /// joined at shutdown.
    tasks: JoinSet<()>,
    shutdown: Shutdown,
    rescan_at: Option<Instant>,
    /// When the due index was last read; while a backlog drains it is read
    /// at most every [`DUE_SCAN_DURING_BACKLOG`] (see [`Scheduler::scan`]).
    due_scanned: Option<Instant>,
    /// Who waits for [`Command::Settle`].
    settling: Vec<oneshot::Sender<()>>,
}

/// What the scheduler shares with the rest of the server.
pub struct Parts {
    pub spool: Spool,
    /// The domain pauses the spool kept.
    pub paused: Vec<(String, Pause)>,
    pub router: Arc<Router>,
    pub dests: Arc<Destinations>,
    pub health: Arc<Health>,
    pub learned: Arc<Learned>,
    pub greylist: Arc<Greylist>,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    /// Where due times, backoff, expiry and notices read the time.
    pub clock: Clock,
}

impl Scheduler {
    /// Builds the scheduler for `config` around the server's shared parts.
    pub fn new(config: &Config, parts: Parts) -> (Scheduler, Handle) {
        let Parts {
            spool,
            paused,
            router,
            dests,
            health,
            learned,
            greylist,
            metrics,
            shutdown,
            clock,
        } = parts;
        let d = &config.delivery;
        let guard = restore_pauses(config, paused, &metrics);
        let (events_tx, events) = mpsc::unbounded_channel();
        let (commands_tx, commands) = mpsc::unbounded_channel();
        let queued = Arc::new(Notify::new());
        let ctx = Arc::new(Ctx {
            spool,
            router,
            rules: rules(d),
            bounce: d.bounce,
            postmaster: d.postmaster.clone(),
            hostname: config.server.hostname.clone(),
            messages_per_connection: d.messages_per_connection,
            events: events_tx,
            queued: queued.clone(),
            shutdown: shutdown.clone(),
            verified: RelayDomains::new(
                config
                    .domains
                    .iter()
                    .filter(|d| d.verify_recipients)
                    .map(DomainConfig::relay),
            ),
            metrics,
            guard: guard::Shared::new(guard),
            drain_guard: d.drain_guard,
            health,
            learned,
            clock,
        });
        let scheduler = Scheduler {
            ctx,
            domains: HashMap::new(),
            dests,
            probe_interval: d.probe_interval,
            health_interval: d.health_interval,
            greylist,
            connections_per_domain: d.connections_per_domain,
            in_flight: HashSet::new(),
            events,
            commands,
            queued: queued.clone(),
            tasks: JoinSet::new(),
            shutdown,
            rescan_at: None,
            due_scanned: None,
            settling: Vec::new(),
        };
        let handle = Handle::new(
            commands_tx,
            queued,
            scheduler.ctx.clone(),
            scheduler.dests.clone(),
        );
        (scheduler, handle)
    }

    fn destination(&self, domain: &str) -> Arc<Destination> {
        self.dests.get(domain)
    }

    /// Reports a destination's health (inbound, callouts, the gauge and the
    /// admin API read it).
    /// `detail`: for down, why; for up, the host that answered (if known).
    fn publish(&self, domain: &str, up: bool, detail: Option<&str>) {
        self.ctx
            .health
            .report(domain, up, detail, self.ctx.clock.now_ms());
    }

    fn domain(&mut self, name: &str) -> (Arc<str>, &mut DomainState) {
        let key: Arc<str> = match self.domains.get_key_value(name) {
            Some((k, _)) => k.clone(),
            None => Arc::from(name),
        };
        let state = self.domains.entry(key.clone()).or_default();
        (key, state)
    }

    /// Runs until shutdown.
    pub async fn run(mut self) {
        self.recover().await;
        self.scan().await;
        let mut probe_tick = tokio::time::interval(self.probe_interval);
        probe_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Learned recipient verdicts past their trust period, and greylisting's
        // expired triplets and forgotten networks, go (now, then daily).
        let mut forget_tick = tokio::time::interval(Duration::from_secs(24 * 3600));
        // A clock moved forward (tests) may have made mail due: look again.
        let mut moves = self.ctx.clock.moves();
        // Outside `tasks`: it runs as long as the scheduler, which settles
        // without waiting for it.
        let checks = self.health_interval.map(|every| {
            tokio::spawn(check::run(
                self.ctx.clone(),
                self.dests.clone(),
                every,
                self.shutdown.clone(),
            ))
        });
        loop {
            let wake = self.next_wake();
            tokio::select! {
                () = self.shutdown.wait() => break,
                Some(event) = self.events.recv() => self.handle(event),
                Some(command) = self.commands.recv() => self.command(command),
                () = self.queued.notified() => self.rescan_soon(Duration::ZERO),
                Ok(()) = moves.changed() => self.rescan_soon(Duration::ZERO),
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
                _ = probe_tick.tick() => self.probe_down_domains(),
                _ = forget_tick.tick() => {
                    let now = self.ctx.clock.now_ms();
                    self.ctx.learned.forget_stale(now);
                    self.greylist.forget_stale(now);
                }
                () = tokio::time::sleep_until(wake) => {
                    self.rescan_at = None;
                    self.scan().await;
                    self.answer_settled();
                    continue;
                }
            }
            if !self.settling.is_empty() && self.idle() {
                // Settled only if one more look finds nothing.
                self.rescan_soon(Duration::ZERO);
            }
        }
        self.wait_for_workers().await;
        if let Some(checks) = checks {
            let _ = checks.await;
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Flush(domain) => self.flush_now(domain),
            Command::Hint(ip) => self.hint(ip),
            Command::Waiting(id, domains) => self.note_waiting(id, domains),
            Command::Bounce { id, done } => {
                let ctx = self.ctx.clone();
                self.tasks.spawn(async move {
                    let _ = done.send(release::bounce(&ctx, id).await);
                });
            }
            Command::Settle(done) => {
                self.settling.push(done);
                self.rescan_soon(Duration::ZERO);
            }
        }
    }

    /// Nothing in hand: no job loaded, no task running, no event unread.
    fn idle(&self) -> bool {
        self.in_flight.is_empty() && self.tasks.is_empty() && self.events.is_empty()
    }

    /// After a scan: if it found nothing to do, whoever waits for the
    /// scheduler to settle is told.
    fn answer_settled(&mut self) {
        let due_now = self.rescan_at.is_some_and(|at| at <= Instant::now());
        if !self.settling.is_empty() && self.idle() && !due_now {
            for done in self.settling.drain(..) {
                let _ = done.send(());
            }
        }
    }

    fn next_wake(&self) -> Instant {
        let cap = Instant::now() + MAX_SLEEP;
        self.rescan_at.map_or(cap, |at| at.min(cap))
    }

    fn rescan_soon(&mut self, delay: Duration) {
        let at = Instant::now() + delay;
        self.rescan_at = Some(self.rescan_at.map_or(at, |cur| cur.min(at)));
    }

    /// At startup: mail that last waited for an unreachable primary marks that
    /// destination down, so it is probed and released the moment it answers.
    async fn recover(&mut self) {
        // Parked for a pause that no longer holds (its record was lost, or
        // the domain left the config): due again, or it would wait forever.
        let ctx = self.ctx.clone();
        let stranded = move |r: &Recipient| {
            r.status == RcptStatus::Queued
                && r.next_attempt_ms == PARKED
                && !ctx.is_paused(&domain_of(&r.address))
        };
        // One envelope at a time: only IDs are kept, so a backlog of a
        // million messages costs megabytes here, not a gigabyte.
        let spool = self.ctx.spool.clone();
        let scan = stranded.clone();
        let (unparked, waiting) = tokio::task::spawn_blocking(move || {
            let mut unparked: Vec<QueueId> = Vec::new();
            let mut waiting: HashMap<String, Vec<QueueId>> = HashMap::new();
            let read = spool.each_envelope(&mut |env| {
                if env.recipients.iter().any(&scan) {
                    unparked.push(env.id);
                }
                for r in &env.recipients {
                    if r.status == RcptStatus::Queued && r.unreachable {
                        waiting
                            .entry(domain_of(&r.address))
                            .or_default()
                            .push(env.id);
                    }
                }
            });
            if let Err(e) = read {
                warn!(error = %e, "cannot read the queue at startup");
            }
            (unparked, waiting)
        })
        .await
        .unwrap_or_default();
        if !unparked.is_empty() {
            info!(
                messages = unparked.len(),
                "releasing mail parked for a pause that ended"
            );
            self.release(unparked, stranded);
        }
        for (domain, ids) in waiting {
            let (_, state) = self.domain(&domain);
            state.waiting.extend(ids);
            state
                .down
                .get_or_insert_with(|| "unreachable at the last attempt".into());
            self.publish(&domain, false, Some("unreachable at the last attempt"));
        }
        for (domain, state) in &self.domains {
            if state.down.is_some() {
                info!(%domain, waiting = state.waiting.len(), "primary was unreachable before restart; probing");
            }
        }
    }

    /// What workers and helper tasks report.
    fn handle(&mut self, event: Event) {
        match event {
            Event::Done {
                id,
                domain,
                unreachable,
                delivered,
            } => {
                let cap = self.connections_per_domain;
                if delivered
                    && let Some(state) = self.domains.get_mut(&domain)
                    && state.grow(cap)
                {
                    self.dispatch(&domain);
                }
                if unreachable {
                    // Released at once if it came back while this was written.
                    self.note_waiting(id, vec![domain.to_string()]);
                }
                self.in_flight.remove(&(id, domain));
                self.rescan_soon(RESCAN_DELAY);
            }
            Event::Unread { id, domain } => {
                let (_, state) = self.domain(&domain);
                if state.down.is_some() {
                    state.waiting.insert(id);
                } else {
                    state.backlog.insert(id);
                }
            }
            Event::WorkerExit { domain } => {
                if let Some(state) = self.domains.get_mut(&domain) {
                    state.workers = state.workers.saturating_sub(1);
                    self.ctx.metrics.connections(&domain).dec();
                }
                self.dispatch(&domain);
            }
            Event::Congested { domain, connected } => {
                if let Some(state) = self.domains.get_mut(&domain) {
                    state.congest(connected, self.connections_per_domain);
                }
            }
            Event::Reachable { domain } => self.mark_up(&domain, None),
            Event::Unreachable { domain, reason } => self.mark_down(&domain, reason),
            Event::Loop { domain } => {
                if let Some(state) = self.domains.get_mut(&domain) {
                    state.looping = true;
                }
            }
            Event::Probed { domain, up } => {
                if let Some(state) = self.domains.get_mut(&domain) {
                    state.probing = false;
                }
                if up {
                    info!(%domain, "primary answers again");
                    self.mark_up(&domain, None);
                }
            }
            Event::Checked { domain, answer } => self.checked(&domain, answer),
            Event::Released => self.rescan_soon(Duration::ZERO),
            Event::PrimaryAddresses { domain, ips } => {
                if let Some(state) = self.domains.get_mut(&domain) {
                    state.primary_ips = ips;
                }
            }
            Event::Paused { domain: label } => {
                let affected: Vec<Arc<str>> = self
                    .domains
                    .keys()
                    .filter(|d| self.ctx.metrics.label(d) == &*label)
                    .cloned()
                    .collect();
                for domain in affected {
                    self.dispatch(&domain);
                }
            }
        }
    }

    /// commit is lost: the spool still has the mail as it was.
    async fn wait_for_workers(&mut self) {
        let deadline = Instant::now() + WORKER_GRACE;
        let tasks = &mut self.tasks;
        let all = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout_at(deadline, all).await.is_err() {
            warn!(
                tasks = self.tasks.len(),
                "delivery tasks still running after the grace period; cancelling them"
            );
        }
        self.tasks.shutdown().await;
    }
}

/// Retry, lifetime and warning rules from `delivery`.
fn rules(d: &DeliveryConfig) -> Rules {
    Rules {
        backoff: Backoff {
            initial: d.retry_initial,
            factor: d.retry_factor,
            max: d.retry_max,
            jitter: d.retry_jitter,
        },
        lifetime: d.max_queue_lifetime,
        delay_warning: d.delay_warning_after,
    }
}

/// The drain guard over the configured domains, with the pauses the spool
/// kept: each still paused is shown on its gauge and in the log, so an
/// operator learns why its mail waits.
fn restore_pauses(
    config: &Config,
    paused: Vec<(String, Pause)>,
    metrics: &Metrics,
) -> guard::Guard {
    let names: Vec<String> = config.domains.iter().map(|d| d.name.clone()).collect();
    let guard = guard::Guard::new(config.delivery.drain_guard, names.iter().cloned(), paused);
    for name in &names {
        if let Some(pause) = guard.paused(name) {
            metrics.domain_paused.with_label_values(&[name]).set(1);
            warn!(domain = %name, by = ?pause.by, since_ms = pause.since_ms,
                "delivery to the domain is paused; `mxspool queue resume {name}` resumes it");
        }
    }
    guard
}
