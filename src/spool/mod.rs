//! (2) The spool: the one durable handoff between receiving and delivering.
//!
//! A typed API over one redb file. Inbound sessions hand a finished message to
//! [`Spool::commit`], which returns only after the write transaction holding it has
//! been fsync'd; concurrent commits are batched by a single writer thread so many
//! sessions share one fsync (group commit). Readers use redb's MVCC snapshots and
//! never wait for the writer.
//!
//! Tables: `messages` (envelope records by ID), `bodies` (written once, by ID),
//! `due` (`(next attempt ms, ID)`, so a range scan yields due mail in order),
//! `held` and `dead` (places a message moves to, not flags), `quarantine`
//! (envelopes that did not decode or lost their body, kept for inspection),
//! `learned`, `paused` (relay domains whose delivery is paused, so a pause
//! outlives a restart), `meta`. The file is untrusted input: the open sets
//! right what disagrees inside it and logs the queue IDs concerned.
//!
//! The spool never speaks SMTP and never decides policy.

mod id;
mod record;
#[cfg(test)]
pub(crate) use record::testing;
mod writer;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};
use tokio::sync::oneshot;

pub use id::{IdGen, ParseIdError, QueueId};
pub use record::{
    BodyType, Client, DecodeError, Envelope, Notify, PARKED, Pause, PausedBy, RcptStatus,
    Recipient, Ret,
};
pub use writer::{Change, CommitObserver, Finished, Labeler};
use writer::{Job, LabelTotals, Totals, Writer, labels_of};

const MESSAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("messages");
const BODIES: TableDefinition<u64, &[u8]> = TableDefinition::new("bodies");
const DUE: TableDefinition<(u64, u64), ()> = TableDefinition::new("due");
const HELD: TableDefinition<u64, ()> = TableDefinition::new("held");
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead");
const QUARANTINE: TableDefinition<u64, &[u8]> = TableDefinition::new("quarantine");
/// What the primary said about recipients: lower-cased address -> (exists, unix ms).
/// How long the primary's "this mailbox exists" is trusted without another answer.
pub const TRUST_EXISTS: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long its "no such user" is trusted: a mailbox created since is refused
/// for a day at most.
pub const TRUST_MISSING: Duration = Duration::from_secs(24 * 3600);
const LEARNED: TableDefinition<&str, LearnedRow> = TableDefinition::new("learned");
/// A learned verdict: whether the mailbox exists, and when that was learned
/// (Unix ms).
pub type LearnedRow = (bool, u64);
/// Paused relay domains: name -> [`Pause`] as a row (see `Pause::to_row`).
const PAUSED: TableDefinition<&str, (u8, u64)> = TableDefinition::new("paused");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Layout version of the tables above, stored in `meta` and checked at open.
/// 2 added `paused` and envelope records of layout 2; a spool of layout 1 is
/// upgraded when opened (its records still decode), and an older mxspool
/// refuses a spool of layout 2 instead of quarantining records it cannot read.
const SCHEMA: u64 = 2;
/// redb's page cache. Its 1 GiB default would dwarf the rest of the process; the
/// hot data (recent envelopes, the due index) is small.
const CACHE_BYTES: usize = 8 * 1024 * 1024;

/// A message ready to be stored: everything the 250 promises.
#[derive(Debug)]
pub struct NewMessage {
    pub envelope: Envelope,
    /// The content as it will be forwarded: our `Received:` header, then the data.
    pub body: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: the spool is in use by another process (is another mxspool running?)")]
    Locked { path: PathBuf },
    #[error("{path}: cannot open the spool: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("{path}: the spool file is damaged or not a spool: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: spool layout version {found} is not supported (this mxspool reads {SCHEMA})")]
    Schema { path: PathBuf, found: u64 },
}

/// Why a commit did not happen. Either way nothing of the message was stored.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommitError {
    /// `spool.max_size` would be exceeded: a temporary condition for the client.
    #[error("spool is full")]
    Full,
    /// The write or its fsync failed.
    #[error("spool write failed: {0}")]
    Io(String),
    /// The spool is shutting down.
    #[error("spool is closed")]
    Closed,
}

/// A read failed: the file is unreadable, which callers report as a temporary error.
#[derive(Debug, thiserror::Error)]
#[error("spool read failed: {0}")]
pub struct ReadError(String);

fn read_err(e: impl std::fmt::Display) -> ReadError {
    ReadError(e.to_string())
}

/// Figures that cost nothing to read: kept up to date by the writer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages in the queue, held ones included.
    pub messages: u64,
    /// Body bytes of those messages.
    pub queued_bytes: u64,
    /// Body bytes on disk, queued and dead (what `spool.max_size` limits).
    pub bytes: u64,
    pub held: u64,
    pub dead: u64,
    /// Envelopes moved aside: undecodable, or their body missing.
    pub quarantined: u64,
}

/// How to open a spool.
pub struct Options {
    /// `spool.max_size`: bytes on disk beyond which commits are refused.
    pub max_size: u64,
    /// Groups queue totals (see [`Spool::queue_by_label`]); default: by domain.
    pub labeler: Labeler,
    /// Told how long each transaction took, fsync included.
    pub on_commit: Option<CommitObserver>,
}

impl Options {
    pub fn new(max_size: u64) -> Options {
        Options {
            max_size,
            labeler: Arc::new(|domain: &str| domain.to_owned()),
            on_commit: None,
        }
    }
}

