//! One fetch run: log in, list, and for each message not taken before,
//! retrieve it and take it (`take`: its envelope, the commit with the mark
//! that it was taken); only once its commit is on disk is it deleted on the
//! server. Nothing fetched is dropped: what has no recipient of ours goes to
//! the block's postmaster, what is too big for the spool stays on the server.
//!
//! Retrieval and commits overlap: up to [`IN_FLIGHT`] commits are under way
//! while the next messages are retrieved, so a remote mailbox is read at the
//! speed of the link and the spool shares fsyncs between them. Deletions go
//! at the end of the run, in one batch, for what was committed.

use std::collections::{HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tracing::warn;

use super::imap::Imap;
use super::pop3::Pop3;
use super::take::{Taken, duplicate_key, take};
use super::{FetchError, Listed, Report, net};
use crate::config::{FetchConfig, FetchProtocol};
use crate::inbound::Inbound;

/// Commits under way at once in a run.
const IN_FLIGHT: usize = 16;

/// A logged-in mailbox of either protocol.
pub(super) enum Mailbox {
    Pop3(Pop3),
    Imap(Imap),
}

impl Mailbox {
    pub(super) async fn open(account: &FetchConfig, max_size: u64) -> Result<Mailbox, FetchError> {
        let password = net::password(account)?;
        Ok(match account.protocol {
            FetchProtocol::Pop3 => Mailbox::Pop3(Pop3::open(account, &password, max_size).await?),
            FetchProtocol::Imap => Mailbox::Imap(Imap::open(account, &password).await?),
        })
    }

    fn peer(&self) -> Option<IpAddr> {
        match self {
            Mailbox::Pop3(p) => p.peer,
            Mailbox::Imap(i) => i.peer,
        }
    }

    async fn list(&mut self) -> Result<Vec<Listed>, FetchError> {
        match self {
            Mailbox::Pop3(p) => p.list().await,
            Mailbox::Imap(i) => i.list().await,
        }
    }

    async fn retrieve(&mut self, message: &Listed) -> Result<Vec<u8>, FetchError> {
        match self {
            Mailbox::Pop3(p) => p.retrieve(message).await,
            Mailbox::Imap(i) => i.retrieve(message).await,
        }
    }

    async fn delete(&mut self, messages: &[Listed]) -> Result<(), FetchError> {
        match self {
            Mailbox::Pop3(p) => p.delete(messages).await,
            Mailbox::Imap(i) => i.delete(messages).await,
        }
    }

    /// Ends the run: POP3 QUIT (the deletions take effect); IMAP expunges,
    /// and its session is kept for IDLE when the server offers it.
    async fn finish(self) -> Result<Option<Imap>, FetchError> {
        match self {
            Mailbox::Pop3(p) => p.quit().await.map(|()| None),
            Mailbox::Imap(mut i) if i.idle => i.expunge().await.map(|()| Some(i)),
            Mailbox::Imap(i) => i.close().await.map(|()| None),
        }
    }
}

/// One run over `mailbox` (a kept IMAP session, or a new login). Counts into
/// `report` as it goes, so a run that fails half-way still says what it
/// stored (and deletes what it committed). Returns the IMAP session to IDLE
/// on, if any.
pub(super) async fn run(
    account: &Arc<FetchConfig>,
    inbound: &Arc<Inbound>,
    mailbox: Option<Imap>,
    report: &mut Report,
) -> Result<Option<Imap>, FetchError> {
    let max_size = inbound.policy().max_message_size;
    let mut mailbox = match mailbox {
        Some(imap) => Mailbox::Imap(imap),
        None => Mailbox::open(account, max_size).await?,
    };
    let listed = mailbox.list().await?;
    let seen = inbound
        .spool
        .fetch_seen(&account.name)
        .map_err(|e| FetchError::Spool(e.to_string()))?;
    let mut batch = Batch::default();
    let failure = take_all(
        account,
        inbound,
        &mut mailbox,
        &listed,
        &seen,
        &mut batch,
        report,
    )
    .await
    .err();
    let failure = batch.settle_all(report).await.err().or(failure);
    if account.delete && !batch.committed.is_empty() {
        let deleted = mailbox.delete(&batch.committed).await;
        if let Err(e) = deleted {
            return Err(failure.unwrap_or(e));
        }
    }
    if let Some(e) = failure {
        // POP3: the QUIT makes the deletions of what was committed real.
        let _ = mailbox.finish().await;
        return Err(e);
    }
    let kept = mailbox.finish().await?;
    let listed: HashSet<String> = listed.into_iter().map(|m| m.uid).collect();
    inbound
        .spool
        .fetch_forget(&account.name, listed, inbound.clock.now_ms());
    Ok(kept)
}

/// Retrieves every listed message not taken before and starts its take,
/// keeping at most [`IN_FLIGHT`] under way. Stops at the first failure.
async fn take_all(
    account: &Arc<FetchConfig>,
    inbound: &Arc<Inbound>,
    mailbox: &mut Mailbox,
    listed: &[Listed],
    seen: &HashSet<String>,
    batch: &mut Batch,
    report: &mut Report,
) -> Result<(), FetchError> {
    let max_size = inbound.policy().max_message_size;
    let mut keys = HashSet::new();
    for message in listed {
        if seen.contains(&message.uid) {
            // Stored before; the deletion did not happen (or was not asked for).
            batch.committed.push(message.clone());
            continue;
        }
        if message.size > max_size {
            warn!(account = %account.name, uid = %message.uid, size = message.size,
                "message larger than server.max_message_size left on the server");
            report.left += 1;
            continue;
        }
        if batch.in_flight.len() >= IN_FLIGHT {
            batch.settle_one(report).await?;
        }
        let raw = mailbox.retrieve(message).await?;
        report.fetched += 1;
        // A second copy in the same run waits for the first to be on disk,
        // and then finds it there.
        let key = duplicate_key(&raw);
        if key.as_ref().is_some_and(|key| !keys.insert(key.clone())) {
            batch.settle_all(report).await?;
        }
        let task = tokio::spawn(take(
            account.clone(),
            inbound.clone(),
            message.clone(),
            (raw, key),
            mailbox.peer(),
        ));
        batch.in_flight.push_back((message.clone(), task));
    }
    Ok(())
}

/// The takes under way, and the messages whose commit is on disk.
#[derive(Default)]
struct Batch {
    in_flight: VecDeque<(Listed, JoinHandle<Result<Taken, FetchError>>)>,
    committed: Vec<Listed>,
}

impl Batch {
    /// Waits for the oldest take and counts it.
    async fn settle_one(&mut self, report: &mut Report) -> Result<(), FetchError> {
        let Some((message, task)) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let taken = task
            .await
            .map_err(|e| FetchError::Spool(format!("the commit task failed: {e}")))??;
        match taken {
            Taken::Queued => report.queued += 1,
            Taken::Postmaster => report.postmaster += 1,
            Taken::Duplicate => report.duplicates += 1,
        }
        self.committed.push(message);
        Ok(())
    }

    /// Waits for every take under way; the first failure, if any.
    async fn settle_all(&mut self, report: &mut Report) -> Result<(), FetchError> {
        let mut failure = None;
        while !self.in_flight.is_empty() {
            if let Err(e) = self.settle_one(report).await {
                failure.get_or_insert(e);
            }
        }
        failure.map_or(Ok(()), Err)
    }
}
