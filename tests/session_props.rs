//! Property tests for the pure parts of SMTP in: the session state machine
//! (`inbound::session`), the relay policy it consults (`inbound::policy`), and
//! the DATA byte filter (`inbound::data`). Public API only, no sockets.
//!
//! Case counts are kept small enough for the whole file to run in seconds. Each
//! property honours the standard `PROPTEST_CASES` variable; for a long run:
//!
//! ```sh
//! PROPTEST_CASES=100000 cargo test --release --test session_props
//! ```
//!
//! Failures are not persisted to files: a minimised case worth keeping becomes
//! an explicit `#[test]` below (see "Regressions").

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::IpAddr;
use std::path::Path;
use std::sync::LazyLock;

use common::{FAKE_ENDS_OF_DATA, only_crlf, reference_data};
use mxspool::config::Config;
use mxspool::inbound::data::{Data, DataReader};
use mxspool::inbound::policy::Policy;
use mxspool::inbound::reply::Reply;
use mxspool::inbound::session::{
    Chunked, Env, Knowledge, MAX_ERRORS, Session, Step, Tls, Transaction,
};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

// ---------------------------------------------------------------------------
// Set-up

/// `cases` unless `PROPTEST_CASES` says otherwise (`with_cases` alone would
/// override the variable), and no regression files written into the tree.
fn config(cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config.failure_persistence = None;
    config
}

const MAX_MESSAGE_SIZE: u64 = 1000;
const MAX_RECIPIENTS: usize = 5;
const POSTMASTER: &str = "postmaster@example.net";

/// example.com takes anyone; example.org (and its subdomains) only alice and
/// bob@example.org; verify.test learns its users from the primary and
/// tempfails unseen ones while the primary is down. ETRN from loopback only.
fn policy() -> &'static Policy {
    static POLICY: LazyLock<Policy> = LazyLock::new(build_policy);
    &POLICY
}

fn build_policy() -> Policy {
    let text = format!(
        r#"
[server]
hostname = "mx2.test"
max_message_size = {MAX_MESSAGE_SIZE}
max_recipients = {MAX_RECIPIENTS}
max_received_headers = 5
etrn_allow = ["127.0.0.0/8"]

[delivery]
postmaster = "{POSTMASTER}"

[[domain]]
name = "example.com"

[[domain]]
name = "example.org"
include_subdomains = true
recipients = ["alice", "bob@example.org"]

[[domain]]
name = "verify.test"
verify_recipients = true
unknown_recipients = "tempfail"
"#
    );
    let config = Config::parse(&text, Path::new("session_props.toml"))
        .unwrap_or_else(|e| panic!("test policy does not parse: {e}"));
    Policy::from_config(&config).expect("policy")
}

/// The relay domains of [`policy`], written out independently of it.
fn is_relay_domain(domain: &str) -> bool {
    let d = domain.strip_suffix('.').unwrap_or(domain).to_lowercase();
    d == "example.com" || d == "example.org" || d.ends_with(".example.org") || d == "verify.test"
}

fn loopback() -> IpAddr {
    "127.0.0.1".parse().unwrap()
}

/// What the outside world says while a session runs: the spool, the learned
/// recipients and the primary. Arbitrary per test case.
#[derive(Clone, Copy, Debug)]
struct World {
    room: bool,
    knowledge: Knowledge,
    primary_down: bool,
    may_call_out: bool,
    /// The callout's answer, when the session asks for one: `None` = the
    /// primary could not be reached.
    verdict: Option<bool>,
}

impl World {
    fn calm() -> World {
        World {
            room: true,
            knowledge: Knowledge::Unseen,
            primary_down: false,
            may_call_out: false,
            verdict: None,
        }
    }
}

fn world() -> impl Strategy<Value = World> {
    let knowledge = prop_oneof![
        Just(Knowledge::Unseen),
        Just(Knowledge::Exists),
        Just(Knowledge::DoesNotExist)
    ];
    (
        prop::bool::weighted(0.9),
        knowledge,
        any::<bool>(),
        any::<bool>(),
        prop::option::of(any::<bool>()),
    )
        .prop_map(
            |(room, knowledge, primary_down, may_call_out, verdict)| World {
                room,
                knowledge,
                primary_down,
                may_call_out,
                verdict,
            },
        )
}

/// Runs one command line the way `conn.rs` does: a callout request is
/// answered and the command given again, with no second callout allowed.
/// Returns the step and the address asked about, if any.
fn drive(
    session: &mut Session,
    policy: &Policy,
    world: &World,
    line: &[u8],
) -> (Step, Option<String>) {
    let room = |_: u64| world.room;
    let knowledge = |_: &str| world.knowledge;
    let down = |_: &str| world.primary_down;
    let call_out = |_: &str| world.may_call_out;
    let env = Env {
        policy,
        spool_has_room: &room,
        knowledge: &knowledge,
        primary_down: &down,
        may_call_out: &call_out,
        primary_up: &|_| false,
        greylisted: &|_, _| false,
    };
    let step = session.command(line, &env);
    let Step::Verify(address) = step else {
        return (step, None);
    };
    assert!(world.may_call_out, "a callout nobody allowed: {address}");
    let answer = match world.verdict {
        Some(true) => Knowledge::Exists,
        Some(false) => Knowledge::DoesNotExist,
        None => Knowledge::Unseen,
    };
    let knowledge = |_: &str| answer;
    let down = |_: &str| world.primary_down || world.verdict.is_none();
    let never = |_: &str| false;
    let env = Env {
        policy,
        spool_has_room: &room,
        knowledge: &knowledge,
        primary_down: &down,
        may_call_out: &never,
        primary_up: &|_| false,
        greylisted: &|_, _| false,
    };
    (session.command(line, &env), Some(address))
}

/// The reply inside any step (`Verify` has none and must not get here).
fn reply_of(step: &Step) -> &Reply {
    match step {
        Step::Reply(r) | Step::Data(r) | Step::Close(r) | Step::StartTls(r) => r,
        Step::Etrn { reply, .. } => reply,
        Step::Verify(a) => panic!("a second callout request for one command: {a}"),
        Step::Chunk { size } => panic!("a chunk of {size} has no reply before its octets"),
    }
}

