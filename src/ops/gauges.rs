//! The periodic refresh of the gauges that are figures rather than events:
//! this gateway's load (entries in memory, lanes) and the group-wide backlog
//! (pending, lag, oldest pending age), and the dead-letter stream against its
//! cap — with a warning when the cap is reached, since from then on the
//! oldest dead letters are being dropped.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::bus::Bus;
use crate::bus::admin::id_key;
use crate::consumer::Load;

/// Refreshes one platform's gauges.
#[derive(Debug)]
pub struct Gauges {
    pub bus: Bus,
    pub dispatcher: Load,
    /// `dlq_maxlen` (0 = no cap).
    pub dlq_maxlen: u64,
    at_cap: bool,
}

impl Gauges {
    pub fn new(bus: Bus, dispatcher: Load, dlq_maxlen: u64) -> Gauges {
        Gauges {
            bus,
            dispatcher,
            dlq_maxlen,
            at_cap: false,
        }
    }

    /// One refresh. Returns whether the dead-letter stream is at its cap.
    pub async fn refresh(&mut self) -> redis::RedisResult<bool> {
        let keys = self.bus.keys().clone();
        let platform = keys.platform();
        crate::metrics::set_load(
            platform,
            self.dispatcher.held_count(),
            self.dispatcher.lanes_count(),
        );
        let now = self.bus.server_time_ms().await?;
        let group = self.bus.group().await?;
        let oldest = match &group {
            Some(_) => self.bus.pending_summary().await?.smallest,
            None => None,
        };
        let age = oldest
            .map(|id| Duration::from_millis(now.saturating_sub(id_key(&id).0)))
            .unwrap_or_default();
        crate::metrics::set_backlog(
            platform,
            group.as_ref().map_or(0, |g| g.pending),
            group.as_ref().and_then(|g| g.lag),
            age,
        );
        let dlq_len = self.bus.len_of(&keys.dlq()).await?;
        let at_cap = self.dlq_maxlen > 0 && dlq_len >= self.dlq_maxlen;
        crate::metrics::set_dead_letter_stream(platform, dlq_len, at_cap);
        if at_cap && !self.at_cap {
            warn!(
                platform,
                length = dlq_len,
                dlq_maxlen = self.dlq_maxlen,
                "the dead-letter stream reached dlq_maxlen: its oldest entries are being dropped; replay or purge them (stargazer dlq)"
            );
        } else if !at_cap && self.at_cap {
            info!(
                platform,
                length = dlq_len,
                "the dead-letter stream is below dlq_maxlen again"
            );
        }
        self.at_cap = at_cap;
        Ok(at_cap)
    }

    /// Refresh every `every` until `stop`.
    pub fn spawn(mut self, every: Duration, stop: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                if let Err(e) = self.refresh().await {
                    warn!(platform = self.bus.keys().platform(), error = %e, "refreshing gauges failed");
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.cancelled() => return,
                }
            }
        })
    }
}
