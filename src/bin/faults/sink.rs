//! The webhook platform the gateways deliver to (SPEC §5), served in-process.
//!
//! It behaves like a platform that honours `Idempotency-Key`: the first 2xx
//! for a key is remembered, and a repeat that would succeed is answered with
//! the same body (the same `message_id`, or the same bare 200) and recorded
//! as a replay, so the checker can count duplicates.
//!
//! What it answers follows the fault schedule: the newest active platform
//! fault whose scope covers the request's channel decides (hang longer than
//! the webhook timeout, slow, 5xx, 429 with `Retry-After`, bare 200); with
//! none, a 200 — with `{"message_id": …}` for three keys in four, bare for
//! the fourth (chosen per key from the seed).
//!
//! An answer is decided in a task of its own, so a request is "processed"
//! even when its gateway dies (or is stopped) before it reads the answer:
//! exactly the window in which a real platform has sent a message the
//! gateway never heard back about.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::Value;

use super::{fnv, mix, now_ms};

/// A platform fault: how the sink answers while it is active.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PlatformFault {
    /// Hold the request longer than the webhook timeout, then 503.
    Hang,
    /// Answer 200 after 1–4 s.
    Slow,
    /// 500, 502 or 503.
    ServerError,
    /// 429 with `Retry-After: 1..3`.
    RateLimited,
    /// 200 without a body (no `message_id`).
    Bare,
}

impl PlatformFault {
    pub const ALL: [PlatformFault; 5] = [
        PlatformFault::Hang,
        PlatformFault::Slow,
        PlatformFault::ServerError,
        PlatformFault::RateLimited,
        PlatformFault::Bare,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PlatformFault::Hang => "hang",
            PlatformFault::Slow => "slow",
            PlatformFault::ServerError => "5xx",
            PlatformFault::RateLimited => "429",
            PlatformFault::Bare => "bare 200",
        }
    }
}

/// Which requests a platform fault applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Global,
    Channels(Vec<String>),
}

impl Scope {
    fn covers(&self, channel: Option<&str>) -> bool {
        match self {
            Scope::Global => true,
            Scope::Channels(cs) => channel.is_some_and(|c| cs.iter().any(|x| x == c)),
        }
    }
}

/// What the sink answered a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not answered yet (a slow answer in progress).
    Pending,
    /// 2xx. `replay`: an earlier request with the same key had a 2xx too.
    Success { replay: bool, with_id: bool },
    /// An error status (5xx, 429, or the 503 that ends a hang).
    Status(u16),
    /// Held past the webhook timeout, then 503.
    Hang,
}

/// One request the sink received.
#[derive(Debug, Clone)]
pub struct Request {
    /// Arrival order over the whole run.
    pub n: usize,
    pub arrival_ms: u64,
    /// When the answer was decided (for a 2xx: when the platform "sent" it).
    pub answered_ms: Option<u64>,
    /// The gateway process that sent it (from the URL path).
    pub incarnation: String,
    /// `Idempotency-Key` (else the body's `idempotency_key`, else `stream_id`).
    pub key: String,
    pub channel: Option<String>,
    pub seq: Option<u64>,
    pub stream_id: Option<String>,
    pub action: Option<String>,
    pub outcome: Outcome,
}

impl Request {
    pub fn is_success(&self) -> bool {
        matches!(self.outcome, Outcome::Success { .. })
    }
}

#[derive(Debug)]
struct Inner {
    seed: u64,
    hang: Duration,
    requests: Mutex<Vec<Request>>,
    /// Idempotency key → the body of its first 2xx (`None`: bare).
    answered: Mutex<HashMap<String, Option<String>>>,
    /// Stream ids that got a 2xx (what the drain waits for).
    delivered: Mutex<HashSet<String>>,
    /// Active platform faults, oldest first: (id, fault, scope).
    faults: Mutex<Vec<(u64, PlatformFault, Scope)>>,
    message_ids: AtomicU64,
}

/// A cheap handle on the sink.
#[derive(Debug, Clone)]
pub struct Sink(Arc<Inner>);

impl Sink {
    /// Serves on a free loopback port; returns the handle and the base URL
    /// (`http://127.0.0.1:<port>/deliver`).
    pub async fn start(seed: u64, hang: Duration) -> std::io::Result<(Sink, String)> {
        let sink = Sink(Arc::new(Inner {
            seed,
            hang,
            requests: Mutex::default(),
            answered: Mutex::default(),
            delivered: Mutex::default(),
            faults: Mutex::default(),
            message_ids: AtomicU64::new(1),
        }));
        let app = Router::new()
            .route("/deliver/{incarnation}", post(deliver))
            // Larger than any payload a gateway should forward, so an
            // oversized entry sent anyway is recorded, not refused here.
            .layer(DefaultBodyLimit::max(64 << 20))
            .with_state(sink.clone());
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok((sink, format!("http://{addr}/deliver")))
    }

    pub fn fault_on(&self, id: u64, fault: PlatformFault, scope: Scope) {
        self.0.faults.lock().unwrap().push((id, fault, scope));
    }

