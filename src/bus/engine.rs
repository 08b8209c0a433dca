//! The engine's Redis steps (see `lua/prelude.lua` for the layout): node
//! liveness, channel ownership, hand-off to the owner, the batched commit,
//! de-duplication records, and the reads the gap proof and recovery need.

use std::collections::HashMap;
use std::time::Duration;

use redis::{RedisResult, Value};

use super::{Bus, Conn, RawEntry, Scripts, as_str, as_string, as_u64, parse_entries, unexpected};
use crate::envelope::StreamId;

/// One running gateway instance: its name in the consumer group, and the
/// instance id (`<consumer>/<random>`) it registers, owns channels and
/// commits as. A restart under the same name is a new instance.
#[derive(Debug, Clone)]
pub struct Identity {
    pub consumer: String,
    pub instance: String,
}

impl Identity {
    pub fn new(consumer: &str) -> Identity {
        Identity {
            consumer: consumer.to_owned(),
            instance: format!("{consumer}/{:016x}", rand::random::<u64>()),
        }
    }
}

/// What one heartbeat saw.
#[derive(Debug, Clone)]
pub enum Beat {
    /// This instance is no longer registered (declared dead, or replaced by a
    /// newer instance of its name): it must drop what it holds and start over.
    Lost,
    Ok {
        /// consumer → instance, for every registered node.
        nodes: HashMap<String, String>,
        /// consumer → beat counter.
        beats: HashMap<String, String>,
        /// Consumers with pending entries, and how many.
        pending: Vec<(String, u64)>,
    },
}

/// The answer to taking a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    /// This instance is no longer registered.
    Lost,
    /// A live peer (this instance id) owns the channel.
    Peer(String),
    /// Ours, with its fencing token and delivered mark.
    Mine { token: u64, done: u64 },
}

/// A dead letter to write (SPEC §2 fields).
#[derive(Debug, Clone)]
pub struct DeadRecord {
    pub id: StreamId,
    /// Write it even when the entry is no longer pending (lost from the
    /// stream, its pending record went with the claim that found it).
    pub force: bool,
    pub fields: Vec<(&'static str, Vec<u8>)>,
}

/// One batch of finished entries, across channels of one platform.
#[derive(Debug, Default, Clone)]
pub struct CommitBatch {
    /// Channel state keys with their new delivered mark (None: unchanged).
    pub marks: Vec<(String, Option<u64>)>,
    /// Entries delivered or skipped.
    pub acks: Vec<StreamId>,
    /// De-duplication records: idempotency key → platform message id (`-` for none).
    pub sent: Vec<(String, String)>,
    /// In-flight records to clear (only kept with `unknown_outcome = "dead_letter"`).
    pub sending: Vec<StreamId>,
    pub dead: Vec<DeadRecord>,
}

impl CommitBatch {
    pub fn is_empty(&self) -> bool {
        self.marks.is_empty() && self.acks.is_empty() && self.dead.is_empty()
    }
}

/// The answer to a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// Written; this many dead letters were new (a retried commit writes none twice).
    Ok { dead_written: u64 },
    /// This instance is no longer registered: nothing was written.
    Stale,
}

/// An entry looked up by id: its fields, or `None` when the stream no longer holds it.
pub type Fetched = (StreamId, Option<RawEntry>);

fn flat_map(v: &Value) -> HashMap<String, String> {
    let mut out = HashMap::new();
    if let Value::Array(items) = v {
        for pair in items.chunks(2) {
            if let [k, v] = pair
                && let (Some(k), Some(v)) = (as_str(k), as_str(v))
            {
                out.insert(k.to_owned(), v.to_owned());
            }
        }
    }
    out
}

