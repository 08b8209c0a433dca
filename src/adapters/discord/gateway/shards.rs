//! The fleet's shards: how many there are, which of them this gateway holds.
//!
//! Every lease/3 the [`Session`] runs `shard_claim.lua`: it registers this
//! gateway as live (`{base}shard:members`, owner → expiry), works out the
//! fair share (ceil(shards / live gateways)), takes free shard leases up to
//! it and names the shards held beyond it. Each shard taken gets a
//! [`Runner`] (its websocket, renewing its own lease); one beyond the share
//! is stopped, which closes with 4000 and releases the lease, and the
//! gateway short of its share takes it at its next claim and resumes it.
//! A dead gateway drops out of the live set and its leases expire after
//! `session_lease_ms`; the others take them over the same way.
//!
//! The count is `shards = N`, or (`"auto"`, the default) the one the fleet
//! stored in `{base}shards`, first asked of `GET /gateway/bot`. A shard
//! closed with 4010/4011 re-fetches Discord's recommendation and raises the
//! stored count from the value it saw (so the fleet reshards once); every
//! gateway sees the new count at its next claim, stops the shards of the old
//! one and claims anew.

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};
use tokio::task::JoinHandle;

use super::lease::{
    CLAIM, SHARD_COUNT, members_key, shard_lease_key, shard_session_key, shards_key,
};
use super::*;

/// The most shards this client will run (Discord's largest bots use a few
/// thousand; the cap keeps one claim script's key list bounded).
pub const MAX_SHARDS: u32 = 4096;

/// `shards` in a discord platform's config: `"auto"` (Discord's
/// recommendation from `GET /gateway/bot`) or a fixed number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShardCount {
    #[default]
    Auto,
    Fixed(u32),
}

impl<'de> Deserialize<'de> for ShardCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            Number(i64),
        }
        match Raw::deserialize(d)? {
            Raw::Word(w) if w == "auto" => Ok(ShardCount::Auto),
            // An environment override arrives as text.
            Raw::Word(w) if w.parse::<i64>().is_ok() => {
                Self::from_number(w.parse().expect("checked")).map_err(de::Error::custom)
            }
            Raw::Word(w) => Err(de::Error::custom(format!(
                "shards must be \"auto\" or a number from 1 to {MAX_SHARDS}, not `{w}`"
            ))),
            Raw::Number(n) => Self::from_number(n).map_err(de::Error::custom),
        }
    }
}

impl ShardCount {
    fn from_number(n: i64) -> Result<ShardCount, String> {
        if (1..=i64::from(MAX_SHARDS)).contains(&n) {
            Ok(ShardCount::Fixed(n as u32))
        } else {
            Err(format!(
                "shards must be \"auto\" or a number from 1 to {MAX_SHARDS}, not {n}"
            ))
        }
    }
}

impl Serialize for ShardCount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ShardCount::Auto => s.serialize_str("auto"),
            ShardCount::Fixed(n) => s.serialize_u32(*n),
        }
    }
}

/// What one claim answered.
struct Claimed {
    held: Vec<u32>,
    excess: Vec<u32>,
}