/// A reply can go on the wire as it is: a 2xx–5xx code, text lines with no
/// line breaks of their own, an enhanced code of the same class, and
/// rendered bytes with nothing but CRLF line endings.
fn check_reply(reply: &Reply, what: &str) -> Result<(), TestCaseError> {
    prop_assert!(
        (200..=599).contains(&reply.code),
        "{what}: code {}",
        reply.code
    );
    prop_assert!(!reply.lines.is_empty(), "{what}: a reply without lines");
    for line in &reply.lines {
        prop_assert!(
            !line.contains(['\r', '\n']),
            "{what}: a line break inside reply text {line:?}"
        );
    }
    if !reply.status.is_empty() {
        let parts: Vec<&str> = reply.status.split('.').collect();
        prop_assert!(
            parts.len() == 3
                && parts.iter().all(|p| !p.is_empty() && p.len() <= 3)
                && parts.iter().all(|p| p.bytes().all(|b| b.is_ascii_digit())),
            "{what}: malformed enhanced code {:?}",
            reply.status
        );
        prop_assert_eq!(
            parts[0].as_bytes()[0],
            b'0' + (reply.code / 100) as u8,
            "{}: enhanced code {} in a {} reply",
            what,
            reply.status,
            reply.code
        );
    }
    let mut wire = Vec::new();
    reply.write_to(&mut wire);
    prop_assert!(only_crlf(&wire), "{what}: {wire:?}");
    let code = reply.code.to_string();
    let lines: Vec<&[u8]> = wire.split_inclusive(|&b| b == b'\n').collect();
    prop_assert_eq!(lines.len(), reply.lines.len());
    for (i, line) in lines.iter().enumerate() {
        prop_assert!(line.starts_with(code.as_bytes()), "{}: {:?}", what, line);
        let sep = if i + 1 == lines.len() { b' ' } else { b'-' };
        prop_assert_eq!(line[3], sep, "{}: {:?}", what, line);
    }
    Ok(())
}

/// [`check_reply`], and the text printable: RFC 5321's `textstring` is
/// HT and printable ASCII (RFC 6531 adds UTF-8), no other control characters.
fn check_text(reply: &Reply, what: &str) -> Result<(), TestCaseError> {
    check_reply(reply, what)?;
    for line in &reply.lines {
        prop_assert!(
            !line.chars().any(|c| c.is_control() && c != '\t'),
            "{what}: a control character in reply text {line:?}"
        );
    }
    Ok(())
}

/// An accepted address mxspool can later write as an SMTP path to the
/// primary: no control characters, and ASCII unless SMTPUTF8 was declared.
/// One that fails this is accepted now and bounced later (backscatter).
fn forwardable(address: &str, smtputf8: bool) -> bool {
    !address.chars().any(char::is_control) && (smtputf8 || address.is_ascii())
}

/// What a transaction may hold once DATA is over, whatever was sent.
fn check_transaction(t: &Transaction) -> Result<(), TestCaseError> {
    prop_assert!(!t.recipients.is_empty(), "DATA without recipients: {t:?}");
    prop_assert!(t.recipients.len() <= MAX_RECIPIENTS, "{t:?}");
    for (i, r) in t.recipients.iter().enumerate() {
        let a = &r.address;
        prop_assert!(
            t.recipients[..i]
                .iter()
                .all(|o| !o.address.eq_ignore_ascii_case(a)),
            "duplicate recipient {a:?}"
        );
        if a == POSTMASTER {
            continue;
        }
        let (local, domain) = a
            .rsplit_once('@')
            .unwrap_or_else(|| panic!("recipient without a domain: {a:?}"));
        prop_assert!(is_relay_domain(domain), "relayed to {a:?}");
        prop_assert!(
            !local.is_empty() && !local.contains(['@', '%', '!']),
            "routing trick accepted: {a:?}"
        );
        prop_assert_eq!(domain, domain.to_lowercase(), "domain stored as sent");
        if domain.ends_with("example.org") {
            let l = local.to_lowercase();
            prop_assert!(
                l == "alice" || l == "postmaster" || a.eq_ignore_ascii_case("bob@example.org"),
                "not on example.org's list: {a:?}"
            );
        }
    }
    Ok(())
}

/// Feeds `input` to a fresh reader in pieces ending at `cuts` (sorted
/// offsets). Returns the data and the bytes consumed, or `None` if the
/// terminator never came (every piece must then have been consumed whole).
fn read_in_pieces(input: &[u8], cuts: &[usize], max: u64) -> Option<(Data, usize)> {
    let mut reader = DataReader::new(max);
    let mut at = 0;
    for end in cuts
        .iter()
        .map(|&c| c.min(input.len()))
        .chain(std::iter::once(input.len()))
    {
        if end < at {
            continue;
        }
        let (used, done) = reader.feed(&input[at..end]);
        if let Some(data) = done {
            return Some((data, at + used));
        }
        assert_eq!(used, end - at, "a piece is consumed whole until the end");
        at = end;
    }
    None
}

// ---------------------------------------------------------------------------
// Strategies

/// Local parts, including the routing tricks and quoting smtp-proto sees.
fn local_part() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        6 => "[a-zA-Z0-9]{1,6}",
        1 => Just("@".to_string()),
        1 => Just("%".to_string()),
        1 => Just("!".to_string()),
        1 => Just(".".to_string()),
        1 => Just("+".to_string()),
        1 => Just(" ".to_string()),
        1 => Just("\\".to_string()),
        1 => Just("\"".to_string()),
        1 => Just("\u{f6}".to_string()),
        1 => Just("\u{0}".to_string()),
        1 => Just("\u{7f}".to_string()),
        1 => Just("\t".to_string()),
        1 => Just("\r".to_string()),
        1 => Just("postmaster".to_string()),
        1 => Just("PostMaster".to_string()),
        1 => Just("alice".to_string()),
        1 => Just("bob".to_string()),
        1 => Just("evil.test".to_string()),
    ];
    prop::collection::vec(piece, 0..5).prop_map(|p| p.concat())
}

fn domain() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("example.com".to_string()),
        Just("EXAMPLE.Com.".to_string()),
        Just("example.org".to_string()),
        Just("deep.sub.example.org".to_string()),
        Just("verify.test".to_string()),
        Just("sub.example.com".to_string()),
        Just("example.com.evil.test".to_string()),
        Just("notexample.com".to_string()),
        Just("evil.test".to_string()),
        Just("[192.0.2.1]".to_string()),
        Just("[IPv6:2001:db8::1]".to_string()),
        Just("exa\u{f6}mple.com".to_string()),
        Just(String::new()),
        "[a-z.\\-]{0,16}",
    ]
}