impl Bus {
    /// Register `who` (replacing an earlier instance of the same name).
    pub async fn register(&self, who: &Identity) -> RedisResult<Option<String>> {
        let mut conn = self.conn.clone();
        let v: Value = Scripts::get()
            .register
            .key(self.keys.nodes())
            .key(self.keys.beats())
            .key(self.keys.inbox(&who.consumer))
            .arg(&who.consumer)
            .arg(&who.instance)
            .invoke_async(&mut conn)
            .await?;
        Ok(as_str(&v).map(str::to_owned))
    }

    /// Heartbeat, and what the liveness loop needs to judge the other nodes.
    pub async fn beat(&self, who: &Identity) -> RedisResult<Beat> {
        let mut conn = self.conn.clone();
        let v: Value = Scripts::get()
            .beat
            .key(self.keys.nodes())
            .key(self.keys.beats())
            .key(self.keys.outbound())
            .arg(&who.consumer)
            .arg(&who.instance)
            .arg(self.keys.group())
            .invoke_async(&mut conn)
            .await?;
        let Value::Array(items) = &v else {
            return Err(unexpected("beat", &v));
        };
        match items.first().and_then(as_str) {
            Some("lost") => Ok(Beat::Lost),
            Some("ok") if items.len() == 4 => {
                let mut pending = Vec::new();
                if let Value::Array(cs) = &items[3] {
                    for c in cs {
                        if let Value::Array(pair) = c
                            && let [name, count] = pair.as_slice()
                            && let (Some(name), Some(count)) = (as_str(name), as_u64(count))
                        {
                            pending.push((name.to_owned(), count));
                        }
                    }
                }
                Ok(Beat::Ok {
                    nodes: flat_map(&items[1]),
                    beats: flat_map(&items[2]),
                    pending,
                })
            }
            _ => Err(unexpected("beat", &v)),
        }
    }

    /// Declare `consumer` dead if it is still `instance` at beat `beat`.
    pub async fn verdict(&self, consumer: &str, instance: &str, beat: &str) -> RedisResult<bool> {
        let mut conn = self.conn.clone();
        let n: i64 = Scripts::get()
            .verdict
            .key(self.keys.nodes())
            .key(self.keys.beats())
            .key(self.keys.inbox(consumer))
            .arg(consumer)
            .arg(instance)
            .arg(beat)
            .invoke_async(&mut conn)
            .await?;
        Ok(n == 1)
    }

    /// Unregister at shutdown: what is left pending is claimed by peers at once.
    pub async fn leave(&self, who: &Identity) -> RedisResult<bool> {
        let mut conn = self.conn.clone();
        let n: i64 = Scripts::get()
            .leave
            .key(self.keys.nodes())
            .key(self.keys.beats())
            .arg(&who.consumer)
            .arg(&who.instance)
            .invoke_async(&mut conn)
            .await?;
        Ok(n == 1)
    }

    /// Take the channel whose state key is `chan`, or learn which live peer owns it.
    pub async fn acquire(&self, who: &Identity, chan: &str) -> RedisResult<Acquire> {
        let mut conn = self.conn.clone();
        let v: Value = Scripts::get()
            .acquire
            .key(chan)
            .key(self.keys.nodes())
            .arg(&who.instance)
            .invoke_async(&mut conn)
            .await?;
        let Value::Array(items) = &v else {
            return Err(unexpected("acquire", &v));
        };
        match items.first().and_then(as_str) {
            Some("lost") => Ok(Acquire::Lost),
            Some("peer") => Ok(Acquire::Peer(
                items.get(1).and_then(as_str).unwrap_or("").to_owned(),
            )),
            Some("mine") => Ok(Acquire::Mine {
                token: items.get(1).and_then(as_u64).unwrap_or(0),
                done: items.get(2).and_then(as_u64).unwrap_or(0),
            }),
            _ => Err(unexpected("acquire", &v)),
        }
    }

    /// Give the channel up if it is still ours.
    pub async fn release(&self, who: &Identity, chan: &str) -> RedisResult<bool> {
        let mut conn = self.conn.clone();
        let n: i64 = Scripts::get()
            .release
            .key(chan)
            .arg(&who.instance)
            .invoke_async(&mut conn)
            .await?;
        Ok(n == 1)
    }

