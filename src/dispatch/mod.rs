//! From a parsed entry to a finished one: entries are routed to per-channel
//! lanes (one channel strictly one at a time, other channels in parallel),
//! RPCs run beside the lanes, and channel-less bad input goes straight to the
//! dead-letter stream. No Redis command is spelled here: every state change
//! goes through [`crate::bus`]; no platform is spoken to but through the
//! adapter.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info_span, warn};

use crate::adapters::SharedAdapter;
use crate::bus::{Bus, DeadLetter, Identity, Timing};
use crate::config::UnknownOutcome;
use crate::envelope::{Action, ParseRules, Parsed, StreamId};
use crate::stats::Stats;

mod lane;
pub mod retry;

use retry::RetryPolicy;

/// An entry held in memory, with the permit that bounds how many there are.
#[derive(Debug)]
pub struct Entry {
    pub id: StreamId,
    pub parsed: Parsed,
    pub permit: OwnedSemaphorePermit,
}

/// What a lane is handed: an entry to hold, or only the id of one it must
/// fetch again later (the channel already holds its share of memory).
#[derive(Debug)]
pub(crate) enum LaneMsg {
    Entry(Box<Entry>),
    Parked(Parked),
}

/// An entry left in Redis (pending for this gateway, kept fresh) while its
/// channel is busy, so one slow channel cannot take all of `max_in_flight`.
#[derive(Debug)]
pub(crate) struct Parked {
    pub id: StreamId,
    /// Counts against the parking capacity; the reader pauses while none is left.
    pub _slot: Option<OwnedSemaphorePermit>,
}

#[derive(Debug)]
struct LaneHandle {
    tx: mpsc::UnboundedSender<LaneMsg>,
    /// Entries the lane holds in memory.
    load: Arc<AtomicUsize>,
    /// Entries the lane has parked. While there are any, every later entry
    /// is parked too, so the lane sees its entries in arrival order.
    parked: Arc<AtomicUsize>,
}

/// Everything the lanes share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub bus: Bus,
    pub adapter: SharedAdapter,
    pub who: Identity,
    pub timing: Timing,
    pub retry: RetryPolicy,
    pub unknown_outcome: UnknownOutcome,
    pub stats: Arc<Stats>,
    lanes: Mutex<HashMap<String, LaneHandle>>,
    /// Most entries one lane holds in memory; the rest of its entries are parked.
    pub lane_cap: usize,
    /// Permits for entries in memory (`max_in_flight`).
    pub room: Arc<Semaphore>,
    /// Permits for parked ids; when none is left the reader pauses.
    park_room: Arc<Semaphore>,
    pub rules: ParseRules,
    rpc: Arc<crate::rpc::RpcServer>,
    /// Ids held in memory, with when they were last claimed or kept fresh.
    held: Mutex<HashMap<StreamId, Instant>>,
    /// Lanes waiting on their channel (lock or predecessor), by channel state
    /// key: woken when a commit elsewhere publishes on that key.
    wakers: Mutex<HashMap<String, Arc<tokio::sync::Notify>>>,
    /// Ids abandoned at shutdown, to be marked idle for the other gateways.
    handed_off: Mutex<Vec<StreamId>>,
    /// The idle time given to handed-off entries (`autoclaim_min_idle_ms`),
    /// so the next sweep elsewhere takes them at once.
    handoff_idle: Duration,
    tracker: TaskTracker,
    /// Stop reading and stop waiting; finish what can be sent now.
    pub stopping: CancellationToken,
    /// The drain deadline passed: abandon sends in progress.
    pub abort: CancellationToken,
}

/// Routes entries to lanes; cheap to clone.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    pub(crate) shared: Arc<Shared>,
}

/// What a dispatcher needs to be built.
#[derive(Debug)]
pub struct DispatcherParts {
    pub bus: Bus,
    pub adapter: SharedAdapter,
    pub who: Identity,
    pub timing: Timing,
    pub retry: RetryPolicy,
    pub unknown_outcome: UnknownOutcome,
    pub stats: Arc<Stats>,
    pub room: Arc<Semaphore>,
    pub max_in_flight: usize,
    pub rules: ParseRules,
    pub handoff_idle: Duration,
    pub rpc: Arc<crate::rpc::RpcServer>,
}

impl Dispatcher {
    pub fn new(p: DispatcherParts) -> Self {
        Dispatcher {
            shared: Arc::new(Shared {
                bus: p.bus,
                adapter: p.adapter,
                who: p.who,
                timing: p.timing,
                retry: p.retry,
                unknown_outcome: p.unknown_outcome,
                stats: p.stats,
                lanes: Mutex::new(HashMap::new()),
                lane_cap: (p.max_in_flight / 4).max(1),
                room: p.room,
                park_room: Arc::new(Semaphore::new(p.max_in_flight.saturating_mul(64))),
                rules: p.rules,
                held: Mutex::new(HashMap::new()),
                handed_off: Mutex::new(Vec::new()),
                wakers: Mutex::new(HashMap::new()),
                handoff_idle: p.handoff_idle,
                rpc: p.rpc,
                tracker: TaskTracker::new(),
                stopping: CancellationToken::new(),
                abort: CancellationToken::new(),
            }),
        }
    }

