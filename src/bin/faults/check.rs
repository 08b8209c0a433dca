//! The checker: judges the whole history of a run against SPEC §3.
//!
//! - **Lost** (G1): a published entry neither delivered (a 2xx at the sink)
//!   nor in the dead-letter stream; a hostile one must be dead-lettered with
//!   the kind that names its problem (G6), never delivered.
//! - **Duplicates** (G2): the same `Idempotency-Key` answered 2xx more than
//!   once. One is *explained* when the gateway that got the earlier 2xx was
//!   SIGKILLed, or SIGSTOPped past its leases, after that request arrived
//!   and before it could have recorded the outcome (within [`GRACE_MS`] of
//!   the answer, stretched by a Redis outage in that window), or when the
//!   later copy came from a gateway resuming from a long SIGSTOP, within
//!   [`GRACE_MS`] of its SIGCONT (a request it had begun before it froze):
//!   the resends a de-duplicating platform drops. Every other one is a
//!   violation, named by what preceded it.
//! - **Order** (G3): per channel, first deliveries must follow `seq`. An
//!   entry counts as out of order when the request that delivered a higher
//!   `seq` of its channel arrived before this one's 2xx was answered (it
//!   was overtaken, or sent concurrently) *while it was already in the
//!   stream*; one published
//!   only after its successor went (a producer slower than the gap timeout)
//!   is counted apart as a late predecessor. A successor sent before its
//!   predecessor was dead-lettered counts as out of order too.
//! - **Pending**: the group's pending count at the end must be 0.
//! - **Foreign keys**: every key must be `sg:{P}:…`, `sg:gateway:…` or a
//!   valid entry's `sg:msg:` key — and none of the keys a forged
//!   `message_key` named may exist.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::json;

use super::producer::{BAD_INPUT_KINDS, Hostile, Published, allowed_cache_keys};
use super::sink::{Outcome, Request};

/// How long after a 2xx a healthy gateway has to record it.
pub const GRACE_MS: u64 = 5_000;
/// How many examples of each violation the report lists.
const EXAMPLES: usize = 8;

/// Something done to a gateway process.
#[derive(Debug, Clone)]
pub struct GwEvent {
    pub incarnation: String,
    pub at_ms: u64,
    pub kind: GwEventKind,
    pub until_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GwEventKind {
    Kill,
    StopLong,
    StopShort,
}

/// Redis stopped or killed, until it answered again.
#[derive(Debug, Clone)]
pub struct Outage {
    pub from_ms: u64,
    pub until_ms: Option<u64>,
}

/// One entry of `sg:{P}:outbound:dlq` (SPEC §2 fields).
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub original_id: String,
    pub error_kind: String,
    pub error: String,
    pub failed_ms: u64,
}

/// Everything a run recorded.
#[derive(Debug)]
pub struct History {
    pub platform: String,
    pub published: Vec<Published>,
    pub requests: Vec<Request>,
    pub dead_letters: Vec<DeadLetter>,
    pub pending: u64,
    /// The ids in the group's pending list at the end.
    pub pending_ids: HashSet<String>,
    /// The group's `last-delivered-id` at the end (entries after it were
    /// never read).
    pub last_delivered_id: Option<String>,
    pub keys: Vec<String>,
    pub gw_events: Vec<GwEvent>,
    pub redis_outages: Vec<Outage>,
}

impl History {
    /// The whole history, one JSON object per line (kept with `--keep`, for
    /// post-mortems: `grep '"channel":"c3"' history.jsonl`).
    pub fn write_jsonl(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write as _;
        let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
        let mut line = |v: serde_json::Value| writeln!(w, "{v}");
        for p in &self.published {
            line(
                json!({"published": p.id, "hostile": p.hostile.map(Hostile::name),
                "channel": p.channel, "seq": p.seq, "message_key": p.message_key,
                "forged_key": p.forged_key, "future_created": p.future_created}),
            )?;
        }
        for r in &self.requests {
            line(
                json!({"request": r.n, "arrival_ms": r.arrival_ms, "answered_ms": r.answered_ms,
                "incarnation": r.incarnation, "key": r.key, "channel": r.channel, "seq": r.seq,
                "stream_id": r.stream_id, "action": r.action,
                "outcome": format!("{:?}", r.outcome)}),
            )?;
        }
        for d in &self.dead_letters {
            line(
                json!({"dead_letter": d.original_id, "error_kind": d.error_kind,
                "error": d.error, "failed_ms": d.failed_ms}),
            )?;
        }
        for e in &self.gw_events {
            line(
                json!({"gateway_event": format!("{:?}", e.kind), "incarnation": e.incarnation,
                "at_ms": e.at_ms, "until_ms": e.until_ms}),
            )?;
        }
        for o in &self.redis_outages {
            line(json!({"redis_outage_from_ms": o.from_ms, "until_ms": o.until_ms}))?;
        }
        line(json!({"pending": self.pending, "keys": self.keys.len()}))?;
        w.flush()
    }
}

