//! RCPT TO: whether we relay for the recipient, and its DSN parameters.

use smtp_proto::{
    RCPT_NOTIFY_DELAY, RCPT_NOTIFY_FAILURE, RCPT_NOTIFY_NEVER, RCPT_NOTIFY_SUCCESS, RcptTo,
};

use super::bdat::Chunks;
use super::params::{MAX_ORCPT, as_received, has_control, is_dsn_text};
use super::{Env, Knowledge, Session, Transaction};
use crate::address;
use crate::config::UnknownRecipients;
use crate::inbound::policy::{Policy, Refusal};
use crate::inbound::reply::Reply;
use crate::inbound::spf;
use crate::spool::{Notify, Recipient};
use crate::status::Rejection;

/// RCPT TO flags we advertise an extension for; anything else is refused.
const RCPT_FLAGS_SUPPORTED: u64 =
    RCPT_NOTIFY_SUCCESS | RCPT_NOTIFY_FAILURE | RCPT_NOTIFY_DELAY | RCPT_NOTIFY_NEVER;

impl Session {
    /// The reply to RCPT, or `Err(address)` when the primary should be asked
    /// about `address` first (see [`Step::Verify`]).
    pub(super) fn rcpt(
        &mut self,
        to: RcptTo<String>,
        line: &[u8],
        env: &Env<'_>,
    ) -> Result<Reply, String> {
        let policy = env.policy;
        let esmtp = self.is_esmtp();
        let spf = self.spf().cloned();
        let receiving = matches!(self.chunks, Chunks::Receiving(_));
        let Some(transaction) = &mut self.transaction else {
            return Ok(Reply::syntax(503, "5.5.1", "Error: need MAIL command"));
        };
        if let Some(refusal) = rcpt_refusal(&to, esmtp, receiving, transaction, policy) {
            return Ok(refusal);
        }
        let address = relay_address(&to, line, policy, transaction.smtputf8);
        if let Some(blocked) = &self.blocked
            && !address.as_deref().is_ok_and(|a| is_postmaster(a, &to))
        {
            return Ok(listed(self.ip.to_canonical(), &blocked.zone));
        }
        let address = match address {
            Ok(address) => address,
            Err(refusal) => return Ok(refusal),
        };
        if let Some(answer) = unverified(&address, &to.address, policy, env) {
            return answer;
        }
        if !is_postmaster(&address, &to)
            && let Some(refusal) = spf::refusal(spf.as_ref(), policy.spf(&address))
        {
            return Ok(refusal);
        }
        if !is_postmaster(&address, &to) && (env.greylisted)(&transaction.sender, &address) {
            return Ok(greylisted(&address));
        }
        if (env.primary_up)(&address) {
            return Ok(primary_is_up(&address));
        }
        add_recipient(transaction, address, &to, line);
        Ok(Reply::new(250, "2.1.5", "Ok"))
    }
}

