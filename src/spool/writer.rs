//! The spool's only writer: one thread that turns queued jobs into as few
//! fsync'd transactions as possible. Whatever jobs arrive while a commit is being
//! fsync'd go into the next transaction together (group commit), and every job
//! in a batch learns its own outcome once that transaction is durable.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use redb::{ReadableTable, Table, WriteTransaction};
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
    /// Edit the envelope (pending, next attempt). A message with no queued
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

    /// Takes in the changes of a batch that is now durable.
    fn add(&self, delta: &Delta) {
        apply(&self.messages, delta.messages);
        apply(&self.queued_bytes, delta.queued_bytes);
        apply(&self.bytes, delta.bytes);
        for (label, arrived, by) in &delta.labels {
            self.count(label, *arrived, *by);
        }
        apply(&self.dead, delta.dead);
        apply(&self.held, delta.held);
        apply(&self.quarantined, delta.quarantined);
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

/// A request's answer, held until its batch's transaction has committed (or
/// failed, which fails every request in it).
enum Pending {
    Commit(Done<()>, Result<(), CommitError>),
    Change(
        Done<Option<Envelope>>,
        Result<Option<Envelope>, CommitError>,
    ),
}

impl Pending {
    /// Reports the answer; a success in a transaction that failed becomes `error`.
    fn send(self, error: Option<&CommitError>) {
        match (self, error) {
            (Pending::Commit(done, Ok(())), Some(e)) => drop(done.send(Err(e.clone()))),
            (Pending::Change(done, Ok(_)), Some(e)) => drop(done.send(Err(e.clone()))),
            (Pending::Commit(done, r), _) => drop(done.send(r)),
            (Pending::Change(done, r), _) => drop(done.send(r)),
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
        let mut pending = Vec::with_capacity(jobs);
        let mut delta = Delta::default();
        let result = self.write(batch, &mut pending, &mut delta);
        match &result {
            Ok(()) => {
                self.totals.add(&delta);
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
        for outcome in pending {
            outcome.send(error.as_ref());
        }
    }

    /// Applies every job in one transaction and commits it (fsync). Any storage
    /// error aborts the whole transaction: then nothing of the batch happened.
    fn write(
        &self,
        batch: Vec<Job>,
        pending: &mut Vec<Pending>,
        delta: &mut Delta,
    ) -> Result<(), CommitError> {
        // Durability::Immediate is redb's default: commit() returns after the fsync.
        if !self.db.is_open() {
            self.db.reopen();
        }
        let txn = self.db.begin_write().map_err(io)?;
        {
            let mut t = Tables::open(&txn, &self.labeler).map_err(io)?;
            let room = self
                .max_size
                .saturating_sub(self.totals.bytes.load(Ordering::Relaxed));
            if let Some(e) = t.apply_jobs(batch, room, pending, delta) {
                // Dropping the transaction aborts it: nothing of the batch happened.
                return Err(e);
            }
        }
        txn.commit().map_err(|e| io(e.into()))
    }
}

fn io(e: redb::Error) -> CommitError {
    CommitError::Io(e.to_string())
}

impl<'t, 'l> Tables<'t, 'l> {
    fn open(txn: &'t WriteTransaction, labeler: &'l Labeler) -> Result<Self, redb::Error> {
        Ok(Tables {
            labeler,
            messages: txn.open_table(MESSAGES)?,
            bodies: txn.open_table(BODIES)?,
            due: txn.open_table(DUE)?,
            held: txn.open_table(HELD)?,
            dead: txn.open_table(DEAD)?,
            quarantine: txn.open_table(QUARANTINE)?,
            learned: txn.open_table(LEARNED)?,
            paused: txn.open_table(PAUSED)?,
        })
    }
}

impl Tables<'_, '_> {
    /// Applies the batch's jobs in order, each outcome into `pending`, with
    /// `room` body bytes left under `spool.max_size`. Returns the storage error
    /// that dooms the transaction, if any: the jobs after it are not applied
    /// (their pending become that error when it is reported).
    fn apply_jobs(
        &mut self,
        batch: Vec<Job>,
        mut room: u64,
        pending: &mut Vec<Pending>,
        delta: &mut Delta,
    ) -> Option<CommitError> {
        let mut failure: Option<CommitError> = None;
        for job in batch {
            match job {
                Job::Commit { message, done } => {
                    let r = if failure.is_some() {
                        Ok(())
                    } else {
                        self.commit(&message, &mut room, delta)
                    };
                    // A full spool refuses this message alone.
                    if let Err(CommitError::Io(e)) = &r {
                        failure = Some(CommitError::Io(e.clone()));
                    }
                    pending.push(Pending::Commit(done, r));
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
                        self.change_with(id, change, &insert, delta).map_err(io)
                    };
                    if let Err(e) = &r {
                        failure = Some(e.clone());
                    }
                    pending.push(Pending::Change(done, r));
                }
                Job::Learn { verdicts, at_ms } => {
                    if failure.is_none() {
                        failure = self.learn(verdicts, at_ms).err().map(io);
                    }
                }
                Job::Forget {
                    exists_before,
                    missing_before,
                } => {
                    if failure.is_none() {
                        failure = self.forget(exists_before, missing_before).err().map(io);
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
                        self.pause(&domain, pause).map_err(io)
                    };
                    if let Err(e) = &r {
                        failure = Some(e.clone());
                    }
                    pending.push(Pending::Commit(done, r));
                }
            }
        }
        failure
    }

    /// Stores a new message if its body fits in `room` (what is left under
    /// `spool.max_size`), and takes its size from `room`.
    fn commit(
        &mut self,
        message: &NewMessage,
        room: &mut u64,
        delta: &mut Delta,
    ) -> Result<(), CommitError> {
        let size = message.envelope.size;
        if size > *room {
            return Err(CommitError::Full);
        }
        *room -= size;
        self.insert(message, delta).map_err(io)
    }

    /// Stores `insert` and applies `change` to message `id`, together.
    fn change_with(
        &mut self,
        id: QueueId,
        change: Change,
        insert: &[NewMessage],
        delta: &mut Delta,
    ) -> Result<Option<Envelope>, redb::Error> {
        // Notices about a message are small and must not be lost to the size
        // limit: they bypass it.
        for message in insert {
            self.insert(message, delta)?;
        }
        self.change(id, change, delta)
    }

    fn learn(&mut self, verdicts: Vec<(String, bool)>, at_ms: u64) -> Result<(), redb::Error> {
        for (address, exists) in verdicts {
            let key = address.to_lowercase();
            self.learned.insert(key.as_str(), (exists, at_ms))?;
        }
        Ok(())
    }

    fn forget(&mut self, exists_before: u64, missing_before: u64) -> Result<(), redb::Error> {
        let stale = |(exists, at): (bool, u64)| {
            at < if exists {
                exists_before
            } else {
                missing_before
            }
        };
        self.learned.retain(|_, verdict| !stale(verdict))?;
        Ok(())
    }

    fn pause(&mut self, domain: &str, pause: Option<Pause>) -> Result<(), redb::Error> {
        match pause {
            Some(p) => self.paused.insert(domain, p.to_row()).map(drop),
            None => self.paused.remove(domain).map(drop),
        }?;
        Ok(())
    }

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
            Change::Release { now_ms } => self.release(&mut env, held, now_ms, delta)?,
            Change::Bury => self.bury(&env, held, delta)?,
            Change::Unbury { now_ms } => self.unbury(&mut env, now_ms, delta)?,
            Change::Delete => self.delete(&env, dead, held, delta)?,
            Change::Quarantine => self.set_aside(&env, held, delta)?,
        }
        Ok(Some(env))
    }

    /// Back into the due index: queued recipients become due at `now_ms`.
    fn release(
        &mut self,
        env: &mut Envelope,
        held: bool,
        now_ms: u64,
        delta: &mut Delta,
    ) -> Result<(), redb::Error> {
        if held {
            self.held.remove(env.id.0)?;
            delta.held -= 1;
        }
        for r in &mut env.recipients {
            if r.status == RcptStatus::Queued {
                r.next_attempt_ms = now_ms;
            }
        }
        self.store(env, false, delta)
    }

    /// Back from dead letters: every undelivered recipient is queued again, due
    /// at `now_ms`.
    fn unbury(
        &mut self,
        env: &mut Envelope,
        now_ms: u64,
        delta: &mut Delta,
    ) -> Result<(), redb::Error> {
        self.dead.remove(env.id.0)?;
        delta.dead -= 1;
        for r in &mut env.recipients {
            if r.status != RcptStatus::Delivered {
                r.status = RcptStatus::Queued;
                r.attempts = 0;
                r.next_attempt_ms = now_ms;
                r.unreachable = false;
            }
        }
        self.store(env, false, delta)
    }

    /// Removes the message from wherever it is (`dead`: the dead letters) and
    /// its body.
    fn delete(
        &mut self,
        env: &Envelope,
        dead: bool,
        held: bool,
        delta: &mut Delta,
    ) -> Result<(), redb::Error> {
        let id = env.id.0;
        if dead {
            self.dead.remove(id)?;
            delta.dead -= 1;
        } else {
            self.messages.remove(id)?;
        }
        if held {
            self.held.remove(id)?;
            delta.held -= 1;
        }
        self.bodies.remove(id)?;
        delta.bytes -= env.size as i64;
        Ok(())
    }

    /// Moves a queued message to quarantine; its body goes.
    fn set_aside(
        &mut self,
        env: &Envelope,
        held: bool,
        delta: &mut Delta,
    ) -> Result<(), redb::Error> {
        let id = env.id.0;
        self.messages.remove(id)?;
        if held {
            self.held.remove(id)?;
            delta.held -= 1;
        }
        self.quarantine.insert(id, env.encode().as_slice())?;
        delta.quarantined += 1;
        self.bodies.remove(id)?;
        delta.bytes -= env.size as i64;
        Ok(())
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
