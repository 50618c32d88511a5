//! BDAT (RFC 3030, CHUNKING): the reply to a BDAT comes after its chunk, so the
//! command yields [`Step::Chunk`]; the shell reads exactly that many octets into
//! [`Session::chunk`] and replies with what [`Session::end_chunk`] decides. A
//! refused chunk is still read to its end, or its octets would be taken for
//! commands. Refused are: a chunk without MAIL and an accepted RCPT (503), one
//! that would take the message over `max_message_size` (552), and a LAST chunk
//! completing a message that fails the checks DATA makes (size, hop count).
//! A refusal ends the transaction, and the chunks the client had pipelined
//! behind the refused one are read and refused with 503 too, until its BDAT
//! LAST, RSET, MAIL or EHLO/HELO (RFC 3030 §2: the client must send no more
//! chunks after an error, and the server must discard those already in the
//! pipeline). Postfix smtpd does the same, except that it answers 551 and
//! refuses MAIL until LAST or RSET. Those follow-on refusals are the client's
//! pipelining, not its mistakes: they do not count towards [`MAX_ERRORS`].
//! A malformed BDAT closes the connection after its 501: without a size, what
//! follows cannot be told apart from commands.

use super::{Chunked, MAX_ERRORS, Session, Step, too_big, too_many_errors};
use crate::inbound::data::ChunkReader;
use crate::inbound::policy::Policy;
use crate::inbound::reply::Reply;

/// Where the BDAT content of the current transaction stands.
#[derive(Debug)]
pub(super) enum Chunks {
    /// No BDAT since MAIL: DATA is still possible.
    None,
    /// The content of the chunks accepted so far.
    Receiving(ChunkReader),
    /// A chunk was refused and the transaction ended; the client's chunks
    /// already in the pipeline behind it are read and refused.
    Failed,
}

/// What to do with the chunk being read, decided when its BDAT came.
#[derive(Debug)]
enum Fate {
    Keep,
    Refuse(Reply),
    Discard(Reply),
}

/// The BDAT whose octets are being read.
#[derive(Debug)]
pub(super) struct Chunk {
    size: u64,
    last: bool,
    fate: Fate,
}

impl Session {
    /// `BDAT size [LAST]`: decides the chunk's fate now; its octets follow.
    pub(super) fn bdat(&mut self, size: u64, last: bool, policy: &Policy) -> Step {
        if !self.is_esmtp() {
            return Step::Close(bdat_not_offered());
        }
        let fate = match (&self.chunks, &self.transaction) {
            (Chunks::Failed, _) => Fate::Discard(Reply::syntax(
                503,
                "5.5.1",
                format!("Error: {size} octets discarded after an earlier error"),
            )),
            (_, None) => Fate::Refuse(Reply::syntax(503, "5.5.1", "Error: need MAIL command")),
            (_, Some(t)) if t.recipients.is_empty() => {
                Fate::Refuse(Reply::syntax(503, "5.5.1", "Error: need RCPT command"))
            }
            (Chunks::Receiving(content), _)
                if content.octets().saturating_add(size) > policy.max_message_size =>
            {
                Fate::Refuse(too_big())
            }
            (Chunks::None, _) if size > policy.max_message_size => Fate::Refuse(too_big()),
            _ => Fate::Keep,
        };
        if let Fate::Refuse(reply) = &fate
            && reply.code == 503
        {
            // Out of order is the client's mistake (the size limit is ours).
            self.errors += 1;
            if self.errors >= MAX_ERRORS {
                return Step::Close(too_many_errors());
            }
        }
        if matches!(fate, Fate::Keep) && matches!(self.chunks, Chunks::None) {
            self.chunks = Chunks::Receiving(ChunkReader::new(policy.max_message_size));
        }
        self.reading = Some(Chunk { size, last, fate });
        Step::Chunk { size }
    }

    /// The next octets of the chunk being read (all of them, in order, in
    /// pieces of any size). Octets of a refused chunk are dropped.
    pub fn chunk(&mut self, octets: &[u8]) {
        if let (
            Some(Chunk {
                fate: Fate::Keep, ..
            }),
            Chunks::Receiving(content),
        ) = (&self.reading, &mut self.chunks)
        {
            content.feed(octets);
        }
    }

