//! The worker side: everything a bot needs to talk to its gateways.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use stargazer::sdk::Worker;
//! let worker = Worker::connect("redis://127.0.0.1:6379", "sg", "discord").await?;
//! let out = worker.proxy();
//! out.send("42", "hello").await?;                        // next seq of channel 42
//! let history = worker.rpc("fetch_channel_history",
//!     serde_json::json!({"channel_id": "42", "limit": 5}),
//!     std::time::Duration::from_secs(5)).await?;
//! # Ok(()) }
//! ```
//!
//! [`ProxyAdapter`] implements the same [`Adapter`] trait as the gateway's
//! adapters — by publishing — so code written against the trait runs on a
//! worker or on a gateway alike. RPC replies are awaited with BLPOP on
//! connections of their own, never on the shared one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::bus::Conn;
use base64::Engine as _;
use serde_json::{Map, Value, json};

use crate::adapters::{Adapter, AdapterError, BoxFuture, Capabilities, Delivered, Delivery};
use crate::bus::Bus;
use crate::envelope::Action;
use crate::inbound::InboundConsumer;
use crate::keys::Keys;
use crate::publish::{Published, Publisher};

/// Why an RPC failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RpcError {
    #[error(
        "no gateway answered `{method}` within {after:?} (is a gateway running for this platform?)"
    )]
    Timeout { method: String, after: Duration },
    #[error("the gateway answered `{method}` with an error: {message}")]
    Remote { method: String, message: String },
    #[error("the reply to `{method}` is not JSON: {detail}")]
    BadReply { method: String, detail: String },
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// A bot worker's handle on one platform.
#[derive(Clone)]
pub struct Worker {
    bus: Bus,
    publisher: Publisher,
    /// Idle connections for blocking reply waits.
    waiters: Arc<Mutex<Vec<Conn>>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("keys", self.bus.keys())
            .finish()
    }
}

impl Worker {
    /// Connect to `url` for `platform` under key prefix `prefix` (`sg`).
    pub async fn connect(url: &str, prefix: &str, platform: &str) -> redis::RedisResult<Worker> {
        Self::connect_to(&crate::bus::Target::url(url), prefix, platform).await
    }

    /// Connect through `target`: one server or a Redis Cluster, with TLS
    /// and an ACL user (see `Target`).
    pub async fn connect_to(
        target: &crate::bus::Target,
        prefix: &str,
        platform: &str,
    ) -> redis::RedisResult<Worker> {
        let bus = Bus::connect_to(target, Keys::new(prefix, platform)).await?;
        let cache = format!("{prefix}:msg:");
        Ok(Self::from_bus(bus, &cache, None))
    }

    /// A worker on an existing connection; `secret` signs every envelope.
    pub fn from_bus(bus: Bus, cache_prefix: &str, secret: Option<Vec<u8>>) -> Worker {
        let publisher = Publisher::new(bus.conn(), bus.keys().clone(), cache_prefix, secret);
        Worker {
            bus,
            publisher,
            waiters: Arc::default(),
        }
    }

    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    pub fn keys(&self) -> &Keys {
        self.bus.keys()
    }

    /// An adapter that publishes to the gateways.
    pub fn proxy(&self) -> ProxyAdapter {
        ProxyAdapter {
            worker: self.clone(),
            rpc_timeout: Duration::from_secs(30),
        }
    }

    /// Consume the platform's inbound events as `consumer`.
    pub fn inbound(&self, consumer: &str) -> InboundConsumer {
        InboundConsumer::new(self.bus.clone(), consumer)
    }

    /// Call a gateway RPC and wait up to `timeout` for its reply.
    pub async fn rpc(
        &self,
        method: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value, RpcError> {
        self.rpc_on(None, method, args, timeout).await
    }

    /// The same, on behalf of a channel (`channel_id` of the request).
    pub async fn rpc_on(
        &self,
        channel: Option<&str>,
        method: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value, RpcError> {
        let reply_key = format!(
            "{}{:032x}",
            self.keys().reply_prefix(),
            rand::random::<u128>()
        );
        let mut env = Map::new();
        env.insert("type".into(), "rpc_request".into());
        env.insert("rpc_method".into(), method.into());
        env.insert("rpc_args".into(), args);
        env.insert("reply_key".into(), reply_key.clone().into());
        let deadline = crate::now_ms() + timeout.as_millis() as u64;
        env.insert("deadline_ms".into(), deadline.into());
        if let Some(c) = channel {
            env.insert("channel_id".into(), c.into());
        }
        let mut conn = self.waiter().await?;
        self.publisher.publish(env).await?;
        let mut blpop = redis::cmd("BLPOP");
        blpop.arg(&reply_key).arg(timeout.as_secs_f64());
        let wait = blpop.query_async::<Option<(String, String)>>(&mut conn);
        let reply = match tokio::time::timeout(timeout + Duration::from_secs(2), wait).await {
            Ok(Ok(r)) => {
                self.waiters.lock().expect("waiters poisoned").push(conn);
                r
            }
            Ok(Err(e)) => return Err(e.into()),
            // The connection may still hold the BLPOP: drop it.
            Err(_) => None,
        };
        let Some((_, reply)) = reply else {
            return Err(RpcError::Timeout {
                method: method.to_owned(),
                after: timeout,
            });
        };
        let v: Value = serde_json::from_str(&reply).map_err(|e| RpcError::BadReply {
            method: method.to_owned(),
            detail: e.to_string(),
        })?;
        if let Value::Object(o) = &v
            && o.len() == 1
            && let Some(err) = o.get("error")
        {
            return Err(RpcError::Remote {
                method: method.to_owned(),
                message: err
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| err.to_string()),
            });
        }
        Ok(v)
    }

    async fn waiter(&self) -> redis::RedisResult<Conn> {
        if let Some(c) = self.waiters.lock().expect("waiters poisoned").pop() {
            return Ok(c);
        }
        self.bus.blocking_connection().await
    }
}

/// An [`Adapter`] for workers: every action is published for the gateways
/// (strict kinds take their channel's next `seq`); RPC methods are called
/// on a gateway. `deliver` returns no platform id: the gateway writes it to
/// the envelope's `message_key` once sent.
#[derive(Debug, Clone)]
pub struct ProxyAdapter {
    worker: Worker,
    rpc_timeout: Duration,
}

impl ProxyAdapter {
    /// How long `call` waits for a gateway's answer.
    pub fn with_rpc_timeout(mut self, d: Duration) -> Self {
        self.rpc_timeout = d;
        self
    }

