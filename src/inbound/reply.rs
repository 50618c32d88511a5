//! SMTP replies: a code, an RFC 3463 enhanced status code, and text; a
//! refusal also says why, for `mxspool_smtp_rejected_total`.

use std::fmt;

use crate::status::Rejection;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Enhanced status code, e.g. "5.7.1"; empty only for the greeting-style
    /// replies RFC 2034 exempts (220, 221 may still carry one; we always do).
    pub status: &'static str,
    /// One element per line of a multi-line reply.
    pub lines: Vec<String>,
    /// Why the client was refused, as counted; set by whoever refused, so
    /// the count never has to guess from code and status.
    pub rejection: Option<Rejection>,
}

impl Reply {
    /// A reply that refuses nothing (or, our shutdown's 421, that is not
    /// the client's fault). Reply text may quote what the client sent (a
    /// path, an ETRN node): control characters in it become `?` (RFC 5321
    /// §4.2: text is printable).
    pub fn new(code: u16, status: &'static str, text: impl Into<String>) -> Reply {
        Reply {
            code,
            status,
            lines: vec![printable(text.into())],
            rejection: None,
        }
    }

    /// A refusal (4xx or 5xx), counted under `why`.
    pub fn refuse(
        why: Rejection,
        code: u16,
        status: &'static str,
        text: impl Into<String>,
    ) -> Reply {
        Reply {
            rejection: Some(why),
            ..Reply::new(code, status, text)
        }
    }

    /// A command refused as malformed, out of order or unsupported: the
    /// refusal counted as `syntax`, the most common one.
    pub fn syntax(code: u16, status: &'static str, text: impl Into<String>) -> Reply {
        Reply::refuse(Rejection::Syntax, code, status, text)
    }

    /// A multi-line reply (EHLO); no enhanced code on lines that are keywords.
    pub fn multiline(code: u16, lines: Vec<String>) -> Reply {
        Reply {
            code,
            status: "",
            lines,
            rejection: None,
        }
    }

    pub fn is_error(&self) -> bool {
        self.code >= 400
    }

    /// The first line's text, for logs.
    pub fn text(&self) -> &str {
        self.lines.first().map(String::as_str).unwrap_or("")
    }

    pub fn write_to(&self, out: &mut Vec<u8>) {
        use std::io::Write;
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            // Writing into a Vec cannot fail.
            let _ = if self.status.is_empty() {
                write!(out, "{}{sep}{line}\r\n", self.code)
            } else {
                write!(out, "{}{sep}{} {line}\r\n", self.code, self.status)
            };
        }
    }
}

/// `text` with every control character replaced by `?`.
fn printable(text: String) -> String {
    if text.chars().any(char::is_control) {
        text.chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect()
    } else {
        text
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = Vec::new();
        self.write_to(&mut out);
        f.write_str(String::from_utf8_lossy(&out).trim_end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_carries_its_reason_and_renders_without_it() {
        let refused = Reply::refuse(Rejection::Relay, 550, "5.7.1", "Relay access denied");
        assert_eq!(refused.rejection, Some(Rejection::Relay));
        assert!(refused.is_error());
        assert_eq!(refused.to_string(), "550 5.7.1 Relay access denied");
        assert_eq!(Reply::new(250, "2.0.0", "Ok").rejection, None);
    }

    #[test]
    fn renders_single_and_multi_line() {
        let mut out = Vec::new();
        Reply::new(250, "2.1.0", "Ok").write_to(&mut out);
        assert_eq!(out, b"250 2.1.0 Ok\r\n");
        out.clear();
        Reply::multiline(
            250,
            vec!["mx".into(), "PIPELINING".into(), "SIZE 10".into()],
        )
        .write_to(&mut out);
        assert_eq!(out, b"250-mx\r\n250-PIPELINING\r\n250 SIZE 10\r\n");
    }

    #[test]
    fn client_text_quoted_in_a_reply_is_made_printable() {
        let mut out = Vec::new();
        Reply::new(458, "4.5.4", "node <\0a\x1b[2Jb\x7f>").write_to(&mut out);
        assert_eq!(out, b"458 4.5.4 node <?a?[2Jb?>\r\n");
    }
}
