//! The message body as it goes on the wire after DATA: dot-stuffed, CRLF line
//! endings only, then the terminating `.`. A pure byte filter fed in pieces, so a
//! large body is sent in blocks without a second copy of it in memory.
//!
//! The spool stores bodies already CRLF-normalised, but this filter does not
//! rely on it: a bare CR or bare LF is sent as CRLF, and every line that begins
//! with `.` gets another one. Whatever the stored bytes, the next hop sees the
//! message end exactly where we end it (no SMTP smuggling through us).

/// The content of `BDAT n LAST` (RFC 3030): no dot-stuffing and no
/// terminator, but the same line discipline as after DATA, so what the next
/// hop reads is the same message either way: CRLF line endings only, and a
/// final CRLF. Bodies in the spool are stored that way already and are
/// borrowed as they are; anything else is rewritten.
pub(crate) fn crlf_clean(body: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if is_crlf_clean(body) {
        return std::borrow::Cow::Borrowed(body);
    }
    let mut out = Vec::with_capacity(body.len() + body.len() / 32 + 2);
    let mut rest = body;
    while let Some(at) = memchr::memchr2(b'\r', b'\n', rest) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(b"\r\n");
        let crlf = rest[at] == b'\r' && rest.get(at + 1) == Some(&b'\n');
        rest = &rest[at + if crlf { 2 } else { 1 }..];
    }
    out.extend_from_slice(rest);
    if !rest.is_empty() {
        out.extend_from_slice(b"\r\n");
    }
    std::borrow::Cow::Owned(out)
}

/// Every CR is followed by LF, every LF preceded by CR, and the last line ends.
fn is_crlf_clean(body: &[u8]) -> bool {
    if !(body.is_empty() || body.ends_with(b"\r\n")) {
        return false;
    }
    let mut at = 0;
    while let Some(found) = memchr::memchr2(b'\r', b'\n', &body[at..]) {
        let i = at + found;
        if body[i] == b'\n' || body.get(i + 1) != Some(&b'\n') {
            return false;
        }
        at = i + 2;
    }
    true
}

/// The state carried from one piece of the body to the next.
#[derive(Debug)]
pub(crate) struct DotStuffer {
    /// Nothing of the current line has been written yet.
    line_start: bool,
    /// The last byte was a CR; whether it ends a line with the LF that may follow
    /// or stands alone, it becomes CRLF.
    pending_cr: bool,
}

impl DotStuffer {
    pub(crate) fn new() -> DotStuffer {
        DotStuffer {
            line_start: true,
            pending_cr: false,
        }
    }