/// Why RCPT's command itself is refused (its parameters, its address's form,
/// the recipient limit), if it is.
fn rcpt_refusal(
    to: &RcptTo<String>,
    esmtp: bool,
    receiving: bool,
    transaction: &Transaction,
    policy: &Policy,
) -> Option<Reply> {
    if receiving {
        // The content has begun: its envelope is settled.
        return Some(Reply::syntax(503, "5.5.1", "Error: RCPT after BDAT"));
    }
    if (to.flags != 0 || to.orcpt.is_some()) && !esmtp {
        return Some(Reply::syntax(
            555,
            "5.5.4",
            "Error: RCPT parameters need EHLO",
        ));
    }
    if to.flags & !RCPT_FLAGS_SUPPORTED != 0 || to.rrvs != 0 {
        return Some(Reply::syntax(
            555,
            "5.5.4",
            "Error: unsupported RCPT parameter",
        ));
    }
    // RFC 3461 §4.1: NEVER "MUST NOT" be combined with another value.
    if to.flags & RCPT_NOTIFY_NEVER != 0
        && to.flags & (RCPT_NOTIFY_SUCCESS | RCPT_NOTIFY_FAILURE | RCPT_NOTIFY_DELAY) != 0
    {
        return Some(Reply::syntax(
            501,
            "5.5.4",
            "Error: NOTIFY=NEVER cannot be combined with other values",
        ));
    }
    if to
        .orcpt
        .as_deref()
        .is_some_and(|v| !is_dsn_text(v, MAX_ORCPT))
    {
        return Some(Reply::syntax(501, "5.5.4", "Error: bad ORCPT parameter"));
    }
    if has_control(&to.address) {
        return Some(Reply::syntax(
            501,
            "5.1.3",
            "Error: bad recipient address syntax",
        ));
    }
    if !to.address.is_ascii() && !transaction.smtputf8 {
        return Some(Reply::refuse(
            Rejection::Smtputf8,
            553,
            "5.6.7",
            "Error: must declare SMTPUTF8 to send unicode address",
        ));
    }
    if transaction.recipients.len() >= policy.max_recipients {
        return Some(Reply::refuse(
            Rejection::TooManyRecipients,
            452,
            "4.5.3",
            "Error: too many recipients",
        ));
    }
    None
}

/// The recipient as we will store it (`<postmaster>` made ours, the relay
/// policy's normal form), or the refusal: not ours to relay, unknown, or not
/// an address delivery could write as a path.
fn relay_address(
    to: &RcptTo<String>,
    line: &[u8],
    policy: &Policy,
    smtputf8: bool,
) -> Result<String, Reply> {
    // smtp-proto parses both `<>` and `<postmaster>` to "": only the raw line
    // tells them apart. The bare postmaster must be accepted (RFC 5321 §4.5.1).
    let address = if to.address.is_empty() {
        if !is_bare_postmaster(line) {
            return Err(Reply::syntax(
                501,
                "5.1.3",
                "Error: bad recipient address syntax",
            ));
        }
        policy.postmaster.clone()
    } else if address::has_overlong_label(&to.address) {
        // Refused as syntax whether or not the domain is ours: a relay
        // refusal would tell the client the name could exist.
        return Err(Reply::syntax(
            501,
            "5.1.3",
            "Error: bad recipient address syntax",
        ));
    } else {
        match policy.check_recipient(&to.address) {
            Ok(address) => address,
            Err(Refusal::Syntax) => {
                return Err(Reply::syntax(
                    501,
                    "5.1.3",
                    "Error: bad recipient address syntax",
                ));
            }
            Err(Refusal::Relay) => {
                return Err(Reply::refuse(
                    Rejection::Relay,
                    550,
                    "5.7.1",
                    format!("<{}>: Relay access denied", to.address),
                ));
            }
            Err(Refusal::UnknownUser) => {
                return Err(Reply::refuse(
                    Rejection::UnknownUser,
                    550,
                    "5.1.1",
                    format!(
                        "<{}>: Recipient address rejected: User unknown in relay recipient table",
                        to.address
                    ),
                ));
            }
        }
    };
    if address::path(&address, smtputf8).is_none_or(|p| p.is_empty()) {
        return Err(Reply::syntax(
            501,
            "5.1.3",
            "Error: bad recipient address syntax",
        ));
    }
    Ok(address)
}

