//! Message content as pure byte filters: [`DataReader`] for DATA (finds the end
//! of the message, undoes dot-stuffing) and [`ChunkReader`] for BDAT chunks
//! (RFC 3030). Both normalise line endings and enforce the size limit the same
//! way, so what is stored does not depend on how the client sent it.
//!
//! Only `CRLF . CRLF` ends the data (RFC 5321 §4.1.1.4). A bare LF or bare CR is
//! normalised to CRLF, but a line ended (or begun) by one never counts towards the
//! terminator, so `\n.\n`, `\r\n.\n` and `\n.\r\n` stay content: no SMTP smuggling.
//!
//! BDAT content has no terminator and no dot-stuffing: its length is given by
//! the command, and a line holding a single dot is just content. It is not
//! un-stuffed. Bare LF and bare CR become CRLF as for DATA (a CR ending one
//! chunk and an LF starting the next are one CRLF), and content whose last
//! line has no line break gets CRLF, as DATA content always ends in one. So a
//! message that arrived by BDAT is as safe to forward by DATA as one that
//! arrived by DATA, and what the next hop gets is what we stored.
//!
//! The stored result therefore holds only CRLF line endings; the delivery side
//! dot-stuffs it again, so what we forward cannot end a message early either.

/// What the reader made of the data once the terminator arrived.
#[derive(Debug, PartialEq, Eq)]
pub struct Data {
    /// The message with CRLF line endings and dot-stuffing removed; empty if
    /// `oversize` (the bytes were counted, not kept).
    pub body: Vec<u8>,
    /// Bytes of content the client sent after normalisation.
    pub size: u64,
    /// The content was larger than allowed; `body` was discarded.
    pub oversize: bool,
    /// Some byte above 127 appeared (the content is 8-bit).
    pub has_8bit: bool,
    /// Bare CR or LF line endings were rewritten to CRLF.
    pub normalised: bool,
}

/// What both readers keep: the content with CRLF line endings, counted
/// against the size limit. Bytes beyond the limit are counted, not kept, so a
/// client cannot make us hold more than the limit whatever it sends.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Body {
    bytes: Vec<u8>,
    max: u64,
    size: u64,
    oversize: bool,
    has_8bit: bool,
    normalised: bool,
}

impl Body {
    fn new(max: u64) -> Body {
        Body {
            bytes: Vec::new(),
            max,
            size: 0,
            oversize: false,
            has_8bit: false,
            normalised: false,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.size += bytes.len() as u64;
        if !self.has_8bit && bytes.iter().any(|&b| b >= 0x80) {
            self.has_8bit = true;
        }
        if self.size > self.max {
            if !self.oversize {
                self.oversize = true;
                self.bytes = Vec::new();
            }
        } else {
            self.bytes.extend_from_slice(bytes);
        }
    }

    /// Ends a line with CRLF, however the client ended it.
    fn line_break(&mut self, bare: bool) {
        if bare {
            self.normalised = true;
        }
        self.push(b"\r\n");
    }

    fn finish(&mut self) -> Data {
        Data {
            body: std::mem::take(&mut self.bytes),
            size: self.size,
            oversize: self.oversize,
            has_8bit: self.has_8bit,
            normalised: self.normalised,
        }
    }
}

#[derive(Debug)]
pub struct DataReader {
    body: Body,
    /// The line in progress began right after a real CRLF (or the DATA command),
    /// so a leading dot there is stuffing and a lone dot may end the data.
    clean_start: bool,
    /// Bytes of the current line passed to the body so far.
    line_len: usize,
    /// The current line's leading dot was removed (stuffing, or the terminator).
    dot_removed: bool,
    /// A CR arrived and we wait to see whether LF follows.
    pending_cr: bool,
}

impl DataReader {
    pub fn new(max: u64) -> Self {
        DataReader {
            body: Body::new(max),
            clean_start: true,
            line_len: 0,
            dot_removed: false,
            pending_cr: false,
        }
    }

    /// Consumes bytes of `input` up to and including the terminator. Returns how
    /// many bytes were consumed and, once the terminator was seen, the result.
    pub fn feed(&mut self, input: &[u8]) -> (usize, Option<Data>) {
        let mut i = 0;
        while i < input.len() {
            if self.pending_cr {
                self.pending_cr = false;
                if input[i] == b'\n' {
                    i += 1;
                    if self.clean_start && self.dot_removed && self.line_len == 0 {
                        return (i, Some(self.body.finish()));
                    }
                    self.end_line(true);
                    continue;
                }
                // A bare CR: end the line there, then look at this byte afresh.
                self.end_line(false);
                continue;
            }
            let rest = &input[i..];
            let run = memchr::memchr2(b'\r', b'\n', rest).unwrap_or(rest.len());
            if run > 0 {
                let mut chunk = &rest[..run];
                if self.line_len == 0 && !self.dot_removed && self.clean_start && chunk[0] == b'.' {
                    self.dot_removed = true;
                    chunk = &chunk[1..];
                }
                self.line_len += chunk.len();
                self.body.push(chunk);
                i += run;
                continue;
            }
            match rest[0] {
                b'\r' => self.pending_cr = true,
                // A bare LF.
                _ => self.end_line(false),
            }
            i += 1;
        }
        (i, None)
    }

