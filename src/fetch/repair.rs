//! Addresses as people and broken software write them in header fields,
//! made into `local@domain` where the intent is unambiguous: an address list
//! cut into its members ([`split_list`]), and each member unwrapped from
//! angle brackets, quotes and `mailto:`, its stray spaces around `@`, doubled
//! `@@` and trailing dots removed ([`repair`]). Anything still not an
//! address gives `None`; a local part with `@`, `%` or `!` (source routing)
//! is never produced. Pure, and must not panic: the input is untrusted.

use crate::address::is_domain_name;
use crate::domain::Domain;

/// RFC 5321 §4.5.3.1.1.
const MAX_LOCAL: usize = 64;

/// A raw address list cut into its members: at commas and semicolons
/// outside quotes and angle brackets, without comments and group names.
pub(super) fn split_list(value: &str) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut piece = String::new();
    let (mut quoted, mut escaped, mut angle, mut comment) = (false, false, 0u32, 0u32);
    for c in value.chars() {
        if escaped {
            escaped = false;
            if comment == 0 {
                piece.push(c);
            }
            continue;
        }
        match c {
            '\\' if quoted || comment > 0 => {
                escaped = true;
                if comment == 0 {
                    piece.push(c);
                }
            }
            '(' if !quoted => comment += 1,
            ')' if !quoted && comment > 0 => comment -= 1,
            _ if comment > 0 => {}
            '"' => {
                quoted = !quoted;
                piece.push(c);
            }
            _ if quoted => piece.push(c),
            '<' => {
                angle += 1;
                piece.push(c);
            }
            '>' => {
                angle = angle.saturating_sub(1);
                piece.push(c);
            }
            ',' | ';' if angle == 0 => pieces.push(std::mem::take(&mut piece)),
            // A group's name ends at its colon; `mailto:` is no group.
            ':' if angle == 0 && !piece.trim().eq_ignore_ascii_case("mailto") => piece.clear(),
            _ => piece.push(c),
        }
    }
    pieces.push(piece);
    pieces.retain(|p| !p.trim().is_empty());
    pieces
}

/// `candidate` as `local@domain`, repaired where the intent is clear:
/// angle brackets, quotes and `mailto:` around it, space around the `@`,
/// `@@`, trailing dots on the domain. The domain comes lower-cased; a quoted
/// local part comes unquoted (as the SMTP session stores it). `None` for
/// anything else.
pub(super) fn repair(candidate: &str) -> Option<String> {
    let text = unwrap(candidate);
    // After the unwrapping: a display name's undecodable 8-bit text is no
    // reason to drop the address in angle brackets beside it.
    if text
        .chars()
        .any(|c| (c.is_control() && !c.is_whitespace()) || c == char::REPLACEMENT_CHARACTER)
    {
        return None;
    }
    let (local, domain) = split_at_sign(text)?;
    let local = local_part(local)?;
    let domain = domain.trim_end_matches('.');
    is_domain_name(domain).then(|| format!("{local}@{}", Domain::new(domain)))
}

/// `text` without what people and programs wrap addresses in:
/// `<…>` (doubled, or unclosed), `'…'`, `"…"` and `mailto:`.
fn unwrap(text: &str) -> &str {
    let mut text = text.trim();
    // Each round removes one layer; four cover any sensible nesting.
    for _ in 0..4 {
        let before = text;
        if let Some((_, inner)) = text.rsplit_once('<') {
            text = inner.split('>').next().unwrap_or(inner);
        }
        text = text.trim_matches(|c: char| c == '<' || c == '>' || c.is_whitespace());
        if text
            .get(..7)
            .is_some_and(|s| s.eq_ignore_ascii_case("mailto:"))
        {
            text = text.get(7..).unwrap_or_default();
        }
        for quote in ['\'', '"'] {
            if let Some(inner) = text.strip_prefix(quote).and_then(|t| t.strip_suffix(quote)) {
                text = inner;
            }
        }
        if text == before {
            break;
        }
    }
    text
}