/// What the checker found.
#[derive(Debug, Default)]
pub struct Findings {
    pub published_valid: usize,
    pub published_hostile: usize,
    pub future_created: usize,
    pub delivered_valid: usize,
    pub requests: usize,
    /// Sink answers by kind (2xx, 2xx replay, 5xx, 429, hang, unanswered).
    pub answers: BTreeMap<&'static str, usize>,
    pub dead_by_kind: BTreeMap<String, usize>,
    pub valid_dead_by_kind: BTreeMap<String, usize>,
    /// Valid entries dead-lettered as bad input.
    pub valid_misfiled: Vec<String>,
    /// Per hostile kind: (published, dead-lettered with the right kind).
    pub hostile: BTreeMap<Hostile, (usize, usize)>,
    /// Hostile entries delivered, or dead-lettered with a wrong kind.
    pub hostile_wrong: Vec<String>,
    pub hostile_wrong_count: usize,
    /// Entries both delivered and dead-lettered.
    pub delivered_and_dead: Vec<String>,
    pub delivered_and_dead_count: usize,
    pub dup_explained: usize,
    pub dup_unexplained: BTreeMap<&'static str, usize>,
    pub dup_examples: Vec<String>,
    pub out_of_order: usize,
    pub ooo_examples: Vec<String>,
    pub late_predecessors: usize,
    /// Entries resent (after their 2xx) once a successor had been sent.
    pub resent_after_successor: usize,
    pub lost: usize,
    /// Why the lost ones are not concluded: still pending in the group,
    /// never read by it, or acknowledged without an outcome.
    pub lost_by_state: BTreeMap<&'static str, usize>,
    pub lost_examples: Vec<String>,
    pub pending: u64,
    pub foreign: Vec<String>,
    /// Sink requests by `action`.
    pub actions: BTreeMap<String, usize>,
    /// Sink requests for stream ids nobody published, or carrying another
    /// channel or seq than the entry's.
    pub unknown_requests: usize,
}

impl Findings {
    pub fn unexplained_dups(&self) -> usize {
        self.dup_unexplained.values().sum()
    }

    /// The guarantees' verdict (the run adds its own: drain, exits).
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        let mut add = |n: usize, what: &str| {
            if n > 0 {
                v.push(format!("{what} {n}"));
            }
        };
        add(self.lost, "lost");
        add(self.out_of_order, "out-of-order");
        add(self.resent_after_successor, "resent after a successor");
        add(self.pending as usize, "pending");
        add(self.foreign.len(), "foreign keys");
        add(self.unexplained_dups(), "unexplained duplicates");
        add(
            self.hostile_wrong_count,
            "hostile entries not dead-lettered as bad input",
        );
        add(
            self.valid_misfiled.len(),
            "valid entries dead-lettered as bad input",
        );
        add(self.delivered_and_dead_count, "delivered and dead-lettered");
        add(
            self.unknown_requests,
            "requests not matching a published entry",
        );
        v
    }
}

fn describe(p: &Published) -> String {
    let what = match p.hostile {
        Some(h) => h.name().to_owned(),
        None => p.message_key.clone().unwrap_or_default(),
    };
    format!(
        "{} {} seq {} ({what})",
        p.id,
        p.channel.as_deref().unwrap_or("-"),
        p.seq.map_or("-".into(), |s| s.to_string())
    )
}

fn push_example(list: &mut Vec<String>, s: String) {
    if list.len() < EXAMPLES {
        list.push(s);
    }
}

