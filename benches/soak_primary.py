#!/usr/bin/env python3
"""A primary mail server for the soak run, whose behaviour is switched while
it runs, and which records what it accepted.

    soak_primary.py --port 2726 --control 2727 --log FILE [--gone-prefix gone]

Modes (switched over the control port, see below):
  up      ESMTP (PIPELINING, 8BITMIME, SIZE, ENHANCEDSTATUSCODES); recipients
          whose local part starts with --gone-prefix get 550 5.1.1, all
          others 250.
  down    not listening (connection refused); open sessions are cut.
  hang    connections are accepted and then nothing is answered; when the
          mode changes again, the hung connections are cut (an operator
          restarting a stuck daemon).
  4xx     greets, then 451 4.3.0 to every RCPT.
  421     greets with 421 4.3.2 and closes.

A session in progress follows a mode change at its next reply.

Every message accepted (250 after the final dot) is one JSON line in --log:
  {"from": ..., "rcpts": [accepted], "tag": Message-ID tag or null,
   "sha1": of the content after the first (our backup's) Received: field,
   "size": content bytes, "dsn": [[final recipient, tag], ...] for a
   failure notice (MAIL FROM:<>)}
Tags are the local part of a Message-ID ending in @soak.test. In a notice,
the tag is the one in the returned header section, and "dsn" pairs each
`Final-Recipient` whose `Action` is failed with it.

Control port: one command per line, one reply line each:
  mode up|down|hang|4xx|421   -> ok
  stats                       -> JSON: messages, connections, refused rcpts
  quit                        -> flushes the log and exits
Python 3.8+ standard library only.
"""
import argparse
import asyncio
import hashlib
import json
import re

MODES = ("up", "down", "hang", "4xx", "421")
TAG = re.compile(rb"^Message-ID:\s*<([^@>\s]+)@soak\.test>", re.I | re.M)
FAILED = re.compile(
    rb"^Final-Recipient:\s*rfc822;\s*([^\r\n]+)\r\nAction:\s*failed", re.I | re.M
)


def strip_first_received(content):
    """The content without its first header field (our backup's Received:)."""
    if not content.startswith(b"Received:"):
        return content
    at = 0
    while True:
        end = content.find(b"\r\n", at)
        if end < 0:
            return b""
        at = end + 2
        if content[at:at + 1] not in (b" ", b"\t"):
            return content[at:]


