//! The Matrix adapter: delivers actions to a homeserver through the
//! client-server API v3 (plain `reqwest` + serde), fetches room history, and
//! runs the `/sync` loop that turns what users do into inbound events.
//!
//! Outbound, per action (the channel is a room id, `!abc:server`):
//!
//! * `message` → `m.room.message` / `m.text` with an HTML-escaped
//!   `formatted_body`, and `m.relates_to.m.in_reply_to` for `reply_to`.
//! * `buttons` (and a message with buttons) → the same, the buttons rendered as
//!   a numbered list (Matrix has no buttons); the room's last buttons message is
//!   remembered so a reply naming a number (or a keycap reaction) maps back to
//!   the button's `custom_id` as an inbound `button` event.
//! * `file` → `POST /_matrix/media/v3/upload`, then `m.image` (image/*) or `m.file`.
//! * `typing` / `stop_typing` → `PUT /rooms/{room}/typing/{user}`.
//! * `reaction` → an `m.reaction` annotation.
//! * `presence` → `PUT /presence/{user}/status` with `status_msg`.
//!
//! Every send's transaction id is derived from the delivery's idempotency key
//! (hex of SHA-256, 32 digits), so a resend after a crash is answered with the
//! original event id and makes no second event (G2).
//!
//! Errors: `M_LIMIT_EXCEEDED` (or a 429) waits `retry_after_ms` (or
//! `Retry-After`); other 4xx (`M_FORBIDDEN`, `M_UNKNOWN_TOKEN`, `M_NOT_FOUND`, …)
//! are permanent, with the errcode and the server's text; 5xx, 408 and
//! transport failures are transient.
//!
//! Inbound: [`MatrixAdapter::run_sync`] long-polls `/sync`, keeps the `since`
//! token in Redis (`sg:{P}:matrix:since`) so a restart resumes where it
//! stopped, skips the bot's own events, and publishes `message`, `reaction`,
//! `button` and `invite` events (joining invited rooms when `auto_join`). The
//! very first sync of a platform (no stored token) only takes the position and
//! the pending invites: old room history is not replayed as new messages.
//! Delivery to the inbound stream is at least once: the token is stored after
//! the batch's events are published.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::bus::Conn;
use redis::AsyncCommands;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Adapter, AdapterError, BoxFuture, Capabilities, Delivered, Delivery, HistoryMessage};
use crate::envelope::{Action, Button};
use crate::inbound::{InboundEvent, InboundPublisher};

/// How long to wait after a rate limit that names no wait.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// The longest wait a rate limit can ask for; longer asks are capped.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// How much of the server's error text goes into an error.
const MAX_MESSAGE_CHARS: usize = 200;
/// Typing notifications last this long unless the envelope expires sooner.
const DEFAULT_TYPING: Duration = Duration::from_secs(30);
/// Most history messages one call returns.
const MAX_HISTORY: usize = 100;
/// Events of one room one sync returns at most.
const SYNC_TIMELINE_LIMIT: u32 = 100;

/// What a `[[platform]]` table with `adapter = "matrix"` configures.
#[derive(Clone)]
pub struct MatrixSettings {
    /// The homeserver's base URL (`https://matrix.example.org`).
    pub homeserver: String,
    pub access_token: String,
    /// The bot's own user id (`@bot:example.org`).
    pub user_id: String,
    /// Join rooms the bot is invited to.
    pub auto_join: bool,
    /// How long one `/sync` long-poll waits on the server.
    pub sync_timeout: Duration,
    /// Whole-request timeout of every other call.
    pub request_timeout: Duration,
}

impl fmt::Debug for MatrixSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MatrixSettings")
            .field("homeserver", &self.homeserver)
            .field("access_token", &"<redacted>")
            .field("user_id", &self.user_id)
            .field("auto_join", &self.auto_join)
            .field("sync_timeout", &self.sync_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

/// The last buttons message of a room, to map a pick back to its `custom_id`.
#[derive(Debug, Clone)]
struct ButtonsMessage {
    event_id: String,
    buttons: Vec<Button>,
}

/// Delivers actions to one Matrix account; see the module docs.
pub struct MatrixAdapter {
    platform: String,
    base: String,
    auth: HeaderValue,
    user_id: String,
    auto_join: bool,
    sync_timeout: Duration,
    client: reqwest::Client,
    sync_client: reqwest::Client,
    buttons: Mutex<HashMap<String, ButtonsMessage>>,
    synced: AtomicBool,
}

impl fmt::Debug for MatrixAdapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MatrixAdapter")
            .field("platform", &self.platform)
            .field("homeserver", &self.base)
            .field("user_id", &self.user_id)
            .field("access_token", &"<redacted>")
            .field("auto_join", &self.auto_join)
            .finish_non_exhaustive()
    }
}

