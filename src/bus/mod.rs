//! The only code that speaks Redis Streams: the consumer group, reading,
//! claiming and keeping entries, and the scripts that begin, commit and
//! dead-letter a delivery atomically with its acknowledgement.
//!
//! Connections: one multiplexed [`ConnectionManager`] carries every short
//! command (scripts pipeline over it when many lanes commit at once); each
//! blocking reader gets a connection of its own with no response timeout (a
//! blocked XREADGROUP would otherwise hold up, or time out, everything queued
//! behind it).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, RedisResult, Value};
use tokio::sync::{mpsc, oneshot};

use crate::envelope::StreamId;
use crate::keys::Keys;

pub mod admin;
mod scripts;
pub use scripts::Scripts;

/// A stream entry as read: its id and raw fields.
#[derive(Debug, Clone)]
pub struct RawEntry {
    pub id: StreamId,
    pub fields: HashMap<String, Vec<u8>>,
}

/// Redis access for one platform.
#[derive(Clone)]
pub struct Bus {
    keys: Keys,
    client: Client,
    conn: ConnectionManager,
    batch: Batcher,
}

/// One begin or commit step waiting for the next batch.
struct Step {
    /// `b` begin, `c` commit (see `lua/batch.lua`).
    kind: &'static str,
    keys: [String; 4],
    nkeys: usize,
    args: Vec<String>,
    reply: oneshot::Sender<RedisResult<Value>>,
}

/// Gathers the begin and commit steps of every lane into one script call:
/// whatever steps are queued when the previous call went out go together
/// (at most [`BATCH_MAX`]). Each step runs exactly as its own script would,
/// one after another, inside one atomic call; calls still pipeline.
#[derive(Clone)]
struct Batcher {
    tx: mpsc::UnboundedSender<Step>,
    conn: ConnectionManager,
    /// Script calls of this batcher waiting for their reply. While there are
    /// fewer than [`BATCH_FROM`], a step goes out at once by itself (no hop
    /// through the batch task): a few lanes pay no batching latency, and keep
    /// the pace they would have alone.
    busy: Arc<AtomicUsize>,
}

const BATCH_MAX: usize = 128;
/// Script calls in flight from which further steps wait for the next batch.
const BATCH_FROM: usize = 8;

/// Counts one script call in flight for as long as it lives.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(n: &Arc<AtomicUsize>) -> Busy {
        n.fetch_add(1, AtomicOrdering::AcqRel);
        Busy(n.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, AtomicOrdering::AcqRel);
    }
}

impl Batcher {
    fn start(conn: ConnectionManager) -> Batcher {
        let (tx, mut rx) = mpsc::unbounded_channel::<Step>();
        let busy = Arc::new(AtomicUsize::new(0));
        let (c, b) = (conn.clone(), busy.clone());
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let guard = Busy::new(&b);
                // Let the lanes that are ready queue their steps too.
                tokio::task::yield_now().await;
                let mut steps = Vec::with_capacity(16);
                steps.push(first);
                while steps.len() < BATCH_MAX {
                    match rx.try_recv() {
                        Ok(s) => steps.push(s),
                        Err(_) => break,
                    }
                }
                let c = c.clone();
                tokio::spawn(async move {
                    run_batch(c, steps).await;
                    drop(guard);
                });
            }
        });
        Batcher { tx, conn, busy }
    }

    async fn call(&self, step: Step) -> RedisResult<Value> {
        // An answer that never comes (the batch task gone) is an error the
        // caller retries; the step may or may not have run, as with a lost reply.
        let (tx, rx) = oneshot::channel();
        let stopped = || redis::RedisError::from((redis::ErrorKind::Io, "script batcher stopped"));
        let step = Step { reply: tx, ..step };
        if self.busy.load(AtomicOrdering::Acquire) < BATCH_FROM {
            let _guard = Busy::new(&self.busy);
            run_batch(self.conn.clone(), vec![step]).await;
        } else {
            self.tx.send(step).map_err(|_| stopped())?;
        }
        rx.await.map_err(|_| stopped())?
    }
}

