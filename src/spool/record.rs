//! What the spool stores about a message besides its body: the envelope, with a
//! state per recipient. Records carry a version byte so an older layout is
//! still read beside this one (layout 1 lacked [`Recipient::suspect`], layout
//! 2 [`Envelope::notices_to`], layout 3 [`Envelope::envid_xtext`] and
//! [`Recipient::orcpt_xtext`]), and
//! anything that does not decode is reported as such (the spool quarantines
//! it) instead of panicking. Also the record of a paused relay domain.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::id::QueueId;

/// First byte of every stored envelope.
const VERSION: u8 = 4;
/// The layout before the DSN parameters as received: still read, never written.
const VERSION_3: u8 = 3;
/// The layout before [`Envelope::notices_to`]: still read, never written.
const VERSION_2: u8 = 2;
/// The layout before [`Recipient::suspect`]: still read, never written.
const VERSION_1: u8 = 1;

/// `next_attempt_ms` of a recipient whose domain is paused: later than any
/// real time, so the due index never hands it out and expiry never judges it
/// until a resume makes it due again.
pub const PARKED: u64 = u64::MAX;

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
    /// RFC 3461 `ORCPT=`, decoded and without its address type: quoted in DSNs.
    pub orcpt: Option<String>,
    /// The `ORCPT=` value exactly as received (`rfc822;` and xtext), passed
    /// on as it is (RFC 3461 §5.2.1); `None` for records from before layout
    /// 4 and for values that did not decode to `orcpt`: then `orcpt` is
    /// encoded afresh.
    pub orcpt_xtext: Option<String>,
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
    /// The primary refused this recipient permanently while its domain was
    /// paused (see `scheduler::guard`): the refusal is kept in `last_reply`
    /// instead of being bounced, for an operator to judge. The next attempt's
    /// result replaces it.
    pub suspect: bool,
}

impl Recipient {
    /// A recipient not yet attempted, due at `next_attempt_ms`, with no DSN
    /// parameters.
    pub fn queued(address: String, next_attempt_ms: u64) -> Recipient {
        Recipient {
            address,
            orcpt: None,
            orcpt_xtext: None,
            notify: Notify::default(),
            status: RcptStatus::Queued,
            attempts: 0,
            next_attempt_ms,
            last_reply: None,
            unreachable: false,
            delay_notified: false,
            suspect: false,
        }
    }
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
    /// RFC 3461 `ENVID=`, decoded: echoed in DSNs.
    pub envid: Option<String>,
    /// The `ENVID=` value exactly as received (xtext), passed on as it is
    /// (RFC 3461 §5.2.1); `None` as for [`Recipient::orcpt_xtext`].
    pub envid_xtext: Option<String>,
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
    /// Where notices about this message go instead of its sender. Set for
    /// mail fetched from a mailbox, whose sender came from a header anyone
    /// can forge: the fetch block's postmaster.
    pub notices_to: Option<String>,
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
        let malformed = |e: postcard::Error| DecodeError::Malformed(e.to_string());
        match bytes.split_first() {
            None => Err(DecodeError::Empty),
            Some((&VERSION, rest)) => postcard::from_bytes(rest).map_err(malformed),
            Some((&VERSION_3, rest)) => postcard::from_bytes::<v3::Envelope>(rest)
                .map(Envelope::from)
                .map_err(malformed),
            Some((&VERSION_2, rest)) => postcard::from_bytes::<v2::Envelope>(rest)
                .map(|old| Envelope::from(v3::Envelope::from(old)))
                .map_err(malformed),
            Some((&VERSION_1, rest)) => postcard::from_bytes::<v1::Envelope>(rest)
                .map(|old| Envelope::from(v3::Envelope::from(v2::Envelope::from(old))))
                .map_err(malformed),
            Some((&v, _)) => Err(DecodeError::UnknownVersion(v)),
        }
    }
}

/// Layout 3, as spools written before the DSN parameters were kept as
/// received hold it: no `envid_xtext`, no `orcpt_xtext`.
mod v3 {
    use serde::{Deserialize, Serialize};

    use super::{BodyType, Client, Notify, QueueId, RcptStatus, Ret};

