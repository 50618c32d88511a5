//! Mailbox fetch: mail for our domains collected from an ISP's catch-all
//! mailbox (POP3/IMAP) instead of arriving over SMTP, spooled like inbound
//! mail and delivered by the same scheduler.
//!
//! One task per `[[fetch]]` block runs a fetch every `interval` (with IMAP
//! IDLE, when new mail arrives), or at once when asked (`mxspool fetch now`,
//! `POST /api/fetch/{name}`). A message is deleted on the server (or, with
//! `delete = false`, remembered as taken) only after its spool commit.
//!
//! Here: the tasks, their reports, logs and metrics. [`envelope`] works out,
//! from a fetched message alone, whom to deliver it to and with what
//! sender (`repair` reads the addresses in it); `run` is one run and `take` stores one message; `pop3` and
//! `imap` speak to the server; `net` connects (TLS always verified).

pub mod envelope;
mod imap;
mod net;
mod pop3;
mod repair;
mod run;
mod take;

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::config::FetchConfig;
use crate::inbound::Inbound;
use crate::shutdown::Shutdown;
use imap::{Imap, Woken};

/// A message as the server lists it.
#[derive(Debug, Clone)]
pub(crate) struct Listed {
    /// POP3: the message number in this session; IMAP: the UID.
    number: u32,
    /// What identifies it across sessions: the POP3 UIDL, or IMAP
    /// `UIDVALIDITY.UID`.
    uid: String,
    size: u64,
}

/// Why a fetch run stopped early.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("the server refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Protocol(String),
    #[error("{0}")]
    Config(String),
    /// The spool could not take a message (full, or a write error): it stays
    /// on the server for the next run.
    #[error("not stored: {0}")]
    Spool(String),
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Messages retrieved from the server.
    pub fetched: u64,
    /// … queued to their recipients.
    pub queued: u64,
    /// … queued to the block's postmaster (no usable recipient, or unparseable).
    pub postmaster: u64,
    /// … already stored before (same Message-ID and size): only marked.
    pub duplicates: u64,
    /// Messages left on the server: larger than `server.max_message_size`.
    pub left: u64,
    /// Why the run stopped early, if it did.
    pub error: Option<String>,
}

/// A request to run a fetch now, answered with its report.
type Request = oneshot::Sender<Report>;

/// The running fetch tasks, by block name.
#[derive(Clone, Default)]
pub struct Fetchers {
    accounts: Arc<HashMap<String, mpsc::Sender<Request>>>,
}

impl Fetchers {
    /// Starts one task per `[[fetch]]` block.
    pub fn start(
        accounts: &[FetchConfig],
        inbound: Arc<Inbound>,
        shutdown: &Shutdown,
    ) -> (Fetchers, Vec<JoinHandle<()>>) {
        let mut senders = HashMap::new();
        let mut tasks = Vec::new();
        for account in accounts {
            let (tx, rx) = mpsc::channel(16);
            senders.insert(account.name.clone(), tx);
            let task = Task {
                account: Arc::new(account.clone()),
                inbound: inbound.clone(),
                requests: rx,
                shutdown: shutdown.clone(),
                auth_failure: None,
            };
            tasks.push(tokio::spawn(task.run()));
        }
        let fetchers = Fetchers {
            accounts: Arc::new(senders),
        };
        (fetchers, tasks)
    }

    /// The configured block names.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.accounts.keys().cloned().collect();
        names.sort();
        names
    }

    /// Runs a fetch of `name` now (or right after the one in progress) and
    /// returns its report; `None` if there is no such block (or the server
    /// is stopping).
    pub async fn run_now(&self, name: &str) -> Option<Report> {
        let (tx, rx) = oneshot::channel();
        self.accounts.get(name)?.send(tx).await.ok()?;
        rx.await.ok()
    }
}

/// One block's fetch loop.
struct Task {
    account: Arc<FetchConfig>,
    inbound: Arc<Inbound>,
    requests: mpsc::Receiver<Request>,
    shutdown: Shutdown,
    /// The last authentication failure, logged once until it changes.
    auth_failure: Option<String>,
}

