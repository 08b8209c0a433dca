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
//! Rate limits ([`Limiter`], script `src/bus/lua/discord/limits.lua`): before each request
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
pub mod interactions;
mod limiter;
mod message;
pub mod render;
mod rest;
mod secret;
mod send;
pub mod typing;

use limiter::BucketHeaders;
pub use limiter::{INVALID_WINDOW, Limiter, Wait};
pub use message::{bare_token, components, emoji_segment, nonce, seg, split_text};
use message::{history_message, with_files, with_toggle};
use rest::Body;
pub use rest::Route;

use render::FileSpec;
pub use secret::Secret;
use typing::{Typing, TypingRequest};

/// Discord's longest message content, in characters.
pub const MAX_CONTENT: usize = 2000;
/// Discord's longest `nonce`.
pub const MAX_NONCE: usize = 25;
/// The User-Agent of every request to Discord, in the form Discord asks for.
pub const USER_AGENT: &str = concat!(
    "DiscordBot (https://github.com/stargazer, ",
    env!("CARGO_PKG_VERSION"),
    ")"
);
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
#[derive(Debug, Clone)]
pub struct DiscordSettings {
    /// `https://discord.com/api/v10`, or a local fake in tests.
    pub api_base: String,
    /// The bot token (sent as `Authorization: Bot <token>`).
    pub token: Secret,
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
    /// The host whose egress IP the requests leave from: gateways with the
    /// same value share Discord's invalid-request budget (it bans by IP).
    pub egress_host: String,
    /// The mention kinds a message may ping unless its envelope says
    /// (`allowed_mentions`; default `["users"]`: never @everyone or roles).
    pub allowed_mentions: Vec<String>,
    /// How often a `start_typing` with `expires_ms` triggers the indicator
    /// again ([`typing::BEAT`], 8 s: Discord's lasts about 10 s).
    pub typing_beat: Duration,
    /// The bot's application id (for interaction follow-ups); `None`: from
    /// the gateway session's READY, else `GET /applications/@me`.
    pub application_id: Option<String>,
}

/// The toggle button: a secondary-style button with this label and custom id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToggleButton {
    pub label: String,
    pub custom_id: String,
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
    /// The platform's circuit (the engine's, which this adapter hands it):
    /// open while Discord refuses the token; the gateway session opens it
    /// on 4004, the engine's one probe ([`Adapter::probe`]) closes it.
    circuit: crate::circuit::Circuit,
    allowed_mentions: Vec<String>,
    /// Channels whose typing indicator is kept alive.
    typing: Typing,
    /// The bot's application id (interaction webhooks), once known.
    application: Mutex<Option<String>>,
    /// The platform's gateway session in this process, if it runs one
    /// (for `/readyz`: the shards held here).
    session: std::sync::OnceLock<std::sync::Weak<gateway::Session>>,
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

