//! The admin API's handlers (docs/api.md), behind [`require_token`]: call the spool or the
//! scheduler, answer JSON. Spool reads run on the blocking pool.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{AppState, Token, session};
use crate::address::domain_of;
use crate::domain::Domain;
use crate::metrics::Metrics;
use crate::scheduler::guard::PauseError;
use crate::scheduler::{DomainError, DomainStatus};
use crate::spool::{
    Change, CommitError, Envelope, Notify, PARKED, PausedBy, QueueId, RcptStatus, Ret,
};

/// An error answer: a status and one line of text.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

fn from_commit(e: CommitError) -> ApiError {
    match e {
        CommitError::Full => ApiError(StatusCode::INSUFFICIENT_STORAGE, e.to_string()),
        _ => internal(e),
    }
}

/// Middleware for every `/api` route: the request goes on only with the
/// admin token (RFC 6750 bearer). Unknown paths and methods are answered
/// without it (404, 405), as before any route matched.
pub async fn require_token(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    match authorise(&state, request.method(), request.headers()) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// The bearer token; or a console session's cookie, and then a request that
/// changes anything must come from our own origin (`Origin:` names the host
/// it was sent to), so another site cannot make the browser act for it.
fn authorise(state: &AppState, method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &state.token else {
        return Err(disabled());
    };
    if bearer_matches(token, headers) {
        return Ok(());
    }
    let session = headers
        .get(axum::http::header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(session::from_cookie_header);
    match session {
        Some(id) if state.sessions.is_valid(id, state.clock.now_ms()) => {
            if matches!(*method, Method::GET | Method::HEAD) || same_origin(headers) {
                Ok(())
            } else {
                Err(ApiError(
                    StatusCode::FORBIDDEN,
                    "cross-origin request refused: the Origin header must name this server".into(),
                ))
            }
        }
        _ => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        )),
    }
}

fn disabled() -> ApiError {
    ApiError(
        StatusCode::FORBIDDEN,
        "the admin API is disabled: set http.admin_token_file".into(),
    )
}

/// Whether `Origin:` is `http(s)://` followed by the `Host:` the request
/// was sent to.
fn same_origin(headers: &HeaderMap) -> bool {
    let value = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(origin), Some(host)) = (
        value(axum::http::header::ORIGIN),
        value(axum::http::header::HOST),
    ) else {
        return false;
    };
    ["http://", "https://"]
        .iter()
        .any(|scheme| origin.strip_prefix(scheme) == Some(host))
}

/// `POST /api/session` with `{"token": "..."}`: a console session, in a
/// cookie. Same-origin only.
pub async fn sign_in(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult {
    let Some(token) = &state.token else {
        return Err(disabled());
    };
    if !same_origin(&headers) {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "cross-origin request refused: the Origin header must name this server".into(),
        ));
    }
    #[derive(Deserialize)]
    struct SignIn {
        token: String,
    }
    let offered: SignIn = serde_json::from_slice(&body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("expected {{\"token\": \"...\"}}: {e}"),
        )
    })?;
    if !token.matches(offered.token.trim()) {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "wrong admin token".into(),
        ));
    }
    let id = state
        .sessions
        .create(state.clock.now_ms())
        .ok_or_else(|| internal("the system's random source failed"))?;
    let mut response = Json(json!({ "signed_in": true })).into_response();
    if let Ok(cookie) = session::set_cookie(&id).parse() {
        response
            .headers_mut()
            .insert(axum::http::header::SET_COOKIE, cookie);
    }
    Ok(response)
}

/// `GET /api/session`: whether the request carries a live session (so the
/// console knows whether to ask for the token without provoking a 401).
pub async fn session_state(State(state): State<Arc<AppState>>, headers: HeaderMap) -> ApiResult {
    let live = headers
        .get(axum::http::header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(session::from_cookie_header)
        .is_some_and(|id| state.sessions.is_valid(id, state.clock.now_ms()));
    Ok(Json(json!({ "signed_in": live })).into_response())
}

/// `DELETE /api/session`: the session ends, its cookie is cleared.
pub async fn sign_out(State(state): State<Arc<AppState>>, headers: HeaderMap) -> ApiResult {
    if let Some(id) = headers
        .get(axum::http::header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(session::from_cookie_header)
    {
        state.sessions.end(id);
    }
    let mut response = Json(json!({ "signed_in": false })).into_response();
    if let Ok(cookie) = session::clear_cookie().parse() {
        response
            .headers_mut()
            .insert(axum::http::header::SET_COOKIE, cookie);
    }
    Ok(response)
}

fn bearer_matches(token: &Token, headers: &HeaderMap) -> bool {
    let offered = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // RFC 7235: the scheme name is case-insensitive.
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token);
    token.matches(offered.trim())
}

fn parse_id(text: &str) -> Result<QueueId, ApiError> {
    text.parse()
        .map_err(|e: crate::spool::ParseIdError| ApiError(StatusCode::BAD_REQUEST, e.to_string()))
}

fn no_such(id: QueueId) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("no message {id}"))
}

