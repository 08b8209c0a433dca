//! Trimming of the outbound stream (SPEC G7): acknowledged entries are removed
//! once they are older than `retention_ms`, and never an entry that some
//! consumer group has not acknowledged yet.
//!
//! Every `trim_interval_ms`, per platform: `XTRIM <outbound> MINID <m>` with
//! `m` the smallest of, over every group on the stream, its oldest pending id
//! and the id right after its last-delivered id; and `now − retention`.
//! Entries below `m` are read and acknowledged by every group. The figures are
//! read before the trim, which stays safe: a group's pending ids and
//! last-delivered id only move forward, and a newly pending entry is always
//! above the last-delivered id read before.
//!
//! The dead-letter stream is never trimmed here; `dlq_maxlen` caps it.

use std::time::Duration;

use redis::RedisResult;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::bus::Bus;
use crate::bus::admin::{id_key, next_id};

/// What one pass did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trimmed {
    /// The MINID used; `None` when nothing may be trimmed (no group yet).
    pub minid: Option<String>,
    pub removed: u64,
}

/// The MINID bound, or `None` when the stream must be left alone.
pub async fn safe_minid(bus: &Bus, retention: Duration) -> RedisResult<Option<String>> {
    let groups = bus.groups().await?;
    let ours = bus.keys().group();
    if !groups.iter().any(|g| g.name == ours) {
        // No gateway has ever read this stream: everything in it is unread.
        return Ok(None);
    }
    let now = bus.server_time_ms().await?;
    let mut bound = format!("{}-0", now.saturating_sub(retention.as_millis() as u64));
    let mut lower = |id: String| {
        if id_key(&id) < id_key(&bound) {
            bound = id;
        }
    };
    for g in &groups {
        lower(next_id(&g.last_delivered_id));
        if let Some(oldest) = bus.pending_summary_of(&g.name).await?.smallest {
            lower(oldest);
        }
    }
    Ok(Some(bound))
}

/// One trimming pass.
pub async fn trim_once(bus: &Bus, retention: Duration) -> RedisResult<Trimmed> {
    let Some(minid) = safe_minid(bus, retention).await? else {
        return Ok(Trimmed {
            minid: None,
            removed: 0,
        });
    };
    let removed = bus.trim_outbound_below(&minid).await?;
    if removed > 0 {
        crate::metrics::trimmed(bus.keys().platform(), removed);
        debug!(platform = bus.keys().platform(), %minid, removed, "trimmed acknowledged entries");
    }
    Ok(Trimmed {
        minid: Some(minid),
        removed,
    })
}

/// Trim every `every` until `stop`.
pub fn spawn(
    bus: Bus,
    every: Duration,
    retention: Duration,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        info!(
            platform = bus.keys().platform(),
            every_ms = every.as_millis() as u64,
            retention_ms = retention.as_millis() as u64,
            "stream trimming on"
        );
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.cancelled() => return,
            }
            if let Err(e) = trim_once(&bus, retention).await {
                warn!(platform = bus.keys().platform(), error = %e, "trimming the stream failed; trying again next interval");
            }
        }
    })
}
