//! The spool's only writer: one thread that turns queued jobs into as few
//! fsync'd transactions as possible. Whatever jobs arrive while a commit is being
//! fsync'd go into the next transaction together (group commit), and every job
//! in a batch learns its own outcome once that transaction is durable.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use redb::{ReadableTable, Table};
use tokio::sync::oneshot;

use super::{
    BODIES, CommitError, DEAD, DUE, Envelope, HELD, LEARNED, MESSAGES, NewMessage, PAUSED, Pause,
    QUARANTINE, QueueId, RcptStatus,
};
use crate::address::domain_of;

/// Most jobs one transaction takes; bounds the memory a batch holds.
const MAX_BATCH: usize = 512;
/// Most new body bytes one transaction takes, for the same reason.
const MAX_BATCH_BYTES: u64 = 64 * 1024 * 1024;

pub(super) type Done<T> = oneshot::Sender<Result<T, CommitError>>;

/// A change to one queued message, applied atomically with the rest of its batch.
pub enum Change {
    /// Edit the envelope (outcomes, next attempt). A message with no queued
    /// recipient left has nothing more to do: it leaves the spool, or goes to the
    /// dead letters if the edit says so.
    Edit(Box<dyn FnOnce(&mut Envelope) -> Finished + Send>),
    /// Take the message out of the due index until released.
    Hold,
    /// Back into the due index; queued recipients become due at `now_ms`.
    Release { now_ms: u64 },
    /// Move to dead letters: mail that can be neither delivered nor bounced.
    Bury,
    /// Back from dead letters: every undelivered recipient is queued again, due now.
    Unbury { now_ms: u64 },
    /// Remove the message (queued, held or dead) and its body.
    Delete,
    /// Move a queued message that cannot be delivered as stored (its body is
    /// missing) to quarantine, for an operator to inspect.
    Quarantine,
}

/// What becomes of a message once no recipient is left queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finished {
    /// Done with it: remove it and its body.
    Remove,
    /// Some recipient failed and nobody can be told: keep it as a dead letter.
    Bury,
}

pub(super) enum Job {
    Commit {
        message: Box<NewMessage>,
        done: Done<()>,
    },
    Change {
        id: QueueId,
        change: Change,
        /// New messages (e.g. a DSN about this one) stored in the same transaction,
        /// so an outcome and its notice are recorded together or not at all.
        insert: Vec<NewMessage>,
        done: Done<Option<Envelope>>,
    },
    /// Recipient verdicts from the primary (lower-cased on write).
    Learn {
        verdicts: Vec<(String, bool)>,
        at_ms: u64,
    },
    /// Drop verdicts learned before these times (Unix ms).
    Forget {
        exists_before: u64,
        missing_before: u64,
    },
    /// Record (`Some`) or clear (`None`) the pause of a relay domain.
    Pause {
        domain: String,
        pause: Option<Pause>,
        done: Done<()>,
    },
}

pub use crate::metrics::Labeler;

/// Running totals the rest of the process reads without touching the file.
#[derive(Default)]
pub(super) struct Totals {
    /// Messages in the queue (held ones included, dead letters not).
    pub messages: AtomicU64,
    /// Body bytes of queued messages.
    pub queued_bytes: AtomicU64,
    /// Body bytes on disk, queued and dead alike (what `spool.max_size` limits).
    pub bytes: AtomicU64,
    pub dead: AtomicU64,
    pub held: AtomicU64,
    pub quarantined: AtomicU64,
    /// Per label: queued messages with a recipient waiting there, and their
    /// arrival times (a multiset, so the oldest is the first key).
    pub labels: Mutex<HashMap<String, LabelTotals>>,
}

#[derive(Clone, Debug, Default)]
pub(super) struct LabelTotals {
    pub messages: u64,
    pub arrivals: BTreeMap<u64, u64>,
}

impl Totals {
    pub fn count(&self, label: &str, arrived_ms: u64, by: i64) {
        let mut labels = self.labels.lock().unwrap_or_else(|p| p.into_inner());
        let entry = labels.entry(label.to_owned()).or_default();
        if by > 0 {
            entry.messages += 1;
            *entry.arrivals.entry(arrived_ms).or_default() += 1;
        } else {
            entry.messages = entry.messages.saturating_sub(1);
            if let Some(n) = entry.arrivals.get_mut(&arrived_ms) {
                *n -= 1;
                if *n == 0 {
                    entry.arrivals.remove(&arrived_ms);
                }
            }
        }
    }
}

/// The labels of `env`'s queued recipients, each once.
pub(super) fn labels_of(env: &Envelope, labeler: &Labeler) -> BTreeSet<String> {
    env.recipients
        .iter()
        .filter(|r| r.status == RcptStatus::Queued)
        .map(|r| labeler(&domain_of(&r.address)))
        .collect()
}

