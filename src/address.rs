//! Addresses and domain names as mail sees them: one syntax rule for every
//! place that takes them from outside (the configuration, the SMTP session,
//! delivery), so what the session accepts is exactly what delivery can write
//! in a path, and the next hop never gets a bounce's worth of mail we should
//! have refused at RCPT.

use crate::domain::Domain;

/// Longest name (RFC 1035 §2.3.4, without the root's dot) and label.
const MAX_NAME: usize = 253;
const MAX_LABEL: usize = 63;

/// Whether `name` is a domain name as mail carries it: dot-separated labels
/// of letters, digits, hyphens and underscores (which resolvers and real MTAs
/// take, e.g. in internal host names), not starting or ending with a hyphen,
/// within RFC 1035's limits (63 octets a label, 253 in all). Non-ASCII
/// characters are allowed (U-labels, RFC 6531); whether a message may carry
/// them is the SMTPUTF8 question, not this one. No trailing dot: callers strip
/// it first.
pub fn is_domain_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME && name.split('.').all(is_label)
}

/// Whether the domain of `address` has a label over 63 octets (RFC 1035
/// §2.3.4): no such name can exist, whoever it belongs to, so this is a
/// syntax error before it is anything else.
pub fn has_overlong_label(address: &str) -> bool {
    address
        .rsplit_once('@')
        .is_some_and(|(_, domain)| domain.split('.').any(|l| l.len() > MAX_LABEL))
}

fn is_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= MAX_LABEL
        && !label.starts_with('-')
        && !label.ends_with('-')
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || !c.is_ascii())
}

/// The recipient's domain, normalised as a [`Domain`]: the unit of routing
/// and health.
pub fn domain_of(address: &str) -> String {
    address
        .rsplit_once('@')
        .map(|(_, d)| Domain::new(d).into())
        .unwrap_or_default()
}

/// `address` written as the inside of an RFC 5321 path, or `None` if it cannot
/// be written as one. The inbound parser strips quotes (`"a b"@x` arrives as
/// `a b@x`), so a local part that is not a dot-atom is quoted again here; an
/// address with control characters, or non-ASCII ones without SMTPUTF8, is
/// refused instead of being sent. The empty address stays empty (`<>`).
pub fn path(address: &str, utf8: bool) -> Option<String> {
    if address.is_empty() {
        return Some(String::new());
    }
    if address
        .chars()
        .any(|c| c.is_control() || (!utf8 && !c.is_ascii()))
    {
        return None;
    }
    let Some((local, domain)) = address.rsplit_once('@') else {
        // RFC 5321 §4.1.1.3: only Postmaster may come without a domain.
        return address
            .eq_ignore_ascii_case("postmaster")
            .then(|| address.to_owned());
    };
    if local.is_empty() || !is_domain(domain) {
        return None;
    }
    if is_dot_atom(local) {
        return Some(address.to_owned());
    }
    let mut quoted = String::with_capacity(address.len() + 4);
    quoted.push('"');
    for c in local.chars() {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push_str("\"@");
    quoted.push_str(domain);
    Some(quoted)
}

fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

fn is_dot_atom(text: &str) -> bool {
    text.split('.')
        .all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

fn is_domain(domain: &str) -> bool {
    if let Some(literal) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
        return !literal.is_empty()
            && literal
                .chars()
                .all(|c| c.is_ascii_graphic() && !matches!(c, '[' | ']' | '\\'));
    }
    is_domain_name(domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_labels_and_u_labels_within_the_limits() {
        let label63 = "a".repeat(63);
        let long = format!("{label63}.{label63}.{label63}.{}", "b".repeat(61));
        assert_eq!(long.len(), 253);
        for name in [
            "example.com",
            "a.b-c.example",
            "xn--bcher-kva.example",
            "b\u{fc}cher.example",
            "3com.example",
            "primary_mx.internal",
            "localhost",
            label63.as_str(),
            long.as_str(),
        ] {
            assert!(is_domain_name(name), "{name:?}");
        }
    }

    #[test]
    fn refuses_names_a_path_cannot_carry() {
        let label64 = "a".repeat(64);
        let too_long = format!("{}.{}", "a".repeat(63), "b".repeat(190));
        assert_eq!(too_long.len(), 254);
        for name in [
            "",
            ".",
            "example.com.",
            ".example.com",
            "a..b",
            "-a.example",
            "a-.example",
            "a!b.example",
            "a b.example",
            "a\u{0}b.example",
            "[192.0.2.1]",
            label64.as_str(),
            too_long.as_str(),
        ] {
            assert!(!is_domain_name(name), "{name:?}");
        }
    }

    #[test]
    fn writes_paths_quoting_local_parts_that_need_it() {
        let cases: [(&str, bool, Option<&str>); 14] = [
            ("", false, Some("")),
            ("a@example.com", false, Some("a@example.com")),
            (
                "a.b+c@sub.example.com",
                false,
                Some("a.b+c@sub.example.com"),
            ),
            ("a b@example.com", false, Some("\"a b\"@example.com")),
            ("a\"b\\c@x.test", false, Some("\"a\\\"b\\\\c\"@x.test")),
            ("a..b@x.test", false, Some("\"a..b\"@x.test")),
            ("Postmaster", false, Some("Postmaster")),
            ("x@[192.0.2.1]", false, Some("x@[192.0.2.1]")),
            ("j\u{f6}rg@x.test", true, Some("j\u{f6}rg@x.test")),
            ("j\u{f6}rg@x.test", false, None),
            ("alice", false, None),
            ("@x.test", false, None),
            ("a@", false, None),
            ("a@x.test>\r\nDATA", false, None),
        ];
        for (address, utf8, path) in cases {
            assert_eq!(super::path(address, utf8).as_deref(), path, "{address:?}");
        }
    }
}
