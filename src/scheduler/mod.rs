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
pub mod guard;
pub mod notice;
pub mod outcome;
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
use crate::config::Config;
use crate::health::Health;
use crate::knowledge::Learned;
use crate::metrics::Metrics;
use crate::outbound;
use crate::route::{Destination, Destinations, Router};
use crate::shutdown::Shutdown;
use crate::spool::{
    Change, CommitError, Envelope, Finished, PARKED, Pause, QueueId, RcptStatus, Spool,
};
use backoff::Backoff;
use outcome::{Result as RcptResult, Rules};
pub use worker::now_ms;
use worker::{Ctx, Queue};

/// Connections a destination starts with; more follow as deliveries succeed.
const INITIAL_CONNECTIONS: usize = 5;
/// Once a host pushed back, deliveries it takes before we try one more
/// connection (each try may cost it a refused connection).
const DELIVERIES_PER_STEP: usize = 50;
/// One more connection is opened for each this many messages waiting.
const MESSAGES_PER_NEW_CONNECTION: usize = 8;
/// Most jobs held in memory at once; the rest wait on disk.
const MAX_LOADED: usize = 2_000;
/// After workers report, look for more due mail at most this often.
const RESCAN_DELAY: Duration = Duration::from_millis(20);
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
}

/// Why an operator's pause or resume did not happen.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error(transparent)]
    Refused(#[from] guard::PauseError),
    #[error(transparent)]
    Spool(#[from] CommitError),
}

/// A configured domain as operators see it (`GET /api/domains`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainStatus {
    pub name: String,
    /// Its primary's last known state (up until an attempt or probe failed
    /// to reach it), and since when, in Unix ms: the last change, or the
    /// start of the server.
    pub primary_up: bool,
    pub primary_since_ms: u64,
    pub pause: Option<Pause>,
    /// Queued messages with a recipient here, and the arrival of the oldest.
    pub queued: u64,
    pub oldest_arrived_ms: Option<u64>,
}

/// Requests from the rest of the server.
#[derive(Clone)]
pub struct Handle {
    commands: mpsc::UnboundedSender<Command>,
    queued: Arc<Notify>,
    ctx: Arc<Ctx>,
    dests: Arc<Destinations>,
}

impl Handle {
    /// Before a new message is stored: its recipients at destinations known
    /// to be down are deferred as the scheduler would defer them, without a
    /// connection attempt. Returns those destinations (tell [`Handle::waiting`]
    /// once the message is committed).
    pub fn suspend_new(&self, env: &mut Envelope) -> Vec<String> {
        // Mail for a paused domain waits for the resume from the start.
        {
            let guard = self.ctx.guard.lock();
            for r in &mut env.recipients {
                let label = self.ctx.metrics.label(&domain_of(&r.address));
                if r.status == RcptStatus::Queued && guard.paused(label).is_some() {
                    r.next_attempt_ms = PARKED;
                }
            }
        }
        let health = &self.ctx.health;
        if !health.any_down() {
            return Vec::new();
        }
        let mut domains: Vec<String> = Vec::new();
        let mut results = Vec::new();
        let suspended = RcptResult::Deferred {
            status: "4.4.1".into(),
            reply: "delivery temporarily suspended: primary unreachable".into(),
            remote: None,
            unreachable: true,
        };
        for (i, r) in env.recipients.iter().enumerate() {
            let domain = domain_of(&r.address);
            if r.status == RcptStatus::Queued
                && r.next_attempt_ms != PARKED
                && health.is_down(&domain)
            {
                results.push((i, suspended.clone()));
                if !domains.contains(&domain) {
                    domains.push(domain);
                }
            }
        }
        if results.is_empty() {
            return domains;
        }
        // Exactly what a suspended attempt records (a new message owes no notice).
        let applied = outcome::apply(env, &results, now_ms(), &self.ctx.rules, fastrand::f64());
        for (i, r) in applied.recipients {
            env.recipients[i] = r;
        }
        for domain in &domains {
            let label = self.ctx.metrics.label(domain);
            self.ctx
                .metrics
                .attempts
                .with_label_values(&[label, "suspended"])
                .inc();
        }
        domains
    }

