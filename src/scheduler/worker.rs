//! A delivery worker: one connection to one destination. It takes jobs from
//! its destination's queue, delivers them over a reused connection, and
//! records each outcome (with any notices it calls for) in the spool before
//! telling the scheduler the job is done. Workers of different destinations
//! share nothing, so a slow or hanging primary delays only its own mail.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::guard;
use super::record::record;

use super::outcome::{RcptResult, Rules};
use crate::config::BouncePolicy;
use crate::domain::RelayDomains;
use crate::health::Health;
use crate::knowledge::Learned;
use crate::metrics::Metrics;
use crate::outbound::{self, Connection, Hop, Outcome, Progress, SessionError, Ticket};
use crate::route::{Destination, RouteError, Router};
use crate::shutdown::Shutdown;
use crate::spool::{Change, CommitError, Envelope, Pause, Spool};
use crate::status::{Failure, Status};

use super::{Event, Job};
use crate::clock::Clock;

/// The ready jobs of one destination and how many of its connections carry
/// mail, shared by the scheduler and the destination's workers.
#[derive(Default)]
pub(super) struct Lane {
    jobs: Mutex<VecDeque<Job>>,
    /// Connections past the greeting. A connection that fails while others
    /// work is congestion (a connection limit, a busy host), not a primary
    /// that is down.
    connected: AtomicUsize,
    /// Workers between starting to connect and knowing whether they could.
    connecting: AtomicUsize,
    /// Connections that got through, ever: one that got through while ours
    /// failed proves the host up, even if it is done already.
    successes: AtomicU64,
    /// Any of the counters above changed.
    changed: tokio::sync::Notify,
}

pub(super) type Queue = Arc<Lane>;

impl Lane {
    fn jobs(&self) -> std::sync::MutexGuard<'_, VecDeque<Job>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn push(&self, job: Job) {
        self.jobs().push_back(job);
    }

    pub fn len(&self) -> usize {
        self.jobs().len()
    }

    /// After our attempt failed: whether the host is up but would not take one
    /// more connection. Waits until every attempt that started alongside ours
    /// has its answer: five connections refused at once mean "down", two
    /// taken and three greeted with 421 mean "busy".
    async fn congested(&self, successes_before: u64) -> bool {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.connected.load(Ordering::Acquire) > 0
                || self.successes.load(Ordering::Acquire) > successes_before
            {
                return true;
            }
            if self.connecting.load(Ordering::Acquire) == 0 {
                return false;
            }
            changed.await;
        }
    }

    fn update(&self, counter: &AtomicUsize, up: bool) {
        if up {
            counter.fetch_add(1, Ordering::AcqRel);
        } else {
            counter.fetch_sub(1, Ordering::AcqRel);
        }
        self.changed.notify_waiters();
    }
}

/// Everything workers share.
pub(super) struct Ctx {
    pub spool: Spool,
    pub router: Arc<Router>,
    pub rules: Rules,
    pub bounce: BouncePolicy,
    pub postmaster: String,
    pub hostname: String,
    pub messages_per_connection: usize,
    pub events: mpsc::UnboundedSender<Event>,
    /// Wakes the scheduler when a notice was queued.
    pub queued: Arc<tokio::sync::Notify>,
    pub shutdown: Shutdown,
    /// The relay domains with `verify_recipients`.
    pub verified: RelayDomains,
    pub metrics: Arc<Metrics>,
    /// The drain guard and the domains paused, by configured domain.
    pub guard: guard::Shared,
    /// `delivery.drain_guard`, for the warning when it trips.
    pub drain_guard: u32,
    /// Primary health, reported to as workers find primaries up or down.
    pub health: Arc<Health>,
    /// Recipient verdicts learned from deliveries.
    pub learned: Arc<Learned>,
    pub clock: Clock,
}

impl Ctx {
    /// Whether delivery to `domain` (any recipient domain) is paused.
    pub fn is_paused(&self, domain: &str) -> bool {
        self.guard.paused(self.metrics.label(domain)).is_some()
    }