/// A request body.
enum Body {
    None,
    Json(Value),
    Bytes(Vec<u8>, String),
}

impl MatrixAdapter {
    /// An adapter for `platform` with `settings`; fails, naming the problem, on
    /// a bad homeserver URL, an empty token or a malformed user id.
    pub fn new(platform: &str, settings: MatrixSettings) -> Result<Self, String> {
        let url = Url::parse(&settings.homeserver)
            .map_err(|e| format!("matrix homeserver is not a valid URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "matrix homeserver must be http or https, not `{}`",
                url.scheme()
            ));
        }
        if settings.access_token.trim().is_empty() {
            return Err("matrix access token is empty".into());
        }
        if !valid_user_id(&settings.user_id) {
            return Err(format!(
                "matrix user_id `{}` must look like @name:server",
                settings.user_id
            ));
        }
        if settings.request_timeout.is_zero() {
            return Err("matrix request timeout must be greater than zero".into());
        }
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", settings.access_token))
            .map_err(|_| "matrix access token cannot be sent as an HTTP header".to_owned())?;
        auth.set_sensitive(true);
        let build = |timeout: Duration| {
            reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(settings.request_timeout.min(Duration::from_secs(10)))
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("stargazer/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| format!("could not build the HTTP client: {e}"))
        };
        Ok(Self {
            platform: platform.to_owned(),
            base: url.as_str().trim_end_matches('/').to_owned(),
            auth,
            user_id: settings.user_id.clone(),
            auto_join: settings.auto_join,
            sync_timeout: settings.sync_timeout,
            client: build(settings.request_timeout)?,
            sync_client: build(settings.sync_timeout + settings.request_timeout)?,
            buttons: Mutex::new(HashMap::new()),
            synced: AtomicBool::new(false),
        })
    }

