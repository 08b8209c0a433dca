//! The Discord gateway session: one websocket (API v10, JSON encoding, no
//! compression) per Discord platform, held by exactly one gateway process at a
//! time, that turns what users do into inbound events and carries presence
//! updates (op 3).
//!
//! **One holder.** `{base}session:lease` is taken with `SET NX PX` semantics
//! (value = the gateway's consumer name) and renewed every lease/3 with a
//! compare-and-pexpire script; only the holder runs the websocket, and a
//! holder that fails to renew closes it at once. Others try again every
//! lease/3. On stop the holder closes with code 4000 (not 1000, which would
//! invalidate the session) and deletes the lease if still its own, so the next
//! holder RESUMEs.
//!
//! **Nothing lost across a handover.** `{base}session` (hash `session_id`,
//! `resume_url`, `seq`, `user_id`) is written on READY; `seq` moves in the same
//! Lua script (fenced by the lease) as the inbound XADD and the other writes of
//! the event it belongs to, so the stored seq never runs ahead of what was
//! recorded and a node that takes over RESUMEs from there: Discord replays
//! the rest. Events that record nothing move the stored seq lazily (at the
//! next heartbeat, and on stop). A replayed event at or below the seq already
//! processed is skipped.
//!
//! **Presence.** [`set_presence`] stores `{base}presence` (latest wins) and
//! publishes on the channel of the same name; the holder reads the key on a
//! notification (and once after READY/RESUMED) and sends op 3 with a custom
//! status, coalescing bursts and keeping within the gateway's 120 events per
//! 60 s. Identify carries the stored presence too.
//!
//! **Side tables** for the adapter: `{base}guilds` (channel id → guild id, from
//! GUILD_CREATE, CHANNEL_CREATE/UPDATE, THREAD_CREATE/UPDATE, MESSAGE_CREATE)
//! and `{base}nonce:<nonce>` (the id of a message this bot sent with that
//! nonce, for a day).
//!
//! **Lifecycle** (Discord's documented one): Hello → heartbeats (first after
//! interval × jitter, `d` = last seq; no ACK since the previous one = zombie:
//! close and resume) → Identify or Resume → READY / RESUMED. Op 7 → resume;
//! op 9 → resume (d = true) or identify afresh (d = false) after 1–5 s. Close
//! codes 4004 and 4010–4014 are fatal (logged with the fix, no reconnect);
//! others reconnect with exponential backoff (1 s doubling to 30 s, reset by
//! a successful session); three resumes in a row that do not come up give
//! way to a fresh Identify. At most one IDENTIFY per 5 s from one session.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use crate::bus::Conn;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use redis::{AsyncCommands, RedisResult, Script};
use reqwest::Url;
use reqwest::header::AUTHORIZATION;
use serde_json::{Map, Value, json};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::inbound::InboundEvent;
use crate::keys::Keys;

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
/// Gateway send limit: events per window per connection.
const SEND_LIMIT: usize = 120;
const SEND_WINDOW: Duration = Duration::from_secs(60);
/// Sends a presence update leaves free for heartbeats and the like.
const PRESENCE_RESERVE: usize = 10;
const IDENTIFY_GAP: Duration = Duration::from_secs(5);
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Resumes in a row that may fail to come up before identifying afresh.
const MAX_FAILED_RESUMES: u32 = 3;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const HELLO_TIMEOUT: Duration = Duration::from_secs(20);
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
const DISCORD_EPOCH_MS: u64 = 1_420_070_400_000;

/// What a session needs to know.
#[derive(Clone)]
pub struct SessionSettings {
    /// The platform name (`discord`), written into inbound events.
    pub platform: String,
    /// The bot token, without `Bot `. Never logged.
    pub token: String,
    /// The REST base (`https://discord.com/api/v10`).
    pub api_base: String,
    /// `ws://` or `wss://`; `None` asks `GET {api_base}/gateway/bot`.
    pub gateway_url: Option<String>,
    pub intents: u64,
    /// The session lease's time to live in Redis.
    pub lease: Duration,
    /// This gateway's consumer name: the lease holder id.
    pub owner: String,
}

impl SessionSettings {
    /// Defaults: Discord's API base, the gateway URL from `/gateway/bot`,
    /// [`DEFAULT_INTENTS`], [`DEFAULT_LEASE`].
    pub fn new(platform: &str, token: &str, owner: &str) -> Self {
        SessionSettings {
            platform: platform.to_owned(),
            token: token.to_owned(),
            api_base: super::DEFAULT_API_BASE.to_owned(),
            gateway_url: None,
            intents: DEFAULT_INTENTS,
            lease: DEFAULT_LEASE,
            owner: owner.to_owned(),
        }
    }
}

impl fmt::Debug for SessionSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionSettings")
            .field("platform", &self.platform)
            .field("token", &"<redacted>")
            .field("api_base", &self.api_base)
            .field("gateway_url", &self.gateway_url)
            .field("intents", &self.intents)
            .field("lease", &self.lease)
            .field("owner", &self.owner)
            .finish()
    }
}

/// `{base}guilds`: channel id → guild id.
pub fn guilds_key(base: &str) -> String {
    format!("{base}guilds")
}

/// `{base}nonce:<nonce>`: the id of the message this bot sent with `nonce`.
pub fn nonce_key(base: &str, nonce: &str) -> String {
    format!("{base}nonce:{nonce}")
}

fn lease_key(base: &str) -> String {
    format!("{base}session:lease")
}

fn session_key(base: &str) -> String {
    format!("{base}session")
}

/// Both the presence key and the channel its changes are announced on.
fn presence_key(base: &str) -> String {
    format!("{base}presence")
}

/// Record the desired presence (latest wins) for the whole platform and
/// notify the session holder, wherever it runs.
pub async fn set_presence(
    conn: &mut impl redis::aio::ConnectionLike,
    base: &str,
    text: Option<&str>,
    emoji: Option<&str>,
) -> RedisResult<()> {
    let key = presence_key(base);
    let value = json!({"text": text, "emoji": emoji, "updated_ms": crate::now_ms()}).to_string();
    redis::pipe()
        .set(&key, value)
        .ignore()
        .publish(&key, "1")
        .ignore()
        .query_async(conn)
        .await
}

/// The op 3 / Identify `presence` object for a stored presence.
fn presence_object(stored: &Value) -> Value {
    let part = |k: &str| {
        stored
            .get(k)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
    };
    let state = match (part("emoji"), part("text")) {
        (Some(e), Some(t)) => Some(format!("{e} {t}")),
        (Some(one), None) | (None, Some(one)) => Some(one.to_owned()),
        (None, None) => None,
    };
    let activities: Vec<Value> = state
        .map(|s| json!({"name": "Custom Status", "type": 4, "state": s}))
        .into_iter()
        .collect();
    json!({"since": null, "activities": activities, "status": "online", "afk": false})
}

// Scripts. Every key of one call shares the platform's hash tag.

static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
  return 1
elseif v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0",
    )
});

static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0",
    )
});

static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0",
    )
});

/// KEYS: lease, session. ARGV: owner, then field/value pairs (none: delete the session).
static WRITE_SESSION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
for i = 2, #ARGV - 1, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
return 1",
    )
});

/// KEYS: lease, session, inbound, guilds, nonce.
/// ARGV: owner, seq ('' = leave), payload ('' = none), maxlen,
/// nonce's message id ('' = none), nonce ttl, then channel/guild pairs.
static COMMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] ~= '' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'payload', ARGV[3])
end
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[5], ARGV[5], 'EX', ARGV[6])
end
for i = 7, #ARGV - 1, 2 do
  redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1])
