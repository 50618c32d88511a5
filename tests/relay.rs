//! Anti-relay acceptance suite: the classic open-relay tricks (percent hack,
//! bang paths, source routes, quoted local parts, address literals, foreign and
//! look-alike domains) tried in every way a client can dress them up (a local
//! sender, SMTPUTF8, pipelining, after RSET, from loopback and from the
//! primary's own address), each case checked at the RCPT reply, in the spool
//! and, end to end, on the wire: every foreign domain has MX records pointing
//! at a trap SMTP server on loopback, the relay domains' MX records point at
//! the real primary, and after the accepted mail has been delivered the trap
//! must have seen no connection at all.

mod common;
mod dns_server;
mod primary;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use common::{Client, POSTMASTER, Reply, TestConfig, TestServer, dot_stuff};
use dns_server::TestDns;
use hickory_proto::rr::{Name, RecordType};
use mxspool::spool::QueueId;
use primary::{Mode, Primary};
use tokio::net::TcpSocket;

/// What the server must answer to one `RCPT TO:` argument.
#[derive(Clone, Copy, Debug)]
enum Want {
    /// `550 5.7.1`: outside the relay domains, or a routing trick.
    Relay,
    /// Some 5xx: the path does not even parse (address literals, `a@b@c`,
    /// missing angle brackets), so it is refused before any relay check.
    Refused,
    /// A non-ASCII address: `553 5.6.7` without SMTPUTF8 (RFC 6531 §3.4),
    /// `550 5.7.1` with it.
    Unicode,
    /// `250 2.1.5`, stored and delivered as this address (compared without
    /// regard to ASCII case).
    Accept(&'static str),
    /// Either refused with a 5xx or accepted as this address of ours; never
    /// anything else (syntax we may take as the same mailbox or not at all).
    Either(&'static str),
}

/// One recipient to try: the text after `RCPT TO:`.
struct Case {
    rcpt: &'static str,
    want: Want,
}

const fn case(rcpt: &'static str, want: Want) -> Case {
    Case { rcpt, want }
}

/// The relay domains are `example.com` (without subdomains) and `wide.test`
/// (with them); everything else is someone else's.
const CASES: &[Case] = &[
    // The percent hack: `user%other@us` asks us to forward to `user@other`.
    case("<user%evil.test@example.com>", Want::Relay),
    case("<USER%EVIL.TEST@EXAMPLE.COM>", Want::Relay),
    case("<user%evil.test%trap.test@example.com>", Want::Relay),
    case("<user%evil.test@example.com.>", Want::Relay),
    case("<user%evil.test@deep.wide.test>", Want::Relay),
    // Bang paths (UUCP): `other!user@us`, and a `!` in the domain.
    case("<evil.test!user@example.com>", Want::Relay),
    case("<trap.test!evil.test!user@example.com>", Want::Relay),
    case("<evil.test!user@deep.wide.test>", Want::Relay),
    case("<user@evil.test!example.com>", Want::Relay),
    // Two unquoted `@`: no valid path at all.
    case("<user@evil.test@example.com>", Want::Refused),
    case("<user@example.com@evil.test>", Want::Refused),
    // Source routes are judged by their final address only.
    case("<@example.com:user@evil.test>", Want::Relay),
    case("<@example.com,@wide.test:user@evil.test>", Want::Relay),
    case("<@example.com:user%evil.test@example.com>", Want::Relay),
    case("<@evil.test:@example.com:user@evil.test>", Want::Relay),
    case(
        "<@evil.test:route1@example.com>",
        Want::Accept("route1@example.com"),
    ),
    case(
        "<@evil.test,@trap.test:route2@example.com>",
        Want::Accept("route2@example.com"),
    ),
    // Quoted local parts: smtp-proto strips the quotes, the trick remains.
    case("<\"user@evil.test\"@example.com>", Want::Relay),
    case("<\"user%evil\"@example.com>", Want::Relay),
    case("<\"user%evil.test\"@example.com>", Want::Relay),
    case("<\"evil.test!user\"@example.com>", Want::Relay),
    case("<\"user\\@evil.test\"@example.com>", Want::Relay),
    case("<\"@evil.test:user\"@example.com>", Want::Relay),
    case("<user\"@evil.test\"@example.com>", Want::Relay),
    case("<\"user\"@evil.test>", Want::Relay),
    case(
        "<\"quoted\"@example.com>",
        Want::Accept("quoted@example.com"),
    ),
    // Address literals, including the primary's own address.
    case("<user@[127.0.0.1]>", Want::Refused),
    case("<user@[127.0.0.2]>", Want::Refused),
    case("<user@[IPv6:::1]>", Want::Refused),
    case("<postmaster@[127.0.0.1]>", Want::Refused),
    case("<postmaster@[IPv6:::1]>", Want::Refused),
    // Foreign domains, our own host name, the primary's host name.
    case("<user@evil.test>", Want::Relay),
    case("<postmaster@evil.test>", Want::Relay),
    case("<user@localhost>", Want::Relay),
    case("<user@mx2.test>", Want::Relay),
    case("<user@mx1.example.com>", Want::Relay),
    case(" <user@evil.test>", Want::Relay),
    case("< user@evil.test>", Want::Relay),
    case("user@evil.test", Want::Refused),
    case("<user@evil.test> <user@example.com>", Want::Refused),
    case("<user@example.com> <user@evil.test>", Want::Refused),
    // Look-alikes of example.com.
    case("<user@example.com.evil.test>", Want::Relay),
    case("<user@evil-example.com>", Want::Relay),
    case("<user@evilexample.com>", Want::Relay),
    case("<user@examp1e.com>", Want::Relay),
    case("<user@example.co>", Want::Relay),
    case("<user@example.com.co>", Want::Relay),
    case("<user@xn--exmple-4nf.com>", Want::Relay),
    case("<user@ex\u{430}mple.com>", Want::Unicode), // Cyrillic а
    case("<user@example\u{3002}com>", Want::Unicode), // ideographic full stop
    case("<user@\u{ff45}xample.com>", Want::Unicode), // fullwidth ｅ
    case("<user@sub.example.com>", Want::Relay),
    case("<user@sub.example.com.>", Want::Relay),
    case("<user@example.com..>", Want::Refused),
    case("<user@.example.com>", Want::Refused),
    // The same domain as written by others: case and a final dot.
    case("<UPPER@EXAMPLE.COM>", Want::Accept("UPPER@example.com")),
    case("<Mixed@ExAmPlE.cOm>", Want::Accept("Mixed@example.com")),
    case("<dot@example.com.>", Want::Either("dot@example.com")),
    // Look-alikes of wide.test, whose subdomains are ours.
    case("<user@wide.test.evil.test>", Want::Relay),
    case("<user@evilwide.test>", Want::Relay),
    case("<user@evil-wide.test>", Want::Relay),
    case("<user@wide.tes>", Want::Relay),
    case("<deep@a.b.wide.test>", Want::Accept("deep@a.b.wide.test")),
    // The postmaster: ours only when bare or at a relay domain.
    case("<postmaster>", Want::Accept(POSTMASTER)),
    case(
        "<postmaster@example.com>",
        Want::Accept("postmaster@example.com"),
    ),
    case("<postmaster%evil.test@example.com>", Want::Relay),
    case("<postmaster@sub.example.com>", Want::Relay),
    // An ORCPT naming a foreign address is information, not a route.
    case(
        "<orcpt@example.com> ORCPT=rfc822;user@evil.test",
        Want::Accept("orcpt@example.com"),
    ),
];

/// The bare `<postmaster>` and its relatives, each in a transaction of its own
/// (several of them name the same mailbox).
const POSTMASTER_CASES: &[Case] = &[
    case("<postmaster>", Want::Accept(POSTMASTER)),
    case("<Postmaster>", Want::Accept(POSTMASTER)),
    case("<POSTMASTER>", Want::Accept(POSTMASTER)),
    case(" <postmaster>", Want::Accept(POSTMASTER)),
    case("<postmaster> NOTIFY=NEVER", Want::Accept(POSTMASTER)),
    case("<\"postmaster\">", Want::Either(POSTMASTER)),
    case("<@evil.test:postmaster>", Want::Either(POSTMASTER)),
    case(
        "<PostMaster@EXAMPLE.COM>",
        Want::Accept("PostMaster@example.com"),
    ),
    case("<postmaster@evil.test>", Want::Relay),
    case("<postmaster@mx2.test>", Want::Relay),
    case("<postmaster@localhost>", Want::Relay),
    case("<postmaster@sub.example.com>", Want::Relay),
    case("<postmaster%evil.test@example.com>", Want::Relay),
    case("<evil.test!postmaster@example.com>", Want::Relay),
    case("<\"postmaster@evil.test\"@example.com>", Want::Relay),
    case("<@example.com:postmaster@evil.test>", Want::Relay),
    case("<postmaster@[127.0.0.1]>", Want::Refused),
    case("<postmaster@[IPv6:::1]>", Want::Refused),
    case("<>", Want::Refused),
];

/// Every foreign name a case or sender mentions. Each gets `MX 10 trap.test`
/// and an address of the trap: whatever tried to deliver there would land on
/// the trap.
const TRAP_DOMAINS: &[&str] = &[
    "evil.test",
    "trap.test",
    "localhost",
    "mx2.test",
    "example.com.evil.test",
    "evil-example.com",
    "evilexample.com",
    "examp1e.com",
    "example.co",
    "example.com.co",
    "xn--exmple-4nf.com",
    "ex\u{430}mple.com",
    "sub.example.com",
    "wide.test.evil.test",
    "evilwide.test",
    "evil-wide.test",
    "wide.tes",
];

/// Senders' domains: trapped too, so a notice to a sender (none is due, all
/// mail is delivered) would show up as well.
const SENDER_DOMAINS: &[&str] = &["origin.test", "absender.test"];

/// The relay domains' primary: `MX 10` of each, on 127.0.0.2. Its MX records
/// are the only ones pointing anywhere else than the trap; the name is also a
/// recipient case, so it gets an MX record pointing at the trap.
const PRIMARY_HOST: &str = "mx1.example.com";
const PRIMARY_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// Our own name in the test config (`server.hostname`), `MX 20` of each
/// relay domain.
const OURSELVES: &str = "mx2.test";

/// How many cases go into one transaction (and session): refused commands
/// count towards the session's error limit.
const CHUNK: usize = 10;

/// How a client dresses up its attempts.
#[derive(Clone, Copy)]
struct Flavor {
    name: &'static str,
    /// Envelope senders, one per session in turn; "" is the null sender.
    senders: &'static [&'static str],
    /// `MAIL FROM:<…> SMTPUTF8`.
    smtputf8: bool,
    /// MAIL, every RCPT and DATA in one write.
    pipelined: bool,
    /// Each session first opens a transaction with a good recipient, then RSETs.
    rset_first: bool,
    /// EHLO names, one per session in turn.
    helo: &'static [&'static str],
    /// Local addresses the client connects from, one per session in turn.
    sources: &'static [IpAddr],
    /// Cases per transaction.
    chunk: usize,
}

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

