//! The least a Redis ACL user needs, per role (docs/redis.md): the commands
//! and key patterns a gateway uses, and those of a worker (the SDK and
//! `stargazer send` / `rpc`). `stargazer acl ROLE` prints them as an
//! `ACL SETUSER` line; the tests create exactly these users.
//!
//! A worker's rules are selectors (Redis ≥ 7.0), so each command is allowed
//! only on the keys it needs: it can append to an outbound stream but never
//! acknowledge, claim, trim or delete an entry of it, nor expire it.

/// Who the user is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Role {
    /// A gateway node (and the operator commands: status, dlq).
    Gateway,
    /// A bot worker: publish, take `seq`, RPC, read inbound events.
    Worker,
}

/// Commands every connection needs: the handshake, PING, and on a cluster
/// the topology (`CLUSTER SLOTS`, `CLUSTER SHARDS`). The client's
/// `CLIENT SETINFO` (Redis ≥ 7.2) is left out: its answer is ignored.
const CONNECTION: &[&str] = &[
    "+hello",
    "+auth",
    "+ping",
    "+select",
    "+readonly",
    "+cluster|slots",
    "+cluster|shards",
];

/// What a gateway runs, in scripts included (ACLs apply inside Lua too).
const GATEWAY: &[&str] = &[
    // the engine: consumer group, reads, claims, acks, dead letters, inbound
    "+xgroup|create",
    "+xgroup|delconsumer",
    "+xreadgroup",
    "+xclaim",
    "+xautoclaim",
    "+xack",
    "+xadd",
    "+xrange",
    "+xlen",
    "+xinfo|groups",
    "+xinfo|consumers",
    "+xinfo|stream",
    "+xpending",
    "+xtrim",
    "+xdel",
    "+evalsha",
    "+eval",
    "+script|load",
    // channel state, liveness, de-duplication, message cache
    "+hset",
    "+hget",
    "+hmget",
    "+hgetall",
    "+hincrby",
    "+hdel",
    "+del",
    "+expire",
    "+pexpire",
    // RPC replies, hand-off inboxes
    "+rpush",
    "+blmpop",
    // Discord rate-limit state, Matrix sync position, presence
    "+get",
    "+set",
    "+incr",
    "+pttl",
    // Discord: the live gateways sharing the shards, the per-host
    // invalid-request window (sorted sets)
    "+zadd",
    "+zrem",
    "+zremrangebyscore",
    "+zcard",
    "+zrange",
    "+publish",
    "+subscribe",
    "+unsubscribe",
    // status, gauges, readiness, redis.wait_replicas
    "+scan",
    "+time",
    "+info",
    "+wait",
    "+cluster|keyslot",
];

/// The rules of `role` for every platform (`{*}`) or only `platform`, under
/// key prefix `prefix` with the message cache at `cache_prefix`.
pub fn rules(role: Role, prefix: &str, cache_prefix: &str, platform: Option<&str>) -> Vec<String> {
    let p = platform.unwrap_or("*");
    let own = format!("{prefix}:{{{p}}}:");
    let mut out: Vec<String> = vec!["resetkeys".into(), "resetchannels".into(), "-@all".into()];
    out.extend(CONNECTION.iter().map(|s| s.to_string()));
    match role {
        Role::Gateway => {
            out.push(format!("~{own}*"));
            out.push(format!("~{cache_prefix}*"));
            out.push(format!("&{own}*"));
            out.extend(GATEWAY.iter().map(|s| s.to_string()));
        }
        Role::Worker => {
            // Publish: append only.
            out.push(format!("(~{own}outbound +xadd)"));
            // Take a channel's next seq (HINCRBY + PEXPIRE of its state hash;
            // with wait_replicas, HGET it and the taker token, and WAIT).
            out.push(format!("(~{own}chan:* +hincrby +pexpire +hget)"));
            out.push(format!("(~{own}seq_taker:* +set +get)"));
            out.push("+wait".into());
            // Wait for an RPC reply.
            out.push(format!("(~{own}rpc:reply:* +blpop)"));
            // Read platform events as a consumer group of its own.
            out.push(format!(
                "(~{own}inbound +xgroup|create +xreadgroup +xack +xautoclaim +xclaim +xpending +xrange)"
            ));
        }
    }
    out
}

/// `ACL SETUSER <user> on <rules…>` as `redis-cli` takes it (a selector,
/// which holds spaces, in double quotes): the user is created without a
/// password (it cannot log in until one is added with `>password`).
pub fn setuser(user: &str, rules: &[String]) -> String {
    let args: Vec<String> = rules
        .iter()
        .map(|r| {
            if r.contains(' ') {
                format!("\"{r}\"")
            } else {
                r.clone()
            }
        })
        .collect();
    format!("ACL SETUSER {user} on {}", args.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_cannot_touch_outbound_entries_beyond_appending() {
        let r = rules(Role::Worker, "sg", "sg:msg:", None);
        let outbound: Vec<&String> = r.iter().filter(|s| s.contains(":outbound")).collect();
        assert_eq!(outbound, [&"(~sg:{*}:outbound +xadd)".to_owned()]);
        assert!(
            !r.iter().any(|s| s.starts_with('~')),
            "no root key pattern: {r:?}"
        );
    }

    #[test]
    fn a_platform_narrows_the_patterns() {
        let r = rules(Role::Gateway, "sg", "sg:msg:", Some("discord"));
        assert!(r.contains(&"~sg:{discord}:*".to_owned()));
        assert!(r.contains(&"~sg:msg:*".to_owned()));
    }
}
