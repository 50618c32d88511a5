//! (operator) `mxspool queue …`, `mxspool dead …`, `mxspool fetch now` and
//! `mxspool health`: a
//! client of the admin API (docs/api.md) of the server that the same config
//! file describes. It never opens the spool: the running server owns it, and
//! every change goes through the server's own operations, so a command and a
//! delivery in progress cannot trip over each other.
//!
//! `mxspool doctor` is the exception: it asks DNS and the network, not the
//! server ([`crate::doctor`]); only its output is printed here.
//!
//! [`client`] speaks HTTP, [`render`] turns answers into text; this file says
//! what each command asks and what its answers mean.

mod client;
mod render;

use std::io::{self, Write};

use clap::{Subcommand, ValueEnum};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::config::{Config, ConfigError};
use client::{CallError, Client, segment};

/// Operate on queued mail.
#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// List queued messages in arrival order, one line per recipient.
    List {
        /// Only messages with a recipient still queued at this domain.
        #[arg(long, value_name = "D")]
        domain: Option<String>,
        /// Only messages in this state.
        #[arg(long, value_name = "S")]
        state: Option<State>,
        /// Print the server's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one message: envelope, recipients and headers.
    Show {
        /// Queue ID, as `list` shows it.
        id: String,
        /// Print the server's JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Make queued mail due now (one domain's, or all of it), as ETRN does.
    Flush {
        /// Only this domain's mail (default: all).
        domain: Option<String>,
    },
    /// Remove a message without telling anyone.
    Delete {
        /// Queue ID, as `list` shows it.
        id: String,
    },
    /// Take a message out of delivery until it is released.
    Hold {
        /// Queue ID, as `list` shows it.
        id: String,
    },
    /// Put a held message back into delivery, due now.
    Release {
        /// Queue ID, as `list` shows it.
        id: String,
    },
    /// Fail every queued recipient now and send the sender the notice its
    /// NOTIFY= asks for.
    Bounce {
        /// Queue ID, as `list` shows it.
        id: String,
    },
    /// Per relay domain: the primary's state, whether delivery is paused
    /// (and by whom), queue depth and the oldest message's age.
    Domains {
        /// Print the server's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop delivery to a relay domain (e.g. before maintenance of its
    /// primary); mail is still accepted and queued, and none expires.
    Pause {
        /// A configured domain, as `domains` shows it.
        domain: String,
    },
    /// Restart delivery to a paused relay domain: its queued mail is due now.
    Resume {
        /// A configured domain, as `domains` shows it.
        domain: String,
    },
}

/// Mail that could neither be delivered nor bounced.
#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// List dead letters.
    List {
        /// Print the server's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Queue a dead letter again: every recipient not delivered, due now.
    Requeue {
        /// Queue ID, as `list` shows it.
        id: String,
    },
    /// Remove a dead letter.
    Delete {
        /// Queue ID, as `list` shows it.
        id: String,
    },
}

/// Mailbox fetch (`[[fetch]]` blocks).
#[derive(Debug, Subcommand)]
pub enum FetchCommand {
    /// Fetch now and print what each run did: one block, or every one.
    Now {
        /// A `[[fetch]]` block's name (default: every block).
        name: Option<String>,
    },
}

/// `queue list --state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum State {
    /// Not held.
    Queued,
    /// Out of delivery until released.
    Held,
    /// Not held, and some recipient already attempted.
    Deferred,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Held => "held",
            State::Deferred => "deferred",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The config file, or the token file it names.
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot reach the server at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the admin token was refused (http.admin_token_file)")]
    TokenRefused,
    #[error("the server wants an admin token: set http.admin_token_file")]
    NoToken,
    #[error("no message {0}")]
    NoMessage(String),
    /// Any other refusal, in the server's words (API disabled, not held, …).
    #[error("{0}")]
    Server(String),
    #[error("{url} answered {status} to /healthz")]
    Unhealthy { url: String, status: u16 },
    #[error("unexpected answer from the server: {0}")]
    Garbled(String),
    /// `doctor` could not run its checks (an unreadable --ca-file, …).
    #[error("{0}")]
    Doctor(String),
    #[error("{0} check(s) failed")]
    ChecksFailed(usize),
    #[error("cannot write the output: {0}")]
    Output(#[from] io::Error),
}

/// Exit status for a configuration that does not load (as `check-config`).
pub const EXIT_CONFIG: u8 = 2;
/// Exit status for every other failure.
pub const EXIT_FAILURE: u8 = 1;

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Config(_) => EXIT_CONFIG,
            _ => EXIT_FAILURE,
        }
    }
}