/// Runs a blocking spool read.
async fn read<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&crate::spool::Spool) -> Result<T, crate::spool::ReadError> + Send + 'static,
) -> Result<T, ApiError> {
    let spool = state.spool.clone();
    tokio::task::spawn_blocking(move || f(&spool))
        .await
        .map_err(internal)?
        .map_err(internal)
}

#[derive(Serialize)]
struct RecipientView {
    address: String,
    domain: String,
    status: &'static str,
    attempts: u32,
    next_attempt_ms: Option<u64>,
    last_reply: Option<String>,
    waiting_for_primary: bool,
    /// Its domain is paused: it waits for the resume, not for a time.
    waiting_for_resume: bool,
    /// The primary refused it while its domain was paused; the refusal was
    /// kept (`last_reply`) instead of bounced.
    suspect: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    orcpt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    notify: Option<Vec<&'static str>>,
}

#[derive(Serialize)]
struct MessageView {
    id: String,
    sender: String,
    size: u64,
    arrived_ms: u64,
    age_seconds: u64,
    held: bool,
    recipients: Vec<RecipientView>,
}

fn view(env: &Envelope, held: bool, now: u64, detailed: bool) -> MessageView {
    MessageView {
        id: env.id.to_string(),
        sender: env.sender.clone(),
        size: env.size,
        arrived_ms: env.arrived_ms,
        age_seconds: now.saturating_sub(env.arrived_ms) / 1000,
        held,
        recipients: env
            .recipients
            .iter()
            .map(|r| {
                let queued = r.status == RcptStatus::Queued;
                let parked = queued && r.next_attempt_ms == PARKED;
                RecipientView {
                    address: r.address.clone(),
                    domain: domain_of(&r.address),
                    status: match r.status {
                        RcptStatus::Queued => "queued",
                        RcptStatus::Delivered => "delivered",
                        RcptStatus::Failed => "failed",
                    },
                    attempts: r.attempts,
                    next_attempt_ms: (queued && !parked).then_some(r.next_attempt_ms),
                    last_reply: r.last_reply.clone(),
                    waiting_for_primary: queued && r.unreachable,
                    waiting_for_resume: parked,
                    suspect: queued && r.suspect,
                    orcpt: if detailed { r.orcpt.clone() } else { None },
                    notify: detailed.then(|| {
                        [
                            (Notify::SUCCESS, "success"),
                            (Notify::FAILURE, "failure"),
                            (Notify::DELAY, "delay"),
                            (Notify::NEVER, "never"),
                        ]
                        .into_iter()
                        .filter(|(bit, _)| r.notify.has(*bit))
                        .map(|(_, name)| name)
                        .collect()
                    }),
                }
            })
            .collect(),
    }
}