class Primary:
    def __init__(self, port, log, gone_prefix):
        self.port = port
        self.log = log
        self.gone = gone_prefix.lower()
        self.mode = "up"
        self.server = None
        self.sessions = set()       # transports of open sessions
        self.unhang = asyncio.Event()
        self.messages = 0
        self.connections = 0
        self.refused_rcpts = 0
        self.done = asyncio.Event()

    async def listen(self):
        if self.server is None:
            self.server = await asyncio.start_server(
                self.session, "127.0.0.1", self.port, reuse_address=True, limit=1 << 16
            )

    def cut_all(self):
        for transport in list(self.sessions):
            transport.abort()
        self.sessions.clear()

    async def set_mode(self, mode):
        old, self.mode = self.mode, mode
        if old == "hang":
            # Wake the hung sessions; they cut their connections.
            self.unhang.set()
            self.unhang = asyncio.Event()
        if mode == "down":
            if self.server is not None:
                self.server.close()
                self.server = None
            self.cut_all()
        else:
            await self.listen()

    async def hang(self, writer):
        await self.unhang.wait()
        writer.transport.abort()

    async def reply(self, writer, line):
        """Writes a reply unless the mode says otherwise; False: session over."""
        if self.mode == "hang":
            await self.hang(writer)
            return False
        if self.mode == "down":
            writer.transport.abort()
            return False
        writer.write(line.encode() + b"\r\n")
        await writer.drain()
        return True

    async def session(self, reader, writer):
        self.connections += 1
        self.sessions.add(writer.transport)
        try:
            await self.converse(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            self.sessions.discard(writer.transport)
            writer.transport.abort()

    async def converse(self, reader, writer):
        if self.mode == "421":
            writer.write(b"421 4.3.2 soak primary: service not available\r\n")
            await writer.drain()
            return
        if not await self.reply(writer, "220 primary.soak.test ESMTP"):
            return
        sender, rcpts = None, []
        while True:
            line = await reader.readline()
            if not line:
                return
            cmd = line.decode("latin-1").rstrip("\r\n")
            verb = cmd[:4].upper()
            if verb in ("EHLO", "HELO"):
                sender, rcpts = None, []
                text = ("250-primary.soak.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                        "250-SIZE 20971520\r\n250 ENHANCEDSTATUSCODES")
                if verb == "HELO":
                    text = "250 primary.soak.test"
                if not await self.reply(writer, text):
                    return
            elif verb == "MAIL":
                m = re.match(r"MAIL FROM:\s*<([^>]*)>", cmd, re.I)
                sender, rcpts = (m.group(1) if m else ""), []
                if not await self.reply(writer, "250 2.1.0 Ok"):
                    return
            elif verb == "RCPT":
                m = re.match(r"RCPT TO:\s*<([^>]*)>", cmd, re.I)
                rcpt = m.group(1) if m else ""
                if self.mode == "4xx":
                    answer = "451 4.3.0 soak primary: try again later"
                elif rcpt.lower().startswith(self.gone):
                    answer = "550 5.1.1 soak primary: no such user"
                    self.refused_rcpts += 1
                elif sender is None:
                    answer = "503 5.5.1 MAIL first"
                else:
                    answer = "250 2.1.5 Ok"
                    rcpts.append(rcpt)
                if not await self.reply(writer, answer):
                    return
            elif verb == "DATA":
                if not rcpts:
                    if not await self.reply(writer, "554 5.5.1 no valid recipients"):
                        return
                    continue
                if not await self.reply(writer, "354 go ahead"):
                    return
                content = await self.read_data(reader)
                if content is None:
                    return
                # The mode may have changed while the content came in.
                if self.mode in ("hang", "down"):
                    await self.reply(writer, "")
                    return
                self.record(sender, rcpts, content)
                sender, rcpts = None, []
                if not await self.reply(writer, "250 2.0.0 Ok: accepted"):
                    return
            elif verb == "RSET":
                sender, rcpts = None, []
                if not await self.reply(writer, "250 2.0.0 Ok"):
                    return
            elif verb == "NOOP":
                if not await self.reply(writer, "250 2.0.0 Ok"):
                    return
            elif verb == "QUIT":
                await self.reply(writer, "221 2.0.0 Bye")
                return
            else:
                if not await self.reply(writer, "502 5.5.2 not implemented"):
                    return

    async def read_data(self, reader):
        lines = []
        while True:
            line = await reader.readline()
            if not line:
                return None
            if line == b".\r\n":
                return b"".join(lines)
            if line.startswith(b"."):
                line = line[1:]
            lines.append(line)

    def record(self, sender, rcpts, content):
        self.messages += 1
        stripped = strip_first_received(content)
        head = stripped.split(b"\r\n\r\n", 1)[0] if sender else stripped
        tag = TAG.search(head)
        entry = {
            "from": sender,
            "rcpts": rcpts,
            "tag": tag.group(1).decode() if tag else None,
            "sha1": hashlib.sha1(stripped).hexdigest(),
            "size": len(stripped),
        }
        if not sender:
            entry["dsn"] = [[r.decode("latin-1").strip(), entry["tag"]]
                            for r in FAILED.findall(content)]
        self.log.write(json.dumps(entry) + "\n")
        self.log.flush()

    async def control(self, reader, writer):
        while True:
            line = await reader.readline()
            if not line:
                break
            words = line.decode().split()
            if words[:1] == ["mode"] and len(words) == 2 and words[1] in MODES:
                await self.set_mode(words[1])
                answer = "ok"
            elif words == ["stats"]:
                answer = json.dumps({"mode": self.mode, "messages": self.messages,
                                     "connections": self.connections,
                                     "refused_rcpts": self.refused_rcpts})
            elif words == ["quit"]:
                writer.write(b"ok\n")
                await writer.drain()
                self.log.flush()
                self.done.set()
                return
            else:
                answer = "error: unknown command"
            writer.write(answer.encode() + b"\n")
            await writer.drain()
        writer.close()


async def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--control", type=int, required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--gone-prefix", default="gone")
    args = p.parse_args()
    with open(args.log, "a", buffering=1 << 16) as log:
        primary = Primary(args.port, log, args.gone_prefix)
        await primary.listen()
        await asyncio.start_server(primary.control, "127.0.0.1", args.control,
                                   reuse_address=True)
        print("ready", flush=True)
        await primary.done.wait()


if __name__ == "__main__":
    asyncio.run(main())
