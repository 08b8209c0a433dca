//! The Discord adapter: delivers actions through the REST API v10 (plain
//! `reqwest` + serde), with rate limits shared through Redis by every gateway
//! that uses the bot token.
//!
//! Outbound, per action (the channel is a channel id, a snowflake):
//!
//! * `message` → `POST /channels/{c}/messages` with `content`,
//!   `allowed_mentions: {"parse": []}` (no pings unless asked), and
//!   `message_reference` for `reply_to`.
//! * `buttons` (and a message with buttons) → the same with `components`:
//!   action rows (type 1) of up to five buttons (type 2); a `custom_id` button
//!   takes style 1–4 (`primary`, `secondary`, `success`, `danger`), a `url`
//!   button style 5 (link).
//! * `file` → the same call as `multipart/form-data`: `payload_json` and `files[0]`.
//! * `typing` → `POST /channels/{c}/typing`; `stop_typing` succeeds unsent
//!   (Discord's indicator stops by itself, or when the message arrives).
//! * `reaction` → `PUT /channels/{c}/messages/{m}/reactions/{emoji}/@me`, a
//!   unicode emoji percent-encoded, a custom one as `name:id` (`<:name:id>` is accepted).
//! * `presence` (with `gateway = true`) is recorded in Redis, latest wins,
//!   and sent as op 3 by whichever gateway holds the session
//!   ([`gateway::Session`]); it is also part of every Identify. Without a
//!   session the adapter reports no presence capability, so such envelopes
//!   are acknowledged unsent.
//! * The toggle button (`toggle_button = true`): every `message` gets one more
//!   button (`toggle_label`, `toggle_custom_id`), unless the feature
//!   `toggle_menu` is switched off for its channel or, failing a channel
//!   switch, its guild (`stargazer toggle`, [`crate::toggles`]). The guild
//!   comes from what the gateway session recorded, else `GET /channels/{c}`,
//!   remembered. A press arrives as an inbound `button` event.
//! * RPC `delete_webhook` (`webhook_id`) → `DELETE /webhooks/{id}`;
//!   `fetch_channel_history` → `GET /channels/{c}/messages?limit=N`.
//!
//! Text over 2,000 characters is split on paragraph, line or word boundaries
//! into ordered parts (`long_text = "split"`, the default; the reply reference
//! goes on the first part, buttons and the file on the last) or dead-lettered
//! (`"dead_letter"`). The message id written back is the first part's.
//!
//! Every create-message carries a `nonce` derived from the delivery's
//! idempotency key (20 hex digits of SHA-256, `-<n>` appended for part n > 0)
//! with `enforce_nonce: true`, so a resend inside Discord's de-duplication
//! window is answered with the original message (G2). Before a resend, the
//! nonce is looked up in what the gateway session recorded of the bot's own
//! messages: when the original landed it is not sent again (reconciled), even
//! past the window. Every such resend is counted by result
//! (`stargazer_discord_unknown_outcomes_total`).
//!
//! Rate limits ([`Limiter`], script `discord/limits.lua`): before each request
//! the adapter takes, atomically in Redis, a permit of the invalid-request
//! budget, of a global 429's block, of the route's bucket (learned from
//! `X-RateLimit-Bucket`/`-Limit`/`-Remaining`/`-Reset-After`) and of the
//! global per-second allowance (50 by default; a permit taken in the last
//! 100 ms of a second counts in the next one too, as the request may land
//! there). A short wait is waited in
//! place; a longer one is returned as a rate limit, so the channel's lane
//! waits while other channels flow. A 429 records its `retry_after` for its
//! bucket, or for everyone when `global` (scope `global`). 401, 403 and 429
//! answers (except scope `shared`) count against the invalid-request budget
//! of a 10-minute window; past `invalid_request_limit` (9,000, below
//! Discord's 10,000 ban threshold) nothing is sent until the window rolls.
//!
//! Errors: Discord's JSON `code` and `message` name the cause. 429 waits;
//! 5xx, 408 and transport failures are transient; every other 4xx is
//! permanent (10003 unknown channel, 50001 missing access, 50013 missing
//! permissions, 50035 invalid form body, …).

use std::fmt;
use std::time::Duration;

use crate::bus::Conn;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use std::collections::HashMap;
use std::sync::Mutex;

use redis::AsyncCommands;

use super::{
    Adapter, AdapterError, BoxFuture, Capabilities, Delivered, Delivery, HistoryMessage, Retry,
};
use crate::config::LongText;
use crate::envelope::{Action, Button};
use crate::keys::Keys;
use crate::toggles::{TOGGLE_MENU, Toggles};

pub mod gateway;

/// Discord's longest message content, in characters.
pub const MAX_CONTENT: usize = 2000;
/// Discord's longest `nonce`.
pub const MAX_NONCE: usize = 25;
/// The default API base.
pub const DEFAULT_API_BASE: &str = "https://discord.com/api/v10";
/// How long to wait after a 429 that names no wait.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// The longest wait a rate limit can ask for; longer asks are capped.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// How much of Discord's error text goes into an error.
const MAX_MESSAGE_CHARS: usize = 300;
/// Most history messages one call returns (Discord's own cap).
const MAX_HISTORY: usize = 100;
/// A request given a global permit this close (ms) to the end of a second is
/// counted in the next second too: it may reach Discord after the turn.
const GLOBAL_BOUNDARY_MS: u64 = 100;
/// Discord's epoch (2015-01-01) in Unix ms, for snowflake timestamps.
const DISCORD_EPOCH_MS: u64 = 1_420_070_400_000;

/// What a `[[platform]]` table with `adapter = "discord"` configures.
#[derive(Clone)]
pub struct DiscordSettings {
    /// `https://discord.com/api/v10`, or a local fake in tests.
    pub api_base: String,
    /// The bot token (sent as `Authorization: Bot <token>`).
    pub token: String,
    pub long_text: LongText,
    /// Requests per second the bot may make across all routes (Discord: 50).
    pub global_per_second: u32,
    /// 401/403/429 answers per 10 minutes after which sending stops.
    pub invalid_request_limit: u32,
    /// Whole-request timeout.
    pub request_timeout: Duration,
    /// A rate-limit wait up to this long is waited inside the delivery;
    /// a longer one is handed back to the lane as a rate limit.
    pub max_inline_wait: Duration,
    /// The toggle button attached to every message, unless switched off for
    /// its channel or guild (`None`: no toggle button).
    pub toggle: Option<ToggleButton>,
    /// How long Discord de-duplicates a repeated nonce.
    pub nonce_window: Duration,
    /// A gateway session is configured: presence updates go through it.
    pub presence: bool,
}

