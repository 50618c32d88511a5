#!/usr/bin/env python3
"""TCP forwarder that adds a round-trip time, and counts round trips.

    latency_proxy.py --listen 127.0.0.1:2731 --target 127.0.0.1:2732 \
        --rtt-ms 50 --stats FILE [--ready FILE]

Every chunk read from one side is written to the other RTT/2 after it
arrived (its own arrival time + RTT/2, so delays never add up), in order;
a half-close (EOF) is passed on after the same delay. Any number of
connections at once.

Counted per direction ("c2s": towards the target, "s2c": back), summed over
all connections: bytes, chunks, and bursts. A burst is a chunk arriving after
that connection's direction was idle for at least RTT/4 (or the first one):
with a client that waits for replies, each burst towards the target is one
round trip. Also connections: in total, at most at once, and connection-seconds
(divided by a duration: the mean number open). A connection counts as open from
its accept until the first end of stream or error in either direction, so the
last RTT/2 of a close does not overlap the next connection.

The totals are written as JSON to --stats on SIGUSR1 and on SIGTERM/SIGINT
(then the proxy exits). --ready is written once the listening socket is bound.
Python 3.8+ standard library only.
"""
import argparse
import asyncio
import json
import os
import signal
import sys


class Stats:
    def __init__(self):
        self.dirs = {d: {"bytes": 0, "chunks": 0, "bursts": 0} for d in ("c2s", "s2c")}
        self.connections = 0
        self.active = 0
        self.max_active = 0
        self.closed_seconds = 0.0
        self.open_since = {}   # connection -> loop time of its accept
        self.upstream_failures = 0

    def opened(self, key, now):
        self.connections += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.open_since[key] = now

    def ended(self, key, now):
        since = self.open_since.pop(key, None)
        if since is not None:
            self.active -= 1
            self.closed_seconds += now - since

    def as_dict(self, rtt_ms, now):
        open_seconds = sum(now - t for t in self.open_since.values())
        return {
            "rtt_ms": rtt_ms,
            "connections": self.connections,
            "max_concurrent_connections": self.max_active,
            "connection_seconds": round(self.closed_seconds + open_seconds, 3),
            "upstream_failures": self.upstream_failures,
            **self.dirs,
        }


def parse_addr(text):
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


async def pump(reader, writer, delay, idle, counters, loop, on_end):
    """Copy reader to writer, each chunk delayed by `delay` from its arrival."""
    queue = asyncio.Queue()

    async def read_side():
        last = None
        try:
            while True:
                data = await reader.read(65536)
                now = loop.time()
                if not data:
                    break
                if last is None or now - last >= idle:
                    counters["bursts"] += 1
                last = now
                counters["bytes"] += len(data)
                counters["chunks"] += 1
                queue.put_nowait((now + delay, data))
        except (ConnectionError, OSError):
            pass
        on_end()
        queue.put_nowait((loop.time() + delay, None))

    async def write_side():
        try:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass

    reading = asyncio.ensure_future(read_side())
    try:
        await write_side()
    finally:
        # If the far side stopped taking data, stop reading too.
        if not reading.done():
            reading.cancel()
        try:
            await reading
        except asyncio.CancelledError:
            pass


async def handle(client_r, client_w, args, stats, loop):
    key = object()
    stats.opened(key, loop.time())
    end = lambda: stats.ended(key, loop.time())
    try:
        try:
            server_r, server_w = await asyncio.open_connection(*args.target)
        except OSError:
            stats.upstream_failures += 1
            client_w.close()
            return
        delay = args.rtt_ms / 2000.0
        idle = args.rtt_ms / 4000.0
        await asyncio.gather(
            pump(client_r, server_w, delay, idle, stats.dirs["c2s"], loop, end),
            pump(server_r, client_w, delay, idle, stats.dirs["s2c"], loop, end),
        )
        for w in (client_w, server_w):
            w.close()
    except asyncio.CancelledError:
        pass   # shutting down with the connection still open
    finally:
        end()


def write_stats(path, stats, rtt_ms, loop):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(stats.as_dict(rtt_ms, loop.time()), f)
        f.write("\n")
    os.replace(tmp, path)


async def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--listen", required=True, type=parse_addr, help="host:port")
    p.add_argument("--target", required=True, type=parse_addr, help="host:port")
    p.add_argument("--rtt-ms", type=float, default=50.0, help="round-trip time added (default 50)")
    p.add_argument("--stats", required=True, help="JSON file written on SIGUSR1/SIGTERM")
    p.add_argument("--ready", help="file written once listening")
    args = p.parse_args()

    loop = asyncio.get_running_loop()
    stats = Stats()
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, args, stats, loop), *args.listen, backlog=1024)
    if args.ready:
        with open(args.ready, "w") as f:
            f.write(f"{os.getpid()}\n")

    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, write_stats, args.stats, stats, args.rtt_ms, loop)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    write_stats(args.stats, stats, args.rtt_ms, loop)
    server.close()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
