//! `stargazer dlq`: inspect, replay and purge a platform's dead letters.
//!
//! A selection is a [`Filter`] (error kind, channel, since, limit) applied
//! while paging through the dead-letter stream. Replay rebuilds each entry's
//! envelope — same idempotency key, no `seq` (the gate would hold it back
//! behind numbers long passed), `replayed_from` = the original id — and moves
//! it to the outbound stream with one script (XADD + XDEL, atomic). Purge
//! deletes the selection. Both count what they did, and both work in two
//! passes: first the ids of the selection (so a dead letter that arrives
//! meanwhile is not swept along), then the action.

use std::collections::HashSet;
use std::time::Duration;

use redis::RedisResult;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::bus::{Bus, RawEntry};
use crate::envelope::sign;

/// Entries read per XRANGE page.
const PAGE: usize = 500;
/// Entries read per XREVRANGE while a filtered page looks for matches
/// (smaller than [`PAGE`]: dead letters of `too_large` carry big payloads).
const FILTERED_CHUNK: usize = 200;
/// Selections larger than this show a progress bar (on a terminal).
const BAR_ABOVE: usize = 100;

/// Where a selection starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Since {
    /// Dead-lettered within this long before now.
    Ago(Duration),
    /// From this dead-letter stream id (inclusive).
    Id(String),
}

impl Since {
    /// `10m`, `2h`, `1d`, `30s`, `500ms`, or a stream id (`1712345678901-0`, `1712345678901`).
    pub fn parse(s: &str) -> Result<Since, String> {
        let s = s.trim();
        let is_id = {
            let (a, b) = s.split_once('-').unwrap_or((s, "0"));
            !a.is_empty()
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
                && !b.is_empty()
        };
        if is_id {
            return Ok(Since::Id(s.to_owned()));
        }
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (n, unit) = s.split_at(split);
        let n: u64 = n
            .parse()
            .map_err(|_| format!("`{s}` is neither a duration (10m, 2h, 1d) nor a stream id"))?;
        let ms = match unit {
            "ms" => n,
            "s" => n * 1000,
            "m" => n * 60_000,
            "h" => n * 3_600_000,
            "d" => n * 86_400_000,
            _ => {
                return Err(format!(
                    "`{s}`: unknown unit `{unit}` (use ms, s, m, h or d)"
                ));
            }
        };
        Ok(Since::Ago(Duration::from_millis(ms)))
    }

    /// The XRANGE start for this bound, relative to `now_ms`.
    fn start(&self, now_ms: u64) -> String {
        match self {
            Since::Id(id) => id.clone(),
            Since::Ago(d) => format!("{}-0", now_ms.saturating_sub(d.as_millis() as u64)),
        }
    }
}

/// Which dead letters an action applies to.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// `error_kind` equals this.
    pub kind: Option<String>,
    /// The envelope's `channel_id` equals this.
    pub channel: Option<String>,
    pub since: Option<Since>,
    /// At most this many (oldest first).
    pub limit: Option<usize>,
}

impl Filter {
    fn matches(&self, e: &DeadLetterEntry) -> bool {
        self.kind.as_ref().is_none_or(|k| &e.error_kind == k)
            && self
                .channel
                .as_ref()
                .is_none_or(|c| e.channel_id.as_ref() == Some(c))
    }
}

/// One dead letter, decoded.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterEntry {
    /// Its id in the dead-letter stream.
    pub id: String,
    pub original_id: String,
    pub error_kind: String,
    pub error: String,
    pub attempts: u64,
    pub consumer: String,
    pub failed_ms: u64,
    pub channel_id: Option<String>,
    pub seq: Option<u64>,
    /// The payload as JSON when it parses, else `None` (see `payload_text`).
    pub envelope: Option<Value>,
    /// The raw payload when it is not JSON (lossy UTF-8).
    pub payload_text: Option<String>,
    #[serde(skip)]
    pub payload: Vec<u8>,
    #[serde(skip)]
    pub sig: Option<String>,
}

