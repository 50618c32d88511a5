//! Mail made due now, or taken out of delivery without an attempt: releases
//! (a primary back, ETRN, an operator's flush), parking for a paused domain,
//! suspension while a primary is down, and an operator's bounce. The spool
//! writes run in background tasks; the scheduler task never waits on them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::outcome::RcptResult;
use super::record;
use super::worker::{self, Ctx};
use super::{Event, Job, Scheduler};
use crate::address::domain_of;
use crate::route::Destinations;
use crate::spool::{Change, CommitError, Envelope, Finished, QueueId, RcptStatus, Recipient};
use crate::status::{Failure, Status};

impl Scheduler {
    /// Parks, without an attempt, jobs for paused domains (in the background).
    pub(super) fn park(&mut self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let ctx = self.ctx.clone();
        self.tasks
            .spawn(async move { record::park(&ctx, jobs).await });
    }

    /// Defers, without a connection attempt, mail for destinations that are down.
    pub(super) fn suspend(&mut self, jobs: Vec<Job>) {
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
                    status: Status::transient(4, 1),
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

    /// Makes the matching queued recipients of `ids` due now, in the background.
    pub(super) fn release(
        &mut self,
        ids: Vec<QueueId>,
        matches: impl Fn(&Recipient) -> bool + Send + Sync + 'static,
    ) {
        let ctx = self.ctx.clone();
        self.tasks
            .spawn(async move { make_due(&ctx, ids, matches).await });
    }

    /// ETRN or an operator's flush: everything for `domain` (or all) due now.
    pub(super) fn flush_now(&mut self, domain: Option<String>) {
        if let Some(name) = &domain {
            // The primary itself often asks (ETRN): try it rather than suspend.
            let (_, state) = self.domain(name);
            state.down = None;
        } else {
            for state in self.domains.values_mut() {
                state.down = None;
            }
        }
        let ctx = self.ctx.clone();
        let dests = self.dests.clone();
        let this_domain = domain.clone();
        self.tasks
            .spawn(async move { flush(&ctx, dests, this_domain).await });
        info!(
            domain = domain.as_deref().unwrap_or("(all)"),
            "flush requested"
        );
    }

    /// A message now waits for these destinations (stored so, or deferred as
    /// unreachable): remember it for their release, or release it now if one
    /// came back meanwhile.
    pub(super) fn note_waiting(&mut self, id: QueueId, domains: Vec<String>) {
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
}

/// Makes every queued recipient at `domain` (and at its subdomains, for a
/// configured domain that includes them), or all for `None`, due now.
async fn flush(ctx: &Ctx, dests: Arc<Destinations>, domain: Option<String>) {
    let belongs = Arc::new(move |address: &str| match &domain {
        None => true,
        Some(d) => {
            let rd = domain_of(address);
            rd == *d || dests.relay.get(d).is_some_and(|c| c.covers(&rd))
        }
    });
    // The IDs only, read one envelope at a time (see `make_due`).
    let spool = ctx.spool.clone();
    let matching = belongs.clone();
    let ids = tokio::task::spawn_blocking(move || {
        let mut ids: Vec<QueueId> = Vec::new();
        let read = spool.each_envelope(&mut |env| {
            if env
                .recipients
                .iter()
                .any(|r| r.status == RcptStatus::Queued && matching(&r.address))
            {
                ids.push(env.id);
            }
        });
        if let Err(e) = read {
            warn!(error = %e, "cannot read the queue for a flush");
        }
        ids
    })
    .await
    .unwrap_or_default();
    make_due(ctx, ids, move |r| belongs(&r.address)).await;
}

/// Fails every queued recipient of `id` now, as an operator asked.
pub(super) async fn bounce(ctx: &Arc<Ctx>, id: QueueId) -> Result<Option<usize>, CommitError> {
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
    // Counted with the refusals, as it always was: the label set is fixed.
    let result = RcptResult::Failed {
        status: Status::permanent(0, 0),
        reply: "returned to the sender by the operator".into(),
        remote: None,
        reason: Failure::Rejected,
    };
    let results = rcpts.iter().map(|&i| (i, result.clone())).collect();
    let job = Job {
        id,
        domain: Arc::from(crate::metrics::OTHER),
        rcpts: rcpts.clone(),
    };
    record::record(ctx, &job, &env, &body, results, false).await;
    Ok(Some(rcpts.len()))
}

/// Makes the matching queued recipients of `ids` due now, then has the
/// scheduler look at the due index again.
async fn make_due(
    ctx: &Ctx,
    ids: Vec<QueueId>,
    matches: impl Fn(&Recipient) -> bool + Send + Sync + 'static,
) {
    let matches = Arc::new(matches);
    // In slices: a primary back after a long outage may release a million
    // messages, and all their edits (and the envelopes they return) at once
    // would take hundreds of MiB. Delivery starts on the first slice while
    // the next is written.
    for slice in ids.chunks(RELEASE_SLICE) {
        make_slice_due(ctx, slice.to_vec(), &matches).await;
        if ctx.shutdown.is_set() {
            return;
        }
    }
}

/// Messages made due per spool round trip by [`make_due`].
const RELEASE_SLICE: usize = 2_000;

async fn make_slice_due(
    ctx: &Ctx,
    mut ids: Vec<QueueId>,
    matches: &Arc<impl Fn(&Recipient) -> bool + Send + Sync + 'static>,
) {
    // A release must not be lost to a failed write (a full disk): the IDs
    // are no longer listed as waiting, so keep trying until it is written.
    let mut pause = Duration::from_millis(500);
    loop {
        let now = ctx.clock.now_ms();
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
