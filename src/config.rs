//! Configuration: the TOML file of SPEC §4, every key overridable from the
//! environment (`STARGAZER_<SECTION>_<KEY>`, e.g. `STARGAZER_REDIS_URL`), and
//! validated at load with errors that name the key.
//!
//! The library never reads the process environment itself: the caller passes
//! the variables in (see [`Config::load`]).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// A configuration problem, naming the key or file at fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub redis: RedisConfig,
    #[serde(default)]
    pub gateway: GatewayConfig,
    /// Defaults for every platform; `[platform.consumer]` overrides per platform.
    #[serde(default)]
    pub consumer: ConsumerConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default, rename = "platform")]
    pub platforms: Vec<PlatformConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://host:port[/db]`, `rediss://…` or `redis+unix:///path`.
    pub url: String,
    /// Prefix of every Stargazer key (`sg` → `sg:{discord}:outbound`).
    pub prefix: String,
    /// A `message_key` must start with this, or the envelope is bad input.
    pub cache_prefix: String,
    /// Redis Cluster: seed nodes (`redis://` or `rediss://`), instead of
    /// `url`. In the environment: one comma-separated string.
    #[serde(deserialize_with = "list_or_csv")]
    pub cluster: Vec<String>,
    /// A Sentinel-managed primary, instead of `url`: `{ master, urls }`.
    pub sentinel: Option<SentinelConfig>,
    /// PEM file of the CA that signed the server's certificate (`rediss://`);
    /// default: the built-in web roots.
    pub tls_ca_file: Option<String>,
    /// PEM client certificate (chain), for a server that requires one; with `tls_key_file`.
    pub tls_cert_file: Option<String>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<String>,
    /// Name of an environment variable holding the password (of the URL's
    /// user, or of `default`); wins over a password in the URL.
    pub password_env: Option<String>,
    /// Replicas every commit waits for (`WAIT`); 0 = do not wait.
    pub wait_replicas: u32,
    /// How long a commit waits for them; a shorter answer is counted, not an error.
    pub wait_timeout_ms: u64,
}

/// The URL `redis.url` has when the file does not set it.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_REDIS_URL.into(),
            prefix: "sg".into(),
            cache_prefix: "sg:msg:".into(),
            cluster: Vec::new(),
            sentinel: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            password_env: None,
            wait_replicas: 0,
            wait_timeout_ms: 1_000,
        }
    }
}

/// `[redis] sentinel = { master = "sg", urls = ["redis://10.0.0.1:26379"] }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SentinelConfig {
    /// The name the Sentinels monitor the primary under (`sentinel monitor <name> …`).
    pub master: String,
    /// The Sentinels (`redis://host:port`); the first that answers is asked.
    #[serde(deserialize_with = "list_or_csv")]
    pub urls: Vec<String>,
}

