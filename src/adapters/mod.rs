//! Adapters deliver one action to one platform, and nothing else: no Redis, no
//! retries, no ordering. The dispatcher decides what to send and when; the
//! adapter says how it went, classifying failures with [`AdapterError`].
//!
//! The trait is object-safe so configuration can pick adapters at run time.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::envelope::{Action, Envelope, StreamId};

pub mod console;
pub mod discord;
pub mod matrix;
pub mod null;
pub mod webhook;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Which optional actions a platform supports. An envelope asking for an
/// unsupported one is acknowledged unsent, with a warning and a count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub typing: bool,
    pub reactions: bool,
    pub presence: bool,
    pub buttons: bool,
    pub files: bool,
    /// `edit` and `delete` of earlier messages.
    pub edits: bool,
    /// `interaction_response` (Discord's own; not part of [`Capabilities::ALL`]).
    pub interactions: bool,
}

impl Capabilities {
    /// Every platform-neutral action (interactions are Discord's alone).
    pub const ALL: Capabilities = Capabilities {
        typing: true,
        reactions: true,
        presence: true,
        buttons: true,
        files: true,
        edits: true,
        interactions: false,
    };

    /// Whether `action` can be delivered on this platform.
    pub fn supports(&self, action: &Action) -> bool {
        match action {
            Action::StartTyping | Action::StopTyping => self.typing,
            Action::Reaction { .. } => self.reactions,
            Action::Presence { .. } => self.presence,
            Action::Buttons { .. } => self.buttons,
            Action::Message { buttons, .. } => buttons.is_empty() || self.buttons,
            Action::File { .. } => self.files,
            Action::Rpc { .. } => true,
            Action::Edit { .. } | Action::Delete { .. } => self.edits,
            Action::InteractionResponse(_) => self.interactions,
        }
    }
}

/// One delivery handed to an adapter.
#[derive(Debug)]
pub struct Delivery<'a> {
    pub platform: &'a str,
    pub stream_id: &'a StreamId,
    pub envelope: &'a Envelope,
    /// Stable across retries and redeliveries of this entry: platforms that
    /// honour one drop a repeat (G2).
    pub idempotency_key: &'a str,
    /// 1 for the first try; counts across redeliveries.
    pub attempt: u32,
    /// True when an earlier try of this entry may have reached the platform
    /// (its sender vanished mid-send).
    pub resend: bool,
    /// For `edit` and `delete`: the platform's id of the target message
    /// (given as `message_id`, or resolved from `target_key`).
    pub target: Option<&'a str>,
}

/// What a successful delivery returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delivered {
    /// The platform's id for the created message, written back to the
    /// envelope's `message_key`.
    pub message_id: Option<String>,
}

/// How a failed delivery may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Permanent: retrying cannot help (bad request, unknown channel, …).
    Never,
    /// Transient: retry with exponential backoff and jitter; uses an attempt.
    Backoff,
    /// The platform asked to wait this long (429, Retry-After); does not use an attempt.
    After(Duration),
    /// The platform refused the credential itself (Discord 401, Matrix
    /// `M_UNKNOWN_TOKEN`): the request was not taken, and no other request
    /// can succeed until the credential works again. The dispatcher opens the
    /// platform's circuit: every send of the platform stops, entries stay
    /// pending (nothing is dead-lettered for it, no attempt is used), `/readyz`
    /// names the cause, and [`Adapter::probe`] is called with backoff until it
    /// succeeds.
    Halt,
}

/// A failed delivery, classified.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct AdapterError {
    pub retry: Retry,
    /// A readable cause, naming the HTTP status and the platform's message when
    /// there is one; it goes to the dead-letter entry's `error`.
    pub message: String,
}

impl AdapterError {
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            retry: Retry::Never,
            message: message.into(),
        }
    }

    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            retry: Retry::Backoff,
            message: message.into(),
        }
    }

    /// The credential was refused: see [`Retry::Halt`].
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            retry: Retry::Halt,
            message: message.into(),
        }
    }

    pub fn rate_limited(after: Duration, message: impl Into<String>) -> Self {
        Self {
            retry: Retry::After(after),
            message: message.into(),
        }
    }
}

/// A platform connection that can deliver actions.
pub trait Adapter: Send + Sync + fmt::Debug {
    /// The adapter kind (`null`, `console`, `webhook`, …), for logs.
    fn kind(&self) -> &'static str;

    fn capabilities(&self) -> Capabilities;

    /// Whether the platform connection can take deliveries now (`/readyz`);
    /// an adapter with a session to establish says false until it is up.
    fn ready(&self) -> bool {
        true
    }

    /// Why [`Adapter::ready`] says false, for `/readyz` (None: no detail).
    fn not_ready_reason(&self) -> Option<String> {
        None
    }