    /// The bot's own user id.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// One call to the homeserver: `path` starts with `/_matrix/`, its
    /// variable segments already encoded with [`seg`]. The JSON answer, or
    /// the failure classified.
    async fn call_api(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Body,
        long_poll: bool,
    ) -> Result<Value, AdapterError> {
        let client = if long_poll {
            &self.sync_client
        } else {
            &self.client
        };
        let mut req = client
            .request(method.clone(), format!("{}{path}", self.base))
            .header(AUTHORIZATION, self.auth.clone());
        if !query.is_empty() {
            req = req.query(query);
        }
        req = match body {
            Body::None => req,
            Body::Json(v) => req.json(&v),
            Body::Bytes(data, mime) => req.header(CONTENT_TYPE, mime).body(data),
        };
        // The path names rooms and users but never the token.
        let what = format!("{method} {}", path.split('?').next().unwrap_or(path));
        let resp = req.send().await.map_err(|e| {
            AdapterError::transient(format!("matrix {what} failed: {}", e.without_url()))
        })?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = resp.bytes().await.map_err(|e| {
            AdapterError::transient(format!(
                "matrix {what}: reading the answer failed: {}",
                e.without_url()
            ))
        })?;
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&bytes).map_err(|e| {
                AdapterError::transient(format!("matrix {what}: answer is not JSON: {e}"))
            });
        }
        Err(classify(&what, status, retry_after, &bytes))
    }

    /// `PUT /rooms/{room}/send/{type}/{txn}`: the event id.
    async fn send_event(
        &self,
        room: &str,
        event_type: &str,
        txn: &str,
        content: Value,
    ) -> Result<String, AdapterError> {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/{}/{}",
            seg(room),
            seg(event_type),
            seg(txn)
        );
        let v = self
            .call_api(Method::PUT, &path, &[], Body::Json(content), false)
            .await?;
        v.get("event_id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| AdapterError::transient("matrix send answered without event_id"))
    }

    /// Upload `data` to the media repository: its `mxc://` URI.
    async fn upload(
        &self,
        data: Vec<u8>,
        filename: &str,
        mime: &str,
    ) -> Result<String, AdapterError> {
        let v = self
            .call_api(
                Method::POST,
                "/_matrix/media/v3/upload",
                &[("filename", filename)],
                Body::Bytes(data, mime.to_owned()),
                false,
            )
            .await?;
        v.get("content_uri")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| AdapterError::transient("matrix upload answered without content_uri"))
    }

    async fn send_text(
        &self,
        room: &str,
        txn: &str,
        text: &str,
        reply_to: Option<&str>,
        buttons: &[Button],
    ) -> Result<String, AdapterError> {
        let mut content = text_content(text, buttons);
        if let Some(parent) = reply_to {
            content.insert(
                "m.relates_to".into(),
                json!({"m.in_reply_to": {"event_id": parent}}),
            );
        }
        let event_id = self
            .send_event(room, "m.room.message", txn, Value::Object(content))
            .await?;
        if buttons.iter().any(|b| b.custom_id.is_some()) {
            self.buttons.lock().expect("buttons lock").insert(
                room.to_owned(),
                ButtonsMessage {
                    event_id: event_id.clone(),
                    buttons: buttons.to_vec(),
                },
            );
        }
        Ok(event_id)
    }

    async fn send_file(
        &self,
        room: &str,
        txn: &str,
        data: &[u8],
        filename: &str,
        mime: &str,
        caption: Option<&str>,
    ) -> Result<String, AdapterError> {
        let size = data.len();
        let uri = self.upload(data.to_vec(), filename, mime).await?;
        let msgtype = if mime.starts_with("image/") {
            "m.image"
        } else {
            "m.file"
        };
        // Matrix 1.10 captions: `body` is the caption when `filename` differs.
        let body = caption.filter(|c| !c.is_empty()).unwrap_or(filename);
        let content = json!({
            "msgtype": msgtype,
            "body": body,
            "filename": filename,
            "url": uri,
            "info": {"mimetype": mime, "size": size},
        });
        self.send_event(room, "m.room.message", txn, content).await
    }

    async fn typing(&self, room: &str, on: bool, ttl: Duration) -> Result<(), AdapterError> {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/typing/{}",
            seg(room),
            seg(&self.user_id)
        );
        let body = if on {
            json!({"typing": true, "timeout": ttl.as_millis() as u64})
        } else {
            json!({"typing": false})
        };
        self.call_api(Method::PUT, &path, &[], Body::Json(body), false)
            .await
            .map(|_| ())
    }

    async fn presence(&self, text: Option<&str>, emoji: Option<&str>) -> Result<(), AdapterError> {
        let path = format!("/_matrix/client/v3/presence/{}/status", seg(&self.user_id));
        let status = match (emoji, text) {
            (Some(e), Some(t)) => Some(format!("{e} {t}")),
            (Some(e), None) => Some(e.to_owned()),
            (None, Some(t)) => Some(t.to_owned()),
            (None, None) => None,
        };
        let mut body = json!({"presence": "online"});
        if let Some(s) = status {
            body["status_msg"] = Value::from(s);
        }
        self.call_api(Method::PUT, &path, &[], Body::Json(body), false)
            .await
            .map(|_| ())
    }

    async fn join(&self, room: &str) -> Result<(), AdapterError> {
        let path = format!("/_matrix/client/v3/join/{}", seg(room));
        self.call_api(Method::POST, &path, &[], Body::Json(json!({})), false)
            .await
            .map(|_| ())
    }

    async fn deliver_inner(&self, d: &Delivery<'_>) -> Result<Delivered, AdapterError> {
        let env = d.envelope;
        let room = || {
            env.channel_id
                .as_ref()
                .map(|c| c.0.as_str())
                .filter(|c| !c.is_empty())
                .ok_or_else(|| {
                    AdapterError::permanent("a matrix delivery needs channel_id (a room id)")
                })
        };
        let txn = txn_id(d.idempotency_key);
        let sent = |id: String| Delivered {
            message_id: Some(id),
        };
        match &env.action {
            Action::Message {
                text,
                reply_to,
                buttons,
            } => self
                .send_text(room()?, &txn, text, reply_to.as_deref(), buttons)
                .await
                .map(sent),
            Action::Buttons { text, buttons } => self
                .send_text(room()?, &txn, text, None, buttons)
                .await
                .map(sent),
            Action::File {
                data,
                filename,
                mimetype,
                text,
            } => self
                .send_file(room()?, &txn, data, filename, mimetype, text.as_deref())
                .await
                .map(sent),
            Action::StartTyping => {
                let ttl = match env.expires_ms {
                    Some(at) => Duration::from_millis(at.saturating_sub(crate::now_ms()))
                        .clamp(Duration::from_secs(1), Duration::from_secs(120)),
                    None => DEFAULT_TYPING,
                };
                self.typing(room()?, true, ttl).await?;
                Ok(Delivered::default())
            }
            Action::StopTyping => {
                self.typing(room()?, false, Duration::ZERO).await?;
                Ok(Delivered::default())
            }
            Action::Reaction { message_id, emoji } => {
                let content = json!({"m.relates_to": {
                    "rel_type": "m.annotation", "event_id": message_id, "key": emoji}});
                self.send_event(room()?, "m.reaction", &txn, content)
                    .await
                    .map(sent)
            }
            Action::Presence { text, emoji } => {
                self.presence(text.as_deref(), emoji.as_deref()).await?;
                Ok(Delivered::default())
            }
            Action::Edit { .. } | Action::Delete { .. } => Err(AdapterError::permanent(format!(
                "the {} adapter does not edit or delete messages yet",
                self.kind()
            ))),
            Action::Rpc { method, .. } => Err(AdapterError::permanent(format!(
                "rpc_request `{method}` is answered by the gateway, not delivered to matrix"
            ))),
        }
    }

    /// `GET /rooms/{room}/messages?dir=b`: the latest `limit` messages, oldest first.
    async fn history(&self, room: &str, limit: usize) -> Result<Vec<HistoryMessage>, AdapterError> {
        let limit = limit.clamp(1, MAX_HISTORY).to_string();
        let filter = json!({"types": ["m.room.message"]}).to_string();
        let path = format!("/_matrix/client/v3/rooms/{}/messages", seg(room));
        let v = self
            .call_api(
                Method::GET,
                &path,
                &[("dir", "b"), ("limit", &limit), ("filter", &filter)],
                Body::None,
                false,
            )
            .await?;
        let mut out: Vec<HistoryMessage> = v
            .get("chunk")
            .and_then(Value::as_array)
            .map(|c| c.iter().filter_map(|e| self.history_message(e)).collect())
            .unwrap_or_default();
        out.reverse();
        Ok(out)
    }

    fn history_message(&self, ev: &Value) -> Option<HistoryMessage> {
        let content = ev.get("content")?.as_object()?;
        let body = content.get("body")?.as_str()?;
        let sender = ev.get("sender")?.as_str()?;
        let reply_to = reply_target(content);
        Some(HistoryMessage {
            user_id: sender.to_owned(),
            user_name: localpart(sender).to_owned(),
            text: strip_reply_fallback(body, reply_to.is_some()),
            timestamp: ev
                .get("origin_server_ts")
                .and_then(Value::as_f64)
                .unwrap_or(0.0)
                / 1000.0,
            message_id: ev.get("event_id")?.as_str()?.to_owned(),
            is_bot: sender == self.user_id,
            reply_to_id: reply_to,
            reactions: Vec::new(),
        })
    }

    /// The inline filter of every `/sync`: only what becomes inbound events.
    fn sync_filter() -> String {
        json!({
            "presence": {"types": []},
            "account_data": {"types": []},
            "room": {
                "timeline": {"limit": SYNC_TIMELINE_LIMIT, "types": ["m.room.message", "m.reaction"]},
                "state": {"types": ["m.room.member"], "lazy_load_members": true},
                "ephemeral": {"types": []},
                "account_data": {"types": []},
            },
        })
        .to_string()
    }

    /// One `/sync` call from `since` (or the first, which does not wait).
    async fn sync_once(&self, since: Option<&str>) -> Result<Value, AdapterError> {
        let filter = Self::sync_filter();
        let timeout = if since.is_some() {
            self.sync_timeout.as_millis().to_string()
        } else {
            "0".to_owned()
        };
        let mut query = vec![("filter", filter.as_str()), ("timeout", timeout.as_str())];
        if let Some(s) = since {
            query.push(("since", s));
        }
        self.call_api(
            Method::GET,
            "/_matrix/client/v3/sync",
            &query,
            Body::None,
            true,
        )
        .await
    }

    /// Long-poll `/sync` until `stop`, publishing inbound events and keeping
    /// the position in `since_key` (see the module docs).
    pub async fn run_sync(
        self: std::sync::Arc<Self>,
        inbound: InboundPublisher,
        mut conn: Conn,
        since_key: String,
        stop: CancellationToken,
    ) {
        let mut backoff = Duration::from_secs(1);
        let mut since: Option<String> = loop {
            let r: redis::RedisResult<Option<String>> = tokio::select! {
                r = conn.get(&since_key) => r,
                _ = stop.cancelled() => return,
            };
            match r {
                Ok(s) => break s,
                Err(e) => {
                    warn!(platform = %self.platform, error = %e, "matrix: reading the sync position failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        };
        info!(platform = %self.platform, resume = since.is_some(), "matrix sync loop started");
        backoff = Duration::from_secs(1);
        while !stop.is_cancelled() {
            let r = tokio::select! {
                r = self.sync_once(since.as_deref()) => r,
                _ = stop.cancelled() => break,
            };
            let resp = match r {
                Ok(v) => v,
                Err(e) => {
                    let wait = match e.retry {
                        super::Retry::After(d) => d,
                        _ => backoff,
                    };
                    warn!(platform = %self.platform, error = %e.message, wait_ms = wait.as_millis() as u64, "matrix sync failed; retrying");
                    self.synced.store(false, Ordering::Relaxed);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
            backoff = Duration::from_secs(1);
            let Some(next) = resp.get("next_batch").and_then(Value::as_str) else {
                warn!(platform = %self.platform, "matrix sync answered without next_batch");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            let events = self.events_of(&resp, since.is_none()).await;
            let mut published = true;
            for ev in &events {
                if let Err(e) = inbound.publish(ev).await {
                    warn!(platform = %self.platform, error = %e, "matrix: publishing an inbound event failed; the batch will be fetched again");
                    published = false;
                    break;
                }
            }
            if !published {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            if let Err(e) = conn.set::<_, _, ()>(&since_key, next).await {
                warn!(platform = %self.platform, error = %e, "matrix: storing the sync position failed");
            }
            since = Some(next.to_owned());
            self.synced.store(true, Ordering::Relaxed);
        }
        info!(platform = %self.platform, "matrix sync loop stopped");
    }

    /// The inbound events of one sync answer (joining invited rooms on the way).
    async fn events_of(&self, resp: &Value, initial: bool) -> Vec<InboundEvent> {
        let mut out = Vec::new();
        let rooms = resp.get("rooms");
        if let Some(invites) = rooms
            .and_then(|r| r.get("invite"))
            .and_then(Value::as_object)
        {
            for (room, inv) in invites {
                let inviter = inv
                    .pointer("/invite_state/events")
                    .and_then(Value::as_array)
                    .and_then(|evs| {
                        evs.iter().find(|e| {
                            e.get("type").and_then(Value::as_str) == Some("m.room.member")
                                && e.get("state_key").and_then(Value::as_str)
                                    == Some(self.user_id.as_str())
                        })
                    })
                    .and_then(|e| e.get("sender").and_then(Value::as_str))
                    .unwrap_or_default()
                    .to_owned();
                let joined = if self.auto_join {
                    match self.join(room).await {
                        Ok(()) => true,
                        Err(e) => {
                            warn!(platform = %self.platform, room = %room, error = %e.message, "matrix: joining an invited room failed");
                            false
                        }
                    }
                } else {
                    false
                };
                let mut ev = self.event("invite", room, &inviter, crate::now_ms());
                ev.extra.insert("joined".into(), Value::Bool(joined));
                out.push(ev);
            }
        }
        if initial {
            return out;
        }
        let Some(joined) = rooms.and_then(|r| r.get("join")).and_then(Value::as_object) else {
            return out;
        };
        for (room, data) in joined {
            let Some(timeline) = data.pointer("/timeline/events").and_then(Value::as_array) else {
                continue;
            };
            for ev in timeline {
                if let Some(e) = self.timeline_event(room, ev) {
                    out.push(e);
                }
            }
        }
        out
    }

    fn event(&self, kind: &str, room: &str, sender: &str, ts_ms: u64) -> InboundEvent {
        InboundEvent {
            kind: kind.into(),
            platform: self.platform.clone(),
            channel_id: room.into(),
            user_id: sender.into(),
            user_name: localpart(sender).into(),
            text: None,
            message_id: None,
            reply_to: None,
            emoji: None,
            custom_id: None,
            ts_ms,
            extra: Map::new(),
        }
    }

    /// One timeline event as an inbound event, or `None` for what is not one
    /// (the bot's own, state, edits, redacted).
    fn timeline_event(&self, room: &str, ev: &Value) -> Option<InboundEvent> {
        let sender = ev.get("sender")?.as_str()?;
        if sender == self.user_id || ev.get("state_key").is_some() {
            return None;
        }
        let event_id = ev.get("event_id")?.as_str()?;
        let content = ev.get("content")?.as_object()?;
        let ts = ev
            .get("origin_server_ts")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        match ev.get("type")?.as_str()? {
            "m.room.message" => {
                let relates = content.get("m.relates_to");
                if relates
                    .and_then(|r| r.get("rel_type"))
                    .and_then(Value::as_str)
                    == Some("m.replace")
                {
                    return None;
                }
                let body = content.get("body")?.as_str()?;
                let reply_to = reply_target(content);
                let text = strip_reply_fallback(body, reply_to.is_some());
                let picked = reply_to
                    .as_deref()
                    .and_then(|parent| self.pick(room, parent, text.trim(), true));
                let mut e = match picked {
                    Some(custom_id) => {
                        let mut e = self.event("button", room, sender, ts);
                        e.custom_id = Some(custom_id);
                        e.message_id = reply_to.clone();
                        e.extra.insert("event_id".into(), Value::from(event_id));
                        e
                    }
                    None => {
                        let mut e = self.event("message", room, sender, ts);
                        e.message_id = Some(event_id.to_owned());
                        e.reply_to = reply_to;
                        e
                    }
                };
                e.text = Some(text);
                if let Some(t) = content.get("msgtype").and_then(Value::as_str) {
                    e.extra.insert("msgtype".into(), Value::from(t));
                }
                Some(e)
            }
            "m.reaction" => {
                let rel = content.get("m.relates_to")?;
                if rel.get("rel_type").and_then(Value::as_str) != Some("m.annotation") {
                    return None;
                }
                let target = rel.get("event_id")?.as_str()?;
                let key = rel.get("key")?.as_str()?;
                let mut e = match self.pick(room, target, key, false) {
                    Some(custom_id) => {
                        let mut e = self.event("button", room, sender, ts);
                        e.custom_id = Some(custom_id);
                        e.text = Some(key.to_owned());
                        e
                    }
                    None => {
                        let mut e = self.event("reaction", room, sender, ts);
                        e.emoji = Some(key.to_owned());
                        e
                    }
                };
                e.message_id = Some(target.to_owned());
                e.extra.insert("event_id".into(), Value::from(event_id));
                Some(e)
            }
            _ => None,
        }
    }

    /// The `custom_id` a reply's text (a number or a label) or a reaction's
    /// key (a keycap digit) picks on the room's last buttons message `parent`.
    fn pick(&self, room: &str, parent: &str, choice: &str, by_label: bool) -> Option<String> {
        let guard = self.buttons.lock().expect("buttons lock");
        let msg = guard.get(room).filter(|m| m.event_id == parent)?;
        let index = number_of(choice)
            .filter(|n| (1..=msg.buttons.len()).contains(n))
            .map(|n| n - 1)
            .or_else(|| {
                by_label
                    .then(|| {
                        msg.buttons
                            .iter()
                            .position(|b| b.label.trim().eq_ignore_ascii_case(choice))
                    })
                    .flatten()
            })?;
        msg.buttons[index].custom_id.clone()
    }
}

impl Adapter for MatrixAdapter {
    fn kind(&self) -> &'static str {
        "matrix"
    }

    fn capabilities(&self) -> Capabilities {
        // Edits (m.replace) and redactions arrive with the Matrix issue.
        Capabilities {
            edits: false,
            ..Capabilities::ALL
        }
    }

    fn ready(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    fn deliver<'a>(
        &'a self,
        delivery: Delivery<'a>,
    ) -> BoxFuture<'a, Result<Delivered, AdapterError>> {
        Box::pin(async move { self.deliver_inner(&delivery).await })
    }

    fn fetch_history<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<HistoryMessage>, AdapterError>> {
        Box::pin(async move { self.history(channel, limit).await })
    }
}

/// The transaction id of a send: 32 hex digits of SHA-256 of the delivery's
/// idempotency key, the same for every retry and redelivery of the entry.
pub fn txn_id(idempotency_key: &str) -> String {
    let digest = Sha256::digest(idempotency_key.as_bytes());
    format!("sg{}", &hex::encode(digest)[..32])
}

/// `s` percent-encoded as one URL path segment (everything but unreserved
/// characters), so `!room:server`, `@user:server` and `$event` stay one segment.
pub fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `@name:server` → `name`.
fn localpart(user_id: &str) -> &str {
    let s = user_id.strip_prefix('@').unwrap_or(user_id);
    s.split(':').next().unwrap_or(s)
}

fn valid_user_id(s: &str) -> bool {
    s.strip_prefix('@')
        .and_then(|rest| rest.split_once(':'))
        .is_some_and(|(name, server)| !name.is_empty() && !server.is_empty())
}

/// `text` escaped for HTML, newlines as `<br>`.
pub fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\n' => out.push_str("<br>"),
            c => out.push(c),
        }
    }
    out
}

/// The content of an `m.text` message, the buttons (if any) as a numbered list.
fn text_content(text: &str, buttons: &[Button]) -> Map<String, Value> {
    let mut body = text.to_owned();
    let mut html = html_escape(text);
    if !buttons.is_empty() {
        html.push_str("<ol>");
        for (i, b) in buttons.iter().enumerate() {
            body.push_str(&format!("\n{}. {}", i + 1, b.label));
            match &b.url {
                Some(url) => {
                    body.push_str(&format!(" ({url})"));
                    html.push_str(&format!(
                        "<li><a href=\"{}\">{}</a></li>",
                        html_escape(url),
                        html_escape(&b.label)
                    ));
                }
                None => html.push_str(&format!("<li>{}</li>", html_escape(&b.label))),
            }
        }
        html.push_str("</ol>");
    }
    let mut m = Map::new();
    m.insert("msgtype".into(), Value::from("m.text"));
    m.insert("body".into(), Value::from(body));
    m.insert("format".into(), Value::from("org.matrix.custom.html"));
    m.insert("formatted_body".into(), Value::from(html));
    if !buttons.is_empty() {
        m.insert(
            "org.stargazer.buttons".into(),
            serde_json::to_value(buttons).unwrap_or(Value::Null),
        );
    }
    m
}

/// The event a message replies to.
fn reply_target(content: &Map<String, Value>) -> Option<String> {
    content
        .get("m.relates_to")?
        .get("m.in_reply_to")?
        .get("event_id")?
        .as_str()
        .map(str::to_owned)
}

/// A reply's body without the quoted fallback (`> <@x:y> …` lines and the
/// blank line after them) that older clients put first.
fn strip_reply_fallback(body: &str, is_reply: bool) -> String {
    if !is_reply || !body.starts_with("> ") {
        return body.to_owned();
    }
    let mut lines = body.lines().skip_while(|l| l.starts_with('>'));
    let rest: Vec<&str> = match lines.next() {
        Some("") => lines.collect(),
        Some(first) => std::iter::once(first).chain(lines).collect(),
        None => Vec::new(),
    };
    rest.join("\n")
}

/// A number picked by a reply (`2`, `2.`, `#2`) or a keycap emoji (`2️⃣`, `🔟`).
fn number_of(s: &str) -> Option<usize> {
    let s = s.trim();
    if s == "🔟" {
        return Some(10);
    }
    let s = s.replace('\u{fe0f}', "");
    let s = s.strip_suffix('\u{20e3}').unwrap_or(&s);
    let s = s.trim_start_matches('#').trim_end_matches(['.', ')']);
    s.parse::<usize>().ok()
}

/// Classify a non-2xx answer: see the module docs.
fn classify(
    what: &str,
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
) -> AdapterError {
    let parsed: Option<Map<String, Value>> = serde_json::from_slice(body).ok();
    let field = |k: &str| {
        parsed
            .as_ref()
            .and_then(|m| m.get(k))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let errcode = field("errcode");
    let error = field("error").or_else(|| {
        let t = String::from_utf8_lossy(body);
        let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
        (!t.is_empty()).then_some(t)
    });
    let mut message = format!("matrix {what} answered {}", status.as_u16());
    if let Some(code) = &errcode {
        message.push(' ');
        message.push_str(code);
    }
    if let Some(text) = error {
        message.push_str(": ");
        match text.char_indices().nth(MAX_MESSAGE_CHARS) {
            Some((i, _)) => {
                message.push_str(&text[..i]);
                message.push('…');
            }
            None => message.push_str(&text),
        }
    }
    if status == StatusCode::TOO_MANY_REQUESTS || errcode.as_deref() == Some("M_LIMIT_EXCEEDED") {
        let after = parsed
            .as_ref()
            .and_then(|m| m.get("retry_after_ms"))
            .and_then(Value::as_u64)
            .map(Duration::from_millis)
            .or(retry_after)
            .unwrap_or(DEFAULT_RETRY_AFTER)
            .min(MAX_RETRY_AFTER);
        return AdapterError::rate_limited(after, format!("{message} (retry after {after:?})"));
    }
    if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
        return AdapterError::transient(message);
    }
    AdapterError::permanent(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::Retry;

    fn settings() -> MatrixSettings {
        MatrixSettings {
            homeserver: "http://127.0.0.1:9/".into(),
            access_token: "syt_s3cret".into(),
            user_id: "@bot:localhost".into(),
            auto_join: true,
            sync_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn txn_ids_are_stable_and_short() {
        assert_eq!(txn_id("k1"), txn_id("k1"));
        assert_ne!(txn_id("k1"), txn_id("k2"));
        assert_eq!(txn_id("k1").len(), 34);
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(seg("!abc:localhost"), "%21abc%3Alocalhost");
        assert_eq!(seg("@bot:x/y"), "%40bot%3Ax%2Fy");
        assert_eq!(seg("$ev?#"), "%24ev%3F%23");
        assert_eq!(seg("a-b_c.d~"), "a-b_c.d~");
    }

    #[test]
    fn html_is_escaped_and_buttons_numbered() {
        assert_eq!(
            html_escape("<b>&\"x'\ny"),
            "&lt;b&gt;&amp;&quot;x&#39;<br>y"
        );
        let buttons = vec![
            Button {
                label: "Yes".into(),
                custom_id: Some("yes".into()),
                url: None,
                style: None,
            },
            Button {
                label: "Docs <1>".into(),
                custom_id: None,
                url: Some("https://e.org/?a=1&b=2".into()),
                style: None,
            },
        ];
        let c = text_content("Pick", &buttons);
        assert_eq!(
            c["body"],
            "Pick\n1. Yes\n2. Docs <1> (https://e.org/?a=1&b=2)"
        );
        assert_eq!(
            c["formatted_body"],
            "Pick<ol><li>Yes</li><li><a href=\"https://e.org/?a=1&amp;b=2\">Docs &lt;1&gt;</a></li></ol>"
        );
    }

    #[test]
    fn picks_read_numbers_and_keycaps() {
        assert_eq!(number_of("2"), Some(2));
        assert_eq!(number_of(" #3. "), Some(3));
        assert_eq!(number_of("1\u{fe0f}\u{20e3}"), Some(1));
        assert_eq!(number_of("4\u{20e3}"), Some(4));
        assert_eq!(number_of("🔟"), Some(10));
        assert_eq!(number_of("yes"), None);
    }

    #[test]
    fn reply_fallbacks_are_stripped() {
        assert_eq!(strip_reply_fallback("> <@a:b> hi\n> there\n\n2", true), "2");
        assert_eq!(strip_reply_fallback("> quote", false), "> quote");
        assert_eq!(strip_reply_fallback("plain", true), "plain");
    }

    #[test]
    fn errors_are_classified() {
        let c = |status: u16, body: &str, header: Option<u64>| {
            classify(
                "PUT /x",
                StatusCode::from_u16(status).unwrap(),
                header.map(Duration::from_secs),
                body.as_bytes(),
            )
        };
        let e = c(
            429,
            r#"{"errcode":"M_LIMIT_EXCEEDED","error":"Too Many Requests","retry_after_ms":1378}"#,
            Some(2),
        );
        assert_eq!(e.retry, Retry::After(Duration::from_millis(1378)));
        assert_eq!(
            c(429, "", Some(2)).retry,
            Retry::After(Duration::from_secs(2))
        );
        assert_eq!(c(429, "", None).retry, Retry::After(DEFAULT_RETRY_AFTER));
        let e = c(
            403,
            r#"{"errcode":"M_FORBIDDEN","error":"User not in room"}"#,
            None,
        );
        assert_eq!(e.retry, Retry::Never);
        assert_eq!(
            e.message,
            "matrix PUT /x answered 403 M_FORBIDDEN: User not in room"
        );
        assert_eq!(
            c(401, r#"{"errcode":"M_UNKNOWN_TOKEN","error":"x"}"#, None).retry,
            Retry::Never
        );
        assert_eq!(
            c(404, r#"{"errcode":"M_NOT_FOUND"}"#, None).retry,
            Retry::Never
        );
        assert_eq!(c(502, "bad gateway", None).retry, Retry::Backoff);
        assert_eq!(c(408, "", None).retry, Retry::Backoff);
    }

    #[test]
    fn construction_checks_inputs_and_hides_the_token() {
        let a = MatrixAdapter::new("mx", settings()).unwrap();
        let debug = format!("{a:?} {:?}", settings());
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("<redacted>"));
        assert_eq!(a.base, "http://127.0.0.1:9");
        let bad = |f: fn(&mut MatrixSettings)| {
            let mut s = settings();
            f(&mut s);
            MatrixAdapter::new("mx", s).is_err()
        };
        assert!(bad(|s| s.homeserver = "nope".into()));
        assert!(bad(|s| s.homeserver = "ftp://x".into()));
        assert!(bad(|s| s.access_token = " ".into()));
        assert!(bad(|s| s.user_id = "bot".into()));
        assert!(bad(|s| s.user_id = "@bot".into()));
        assert!(bad(|s| s.request_timeout = Duration::ZERO));
    }

    #[test]
    fn picks_map_back_to_custom_ids() {
        let a = MatrixAdapter::new("mx", settings()).unwrap();
        a.buttons.lock().unwrap().insert(
            "!r".into(),
            ButtonsMessage {
                event_id: "$b".into(),
                buttons: vec![
                    Button {
                        label: "Yes".into(),
                        custom_id: Some("yes".into()),
                        url: None,
                        style: None,
                    },
                    Button {
                        label: "No".into(),
                        custom_id: Some("no".into()),
                        url: None,
                        style: None,
                    },
                ],
            },
        );
        assert_eq!(a.pick("!r", "$b", "2", true).as_deref(), Some("no"));
        assert_eq!(a.pick("!r", "$b", "yes", true).as_deref(), Some("yes"));
        assert_eq!(a.pick("!r", "$b", "yes", false), None);
        assert_eq!(a.pick("!r", "$b", "3", true), None);
        assert_eq!(a.pick("!r", "$other", "1", true), None);
        assert_eq!(a.pick("!s", "$b", "1", true), None);
    }
}
