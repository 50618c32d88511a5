//! One entry of `server.dnsbl` or `server.dnswl`, in Postfix postscreen's
//! `dnsbl_sites` syntax: `zone[=filter][*weight]`.
//!
//! The filter says which answers count as a listing: four octets, each a
//! number or a bracketed list of numbers and ranges (`127.0.0.2`,
//! `127.0.0.[2..11]`, `127.0.[0;1].[2;4..6]`). The weight is what a listing
//! adds to the client's score; allowlist entries (`dnswl`) subtract. What
//! the lists are looked up for, and how the score decides, is the inbound
//! side's (`inbound::dnsbl`); this file only knows the syntax and what an
//! answer matching a filter means.

use std::fmt;
use std::net::Ipv4Addr;

use crate::address::is_domain_name;
use crate::domain::Domain;

/// A DNS list to consult, with what its listings weigh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsList {
    /// Normalised as a [`Domain`]: lower-case, no trailing dot.
    pub zone: String,
    /// Only answers matching it count; `None`: any listing answer counts.
    pub filter: Option<AnswerFilter>,
    /// Added to the client's score when it is listed; negative for allowlists.
    pub weight: i32,
}

/// Which answer addresses count: one set of values per octet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnswerFilter([Octet; 4]);

/// The values one octet may take: inclusive ranges, as written.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Octet {
    ranges: Vec<(u8, u8)>,
    /// Written in brackets (`[2]`), kept so printing gives the same text.
    bracketed: bool,
}

/// Which list an entry belongs to: the default weight and its allowed sign
/// differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `dnsbl`: weight 1 by default; a negative weight is allowed, as in
    /// postscreen, to let an entry vouch for a client.
    Block,
    /// `dnswl`: weight -1 by default, and never positive.
    Allow,
}

impl DnsList {
    /// Parses `zone[=filter][*weight]`; the error says what is wrong.
    pub fn parse(text: &str, kind: Kind) -> Result<DnsList, String> {
        let text = text.trim();
        let (rest, weight) = match text.rsplit_once('*') {
            Some((rest, w)) => {
                let weight = w
                    .trim()
                    .parse::<i32>()
                    .map_err(|_| format!("weight {w:?} is not a whole number"))?;
                (rest, Some(weight))
            }
            None => (text, None),
        };
        let (zone, filter) = match rest.split_once('=') {
            Some((zone, filter)) => (zone, Some(AnswerFilter::parse(filter.trim())?)),
            None => (rest, None),
        };
        let zone: String = Domain::new(zone.trim()).into();
        if !is_domain_name(&zone) || !zone.contains('.') {
            return Err(format!("{zone:?} is not a DNS zone"));
        }
        let weight = match (kind, weight) {
            (_, Some(0)) => return Err("a weight of 0 would never count".into()),
            (Kind::Allow, Some(w)) if w > 0 => {
                return Err(format!(
                    "an allowlist lowers the score: write a negative weight, e.g. *-{w}"
                ));
            }
            (_, Some(w)) => w,
            (Kind::Block, None) => 1,
            (Kind::Allow, None) => -1,
        };
        Ok(DnsList {
            zone,
            filter,
            weight,
        })
    }
}

impl fmt::Display for DnsList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.zone)?;
        if let Some(filter) = &self.filter {
            write!(f, "={filter}")?;
        }
        write!(f, "*{}", self.weight)
    }
}

impl AnswerFilter {
    fn parse(text: &str) -> Result<AnswerFilter, String> {
        let bad =
            |why: &str| format!("filter {text:?}: {why}; write e.g. 127.0.0.2 or 127.0.0.[2..11]");
        // Dots inside brackets belong to ranges, not between octets.
        let mut parts = Vec::new();
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in text.char_indices() {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                '.' if depth == 0 => {
                    parts.push(&text[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
            if !(0..=1).contains(&depth) {
                return Err(bad("unbalanced brackets"));
            }
        }
        if depth != 0 {
            return Err(bad("unbalanced brackets"));
        }
        parts.push(&text[start..]);
        let octets: Vec<Octet> = parts
            .into_iter()
            .map(|p| Octet::parse(p).ok_or_else(|| bad(&format!("{p:?} is not an octet pattern"))))
            .collect::<Result<_, _>>()?;
        let octets: [Octet; 4] = octets
            .try_into()
            .map_err(|_| bad("an address has four octets"))?;
        Ok(AnswerFilter(octets))
    }

    /// Whether a list's answer is one this filter counts.
    pub fn matches(&self, answer: Ipv4Addr) -> bool {
        self.0
            .iter()
            .zip(answer.octets())
            .all(|(octet, value)| octet.contains(value))
    }
}

impl fmt::Display for AnswerFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, octet) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            write!(f, "{octet}")?;
        }
        Ok(())
    }
}

