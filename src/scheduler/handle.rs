//! What the rest of the server asks of the scheduler: the [`Handle`] that
//! inbound, the admin API and ETRN call, and the operator's view of a
//! configured domain. Quick checks run here, on the caller's task; anything
//! that changes delivery goes to the scheduler task as a [`Command`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::{Notify, mpsc, oneshot};
use tracing::info;

use super::outcome::{self, RcptResult};
use super::worker::Ctx;
use super::{Command, guard};
use crate::address::domain_of;
use crate::route::Destinations;
use crate::spool::{CommitError, Envelope, PARKED, Pause, QueueId, RcptStatus};
use crate::status::Status;

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
    /// The primary's recent changes, oldest first (the outage history).
    pub history: Vec<crate::health::Change>,
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
    /// Built by [`Scheduler::new`](super::Scheduler::new), which keeps the
    /// other ends of the channel and the doorbell.
    pub(super) fn new(
        commands: mpsc::UnboundedSender<Command>,
        queued: Arc<Notify>,
        ctx: Arc<Ctx>,
        dests: Arc<Destinations>,
    ) -> Handle {
        Handle {
            commands,
            queued,
            ctx,
            dests,
        }
    }

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
            status: Status::transient(4, 1),
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
        let applied = outcome::apply(
            env,
            &results,
            self.ctx.clock.now_ms(),
            &self.ctx.rules,
            fastrand::f64(),
        );
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

    /// Waits until the scheduler has done what is due by its clock now (and
    /// what that set off: records, notices) and has nothing in hand. Tests
    /// use it instead of sleeping "to give it a moment".
    pub async fn settled(&self) {
        let (done, answer) = oneshot::channel();
        if self.commands.send(Command::Settle(done)).is_ok() {
            let _ = answer.await;
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
        let pause = self
            .ctx
            .guard
            .lock()
            .pause(domain, self.ctx.clock.now_ms())?;
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
                let (primary_up, primary_since_ms, history) = self
                    .ctx
                    .health
                    .primary(&d.name)
                    .map_or((true, 0, Vec::new()), |p| {
                        (p.up, p.since_ms, p.history.into_iter().collect())
                    });
                let (queued, oldest_arrived_ms) = queues.get(&d.name).copied().unwrap_or((0, None));
                DomainStatus {
                    name: d.name.clone(),
                    primary_up,
                    primary_since_ms,
                    history,
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
