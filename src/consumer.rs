//! One platform's consumer, as one gateway *instance* after another: an
//! instance registers in `sg:{P}:nodes`, then runs
//!
//! - the reader: blocking XREADGROUP while there is room;
//! - the inbox: entries peers handed over because this instance owns their channel;
//! - liveness: a heartbeat every third of `lock_ttl_ms`, which also watches
//!   the other nodes — one whose heartbeat stands still for `lock_ttl_ms` is
//!   declared dead, and its pending entries (and those of any consumer with
//!   no registration) are claimed at once, without room (G7: recovery never
//!   waits behind the reader's budget);
//! - recovery of this consumer name's own pending entries from an earlier life.
//!
//! Entries go to the [`Dispatcher`]. An instance that finds itself no longer
//! registered (its peers declared it dead) drops everything it holds and a
//! new instance starts over; on shutdown it drains, then unregisters so its
//! peers claim what is left at once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::RedisResult;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::adapters::SharedAdapter;
use crate::bus::{Beat, Bus, Identity, RawEntry};
use crate::config::{ConsumerConfig, UnknownOutcome};
use crate::dispatch::retry::RetryPolicy;
use crate::dispatch::{Arrival, Dispatcher, DispatcherParts, Settings};
use crate::envelope::{ParseRules, StreamId, parse_entry};
use crate::keys::Keys;
use crate::stats::Stats;

/// A running consumer.
#[derive(Debug)]
pub struct Consumer {
    stats: Arc<Stats>,
    stop: CancellationToken,
    task: JoinHandle<()>,
    current: Arc<Mutex<Option<Dispatcher>>>,
    platform: String,
    circuit: crate::circuit::Circuit,
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

/// What the gauges read of the running instance.
#[derive(Debug, Clone)]
pub struct Load(Arc<Mutex<Option<Dispatcher>>>);

impl Load {
    pub fn held_count(&self) -> usize {
        self.0
            .lock()
            .expect("load poisoned")
            .as_ref()
            .map_or(0, Dispatcher::held_count)
    }

