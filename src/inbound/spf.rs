//! SPF (RFC 7208) of the client's MAIL FROM, or of its HELO name for the
//! null sender, for domains with `spf = "tag"` or `"reject"`.
//!
//! The primary behind a backup MX sees only our address, so it can no longer
//! check SPF itself: we check, and say what we found in
//! `Authentication-Results:` (RFC 8601, our hostname as authserv-id) and
//! `Received-SPF:` (RFC 7208 §9.1). With `reject`, RCPT gets `550 5.7.23`
//! (RFC 7372) on `fail` only; a lookup that fails or times out is
//! `temperror` and never refuses. A forged `Authentication-Results:` naming
//! our authserv-id is removed (RFC 8601 §5) so the primary trusts only ours.
//!
//! The check runs in the connection shell ([`Checker::check`]) at the first
//! RCPT for such a domain; the session only learns the [`Spf`] result.

use std::borrow::Cow;
use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mail_auth::spf::verify::SpfParameters;
use mail_auth::{MessageAuthenticator, SpfResult};

use super::reply::Reply;
use crate::config;
use crate::route::{Dns, Patience, RouteError};
use crate::status::Rejection;

/// Longest one check may take, every lookup of every include together: the
/// client waits at RCPT meanwhile. Beyond it the result is `temperror`.
pub const LOOKUP_LIMIT: Duration = Duration::from_secs(10);

/// One query's patience: a slow record must not use up the whole check.
const PATIENCE: Patience = Patience {
    timeout: Duration::from_secs(3),
    attempts: 2,
};

/// The result of `check_host()` (RFC 7208 §2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    SoftFail,
    Neutral,
    None,
    TempError,
    PermError,
}

impl Outcome {
    /// The result's name in both header fields.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::SoftFail => "softfail",
            Outcome::Neutral => "neutral",
            Outcome::None => "none",
            Outcome::TempError => "temperror",
            Outcome::PermError => "permerror",
        }
    }
}

impl From<SpfResult> for Outcome {
    fn from(r: SpfResult) -> Outcome {
        match r {
            SpfResult::Pass => Outcome::Pass,
            SpfResult::Fail => Outcome::Fail,
            SpfResult::SoftFail => Outcome::SoftFail,
            SpfResult::Neutral => Outcome::Neutral,
            SpfResult::TempError => Outcome::TempError,
            SpfResult::PermError => Outcome::PermError,
            SpfResult::None => Outcome::None,
        }
    }
}

/// What SPF said about one client, HELO name and sender.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spf {
    pub outcome: Outcome,
    pub ip: IpAddr,
    /// The HELO/EHLO name it was computed with.
    pub helo: String,
    /// The MAIL FROM address it was computed with; empty for the null
    /// sender, whose identity is the HELO name.
    pub sender: String,
}

impl Spf {
    /// Whether this result belongs to this HELO name and sender: a new
    /// transaction (or a new EHLO) needs its own check.
    pub fn is_for(&self, helo: &str, sender: &str) -> bool {
        self.helo == helo && self.sender == sender
    }

    /// The domain whose policy was evaluated.
    fn domain(&self) -> &str {
        match self.sender.rsplit_once('@') {
            Some((_, domain)) => domain,
            None => &self.helo,
        }
    }

    /// `Authentication-Results:` and `Received-SPF:`, each folded and ending
    /// in CRLF, to prepend (below our `Received:`).
    pub fn header(&self, hostname: &str) -> String {
        let result = self.outcome.label();
        let ip = self.ip.to_canonical();
        let (property, identity) = if self.sender.is_empty() {
            ("smtp.helo", self.helo.as_str())
        } else {
            ("smtp.mailfrom", self.sender.as_str())
        };
        let mut out = String::with_capacity(300);
        let _ = write!(
            out,
            "Authentication-Results: {hostname};\r\n\tspf={result} {property}={}\r\n",
            value(identity)
        );
        let (who, kind) = if self.sender.is_empty() {
            (format!("postmaster@{}", clean(&self.helo)), "helo")
        } else {
            (clean(&self.sender), "mailfrom")
        };
        let domain = clean(self.domain());
        let comment = match self.outcome {
            Outcome::Pass => format!("domain of {who} designates {ip} as permitted sender"),
            Outcome::Fail => format!("domain of {who} does not designate {ip} as permitted sender"),
            Outcome::SoftFail => {
                format!("domain of {who} does not designate {ip} as permitted sender; softfail")
            }
            Outcome::Neutral => format!("{ip} is neither permitted nor denied by domain of {who}"),
            Outcome::None => format!("domain of {who} does not publish SPF"),
            Outcome::TempError => format!("error in processing during lookup of {domain}"),
            Outcome::PermError => format!("permanent error in the SPF record of {domain}"),
        };
        let _ = write!(
            out,
            "Received-SPF: {result} ({hostname}: {comment})\r\n\tclient-ip={}; envelope-from={};\r\n\thelo={}; receiver={hostname}; identity={kind};\r\n",
            value(&ip.to_string()),
            value(&self.sender),
            value(&self.helo),
        );
        out
    }
}

