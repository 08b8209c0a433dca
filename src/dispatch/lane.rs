//! One channel's lane: its entries strictly one after another, in `seq`
//! order (or stream order when they carry none), across every gateway.
//!
//! For the entry at the front of the queue the lane asks Redis to *begin*
//! (seq gate, channel lock with fencing token, in-flight record), delivers
//! through the adapter while renewing the lock, then *commits* (delivered
//! mark, message-cache write-back, ack) — beginning the next entry in the
//! same round trip when one is queued. Failures are retried here, with
//! backoff; what cannot be delivered is dead-lettered in its place, which
//! releases its successors at once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{Instrument, debug, info_span, warn};

use super::{Entry, LaneMsg, Parked, Shared};
use crate::adapters::{Delivery, Retry};
use crate::bus::{Begin, BeginArgs, Commit, CommitArgs, DeadLetter, Timing};
use crate::config::UnknownOutcome;
use crate::envelope::{Action, Envelope, Ordering, parse_entry};
use crate::stats::Stats;

/// How an entry ended (or is known to have ended, when a commit must be redone).
#[derive(Debug, Clone)]
enum Outcome {
    Delivered(Option<String>),
    /// Acknowledged unsent (superseded, expired, unsupported, already sent).
    Skipped,
    Dead {
        kind: &'static str,
        error: String,
        attempts: u32,
    },
}

/// Why a send stopped before an outcome.
enum Interrupted {
    LockLost,
    Aborted,
}

pub(super) struct Lane {
    s: Arc<Shared>,
    key: String,
    /// The channel state hash (seq, delivered mark, lock).
    chan: String,
    rx: mpsc::UnboundedReceiver<LaneMsg>,
    queue: VecDeque<Entry>,
    /// Entries of this channel left in Redis until the queue has room.
    parked: VecDeque<Parked>,
    /// Entries held in memory (shared with the dispatcher, which parks beyond a cap).
    load: Arc<AtomicUsize>,
    /// Length of `parked`, shared with the dispatcher.
    parked_count: Arc<AtomicUsize>,
    /// The front entry waits for a predecessor, which may be among the parked.
    gap_waiting: bool,
    /// Fencing token while we hold the channel lock.
    token: Option<String>,
    /// The front entry has begun (its in-flight record is ours).
    begun: bool,
    /// A begin answer obtained with the previous commit, for this id.
    prefetched: Option<(crate::envelope::StreamId, Begin)>,
    /// Outcome known for the front entry whose commit was refused (lock lost).
    known: Option<Outcome>,
    /// Poll delay while waiting for the lock or a predecessor.
    poll: Duration,
}

const POLL_MIN: Duration = Duration::from_millis(2);
const POLL_MAX: Duration = Duration::from_millis(100);

impl Lane {
    pub(super) fn new(
        s: Arc<Shared>,
        key: String,
        chan: String,
        rx: mpsc::UnboundedReceiver<LaneMsg>,
        load: Arc<AtomicUsize>,
        parked_count: Arc<AtomicUsize>,
    ) -> Self {
        Lane {
            s,
            key,
            chan,
            rx,
            queue: VecDeque::new(),
            parked: VecDeque::new(),
            load,
            parked_count,
            gap_waiting: false,
            token: None,
            begun: false,
            prefetched: None,
            known: None,
            poll: POLL_MIN,
        }
    }

    /// Put an arriving entry in place: by seq among numbered ones, else last.
    /// A begun front entry keeps its place.
    fn insert(&mut self, e: Entry) {
        let held = self.begun || matches!(self.prefetched, Some((_, Begin::Go { .. })));
        let start = usize::from(held);
        if let Some(seq) = e.parsed.routing.seq {
            let pos = self
                .queue
                .iter()
                .enumerate()
                .skip(start)
                .find(|(_, q)| q.parsed.routing.seq.is_some_and(|s| s > seq))
                .map(|(i, _)| i);
            if let Some(i) = pos {
                self.queue.insert(i, e);
                return;
            }
        }
        self.queue.push_back(e);
    }

