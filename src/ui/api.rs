//! The dashboard's routes: the page and its two files, and the JSON API.
//!
//! | route | what |
//! |---|---|
//! | `GET /ui/` | the page (`/ui` redirects here) |
//! | `GET /ui/api/overview` | per platform: `stargazer status`'s figures, readiness, gateways with their health, order gaps, rate-limit counters |
//! | `GET /ui/api/rates?window=minute\|hour` | deliveries, retries, dead letters per second (this gateway) |
//! | `GET /ui/api/platforms/{p}/dlq?kind&channel&since&until&before&limit` | one page of dead letters, newest first |
//! | `GET /ui/api/platforms/{p}/dlq/{id}` | one dead letter, decoded, with its history |
//! | `POST /ui/api/platforms/{p}/dlq/replay` | replay `{"ids": […]}`, `{"filter": {…}}` or `{"all": true}` (`"dry_run"`) |
//! | `POST /ui/api/platforms/{p}/dlq/purge` | delete the same kinds of selection (`"dry_run"` counts) |
//! | `POST /ui/api/auth` | check a token (200 or the refusal the actions would give) |
//!
//! Errors are JSON: `{"error": "…"}` with 400 (bad input, naming it), 401
//! (missing or wrong token), 403 (read-only: no token configured), 404, 503
//! (Redis unreachable).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Extension;
use axum::Router;
use axum::body::Bytes;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::{info, warn};

use super::rates::Window;
use super::{Ui, UiPlatform, assets};
use crate::bus::admin::{ConsumerInfo, Nodes};
use crate::ops::dlq::{self, DeadLetterEntry, Filter, PageQuery, ReplayOptions, Selection, Since};
use crate::ops::status;

/// How long one computed overview serves every viewer.
pub const OVERVIEW_TTL: Duration = Duration::from_secs(1);
/// Dead letters per page: default and most.
pub const PAGE_DEFAULT: usize = 50;
pub const PAGE_MAX: usize = 500;
/// Most dead letters read for one filtered page.
pub const SCAN_BUDGET: usize = 10_000;
/// Most ids one action may name.
pub const MAX_IDS: usize = 1000;

pub fn router(ui: Ui) -> Router {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("ui/") }))
        .route("/ui/", get(index))
        .route("/ui/app.css", get(css))
        .route("/ui/app.js", get(js))
        .route("/ui/api/overview", get(overview))
        .route("/ui/api/rates", get(rates))
        .route("/ui/api/auth", post(auth_check))
        .route("/ui/api/platforms/{platform}/dlq", get(dlq_page))
        .route("/ui/api/platforms/{platform}/dlq/replay", post(replay))
        .route("/ui/api/platforms/{platform}/dlq/purge", post(purge))
        .route("/ui/api/platforms/{platform}/dlq/{id}", get(dlq_entry))
        .with_state(ui)
}

/// The page may load only its own files and talk only to its own origin.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    r
}

async fn index() -> Response {
    asset(assets::INDEX_HTML, "text/html; charset=utf-8")
}

async fn css() -> Response {
    asset(assets::APP_CSS, "text/css; charset=utf-8")
}

async fn js() -> Response {
    asset(assets::APP_JS, "text/javascript; charset=utf-8")
}

/// A JSON error.
fn fail(code: StatusCode, message: impl Into<String>) -> Response {
    let mut r = (code, axum::Json(json!({ "error": message.into() }))).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A refusal or bad input, as the JSON error it becomes (boxed: a
/// `Response` is large and most calls succeed).
#[derive(Debug)]
struct ApiError(Box<ApiErrorInner>);

#[derive(Debug)]
struct ApiErrorInner {
    code: StatusCode,
    message: String,
    /// Ask for a bearer token (`WWW-Authenticate`) — 401 only.
    bearer: bool,
}

impl ApiError {
    fn new(code: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError(Box::new(ApiErrorInner {
            code,
            message: message.into(),
            bearer: code == StatusCode::UNAUTHORIZED,
        }))
    }

    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = fail(self.0.code, self.0.message);
        if self.0.bearer {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"stargazer\""),
            );
        }
        r
    }
}

