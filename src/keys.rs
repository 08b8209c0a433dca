//! Every Redis key name Stargazer uses (SPEC §2), in one place.
//!
//! All keys of one platform carry the hash tag `{<platform>}`, so a platform
//! lives on one Redis Cluster slot and the multi-key scripts stay legal there.

/// Key names of one platform under one prefix (`sg` by default).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    platform: String,
    /// The reference system's layout, for a migration (see [`Keys::legacy`]).
    legacy: Option<String>,
}

impl Keys {
    pub fn new(prefix: &str, platform: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            platform: platform.to_owned(),
            legacy: None,
        }
    }

    /// The layout the reference's workers write: the outbound stream is
    /// `sg:outbound:<platform>` (no hash tag, so never on Redis Cluster) and
    /// RPC replies go to keys under `reply_prefix`. Everything else keeps
    /// the platform's `sg:{P}:` keys.
    pub fn legacy(prefix: &str, platform: &str, reply_prefix: &str) -> Self {
        Self {
            legacy: Some(reply_prefix.to_owned()),
            ..Self::new(prefix, platform)
        }
    }

    /// Whether this platform reads the reference's layout.
    pub fn is_legacy(&self) -> bool {
        self.legacy.is_some()
    }

    pub fn platform(&self) -> &str {
        &self.platform
    }

    /// The key prefix (`sg` by default).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `sg:{P}:outbound` — the stream workers publish to.
    pub fn outbound(&self) -> String {
        if self.legacy.is_some() {
            return format!("{}:outbound:{}", self.prefix, self.platform);
        }
        format!("{}:{{{}}}:outbound", self.prefix, self.platform)
    }

    /// `sg:gateway:P` — the consumer group of every gateway serving P.
    pub fn group(&self) -> String {
        format!("{}:gateway:{}", self.prefix, self.platform)
    }

    /// `sg:{P}:outbound:dlq` — the dead-letter stream.
    pub fn dlq(&self) -> String {
        format!("{}:{{{}}}:outbound:dlq", self.prefix, self.platform)
    }

    /// `sg:{P}:inbound` — platform events for workers.
    pub fn inbound(&self) -> String {
        format!("{}:{{{}}}:inbound", self.prefix, self.platform)
    }

    /// `sg:{P}:chan:<channel>` — sequence counter, delivered mark, lock.
    pub fn channel(&self, channel: &str) -> String {
        format!("{}:{{{}}}:chan:{}", self.prefix, self.platform, channel)
    }

    /// Who took a channel's last `seq` (a producer's random token), written
    /// beside the counter by producers that wait for replicas, so a retry
    /// after a short `WAIT` knows whether the `seq` it took still stands.
    pub fn seq_taker(&self, channel: &str) -> String {
        format!(
            "{}:{{{}}}:seq_taker:{}",
            self.prefix, self.platform, channel
        )
    }

    /// A pattern matching every channel state key (wake-ups are published on them).
    pub fn channel_pattern(&self) -> String {
        format!("{}:{{{}}}:chan:*", self.prefix, self.platform)
    }

    /// The state hash of the platform-wide presence lane (presence has no channel).
    pub fn presence(&self) -> String {
        format!("{}:{{{}}}:presence", self.prefix, self.platform)
    }

    /// `sg:{P}:matrix:since` — the Matrix `/sync` position, so a restart resumes.
    pub fn matrix_since(&self) -> String {
        format!("{}since", self.matrix())
    }

    /// `sg:{P}:matrix:` — the base of the Matrix syncer's state (the sync
    /// lease, `since`, the last event per room, pending joins, buttons
    /// messages; see `adapters::matrix::MatrixKeys`).
    pub fn matrix(&self) -> String {
        format!("{}:{{{}}}:matrix:", self.prefix, self.platform)
    }

    /// `sg:{P}:discord:` — the base of the Discord rate-limit state (route
    /// buckets, the global window, a global 429's block, the invalid-request
    /// count), shared by every gateway serving P.
    pub fn discord(&self) -> String {
        format!("{}:{{{}}}:discord:", self.prefix, self.platform)
    }

    /// `sg:{discord-host:<host>}:invalid` — the sliding window of Discord
    /// invalid requests (401/403/429) sent from `host`, shared by every
    /// Discord platform and gateway there: Discord bans by IP, not by token.
    /// Its own hash tag: it belongs to no one platform.
    pub fn discord_host_invalid(&self, host: &str) -> String {
        format!("{}:{{discord-host:{host}}}:invalid", self.prefix)
    }

    /// `sg:{P}:toggles:<feature>` — a hash of per-channel and per-guild
    /// switches of one feature (`channel:<id>` / `guild:<id>` → `on` | `off`).
    pub fn toggles(&self, feature: &str) -> String {
        format!("{}:{{{}}}:toggles:{feature}", self.prefix, self.platform)
    }

    /// `sg:{P}:nodes` — the live gateway instances: consumer name → instance
    /// id. A consumer with no entry here is dead; its channels may be taken
    /// and its pending entries claimed at once.
    pub fn nodes(&self) -> String {
        format!("{}:{{{}}}:nodes", self.prefix, self.platform)
    }

    /// `sg:{P}:beats` — consumer name → heartbeat counter, bumped every third
    /// of `lock_ttl_ms`; a counter that stops moving is how peers find a dead node.
    pub fn beats(&self) -> String {
        format!("{}:{{{}}}:beats", self.prefix, self.platform)
    }

    /// `sg:{P}:inbox:<consumer>` — ids of entries handed to that consumer
    /// (already pending for it) because it owns their channel.
    pub fn inbox(&self, consumer: &str) -> String {
        format!("{}:{{{}}}:inbox:{consumer}", self.prefix, self.platform)
    }

    /// `sg:{P}:sent:<bucket>` — de-duplication records: idempotency key →
    /// platform message id (or `-`), one hash per time bucket.
    pub fn sent(&self, bucket: u64) -> String {
        format!("{}:{{{}}}:sent:{bucket}", self.prefix, self.platform)
    }

    /// `sg:{P}:sending` — stream ids whose send has begun and is not yet
    /// committed (kept only with `unknown_outcome = "dead_letter"`).
    pub fn sending(&self) -> String {
        format!("{}:{{{}}}:sending", self.prefix, self.platform)
    }

    /// Prefixes of every key Stargazer owns under this prefix, for all
    /// platforms: `sg:{` and `sg:gateway:`.
    pub fn own_prefixes(prefix: &str) -> Vec<String> {
        vec![format!("{prefix}:{{"), format!("{prefix}:gateway:")]
    }

    /// `sg:{P}:rpc:reply:` — every RPC reply list starts with this.
    pub fn reply_prefix(&self) -> String {
        if let Some(p) = &self.legacy {
            return p.clone();
        }
        format!("{}:{{{}}}:rpc:reply:", self.prefix, self.platform)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_spec() {
        let k = Keys::new("sg", "discord");
        assert_eq!(k.outbound(), "sg:{discord}:outbound");
        assert_eq!(k.group(), "sg:gateway:discord");
        assert_eq!(k.dlq(), "sg:{discord}:outbound:dlq");
        assert_eq!(k.inbound(), "sg:{discord}:inbound");
        assert_eq!(k.channel("42"), "sg:{discord}:chan:42");
        assert_eq!(k.reply_prefix(), "sg:{discord}:rpc:reply:");
        assert_eq!(k.matrix_since(), "sg:{discord}:matrix:since");
        assert_eq!(k.discord(), "sg:{discord}:discord:");
    }

    #[test]
    fn the_legacy_layout_moves_only_the_stream_and_the_replies() {
        let k = Keys::legacy("sg", "discord", "sg:rpc:");
        assert_eq!(k.outbound(), "sg:outbound:discord");
        assert_eq!(k.group(), "sg:gateway:discord");
        assert_eq!(k.reply_prefix(), "sg:rpc:");
        assert_eq!(k.channel("42"), "sg:{discord}:chan:42");
        assert_eq!(k.dlq(), "sg:{discord}:outbound:dlq");
    }
}
