//! A connection's bytes: buffered reads of lines, message content and BDAT
//! chunks, buffered replies, and the timeouts that bound each (one read or
//! write, and the whole session). Nothing here knows SMTP beyond line ends.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::data::{Data, DataReader};
use crate::shutdown::Shutdown;

/// Longest command line we read (Postfix's `line_length_limit`); longer lines
/// are discarded up to their end and refused with 500 5.5.2.
pub const MAX_LINE: usize = 2048;
const READ_CHUNK: usize = 16 * 1024;
/// Longest we wait for a client to take our replies off the socket.
const WRITE_TIMEOUT: Duration = Duration::from_secs(300);

pub(super) enum Input {
    Line(Vec<u8>),
    TooLong,
}

#[derive(Debug)]
pub(super) enum Stop {
    /// The client closed the connection.
    Eof,
    Timeout,
    Shutdown,
    Io(std::io::Error),
    /// The client asked for TLS: the caller does the handshake.
    StartTls,
}

/// The connection's bytes: what has been read but not used, and replies not yet sent.
pub(super) struct Io<S> {
    pub(super) stream: S,
    /// The whole session must end by then, however slowly the client trickles.
    deadline: tokio::time::Instant,
    input: Vec<u8>,
    /// Start of unconsumed bytes in `input`.
    start: usize,
    pub(super) output: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Io<S> {
    pub(super) fn new(stream: S, deadline: tokio::time::Instant) -> Io<S> {
        Io {
            stream,
            deadline,
            input: Vec::new(),
            start: 0,
            output: Vec::new(),
        }
    }

    pub(super) fn pending(&self) -> &[u8] {
        &self.input[self.start..]
    }

    /// Drops everything read and not yet used.
    pub(super) fn discard_input(&mut self) {
        self.input.clear();
        self.start = 0;
    }

    pub(super) fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.input.len() {
            self.input.clear();
            self.start = 0;
        }
    }

    /// Time left for one read or write: `timeout`, but never past the deadline.
    pub(super) fn limit(&self, timeout: Duration) -> Duration {
        timeout.min(
            self.deadline
                .saturating_duration_since(tokio::time::Instant::now()),
        )
    }

    pub(super) async fn flush(&mut self) -> Result<(), Stop> {
        if !self.output.is_empty() {
            // A client that never reads its replies must not hold us forever.
            let limit = self.limit(WRITE_TIMEOUT);
            let write = async {
                self.stream.write_all(&self.output).await?;
                self.stream.flush().await
            };
            match tokio::time::timeout(limit, write).await {
                Err(_) => return Err(Stop::Timeout),
                Ok(Err(e)) => return Err(Stop::Io(e)),
                Ok(Ok(())) => {}
            }
            self.output.clear();
        }
        Ok(())
    }

    /// Sends pending replies, then waits for more input.
    pub(super) async fn fill(
        &mut self,
        timeout: Duration,
        shutdown: &mut Shutdown,
    ) -> Result<(), Stop> {
        self.flush().await?;
        if self.start > 0 {
            self.input.drain(..self.start);
            self.start = 0;
        }
        let len = self.input.len();
        self.input.resize(len + READ_CHUNK, 0);
        let limit = self.limit(timeout);
        let read = tokio::select! {
            r = tokio::time::timeout(limit, self.stream.read(&mut self.input[len..])) => r,
            () = shutdown.wait() => {
                self.input.truncate(len);
                return Err(Stop::Shutdown);
            }
        };
        let n = match read {
            Err(_) => Err(Stop::Timeout),
            Ok(Err(e)) => Err(Stop::Io(e)),
            Ok(Ok(0)) => Err(Stop::Eof),
            Ok(Ok(n)) => Ok(n),
        };
        self.input.truncate(len + *n.as_ref().unwrap_or(&0));
        n.map(|_| ())
    }

    pub(super) async fn next_line(
        &mut self,
        timeout: Duration,
        shutdown: &mut Shutdown,
    ) -> Result<Input, Stop> {
        let mut skipping = false;
        loop {
            let pending = self.pending();
            if let Some(pos) = memchr::memchr(b'\n', pending) {
                let line = pending[..=pos].to_vec();
                self.consume(pos + 1);
                return Ok(if skipping || line.len() > MAX_LINE {
                    Input::TooLong
                } else {
                    Input::Line(line)
                });
            }
            if pending.len() > MAX_LINE {
                skipping = true;
                let n = pending.len();
                self.consume(n);
            }
            self.fill(timeout, shutdown).await?;
        }
    }

