//! The Discord gateway session: one websocket (API v10, JSON encoding, no
//! compression) per shard of a Discord platform, each shard held by exactly
//! one gateway process of the fleet at a time, that turns what users do into
//! inbound events and carries presence updates (op 3) on every shard.
//!
//! **Shards** ([`shards`]). The shard count is `shards` (a number) or, with
//! `shards = "auto"`, what `GET /gateway/bot` recommends, stored for the fleet
//! in `{base}shards`. Each gateway registers as live in `{base}shard:members`
//! and takes free shard leases (`{base}shard:<n>:lease`, `SET NX PX`, value =
//! its consumer name) up to its fair share, ceil(shards / live gateways); one
//! holding more than its share hands the highest back (closing with 4000 so
//! the next holder resumes). A dead holder's leases expire after
//! `session_lease_ms` and the survivors take them. Close 4010/4011 re-fetch
//! the count and reshard the fleet (once: the count changes only from the
//! value the gateway saw).
//!
//! **Identify spacing.** Discord allows one IDENTIFY per rate-limit bucket
//! (`shard % max_concurrency`) per 5 s for the whole bot: a shard identifies
//! only once it has set `{base}identify:<bucket>` (`SET NX PX 5000`), so the
//! fleet keeps the rule whichever gateways hold which shards.
//!
//! **One holder per shard.** A holder renews its shard's lease every lease/3
//! with a compare-and-pexpire script and closes the websocket at once when it
//! fails to. On stop it closes with code 4000 (not 1000, which would
//! invalidate the session) and deletes the lease if still its own, so the
//! next holder RESUMEs.
//!
//! **Nothing lost across a handover.** `{base}shard:<n>:session` (hash
//! `session_id`, `resume_url`, `seq`, `user_id`, `shards`) is written on
//! READY; `seq` moves in the same Lua script (fenced by the shard's lease) as
//! the inbound XADD and the other writes of the event it belongs to, so the
//! stored seq never runs ahead of what was recorded and a node that takes
//! over RESUMEs from there: Discord replays the rest. Events that record
//! nothing move the stored seq lazily (at the next heartbeat, and on stop). A
//! replayed event at or below the seq already processed is skipped. A session
//! stored for another shard count is not resumed.
//!
//! **Presence.** [`set_presence`] stores `{base}presence` (latest wins) and
//! publishes on the channel of the same name; every shard's holder reads the
//! key on a notification (and once after READY/RESUMED) and sends op 3 with a
//! custom status, coalescing bursts and keeping within the gateway's 120
//! events per 60 s. Identify carries the stored presence too.
//!
//! **Side tables** for the adapter: `{base}guilds` (channel id → guild id, from
//! GUILD_CREATE, CHANNEL_CREATE/UPDATE, THREAD_CREATE/UPDATE, MESSAGE_CREATE)
//! and `{base}nonce:<nonce>` (the id of a message this bot sent with that
//! nonce, for a day).
//!
//! **Lifecycle** (Discord's documented one, per shard): Hello → heartbeats
//! (first after interval × jitter, `d` = last seq; no ACK since the previous
//! one = zombie: close and resume) → Identify (with `shard: [n, count]`) or
//! Resume → READY / RESUMED. Op 7 → resume; op 9 → resume (d = true) or
//! identify afresh (d = false) after 1–5 s. Close codes 4012–4014 are fatal
//! (logged with the fix, no reconnect); 4010/4011 reshard; 4004 (and a 401
//! from `GET /gateway/bot`) opens the platform's [`crate::circuit::Circuit`] and the shard
//! reconnects once a probe succeeds; others reconnect with exponential
//! backoff (1 s doubling to 30 s, reset by a successful session); three
//! resumes in a row that do not come up give way to a fresh Identify.
//!
//! **Layout.** [`lease`](self) (the fenced scripts), `shards` (the
//! fleet's shard leasing), `runner` (one held shard: lease, reconnects,
//! stored session, identify slot), `protocol` (the [`protocol::Op`] and
//! [`protocol::CloseCode`] enums, presence objects), `connection` (one
//! websocket from connect to close), `budget` (the send budget), `events`
//! (pure event mapping); interactions are deferred by
//! [`super::interactions::AutoDefer`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::bus::Conn;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use redis::{AsyncCommands, RedisResult};
use reqwest::Url;
use reqwest::header::AUTHORIZATION;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::keys::Keys;

