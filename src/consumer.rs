//! One platform's consumer: the reader (blocking XREADGROUP while there is
//! room), the recovery sweep (XAUTOCLAIM, cursor followed to the end), and
//! the keep-fresh ticker that stops sweeps elsewhere from taking this
//! consumer's slow entries. Entries go to the [`Dispatcher`].

use std::sync::Arc;
use std::time::Duration;

use redis::RedisResult;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::adapters::SharedAdapter;
use crate::bus::{Bus, DeadLetter, Identity, RawEntry, Timing};
use crate::config::ConsumerConfig;
use crate::dispatch::retry::RetryPolicy;
use crate::dispatch::{Dispatcher, DispatcherParts, Entry};
use crate::envelope::{ParseRules, parse_entry};
use crate::stats::Stats;

/// A running consumer.
#[derive(Debug)]
pub struct Consumer {
    dispatcher: Dispatcher,
    stats: Arc<Stats>,
    tasks: Vec<JoinHandle<()>>,
    drain: Duration,
    platform: String,
}

/// Everything needed to start one platform's consumer.
#[derive(Debug)]
pub struct ConsumerParts {
    pub bus: Bus,
    pub adapter: SharedAdapter,
    pub settings: ConsumerConfig,
    /// This gateway's name in the consumer group.
    pub consumer_name: String,
    /// `message_key` must start with this.
    pub cache_prefix: String,
    /// Tools registered from Rust, offered through `execute_tool` beside
    /// those of `tools_dir`.
    pub tools: Vec<Arc<dyn crate::tools::Tool>>,
}

struct Ctx {
    bus: Bus,
    dispatcher: Dispatcher,
    settings: ConsumerConfig,
    rules: ParseRules,
    who: Identity,
    room: Arc<Semaphore>,
    stats: Arc<Stats>,
}

