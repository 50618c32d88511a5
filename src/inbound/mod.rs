//! (1) SMTP in: accept connections, hold SMTP conversations, and hand finished
//! messages to the spool. Inbound never resolves DNS and never delivers.
//!
//! - `policy.rs`: relay domains, recipient lists, connection lists, limits.
//! - `session.rs`: the pure SMTP state machine.
//! - `data.rs`: the DATA byte filter (end of data, dot-stuffing, line endings).
//! - `received.rs`: our `Received:` trace field.
//! - `conn.rs`: the async shell for one connection.
//! - this file: the accept loop and connection limits.

pub mod conn;
pub mod data;
pub mod policy;
pub mod received;
pub mod reply;
pub mod session;
pub mod tls;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;

use crate::metrics::Metrics;
use crate::scheduler;
use tracing::{Instrument, info, warn};

use crate::shutdown::Shutdown;
use crate::spool::Spool;
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
    /// The delivery side: told about new mail, ETRN, and who connects.
    delivery: scheduler::Handle,
    pub metrics: Arc<Metrics>,
    /// Wakes the delivery side when new mail is committed.
    queued: Arc<Notify>,
}

/// Connection caps, fixed at startup (a change needs a restart).
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
}

impl Inbound {
    pub fn new(
        spool: Spool,
        policy: Policy,
        limits: Limits,
        tls: Option<TlsAcceptor>,
        delivery: scheduler::Handle,
        metrics: Arc<Metrics>,
    ) -> Inbound {
        let queued = delivery.queued();
        Inbound {
            spool,
            policy: RwLock::new(Arc::new(policy)),
            tls: RwLock::new(tls),
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            per_ip: Mutex::new(HashMap::new()),
            max_per_ip: limits.max_connections_per_ip,
            delivery,
            metrics,
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
        let inbound = inbound.clone();
        let shutdown = shutdown.clone();
        let running = running.clone();
        let span = tracing::info_span!("smtp", client = %peer);
        tokio::spawn(
            async move {
                admit(stream, peer, inbound, shutdown).await;
                drop(running);
            }
            .instrument(span),
        );
    }
}

async fn admit(stream: TcpStream, peer: SocketAddr, inbound: Arc<Inbound>, shutdown: Shutdown) {
    let _ = stream.set_nodelay(true);
    let ip = peer.ip().to_canonical();
    // A primary that connects to us is up again (RFC 5321 §4.5.4.1).
    inbound.delivery.hint(ip);
    let hostname = inbound.policy().hostname.clone();
    if !inbound.policy().admits(ip) {
        info!("connection refused by allow/deny");
        inbound.metrics.reject("access");
        refuse(
            stream,
            Reply::new(554, "5.7.1", format!("{hostname} Access denied")),
        )
        .await;
        return;
    }
    let Ok(_slot): Result<OwnedSemaphorePermit, _> = inbound.slots.clone().try_acquire_owned()
    else {
        warn!("too many connections");
        inbound.metrics.reject("limits");
        refuse(
            stream,
            Reply::new(
                421,
                "4.7.0",
                format!("{hostname} Error: too many connections"),
            ),
        )
        .await;
        return;
    };
    let Some(_ip_slot) = inbound.enter(ip) else {
        warn!("too many connections from this address");
        inbound.metrics.reject("limits");
        refuse(
            stream,
            Reply::new(
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
async fn refuse(mut stream: TcpStream, reply: Reply) {
    let mut out = Vec::new();
    reply.write_to(&mut out);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let _ = stream.write_all(&out).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