impl DeadLetterEntry {
    pub fn from_raw(raw: RawEntry) -> DeadLetterEntry {
        let f = |k: &str| {
            raw.fields
                .get(k)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let payload = raw.fields.get("payload").cloned().unwrap_or_default();
        let envelope = serde_json::from_slice::<Value>(&payload).ok();
        let channel_id = f("channel_id").or_else(|| {
            envelope
                .as_ref()
                .and_then(|e| e.get("channel_id"))
                .and_then(|c| match c {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
        });
        DeadLetterEntry {
            id: raw.id.0,
            original_id: f("original_id").unwrap_or_default(),
            error_kind: f("error_kind").unwrap_or_default(),
            error: f("error").unwrap_or_default(),
            attempts: f("attempts").and_then(|a| a.parse().ok()).unwrap_or(0),
            consumer: f("consumer").unwrap_or_default(),
            failed_ms: f("failed_ms").and_then(|a| a.parse().ok()).unwrap_or(0),
            channel_id,
            seq: f("seq").and_then(|a| a.parse().ok()),
            payload_text: envelope
                .is_none()
                .then(|| String::from_utf8_lossy(&payload).into_owned()),
            envelope,
            payload,
            sig: f("sig"),
        }
    }

    /// The envelope for display: pretty JSON, with long `file_data` shortened.
    pub fn pretty_envelope(&self) -> String {
        match &self.envelope {
            Some(Value::Object(m)) => {
                let mut m = m.clone();
                if let Some(Value::String(d)) = m.get("file_data")
                    && d.len() > 64
                {
                    let short = format!("{}… ({} bytes of base64)", &d[..48], d.len());
                    m.insert("file_data".into(), Value::String(short));
                }
                serde_json::to_string_pretty(&Value::Object(m)).unwrap_or_default()
            }
            Some(v) => serde_json::to_string_pretty(v).unwrap_or_default(),
            None => format!(
                "(not JSON) {:?}",
                self.payload_text.as_deref().unwrap_or_default()
            ),
        }
    }
}

/// Pages through the dead-letter stream, yielding the entries a filter selects.
struct Pager<'a> {
    bus: &'a Bus,
    filter: &'a Filter,
    next: Option<String>,
    end: String,
    /// How many the filter may still select (its limit).
    left: usize,
}

impl<'a> Pager<'a> {
    fn new(bus: &'a Bus, filter: &'a Filter, now_ms: u64) -> Pager<'a> {
        Pager {
            bus,
            filter,
            next: Some(
                filter
                    .since
                    .as_ref()
                    .map(|s| s.start(now_ms))
                    .unwrap_or_else(|| "-".into()),
            ),
            end: "+".into(),
            left: filter.limit.unwrap_or(usize::MAX),
        }
    }

    async fn page(&mut self) -> RedisResult<Option<Vec<DeadLetterEntry>>> {
        let Some(start) = self.next.take() else {
            return Ok(None);
        };
        if self.left == 0 {
            return Ok(None);
        }
        let raw = self.bus.dlq_range(&start, &self.end, PAGE).await?;
        if raw.len() == PAGE
            && let Some(last) = raw.last()
        {
            self.next = Some(format!("({}", last.id.0));
        }
        let mut out = Vec::new();
        for r in raw {
            let e = DeadLetterEntry::from_raw(r);
            if self.filter.matches(&e) && self.left > 0 {
                self.left -= 1;
                out.push(e);
            }
        }
        Ok(Some(out))
    }
}

/// The dead letters `filter` selects, oldest first.
pub async fn list(bus: &Bus, filter: &Filter) -> RedisResult<Vec<DeadLetterEntry>> {
    let now = bus.server_time_ms().await?;
    let mut pager = Pager::new(bus, filter, now);
    let mut out = Vec::new();
    while let Some(page) = pager.page().await? {
        out.extend(page);
    }
    Ok(out)
}

/// One dead letter by its id in the dead-letter stream.
pub async fn show(bus: &Bus, id: &str) -> RedisResult<Option<DeadLetterEntry>> {
    Ok(bus
        .dlq_range(id, id, 1)
        .await?
        .into_iter()
        .next()
        .map(DeadLetterEntry::from_raw))
}

/// One page of the dead-letter stream, newest first (the dashboard's table).
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub entries: Vec<DeadLetterEntry>,
    /// Where the next, older page starts (exclusive): pass it as `before`.
    /// `None` when the selection has nothing older.
    pub next_before: Option<String>,
    /// Dead letters read to fill this page (more than `entries` when a
    /// filter skips some).
    pub scanned: usize,
    /// The page stopped at the scan budget before it was full: older
    /// matches may follow from `next_before`.
    pub partial: bool,
}

