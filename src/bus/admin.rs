//! The operator's side of the bus: read-only inspection of a platform's
//! streams, group and channel states (for `stargazer status`, the gauges and
//! the trimmer), and the few administrative writes — replaying or deleting
//! dead letters and trimming acknowledged entries.
//!
//! Nothing here runs on the delivery path. Every command is bounded: channel
//! hashes are found with `SCAN … MATCH … COUNT`, never `KEYS`, and streams are
//! read in pages.

use std::collections::HashMap;

use redis::{RedisResult, Value};
use serde::Serialize;

use super::{Bus, RawEntry, Scripts, as_str, as_u64, parse_entries};
use crate::envelope::StreamId;

/// One consumer group on the outbound stream (`XINFO GROUPS`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupInfo {
    pub name: String,
    pub consumers: u64,
    pub pending: u64,
    pub last_delivered_id: String,
    /// Entries added but not yet read by the group; Redis cannot always tell
    /// (after deletions in the unread range), then `None`.
    pub lag: Option<u64>,
    /// Entries the group has read since it was created (Redis ≥ 7.0).
    pub entries_read: Option<u64>,
}

/// `XPENDING <stream> <group>` (summary form).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PendingSummary {
    pub count: u64,
    pub smallest: Option<String>,
    pub largest: Option<String>,
    pub per_consumer: Vec<(String, u64)>,
}

/// The oldest pending entry (`XPENDING … - + 1`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PendingEntry {
    pub id: String,
    pub consumer: String,
    /// Milliseconds since it was last delivered to (or kept fresh by) its consumer.
    pub idle_ms: u64,
    pub deliveries: u64,
}

/// One consumer of the group (`XINFO CONSUMERS`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsumerInfo {
    pub name: String,
    pub pending: u64,
    /// Milliseconds since its last attempted interaction (read, claim).
    pub idle_ms: u64,
    /// Milliseconds since its last successful interaction (Redis ≥ 7.2 only).
    pub inactive_ms: Option<i64>,
}

/// A channel whose sequence gate waits for a missing predecessor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GapChannel {
    pub channel: String,
    /// The seq the gate waits for.
    pub waiting_for: u64,
    /// Server time (Unix ms) the wait began.
    pub since_ms: u64,
    /// Highest seq finished on the channel.
    pub done: u64,
    /// The gateway instance that owns the channel (and runs its gate), if any.
    pub owner: Option<String>,
}

/// The registered gateway instances of a platform and their heartbeat
/// counters (`sg:{P}:nodes`, `sg:{P}:beats`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Nodes {
    /// Consumer name → its live instance (`<consumer>/<random>`).
    pub registered: HashMap<String, String>,
    /// Consumer name → heartbeat counter (bumped every third of `lock_ttl_ms`).
    pub beats: HashMap<String, u64>,
}

fn map_of(v: Value) -> HashMap<String, Value> {
    let mut m = HashMap::new();
    match v {
        Value::Array(items) => {
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                if let Some(k) = as_str(&k) {
                    m.insert(k.to_owned(), v);
                }
            }
        }
        Value::Map(pairs) => {
            for (k, v) in pairs {
                if let Some(k) = as_str(&k) {
                    m.insert(k.to_owned(), v);
                }
            }
        }
        _ => {}
    }
    m
}

fn num(m: &HashMap<String, Value>, k: &str) -> Option<u64> {
    m.get(k).and_then(as_u64)
}

fn text(m: &HashMap<String, Value>, k: &str) -> Option<String> {
    m.get(k).and_then(as_str).map(str::to_owned)
}

/// Escape the glob characters of a `SCAN MATCH` pattern.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The id right after `id` (`a-b` → `a-(b+1)`).
pub fn next_id(id: &str) -> String {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    let ms: u64 = ms.parse().unwrap_or(0);
    match seq.parse::<u64>() {
        Ok(u64::MAX) => format!("{}-0", ms + 1),
        Ok(s) => format!("{ms}-{}", s + 1),
        Err(_) => format!("{ms}-0"),
    }
}