    #[derive(Serialize, Deserialize)]
    pub struct Recipient {
        pub address: String,
        pub orcpt: Option<String>,
        pub notify: Notify,
        pub status: RcptStatus,
        pub attempts: u32,
        pub next_attempt_ms: u64,
        pub last_reply: Option<String>,
        pub unreachable: bool,
        pub delay_notified: bool,
        pub suspect: bool,
    }

    #[derive(Serialize, Deserialize)]
    pub struct Envelope {
        pub id: QueueId,
        pub sender: String,
        pub ret: Ret,
        pub envid: Option<String>,
        pub body_type: BodyType,
        pub smtputf8: bool,
        pub has_8bit: bool,
        pub arrived_ms: u64,
        pub size: u64,
        pub client: Client,
        pub recipients: Vec<Recipient>,
        pub notices_to: Option<String>,
    }
}

impl From<v3::Recipient> for Recipient {
    fn from(old: v3::Recipient) -> Recipient {
        Recipient {
            address: old.address,
            orcpt: old.orcpt,
            orcpt_xtext: None,
            notify: old.notify,
            status: old.status,
            attempts: old.attempts,
            next_attempt_ms: old.next_attempt_ms,
            last_reply: old.last_reply,
            unreachable: old.unreachable,
            delay_notified: old.delay_notified,
            suspect: old.suspect,
        }
    }
}

impl From<v3::Envelope> for Envelope {
    fn from(old: v3::Envelope) -> Envelope {
        Envelope {
            id: old.id,
            sender: old.sender,
            ret: old.ret,
            envid: old.envid,
            envid_xtext: None,
            body_type: old.body_type,
            smtputf8: old.smtputf8,
            has_8bit: old.has_8bit,
            arrived_ms: old.arrived_ms,
            size: old.size,
            client: old.client,
            recipients: old.recipients.into_iter().map(Recipient::from).collect(),
            notices_to: old.notices_to,
        }
    }
}

/// Layout 2, as spools written before mailbox fetch hold it: recipients as
/// in layout 3, no `notices_to`.
mod v2 {
    use serde::{Deserialize, Serialize};

    use super::v3::Recipient;
    use super::{BodyType, Client, QueueId, Ret};

    #[derive(Serialize, Deserialize)]
    pub struct Envelope {
        pub id: QueueId,
        pub sender: String,
        pub ret: Ret,
        pub envid: Option<String>,
        pub body_type: BodyType,
        pub smtputf8: bool,
        pub has_8bit: bool,
        pub arrived_ms: u64,
        pub size: u64,
        pub client: Client,
        pub recipients: Vec<Recipient>,
    }
}

impl From<v2::Envelope> for v3::Envelope {
    fn from(old: v2::Envelope) -> v3::Envelope {
        v3::Envelope {
            id: old.id,
            sender: old.sender,
            ret: old.ret,
            envid: old.envid,
            body_type: old.body_type,
            smtputf8: old.smtputf8,
            has_8bit: old.has_8bit,
            arrived_ms: old.arrived_ms,
            size: old.size,
            client: old.client,
            recipients: old.recipients,
            notices_to: None,
        }
    }
}

/// Layout 1, as spools written before the drain guard hold it: no `suspect`
/// recipients, no `notices_to`. Postcard records are not self-describing,
/// so each old shape is spelled out, and each converts to the next layout
/// only: a new layout adds one conversion, not one per old layout.
mod v1 {
    use serde::{Deserialize, Serialize};

    use super::{BodyType, Client, Notify, QueueId, RcptStatus, Ret};

    #[derive(Serialize, Deserialize)]
    pub struct Recipient {
        pub address: String,
        pub orcpt: Option<String>,
        pub notify: Notify,
        pub status: RcptStatus,
        pub attempts: u32,
        pub next_attempt_ms: u64,
        pub last_reply: Option<String>,
        pub unreachable: bool,
        pub delay_notified: bool,
    }

    #[derive(Serialize, Deserialize)]
    pub struct Envelope {
        pub id: QueueId,
        pub sender: String,
        pub ret: Ret,
        pub envid: Option<String>,
        pub body_type: BodyType,
        pub smtputf8: bool,
        pub has_8bit: bool,
        pub arrived_ms: u64,
        pub size: u64,
        pub client: Client,
        pub recipients: Vec<Recipient>,
    }
}

