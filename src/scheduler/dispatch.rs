//! From the due index to workers: [`Scheduler::scan`] loads what is due,
//! one job per message and destination, and hands each to its destination's
//! queue, to the pause (parked) or to the down primary (suspended);
//! [`Scheduler::dispatch`] starts workers within the destination's
//! connection allowance. Nothing here delivers or records an outcome.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tracing::warn;

use super::worker;
use super::{DUE_SCAN_DURING_BACKLOG, Job, Scheduler};
use crate::address::domain_of;
use crate::spool::{Envelope, PARKED, QueueId, RcptStatus, ReadError};

/// One more connection is opened for each this many messages waiting.
const MESSAGES_PER_NEW_CONNECTION: usize = 8;
/// Most jobs held in memory at once; the rest wait on disk.
const MAX_LOADED: usize = 2_000;

impl Scheduler {
    /// Loads due mail into destination queues and starts workers.
    pub(super) async fn scan(&mut self) {
        let draining = self.domains.values().any(|s| !s.backlog.is_empty());
        let since = self.due_scanned.map(|at| at.elapsed());
        if draining && since.is_some_and(|since| since < DUE_SCAN_DURING_BACKLOG) {
            self.take_backlog().await;
            let left = DUE_SCAN_DURING_BACKLOG - since.unwrap_or_default();
            self.rescan_soon(left);
            return;
        }
        self.due_scanned = Some(Instant::now());
        let now = self.ctx.clock.now_ms();
        let Some((envelopes, next)) = self.load_due(now).await else {
            self.rescan_soon(Duration::from_secs(1));
            return;
        };
        self.assign(envelopes, now);
        self.take_backlog().await;
        // Parked mail is never due: nothing to wake up for.
        if let Some(next) = next.filter(|&at| at != PARKED) {
            let wait = self.ctx.clock.until(next);
            self.rescan_soon(wait);
        }
    }