/// A path as a client might write it between the angle brackets.
fn address() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (local_part(), domain()).prop_map(|(l, d)| format!("{l}@{d}")),
        2 => (local_part(), domain()).prop_map(|(l, d)| format!("\"{l}\"@{d}")),
        1 => (local_part(), domain(), domain())
            .prop_map(|(l, d, e)| format!("{l}@{d}@{e}")),
        1 => (domain(), domain(), local_part(), domain())
            .prop_map(|(a, b, l, d)| format!("@{a},@{b}:{l}@{d}")),
        1 => local_part(),
        1 => Just("postmaster".to_string()),
        1 => Just(String::new()),
        1 => "[ -~]{0,30}",
    ]
}

fn mail_parameter() -> impl Strategy<Value = String> {
    prop_oneof![
        "SIZE=[0-9]{0,22}",
        "BODY=(7BIT|8BITMIME|BINARYMIME|x)",
        "RET=(FULL|HDRS|X)",
        "ENVID=[!-~]{0,20}",
        Just("SMTPUTF8".to_string()),
        Just("REQUIRETLS".to_string()),
        Just("AUTH=<>".to_string()),
        "NOTIFY=(NEVER|SUCCESS,FAILURE|DELAY|x)",
        "ORCPT=rfc822;[!-~]{0,20}",
        "RRVS=[0-9TZ:-]{0,20}",
        "[A-Za-z]{1,10}(=[!-~]{0,10})?",
    ]
}

/// MAIL/RCPT lines with arbitrary paths and parameters, in several spellings.
fn path_command() -> impl Strategy<Value = String> {
    let verb = prop_oneof![
        Just("MAIL FROM:"),
        Just("RCPT TO:"),
        Just("mail from:"),
        Just("Rcpt To: "),
        Just("MAIL FROM: "),
        Just("RCPT TO:"),
    ];
    let bracket = prop_oneof![Just(("<", ">")), Just(("", "")), Just(("<", ""))];
    (
        verb,
        bracket,
        address(),
        prop::collection::vec(mail_parameter(), 0..4),
    )
        .prop_map(|(verb, (open, close), address, params)| {
            let mut line = format!("{verb}{open}{address}{close}");
            for p in params {
                line.push(' ');
                line.push_str(&p);
            }
            line
        })
}

/// Every other command, with arbitrary arguments.
fn other_command() -> impl Strategy<Value = String> {
    let verb = prop_oneof![
        Just("EHLO"),
        Just("HELO"),
        Just("ehlo"),
        Just("DATA"),
        Just("RSET"),
        Just("NOOP"),
        Just("QUIT"),
        Just("VRFY"),
        Just("EXPN"),
        Just("HELP"),
        Just("ETRN"),
        Just("STARTTLS"),
        Just("AUTH"),
        Just("BDAT"),
        Just("LHLO"),
        Just("ATRN"),
        Just("BURL"),
        Just("XCLIENT"),
        Just(""),
    ];
    let arg = prop_oneof![
        Just(String::new()),
        Just("client.test".to_string()),
        Just("example.com".to_string()),
        Just("@example.org".to_string()),
        Just("#queue".to_string()),
        "[ -~]{0,40}",
        "\\PC{0,20}",
    ];
    (verb, arg).prop_map(|(v, a)| {
        if a.is_empty() {
            v.to_string()
        } else {
            format!("{v} {a}")
        }
    })
}

/// One input line of any kind: well-formed or not, any ending, non-UTF-8,
/// NULs, far over any length limit.
fn any_line() -> impl Strategy<Value = Vec<u8>> {
    let ending = prop_oneof![
        8 => Just(&b"\r\n"[..]),
        2 => Just(&b"\n"[..]),
        1 => Just(&b"\r"[..]),
        1 => Just(&b""[..]),
        1 => Just(&b"\r\r\n"[..]),
    ];
    let text = prop_oneof![path_command(), other_command()];
    prop_oneof![
        6 => (text.clone(), ending.clone()).prop_map(|(t, e)| [t.as_bytes(), e].concat()),
        // A structured line with one byte replaced (maybe by a NUL, CR, LF or
        // a byte that is not UTF-8).
        2 => (text, ending.clone(), any::<prop::sample::Index>(), any::<u8>())
            .prop_map(|(t, e, at, b)| {
                let mut line = t.into_bytes();
                if !line.is_empty() {
                    let i = at.index(line.len());
                    line[i] = b;
                }
                line.extend_from_slice(e);
                line
            }),
        2 => (prop::collection::vec(any::<u8>(), 0..200), ending.clone())
            .prop_map(|(b, e)| [&b[..], e].concat()),
        1 => (
            prop_oneof![Just("MAIL FROM:<"), Just("RCPT TO:<"), Just("EHLO "), Just("")],
            any::<u8>(),
            1000..5000usize,
            ending,
        )
            .prop_map(|(v, b, n, e)| {
                let mut line = v.as_bytes().to_vec();
                line.resize(v.len() + n, b);
                line.extend_from_slice(e);
                line
            }),
    ]
}

/// What a client sends after 354: a body with dots, bare line endings,
/// 8-bit bytes and NULs, sometimes too big, then the real terminator.
fn data_stream() -> impl Strategy<Value = Vec<u8>> {
    (data_bytes(0..300), 0..2000usize).prop_map(|(mut body, pad)| {
        if pad > 1200 {
            body.resize(body.len() + pad, b'x');
        }
        body.extend_from_slice(b"\r\n.\r\n");
        body
    })
}

/// Bytes drawn mostly from what matters to the DATA reader.
fn data_bytes(len: std::ops::Range<usize>) -> impl Strategy<Value = Vec<u8>> {
    const BYTES: &[u8] = b"....\r\r\r\r\n\n\n\naaaZ \t\x00\x7f\x80\xe9\xff";
    prop::collection::vec(prop::sample::select(BYTES), len)
}

/// Sorted cut points for feeding a stream in pieces.
fn cuts(max: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(0..max, 0..12).prop_map(|mut v| {
        v.sort_unstable();
        v
    })
}

// ---------------------------------------------------------------------------
// The session

