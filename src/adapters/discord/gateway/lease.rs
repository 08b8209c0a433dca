//! The session's Redis state: its keys under `sg:{P}:discord:` and the
//! scripts (in `../lua/`) that lease the shards and fence every write by the
//! shard's lease.
//!
//! `shard:<n>:lease` is shard n's lease (value = the holder's consumer name),
//! taken by `shard_claim.lua` and renewed with a compare-and-pexpire;
//! `shard:<n>:session` keeps what a holder needs to resume shard n
//! (`session_id`, `resume_url`, `seq`, `user_id`, `shards`); `shards` is the
//! fleet's shard count and `max_concurrency`; `shard:members` the live
//! gateways (owner → expiry), from which each one's fair share follows;
//! `identify:<bucket>` is Discord's identify rate limit (one per bucket
//! `shard % max_concurrency` per 5 s), shared by the fleet; `presence` is
//! the latest wanted presence (also the channel its changes are announced
//! on); `guilds` maps channels to guilds; `nonce:<nonce>` maps a nonce to the
//! message the bot sent with it.

use std::sync::LazyLock;

use redis::{RedisResult, Script};
use serde_json::json;

/// Register as live, take free shards up to the fair share, name the excess.
pub(super) static CLAIM: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/shard_claim.lua")));
/// Change the fleet's shard count from the value the caller saw.
pub(super) static SHARD_COUNT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/shard_count.lua")));
/// Extend the lease if still ours.
pub(super) static RENEW: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/lease_renew.lua")));
/// Delete the lease if still ours.
pub(super) static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/lease_release.lua")));
/// Replace the stored session, fenced by the lease.
pub(super) static WRITE_SESSION: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/session_write.lua")));
/// Record one event (inbound, nonce, guilds, seq), fenced by the lease.
pub(super) static COMMIT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/session_commit.lua")));

/// `{base}guilds`: channel id → guild id.
pub fn guilds_key(base: &str) -> String {
    format!("{base}guilds")
}

/// `{base}nonce:<nonce>`: the id of the message this bot sent with `nonce`.
pub fn nonce_key(base: &str, nonce: &str) -> String {
    format!("{base}nonce:{nonce}")
}

/// `{base}shard:<n>:lease`: who holds shard `n`.
pub fn shard_lease_key(base: &str, shard: u32) -> String {
    format!("{base}shard:{shard}:lease")
}

/// `{base}shard:<n>:session`: what resuming shard `n` needs.
pub fn shard_session_key(base: &str, shard: u32) -> String {
    format!("{base}shard:{shard}:session")
}

/// `{base}shards`: the fleet's shard count and `max_concurrency`.
pub fn shards_key(base: &str) -> String {
    format!("{base}shards")
}

/// `{base}shard:members`: the live gateways, scored by their expiry.
pub(super) fn members_key(base: &str) -> String {
    format!("{base}shard:members")
}

/// `{base}identify:<bucket>`: set for 5 s by the identify of that bucket.
pub(super) fn identify_key(base: &str, bucket: u32) -> String {
    format!("{base}identify:{bucket}")
}

/// Both the presence key and the channel its changes are announced on.
pub(super) fn presence_key(base: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        let base = "sg:{discord}:discord:";
        assert_eq!(guilds_key(base), "sg:{discord}:discord:guilds");
        assert_eq!(nonce_key(base, "abc"), "sg:{discord}:discord:nonce:abc");
        assert_eq!(
            shard_lease_key(base, 2),
            "sg:{discord}:discord:shard:2:lease"
        );
        assert_eq!(
            shard_session_key(base, 0),
            "sg:{discord}:discord:shard:0:session"
        );
        assert_eq!(shards_key(base), "sg:{discord}:discord:shards");
        assert_eq!(members_key(base), "sg:{discord}:discord:shard:members");
        assert_eq!(identify_key(base, 1), "sg:{discord}:discord:identify:1");
        assert_eq!(presence_key(base), "sg:{discord}:discord:presence");
    }
}