    /// The chunk's octets have all been read: what to answer, or the message
    /// to commit after a LAST chunk. The transaction ends with a LAST chunk
    /// and with any refusal.
    pub fn end_chunk(&mut self, policy: &Policy) -> Chunked {
        let Some(Chunk { size, last, fate }) = self.reading.take() else {
            return Chunked::Reply(Reply::syntax(503, "5.5.1", "Error: no chunk was announced"));
        };
        let refused = match fate {
            Fate::Keep if matches!(&self.chunks, Chunks::Receiving(c) if c.oversize()) => {
                Some(Chunked::Reply(too_big()))
            }
            Fate::Keep => None,
            Fate::Refuse(reply) => Some(Chunked::Reply(reply)),
            Fate::Discard(reply) => Some(Chunked::Discarded(reply)),
        };
        if let Some(refused) = refused {
            self.transaction = None;
            self.chunks = if last { Chunks::None } else { Chunks::Failed };
            return refused;
        }
        if !last {
            return Chunked::Reply(Reply::new(250, "2.0.0", format!("Ok: {size} octets")));
        }
        let Chunks::Receiving(content) = std::mem::replace(&mut self.chunks, Chunks::None) else {
            return Chunked::Reply(Reply::syntax(503, "5.5.1", "Error: need MAIL command"));
        };
        let data = content.finish();
        match self.finish_data(&data, policy) {
            Ok(transaction) => Chunked::Message(transaction, data),
            Err(reply) => Chunked::Reply(reply),
        }
    }
}

/// CHUNKING is offered in the EHLO reply only. The chunk's octets follow the
/// command, and without the extension we cannot tell them from commands: stop
/// listening rather than guess.
pub(super) fn bdat_not_offered() -> Reply {
    Reply::syntax(
        503,
        "5.5.1",
        "Error: BDAT without CHUNKING; closing connection",
    )
}