/// What [`page`] reads: the filter's kind, channel and lower time bound
/// (`since`), an upper bound, and where the previous page ended.
#[derive(Debug, Clone, Default)]
pub struct PageQuery {
    pub filter: Filter,
    /// Dead-lettered at or before this (a duration ago, or a stream id).
    pub until: Option<Since>,
    /// Only entries older than this dead-letter id (the previous page's `next_before`).
    pub before: Option<String>,
    /// Entries per page.
    pub limit: usize,
    /// Most entries read for one page when a filter skips many.
    pub scan_budget: usize,
}

/// One page, newest first: `XREVRANGE` with `COUNT` from an exclusive start,
/// so the cost is that of the page, however long the stream.
pub async fn page(bus: &Bus, q: &PageQuery) -> RedisResult<Page> {
    let now = bus.server_time_ms().await?;
    let limit = q.limit.max(1);
    let budget = q.scan_budget.max(limit);
    let start = q
        .filter
        .since
        .as_ref()
        .map(|s| s.start(now))
        .unwrap_or_else(|| "-".into());
    let mut end = match (&q.before, &q.until) {
        (Some(b), _) => format!("({b}"),
        (None, Some(Since::Id(id))) => id.clone(),
        (None, Some(Since::Ago(d))) => {
            format!("{}-{}", now.saturating_sub(d.as_millis() as u64), u64::MAX)
        }
        (None, None) => "+".into(),
    };
    let filtered = q.filter.kind.is_some() || q.filter.channel.is_some();
    let mut out = Page {
        entries: Vec::with_capacity(limit),
        next_before: None,
        scanned: 0,
        partial: false,
    };
    loop {
        // One more than the page needs, to know whether anything is older.
        let want = if filtered {
            FILTERED_CHUNK.min(budget - out.scanned + 1)
        } else {
            limit - out.entries.len() + 1
        };
        let raw = bus.dlq_rev_range(&end, &start, want).await?;
        let exhausted = raw.len() < want;
        let Some(last) = raw.last() else {
            out.next_before = None;
            return Ok(out);
        };
        end = format!("({}", last.id.0);
        for r in raw {
            if out.entries.len() == limit || out.scanned == budget {
                // Something older exists; the next page starts after the
                // last entry read.
                out.partial = out.entries.len() < limit;
                return Ok(out);
            }
            out.scanned += 1;
            out.next_before = Some(r.id.0.clone());
            let e = DeadLetterEntry::from_raw(r);
            if q.filter.matches(&e) {
                out.entries.push(e);
            }
        }
        if exhausted {
            out.next_before = None;
            return Ok(out);
        }
    }
}

/// Ids of the selection (first pass of replay and purge).
async fn select_ids(bus: &Bus, filter: &Filter, now: u64) -> RedisResult<Vec<String>> {
    let mut pager = Pager::new(bus, filter, now);
    let mut ids = Vec::new();
    while let Some(page) = pager.page().await? {
        ids.extend(page.into_iter().map(|e| e.id));
    }
    Ok(ids)
}

/// What to act on: one id, or a filtered selection (`Filter::default()` = all).
#[derive(Debug, Clone)]
pub enum Selection {
    One(String),
    /// Several dead letters by id (the dashboard's ticked rows).
    Ids(Vec<String>),
    Filter(Filter),
}

/// One replayed (or, in a dry run, replayable) dead letter.
#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    pub dlq_id: String,
    pub original_id: String,
    pub idempotency_key: String,
    /// The new outbound stream id (`None` in a dry run).
    pub new_id: Option<String>,
}

/// One dead letter left where it is, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub dlq_id: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayReport {
    pub dry_run: bool,
    pub replayed: Vec<Replayed>,
    pub skipped: Vec<Skipped>,
}

/// How replay re-publishes.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Print nothing, change nothing: report what would be replayed.
    pub dry_run: bool,
    /// The platform's signing secret: replayed entries are signed with it.
    pub signing_secret: Option<Vec<u8>>,
    /// Show a progress bar for long selections when stdout is a terminal.
    pub progress: bool,
}

/// The envelope of a dead letter that can be replayed, or why it cannot be
/// (cheap: nothing is copied).
pub fn replayable(e: &DeadLetterEntry) -> Result<&Map<String, Value>, String> {
    if e.payload.is_empty() {
        return Err(format!(
            "no payload to replay ({}: the entry was gone from the stream before delivery)",
            e.error_kind
        ));
    }
    let Some(Value::Object(env)) = &e.envelope else {
        return Err(
            "the payload is not a JSON object; it would only be dead-lettered again".into(),
        );
    };
    Ok(env)
}