end
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[2], 'seq', ARGV[2])
end
return 1",
    )
});

/// What a session knows to resume with.
#[derive(Debug, Clone, Default, PartialEq)]
struct Resume {
    session_id: Option<String>,
    resume_url: Option<String>,
    seq: Option<u64>,
    user_id: Option<String>,
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

/// What one event writes to Redis besides its seq.
#[derive(Debug, Default, PartialEq)]
struct Writes {
    event: Option<InboundEvent>,
    /// (nonce, message id) of a message this bot sent.
    nonce: Option<(String, String)>,
    /// (channel id, guild id)
    guilds: Vec<(String, String)>,
    /// (interaction id, token) to acknowledge after the event is recorded.
    ack: Option<(String, String)>,
}

impl Writes {
    fn is_empty(&self) -> bool {
        self.event.is_none() && self.nonce.is_none() && self.guilds.is_empty()
    }
}

enum Commit {
    Done,
    /// The lease is no longer ours: nothing was written.
    Fenced,
}

/// How one hold of the lease ended.
enum Held {
    Stopped,
    /// The lease was lost, or Redis failed: try again later.
    Retry,
    Fatal,
}

/// How one websocket connection ended.
enum End {
    /// Stop, or the lease was lost.
    Cancelled,
    Fatal(String),
    /// Connect again (resume if the session is known) after `wait`, or after
    /// the backoff when `None`. `healthy`: the connection had READY/RESUMED.
    Again {
        wait: Option<Duration>,
        healthy: bool,
    },
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The gateway's send limit, counted locally per connection.
#[derive(Debug, Default)]
struct Budget {
    sent: VecDeque<Instant>,
}

impl Budget {
    fn record(&mut self, at: Instant) {
        self.sent.push_back(at);
    }

    /// When a send that leaves `reserve` of the budget free may go.
    fn next_slot(&mut self, now: Instant, reserve: usize) -> Instant {
        while self.sent.front().is_some_and(|t| *t + SEND_WINDOW <= now) {
            self.sent.pop_front();
        }
        let allowed = SEND_LIMIT.saturating_sub(reserve).max(1);
        if self.sent.len() < allowed {
            now
        } else {
            self.sent[self.sent.len() - allowed] + SEND_WINDOW
        }
    }
}

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
            code: CloseCode::from(CLOSE_RESUMABLE),
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

/// A Discord gateway session; see the module documentation.
pub struct Session {
    settings: SessionSettings,
    client: redis::Client,
    conn: Conn,
    /// `sg:{P}:discord:`, the base of the session's keys.
    base: String,
    /// `sg:{P}:inbound`: written in the same script as the event's seq.
    inbound_key: String,
    http: reqwest::Client,
    connected: AtomicBool,
    last_identify: Mutex<Option<Instant>>,
    gateway_cache: Mutex<Option<String>>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("settings", &self.settings)
            .field("base", &self.base)
            .field("connected", &self.connected())
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
    ) -> Result<Self, String> {
        settings.token = super::bare_token(&settings.token).to_owned();
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
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        Ok(Session {
            settings,
            client,
            conn,
            base: keys.discord(),
            inbound_key: keys.inbound(),
            http,
            connected: AtomicBool::new(false),
            last_identify: Mutex::new(None),
            gateway_cache: Mutex::new(None),
        })
    }