    /// Appends the wire form of `input` to `out`.
    pub(crate) fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut rest = input;
        if self.pending_cr && !rest.is_empty() {
            self.pending_cr = false;
            if rest[0] == b'\n' {
                rest = &rest[1..];
            }
            self.end_line(out);
        }
        while !rest.is_empty() {
            if self.line_start && rest[0] == b'.' {
                out.push(b'.');
            }
            match memchr::memchr2(b'\r', b'\n', rest) {
                None => {
                    out.extend_from_slice(rest);
                    self.line_start = false;
                    return;
                }
                Some(at) => {
                    out.extend_from_slice(&rest[..at]);
                    if rest[at] == b'\r' {
                        match rest.get(at + 1) {
                            // The piece ends on a CR: wait for the next byte.
                            None => {
                                self.pending_cr = true;
                                self.line_start = false;
                                return;
                            }
                            Some(b'\n') => rest = &rest[at + 2..],
                            Some(_) => rest = &rest[at + 1..],
                        }
                    } else {
                        rest = &rest[at + 1..];
                    }
                    self.end_line(out);
                }
            }
        }
    }

    /// Ends the body: closes an unterminated last line, then writes `.` CRLF.
    pub(crate) fn finish(mut self, out: &mut Vec<u8>) {
        if self.pending_cr || !self.line_start {
            self.end_line(out);
        }
        out.extend_from_slice(b".\r\n");
    }

    fn end_line(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"\r\n");
        self.line_start = true;
        self.pending_cr = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the filter over `body` cut into pieces at `cuts`.
    fn stuff(body: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut stuffer = DotStuffer::new();
        let mut at = 0;
        for &cut in cuts.iter().chain(std::iter::once(&body.len())) {
            stuffer.feed(&body[at..cut], &mut out);
            at = cut;
        }
        stuffer.finish(&mut out);
        out
    }

    /// What a receiver that follows RFC 5321 §4.5.2 reads back: lines up to the
    /// lone dot, a leading dot removed.
    fn unstuff(wire: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        for line in wire.split_inclusive(|&b| b == b'\n') {
            if line == b".\r\n" {
                return body;
            }
            body.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
        }
        panic!("no terminator in {:?}", String::from_utf8_lossy(wire));
    }

    fn check_wire(wire: &[u8]) {
        assert!(wire.ends_with(b".\r\n"));
        for (i, &b) in wire.iter().enumerate() {
            if b == b'\n' {
                assert_eq!(wire[i - 1], b'\r', "bare LF at {i}");
            }
            if b == b'\r' {
                assert_eq!(wire.get(i + 1), Some(&b'\n'), "bare CR at {i}");
            }
        }
        // The only lone dot is the terminator.
        let lone = wire
            .split_inclusive(|&b| b == b'\n')
            .filter(|line| *line == b".\r\n")
            .count();
        assert_eq!(lone, 1, "{:?}", String::from_utf8_lossy(wire));
    }

    #[test]
    fn stuffs_and_terminates() {
        let cases: [(&[u8], &[u8]); 10] = [
            (b"", b".\r\n"),
            (b"a\r\n", b"a\r\n.\r\n"),
            (b"a", b"a\r\n.\r\n"),
            (b".\r\n", b"..\r\n.\r\n"),
            (b"..x\r\n", b"...x\r\n.\r\n"),
            (b"a\r\n.b\r\n.\r\n", b"a\r\n..b\r\n..\r\n.\r\n"),
            (b"a.b\r\n", b"a.b\r\n.\r\n"),
            // Bare line endings are sent as CRLF, and count as line starts.
            (b"a\n.\nb", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a\r.\rb\r", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"\n\r\r\n", b"\r\n\r\n\r\n.\r\n"),
        ];
        for (body, wire) in cases {
            for cut in 0..=body.len() {
                assert_eq!(
                    stuff(body, &[cut]),
                    wire,
                    "{:?} cut at {cut}",
                    String::from_utf8_lossy(body)
                );
            }
        }
    }

    #[test]
    fn crlf_bodies_come_back_byte_exact_whatever_the_pieces() {
        let body = b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\nmiddle.\r\n\r\n.\r\nend";
        let mut expected = body.to_vec();
        expected.extend_from_slice(b"\r\n");
        for a in 0..body.len() {
            for b in a..body.len() {
                let wire = stuff(body, &[a, b]);
                check_wire(&wire);
                assert_eq!(unstuff(&wire), expected, "cuts {a} {b}");
            }
        }
    }

    #[test]
    fn chunk_content_is_crlf_clean_and_borrowed_when_it_already_is() {
        let cases: [(&[u8], &[u8], bool); 9] = [
            (b"", b"", true),
            (b"a\r\n", b"a\r\n", true),
            (b".\r\n..\r\n", b".\r\n..\r\n", true),
            (b"a", b"a\r\n", false),
            (b"a\nb\n", b"a\r\nb\r\n", false),
            (b"a\rb\r\n", b"a\r\nb\r\n", false),
            (b"a\r\n\r", b"a\r\n\r\n", false),
            (b"\n.\n", b"\r\n.\r\n", false),
            (b"x\r\r\n", b"x\r\n\r\n", false),
        ];
        for (body, wire, borrowed) in cases {
            let clean = crlf_clean(body);
            assert_eq!(&clean[..], wire, "{:?}", String::from_utf8_lossy(body));
            assert_eq!(
                matches!(clean, std::borrow::Cow::Borrowed(_)),
                borrowed,
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn smuggling_bytes_never_end_the_data_early() {
        let body = b"a\n.\nMAIL FROM:<x@y>\r\n\r.\r\n\r\n.\rRCPT\n";
        for cut in 0..=body.len() {
            check_wire(&stuff(body, &[cut]));
        }
    }
}