    /// Emits CRLF for the line just ended; `real_crlf` says how the client ended it.
    fn end_line(&mut self, real_crlf: bool) {
        self.body.line_break(!real_crlf);
        self.line_len = 0;
        self.dot_removed = false;
        self.clean_start = real_crlf;
    }
}

/// BDAT content, fed chunk by chunk (RFC 3030). Nothing in it ends the
/// message (the LAST chunk does) and nothing is un-stuffed; only line endings
/// are normalised, with a CR at the end of one chunk waiting for the next.
/// Memory grows with what arrives, never with what a client declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkReader {
    body: Body,
    /// Octets received as sent, before normalisation.
    octets: u64,
    /// The last byte so far was a CR: LF may follow in this chunk or the next.
    pending_cr: bool,
    /// Content arrived since the last line break.
    mid_line: bool,
}

impl ChunkReader {
    pub fn new(max: u64) -> ChunkReader {
        ChunkReader {
            body: Body::new(max),
            octets: 0,
            pending_cr: false,
            mid_line: false,
        }
    }

    /// Takes the next bytes of content, all of them.
    pub fn feed(&mut self, input: &[u8]) {
        self.octets += input.len() as u64;
        let mut rest = input;
        while let Some(&first) = rest.first() {
            if self.pending_cr {
                self.pending_cr = false;
                if first == b'\n' {
                    self.body.line_break(false);
                    rest = &rest[1..];
                } else {
                    // A bare CR: end the line there, then look at this byte afresh.
                    self.body.line_break(true);
                }
                continue;
            }
            let run = memchr::memchr2(b'\r', b'\n', rest).unwrap_or(rest.len());
            if run > 0 {
                self.body.push(&rest[..run]);
                self.mid_line = true;
                rest = &rest[run..];
                continue;
            }
            self.mid_line = false;
            if first == b'\r' {
                self.pending_cr = true;
            } else {
                self.body.line_break(true);
            }
            rest = &rest[1..];
        }
    }

    /// Octets received so far, as the client counted them in its BDAT commands.
    pub fn octets(&self) -> u64 {
        self.octets
    }

    /// The content, normalised, has outgrown the limit (and is no longer kept).
    pub fn oversize(&self) -> bool {
        self.body.oversize
    }

    /// The message is complete (BDAT LAST). A CR at its very end had no LF
    /// after it: a bare CR, made CRLF like any other. A last line without a
    /// line break gets one.
    pub fn finish(mut self) -> Data {
        if self.pending_cr || self.mid_line {
            self.body.line_break(true);
        }
        self.body.finish()
    }
}

