//! (1) SMTP in: accept connections, hold SMTP conversations, and hand finished
//! messages to the spool. Inbound never delivers, and resolves nothing but
//! the client's address in DNS lists and the sender's SPF: it reads primary health
//! ([`crate::health`]) and asks recipient knowledge ([`crate::knowledge`]),
//! which may call out to a primary.
//!
//! - `policy.rs`: relay domains, recipient lists, connection lists, limits.
//! - `dnsbl.rs`: DNS blocklists and allowlists, looked up at connect.
//! - `spf.rs`: SPF of the sender, checked at RCPT; its header fields.
//! - `session/`: the pure SMTP state machine.
//! - `data.rs`: the DATA and BDAT byte filters (end of data, dot-stuffing,
//!   line endings, the size limit).
//! - `received.rs`: our `Received:` trace field.
//! - `conn.rs`: the async shell for one connection.
//! - this file: the accept loop and connection limits.

pub mod conn;
pub mod data;
pub mod dnsbl;
mod io;
pub mod policy;
pub mod received;
pub mod reply;
pub mod session;
pub mod spf;
pub mod tls;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;

use tracing::{Instrument, info, warn};

use crate::clock::Clock;
use crate::health::Health;
use crate::knowledge::Learned;
use crate::knowledge::callout::Callouts;
use crate::knowledge::greylist::Greylist;
use crate::metrics::Metrics;
use crate::scheduler;
use crate::shutdown::Shutdown;
use crate::spool::{CommitError, Envelope, FetchMark, NewMessage, Spool};
use crate::status::Rejection;
use policy::Policy;
use reply::Reply;

/// What every session shares.
pub struct Inbound {
    pub spool: Spool,
    /// Replaced whole on reload; sessions take a snapshot per command.
    policy: RwLock<Arc<Policy>>,
    /// STARTTLS, when `[tls]` is configured; replaced on reload.
    tls: RwLock<Option<TlsAcceptor>>,
    /// Caps sessions server-wide (`max_connections`).
    slots: Arc<Semaphore>,
    /// Sessions per client address (`max_connections_per_ip`).
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    max_per_ip: usize,
    /// New connections per client address in the current minute.
    rate: Mutex<RateLimit>,
    /// The delivery side: told about new mail, ETRN, and who connects.
    delivery: scheduler::Handle,
    pub health: Arc<Health>,
    pub learned: Arc<Learned>,
    /// Greylisting's triplets and passed client networks.
    pub greylist: Arc<Greylist>,
    pub callouts: Arc<Callouts>,
    /// DNS list lookups about connecting clients.
    pub dnsbl: Arc<dnsbl::Lookups>,
    /// SPF checks of senders, for domains with `spf` on.
    pub spf: Arc<spf::Checker>,
    pub metrics: Arc<Metrics>,
    /// Queue IDs (arrival times) and learned verdicts' ages read it.
    pub clock: Clock,
    /// Wakes the delivery side when new mail is committed.
    queued: Arc<Notify>,
}

/// Connection caps, fixed at startup (a change needs a restart).
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// New connections per address per minute; 0 = no limit.
    pub max_connection_rate_per_ip: u32,
}

/// The rest of the server, as sessions use it.
pub struct Services {
    pub spool: Spool,
    pub delivery: scheduler::Handle,
    pub health: Arc<Health>,
    pub learned: Arc<Learned>,
    pub greylist: Arc<Greylist>,
    pub callouts: Arc<Callouts>,
    pub dnsbl: Arc<dnsbl::Lookups>,
    pub spf: Arc<spf::Checker>,
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
}

impl Inbound {
    pub fn new(
        policy: Policy,
        limits: Limits,
        tls: Option<TlsAcceptor>,
        services: Services,
    ) -> Inbound {
        let Services {
            spool,
            delivery,
            health,
            learned,
            greylist,
            callouts,
            dnsbl,
            spf,
            metrics,
            clock,
        } = services;
        let queued = delivery.queued();
        Inbound {
            spool,
            policy: RwLock::new(Arc::new(policy)),
            tls: RwLock::new(tls),
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            per_ip: Mutex::new(HashMap::new()),
            max_per_ip: limits.max_connections_per_ip,
            rate: Mutex::new(RateLimit::new(
                limits.max_connection_rate_per_ip,
                RATE_WINDOW,
            )),
            delivery,
            health,
            learned,
            greylist,
            callouts,
            dnsbl,
            spf,
            metrics,
            clock,
            queued,
        }
    }

