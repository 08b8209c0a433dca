//! The dashboard's test scene, shared by tests/ui.rs (the API) and
//! tests/ui_browser.rs (the page in headless Chromium): a private
//! redis-server, a webhook receiver that enforces the webhook contract, and
//! two real gateways (`stargazer::gateway::run`, from a TOML config like an
//! operator's) on one platform — one serving the dashboard with an action
//! token, one without a listener — plus a backlog, a dead letter and an
//! order gap built through them.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::common::Rig;

pub const TOKEN: &str = "test-dashboard-token-0123456789";
pub const T: Duration = Duration::from_secs(30);

/// Entries of the `slow` channel: the platform answers 503 for it, so they
/// stay pending (the backlog).
pub const SLOW: usize = 20;
/// Entries of the `ok` channel, all delivered.
pub const OK: usize = 5;

/// One request the receiver answered with 2xx.
#[derive(Debug, Clone)]
pub struct Got {
    pub channel: String,
    pub text: String,
    pub idempotency_key: String,
    pub body: Value,
}

/// A webhook receiver: `slow` → 503 (retryable), `bad` → 404 Unknown Channel
/// (permanent) until `accept_bad`, anything else → 200 with a message id.
#[derive(Clone, Default)]
pub struct Receiver {
    pub delivered: Arc<Mutex<Vec<Got>>>,
    pub refused: Arc<Mutex<usize>>,
    pub accept_bad: Arc<Mutex<bool>>,
    tick: Arc<tokio::sync::watch::Sender<usize>>,
}

async fn receive(
    State(r): State<Receiver>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let channel = body["channel_id"].as_str().unwrap_or_default().to_owned();
    if channel == "slow" {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"message": "overloaded"})),
        );
    }
    if channel == "bad" && !*r.accept_bad.lock().unwrap() {
        *r.refused.lock().unwrap() += 1;
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"message": "Unknown Channel"})),
        );
    }
    let n = {
        let mut d = r.delivered.lock().unwrap();
        d.push(Got {
            channel,
            text: body["text"].as_str().unwrap_or_default().to_owned(),
            idempotency_key: headers
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            body: body.clone(),
        });
        d.len()
    };
    r.tick.send_replace(n);
    (
        StatusCode::OK,
        Json(json!({"message_id": format!("m-{n}")})),
    )
}

