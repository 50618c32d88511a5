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
//! `learned`, `greylist` and `greylist_passed` (greylisting's triplets and
//! the client networks that passed), `paused` (relay domains whose delivery is paused, so a pause
//! outlives a restart), `fetch_seen` and `fetch_ids` (what mailbox fetch
//! already took), `meta`. The file is untrusted input: the open sets
//! right what disagrees inside it and logs the queue IDs concerned.
//!
//! The spool never speaks SMTP and never decides policy.
//!
//! Here: the tables, the error types and [`Spool`], whose writes go to the one
//! writer thread (`writer`). The rest: `store` (the redb file, opened and
//! reopened), `recover` (the scan and repairs of the open), `read` (the read
//! side), `record` (envelope records), `id` (queue IDs).

mod id;
mod read;
mod record;
mod recover;
mod store;
#[cfg(test)]
pub(crate) use record::testing;
mod tables;
mod writer;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use redb::TableDefinition;
use tokio::sync::oneshot;

pub use id::{IdGen, ParseIdError, QueueId};
pub use record::{
    BodyType, Client, DecodeError, Envelope, Notify, PARKED, Pause, PausedBy, RcptStatus,
    Recipient, Ret,
};
use store::Store;
pub use writer::{Change, CommitObserver, Finished, Labeler};
use writer::{Job, Totals, Writer};

const MESSAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("messages");
/// Bodies of spools of layout 3 and before, one row each: read and removed,
/// never written.
const BODIES: TableDefinition<u64, &[u8]> = TableDefinition::new("bodies");
/// Bodies in pieces of [`BODY_CHUNK`] bytes: `(ID, piece number)` -> bytes.
/// A whole body of a few KiB would take a B-tree page of the next power of
/// two to itself (an 8 KiB page for 5 KiB of mail, and more copies while
/// pages are rewritten): the file grew to 2.2 times the mail it held. Three
/// pieces fit one 4 KiB page, so the file stays near the size of the mail,
/// and writes are faster.
const BODY_CHUNKS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("body_chunks");
/// See [`BODY_CHUNKS`]: a third of a 4 KiB page, less redb's per-entry and
/// per-page overhead.
const BODY_CHUNK: usize = 1300;

/// What a body of `size` bytes takes in the file: a third of a 4 KiB page
/// per piece (at least one). `spool.max_size` counts this, not the bare
/// message sizes, so the limit and the disk agree (measured: 5,557 bytes of
/// file per 5,200-byte message with envelopes and indexes; this counts 5,464).
pub(super) fn footprint(size: u64) -> u64 {
    const PIECE_SPACE: u64 = 4096_u64.div_ceil(3);
    size.div_ceil(BODY_CHUNK as u64).max(1) * PIECE_SPACE
}
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
/// Greylisting's triplets: "network sender recipient" -> first attempt (Unix ms).
const GREYLIST: TableDefinition<&str, u64> = TableDefinition::new("greylist");
/// Client networks that passed greylisting -> when they last did (Unix ms).
const GREYLIST_PASSED: TableDefinition<&str, u64> = TableDefinition::new("greylist_passed");
/// Paused relay domains: name -> [`Pause`] as a row (see `Pause::to_row`).
const PAUSED: TableDefinition<&str, (u8, u64)> = TableDefinition::new("paused");
/// Mailbox fetch: "account\0message uid" -> when it was stored (Unix ms).
/// A message listed here is never stored again (`delete = false` keeps it on
/// the server; `delete = true` may meet it again after a crash before the
/// deletion). Rows go once the server no longer lists the message.
const FETCH_SEEN: TableDefinition<&str, u64> = TableDefinition::new("fetch_seen");
/// Mailbox fetch: "Message-ID size" -> when stored (Unix ms), kept
/// [`FETCH_DUPLICATE_WINDOW`]: a provider's second copy is stored once.
const FETCH_IDS: TableDefinition<&str, u64> = TableDefinition::new("fetch_ids");
/// How long a fetched Message-ID and size are remembered.
pub const FETCH_DUPLICATE_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Layout version of the tables above, stored in `meta` and checked at open.
/// 2 added `paused` and envelope records of layout 2; a spool of layout 1 is
/// upgraded when opened (its records still decode), and an older mxspool
/// refuses a spool of layout 2 instead of quarantining records it cannot read.
/// 3 added envelope records of layout 3 (`notices_to`) and the tables
/// `fetch_seen` and `fetch_ids`; older records still decode.
/// 4 writes bodies in pieces (`body_chunks`); bodies of older layouts stay
/// in `bodies` until their messages leave, and an older mxspool refuses the
/// file instead of finding every new body missing.
/// 5 added envelope records of layout 4 (`ENVID=`/`ORCPT=` as received);
/// older records still decode, and an older mxspool refuses the file
/// instead of quarantining every new message.
const SCHEMA: u64 = 5;

