//! The only code that speaks Redis Streams: the consumer group, reading,
//! claiming and keeping entries, and the scripts that begin, commit and
//! dead-letter a delivery atomically with its acknowledgement.
//!
//! Connections ([`conn`]): one multiplexed connection (a `ConnectionManager`
//! on one server, a cluster connection on Redis Cluster) carries every short
//! command (scripts pipeline over it when many lanes commit at once); each
//! blocking reader gets a connection of its own with no response timeout (a
//! blocked XREADGROUP would otherwise hold up, or time out, everything queued
//! behind it).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::{Client, RedisResult, Value};

use crate::envelope::StreamId;
use crate::keys::Keys;

pub mod acl;
pub mod admin;
pub mod conn;
pub mod discord;
mod engine;
mod scripts;
pub use conn::{Conn, Target};
pub use engine::*;
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
    target: Target,
    /// A client of one node, for subscriptions.
    client: Client,
    conn: Conn,
    /// `redis.wait_replicas`: replicas a commit waits for, and for how long.
    wait: Option<Arc<ReplicaWait>>,
}

/// `redis.wait_replicas` of one platform: how many replicas a commit waits
/// for, and, once a `WAIT` came back short, until when commits stop waiting
/// (a shard left without its replica would otherwise cost every commit the
/// whole timeout; `WAIT` is tried again after [`ReplicaWait::recheck`]).
#[derive(Debug)]
pub(crate) struct ReplicaWait {
    pub(crate) replicas: u32,
    pub(crate) timeout: Duration,
    short_until: std::sync::Mutex<Option<std::time::Instant>>,
}

impl ReplicaWait {
    fn new(replicas: u32, timeout: Duration) -> ReplicaWait {
        ReplicaWait {
            replicas,
            timeout,
            short_until: std::sync::Mutex::new(None),
        }
    }

    /// How long commits go on without waiting after a short `WAIT`: five
    /// timeouts, at least a second.
    pub(crate) fn recheck(&self) -> Duration {
        (self.timeout * 5).max(Duration::from_secs(1))
    }

    /// Whether the replicas are known to be short right now (a `WAIT` came
    /// back short less than [`Self::recheck`] ago).
    pub(crate) fn known_short(&self) -> bool {
        let g = self.short_until.lock().unwrap_or_else(|e| e.into_inner());
        g.is_some_and(|t| std::time::Instant::now() < t)
    }