impl Consumer {
    /// Create the group if needed and start reading.
    pub async fn start(p: ConsumerParts) -> RedisResult<Consumer> {
        p.bus.ensure_group().await?;
        let platform = p.bus.keys().platform().to_owned();
        let who = Identity {
            consumer: p.consumer_name.clone(),
            instance: format!("{}/{:016x}", p.consumer_name, rand::random::<u64>()),
        };
        let st = &p.settings;
        let timing = Timing {
            lock_ttl: ConsumerConfig::ms(st.lock_ttl_ms),
            gap_timeout: ConsumerConfig::ms(st.gap_timeout_ms),
            dlq_maxlen: st.dlq_maxlen,
        };
        let stats = Arc::new(Stats::default());
        let rules = ParseRules {
            max_payload_bytes: st.max_payload_bytes,
            signing_secret: st.signing_secret.as_ref().map(|s| s.as_bytes().to_vec()),
            cache_prefix: p.cache_prefix.clone(),
            reply_prefix: p.bus.keys().reply_prefix(),
        };
        let room = Arc::new(Semaphore::new(st.max_in_flight));
        let dispatcher = Dispatcher::new(DispatcherParts {
            room: room.clone(),
            max_in_flight: st.max_in_flight,
            rules: rules.clone(),
            handoff_idle: ConsumerConfig::ms(st.autoclaim_min_idle_ms),
            rpc: Arc::new(crate::rpc::RpcServer::new(
                &platform,
                p.adapter.clone(),
                st.tools_dir.as_ref().map(std::path::PathBuf::from),
                p.tools.clone(),
            )),
            bus: p.bus.clone(),
            adapter: p.adapter.clone(),
            who: who.clone(),
            timing,
            retry: RetryPolicy {
                base: ConsumerConfig::ms(st.backoff_base_ms),
                max: ConsumerConfig::ms(st.backoff_max_ms),
                max_attempts: st.max_attempts,
                max_age: ConsumerConfig::ms(st.max_age_ms),
            },
            unknown_outcome: st.unknown_outcome,
            stats: stats.clone(),
        });
        let ctx = Arc::new(Ctx {
            bus: p.bus.clone(),
            dispatcher: dispatcher.clone(),
            settings: p.settings.clone(),
            rules,
            who,
            room,
            stats: stats.clone(),
        });
        let span = info_span!("consumer", platform = %platform, consumer = %p.consumer_name);
        let reader_conn = p.bus.blocking_connection().await?;
        let tasks = vec![
            tokio::spawn(read_loop(ctx.clone(), reader_conn).instrument(span.clone())),
            tokio::spawn(sweep_loop(ctx.clone()).instrument(span.clone())),
            tokio::spawn(keep_fresh_loop(ctx.clone()).instrument(span.clone())),
            tokio::spawn(
                {
                    let (bus, d) = (p.bus.clone(), dispatcher.clone());
                    let stop = dispatcher.stopping().clone();
                    async move { bus.watch_wakeups(|chan| d.wake(chan), stop).await }
                }
                .instrument(span),
            ),
        ];
        info!(platform = %platform, consumer = %p.consumer_name, adapter = p.adapter.kind(), "consumer started");
        Ok(Consumer {
            dispatcher,
            stats,
            tasks,
            drain: ConsumerConfig::ms(st.drain_timeout_ms),
            platform,
        })
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    pub fn platform(&self) -> &str {
        &self.platform
    }

    /// Entries held in memory right now.
    pub fn in_flight(&self) -> usize {
        self.dispatcher.held_count()
    }

    /// A handle on the dispatcher (cheap clone), for the gauges.
    pub fn dispatcher(&self) -> Dispatcher {
        self.dispatcher.clone()
    }

    /// G8: stop reading, finish in-flight work until the drain timeout,
    /// release every lock. What is left stays pending for the others.
    pub async fn shutdown(self) {
        self.dispatcher.stopping().cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        self.dispatcher.shutdown(self.drain).await;
        info!(platform = %self.platform, "consumer stopped");
    }
}

/// Permits for up to `want` entries: waits for the first, takes what else is free.
async fn room_for(room: &Arc<Semaphore>, want: usize) -> Option<OwnedSemaphorePermit> {
    let mut permit = room.clone().acquire_owned().await.ok()?;
    let extra = room.available_permits().min(want.saturating_sub(1));
    if extra > 0
        && let Ok(more) = room.clone().try_acquire_many_owned(extra as u32)
    {
        permit.merge(more);
    }
    Some(permit)
}

impl Ctx {
    fn hand_over(&self, raw: RawEntry, permit: &mut OwnedSemaphorePermit) {
        let Some(one) = permit.split(1) else {
            error!("more entries than permits; entry left pending");
            return;
        };
        let parsed = parse_entry(&raw.fields, &self.rules);
        self.dispatcher.submit(Entry {
            id: raw.id,
            parsed,
            permit: one,
        });
    }
}

async fn read_loop(ctx: Arc<Ctx>, mut conn: redis::aio::MultiplexedConnection) {
    let stopping = ctx.dispatcher.stopping().clone();
    let block = ConsumerConfig::ms(ctx.settings.block_ms);
    // First what this consumer name left pending in an earlier life, then new entries.
    let mut cursor = Some("0".to_owned());
    let mut failures = 0u32;
    while !stopping.is_cancelled() {
        if !ctx.dispatcher.can_park() {
            // Busy channels have parked as many ids as we keep: read no more
            // until they catch up (memory stays bounded).
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                _ = stopping.cancelled() => break,
            }
            continue;
        }
        let permit = tokio::select! {
            p = room_for(&ctx.room, ctx.settings.read_batch) => p,
            _ = stopping.cancelled() => None,
        };
        let Some(mut permit) = permit else {
            break;
        };
        let want = permit.num_permits();
        let (from, blocking) = match &cursor {
            Some(c) => (c.clone(), None),
            None => (">".to_owned(), Some(block)),
        };
        let call = ctx
            .bus
            .read(&mut conn, &ctx.who.consumer, &from, want, blocking);
        let result = match tokio::time::timeout(block + Duration::from_secs(10), call).await {
            Ok(r) => r,
            Err(_) => Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "XREADGROUP did not answer in time",
            ))),
        };
        match result {
            Ok(entries) => {
                failures = 0;
                if cursor.is_some() {
                    cursor = entries.last().map(|e| e.id.0.clone());
                    if cursor.is_none() {
                        debug!("own pending entries taken back; reading new ones");
                    }
                }
                Stats::add(&ctx.stats.read, entries.len() as u64);
                for raw in entries {
                    ctx.hand_over(raw, &mut permit);
                }
            }
            Err(e) => {
                failures += 1;
                if e.code() == Some("NOGROUP") {
                    warn!("consumer group missing (stream deleted?); creating it again");
                    let _ = ctx.bus.ensure_group().await;
                } else {
                    warn!(error = %e, "reading the stream failed; retrying");
                }
                let delay = Duration::from_millis(100 * u64::from(failures.min(20)));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stopping.cancelled() => break,
                }
                if let Ok(c) = ctx.bus.blocking_connection().await {
                    conn = c;
                }
            }
        }
    }
}

