//! The spool's tables inside one write transaction, and every change the
//! writer makes to them: a new message, an edit of one (release, unbury,
//! delete, quarantine, a delivery's outcome), learned verdicts and pauses,
//! each keeping the running totals' delta. The writer (`writer.rs`) decides
//! batching and durability; this file decides what a job writes.

use redb::{ReadableTable, Table, WriteTransaction};

use super::writer::{Change, Delta, Finished, Job, Labeler, Pending, io};
use super::{
    BODIES, BODY_CHUNK, BODY_CHUNKS, CommitError, DEAD, DUE, Envelope, FETCH_IDS, FETCH_SEEN,
    FetchMark, GREYLIST, GREYLIST_PASSED, GreyWrite, HELD, LEARNED, MESSAGES, NewMessage, PAUSED,
    Pause, QUARANTINE, QueueId, RcptStatus, footprint,
};

/// Message bodies: written in pieces (see [`BODY_CHUNKS`]); removal also
/// clears a body of an older layout, kept whole in `bodies`.
struct Bodies<'t> {
    chunks: Table<'t, (u64, u32), &'static [u8]>,
    legacy: Table<'t, u64, &'static [u8]>,
}

impl Bodies<'_> {
    fn insert(&mut self, id: u64, body: &[u8]) -> Result<(), redb::Error> {
        if body.is_empty() {
            // One empty piece: an empty body is not a missing one.
            self.chunks.insert((id, 0), &[][..])?;
        }
        for (n, piece) in body.chunks(BODY_CHUNK).enumerate() {
            self.chunks.insert((id, n as u32), piece)?;
        }
        Ok(())
    }

    fn remove(&mut self, id: u64) -> Result<(), redb::Error> {
        // One walk over the message's pieces, not a descent per piece.
        self.chunks
            .retain_in((id, 0)..=(id, u32::MAX), |_, _| false)?;
        self.legacy.remove(id)?;
        Ok(())
    }
}

pub(super) struct Tables<'t, 'l> {
    labeler: &'l Labeler,
    messages: Table<'t, u64, &'static [u8]>,
    bodies: Bodies<'t>,
    due: Table<'t, (u64, u64), ()>,
    held: Table<'t, u64, ()>,
    dead: Table<'t, u64, &'static [u8]>,
    quarantine: Table<'t, u64, &'static [u8]>,
    learned: Table<'t, &'static str, (bool, u64)>,
    greylist: Table<'t, &'static str, u64>,
    greylist_passed: Table<'t, &'static str, u64>,
    paused: Table<'t, &'static str, (u8, u64)>,
    fetch_seen: Table<'t, &'static str, u64>,
    fetch_ids: Table<'t, &'static str, u64>,
}

impl<'t, 'l> Tables<'t, 'l> {
    pub(super) fn open(
        txn: &'t WriteTransaction,
        labeler: &'l Labeler,
    ) -> Result<Self, redb::Error> {
        Ok(Tables {
            labeler,
            messages: txn.open_table(MESSAGES)?,
            bodies: Bodies {
                chunks: txn.open_table(BODY_CHUNKS)?,
                legacy: txn.open_table(BODIES)?,
            },
            due: txn.open_table(DUE)?,
            held: txn.open_table(HELD)?,
            dead: txn.open_table(DEAD)?,
            quarantine: txn.open_table(QUARANTINE)?,
            learned: txn.open_table(LEARNED)?,
            greylist: txn.open_table(GREYLIST)?,
            greylist_passed: txn.open_table(GREYLIST_PASSED)?,
            paused: txn.open_table(PAUSED)?,
            fetch_seen: txn.open_table(FETCH_SEEN)?,
            fetch_ids: txn.open_table(FETCH_IDS)?,
        })
    }
}

