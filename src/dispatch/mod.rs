//! From an entry read (or handed over, or recovered) to a finished one.
//!
//! Entries are routed by channel: to this gateway's lane for the channel
//! when it owns it (or can take it), else handed to the live peer that owns
//! it. A lane sends its channel's entries strictly one after another in
//! `seq` order (the sequence gate runs in memory: the channel is owned across
//! consecutive messages), and every finished entry goes to the [`commit`]
//! task, which writes a whole batch of them — across channels — in one
//! script call. RPCs run beside the lanes; channel-less bad input goes
//! straight to the dead-letter stream. No Redis command is spelled here:
//! every state change goes through [`crate::bus`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info_span, warn};

use crate::adapters::SharedAdapter;
use crate::bus::{Bus, DeadRecord, Identity};
use crate::config::UnknownOutcome;
use crate::dead_letter::DeadLetterKind;
use crate::envelope::{Action, ParseRules, Parsed, StreamId, Target, parse_entry};
use crate::stats::Stats;

pub(crate) mod commit;
mod lane;
pub mod retry;

use commit::Done;
use retry::RetryPolicy;

/// An entry arriving in memory: read, handed over by a peer, or recovered
/// from a dead gateway.
#[derive(Debug)]
pub struct Arrival {
    pub id: StreamId,
    pub parsed: Parsed,
    /// Room in `max_in_flight`; None when recovery took it in without room
    /// (it is parked at once: recovery never waits behind the reader).
    pub permit: Option<OwnedSemaphorePermit>,
    /// An earlier gateway may have sent it (it died holding it).
    pub maybe_sent: bool,
}

/// How an entry is ordered and superseded (G3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Class {
    Strict,
    Typing,
    Presence,
    /// An edit of this target: a queued one is superseded by a later one.
    Edit(String),
}

/// One entry of a lane: always its id and ordering facts; its body only
/// while it holds room (a parked item is fetched again when its turn comes).
#[derive(Debug)]
pub(crate) struct Item {
    pub id: StreamId,
    pub seq: Option<u64>,
    pub class: Class,
    pub idem: String,
    /// The idempotency key came from the envelope (not derived from the id).
    pub idem_given: bool,
    pub body: Option<Box<Parsed>>,
    pub permit: Option<OwnedSemaphorePermit>,
    pub maybe_sent: bool,
    /// A de-duplication record says this key was sent (with this message id).
    pub dup: Option<String>,
}

/// Everything the consumer's engine settles per platform.
#[derive(Debug, Clone)]
pub struct Settings {
    pub retry: RetryPolicy,
    pub unknown_outcome: UnknownOutcome,
    pub lock_ttl: Duration,
    pub gap_timeout: Duration,
    pub dlq_maxlen: u64,
    pub dedup_window: Duration,
    pub idle_release: Duration,
    pub max_in_flight: usize,
}

/// This instance's own lease, as far as it knows: sends start only while
/// it is valid, so a gateway that lost touch with Redis (and may be found
/// dead by its peers) stops sending before they take over.
#[derive(Debug)]
pub(crate) struct Lease {
    base: Instant,
    until_ms: AtomicU64,
    renewed: Notify,
}