    /// Note in the channel hash that its owner waits for `seq` since `since_ms`
    /// (read by `stargazer status`), or clear that note (`None`).
    pub async fn note_gap(&self, chan: &str, gap: Option<(u64, u64)>) -> RedisResult<()> {
        let mut conn = self.conn.clone();
        match gap {
            Some((seq, since)) => {
                redis::cmd("HSET")
                    .arg(chan)
                    .arg("gap_seq")
                    .arg(seq)
                    .arg("gap_since")
                    .arg(since)
                    .query_async::<()>(&mut conn)
                    .await
            }
            None => {
                redis::cmd("HDEL")
                    .arg(chan)
                    .arg("gap_seq")
                    .arg("gap_since")
                    .query_async::<()>(&mut conn)
                    .await
            }
        }
    }

    /// Hand entries to the live peer `instance` (`<consumer>/<random>`) that
    /// owns their channel. False when that peer is no longer live.
    pub async fn handoff(&self, instance: &str, ids: &[StreamId]) -> RedisResult<bool> {
        let Some((consumer, _)) = instance.rsplit_once('/') else {
            return Ok(false);
        };
        for chunk in ids.chunks(1000) {
            let mut conn = self.conn.clone();
            let mut inv = Scripts::get().handoff.prepare_invoke();
            inv.key(self.keys.outbound())
                .key(self.keys.nodes())
                .key(self.keys.inbox(consumer))
                .arg(self.keys.group())
                .arg(consumer)
                .arg(instance);
            for id in chunk {
                inv.arg(&id.0);
            }
            let n: i64 = inv.invoke_async(&mut conn).await?;
            if n != 1 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Ids handed to `consumer`, waiting up to `wait` for the first (on a
    /// blocking connection of its own).
    pub async fn inbox_pop(
        &self,
        conn: &mut Conn,
        consumer: &str,
        wait: Duration,
    ) -> RedisResult<Vec<StreamId>> {
        let v: Value = redis::cmd("BLMPOP")
            .arg(wait.as_secs_f64().max(0.01))
            .arg(1)
            .arg(self.keys.inbox(consumer))
            .arg("LEFT")
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        // [key, [id, …]] or nil
        let Value::Array(parts) = v else {
            return Ok(Vec::new());
        };
        Ok(match parts.into_iter().nth(1) {
            Some(Value::Array(ids)) => ids
                .into_iter()
                .filter_map(as_string)
                .map(StreamId)
                .collect(),
            _ => Vec::new(),
        })
    }

    /// The de-duplication hash of time bucket `bucket`.
    pub fn sent_key(&self, bucket: u64) -> String {
        self.keys.sent(bucket)
    }

    /// Commit one batch (see `lua/commit.lua`).
    pub async fn commit(
        &self,
        who: &Identity,
        batch: &CommitBatch,
        sent_bucket: u64,
        sent_ttl: Duration,
        dlq_maxlen: u64,
    ) -> RedisResult<Committed> {
        let mut conn = self.conn.clone();
        let mut inv = Scripts::get().commit.prepare_invoke();
        inv.key(self.keys.outbound())
            .key(self.keys.nodes())
            .key(self.keys.dlq())
            .key(self.keys.sent(sent_bucket))
            .key(self.keys.sending());
        for (chan, _) in &batch.marks {
            inv.key(chan);
        }
        inv.arg(self.keys.group())
            .arg(&who.consumer)
            .arg(&who.instance)
            .arg(dlq_maxlen)
            .arg(sent_ttl.as_millis() as u64)
            .arg(batch.marks.len());
        for (_, done) in &batch.marks {
            inv.arg(done.map(|d| d.to_string()).unwrap_or_default());
        }
        inv.arg(batch.acks.len());
        for id in &batch.acks {
            inv.arg(&id.0);
        }
        inv.arg(batch.sent.len());
        for (k, m) in &batch.sent {
            inv.arg(k).arg(m);
        }
        inv.arg(batch.sending.len());
        for id in &batch.sending {
            inv.arg(&id.0);
        }
        inv.arg(batch.dead.len());
        for d in &batch.dead {
            inv.arg(&d.id.0)
                .arg(if d.force { "1" } else { "0" })
                .arg(d.fields.len() * 2);
            for (k, v) in &d.fields {
                inv.arg(*k).arg(v.as_slice());
            }
        }
        let v: Value = inv.invoke_async(&mut conn).await?;
        let Value::Array(items) = &v else {
            return Err(unexpected("commit", &v));
        };
        match items.first().and_then(as_str) {
            Some("stale") => Ok(Committed::Stale),
            Some("ok") => {
                self.wait_for_replicas().await;
                Ok(Committed::Ok {
                    dead_written: items.get(1).and_then(as_u64).unwrap_or(0),
                })
            }
            _ => Err(unexpected("commit", &v)),
        }
    }

    /// `redis.wait_replicas`: after a commit, `WAIT n timeout` on the
    /// connection that wrote it (on a cluster, to the primary of the
    /// platform's slot), so the commit reached `n` replicas before the
    /// gateway goes on. The commit stands either way: fewer replicas in time
    /// is counted and logged, not retried (WAIT narrows the window a
    /// failover can lose, it does not close it; see docs/reliability.md).
    /// Once a `WAIT` came back short (a shard that lost its replica), the
    /// commits of the next few seconds do not wait (each is still counted
    /// short); then `WAIT` is tried again.
    async fn wait_for_replicas(&self) {
        let Some(w) = &self.wait else {
            return;
        };
        let platform = self.keys.platform();
        if w.known_short() {
            crate::metrics::replicas_short(platform);
            return;
        }
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(w.replicas).arg(w.timeout.as_millis() as u64);
        let got = conn
            .on_node_of(&self.keys.outbound(), &cmd)
            .await
            .map(|v| as_u64(&v).unwrap_or(0));
        let short = !matches!(got, Ok(n) if n >= u64::from(w.replicas));
        if short {
            crate::metrics::replicas_short(platform);
        }
        if w.record(short) {
            if short {
                let acknowledged = got.as_ref().ok().copied();
                let error = got.as_ref().err().map(ToString::to_string);
                tracing::warn!(
                    platform,
                    wanted = w.replicas,
                    acknowledged,
                    error,
                    timeout_ms = w.timeout.as_millis() as u64,
                    recheck_ms = w.recheck().as_millis() as u64,
                    "a commit reached fewer replicas than redis.wait_replicas within its timeout; \
                     commits go on without waiting (counted short) and WAIT is tried again after recheck_ms"
                );
            } else {
                tracing::info!(
                    platform,
                    wanted = w.replicas,
                    "commits reach redis.wait_replicas replicas again"
                );
            }
        }
    }

    /// The message-cache write-back (SPEC §2), after the commit: the key is
    /// the envelope's `message_key`, which may live on another slot. A key
    /// holding another type is left alone.
    pub async fn write_cache(&self, pairs: &[(String, String)]) -> RedisResult<()> {
        if pairs.is_empty() {
            return Ok(());
        }
        if self.conn.is_cluster() {
            // The keys lie on slots of their own: one pipeline per key (a
            // pipeline may not cross slots), all at once. Each write is
            // idempotent, so a retry of the whole set is harmless.
            let writes = pairs.iter().map(|pair| async move {
                let mut conn = self.conn.clone();
                let mut pipe = redis::pipe();
                cache_write(&mut pipe, pair);
                match pipe.query_async::<()>(&mut conn).await {
                    Err(e) if e.code() == Some("WRONGTYPE") => Ok(()),
                    other => other,
                }
            });
            return futures::future::join_all(writes)
                .await
                .into_iter()
                .collect::<RedisResult<Vec<()>>>()
                .map(|_| ());
        }
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for pair in pairs {
            cache_write(&mut pipe, pair);
        }
        // A WRONGTYPE answer for one key fails the pipeline's reply but not
        // the other writes: the deliveries stand either way.
        match pipe.query_async::<()>(&mut conn).await {
            Err(e) if e.code() == Some("WRONGTYPE") => Ok(()),
            other => other,
        }
    }

    /// The platform id cached for `key` (`HGET key message_id`); none when
    /// the key is missing or holds another type.
    pub async fn cached_id(&self, key: &str) -> RedisResult<Option<String>> {
        let mut conn = self.conn.clone();
        let r: RedisResult<Option<String>> = redis::cmd("HGET")
            .arg(key)
            .arg("message_id")
            .query_async(&mut conn)
            .await;
        match r {
            Err(e) if e.code() == Some("WRONGTYPE") => Ok(None),
            other => other,
        }
    }

    /// De-duplication lookup: for each idempotency key, the message id
    /// recorded in any of `buckets` (newest first), if any.
    pub async fn sent_lookup(
        &self,
        buckets: &[u64],
        idems: &[&str],
    ) -> RedisResult<Vec<Option<String>>> {
        let mut found = vec![None; idems.len()];
        if idems.is_empty() {
            return Ok(found);
        }
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for b in buckets {
            pipe.cmd("HMGET").arg(self.keys.sent(*b)).arg(idems);
        }
        let rows: Vec<Vec<Option<String>>> = pipe.query_async(&mut conn).await?;
        for row in rows {
            for (slot, v) in found.iter_mut().zip(row) {
                if slot.is_none() {
                    *slot = v;
                }
            }
        }
        Ok(found)
    }

    /// Record that the send of `id` begins (`unknown_outcome = "dead_letter"` only).
    pub async fn mark_sending(&self, id: &StreamId) -> RedisResult<()> {
        let mut conn = self.conn.clone();
        redis::cmd("HSET")
            .arg(self.keys.sending())
            .arg(&id.0)
            .arg(crate::now_ms())
            .query_async::<()>(&mut conn)
            .await
    }

    /// Which of `ids` have a send recorded as begun and never committed.
    pub async fn were_sending(&self, ids: &[StreamId]) -> RedisResult<Vec<bool>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let v: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.keys.sending())
            .arg(ids.iter().map(|i| i.0.as_str()).collect::<Vec<_>>())
            .query_async(&mut conn)
            .await?;
        Ok(v.into_iter().map(|x| x.is_some()).collect())
    }

    /// Entries by id, with `None` for those the stream no longer holds.
    pub async fn fetch(&self, ids: &[StreamId]) -> RedisResult<Vec<Fetched>> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let mut conn = self.conn.clone();
            let mut inv = Scripts::get().fetch.prepare_invoke();
            inv.key(self.keys.outbound());
            for id in chunk {
                inv.arg(&id.0);
            }
            let v: Value = inv.invoke_async(&mut conn).await?;
            let Value::Array(items) = v else {
                return Err(unexpected("fetch", &Value::Nil));
            };
            for (id, item) in chunk.iter().zip(items) {
                let whole = matches!(&item, Value::Array(a) if a.len() == 2);
                let entry = if whole {
                    parse_entries(Value::Array(vec![item])).pop()
                } else {
                    None
                };
                out.push((id.clone(), entry));
            }
        }
        Ok(out)
    }

    /// Up to `count` ids pending for `consumer` from `start` (`-`, or
    /// `(<id>` for after an id), oldest first.
    pub async fn pending_of(
        &self,
        consumer: &str,
        start: &str,
        count: usize,
    ) -> RedisResult<Vec<StreamId>> {
        let mut conn = self.conn.clone();
        let v: Value = redis::cmd("XPENDING")
            .arg(self.keys.outbound())
            .arg(self.keys.group())
            .arg(start)
            .arg("+")
            .arg(count)
            .arg(consumer)
            .query_async(&mut conn)
            .await?;
        Ok(pending_rows(v).into_iter().map(|(id, _)| id).collect())
    }

    /// One page of the whole pending list from `start` (exclusive when it
    /// begins with `(`): (id, consumer) pairs.
    pub async fn pending_page(
        &self,
        start: &str,
        count: usize,
    ) -> RedisResult<Vec<(StreamId, String)>> {
        let mut conn = self.conn.clone();
        let v: Value = redis::cmd("XPENDING")
            .arg(self.keys.outbound())
            .arg(self.keys.group())
            .arg(start)
            .arg("+")
            .arg(count)
            .query_async(&mut conn)
            .await?;
        Ok(pending_rows(v))
    }

    /// The group's last-delivered id (everything after it is unread).
    pub async fn last_delivered(&self) -> RedisResult<Option<String>> {
        let mut conn = self.conn.clone();
        let v: Value = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(self.keys.outbound())
            .query_async(&mut conn)
            .await?;
        let group = self.keys.group();
        let Value::Array(groups) = v else {
            return Ok(None);
        };
        for g in groups {
            let fields: Vec<Value> = match g {
                Value::Array(a) => a,
                Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
                _ => continue,
            };
            let mut name = None;
            let mut last = None;
            for pair in fields.chunks(2) {
                if let [k, v] = pair {
                    match as_str(k) {
                        Some("name") => name = as_str(v).map(str::to_owned),
                        Some("last-delivered-id") => last = as_str(v).map(str::to_owned),
                        _ => {}
                    }
                }
            }
            if name.as_deref() == Some(group.as_str()) {
                return Ok(last);
            }
        }
        Ok(None)
    }

    /// Up to `count` entries after `after` (exclusive) — the unread part of the stream.
    pub async fn range_after(&self, after: &str, count: usize) -> RedisResult<Vec<RawEntry>> {
        let mut conn = self.conn.clone();
        let v: Value = redis::cmd("XRANGE")
            .arg(self.keys.outbound())
            .arg(format!("({after}"))
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await?;
        Ok(parse_entries(v))
    }

    /// Forget a dead consumer once nothing is pending for it.
    pub async fn reap(&self, consumer: &str) -> RedisResult<bool> {
        let mut conn = self.conn.clone();
        let n: i64 = Scripts::get()
            .reap
            .key(self.keys.outbound())
            .key(self.keys.nodes())
            .arg(self.keys.group())
            .arg(consumer)
            .invoke_async(&mut conn)
            .await?;
        Ok(n == 1)
    }
}

/// `HSET key message_id <id>` and `EXPIRE key <90 days> NX`: idempotent.
fn cache_write(pipe: &mut redis::Pipeline, (key, mid): &(String, String)) {
    pipe.cmd("HSET")
        .arg(key)
        .arg("message_id")
        .arg(mid)
        .ignore();
    pipe.cmd("EXPIRE")
        .arg(key)
        .arg(CACHE_EXPIRY_S)
        .arg("NX")
        .ignore();
}

/// How long a message-cache entry lives (90 days).
const CACHE_EXPIRY_S: u64 = 7_776_000;

/// Extended XPENDING rows: `[[id, consumer, idle, deliveries], …]`.
fn pending_rows(v: Value) -> Vec<(StreamId, String)> {
    let Value::Array(rows) = v else {
        return Vec::new();
    };
    rows.into_iter()
        .filter_map(|r| match r {
            Value::Array(f) if f.len() >= 2 => {
                let mut it = f.into_iter();
                let id = as_string(it.next()?)?;
                let consumer = as_string(it.next()?)?;
                Some((StreamId(id), consumer))
            }
            _ => None,
        })
        .collect()
}
