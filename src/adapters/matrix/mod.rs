//! The Matrix adapter: delivers actions to a homeserver through the
//! client-server API v3 (plain `reqwest` + serde), fetches room history, and
//! — in [`sync`] — runs the one `/sync` loop of the fleet that turns what
//! users do into inbound events.
//!
//! Outbound, per action (the channel is a room id, `!abc:server`; see
//! [`send`] for the content of each event):
//!
//! * `message` → `m.room.message` / `m.text`; Markdown rendered to
//!   `formatted_body` when the text has markup; `reply_to` →
//!   `m.in_reply_to`; an envelope `thread_id` → `rel_type: m.thread`;
//!   `m.mentions` names only the envelope's `mentions` (never `@room` unless
//!   `mention_room: true`); text over the 65,536-byte event limit goes out as
//!   several events, in order, each with its own transaction id.
//! * `buttons` (and a message with buttons) → the same, the buttons rendered as
//!   a numbered list (Matrix has no buttons); the room's last buttons message is
//!   recorded in Redis (`sg:{P}:matrix:buttons`) so the syncer, on whichever
//!   gateway, maps a reply naming a number (or a keycap reaction) back to the
//!   button's `custom_id` as an inbound `button` event.
//! * `edit` → an `m.replace` of the target (`message_id` or `target_key`)
//!   with `m.new_content`; `delete` → a redaction
//!   (`PUT /rooms/{room}/redact/{event}/{txn}`, with the envelope's `reason`).
//! * `file` → `POST /_matrix/media/v3/upload`, then `m.image` (image/*) or `m.file`.
//! * `typing` / `stop_typing` → `PUT /rooms/{room}/typing/{user}`.
//! * `reaction` → an `m.reaction` annotation; the server's
//!   `M_DUPLICATE_ANNOTATION` (the bot already reacted so) counts as delivered.
//! * `presence` → `PUT /presence/{user}/status` with `status_msg`.
//!
//! Every send's transaction id is derived from the delivery's idempotency key
//! (hex of SHA-256, 32 digits; the n-th further piece of a split message from
//! the key and n), so a resend after a crash is answered with the original
//! event id and makes no second event (G2).
//!
//! Errors: `M_LIMIT_EXCEEDED` (or a 429) waits `retry_after_ms` (or
//! `Retry-After`, in seconds or as an HTTP date); `M_UNKNOWN_TOKEN`,
//! `M_MISSING_TOKEN` and any 401 (a logged-out or soft-logged-out token) are
//! [`AdapterError::unauthorized`]: the platform's sends stop, nothing is
//! dead-lettered, and [`Adapter::probe`] (`GET /account/whoami`) tells when
//! the token works again; other 4xx (`M_FORBIDDEN`, `M_NOT_FOUND`, …) are
//! permanent, with the errcode and the server's text; 5xx, 408 and transport
//! failures are transient.

#[cfg(feature = "e2ee")]
pub mod crypto;
pub mod send;
pub mod sync;
mod token;

mod inbound;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime};

use crate::bus::Conn;
use redis::AsyncCommands;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tracing::warn;

use super::{Adapter, AdapterError, BoxFuture, Capabilities, Delivered, Delivery, HistoryMessage};
use crate::envelope::{Action, Button};
use send::Extras;

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
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct ButtonsMessage {
    event_id: String,
    buttons: Vec<Choice>,
}

/// One button of a buttons message, as a pick needs it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Choice {
    label: String,
    #[serde(default)]
    custom_id: Option<String>,
}

/// The Redis keys of one Matrix platform (all under `sg:{P}:matrix:`, one
/// hash slot); docs/operating.md lists them.
#[derive(Debug, Clone)]
pub struct MatrixKeys {
    base: String,
}

impl MatrixKeys {
    /// The keys under `base` (`sg:{P}:matrix:`, [`crate::keys::Keys::matrix`]).
    pub fn new(base: impl Into<String>) -> Self {
        Self { base: base.into() }
    }

    /// `since`: the `/sync` position up to which every event is published.
    pub fn since(&self) -> String {
        format!("{}since", self.base)
    }

    /// `sync:lease`: which gateway runs the platform's `/sync` (`SET PX`).
    pub fn lease(&self) -> String {
        format!("{}sync:lease", self.base)
    }

