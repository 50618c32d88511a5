//! What delivery changes in transit, on arbitrary bytes: declared 8-bit MIME
//! made 7-bit for a next hop without 8BITMIME, and over-long lines broken.
//!
//! Input: two bytes for the line length limit (0, or 78 and up), then the
//! message.
//!
//! Checked: neither ever panics; a converted message holds no 8-bit octet;
//! after breaking, no line is longer than the limit on the wire (a leading
//! dot counts twice, as DATA sends it), and a line is only broken when one
//! was too long.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxspool::outbound::fuzz as out;

/// A line without its line ending, as long as DATA makes it.
fn wire_len(line: &[u8]) -> usize {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.len() + usize::from(line.starts_with(b"."))
}

fuzz_target!(|input: &[u8]| {
    let Some((head, message)) = input.split_first_chunk::<2>() else {
        return;
    };
    let limit = match u16::from_le_bytes(*head) as usize % 1024 {
        0 => 0,
        n => n.max(78),
    };

    if let Ok(converted) = out::to_7bit(message) {
        assert!(converted.is_ascii(), "8-bit octets left after conversion");
    }

    let too_long = limit > 0 && message.split(|&b| b == b'\n').any(|l| wire_len(l) > limit);
    match out::break_long(message, limit) {
        None => assert!(!too_long, "a line over {limit} octets was left"),
        Some((broken, count)) => {
            assert!(too_long && count > 0, "broken with no line too long");
            for line in broken.split(|&b| b == b'\n') {
                assert!(
                    wire_len(line) <= limit,
                    "a line over {limit} octets after breaking"
                );
            }
        }
    }
});
