//! Spool records as untrusted input: arbitrary bytes decoded as a stored
//! envelope (a damaged or hostile spool file), and a decoded envelope used as
//! delivery uses it.
//!
//! Checked: decoding never panics; what decodes encodes back to a record that
//! decodes to the same envelope; whatever the record holds, the commands
//! planned for it are single CRLF-terminated lines of the right verb (a
//! stored address or parameter cannot add a command), and every recipient
//! asked for is either settled or sent exactly once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxspool::outbound::Capabilities;
use mxspool::outbound::fuzz as out;
use mxspool::spool::Envelope;

fn one_line(line: &str, verb: &str) {
    assert!(line.starts_with(verb), "{line:?}");
    assert!(line.ends_with("\r\n"), "{line:?}");
    assert!(
        !line[..line.len() - 2].contains(['\r', '\n']),
        "a line break inside a command: {line:?}"
    );
}

fuzz_target!(|input: &[u8]| {
    let Ok(envelope) = Envelope::decode(input) else {
        return;
    };
    let again = Envelope::decode(&envelope.encode()).expect("a record we wrote decodes");
    assert_eq!(again, envelope);
    let _ = envelope.next_due_ms();

    // The first 64 recipients, and two indexes no recipient has.
    let n = envelope.recipients.len().min(64);
    let beyond = envelope.recipients.len() + 1;
    let wanted: Vec<usize> = (0..n).chain([beyond, usize::MAX]).collect();
    for bits in [0u8, 0x0f, 0x05, 0x0a] {
        let caps = Capabilities {
            dsn: bits & 1 != 0,
            smtputf8: bits & 2 != 0,
            eightbitmime: bits & 4 != 0,
            size: (bits & 8 != 0).then_some(1 << 20),
            pipelining: true,
            chunking: false,
            starttls: false,
            tls: false,
        };
        let plan = out::plan(&envelope, envelope.size, &caps, &wanted);
        let mut seen: Vec<usize> = plan
            .settled
            .iter()
            .map(|(i, _)| *i)
            .chain(plan.rcpts.iter().map(|(i, _)| *i))
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
        for (_, outcome) in &plan.settled {
            assert!(!outcome.reply().contains(['\r', '\n']), "{outcome:?}");
        }
        if plan.rcpts.is_empty() {
            continue;
        }
        one_line(&plan.mail_from, "MAIL FROM:<");
        for (_, line) in &plan.rcpts {
            one_line(line, "RCPT TO:<");
        }
    }
});
