//! MAIL FROM: the sender, and the parameters of the extensions we offer.

use smtp_proto::{
    MAIL_BODY_7BIT, MAIL_BODY_8BITMIME, MAIL_RET_FULL, MAIL_RET_HDRS, MAIL_SMTPUTF8, MailFrom,
};

use super::bdat::Chunks;
use super::params::{MAX_ENVID, as_received, has_control, is_dsn_text};
use super::{Env, Session, Transaction, need_helo, no_room, too_big};
use crate::address;
use crate::inbound::reply::Reply;
use crate::spool::{BodyType, Ret};
use crate::status::Rejection;

/// MAIL FROM flags we advertise an extension for; anything else is refused.
const MAIL_FLAGS_SUPPORTED: u64 =
    MAIL_BODY_7BIT | MAIL_BODY_8BITMIME | MAIL_RET_FULL | MAIL_RET_HDRS | MAIL_SMTPUTF8;

impl Session {
    pub(super) fn mail(&mut self, from: MailFrom<String>, line: &[u8], env: &Env<'_>) -> Reply {
        let Some((_, esmtp)) = &self.helo else {
            return need_helo();
        };
        if self.transaction.is_some() {
            return Reply::syntax(503, "5.5.1", "Error: nested MAIL command");
        }
        let has_params = from.flags != 0 || from.size != 0 || from.env_id.is_some();
        if has_params && !esmtp {
            return Reply::syntax(555, "5.5.4", "Error: MAIL parameters need EHLO");
        }
        if from.flags & !MAIL_FLAGS_SUPPORTED != 0
            || from.trans_id.is_some()
            || from.by != 0
            || from.solicit.is_some()
            || from.mtrk.is_some()
            || from.auth.is_some()
            || from.hold_for != 0
            || from.hold_until != 0
            || from.mt_priority != 0
        {
            return Reply::syntax(555, "5.5.4", "Error: unsupported MAIL parameter");
        }
        if from
            .env_id
            .as_deref()
            .is_some_and(|v| !is_dsn_text(v, MAX_ENVID))
        {
            return Reply::syntax(501, "5.5.4", "Error: bad ENVID parameter");
        }
        if has_control(&from.address) {
            // RFC 5321 paths hold no control characters; the next hop would
            // refuse the address, and we would owe a bounce.
            return Reply::syntax(501, "5.1.7", "Error: bad sender address syntax");
        }
        let smtputf8 = from.flags & MAIL_SMTPUTF8 != 0;
        if !from.address.is_ascii() && !smtputf8 {
            return Reply::refuse(
                Rejection::Smtputf8,
                553,
                "5.6.7",
                "Error: must declare SMTPUTF8 to send unicode address",
            );
        }
        // `a@example.com.` means `a@example.com`; anything else must be what
        // delivery can write as a path, or every recipient would fail there.
        let mut sender = from.address;
        if sender.ends_with('.') && sender.contains('@') {
            sender.pop();
        }
        if address::path(&sender, smtputf8).is_none() {
            return Reply::syntax(501, "5.1.7", "Error: bad sender address syntax");
        }
        let size = from.size as u64;
        if size > env.policy.max_message_size {
            return too_big();
        }
        if !(env.spool_has_room)(size) {
            return no_room();
        }
        let envid_xtext = from
            .env_id
            .as_deref()
            .and_then(|envid| as_received(line, "ENVID", envid, false));
        self.transaction = Some(Transaction {
            sender,
            ret: ret(from.flags),
            envid: from.env_id,
            envid_xtext,
            body_type: body_type(from.flags),
            smtputf8,
            recipients: Vec::new(),
        });
        self.chunks = Chunks::None;
        Reply::new(250, "2.1.0", "Ok")
    }
}

/// `RET=`: what of the message a bounce should return.
fn ret(flags: u64) -> Ret {
    if flags & MAIL_RET_FULL != 0 {
        Ret::Full
    } else if flags & MAIL_RET_HDRS != 0 {
        Ret::Headers
    } else {
        Ret::Unset
    }
}

/// `BODY=`: what the client declared the content to be.
fn body_type(flags: u64) -> BodyType {
    if flags & MAIL_BODY_8BITMIME != 0 {
        BodyType::EightBitMime
    } else if flags & MAIL_BODY_7BIT != 0 {
        BodyType::SevenBit
    } else {
        BodyType::Unset
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{local, run};
    use super::super::{Env, Knowledge, Step};
    use crate::inbound::policy;

    #[test]
    fn a_label_over_63_octets_is_bad_syntax() {
        let p = policy::sample();
        let long = "l".repeat(64);
        let ok = "l".repeat(63);
        run(
            &mut local(),
            &p,
            &[
                ("EHLO c", 250),
                (&format!("MAIL FROM:<a@{long}.test>"), 501),
                (&format!("MAIL FROM:<a@{ok}.test>"), 250),
                // No such name can exist, ours or not: bad syntax, 5.1.3.
                (&format!("RCPT TO:<alice@{long}.example.org>"), 501),
                (&format!("RCPT TO:<x@{long}.example.com>"), 501),
            ],
        );
    }

    #[test]
    fn helo_clients_get_no_esmtp_parameters() {
        let p = policy::sample();
        run(
            &mut local(),
            &p,
            &[
                ("HELO c", 250),
                ("MAIL FROM:<a@b.test> SIZE=10", 555),
                ("MAIL FROM:<a@b.test>", 250),
                ("RCPT TO:<x@example.com> NOTIFY=NEVER", 555),
            ],
        );
    }

    #[test]
    fn full_spool_refuses_mail_temporarily() {
        let p = policy::sample();
        let full = |_| false;
        let env = Env {
            policy: &p,
            spool_has_room: &full,
            knowledge: &|_| Knowledge::Unseen,
            primary_down: &|_| false,
            may_call_out: &|_| false,
            primary_up: &|_| false,
            greylisted: &|_, _| false,
        };
        let mut s = local();
        s.command(b"EHLO c\r\n", &env);
        assert!(matches!(
            s.command(b"MAIL FROM:<a@b.test>\r\n", &env),
            Step::Reply(ref r) if r.code == 452 && r.status == "4.3.1"
        ));
    }
}
