//! `stargazer status`: what an operator needs at a glance, per platform —
//! stream length, group lag, pending entries (and the oldest one), the
//! consumers with their pending counts and idle times, the dead-letter count,
//! and the channels held up by an order gap.
//!
//! [`collect`] returns a serializable [`Status`]; [`render_table`] and
//! `serde_json` turn it into the human and the script output.

use std::fmt::Write as _;

use redis::RedisResult;
use serde::Serialize;

use crate::bus::Bus;
use crate::bus::admin::{ConsumerInfo, GapChannel, id_key};
use crate::keys::Keys;

/// The status of every platform asked about.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Redis server time the figures were taken at (Unix ms).
    pub at_ms: u64,
    pub platforms: Vec<PlatformStatus>,
}

/// One platform.
#[derive(Debug, Clone, Serialize)]
pub struct PlatformStatus {
    pub platform: String,
    pub stream: String,
    /// Entries in the outbound stream (acknowledged ones included, until trimmed).
    pub stream_length: u64,
    /// Whether the gateway group exists (it is created by the first gateway).
    pub group_exists: bool,
    /// Entries not yet read by any gateway. `None`: Redis cannot tell (entries
    /// were deleted in the unread range) or there is no group yet.
    pub lag: Option<u64>,
    /// Entries read and not yet acknowledged.
    pub pending: u64,
    /// Entries the group has read since it was created (Redis ≥ 7.0); minus
    /// `pending`, what the fleet has finished.
    pub entries_read: Option<u64>,
    pub oldest_pending: Option<OldestPending>,
    pub consumers: Vec<ConsumerInfo>,
    pub dead_letters: u64,
    /// Channels whose sequence gate waits for a missing predecessor.
    pub gap_channels: Vec<GapChannelStatus>,
    /// Redis Cluster: the primary (`host:port`) holding the platform's slot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// A Discord platform with a gateway session: each shard and the
    /// gateway holding it (`None`: nobody now).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discord_shards: Option<Vec<ShardHolder>>,
}