/// Changes to [`Totals`] made by one batch, applied only once it is durable.
#[derive(Default)]
struct Delta {
    messages: i64,
    queued_bytes: i64,
    bytes: i64,
    dead: i64,
    held: i64,
    quarantined: i64,
    /// (label, arrival, +1 or -1)
    labels: Vec<(String, u64, i64)>,
}

impl Delta {
    /// Accounts for a message entering (`+1`) or leaving (`-1`) the queue as
    /// `env` describes it.
    fn queue(&mut self, env: &Envelope, labeler: &Labeler, by: i64) {
        self.messages += by;
        self.queued_bytes += by * env.size as i64;
        for label in labels_of(env, labeler) {
            self.labels.push((label, env.arrived_ms, by));
        }
    }
}

fn apply(total: &AtomicU64, delta: i64) {
    if delta >= 0 {
        total.fetch_add(delta as u64, Ordering::Relaxed);
    } else {
        total.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
    }
}

enum Outcome {
    Commit(Done<()>, Result<(), CommitError>),
    Change(
        Done<Option<Envelope>>,
        Result<Option<Envelope>, CommitError>,
    ),
}

impl Outcome {
    /// Reports the outcome; a success in a transaction that failed becomes `error`.
    fn send(self, error: Option<&CommitError>) {
        match (self, error) {
            (Outcome::Commit(done, Ok(())), Some(e)) => drop(done.send(Err(e.clone()))),
            (Outcome::Change(done, Ok(_)), Some(e)) => drop(done.send(Err(e.clone()))),
            (Outcome::Commit(done, r), _) => drop(done.send(r)),
            (Outcome::Change(done, r), _) => drop(done.send(r)),
        }
    }
}

/// Told the duration of every committed transaction (for a histogram).
pub type CommitObserver = Arc<dyn Fn(std::time::Duration) + Send + Sync>;

pub(super) struct Writer {
    pub db: Arc<super::Store>,
    pub max_size: u64,
    pub totals: Arc<Totals>,
    pub labeler: Labeler,
    pub on_commit: Option<CommitObserver>,
}

struct Tables<'t, 'l> {
    labeler: &'l Labeler,
    messages: Table<'t, u64, &'static [u8]>,
    bodies: Table<'t, u64, &'static [u8]>,
    due: Table<'t, (u64, u64), ()>,
    held: Table<'t, u64, ()>,
    dead: Table<'t, u64, &'static [u8]>,
    quarantine: Table<'t, u64, &'static [u8]>,
    learned: Table<'t, &'static str, (bool, u64)>,
    paused: Table<'t, &'static str, (u8, u64)>,
}

