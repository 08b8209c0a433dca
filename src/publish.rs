//! Publishing envelopes, as workers and `stargazer send` do: the channel's
//! next `seq` from its state hash (HINCRBY), `created_ms`, a `message_key`,
//! and the `sig` field when signing is configured.

use crate::bus::Conn;
use redis::{AsyncCommands, RedisResult};
use serde_json::{Map, Value};

use crate::envelope::{StreamId, sign};
use crate::keys::Keys;

/// Publishes to one platform's outbound stream.
#[derive(Clone)]
pub struct Publisher {
    conn: Conn,
    keys: Keys,
    cache_prefix: String,
    secret: Option<Vec<u8>>,
    /// Replicas each write must reach before it counts (`WAIT`), and how long to wait.
    wait: Option<(u32, std::time::Duration)>,
    /// With `wait`: per channel, a `seq` this publisher took whose `WAIT`
    /// came back short, with the token written beside it. The next
    /// `next_seq` of that channel hands it out again while the counter still
    /// stands at it under this token, instead of leaving a gap the gateway
    /// would wait `gap_timeout_ms` for.
    unconfirmed: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, (u64, u64)>>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("keys", &self.keys)
            .field("signed", &self.secret.is_some())
            .finish()
    }
}

/// Where an envelope landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub id: StreamId,
    pub seq: Option<u64>,
    pub message_key: Option<String>,
}

const IDLE_EXPIRY_MS: i64 = 30 * 24 * 3600 * 1000;

/// How long the token of a `seq` taken under `wait_replicas` is kept: long
/// enough for a retry after a failover.
const TAKER_EXPIRY_MS: u64 = 3600 * 1000;

/// Types that take a place in their channel's sequence (G3 strict kinds).
fn is_sequenced(ty: &str) -> bool {
    matches!(
        ty,
        "message" | "file" | "buttons" | "reaction" | "edit" | "delete"
    )
}

impl Publisher {
    pub fn new(conn: Conn, keys: Keys, cache_prefix: &str, secret: Option<Vec<u8>>) -> Self {
        Publisher {
            conn,
            keys,
            cache_prefix: cache_prefix.to_owned(),
            secret,
            wait: None,
            unconfirmed: Default::default(),
        }
    }

    /// Count a publish (and a `seq` taken) as done only once `replicas`
    /// replicas have it (`WAIT replicas timeout`); fewer within `timeout` is
    /// an error, so the caller publishes the same envelope again — a copy
    /// that did land is skipped by its idempotency key (docs/reliability.md).
    pub fn with_wait_replicas(mut self, replicas: u32, timeout: std::time::Duration) -> Self {
        self.wait = (replicas > 0).then_some((replicas, timeout));
        self
    }