/// A change to greylisting's state (see `knowledge::greylist`).
#[derive(Debug)]
pub enum GreyWrite {
    /// A triplet's first attempt (again, if its window had passed).
    Seen { triplet: String, at_ms: u64 },
    /// The triplet was retried in time: it goes, its client network is
    /// remembered as of `at_ms`.
    Passed {
        triplet: Option<String>,
        network: String,
        at_ms: u64,
    },
    /// Drop triplets first seen before `seen_before` and networks that last
    /// passed before `passed_before`.
    Sweep {
        seen_before: u64,
        passed_before: u64,
    },
}

/// What a fetch stores besides a message: that the mailbox's message `uid`
/// of `account` was taken, and (with its Message-ID) the duplicate key.
#[derive(Debug, Clone)]
pub struct FetchMark {
    pub account: String,
    pub uid: String,
    /// "Message-ID size", when the message has a Message-ID.
    pub duplicate_key: Option<String>,
    pub at_ms: u64,
}

impl FetchMark {
    fn seen_key(&self) -> String {
        seen_key(&self.account, &self.uid)
    }
}

fn seen_key(account: &str, uid: &str) -> String {
    format!("{account}\0{uid}")
}

/// A message ready to be stored: everything the 250 promises.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub envelope: Envelope,
    /// The content as it will be forwarded: our `Received:` header, then the data.
    pub body: Vec<u8>,
}

