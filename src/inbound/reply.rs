//! SMTP replies: a code, an RFC 3463 enhanced status code, and text.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Enhanced status code, e.g. "5.7.1"; empty only for the greeting-style
    /// replies RFC 2034 exempts (220, 221 may still carry one; we always do).
    pub status: &'static str,
    /// One element per line of a multi-line reply.
    pub lines: Vec<String>,
}

impl Reply {
    /// Reply text may quote what the client sent (a path, an ETRN node):
    /// control characters in it become `?` (RFC 5321 §4.2: text is printable).
    pub fn new(code: u16, status: &'static str, text: impl Into<String>) -> Reply {
        Reply {
            code,
            status,
            lines: vec![printable(text.into())],
        }
    }

    /// A multi-line reply (EHLO); no enhanced code on lines that are keywords.
    pub fn multiline(code: u16, lines: Vec<String>) -> Reply {
        Reply {
            code,
            status: "",
            lines,
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

impl Reply {
    /// Why this refusal happened, as counted in `mxspool_smtp_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match (self.code, self.status) {
            (_, "5.7.1") => "relay",
            (_, "5.1.1") => "unknown_user",
            (_, "5.3.4") | (_, "5.2.3") => "size",
            (_, "4.5.3") => "too_many_recipients",
            (_, "5.4.6") => "loop",
            (_, "4.3.1") => "spool_full",
            (_, "4.3.0") => "spool_error",
            (421, "4.7.0") => "too_many_errors",
            (_, "4.4.2") => "timeout",
            (_, "5.6.7") => "smtputf8",
            (_, "5.5.0") => "pipelining",
            (500..=599, s) if s.starts_with("5.5.") || s == "5.1.3" || s == "5.1.7" => "syntax",
            _ => "other",
        }
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
    fn refusals_have_a_counted_reason() {
        for (code, status, reason) in [
            (550, "5.7.1", "relay"),
            (550, "5.1.1", "unknown_user"),
            (552, "5.3.4", "size"),
            (452, "4.5.3", "too_many_recipients"),
            (554, "5.4.6", "loop"),
            (452, "4.3.1", "spool_full"),
            (451, "4.3.0", "spool_error"),
            (421, "4.7.0", "too_many_errors"),
            (421, "4.4.2", "timeout"),
            (553, "5.6.7", "smtputf8"),
            (554, "5.5.0", "pipelining"),
            (500, "5.5.2", "syntax"),
            (501, "5.1.3", "syntax"),
            (503, "5.5.1", "syntax"),
            (459, "4.7.1", "other"),
        ] {
            assert_eq!(
                Reply::new(code, status, "x").reason(),
                reason,
                "{code} {status}"
            );
            assert!(crate::metrics::REJECT_REASONS.contains(&reason));
        }
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
