//! Lines too long for the next hop, broken before they go (pure). RFC 5321
//! §4.5.3.1.6 lets a server refuse a line over 998 octets (1,000 with CRLF),
//! and many do; we accept such lines, so we must not hand them on as they
//! are. Like Postfix's `smtp_line_length_limit`, a line longer than the limit
//! is cut into pieces and every piece after the first starts with white
//! space: a header line stays one (folded) header field, and no piece can
//! start with a dot. Where the line has white space within the limit, it is
//! broken just before it, so unfolding gives back exactly the original;
//! otherwise CRLF and a space are inserted at the limit. A line that starts
//! with a dot counts one octet more: the dot DATA adds to it (RFC 5321
//! §4.5.2) is on the wire too.
//!
//! It never looks at what the lines mean (header, body, MIME part): it only
//! cuts.

use std::sync::Arc;

/// `body` with every line longer than `limit` octets (CRLF not counted)
/// broken, and how many lines were; `None` when no line is that long (or
/// `limit` is 0), so the caller keeps the original without a copy.
pub(crate) fn break_long(body: &Arc<Vec<u8>>, limit: usize) -> Option<(Arc<Vec<u8>>, usize)> {
    // Every message to a next hop passes here: find line ends with memchr,
    // and a body no longer than the limit cannot hold a line over it.
    let mut start = 0;
    let too_long = limit > 0
        && body.len() >= limit
        && memchr::memchr_iter(b'\n', body)
            .chain(std::iter::once(body.len()))
            .any(|end| {
                let line = &body[start..end];
                start = end + 1;
                wire_len(content(line)) > limit
            });
    if !too_long {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() + body.len() / limit * 3 + 3);
    let mut broken = 0;
    for line in body.split_inclusive(|&b| b == b'\n') {
        let text = content(line);
        if wire_len(text) > limit {
            broken += 1;
            cut(text, limit, &mut out);
            out.extend_from_slice(&line[text.len()..]);
        } else {
            out.extend_from_slice(line);
        }
    }
    Some((Arc::new(out), broken))
}