impl Lease {
    fn new() -> Lease {
        Lease {
            base: Instant::now(),
            until_ms: AtomicU64::new(0),
            renewed: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    pub(crate) fn valid(&self) -> bool {
        self.now_ms() < self.until_ms.load(AtomicOrdering::Acquire)
    }

    /// A heartbeat sent at `sent` succeeded: the lease holds until `sent + span`.
    pub(crate) fn renew(&self, sent: Instant, span: Duration) {
        let until = (sent.duration_since(self.base) + span).as_millis() as u64;
        self.until_ms.fetch_max(until, AtomicOrdering::AcqRel);
        self.renewed.notify_waiters();
    }
}

#[derive(Debug)]
pub(crate) struct LaneHandle {
    tx: mpsc::UnboundedSender<Item>,
    /// Items with a body in this lane.
    full: Arc<AtomicUsize>,
    /// The lane waits (gap, retry, a slow send): its new items are parked.
    stuck: Arc<AtomicBool>,
}

/// Everything the lanes share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub bus: Bus,
    pub adapter: SharedAdapter,
    pub who: Identity,
    pub set: Settings,
    pub stats: Arc<Stats>,
    pub rules: ParseRules,
    pub room: Arc<Semaphore>,
    /// Most items with a body one lane keeps while it flows.
    pub lane_cap: usize,
    lanes: Mutex<HashMap<String, LaneHandle>>,
    /// Channels a live peer owns (lane key → peer instance).
    peers: Mutex<HashMap<String, String>>,
    /// Ids held in memory (queued, parked, being sent).
    held: Mutex<HashSet<StreamId>>,
    /// Held entries found deleted from the stream and already dead-lettered
    /// by the sweep: their lane drops them in their place.
    vanished: Mutex<HashSet<StreamId>>,
    /// Entries whose send is on its way now (the sweep leaves them alone).
    in_send: Mutex<HashSet<StreamId>>,
    sweeping: AtomicBool,
    /// A read or hand-over reply may have been lost: reconcile soon.
    suspect: AtomicBool,
    /// Parked items (ids only); the reader pauses at `park_cap`.
    pub parked: AtomicUsize,
    pub park_cap: usize,
    pub commits: mpsc::UnboundedSender<Done>,
    pub lease: Lease,
    /// Open while the platform refuses the credential: no lane sends.
    pub circuit: crate::circuit::Circuit,
    /// This instance is no longer registered: drop everything, start over.
    pub lost: CancellationToken,
    /// Stop reading and taking new work; finish what is being sent.
    pub stopping: CancellationToken,
    /// The drain deadline passed (or the instance was lost): abandon sends.
    pub abort: CancellationToken,
    tracker: TaskTracker,
    /// Lanes and RPCs have all finished: the commit task writes what is
    /// queued and ends.
    drained: CancellationToken,
    rpc: Arc<crate::rpc::RpcServer>,
    /// One gap proof at a time (they scan the pending list and the unread tail).
    gap_proof: tokio::sync::Mutex<()>,
}

/// Routes entries to lanes; cheap to clone.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    pub(crate) shared: Arc<Shared>,
    committer: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

/// What a dispatcher needs to be built.
#[derive(Debug)]
pub struct DispatcherParts {
    pub bus: Bus,
    pub adapter: SharedAdapter,
    pub who: Identity,
    pub settings: Settings,
    pub stats: Arc<Stats>,
    pub room: Arc<Semaphore>,
    pub rules: ParseRules,
    pub rpc: Arc<crate::rpc::RpcServer>,
    /// The platform's circuit; outlives instances.
    pub circuit: crate::circuit::Circuit,
}

impl Dispatcher {
    pub fn new(p: DispatcherParts) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let max = p.settings.max_in_flight;
        let shared = Arc::new(Shared {
            bus: p.bus,
            adapter: p.adapter,
            who: p.who,
            set: p.settings,
            stats: p.stats,
            rules: p.rules,
            room: p.room,
            lane_cap: (max / 4).max(1),
            lanes: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            held: Mutex::new(HashSet::new()),
            vanished: Mutex::new(HashSet::new()),
            in_send: Mutex::new(HashSet::new()),
            sweeping: AtomicBool::new(false),
            suspect: AtomicBool::new(false),
            parked: AtomicUsize::new(0),
            park_cap: max.saturating_mul(64).max(1024),
            commits: tx,
            lease: Lease::new(),
            circuit: p.circuit,
            lost: CancellationToken::new(),
            stopping: CancellationToken::new(),
            abort: CancellationToken::new(),
            tracker: TaskTracker::new(),
            drained: CancellationToken::new(),
            rpc: p.rpc,
            gap_proof: tokio::sync::Mutex::new(()),
        });
        let committer = tokio::spawn(commit::Committer::new(shared.clone(), rx).run());
        Dispatcher {
            shared,
            committer: Arc::new(Mutex::new(Some(committer))),
        }
    }