    pub(super) async fn read_data(
        &mut self,
        max: u64,
        timeout: Duration,
        shutdown: &mut Shutdown,
    ) -> Result<Data, Stop> {
        let mut reader = DataReader::new(max);
        loop {
            let (used, done) = reader.feed(self.pending());
            self.consume(used);
            if let Some(data) = done {
                return Ok(data);
            }
            self.fill(timeout, shutdown).await?;
        }
    }

    /// Reads exactly `size` octets, handing each piece to `sink` as it comes.
    pub(super) async fn read_chunk(
        &mut self,
        size: u64,
        mut sink: impl FnMut(&[u8]),
        timeout: Duration,
        shutdown: &mut Shutdown,
    ) -> Result<(), Stop> {
        let mut left = size;
        while left > 0 {
            if self.pending().is_empty() {
                self.fill(timeout, shutdown).await?;
            }
            let n = usize::try_from(left)
                .map_or(self.pending().len(), |left| left.min(self.pending().len()));
            sink(&self.pending()[..n]);
            self.consume(n);
            left -= n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client dripping one byte just inside every per-read timeout is still
    /// cut off at the session deadline.
    #[tokio::test(start_paused = true)]
    async fn the_session_deadline_stops_slow_drip_clients() {
        let (client, server) = tokio::io::duplex(64);
        let started = tokio::time::Instant::now();
        let mut io = Io::new(server, started + Duration::from_secs(10));
        let (_trigger, mut shutdown) = crate::shutdown::channel();
        let drip = tokio::spawn(async move {
            let mut client = client;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if client.write_all(b"x").await.is_err() {
                    return;
                }
            }
        });
        let result = io.next_line(Duration::from_secs(2), &mut shutdown).await;
        assert!(matches!(result, Err(Stop::Timeout)), "{:?}", result.err());
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_secs(10) && elapsed < Duration::from_secs(12),
            "{elapsed:?}"
        );
        drip.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_reads_cannot_block_replies_forever() {
        let (_client, server) = tokio::io::duplex(16);
        let mut io = Io::new(
            server,
            tokio::time::Instant::now() + Duration::from_secs(3600),
        );
        io.output = vec![b'x'; 1024];
        assert!(matches!(io.flush().await, Err(Stop::Timeout)));
    }

    /// A chunk is taken by its length from whatever the reads return: what
    /// looks like commands inside it is content, and the command pipelined
    /// right after it is the next line.
    #[tokio::test]
    async fn a_chunk_is_read_by_its_length_whatever_the_reads() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = Io::new(
            server,
            tokio::time::Instant::now() + Duration::from_secs(60),
        );
        let (_trigger, mut shutdown) = crate::shutdown::channel();
        let content = b"NOOP\r\n".repeat(50);
        let mut wire = b"BDAT 300\r\n".to_vec();
        wire.extend_from_slice(&content);
        wire.extend_from_slice(b"QUIT\r\n");
        let writer = tokio::spawn(async move {
            client.write_all(&wire).await.unwrap();
            client
        });
        let timeout = Duration::from_secs(5);
        let Ok(Input::Line(line)) = io.next_line(timeout, &mut shutdown).await else {
            panic!("no BDAT line")
        };
        assert_eq!(line, b"BDAT 300\r\n");
        let mut got = Vec::new();
        let read = io
            .read_chunk(300, |o| got.extend_from_slice(o), timeout, &mut shutdown)
            .await;
        assert!(read.is_ok(), "{:?}", read.err());
        assert_eq!(got, content);
        let Ok(Input::Line(line)) = io.next_line(timeout, &mut shutdown).await else {
            panic!("no line after the chunk")
        };
        assert_eq!(line, b"QUIT\r\n");
        drop(writer.await);
    }

    /// A client announcing a huge chunk gets nothing allocated for it: the
    /// input buffer stays at its reading size until the client gives up.
    #[tokio::test]
    async fn an_announced_size_is_never_allocated() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = Io::new(
            server,
            tokio::time::Instant::now() + Duration::from_secs(60),
        );
        let (_trigger, mut shutdown) = crate::shutdown::channel();
        tokio::spawn(async move {
            client.write_all(&[b'x'; 1000]).await.unwrap();
        });
        let mut seen = 0;
        let read = io
            .read_chunk(
                4_000_000_000,
                |o| seen += o.len(),
                Duration::from_secs(5),
                &mut shutdown,
            )
            .await;
        assert!(matches!(read, Err(Stop::Eof)), "{:?}", read.err());
        assert_eq!(seen, 1000);
        assert!(
            io.input.capacity() <= 2 * READ_CHUNK,
            "{}",
            io.input.capacity()
        );
    }
}
