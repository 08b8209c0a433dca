//! Black-box rig: the `stargazer` binary as a separate process, a private
//! `redis-server` per test, and a fake webhook receiver whose answers each
//! test scripts. Nothing here links to the library: the tests talk to the
//! gateway only through what SPEC.md and README.md document (the TOML config,
//! stream entries written with XADD, the webhook contract, the dead-letter
//! stream and the pending list), so they keep working whatever the engine's
//! insides become.
//!
//! The binary is `$STARGAZER_BIN` when set, else the one cargo built.
//! Every child process (redis-server, gateways) is killed when its handle is
//! dropped, also when a test panics; a failing test prints the tail of each
//! gateway's log.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use hmac::{Hmac, Mac};
use redis::aio::MultiplexedConnection;
use serde_json::{Value, json};
use sha2::Sha256;

/// The platform every test uses.
pub const P: &str = "hook";
pub const OUTBOUND: &str = "sg:{hook}:outbound";
pub const GROUP: &str = "sg:gateway:hook";
pub const DLQ: &str = "sg:{hook}:outbound:dlq";

/// `sg:{hook}:chan:<c>`: the channel state whose `seq` field producers HINCRBY.
pub fn chan_key(c: &str) -> String {
    format!("sg:{{hook}}:chan:{c}")
}

/// The gateway binary under test.
pub fn bin() -> PathBuf {
    std::env::var_os("STARGAZER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_stargazer")))
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// Send `sig` (e.g. `-STOP`) to process `pid`.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill {sig} {pid} failed");
}

/// Poll `cond` every 20 ms until it holds; panic naming `what` after `within`.
pub async fn until<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Like [`until`], but returns whether the condition held instead of panicking.
pub async fn within<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- redis ----

/// A private redis-server on a free loopback port, in a directory of its own.
pub struct Redis {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Redis {
    /// No persistence (`--save "" --appendonly no`).
    pub fn start() -> Redis {
        Self::start_with(&[])
    }