pub fn check(h: &History) -> Findings {
    let mut f = Findings {
        requests: h.requests.len(),
        pending: h.pending,
        ..Findings::default()
    };
    let by_id: HashMap<&str, &Published> = h.published.iter().map(|p| (p.id.as_str(), p)).collect();

    // The sink's answers, and each entry's first 2xx.
    let mut first_success: HashMap<&str, &Request> = HashMap::new();
    for r in &h.requests {
        let kind = match r.outcome {
            Outcome::Success { replay: false, .. } => "2xx",
            Outcome::Success { replay: true, .. } => "2xx (replayed for a repeated key)",
            Outcome::Status(429) => "429",
            Outcome::Status(_) => "5xx",
            Outcome::Hang => "hang",
            Outcome::Pending => "unanswered",
        };
        *f.answers.entry(kind).or_default() += 1;
        *f.actions
            .entry(r.action.clone().unwrap_or_else(|| "(none)".into()))
            .or_default() += 1;
        match r.stream_id.as_deref().and_then(|id| by_id.get(id)) {
            // The channel and seq the gateway sent must be the entry's own.
            Some(p) if r.channel == p.channel && (p.hostile.is_some() || r.seq == p.seq) => {
                let id = p.id.as_str();
                if r.is_success() {
                    first_success.entry(id).or_insert(r);
                }
            }
            _ => f.unknown_requests += 1,
        }
    }
    let mut dead: HashMap<&str, Vec<&DeadLetter>> = HashMap::new();
    for d in &h.dead_letters {
        *f.dead_by_kind.entry(d.error_kind.clone()).or_default() += 1;
        dead.entry(d.original_id.as_str()).or_default().push(d);
    }

    // G1, G6: every entry's end.
    for p in &h.published {
        let delivered = first_success.contains_key(p.id.as_str());
        let dls = dead.get(p.id.as_str());
        match p.hostile {
            None => {
                f.published_valid += 1;
                f.future_created += usize::from(p.future_created);
                if delivered {
                    f.delivered_valid += 1;
                }
                for d in dls.into_iter().flatten() {
                    *f.valid_dead_by_kind
                        .entry(d.error_kind.clone())
                        .or_default() += 1;
                    if BAD_INPUT_KINDS.contains(&d.error_kind.as_str()) {
                        f.valid_misfiled.push(format!(
                            "{} as {}: {}",
                            describe(p),
                            d.error_kind,
                            d.error
                        ));
                    }
                }
                if delivered && dls.is_some() {
                    f.delivered_and_dead_count += 1;
                    let kinds: Vec<&str> = dls
                        .into_iter()
                        .flatten()
                        .map(|d| d.error_kind.as_str())
                        .collect();
                    push_example(
                        &mut f.delivered_and_dead,
                        format!("{} delivered, and dead-lettered as {kinds:?}", describe(p)),
                    );
                }
                if !delivered && dls.is_none() {
                    lose(h, p, &mut f);
                }
            }
            Some(kind) => {
                f.published_hostile += 1;
                let entry = f.hostile.entry(kind).or_default();
                entry.0 += 1;
                let right = dls
                    .into_iter()
                    .flatten()
                    .any(|d| kind.expected_kinds().contains(&d.error_kind.as_str()));
                if right && !delivered {
                    entry.1 += 1;
                } else if delivered || dls.is_some() {
                    f.hostile_wrong_count += 1;
                    let how = if delivered {
                        "delivered".to_owned()
                    } else {
                        let d = dls.and_then(|v| v.first()).expect("dead-lettered");
                        format!("dead-lettered as `{}` ({})", d.error_kind, d.error)
                    };
                    push_example(
                        &mut f.hostile_wrong,
                        format!(
                            "{}: {how}, expected {:?}",
                            describe(p),
                            kind.expected_kinds()
                        ),
                    );
                } else {
                    lose(h, p, &mut f);
                }
            }
        }
    }

    duplicates(h, &mut f);
    order(h, &by_id, &first_success, &dead, &mut f);

    // Keys: what a gateway may write, and what forged keys named.
    let prefix_own = format!("sg:{{{}}}:", h.platform);
    let allowed = allowed_cache_keys(&h.published);
    let forged: HashSet<&str> = h
        .published
        .iter()
        .filter_map(|p| p.forged_key.as_deref())
        .collect();
    for k in &h.keys {
        if forged.contains(k.as_str()) {
            f.foreign
                .push(format!("{k} (named by a forged message_key)"));
        } else if !(k.starts_with(&prefix_own)
            || k.starts_with("sg:gateway:")
            || allowed.contains(k))
        {
            f.foreign.push(k.clone());
        }
    }
    f.foreign.sort();
    f
}