    async fn replicated(&self) -> RedisResult<()> {
        let Some((n, timeout)) = self.wait else {
            return Ok(());
        };
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(n).arg(timeout.as_millis() as u64);
        let got: i64 =
            redis::from_redis_value(conn.on_node_of(&self.keys.outbound(), &cmd).await?)?;
        if got < i64::from(n) {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "write not replicated in time",
                format!("{got} of {n} replicas acknowledged within {timeout:?}"),
            )));
        }
        Ok(())
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Take the channel's next sequence number.
    ///
    /// With `with_wait_replicas`, a `seq` whose `WAIT` came back short is an
    /// error, and the next call for the channel returns that same `seq` once
    /// it is replicated — when the counter still stands at it, taken by this
    /// publisher (a token is written after it, on the same slot). If a failover lost
    /// it, or another producer has taken more since, a new one is taken.
    pub async fn next_seq(&self, channel: &str) -> RedisResult<u64> {
        let mut conn = self.conn.clone();
        let key = self.keys.channel(channel);
        if self.wait.is_none() {
            return self.increment(&key, None).await;
        }
        let held = self.held_seqs().get(channel).copied();
        if let Some((seq, token)) = held {
            let cur: Option<u64> = conn.hget(&key, "seq").await?;
            let taker: Option<u64> = conn.get(self.keys.seq_taker(channel)).await?;
            if cur == Some(seq) && taker == Some(token) {
                self.replicated().await?;
                self.held_seqs().remove(channel);
                return Ok(seq);
            }
            self.held_seqs().remove(channel);
        }
        let token: u64 = rand::random();
        // One slot, one node: the token follows the increment in the
        // replication stream, so a failover that lost the increment lost the
        // token too, and a token that stands means the increment does.
        let seq = self.increment(&key, Some((channel, token))).await?;
        if let Err(e) = self.replicated().await {
            self.held_seqs().insert(channel.to_owned(), (seq, token));
            return Err(e);
        }
        Ok(seq)
    }

    /// `HINCRBY key seq 1`, then its idle expiry and (with `taker`) the
    /// taker token. On one server, one pipeline. On a cluster the increment
    /// goes alone: a pipeline meeting a slot in migration (ASK) is retried
    /// whole by the client, and each retry may apply the increment again
    /// (a run of seq numbers nobody publishes: a gap the gateway waits
    /// `gap_timeout_ms` for). The follow-ups are idempotent and retried; a
    /// failed expiry refresh is left to the next publish.
    async fn increment(&self, key: &str, taker: Option<(&str, u64)>) -> RedisResult<u64> {
        let mut conn = self.conn.clone();
        if !self.conn.is_cluster() {
            let mut pipe = redis::pipe();
            pipe.hincr(key, "seq", 1)
                .pexpire(key, IDLE_EXPIRY_MS)
                .ignore();
            if let Some((channel, token)) = taker {
                pipe.pset_ex(self.keys.seq_taker(channel), token, TAKER_EXPIRY_MS)
                    .ignore();
            }
            let (seq,): (u64,) = pipe.query_async(&mut conn).await?;
            return Ok(seq);
        }
        let seq: u64 = conn.hincr(key, "seq", 1).await?;
        let _: RedisResult<()> = conn.pexpire(key, IDLE_EXPIRY_MS).await;
        if let Some((channel, token)) = taker {
            let mut last = None;
            for _ in 0..3 {
                match conn
                    .pset_ex::<_, _, ()>(self.keys.seq_taker(channel), token, TAKER_EXPIRY_MS)
                    .await
                {
                    Ok(()) => return Ok(seq),
                    Err(e) => last = Some(e),
                }
            }
            // The seq stands but cannot be proven ours on a retry: a retry
            // takes another (a gap, never a repeat).
            return Err(last.expect("three attempts"));
        }
        Ok(seq)
    }

    /// The seqs taken whose `WAIT` came back short, per channel.
    fn held_seqs(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, (u64, u64)>> {
        self.unconfirmed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publish an envelope object. Strict kinds with a channel and no `seq`
    /// get the channel's next one; `created_ms` is set when missing; messages,
    /// files and buttons get a `message_key` when they have none.
    pub async fn publish(&self, mut env: Map<String, Value>) -> RedisResult<Published> {
        let ty = env
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("message")
            .to_owned();
        let channel = match env.get("channel_id") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        let mut seq = env.get("seq").and_then(Value::as_u64);
        if seq.is_none()
            && is_sequenced(&ty)
            && let Some(c) = &channel
        {
            let s = self.next_seq(c).await?;
            env.insert("seq".into(), s.into());
            seq = Some(s);
        }
        if !env.contains_key("created_ms") {
            env.insert("created_ms".into(), crate::now_ms().into());
        }
        if !env.contains_key("message_key") && matches!(ty.as_str(), "message" | "file" | "buttons")
        {
            let key = format!(
                "{}{}:{:016x}",
                self.cache_prefix,
                self.keys.platform(),
                rand::random::<u64>()
            );
            env.insert("message_key".into(), key.into());
        }
        let message_key = env
            .get("message_key")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let payload = Value::Object(env).to_string();
        let id = self.publish_raw(payload.as_bytes()).await?;
        Ok(Published {
            id,
            seq,
            message_key,
        })
    }

    /// Append `payload` as it is (signed when a secret is set).
    pub async fn publish_raw(&self, payload: &[u8]) -> RedisResult<StreamId> {
        let mut conn = self.conn.clone();
        let id: String = match &self.secret {
            Some(secret) => {
                let sig = sign(secret, payload);
                conn.xadd(
                    self.keys.outbound(),
                    "*",
                    &[("payload", payload), ("sig", sig.as_bytes())],
                )
                .await?
            }
            None => {
                conn.xadd(self.keys.outbound(), "*", &[("payload", payload)])
                    .await?
            }
        };
        self.replicated().await?;
        Ok(StreamId(id))
    }
}