/// The envelope a dead letter is replayed as, with its idempotency key; or
/// why it cannot be.
pub fn rebuild(e: &DeadLetterEntry, platform: &str) -> Result<(Vec<u8>, String), String> {
    let env = replayable(e)?;
    let mut env: Map<String, Value> = env.clone();
    let original = if e.original_id.is_empty() {
        e.id.clone()
    } else {
        e.original_id.clone()
    };
    let key = |k: &str| env.get(k).and_then(Value::as_str).map(str::to_owned);
    let idem = key("idempotency_key")
        .or_else(|| key("message_key"))
        .unwrap_or_else(|| format!("{platform}:{original}"));
    env.insert("idempotency_key".into(), Value::String(idem.clone()));
    env.remove("seq");
    env.insert("replayed_from".into(), Value::String(original));
    Ok((Value::Object(env).to_string().into_bytes(), idem))
}

fn bar(total: usize, show: bool, what: &str) -> Option<indicatif::ProgressBar> {
    if !show || total <= BAR_ABOVE {
        return None;
    }
    super::progress_bar(total as u64, what)
}

/// Replay one decoded dead letter (rebuild, then move it atomically), noting
/// the outcome in `report`.
async fn replay_entry(
    bus: &Bus,
    e: DeadLetterEntry,
    platform: &str,
    opts: &ReplayOptions,
    report: &mut ReplayReport,
) -> RedisResult<()> {
    let (payload, idem) = match rebuild(&e, platform) {
        Ok(r) => r,
        Err(reason) => {
            report.skipped.push(Skipped {
                dlq_id: e.id,
                reason,
            });
            return Ok(());
        }
    };
    let mut done = Replayed {
        dlq_id: e.id.clone(),
        original_id: e.original_id.clone(),
        idempotency_key: idem,
        new_id: None,
    };
    if !opts.dry_run {
        let sig = opts.signing_secret.as_ref().map(|s| sign(s, &payload));
        match bus
            .replay_dead_letter(&e.id, &payload, sig.as_deref())
            .await?
        {
            Some(new) => done.new_id = Some(new.0),
            None => {
                report.skipped.push(Skipped {
                    dlq_id: e.id,
                    reason: "gone from the dead-letter stream meanwhile".into(),
                });
                return Ok(());
            }
        }
    }
    report.replayed.push(done);
    Ok(())
}