/// Stream ids in order: `(ms, seq)`.
fn id_key(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// Counts `p` as lost, with the state it was left in.
fn lose(h: &History, p: &Published, f: &mut Findings) {
    f.lost += 1;
    let state = if h.pending_ids.contains(&p.id) {
        "still pending in the group (stuck)"
    } else if h
        .last_delivered_id
        .as_deref()
        .is_none_or(|last| id_key(&p.id) > id_key(last))
    {
        "never read by the group"
    } else {
        "acknowledged without an outcome"
    };
    *f.lost_by_state.entry(state).or_default() += 1;
    push_example(&mut f.lost_examples, format!("{} — {state}", describe(p)));
}

/// G2: the same key answered 2xx twice, explained or not.
fn duplicates(h: &History, f: &mut Findings) {
    let mut by_key: HashMap<&str, Vec<&Request>> = HashMap::new();
    for r in h.requests.iter().filter(|r| r.is_success()) {
        by_key.entry(r.key.as_str()).or_default().push(r);
    }
    let mut keys: Vec<&&str> = by_key.keys().collect();
    keys.sort();
    for key in keys {
        let rs = &by_key[*key];
        for (i, r2) in rs.iter().enumerate().skip(1) {
            let earlier = &rs[..i];
            if earlier.iter().any(|r1| unhealthy_after(h, r1)) || stale_in_flight(h, r2) {
                f.dup_explained += 1;
                continue;
            }
            let r1 = earlier.last().expect("one before");
            let cause = cause_of(h, r1, r2);
            *f.dup_unexplained.entry(cause).or_default() += 1;
            push_example(
                &mut f.dup_examples,
                format!(
                    "{key}: 2xx to {} at {}, again to {} at {} ({cause})",
                    r1.incarnation,
                    r1.answered_ms.unwrap_or(0),
                    r2.incarnation,
                    r2.answered_ms.unwrap_or(0)
                ),
            );
        }
    }
}

/// The window in which the sender of `r` could not yet have recorded its
/// 2xx: from its arrival to [`GRACE_MS`] after the answer, stretched past
/// any Redis outage that overlaps it.
fn record_window(h: &History, r: &Request) -> (u64, u64) {
    let from = r.arrival_ms.saturating_sub(100);
    let mut to = r.answered_ms.unwrap_or(r.arrival_ms) + GRACE_MS;
    for o in &h.redis_outages {
        let until = o.until_ms.unwrap_or(u64::MAX);
        if o.from_ms <= to && until >= from {
            to = to.max(until.saturating_add(GRACE_MS));
        }
    }
    (from, to)
}

fn unhealthy_after(h: &History, r: &Request) -> bool {
    let (from, to) = record_window(h, r);
    h.gw_events.iter().any(|e| {
        e.incarnation == r.incarnation
            && matches!(e.kind, GwEventKind::Kill | GwEventKind::StopLong)
            && (from..=to).contains(&e.at_ms)
    })
}

/// `r` was sent by a gateway that had been SIGSTOPped past its leases and
/// arrived within [`GRACE_MS`] of its SIGCONT: a request the frozen process
/// had already begun, completing on resume after its channel moved on (the
/// send window of G2 — a stale holder is fenced at commit, not on the wire;
/// a de-duplicating platform drops the repeat by its idempotency key).
fn stale_in_flight(h: &History, r: &Request) -> bool {
    h.gw_events.iter().any(|e| {
        e.incarnation == r.incarnation
            && e.kind == GwEventKind::StopLong
            && e.at_ms <= r.arrival_ms
            && e.until_ms
                .is_some_and(|u| u <= r.arrival_ms && r.arrival_ms <= u + GRACE_MS)
    })
}

fn cause_of(h: &History, r1: &Request, r2: &Request) -> &'static str {
    let (from, to) = record_window(h, r1);
    if h.gw_events.iter().any(|e| {
        e.incarnation == r1.incarnation
            && e.kind == GwEventKind::StopShort
            && (from..=to).contains(&e.at_ms)
    }) {
        return "resent after a short SIGSTOP, within the leases";
    }
    if h.redis_outages
        .iter()
        .any(|o| o.from_ms <= r2.arrival_ms && o.until_ms.unwrap_or(u64::MAX) >= r1.arrival_ms)
    {
        return "resent after a Redis outage (G2/G10)";
    }
    if r1.incarnation == r2.incarnation {
        "resent by the same healthy gateway"
    } else {
        "resent by another gateway while the first was healthy"
    }
}