const PLAIN: Flavor = Flavor {
    name: "plain",
    senders: &["someone@origin.test"],
    smtputf8: false,
    pipelined: false,
    rset_first: false,
    helo: &["client.origin.test"],
    sources: &[LOOPBACK],
    chunk: CHUNK,
};

/// A small world on loopback: a DNS server, the trap, the primary and mxspool.
struct World {
    dns: TestDns,
    /// Listens on 127.0.0.1 at `delivery.port`: every foreign domain's MX.
    trap: Primary,
    /// The same on ::1, when this machine has IPv6 loopback.
    trap6: Option<Primary>,
    /// example.com's and wide.test's primary, on 127.0.0.2 at the same port.
    primary: Primary,
    server: TestServer,
    /// What went wrong so far; reported all together at the end.
    problems: Vec<String>,
    /// Every message accepted: its queue ID and the recipients it must have.
    accepted: Vec<(QueueId, Vec<String>)>,
    /// Recipients accepted then reset away: never to be stored or delivered.
    discarded: Vec<String>,
    sessions: usize,
}

fn can_bind(addr: SocketAddr) -> bool {
    std::net::TcpListener::bind(addr).is_ok()
}

impl World {
    /// Starts everything, with the primary down so accepted mail stays in the
    /// spool until [`World::finish`] has looked at it.
    async fn start() -> World {
        let (trap, primary, trap6) = loop {
            let trap = Primary::start().await;
            let port = trap.addr.port();
            let primary_addr = SocketAddr::new(PRIMARY_IP, port);
            if !can_bind(primary_addr) {
                continue;
            }
            let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port);
            let trap6 = if can_bind(v6) {
                Some(Primary::start_on(v6).await)
            } else {
                None
            };
            break (trap, Primary::start_on(primary_addr).await, trap6);
        };
        primary.set_mode(Mode::Down);

