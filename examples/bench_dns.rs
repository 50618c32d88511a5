//! A DNS server on loopback for `benches/admission.sh`: the tests' in-memory
//! server (tests/dns_server), answering every DNS list query with NXDOMAIN
//! (nobody listed: the cost measured is the lookups', not a refusal's), and
//! the bench sender's domain `origin.test` with an SPF record that passes
//! mail from 127.0.0.1. Prints its address, then serves until killed.

#[path = "../tests/dns_server/mod.rs"]
mod dns_server;

use std::io::Write;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let dns = dns_server::TestDns::start().await;
    // As public lists do: answers (and NXDOMAIN) may be cached a while.
    dns.set_ttl(300);
    dns.set_txt("origin.test", &["v=spf1 ip4:127.0.0.1 -all"]);
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{}", dns.addr);
    let _ = out.flush();
    std::future::pending::<()>().await;
}