    /// `rooms`: room id → the last timeline event seen there (where a
    /// backfill of a gap stops).
    pub fn rooms(&self) -> String {
        format!("{}rooms", self.base)
    }

    /// `token`: the fleet's current access and refresh tokens, once one was
    /// refreshed (hash `access_token`, `refresh_token`).
    pub fn token(&self) -> String {
        format!("{}token", self.base)
    }

    /// `token:lock`: the gateway refreshing the token (`SET NX PX`).
    pub fn token_lock(&self) -> String {
        format!("{}token:lock", self.base)
    }

    /// `joins`: room id → a pending auto-join being retried (JSON).
    pub fn joins(&self) -> String {
        format!("{}joins", self.base)
    }

    /// `buttons`: room id → the room's last buttons message (JSON).
    pub fn buttons(&self) -> String {
        format!("{}buttons", self.base)
    }

    /// `undecrypted`: event id → an encrypted event whose room key was
    /// missing, with its room (JSON), decrypted and published when the key
    /// arrives (at most 1,000 kept).
    pub fn undecrypted(&self) -> String {
        format!("{}undecrypted", self.base)
    }

    /// `crypto:`: the base of the end-to-end encryption store (the `e2ee`
    /// feature; see `crypto::CryptoKeys`).
    pub fn crypto(&self) -> String {
        format!("{}crypto:", self.base)
    }
}

/// Where the adapter keeps what every gateway of the fleet must see.
#[derive(Clone)]
struct Shared {
    conn: Conn,
    keys: MatrixKeys,
}