/// A list of strings, or one comma-separated string (an environment override).
fn list_or_csv<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        Csv(String),
    }
    Ok(match Either::deserialize(d)? {
        Either::List(v) => v,
        Either::Csv(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

impl RedisConfig {
    /// Every URL this config connects to (`url`, or the cluster's seeds).
    pub fn urls(&self) -> Vec<&str> {
        if self.cluster.is_empty() {
            vec![self.url.as_str()]
        } else {
            self.cluster.iter().map(String::as_str).collect()
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(s) = &self.sentinel {
            if self.url != DEFAULT_REDIS_URL || !self.cluster.is_empty() {
                return Err(err(
                    "redis.sentinel takes the place of redis.url and redis.cluster: set only one",
                ));
            }
            if s.master.is_empty() || s.urls.is_empty() {
                return Err(err(
                    "redis.sentinel needs `master` (the monitored name) and at least one of `urls`",
                ));
            }
            if self.tls_ca_file.is_some() || self.tls_cert_file.is_some() {
                return Err(err(
                    "redis.tls_ca_file / redis.tls_cert_file are not supported with redis.sentinel yet",
                ));
            }
            for u in &s.urls {
                if !u.starts_with("redis://") {
                    return Err(err(format!(
                        "redis.sentinel.urls: `{}` must start with redis://",
                        crate::bus::conn::redact(u)
                    )));
                }
            }
        }
        if !self.cluster.is_empty() && self.url != DEFAULT_REDIS_URL {
            return Err(err(
                "redis.url and redis.cluster are both set: name the cluster's seed nodes in \
                 redis.cluster only",
            ));
        }
        for u in self.urls() {
            let shown = crate::bus::conn::redact(u);
            if !(self.cluster.is_empty() || u.starts_with("redis://") || u.starts_with("rediss://"))
            {
                return Err(err(format!(
                    "redis.cluster: `{shown}` must start with redis:// or rediss://"
                )));
            }
            if let Err(e) = redis::IntoConnectionInfo::into_connection_info(u) {
                let key = if self.cluster.is_empty() {
                    "redis.url"
                } else {
                    "redis.cluster"
                };
                return Err(err(format!("{key}: `{shown}` is not a Redis URL: {e}")));
            }
            let tls_files = self.tls_ca_file.is_some() || self.tls_cert_file.is_some();
            if tls_files && !u.starts_with("rediss://") {
                return Err(err(format!(
                    "redis.tls_ca_file / redis.tls_cert_file are set but `{shown}` is not a \
                     rediss:// URL (TLS would not be used)"
                )));
            }
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(err(
                "redis.tls_cert_file and redis.tls_key_file go together: set both or neither",
            ));
        }
        if self.wait_replicas > 0 && self.wait_timeout_ms == 0 {
            return Err(err(
                "redis.wait_timeout_ms must be greater than 0 when redis.wait_replicas is set \
                 (WAIT with 0 would block a commit forever)",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Name of this node in every consumer group; default: host name + pid.
    /// Keep it stable across restarts so a node takes its own pending entries back.
    pub consumer_name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the `/healthz`, `/readyz` and `/metrics` listener; off when unset.
    pub listen: Option<String>,
    /// Serve the dashboard at `/ui/` on that listener (read-only without a token).
    pub ui: bool,
    /// The variable holding the dashboard's action token (replay, purge); unset: read-only.
    pub ui_token_env: Option<String>,
    /// The token itself (tests); prefer `ui_token_env`.
    pub ui_token: Option<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: None,
            ui: true,
            ui_token_env: None,
            ui_token: None,
        }
    }
}

/// What to do with an entry whose previous send may or may not have reached
/// the platform (its gateway died mid-send) when the platform cannot de-duplicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownOutcome {
    Resend,
    DeadLetter,
}

macro_rules! consumer_settings {
    ($( $(#[$doc:meta])* $name:ident : $ty:ty = $default:expr ),* $(,)?) => {
        /// Settings of one platform's consumer.
        #[derive(Debug, Clone, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct ConsumerConfig {
            $( $(#[$doc])* pub $name: $ty, )*
        }

        impl Default for ConsumerConfig {
            fn default() -> Self {
                Self { $( $name: $default, )* }
            }
        }

        /// A platform's overrides of [`ConsumerConfig`] (`[platform.consumer]`).
        #[derive(Debug, Clone, Default, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct ConsumerOverrides {
            $( pub $name: Option<$ty>, )*
        }

        impl ConsumerConfig {
            /// These settings with a platform's overrides applied.
            pub fn overlay(&self, o: &ConsumerOverrides) -> ConsumerConfig {
                ConsumerConfig {
                    $( $name: o.$name.clone().unwrap_or_else(|| self.$name.clone()), )*
                }
            }
        }
    };
}

consumer_settings! {
    /// Entries held in memory at once (read, queued or being sent).
    max_in_flight: usize = 256,
    /// Most entries one XREADGROUP asks for.
    read_batch: usize = 256,
    /// How long one blocking read waits for new entries.
    block_ms: u64 = 2000,
    /// Period of the full recovery sweep over the group's consumers (dead
    /// ones are also claimed as soon as they are found dead).
    autoclaim_interval_ms: u64 = 30_000,
    /// The latest a dead consumer's pending entries are claimed; must cover
    /// finding it dead (`lock_ttl_ms`).
    autoclaim_min_idle_ms: u64 = 60_000,
    /// Attempts (across redeliveries) before an entry may be dead-lettered…
    max_attempts: u32 = 5,
    /// …and the age it must also have reached.
    max_age_ms: u64 = 600_000,
    /// How long a later `seq` waits for a predecessor that never arrives.
    gap_timeout_ms: u64 = 30_000,
    /// Node lease: a gateway whose heartbeat (every third of it) stood still
    /// this long is dead, and its channels and entries move to the others.
    lock_ttl_ms: u64 = 10_000,
    /// Larger payloads are dead-lettered as `too_large`.
    max_payload_bytes: usize = 8 * 1024 * 1024,
    /// On SIGTERM, how long in-flight work may take to finish.
    drain_timeout_ms: u64 = 10_000,
    /// First retry delay; doubles per attempt, with jitter.
    backoff_base_ms: u64 = 200,
    /// Longest retry delay.
    backoff_max_ms: u64 = 30_000,
    /// `resend` or `dead_letter` (G2).
    unknown_outcome: UnknownOutcome = UnknownOutcome::Resend,
    /// Require every entry to carry `sig`, an HMAC-SHA256 of the payload with this secret.
    signing_secret: Option<String> = None,
    /// Directory of delegated tools for `execute_tool` RPCs (loaded on first use).
    tools_dir: Option<String> = None,
    /// Cap of the dead-letter stream (approximate, oldest dropped first); 0 = unbounded.
    dlq_maxlen: u64 = 0,
    /// Period of the outbound stream trimming (XTRIM MINID); 0 = never trim.
    trim_interval_ms: u64 = 60_000,
    /// Keep acknowledged entries at least this long (0 = trim as soon as acked).
    retention_ms: u64 = 3_600_000,
    /// How long a sent idempotency key is remembered, so a repeat of it is
    /// skipped as a proven duplicate.
    dedup_window_ms: u64 = 86_400_000,
    /// How long a gateway keeps an idle channel before giving it up.
    idle_release_ms: u64 = 2_000,
}

impl ConsumerConfig {
    pub fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let positive = [
            ("max_in_flight", self.max_in_flight as u64),
            ("read_batch", self.read_batch as u64),
            ("block_ms", self.block_ms),
            ("autoclaim_interval_ms", self.autoclaim_interval_ms),
            ("autoclaim_min_idle_ms", self.autoclaim_min_idle_ms),
            ("max_attempts", self.max_attempts as u64),
            ("lock_ttl_ms", self.lock_ttl_ms),
            ("max_payload_bytes", self.max_payload_bytes as u64),
            ("backoff_base_ms", self.backoff_base_ms),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(err(format!("{at}.{key} must be greater than 0")));
            }
        }
        if self.backoff_max_ms < self.backoff_base_ms {
            return Err(err(format!(
                "{at}.backoff_max_ms ({}) is below {at}.backoff_base_ms ({})",
                self.backoff_max_ms, self.backoff_base_ms
            )));
        }
        if self.lock_ttl_ms < 300 {
            return Err(err(format!(
                "{at}.lock_ttl_ms must be at least 300 (the heartbeat runs every third of it)"
            )));
        }
        // Coherent timers (SPEC §3): a dead gateway is found after
        // lock_ttl_ms of silence and its entries are claimed at that moment,
        // so the idle bound must cover it, and a gap must outlast it (twice,
        // for a heartbeat's slack) so a channel does not give up on entries
        // that are only being recovered.
        if self.autoclaim_min_idle_ms < self.lock_ttl_ms {
            return Err(err(format!(
                "{at}.autoclaim_min_idle_ms ({}) is shorter than finding a dead gateway takes \
                 ({at}.lock_ttl_ms = {}); raise it or lower lock_ttl_ms",
                self.autoclaim_min_idle_ms, self.lock_ttl_ms
            )));
        }
        if self.gap_timeout_ms < 2 * self.lock_ttl_ms {
            return Err(err(format!(
                "{at}.gap_timeout_ms ({}) must be at least twice {at}.lock_ttl_ms ({}), the \
                 time recovery of a dead gateway's entries can take",
                self.gap_timeout_ms, self.lock_ttl_ms
            )));
        }
        if self.dedup_window_ms < 60_000 {
            return Err(err(format!(
                "{at}.dedup_window_ms must be at least 60000 (a minute)"
            )));
        }
        Ok(())
    }
}

/// The adapter a platform uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterKind {
    Null,
    Console,
    Webhook,
    Matrix,
    Discord,
}

/// discord: what to do with text over Discord's 2,000 characters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LongText {
    /// Split on paragraph, line or word boundaries into ordered messages.
    #[default]
    Split,
    /// Dead-letter the envelope.
    DeadLetter,
}

impl fmt::Display for AdapterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AdapterKind::Null => "null",
            AdapterKind::Console => "console",
            AdapterKind::Webhook => "webhook",
            AdapterKind::Matrix => "matrix",
            AdapterKind::Discord => "discord",
        })
    }
}

