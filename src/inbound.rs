//! Inbound events: what a platform says (a message, a reaction, a button
//! press) on its way from a gateway to the workers, through the stream
//! `sg:{P}:inbound`.
//!
//! Gateways publish with [`InboundPublisher`]; workers consume with
//! [`InboundConsumer`], a consumer group (`sg:worker:<P>` by default) read at
//! least once: an event is acknowledged only after its handler succeeded, and
//! a failed one is handed to the handler again after a short backoff.
//!
//! The JSON shape of one event (field `payload` of the stream entry):
//!
//! ```json
//! {"type": "message", "platform": "discord", "channel_id": "42",
//!  "user_id": "7", "user_name": "ada", "text": "hi", "message_id": "m-1",
//!  "reply_to": null, "emoji": null, "custom_id": null, "ts_ms": 1795750587165}
//! ```
//!
//! `type` is `message`, `reaction` (with `emoji` and the `message_id` reacted
//! to), `button` (with `custom_id`) or `invite`; platform-specific fields may
//! follow. Matrix adds `edit`, `delete`, `encrypted` and `gap` (see
//! `adapters::matrix::inbound` and the README).

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use crate::bus::Conn;
use redis::{AsyncCommands, RedisResult};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::bus::{Bus, RawEntry};
use crate::envelope::StreamId;
use crate::keys::Keys;

/// One thing a platform said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InboundEvent {
    /// `message`, `reaction`, `button` or `invite`; from Discord also
    /// `command`, `select`, `autocomplete` and `modal_submit`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Filled in by the gateway when an HTTP poster leaves it out.
    #[serde(default)]
    pub platform: String,
    pub channel_id: String,
    #[serde(default)]
    pub user_id: String,
    #[serde(default)]
    pub user_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emoji: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_id: Option<String>,
    /// When the platform saw it (Unix ms).
    #[serde(default)]
    pub ts_ms: u64,
    /// Platform-specific fields.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl InboundEvent {
    /// A plain text message from a user.
    pub fn message(platform: &str, channel: &str, user: &str, text: &str) -> Self {
        InboundEvent {
            kind: "message".into(),
            platform: platform.into(),
            channel_id: channel.into(),
            user_id: user.into(),
            user_name: user.into(),
            text: Some(text.into()),
            message_id: None,
            reply_to: None,
            emoji: None,
            custom_id: None,
            ts_ms: crate::now_ms(),
            extra: Map::new(),
        }
    }

    /// Check an event from outside (a webhook POST): known type, the fields it needs.
    pub fn validate(&self) -> Result<(), String> {
        if self.channel_id.is_empty() {
            return Err("an inbound event needs `channel_id`".into());
        }
        match self.kind.as_str() {
            "message" if self.text.is_none() => Err("a `message` event needs `text`".into()),
            "reaction" if self.emoji.is_none() || self.message_id.is_none() => {
                Err("a `reaction` event needs `emoji` and `message_id`".into())
            }
            "button" if self.custom_id.is_none() => {
                Err("a `button` event needs `custom_id`".into())
            }
            "select" | "modal_submit" if self.custom_id.is_none() => {
                Err(format!("a `{}` event needs `custom_id`", self.kind))
            }
            // Discord interactions: `command`, `select`, `autocomplete`, `modal_submit`.
            "message" | "reaction" | "button" | "invite" | "command" | "select"
            | "autocomplete" | "modal_submit" => Ok(()),
            other => Err(format!(
                "unknown inbound event type `{other}` (message, reaction, button, invite, command, select, autocomplete, modal_submit)"
            )),
        }
    }
}

/// About how many entries an inbound stream keeps.
pub const INBOUND_MAXLEN: usize = 100_000;

/// Appends events to a platform's inbound stream (kept to about `INBOUND_MAXLEN`).
#[derive(Clone)]
pub struct InboundPublisher {
    conn: Conn,
    keys: Keys,
}

impl std::fmt::Debug for InboundPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundPublisher")
            .field("keys", &self.keys)
            .finish()
    }
}

impl InboundPublisher {
    pub fn new(conn: Conn, keys: Keys) -> Self {
        InboundPublisher { conn, keys }
    }

    pub async fn publish(&self, event: &InboundEvent) -> RedisResult<StreamId> {
        let mut conn = self.conn.clone();
        let payload = serde_json::to_string(event).expect("events serialise");
        let id: String = conn
            .xadd_maxlen(
                self.keys.inbound(),
                redis::streams::StreamMaxlen::Approx(INBOUND_MAXLEN),
                "*",
                &[("payload", payload)],
            )
            .await?;
        Ok(StreamId(id))
    }
}