pub fn queue(config: &Config, command: QueueCommand, out: &mut dyn Write) -> Result<(), CliError> {
    let api = Api::new(config)?;
    let text = match command {
        QueueCommand::List {
            domain,
            state,
            json,
        } => return list(&api, domain.as_deref(), state, json, out),
        QueueCommand::Show { id, json } => show(&api, &id, json)?,
        QueueCommand::Flush { domain } => flush(&api, domain.as_deref())?,
        QueueCommand::Delete { id } => {
            let answer = api.act(&id, |c| c.delete(&message_path(&id, "")))?;
            format!("deleted {}\n", answer.id("deleted", &id))
        }
        QueueCommand::Hold { id } => {
            let answer = api.act(&id, |c| c.post(&message_path(&id, "/hold"), None))?;
            format!("held {}\n", answer.id("held", &id))
        }
        QueueCommand::Release { id } => {
            let answer = api.act(&id, |c| c.post(&message_path(&id, "/release"), None))?;
            format!("released {}: due now\n", answer.id("released", &id))
        }
        QueueCommand::Domains { json } => domains(&api, json)?,
        QueueCommand::Pause { domain } => pause(&api, &domain)?,
        QueueCommand::Resume { domain } => resume(&api, &domain)?,
        QueueCommand::Bounce { id } => bounce(&api, &id)?,
    };
    write(out, &text)
}

/// `queue list`: one line per recipient, written page by page as the
/// server hands them out (so a huge queue never sits in memory on either
/// side), or the server's JSON for the whole listing.
fn list(
    api: &Api,
    domain: Option<&str>,
    state: Option<State>,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let mut query = vec![("limit", PAGE)];
    if let Some(domain) = domain {
        query.push(("domain", domain));
    }
    if let Some(state) = state {
        query.push(("state", state.as_str()));
    }
    let what = if query.len() == 1 {
        render::QUEUE
    } else {
        render::QUEUE_FILTERED
    };
    let (mut shown, mut held) = (0, 0);
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut page_query = query.clone();
        if let Some(c) = &cursor {
            page_query.push(("cursor", c.as_str()));
        }
        let body = api.call(None, |c| c.get("/api/queue", &page_query))?;
        if json {
            let page: RawPage = parse(&body)?;
            all.extend(page.messages);
            cursor = page.next_cursor;
        } else {
            let page: render::MessageList = parse(&body)?;
            if !page.messages.is_empty() {
                write(out, &render::rows(&page, shown == 0))?;
            }
            shown += page.messages.len();
            held += page.messages.iter().filter(|m| m.held).count();
            cursor = page.next_cursor;
        }
        if cursor.is_none() {
            break;
        }
    }
    if json {
        // The server's messages as it wrote them (key order kept).
        let messages: Vec<&str> = all.iter().map(|m| m.get()).collect();
        let text = format!(
            "{{\"count\": {}, \"messages\": [{}]}}",
            messages.len(),
            messages.join(",")
        );
        return write(out, &pretty(&text)?);
    }
    write(out, &render::footer(shown, held, what))
}

/// A page of `GET /api/queue`, its messages left as the server wrote them.
#[derive(serde::Deserialize)]
struct RawPage {
    messages: Vec<Box<serde_json::value::RawValue>>,
    next_cursor: Option<String>,
}

/// Messages asked for per page by `queue list`.
const PAGE: &str = "500";

/// `queue show`: one message as text, or the server's JSON.
fn show(api: &Api, id: &str, json: bool) -> Result<String, CliError> {
    let body = api.call(Some(id), |c| c.get(&message_path(id, ""), &[]))?;
    if json {
        pretty(&body)
    } else {
        Ok(render::message(&parse(&body)?, now_ms()))
    }
}

/// `queue flush`: what the server made due.
fn flush(api: &Api, domain: Option<&str>) -> Result<String, CliError> {
    let body = domain.map(|d| json!({ "domain": d }));
    let answer: Answer = parse(&api.call(None, |c| c.post("/api/queue/flush", body.as_ref()))?)?;
    Ok(match answer.get("flushed") {
        Some("all") | None => "all queued mail is due now\n".to_owned(),
        Some(domain) => {
            format!("queued mail for {} is due now\n", render::one_line(domain))
        }
    })
}

/// `queue domains`: one line per relay domain, or the server's JSON.
fn domains(api: &Api, json: bool) -> Result<String, CliError> {
    let body = api.call(None, |c| c.get("/api/domains", &[]))?;
    if json {
        pretty(&body)
    } else {
        Ok(render::domains(&parse(&body)?, now_ms()))
    }
}