    /// Take entries in: de-duplicate, then route each to its lane, its
    /// owner, the RPC server or the dead-letter stream.
    pub async fn admit(&self, arrivals: Vec<Arrival>) {
        let s = &self.shared;
        let fresh: Vec<Arrival> = {
            let mut held = s.held.lock().expect("held poisoned");
            arrivals
                .into_iter()
                .filter(|a| held.insert(a.id.clone()))
                .collect()
        };
        if fresh.is_empty() {
            return;
        }
        let mut items = Vec::with_capacity(fresh.len());
        for a in fresh {
            if let Some(item) = self.classify(a) {
                items.push(item);
            }
        }
        // Entries of a channel a live peer owns go to it unchecked (the
        // owner checks them); the rest are checked for duplicates here.
        let mut handoffs: HashMap<String, Vec<(String, Item)>> = HashMap::new();
        let mut local = Vec::with_capacity(items.len());
        for (key, item) in items {
            let peer = s.peers.lock().expect("peers poisoned").get(&key).cloned();
            match peer {
                Some(p) if !s.has_lane(&key) => handoffs.entry(p).or_default().push((key, item)),
                _ => local.push((key, item)),
            }
        }
        self.dedup(&mut local).await;
        for (key, item) in local {
            s.to_lane(key, item);
        }
        for (peer, group) in handoffs {
            let ids: Vec<StreamId> = group.iter().map(|(_, i)| i.id.clone()).collect();
            let moved = s
                .persist("handoff", || s.bus.handoff(&peer, &ids))
                .await
                .unwrap_or(false);
            if moved {
                Stats::add(&s.stats.handed_off, ids.len() as u64);
                for id in &ids {
                    s.forget(id);
                }
            } else {
                // The peer died: take the channels ourselves.
                let mut group = group;
                self.dedup(&mut group).await;
                for (key, item) in group {
                    s.peers.lock().expect("peers poisoned").remove(&key);
                    s.to_lane(key, item);
                }
            }
        }
    }

    /// RPC and channel-less entries are settled here; the rest become items
    /// with the lane key they belong to.
    fn classify(&self, a: Arrival) -> Option<(String, Item)> {
        let s = &self.shared;
        if let Ok(env) = &a.parsed.result
            && let Action::Rpc { .. } = env.action
        {
            let shared = s.clone();
            s.tracker.spawn(rpc(shared, a));
            return None;
        }
        let routing = &a.parsed.routing;
        let key = if routing.presence {
            PRESENCE_LANE.to_owned()
        } else if let Some(c) = &routing.channel_id {
            c.0.clone()
        } else {
            let shared = s.clone();
            s.tracker.spawn(dead_letter_unrouted(shared, a));
            return None;
        };
        let (class, idem, given) = match &a.parsed.result {
            Ok(env) => {
                let class = match &env.action {
                    Action::StartTyping | Action::StopTyping => Class::Typing,
                    Action::Presence { .. } => Class::Presence,
                    // Only edits coalesce (SPEC §1): a delete is sent as it is.
                    Action::Edit { target, .. } => Class::Edit(match target {
                        Target::MessageId(m) => format!("id:{m}"),
                        Target::Key(k) => format!("key:{k}"),
                    }),
                    _ => Class::Strict,
                };
                match env
                    .idempotency_key
                    .clone()
                    .or_else(|| env.message_key.clone())
                {
                    Some(k) => (class, k, true),
                    None => (class, self.derived_idem(&a.id), false),
                }
            }
            Err(_) => (Class::Strict, self.derived_idem(&a.id), false),
        };
        Some((
            key,
            Item {
                id: a.id,
                seq: routing.seq,
                class,
                idem,
                idem_given: given,
                body: Some(Box::new(a.parsed)),
                permit: a.permit,
                maybe_sent: a.maybe_sent,
                dup: None,
            },
        ))
    }

    fn derived_idem(&self, id: &StreamId) -> String {
        format!("{}:{}", self.shared.bus.keys().platform(), id)
    }

    /// Mark items whose idempotency key was already sent (one lookup per batch).
    async fn dedup(&self, items: &mut [(String, Item)]) {
        let s = &self.shared;
        let idx: Vec<usize> = (0..items.len())
            .filter(|i| items[*i].1.idem_given)
            .collect();
        if idx.is_empty() {
            return;
        }
        let keys: Vec<&str> = idx.iter().map(|i| items[*i].1.idem.as_str()).collect();
        let buckets = commit::lookup_buckets(s.set.dedup_window);
        let found = s
            .persist("dedup lookup", || s.bus.sent_lookup(&buckets, &keys))
            .await
            .unwrap_or_default();
        for (i, f) in idx.into_iter().zip(found) {
            items[i].1.dup = f;
        }
    }

    /// Dead-letter a pending entry that is gone from the stream (G7).
    pub async fn dead_letter_lost(&self, id: &StreamId) {
        self.shared.record_lost(id, true).await;
    }