/// One page of the queue (see [`Spool::page`]).
#[derive(Debug, Default)]
pub struct Page {
    /// Envelopes and whether each is held, in ID order.
    pub items: Vec<(Envelope, bool)>,
    /// The last ID of this page when more messages match after it.
    pub next: Option<QueueId>,
    /// Every match in the queue, when counting was asked for.
    pub matched: Option<u64>,
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
    /// What queued and dead bodies take in the file (see `footprint`): what
    /// `spool.max_size` limits.
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
        let db = store::open_file(path)?;
        let scan = recover::prepare(&db, &labeler).map_err(|e| e.at(path))?;
        let db = Arc::new(Store::new(path, db));
        let largest_id = scan.largest_id;
        let (totals, repairs) = scan.into_totals();
        let totals = Arc::new(totals);
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
            .map_err(|e| OpenError::Io {
                path: path.to_owned(),
                reason: format!("cannot start the writer thread: {e}"),
            })?;
        repairs.log(path);
        Ok(Spool {
            inner: Arc::new(Inner {
                db,
                path: path.to_owned(),
                ids: IdGen::new(largest_id),
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
        used.saturating_add(footprint(size)) <= self.inner.max_size
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

    /// Writes greylisting state with the next batch; not awaited, like
    /// [`Spool::learn`]: a triplet lost to a crash only starts over.
    pub fn greylist(&self, write: GreyWrite) {
        let _ = self.send(Job::Grey(write));
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

    /// Stores a fetched message (`None`: a duplicate, only marked) together
    /// with its [`FetchMark`], durably: the mailbox may delete it once this
    /// returns `Ok`.
    pub async fn commit_fetched(
        &self,
        message: Option<NewMessage>,
        mark: FetchMark,
    ) -> Result<(), CommitError> {
        let (done, result) = oneshot::channel();
        self.send(Job::Fetched {
            message: message.map(Box::new),
            mark,
            done,
        })?;
        result.await.unwrap_or(Err(CommitError::Closed))
    }

    /// Forgets the messages of `account` the server no longer lists (every
    /// one not in `listed`), and duplicate keys older than
    /// [`FETCH_DUPLICATE_WINDOW`] as of `now_ms`. Not awaited: a row kept
    /// too long only costs space.
    pub fn fetch_forget(&self, account: &str, listed: HashSet<String>, now_ms: u64) {
        let _ = self.send(Job::FetchForget {
            prefix: seen_key(account, ""),
            listed: listed.iter().map(|uid| seen_key(account, uid)).collect(),
            ids_before: now_ms.saturating_sub(FETCH_DUPLICATE_WINDOW.as_millis() as u64),
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A message of one recipient at example.com, due at 1000.
    pub(super) fn message(id: u64, body: &[u8]) -> NewMessage {
        let mut envelope = record::sample(id, &["a@example.com"]);
        envelope.size = body.len() as u64;
        NewMessage {
            envelope,
            body: body.to_vec(),
        }
    }

    /// Messages 1 (two recipients) and 2, both due at 1000.
    pub(super) async fn two_messages() -> (tempfile::TempDir, Spool) {
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
    async fn commit_then_read_back_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.redb");
        let spool = Spool::open(&path, 1 << 20).unwrap();
        spool.commit(message(10, b"hello\r\n")).await.unwrap();
        spool.commit(message(11, b"world\r\n")).await.unwrap();
        assert_eq!(spool.stats().messages, 2);
        assert_eq!(spool.stats().bytes, 2 * footprint(7));
        spool.close();
        drop(spool);

        let spool = Spool::open(&path, 1 << 20).unwrap();
        assert_eq!(
            spool.stats(),
            Stats {
                messages: 2,
                queued_bytes: 14,
                bytes: 2 * footprint(7),
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

    #[test]
    fn a_body_takes_its_pieces_in_the_file() {
        assert_eq!(footprint(0), 1366);
        assert_eq!(footprint(1300), 1366);
        assert_eq!(footprint(1301), 2 * 1366);
        // A 5 KB message: four pieces, 1.07 times its size.
        assert_eq!(footprint(5120), 4 * 1366);
    }

    #[tokio::test]
    async fn full_spool_refuses_and_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        // Room for one piece (footprint 1,366), not two.
        let spool = Spool::open(&dir.path().join("s.redb"), 2000).unwrap();
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
        assert_eq!(spool.stats().bytes, footprint(5));

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
            (1, 0, 1, footprint(5))
        );
        assert_eq!(
            spool.queue_by_label(),
            vec![("example.com".into(), 1, Some(1_000))]
        );
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
    async fn fetch_marks_are_stored_with_the_message_and_forgotten_when_unlisted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let spool = Spool::open(&path, 1 << 20).unwrap();
        let mark = |uid: &str, key: Option<&str>, at_ms| FetchMark {
            account: "isp".into(),
            uid: uid.into(),
            duplicate_key: key.map(Into::into),
            at_ms,
        };
        let day = 24 * 3600 * 1000;
        spool
            .commit_fetched(Some(message(1, b"a\r\n")), mark("u1", Some("<a@x> 3"), day))
            .await
            .unwrap();
        // A duplicate: only its mark.
        spool
            .commit_fetched(None, mark("u2", None, day))
            .await
            .unwrap();
        // Another account's marks are its own.
        let other = FetchMark {
            account: "isp2".into(),
            ..mark("u1", None, day)
        };
        spool.commit_fetched(None, other).await.unwrap();
        assert_eq!(spool.stats().messages, 1);
        let seen = spool.fetch_seen("isp").unwrap();
        assert_eq!(seen, ["u1", "u2"].map(String::from).into());
        assert!(spool.fetch_duplicate("<a@x> 3", day + 1).unwrap());
        assert!(!spool.fetch_duplicate("<a@x> 4", day + 1).unwrap());
        assert!(!spool.fetch_duplicate("<a@x> 3", day + 8 * day).unwrap());

        // A full spool stores neither the message nor its mark.
        let mut big = message(3, &[b'x'; 100]);
        big.envelope.size = 2 << 20;
        assert_eq!(
            spool
                .commit_fetched(Some(big), mark("u3", Some("<b@x> 1"), day))
                .await,
            Err(CommitError::Full)
        );
        assert!(!spool.fetch_seen("isp").unwrap().contains("u3"));
        assert!(!spool.fetch_duplicate("<b@x> 1", day).unwrap());

        // The server no longer lists u1; a week later its Message-ID is forgotten too.
        spool.fetch_forget("isp", ["u2".to_string()].into(), 9 * day);
        spool
            .commit_fetched(None, mark("u4", None, 9 * day))
            .await
            .unwrap();
        spool.close();
        drop(spool);
        let spool = Spool::open(&path, 1 << 20).unwrap();
        assert_eq!(
            spool.fetch_seen("isp").unwrap(),
            ["u2", "u4"].map(String::from).into()
        );
        assert_eq!(
            spool.fetch_seen("isp2").unwrap(),
            ["u1"].map(String::from).into()
        );
        assert!(!spool.fetch_duplicate("<a@x> 3", day).unwrap());
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
        // Arrival times in whole seconds: the totals keep them per second.
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
                100_000,
                &["a@example.com", "b@sub.example.com", "c@x.org"],
            ))
            .await
            .unwrap();
        spool
            .commit(msg(2, 200_000, &["d@example.com"]))
            .await
            .unwrap();
        spool.commit(msg(3, 50_000, &["e@y.org"])).await.unwrap();
        assert_eq!(
            spool.queue_by_label(),
            vec![
                ("example.com".into(), 2, Some(100_000)),
                ("other".into(), 2, Some(50_000))
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
                ("example.com".into(), 1, Some(200_000)),
                ("other".into(), 2, Some(50_000))
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
                ("example.com".into(), 1, Some(200_000)),
                ("other".into(), 1, Some(100_000))
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
                ("example.com".into(), 1, Some(200_000)),
                ("other".into(), 1, Some(50_000))
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