/// Counts `Received:` fields in the header section (RFC 5321 §6.3 loop detection).
pub fn count_received(body: &[u8]) -> usize {
    let mut count = 0;
    for line in body.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:") {
            count += 1;
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; returns the data and the bytes left over.
    fn read(input: &[u8], step: usize, max: u64) -> (Option<Data>, Vec<u8>) {
        let mut reader = DataReader::new(max);
        let mut at = 0;
        while at < input.len() {
            let end = (at + step).min(input.len());
            let (used, done) = reader.feed(&input[at..end]);
            if done.is_some() {
                return (done, input[at + used..].to_vec());
            }
            assert_eq!(used, end - at, "a piece is consumed whole until the end");
            at = end;
        }
        (None, Vec::new())
    }

    #[test]
    fn ends_only_on_crlf_dot_crlf_whatever_the_chunking() {
        // (input, body if the data ended, bytes left over after the terminator)
        type Case = (&'static [u8], Option<&'static [u8]>, &'static [u8]);
        let cases: &[Case] = &[
            (b".\r\n", Some(b""), b""),
            (b"hi\r\n.\r\nQUIT\r\n", Some(b"hi\r\n"), b"QUIT\r\n"),
            (b"..dot\r\n.\r\n", Some(b".dot\r\n"), b""),
            (b"a\r\n..\r\n.\r\n", Some(b"a\r\n.\r\n"), b""),
            // Smuggling attempts never end the data:
            (b"a\n.\nMAIL FROM:<x@y>\r\n", None, b""),
            (b"a\r\n.\nMAIL FROM:<x@y>\r\n", None, b""),
            (b"a\n.\r\nMAIL FROM:<x@y>\r\n", None, b""),
            (b"a\r.\r\nMAIL FROM:<x@y>\r\n", None, b""),
            (b"a\r\n.\rMAIL FROM:<x@y>\r\n", None, b""),
        ];
        for (input, body, leftover) in cases {
            for step in [1, 2, 3, 7, 1000] {
                let (data, rest) = read(input, step, 1 << 20);
                assert_eq!(
                    data.as_ref().map(|d| d.body.as_slice()),
                    *body,
                    "{:?} step {step}",
                    String::from_utf8_lossy(input)
                );
                if body.is_some() {
                    assert_eq!(rest, *leftover);
                }
            }
        }
    }

    #[test]
    fn smuggled_terminators_become_harmless_crlf_content() {
        let input = b"Subject: x\r\n\r\na\n.\nMAIL FROM:<evil@x>\r\nb\r\n.\r\n";
        let (data, rest) = read(input, 5, 1 << 20);
        let data = data.unwrap();
        assert!(rest.is_empty());
        assert!(data.normalised);
        assert_eq!(
            data.body,
            b"Subject: x\r\n\r\na\r\n.\r\nMAIL FROM:<evil@x>\r\nb\r\n".to_vec()
        );
        // Every LF in what we keep is part of a CRLF.
        for (i, &b) in data.body.iter().enumerate() {
            if b == b'\n' {
                assert_eq!(data.body[i - 1], b'\r');
            }
            if b == b'\r' {
                assert_eq!(data.body[i + 1], b'\n');
            }
        }
    }

    #[test]
    fn oversize_is_counted_to_the_end_and_not_kept() {
        let mut input = vec![b'x'; 100];
        input.extend_from_slice(b"\r\n.\r\n");
        let (data, _) = read(&input, 9, 50);
        let data = data.unwrap();
        assert!(data.oversize);
        assert!(data.body.is_empty());
        assert_eq!(data.size, 102);

        let (data, _) = read(&input, 9, 102);
        assert!(!data.unwrap().oversize);
    }

    #[test]
    fn notices_8bit() {
        let (data, _) = read("caf\u{e9}\r\n.\r\n".as_bytes(), 3, 100);
        assert!(data.unwrap().has_8bit);
        let (data, _) = read(b"cafe\r\n.\r\n", 3, 100);
        assert!(!data.unwrap().has_8bit);
    }

    #[test]
    fn counts_received_in_the_header_only() {
        let msg =
            b"Received: a\r\nRECEIVED: b\r\nSubject: s\r\nreceived:c\r\n\r\nReceived: body\r\n";
        assert_eq!(count_received(msg), 3);
        assert_eq!(count_received(b""), 0);
    }

    /// Feeds `input` to a chunk reader in pieces of `step` bytes, then ends it.
    fn chunks(input: &[u8], step: usize, max: u64) -> Data {
        let mut reader = ChunkReader::new(max);
        for piece in input.chunks(step) {
            reader.feed(piece);
        }
        assert_eq!(reader.octets(), input.len() as u64);
        reader.finish()
    }

    #[test]
    fn chunks_get_crlf_line_endings_and_keep_everything_else() {
        // (as sent, as stored)
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b""),
            (b"a\r\nb\r\n", b"a\r\nb\r\n"),
            (b"a\nb\n", b"a\r\nb\r\n"),
            (b"a\rb\r", b"a\r\nb\r\n"),
            (b"a\r\r\nb", b"a\r\n\r\nb\r\n"),
            (b"a\n\r", b"a\r\n\r\n"),
            (b"no line break at the end", b"no line break at the end\r\n"),
            // Dots are content: nothing is un-stuffed, nothing ends the message.
            (b"..two\r\n.\r\nafter\r\n", b"..two\r\n.\r\nafter\r\n"),
            (
                b"a\n.\nMAIL FROM:<x@y>\r\n",
                b"a\r\n.\r\nMAIL FROM:<x@y>\r\n",
            ),
            (b"nul\x00 and \xff\r\n", b"nul\x00 and \xff\r\n"),
        ];
        for (input, want) in cases {
            for step in [1, 2, 3, 7, 1000] {
                let data = chunks(input, step, 1 << 20);
                assert_eq!(
                    data.body,
                    *want,
                    "{:?} step {step}",
                    String::from_utf8_lossy(input)
                );
                assert_eq!(data.size, want.len() as u64);
                assert_eq!(data.normalised, input != want);
            }
        }
    }

    #[test]
    fn a_cr_at_the_end_of_a_chunk_pairs_with_an_lf_at_the_start_of_the_next() {
        let mut reader = ChunkReader::new(100);
        reader.feed(b"a\r");
        reader.feed(b"\nb\r");
        reader.feed(b"c\r\n");
        let data = reader.finish();
        assert_eq!(data.body, b"a\r\nb\r\nc\r\n");
        assert!(data.normalised, "the CR before c was bare");
    }

    #[test]
    fn chunk_content_over_the_limit_is_counted_not_kept() {
        let mut reader = ChunkReader::new(10);
        reader.feed(b"0123456789");
        assert!(!reader.oversize());
        // Normalisation can take content over the limit on its own.
        reader.feed(b"\n");
        assert!(reader.oversize());
        reader.feed(&[b'x'; 1000]);
        assert_eq!(reader.octets(), 1011);
        let data = reader.finish();
        assert!(data.oversize);
        assert!(data.body.is_empty());
        // Counted to the end, the final line break included.
        assert_eq!(data.size, 1014);
    }

    #[test]
    fn chunks_notice_8bit() {
        assert!(chunks("caf\u{e9}".as_bytes(), 4, 100).has_8bit);
        assert!(!chunks(b"cafe", 1, 100).has_8bit);
    }
}