    fn take(&mut self, msg: LaneMsg) {
        match msg {
            LaneMsg::Entry(e) => self.insert(*e),
            LaneMsg::Parked(p) => self.parked.push_back(p),
        }
    }

    fn pull(&mut self) {
        while let Ok(m) = self.rx.try_recv() {
            self.take(m);
        }
    }

    /// Bring parked entries back into memory while the queue is short.
    /// Returns false when the lane must stop.
    async fn unpark(&mut self) -> bool {
        let s = self.s.clone();
        // Normally refill up to the cap once half of it is used up; when the
        // front waits for a predecessor, that one may be parked: bring more.
        let want = if self.gap_waiting {
            s.lane_cap
        } else if self.queue.len() > s.lane_cap / 2 {
            0
        } else {
            s.lane_cap - self.queue.len()
        };
        if self.parked.is_empty() || want == 0 {
            return true;
        }
        self.gap_waiting = false;
        let mut n = want.min(self.parked.len());
        // Never wait for room while holding entries: lanes waiting on each
        // other's room would stall for good. An empty lane holds nothing.
        let permit = if self.queue.is_empty() {
            tokio::select! {
                p = s.room.clone().acquire_many_owned(n as u32) => p.ok(),
                _ = s.stopping.cancelled() => return true,
            }
        } else {
            n = n.min(s.room.available_permits());
            if n == 0 {
                return true;
            }
            s.room.clone().try_acquire_many_owned(n as u32).ok()
        };
        let Some(mut permit) = permit else {
            return true;
        };
        let ids: Vec<_> = self.parked.iter().take(n).map(|p| p.id.clone()).collect();
        let Some(raw) = s
            .persist("claim parked", || s.bus.claim(&s.who.consumer, &ids))
            .await
        else {
            return false;
        };
        self.parked.drain(..n);
        self.parked_count.fetch_sub(n, AtomicOrdering::Relaxed);
        let mut back = std::collections::HashSet::new();
        for r in raw {
            let Some(one) = permit.split(1) else { break };
            back.insert(r.id.clone());
            let parsed = parse_entry(&r.fields, &s.rules);
            self.load.fetch_add(1, AtomicOrdering::Relaxed);
            self.insert(Entry {
                id: r.id,
                parsed,
                permit: one,
            });
        }
        for id in ids.iter().filter(|id| !back.contains(*id)) {
            // Not pending for us any more: finished elsewhere, or deleted
            // from the stream — which must not pass silently.
            if let Some(false) = s.persist("check entry", || s.bus.exists(id)).await {
                Stats::inc(&s.stats.lost_in_stream);
                crate::metrics::lost_in_stream(s.bus.keys().platform());
                let timing = Timing { ..s.timing };
                let _ = s
                    .persist("dead_letter", || {
                        s.bus.dead_letter(&s.who, timing, None, id, None, false, crate::bus::DeadLetter {
                            payload: b"",
                            error: "the entry was pending but had been deleted from the stream (trimmed or XDEL'd) before it was delivered",
                            error_kind: "lost_in_stream",
                            attempts: 0,
                            consumer: &s.who.consumer,
                            channel_id: Some(&self.key),
                        })
                    })
                    .await;
            }
            s.forget(id);
        }
        true
    }

    pub(super) async fn run(mut self) {
        loop {
            self.pull();
            let stopping = self.s.stopping.is_cancelled();
            if !stopping && !self.unpark().await {
                break;
            }
            // While stopping, finish what is in memory; parked entries are handed off.
            if self.queue.is_empty() && (self.parked.is_empty() || stopping) {
                self.release().await;
                // Leave only when nothing can be in flight to us: senders hold
                // the same lock while they pick or create a lane.
                let mut lanes = self.s.lanes.lock().expect("lane map poisoned");
                match self.rx.try_recv() {
                    Ok(m) => {
                        drop(lanes);
                        self.take(m);
                        continue;
                    }
                    Err(_) => {
                        lanes.remove(&self.key);
                        drop(lanes);
                        self.s.drop_waker(&self.chan);
                        self.hand_off();
                        return;
                    }
                }
            }
            if self.s.abort.is_cancelled() {
                break;
            }
            if self.queue.is_empty() {
                continue;
            }
            if !self.step().await {
                break;
            }
        }
        // Abandoned (drain deadline, or stopped while waiting): what is left
        // stays pending, handed off to the other gateways.
        self.release().await;
        self.s
            .lanes
            .lock()
            .expect("lane map poisoned")
            .remove(&self.key);
        self.pull();
        self.s.drop_waker(&self.chan);
        self.hand_off();
    }

