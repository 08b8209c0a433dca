//! A platform's circuit: open while the platform refuses the credential
//! itself (a revoked Discord token, a logged-out Matrix access token).
//!
//! A refused credential is not a verdict on one message: every request of
//! the platform would meet it, and some platforms punish repeats (Discord bans
//! an IP after 10,000 invalid requests in 10 minutes). So the first
//! [`Retry::Halt`](crate::adapters::Retry::Halt) opens the circuit: every lane
//! of the platform stops before its next send and keeps its entries pending
//! (no attempt used, nothing dead-lettered), one ERROR line and the
//! `stargazer_circuit_open` gauge say why, `/readyz` names the platform, and
//! one probe ([`Adapter::probe`](crate::adapters::Adapter::probe)) runs with
//! backoff until the credential works again; then sends resume in order.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::adapters::{Retry, SharedAdapter};

/// The first probe waits this long; each failure doubles it up to [`PROBE_MAX`].
pub const PROBE_FIRST: Duration = Duration::from_secs(1);
pub const PROBE_MAX: Duration = Duration::from_secs(30);

/// One platform's circuit; cheap to clone.
#[derive(Debug, Clone)]
pub struct Circuit {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    platform: String,
    /// `Some(reason)` while open.
    state: watch::Sender<Option<Opened>>,
    probing: Mutex<bool>,
}

/// Why and since when a circuit is open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub reason: String,
    pub since: Instant,
}

impl Circuit {
    pub fn new(platform: &str) -> Circuit {
        let (state, _) = watch::channel(None);
        Circuit {
            inner: Arc::new(Inner {
                platform: platform.to_owned(),
                state,
                probing: Mutex::new(false),
            }),
        }
    }

    pub fn platform(&self) -> &str {
        &self.inner.platform
    }

    /// The reason it is open, or None while closed.
    pub fn open_reason(&self) -> Option<String> {
        self.inner.state.borrow().as_ref().map(|o| o.reason.clone())
    }

    pub fn is_open(&self) -> bool {
        self.inner.state.borrow().is_some()
    }

    /// Open the circuit (a send met a refused credential) and start the
    /// probe that closes it. True when this call opened it.
    pub fn trip(&self, reason: &str, adapter: &SharedAdapter, stop: &CancellationToken) -> bool {
        let opened = self.open(reason);
        self.ensure_probe(adapter, stop);
        opened
    }

    /// Open the circuit without starting a probe (a platform session saw
    /// the credential refused; [`Circuit::trip`] starts the probe). True
    /// when this call opened it.
    pub fn open(&self, reason: &str) -> bool {
        let opened = self.inner.state.send_if_modified(|s| {
            if s.is_some() {
                return false;
            }
            *s = Some(Opened {
                reason: reason.to_owned(),
                since: Instant::now(),
            });
            true
        });
        if opened {
            crate::metrics::circuit(&self.inner.platform, true);
            error!(
                platform = %self.inner.platform,
                reason,
                "the platform refused the credential: every send of this platform stops, its entries stay pending; \
                 fix the credential (the gateway probes it with backoff and resumes by itself)"
            );
        }
        opened
    }

    /// Start the probe unless one runs (an earlier one may have been stopped
    /// with the instance that started it).
    pub fn ensure_probe(&self, adapter: &SharedAdapter, stop: &CancellationToken) {
        let mut probing = self.inner.probing.lock().expect("circuit poisoned");
        if !*probing && self.is_open() {
            *probing = true;
            tokio::spawn(self.clone().probe(adapter.clone(), stop.clone()));
        }
    }

    /// Close the circuit: sends resume.
    pub fn close(&self) {
        let closed = self.inner.state.send_if_modified(|s| s.take().is_some());
        if closed {
            crate::metrics::circuit(&self.inner.platform, false);
        }
    }

    /// Resolves at once while closed, else when the circuit closes.
    pub async fn closed(&self) {
        let mut rx = self.inner.state.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = rx.wait_for(Option::is_none).await;
    }

    async fn probe(self, adapter: SharedAdapter, stop: CancellationToken) {
        let mut wait = PROBE_FIRST;
        let platform = self.inner.platform.clone();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => break,
            }
            match adapter.probe().await {
                Ok(()) => {
                    let since = self.inner.state.borrow().as_ref().map(|o| o.since);
                    {
                        // Under the lock: a trip after this starts a new probe.
                        let mut probing = self.inner.probing.lock().expect("circuit poisoned");
                        self.close();
                        *probing = false;
                    }
                    info!(
                        platform = %platform,
                        open_for_ms = since.map(|s| s.elapsed().as_millis() as u64).unwrap_or(0),
                        "the platform accepts the credential again; sends resume"
                    );
                    return;
                }
                Err(e) if e.retry == Retry::Halt => {
                    let changed = self
                        .inner
                        .state
                        .borrow()
                        .as_ref()
                        .is_some_and(|o| o.reason != e.message);
                    if changed {
                        warn!(platform = %platform, reason = %e.message, "credential still refused");
                    }
                }
                Err(e) => {
                    warn!(platform = %platform, error = %e.message, "credential probe failed; trying again");
                }
            }
            wait = (wait * 2).min(PROBE_MAX);
        }
        *self.inner.probing.lock().expect("circuit poisoned") = false;
    }
}