    pub fn lanes_count(&self) -> usize {
        self.0
            .lock()
            .expect("load poisoned")
            .as_ref()
            .map_or(0, Dispatcher::lanes_count)
    }
}

struct Ctx {
    circuit: crate::circuit::Circuit,
    bus: Bus,
    settings: ConsumerConfig,
    rules: ParseRules,
    consumer: String,
    adapter: SharedAdapter,
    rpc: Arc<crate::rpc::RpcServer>,
    stats: Arc<Stats>,
    current: Arc<Mutex<Option<Dispatcher>>>,
}

impl Consumer {
    /// Create the group if needed and start reading.
    pub async fn start(p: ConsumerParts) -> RedisResult<Consumer> {
        crate::bus::until_up("create the consumer group", || p.bus.ensure_group()).await?;
        let platform = p.bus.keys().platform().to_owned();
        let st = &p.settings;
        let rules = ParseRules {
            max_payload_bytes: st.max_payload_bytes,
            signing_secret: st.signing_secret.as_ref().map(|s| s.as_bytes().to_vec()),
            cache_prefix: p.cache_prefix.clone(),
            own_prefixes: Keys::own_prefixes(p.bus.keys().prefix()),
            reply_prefix: p.bus.keys().reply_prefix(),
        };
        let stats = Arc::new(Stats::default());
        let current = Arc::new(Mutex::new(None));
        let circuit = p
            .adapter
            .circuit()
            .unwrap_or_else(|| crate::circuit::Circuit::new(&platform));
        let ctx = Arc::new(Ctx {
            circuit: circuit.clone(),
            rpc: Arc::new(crate::rpc::RpcServer::new(
                &platform,
                p.adapter.clone(),
                st.tools_dir.as_ref().map(std::path::PathBuf::from),
                p.tools.clone(),
            )),
            bus: p.bus.clone(),
            settings: p.settings.clone(),
            rules,
            consumer: p.consumer_name.clone(),
            adapter: p.adapter.clone(),
            stats: stats.clone(),
            current: current.clone(),
        });
        let stop = CancellationToken::new();
        // The first instance registers before start returns, so a worker
        // may rely on the gateway being live once it is started.
        let first = Instance::register(&ctx, &stop).await;
        let span = info_span!("consumer", platform = %platform, consumer = %p.consumer_name);
        let task = tokio::spawn(supervise(ctx, stop.clone(), first).instrument(span));
        info!(platform = %platform, consumer = %p.consumer_name, adapter = p.adapter.kind(), "consumer started");
        Ok(Consumer {
            stats,
            stop,
            task,
            current,
            platform,
            circuit,
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
        self.load().held_count()
    }

    /// The platform's circuit (open while its credential is refused).
    pub fn circuit(&self) -> crate::circuit::Circuit {
        self.circuit.clone()
    }

    /// A handle on the running instance's load, for the gauges.
    pub fn dispatcher(&self) -> Load {
        self.load()
    }

    fn load(&self) -> Load {
        Load(self.current.clone())
    }

    /// G8: stop reading, finish in-flight work until the drain timeout,
    /// release every channel, unregister. What is left stays pending for the
    /// others, who claim it at once.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
        info!(platform = %self.platform, "consumer stopped");
    }
}

/// One registered instance and its tasks.
struct Instance {
    who: Identity,
    d: Dispatcher,
    room: Arc<Semaphore>,
}

impl Instance {
    /// Register a new instance (retrying while Redis is unreachable).
    async fn register(ctx: &Arc<Ctx>, stop: &CancellationToken) -> Option<Instance> {
        let who = Identity::new(&ctx.consumer);
        let mut delay = Duration::from_millis(50);
        loop {
            match ctx.bus.register(&who).await {
                Ok(old) => {
                    if let Some(old) = old {
                        info!(replaced = %old, "took over from an earlier instance of this consumer name");
                    }
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "could not register with Redis; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => return None,
                    }
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
        let st = &ctx.settings;
        let room = Arc::new(Semaphore::new(st.max_in_flight));
        let d = Dispatcher::new(DispatcherParts {
            bus: ctx.bus.clone(),
            adapter: ctx.adapter.clone(),
            who: who.clone(),
            settings: Settings {
                retry: RetryPolicy {
                    base: ConsumerConfig::ms(st.backoff_base_ms),
                    max: ConsumerConfig::ms(st.backoff_max_ms),
                    max_attempts: st.max_attempts,
                    max_age: ConsumerConfig::ms(st.max_age_ms),
                },
                unknown_outcome: st.unknown_outcome,
                lock_ttl: ConsumerConfig::ms(st.lock_ttl_ms),
                gap_timeout: ConsumerConfig::ms(st.gap_timeout_ms),
                dlq_maxlen: st.dlq_maxlen,
                dedup_window: ConsumerConfig::ms(st.dedup_window_ms),
                idle_release: ConsumerConfig::ms(st.idle_release_ms),
                max_in_flight: st.max_in_flight,
            },
            stats: ctx.stats.clone(),
            circuit: ctx.circuit.clone(),
            room: room.clone(),
            rules: ctx.rules.clone(),
            rpc: ctx.rpc.clone(),
        });
        // Registered means live: the lease holds from the registration on.
        d.lease()
            .renew(Instant::now(), ConsumerConfig::ms(st.lock_ttl_ms / 2));
        *ctx.current.lock().expect("current poisoned") = Some(d.clone());
        Some(Instance { who, d, room })
    }
}

async fn supervise(ctx: Arc<Ctx>, stop: CancellationToken, first: Option<Instance>) {
    let mut next = first;
    loop {
        let Some(inst) = next.take() else { return };
        let tasks_stop = CancellationToken::new();
        let live_stop = CancellationToken::new();
        let part = |stop: &CancellationToken| {
            (
                ctx.clone(),
                inst.d.clone(),
                inst.room.clone(),
                inst.who.clone(),
                stop.clone(),
            )
        };
        let (c, d, r, w, t) = part(&tasks_stop);
        let reader = tokio::spawn(read_loop(c, d, r, w, t));
        let (c, d, r, w, t) = part(&tasks_stop);
        let inbox = tokio::spawn(inbox_loop(c, d, r, w, t));
        let (c, d, r, w, t) = part(&live_stop);
        let live = tokio::spawn(liveness_loop(c, d, r, w, t));
        let lost = inst.d.lost().clone();
        tokio::select! {
            _ = stop.cancelled() => {
                tasks_stop.cancel();
                let _ = reader.await;
                let _ = inbox.await;
                // Keep beating while draining: peers must not think us dead.
                inst.d.shutdown(ConsumerConfig::ms(ctx.settings.drain_timeout_ms)).await;
                live_stop.cancel();
                let _ = live.await;
                if !inst.d.lost().is_cancelled()
                    && let Err(e) = ctx.bus.leave(&inst.who).await
                {
                    warn!(error = %e, "could not unregister; peers find this gateway dead after lock_ttl_ms");
                }
                return;
            }
            _ = lost.cancelled() => {
                crate::metrics::lock_lost(ctx.bus.keys().platform());
                error!(instance = %inst.who.instance, "this gateway was found dead by its peers (or replaced); dropping what it holds and starting over as a new instance");
                tasks_stop.cancel();
                live_stop.cancel();
                inst.d.abandon().await;
                let _ = reader.await;
                let _ = inbox.await;
                let _ = live.await;
                next = Instance::register(&ctx, &stop).await;
            }
        }
    }
}

fn arrivals(
    ctx: &Ctx,
    raw: Vec<RawEntry>,
    room: &Arc<Semaphore>,
    maybe_sent: &dyn Fn(&StreamId) -> bool,
) -> Vec<Arrival> {
    // Room for each while there is some; the rest are parked at once.
    raw.into_iter()
        .map(|r| {
            let p = room.clone().try_acquire_owned().ok();
            Arrival {
                maybe_sent: maybe_sent(&r.id),
                parsed: parse_entry(&r.fields, &ctx.rules),
                id: r.id,
                permit: p,
            }
        })
        .collect()
}

async fn read_loop(
    ctx: Arc<Ctx>,
    d: Dispatcher,
    room: Arc<Semaphore>,
    who: Identity,
    stop: CancellationToken,
) {
    // First what this consumer name left pending in an earlier life.
    recover_own(&ctx, &d, &room, &who, &stop).await;
    let block = ConsumerConfig::ms(ctx.settings.block_ms);
    let mut conn = None;
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        if !d.can_park() {
            // Busy channels have parked as many ids as we keep: read no more
            // until they catch up (memory stays bounded).
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                _ = stop.cancelled() => break,
            }
            continue;
        }
        // Wait for room, but hold none while the read blocks: a lane
        // fetching its parked entries back must not wait for an idle read.
        // A quarter of the room is left to entries peers hand over (their
        // channels are ours), so they arrive with their body.
        let reserve = if d.has_peers() {
            ctx.settings.max_in_flight / 4
        } else {
            0
        };
        let first = tokio::select! {
            p = room.clone().acquire_many_owned(reserve as u32 + 1) => p.ok(),
            _ = stop.cancelled() => None,
        };
        let Some(first) = first else { break };
        let want = (room.available_permits() + 1).min(ctx.settings.read_batch);
        drop(first);
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match ctx.bus.blocking_connection().await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    failures += 1;
                    warn!(error = %e, "cannot connect to Redis to read; retrying");
                    backoff(failures, &stop).await;
                    continue;
                }
            },
        };
        let call = ctx.bus.read(c, &who.consumer, ">", want, Some(block));
        let result = tokio::select! {
            r = tokio::time::timeout(block + Duration::from_secs(5), call) => match r {
                Ok(r) => r,
                Err(_) => Err(redis::RedisError::from((redis::ErrorKind::Io, "XREADGROUP did not answer in time"))),
            },
            _ = stop.cancelled() => break,
        };
        match result {
            Ok(entries) => {
                failures = 0;
                Stats::add(&ctx.stats.read, entries.len() as u64);
                // Room for what came; anything beyond it is parked at once.
                let batch = arrivals(&ctx, entries, &room, &|_| false);
                d.admit(batch).await;
            }
            Err(e) => {
                failures += 1;
                conn = None;
                d.suspect();
                if e.code() == Some("NOGROUP") {
                    warn!("consumer group missing (stream deleted?); creating it again");
                    let _ = ctx.bus.ensure_group().await;
                } else {
                    warn!(error = %e, "reading the stream failed; retrying");
                }
                backoff(failures, &stop).await;
            }
        }
    }
}

