//! The spool's read side: what is queued, due, held, dead or quarantined, what
//! was learned and paused, and the running totals. Every read is one redb
//! snapshot (MVCC), so readers never wait for the writer and never write.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use redb::{ReadableTable, TableDefinition};

use super::{
    BODIES, BODY_CHUNKS, DEAD, DUE, Envelope, FETCH_IDS, FETCH_SEEN, GREYLIST, GREYLIST_PASSED,
    HELD, LEARNED, LearnedRow, MESSAGES, PAUSED, Page, Pause, QUARANTINE, QueueId, ReadError,
    Spool, Stats, read_err,
};

impl Spool {
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
    /// recipient waiting there, and the arrival time (unix ms, to the
    /// second) of the oldest.
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

    /// Greylisting's state: every triplet with its first attempt, and every
    /// client network that passed with when it last did (Unix ms).
    #[allow(clippy::type_complexity)]
    pub fn greylist_all(&self) -> Result<(Vec<(String, u64)>, Vec<(String, u64)>), ReadError> {
        let txn = self.inner.db.begin_read()?;
        let mut out = (Vec::new(), Vec::new());
        for (definition, rows) in [(GREYLIST, &mut out.0), (GREYLIST_PASSED, &mut out.1)] {
            let table = txn.open_table(definition).map_err(read_err)?;
            for row in table.iter().map_err(read_err)? {
                let (key, at) = row.map_err(read_err)?;
                rows.push((key.value().to_owned(), at.value()));
            }
        }
        Ok(out)
    }

    /// The message uids of fetch `account` already stored.
    pub fn fetch_seen(&self, account: &str) -> Result<HashSet<String>, ReadError> {
        let txn = self.inner.db.begin_read()?;
        let table = txn.open_table(FETCH_SEEN).map_err(read_err)?;
        let prefix = super::seen_key(account, "");
        let mut seen = HashSet::new();
        for row in table.range(prefix.as_str()..).map_err(read_err)? {
            let (key, _) = row.map_err(read_err)?;
            match key.value().strip_prefix(prefix.as_str()) {
                Some(uid) => seen.insert(uid.to_owned()),
                None => break,
            };
        }
        Ok(seen)
    }

    /// Whether a fetched message with this duplicate key ("Message-ID size")
    /// was stored within [`super::FETCH_DUPLICATE_WINDOW`] of `now_ms`.
    pub fn fetch_duplicate(&self, key: &str, now_ms: u64) -> Result<bool, ReadError> {
        let txn = self.inner.db.begin_read()?;
        let table = txn.open_table(FETCH_IDS).map_err(read_err)?;
        let window = super::FETCH_DUPLICATE_WINDOW.as_millis() as u64;
        Ok(table
            .get(key)
            .map_err(read_err)?
            .is_some_and(|at| at.value().saturating_add(window) >= now_ms))
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
        let chunks = txn.open_table(BODY_CHUNKS).map_err(read_err)?;
        let mut body: Option<Vec<u8>> = None;
        for piece in chunks
            .range((id.0, 0)..=(id.0, u32::MAX))
            .map_err(read_err)?
        {
            let (_, piece) = piece.map_err(read_err)?;
            body.get_or_insert_with(Vec::new)
                .extend_from_slice(piece.value());
        }
        if body.is_some() {
            return Ok(body);
        }
        // Stored by a spool of layout 3 or before.
        let legacy = txn.open_table(BODIES).map_err(read_err)?;
        Ok(legacy
            .get(id.0)
            .map_err(read_err)?
            .map(|v| v.value().to_vec()))
    }

    /// Every queued envelope in ID (arrival) order; undecodable ones are skipped
    /// (they were quarantined at open and cannot appear later).
    pub fn envelopes(&self) -> Result<Vec<Envelope>, ReadError> {
        self.decodable(MESSAGES)
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
        self.decodable(DEAD)
    }

    /// Calls `f` with every queued envelope in ID (arrival) order, one at a
    /// time from one snapshot: a million-message queue is read without being
    /// held in memory.
    pub fn each_envelope(&self, f: &mut dyn FnMut(Envelope)) -> Result<(), ReadError> {
        self.each_in(MESSAGES, f)
    }

    /// Every envelope of `table` (queue or dead letters) in ID order, skipping
    /// any that does not decode.
    fn decodable(&self, table: TableDefinition<u64, &[u8]>) -> Result<Vec<Envelope>, ReadError> {
        let mut out = Vec::new();
        self.each_in(table, &mut |env| out.push(env))?;
        Ok(out)
    }

    /// Calls `f` with every envelope of `table` that decodes, in ID order.
    fn each_in(
        &self,
        table: TableDefinition<u64, &[u8]>,
        f: &mut dyn FnMut(Envelope),
    ) -> Result<(), ReadError> {
        let txn = self.inner.db.begin_read()?;
        let table = txn.open_table(table).map_err(read_err)?;
        for row in table.iter().map_err(read_err)? {
            let (_, raw) = row.map_err(read_err)?;
            if let Ok(env) = Envelope::decode(raw.value()) {
                f(env);
            }
        }
        Ok(())
    }

    /// One page of the queue in ID (arrival) order: up to `limit` messages
    /// after `after` that `keep` (given the envelope and whether it is held)
    /// accepts, read from one snapshot without loading the rest. With
    /// `count`, the whole queue is scanned to count every match as well.
    pub fn page(
        &self,
        after: Option<QueueId>,
        limit: usize,
        count: bool,
        keep: &mut dyn FnMut(&Envelope, bool) -> bool,
    ) -> Result<Page, ReadError> {
        let txn = self.inner.db.begin_read()?;
        let messages = txn.open_table(MESSAGES).map_err(read_err)?;
        let held = txn.open_table(HELD).map_err(read_err)?;
        let start = match (count, after) {
            (false, Some(id)) => id.0.saturating_add(1),
            _ => 0,
        };
        let mut page = Page::default();
        let mut matched = 0u64;
        for row in messages.range(start..).map_err(read_err)? {
            let (id, raw) = row.map_err(read_err)?;
            let id = QueueId(id.value());
            let Ok(env) = Envelope::decode(raw.value()) else {
                continue;
            };
            let is_held = held.get(id.0).map_err(read_err)?.is_some();
            if !keep(&env, is_held) {
                continue;
            }
            matched += 1;
            if after.is_some_and(|a| id <= a) {
                continue;
            }
            if page.items.len() == limit {
                page.next = page.items.last().map(|(e, _)| e.id);
                if !count {
                    break;
                }
                continue;
            }
            page.items.push((env, is_held));
        }
        page.matched = count.then_some(matched);
        Ok(page)
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
}

#[cfg(test)]
mod tests {
    use super::super::tests::two_messages;
    use super::super::{Change, Finished, PARKED};
    use super::*;

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
}