    /// Take an entry in. One already held (say, claimed back by our own sweep)
    /// is ignored: the copy in memory stays in charge.
    pub fn submit(&self, entry: Entry) {
        let s = &self.shared;
        {
            let mut held = s.held.lock().expect("held map poisoned");
            if held.contains_key(&entry.id) {
                return;
            }
            held.insert(entry.id.clone(), Instant::now());
        }
        if let Ok(env) = &entry.parsed.result
            && let Action::Rpc { .. } = env.action
        {
            let shared = s.clone();
            s.tracker.spawn(rpc(shared, entry));
            return;
        }
        let routing = &entry.parsed.routing;
        let lane = if routing.presence {
            Some(("\u{0}presence".to_owned(), s.bus.keys().presence()))
        } else {
            routing
                .channel_id
                .as_ref()
                .map(|c| (c.0.clone(), s.bus.keys().channel(&c.0)))
        };
        match lane {
            Some((key, state)) => self.to_lane(key, state, entry),
            None => {
                let shared = s.clone();
                s.tracker.spawn(dead_letter_unrouted(shared, entry));
            }
        }
    }

    fn to_lane(&self, key: String, state: String, entry: Entry) {
        let s = &self.shared;
        let mut lanes = s.lanes.lock().expect("lane map poisoned");
        let entry = match lanes.get(&key) {
            Some(lane) => {
                let msg = if lane.load.load(AtomicOrdering::Relaxed) >= s.lane_cap
                    || lane.parked.load(AtomicOrdering::Relaxed) > 0
                {
                    // Dropping the entry gives its room back to the reader.
                    lane.parked.fetch_add(1, AtomicOrdering::Relaxed);
                    LaneMsg::Parked(Parked {
                        id: entry.id,
                        _slot: s.park_room.clone().try_acquire_owned().ok(),
                    })
                } else {
                    lane.load.fetch_add(1, AtomicOrdering::Relaxed);
                    LaneMsg::Entry(Box::new(entry))
                };
                match lane.tx.send(msg) {
                    Ok(()) => return,
                    Err(mpsc::error::SendError(LaneMsg::Entry(e))) => {
                        lane.load.fetch_sub(1, AtomicOrdering::Relaxed);
                        *e
                    }
                    Err(mpsc::error::SendError(LaneMsg::Parked(p))) => {
                        lane.parked.fetch_sub(1, AtomicOrdering::Relaxed);
                        // The lane is gone: nothing holds this id any more.
                        // It stays pending for us and comes back with a sweep.
                        drop(lanes);
                        self.shared.forget(&p.id);
                        return;
                    }
                }
            }
            None => entry,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let load = Arc::new(AtomicUsize::new(1));
        let parked = Arc::new(AtomicUsize::new(0));
        tx.send(LaneMsg::Entry(Box::new(entry)))
            .expect("receiver is alive");
        lanes.insert(
            key.clone(),
            LaneHandle {
                tx,
                load: load.clone(),
                parked: parked.clone(),
            },
        );
        let shared = s.clone();
        s.tracker
            .spawn(lane::Lane::new(shared, key, state, rx, load, parked).run());
    }

    /// Ids held in memory that were last refreshed longer than `older` ago;
    /// marks them fresh now.
    pub fn take_stale_held(&self, older: Duration) -> Vec<StreamId> {
        let now = Instant::now();
        let mut held = self.shared.held.lock().expect("held map poisoned");
        held.iter_mut()
            .filter(|(_, t)| now.duration_since(**t) >= older)
            .map(|(id, t)| {
                *t = now;
                id.clone()
            })
            .collect()
    }

    /// A commit on channel state `chan` was published: wake its waiting lane.
    pub fn wake(&self, chan: &str) {
        if let Some(n) = self
            .shared
            .wakers
            .lock()
            .expect("wakers poisoned")
            .get(chan)
        {
            n.notify_one();
        }
    }

    /// Channels with a lane right now.
    pub fn lane_count(&self) -> usize {
        self.shared.lanes.lock().expect("lane map poisoned").len()
    }

    /// Whether parking has room left; the reader pauses while it has none.
    pub fn can_park(&self) -> bool {
        self.shared.park_room.available_permits() > 0
    }

    pub fn held_count(&self) -> usize {
        self.shared.held.lock().expect("held map poisoned").len()
    }

    /// Channel lanes running now.
    pub fn lanes_count(&self) -> usize {
        self.shared.lanes.lock().expect("lane map poisoned").len()
    }

    pub fn stopping(&self) -> &CancellationToken {
        &self.shared.stopping
    }

    /// Stop taking work, let lanes finish until `drain`, then abandon the rest
    /// (it stays pending in Redis) and release every lock.
    pub async fn shutdown(&self, drain: Duration) {
        let s = &self.shared;
        s.stopping.cancel();
        s.tracker.close();
        if tokio::time::timeout(drain, s.tracker.wait()).await.is_err() {
            warn!(
                held = self.held_count(),
                "drain timeout reached; unfinished entries stay pending for other gateways"
            );
            s.abort.cancel();
            s.tracker.wait().await;
        }
        let ids = std::mem::take(&mut *s.handed_off.lock().expect("handoff poisoned"));
        if !ids.is_empty() {
            for chunk in ids.chunks(500) {
                if let Err(e) = s.bus.hand_off(&s.who.consumer, chunk, s.handoff_idle).await {
                    warn!(error = %e, "could not mark unfinished entries for takeover; they are claimed once idle");
                }
            }
            tracing::info!(
                entries = ids.len(),
                "unfinished entries handed off to the other gateways"
            );
        }
    }
}

impl Shared {
    /// The wake-up a lane on channel state `chan` waits on.
    pub(crate) fn waker(&self, chan: &str) -> Arc<tokio::sync::Notify> {
        self.wakers
            .lock()
            .expect("wakers poisoned")
            .entry(chan.to_owned())
            .or_default()
            .clone()
    }