async fn backoff(failures: u32, stop: &CancellationToken) {
    let delay = Duration::from_millis(50 * u64::from(failures.min(40)));
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = stop.cancelled() => {}
    }
}

/// Whether entries recovered from a dead holder may have been sent: always
/// with `resend` (they are sent again under the same idempotency key),
/// exactly (from the in-flight records) with `dead_letter`.
async fn maybe_sent_of(ctx: &Ctx, ids: &[StreamId]) -> HashSet<StreamId> {
    if ctx.settings.unknown_outcome == UnknownOutcome::Resend {
        return ids.iter().cloned().collect();
    }
    let mut delay = Duration::from_millis(50);
    loop {
        match ctx.bus.were_sending(ids).await {
            Ok(v) => {
                return ids
                    .iter()
                    .zip(v)
                    .filter(|(_, s)| *s)
                    .map(|(i, _)| i.clone())
                    .collect();
            }
            Err(e) => {
                warn!(error = %e, "could not read in-flight records; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Take this consumer name's pending entries from an earlier life.
async fn recover_own(
    ctx: &Arc<Ctx>,
    d: &Dispatcher,
    room: &Arc<Semaphore>,
    who: &Identity,
    stop: &CancellationToken,
) {
    let mut conn = None;
    let mut cursor = "0".to_owned();
    let mut failures = 0;
    let mut total = 0usize;
    while !stop.is_cancelled() {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match ctx.bus.blocking_connection().await {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    failures += 1;
                    backoff(failures, stop).await;
                    continue;
                }
            },
        };
        match ctx.bus.read(c, &who.consumer, &cursor, 500, None).await {
            Ok(entries) if entries.is_empty() => break,
            Ok(entries) => {
                cursor = entries.last().map(|e| e.id.0.clone()).unwrap_or_default();
                total += entries.len();
                let (gone, present): (Vec<_>, Vec<_>) =
                    entries.into_iter().partition(|e| e.fields.is_empty());
                for g in gone {
                    lost(d, &g.id).await;
                }
                let ids: Vec<_> = present.iter().map(|e| e.id.clone()).collect();
                let maybe = maybe_sent_of(ctx, &ids).await;
                let batch = arrivals(ctx, present, room, &|id| maybe.contains(id));
                d.admit(batch).await;
            }
            Err(e) => {
                failures += 1;
                conn = None;
                warn!(error = %e, "reading this consumer's own pending entries failed; retrying");
                backoff(failures, stop).await;
            }
        }
    }
    if total > 0 {
        info!(
            entries = total,
            "took back this consumer name's pending entries from an earlier run"
        );
    }
}

async fn lost(d: &Dispatcher, id: &StreamId) {
    warn!(stream_id = %id, "pending entry deleted from the stream; dead-lettered as lost_in_stream");
    d.dead_letter_lost(id).await;
}

async fn inbox_loop(
    ctx: Arc<Ctx>,
    d: Dispatcher,
    room: Arc<Semaphore>,
    who: Identity,
    stop: CancellationToken,
) {
    let mut conn = None;
    let mut failures = 0;
    while !stop.is_cancelled() {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match ctx.bus.blocking_connection().await {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    failures += 1;
                    backoff(failures, &stop).await;
                    continue;
                }
            },
        };
        let wait = Duration::from_secs(1);
        let popped = tokio::select! {
            r = tokio::time::timeout(wait + Duration::from_secs(5), ctx.bus.inbox_pop(c, &who.consumer, wait)) => r,
            _ = stop.cancelled() => break,
        };
        let ids = match popped {
            Ok(Ok(ids)) => ids,
            Ok(Err(e)) => {
                failures += 1;
                conn = None;
                d.suspect();
                debug!(error = %e, "reading the inbox failed; retrying");
                backoff(failures, &stop).await;
                continue;
            }
            Err(_) => {
                conn = None;
                d.suspect();
                continue;
            }
        };
        failures = 0;
        if !ids.is_empty() {
            take_over(&ctx, &d, &room, &who, ids, false).await;
        }
    }
}

/// Claim `ids` for this consumer (they are pending for it or for a dead
/// one) and take them in; those gone from the stream are dead-lettered.
async fn take_over(
    ctx: &Arc<Ctx>,
    d: &Dispatcher,
    room: &Arc<Semaphore>,
    who: &Identity,
    ids: Vec<StreamId>,
    from_dead: bool,
) {
    let mut delay = Duration::from_millis(50);
    let raw = loop {
        match ctx.bus.claim(&who.consumer, &ids).await {
            Ok(r) => break r,
            Err(e) => {
                if d.lost().is_cancelled() {
                    return;
                }
                warn!(error = %e, "claiming entries failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    };
    let got: HashSet<_> = raw
        .iter()
        .filter(|r| !r.fields.is_empty())
        .map(|r| r.id.clone())
        .collect();
    for id in ids.iter().filter(|i| !got.contains(*i)) {
        match ctx.bus.exists(id).await {
            Ok(false) => lost(d, id).await,
            Ok(true) => debug!(stream_id = %id, "no longer pending; already finished"),
            Err(e) => {
                warn!(error = %e, stream_id = %id, "could not check a claimed entry; it is found again by the next sweep")
            }
        }
    }
    let present: Vec<_> = raw.into_iter().filter(|r| !r.fields.is_empty()).collect();
    if from_dead {
        Stats::add(&ctx.stats.claimed, present.len() as u64);
    }
    let maybe = if from_dead {
        let ids: Vec<_> = present.iter().map(|e| e.id.clone()).collect();
        maybe_sent_of(ctx, &ids).await
    } else {
        HashSet::new()
    };
    let batch = arrivals(ctx, present, room, &|id| maybe.contains(id));
    d.admit(batch).await;
}

/// Heartbeat; find dead nodes and claim what they (and unregistered
/// consumers) left pending.
async fn liveness_loop(
    ctx: Arc<Ctx>,
    d: Dispatcher,
    room: Arc<Semaphore>,
    who: Identity,
    stop: CancellationToken,
) {
    let ttl = ConsumerConfig::ms(ctx.settings.lock_ttl_ms);
    let every = ttl / 3;
    // consumer → (instance, beat, watched standing still since)
    let mut watch: HashMap<String, (String, String, Instant)> = HashMap::new();
    let mut last_ok: Option<Instant> = None;
    let claiming: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut last_sweep = Instant::now();
    loop {
        let sent = Instant::now();
        match tokio::time::timeout(every.max(Duration::from_millis(100)), ctx.bus.beat(&who)).await
        {
            Ok(Ok(Beat::Lost)) => {
                d.lost().cancel();
                return;
            }
            Ok(Ok(Beat::Ok {
                nodes,
                beats,
                pending,
            })) => {
                d.lease().renew(sent, ttl / 2);
                let now = Instant::now();
                // Judge only over time this node itself watched without a
                // break: a stall of ours (or of Redis) kills nobody.
                let continuous = last_ok.is_some_and(|t| sent.duration_since(t) <= ttl / 2);
                last_ok = Some(now);
                watch.retain(|c, _| nodes.contains_key(c));
                for (consumer, instance) in &nodes {
                    if *consumer == who.consumer {
                        continue;
                    }
                    let beat = beats.get(consumer).cloned().unwrap_or_default();
                    let w = watch
                        .entry(consumer.clone())
                        .or_insert_with(|| (instance.clone(), beat.clone(), now));
                    if w.0 != *instance || w.1 != beat || !continuous {
                        *w = (instance.clone(), beat.clone(), now);
                        continue;
                    }
                    if now.duration_since(w.2) >= ttl {
                        match ctx.bus.verdict(consumer, instance, &beat).await {
                            Ok(true) => {
                                warn!(dead = %consumer, instance = %instance, "gateway found dead (no heartbeat for lock_ttl_ms); taking over its entries");
                                Stats::inc(&ctx.stats.nodes_found_dead);
                                spawn_claim(&ctx, &d, &room, &who, consumer, &claiming);
                            }
                            Ok(false) => {}
                            Err(e) => warn!(error = %e, "could not record a dead gateway"),
                        }
                    }
                }
                let sweep =
                    last_sweep.elapsed() >= ConsumerConfig::ms(ctx.settings.autoclaim_interval_ms);
                for (consumer, count) in &pending {
                    if *consumer != who.consumer && *count > 0 && !nodes.contains_key(consumer) {
                        spawn_claim(&ctx, &d, &room, &who, consumer, &claiming);
                    } else if sweep && *count == 0 && !nodes.contains_key(consumer) {
                        let _ = ctx.bus.reap(consumer).await;
                    }
                }
                // Reconcile the own pending list on the interval, and at the
                // first heartbeat after a read or hand-over failed (its reply
                // may have been lost with entries in it).
                if sweep || d.take_suspect() {
                    last_sweep = Instant::now();
                    let d = d.clone();
                    tokio::spawn(async move { d.sweep_own().await });
                }
            }
            Ok(Err(e)) => {
                crate::metrics::lock_renew_failed(ctx.bus.keys().platform());
                warn!(error = %e, "heartbeat failed; sends pause once the lease runs out")
            }
            Err(_) => {
                crate::metrics::lock_renew_failed(ctx.bus.keys().platform());
                warn!("heartbeat did not answer in time; sends pause once the lease runs out")
            }
        }
        let next = every.saturating_sub(sent.elapsed());
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = stop.cancelled() => return,
        }
    }
}

fn spawn_claim(
    ctx: &Arc<Ctx>,
    d: &Dispatcher,
    room: &Arc<Semaphore>,
    who: &Identity,
    dead: &str,
    claiming: &Arc<Mutex<HashSet<String>>>,
) {
    if !claiming
        .lock()
        .expect("claiming poisoned")
        .insert(dead.to_owned())
    {
        return;
    }
    let (ctx, d, room, who, dead, claiming) = (
        ctx.clone(),
        d.clone(),
        room.clone(),
        who.clone(),
        dead.to_owned(),
        claiming.clone(),
    );
    tokio::spawn(async move {
        let mut total = 0usize;
        loop {
            if d.lost().is_cancelled() || d.stopping().is_cancelled() {
                break;
            }
            match ctx.bus.pending_of(&dead, "-", 500).await {
                Ok(ids) if ids.is_empty() => break,
                Ok(ids) => {
                    total += ids.len();
                    take_over(&ctx, &d, &room, &who, ids, true).await;
                }
                Err(e) => {
                    warn!(error = %e, "listing a dead gateway's entries failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        if total > 0 {
            info!(from = %dead, entries = total, "claimed a dead gateway's pending entries");
        }
        let _ = ctx.bus.reap(&dead).await;
        claiming.lock().expect("claiming poisoned").remove(&dead);
    });
}