/// A worker's at-least-once reader of a platform's inbound stream.
#[derive(Debug, Clone)]
pub struct InboundConsumer {
    bus: Bus,
    group: String,
    consumer: String,
    retry_after: Duration,
}

impl InboundConsumer {
    /// Read `bus`'s platform inbound stream in group `sg:worker:<P>` as `consumer`.
    pub fn new(bus: Bus, consumer: &str) -> Self {
        let group = format!("sg:worker:{}", bus.keys().platform());
        InboundConsumer {
            bus,
            group,
            consumer: consumer.to_owned(),
            retry_after: Duration::from_millis(500),
        }
    }

    /// Use another group (several independent worker pools).
    pub fn with_group(mut self, group: &str) -> Self {
        self.group = group.to_owned();
        self
    }

    /// How long a failed event waits before it is handed over again.
    pub fn with_retry_after(mut self, d: Duration) -> Self {
        self.retry_after = d;
        self
    }

    /// Hand every event to `handler` until `stop` is cancelled; acknowledge
    /// each one only after the handler returned Ok. An entry that is not a
    /// valid event goes to `sg:{P}:inbound:dlq` and is acknowledged.
    pub async fn run<F, Fut, E>(&self, handler: F, stop: CancellationToken) -> RedisResult<()>
    where
        F: Fn(InboundEvent) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Display,
    {
        let keys = self.bus.keys().clone();
        let mut conn = self.bus.conn();
        let created: RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(keys.inbound())
            .arg(&self.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        if let Err(e) = created
            && e.code() != Some("BUSYGROUP")
        {
            return Err(e);
        }
        let mut reader = self.bus.blocking_connection().await?;
        // Own pending first (a restart, or events that failed), then new ones.
        let mut from_pending = true;
        while !stop.is_cancelled() {
            let (from, block) = if from_pending {
                ("0", None)
            } else {
                (">", Some(1000u64))
            };
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(&self.group)
                .arg(&self.consumer)
                .arg("COUNT")
                .arg(100);
            if let Some(b) = block {
                cmd.arg("BLOCK").arg(b);
            }
            cmd.arg("STREAMS").arg(keys.inbound()).arg(from);
            let read = tokio::select! {
                r = tokio::time::timeout(Duration::from_secs(10), cmd.query_async::<redis::Value>(&mut reader)) => r,
                _ = stop.cancelled() => break,
            };
            let entries = match read {
                Ok(Ok(v)) => crate::bus::parse_read(v),
                Ok(Err(e)) => {
                    warn!(error = %e, "reading the inbound stream failed; retrying");
                    tokio::time::sleep(self.retry_after).await;
                    reader = self.bus.blocking_connection().await?;
                    continue;
                }
                Err(_) => continue,
            };
            if from_pending && entries.is_empty() {
                from_pending = false;
                continue;
            }
            let mut failed = false;
            for RawEntry { id, fields } in entries {
                let event = fields
                    .get("payload")
                    .ok_or_else(|| "no `payload` field".to_owned())
                    .and_then(|p| {
                        serde_json::from_slice::<InboundEvent>(p).map_err(|e| e.to_string())
                    });
                match event {
                    Ok(ev) => match handler(ev).await {
                        Ok(()) => self.ack(&id).await?,
                        Err(e) => {
                            warn!(stream_id = %id, error = %e, "inbound handler failed; the event will be handed over again");
                            failed = true;
                        }
                    },
                    Err(reason) => {
                        warn!(stream_id = %id, %reason, "inbound entry is not a valid event; dead-lettered");
                        let mut c = self.bus.conn();
                        let payload = fields.get("payload").cloned().unwrap_or_default();
                        redis::pipe()
                            .atomic()
                            .xadd(
                                format!("{}:dlq", keys.inbound()),
                                "*",
                                &[
                                    ("payload", payload),
                                    ("error", reason.into_bytes()),
                                    ("original_id", id.0.clone().into_bytes()),
                                ],
                            )
                            .ignore()
                            .xack(keys.inbound(), &self.group, &[&id.0])
                            .ignore()
                            .query_async::<()>(&mut c)
                            .await?;
                    }
                }
            }
            if failed {
                from_pending = true;
                tokio::select! {
                    _ = tokio::time::sleep(self.retry_after) => {}
                    _ = stop.cancelled() => break,
                }
            }
        }
        Ok(())
    }

    async fn ack(&self, id: &StreamId) -> RedisResult<()> {
        let mut c = self.bus.conn();
        c.xack::<_, _, _, ()>(self.bus.keys().inbound(), &self.group, &[&id.0])
            .await
    }
}
