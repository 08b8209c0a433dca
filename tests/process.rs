//! The `stargazer` binary as an operator runs it: real processes, real
//! signals, the webhook adapter against a local HTTP receiver.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::Rig;
use serde_json::{Value, json};

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Got {
    body: Value,
    idempotency_key: String,
}

#[derive(Clone)]
struct Receiver {
    got: Arc<Mutex<Vec<Got>>>,
    /// Hang (never answer) while this is set.
    hang: Arc<Mutex<bool>>,
    delay: Duration,
    tick: tokio::sync::watch::Sender<usize>,
}

async fn receive(
    State(r): State<Receiver>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let n = {
        let mut got = r.got.lock().unwrap();
        got.push(Got {
            body: body.clone(),
            idempotency_key: key,
        });
        got.len()
    };
    r.tick.send_replace(n);
    if *r.hang.lock().unwrap() {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(r.delay).await;
    (
        StatusCode::OK,
        Json(json!({"message_id": format!("wh-{n}")})),
    )
}

impl Receiver {
    async fn start(delay: Duration) -> (Receiver, String) {
        let r = Receiver {
            got: Arc::default(),
            hang: Arc::default(),
            delay,
            tick: tokio::sync::watch::channel(0).0,
        };
        let app = axum::Router::new()
            .route("/deliver", post(receive))
            .with_state(r.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/deliver", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (r, url)
    }

    async fn wait(&self, n: usize, within: Duration) {
        let mut rx = self.tick.subscribe();
        let ok = tokio::time::timeout(within, rx.wait_for(|c| *c >= n))
            .await
            .is_ok();
        assert!(ok, "receiver got {} of {n}", self.got.lock().unwrap().len());
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
}

/// A gateway process, killed if a test ends (or fails) while it runs.
struct Gw(Child);

impl Drop for Gw {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Gw {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Gw {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

fn gateway(rig: &Rig, name: &str, url: &str, extra: &str) -> (Gw, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stargazer.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[redis]
url = "{}"
[gateway]
consumer_name = "{name}"
[consumer]
autoclaim_interval_ms = 200
autoclaim_min_idle_ms = 1500
lock_ttl_ms = 900
block_ms = 200
drain_timeout_ms = 5000
{extra}
[[platform]]
name = "{}"
adapter = "webhook"
url = "{url}"
timeout_ms = 60000
"#,
            rig.server.url(),
            rig.keys.platform()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_stargazer"))
        .args(["gateway", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("start gateway");
    (Gw(child), dir)
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

async fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "gateway did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn by_channel(got: &[Got]) -> std::collections::HashMap<String, Vec<u64>> {
    let mut m: std::collections::HashMap<String, Vec<u64>> = Default::default();
    for g in got {
        let c = g.body["channel_id"].as_str().unwrap().to_owned();
        m.entry(c)
            .or_default()
            .push(g.body["seq"].as_u64().unwrap());
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_exits_zero_and_a_later_gateway_delivers_the_rest() {
    let rig = Rig::new().await;
    let (rx, url) = Receiver::start(Duration::from_millis(10)).await;
    for i in 0..300 {
        rig.publish(json!({"channel_id": format!("c{}", i % 3), "text": format!("m{i}")}))
            .await;
    }
    let (mut a, _da) = gateway(&rig, "gw-a", &url, "max_in_flight = 30");
    rx.wait(30, Duration::from_secs(30)).await;
    signal(&a, "-TERM");
    let status = wait_exit(&mut a, Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status:?}");
    let delivered_by_a = rx.got().len();
    assert!(
        delivered_by_a < 300,
        "stopped before the end ({delivered_by_a})"
    );
    // What it read but did not finish is left pending, and the gateway
    // unregistered, so the next gateway claims it at once.
    assert!(rig.pending().await > 0, "unfinished entries stay pending");
    let registered: Option<String> = rig
        .cmd(&[
            "HGET",
            &format!("sg:{{{}}}:nodes", rig.keys.platform()),
            "gw-a",
        ])
        .await;
    assert_eq!(registered, None, "gw-a unregistered at shutdown");
    let locks: Vec<String> = rig
        .cmd(&["KEYS", &format!("sg:{{{}}}:chan:*", rig.keys.platform())])
        .await;
    for k in locks {
        let owner: Option<String> = rig.cmd(&["HGET", &k, "owner"]).await;
        assert_eq!(owner, None, "lock on {k} released");
    }

    let (mut b, _db) = gateway(&rig, "gw-b", &url, "");
    rx.wait(300, Duration::from_secs(30)).await;
    rig.drained(Duration::from_secs(30)).await;
    signal(&b, "-INT");
    assert!(wait_exit(&mut b, Duration::from_secs(15)).await.success());
    let got = rx.got();
    assert_eq!(got.len(), 300, "each message exactly once");
    for (c, seqs) in by_channel(&got) {
        assert_eq!(seqs, (1..=100).collect::<Vec<_>>(), "channel {c}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_mid_send_is_recovered_with_the_same_idempotency_key() {
    let rig = Rig::new().await;
    let (rx, url) = Receiver::start(Duration::ZERO).await;
    *rx.hang.lock().unwrap() = true;
    rig.publish(json!({"channel_id": "c", "text": "first", "message_key": "sg:msg:first"}))
        .await;
    rig.publish(json!({"channel_id": "c", "text": "second"}))
        .await;
    let (mut a, _da) = gateway(&rig, "gw-a", &url, "");
    rx.wait(1, Duration::from_secs(30)).await;
    // The request reached the platform; the gateway dies before it hears back.
    signal(&a, "-KILL");
    wait_exit(&mut a, Duration::from_secs(10)).await;
    *rx.hang.lock().unwrap() = false;

    let (mut b, _db) = gateway(&rig, "gw-b", &url, "");
    rx.wait(3, Duration::from_secs(30)).await;
    rig.drained(Duration::from_secs(30)).await;
    signal(&b, "-TERM");
    assert!(wait_exit(&mut b, Duration::from_secs(15)).await.success());
    let got = rx.got();
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got[0].body["text"], "first");
    assert_eq!(
        got[1].body["text"], "first",
        "the interrupted send is repeated…"
    );
    assert_eq!(
        got[1].idempotency_key, got[0].idempotency_key,
        "…with the same idempotency key"
    );
    assert_eq!(got[1].idempotency_key, "sg:msg:first");
    assert_eq!(got[1].body["resend"], true);
    assert_eq!(got[2].body["text"], "second", "and order holds");
    let mid: String = rig.cmd(&["HGET", "sg:msg:first", "message_id"]).await;
    assert_eq!(mid, "wh-2");
}

#[tokio::test]
async fn a_bad_config_is_refused_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[consumer]\nmax_in_flight = 0\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_stargazer"))
        .args(["gateway", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("consumer.max_in_flight"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_platforms_take_signed_inbound_events_over_http() {
    let rig = Rig::new().await;
    let (_rx, url) = Receiver::start(Duration::ZERO).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let extra = format!("[http]\nlisten = \"127.0.0.1:{port}\"");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        format!(
            "[redis]\nurl = \"{}\"\n{extra}\n[[platform]]\nname = \"{}\"\nadapter = \"webhook\"\nurl = \"{url}\"\nsecret = \"s3cret\"\n",
            rig.server.url(),
            rig.keys.platform()
        ),
    )
    .unwrap();
    let mut gw = Gw(Command::new(env!("CARGO_BIN_EXE_stargazer"))
        .args(["gateway", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap());
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .ok()
        != Some(200)
    {
        assert!(Instant::now() < deadline, "gateway never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let body =
        json!({"type": "message", "channel_id": "c", "user_id": "u", "text": "hi"}).to_string();
    let post = |sig: Option<String>, body: String| {
        let mut r = client
            .post(format!("{base}/inbound/{}", rig.keys.platform()))
            .header("content-type", "application/json")
            .body(body);
        if let Some(s) = sig {
            r = r.header("x-stargazer-signature", s);
        }
        r.send()
    };
    assert_eq!(
        post(None, body.clone()).await.unwrap().status().as_u16(),
        401
    );
    let sig = stargazer::envelope::sign(b"s3cret", body.as_bytes());
    let ok = post(Some(sig), body.clone()).await.unwrap();
    assert_eq!(ok.status().as_u16(), 202);
    let bad = json!({"type": "message", "channel_id": "c"}).to_string();
    let sig = stargazer::envelope::sign(b"s3cret", bad.as_bytes());
    let r = post(Some(sig), bad).await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await.unwrap().contains("text"));
    let r: redis::streams::StreamRangeReply =
        rig.cmd(&["XRANGE", &rig.keys.inbound(), "-", "+"]).await;
    assert_eq!(r.ids.len(), 1);
    let ev: Value = serde_json::from_str(&r.ids[0].get::<String>("payload").unwrap()).unwrap();
    assert_eq!(ev["text"], "hi");
    assert_eq!(ev["platform"], rig.keys.platform());
    signal(&gw, "-TERM");
    assert!(wait_exit(&mut gw, Duration::from_secs(15)).await.success());
}

#[tokio::test]
async fn toggle_switches_are_set_listed_and_read_back() {
    use stargazer::toggles::{TOGGLE_MENU, Toggles};
    let rig = Rig::new().await;
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_stargazer"))
            .arg("toggle")
            .args(["--redis-url", &rig.server.url(), "--platform"])
            .arg(rig.keys.platform())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    assert!(run(&["off", "--guild", "g1"]).0);
    assert!(run(&["on", "--channel", "c1"]).0);
    assert!(run(&["off", "--channel", "c2"]).0);
    let (ok, listed) = run(&["list"]);
    assert!(ok, "{listed}");
    assert_eq!(
        listed.lines().collect::<Vec<_>>(),
        ["guild g1\toff", "channel c1\ton", "channel c2\toff"]
    );
    let t = Toggles::new(rig.bus.conn(), rig.keys.clone());
    let on = |c: &'static str, g: Option<&'static str>| {
        let t = t.clone();
        async move { t.enabled(TOGGLE_MENU, c, g, true).await.unwrap() }
    };
    assert!(on("c1", Some("g1")).await, "the channel's switch wins");
    assert!(!on("c3", Some("g1")).await, "the guild's switch applies");
    assert!(!on("c2", None).await);
    assert!(on("c3", None).await, "the default");
    assert!(run(&["clear", "--guild", "g1"]).0);
    assert!(on("c3", Some("g1")).await);
    // Bad input is refused, naming what is wanted.
    let (ok, err) = run(&["off"]);
    assert!(!ok);
    assert!(
        err.contains("--channel") || err.contains("--guild"),
        "{err}"
    );
    let (ok, err) = run(&["off", "--channel", "c1", "--guild", "g1"]);
    assert!(!ok);
    assert!(err.contains("cannot be used with"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_platform_reads_what_the_reference_workers_write() {
    let rig = Rig::new().await;
    let (rx, url) = Receiver::start(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stargazer.toml");
    let platform = rig.keys.platform().to_owned();
    std::fs::write(
        &path,
        format!(
            r#"
[redis]
url = "{}"
[gateway]
consumer_name = "gw-legacy"
[[platform]]
name = "{platform}"
adapter = "webhook"
url = "{url}"
legacy_layout = true
"#,
            rig.server.url()
        ),
    )
    .unwrap();
    // Written the way the reference's workers write: no seq, no hash tag,
    // an RPC with `action`/`kwargs` and a reply list of their own.
    let stream = format!("sg:outbound:{platform}");
    for text in ["one", "two"] {
        let p = json!({"type": "message", "channel_id": "c1", "text": text}).to_string();
        let _: String = rig.cmd(&["XADD", &stream, "*", "payload", &p]).await;
    }
    let reply = "sg:rpc:reply:legacy-1";
    let p = json!({"type": "rpc_request", "action": "should_skip_channel_heartbeat",
                   "kwargs": {"channel_id": "c1"}, "reply_key": reply})
    .to_string();
    let _: String = rig.cmd(&["XADD", &stream, "*", "payload", &p]).await;
    let child = Command::new(env!("CARGO_BIN_EXE_stargazer"))
        .args(["gateway", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut gw = Gw(child);
    rx.wait(2, Duration::from_secs(30)).await;
    let got = rx.got();
    assert_eq!(got[0].body["text"], "one");
    assert_eq!(got[1].body["text"], "two");
    let answer: Option<(String, String)> = rig.cmd(&["BLPOP", reply, "10"]).await;
    let (_, answer) = answer.expect("the RPC was answered on the reference's reply key");
    assert!(
        answer.contains("false") || answer.contains("true"),
        "{answer}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pending: redis::Value = rig
            .cmd(&["XPENDING", &stream, &format!("sg:gateway:{platform}")])
            .await;
        let redis::Value::Array(p) = pending else {
            panic!("{pending:?}")
        };
        if p.first() == Some(&redis::Value::Int(0)) {
            break;
        }
        assert!(Instant::now() < deadline, "still pending: {p:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&gw.0, "-TERM");
    assert!(
        wait_exit(&mut gw.0, Duration::from_secs(15))
            .await
            .success()
    );
}