    pub fn policy(&self) -> Arc<Policy> {
        match self.policy.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn set_policy(&self, policy: Policy) {
        match self.policy.write() {
            Ok(mut p) => *p = Arc::new(policy),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(policy),
        }
    }

    pub fn tls_acceptor(&self) -> Option<TlsAcceptor> {
        match self.tls.read() {
            Ok(t) => t.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn set_tls(&self, tls: Option<TlsAcceptor>) {
        match self.tls.write() {
            Ok(mut t) => *t = tls,
            Err(poisoned) => *poisoned.into_inner() = tls,
        }
    }

    pub fn delivery(&self) -> &scheduler::Handle {
        &self.delivery
    }

    pub fn request_flush(&self, domain: String) {
        self.delivery.flush(Some(domain));
    }

    pub fn notify_queued(&self) {
        self.queued.notify_one();
    }

    /// Stores a finished message durably and hands it to delivery: mail for
    /// a primary known to be down is stored already waiting for it, rather
    /// than stored due and rewritten by the scheduler a moment later. A
    /// fetched message carries its [`FetchMark`], stored in the same
    /// transaction.
    pub async fn enqueue(
        &self,
        mut envelope: Envelope,
        body: Vec<u8>,
        mark: Option<FetchMark>,
    ) -> Result<(), CommitError> {
        let id = envelope.id;
        let waiting = self.delivery.suspend_new(&mut envelope);
        let due_now = envelope.recipients.iter().any(|r| !r.unreachable);
        let message = NewMessage { envelope, body };
        match mark {
            None => self.spool.commit(message).await?,
            Some(mark) => self.spool.commit_fetched(Some(message), mark).await?,
        }
        if !waiting.is_empty() {
            self.delivery.waiting(id, waiting);
        }
        if due_now {
            self.notify_queued();
        }
        Ok(())
    }

    /// Counts a new connection from `ip`; false if it is over its rate.
    fn within_rate(&self, ip: IpAddr) -> bool {
        let mut rate = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        rate.admit(ip, Instant::now())
    }

    /// Takes a per-address slot; `None` if the address already has its maximum.
    fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let count = map.entry(ip).or_insert(0);
        if *count >= self.max_per_ip {
            return None;
        }
        *count += 1;
        Some(IpSlot {
            inbound: self.clone(),
            ip,
        })
    }
}

/// The window of `max_connection_rate_per_ip` (Postfix's anvil counts per minute too).
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// Connections per address in fixed windows: each address's window starts with
/// its first connection and lasts `window`. Refused attempts count too, so a
/// client hammering the port stays refused until it pauses for a window.
struct RateLimit {
    max: u32,
    window: Duration,
    seen: HashMap<IpAddr, (Instant, u32)>,
}

impl RateLimit {
    /// Entries kept before expired ones are swept out.
    const SWEEP_AT: usize = 4096;

    fn new(max: u32, window: Duration) -> RateLimit {
        RateLimit {
            max,
            window,
            seen: HashMap::new(),
        }
    }

    fn admit(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.max == 0 {
            return true;
        }
        if self.seen.len() >= Self::SWEEP_AT {
            let window = self.window;
            self.seen
                .retain(|_, (start, _)| now.saturating_duration_since(*start) < window);
        }
        let entry = self.seen.entry(ip).or_insert((now, 0));
        if now.saturating_duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        entry.1 <= self.max
    }
}

/// Gives the per-address slot back when the session ends, however it ends.
struct IpSlot {
    inbound: Arc<Inbound>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self
            .inbound
            .per_ip
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = map.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Accepts connections until shutdown. Each session holds a clone of `running`;
/// the server knows all sessions ended when every clone is dropped.
pub async fn listen(
    listener: TcpListener,
    inbound: Arc<Inbound>,
    mut shutdown: Shutdown,
    running: mpsc::Sender<()>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off, don't spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.wait() => return,
        };
        // The limit is checked before anything is spawned: a flood of
        // connections beyond it costs a write and a close each, not a task.
        let Ok(slot) = inbound.slots.clone().try_acquire_owned() else {
            over_limit(stream, &inbound);
            continue;
        };
        let inbound = inbound.clone();
        let shutdown = shutdown.clone();
        let running = running.clone();
        let span = tracing::info_span!("smtp", client = %peer);
        tokio::spawn(
            async move {
                admit(stream, peer, slot, inbound, shutdown).await;
                drop(running);
            }
            .instrument(span),
        );
    }
}

/// Answers a connection beyond `max_connections` with 421 and closes it, at
/// once: the reply goes into the fresh socket's empty send buffer or not at
/// all, so nothing here waits for the client.
fn over_limit(stream: TcpStream, inbound: &Inbound) {
    let hostname = inbound.policy().hostname.clone();
    let reply = Reply::refuse(
        Rejection::Limits,
        421,
        "4.7.0",
        format!("{hostname} Error: too many connections"),
    );
    if let Some(why) = reply.rejection {
        inbound.metrics.reject(why);
    }
    let mut out = Vec::new();
    reply.write_to(&mut out);
    let _ = stream.try_write(&out);
    tracing::debug!("too many connections; refused");
}

async fn admit(
    stream: TcpStream,
    peer: SocketAddr,
    _slot: OwnedSemaphorePermit,
    inbound: Arc<Inbound>,
    shutdown: Shutdown,
) {
    let _ = stream.set_nodelay(true);
    let ip = peer.ip().to_canonical();
    // A primary that connects to us is up again (RFC 5321 §4.5.4.1).
    inbound.delivery.hint(ip);
    let hostname = inbound.policy().hostname.clone();
    if !inbound.policy().admits(ip) {
        info!("connection refused by allow/deny");
        refuse(
            stream,
            &inbound.metrics,
            Reply::refuse(
                Rejection::Access,
                554,
                "5.7.1",
                format!("{hostname} Access denied"),
            ),
        )
        .await;
        return;
    }
    if !inbound.within_rate(ip) {
        warn!("connection rate limit exceeded");
        refuse(
            stream,
            &inbound.metrics,
            Reply::refuse(
                Rejection::Limits,
                421,
                "4.7.0",
                format!(
                    "{hostname} Error: too many connections from your address; try again later"
                ),
            ),
        )
        .await;
        return;
    }
    let Some(_ip_slot) = inbound.enter(ip) else {
        warn!("too many connections from this address");
        refuse(
            stream,
            &inbound.metrics,
            Reply::refuse(
                Rejection::Limits,
                421,
                "4.7.0",
                format!("{hostname} Error: too many connections from your address"),
            ),
        )
        .await;
        return;
    };
    inbound.metrics.sessions.inc();
    let metrics = inbound.metrics.clone();
    conn::serve(stream, peer, inbound, shutdown).await;
    metrics.sessions.dec();
}

/// Says why we will not talk, without waiting long for a slow client to listen.
async fn refuse(mut stream: TcpStream, metrics: &Metrics, reply: Reply) {
    if let Some(why) = reply.rejection {
        metrics.reject(why);
    }
    let mut out = Vec::new();
    reply.write_to(&mut out);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let _ = stream.write_all(&out).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_counts_per_address_per_window() {
        let window = Duration::from_secs(60);
        let mut rate = RateLimit::new(3, window);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let t0 = Instant::now();
        assert!((0..3).all(|_| rate.admit(a, t0)));
        assert!(!rate.admit(a, t0 + Duration::from_secs(59)));
        assert!(rate.admit(b, t0), "another address has its own count");
        assert!(rate.admit(a, t0 + window), "a new window starts afresh");
    }

    #[test]
    fn zero_means_no_rate_limit() {
        let mut rate = RateLimit::new(0, Duration::from_secs(60));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let now = Instant::now();
        assert!((0..10_000).all(|_| rate.admit(a, now)));
        assert!(rate.seen.is_empty(), "nothing is tracked without a limit");
    }

    #[test]
    fn expired_entries_are_swept() {
        let window = Duration::from_secs(60);
        let mut rate = RateLimit::new(5, window);
        let t0 = Instant::now();
        for i in 0..RateLimit::SWEEP_AT as u32 {
            rate.admit(IpAddr::from(i.to_be_bytes()), t0);
        }
        let later = t0 + window;
        rate.admit("192.0.2.1".parse().unwrap(), later);
        assert_eq!(rate.seen.len(), 1, "old windows are forgotten");
    }
}
