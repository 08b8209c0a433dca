//! The producers: bot workers as SPEC §3 describes them. Each valid entry
//! takes its channel's next `seq` with `HINCRBY sg:{P}:chan:<channel> seq 1`
//! and is then XADDed to `sg:{P}:outbound` with a unique
//! `message_key` `sg:msg:f<n>`. One more producer mixes in hostile entries,
//! each of which the gateways must dead-letter with a named kind.
//!
//! Redis faults make a command's outcome unknown (Redis killed after it
//! applied the XADD, before it answered). A producer then waits for Redis,
//! looks for its entry in the stream after the last id it knows (every
//! payload carries a unique token), and publishes again only if it is not
//! there — so the ledger holds exactly the entries in the stream. A lost
//! HINCRBY answer is a `seq` taken and never used: a gap, which the
//! gateways skip after `gap_timeout_ms` (counted, not a fault of theirs).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::aio::ConnectionManager;
use redis::streams::StreamRangeReply;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::plan::channel_name;
use super::{id_ms, now_ms, poll_until};

/// The bad entries, and the `error_kind`s the README names for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hostile {
    NotJson,
    NotObject,
    /// A stream entry without the `payload` field.
    MissingPayload,
    MissingChannel,
    UnknownType,
    BadBase64,
    /// Over the default `max_payload_bytes` (8 MiB).
    Oversized,
    /// `message_key` naming Stargazer's own channel state (`sg:{P}:chan:…`).
    ForgedChannelKey,
    /// `message_key` naming an RPC reply list (`sg:{P}:rpc:reply:…`).
    ForgedReplyKey,
    /// `message_key` naming another platform's key (`sg:{victim}:chan:…`).
    ForgedOtherPlatform,
    /// `message_key` under `sg:gateway:`.
    ForgedGroupKey,
    /// `message_key` outside any Stargazer prefix.
    ForgedOutside,
}

impl Hostile {
    /// What the producer cycles through (the oversized one has its own timer).
    const CYCLE: [Hostile; 11] = [
        Hostile::NotJson,
        Hostile::ForgedChannelKey,
        Hostile::MissingChannel,
        Hostile::UnknownType,
        Hostile::ForgedOtherPlatform,
        Hostile::NotObject,
        Hostile::BadBase64,
        Hostile::ForgedReplyKey,
        Hostile::MissingPayload,
        Hostile::ForgedGroupKey,
        Hostile::ForgedOutside,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Hostile::NotJson => "non-JSON payload",
            Hostile::NotObject => "JSON that is not an object",
            Hostile::MissingPayload => "no payload field",
            Hostile::MissingChannel => "message without channel_id",
            Hostile::UnknownType => "unknown type",
            Hostile::BadBase64 => "file with bad base64",
            Hostile::Oversized => "oversized (> 8 MiB)",
            Hostile::ForgedChannelKey => "message_key sg:{P}:chan:…",
            Hostile::ForgedReplyKey => "message_key sg:{P}:rpc:reply:…",
            Hostile::ForgedOtherPlatform => "message_key sg:{other}:chan:…",
            Hostile::ForgedGroupKey => "message_key sg:gateway:…",
            Hostile::ForgedOutside => "message_key outside sg:",
        }
    }

    /// The dead-letter kinds that name this problem (README, "Bad input").
    pub fn expected_kinds(self) -> &'static [&'static str] {
        match self {
            Hostile::NotJson => &["not_json"],
            Hostile::NotObject => &["not_object"],
            Hostile::MissingPayload => &["missing_payload"],
            Hostile::MissingChannel => &["missing_field"],
            Hostile::UnknownType => &["unknown_type"],
            Hostile::BadBase64 => &["bad_base64"],
            Hostile::Oversized => &["too_large"],
            Hostile::ForgedChannelKey
            | Hostile::ForgedReplyKey
            | Hostile::ForgedOtherPlatform
            | Hostile::ForgedGroupKey
            | Hostile::ForgedOutside => &["forbidden_key"],
        }
    }

    /// Whether it takes a real `seq` of its channel: a gateway must then
    /// dead-letter it in its channel's place and release its successors.
    fn takes_seq(self) -> bool {
        matches!(
            self,
            Hostile::UnknownType
                | Hostile::BadBase64
                | Hostile::ForgedChannelKey
                | Hostile::ForgedReplyKey
                | Hostile::ForgedOtherPlatform
                | Hostile::ForgedGroupKey
                | Hostile::ForgedOutside
        )
    }
}

