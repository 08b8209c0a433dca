//! The Discord adapter's Redis state in one place, like the engine's: the
//! name of every key under the platform's base `sg:{P}:discord:` (so all
//! share the platform's hash tag and cluster slot) and the Lua scripts in
//! `lua/discord/` that move them. The per-host invalid-request window is
//! the one key outside it ([`crate::keys::Keys::discord_host_invalid`]).
//!
//! | key (after the base) | what |
//! |---|---|
//! | `shards` | the fleet's shard `count` and `max_concurrency` |
//! | `shard:members` | live gateways sharing the shards (owner → expiry ms) |
//! | `shard:<n>:lease` | who holds shard n |
//! | `shard:<n>:session` | what resuming shard n needs (`session_id`, `resume_url`, `seq`, `user_id`, `shards`) |
//! | `identify:<bucket>` | set for 5 s by an IDENTIFY of that bucket |
//! | `presence` | the latest wanted presence; also the channel announcing it |
//! | `guilds` | channel id → guild id |
//! | `nonce:<nonce>` | the id of the message the bot sent with that nonce |
//! | `interaction:<id>` | an interaction's `type` and who `answered` it |
//! | `application_id` | the bot's application id, from READY |
//! | `auth:refused` | why Discord refused the bot token, while it does |
//! | `dm` | user id → DM channel id |
//! | `route:*`, `bucket:*`, `global:*`, `global_until` | the shared rate limits (`limits.lua`) |

use std::sync::LazyLock;

use redis::Script;

/// The shared rate limits (buckets, global, a refused token).
pub static LIMITS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/discord/limits.lua")));
/// The per-host invalid-request window.
pub static INVALID: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/discord/invalid.lua")));
/// Register as live, take free shards up to the fair share, name the excess.
pub static SHARD_CLAIM: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/discord/shard_claim.lua")));
/// Change the fleet's shard count from the value the caller saw.
pub static SHARD_COUNT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/discord/shard_count.lua")));
/// Extend a shard lease if still ours.
pub static LEASE_RENEW: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/discord/lease_renew.lua")));
/// Delete a shard lease if still ours.
pub static LEASE_RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/discord/lease_release.lua")));
/// Replace a shard's stored session, fenced by its lease.
pub static SESSION_WRITE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/discord/session_write.lua")));
/// Record one event (inbound, nonce, guilds, seq), fenced by the shard's lease.
pub static SESSION_COMMIT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/discord/session_commit.lua")));

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
pub fn members_key(base: &str) -> String {
    format!("{base}shard:members")
}

/// `{base}identify:<bucket>`: set for 5 s by the identify of that bucket.
pub fn identify_key(base: &str, bucket: u32) -> String {
    format!("{base}identify:{bucket}")
}

/// Both the presence key and the channel its changes are announced on.
pub fn presence_key(base: &str) -> String {
    format!("{base}presence")
}

/// `{base}guilds`: channel id → guild id.
pub fn guilds_key(base: &str) -> String {
    format!("{base}guilds")
}

/// `{base}nonce:<nonce>`: the id of the message this bot sent with `nonce`.
pub fn nonce_key(base: &str, nonce: &str) -> String {
    format!("{base}nonce:{nonce}")
}

/// `{base}interaction:<id>`: the interaction's `type` and who `answered`.
pub fn claim_key(base: &str, interaction_id: &str) -> String {
    format!("{base}interaction:{interaction_id}")
}

/// `{base}application_id`: the bot's application id, from READY.
pub fn application_key(base: &str) -> String {
    format!("{base}application_id")
}

/// `{base}auth:refused`: why Discord refused the token, while it does (the
/// key `limits.lua` checks before every request of every gateway).
pub fn refused_key(base: &str) -> String {
    format!("{base}auth:refused")
}

/// `{base}dm`: user id → the DM channel opened with them.
pub fn dm_key(base: &str) -> String {
    format!("{base}dm")
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
        assert_eq!(claim_key(base, "9"), "sg:{discord}:discord:interaction:9");
        assert_eq!(application_key(base), "sg:{discord}:discord:application_id");
        assert_eq!(refused_key(base), "sg:{discord}:discord:auth:refused");
        assert_eq!(dm_key(base), "sg:{discord}:discord:dm");
    }
}
