//! The session's Redis state: its keys under `sg:{P}:discord:` and the
//! scripts that lease the shards and fence every write by the shard's lease
//! (named and loaded in [`crate::bus::discord`], with every Discord key).
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

use redis::RedisResult;
use serde_json::json;

pub(super) use crate::bus::discord::{
    LEASE_RELEASE as RELEASE, LEASE_RENEW as RENEW, SESSION_COMMIT as COMMIT,
    SESSION_WRITE as WRITE_SESSION, SHARD_CLAIM as CLAIM, SHARD_COUNT, identify_key, members_key,
    presence_key,
};
pub use crate::bus::discord::{
    guilds_key, nonce_key, shard_lease_key, shard_session_key, shards_key,
};

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