/// `queue pause`: the domain paused, and how to undo it.
fn pause(api: &Api, domain: &str) -> Result<String, CliError> {
    let answer: Answer = parse(&api.call(None, |c| c.post(&domain_path(domain, "/pause"), None))?)?;
    let name = render::one_line(answer.get("paused").unwrap_or(domain));
    Ok(format!(
        "paused {name}: mail is accepted and queued, nothing is delivered until \
         `mxspool queue resume {name}`\n"
    ))
}

/// `queue resume`: the domain resumed, and who had paused it.
fn resume(api: &Api, domain: &str) -> Result<String, CliError> {
    let answer: Answer =
        parse(&api.call(None, |c| c.post(&domain_path(domain, "/resume"), None))?)?;
    let name = render::one_line(answer.get("resumed").unwrap_or(domain));
    let by = match answer.get("paused_by") {
        Some("guard") => " (paused by the drain guard)",
        _ => "",
    };
    Ok(format!("resumed {name}{by}: its queued mail is due now\n"))
}

/// `queue bounce`: how many recipients failed.
fn bounce(api: &Api, id: &str) -> Result<String, CliError> {
    let answer: serde_json::Value =
        parse(&api.call(Some(id), |c| c.post(&message_path(id, "/bounce"), None))?)?;
    let n = answer["recipients"].as_u64().unwrap_or(0);
    Ok(format!(
        "bounced {}: {n} recipient{} failed\n",
        render::one_line(answer["bounced"].as_str().unwrap_or(id)),
        if n == 1 { "" } else { "s" }
    ))
}

pub fn dead(config: &Config, command: DeadCommand, out: &mut dyn Write) -> Result<(), CliError> {
    let api = Api::new(config)?;
    let text = match command {
        DeadCommand::List { json } => {
            let body = api.call(None, |c| c.get("/api/dead", &[]))?;
            if json {
                pretty(&body)?
            } else {
                render::list(&parse(&body)?, render::DEAD)
            }
        }
        DeadCommand::Requeue { id } => {
            let answer = api.act(&id, |c| c.post(&dead_path(&id, "/requeue"), None))?;
            format!("requeued {}: due now\n", answer.id("requeued", &id))
        }
        DeadCommand::Delete { id } => {
            let answer = api.act(&id, |c| c.delete(&dead_path(&id, "")))?;
            format!("deleted {}\n", answer.id("deleted", &id))
        }
    };
    write(out, &text)
}

/// `fetch now`: one line per block run; fails if any run failed.
pub fn fetch(config: &Config, command: FetchCommand, out: &mut dyn Write) -> Result<(), CliError> {
    let FetchCommand::Now { name } = command;
    let names: Vec<String> = match name {
        Some(name) => vec![name],
        None => config.fetch.iter().map(|f| f.name.clone()).collect(),
    };
    if names.is_empty() {
        return Err(CliError::Server(format!(
            "{} has no [[fetch]] blocks",
            config.source.display()
        )));
    }
    let api = Api::with_timeout(config, client::FETCH_TIMEOUT)?;
    let mut failed = Vec::new();
    for name in &names {
        let path = format!("/api/fetch/{}", segment(name));
        let answer: serde_json::Value = parse(&api.call(None, |c| c.post(&path, None))?)?;
        let report = &answer["report"];
        let count = |key: &str| report[key].as_u64().unwrap_or(0);
        let mut line = format!(
            "{}: fetched {}, queued {}, to the postmaster {}, already stored {}, left on the server {}",
            render::one_line(name),
            count("fetched"),
            count("queued"),
            count("postmaster"),
            count("duplicates"),
            count("left"),
        );
        if let Some(error) = report["error"].as_str() {
            line.push_str(&format!("; failed: {}", render::one_line(error)));
            failed.push(name.clone());
        }
        line.push('\n');
        write(out, &line)?;
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CliError::Server(format!(
            "fetch failed: {}",
            failed.join(", ")
        )))
    }
}

/// Succeeds iff `/healthz` answers with success within [`client::HEALTH_TIMEOUT`].
/// Needs no token, so it works from a container's HEALTHCHECK as any user.
/// `mxspool doctor`: runs the checks (no server needed) and prints the
/// report; a failed check makes the command fail (exit 1).
pub fn doctor(
    config: &Config,
    options: &crate::doctor::Options,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Doctor(format!("cannot start the runtime: {e}")))?;
    let report = runtime
        .block_on(crate::doctor::run(config, options))
        .map_err(|e| CliError::Doctor(e.to_string()))?;
    let text = if json { report.json() } else { report.text() };
    out.write_all(text.as_bytes())?;
    out.flush()?;
    match report.count(crate::doctor::Verdict::Fail) {
        0 => Ok(()),
        failed => Err(CliError::ChecksFailed(failed)),
    }
}