impl Writer {
    pub fn run(self, jobs: mpsc::Receiver<Job>) {
        while let Ok(first) = jobs.recv() {
            let mut batch = vec![first];
            let mut bytes = 0u64;
            while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                match jobs.try_recv() {
                    Ok(job) => {
                        if let Job::Commit { message, .. } = &job {
                            bytes += message.body.len() as u64;
                        }
                        batch.push(job);
                    }
                    Err(_) => break,
                }
            }
            self.run_batch(batch);
        }
    }

    fn run_batch(&self, batch: Vec<Job>) {
        let started = tokio::time::Instant::now();
        let jobs = batch.len();
        let mut outcomes = Vec::with_capacity(jobs);
        let mut delta = Delta::default();
        let result = self.write(batch, &mut outcomes, &mut delta);
        match &result {
            Ok(()) => {
                apply(&self.totals.messages, delta.messages);
                apply(&self.totals.queued_bytes, delta.queued_bytes);
                apply(&self.totals.bytes, delta.bytes);
                for (label, arrived, by) in &delta.labels {
                    self.totals.count(label, *arrived, *by);
                }
                apply(&self.totals.dead, delta.dead);
                apply(&self.totals.held, delta.held);
                apply(&self.totals.quarantined, delta.quarantined);
                let elapsed = started.elapsed();
                if let Some(observe) = &self.on_commit {
                    observe(elapsed);
                }
                tracing::trace!(jobs, ?elapsed, "spool commit");
            }
            Err(e) => {
                tracing::error!(error = %e, jobs, "spool commit failed");
                // redb refuses everything after a failed write until reopened;
                // reopening now lets the next batch succeed once space is back.
                self.db.reopen();
            }
        }
        let error = result.err();
        for outcome in outcomes {
            outcome.send(error.as_ref());
        }
    }

    /// Applies every job in one transaction and commits it (fsync). Any storage
    /// error aborts the whole transaction: then nothing of the batch happened.
    fn write(
        &self,
        batch: Vec<Job>,
        outcomes: &mut Vec<Outcome>,
        delta: &mut Delta,
    ) -> Result<(), CommitError> {
        let io = |e: redb::Error| CommitError::Io(e.to_string());
        // Durability::Immediate is redb's default: commit() returns after the fsync.
        if !self.db.is_open() {
            self.db.reopen();
        }
        let txn = self.db.begin_write().map_err(io)?;
        {
            let mut t = Tables {
                labeler: &self.labeler,
                messages: txn.open_table(MESSAGES).map_err(|e| io(e.into()))?,
                bodies: txn.open_table(BODIES).map_err(|e| io(e.into()))?,
                due: txn.open_table(DUE).map_err(|e| io(e.into()))?,
                held: txn.open_table(HELD).map_err(|e| io(e.into()))?,
                dead: txn.open_table(DEAD).map_err(|e| io(e.into()))?,
                quarantine: txn.open_table(QUARANTINE).map_err(|e| io(e.into()))?,
                learned: txn.open_table(LEARNED).map_err(|e| io(e.into()))?,
                paused: txn.open_table(PAUSED).map_err(|e| io(e.into()))?,
            };
            let mut room = self
                .max_size
                .saturating_sub(self.totals.bytes.load(Ordering::Relaxed));
            let mut failure: Option<CommitError> = None;
            for job in batch {
                match job {
                    Job::Commit { message, done } => {
                        let size = message.envelope.size;
                        let r = if failure.is_some() {
                            Ok(())
                        } else if size > room {
                            Err(CommitError::Full)
                        } else {
                            room -= size;
                            t.insert(&message, delta).map_err(io)
                        };
                        if let Err(CommitError::Io(e)) = &r {
                            failure = Some(CommitError::Io(e.clone()));
                        }
                        outcomes.push(Outcome::Commit(done, r));
                    }
                    Job::Change {
                        id,
                        change,
                        insert,
                        done,
                    } => {
                        let r = if failure.is_some() {
                            Ok(None)
                        } else {
                            // Notices about a message are small and must not be
                            // lost to the size limit: they bypass it.
                            let mut r = Ok(());
                            for message in &insert {
                                r = r.and_then(|()| t.insert(message, delta));
                            }
                            r.and_then(|()| t.change(id, change, delta)).map_err(io)
                        };
                        if let Err(e) = &r {
                            failure = Some(e.clone());
                        }
                        outcomes.push(Outcome::Change(done, r));
                    }
                    Job::Learn { verdicts, at_ms } => {
                        if failure.is_none() {
                            for (address, exists) in verdicts {
                                let key = address.to_lowercase();
                                if let Err(e) = t.learned.insert(key.as_str(), (exists, at_ms)) {
                                    failure = Some(io(e.into()));
                                    break;
                                }
                            }
                        }
                    }
                    Job::Forget {
                        exists_before,
                        missing_before,
                    } => {
                        if failure.is_none() {
                            let stale = |(exists, at): (bool, u64)| {
                                at < if exists {
                                    exists_before
                                } else {
                                    missing_before
                                }
                            };
                            if let Err(e) = t.learned.retain(|_, verdict| !stale(verdict)) {
                                failure = Some(io(e.into()));
                            }
                        }
                    }
                    Job::Pause {
                        domain,
                        pause,
                        done,
                    } => {
                        let r = if failure.is_some() {
                            Ok(())
                        } else {
                            match pause {
                                Some(p) => t.paused.insert(domain.as_str(), p.to_row()).map(drop),
                                None => t.paused.remove(domain.as_str()).map(drop),
                            }
                            .map_err(|e| io(e.into()))
                        };
                        if let Err(e) = &r {
                            failure = Some(e.clone());
                        }
                        outcomes.push(Outcome::Commit(done, r));
                    }
                }
            }
            if let Some(e) = failure {
                // Dropping the transaction aborts it: nothing of the batch happened.
                return Err(e);
            }
        }
        txn.commit().map_err(|e| io(e.into()))
    }
}

impl Tables<'_, '_> {
    fn insert(&mut self, message: &NewMessage, delta: &mut Delta) -> Result<(), redb::Error> {
        let env = &message.envelope;
        self.messages.insert(env.id.0, env.encode().as_slice())?;
        self.bodies.insert(env.id.0, message.body.as_slice())?;
        if let Some(at) = env.next_due_ms() {
            self.due.insert((at, env.id.0), ())?;
        }
        delta.queue(env, self.labeler, 1);
        delta.bytes += env.size as i64;
        Ok(())
    }

