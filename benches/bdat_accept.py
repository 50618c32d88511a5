#!/usr/bin/env python3
"""Accept throughput over CHUNKING: messages per second a running mxspool
takes when every message is sent as MAIL, RCPT and `BDAT n LAST` pipelined in
one write (what a CHUNKING client does with PIPELINING).

smtp-source (benches/run.sh) sends DATA only; this is the BDAT counterpart,
with the standard library only:

    benches/bdat_accept.py --port 2625 --sessions 20 --messages 5000

`--messages` is the total, spread over the sessions (as smtp-source's -m).
Each 250 is counted only after the server's final reply for the message,
which mxspool sends after the spool commit. Exits 1 if any message was not
accepted, so a figure is never printed for a run that failed.
"""

import argparse
import asyncio
import sys
import time


def message(size: int, n: int) -> bytes:
    """A message of exactly `size` octets (at least the header), CRLF lines."""
    head = f"From: bench@origin.test\r\nTo: user@example.com\r\nSubject: bdat {n}\r\n\r\n"
    if size - len(head) == 1:
        head = head.replace("Subject: ", "Subject:  ", 1)
    body = bytearray(head.encode())
    left = size - len(body)
    while left > 0:
        take = min(78, left)
        if left - take == 1:
            take -= 1
        body += b"x" * (take - 2) + b"\r\n"
        left -= take
    return bytes(body)


async def reply(reader: asyncio.StreamReader) -> tuple[int, list[str]]:
    """One whole (possibly multi-line) reply: its code and each line's text."""
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("the server closed the connection")
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        lines.append(text[4:])
        if len(text) < 4 or text[3] != "-":
            return int(text[:3]), lines


async def expect(reader: asyncio.StreamReader, code: int, what: str) -> list[str]:
    got, lines = await reply(reader)
    if got != code:
        raise RuntimeError(f"{what}: expected {code}, got {got} {' | '.join(lines)}")
    return lines


async def session(args, count: int, first: int, done: list) -> None:
    reader, writer = await asyncio.open_connection(args.host, args.port)
    try:
        await expect(reader, 220, "greeting")
        writer.write(f"EHLO {args.helo}\r\n".encode())
        ehlo = await expect(reader, 250, "EHLO")
        if "CHUNKING" not in ehlo:
            raise RuntimeError(f"CHUNKING not offered: {' | '.join(ehlo)}")
        for n in range(first, first + count):
            content = message(args.size, n)
            writer.write(
                f"MAIL FROM:<{args.sender}>\r\nRCPT TO:<{args.to}>\r\n"
                f"BDAT {len(content)} LAST\r\n".encode()
                + content
            )
            await expect(reader, 250, "MAIL")
            await expect(reader, 250, "RCPT")
            queued = await expect(reader, 250, "BDAT LAST")
            if "queued as" not in queued[0]:
                raise RuntimeError(f"BDAT LAST: {queued[0]}")
            done[0] += 1
        writer.write(b"QUIT\r\n")
        await expect(reader, 221, "QUIT")
    finally:
        writer.close()


async def run(args) -> int:
    per, extra = divmod(args.messages, args.sessions)
    counts = [per + (1 if i < extra else 0) for i in range(args.sessions)]
    firsts = [sum(counts[:i]) for i in range(args.sessions)]
    done = [0]
    started = time.monotonic()
    results = await asyncio.gather(
        *(session(args, c, f, done) for c, f in zip(counts, firsts) if c),
        return_exceptions=True,
    )
    elapsed = time.monotonic() - started
    failures = [r for r in results if isinstance(r, BaseException)]
    for failure in failures[:5]:
        print(f"session failed: {failure!r}", file=sys.stderr)
    rate = done[0] / elapsed if elapsed > 0 else 0.0
    print(
        f"bdat accept: {done[0]}/{args.messages} messages of {args.size} octets, "
        f"{args.sessions} sessions, {elapsed:.2f} s, {rate:.0f} msg/s"
    )
    return 1 if failures or done[0] != args.messages else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=2525)
    p.add_argument("--sessions", type=int, default=20, help="concurrent sessions")
    p.add_argument("--messages", type=int, default=5000, help="messages in total")
    p.add_argument("--size", type=int, default=5120, help="octets per message")
    p.add_argument("--sender", default="bench@origin.test")
    p.add_argument("--to", default="user@example.com")
    p.add_argument("--helo", default="bench.test")
    args = p.parse_args()
    if args.sessions < 1 or args.messages < 0 or args.size < 128:
        p.error("need at least one session, no negative count, and --size >= 128")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
