//! What the open does before the spool is used: creates missing tables, checks
//! (and upgrades) the layout version, and treats the file as untrusted input —
//! undecodable envelopes go to quarantine, the due index and hold marks are made
//! to agree with the envelopes, and the running totals are rebuilt. All of it in
//! one write transaction, committed before the writer thread starts.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use redb::{Database, ReadableTable, ReadableTableMetadata, Table, WriteTransaction};

use super::writer::{LabelTotals, Totals, labels_of};
use super::{
    BODIES, BODY_CHUNKS, DEAD, DUE, Envelope, FETCH_IDS, FETCH_SEEN, GREYLIST, GREYLIST_PASSED,
    HELD, LEARNED, Labeler, MESSAGES, META, OpenError, PAUSED, QUARANTINE, QueueId, SCHEMA,
    footprint,
};

/// What the open found in the file: the totals to start from, what it set
/// right, and the largest ID in use (new IDs continue after it).
#[derive(Default)]
pub(super) struct Scan {
    messages: u64,
    queued_bytes: u64,
    labels: HashMap<String, LabelTotals>,
    bytes: u64,
    held: u64,
    dead: u64,
    quarantined: u64,
    repairs: Repairs,
    pub(super) largest_id: u64,
}

impl Scan {
    /// The writer's running totals as found, and the repairs to log.
    pub(super) fn into_totals(self) -> (Totals, Repairs) {
        let totals = Totals {
            messages: AtomicU64::new(self.messages),
            queued_bytes: AtomicU64::new(self.queued_bytes),
            bytes: AtomicU64::new(self.bytes),
            dead: AtomicU64::new(self.dead),
            held: AtomicU64::new(self.held),
            quarantined: AtomicU64::new(self.quarantined),
            labels: Mutex::new(self.labels),
        };
        (totals, self.repairs)
    }

    /// Counts a decoded queued envelope in the totals.
    fn count_queued(&mut self, env: &Envelope, labeler: &Labeler) {
        self.messages += 1;
        self.queued_bytes += env.size;
        self.bytes += footprint(env.size);
        for label in labels_of(env, labeler) {
            self.labels.entry(label).or_default().add(env.arrived_ms);
        }
    }
}

