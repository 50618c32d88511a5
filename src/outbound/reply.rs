//! Replies from the next hop: finding where one ends in the bytes read so far,
//! and parsing it with smtp-proto's client side. Pure: the session reads the
//! bytes, this module only looks at them.

use std::fmt::{self, Write as _};

use smtp_proto::response::parser::ResponseReceiver;
use smtp_proto::{
    EXT_8BIT_MIME, EXT_CHUNKING, EXT_DSN, EXT_PIPELINING, EXT_SIZE, EXT_SMTP_UTF8, EXT_START_TLS,
    EhloResponse,
};

use super::Capabilities;
use super::outcome::{Class, Outcome, classify};
use crate::status::Failure;

/// A parsed reply from the next hop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// The enhanced status code the reply carried, e.g. `"5.1.1"`.
    pub enhanced: Option<String>,
    /// The text of every line, without code and enhanced code, joined by `\n`.
    pub text: String,
}

impl Reply {
    pub fn class(&self) -> Class {
        classify(self.code, self.enhanced.as_deref())
    }

    /// The outcome for a recipient this reply refused; `None` if it did not
    /// refuse (or was not a reply one can act on).
    pub(crate) fn refusal(&self) -> Option<Outcome> {
        match self.class() {
            Class::Transient { status } => Some(Outcome::Deferred {
                status,
                reply: self.to_string(),
            }),
            Class::Permanent { status } => Some(Outcome::Failed {
                status,
                reply: self.to_string(),
                reason: Failure::Rejected,
            }),
            _ => None,
        }
    }
}

/// One line, fit for a log field, `last_reply` or a DSN's `Diagnostic-Code:`:
/// the lines of a multi-line reply are joined by spaces, and any other control
/// character the next hop sent (a bare CR, a tab, NUL) is shown as `?`.
impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(enhanced) = &self.enhanced {
            write!(f, " {enhanced}")?;
        }
        for line in self.text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            f.write_str(" ")?;
            for c in line.chars() {
                f.write_char(if c.is_control() { '?' } else { c })?;
            }
        }
        Ok(())
    }
}

/// Where the first complete reply in `input` ends (one past its last `\n`), if
/// it has arrived whole. A reply ends with the first line whose fourth byte is
/// not `-` (RFC 5321 §4.2.1).
pub(crate) fn reply_end(input: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(lf) = memchr::memchr(b'\n', &input[start..]) {
        let end = start + lf + 1;
        if input[start..end].get(3) != Some(&b'-') {
            return Some(end);
        }
        start = end;
    }
    None
}

/// Parses one complete reply, as delimited by [`reply_end`].
pub(crate) fn parse(raw: &[u8]) -> Result<Reply, String> {
    let response = ResponseReceiver::default()
        .parse(&mut raw.iter())
        .map_err(|e| format!("unreadable reply {:?}: {e:?}", String::from_utf8_lossy(raw)))?;
    let enhanced = match response.esc {
        [0, _, _] => None,
        [class, subject, detail] => Some(format!("{class}.{subject}.{detail}")),
    };
    Ok(Reply {
        code: response.code,
        enhanced,
        text: response.message,
    })
}