/// A line without its line ending (LF, or CRLF).
fn content(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The length of a line as DATA sends it: a leading dot is doubled.
fn wire_len(line: &[u8]) -> usize {
    line.len() + usize::from(line.starts_with(b"."))
}

fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Writes `line` (no line ending) as pieces of at most `limit` octets, each
/// after the first starting with white space, separated by CRLF.
fn cut(line: &[u8], limit: usize, out: &mut Vec<u8>) {
    let mut rest = line;
    // Octets on the output line that are not in `rest`: the space we
    // inserted, or the dot that dot-stuffing will add.
    let mut lead = usize::from(line.starts_with(b"."));
    while lead + rest.len() > limit {
        // At least one octet per piece, whatever the limit.
        let room = (limit - lead.min(limit)).max(1);
        // Break before white space that follows something other than white
        // space, so no piece is blank (a blank line would end a header)
        // unless the line holds a run of white space longer than the limit.
        let first = rest.iter().position(|&b| !is_wsp(b)).unwrap_or(rest.len());
        let at = rest
            .get(first + 1..=room.min(rest.len() - 1))
            .and_then(|window| window.iter().rposition(|&b| is_wsp(b)))
            .map(|i| first + 1 + i);
        match at {
            Some(at) => {
                out.extend_from_slice(&rest[..at]);
                out.extend_from_slice(b"\r\n");
                rest = &rest[at..];
                lead = 0;
            }
            None => {
                out.extend_from_slice(&rest[..room]);
                out.extend_from_slice(b"\r\n ");
                rest = &rest[room..];
                lead = 1;
            }
        }
    }
    out.extend_from_slice(rest);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(body: &[u8], limit: usize) -> Option<(Vec<u8>, usize)> {
        break_long(&Arc::new(body.to_vec()), limit).map(|(b, n)| (b.to_vec(), n))
    }

    /// Every line within `limit`, and every piece after a line's first
    /// starting with white space.
    fn check(out: &[u8], limit: usize) {
        for line in out.split(|&b| b == b'\n') {
            assert!(
                wire_len(content(line)) <= limit,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    /// Unfolding as RFC 5322 §2.2.3 does: CRLF before white space removed.
    fn unfold(text: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < text.len() {
            if text[i..].starts_with(b"\r\n") && text.get(i + 2).is_some_and(|&b| is_wsp(b)) {
                i += 2;
            } else {
                out.push(text[i]);
                i += 1;
            }
        }
        out
    }

    #[test]
    fn short_lines_are_left_alone_without_a_copy() {
        assert_eq!(run(b"a\r\nbb\r\n", 2), None);
        assert_eq!(run(b"", 2), None);
        // The limit excludes CRLF; 0 means never.
        let line = vec![b'x'; 998];
        assert_eq!(run(&[&line[..], b"\r\n"].concat(), 998), None);
        assert_eq!(run(&vec![b'x'; 5000], 0), None);
    }

    #[test]
    fn breaks_before_white_space_so_unfolding_restores_the_line() {
        let (out, n) = run(b"Subject: one two three\r\n\r\nbody\r\n", 12).unwrap();
        assert_eq!(n, 1);
        assert_eq!(out, b"Subject: one\r\n two three\r\n\r\nbody\r\n");
        let header: Vec<u8> = [b"X-Long:", &b" word".repeat(400)[..]].concat();
        let body = [&header[..], b"\r\n\r\nhi\r\n"].concat();
        let (out, n) = run(&body, 998).unwrap();
        assert_eq!(n, 1);
        check(&out, 998);
        assert_eq!(unfold(&out), body);
    }

    #[test]
    fn without_white_space_inserts_crlf_and_a_space_at_the_limit() {
        let (out, n) = run(b"abcdefghij\r\n.xy\r\n", 4).unwrap();
        assert_eq!(n, 1);
        assert_eq!(out, b"abcd\r\n efg\r\n hij\r\n.xy\r\n");
        // A long body line of 1,002 octets, a dot first: it counts the dot
        // dot-stuffing adds, and the continuation starts with a space.
        let line = [&b"."[..], &vec![b'y'; 1001]].concat();
        let (out, _) = run(&[&line[..], b"\r\n"].concat(), 998).unwrap();
        check(&out, 998);
        let pieces: Vec<&[u8]> = out.split(|&b| b == b'\n').collect();
        assert_eq!(pieces.len(), 3, "{pieces:?}");
        // 997 octets, the dot among them, and CR: 998 with the stuffed dot.
        assert_eq!(pieces[0].len(), 997 + 1, "{pieces:?}");
        assert_eq!(pieces[1], [&b" "[..], &[b'y'; 5], b"\r"].concat());
        // 998 octets and a dot first are 999 on the wire: broken too.
        let dotted = [&b"."[..], &vec![b'z'; 997]].concat();
        assert!(run(&dotted, 998).is_some());
        assert_eq!(run(&dotted[1..], 998), None);
        // A last line without a line ending is broken too, and stays unended.
        assert_eq!(run(b"abcdef", 4).unwrap().0, b"abcd\r\n ef");
    }

    #[test]
    fn pieces_are_never_blank_and_every_limit_makes_progress() {
        let (out, _) = run(b"a   b  c    d\r\n", 4).unwrap();
        check(&out, 4);
        assert_eq!(out, b"a  \r\n b \r\n c  \r\n  d\r\n");
        // Only a run of white space longer than the limit makes a blank piece.
        let (out, _) = run(b"a      b\r\n", 3).unwrap();
        check(&out, 3);
        for limit in 1..12 {
            let body = b"Received: from a (b [192.0.2.1])\tby c; Mon, 1 Jan\r\n";
            let (out, _) = run(body, limit).unwrap();
            check(&out, limit.max(2));
            // Nothing but line breaks and spaces is added, nothing lost.
            let visible = |b: &[u8]| -> Vec<u8> {
                b.iter()
                    .copied()
                    .filter(|&c| !b" \t\r\n".contains(&c))
                    .collect()
            };
            assert_eq!(visible(&out), visible(body), "limit {limit}");
            assert!(out.ends_with(b"\r\n"));
        }
    }
}