/// The refusal `spf = "reject"` gives a sender SPF says `fail` for.
pub fn refusal(spf: Option<&Spf>, mode: config::Spf) -> Option<Reply> {
    let spf = spf.filter(|s| s.outcome == Outcome::Fail && mode == config::Spf::Reject)?;
    let who = if spf.sender.is_empty() {
        format!("helo {}", clean(&spf.helo))
    } else {
        format!("<{}>", clean(&spf.sender))
    };
    Some(Reply::refuse(
        Rejection::Spf,
        550,
        "5.7.23",
        format!(
            "SPF validation failed: {} does not permit [{}] to send mail as {who}",
            clean(spf.domain()),
            spf.ip.to_canonical()
        ),
    ))
}

/// Checks SPF with its own resolver on the configured nameservers.
pub struct Checker {
    auth: MessageAuthenticator,
}

impl Checker {
    /// Asks the same nameservers as delivery (`delivery.nameservers`).
    pub fn new(nameservers: &[SocketAddr]) -> Result<Checker, RouteError> {
        let dns = Dns::with_patience(nameservers, PATIENCE)?;
        Ok(Checker {
            auth: MessageAuthenticator(dns.resolver()),
        })
    }

    /// SPF of `sender` (or of `helo` for the null sender) for a client at
    /// `ip`; `hostname` is ours (the `%{r}` macro). Never longer than
    /// [`LOOKUP_LIMIT`].
    pub async fn check(&self, ip: IpAddr, helo: &str, sender: &str, hostname: &str) -> Spf {
        let ip = ip.to_canonical();
        let params = if sender.is_empty() {
            SpfParameters::verify_ehlo(ip, helo, hostname)
        } else {
            SpfParameters::verify_mail_from(ip, helo, hostname, sender)
        };
        let outcome = match tokio::time::timeout(LOOKUP_LIMIT, self.auth.verify_spf(params)).await {
            Ok(output) => output.result().into(),
            Err(_) => Outcome::TempError,
        };
        Spf {
            outcome,
            ip,
            helo: helo.to_owned(),
            sender: sender.to_owned(),
        }
    }
}

/// `message` without the `Authentication-Results:` fields of its header
/// section whose authserv-id is `authserv_id` (case-insensitive): only we
/// may speak for us (RFC 8601 §5). Folded fields go whole; the body is
/// never touched.
pub fn strip_claims<'a>(message: &'a [u8], authserv_id: &str) -> Cow<'a, [u8]> {
    let mut kept: Option<Vec<u8>> = None;
    let mut at = 0;
    while at < message.len() {
        let end = field_end(message, at);
        let field = &message[at..end];
        if field.starts_with(b"\r\n") || field.starts_with(b"\n") {
            break; // the empty line: the body follows
        }
        let claims = claims_id(field, authserv_id);
        match (&mut kept, claims) {
            (None, true) => kept = Some(message[..at].to_vec()),
            (Some(out), false) => out.extend_from_slice(field),
            _ => {}
        }
        at = end;
    }
    match kept {
        Some(mut out) => {
            out.extend_from_slice(&message[at..]);
            Cow::Owned(out)
        }
        None => Cow::Borrowed(message),
    }
}

/// Where the header field starting at `start` ends: after the line break of
/// its last line (continuation lines start with a space or tab).
fn field_end(message: &[u8], start: usize) -> usize {
    let mut at = start;
    loop {
        match memchr::memchr(b'\n', &message[at..]) {
            None => return message.len(),
            Some(i) => at += i + 1,
        }
        if !matches!(message.get(at), Some(b' ' | b'\t')) {
            return at;
        }
    }
}

/// Whether `field` is an `Authentication-Results:` field naming `id`.
fn claims_id(field: &[u8], id: &str) -> bool {
    const NAME: &[u8] = b"authentication-results";
    let Some(colon) = memchr::memchr(b':', field) else {
        return false;
    };
    let name = field[..colon].trim_ascii_end();
    if !name.eq_ignore_ascii_case(NAME) {
        return false;
    }
    let value = String::from_utf8_lossy(&field[colon + 1..]);
    authserv_id(&value).is_some_and(|found| found.eq_ignore_ascii_case(id))
}

/// The authserv-id at the start of an `Authentication-Results:` value:
/// after folding white space and comments, a token or quoted string.
fn authserv_id(value: &str) -> Option<Cow<'_, str>> {
    let mut rest = value;
    loop {
        rest = rest.trim_start();
        let Some(after) = rest.strip_prefix('(') else {
            break;
        };
        let mut depth = 1;
        let mut end = None;
        let mut escaped = false;
        for (i, c) in after.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(i + 1);
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end?..];
    }
    if let Some(quoted) = rest.strip_prefix('"') {
        let close = quoted.find('"')?;
        return Some(Cow::Owned(quoted[..close].replace('\\', "")));
    }
    let end = rest
        .find(|c: char| c == ';' || c == '(' || c.is_whitespace())
        .unwrap_or(rest.len());
    Some(Cow::Borrowed(rest[..end].trim_end_matches('.'))).filter(|id| !id.is_empty())
}

