#!/usr/bin/env python3
"""Soak run: a release mxspool under steady load for a given time while its
primary flaps and its configuration is reloaded; then checks that nothing was
lost and that memory and file descriptors stayed flat. Run it through
benches/soak.sh, which builds the binary:

    soak.py --bin target/release/mxspool --duration 120 [--rate 50] [--clients 8]
            [--seed N] [--work DIR] [--keep]

What runs (all on 127.0.0.1):
- mxspool with max_message_size 2 MB, retries from 2 s to 30 s, probes every
  second; its log (warnings and up, plus the server's own info lines)
  goes to WORK/mxspool.log.
- benches/soak_primary.py as the primary of the one relay domain.
- --clients SMTP clients sending --rate messages a second in all (Poisson
  arrivals), each message with a unique tag in its Message-ID: mostly a few
  KB, some up to 1 MB, one in a hundred within 1% of max_message_size; one in
  ten 8-bit (BODY=8BITMIME); most to one recipient, some to 2-20, a few to
  21-50. About 3% of recipients are users the primary refuses with 550 5.1.1:
  those must come back to the sender (an address at the primary) as failure
  notices.
- The primary's mode follows a random schedule of phases (up, down, hang,
  4xx, 421), the same schedule in each quarter of the run so the quarters are
  comparable; after the last quarter it stays up.
- SIGHUP at random intervals, each after rewriting the config (an extra
  domain comes and goes).
- Every few seconds: RSS and open file descriptors of mxspool (/proc), and
  its queue (/metrics).

Checks (exit status 1 if any fails):
- every recipient of every acknowledged message (250 ... queued as ID)
  reached the primary at least once with the content intact, or, for the
  refused users, came back in a failure notice; none lost;
- the queue is back to 0 within --drain-timeout once the primary stays up,
  with no dead letters and nothing quarantined;
- RSS (median) and open fds (the lowest count: sockets come and go with the
  primary's phases, a leak raises the floor) in the last quarter within 10%
  of the second quarter's;
- no panic and no ERROR line in the log; every SIGHUP logged a reload;
- mxspool exits 0 on SIGTERM at the end.
Python 3.8+ standard library only.
"""
import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

MAX_SIZE = 2 * 1024 * 1024
DOMAIN = "example.com"
SENDER = "soak-sender@" + DOMAIN
GONE = "gone"
MODES = ("up", "down", "hang", "4xx", "421")
MODE_WEIGHTS = (5, 2, 1, 1, 1)
TOLERANCE = 0.10

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_duration(text):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 120, 20m, 1h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------
# Messages


class Corpus:
    """Printable and 8-bit lines, sliced to build bodies of any size cheaply."""

    def __init__(self, rng):
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 +/=-"
        lines = []
        for i in range(4096):
            line = "".join(rng.choice(alphabet) for _ in range(rng.randint(20, 76)))
            if i % 97 == 0:
                line = "." + line          # needs dot-stuffing
            lines.append(line.encode() + b"\r\n")
        self.ascii = lines
        eight = "àéîõüßçñøåæœ€ЖЗИЙКЛМНОПжзийклмнопαβγδεζηθ日本語のテキスト"
        self.eight = [
            "".join(rng.choice(eight + alphabet) for _ in range(rng.randint(10, 40))).encode()
            + b"\r\n"
            for _ in range(512)
        ]

    def body(self, rng, size, eightbit):
        out, n = [], 0
        source = self.eight if eightbit else self.ascii
        i = rng.randrange(len(source))
        while n < size:
            line = source[i % len(source)]
            out.append(line)
            n += len(line)
            i += 1
        return b"".join(out)


def pick_size(rng):
    r = rng.random()
    if r < 0.01:
        # Within 1% of the limit, leaving room for headers and our Received:.
        return int(MAX_SIZE * rng.uniform(0.985, 0.995)), "near-max"
    if r < 0.05:
        return rng.randint(256 * 1024, 1024 * 1024), "large"
    if r < 0.15:
        return rng.randint(16 * 1024, 256 * 1024), "medium"
    return rng.randint(500, 16 * 1024), "small"