fn ok<T: Serialize>(v: T) -> Response {
    let mut r = axum::Json(v).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn redis_down(e: redis::RedisError) -> Response {
    fail(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("redis does not answer: {e}"),
    )
}

fn unknown_platform(ui: &Ui, name: &str) -> ApiError {
    let names: Vec<String> = ui.platforms().into_iter().map(|p| p.name).collect();
    ApiError::new(
        StatusCode::NOT_FOUND,
        if names.is_empty() {
            format!("no platform `{name}`: this gateway is still starting its platforms")
        } else {
            format!(
                "no platform `{name}` on this gateway (it serves {})",
                names.join(", ")
            )
        },
    )
}

/// A stream id: `ms` or `ms-seq`, digits only.
fn is_stream_id(s: &str) -> bool {
    let (a, b) = s.split_once('-').unwrap_or((s, "0"));
    !a.is_empty()
        && !b.is_empty()
        && a.len() <= 20
        && b.len() <= 20
        && a.bytes().all(|c| c.is_ascii_digit())
        && b.bytes().all(|c| c.is_ascii_digit())
}

// ---------------------------------------------------------------- overview

/// One gateway (consumer) of a platform, with its health.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayView {
    pub name: String,
    /// Its live instance (`<consumer>/<random>`) when registered.
    pub instance: Option<String>,
    /// `live` (registered, heartbeat moving), `stalled` (registered, no
    /// heartbeat for `lock_ttl_ms`: its peers are about to declare it dead),
    /// `dead` (not registered, entries still pending: being claimed),
    /// `gone` (not registered, nothing pending).
    pub health: &'static str,
    pub pending: u64,
    /// Since its last read or claim (`XINFO CONSUMERS`).
    pub idle_ms: Option<u64>,
    /// Its heartbeat counter, and how long it has stood still (as far as this
    /// dashboard has watched it).
    pub beat: Option<u64>,
    pub beat_still_ms: Option<u64>,
    /// This is the gateway serving the page.
    pub this_node: bool,
}

/// A counter of the Prometheus registry that tells of limits or trouble.
#[derive(Debug, Clone, Serialize)]
pub struct LimitCounter {
    pub metric: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Metrics the "limits" panel shows, per platform.
const LIMIT_METRICS: &[&crate::metrics::Def] = &[
    &crate::metrics::DISCORD_WAITS,
    &crate::metrics::DISCORD_429S,
    &crate::metrics::DISCORD_INVALID,
    &crate::metrics::GAPS_SKIPPED,
    &crate::metrics::UNKNOWN_OUTCOME_RESENDS,
    &crate::metrics::LOCK_RENEW_FAILURES,
    &crate::metrics::LOCKS_LOST,
    &crate::metrics::DLQ_AT_CAP,
];

/// The samples of [`LIMIT_METRICS`] for `platform` in a Prometheus text render.
pub fn limit_counters(render: &str, platform: &str) -> Vec<LimitCounter> {
    let mut out = Vec::new();
    for line in render.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, rest)) = line.split_once('{') else {
            continue;
        };
        if !LIMIT_METRICS.iter().any(|d| d.name == name) {
            continue;
        }
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let labels = parse_labels(labels);
        if labels.get("platform").map(String::as_str) != Some(platform) {
            continue;
        }
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let mut labels = labels;
        labels.remove("platform");
        out.push(LimitCounter {
            metric: name.to_owned(),
            labels,
            value,
        });
    }
    out.sort_by(|a, b| (&a.metric, &a.labels).cmp(&(&b.metric, &b.labels)));
    out
}

/// `a="x",b="y \"q\""` → map.
fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() || chars.next() != Some('"') {
            break;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => break,
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').trim().to_owned(), value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    out
}

#[derive(Debug, Serialize)]
struct PlatformView {
    #[serde(flatten)]
    status: status::PlatformStatus,
    adapter: String,
    /// `None` while the gateway is still starting its platforms.
    ready: Option<bool>,
    not_ready_reason: Option<String>,
    gateways: Vec<GatewayView>,
    gap_timeout_ms: u64,
    lock_ttl_ms: u64,
    max_attempts: u32,
    limits: Vec<LimitCounter>,
}

