//! Sessions of the web console: signing in with the admin token gives a
//! random session ID in an `HttpOnly`, `SameSite=Strict` cookie, which `/api`
//! accepts besides the bearer token. Kept in memory (a restart signs
//! everyone out), each for [`LIFETIME`], at most [`MAX_SESSIONS`] at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// The cookie's name.
pub const COOKIE: &str = "mxspool_session";
/// How long a session lasts after sign-in.
pub const LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at once; beyond, the oldest goes.
const MAX_SESSIONS: usize = 1000;

#[derive(Default)]
pub struct Sessions {
    /// Session ID -> expiry (Unix ms).
    live: Mutex<HashMap<String, u64>>,
}

impl Sessions {
    /// A new session, valid until `now_ms` + [`LIFETIME`]; its ID.
    pub fn create(&self, now_ms: u64) -> Option<String> {
        let mut bytes = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).ok()?;
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|_, expires| *expires > now_ms);
        if live.len() >= MAX_SESSIONS
            && let Some(oldest) = live.iter().min_by_key(|(_, e)| **e).map(|(k, _)| k.clone())
        {
            live.remove(&oldest);
        }
        live.insert(id.clone(), now_ms + LIFETIME.as_millis() as u64);
        Some(id)
    }

    pub fn is_valid(&self, id: &str, now_ms: u64) -> bool {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.get(id).is_some_and(|expires| *expires > now_ms)
    }

    pub fn end(&self, id: &str) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.remove(id);
    }
}

/// The session ID in a `Cookie:` header value, if any.
pub fn from_cookie_header(value: &str) -> Option<&str> {
    value
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, id)| id.trim())
        .filter(|id| !id.is_empty())
}

/// The `Set-Cookie:` value that signs in with `id`.
pub fn set_cookie(id: &str) -> String {
    format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        LIFETIME.as_secs()
    )
}

/// The `Set-Cookie:` value that signs out.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_end_and_stay_bounded() {
        let s = Sessions::default();
        let a = s.create(0).unwrap();
        assert_eq!(a.len(), 64);
        assert!(s.is_valid(&a, 1));
        assert!(!s.is_valid(&a, LIFETIME.as_millis() as u64));
        assert!(!s.is_valid("forged", 1));
        let b = s.create(0).unwrap();
        assert_ne!(a, b);
        s.end(&b);
        assert!(!s.is_valid(&b, 1));
        for i in 0..(MAX_SESSIONS as u64 + 5) {
            s.create(1 + i).unwrap();
        }
        assert!(s.live.lock().unwrap().len() <= MAX_SESSIONS);
    }

    #[test]
    fn cookies_are_read_and_written() {
        assert_eq!(
            from_cookie_header("a=1; mxspool_session=abc; b=2"),
            Some("abc")
        );
        assert_eq!(from_cookie_header("mxspool_session="), None);
        assert_eq!(from_cookie_header("other=1"), None);
        let set = set_cookie("abc");
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"));
        assert!(clear_cookie().contains("Max-Age=0"));
    }
}