def pick_rcpts(rng):
    r = rng.random()
    if r < 0.03:
        n = rng.randint(21, 50)
    elif r < 0.08:
        n = rng.randint(6, 20)
    elif r < 0.20:
        n = rng.randint(2, 5)
    else:
        n = 1
    rcpts = set()
    while len(rcpts) < n:
        if rng.random() < 0.03:
            rcpts.add(f"{GONE}{rng.randrange(5)}@{DOMAIN}")
        else:
            rcpts.add(f"user{rng.randrange(500)}@{DOMAIN}")
    return sorted(rcpts)


def message(corpus, rng, tag, rcpts):
    size, kind = pick_size(rng)
    eightbit = rng.random() < 0.10
    header = (
        f"From: Soak <{SENDER}>\r\nTo: <{rcpts[0]}>\r\n"
        f"Subject: soak {tag}\r\nMessage-ID: <{tag}@soak.test>\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        "MIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset={'utf-8' if eightbit else 'us-ascii'}\r\n"
        f"Content-Transfer-Encoding: {'8bit' if eightbit else '7bit'}\r\n\r\n"
    ).encode()
    body = corpus.body(rng, max(0, size - len(header)), eightbit)
    return header + body, kind, eightbit


# ---------------------------------------------------------------------------
# The load


class Load:
    def __init__(self, args, smtp_port, work):
        self.args = args
        self.port = smtp_port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.sent = open(os.path.join(work, "sent.jsonl"), "w")
        self.counts = {"acked": 0, "refused": 0, "errors": 0, "recipients": 0,
                       "near-max": 0, "large": 0, "medium": 0, "small": 0,
                       "8bit": 0, "many-rcpts": 0, "bytes": 0}
        self.last_error = None

    def count(self, **kw):
        with self.lock:
            for k, v in kw.items():
                self.counts[k] += v

    def client(self, n):
        rng = random.Random(self.args.seed * 1000 + n)
        corpus = Corpus(rng)
        per_client = self.args.rate / self.args.clients
        next_at = time.monotonic()
        seq = 0
        conn, left = None, 0
        while not self.stop.is_set():
            next_at += rng.expovariate(per_client)
            delay = next_at - time.monotonic()
            if delay > 0:
                if self.stop.wait(delay):
                    break
            elif delay < -5:
                next_at = time.monotonic()   # far behind: do not burst to catch up
            seq += 1
            tag = f"s{self.args.seed}-c{n}-{seq}"
            rcpts = pick_rcpts(rng)
            content, kind, eightbit = message(corpus, rng, tag, rcpts)
            try:
                if conn is None or left <= 0:
                    if conn is not None:
                        try:
                            conn.quit()
                        except (smtplib.SMTPException, OSError):
                            pass
                    conn = smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.soak.test",
                                        timeout=60)
                    conn.ehlo()
                    left = rng.randint(1, 20)
                left -= 1
                qid = self.send(conn, rcpts, content, eightbit)
            except (smtplib.SMTPException, OSError) as e:
                self.count(errors=1)
                self.last_error = f"{tag}: {e!r}"
                try:
                    conn.close()
                except Exception:
                    pass
                conn = None
                continue
            if qid is None:
                self.count(refused=1)
                continue
            with self.lock:
                self.counts["acked"] += 1
                self.counts["recipients"] += len(rcpts)
                self.counts[kind] += 1
                self.counts["8bit"] += eightbit
                self.counts["many-rcpts"] += len(rcpts) > 20
                self.counts["bytes"] += len(content)
                self.sent.write(json.dumps({
                    "tag": tag, "qid": qid, "rcpts": rcpts, "size": len(content),
                    "sha1": hashlib.sha1(content).hexdigest(),
                }) + "\n")
        if conn is not None:
            try:
                conn.quit()
            except (smtplib.SMTPException, OSError):
                pass

    @staticmethod
    def send(conn, rcpts, content, eightbit):
        """One transaction; the queue ID if the server acknowledged it, else None."""
        opts = [f"SIZE={len(content)}"] + (["BODY=8BITMIME"] if eightbit else [])
        code, _ = conn.mail(SENDER, opts)
        if code != 250:
            conn.rset()
            return None
        for rcpt in rcpts:
            code, _ = conn.rcpt(rcpt)
            if code != 250:
                conn.rset()
                return None
        code, reply = conn.data(content)
        if code != 250:
            return None
        m = re.search(rb"queued as (\w+)", reply)
        return m.group(1).decode() if m else "?"


# ---------------------------------------------------------------------------
# The run


