//! One fetch run: log in, list, and for each message not taken before,
//! retrieve it, work out its envelope, commit it to the spool (fsync'd,
//! with the mark that it was taken), and only then delete it on the server.
//! Nothing fetched is dropped: what has no recipient of ours goes to the
//! block's postmaster, what is too big for the spool stays on the server.

use std::collections::HashSet;
use std::net::IpAddr;

use tracing::{info, warn};

use super::envelope::{self, Context, Derived, Verdict};
use super::imap::Imap;
use super::pop3::Pop3;
use super::{FetchError, Listed, Report, net};
use crate::config::{FetchBounce, FetchConfig, FetchProtocol, FetchTls};
use crate::inbound::Inbound;
use crate::inbound::policy::{Policy, Refusal};
use crate::inbound::received::Trace;
use crate::spool::{
    BodyType, Client, Envelope, FetchMark, Notify, QueueId, RcptStatus, Recipient, Ret,
};

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

    async fn delete(&mut self, message: &Listed) -> Result<(), FetchError> {
        match self {
            Mailbox::Pop3(p) => p.delete(message).await,
            Mailbox::Imap(i) => i.delete(message).await,
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
/// stored. Returns the IMAP session to IDLE on, if any.
pub(super) async fn run(
    account: &FetchConfig,
    inbound: &Inbound,
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
    for message in &listed {
        if seen.contains(&message.uid) {
            // Stored before; the deletion did not happen (or was not asked for).
            if account.delete {
                mailbox.delete(message).await?;
            }
            continue;
        }
        if message.size > max_size {
            warn!(account = %account.name, uid = %message.uid, size = message.size,
                "message larger than server.max_message_size left on the server");
            report.left += 1;
            continue;
        }
        let raw = mailbox.retrieve(message).await?;
        report.fetched += 1;
        take(account, inbound, message, raw, mailbox.peer(), report).await?;
        if account.delete {
            mailbox.delete(message).await?;
        }
    }
    let kept = mailbox.finish().await?;
    let listed: HashSet<String> = listed.into_iter().map(|m| m.uid).collect();
    inbound
        .spool
        .fetch_forget(&account.name, listed, inbound.clock.now_ms());
    Ok(kept)
}

/// Stores one fetched message (or, if it is a duplicate, only the mark that
/// it was taken). Returns once it is on disk.
async fn take(
    account: &FetchConfig,
    inbound: &Inbound,
    message: &Listed,
    raw: Vec<u8>,
    peer: Option<IpAddr>,
    report: &mut Report,
) -> Result<(), FetchError> {
    let now_micros = inbound.clock.now_micros();
    let now_ms = now_micros / 1000;
    let duplicate_key = envelope::message_id(&raw).map(|id| format!("<{id}> {}", raw.len()));
    let mark = FetchMark {
        account: account.name.clone(),
        uid: message.uid.clone(),
        duplicate_key: duplicate_key.clone(),
        at_ms: now_ms,
    };
    let spool = &inbound.spool;
    let spool_error = |e: &dyn std::fmt::Display| FetchError::Spool(e.to_string());
    if let Some(key) = &duplicate_key
        && spool
            .fetch_duplicate(key, now_ms)
            .map_err(|e| spool_error(&e))?
    {
        spool
            .commit_fetched(None, mark)
            .await
            .map_err(|e| spool_error(&e))?;
        info!(account = %account.name, uid = %message.uid, message_id = %key,
            "fetched a message stored before: not queued again");
        report.duplicates += 1;
        return Ok(());
    }
    let policy = inbound.policy();
    let cx = Context {
        account: &account.name,
        postmaster: &account.postmaster,
        hostname: &policy.hostname,
        date: (now_ms / 1000) as i64,
    };
    let judge = |address: &str| judge(&policy, account, address);
    let (sender, recipients, content, reason) = match envelope::derive(&raw, &cx, &judge) {
        Derived::Deliver {
            sender,
            recipients,
            body,
        } => (sender, recipients, body, None),
        Derived::Orphan {
            sender,
            reason,
            body,
        } => (sender, vec![account.postmaster.clone()], body, Some(reason)),
        Derived::Unparseable { reason, body } => (
            String::new(),
            vec![account.postmaster.clone()],
            body,
            Some(reason),
        ),
    };
    let id = spool.next_id(now_micros);
    let envelope = fetched_envelope(account, id, sender, &recipients, now_ms, peer);
    let header = trace(account, &policy, &envelope, peer, now_ms);
    let mut body = Vec::with_capacity(header.len() + content.len());
    body.extend_from_slice(header.as_bytes());
    body.extend_from_slice(&content);
    let mut envelope = envelope;
    envelope.has_8bit = body.iter().any(|&b| b >= 0x80);
    if envelope.has_8bit {
        envelope.body_type = BodyType::EightBitMime;
    }
    envelope.size = body.len() as u64;
    let from = envelope.sender.clone();
    inbound
        .enqueue(envelope, body, Some(mark))
        .await
        .map_err(|e| spool_error(&e))?;
    inbound
        .metrics
        .fetched
        .with_label_values(&[&account.name])
        .inc();
    match reason {
        None => {
            report.queued += 1;
            info!(queue_id = %id, account = %account.name, uid = %message.uid, from = %from,
                to = %recipients.join(","), "fetched and queued");
        }
        Some(reason) => {
            report.postmaster += 1;
            info!(queue_id = %id, account = %account.name, uid = %message.uid, from = %from,
                to = %account.postmaster, %reason, "fetched and queued to the postmaster");
        }
    }
    Ok(())
}

/// Whether `address` is a recipient this block delivers to: at one of its
/// domains, and taken by that domain's recipient list (as over SMTP).
fn judge(policy: &Policy, account: &FetchConfig, address: &str) -> Verdict {
    let Some((_, domain)) = address.rsplit_once('@') else {
        return Verdict::Foreign;
    };
    let ours = policy
        .relay_domain(crate::domain::Domain::new(domain).as_str())
        .is_some_and(|relay| account.domains.iter().any(|d| d == relay));
    if !ours {
        return Verdict::Foreign;
    }
    match policy.check_recipient(address) {
        Ok(address) => Verdict::Ours(address),
        Err(Refusal::UnknownUser) => Verdict::Unknown,
        Err(Refusal::Relay | Refusal::Syntax) => Verdict::Foreign,
    }
}

/// The envelope of a fetched message, due now. Its sender came from a
/// header anyone can forge: notices go to the block's postmaster unless
/// `bounce = "sender"` (and never to `<>`).
fn fetched_envelope(
    account: &FetchConfig,
    id: QueueId,
    sender: String,
    recipients: &[String],
    now_ms: u64,
    peer: Option<IpAddr>,
) -> Envelope {
    let notices_to = match account.bounce {
        FetchBounce::Sender if !sender.is_empty() => None,
        _ => Some(account.postmaster.clone()),
    };
    let smtputf8 = !sender.is_ascii() || recipients.iter().any(|r| !r.is_ascii());
    Envelope {
        id,
        sender,
        ret: Ret::Unset,
        envid: None,
        body_type: BodyType::Unset,
        smtputf8,
        has_8bit: false,
        arrived_ms: now_ms,
        size: 0,
        client: Client {
            ip: peer.unwrap_or(IpAddr::from([0, 0, 0, 0])),
            helo: account.host.clone(),
            tls: account.tls != FetchTls::None,
        },
        recipients: recipients
            .iter()
            .map(|address| Recipient {
                address: address.clone(),
                orcpt: None,
                notify: Notify::default(),
                status: RcptStatus::Queued,
                attempts: 0,
                next_attempt_ms: now_ms,
                last_reply: None,
                unreachable: false,
                delay_notified: false,
                suspect: false,
            })
            .collect(),
        notices_to,
    }
}

/// Our `Received:` for the fetch: from the mailbox server, with POP3 or IMAP.
fn trace(
    account: &FetchConfig,
    policy: &Policy,
    envelope: &Envelope,
    peer: Option<IpAddr>,
    now_ms: u64,
) -> String {
    Trace {
        helo: &account.host,
        ip: peer.unwrap_or(envelope.client.ip),
        by: &policy.hostname,
        esmtp: true,
        tls: envelope.client.tls,
        smtputf8: false,
        id: envelope.id,
        only_recipient: match envelope.recipients.as_slice() {
            [only] => Some(only.address.as_str()),
            _ => None,
        },
        date: (now_ms / 1000) as i64,
        fetched_with: Some(match account.protocol {
            FetchProtocol::Pop3 => "POP3",
            FetchProtocol::Imap => "IMAP",
        }),
    }
    .header()
}
