//! Continuous primary health checks (`delivery.health_interval`): every
//! relay domain's primary (its better MX hosts, or its `route`) is checked
//! with connect, EHLO, QUIT whether or not mail waits for it, so
//! `mxspool_primary_up` always means "the last check succeeded" and
//! admission (`when_primary_up`) can trust it. Checks are spread over the
//! interval, and domains whose primary is the same set of hosts share one
//! check. Each result goes to the scheduler as [`Event::Checked`]; the
//! scheduler acts on it (marks the primary down or releases its mail) and
//! reports it to health.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::Event;
use super::worker::Ctx;
use crate::outbound::{self, Hop};
use crate::route::{Destinations, RouteError};
use crate::shutdown::Shutdown;

/// Checks every relay domain's primary every `every` until shutdown.
pub(super) async fn run(
    ctx: Arc<Ctx>,
    dests: Arc<Destinations>,
    every: Duration,
    mut shutdown: Shutdown,
) {
    let domains: Vec<Arc<str>> = dests.relay.names().map(Arc::from).collect();
    if domains.is_empty() {
        return;
    }
    loop {
        let round = async {
            for group in groups(&ctx, &dests, &domains).await {
                check(&ctx, &dests, group).await;
                // Spread over the interval: a thousand domains are a thousand
                // checks per interval, not a burst.
                tokio::time::sleep(every / domains.len() as u32).await;
            }
        };
        let started = tokio::time::Instant::now();
        tokio::select! {
            () = shutdown.wait() => return,
            () = round => {}
        }
        tokio::select! {
            () = shutdown.wait() => return,
            () = tokio::time::sleep_until(started + every) => {}
        }
    }
}

/// The domains of one check: those whose primary is the same hosts.
struct Group {
    domains: Vec<Arc<str>>,
    /// The hosts to try in order, or why the domain cannot be routed.
    hops: Result<Vec<Hop>, RouteError>,
}

/// Resolves each domain's primary and groups domains that share one.
async fn groups(ctx: &Ctx, dests: &Destinations, domains: &[Arc<str>]) -> Vec<Group> {
    let mut by_hosts: BTreeMap<Vec<SocketAddr>, Group> = BTreeMap::new();
    let mut alone = Vec::new();
    for domain in domains {
        let dest = dests.get(domain);
        match ctx.router.hops(domain, dest.route.as_ref()).await {
            Ok(hops) => {
                let key: Vec<SocketAddr> = hops.iter().map(|h| h.addr).collect();
                by_hosts
                    .entry(key)
                    .or_insert_with(|| Group {
                        domains: Vec::new(),
                        hops: Ok(hops),
                    })
                    .domains
                    .push(domain.clone());
            }
            Err(e) => alone.push(Group {
                domains: vec![domain.clone()],
                hops: Err(e),
            }),
        }
    }
    by_hosts.into_values().chain(alone).collect()
}

/// Connects to the group's hosts in order until one greets and answers
/// EHLO; tells the scheduler the result for each of its domains. A loop
/// (we are the best MX) says nothing about a primary: not reported.
async fn check(ctx: &Ctx, dests: &Destinations, group: Group) {
    let Some(first) = group.domains.first() else {
        return;
    };
    let verdict = match &group.hops {
        Err(RouteError::Loop) => return,
        Err(e) => Err(e.to_string()),
        Ok(hops) => {
            let settings = &dests.get(first).settings;
            let mut last = Err("no host to check".to_owned());
            for hop in hops {
                match outbound::probe(hop, settings).await {
                    Ok(()) => {
                        last = Ok(format!("{} [{}]", hop.name, hop.addr));
                        break;
                    }
                    Err(e) => last = Err(format!("{} [{}]: {e}", hop.name, hop.addr)),
                }
            }
            last
        }
    };
    for domain in group.domains {
        let _ = ctx.events.send(Event::Checked {
            domain,
            answer: verdict.clone(),
        });
    }
}