/// Delivers actions to one Matrix account; see the module docs.
pub struct MatrixAdapter {
    platform: String,
    base: String,
    /// `Bearer <access token>`; replaced when the token is refreshed.
    auth: RwLock<HeaderValue>,
    /// The refresh token, when the server gave one (see [`token`]).
    refresh: tokio::sync::Mutex<Option<String>>,
    user_id: String,
    auto_join: bool,
    sync_timeout: Duration,
    client: reqwest::Client,
    sync_client: reqwest::Client,
    /// The buttons messages this process sent (the only record without Redis).
    buttons: Mutex<HashMap<String, ButtonsMessage>>,
    shared: Option<Shared>,
    /// Why the token is refused (a send or a sync got `M_UNKNOWN_TOKEN`),
    /// until a probe or a sync succeeds again.
    refused: Mutex<Option<String>>,
    /// End-to-end encryption, with the Redis store (see [`crypto`]).
    #[cfg(feature = "e2ee")]
    crypto: Option<std::sync::Arc<crypto::Crypto>>,
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

/// A failed call: the classified error and the Matrix errcode, if any.
#[derive(Debug, Clone)]
struct Failure {
    errcode: Option<String>,
    /// The server said `soft_logout: true`: the token expired, and a
    /// refresh token can replace it.
    soft_logout: bool,
    err: AdapterError,
}

impl From<Failure> for AdapterError {
    fn from(f: Failure) -> Self {
        f.err
    }
}

impl Failure {
    fn transient(message: String) -> Self {
        Failure {
            errcode: None,
            soft_logout: false,
            err: AdapterError::transient(message),
        }
    }
}

/// A request body.
#[derive(Clone)]
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
            auth: RwLock::new(auth),
            refresh: tokio::sync::Mutex::new(None),
            user_id: settings.user_id.clone(),
            auto_join: settings.auto_join,
            sync_timeout: settings.sync_timeout,
            client: build(settings.request_timeout)?,
            sync_client: build(settings.sync_timeout + settings.request_timeout)?,
            buttons: Mutex::new(HashMap::new()),
            shared: None,
            refused: Mutex::new(None),
            #[cfg(feature = "e2ee")]
            crypto: None,
        })
    }

    /// Keep the buttons messages in Redis (`keys.buttons()`), so a pick is
    /// mapped back by the syncer whichever gateway sent the buttons.
    ///
    /// With the `e2ee` feature this also keeps the crypto store there: the
    /// bot reads and writes in end-to-end encrypted rooms.
    pub fn with_redis(mut self, conn: Conn, keys: MatrixKeys) -> Self {
        #[cfg(feature = "e2ee")]
        {
            self.crypto = Some(std::sync::Arc::new(crypto::Crypto::new(
                &self.platform,
                conn.clone(),
                crypto::CryptoKeys::new(keys.crypto()),
            )));
        }
        self.shared = Some(Shared { conn, keys });
        self
    }

    /// The platform's end-to-end encryption, when this build and its
    /// Redis have it.
    #[cfg(feature = "e2ee")]
    pub fn crypto(&self) -> Option<&std::sync::Arc<crypto::Crypto>> {
        self.crypto.as_ref()
    }

    /// The bot's own user id.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// The platform name.
    pub fn platform(&self) -> &str {
        &self.platform
    }

    /// Why the token is refused, while it is.
    pub fn refused(&self) -> Option<String> {
        self.refused.lock().expect("refused lock").clone()
    }

    fn set_refused(&self, why: Option<&str>) {
        let mut r = self.refused.lock().expect("refused lock");
        if r.as_deref() != why {
            match why {
                Some(w) => {
                    warn!(platform = %self.platform, error = %w, "matrix: the access token is refused; sends and sync pause until it works again")
                }
                None => {
                    tracing::info!(platform = %self.platform, "matrix: the access token works again")
                }
            }
            *r = why.map(str::to_owned);
        }
    }

    /// Note a call's outcome for the token's state: a refusal is recorded,
    /// any answer that is not one clears it.
    fn note<T>(&self, r: &Result<T, Failure>) {
        match r {
            Err(f) if f.err.retry == super::Retry::Halt => self.set_refused(Some(&f.err.message)),
            Err(f) if f.errcode.is_none() && f.err.retry == super::Retry::Backoff => {}
            _ => {
                if self.refused.lock().expect("refused lock").is_some() {
                    self.set_refused(None);
                }
            }
        }
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
    ) -> Result<Value, Failure> {
        let sent_with = self.current_auth();
        let mut r = self
            .call_once(method.clone(), path, query, body.clone(), long_poll)
            .await;
        let expired = matches!(&r, Err(f) if f.soft_logout);
        if expired && self.has_refresh_token().await {
            // The access token expired: refresh it (or take the one another
            // gateway refreshed) and try once more.
            match self.refresh_token(&sent_with).await {
                Ok(()) => r = self.call_once(method, path, query, body, long_poll).await,
                Err(e) => {
                    warn!(platform = %self.platform, error = %e.message, "matrix: refreshing the access token failed");
                }
            }
        }
        self.note(&r);
        r
    }

    fn current_auth(&self) -> HeaderValue {
        self.auth.read().expect("auth lock").clone()
    }

    async fn call_once(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Body,
        long_poll: bool,
    ) -> Result<Value, Failure> {
        let client = if long_poll {
            &self.sync_client
        } else {
            &self.client
        };
        let mut req = client
            .request(method.clone(), format!("{}{path}", self.base))
            .header(AUTHORIZATION, self.current_auth());
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
            Failure::transient(format!("matrix {what} failed: {}", e.without_url()))
        })?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let bytes = resp.bytes().await.map_err(|e| {
            Failure::transient(format!(
                "matrix {what}: reading the answer failed: {}",
                e.without_url()
            ))
        })?;
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&bytes).map_err(|e| {
                Failure::transient(format!("matrix {what}: answer is not JSON: {e}"))
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
    ) -> Result<String, Failure> {
        #[cfg(feature = "e2ee")]
        let (event_type, content) = self.maybe_encrypt(room, event_type, content).await?;
        #[cfg(feature = "e2ee")]
        let event_type = event_type.as_str();
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
            .ok_or_else(|| Failure::transient("matrix send answered without event_id".into()))
    }

    /// In a room with `m.room.encryption` state, a message event goes out as
    /// `m.room.encrypted` (reactions and redactions stay in the clear, as
    /// Matrix has them); anything else as it is.
    #[cfg(feature = "e2ee")]
    async fn maybe_encrypt(
        &self,
        room: &str,
        event_type: &str,
        content: Value,
    ) -> Result<(String, Value), Failure> {
        let as_is = (event_type.to_owned(), content);
        let Some(c) = &self.crypto else {
            return Ok(as_is);
        };
        if as_is.0 != "m.room.message" {
            return Ok(as_is);
        }
        let failure = |err: AdapterError| Failure {
            errcode: None,
            soft_logout: false,
            err,
        };
        let Some(settings) = c.room_encryption(self, room).await.map_err(failure)? else {
            return Ok(as_is);
        };
        let encrypted = c
            .encrypt(self, room, &settings, &as_is.0, &as_is.1)
            .await
            .map_err(failure)?;
        Ok(("m.room.encrypted".to_owned(), encrypted))
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

    /// A message: one event, or several (in order) when the text is longer
    /// than one event holds; the id of the first.
    async fn send_text(
        &self,
        room: &str,
        key: &str,
        text: &str,
        reply_to: Option<&str>,
        buttons: &[Button],
        x: &Extras,
    ) -> Result<String, AdapterError> {
        let contents = send::message_contents(text, reply_to, buttons, x);
        let mut first = None;
        let mut last = String::new();
        for (i, content) in contents.into_iter().enumerate() {
            let txn = piece_txn_id(key, i);
            last = self
                .send_event(room, "m.room.message", &txn, Value::Object(content))
                .await?;
            first.get_or_insert_with(|| last.clone());
        }
        if buttons.iter().any(|b| b.custom_id.is_some()) {
            self.remember_buttons(room, &last, buttons).await?;
        }
        Ok(first.unwrap_or(last))
    }

    /// Record `event_id` as `room`'s last buttons message.
    async fn remember_buttons(
        &self,
        room: &str,
        event_id: &str,
        buttons: &[Button],
    ) -> Result<(), AdapterError> {
        let msg = ButtonsMessage {
            event_id: event_id.to_owned(),
            buttons: buttons
                .iter()
                .map(|b| Choice {
                    label: b.label.clone(),
                    custom_id: b.custom_id.clone(),
                })
                .collect(),
        };
        if let Some(sh) = &self.shared {
            let mut conn = sh.conn.clone();
            let json = serde_json::to_string(&msg).expect("buttons serialise");
            conn.hset::<_, _, _, ()>(sh.keys.buttons(), room, json)
                .await
                .map_err(|e| {
                    AdapterError::transient(format!(
                        "matrix: recording the buttons message in Redis failed: {e}"
                    ))
                })?;
        }
        self.buttons
            .lock()
            .expect("buttons lock")
            .insert(room.to_owned(), msg);
        Ok(())
    }

    /// `room`'s last buttons message: Redis's record, else this process's.
    async fn buttons_of(&self, room: &str) -> Option<ButtonsMessage> {
        if let Some(sh) = &self.shared {
            let mut conn = sh.conn.clone();
            match conn
                .hget::<_, _, Option<String>>(sh.keys.buttons(), room)
                .await
            {
                Ok(Some(s)) => return serde_json::from_str(&s).ok(),
                Ok(None) => {}
                Err(e) => {
                    warn!(platform = %self.platform, error = %e, "matrix: reading a buttons message from Redis failed");
                }
            }
        }
        self.buttons
            .lock()
            .expect("buttons lock")
            .get(room)
            .cloned()
    }

    /// Upload a file, then send it as `m.image` or `m.file` with `caption`.
    async fn send_file(
        &self,
        room: &str,
        txn: &str,
        (data, filename, mime): (&[u8], &str, &str),
        caption: Option<&str>,
        x: &Extras,
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
        let mut content = json!({
            "msgtype": msgtype,
            "body": body,
            "filename": filename,
            "url": uri,
            "info": {"mimetype": mime, "size": size},
            "m.mentions": x.mentions_object(),
        });
        if let Some(rel) = send::relation(None, x.thread_id.as_deref()) {
            content["m.relates_to"] = rel;
        }
        Ok(self
            .send_event(room, "m.room.message", txn, content)
            .await?)
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
            .await?;
        Ok(())
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
            .await?;
        Ok(())
    }

    /// `POST /join/{room}`.
    async fn join(&self, room: &str) -> Result<(), AdapterError> {
        let path = format!("/_matrix/client/v3/join/{}", seg(room));
        self.call_api(Method::POST, &path, &[], Body::Json(json!({})), false)
            .await?;
        Ok(())
    }

    /// `GET /account/whoami`: the token works (and is this bot's).
    async fn whoami(&self) -> Result<(), AdapterError> {
        let v = self
            .call_api(
                Method::GET,
                "/_matrix/client/v3/account/whoami",
                &[],
                Body::None,
                false,
            )
            .await?;
        match v.get("user_id").and_then(Value::as_str) {
            Some(u) if u == self.user_id => Ok(()),
            Some(u) => Err(AdapterError::unauthorized(format!(
                "the matrix access token belongs to {u}, not the configured user_id {}",
                self.user_id
            ))),
            None => Err(AdapterError::transient(
                "matrix whoami answered without user_id",
            )),
        }
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
        let x = Extras::from_raw(&env.raw)
            .map_err(|e| AdapterError::permanent(format!("matrix envelope: {e}")))?;
        let key = d.idempotency_key;
        let txn = txn_id(key);
        let sent = |id: String| Delivered {
            message_id: Some(id),
        };
        let target = || {
            d.target.filter(|t| !t.is_empty()).ok_or_else(|| {
                AdapterError::permanent(format!(
                    "a matrix {} needs the target message's event id (message_id or a resolvable target_key)",
                    env.action.type_name()
                ))
            })
        };
        match &env.action {
            Action::Message {
                text,
                reply_to,
                buttons,
            } => self
                .send_text(room()?, key, text, reply_to.as_deref(), buttons, &x)
                .await
                .map(sent),
            Action::Buttons { text, buttons } => self
                .send_text(room()?, key, text, None, buttons, &x)
                .await
                .map(sent),
            Action::File {
                data,
                filename,
                mimetype,
                text,
            } => self
                .send_file(
                    room()?,
                    &txn,
                    (data, filename, mimetype),
                    text.as_deref(),
                    &x,
                )
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
                match self.send_event(room()?, "m.reaction", &txn, content).await {
                    Ok(id) => Ok(sent(id)),
                    // The bot has reacted so already: what was asked is there.
                    Err(f) if f.errcode.as_deref() == Some("M_DUPLICATE_ANNOTATION") => {
                        crate::metrics::matrix_duplicate_reaction(&self.platform);
                        Ok(Delivered::default())
                    }
                    Err(f) => Err(f.err),
                }
            }
            Action::Presence { text, emoji } => {
                self.presence(text.as_deref(), emoji.as_deref()).await?;
                Ok(Delivered::default())
            }
            Action::Edit { text, buttons, .. } => {
                let target = target()?;
                let content = send::edit_content(target, text, buttons, &x);
                let size = send::json_len(&content);
                if size > send::MAX_CONTENT_BYTES {
                    return Err(AdapterError::permanent(format!(
                        "a matrix edit of {size} bytes does not fit in one event (at most {} bytes of content; the limit is {} per event): send the rest as a new message",
                        send::MAX_CONTENT_BYTES,
                        send::MAX_EVENT_BYTES
                    )));
                }
                let room = room()?;
                let id = self
                    .send_event(room, "m.room.message", &txn, Value::Object(content))
                    .await?;
                if buttons.iter().any(|b| b.custom_id.is_some()) {
                    // A pick replies to the original event, not the edit.
                    self.remember_buttons(room, target, buttons).await?;
                }
                Ok(sent(id))
            }
            Action::Delete { .. } => {
                let target = target()?;
                let path = format!(
                    "/_matrix/client/v3/rooms/{}/redact/{}/{}",
                    seg(room()?),
                    seg(target),
                    seg(&txn)
                );
                let body = match &x.reason {
                    Some(r) => json!({"reason": r}),
                    None => json!({}),
                };
                let v = self
                    .call_api(Method::PUT, &path, &[], Body::Json(body), false)
                    .await?;
                Ok(Delivered {
                    message_id: v.get("event_id").and_then(Value::as_str).map(str::to_owned),
                })
            }
            Action::Rpc { method, .. } => Err(AdapterError::permanent(format!(
                "rpc_request `{method}` is answered by the gateway, not delivered to matrix"
            ))),
            Action::InteractionResponse(_) => Err(AdapterError::permanent(
                "interaction_response is Discord's; matrix has no interactions",
            )),
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
}

impl Adapter for MatrixAdapter {
    fn kind(&self) -> &'static str {
        "matrix"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    /// Ready unless the token is refused: any gateway can send, whichever
    /// of them runs the platform's sync.
    fn ready(&self) -> bool {
        self.refused().is_none()
    }

    fn not_ready_reason(&self) -> Option<String> {
        self.refused()
            .map(|why| format!("the matrix access token is refused ({why})"))
    }

    fn probe(&self) -> BoxFuture<'_, Result<(), AdapterError>> {
        Box::pin(self.whoami())
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

/// The transaction id of piece `n` of a message split into several events:
/// the first is [`txn_id`] itself, so an unsplit message keeps its id.
pub fn piece_txn_id(idempotency_key: &str, n: usize) -> String {
    if n == 0 {
        txn_id(idempotency_key)
    } else {
        txn_id(&format!("{idempotency_key}\u{0}{n}"))
    }
}

/// A `Retry-After` header: delay-seconds, or an HTTP date (RFC 9110) read
/// against `now` (a date already past waits nothing).
pub fn parse_retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
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

/// Whether `s` looks like `@name:server`.
pub fn valid_user_id(s: &str) -> bool {
    s.strip_prefix('@')
        .and_then(|rest| rest.split_once(':'))
        .is_some_and(|(name, server)| !name.is_empty() && !server.is_empty())
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
fn classify(what: &str, status: StatusCode, retry_after: Option<Duration>, body: &[u8]) -> Failure {
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
    let soft_logout = parsed
        .as_ref()
        .and_then(|m| m.get("soft_logout"))
        .and_then(Value::as_bool)
        == Some(true);
    let err = if status == StatusCode::TOO_MANY_REQUESTS
        || errcode.as_deref() == Some("M_LIMIT_EXCEEDED")
    {
        let after = parsed
            .as_ref()
            .and_then(|m| m.get("retry_after_ms"))
            .and_then(Value::as_u64)
            .map(Duration::from_millis)
            .or(retry_after)
            .unwrap_or(DEFAULT_RETRY_AFTER)
            .min(MAX_RETRY_AFTER);
        AdapterError::rate_limited(after, format!("{message} (retry after {after:?})"))
    } else if status == StatusCode::UNAUTHORIZED
        || matches!(
            errcode.as_deref(),
            Some("M_UNKNOWN_TOKEN" | "M_MISSING_TOKEN")
        )
    {
        // Logged out, expired (soft logout) or never valid: no request of
        // this token can succeed; the platform's circuit opens.
        if soft_logout {
            message.push_str(" (soft logout: the token expired; log the bot in again)");
        }
        AdapterError::unauthorized(message)
    } else if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
        AdapterError::transient(message)
    } else {
        AdapterError::permanent(message)
    };
    Failure {
        errcode,
        soft_logout,
        err,
    }
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
            .err
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
            Retry::Halt
        );
        let soft = c(
            401,
            r#"{"errcode":"M_UNKNOWN_TOKEN","error":"expired","soft_logout":true}"#,
            None,
        );
        assert_eq!(soft.retry, Retry::Halt);
        assert!(soft.message.contains("soft logout"), "{}", soft.message);
        assert_eq!(
            c(401, r#"{"errcode":"M_MISSING_TOKEN"}"#, None).retry,
            Retry::Halt
        );
        let dup = classify(
            "PUT /x",
            StatusCode::BAD_REQUEST,
            None,
            br#"{"errcode":"M_DUPLICATE_ANNOTATION","error":"Can't send same reaction twice"}"#,
        );
        assert_eq!(dup.errcode.as_deref(), Some("M_DUPLICATE_ANNOTATION"));
        assert_eq!(
            c(404, r#"{"errcode":"M_NOT_FOUND"}"#, None).retry,
            Retry::Never
        );
        assert_eq!(c(502, "bad gateway", None).retry, Retry::Backoff);
        assert_eq!(c(408, "", None).retry, Retry::Backoff);
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_784_000_000);
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(120));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(120))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(5));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn split_pieces_have_their_own_transactions() {
        assert_eq!(piece_txn_id("k", 0), txn_id("k"));
        assert_ne!(piece_txn_id("k", 1), txn_id("k"));
        assert_ne!(piece_txn_id("k", 1), piece_txn_id("k", 2));
        assert_eq!(piece_txn_id("k", 2), piece_txn_id("k", 2));
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
}