#[derive(Clone, Debug)]
enum Input {
    Line(Vec<u8>),
    /// The connection discarded an over-long line.
    TooLong,
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        30 => any_line().prop_map(Input::Line),
        1 => Just(Input::TooLong),
    ]
}

/// One session fed `inputs`, each reply checked with `check` (one of
/// [`check_reply`], [`check_text`]); DATA is answered from `streams` in turn.
fn run_session(
    tls: Tls,
    world: &World,
    inputs: &[Input],
    streams: &[Vec<u8>],
    check: fn(&Reply, &str) -> Result<(), TestCaseError>,
) -> Result<(), TestCaseError> {
    let policy = policy();
    let mut session = Session::with_tls(loopback(), tls);
    check(&Session::greeting(policy), "greeting")?;
    let mut streams = streams.iter().cycle();
    for (n, input) in inputs.iter().enumerate() {
        let (step, line) = match input {
            Input::Line(line) => (drive(&mut session, policy, world, line).0, line.clone()),
            Input::TooLong => (session.line_too_long(), b"<too long>".to_vec()),
        };
        let what = format!("#{n} {:?}", String::from_utf8_lossy(&line));
        if let Step::Chunk { size } = step {
            // The chunk's octets, as many as a stream holds.
            let stream = streams.next().expect("at least one stream");
            let n = usize::try_from(size).map_or(stream.len(), |s| s.min(stream.len()));
            session.chunk(&stream[..n]);
            match session.end_chunk(policy) {
                Chunked::Reply(r) | Chunked::Discarded(r) => check(&r, &what)?,
                Chunked::Message(t, data) => {
                    prop_assert!(!data.oversize);
                    check_transaction(&t)?;
                }
            }
            continue;
        }
        check(reply_of(&step), &what)?;
        match step {
            Step::Reply(r) => {
                // Only EHLO's and HELO's 250 go without an enhanced code.
                if r.status.is_empty() {
                    prop_assert_eq!(r.code, 250, "{}: {}", what, r);
                }
            }
            Step::Etrn { domain, reply } => {
                prop_assert_eq!(reply.code, 250);
                prop_assert!(is_relay_domain(&domain), "{}: ETRN for {}", what, domain);
            }
            Step::Close(r) => {
                prop_assert!(matches!(r.code, 221 | 421 | 501 | 503), "{}: {}", what, r);
                break;
            }
            Step::StartTls(r) => {
                prop_assert_eq!(tls, Tls::Offered);
                prop_assert_eq!(r.code, 220);
                // The conversation starts over inside TLS, as conn.rs does.
                session = Session::with_tls(loopback(), Tls::Active);
            }
            Step::Data(r) => {
                prop_assert_eq!(r.code, 354);
                let stream = streams.next().expect("at least one stream");
                let (data, _) = read_in_pieces(stream, &[], policy.max_message_size)
                    .expect("the stream ends in CRLF.CRLF");
                match session.finish_data(&data, policy) {
                    Ok(t) => {
                        prop_assert!(!data.oversize);
                        check_transaction(&t)?;
                    }
                    Err(r) => {
                        check(&r, &what)?;
                        prop_assert!(matches!(r.code, 552 | 554), "{}: {}", what, r);
                    }
                }
            }
            Step::Verify(_) | Step::Chunk { .. } => unreachable!("handled above"),
        }
    }
    Ok(())
}

fn tls_state() -> impl Strategy<Value = Tls> {
    prop_oneof![
        Just(Tls::Unavailable),
        Just(Tls::Offered),
        Just(Tls::Active)
    ]
}

proptest! {
    #![proptest_config(config(512))]

    /// Whatever a client sends, in whatever order, the session does not panic,
    /// every reply can be sent as it is, a callout is asked at most once per
    /// command, and every message it lets through has a sound envelope.
    #[test]
    fn any_input_gets_a_well_formed_reply(
        tls in tls_state(),
        world in world(),
        inputs in prop::collection::vec(input(), 1..40),
        streams in prop::collection::vec(data_stream(), 1..4),
    ) {
        run_session(tls, &world, &inputs, &streams, check_reply)?;
    }

    /// RFC 5321 §4.2 reply text is printable (`textstring`): client text
    /// echoed in a reply (paths, ETRN node names, parameters) must not carry
    /// NULs, escapes or other control characters back to the client.
    #[test]
    fn reply_text_is_printable(
        tls in tls_state(),
        world in world(),
        inputs in prop::collection::vec(input(), 1..40),
        streams in prop::collection::vec(data_stream(), 1..4),
    ) {
        run_session(tls, &world, &inputs, &streams, check_text)?;
    }
}

/// A client's command in the ordering model: well-formed, each with one
/// outcome the model can predict.
#[derive(Clone, Copy, Debug)]
enum Cmd {
    Ehlo,
    Helo,
    Mail,
    /// RCPT to user N of example.com (N < 8, so the recipient limit is hit).
    Rcpt(u8),
    /// RCPT to a domain we do not relay for.
    RcptElsewhere,
    Data,
    Rset,
    Noop,
    Vrfy,
    Help,
    Bogus,
    StartTls,
    Etrn,
    EtrnElsewhere,
    Quit,
    /// `BDAT 3` and its three octets.
    Bdat,
    /// `BDAT 3 LAST` and its three octets.
    BdatLast,
}

/// The octets of every chunk in the model: too few to reach the size limit.
const CHUNK: &[u8] = b"abc";

impl Cmd {
    fn line(self) -> String {
        let text: String = match self {
            Cmd::Ehlo => "EHLO client.test".into(),
            Cmd::Helo => "HELO client.test".into(),
            Cmd::Mail => "MAIL FROM:<a@origin.test>".into(),
            Cmd::Rcpt(n) => format!("RCPT TO:<user{n}@example.com>"),
            Cmd::RcptElsewhere => "RCPT TO:<user@evil.test>".into(),
            Cmd::Data => "DATA".into(),
            Cmd::Rset => "RSET".into(),
            Cmd::Noop => "NOOP".into(),
            Cmd::Vrfy => "VRFY user".into(),
            Cmd::Help => "HELP".into(),
            Cmd::Bogus => "BOGUS".into(),
            Cmd::StartTls => "STARTTLS".into(),
            Cmd::Etrn => "ETRN example.com".into(),
            Cmd::EtrnElsewhere => "ETRN elsewhere.test".into(),
            Cmd::Quit => "QUIT".into(),
            Cmd::Bdat => format!("BDAT {}", CHUNK.len()),
            Cmd::BdatLast => format!("BDAT {} LAST", CHUNK.len()),
        };
        format!("{text}\r\n")
    }
}

