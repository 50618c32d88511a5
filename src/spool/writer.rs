//! The spool's only writer: one thread that turns queued jobs into as few
//! fsync'd transactions as possible. Whatever jobs arrive while a commit is being
//! fsync'd go into the next transaction together (group commit), and every job
//! in a batch learns its own outcome once that transaction is durable.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use tokio::sync::oneshot;

use super::tables::Tables;
use super::{CommitError, Envelope, NewMessage, Pause, QueueId, RcptStatus};
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
    /// Greylisting's triplets and passed client networks.
    Grey(super::GreyWrite),
    /// A fetched message (none: a duplicate) and its mark, together.
    Fetched {
        message: Option<Box<NewMessage>>,
        mark: super::FetchMark,
        done: Done<()>,
    },
    /// Drop seen rows under `prefix` not in `listed`, and duplicate keys
    /// stored before `ids_before`.
    FetchForget {
        prefix: String,
        listed: std::collections::HashSet<String>,
        ids_before: u64,
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
    /// File space of queued and dead bodies (`footprint`; what `spool.max_size` limits).
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
    /// Queued messages by arrival second (unix ms, rounded down to the
    /// second): a multiset whose first key is the oldest. Per second, not per
    /// millisecond, so a million-message backlog that arrived over an hour
    /// costs 3,600 entries, not a million.
    pub arrivals: BTreeMap<u64, u64>,
}

/// The [`LabelTotals::arrivals`] key of an arrival time.
fn arrival_second(arrived_ms: u64) -> u64 {
    arrived_ms - arrived_ms % 1000
}

impl LabelTotals {
    pub fn add(&mut self, arrived_ms: u64) {
        self.messages += 1;
        *self.arrivals.entry(arrival_second(arrived_ms)).or_default() += 1;
    }

    pub fn remove(&mut self, arrived_ms: u64) {
        self.messages = self.messages.saturating_sub(1);
        let key = arrival_second(arrived_ms);
        if let Some(n) = self.arrivals.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.arrivals.remove(&key);
            }
        }
    }
}

impl Totals {
    pub fn count(&self, label: &str, arrived_ms: u64, by: i64) {
        let mut labels = self.labels.lock().unwrap_or_else(|p| p.into_inner());
        let entry = labels.entry(label.to_owned()).or_default();
        if by > 0 {
            entry.add(arrived_ms);
        } else {
            entry.remove(arrived_ms);
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
pub(super) struct Delta {
    pub(super) messages: i64,
    pub(super) queued_bytes: i64,
    pub(super) bytes: i64,
    pub(super) dead: i64,
    pub(super) held: i64,
    pub(super) quarantined: i64,
    /// (label, arrival, +1 or -1)
    pub(super) labels: Vec<(String, u64, i64)>,
}

impl Delta {
    /// Accounts for a message entering (`+1`) or leaving (`-1`) the queue as
    /// `env` describes it.
    pub(super) fn queue(&mut self, env: &Envelope, labeler: &Labeler, by: i64) {
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
pub(super) enum Pending {
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

/// How long the writer must have had nothing to do before it compacts.
const COMPACT_AFTER_IDLE: Duration = Duration::from_secs(5);
/// A file smaller than this is left alone: redb grows in steps, and the
/// space is reused by the next mail anyway.
const COMPACT_MIN_FILE: u64 = 64 * 1024 * 1024;
/// Compaction moves the live pages, and readers and commits wait meanwhile:
/// only a small queue is compacted, so the pause stays a moment.
const COMPACT_MAX_LIVE: u64 = 32 * 1024 * 1024;

impl Writer {
    pub fn run(self, jobs: mpsc::Receiver<Job>) {
        // The file length after the last compaction (or attempt): not tried
        // again until the file has grown past it.
        let mut compacted_at = 0u64;
        loop {
            let first = match jobs.recv_timeout(COMPACT_AFTER_IDLE) {
                Ok(job) => job,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.compact_if_worth_it(&mut compacted_at);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
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

    /// Gives the space of delivered mail back to the disk once the queue is
    /// small and the spool idle: redb reuses free pages inside the file but
    /// never shrinks it by itself, so after a large outage's backlog has
    /// drained the file would keep its peak size.
    fn compact_if_worth_it(&self, compacted_at: &mut u64) {
        let Some(len) = self.db.file_len() else {
            return;
        };
        let live = self.totals.bytes.load(Ordering::Relaxed);
        if len < COMPACT_MIN_FILE || live > COMPACT_MAX_LIVE || len <= *compacted_at {
            return;
        }
        let started = tokio::time::Instant::now();
        match self.db.compact() {
            Ok(_) => {
                let after = self.db.file_len().unwrap_or(len);
                *compacted_at = after.max(COMPACT_MIN_FILE);
                tracing::info!(
                    before_mib = len >> 20,
                    after_mib = after >> 20,
                    elapsed = ?started.elapsed(),
                    "spool compacted"
                );
            }
            // A reader is in the middle of a transaction: the next idle
            // moment tries again.
            Err(CompactError::Busy) => {}
            Err(CompactError::Failed(error)) => {
                *compacted_at = len;
                tracing::warn!(%error, "spool compaction failed");
            }
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

/// Why [`super::Store::compact`] did not compact.
pub(super) enum CompactError {
    /// A transaction is in progress; try again later.
    Busy,
    Failed(String),
}

pub(super) fn io(e: redb::Error) -> CommitError {
    CommitError::Io(e.to_string())
}
