//! What the client learns of us: the greeting, the EHLO reply with the
//! extensions we offer, and STARTTLS, which that reply may offer.

use super::{Session, Step, Tls, need_helo};
use crate::inbound::policy::Policy;
use crate::inbound::reply::Reply;

impl Session {
    pub fn greeting(policy: &Policy) -> Reply {
        Reply::new(220, "", format!("{} ESMTP mxspool", policy.hostname))
    }

    /// STARTTLS: the handshake, if it was offered and no transaction has begun.
    pub(super) fn starttls(&self) -> Step {
        let reply = match self.tls {
            Tls::Unavailable => Reply::syntax(502, "5.5.1", "Error: STARTTLS not available"),
            Tls::Active => Reply::syntax(503, "5.5.1", "Error: TLS already active"),
            Tls::Offered if self.helo.is_none() => need_helo(),
            Tls::Offered if self.transaction.is_some() => {
                Reply::syntax(503, "5.5.1", "Error: MAIL transaction in progress")
            }
            Tls::Offered => {
                return Step::StartTls(Reply::new(220, "2.0.0", "Ready to start TLS"));
            }
        };
        Step::Reply(reply)
    }
}

pub(super) fn ehlo_reply(policy: &Policy, starttls: bool) -> Reply {
    let mut lines = vec![
        policy.hostname.clone(),
        "PIPELINING".into(),
        format!("SIZE {}", policy.max_message_size),
        "ETRN".into(),
    ];
    if starttls {
        lines.push("STARTTLS".into());
    }
    lines.extend([
        "ENHANCEDSTATUSCODES".into(),
        "8BITMIME".into(),
        "DSN".into(),
        "SMTPUTF8".into(),
        "CHUNKING".into(),
    ]);
    Reply::multiline(250, lines)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{local, plain};
    use super::*;
    use crate::inbound::policy;

    #[test]
    fn starttls_only_when_offered_and_only_once() {
        let p = policy::sample();
        let env = plain(&p);
        let ehlo_lines = |s: &mut Session| match s.command(b"EHLO c\r\n", &env) {
            Step::Reply(r) => r.lines,
            other => panic!("{other:?}"),
        };
        let mut plain = local();
        assert!(!ehlo_lines(&mut plain).contains(&"STARTTLS".to_string()));
        assert!(
            matches!(plain.command(b"STARTTLS\r\n", &env), Step::Reply(ref r) if r.code == 502)
        );

        let mut offered = Session::with_tls("127.0.0.1".parse().unwrap(), Tls::Offered);
        assert!(
            matches!(offered.command(b"STARTTLS\r\n", &env), Step::Reply(ref r) if r.code == 503)
        );
        assert!(ehlo_lines(&mut offered).contains(&"STARTTLS".to_string()));
        offered.command(b"MAIL FROM:<a@b.test>\r\n", &env);
        assert!(
            matches!(offered.command(b"STARTTLS\r\n", &env), Step::Reply(ref r) if r.code == 503)
        );
        offered.command(b"RSET\r\n", &env);
        assert!(
            matches!(offered.command(b"STARTTLS\r\n", &env), Step::StartTls(ref r) if r.code == 220)
        );

        let mut active = Session::with_tls("127.0.0.1".parse().unwrap(), Tls::Active);
        assert!(!ehlo_lines(&mut active).contains(&"STARTTLS".to_string()));
        assert!(active.is_tls());
        assert!(
            matches!(active.command(b"STARTTLS\r\n", &env), Step::Reply(ref r) if r.code == 503)
        );
    }
}