fn cmd() -> impl Strategy<Value = Cmd> {
    prop_oneof![
        2 => Just(Cmd::Ehlo),
        1 => Just(Cmd::Helo),
        4 => Just(Cmd::Mail),
        6 => (0..8u8).prop_map(Cmd::Rcpt),
        2 => Just(Cmd::RcptElsewhere),
        4 => Just(Cmd::Data),
        2 => Just(Cmd::Rset),
        1 => Just(Cmd::Noop),
        1 => Just(Cmd::Vrfy),
        1 => Just(Cmd::Help),
        2 => Just(Cmd::Bogus),
        1 => Just(Cmd::StartTls),
        1 => Just(Cmd::Etrn),
        2 => Just(Cmd::EtrnElsewhere),
        1 => Just(Cmd::Quit),
        3 => Just(Cmd::Bdat),
        3 => Just(Cmd::BdatLast),
    ]
}

/// Where the model's BDAT content stands.
#[derive(Default, Debug, PartialEq)]
enum Chunks {
    #[default]
    None,
    Receiving,
    /// A chunk was refused: the next ones are discarded until LAST.
    Failed,
}

/// RFC 5321's ordering rules as a model: what the session should answer.
#[derive(Default, Debug)]
struct Model {
    greeted: bool,
    esmtp: bool,
    mail: bool,
    recipients: Vec<u8>,
    chunks: Chunks,
    errors: u32,
}

impl Model {
    /// The expected reply code and whether the session goes on.
    fn step(&mut self, cmd: Cmd) -> (u16, bool) {
        let receiving = self.chunks == Chunks::Receiving;
        let code = match cmd {
            Cmd::Ehlo | Cmd::Helo => {
                self.greeted = true;
                self.esmtp = matches!(cmd, Cmd::Ehlo);
                self.end_transaction();
                250
            }
            Cmd::Mail if !self.greeted || self.mail => 503,
            Cmd::Mail => {
                self.mail = true;
                self.chunks = Chunks::None;
                250
            }
            Cmd::Rcpt(_) | Cmd::RcptElsewhere if !self.mail || receiving => 503,
            Cmd::Rcpt(_) | Cmd::RcptElsewhere if self.recipients.len() >= MAX_RECIPIENTS => 452,
            Cmd::RcptElsewhere => 550,
            Cmd::Rcpt(n) => {
                if !self.recipients.contains(&n) {
                    self.recipients.push(n);
                }
                250
            }
            Cmd::Data if !self.greeted || !self.mail || receiving => 503,
            Cmd::Data if self.recipients.is_empty() => 554,
            Cmd::Data => {
                // The test sends a message and the transaction ends.
                self.mail = false;
                self.recipients.clear();
                354
            }
            Cmd::Rset => {
                self.end_transaction();
                250
            }
            Cmd::Noop => 250,
            Cmd::Vrfy => 252,
            Cmd::Help => 214,
            Cmd::Bogus => 500,
            Cmd::StartTls => 502,
            Cmd::Etrn | Cmd::EtrnElsewhere if !self.greeted || self.mail => 503,
            Cmd::Etrn => 250,
            Cmd::EtrnElsewhere => 458,
            Cmd::Quit => return (221, false),
            // CHUNKING is offered to EHLO clients only.
            Cmd::Bdat | Cmd::BdatLast if !self.esmtp => return (503, false),
            Cmd::Bdat | Cmd::BdatLast => {
                let last = matches!(cmd, Cmd::BdatLast);
                if self.chunks == Chunks::Failed {
                    // Discarded: the client's pipeline, not an error.
                    self.chunks = if last { Chunks::None } else { Chunks::Failed };
                    return (503, true);
                }
                if !self.mail || self.recipients.is_empty() {
                    self.end_transaction();
                    if !last {
                        self.chunks = Chunks::Failed;
                    }
                    503
                } else if last {
                    // The test commits the message and the transaction ends.
                    self.end_transaction();
                    250
                } else {
                    self.chunks = Chunks::Receiving;
                    250
                }
            }
        };
        // Each refusal is one error, the server's own limits aside; the
        // MAX_ERRORS-th closes the session.
        if code >= 400 && code != 452 {
            self.errors += 1;
            if self.errors >= MAX_ERRORS {
                return (421, false);
            }
        }
        (code, true)
    }
}

impl Model {
    fn end_transaction(&mut self) {
        self.mail = false;
        self.recipients.clear();
        self.chunks = Chunks::None;
    }
}