impl From<v1::Envelope> for v2::Envelope {
    fn from(old: v1::Envelope) -> v2::Envelope {
        v2::Envelope {
            id: old.id,
            sender: old.sender,
            ret: old.ret,
            envid: old.envid,
            body_type: old.body_type,
            smtputf8: old.smtputf8,
            has_8bit: old.has_8bit,
            arrived_ms: old.arrived_ms,
            size: old.size,
            client: old.client,
            recipients: old
                .recipients
                .into_iter()
                .map(|r| v3::Recipient {
                    address: r.address,
                    orcpt: r.orcpt,
                    notify: r.notify,
                    status: r.status,
                    attempts: r.attempts,
                    next_attempt_ms: r.next_attempt_ms,
                    last_reply: r.last_reply,
                    unreachable: r.unreachable,
                    delay_notified: r.delay_notified,
                    suspect: false,
                })
                .collect(),
        }
    }
}

/// Who paused delivery to a relay domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PausedBy {
    /// By hand (`mxspool queue pause`, the admin API), e.g. before maintenance.
    Operator,
    /// The drain guard, after a run of permanent refusals from the primary.
    Guard,
}

/// A paused relay domain: nothing is delivered to it until it is resumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pause {
    pub by: PausedBy,
    /// Unix milliseconds.
    pub since_ms: u64,
}

impl Pause {
    /// The stored row: (who: 0 operator, 1 guard; since).
    pub(super) fn to_row(self) -> (u8, u64) {
        let by = match self.by {
            PausedBy::Operator => 0,
            PausedBy::Guard => 1,
        };
        (by, self.since_ms)
    }

