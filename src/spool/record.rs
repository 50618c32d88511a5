//! What the spool stores about a message besides its body: the envelope, with a
//! state per recipient. Records carry a version byte so a future layout can be
//! read beside this one, and anything that does not decode is reported as such
//! (the spool quarantines it) instead of panicking.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::id::QueueId;

/// First byte of every stored envelope.
const VERSION: u8 = 1;

/// RFC 3461 `RET=`: how much of the message a failure notice may include.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ret {
    /// Not given: the notice carries headers only (RFC 3461 §4.3 leaves it to us).
    #[default]
    Unset,
    Full,
    Headers,
}

/// RFC 1652 `BODY=` as the client declared it; the next hop must be told the same.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BodyType {
    #[default]
    Unset,
    SevenBit,
    EightBitMime,
}

/// RFC 3461 `NOTIFY=` as a small bit set; empty means "not given".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notify(pub u8);

impl Notify {
    pub const SUCCESS: u8 = 1;
    pub const FAILURE: u8 = 2;
    pub const DELAY: u8 = 4;
    pub const NEVER: u8 = 8;

    pub fn has(self, flag: u8) -> bool {
        self.0 & flag != 0
    }
}

/// Where a recipient stands. Only `Queued` recipients are ever attempted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RcptStatus {
    Queued,
    Delivered,
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// The forward path as accepted (after relay checks), e.g. `alice@example.com`.
    pub address: String,
    /// RFC 3461 `ORCPT=`, passed on and quoted in DSNs.
    pub orcpt: Option<String>,
    pub notify: Notify,
    pub status: RcptStatus,
    /// Delivery attempts so far; drives the backoff.
    pub attempts: u32,
    /// Unix milliseconds of the next attempt; kept on disk so restarts keep the backoff.
    pub next_attempt_ms: u64,
    /// The last reply from a next hop (or our reason), for `queue show` and DSNs.
    pub last_reply: Option<String>,
    /// The last attempt could not reach the primary at all (connection failure,
    /// timeout, 421): such mail is released the moment the primary answers again,
    /// whatever its backoff says. Mail a live primary deferred keeps its backoff.
    pub unreachable: bool,
    /// A "delayed" DSN was sent for this recipient (at most one is).
    pub delay_notified: bool,
}

/// The SMTP client that handed us the message, for `Received:`, logs and DSNs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Client {
    pub ip: IpAddr,
    pub helo: String,
    pub tls: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: QueueId,
    /// Reverse path; empty for the null sender `<>` (never bounce to it).
    pub sender: String,
    pub ret: Ret,
    /// RFC 3461 `ENVID=`, echoed in DSNs.
    pub envid: Option<String>,
    pub body_type: BodyType,
    /// The client used `SMTPUTF8`; the next hop must offer it too.
    pub smtputf8: bool,
    /// The content has bytes above 127, whatever was declared (RFC 6152 checks).
    pub has_8bit: bool,
    /// Unix milliseconds of acceptance (the 250), for ageing and expiry.
    pub arrived_ms: u64,
    /// Bytes of the stored body, including our `Received:` header.
    pub size: u64,
    pub client: Client,
    pub recipients: Vec<Recipient>,
}

impl Envelope {
    /// When the earliest queued recipient is due, if any recipient is still queued.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.recipients
            .iter()
            .filter(|r| r.status == RcptStatus::Queued)
            .map(|r| r.next_attempt_ms)
            .min()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        // Serialising owned plain data into a Vec cannot fail.
        out.extend(postcard::to_allocvec(self).unwrap_or_default());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
        match bytes.split_first() {
            None => Err(DecodeError::Empty),
            Some((&VERSION, rest)) => {
                postcard::from_bytes(rest).map_err(|e| DecodeError::Malformed(e.to_string()))
            }
            Some((&v, _)) => Err(DecodeError::UnknownVersion(v)),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty record")]
    Empty,
    #[error("unknown record version {0}")]
    UnknownVersion(u8),
    #[error("malformed record: {0}")]
    Malformed(String),
}

#[cfg(test)]
pub(crate) fn sample(id: u64, rcpts: &[&str]) -> Envelope {
    Envelope {
        id: QueueId(id),
        sender: "sender@example.org".into(),
        ret: Ret::Headers,
        envid: Some("env-1".into()),
        body_type: BodyType::EightBitMime,
        smtputf8: false,
        has_8bit: true,
        arrived_ms: 1_000,
        size: 0,
        client: Client {
            ip: "192.0.2.7".parse().unwrap(),
            helo: "client.example.org".into(),
            tls: false,
        },
        recipients: rcpts
            .iter()
            .map(|a| Recipient {
                address: (*a).into(),
                orcpt: Some(format!("rfc822;{a}")),
                notify: Notify(Notify::FAILURE | Notify::DELAY),
                status: RcptStatus::Queued,
                attempts: 0,
                next_attempt_ms: 1_000,
                last_reply: None,
                unreachable: false,
                delay_notified: false,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let env = sample(42, &["a@example.com", "b@example.com"]);
        assert_eq!(Envelope::decode(&env.encode()), Ok(env));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let good = sample(42, &["a@example.com"]).encode();
        assert_eq!(Envelope::decode(&[]), Err(DecodeError::Empty));
        assert_eq!(
            Envelope::decode(&[9, 1, 2]),
            Err(DecodeError::UnknownVersion(9))
        );
        for cut in 1..good.len() {
            assert!(
                Envelope::decode(&good[..cut]).is_err(),
                "prefix {cut} decoded"
            );
        }
        assert!(matches!(
            Envelope::decode(&[VERSION, 0xff, 0xff, 0xff]),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn next_due_ignores_finished_recipients() {
        let mut env = sample(1, &["a@example.com", "b@example.com"]);
        env.recipients[0].next_attempt_ms = 50;
        env.recipients[1].next_attempt_ms = 80;
        assert_eq!(env.next_due_ms(), Some(50));
        env.recipients[0].status = RcptStatus::Delivered;
        assert_eq!(env.next_due_ms(), Some(80));
        env.recipients[1].status = RcptStatus::Failed;
        assert_eq!(env.next_due_ms(), None);
    }
}