impl Ui {
    /// Merge the group's consumers with the registered instances and judge
    /// each one's health (see [`GatewayView::health`]).
    fn gateways(
        &self,
        platform: &str,
        consumers: &[ConsumerInfo],
        nodes: &Nodes,
        now_ms: u64,
        lock_ttl_ms: u64,
    ) -> Vec<GatewayView> {
        let mut names: Vec<&str> = consumers.iter().map(|c| c.name.as_str()).collect();
        for n in nodes.registered.keys() {
            if !names.contains(&n.as_str()) {
                names.push(n);
            }
        }
        names.sort_unstable();
        let mut beats = self.0.beats.lock().expect("ui beats poisoned");
        beats.retain(|(p, c), _| p != platform || names.contains(&c.as_str()));
        names
            .into_iter()
            .map(|name| {
                let c = consumers.iter().find(|c| c.name == name);
                let instance = nodes.registered.get(name).cloned();
                let beat = nodes.beats.get(name).copied();
                let still = beat.map(|b| {
                    let seen = beats
                        .entry((platform.to_owned(), name.to_owned()))
                        .or_insert((b, now_ms));
                    if seen.0 != b {
                        *seen = (b, now_ms);
                    }
                    now_ms.saturating_sub(seen.1)
                });
                let pending = c.map_or(0, |c| c.pending);
                let health = match (&instance, still) {
                    (Some(_), Some(s)) if s >= lock_ttl_ms => "stalled",
                    (Some(_), _) => "live",
                    (None, _) if pending > 0 => "dead",
                    (None, _) => "gone",
                };
                GatewayView {
                    name: name.to_owned(),
                    instance,
                    health,
                    pending,
                    idle_ms: c.map(|c| c.idle_ms),
                    beat,
                    beat_still_ms: still,
                    this_node: name == self.0.node,
                }
            })
            .collect()
    }

    async fn compute_overview(&self) -> redis::RedisResult<Value> {
        let platforms = self.platforms();
        let now = match platforms.first() {
            Some(p) => p.bus.server_time_ms().await?,
            None => crate::now_ms(),
        };
        let ready = self.0.readiness.platform_states();
        let render = crate::metrics::install().render();
        let mut views = Vec::with_capacity(platforms.len());
        for p in &platforms {
            let st = status::platform_status(&p.bus, now).await?;
            if let Some(read) = st.entries_read {
                self.0.rates.record_fleet(
                    &p.name,
                    now,
                    read.saturating_sub(st.pending),
                    st.dead_letters,
                );
            }
            let nodes = p.bus.nodes().await?;
            let gateways =
                self.gateways(&p.name, &st.consumers, &nodes, now, p.settings.lock_ttl_ms);
            let state = ready.as_ref().and_then(|r| {
                r.iter()
                    .find(|(n, _)| *n == p.name)
                    .map(|(_, why)| why.clone())
            });
            views.push(PlatformView {
                adapter: p.adapter.clone(),
                ready: state.as_ref().map(Option::is_none),
                not_ready_reason: state.flatten(),
                gateways,
                gap_timeout_ms: p.settings.gap_timeout_ms,
                lock_ttl_ms: p.settings.lock_ttl_ms,
                max_attempts: p.settings.max_attempts,
                limits: limit_counters(&render, &p.name),
                status: st,
            });
        }
        Ok(json!({
            "at_ms": now,
            "node": self.0.node,
            "actions_enabled": self.actions_enabled(),
            "redis": { "ok": true },
            "platforms": views,
        }))
    }
}

async fn overview(State(ui): State<Ui>) -> Response {
    ui.0.rates.touch();
    let mut cache = ui.0.overview.lock().await;
    if let Some((at, v)) = cache.as_ref()
        && at.elapsed() < OVERVIEW_TTL
    {
        return ok(v.clone());
    }
    match ui.compute_overview().await {
        Ok(v) => {
            *cache = Some((Instant::now(), v.clone()));
            ok(v)
        }
        Err(e) => redis_down(e),
    }
}

#[derive(Debug, Deserialize)]
struct RatesQuery {
    window: Option<String>,
}

async fn rates(State(ui): State<Ui>, Query(q): Query<RatesQuery>) -> Response {
    let window = match Window::parse(q.window.as_deref().unwrap_or("minute")) {
        Ok(w) => w,
        Err(e) => return fail(StatusCode::BAD_REQUEST, e),
    };
    ui.0.rates.touch();
    let step = match window {
        Window::Minute => super::rates::WATCHED_EVERY,
        Window::Hour => super::rates::IDLE_EVERY,
    };
    ok(json!({
        "window": if window == Window::Minute { "minute" } else { "hour" },
        "step_ms": step.as_millis() as u64,
        "at_ms": crate::now_ms(),
        "platforms": ui.0.rates.series(window),
    }))
}