/// The toggle button: a secondary-style button with this label and custom id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToggleButton {
    pub label: String,
    pub custom_id: String,
}

impl fmt::Debug for DiscordSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscordSettings")
            .field("api_base", &self.api_base)
            .field("token", &"<redacted>")
            .field("long_text", &self.long_text)
            .field("global_per_second", &self.global_per_second)
            .field("invalid_request_limit", &self.invalid_request_limit)
            .field("request_timeout", &self.request_timeout)
            .field("max_inline_wait", &self.max_inline_wait)
            .field("toggle", &self.toggle)
            .field("nonce_window", &self.nonce_window)
            .field("presence", &self.presence)
            .finish()
    }
}

/// One REST route: the request, and the rate-limit identity Discord gives it
/// (the route with its top-level id kept and other ids masked, and that id).
#[derive(Debug, Clone)]
pub struct Route {
    pub method: Method,
    /// The path after the API base, segments already encoded.
    pub path: String,
    /// `POST /channels/:c/messages`, …
    pub key: String,
    /// The top-level resource id (channel or webhook).
    pub major: String,
}

impl Route {
    fn new(method: Method, path: String, template: &str, major: &str) -> Route {
        Route {
            key: format!("{method} {template}"),
            method,
            path,
            major: major.to_owned(),
        }
    }
}

/// Why a permit was refused, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wait {
    pub wait: Duration,
    /// `invalid_requests`, `global_429`, `bucket` or `global`.
    pub why: String,
}

/// The shared rate limiter: Redis state under `sg:{P}:discord:` (see the
/// module docs and `discord/limits.lua`).
#[derive(Clone)]
pub struct Limiter {
    conn: Conn,
    base: String,
    global_per_second: u32,
    invalid_limit: u32,
    script: std::sync::Arc<redis::Script>,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("base", &self.base)
            .field("global_per_second", &self.global_per_second)
            .field("invalid_limit", &self.invalid_limit)
            .finish_non_exhaustive()
    }
}

/// The bucket headers of one answer.
#[derive(Debug, Clone, PartialEq)]
struct BucketHeaders {
    bucket: Option<String>,
    limit: u64,
    remaining: u64,
    reset_after: Duration,
}

impl Limiter {
    /// A limiter over `base` (`Keys::discord()`).
    pub fn new(conn: Conn, base: String, global_per_second: u32, invalid_limit: u32) -> Limiter {
        Limiter {
            conn,
            base,
            global_per_second: global_per_second.max(1),
            invalid_limit: invalid_limit.max(1),
            script: std::sync::Arc::new(redis::Script::new(include_str!("discord/limits.lua"))),
        }
    }

    async fn run(&self, args: &[&str]) -> redis::RedisResult<(i64, i64, String)> {
        let mut conn = self.conn.clone();
        let mut inv = self.script.key(&self.base);
        for a in args {
            inv.arg(*a);
        }
        inv.invoke_async(&mut conn).await
    }

    /// Take a permit for `route`: `None` when granted, else how long to wait.
    pub async fn acquire(&self, route: &Route) -> redis::RedisResult<Option<Wait>> {
        let (ok, wait, why) = self
            .run(&[
                "acquire",
                &route.key,
                &route.major,
                &self.global_per_second.to_string(),
                &self.invalid_limit.to_string(),
                &GLOBAL_BOUNDARY_MS.to_string(),
            ])
            .await?;
        Ok((ok != 1).then(|| Wait {
            wait: Duration::from_millis(wait.max(1) as u64),
            why,
        }))
    }

    async fn update(&self, route: &Route, h: &BucketHeaders) -> redis::RedisResult<()> {
        self.run(&[
            "update",
            &route.key,
            &route.major,
            h.bucket.as_deref().unwrap_or(""),
            &h.limit.to_string(),
            &h.remaining.to_string(),
            &(h.reset_after.as_millis() as u64).to_string(),
        ])
        .await
        .map(|_| ())
    }

    async fn limited(
        &self,
        route: &Route,
        after: Duration,
        global: bool,
    ) -> redis::RedisResult<()> {
        self.run(&[
            "limited",
            &route.key,
            &route.major,
            &(after.as_millis() as u64).to_string(),
            if global { "1" } else { "0" },
        ])
        .await
        .map(|_| ())
    }

    /// Count one invalid request (401, 403, non-shared 429); the window's count.
    pub async fn invalid(&self) -> redis::RedisResult<i64> {
        self.run(&["invalid"]).await.map(|(n, _, _)| n)
    }
}

/// Delivers actions to Discord as one bot; see the module docs.
pub struct DiscordAdapter {
    platform: String,
    base: String,
    auth: HeaderValue,
    long_text: LongText,
    max_inline_wait: Duration,
    client: reqwest::Client,
    limiter: Limiter,
    /// `sg:{P}:discord:`, the base of the session's keys (guilds, nonces, presence).
    state_base: String,
    conn: Conn,
    toggle: Option<ToggleButton>,
    toggles: Toggles,
    /// Channel → its guild (`""`: not in a guild), as learned.
    guilds: Mutex<HashMap<String, String>>,
    nonce_window: Duration,
    presence: bool,
}

/// How many channels' guilds are remembered in memory before starting over.
const MAX_GUILD_CACHE: usize = 100_000;

/// What a create-message send needs to know about the delivery.
struct SendCtx<'a> {
    key: &'a str,
    /// An earlier try of this entry may have reached Discord.
    resend: bool,
    /// How old the entry is (an upper bound on the time since its first try).
    age: Duration,
}

impl fmt::Debug for DiscordAdapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscordAdapter")
            .field("platform", &self.platform)
            .field("api_base", &self.base)
            .field("token", &"<redacted>")
            .field("long_text", &self.long_text)
            .field("limiter", &self.limiter)
            .field("toggle", &self.toggle)
            .field("presence", &self.presence)
            .finish_non_exhaustive()
    }
}

