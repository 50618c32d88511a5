#!/usr/bin/env python3
"""SMTP helpers for tests/docker/run.sh (Python standard library only).

  smtp_helper.py sink HOST PORT DIR
      A stand-in for the primary MX: accepts every message and stores it
      as DIR/<pid>-<n>.eml (envelope first, as X-Sink-* lines), written to a
      temporary name and renamed, so a file that exists is complete. Writes
      DIR/.ready once it listens. Runs until killed.

  smtp_helper.py send HOST PORT TAG COUNT
      Sends COUNT messages (X-Test-Id: TAG for one, TAG-0 ... TAG-<COUNT-1>
      for more) in one session. Prints "<id> <code> <reply>" per message and
      exits 1 unless every MAIL, RCPT and DATA got a 2xx answer.
"""

import asyncio
import itertools
import os
import smtplib
import sys


async def session(reader, writer, outdir, counter):
    def reply(line):
        writer.write((line + "\r\n").encode())

    reply("220 primary.test ESMTP sink")
    await writer.drain()
    mail_from, rcpts = None, []
    while True:
        raw = await reader.readline()
        if not raw:
            break
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        verb = line.split(" ", 1)[0].upper()
        if verb == "EHLO":
            reply("250-primary.test")
            reply("250-8BITMIME")
            reply("250 SIZE 104857600")
        elif verb == "HELO":
            reply("250 primary.test")
        elif verb == "MAIL":
            mail_from, rcpts = line[len("MAIL FROM:"):].strip(), []
            reply("250 2.1.0 Ok")
        elif verb == "RCPT":
            rcpts.append(line[len("RCPT TO:"):].strip())
            reply("250 2.1.5 Ok")
        elif verb == "DATA":
            if mail_from is None or not rcpts:
                reply("503 5.5.1 MAIL and RCPT first")
            else:
                reply("354 End data with <CR><LF>.<CR><LF>")
                await writer.drain()
                lines = []
                while True:
                    data = await reader.readline()
                    if not data:
                        writer.close()
                        return
                    if data in (b".\r\n", b".\n"):
                        break
                    if data.startswith(b"."):
                        data = data[1:]
                    lines.append(data)
                n = next(counter)
                name = "%d-%06d.eml" % (os.getpid(), n)
                tmp = os.path.join(outdir, "." + name + ".tmp")
                with open(tmp, "wb") as f:
                    f.write(("X-Sink-Mail-From: %s\r\nX-Sink-Rcpt-To: %s\r\n"
                             % (mail_from, " ".join(rcpts))).encode())
                    f.writelines(lines)
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(tmp, os.path.join(outdir, name))
                reply("250 2.0.0 Ok: stored as %s" % name)
            mail_from, rcpts = None, []
        elif verb == "RSET":
            mail_from, rcpts = None, []
            reply("250 2.0.0 Ok")
        elif verb == "NOOP":
            reply("250 2.0.0 Ok")
        elif verb == "QUIT":
            reply("221 2.0.0 Bye")
            await writer.drain()
            break
        else:
            reply("502 5.5.2 Command not implemented")
        await writer.drain()
    writer.close()


async def sink(host, port, outdir):
    os.makedirs(outdir, exist_ok=True)
    counter = itertools.count(1)
    server = await asyncio.start_server(
        lambda r, w: session(r, w, outdir, counter), host, port, reuse_address=True)
    with open(os.path.join(outdir, ".ready"), "w") as f:
        f.write("%d\n" % os.getpid())
    async with server:
        await server.serve_forever()


def send(host, port, tag, count):
    ok = True
    client = smtplib.SMTP(host, port, local_hostname="client.test", timeout=60)
    client.ehlo()
    for i in range(count):
        tid = tag if count == 1 else "%s-%d" % (tag, i)
        message = (
            "From: <sender@example.org>\r\n"
            "To: <user@example.com>\r\n"
            "Subject: mxspool docker test %s\r\n"
            "Message-ID: <%s@client.test>\r\n"
            "X-Test-Id: %s\r\n"
            "\r\n"
            "Hello from tests/docker/run.sh (%s).\r\n" % (tid, tid, tid, tid))
        code, answer = client.mail("sender@example.org")
        if code == 250:
            code, answer = client.rcpt("user@example.com")
        if code == 250:
            try:
                code, answer = client.data(message.encode())
            except smtplib.SMTPDataError as e:
                code, answer = e.smtp_code, e.smtp_error
        print("%s %d %s" % (tid, code, answer.decode("utf-8", "replace")), flush=True)
        if code != 250:
            ok = False
            client.rset()
    client.quit()
    return ok


def main(argv):
    if len(argv) == 5 and argv[1] == "sink":
        asyncio.run(sink(argv[2], int(argv[3]), argv[4]))
        return 0
    if len(argv) == 6 and argv[1] == "send":
        return 0 if send(argv[2], int(argv[3]), argv[4], int(argv[5])) else 1
    sys.stderr.write(__doc__)
    return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv))
