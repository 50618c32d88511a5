//! Declared 8-bit MIME made 7-bit for a next hop without 8BITMIME (RFC 6152
//! §3, as Postfix does it): every leaf part with 8-bit octets is re-encoded,
//! as quoted-printable when it is text, as base64 otherwise, and its
//! `Content-Transfer-Encoding` says so. Multiparts are walked part by part,
//! and a message/rfc822 part is converted as a message of its own. Parts
//! without 8-bit octets are copied byte for byte, headers and all.
//!
//! What cannot be converted is refused, never sent raw: 8-bit octets in a
//! header (only SMTPUTF8 allows those), a multipart without its boundary
//! parameter, 8-bit octets outside every part of a multipart, or in a part
//! that claims to be base64 or quoted-printable already.
//!
//! Pure: bytes in, bytes out. It never decides whether conversion is needed.

/// Nesting deeper than this is refused, so hostile input cannot exhaust the stack.
const MAX_DEPTH: usize = 32;

/// Quoted-printable and base64 lines (RFC 2045 §6.7, §6.8): at most 76 characters.
const LINE: usize = 76;

/// Why a message could not be converted to 7-bit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Unconvertible {
    #[error("a header holds 8-bit octets")]
    Header,
    #[error("a multipart has no boundary parameter")]
    NoBoundary,
    #[error("8-bit octets outside the parts of a multipart")]
    OutsideParts,
    #[error("8-bit octets in a part declared as {0}")]
    AlreadyEncoded(String),
    #[error("MIME parts nested more than {MAX_DEPTH} deep")]
    TooDeep,
}

/// `message` with every 8-bit leaf part re-encoded; the result has no octet
/// above 127 and decodes to the same content.
pub(crate) fn to_7bit(message: &[u8]) -> Result<Vec<u8>, Unconvertible> {
    let mut out = Vec::with_capacity(message.len() + message.len() / 3);
    entity(message, Kind::Text, true, 0, &mut out)?;
    if has_8bit(&out) {
        // Not reached: every path above encodes or refuses. Never send raw.
        return Err(Unconvertible::OutsideParts);
    }
    Ok(out)
}

fn has_8bit(bytes: &[u8]) -> bool {
    bytes.iter().any(|&b| b >= 0x80)
}

/// The default type of an entity with no Content-Type (RFC 2046 §5.1.5:
/// message/rfc822 inside multipart/digest, text/plain elsewhere).
#[derive(Clone, Copy)]
enum Kind {
    Text,
    Message,
}

/// Converts one entity (a message or a body part: headers, blank line, body)
/// into `out`. `top`: the message itself, which needs `MIME-Version`.
fn entity(
    input: &[u8],
    default: Kind,
    top: bool,
    depth: usize,
    out: &mut Vec<u8>,
) -> Result<(), Unconvertible> {
    if !has_8bit(input) {
        out.extend_from_slice(input);
        return Ok(());
    }
    if depth > MAX_DEPTH {
        return Err(Unconvertible::TooDeep);
    }
    let (head, body) = split_entity(input);
    if has_8bit(head) {
        return Err(Unconvertible::Header);
    }
    let fields = fields(head);
    let content_type = field(&fields, "content-type").map(|v| parse_type(&v));
    let encoding = field(&fields, "content-transfer-encoding")
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let (media, params) = match content_type {
        Some(ct) => ct,
        None => match default {
            Kind::Text => ("text/plain".to_string(), Vec::new()),
            Kind::Message => ("message/rfc822".to_string(), Vec::new()),
        },
    };
    if let Some(subtype) = media.strip_prefix("multipart/") {
        let boundary = params
            .iter()
            .find(|(k, _)| k == "boundary")
            .map(|(_, v)| v.as_bytes())
            .filter(|b| !b.is_empty())
            .ok_or(Unconvertible::NoBoundary)?;
        let inner = if subtype == "digest" {
            Kind::Message
        } else {
            Kind::Text
        };
        rewrite_head(head, "7bit", top, out);
        return multipart(body, boundary, inner, depth, out);
    }
    let composite = media == "message/rfc822" || media == "message/global";
    if composite && matches!(encoding.as_str(), "" | "7bit" | "8bit" | "binary") {
        rewrite_head(head, "7bit", top, out);
        // A message of its own: it needs MIME-Version as much as the outer one.
        return entity(body, Kind::Text, true, depth + 1, out);
    }
    if matches!(encoding.as_str(), "base64" | "quoted-printable") {
        return Err(Unconvertible::AlreadyEncoded(encoding));
    }
    if media.starts_with("text/") && !body.contains(&0) {
        rewrite_head(head, "quoted-printable", top, out);
        quoted_printable(body, out);
    } else {
        rewrite_head(head, "base64", top, out);
        base64(body, out);
    }
    Ok(())
}

