//! MTA-STS (RFC 8461) as a sender sees it: the `_mta-sts` TXT record, the
//! policy fetched over verified HTTPS, and whether its `mx:` patterns let
//! senders use a given host. A backup the policy does not list is skipped by
//! every sender that enforces it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::route::Dns;

/// RFC 8461 §3.3: senders may refuse larger policies.
const MAX_POLICY: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Testing,
    None,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// The `mx:` patterns, lower-case: host names or `*.` plus a domain.
    pub mx: Vec<String>,
    pub max_age: u64,
}

/// What the `_mta-sts` TXT records say (RFC 8461 §3.1).
#[derive(Debug, PartialEq, Eq)]
pub enum Record {
    /// No record starting with `v=STSv1`: the domain does not use MTA-STS.
    Absent,
    /// Exactly one valid record, with its `id`.
    Valid { id: String },
    /// Several, or one that does not parse: senders act as if there were
    /// none, which the owner surely did not intend.
    Unusable(String),
}

pub fn record(txt: &[String]) -> Record {
    let sts: Vec<&String> = txt.iter().filter(|r| r.starts_with("v=STSv1")).collect();
    match sts.as_slice() {
        [] => Record::Absent,
        [one] => {
            let mut id = None;
            for field in one.split(';').map(str::trim).filter(|f| !f.is_empty()) {
                let Some((key, value)) = field.split_once('=') else {
                    return Record::Unusable(format!("field {field:?} has no '='"));
                };
                if key.trim() == "id" {
                    let value = value.trim();
                    if value.is_empty()
                        || value.len() > 32
                        || !value.bytes().all(|b| b.is_ascii_alphanumeric())
                    {
                        return Record::Unusable(format!(
                            "id {value:?} must be 1 to 32 letters and digits"
                        ));
                    }
                    id = Some(value.to_owned());
                }
            }
            match id {
                Some(id) => Record::Valid { id },
                None => Record::Unusable("no id= field".into()),
            }
        }
        many => Record::Unusable(format!("{} records start with v=STSv1", many.len())),
    }
}

/// Parses a policy file (RFC 8461 §3.2): `key: value` lines, CRLF or LF.
pub fn parse(text: &str) -> Result<Policy, String> {
    let mut version = None;
    let mut mode = None;
    let mut max_age = None;
    let mut mx = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            return Err(format!("line {line:?} is not \"key: value\""));
        };
        let value = value.trim();
        match key.trim() {
            "version" => version = Some(value.to_owned()),
            "mode" => {
                mode = Some(match value {
                    "enforce" => Mode::Enforce,
                    "testing" => Mode::Testing,
                    "none" => Mode::None,
                    other => return Err(format!("unknown mode {other:?}")),
                })
            }
            "max_age" => {
                max_age = Some(
                    value
                        .parse::<u64>()
                        .map_err(|_| format!("max_age {value:?} is not a number of seconds"))?,
                )
            }
            "mx" => mx.push(value.trim_end_matches('.').to_ascii_lowercase()),
            // Unknown keys are ignored (§3.2), for extensions.
            _ => {}
        }
    }
    if version.as_deref() != Some("STSv1") {
        return Err("no \"version: STSv1\" line".into());
    }
    let mode = mode.ok_or("no mode line")?;
    let max_age = max_age.ok_or("no max_age line")?;
    if mx.is_empty() && mode != Mode::None {
        return Err("no mx line".into());
    }
    Ok(Policy { mode, mx, max_age })
}

/// Whether an `mx:` pattern covers `host` (§4.1): exact, or `*.` standing
/// for exactly one leftmost label.
pub fn matches(pattern: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(parent) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
        None => host == pattern,
    }
}

/// Fetches `https://mta-sts.DOMAIN/.well-known/mta-sts.txt` as a sender
/// does: the name resolved through `dns`, the certificate verified by
/// `tls`, no redirects followed, only a 200 taken.
pub async fn fetch(
    dns: &Dns,
    domain: &str,
    port: u16,
    tls: Arc<ClientConfig>,
    timeout: Duration,
) -> Result<String, String> {
    let host = format!("mta-sts.{domain}");
    let ips = dns.ips(&host).await.map_err(|e| e.to_string())?;
    if ips.is_empty() {
        return Err(format!("{host} has no address"));
    }
    let mut last = String::new();
    for ip in ips {
        let addr = SocketAddr::new(ip, port);
        match tokio::time::timeout(timeout, get(addr, &host, tls.clone())).await {
            Ok(Ok(text)) => return Ok(text),
            Ok(Err(e)) => last = format!("https://{host}:{port} ({ip}): {e}"),
            Err(_) => last = format!("https://{host}:{port} ({ip}): timed out"),
        }
    }
    Err(last)
}

async fn get(addr: SocketAddr, host: &str, tls: Arc<ClientConfig>) -> Result<String, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let name = ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
    let stream = TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let driver = tokio::spawn(connection);
    let request = hyper::Request::get("/.well-known/mta-sts.txt")
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, "mxspool-doctor")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let status = response.status();
    if !status.is_success() || status.as_u16() != 200 {
        driver.abort();
        let hint = if status.is_redirection() {
            " (senders do not follow redirects)"
        } else {
            ""
        };
        return Err(format!("HTTP {status}{hint}"));
    }
    let body = Limited::new(response.into_body(), MAX_POLICY)
        .collect()
        .await
        .map_err(|e| format!("reading the policy: {e}"))?
        .to_bytes();
    driver.abort();
    String::from_utf8(body.to_vec()).map_err(|_| "the policy is not UTF-8 text".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(matches("mx2.example.net", "MX2.example.net."));
        assert!(matches("*.example.net", "mx2.example.net"));
        assert!(!matches("*.example.net", "a.mx2.example.net"));
        assert!(!matches("*.example.net", "example.net"));
        assert!(!matches("mx1.example.net", "mx2.example.net"));
        assert!(!matches("*.example.net", ".example.net"));
    }

    #[test]
    fn policies() {
        let policy =
            parse("version: STSv1\r\nmode: enforce\r\nmx: mx1.example.com\r\nmx: *.Example.NET\r\nmax_age: 86400\r\n")
                .unwrap();
        assert_eq!(policy.mode, Mode::Enforce);
        assert_eq!(policy.mx, ["mx1.example.com", "*.example.net"]);
        assert_eq!(policy.max_age, 86400);
        let none = parse("version: STSv1\nmode: none\nmax_age: 1\n").unwrap();
        assert_eq!(none.mode, Mode::None);
        for bad in [
            "mode: enforce\nmx: a\nmax_age: 1\n",
            "version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n",
            "version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: a\n",
            "version: STSv1\nmode: enforce\nmx: a\nmax_age: soon\n",
            "<html>not a policy</html>",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn txt_records() {
        let txt = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(record(&txt(&["v=spf1 -all"])), Record::Absent);
        assert_eq!(
            record(&txt(&["v=STSv1; id=20260101T000000;", "other"])),
            Record::Valid {
                id: "20260101T000000".into()
            }
        );
        assert!(matches!(
            record(&txt(&["v=STSv1; id=1", "v=STSv1; id=2"])),
            Record::Unusable(_)
        ));
        assert!(matches!(record(&txt(&["v=STSv1;"])), Record::Unusable(_)));
        assert!(matches!(
            record(&txt(&["v=STSv1; id=not-alnum"])),
            Record::Unusable(_)
        ));
    }
}
