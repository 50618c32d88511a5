//! The admin API over plain HTTP/1.1: one blocking request per command, short
//! timeouts, and every failure reduced to what the operator can act on (the
//! server is not there, or it said no and why). Knows nothing of what the
//! answers mean; the commands do.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ureq::http::Response;

/// Long enough for a busy server, short enough that a hung one does not hang
/// a script.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const TOTAL_TIMEOUT: Duration = Duration::from_secs(10);
/// `fetch now` waits for the whole run (a mailbox full of mail takes a while).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(600);
/// `health`: Docker's HEALTHCHECK wants an answer, not patience.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);
/// A listing of a full spool can be large; this only guards against garbage.
const BODY_LIMIT: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No HTTP answer at all: refused, timed out, not HTTP.
    #[error("cannot reach the server at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// An answer other than 2xx; `error` is the server's `{"error": ...}` text
    /// (or what it said instead).
    #[error("{error}")]
    Status { status: u16, error: String },
}

/// One server's admin API.
pub struct Client {
    agent: ureq::Agent,
    /// `http://host:port`, no trailing slash.
    base: String,
    token: Option<String>,
}

impl Client {
    /// `token` goes out as `Authorization: Bearer …`; without one the server
    /// says whether it wants one.
    pub fn new(listen: SocketAddr, token: Option<String>, total: Duration) -> Client {
        let agent = ureq::Agent::config_builder()
            .timeout_connect(Some(CONNECT_TIMEOUT.min(total)))
            .timeout_global(Some(total))
            // Error answers carry the reason in their body; we read it.
            .http_status_as_error(false)
            // The server is ours and near: an HTTP proxy from the environment
            // would only get in the way (and see the token).
            .proxy(None)
            .max_redirects(0)
            .user_agent(concat!("mxspool/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Client {
            agent,
            base: base_url(listen),
            token,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<String, CallError> {
        let mut request = self.agent.get(self.url(path));
        for (key, value) in query {
            request = request.query(*key, *value);
        }
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        self.finish(request.call())
    }

    /// A POST with a JSON body, or none.
    pub fn post(&self, path: &str, json: Option<&serde_json::Value>) -> Result<String, CallError> {
        let mut request = self.agent.post(self.url(path));
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let sent = match json {
            Some(body) => request
                .content_type("application/json")
                .send(body.to_string()),
            None => request.send_empty(),
        };
        self.finish(sent)
    }

    pub fn delete(&self, path: &str) -> Result<String, CallError> {
        let mut request = self.agent.delete(self.url(path));
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        self.finish(request.call())
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn finish(&self, sent: Result<Response<ureq::Body>, ureq::Error>) -> Result<String, CallError> {
        let unreachable = |e: ureq::Error| CallError::Unreachable {
            url: self.base.clone(),
            reason: reason(e),
        };
        let mut response = sent.map_err(unreachable)?;
        let status = response.status();
        let body = response
            .body_mut()
            .with_config()
            .limit(BODY_LIMIT)
            .read_to_string()
            .map_err(unreachable)?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(CallError::Status {
                status: status.as_u16(),
                error: error_text(&body).unwrap_or_else(|| format!("the server answered {status}")),
            })
        }
    }
}

/// Where to connect for a server listening on `listen`: the address itself,
/// or loopback when it listens on every address.
pub fn base_url(listen: SocketAddr) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, listen.port()))
}

/// A path segment with everything but letters, digits, `-`, `_` and `~`
/// percent-encoded, so an ID typed by hand (`..`, `x/hold`) cannot reach
/// another route.
pub fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The one line an error answer carries: `{"error": "..."}` per the API, or
/// the first line of whatever else came back (a proxy's page, a framework's
/// rejection).
fn error_text(body: &str) -> Option<String> {
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_str(body)
        && let Some(serde_json::Value::String(text)) = map.get("error")
    {
        return Some(text.trim().to_owned());
    }
    body.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(|l| super::render::truncate(&super::render::one_line(l), 200))
}

/// Why there was no answer, in the words an operator would use.
fn reason(e: ureq::Error) -> String {
    match e {
        ureq::Error::Io(e) => io_reason(&e),
        ureq::Error::Timeout(_) => "no answer in time".to_owned(),
        ureq::Error::ConnectionFailed => "connection failed".to_owned(),
        ureq::Error::Protocol(e) => format!("not an HTTP answer ({e})"),
        other => other.to_string(),
    }
}

fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        io::ErrorKind::ConnectionReset => "connection reset".to_owned(),
        io::ErrorKind::ConnectionAborted => "connection aborted".to_owned(),
        io::ErrorKind::TimedOut => "no answer in time".to_owned(),
        io::ErrorKind::UnexpectedEof => "the connection closed early".to_owned(),
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            "no route to the host".to_owned()
        }
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_listen_addresses_mean_loopback() {
        for (listen, url) in [
            ("127.0.0.1:9090", "http://127.0.0.1:9090"),
            ("0.0.0.0:9090", "http://127.0.0.1:9090"),
            ("[::]:9090", "http://[::1]:9090"),
            ("192.0.2.7:80", "http://192.0.2.7:80"),
            ("[2001:db8::1]:9090", "http://[2001:db8::1]:9090"),
        ] {
            assert_eq!(base_url(listen.parse().unwrap()), url, "{listen}");
        }
    }

    #[test]
    fn ids_stay_one_path_segment() {
        assert_eq!(segment("0KXW3J5M7P2QR"), "0KXW3J5M7P2QR");
        assert_eq!(segment(".."), "%2E%2E");
        assert_eq!(segment("x/hold"), "x%2Fhold");
        assert_eq!(segment("a b?c#d%"), "a%20b%3Fc%23d%25");
        assert_eq!(segment("é"), "%C3%A9");
    }

    #[test]
    fn error_texts() {
        assert_eq!(
            error_text(r#"{"error": "0KXW3J5M7P2QR is not held"}"#).as_deref(),
            Some("0KXW3J5M7P2QR is not held")
        );
        assert_eq!(
            error_text("\n  Failed to parse the request body as JSON\n").as_deref(),
            Some("Failed to parse the request body as JSON")
        );
        assert_eq!(error_text(""), None);
        assert_eq!(
            error_text(r#"{"other": 1}"#).as_deref(),
            Some(r#"{"other": 1}"#)
        );
    }
}
