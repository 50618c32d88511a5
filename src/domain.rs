//! Domain names as mxspool compares them, and the relay domains it serves.
//!
//! One rule for every place a domain arrives (the configuration, the SMTP
//! session, the spool, DNS answers, the admin API): lower-case, without the
//! root's trailing dot. One list, [`RelayDomains`], answers which configured
//! relay domain covers a name (itself, or a subdomain with
//! `include_subdomains`) and what the name's bounded metric label is. A leaf: it knows no pipeline stage,
//! and not the configuration's file format either (the config builds the
//! list from its `[[domain]]` tables).

use std::borrow::{Borrow, Cow};
use std::fmt;
use std::sync::Arc;

/// The `domain` label of destinations that are not configured relay domains.
pub const OTHER: &str = "other";

/// A domain name, normalised: lower-case (U-labels too), without the root's
/// trailing dot. Names that mail and DNS treat as one compare equal, and a
/// clone is a reference count.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Domain(Arc<str>);

impl Domain {
    /// `name` lower-cased, with one trailing dot (the root's) removed:
    /// `Example.COM.` is `example.com`. A second dot stays (`example.com..`
    /// is no domain name, and [`crate::address::is_domain_name`] says so).
    pub fn new(name: &str) -> Domain {
        Domain(Arc::from(normalise(name)))
    }