/// One Discord gateway shard and its holder.
#[derive(Debug, Clone, Serialize)]
pub struct ShardHolder {
    pub shard: u32,
    pub holder: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OldestPending {
    pub id: String,
    /// Milliseconds since it was published (from its stream id).
    pub age_ms: u64,
    pub consumer: String,
    /// Milliseconds since its consumer last read or refreshed it.
    pub idle_ms: u64,
    pub deliveries: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GapChannelStatus {
    pub channel: String,
    pub waiting_for_seq: u64,
    pub done_seq: u64,
    pub waiting_ms: u64,
    /// Server time (Unix ms) the wait began.
    pub since_ms: u64,
    /// The gateway instance holding the channel (whose gate waits).
    pub owner: Option<String>,
}

impl From<(&GapChannel, u64)> for GapChannelStatus {
    fn from((g, now): (&GapChannel, u64)) -> Self {
        GapChannelStatus {
            channel: g.channel.clone(),
            waiting_for_seq: g.waiting_for,
            done_seq: g.done,
            waiting_ms: now.saturating_sub(g.since_ms),
            since_ms: g.since_ms,
            owner: g.owner.clone(),
        }
    }
}

/// Figures of every platform in `platforms` under key prefix `prefix`.
pub async fn collect(bus: &Bus, prefix: &str, platforms: &[String]) -> RedisResult<Status> {
    let at_ms = bus.server_time_ms().await?;
    let mut out = Vec::with_capacity(platforms.len());
    for p in platforms {
        let b = bus.for_platform(Keys::new(prefix, p));
        out.push(platform_status(&b, at_ms).await?);
    }
    Ok(Status {
        at_ms,
        platforms: out,
    })
}

/// The figures of the platform `bus` is for, ages relative to `now_ms`.
pub async fn platform_status(bus: &Bus, now_ms: u64) -> RedisResult<PlatformStatus> {
    let keys = bus.keys().clone();
    let stream_length = bus.len_of(&keys.outbound()).await?;
    let dead_letters = bus.len_of(&keys.dlq()).await?;
    let group = bus.group().await?;
    let (pending, oldest_pending, consumers) = match &group {
        Some(g) => {
            let oldest = bus.oldest_pending().await?.map(|e| OldestPending {
                age_ms: now_ms.saturating_sub(id_key(&e.id).0),
                id: e.id,
                consumer: e.consumer,
                idle_ms: e.idle_ms,
                deliveries: e.deliveries,
            });
            (g.pending, oldest, bus.consumers().await?)
        }
        None => (0, None, Vec::new()),
    };
    let gap_channels = bus
        .gap_channels()
        .await?
        .iter()
        .map(|g| GapChannelStatus::from((g, now_ms)))
        .collect();
    Ok(PlatformStatus {
        platform: keys.platform().to_owned(),
        stream: keys.outbound(),
        stream_length,
        group_exists: group.is_some(),
        lag: group.as_ref().and_then(|g| g.lag),
        pending,
        entries_read: group.as_ref().and_then(|g| g.entries_read),
        oldest_pending,
        consumers,
        dead_letters,
        gap_channels,
        node: bus.slot_node().await?,
        discord_shards: discord_shards(bus).await?,
    })
}

/// Who holds each shard of a Discord platform's gateway session (`None`
/// for a platform that never ran one).
async fn discord_shards(bus: &Bus) -> RedisResult<Option<Vec<ShardHolder>>> {
    use crate::adapters::discord::gateway::{shard_lease_key, shards_key};
    use redis::AsyncCommands;
    let base = bus.keys().discord();
    let mut conn = bus.conn();
    let count: Option<u32> = conn.hget(shards_key(&base), "count").await?;
    let Some(count) = count else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for shard in 0..count.min(crate::adapters::discord::gateway::shards::MAX_SHARDS) {
        let holder: Option<String> = conn.get(shard_lease_key(&base, shard)).await?;
        out.push(ShardHolder { shard, holder });
    }
    Ok(Some(out))
}

/// A duration for people: `850ms`, `12.3s`, `4m05s`, `3h12m`, `2d04h`.
pub fn human_ms(ms: u64) -> String {
    let s = ms / 1000;
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{:02}s", s / 60, s % 60),
        3_600_000..86_400_000 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Columns padded to their widest cell, two spaces apart.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let pad = widths[i] - c.chars().count();
                l.push_str(c);
                l.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

/// The readable form: one summary row per platform, then per platform its
/// consumers and its gap channels (when there are any).
pub fn render_table(st: &Status) -> String {
    let mut out = String::new();
    let rows: Vec<Vec<String>> = st
        .platforms
        .iter()
        .map(|p| {
            let oldest = match &p.oldest_pending {
                Some(o) => format!("{} ({} old, {})", o.id, human_ms(o.age_ms), o.consumer),
                None => "-".into(),
            };
            vec![
                p.platform.clone(),
                p.stream_length.to_string(),
                match (p.group_exists, p.lag) {
                    (false, _) => "no group".into(),
                    (true, Some(l)) => l.to_string(),
                    (true, None) => "?".into(),
                },
                p.pending.to_string(),
                oldest,
                p.consumers.len().to_string(),
                p.dead_letters.to_string(),
                p.gap_channels.len().to_string(),
            ]
        })
        .collect();
    let mut header = vec![
        "PLATFORM",
        "STREAM",
        "LAG",
        "PENDING",
        "OLDEST PENDING",
        "CONSUMERS",
        "DLQ",
        "GAPS",
    ];
    let mut rows = rows;
    // On a cluster: which primary holds each platform.
    if st.platforms.iter().any(|p| p.node.is_some()) {
        header.push("NODE");
        for (row, p) in rows.iter_mut().zip(&st.platforms) {
            row.push(p.node.clone().unwrap_or_else(|| "-".into()));
        }
    }
    out.push_str(&table(&header, &rows));
    for p in &st.platforms {
        if !p.consumers.is_empty() {
            let _ = writeln!(out, "\n{} consumers:", p.platform);
            let rows: Vec<Vec<String>> = p
                .consumers
                .iter()
                .map(|c| {
                    vec![
                        format!("  {}", c.name),
                        c.pending.to_string(),
                        human_ms(c.idle_ms),
                    ]
                })
                .collect();
            out.push_str(&table(&["  CONSUMER", "PENDING", "IDLE"], &rows));
        }
        if let Some(shards) = &p.discord_shards {
            let _ = writeln!(out, "\n{} discord shards ({}):", p.platform, shards.len());
            let rows: Vec<Vec<String>> = shards
                .iter()
                .map(|s| {
                    vec![
                        format!("  {}", s.shard),
                        s.holder.clone().unwrap_or_else(|| "- (free)".into()),
                    ]
                })
                .collect();
            out.push_str(&table(&["  SHARD", "HELD BY"], &rows));
        }
        if !p.gap_channels.is_empty() {
            let _ = writeln!(out, "\n{} channels waiting on an order gap:", p.platform);
            let rows: Vec<Vec<String>> = p
                .gap_channels
                .iter()
                .map(|g| {
                    vec![
                        format!("  {}", g.channel),
                        g.waiting_for_seq.to_string(),
                        g.done_seq.to_string(),
                        human_ms(g.waiting_ms),
                    ]
                })
                .collect();
            out.push_str(&table(
                &["  CHANNEL", "WAITING FOR SEQ", "DONE UP TO", "WAITING"],
                &rows,
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(human_ms(850), "850ms");
        assert_eq!(human_ms(12_345), "12.3s");
        assert_eq!(human_ms(245_000), "4m05s");
        assert_eq!(human_ms(3 * 3_600_000 + 12 * 60_000), "3h12m");
        assert_eq!(human_ms(2 * 86_400_000 + 4 * 3_600_000), "2d04h");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "BB"],
            &[
                vec!["long".into(), "1".into()],
                vec!["x".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A     BB\nlong  1\nx     22\n");
    }
}