    async fn publish(&self, v: Value) -> Result<Published, AdapterError> {
        let Value::Object(m) = v else {
            return Err(AdapterError::permanent("envelope is not an object"));
        };
        self.worker
            .publisher
            .publish(m)
            .await
            .map_err(|e| AdapterError::transient(format!("publishing to redis: {e}")))
    }

    /// Send a text message.
    pub async fn send(&self, channel: &str, text: &str) -> Result<Published, AdapterError> {
        self.publish(json!({"type": "message", "channel_id": channel, "text": text}))
            .await
    }

    /// Send a text message replying to the platform message `reply_to`.
    pub async fn reply(
        &self,
        channel: &str,
        reply_to: &str,
        text: &str,
    ) -> Result<Published, AdapterError> {
        self.publish(
            json!({"type": "message", "channel_id": channel, "text": text, "reply_to": reply_to}),
        )
        .await
    }

    /// Send a file.
    pub async fn send_file(
        &self,
        channel: &str,
        data: &[u8],
        filename: &str,
        mimetype: &str,
        caption: Option<&str>,
    ) -> Result<Published, AdapterError> {
        let mut v = json!({"type": "file", "channel_id": channel, "filename": filename, "mimetype": mimetype,
            "file_data": base64::engine::general_purpose::STANDARD.encode(data)});
        if let Some(c) = caption {
            v["text"] = c.into();
        }
        self.publish(v).await
    }

    /// Send text with buttons: `(label, custom_id or https URL)`.
    pub async fn send_buttons(
        &self,
        channel: &str,
        text: &str,
        buttons: &[(&str, &str)],
    ) -> Result<Published, AdapterError> {
        let buttons: Vec<Value> = buttons
            .iter()
            .map(|(label, target)| {
                if target.starts_with("https://") || target.starts_with("http://") {
                    json!({"label": label, "url": target})
                } else {
                    json!({"label": label, "custom_id": target})
                }
            })
            .collect();
        self.publish(
            json!({"type": "buttons", "channel_id": channel, "text": text, "buttons": buttons}),
        )
        .await
    }

    /// Show typing for up to `ttl` (dropped unsent if the gateway is later).
    pub async fn start_typing(
        &self,
        channel: &str,
        ttl: Duration,
    ) -> Result<Published, AdapterError> {
        let expires = crate::now_ms() + ttl.as_millis() as u64;
        self.publish(json!({"type": "start_typing", "channel_id": channel, "expires_ms": expires}))
            .await
    }

    pub async fn stop_typing(&self, channel: &str) -> Result<Published, AdapterError> {
        self.publish(json!({"type": "stop_typing", "channel_id": channel}))
            .await
    }

    pub async fn react(
        &self,
        channel: &str,
        message_id: &str,
        emoji: &str,
    ) -> Result<Published, AdapterError> {
        self.publish(json!({"type": "reaction", "channel_id": channel, "message_id": message_id, "emoji": emoji}))
            .await
    }

    pub async fn set_presence(
        &self,
        text: &str,
        emoji: Option<&str>,
    ) -> Result<Published, AdapterError> {
        self.publish(json!({"type": "presence", "text": text, "emoji": emoji}))
            .await
    }
}

impl Adapter for ProxyAdapter {
    fn kind(&self) -> &'static str {
        "proxy"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    fn deliver<'a>(&'a self, d: Delivery<'a>) -> BoxFuture<'a, Result<Delivered, AdapterError>> {
        Box::pin(async move {
            if let Action::Rpc { .. } = d.envelope.action {
                return Err(AdapterError::permanent("use `call` for RPCs"));
            }
            let mut env = d.envelope.raw.clone();
            // A new place in the channel's sequence, but the same idempotency key.
            env.remove("seq");
            env.insert("idempotency_key".into(), d.idempotency_key.into());
            self.publish(Value::Object(env)).await?;
            Ok(Delivered::default())
        })
    }

    fn call<'a>(
        &'a self,
        method: &'a str,
        args: &'a Value,
    ) -> BoxFuture<'a, Result<Value, AdapterError>> {
        Box::pin(async move {
            let channel = args.get("channel_id").and_then(Value::as_str);
            self.worker
                .rpc_on(channel, method, args.clone(), self.rpc_timeout)
                .await
                .map_err(|e| match e {
                    RpcError::Timeout { .. } | RpcError::Redis(_) => {
                        AdapterError::transient(e.to_string())
                    }
                    _ => AdapterError::permanent(e.to_string()),
                })
        })
    }
}
