//! The first part of a notice: plain text for people, wrapped short enough
//! that an ASCII notice goes as `7bit`, readable as sent. It says what
//! happened, to whom, what the remote server said and what happens next;
//! what it quotes is made safe by the same rules as the delivery-status
//! fields.

use std::fmt::Write as _;

use super::returned::Returned;
use super::status::{clean, is_smtp_reply, pieces, status_code, word};
use super::{Action, RecipientReport, Report, rfc5322_date, wants};
use crate::spool::Envelope;

/// The part for people: what happened, to whom, what the remote server
/// said, and what happens next.
pub(super) fn human_text(
    report: &Report,
    host: &str,
    headline: Action,
    returned: &Returned,
) -> String {
    let mut out = String::with_capacity(1024 + 300 * report.recipients.len());
    para(
        &mut out,
        &format!("This is the mail system at host {host}."),
    );
    para(&mut out, opening(headline));
    para(&mut out, &attachment(headline, returned));
    para(&mut out, &arrival(report.envelope));
    recipient_sections(&mut out, report);
    while out.ends_with("\r\n\r\n") {
        out.truncate(out.len() - 2);
    }
    out
}

/// What happened, in the words for the most urgent action.
fn opening(headline: Action) -> &'static str {
    match headline {
        Action::Failed => {
            "Your message could not be delivered to one or more of its recipients: \
             the mail system has stopped trying for those listed below."
        }
        Action::Delayed => {
            "Your message has not yet been delivered to one or more of its recipients. \
             This is only a warning: the mail system is still trying, and you do not \
             need to send the message again."
        }
        Action::Delivered => {
            "Your message was delivered to the recipients listed below, as you asked \
             to be told."
        }
        Action::Relayed => {
            "Your message was passed on to the recipients' mail system, which does not \
             send delivery notifications, so you will get no further notice about the \
             recipients listed below."
        }
    }
}

/// What the third part holds and, for bad news, where to get help.
fn attachment(headline: Action, returned: &Returned) -> String {
    let attached = match (returned.full, returned.cut) {
        (true, _) => "The message is attached below.",
        (false, true) => {
            "The message was too large to return in full; only its header section \
             is attached below."
        }
        (false, false) => "The header section of the message is attached below.",
    };
    let help = match headline {
        Action::Failed | Action::Delayed => {
            " If you need help, forward this notice to your postmaster or mail \
             administrator."
        }
        Action::Delivered | Action::Relayed => "",
    };
    format!("{attached}{help}")
}

/// Which message this is about: its sender, arrival and queue ID.
fn arrival(envelope: &Envelope) -> String {
    let sender = if envelope.sender.is_empty() {
        "<>".to_string()
    } else {
        format!("<{}>", clean(&envelope.sender, true))
    };
    format!(
        "The message came from {sender} and was received here on {} with queue ID {}.",
        rfc5322_date(envelope.arrived_ms),
        envelope.id
    )
}

/// The recipients grouped by action, most urgent first, each group under a
/// title; actions no recipient had are left out.
fn recipient_sections(out: &mut String, report: &Report) {
    let global = report.envelope.smtputf8;
    let sections = [
        (
            Action::Failed,
            "Could not be delivered, no longer being tried:",
        ),
        (Action::Delayed, "Delayed, still being retried:"),
        (Action::Delivered, "Delivered:"),
        (
            Action::Relayed,
            "Relayed to a mail system that sends no notifications:",
        ),
    ];
    for (action, title) in sections {
        let mut listed = report
            .recipients
            .iter()
            .filter(|r| r.action == action)
            .peekable();
        if listed.peek().is_none() {
            continue;
        }
        out.push_str(title);
        out.push_str("\r\n\r\n");
        for r in listed {
            recipient_text(out, r, global);
        }
    }
}