    /// Give every entry still held back to Redis for the other gateways.
    fn hand_off(&mut self) {
        let ids: Vec<_> = self
            .queue
            .drain(..)
            .map(|e| e.id)
            .chain(self.parked.drain(..).map(|p| p.id))
            .collect();
        self.parked_count.store(0, AtomicOrdering::Relaxed);
        for id in &ids {
            self.s.forget(id);
        }
        self.s.hand_off(ids);
    }

    async fn release(&mut self) {
        if let Some(token) = self.token.take() {
            let s = &self.s;
            if let Err(e) = s.bus.release(&s.who, &self.chan, &token).await {
                warn!(error = %e, channel = %self.key, "could not release channel lock; it lapses by itself");
            }
        }
        self.begun = false;
    }

    fn begin_args(e: &Entry) -> BeginArgs<'_> {
        BeginArgs {
            id: &e.id,
            seq: e.parsed.routing.seq,
            cache: e
                .parsed
                .result
                .as_ref()
                .ok()
                .and_then(|env| env.message_key.as_deref()),
        }
    }

    /// Work on the front entry. Returns false when the lane must stop.
    async fn step(&mut self) -> bool {
        let front_id = self.queue[0].id.clone();
        let begin = match self.prefetched.take() {
            Some((id, b)) if id == front_id => b,
            _ => {
                let s = self.s.clone();
                let chan = self.chan.clone();
                let args = Self::begin_args(&self.queue[0]);
                match s
                    .persist("begin", || {
                        s.bus.begin(&s.who, s.timing, &chan, args.clone())
                    })
                    .await
                {
                    Some(b) => b,
                    None => return false,
                }
            }
        };
        match begin {
            Begin::Done => {
                debug!(stream_id = %front_id, "already finished; skipped");
                Stats::inc(&self.s.stats.duplicates_skipped);
                crate::metrics::finished(
                    self.s.bus.keys().platform(),
                    &self.queue[0].parsed,
                    "skipped",
                    None,
                );
                self.finish_front();
                true
            }
            Begin::Moved(owner) => {
                debug!(stream_id = %front_id, owner, "now pending for another consumer");
                Stats::inc(&self.s.stats.moved);
                self.finish_front();
                true
            }
            // The missing predecessor may be parked: bring parked ones back
            // (next turn of the run loop) instead of waiting.
            Begin::Gap(_) if !self.parked.is_empty() && self.s.room.available_permits() > 0 => {
                self.gap_waiting = true;
                self.release().await;
                true
            }
            Begin::Busy(wait) | Begin::Gap(wait) => {
                // Never sit on the lock while waiting: the holder of the
                // missing predecessor may need it.
                self.release().await;
                self.wait(wait).await
            }
            Begin::Go {
                token,
                attempts,
                resumed,
                cached,
                gap_skipped,
                late,
            } => {
                self.poll = POLL_MIN;
                self.token = Some(token);
                self.begun = true;
                if gap_skipped > 0 {
                    warn!(channel = %self.key, skipped = gap_skipped, "gave up waiting for missing seq numbers after gap_timeout_ms");
                    Stats::add(&self.s.stats.gaps_skipped, gap_skipped);
                    crate::metrics::gaps_skipped(self.s.bus.keys().platform(), gap_skipped);
                }
                if late {
                    warn!(channel = %self.key, stream_id = %front_id, "delivering an entry whose seq was already passed");
                    Stats::inc(&self.s.stats.late);
                }
                self.handle(attempts, resumed, cached).await
            }
        }
    }

    /// Wait for the lock or a predecessor: until `wait` passes (polling with a
    /// growing interval), a new entry arrives, or the gateway stops.
    async fn wait(&mut self, wait: Duration) -> bool {
        let d = self.poll.min(wait.max(Duration::from_millis(1)));
        self.poll = (self.poll * 2).min(POLL_MAX);
        // Woken early when the holder or the predecessor commits (it
        // publishes on the channel's key); the poll is only the fallback.
        let wake = self.s.waker(&self.chan);
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = wake.notified() => true,
            Some(m) = self.rx.recv() => { self.take(m); true }
            _ = self.s.stopping.cancelled() => false,
        }
    }

    fn finish_front(&mut self) {
        if let Some(e) = self.queue.pop_front() {
            self.s.forget(&e.id);
            self.load.fetch_sub(1, AtomicOrdering::Relaxed);
        }
        self.begun = false;
        self.known = None;
    }

    /// The front entry has begun: decide, deliver, commit.
    async fn handle(&mut self, attempts: u32, resumed: bool, cached: bool) -> bool {
        let s = self.s.clone();
        let entry = &self.queue[0];
        let span = info_span!(
            "delivery",
            platform = s.bus.keys().platform(),
            channel = %self.key,
            stream_id = %entry.id,
            attempt = attempts + 1,
        );
        let outcome = match self.known.take() {
            Some(o) => o,
            None => match self.decide(attempts, resumed, cached) {
                Ok(o) => o,
                Err(env) => {
                    match self
                        .deliver(env, attempts, resumed)
                        .instrument(span.clone())
                        .await
                    {
                        Ok(o) => o,
                        Err(Interrupted::LockLost) => {
                            Stats::inc(&s.stats.locks_lost);
                            crate::metrics::lock_lost(s.bus.keys().platform());
                            warn!(parent: &span, "channel lock lost mid-delivery; starting over");
                            self.token = None;
                            self.begun = false;
                            return true;
                        }
                        Err(Interrupted::Aborted) => return false,
                    }
                }
            },
        };
        self.conclude(outcome).instrument(span).await
    }

    /// Settle what needs no send. `Err(envelope)` means: deliver it.
    fn decide(&self, attempts: u32, resumed: bool, cached: bool) -> Result<Outcome, &Envelope> {
        let s = &self.s;
        let entry = &self.queue[0];
        let env = match &entry.parsed.result {
            Err(bad) => {
                return Ok(Outcome::Dead {
                    kind: bad.kind.as_str(),
                    error: bad.detail.clone(),
                    attempts,
                });
            }
            Ok(env) => env,
        };
        if env.expires_ms.is_some_and(|t| crate::now_ms() > t) {
            debug!(stream_id = %entry.id, "expired before it could be sent; dropped");
            Stats::inc(&s.stats.expired);
            return Ok(Outcome::Skipped);
        }
        if env.action.ordering() == Ordering::LatestWins && self.superseded(env) {
            debug!(stream_id = %entry.id, "superseded by a newer one; dropped");
            Stats::inc(&s.stats.superseded);
            return Ok(Outcome::Skipped);
        }
        if !s.adapter.capabilities().supports(&env.action) {
            warn!(stream_id = %entry.id, action = env.action.type_name(), adapter = s.adapter.kind(), "the platform does not support this action; dropped");
            Stats::inc(&s.stats.unsupported);
            return Ok(Outcome::Skipped);
        }
        if cached {
            debug!(stream_id = %entry.id, "message_key already holds a platform id; not sent again");
            Stats::inc(&s.stats.cached_skipped);
            return Ok(Outcome::Skipped);
        }
        if resumed && s.unknown_outcome == UnknownOutcome::DeadLetter {
            return Ok(Outcome::Dead {
                kind: "unknown_outcome",
                error: "the gateway sending this entry stopped mid-send; it may or may not have reached the platform (unknown_outcome = \"dead_letter\")".into(),
                attempts: attempts + 1,
            });
        }
        Err(env)
    }

    /// A typing or presence update with a newer one of its kind queued behind.
    fn superseded(&self, env: &Envelope) -> bool {
        let presence = matches!(env.action, Action::Presence { .. });
        self.queue.iter().skip(1).any(|q| match &q.parsed.result {
            Ok(later) => match later.action {
                Action::Presence { .. } => presence,
                Action::StartTyping | Action::StopTyping => !presence,
                _ => false,
            },
            Err(_) => false,
        })
    }

    /// Deliver with retries, renewing the lock all along.
    async fn deliver(
        &self,
        env: &Envelope,
        mut attempts: u32,
        resumed: bool,
    ) -> Result<Outcome, Interrupted> {
        let s = self.s.clone();
        let entry = &self.queue[0];
        let token = self.token.clone().unwrap_or_default();
        let platform = s.bus.keys().platform().to_owned();
        let idem = env
            .idempotency_key
            .clone()
            .or_else(|| env.message_key.clone())
            .unwrap_or_else(|| format!("{platform}:{}", entry.id));
        let age_base = env.created_ms.unwrap_or_else(|| entry.id.millis());
        let mut resend = resumed;
        if resumed {
            // The interrupted try counts: a message that crashes its gateway
            // every time still runs out of attempts.
            attempts = match s
                .bus
                .renew(&s.who, s.timing, &self.chan, &token, true)
                .await
            {
                Ok(Some(n)) => n,
                Ok(None) => return Err(Interrupted::LockLost),
                Err(_) => attempts + 1,
            };
            Stats::inc(&s.stats.unknown_outcome_resends);
            crate::metrics::unknown_outcome_resend(&platform);
            warn!(
                "re-sending an entry whose earlier send may have reached the platform (same idempotency key)"
            );
        }
        loop {
            let delivery = Delivery {
                platform: &platform,
                stream_id: &entry.id,
                envelope: env,
                idempotency_key: &idem,
                attempt: attempts + 1,
                resend,
            };
            let delivery = crate::metrics::timed(&platform, s.adapter.deliver(delivery));
            let result = self.hold(&token, delivery).await?;
            let err = match result {
                Ok(d) => {
                    Stats::inc(&s.stats.delivered);
                    return Ok(Outcome::Delivered(d.message_id));
                }
                Err(e) => e,
            };
            // A rate limit (429, or the adapter's own limiter) means the
            // request was not taken; anything else may have landed.
            resend |= !matches!(err.retry, Retry::After(_));
            let wait = match err.retry {
                Retry::Never => {
                    warn!(error = %err.message, "platform refused the action; dead-lettered");
                    return Ok(Outcome::Dead {
                        kind: "rejected",
                        error: err.message,
                        attempts: attempts + 1,
                    });
                }
                Retry::Backoff => {
                    attempts = match s
                        .bus
                        .renew(&s.who, s.timing, &self.chan, &token, true)
                        .await
                    {
                        Ok(Some(n)) => n,
                        Ok(None) => return Err(Interrupted::LockLost),
                        Err(_) => attempts + 1,
                    };
                    let age = Duration::from_millis(crate::now_ms().saturating_sub(age_base));
                    if s.retry.exhausted(attempts, age) {
                        warn!(error = %err.message, attempts, "retries exhausted; dead-lettered");
                        return Ok(Outcome::Dead {
                            kind: "retries_exhausted",
                            error: format!("{} (after {attempts} attempts)", err.message),
                            attempts,
                        });
                    }
                    s.retry.backoff(attempts)
                }
                Retry::After(d) => d,
            };
            Stats::inc(&s.stats.retries);
            crate::metrics::retry(&platform);
            debug!(error = %err.message, wait_ms = wait.as_millis() as u64, "retrying");
            self.hold(&token, tokio::time::sleep(wait)).await?;
        }
    }

    /// Run `fut` while keeping the channel lock alive.
    async fn hold<T>(
        &self,
        token: &str,
        fut: impl std::future::Future<Output = T>,
    ) -> Result<T, Interrupted> {
        let s = &self.s;
        let every = s.timing.lock_ttl / 3;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tokio::pin!(fut);
        loop {
            tokio::select! {
                r = &mut fut => return Ok(r),
                _ = tick.tick() => {
                    match s.bus.renew(&s.who, s.timing, &self.chan, token, false).await {
                        Ok(Some(_)) => {}
                        Ok(None) => return Err(Interrupted::LockLost),
                        Err(e) => {
                            warn!(error = %e, "could not renew channel lock");
                            crate::metrics::lock_renew_failed(s.bus.keys().platform());
                        }
                    }
                }
                _ = s.abort.cancelled() => return Err(Interrupted::Aborted),
            }
        }
    }

    /// Write the outcome: commit (beginning the next entry in the same trip)
    /// or dead-letter. A refused write (lock lost) keeps the outcome so it is
    /// written, not redone, once the lock is ours again.
    async fn conclude(&mut self, outcome: Outcome) -> bool {
        let s = self.s.clone();
        self.pull();
        let token = self.token.clone().unwrap_or_default();
        let entry = &self.queue[0];
        let release = self.queue.len() == 1;
        let seq = entry.parsed.routing.seq;
        let result = match &outcome {
            Outcome::Delivered(_) | Outcome::Skipped => {
                let message_id = match &outcome {
                    Outcome::Delivered(m) => m.as_deref(),
                    _ => None,
                };
                let cache = entry
                    .parsed
                    .result
                    .as_ref()
                    .ok()
                    .and_then(|e| e.message_key.as_deref());
                let next = self.queue.get(1).map(Self::begin_args);
                let args = CommitArgs {
                    chan: &self.chan,
                    token: &token,
                    id: &entry.id,
                    seq,
                    cache,
                    message_id,
                    release,
                    next,
                };
                s.persist("commit", || s.bus.commit(&s.who, s.timing, args.clone()))
                    .await
            }
            Outcome::Dead {
                kind,
                error,
                attempts,
            } => {
                let dl = DeadLetter {
                    payload: &entry.parsed.payload,
                    error,
                    error_kind: kind,
                    attempts: *attempts,
                    consumer: &s.who.consumer,
                    channel_id: entry
                        .parsed
                        .routing
                        .channel_id
                        .as_ref()
                        .map(|c| c.0.as_str()),
                };
                s.persist("dead_letter", || {
                    s.bus.dead_letter(
                        &s.who,
                        s.timing,
                        Some((&self.chan, &token)),
                        &entry.id,
                        seq,
                        release,
                        dl.clone(),
                    )
                })
                .await
            }
        };
        match result {
            None => false,
            Some(Commit::Stale) => {
                Stats::inc(&s.stats.locks_lost);
                crate::metrics::lock_lost(s.bus.keys().platform());
                warn!(channel = %self.key, "commit refused: the channel lock passed to another holder; will commit again once it is ours");
                self.token = None;
                self.begun = false;
                self.known = Some(outcome);
                true
            }
            Some(Commit::Ok(next)) => {
                if let Outcome::Dead { .. } = outcome {
                    Stats::inc(&s.stats.dead_lettered);
                }
                let (label, kind) = match &outcome {
                    Outcome::Delivered(_) => ("delivered", None),
                    Outcome::Skipped => ("skipped", None),
                    Outcome::Dead { kind, .. } => ("dead_lettered", Some(*kind)),
                };
                crate::metrics::finished(
                    s.bus.keys().platform(),
                    &self.queue[0].parsed,
                    label,
                    kind,
                );
                if release {
                    self.token = None;
                }
                self.finish_front();
                if let (Some(b), Some(front)) = (next, self.queue.front()) {
                    self.prefetched = Some((front.id.clone(), b));
                }
                true
            }
        }
    }
}