    /// The circuit the platform's engine should use, when the adapter shares
    /// it with parts of its own (Discord: the gateway session opens it on a
    /// refused token); None: the engine makes one.
    fn circuit(&self) -> Option<crate::circuit::Circuit> {
        None
    }

    /// What `/readyz` adds about this platform when ready (Discord: the
    /// shards this gateway holds); None: nothing.
    fn ready_detail(&self) -> Option<String> {
        None
    }

    /// While the platform's circuit is open (a send returned [`Retry::Halt`]),
    /// the dispatcher calls this with backoff; `Ok` closes the circuit and
    /// sends resume. It must be cheap and must not send anything a user sees
    /// (Discord: `GET /users/@me`; Matrix: `/account/whoami`). An error with
    /// `Retry::Halt` keeps the circuit open; any other error is logged and
    /// also keeps it open.
    fn probe(&self) -> BoxFuture<'_, Result<(), AdapterError>> {
        Box::pin(async { Ok(()) })
    }

    /// Deliver one action.
    fn deliver<'a>(
        &'a self,
        delivery: Delivery<'a>,
    ) -> BoxFuture<'a, Result<Delivered, AdapterError>>;

    /// The latest `limit` messages of `channel`, oldest first.
    fn fetch_history<'a>(
        &'a self,
        _channel: &'a str,
        _limit: usize,
    ) -> BoxFuture<'a, Result<Vec<HistoryMessage>, AdapterError>> {
        Box::pin(async move {
            Err(AdapterError::permanent(
                "this platform's adapter cannot fetch channel history",
            ))
        })
    }

    /// Whether a worker's periodic heartbeat should leave `channel` alone.
    fn should_skip_channel_heartbeat<'a>(
        &'a self,
        _channel: &'a str,
    ) -> BoxFuture<'a, Result<bool, AdapterError>> {
        Box::pin(async move { Ok(false) })
    }

    /// Answer an RPC method the platform offers (history, webhook deletion, …).
    fn call<'a>(
        &'a self,
        method: &'a str,
        _args: &'a Value,
    ) -> BoxFuture<'a, Result<Value, AdapterError>> {
        Box::pin(async move {
            Err(AdapterError::permanent(format!(
                "the {} adapter has no RPC method `{method}`",
                self.kind()
            )))
        })
    }
}

pub type SharedAdapter = Arc<dyn Adapter>;

/// One message of a channel's history, as the `fetch_channel_history` RPC
/// returns it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HistoryMessage {
    pub user_id: String,
    pub user_name: String,
    pub text: String,
    /// Unix time in seconds (fractional).
    pub timestamp: f64,
    pub message_id: String,
    pub is_bot: bool,
    pub reply_to_id: Option<String>,
    /// Emoji and their counts, as the platform reports them.
    #[serde(default)]
    pub reactions: Vec<Value>,
}

/// Build the adapter a `[[platform]]` table asks for. `secret` is the
/// platform's credential: the webhook's signing secret, the matrix access token.
pub fn build(
    p: &crate::config::PlatformConfig,
    secret: Option<String>,
) -> Result<SharedAdapter, String> {
    use crate::config::AdapterKind;
    Ok(match p.adapter {
        AdapterKind::Null => Arc::new(null::NullAdapter::new(Duration::from_millis(p.delay_ms))),
        AdapterKind::Console => Arc::new(console::ConsoleAdapter::stdout(&p.name)),
        AdapterKind::Webhook => {
            let url = p
                .url
                .as_deref()
                .ok_or_else(|| format!("platform `{}` needs `url`", p.name))?;
            Arc::new(webhook::WebhookAdapter::new(
                &p.name,
                url,
                secret,
                Duration::from_millis(p.timeout_ms),
            )?)
        }
        AdapterKind::Matrix => Arc::new(matrix_from_config(p, secret)?),
        AdapterKind::Discord => {
            return Err(format!(
                "platform `{}`: the discord adapter shares its rate limits through Redis; build it with `discord_from_config`",
                p.name
            ));
        }
    })
}

/// The discord adapter of a `[[platform]]` table, with its bot token and the
/// Redis connection that holds the rate limits shared by every gateway.
pub fn discord_from_config(
    p: &crate::config::PlatformConfig,
    token: Option<String>,
    conn: crate::bus::Conn,
    keys: &crate::keys::Keys,
) -> Result<discord::DiscordAdapter, String> {
    discord::DiscordAdapter::new(
        keys,
        discord::DiscordSettings {
            api_base: discord_api_base(p),
            token: token
                .ok_or_else(|| format!("platform `{}` needs `token_env`", p.name))?
                .into(),
            long_text: p.long_text,
            global_per_second: p.global_rate_limit,
            invalid_request_limit: p.invalid_request_limit,
            request_timeout: Duration::from_millis(p.timeout_ms),
            max_inline_wait: Duration::from_millis(p.max_inline_wait_ms),
            toggle: p.toggle_button.then(|| discord::ToggleButton {
                label: p.toggle_label.clone(),
                custom_id: p.toggle_custom_id.clone(),
            }),
            nonce_window: Duration::from_millis(p.nonce_window_ms),
            presence: p.gateway,
            egress_host: p.egress_host.clone().unwrap_or_else(host_name),
            allowed_mentions: p.allowed_mentions.clone(),
            typing_beat: discord::typing::BEAT,
            application_id: p.application_id.clone(),
        },
        conn,
    )
}

