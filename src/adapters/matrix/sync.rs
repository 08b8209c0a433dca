//! The Matrix syncer: the one `/sync` loop of a platform across the whole
//! fleet, which turns what users do into inbound events (see [`super::inbound`]
//! for what each event becomes).
//!
//! **One holder.** Every gateway runs a [`Syncer`], but only the holder of
//! the lease `sg:{P}:matrix:sync:lease` (taken with `SET PX` semantics,
//! value = this gateway's consumer name and an instance id) syncs; it renews
//! the lease every third of its time to live and stops syncing at once when
//! a renewal fails. The others try to take it every third of the lease, so a
//! dead holder is replaced within about one lease; a holder that stops
//! cleanly deletes the lease, so the next one starts at once.
//!
//! **Each event published exactly once.** The position (`since`), the last
//! timeline event seen per room and the batch's inbound events are written
//! by one Lua script, fenced by the lease (`sync.lua`): the XADDs to
//! `sg:{P}:inbound` and the move of `since` happen together or not at all,
//! and a former holder (its lease expired or taken) writes nothing. A new
//! holder resumes from the stored `since`, so what the old one fetched but
//! did not commit is fetched again; what it committed is not.
//!
//! **Gaps.** When a room's timeline comes back `limited` (more events since
//! the last sync than the filter's `timeline_limit`: downtime, a burst, a
//! handover), the syncer pages back with `GET /rooms/{room}/messages` from
//! the timeline's `prev_batch` to the last event it saw there, and publishes
//! the missed events first, in timeline order. When the history ends (or
//! the server refuses it, or more than [`MAX_BACKFILL_PAGES`] pages are
//! missing) before that event is found, an inbound `gap` event says so, with
//! what could be recovered after it.
//!
//! **Invites.** Only the syncer sees invites, so each is handled once. With
//! `auto_join`, it joins at once; a join that fails for a while (429, 5xx, a
//! transport failure, a refused token) is kept in `sg:{P}:matrix:joins` and
//! retried with exponential backoff (1 s doubling to 10 min, or the
//! server's `retry_after`) until it succeeds or is refused for good (403,
//! 404, any other 4xx). The `invite` event (`joined`: true or false, and
//! `join_error` when refused) is published once the outcome is known.
//!
//! The very first sync of a platform (no stored `since`) only takes the
//! position, the pending invites and the last event of each room: old room
//! history is not replayed as new messages.
//!
//! **Encrypted rooms** (the `e2ee` feature): each sync answer's to-device
//! events, device lists and one-time-key counts go to the Olm machine first
//! (see [`super::crypto`]), then the timeline's `m.room.encrypted` events are
//! decrypted and published as what they are. One whose room key is missing
//! is published as `encrypted` and kept in `sg:{P}:matrix:undecrypted` (in
//! the same commit); when a later sync brings its key it is published
//! decrypted (`late: true`) and dropped from there, in that sync's commit.
//!
//! **A refused token** (`M_UNKNOWN_TOKEN`, soft logout) pauses the sync: it
//! is retried with backoff up to a minute, while the adapter reports the
//! cause to `/readyz`; nothing is committed meanwhile.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use crate::bus::Conn;
use redis::{AsyncCommands, RedisResult, Script};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::inbound::TIMELINE_TYPES;
use super::{Body, MatrixAdapter, MatrixKeys, seg};
use crate::adapters::{AdapterError, Retry};
use crate::inbound::InboundEvent;

/// Events of one room one sync returns at most, by default.
pub const DEFAULT_TIMELINE_LIMIT: u32 = 100;
/// Events one backfill request asks for.
const BACKFILL_PAGE: u32 = 100;
/// Pages a gap's backfill reads at most before it reports the rest missing.
pub const MAX_BACKFILL_PAGES: usize = 100;
/// The first wait before a failed join is tried again; doubled each time.
const JOIN_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between two tries of a join.
const MAX_JOIN_BACKOFF: Duration = Duration::from_secs(600);

static LEASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lease.lua")));
static COMMIT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("sync.lua")));

/// How a [`Syncer`] runs.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// This gateway's consumer name; the lease holder id adds an instance id.
    pub owner: String,
    /// The lease's time to live: a dead holder is replaced after about this long.
    pub lease: Duration,
    /// `timeline.limit` of the sync filter: more events of one room between
    /// two syncs are backfilled.
    pub timeline_limit: u32,
}