    /// A message stored by [`Handle::suspend_new`] waits for these destinations.
    pub fn waiting(&self, id: QueueId, domains: Vec<String>) {
        let _ = self.commands.send(Command::Waiting(id, domains));
    }

    /// Make a destination's mail (or all mail, for `None`) due now (ETRN, the
    /// admin API's flush).
    pub fn flush(&self, domain: Option<String>) {
        let _ = self.commands.send(Command::Flush(domain));
    }

    /// A client connected from `ip`: if that is a down primary, it is back.
    pub fn hint(&self, ip: IpAddr) {
        // Every connection calls this: wake the scheduler only when it matters.
        if self.ctx.health.any_down() {
            let _ = self.commands.send(Command::Hint(ip));
        }
    }

    /// New mail was committed.
    pub fn queued(&self) -> Arc<Notify> {
        self.queued.clone()
    }

    /// An operator pauses configured domain `domain`: nothing more is
    /// delivered to it (what is in flight finishes) until it is resumed; its
    /// mail is still accepted and queued. Durable before it returns.
    pub async fn pause(&self, domain: &str) -> Result<Pause, DomainError> {
        let pause = self.ctx.guard.lock().pause(domain, now_ms())?;
        if let Err(e) = self.ctx.publish_pause(domain, pause).await {
            // Not durable, so not done: undo it, and release what was parked.
            let _ = self.ctx.guard.lock().resume(domain);
            self.flush(Some(domain.to_owned()));
            return Err(e.into());
        }
        info!(%domain, "delivery paused by the operator; mail is still accepted and queued");
        Ok(pause)
    }

    /// An operator resumes configured domain `domain`, however it was
    /// paused: its queued mail is due at once (including what waited past
    /// its lifetime: that now expires as usual), and the drain guard counts
    /// from zero. Returns the pause that ended.
    pub async fn resume(&self, domain: &str) -> Result<Pause, DomainError> {
        self.ctx
            .guard
            .lock()
            .paused_or_unknown(domain)?
            .ok_or_else(|| guard::PauseError::NotPaused(domain.to_owned()))?;
        // Durable first: a resume that does not outlive a restart did not happen.
        self.ctx.spool.set_pause(domain, None).await?;
        let ended = self.ctx.guard.lock().resume(domain)?;
        self.ctx
            .metrics
            .domain_paused
            .with_label_values(&[domain])
            .set(0);
        info!(%domain, paused_by = ?ended.by, "delivery resumed; the domain's queued mail is due now");
        self.flush(Some(domain.to_owned()));
        Ok(ended)
    }

    /// Every configured domain: its primary, pause and queue, in the
    /// config's order. From running totals, not a scan of the spool.
    pub fn domains(&self) -> Vec<DomainStatus> {
        let queues: HashMap<String, (u64, Option<u64>)> = self
            .ctx
            .spool
            .queue_by_label()
            .into_iter()
            .map(|(label, messages, oldest)| (label, (messages, oldest)))
            .collect();
        let guard = self.ctx.guard.lock();
        self.dests
            .configured
            .iter()
            .map(|d| {
                let (primary_up, primary_since_ms) = self
                    .ctx
                    .health
                    .primary(&d.name)
                    .map_or((true, 0), |p| (p.up, p.since_ms));
                let (queued, oldest_arrived_ms) = queues.get(&d.name).copied().unwrap_or((0, None));
                DomainStatus {
                    name: d.name.clone(),
                    primary_up,
                    primary_since_ms,
                    pause: guard.paused(&d.name),
                    queued,
                    oldest_arrived_ms,
                }
            })
            .collect()
    }

    /// Fails every queued recipient of `id` now (the operator's "return to
    /// sender") with the notices NOTIFY= asks for. Returns how many
    /// recipients, or `None` if there is no such message.
    pub async fn bounce(&self, id: QueueId) -> Result<Option<usize>, CommitError> {
        let (done, result) = oneshot::channel();
        self.commands
            .send(Command::Bounce { id, done })
            .map_err(|_| CommitError::Closed)?;
        result.await.unwrap_or(Err(CommitError::Closed))
    }
}

