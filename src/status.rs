//! The words every stage uses about how mail fared: an RFC 3463 enhanced
//! status code ([`Status`]), why a recipient was given up on ([`Failure`]),
//! and why an SMTP client was refused ([`Rejection`]). Each is decided where
//! the decision is made (a reply read, a rule applied, a route looked up, a
//! lifetime run out, a command refused) and carried as it is to the notices,
//! the DSNs and the metrics; nobody recovers one from reply text. A leaf: it
//! imports no stage.

use std::fmt;

/// An RFC 3463 enhanced status code, `class.subject.detail`: the class is
/// 2 (success), 4 (transient) or 5 (permanent), subject and detail 0–999.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Status {
    class: u8,
    subject: u16,
    detail: u16,
}

impl Status {
    /// 5.1.1: the mailbox does not exist (what `verify_recipients` learns).
    pub const NO_SUCH_MAILBOX: Status = Status::permanent(1, 1);

    /// `2.subject.detail`.
    pub const fn success(subject: u16, detail: u16) -> Status {
        Status::new(2, subject, detail)
    }

    /// `4.subject.detail`.
    pub const fn transient(subject: u16, detail: u16) -> Status {
        Status::new(4, subject, detail)
    }

    /// `5.subject.detail`.
    pub const fn permanent(subject: u16, detail: u16) -> Status {
        Status::new(5, subject, detail)
    }

    /// Our own codes are constants: a wrong one fails to compile.
    const fn new(class: u8, subject: u16, detail: u16) -> Status {
        assert!(subject <= 999 && detail <= 999);
        Status {
            class,
            subject,
            detail,
        }
    }

    /// Reads a code someone else wrote (a next hop's reply): each part 1–3
    /// digits, the class 2, 4 or 5, nothing around it (RFC 3463 §2). `None`
    /// for anything else.
    pub fn parse(text: &str) -> Option<Status> {
        let mut parts = text.split('.');
        let mut number = || -> Option<u16> {
            let part = parts.next()?;
            if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            part.parse().ok()
        };
        let (class, subject, detail) = (number()?, number()?, number()?);
        if parts.next().is_some() || !matches!(class, 2 | 4 | 5) {
            return None;
        }
        Some(Status {
            class: class as u8,
            subject,
            detail,
        })
    }

    /// 2, 4 or 5.
    pub fn class(self) -> u8 {
        self.class
    }

    /// The same subject and detail in the class of `other` (the basic reply
    /// code's class wins over the enhanced code's, RFC 5321 clients act on it).
    pub fn in_class_of(self, other: Status) -> Status {
        Status {
            class: other.class,
            ..self
        }
    }

    /// The same subject and detail as a transient status: what a refusal
    /// means for mail when the session as a whole failed.
    pub fn as_transient(self) -> Status {
        Status { class: 4, ..self }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// Why a recipient was given up on: the `reason` label of
/// `mxspool_recipients_failed_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Failure {
    /// Refused by the next hop (a 5xx), or returned to the sender by an
    /// operator.
    Rejected,
    /// Still undelivered when `delivery.max_queue_lifetime` ran out.
    Expired,
    /// The domain cannot get mail at all: NXDOMAIN, or a null MX.
    Routing,
    /// Our own rules forbid sending it to this next hop: a size limit, 8-bit
    /// content without 8BITMIME, SMTPUTF8, an address that cannot be written
    /// as a path.
    Policy,
}

impl Failure {
    pub const ALL: [Failure; 4] = [
        Failure::Rejected,
        Failure::Expired,
        Failure::Routing,
        Failure::Policy,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Failure::Rejected => "rejected",
            Failure::Expired => "expired",
            Failure::Routing => "routing",
            Failure::Policy => "policy",
        }
    }
}

/// Why an SMTP client was refused: the `reason` label of
/// `mxspool_smtp_rejected_total`, chosen by whoever builds the refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// Not one of our relay domains (or a routing trick in the local part).
    Relay,
    /// Not on the domain's recipient list, or known not to exist.
    UnknownUser,
    /// Bigger than `max_message_size`.
    Size,
    TooManyRecipients,
    /// A command out of order, malformed, or not supported.
    Syntax,
    /// The message has passed through too many hops.
    Loop,
    /// The spool's disk is (nearly) full.
    SpoolFull,
    /// The spool could not store the message.
    SpoolError,
    /// The client's address is not allowed (`allow`/`deny`).
    Access,
    /// Connection limits: in total, per address, per minute.
    Limits,
    /// The client was silent too long.
    Timeout,
    /// The client made too many errors in one session.
    TooManyErrors,
    /// The message needs SMTPUTF8 the client did not ask for.
    Smtputf8,
    /// The client sent ahead without PIPELINING.
    Pipelining,
    /// The client's address is listed in DNS blocklists (`dnsbl`).
    Dnsbl,
    /// SPF says `fail` for a domain with `spf = "reject"`.
    Spf,
    /// `when_primary_up = "defer"` while the domain's primary is up.
    PrimaryUp,
    /// An unseen (client network, sender, recipient) triplet, told to retry.
    Greylist,
    Other,
}