    /// Makes a pause of configured domain `domain`, already in the guard,
    /// durable and visible: the spool (so it outlives a restart), the gauge,
    /// and the scheduler, which takes the domain's waiting jobs out of
    /// delivery.
    pub async fn publish_pause(&self, domain: &str, pause: Pause) -> Result<(), CommitError> {
        let _ = self.events.send(Event::Paused {
            domain: Arc::from(domain),
        });
        self.spool.set_pause(domain, Some(pause)).await?;
        self.metrics
            .domain_paused
            .with_label_values(&[domain])
            .set(1);
        Ok(())
    }

    /// Whether the primary's answers about `domain`'s recipients are kept.
    pub fn learns(&self, domain: &str) -> bool {
        self.verified.covering(domain).is_some()
    }
}

fn pop(queue: &Queue) -> Option<Job> {
    queue.jobs().pop_front()
}

pub(super) fn drain(queue: &Queue) -> Vec<Job> {
    queue.jobs().drain(..).collect()
}

/// Runs one connection's worth of work for `domain`, then reports its exit.
pub(super) async fn work(ctx: Arc<Ctx>, domain: Arc<str>, dest: Arc<Destination>, queue: Queue) {
    run(&ctx, &domain, &dest, &queue).await;
    let _ = ctx.events.send(Event::WorkerExit { domain });
}

async fn run(ctx: &Arc<Ctx>, domain: &Arc<str>, dest: &Destination, queue: &Queue) {
    if ctx.is_paused(domain) {
        // Paused since this worker was started: the scheduler parks the jobs
        // when it hears of the exit.
        return;
    }
    let Some(first) = pop(queue) else {
        return;
    };
    let hops = match ctx.router.hops(domain, dest.route.as_ref()).await {
        Ok(hops) => hops,
        Err(e) => return unroutable(ctx, domain, &e, first, queue).await,
    };
    let successes_before = queue.successes.load(Ordering::Acquire);
    let mut connection = match open(&hops, dest, queue).await {
        Ok(connection) => connection,
        Err((hop, error)) => {
            return not_connected(ctx, domain, (hop, error), successes_before, first, queue).await;
        }
    };
    let _ = ctx.events.send(Event::Reachable {
        domain: domain.clone(),
    });
    carry(ctx, domain, &mut connection, first, queue).await;
    queue.update(&queue.connected, false);
    connection.quit().await;
}

/// No route to the destination: the same answer holds for everything queued
/// for it. A loop (we are its best MX) is said loudly and counted.
async fn unroutable(ctx: &Ctx, domain: &Arc<str>, e: &RouteError, first: Job, queue: &Queue) {
    if *e == RouteError::Loop {
        warn!(%domain, "mail loop: we are the best MX for this domain; deferring its mail");
        ctx.metrics
            .loops
            .with_label_values(&[ctx.metrics.label(domain)])
            .inc();
        let _ = ctx.events.send(Event::Loop {
            domain: domain.clone(),
        });
    }
    let result = route_failure(e, domain);
    for job in std::iter::once(first).chain(drain(queue)) {
        finish(ctx, &job, true, |_| result.clone()).await;
    }
}

/// A connection to the first hop that takes one, or the last hop's error.
async fn open(
    hops: &[Hop],
    dest: &Destination,
    queue: &Queue,
) -> Result<Connection, (Hop, SessionError)> {
    let mut failure = None;
    let mut connection = None;
    queue.update(&queue.connecting, true);
    for hop in hops {
        match outbound::connect(hop, &dest.settings).await {
            Ok(c) => {
                connection = Some(c);
                break;
            }
            Err(e) => failure = Some((hop.clone(), e)),
        }
    }
    if connection.is_some() {
        queue.successes.fetch_add(1, Ordering::AcqRel);
        queue.connected.fetch_add(1, Ordering::AcqRel);
    }
    queue.update(&queue.connecting, false);
    connection.ok_or_else(|| failure.expect("a route has at least one hop"))
}

