//! Test rig: a private redis-server per test, a consumer started in-process,
//! and a recording adapter whose behaviour each test scripts.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use stargazer::adapters::{
    Adapter, AdapterError, BoxFuture, Capabilities, Delivered, Delivery, SharedAdapter,
};
use stargazer::bus::Bus;
use stargazer::config::ConsumerConfig;
use stargazer::consumer::{Consumer, ConsumerParts};
use stargazer::envelope::Action;
use stargazer::keys::Keys;
use stargazer::publish::Publisher;
use stargazer::redis_server::RedisServer;

pub struct Rig {
    pub server: RedisServer,
    pub keys: Keys,
    pub bus: Bus,
    pub publisher: Publisher,
}

/// Settings that make recovery and retries fast enough for tests.
pub fn fast() -> ConsumerConfig {
    ConsumerConfig {
        autoclaim_interval_ms: 100,
        autoclaim_min_idle_ms: 1000,
        lock_ttl_ms: 600,
        backoff_base_ms: 5,
        backoff_max_ms: 50,
        block_ms: 100,
        drain_timeout_ms: 3000,
        max_age_ms: 0,
        ..ConsumerConfig::default()
    }
}

impl Rig {
    pub async fn new() -> Rig {
        let bin = std::env::var("STARGAZER_REDIS_SERVER").ok();
        let server = RedisServer::start(bin.as_deref()).expect("start redis-server");
        let platform = format!("t{:08x}", rand::random::<u32>());
        let keys = Keys::new("sg", &platform);
        let bus = Bus::connect(&server.url(), keys.clone())
            .await
            .expect("connect");
        let publisher = Publisher::new(bus.conn(), keys.clone(), "sg:msg:", None);
        Rig {
            server,
            keys,
            bus,
            publisher,
        }
    }

    pub async fn start(
        &self,
        name: &str,
        adapter: SharedAdapter,
        settings: ConsumerConfig,
    ) -> Consumer {
        Consumer::start(ConsumerParts {
            bus: self.bus.clone(),
            adapter,
            settings,
            consumer_name: name.to_owned(),
            cache_prefix: "sg:msg:".into(),
            tools: Vec::new(),
        })
        .await
        .expect("start consumer")
    }

    pub async fn publish(&self, v: Value) -> stargazer::publish::Published {
        let Value::Object(m) = v else {
            panic!("not an object")
        };
        self.publisher.publish(m).await.expect("publish")
    }

    pub async fn publish_map(&self, m: Map<String, Value>) -> stargazer::publish::Published {
        self.publisher.publish(m).await.expect("publish")
    }

    pub async fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut conn = self.bus.conn();
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query_async(&mut conn).await.expect("redis command")
    }

    /// Entries pending in the group.
    pub async fn pending(&self) -> u64 {
        let v: redis::Value = self
            .cmd(&["XPENDING", &self.keys.outbound(), &self.keys.group()])
            .await;
        match v {
            redis::Value::Array(items) => match items.first() {
                Some(redis::Value::Int(n)) => *n as u64,
                _ => 0,
            },
            _ => 0,
        }
    }

    /// Every dead-letter entry, fields as strings.
    pub async fn dlq(&self) -> Vec<HashMap<String, String>> {
        let r: redis::streams::StreamRangeReply =
            self.cmd(&["XRANGE", &self.keys.dlq(), "-", "+"]).await;
        r.ids
            .iter()
            .map(|e| {
                e.map
                    .keys()
                    .map(|k| (k.clone(), e.get::<String>(k).unwrap_or_default()))
                    .collect()
            })
            .collect()
    }

    /// Wait until the group has nothing pending and nothing unread.
    pub async fn drained(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let lag = self.lag().await;
            let pending = self.pending().await;
            if lag == 0 && pending == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not drained: lag {lag}, pending {pending}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn lag(&self) -> u64 {
        let v: Vec<HashMap<String, redis::Value>> =
            self.cmd(&["XINFO", "GROUPS", &self.keys.outbound()]).await;
        v.iter()
            .find_map(|g| {
                g.get("lag")
                    .and_then(|l| redis::from_redis_value_ref::<u64>(l).ok())
            })
            .unwrap_or(u64::MAX)
    }

    /// Make `consumer` read up to `n` new entries and never process them: a
    /// gateway that died right after its read.
    pub async fn read_as(&self, consumer: &str, n: usize) -> Vec<String> {
        self.bus.ensure_group().await.expect("create group");
        let r: redis::streams::StreamReadReply = self
            .cmd(&[
                "XREADGROUP",
                "GROUP",
                &self.keys.group(),
                consumer,
                "COUNT",
                &n.to_string(),
                "STREAMS",
                &self.keys.outbound(),
                ">",
            ])
            .await;
        r.keys
            .into_iter()
            .flat_map(|k| k.ids)
            .map(|i| i.id)
            .collect()
    }
}