    /// True while this process holds a live, identified or resumed session.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Hold the session whenever this process has the lease, until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let tick = self.settings.lease / 3;
        loop {
            if stop.is_cancelled() {
                return;
            }
            match self.acquire().await {
                Ok(true) => {
                    debug!(platform = %self.settings.platform, owner = %self.settings.owner, "holding the discord session lease");
                    let held = self.hold(&stop).await;
                    self.connected.store(false, Ordering::SeqCst);
                    if let Err(e) = self.release().await {
                        warn!(platform = %self.settings.platform, error = %e, "could not release the discord session lease");
                    }
                    match held {
                        Held::Stopped => return,
                        Held::Fatal => {
                            stop.cancelled().await;
                            return;
                        }
                        Held::Retry => {}
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    warn!(platform = %self.settings.platform, error = %e, "could not take the discord session lease; retrying");
                }
            }
            tokio::select! {
                _ = sleep(tick) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    fn lease_ms(&self) -> u64 {
        self.settings.lease.as_millis() as u64
    }

    async fn acquire(&self) -> RedisResult<bool> {
        self.lease_script(&ACQUIRE).await
    }

    async fn renew(&self) -> RedisResult<bool> {
        self.lease_script(&RENEW).await
    }

    /// Run a lease script (take or renew) for this owner: whether it is ours now.
    async fn lease_script(&self, script: &Script) -> RedisResult<bool> {
        let mut conn = self.conn.clone();
        let n: i64 = script
            .key(lease_key(&self.base))
            .arg(&self.settings.owner)
            .arg(self.lease_ms())
            .invoke_async(&mut conn)
            .await?;
        Ok(n == 1)
    }

    async fn release(&self) -> RedisResult<()> {
        let mut conn = self.conn.clone();
        let _: i64 = RELEASE
            .key(lease_key(&self.base))
            .arg(&self.settings.owner)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Run the session while the lease is ours.
    async fn hold(self: &Arc<Self>, stop: &CancellationToken) -> Held {
        let lost = stop.child_token();
        let renewer = tokio::spawn({
            let me = self.clone();
            let lost = lost.clone();
            async move { me.keep_lease(lost).await }
        });
        let notify = Arc::new(Notify::new());
        let watcher = tokio::spawn(watch_presence(
            self.client.clone(),
            presence_key(&self.base),
            notify.clone(),
            lost.clone(),
        ));
        let held = self.drive(stop, &lost, &notify).await;
        lost.cancel();
        let _ = renewer.await;
        let _ = watcher.await;
        held
    }

    async fn keep_lease(&self, lost: CancellationToken) {
        let tick = self.settings.lease / 3;
        loop {
            tokio::select! {
                _ = sleep(tick) => {}
                _ = lost.cancelled() => return,
            }
            match self.renew().await {
                Ok(true) => {}
                Ok(false) => {
                    warn!(platform = %self.settings.platform, "the discord session lease is held by another gateway; closing the websocket");
                    lost.cancel();
                    return;
                }
                Err(e) => {
                    warn!(platform = %self.settings.platform, error = %e, "could not renew the discord session lease; closing the websocket");
                    lost.cancel();
                    return;
                }
            }
        }
    }

    /// Connect, and reconnect with backoff, until the lease is lost, stop or a fatal close.
    async fn drive(
        &self,
        stop: &CancellationToken,
        lost: &CancellationToken,
        notify: &Notify,
    ) -> Held {
        let (mut st, mut stored) = match self.load_session().await {
            Ok(s) => {
                let stored = s.seq;
                (s, stored)
            }
            Err(e) => {
                warn!(platform = %self.settings.platform, error = %e, "could not read the stored discord session");
                return Held::Retry;
            }
        };
        let mut backoff = BACKOFF_BASE;
        // Resumes in a row that did not come up: past a few, the resume host
        // is taken to be gone and the session is started afresh.
        let mut failed_resumes = 0u32;
        loop {
            let resuming = st.can_resume();
            let end = self
                .connection(&mut st, &mut stored, stop, lost, notify)
                .await;
            self.connected.store(false, Ordering::SeqCst);
            let delay = match end {
                End::Cancelled => {
                    return if stop.is_cancelled() {
                        Held::Stopped
                    } else {
                        Held::Retry
                    };
                }
                End::Fatal(why) => {
                    error!(platform = %self.settings.platform, "discord gateway: {why}; not reconnecting until restarted");
                    return Held::Fatal;
                }
                End::Again { wait, healthy } => {
                    if resuming && !healthy {
                        failed_resumes += 1;
                        if failed_resumes >= MAX_FAILED_RESUMES && st.can_resume() {
                            warn!(platform = %self.settings.platform, attempts = failed_resumes, "resuming the discord session keeps failing; identifying afresh");
                            st.forget();
                            stored = None;
                            if let Err(e) = self.write_session(None).await {
                                warn!(platform = %self.settings.platform, error = %e, "could not clear the stored discord session");
                            }
                            failed_resumes = 0;
                        }
                    } else {
                        failed_resumes = 0;
                    }
                    if healthy {
                        backoff = BACKOFF_BASE;
                        wait.unwrap_or(Duration::ZERO)
                    } else {
                        let d =
                            wait.unwrap_or_else(|| backoff.mul_f64(0.5 + rand::random::<f64>()));
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        d
                    }
                }
            };
            crate::metrics::discord_session_event(&self.settings.platform, "reconnect");
            info!(
                platform = %self.settings.platform,
                resume = st.can_resume(),
                delay_ms = delay.as_millis() as u64,
                "discord gateway reconnecting"
            );
            tokio::select! {
                _ = sleep(delay) => {}
                _ = lost.cancelled() => {
                    return if stop.is_cancelled() { Held::Stopped } else { Held::Retry };
                }
            }
        }
    }

    async fn load_session(&self) -> RedisResult<Resume> {
        let mut conn = self.conn.clone();
        let h: HashMap<String, String> = conn.hgetall(session_key(&self.base)).await?;
        let mut st = Resume {
            session_id: h.get("session_id").cloned().filter(|s| !s.is_empty()),
            resume_url: h.get("resume_url").cloned().filter(|s| !s.is_empty()),
            seq: h.get("seq").and_then(|s| s.parse().ok()),
            user_id: h.get("user_id").cloned().filter(|s| !s.is_empty()),
        };
        if !st.can_resume() {
            st.forget();
        }
        Ok(st)
    }

    /// Write (or with `st` = None, delete) the stored session, if the lease is ours.
    async fn write_session(&self, st: Option<&Resume>) -> RedisResult<Commit> {
        let mut conn = self.conn.clone();
        let mut inv = WRITE_SESSION.prepare_invoke();
        inv.key(lease_key(&self.base))
            .key(session_key(&self.base))
            .arg(&self.settings.owner);
        if let Some(st) = st {
            let fields = [
                ("session_id", st.session_id.clone()),
                ("resume_url", st.resume_url.clone()),
                ("seq", st.seq.map(|s| s.to_string())),
                ("user_id", st.user_id.clone()),
            ];
            for (k, v) in fields {
                if let Some(v) = v {
                    inv.arg(k).arg(v);
                }
            }
        }
        let n: i64 = inv.invoke_async(&mut conn).await?;
        Ok(if n == 1 { Commit::Done } else { Commit::Fenced })
    }

    /// Record one event's writes and move the stored seq, atomically and only
    /// while the lease is ours.
    async fn commit(&self, seq: Option<u64>, w: &Writes) -> RedisResult<Commit> {
        let mut conn = self.conn.clone();
        let payload = w
            .event
            .as_ref()
            .map(|ev| serde_json::to_string(ev).expect("events serialise"))
            .unwrap_or_default();
        let (nonce, message_id) = match &w.nonce {
            Some((n, m)) => (nonce_key(&self.base, n), m.clone()),
            None => (nonce_key(&self.base, ""), String::new()),
        };
        let mut inv = COMMIT.prepare_invoke();
        inv.key(lease_key(&self.base))
            .key(session_key(&self.base))
            .key(&self.inbound_key)
            .key(guilds_key(&self.base))
            .key(nonce)
            .arg(&self.settings.owner)
            .arg(seq.map(|s| s.to_string()).unwrap_or_default())
            .arg(payload)
            .arg(crate::inbound::INBOUND_MAXLEN)
            .arg(message_id)
            .arg(NONCE_TTL_S);
        for (channel, guild) in &w.guilds {
            inv.arg(channel).arg(guild);
        }
        let n: i64 = inv.invoke_async(&mut conn).await?;
        Ok(if n == 1 { Commit::Done } else { Commit::Fenced })
    }

    async fn read_presence(&self) -> RedisResult<Option<Value>> {
        let mut conn = self.conn.clone();
        let raw: Option<String> = conn.get(presence_key(&self.base)).await?;
        Ok(raw.and_then(|r| serde_json::from_str(&r).ok()))
    }

    fn identify_wait(&self) -> Duration {
        let last = *self.last_identify.lock().unwrap_or_else(|e| e.into_inner());
        last.map(|t| (t + IDENTIFY_GAP).saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::ZERO)
    }

    fn mark_identify(&self) {
        *self.last_identify.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// The URL to identify at: the configured one, else `GET /gateway/bot`.
    async fn identify_url(&self, lost: &CancellationToken) -> Result<String, End> {
        if let Some(u) = &self.settings.gateway_url {
            return Ok(u.clone());
        }
        let url = format!(
            "{}/gateway/bot",
            self.settings.api_base.trim_end_matches('/')
        );
        let answer = self
            .http
            .get(url)
            .header(AUTHORIZATION, format!("Bot {}", self.settings.token))
            .send()
            .await;
        let cached = self
            .gateway_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let failed = |why: String| {
            if let Some(u) = &cached {
                warn!(platform = %self.settings.platform, "GET /gateway/bot failed ({why}); using the last gateway URL");
                Ok(u.clone())
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
            return Err(End::Fatal(
                "GET /gateway/bot answered 401: the bot token is invalid; set the right token and restart".into(),
            ));
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
        if limit.get("remaining").and_then(Value::as_u64) == Some(0) {
            let wait = Duration::from_millis(limit["reset_after"].as_u64().unwrap_or(5000));
            warn!(platform = %self.settings.platform, wait_ms = wait.as_millis() as u64, "no discord session starts left today; waiting for the reset");
            tokio::select! {
                _ = sleep(wait) => {}
                _ = lost.cancelled() => return Err(End::Cancelled),
            }
        }
        *self.gateway_cache.lock().unwrap_or_else(|e| e.into_inner()) = Some(url.to_owned());
        Ok(url.to_owned())
    }

    /// One websocket connection, from connect to close.
    async fn connection(
        &self,
        st: &mut Resume,
        stored: &mut Option<u64>,
        stop: &CancellationToken,
        lost: &CancellationToken,
        notify: &Notify,
    ) -> End {
        let platform = self.settings.platform.as_str();
        let resume = st.can_resume();
        let url = if resume {
            st.resume_url.clone().unwrap_or_default()
        } else {
            let wait = self.identify_wait();
            if !wait.is_zero() {
                tokio::select! {
                    _ = sleep(wait) => {}
                    _ = lost.cancelled() => return End::Cancelled,
                }
            }
            match self.identify_url(lost).await {
                Ok(u) => u,
                Err(end) => return end,
            }
        };
        let url = match gateway_request_url(&url) {
            Ok(u) => u,
            Err(e) => {
                warn!(%platform, "{e}");
                if resume {
                    st.forget();
                }
                return End::Again {
                    wait: None,
                    healthy: false,
                };
            }
        };
        let connecting = timeout(
            CONNECT_TIMEOUT,
            tokio_tungstenite::connect_async_with_config(url.as_str(), None, true),
        );
        let ws = tokio::select! {
            r = connecting => match r {
                Ok(Ok((ws, _))) => ws,
                Ok(Err(e)) => {
                    warn!(%platform, error = %e, "could not connect to the discord gateway");
                    return End::Again { wait: None, healthy: false };
                }
                Err(_) => {
                    warn!(%platform, "connecting to the discord gateway timed out");
                    return End::Again { wait: None, healthy: false };
                }
            },
            _ = lost.cancelled() => return End::Cancelled,
        };
        let (sink, mut source) = ws.split();
        let mut link = Link {
            sink,
            budget: Budget::default(),
        };
        let interval = tokio::select! {
            h = hello(&mut source) => match h {
                Ok(i) => i,
                Err(end) => {
                    link.close().await;
                    return end;
                }
            },
            _ = lost.cancelled() => {
                link.close().await;
                return End::Cancelled;
            }
        };
        let first = if resume {
            json!({"op": 6, "d": {
                "token": self.settings.token,
                "session_id": st.session_id,
                "seq": st.seq,
            }})
        } else {
            st.forget();
            let mut d = json!({
                "token": self.settings.token,
                "intents": self.settings.intents,
                "properties": {
                    "os": std::env::consts::OS,
                    "browser": "stargazer",
                    "device": "stargazer",
                },
            });
            match self.read_presence().await {
                Ok(Some(p)) => d["presence"] = presence_object(&p),
                Ok(None) => {}
                Err(e) => {
                    warn!(%platform, error = %e, "could not read the stored presence; identifying without it")
                }
            }
            self.mark_identify();
            json!({"op": 2, "d": d})
        };
        if let Err(e) = link.send(&first).await {
            warn!(%platform, error = %e, "could not send identify/resume");
            return End::Again {
                wait: None,
                healthy: false,
            };
        }
        debug!(%platform, resume, "sent {}", if resume { "resume" } else { "identify" });
        let jitter = interval.mul_f64(rand::random::<f64>());
        let mut live = Live {
            link,
            interval,
            next_heartbeat: Instant::now() + jitter,
            acked: true,
            ready: false,
            presence_due: None,
        };
        let end = self
            .pump(&mut live, &mut source, st, stored, stop, lost, notify)
            .await;
        if matches!(end, End::Cancelled) && stop.is_cancelled() {
            // Stopping with the lease still ours: leave the exact seq behind.
            self.flush_seq(st, stored).await;
        }
        live.link.close().await;
        end
    }

    /// Read, heartbeat and send presence until the connection ends.
    #[allow(clippy::too_many_arguments)]
    async fn pump(
        &self,
        live: &mut Live,
        source: &mut SplitStream<Ws>,
        st: &mut Resume,
        stored: &mut Option<u64>,
        stop: &CancellationToken,
        lost: &CancellationToken,
        notify: &Notify,
    ) -> End {
        let platform = self.settings.platform.as_str();
        loop {
            let heartbeat_at = live.next_heartbeat;
            let presence_at = live.presence_due;
            tokio::select! {
                biased;
                _ = lost.cancelled() => return End::Cancelled,
                frame = source.next() => {
                    let text = match frame {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Close(frame))) => {
                            let code = frame.as_ref().map(|f| u16::from(f.code));
                            let reason = frame.as_ref().map(|f| f.reason.to_string()).unwrap_or_default();
                            return self.on_close(code, &reason, st, live.ready);
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => {
                            warn!(%platform, error = %e, "discord gateway connection failed");
                            return End::Again { wait: None, healthy: live.ready };
                        }
                        None => {
                            warn!(%platform, "discord gateway connection ended");
                            return End::Again { wait: None, healthy: live.ready };
                        }
                    };
                    let payload: Value = match serde_json::from_str(text.as_str()) {
                        Ok(v) => v,
                        Err(e) => {
                            warn!(%platform, error = %e, "discord gateway sent a frame that is not JSON; ignored");
                            continue;
                        }
                    };
                    if let Some(end) = self.on_payload(&payload, live, st, stored, stop, lost).await {
                        return end;
                    }
                }
                _ = sleep_until(heartbeat_at) => {
                    if !live.acked {
                        warn!(%platform, "no heartbeat ACK since the last heartbeat: zombied connection; reconnecting to resume");
                        crate::metrics::discord_session_event(platform, "zombie");
                        return End::Again { wait: Some(Duration::ZERO), healthy: live.ready };
                    }
                    if let Err(e) = live.link.send(&json!({"op": 1, "d": st.seq})).await {
                        warn!(%platform, error = %e, "could not send a heartbeat");
                        return End::Again { wait: None, healthy: live.ready };
                    }
                    live.acked = false;
                    live.next_heartbeat = Instant::now() + live.interval;
                    if live.ready && let Some(end) = self.flush_seq(st, stored).await {
                        if matches!(end, End::Cancelled) {
                            lost.cancel();
                        }
                        return end;
                    }
                }
                _ = notify.notified(), if live.ready => {
                    let at = live.link.budget.next_slot(Instant::now(), PRESENCE_RESERVE);
                    live.presence_due = Some(live.presence_due.map_or(at, |d| d.min(at)));
                }
                _ = sleep_until(presence_at.unwrap_or(heartbeat_at)), if live.ready && presence_at.is_some() => {
                    let at = live.link.budget.next_slot(Instant::now(), PRESENCE_RESERVE);
                    if at > Instant::now() {
                        debug!(%platform, "presence update delayed by the gateway send limit");
                        live.presence_due = Some(at);
                        continue;
                    }
                    match self.read_presence().await {
                        Ok(p) => {
                            live.presence_due = None;
                            if let Some(p) = p {
                                let update = json!({"op": 3, "d": presence_object(&p)});
                                if let Err(e) = live.link.send(&update).await {
                                    warn!(%platform, error = %e, "could not send a presence update");
                                    live.presence_due = Some(Instant::now());
                                    return End::Again { wait: None, healthy: live.ready };
                                }
                                debug!(%platform, "presence updated");
                            }
                        }
                        Err(e) => {
                            warn!(%platform, error = %e, "could not read the stored presence; retrying");
                            live.presence_due = Some(Instant::now() + Duration::from_secs(1));
                        }
                    }
                }
            }
        }
    }

    /// Store the seq of events that recorded nothing (fenced); `Some` ends the connection.
    async fn flush_seq(&self, st: &Resume, stored: &mut Option<u64>) -> Option<End> {
        if st.session_id.is_none() || st.seq.is_none() || st.seq == *stored {
            return None;
        }
        match self.commit(st.seq, &Writes::default()).await {
            Ok(Commit::Done) => {
                *stored = st.seq;
                None
            }
            Ok(Commit::Fenced) => Some(End::Cancelled),
            Err(e) => {
                warn!(platform = %self.settings.platform, error = %e, "could not store the discord session seq");
                None
            }
        }
    }

    fn on_close(&self, code: Option<u16>, reason: &str, st: &mut Resume, ready: bool) -> End {
        let platform = self.settings.platform.as_str();
        if let Some(code) = code {
            if let Some(why) = fatal_close(code) {
                return End::Fatal(format!("closed with {code} ({why})"));
            }
            if code == 4007 || code == 4009 {
                info!(%platform, code, "discord gateway session expired; identifying afresh");
                st.forget();
                return End::Again {
                    wait: None,
                    healthy: ready,
                };
            }
        }
        warn!(%platform, code = ?code, %reason, "discord gateway closed the connection");
        End::Again {
            wait: None,
            healthy: ready,
        }
    }

    /// Handle one gateway payload; `Some` ends the connection.
    async fn on_payload(
        &self,
        payload: &Value,
        live: &mut Live,
        st: &mut Resume,
        stored: &mut Option<u64>,
        stop: &CancellationToken,
        lost: &CancellationToken,
    ) -> Option<End> {
        let platform = self.settings.platform.as_str();
        let again = |healthy: bool| End::Again {
            wait: None,
            healthy,
        };
        match payload.get("op").and_then(Value::as_u64) {
            Some(0) => {
                let t = payload.get("t").and_then(Value::as_str).unwrap_or("");
                let s = payload.get("s").and_then(Value::as_u64);
                let d = payload.get("d").unwrap_or(&Value::Null);
                match self.on_dispatch(t, s, d, live, st, stored).await {
                    Ok(Commit::Done) => None,
                    Ok(Commit::Fenced) => {
                        if !stop.is_cancelled() {
                            warn!(%platform, "the discord session lease is no longer ours; closing the websocket");
                        }
                        lost.cancel();
                        Some(End::Cancelled)
                    }
                    Err(e) => {
                        warn!(%platform, error = %e, event = t, "could not record a discord event in Redis; reconnecting to have it replayed");
                        Some(again(false))
                    }
                }
            }
            Some(1) => match live.link.send(&json!({"op": 1, "d": st.seq})).await {
                Ok(()) => None,
                Err(e) => {
                    warn!(%platform, error = %e, "could not answer a heartbeat request");
                    Some(again(live.ready))
                }
            },
            Some(7) => {
                info!(%platform, "discord asked to reconnect; resuming");
                Some(End::Again {
                    wait: Some(Duration::ZERO),
                    healthy: live.ready,
                })
            }
            Some(9) => {
                let resumable = payload.get("d").and_then(Value::as_bool).unwrap_or(false);
                crate::metrics::discord_session_event(platform, "invalid_session");
                let wait = Duration::from_millis(rand::random_range(1000..=5000));
                if resumable && st.can_resume() {
                    info!(%platform, "discord invalidated the session (resumable); resuming");
                } else {
                    info!(%platform, "discord invalidated the session; identifying afresh");
                    st.forget();
                    *stored = None;
                    match self.write_session(None).await {
                        Ok(Commit::Done) => {}
                        Ok(Commit::Fenced) => {
                            lost.cancel();
                            return Some(End::Cancelled);
                        }
                        Err(e) => {
                            warn!(%platform, error = %e, "could not clear the stored discord session")
                        }
                    }
                }
                Some(End::Again {
                    wait: Some(wait),
                    healthy: false,
                })
            }
            Some(11) => {
                live.acked = true;
                None
            }
            Some(10) => None,
            other => {
                debug!(%platform, op = ?other, "unhandled gateway opcode");
                None
            }
        }
    }

    async fn on_dispatch(
        &self,
        t: &str,
        s: Option<u64>,
        d: &Value,
        live: &mut Live,
        st: &mut Resume,
        stored: &mut Option<u64>,
    ) -> RedisResult<Commit> {
        let platform = self.settings.platform.as_str();
        match t {
            "READY" => {
                st.session_id = d
                    .get("session_id")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                st.resume_url = d
                    .get("resume_gateway_url")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                st.user_id = d
                    .pointer("/user/id")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                st.seq = s;
                let done = self.write_session(Some(st)).await?;
                if matches!(done, Commit::Done) {
                    let guilds = d
                        .get("guilds")
                        .and_then(Value::as_array)
                        .map_or(0, |g| g.len());
                    *stored = s;
                    self.became_ready(live);
                    crate::metrics::discord_session_event(platform, "ready");
                    info!(
                        %platform,
                        user_id = st.user_id.as_deref().unwrap_or(""),
                        guilds,
                        "discord gateway ready"
                    );
                }
                return Ok(done);
            }
            "RESUMED" => {
                if let Some(s) = s {
                    st.seq = Some(st.seq.map_or(s, |c| c.max(s)));
                }
                self.became_ready(live);
                crate::metrics::discord_session_event(platform, "resumed");
                info!(%platform, seq = ?st.seq, "discord gateway session resumed");
                return Ok(Commit::Done);
            }
            _ => {}
        }
        if let (Some(s), Some(cur)) = (s, st.seq)
            && s <= cur
        {
            debug!(%platform, seq = s, "replayed event already processed; skipped");
            return Ok(Commit::Done);
        }
        let bot = st.user_id.as_deref().unwrap_or("");
        let w = writes_for(platform, bot, t, d);
        if !w.is_empty() {
            let seq = if st.session_id.is_some() {
                s.or(st.seq)
            } else {
                None
            };
            if let Commit::Fenced = self.commit(seq, &w).await? {
                return Ok(Commit::Fenced);
            }
            if w.event.is_some() {
                crate::metrics::discord_session_event(platform, "published");
            }
            if seq.is_some() {
                *stored = seq;
            }
        }
        if s.is_some() {
            st.seq = s;
        }
        if let Some((id, token)) = w.ack {
            self.acknowledge(id, token);
        }
        Ok(Commit::Done)
    }

    fn became_ready(&self, live: &mut Live) {
        live.ready = true;
        live.presence_due = Some(Instant::now());
        self.connected.store(true, Ordering::SeqCst);
    }

    /// Acknowledge a component interaction (deferred update), in the background.
    fn acknowledge(&self, id: String, token: String) {
        let url = format!(
            "{}/interactions/{id}/{token}/callback",
            self.settings.api_base.trim_end_matches('/')
        );
        let http = self.http.clone();
        let platform = self.settings.platform.clone();
        tokio::spawn(async move {
            match http.post(url).json(&json!({"type": 6})).send().await {
                Ok(r) if r.status().is_success() => {
                    debug!(%platform, interaction_id = %id, "interaction acknowledged")
                }
                Ok(r) => {
                    warn!(%platform, interaction_id = %id, status = %r.status(), "acknowledging an interaction failed")
                }
                Err(e) => {
                    warn!(%platform, interaction_id = %id, error = %e.without_url(), "acknowledging an interaction failed")
                }
            }
        });
    }
}

/// Wait for op 10 Hello; its heartbeat interval.
async fn hello(source: &mut SplitStream<Ws>) -> Result<Duration, End> {
    let unhealthy = End::Again {
        wait: None,
        healthy: false,
    };
    let deadline = Instant::now() + HELLO_TIMEOUT;
    loop {
        let frame = match timeout(
            deadline.saturating_duration_since(Instant::now()),
            source.next(),
        )
        .await
        {
            Ok(f) => f,
            Err(_) => {
                warn!("the discord gateway sent no Hello");
                return Err(unhealthy);
            }
        };
        match frame {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                if v.get("op").and_then(Value::as_u64) == Some(10) {
                    let ms = v
                        .pointer("/d/heartbeat_interval")
                        .and_then(Value::as_u64)
                        .unwrap_or(41_250)
                        .max(1);
                    return Ok(Duration::from_millis(ms));
                }
            }
            Some(Ok(Message::Close(frame))) => {
                let code = frame.as_ref().map(|f| u16::from(f.code));
                if let Some(why) = code.and_then(fatal_close) {
                    return Err(End::Fatal(format!(
                        "closed with {} ({why})",
                        code.unwrap_or(0)
                    )));
                }
                warn!(code = ?code, "the discord gateway closed before Hello");
                return Err(unhealthy);
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                warn!(error = %e, "the discord gateway failed before Hello");
                return Err(unhealthy);
            }
            None => return Err(unhealthy),
        }
    }
}

/// Close codes after which reconnecting cannot help: the cause and the fix.
fn fatal_close(code: u16) -> Option<&'static str> {
    Some(match code {
        4004 => "authentication failed: the bot token is invalid; set the right token and restart",
        4010 => "invalid shard sent in Identify; check the shard settings",
        4011 => "sharding required: the bot is in too many guilds for one unsharded session",
        4012 => "invalid API version; this build speaks gateway v10",
        4013 => "invalid intents: the intents value is not a valid bitfield; fix `intents`",
        4014 => {
            "disallowed intents: enable the privileged intents the bot asks for (Message Content) in the developer portal, Bot → Privileged Gateway Intents, or remove them from `intents`"
        }
        _ => return None,
    })
}

/// `<url>?v=10&encoding=json` (other query parameters kept).
fn gateway_request_url(url: &str) -> Result<String, String> {
    let mut u = Url::parse(url).map_err(|e| format!("invalid discord gateway URL `{url}`: {e}"))?;
    if !matches!(u.scheme(), "ws" | "wss") {
        return Err(format!(
            "the discord gateway URL `{url}` must be ws:// or wss://"
        ));
    }
    let kept: Vec<(String, String)> = u
        .query_pairs()
        .filter(|(k, _)| !matches!(k.as_ref(), "v" | "encoding" | "compress"))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    u.query_pairs_mut()
        .clear()
        .extend_pairs(kept)
        .append_pair("v", "10")
        .append_pair("encoding", "json");
    Ok(u.to_string())
}

/// Forward presence notifications to the holder until `lost`.
async fn watch_presence(
    client: redis::Client,
    channel: String,
    notify: Arc<Notify>,
    lost: CancellationToken,
) {
    loop {
        let subscribed = async {
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(&channel).await?;
            RedisResult::Ok(ps)
        };
        let subscribed = tokio::select! {
            r = subscribed => r,
            _ = lost.cancelled() => return,
        };
        match subscribed {
            Ok(ps) => {
                // Whatever was set before the subscription took effect.
                notify.notify_one();
                let mut messages = ps.into_on_message();
                loop {
                    tokio::select! {
                        m = messages.next() => match m {
                            Some(_) => notify.notify_one(),
                            None => break,
                        },
                        _ = lost.cancelled() => return,
                    }
                }
                warn!("the presence subscription ended; subscribing again");
            }
            Err(e) => warn!(error = %e, "could not subscribe to presence updates; retrying"),
        }
        tokio::select! {
            _ = sleep(Duration::from_secs(1)) => {}
            _ = lost.cancelled() => return,
        }
    }
}

fn str_at<'a>(d: &'a Value, pointer: &str) -> Option<&'a str> {
    d.pointer(pointer).and_then(Value::as_str)
}

/// The creation time of a snowflake, in Unix ms.
fn snowflake_ms(id: &str) -> Option<u64> {
    id.parse::<u64>().ok().map(|n| (n >> 22) + DISCORD_EPOCH_MS)
}

/// An ISO 8601 / RFC 3339 timestamp as Discord writes it
/// (`2017-07-11T17:27:07.299000+00:00`), in Unix ms.
fn parse_timestamp(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut i = 19;
    let mut ms = 0;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        let digits: String = s[start..i].chars().chain("000".chars()).take(3).collect();
        ms = digits.parse::<i64>().ok()?;
    }
    let offset_min = match s.get(i..)? {
        "Z" | "z" => 0,
        o if o.len() == 6 && o.as_bytes()[3] == b':' => {
            let sign = match o.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            sign * (num(i + 1..i + 3)? * 60 + num(i + 4..i + 6)?)
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * ((mo + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + se - offset_min * 60;
    u64::try_from(secs * 1000 + ms).ok()
}

/// What a dispatch writes to Redis (the inbound event, the bot's nonce, the
/// channel → guild map) and the interaction to acknowledge.
fn writes_for(platform: &str, bot_user_id: &str, t: &str, d: &Value) -> Writes {
    let mut w = Writes {
        event: to_inbound(platform, bot_user_id, t, d),
        ..Writes::default()
    };
    let guild = str_at(d, "/guild_id");
    match t {
        "GUILD_CREATE" => {
            if let Some(g) = str_at(d, "/id") {
                for list in ["channels", "threads"] {
                    for c in d.get(list).and_then(Value::as_array).into_iter().flatten() {
                        if let Some(c) = str_at(c, "/id") {
                            w.guilds.push((c.to_owned(), g.to_owned()));
                        }
                    }
                }
            }
        }
        "CHANNEL_CREATE" | "CHANNEL_UPDATE" | "THREAD_CREATE" | "THREAD_UPDATE" => {
            if let (Some(c), Some(g)) = (str_at(d, "/id"), guild) {
                w.guilds.push((c.to_owned(), g.to_owned()));
            }
        }
        "MESSAGE_CREATE" => {
            if let (Some(c), Some(g)) = (str_at(d, "/channel_id"), guild) {
                w.guilds.push((c.to_owned(), g.to_owned()));
            }
            if !bot_user_id.is_empty()
                && str_at(d, "/author/id") == Some(bot_user_id)
                && let (Some(nonce), Some(id)) = (str_at(d, "/nonce"), str_at(d, "/id"))
                && !nonce.is_empty()
            {
                w.nonce = Some((nonce.to_owned(), id.to_owned()));
            }
        }
        "INTERACTION_CREATE" if w.event.is_some() => {
            if let (Some(id), Some(token)) = (str_at(d, "/id"), str_at(d, "/token")) {
                w.ack = Some((id.to_owned(), token.to_owned()));
            }
        }
        _ => {}
    }
    w
}

fn user_name(user: &Value) -> String {
    str_at(user, "/global_name")
        .filter(|s| !s.is_empty())
        .or_else(|| str_at(user, "/username"))
        .unwrap_or("")
        .to_owned()
}

/// The inbound event a dispatch (`t`, `d`) becomes, if any: MESSAGE_CREATE
/// → `message`, MESSAGE_REACTION_ADD → `reaction`, INTERACTION_CREATE of a
/// message component → `button`; the bot's own messages and reactions → none.
pub fn to_inbound(platform: &str, bot_user_id: &str, t: &str, d: &Value) -> Option<InboundEvent> {
    let is_bot_user = |id: Option<&str>| !bot_user_id.is_empty() && id == Some(bot_user_id);
    let mut extra = Map::new();
    if let Some(g) = str_at(d, "/guild_id") {
        extra.insert("guild_id".into(), g.into());
    }
    let base =
        |kind: &str, channel: &str, user_id: &str, user_name: String, ts_ms: u64| InboundEvent {
            kind: kind.into(),
            platform: platform.into(),
            channel_id: channel.into(),
            user_id: user_id.into(),
            user_name,
            text: None,
            message_id: None,
            reply_to: None,
            emoji: None,
            custom_id: None,
            ts_ms,
            extra: Map::new(),
        };
    match t {
        "MESSAGE_CREATE" => {
            let author = d.get("author")?;
            let author_id = str_at(author, "/id")?;
            if is_bot_user(Some(author_id)) {
                return None;
            }
            let id = str_at(d, "/id");
            let ts = str_at(d, "/timestamp")
                .and_then(parse_timestamp)
                .or_else(|| id.and_then(snowflake_ms))
                .unwrap_or_else(crate::now_ms);
            let mut ev = base(
                "message",
                str_at(d, "/channel_id")?,
                author_id,
                user_name(author),
                ts,
            );
            ev.text = Some(str_at(d, "/content").unwrap_or("").to_owned());
            ev.message_id = id.map(str::to_owned);
            ev.reply_to = str_at(d, "/message_reference/message_id").map(str::to_owned);
            extra.insert(
                "is_bot".into(),
                author
                    .get("bot")
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
                    .into(),
            );
            ev.extra = extra;
            Some(ev)
        }
        "MESSAGE_REACTION_ADD" => {
            let user_id = str_at(d, "/user_id")?;
            if is_bot_user(Some(user_id)) {
                return None;
            }
            let name = str_at(d, "/emoji/name").unwrap_or("");
            let emoji = match str_at(d, "/emoji/id") {
                Some(id) => format!("{name}:{id}"),
                None if !name.is_empty() => name.to_owned(),
                None => return None,
            };
            let member_user = d.pointer("/member/user").unwrap_or(&Value::Null);
            let mut ev = base(
                "reaction",
                str_at(d, "/channel_id")?,
                user_id,
                user_name(member_user),
                crate::now_ms(),
            );
            ev.message_id = str_at(d, "/message_id").map(str::to_owned);
            ev.emoji = Some(emoji);
            ev.extra = extra;
            Some(ev)
        }
        "INTERACTION_CREATE" => {
            if d.get("type").and_then(Value::as_u64) != Some(3) {
                return None;
            }
            let user = d
                .pointer("/member/user")
                .or_else(|| d.get("user"))
                .unwrap_or(&Value::Null);
            let user_id = str_at(user, "/id").unwrap_or("");
            let channel = str_at(d, "/channel_id").or_else(|| str_at(d, "/channel/id"))?;
            let id = str_at(d, "/id")?;
            let ts = snowflake_ms(id).unwrap_or_else(crate::now_ms);
            let mut ev = base("button", channel, user_id, user_name(user), ts);
            ev.message_id = str_at(d, "/message/id").map(str::to_owned);
            ev.custom_id = Some(str_at(d, "/data/custom_id")?.to_owned());
            extra.insert("interaction_id".into(), id.into());
            if let Some(token) = str_at(d, "/token") {
                extra.insert("interaction_token".into(), token.into());
            }
            if let Some(values) = d.pointer("/data/values") {
                extra.insert("values".into(), values.clone());
            }
            ev.extra = extra;
            Some(ev)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOT: &str = "111111111111111111";

    #[test]
    fn intents_and_keys() {
        assert_eq!(DEFAULT_INTENTS, 46593);
        let base = "sg:{discord}:discord:";
        assert_eq!(guilds_key(base), "sg:{discord}:discord:guilds");
        assert_eq!(nonce_key(base, "abc"), "sg:{discord}:discord:nonce:abc");
        assert_eq!(lease_key(base), "sg:{discord}:discord:session:lease");
        assert_eq!(session_key(base), "sg:{discord}:discord:session");
        assert_eq!(presence_key(base), "sg:{discord}:discord:presence");
    }

    #[test]
    fn gateway_urls_get_version_and_encoding() {
        assert_eq!(
            gateway_request_url("wss://gateway.discord.gg").unwrap(),
            "wss://gateway.discord.gg/?v=10&encoding=json"
        );
        assert_eq!(
            gateway_request_url("ws://127.0.0.1:9/resume?v=9&x=1").unwrap(),
            "ws://127.0.0.1:9/resume?x=1&v=10&encoding=json"
        );
        assert!(gateway_request_url("https://discord.com").is_err());
        assert!(gateway_request_url("not a url").is_err());
    }

    #[test]
    fn timestamps() {
        assert_eq!(
            parse_timestamp("2017-07-11T17:27:07.299000+00:00"),
            Some(1_499_794_027_299)
        );
        assert_eq!(
            parse_timestamp("2017-07-11T17:27:07Z"),
            Some(1_499_794_027_000)
        );
        assert_eq!(
            parse_timestamp("2017-07-11T19:27:07.3+02:00"),
            Some(1_499_794_027_300)
        );
        assert_eq!(parse_timestamp("1970-01-01T00:00:00.000000+00:00"), Some(0));
        assert_eq!(
            parse_timestamp("2024-02-29T12:00:00+00:00"),
            Some(1_709_208_000_000)
        );
        assert_eq!(parse_timestamp("yesterday"), None);
        assert_eq!(parse_timestamp("2017-13-11T17:27:07Z"), None);
        assert_eq!(parse_timestamp("2017-07-11T17:27:07"), None);
    }

    #[test]
    fn settings_debug_hides_the_token() {
        let s = SessionSettings::new("discord", "very.secret.token", "gw-1");
        let shown = format!("{s:?}");
        assert!(!shown.contains("very.secret.token"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn presence_objects() {
        let p = presence_object(&json!({"text": "on call", "emoji": "📟"}));
        assert_eq!(
            p,
            json!({"since": null, "activities": [{"name": "Custom Status", "type": 4, "state": "📟 on call"}], "status": "online", "afk": false})
        );
        assert_eq!(
            presence_object(&json!({"text": "hi", "emoji": null}))["activities"][0]["state"],
            "hi"
        );
        assert_eq!(
            presence_object(&json!({"text": "", "emoji": "🔥"}))["activities"][0]["state"],
            "🔥"
        );
        assert_eq!(
            presence_object(&json!({"text": null, "emoji": null}))["activities"],
            json!([])
        );
    }

    #[test]
    fn fatal_codes() {
        for c in [4004, 4010, 4011, 4012, 4013, 4014] {
            assert!(fatal_close(c).is_some(), "{c}");
        }
        for c in [1000, 1001, 4000, 4001, 4002, 4003, 4005, 4007, 4008, 4009] {
            assert!(fatal_close(c).is_none(), "{c}");
        }
        assert!(fatal_close(4014).unwrap().contains("developer portal"));
    }

    /// Discord's documented MESSAGE_CREATE sample (trimmed), in a guild, a reply.
    fn message_sample() -> Value {
        json!({
            "id": "334385199974967042",
            "channel_id": "290926798999357250",
            "guild_id": "290926798626357999",
            "author": {"id": "53908099506183680", "username": "Mason", "global_name": "Mason G", "avatar": null, "discriminator": "0"},
            "content": "Supa Hot",
            "timestamp": "2017-07-11T17:27:07.299000+00:00",
            "edited_timestamp": null,
            "tts": false,
            "mention_everyone": false,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "pinned": false,
            "type": 19,
            "nonce": "1234",
            "message_reference": {"type": 0, "message_id": "334385199974967040", "channel_id": "290926798999357250", "guild_id": "290926798626357999"}
        })
    }

    #[test]
    fn message_create_becomes_a_message() {
        let ev = to_inbound("discord", BOT, "MESSAGE_CREATE", &message_sample()).unwrap();
        assert_eq!(ev.kind, "message");
        assert_eq!(ev.platform, "discord");
        assert_eq!(ev.channel_id, "290926798999357250");
        assert_eq!(ev.user_id, "53908099506183680");
        assert_eq!(ev.user_name, "Mason G");
        assert_eq!(ev.text.as_deref(), Some("Supa Hot"));
        assert_eq!(ev.message_id.as_deref(), Some("334385199974967042"));
        assert_eq!(ev.reply_to.as_deref(), Some("334385199974967040"));
        // 2017-07-11T17:27:07.299Z, from `timestamp`.
        assert_eq!(ev.ts_ms, 1_499_794_027_299);
        // Without it, from the id (a snowflake).
        let mut bare = message_sample();
        bare.as_object_mut().unwrap().remove("timestamp");
        let ev = to_inbound("discord", BOT, "MESSAGE_CREATE", &bare).unwrap();
        assert_eq!(ev.ts_ms, (334385199974967042u64 >> 22) + DISCORD_EPOCH_MS);
        assert_eq!(ev.extra["guild_id"], "290926798626357999");
        assert_eq!(ev.extra["is_bot"], false);
        assert!(ev.validate().is_ok());

        // A DM: no guild; the username when there is no global name.
        let mut dm = message_sample();
        dm.as_object_mut().unwrap().remove("guild_id");
        dm["author"]["global_name"] = Value::Null;
        dm["author"]["bot"] = true.into();
        let ev = to_inbound("discord", BOT, "MESSAGE_CREATE", &dm).unwrap();
        assert_eq!(ev.user_name, "Mason");
        assert!(!ev.extra.contains_key("guild_id"));
        assert_eq!(ev.extra["is_bot"], true);
    }

    #[test]
    fn the_bots_own_message_is_not_inbound_but_its_nonce_is_kept() {
        let mut own = message_sample();
        own["author"]["id"] = BOT.into();
        assert_eq!(to_inbound("discord", BOT, "MESSAGE_CREATE", &own), None);
        let w = writes_for("discord", BOT, "MESSAGE_CREATE", &own);
        assert_eq!(w.event, None);
        assert_eq!(w.nonce, Some(("1234".into(), "334385199974967042".into())));
        assert_eq!(
            w.guilds,
            vec![("290926798999357250".into(), "290926798626357999".into())]
        );
        // Someone else's nonce is nobody's business.
        let w = writes_for("discord", BOT, "MESSAGE_CREATE", &message_sample());
        assert_eq!(w.nonce, None);
        // An integer nonce is not ours either.
        own["nonce"] = 1234.into();
        assert_eq!(
            writes_for("discord", BOT, "MESSAGE_CREATE", &own).nonce,
            None
        );
    }

    #[test]
    fn reactions_unicode_and_custom() {
        let d = json!({
            "user_id": "53908099506183680",
            "channel_id": "290926798999357250",
            "message_id": "334385199974967042",
            "guild_id": "290926798626357999",
            "member": {"user": {"id": "53908099506183680", "username": "Mason", "global_name": null}, "roles": []},
            "emoji": {"id": null, "name": "🔥"},
            "message_author_id": BOT,
            "burst": false,
            "type": 0
        });
        let ev = to_inbound("discord", BOT, "MESSAGE_REACTION_ADD", &d).unwrap();
        assert_eq!(ev.kind, "reaction");
        assert_eq!(ev.channel_id, "290926798999357250");
        assert_eq!(ev.user_id, "53908099506183680");
        assert_eq!(ev.user_name, "Mason");
        assert_eq!(ev.message_id.as_deref(), Some("334385199974967042"));
        assert_eq!(ev.emoji.as_deref(), Some("🔥"));
        assert_eq!(ev.extra["guild_id"], "290926798626357999");
        assert!(ev.validate().is_ok());

        let mut custom = d.clone();
        custom["emoji"] = json!({"id": "41771983429993937", "name": "LUL", "animated": false});
        let ev = to_inbound("discord", BOT, "MESSAGE_REACTION_ADD", &custom).unwrap();
        assert_eq!(ev.emoji.as_deref(), Some("LUL:41771983429993937"));

        let mut own = d;
        own["user_id"] = BOT.into();
        assert_eq!(
            to_inbound("discord", BOT, "MESSAGE_REACTION_ADD", &own),
            None
        );
    }

    #[test]
    fn component_interactions_become_buttons() {
        let d = json!({
            "id": "846462639134605312",
            "application_id": "845027738276462632",
            "type": 3,
            "data": {"custom_id": "vote:yes", "component_type": 2},
            "guild_id": "290926798626357999",
            "channel_id": "345626669114982999",
            "member": {"user": {"id": "53908232506183680", "username": "Mason", "global_name": "Mase"}, "roles": []},
            "token": "A_UNIQUE_TOKEN",
            "version": 1,
            "message": {"id": "846462626593357834", "channel_id": "345626669114982999", "content": "Vote?"}
        });
        let ev = to_inbound("discord", BOT, "INTERACTION_CREATE", &d).unwrap();
        assert_eq!(ev.kind, "button");
        assert_eq!(ev.channel_id, "345626669114982999");
        assert_eq!(ev.user_id, "53908232506183680");
        assert_eq!(ev.user_name, "Mase");
        assert_eq!(ev.message_id.as_deref(), Some("846462626593357834"));
        assert_eq!(ev.custom_id.as_deref(), Some("vote:yes"));
        assert_eq!(ev.extra["guild_id"], "290926798626357999");
        assert_eq!(ev.extra["interaction_id"], "846462639134605312");
        assert_eq!(ev.extra["interaction_token"], "A_UNIQUE_TOKEN");
        assert!(ev.validate().is_ok());
        let w = writes_for("discord", BOT, "INTERACTION_CREATE", &d);
        assert_eq!(
            w.ack,
            Some(("846462639134605312".into(), "A_UNIQUE_TOKEN".into()))
        );

        // In a DM the user is `user`, not `member.user`.
        let mut dm = d.clone();
        let o = dm.as_object_mut().unwrap();
        o.remove("member");
        o.remove("guild_id");
        o.insert("user".into(), json!({"id": "7", "username": "ada"}));
        let ev = to_inbound("discord", BOT, "INTERACTION_CREATE", &dm).unwrap();
        assert_eq!((ev.user_id.as_str(), ev.user_name.as_str()), ("7", "ada"));

        // A slash command (type 2) is not a button, and is not acknowledged here.
        let mut cmd = d;
        cmd["type"] = 2.into();
        assert_eq!(to_inbound("discord", BOT, "INTERACTION_CREATE", &cmd), None);
        assert_eq!(
            writes_for("discord", BOT, "INTERACTION_CREATE", &cmd).ack,
            None
        );
    }

    #[test]
    fn guilds_map_from_guild_create_and_channel_events() {
        let d = json!({
            "id": "G", "name": "g", "unavailable": false,
            "channels": [{"id": "C1", "type": 0}, {"id": "C2", "type": 2}],
            "threads": [{"id": "T1", "parent_id": "C1", "type": 11}]
        });
        let w = writes_for("discord", BOT, "GUILD_CREATE", &d);
        assert_eq!(
            w.guilds,
            vec![
                ("C1".into(), "G".into()),
                ("C2".into(), "G".into()),
                ("T1".into(), "G".into())
            ]
        );
        let w = writes_for(
            "discord",
            BOT,
            "CHANNEL_CREATE",
            &json!({"id": "C3", "guild_id": "G", "type": 0}),
        );
        assert_eq!(w.guilds, vec![("C3".into(), "G".into())]);
        let w = writes_for(
            "discord",
            BOT,
            "CHANNEL_CREATE",
            &json!({"id": "D1", "type": 1}),
        );
        assert!(w.is_empty());
        assert!(
            writes_for("discord", BOT, "TYPING_START", &json!({"channel_id": "C1"})).is_empty()
        );
    }

    #[test]
    fn the_send_budget_delays_when_near_the_limit() {
        let t0 = Instant::now();
        let mut b = Budget::default();
        for i in 0..(SEND_LIMIT - PRESENCE_RESERVE) as u64 {
            assert_eq!(
                b.next_slot(t0, PRESENCE_RESERVE),
                t0,
                "send {i} may go at once"
            );
            b.record(t0 + Duration::from_millis(i));
        }
        // Full (but for the reserve): the next presence waits for the oldest to age out.
        assert_eq!(b.next_slot(t0, PRESENCE_RESERVE), t0 + SEND_WINDOW);
        // Heartbeats (no reserve) still have room.
        assert_eq!(b.next_slot(t0, 0), t0);
        // A minute later the oldest has left the window.
        let later = t0 + SEND_WINDOW;
        assert_eq!(b.next_slot(later, PRESENCE_RESERVE), later);
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