/// Stream ids compare as (ms, seq) pairs, not as strings.
pub fn id_key(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

impl Bus {
    /// Redis server time in Unix milliseconds (ages are computed against it,
    /// not the local clock, like the scripts do).
    pub async fn server_time_ms(&self) -> RedisResult<u64> {
        let mut conn = self.conn();
        let (s, us): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
        Ok(s * 1000 + us / 1000)
    }

    /// XLEN of `key` (0 when it does not exist).
    pub async fn len_of(&self, key: &str) -> RedisResult<u64> {
        let mut conn = self.conn();
        redis::cmd("XLEN").arg(key).query_async(&mut conn).await
    }

    /// Every consumer group on the outbound stream (empty when there is no stream).
    pub async fn groups(&self) -> RedisResult<Vec<GroupInfo>> {
        let mut conn = self.conn();
        let v: RedisResult<Value> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(self.keys.outbound())
            .query_async(&mut conn)
            .await;
        let v = match v {
            Err(e) if e.to_string().contains("no such key") => return Ok(Vec::new()),
            other => other?,
        };
        let Value::Array(groups) = v else {
            return Ok(Vec::new());
        };
        Ok(groups
            .into_iter()
            .map(map_of)
            .map(|g| GroupInfo {
                name: text(&g, "name").unwrap_or_default(),
                consumers: num(&g, "consumers").unwrap_or(0),
                pending: num(&g, "pending").unwrap_or(0),
                last_delivered_id: text(&g, "last-delivered-id").unwrap_or_else(|| "0-0".into()),
                lag: num(&g, "lag"),
                entries_read: num(&g, "entries-read"),
            })
            .collect())
    }

    /// This platform's gateway group, if it exists.
    pub async fn group(&self) -> RedisResult<Option<GroupInfo>> {
        let name = self.keys.group();
        Ok(self.groups().await?.into_iter().find(|g| g.name == name))
    }

    /// The pending summary of `group` (default: the gateway group).
    pub async fn pending_summary_of(&self, group: &str) -> RedisResult<PendingSummary> {
        let mut conn = self.conn();
        let v: Value = redis::cmd("XPENDING")
            .arg(self.keys.outbound())
            .arg(group)
            .query_async(&mut conn)
            .await?;
        let Value::Array(items) = v else {
            return Ok(PendingSummary::default());
        };
        let mut it = items.into_iter();
        let count = it.next().as_ref().and_then(as_u64).unwrap_or(0);
        let smallest = it.next().as_ref().and_then(as_str).map(str::to_owned);
        let largest = it.next().as_ref().and_then(as_str).map(str::to_owned);
        let per_consumer = match it.next() {
            Some(Value::Array(cs)) => cs
                .into_iter()
                .filter_map(|c| match c {
                    Value::Array(pair) if pair.len() == 2 => {
                        Some((as_str(&pair[0])?.to_owned(), as_u64(&pair[1]).unwrap_or(0)))
                    }
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        Ok(PendingSummary {
            count,
            smallest,
            largest,
            per_consumer,
        })
    }

    pub async fn pending_summary(&self) -> RedisResult<PendingSummary> {
        self.pending_summary_of(&self.keys.group()).await
    }

    /// The oldest entry pending in the gateway group, with its consumer.
    pub async fn oldest_pending(&self) -> RedisResult<Option<PendingEntry>> {
        let mut conn = self.conn();
        let v: Value = redis::cmd("XPENDING")
            .arg(self.keys.outbound())
            .arg(self.keys.group())
            .arg("-")
            .arg("+")
            .arg(1)
            .query_async(&mut conn)
            .await?;
        let Value::Array(items) = v else {
            return Ok(None);
        };
        Ok(items.into_iter().next().and_then(|e| match e {
            Value::Array(f) if f.len() >= 4 => Some(PendingEntry {
                id: as_str(&f[0])?.to_owned(),
                consumer: as_str(&f[1])?.to_owned(),
                idle_ms: as_u64(&f[2]).unwrap_or(0),
                deliveries: as_u64(&f[3]).unwrap_or(0),
            }),
            _ => None,
        }))
    }

    /// The consumers of the gateway group.
    pub async fn consumers(&self) -> RedisResult<Vec<ConsumerInfo>> {
        let mut conn = self.conn();
        let v: Value = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(self.keys.outbound())
            .arg(self.keys.group())
            .query_async(&mut conn)
            .await?;
        let Value::Array(cs) = v else {
            return Ok(Vec::new());
        };
        Ok(cs
            .into_iter()
            .map(map_of)
            .map(|c| ConsumerInfo {
                name: text(&c, "name").unwrap_or_default(),
                pending: num(&c, "pending").unwrap_or(0),
                idle_ms: num(&c, "idle").unwrap_or(0),
                inactive_ms: c.get("inactive").and_then(|v| match v {
                    Value::Int(i) => Some(*i),
                    _ => None,
                }),
            })
            .collect())
    }

    /// Redis Cluster: the primary (`host:port`) that holds this platform's
    /// slot (`CLUSTER KEYSLOT` + `CLUSTER SLOTS`); `None` on one server.
    pub async fn slot_node(&self) -> RedisResult<Option<String>> {
        if !self.conn.is_cluster() {
            return Ok(None);
        }
        let mut conn = self.conn();
        let slot: u64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(self.keys.outbound())
            .query_async(&mut conn)
            .await?;
        Ok(primaries(&mut conn)
            .await?
            .into_iter()
            .find(|(lo, hi, _)| (*lo..=*hi).contains(&slot))
            .map(|(_, _, node)| node))
    }

    /// Channels whose state hash records a gap (`gap_seq`), found with
    /// `SCAN MATCH sg:{P}:chan:* COUNT 1000` and one pipelined HMGET per page.
    pub async fn gap_channels(&self) -> RedisResult<Vec<GapChannel>> {
        let mut conn = self.conn();
        let prefix = self.keys.channel("");
        let pattern = format!("{}*", glob_escape(&prefix));
        let mut cursor = 0u64;
        let mut out = Vec::new();
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .arg("TYPE")
                .arg("hash");
            // On a cluster: the node of the platform's slot holds them all.
            let (next, keys): (u64, Vec<String>) =
                redis::from_redis_value(conn.on_node_of(&self.keys.outbound(), &scan).await?)?;
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for k in &keys {
                    pipe.cmd("HMGET")
                        .arg(k)
                        .arg("gap_seq")
                        .arg("gap_since")
                        .arg("done")
                        .arg("owner");
                }
                let rows: Vec<Vec<Option<String>>> = pipe.query_async(&mut conn).await?;
                for (k, row) in keys.iter().zip(rows) {
                    let n = |i: usize| {
                        row.get(i)
                            .cloned()
                            .flatten()
                            .and_then(|v| v.parse::<u64>().ok())
                    };
                    if let Some(want) = n(0) {
                        out.push(GapChannel {
                            channel: k[prefix.len()..].to_owned(),
                            waiting_for: want,
                            since_ms: n(1).unwrap_or(0),
                            done: n(2).unwrap_or(0),
                            owner: row.get(3).cloned().flatten(),
                        });
                    }
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        out.sort_by(|a, b| a.channel.cmp(&b.channel));
        Ok(out)
    }

    /// Platforms that have an outbound stream under `prefix` (SCAN, not KEYS).
    pub async fn discover_platforms(&self, prefix: &str) -> RedisResult<Vec<String>> {
        let mut conn = self.conn();
        let pattern = format!("{}:{{*}}:outbound", glob_escape(prefix));
        // One server, or every primary of a cluster in turn.
        let nodes: Vec<Option<(String, u16)>> = if conn.is_cluster() {
            primaries(&mut conn)
                .await?
                .into_iter()
                .filter_map(|(_, _, n)| {
                    let (h, p) = n.rsplit_once(':')?;
                    Some(Some((h.to_owned(), p.parse().ok()?)))
                })
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect()
        } else {
            vec![None]
        };
        let mut out = Vec::new();
        for node in nodes {
            self.scan_streams(&mut conn, node, &pattern, prefix, &mut out)
                .await?;
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    async fn scan_streams(
        &self,
        conn: &mut super::Conn,
        node: Option<(String, u16)>,
        pattern: &str,
        prefix: &str,
        out: &mut Vec<String>,
    ) -> RedisResult<()> {
        let mut cursor = 0u64;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .arg("TYPE")
                .arg("stream");
            let (next, keys): (u64, Vec<String>) = match (&node, &mut *conn) {
                (Some((host, port)), super::Conn::Cluster(c)) => {
                    use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
                    let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                        host: host.clone(),
                        port: *port,
                    });
                    redis::from_redis_value(c.route_command(scan, route).await?)?
                }
                (_, c) => scan.query_async(c).await?,
            };
            for k in keys {
                let inner = k
                    .strip_prefix(&format!("{prefix}:{{"))
                    .and_then(|r| r.strip_suffix("}:outbound"));
                if let Some(p) = inner {
                    out.push(p.to_owned());
                }
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// Up to `count` dead letters from `start` (inclusive; `(id` exclusive) to `end`.
    pub async fn dlq_range(
        &self,
        start: &str,
        end: &str,
        count: usize,
    ) -> RedisResult<Vec<RawEntry>> {
        let mut conn = self.conn();
        let v: Value = redis::cmd("XRANGE")
            .arg(self.keys.dlq())
            .arg(start)
            .arg(end)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await?;
        Ok(parse_entries(v))
    }

    /// Up to `count` dead letters from `end` (inclusive; `(id` exclusive) down
    /// to `start`, newest first (`XREVRANGE`).
    pub async fn dlq_rev_range(
        &self,
        end: &str,
        start: &str,
        count: usize,
    ) -> RedisResult<Vec<RawEntry>> {
        let mut conn = self.conn();
        let v: Value = redis::cmd("XREVRANGE")
            .arg(self.keys.dlq())
            .arg(end)
            .arg(start)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await?;
        Ok(parse_entries(v))
    }

    /// The registered instances and their heartbeat counters (one pipeline).
    pub async fn nodes(&self) -> RedisResult<Nodes> {
        let mut conn = self.conn();
        let (registered, beats): (HashMap<String, String>, HashMap<String, u64>) = redis::pipe()
            .cmd("HGETALL")
            .arg(self.keys.nodes())
            .cmd("HGETALL")
            .arg(self.keys.beats())
            .query_async(&mut conn)
            .await?;
        Ok(Nodes { registered, beats })
    }

    /// Move one dead letter back to the outbound stream with a rebuilt
    /// `payload` (and `sig`), atomically. `None` when it was no longer there.
    pub async fn replay_dead_letter(
        &self,
        dlq_id: &str,
        payload: &[u8],
        sig: Option<&str>,
    ) -> RedisResult<Option<StreamId>> {
        let mut conn = self.conn();
        let v: Value = Scripts::get()
            .replay
            .key(self.keys.dlq())
            .key(self.keys.outbound())
            .arg(dlq_id)
            .arg(payload)
            .arg(sig.unwrap_or(""))
            .invoke_async(&mut conn)
            .await?;
        Ok(as_str(&v).map(|s| StreamId(s.to_owned())))
    }

    /// Delete dead letters by id; returns how many were there.
    pub async fn delete_dead_letters(&self, ids: &[String]) -> RedisResult<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn();
        let mut cmd = redis::cmd("XDEL");
        cmd.arg(self.keys.dlq());
        for id in ids {
            cmd.arg(id);
        }
        cmd.query_async(&mut conn).await
    }

    /// `XTRIM <outbound> MINID <minid>` (exact); returns the entries removed.
    pub async fn trim_outbound_below(&self, minid: &str) -> RedisResult<u64> {
        let mut conn = self.conn();
        redis::cmd("XTRIM")
            .arg(self.keys.outbound())
            .arg("MINID")
            .arg(minid)
            .query_async(&mut conn)
            .await
    }
}

/// `CLUSTER SLOTS`: every slot range with its primary (`host:port`).
async fn primaries(conn: &mut super::Conn) -> RedisResult<Vec<(u64, u64, String)>> {
    let v: Value = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
    let Value::Array(ranges) = v else {
        return Ok(Vec::new());
    };
    Ok(ranges
        .into_iter()
        .filter_map(|r| {
            let Value::Array(parts) = r else { return None };
            let lo = as_u64(parts.first()?)?;
            let hi = as_u64(parts.get(1)?)?;
            let Value::Array(node) = parts.get(2)? else {
                return None;
            };
            let host = as_str(node.first()?)?.to_owned();
            let port = as_u64(node.get(1)?)?;
            Some((lo, hi, format!("{host}:{port}")))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_step_and_compare_numerically() {
        assert_eq!(next_id("5-3"), "5-4");
        assert_eq!(next_id("0-0"), "0-1");
        assert_eq!(next_id(&format!("7-{}", u64::MAX)), "8-0");
        assert!(id_key("10-0") > id_key("9-5"));
        assert!(id_key("9-10") > id_key("9-9"));
    }

    #[test]
    fn scan_patterns_escape_globs() {
        assert_eq!(glob_escape("sg:{a*b}:chan:"), "sg:{a\\*b}:chan:");
        assert_eq!(glob_escape("sg:{x[1]}"), "sg:{x\\[1\\]}");
    }
}