    /// The messages due at `now` that are not in hand already, as many as
    /// there is room for, and when the next mail comes due; `None` (logged)
    /// if the spool could not tell.
    ///
    /// Mail in a primary's [`backlog`](super::domain::DomainState::backlog)
    /// is left to it even when due: taken from the due index it would go in
    /// the order of its retry times (jittered, so scattered across the spool)
    /// rather than in arrival order, and with a million queued every such
    /// read and delete lands on a page nobody has touched recently.
    async fn load_due(&self, now: u64) -> Option<(Vec<Envelope>, Option<u64>)> {
        let room = MAX_LOADED.saturating_sub(self.in_flight.len());
        let backlogged: usize = self.domains.values().map(|s| s.backlog.len()).sum();
        // Enough of the index to find `room` messages past those in hand and
        // some of those left to a backlog (these come first in the index
        // while the oldest mail drains, and leave it as the drain goes on).
        let limit = if room == 0 {
            0
        } else {
            room + self.in_flight.len() + backlogged.min(MAX_LOADED)
        };
        let spool = self.ctx.spool.clone();
        let index = tokio::task::spawn_blocking(move || {
            Ok::<_, ReadError>((spool.due_until(now, limit)?, spool.next_due_after(now)?))
        })
        .await;
        let (due, next) = match index {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot read the due index; retrying shortly");
                return None;
            }
            Err(e) => {
                warn!(error = %e, "due index scan failed");
                return None;
            }
        };
        // Messages already in hand are not decoded again: while a backlog
        // drains, nearly every due entry is one. (A message with another
        // destination due waits for its job in hand to finish.)
        let in_flight: HashSet<QueueId> = self.in_flight.iter().map(|(id, _)| *id).collect();
        let backlogs: Vec<_> = self
            .domains
            .values()
            .map(|s| &s.backlog)
            .filter(|b| !b.is_empty())
            .collect();
        let mut seen = HashSet::new();
        let ids: Vec<QueueId> = due
            .iter()
            .map(|(_, id)| *id)
            .filter(|id| {
                !in_flight.contains(id)
                    && !backlogs.iter().any(|b| b.contains(id))
                    && seen.insert(*id)
            })
            .take(room)
            .collect();
        if ids.is_empty() {
            return Some((Vec::new(), next));
        }
        let spool = self.ctx.spool.clone();
        match tokio::task::spawn_blocking(move || spool.envelopes_of(&ids)).await {
            Ok(Ok(envelopes)) => Some((envelopes, next)),
            Ok(Err(e)) => {
                warn!(error = %e, "cannot read due mail; retrying shortly");
                None
            }
            Err(e) => {
                warn!(error = %e, "due mail could not be read");
                None
            }
        }
    }

    /// Hands mail that waited for a primary now back (its
    /// [`backlog`](super::domain::DomainState::backlog)) to delivery, as far
    /// as [`MAX_LOADED`] allows: the recipients that waited for it, whatever
    /// their next attempt time says. The rest is taken as jobs finish.
    async fn take_backlog(&mut self) {
        let mut room = MAX_LOADED.saturating_sub(self.in_flight.len());
        let mut picked: Vec<(Arc<str>, QueueId)> = Vec::new();
        for (domain, state) in &mut self.domains {
            if state.down.is_some() || room == 0 {
                continue;
            }
            // In arrival order; one with a job out already (due for another
            // reason) stays until that job is done.
            let ids: Vec<QueueId> = state
                .backlog
                .iter()
                .filter(|id| !self.in_flight.contains(&(**id, domain.clone())))
                .take(room)
                .copied()
                .collect();
            room -= ids.len();
            for id in ids {
                state.backlog.remove(&id);
                picked.push((domain.clone(), id));
            }
        }
        if picked.is_empty() {
            return;
        }
        let ids: Vec<QueueId> = picked.iter().map(|(_, id)| *id).collect();
        let spool = self.ctx.spool.clone();
        let loaded = tokio::task::spawn_blocking(move || spool.envelopes_of(&ids)).await;
        let error = match loaded {
            Ok(Ok(envelopes)) => return self.hand_over(picked, envelopes),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        warn!(%error, "cannot read mail that waited for its primary; retrying shortly");
        for (domain, id) in picked {
            if let Some(state) = self.domains.get_mut(&domain) {
                state.backlog.insert(id);
            }
        }
        self.rescan_soon(Duration::from_secs(1));
    }

    /// [`Scheduler::take_backlog`]'s jobs, once their envelopes are read.
    fn hand_over(&mut self, picked: Vec<(Arc<str>, QueueId)>, envelopes: Vec<Envelope>) {
        let by_id: std::collections::HashMap<QueueId, Envelope> =
            envelopes.into_iter().map(|env| (env.id, env)).collect();
        let mut touched: HashSet<Arc<str>> = HashSet::new();
        let mut parked: Vec<Job> = Vec::new();
        let mut rescan = false;
        for (domain, id) in picked {
            // Gone meanwhile (delivered with another job, deleted): nothing to do.
            let Some(env) = by_id.get(&id) else {
                continue;
            };
            let rcpts: Vec<usize> = env
                .recipients
                .iter()
                .enumerate()
                .filter(|(_, r)| {
                    r.status == RcptStatus::Queued
                        && r.unreachable
                        && domain_of(&r.address) == *domain
                })
                .map(|(i, _)| i)
                .collect();
            if rcpts.is_empty() {
                // Not recorded as waiting (that write failed, say): whatever
                // of it is due is the due scan's, which left it to the
                // backlog until now. Look again rather than at its next
                // retry time.
                rescan = true;
                continue;
            }
            let state = self.domains.get_mut(&domain).expect("picked from it");
            if !self.in_flight.insert((id, domain.clone())) {
                // A job for it is out already (due for another reason): its
                // waiting recipients go once that one is done.
                state.backlog.insert(id);
                continue;
            }
            let job = Job {
                id,
                domain: domain.clone(),
                rcpts,
            };
            if self.ctx.is_paused(&domain) {
                parked.push(job);
                continue;
            }
            state.queue.push(job);
            touched.insert(domain);
        }
        for domain in touched {
            self.dispatch(&domain);
        }
        self.park(parked);
        if rescan {
            self.rescan_soon(Duration::ZERO);
        }
    }

    /// Makes a job of each destination's due recipients (up to
    /// [`MAX_LOADED`] in hand) and sends it its way: queued for workers,
    /// parked while its domain is paused, suspended while its primary is down.
    fn assign(&mut self, envelopes: Vec<Envelope>, now: u64) {
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
    }

    /// Starts workers for `domain` while it has queued jobs and free slots;
    /// parks them instead while it is paused.
    pub(super) fn dispatch(&mut self, domain: &Arc<str>) {
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
    fn groups_due_recipients_by_domain() {
        let rcpt = |address: &str, next: u64, status| Recipient {
            address: address.into(),
            orcpt: None,
            orcpt_xtext: None,
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