/// Runs `cmds` against a fresh session and the model side by side. With
/// `to_the_limit` false the run stops while the error count is still far
/// from [`MAX_ERRORS`], so the ordering rules are checked on their own.
fn run_model(cmds: &[Cmd], to_the_limit: bool) -> Result<(), TestCaseError> {
    let policy = policy();
    let world = World::calm();
    let mut session = Session::new(loopback());
    let mut model = Model::default();
    let clean = Data {
        body: b"Subject: x\r\n\r\nx\r\n".to_vec(),
        size: 17,
        oversize: false,
        has_8bit: false,
        normalised: false,
    };
    for (n, cmd) in cmds.iter().enumerate() {
        if !to_the_limit && model.errors >= MAX_ERRORS / 2 {
            break;
        }
        let (step, _) = drive(&mut session, policy, &world, cmd.line().as_bytes());
        let (want, goes_on) = model.step(*cmd);
        let got = match step {
            Step::Chunk { size } => {
                prop_assert_eq!(size, CHUNK.len() as u64);
                session.chunk(CHUNK);
                match session.end_chunk(policy) {
                    Chunked::Reply(r) | Chunked::Discarded(r) => r.code,
                    Chunked::Message(t, data) => {
                        check_transaction(&t)?;
                        prop_assert!(!data.oversize);
                        250
                    }
                }
            }
            _ => reply_of(&step).code,
        };
        prop_assert_eq!(
            got,
            want,
            "#{} {:?} -> {:?} after {} errors; history {:?}",
            n,
            cmd,
            step,
            model.errors,
            &cmds[..=n]
        );
        prop_assert_eq!(
            matches!(step, Step::Close(_)),
            !goes_on,
            "#{} {:?}",
            n,
            step
        );
        if !goes_on {
            break;
        }
        match step {
            Step::Data(_) => {
                let t = session
                    .finish_data(&clean, policy)
                    .expect("a clean message");
                check_transaction(&t)?;
            }
            Step::Etrn { domain, .. } => prop_assert_eq!(domain, "example.com"),
            _ => {}
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(1024))]

    /// Arbitrary sequences of well-formed commands get exactly the answers
    /// the ordering rules give: no MAIL before EHLO/HELO, no RCPT before
    /// MAIL, no DATA without a recipient, one MAIL per transaction, RSET and
    /// EHLO end it, no ETRN inside it, the recipient limit; BDAT for EHLO
    /// clients only, not before a recipient, no RCPT or DATA once chunks
    /// began, and the chunks after a refused one discarded until LAST.
    #[test]
    fn commands_follow_the_ordering_rules(cmds in prop::collection::vec(cmd(), 1..80)) {
        run_model(&cmds, false)?;
    }

    /// Every refusal the client earns counts once towards [`MAX_ERRORS`]
    /// (the server's own limits do not count), and the session closes with
    /// 421 at exactly the limit, whatever the mix of refusals.
    #[test]
    fn the_error_limit_counts_each_refusal_once(cmds in prop::collection::vec(cmd(), 20..120)) {
        run_model(&cmds, true)?;
    }

    /// A RCPT is accepted only for a relay domain (judged by the domain after
    /// the last `@`), never with a routing trick in the local part, only for
    /// listed users where a list exists, never for a user the primary
    /// disowned; what is stored is the relay-domain address, domain
    /// lower-cased. (Whether it can be forwarded: `accepted_paths_can_be_forwarded`.)
    #[test]
    fn rcpt_is_accepted_only_for_our_domains(
        world in world(),
        smtputf8 in any::<bool>(),
        address in address(),
        params in prop::collection::vec(mail_parameter(), 0..2),
    ) {
        let policy = policy();
        let mut world = world;
        world.room = true;
        let mut session = Session::new(loopback());
        let (ehlo, _) = drive(&mut session, policy, &world, b"EHLO client.test\r\n");
        prop_assert_eq!(reply_of(&ehlo).code, 250);
        let mail = if smtputf8 {
            "MAIL FROM:<a@origin.test> SMTPUTF8\r\n"
        } else {
            "MAIL FROM:<a@origin.test>\r\n"
        };
        let (mail, _) = drive(&mut session, policy, &world, mail.as_bytes());
        prop_assert_eq!(reply_of(&mail).code, 250);
        let mut line = format!("RCPT TO:<{address}>");
        for p in &params {
            line.push(' ');
            line.push_str(p);
        }
        line.push_str("\r\n");
        let (step, asked) = drive(&mut session, policy, &world, line.as_bytes());
        let reply = reply_of(&step).clone();
        check_reply(&reply, &line)?;
        // The raw text's final domain, for paths simple enough to judge by eye.
        let simple = !address.contains(['"', '<', '>', ' ', '\\', ',', ':', '\r', '\t', '\0'])
            && !address.contains('\u{7f}');
        if simple && let Some((_, domain)) = address.rsplit_once('@') {
            if !is_relay_domain(domain) {
                prop_assert_ne!(reply.code, 250, "{:?} accepted", line);
            }
            if is_relay_domain(domain) && reply.code == 250 {
                let local = &address[..address.len() - domain.len() - 1];
                prop_assert!(!local.contains(['@', '%', '!']), "{:?} accepted", line);
            }
        }
        if let Some(asked) = &asked {
            prop_assert!(asked.ends_with("@verify.test"), "callout for {asked}");
        }
        if reply.code != 250 {
            return Ok(());
        }
        let clean = Data {
            body: b"x\r\n".to_vec(),
            size: 3,
            oversize: false,
            has_8bit: false,
            normalised: false,
        };
        let (data, _) = drive(&mut session, policy, &world, b"DATA\r\n");
        prop_assert_eq!(reply_of(&data).code, 354);
        let t = session.finish_data(&clean, policy).expect("a clean message");
        prop_assert_eq!(t.smtputf8, smtputf8);
        prop_assert_eq!(t.recipients.len(), 1);
        check_transaction(&t)?;
        let stored = &t.recipients[0].address;
        if stored.ends_with("@verify.test") && !stored.to_lowercase().starts_with("postmaster@") {
            // What the primary said, or what the callout found, decides.
            let said = match (asked.is_some(), world.verdict) {
                (true, Some(true)) => Knowledge::Exists,
                (true, Some(false)) => Knowledge::DoesNotExist,
                (true, None) => Knowledge::Unseen,
                (false, _) => world.knowledge,
            };
            prop_assert_ne!(said, Knowledge::DoesNotExist, "a disowned user was accepted");
            let down = world.primary_down || (asked.is_some() && world.verdict.is_none());
            if said == Knowledge::Unseen {
                prop_assert!(!down, "unseen while down is tempfailed here: {:?}", stored);
            }
        }
    }
}

proptest! {
    #![proptest_config(config(1024))]

    /// A message is let through only with a sender and recipients mxspool
    /// can write as SMTP paths when it forwards it (no control characters;
    /// ASCII unless SMTPUTF8 was declared). Anything else is accepted now and
    /// can only fail at delivery, which means a bounce: backscatter.
    #[test]
    fn accepted_paths_can_be_forwarded(
        smtputf8 in any::<bool>(),
        sender in address(),
        rcpts in prop::collection::vec(address(), 1..4),
    ) {
        let policy = policy();
        let world = World::calm();
        let mut session = Session::new(loopback());
        drive(&mut session, policy, &world, b"EHLO client.test\r\n");
        let utf8 = if smtputf8 { " SMTPUTF8" } else { "" };
        let mail = format!("MAIL FROM:<{sender}>{utf8}\r\n");
        let (step, _) = drive(&mut session, policy, &world, mail.as_bytes());
        if reply_of(&step).code != 250 {
            return Ok(());
        }
        for rcpt in &rcpts {
            drive(&mut session, policy, &world, format!("RCPT TO:<{rcpt}>\r\n").as_bytes());
        }
        let (step, _) = drive(&mut session, policy, &world, b"DATA\r\n");
        if reply_of(&step).code != 354 {
            return Ok(());
        }
        let data = read_in_pieces(b"x\r\n.\r\n", &[], MAX_MESSAGE_SIZE).expect("ends").0;
        let t = session.finish_data(&data, policy).expect("a clean message");
        prop_assert!(forwardable(&t.sender, t.smtputf8), "sender {:?} accepted", t.sender);
        for r in &t.recipients {
            prop_assert!(forwardable(&r.address, t.smtputf8), "recipient {:?} accepted", r.address);
        }
    }
}

