//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz): the crate-private
//! pure parts of SMTP out, exposed unchanged so the targets run the real code
//! on untrusted bytes (replies from a next hop, records from the spool). Not
//! an API: hidden from the docs, and free to change with the targets.

use tokio::io::{AsyncRead, AsyncWrite};

use super::body::{self, DotStuffer};
use super::{
    Capabilities, Connection, Hop, Reply, SessionError, Timeouts, downgrade, lines, mail, reply,
};
use crate::spool::Envelope;

pub use super::mail::Plan;

/// Where the first complete reply in `input` ends, if it has arrived whole.
pub fn reply_end(input: &[u8]) -> Option<usize> {
    reply::reply_end(input)
}

/// Parses one complete reply, as delimited by [`reply_end`].
pub fn parse_reply(raw: &[u8]) -> Result<Reply, String> {
    reply::parse(raw)
}

/// The extensions a 250 reply to EHLO lists.
pub fn capabilities(raw: &[u8]) -> Capabilities {
    reply::capabilities(raw)
}

/// `address` written as the inside of an RFC 5321 path, if it can be.
pub fn path(address: &str, utf8: bool) -> Option<String> {
    crate::address::path(address, utf8)
}

/// The `MAIL FROM` and `RCPT TO` lines for a message, and the recipients
/// settled before sending.
pub fn plan(envelope: &Envelope, body_len: u64, caps: &Capabilities, recipients: &[usize]) -> Plan {
    mail::plan(envelope, body_len, caps, recipients)
}

/// A body as it goes on the wire after DATA, fed to the dot-stuffer in the
/// given pieces: dot-stuffed, CRLF line endings, the final `.` CRLF.
pub fn dot_stuff<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut stuffer = DotStuffer::new();
    for piece in pieces {
        stuffer.feed(piece, &mut out);
    }
    stuffer.finish(&mut out);
    out
}

/// The content of `BDAT n LAST` for a stored body.
pub fn crlf_clean(body: &[u8]) -> Vec<u8> {
    body::crlf_clean(body).into_owned()
}

/// Declared 8-bit MIME made 7-bit for a next hop without 8BITMIME, or why
/// it cannot be.
pub fn to_7bit(message: &[u8]) -> Result<Vec<u8>, String> {
    downgrade::to_7bit(message).map_err(|e| e.to_string())
}

/// `body` with lines longer than `limit` broken, and how many were; `None`
/// when none was.
pub fn break_long(body: &[u8], limit: usize) -> Option<(Vec<u8>, usize)> {
    lines::break_long(&std::sync::Arc::new(body.to_vec()), limit).map(|(b, n)| (b.to_vec(), n))
}

/// Greeting and EHLO (HELO) over an open stream, as a real delivery starts.
pub async fn start<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    hop: Hop,
    helo_name: &str,
    timeouts: Timeouts,
) -> Result<Connection<S>, SessionError> {
    Connection::start(stream, hop, helo_name, timeouts).await
}