pub fn health(config: &Config) -> Result<(), CliError> {
    let client = Client::new(config.http.listen, None, client::HEALTH_TIMEOUT);
    match client.get("/healthz", &[]) {
        Ok(_) => Ok(()),
        Err(CallError::Unreachable { url, reason }) => Err(CliError::Unreachable { url, reason }),
        Err(CallError::Status { status, .. }) => Err(CliError::Unhealthy {
            url: client.base().to_owned(),
            status,
        }),
    }
}

/// The admin API of the configured server, with its token.
struct Api {
    client: Client,
    /// Whether we sent a token: a 401 then means a wrong one, not a missing one.
    has_token: bool,
}

impl Api {
    fn new(config: &Config) -> Result<Api, CliError> {
        Api::with_timeout(config, client::TOTAL_TIMEOUT)
    }

    /// For requests that take longer than the usual [`client::TOTAL_TIMEOUT`].
    fn with_timeout(config: &Config, total: std::time::Duration) -> Result<Api, CliError> {
        let token = token(config)?;
        Ok(Api {
            has_token: token.is_some(),
            client: Client::new(config.http.listen, token, total),
        })
    }

    /// Makes one request; `id` names the message it is about, for a 404.
    fn call(
        &self,
        id: Option<&str>,
        request: impl FnOnce(&Client) -> Result<String, CallError>,
    ) -> Result<String, CliError> {
        request(&self.client).map_err(|e| match e {
            CallError::Unreachable { url, reason } => CliError::Unreachable { url, reason },
            CallError::Status { status: 401, .. } if self.has_token => CliError::TokenRefused,
            CallError::Status { status: 401, .. } => CliError::NoToken,
            CallError::Status { status, error } => match (status, id) {
                (404, Some(id)) => CliError::NoMessage(render::one_line(id)),
                _ => CliError::Server(render::one_line(&error)),
            },
        })
    }

    /// An operation on one message, answered `{"<verb>": "<id>"}`.
    fn act(
        &self,
        id: &str,
        request: impl FnOnce(&Client) -> Result<String, CallError>,
    ) -> Result<Answer, CliError> {
        parse(&self.call(Some(id), request)?)
    }
}

/// A small answer such as `{"held": "0KXW3J5M7P2QR"}`.
#[derive(serde::Deserialize)]
#[serde(transparent)]
struct Answer(serde_json::Map<String, serde_json::Value>);

impl Answer {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.as_str())
    }

    /// The ID the server names under `key`, else the one asked about.
    fn id(&self, key: &str, asked: &str) -> String {
        render::one_line(self.get(key).unwrap_or(asked))
    }
}

/// The admin token: the content of `http.admin_token_file`, trimmed, as the
/// server reads it. No file configured: no token, and the server will say
/// the API is disabled (or that it wants one).
fn token(config: &Config) -> Result<Option<String>, ConfigError> {
    let Some(path) = &config.http.admin_token_file else {
        return Ok(None);
    };
    let invalid = |reason: String| ConfigError::Invalid {
        file: config.source.clone(),
        key: "http.admin_token_file".into(),
        reason,
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(invalid(format!("{} is empty", path.display())));
    }
    Ok(Some(token.to_owned()))
}

fn message_path(id: &str, action: &str) -> String {
    format!("/api/queue/{}{action}", segment(id))
}

fn domain_path(domain: &str, action: &str) -> String {
    format!("/api/domains/{}{action}", segment(domain))
}

fn dead_path(id: &str, action: &str) -> String {
    format!("/api/dead/{}{action}", segment(id))
}

fn parse<T: DeserializeOwned>(body: &str) -> Result<T, CliError> {
    serde_json::from_str(body).map_err(|e| CliError::Garbled(e.to_string()))
}

/// `--json`: the server's JSON re-indented, its key order kept.
fn pretty(body: &str) -> Result<String, CliError> {
    parse::<serde::de::IgnoredAny>(body)?;
    let mut text = render::indent_json(body);
    text.push('\n');
    Ok(text)
}

/// Writes everything; a reader that went away (`| head`) is not an error.
fn write(out: &mut dyn Write, text: &str) -> Result<(), CliError> {
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(CliError::Output(e)),
        _ => Ok(()),
    }
}

fn now_ms() -> u64 {
    crate::clock::Clock::new().now_ms()
}