#[derive(Deserialize)]
pub struct ListQuery {
    domain: Option<String>,
    state: Option<String>,
    sender: Option<String>,
    recipient: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

/// Messages in one page of `GET /api/queue` unless `limit` says otherwise.
pub const DEFAULT_LIMIT: usize = 100;
/// The largest `limit` accepted.
pub const MAX_LIMIT: usize = 1000;

/// What `GET /api/queue` keeps: all given filters must match.
struct Filter {
    state: Option<String>,
    domain: Option<String>,
    sender: Option<String>,
    recipient: Option<String>,
}

impl Filter {
    fn from_query(q: &ListQuery) -> Result<Filter, ApiError> {
        let state = match q.state.as_deref() {
            None | Some("") => None,
            Some(s @ ("queued" | "held" | "deferred")) => Some(s.to_owned()),
            Some(other) => {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("unknown state {other:?}: use queued, held or deferred"),
                ));
            }
        };
        let text = |v: &Option<String>| {
            v.as_deref()
                .filter(|v| !v.is_empty())
                .map(str::to_lowercase)
        };
        Ok(Filter {
            state,
            domain: text(&q.domain),
            sender: text(&q.sender),
            recipient: text(&q.recipient),
        })
    }

    fn is_empty(&self) -> bool {
        self.state.is_none()
            && self.domain.is_none()
            && self.sender.is_none()
            && self.recipient.is_none()
    }

    /// `sender` and `recipient` match a part of the address, ignoring case.
    fn keeps(&self, env: &Envelope, held: bool, metrics: &Metrics) -> bool {
        let state = match self.state.as_deref() {
            None => true,
            Some("held") => held,
            Some("queued") => !held,
            _ => !held && env.recipients.iter().any(|r| r.attempts > 0),
        };
        let domain = self.domain.as_deref().is_none_or(|d| {
            env.recipients.iter().any(|r| {
                let rd = domain_of(&r.address);
                r.status == RcptStatus::Queued && (rd == d || metrics.label(&rd) == d)
            })
        });
        let sender = self
            .sender
            .as_deref()
            .is_none_or(|s| env.sender.to_lowercase().contains(s));
        let recipient = self.recipient.as_deref().is_none_or(|want| {
            env.recipients
                .iter()
                .any(|r| r.address.to_lowercase().contains(want))
        });
        state && domain && sender && recipient
    }
}

/// `limit`: 1 to [`MAX_LIMIT`], default [`DEFAULT_LIMIT`].
fn page_limit(text: Option<&str>) -> Result<usize, ApiError> {
    let Some(text) = text.filter(|t| !t.is_empty()) else {
        return Ok(DEFAULT_LIMIT);
    };
    match text.parse::<usize>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        _ => Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("limit must be a number from 1 to {MAX_LIMIT}, not {text:?}"),
        )),
    }
}

/// `cursor`: the `next_cursor` of the page before (a queue ID, but opaque
/// to clients).
fn page_cursor(text: Option<&str>) -> Result<Option<QueueId>, ApiError> {
    match text.filter(|t| !t.is_empty()) {
        None => Ok(None),
        Some(t) => t.parse::<QueueId>().map(Some).map_err(|_| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("invalid cursor {t:?}: pass the next_cursor of the page before"),
            )
        }),
    }
}

/// `GET /api/queue`: one page, in arrival order. `count` is every match:
/// from the running totals when nothing or only a configured domain is
/// filtered on, else from a scan of the queue.
pub async fn list(State(state): State<Arc<AppState>>, uri: axum::http::Uri) -> ApiResult {
    // Parsed after the token check, so strangers learn nothing from errors.
    let Query(q) = Query::<ListQuery>::try_from_uri(&uri)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let filter = Filter::from_query(&q)?;
    let limit = page_limit(q.limit.as_deref())?;
    let after = page_cursor(q.cursor.as_deref())?;
    let aggregate = if filter.is_empty() {
        Some(state.spool.stats().messages)
    } else if filter.state.is_none() && filter.sender.is_none() && filter.recipient.is_none() {
        let d = filter.domain.as_deref().unwrap_or_default();
        state
            .spool
            .queue_by_label()
            .into_iter()
            .find(|(label, _, _)| label == d && label != crate::metrics::OTHER)
            .map(|(_, n, _)| n)
    } else {
        None
    };
    let metrics = state.metrics.clone();
    let now = state.clock.now_ms();
    let page = read(&state, move |spool| {
        let mut keep = |env: &Envelope, held: bool| filter.keeps(env, held, &metrics);
        spool.page(after, limit, aggregate.is_none(), &mut keep)
    })
    .await?;
    // A listing that fits in one page counts itself, from the same snapshot.
    let count = match (after, page.next) {
        (None, None) => page.items.len() as u64,
        _ => aggregate.or(page.matched).unwrap_or_default(),
    };
    let messages: Vec<_> = page
        .items
        .iter()
        .map(|(env, held)| view(env, *held, now, false))
        .collect();
    let next_cursor = page.next.map(|id| id.to_string());
    Ok(
        Json(json!({ "count": count, "messages": messages, "next_cursor": next_cursor }))
            .into_response(),
    )
}