impl Session {
    /// Lease shards from the fleet and run the ones held, until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let platform = self.settings.platform.clone();
        let tick = self.settings.lease / 3;
        let mut runners: BTreeMap<u32, (CancellationToken, JoinHandle<Held>)> = BTreeMap::new();
        let mut count = 0u32;
        let mut reshard_from: Option<u32> = None;
        let mut fatal = false;
        loop {
            if stop.is_cancelled() {
                break;
            }
            // Shards that ended by themselves: a lost lease (claimed again
            // below if still ours to take), a reshard, a fatal close.
            let done: Vec<u32> = runners
                .iter()
                .filter(|(_, (_, h))| h.is_finished())
                .map(|(id, _)| *id)
                .collect();
            for id in done {
                let (_, h) = runners.remove(&id).expect("listed");
                self.forget_shard(id);
                match h.await {
                    Ok(Held::Reshard) => reshard_from = Some(count),
                    Ok(Held::Fatal) => fatal = true,
                    Ok(_) => {}
                    Err(e) => {
                        error!(%platform, shard = id, error = %e, "a discord shard task failed")
                    }
                }
            }
            if let Some(seen) = reshard_from.take()
                && let Err(e) = self.reshard(seen, &stop).await
            {
                warn!(%platform, error = %e, "could not reshard; trying again");
                reshard_from = Some(seen);
            }
            match self.shard_count(&stop).await {
                Ok(n) if n != count => {
                    if count != 0 {
                        info!(%platform, from = count, to = n, "the discord shard count changed; restarting this gateway's shards");
                    }
                    stop_all(&mut runners).await;
                    self.lock_held().clear();
                    count = n;
                    self.count.store(n, Ordering::SeqCst);
                    crate::metrics::discord_shard_count(&platform, n);
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(%platform, error = %e, "could not learn the discord shard count; retrying")
                }
            }
            if count > 0 {
                let take = !fatal && !self.circuit.is_open();
                match self.claim(count, take).await {
                    Ok(c) => {
                        for id in &c.excess {
                            if let Some((token, h)) = runners.remove(id) {
                                info!(%platform, shard = id, "handing a discord shard over to a gateway short of its share");
                                token.cancel();
                                let _ = h.await;
                                self.forget_shard(*id);
                            } else {
                                self.release_shard(*id).await;
                            }
                        }
                        for id in c.held {
                            if c.excess.contains(&id) || runners.contains_key(&id) {
                                continue;
                            }
                            info!(%platform, shard = id, shards = count, "holding a discord shard");
                            let token = stop.child_token();
                            let runner = self.runner(id, count);
                            runners.insert(id, (token.clone(), tokio::spawn(runner.run(token))));
                        }
                    }
                    Err(e) => {
                        warn!(%platform, error = %e, "could not claim discord shards; retrying")
                    }
                }
            }
            self.report_held(count);
            tokio::select! {
                _ = sleep(tick) => {}
                _ = stop.cancelled() => break,
            }
        }
        stop_all(&mut runners).await;
        self.probe_stop.cancel();
        self.lock_held().clear();
        self.report_held(count);
        let mut conn = self.conn.clone();
        let r: RedisResult<()> = conn
            .zrem(members_key(&self.base), &self.settings.owner)
            .await;
        if let Err(e) = r {
            warn!(%platform, error = %e, "could not leave the discord shard members");
        }
    }

    fn runner(self: &Arc<Self>, id: u32, count: u32) -> Arc<Runner> {
        let connected = Arc::new(AtomicBool::new(false));
        self.lock_held().insert(id, connected.clone());
        Arc::new(Runner {
            fleet: self.clone(),
            id,
            count,
            lease: shard_lease_key(&self.base, id),
            session: shard_session_key(&self.base, id),
            connected,
        })
    }

    fn forget_shard(&self, id: u32) {
        self.lock_held().remove(&id);
        crate::metrics::discord_shard_held(&self.settings.platform, id, false);
    }

    fn report_held(&self, count: u32) {
        let held = self.lock_held();
        for id in 0..count.min(MAX_SHARDS) {
            crate::metrics::discord_shard_held(&self.settings.platform, id, held.contains_key(&id));
        }
    }

    async fn release_shard(&self, id: u32) {
        let mut conn = self.conn.clone();
        let r: RedisResult<i64> = RELEASE
            .key(shard_lease_key(&self.base, id))
            .arg(&self.settings.owner)
            .invoke_async(&mut conn)
            .await;
        if let Err(e) = r {
            warn!(platform = %self.settings.platform, shard = id, error = %e, "could not release a discord shard lease");
        }
    }

    /// Register as live and take free shards up to the fair share.
    async fn claim(&self, count: u32, take: bool) -> RedisResult<Claimed> {
        let mut conn = self.conn.clone();
        let mut inv = CLAIM.prepare_invoke();
        inv.key(members_key(&self.base));
        for id in 0..count {
            inv.key(shard_lease_key(&self.base, id));
        }
        inv.arg(&self.settings.owner)
            .arg(self.lease_ms())
            .arg(if take { "1" } else { "0" });
        let (held, excess, _live): (Vec<u32>, Vec<u32>, u32) = inv.invoke_async(&mut conn).await?;
        Ok(Claimed { held, excess })
    }

    /// The shard count in force: the configured one, else the fleet's
    /// stored one, else Discord's recommendation (then stored).
    async fn shard_count(&self, stop: &CancellationToken) -> Result<u32, String> {
        let key = shards_key(&self.base);
        let mut conn = self.conn.clone();
        let stored: HashMap<String, String> =
            conn.hgetall(&key).await.map_err(|e| e.to_string())?;
        let stored_count = stored.get("count").and_then(|c| c.parse::<u32>().ok());
        if let Some(m) = stored
            .get("max_concurrency")
            .and_then(|c| c.parse::<u32>().ok())
        {
            self.max_concurrency.store(m.max(1), Ordering::SeqCst);
        }
        let fixed = match self.settings.shards {
            ShardCount::Fixed(n) => Some(n),
            ShardCount::Auto => None,
        };
        let want_bot = stored_count.is_none() && fixed.is_none()
            || self.settings.gateway_url.is_none() && self.count.load(Ordering::SeqCst) == 0;
        let bot = if want_bot {
            match self.gateway_bot(stop, false).await {
                Ok(b) => Some(b),
                Err(End::Refused(why)) => {
                    self.refuse(&why).await;
                    return Err(why);
                }
                Err(_) => None,
            }
        } else {
            None
        };
        if let Some(n) = fixed {
            if stored_count != Some(n) || bot.is_some() {
                let mc = bot.as_ref().map(|b| b.max_concurrency.to_string());
                self.store_count(stored_count, n, mc).await?;
            }
            return Ok(n);
        }
        if let Some(n) = stored_count {
            if let Some(b) = &bot {
                self.store_count(Some(n), n, Some(b.max_concurrency.to_string()))
                    .await?;
            }
            return Ok(n);
        }
        let b = bot.ok_or("GET /gateway/bot did not answer")?;
        self.store_count(None, b.shards, Some(b.max_concurrency.to_string()))
            .await
    }

    /// Set the fleet's count to `to` if it is still `seen`; the count in force.
    async fn store_count(
        &self,
        seen: Option<u32>,
        to: u32,
        max_concurrency: Option<String>,
    ) -> Result<u32, String> {
        let mut conn = self.conn.clone();
        SHARD_COUNT
            .key(shards_key(&self.base))
            .arg(seen.map(|s| s.to_string()).unwrap_or_default())
            .arg(to)
            .arg(max_concurrency.unwrap_or_default())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| e.to_string())
    }

    /// A shard met 4010/4011 under `seen` shards: take Discord's current
    /// recommendation (at least one more shard) as the fleet's count.
    async fn reshard(&self, seen: u32, stop: &CancellationToken) -> Result<(), String> {
        let platform = &self.settings.platform;
        let bot = match self.gateway_bot(stop, false).await {
            Ok(b) => b,
            Err(_) => return Err("GET /gateway/bot did not answer".into()),
        };
        let to = bot.shards.max(seen + 1).min(MAX_SHARDS);
        if let ShardCount::Fixed(n) = self.settings.shards {
            error!(%platform, shards = n, recommended = bot.shards,
                "discord closed a shard with 4010/4011: `shards = {n}` is too few for this bot; set `shards = \"auto\"` or at least {to}");
            return Ok(());
        }
        let now = self
            .store_count(Some(seen), to, Some(bot.max_concurrency.to_string()))
            .await?;
        warn!(%platform, from = seen, to = now, "discord requires more shards; the fleet reshards");
        Ok(())
    }
}

async fn stop_all(runners: &mut BTreeMap<u32, (CancellationToken, JoinHandle<Held>)>) {
    for (token, _) in runners.values() {
        token.cancel();
    }
    for (_, (_, h)) in std::mem::take(runners) {
        let _ = h.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct T {
        shards: ShardCount,
    }

    #[test]
    fn shard_counts_parse() {
        let p = |s: &str| toml::from_str::<T>(s).map(|t| t.shards);
        assert_eq!(p("shards = \"auto\"").unwrap(), ShardCount::Auto);
        assert_eq!(p("shards = 3").unwrap(), ShardCount::Fixed(3));
        assert_eq!(p("shards = \"2\"").unwrap(), ShardCount::Fixed(2));
        for bad in [
            "shards = 0",
            "shards = -1",
            "shards = \"many\"",
            "shards = 99999",
        ] {
            let e = p(bad).expect_err(bad).to_string();
            assert!(e.contains("\"auto\" or a number"), "{bad}: {e}");
        }
    }
}