class Soak:
    def __init__(self, args):
        self.args = args
        self.work = args.work or tempfile.mkdtemp(prefix="mxspool-soak-")
        os.makedirs(self.work, exist_ok=True)
        self.smtp = free_port()
        self.http = free_port()
        self.primary_port = free_port()
        self.control_port = free_port()
        self.dns_port = free_port()   # nobody answers: nothing resolves
        self.config = os.path.join(self.work, "config.toml")
        self.server = None
        self.primary = None
        self.control = None
        self.samples = []        # (seconds since load start, rss KiB, fds, queued)
        self.phases = []         # (start, mode)
        self.hups = 0
        self.failures = []
        self.started = None

    # -- configuration and processes

    def write_config(self, extra=False):
        text = f"""[server]
hostname = "mx2.soak.test"
listen = ["127.0.0.1:{self.smtp}"]
max_message_size = {MAX_SIZE}
max_recipients = 100
max_connections_per_ip = 100
command_timeout = "1m"
data_timeout = "2m"

[spool]
path = "{self.work}/spool.redb"

[delivery]
nameservers = ["127.0.0.1:{self.dns_port}"]
retry_initial = "2s"
retry_factor = 2.0
retry_max = "30s"
probe_interval = "1s"
# The primary refuses a few chosen users for good; a run of ten of those in
# a row would pause the domain (drain guard) and hold back the drain this run
# checks. The guard has its own tests (tests/guard.rs).
drain_guard = 0
bounce = "sender"
postmaster = "postmaster@{DOMAIN}"

[http]
listen = "127.0.0.1:{self.http}"

[log]
level = "info,mxspool::scheduler::worker=warn,mxspool::inbound=warn"

[[domain]]
name = "{DOMAIN}"
route = "[127.0.0.1]:{self.primary_port}"
"""
        if extra:
            text += f'\n[[domain]]\nname = "extra.soak.test"\nroute = "[127.0.0.1]:{self.primary_port}"\n'
        tmp = self.config + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.config)

    def start(self):
        self.write_config()
        self.primary = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "soak_primary.py"), "--port", str(self.primary_port),
             "--control", str(self.control_port), "--log", os.path.join(self.work, "primary.jsonl"),
             "--gone-prefix", GONE],
            stdout=subprocess.PIPE, stderr=open(os.path.join(self.work, "primary.err"), "w"), text=True)
        if self.primary.stdout.readline().strip() != "ready":
            raise SystemExit("soak: the primary did not start; see " + self.work)
        self.control = socket.create_connection(("127.0.0.1", self.control_port))
        self.control_file = self.control.makefile("rw")
        env = dict(os.environ, NO_COLOR="1")
        env.setdefault("MALLOC_ARENA_MAX", "2")   # as in the Docker image
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
        env.pop("RUST_LOG", None)
        self.server = subprocess.Popen(
            [self.args.bin, "serve", "-c", self.config], env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.work, "mxspool.log"), "w"))
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"soak: mxspool did not start; see {self.work}/mxspool.log")
            time.sleep(0.05)

    def primary_cmd(self, line):
        self.control_file.write(line + "\n")
        self.control_file.flush()
        return self.control_file.readline().strip()

    def metrics(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            series, value = line.rsplit(" ", 1)
            name = series.split("{", 1)[0]
            try:
                out[name] = out.get(name, 0.0) + float(value)
            except ValueError:
                pass
        return out

    def sample(self):
        pid = self.server.pid
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        queued = self.metrics().get("mxspool_queue_messages", -1)
        return rss, fds, queued

    # -- the phases of the run

    def schedule(self):
        """One quarter's phases as (offset, mode), repeated in every quarter."""
        rng = random.Random(self.args.seed)
        quarter = self.args.duration / 4
        lo, hi = max(2.0, quarter / 12), max(4.0, quarter / 4)
        phases, t = [], 0.0
        while t < quarter:
            mode = rng.choices(MODES, MODE_WEIGHTS)[0]
            if phases and phases[-1][1] == mode:
                continue
            phases.append((t, mode))
            t += rng.uniform(lo, hi)
        return [(q * quarter + off, mode) for q in range(4) for off, mode in phases]

    def flap(self, stop):
        for offset, mode in self.schedule():
            if stop.wait(max(0.0, self.started + offset - time.monotonic())):
                return
            if self.phases and self.phases[-1][1] == mode:
                continue    # a quarter may begin as the last one ended
            answer = self.primary_cmd(f"mode {mode}")
            if answer != "ok":
                self.failures.append(f"primary did not switch to {mode}: {answer}")
            self.phases.append((offset, mode))

    def hup(self, stop):
        rng = random.Random(self.args.seed + 1)
        lo, hi = max(3.0, self.args.duration / 30), max(6.0, self.args.duration / 10)
        while not stop.wait(rng.uniform(lo, hi)):
            self.write_config(extra=self.hups % 2 == 0)
            os.kill(self.server.pid, signal.SIGHUP)
            self.hups += 1

    def watch(self, stop, interval):
        while True:
            try:
                rss, fds, queued = self.sample()
                self.samples.append((time.monotonic() - self.started, rss, fds, queued))
            except (OSError, StopIteration, ValueError):
                pass
            if stop.wait(interval):
                return

    def run(self):
        args = self.args
        log(f"soak: {args.duration:.0f} s, {args.clients} clients, {args.rate} msg/s, "
            f"seed {args.seed}, work {self.work}")
        self.start()
        load = Load(args, self.smtp, self.work)
        self.started = time.monotonic()
        stop_side = threading.Event()
        interval = max(1.0, args.duration / 240)
        threads = [threading.Thread(target=load.client, args=(n,), daemon=True)
                   for n in range(args.clients)]
        threads += [threading.Thread(target=self.flap, args=(stop_side,), daemon=True),
                    threading.Thread(target=self.hup, args=(stop_side,), daemon=True)]
        watcher_stop = threading.Event()
        watcher = threading.Thread(target=self.watch, args=(watcher_stop, interval), daemon=True)
        for t in threads + [watcher]:
            t.start()
        next_report = self.started + max(10.0, args.duration / 12)
        while time.monotonic() < self.started + args.duration:
            time.sleep(0.5)
            if time.monotonic() >= next_report:
                next_report += max(10.0, args.duration / 12)
                s = self.samples[-1] if self.samples else (0, 0, 0, 0)
                c = load.counts
                log(f"t={s[0]:.0f}s acked {c['acked']} refused {c['refused']} errors {c['errors']} "
                    f"queued {s[3]:.0f} rss {s[1] / 1024:.1f} MiB fds {s[2]} "
                    f"primary {self.phases[-1][1] if self.phases else 'up'}")
            if self.server.poll() is not None:
                self.failures.append(f"mxspool exited during the run ({self.server.returncode})")
                break
        load.stop.set()
        stop_side.set()
        for t in threads:
            t.join(timeout=120)
        load.sent.close()
        self.primary_cmd("mode up")
        log("load stopped; the primary stays up; waiting for the queue to drain")

        drained_after = None
        t0 = time.monotonic()
        while time.monotonic() - t0 < args.drain_timeout and self.server.poll() is None:
            try:
                m = self.metrics()
            except OSError:
                time.sleep(1)
                continue
            if m.get("mxspool_queue_messages", -1) == 0:
                drained_after = time.monotonic() - t0
                break
            time.sleep(0.5)
        watcher_stop.set()
        watcher.join()
        try:
            final = self.metrics()
        except OSError:
            final = {}
        # Let the last notices' records reach the primary's log.
        time.sleep(1)
        self.primary_cmd("quit")
        self.primary.wait(timeout=10)

        self.server.send_signal(signal.SIGTERM)
        try:
            code = self.server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.server.kill()
            code = "killed after 60 s"
        return self.report(load, drained_after, final, code)

    # -- checks

    def report(self, load, drained_after, final, exit_code):
        fails = self.failures
        c = load.counts
        sent = [json.loads(l) for l in open(os.path.join(self.work, "sent.jsonl"))]
        got = [json.loads(l) for l in open(os.path.join(self.work, "primary.jsonl"))]
        sha = {m["tag"]: m["sha1"] for m in sent}
        delivered = {}            # (tag, rcpt) -> times
        bounced = set()           # (tag, rcpt) in a failure notice
        corrupt, unknown, notices = [], 0, 0
        for g in got:
            if not g["from"]:
                notices += 1
                for rcpt, tag in g.get("dsn", []):
                    bounced.add((tag, rcpt.lower()))
                continue
            tag = g["tag"]
            if tag not in sha:
                unknown += 1      # accepted by mxspool but not acknowledged to us
                continue
            if g["sha1"] != sha[tag]:
                corrupt.append(tag)
            for rcpt in g["rcpts"]:
                key = (tag, rcpt.lower())
                delivered[key] = delivered.get(key, 0) + 1
        lost, bounced_ok, delivered_ok, wrongly = [], 0, 0, []
        for m in sent:
            for rcpt in m["rcpts"]:
                key = (m["tag"], rcpt.lower())
                if rcpt.startswith(GONE):
                    if key in bounced:
                        bounced_ok += 1
                    else:
                        lost.append(f"{m['tag']} (queued as {m['qid']}) to {rcpt}: no failure notice")
                    if key in delivered:
                        wrongly.append(key)
                elif key in delivered:
                    delivered_ok += 1
                else:
                    lost.append(f"{m['tag']} (queued as {m['qid']}) to {rcpt}: not delivered")
        duplicates = sum(n - 1 for n in delivered.values())
        dup_messages = len({tag for (tag, _), n in delivered.items() if n > 1})

        # Quarters of the load phase: median RSS and fds.
        d = self.args.duration
        def quarter(q):
            return [s for s in self.samples if q * d / 4 <= s[0] < (q + 1) * d / 4]
        q2, q4 = quarter(1), quarter(3)
        def med(rows, i):
            return statistics.median(r[i] for r in rows) if rows else float("nan")
        rss2, rss4, fd2, fd4 = med(q2, 1), med(q4, 1), med(q2, 2), med(q4, 2)
        # Sockets come and go with the primary's phases (a hanging primary
        # holds connections open); a leak raises the floor.
        floor2 = min((r[2] for r in q2), default=float("nan"))
        floor4 = min((r[2] for r in q4), default=float("nan"))

        text = open(os.path.join(self.work, "mxspool.log"), errors="replace").read()
        panics = len(re.findall(r"panicked at", text))
        errors = [l for l in text.splitlines() if re.search(r"\bERROR\b", l)]
        warnings = len(re.findall(r"\bWARN\b", text))
        reloads = len(re.findall(r"configuration reloaded", text))
        seen_down = len(re.findall(r"primary unreachable; probing", text))
        seen_up = len(re.findall(r"primary answers again", text))

        outages = sum(1 for _, m in self.phases if m != "up")
        by_mode = {m: sum(1 for _, x in self.phases if x == m) for m in MODES}
        print()
        print(f"Soak: {d:.0f} s of load, {self.args.clients} clients, target {self.args.rate} msg/s, "
              f"seed {self.args.seed}")
        print(f"  messages acknowledged: {c['acked']} ({c['acked'] / d:.1f}/s), recipients {c['recipients']}, "
              f"{c['bytes'] / 1e6:.0f} MB; refused by mxspool {c['refused']}, client errors {c['errors']}")
        print(f"  mix: small {c['small']}, medium {c['medium']}, large {c['large']}, "
              f"near max_message_size {c['near-max']}; 8-bit {c['8bit']}; >20 recipients {c['many-rcpts']}")
        print(f"  primary phases: {len(self.phases)} ({', '.join(f'{m} {n}' for m, n in by_mode.items())}); "
              f"outages {outages}; mxspool saw it unreachable {seen_down} times, back {seen_up} times")
        print(f"  SIGHUP reloads: {self.hups} sent, {reloads} logged")
        print(f"  delivered: {delivered_ok} recipients; bounced (550 users, notice received): {bounced_ok}; "
              f"notices {notices}; lost {len(lost)}")
        print(f"  duplicates: {duplicates} deliveries ({dup_messages} messages); corrupt {len(corrupt)}; "
              f"delivered but never acknowledged to a client {unknown}")
        print(f"  queue drained to 0: {'after %.1f s' % drained_after if drained_after is not None else 'NO'}; "
              f"dead letters {final.get('mxspool_dead_letters', '?')}, "
              f"quarantined {final.get('mxspool_spool_quarantined', '?')}")
        rss_max = max((s[1] for s in self.samples), default=0)
        fd_max = max((s[2] for s in self.samples), default=0)
        print(f"  RSS median: Q2 {rss2 / 1024:.1f} MiB, Q4 {rss4 / 1024:.1f} MiB "
              f"({(rss4 - rss2) / rss2 * 100 if rss2 else 0:+.1f}%); max {rss_max / 1024:.1f} MiB "
              f"({len(self.samples)} samples)")
        print(f"  open fds: lowest Q2 {floor2:.0f}, Q4 {floor4:.0f}; median Q2 {fd2:.0f}, Q4 {fd4:.0f}; "
              f"max {fd_max}")
        print(f"  log: {panics} panics, {len(errors)} ERROR lines, {warnings} WARN lines")
        print(f"  exit on SIGTERM: {exit_code}")

        if lost:
            fails.append(f"{len(lost)} recipients lost, e.g. " + "; ".join(lost[:5]))
        if corrupt:
            fails.append(f"{len(corrupt)} messages arrived altered, e.g. {corrupt[:5]}")
        if wrongly:
            fails.append(f"{len(wrongly)} refused recipients were delivered: {wrongly[:5]}")
        if c["acked"] == 0:
            fails.append("no message was acknowledged")
        if drained_after is None:
            fails.append(f"the queue did not drain within {self.args.drain_timeout:.0f} s")
        if final.get("mxspool_dead_letters", 0) or final.get("mxspool_spool_quarantined", 0):
            fails.append("dead letters or quarantined records at the end")
        if not (q2 and q4):
            fails.append("too few samples to compare quarters")
        else:
            if rss4 > rss2 * (1 + TOLERANCE) or rss4 < rss2 * (1 - TOLERANCE):
                fails.append(f"RSS Q4 {rss4} KiB not within 10% of Q2 {rss2} KiB")
            if floor4 > floor2 * (1 + TOLERANCE) or floor4 < floor2 * (1 - TOLERANCE):
                fails.append(f"lowest open fds Q4 {floor4} not within 10% of Q2 {floor2}")
        if panics:
            fails.append(f"{panics} panics in the log")
        if errors:
            fails.append(f"{len(errors)} ERROR lines, e.g. {errors[:3]}")
        if reloads != self.hups:
            fails.append(f"{self.hups} SIGHUPs but {reloads} reloads logged")
        if exit_code != 0:
            fails.append(f"mxspool exit status {exit_code} on SIGTERM")
        summary = {
            "duration_s": d, "clients": self.args.clients, "rate": self.args.rate,
            "seed": self.args.seed, "counts": c, "phases": by_mode, "outages": outages,
            "hups": self.hups, "reloads": reloads, "delivered": delivered_ok,
            "bounced": bounced_ok, "lost": len(lost), "duplicates": duplicates,
            "duplicate_messages": dup_messages, "corrupt": len(corrupt), "unacknowledged": unknown,
            "drained_after_s": drained_after, "rss_q2_kib": rss2, "rss_q4_kib": rss4,
            "fds_q2": fd2, "fds_q4": fd4, "fds_floor_q2": floor2, "fds_floor_q4": floor4, "rss_max_kib": rss_max, "fds_max": fd_max,
            "seen_down": seen_down, "seen_up": seen_up, "panics": panics, "errors": len(errors),
            "failures": fails,
        }
        with open(os.path.join(self.work, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        with open(os.path.join(self.work, "samples.tsv"), "w") as f:
            f.write("seconds\trss_kib\tfds\tqueued\n")
            for s in self.samples:
                f.write("%.1f\t%d\t%d\t%.0f\n" % s)
        print()
        if fails:
            for f in fails:
                print(f"FAIL: {f}")
            print(f"(work directory kept: {self.work})")
            return 1
        print("PASS")
        return 0


def main():
    p = argparse.ArgumentParser(description="mxspool soak run (see the module docstring)")
    p.add_argument("--bin", required=True, help="the mxspool binary")
    p.add_argument("--duration", type=parse_duration, required=True,
                   help="load time: seconds, or with s/m/h (e.g. 120, 20m, 1h)")
    p.add_argument("--rate", type=float, default=50.0, help="messages per second, all clients")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    p.add_argument("--drain-timeout", type=float, default=180.0)
    p.add_argument("--work", help="directory for the spool, logs and records (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory after a pass")
    args = p.parse_args()
    soak = Soak(args)
    try:
        status = soak.run()
    finally:
        for proc in (soak.server, soak.primary):
            if proc is not None and proc.poll() is None:
                proc.kill()
    if status == 0 and not args.keep and not args.work:
        shutil.rmtree(soak.work, ignore_errors=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