/// What the open found wrong inside the file and set right, by queue ID.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Repairs {
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

    pub(super) fn log(&self, path: &Path) {
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

/// Why [`prepare`] failed.
pub(super) enum PrepareError {
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

impl PrepareError {
    /// The error the open reports for the spool at `path`.
    pub(super) fn at(self, path: &Path) -> OpenError {
        match self {
            PrepareError::Schema(found) => OpenError::Schema {
                path: path.to_owned(),
                found,
            },
            PrepareError::Db(reason) => OpenError::Corrupt {
                path: path.to_owned(),
                reason,
            },
        }
    }
}

/// Queued messages as their envelopes say, for checking the indexes against.
struct Queued {
    /// IDs of the queued messages that decode.
    ids: HashSet<u64>,
    /// The due entries they call for: each queued message that is not held
    /// and has mail to try, at its next due time.
    due: HashSet<(u64, u64)>,
}

/// Creates missing tables, checks the layout version, moves undecodable message
/// records to quarantine, makes the due index and hold marks agree with the
/// envelopes, and totals what is queued. (A missing body is found when the
/// message is next loaded: checking here would read the whole file.)
pub(super) fn prepare(db: &Database, labeler: &Labeler) -> Result<Scan, PrepareError> {
    let txn = db.begin_write()?;
    let mut scan = Scan::default();
    {
        check_schema(&txn)?;
        let mut messages = txn.open_table(MESSAGES)?;
        // Bodies of quarantined records stay where they are, for manual recovery.
        txn.open_table(BODIES)?;
        txn.open_table(BODY_CHUNKS)?;
        let mut due = txn.open_table(DUE)?;
        let mut held = txn.open_table(HELD)?;
        let dead = txn.open_table(DEAD)?;
        let mut quarantine = txn.open_table(QUARANTINE)?;
        txn.open_table(LEARNED)?;
        txn.open_table(GREYLIST)?;
        txn.open_table(GREYLIST_PASSED)?;
        txn.open_table(FETCH_SEEN)?;
        txn.open_table(FETCH_IDS)?;
        txn.open_table(PAUSED)?;

        let queued = scan_messages(&mut scan, &mut messages, &held, &mut quarantine, labeler)?;
        repair_due(&mut scan.repairs, &mut due, queued.due)?;
        scan.repairs.stale_held = remove_stale_held(&mut held, &queued.ids)?;

        scan.quarantined = quarantine.len()?;
        scan.held = held.len()?;
        count_dead(&mut scan, &dead)?;
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

/// Checks the layout version in `meta`, recording the current one in a new
/// file or one of an older layout (whose records still decode).
fn check_schema(txn: &WriteTransaction) -> Result<(), PrepareError> {
    let mut meta = txn.open_table(META)?;
    let found = meta.get("schema")?.map(|v| v.value());
    match found {
        // Earlier layouts differ only by what later layouts added.
        None | Some(1) | Some(2) | Some(3) | Some(4) => {
            meta.insert("schema", SCHEMA)?;
        }
        Some(SCHEMA) => {}
        Some(other) => return Err(PrepareError::Schema(other)),
    }
    Ok(())
}

/// Totals the queued envelopes into `scan`, moves the undecodable ones to
/// quarantine, and returns what the indexes should hold. The due index is
/// derived from the envelopes: each queued message that is not held has
/// exactly one entry, at its next due time.
fn scan_messages(
    scan: &mut Scan,
    messages: &mut Table<u64, &[u8]>,
    held: &Table<u64, ()>,
    quarantine: &mut Table<u64, &[u8]>,
    labeler: &Labeler,
) -> Result<Queued, PrepareError> {
    let mut queued = Queued {
        ids: HashSet::new(),
        due: HashSet::new(),
    };
    let mut bad = Vec::new();
    for row in messages.iter()? {
        let (id, raw) = row?;
        let id = id.value();
        match Envelope::decode(raw.value()) {
            Ok(env) => {
                scan.count_queued(&env, labeler);
                queued.ids.insert(id);
                if let Some(at) = env.next_due_ms()
                    && held.get(id)?.is_none()
                {
                    queued.due.insert((at, id));
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
    Ok(queued)
}

/// Makes the due index hold exactly the `wanted` entries: removes the others
/// and puts back the missing ones, noting both in `repairs`.
fn repair_due(
    repairs: &mut Repairs,
    due: &mut Table<(u64, u64), ()>,
    mut wanted: HashSet<(u64, u64)>,
) -> Result<(), PrepareError> {
    let mut stale_due = Vec::new();
    for row in due.iter()? {
        let (key, _) = row?;
        let key = key.value();
        if !wanted.remove(&key) {
            stale_due.push(key);
        }
    }
    for key in &stale_due {
        due.remove(*key)?;
    }
    let mut restored: Vec<(u64, u64)> = wanted.into_iter().collect();
    restored.sort_unstable_by_key(|&(_, id)| id);
    for key in &restored {
        due.insert(*key, ())?;
    }
    repairs.stale_due = stale_due.into_iter().map(|(_, id)| id).collect();
    repairs.restored_due = restored.into_iter().map(|(_, id)| id).collect();
    Ok(())
}

/// Removes the hold marks of messages that are not `queued`; returns their IDs.
fn remove_stale_held(
    held: &mut Table<u64, ()>,
    queued: &HashSet<u64>,
) -> Result<Vec<u64>, PrepareError> {
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
    Ok(stale_held)
}

/// Counts the dead letters and their bytes into `scan`.
fn count_dead(scan: &mut Scan, dead: &Table<u64, &[u8]>) -> Result<(), PrepareError> {
    for row in dead.iter()? {
        let (_, raw) = row?;
        // An undecodable dead letter stays where it is: it is already aside.
        if let Ok(env) = Envelope::decode(raw.value()) {
            scan.dead += 1;
            scan.bytes += footprint(env.size);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::message;
    use super::super::{BODY_CHUNK, Change, Options, Spool, Stats};
    use super::*;
    use redb::ReadableDatabase;

    #[tokio::test]
    async fn older_layouts_are_upgraded_and_an_unknown_one_refused() {
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
        for old in [1, 2, 3, 4] {
            set_schema(old);
            let spool = Spool::open(&path, 1 << 20).unwrap();
            assert_eq!(spool.envelopes().unwrap().len(), 1);
            assert!(spool.pauses().unwrap().is_empty());
            assert!(spool.fetch_seen("isp").unwrap().is_empty());
            spool.close();
            drop(spool);
        }
        set_schema(SCHEMA + 1);
        let err = Spool::open(&path, 1 << 20).err().unwrap();
        assert!(
            matches!(err, OpenError::Schema { found, .. } if found == SCHEMA + 1),
            "{err}"
        );
    }

    #[tokio::test]
    async fn bodies_of_layout_3_are_read_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let body: Vec<u8> = (0..3000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let spool = Spool::open(&path, 1 << 20).unwrap();
        spool.commit(message(1, &body)).await.unwrap();
        spool.commit(message(2, b"")).await.unwrap();
        spool.close();
        drop(spool);
        {
            // Written in pieces of BODY_CHUNK bytes; made into a spool of
            // layout 3 by moving the first body into the old table.
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut chunks = txn.open_table(BODY_CHUNKS).unwrap();
                let pieces: Vec<Vec<u8>> = chunks
                    .range((1, 0)..=(1, u32::MAX))
                    .unwrap()
                    .map(|r| r.unwrap().1.value().to_vec())
                    .collect();
                assert_eq!(pieces.len(), 3);
                assert!(pieces.iter().all(|p| p.len() <= BODY_CHUNK));
                assert_eq!(pieces.concat(), body);
                for n in 0..3 {
                    chunks.remove((1, n)).unwrap();
                }
                txn.open_table(BODIES)
                    .unwrap()
                    .insert(1, body.as_slice())
                    .unwrap();
                txn.open_table(META).unwrap().insert("schema", 3).unwrap();
            }
            txn.commit().unwrap();
        }
        let spool = Spool::open(&path, 1 << 20).unwrap();
        assert_eq!(spool.body(QueueId(1)).unwrap().as_deref(), Some(&body[..]));
        assert_eq!(spool.body(QueueId(2)).unwrap().as_deref(), Some(&b""[..]));
        for id in [1, 2] {
            spool
                .change(QueueId(id), Change::Delete, Vec::new())
                .await
                .unwrap();
        }
        assert_eq!(spool.body(QueueId(1)).unwrap(), None);
        spool.close();
        drop(spool);
        let db = Database::create(&path).unwrap();
        let txn = db.begin_read().unwrap();
        assert!(txn.open_table(BODIES).unwrap().is_empty().unwrap());
        assert!(txn.open_table(BODY_CHUNKS).unwrap().is_empty().unwrap());
        assert_eq!(
            txn.open_table(META)
                .unwrap()
                .get("schema")
                .unwrap()
                .unwrap()
                .value(),
            SCHEMA
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
        let db = super::super::store::open_file(&path).unwrap();
        let scan = prepare(&db, &Options::new(0).labeler).ok().unwrap();
        assert_eq!(scan.repairs, Repairs::default());
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
                    // Three bodies (one dead) of one piece each.
                    bytes: 3 * footprint(1),
                    held: 1,
                    dead: 1,
                    quarantined: 0
                }
            );
        }
    }
}