async fn run_batch(mut conn: ConnectionManager, steps: Vec<Step>) {
    let mut inv = Scripts::get().batch.prepare_invoke();
    inv.arg(steps.len());
    for s in &steps {
        inv.arg(s.kind).arg(s.nkeys).arg(s.args.len());
        for a in &s.args {
            inv.arg(a);
        }
        for k in &s.keys[..s.nkeys] {
            inv.key(k);
        }
    }
    let r: RedisResult<Value> = inv.invoke_async(&mut conn).await;
    match r {
        Ok(Value::Array(items)) if items.len() == steps.len() => {
            for (s, v) in steps.into_iter().zip(items) {
                let v = match v {
                    Value::Array(a) if a.first().and_then(as_str) == Some("err") => {
                        Err(redis::RedisError::from((
                            redis::ErrorKind::Extension,
                            "script step failed",
                            a.get(1).and_then(as_str).unwrap_or("").to_owned(),
                        )))
                    }
                    v => Ok(v),
                };
                let _ = s.reply.send(v);
            }
        }
        Ok(v) => {
            let e = format!("{v:?}");
            for s in steps {
                let _ = s.reply.send(Err(redis::RedisError::from((
                    redis::ErrorKind::Parse,
                    "unexpected batch reply",
                    e.clone(),
                ))));
            }
        }
        Err(e) => {
            let detail = e.to_string();
            for s in steps {
                let _ = s.reply.send(Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "script batch failed",
                    detail.clone(),
                ))));
            }
        }
    }
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").field("keys", &self.keys).finish()
    }
}

/// The answer of the begin step for one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// Send it: the channel lock is ours with this fencing token.
    Go {
        token: String,
        /// Attempts this entry already used (across redeliveries).
        attempts: u32,
        /// An earlier send of this entry may have reached the platform.
        resumed: bool,
        /// The message cache already holds a platform id for its message_key.
        cached: bool,
        /// Missing predecessors given up on after `gap_timeout_ms`.
        gap_skipped: u64,
        /// Its seq was already passed (its gap was skipped): sent late.
        late: bool,
    },
    /// Another live gateway holds the channel; ask again within this long.
    Busy(Duration),
    /// An earlier seq has not finished; ask again within this long.
    Gap(Duration),
    /// No longer pending: it was finished before (a proven duplicate).
    Done,
    /// Now pending for another consumer, which will handle it.
    Moved(String),
}

/// The answer of a commit or dead-letter step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Commit {
    /// Written and acknowledged; with the begin answer of the next entry if asked.
    Ok(Option<Begin>),
    /// The fencing token is no longer ours: nothing was written.
    Stale,
}

/// What the commit step is told about the entry.
#[derive(Debug, Clone)]
pub struct CommitArgs<'a> {
    pub chan: &'a str,
    pub token: &'a str,
    pub id: &'a StreamId,
    pub seq: Option<u64>,
    /// The message cache key to write the platform id to.
    pub cache: Option<&'a str>,
    pub message_id: Option<&'a str>,
    /// Give the channel lock up (nothing else queued for the channel).
    pub release: bool,
    /// Begin this next entry of the channel in the same round trip.
    pub next: Option<BeginArgs<'a>>,
}

#[derive(Debug, Clone)]
pub struct BeginArgs<'a> {
    pub id: &'a StreamId,
    pub seq: Option<u64>,
    pub cache: Option<&'a str>,
}

/// The fields of a dead-letter entry (SPEC §2).
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    pub payload: &'a [u8],
    pub error: &'a str,
    pub error_kind: &'a str,
    pub attempts: u32,
    pub consumer: &'a str,
    pub channel_id: Option<&'a str>,
}

/// Identity of one running consumer: its name in the group and the instance
/// (`name/random`) it holds channel locks as.
#[derive(Debug, Clone)]
pub struct Identity {
    pub consumer: String,
    pub instance: String,
}

/// Timing knobs the scripts need.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub lock_ttl: Duration,
    pub gap_timeout: Duration,
    pub dlq_maxlen: u64,
}