    /// Reconcile this consumer's pending list with what it holds. G7: an
    /// entry deleted from the stream (held parked, or queued behind a slow
    /// send) is dead-lettered as `lost_in_stream` and its lane drops it in
    /// its place. An entry pending for us that we do not hold — its read or
    /// hand-over answer was lost to a timeout — is taken in again (flagged as
    /// possibly sent, as its fate is unknown).
    pub async fn sweep_own(&self) {
        let s = &self.shared;
        if s.sweeping.swap(true, AtomicOrdering::AcqRel) {
            return;
        }
        let mut start = "-".to_owned();
        let mut found = 0usize;
        while !s.stopping.is_cancelled() {
            let Ok(page) = s.bus.pending_of(&s.who.consumer, &start, 1000).await else {
                break;
            };
            let Some(last) = page.last() else { break };
            start = format!("({}", last.0);
            let ids: Vec<StreamId> = {
                let busy = s.in_send.lock().expect("in_send poisoned");
                page.iter()
                    .filter(|i| !busy.contains(*i))
                    .cloned()
                    .collect()
            };
            let Ok(fetched) = s.bus.fetch(&ids).await else {
                break;
            };
            let mut stranded = Vec::new();
            for (id, entry) in fetched {
                if s.in_send.lock().expect("in_send poisoned").contains(&id) {
                    continue;
                }
                if entry.is_some() {
                    // Pending for us, yet held nowhere: a read or hand-over
                    // whose answer was lost (a timeout, a broken connection).
                    if !s.holds(&id) {
                        stranded.push(id);
                    }
                    continue;
                }
                found += 1;
                s.vanished
                    .lock()
                    .expect("vanished poisoned")
                    .insert(id.clone());
                warn!(stream_id = %id, "pending entry deleted from the stream; dead-lettered as lost_in_stream");
                s.record_lost(&id, false).await;
                if !s.holds(&id) {
                    s.vanished.lock().expect("vanished poisoned").remove(&id);
                }
            }
            // Only entries idle that long can be stranded: one just read or
            // handed over is held within moments, and one held is held until
            // its commit has acknowledged it. The claim re-checks both at once.
            let stranded = if stranded.is_empty() {
                stranded_none()
            } else {
                match s
                    .bus
                    .claim_idle(&s.who.consumer, STRANDED_IDLE, &stranded)
                    .await
                {
                    Ok(raw) => raw
                        .into_iter()
                        .filter(|r| !r.fields.is_empty() && !s.holds(&r.id))
                        .collect(),
                    Err(_) => stranded_none(),
                }
            };
            if !stranded.is_empty() {
                warn!(
                    entries = stranded.len(),
                    "found entries pending for this gateway that it did not hold (a lost reply); taking them in again"
                );
                Stats::add(&s.stats.reclaimed, stranded.len() as u64);
                let arrivals = stranded
                    .into_iter()
                    .map(|r| Arrival {
                        parsed: parse_entry(&r.fields, &s.rules),
                        permit: s.room.clone().try_acquire_owned().ok(),
                        maybe_sent: true,
                        id: r.id,
                    })
                    .collect();
                self.admit(arrivals).await;
            }
            if page.len() < 1000 {
                break;
            }
        }
        if found > 0 {
            tracing::info!(
                lost = found,
                "sweep found pending entries deleted from the stream"
            );
        }
        s.sweeping.store(false, AtomicOrdering::Release);
    }

    /// A read or hand-over failed: its reply (with entries) may be lost.
    pub fn suspect(&self) {
        self.shared.suspect.store(true, AtomicOrdering::Release);
    }

    pub fn take_suspect(&self) -> bool {
        self.shared.suspect.swap(false, AtomicOrdering::AcqRel)
    }

    /// Whether another live gateway owns some channel this one has seen.
    pub fn has_peers(&self) -> bool {
        !self.shared.peers.lock().expect("peers poisoned").is_empty()
    }

    /// Entries held in memory right now.
    pub fn held_count(&self) -> usize {
        self.shared.held.lock().expect("held poisoned").len()
    }

    /// Channel lanes running now.
    pub fn lanes_count(&self) -> usize {
        self.shared.lanes.lock().expect("lanes poisoned").len()
    }

    /// Whether the reader may read more (parked ids below their cap).
    pub fn can_park(&self) -> bool {
        self.shared.parked.load(AtomicOrdering::Relaxed) < self.shared.park_cap
    }