        let dns = TestDns::start().await;
        let mut trap_ips = vec![LOOPBACK];
        if trap6.is_some() {
            trap_ips.push(IpAddr::V6(Ipv6Addr::LOCALHOST));
        }
        dns.set_ips("trap.test", &trap_ips);
        for domain in TRAP_DOMAINS.iter().chain(SENDER_DOMAINS) {
            let name = ascii(domain);
            dns.set_mx(&name, &[(10, "trap.test")]);
            dns.set_ips(&name, &trap_ips);
        }
        dns.set_mx(PRIMARY_HOST, &[(10, "trap.test")]);
        dns.set_ips(PRIMARY_HOST, &[PRIMARY_IP]);
        for domain in ["example.com", "wide.test", "a.b.wide.test"] {
            dns.set_mx(domain, &[(10, PRIMARY_HOST), (20, OURSELVES)]);
        }

        let config = TestConfig::default()
            .server("max_recipients", "100")
            .set("delivery", "nameservers", &format!(r#"["{}"]"#, dns.addr))
            .set("delivery", "port", &trap.addr.port().to_string())
            .set("delivery", "probe_interval", r#""100ms""#)
            .set("delivery", "retry_initial", r#""1h""#)
            .set("delivery", "retry_max", r#""2h""#)
            .domains(
                r#"
[[domain]]
name = "example.com"
include_subdomains = false

[[domain]]
name = "wide.test"
include_subdomains = true
"#,
            );
        let server = TestServer::start(config).await;
        World {
            dns,
            trap,
            trap6,
            primary,
            server,
            problems: Vec::new(),
            accepted: Vec::new(),
            discarded: Vec::new(),
            sessions: 0,
        }
    }

    /// A session from `source`, greeted and past EHLO.
    async fn connect(&self, source: IpAddr, helo: &str) -> Client {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(source, 0))
            .unwrap_or_else(|e| panic!("cannot bind {source}: {e}"));
        let stream = socket
            .connect(self.server.addr)
            .await
            .unwrap_or_else(|e| panic!("connect from {source}: {e}"));
        let mut client = Client::from_stream(stream);
        client.expect(220).await;
        client.cmd(&format!("EHLO {helo}")).await.assert(250);
        client
    }

    /// Tries every case the way `flavor` says, `flavor.chunk` cases per
    /// session, each transaction also carrying good recipients of its own so
    /// that it ends in a stored message.
    async fn attempt(&mut self, flavor: Flavor, cases: &[Case]) {
        for chunk in cases.chunks(flavor.chunk) {
            let n = self.sessions;
            self.sessions += 1;
            let tag = format!("{}.{n}", flavor.name);
            let sender = flavor.senders[n % flavor.senders.len()];
            let helo = flavor.helo[n % flavor.helo.len()];
            let source = flavor.sources[n % flavor.sources.len()];
            let context = format!("[{} session {n}, from {source}, EHLO {helo}]", flavor.name);
            let mut c = self.connect(source, helo).await;

            let mail = format!(
                "MAIL FROM:<{sender}>{}",
                if flavor.smtputf8 { " SMTPUTF8" } else { "" }
            );
            if flavor.rset_first {
                let early = format!("before-rset.{tag}@example.com");
                c.cmd(&mail).await.assert(250);
                c.cmd(&format!("RCPT TO:<{early}>")).await.assert(250);
                c.cmd("RSET").await.assert_status(250, "2.0.0");
                self.discarded.push(early);
            }

            // (command, what it must get; `None`: a good recipient, 250 2.1.5)
            let mut script: Vec<(String, Option<Want>)> = Vec::new();
            for (i, case) in chunk.iter().enumerate() {
                script.push((format!("RCPT TO:{}", case.rcpt), Some(case.want)));
                // A good recipient after each case: refusals do not spoil the
                // transaction, and acceptances do not spill over.
                script.push((format!("RCPT TO:<ok.{tag}.{i}@example.com>"), None));
            }

            let mut replies = Vec::new();
            if flavor.pipelined {
                let mut batch = format!("{mail}\r\n");
                for (command, _) in &script {
                    batch.push_str(command);
                    batch.push_str("\r\n");
                }
                batch.push_str("DATA\r\n");
                c.send(batch).await;
                replies.push(c.reply().await);
                for _ in &script {
                    replies.push(c.reply().await);
                }
                replies.push(c.reply().await);
            } else {
                replies.push(c.cmd(&mail).await);
                for (command, _) in &script {
                    replies.push(c.cmd(command).await);
                }
                replies.push(c.cmd("DATA").await);
            }

            let mail_reply = &replies[0];
            if mail_reply.code != 250 {
                self.problems
                    .push(format!("{context} {mail} -> {mail_reply} (wanted 250)"));
            }
            let mut stored = Vec::new();
            for ((command, want), reply) in script.iter().zip(&replies[1..]) {
                let verdict = match want {
                    Some(want) => {
                        judge(*want, reply, flavor.smtputf8).map(|a| a.map(str::to_string))
                    }
                    None => {
                        let good = path_of(command);
                        judge(Want::Accept("a good recipient"), reply, false).map(|_| Some(good))
                    }
                };
                match verdict {
                    Ok(Some(address)) => stored.push(address),
                    Ok(None) => {}
                    Err(wanted) => self
                        .problems
                        .push(format!("{context} {command} -> {reply} (wanted {wanted})")),
                }
            }
            let data = replies.last().expect("DATA reply");
            if data.code != 354 {
                self.problems
                    .push(format!("{context} DATA -> {data} (wanted 354)"));
                c.quit().await;
                continue;
            }
            let body = format!("Subject: relay test {tag}\r\n\r\nrelay test {tag}\r\n");
            c.send(dot_stuff(body.as_bytes())).await;
            let end = c.reply().await;
            if end.code == 250 {
                self.accepted.push((end.queue_id(), stored));
            } else {
                self.problems
                    .push(format!("{context} end of data -> {end} (wanted 250)"));
            }
            c.quit().await;
        }
    }

    /// Checks the spool, lets the primary come up, waits for every message
    /// to be delivered and checks where each recipient went. Panics listing
    /// every problem found, here or before.
    async fn finish(mut self) {
        // While the primary is down, the spool holds exactly what was accepted.
        let expected: BTreeMap<QueueId, Vec<String>> = self
            .accepted
            .iter()
            .map(|(id, rcpts)| (*id, lower(rcpts)))
            .collect();
        let stored: BTreeMap<QueueId, Vec<String>> = self
            .server
            .stored()
            .iter()
            .map(|(env, _)| {
                let rcpts: Vec<String> = common::recipients(env)
                    .into_iter()
                    .map(str::to_string)
                    .collect();
                (env.id, lower(&rcpts))
            })
            .collect();
        for (id, rcpts) in &stored {
            match expected.get(id) {
                Some(want) if want == rcpts => {}
                Some(want) => self.problems.push(format!(
                    "spool: message {id} has recipients {rcpts:?}, wanted {want:?}"
                )),
                None => self.problems.push(format!(
                    "spool: message {id} (recipients {rcpts:?}) was never acknowledged"
                )),
            }
        }
        for id in expected.keys().filter(|id| !stored.contains_key(id)) {
            self.problems
                .push(format!("spool: acknowledged message {id} is not stored"));
        }
        for address in &self.discarded {
            if stored.values().flatten().any(|r| r == address) {
                self.problems
                    .push(format!("spool: {address} was stored although reset away"));
            }
        }

        // Every first attempt (against the primary, down) is over before the
        // flush: a flush racing an attempt in flight can leave its recipient
        // deferred for the whole backoff (a scheduler bug outside this suite).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let envelopes = self.server.spool().envelopes().expect("envelopes");
            let untried: Vec<&str> = envelopes
                .iter()
                .flat_map(|env| &env.recipients)
                .filter(|r| r.attempts == 0)
                .map(|r| r.address.as_str())
                .collect();
            if untried.is_empty() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                self.problems.push(format!(
                    "never tried while the primary was down: {untried:?}"
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // The primary comes back; everything goes to it and nothing elsewhere.
        self.primary.set_mode(Mode::Up);
        self.server.server.flush(None);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            // Envelopes only: bodies vanish under our feet as mail is delivered.
            if self
                .server
                .spool()
                .envelopes()
                .expect("envelopes")
                .is_empty()
            {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                let left: Vec<_> = self
                    .server
                    .spool()
                    .envelopes()
                    .expect("envelopes")
                    .iter()
                    .map(|env| format!("{} {:?}", env.id, env.recipients))
                    .collect();
                self.problems
                    .push(format!("not delivered within 10 s: {left:?}"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Whatever a delivery may have set off (a notice, a retry elsewhere)
        // has happened.
        self.server.settled().await;

        let dead = self.server.spool().dead_letters().expect("dead letters");
        if !dead.is_empty() {
            let dead: Vec<_> = dead.iter().map(common::recipients).collect();
            self.problems.push(format!("dead letters: {dead:?}"));
        }
        let mut want: Vec<String> = expected.values().flatten().cloned().collect();
        want.sort();
        let mut got: Vec<String> = self
            .primary
            .messages()
            .iter()
            .flat_map(|m| m.rcpt_lines.iter().map(|l| path_of(l)))
            .collect();
        got.sort();
        if got != want {
            let extra: Vec<_> = got.iter().filter(|a| !want.contains(a)).collect();
            let missing: Vec<_> = want.iter().filter(|a| !got.contains(a)).collect();
            self.problems.push(format!(
                "the primary got {} recipients, wanted {}; unexpected: {extra:?}; missing: {missing:?}",
                got.len(),
                want.len()
            ));
        }
        for (name, trap) in [
            ("127.0.0.1", Some(&self.trap)),
            ("::1", self.trap6.as_ref()),
        ] {
            let Some(trap) = trap else { continue };
            if trap.connections() != 0 || !trap.messages().is_empty() {
                self.problems.push(format!(
                    "NON-RELAY DESTINATION CONTACTED: the trap on {name} got {} connections, commands {:?}, {} messages",
                    trap.connections(),
                    trap.commands(),
                    trap.messages().len()
                ));
            }
        }
        for domain in TRAP_DOMAINS {
            let name = ascii(domain);
            let asked = self.dns.queries(&name, RecordType::MX);
            if asked != 0 {
                self.problems.push(format!(
                    "the MX of refused domain {domain} was looked up {asked} times"
                ));
            }
        }
        let metrics = self
            .server
            .server
            .metrics()
            .render(&self.server.spool().gauges(), 0);
        let notices: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("mxspool_dsn_sent_total"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        if notices != 0.0 {
            self.problems
                .push(format!("{notices} delivery status notices were sent"));
        }
        if self.accepted.is_empty() {
            self.problems.push("no message was accepted at all".into());
        }

        assert!(
            self.problems.is_empty(),
            "{} problem(s):\n  {}",
            self.problems.len(),
            self.problems.join("\n  ")
        );
    }
}

/// Whether `reply` is what `want` asks for: `Ok(Some(address))` when accepted
/// (the address to find stored), `Ok(None)` when rightly refused, `Err` with
/// what was wanted otherwise.
fn judge(want: Want, reply: &Reply, smtputf8: bool) -> Result<Option<&'static str>, String> {
    let status = |code: u16, status: &str| {
        reply.code == code && reply.lines[0].starts_with(&format!("{status} "))
    };
    match want {
        Want::Relay if status(550, "5.7.1") => Ok(None),
        Want::Relay => Err("550 5.7.1".into()),
        Want::Refused if (500..600).contains(&reply.code) => Ok(None),
        Want::Refused => Err("a 5xx refusal".into()),
        Want::Unicode if smtputf8 && status(550, "5.7.1") => Ok(None),
        Want::Unicode if smtputf8 => Err("550 5.7.1".into()),
        Want::Unicode if status(553, "5.6.7") => Ok(None),
        Want::Unicode => Err("553 5.6.7 (no SMTPUTF8)".into()),
        Want::Accept(address) if status(250, "2.1.5") => Ok(Some(address)),
        Want::Accept(address) => Err(format!("250 2.1.5, stored as {address}")),
        Want::Either(address) if status(250, "2.1.5") => Ok(Some(address)),
        Want::Either(_) if (500..600).contains(&reply.code) => Ok(None),
        Want::Either(address) => Err(format!("a 5xx, or 250 2.1.5 stored as {address}")),
    }
}

/// The path of a `RCPT TO:<…>` line, lower-cased.
fn path_of(line: &str) -> String {
    line.split_once('<')
        .and_then(|(_, rest)| rest.split_once('>'))
        .map(|(path, _)| path.to_ascii_lowercase())
        .unwrap_or_else(|| format!("(no path in {line:?})"))
}

fn lower(addresses: &[String]) -> Vec<String> {
    addresses.iter().map(|a| a.to_ascii_lowercase()).collect()
}

/// A domain as DNS carries it (IDNA A-label for non-ASCII names).
fn ascii(domain: &str) -> String {
    Name::from_utf8(domain)
        .unwrap_or_else(|e| panic!("{domain} is not a DNS name: {e}"))
        .to_ascii()
        .trim_end_matches('.')
        .to_string()
}

#[tokio::test]
async fn relay_tricks_are_refused_and_nothing_reaches_a_foreign_host() {
    let mut w = World::start().await;
    w.attempt(PLAIN, CASES).await;
    w.finish().await;
}

#[tokio::test]
async fn a_sender_at_a_relay_domain_gets_no_relay_privilege() {
    let mut w = World::start().await;
    let flavor = Flavor {
        name: "local-sender",
        senders: &[
            "user@example.com",
            "postmaster@example.com",
            "",
            "someone@a.b.wide.test",
            "USER@EXAMPLE.COM",
        ],
        ..PLAIN
    };
    w.attempt(flavor, CASES).await;
    w.finish().await;
}

#[tokio::test]
async fn smtputf8_sessions_are_held_to_the_same_rules() {
    let mut w = World::start().await;
    let flavor = Flavor {
        name: "smtputf8",
        senders: &["j\u{f6}rg@absender.test", "someone@origin.test"],
        smtputf8: true,
        ..PLAIN
    };
    w.attempt(flavor, CASES).await;
    w.finish().await;
}

#[tokio::test]
async fn pipelined_commands_are_judged_one_by_one() {
    let mut w = World::start().await;
    let flavor = Flavor {
        name: "pipelined",
        pipelined: true,
        chunk: 15,
        ..PLAIN
    };
    w.attempt(flavor, CASES).await;
    let utf8 = Flavor {
        name: "pipelined-utf8",
        pipelined: true,
        smtputf8: true,
        chunk: 15,
        ..PLAIN
    };
    w.attempt(utf8, CASES).await;
    w.finish().await;
}

#[tokio::test]
async fn after_rset_nothing_earlier_is_kept_and_nothing_new_is_allowed() {
    let mut w = World::start().await;
    let flavor = Flavor {
        name: "rset",
        rset_first: true,
        ..PLAIN
    };
    w.attempt(flavor, CASES).await;

    // A transaction with only refused recipients after a good one was reset
    // away has nothing to send.
    let mut c = w.connect(LOOPBACK, "client.origin.test").await;
    c.cmd("MAIL FROM:<someone@origin.test>").await.assert(250);
    c.cmd("RCPT TO:<reset-away@example.com>").await.assert(250);
    c.cmd("RSET").await.assert(250);
    c.cmd("MAIL FROM:<someone@origin.test>").await.assert(250);
    for rcpt in [
        "<user@evil.test>",
        "<user%evil.test@example.com>",
        "<@example.com:user@evil.test>",
    ] {
        c.cmd(&format!("RCPT TO:{rcpt}"))
            .await
            .assert_status(550, "5.7.1");
    }
    let data = c.cmd("DATA").await;
    assert!(
        data.code == 554 || data.code == 503,
        "DATA with only refused recipients after RSET: {data}"
    );
    c.cmd("RSET").await.assert(250);
    // A new EHLO resets too.
    c.cmd("MAIL FROM:<someone@origin.test>").await.assert(250);
    c.cmd("RCPT TO:<ehlo-away@example.com>").await.assert(250);
    c.cmd("EHLO client.origin.test").await.assert(250);
    c.cmd("MAIL FROM:<someone@origin.test>").await.assert(250);
    c.cmd("RCPT TO:<user@evil.test>")
        .await
        .assert_status(550, "5.7.1");
    let data = c.cmd("DATA").await;
    assert!(
        data.code == 554 || data.code == 503,
        "DATA with only refused recipients after EHLO: {data}"
    );
    c.quit().await;
    w.discarded.push("reset-away@example.com".into());
    w.discarded.push("ehlo-away@example.com".into());
    w.finish().await;
}

#[tokio::test]
async fn loopback_our_own_name_and_the_primarys_address_earn_no_trust() {
    let mut w = World::start().await;
    let flavor = Flavor {
        name: "loopback",
        helo: &["localhost", "[127.0.0.1]", OURSELVES, PRIMARY_HOST],
        sources: &[LOOPBACK, PRIMARY_IP],
        ..PLAIN
    };
    w.attempt(flavor, CASES).await;

    // ETRN is allowed from loopback, but only for our domains: it must not
    // start anything towards a foreign one.
    for source in [LOOPBACK, PRIMARY_IP] {
        let mut c = w.connect(source, "localhost").await;
        for node in [
            "evil.test",
            "@evil.test",
            "#evil.test",
            "sub.example.com",
            "example.com.evil.test",
            "[127.0.0.1]",
        ] {
            let reply = c.cmd(&format!("ETRN {node}")).await;
            if reply.code < 400 {
                w.problems.push(format!(
                    "[ETRN from {source}] ETRN {node} -> {reply} (wanted a refusal)"
                ));
            }
        }
        c.quit().await;
    }
    w.finish().await;
}

#[tokio::test]
async fn only_the_bare_postmaster_and_postmaster_at_our_domains_are_ours() {
    let mut w = World::start().await;
    let flavor = Flavor {
        name: "postmaster",
        chunk: 1,
        ..PLAIN
    };
    w.attempt(flavor, POSTMASTER_CASES).await;
    let null_sender = Flavor {
        name: "postmaster-null",
        senders: &[""],
        chunk: 1,
        ..PLAIN
    };
    w.attempt(null_sender, POSTMASTER_CASES).await;
    w.finish().await;
}