/// A request body.
enum Body {
    None,
    Json(Value),
    Form(reqwest::multipart::Form),
}

/// A file attached to the last part of a message.
struct Attachment<'a> {
    data: &'a [u8],
    filename: &'a str,
    mimetype: &'a str,
}

impl DiscordAdapter {
    /// An adapter for the platform of `keys`; `conn` holds the state shared
    /// by every gateway (rate limits, toggles, what the gateway session
    /// records). Fails, naming the problem, on a bad API base or an empty token.
    pub fn new(keys: &Keys, settings: DiscordSettings, conn: Conn) -> Result<Self, String> {
        let platform = keys.platform();
        let limits_base = keys.discord();
        let url = Url::parse(&settings.api_base)
            .map_err(|e| format!("discord api_base is not a valid URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "discord api_base must be http or https, not `{}`",
                url.scheme()
            ));
        }
        let token = bare_token(&settings.token);
        if token.is_empty() {
            return Err("discord bot token is empty".into());
        }
        if settings.request_timeout.is_zero() {
            return Err("discord request timeout must be greater than zero".into());
        }
        let mut auth = HeaderValue::from_str(&format!("Bot {token}"))
            .map_err(|_| "discord bot token cannot be sent as an HTTP header".to_owned())?;
        auth.set_sensitive(true);
        let client = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .connect_timeout(settings.request_timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!(
                "DiscordBot (https://github.com/stargazer, ",
                env!("CARGO_PKG_VERSION"),
                ")"
            ))
            .build()
            .map_err(|e| format!("could not build the HTTP client: {e}"))?;
        Ok(Self {
            platform: platform.to_owned(),
            base: url.as_str().trim_end_matches('/').to_owned(),
            auth,
            long_text: settings.long_text,
            max_inline_wait: settings.max_inline_wait,
            client,
            limiter: Limiter::new(
                conn.clone(),
                limits_base.clone(),
                settings.global_per_second,
                settings.invalid_request_limit,
            ),
            state_base: limits_base,
            toggles: Toggles::new(conn.clone(), keys.clone()),
            conn,
            toggle: settings.toggle,
            guilds: Mutex::new(HashMap::new()),
            nonce_window: settings.nonce_window,
            presence: settings.presence,
        })
    }

    /// The shared rate limiter.
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// Wait for a permit of `route`: in place while the waits stay short,
    /// else hand the wait back as a rate limit.
    async fn permit(&self, route: &Route) -> Result<(), AdapterError> {
        let mut waited = Duration::ZERO;
        loop {
            let w = self.limiter.acquire(route).await.map_err(|e| {
                AdapterError::transient(format!("discord rate limiter (redis) failed: {e}"))
            })?;
            let Some(w) = w else { return Ok(()) };
            crate::metrics::discord_wait(&self.platform, &w.why);
            if w.why == "invalid_requests" || waited + w.wait > self.max_inline_wait {
                return Err(AdapterError::rate_limited(
                    w.wait,
                    format!(
                        "discord {}: rate limited ({}) for {:?}",
                        route.key, w.why, w.wait
                    ),
                ));
            }
            // A little jitter so waiting gateways do not all come back at once.
            let jitter = Duration::from_millis(rand::random::<u64>() % 15);
            tokio::time::sleep(w.wait + jitter).await;
            waited += w.wait + jitter;
        }
    }

    /// One call to the API: a permit, the request, the bucket headers
    /// recorded; the JSON answer (`Null` for 204), or the failure classified.
    async fn call_api(
        &self,
        route: &Route,
        query: &[(&str, &str)],
        body: Body,
    ) -> Result<Value, AdapterError> {
        self.permit(route).await?;
        let mut req = self
            .client
            .request(route.method.clone(), format!("{}{}", self.base, route.path))
            .header(AUTHORIZATION, self.auth.clone());
        if !query.is_empty() {
            req = req.query(query);
        }
        req = match body {
            Body::None => req,
            Body::Json(v) => req.json(&v),
            Body::Form(f) => req.multipart(f),
        };
        let what = format!("{} {}", route.method, route.path);
        let resp = req.send().await.map_err(|e| {
            AdapterError::transient(format!("discord {what} failed: {}", e.without_url()))
        })?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.map_err(|e| {
            AdapterError::transient(format!(
                "discord {what}: reading the answer failed: {}",
                e.without_url()
            ))
        })?;
        if let Some(h) = bucket_headers(&headers)
            && let Err(e) = self.limiter.update(route, &h).await
        {
            warn!(platform = %self.platform, error = %e, "discord: recording rate-limit headers failed");
        }
        if status.is_success() {
            if bytes.is_empty() || status == StatusCode::NO_CONTENT {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&bytes).map_err(|e| {
                AdapterError::transient(format!("discord {what}: answer is not JSON: {e}"))
            });
        }
        let err = classify(&what, status, &headers, &bytes);
        if status == StatusCode::TOO_MANY_REQUESTS {
            let limit = rate_limit_of(&headers, &bytes);
            if let Err(e) = self.limiter.limited(route, limit.after, limit.global).await {
                warn!(platform = %self.platform, error = %e, "discord: recording a 429 failed");
            }
            warn!(platform = %self.platform, route = %route.key, scope = %limit.scope, retry_after_ms = limit.after.as_millis() as u64, "discord answered 429");
            crate::metrics::discord_429(&self.platform, &limit.scope);
            if limit.scope != "shared" {
                self.count_invalid().await;
            }
        } else if matches!(status.as_u16(), 401 | 403) {
            self.count_invalid().await;
        }
        Err(err)
    }

    async fn count_invalid(&self) {
        crate::metrics::discord_invalid(&self.platform);
        match self.limiter.invalid().await {
            Ok(n) => {
                debug!(platform = %self.platform, count = n, "discord invalid request counted")
            }
            Err(e) => {
                warn!(platform = %self.platform, error = %e, "discord: counting an invalid request failed")
            }
        }
    }

    /// `POST /channels/{c}/messages`: the new (or, for a repeated nonce, the
    /// original) message's id.
    async fn create_message(
        &self,
        channel: &str,
        payload: Value,
        file: Option<&Attachment<'_>>,
    ) -> Result<String, AdapterError> {
        let route = Route::new(
            Method::POST,
            format!("/channels/{}/messages", seg(channel)),
            "/channels/:c/messages",
            channel,
        );
        let body = match file {
            None => Body::Json(payload),
            Some(f) => {
                let mut payload = payload;
                payload["attachments"] = json!([{"id": 0, "filename": f.filename}]);
                let part = reqwest::multipart::Part::bytes(f.data.to_vec())
                    .file_name(f.filename.to_owned())
                    .mime_str(f.mimetype)
                    .or_else(|_| {
                        reqwest::multipart::Part::bytes(f.data.to_vec())
                            .file_name(f.filename.to_owned())
                            .mime_str("application/octet-stream")
                    })
                    .map_err(|e| AdapterError::permanent(format!("bad file part: {e}")))?;
                let json_part = reqwest::multipart::Part::text(payload.to_string())
                    .mime_str("application/json")
                    .map_err(|e| AdapterError::permanent(format!("bad payload part: {e}")))?;
                Body::Form(
                    reqwest::multipart::Form::new()
                        .part("payload_json", json_part)
                        .part("files[0]", part),
                )
            }
        };
        let v = self.call_api(&route, &[], body).await?;
        v.get("id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| AdapterError::transient("discord create-message answered without id"))
    }

    /// Send `text` as one or more ordered messages (see the module docs); the
    /// first part's message id.
    #[allow(clippy::too_many_arguments)]
    async fn send_parts(
        &self,
        channel: &str,
        ctx: &SendCtx<'_>,
        text: &str,
        reply_to: Option<&str>,
        buttons: &[Button],
        toggle: Option<&ToggleButton>,
        file: Option<Attachment<'_>>,
    ) -> Result<String, AdapterError> {
        let mut components = if buttons.is_empty() {
            None
        } else {
            Some(components(buttons)?)
        };
        if let Some(t) = toggle {
            components = with_toggle(components, t);
        }
        let chars = text.chars().count();
        let parts = if chars <= MAX_CONTENT {
            vec![text.to_owned()]
        } else {
            match self.long_text {
                LongText::Split => split_text(text, MAX_CONTENT),
                LongText::DeadLetter => {
                    return Err(AdapterError::permanent(format!(
                        "text is {chars} characters, over Discord's {MAX_CONTENT} (long_text = \"dead_letter\")"
                    )));
                }
            }
        };
        if parts.len() == 1 && parts[0].trim().is_empty() && components.is_none() && file.is_none()
        {
            return Err(AdapterError::permanent(
                "discord cannot send an empty message (no text, buttons or file)",
            ));
        }
        let last = parts.len() - 1;
        let mut first_id = None;
        for (i, part) in parts.iter().enumerate() {
            let nonce = nonce(ctx.key, i);
            if ctx.resend
                && let Some(id) = self.reconcile(&nonce, ctx.age).await
            {
                first_id.get_or_insert(id);
                continue;
            }
            let mut payload = json!({
                "nonce": nonce,
                "enforce_nonce": true,
                "allowed_mentions": {"parse": []},
            });
            if !part.is_empty() {
                payload["content"] = Value::from(part.as_str());
            }
            if i == 0
                && let Some(parent) = reply_to
            {
                payload["message_reference"] =
                    json!({"message_id": parent, "fail_if_not_exists": false});
            }
            if i == last
                && let Some(c) = &components
            {
                payload["components"] = c.clone();
            }
            let attach = if i == last { file.as_ref() } else { None };
            let id = self.create_message(channel, payload, attach).await?;
            first_id.get_or_insert(id);
        }
        Ok(first_id.unwrap_or_default())
    }

    async fn deliver_inner(&self, d: &Delivery<'_>) -> Result<Delivered, AdapterError> {
        let env = d.envelope;
        let channel = || {
            env.channel_id
                .as_ref()
                .map(|c| c.0.as_str())
                .filter(|c| !c.is_empty())
                .ok_or_else(|| {
                    AdapterError::permanent("a discord delivery needs channel_id (a channel id)")
                })
        };
        let ctx = SendCtx {
            key: d.idempotency_key,
            resend: d.resend,
            age: Duration::from_millis(
                crate::now_ms()
                    .saturating_sub(env.created_ms.unwrap_or_else(|| d.stream_id.millis())),
            ),
        };
        let sent = |id: String| Delivered {
            message_id: Some(id),
        };
        match &env.action {
            Action::Message {
                text,
                reply_to,
                buttons,
            } => {
                let c = channel()?;
                let toggle = self.toggle_for(c, buttons).await?;
                self.send_parts(c, &ctx, text, reply_to.as_deref(), buttons, toggle, None)
                    .await
                    .map(sent)
            }
            Action::Buttons { text, buttons } => self
                .send_parts(channel()?, &ctx, text, None, buttons, None, None)
                .await
                .map(sent),
            Action::File {
                data,
                filename,
                mimetype,
                text,
            } => {
                let file = Attachment {
                    data,
                    filename,
                    mimetype,
                };
                self.send_parts(
                    channel()?,
                    &ctx,
                    text.as_deref().unwrap_or(""),
                    None,
                    &[],
                    None,
                    Some(file),
                )
                .await
                .map(sent)
            }
            Action::StartTyping => {
                let c = channel()?;
                let route = Route::new(
                    Method::POST,
                    format!("/channels/{}/typing", seg(c)),
                    "/channels/:c/typing",
                    c,
                );
                self.call_api(&route, &[], Body::None).await?;
                Ok(Delivered::default())
            }
            Action::StopTyping => Ok(Delivered::default()),
            Action::Reaction { message_id, emoji } => {
                let c = channel()?;
                let route = Route::new(
                    Method::PUT,
                    format!(
                        "/channels/{}/messages/{}/reactions/{}/@me",
                        seg(c),
                        seg(message_id),
                        emoji_segment(emoji)?
                    ),
                    "/channels/:c/messages/:m/reactions/:e/@me",
                    c,
                );
                self.call_api(&route, &[], Body::None).await?;
                Ok(Delivered::default())
            }
            Action::Presence { text, emoji } => {
                if !self.presence {
                    return Err(AdapterError::permanent(
                        "discord presence needs a gateway session (`gateway = true`)",
                    ));
                }
                let mut conn = self.conn.clone();
                gateway::set_presence(
                    &mut conn,
                    &self.state_base,
                    text.as_deref(),
                    emoji.as_deref(),
                )
                .await
                .map_err(|e| {
                    AdapterError::transient(format!("storing the discord presence failed: {e}"))
                })?;
                Ok(Delivered::default())
            }
            Action::Edit { .. } | Action::Delete { .. } => Err(AdapterError::permanent(format!(
                "the {} adapter does not edit or delete messages yet",
                self.kind()
            ))),
            Action::Rpc { method, .. } => Err(AdapterError::permanent(format!(
                "rpc_request `{method}` is answered by the gateway, not delivered to discord"
            ))),
        }
    }

    /// The toggle button for a message to `channel`, unless it is switched
    /// off for the channel or its guild, or the message's own buttons use its
    /// custom id.
    async fn toggle_for(
        &self,
        channel: &str,
        buttons: &[Button],
    ) -> Result<Option<&ToggleButton>, AdapterError> {
        let Some(t) = &self.toggle else {
            return Ok(None);
        };
        if buttons
            .iter()
            .any(|b| b.custom_id.as_deref() == Some(t.custom_id.as_str()))
        {
            return Ok(None);
        }
        let guild = self.guild_of(channel).await?;
        let on = self
            .toggles
            .enabled(TOGGLE_MENU, channel, guild.as_deref(), true)
            .await
            .map_err(|e| {
                AdapterError::transient(format!("reading the toggle switches (redis) failed: {e}"))
            })?;
        Ok(on.then_some(t))
    }

    /// The guild `channel` belongs to (`None` for a DM, or when Discord will
    /// not say): from memory, else what the gateway session recorded in
    /// Redis, else `GET /channels/{c}` (recorded for every gateway). A rate
    /// limit or transient failure of that call is the delivery's; a
    /// permanent one leaves the guild unknown (the channel's own switch
    /// still applies).
    async fn guild_of(&self, channel: &str) -> Result<Option<String>, AdapterError> {
        let known = |g: String| (!g.is_empty()).then_some(g);
        if let Some(g) = self.guilds.lock().expect("guild cache").get(channel) {
            return Ok(known(g.clone()));
        }
        let mut conn = self.conn.clone();
        let key = gateway::guilds_key(&self.state_base);
        let stored: Option<String> = conn.hget(&key, channel).await.map_err(|e| {
            AdapterError::transient(format!("reading the channel's guild (redis) failed: {e}"))
        })?;
        let guild = match stored {
            Some(g) => g,
            None => {
                let route = Route::new(
                    Method::GET,
                    format!("/channels/{}", seg(channel)),
                    "/channels/:c",
                    channel,
                );
                match self.call_api(&route, &[], Body::None).await {
                    Ok(v) => {
                        let g = v
                            .get("guild_id")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_owned();
                        let r: redis::RedisResult<()> = conn.hset(&key, channel, &g).await;
                        if let Err(e) = r {
                            debug!(error = %e, "recording a channel's guild failed");
                        }
                        g
                    }
                    Err(e) if e.retry == Retry::Never => {
                        debug!(channel, error = %e.message, "the channel's guild is unknown; its own toggle switch alone applies");
                        String::new()
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let mut cache = self.guilds.lock().expect("guild cache");
        if cache.len() >= MAX_GUILD_CACHE {
            cache.clear();
        }
        cache.insert(channel.to_owned(), guild.clone());
        Ok(known(guild))
    }

    /// Before resending a part whose earlier try may have reached Discord:
    /// the original message's id when the gateway session saw it (its
    /// `MESSAGE_CREATE` carried our nonce), so it is not sent again.
    /// Otherwise the part is resent with the same nonce, which Discord
    /// de-duplicates inside its window; past the window nothing else can
    /// tell (Discord's message history does not keep nonces, and matching on
    /// text could mistake another message for ours and lose this one), so
    /// the resend is counted as unverified.
    async fn reconcile(&self, nonce: &str, age: Duration) -> Option<String> {
        let mut conn = self.conn.clone();
        let seen: redis::RedisResult<Option<String>> =
            conn.get(gateway::nonce_key(&self.state_base, nonce)).await;
        match seen {
            Ok(Some(id)) if !id.is_empty() => {
                crate::metrics::discord_unknown_outcome(&self.platform, "reconciled");
                debug!(nonce, message_id = %id, "the earlier try had landed; not resending");
                return Some(id);
            }
            Ok(_) => {}
            Err(e) => {
                warn!(platform = %self.platform, error = %e, "looking up a nonce the gateway session recorded failed");
            }
        }
        if age < self.nonce_window {
            crate::metrics::discord_unknown_outcome(&self.platform, "nonce_window");
        } else {
            crate::metrics::discord_unknown_outcome(&self.platform, "unverified");
            warn!(platform = %self.platform, nonce, age_ms = age.as_millis() as u64,
                "resending past Discord's nonce window with no record of the earlier try: it may duplicate");
        }
        None
    }

    /// `GET /channels/{c}/messages?limit=N`: the latest messages, oldest first.
    async fn history(
        &self,
        channel: &str,
        limit: usize,
    ) -> Result<Vec<HistoryMessage>, AdapterError> {
        let limit = limit.clamp(1, MAX_HISTORY).to_string();
        let route = Route::new(
            Method::GET,
            format!("/channels/{}/messages", seg(channel)),
            "/channels/:c/messages",
            channel,
        );
        let v = self
            .call_api(&route, &[("limit", &limit)], Body::None)
            .await?;
        let mut out: Vec<HistoryMessage> = v
            .as_array()
            .map(|a| a.iter().filter_map(history_message).collect())
            .unwrap_or_default();
        out.reverse();
        Ok(out)
    }

    /// `DELETE /webhooks/{id}`.
    async fn delete_webhook(&self, args: &Value) -> Result<Value, AdapterError> {
        let id = match args.get("webhook_id") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => {
                return Err(AdapterError::permanent(
                    "delete_webhook needs `webhook_id` (a string)",
                ));
            }
        };
        let route = Route::new(
            Method::DELETE,
            format!("/webhooks/{}", seg(&id)),
            "/webhooks/:w",
            &id,
        );
        self.call_api(&route, &[], Body::None).await?;
        Ok(json!({"deleted": true, "webhook_id": id}))
    }
}

impl Adapter for DiscordAdapter {
    fn kind(&self) -> &'static str {
        "discord"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            presence: self.presence,
            // Edits and deletes arrive with the Discord issue.
            edits: false,
            ..Capabilities::ALL
        }
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

    fn call<'a>(
        &'a self,
        method: &'a str,
        args: &'a Value,
    ) -> BoxFuture<'a, Result<Value, AdapterError>> {
        Box::pin(async move {
            match method {
                "delete_webhook" => self.delete_webhook(args).await,
                _ => Err(AdapterError::permanent(format!(
                    "the discord adapter has no RPC method `{method}`"
                ))),
            }
        })
    }
}