    pub fn stopping(&self) -> &CancellationToken {
        &self.shared.stopping
    }

    pub fn lost(&self) -> &CancellationToken {
        &self.shared.lost
    }

    pub(crate) fn lease(&self) -> &Lease {
        &self.shared.lease
    }

    /// Stop taking work, let lanes finish until `drain`, then abandon the
    /// rest (it stays pending in Redis), commit what finished, release every
    /// channel.
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
        self.finish_commits().await;
    }

    async fn finish_commits(&self) {
        self.shared.drained.cancel();
        let handle = self.committer.lock().expect("committer poisoned").take();
        if let Some(h) = handle {
            let _ = h.await;
        }
    }

    /// Drop everything at once (the instance was lost): nothing more is
    /// sent or committed; what was held stays pending for the new owners.
    pub async fn abandon(&self) {
        let s = &self.shared;
        s.lost.cancel();
        s.stopping.cancel();
        s.abort.cancel();
        s.tracker.close();
        s.tracker.wait().await;
        self.finish_commits().await;
    }
}

/// How long an entry pending for this gateway but held nowhere must have
/// been idle before the reconciliation takes it in again.
const STRANDED_IDLE: Duration = Duration::from_secs(5);

fn stranded_none() -> Vec<crate::bus::RawEntry> {
    Vec::new()
}

/// The lane key of the platform-wide presence (presence has no channel).
pub(crate) const PRESENCE_LANE: &str = "\u{0}presence";

impl Shared {
    /// Dead-letter an entry gone from the stream, with no channel mark.
    /// `force`: write it even if it is no longer pending (its claim removed it).
    async fn record_lost(&self, id: &StreamId, force: bool) {
        Stats::inc(&self.stats.lost_in_stream);
        let mut record = lost_record(self, id, None);
        record.force = force;
        let (done, rx) = Done::dead(
            None,
            id.clone(),
            record,
            DeadLetterKind::LostInStream,
            "unknown",
        );
        if self.commits.send(done).is_ok() {
            let _ = rx.await;
        }
    }

    pub(crate) async fn tracker_idle(&self) {
        self.drained.cancelled().await
    }

    fn has_lane(&self, key: &str) -> bool {
        self.lanes.lock().expect("lanes poisoned").contains_key(key)
    }

    /// The channel state key of a lane.
    pub(crate) fn state_key(&self, key: &str) -> String {
        if key == PRESENCE_LANE {
            self.bus.keys().presence()
        } else {
            self.bus.keys().channel(key)
        }
    }

