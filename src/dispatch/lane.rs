//! One channel's lane: its entries strictly one after another, in `seq`
//! order (stream order for entries without one), while this gateway owns
//! the channel.
//!
//! The lane takes the channel once (its fencing token grows on every change
//! of owner) and keeps it across consecutive messages; the delivered mark
//! lives in memory and moves with each finished entry, which goes to the
//! commit task. A send waits until every earlier commit of its channel has
//! landed (so a crash leaves at most one entry of a channel possibly sent,
//! and nothing later went out before it); outcomes that need no send run
//! ahead by at most [`UNCOMMITTED`]. A
//! channel a live peer owns is handed to it. Failures are retried here,
//! with backoff; what cannot be delivered is dead-lettered in its place,
//! which releases its successors at once. While the lane waits (a gap, a
//! retry, a slow send) its queued entries give their room back and are
//! fetched again when their turn comes.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, debug, info_span, warn};

use super::commit::{Done, End, dead_record, lookup_buckets};
use super::{Class, Item, Shared, lost_record};
use crate::adapters::{Delivery, Retry};
use crate::bus::Acquire;
use crate::config::UnknownOutcome;
use crate::dead_letter::DeadLetterKind;
use crate::envelope::{Action, Envelope, Target, parse_entry};
use crate::stats::Stats;

/// Most finished entries of one channel whose commit has not landed yet.
/// Only outcomes that need no send (duplicates, expiries, dead letters)
/// pile up here: a send waits until every earlier commit of its channel has
/// landed, so a crash leaves at most one entry per channel possibly sent.
const UNCOMMITTED: usize = 32;

/// Keys a lane remembers having sent beyond what it queues with bodies
/// (`lane_cap`) and what may be uncommitted.
const RECENT_SLACK: usize = 32;

/// A bounded map that forgets its oldest keys.
struct Recent {
    map: HashMap<String, String>,
    order: VecDeque<String>,
    cap: usize,
}