/// The dead-letter kinds that say "bad input" — wrong for a valid entry.
pub const BAD_INPUT_KINDS: [&str; 10] = [
    "not_json",
    "not_object",
    "missing_payload",
    "missing_field",
    "bad_field",
    "unknown_type",
    "bad_base64",
    "too_large",
    "bad_signature",
    "forbidden_key",
];

/// One entry that is in the stream.
#[derive(Debug, Clone)]
pub struct Published {
    pub id: String,
    /// `None` for a valid entry.
    pub hostile: Option<Hostile>,
    pub channel: Option<String>,
    pub seq: Option<u64>,
    /// A valid entry's `message_key` (the key it may write).
    pub message_key: Option<String>,
    /// A forged entry's `message_key` (a key that must never be written).
    pub forged_key: Option<String>,
    /// `created_ms` a day ahead: its age must come from the stream id.
    pub future_created: bool,
}

impl Published {
    /// When Redis added it (its id's clock).
    pub fn added_ms(&self) -> u64 {
        id_ms(&self.id)
    }
}

/// Everything the producers did.
#[derive(Debug, Default)]
pub struct Ledger {
    pub entries: Mutex<Vec<Published>>,
    /// HINCRBY answers lost to a Redis fault (each possibly a `seq` gap).
    pub seq_unknown: AtomicU64,
    /// XADDs whose outcome a Redis fault hid.
    pub xadd_unknown: AtomicU64,
    /// …of which were found in the stream afterwards.
    pub xadd_found: AtomicU64,
}

impl Ledger {
    pub fn snapshot(&self) -> Vec<Published> {
        self.entries.lock().unwrap().clone()
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }
}

/// What every producer needs.
#[derive(Debug, Clone)]
pub struct ProducerConf {
    pub redis_url: String,
    pub platform: String,
    pub channels: usize,
    pub seed: u64,
    /// Valid entries per second, over all producers.
    pub rate: f64,
    /// Share of valid entries whose `seq` is written as an integral float
    /// (`42.0`), as Python producers do; SPEC §1 says it must be accepted.
    pub float_share: f64,
}

/// How many tasks publish valid entries.
const PRODUCERS: u64 = 4;
/// Largest payload the shipped defaults accept (`max_payload_bytes`).
const MAX_PAYLOAD: usize = 8 * 1024 * 1024;
/// How long a producer waits for Redis to come back before giving up.
const REDIS_BACK: Duration = Duration::from_secs(120);

/// A connection that waits out a stopped Redis instead of timing out (a
/// timed-out command may still be applied later, which would make the
/// ledger wrong) and reconnects after a killed one.
pub async fn connect(url: &str) -> Result<ConnectionManager> {
    let cfg = redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(None)
        .set_connection_timeout(None)
        .set_max_delay(Duration::from_millis(500));
    let client = redis::Client::open(url)?;
    client
        .get_connection_manager_with_config(cfg)
        .await
        .context("cannot connect to the private redis-server")
}