// ---------------------------------------------------------------------------
// The DATA reader

proptest! {
    #![proptest_config(config(2000))]

    /// The data ends exactly at the first CRLF "." CRLF, whatever the pieces
    /// the bytes arrive in; the bytes after it are left for the commands; the
    /// body is the reference's (unstuffed, CRLF only); size and flags agree.
    #[test]
    fn data_ends_exactly_at_crlf_dot_crlf_whatever_the_pieces(
        prefix in data_bytes(0..120),
        finish in any::<bool>(),
        after in data_bytes(0..20),
        cuts in cuts(160),
    ) {
        let mut input = prefix.clone();
        if finish {
            input.extend_from_slice(b"\r\n.\r\n");
        }
        input.extend_from_slice(&after);
        let max = 1 << 20;
        let whole = read_in_pieces(&input, &[], max);
        let pieces = read_in_pieces(&input, &cuts, max);
        let bytewise: Vec<usize> = (1..input.len()).collect();
        let one_by_one = read_in_pieces(&input, &bytewise, max);
        prop_assert_eq!(&whole, &pieces, "the pieces changed the outcome");
        prop_assert_eq!(&whole, &one_by_one, "byte by byte changed the outcome");
        let want = reference_data(&input);
        match (&whole, &want) {
            (None, None) => {}
            (Some((data, used)), Some((want_used, want_body))) => {
                prop_assert_eq!(used, want_used, "ended at the wrong place");
                prop_assert_eq!(&data.body, want_body);
                prop_assert!(only_crlf(&data.body), "{:?}", data.body);
                prop_assert!(data.body.is_empty() || data.body.ends_with(b"\r\n"));
                prop_assert_eq!(data.size, data.body.len() as u64);
                prop_assert!(!data.oversize);
                let content = &input[..*used];
                prop_assert_eq!(data.has_8bit, content.iter().any(|&b| b >= 0x80));
                let bare = content.iter().enumerate().any(|(i, &b)| match b {
                    b'\r' => content.get(i + 1) != Some(&b'\n'),
                    b'\n' => i == 0 || content[i - 1] != b'\r',
                    _ => false,
                });
                prop_assert_eq!(data.normalised, bare);
            }
            (got, want) => prop_assert!(false, "reader {:?}, reference {:?}", got, want),
        }
    }

    /// The smuggling variants (a lone dot between bare or mixed line
    /// endings, or a dot with a NUL or blank beside it) never end the data
    /// wherever they appear; a lone dot line that comes through stays content
    /// in the body with CRLF line endings.
    #[test]
    fn bare_line_ending_variants_never_end_the_data(
        before in data_bytes(0..40),
        variant in prop::sample::select(FAKE_ENDS_OF_DATA.to_vec()),
        after in "[A-Z :<>@.a-z]{0,40}",
        cuts in cuts(120),
    ) {
        let mut input = before.clone();
        input.extend_from_slice(variant);
        input.extend_from_slice(after.as_bytes());
        // The generated bytes may hold a real terminator by chance; the
        // property is about those that do not.
        prop_assume!(reference_data(&input).is_none());
        prop_assert!(read_in_pieces(&input, &cuts, 1 << 20).is_none());
        // Then the real end: everything before it is content.
        input.extend_from_slice(b"\r\n.\r\n");
        let (data, used) = read_in_pieces(&input, &cuts, 1 << 20).expect("the real end");
        let (want_used, want_body) = reference_data(&input).expect("the real end");
        prop_assert_eq!(used, want_used);
        prop_assert_eq!(&data.body, &want_body);
        // The end is past the variant (`after` may begin with the dot of a
        // real terminator whose CRLF ended the variant).
        prop_assert!(used > before.len() + variant.len(), "ended inside the variant");
        prop_assert!(only_crlf(&data.body));
    }

    /// Content beyond the limit is counted to the end and reported as too big,
    /// and none of it is kept; up to the limit it all is.
    #[test]
    fn oversize_is_reported_and_not_kept(
        body in data_bytes(0..600),
        max in 0..700u64,
        cuts in cuts(700),
    ) {
        let mut input = body.clone();
        input.extend_from_slice(b"\r\n.\r\n");
        let (data, used) = read_in_pieces(&input, &cuts, max).expect("ends");
        let (want_used, want_body) = reference_data(&input).expect("ends");
        prop_assert_eq!(used, want_used);
        prop_assert_eq!(data.size, want_body.len() as u64);
        prop_assert_eq!(data.oversize, want_body.len() as u64 > max);
        if data.oversize {
            prop_assert!(data.body.is_empty(), "{} bytes kept", data.body.len());
        } else {
            prop_assert_eq!(data.body, want_body);
        }
    }
}

// ---------------------------------------------------------------------------
// Memory: the reader's own allocations, measured per thread.

/// Counts the bytes each thread has allocated and not freed, and the peak.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is passed straight to the system allocator; the
// bookkeeping touches only const-initialised thread-locals, which never
// allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        track(layout.size() as isize);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        track(-(layout.size() as isize));
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        track(new_size as isize - layout.size() as isize);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Feeds `total` bytes of one long line (no terminator) and then the end;
/// returns the data and how far this thread's live allocations rose meanwhile.
fn peak_while_reading(total: usize, max: u64) -> (Data, isize) {
    let chunk = vec![b'x'; 64 * 1024];
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let mut reader = DataReader::new(max);
    let mut fed = 0;
    while fed < total {
        let (used, done) = reader.feed(&chunk);
        assert!(done.is_none());
        assert_eq!(used, chunk.len());
        fed += chunk.len();
    }
    let (_, done) = reader.feed(b"\r\n.\r\n");
    let data = done.expect("the end");
    let peak = PEAK.with(Cell::get) - base;
    (data, peak)
}

