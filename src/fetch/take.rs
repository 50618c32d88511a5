//! Taking one fetched message: its envelope worked out from the message
//! (see [`super::envelope`]), our `Received:` on top, and the commit to the
//! spool together with the mark that it was taken. A message already
//! stored (same Message-ID and size within the duplicate window) only gets
//! its mark.

use std::net::IpAddr;
use std::sync::Arc;

use tracing::info;

use super::envelope::{self, Context, Derived, Verdict};
use super::{FetchError, Listed};
use crate::config::{FetchBounce, FetchConfig, FetchProtocol, FetchTls};
use crate::inbound::Inbound;
use crate::inbound::policy::{Policy, Refusal};
use crate::inbound::received::Trace;
use crate::spool::{BodyType, Client, Envelope, FetchMark, QueueId, Recipient, Ret};

/// Where a taken message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Taken {
    Queued,
    Postmaster,
    Duplicate,
}

/// The duplicate key of a fetched message: its Message-ID and size.
pub(super) fn duplicate_key(raw: &[u8]) -> Option<String> {
    envelope::message_id(raw).map(|id| format!("<{id}> {}", raw.len()))
}

/// Stores one fetched message (`raw`, with its [`duplicate_key`]) (or, if it is a duplicate, only the mark that
/// it was taken). Returns once it is on disk.
pub(super) async fn take(
    account: Arc<FetchConfig>,
    inbound: Arc<Inbound>,
    message: Listed,
    (raw, duplicate_key): (Vec<u8>, Option<String>),
    peer: Option<IpAddr>,
) -> Result<Taken, FetchError> {
    let account = account.as_ref();
    let now_micros = inbound.clock.now_micros();
    let now_ms = now_micros / 1000;
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
        return Ok(Taken::Duplicate);
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
    Ok(match reason {
        None => {
            info!(queue_id = %id, account = %account.name, uid = %message.uid, from = %from,
                to = %recipients.join(","), "fetched and queued");
            Taken::Queued
        }
        Some(reason) => {
            info!(queue_id = %id, account = %account.name, uid = %message.uid, from = %from,
                to = %account.postmaster, %reason, "fetched and queued to the postmaster");
            Taken::Postmaster
        }
    })
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
        envid_xtext: None,
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
            .map(|address| Recipient::queued(address.clone(), now_ms))
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
