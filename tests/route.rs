//! The router against a real DNS server on loopback.

mod dns_server;

use std::net::{IpAddr, SocketAddr};

use dns_server::TestDns;
use mxspool::config::{Route, RouteHost};
use mxspool::route::{Identity, RouteError, Router};

const PORT: u16 = 2525;

async fn setup() -> (TestDns, Router) {
    let dns = TestDns::start().await;
    let router = Router::new(
        &[dns.addr],
        Identity {
            names: vec!["mx2.example.net".into()],
        },
        PORT,
    )
    .unwrap();
    (dns, router)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn addrs(hops: &[mxspool::route::Hop]) -> Vec<SocketAddr> {
    hops.iter().map(|h| h.addr).collect()
}

#[tokio::test]
async fn the_primary_below_us_is_the_only_hop() {
    let (dns, router) = setup().await;
    dns.set_mx(
        "example.com",
        &[
            (10, "mx1.example.com"),
            (20, "mx2.example.net"),
            (30, "mx3.example.com"),
        ],
    );
    dns.set_ips("mx1.example.com", &[ip("127.0.0.11"), ip("::1")]);
    dns.set_ips("mx3.example.com", &[ip("127.0.0.13")]);
    let hops = router.hops("example.com", None).await.unwrap();
    let mut got = addrs(&hops);
    got.sort();
    assert_eq!(
        got,
        vec![
            "127.0.0.11:2525".parse().unwrap(),
            "[::1]:2525".parse().unwrap()
        ]
    );
    assert!(hops.iter().all(|h| h.name == "mx1.example.com"));
}

#[tokio::test]
async fn being_the_best_mx_is_a_loop() {
    let (dns, router) = setup().await;
    dns.set_mx(
        "example.com",
        &[(10, "mx2.example.net"), (20, "mx3.example.com")],
    );
    dns.set_ips("mx3.example.com", &[ip("127.0.0.13")]);
    assert_eq!(
        router.hops("example.com", None).await,
        Err(RouteError::Loop)
    );
}

#[tokio::test]
async fn no_mx_falls_back_to_the_domains_address() {
    let (dns, router) = setup().await;
    dns.set_mx("example.org", &[]);
    dns.set_ips("example.org", &[ip("127.0.0.20")]);
    let hops = router.hops("example.org", None).await.unwrap();
    assert_eq!(addrs(&hops), vec!["127.0.0.20:2525".parse().unwrap()]);
}

#[tokio::test]
async fn null_mx_and_nxdomain_are_permanent_servfail_is_not() {
    let (dns, router) = setup().await;
    dns.set_null_mx("nomail.test");
    let e = router.hops("nomail.test", None).await.unwrap_err();
    assert_eq!(e, RouteError::NullMx);
    assert!(e.is_permanent());

    let e = router.hops("nowhere.test", None).await.unwrap_err();
    assert_eq!(e, RouteError::NoSuchDomain);
    assert!(e.is_permanent());

    dns.set_mx("flaky.test", &[(10, "mx.flaky.test")]);
    dns.set_servfail("flaky.test", true);
    let e = router.hops("flaky.test", None).await.unwrap_err();
    assert!(matches!(e, RouteError::Dns(_)), "{e:?}");
    assert!(!e.is_permanent());
}

#[tokio::test]
async fn better_mx_without_address_defers() {
    let (dns, router) = setup().await;
    dns.set_mx(
        "example.com",
        &[(10, "mx1.example.com"), (20, "mx2.example.net")],
    );
    dns.set_mx("mx1.example.com", &[]);
    let e = router.hops("example.com", None).await.unwrap_err();
    assert_eq!(e, RouteError::NoAddresses);
    assert_eq!(e.status().to_string(), "4.4.4");
}

#[tokio::test]
async fn static_routes_skip_the_mx_lookup() {
    let (dns, router) = setup().await;
    dns.set_mx("example.com", &[(10, "mx1.example.com")]);
    dns.set_ips("mx1.example.com", &[ip("127.0.0.11")]);
    dns.set_ips("relay.example.net", &[ip("127.0.0.99")]);

    let by_ip = Route {
        host: RouteHost::Ip(ip("127.0.0.50")),
        port: 26,
    };
    let hops = router.hops("example.com", Some(&by_ip)).await.unwrap();
    assert_eq!(addrs(&hops), vec!["127.0.0.50:26".parse().unwrap()]);

    let by_name = Route {
        host: RouteHost::Name("relay.example.net".into()),
        port: 27,
    };
    let hops = router.hops("example.com", Some(&by_name)).await.unwrap();
    assert_eq!(addrs(&hops), vec!["127.0.0.99:27".parse().unwrap()]);
    assert_eq!(
        dns.queries("example.com", hickory_proto::rr::RecordType::MX),
        0
    );
}

#[tokio::test]
async fn zone_changes_are_seen() {
    let (dns, router) = setup().await;
    dns.set_mx("example.com", &[(10, "mx1.example.com")]);
    dns.set_ips("mx1.example.com", &[ip("127.0.0.11")]);
    assert_eq!(
        addrs(&router.hops("example.com", None).await.unwrap()),
        vec!["127.0.0.11:2525".parse().unwrap()]
    );
    dns.set_ips("mx1.example.com", &[ip("127.0.0.12")]);
    assert_eq!(
        addrs(&router.hops("example.com", None).await.unwrap()),
        vec!["127.0.0.12:2525".parse().unwrap()]
    );
    assert_eq!(
        router.addresses("example.com", None).await.unwrap(),
        vec![ip("127.0.0.12")]
    );
}