mod budget;
mod connection;
mod events;
mod lease;
pub mod protocol;
mod runner;
pub mod shards;

use connection::watch_presence;
use runner::Runner;

use budget::{Budget, PRESENCE_RESERVE};
pub use events::to_inbound;
use events::{Writes, str_at, writes_for};
use lease::{COMMIT, RELEASE, RENEW, WRITE_SESSION, identify_key, presence_key};
pub use lease::{
    guilds_key, nonce_key, set_presence, shard_lease_key, shard_session_key, shards_key,
};
use protocol::{CloseCode, Op, gateway_request_url, presence_object};
pub use shards::ShardCount;

/// GUILDS | GUILD_MESSAGES | GUILD_MESSAGE_REACTIONS | DIRECT_MESSAGES |
/// DIRECT_MESSAGE_REACTIONS | MESSAGE_CONTENT (privileged: enable it in the
/// developer portal).
pub const DEFAULT_INTENTS: u64 = 1 | 512 | 1024 | 4096 | 8192 | 32768;
/// The default session lease in Redis.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15);
/// The close code this client uses: anything but 1000/1001 keeps the session resumable.
const CLOSE_RESUMABLE: u16 = 4000;
/// How long a bot-sent message's nonce is remembered.
const NONCE_TTL_S: u64 = 86_400;
/// Discord's identify rate limit: one per bucket per this long.
const IDENTIFY_GAP: Duration = Duration::from_secs(5);
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Resumes in a row that may fail to come up before identifying afresh.
const MAX_FAILED_RESUMES: u32 = 3;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const HELLO_TIMEOUT: Duration = Duration::from_secs(20);
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// What a session needs to know.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// The platform name (`discord`), written into inbound events.
    pub platform: String,
    /// The bot token, without `Bot `. Never logged.
    pub token: super::Secret,
    /// The REST base (`https://discord.com/api/v10`).
    pub api_base: String,
    /// `ws://` or `wss://`; `None` asks `GET {api_base}/gateway/bot`.
    pub gateway_url: Option<String>,
    pub intents: u64,
    /// The session lease's time to live in Redis.
    pub lease: Duration,
    /// This gateway's consumer name: the lease holder id.
    pub owner: String,
    /// How long a worker has to answer an interaction before the session
    /// defers it (`interaction_defer_ms`).
    pub interaction_defer: Duration,
    /// Application commands registered on READY (Discord's command objects).
    pub commands: Vec<Value>,
    /// How many shards the bot runs: Discord's recommendation, or a number.
    pub shards: ShardCount,
}

impl SessionSettings {
    /// Defaults: Discord's API base, the gateway URL from `/gateway/bot`,
    /// [`DEFAULT_INTENTS`], [`DEFAULT_LEASE`].
    pub fn new(platform: &str, token: &str, owner: &str) -> Self {
        SessionSettings {
            platform: platform.to_owned(),
            token: token.into(),
            api_base: super::DEFAULT_API_BASE.to_owned(),
            gateway_url: None,
            intents: DEFAULT_INTENTS,
            lease: DEFAULT_LEASE,
            owner: owner.to_owned(),
            interaction_defer: Duration::from_millis(2000),
            commands: Vec::new(),
            shards: ShardCount::Auto,
        }
    }
}

/// What a session knows to resume with.
#[derive(Debug, Clone, Default, PartialEq)]
struct Resume {
    session_id: Option<String>,
    resume_url: Option<String>,
    seq: Option<u64>,
    user_id: Option<String>,
    /// The shard count the session was identified with.
    shards: Option<u32>,
}

