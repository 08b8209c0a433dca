//! The null adapter: accepts and discards every action. It stands in for a
//! platform in tests and benchmarks, optionally taking a fixed time per
//! delivery to simulate a slow one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{Adapter, AdapterError, BoxFuture, Capabilities, Delivered, Delivery};
use crate::envelope::Action;

/// Discards every action. Messages, files and buttons get synthetic ids
/// (`null-1`, `null-2`, …); the other actions return no id.
#[derive(Debug, Default)]
pub struct NullAdapter {
    delay: Duration,
    next_id: AtomicU64,
    delivered: AtomicU64,
}

impl NullAdapter {
    /// A null adapter that takes `delay` per delivery (none when zero).
    pub fn new(delay: Duration) -> Self {
        Self {
            delay,
            next_id: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
        }
    }

    /// How many deliveries this adapter has completed.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }
}

impl Adapter for NullAdapter {
    fn kind(&self) -> &'static str {
        "null"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    fn deliver<'a>(
        &'a self,
        delivery: Delivery<'a>,
    ) -> BoxFuture<'a, Result<Delivered, AdapterError>> {
        Box::pin(async move {
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            let message_id = match delivery.envelope.action {
                Action::Message { .. } | Action::File { .. } | Action::Buttons { .. } => {
                    let n = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
                    Some(format!("null-{n}"))
                }
                _ => None,
            };
            self.delivered.fetch_add(1, Ordering::Relaxed);
            Ok(Delivered { message_id })
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::envelope::{Envelope, ParseRules, StreamId, parse_entry};

    fn envelope(json: &str) -> Envelope {
        let rules = ParseRules {
            max_payload_bytes: 1 << 16,
            signing_secret: None,
            cache_prefix: "sg:msg:".into(),
            own_prefixes: vec!["sg:{".into(), "sg:gateway:".into()],
            reply_prefix: "sg:{p}:rpc:reply:".into(),
        };
        let mut fields = HashMap::new();
        fields.insert("payload".to_owned(), json.as_bytes().to_vec());
        parse_entry(&fields, &rules).result.expect("valid envelope")
    }

    async fn deliver(adapter: &NullAdapter, env: &Envelope) -> Delivered {
        let id = StreamId("1-0".into());
        adapter
            .deliver(Delivery {
                platform: "p",
                stream_id: &id,
                envelope: env,
                idempotency_key: "k",
                attempt: 1,
                resend: false,
                target: None,
            })
            .await
            .expect("null never fails")
    }

    #[tokio::test]
    async fn ids_for_messages_none_for_the_rest() {
        let a = NullAdapter::new(Duration::ZERO);
        let msg = envelope(r#"{"channel_id":"c","text":"hi"}"#);
        let typing = envelope(r#"{"type":"typing","channel_id":"c"}"#);
        let file = envelope(r#"{"type":"file","channel_id":"c","file_data":"aGk="}"#);
        assert_eq!(
            deliver(&a, &msg).await.message_id.as_deref(),
            Some("null-1")
        );
        assert_eq!(deliver(&a, &typing).await.message_id, None);
        assert_eq!(
            deliver(&a, &file).await.message_id.as_deref(),
            Some("null-2")
        );
        assert_eq!(a.delivered(), 3);
        assert_eq!(a.kind(), "null");
        assert_eq!(a.capabilities(), Capabilities::ALL);
    }

    #[tokio::test]
    async fn delay_is_taken_per_delivery() {
        let a = NullAdapter::new(Duration::from_millis(20));
        let msg = envelope(r#"{"channel_id":"c","text":"hi"}"#);
        let start = std::time::Instant::now();
        deliver(&a, &msg).await;
        deliver(&a, &msg).await;
        assert!(start.elapsed() >= Duration::from_millis(40));
    }
}