impl Rejection {
    pub const ALL: [Rejection; 19] = [
        Rejection::Relay,
        Rejection::UnknownUser,
        Rejection::Size,
        Rejection::TooManyRecipients,
        Rejection::Syntax,
        Rejection::Loop,
        Rejection::SpoolFull,
        Rejection::SpoolError,
        Rejection::Access,
        Rejection::Limits,
        Rejection::Timeout,
        Rejection::TooManyErrors,
        Rejection::Smtputf8,
        Rejection::Pipelining,
        Rejection::Dnsbl,
        Rejection::Spf,
        Rejection::PrimaryUp,
        Rejection::Greylist,
        Rejection::Other,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Relay => "relay",
            Rejection::UnknownUser => "unknown_user",
            Rejection::Size => "size",
            Rejection::TooManyRecipients => "too_many_recipients",
            Rejection::Syntax => "syntax",
            Rejection::Loop => "loop",
            Rejection::SpoolFull => "spool_full",
            Rejection::SpoolError => "spool_error",
            Rejection::Access => "access",
            Rejection::Limits => "limits",
            Rejection::Timeout => "timeout",
            Rejection::TooManyErrors => "too_many_errors",
            Rejection::Smtputf8 => "smtputf8",
            Rejection::Pipelining => "pipelining",
            Rejection::Dnsbl => "dnsbl",
            Rejection::Spf => "spf",
            Rejection::PrimaryUp => "primary_up",
            Rejection::Greylist => "greylist",
            Rejection::Other => "other",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        for text in ["2.0.0", "4.4.1", "5.1.1", "5.1.10", "5.7.100", "4.999.999"] {
            let status = Status::parse(text).expect(text);
            assert_eq!(status.to_string(), text);
        }
        assert_eq!(Status::parse("5.1.1"), Some(Status::NO_SUCH_MAILBOX));
        assert_eq!(Status::parse("4.4.7"), Some(Status::transient(4, 7)));
        // Leading zeros are read as numbers; written without them.
        assert_eq!(
            Status::parse("5.01.001").map(|s| s.to_string()).as_deref(),
            Some("5.1.1")
        );
    }

    #[test]
    fn malformed_codes_are_none() {
        for text in [
            "", "5", "5.1", "5.1.1.1", "3.1.1", "6.0.0", "0.0.0", "5.1000.1", "5.1.1000", "5.x.1",
            "5..1", ".1.1", "5.1.", " 5.1.1", "5.1.1 ", "+5.1.1", "5.-1.1", "５.1.1", "0005.1.1",
        ] {
            assert_eq!(Status::parse(text), None, "{text:?}");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 12) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|i| b"0123456789.5x\xff"[((seed >> (i * 4)) % 14) as usize])
                .collect();
            let text = String::from_utf8_lossy(&bytes);
            if let Some(status) = Status::parse(&text) {
                assert_eq!(Status::parse(&status.to_string()), Some(status));
            }
        }
    }

    #[test]
    fn class_changes_keep_subject_and_detail() {
        let refused = Status::permanent(7, 1);
        assert_eq!(refused.as_transient().to_string(), "4.7.1");
        assert_eq!(refused.class(), 5);
        assert_eq!(
            refused.in_class_of(Status::transient(0, 0)).to_string(),
            "4.7.1"
        );
        assert_eq!(Status::success(0, 0).to_string(), "2.0.0");
    }

    #[test]
    fn each_failure_has_its_label() {
        let labels: Vec<&str> = Failure::ALL.iter().map(|f| f.label()).collect();
        assert_eq!(labels, ["rejected", "expired", "routing", "policy"]);
    }

    #[test]
    fn each_rejection_has_its_own_label() {
        let labels: Vec<&str> = Rejection::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(
            labels,
            [
                "relay",
                "unknown_user",
                "size",
                "too_many_recipients",
                "syntax",
                "loop",
                "spool_full",
                "spool_error",
                "access",
                "limits",
                "timeout",
                "too_many_errors",
                "smtputf8",
                "pipelining",
                "dnsbl",
                "spf",
                "primary_up",
                "greylist",
                "other",
            ]
        );
    }
}