impl Resume {
    fn can_resume(&self) -> bool {
        self.session_id.is_some() && self.resume_url.is_some()
    }

    fn forget(&mut self) {
        self.session_id = None;
        self.resume_url = None;
        self.seq = None;
    }
}

enum Commit {
    Done,
    /// The lease is no longer ours: nothing was written.
    Fenced,
}

/// How one hold of a shard's lease ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    Stopped,
    /// The lease was lost, or Redis failed: try again later.
    Retry,
    Fatal,
    /// Discord refused the token (close 4004, or a 401): the circuit is open.
    Refused,
    /// Close 4010/4011: the shard count is wrong; reshard.
    Reshard,
}

/// How one websocket connection ended.
enum End {
    /// Stop, or the lease was lost.
    Cancelled,
    Fatal(String),
    /// The token was refused (close 4004, or a 401): wait for the circuit.
    Refused(String),
    /// Close 4010 (invalid shard) or 4011 (sharding required).
    Reshard(String),
    /// Connect again (resume if the session is known) after `wait`, or after
    /// the backoff when `None`. `healthy`: the connection had READY/RESUMED.
    Again {
        wait: Option<Duration>,
        healthy: bool,
    },
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The sending half of a connection, with its send budget.
struct Link {
    sink: SplitSink<Ws, Message>,
    budget: Budget,
}

impl Link {
    async fn send(&mut self, v: &Value) -> Result<(), String> {
        self.budget.record(Instant::now());
        match timeout(SEND_TIMEOUT, self.sink.send(Message::text(v.to_string()))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("sending to the gateway timed out".into()),
        }
    }

    /// Close with a non-1000 code, so the session stays resumable.
    async fn close(&mut self) {
        let frame = CloseFrame {
            code: WsCloseCode::from(CLOSE_RESUMABLE),
            reason: "reconnecting".into(),
        };
        let _ = timeout(
            Duration::from_secs(1),
            self.sink.send(Message::Close(Some(frame))),
        )
        .await;
    }
}

/// The live state of one identified or resumed connection.
struct Live {
    link: Link,
    interval: Duration,
    next_heartbeat: Instant,
    acked: bool,
    ready: bool,
    presence_due: Option<Instant>,
}

/// What `GET /gateway/bot` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BotGateway {
    pub url: String,
    /// The shard count Discord recommends.
    pub shards: u32,
    /// Identifies Discord takes at once (one per bucket per 5 s).
    pub max_concurrency: u32,
}

/// A Discord platform's sharded gateway session in this process: it leases
/// shards from the fleet and runs one websocket per shard it holds; see the
/// module documentation.
pub struct Session {
    settings: SessionSettings,
    client: redis::Client,
    conn: Conn,
    /// `sg:{P}:discord:`, the base of the session's keys.
    base: String,
    /// `sg:{P}:inbound`: written in the same script as the event's seq.
    inbound_key: String,
    http: reqwest::Client,
    /// The shards this gateway holds now, each with whether it is connected
    /// (READY or RESUMED).
    held: Mutex<BTreeMap<u32, Arc<AtomicBool>>>,
    /// The shard count in force (0 until known).
    count: AtomicU32,
    /// Discord's `max_concurrency` (identify buckets); 1 until known.
    max_concurrency: AtomicU32,
    gateway_cache: Mutex<Option<BotGateway>>,
    /// The platform's circuit, the engine's: a 4004 opens it.
    circuit: crate::circuit::Circuit,
    /// What probes the token while the circuit is open (the platform's
    /// adapter: `GET /users/@me`); None: nothing probes (tests).
    prober: Option<crate::adapters::SharedAdapter>,
    /// Stops a probe this session started, when the session stops.
    probe_stop: CancellationToken,
    /// Defers interactions no worker answered in time.
    auto_defer: super::interactions::AutoDefer,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("settings", &self.settings)
            .field("base", &self.base)
            .field("connected", &self.connected())
            .field("shards", &self.shards())
            .finish()
    }
}