/// Starts the producers; they publish until `stop` is cancelled.
pub async fn spawn(
    conf: ProducerConf,
    ledger: Arc<Ledger>,
    stop: CancellationToken,
) -> Result<Vec<JoinHandle<Result<()>>>> {
    let counter = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for i in 0..PRODUCERS {
        let p = Producer {
            conn: connect(&conf.redis_url).await?,
            stream: format!("sg:{{{}}}:outbound", conf.platform),
            conf: conf.clone(),
            rng: StdRng::seed_from_u64(super::mix(conf.seed, i + 1)),
            last_id: "0-0".into(),
            ledger: ledger.clone(),
            counter: counter.clone(),
        };
        let period = Duration::from_secs_f64(PRODUCERS as f64 / conf.rate.max(0.01));
        handles.push(tokio::spawn(p.valid_loop(period, stop.clone())));
    }
    let p = Producer {
        conn: connect(&conf.redis_url).await?,
        stream: format!("sg:{{{}}}:outbound", conf.platform),
        conf: conf.clone(),
        rng: StdRng::seed_from_u64(super::mix(conf.seed, 0)),
        last_id: "0-0".into(),
        ledger,
        counter,
    };
    // About 3 % of the valid rate, at least one every 5 s.
    let period = Duration::from_secs_f64((1.0 / (conf.rate * 0.03)).clamp(0.2, 5.0));
    handles.push(tokio::spawn(p.hostile_loop(period, stop)));
    Ok(handles)
}

struct Producer {
    conn: ConnectionManager,
    conf: ProducerConf,
    stream: String,
    rng: StdRng,
    /// The id of this producer's last entry: where a search for an XADD of
    /// unknown outcome starts.
    last_id: String,
    ledger: Arc<Ledger>,
    counter: Arc<AtomicU64>,
}

