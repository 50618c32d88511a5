//! The message content filters on arbitrary bytes: inbound, the DATA reader
//! (end of data, dot-stuffing, line endings, size limit) and the BDAT chunk
//! reader; outbound, the dot-stuffer and the CRLF cleaner for BDAT.
//!
//! Input: one byte for the size of the pieces bytes arrive in (and whether
//! the size limit is small), then the content.
//!
//! Checked: how bytes are cut into pieces changes nothing; what is stored has
//! CRLF line endings only; the inbound and outbound normalisations agree; and
//! whatever bytes the spool holds, after dot-stuffing the next hop's DATA
//! reader ends exactly at our terminator and reads the content back.
#![no_main]

#[path = "common.rs"]
mod common;

use common::only_crlf;
use libfuzzer_sys::fuzz_target;
use mxspool::inbound::data::{ChunkReader, Data, DataReader, count_received};
use mxspool::outbound::fuzz as out;

/// Feeds `input` in pieces of `piece` bytes; the data and the bytes used.
fn read_data(input: &[u8], piece: usize, max: u64) -> Option<(Data, usize)> {
    let mut reader = DataReader::new(max);
    let mut at = 0;
    while at < input.len() {
        let end = (at + piece).min(input.len());
        let (used, done) = reader.feed(&input[at..end]);
        assert!(used <= end - at);
        if let Some(data) = done {
            return Some((data, at + used));
        }
        assert_eq!(used, end - at, "a piece is consumed whole until the end");
        at = end;
    }
    None
}

fn read_chunks(input: &[u8], piece: usize, max: u64) -> Data {
    let mut reader = ChunkReader::new(max);
    for chunk in input.chunks(piece) {
        reader.feed(chunk);
    }
    assert_eq!(reader.octets(), input.len() as u64);
    reader.finish()
}

fn check_stored(data: &Data, max: u64) {
    assert!(only_crlf(&data.body), "{:?}", data.body);
    assert!(data.body.is_empty() || data.body.ends_with(b"\r\n"));
    if data.oversize {
        assert!(data.body.is_empty() && data.size > max);
    } else {
        assert_eq!(data.size, data.body.len() as u64);
        assert_eq!(data.has_8bit, data.body.iter().any(|&b| b >= 0x80));
    }
}

/// The next hop's view of what we send after DATA: the content back,
/// terminated exactly at the end.
fn over_the_wire(wire: &[u8]) -> Vec<u8> {
    let (used, data) = DataReader::new(u64::MAX).feed(wire);
    let data = data.expect("the terminator is on the wire");
    assert_eq!(used, wire.len(), "the data ended before our terminator");
    data.body
}

fuzz_target!(|input: &[u8]| {
    let [knob, content @ ..] = input else {
        return;
    };
    let piece = usize::from(knob & 127).max(1);
    let max = if knob & 128 != 0 { 64 } else { u64::MAX };

    // DATA: the same result however the bytes arrive.
    let whole = read_data(content, content.len().max(1), max);
    let pieces = read_data(content, piece, max);
    assert_eq!(whole, pieces);
    if let Some((data, _)) = &whole {
        check_stored(data, max);
        count_received(&data.body);
        if !data.oversize {
            assert_eq!(
                over_the_wire(&out::dot_stuff([data.body.as_slice()])),
                data.body
            );
        }
    }

    // BDAT: the same, and the same normalisation as the outbound cleaner.
    let chunked = read_chunks(content, piece, max);
    assert_eq!(chunked, read_chunks(content, content.len().max(1), max));
    check_stored(&chunked, max);
    let clean = out::crlf_clean(content);
    assert!(only_crlf(&clean));
    assert_eq!(out::crlf_clean(&clean), clean, "cleaning is idempotent");
    if !chunked.oversize {
        assert_eq!(
            chunked.body, clean,
            "BDAT in and BDAT out normalise differently"
        );
    }

    // Whatever the spool holds (it is untrusted input too), the next hop reads
    // it back with CRLF line endings and nothing after our terminator.
    let stuffed = out::dot_stuff(content.chunks(piece));
    assert_eq!(
        stuffed,
        out::dot_stuff([content]),
        "stuffing depends on the pieces"
    );
    assert!(only_crlf(&stuffed));
    assert_eq!(over_the_wire(&stuffed), clean);
});