    /// Hand an item to its lane (started if needed). A lane that waits, or
    /// holds its share of room already, gets the item parked.
    fn to_lane(self: &Arc<Self>, key: String, mut item: Item) {
        let mut lanes = self.lanes.lock().expect("lanes poisoned");
        if let Some(lane) = lanes.get(&key) {
            if item.body.is_some()
                && (item.permit.is_none()
                    || lane.stuck.load(AtomicOrdering::Relaxed)
                    || lane.full.load(AtomicOrdering::Relaxed) >= self.lane_cap)
            {
                self.park(&mut item);
            }
            if item.body.is_some() {
                lane.full.fetch_add(1, AtomicOrdering::Relaxed);
            }
            match lane.tx.send(item) {
                Ok(()) => return,
                Err(mpsc::error::SendError(back)) => {
                    // The lane is leaving; start a new one below.
                    if back.body.is_some() {
                        lane.full.fetch_sub(1, AtomicOrdering::Relaxed);
                    }
                    item = back;
                }
            }
        }
        if item.body.is_some() && item.permit.is_none() {
            self.park(&mut item);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let full = Arc::new(AtomicUsize::new(usize::from(item.body.is_some())));
        let stuck = Arc::new(AtomicBool::new(false));
        tx.send(item).expect("receiver alive");
        lanes.insert(
            key.clone(),
            LaneHandle {
                tx,
                full: full.clone(),
                stuck: stuck.clone(),
            },
        );
        drop(lanes);
        let shared = self.clone();
        self.tracker
            .spawn(lane::Lane::new(shared, key, rx, full, stuck).run());
    }

    /// Drop an item's body and room: it stays pending for us, fetched again
    /// when its turn comes.
    pub(crate) fn park(&self, item: &mut Item) {
        if item.body.take().is_some() {
            item.permit = None;
            self.parked.fetch_add(1, AtomicOrdering::Relaxed);
        }
    }

    /// An item fetched back from Redis.
    pub(crate) fn unpark(&self) {
        self.parked.fetch_sub(1, AtomicOrdering::Relaxed);
    }

    pub(crate) fn forget(&self, id: &StreamId) {
        self.held.lock().expect("held poisoned").remove(id);
    }

    /// Whether the sweep already dead-lettered this held entry (and forget that).
    pub(crate) fn take_lost(&self, id: &StreamId) -> bool {
        self.vanished.lock().expect("vanished poisoned").remove(id)
    }

    pub(crate) fn sending(&self, id: &StreamId, on: bool) {
        let mut busy = self.in_send.lock().expect("in_send poisoned");
        if on {
            busy.insert(id.clone());
        } else {
            busy.remove(id);
        }
    }

    pub(crate) fn holds(&self, id: &StreamId) -> bool {
        self.held.lock().expect("held poisoned").contains(id)
    }

    pub(crate) fn set_peer(&self, key: &str, peer: Option<String>) {
        let mut peers = self.peers.lock().expect("peers poisoned");
        match peer {
            Some(p) => peers.insert(key.to_owned(), p),
            None => peers.remove(key),
        };
    }

    /// Remove a lane from the map, unless items reached it meanwhile (then
    /// they are returned and the lane carries on).
    pub(crate) fn leave_lane(
        &self,
        key: &str,
        rx: &mut mpsc::UnboundedReceiver<Item>,
    ) -> Vec<Item> {
        let mut lanes = self.lanes.lock().expect("lanes poisoned");
        let mut late = Vec::new();
        while let Ok(i) = rx.try_recv() {
            late.push(i);
        }
        if late.is_empty() {
            lanes.remove(key);
        }
        late
    }

    /// Retry a Redis step until it succeeds or the work is abandoned.
    pub(crate) async fn persist<T, F, Fut>(&self, what: &str, mut f: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let mut delay = Duration::from_millis(20);
        loop {
            match f().await {
                Ok(v) => return Some(v),
                Err(e) => {
                    warn!(error = %e, step = what, "redis step failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.abort.cancelled() => return None,
                    }
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Wait until this instance's lease is valid (false: the work is abandoned).
    pub(crate) async fn wait_lease(&self) -> bool {
        loop {
            if self.lease.valid() {
                return true;
            }
            let renewed = self.lease.renewed.notified();
            tokio::select! {
                _ = renewed => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = self.abort.cancelled() => return false,
            }
        }
    }

    /// G3: whether an entry of lane `key` numbered `from..=to` exists
    /// anywhere — unread in the stream, or pending on any consumer (dead or
    /// alive) and not held here. Only when none does may the gap be
    /// skipped. Entries move from the unread tail to the pending list and
    /// never back, so the tail is scanned first. Answers true (wait longer)
    /// when the proof cannot be made (an unread tail too long to scan).
    pub(crate) async fn predecessor_exists(&self, key: &str, from: u64, to: u64) -> Option<bool> {
        let _one = self.gap_proof.lock().await;
        let matches = |p: &Parsed| {
            let r = &p.routing;
            let same = if key == PRESENCE_LANE {
                r.presence
            } else {
                r.channel_id.as_ref().is_some_and(|c| c.0 == key)
            };
            same && r.seq.is_some_and(|s| (from..=to).contains(&s))
        };
        let last = self
            .persist("gap proof", || self.bus.last_delivered())
            .await?;
        let last = last.unwrap_or_else(|| "0-0".into());
        const TAIL: usize = 10_000;
        let tail = self
            .persist("gap proof", || self.bus.range_after(&last, TAIL + 1))
            .await?;
        if tail.len() > TAIL {
            return Some(true);
        }
        if tail
            .iter()
            .any(|e| matches(&parse_entry(&e.fields, &self.rules)))
        {
            return Some(true);
        }
        let mut start = "-".to_owned();
        loop {
            let page = self
                .persist("gap proof", || self.bus.pending_page(&start, 1000))
                .await?;
            let Some((last_id, _)) = page.last() else {
                break;
            };
            start = format!("({}", last_id.0);
            let others: Vec<StreamId> = page
                .iter()
                .map(|(id, _)| id.clone())
                .filter(|id| !self.holds(id))
                .collect();
            let fetched = self
                .persist("gap proof", || self.bus.fetch(&others))
                .await?;
            let found = fetched.iter().any(|(_, e)| {
                e.as_ref()
                    .is_some_and(|e| matches(&parse_entry(&e.fields, &self.rules)))
            });
            if found {
                return Some(true);
            }
            if page.len() < 1000 {
                break;
            }
        }
        Some(false)
    }
}

/// An entry with no channel that is bad input: dead-letter it, no lane needed.
async fn dead_letter_unrouted(s: Arc<Shared>, a: Arrival) {
    let (kind, error) = match &a.parsed.result {
        Err(b) => (DeadLetterKind::BadInput(b.kind), b.detail.clone()),
        Ok(env) => (
            DeadLetterKind::BadInput(crate::envelope::BadInputKind::MissingField),
            format!(
                "a `{}` envelope needs the field `channel_id`",
                env.action.type_name()
            ),
        ),
    };
    warn!(stream_id = %a.id, kind = %kind, error = %error, "bad input dead-lettered");
    let record = commit::dead_record(&s, &a.id, &a.parsed, kind, &error, 0);
    let ty = crate::metrics::type_of(&a.parsed);
    let (done, rx) = Done::dead(None, a.id.clone(), record, kind, ty);
    if s.commits.send(done).is_ok() {
        let _ = rx.await;
    }
    s.forget(&a.id);
}

/// Answer one RPC request (G9). Acknowledged only once its reply is
/// written; a reply that cannot be written is dead-lettered with the reason.
async fn rpc(s: Arc<Shared>, a: Arrival) {
    let Ok(env) = &a.parsed.result else {
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
    let platform = s.bus.keys().platform().to_owned();
    let span = info_span!("rpc", platform = %platform, method = %method, stream_id = %a.id);
    async {
        if let Some(deadline) = deadline_ms
            && crate::now_ms() > *deadline
        {
            warn!("rpc request past its deadline dropped");
            if s.persist("ack", || s.bus.ack(&a.id)).await.is_some() {
                Stats::inc(&s.stats.rpc_expired);
                crate::metrics::finished(&platform, &a.parsed, "skipped", None);
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
        let mut delay = Duration::from_millis(20);
        loop {
            match s.bus.rpc_reply(&a.id, reply_key, &reply).await {
                Ok(()) => {
                    Stats::inc(&s.stats.rpc_answered);
                    crate::metrics::finished(&platform, &a.parsed, "delivered", None);
                    return;
                }
                Err(e) if is_permanent(&e) => {
                    let error = format!("the reply could not be written to `{reply_key}`: {e}");
                    warn!(%error, "rpc reply failed; dead-lettered");
                    let kind = DeadLetterKind::ReplyFailed;
                    let record = commit::dead_record(&s, &a.id, &a.parsed, kind, &error, 1);
                    let (done, rx) = Done::dead(None, a.id.clone(), record, kind, "rpc_request");
                    if s.commits.send(done).is_ok() {
                        let _ = rx.await;
                    }
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "rpc reply failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = s.abort.cancelled() => return,
                    }
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
    .instrument(span)
    .await;
    s.forget(&a.id);
}

/// A Redis error that retrying cannot mend (a key of the wrong type, a
/// refused command), as opposed to a connection that failed.
pub(crate) fn is_permanent(e: &redis::RedisError) -> bool {
    !(crate::bus::transient(e) || e.code() == Some("NOSCRIPT"))
}

/// The dead letter for an entry whose id is pending but gone from the stream.
pub(crate) fn lost_record(s: &Shared, id: &StreamId, channel: Option<&str>) -> DeadRecord {
    let mut fields: Vec<(&'static str, Vec<u8>)> = vec![
        ("payload", Vec::new()),
        (
            "error",
            b"the entry was pending but had been deleted from the stream (trimmed or XDEL'd) before it was delivered".to_vec(),
        ),
        ("error_kind", DeadLetterKind::LostInStream.as_str().as_bytes().to_vec()),
        ("attempts", b"0".to_vec()),
        ("original_id", id.0.as_bytes().to_vec()),
        ("consumer", s.who.consumer.as_bytes().to_vec()),
        ("failed_ms", crate::now_ms().to_string().into_bytes()),
    ];
    if let Some(c) = channel {
        fields.push(("channel_id", c.as_bytes().to_vec()));
    }
    DeadRecord {
        id: id.clone(),
        force: true,
        fields,
    }
}
