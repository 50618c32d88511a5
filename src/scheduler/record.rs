//! Recording what an attempt did: the drain guard's judgement, the new
//! recipient states (backoff, expiry), the notices owed, what was learned
//! about mailboxes, the counters and log lines, all written in one spool
//! change before the scheduler hears the job is done. Parking a paused
//! domain's jobs is recorded here too.

use std::time::Duration;

use tracing::{info, warn};

use super::Job;
use super::notice;
use super::outcome::{self, NoticeKind, RcptResult};
use super::worker::{Ctx, done};
use crate::spool::{
    Change, CommitError, Envelope, Finished, NewMessage, PARKED, RcptStatus, Recipient,
};
use crate::status::Status;

/// How long a failed outcome write waits before it is tried again.
const RECORD_RETRY: Duration = Duration::from_secs(1);

/// Writes the attempt's results (and the notices they call for) to the spool,
/// then tells the scheduler the job is done. The drain guard sees the results
/// first: while the domain is paused nothing fails or expires.
pub(super) async fn record(
    ctx: &Ctx,
    job: &Job,
    env: &Envelope,
    body: &[u8],
    mut results: Vec<(usize, RcptResult)>,
    tried: bool,
) {
    let now = ctx.clock.now_ms();
    let label = ctx.metrics.label(&job.domain).to_owned();
    judge(ctx, &label, &mut results, now).await;
    let applied = outcome::apply(env, &results, now, &ctx.rules, fastrand::f64());
    let notices = notices(ctx, env, body, &applied, now);
    log(job, env, &applied);
    count(ctx, &job.domain, &applied, tried);
    if ctx.learns(&job.domain) {
        ctx.learned.learn(verdicts(env, &results), now);
    }
    let has_notices = !notices.is_empty();
    let waits_for_primary = applied
        .recipients
        .iter()
        .any(|(_, r)| r.status == RcptStatus::Queued && r.unreachable);
    let delivered = tried
        && applied
            .recipients
            .iter()
            .any(|(_, r)| r.status == RcptStatus::Delivered);
    write(ctx, job, &label, applied.recipients, notices, now).await;
    if has_notices {
        ctx.queued.notify_one();
    }
    done(ctx, job, waits_for_primary, delivered);
}

/// Writes the new recipient states and the notices in one spool change. A
/// write that fails (typically a full disk) is tried again every second
/// until it lands: an unrecorded delivery would be made again, and its
/// recipients would get the mail twice. Only a stop (or a spool over its
/// size limit) leaves it unrecorded; the message is then tried again
/// later, so nobody loses it.
async fn write(
    ctx: &Ctx,
    job: &Job,
    label: &str,
    patches: Vec<(usize, Recipient)>,
    notices: Vec<NewMessage>,
    now: u64,
) {
    let mut warned = false;
    loop {
        let change = edit(ctx, label.to_owned(), patches.clone(), now);
        match ctx.spool.change(job.id, change, notices.clone()).await {
            Ok(Some(env)) if env.next_due_ms().is_none() => {
                tracing::debug!(queue_id = %env.id, "message finished");
                return;
            }
            Ok(_) => return,
            Err(e @ CommitError::Io(_)) if !ctx.shutdown.is_set() => {
                if !warned {
                    warn!(queue_id = %job.id, error = %e,
                        "cannot record delivery outcome; trying again until it is written");
                    warned = true;
                }
                tokio::time::sleep(RECORD_RETRY).await;
            }
            Err(e) => {
                warn!(queue_id = %job.id, error = %e,
                    "delivery outcome not recorded; the message will be tried again");
                return;
            }
        }
    }
}

/// The drain guard's look at the results: refusals past its limit pause the
/// domain (durably, and said loudly) and are held instead of failed.
async fn judge(ctx: &Ctx, label: &str, results: &mut [(usize, RcptResult)], now: u64) {
    let tripped = ctx.guard.lock().judge(label, results, now);
    if let Some(pause) = tripped {
        warn!(
            domain = %label,
            refusals = ctx.drain_guard,
            "drain guard: the primary refused this many recipients in a row; delivery to the \
             domain is paused and its refusals are kept instead of bounced until an operator \
             resumes it (mxspool queue resume {label})"
        );
        if let Err(e) = ctx.publish_pause(label, pause).await {
            warn!(domain = %label, error = %e, "cannot record the pause; it holds until a restart");
        }
    }
}

/// The notices the attempt calls for, as new messages to queue, counted.
fn notices(
    ctx: &Ctx,
    env: &Envelope,
    body: &[u8],
    applied: &outcome::Applied,
    now: u64,
) -> Vec<NewMessage> {
    let mut after = env.clone();
    for (i, r) in &applied.recipients {
        after.recipients[*i] = r.clone();
    }
    let policy = notice::Policy {
        bounce: ctx.bounce,
        postmaster: &ctx.postmaster,
        hostname: &ctx.hostname,
        lifetime_ms: ctx.rules.lifetime.as_millis() as u64,
    };
    let spool = &ctx.spool;
    let planned = notice::plan(&after, body, &applied.notices, &policy, now, &mut || {
        spool.next_id(now.saturating_mul(1000))
    });
    planned
        .into_iter()
        .map(|(kind, n)| {
            let kind = match kind {
                NoticeKind::Failed => "failed",
                NoticeKind::Delayed => "delayed",
                NoticeKind::Relayed => "relayed",
            };
            info!(queue_id = %n.envelope.id, about = %env.id, to = %n.envelope.recipients[0].address, kind, "notice queued");
            ctx.metrics.dsn_sent.with_label_values(&[kind]).inc();
            n
        })
        .collect()
}