#[derive(Default)]
struct DomainState {
    queue: Queue,
    workers: usize,
    /// Why the primary is considered down; `None` when up (or never tried).
    down: Option<String>,
    probing: bool,
    /// Messages with recipients here that wait because it was unreachable.
    waiting: HashSet<QueueId>,
    /// The primary's addresses, while down.
    primary_ips: Vec<IpAddr>,
    /// The last routing attempt found us to be the best MX.
    looping: bool,
    /// Connections the slow start allows now; 0: not started (see
    /// [`DomainState::allowed`]).
    concurrency: usize,
    /// The host refused a connection (or failed a session) since it came up:
    /// grow slowly from here.
    congested: bool,
    /// Deliveries since the last step up, while congested.
    credit: usize,
}

impl DomainState {
    /// Connections allowed now: a few at first, one more per delivery up to
    /// `cap`, halved when the host refuses one more or a session fails with
    /// mail in flight (Postfix's destination concurrency, simplified).
    fn allowed(&self, cap: usize) -> usize {
        let allowed = if self.concurrency == 0 {
            INITIAL_CONNECTIONS
        } else {
            self.concurrency
        };
        allowed.clamp(1, cap.max(1))
    }

    /// A delivery succeeded: one more connection at once (slow start), or
    /// after [`DELIVERIES_PER_STEP`] more once the host pushed back. True if
    /// the allowance grew.
    fn grow(&mut self, cap: usize) -> bool {
        let allowed = self.allowed(cap);
        if allowed >= cap {
            return false;
        }
        if self.congested {
            self.credit += 1;
            if self.credit < DELIVERIES_PER_STEP {
                return false;
            }
            self.credit = 0;
        }
        self.concurrency = allowed + 1;
        true
    }
}