    /// Record a `WAIT`'s outcome; returns whether this changed the state
    /// (short after fine, or fine after short), for the log.
    pub(crate) fn record(&self, short: bool) -> bool {
        let mut g = self.short_until.lock().unwrap_or_else(|e| e.into_inner());
        let was_short = g.is_some();
        *g = short.then(|| std::time::Instant::now() + self.recheck());
        was_short != short
    }
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").field("keys", &self.keys).finish()
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl Bus {
    /// Connect to `url` for the platform described by `keys`.
    pub async fn connect(url: &str, keys: Keys) -> RedisResult<Bus> {
        Self::connect_to(&Target::url(url), keys).await
    }

    /// Connect to `target` (one server or a cluster, TLS, an ACL user) for
    /// the platform described by `keys`.
    pub async fn connect_to(target: &Target, keys: Keys) -> RedisResult<Bus> {
        let client = target.client().await?;
        let conn = target.shared().await?;
        Ok(Bus {
            keys,
            target: target.clone(),
            client,
            conn,
            wait: None,
        })
    }

    /// Another Bus on the same connection, for another platform.
    pub fn for_platform(&self, keys: Keys) -> Bus {
        Bus {
            keys,
            // The replicas of another platform's slot are another matter.
            wait: self
                .wait
                .as_ref()
                .map(|w| Arc::new(ReplicaWait::new(w.replicas, w.timeout))),
            ..self.clone()
        }
    }

    /// Make every commit wait until `replicas` replicas have its writes
    /// (`WAIT replicas timeout`); 0 turns it off.
    pub fn with_wait_replicas(mut self, replicas: u32, timeout: Duration) -> Bus {
        self.wait = (replicas > 0).then(|| Arc::new(ReplicaWait::new(replicas, timeout)));
        self
    }

    /// Where this bus connects (passwords hidden in its `Debug`).
    pub fn target(&self) -> &Target {
        &self.target
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A Redis client of one node, for connections of their own
    /// (subscriptions; a cluster broadcasts PUBLISH to every node).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The shared multiplexed connection (for short commands only).
    pub fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// A connection of its own for a blocking command: no response timeout,
    /// so bound each call with `tokio::time::timeout` yourself.
    pub async fn blocking_connection(&self) -> RedisResult<Conn> {
        self.target.blocking().await
    }

    /// Whether the server runs in cluster mode (`INFO cluster`).
    pub async fn is_cluster(&self) -> RedisResult<bool> {
        if self.conn.is_cluster() {
            return Ok(true);
        }
        let mut conn = self.conn.clone();
        let info: String = redis::cmd("INFO")
            .arg("cluster")
            .query_async(&mut conn)
            .await?;
        Ok(info.contains("cluster_enabled:1"))
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
        conn: &mut Conn,
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

    /// `XCLAIM <outbound> <group> <consumer> 0 <ids…> <options…>`: entries
    /// move to `consumer` whatever their idle time.
    async fn xclaim(
        &self,
        consumer: &str,
        ids: &[StreamId],
        options: &[String],
    ) -> RedisResult<Value> {
        self.xclaim_idle(consumer, Duration::ZERO, ids, options)
            .await
    }

    async fn xclaim_idle(
        &self,
        consumer: &str,
        min_idle: Duration,
        ids: &[StreamId],
        options: &[String],
    ) -> RedisResult<Value> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(self.keys.outbound())
            .arg(self.keys.group())
            .arg(consumer)
            .arg(ms(min_idle));
        for id in ids {
            cmd.arg(&id.0);
        }
        cmd.arg(options);
        cmd.query_async(&mut conn).await
    }

    /// Take entries back (with their fields) that this consumer parked, which
    /// also resets their idle time. Ids no longer pending are not returned.
    pub async fn claim(&self, consumer: &str, ids: &[StreamId]) -> RedisResult<Vec<RawEntry>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(parse_entries(self.xclaim(consumer, ids, &[]).await?))
    }

    /// Claim (with their fields) those of `ids` that are still pending and
    /// idle at least `min_idle`.
    pub async fn claim_idle(
        &self,
        consumer: &str,
        min_idle: Duration,
        ids: &[StreamId],
    ) -> RedisResult<Vec<RawEntry>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(parse_entries(
            self.xclaim_idle(consumer, min_idle, ids, &[]).await?,
        ))
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

    /// Answer an RPC: push the reply (60 s expiry), then acknowledge — in
    /// one script, and the acknowledgement only if the reply was written.
    pub async fn rpc_reply(&self, id: &StreamId, reply_key: &str, reply: &str) -> RedisResult<()> {
        let mut conn = self.conn.clone();
        let _: i64 = Scripts::get()
            .rpc_reply
            .key(reply_key)
            .key(self.keys.outbound())
            .arg(reply)
            .arg(self.keys.group())
            .arg(&id.0)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
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

/// Retry `f` while Redis is unreachable, loading its data set or otherwise
/// briefly unable to answer (G10: a gateway started during a Redis restart
/// waits for it); an error retrying cannot mend is returned at once.
pub async fn until_up<T, F, Fut>(what: &str, mut f: F) -> RedisResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = RedisResult<T>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if transient(&e) => {
                tracing::warn!(error = %e, step = what, retry_in_ms = delay.as_millis() as u64, "Redis is not answering yet; waiting for it");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// An error of a Redis that is down, restarting or busy, as opposed to one
/// that refuses us (bad password, wrong type, unknown command).
pub fn transient(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.code(),
            Some(
                "LOADING"
                    | "BUSY"
                    | "TRYAGAIN"
                    | "CLUSTERDOWN"
                    | "MASTERDOWN"
                    | "READONLY"
                    | "UNBLOCKED"
            )
        )
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

#[cfg(test)]
mod replica_wait_tests {
    use super::ReplicaWait;
    use std::time::Duration;

    #[test]
    fn a_short_wait_stops_the_waiting_until_the_recheck_and_a_full_one_resumes_it() {
        let w = ReplicaWait::new(1, Duration::from_millis(100));
        assert_eq!(w.recheck(), Duration::from_secs(1), "at least a second");
        assert!(!w.known_short());
        assert!(!w.record(false), "fine after fine changes nothing");
        assert!(w.record(true), "short after fine is a change (logged)");
        assert!(w.known_short(), "the next commits do not wait");
        assert!(
            !w.record(true),
            "short again is no change (not logged again)"
        );
        assert!(w.record(false), "fine after short is a change (logged)");
        assert!(!w.known_short());
        let long = ReplicaWait::new(1, Duration::from_secs(2));
        assert_eq!(long.recheck(), Duration::from_secs(10), "five timeouts");
    }
}