/// What goes on a message besides its text: on the last part when the
/// text is split (the reply reference goes on the first).
#[derive(Default)]
struct Extras {
    reply_to: Option<String>,
    buttons: Vec<Button>,
    /// Checked already ([`render::embeds`]).
    embeds: Option<Value>,
    /// Discord's `allowed_mentions` object ([`render::allowed_mentions`]).
    mentions: Value,
    files: Vec<FileSpec>,
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
        let token = bare_token(settings.token.expose());
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
            .user_agent(USER_AGENT)
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
                keys.discord_host_invalid(&settings.egress_host),
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
            circuit: crate::circuit::Circuit::new(platform),
            allowed_mentions: settings.allowed_mentions,
            typing: Typing::new(settings.typing_beat),
            application: Mutex::new(settings.application_id),
            session: std::sync::OnceLock::new(),
        })
    }

    /// How a typing keep-alive beat is sent.
    fn typing_request(&self) -> TypingRequest {
        TypingRequest {
            client: self.client.clone(),
            base: self.base.clone(),
            auth: self.auth.clone(),
        }
    }

    /// Whether `channel`'s typing indicator is being kept alive.
    pub fn keeps_typing(&self, channel: &str) -> bool {
        self.typing.is_kept(channel)
    }

    /// The gateway session this process runs for the platform.
    pub fn attach_session(&self, session: &std::sync::Arc<gateway::Session>) {
        let _ = self.session.set(std::sync::Arc::downgrade(session));
    }

    /// The platform's circuit, which the engine and the gateway session share.
    pub fn token_circuit(&self) -> crate::circuit::Circuit {
        self.circuit.clone()
    }

    /// `GET /users/@me`, which no user sees (the engine's probe while the
    /// circuit is open): Ok clears the refusal mark in Redis, so every
    /// gateway sends again; the engine then closes this one's circuit.
    async fn probe_token(&self) -> Result<(), AdapterError> {
        let route = Route::new(Method::GET, "/users/@me".into(), "/users/@me", "@me");
        match self.call_api_as(&route, &[], Body::None, true).await {
            Ok(_) => {
                crate::metrics::discord_probe(&self.platform, "ok");
                if let Err(e) = self.limiter.accepted().await {
                    warn!(platform = %self.platform, error = %e, "discord: clearing the refused-token mark failed");
                }
                crate::metrics::discord_credential_refused(&self.platform, false);
                Ok(())
            }
            Err(e) => {
                let result = if e.retry == Retry::Halt {
                    "refused"
                } else {
                    "error"
                };
                crate::metrics::discord_probe(&self.platform, result);
                debug!(platform = %self.platform, error = %e.message, "discord token probe failed");
                Err(e)
            }
        }
    }

    /// The shared rate limiter.
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
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
        let raw = &env.raw;
        match &env.action {
            Action::Message {
                text,
                reply_to,
                buttons,
            } => {
                let c = channel()?;
                let extras = self.extras_of(raw, reply_to.as_deref(), buttons)?;
                let dest = self.destination(c, raw).await?;
                let toggle = self.toggle_for(&dest, buttons).await?;
                self.typing.stop(c);
                self.send_parts(&dest, &ctx, text, extras, toggle)
                    .await
                    .map(sent)
            }
            Action::Buttons { text, buttons } => {
                let c = channel()?;
                let extras = self.extras_of(raw, None, buttons)?;
                let dest = self.destination(c, raw).await?;
                self.typing.stop(c);
                self.send_parts(&dest, &ctx, text, extras, None)
                    .await
                    .map(sent)
            }
            Action::File {
                data,
                filename,
                mimetype,
                text,
            } => {
                let c = channel()?;
                let mut extras = self.extras_of(raw, None, &[])?;
                extras.files.insert(
                    0,
                    FileSpec {
                        data: data.clone(),
                        filename: filename.clone(),
                        mimetype: mimetype.clone(),
                    },
                );
                if extras.files.len() > render::MAX_FILES {
                    return Err(AdapterError::permanent(format!(
                        "`file_data` and `files` make {} files; Discord allows {} per message",
                        extras.files.len(),
                        render::MAX_FILES
                    )));
                }
                let dest = self.destination(c, raw).await?;
                self.typing.stop(c);
                self.send_parts(&dest, &ctx, text.as_deref().unwrap_or(""), extras, None)
                    .await
                    .map(sent)
            }
            Action::StartTyping => {
                let c = channel()?;
                let dest = self.destination(c, raw).await?;
                let route = typing_route(&dest);
                self.call_api(&route, &[], Body::None).await?;
                if let Some(until) = env.expires_ms {
                    self.typing
                        .keep(c, route, until, self.limiter.clone(), self.typing_request());
                }
                Ok(Delivered::default())
            }
            Action::StopTyping => {
                // Discord has no call to stop typing: the indicator lapses
                // (10 s) or the message arrives; the keep-alive stops now.
                self.typing.stop(channel()?);
                Ok(Delivered::default())
            }
            Action::Edit { text, buttons, .. } => {
                let c = channel()?;
                let target = target_of(d)?;
                let dest = self.destination(c, raw).await?;
                self.edit_message(&dest, target, text, raw, buttons).await?;
                Ok(Delivered::default())
            }
            Action::Delete { .. } => {
                let c = channel()?;
                let target = target_of(d)?;
                let dest = self.destination(c, raw).await?;
                self.delete_message(&dest, target).await?;
                Ok(Delivered::default())
            }
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
            Action::InteractionResponse(r) => self.respond(d, r).await,
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
            interactions: true,
            ..Capabilities::ALL
        }
    }

    /// Not ready while Discord refuses the bot token (`/readyz` names the
    /// platform; the ERROR log and `stargazer_discord_credential_refused` say why).
    fn ready(&self) -> bool {
        !self.circuit.is_open()
    }

    fn probe(&self) -> BoxFuture<'_, Result<(), AdapterError>> {
        Box::pin(async move { self.probe_token().await })
    }

    fn circuit(&self) -> Option<crate::circuit::Circuit> {
        Some(self.circuit.clone())
    }

    /// The shards this gateway holds, e.g. `shards 0, 2 of 3 held here`.
    fn ready_detail(&self) -> Option<String> {
        let (count, held) = self.session.get()?.upgrade()?.shards();
        let list = if held.is_empty() {
            "none".to_owned()
        } else {
            held.iter()
                .map(|(id, up)| {
                    if *up {
                        id.to_string()
                    } else {
                        format!("{id} (connecting)")
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        Some(format!("shards {list} of {count} held here"))
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

/// `POST /channels/{c}/typing`.
fn typing_route(channel: &str) -> Route {
    Route::new(
        Method::POST,
        format!("/channels/{}/typing", seg(channel)),
        "/channels/:c/typing",
        channel,
    )
}

/// The platform id of an edit's or delete's target (resolved by the engine).
fn target_of<'a>(d: &Delivery<'a>) -> Result<&'a str, AdapterError> {
    d.target.filter(|t| !t.is_empty()).ok_or_else(|| {
        AdapterError::permanent("an edit or delete needs `message_id` or a resolved `target_key`")
    })
}