    /// Reads a record from `messages` or `dead`; an undecodable one is moved to
    /// quarantine and treated as absent.
    fn load(
        &mut self,
        id: QueueId,
        dead: bool,
        delta: &mut Delta,
    ) -> Result<Option<Envelope>, redb::Error> {
        let table = if dead { &self.dead } else { &self.messages };
        let Some(raw) = table.get(id.0)?.map(|v| v.value().to_vec()) else {
            return Ok(None);
        };
        match Envelope::decode(&raw) {
            Ok(env) => Ok(Some(env)),
            Err(e) => {
                tracing::error!(queue_id = %id, error = %e, "undecodable spool record quarantined");
                self.quarantine.insert(id.0, raw.as_slice())?;
                delta.quarantined += 1;
                if dead {
                    self.dead.remove(id.0)?;
                } else {
                    self.messages.remove(id.0)?;
                }
                Ok(None)
            }
        }
    }

    fn change(
        &mut self,
        id: QueueId,
        change: Change,
        delta: &mut Delta,
    ) -> Result<Option<Envelope>, redb::Error> {
        let dead = matches!(change, Change::Unbury { .. })
            || (matches!(change, Change::Delete) && self.messages.get(id.0)?.is_none());
        let Some(mut env) = self.load(id, dead, delta)? else {
            return Ok(None);
        };
        let held = self.held.get(id.0)?.is_some();
        let old_due = env.next_due_ms();
        if let Some(at) = old_due {
            self.due.remove((at, id.0))?;
        }
        // Queue totals: out as it was, back in as it ends (if it stays queued).
        if !dead {
            delta.queue(&env, self.labeler, -1);
        }
        match change {
            Change::Edit(edit) => {
                let finished = edit(&mut env);
                if finished == Finished::Bury && env.next_due_ms().is_none() {
                    self.bury(&env, held, delta)?;
                } else {
                    self.store(&env, held, delta)?;
                }
            }
            Change::Hold => {
                if !held {
                    self.held.insert(id.0, ())?;
                    delta.held += 1;
                }
                self.store(&env, true, delta)?;
            }
            Change::Release { now_ms } => {
                if held {
                    self.held.remove(id.0)?;
                    delta.held -= 1;
                }
                for r in &mut env.recipients {
                    if r.status == RcptStatus::Queued {
                        r.next_attempt_ms = now_ms;
                    }
                }
                self.store(&env, false, delta)?;
            }
            Change::Bury => self.bury(&env, held, delta)?,
            Change::Unbury { now_ms } => {
                self.dead.remove(id.0)?;
                delta.dead -= 1;
                for r in &mut env.recipients {
                    if r.status != RcptStatus::Delivered {
                        r.status = RcptStatus::Queued;
                        r.attempts = 0;
                        r.next_attempt_ms = now_ms;
                        r.unreachable = false;
                    }
                }
                self.store(&env, false, delta)?;
            }
            Change::Delete => {
                if dead {
                    self.dead.remove(id.0)?;
                    delta.dead -= 1;
                } else {
                    self.messages.remove(id.0)?;
                }
                if held {
                    self.held.remove(id.0)?;
                    delta.held -= 1;
                }
                self.bodies.remove(id.0)?;
                delta.bytes -= env.size as i64;
            }
            Change::Quarantine => {
                self.messages.remove(id.0)?;
                if held {
                    self.held.remove(id.0)?;
                    delta.held -= 1;
                }
                self.quarantine.insert(id.0, env.encode().as_slice())?;
                delta.quarantined += 1;
                self.bodies.remove(id.0)?;
                delta.bytes -= env.size as i64;
            }
        }
        Ok(Some(env))
    }

    fn bury(&mut self, env: &Envelope, held: bool, delta: &mut Delta) -> Result<(), redb::Error> {
        self.messages.remove(env.id.0)?;
        if held {
            self.held.remove(env.id.0)?;
            delta.held -= 1;
        }
        self.dead.insert(env.id.0, env.encode().as_slice())?;
        delta.dead += 1;
        Ok(())
    }

    /// Writes a queued message back (counting it in the queue again); one
    /// with nothing left to do is removed.
    fn store(&mut self, env: &Envelope, held: bool, delta: &mut Delta) -> Result<(), redb::Error> {
        let id = env.id.0;
        match env.next_due_ms() {
            None => {
                self.messages.remove(id)?;
                self.bodies.remove(id)?;
                if held {
                    self.held.remove(id)?;
                    delta.held -= 1;
                }
                delta.bytes -= env.size as i64;
            }
            Some(at) => {
                self.messages.insert(id, env.encode().as_slice())?;
                if !held {
                    self.due.insert((at, id), ())?;
                }
                delta.queue(env, self.labeler, 1);
            }
        }
        Ok(())
    }
}