/// No hop took a connection. If others of ours carry mail, the host is up
/// but will not take one more: leave the mail to them and open fewer.
/// Otherwise everything queued gets the session's failure, and an
/// unreachable primary is reported.
async fn not_connected(
    ctx: &Ctx,
    domain: &Arc<str>,
    (hop, error): (Hop, SessionError),
    successes_before: u64,
    first: Job,
    queue: &Queue,
) {
    if queue.congested(successes_before).await {
        info!(%domain, hop = %hop.name, addr = %hop.addr, %error,
            "cannot open another connection; fewer from now on");
        queue.jobs().push_front(first);
        let _ = ctx.events.send(Event::Congested {
            domain: domain.clone(),
            connected: Some(queue.connected.load(Ordering::Acquire)),
        });
        return;
    }
    info!(%domain, hop = %hop.name, addr = %hop.addr, %error, "cannot deliver");
    if error.unreachable() {
        let _ = ctx.events.send(Event::Unreachable {
            domain: domain.clone(),
            reason: error.to_string(),
        });
    }
    let result = session_failure(&error, &hop);
    for job in std::iter::once(first).chain(drain(queue)) {
        finish(ctx, &job, true, |_| result.clone()).await;
    }
}

/// A message handed to the connection, until its outcome is in.
struct Sent {
    job: Job,
    env: Envelope,
    body: Arc<Vec<u8>>,
    started: tokio::time::Instant,
}

/// Delivers `first` and then whatever the queue holds over one connection,
/// as many messages in flight as the connection takes (see
/// `outbound::Connection::submit`), up to `messages_per_connection`.
async fn carry(
    ctx: &Arc<Ctx>,
    domain: &Arc<str>,
    connection: &mut Connection,
    first: Job,
    queue: &Queue,
) {
    let remote = connection.remote_name().to_owned();
    let mut first = Some(first);
    let mut submitted = 0;
    let mut sent: HashMap<Ticket, Sent> = HashMap::new();
    // The next message, loaded while the replies to the last ones travel.
    let mut loaded: Option<(Job, Envelope, Vec<u8>)> = None;
    // Outcomes are written while the next messages go out: the next hop is
    // not kept waiting for our fsync. A crash before a write only means that
    // delivery is repeated (at least once).
    let mut recording = Recording::default();
    // A pause stops the connection after what is in flight: the rest of the
    // queue is parked by the scheduler when this worker exits.
    let more = |submitted: usize| {
        submitted < ctx.messages_per_connection && !ctx.shutdown.is_set() && !ctx.is_paused(domain)
    };
    loop {
        while connection.has_room() && more(submitted) {
            let next = match loaded.take() {
                Some(next) => Some(next),
                None => next_loaded(ctx, &mut first, queue).await,
            };
            let Some((job, env, body)) = next else {
                break;
            };
            submitted += 1;
            let body = Arc::new(body);
            let started = tokio::time::Instant::now();
            let ticket = connection.submit(&env, body.clone(), &job.rcpts).await;
            count_changes(ctx, domain, connection.take_changes());
            let message = Sent {
                job,
                env,
                body,
                started,
            };
            sent.insert(ticket, message);
        }
        connection.send().await;
        if loaded.is_none() && !sent.is_empty() && more(submitted) {
            loaded = next_loaded(ctx, &mut first, queue).await;
        }
        match connection.advance().await {
            Progress::Done { ticket, outcomes } => {
                let Some(message) = sent.remove(&ticket) else {
                    continue;
                };
                ctx.metrics
                    .delivery_seconds
                    .observe(message.started.elapsed().as_secs_f64());
                let results = outcomes
                    .into_iter()
                    .map(|(i, o)| (i, from_outcome(o, &remote)))
                    .collect();
                recording.start(ctx, message, results).await;
            }
            Progress::Room => {}
            Progress::Idle => break,
            Progress::Failed { tickets, error } => {
                info!(%domain, %remote, error = %error, messages = tickets.len(),
                    "connection failed with messages in flight; deferring them");
                let in_flight = sent.drain().map(|(_, message)| message);
                failed_in_flight(ctx, domain, &remote, &error, in_flight, &mut recording).await;
                break;
            }
        }
    }
    // Loaded but never sent: the next connection takes it.
    if let Some((job, ..)) = loaded {
        queue.jobs().push_front(job);
    }
    recording.finish().await;
}

/// What the connection changed in a message on its way, in the metrics.
fn count_changes(ctx: &Ctx, domain: &str, changes: outbound::Changes) {
    let label = [ctx.metrics.label(domain)];
    if changes.lines_broken > 0 {
        ctx.metrics
            .lines_broken
            .with_label_values(&label)
            .inc_by(changes.lines_broken);
    }
    if changes.converted > 0 {
        ctx.metrics
            .converted
            .with_label_values(&label)
            .inc_by(changes.converted);
    }
}