/// This machine's host name (`local` when the kernel will not say).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "local".to_owned())
}

/// A discord platform's REST API base: its `api_base`, else Discord's.
fn discord_api_base(p: &crate::config::PlatformConfig) -> String {
    p.api_base
        .clone()
        .unwrap_or_else(|| discord::DEFAULT_API_BASE.to_owned())
}

/// The Discord gateway session of a `[[platform]]` table with `gateway =
/// true`: run by whichever gateway of the fleet holds its lease (`owner` is
/// this gateway's consumer name).
pub fn discord_session_from_config(
    p: &crate::config::PlatformConfig,
    token: Option<String>,
    owner: &str,
    bus: &crate::bus::Bus,
    adapter: &Arc<discord::DiscordAdapter>,
) -> Result<discord::gateway::Session, String> {
    discord::gateway::Session::new(
        discord::gateway::SessionSettings {
            platform: p.name.clone(),
            token: token
                .ok_or_else(|| format!("platform `{}` needs `token_env`", p.name))?
                .into(),
            api_base: discord_api_base(p),
            gateway_url: p.gateway_url.clone(),
            intents: p.intents.unwrap_or(discord::gateway::DEFAULT_INTENTS),
            lease: Duration::from_millis(p.session_lease_ms),
            owner: owner.to_owned(),
            interaction_defer: Duration::from_millis(p.interaction_defer_ms),
            shards: p.shards,
            commands: p
                .commands
                .iter()
                .map(|c| {
                    serde_json::to_value(c)
                        .map_err(|e| format!("platform `{}`: commands: {e}", p.name))
                })
                .collect::<Result<_, _>>()?,
        },
        bus.client().clone(),
        bus.conn(),
        bus.keys(),
        adapter.token_circuit(),
        Some(adapter.clone() as SharedAdapter),
    )
}

/// The matrix adapter of a `[[platform]]` table, with its access token,
/// keeping what the fleet shares (the buttons messages) in `bus`'s Redis.
/// With `refresh_token`, an expired access token is refreshed (once for the
/// fleet, the new tokens shared through Redis).
pub fn matrix_shared_from_config(
    p: &crate::config::PlatformConfig,
    access_token: Option<String>,
    refresh_token: Option<String>,
    bus: &crate::bus::Bus,
) -> Result<matrix::MatrixAdapter, String> {
    Ok(matrix_from_config(p, access_token)?
        .with_refresh_token(refresh_token)
        .with_redis(bus.conn(), matrix::MatrixKeys::new(bus.keys().matrix())))
}

/// The Matrix syncer of a `[[platform]]` table: run by whichever gateway of
/// the fleet holds its lease (`owner` is this gateway's consumer name).
pub fn matrix_syncer_from_config(
    p: &crate::config::PlatformConfig,
    adapter: Arc<matrix::MatrixAdapter>,
    owner: &str,
    bus: &crate::bus::Bus,
) -> Result<matrix::sync::Syncer, String> {
    matrix::sync::Syncer::new(
        adapter,
        bus.conn(),
        matrix::MatrixKeys::new(bus.keys().matrix()),
        bus.keys().inbound(),
        matrix::sync::SyncSettings {
            owner: owner.to_owned(),
            lease: Duration::from_millis(p.session_lease_ms),
            timeline_limit: p.sync_timeline_limit,
        },
    )
}

/// The matrix adapter of a `[[platform]]` table, with its access token.
pub fn matrix_from_config(
    p: &crate::config::PlatformConfig,
    access_token: Option<String>,
) -> Result<matrix::MatrixAdapter, String> {
    let need = |what: &str| format!("platform `{}` needs `{what}`", p.name);
    matrix::MatrixAdapter::new(
        &p.name,
        matrix::MatrixSettings {
            homeserver: p.homeserver.clone().ok_or_else(|| need("homeserver"))?,
            access_token: access_token.ok_or_else(|| need("access_token_env"))?,
            user_id: p.user_id.clone().ok_or_else(|| need("user_id"))?,
            auto_join: p.auto_join,
            sync_timeout: Duration::from_millis(p.sync_timeout_ms),
            request_timeout: Duration::from_millis(p.timeout_ms),
        },
    )
}
