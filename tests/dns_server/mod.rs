//! A real DNS server for tests: answers UDP and TCP queries on a loopback port
//! from an in-memory zone that tests change while it runs. Records carry TTL 0
//! (unless a test sets another) so a resolver sees every change at once.
//! Names under a silent zone get no answer at all, as from a dead server.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::tlsa::{CertUsage, Matching, Selector};
use hickory_proto::rr::rdata::{A, AAAA, MX, SOA, TLSA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

/// A TLSA record's fields: usage, selector, matching type, data.
pub type Tlsa = (u8, u8, u8, Vec<u8>);

#[derive(Default)]
struct Zone {
    mx: HashMap<String, Vec<(u16, String)>>,
    ips: HashMap<String, Vec<IpAddr>>,
    txt: HashMap<String, Vec<String>>,
    tlsa: HashMap<String, Vec<Tlsa>>,
    /// Names that exist without records of their own (NODATA, not NXDOMAIN).
    exists: HashSet<String>,
    servfail: HashSet<String>,
    /// Zones whose names are never answered (the query is dropped).
    silent: HashSet<String>,
    /// TTL of the records served.
    ttl: u32,
    queries: Vec<(String, RecordType)>,
}

#[derive(Clone)]
pub struct TestDns {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_lowercase()
}

impl TestDns {
    pub async fn start() -> TestDns {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
        let addr = udp.local_addr().unwrap();
        // TCP on the same port, for resolvers that retry over TCP.
        let tcp = TcpListener::bind(addr).await.ok();
        let zone = Arc::new(Mutex::new(Zone::default()));
        let z = zone.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                    return;
                };
                if let Some(reply) = answer(&z, &buf[..n]) {
                    let _ = udp.send_to(&reply, from).await;
                }
            }
        });
        if let Some(tcp) = tcp {
            let z = zone.clone();
            tokio::spawn(async move {
                while let Ok((mut stream, _)) = tcp.accept().await {
                    let z = z.clone();
                    tokio::spawn(async move {
                        loop {
                            let mut len = [0u8; 2];
                            if stream.read_exact(&mut len).await.is_err() {
                                return;
                            }
                            let mut query = vec![0u8; u16::from_be_bytes(len) as usize];
                            if stream.read_exact(&mut query).await.is_err() {
                                return;
                            }
                            let Some(reply) = answer(&z, &query) else {
                                return;
                            };
                            let mut out = (reply.len() as u16).to_be_bytes().to_vec();
                            out.extend_from_slice(&reply);
                            if stream.write_all(&out).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            });
        }
        TestDns { addr, zone }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Zone) -> R) -> R {
        f(&mut self.zone.lock().unwrap())
    }

    /// Replaces the MX set of `domain`; an empty slice leaves the name existing
    /// without MX records (NODATA: delivery falls back to its A/AAAA).
    pub fn set_mx(&self, domain: &str, records: &[(u16, &str)]) {
        self.with(|z| {
            z.exists.insert(key(domain));
            z.mx.insert(
                key(domain),
                records.iter().map(|(p, e)| (*p, key(e))).collect(),
            );
        });
    }

    /// RFC 7505: one MX record, preference 0, exchange ".".
    pub fn set_null_mx(&self, domain: &str) {
        self.with(|z| {
            z.exists.insert(key(domain));
            z.mx.insert(key(domain), vec![(0, String::new())]);
        });
    }

    pub fn set_ips(&self, name: &str, ips: &[IpAddr]) {
        self.with(|z| {
            z.exists.insert(key(name));
            z.ips.insert(key(name), ips.to_vec());
        });
    }

    /// Replaces the TXT records of `name` (one string each).
    pub fn set_txt(&self, name: &str, records: &[&str]) {
        self.with(|z| {
            z.exists.insert(key(name));
            z.txt
                .insert(key(name), records.iter().map(|r| r.to_string()).collect());
        });
    }

    /// Replaces the TLSA records of `name`: (usage, selector, matching, data).
    pub fn set_tlsa(&self, name: &str, records: &[Tlsa]) {
        self.with(|z| {
            z.exists.insert(key(name));
            z.tlsa.insert(key(name), records.to_vec());
        });
    }

    pub fn set_servfail(&self, name: &str, on: bool) {
        self.with(|z| {
            if on {
                z.servfail.insert(key(name));
            } else {
                z.servfail.remove(&key(name));
            }
        });
    }

    /// Names in `zone` (and `zone` itself) get no answer from now on.
    pub fn set_silent(&self, zone: &str) {
        self.with(|z| {
            z.silent.insert(key(zone));
        });
    }

    /// The TTL of the records served from now on (0 unless set).
    pub fn set_ttl(&self, seconds: u32) {
        self.with(|z| z.ttl = seconds);
    }

    /// Forgets the name: NXDOMAIN from now on.
    pub fn remove(&self, name: &str) {
        self.with(|z| {
            let k = key(name);
            z.exists.remove(&k);
            z.mx.remove(&k);
            z.ips.remove(&k);
            z.txt.remove(&k);
            z.tlsa.remove(&k);
        });
    }

    /// How many queries of `kind` asked about `name` so far.
    pub fn queries(&self, name: &str, kind: RecordType) -> usize {
        self.with(|z| {
            z.queries
                .iter()
                .filter(|(n, t)| *n == key(name) && *t == kind)
                .count()
        })
    }
}

fn answer(zone: &Mutex<Zone>, query: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let question = request.queries.first()?.clone();
    let qname = question.name().clone();
    let name = key(&qname.to_ascii());
    let kind = question.query_type();
    let mut response = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.authoritative = true;
    response.add_query(question);
    let mut z = zone.lock().unwrap();
    z.queries.push((name.clone(), kind));
    if z.silent
        .iter()
        .any(|zone| name == *zone || name.ends_with(&format!(".{zone}")))
    {
        return None;
    }
    let ttl = z.ttl;
    if z.servfail.contains(&name) {
        response.metadata.response_code = ResponseCode::ServFail;
        return response.to_vec().ok();
    }
    if !z.exists.contains(&name) {
        response.metadata.response_code = ResponseCode::NXDomain;
        response.add_authority(soa());
        return response.to_vec().ok();
    }
    let mut answers = Vec::new();
    match kind {
        RecordType::MX => {
            for (pref, exchange) in z.mx.get(&name).into_iter().flatten() {
                let exchange = if exchange.is_empty() {
                    Name::root()
                } else {
                    Name::from_ascii(format!("{exchange}.")).ok()?
                };
                answers.push(Record::from_rdata(
                    qname.clone(),
                    ttl,
                    RData::MX(MX::new(*pref, exchange)),
                ));
            }
        }
        RecordType::A | RecordType::AAAA => {
            for ip in z.ips.get(&name).into_iter().flatten() {
                let data = match (ip, kind) {
                    (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
                    (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
                    _ => continue,
                };
                answers.push(Record::from_rdata(qname.clone(), ttl, data));
            }
        }
        RecordType::TXT => {
            for text in z.txt.get(&name).into_iter().flatten() {
                let data = RData::TXT(TXT::new(vec![text.clone()]));
                answers.push(Record::from_rdata(qname.clone(), ttl, data));
            }
        }
        RecordType::TLSA => {
            for (usage, selector, matching, data) in z.tlsa.get(&name).into_iter().flatten() {
                let data = RData::TLSA(TLSA::new(
                    CertUsage::from(*usage),
                    Selector::from(*selector),
                    Matching::from(*matching),
                    data.clone(),
                ));
                answers.push(Record::from_rdata(qname.clone(), ttl, data));
            }
        }
        _ => {}
    }
    if answers.is_empty() {
        response.add_authority(soa());
    }
    for a in answers {
        response.add_answer(a);
    }
    response.to_vec().ok()
}

/// The SOA that goes with negative answers; its minimum (0) is the negative TTL.
fn soa() -> Record {
    let zone = Name::from_ascii("test.").unwrap();
    Record::from_rdata(
        zone.clone(),
        0,
        RData::SOA(SOA::new(
            Name::from_ascii("ns.test.").unwrap(),
            Name::from_ascii("hostmaster.test.").unwrap(),
            1,
            60,
            60,
            60,
            0,
        )),
    )
}