impl Session {
    /// A session of the platform of `keys`: its state lives under
    /// `keys.discord()`, its events go to `keys.inbound()`.
    pub fn new(
        mut settings: SessionSettings,
        client: redis::Client,
        conn: Conn,
        keys: &Keys,
        circuit: crate::circuit::Circuit,
        prober: Option<crate::adapters::SharedAdapter>,
    ) -> Result<Self, String> {
        settings.token = super::bare_token(settings.token.expose()).into();
        if settings.token.is_empty() {
            return Err("the Discord gateway needs the bot token".into());
        }
        if settings.owner.is_empty() {
            return Err("the Discord gateway needs an owner (the consumer name)".into());
        }
        if settings.lease < Duration::from_millis(100) {
            return Err("the Discord session lease must be at least 100 ms".into());
        }
        if let Some(u) = &settings.gateway_url {
            gateway_request_url(u)?;
        }
        Url::parse(&settings.api_base)
            .map_err(|e| format!("invalid Discord api_base `{}`: {e}", settings.api_base))?;
        let http = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .user_agent(super::USER_AGENT)
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        let auto_defer = super::interactions::AutoDefer {
            http: http.clone(),
            api_base: settings.api_base.clone(),
            conn: conn.clone(),
            base: keys.discord(),
            platform: settings.platform.clone(),
            after: settings.interaction_defer,
        };
        Ok(Session {
            settings,
            client,
            conn,
            base: keys.discord(),
            inbound_key: keys.inbound(),
            http,
            held: Mutex::new(BTreeMap::new()),
            count: AtomicU32::new(0),
            max_concurrency: AtomicU32::new(1),
            gateway_cache: Mutex::new(None),
            circuit,
            prober,
            probe_stop: CancellationToken::new(),
            auto_defer,
        })
    }

    /// True while this process holds a live, identified or resumed shard.
    pub fn connected(&self) -> bool {
        self.lock_held().values().any(|c| c.load(Ordering::SeqCst))
    }

    /// The shard count in force (0 until known) and the shards this gateway
    /// holds, each with whether it is connected.
    pub fn shards(&self) -> (u32, Vec<(u32, bool)>) {
        let held = self
            .lock_held()
            .iter()
            .map(|(id, c)| (*id, c.load(Ordering::SeqCst)))
            .collect();
        (self.count.load(Ordering::SeqCst), held)
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Arc<AtomicBool>>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// While the token is refused: wait for the platform's circuit to
    /// close (its one probe, the engine's, runs with backoff).
    async fn wait_for_token(&self) {
        self.circuit.closed().await;
    }

    /// Discord refused the token (close 4004, a 401): open the platform's
    /// circuit and start its probe, and mark the refusal in Redis so every
    /// other gateway stops before its next request.
    async fn refuse(&self, why: &str) {
        crate::metrics::discord_credential_refused(&self.settings.platform, true);
        match &self.prober {
            Some(adapter) => {
                self.circuit.trip(why, adapter, &self.probe_stop);
            }
            None => {
                self.circuit.open(why);
            }
        }
        let mut conn = self.conn.clone();
        let r: RedisResult<()> = conn
            .set_ex(crate::bus::discord::refused_key(&self.base), why, 86_400)
            .await;
        if let Err(e) = r {
            warn!(platform = %self.settings.platform, error = %e, "could not record the refused discord token");
        }
    }

    fn lease_ms(&self) -> u64 {
        self.settings.lease.as_millis() as u64
    }
}

impl Session {
    async fn read_presence(&self) -> RedisResult<Option<Value>> {
        let mut conn = self.conn.clone();
        let raw: Option<String> = conn.get(presence_key(&self.base)).await?;
        Ok(raw.and_then(|r| serde_json::from_str(&r).ok()))
    }

    /// The URL to identify at: the configured one, else `GET /gateway/bot`'s
    /// (which also refreshes `max_concurrency`).
    async fn identify_url(&self, lost: &CancellationToken) -> Result<String, End> {
        if let Some(u) = &self.settings.gateway_url {
            return Ok(u.clone());
        }
        let bot = self.gateway_bot(lost, true).await?;
        Ok(bot.url)
    }