/// One call the recording adapter received.
#[derive(Debug, Clone)]
pub struct Sent {
    pub channel: Option<String>,
    pub seq: Option<u64>,
    pub kind: &'static str,
    pub text: Option<String>,
    pub idempotency_key: String,
    pub attempt: u32,
    pub resend: bool,
    pub stream_id: String,
    pub at: Instant,
    /// Whether the adapter answered success.
    pub ok: bool,
    /// edit / delete: the target's platform id as the engine resolved it.
    pub target: Option<String>,
}

type Script = dyn Fn(&Sent, usize) -> Result<(), AdapterError> + Send + Sync;

/// Records every delivery; `script(sent, nth_call_for_this_stream_id)` decides the answer.
pub struct Recorder {
    pub calls: Mutex<Vec<Sent>>,
    tick: tokio::sync::watch::Sender<usize>,
    script: Box<Script>,
    delay: Duration,
    pub caps: Capabilities,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Recorder")
    }
}

impl Recorder {
    pub fn ok() -> Arc<Recorder> {
        Self::scripted(|_, _| Ok(()))
    }

    pub fn scripted(
        f: impl Fn(&Sent, usize) -> Result<(), AdapterError> + Send + Sync + 'static,
    ) -> Arc<Recorder> {
        Self::build(Box::new(f), Duration::ZERO, Capabilities::ALL)
    }

    pub fn build(script: Box<Script>, delay: Duration, caps: Capabilities) -> Arc<Recorder> {
        Arc::new(Recorder {
            calls: Mutex::new(Vec::new()),
            tick: tokio::sync::watch::channel(0).0,
            script,
            delay,
            caps,
        })
    }

    pub fn calls(&self) -> Vec<Sent> {
        self.calls.lock().unwrap().clone()
    }

    /// Successful sends only.
    pub fn sent(&self) -> Vec<Sent> {
        self.calls().into_iter().filter(|s| s.ok).collect()
    }

    /// Wait until at least `n` calls succeeded.
    pub async fn wait_sent(&self, n: usize, within: Duration) {
        let mut rx = self.tick.subscribe();
        let r = tokio::time::timeout(within, rx.wait_for(|c| *c >= n)).await;
        assert!(
            r.is_ok(),
            "only {} of {n} sends within {within:?}",
            self.sent().len()
        );
    }
}

impl Adapter for Recorder {
    fn kind(&self) -> &'static str {
        "recorder"
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn deliver<'a>(&'a self, d: Delivery<'a>) -> BoxFuture<'a, Result<Delivered, AdapterError>> {
        Box::pin(async move {
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            let env = d.envelope;
            let text = match &env.action {
                Action::Message { text, .. }
                | Action::Buttons { text, .. }
                | Action::Edit { text, .. } => Some(text.clone()),
                _ => None,
            };
            let mut sent = Sent {
                channel: env.channel_id.as_ref().map(|c| c.0.clone()),
                seq: env.seq,
                kind: env.action.type_name(),
                text,
                idempotency_key: d.idempotency_key.to_owned(),
                attempt: d.attempt,
                resend: d.resend,
                stream_id: d.stream_id.0.clone(),
                at: Instant::now(),
                ok: false,
                target: d.target.map(str::to_owned),
            };
            let nth = self
                .calls
                .lock()
                .unwrap()
                .iter()
                .filter(|c| c.stream_id == sent.stream_id)
                .count();
            let result = (self.script)(&sent, nth);
            sent.ok = result.is_ok();
            let n_ok = {
                let mut calls = self.calls.lock().unwrap();
                calls.push(sent.clone());
                calls.iter().filter(|c| c.ok).count()
            };
            self.tick.send_replace(n_ok);
            result.map(|()| Delivered {
                message_id: Some(format!("pm-{}", sent.stream_id)),
            })
        })
    }
}

/// Per channel, the seqs in the order they were successfully sent.
pub fn order_by_channel(sent: &[Sent]) -> HashMap<String, Vec<u64>> {
    let mut m: HashMap<String, Vec<u64>> = HashMap::new();
    let mut sorted = sent.to_vec();
    sorted.sort_by_key(|s| s.at);
    for s in sorted {
        if let (Some(c), Some(q)) = (s.channel, s.seq) {
            m.entry(c).or_default().push(q);
        }
    }
    m
}
