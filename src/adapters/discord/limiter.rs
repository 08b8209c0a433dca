//! The shared rate limiter: Redis state under `sg:{P}:discord:`
//! (`bus/lua/discord/limits.lua`: route buckets, the global per-second allowance, a
//! global 429's block, the refused-token mark) and the host's sliding
//! invalid-request window (`bus/lua/discord/invalid.lua`).

use super::*;

/// Why a permit was refused, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wait {
    pub wait: Duration,
    /// `invalid_requests`, `global_429`, `bucket` or `global`.
    pub why: String,
}

/// The shared rate limiter: Redis state under `sg:{P}:discord:` (see the
/// module docs and `discord/limits.lua`), and the host's invalid-request
/// budget (`discord/invalid.lua`).
#[derive(Clone)]
pub struct Limiter {
    conn: Conn,
    base: String,
    /// `sg:{discord-host:<host>}:invalid`: the sliding window of this host's
    /// invalid requests, shared by every bot and gateway on the host.
    host_key: String,
    global_per_second: u32,
    invalid_limit: u32,
    script: std::sync::Arc<redis::Script>,
    invalid_script: std::sync::Arc<redis::Script>,
}

/// Discord's invalid-request window.
pub const INVALID_WINDOW: Duration = Duration::from_secs(600);

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("base", &self.base)
            .field("host_key", &self.host_key)
            .field("global_per_second", &self.global_per_second)
            .field("invalid_limit", &self.invalid_limit)
            .finish_non_exhaustive()
    }
}

/// The bucket headers of one answer.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct BucketHeaders {
    pub(super) bucket: Option<String>,
    pub(super) limit: u64,
    pub(super) remaining: u64,
    pub(super) reset_after: Duration,
}

impl Limiter {
    /// A limiter over `base` (`Keys::discord()`), counting invalid requests
    /// in `host_key` (`Keys::discord_host_invalid()`).
    pub fn new(
        conn: Conn,
        base: String,
        host_key: String,
        global_per_second: u32,
        invalid_limit: u32,
    ) -> Limiter {
        Limiter {
            conn,
            base,
            host_key,
            global_per_second: global_per_second.max(1),
            invalid_limit: invalid_limit.max(1),
            script: std::sync::Arc::new(crate::bus::discord::LIMITS.clone()),
            invalid_script: std::sync::Arc::new(crate::bus::discord::INVALID.clone()),
        }
    }

    async fn run_invalid(&self, mode: &str) -> redis::RedisResult<(i64, i64)> {
        let mut conn = self.conn.clone();
        self.invalid_script
            .key(&self.host_key)
            .arg(mode)
            .arg(self.invalid_limit)
            .arg(INVALID_WINDOW.as_millis() as u64)
            .arg(rand::random::<u64>())
            .invoke_async(&mut conn)
            .await
    }

    /// Whether this host may still send: `None`, else how long until its
    /// oldest counted invalid request leaves the 10-minute window.
    pub async fn host_budget(&self) -> redis::RedisResult<Option<Wait>> {
        let (ok, wait) = self.run_invalid("check").await?;
        Ok((ok != 1).then(|| Wait {
            wait: Duration::from_millis(wait.max(1) as u64),
            why: "invalid_requests".into(),
        }))
    }

    /// Record that Discord refused the bot token: every gateway stops
    /// sending at its next request (see [`circuit`]).
    pub async fn refused(&self, why: &str) -> redis::RedisResult<()> {
        self.run(&["refused", why]).await.map(|_| ())
    }

    /// The token works again.
    pub async fn accepted(&self) -> redis::RedisResult<()> {
        self.run(&["accepted"]).await.map(|_| ())
    }

    async fn run(&self, args: &[&str]) -> redis::RedisResult<(i64, i64, String)> {
        let mut conn = self.conn.clone();
        let mut inv = self.script.key(&self.base);
        for a in args {
            inv.arg(*a);
        }
        inv.invoke_async(&mut conn).await
    }

    /// Take a permit for `route`: `None` when granted, else how long to
    /// wait (`why` = `unauthorized:<cause>` when the token is refused; a
    /// `probe` is not stopped by that).
    pub async fn acquire(&self, route: &Route, probe: bool) -> redis::RedisResult<Option<Wait>> {
        let (ok, wait, why) = self
            .run(&[
                "acquire",
                &route.key,
                &route.major,
                &self.global_per_second.to_string(),
                &GLOBAL_BOUNDARY_MS.to_string(),
                if probe { "1" } else { "0" },
            ])
            .await?;
        Ok((ok != 1).then(|| Wait {
            wait: Duration::from_millis(wait.max(1) as u64),
            why,
        }))
    }

    pub(super) async fn update(&self, route: &Route, h: &BucketHeaders) -> redis::RedisResult<()> {
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

    pub(super) async fn limited(
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

    /// Count one invalid request (401, 403, non-shared 429) of this host;
    /// the count in the sliding 10-minute window.
    pub async fn invalid(&self) -> redis::RedisResult<i64> {
        self.run_invalid("count").await.map(|(n, _)| n)
    }
}