/// Whether a line is a BDAT command, well-formed or not.
pub(super) fn is_bdat(line: &[u8]) -> bool {
    line.len() >= 4
        && line[..4].eq_ignore_ascii_case(b"BDAT")
        && matches!(line.get(4), None | Some(b' ' | b'\t' | b'\r' | b'\n'))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{local, plain, run};
    use super::*;
    use crate::inbound::policy;

    /// Gives `command` (a BDAT) and then `octets` in pieces of 3; returns what
    /// became of the chunk.
    fn bdat(s: &mut Session, p: &Policy, command: &str, octets: &[u8]) -> Chunked {
        let step = s.command(format!("{command}\r\n").as_bytes(), &plain(p));
        let Step::Chunk { size } = step else {
            panic!("{command}: {step:?}");
        };
        assert_eq!(size, octets.len() as u64, "{command}");
        for piece in octets.chunks(3) {
            s.chunk(piece);
        }
        s.end_chunk(p)
    }

    /// The reply code of a chunk's outcome; 0 for a message to commit.
    fn chunk_code(outcome: &Chunked) -> u16 {
        match outcome {
            Chunked::Reply(r) | Chunked::Discarded(r) => r.code,
            Chunked::Message(..) => 0,
        }
    }

    fn ready(s: &mut Session, p: &Policy) {
        run(
            s,
            p,
            &[
                ("MAIL FROM:<a@b.test>", 250),
                ("RCPT TO:<x@example.com>", 250),
            ],
        );
    }

    #[test]
    fn chunking_is_offered_to_ehlo_clients_only() {
        let p = policy::sample();
        let env = plain(&p);
        let mut s = local();
        let Step::Reply(ehlo) = s.command(b"EHLO c\r\n", &env) else {
            panic!("EHLO")
        };
        assert!(ehlo.lines.contains(&"CHUNKING".to_string()), "{ehlo}");

        for greeting in [None, Some("HELO c")] {
            let mut s = local();
            if let Some(g) = greeting {
                run(&mut s, &p, &[(g, 250), ("MAIL FROM:<a@b.test>", 250)]);
            }
            let step = s.command(b"BDAT 10 LAST\r\n", &env);
            assert!(
                matches!(step, Step::Close(ref r) if r.code == 503),
                "{greeting:?}: {step:?}"
            );
        }
    }

    #[test]
    fn chunks_make_one_message_with_crlf_line_endings() {
        let p = policy::sample();
        let mut s = local();
        run(&mut s, &p, &[("EHLO c", 250)]);
        ready(&mut s, &p);
        let first = bdat(&mut s, &p, "BDAT 6", b"ab\r\n.\r");
        assert_eq!(
            first,
            Chunked::Reply(Reply::new(250, "2.0.0", "Ok: 6 octets"))
        );
        // The envelope is settled and DATA is over once content has begun;
        // these refusals leave the transaction alone.
        run(
            &mut s,
            &p,
            &[
                ("RCPT TO:<y@example.com>", 503),
                ("DATA", 503),
                ("MAIL FROM:<a@b.test>", 503),
                ("NOOP", 250),
            ],
        );
        assert_eq!(chunk_code(&bdat(&mut s, &p, "bdat 0", b"")), 250);
        let last = bdat(&mut s, &p, "BDAT 4 last", b"\nx\r\xe9");
        let Chunked::Message(t, data) = last else {
            panic!("{last:?}")
        };
        assert_eq!(t.recipients.len(), 1);
        // The last line gets the line break it lacked.
        assert_eq!(data.body, b"ab\r\n.\r\nx\r\n\xe9\r\n");
        assert!(data.normalised);
        assert!(data.has_8bit);
        // The transaction is over: a chunk after LAST is out of order.
        assert_eq!(chunk_code(&bdat(&mut s, &p, "BDAT 1 LAST", b"x")), 503);
    }

    #[test]
    fn bdat_0_last_alone_is_an_empty_message() {
        let p = policy::sample();
        let mut s = local();
        run(&mut s, &p, &[("EHLO c", 250)]);
        ready(&mut s, &p);
        let Chunked::Message(_, data) = bdat(&mut s, &p, "BDAT 0 LAST", b"") else {
            panic!("BDAT 0 LAST")
        };
        assert!(data.body.is_empty());
    }

    #[test]
    fn chunks_out_of_order_are_read_and_refused() {
        let p = policy::sample();
        let mut s = local();
        run(&mut s, &p, &[("EHLO c", 250)]);
        let no_mail = bdat(&mut s, &p, "BDAT 3 LAST", b"abc");
        assert_eq!(
            no_mail,
            Chunked::Reply(Reply::syntax(503, "5.5.1", "Error: need MAIL command"))
        );
        run(&mut s, &p, &[("MAIL FROM:<a@b.test>", 250)]);
        let no_rcpt = bdat(&mut s, &p, "BDAT 3 LAST", b"abc");
        assert_eq!(
            no_rcpt,
            Chunked::Reply(Reply::syntax(503, "5.5.1", "Error: need RCPT command"))
        );
        // Either refusal ended the transaction.
        run(&mut s, &p, &[("RCPT TO:<x@example.com>", 503)]);
    }

    #[test]
    fn after_a_refused_chunk_the_pipelined_ones_are_discarded_until_last() {
        let p = policy::sample();
        let mut s = local();
        run(&mut s, &p, &[("EHLO c", 250)]);
        ready(&mut s, &p);
        assert_eq!(chunk_code(&bdat(&mut s, &p, "BDAT 600", &[b'a'; 600])), 250);
        // 600 + 401 > 1000: refused, the transaction is over.
        let over = bdat(&mut s, &p, "BDAT 401", &[b'a'; 401]);
        assert_eq!(over, Chunked::Reply(too_big()));
        // More than MAX_ERRORS of them: the client's pipeline, not its errors.
        for _ in 0..MAX_ERRORS + 2 {
            let next = bdat(&mut s, &p, "BDAT 2", b"ab");
            assert!(
                matches!(&next, Chunked::Discarded(r) if r.code == 503),
                "{next:?}"
            );
        }
        let last = bdat(&mut s, &p, "BDAT 1 LAST", b"b");
        assert!(
            matches!(&last, Chunked::Discarded(r) if r.code == 503),
            "{last:?}"
        );
        // After LAST the client starts afresh; exactly the limit is fine.
        ready(&mut s, &p);
        let mut full = vec![b'a'; 998];
        full.extend_from_slice(b"\r\n");
        assert_eq!(chunk_code(&bdat(&mut s, &p, "BDAT 1000 LAST", &full)), 0);

        // RSET and MAIL end the discarding too.
        for restart in ["RSET", "MAIL FROM:<a@b.test>"] {
            ready(&mut s, &p);
            assert_eq!(
                chunk_code(&bdat(&mut s, &p, "BDAT 1001", &[b'a'; 1001])),
                552
            );
            run(&mut s, &p, &[(restart, 250)]);
            if restart == "RSET" {
                run(&mut s, &p, &[("MAIL FROM:<a@b.test>", 250)]);
            }
            run(&mut s, &p, &[("RCPT TO:<x@example.com>", 250)]);
            assert_eq!(chunk_code(&bdat(&mut s, &p, "BDAT 1 LAST", b"z")), 0);
        }
    }

    #[test]
    fn normalisation_can_take_chunks_over_the_limit() {
        let p = policy::sample();
        let mut s = local();
        run(&mut s, &p, &[("EHLO c", 250)]);
        ready(&mut s, &p);
        // 600 bare LFs are 1200 octets stored.
        let over = bdat(&mut s, &p, "BDAT 600 LAST", &[b'\n'; 600]);
        assert_eq!(over, Chunked::Reply(too_big()));
    }

    #[test]
    fn rset_drops_the_chunks_received() {
        let p = policy::sample();
        let mut s = local();
        run(&mut s, &p, &[("EHLO c", 250)]);
        ready(&mut s, &p);
        assert_eq!(chunk_code(&bdat(&mut s, &p, "BDAT 3", b"old")), 250);
        run(&mut s, &p, &[("RSET", 250)]);
        ready(&mut s, &p);
        let Chunked::Message(_, data) = bdat(&mut s, &p, "BDAT 3 LAST", b"new") else {
            panic!("BDAT 3 LAST")
        };
        assert_eq!(data.body, b"new\r\n");
    }

    #[test]
    fn the_last_chunk_gets_the_loop_check() {
        let p = policy::sample();
        let mut s = local();
        run(&mut s, &p, &[("EHLO c", 250)]);
        ready(&mut s, &p);
        let hops = "Received: x\r\n".repeat(5);
        let looped = bdat(
            &mut s,
            &p,
            &format!("BDAT {} LAST", hops.len()),
            hops.as_bytes(),
        );
        assert_eq!(chunk_code(&looped), 554);
    }

    #[test]
    fn a_malformed_bdat_closes_the_connection() {
        let p = policy::sample();
        let env = plain(&p);
        for line in [
            "BDAT",
            "BDAT x",
            "BDAT 12x LAST",
            "BDAT 5 FIRST",
            "BDAT -1",
            "bdat LAST",
        ] {
            let mut s = local();
            run(&mut s, &p, &[("EHLO c", 250)]);
            ready(&mut s, &p);
            let step = s.command(format!("{line}\r\n").as_bytes(), &env);
            assert!(
                matches!(step, Step::Close(ref r) if r.code == 501 && r.status == "5.5.4"),
                "{line}: {step:?}"
            );
        }
    }

    #[test]
    fn out_of_order_chunks_count_towards_the_error_limit() {
        let p = policy::sample();
        let env = plain(&p);
        let mut s = local();
        run(&mut s, &p, &[("EHLO c", 250)]);
        for _ in 1..MAX_ERRORS {
            assert_eq!(chunk_code(&bdat(&mut s, &p, "BDAT 1 LAST", b"x")), 503);
        }
        let step = s.command(b"BDAT 1 LAST\r\n", &env);
        assert!(
            matches!(step, Step::Close(ref r) if r.code == 421),
            "{step:?}"
        );
    }
}