pub struct Scheduler {
    ctx: Arc<Ctx>,
    domains: HashMap<Arc<str>, DomainState>,
    /// Configured domains' routes and client settings.
    dests: Arc<Destinations>,
    probe_interval: Duration,
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
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
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
            metrics,
            shutdown,
        } = parts;
        let d = &config.delivery;
        let rules = Rules {
            backoff: Backoff {
                initial: d.retry_initial,
                factor: d.retry_factor,
                max: d.retry_max,
                jitter: d.retry_jitter,
            },
            lifetime: d.max_queue_lifetime,
            delay_warning: d.delay_warning_after,
        };
        let names: Vec<String> = config.domains.iter().map(|d| d.name.clone()).collect();
        let guard = guard::Guard::new(d.drain_guard, names.iter().cloned(), paused);
        for name in &names {
            if let Some(pause) = guard.paused(name) {
                metrics.domain_paused.with_label_values(&[name]).set(1);
                warn!(domain = %name, by = ?pause.by, since_ms = pause.since_ms,
                    "delivery to the domain is paused; `mxspool queue resume {name}` resumes it");
            }
        }
        let (events_tx, events) = mpsc::unbounded_channel();
        let (commands_tx, commands) = mpsc::unbounded_channel();
        let queued = Arc::new(Notify::new());
        let ctx = Arc::new(Ctx {
            spool,
            router,
            rules,
            bounce: d.bounce,
            postmaster: d.postmaster.clone(),
            hostname: config.server.hostname.clone(),
            messages_per_connection: d.messages_per_connection,
            events: events_tx,
            queued: queued.clone(),
            shutdown: shutdown.clone(),
            verified: config
                .domains
                .iter()
                .filter(|d| d.verify_recipients)
                .map(|d| (d.name.clone(), d.include_subdomains))
                .collect(),
            metrics,
            guard: guard::Shared::new(guard),
            drain_guard: d.drain_guard,
            health,
            learned,
        });
        let scheduler = Scheduler {
            ctx,
            domains: HashMap::new(),
            dests,
            probe_interval: d.probe_interval,
            connections_per_domain: d.connections_per_domain,
            in_flight: HashSet::new(),
            events,
            commands,
            queued: queued.clone(),
            tasks: JoinSet::new(),
            shutdown,
            rescan_at: None,
        };
        let handle = Handle {
            commands: commands_tx,
            queued,
            ctx: scheduler.ctx.clone(),
            dests: scheduler.dests.clone(),
        };
        (scheduler, handle)
    }

    fn destination(&self, domain: &str) -> Arc<Destination> {
        self.dests.get(domain)
    }

    /// Reports a destination's health (inbound, callouts, the gauge and the
    /// admin API read it).
    fn publish(&self, domain: &str, up: bool, reason: Option<&str>) {
        self.ctx.health.report(domain, up, reason, now_ms());
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
        // Learned recipient verdicts past their trust period go (now, then daily).
        let mut forget_tick = tokio::time::interval(Duration::from_secs(24 * 3600));
        loop {
            let wake = self.next_wake();
            tokio::select! {
                () = self.shutdown.wait() => break,
                Some(event) = self.events.recv() => self.handle(event),
                Some(command) = self.commands.recv() => self.command(command),
                () = self.queued.notified() => self.rescan_soon(Duration::ZERO),
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
                _ = probe_tick.tick() => self.probe_down_domains(),
                _ = forget_tick.tick() => self.ctx.learned.forget_stale(now_ms()),
                () = tokio::time::sleep_until(wake) => {
                    self.rescan_at = None;
                    self.scan().await;
                }
            }
        }
        self.wait_for_workers().await;
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Flush(domain) => self.flush_now(domain),
            Command::Hint(ip) => self.hint(ip),
            Command::Waiting(id, domains) => self.note_waiting(id, domains),
            Command::Bounce { id, done } => {
                let ctx = self.ctx.clone();
                self.tasks.spawn(async move {
                    let _ = done.send(bounce(&ctx, id).await);
                });
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
        let spool = self.ctx.spool.clone();
        let envelopes = tokio::task::spawn_blocking(move || spool.envelopes())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        // Parked for a pause that no longer holds (its record was lost, or
        // the domain left the config): due again, or it would wait forever.
        let ctx = self.ctx.clone();
        let stranded = move |r: &crate::spool::Recipient| {
            r.status == RcptStatus::Queued
                && r.next_attempt_ms == PARKED
                && !ctx.is_paused(&domain_of(&r.address))
        };
        let unparked: Vec<QueueId> = envelopes
            .iter()
            .filter(|env| env.recipients.iter().any(&stranded))
            .map(|env| env.id)
            .collect();
        if !unparked.is_empty() {
            info!(
                messages = unparked.len(),
                "releasing mail parked for a pause that ended"
            );
            self.release(unparked, stranded);
        }
        for env in envelopes {
            for r in &env.recipients {
                if r.status == RcptStatus::Queued && r.unreachable {
                    let (_, state) = self.domain(&domain_of(&r.address));
                    state.waiting.insert(env.id);
                    state
                        .down
                        .get_or_insert_with(|| "unreachable at the last attempt".into());
                    let domain = domain_of(&r.address);
                    self.publish(&domain, false, Some("unreachable at the last attempt"));
                }
            }
        }
        for (domain, state) in &self.domains {
            if state.down.is_some() {
                info!(%domain, waiting = state.waiting.len(), "primary was unreachable before restart; probing");
            }
        }
    }

    /// Loads due mail into destination queues and starts workers.
    async fn scan(&mut self) {
        let now = now_ms();
        let spool = self.ctx.spool.clone();
        let in_flight: HashSet<QueueId> = self.in_flight.iter().map(|(id, _)| *id).collect();
        let loaded = tokio::task::spawn_blocking(move || {
            let due = spool.due_until(now, MAX_LOADED + in_flight.len())?;
            // Messages already in hand are not decoded again: while a backlog
            // drains, nearly every due entry is one. (A message with another
            // destination due waits for its job in hand to finish.)
            let mut seen = HashSet::new();
            let ids: Vec<QueueId> = due
                .iter()
                .map(|(_, id)| *id)
                .filter(|id| !in_flight.contains(id) && seen.insert(*id))
                .collect();
            let envelopes = spool.envelopes_of(&ids)?;
            let next = spool.next_due_after(now)?;
            Ok::<_, crate::spool::ReadError>((envelopes, next))
        })
        .await;
        let (envelopes, next) = match loaded {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot read the due index; retrying shortly");
                self.rescan_soon(Duration::from_secs(1));
                return;
            }
            Err(e) => {
                warn!(error = %e, "due index scan failed");
                self.rescan_soon(Duration::from_secs(1));
                return;
            }
        };
        let mut suspended: Vec<Job> = Vec::new();
        let mut parked: Vec<Job> = Vec::new();
        let mut touched: HashSet<Arc<str>> = HashSet::new();
        for env in envelopes {
            for (domain, rcpts) in due_recipients(&env, now) {
                if self.in_flight.len() >= MAX_LOADED {
                    break;
                }
                let (domain, _) = self.domain(&domain);
                if !self.in_flight.insert((env.id, domain.clone())) {
                    continue;
                }
                let job = Job {
                    id: env.id,
                    domain: domain.clone(),
                    rcpts,
                };
                if self.ctx.is_paused(&domain) {
                    parked.push(job);
                    continue;
                }
                let state = self.domains.get_mut(&domain).expect("created above");
                if state.down.is_some() {
                    state.waiting.insert(env.id);
                    suspended.push(job);
                } else {
                    state.queue.push(job);
                    touched.insert(domain);
                }
            }
        }
        for domain in touched {
            self.dispatch(&domain);
        }
        if !suspended.is_empty() {
            self.suspend(suspended);
        }
        self.park(parked);
        // Parked mail is never due: nothing to wake up for.
        if let Some(next) = next.filter(|&at| at != PARKED) {
            let wait = Duration::from_millis(next.saturating_sub(now_ms()));
            self.rescan_soon(wait);
        }
    }

    /// Starts workers for `domain` while it has queued jobs and free slots;
    /// parks them instead while it is paused.
    fn dispatch(&mut self, domain: &Arc<str>) {
        if self.ctx.is_paused(domain) {
            if let Some(state) = self.domains.get(domain) {
                let jobs = worker::drain(&state.queue);
                self.park(jobs);
            }
            return;
        }
        let dest = self.destination(domain);
        let cap = self.connections_per_domain;
        let Some(state) = self.domains.get_mut(domain) else {
            return;
        };
        let queued = state.queue.len();
        // A connection costs a few round trips to open: worth it for a few
        // messages, not for one. Up to what the slow start allows so far.
        let wanted = queued
            .div_ceil(MESSAGES_PER_NEW_CONNECTION)
            .min(state.allowed(cap));
        while state.workers < wanted && !self.ctx.shutdown.is_set() {
            state.workers += 1;
            self.ctx.metrics.connections(domain).inc();
            self.tasks.spawn(worker::work(
                self.ctx.clone(),
                domain.clone(),
                dest.clone(),
                state.queue.clone(),
            ));
        }
    }

    /// Parks, without an attempt, jobs for paused domains (in the background).
    fn park(&mut self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let ctx = self.ctx.clone();
        self.tasks
            .spawn(async move { worker::park(&ctx, jobs).await });
    }

    /// Defers, without a connection attempt, mail for destinations that are down.
    fn suspend(&mut self, jobs: Vec<Job>) {
        let ctx = self.ctx.clone();
        let reasons: HashMap<Arc<str>, String> = jobs
            .iter()
            .filter_map(|j| {
                let down = self.domains.get(&j.domain)?.down.clone()?;
                Some((j.domain.clone(), down))
            })
            .collect();
        self.tasks.spawn(async move {
            // Several at a time, so they share commits; not all, to bound memory.
            const AT_ONCE: usize = 64;
            let mut tasks = tokio::task::JoinSet::new();
            for job in jobs {
                while tasks.len() >= AT_ONCE {
                    tasks.join_next().await;
                }
                let reason = reasons
                    .get(&job.domain)
                    .cloned()
                    .unwrap_or_else(|| "primary unreachable".into());
                let result = RcptResult::Deferred {
                    status: "4.4.1".into(),
                    reply: format!("delivery temporarily suspended: {reason}"),
                    remote: None,
                    unreachable: true,
                };
                let ctx = ctx.clone();
                tasks.spawn(async move {
                    worker::finish(&ctx, &job, false, |_| result.clone()).await;
                });
            }
            while tasks.join_next().await.is_some() {}
        });
    }

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
            Event::WorkerExit { domain } => {
                if let Some(state) = self.domains.get_mut(&domain) {
                    state.workers = state.workers.saturating_sub(1);
                    self.ctx.metrics.connections(&domain).dec();
                }
                self.dispatch(&domain);
            }
            Event::Congested { domain, connected } => {
                if let Some(state) = self.domains.get_mut(&domain) {
                    let allowed = state.allowed(self.connections_per_domain);
                    // What the host took is its limit; a failed session halves.
                    let limit = connected.unwrap_or(allowed / 2).clamp(1, allowed);
                    state.concurrency = limit;
                    state.congested = true;
                    state.credit = 0;
                }
            }
            Event::Reachable { domain } => self.mark_up(&domain),
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
                    self.mark_up(&domain);
                }
            }
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

    fn mark_down(&mut self, domain: &Arc<str>, reason: String) {
        let Some(state) = self.domains.get_mut(domain) else {
            return;
        };
        if state.down.is_none() {
            warn!(%domain, %reason, "primary unreachable; probing every {:?}", self.probe_interval);
            state.down = Some(reason.clone());
            // When it comes back, start slowly again.
            state.concurrency = 0;
            state.congested = false;
            state.credit = 0;
            self.publish(domain, false, Some(&reason));
            // Learn its addresses so an inbound connection from it is recognised.
            let ctx = self.ctx.clone();
            let route = self.destination(domain).route.clone();
            let domain = domain.clone();
            self.tasks.spawn(async move {
                if let Ok(ips) = ctx.router.addresses(&domain, route.as_ref()).await {
                    let _ = ctx.events.send(Event::PrimaryAddresses { domain, ips });
                }
            });
        }
    }

    /// The primary answered: release everything that waited for it.
    fn mark_up(&mut self, domain: &Arc<str>) {
        let Some(state) = self.domains.get_mut(domain) else {
            return;
        };
        // Published even if nothing was marked down: an ETRN or flush may have
        // cleared the mark to let a connection be tried.
        state.down = None;
        state.looping = false;
        state.primary_ips.clear();
        let waiting: Vec<QueueId> = state.waiting.drain().collect();
        self.publish(domain, true, None);
        if waiting.is_empty() {
            return;
        }
        info!(%domain, messages = waiting.len(), "releasing mail that waited for the primary");
        let domain = domain.clone();
        self.release(waiting, move |r| {
            r.unreachable && domain_of(&r.address) == *domain
        });
    }

    /// Makes the matching queued recipients of `ids` due now, in the background.
    fn release(
        &mut self,
        ids: Vec<QueueId>,
        matches: impl Fn(&crate::spool::Recipient) -> bool + Send + Sync + 'static,
    ) {
        let ctx = self.ctx.clone();
        self.tasks
            .spawn(async move { make_due(&ctx, ids, matches).await });
    }

    /// ETRN or an operator's flush: everything for `domain` (or all) due now.
    fn flush_now(&mut self, domain: Option<String>) {
        if let Some(name) = &domain {
            // The primary itself often asks (ETRN): try it rather than suspend.
            let (key, state) = self.domain(name);
            state.down = None;
            let _ = key;
        } else {
            for state in self.domains.values_mut() {
                state.down = None;
            }
        }
        let ctx = self.ctx.clone();
        let dests = self.dests.clone();
        let this_domain = domain.clone();
        self.tasks.spawn(async move {
            let spool = ctx.spool.clone();
            let envelopes = tokio::task::spawn_blocking(move || spool.envelopes())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            let belongs = move |address: &str| match &this_domain {
                None => true,
                Some(d) => {
                    let rd = domain_of(address);
                    rd == *d
                        || dests
                            .configured
                            .iter()
                            .any(|c| c.name == *d && c.covers(&rd))
                }
            };
            let ids: Vec<QueueId> = envelopes
                .iter()
                .filter(|env| {
                    env.recipients
                        .iter()
                        .any(|r| r.status == RcptStatus::Queued && belongs(&r.address))
                })
                .map(|env| env.id)
                .collect();
            make_due(&ctx, ids, move |r| belongs(&r.address)).await;
        });
        info!(
            domain = domain.as_deref().unwrap_or("(all)"),
            "flush requested"
        );
    }

    fn hint(&mut self, ip: IpAddr) {
        let ip = ip.to_canonical();
        let matching: Vec<Arc<str>> = self
            .domains
            .iter()
            .filter(|(_, s)| s.down.is_some() && s.primary_ips.contains(&ip))
            .map(|(d, _)| d.clone())
            .collect();
        for domain in matching {
            info!(%domain, %ip, "the primary connected to us; probing it now");
            self.probe(&domain);
        }
    }

    /// A message now waits for these destinations (stored so, or deferred as
    /// unreachable): remember it for their release, or release it now if one
    /// came back meanwhile.
    fn note_waiting(&mut self, id: QueueId, domains: Vec<String>) {
        let mut back: Vec<String> = Vec::new();
        for name in domains {
            let (_, state) = self.domain(&name);
            if state.down.is_some() {
                state.waiting.insert(id);
            } else {
                back.push(name);
            }
        }
        if !back.is_empty() {
            self.release(vec![id], move |r| {
                r.unreachable && back.contains(&domain_of(&r.address))
            });
        }
    }

    fn probe_down_domains(&mut self) {
        let due: Vec<Arc<str>> = self
            .domains
            .iter()
            .filter(|(_, s)| s.down.is_some() && !s.waiting.is_empty() && !s.probing)
            .map(|(d, _)| d.clone())
            .collect();
        for domain in due {
            self.probe(&domain);
        }
    }

    fn probe(&mut self, domain: &Arc<str>) {
        let dest = self.destination(domain);
        let Some(state) = self.domains.get_mut(domain) else {
            return;
        };
        if state.probing {
            return;
        }
        state.probing = true;
        let ctx = self.ctx.clone();
        let domain = domain.clone();
        self.tasks.spawn(async move {
            let mut up = false;
            if let Ok(hops) = ctx.router.hops(&domain, dest.route.as_ref()).await {
                for hop in &hops {
                    match outbound::probe(hop, &dest.settings).await {
                        Ok(()) => {
                            up = true;
                            break;
                        }
                        Err(e) => {
                            tracing::debug!(%domain, hop = %hop.name, error = %e, "probe failed")
                        }
                    }
                }
            }
            let _ = ctx.events.send(Event::Probed { domain, up });
        });
    }

    /// At shutdown: workers finish the message in hand (they watch the
    /// signal), releases and notices finish their writes; whatever is still
    /// running after [`WORKER_GRACE`] is cancelled. Nothing it did not
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