    /// With `extra` arguments (e.g. cluster mode).
    pub fn start_with(extra: &[&str]) -> Redis {
        let binary =
            std::env::var("STARGAZER_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let dir = tempfile::tempdir().expect("temp dir");
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let mut child = Command::new(&binary)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path())
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start `{binary}`: {e}"));
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port was probably taken: try another
                }
                if ping(port) {
                    return Redis { child, port, dir };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("redis-server did not come up");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGSTOP: Redis stalls (connections stay open, nothing is answered).
    pub fn stop(&self) {
        signal(self.pid(), "-STOP");
    }

    pub fn cont(&self) {
        signal(self.pid(), "-CONT");
    }

    /// A connection for the test's own commands (5 s response timeout, so a
    /// test never hangs on a stalled server).
    pub async fn conn(&self) -> MultiplexedConnection {
        let client = redis::Client::open(self.url()).expect("redis url");
        let cfg = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_connection_timeout(Some(Duration::from_secs(5)));
        client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
            .expect("connect to redis")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill(); // SIGKILL also ends a stopped process
        let _ = self.child.wait();
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// Run one command; panics on a Redis error.
pub async fn cmd<T: redis::FromRedisValue>(conn: &mut MultiplexedConnection, args: &[&str]) -> T {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query_async(conn)
        .await
        .unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
}

/// XADD an entry: `payload` (JSON), plus `sig` when given. Returns its id.
pub async fn xadd(conn: &mut MultiplexedConnection, payload: &Value, sig: Option<&str>) -> String {
    xadd_raw(conn, &payload.to_string(), sig).await
}

pub async fn xadd_raw(
    conn: &mut MultiplexedConnection,
    payload: &str,
    sig: Option<&str>,
) -> String {
    let mut c = redis::cmd("XADD");
    c.arg(OUTBOUND).arg("*").arg("payload").arg(payload);
    if let Some(s) = sig {
        c.arg("sig").arg(s);
    }
    c.query_async(conn).await.expect("XADD")
}

/// The channel's next `seq`, taken as producers do (HINCRBY of the channel
/// state's counter).
pub async fn take_seq(conn: &mut MultiplexedConnection, channel: &str) -> u64 {
    cmd(conn, &["HINCRBY", &chan_key(channel), "seq", "1"]).await
}

/// A `message` envelope.
pub fn message(channel: &str, seq: Option<u64>, key: Option<&str>, text: &str) -> Value {
    let mut v = json!({"type": "message", "channel_id": channel, "text": text});
    if let Some(s) = seq {
        v["seq"] = json!(s);
    }
    if let Some(k) = key {
        v["message_key"] = json!(k);
    }
    v
}

/// `sha256=` + hex HMAC-SHA256 of `payload` (SPEC §1).
pub fn sign(secret: &str, payload: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(payload.as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Entries pending in the group (0 when the group does not exist yet).
pub async fn pending(conn: &mut MultiplexedConnection) -> u64 {
    let r: redis::RedisResult<redis::Value> = redis::cmd("XPENDING")
        .arg(OUTBOUND)
        .arg(GROUP)
        .query_async(conn)
        .await;
    match r {
        Ok(redis::Value::Array(items)) => match items.first() {
            Some(redis::Value::Int(n)) => *n as u64,
            _ => 0,
        },
        _ => 0,
    }
}

/// Pending entries as (id, consumer).
pub async fn pending_ids(conn: &mut MultiplexedConnection) -> Vec<(String, String)> {
    let r: redis::RedisResult<Vec<(String, String, u64, u64)>> = redis::cmd("XPENDING")
        .arg(OUTBOUND)
        .arg(GROUP)
        .arg("-")
        .arg("+")
        .arg(100_000)
        .query_async(conn)
        .await;
    r.map(|v| v.into_iter().map(|(id, c, _, _)| (id, c)).collect())
        .unwrap_or_default()
}

/// The group's lag (entries not yet read); `None` before the group exists.
pub async fn lag(conn: &mut MultiplexedConnection) -> Option<u64> {
    let r: redis::RedisResult<Vec<HashMap<String, redis::Value>>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(OUTBOUND)
        .query_async(conn)
        .await;
    let groups = r.ok()?;
    groups.iter().find_map(|g| {
        let name: String = redis::from_redis_value_ref(g.get("name")?).ok()?;
        if name != GROUP {
            return None;
        }
        redis::from_redis_value_ref::<u64>(g.get("lag")?).ok()
    })
}

/// Every entry has been read and acknowledged.
pub async fn drained(conn: &mut MultiplexedConnection) -> bool {
    lag(conn).await == Some(0) && pending(conn).await == 0
}

/// Every dead-letter entry: its fields as strings, plus `id`.
pub async fn dlq(conn: &mut MultiplexedConnection) -> Vec<HashMap<String, String>> {
    let r: redis::RedisResult<Vec<(String, HashMap<String, String>)>> = redis::cmd("XRANGE")
        .arg(DLQ)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await;
    r.unwrap_or_default()
        .into_iter()
        .map(|(id, mut f)| {
            f.insert("id".into(), id);
            f
        })
        .collect()
}

/// The millisecond part of a stream id.
pub fn id_ms(id: &str) -> u64 {
    id.split('-')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0)
}

// ----------------------------------------------------------------- sink ----

/// One request the fake webhook received.
#[derive(Debug, Clone)]
pub struct Req {
    /// Arrival index over all requests.
    pub n: usize,
    /// How many earlier requests carried the same Idempotency-Key.
    pub nth_for_key: usize,
    /// The `Idempotency-Key` header ("" when absent).
    pub key: String,
    pub body: Value,
    pub at: Instant,
    /// Arrival, Unix ms.
    pub at_ms: u64,
    /// The status answered, once answered.
    pub status: Option<u16>,
}

impl Req {
    pub fn channel(&self) -> Option<&str> {
        self.body.get("channel_id").and_then(Value::as_str)
    }
    pub fn seq(&self) -> Option<u64> {
        self.body.get("seq").and_then(Value::as_u64)
    }
    pub fn action(&self) -> Option<&str> {
        self.body.get("action").and_then(Value::as_str)
    }
    pub fn text(&self) -> Option<&str> {
        self.body.get("text").and_then(Value::as_str)
    }
    pub fn ok(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

/// How the fake webhook answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 with `{"message_id": <id>}`.
    Id(String),
    /// A bare 200, no body.
    Bare,
    /// This status, no body.
    Status(u16),
    /// Never answer.
    Hang,
}

/// The id an idempotent platform gives the message of `key`: the same for
/// every repeat of the key (as a platform honouring Idempotency-Key answers a
/// repeat with the original message).
pub fn id_for(key: &str) -> String {
    format!("mid-{key}")
}

pub type BoxFut = Pin<Box<dyn Future<Output = Reply> + Send>>;
type Script = dyn Fn(&Req) -> BoxFut + Send + Sync;

#[derive(Clone)]
struct SinkState {
    reqs: Arc<Mutex<Vec<Req>>>,
    script: Arc<Script>,
}

/// A fake webhook receiver on a free port: records every request with its
/// arrival time, answers as the script says.
pub struct Sink {
    pub url: String,
    reqs: Arc<Mutex<Vec<Req>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sink {
    /// `script(req)` decides the answer (it may wait first).
    pub async fn start(script: impl Fn(&Req) -> BoxFut + Send + Sync + 'static) -> Sink {
        let st = SinkState {
            reqs: Arc::default(),
            script: Arc::new(script),
        };
        let app = axum::Router::new()
            .route("/deliver", axum::routing::post(receive))
            .with_state(st.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind sink");
        let url = format!("http://{}/deliver", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Sink {
            url,
            reqs: st.reqs,
            task,
        }
    }

    /// Answers every request at once with its key's id.
    pub async fn ok() -> Sink {
        Self::start(|r| {
            let id = id_for(&r.key);
            Box::pin(async move { Reply::Id(id) })
        })
        .await
    }

    /// Answers every request with its key's id after `delay`.
    pub async fn slow(delay: Duration) -> Sink {
        Self::start(move |r| {
            let id = id_for(&r.key);
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                Reply::Id(id)
            })
        })
        .await
    }

    pub fn reqs(&self) -> Vec<Req> {
        self.reqs.lock().expect("sink lock").clone()
    }

    /// Requests carrying Idempotency-Key `key`.
    pub fn for_key(&self, key: &str) -> Vec<Req> {
        self.reqs().into_iter().filter(|r| r.key == key).collect()
    }

    /// Successfully answered requests.
    pub fn delivered(&self) -> Vec<Req> {
        self.reqs().into_iter().filter(Req::ok).collect()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(State(st): State<SinkState>, headers: HeaderMap, body: Bytes) -> Response {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let req = {
        let mut reqs = st.reqs.lock().expect("sink lock");
        let r = Req {
            n: reqs.len(),
            nth_for_key: reqs.iter().filter(|r| r.key == key).count(),
            key,
            body,
            at: Instant::now(),
            at_ms: now_ms(),
            status: None,
        };
        reqs.push(r.clone());
        r
    };
    let reply = (st.script)(&req).await;
    let (status, body) = match reply {
        Reply::Id(id) => (200, json!({"message_id": id}).to_string()),
        Reply::Bare => (200, String::new()),
        Reply::Status(s) => (s, String::new()),
        Reply::Hang => std::future::pending().await,
    };
    st.reqs.lock().expect("sink lock")[req.n].status = Some(status);
    let mut b = Response::builder().status(StatusCode::from_u16(status).expect("status"));
    if !body.is_empty() {
        b = b.header("content-type", "application/json");
    }
    b.body(Body::from(body)).expect("response")
}

// -------------------------------------------------------------- gateway ----

/// A `stargazer gateway` process for platform `hook` (webhook adapter).
pub struct Gateway {
    child: Child,
    pub name: String,
    dir: tempfile::TempDir,
}

/// What a gateway is started with: shipped defaults unless a test sets keys.
pub struct GatewayConfig {
    pub redis_url: String,
    pub name: String,
    pub sink_url: String,
    /// TOML lines of the `[consumer]` table.
    pub consumer: Vec<String>,
    /// TOML lines of the `[[platform]]` table beyond name, adapter and url.
    pub platform: Vec<String>,
}

impl GatewayConfig {
    pub fn new(redis_url: &str, name: &str, sink_url: &str) -> Self {
        GatewayConfig {
            redis_url: redis_url.to_owned(),
            name: name.to_owned(),
            sink_url: sink_url.to_owned(),
            consumer: Vec::new(),
            platform: Vec::new(),
        }
    }

    /// Set a `[consumer]` key (`line` is TOML, e.g. `max_in_flight = 1`).
    pub fn consumer(mut self, line: &str) -> Self {
        self.consumer.push(line.to_owned());
        self
    }

    pub fn platform(mut self, line: &str) -> Self {
        self.platform.push(line.to_owned());
        self
    }

    pub fn toml(&self) -> String {
        format!(
            "[redis]\nurl = \"{}\"\n\n[gateway]\nconsumer_name = \"{}\"\n\n[consumer]\n{}\n\n\
             [[platform]]\nname = \"{P}\"\nadapter = \"webhook\"\nurl = \"{}\"\n{}\n",
            self.redis_url,
            self.name,
            self.consumer.join("\n"),
            self.sink_url,
            self.platform.join("\n"),
        )
    }

    pub fn start(self) -> Gateway {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("stargazer.toml");
        std::fs::write(&config, self.toml()).expect("write config");
        let log = std::fs::File::create(dir.path().join("gateway.log")).expect("log file");
        let mut cmd = Command::new(bin());
        cmd.args(["gateway", "--config"])
            .arg(&config)
            .env(
                "RUST_LOG",
                std::env::var("STARGAZER_TEST_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        // The config file must be all there is: no override from the
        // environment the tests happen to run in.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("STARGAZER_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin().display()));
        Gateway {
            child,
            name: self.name,
            dir,
        }
    }
}

impl Gateway {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and reap it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn stop(&self) {
        signal(self.pid(), "-STOP");
    }

    pub fn cont(&self) {
        signal(self.pid(), "-CONT");
    }

    /// Still running (panics with its log if it exited).
    pub fn assert_running(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!(
                "gateway {} exited ({st}); its log:\n{}",
                self.name,
                self.log_tail(80)
            );
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows what the gateway said; STARGAZER_TEST_SHOW_LOG
        // shows it for passing ones too.
        let show = std::env::var_os("STARGAZER_TEST_SHOW_LOG").is_some();
        if std::thread::panicking() || show {
            eprintln!(
                "----- gateway {} log (tail) -----\n{}\n-----",
                self.name,
                self.log_tail(if show { 400 } else { 40 })
            );
        }
    }
}

// -------------------------------------------------------------- helpers ----

/// Wait until every entry has been read and acknowledged.
pub async fn until_drained(conn: &MultiplexedConnection, limit: Duration) {
    let c = conn.clone();
    until(
        "every entry read and acknowledged (lag 0, pending 0)",
        limit,
        || {
            let mut c = c.clone();
            async move { drained(&mut c).await }
        },
    )
    .await;
}

/// The dead-letter entry of stream entry `id`, if there is one.
pub async fn dlq_of(conn: &mut MultiplexedConnection, id: &str) -> Option<HashMap<String, String>> {
    dlq(conn)
        .await
        .into_iter()
        .find(|d| d.get("original_id").map(String::as_str) == Some(id))
}

/// Wait until stream entry `id` is in the dead-letter stream; returns its entry.
pub async fn until_dead_lettered(
    conn: &MultiplexedConnection,
    id: &str,
    limit: Duration,
) -> HashMap<String, String> {
    let c = conn.clone();
    until(
        &format!("entry {id} in the dead-letter stream"),
        limit,
        || {
            let mut c = c.clone();
            async move { dlq_of(&mut c, id).await.is_some() }
        },
    )
    .await;
    dlq_of(&mut conn.clone(), id).await.expect("just seen")
}

/// The `message_id` field of message-cache key `key`.
pub async fn cached_id(conn: &mut MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("HGET")
        .arg(key)
        .arg("message_id")
        .query_async::<Option<String>>(conn)
        .await
        .ok()
        .flatten()
}