/// One `[[platform]]` table.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformConfig {
    /// The platform's name in every key (`sg:{<name>}:outbound`).
    pub name: String,
    pub adapter: AdapterKind,
    /// webhook: where actions are POSTed.
    #[serde(default)]
    pub url: Option<String>,
    /// webhook: HMAC secret for `X-Stargazer-Signature` (or `secret_env`).
    #[serde(default)]
    pub secret: Option<String>,
    /// webhook: name of an environment variable holding the secret.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// webhook and matrix: whole-request timeout.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// null: simulated time per delivery, for benchmarks.
    #[serde(default)]
    pub delay_ms: u64,
    /// console: read typed lines from stdin as inbound messages (`#channel text`).
    #[serde(default)]
    pub read_stdin: bool,
    /// matrix: the homeserver's base URL.
    #[serde(default)]
    pub homeserver: Option<String>,
    /// matrix: the bot's access token (or `access_token_env`).
    #[serde(default)]
    pub access_token: Option<String>,
    /// matrix: name of an environment variable holding the access token.
    #[serde(default)]
    pub access_token_env: Option<String>,
    /// matrix: name of an environment variable holding a refresh token;
    /// an expired access token (soft logout) is then refreshed, once for
    /// the whole fleet.
    #[serde(default)]
    pub refresh_token_env: Option<String>,
    /// matrix: the bot's user id (`@bot:example.org`).
    #[serde(default)]
    pub user_id: Option<String>,
    /// matrix: join rooms the bot is invited to.
    #[serde(default = "default_true")]
    pub auto_join: bool,
    /// matrix: how long one `/sync` long-poll waits on the server.
    #[serde(default = "default_sync_timeout_ms")]
    pub sync_timeout_ms: u64,
    /// matrix: events of one room one `/sync` returns at most; more since
    /// the last sync are backfilled with `/messages`.
    #[serde(default = "default_sync_timeline_limit")]
    pub sync_timeline_limit: u32,
    /// discord: the REST API base (default `https://discord.com/api/v10`).
    #[serde(default)]
    pub api_base: Option<String>,
    /// discord: the bot token inline (tests only; prefer `token_env`).
    #[serde(default)]
    pub token: Option<String>,
    /// discord: name of an environment variable holding the bot token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// discord: `split` (default) or `dead_letter` text over 2,000 characters.
    #[serde(default)]
    pub long_text: LongText,
    /// discord: requests per second across all routes (Discord's global limit).
    #[serde(default = "default_global_rate_limit")]
    pub global_rate_limit: u32,
    /// discord: 401/403/429 answers per 10 minutes before sending stops.
    #[serde(default = "default_invalid_request_limit")]
    pub invalid_request_limit: u32,
    /// discord: a rate-limit wait up to this long is waited inside the send;
    /// a longer one is handed back to the channel's lane.
    #[serde(default = "default_max_inline_wait_ms")]
    pub max_inline_wait_ms: u64,
    /// discord: hold a gateway websocket session (presence, inbound events,
    /// reconciling sends of unknown outcome). One gateway of the fleet holds
    /// it at a time, through a lease in Redis.
    #[serde(default)]
    pub gateway: bool,
    /// discord: the gateway websocket URL (default: asked of `GET /gateway/bot`).
    #[serde(default)]
    pub gateway_url: Option<String>,
    /// discord: the gateway intents (default: guilds, guild and direct
    /// messages and their reactions, message content).
    #[serde(default)]
    pub intents: Option<u64>,
    /// discord: how long the session lease lasts without renewal; a gateway
    /// that dies hands the session over after this long.
    #[serde(default = "default_session_lease_ms")]
    pub session_lease_ms: u64,
    /// discord: attach the toggle button to every message, unless switched
    /// off for its channel or guild (`stargazer toggle`).
    #[serde(default)]
    pub toggle_button: bool,
    /// discord: the toggle button's label.
    #[serde(default = "default_toggle_label")]
    pub toggle_label: String,
    /// discord: the toggle button's custom id (a press arrives as a `button`
    /// inbound event with it).
    #[serde(default = "default_toggle_custom_id")]
    pub toggle_custom_id: String,
    /// discord: how long Discord de-duplicates a repeated nonce; a resend of
    /// an older entry is reconciled first (see the README).
    #[serde(default = "default_nonce_window_ms")]
    pub nonce_window_ms: u64,
    /// discord: the host whose egress IP this gateway's requests leave from
    /// (default: the machine's host name). Discord bans an IP after 10,000
    /// invalid requests in 10 minutes, whatever the token: gateways with the
    /// same value share one budget (`invalid_request_limit`) in Redis.
    #[serde(default)]
    pub egress_host: Option<String>,
    /// discord: the mention kinds a message may ping unless its envelope
    /// says otherwise (`users`, `roles`, `everyone`; default `["users"]`).
    #[serde(default = "default_allowed_mentions")]
    pub allowed_mentions: Vec<String>,
    /// discord: the bot's application id (interaction follow-ups, command
    /// registration); default: from the gateway's READY, else
    /// `GET /applications/@me`.
    #[serde(default)]
    pub application_id: Option<String>,
    /// discord: application commands registered at session start (`PUT
    /// /applications/{app}/commands`, a bulk overwrite): Discord's command
    /// objects, e.g. `{name = "ask", description = "Ask the bot", options = [...]}`.
    #[serde(default)]
    pub commands: Vec<toml::Value>,
    /// discord: how long the gateway waits for a worker to answer an
    /// interaction before deferring it itself (Discord allows 3 s).
    #[serde(default = "default_interaction_defer_ms")]
    pub interaction_defer_ms: u64,
    /// discord: how many gateway shards the bot runs: `"auto"` (Discord's
    /// recommendation from `GET /gateway/bot`) or a number; leased across
    /// the fleet's gateways.
    #[serde(default)]
    pub shards: crate::adapters::discord::gateway::ShardCount,
    /// Read the reference system's layout (`sg:outbound:<name>`), so its
    /// workers can keep publishing while the gateways are replaced; not on
    /// Redis Cluster (the key has no hash tag).
    #[serde(default)]
    pub legacy_layout: bool,
    /// legacy_layout: where the reference's workers put their RPC reply
    /// lists (a `reply_key` must start with this).
    #[serde(default)]
    pub legacy_reply_prefix: Option<String>,
    #[serde(default)]
    pub consumer: ConsumerOverrides,
}