/// The local part (still quoted, if it was) and the domain, split at the
/// `@`: space around it and a doubled one are dropped, a second one
/// anywhere else is refused.
fn split_at_sign(text: &str) -> Option<(&str, &str)> {
    let at = if text.starts_with('"') {
        closing_quote(text)? + 1
    } else {
        text.find('@')?
    };
    let (local, rest) = text.split_at(at);
    let domain = rest
        .trim_start()
        .strip_prefix('@')?
        .trim_start_matches(|c: char| c == '@' || c.is_whitespace())
        .trim_end();
    (!domain.contains('@')).then_some((local.trim_end(), domain))
}

/// The index of the quote closing the quoted string `text` starts with.
fn closing_quote(text: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in text.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(i),
            _ => {}
        }
    }
    None
}

/// A local part as the judge gets it: unquoted, not empty, at most 64
/// octets, no controls, no `@`, `%` or `!` (source routes, not
/// mailboxes), and no space or special unless it was quoted.
fn local_part(raw: &str) -> Option<String> {
    let local = match raw.strip_prefix('"').and_then(|q| q.strip_suffix('"')) {
        Some(quoted) => unescape(quoted),
        None if raw.contains(|c: char| c.is_whitespace() || "\"(),:;<>[\\]".contains(c)) => {
            return None;
        }
        None => raw.to_owned(),
    };
    let fine = !local.is_empty()
        && local.len() <= MAX_LOCAL
        && !local.contains(['@', '%', '!'])
        && !local.chars().any(char::is_control);
    fine.then_some(local)
}

/// The content of a quoted string: `\x` is `x`.
fn unescape(quoted: &str) -> String {
    let mut out = String::with_capacity(quoted.len());
    let mut chars = quoted.chars();
    while let Some(c) = chars.next() {
        out.push(if c == '\\' {
            chars.next().unwrap_or(c)
        } else {
            c
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repairs_addresses_whose_intent_is_clear() {
        let cases = [
            ("fred@example.com", "fred@example.com"),
            ("fred @ example.com", "fred@example.com"),
            ("fred@ example.com", "fred@example.com"),
            ("fred @example.com", "fred@example.com"),
            ("fred@\texample.com", "fred@example.com"),
            ("fred@@example.com", "fred@example.com"),
            ("fred@example.com.", "fred@example.com"),
            ("fred@example.com..", "fred@example.com"),
            ("fred@Example.COM", "fred@example.com"),
            ("Fred.Smith@example.com", "Fred.Smith@example.com"),
            ("<fred@example.com>", "fred@example.com"),
            ("<<fred@example.com>>", "fred@example.com"),
            ("<fred@example.com", "fred@example.com"),
            ("fred@example.com>", "fred@example.com"),
            ("'fred@example.com'", "fred@example.com"),
            ("\"fred@example.com\"", "fred@example.com"),
            ("mailto:fred@example.com", "fred@example.com"),
            ("<MAILTO:fred@example.com>", "fred@example.com"),
            ("Fred <fred@example.com>", "fred@example.com"),
            ("\"fred smith\"@example.com", "fred smith@example.com"),
            ("\"fred\\\"s\"@example.com", "fred\"s@example.com"),
            ("o'brien@example.com", "o'brien@example.com"),
            (
                "j\u{f6}rg@b\u{fc}cher.example",
                "j\u{f6}rg@b\u{fc}cher.example",
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(repair(input).as_deref(), Some(expected), "{input:?}");
        }
    }

    #[test]
    fn leaves_out_what_is_still_no_address() {
        let long_local = format!("{}@example.com", "a".repeat(65));
        let cases = [
            "",
            "fred",
            "@example.com",
            "fred@",
            "fred smith@example.com",
            "a@b@example.com",
            "\"a@b\"@example.com",
            "fred%example.org@example.com",
            "example.org!fred@example.com",
            "fred@exa mple.com",
            "fred@example..com",
            "fred@-example.com",
            "fred@[192.0.2.1]",
            "fred@example.com\u{0}",
            "fr\u{1}ed@example.com",
            "fred@exa\u{fffd}mple.com",
            "<>",
            "\"\"@example.com",
            long_local.as_str(),
        ];
        for input in cases {
            assert_eq!(repair(input), None, "{input:?}");
        }
    }
}