    /// Ask `GET /gateway/bot` (URL, recommended shards, session start limit):
    /// on a failure the last answer, if any. With `start`, an exhausted
    /// session start limit is waited out (the caller is about to identify).
    async fn gateway_bot(&self, lost: &CancellationToken, start: bool) -> Result<BotGateway, End> {
        let url = format!(
            "{}/gateway/bot",
            self.settings.api_base.trim_end_matches('/')
        );
        let answer = self
            .http
            .get(url)
            .header(
                AUTHORIZATION,
                format!("Bot {}", self.settings.token.expose()),
            )
            .send()
            .await;
        let cached = self
            .gateway_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let failed = |why: String| {
            if let Some(b) = &cached {
                warn!(platform = %self.settings.platform, "GET /gateway/bot failed ({why}); using its last answer");
                Ok(b.clone())
            } else {
                warn!(platform = %self.settings.platform, "GET /gateway/bot failed: {why}");
                Err(End::Again {
                    wait: None,
                    healthy: false,
                })
            }
        };
        let resp = match answer {
            Ok(r) => r,
            Err(e) => return failed(e.without_url().to_string()),
        };
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(End::Refused("GET /gateway/bot answered 401".into()));
        }
        if !status.is_success() {
            return failed(format!("status {status}"));
        }
        let body: Value = match resp.json().await {
            Ok(v) => v,
            Err(e) => return failed(e.without_url().to_string()),
        };
        let Some(url) = body.get("url").and_then(Value::as_str) else {
            return failed("no `url` in the answer".into());
        };
        let limit = &body["session_start_limit"];
        let bot = BotGateway {
            url: url.to_owned(),
            shards: body
                .get("shards")
                .and_then(Value::as_u64)
                .map_or(1, |n| n.clamp(1, u64::from(shards::MAX_SHARDS)) as u32),
            max_concurrency: limit
                .get("max_concurrency")
                .and_then(Value::as_u64)
                .map_or(1, |n| n.clamp(1, 1024) as u32),
        };
        self.max_concurrency
            .store(bot.max_concurrency, Ordering::SeqCst);
        if start && limit.get("remaining").and_then(Value::as_u64) == Some(0) {
            let wait = Duration::from_millis(limit["reset_after"].as_u64().unwrap_or(5000));
            warn!(platform = %self.settings.platform, wait_ms = wait.as_millis() as u64, "no discord session starts left today; waiting for the reset");
            tokio::select! {
                _ = sleep(wait) => {}
                _ = lost.cancelled() => return Err(End::Cancelled),
            }
        }
        *self.gateway_cache.lock().unwrap_or_else(|e| e.into_inner()) = Some(bot.clone());
        Ok(bot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_debug_hides_the_token() {
        let s = SessionSettings::new("discord", "very.secret.token", "gw-1");
        let shown = format!("{s:?}");
        assert!(!shown.contains("very.secret.token"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    /// A `wss://` connect builds the rustls client config (webpki roots, the
    /// one crypto provider): it must fail cleanly against a non-TLS peer,
    /// never panic for want of (or ambiguity between) providers.
    #[tokio::test]
    async fn the_wss_connector_builds_without_panicking() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                use tokio::io::AsyncWriteExt;
                let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            }
        });
        let r = tokio::spawn(async move {
            tokio_tungstenite::connect_async(format!("wss://127.0.0.1:{port}/?v=10&encoding=json"))
                .await
        })
        .await;
        let r = r.expect("building the TLS config must not panic");
        // The error comes from the TLS handshake: the config was built.
        match r {
            Err(tokio_tungstenite::tungstenite::Error::Io(_))
            | Err(tokio_tungstenite::tungstenite::Error::Tls(_)) => {}
            other => panic!("expected a TLS handshake failure, got {other:?}"),
        }
        let _ = server.await;
    }
}
