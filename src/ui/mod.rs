//! The web dashboard, served by the gateway's HTTP listener under `/ui/`:
//! one page (plain HTML, CSS and a small script, embedded in the binary — no
//! internet at run time, no JavaScript toolchain at build time) and the JSON
//! API it reads, `/ui/api/…`.
//!
//! - [`api`]: the handlers. Read-only ones reuse what `stargazer status` and
//!   `stargazer dlq` compute ([`crate::ops::status`], [`crate::ops::dlq`]);
//!   the two actions (replay, purge) call the same functions as the CLI.
//! - [`rates`]: deliveries, retries and dead letters per second for the charts.
//!
//! Actions need `POST` with `Authorization: Bearer <token>`, the token being
//! `http.ui_token_env`'s variable; with no token configured the dashboard is
//! read-only and every action is refused (403). Every action, and every
//! refusal, is logged with the peer address and the operator name the page
//! sends (`X-Stargazer-Operator`).
//!
//! Cost: nothing touches Redis unless a page (or a script) asks; the Redis
//! figures of the overview are computed at most once per second however many
//! pages poll, and the rates come from in-memory counters.

pub mod api;
pub mod rates;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use axum::Router;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::config::ConsumerConfig;
use crate::http::Readiness;
use crate::stats::Stats;

/// The page, its style sheet and its script, embedded at build time.
pub mod assets {
    pub const INDEX_HTML: &str = include_str!("assets/index.html");
    pub const APP_CSS: &str = include_str!("assets/app.css");
    pub const APP_JS: &str = include_str!("assets/app.js");
}

/// The dashboard's shared state: cheap to clone, filled in as the gateway
/// starts its platforms (the listener is up before they are).
#[derive(Clone)]
pub struct Ui(Arc<Inner>);

struct Inner {
    token: Option<Token>,
    readiness: Readiness,
    /// This gateway's consumer name (its row is marked in the page).
    node: String,
    platforms: RwLock<Vec<UiPlatform>>,
    rates: Arc<rates::Rates>,
    /// The last overview and when it was computed (shared by all viewers).
    overview: tokio::sync::Mutex<Option<(Instant, serde_json::Value)>>,
    /// Per (platform, consumer): the last heartbeat counter seen and the
    /// server time it was first seen at — a counter that stands still is a
    /// stalled gateway.
    beats: Mutex<HashMap<(String, String), (u64, u64)>>,
}

impl std::fmt::Debug for Ui {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ui")
            .field("node", &self.0.node)
            .field("token", &self.0.token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// The action token, kept only as its SHA-256 (compared in constant time).
struct Token([u8; 32]);

impl Token {
    fn new(secret: &str) -> Token {
        Token(Sha256::digest(secret.as_bytes()).into())
    }

    fn matches(&self, given: &str) -> bool {
        let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        self.0
            .iter()
            .zip(given.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// One platform as the dashboard sees it.
#[derive(Debug, Clone)]
pub struct UiPlatform {
    pub name: String,
    /// The adapter kind (`webhook`, `discord`, …).
    pub adapter: String,
    pub bus: Bus,
    /// Its consumer settings (gap timeout, node lease, signing secret for replays).
    pub settings: ConsumerConfig,
}

impl Ui {
    /// A dashboard; `token` enables the actions (`None`: read-only).
    pub fn new(token: Option<&str>, readiness: Readiness, node: &str) -> Ui {
        Ui(Arc::new(Inner {
            token: token.map(Token::new),
            readiness,
            node: node.to_owned(),
            platforms: RwLock::new(Vec::new()),
            rates: Arc::new(rates::Rates::default()),
            overview: tokio::sync::Mutex::new(None),
            beats: Mutex::new(HashMap::new()),
        }))
    }

    /// Show `p`, with `stats` (its consumer's counters) for the charts.
    pub fn add_platform(&self, p: UiPlatform, stats: Arc<Stats>) {
        self.0.rates.add(&p.name, stats);
        let mut ps = self.0.platforms.write().expect("ui platforms poisoned");
        ps.retain(|q| q.name != p.name);
        ps.push(p);
    }

    /// Whether actions are possible at all (a token is configured).
    pub fn actions_enabled(&self) -> bool {
        self.0.token.is_some()
    }

    /// The rate rings (for tests and the sampler).
    pub fn rates(&self) -> Arc<rates::Rates> {
        self.0.rates.clone()
    }

    /// Start the rate sampler; it stops with `stop`.
    pub fn spawn_sampler(&self, stop: CancellationToken) -> JoinHandle<()> {
        self.0.rates.clone().spawn(stop)
    }

    /// The routes under `/ui` (merge into the listener's router).
    pub fn router(&self) -> Router {
        api::router(self.clone())
    }

    fn platform(&self, name: &str) -> Option<UiPlatform> {
        self.0
            .platforms
            .read()
            .expect("ui platforms poisoned")
            .iter()
            .find(|p| p.name == name)
            .cloned()
    }

    fn platforms(&self) -> Vec<UiPlatform> {
        self.0
            .platforms
            .read()
            .expect("ui platforms poisoned")
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        let t = Token::new("s3cret-token");
        assert!(t.matches("s3cret-token"));
        assert!(!t.matches("s3cret-toke"));
        assert!(!t.matches(""));
        let ui = Ui::new(Some("abc"), Readiness::new("redis://127.0.0.1:1"), "gw");
        assert!(!format!("{ui:?}").contains("abc"));
    }

    #[test]
    fn the_page_uses_only_its_own_files() {
        for (name, text) in [
            ("index.html", assets::INDEX_HTML),
            ("app.css", assets::APP_CSS),
            ("app.js", assets::APP_JS),
        ] {
            for bad in ["http://", "https://", "//cdn", "@import"] {
                assert!(!text.contains(bad), "{name} refers to `{bad}`");
            }
        }
    }
}