/// The connection failed: fewer connections from now on, an unreachable
/// primary reported, and everything in flight deferred (no outcome will
/// come for it).
async fn failed_in_flight(
    ctx: &Arc<Ctx>,
    domain: &Arc<str>,
    remote: &str,
    error: &SessionError,
    in_flight: impl Iterator<Item = Sent>,
    recording: &mut Recording,
) {
    let _ = ctx.events.send(Event::Congested {
        domain: domain.clone(),
        connected: None,
    });
    if error.unreachable() {
        let _ = ctx.events.send(Event::Unreachable {
            domain: domain.clone(),
            reason: error.to_string(),
        });
    }
    for message in in_flight {
        info!(queue_id = %message.env.id, %domain, %remote, %error, "delivery attempt failed");
        let result = RcptResult::Deferred {
            status: session_status(error),
            reply: format!("{remote}: {error}"),
            remote: Some(remote.to_owned()),
            unreachable: error.unreachable(),
        };
        let results = message
            .job
            .rcpts
            .iter()
            .map(|&i| (i, result.clone()))
            .collect();
        recording.start(ctx, message, results).await;
    }
}

/// The next job that is still queued, with its envelope and body: `first`,
/// then the destination's queue. Jobs that left the queue meanwhile are done.
async fn next_loaded(
    ctx: &Ctx,
    first: &mut Option<Job>,
    queue: &Queue,
) -> Option<(Job, Envelope, Vec<u8>)> {
    loop {
        let job = first.take().or_else(|| pop(queue))?;
        match load(ctx, &job).await {
            Some((env, body)) => return Some((job, env, body)),
            None => done(ctx, &job, false, false),
        }
    }
}

/// Outcome writes in progress for one connection.
#[derive(Default)]
struct Recording {
    tasks: tokio::task::JoinSet<()>,
}

impl Recording {
    /// Most writes one connection leaves in progress; beyond, it waits.
    const MAX: usize = 16;

    async fn start(&mut self, ctx: &Arc<Ctx>, message: Sent, results: Vec<(usize, RcptResult)>) {
        while self.tasks.len() >= Self::MAX {
            self.tasks.join_next().await;
        }
        let ctx = ctx.clone();
        self.tasks.spawn(async move {
            let Sent { job, env, body, .. } = message;
            record(&ctx, &job, &env, &body, results, true).await;
        });
    }