impl Task {
    async fn run(mut self) {
        let mut waiting: Vec<Request> = Vec::new();
        let mut session: Option<Imap> = None;
        loop {
            while let Ok(request) = self.requests.try_recv() {
                waiting.push(request);
            }
            let mut report = Report::default();
            let result = run::run(&self.account, &self.inbound, session.take(), &mut report).await;
            match result {
                Ok(kept) => session = kept,
                Err(e) => report.error = Some(e.to_string()),
            }
            self.record(&report);
            for request in waiting.drain(..) {
                let _ = request.send(report.clone());
            }
            let woken = self.wait(&mut session, &mut waiting).await;
            if !woken {
                if let Some(imap) = session.take() {
                    let _ = imap.close().await;
                }
                return;
            }
        }
    }

    /// Waits for the next run: in IDLE on a kept IMAP session, or for the
    /// interval; a request or (IDLE) new mail ends the wait early. False at
    /// shutdown.
    async fn wait(&mut self, session: &mut Option<Imap>, waiting: &mut Vec<Request>) -> bool {
        let interval = self.account.interval;
        let Task {
            requests, shutdown, ..
        } = self;
        if let Some(imap) = session.take() {
            let mut stopping = false;
            let stop = async {
                tokio::select! {
                    request = requests.recv() => waiting.extend(request),
                    () = shutdown.wait() => stopping = true,
                }
            };
            match imap.idle(interval, stop).await {
                Ok((imap, woken)) => {
                    if matches!(woken, Woken::Changed) {
                        debug!(account = %self.account.name, "IDLE: the mailbox changed");
                    }
                    *session = Some(imap);
                }
                // The next run logs in again, after the interval: a server
                // whose IDLE keeps failing must not be polled in a loop.
                Err(e) => {
                    debug!(account = %self.account.name, error = %e, "IDLE failed");
                    if !stopping && waiting.is_empty() {
                        return self.sleep(interval, waiting).await;
                    }
                }
            }
            return !stopping && !self.shutdown.is_set();
        }
        self.sleep(interval, waiting).await
    }

    /// Sleeps `interval`, or until a request (true) or shutdown (false).
    async fn sleep(&mut self, interval: std::time::Duration, waiting: &mut Vec<Request>) -> bool {
        let Task {
            requests, shutdown, ..
        } = self;
        tokio::select! {
            () = tokio::time::sleep(interval) => true,
            request = requests.recv() => {
                waiting.extend(request);
                true
            }
            () = shutdown.wait() => false,
        }
    }

    /// Metrics and the run's log line; an authentication failure is logged
    /// once until it changes (or logging in works again).
    fn record(&mut self, report: &Report) {
        let name = self.account.name.as_str();
        let metrics = &self.inbound.metrics;
        let auth = report
            .error
            .as_deref()
            .filter(|e| e.starts_with("authentication failed"));
        let result = match (&report.error, auth) {
            (None, _) => "ok",
            (Some(_), Some(_)) => "auth_failed",
            (Some(_), None) => "error",
        };
        metrics.fetch_runs.with_label_values(&[name, result]).inc();
        if report.error.is_none() {
            let now = (self.inbound.clock.now_ms() / 1000) as i64;
            metrics
                .fetch_last_success
                .with_label_values(&[name])
                .set(now);
        }
        match (auth, &self.auth_failure) {
            (Some(e), Some(before)) if e == before => return,
            (Some(e), _) => {
                warn!(account = name, server = %self.account.host, error = e,
                    "fetch: cannot log in; retrying every interval (logged again only if this changes)");
                self.auth_failure = Some(e.to_owned());
                return;
            }
            (None, Some(_)) if report.error.is_none() => {
                info!(account = name, "fetch: logging in works again");
                self.auth_failure = None;
            }
            _ => {}
        }
        let Report {
            fetched,
            queued,
            postmaster,
            duplicates,
            left,
            error,
        } = report;
        match error {
            Some(e) => warn!(account = name, fetched, queued, postmaster, duplicates, left,
                error = %e, "fetch run failed"),
            None if *fetched > 0 || *left > 0 => info!(
                account = name,
                fetched, queued, postmaster, duplicates, left, "fetch run"
            ),
            None => debug!(account = name, "fetch run: nothing new"),
        }
    }
}