impl PlatformConfig {
    /// The platform's key names under `prefix`.
    pub fn keys(&self, prefix: &str) -> crate::keys::Keys {
        if self.legacy_layout {
            let reply = self
                .legacy_reply_prefix
                .clone()
                .unwrap_or_else(|| format!("{prefix}:rpc:reply:"));
            crate::keys::Keys::legacy(prefix, &self.name, &reply)
        } else {
            crate::keys::Keys::new(prefix, &self.name)
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_global_rate_limit() -> u32 {
    50
}

fn default_invalid_request_limit() -> u32 {
    9_000
}

fn default_max_inline_wait_ms() -> u64 {
    1_000
}

fn default_session_lease_ms() -> u64 {
    15_000
}

fn default_toggle_label() -> String {
    "✧".into()
}

fn default_toggle_custom_id() -> String {
    "sg:toggle_menu".into()
}

fn default_interaction_defer_ms() -> u64 {
    2_000
}

fn default_allowed_mentions() -> Vec<String> {
    vec!["users".into()]
}

fn default_nonce_window_ms() -> u64 {
    120_000
}

fn default_sync_timeline_limit() -> u32 {
    100
}

fn default_sync_timeout_ms() -> u64 {
    30_000
}

fn default_timeout_ms() -> u64 {
    10_000
}

impl fmt::Debug for PlatformConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlatformConfig")
            .field("name", &self.name)
            .field("adapter", &self.adapter)
            .field("url", &self.url)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("secret_env", &self.secret_env)
            .field("timeout_ms", &self.timeout_ms)
            .field("homeserver", &self.homeserver)
            .field(
                "access_token",
                &self.access_token.as_ref().map(|_| "<redacted>"),
            )
            .field("access_token_env", &self.access_token_env)
            .field("refresh_token_env", &self.refresh_token_env)
            .field("user_id", &self.user_id)
            .field("api_base", &self.api_base)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_env", &self.token_env)
            .finish_non_exhaustive()
    }
}

impl PlatformConfig {
    /// The checks of a discord platform's keys (`at` names the table).
    fn validate_discord(&self, at: &str) -> Result<(), ConfigError> {
        let name = &self.name;
        if let Some(u) = &self.api_base
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            return Err(err(format!(
                "{at}.api_base `{u}` must start with http:// or https://"
            )));
        }
        if self.token.is_none() && self.token_env.is_none() {
            return Err(err(format!(
                "{at} (`{name}`) uses the discord adapter and needs `token_env` (or `token`)"
            )));
        }
        if self.global_rate_limit == 0 || self.invalid_request_limit == 0 || self.timeout_ms == 0 {
            return Err(err(format!(
                "{at}.global_rate_limit, {at}.invalid_request_limit and {at}.timeout_ms must be greater than 0"
            )));
        }
        if let Some(u) = &self.gateway_url
            && !(u.starts_with("ws://") || u.starts_with("wss://"))
        {
            return Err(err(format!(
                "{at}.gateway_url `{u}` must start with ws:// or wss://"
            )));
        }
        if self.gateway_url.is_some() && !self.gateway {
            return Err(err(format!(
                "{at}.gateway_url is set but `gateway = true` is not: the session would never be opened"
            )));
        }
        if self.session_lease_ms < 3_000 {
            return Err(err(format!(
                "{at}.session_lease_ms must be at least 3000 (it is renewed every third of it)"
            )));
        }
        if self.shards != Default::default() && !self.gateway {
            return Err(err(format!(
                "{at}.shards is set but `gateway = true` is not: no shard would ever be run"
            )));
        }
        if !(100..=2_800).contains(&self.interaction_defer_ms) {
            return Err(err(format!(
                "{at}.interaction_defer_ms must be 100 to 2800: Discord drops an interaction not acknowledged within 3000 ms, and the automatic defer needs time to arrive"
            )));
        }
        for (i, c) in self.commands.iter().enumerate() {
            let ok = c
                .get("name")
                .and_then(toml::Value::as_str)
                .is_some_and(|n| (1..=32).contains(&n.chars().count()));
            if !ok {
                return Err(err(format!(
                    "{at}.commands[{i}] needs `name` (1 to 32 characters, Discord's command name)"
                )));
            }
        }
        if let Some(k) = self
            .allowed_mentions
            .iter()
            .find(|k| !matches!(k.as_str(), "users" | "roles" | "everyone"))
        {
            return Err(err(format!(
                "{at}.allowed_mentions has `{k}`; the kinds are users, roles and everyone"
            )));
        }
        if self.toggle_button {
            let label = self.toggle_label.chars().count();
            if label == 0 || label > 80 {
                return Err(err(format!(
                    "{at}.toggle_label must be 1 to 80 characters (Discord's button label limit)"
                )));
            }
            let id = self.toggle_custom_id.chars().count();
            if id == 0 || id > 100 {
                return Err(err(format!(
                    "{at}.toggle_custom_id must be 1 to 100 characters (Discord's custom_id limit)"
                )));
            }
        }
        Ok(())
    }