/// `rows` (the message's own button rows, if any) with the toggle button
/// added: at the end of the last row when it has room, else in a row of its
/// own; left off when all five rows are full.
fn with_toggle(rows: Option<Value>, t: &ToggleButton) -> Option<Value> {
    let button = json!({"type": 2, "style": 2, "label": t.label, "custom_id": t.custom_id});
    let mut rows = match rows {
        Some(Value::Array(r)) => r,
        _ => Vec::new(),
    };
    let full_rows = rows.len() >= 5;
    match rows
        .last_mut()
        .and_then(|r| r.get_mut("components"))
        .and_then(Value::as_array_mut)
    {
        Some(last) if last.len() < 5 => last.push(button),
        _ if !full_rows => rows.push(json!({"type": 1, "components": [button]})),
        _ => debug!("no room for the toggle button beside the message's own five rows"),
    }
    (!rows.is_empty()).then_some(Value::Array(rows))
}

/// A bot token as configured, without surrounding blanks or a `Bot ` prefix.
pub fn bare_token(raw: &str) -> &str {
    let t = raw.trim();
    t.strip_prefix("Bot ").unwrap_or(t)
}

/// The nonce of part `part` of a send: 20 hex digits of SHA-256 of the
/// idempotency key, `-<part>` appended after the first; at most 25 characters.
pub fn nonce(idempotency_key: &str, part: usize) -> String {
    let digest = hex::encode(Sha256::digest(idempotency_key.as_bytes()));
    let mut n = digest[..20].to_owned();
    if part > 0 {
        n.push_str(&format!("-{part}"));
    }
    n.truncate(MAX_NONCE);
    n
}