/// Replay a selection to the outbound stream (see the module doc).
pub async fn replay(bus: &Bus, sel: &Selection, opts: &ReplayOptions) -> RedisResult<ReplayReport> {
    let now = bus.server_time_ms().await?;
    let platform = bus.keys().platform().to_owned();
    let mut report = ReplayReport {
        dry_run: opts.dry_run,
        ..ReplayReport::default()
    };
    let what = if opts.dry_run {
        "checking"
    } else {
        "replaying"
    };
    let filter = match sel {
        Selection::One(id) => return replay_ids(bus, std::slice::from_ref(id), opts, report).await,
        Selection::Ids(ids) => return replay_ids(bus, ids, opts, report).await,
        Selection::Filter(f) => f,
    };
    let ids = select_ids(bus, filter, now).await?;
    if ids.is_empty() {
        return Ok(report);
    }
    let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let pb = bar(ids.len(), opts.progress, what);
    // Second pass over exactly the range the ids span.
    let range = Filter {
        kind: filter.kind.clone(),
        channel: filter.channel.clone(),
        since: Some(Since::Id(ids[0].clone())),
        limit: None,
    };
    let mut pager = Pager::new(bus, &range, now);
    pager.end = ids[ids.len() - 1].clone();
    while let Some(page) = pager.page().await? {
        for e in page {
            if !wanted.contains(e.id.as_str()) {
                continue;
            }
            if let Some(pb) = &pb {
                pb.inc(1);
            }
            replay_entry(bus, e, &platform, opts, &mut report).await?;
        }
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    Ok(report)
}

/// Replay dead letters named by id, each looked up on its own (a sparse
/// selection never scans the range between its ids); an id not in the
/// stream is skipped as "no such dead letter".
async fn replay_ids(
    bus: &Bus,
    ids: &[String],
    opts: &ReplayOptions,
    mut report: ReplayReport,
) -> RedisResult<ReplayReport> {
    let platform = bus.keys().platform().to_owned();
    let pb = bar(ids.len(), opts.progress, "replaying");
    for id in unique(ids) {
        if let Some(pb) = &pb {
            pb.inc(1);
        }
        match show(bus, id).await? {
            Some(e) => replay_entry(bus, e, &platform, opts, &mut report).await?,
            None => report.skipped.push(Skipped {
                dlq_id: id.clone(),
                reason: "no such dead letter".into(),
            }),
        }
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    Ok(report)
}

/// `ids` without repeats, in their first order.
fn unique(ids: &[String]) -> Vec<&String> {
    let mut seen = HashSet::new();
    ids.iter().filter(|id| seen.insert(id.as_str())).collect()
}

/// Which of `ids` the dead-letter stream holds (one XRANGE each).
async fn existing(bus: &Bus, ids: &[String]) -> RedisResult<Vec<String>> {
    let mut out = Vec::new();
    for id in unique(ids) {
        if !bus.dlq_range(id, id, 1).await?.is_empty() {
            out.push(id.clone());
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PurgeReport {
    /// Entries the selection holds.
    pub selected: u64,
    /// Entries deleted (0 unless confirmed).
    pub deleted: u64,
}

/// Delete a selection; without `confirmed`, only count it.
pub async fn purge(
    bus: &Bus,
    sel: &Selection,
    confirmed: bool,
    progress: bool,
) -> RedisResult<PurgeReport> {
    let now = bus.server_time_ms().await?;
    let ids = match sel {
        Selection::One(id) => existing(bus, std::slice::from_ref(id)).await?,
        Selection::Ids(ids) => existing(bus, ids).await?,
        Selection::Filter(f) => select_ids(bus, f, now).await?,
    };
    let mut report = PurgeReport {
        selected: ids.len() as u64,
        deleted: 0,
    };
    if !confirmed {
        return Ok(report);
    }
    let pb = bar(ids.len(), progress, "deleting");
    for chunk in ids.chunks(PAGE) {
        report.deleted += bus.delete_dead_letters(chunk).await?;
        if let Some(pb) = &pb {
            pb.inc(chunk.len() as u64);
        }
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn since_takes_durations_and_ids() {
        assert_eq!(
            Since::parse("10m"),
            Ok(Since::Ago(Duration::from_secs(600)))
        );
        assert_eq!(
            Since::parse("2h"),
            Ok(Since::Ago(Duration::from_secs(7200)))
        );
        assert_eq!(
            Since::parse("1d"),
            Ok(Since::Ago(Duration::from_secs(86_400)))
        );
        assert_eq!(Since::parse("1712-3"), Ok(Since::Id("1712-3".into())));
        assert_eq!(Since::parse("1712"), Ok(Since::Id("1712".into())));
        assert!(Since::parse("soon").is_err());
        assert!(Since::parse("5y").is_err());
    }

    fn entry(payload: &str) -> DeadLetterEntry {
        let mut fields = HashMap::new();
        fields.insert("payload".to_owned(), payload.as_bytes().to_vec());
        fields.insert("original_id".to_owned(), b"5-1".to_vec());
        fields.insert("error_kind".to_owned(), b"rejected".to_vec());
        DeadLetterEntry::from_raw(RawEntry {
            id: crate::envelope::StreamId("9-0".into()),
            fields,
        })
    }

    #[test]
    fn rebuild_keeps_the_key_and_drops_seq() {
        let (p, k) = rebuild(
            &entry(r#"{"channel_id":"c","text":"t","seq":4,"message_key":"sg:m:1"}"#),
            "hook",
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(k, "sg:m:1");
        assert_eq!(v["idempotency_key"], "sg:m:1");
        assert_eq!(v["replayed_from"], "5-1");
        assert!(v.get("seq").is_none());
        let (_, k) = rebuild(
            &entry(r#"{"channel_id":"c","text":"t","idempotency_key":"i","message_key":"m"}"#),
            "hook",
        )
        .unwrap();
        assert_eq!(k, "i");
        let (_, k) = rebuild(&entry(r#"{"channel_id":"c","text":"t"}"#), "hook").unwrap();
        assert_eq!(k, "hook:5-1");
        assert!(rebuild(&entry("not json"), "hook").is_err());
        assert!(rebuild(&entry(""), "hook").is_err());
    }
}