/// One log line per recipient: what became of it.
fn log(job: &Job, env: &Envelope, applied: &outcome::Applied) {
    for (i, r) in &applied.recipients {
        let outcome = match r.status {
            RcptStatus::Delivered => "delivered",
            RcptStatus::Failed => "failed",
            RcptStatus::Queued if r.next_attempt_ms == PARKED && r.suspect => {
                "refusal held: domain paused"
            }
            RcptStatus::Queued if r.next_attempt_ms == PARKED => "parked: domain paused",
            RcptStatus::Queued => "deferred",
        };
        info!(
            queue_id = %env.id,
            to = %r.address,
            domain = %job.domain,
            attempts = r.attempts,
            reply = r.last_reply.as_deref().unwrap_or(""),
            index = i,
            "{outcome}"
        );
    }
}

/// What the primary's answers say about its mailboxes: 250 means the
/// mailbox exists; 5.1.1 means it does not (DESIGN.md).
fn verdicts(env: &Envelope, results: &[(usize, RcptResult)]) -> Vec<(String, bool)> {
    results
        .iter()
        .filter_map(|(i, result)| {
            let address = env.recipients.get(*i)?.address.clone();
            match result {
                RcptResult::Delivered { .. } => Some((address, true)),
                RcptResult::Failed { status, .. } if *status == Status::NO_SUCH_MAILBOX => {
                    Some((address, false))
                }
                _ => None,
            }
        })
        .collect()
}

/// The spool edit that records the new recipient states: only recipients
/// still waiting change (an operator may have acted meanwhile), and what
/// would wait for a resume that has happened since is due now.
fn edit(ctx: &Ctx, label: String, patches: Vec<(usize, Recipient)>, now: u64) -> Change {
    let guard = ctx.guard.clone();
    let bounce = ctx.bounce;
    Change::Edit(Box::new(move |env: &mut Envelope| {
        let resumed = guard.paused(&label).is_none();
        for (i, mut r) in patches {
            if resumed && r.next_attempt_ms == PARKED {
                r.next_attempt_ms = now;
            }
            if let Some(slot) = env.recipients.get_mut(i)
                && slot.status == RcptStatus::Queued
            {
                *slot = r;
            }
        }
        if notice::unreportable(env, bounce) {
            Finished::Bury
        } else {
            Finished::Remove
        }
    }))
}

/// Takes jobs of a paused domain out of the due order without an attempt:
/// their recipients wait, parked, for the resume, which makes them due. A job
/// whose domain was resumed by the time it is written stays due.
pub(super) async fn park(ctx: &Ctx, jobs: Vec<Job>) {
    let changes = jobs
        .iter()
        .map(|job| {
            let guard = ctx.guard.clone();
            let label = ctx.metrics.label(&job.domain).to_owned();
            let rcpts = job.rcpts.clone();
            let edit = move |env: &mut Envelope| {
                if guard.paused(&label).is_some() {
                    for i in rcpts {
                        if let Some(r) = env.recipients.get_mut(i)
                            && r.status == RcptStatus::Queued
                        {
                            r.next_attempt_ms = PARKED;
                            r.unreachable = false;
                        }
                    }
                }
                Finished::Remove
            };
            (job.id, Change::Edit(Box::new(edit)))
        })
        .collect();
    let results = ctx.spool.change_many(changes).await;
    let mut failed = false;
    for (job, result) in jobs.iter().zip(&results) {
        if let Err(e) = result {
            warn!(queue_id = %job.id, domain = %job.domain, error = %e,
                "cannot park mail of a paused domain");
            failed = true;
        }
    }
    if failed {
        // Typically a full disk: the jobs come due again; not at once.
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    for job in &jobs {
        done(ctx, job, false, false);
    }
}

/// Bumps the delivery counters for one recorded attempt.
fn count(ctx: &Ctx, domain: &str, applied: &outcome::Applied, tried: bool) {
    let m = &ctx.metrics;
    let label = m.label(domain);
    let recipients = &applied.recipients;
    let result = if !tried {
        "suspended"
    } else if recipients
        .iter()
        .any(|(_, r)| r.status == RcptStatus::Queued)
    {
        "deferred"
    } else if recipients
        .iter()
        .any(|(_, r)| r.status == RcptStatus::Failed)
    {
        "failed"
    } else {
        "delivered"
    };
    m.attempts.with_label_values(&[label, result]).inc();
    for (_, r) in recipients {
        if r.status == RcptStatus::Delivered {
            m.delivered.with_label_values(&[label]).inc();
        }
    }
    for (_, reason) in &applied.failures {
        m.failed.with_label_values(&[label, reason.label()]).inc();
    }
}