/// One first delivery in a channel's history.
struct Sent {
    arrival_ms: u64,
    /// When the sink answered it 2xx: the predecessor is complete only then.
    answered_ms: u64,
    seq: u64,
    id: String,
}

/// G3: per channel, a first delivery must not be dispatched before every
/// lower `seq` that was in the stream is complete (its 2xx answered, or it
/// was dead-lettered).
fn order(
    h: &History,
    by_id: &HashMap<&str, &Published>,
    first_success: &HashMap<&str, &Request>,
    dead: &HashMap<&str, Vec<&DeadLetter>>,
    f: &mut Findings,
) {
    // An entry is complete at its earliest 2xx, whichever copy gave it: a
    // copy still being answered for a gateway that died holding it is not
    // something its successor's sender could wait for.
    let mut earliest: HashMap<&str, u64> = HashMap::new();
    for r in h.requests.iter().filter(|r| r.is_success()) {
        if let Some(id) = r.stream_id.as_deref() {
            let at = r.answered_ms.unwrap_or(r.arrival_ms);
            earliest
                .entry(id)
                .and_modify(|e| *e = (*e).min(at))
                .or_insert(at);
        }
    }
    let mut channels: BTreeMap<&str, Vec<(usize, Sent)>> = BTreeMap::new();
    for (id, r) in first_success {
        let p = by_id[id];
        if let (Some(c), Some(seq)) = (p.channel.as_deref(), p.seq) {
            let answered = r.answered_ms.unwrap_or(r.arrival_ms);
            channels.entry(c).or_default().push((
                r.n,
                Sent {
                    arrival_ms: r.arrival_ms,
                    answered_ms: earliest.get(id).copied().unwrap_or(answered).min(answered),
                    seq,
                    id: p.id.clone(),
                },
            ));
        }
    }
    let mut sent_of: HashMap<&str, Vec<Sent>> = HashMap::new();
    for (c, mut list) in channels {
        // Arrival order (the sink numbers requests as they arrive).
        list.sort_by_key(|(n, _)| *n);
        let list: Vec<Sent> = list.into_iter().map(|(_, s)| s).collect();
        // max_upto[j]: the highest seq among the first j arrivals.
        let mut max_upto = vec![0u64; list.len() + 1];
        for (j, k) in list.iter().enumerate() {
            max_upto[j + 1] = max_upto[j].max(k.seq);
        }
        for m in &list {
            // Arrivals before m was complete: overtaking it is out of order…
            let done = list.partition_point(|k| k.arrival_ms < m.answered_ms);
            if max_upto[done] <= m.seq {
                continue;
            }
            // …when m was already in the stream then.
            let added = by_id[m.id.as_str()].added_ms();
            let from = list.partition_point(|k| k.arrival_ms < added);
            match list[from.min(done)..done].iter().find(|k| k.seq > m.seq) {
                Some(k) => {
                    f.out_of_order += 1;
                    push_example(
                        &mut f.ooo_examples,
                        format!(
                            "{c}: seq {} ({}) overtaken by seq {} ({}) {} ms before it completed",
                            m.seq,
                            m.id,
                            k.seq,
                            k.id,
                            m.answered_ms.saturating_sub(k.arrival_ms)
                        ),
                    );
                }
                None => f.late_predecessors += 1,
            }
        }
        sent_of.insert(c, list);
    }
    // A resend of an entry that already had its 2xx, after a successor went:
    // the engine skipped a predecessor that existed (pending on a dead
    // consumer); only the platform's de-duplication kept the order.
    let mut resends: HashMap<&str, Vec<&Request>> = HashMap::new();
    for r in &h.requests {
        if let Some(id) = r.stream_id.as_deref()
            && first_success.get(id).is_some_and(|first| r.n > first.n)
        {
            resends.entry(id).or_default().push(r);
        }
    }
    let mut ids: Vec<&&str> = resends.keys().collect();
    ids.sort();
    for id in ids {
        let p = by_id[*id];
        let (Some(c), Some(seq)) = (p.channel.as_deref(), p.seq) else {
            continue;
        };
        let Some(list) = sent_of.get(c) else { continue };
        let after = resends[*id]
            .iter()
            .filter(|rr| !stale_in_flight(h, rr))
            .find_map(|rr| {
                list.iter()
                    .find(|k| k.seq > seq && k.arrival_ms < rr.arrival_ms)
                    .map(|k| (rr, k))
            });
        if let Some((rr, k)) = after {
            f.resent_after_successor += 1;
            push_example(
                &mut f.ooo_examples,
                format!(
                    "{c}: seq {seq} ({}) resent by {} after seq {} ({}) was sent",
                    p.id, rr.incarnation, k.seq, k.id
                ),
            );
        }
    }
    // A successor sent before its (existing) predecessor was dead-lettered.
    for p in &h.published {
        let (Some(c), Some(seq)) = (p.channel.as_deref(), p.seq) else {
            continue;
        };
        if first_success.contains_key(p.id.as_str()) {
            continue;
        }
        let Some(failed) = dead
            .get(p.id.as_str())
            .and_then(|v| v.iter().map(|d| d.failed_ms).min())
        else {
            continue;
        };
        let Some(list) = sent_of.get(c) else { continue };
        let added = p.added_ms();
        let start = list.partition_point(|k| k.arrival_ms < added);
        if let Some(k) = list[start..]
            .iter()
            .take_while(|k| k.arrival_ms < failed)
            .find(|k| k.seq > seq)
        {
            f.out_of_order += 1;
            push_example(
                &mut f.ooo_examples,
                format!(
                    "{c}: seq {} ({}) sent before seq {seq} ({}) was dead-lettered",
                    k.seq, k.id, p.id
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(id: &str, channel: &str, seq: u64) -> Published {
        Published {
            id: id.into(),
            hostile: None,
            channel: Some(channel.into()),
            seq: Some(seq),
            message_key: Some(format!("sg:msg:{id}")),
            forged_key: None,
            future_created: false,
        }
    }

    fn ok(n: usize, p: &Published, inc: &str, at: u64) -> Request {
        Request {
            n,
            arrival_ms: at,
            answered_ms: Some(at + 1),
            incarnation: inc.into(),
            key: p.message_key.clone().unwrap(),
            channel: p.channel.clone(),
            seq: p.seq,
            stream_id: Some(p.id.clone()),
            action: Some("send_message".into()),
            outcome: Outcome::Success {
                replay: n > 0,
                with_id: true,
            },
        }
    }

    fn history(published: Vec<Published>, requests: Vec<Request>) -> History {
        History {
            platform: "hook".into(),
            published,
            requests,
            dead_letters: Vec::new(),
            pending: 0,
            pending_ids: HashSet::new(),
            last_delivered_id: None,
            keys: Vec::new(),
            gw_events: Vec::new(),
            redis_outages: Vec::new(),
        }
    }

    #[test]
    fn in_order_history_passes() {
        let a = valid("1000-0", "c0", 1);
        let b = valid("1001-0", "c0", 2);
        let h = history(
            vec![a.clone(), b.clone()],
            vec![ok(0, &a, "g0.1", 2000), ok(1, &b, "g0.1", 2001)],
        );
        let f = check(&h);
        assert!(f.violations().is_empty(), "{:?}", f.violations());
        assert_eq!(f.delivered_valid, 2);
    }

    #[test]
    fn a_skipped_existing_predecessor_is_out_of_order_a_late_one_is_not() {
        let a = valid("1000-0", "c0", 1);
        let b = valid("1001-0", "c0", 2);
        // `c` took seq 1 of c1 but reached the stream after seq 2 was sent.
        let c = valid("5000-0", "c1", 1);
        let d = valid("1002-0", "c1", 2);
        let h = history(
            vec![a.clone(), b.clone(), c.clone(), d.clone()],
            vec![
                ok(0, &b, "g0.1", 2000),
                ok(1, &a, "g0.1", 2001),
                ok(2, &d, "g0.1", 2002),
                ok(3, &c, "g0.1", 6000),
            ],
        );
        let f = check(&h);
        assert_eq!(f.out_of_order, 1);
        assert_eq!(f.late_predecessors, 1);
    }

    #[test]
    fn a_successor_sent_while_its_predecessor_is_in_flight_is_out_of_order() {
        let a = valid("1000-0", "c0", 1);
        let b = valid("1001-0", "c0", 2);
        let mut slow = ok(0, &a, "g0.1", 2000);
        slow.answered_ms = Some(6000);
        let h = history(
            vec![a.clone(), b.clone()],
            vec![slow, ok(1, &b, "g1.1", 3000)],
        );
        assert_eq!(check(&h).out_of_order, 1);
    }

    #[test]
    fn a_resend_after_a_kill_is_explained_other_resends_are_not() {
        let a = valid("1000-0", "c0", 1);
        let b = valid("1001-0", "c0", 2);
        let mut h = history(
            vec![a.clone(), b.clone()],
            vec![
                ok(0, &a, "g0.1", 2000),
                ok(1, &b, "g1.1", 2100),
                ok(2, &a, "g0.2", 70_000),
                ok(3, &b, "g2.1", 70_001),
            ],
        );
        h.gw_events.push(GwEvent {
            incarnation: "g0.1".into(),
            at_ms: 2500,
            kind: GwEventKind::Kill,
            until_ms: Some(2500),
        });
        let f = check(&h);
        assert_eq!(f.dup_explained, 1);
        assert_eq!(f.unexplained_dups(), 1);
        assert_eq!(f.out_of_order, 0);
        // seq 1 came again after seq 2 had gone: an existing entry skipped.
        assert_eq!(f.resent_after_successor, 1);
    }

    #[test]
    fn a_frozen_gateways_request_completing_on_resume_is_explained_only_then() {
        let a = valid("1000-0", "c0", 1);
        let b = valid("1001-0", "c0", 2);
        let mut h = history(
            vec![a.clone(), b.clone()],
            vec![
                ok(0, &a, "g1.1", 2000),
                ok(1, &b, "g1.1", 2100),
                // g0.1 froze at 1000 with a's request begun, resumed at 20_000:
                ok(2, &a, "g0.1", 20_050),
                // …while this repeat comes long after its resume.
                ok(3, &b, "g0.1", 40_000),
            ],
        );
        h.gw_events.push(GwEvent {
            incarnation: "g0.1".into(),
            at_ms: 1000,
            kind: GwEventKind::StopLong,
            until_ms: Some(20_000),
        });
        let f = check(&h);
        assert_eq!(f.dup_explained, 1);
        assert_eq!(f.unexplained_dups(), 1);
        assert_eq!(f.resent_after_successor, 0, "a's stale repeat is explained");
    }

    #[test]
    fn a_dead_gateways_slow_copy_does_not_make_its_successor_out_of_order() {
        let a = valid("1000-0", "c0", 1);
        let b = valid("1001-0", "c0", 2);
        let mut slow = ok(0, &a, "g0.1", 2000);
        slow.answered_ms = Some(9000); // still being answered when g0.1 died
        let h = history(
            vec![a.clone(), b.clone()],
            vec![slow, ok(1, &a, "g0.2", 5000), ok(2, &b, "g0.2", 5010)],
        );
        let f = check(&h);
        assert_eq!(f.out_of_order, 0);
        // Without the second copy the successor did overtake it.
        let mut slow = ok(0, &a, "g0.1", 2000);
        slow.answered_ms = Some(9000);
        let h = history(
            vec![a.clone(), b.clone()],
            vec![slow, ok(2, &b, "g0.2", 5010)],
        );
        assert_eq!(check(&h).out_of_order, 1);
    }

    #[test]
    fn lost_foreign_and_forged_keys_are_found() {
        let a = valid("1000-0", "c0", 1);
        let mut forged = valid("1001-0", "c0", 2);
        forged.message_key = None;
        forged.hostile = Some(Hostile::ForgedChannelKey);
        forged.forged_key = Some("sg:{hook}:chan:forged-1".into());
        let mut h = history(vec![a.clone(), forged], Vec::new());
        h.keys = vec![
            "sg:{hook}:outbound".into(),
            "sg:gateway:anything".into(),
            "sg:{hook}:chan:forged-1".into(),
            "sg:msg:1000-0".into(),
            "sg:msg:unnamed".into(),
            "elsewhere".into(),
        ];
        let f = check(&h);
        assert_eq!(f.lost, 2);
        assert_eq!(f.foreign.len(), 3, "{:?}", f.foreign);
    }
}