/// For a `verify_recipients` domain: the refusal or the callout (`Err`) that
/// what the primary told us (or not) calls for; `None` to take it.
fn unverified(
    address: &str,
    given: &str,
    policy: &Policy,
    env: &Env<'_>,
) -> Option<Result<Reply, String>> {
    // A backup MX without the primary's user list would accept mail it can
    // only bounce later (backscatter): use what the primary told us.
    let (local, _) = address.rsplit_once('@').unwrap_or(("", ""));
    if let Some(unknown) = policy.verification(address)
        && !local.eq_ignore_ascii_case("postmaster")
    {
        match (env.knowledge)(address) {
            Knowledge::Exists => {}
            Knowledge::DoesNotExist => {
                return Some(Ok(Reply::refuse(
                    Rejection::UnknownUser,
                    550,
                    "5.1.1",
                    format!("<{given}>: Recipient address rejected: User unknown"),
                )));
            }
            Knowledge::Unseen if !(env.primary_down)(address) => {
                if (env.may_call_out)(address) {
                    return Some(Err(address.to_owned()));
                }
            }
            Knowledge::Unseen => {
                if unknown == UnknownRecipients::Tempfail {
                    return Some(Ok(Reply::refuse(
                        Rejection::Other,
                        450,
                        "4.1.1",
                        format!(
                            "<{given}>: Recipient address rejected: unverified address, try again later"
                        ),
                    )));
                }
            }
        }
    }
    None
}

/// Adds the recipient with its NOTIFY=/ORCPT=, once (a repeat is accepted
/// and ignored).
fn add_recipient(transaction: &mut Transaction, address: String, to: &RcptTo<String>, line: &[u8]) {
    let duplicate = transaction
        .recipients
        .iter()
        .any(|r| r.address.eq_ignore_ascii_case(&address));
    if !duplicate {
        let mut notify = 0;
        for (flag, bit) in [
            (RCPT_NOTIFY_SUCCESS, Notify::SUCCESS),
            (RCPT_NOTIFY_FAILURE, Notify::FAILURE),
            (RCPT_NOTIFY_DELAY, Notify::DELAY),
            (RCPT_NOTIFY_NEVER, Notify::NEVER),
        ] {
            if to.flags & flag != 0 {
                notify |= bit;
            }
        }
        let orcpt_xtext = to
            .orcpt
            .as_deref()
            .and_then(|orcpt| as_received(line, "ORCPT", orcpt, true));
        transaction.recipients.push(Recipient {
            orcpt: to.orcpt.clone(),
            orcpt_xtext,
            notify: Notify(notify),
            ..Recipient::queued(address, 0)
        });
    }
}

/// Whether an accepted recipient is a postmaster, whom even a listed client
/// may write to (RFC 5321 §4.5.1; Postfix's postscreen lets it through too):
/// the bare `<postmaster>`, or `postmaster@` one of our domains.
fn is_postmaster(address: &str, to: &RcptTo<String>) -> bool {
    to.address.is_empty()
        || address
            .rsplit_once('@')
            .is_some_and(|(local, _)| local.eq_ignore_ascii_case("postmaster"))
}

/// `when_primary_up = "defer"` while the primary answers: real senders
/// retry and reach it; bots aiming only at the backup get nothing.
fn primary_is_up(address: &str) -> Reply {
    let domain = address.rsplit_once('@').map_or("", |(_, d)| d);
    Reply::refuse(
        Rejection::PrimaryUp,
        450,
        "4.7.1",
        format!(
            "<{address}>: Service unavailable; the primary MX of {domain} is up, deliver there"
        ),
    )
}

/// Greylisting: an unseen triplet is told to come back; real MTAs do.
fn greylisted(address: &str) -> Reply {
    Reply::refuse(
        Rejection::Greylist,
        450,
        "4.7.1",
        format!("<{address}>: Recipient address rejected: Greylisted, try again later"),
    )
}

/// The refusal of a client the DNS lists block, naming the list as
/// postscreen does.
fn listed(ip: std::net::IpAddr, zone: &str) -> Reply {
    Reply::refuse(
        Rejection::Dnsbl,
        550,
        "5.7.1",
        format!("Service unavailable; client [{ip}] blocked using {zone}"),
    )
}