/// A client-supplied word fit for a header: no control characters.
fn clean(word: &str) -> String {
    word.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// A key-value pair's value (RFC 7208 §9.1): a dot-atom as it is, anything
/// else as a quoted string.
fn value(word: &str) -> String {
    let word = clean(word);
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.@".contains(c);
    // `@` is not atext, but an address as one token is what readers expect
    // (RFC 7208's own examples write envelope-from unquoted).
    if !word.is_empty() && word.chars().all(atext) && !word.starts_with('.') && !word.ends_with('.')
    {
        return word;
    }
    let mut out = String::with_capacity(word.len() + 2);
    out.push('"');
    for c in word.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spf(outcome: Outcome, helo: &str, sender: &str) -> Spf {
        Spf {
            outcome,
            ip: "192.0.2.1".parse().unwrap(),
            helo: helo.into(),
            sender: sender.into(),
        }
    }

    #[test]
    fn headers_for_the_sender_and_for_the_null_sender() {
        let h = spf(Outcome::Pass, "client.example.org", "a@example.org").header("mx2.test");
        assert_eq!(
            h,
            "Authentication-Results: mx2.test;\r\n\tspf=pass smtp.mailfrom=a@example.org\r\n\
             Received-SPF: pass (mx2.test: domain of a@example.org designates 192.0.2.1 as permitted sender)\r\n\
             \tclient-ip=192.0.2.1; envelope-from=a@example.org;\r\n\
             \thelo=client.example.org; receiver=mx2.test; identity=mailfrom;\r\n"
        );
        let h = spf(Outcome::Fail, "client.example.org", "").header("mx2.test");
        assert!(
            h.contains("spf=fail smtp.helo=client.example.org\r\n"),
            "{h}"
        );
        assert!(h.contains("envelope-from=\"\";"), "{h}");
        assert!(h.contains("identity=helo;"), "{h}");
        assert!(h.contains("postmaster@client.example.org"), "{h}");
    }

    #[test]
    fn client_words_cannot_break_the_header() {
        let h = spf(Outcome::Neutral, "a\"b\r\nX-Evil: 1", "x y\"@example.org").header("mx2.test");
        assert!(!h.contains("\r\nX-Evil"), "{h}");
        assert!(h.contains("helo=\"a\\\"b??X-Evil: 1\";"), "{h}");
        assert!(h.contains("envelope-from=\"x y\\\"@example.org\";"), "{h}");
        let ipv6 = Spf {
            ip: "2001:db8::1".parse().unwrap(),
            ..spf(Outcome::Pass, "c.test", "a@b.test")
        };
        assert!(
            ipv6.header("mx2.test")
                .contains("client-ip=\"2001:db8::1\";")
        );
    }

    #[test]
    fn only_fail_is_refused_and_only_with_reject() {
        use config::Spf::{Off, Reject, Tag};
        for outcome in [
            Outcome::Pass,
            Outcome::SoftFail,
            Outcome::Neutral,
            Outcome::None,
            Outcome::TempError,
            Outcome::PermError,
        ] {
            assert_eq!(
                refusal(Some(&spf(outcome, "h.test", "a@b.test")), Reject),
                None
            );
        }
        let fail = spf(Outcome::Fail, "h.test", "a@b.test");
        assert_eq!(refusal(Some(&fail), Off), None);
        assert_eq!(refusal(Some(&fail), Tag), None);
        assert_eq!(refusal(None, Reject), None);
        let reply = refusal(Some(&fail), Reject).expect("refused");
        assert_eq!(reply.rejection, Some(Rejection::Spf));
        let text = reply.to_string();
        assert!(text.starts_with("550 5.7.23 "), "{text}");
        assert!(
            text.contains("b.test") && text.contains("[192.0.2.1]"),
            "{text}"
        );
    }

    #[test]
    fn our_authserv_id_is_stripped_from_the_header_only() {
        let msg = b"Received: x\r\n\
            Authentication-Results: MX2.test; spf=pass\r\n\
            Authentication-Results: other.test; spf=fail\r\n\
            authentication-results :\r\n (forged) mx2.test.;\r\n\tdkim=pass\r\n\
            Authentication-Results: \"mx2.test\"; none\r\n\
            Authentication-Results: mx2.testing; spf=pass\r\n\
            Subject: s\r\n\
            \r\n\
            Authentication-Results: mx2.test; spf=pass\r\n";
        let out = strip_claims(msg, "mx2.test");
        assert_eq!(
            &*out,
            &b"Received: x\r\n\
            Authentication-Results: other.test; spf=fail\r\n\
            Authentication-Results: mx2.testing; spf=pass\r\n\
            Subject: s\r\n\
            \r\n\
            Authentication-Results: mx2.test; spf=pass\r\n"[..]
        );
        let clean = b"Subject: s\r\n\r\nAuthentication-Results: mx2.test; x\r\n";
        assert!(matches!(strip_claims(clean, "mx2.test"), Cow::Borrowed(_)));
        // No body at all, and a last field without a line break.
        assert_eq!(
            &*strip_claims(
                b"Subject: s\r\nAuthentication-Results: mx2.test",
                "mx2.test"
            ),
            b"Subject: s\r\n"
        );
    }
}