fn seq_arg(seq: Option<u64>) -> String {
    seq.map(|s| s.to_string()).unwrap_or_default()
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl Bus {
    /// Connect to `url` for the platform described by `keys`.
    pub async fn connect(url: &str, keys: Keys) -> RedisResult<Bus> {
        let client = Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_connection_timeout(Some(Duration::from_secs(5)));
        let conn = ConnectionManager::new_with_config(client.clone(), config).await?;
        let batch = Batcher::start(conn.clone());
        Ok(Bus {
            keys,
            client,
            conn,
            batch,
        })
    }

    /// Another Bus on the same connection, for another platform.
    pub fn for_platform(&self, keys: Keys) -> Bus {
        Bus {
            keys,
            client: self.client.clone(),
            conn: self.conn.clone(),
            batch: self.batch.clone(),
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The Redis client, for connections of their own (subscriptions).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Call `wake` with the channel state key of every commit, dead-letter or
    /// release that had a lane waiting on it, until `stop`. Reconnects after
    /// errors; waiters poll meanwhile, so a lost wake-up only costs latency.
    pub async fn watch_wakeups(
        &self,
        wake: impl Fn(&str),
        stop: tokio_util::sync::CancellationToken,
    ) {
        use futures::StreamExt as _;
        let pattern = self.keys.channel_pattern();
        while !stop.is_cancelled() {
            let sub = async {
                let mut ps = self.client.get_async_pubsub().await?;
                ps.psubscribe(&pattern).await?;
                Ok::<_, redis::RedisError>(ps)
            };
            let mut ps = match sub.await {
                Ok(ps) => ps,
                Err(e) => {
                    tracing::debug!(error = %e, "wake-up subscription failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stop.cancelled() => return,
                    }
                }
            };
            let mut messages = ps.on_message();
            loop {
                tokio::select! {
                    m = messages.next() => match m {
                        Some(m) => wake(m.get_channel_name()),
                        None => break,
                    },
                    _ = stop.cancelled() => return,
                }
            }
        }
    }

    /// The shared multiplexed connection (for short commands only).
    pub fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// A connection of its own for a blocking command: no response timeout,
    /// so bound each call with `tokio::time::timeout` yourself.
    pub async fn blocking_connection(&self) -> RedisResult<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(None)
            .set_connection_timeout(Some(Duration::from_secs(5)));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// Create the consumer group at id 0 (with the stream) unless it exists,
    /// so a backlog published before the first gateway started is delivered.
    pub async fn ensure_group(&self) -> RedisResult<()> {
        let mut conn = self.conn.clone();
        let r: RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.keys.outbound())
            .arg(self.keys.group())
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match r {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// XREADGROUP on `conn` (a blocking connection). `from` is `>` for new
    /// entries or `0` for this consumer's own pending ones.
    pub async fn read(
        &self,
        conn: &mut MultiplexedConnection,
        consumer: &str,
        from: &str,
        count: usize,
        block: Option<Duration>,
    ) -> RedisResult<Vec<RawEntry>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(self.keys.group())
            .arg(consumer)
            .arg("COUNT")
            .arg(count);
        if let Some(b) = block {
            cmd.arg("BLOCK").arg(ms(b));
        }
        cmd.arg("STREAMS").arg(self.keys.outbound()).arg(from);
        let v: Value = cmd.query_async(conn).await?;
        Ok(parse_read_reply(v))
    }

    /// One XAUTOCLAIM page: entries idle at least `min_idle` move to `consumer`.
    /// Returns the next cursor (`0-0` when the sweep is complete), the claimed
    /// entries, and ids that were pending but are gone from the stream.
    pub async fn autoclaim(
        &self,
        consumer: &str,
        min_idle: Duration,
        cursor: &str,
        count: usize,
    ) -> RedisResult<(String, Vec<RawEntry>, Vec<StreamId>)> {
        let mut conn = self.conn.clone();
        let v: Value = redis::cmd("XAUTOCLAIM")
            .arg(self.keys.outbound())
            .arg(self.keys.group())
            .arg(consumer)
            .arg(ms(min_idle))
            .arg(cursor)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await?;
        let Value::Array(parts) = v else {
            return Ok(("0-0".into(), Vec::new(), Vec::new()));
        };
        let mut parts = parts.into_iter();
        let next = parts
            .next()
            .and_then(as_string)
            .unwrap_or_else(|| "0-0".into());
        let claimed = parts.next().map(parse_entries).unwrap_or_default();
        let deleted = match parts.next() {
            Some(Value::Array(ids)) => ids
                .into_iter()
                .filter_map(as_string)
                .map(StreamId)
                .collect(),
            _ => Vec::new(),
        };
        Ok((next, claimed, deleted))
    }

    /// `XCLAIM <outbound> <group> <consumer> 0 <ids…> <options…>`: entries
    /// move to `consumer` whatever their idle time.
    async fn xclaim(
        &self,
        consumer: &str,
        ids: &[StreamId],
        options: &[String],
    ) -> RedisResult<Value> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(self.keys.outbound())
            .arg(self.keys.group())
            .arg(consumer)
            .arg(0);
        for id in ids {
            cmd.arg(&id.0);
        }
        cmd.arg(options);
        cmd.query_async(&mut conn).await
    }

    /// Reset the idle time of entries this consumer still holds, so a sweep
    /// elsewhere does not take a live consumer's slow entries (XCLAIM JUSTID).
    pub async fn keep_fresh(&self, consumer: &str, ids: &[StreamId]) -> RedisResult<()> {
        if !ids.is_empty() {
            self.xclaim(consumer, ids, &["JUSTID".into()]).await?;
        }
        Ok(())
    }

    /// Take entries back (with their fields) that this consumer parked, which
    /// also resets their idle time. Ids no longer pending are not returned.
    pub async fn claim(&self, consumer: &str, ids: &[StreamId]) -> RedisResult<Vec<RawEntry>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(parse_entries(self.xclaim(consumer, ids, &[]).await?))
    }

    /// Mark entries this consumer gives up (shutdown) as idle for `idle`, so
    /// the next recovery sweep of another gateway takes them at once.
    pub async fn hand_off(
        &self,
        consumer: &str,
        ids: &[StreamId],
        idle: Duration,
    ) -> RedisResult<()> {
        if !ids.is_empty() {
            let options = ["IDLE".into(), ms(idle).to_string(), "JUSTID".into()];
            self.xclaim(consumer, ids, &options).await?;
        }
        Ok(())
    }

    /// Whether the stream still holds entry `id`.
    pub async fn exists(&self, id: &StreamId) -> RedisResult<bool> {
        let mut conn = self.conn.clone();
        let v: Value = redis::cmd("XRANGE")
            .arg(self.keys.outbound())
            .arg(&id.0)
            .arg(&id.0)
            .query_async(&mut conn)
            .await?;
        Ok(matches!(v, Value::Array(a) if !a.is_empty()))
    }

    /// Begin the send of one entry (see `lua/prelude.lua`).
    pub async fn begin(
        &self,
        who: &Identity,
        timing: Timing,
        chan: &str,
        args: BeginArgs<'_>,
    ) -> RedisResult<Begin> {
        let (reply, _) = oneshot::channel();
        let v = self
            .batch
            .call(Step {
                kind: "b",
                keys: [
                    chan.to_owned(),
                    self.keys.outbound(),
                    args.cache.unwrap_or(chan).to_owned(),
                    String::new(),
                ],
                nkeys: 3,
                args: vec![
                    self.keys.group(),
                    who.instance.clone(),
                    who.consumer.clone(),
                    args.id.0.clone(),
                    seq_arg(args.seq),
                    ms(timing.lock_ttl).to_string(),
                    ms(timing.gap_timeout).to_string(),
                    (if args.cache.is_some() { "1" } else { "0" }).to_owned(),
                ],
                reply,
            })
            .await?;
        let Value::Array(items) = v else {
            return Err(unexpected("begin", &v));
        };
        parse_begin(&items).ok_or_else(|| unexpected("begin", &Value::Array(items.clone())))
    }

    /// Commit a delivery (and maybe begin the next entry).
    pub async fn commit(
        &self,
        who: &Identity,
        timing: Timing,
        c: CommitArgs<'_>,
    ) -> RedisResult<Commit> {
        let next = c.next.as_ref();
        let (reply, _) = oneshot::channel();
        let v = self
            .batch
            .call(Step {
                kind: "c",
                keys: [
                    c.chan.to_owned(),
                    self.keys.outbound(),
                    c.cache.unwrap_or(c.chan).to_owned(),
                    next.and_then(|n| n.cache).unwrap_or(c.chan).to_owned(),
                ],
                nkeys: 4,
                args: vec![
                    self.keys.group(),
                    who.instance.clone(),
                    c.token.to_owned(),
                    c.id.0.clone(),
                    seq_arg(c.seq),
                    c.message_id.unwrap_or("").to_owned(),
                    (if c.release { "1" } else { "0" }).to_owned(),
                    ms(timing.lock_ttl).to_string(),
                    next.map(|n| n.id.0.clone()).unwrap_or_default(),
                    seq_arg(next.and_then(|n| n.seq)),
                    who.consumer.clone(),
                    ms(timing.gap_timeout).to_string(),
                    (if next.and_then(|n| n.cache).is_some() {
                        "1"
                    } else {
                        "0"
                    })
                    .to_owned(),
                ],
                reply,
            })
            .await?;
        let Value::Array(items) = v else {
            return Err(unexpected("commit", &v));
        };
        match items.first().and_then(|v| as_str(v)) {
            Some("stale") => Ok(Commit::Stale),
            Some("ok") if items.len() == 1 => Ok(Commit::Ok(None)),
            Some("ok") => parse_begin(&items[1..])
                .map(|b| Commit::Ok(Some(b)))
                .ok_or_else(|| unexpected("commit", &Value::Array(items.clone()))),
            _ => Err(unexpected("commit", &Value::Array(items))),
        }
    }

    /// Move an entry to the dead-letter stream and acknowledge it. With a
    /// lock (`chan` and `token`), the channel's delivered mark also moves past
    /// it, releasing its successors at once; without one (an entry with no
    /// channel), it is only moved and acknowledged.
    #[allow(clippy::too_many_arguments)]
    pub async fn dead_letter(
        &self,
        who: &Identity,
        timing: Timing,
        lock: Option<(&str, &str)>,
        id: &StreamId,
        seq: Option<u64>,
        release: bool,
        dl: DeadLetter<'_>,
    ) -> RedisResult<Commit> {
        let mut conn = self.conn.clone();
        let dlq = self.keys.dlq();
        let failed_ms = crate::now_ms().to_string();
        let attempts = dl.attempts.to_string();
        let mut inv = Scripts::get().dead_letter.prepare_invoke();
        inv.key(lock.map(|l| l.0).unwrap_or(dlq.as_str()))
            .key(self.keys.outbound())
            .key(&dlq)
            .arg(self.keys.group())
            .arg(&who.instance)
            .arg(lock.map(|l| l.1).unwrap_or(""))
            .arg(&id.0)
            .arg(seq_arg(seq))
            .arg(if release { "1" } else { "0" })
            .arg(ms(timing.lock_ttl))
            .arg(timing.dlq_maxlen)
            .arg("payload")
            .arg(dl.payload)
            .arg("error")
            .arg(dl.error)
            .arg("error_kind")
            .arg(dl.error_kind)
            .arg("attempts")
            .arg(&attempts)
            .arg("original_id")
            .arg(&id.0)
            .arg("consumer")
            .arg(dl.consumer)
            .arg("failed_ms")
            .arg(&failed_ms);
        if let Some(c) = dl.channel_id {
            inv.arg("channel_id").arg(c);
        }
        if let Some(s) = seq {
            inv.arg("seq").arg(s);
        }
        let v: Value = inv.invoke_async(&mut conn).await?;
        match &v {
            Value::Array(items) if items.first().and_then(as_str) == Some("stale") => {
                Ok(Commit::Stale)
            }
            Value::Array(_) => Ok(Commit::Ok(None)),
            _ => Err(unexpected("dead_letter", &v)),
        }
    }

    /// Extend the channel lock; with `attempt_used`, count one attempt.
    /// Returns the in-flight entry's attempts, or None when the lock is lost.
    pub async fn renew(
        &self,
        who: &Identity,
        timing: Timing,
        chan: &str,
        token: &str,
        attempt_used: bool,
    ) -> RedisResult<Option<u32>> {
        let mut conn = self.conn.clone();
        let n: i64 = Scripts::get()
            .renew
            .key(chan)
            .arg(&who.instance)
            .arg(token)
            .arg(ms(timing.lock_ttl))
            .arg(if attempt_used { "1" } else { "0" })
            .invoke_async(&mut conn)
            .await?;
        Ok((n >= 0).then_some(n as u32))
    }

    /// Give the channel lock up if it is still ours.
    pub async fn release(&self, who: &Identity, chan: &str, token: &str) -> RedisResult<bool> {
        let mut conn = self.conn.clone();
        let n: i64 = Scripts::get()
            .release
            .key(chan)
            .arg(&who.instance)
            .arg(token)
            .invoke_async(&mut conn)
            .await?;
        Ok(n == 1)
    }

    /// Answer an RPC: push the reply (60 s expiry) and acknowledge, atomically.
    pub async fn rpc_reply(&self, id: &StreamId, reply_key: &str, reply: &str) -> RedisResult<()> {
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .rpush(reply_key, reply)
            .ignore()
            .expire(reply_key, 60)
            .ignore()
            .xack(self.keys.outbound(), self.keys.group(), &[&id.0])
            .ignore()
            .query_async::<()>(&mut conn)
            .await
    }

    /// Acknowledge without any other effect (an RPC past its deadline).
    pub async fn ack(&self, id: &StreamId) -> RedisResult<()> {
        let mut conn = self.conn.clone();
        redis::cmd("XACK")
            .arg(self.keys.outbound())
            .arg(self.keys.group())
            .arg(&id.0)
            .query_async::<()>(&mut conn)
            .await
    }
}

fn unexpected(what: &str, v: &Value) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Parse,
        "unexpected script reply",
        format!("{what}: {v:?}"),
    ))
}