impl Tables<'_, '_> {
    /// Applies the batch's jobs in order, each outcome into `pending`, with
    /// `room` body bytes left under `spool.max_size`. Returns the storage error
    /// that dooms the transaction, if any: the jobs after it are not applied
    /// (their pending become that error when it is reported).
    pub(super) fn apply_jobs(
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
                Job::Grey(write) => {
                    if failure.is_none() {
                        failure = self.grey(write).err().map(io);
                    }
                }
                Job::Fetched {
                    message,
                    mark,
                    done,
                } => {
                    let r = if failure.is_some() {
                        Ok(())
                    } else {
                        self.fetched(message.as_deref(), &mark, &mut room, delta)
                    };
                    if let Err(CommitError::Io(e)) = &r {
                        failure = Some(CommitError::Io(e.clone()));
                    }
                    pending.push(Pending::Commit(done, r));
                }
                Job::FetchForget {
                    prefix,
                    listed,
                    ids_before,
                } => {
                    if failure.is_none() {
                        failure = self
                            .fetch_forget(&prefix, &listed, ids_before)
                            .err()
                            .map(io);
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
        let size = footprint(message.envelope.size);
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

    /// A fetched message (if not a duplicate) and its mark: both or neither.
    fn fetched(
        &mut self,
        message: Option<&NewMessage>,
        mark: &FetchMark,
        room: &mut u64,
        delta: &mut Delta,
    ) -> Result<(), CommitError> {
        if let Some(message) = message {
            self.commit(message, room, delta)?;
        }
        self.fetch_seen
            .insert(mark.seen_key().as_str(), mark.at_ms)
            .map_err(|e| io(e.into()))?;
        if let Some(key) = &mark.duplicate_key {
            self.fetch_ids
                .insert(key.as_str(), mark.at_ms)
                .map_err(|e| io(e.into()))?;
        }
        Ok(())
    }

    fn fetch_forget(
        &mut self,
        prefix: &str,
        listed: &std::collections::HashSet<String>,
        ids_before: u64,
    ) -> Result<(), redb::Error> {
        self.fetch_seen
            .retain(|key, _| !key.starts_with(prefix) || listed.contains(key))?;
        self.fetch_ids.retain(|_, at| at >= ids_before)?;
        Ok(())
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

    fn grey(&mut self, write: GreyWrite) -> Result<(), redb::Error> {
        match write {
            GreyWrite::Seen { triplet, at_ms } => {
                self.greylist.insert(triplet.as_str(), at_ms)?;
            }
            GreyWrite::Passed {
                triplet,
                network,
                at_ms,
            } => {
                if let Some(triplet) = triplet {
                    self.greylist.remove(triplet.as_str())?;
                }
                self.greylist_passed.insert(network.as_str(), at_ms)?;
            }
            GreyWrite::Sweep {
                seen_before,
                passed_before,
            } => {
                self.greylist.retain(|_, at| at >= seen_before)?;
                self.greylist_passed.retain(|_, at| at >= passed_before)?;
            }
        }
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
        self.bodies.insert(env.id.0, &message.body)?;
        if let Some(at) = env.next_due_ms() {
            self.due.insert((at, env.id.0), ())?;
        }
        delta.queue(env, self.labeler, 1);
        delta.bytes += footprint(env.size) as i64;
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
        self.remove_body(env, delta)
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
        self.remove_body(env, delta)
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
    /// Removes `env`'s body and gives its space back to the totals.
    fn remove_body(&mut self, env: &Envelope, delta: &mut Delta) -> Result<(), redb::Error> {
        self.bodies.remove(env.id.0)?;
        delta.bytes -= footprint(env.size) as i64;
        Ok(())
    }

    fn store(&mut self, env: &Envelope, held: bool, delta: &mut Delta) -> Result<(), redb::Error> {
        let id = env.id.0;
        match env.next_due_ms() {
            None => {
                self.messages.remove(id)?;
                self.remove_body(env, delta)?;
                if held {
                    self.held.remove(id)?;
                    delta.held -= 1;
                }
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
