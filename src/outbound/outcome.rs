//! What a reply means for a recipient, as pure functions: the reply code says
//! whether to go on, retry later or give up, and the RFC 3463 enhanced status
//! code says why, for the spool and for failure notices. Nothing here talks to
//! the network or decides when to retry; that is the scheduler's business.

use crate::status::{Failure, Status};

/// The result for one recipient of one delivery attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The next hop took responsibility for the message (2xx after the final dot).
    Delivered {
        reply: String,
        /// The sender asked for `NOTIFY=SUCCESS` but the next hop does not speak
        /// DSN, so it will never send that notice: RFC 3461 §4.2 makes us send a
        /// "relayed" notice ourselves.
        relayed: bool,
    },
    /// Give up on this recipient: a 5xx ([`Failure::Rejected`]), or a rule we
    /// refuse to break ([`Failure::Policy`]: size, SMTPUTF8, 8BITMIME).
    Failed {
        status: Status,
        reply: String,
        reason: Failure,
    },
    /// Try this recipient again later: a 4xx.
    Deferred { status: Status, reply: String },
}

impl Outcome {
    /// The next hop's reply (or our reason), for `last_reply` and DSNs.
    pub fn reply(&self) -> &str {
        match self {
            Outcome::Delivered { reply, .. }
            | Outcome::Failed { reply, .. }
            | Outcome::Deferred { reply, .. } => reply,
        }
    }
}

/// How a reply code steers the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// 2xx: done, go on.
    Success,
    /// 3xx: send the rest (354 after DATA).
    Intermediate,
    /// 4xx other than 421: this request failed for now.
    Transient { status: Status },
    /// 5xx: this request will never succeed as it is.
    Permanent { status: Status },
    /// 421: the server is closing the session, whatever was asked (RFC 5321
    /// §3.8), so the whole attempt ends here.
    Closing { status: Status },
    /// Not an SMTP reply code at all.
    Malformed,
}

/// Classifies a reply. `enhanced` is the RFC 3463 code the reply carried, if any
/// (`"5.1.1"`); without one, or with one that does not parse, the status is
/// `X.0.0` of the reply's class. When the two disagree on the class the basic
/// code wins (it is what RFC 5321 clients act on), and only the subject and
/// detail of the enhanced code are kept.
pub fn classify(code: u16, enhanced: Option<&str>) -> Class {
    let status = |basic: Status| match enhanced.and_then(Status::parse) {
        Some(enhanced) => enhanced.in_class_of(basic),
        None => basic,
    };
    match code {
        200..=299 => Class::Success,
        300..=399 => Class::Intermediate,
        421 => Class::Closing {
            status: status(Status::transient(0, 0)),
        },
        400..=499 => Class::Transient {
            status: status(Status::transient(0, 0)),
        },
        500..=599 => Class::Permanent {
            status: status(Status::permanent(0, 0)),
        },
        _ => Class::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(status: &str) -> Status {
        Status::parse(status).expect(status)
    }

    fn t(status: &str) -> Class {
        Class::Transient {
            status: parse(status),
        }
    }

    fn p(status: &str) -> Class {
        Class::Permanent {
            status: parse(status),
        }
    }

    #[test]
    fn classifies_by_code_and_takes_the_status_from_the_enhanced_code() {
        let cases = [
            (250, Some("2.1.5"), Class::Success),
            (250, None, Class::Success),
            (221, None, Class::Success),
            (354, None, Class::Intermediate),
            (450, Some("4.2.1"), t("4.2.1")),
            (452, None, t("4.0.0")),
            (
                421,
                Some("4.3.2"),
                Class::Closing {
                    status: parse("4.3.2"),
                },
            ),
            (
                421,
                None,
                Class::Closing {
                    status: parse("4.0.0"),
                },
            ),
            (550, Some("5.1.1"), p("5.1.1")),
            (552, Some("5.3.4"), p("5.3.4")),
            (554, None, p("5.0.0")),
            (550, Some("5.7.100"), p("5.7.100")),
            // The class disagrees: the code wins, subject and detail stay.
            (550, Some("4.2.2"), p("5.2.2")),
            (451, Some("5.7.1"), t("4.7.1")),
            // Garbage enhanced codes are ignored.
            (550, Some("5.1"), p("5.0.0")),
            (550, Some("5.1.1.1"), p("5.0.0")),
            (550, Some("3.1.1"), p("5.0.0")),
            (550, Some("5.1000.1"), p("5.0.0")),
            (550, Some("5.x.1"), p("5.0.0")),
            (550, Some(""), p("5.0.0")),
            (199, None, Class::Malformed),
            (600, None, Class::Malformed),
            (0, None, Class::Malformed),
        ];
        for (code, enhanced, class) in cases {
            assert_eq!(classify(code, enhanced), class, "{code} {enhanced:?}");
        }
    }
}