impl Receiver {
    pub async fn start() -> (Receiver, String) {
        let r = Receiver {
            tick: Arc::new(tokio::sync::watch::channel(0).0),
            ..Receiver::default()
        };
        let app = axum::Router::new()
            .route("/deliver", post(receive))
            .with_state(r.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/deliver", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (r, url)
    }

    pub fn delivered(&self) -> Vec<Got> {
        self.delivered.lock().unwrap().clone()
    }

    /// Wait until `n` deliveries were answered 2xx.
    pub async fn wait(&self, n: usize, within: Duration) {
        let mut rx = self.tick.subscribe();
        let ok = tokio::time::timeout(within, rx.wait_for(|c| *c >= n))
            .await
            .is_ok();
        assert!(ok, "receiver got {} of {n}", self.delivered().len());
    }
}

/// A gateway run in this process from a config file's text.
pub struct Gateway {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Gateway {
    pub fn start(toml: String, env: HashMap<String, String>) -> Gateway {
        let config = stargazer::config::Config::from_toml(&toml, env.clone()).expect("config");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            stargazer::gateway::run(config, env, async {
                let _ = rx.await;
            })
            .await
            .expect("gateway runs");
        });
        Gateway {
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// A free port on 127.0.0.1 (bound, then released for the gateway).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The config of a test gateway (fast timers; a gap waits a minute).
pub fn config(rig: &Rig, name: &str, url: &str, http: &str) -> String {
    format!(
        r#"
[redis]
url = "{redis}"
[gateway]
consumer_name = "{name}"
[consumer]
lock_ttl_ms = 1000
autoclaim_min_idle_ms = 2000
autoclaim_interval_ms = 1000
gap_timeout_ms = 60000
block_ms = 200
backoff_base_ms = 100
backoff_max_ms = 400
{http}
[[platform]]
name = "{platform}"
adapter = "webhook"
url = "{url}"
timeout_ms = 2000
"#,
        redis = rig.server.url(),
        platform = rig.keys.platform(),
    )
}

/// The scene: see the module doc.
pub struct Scene {
    pub rig: Rig,
    pub receiver: Receiver,
    pub addr: SocketAddr,
    pub gw_a: Gateway,
    /// `None` once stopped ([`Scene::stop_b`]).
    pub gw_b: Option<Gateway>,
    /// Stream ids of the slow channel's entries, oldest first.
    pub slow_ids: Vec<String>,
    /// The outbound id of the entry that was dead-lettered.
    pub bad_id: String,
    pub bad_key: String,
}

impl Scene {
    pub fn platform(&self) -> String {
        self.rig.keys.platform().to_owned()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn start() -> Scene {
        let rig = Rig::new().await;
        let (receiver, url) = Receiver::start().await;
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let env: HashMap<String, String> = [("SG_UI_TOKEN".to_owned(), TOKEN.to_owned())].into();
        let gw_a = Gateway::start(
            config(
                &rig,
                "gw-a",
                &url,
                &format!("[http]\nlisten = \"{addr}\"\nui_token_env = \"SG_UI_TOKEN\""),
            ),
            env,
        );
        let gw_b = Gateway::start(config(&rig, "gw-b", &url, ""), HashMap::new());

        let mut slow_ids = Vec::new();
        for i in 0..SLOW {
            slow_ids.push(
                rig.publish(json!({"channel_id": "slow", "text": format!("slow {i}")}))
                    .await
                    .id
                    .0,
            );
        }
        let bad = rig
            .publish(json!({"channel_id": "bad", "text": "to a channel that is gone"}))
            .await;
        for seq in [1, 3] {
            rig.publish(json!({"channel_id": "gapped", "text": format!("gap {seq}"), "seq": seq}))
                .await;
        }
        for i in 0..OK {
            rig.publish(json!({"channel_id": "ok", "text": format!("ok {i}")}))
                .await;
        }
        let scene = Scene {
            bad_id: bad.id.0.clone(),
            bad_key: bad.message_key.clone().expect("a message key"),
            rig,
            receiver,
            addr,
            gw_a,
            gw_b: Some(gw_b),
            slow_ids,
        };
        scene.receiver.wait(OK + 1, T).await; // ok ×5, gapped seq 1
        scene.settled().await;
        scene
    }

    /// Poll the API until the scene is in place: both gateways live, the
    /// dead letter written, the gap noted, the backlog pending.
    pub async fn settled(&self) -> Value {
        let deadline = Instant::now() + T;
        let client = reqwest::Client::new();
        loop {
            let r = client.get(self.url("/ui/api/overview")).send().await;
            if let Ok(r) = r
                && r.status() == 200
                && let Ok(v) = r.json::<Value>().await
                && let Some(p) = v["platforms"].get(0)
            {
                let live = p["gateways"]
                    .as_array()
                    .map(|g| g.iter().filter(|g| g["health"] == "live").count())
                    .unwrap_or(0);
                if live == 2
                    && p["dead_letters"] == 1
                    && p["gap_channels"].as_array().is_some_and(|g| g.len() == 1)
                    && p["pending"] == (SLOW + 1) as u64
                    && p["lag"] == 0
                {
                    return v;
                }
                assert!(
                    Instant::now() < deadline,
                    "the scene did not settle: {}",
                    serde_json::to_string_pretty(p).unwrap()
                );
            } else {
                assert!(Instant::now() < deadline, "no overview from the dashboard");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The dead letters' ids, oldest first.
    pub async fn dlq_ids(&self) -> Vec<String> {
        let r: redis::streams::StreamRangeReply = self
            .rig
            .cmd(&["XRANGE", &self.rig.keys.dlq(), "-", "+"])
            .await;
        r.ids.into_iter().map(|e| e.id).collect()
    }

    /// Append a dead letter by hand, as the gateway's commit script would.
    pub async fn add_dead_letter(
        &self,
        kind: &str,
        channel: &str,
        payload: &str,
        error: &str,
    ) -> String {
        add_dead_letter(&self.rig, kind, channel, payload, error).await
    }

    /// Wait until the receiver has `n` deliveries with idempotency key `key`
    /// and the outbound stream has nothing unread or pending but the backlog.
    pub async fn delivered_once(&self, key: &str) {
        let deadline = Instant::now() + T;
        loop {
            let n = self
                .receiver
                .delivered()
                .iter()
                .filter(|g| g.idempotency_key == key)
                .count();
            assert!(n <= 1, "{key} delivered {n} times");
            if n == 1 && self.rig.lag().await == 0 && self.rig.pending().await == (SLOW + 1) as u64
            {
                return;
            }
            assert!(Instant::now() < deadline, "{key} not delivered (n = {n})");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Shut the second gateway down (SIGTERM-like: drain, leave).
    pub async fn stop_b(&mut self) {
        if let Some(b) = self.gw_b.take() {
            b.stop().await;
        }
    }

    pub async fn stop(mut self) {
        self.stop_b().await;
        self.gw_a.stop().await;
    }
}

/// Append a dead letter by hand, as the gateway's commit script would.
pub async fn add_dead_letter(
    rig: &Rig,
    kind: &str,
    channel: &str,
    payload: &str,
    error: &str,
) -> String {
    let orig = format!("{}-0", stargazer::now_ms() - 5_000);
    rig.cmd(&[
        "XADD",
        &rig.keys.dlq(),
        "*",
        "payload",
        payload,
        "error",
        error,
        "error_kind",
        kind,
        "attempts",
        "1",
        "original_id",
        &orig,
        "consumer",
        "gw-x",
        "failed_ms",
        &stargazer::now_ms().to_string(),
        "channel_id",
        channel,
    ])
    .await
}

/// A dashboard of its own (no gateway) over the rig's platform, shown as a
/// `discord` platform, on a listener at a free port.
pub async fn standalone(
    rig: &Rig,
    token: Option<&str>,
    readiness: stargazer::http::Readiness,
) -> (
    stargazer::ui::Ui,
    SocketAddr,
    tokio_util::sync::CancellationToken,
) {
    let stop = tokio_util::sync::CancellationToken::new();
    let ui = stargazer::ui::Ui::new(token, readiness.clone(), "gw-ui");
    ui.add_platform(
        stargazer::ui::UiPlatform {
            name: rig.keys.platform().to_owned(),
            adapter: "discord".into(),
            bus: rig.bus.clone(),
            settings: stargazer::config::ConsumerConfig::default(),
        },
        Arc::new(stargazer::stats::Stats::default()),
    );
    let addr = stargazer::http::serve_routes(
        "127.0.0.1:0".parse().unwrap(),
        stop.clone(),
        readiness,
        Default::default(),
        ui.router(),
    )
    .await
    .unwrap();
    (ui, addr, stop)
}

/// `n` dead letters, one per millisecond from the returned base time (ids
/// `<base + i>-0`): kinds cycle through rejected, retries_exhausted,
/// too_large, not_json (i mod 4), channels through c0…c9 (i mod 10).
pub async fn fill_dead_letters(rig: &Rig, n: u64) -> u64 {
    let base = stargazer::now_ms() - n - 60_000;
    let kinds = ["rejected", "retries_exhausted", "too_large", "not_json"];
    let mut conn = rig.bus.conn();
    for chunk in (0..n).collect::<Vec<_>>().chunks(5_000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            let payload = format!(r#"{{"channel_id":"c{}","text":"message {i}"}}"#, i % 10);
            pipe.cmd("XADD")
                .arg(rig.keys.dlq())
                .arg(format!("{}-0", base + i))
                .arg("payload")
                .arg(payload)
                .arg("error")
                .arg("made up")
                .arg("error_kind")
                .arg(kinds[(i % 4) as usize])
                .arg("attempts")
                .arg(1)
                .arg("original_id")
                .arg(format!("{}-0", base + i - 1))
                .arg("consumer")
                .arg("gw-x")
                .arg("failed_ms")
                .arg(base + i)
                .arg("channel_id")
                .arg(format!("c{}", i % 10))
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await.unwrap();
    }
    base
}