/// `RCPT TO:<postmaster>` (any case, optional space after the colon).
fn is_bare_postmaster(line: &[u8]) -> bool {
    let text = String::from_utf8_lossy(line).to_ascii_lowercase();
    text.split_once(':')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with("<postmaster>"))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{local, run};
    use super::super::{MAX_ERRORS, Step};
    use super::*;
    use crate::inbound::policy;
    use crate::spool::Ret;

    #[test]
    fn recipients_and_parameters() {
        let p = policy::sample();
        run(
            &mut local(),
            &p,
            &[
                ("EHLO c", 250),
                ("MAIL FROM:<a@b.test> SIZE=2000", 552),
                ("MAIL FROM:<a@b.test> BODY=BINARYMIME", 555),
                ("MAIL FROM:<a@b.test> REQUIRETLS", 555),
                ("MAIL FROM:<j\u{f6}rg@b.test>", 553),
                (
                    "MAIL FROM:<a@b.test> SIZE=100 BODY=8BITMIME RET=HDRS ENVID=x",
                    250,
                ),
                ("RCPT TO:<x@example.net>", 550),
                ("RCPT TO:<x%y@example.com>", 550),
                ("RCPT TO:<\"x@y.test\"@example.com>", 550),
                ("RCPT TO:<@a.test,@b.test:x@example.com>", 250),
                ("RCPT TO:<@example.com:x@evil.test>", 550),
                ("RCPT TO:<carol@example.org>", 550),
                (
                    "RCPT TO:<alice@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@b",
                    250,
                ),
                // RFC 3461 §4.1: NEVER stands alone.
                ("RCPT TO:<alice@example.org> NOTIFY=NEVER,DELAY", 501),
                ("RCPT TO:<alice@example.org> NOTIFY=FAILURE,NEVER", 501),
                ("RCPT TO:<x@[192.0.2.1]>", 501),
                ("RCPT TO:<>", 501),
                ("RCPT TO:<Postmaster>", 250),
                ("RCPT TO:<j\u{f6}rg@example.com>", 553),
            ],
        );
    }

    #[test]
    fn stores_dsn_parameters_and_deduplicates() {
        let p = policy::sample();
        let mut s = local();
        run(
            &mut s,
            &p,
            &[
                ("EHLO c", 250),
                ("MAIL FROM:<a@b.test> RET=FULL ENVID=QQ314159 SMTPUTF8", 250),
                ("RCPT TO:<x@example.com> NOTIFY=NEVER", 250),
                ("RCPT TO:<X@Example.com>", 250),
                ("RCPT TO:<postmaster>", 250),
                ("RCPT TO:<j\u{f6}rg@example.com>", 250),
            ],
        );
        let t = s.transaction.clone().unwrap();
        assert_eq!(t.ret, Ret::Full);
        assert_eq!(t.envid.as_deref(), Some("QQ314159"));
        assert!(t.smtputf8);
        let addrs: Vec<&str> = t.recipients.iter().map(|r| r.address.as_str()).collect();
        assert_eq!(
            addrs,
            [
                "x@example.com",
                "postmaster@example.net",
                "j\u{f6}rg@example.com"
            ]
        );
        assert_eq!(t.recipients[0].notify, Notify(Notify::NEVER));
    }

    #[test]
    fn takes_only_addresses_that_delivery_can_write_as_a_path() {
        // Found by the smtp_session fuzz target: with include_subdomains,
        // `alice@a!b.example.org` passed the relay check, and delivery then
        // failed it with 5.1.3: a bounce for mail we had taken.
        let p = policy::sample();
        let label64 = "l".repeat(64);
        let long_rcpt = format!("RCPT TO:<alice@{label64}.example.org>");
        let long_sender = format!("MAIL FROM:<a@{label64}.test>");
        let foreign_long_rcpt = format!("RCPT TO:<bob@{label64}.elsewhere.test>");
        let mut s = local();
        run(
            &mut s,
            &p,
            &[
                ("EHLO c", 250),
                (&long_sender, 501),
                ("MAIL FROM:<a@b!c.test>", 501),
                ("MAIL FROM:<a@b..c.test>", 501),
                ("MAIL FROM:<a@b.test.>", 250),
                ("RCPT TO:<alice@a!b.example.org>", 501),
                ("RCPT TO:<alice@-a.example.org>", 501),
                (&long_rcpt, 501),
                (&foreign_long_rcpt, 501),
                ("RCPT TO:<alice@a_b.example.org>", 250),
                ("RCPT TO:<alice@sub.example.org.>", 250),
            ],
        );
        let t = s.transaction.clone().unwrap();
        assert_eq!(t.sender, "a@b.test");
        let addrs: Vec<&str> = t.recipients.iter().map(|r| r.address.as_str()).collect();
        assert_eq!(addrs, ["alice@a_b.example.org", "alice@sub.example.org"]);
    }

    #[test]
    fn a_listed_client_may_write_only_to_postmaster() {
        let p = policy::sample();
        let env = super::super::tests::plain(&p);
        let mut s = Session::new("::ffff:192.0.2.7".parse().unwrap());
        s.screened(Some(&crate::inbound::dnsbl::Blocked {
            zone: "zen.example".into(),
            score: 2,
        }));
        s.command(b"EHLO c\r\n", &env);
        s.command(b"MAIL FROM:<a@b.test>\r\n", &env);
        for (rcpt, code) in [
            ("<x@example.com>", 550),
            ("<x@example.net>", 550),
            ("<postmaster@example.net>", 550),
            ("<postmaster%x@example.com>", 550),
            ("<PostMaster@example.com>", 250),
            ("<postmaster@sub.example.org>", 250),
            ("<Postmaster>", 250),
        ] {
            let step = s.command(format!("RCPT TO:{rcpt}\r\n").as_bytes(), &env);
            let Step::Reply(reply) = step else {
                panic!("{rcpt}: {step:?}")
            };
            assert_eq!(reply.code, code, "{rcpt}: {reply}");
            if code == 550 {
                assert_eq!(
                    reply.to_string(),
                    "550 5.7.1 Service unavailable; client [192.0.2.7] blocked using zen.example"
                );
                assert_eq!(reply.rejection, Some(Rejection::Dnsbl));
            }
        }
        let t = s.transaction.clone().unwrap();
        assert_eq!(t.recipients.len(), 3);
        // A verdict of "not listed" lifts nothing it did not impose.
        s.screened(None);
        let step = s.command(b"RCPT TO:<x@example.com>\r\n", &env);
        assert!(
            matches!(step, Step::Reply(ref r) if r.code == 250),
            "{step:?}"
        );
    }

    #[test]
    fn recipient_limit_is_a_temporary_refusal_not_an_error() {
        let mut p = policy::sample();
        p.max_recipients = 2;
        let mut s = local();
        let mut script = vec![("EHLO c", 250), ("MAIL FROM:<a@b.test>", 250)];
        script.push(("RCPT TO:<a@example.com>", 250));
        script.push(("RCPT TO:<b@example.com>", 250));
        for _ in 0..MAX_ERRORS + 5 {
            script.push(("RCPT TO:<c@example.com>", 452));
        }
        run(&mut s, &p, &script);
    }

    #[test]
    fn greylisting_asks_with_the_sender_and_spares_postmaster() {
        let p = policy::sample();
        let asked = std::cell::RefCell::new(Vec::new());
        let greylisted = |sender: &str, address: &str| {
            asked.borrow_mut().push(format!("{sender} {address}"));
            address != "passed@example.com"
        };
        let env = Env {
            policy: &p,
            spool_has_room: &|_| true,
            knowledge: &|_| Knowledge::Unseen,
            primary_down: &|_| false,
            may_call_out: &|_| false,
            primary_up: &|_| false,
            greylisted: &greylisted,
        };
        let mut s = local();
        s.command(b"EHLO c\r\n", &env);
        s.command(b"MAIL FROM:<a@b.test>\r\n", &env);
        let reply = |s: &mut Session, rcpt: &str| match s
            .command(format!("RCPT TO:<{rcpt}>\r\n").as_bytes(), &env)
        {
            Step::Reply(r) => (r.code, r.status, r.rejection),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            reply(&mut s, "new@example.com"),
            (450, "4.7.1", Some(Rejection::Greylist))
        );
        assert_eq!(reply(&mut s, "passed@example.com"), (250, "2.1.5", None));
        assert_eq!(
            reply(&mut s, "postmaster@example.com"),
            (250, "2.1.5", None)
        );
        // Refused before greylisting: not asked.
        assert_eq!(reply(&mut s, "x@elsewhere.test").0, 550);
        assert_eq!(
            *asked.borrow(),
            ["a@b.test new@example.com", "a@b.test passed@example.com"]
        );
    }

    #[test]
    fn learned_recipients_decide_while_the_primary_is_down() {
        let p = policy::sample_verifying();
        let room = |_| true;
        let knowledge = |address: &str| match address {
            "known@example.com" => Knowledge::Exists,
            "gone@example.com" => Knowledge::DoesNotExist,
            _ => Knowledge::Unseen,
        };
        for (down, unseen_code) in [(true, 450), (false, 250)] {
            let primary_down = move |_: &str| down;
            let env = Env {
                policy: &p,
                spool_has_room: &room,
                knowledge: &knowledge,
                primary_down: &primary_down,
                may_call_out: &|_| false,
                primary_up: &|_| false,
                greylisted: &|_, _| false,
            };
            let mut s = local();
            s.command(b"EHLO c\r\n", &env);
            s.command(b"MAIL FROM:<a@b.test>\r\n", &env);
            let code = |s: &mut Session, rcpt: &str| match s
                .command(format!("RCPT TO:<{rcpt}>\r\n").as_bytes(), &env)
            {
                Step::Reply(r) => (r.code, r.status),
                other => panic!("{other:?}"),
            };
            assert_eq!(code(&mut s, "known@example.com"), (250, "2.1.5"));
            assert_eq!(code(&mut s, "gone@example.com"), (550, "5.1.1"));
            assert_eq!(code(&mut s, "new@example.com").0, unseen_code);
            assert_eq!(code(&mut s, "postmaster@example.com").0, 250);
            // example.org does not verify: learned knowledge is not consulted.
            assert_eq!(code(&mut s, "alice@example.org").0, 250);
        }
    }

    #[test]
    fn unseen_recipients_are_checked_with_the_primary_while_it_is_up() {
        let p = policy::sample_verifying();
        let room = |_| true;
        let knowledge = |address: &str| match address {
            "known@example.com" => Knowledge::Exists,
            _ => Knowledge::Unseen,
        };
        for down in [false, true] {
            let primary_down = move |_: &str| down;
            let env = Env {
                policy: &p,
                spool_has_room: &room,
                knowledge: &knowledge,
                primary_down: &primary_down,
                may_call_out: &|_| true,
                primary_up: &|_| false,
                greylisted: &|_, _| false,
            };
            let mut s = local();
            s.command(b"EHLO c\r\n", &env);
            s.command(b"MAIL FROM:<a@b.test>\r\n", &env);
            let step = s.command(b"RCPT TO:<New@example.com>\r\n", &env);
            if down {
                // A callout can only fail while the primary is down.
                assert!(
                    matches!(step, Step::Reply(ref r) if r.code == 450),
                    "{step:?}"
                );
            } else {
                assert_eq!(step, Step::Verify("New@example.com".into()));
            }
            // Known, non-verifying and postmaster recipients need no callout.
            for rcpt in [
                "known@example.com",
                "alice@example.org",
                "postmaster@example.com",
            ] {
                let step = s.command(format!("RCPT TO:<{rcpt}>\r\n").as_bytes(), &env);
                assert!(
                    matches!(step, Step::Reply(ref r) if r.code == 250),
                    "{rcpt}: {step:?}"
                );
            }
            let Some(t) = &s.transaction else {
                panic!("the transaction was lost")
            };
            assert_eq!(t.recipients.len(), 3, "asking changed nothing");
        }
    }
}