/// One recipient's entry: its address (and the one the sender used, if
/// different), what the status means, the remote reply or our reason, and
/// what happens next.
fn recipient_text(out: &mut String, r: &RecipientReport, global: bool) {
    let address = clean(&r.recipient.address, true);
    let status = status_code(r.status, r.action);
    let mut line = format!("<{address}>");
    if let Some(orcpt) = &r.recipient.orcpt {
        let original = orcpt
            .split_once(';')
            .filter(|(kind, _)| kind.trim().eq_ignore_ascii_case("rfc822"))
            .map_or(orcpt.as_str(), |(_, a)| a);
        let original = clean(original, true);
        if !original.is_empty() && !original.eq_ignore_ascii_case(&address) {
            let _ = write!(line, " (originally addressed to <{original}>)");
        }
    }
    match describe(status) {
        Some(why) => {
            let _ = write!(line, ": {why} ({status}).");
        }
        None => {
            let _ = write!(line, ": status {status}.");
        }
    }
    let indent = "    ";
    wrap(out, &line, "", indent);
    if let Some(diag) = r.diagnostic.map(|d| clean(d, global))
        && !diag.is_empty()
    {
        if is_smtp_reply(&diag) {
            let who = r
                .remote_mta
                .map(|m| word(&clean(m, global)))
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| "The remote server".to_string());
            line_in(out, &format!("{who} said: {diag}"), indent);
        } else {
            line_in(out, &format!("Reason: {diag}"), indent);
        }
    } else if let Some(mta) = r.remote_mta.map(|m| word(&clean(m, global)))
        && !mta.is_empty()
    {
        line_in(out, &format!("Remote server: {mta}"), indent);
    }
    if let Some(ms) = r.last_attempt_ms {
        line_in(out, &format!("Last attempt: {}", rfc5322_date(ms)), indent);
    }
    if let Some(ms) = r.will_retry_until_ms {
        let then = if wants(r.recipient.notify, Action::Failed) {
            "you will get another notice"
        } else {
            "it will be given up without further notice, as you asked"
        };
        line_in(
            out,
            &format!(
                "Next step: delivery will be retried until {}; if it still fails \
                 by then, {then}.",
                rfc5322_date(ms)
            ),
            indent,
        );
    }
    out.push_str("\r\n");
}

/// A phrase for the common RFC 3463 codes, so a person need not look them up.
fn describe(status: &str) -> Option<&'static str> {
    let mut parts = status.split('.');
    let class = parts.next()?;
    if class == "2" {
        return None;
    }
    let subject: u16 = parts.next()?.parse().ok()?;
    let detail: u16 = parts.next()?.parse().ok()?;
    Some(match (subject, detail) {
        (1, 1) => "the mailbox does not exist",
        (1, 2) => "the recipient's domain does not exist",
        (1, 3) => "the recipient's address is not valid",
        (1, 10) => "the recipient's domain accepts no mail",
        (1, _) => "there is a problem with the recipient's address",
        (2, 1) => "the mailbox is disabled",
        (2, 2) => "the mailbox is full",
        (2, 3) => "the message is too large for the mailbox",
        (2, _) => "there is a problem with the recipient's mailbox",
        (3, 1) => "the receiving mail system is full",
        (3, 4) => "the message is too large for the receiving system",
        (3, _) => "the receiving mail system has a problem",
        (4, 1) => "the receiving mail server did not answer",
        (4, 2) => "the connection to the receiving mail server broke",
        (4, 3) => "a DNS lookup failed",
        (4, 4) => "no route to the recipient's domain was found",
        (4, 6) => "a mail routing loop was detected",
        (4, 7) => "the message stayed in the queue too long",
        (4, _) => "a network or routing problem occurred",
        (5, _) => "the receiving mail server reported a protocol error",
        (6, _) => "the receiving mail server could not accept the message's content",
        (7, _) => "the receiving mail server refused the message for policy reasons",
        _ => return None,
    })
}

/// Width of the human text. mail-builder sends text with lines over 75
/// characters as quoted-printable; shorter lines keep an ASCII notice 7bit
/// and readable as it is.
const TEXT_WIDTH: usize = 72;

/// Appends `text` wrapped at spaces, then a blank line.
fn para(out: &mut String, text: &str) {
    wrap(out, text, "", "");
    out.push_str("\r\n");
}

/// Appends `text` wrapped, every line indented by `indent`, with no blank
/// line after it.
fn line_in(out: &mut String, text: &str, indent: &str) {
    wrap(out, text, indent, indent);
}

/// Appends `text` wrapped at spaces to [`TEXT_WIDTH`], the first line
/// starting with `first` and the others with `rest`.
fn wrap(out: &mut String, text: &str, first: &str, rest: &str) {
    out.push_str(first);
    let mut column = first.len();
    let mut words_on_line = 0;
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        for piece in pieces(word, TEXT_WIDTH - rest.len()) {
            if words_on_line > 0 && column + 1 + piece.len() > TEXT_WIDTH {
                out.push_str("\r\n");
                out.push_str(rest);
                column = rest.len();
                words_on_line = 0;
            }
            if words_on_line > 0 {
                out.push(' ');
                column += 1;
            }
            out.push_str(piece);
            column += piece.len();
            words_on_line += 1;
        }
    }
    out.push_str("\r\n");
}

#[cfg(test)]
mod tests {
    use crate::dsn::build;
    use crate::dsn::fixtures::*;
    use crate::spool::Ret;

    #[test]
    fn delayed_recipient_text() {
        let env = envelope(Ret::Unset, false);
        let bob = recipient("bob@example.com", None, 0);
        let out = build(&report(&env, ORIGINAL, vec![delayed(&bob)]));
        let parts = parts(&out);
        let text = String::from_utf8(parts[0].1.clone()).unwrap();
        assert!(text.contains("only a warning"), "{text}");
        assert!(text.contains("retried until"), "{text}");
        assert!(
            text.contains("Reason: connect to mx1.example.com"),
            "{text}"
        );
    }
}