/// The header block (its last line's CRLF included, the blank line not) and
/// the body. With no blank line the whole entity is header.
fn split_entity(input: &[u8]) -> (&[u8], &[u8]) {
    if input.starts_with(b"\r\n") {
        return (&[], &input[2..]);
    }
    if input.starts_with(b"\n") {
        return (&[], &input[1..]);
    }
    let mut at = 0;
    for line in input.split_inclusive(|&b| b == b'\n') {
        at += line.len();
        if matches!(line, b"\r\n" | b"\n") {
            return (&input[..at - line.len()], &input[at..]);
        }
    }
    (input, &[])
}

/// The header fields of `head`, each with its continuation lines (raw).
fn fields(head: &[u8]) -> Vec<&[u8]> {
    let mut fields: Vec<&[u8]> = Vec::new();
    let mut start = None;
    let mut at = 0;
    for line in head.split_inclusive(|&b| b == b'\n') {
        let continues = line.first().is_some_and(|&b| b == b' ' || b == b'\t');
        if !continues || start.is_none() {
            if let Some(s) = start {
                fields.push(&head[s..at]);
            }
            start = Some(at);
        }
        at += line.len();
    }
    if let Some(s) = start {
        fields.push(&head[s..at]);
    }
    fields
}

/// The field's name, lower-cased, if it has one.
fn name_of(field: &[u8]) -> Option<String> {
    let colon = field.iter().position(|&b| b == b':')?;
    Some(
        String::from_utf8_lossy(&field[..colon])
            .trim()
            .to_ascii_lowercase(),
    )
}

/// The unfolded value of the first field called `name` (lower case).
fn field(fields: &[&[u8]], name: &str) -> Option<String> {
    let found = fields
        .iter()
        .find(|f| name_of(f).as_deref() == Some(name))?;
    let colon = found.iter().position(|&b| b == b':')?;
    let value: Vec<u8> = found[colon + 1..]
        .iter()
        .copied()
        .filter(|&b| b != b'\r' && b != b'\n')
        .collect();
    Some(String::from_utf8_lossy(&value).into_owned())
}

/// `type/subtype` lower-cased and the parameters (names lower-cased,
/// values unquoted) of a Content-Type value.
fn parse_type(value: &str) -> (String, Vec<(String, String)>) {
    let mut parts = split_params(value).into_iter();
    let media = parts
        .next()
        .map(|m| m.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let params = parts
        .filter_map(|p| {
            let (name, value) = p.split_once('=')?;
            let value = value.trim();
            let value = match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
                Some(quoted) => quoted.replace("\\\"", "\"").replace("\\\\", "\\"),
                None => value.to_string(),
            };
            Some((name.trim().to_ascii_lowercase(), value))
        })
        .collect();
    (media, params)
}

/// `value` split at semicolons outside quoted strings.
fn split_params(value: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut quoted = false;
    let mut escaped = false;
    for c in value.chars() {
        let last = parts.last_mut().expect("never empty");
        if escaped {
            escaped = false;
        } else if quoted && c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        } else if c == ';' && !quoted {
            parts.push(String::new());
            continue;
        }
        last.push(c);
    }
    parts
}