/// A join being retried, as `sg:{P}:matrix:joins` keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PendingJoin {
    inviter: String,
    invited_ms: u64,
    attempts: u32,
    next_ms: u64,
    error: String,
}

/// What the syncer knows, as committed.
#[derive(Debug, Default)]
struct State {
    since: Option<String>,
    rooms: HashMap<String, String>,
    joins: HashMap<String, PendingJoin>,
}

/// What one commit writes.
#[derive(Debug, Default)]
struct Step {
    events: Vec<InboundEvent>,
    rooms: BTreeMap<String, String>,
    joins: BTreeMap<String, PendingJoin>,
    done: Vec<String>,
    /// Events whose room key was missing, kept to be decrypted when it
    /// arrives: event id → `{"room", "event"}` (JSON).
    undecrypted: BTreeMap<String, String>,
    /// Kept events now published decrypted.
    resolved: Vec<String>,
}

impl Step {
    fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.rooms.is_empty()
            && self.joins.is_empty()
            && self.done.is_empty()
            && self.undecrypted.is_empty()
            && self.resolved.is_empty()
    }
}

/// How a backfill ended.
enum Backfill {
    /// Every event after the last one seen, oldest first.
    Filled(Vec<Value>),
    /// The last event seen was not reached: the events found that surely
    /// came after it (none when the history ended before it: they may
    /// repeat what was published), and why.
    Short(Vec<Value>, String),
}

/// Aborts a spawned task when dropped (the renewer dies with its holder).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The platform's `/sync` loop, run while this gateway holds the lease.
pub struct Syncer {
    mx: Arc<MatrixAdapter>,
    conn: Conn,
    keys: MatrixKeys,
    inbound_key: String,
    owner: String,
    lease: Duration,
    timeline_limit: u32,
    holding: AtomicBool,
}

impl std::fmt::Debug for Syncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Syncer")
            .field("platform", &self.mx.platform)
            .field("owner", &self.owner)
            .field("lease", &self.lease)
            .field("timeline_limit", &self.timeline_limit)
            .finish_non_exhaustive()
    }
}

impl Syncer {
    /// A syncer for `mx`'s platform, keeping its state under `keys` and
    /// publishing to `inbound_key`; fails on a lease under 300 ms or a
    /// timeline limit of 0.
    pub fn new(
        mx: Arc<MatrixAdapter>,
        conn: Conn,
        keys: MatrixKeys,
        inbound_key: String,
        settings: SyncSettings,
    ) -> Result<Self, String> {
        if settings.lease < Duration::from_millis(300) {
            return Err("the matrix sync lease must be at least 300 ms".into());
        }
        if settings.timeline_limit == 0 {
            return Err("the matrix sync timeline limit must be at least 1".into());
        }
        Ok(Self {
            mx,
            conn,
            keys,
            inbound_key,
            owner: format!("{}/{:08x}", settings.owner, rand::random::<u32>()),
            lease: settings.lease,
            timeline_limit: settings.timeline_limit,
            holding: AtomicBool::new(false),
        })
    }

    /// The lease holder id of this syncer (consumer name / instance).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// True while this syncer holds the lease.
    pub fn holding(&self) -> bool {
        self.holding.load(Ordering::SeqCst)
    }