    /// The checks of a matrix platform's keys (`at` names the table).
    fn validate_matrix(&self, at: &str) -> Result<(), ConfigError> {
        let name = &self.name;
        match &self.homeserver {
            None => {
                return Err(err(format!(
                    "{at} (`{name}`) uses the matrix adapter and needs `homeserver`"
                )));
            }
            Some(u) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                return Err(err(format!(
                    "{at}.homeserver `{u}` must start with http:// or https://"
                )));
            }
            Some(_) => {}
        }
        match &self.user_id {
            Some(u) if u.starts_with('@') && u.contains(':') => {}
            Some(u) => {
                return Err(err(format!(
                    "{at}.user_id `{u}` must look like @bot:example.org"
                )));
            }
            None => {
                return Err(err(format!(
                    "{at} (`{name}`) uses the matrix adapter and needs `user_id`"
                )));
            }
        }
        if self.access_token.is_none() && self.access_token_env.is_none() {
            return Err(err(format!(
                "{at} (`{name}`) uses the matrix adapter and needs `access_token_env` (or `access_token`)"
            )));
        }
        if self.sync_timeout_ms == 0 || self.timeout_ms == 0 {
            return Err(err(format!(
                "{at}.sync_timeout_ms and {at}.timeout_ms must be greater than 0"
            )));
        }
        if self.sync_timeline_limit == 0 {
            return Err(err(format!("{at}.sync_timeline_limit must be at least 1")));
        }
        if self.session_lease_ms < 3_000 {
            return Err(err(format!(
                "{at}.session_lease_ms must be at least 3000 (the matrix sync lease is renewed every third of it)"
            )));
        }
        Ok(())
    }
}

/// Keys whose environment override is always taken as a string.
const STRING_KEYS: &[&str] = &[
    "url",
    "prefix",
    "cache_prefix",
    "consumer_name",
    "listen",
    "unknown_outcome",
    "signing_secret",
    "tools_dir",
    "ui_token_env",
    "ui_token",
    "cluster",
    "tls_ca_file",
    "tls_cert_file",
    "tls_key_file",
    "password_env",
];