    pub(crate) fn drop_waker(&self, chan: &str) {
        self.wakers.lock().expect("wakers poisoned").remove(chan);
    }

    pub(crate) fn hand_off(&self, ids: Vec<StreamId>) {
        if !ids.is_empty() {
            self.handed_off
                .lock()
                .expect("handoff poisoned")
                .extend(ids);
        }
    }

    pub(crate) fn forget(&self, id: &StreamId) {
        self.held.lock().expect("held map poisoned").remove(id);
    }

    /// Retry a Redis step until it succeeds or the drain deadline passes.
    pub(crate) async fn persist<T, F, Fut>(&self, what: &str, mut f: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let mut delay = Duration::from_millis(50);
        loop {
            match f().await {
                Ok(v) => return Some(v),
                Err(e) => {
                    warn!(error = %e, step = what, "redis step failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.abort.cancelled() => return None,
                    }
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// An entry with no channel that is bad input: dead-letter it, no lock needed.
async fn dead_letter_unrouted(s: Arc<Shared>, entry: Entry) {
    let bad = match &entry.parsed.result {
        Err(b) => (b.kind.as_str(), b.detail.clone()),
        Ok(env) => (
            "missing_field",
            format!(
                "a `{}` envelope needs the field `channel_id`",
                env.action.type_name()
            ),
        ),
    };
    warn!(stream_id = %entry.id, kind = bad.0, error = %bad.1, "bad input dead-lettered");
    let done = s
        .persist("dead_letter", || {
            s.bus.dead_letter(
                &s.who,
                s.timing,
                None,
                &entry.id,
                None,
                false,
                DeadLetter {
                    payload: &entry.parsed.payload,
                    error: &bad.1,
                    error_kind: bad.0,
                    attempts: 0,
                    consumer: &s.who.consumer,
                    channel_id: None,
                },
            )
        })
        .await;
    if done.is_some() {
        Stats::inc(&s.stats.dead_lettered);
        crate::metrics::finished(
            s.bus.keys().platform(),
            &entry.parsed,
            "dead_lettered",
            Some(bad.0),
        );
    }
    s.forget(&entry.id);
}

/// Answer one RPC request (G9). RPCs never wait behind a channel's sends.
async fn rpc(s: Arc<Shared>, entry: Entry) {
    let Ok(env) = &entry.parsed.result else {
        return;
    };
    let Action::Rpc {
        method,
        args,
        reply_key,
        deadline_ms,
    } = &env.action
    else {
        return;
    };
    let span = info_span!("rpc", platform = s.bus.keys().platform(), method = %method, stream_id = %entry.id);
    async {
        if let Some(deadline) = deadline_ms
            && crate::now_ms() > *deadline
        {
            warn!("rpc request past its deadline dropped");
            if s.persist("ack", || s.bus.ack(&entry.id)).await.is_some() {
                Stats::inc(&s.stats.rpc_expired);
                crate::metrics::finished(s.bus.keys().platform(), &entry.parsed, "skipped", None);
            }
            return;
        }
        let channel = env.channel_id.as_ref().map(|c| c.0.as_str());
        let reply = match s.rpc.answer(method, args, channel).await {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "rpc answered with an error");
                serde_json::json!({ "error": e })
            }
        };
        let reply = reply.to_string();
        if s.persist("rpc_reply", || {
            s.bus.rpc_reply(&entry.id, reply_key, &reply)
        })
        .await
        .is_some()
        {
            Stats::inc(&s.stats.rpc_answered);
            crate::metrics::finished(s.bus.keys().platform(), &entry.parsed, "delivered", None);
        }
    }
    .instrument(span)
    .await;
    s.forget(&entry.id);
}