// ---------------------------------------------------------------- dead letters

#[derive(Debug, Deserialize)]
struct DlqQuery {
    kind: Option<String>,
    channel: Option<String>,
    since: Option<String>,
    until: Option<String>,
    before: Option<String>,
    limit: Option<String>,
}

fn non_empty(s: &Option<String>) -> Option<String> {
    s.as_ref()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn parse_since(what: &str, s: Option<String>) -> Result<Option<Since>, ApiError> {
    s.map(|s| Since::parse(&s))
        .transpose()
        .map_err(|e| ApiError::bad(format!("{what}: {e}")))
}

/// A dead letter as one table row: the envelope shortened to what the
/// table shows.
#[derive(Debug, Serialize)]
struct Row {
    id: String,
    original_id: String,
    error_kind: String,
    error: String,
    attempts: u64,
    consumer: String,
    failed_ms: u64,
    channel_id: Option<String>,
    seq: Option<u64>,
    #[serde(rename = "type")]
    ty: Option<String>,
    preview: Option<String>,
    replayable: bool,
}

fn shorten(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(n).collect();
    out.push('…');
    out
}

impl Row {
    fn of(e: &DeadLetterEntry) -> Row {
        let field = |k: &str| {
            e.envelope
                .as_ref()
                .and_then(|v| v.get(k))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let preview = field("text")
            .or_else(|| field("filename").map(|f| format!("file {f}")))
            .or_else(|| field("emoji"))
            .or_else(|| field("rpc_method"))
            .or_else(|| e.payload_text.clone())
            .map(|t| shorten(&t, 140));
        Row {
            id: e.id.clone(),
            original_id: e.original_id.clone(),
            error_kind: e.error_kind.clone(),
            error: shorten(&e.error, 300),
            attempts: e.attempts,
            consumer: e.consumer.clone(),
            failed_ms: e.failed_ms,
            channel_id: e.channel_id.clone(),
            seq: e.seq,
            ty: e
                .envelope
                .as_ref()
                .map(|_| field("type").unwrap_or_else(|| "message".into())),
            preview,
            replayable: dlq::replayable(e).is_ok(),
        }
    }
}

async fn dlq_page(
    State(ui): State<Ui>,
    Path(platform): Path<String>,
    Query(q): Query<DlqQuery>,
) -> Response {
    let started = Instant::now();
    let Some(p) = ui.platform(&platform) else {
        return unknown_platform(&ui, &platform).into_response();
    };
    let limit = match non_empty(&q.limit).map(|l| l.parse::<usize>()) {
        None => PAGE_DEFAULT,
        Some(Ok(n)) if (1..=PAGE_MAX).contains(&n) => n,
        Some(_) => {
            return fail(
                StatusCode::BAD_REQUEST,
                format!("limit: a number from 1 to {PAGE_MAX}"),
            );
        }
    };
    let before = non_empty(&q.before);
    if let Some(b) = &before
        && !is_stream_id(b)
    {
        return fail(
            StatusCode::BAD_REQUEST,
            format!("before `{b}` is not a stream id (like 1760000000000-0)"),
        );
    }
    let since = match parse_since("since", non_empty(&q.since)) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let until = match parse_since("until", non_empty(&q.until)) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let query = PageQuery {
        filter: Filter {
            kind: non_empty(&q.kind),
            channel: non_empty(&q.channel),
            since,
            limit: None,
        },
        until,
        before,
        limit,
        scan_budget: SCAN_BUDGET,
    };
    let dlq_key = p.bus.keys().dlq();
    let (page, total) = match tokio::try_join!(dlq::page(&p.bus, &query), p.bus.len_of(&dlq_key)) {
        Ok(r) => r,
        Err(e) => return redis_down(e),
    };
    ok(json!({
        "platform": p.name,
        "total": total,
        "entries": page.entries.iter().map(Row::of).collect::<Vec<_>>(),
        "next_before": page.next_before,
        "scanned": page.scanned,
        "partial": page.partial,
        "took_ms": started.elapsed().as_secs_f64() * 1000.0,
    }))
}

/// One step of a dead letter's life, for the detail view.
#[derive(Debug, Serialize)]
struct Step {
    at_ms: u64,
    what: String,
}

fn history(e: &DeadLetterEntry) -> Vec<Step> {
    let mut steps = Vec::new();
    let env = e.envelope.as_ref();
    let num = |k: &str| env.and_then(|v| v.get(k)).and_then(Value::as_f64);
    if let Some(c) = num("created_ms") {
        steps.push(Step {
            at_ms: c as u64,
            what: "created by the producer (created_ms)".into(),
        });
    }
    if let Some(r) = env
        .and_then(|v| v.get("replayed_from"))
        .and_then(Value::as_str)
    {
        steps.push(Step {
            at_ms: crate::bus::admin::id_key(r).0,
            what: format!("first published as {r}; dead-lettered and replayed since"),
        });
    }
    if !e.original_id.is_empty() {
        steps.push(Step {
            at_ms: crate::bus::admin::id_key(&e.original_id).0,
            what: format!("published to the outbound stream as {}", e.original_id),
        });
    }
    steps.push(Step {
        at_ms: if e.failed_ms > 0 {
            e.failed_ms
        } else {
            crate::bus::admin::id_key(&e.id).0
        },
        what: format!(
            "dead-lettered as {} by {} after {} attempt{}: {}",
            e.error_kind,
            if e.consumer.is_empty() {
                "?"
            } else {
                &e.consumer
            },
            e.attempts,
            if e.attempts == 1 { "" } else { "s" },
            e.error
        ),
    });
    steps.sort_by_key(|s| s.at_ms);
    steps
}

/// Longest string field shown whole in the detail view.
const SHOW_CHARS: usize = 16_384;

/// The envelope with a long `file_data` (a file can be megabytes) and any
/// other very long string field shortened.
fn display_envelope(e: &DeadLetterEntry) -> Option<Value> {
    let mut v = e.envelope.clone()?;
    if let Value::Object(m) = &mut v {
        for (k, f) in m.iter_mut() {
            let Value::String(d) = f else { continue };
            if k == "file_data" && d.len() > 64 {
                *d = format!("{}… ({} bytes of base64)", &d[..48], d.len());
            } else if d.chars().count() > SHOW_CHARS {
                let n = d.chars().count();
                *d = format!("{} … ({n} characters in all)", shorten(d, SHOW_CHARS));
            }
        }
    }
    Some(v)
}

async fn dlq_entry(State(ui): State<Ui>, Path((platform, id)): Path<(String, String)>) -> Response {
    let Some(p) = ui.platform(&platform) else {
        return unknown_platform(&ui, &platform).into_response();
    };
    if !is_stream_id(&id) {
        return fail(
            StatusCode::BAD_REQUEST,
            format!("`{id}` is not a stream id (like 1760000000000-0)"),
        );
    }
    let e = match dlq::show(&p.bus, &id).await {
        Ok(Some(e)) => e,
        Ok(None) => {
            return fail(
                StatusCode::NOT_FOUND,
                format!("no dead letter {id} on `{platform}` (replayed or purged?)"),
            );
        }
        Err(e) => return redis_down(e),
    };
    let replay = match dlq::rebuild(&e, &p.name) {
        Ok((_, key)) => json!({"possible": true, "idempotency_key": key}),
        Err(reason) => json!({"possible": false, "reason": reason}),
    };
    ok(json!({
        "platform": p.name,
        "id": e.id,
        "original_id": e.original_id,
        "error_kind": e.error_kind,
        "error": e.error,
        "attempts": e.attempts,
        "consumer": e.consumer,
        "failed_ms": e.failed_ms,
        "channel_id": e.channel_id,
        "seq": e.seq,
        "signed": e.sig.is_some(),
        "envelope": display_envelope(&e),
        "payload_text": e.payload_text.as_ref().map(|t| shorten(t, 4096)),
        "history": history(&e),
        "replay": replay,
    }))
}

// ---------------------------------------------------------------- actions

/// Who asked for an action, for the log.
#[derive(Debug, Clone)]
struct Actor {
    operator: String,
    peer: String,
}

/// Check the bearer token; the refusal is logged and returned as the response.
fn authorize(
    ui: &Ui,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
    action: &str,
) -> Result<Actor, ApiError> {
    let operator: String = headers
        .get("x-stargazer-operator")
        .and_then(|v| v.to_str().ok())
        .map(|s| {
            s.chars()
                .filter(|c| !c.is_control())
                .take(64)
                .collect::<String>()
        })
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "anonymous".into());
    let actor = Actor {
        operator,
        peer: peer.map_or_else(|| "?".into(), |p| p.to_string()),
    };
    let Some(token) = &ui.0.token else {
        warn!(action, operator = %actor.operator, peer = %actor.peer,
            "dashboard action refused: the dashboard is read-only (no http.ui_token_env)");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "the dashboard is read-only: no action token is configured on this gateway \
             (set http.ui_token_env to the name of a variable holding one)",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let refuse = |msg: &str| ApiError::new(StatusCode::UNAUTHORIZED, msg);
    match given {
        None => {
            warn!(action, operator = %actor.operator, peer = %actor.peer,
                "dashboard action refused: no token given");
            Err(refuse(
                "this action needs the dashboard token: send Authorization: Bearer <token>",
            ))
        }
        Some(g) if !token.matches(g) => {
            warn!(action, operator = %actor.operator, peer = %actor.peer,
                "dashboard action refused: wrong token");
            Err(refuse("wrong dashboard token"))
        }
        Some(_) => Ok(actor),
    }
}

async fn auth_check(
    State(ui): State<Ui>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
) -> Response {
    match authorize(&ui, &headers, peer.map(|p| p.0.0), "auth") {
        Ok(actor) => ok(json!({"ok": true, "operator": actor.operator})),
        Err(r) => r.into_response(),
    }
}

/// What an action applies to: exactly one of `ids`, `filter`, `all`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    ids: Option<Vec<String>>,
    filter: Option<FilterBody>,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    dry_run: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterBody {
    kind: Option<String>,
    channel: Option<String>,
    since: Option<String>,
}

impl ActionBody {
    fn parse(body: &[u8]) -> Result<(Selection, bool, String), ApiError> {
        let bad = ApiError::bad;
        let b: ActionBody = serde_json::from_slice(body).map_err(|e| {
            bad(format!(
                "the body must be JSON like {{\"ids\": [\"1760000000000-0\"]}}, \
                 {{\"filter\": {{\"kind\": \"rejected\"}}}} or {{\"all\": true}}: {e}"
            ))
        })?;
        let what = match (&b.ids, &b.filter, b.all) {
            (Some(ids), None, false) => {
                if ids.is_empty() || ids.len() > MAX_IDS {
                    return Err(bad(format!("ids: from 1 to {MAX_IDS} ids")));
                }
                if let Some(x) = ids.iter().find(|i| !is_stream_id(i)) {
                    return Err(bad(format!(
                        "ids: `{x}` is not a stream id (like 1760000000000-0)"
                    )));
                }
                (Selection::Ids(ids.clone()), format!("{} id(s)", ids.len()))
            }
            (None, Some(f), false) => {
                let since = parse_since("filter.since", non_empty(&f.since))?;
                let filter = Filter {
                    kind: non_empty(&f.kind),
                    channel: non_empty(&f.channel),
                    since,
                    limit: None,
                };
                if filter.kind.is_none() && filter.channel.is_none() && filter.since.is_none() {
                    return Err(bad(
                        "filter: name a kind, a channel or since (or send {\"all\": true})".into(),
                    ));
                }
                let desc = format!(
                    "filter kind={} channel={} since={}",
                    filter.kind.as_deref().unwrap_or("*"),
                    filter.channel.as_deref().unwrap_or("*"),
                    f.since.as_deref().unwrap_or("*")
                );
                (Selection::Filter(filter), desc)
            }
            (None, None, true) => (Selection::Filter(Filter::default()), "all".into()),
            _ => {
                return Err(bad("name exactly one of ids, filter or all=true".into()));
            }
        };
        Ok((what.0, b.dry_run, what.1))
    }
}

/// Authorize, find the platform, read the selection.
fn prepare(
    ui: &Ui,
    platform: &str,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
    body: &[u8],
    action: &str,
) -> Result<(Actor, UiPlatform, Selection, bool, String), ApiError> {
    let actor = authorize(ui, headers, peer, action)?;
    let p = ui
        .platform(platform)
        .ok_or_else(|| unknown_platform(ui, platform))?;
    let (sel, dry_run, desc) = ActionBody::parse(body)?;
    Ok((actor, p, sel, dry_run, desc))
}

async fn replay(
    State(ui): State<Ui>,
    Path(platform): Path<String>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (actor, p, sel, dry_run, desc) = match prepare(
        &ui,
        &platform,
        &headers,
        peer.map(|p| p.0.0),
        &body,
        "replay",
    ) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let opts = ReplayOptions {
        dry_run,
        signing_secret: p.settings.signing_secret.clone().map(String::into_bytes),
        progress: false,
    };
    match dlq::replay(&p.bus, &sel, &opts).await {
        Ok(rep) => {
            info!(action = "replay", platform = %p.name, operator = %actor.operator,
                peer = %actor.peer, selection = %desc, dry_run,
                replayed = rep.replayed.len(), skipped = rep.skipped.len(),
                "dashboard action");
            *ui.0.overview.lock().await = None;
            ok(rep)
        }
        Err(e) => {
            warn!(action = "replay", platform = %p.name, operator = %actor.operator,
                peer = %actor.peer, selection = %desc, error = %e, "dashboard action failed");
            redis_down(e)
        }
    }
}

async fn purge(
    State(ui): State<Ui>,
    Path(platform): Path<String>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (actor, p, sel, dry_run, desc) = match prepare(
        &ui,
        &platform,
        &headers,
        peer.map(|p| p.0.0),
        &body,
        "purge",
    ) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    match dlq::purge(&p.bus, &sel, !dry_run, false).await {
        Ok(rep) => {
            info!(action = "purge", platform = %p.name, operator = %actor.operator,
                peer = %actor.peer, selection = %desc, dry_run,
                selected = rep.selected, deleted = rep.deleted, "dashboard action");
            *ui.0.overview.lock().await = None;
            ok(json!({"dry_run": dry_run, "selected": rep.selected, "deleted": rep.deleted}))
        }
        Err(e) => {
            warn!(action = "purge", platform = %p.name, operator = %actor.operator,
                peer = %actor.peer, selection = %desc, error = %e, "dashboard action failed");
            redis_down(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_counters_pick_the_platform() {
        let render = "# HELP x\n\
            stargazer_discord_429s_total{platform=\"d\",scope=\"user\"} 3\n\
            stargazer_discord_429s_total{platform=\"other\",scope=\"user\"} 9\n\
            stargazer_deliveries_total{platform=\"d\",type=\"message\",outcome=\"delivered\"} 5\n\
            stargazer_order_gaps_skipped_total{platform=\"d\"} 1\n";
        let c = limit_counters(render, "d");
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(c[0].metric, "stargazer_discord_429s_total");
        assert_eq!(c[0].labels.get("scope").map(String::as_str), Some("user"));
        assert_eq!(c[0].value, 3.0);
        assert_eq!(c[1].metric, "stargazer_order_gaps_skipped_total");
    }

    #[test]
    fn labels_unescape() {
        let l = parse_labels(r#"a="x",b="y \"q\"""#);
        assert_eq!(l["a"], "x");
        assert_eq!(l["b"], "y \"q\"");
    }

    #[test]
    fn action_bodies_name_one_selection() {
        let p = |s: &str| ActionBody::parse(s.as_bytes()).map(|(sel, d, _)| (sel, d));
        assert!(matches!(
            p(r#"{"ids":["1-0","2"]}"#),
            Ok((Selection::Ids(v), false)) if v.len() == 2
        ));
        assert!(matches!(
            p(r#"{"all":true,"dry_run":true}"#),
            Ok((Selection::Filter(_), true))
        ));
        assert!(
            matches!(p(r#"{"filter":{"kind":"rejected"}}"#), Ok((Selection::Filter(f), _)) if f.kind.as_deref() == Some("rejected"))
        );
        for bad in [
            "",
            "{}",
            r#"{"ids":[]}"#,
            r#"{"ids":["x"]}"#,
            r#"{"ids":["1-0"],"all":true}"#,
            r#"{"filter":{}}"#,
            r#"{"filter":{"since":"soon"}}"#,
            r#"{"idz":["1-0"]}"#,
        ] {
            assert!(p(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn stream_ids_are_checked() {
        assert!(is_stream_id("1760000000000-0") && is_stream_id("17"));
        assert!(
            !is_stream_id("1-")
                && !is_stream_id("-1")
                && !is_stream_id("+")
                && !is_stream_id("(1-0")
        );
    }
}
