//! DATA, and the checks every complete message gets however it came.

use super::bdat::Chunks;
use super::{Session, Step, Transaction, need_helo, too_big};
use crate::inbound::data::{Data, count_received};
use crate::inbound::policy::Policy;
use crate::inbound::reply::Reply;
use crate::status::Rejection;

impl Session {
    /// DATA: 354 and the message's lines, once there are recipients and
    /// no BDAT content.
    pub(super) fn data(&self) -> Step {
        let reply = match &self.transaction {
            _ if self.helo.is_none() => need_helo(),
            None => Reply::syntax(503, "5.5.1", "Error: need MAIL command"),
            Some(_) if matches!(self.chunks, Chunks::Receiving(_)) => {
                Reply::syntax(503, "5.5.1", "Error: DATA after BDAT")
            }
            Some(t) if t.recipients.is_empty() => {
                Reply::syntax(554, "5.5.1", "Error: no valid recipients")
            }
            Some(_) => {
                return Step::Data(Reply::new(354, "", "End data with <CR><LF>.<CR><LF>"));
            }
        };
        Step::Reply(reply)
    }

    /// The client finished sending data. On success, returns the transaction to
    /// commit (the caller replies after the commit); on refusal, the reply. The
    /// transaction ends either way.
    pub fn finish_data(&mut self, data: &Data, policy: &Policy) -> Result<Transaction, Reply> {
        let transaction = self
            .transaction
            .take()
            .ok_or_else(|| Reply::syntax(503, "5.5.1", "Error: need MAIL command"))?;
        if data.oversize {
            return Err(too_big());
        }
        // Our own Received: makes one more; refuse before it would exceed the limit.
        if count_received(&data.body) >= policy.max_received_headers {
            return Err(Reply::refuse(
                Rejection::Loop,
                554,
                "5.4.6",
                "Error: too many hops (mail forwarding loop?)",
            ));
        }
        Ok(transaction)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{local, plain, run};
    use super::*;
    use crate::inbound::policy;

    #[test]
    fn finish_data_checks_size_and_hops() {
        let p = policy::sample();
        let env = plain(&p);
        let data = |body: &[u8], oversize| Data {
            body: body.to_vec(),
            size: body.len() as u64,
            oversize,
            has_8bit: false,
            normalised: false,
        };
        let mut s = local();
        for (body, oversize, want) in [
            (b"Subject: hi\r\n\r\nx\r\n".to_vec(), false, None),
            (Vec::new(), true, Some(552)),
            ("Received: x\r\n".repeat(5).into_bytes(), false, Some(554)),
            ("Received: x\r\n".repeat(4).into_bytes(), false, None),
        ] {
            run(
                &mut s,
                &p,
                &[
                    ("EHLO c", 250),
                    ("MAIL FROM:<a@b.test>", 250),
                    ("RCPT TO:<x@example.com>", 250),
                ],
            );
            let got = s.finish_data(&data(&body, oversize), &p);
            assert_eq!(got.err().map(|r| r.code), want);
            // The transaction is over either way.
            assert!(matches!(s.command(b"DATA\r\n", &env), Step::Reply(ref r) if r.code == 503));
        }
    }
}