impl Config {
    /// Read `path`, apply `STARGAZER_*` overrides from `env`, validate.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(format!("cannot read config {}: {e}", path.display())))?;
        Self::from_toml(&text, env).map_err(|e| err(format!("{}: {}", path.display(), e.0)))
    }

    /// Parse TOML text, apply overrides from `env`, validate.
    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = text.parse().map_err(|e| err(format!("{e}")))?;
        for (var, value) in env {
            let Some(rest) = var.strip_prefix("STARGAZER_") else {
                continue;
            };
            let rest = rest.to_ascii_lowercase();
            let Some((section, key)) = rest.split_once('_') else {
                continue;
            };
            if !["redis", "gateway", "consumer", "http"].contains(&section) {
                continue;
            }
            let parsed = if STRING_KEYS.contains(&key) {
                toml::Value::String(value)
            } else if let Ok(i) = value.parse::<i64>() {
                toml::Value::Integer(i)
            } else if let Ok(b) = value.parse::<bool>() {
                toml::Value::Boolean(b)
            } else {
                toml::Value::String(value)
            };
            let entry = table
                .entry(section.to_owned())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(t) = entry else {
                return Err(err(format!("`{section}` must be a table")));
            };
            t.insert(key.to_owned(), parsed);
        }
        let merged = toml::to_string(&table).map_err(|e| err(format!("{e}")))?;
        let config: Config = toml::from_str(&merged).map_err(|e| err(format!("{e}")))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.redis.prefix.is_empty() || self.redis.prefix.contains(['{', '}']) {
            return Err(err(
                "redis.prefix must be non-empty and free of `{` and `}`",
            ));
        }
        self.redis.validate()?;
        self.consumer.validate("consumer")?;
        // The message cache must never reach Stargazer's own keys (SPEC §2).
        let cp = &self.redis.cache_prefix;
        for own in crate::keys::Keys::own_prefixes(&self.redis.prefix) {
            if cp.is_empty() || own.starts_with(cp.as_str()) || cp.starts_with(own.as_str()) {
                return Err(err(format!(
                    "redis.cache_prefix `{cp}` overlaps Stargazer's own keys (`{own}…`); \
                     use a prefix of its own such as `{}:msg:`",
                    self.redis.prefix
                )));
            }
        }
        if let Some(listen) = &self.http.listen
            && listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(err(format!(
                "http.listen `{listen}` is not an address like 127.0.0.1:9464"
            )));
        }
        if self.http.ui_token.is_some() || self.http.ui_token_env.is_some() {
            if self.http.listen.is_none() || !self.http.ui {
                return Err(err(
                    "http.ui_token_env (or http.ui_token) is set, but the dashboard is not \
                     served: set http.listen and leave http.ui on, or drop the token",
                ));
            }
            if self
                .http
                .ui_token
                .as_deref()
                .is_some_and(|t| t.trim().len() < 16)
            {
                return Err(err(
                    "http.ui_token must be at least 16 characters (it guards replay and purge)",
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, p) in self.platforms.iter().enumerate() {
            let at = format!("platform[{i}]");
            if p.legacy_reply_prefix.is_some() && !p.legacy_layout {
                return Err(err(format!(
                    "{at}.legacy_reply_prefix is set but {at}.legacy_layout is not"
                )));
            }
            if p.legacy_layout && !self.redis.cluster.is_empty() {
                return Err(err(format!(
                    "{at}.legacy_layout cannot be used with redis.cluster: the reference's \
                     stream `{}` carries no hash tag",
                    p.keys(&self.redis.prefix).outbound()
                )));
            }
            if p.legacy_layout {
                let reply = p.keys(&self.redis.prefix).reply_prefix();
                let own = crate::keys::Keys::own_prefixes(&self.redis.prefix);
                if reply.is_empty()
                    || own
                        .iter()
                        .any(|o| reply.starts_with(o.as_str()) || o.starts_with(reply.as_str()))
                    || reply.starts_with(&self.redis.cache_prefix)
                {
                    return Err(err(format!(
                        "{at}.legacy_reply_prefix `{reply}` overlaps Stargazer's own keys or the message cache"
                    )));
                }
            }
            if p.name.is_empty()
                || !p
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            {
                return Err(err(format!(
                    "{at}.name `{}` must be non-empty and use only letters, digits, `-`, `_`, `.`",
                    p.name
                )));
            }
            if !seen.insert(p.name.as_str()) {
                return Err(err(format!("{at}.name `{}` appears twice", p.name)));
            }
            self.consumer
                .overlay(&p.consumer)
                .validate(&format!("{at}.consumer"))?;
            if p.adapter == AdapterKind::Webhook {
                match &p.url {
                    None => {
                        return Err(err(format!(
                            "{at} (`{}`) uses the webhook adapter and needs `url`",
                            p.name
                        )));
                    }
                    Some(u) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                        return Err(err(format!(
                            "{at}.url `{u}` must start with http:// or https://"
                        )));
                    }
                    Some(_) => {}
                }
            }
            if p.adapter == AdapterKind::Matrix {
                p.validate_matrix(&at)?;
            }
            if p.adapter == AdapterKind::Discord {
                p.validate_discord(&at)?;
            }
        }
        Ok(())
    }

    /// The consumer settings of platform `p`.
    pub fn consumer_for(&self, p: &PlatformConfig) -> ConsumerConfig {
        self.consumer.overlay(&p.consumer)
    }

    /// The matrix access token of `p`, from `access_token` or the variable
    /// named by `access_token_env`.
    pub fn access_token_for(
        p: &PlatformConfig,
        env: &HashMap<String, String>,
    ) -> Result<String, ConfigError> {
        match (&p.access_token, &p.access_token_env) {
            (Some(t), _) => Ok(t.clone()),
            (None, Some(var)) => env.get(var).cloned().ok_or_else(|| {
                err(format!(
                    "platform `{}`: access_token_env names `{var}`, which is not set",
                    p.name
                ))
            }),
            (None, None) => Err(err(format!(
                "platform `{}` uses the matrix adapter and needs `access_token_env` or `access_token`",
                p.name
            ))),
        }
    }

    /// The matrix refresh token of `p`, from the variable named by
    /// `refresh_token_env` (None when the key is not set).
    pub fn refresh_token_for(
        p: &PlatformConfig,
        env: &HashMap<String, String>,
    ) -> Result<Option<String>, ConfigError> {
        match &p.refresh_token_env {
            None => Ok(None),
            Some(var) => env.get(var).cloned().map(Some).ok_or_else(|| {
                err(format!(
                    "platform `{}`: refresh_token_env names `{var}`, which is not set",
                    p.name
                ))
            }),
        }
    }

    /// The discord bot token of `p`, from `token` or the variable named by `token_env`.
    pub fn discord_token_for(
        p: &PlatformConfig,
        env: &HashMap<String, String>,
    ) -> Result<String, ConfigError> {
        match (&p.token, &p.token_env) {
            (Some(t), _) => Ok(t.clone()),
            (None, Some(var)) => env.get(var).cloned().ok_or_else(|| {
                err(format!(
                    "platform `{}`: token_env names `{var}`, which is not set",
                    p.name
                ))
            }),
            (None, None) => Err(err(format!(
                "platform `{}` uses the discord adapter and needs `token_env` or `token`",
                p.name
            ))),
        }
    }

    /// The dashboard's action token, from `http.ui_token` or the variable
    /// named by `http.ui_token_env`; `None`: the dashboard is read-only.
    pub fn ui_token(&self, env: &HashMap<String, String>) -> Result<Option<String>, ConfigError> {
        match (&self.http.ui_token, &self.http.ui_token_env) {
            (Some(t), _) => Ok(Some(t.clone())),
            (None, Some(var)) => match env.get(var) {
                Some(t) if t.trim().len() >= 16 => Ok(Some(t.trim().to_owned())),
                Some(_) => Err(err(format!(
                    "http.ui_token_env names `{var}`, whose value is shorter than 16 characters \
                     (it guards replay and purge)"
                ))),
                None => Err(err(format!(
                    "http.ui_token_env names `{var}`, which is not set"
                ))),
            },
            (None, None) => Ok(None),
        }
    }

    /// The webhook secret of `p`, from `secret` or the variable named by `secret_env`.
    pub fn secret_for(
        p: &PlatformConfig,
        env: &HashMap<String, String>,
    ) -> Result<Option<String>, ConfigError> {
        match (&p.secret, &p.secret_env) {
            (Some(s), _) => Ok(Some(s.clone())),
            (None, Some(var)) => env.get(var).cloned().map(Some).ok_or_else(|| {
                err(format!(
                    "platform `{}`: secret_env names `{var}`, which is not set",
                    p.name
                ))
            }),
            (None, None) => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"
[redis]
url = "redis://127.0.0.1:6379"
[gateway]
consumer_name = "gw-1"
[consumer]
max_in_flight = 256
autoclaim_interval_ms = 30000
autoclaim_min_idle_ms = 60000
max_attempts = 5
max_age_ms = 600000
gap_timeout_ms = 30000
lock_ttl_ms = 10000
max_payload_bytes = 8388608
drain_timeout_ms = 10000
[http]
listen = "127.0.0.1:9464"
[[platform]]
name = "hook"
adapter = "webhook"
url = "http://127.0.0.1:8080/deliver"
"#;

    #[test]
    fn the_spec_example_loads() {
        let c = Config::from_toml(SPEC, []).unwrap();
        assert_eq!(c.platforms[0].name, "hook");
        assert_eq!(c.gateway.consumer_name.as_deref(), Some("gw-1"));
        assert_eq!(c.consumer.max_in_flight, 256);
    }

    #[test]
    fn environment_overrides_win() {
        let env = [
            (
                "STARGAZER_REDIS_URL".to_owned(),
                "redis://10.0.0.1:7000".to_owned(),
            ),
            (
                "STARGAZER_CONSUMER_MAX_IN_FLIGHT".to_owned(),
                "9".to_owned(),
            ),
            (
                "STARGAZER_GATEWAY_CONSUMER_NAME".to_owned(),
                "123".to_owned(),
            ),
        ];
        let c = Config::from_toml(SPEC, env).unwrap();
        assert_eq!(c.redis.url, "redis://10.0.0.1:7000");
        assert_eq!(c.consumer.max_in_flight, 9);
        assert_eq!(c.gateway.consumer_name.as_deref(), Some("123"));
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::from_toml("[consumer]\nmax_inflight = 3\n", []).unwrap_err();
        assert!(e.0.contains("max_inflight"), "{e}");
        let e = Config::from_toml("[consumer]\nmax_in_flight = 0\n", []).unwrap_err();
        assert!(e.0.contains("consumer.max_in_flight"), "{e}");
        let e = Config::from_toml("[[platform]]\nname = \"h\"\nadapter = \"webhook\"\n", [])
            .unwrap_err();
        assert!(e.0.contains("needs `url`"), "{e}");
        let e =
            Config::from_toml("[[platform]]\nname = \"h\"\nadapter = \"fax\"\n", []).unwrap_err();
        assert!(e.0.contains("fax"), "{e}");
        let env = [(
            "STARGAZER_CONSUMER_LOCK_TTL_MS".to_owned(),
            "soon".to_owned(),
        )];
        let e = Config::from_toml("", env).unwrap_err();
        assert!(e.0.contains("lock_ttl_ms"), "{e}");
    }

    #[test]
    fn redis_deployments_are_checked_with_the_key_named() {
        let load = |redis: &str| Config::from_toml(&format!("[redis]\n{redis}\n"), []);
        let c = load("cluster = [\"redis://10.0.0.1:7000\", \"redis://10.0.0.2:7000\"]").unwrap();
        assert_eq!(c.redis.urls().len(), 2);
        // From the environment: one comma-separated string.
        let env = [(
            "STARGAZER_REDIS_CLUSTER".to_owned(),
            "redis://a:7000, redis://b:7000".to_owned(),
        )];
        let c = Config::from_toml("", env).unwrap();
        assert_eq!(c.redis.cluster, ["redis://a:7000", "redis://b:7000"]);
        for (redis, says) in [
            (
                "url = \"redis://h:1\"\ncluster = [\"redis://h:2\"]",
                "redis.url and redis.cluster",
            ),
            ("cluster = [\"redis+unix:///tmp/r.sock\"]", "redis.cluster"),
            ("url = \"http://h:1\"", "redis.url"),
            ("tls_ca_file = \"/ca.pem\"", "not a rediss:// URL"),
            (
                "url = \"rediss://h:1\"\ntls_cert_file = \"/c.pem\"",
                "redis.tls_cert_file and redis.tls_key_file",
            ),
            (
                "wait_replicas = 1\nwait_timeout_ms = 0",
                "redis.wait_timeout_ms",
            ),
        ] {
            let e = load(redis).unwrap_err();
            assert!(e.0.contains(says), "{redis}: {e}");
        }
        let e = Config::from_toml(
            "[redis]\ncluster = [\"redis://h:1\"]\n[[platform]]\nname = \"old\"\nadapter = \"null\"\nlegacy_layout = true\n",
            [],
        )
        .unwrap_err();
        assert!(
            e.0.contains("platform[0].legacy_layout") && e.0.contains("redis.cluster"),
            "{e}"
        );
        // A password in the URL never shows in an error.
        let e = load("cluster = [\"http://u:hunter2@h:1\"]").unwrap_err();
        assert!(!e.0.contains("hunter2"), "{e}");
    }

    #[test]
    fn platform_overrides_apply() {
        let c = Config::from_toml(
            "[consumer]\nmax_attempts = 3\n[[platform]]\nname = \"a\"\nadapter = \"null\"\n[platform.consumer]\nmax_attempts = 7\n",
            [],
        )
        .unwrap();
        assert_eq!(c.consumer_for(&c.platforms[0]).max_attempts, 7);
        assert_eq!(c.consumer_for(&c.platforms[0]).max_in_flight, 256);
    }

    #[test]
    fn the_dashboard_token_is_checked() {
        let base = "[http]\nlisten = \"127.0.0.1:9464\"\n";
        let env = |k: &str, v: &str| HashMap::from([(k.to_owned(), v.to_owned())]);
        let c = Config::from_toml(&format!("{base}ui_token_env = \"T\"\n"), []).unwrap();
        assert!(c.http.ui, "the dashboard is on by default");
        assert_eq!(
            c.ui_token(&env("T", "0123456789abcdef"))
                .unwrap()
                .as_deref(),
            Some("0123456789abcdef")
        );
        let e = c.ui_token(&HashMap::new()).unwrap_err().0;
        assert!(e.contains("`T`") && e.contains("not set"), "{e}");
        let e = c.ui_token(&env("T", "short")).unwrap_err().0;
        assert!(e.contains("16 characters"), "{e}");
        let c = Config::from_toml(base, []).unwrap();
        assert_eq!(c.ui_token(&HashMap::new()).unwrap(), None, "read-only");
        let e = Config::from_toml("[http]\nui_token_env = \"T\"\n", [])
            .unwrap_err()
            .0;
        assert!(e.contains("http.listen"), "{e}");
        let e = Config::from_toml(
            &format!("{base}ui = false\nui_token = \"0123456789abcdef\"\n"),
            [],
        )
        .unwrap_err()
        .0;
        assert!(e.contains("not served"), "{e}");
        let off = Config::from_toml(base, [("STARGAZER_HTTP_UI".to_owned(), "false".to_owned())])
            .unwrap();
        assert!(!off.http.ui);
    }
}
