//! (7) HTTP: the web console at `/` (`console`), `/healthz`, `/readyz`,
//! `/metrics`, and the admin API under `/api`
//! (see docs/api.md), every route of which passes the token check
//! ([`api::require_token`]: the bearer token, or a console session's cookie
//! on a same-origin request) first. Handlers are thin: they read the spool, ask the
//! scheduler, and turn results into JSON. Nothing here changes mail itself
//! except through the spool's and the scheduler's own operations.

mod api;
mod console;
pub mod session;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::{Router, middleware};
use tokio::net::TcpListener;

use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::scheduler;
use crate::shutdown::Shutdown;
use crate::spool::Spool;

/// The admin token: compared in constant time, never printed.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    pub fn new(text: &str) -> Option<Token> {
        let t = text.trim();
        (!t.is_empty()).then(|| Token(t.to_owned()))
    }

    /// Whether `offered` is the token; the time taken does not depend on
    /// where the two differ.
    pub fn matches(&self, offered: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), offered.as_bytes());
        let mut diff = a.len() ^ b.len();
        for (i, x) in a.iter().enumerate() {
            diff |= usize::from(x ^ b.get(i).copied().unwrap_or(!x));
        }
        diff == 0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<hidden>)")
    }
}

/// What the handlers share.
pub struct AppState {
    pub spool: Spool,
    pub metrics: Arc<Metrics>,
    pub delivery: scheduler::Handle,
    /// `None`: no `admin_token_file`, the API answers 403.
    pub token: Option<Token>,
    /// Spool open and SMTP listeners bound; cleared when shutting down.
    pub ready: Arc<AtomicBool>,
    /// Ages and release times are read from the delivery clock.
    pub clock: Clock,
    /// The mailbox fetch tasks, for `POST /api/fetch/{name}`.
    pub fetchers: crate::fetch::Fetchers,
    /// The web console's signed-in sessions.
    pub sessions: Arc<session::Sessions>,
}

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/api/queue", get(api::list))
        .route("/api/queue/flush", post(api::flush))
        .route("/api/queue/{id}", get(api::show).delete(api::delete))
        .route("/api/queue/{id}/hold", post(api::hold))
        .route("/api/queue/{id}/release", post(api::release))
        .route("/api/queue/{id}/bounce", post(api::bounce))
        .route("/api/dead", get(api::dead_list))
        .route("/api/dead/{id}/requeue", post(api::dead_requeue))
        .route("/api/dead/{id}", delete(api::dead_delete))
        .route("/api/domains", get(api::domains))
        .route("/api/domains/{domain}/pause", post(api::pause_domain))
        .route("/api/domains/{domain}/resume", post(api::resume_domain))
        .route("/api/fetch/{name}", post(api::fetch_now))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            api::require_token,
        ));
    Router::new()
        .route(
            "/api/session",
            get(api::session_state)
                .post(api::sign_in)
                .delete(api::sign_out),
        )
        .route("/", get(console::index))
        .route("/console.js", get(console::script))
        .route("/console.css", get(console::style))
        .route("/favicon.svg", get(console::icon))
        .route("/favicon.ico", get(console::icon))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(api)
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .with_state(state)
}

/// Serves until shutdown.
pub async fn serve(listener: TcpListener, state: Arc<AppState>, mut shutdown: Shutdown) {
    let app = router(state);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "HTTP server failed");
    }
}

async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let text = state
        .metrics
        .render(&state.spool.gauges(), state.clock.now_ms());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        let t = Token::new(" s3cret\n").unwrap();
        assert!(t.matches("s3cret"));
        for wrong in ["", "s3cre", "s3crett", "S3cret", "x3cret"] {
            assert!(!t.matches(wrong), "{wrong}");
        }
        assert!(Token::new("  \n").is_none());
        assert_eq!(format!("{t:?}"), "Token(<hidden>)");
    }
}