/// Cheap to clone: every clone talks to the same file and writer.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Store>,
    path: PathBuf,
    ids: IdGen,
    max_size: u64,
    /// Running totals, updated by the writer after each successful commit.
    totals: Arc<Totals>,
    /// `None` once closed; taking it out and joining the thread drains the writer.
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Spool {
    /// Opens (creating if needed) the spool at `path`, quarantines undecodable
    /// records, and starts the writer thread. Queue totals are grouped by
    /// recipient domain. Blocking: call from `spawn_blocking`.
    pub fn open(path: &Path, max_size: u64) -> Result<Spool, OpenError> {
        Spool::open_with(path, Options::new(max_size))
    }

    /// [`Spool::open`] with queue totals grouped by `labeler`'s names.
    pub fn open_labelled(path: &Path, max_size: u64, labeler: Labeler) -> Result<Spool, OpenError> {
        Spool::open_with(
            path,
            Options {
                labeler,
                ..Options::new(max_size)
            },
        )
    }

    /// [`Spool::open`] with every option given.
    pub fn open_with(path: &Path, options: Options) -> Result<Spool, OpenError> {
        let Options {
            max_size,
            labeler,
            on_commit,
        } = options;
        let io = |reason: String| OpenError::Io {
            path: path.to_owned(),
            reason,
        };
        let corrupt = |reason: String| OpenError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| io(format!("cannot create {}: {e}", dir.display())))?;
        }
        let db = match open_database(path) {
            Ok(Ok(db)) => db,
            Ok(Err(DatabaseError::DatabaseAlreadyOpen)) => {
                return Err(OpenError::Locked {
                    path: path.to_owned(),
                });
            }
            Ok(Err(DatabaseError::Storage(redb::StorageError::Io(e)))) => {
                return Err(match e.kind() {
                    // How redb reports a file that does not start like a database.
                    std::io::ErrorKind::InvalidData => corrupt(e.to_string()),
                    std::io::ErrorKind::UnexpectedEof => {
                        corrupt(format!("the file ends early (truncated?): {e}"))
                    }
                    _ => io(e.to_string()),
                });
            }
            Ok(Err(e)) => return Err(corrupt(e.to_string())),
            Err(_) => return Err(corrupt("the storage engine failed while reading it".into())),
        };

        let scan = prepare(&db, &labeler).map_err(|e| match e {
            PrepareError::Schema(found) => OpenError::Schema {
                path: path.to_owned(),
                found,
            },
            PrepareError::Db(reason) => corrupt(reason),
        })?;

        let db = Arc::new(Store {
            path: path.to_owned(),
            db: RwLock::new(Some(db)),
        });
        let totals = Arc::new(Totals {
            messages: AtomicU64::new(scan.messages),
            queued_bytes: AtomicU64::new(scan.queued_bytes),
            bytes: AtomicU64::new(scan.bytes),
            dead: AtomicU64::new(scan.dead),
            held: AtomicU64::new(scan.held),
            quarantined: AtomicU64::new(scan.quarantined),
            labels: Mutex::new(scan.labels),
        });
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            db: db.clone(),
            max_size,
            totals: totals.clone(),
            labeler,
            on_commit,
        };
        let handle = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| io(format!("cannot start the writer thread: {e}")))?;
        scan.repairs.log(path);
        Ok(Spool {
            inner: Arc::new(Inner {
                db,
                path: path.to_owned(),
                ids: IdGen::new(scan.largest_id),
                max_size,
                totals,
                jobs: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(handle)),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// A fresh queue ID; `now_micros` is the wall clock in microseconds.
    pub fn next_id(&self, now_micros: u64) -> QueueId {
        self.inner.ids.next(now_micros)
    }

    /// Whether `size` more bytes would still fit under `spool.max_size`. Advisory
    /// (for refusing early at MAIL FROM); the writer makes the binding decision.
    pub fn has_room(&self, size: u64) -> bool {
        let used = self.inner.totals.bytes.load(Ordering::Relaxed);
        used.saturating_add(size) <= self.inner.max_size
    }

    /// What the queue gauges of `/metrics` show, from the running totals.
    pub fn gauges(&self) -> crate::metrics::QueueGauges {
        let stats = self.stats();
        crate::metrics::QueueGauges {
            queued_bytes: stats.queued_bytes,
            dead: stats.dead,
            quarantined: stats.quarantined,
            by_label: self.queue_by_label(),
        }
    }

    pub fn stats(&self) -> Stats {
        let t = &self.inner.totals;
        Stats {
            messages: t.messages.load(Ordering::Relaxed),
            queued_bytes: t.queued_bytes.load(Ordering::Relaxed),
            bytes: t.bytes.load(Ordering::Relaxed),
            held: t.held.load(Ordering::Relaxed),
            dead: t.dead.load(Ordering::Relaxed),
            quarantined: t.quarantined.load(Ordering::Relaxed),
        }
    }

    /// Per label (see [`Spool::open_labelled`]): queued messages with a
    /// recipient waiting there, and the arrival time (unix ms) of the oldest.
    /// Exact, and cheap: kept by the writer, no table scan.
    pub fn queue_by_label(&self) -> Vec<(String, u64, Option<u64>)> {
        let labels = self
            .inner
            .totals
            .labels
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(String, u64, Option<u64>)> = labels
            .iter()
            .map(|(label, t)| (label.clone(), t.messages, t.arrivals.keys().next().copied()))
            .collect();
        out.sort();
        out
    }

    fn send(&self, job: Job) -> Result<(), CommitError> {
        let jobs = self.inner.jobs.lock().map_err(|_| CommitError::Closed)?;
        let jobs = jobs.as_ref().ok_or(CommitError::Closed)?;
        jobs.send(job).map_err(|_| CommitError::Closed)
    }

    /// Applies `change` to message `id` durably (with `insert`, e.g. a DSN about
    /// it, in the same transaction). Returns the envelope as it now stands
    /// (`None`: no such message). After an `Edit` that left no recipient queued,
    /// the message is gone from the spool; the returned envelope says how each
    /// recipient ended.
    pub async fn change(
        &self,
        id: QueueId,
        change: Change,
        insert: Vec<NewMessage>,
    ) -> Result<Option<Envelope>, CommitError> {
        let (done, result) = oneshot::channel();
        self.send(Job::Change {
            id,
            change,
            insert,
            done,
        })?;
        result.await.unwrap_or(Err(CommitError::Closed))
    }

    /// Remembers the primary's verdict on recipients (`true`: it accepted them;
    /// `false`: it said they do not exist), as of `at_ms`. Written with the
    /// next batch; not awaited, since losing a verdict only costs a lookup.
    pub fn learn(&self, verdicts: Vec<(String, bool)>, at_ms: u64) {
        if verdicts.is_empty() {
            return;
        }
        let _ = self.send(Job::Learn { verdicts, at_ms });
    }

    /// Drops learned verdicts older than their trust period ([`TRUST_EXISTS`],
    /// [`TRUST_MISSING`]) as of `now_ms`. Not awaited, like [`Spool::learn`].
    pub fn forget_stale(&self, now_ms: u64) {
        let _ = self.send(Job::Forget {
            exists_before: now_ms.saturating_sub(TRUST_EXISTS.as_millis() as u64),
            missing_before: now_ms.saturating_sub(TRUST_MISSING.as_millis() as u64),
        });
    }

    /// Records durably that delivery to relay domain `domain` is paused
    /// (`Some`), or no longer is (`None`).
    pub async fn set_pause(&self, domain: &str, pause: Option<Pause>) -> Result<(), CommitError> {
        let (done, result) = oneshot::channel();
        self.send(Job::Pause {
            domain: domain.to_owned(),
            pause,
            done,
        })?;
        result.await.unwrap_or(Err(CommitError::Closed))
    }

    /// Every paused domain as recorded, by name.
    pub fn pauses(&self) -> Result<Vec<(String, Pause)>, ReadError> {
        let txn = self.inner.db.begin_read()?;
        let table = txn.open_table(PAUSED).map_err(read_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(read_err)? {
            let (domain, row) = row.map_err(read_err)?;
            out.push((domain.value().to_owned(), Pause::from_row(row.value())));
        }
        Ok(out)
    }

    /// Every learned verdict, by lower-cased address.
    pub fn learned_all(&self) -> Result<Vec<(String, LearnedRow)>, ReadError> {
        let txn = self.inner.db.begin_read()?;
        let table = txn.open_table(LEARNED).map_err(read_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(read_err)? {
            let (address, verdict) = row.map_err(read_err)?;
            out.push((address.value().to_owned(), verdict.value()));
        }
        Ok(out)
    }

    /// The last verdict on `address` and when it was learned.
    pub fn learned(&self, address: &str) -> Result<Option<LearnedRow>, ReadError> {
        let txn = self.inner.db.begin_read()?;
        let table = txn.open_table(LEARNED).map_err(read_err)?;
        let key = address.to_lowercase();
        Ok(table
            .get(key.as_str())
            .map_err(read_err)?
            .map(|v| v.value()))
    }

    /// Several changes at once: all are queued before any is awaited, so they
    /// share transactions. Results come back in the same order.
    pub async fn change_many(
        &self,
        changes: Vec<(QueueId, Change)>,
    ) -> Vec<Result<Option<Envelope>, CommitError>> {
        let mut pending = Vec::with_capacity(changes.len());
        for (id, change) in changes {
            let (done, result) = oneshot::channel();
            pending.push(
                self.send(Job::Change {
                    id,
                    change,
                    insert: Vec::new(),
                    done,
                })
                .map(|()| result),
            );
        }
        let mut out = Vec::with_capacity(pending.len());
        for p in pending {
            out.push(match p {
                Ok(result) => result.await.unwrap_or(Err(CommitError::Closed)),
                Err(e) => Err(e),
            });
        }
        out
    }

    /// Envelopes of the given messages (absent or undecodable ones skipped),
    /// read from one snapshot.
    pub fn envelopes_of(&self, ids: &[QueueId]) -> Result<Vec<Envelope>, ReadError> {
        let txn = self.inner.db.begin_read()?;
        let table = txn.open_table(MESSAGES).map_err(read_err)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(raw) = table.get(id.0).map_err(read_err)?
                && let Ok(env) = Envelope::decode(raw.value())
            {
                out.push(env);
            }
        }
        Ok(out)
    }

    /// The first due time strictly after `after_ms`, if any.
    pub fn next_due_after(&self, after_ms: u64) -> Result<Option<u64>, ReadError> {
        let txn = self.inner.db.begin_read()?;
        let table = txn.open_table(DUE).map_err(read_err)?;
        let first = table
            .range((after_ms.saturating_add(1), 0)..)
            .map_err(read_err)?
            .next()
            .transpose()
            .map_err(read_err)?;
        Ok(first.map(|(k, _)| k.value().0))
    }

    /// Stores the message durably. Returns once the transaction holding it has been
    /// committed with an fsync, or with an error after which nothing of it remains.
    pub async fn commit(&self, message: NewMessage) -> Result<(), CommitError> {
        let (done, result) = oneshot::channel();
        self.send(Job::Commit {
            message: Box::new(message),
            done,
        })?;
        result.await.unwrap_or(Err(CommitError::Closed))
    }

    /// Stops accepting commits, waits for those in progress, and stops the writer.
    /// Blocking: call from `spawn_blocking`.
    pub fn close(&self) {
        if let Ok(mut jobs) = self.inner.jobs.lock() {
            jobs.take();
        }
        let handle = self.inner.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }

    /// The envelope of a queued message, if it exists and decodes.
    pub fn envelope(&self, id: QueueId) -> Result<Option<Envelope>, ReadError> {
        let txn = self.inner.db.begin_read()?;
        let table = txn.open_table(MESSAGES).map_err(read_err)?;
        let Some(raw) = table.get(id.0).map_err(read_err)? else {
            return Ok(None);
        };
        Envelope::decode(raw.value()).map(Some).map_err(read_err)
    }

    /// The stored body of a message.
    pub fn body(&self, id: QueueId) -> Result<Option<Vec<u8>>, ReadError> {
        let txn = self.inner.db.begin_read()?;
        let table = txn.open_table(BODIES).map_err(read_err)?;
        Ok(table
            .get(id.0)
            .map_err(read_err)?
            .map(|v| v.value().to_vec()))
    }

    /// Every queued envelope in ID (arrival) order; undecodable ones are skipped
    /// (they were quarantined at open and cannot appear later).
    pub fn envelopes(&self) -> Result<Vec<Envelope>, ReadError> {
        let txn = self.inner.db.begin_read()?;
        let table = txn.open_table(MESSAGES).map_err(read_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(read_err)? {
            let (_, raw) = row.map_err(read_err)?;
            if let Ok(env) = Envelope::decode(raw.value()) {
                out.push(env);
            }
        }
        Ok(out)
    }

    /// The due index in order: `(unix ms, ID)` of every message with mail to try.
    pub fn due(&self) -> Result<Vec<(u64, QueueId)>, ReadError> {
        self.due_until(u64::MAX, usize::MAX)
    }

    /// Due entries at or before `until_ms`, earliest first, at most `limit`.
    pub fn due_until(&self, until_ms: u64, limit: usize) -> Result<Vec<(u64, QueueId)>, ReadError> {
        let txn = self.inner.db.begin_read()?;
        let table = txn.open_table(DUE).map_err(read_err)?;
        let mut out = Vec::new();
        for row in table
            .range((0, 0)..=(until_ms, u64::MAX))
            .map_err(read_err)?
            .take(limit)
        {
            let (key, _) = row.map_err(read_err)?;
            let (ms, id) = key.value();
            out.push((ms, QueueId(id)));
        }
        Ok(out)
    }

    /// When the earliest message is due, if any is.
    pub fn next_due(&self) -> Result<Option<u64>, ReadError> {
        let txn = self.inner.db.begin_read()?;
        let table = txn.open_table(DUE).map_err(read_err)?;
        Ok(table.first().map_err(read_err)?.map(|(k, _)| k.value().0))
    }

    pub fn is_held(&self, id: QueueId) -> Result<bool, ReadError> {
        let txn = self.inner.db.begin_read()?;
        let table = txn.open_table(HELD).map_err(read_err)?;
        Ok(table.get(id.0).map_err(read_err)?.is_some())
    }

    /// Every dead letter, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<Envelope>, ReadError> {
        let txn = self.inner.db.begin_read()?;
        let table = txn.open_table(DEAD).map_err(read_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(read_err)? {
            let (_, raw) = row.map_err(read_err)?;
            if let Ok(env) = Envelope::decode(raw.value()) {
                out.push(env);
            }
        }
        Ok(out)
    }

    /// IDs of records moved to quarantine, with their raw bytes, for inspection.
    pub fn quarantined(&self) -> Result<Vec<(QueueId, Vec<u8>)>, ReadError> {
        let txn = self.inner.db.begin_read()?;
        let table = txn.open_table(QUARANTINE).map_err(read_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(read_err)? {
            let (id, raw) = row.map_err(read_err)?;
            out.push((QueueId(id.value()), raw.value().to_vec()));
        }
        Ok(out)
    }

    /// Writes raw bytes as a message record, bypassing encoding: lets tests (and
    /// only tests) plant a damaged record to prove it is quarantined.
    #[doc(hidden)]
    pub fn write_raw_record_for_tests(&self, id: QueueId, raw: &[u8]) -> Result<(), ReadError> {
        let txn = self.inner.db.begin_write().map_err(read_err)?;
        txn.open_table(MESSAGES)
            .map_err(read_err)?
            .insert(id.0, raw)
            .map_err(read_err)?;
        txn.commit().map_err(read_err)
    }
}

/// redb documents that opening a file altered behind its back may panic; a
/// damaged spool must be a clear error instead (`Err` here).
fn open_database(path: &Path) -> std::thread::Result<Result<Database, DatabaseError>> {
    std::panic::catch_unwind(|| Database::builder().set_cache_size(CACHE_BYTES).create(path))
}

/// The database, reopenable: after a failed write (a full disk, say) redb
/// refuses every later operation until the file is closed and opened again,
/// which is how the spool recovers once the cause is gone.
pub(super) struct Store {
    path: PathBuf,
    /// `None` while closed for reopening (or if reopening failed).
    db: RwLock<Option<Database>>,
}

impl Store {
    fn begin_read(&self) -> Result<redb::ReadTransaction, ReadError> {
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        let db = guard
            .as_ref()
            .ok_or_else(|| ReadError("the spool is being reopened after a write error".into()))?;
        db.begin_read().map_err(read_err)
    }

    pub(super) fn begin_write(&self) -> Result<redb::WriteTransaction, redb::Error> {
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        let db = guard.as_ref().ok_or(redb::Error::PreviousIo)?;
        db.begin_write().map_err(Into::into)
    }

    /// Closes and opens the file again; on failure the store stays closed and
    /// the next write tries again.
    pub(super) fn reopen(&self) {
        let mut guard = self.db.write().unwrap_or_else(|p| p.into_inner());
        drop(guard.take());
        match open_database(&self.path) {
            Ok(Ok(db)) => {
                tracing::warn!(path = %self.path.display(), "spool reopened after a write error");
                *guard = Some(db);
            }
            Ok(Err(e)) => tracing::error!(error = %e, "cannot reopen the spool yet"),
            Err(_) => tracing::error!("the storage engine failed while reopening the spool"),
        }
    }

    pub(super) fn is_open(&self) -> bool {
        self.db.read().map(|g| g.is_some()).unwrap_or(false)
    }
}

struct Scan {
    messages: u64,
    queued_bytes: u64,
    labels: HashMap<String, LabelTotals>,
    bytes: u64,
    held: u64,
    dead: u64,
    quarantined: u64,
    repairs: Repairs,
    largest_id: u64,
}

/// What the open found wrong inside the file and set right, by queue ID.
#[derive(Debug, Default, PartialEq, Eq)]
struct Repairs {
    /// Envelopes that did not decode: moved to quarantine.
    quarantined: Vec<u64>,
    /// Due-index entries that matched no queued message (none, or one due at
    /// another time): removed.
    stale_due: Vec<u64>,
    /// Queued messages missing from the due index: put back.
    restored_due: Vec<u64>,
    /// Hold marks of messages that are not queued: removed.
    stale_held: Vec<u64>,
}

impl Repairs {
    /// IDs named per kind in the log; a damaged file may hold thousands.
    const NAMED: usize = 100;

    fn log(&self, path: &Path) {
        let path = path.display().to_string();
        // (IDs, what was done, whether mail is affected and an operator should look)
        let kinds = [
            (
                &self.quarantined,
                "undecodable envelopes moved to quarantine",
                true,
            ),
            (
                &self.stale_due,
                "due-index entries matching no queued message removed",
                false,
            ),
            (
                &self.restored_due,
                "queued messages missing from the due index put back",
                false,
            ),
            (
                &self.stale_held,
                "hold marks of messages not in the queue removed",
                false,
            ),
        ];
        for (ids, what, lost) in kinds {
            if ids.is_empty() {
                continue;
            }
            let count = ids.len();
            let named: Vec<String> = ids
                .iter()
                .take(Self::NAMED)
                .map(|id| QueueId(*id).to_string())
                .collect();
            let ids = named.join(" ");
            if lost {
                tracing::error!(spool = %path, count, %ids, "{what}");
            } else {
                tracing::warn!(spool = %path, count, %ids, "{what}");
            }
        }
    }
}

enum PrepareError {
    Schema(u64),
    Db(String),
}

impl<E: std::fmt::Display> From<E> for PrepareError
where
    E: Into<redb::Error>,
{
    fn from(e: E) -> Self {
        PrepareError::Db(e.to_string())
    }
}

/// Creates missing tables, checks the layout version, moves undecodable message
/// records to quarantine, makes the due index and hold marks agree with the
/// envelopes, and totals what is queued. (A missing body is found when the
/// message is next loaded: checking here would read the whole file.)
fn prepare(db: &Database, labeler: &Labeler) -> Result<Scan, PrepareError> {
    let txn = db.begin_write()?;
    let mut scan = Scan {
        messages: 0,
        queued_bytes: 0,
        labels: HashMap::new(),
        bytes: 0,
        held: 0,
        dead: 0,
        quarantined: 0,
        repairs: Repairs::default(),
        largest_id: 0,
    };
    {
        let mut meta = txn.open_table(META)?;
        let found = meta.get("schema")?.map(|v| v.value());
        match found {
            // Layout 1 differs only by what layout 2 added.
            None | Some(1) => {
                meta.insert("schema", SCHEMA)?;
            }
            Some(SCHEMA) => {}
            Some(other) => return Err(PrepareError::Schema(other)),
        }
        let mut messages = txn.open_table(MESSAGES)?;
        // Bodies of quarantined records stay where they are, for manual recovery.
        txn.open_table(BODIES)?;
        let mut due = txn.open_table(DUE)?;
        let mut held = txn.open_table(HELD)?;
        let dead = txn.open_table(DEAD)?;
        let mut quarantine = txn.open_table(QUARANTINE)?;
        txn.open_table(LEARNED)?;
        txn.open_table(PAUSED)?;

        // The due index is derived from the envelopes: each queued message
        // that is not held has exactly one entry, at its next due time.
        let mut queued: HashSet<u64> = HashSet::new();
        let mut wanted_due: HashSet<(u64, u64)> = HashSet::new();
        let mut bad = Vec::new();
        for row in messages.iter()? {
            let (id, raw) = row?;
            let id = id.value();
            match Envelope::decode(raw.value()) {
                Ok(env) => {
                    scan.messages += 1;
                    scan.queued_bytes += env.size;
                    scan.bytes += env.size;
                    for label in labels_of(&env, labeler) {
                        let entry = scan.labels.entry(label).or_default();
                        entry.messages += 1;
                        *entry.arrivals.entry(env.arrived_ms).or_default() += 1;
                    }
                    queued.insert(id);
                    if let Some(at) = env.next_due_ms()
                        && held.get(id)?.is_none()
                    {
                        wanted_due.insert((at, id));
                    }
                }
                Err(_) => bad.push((id, raw.value().to_vec())),
            }
        }
        for (id, raw) in &bad {
            quarantine.insert(*id, raw.as_slice())?;
            messages.remove(*id)?;
        }
        scan.repairs.quarantined = bad.into_iter().map(|(id, _)| id).collect();

        let mut stale_due = Vec::new();
        for row in due.iter()? {
            let (key, _) = row?;
            let key = key.value();
            if !wanted_due.remove(&key) {
                stale_due.push(key);
            }
        }
        for key in &stale_due {
            due.remove(*key)?;
        }
        let mut restored: Vec<(u64, u64)> = wanted_due.into_iter().collect();
        restored.sort_unstable_by_key(|&(_, id)| id);
        for key in &restored {
            due.insert(*key, ())?;
        }
        scan.repairs.stale_due = stale_due.into_iter().map(|(_, id)| id).collect();
        scan.repairs.restored_due = restored.into_iter().map(|(_, id)| id).collect();

        let mut stale_held = Vec::new();
        for row in held.iter()? {
            let (id, _) = row?;
            if !queued.contains(&id.value()) {
                stale_held.push(id.value());
            }
        }
        for id in &stale_held {
            held.remove(*id)?;
        }
        scan.repairs.stale_held = stale_held;

        scan.quarantined = quarantine.len()?;
        scan.held = held.len()?;
        for row in dead.iter()? {
            let (_, raw) = row?;
            // An undecodable dead letter stays where it is: it is already aside.
            if let Ok(env) = Envelope::decode(raw.value()) {
                scan.dead += 1;
                scan.bytes += env.size;
            }
        }
        for table_last in [
            messages.last()?.map(|(k, _)| k.value()),
            dead.last()?.map(|(k, _)| k.value()),
            quarantine.last()?.map(|(k, _)| k.value()),
        ] {
            scan.largest_id = scan.largest_id.max(table_last.unwrap_or(0));
        }
    }
    txn.commit()?;
    Ok(scan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: u64, body: &[u8]) -> NewMessage {
        let mut envelope = record::sample(id, &["a@example.com"]);
        envelope.size = body.len() as u64;
        NewMessage {
            envelope,
            body: body.to_vec(),
        }
    }

    #[tokio::test]
    async fn pauses_are_kept_cleared_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let spool = Spool::open(&path, 1 << 20).unwrap();
        assert!(spool.pauses().unwrap().is_empty());
        let guard = Pause {
            by: PausedBy::Guard,
            since_ms: 10,
        };
        let operator = Pause {
            by: PausedBy::Operator,
            since_ms: 20,
        };
        spool.set_pause("a.example", Some(guard)).await.unwrap();
        spool.set_pause("b.example", Some(operator)).await.unwrap();
        spool.set_pause("c.example", Some(operator)).await.unwrap();
        spool.set_pause("c.example", None).await.unwrap();
        // Clearing what is not paused is no error.
        spool.set_pause("d.example", None).await.unwrap();
        spool.close();
        drop(spool);
        let spool = Spool::open(&path, 1 << 20).unwrap();
        assert_eq!(
            spool.pauses().unwrap(),
            vec![
                ("a.example".to_string(), guard),
                ("b.example".to_string(), operator)
            ]
        );
    }

    #[tokio::test]
    async fn parked_mail_stays_queued_but_is_never_due() {
        let (_dir, spool) = two_messages().await;
        spool
            .change(
                QueueId(1),
                Change::Edit(Box::new(|env| {
                    for r in &mut env.recipients {
                        r.next_attempt_ms = PARKED;
                    }
                    Finished::Remove
                })),
                vec![],
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            spool.due_until(now_far(), 10).unwrap(),
            vec![(1_000, QueueId(2))]
        );
        assert_eq!(spool.next_due_after(1_000).unwrap(), Some(PARKED));
        // Still queued and counted: a pause holds mail, it does not drop it.
        assert_eq!(spool.stats().messages, 2);
        assert_eq!(spool.queue_by_label()[0].1, 2);
        assert!(spool.envelope(QueueId(1)).unwrap().is_some());
    }

    /// A time far in the future, yet before [`PARKED`].
    fn now_far() -> u64 {
        PARKED - 1
    }

    #[tokio::test]
    async fn a_layout_1_spool_is_upgraded_and_an_unknown_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let set_schema = |value: u64| {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert("schema", value)
                .unwrap();
            txn.commit().unwrap();
        };
        let spool = Spool::open(&path, 1 << 20).unwrap();
        spool.commit(message(1, b"x")).await.unwrap();
        spool.close();
        drop(spool);
        set_schema(1);
        let spool = Spool::open(&path, 1 << 20).unwrap();
        assert_eq!(spool.envelopes().unwrap().len(), 1);
        assert!(spool.pauses().unwrap().is_empty());
        spool.close();
        drop(spool);
        set_schema(3);
        let err = Spool::open(&path, 1 << 20).err().unwrap();
        assert!(matches!(err, OpenError::Schema { found: 3, .. }), "{err}");
    }

    #[tokio::test]
    async fn commit_then_read_back_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.redb");
        let spool = Spool::open(&path, 1 << 20).unwrap();
        spool.commit(message(10, b"hello\r\n")).await.unwrap();
        spool.commit(message(11, b"world\r\n")).await.unwrap();
        assert_eq!(spool.stats().messages, 2);
        assert_eq!(spool.stats().bytes, 14);
        spool.close();
        drop(spool);

        let spool = Spool::open(&path, 1 << 20).unwrap();
        assert_eq!(
            spool.stats(),
            Stats {
                messages: 2,
                queued_bytes: 14,
                bytes: 14,
                ..Stats::default()
            }
        );
        let env = spool.envelope(QueueId(11)).unwrap().unwrap();
        assert_eq!(env.recipients[0].address, "a@example.com");
        assert_eq!(spool.body(QueueId(11)).unwrap().unwrap(), b"world\r\n");
        assert_eq!(
            spool.due().unwrap(),
            vec![(1_000, QueueId(10)), (1_000, QueueId(11))]
        );
        // New IDs continue after the largest stored one.
        assert!(spool.next_id(0) > QueueId(11));
    }

    #[tokio::test]
    async fn concurrent_commits_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("s.redb"), 1 << 30).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let spool = spool.clone();
            tasks.push(tokio::spawn(async move {
                spool.commit(message(100 + i, b"x\r\n")).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(spool.envelopes().unwrap().len(), 200);
        assert_eq!(spool.stats().messages, 200);
    }

    #[tokio::test]
    async fn full_spool_refuses_and_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("s.redb"), 10).unwrap();
        spool.commit(message(1, b"12345678")).await.unwrap();
        assert!(!spool.has_room(3));
        assert_eq!(
            spool.commit(message(2, b"123")).await,
            Err(CommitError::Full)
        );
        assert!(spool.envelope(QueueId(2)).unwrap().is_none());
        assert!(spool.body(QueueId(2)).unwrap().is_none());
        assert_eq!(spool.stats().messages, 1);
    }

    #[tokio::test]
    async fn closed_spool_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("s.redb"), 1 << 20).unwrap();
        spool.close();
        assert_eq!(
            spool.commit(message(1, b"x")).await,
            Err(CommitError::Closed)
        );
    }

    #[tokio::test]
    async fn undecodable_records_are_quarantined_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let spool = Spool::open(&path, 1 << 20).unwrap();
        spool.commit(message(5, b"good\r\n")).await.unwrap();
        spool
            .write_raw_record_for_tests(QueueId(6), &[1, 0xff, 0xff])
            .unwrap();
        spool.write_raw_record_for_tests(QueueId(7), &[77]).unwrap();
        spool.close();
        drop(spool);

        let spool = Spool::open(&path, 1 << 20).unwrap();
        assert_eq!(spool.stats().messages, 1);
        assert_eq!(spool.stats().quarantined, 2);
        let q = spool.quarantined().unwrap();
        assert_eq!(q[0], (QueueId(6), vec![1, 0xff, 0xff]));
        assert_eq!(spool.envelopes().unwrap().len(), 1);
        assert!(spool.next_id(0) > QueueId(7));
    }

    #[tokio::test]
    async fn the_due_index_and_hold_marks_are_set_right_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let spool = Spool::open(&path, 1 << 20).unwrap();
        for id in 1..=4 {
            spool.commit(message(id, b"x\r\n")).await.unwrap();
        }
        spool
            .change(QueueId(4), Change::Hold, vec![])
            .await
            .unwrap();
        spool
            .write_raw_record_for_tests(QueueId(5), &[1, 0xff])
            .unwrap();
        {
            let txn = spool.inner.db.begin_write().unwrap();
            {
                let mut due = txn.open_table(DUE).unwrap();
                due.remove((1_000, 1)).unwrap(); // 1 lost its entry
                due.remove((1_000, 2)).unwrap(); // 2 has one at the wrong time
                due.insert((7, 2), ()).unwrap();
                due.insert((5, 99), ()).unwrap(); // 99 does not exist
                due.insert((5, 5), ()).unwrap(); // 5 will be quarantined
                let mut held = txn.open_table(HELD).unwrap();
                held.insert(98, ()).unwrap();
                held.insert(5, ()).unwrap();
            }
            txn.commit().unwrap();
        }
        spool.close();
        drop(spool);

        let spool = Spool::open(&path, 1 << 20).unwrap();
        assert_eq!(
            spool.due().unwrap(),
            vec![
                (1_000, QueueId(1)),
                (1_000, QueueId(2)),
                (1_000, QueueId(3))
            ]
        );
        assert_eq!(spool.stats().held, 1);
        assert!(spool.is_held(QueueId(4)).unwrap());
        assert!(!spool.is_held(QueueId(98)).unwrap());
        assert_eq!(spool.stats().quarantined, 1);
        assert_eq!(spool.stats().messages, 4);
        spool.close();
        drop(spool);

        // A healthy file needs nothing set right.
        let db = open_database(&path).unwrap().unwrap();
        let scan = prepare(&db, &Options::new(0).labeler).ok().unwrap();
        assert_eq!(scan.repairs, Repairs::default());
    }

    #[tokio::test]
    async fn a_message_can_be_quarantined_and_leaves_the_totals() {
        let (_dir, spool) = two_messages().await;
        spool
            .change(QueueId(1), Change::Hold, vec![])
            .await
            .unwrap();
        let env = spool
            .change(QueueId(1), Change::Quarantine, vec![])
            .await
            .unwrap()
            .unwrap();
        assert!(spool.envelope(QueueId(1)).unwrap().is_none());
        assert!(spool.body(QueueId(1)).unwrap().is_none());
        let q = spool.quarantined().unwrap();
        assert_eq!(q, vec![(QueueId(1), env.encode())]);
        assert_eq!(spool.due().unwrap(), vec![(1_000, QueueId(2))]);
        let stats = spool.stats();
        assert_eq!(
            (stats.messages, stats.held, stats.quarantined, stats.bytes),
            (1, 0, 1, 5)
        );
        assert_eq!(
            spool.queue_by_label(),
            vec![("example.com".into(), 1, Some(1_000))]
        );
    }

    #[test]
    fn a_second_opener_gets_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let _first = Spool::open(&path, 1 << 20).unwrap();
        let err = Spool::open(&path, 1 << 20).err().unwrap();
        assert!(matches!(err, OpenError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("in use by another process"));
    }

    #[test]
    fn garbage_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        std::fs::write(&path, vec![0x5a; 64 * 1024]).unwrap();
        let err = Spool::open(&path, 1 << 20).err().unwrap();
        assert!(matches!(err, OpenError::Corrupt { .. }), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    /// Messages 1 (two recipients) and 2, both due at 1000.
    async fn two_messages() -> (tempfile::TempDir, Spool) {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("s.redb"), 1 << 20).unwrap();
        let mut first = message(1, b"one\r\n");
        first.envelope = record::sample(1, &["a@example.com", "b@example.com"]);
        first.envelope.size = 5;
        spool.commit(first).await.unwrap();
        spool.commit(message(2, b"two\r\n")).await.unwrap();
        (dir, spool)
    }

    #[tokio::test]
    async fn edits_move_the_due_entry_and_finished_messages_leave() {
        let (_dir, spool) = two_messages().await;
        let env = spool
            .change(
                QueueId(1),
                Change::Edit(Box::new(|env| {
                    env.recipients[0].status = RcptStatus::Delivered;
                    env.recipients[1].attempts = 1;
                    env.recipients[1].next_attempt_ms = 5_000;
                    Finished::Remove
                })),
                vec![],
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(env.next_due_ms(), Some(5_000));
        assert_eq!(
            spool.due().unwrap(),
            vec![(1_000, QueueId(2)), (5_000, QueueId(1))]
        );
        assert_eq!(
            spool.due_until(4_999, 10).unwrap(),
            vec![(1_000, QueueId(2))]
        );
        assert_eq!(spool.due_until(u64::MAX, 1).unwrap().len(), 1);
        assert_eq!(spool.next_due().unwrap(), Some(1_000));

        // The last queued recipient finishes: the message and its body go.
        let env = spool
            .change(
                QueueId(1),
                Change::Edit(Box::new(|env| {
                    env.recipients[1].status = RcptStatus::Failed;
                    Finished::Remove
                })),
                vec![],
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(env.next_due_ms(), None);
        assert!(spool.envelope(QueueId(1)).unwrap().is_none());
        assert!(spool.body(QueueId(1)).unwrap().is_none());
        assert_eq!(spool.due().unwrap(), vec![(1_000, QueueId(2))]);
        assert_eq!(spool.stats().messages, 1);
        assert_eq!(spool.stats().bytes, 5);

        // Unknown IDs are not an error.
        let gone = spool
            .change(
                QueueId(99),
                Change::Edit(Box::new(|_| Finished::Remove)),
                vec![],
            )
            .await
            .unwrap();
        assert!(gone.is_none());
    }

    #[tokio::test]
    async fn an_edit_can_queue_a_notice_in_the_same_transaction() {
        let (_dir, spool) = two_messages().await;
        spool
            .change(
                QueueId(2),
                Change::Edit(Box::new(|env| {
                    env.recipients[0].status = RcptStatus::Failed;
                    Finished::Remove
                })),
                vec![message(3, b"notice\r\n")],
            )
            .await
            .unwrap();
        assert!(spool.envelope(QueueId(2)).unwrap().is_none());
        assert!(spool.envelope(QueueId(3)).unwrap().is_some());
        assert_eq!(spool.stats().messages, 2);
    }

    #[tokio::test]
    async fn hold_release_bury_unbury_delete() {
        let (_dir, spool) = two_messages().await;
        spool
            .change(QueueId(1), Change::Hold, vec![])
            .await
            .unwrap();
        assert!(spool.is_held(QueueId(1)).unwrap());
        assert_eq!(spool.due().unwrap(), vec![(1_000, QueueId(2))]);
        assert_eq!(spool.stats().held, 1);
        // An edit while held keeps it out of the due index.
        spool
            .change(
                QueueId(1),
                Change::Edit(Box::new(|env| {
                    env.recipients[0].attempts = 3;
                    Finished::Remove
                })),
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(spool.due().unwrap().len(), 1);

        spool
            .change(QueueId(1), Change::Release { now_ms: 7_000 }, vec![])
            .await
            .unwrap();
        assert!(!spool.is_held(QueueId(1)).unwrap());
        assert_eq!(
            spool.due().unwrap(),
            vec![(1_000, QueueId(2)), (7_000, QueueId(1))]
        );

        spool
            .change(QueueId(2), Change::Bury, vec![])
            .await
            .unwrap();
        assert_eq!(spool.due().unwrap(), vec![(7_000, QueueId(1))]);
        assert_eq!(spool.dead_letters().unwrap()[0].id, QueueId(2));
        assert_eq!(spool.stats().dead, 1);
        assert_eq!(spool.stats().messages, 1);
        // The body stays with the dead letter.
        assert!(spool.body(QueueId(2)).unwrap().is_some());

        let back = spool
            .change(QueueId(2), Change::Unbury { now_ms: 8_000 }, vec![])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back.recipients[0].attempts, 0);
        assert_eq!(spool.stats().dead, 0);
        assert_eq!(spool.stats().messages, 2);
        assert!(spool.due().unwrap().contains(&(8_000, QueueId(2))));

        spool
            .change(QueueId(2), Change::Bury, vec![])
            .await
            .unwrap();
        spool
            .change(QueueId(2), Change::Delete, vec![])
            .await
            .unwrap();
        spool
            .change(QueueId(1), Change::Delete, vec![])
            .await
            .unwrap();
        assert!(spool.dead_letters().unwrap().is_empty());
        assert!(spool.envelopes().unwrap().is_empty());
        assert!(spool.due().unwrap().is_empty());
        assert_eq!(spool.stats(), Stats::default());
    }

    #[tokio::test]
    async fn totals_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let spool = Spool::open(&path, 1 << 20).unwrap();
            spool.commit(message(1, b"12345")).await.unwrap();
            spool.commit(message(2, b"123")).await.unwrap();
            spool.commit(message(3, b"1")).await.unwrap();
            spool
                .change(QueueId(1), Change::Bury, vec![])
                .await
                .unwrap();
            spool
                .change(QueueId(2), Change::Hold, vec![])
                .await
                .unwrap();
            let before = spool.stats();
            spool.close();
            drop(spool);
            let spool = Spool::open(&path, 1 << 20).unwrap();
            assert_eq!(spool.stats(), before);
            assert_eq!(
                before,
                Stats {
                    messages: 2,
                    queued_bytes: 4,
                    bytes: 9,
                    held: 1,
                    dead: 1,
                    quarantined: 0
                }
            );
        }
    }

    #[tokio::test]
    async fn a_finished_edit_can_bury_and_many_changes_share_batches() {
        let (_dir, spool) = two_messages().await;
        spool
            .change(
                QueueId(2),
                Change::Edit(Box::new(|env| {
                    env.recipients[0].status = RcptStatus::Failed;
                    Finished::Bury
                })),
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(spool.dead_letters().unwrap()[0].id, QueueId(2));
        assert_eq!(spool.stats().dead, 1);

        // Bury only applies once nothing is left queued.
        spool
            .change(
                QueueId(1),
                Change::Edit(Box::new(|env| {
                    env.recipients[0].status = RcptStatus::Failed;
                    Finished::Bury
                })),
                vec![],
            )
            .await
            .unwrap();
        assert!(spool.envelope(QueueId(1)).unwrap().is_some());

        let results = spool
            .change_many(vec![
                (QueueId(1), Change::Release { now_ms: 9 }),
                (QueueId(42), Change::Hold),
            ])
            .await;
        assert!(results[0].as_ref().unwrap().is_some());
        assert!(results[1].as_ref().unwrap().is_none());
        assert_eq!(spool.next_due_after(0).unwrap(), Some(9));
        assert_eq!(spool.next_due_after(9).unwrap(), None);
        assert_eq!(
            spool.envelopes_of(&[QueueId(1), QueueId(2)]).unwrap().len(),
            1
        );
    }

    #[tokio::test]
    async fn learned_verdicts_are_kept_and_updated() {
        let (_dir, spool) = two_messages().await;
        spool.learn(
            vec![
                ("Alice@Example.com".into(), true),
                ("bob@example.com".into(), false),
            ],
            10,
        );
        spool.learn(vec![("bob@example.com".into(), true)], 20);
        // Learning is not awaited: a commit after it proves it was written.
        spool.commit(message(3, b"x")).await.unwrap();
        assert_eq!(
            spool.learned("alice@example.com").unwrap(),
            Some((true, 10))
        );
        assert_eq!(spool.learned("BOB@example.com").unwrap(), Some((true, 20)));
        assert_eq!(spool.learned("carol@example.com").unwrap(), None);
    }

    #[tokio::test]
    async fn stale_verdicts_are_forgotten() {
        let (_dir, spool) = two_messages().await;
        let day = 24 * 3600 * 1000;
        let now = 100 * day;
        spool.learn(
            vec![
                ("old-yes@example.com".into(), true),
                ("old-no@example.com".into(), false),
            ],
            now - 31 * day,
        );
        spool.learn(
            vec![
                ("yes@example.com".into(), true),
                ("no-yesterday@example.com".into(), false),
            ],
            now - 2 * day,
        );
        spool.learn(vec![("no@example.com".into(), false)], now - day / 2);
        spool.forget_stale(now);
        spool.commit(message(3, b"x")).await.unwrap();
        let kept = |a: &str| spool.learned(a).unwrap().is_some();
        assert!(!kept("old-yes@example.com"));
        assert!(!kept("old-no@example.com"));
        assert!(
            kept("yes@example.com"),
            "an accepted address is trusted 30 days"
        );
        assert!(!kept("no-yesterday@example.com"), "a refusal only a day");
        assert!(kept("no@example.com"));
    }

    #[tokio::test]
    async fn per_label_totals_follow_every_change_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let labeler: Labeler = Arc::new(|d: &str| {
            if d == "example.com" || d.ends_with(".example.com") {
                "example.com".into()
            } else {
                "other".into()
            }
        });
        let spool = Spool::open_labelled(&path, 1 << 20, labeler.clone()).unwrap();
        let msg = |id: u64, arrived: u64, rcpts: &[&str]| {
            let mut m = message(id, b"12345");
            m.envelope = record::sample(id, rcpts);
            m.envelope.arrived_ms = arrived;
            m.envelope.size = 5;
            m
        };
        spool
            .commit(msg(
                1,
                100,
                &["a@example.com", "b@sub.example.com", "c@x.org"],
            ))
            .await
            .unwrap();
        spool.commit(msg(2, 200, &["d@example.com"])).await.unwrap();
        spool.commit(msg(3, 50, &["e@y.org"])).await.unwrap();
        assert_eq!(
            spool.queue_by_label(),
            vec![
                ("example.com".into(), 2, Some(100)),
                ("other".into(), 2, Some(50))
            ]
        );
        assert_eq!(spool.stats().queued_bytes, 15);

        // Message 1's example.com recipients are delivered: it leaves that label only.
        spool
            .change(
                QueueId(1),
                Change::Edit(Box::new(|env| {
                    env.recipients[0].status = RcptStatus::Delivered;
                    env.recipients[1].status = RcptStatus::Delivered;
                    Finished::Remove
                })),
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(
            spool.queue_by_label(),
            vec![
                ("example.com".into(), 1, Some(200)),
                ("other".into(), 2, Some(50))
            ]
        );
        // Held mail still counts; dead letters do not.
        spool
            .change(QueueId(2), Change::Hold, vec![])
            .await
            .unwrap();
        spool
            .change(QueueId(3), Change::Bury, vec![])
            .await
            .unwrap();
        assert_eq!(
            spool.queue_by_label(),
            vec![
                ("example.com".into(), 1, Some(200)),
                ("other".into(), 1, Some(100))
            ]
        );
        assert_eq!(spool.stats().queued_bytes, 10);
        spool
            .change(QueueId(3), Change::Unbury { now_ms: 1 }, vec![])
            .await
            .unwrap();
        spool
            .change(QueueId(1), Change::Delete, vec![])
            .await
            .unwrap();
        let before = (spool.queue_by_label(), spool.stats());
        assert_eq!(
            before.0,
            vec![
                ("example.com".into(), 1, Some(200)),
                ("other".into(), 1, Some(50))
            ]
        );
        spool.close();
        drop(spool);
        let spool = Spool::open_labelled(&path, 1 << 20, labeler).unwrap();
        // Labels that emptied may linger at zero in memory but not on reopen.
        let nonzero = |v: Vec<(String, u64, Option<u64>)>| {
            v.into_iter().filter(|(_, n, _)| *n > 0).collect::<Vec<_>>()
        };
        assert_eq!(nonzero(spool.queue_by_label()), nonzero(before.0));
        assert_eq!(spool.stats(), before.1);
    }
}
