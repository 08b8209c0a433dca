//! The credential circuit of one Discord bot token.
//!
//! Discord asks clients to stop after a 401: every other request with the
//! same token will be refused too, and each refusal counts against the
//! invalid-request ban (10,000 per 10 minutes per IP). So a 401 is a verdict
//! on the token, not on the message: the circuit opens, every send of the
//! platform is handed back to the engine as [`AdapterError::unauthorized`]
//! without a request (entries stay pending, nothing is dead-lettered), and a
//! cheap probe (`GET /users/@me`) is tried with exponential backoff until the
//! token works again; then the circuit closes and sends resume in order.
//!
//! The circuit is per process (one [`Circuit`], shared by the adapter and the
//! gateway session of the platform); the refusal is also recorded in Redis
//! (`{base}auth:refused`, see `limits.lua`), so every other gateway of the
//! fleet stops at its next send instead of earning its own 401s.
//!
//! [`AdapterError::unauthorized`]: crate::adapters::AdapterError::unauthorized

use std::sync::Mutex;
use std::time::Duration;

use std::time::Instant;

use tokio::sync::watch;
use tracing::{error, info};

/// The first wait between probes; doubles up to [`PROBE_MAX`].
pub const PROBE_BASE: Duration = Duration::from_secs(1);
/// The longest wait between probes.
pub const PROBE_MAX: Duration = Duration::from_secs(30);

pub use crate::bus::discord::refused_key;

#[derive(Debug)]
struct Open {
    reason: String,
    since: Instant,
    next_probe: Instant,
    backoff: Duration,
}

/// Whether a bot token is known to be refused; see the module docs.
#[derive(Debug)]
pub struct Circuit {
    platform: String,
    open: Mutex<Option<Open>>,
    /// `true` while open; the session waits on it to reconnect.
    state: watch::Sender<bool>,
}

impl Circuit {
    pub fn new(platform: &str) -> Circuit {
        Circuit {
            platform: platform.to_owned(),
            open: Mutex::new(None),
            state: watch::channel(false).0,
        }
    }

    /// Open the circuit (idempotent). The first opening logs one ERROR line
    /// naming the cause and the fix, and sets the metric.
    pub fn open(&self, reason: &str) {
        self.open_at(reason, Instant::now());
    }

    fn open_at(&self, reason: &str, now: Instant) {
        let mut open = self.open.lock().expect("circuit");
        if open.is_some() {
            return;
        }
        error!(platform = %self.platform, reason,
            "discord refused the bot token: every send of this platform stops (entries stay pending, nothing is dead-lettered) until it works again; \
             fix the token (Developer Portal → Bot → Reset Token, then `token_env`) — a probe (GET /users/@me) retries with backoff");
        crate::metrics::discord_credential_refused(&self.platform, true);
        *open = Some(Open {
            reason: reason.to_owned(),
            since: now,
            next_probe: now + PROBE_BASE,
            backoff: PROBE_BASE,
        });
        self.state.send_replace(true);
    }

    /// Close the circuit: the token works again.
    pub fn close(&self) {
        let mut open = self.open.lock().expect("circuit");
        if let Some(o) = open.take() {
            info!(platform = %self.platform, refused_for_ms = o.since.elapsed().as_millis() as u64,
                "discord accepts the bot token again; sends resume");
            crate::metrics::discord_credential_refused(&self.platform, false);
            self.state.send_replace(false);
        }
    }

    pub fn is_open(&self) -> bool {
        self.open.lock().expect("circuit").is_some()
    }

    /// Why the circuit is open, if it is.
    pub fn reason(&self) -> Option<String> {
        self.open
            .lock()
            .expect("circuit")
            .as_ref()
            .map(|o| o.reason.clone())
    }

    /// Whether the caller may probe now: true at most once per backoff
    /// step (the step doubles each time, up to [`PROBE_MAX`]).
    pub fn take_probe(&self) -> bool {
        self.take_probe_at(Instant::now())
    }

    fn take_probe_at(&self, now: Instant) -> bool {
        let mut open = self.open.lock().expect("circuit");
        let Some(o) = open.as_mut() else {
            return false;
        };
        if now < o.next_probe {
            return false;
        }
        o.backoff = (o.backoff * 2).min(PROBE_MAX);
        o.next_probe = now + o.backoff;
        true
    }

    /// How long until the next probe is due (zero when closed or due).
    pub fn until_probe(&self) -> Duration {
        self.until_probe_at(Instant::now())
    }

    fn until_probe_at(&self, now: Instant) -> Duration {
        self.open
            .lock()
            .expect("circuit")
            .as_ref()
            .map(|o| o.next_probe.saturating_duration_since(now))
            .unwrap_or_default()
    }

    /// Wait until the circuit is closed.
    pub async fn closed(&self) {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|open| !*open).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn probes_back_off_and_closing_resumes() {
        let c = Circuit::new("dc");
        let t0 = Instant::now();
        assert!(!c.is_open() && !c.take_probe_at(t0));
        c.open_at("401", t0);
        c.open_at("another 401", t0);
        assert_eq!(c.reason().as_deref(), Some("401"));
        assert!(!c.take_probe_at(t0), "the first probe waits PROBE_BASE");
        let mut t = t0 + PROBE_BASE;
        assert!(c.take_probe_at(t));
        assert!(!c.take_probe_at(t), "one probe per step");
        assert_eq!(c.until_probe_at(t), PROBE_BASE * 2);
        t += PROBE_BASE * 2;
        assert!(c.take_probe_at(t));
        assert_eq!(c.until_probe_at(t), PROBE_BASE * 4);
        for _ in 0..10 {
            t += PROBE_MAX;
            assert!(c.take_probe_at(t));
        }
        assert_eq!(c.until_probe_at(t), PROBE_MAX);
        let c = std::sync::Arc::new(c);
        let w = c.clone();
        let waiter = tokio::spawn(async move { w.closed().await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        c.close();
        assert!(!c.is_open() && c.reason().is_none());
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("closing wakes the waiter")
            .unwrap();
    }
}