    async fn finish(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

pub(super) fn done(ctx: &Ctx, job: &Job, unreachable: bool, delivered: bool) {
    let _ = ctx.events.send(Event::Done {
        id: job.id,
        domain: job.domain.clone(),
        unreachable,
        delivered,
    });
}

/// Records the same result for every recipient of a job. `tried`: a
/// connection was attempted (false when the destination was known to be down).
pub(super) async fn finish(
    ctx: &Ctx,
    job: &Job,
    tried: bool,
    result: impl Fn(usize) -> RcptResult,
) {
    match load(ctx, job).await {
        Some((env, body)) => {
            let results = job.rcpts.iter().map(|&i| (i, result(i))).collect();
            record(ctx, job, &env, &body, results, tried).await;
        }
        None => done(ctx, job, false, false),
    }
}

/// The message's envelope and body, unless it left the queue or was put on hold.
/// A message whose body is gone (a damaged spool) can never be delivered: it
/// is moved to quarantine, not retried forever.
async fn load(ctx: &Ctx, job: &Job) -> Option<(Envelope, Vec<u8>)> {
    let spool = ctx.spool.clone();
    let id = job.id;
    let loaded = tokio::task::spawn_blocking(move || {
        match spool.is_held(id) {
            Ok(true) => return Loaded::Gone,
            Ok(false) => {}
            Err(e) => return Loaded::Unreadable(e.to_string()),
        }
        let env = match spool.envelope(id) {
            Ok(Some(env)) => env,
            Ok(None) => return Loaded::Gone,
            Err(e) => return Loaded::Unreadable(e.to_string()),
        };
        match spool.body(id) {
            Ok(Some(body)) => Loaded::Message(Box::new(env), body),
            Ok(None) => Loaded::NoBody,
            Err(e) => Loaded::Unreadable(e.to_string()),
        }
    })
    .await
    .unwrap_or_else(|e| Loaded::Unreadable(e.to_string()));
    match loaded {
        Loaded::Message(env, body) => return Some((*env, body)),
        Loaded::Gone => tracing::debug!(queue_id = %id, "no longer queued, skipped"),
        // The spool is being reopened after a failed write, say: the message
        // is still queued and must not wait for its next retry time.
        Loaded::Unreadable(error) => {
            warn!(queue_id = %id, %error, "cannot read a queued message; trying it again shortly");
            let _ = ctx.events.send(Event::Unread {
                id,
                domain: job.domain.clone(),
            });
        }
        Loaded::NoBody => match ctx.spool.change(id, Change::Quarantine, Vec::new()).await {
            Ok(_) => tracing::error!(
                queue_id = %id,
                "message body missing from the spool; envelope moved to quarantine"
            ),
            Err(e) => warn!(queue_id = %id, error = %e, "cannot quarantine a message without body"),
        },
    }
    None
}

/// What [`load`] found.
enum Loaded {
    Message(Box<Envelope>, Vec<u8>),
    /// Not queued (any more), or held.
    Gone,
    /// The spool could not be read just now.
    Unreadable(String),
    /// Queued, but its body is missing.
    NoBody,
}

fn from_outcome(outcome: Outcome, remote: &str) -> RcptResult {
    match outcome {
        Outcome::Delivered { reply, relayed } => RcptResult::Delivered {
            reply,
            relayed,
            remote: remote.to_owned(),
        },
        Outcome::Failed {
            status,
            reply,
            reason,
        } => RcptResult::Failed {
            status,
            reply,
            remote: Some(remote.to_owned()),
            reason,
        },
        Outcome::Deferred { status, reply } => RcptResult::Deferred {
            status,
            reply,
            remote: Some(remote.to_owned()),
            unreachable: false,
        },
    }
}

/// RFC 3463 status for a session that failed: the reply's own if it carried
/// one, as transient: the session as a whole failing is always temporary for
/// the mail.
fn session_status(e: &SessionError) -> Status {
    match e.reply().map(|reply| reply.class()) {
        Some(
            outbound::Class::Transient { status }
            | outbound::Class::Permanent { status }
            | outbound::Class::Closing { status },
        ) => status.as_transient(),
        Some(_) => Status::transient(4, 2),
        None if e.unreachable() => Status::transient(4, 1),
        None => Status::transient(4, 2),
    }
}

fn session_failure(e: &SessionError, hop: &Hop) -> RcptResult {
    RcptResult::Deferred {
        status: session_status(e),
        reply: format!("{}[{}]: {e}", hop.name, hop.addr),
        remote: Some(hop.name.clone()),
        unreachable: e.unreachable(),
    }
}

/// The result for every recipient of a destination that could not be
/// routed: a domain that cannot get mail fails ([`Failure::Routing`]); DNS
/// trouble, a loop or no addresses wait.
fn route_failure(e: &RouteError, domain: &str) -> RcptResult {
    let reply = format!("{domain}: {e}");
    if e.is_permanent() {
        RcptResult::Failed {
            status: e.status(),
            reply,
            remote: None,
            reason: Failure::Routing,
        }
    } else {
        RcptResult::Deferred {
            status: e.status(),
            reply,
            remote: None,
            unreachable: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_domain_that_cannot_get_mail_fails_for_routing() {
        for error in [RouteError::NullMx, RouteError::NoSuchDomain] {
            let RcptResult::Failed { status, reason, .. } = route_failure(&error, "example.com")
            else {
                panic!("{error:?} should fail");
            };
            assert_eq!(reason, Failure::Routing);
            assert_eq!(status.class(), 5);
        }
        let null_mx = route_failure(&RouteError::NullMx, "example.com");
        assert!(
            matches!(&null_mx, RcptResult::Failed { status, .. } if status.to_string() == "5.1.10"),
            "{null_mx:?}"
        );
        for error in [
            RouteError::Dns("SERVFAIL".into()),
            RouteError::Loop,
            RouteError::NoAddresses,
        ] {
            assert!(matches!(
                route_failure(&error, "example.com"),
                RcptResult::Deferred { .. }
            ));
        }
    }
}