impl Recent {
    fn new(cap: usize) -> Recent {
        Recent {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    fn get(&self, k: &str) -> Option<&String> {
        self.map.get(k)
    }

    fn insert(&mut self, k: String, v: String) {
        if self.map.insert(k.clone(), v).is_none() {
            self.order.push_back(k);
            while self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }
}

/// A gap shorter than this keeps the queue's room (see `wait_gap`).
const SHORT_GAP: Duration = Duration::from_millis(250);

/// A send running longer than this makes the lane give its queue's room back.
const SLOW_SEND: Duration = Duration::from_millis(250);

/// How an entry ended.
#[derive(Debug)]
enum Outcome {
    Delivered(Option<String>),
    /// Acknowledged unsent (duplicate, expired, superseded, coalesced, unsupported).
    Skipped,
    Dead {
        kind: DeadLetterKind,
        error: String,
        attempts: u32,
    },
}

pub(super) struct Lane {
    s: Arc<Shared>,
    key: String,
    /// The channel state key.
    chan: String,
    rx: mpsc::UnboundedReceiver<Item>,
    queue: VecDeque<Item>,
    /// Items with a body (shared with the dispatcher, which parks beyond a cap).
    full: Arc<AtomicUsize>,
    stuck: Arc<AtomicBool>,
    /// The delivered mark while the channel is ours.
    done: Option<u64>,
    /// The predecessors below this seq were proven absent: skip to it.
    skip_to: Option<u64>,
    /// The seq waited for, and when to check on it next.
    gap: Option<(u64, Instant)>,
    /// When the wait began (Unix ms), and whether it was noted for `status`.
    gap_began: Option<(u64, Instant, bool)>,
    commits: VecDeque<oneshot::Receiver<bool>>,
    /// Platform ids of messages this lane sent lately (message_key → id), for edits.
    sent_ids: Recent,
    /// Idempotency keys this lane sent lately: entries queued with their body
    /// were checked against the de-duplication records when they were read,
    /// so the keys sent since must be known here (parked ones are checked
    /// again when fetched back).
    sent_idems: Recent,
}

enum Step {
    Go,
    /// The lane is done (handed off, abandoned or lost).
    Leave,
}

impl Lane {
    pub(super) fn new(
        s: Arc<Shared>,
        key: String,
        rx: mpsc::UnboundedReceiver<Item>,
        full: Arc<AtomicUsize>,
        stuck: Arc<AtomicBool>,
    ) -> Self {
        let chan = s.state_key(&key);
        let recent = s.lane_cap + UNCOMMITTED + RECENT_SLACK;
        Lane {
            s,
            key,
            chan,
            rx,
            queue: VecDeque::new(),
            full,
            stuck,
            done: None,
            skip_to: None,
            gap: None,
            gap_began: None,
            commits: VecDeque::new(),
            sent_ids: Recent::new(recent),
            sent_idems: Recent::new(recent),
        }
    }

    /// Put an arriving item in place: by seq among numbered ones, else last.
    fn insert(&mut self, item: Item) {
        if let Some(seq) = item.seq {
            let pos = self
                .queue
                .iter()
                .position(|q| q.seq.is_some_and(|s| s > seq));
            if let Some(i) = pos {
                self.queue.insert(i, item);
                return;
            }
        }
        self.queue.push_back(item);
    }

    fn pull(&mut self) {
        while let Ok(i) = self.rx.try_recv() {
            self.insert(i);
        }
    }

    pub(super) async fn run(mut self) {
        let span = info_span!("lane", platform = self.s.bus.keys().platform(), channel = %self.key);
        async {
            self.main().await;
            self.drop_all();
        }
        .instrument(span)
        .await
    }

    async fn main(&mut self) {
        loop {
            self.pull();
            if self.s.abort.is_cancelled() {
                self.leave_now();
                return;
            }
            if self.queue.is_empty() || self.s.stopping.is_cancelled() {
                if !self.s.stopping.is_cancelled() {
                    if !self.settle().await {
                        self.leave_now();
                        return;
                    }
                    tokio::select! {
                        m = self.rx.recv() => if let Some(i) = m {
                            self.insert(i);
                            continue;
                        },
                        _ = tokio::time::sleep(self.s.set.idle_release) => {}
                        _ = self.s.stopping.cancelled() => {}
                    }
                }
                // Leave, unless entries reached us meanwhile (and we may take them).
                let late = self.s.leave_lane(&self.key, &mut self.rx);
                if late.is_empty() {
                    self.settle().await;
                    self.release().await;
                    return;
                }
                for i in late {
                    self.insert(i);
                }
                if self.s.stopping.is_cancelled() {
                    continue;
                }
            }
            if self.done.is_none() {
                match self.acquire().await {
                    Step::Go => continue,
                    Step::Leave => return,
                }
            }
            match self.step().await {
                Step::Go => {}
                Step::Leave => {
                    self.leave_now();
                    return;
                }
            }
        }
    }

    /// Leave the lane map at once (abandoned or lost): new items for the
    /// channel start a new lane.
    fn leave_now(&mut self) {
        loop {
            let late = self.s.leave_lane(&self.key, &mut self.rx);
            if late.is_empty() {
                return;
            }
            for i in late {
                self.insert(i);
            }
        }
    }

    /// Forget every item still held: it stays pending in Redis.
    fn drop_all(&mut self) {
        for item in self.queue.drain(..) {
            self.s.forget(&item.id);
            if item.body.is_some() {
                self.full.fetch_sub(1, AtomicOrdering::Relaxed);
            } else {
                self.s.unpark();
            }
        }
    }

    /// Wait for every commit of this lane; false when one was refused.
    async fn settle(&mut self) -> bool {
        while let Some(rx) = self.commits.pop_front() {
            if !rx.await.unwrap_or(false) {
                return false;
            }
        }
        true
    }

    async fn release(&mut self) {
        if self.done.take().is_some() && !self.s.lost.is_cancelled() {
            let s = &self.s;
            if let Err(e) = s.bus.release(&s.who, &self.chan).await {
                debug!(error = %e, "could not give the channel up; it passes on once this gateway is gone");
            }
        }
    }

    /// Take the channel, or hand its entries to the live peer that owns it.
    async fn acquire(&mut self) -> Step {
        let s = self.s.clone();
        let Some(answer) = s
            .persist("acquire", || s.bus.acquire(&s.who, &self.chan))
            .await
        else {
            self.leave_now();
            return Step::Leave;
        };
        match answer {
            Acquire::Mine { done, .. } => {
                Stats::inc(&s.stats.channels_taken);
                s.set_peer(&self.key, None);
                self.done = Some(done);
                Step::Go
            }
            Acquire::Lost => {
                s.lost.cancel();
                self.leave_now();
                Step::Leave
            }
            Acquire::Peer(peer) => {
                s.set_peer(&self.key, Some(peer.clone()));
                self.leave_now();
                let items: Vec<Item> = self.queue.drain(..).collect();
                let ids: Vec<_> = items.iter().map(|i| i.id.clone()).collect();
                let moved = s
                    .persist("handoff", || s.bus.handoff(&peer, &ids))
                    .await
                    .unwrap_or(false);
                if moved {
                    debug!(entries = ids.len(), peer = %peer, "handed to the channel's owner");
                    Stats::add(&s.stats.handed_off, ids.len() as u64);
                    for item in items {
                        self.s.forget(&item.id);
                        if item.body.is_some() {
                            self.full.fetch_sub(1, AtomicOrdering::Relaxed);
                        } else {
                            self.s.unpark();
                        }
                    }
                } else {
                    // The peer died meanwhile: a new lane takes the channel.
                    s.set_peer(&self.key, None);
                    for item in items {
                        if item.body.is_some() {
                            self.full.fetch_sub(1, AtomicOrdering::Relaxed);
                        }
                        s.to_lane(self.key.clone(), item);
                    }
                }
                Step::Leave
            }
        }
    }

    /// Give the room of every queued item back (the lane waits).
    fn park_all(&mut self) {
        for item in self.queue.iter_mut() {
            if item.body.is_some() {
                self.s.park(item);
                self.full.fetch_sub(1, AtomicOrdering::Relaxed);
            }
        }
    }

    /// Work on the front item.
    async fn step(&mut self) -> Step {
        let done = self.done.unwrap_or(0);
        let front_seq = self.queue[0].seq;
        if let Some(seq) = front_seq
            && seq > done + 1
            && self.skip_to != Some(seq - 1)
        {
            return self.wait_gap(done, seq).await;
        }
        self.gap = None;
        self.gap_over().await;
        if self.s.take_lost(&self.queue[0].id) {
            let item = self.queue.pop_front().expect("front");
            self.lost_in_place(item, true).await;
            return Step::Go;
        }
        if self.queue[0].body.is_none() && !self.refetch().await {
            return Step::Leave;
        }
        if self.queue.front().is_none_or(|i| i.body.is_none()) {
            // it was finished elsewhere, or is lost: handled in refetch
            return Step::Go;
        }
        self.stuck.store(false, AtomicOrdering::Relaxed);
        let mut front = self.queue.pop_front().expect("front");
        self.s.sending(&front.id, true);
        if self.s.take_lost(&front.id) {
            self.s.sending(&front.id, false);
            self.lost_in_place(front, true).await;
            return Step::Go;
        }
        let span = info_span!(
            "delivery",
            platform = self.s.bus.keys().platform(),
            channel = %self.key,
            stream_id = %front.id,
            attempt = 1u32,
        );
        // Marked as being sent until its commit lands (the commit task
        // clears it), so the sweep never dead-letters an entry that went out.
        let outcome = self.decide_and_send(&mut front).instrument(span).await;
        let Some(outcome) = outcome else {
            self.s.sending(&front.id, false);
            self.queue.push_front(front);
            return Step::Leave;
        };
        if self.finish(front, outcome).await {
            Step::Go
        } else {
            Step::Leave
        }
    }

    /// A gap noted for `status` is over.
    async fn gap_over(&mut self) {
        if let Some((_, _, true)) = self.gap_began.take() {
            let _ = self.s.bus.note_gap(&self.chan, None).await;
        }
    }

    /// The front waits for predecessor `done + 1`.
    async fn wait_gap(&mut self, done: u64, seq: u64) -> Step {
        let want = done + 1;
        match self.gap_began {
            Some((w, _, _)) if w == want => {}
            _ => {
                self.gap_over().await;
                self.gap_began = Some((want, Instant::now(), false));
            }
        }
        // Most gaps close within moments (the predecessor is being handed
        // over by a peer): only a wait that lasts gives the queue's room back.
        let began = self.gap_began.map(|g| g.1).unwrap_or_else(Instant::now);
        if began.elapsed() < SHORT_GAP {
            let wait = SHORT_GAP.saturating_sub(began.elapsed());
            tokio::select! {
                m = self.rx.recv() => if let Some(i) = m { self.insert(i) },
                _ = tokio::time::sleep(wait) => {}
                _ = self.s.stopping.cancelled() => {}
                _ = self.s.abort.cancelled() => {}
            }
            return Step::Go;
        }
        self.park_all();
        self.stuck.store(true, AtomicOrdering::Relaxed);
        if let Some((w, began, false)) = self.gap_began
            && began.elapsed() >= Duration::from_secs(1)
        {
            let since = crate::now_ms().saturating_sub(began.elapsed().as_millis() as u64);
            if self
                .s
                .bus
                .note_gap(&self.chan, Some((w, since)))
                .await
                .is_ok()
            {
                self.gap_began = Some((w, began, true));
            }
        }
        let timeout = self.s.set.gap_timeout;
        let check_at = match self.gap {
            Some((w, at)) if w == want => at,
            _ => {
                let at = Instant::now() + timeout;
                self.gap = Some((want, at));
                at
            }
        };
        if Instant::now() >= check_at {
            let s = self.s.clone();
            let Some(exists) = s.predecessor_exists(&self.key, want, seq - 1).await else {
                return Step::Leave;
            };
            self.pull();
            let still = self.queue.front().and_then(|i| i.seq) == Some(seq);
            if exists || !still {
                // It exists (or arrived): waiting longer is always allowed.
                let again = (timeout / 4).max(Duration::from_secs(1));
                self.gap = Some((want, Instant::now() + again));
                if exists {
                    debug!(
                        from = want,
                        to = seq - 1,
                        "a predecessor exists elsewhere; waiting for it"
                    );
                }
                return Step::Go;
            }
            let skipped = seq - want;
            warn!(
                from = want,
                to = seq - 1,
                skipped,
                "gave up waiting for seq numbers that no entry carries (gap_timeout_ms passed)"
            );
            Stats::add(&s.stats.gaps_skipped, skipped);
            crate::metrics::gaps_skipped(s.bus.keys().platform(), skipped);
            self.skip_to = Some(seq - 1);
            self.gap = None;
            return Step::Go;
        }
        let mut wait = check_at.saturating_duration_since(Instant::now());
        if let Some((_, began, false)) = self.gap_began {
            wait = wait.min(
                Duration::from_secs(1).saturating_sub(began.elapsed()) + Duration::from_millis(1),
            );
        }
        tokio::select! {
            m = self.rx.recv() => if let Some(i) = m { self.insert(i) },
            _ = tokio::time::sleep(wait) => {}
            _ = self.s.stopping.cancelled() => {}
            _ = self.s.abort.cancelled() => {}
        }
        Step::Go
    }

    /// Fetch parked items at the front back from Redis. False: abandoned.
    async fn refetch(&mut self) -> bool {
        let s = self.s.clone();
        self.park_all();
        let n = self
            .queue
            .iter()
            .take_while(|i| i.body.is_none())
            .count()
            .min(s.lane_cap)
            .max(1);
        // Holding nothing now, waiting for room cannot stall anyone.
        let mut permit = tokio::select! {
            p = s.room.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return false },
            _ = s.abort.cancelled() => return false,
        };
        let extra = s.room.available_permits().min(n - 1);
        if extra > 0
            && let Ok(more) = s.room.clone().try_acquire_many_owned(extra as u32)
        {
            permit.merge(more);
        }
        let n = permit.num_permits();
        let ids: Vec<_> = self.queue.iter().take(n).map(|i| i.id.clone()).collect();
        let Some(raw) = s
            .persist("fetch parked", || s.bus.claim(&s.who.consumer, &ids))
            .await
        else {
            return false;
        };
        let mut got: HashMap<_, _> = raw.into_iter().map(|r| (r.id.clone(), r)).collect();
        let mut i = 0;
        let mut gone = Vec::new();
        while i < n.min(self.queue.len()) {
            let id = self.queue[i].id.clone();
            match got.remove(&id) {
                Some(r) => {
                    let one = permit.split(1);
                    let item = &mut self.queue[i];
                    item.body = Some(Box::new(parse_entry(&r.fields, &s.rules)));
                    item.permit = one;
                    s.unpark();
                    self.full.fetch_add(1, AtomicOrdering::Relaxed);
                }
                None => gone.push(i),
            }
            i += 1;
        }
        // Checked against the de-duplication records again: a repeat of a
        // key sent while these were parked is skipped.
        let fresh: Vec<usize> = (0..self.queue.len().min(n))
            .filter(|&i| {
                self.queue[i].body.is_some()
                    && self.queue[i].idem_given
                    && self.queue[i].dup.is_none()
            })
            .collect();
        if !fresh.is_empty() {
            let keys: Vec<&str> = fresh.iter().map(|&i| self.queue[i].idem.as_str()).collect();
            let buckets = lookup_buckets(s.set.dedup_window);
            let Some(found) = s
                .persist("dedup lookup", || s.bus.sent_lookup(&buckets, &keys))
                .await
            else {
                return false;
            };
            for (i, f) in fresh.into_iter().zip(found) {
                self.queue[i].dup = f;
            }
        }
        // Not returned: deleted from the stream (G7), or no longer ours.
        for &idx in gone.iter().rev() {
            let id = self.queue[idx].id.clone();
            let exists = s.persist("check entry", || s.bus.exists(&id)).await;
            let Some(exists) = exists else { return false };
            let item = self.queue.remove(idx).expect("index");
            s.unpark();
            if exists {
                debug!(stream_id = %id, "no longer pending for this gateway; dropped from memory");
                Stats::inc(&s.stats.moved);
                s.forget(&id);
                continue;
            }
            let recorded = s.take_lost(&id);
            if !recorded {
                warn!(stream_id = %id, "pending entry deleted from the stream; dead-lettered as lost_in_stream");
                Stats::inc(&s.stats.lost_in_stream);
            }
            self.lost_in_place(item, recorded).await;
        }
        true
    }

    /// Dead-letter an item deleted from the stream, in its place (its seq
    /// is known: its successors are released).
    /// `recorded`: the sweep wrote its dead letter already; only the mark moves.
    async fn lost_in_place(&mut self, item: Item, recorded: bool) {
        let mark = self.mark_for(item.seq);
        let chan = Some((self.chan.clone(), mark));
        let (done, rx) = if recorded {
            Done::new(
                chan,
                item.id.clone(),
                End::Ack { delivered: false },
                "unknown",
            )
        } else {
            let record = lost_record(&self.s, &item.id, Some(&self.key));
            Done::dead(
                chan,
                item.id.clone(),
                record,
                DeadLetterKind::LostInStream,
                "unknown",
            )
        };
        // Held until its commit lands (the commit task forgets it).
        self.push_commit(done, rx);
        if item.body.is_some() {
            self.full.fetch_sub(1, AtomicOrdering::Relaxed);
        } else {
            self.s.unpark();
        }
    }

    /// Move the delivered mark for a finished entry numbered `seq`; the new
    /// mark if it moved.
    fn mark_for(&mut self, seq: Option<u64>) -> Option<u64> {
        let done = self.done.unwrap_or(0);
        let seq = seq?;
        let base = match self.skip_to.take() {
            Some(b) if b + 1 == seq => b,
            Some(b) => {
                self.skip_to = Some(b);
                done
            }
            None => done,
        };
        let new = if seq == base + 1 { seq } else { base };
        if seq <= base && seq <= done {
            Stats::inc(&self.s.stats.late);
        }
        let new = new.max(done);
        self.done = Some(new);
        (new != done).then_some(new)
    }

    fn push_commit(&mut self, done: Done, rx: oneshot::Receiver<bool>) {
        let id = done.id.clone();
        if self.s.commits.send(done).is_ok() {
            self.commits.push_back(rx);
        } else {
            self.s.forget(&id);
        }
    }

    /// Settle what needs no send, else send with retries. None: abandoned.
    async fn decide_and_send(&mut self, item: &mut Item) -> Option<Outcome> {
        let s = self.s.clone();
        let parsed = item.body.as_ref().expect("body");
        let env = match &parsed.result {
            Err(bad) => {
                return Some(Outcome::Dead {
                    kind: DeadLetterKind::BadInput(bad.kind),
                    error: bad.detail.clone(),
                    attempts: 0,
                });
            }
            Ok(env) => env,
        };
        if item.dup.is_some() || (item.idem_given && self.sent_idems.get(&item.idem).is_some()) {
            debug!("idempotency key already sent; skipped as a duplicate");
            Stats::inc(&s.stats.duplicates_skipped);
            if let (Some(k), Some(m)) = (&env.message_key, &item.dup)
                && m != "-"
            {
                self.sent_ids.insert(k.clone(), m.clone());
            }
            return Some(Outcome::Skipped);
        }
        if expired(env) {
            debug!("expired before it could be sent; dropped");
            Stats::inc(&s.stats.expired);
            return Some(Outcome::Skipped);
        }
        if self.superseded(&item.class) {
            debug!("superseded by a newer one queued behind it; dropped");
            let counter = if matches!(item.class, Class::Edit(_)) {
                &s.stats.coalesced
            } else {
                &s.stats.superseded
            };
            Stats::inc(counter);
            return Some(Outcome::Skipped);
        }
        if !s.adapter.capabilities().supports(&env.action) {
            warn!(
                action = env.action.type_name(),
                adapter = s.adapter.kind(),
                "the platform does not support this action; dropped"
            );
            Stats::inc(&s.stats.unsupported);
            return Some(Outcome::Skipped);
        }
        if item.maybe_sent && s.set.unknown_outcome == UnknownOutcome::DeadLetter {
            return Some(Outcome::Dead {
                kind: DeadLetterKind::UnknownOutcome,
                error: "the gateway sending this entry stopped mid-send; it may or may not have reached the platform (unknown_outcome = \"dead_letter\")".into(),
                attempts: 1,
            });
        }
        let target = match &env.action {
            Action::Edit { target, .. } | Action::Delete { target } => {
                match self.resolve(target).await? {
                    Some(t) => Some(t),
                    None => {
                        return Some(Outcome::Dead {
                            kind: DeadLetterKind::UnknownTarget,
                            error: format!(
                                "the target of this {} was never sent (no platform id for it)",
                                env.action.type_name()
                            ),
                            attempts: 0,
                        });
                    }
                }
            }
            _ => None,
        };
        self.send(item, target).await
    }

    /// A typing/presence update, or an edit, with a newer one of its kind queued behind.
    fn superseded(&self, class: &Class) -> bool {
        match class {
            Class::Strict => false,
            Class::Typing | Class::Presence => self.queue.iter().any(|q| q.class == *class),
            Class::Edit(t) => self
                .queue
                .iter()
                .any(|q| matches!(&q.class, Class::Edit(u) if u == t)),
        }
    }

    /// The platform id of an edit's target. Some(None): no such message.
    async fn resolve(&self, target: &Target) -> Option<Option<String>> {
        let s = &self.s;
        let key = match target {
            Target::MessageId(m) => return Some(Some(m.clone())),
            Target::Key(k) => k,
        };
        if let Some(m) = self.sent_ids.get(key) {
            return Some(Some(m.clone()));
        }
        if let Some(m) = s.persist("resolve target", || s.bus.cached_id(key)).await? {
            return Some(Some(m));
        }
        let buckets = lookup_buckets(s.set.dedup_window);
        let keys = [key.as_str()];
        let found = s
            .persist("resolve target", || s.bus.sent_lookup(&buckets, &keys))
            .await?;
        Some(found.into_iter().next().flatten().filter(|m| m != "-"))
    }

    /// Deliver with retries. None: abandoned.
    async fn send(&mut self, item: &mut Item, target: Option<String>) -> Option<Outcome> {
        let s = self.s.clone();
        let parsed = item.body.as_ref().expect("body");
        let Ok(env) = &parsed.result else {
            return None;
        };
        let platform = s.bus.keys().platform().to_owned();
        // No send while an earlier outcome of this channel is uncommitted: a
        // gateway that dies now leaves at most this one entry "possibly sent",
        // and the new owner resends it before anything later (G3).
        let settled = tokio::select! {
            ok = self.settle() => ok,
            _ = s.abort.cancelled() => return None,
        };
        if !settled {
            return None;
        }
        let mut resend = item.maybe_sent;
        let mut attempts = 0u32;
        if resend {
            Stats::inc(&s.stats.unknown_outcome_resends);
            crate::metrics::unknown_outcome_resend(&platform);
            warn!(
                "re-sending an entry whose earlier send may have reached the platform (same idempotency key)"
            );
        }
        loop {
            if !s.wait_lease().await {
                return None;
            }
            if s.circuit.is_open() {
                s.circuit.ensure_probe(&s.adapter, &s.abort);
                self.stuck.store(true, AtomicOrdering::Relaxed);
                self.pull();
                self.park_all();
                tokio::select! {
                    _ = s.circuit.closed() => {}
                    _ = s.abort.cancelled() => return None,
                }
                continue;
            }
            if expired(env) {
                debug!("expired while waiting to be retried; dropped");
                Stats::inc(&s.stats.expired);
                return Some(Outcome::Skipped);
            }
            if s.set.unknown_outcome == UnknownOutcome::DeadLetter {
                s.persist("mark sending", || s.bus.mark_sending(&item.id))
                    .await?;
            }
            let delivery = Delivery {
                platform: &platform,
                stream_id: &item.id,
                envelope: env,
                idempotency_key: &item.idem,
                attempt: attempts + 1,
                resend,
                target: target.as_deref(),
            };
            let fut = crate::metrics::timed(&platform, s.adapter.deliver(delivery));
            tokio::pin!(fut);
            let slow = tokio::time::sleep(SLOW_SEND);
            tokio::pin!(slow);
            let mut parked = false;
            let result = loop {
                tokio::select! {
                    r = &mut fut => break r,
                    _ = &mut slow, if !parked => {
                        parked = true;
                        self.stuck.store(true, AtomicOrdering::Relaxed);
                        self.pull();
                        self.park_all();
                    }
                    _ = s.abort.cancelled() => return None,
                }
            };
            let err = match result {
                Ok(d) => {
                    Stats::inc(&s.stats.delivered);
                    return Some(Outcome::Delivered(d.message_id));
                }
                Err(e) => e,
            };
            // A rate limit means the request was not taken; anything else may have landed.
            resend |= !matches!(err.retry, Retry::After(_) | Retry::Halt);
            let wait = match err.retry {
                Retry::Never => {
                    warn!(error = %err.message, "platform refused the action; dead-lettered");
                    return Some(Outcome::Dead {
                        kind: DeadLetterKind::Rejected,
                        error: err.message,
                        attempts: attempts + 1,
                    });
                }
                Retry::Backoff => {
                    attempts += 1;
                    // G5: the age is Redis's, from the stream id.
                    let age =
                        Duration::from_millis(crate::now_ms().saturating_sub(item.id.millis()));
                    if s.set.retry.exhausted(attempts, age) {
                        warn!(error = %err.message, attempts, "retries exhausted; dead-lettered");
                        return Some(Outcome::Dead {
                            kind: DeadLetterKind::RetriesExhausted,
                            error: format!("{} (after {attempts} attempts)", err.message),
                            attempts,
                        });
                    }
                    s.set.retry.backoff(attempts)
                }
                Retry::After(d) => d,
                Retry::Halt => {
                    // Not this entry's fault: no attempt used, nothing
                    // dead-lettered; the next turn waits for the circuit.
                    s.circuit.trip(&err.message, &s.adapter, &s.abort);
                    continue;
                }
            };
            Stats::inc(&s.stats.retries);
            crate::metrics::retry(&platform);
            debug!(error = %err.message, wait_ms = wait.as_millis() as u64, "retrying");
            self.stuck.store(true, AtomicOrdering::Relaxed);
            self.pull();
            self.park_all();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = s.abort.cancelled() => return None,
            }
        }
    }

    /// Record the outcome: move the mark, queue the commit. False: lost.
    async fn finish(&mut self, item: Item, outcome: Outcome) -> bool {
        let s = self.s.clone();
        let mark = self.mark_for(item.seq);
        let parsed = item.body.as_ref().expect("body");
        let ty = crate::metrics::type_of(parsed);
        let message_key = parsed
            .result
            .as_ref()
            .ok()
            .and_then(|e| e.message_key.clone());
        let chan = Some((self.chan.clone(), mark));
        let (mut done, rx) = match &outcome {
            Outcome::Delivered(_) => {
                Done::new(chan, item.id.clone(), End::Ack { delivered: true }, ty)
            }
            Outcome::Skipped => Done::new(chan, item.id.clone(), End::Ack { delivered: false }, ty),
            Outcome::Dead {
                kind,
                error,
                attempts,
            } => {
                let record = dead_record(&s, &item.id, parsed, *kind, error, *attempts);
                Done::dead(chan, item.id.clone(), record, *kind, ty)
            }
        };
        if let Outcome::Delivered(mid) = &outcome {
            if item.idem_given {
                self.sent_idems.insert(item.idem.clone(), String::new());
                done.sent = Some((item.idem.clone(), mid.clone().unwrap_or_else(|| "-".into())));
            }
            if let (Some(k), Some(m)) = (&message_key, mid) {
                self.sent_ids.insert(k.clone(), m.clone());
                done.cache = Some((k.clone(), m.clone()));
            }
        }
        done.sending = s.set.unknown_outcome == UnknownOutcome::DeadLetter;
        // Held until its commit lands (the commit task forgets it): a
        // reconciliation of the pending list must not take it for stranded.
        self.push_commit(done, rx);
        self.full.fetch_sub(1, AtomicOrdering::Relaxed);
        drop(item);
        while self.commits.len() > UNCOMMITTED {
            let rx = self.commits.pop_front().expect("commit");
            if !rx.await.unwrap_or(false) {
                return false;
            }
        }
        true
    }
}

fn expired(env: &Envelope) -> bool {
    env.expires_ms.is_some_and(|t| crate::now_ms() > t)
}