pub async fn show(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult {
    let id = parse_id(&id)?;
    let found = read(&state, move |spool| {
        let Some(env) = spool.envelope(id)? else {
            return Ok(None);
        };
        let held = spool.is_held(id)?;
        let body = spool.body(id)?.unwrap_or_default();
        Ok(Some((env, held, body)))
    })
    .await?;
    let (env, held, body) = found.ok_or_else(|| no_such(id))?;
    let mut value =
        serde_json::to_value(view(&env, held, state.clock.now_ms(), true)).map_err(internal)?;
    let headers_end = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(body.len(), |p| p + 2);
    if let Value::Object(map) = &mut value {
        map.insert(
            "headers".into(),
            Value::String(String::from_utf8_lossy(&body[..headers_end]).into_owned()),
        );
        map.insert(
            "ret".into(),
            match env.ret {
                Ret::Full => json!("full"),
                Ret::Headers => json!("hdrs"),
                Ret::Unset => Value::Null,
            },
        );
        map.insert("envid".into(), json!(env.envid));
    }
    Ok(Json(value).into_response())
}

#[derive(Deserialize, Default)]
pub struct FlushBody {
    domain: Option<String>,
}

pub async fn flush(State(state): State<Arc<AppState>>, body: axum::body::Bytes) -> ApiResult {
    let body: FlushBody = if body.iter().all(u8::is_ascii_whitespace) {
        FlushBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"domain\": \"...\"}} or nothing: {e}"),
            )
        })?
    };
    let domain = body
        .domain
        .map(|d| String::from(Domain::typed(&d)))
        .filter(|d| !d.is_empty());
    let flushed = domain.clone().unwrap_or_else(|| "all".into());
    state.delivery.flush(domain);
    Ok((StatusCode::ACCEPTED, Json(json!({ "flushed": flushed }))).into_response())
}

/// Applies a spool change and answers `{key: id}`, 404 if there is no such message.
async fn apply(state: &AppState, id: QueueId, change: Change, key: &str) -> ApiResult {
    match state.spool.change(id, change, Vec::new()).await {
        Ok(Some(_)) => Ok(Json(json!({ key: id.to_string() })).into_response()),
        Ok(None) => Err(no_such(id)),
        Err(e) => Err(from_commit(e)),
    }
}

pub async fn delete(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult {
    let id = parse_id(&id)?;
    if read(&state, move |s| s.envelope(id)).await?.is_none() {
        return Err(no_such(id));
    }
    apply(&state, id, Change::Delete, "deleted").await
}

/// Whether queued message `id` is held; 404 if there is no such message.
async fn held(state: &AppState, id: QueueId) -> Result<bool, ApiError> {
    let (exists, held) = read(state, move |s| {
        Ok((s.envelope(id)?.is_some(), s.is_held(id)?))
    })
    .await?;
    if exists { Ok(held) } else { Err(no_such(id)) }
}

pub async fn hold(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult {
    let id = parse_id(&id)?;
    let held = held(&state, id).await?;
    if held {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("{id} is already held"),
        ));
    }
    apply(&state, id, Change::Hold, "held").await
}