    /// A stored row. An unknown `by` still pauses, as an operator's pause:
    /// reading a damaged row as "not paused" could bounce the backlog.
    pub(super) fn from_row((by, since_ms): (u8, u64)) -> Pause {
        Pause {
            by: if by == 1 {
                PausedBy::Guard
            } else {
                PausedBy::Operator
            },
            since_ms,
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

/// Envelopes for unit tests: one plain envelope (no DSN parameters, 7-bit,
/// recipients queued and due at 0) that each test adjusts, instead of the
/// whole literal in every test module.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// Message 1 from `sender` to `rcpts`.
    pub(crate) fn envelope(sender: &str, rcpts: &[&str]) -> Envelope {
        Envelope {
            id: QueueId(1),
            sender: sender.into(),
            ret: Ret::Unset,
            envid: None,
            envid_xtext: None,
            body_type: BodyType::Unset,
            smtputf8: false,
            has_8bit: false,
            arrived_ms: 0,
            size: 0,
            client: Client {
                ip: "192.0.2.7".parse().unwrap(),
                helo: "client.example.org".into(),
                tls: false,
            },
            recipients: rcpts.iter().map(|a| recipient(a)).collect(),
            notices_to: None,
        }
    }

    /// A queued recipient, due at 0, with no DSN parameters.
    pub(crate) fn recipient(address: &str) -> Recipient {
        Recipient::queued(address.into(), 0)
    }
}

/// An envelope with every field set to something (DSN parameters, 8-bit),
/// for the spool's own tests.
#[cfg(test)]
pub(crate) fn sample(id: u64, rcpts: &[&str]) -> Envelope {
    let mut env = testing::envelope("sender@example.org", rcpts);
    env.id = QueueId(id);
    env.ret = Ret::Headers;
    env.envid = Some("env-1".into());
    env.body_type = BodyType::EightBitMime;
    env.has_8bit = true;
    env.arrived_ms = 1_000;
    for r in &mut env.recipients {
        r.orcpt = Some(r.address.clone());
        r.notify = Notify(Notify::FAILURE | Notify::DELAY);
        r.next_attempt_ms = 1_000;
    }
    env
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
    fn layout_1_records_still_decode() {
        let env = sample(42, &["a@example.com", "b@example.com"]);
        let old = v1::Envelope {
            id: env.id,
            sender: env.sender.clone(),
            ret: env.ret,
            envid: env.envid.clone(),
            body_type: env.body_type,
            smtputf8: env.smtputf8,
            has_8bit: env.has_8bit,
            arrived_ms: env.arrived_ms,
            size: env.size,
            client: env.client.clone(),
            recipients: env
                .recipients
                .iter()
                .map(|r| v1::Recipient {
                    address: r.address.clone(),
                    orcpt: r.orcpt.clone(),
                    notify: r.notify,
                    status: r.status,
                    attempts: r.attempts,
                    next_attempt_ms: r.next_attempt_ms,
                    last_reply: r.last_reply.clone(),
                    unreachable: r.unreachable,
                    delay_notified: r.delay_notified,
                })
                .collect(),
        };
        let mut bytes = vec![VERSION_1];
        bytes.extend(postcard::to_allocvec(&old).unwrap());
        assert_eq!(Envelope::decode(&bytes), Ok(env.clone()));

        // A suspect recipient survives the current layout's round trip.
        let mut suspect = env;
        suspect.recipients[1].suspect = true;
        suspect.recipients[1].next_attempt_ms = PARKED;
        let encoded = suspect.encode();
        assert_eq!(encoded[0], VERSION);
        assert_eq!(Envelope::decode(&encoded), Ok(suspect));
    }

    #[test]
    fn layout_2_records_still_decode() {
        let env = sample(42, &["a@example.com"]);
        let old = v2::Envelope {
            id: env.id,
            sender: env.sender.clone(),
            ret: env.ret,
            envid: env.envid.clone(),
            body_type: env.body_type,
            smtputf8: env.smtputf8,
            has_8bit: env.has_8bit,
            arrived_ms: env.arrived_ms,
            size: env.size,
            client: env.client.clone(),
            recipients: env.recipients.iter().map(v3_recipient).collect(),
        };
        let mut bytes = vec![VERSION_2];
        bytes.extend(postcard::to_allocvec(&old).unwrap());
        assert_eq!(Envelope::decode(&bytes), Ok(env.clone()));

        let mut fetched = env;
        fetched.notices_to = Some("pm@example.com".into());
        assert_eq!(Envelope::decode(&fetched.encode()), Ok(fetched));
    }

    fn v3_recipient(r: &Recipient) -> v3::Recipient {
        v3::Recipient {
            address: r.address.clone(),
            orcpt: r.orcpt.clone(),
            notify: r.notify,
            status: r.status,
            attempts: r.attempts,
            next_attempt_ms: r.next_attempt_ms,
            last_reply: r.last_reply.clone(),
            unreachable: r.unreachable,
            delay_notified: r.delay_notified,
            suspect: r.suspect,
        }
    }

    #[test]
    fn layout_3_records_still_decode() {
        let mut env = sample(42, &["a@example.com", "b@example.com"]);
        env.notices_to = Some("pm@example.com".into());
        env.recipients[1].suspect = true;
        let old = v3::Envelope {
            id: env.id,
            sender: env.sender.clone(),
            ret: env.ret,
            envid: env.envid.clone(),
            body_type: env.body_type,
            smtputf8: env.smtputf8,
            has_8bit: env.has_8bit,
            arrived_ms: env.arrived_ms,
            size: env.size,
            client: env.client.clone(),
            recipients: env.recipients.iter().map(v3_recipient).collect(),
            notices_to: env.notices_to.clone(),
        };
        let mut bytes = vec![VERSION_3];
        bytes.extend(postcard::to_allocvec(&old).unwrap());
        assert_eq!(Envelope::decode(&bytes), Ok(env.clone()));

        // The parameters as received survive the current layout.
        let mut exact = env;
        exact.envid_xtext = Some("Q+2BZ+3Dx+2Fy.42".into());
        exact.recipients[0].orcpt_xtext = Some("rfc822;a+2ba@example.com".into());
        let encoded = exact.encode();
        assert_eq!(encoded[0], VERSION);
        assert_eq!(Envelope::decode(&encoded), Ok(exact));
    }

    #[test]
    fn pause_rows_round_trip_and_unknown_reasons_still_pause() {
        for by in [PausedBy::Operator, PausedBy::Guard] {
            let pause = Pause { by, since_ms: 77 };
            assert_eq!(Pause::from_row(pause.to_row()), pause);
        }
        assert_eq!(
            Pause::from_row((9, 5)),
            Pause {
                by: PausedBy::Operator,
                since_ms: 5
            }
        );
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