/// `s` percent-encoded as one URL path segment.
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

/// The path segment of a reaction's emoji: a custom emoji (`<:name:id>`,
/// `<a:name:id>` or `name:id`) as `name:id`, a unicode one percent-encoded.
pub fn emoji_segment(emoji: &str) -> Result<String, AdapterError> {
    let e = emoji.trim();
    if e.is_empty() {
        return Err(AdapterError::permanent("a reaction needs an emoji"));
    }
    let inner = e
        .strip_prefix('<')
        .and_then(|s| s.strip_suffix('>'))
        .map(|s| s.strip_prefix("a:").unwrap_or(s).trim_start_matches(':'))
        .unwrap_or(e);
    if let Some((name, id)) = inner.rsplit_once(':')
        && !name.is_empty()
        && !id.is_empty()
        && id.bytes().all(|b| b.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Ok(format!("{name}:{id}"));
    }
    Ok(seg(e))
}

/// A button style by name or number (`primary` by default).
fn button_style(style: Option<&str>) -> u8 {
    match style.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        Some("secondary" | "2" | "grey" | "gray") => 2,
        Some("success" | "3" | "green") => 3,
        Some("danger" | "4" | "red") => 4,
        _ => 1,
    }
}

/// Message components for `buttons`: action rows of up to five buttons.
pub fn components(buttons: &[Button]) -> Result<Value, AdapterError> {
    if buttons.len() > 25 {
        return Err(AdapterError::permanent(format!(
            "discord allows at most 25 buttons per message, not {}",
            buttons.len()
        )));
    }
    let mut rows = Vec::new();
    for chunk in buttons.chunks(5) {
        let mut row = Vec::new();
        for b in chunk {
            let label: String = b.label.chars().take(80).collect();
            let button = match (&b.url, &b.custom_id) {
                (Some(url), _) => json!({"type": 2, "style": 5, "label": label, "url": url}),
                (None, Some(id)) => {
                    if id.chars().count() > 100 {
                        return Err(AdapterError::permanent(format!(
                            "button custom_id `{id}` is over Discord's 100 characters"
                        )));
                    }
                    json!({"type": 2, "style": button_style(b.style.as_deref()), "label": label, "custom_id": id})
                }
                (None, None) => {
                    return Err(AdapterError::permanent(format!(
                        "button `{}` has neither custom_id nor url",
                        b.label
                    )));
                }
            };
            row.push(button);
        }
        rows.push(json!({"type": 1, "components": row}));
    }
    Ok(Value::Array(rows))
}