    /// A name as an operator typed it (an API path or body): surrounding
    /// whitespace and every trailing dot are ignored, then [`Domain::new`].
    pub fn typed(text: &str) -> Domain {
        Domain::new(text.trim().trim_end_matches('.'))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Borrow<str> for Domain {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Domain {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Domain {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl From<Domain> for String {
    fn from(domain: Domain) -> String {
        domain.0.to_string()
    }
}

/// The rule behind [`Domain::new`]; borrows when there is nothing to change
/// (the common case: names already normalised on their way in).
fn normalise(name: &str) -> Cow<'_, str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name
        .bytes()
        .any(|b| b.is_ascii_uppercase() || !b.is_ascii())
    {
        Cow::Owned(name.to_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

/// Whether normalised `name` is normalised `parent` or ends in `.parent`.
fn within(name: &str, parent: &str) -> bool {
    match name.strip_suffix(parent) {
        Some(rest) => rest.is_empty() || rest.ends_with('.'),
        None => false,
    }
}

/// A configured relay domain: the mail we take, keep and pass on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayDomain {
    pub name: Domain,
    /// Whether names under `name` are relayed too (and labelled as `name`).
    pub include_subdomains: bool,
}

impl RelayDomain {
    pub fn new(name: &str, include_subdomains: bool) -> RelayDomain {
        RelayDomain {
            name: Domain::new(name),
            include_subdomains,
        }
    }

    /// Whether `domain` is this domain, or one of its subdomains when
    /// `include_subdomains` is set.
    pub fn covers(&self, domain: &str) -> bool {
        self.covers_normalised(&normalise(domain))
    }

    fn covers_normalised(&self, domain: &str) -> bool {
        let name = self.name.as_str();
        domain == name || (self.include_subdomains && within(domain, name))
    }
}

/// The relay domains, in the configuration's order: the one list every
/// question about "is this ours, and as which domain" is asked of. Cheap to
/// clone; the policy's copy is replaced whole on reload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayDomains {
    domains: Arc<[RelayDomain]>,
}

impl RelayDomains {
    pub fn new(domains: impl IntoIterator<Item = RelayDomain>) -> RelayDomains {
        RelayDomains {
            domains: domains.into_iter().collect(),
        }
    }

    /// The relay domain that covers `domain`: the first, in the
    /// configuration's order, that is it or (with `include_subdomains`) a
    /// parent of it.
    pub fn covering(&self, domain: &str) -> Option<&RelayDomain> {
        let domain = normalise(domain);
        self.domains.iter().find(|r| r.covers_normalised(&domain))
    }

    /// The relay domain named `name`, whatever it covers.
    pub fn get(&self, name: &str) -> Option<&RelayDomain> {
        let name = normalise(name);
        self.domains.iter().find(|r| r.name.as_str() == name)
    }

    /// The bounded `domain` metric label of `domain`: the relay domain that
    /// covers it, or [`OTHER`] (a subdomain without `include_subdomains`
    /// too: it is not ours).
    pub fn label(&self, domain: &str) -> &str {
        self.covering(domain).map_or(OTHER, |r| r.name.as_str())
    }

    /// Every `domain` label value: the relay domains, then [`OTHER`].
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.names().chain(std::iter::once(OTHER))
    }

    /// The relay domains' names, in the configuration's order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.domains.iter().map(|r| r.name.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = &RelayDomain> {
        self.domains.iter()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn relay() -> RelayDomains {
        RelayDomains::new([
            RelayDomain::new("example.com", false),
            RelayDomain::new("Example.ORG.", true),
            RelayDomain::new("b\u{fc}cher.example", true),
        ])
    }

    #[test]
    fn normalises_case_and_the_roots_dot_only() {
        let cases = [
            ("example.com", "example.com"),
            ("Example.COM.", "example.com"),
            ("example.com..", "example.com."),
            ("B\u{dc}CHER.example", "b\u{fc}cher.example"),
            (".", ""),
            ("", ""),
        ];
        for (name, want) in cases {
            assert_eq!(Domain::new(name).as_str(), want, "{name:?}");
        }
        assert_eq!(Domain::typed("  Example.COM.. ").as_str(), "example.com");
        assert_eq!(Domain::new("A.Test").to_string(), "a.test");
        assert_eq!(Domain::new("A.Test"), Domain::new("a.test."));
        let set: HashSet<Domain> = [Domain::new("a.test")].into();
        assert!(set.contains("a.test"));
    }

    #[test]
    fn covers_itself_and_subdomains_only_when_asked() {
        let com = RelayDomain::new("example.com", false);
        let org = RelayDomain::new("example.com", true);
        assert!(com.covers("example.com"));
        assert!(com.covers("Example.COM."));
        assert!(!com.covers("a.example.com"));
        assert!(org.covers("a.b.Example.com"));
        assert!(!org.covers("badexample.com"));
        assert!(!org.covers(".example.com.evil"));
        assert!(!org.covers("com"));
        assert!(!org.covers("\u{e9}xample.com"));
        assert!(!org.covers("example.com.."));
        assert!(
            org.covers(".example.com"),
            "as before: an empty label is a subdomain"
        );
    }

    #[test]
    fn finds_the_covering_relay_domain() {
        let r = relay();
        let name = |d: &str| r.covering(d).map(|r| r.name.as_str());
        assert_eq!(name("EXAMPLE.com."), Some("example.com"));
        assert_eq!(name("sub.example.com"), None);
        assert_eq!(name("a.b.example.org"), Some("example.org"));
        assert_eq!(
            name("mail.B\u{dc}CHER.example"),
            Some("b\u{fc}cher.example")
        );
        assert_eq!(name("gmail.com"), None);
        assert_eq!(
            r.get("Example.org").map(|r| r.include_subdomains),
            Some(true)
        );
        assert_eq!(r.get("a.example.org"), None);
    }

    #[test]
    fn labels_are_relay_domains_or_other() {
        let r = relay();
        assert_eq!(r.label("example.com"), "example.com");
        assert_eq!(r.label("EXAMPLE.com."), "example.com");
        assert_eq!(r.label("sub.example.com"), OTHER);
        assert_eq!(r.label("a.b.example.org"), "example.org");
        assert_eq!(r.label("badexample.org"), OTHER);
        assert_eq!(r.label("gmail.com"), OTHER);
        assert_eq!(r.label(""), OTHER);
        assert_eq!(
            r.labels().collect::<Vec<_>>(),
            ["example.com", "example.org", "b\u{fc}cher.example", OTHER]
        );
        assert_eq!(RelayDomains::default().label("example.com"), OTHER);
    }
}
