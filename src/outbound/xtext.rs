//! RFC 3461 §4 xtext, the encoding of `ENVID=` and `ORCPT=` values. The inbound
//! parser decodes these on the way in; the values are encoded again here on the
//! way out, so whatever bytes they hold can never split or end a command line.

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
}
