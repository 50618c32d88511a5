//! RFC 3461 §4 xtext, the encoding of `ENVID=` and `ORCPT=` values. The inbound
//! parser decodes these on the way in, and the spool keeps the value as
//! received too: RFC 3461 §5.2.1 wants it passed on unchanged (`+2b` stays
//! `+2b`, `/` stays `/`), so that is what goes out when it is one safe token
//! that decodes to the stored value. Otherwise the stored value is encoded
//! again here. Either way, whatever a value holds can never split or end a
//! command line.

/// Encodes `value` as xtext: printable ASCII stays as it is, except `+` and `=`;
/// every other byte (space, controls, bytes of UTF-8 characters) becomes `+XX`
/// with upper-case hex digits.
pub fn encode(value: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(value.len());
    for &b in value.as_bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            out.push('+');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
    out
}

/// Decodes xtext as the inbound parser reads it: `+` and two hex digits
/// (either case) is that octet, read as a character; anything else is itself.
pub fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |at: usize| bytes.get(at).and_then(|&b| char::from(b).to_digit(16));
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'+', Some(high), Some(low)) => {
                // Two hex digits: at most 255.
                out.push(char::from((high * 16 + low) as u8));
                i += 3;
            }
            _ => {
                // `text` is a str: copy the whole character.
                let len = text[i..].chars().next().map_or(1, char::len_utf8);
                out.push_str(&text[i..i + len]);
                i += len;
            }
        }
    }
    out
}

/// `raw`, the value as received, if it may go out as it is: one token of
/// printable ASCII that decodes to `decoded`, the value we keep and quote in
/// notices (so the next hop and our own notices agree).
pub fn as_received<'a>(raw: Option<&'a str>, decoded: &str) -> Option<&'a str> {
    raw.filter(|raw| {
        !raw.is_empty() && raw.bytes().all(|b| (b'!'..=b'~').contains(&b)) && decode(raw) == decoded
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_what_xtext_does_not_allow() {
        let cases = [
            ("", ""),
            ("QQ314159", "QQ314159"),
            ("a@example.com", "a@example.com"),
            ("hi there", "hi+20there"),
            ("a+b=c", "a+2Bb+3Dc"),
            ("tab\there", "tab+09here"),
            ("cr\r\nlf", "cr+0D+0Alf"),
            ("j\u{f6}rg", "j+C3+B6rg"),
            ("~!", "~!"),
            ("\u{7f}", "+7F"),
        ];
        for (raw, encoded) in cases {
            assert_eq!(encode(raw), encoded, "{raw:?}");
        }
    }

    #[test]
    fn output_is_always_one_safe_token() {
        let all: String = (0u8..128).map(char::from).collect();
        let out = encode(&all);
        assert!(out.bytes().all(|b| (b'!'..=b'~').contains(&b) && b != b'='));
        // Every byte is either kept or spelled as three characters.
        let kept = all
            .bytes()
            .filter(|b| (b'!'..=b'~').contains(b) && *b != b'+' && *b != b'=')
            .count();
        assert_eq!(out.len(), kept + 3 * (128 - kept));
    }

    #[test]
    fn decodes_as_the_inbound_parser_does() {
        let cases = [
            ("", ""),
            ("Q+2BZ+3Dx+2Fy.42", "Q+Z=x/y.42"),
            ("a+2bb", "a+b"),
            ("hi+20there", "hi there"),
            ("+2", "+2"),
            ("+zz", "+zz"),
            ("100%+", "100%+"),
        ];
        for (xtext, value) in cases {
            assert_eq!(decode(xtext), value, "{xtext:?}");
        }
        for value in ["a+b=c", "hi there", "~!", "j\u{f6}rg"] {
            let encoded = encode(value);
            assert!(encoded.is_ascii());
            if value.is_ascii() {
                assert_eq!(decode(&encoded), value);
            }
        }
    }

    #[test]
    fn the_value_as_received_goes_out_only_if_safe_and_faithful() {
        let raw = Some("Q+2BZ+3Dx+2Fy.42");
        assert_eq!(as_received(raw, "Q+Z=x/y.42"), raw);
        assert_eq!(as_received(Some("a+2bb"), "a+b"), Some("a+2bb"));
        // Another value (a damaged or hostile spool): encoded afresh instead.
        assert_eq!(as_received(raw, "something else"), None);
        assert_eq!(as_received(Some("a b"), "a b"), None);
        assert_eq!(as_received(Some("a\r\nRSET"), "a\r\nRSET"), None);
        assert_eq!(as_received(Some(""), ""), None);
        assert_eq!(as_received(None, "x"), None);
    }
}
