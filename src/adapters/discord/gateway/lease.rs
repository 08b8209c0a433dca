//! The session's Redis state: its keys under `sg:{P}:discord:` and the
//! scripts (in `../lua/`) that hold the lease and fence every write by it.
//!
//! `session:lease` is taken with `SET NX PX` semantics (value = the holder's
//! consumer name) and renewed with a compare-and-pexpire; `session` keeps
//! what a holder needs to resume; `presence` is the latest wanted presence
//! (also the channel its changes are announced on); `guilds` maps channels
//! to guilds; `nonce:<nonce>` maps a nonce to the message the bot sent with it.

use std::sync::LazyLock;

use redis::{RedisResult, Script};
use serde_json::json;

/// Take (or extend our own) lease.
pub(super) static ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/lease_acquire.lua")));
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

pub(super) fn lease_key(base: &str) -> String {
    format!("{base}session:lease")
}

pub(super) fn session_key(base: &str) -> String {
    format!("{base}session")
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
        assert_eq!(lease_key(base), "sg:{discord}:discord:session:lease");
        assert_eq!(session_key(base), "sg:{discord}:discord:session");
        assert_eq!(presence_key(base), "sg:{discord}:discord:presence");
    }
}