pub async fn release(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult {
    let id = parse_id(&id)?;
    let held = held(&state, id).await?;
    if !held {
        return Err(ApiError(StatusCode::CONFLICT, format!("{id} is not held")));
    }
    let answer = apply(
        &state,
        id,
        Change::Release {
            now_ms: state.clock.now_ms(),
        },
        "released",
    )
    .await;
    state.delivery.queued().notify_one();
    answer
}

pub async fn bounce(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult {
    let id = parse_id(&id)?;
    match state.delivery.bounce(id).await {
        Ok(Some(n)) => {
            Ok(Json(json!({ "bounced": id.to_string(), "recipients": n })).into_response())
        }
        Ok(None) => Err(no_such(id)),
        Err(e) => Err(from_commit(e)),
    }
}

pub async fn dead_list(State(state): State<Arc<AppState>>) -> ApiResult {
    let now = state.clock.now_ms();
    let dead = read(&state, |s| s.dead_letters()).await?;
    let messages: Vec<MessageView> = dead
        .iter()
        .map(|env| view(env, false, now, false))
        .collect();
    let count = messages.len();
    Ok(Json(json!({ "messages": messages, "count": count })).into_response())
}

async fn dead_exists(state: &AppState, id: QueueId) -> Result<bool, ApiError> {
    let dead = read(state, |s| s.dead_letters()).await?;
    Ok(dead.iter().any(|e| e.id == id))
}

pub async fn dead_requeue(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult {
    let id = parse_id(&id)?;
    if !dead_exists(&state, id).await? {
        return Err(no_such(id));
    }
    let answer = apply(
        &state,
        id,
        Change::Unbury {
            now_ms: state.clock.now_ms(),
        },
        "requeued",
    )
    .await;
    state.delivery.queued().notify_one();
    answer
}

pub async fn dead_delete(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult {
    let id = parse_id(&id)?;
    if !dead_exists(&state, id).await? {
        return Err(no_such(id));
    }
    apply(&state, id, Change::Delete, "deleted").await
}

fn paused_by(by: PausedBy) -> &'static str {
    match by {
        PausedBy::Operator => "operator",
        PausedBy::Guard => "guard",
    }
}

#[derive(Serialize)]
struct DomainView {
    domain: String,
    /// "up" (or not known to be down) | "down".
    primary: &'static str,
    primary_since_ms: u64,
    paused: bool,
    /// "operator" | "guard" | null.
    paused_by: Option<&'static str>,
    paused_since_ms: Option<u64>,
    /// Queued messages with a recipient at the domain.
    queued: u64,
    oldest_arrived_ms: Option<u64>,
    oldest_age_seconds: Option<u64>,
    /// The primary's recent changes, oldest first.
    history: Vec<ChangeView>,
}

#[derive(Serialize)]
struct ChangeView {
    at_ms: u64,
    /// "up" | "down".
    primary: &'static str,
    /// For a change to down: why.
    reason: Option<String>,
}

fn domain_view(d: DomainStatus, now: u64) -> DomainView {
    DomainView {
        primary: if d.primary_up { "up" } else { "down" },
        primary_since_ms: d.primary_since_ms,
        paused: d.pause.is_some(),
        paused_by: d.pause.map(|p| paused_by(p.by)),
        paused_since_ms: d.pause.map(|p| p.since_ms),
        queued: d.queued,
        oldest_arrived_ms: d.oldest_arrived_ms,
        oldest_age_seconds: d.oldest_arrived_ms.map(|at| now.saturating_sub(at) / 1000),
        history: d
            .history
            .into_iter()
            .map(|c| ChangeView {
                at_ms: c.at_ms,
                primary: if c.up { "up" } else { "down" },
                reason: c.reason,
            })
            .collect(),
        domain: d.name,
    }
}

pub async fn domains(State(state): State<Arc<AppState>>) -> ApiResult {
    let now = state.clock.now_ms();
    let domains: Vec<DomainView> = state
        .delivery
        .domains()
        .into_iter()
        .map(|d| domain_view(d, now))
        .collect();
    let count = domains.len();
    Ok(Json(json!({ "domains": domains, "count": count })).into_response())
}

/// A domain as written in a path: case and a final dot do not matter.
fn domain_name(text: &str) -> String {
    Domain::typed(text).into()
}

fn from_domain(e: DomainError) -> ApiError {
    match e {
        DomainError::Refused(e @ PauseError::Unknown(_)) => {
            ApiError(StatusCode::NOT_FOUND, e.to_string())
        }
        DomainError::Refused(e) => ApiError(StatusCode::CONFLICT, e.to_string()),
        DomainError::Spool(e) => from_commit(e),
    }
}

pub async fn pause_domain(
    State(state): State<Arc<AppState>>,
    Path(domain): Path<String>,
) -> ApiResult {
    let domain = domain_name(&domain);
    let pause = state.delivery.pause(&domain).await.map_err(from_domain)?;
    Ok(Json(json!({ "paused": domain, "since_ms": pause.since_ms })).into_response())
}

pub async fn resume_domain(
    State(state): State<Arc<AppState>>,
    Path(domain): Path<String>,
) -> ApiResult {
    let domain = domain_name(&domain);
    let ended = state.delivery.resume(&domain).await.map_err(from_domain)?;
    Ok(Json(json!({ "resumed": domain, "paused_by": paused_by(ended.by) })).into_response())
}

/// Runs a mailbox fetch now and answers with its report (the run's counts
/// and error, if any); 404 for a name no `[[fetch]]` block has.
pub async fn fetch_now(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> ApiResult {
    match state.fetchers.run_now(&name).await {
        Some(report) => Ok(Json(json!({ "account": name, "report": report })).into_response()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "no [[fetch]] block named {:?} (configured: {})",
                name,
                state.fetchers.names().join(", ")
            ),
        )),
    }
}

pub async fn method_not_allowed() -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this path".into(),
    )
}

pub async fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no such path".into())
}