/// `text` in ordered parts of at most `limit` characters, cut at the last
/// paragraph break, else line break, else space inside each window (hard cut
/// when there is none); the separator at a cut is dropped.
pub fn split_text(text: &str, limit: usize) -> Vec<String> {
    let mut parts = Vec::new();
    let mut rest = text;
    while rest.chars().count() > limit {
        // Byte index just past `limit` characters.
        let end = rest
            .char_indices()
            .nth(limit)
            .map(|(i, _)| i)
            .unwrap_or(rest.len());
        let window = &rest[..end];
        let cut = [("\n\n", 2), ("\n", 1), (" ", 1)]
            .iter()
            .find_map(|(sep, len)| window.rfind(sep).filter(|&i| i > 0).map(|i| (i, i + len)));
        let (part_end, next) = match cut {
            Some((i, j)) if !window[..i].trim().is_empty() => (i, j),
            _ => (end, end),
        };
        parts.push(rest[..part_end].to_owned());
        // A break right at the cut would otherwise open the next part.
        rest = rest[next..].trim_start_matches('\n');
    }
    if !rest.is_empty() || parts.is_empty() {
        parts.push(rest.to_owned());
    }
    parts
}

/// A Discord message object as a history entry.
fn history_message(m: &Value) -> Option<HistoryMessage> {
    let id = m.get("id")?.as_str()?;
    let author = m.get("author")?;
    let timestamp = id
        .parse::<u64>()
        .map(|s| ((s >> 22) + DISCORD_EPOCH_MS) as f64 / 1000.0)
        .unwrap_or(0.0);
    Some(HistoryMessage {
        user_id: author.get("id")?.as_str()?.to_owned(),
        user_name: author
            .get("global_name")
            .and_then(Value::as_str)
            .or_else(|| author.get("username").and_then(Value::as_str))
            .unwrap_or_default()
            .to_owned(),
        text: m
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        timestamp,
        message_id: id.to_owned(),
        is_bot: author.get("bot").and_then(Value::as_bool).unwrap_or(false),
        reply_to_id: m
            .pointer("/message_reference/message_id")
            .and_then(Value::as_str)
            .map(str::to_owned),
        reactions: m
            .get("reactions")
            .and_then(Value::as_array)
            .map(|rs| {
                rs.iter()
                    .map(|r| {
                        let emoji = match (
                            r.pointer("/emoji/name").and_then(Value::as_str),
                            r.pointer("/emoji/id").and_then(Value::as_str),
                        ) {
                            (Some(n), Some(id)) => format!("{n}:{id}"),
                            (Some(n), None) => n.to_owned(),
                            _ => String::new(),
                        };
                        json!({"emoji": emoji, "count": r.get("count").cloned().unwrap_or(Value::from(0))})
                    })
                    .collect()
            })
            .unwrap_or_default(),
    })
}

