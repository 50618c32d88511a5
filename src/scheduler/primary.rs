//! A destination's primary: marked down when it cannot be reached (its mail
//! then waits without attempts), probed while mail waits for it, and marked
//! up on the first sign of life (a delivery, a probe, or its own connection
//! to us), which releases what waited. The probe only connects; it never
//! delivers.

use std::net::IpAddr;
use std::sync::Arc;

use tracing::{info, warn};

use super::{Event, Scheduler};
use crate::outbound;
use crate::spool::QueueId;

impl Scheduler {
    /// An attempt could not reach the primary: its mail waits from now on,
    /// and its addresses are learned so that its own connection is known.
    pub(super) fn mark_down(&mut self, domain: &Arc<str>, reason: String) {
        let Some(state) = self.domains.get_mut(domain) else {
            return;
        };
        if state.down.is_none() {
            warn!(%domain, %reason, "primary unreachable; probing every {:?}", self.probe_interval);
            state.down = Some(reason.clone());
            // What was still to be handed over waits for the next return.
            let backlog = std::mem::take(&mut state.backlog);
            state.waiting.extend(backlog);
            // When it comes back, start slowly again.
            state.restart_slowly();
            self.publish(domain, false, Some(&reason));
            // Learn its addresses so an inbound connection from it is recognised.
            let ctx = self.ctx.clone();
            let route = self.destination(domain).route.clone();
            let domain = domain.clone();
            self.tasks.spawn(async move {
                if let Ok(ips) = ctx.router.addresses(&domain, route.as_ref()).await {
                    let _ = ctx.events.send(Event::PrimaryAddresses { domain, ips });
                }
            });
        }
    }

    /// The primary answered: release everything that waited for it.
    pub(super) fn mark_up(&mut self, domain: &Arc<str>, host: Option<&str>) {
        let Some(state) = self.domains.get_mut(domain) else {
            return;
        };
        // Published even if nothing was marked down: an ETRN or flush may have
        // cleared the mark to let a connection be tried.
        state.down = None;
        state.looping = false;
        state.primary_ips.clear();
        let waiting: Vec<QueueId> = state.waiting.drain().collect();
        self.publish(domain, true, host);
        if waiting.is_empty() {
            return;
        }
        info!(%domain, messages = waiting.len(), "releasing mail that waited for the primary");
        // In arrival order, straight to delivery (see `DomainState::backlog`):
        // a million waiting messages are not each rewritten first.
        if let Some(state) = self.domains.get_mut(domain) {
            state.backlog.extend(waiting);
        }
        self.rescan_soon(std::time::Duration::ZERO);
    }

    /// A health check's result: a primary that answers again releases what
    /// waited for it; one that stopped answering is marked down, so new mail
    /// waits for it instead of trying; either way health hears of it.
    pub(super) fn checked(&mut self, domain: &Arc<str>, answer: Result<String, String>) {
        let was_down = self.domains.get(domain).is_some_and(|s| s.down.is_some());
        match answer {
            Ok(host) if was_down => self.mark_up(domain, Some(&host)),
            Ok(host) => self.publish(domain, true, Some(&host)),
            Err(reason) if was_down => self.publish(domain, false, Some(&reason)),
            Err(reason) => {
                self.domain(domain);
                self.mark_down(domain, reason);
            }
        }
    }

    /// A client connected from `ip`: if it is a down primary, probe it now.
    pub(super) fn hint(&mut self, ip: IpAddr) {
        let ip = ip.to_canonical();
        let matching: Vec<Arc<str>> = self
            .domains
            .iter()
            .filter(|(_, s)| s.down.is_some() && s.primary_ips.contains(&ip))
            .map(|(d, _)| d.clone())
            .collect();
        for domain in matching {
            info!(%domain, %ip, "the primary connected to us; probing it now");
            self.probe(&domain);
        }
    }

    /// The probe tick: every down primary that mail waits for, unless a
    /// probe is under way.
    pub(super) fn probe_down_domains(&mut self) {
        let due: Vec<Arc<str>> = self
            .domains
            .iter()
            .filter(|(_, s)| s.down.is_some() && !s.waiting.is_empty() && !s.probing)
            .map(|(d, _)| d.clone())
            .collect();
        for domain in due {
            self.probe(&domain);
        }
    }

    /// Connects to the primary's hops until one answers, in the background,
    /// and reports [`Event::Probed`].
    fn probe(&mut self, domain: &Arc<str>) {
        let dest = self.destination(domain);
        let Some(state) = self.domains.get_mut(domain) else {
            return;
        };
        if state.probing {
            return;
        }
        state.probing = true;
        let ctx = self.ctx.clone();
        let domain = domain.clone();
        self.tasks.spawn(async move {
            let mut up = false;
            if let Ok(hops) = ctx.router.hops(&domain, dest.route.as_ref()).await {
                for hop in &hops {
                    match outbound::probe(hop, &dest.settings).await {
                        Ok(()) => {
                            up = true;
                            break;
                        }
                        Err(e) => {
                            tracing::debug!(%domain, hop = %hop.name, error = %e, "probe failed")
                        }
                    }
                }
            }
            let _ = ctx.events.send(Event::Probed { domain, up });
        });
    }
}
