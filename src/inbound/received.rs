//! The `Received:` trace field we prepend to every message (RFC 5321 §4.4).

use std::fmt::Write;
use std::net::IpAddr;

use crate::spool::QueueId;

/// Everything the trace field records about one hop.
pub struct Trace<'a> {
    /// The name the client gave in EHLO/HELO (untrusted; sanitised here).
    pub helo: &'a str,
    pub ip: IpAddr,
    /// Our host name.
    pub by: &'a str,
    pub esmtp: bool,
    pub tls: bool,
    pub smtputf8: bool,
    pub id: QueueId,
    /// The recipient, only when the message has exactly one (privacy).
    pub only_recipient: Option<&'a str>,
    /// Unix seconds.
    pub date: i64,
    /// Mail fetched from a mailbox: `POP3` or `IMAP`, named instead of an
    /// SMTP protocol (the "client" is the mailbox server).
    pub fetched_with: Option<&'a str>,
}

impl Trace<'_> {
    /// The header field, folded, ending in CRLF.
    pub fn header(&self) -> String {
        // RFC 3848 / RFC 6531 protocol names.
        let protocol = match (self.esmtp, self.smtputf8, self.tls) {
            _ if self.fetched_with.is_some() => self.fetched_with.unwrap_or_default(),
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, false, true) => "ESMTPS",
            (true, true, false) => "UTF8SMTP",
            (true, true, true) => "UTF8SMTPS",
        };
        let ip = match self.ip.to_canonical() {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("IPv6:{v6}"),
        };
        let mut out = String::with_capacity(200);
        let _ = write!(
            out,
            "Received: from {} ([{ip}])\r\n\tby {} (mxspool) with {protocol} id {}",
            sanitise(self.helo),
            self.by,
            self.id
        );
        if let Some(rcpt) = self.only_recipient {
            let _ = write!(out, "\r\n\tfor <{}>", sanitise(rcpt));
        }
        let _ = write!(
            out,
            "; {}\r\n",
            mail_builder::headers::date::Date::new(self.date).to_rfc822()
        );
        out
    }
}

/// Keeps a client-supplied word from breaking the header's structure: no
/// controls, spaces, comments or angle brackets.
fn sanitise(word: &str) -> String {
    let clean: String = word
        .chars()
        .map(|c| {
            if c.is_control() || c.is_whitespace() || "()<>;\\\"".contains(c) {
                '_'
            } else {
                c
            }
        })
        .collect();
    if clean.is_empty() {
        "unknown".into()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_the_trace_field() {
        let trace = Trace {
            helo: "client.example.org",
            ip: "192.0.2.1".parse().unwrap(),
            by: "mx2.example.net",
            esmtp: true,
            tls: false,
            smtputf8: false,
            id: QueueId(1),
            only_recipient: Some("a@example.com"),
            date: 0,
            fetched_with: None,
        };
        assert_eq!(
            trace.header(),
            "Received: from client.example.org ([192.0.2.1])\r\n\tby mx2.example.net (mxspool) \
             with ESMTP id 0000000000001\r\n\tfor <a@example.com>; Thu, 1 Jan 1970 00:00:00 +0000\r\n"
        );
    }

    #[test]
    fn protocols_and_hostile_input() {
        let mut trace = Trace {
            helo: "evil\r\nX-Injected: yes (",
            ip: "::ffff:10.0.0.1".parse().unwrap(),
            by: "mx2",
            esmtp: false,
            tls: false,
            smtputf8: false,
            id: QueueId(2),
            only_recipient: None,
            date: 0,
            fetched_with: None,
        };
        let h = trace.header();
        assert!(
            h.starts_with("Received: from evil__X-Injected:_yes__ ([10.0.0.1])"),
            "{h}"
        );
        assert!(h.contains("with SMTP id"));
        assert!(!h.contains("for <"));
        assert_eq!(h.matches("\r\n").count(), 2);
        trace.ip = "2001:db8::1".parse().unwrap();
        trace.esmtp = true;
        trace.smtputf8 = true;
        trace.tls = true;
        assert!(trace.header().contains("([IPv6:2001:db8::1])"));
        assert!(trace.header().contains("with UTF8SMTPS id"));
        trace.fetched_with = Some("POP3");
        assert!(trace.header().contains("with POP3 id"));
    }
}