/// The extensions a 250 reply to EHLO lists. A list smtp-proto cannot read is
/// taken as no extensions at all: plain RFC 5321 is always safe to speak.
pub(crate) fn capabilities(raw: &[u8]) -> Capabilities {
    let Ok(ehlo) = EhloResponse::parse(&mut raw.iter()) else {
        return Capabilities::default();
    };
    let has = |ext| ehlo.has_capability(ext);
    Capabilities {
        eightbitmime: has(EXT_8BIT_MIME),
        smtputf8: has(EXT_SMTP_UTF8),
        dsn: has(EXT_DSN),
        pipelining: has(EXT_PIPELINING),
        chunking: has(EXT_CHUNKING),
        size: has(EXT_SIZE).then_some(ehlo.size as u64),
        starttls: has(EXT_START_TLS),
        tls: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Status;

    #[test]
    fn finds_the_end_of_single_and_multi_line_replies() {
        let cases: [(&[u8], Option<usize>); 9] = [
            (b"", None),
            (b"250 ok", None),
            (b"250 ok\r\n", Some(8)),
            (b"250 ok\r\n221 bye\r\n", Some(8)),
            (b"250-a\r\n250-b\r\n", None),
            (b"250-a\r\n250-b\r\n250 c\r\nrest", Some(21)),
            (b"250\r\n", Some(5)),
            (b"250-a\n250 b\n", Some(12)),
            (b"5\r\n", Some(3)),
        ];
        for (input, end) in cases {
            assert_eq!(
                reply_end(input),
                end,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn renders_control_characters_in_the_text_as_question_marks() {
        // Found by the next_hop_reply fuzz target: a bare CR inside a line
        // reached the outcome, `last_reply`, the logs and `queue show`.
        for (input, want) in [
            (&b"450 4\r.example.com\r\n"[..], "450 4?.example.com"),
            (
                b"450-4.2.0 busy\tnow\x00\r\n450 4.2.0 more\x1b[0m\r\n",
                "450 4.2.0 busy?now? more?[0m",
            ),
        ] {
            let line = parse(input).unwrap().to_string();
            assert_eq!(line, want);
            assert!(!line.chars().any(char::is_control), "{line:?}");
        }
    }

    #[test]
    fn parses_codes_enhanced_codes_and_text() {
        let r = parse(b"550 5.1.1 <x@example.com>: no such user\r\n").unwrap();
        assert_eq!(r.code, 550);
        assert_eq!(r.enhanced.as_deref(), Some("5.1.1"));
        assert_eq!(r.text, "<x@example.com>: no such user");

        let r = parse(b"250 Ok\r\n").unwrap();
        assert_eq!((r.code, r.enhanced, r.text.as_str()), (250, None, "Ok"));

        let r = parse(b"452-4.5.3 too many\r\n452 4.5.3 recipients\r\n").unwrap();
        assert_eq!(r.code, 452);
        assert_eq!(r.enhanced.as_deref(), Some("4.5.3"));
        assert_eq!(r.to_string(), "452 4.5.3 too many recipients");

        assert!(parse(b"hello\r\n").is_err());
    }

    #[test]
    fn reads_the_extensions_we_act_on() {
        let raw = b"250-mx.example.com hi\r\n250-PIPELINING\r\n250-SIZE 1000\r\n\
            250-8BITMIME\r\n250-SMTPUTF8\r\n250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n\
            250-CHUNKING\r\n250 STARTTLS\r\n";
        assert_eq!(
            capabilities(raw),
            Capabilities {
                eightbitmime: true,
                smtputf8: true,
                dsn: true,
                pipelining: true,
                chunking: true,
                size: Some(1000),
                starttls: true,
                tls: false,
            }
        );
        let raw = b"250-mx\r\n250 SIZE\r\n";
        assert_eq!(
            capabilities(raw),
            Capabilities {
                size: Some(0),
                ..Capabilities::default()
            }
        );
        assert_eq!(capabilities(b"250 mx\r\n"), Capabilities::default());
    }

    #[test]
    fn refusals_become_failed_or_deferred() {
        let reply = |code, enhanced: Option<&str>| Reply {
            code,
            enhanced: enhanced.map(Into::into),
            text: "no such user".into(),
        };
        assert_eq!(
            reply(550, Some("5.1.1")).refusal(),
            Some(Outcome::Failed {
                status: Status::NO_SUCH_MAILBOX,
                reply: "550 5.1.1 no such user".into(),
                reason: Failure::Rejected,
            })
        );
        assert_eq!(
            reply(450, None).refusal(),
            Some(Outcome::Deferred {
                status: Status::transient(0, 0),
                reply: "450 no such user".into()
            })
        );
        assert_eq!(reply(250, None).refusal(), None);
        assert_eq!(reply(421, None).refusal(), None);
    }

    #[test]
    fn multi_line_replies_render_on_one_line() {
        let reply = Reply {
            code: 550,
            enhanced: Some("5.7.1".into()),
            text: "first\nsecond\n".into(),
        };
        assert_eq!(reply.to_string(), "550 5.7.1 first second");
        let bare = Reply {
            code: 250,
            enhanced: None,
            text: String::new(),
        };
        assert_eq!(bare.to_string(), "250");
    }
}