/// Fails every queued recipient of `id` now, as an operator asked.
async fn bounce(ctx: &Arc<Ctx>, id: QueueId) -> Result<Option<usize>, CommitError> {
    let spool = ctx.spool.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        let env = spool.envelope(id).ok().flatten()?;
        let body = spool.body(id).ok().flatten()?;
        Some((env, body))
    })
    .await
    .ok()
    .flatten();
    let Some((env, body)) = loaded else {
        return Ok(None);
    };
    let rcpts: Vec<usize> = env
        .recipients
        .iter()
        .enumerate()
        .filter(|(_, r)| r.status == RcptStatus::Queued)
        .map(|(i, _)| i)
        .collect();
    let result = RcptResult::Failed {
        status: "5.0.0".into(),
        reply: "returned to the sender by the operator".into(),
        remote: None,
    };
    let results = rcpts.iter().map(|&i| (i, result.clone())).collect();
    let job = Job {
        id,
        domain: Arc::from(crate::metrics::OTHER),
        rcpts: rcpts.clone(),
    };
    worker::record(ctx, &job, &env, &body, results, false).await;
    Ok(Some(rcpts.len()))
}

/// Makes the matching queued recipients of `ids` due now, then has the
/// scheduler look at the due index again.
async fn make_due(
    ctx: &Ctx,
    mut ids: Vec<QueueId>,
    matches: impl Fn(&crate::spool::Recipient) -> bool + Send + Sync + 'static,
) {
    let matches = Arc::new(matches);
    // A release must not be lost to a failed write (a full disk): the IDs
    // are no longer listed as waiting, so keep trying until it is written.
    let mut pause = Duration::from_millis(500);
    loop {
        let now = now_ms();
        let changes = ids
            .iter()
            .map(|&id| {
                let matches = matches.clone();
                let edit = move |env: &mut Envelope| {
                    for r in &mut env.recipients {
                        if r.status == RcptStatus::Queued && matches(r) {
                            r.next_attempt_ms = now;
                        }
                    }
                    Finished::Remove
                };
                (id, Change::Edit(Box::new(edit)))
            })
            .collect();
        let results = ctx.spool.change_many(changes).await;
        let mut failed = Vec::new();
        for (id, result) in ids.iter().zip(results) {
            if let Err(e) = result {
                warn!(queue_id = %id, error = %e, "cannot make queued mail due; retrying");
                failed.push(*id);
            }
        }
        let _ = ctx.events.send(Event::Released);
        if failed.is_empty() || ctx.shutdown.is_set() {
            return;
        }
        ids = failed;
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

/// Queued recipients of `env` due at `now_ms`, grouped by destination.
fn due_recipients(env: &Envelope, now_ms: u64) -> Vec<(String, Vec<usize>)> {
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, r) in env.recipients.iter().enumerate() {
        if r.status != RcptStatus::Queued || r.next_attempt_ms > now_ms {
            continue;
        }
        let domain = domain_of(&r.address);
        match groups.iter_mut().find(|(d, _)| *d == domain) {
            Some((_, v)) => v.push(i),
            None => groups.push((domain, vec![i])),
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{Notify, Recipient};

    #[test]
    fn connections_start_few_grow_per_delivery_and_slowly_after_push_back() {
        let mut state = DomainState::default();
        assert_eq!(state.allowed(20), INITIAL_CONNECTIONS);
        assert_eq!(state.allowed(2), 2, "never above the cap");
        assert_eq!(state.allowed(0), 1, "never below one");
        // Slow start: every delivery earns one more, up to the cap.
        for want in INITIAL_CONNECTIONS + 1..=20 {
            assert!(state.grow(20));
            assert_eq!(state.allowed(20), want);
        }
        assert!(!state.grow(20));
        assert_eq!(state.allowed(20), 20);

        // The host refused one more while 3 worked: 3 it is, and growth slows.
        state.concurrency = 3;
        state.congested = true;
        for _ in 1..DELIVERIES_PER_STEP {
            assert!(!state.grow(20));
        }
        assert!(state.grow(20));
        assert_eq!(state.allowed(20), 4);
    }

    #[test]
    fn groups_due_recipients_by_domain() {
        let rcpt = |address: &str, next: u64, status| Recipient {
            address: address.into(),
            orcpt: None,
            notify: Notify::default(),
            status,
            attempts: 0,
            next_attempt_ms: next,
            last_reply: None,
            unreachable: false,
            delay_notified: false,
            suspect: false,
        };
        let mut env = crate::spool::testing::envelope("", &[]);
        env.recipients = vec![
            rcpt("a@example.com", 10, RcptStatus::Queued),
            rcpt("b@Example.COM.", 5, RcptStatus::Queued),
            rcpt("c@example.org", 10, RcptStatus::Queued),
            rcpt("d@example.com", 50, RcptStatus::Queued),
            rcpt("e@example.org", 1, RcptStatus::Delivered),
        ];
        assert_eq!(
            due_recipients(&env, 10),
            vec![
                ("example.com".to_string(), vec![0, 1]),
                ("example.org".to_string(), vec![2])
            ]
        );
        assert_eq!(
            due_recipients(&env, 5),
            vec![("example.com".to_string(), vec![1])]
        );
    }
}
