//! ETRN (RFC 1985): a client asks us to deliver a relay domain's mail now.

use super::{Session, Step, need_helo};
use crate::inbound::policy::Policy;
use crate::inbound::reply::Reply;
use crate::status::Rejection;

impl Session {
    pub(super) fn etrn(&mut self, name: &str, policy: &Policy) -> Step {
        let reply = if self.helo.is_none() {
            need_helo()
        } else if self.transaction.is_some() {
            Reply::syntax(503, "5.5.1", "Error: MAIL transaction in progress")
        } else if !policy.etrn_allowed(self.ip) {
            Reply::refuse(
                Rejection::Other,
                459,
                "4.7.1",
                format!("<{name}>: ETRN not allowed from this client"),
            )
        } else if let Some(domain) = policy.relay_domain(name.trim_start_matches('@')) {
            return Step::Etrn {
                domain: domain.to_owned(),
                reply: Reply::new(250, "2.0.0", format!("Queuing for node <{name}> started")),
            };
        } else {
            Reply::refuse(
                Rejection::Other,
                458,
                "4.5.4",
                format!("Unable to queue messages for node <{name}>"),
            )
        };
        // `command` counts the refusal towards the error limit.
        Step::Reply(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{local, plain};
    use super::*;
    use crate::inbound::policy;

    #[test]
    fn etrn() {
        let p = policy::sample();
        let env = plain(&p);
        let mut s = local();
        s.command(b"EHLO c\r\n", &env);
        assert_eq!(
            s.command(b"ETRN Example.COM\r\n", &env),
            Step::Etrn {
                domain: "example.com".into(),
                reply: Reply::new(250, "2.0.0", "Queuing for node <Example.COM> started"),
            }
        );
        assert!(matches!(
            s.command(b"ETRN @sub.example.org\r\n", &env),
            Step::Etrn { ref domain, .. } if domain == "example.org"
        ));
        assert!(
            matches!(s.command(b"ETRN other.test\r\n", &env), Step::Reply(ref r) if r.code == 458)
        );
        assert!(matches!(s.command(b"ETRN #queue\r\n", &env), Step::Reply(ref r) if r.code == 458));

        let mut remote = Session::new("198.51.100.1".parse().unwrap());
        remote.command(b"EHLO c\r\n", &env);
        assert!(
            matches!(remote.command(b"ETRN example.com\r\n", &env), Step::Reply(ref r) if r.code == 459)
        );
    }
}