/// 32 MiB sent to a reader that may keep 10 KB: it keeps (and allocates)
/// no more than about the limit, yet counts every byte.
#[test]
fn oversize_content_is_not_buffered() {
    let total = 32 * 1024 * 1024;
    let (data, peak) = peak_while_reading(total, 10_000);
    assert!(data.oversize);
    assert!(data.body.is_empty());
    assert_eq!(data.size, total as u64 + 2);
    assert!(
        peak < 64 * 1024,
        "the reader allocated {peak} bytes for a 10 KB limit"
    );
    // The measurement sees what is kept: 1 MiB within the limit is held.
    let (data, peak) = peak_while_reading(1024 * 1024, 2 * 1024 * 1024);
    assert!(!data.oversize);
    assert!(peak >= 1024 * 1024, "only {peak} bytes seen for 1 MiB kept");
}

// ---------------------------------------------------------------------------
// Regressions: cases worth keeping explicitly.

/// The smuggling variants at the start of the data (right after the 354),
/// where the reader's "clean start" is the DATA command itself.
#[test]
fn variants_right_after_354_do_not_end_the_data() {
    for variant in FAKE_ENDS_OF_DATA {
        // A leading CRLF would make ".\r\n" after it real only if the variant
        // continued with one; the table holds none that does.
        let mut input = variant[..].to_vec();
        input.extend_from_slice(b"MAIL FROM:<evil@x>\r\n");
        if reference_data(&input).is_some() {
            continue;
        }
        for step in [1, 2, 3, input.len()] {
            let cuts: Vec<usize> = (step..input.len()).step_by(step).collect();
            assert!(
                read_in_pieces(&input, &cuts, 1 << 20).is_none(),
                "{:?} ended the data",
                String::from_utf8_lossy(variant)
            );
        }
    }
}

/// Found by `the_error_limit_counts_each_refusal_once`: a refused ETRN is
/// counted twice (`Session::etrn` counts it, then `Session::command` counts
/// the same reply again), so ten refused ETRNs close the session that twenty
/// other refusals would.
#[test]
fn etrn_refusals_count_once_towards_the_error_limit() {
    let policy = policy();
    let world = World::calm();
    let mut session = Session::new(loopback());
    drive(&mut session, policy, &world, b"EHLO client.test\r\n");
    for n in 1..MAX_ERRORS {
        let (step, _) = drive(&mut session, policy, &world, b"ETRN elsewhere.test\r\n");
        assert!(
            matches!(step, Step::Reply(ref r) if r.code == 458),
            "refusal {n} of {MAX_ERRORS}: {step:?}"
        );
    }
    let (step, _) = drive(&mut session, policy, &world, b"ETRN elsewhere.test\r\n");
    assert!(
        matches!(step, Step::Close(ref r) if r.code == 421),
        "{step:?}"
    );
}

/// Found by `rcpt_is_accepted_only_for_our_domains` and
/// `accepted_paths_can_be_forwarded`: smtp-proto keeps control characters
/// inside a quoted local part (and takes DEL as an atext character), and the
/// session accepts the path. The outbound side then cannot write it as an
/// SMTP path (`outbound::mail::path` refuses control characters), so the
/// recipient fails with 5.1.3 (or, for the sender, every recipient with
/// 5.1.7) after we said 250: accept-then-bounce. RFC 5321 §4.1.2 allows no
/// control characters in a path; refuse them at RCPT/MAIL time.
#[test]
fn control_characters_in_paths_are_refused() {
    let policy = policy();
    let world = World::calm();
    let fresh = || {
        let mut session = Session::new(loopback());
        drive(&mut session, policy, &world, b"EHLO client.test\r\n");
        session
    };
    let mut accepted = Vec::new();
    for rcpt in [
        "\"\0\"@example.com",
        "\"a\u{1}b\"@example.com",
        "\"tab\there\"@example.com",
        "\"\u{1b}[2J\"@example.com",
        "a\u{7f}b@example.com",
    ] {
        let mut session = fresh();
        drive(
            &mut session,
            policy,
            &world,
            b"MAIL FROM:<a@origin.test>\r\n",
        );
        let (step, _) = drive(
            &mut session,
            policy,
            &world,
            format!("RCPT TO:<{rcpt}>\r\n").as_bytes(),
        );
        if reply_of(&step).code < 500 {
            accepted.push(format!("RCPT TO:{rcpt:?} -> {}", reply_of(&step)));
        }
    }
    for sender in ["\"\0\"@origin.test", "a\u{7f}b@origin.test"] {
        let mut session = fresh();
        let (step, _) = drive(
            &mut session,
            policy,
            &world,
            format!("MAIL FROM:<{sender}>\r\n").as_bytes(),
        );
        if reply_of(&step).code < 500 {
            accepted.push(format!("MAIL FROM:{sender:?} -> {}", reply_of(&step)));
        }
    }
    assert!(
        accepted.is_empty(),
        "paths with control characters accepted:\n{}",
        accepted.join("\n")
    );
}

/// Found by `reply_text_is_printable`: replies echo client text as it came
/// (the ETRN node, the path in 550/450 refusals, an unsupported parameter),
/// so NULs and terminal escapes go back on the wire inside reply text,
/// which RFC 5321 §4.2 (`textstring`) does not allow.
#[test]
fn echoed_client_text_is_printable() {
    let policy = policy();
    let world = World::calm();
    let mut unprintable = Vec::new();
    for script in [
        &["EHLO client.test", "ETRN \u{0}node.test"][..],
        &["EHLO client.test", "MAIL FROM:<a@origin.test> X\u{1b}Y=1"],
        &[
            "EHLO client.test",
            "MAIL FROM:<a@origin.test>",
            "RCPT TO:<\"\u{1b}[2J\"@evil.test>",
        ],
    ] {
        let mut session = Session::new(loopback());
        for line in script {
            let (step, _) = drive(
                &mut session,
                policy,
                &world,
                format!("{line}\r\n").as_bytes(),
            );
            let reply = reply_of(&step);
            if reply
                .lines
                .iter()
                .any(|l| l.chars().any(|c| c.is_control() && c != '\t'))
            {
                unprintable.push(format!("{line:?} -> {:?}", reply.lines));
            }
        }
    }
    assert!(
        unprintable.is_empty(),
        "control characters echoed in replies:\n{}",
        unprintable.join("\n")
    );
}