fn as_str(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn as_string(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        other => as_str(other).and_then(|s| s.parse().ok()),
    }
}

fn parse_begin(items: &[Value]) -> Option<Begin> {
    let wait = |i: usize| Duration::from_millis(items.get(i).and_then(as_u64).unwrap_or(0));
    Some(match as_str(items.first()?)? {
        "go" => {
            let resumed = as_u64(items.get(3)?)?;
            Begin::Go {
                token: as_str(items.get(1)?)?.to_owned(),
                attempts: as_u64(items.get(2)?)? as u32,
                resumed: resumed == 1,
                cached: resumed == 2,
                gap_skipped: as_u64(items.get(4)?)?,
                late: as_u64(items.get(5)?)? == 1,
            }
        }
        "busy" => Begin::Busy(wait(1)),
        "gap" => Begin::Gap(wait(1)),
        "done" => Begin::Done,
        "moved" => Begin::Moved(as_str(items.get(1)?)?.to_owned()),
        _ => return None,
    })
}

/// XREADGROUP reply: `[[stream, [[id, [f, v, …] | nil], …]]]` or nil.
pub fn parse_read(v: Value) -> Vec<RawEntry> {
    parse_read_reply(v)
}

fn parse_read_reply(v: Value) -> Vec<RawEntry> {
    let Value::Array(streams) = v else {
        return Vec::new();
    };
    streams
        .into_iter()
        .flat_map(|s| match s {
            Value::Array(mut kv) if kv.len() == 2 => parse_entries(kv.pop().unwrap_or(Value::Nil)),
            _ => Vec::new(),
        })
        .collect()
}

/// `[[id, [f, v, …] | nil], …]`. An entry whose fields are nil (deleted from
/// the stream while pending) comes back with no fields at all.
fn parse_entries(v: Value) -> Vec<RawEntry> {
    let Value::Array(entries) = v else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter_map(|e| {
            let Value::Array(mut parts) = e else {
                return None;
            };
            if parts.is_empty() {
                return None;
            }
            let fields_v = if parts.len() > 1 { parts.pop() } else { None };
            let id = as_string(parts.pop()?)?;
            let mut fields = HashMap::new();
            if let Some(Value::Array(fv)) = fields_v {
                let mut it = fv.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    if let (Some(k), Value::BulkString(v)) = (as_string(k), v) {
                        fields.insert(k, v);
                    }
                }
            }
            Some(RawEntry {
                id: StreamId(id),
                fields,
            })
        })
        .collect()
}