fn header<'h>(h: &'h HeaderMap, name: &str) -> Option<&'h str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

fn seconds(s: &str) -> Option<Duration> {
    s.parse::<f64>()
        .ok()
        .filter(|f| f.is_finite() && *f >= 0.0)
        .map(|f| Duration::from_secs_f64(f.min(MAX_RETRY_AFTER.as_secs_f64())))
}

/// The `X-RateLimit-*` headers of an answer, when it has them.
fn bucket_headers(h: &HeaderMap) -> Option<BucketHeaders> {
    Some(BucketHeaders {
        bucket: header(h, "x-ratelimit-bucket").map(str::to_owned),
        limit: header(h, "x-ratelimit-limit")?.parse().ok()?,
        remaining: header(h, "x-ratelimit-remaining")?.parse().ok()?,
        reset_after: seconds(header(h, "x-ratelimit-reset-after")?)?,
    })
}

/// What a 429 says.
#[derive(Debug, Clone, PartialEq)]
struct RateLimit {
    after: Duration,
    global: bool,
    /// `user`, `global`, `shared` (or empty).
    scope: String,
}

fn rate_limit_of(h: &HeaderMap, body: &[u8]) -> RateLimit {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let after = parsed
        .as_ref()
        .and_then(|v| v.get("retry_after"))
        .and_then(Value::as_f64)
        .and_then(|f| seconds(&f.to_string()))
        .or_else(|| header(h, RETRY_AFTER.as_str()).and_then(seconds))
        .unwrap_or(DEFAULT_RETRY_AFTER)
        .min(MAX_RETRY_AFTER);
    let scope = header(h, "x-ratelimit-scope").unwrap_or("").to_owned();
    let global = scope == "global"
        || parsed
            .as_ref()
            .and_then(|v| v.get("global"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
        || header(h, "x-ratelimit-global").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    RateLimit {
        after,
        global,
        scope,
    }
}

/// Classify a non-2xx answer: see the module docs.
fn classify(what: &str, status: StatusCode, h: &HeaderMap, body: &[u8]) -> AdapterError {
    let parsed: Option<Map<String, Value>> = serde_json::from_slice(body).ok();
    let code = parsed
        .as_ref()
        .and_then(|m| m.get("code"))
        .and_then(Value::as_u64);
    let text = parsed
        .as_ref()
        .and_then(|m| m.get("message"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| {
            let t = String::from_utf8_lossy(body);
            let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
            (!t.is_empty()).then_some(t)
        });
    let mut message = format!("discord {what} answered {}", status.as_u16());
    if let Some(c) = code {
        message.push_str(&format!(" code {c}"));
    }
    if let Some(mut t) = text {
        if let Some(errors) = parsed.as_ref().and_then(|m| m.get("errors")) {
            t.push_str(&format!(" {errors}"));
        }
        message.push_str(": ");
        match t.char_indices().nth(MAX_MESSAGE_CHARS) {
            Some((i, _)) => {
                message.push_str(&t[..i]);
                message.push('…');
            }
            None => message.push_str(&t),
        }
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        let limit = rate_limit_of(h, body);
        let scope = if limit.scope.is_empty() {
            if limit.global { "global" } else { "route" }
        } else {
            limit.scope.as_str()
        };
        return AdapterError::rate_limited(
            limit.after,
            format!("{message} (scope {scope}, retry after {:?})", limit.after),
        );
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

    #[test]
    fn nonces_are_stable_short_and_per_part() {
        assert_eq!(nonce("k1", 0), nonce("k1", 0));
        assert_ne!(nonce("k1", 0), nonce("k2", 0));
        assert_ne!(nonce("k1", 0), nonce("k1", 1));
        assert_eq!(nonce("k1", 0).len(), 20);
        assert!(nonce("k1", 9999).len() <= MAX_NONCE);
        assert!(nonce("k1", 1).starts_with(&nonce("k1", 0)));
    }

    #[test]
    fn emoji_are_encoded() {
        assert_eq!(emoji_segment("👍").unwrap(), "%F0%9F%91%8D");
        assert_eq!(emoji_segment("blob:123").unwrap(), "blob:123");
        assert_eq!(emoji_segment("<:blob:123>").unwrap(), "blob:123");
        assert_eq!(emoji_segment("<a:dance:456>").unwrap(), "dance:456");
        assert_eq!(emoji_segment("a:b").unwrap(), "a%3Ab");
        assert!(emoji_segment(" ").is_err());
    }

    #[test]
    fn long_text_splits_on_boundaries() {
        let para = "a".repeat(1500);
        let text = format!("{para}\n\n{para}");
        let parts = split_text(&text, 2000);
        assert_eq!(parts, vec![para.clone(), para.clone()]);
        let text = format!("{para}\n{para}");
        assert_eq!(split_text(&text, 2000), vec![para.clone(), para.clone()]);
        let words = "word ".repeat(500);
        let parts = split_text(words.trim_end(), 2000);
        assert!(parts.iter().all(|p| p.chars().count() <= 2000));
        assert_eq!(parts.join(" "), words.trim_end());
        let solid = "é".repeat(4500);
        let parts = split_text(&solid, 2000);
        assert_eq!(
            parts.iter().map(|p| p.chars().count()).collect::<Vec<_>>(),
            vec![2000, 2000, 500]
        );
        assert_eq!(parts.concat(), solid);
        let edge = format!("{}\n\nb", "a".repeat(2000));
        assert_eq!(split_text(&edge, 2000), vec!["a".repeat(2000), "b".into()]);
        assert_eq!(split_text("short", 2000), vec!["short"]);
        assert_eq!(split_text("", 2000), vec![""]);
    }

    #[test]
    fn buttons_become_action_rows() {
        let b = |label: &str, id: Option<&str>, url: Option<&str>, style: Option<&str>| Button {
            label: label.into(),
            custom_id: id.map(Into::into),
            url: url.map(Into::into),
            style: style.map(Into::into),
        };
        let c = components(&[
            b("Yes", Some("yes"), None, Some("success")),
            b("Docs", None, Some("https://e.org"), None),
        ])
        .unwrap();
        assert_eq!(
            c,
            json!([{"type": 1, "components": [
                {"type": 2, "style": 3, "label": "Yes", "custom_id": "yes"},
                {"type": 2, "style": 5, "label": "Docs", "url": "https://e.org"},
            ]}])
        );
        let many: Vec<Button> = (0..7)
            .map(|i| b("x", Some(&i.to_string()), None, None))
            .collect();
        let c = components(&many).unwrap();
        assert_eq!(c.as_array().unwrap().len(), 2);
        assert_eq!(c[1]["components"].as_array().unwrap().len(), 2);
        assert!(components(&[b("x", None, None, None)]).is_err());
        let too_many: Vec<Button> = (0..26)
            .map(|i| b("x", Some(&i.to_string()), None, None))
            .collect();
        assert!(components(&too_many).is_err());
    }

    #[test]
    fn errors_are_classified() {
        let c = |status: u16, body: &str, headers: &[(&'static str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in headers {
                h.insert(*k, HeaderValue::from_str(v).unwrap());
            }
            classify(
                "POST /channels/1/messages",
                StatusCode::from_u16(status).unwrap(),
                &h,
                body.as_bytes(),
            )
        };
        let e = c(
            403,
            r#"{"message": "Missing Permissions", "code": 50013}"#,
            &[],
        );
        assert_eq!(e.retry, Retry::Never);
        assert_eq!(
            e.message,
            "discord POST /channels/1/messages answered 403 code 50013: Missing Permissions"
        );
        assert_eq!(
            c(404, r#"{"message": "Unknown Channel", "code": 10003}"#, &[]).retry,
            Retry::Never
        );
        let e = c(
            400,
            r#"{"message": "Invalid Form Body", "code": 50035, "errors": {"content": {"_errors": [{"code": "BASE_TYPE_MAX_LENGTH"}]}}}"#,
            &[],
        );
        assert_eq!(e.retry, Retry::Never);
        assert!(e.message.contains("50035") && e.message.contains("BASE_TYPE_MAX_LENGTH"));
        let e = c(
            429,
            r#"{"message": "You are being rate limited.", "retry_after": 0.25, "global": false}"#,
            &[("x-ratelimit-scope", "user")],
        );
        assert_eq!(e.retry, Retry::After(Duration::from_millis(250)));
        assert!(e.message.contains("scope user"), "{}", e.message);
        assert_eq!(
            c(429, "", &[("retry-after", "2")]).retry,
            Retry::After(Duration::from_secs(2))
        );
        assert_eq!(c(502, "bad gateway", &[]).retry, Retry::Backoff);
        assert_eq!(c(408, "", &[]).retry, Retry::Backoff);
        assert_eq!(
            c(401, r#"{"message": "401: Unauthorized", "code": 0}"#, &[]).retry,
            Retry::Never
        );
    }

    #[test]
    fn rate_limits_and_buckets_are_read() {
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-bucket", HeaderValue::from_static("abcd"));
        h.insert("x-ratelimit-limit", HeaderValue::from_static("5"));
        h.insert("x-ratelimit-remaining", HeaderValue::from_static("4"));
        h.insert("x-ratelimit-reset-after", HeaderValue::from_static("4.250"));
        assert_eq!(
            bucket_headers(&h),
            Some(BucketHeaders {
                bucket: Some("abcd".into()),
                limit: 5,
                remaining: 4,
                reset_after: Duration::from_millis(4250),
            })
        );
        h.insert("x-ratelimit-scope", HeaderValue::from_static("global"));
        let r = rate_limit_of(&h, br#"{"retry_after": 1.5, "global": true}"#);
        assert_eq!(r.after, Duration::from_millis(1500));
        assert!(r.global);
        assert!(bucket_headers(&HeaderMap::new()).is_none());
    }

    #[test]
    fn history_messages_are_read() {
        let m = json!({
            "id": "175928847299117063",
            "content": "hi",
            "author": {"id": "80351110224678912", "username": "nelly", "bot": false},
            "message_reference": {"message_id": "175928847299117000"},
            "reactions": [{"count": 2, "emoji": {"id": null, "name": "🔥"}}],
        });
        let h = history_message(&m).unwrap();
        assert_eq!(h.user_name, "nelly");
        assert_eq!(h.reply_to_id.as_deref(), Some("175928847299117000"));
        assert_eq!(h.reactions, vec![json!({"emoji": "🔥", "count": 2})]);
        // 175928847299117063 >> 22 = 41944705796 ms after Discord's epoch.
        assert!(
            (h.timestamp - 1_462_015_105.796).abs() < 0.001,
            "{}",
            h.timestamp
        );
    }
}
