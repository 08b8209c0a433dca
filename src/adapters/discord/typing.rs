//! Typing kept alive for its TTL.
//!
//! Discord's typing indicator lasts about 10 s after one
//! `POST /channels/{c}/typing`. A `start_typing` with `expires_ms` is meant
//! to show until then, so the indicator is triggered again every
//! [`BEAT`] until `expires_ms` passes (at most [`MAX_KEEP`]), a `stop_typing`
//! of the channel arrives, or a message is sent to it. Each beat takes a
//! permit of the shared rate limiter first and is skipped when none is free:
//! a keep-alive never delays a message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderValue};
use tracing::debug;

use super::{Limiter, Route};

/// How often the indicator is triggered again (Discord's lasts ~10 s).
pub const BEAT: Duration = Duration::from_secs(8);
/// The longest a keep-alive runs, whatever `expires_ms` says.
pub const MAX_KEEP: Duration = Duration::from_secs(600);

/// How a beat is sent.
#[derive(Clone)]
pub struct TypingRequest {
    pub client: reqwest::Client,
    /// The API base.
    pub base: String,
    pub auth: HeaderValue,
}

/// The channels being kept typing: channel → the generation of its keep-alive.
#[derive(Debug)]
pub struct Typing {
    live: Arc<Mutex<HashMap<String, u64>>>,
    next: std::sync::atomic::AtomicU64,
    /// How often the indicator is triggered again ([`BEAT`]).
    beat: Duration,
}

impl Typing {
    pub fn new(beat: Duration) -> Typing {
        Typing {
            live: Arc::default(),
            next: Default::default(),
            beat: beat.max(Duration::from_millis(10)),
        }
    }

    /// Keep `channel` typing until `until_ms` (Unix ms), replacing an
    /// earlier keep-alive of the channel.
    pub fn keep(
        &self,
        channel: &str,
        route: Route,
        until_ms: u64,
        limiter: Limiter,
        req: TypingRequest,
    ) {
        let now = crate::now_ms();
        let until = until_ms.min(now + MAX_KEEP.as_millis() as u64);
        let beat = self.beat;
        if until <= now + beat.as_millis() as u64 {
            return; // The first trigger covers it.
        }
        let generation = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.live
            .lock()
            .expect("typing")
            .insert(channel.to_owned(), generation);
        let live = self.live.clone();
        let channel = channel.to_owned();
        tokio::spawn(async move {
            let current = || live.lock().expect("typing").get(&channel) == Some(&generation);
            loop {
                tokio::time::sleep(beat).await;
                if !current() || crate::now_ms() >= until {
                    break;
                }
                match limiter.acquire(&route, false).await {
                    Ok(None) => {}
                    _ => continue,
                }
                let r = req
                    .client
                    .post(format!("{}{}", req.base, route.path))
                    .header(AUTHORIZATION, req.auth.clone())
                    .send()
                    .await;
                if let Err(e) = r {
                    debug!(channel, error = %e.without_url(), "a typing keep-alive beat failed");
                }
            }
            let mut l = live.lock().expect("typing");
            if l.get(&channel) == Some(&generation) {
                l.remove(&channel);
            }
        });
    }

    /// Stop keeping `channel` typing (a `stop_typing`, or a message sent).
    pub fn stop(&self, channel: &str) {
        self.live.lock().expect("typing").remove(channel);
    }

    /// Whether `channel` is being kept typing.
    pub fn is_kept(&self, channel: &str) -> bool {
        self.live.lock().expect("typing").contains_key(channel)
    }
}