/// The header block with `Content-Transfer-Encoding: encoding` in place of
/// any it had (and `MIME-Version: 1.0` added to a message that lacks it),
/// then the blank line. Other fields are copied as they are.
fn rewrite_head(head: &[u8], encoding: &str, top: bool, out: &mut Vec<u8>) {
    let fields = fields(head);
    let mut mime_version = false;
    for f in &fields {
        match name_of(f).as_deref() {
            Some("content-transfer-encoding") => continue,
            Some("mime-version") => mime_version = true,
            _ => {}
        }
        out.extend_from_slice(f);
        if !f.ends_with(b"\n") {
            out.extend_from_slice(b"\r\n");
        }
    }
    if top && !mime_version {
        out.extend_from_slice(b"MIME-Version: 1.0\r\n");
    }
    out.extend_from_slice(b"Content-Transfer-Encoding: ");
    out.extend_from_slice(encoding.as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
}

/// A multipart body: preamble, parts between `--boundary` lines, epilogue
/// after `--boundary--`. Each part is converted; the delimiter lines and
/// the CRLF before each belong to the structure and are copied.
fn multipart(
    body: &[u8],
    boundary: &[u8],
    inner: Kind,
    depth: usize,
    out: &mut Vec<u8>,
) -> Result<(), Unconvertible> {
    let delimiter = |line: &[u8]| -> Option<bool> {
        let text = line.strip_prefix(b"--")?.strip_prefix(boundary)?;
        let (close, rest) = match text.strip_prefix(b"--") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        rest.iter().all(|b| b" \t\r\n".contains(b)).then_some(close)
    };
    // Offsets of the delimiter lines: (line start, line end, closing).
    let mut delimiters = Vec::new();
    let mut at = 0;
    for line in body.split_inclusive(|&b| b == b'\n') {
        if let Some(close) = delimiter(line) {
            delimiters.push((at, at + line.len(), close));
            if close {
                break;
            }
        }
        at += line.len();
    }
    let Some(&(first, _, _)) = delimiters.first() else {
        // No part at all: only the preamble, which cannot carry 8-bit.
        return if has_8bit(body) {
            Err(Unconvertible::OutsideParts)
        } else {
            out.extend_from_slice(body);
            Ok(())
        };
    };
    // The preamble, with the CRLF that belongs to the first delimiter.
    let preamble = &body[..first];
    if has_8bit(preamble) {
        return Err(Unconvertible::OutsideParts);
    }
    out.extend_from_slice(preamble);
    for (i, &(start, end, close)) in delimiters.iter().enumerate() {
        out.extend_from_slice(&body[start..end]);
        if close {
            break;
        }
        // The part runs to the CRLF before the next delimiter, or to the end.
        let (next, part_end) = match delimiters.get(i + 1) {
            Some(d) => (d.0, crlf_before(body, end, d.0)),
            // No closing delimiter: the last part runs to the end.
            None => (body.len(), body.len()),
        };
        entity(&body[end..part_end], inner, false, depth + 1, out)?;
        out.extend_from_slice(&body[part_end..next]);
    }
    let last = delimiters.last().expect("at least one");
    let epilogue = if last.2 { &body[last.1..] } else { &[][..] };
    if has_8bit(epilogue) {
        return Err(Unconvertible::OutsideParts);
    }
    out.extend_from_slice(epilogue);
    Ok(())
}

/// Where the line ending before offset `next` starts, not before `from`.
fn crlf_before(body: &[u8], from: usize, next: usize) -> usize {
    let mut at = next;
    if at > from && body[at - 1] == b'\n' {
        at -= 1;
        if at > from && body[at - 1] == b'\r' {
            at -= 1;
        }
    }
    at
}

/// Quoted-printable (RFC 2045 §6.7): line breaks of the text stay line
/// breaks, octets other than printable ASCII become `=XX`, white space
/// before a line break too, and lines longer than 76 characters get soft
/// breaks.
fn quoted_printable(body: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut lines = body.split_inclusive(|&b| b == b'\n').peekable();
    while let Some(line) = lines.next() {
        let (text, ending): (&[u8], &[u8]) = if let Some(t) = line.strip_suffix(b"\r\n") {
            (t, b"\r\n")
        } else if let Some(t) = line.strip_suffix(b"\n") {
            (t, b"\n")
        } else {
            (line, b"")
        };
        let mut width = 0;
        for (i, &b) in text.iter().enumerate() {
            let last = i + 1 == text.len();
            let plain = (b'!'..=b'~').contains(&b) && b != b'=' || (is_space(b) && !last);
            let room = if last { LINE } else { LINE - 1 };
            let need = if plain { 1 } else { 3 };
            if width + need > room {
                out.extend_from_slice(b"=\r\n");
                width = 0;
            }
            if plain {
                out.push(b);
            } else {
                out.extend_from_slice(&[b'=', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
            }
            width += need;
        }
        if ending == b"\n" {
            // A bare LF in the stored text: keep it as data, not a break.
            out.extend_from_slice(b"=0A");
            if lines.peek().is_some() {
                out.extend_from_slice(b"=\r\n");
            }
        } else {
            out.extend_from_slice(ending);
        }
    }
}

fn is_space(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Base64 (RFC 2045 §6.8) in lines of 76 characters, the last one ended
/// with CRLF too.
fn base64(body: &[u8], out: &mut Vec<u8>) {
    use base64::Engine;
    let mut line = String::with_capacity(LINE);
    for piece in body.chunks(LINE / 4 * 3) {
        line.clear();
        base64::engine::general_purpose::STANDARD.encode_string(piece, &mut line);
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use mail_parser::{MessageParser, MimeHeaders, PartType};

    use super::*;

    fn convert(message: &str) -> String {
        let out = to_7bit(message.as_bytes()).expect("convertible");
        assert!(out.is_ascii(), "{}", String::from_utf8_lossy(&out));
        for line in out.split(|&b| b == b'\n') {
            assert!(line.len() <= 78, "{}", String::from_utf8_lossy(line));
        }
        String::from_utf8(out).unwrap()
    }

    /// Text of every text part, decoded, in order.
    fn texts(message: &[u8]) -> Vec<String> {
        let parsed = MessageParser::default().parse(message).expect("parses");
        parsed
            .parts
            .iter()
            .filter_map(|p| match &p.body {
                PartType::Text(t) => Some(t.to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_plain_text_message_becomes_quoted_printable() {
        let text = "Gr\u{fc}\u{df}e aus K\u{f6}ln = 100%\r\ntrailing space \r\n.dot\r\n";
        let message = format!(
            "Subject: hi\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Transfer-Encoding: 8bit\r\n\r\n{text}"
        );
        let out = convert(&message);
        assert!(
            out.starts_with("Subject: hi\r\nMIME-Version: 1.0\r\n"),
            "{out}"
        );
        assert_eq!(out.matches("Content-Transfer-Encoding").count(), 1, "{out}");
        assert!(out.contains("Content-Transfer-Encoding: quoted-printable\r\n\r\n"));
        assert!(
            out.contains("Gr=C3=BC=C3=9Fe aus K=C3=B6ln =3D 100%\r\n"),
            "{out}"
        );
        assert!(out.contains("trailing space=20\r\n"), "{out}");
        assert_eq!(texts(out.as_bytes()), texts(message.as_bytes()));
        assert_eq!(texts(out.as_bytes())[0], text);
    }

    #[test]
    fn without_mime_headers_they_are_added() {
        let message = "Subject: x\r\n\r\ncaf\u{e9}\r\n";
        let out = convert(message);
        assert_eq!(
            out,
            "Subject: x\r\nMIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\n"
        );
    }

    #[test]
    fn long_lines_get_soft_breaks_and_decode_the_same() {
        let text = format!("{}\r\n{}", "\u{e9}".repeat(60), "a ".repeat(100));
        let message = format!("Content-Type: text/plain; charset=utf-8\r\n\r\n{text}");
        let out = convert(&message);
        assert!(out.contains("=\r\n"), "{out}");
        assert_eq!(texts(out.as_bytes())[0], text);
    }

    #[test]
    fn multipart_leaves_seven_bit_parts_byte_identical_and_encodes_the_rest() {
        let seven = "Content-Type: text/plain\r\n\r\nplain ascii\r\n";
        let image = [b'\x89', b'P', b'N', b'G', 0, 0xff, 0xfe, b'\r', b'\n'];
        let mut message = format!(
            "From: a@b.test\r\nMIME-Version: 1.0\r\n\
             Content-Type: multipart/mixed; boundary=\"=_b;1\"\r\n\r\n\
             preamble\r\n--=_b;1\r\n{seven}\r\n--=_b;1\r\n\
             Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
             \u{fc}ber\r\n--=_b;1\r\nContent-Type: image/png\r\n\r\n"
        )
        .into_bytes();
        message.extend_from_slice(&image);
        message.extend_from_slice(b"\r\n--=_b;1--\r\nepilogue\r\n");
        let out = to_7bit(&message).unwrap();
        assert!(out.is_ascii());
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(
            text.contains(&format!("--=_b;1\r\n{seven}\r\n--=_b;1\r\n")),
            "{text}"
        );
        assert!(text.contains("\r\n\r\n=C3=BCber\r\n--=_b;1\r\n"), "{text}");
        assert!(text.ends_with("--=_b;1--\r\nepilogue\r\n"), "{text}");
        let parsed = MessageParser::default().parse(&out).unwrap();
        let before = MessageParser::default().parse(&message).unwrap();
        assert_eq!(parsed.parts.len(), before.parts.len());
        for (a, b) in parsed.parts.iter().zip(&before.parts) {
            assert_eq!(a.contents(), b.contents());
        }
        let png = parsed
            .parts
            .iter()
            .find(|p| p.content_type().is_some_and(|c| c.c_type == "image"))
            .unwrap();
        assert_eq!(png.encoding, mail_parser::Encoding::Base64);
        assert_eq!(png.contents(), image);
    }

    #[test]
    fn nested_multiparts_and_attached_messages_are_walked() {
        let message = "Content-Type: multipart/mixed; boundary=outer\r\n\r\n\
             --outer\r\nContent-Type: multipart/alternative; boundary=inner\r\n\r\n\
             --inner\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nnested \u{e9}\r\n\
             --inner--\r\n--outer\r\nContent-Type: message/rfc822\r\n\
             Content-Transfer-Encoding: 8bit\r\n\r\n\
             Subject: inside\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nattached \u{e9}\r\n\
             --outer--\r\n";
        let out = convert(message);
        assert!(out.contains("nested =C3=A9"), "{out}");
        assert!(out.contains("attached =C3=A9"), "{out}");
        assert!(
            out.contains("Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 7bit\r\n"),
            "{out}"
        );
        let texts = texts(out.as_bytes());
        assert!(texts.iter().any(|t| t == "nested \u{e9}"), "{texts:?}");
        let parsed = MessageParser::default().parse(out.as_bytes()).unwrap();
        let attached = parsed
            .attachments()
            .find_map(|p| p.message())
            .expect("rfc822 part");
        assert_eq!(attached.body_text(0).unwrap().trim_end(), "attached \u{e9}");
    }

    #[test]
    fn what_cannot_be_converted_is_refused() {
        let cases: [(&str, Unconvertible); 5] = [
            (
                "Subject: caf\u{e9}\r\n\r\ncaf\u{e9}\r\n",
                Unconvertible::Header,
            ),
            (
                "Content-Type: multipart/mixed\r\n\r\n--x\r\n\r\n\u{e9}\r\n--x--\r\n",
                Unconvertible::NoBoundary,
            ),
            (
                "Content-Type: multipart/mixed; boundary=x\r\n\r\n\u{e9}\r\n--x\r\n\r\na\r\n--x--\r\n",
                Unconvertible::OutsideParts,
            ),
            (
                "Content-Type: multipart/mixed; boundary=x\r\n\r\nno parts \u{e9}\r\n",
                Unconvertible::OutsideParts,
            ),
            (
                "Content-Transfer-Encoding: base64\r\n\r\n\u{e9}\r\n",
                Unconvertible::AlreadyEncoded("base64".into()),
            ),
        ];
        for (message, want) in cases {
            assert_eq!(to_7bit(message.as_bytes()), Err(want), "{message:?}");
        }
        // Headers of an attached message count too.
        let attached = "Content-Type: message/rfc822\r\n\r\nSubject: \u{e9}\r\n\r\nx\r\n";
        assert_eq!(to_7bit(attached.as_bytes()), Err(Unconvertible::Header));
        let deep = "Content-Type: message/rfc822\r\n\r\n".repeat(40) + "\r\n\u{e9}\r\n";
        assert_eq!(to_7bit(deep.as_bytes()), Err(Unconvertible::TooDeep));
    }

    #[test]
    fn base64_round_trips_any_octets() {
        for len in 0..200usize {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let mut out = Vec::new();
            base64(&data, &mut out);
            assert!(out.split(|&b| b == b'\n').all(|l| l.len() <= LINE + 1));
            let joined: Vec<u8> = out
                .iter()
                .copied()
                .filter(|&b| b != b'\r' && b != b'\n')
                .collect();
            let mut decoded = Vec::new();
            for quad in joined.chunks(4) {
                let val = |c: u8| match c {
                    b'A'..=b'Z' => c - b'A',
                    b'a'..=b'z' => c - b'a' + 26,
                    b'0'..=b'9' => c - b'0' + 52,
                    b'+' => 62,
                    b'/' => 63,
                    _ => 0,
                };
                let v = quad
                    .iter()
                    .fold(0u32, |acc, &c| acc << 6 | u32::from(val(c)));
                let pad = quad.iter().filter(|&&c| c == b'=').count();
                let bytes = [(v >> 16) as u8, (v >> 8) as u8, v as u8];
                decoded.extend_from_slice(&bytes[..3 - pad]);
            }
            assert_eq!(decoded, data, "len {len}");
        }
    }
}