impl Octet {
    /// `N`, or `[item;item…]` where an item is `N` or `N..M`.
    fn parse(text: &str) -> Option<Octet> {
        let number = |s: &str| -> Option<u8> {
            let s = s.trim();
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse().ok())
                .flatten()
        };
        if let Some(inside) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            let ranges = inside
                .split(';')
                .map(|item| match item.split_once("..") {
                    Some((lo, hi)) => {
                        let (lo, hi) = (number(lo)?, number(hi)?);
                        (lo <= hi).then_some((lo, hi))
                    }
                    None => number(item).map(|n| (n, n)),
                })
                .collect::<Option<Vec<_>>>()?;
            return Some(Octet {
                ranges,
                bracketed: true,
            });
        }
        let n = number(text)?;
        Some(Octet {
            ranges: vec![(n, n)],
            bracketed: false,
        })
    }

    fn contains(&self, value: u8) -> bool {
        self.ranges
            .iter()
            .any(|&(lo, hi)| (lo..=hi).contains(&value))
    }
}

impl fmt::Display for Octet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.bracketed
            && let Some((n, _)) = self.ranges.first()
        {
            return write!(f, "{n}");
        }
        f.write_str("[")?;
        for (i, &(lo, hi)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(";")?;
            }
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}..{hi}")?;
            }
        }
        f.write_str("]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn entries_parse_with_postscreen_defaults() {
        let cases: &[(&str, Kind, &str, i32, Option<&str>)] = &[
            ("zen.spamhaus.org", Kind::Block, "zen.spamhaus.org", 1, None),
            (
                "Zen.Spamhaus.ORG.*2",
                Kind::Block,
                "zen.spamhaus.org",
                2,
                None,
            ),
            (
                "bl.spamcop.net=127.0.0.2*1",
                Kind::Block,
                "bl.spamcop.net",
                1,
                Some("127.0.0.2"),
            ),
            (
                " b.barracudacentral.org = 127.0.0.2 ",
                Kind::Block,
                "b.barracudacentral.org",
                1,
                Some("127.0.0.2"),
            ),
            ("list.dnswl.org*-2", Kind::Allow, "list.dnswl.org", -2, None),
            ("list.dnswl.org", Kind::Allow, "list.dnswl.org", -1, None),
            (
                "list.dnswl.org=127.0.[0..255].[1;2;3]*-3",
                Kind::Allow,
                "list.dnswl.org",
                -3,
                Some("127.0.[0..255].[1;2;3]"),
            ),
            ("wl.example.org*-5", Kind::Block, "wl.example.org", -5, None),
        ];
        for (text, kind, zone, weight, filter) in cases {
            let list = DnsList::parse(text, *kind).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(list.zone, *zone, "{text}");
            assert_eq!(list.weight, *weight, "{text}");
            assert_eq!(
                list.filter.as_ref().map(ToString::to_string).as_deref(),
                *filter,
                "{text}"
            );
            // Printing gives an entry that parses to the same thing.
            assert_eq!(DnsList::parse(&list.to_string(), *kind), Ok(list), "{text}");
        }
    }

    #[test]
    fn bad_entries_say_why() {
        for (text, kind, want) in [
            ("", Kind::Block, "not a DNS zone"),
            ("localhost", Kind::Block, "not a DNS zone"),
            ("bad zone.example", Kind::Block, "not a DNS zone"),
            ("zen.spamhaus.org*two", Kind::Block, "weight"),
            ("zen.spamhaus.org*", Kind::Block, "weight"),
            ("zen.spamhaus.org*0", Kind::Block, "never count"),
            ("list.dnswl.org*2", Kind::Allow, "negative weight"),
            ("bl.example=127.0.0", Kind::Block, "four octets"),
            ("bl.example=127.0.0.2.1", Kind::Block, "four octets"),
            ("bl.example=127.0.0.256", Kind::Block, "not an octet"),
            ("bl.example=127.0.0.[5..2]", Kind::Block, "not an octet"),
            ("bl.example=127.0.0.[2", Kind::Block, "brackets"),
            ("bl.example=127.0.0.2]", Kind::Block, "brackets"),
            ("bl.example=127.0.0.[]", Kind::Block, "not an octet"),
            ("bl.example=127.0.0.-1", Kind::Block, "not an octet"),
            ("bl.example=", Kind::Block, "not an octet"),
        ] {
            let err = DnsList::parse(text, kind).expect_err(text);
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn filters_match_per_octet() {
        let filter = |s: &str| AnswerFilter::parse(s).unwrap();
        let f = filter("127.0.0.2");
        assert!(f.matches(ip("127.0.0.2")));
        assert!(!f.matches(ip("127.0.0.3")));
        let f = filter("127.0.0.[2..11]");
        assert!(f.matches(ip("127.0.0.2")) && f.matches(ip("127.0.0.11")));
        assert!(!f.matches(ip("127.0.0.1")) && !f.matches(ip("127.0.0.12")));
        let f = filter("127.[0;1].0.[2;4..6]");
        assert!(f.matches(ip("127.1.0.5")));
        assert!(!f.matches(ip("127.2.0.5")) && !f.matches(ip("127.0.0.3")));
    }
}