    /// Sync whenever this gateway holds the lease, until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let tick = self.lease / 3;
        let platform = self.mx.platform.clone();
        loop {
            if stop.is_cancelled() {
                return;
            }
            match self.lease_op("take").await {
                Ok(true) => {
                    info!(%platform, owner = %self.owner, "holding the matrix sync lease; this gateway syncs the platform");
                    self.hold(&stop).await;
                    if let Err(e) = self.lease_op("release").await {
                        warn!(%platform, error = %e, "could not release the matrix sync lease (it expires by itself)");
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    warn!(%platform, error = %e, "could not take the matrix sync lease; retrying");
                }
            }
            tokio::select! {
                _ = sleep(tick) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Run a lease script (`take`, `renew`, `release`): whether it is (was) ours.
    async fn lease_op(&self, mode: &str) -> RedisResult<bool> {
        let mut conn = self.conn.clone();
        let n: i64 = LEASE
            .key(self.keys.lease())
            .arg(&self.owner)
            .arg(self.lease.as_millis() as u64)
            .arg(mode)
            .invoke_async(&mut conn)
            .await?;
        Ok(n == 1)
    }

    async fn hold(self: &Arc<Self>, stop: &CancellationToken) {
        let lost = stop.child_token();
        let _renewer = AbortOnDrop(tokio::spawn({
            let me = self.clone();
            let lost = lost.clone();
            async move { me.keep_lease(lost).await }
        }));
        self.holding.store(true, Ordering::SeqCst);
        crate::metrics::matrix_sync_holder(&self.mx.platform, true);
        self.drive(&lost).await;
        lost.cancel();
        self.holding.store(false, Ordering::SeqCst);
        crate::metrics::matrix_sync_holder(&self.mx.platform, false);
    }

    async fn keep_lease(&self, lost: CancellationToken) {
        let platform = &self.mx.platform;
        loop {
            tokio::select! {
                _ = sleep(self.lease / 3) => {}
                _ = lost.cancelled() => return,
            }
            match self.lease_op("renew").await {
                Ok(true) => {}
                Ok(false) => {
                    warn!(%platform, "the matrix sync lease is held by another gateway; this one stops syncing");
                    lost.cancel();
                    return;
                }
                Err(e) => {
                    warn!(%platform, error = %e, "could not renew the matrix sync lease; this gateway stops syncing");
                    lost.cancel();
                    return;
                }
            }
        }
    }

    async fn load(&self) -> RedisResult<State> {
        let mut conn = self.conn.clone();
        let since: Option<String> = conn.get(self.keys.since()).await?;
        let rooms: HashMap<String, String> = conn.hgetall(self.keys.rooms()).await?;
        let raw: HashMap<String, String> = conn.hgetall(self.keys.joins()).await?;
        let joins = raw
            .into_iter()
            .filter_map(|(room, j)| serde_json::from_str(&j).ok().map(|j| (room, j)))
            .collect();
        Ok(State {
            since: since.filter(|s| !s.is_empty()),
            rooms,
            joins,
        })
    }

    /// Sync until the lease is lost (or stop).
    async fn drive(&self, lost: &CancellationToken) {
        let platform = &self.mx.platform;
        let mut st = loop {
            match self.load().await {
                Ok(st) => break st,
                Err(e) => {
                    warn!(%platform, error = %e, "matrix: reading the sync state failed; retrying");
                    tokio::select! {
                        _ = sleep(Duration::from_secs(1)) => {}
                        _ = lost.cancelled() => return,
                    }
                }
            }
        };
        info!(%platform, resume = st.since.is_some(), rooms = st.rooms.len(), pending_joins = st.joins.len(), "matrix sync loop started");
        #[cfg(feature = "e2ee")]
        if let Some(c) = self.mx.crypto()
            && let Err(e) = c.announce(&self.mx).await
        {
            // The first sync's processing sends them again.
            warn!(%platform, error = %e.message, "matrix e2ee: announcing the bot's device keys failed; retried with the sync");
        }
        let mut backoff = Duration::from_secs(1);
        while !lost.is_cancelled() {
            if !self.retry_joins(&mut st).await {
                return;
            }
            let timeout = match &st.since {
                None => Duration::ZERO,
                Some(_) => {
                    let now = crate::now_ms();
                    st.joins
                        .values()
                        .map(|j| Duration::from_millis(j.next_ms.saturating_sub(now)))
                        .min()
                        .map_or(self.mx.sync_timeout, |d| d.min(self.mx.sync_timeout))
                }
            };
            let r = tokio::select! {
                r = self.sync_once(st.since.as_deref(), timeout) => r,
                _ = lost.cancelled() => return,
            };
            let resp = match r {
                Ok(v) => v,
                Err(e) => {
                    let (wait, cap) = match e.retry {
                        Retry::After(d) => (d, Duration::from_secs(30)),
                        Retry::Halt => (backoff, Duration::from_secs(60)),
                        _ => (backoff, Duration::from_secs(30)),
                    };
                    warn!(%platform, error = %e.message, wait_ms = wait.as_millis() as u64, "matrix sync failed; retrying");
                    tokio::select! {
                        _ = sleep(wait) => {}
                        _ = lost.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(cap);
                    continue;
                }
            };
            backoff = Duration::from_secs(1);
            let Some(next) = resp.get("next_batch").and_then(Value::as_str) else {
                warn!(%platform, "matrix sync answered without next_batch");
                tokio::select! {
                    _ = sleep(Duration::from_secs(1)) => {}
                    _ = lost.cancelled() => return,
                }
                continue;
            };
            #[cfg(feature = "e2ee")]
            let room_keys = match self.mx.crypto() {
                None => Vec::new(),
                Some(c) => match c.receive_sync(&self.mx, &resp).await {
                    Ok(keys) => keys,
                    Err(e) => {
                        warn!(%platform, error = %e.message, "matrix e2ee: the sync's keys could not be processed; the batch will be fetched again");
                        tokio::select! {
                            _ = sleep(Duration::from_secs(1)) => {}
                            _ = lost.cancelled() => return,
                        }
                        continue;
                    }
                },
            };
            #[cfg(not(feature = "e2ee"))]
            let room_keys = Vec::new();
            let step = match self.step(&resp, &st, &room_keys).await {
                Ok(step) => step,
                Err(e) => {
                    warn!(%platform, error = %e.message, "matrix: backfilling a gap failed; the batch will be fetched again");
                    tokio::select! {
                        _ = sleep(Duration::from_secs(1)) => {}
                        _ = lost.cancelled() => return,
                    }
                    continue;
                }
            };
            let moved = st.since.as_deref() != Some(next);
            if !moved && step.is_empty() {
                continue;
            }
            match self.commit(next, &step).await {
                Ok(true) => {
                    debug!(%platform, events = step.events.len(), "matrix sync batch committed");
                    st.apply(step, next);
                }
                Ok(false) => {
                    warn!(%platform, "the matrix sync lease is no longer ours; nothing of this batch was written");
                    return;
                }
                Err(e) => {
                    warn!(%platform, error = %e, "matrix: committing a sync batch failed; it will be fetched again");
                    tokio::select! {
                        _ = sleep(Duration::from_secs(1)) => {}
                        _ = lost.cancelled() => return,
                    }
                }
            }
        }
    }

    /// The sync filter: only what becomes inbound events.
    fn filter(&self) -> String {
        json!({
            "presence": {"types": []},
            "account_data": {"types": []},
            "room": {
                "timeline": {"limit": self.timeline_limit, "types": TIMELINE_TYPES},
                "state": {"types": []},
                "ephemeral": {"types": []},
                "account_data": {"types": []},
            },
        })
        .to_string()
    }

    async fn sync_once(
        &self,
        since: Option<&str>,
        timeout: Duration,
    ) -> Result<Value, AdapterError> {
        let filter = self.filter();
        let timeout = timeout.as_millis().to_string();
        let mut query = vec![("filter", filter.as_str()), ("timeout", timeout.as_str())];
        if let Some(s) = since {
            query.push(("since", s));
        }
        Ok(self
            .mx
            .call_api(
                Method::GET,
                "/_matrix/client/v3/sync",
                &query,
                Body::None,
                true,
            )
            .await?)
    }

    /// What one sync answer commits: its events (gaps backfilled), the
    /// rooms' last events, the invites' outcomes.
    async fn step(
        &self,
        resp: &Value,
        st: &State,
        room_keys: &[(String, String)],
    ) -> Result<Step, AdapterError> {
        let initial = st.since.is_none();
        let platform = &self.mx.platform;
        let mut step = Step::default();
        #[cfg(feature = "e2ee")]
        self.late_decryptions(room_keys, &mut step).await?;
        #[cfg(not(feature = "e2ee"))]
        let _ = room_keys;
        let rooms = resp.get("rooms");
        let joined = rooms.and_then(|r| r.get("join")).and_then(Value::as_object);
        for (room, data) in joined.into_iter().flatten() {
            let timeline = data.get("timeline");
            let mut evs: Vec<Value> = timeline
                .and_then(|t| t.get("events"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let limited = timeline
                .and_then(|t| t.get("limited"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let prev = timeline
                .and_then(|t| t.get("prev_batch"))
                .and_then(Value::as_str);
            let last_seen = st.rooms.get(room);
            let reached = last_seen
                .is_some_and(|last| evs.iter().any(|e| event_id(e) == Some(last.as_str())));
            if !initial
                && limited
                && !reached
                && let (Some(last), Some(prev)) = (last_seen, prev)
            {
                let first = evs.first().and_then(event_id).map(str::to_owned);
                match self.backfill(room, prev, last).await? {
                    Backfill::Filled(older) => {
                        info!(%platform, %room, backfilled = older.len(), "matrix: a limited timeline was backfilled");
                        crate::metrics::matrix_gap(platform, "filled");
                        evs.splice(0..0, older);
                    }
                    Backfill::Short(older, why) => {
                        warn!(%platform, %room, backfilled = older.len(), reason = %why, "matrix: a gap in the timeline could not be filled");
                        crate::metrics::matrix_gap(platform, "unfilled");
                        let mut gap = self.mx.event("gap", room, "", crate::now_ms());
                        gap.text = Some(format!(
                            "events of this room after {last} may be missing: {why}"
                        ));
                        gap.extra
                            .insert("after_event".into(), Value::from(last.as_str()));
                        gap.extra.insert("reason".into(), Value::from(why));
                        gap.extra
                            .insert("backfilled".into(), Value::from(older.len()));
                        if let Some(f) = first {
                            gap.extra.insert("before_event".into(), Value::from(f));
                        }
                        step.events.push(gap);
                        evs.splice(0..0, older);
                    }
                }
            }
            // Only what came after the last event seen (a timeline that
            // reaches back to it repeats it and what precedes it).
            if let Some(at) = last_seen
                .and_then(|last| evs.iter().position(|e| event_id(e) == Some(last.as_str())))
            {
                evs.drain(..=at);
            }
            if let Some(last) = evs.iter().rev().find_map(event_id) {
                step.rooms.insert(room.clone(), last.to_owned());
            }
            if initial {
                continue;
            }
            #[cfg(feature = "e2ee")]
            let decrypted = match self.mx.crypto() {
                Some(c) => c.decrypt(&self.mx, room, &evs).await?,
                None => Default::default(),
            };
            for ev in &evs {
                #[cfg(feature = "e2ee")]
                if let Some(id) = event_id(ev)
                    && let Some(r) = decrypted.get(id)
                {
                    if let Err(why) = r
                        && why.missing_key
                    {
                        let kept = json!({"room": room, "event": ev}).to_string();
                        step.undecrypted.insert(id.to_owned(), kept);
                    }
                    if let Some(e) = self.mx.decrypted_event(room, ev, r).await {
                        step.events.push(e);
                    }
                    continue;
                }
                if let Some(e) = self.mx.timeline_event(room, ev).await {
                    step.events.push(e);
                }
            }
        }
        let invites = rooms
            .and_then(|r| r.get("invite"))
            .and_then(Value::as_object);
        for (room, inv) in invites.into_iter().flatten() {
            if st.joins.contains_key(room) {
                continue;
            }
            let inviter = inviter_of(inv, &self.mx.user_id);
            let pending = PendingJoin {
                inviter,
                invited_ms: crate::now_ms(),
                attempts: 0,
                next_ms: 0,
                error: String::new(),
            };
            if !self.mx.auto_join {
                step.events
                    .push(self.invite_event(room, &pending, false, None));
                continue;
            }
            self.try_join(room, pending, &mut step).await;
        }
        Ok(step)
    }

    /// The kept undecryptable events whose room key just arrived, decrypted
    /// into `step` (published before the batch's own events, marked
    /// `late: true`, and no longer kept).
    #[cfg(feature = "e2ee")]
    async fn late_decryptions(
        &self,
        room_keys: &[(String, String)],
        step: &mut Step,
    ) -> Result<(), AdapterError> {
        let Some(c) = self.mx.crypto() else {
            return Ok(());
        };
        if room_keys.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let kept: HashMap<String, String> =
            conn.hgetall(self.keys.undecrypted()).await.map_err(|e| {
                AdapterError::transient(format!(
                    "matrix: reading the undecrypted events failed: {e}"
                ))
            })?;
        let mut by_room: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for v in kept.values() {
            let Ok(k) = serde_json::from_str::<Value>(v) else {
                continue;
            };
            let (Some(room), Some(session)) = (
                k.get("room").and_then(Value::as_str),
                k.pointer("/event/content/session_id")
                    .and_then(Value::as_str),
            ) else {
                continue;
            };
            if room_keys.iter().any(|(r, s)| r == room && s == session) {
                by_room
                    .entry(room.to_owned())
                    .or_default()
                    .push(k["event"].clone());
            }
        }
        for (room, mut evs) in by_room {
            evs.sort_by_key(|e| e.get("origin_server_ts").and_then(Value::as_u64));
            let decrypted = c.decrypt(&self.mx, &room, &evs).await?;
            for ev in &evs {
                let Some(id) = event_id(ev) else { continue };
                let Some(r @ Ok(_)) = decrypted.get(id) else {
                    continue;
                };
                if let Some(mut e) = self.mx.decrypted_event(&room, ev, r).await {
                    e.extra.insert("late".into(), Value::Bool(true));
                    step.events.push(e);
                }
                step.resolved.push(id.to_owned());
            }
        }
        if !step.resolved.is_empty() {
            info!(platform = %self.mx.platform, events = step.resolved.len(), "matrix e2ee: events kept for a missing room key are decrypted now");
        }
        Ok(())
    }

    /// Try the join of `room` once, recording the outcome in `step`.
    async fn try_join(&self, room: &str, mut j: PendingJoin, step: &mut Step) {
        let platform = &self.mx.platform;
        j.attempts += 1;
        match self.mx.join(room).await {
            Ok(()) => {
                crate::metrics::matrix_join(platform, "joined");
                info!(%platform, %room, attempts = j.attempts, "matrix: joined an invited room");
                step.events.push(self.invite_event(room, &j, true, None));
                step.done.push(room.to_owned());
            }
            Err(e) if e.retry == Retry::Never => {
                crate::metrics::matrix_join(platform, "refused");
                warn!(%platform, %room, error = %e.message, "matrix: joining an invited room was refused; not retrying");
                step.events
                    .push(self.invite_event(room, &j, false, Some(&e.message)));
                step.done.push(room.to_owned());
            }
            Err(e) => {
                crate::metrics::matrix_join(platform, "retry");
                let backoff = JOIN_BACKOFF
                    .saturating_mul(1 << (j.attempts - 1).min(20))
                    .min(MAX_JOIN_BACKOFF);
                let wait = match e.retry {
                    Retry::After(d) => d.max(backoff),
                    _ => backoff,
                };
                warn!(%platform, %room, error = %e.message, attempts = j.attempts, wait_ms = wait.as_millis() as u64, "matrix: joining an invited room failed; will retry");
                j.next_ms = crate::now_ms() + wait.as_millis() as u64;
                j.error = e.message;
                step.joins.insert(room.to_owned(), j);
            }
        }
    }

    /// Try the joins that are due; false when the lease was lost.
    async fn retry_joins(&self, st: &mut State) -> bool {
        let now = crate::now_ms();
        let due: Vec<(String, PendingJoin)> = st
            .joins
            .iter()
            .filter(|(_, j)| j.next_ms <= now)
            .map(|(r, j)| (r.clone(), j.clone()))
            .collect();
        if due.is_empty() {
            return true;
        }
        let mut step = Step::default();
        for (room, j) in due {
            self.try_join(&room, j, &mut step).await;
        }
        match self.commit("", &step).await {
            Ok(true) => {
                let since = st.since.clone().unwrap_or_default();
                st.apply(step, &since);
                true
            }
            Ok(false) => false,
            Err(e) => {
                warn!(platform = %self.mx.platform, error = %e, "matrix: recording join retries failed; they will be tried again");
                true
            }
        }
    }

    fn invite_event(
        &self,
        room: &str,
        j: &PendingJoin,
        joined: bool,
        error: Option<&str>,
    ) -> InboundEvent {
        let mut ev = self.mx.event("invite", room, &j.inviter, j.invited_ms);
        ev.extra.insert("joined".into(), Value::Bool(joined));
        if j.attempts > 1 {
            ev.extra
                .insert("join_attempts".into(), Value::from(j.attempts));
        }
        if let Some(e) = error {
            ev.extra.insert("join_error".into(), Value::from(e));
        }
        ev
    }

    /// Page back from `from` to the event `last`: the events after it.
    async fn backfill(&self, room: &str, from: &str, last: &str) -> Result<Backfill, AdapterError> {
        let filter = json!({"types": TIMELINE_TYPES}).to_string();
        let path = format!("/_matrix/client/v3/rooms/{}/messages", seg(room));
        let limit = BACKFILL_PAGE.to_string();
        let mut from = from.to_owned();
        let mut newest_first: Vec<Value> = Vec::new();
        let short = |mut found: Vec<Value>, why: String| {
            found.reverse();
            Ok(Backfill::Short(found, why))
        };
        for _ in 0..MAX_BACKFILL_PAGES {
            let query = [
                ("dir", "b"),
                ("from", from.as_str()),
                ("limit", limit.as_str()),
                ("filter", filter.as_str()),
            ];
            let v = match self
                .mx
                .call_api(Method::GET, &path, &query, Body::None, false)
                .await
            {
                Ok(v) => v,
                Err(f) if f.err.retry == Retry::Never => {
                    return short(
                        Vec::new(),
                        format!("the server refused the room's history: {}", f.err.message),
                    );
                }
                Err(f) => return Err(f.err),
            };
            let chunk = v
                .get("chunk")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for ev in &chunk {
                if event_id(ev) == Some(last) {
                    newest_first.reverse();
                    return Ok(Backfill::Filled(newest_first));
                }
                newest_first.push(ev.clone());
            }
            match v.get("end").and_then(Value::as_str) {
                Some(end) if !chunk.is_empty() => from = end.to_owned(),
                _ => {
                    return short(
                        Vec::new(),
                        format!(
                            "the room's history ended before the last event seen ({} events back)",
                            newest_first.len()
                        ),
                    );
                }
            }
        }
        short(
            newest_first,
            format!(
                "more than {} events were missed",
                MAX_BACKFILL_PAGES * BACKFILL_PAGE as usize
            ),
        )
    }

    /// Write `step` and move `since` to `next` ('' = leave it), atomically
    /// and only while the lease is ours: whether it was.
    async fn commit(&self, next: &str, step: &Step) -> RedisResult<bool> {
        let events: Vec<String> = step
            .events
            .iter()
            .map(|e| serde_json::to_string(e).expect("events serialise"))
            .collect();
        let joins: BTreeMap<&String, String> = step
            .joins
            .iter()
            .map(|(r, j)| (r, serde_json::to_string(j).expect("joins serialise")))
            .collect();
        let writes = json!({
            "events": events,
            "rooms": step.rooms,
            "joins": joins,
            "done": step.done,
            "undecrypted": step.undecrypted,
            "resolved": step.resolved,
        });
        let mut conn = self.conn.clone();
        let n: i64 = COMMIT
            .key(self.keys.lease())
            .key(self.keys.since())
            .key(self.keys.rooms())
            .key(&self.inbound_key)
            .key(self.keys.joins())
            .key(self.keys.undecrypted())
            .arg(&self.owner)
            .arg(next)
            .arg(crate::inbound::INBOUND_MAXLEN)
            .arg(writes.to_string())
            .invoke_async(&mut conn)
            .await?;
        Ok(n == 1)
    }
}

impl State {
    fn apply(&mut self, step: Step, next: &str) {
        if !next.is_empty() {
            self.since = Some(next.to_owned());
        }
        self.rooms.extend(step.rooms);
        self.joins.extend(step.joins);
        for room in step.done {
            self.joins.remove(&room);
        }
    }
}

fn event_id(ev: &Value) -> Option<&str> {
    ev.get("event_id").and_then(Value::as_str)
}

/// Who sent the invite, from the invite's stripped state.
fn inviter_of(inv: &Value, me: &str) -> String {
    inv.pointer("/invite_state/events")
        .and_then(Value::as_array)
        .and_then(|evs| {
            evs.iter().find(|e| {
                e.get("type").and_then(Value::as_str) == Some("m.room.member")
                    && e.get("state_key").and_then(Value::as_str) == Some(me)
            })
        })
        .and_then(|e| e.get("sender").and_then(Value::as_str))
        .unwrap_or_default()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::matrix::MatrixSettings;
    use crate::redis_server::RedisServer;

    async fn syncer(server: &RedisServer, owner: &str) -> Syncer {
        let mx = MatrixAdapter::new(
            "mx",
            MatrixSettings {
                homeserver: "http://127.0.0.1:9".into(),
                access_token: "t".into(),
                user_id: "@bot:h".into(),
                auto_join: true,
                sync_timeout: Duration::from_secs(1),
                request_timeout: Duration::from_secs(1),
            },
        )
        .unwrap();
        let client = redis::Client::open(server.url()).unwrap();
        let conn = Conn::Single(redis::aio::ConnectionManager::new(client).await.unwrap());
        Syncer::new(
            Arc::new(mx),
            conn,
            MatrixKeys::new("sg:{mx}:matrix:"),
            "sg:{mx}:inbound".into(),
            SyncSettings {
                owner: owner.into(),
                lease: Duration::from_millis(600),
                timeline_limit: 10,
            },
        )
        .unwrap()
    }

    fn step(text: &str) -> Step {
        let mut s = Step::default();
        s.events
            .push(InboundEvent::message("mx", "!r:h", "@u:h", text));
        s.rooms.insert("!r:h".into(), format!("${text}"));
        s
    }

    #[tokio::test]
    async fn only_the_lease_holder_can_publish_and_move_since() {
        let bin = std::env::var("STARGAZER_REDIS_SERVER").ok();
        let server = RedisServer::start(bin.as_deref()).expect("redis-server");
        let a = syncer(&server, "gw-a").await;
        let b = syncer(&server, "gw-b").await;
        assert!(a.owner().starts_with("gw-a/"));
        assert!(a.lease_op("take").await.unwrap());
        assert!(!b.lease_op("take").await.unwrap(), "the lease is a's");
        assert!(a.commit("s1", &step("one")).await.unwrap());
        assert!(!b.commit("s2", &step("two")).await.unwrap());

        // a stops renewing (dies); the lease expires and b takes it.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(b.lease_op("take").await.unwrap());
        // a, not knowing, tries to commit what it fetched: nothing is written.
        assert!(!a.commit("s-stale", &step("stale")).await.unwrap());
        assert!(!a.lease_op("renew").await.unwrap());
        assert!(b.commit("s2", &step("two")).await.unwrap());

        let mut conn = b.conn.clone();
        let since: String = conn.get(b.keys.since()).await.unwrap();
        assert_eq!(since, "s2");
        let len: u64 = conn.xlen("sg:{mx}:inbound").await.unwrap();
        assert_eq!(len, 2);
        let last: String = conn.hget(b.keys.rooms(), "!r:h").await.unwrap();
        assert_eq!(last, "$two");
        // A release by a former holder leaves the lease alone.
        assert!(!a.lease_op("release").await.unwrap());
        assert!(b.lease_op("renew").await.unwrap());
        assert!(b.lease_op("release").await.unwrap());
        assert!(a.lease_op("take").await.unwrap());
    }

    #[tokio::test]
    async fn pending_joins_are_written_and_cleared_with_the_lease() {
        let bin = std::env::var("STARGAZER_REDIS_SERVER").ok();
        let server = RedisServer::start(bin.as_deref()).expect("redis-server");
        let a = syncer(&server, "gw-a").await;
        assert!(a.lease_op("take").await.unwrap());
        let mut s = Step::default();
        let j = PendingJoin {
            inviter: "@u:h".into(),
            invited_ms: 1,
            attempts: 1,
            next_ms: 2,
            error: "429".into(),
        };
        s.joins.insert("!j:h".into(), j.clone());
        assert!(a.commit("", &s).await.unwrap());
        let st = a.load().await.unwrap();
        assert_eq!(st.joins.get("!j:h"), Some(&j));
        assert_eq!(st.since, None, "an empty since leaves it unset");
        let mut s = Step::default();
        s.done.push("!j:h".into());
        assert!(a.commit("s1", &s).await.unwrap());
        let st = a.load().await.unwrap();
        assert!(st.joins.is_empty());
        assert_eq!(st.since.as_deref(), Some("s1"));
    }
}