async fn sweep_loop(ctx: Arc<Ctx>) {
    let stopping = ctx.dispatcher.stopping().clone();
    let every = ConsumerConfig::ms(ctx.settings.autoclaim_interval_ms);
    // At start (a node that died may have left entries behind), then periodically.
    loop {
        if let Err(e) = sweep(&ctx).await {
            warn!(error = %e, "recovery sweep failed; trying again next interval");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopping.cancelled() => return,
        }
    }
}

/// One full pass over the pending list, following the XAUTOCLAIM cursor.
async fn sweep(ctx: &Ctx) -> RedisResult<()> {
    let min_idle = ConsumerConfig::ms(ctx.settings.autoclaim_min_idle_ms);
    let stopping = ctx.dispatcher.stopping();
    let mut cursor = "0-0".to_owned();
    let (mut claimed_total, mut lost_total) = (0usize, 0usize);
    loop {
        let permit = tokio::select! {
            p = room_for(&ctx.room, 100) => p,
            _ = stopping.cancelled() => None,
        };
        let Some(mut permit) = permit else {
            return Ok(());
        };
        let count = permit.num_permits();
        let (next, claimed, deleted) = ctx
            .bus
            .autoclaim(&ctx.who.consumer, min_idle, &cursor, count)
            .await?;
        claimed_total += claimed.len();
        Stats::add(&ctx.stats.claimed, claimed.len() as u64);
        for raw in claimed {
            ctx.hand_over(raw, &mut permit);
        }
        for id in deleted {
            lost_total += 1;
            Stats::inc(&ctx.stats.lost_in_stream);
            crate::metrics::lost_in_stream(ctx.bus.keys().platform());
            ctx.bus
                .dead_letter(
                    &ctx.who,
                    Timing {
                        lock_ttl: Duration::from_secs(1),
                        gap_timeout: Duration::ZERO,
                        dlq_maxlen: ctx.settings.dlq_maxlen,
                    },
                    None,
                    &id,
                    None,
                    false,
                    DeadLetter {
                        payload: b"",
                        error: "the entry was pending but had been deleted from the stream (trimmed or XDEL'd) before it was delivered",
                        error_kind: "lost_in_stream",
                        attempts: 0,
                        consumer: &ctx.who.consumer,
                        channel_id: None,
                    },
                )
                .await?;
        }
        if next == "0-0" || next.is_empty() {
            break;
        }
        cursor = next;
    }
    if claimed_total > 0 || lost_total > 0 {
        info!(
            claimed = claimed_total,
            lost_in_stream = lost_total,
            "recovery sweep took over stranded entries"
        );
    }
    Ok(())
}

async fn keep_fresh_loop(ctx: Arc<Ctx>) {
    let stopping = ctx.dispatcher.stopping().clone();
    let every =
        ConsumerConfig::ms(ctx.settings.autoclaim_min_idle_ms / 3).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            // Lanes may still be draining: keep their entries fresh until the end.
            _ = stopping.cancelled() => return,
        }
        let ids = ctx.dispatcher.take_stale_held(every);
        for chunk in ids.chunks(500) {
            if let Err(e) = ctx.bus.keep_fresh(&ctx.who.consumer, chunk).await {
                warn!(error = %e, "could not refresh held entries");
            }
        }
    }
}