    pub fn fault_off(&self, id: u64) {
        self.0.faults.lock().unwrap().retain(|(i, _, _)| *i != id);
    }

    pub fn clear_faults(&self) {
        self.0.faults.lock().unwrap().clear();
    }

    pub fn requests(&self) -> Vec<Request> {
        self.0.requests.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.0.requests.lock().unwrap().len()
    }

    pub fn is_delivered(&self, stream_id: &str) -> bool {
        self.0.delivered.lock().unwrap().contains(stream_id)
    }

    pub fn delivered_count(&self) -> usize {
        self.0.delivered.lock().unwrap().len()
    }

    fn mode_for(&self, channel: Option<&str>) -> Option<PlatformFault> {
        let faults = self.0.faults.lock().unwrap();
        faults
            .iter()
            .rev()
            .find(|(_, _, scope)| scope.covers(channel))
            .map(|(_, f, _)| *f)
    }

    fn set_outcome(&self, n: usize, outcome: Outcome) {
        let mut requests = self.0.requests.lock().unwrap();
        let r = &mut requests[n];
        r.outcome = outcome;
        r.answered_ms = Some(now_ms());
    }

    /// Decides and records the answer to request `n`.
    async fn answer(self, n: usize, key: String, mode: Option<PlatformFault>) -> Response {
        let h = mix(self.0.seed, fnv(&key) ^ (n as u64).rotate_left(32));
        match mode {
            Some(PlatformFault::Hang) => {
                tokio::time::sleep(self.0.hang).await;
                (StatusCode::SERVICE_UNAVAILABLE, "hung\n").into_response()
            }
            Some(PlatformFault::ServerError) => {
                let code = [500, 502, 503][(h % 3) as usize];
                self.set_outcome(n, Outcome::Status(code));
                let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
                (status, "{\"error\": \"injected\"}").into_response()
            }
            Some(PlatformFault::RateLimited) => {
                let secs = 1 + h % 3;
                self.set_outcome(n, Outcome::Status(429));
                let mut r = (
                    StatusCode::TOO_MANY_REQUESTS,
                    "{\"error\": \"rate limited\"}",
                )
                    .into_response();
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
                r
            }
            Some(PlatformFault::Slow) => {
                tokio::time::sleep(Duration::from_millis(1000 + h % 3000)).await;
                self.success(n, &key, None)
            }
            Some(PlatformFault::Bare) => self.success(n, &key, Some(true)),
            None => self.success(n, &key, None),
        }
    }

    /// A 2xx: the first for `key` picks the body, a repeat replays it.
    fn success(&self, n: usize, key: &str, bare: Option<bool>) -> Response {
        let (body, replay) = {
            let mut answered = self.0.answered.lock().unwrap();
            match answered.get(key) {
                Some(body) => (body.clone(), true),
                None => {
                    let bare = bare.unwrap_or(mix(self.0.seed, fnv(key)).is_multiple_of(4));
                    let body = (!bare).then(|| {
                        let id = self.0.message_ids.fetch_add(1, Ordering::Relaxed);
                        format!("{{\"message_id\": \"m{id}\"}}")
                    });
                    answered.insert(key.to_owned(), body.clone());
                    (body, false)
                }
            }
        };
        let stream_id = {
            let mut requests = self.0.requests.lock().unwrap();
            let r = &mut requests[n];
            r.outcome = Outcome::Success {
                replay,
                with_id: body.is_some(),
            };
            r.answered_ms = Some(now_ms());
            r.stream_id.clone()
        };
        if let Some(id) = stream_id {
            self.0.delivered.lock().unwrap().insert(id);
        }
        match body {
            Some(b) => {
                let mut r = (StatusCode::OK, b).into_response();
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r
            }
            None => StatusCode::OK.into_response(),
        }
    }
}

async fn deliver(
    State(sink): State<Sink>,
    Path(incarnation): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let arrival_ms = now_ms();
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let str_of = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let stream_id = str_of("stream_id");
    let key = headers
        .get("idempotency-key")
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| str_of("idempotency_key"))
        .or_else(|| stream_id.clone())
        .unwrap_or_default();
    let channel = str_of("channel_id");
    let seq = v.get("seq").and_then(|s| {
        s.as_u64()
            .or_else(|| s.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as u64))
    });
    let mode = sink.mode_for(channel.as_deref());
    let n = {
        let mut requests = sink.0.requests.lock().unwrap();
        let n = requests.len();
        requests.push(Request {
            n,
            arrival_ms,
            answered_ms: None,
            incarnation,
            key: key.clone(),
            channel,
            seq,
            stream_id,
            action: str_of("action"),
            outcome: if mode == Some(PlatformFault::Hang) {
                Outcome::Hang
            } else {
                Outcome::Pending
            },
        });
        n
    };
    // Decided apart from this connection: see the module docs.
    match tokio::spawn(sink.answer(n, key, mode)).await {
        Ok(r) => r,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