impl Producer {
    async fn valid_loop(mut self, period: Duration, stop: CancellationToken) -> Result<()> {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            let n = self.counter.fetch_add(1, Ordering::Relaxed);
            let channel = channel_name(self.rng.random_range(0..self.conf.channels));
            let seq = self.take_seq(&channel).await?;
            let key = format!("sg:msg:f{n}");
            // Python producers write numbers as floats (SPEC §1).
            let seq_v = if self.rng.random_bool(self.conf.float_share) {
                json!(seq as f64)
            } else {
                json!(seq)
            };
            let future_created = self.rng.random_bool(0.05);
            let created = if future_created {
                now_ms() + 86_400_000
            } else {
                now_ms()
            };
            let roll = self.rng.random_range(0..100);
            let mut env = json!({
                "channel_id": channel, "message_key": key, "seq": seq_v, "created_ms": created,
            });
            let obj = env.as_object_mut().expect("an object");
            if roll < 5 {
                obj.insert("type".into(), json!("file"));
                obj.insert("file_data".into(), json!("c3RhcmdhemVy"));
                obj.insert("filename".into(), json!(format!("f{n}.txt")));
                obj.insert("mimetype".into(), json!("text/plain"));
            } else if roll < 10 {
                obj.insert("type".into(), json!("buttons"));
                obj.insert("text".into(), json!(format!("pick {n}")));
                obj.insert(
                    "buttons".into(),
                    json!([{"label": "Yes", "custom_id": "yes"}, {"label": "Docs", "url": "https://example.org"}]),
                );
            } else {
                obj.insert("type".into(), json!("message"));
                obj.insert("text".into(), json!(format!("m{n} seq {seq}")));
            }
            let payload = env.to_string();
            let id = self
                .publish(vec![("payload", payload.into_bytes())], &key)
                .await?;
            self.ledger.entries.lock().unwrap().push(Published {
                id,
                hostile: None,
                channel: Some(channel),
                seq: Some(seq),
                message_key: Some(key),
                forged_key: None,
                future_created,
            });
        }
    }

    async fn hostile_loop(mut self, period: Duration, stop: CancellationToken) -> Result<()> {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // One oversized entry 10 s in, then every 45 s: each is 8 MiB of AOF.
        let mut big = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(10),
            Duration::from_secs(45),
        );
        big.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut i = 0usize;
        loop {
            let kind = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tick.tick() => { i += 1; Hostile::CYCLE[(i - 1) % Hostile::CYCLE.len()] }
                _ = big.tick() => Hostile::Oversized,
            };
            self.hostile(kind).await?;
        }
    }

    async fn hostile(&mut self, kind: Hostile) -> Result<()> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let token = format!("tok:h{n}");
        let p = self.conf.platform.clone();
        let channel = channel_name(self.rng.random_range(0..self.conf.channels));
        let seq = if kind.takes_seq() {
            Some(self.take_seq(&channel).await?)
        } else {
            None
        };
        let forged_key = match kind {
            Hostile::ForgedChannelKey => Some(format!("sg:{{{p}}}:chan:forged-h{n}")),
            Hostile::ForgedReplyKey => Some(format!("sg:{{{p}}}:rpc:reply:forged-h{n}")),
            Hostile::ForgedOtherPlatform => Some(format!("sg:{{{p}-victim}}:chan:h{n}")),
            Hostile::ForgedGroupKey => Some(format!("sg:gateway:forged-h{n}")),
            Hostile::ForgedOutside => Some(format!("victim:h{n}")),
            _ => None,
        };
        let text = format!("hostile {n}");
        let fields: Vec<(&str, Vec<u8>)> = match kind {
            Hostile::NotJson => vec![("payload", format!("{{not json \"{token}\"").into_bytes())],
            Hostile::NotObject => vec![("payload", json!(["x", token]).to_string().into_bytes())],
            Hostile::MissingPayload => vec![("data", json!({"tok": token}).to_string().into_bytes())],
            Hostile::MissingChannel => vec![(
                "payload",
                json!({"type": "message", "text": text, "tok": token}).to_string().into_bytes(),
            )],
            Hostile::UnknownType => vec![(
                "payload",
                json!({"type": "hologram", "channel_id": channel, "text": text, "seq": seq, "tok": token})
                    .to_string()
                    .into_bytes(),
            )],
            Hostile::BadBase64 => vec![(
                "payload",
                json!({"type": "file", "channel_id": channel, "file_data": "!!not base64!!", "seq": seq, "tok": token})
                    .to_string()
                    .into_bytes(),
            )],
            Hostile::Oversized => {
                let mut v = json!({"type": "message", "channel_id": channel, "tok": token});
                v["text"] = Value::String("x".repeat(MAX_PAYLOAD + 4096));
                vec![("payload", v.to_string().into_bytes())]
            }
            _ => vec![(
                "payload",
                json!({"type": "message", "channel_id": channel, "text": text, "seq": seq,
                       "message_key": forged_key, "tok": token})
                .to_string()
                .into_bytes(),
            )],
        };
        let id = self.publish(fields, &token).await?;
        let has_channel = !matches!(
            kind,
            Hostile::NotJson
                | Hostile::NotObject
                | Hostile::MissingPayload
                | Hostile::MissingChannel
        );
        self.ledger.entries.lock().unwrap().push(Published {
            id,
            hostile: Some(kind),
            channel: has_channel.then_some(channel),
            seq,
            message_key: None,
            forged_key,
            future_created: false,
        });
        Ok(())
    }

    /// `HINCRBY sg:{P}:chan:<channel> seq 1`, as SPEC §3 says, retried
    /// across Redis faults (a lost answer may leave a gap).
    async fn take_seq(&mut self, channel: &str) -> Result<u64> {
        let key = format!("sg:{{{}}}:chan:{channel}", self.conf.platform);
        loop {
            let r: redis::RedisResult<u64> = redis::cmd("HINCRBY")
                .arg(&key)
                .arg("seq")
                .arg(1)
                .query_async(&mut self.conn)
                .await;
            match r {
                Ok(seq) => return Ok(seq),
                Err(e) if is_refused_for_now(&e) => {
                    tokio::time::sleep(REFUSED_BACKOFF).await;
                }
                Err(e) if is_transport(&e) => {
                    self.ledger.seq_unknown.fetch_add(1, Ordering::Relaxed);
                    self.wait_redis().await?;
                }
                Err(e) => bail!("HINCRBY {key}: {e}"),
            }
        }
    }

    /// XADD, exactly once in the stream whatever Redis does meanwhile.
    async fn publish(&mut self, fields: Vec<(&str, Vec<u8>)>, token: &str) -> Result<String> {
        loop {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&self.stream).arg("*");
            for (f, v) in &fields {
                cmd.arg(*f).arg(v.as_slice());
            }
            match cmd.query_async::<String>(&mut self.conn).await {
                Ok(id) => {
                    self.last_id = id.clone();
                    return Ok(id);
                }
                Err(e) if is_refused_for_now(&e) => {
                    tokio::time::sleep(REFUSED_BACKOFF).await;
                }
                Err(e) if is_transport(&e) => {
                    self.ledger.xadd_unknown.fetch_add(1, Ordering::Relaxed);
                    self.wait_redis().await?;
                    if let Some(id) = self.find(token).await? {
                        self.ledger.xadd_found.fetch_add(1, Ordering::Relaxed);
                        self.last_id = id.clone();
                        return Ok(id);
                    }
                }
                Err(e) => bail!("XADD {}: {e}", self.stream),
            }
        }
    }

    /// The id of the entry after `last_id` whose fields contain `token`.
    async fn find(&mut self, token: &str) -> Result<Option<String>> {
        let needle = format!("\"{token}\"");
        let mut from = format!("({}", self.last_id);
        loop {
            let r: redis::RedisResult<StreamRangeReply> = redis::cmd("XRANGE")
                .arg(&self.stream)
                .arg(&from)
                .arg("+")
                .arg("COUNT")
                .arg(100)
                .query_async(&mut self.conn)
                .await;
            let reply = match r {
                Err(e) if is_refused_for_now(&e) => {
                    tokio::time::sleep(REFUSED_BACKOFF).await;
                    continue;
                }
                r => r.context("XRANGE while looking for an XADD of unknown outcome")?,
            };
            for e in &reply.ids {
                let hit = e.map.values().any(|v| match v {
                    redis::Value::BulkString(b) => contains(b, needle.as_bytes()),
                    _ => false,
                });
                if hit {
                    return Ok(Some(e.id.clone()));
                }
            }
            match reply.ids.last() {
                Some(last) if reply.ids.len() == 100 => from = format!("({}", last.id),
                _ => return Ok(None),
            }
        }
    }

    /// Polls PING until Redis answers again.
    async fn wait_redis(&mut self) -> Result<()> {
        let conn = self.conn.clone();
        let back = poll_until(REDIS_BACK, Duration::from_millis(100), || {
            let mut c = conn.clone();
            async move {
                redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            }
        })
        .await;
        if !back {
            bail!("redis did not come back within {REDIS_BACK:?}");
        }
        Ok(())
    }
}

/// The back-off after [`is_refused_for_now`].
const REFUSED_BACKOFF: Duration = Duration::from_millis(50);

/// An error that leaves the command's outcome unknown (the connection, not
/// the command, failed).
fn is_transport(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        // A restarted Redis still loading its AOF: not applied, safe to retry.
        || e.code() == Some("LOADING")
}

/// A refusal that says the command was not applied and will be taken soon:
/// a cluster node not yet back in its cluster, a slot half migrated
/// (`--cluster`). Retried after a short back-off, with no doubt about the
/// outcome.
fn is_refused_for_now(e: &redis::RedisError) -> bool {
    matches!(e.code(), Some("CLUSTERDOWN" | "TRYAGAIN"))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The keys the producers named that a gateway may write: the valid
/// entries' `message_key`s.
pub fn allowed_cache_keys(entries: &[Published]) -> HashSet<String> {
    entries
        .iter()
        .filter_map(|e| e.message_key.clone())
        .collect()
}
