//! The Matrix adapter against a real Synapse homeserver: every action lands as
//! the right event, resends make one event, rate limits are honoured, the
//! history RPC, inbound events (message, reaction, button, invite with
//! auto-join; edits, redactions, threads, media) and a sync position that
//! survives a gateway restart; the fleet: two gateway processes publish each
//! event once, a syncer killed mid-burst is replaced with nothing lost, gaps
//! are backfilled (or reported), a refused token dead-letters nothing; edits,
//! deletes, threads, mentions, Markdown and long text as Matrix expects them.
//!
//! Synapse comes from the venv `scripts/ensure-synapse.sh` installs
//! (`$STARGAZER_SYNAPSE_VENV`, default `~/.cache/stargazer/synapse-venv`). One
//! homeserver is shared by every test of one run — across the processes of a
//! `cargo nextest` run too: the first test to get there starts it in a
//! directory named after the test runner's pid, the others find its port
//! there, and a watchdog shell stops it (and removes the directory) once the
//! runner has exited. Each test registers its own users and makes its own
//! rooms. The rate-limit test starts a private homeserver of its own with a low
//! `rc_message`, stopped (process group killed) when it is dropped.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::{Rig, fast};
use serde_json::{Value, json};
use stargazer::adapters::matrix::{MatrixAdapter, MatrixSettings};
use stargazer::adapters::{Adapter, Delivery, Retry};
use stargazer::envelope::{Envelope, ParseRules, StreamId, parse_entry};
use stargazer::inbound::InboundEvent;
use stargazer::sdk::Worker;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// The homeserver.

fn venv() -> PathBuf {
    let v = std::env::var_os("STARGAZER_SYNAPSE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").expect("HOME"))
                .join(".cache/stargazer/synapse-venv")
        });
    assert!(
        v.join("bin/python").exists(),
        "no Synapse venv at {} — run scripts/ensure-synapse.sh (or set STARGAZER_SYNAPSE_VENV)",
        v.display()
    );
    v
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Whether `GET /_matrix/client/versions` answers 200 on `port`.
fn answers(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /_matrix/client/versions HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 32];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).contains(" 200 ")
}

/// Generate a config for server name `localhost` in `dir`, patch it (port,
/// no key servers, open registration, rate limits), start Synapse under a
/// watchdog shell (its own process group) that stops it when `watch_pid`
/// exits, and wait until it answers. The watchdog's pid (= process group).
/// Limits of a homeserver: `rc_message` and `rc_joins.local`
/// (per second, burst); everything else is unlimited.
#[derive(Clone, Copy)]
struct Limits {
    message: (f64, u32),
    joins: (f64, u32),
    /// More homeserver.yaml lines.
    extra: &'static str,
}

const UNLIMITED: Limits = Limits {
    message: (10000.0, 10000),
    joins: (10000.0, 10000),
    extra: "",
};

fn launch(dir: &Path, port: u16, limits: Limits, watch_pid: u32, remove_dir: bool) -> u32 {
    let venv = venv();
    let python = venv.join("bin/python");
    let generated = dir.join("generated.yaml");
    let out = Command::new(&python)
        .args(["-m", "synapse.app.homeserver", "--server-name", "localhost"])
        .arg("--config-path")
        .arg(&generated)
        .args(["--generate-config", "--report-stats=no"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run synapse --generate-config");
    assert!(
        out.status.success(),
        "synapse --generate-config failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&generated).expect("generated config");
    let keep = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{key}:")))
            .unwrap_or_else(|| panic!("generated config lacks {key}"))
            .to_owned()
    };
    let high = "{per_second: 10000, burst_count: 10000}";
    let (per_second, burst) = limits.message;
    let (joins_per_second, joins_burst) = limits.joins;
    let d = dir.display();
    let config = format!(
        r#"server_name: "localhost"
pid_file: {d}/homeserver.pid
listeners:
  - port: {port}
    bind_addresses: ['127.0.0.1']
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client]
        compress: false
database:
  name: sqlite3
  args:
    database: {d}/homeserver.db
log_config: "{log}"
media_store_path: {d}/media_store
{secret}
{macaroon}
{form}
{signing}
report_stats: false
trusted_key_servers: []
suppress_key_server_warning: true
enable_registration: true
enable_registration_without_verification: true
presence:
  enabled: true
caches:
  sync_response_cache_duration: 0
rc_message: {{per_second: {per_second}, burst_count: {burst}}}
rc_registration: {high}
rc_login:
  address: {high}
  account: {high}
  failed_attempts: {high}
rc_joins:
  local: {{per_second: {joins_per_second}, burst_count: {joins_burst}}}
  remote: {high}
rc_joins_per_room: {high}
rc_invites:
  per_room: {high}
  per_user: {high}
  per_issuer: {high}
rc_room_creation: {high}
rc_presence:
  per_user: {high}
rc_media_create: {high}
rc_delayed_event_mgmt: {high}
rc_reports: {high}
rc_3pid_validation: {high}
{extra}
"#,
        extra = limits.extra,
        log = dir.join("localhost.log.config").display(),
        secret = keep("registration_shared_secret"),
        macaroon = keep("macaroon_secret_key"),
        form = keep("form_secret"),
        signing = keep("signing_key_path"),
    );
    let config_path = dir.join("homeserver.yaml");
    std::fs::write(&config_path, config).expect("write homeserver.yaml");
    let cleanup = if remove_dir {
        format!("rm -rf '{d}'")
    } else {
        String::new()
    };
    // The watchdog: Synapse in the background; stop it when the watched
    // process is gone (or on TERM), then clean up.
    let script = format!(
        r#"'{py}' -m synapse.app.homeserver -c '{cfg}' >'{d}/stdout.log' 2>&1 &
S=$!
trap 'kill $S 2>/dev/null; wait $S; {cleanup}; exit 0' TERM INT
while kill -0 {watch_pid} 2>/dev/null && kill -0 $S 2>/dev/null; do sleep 1; done
kill $S 2>/dev/null; wait $S; {cleanup}"#,
        py = python.display(),
        cfg = config_path.display(),
    );
    let child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start synapse");
    let pgid = child.id();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut child = child;
    loop {
        if answers(port) {
            return pgid;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join("stdout.log")).unwrap_or_default();
            panic!("synapse exited ({status}) before answering:\n{log}");
        }
        assert!(
            Instant::now() < deadline,
            "synapse did not answer on port {port} within 90 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kill a whole process group (the watchdog and Synapse).
fn kill_group(pgid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
}

/// A homeserver this test owns; stopped when dropped.
struct PrivateSynapse {
    port: u16,
    pgid: u32,
    _dir: tempfile::TempDir,
}

impl PrivateSynapse {
    fn start(limits: Limits) -> PrivateSynapse {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let pgid = launch(dir.path(), port, limits, std::process::id(), false);
        PrivateSynapse {
            port,
            pgid,
            _dir: dir,
        }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateSynapse {
    fn drop(&mut self) {
        kill_group(self.pgid);
    }
}

/// The start time (clock ticks after boot) of process `pid`, to tell a
/// runner from a later process that reused its pid.
fn start_time(pid: u32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(19))
        .unwrap_or("0")
        .to_owned()
}

/// The base URL of the homeserver shared by this run (see the module docs).
fn shared() -> String {
    static BASE: OnceLock<String> = OnceLock::new();
    BASE.get_or_init(|| {
        let runner = std::os::unix::process::parent_id();
        let dir =
            std::env::temp_dir().join(format!("stargazer-synapse-{runner}-{}", start_time(runner)));
        let port_file = dir.join("port");
        let failed_file = dir.join("failed");
        if std::fs::create_dir(&dir).is_ok() {
            let port = free_port();
            let started = std::panic::catch_unwind(|| launch(&dir, port, UNLIMITED, runner, true));
            match started {
                Ok(_) => {
                    std::fs::write(dir.join("port.tmp"), port.to_string()).expect("write port");
                    std::fs::rename(dir.join("port.tmp"), &port_file).expect("publish port");
                }
                Err(e) => {
                    let why = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    let _ = std::fs::write(&failed_file, &why);
                    panic!("{why}");
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(p) = std::fs::read_to_string(&port_file) {
                let port: u16 = p.trim().parse().expect("port");
                assert!(
                    answers(port),
                    "the shared synapse on {port} does not answer"
                );
                return format!("http://127.0.0.1:{port}");
            }
            if let Ok(why) = std::fs::read_to_string(&failed_file) {
                panic!("the shared synapse failed to start: {why}");
            }
            assert!(
                Instant::now() < deadline,
                "the shared synapse never came up"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .clone()
}

// ---------------------------------------------------------------------------
// A minimal client for the test's own users.

#[derive(Clone)]
struct User {
    base: String,
    user_id: String,
    /// The device of the access token (registration makes one).
    #[cfg_attr(not(feature = "e2ee"), allow(dead_code))]
    device_id: String,
    token: String,
    http: reqwest::Client,
}

fn seg(s: &str) -> String {
    stargazer::adapters::matrix::seg(s)
}

impl User {
    async fn register(base: &str, name: &str) -> User {
        Self::register_with(base, name, false).await.0
    }

    /// A user whose access token expires; with its refresh token.
    async fn register_refreshable(base: &str, name: &str) -> (User, String) {
        let (u, r) = Self::register_with(base, name, true).await;
        (u, r.expect("a refresh token"))
    }

    async fn register_with(base: &str, name: &str, refresh: bool) -> (User, Option<String>) {
        let http = reqwest::Client::new();
        let name = format!("{name}{:08x}", rand::random::<u32>());
        let r: Value = http
            .post(format!("{base}/_matrix/client/v3/register"))
            .json(
                &json!({"username": name, "password": format!("pw-{name}-0123456789"),
                "auth": {"type": "m.login.dummy"}, "refresh_token": refresh}),
            )
            .send()
            .await
            .expect("register")
            .json()
            .await
            .expect("register answer");
        let refresh_token = r["refresh_token"].as_str().map(str::to_owned);
        (
            User {
                base: base.to_owned(),
                user_id: r["user_id"].as_str().expect("user_id").to_owned(),
                device_id: r["device_id"].as_str().expect("device_id").to_owned(),
                token: r["access_token"].as_str().expect("token").to_owned(),
                http,
            },
            refresh_token,
        )
    }

    async fn api(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self
            .http
            .request(method, format!("{}/_matrix/client/v3{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "{path}: {status} {v}");
        v
    }

    async fn create_room(&self, invite: &[&str]) -> String {
        let v = self
            .api(
                reqwest::Method::POST,
                "/createRoom",
                Some(json!({"preset": "private_chat", "invite": invite})),
            )
            .await;
        v["room_id"].as_str().expect("room_id").to_owned()
    }

    async fn join(&self, room: &str) {
        self.api(
            reqwest::Method::POST,
            &format!("/join/{}", seg(room)),
            Some(json!({})),
        )
        .await;
    }

    async fn send(&self, room: &str, content: Value) -> String {
        self.send_type(room, "m.room.message", content).await
    }

    async fn send_type(&self, room: &str, kind: &str, content: Value) -> String {
        let txn = format!("t{:016x}", rand::random::<u64>());
        let v = self
            .api(
                reqwest::Method::PUT,
                &format!("/rooms/{}/send/{kind}/{txn}", seg(room)),
                Some(content),
            )
            .await;
        v["event_id"].as_str().expect("event_id").to_owned()
    }

    async fn say(&self, room: &str, text: &str) -> String {
        self.send(room, json!({"msgtype": "m.text", "body": text}))
            .await
    }

    async fn react(&self, room: &str, target: &str, key: &str) -> String {
        self.send_type(
            room,
            "m.reaction",
            json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": target, "key": key}}),
        )
        .await
    }

    /// The room's events of `types`, oldest first.
    async fn events(&self, room: &str, types: &[&str]) -> Vec<Value> {
        let filter = json!({"types": types}).to_string();
        let path = format!(
            "/rooms/{}/messages?dir=b&limit=100&filter={}",
            seg(room),
            seg(&filter)
        );
        let v = self.api(reqwest::Method::GET, &path, None).await;
        let mut chunk = v["chunk"].as_array().cloned().unwrap_or_default();
        chunk.reverse();
        chunk
    }

    /// The `m.room.message` events `sender` sent, oldest first.
    async fn messages_from(&self, room: &str, sender: &str) -> Vec<Value> {
        self.events(room, &["m.room.message"])
            .await
            .into_iter()
            .filter(|e| e["sender"] == sender)
            .collect()
    }

    /// Who is typing in `room`, as a fresh sync shows it.
    async fn typing(&self, room: &str) -> Vec<String> {
        let filter = json!({"presence": {"types": []}, "account_data": {"types": []},
            "room": {"rooms": [room], "timeline": {"limit": 0}, "state": {"types": []},
                     "ephemeral": {"types": ["m.typing"]}}})
        .to_string();
        let v = self
            .api(
                reqwest::Method::GET,
                &format!("/sync?timeout=0&filter={}", seg(&filter)),
                None,
            )
            .await;
        v["rooms"]["join"][room]["ephemeral"]["events"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["type"] == "m.typing")
            .flat_map(|e| {
                e["content"]["user_ids"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|u| u.as_str().map(str::to_owned))
            .collect()
    }

    async fn joined_members(&self, room: &str) -> Vec<String> {
        let v = self
            .api(
                reqwest::Method::GET,
                &format!("/rooms/{}/joined_members", seg(room)),
                None,
            )
            .await;
        v["joined"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }
}

/// The bot and a second user ("alice") sharing a room the bot made.
struct Pair {
    base: String,
    bot: User,
    alice: User,
    room: String,
}

async fn pair(base: &str) -> Pair {
    let bot = User::register(base, "bot").await;
    let alice = User::register(base, "alice").await;
    let room = bot.create_room(&[&alice.user_id]).await;
    alice.join(&room).await;
    Pair {
        base: base.to_owned(),
        bot,
        alice,
        room,
    }
}

fn settings(base: &str, bot: &User) -> MatrixSettings {
    MatrixSettings {
        homeserver: base.to_owned(),
        access_token: bot.token.clone(),
        user_id: bot.user_id.clone(),
        auto_join: true,
        sync_timeout: Duration::from_millis(1000),
        request_timeout: Duration::from_secs(10),
    }
}

fn adapter(p: &Pair) -> Arc<MatrixAdapter> {
    Arc::new(MatrixAdapter::new("mx", settings(&p.base, &p.bot)).expect("adapter"))
}

fn envelope(v: Value) -> Envelope {
    let rules = ParseRules {
        max_payload_bytes: 1 << 20,
        signing_secret: None,
        cache_prefix: "sg:msg:".into(),
        own_prefixes: vec!["sg:{".into(), "sg:gateway:".into()],
        reply_prefix: "sg:{mx}:rpc:reply:".into(),
    };
    let mut fields = std::collections::HashMap::new();
    fields.insert("payload".to_owned(), v.to_string().into_bytes());
    parse_entry(&fields, &rules).result.expect("valid envelope")
}

async fn deliver_direct(
    a: &MatrixAdapter,
    env: &Envelope,
    key: &str,
    attempt: u32,
) -> Result<stargazer::adapters::Delivered, stargazer::adapters::AdapterError> {
    let id = StreamId("1-1".into());
    a.deliver(Delivery {
        platform: "mx",
        stream_id: &id,
        envelope: env,
        idempotency_key: key,
        attempt,
        resend: attempt > 1,
        target: None,
    })
    .await
}

async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every event on the rig's inbound stream, oldest first.
async fn inbound(rig: &Rig) -> Vec<InboundEvent> {
    let r: redis::streams::StreamRangeReply =
        rig.cmd(&["XRANGE", &rig.keys.inbound(), "-", "+"]).await;
    r.ids
        .iter()
        .map(|e| {
            let p: String = e.get("payload").expect("payload");
            serde_json::from_str(&p).expect("inbound event")
        })
        .collect()
}

/// The TOML of a gateway named `name` with one matrix platform on the rig's
/// Redis; `platform_extra` goes into the platform's table, `top` before it.
fn config_toml(
    rig: &Rig,
    base: &str,
    bot: &User,
    name: &str,
    top: &str,
    platform_extra: &str,
) -> String {
    format!(
        r#"
[redis]
url = "{url}"
[gateway]
consumer_name = "{name}"
[consumer]
block_ms = 100
backoff_base_ms = 5
backoff_max_ms = 50
{top}
[[platform]]
name = "{platform}"
adapter = "matrix"
homeserver = "{base}"
access_token_env = "MX_TOKEN"
user_id = "{user}"
sync_timeout_ms = 1000
session_lease_ms = 3000
{platform_extra}
"#,
        url = rig.server.url(),
        platform = rig.keys.platform(),
        user = bot.user_id,
    )
}

/// A whole gateway (`gateway::run`) with one matrix platform on the rig's
/// Redis; cancel the token to stop it.
fn gateway(rig: &Rig, base: &str, bot: &User) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    gateway_with(rig, base, bot, "gw-mx", "", "")
}

fn gateway_with(
    rig: &Rig,
    base: &str,
    bot: &User,
    name: &str,
    top: &str,
    platform_extra: &str,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let toml = config_toml(rig, base, bot, name, top, platform_extra);
    let config = stargazer::config::Config::from_toml(&toml, Vec::new()).expect("config");
    let env = [("MX_TOKEN".to_owned(), bot.token.clone())].into();
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move {
        stargazer::gateway::run(config, env, s.cancelled_owned())
            .await
            .expect("gateway");
    });
    (stop, task)
}

/// A gateway process (the `stargazer` binary), killed when dropped; its
/// log (info level) goes to `log`.
struct GwProc {
    child: std::process::Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl GwProc {
    fn start(rig: &Rig, base: &str, bot: &User, name: &str, platform_extra: &str) -> GwProc {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stargazer.toml");
        std::fs::write(&path, config_toml(rig, base, bot, name, "", platform_extra)).unwrap();
        let log = dir.path().join("gateway.log");
        let child = Command::new(env!("CARGO_BIN_EXE_stargazer"))
            .args(["gateway", "--config"])
            .arg(&path)
            .env("MX_TOKEN", &bot.token)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("stdout.log")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start gateway");
        GwProc {
            child,
            log,
            _dir: dir,
        }
    }

    /// SIGKILL: no clean stop, no lease released.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        let mut s = std::fs::read_to_string(&self.log).unwrap_or_default();
        s.push_str(
            &std::fs::read_to_string(self.log.with_file_name("stdout.log")).unwrap_or_default(),
        );
        s
    }
}

impl Drop for GwProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Who holds the platform's sync lease (`consumer/instance`).
async fn sync_holder(rig: &Rig) -> Option<String> {
    rig.cmd(&["GET", &format!("{}sync:lease", rig.keys.matrix())])
        .await
}

/// The `message` events of the inbound stream, oldest first.
fn messages(evs: &[InboundEvent]) -> Vec<&InboundEvent> {
    evs.iter().filter(|e| e.kind == "message").collect()
}

async fn since(rig: &Rig) -> Option<String> {
    rig.cmd(&["GET", &rig.keys.matrix_since()]).await
}

/// End-to-end encryption against a second, encrypting client.
#[cfg(feature = "e2ee")]
#[path = "e2ee/mod.rs"]
mod e2ee;

// ---------------------------------------------------------------------------
// The tests.

#[tokio::test]
async fn every_action_lands_as_the_right_event() {
    let p = pair(&shared()).await;
    let rig = Rig::new().await;
    let _gw = rig.start("gw", adapter(&p), fast()).await;
    let out = Worker::from_bus(rig.bus.clone(), "sg:msg:", None).proxy();
    let question = p.alice.say(&p.room, "question?").await;

    out.send(&p.room, "hello <b>world</b> & co").await.unwrap();
    out.reply(&p.room, &question, "an answer").await.unwrap();
    out.send_file(&p.room, b"some notes\n", "notes.txt", "text/plain", None)
        .await
        .unwrap();
    let png = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    out.send_file(&p.room, &png, "star.png", "image/png", Some("a star"))
        .await
        .unwrap();
    out.send_buttons(
        &p.room,
        "Pick one",
        &[("Yes", "yes"), ("Docs", "https://example.org/")],
    )
    .await
    .unwrap();
    rig.drained(T).await;
    assert!(rig.dlq().await.is_empty(), "{:?}", rig.dlq().await);

    let got = p.alice.messages_from(&p.room, &p.bot.user_id).await;
    assert_eq!(got.len(), 5, "{got:#?}");
    let c: Vec<&Value> = got.iter().map(|e| &e["content"]).collect();
    assert_eq!(c[0]["msgtype"], "m.text");
    assert_eq!(c[0]["body"], "hello <b>world</b> & co");
    // No Markdown markup (raw HTML is text): no formatted_body, no @room.
    assert!(c[0].get("formatted_body").is_none(), "{}", c[0]);
    assert_eq!(c[0]["m.mentions"], json!({}));
    assert_eq!(c[1]["body"], "an answer");
    assert_eq!(c[1]["m.relates_to"]["m.in_reply_to"]["event_id"], question);
    assert_eq!(c[2]["msgtype"], "m.file");
    assert_eq!(c[2]["body"], "notes.txt");
    assert_eq!(c[2]["info"]["mimetype"], "text/plain");
    assert!(
        c[2]["url"]
            .as_str()
            .unwrap()
            .starts_with("mxc://localhost/")
    );
    assert_eq!(c[3]["msgtype"], "m.image");
    assert_eq!(c[3]["body"], "a star");
    assert_eq!(c[3]["filename"], "star.png");
    assert_eq!(c[3]["info"]["size"], 8);
    assert_eq!(
        c[4]["body"],
        "Pick one\n1. Yes\n2. Docs (https://example.org/)"
    );
    assert_eq!(
        c[4]["formatted_body"],
        "Pick one<ol><li>Yes</li><li><a href=\"https://example.org/\">Docs</a></li></ol>"
    );

    // The uploaded file is the bytes sent.
    let mxc = c[2]["url"].as_str().unwrap().trim_start_matches("mxc://");
    let bytes = p
        .alice
        .http
        .get(format!("{}/_matrix/client/v1/media/download/{mxc}", p.base))
        .bearer_auth(&p.alice.token)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&bytes[..], b"some notes\n");

    // Typing on, then off.
    out.start_typing(&p.room, Duration::from_secs(20))
        .await
        .unwrap();
    rig.drained(T).await;
    let bot_id = p.bot.user_id.clone();
    eventually("the bot typing", T, || async {
        p.alice.typing(&p.room).await.contains(&bot_id)
    })
    .await;
    out.stop_typing(&p.room).await.unwrap();
    rig.drained(T).await;
    eventually("the bot to stop typing", T, || async {
        !p.alice.typing(&p.room).await.contains(&bot_id)
    })
    .await;

    // A reaction to alice's question.
    out.react(&p.room, &question, "👍").await.unwrap();
    rig.drained(T).await;
    let reactions: Vec<Value> = p
        .alice
        .events(&p.room, &["m.reaction"])
        .await
        .into_iter()
        .filter(|e| e["sender"] == p.bot.user_id.as_str())
        .collect();
    assert_eq!(reactions.len(), 1, "{reactions:#?}");
    let rel = &reactions[0]["content"]["m.relates_to"];
    assert_eq!(rel["rel_type"], "m.annotation");
    assert_eq!(rel["event_id"], question);
    assert_eq!(rel["key"], "👍");

    // Presence, as alice sees it.
    out.set_presence("watching the stars", Some("🔭"))
        .await
        .unwrap();
    rig.drained(T).await;
    let v = p
        .alice
        .api(
            reqwest::Method::GET,
            &format!("/presence/{}/status", seg(&p.bot.user_id)),
            None,
        )
        .await;
    assert_eq!(v["status_msg"], "🔭 watching the stars", "{v}");
    assert_eq!(v["presence"], "online");
    assert!(rig.dlq().await.is_empty(), "{:?}", rig.dlq().await);
}

#[tokio::test]
async fn a_resend_with_the_same_transaction_makes_one_event() {
    let p = pair(&shared()).await;
    let a = adapter(&p);
    let env = envelope(json!({"type": "message", "channel_id": p.room, "text": "only once"}));
    let first = deliver_direct(&a, &env, "sg:msg:42", 1).await.unwrap();
    let again = deliver_direct(&a, &env, "sg:msg:42", 2).await.unwrap();
    assert!(first.message_id.is_some());
    assert_eq!(first.message_id, again.message_id);
    let other = deliver_direct(&a, &env, "sg:msg:43", 1).await.unwrap();
    assert_ne!(first.message_id, other.message_id);
    let bodies: Vec<Value> = p
        .alice
        .messages_from(&p.room, &p.bot.user_id)
        .await
        .into_iter()
        .map(|e| e["content"]["body"].clone())
        .collect();
    assert_eq!(bodies, vec![json!("only once"), json!("only once")]);
    // The same for a reaction.
    let r = envelope(json!({"type": "reaction", "channel_id": p.room,
        "message_id": first.message_id, "emoji": "⭐"}));
    let r1 = deliver_direct(&a, &r, "sg:react:1", 1).await.unwrap();
    let r2 = deliver_direct(&a, &r, "sg:react:1", 3).await.unwrap();
    assert_eq!(r1.message_id, r2.message_id);
    assert_eq!(p.alice.events(&p.room, &["m.reaction"]).await.len(), 1);
}

#[tokio::test]
async fn platform_errors_are_classified() {
    let p = pair(&shared()).await;
    let a = adapter(&p);
    // A room the bot is not in: M_FORBIDDEN, permanent.
    let other = p.alice.create_room(&[]).await;
    let env = envelope(json!({"type": "message", "channel_id": other, "text": "hi"}));
    let e = deliver_direct(&a, &env, "k1", 1).await.unwrap_err();
    assert_eq!(e.retry, Retry::Never, "{}", e.message);
    assert!(e.message.contains("403 M_FORBIDDEN"), "{}", e.message);
    // A bad token: M_UNKNOWN_TOKEN halts the platform (nothing is
    // dead-lettered for it), and the token is not in the message.
    let mut s = settings(&p.base, &p.bot);
    s.access_token = "syt_not_a_token".into();
    let bad = MatrixAdapter::new("mx", s).unwrap();
    let env = envelope(json!({"type": "message", "channel_id": p.room, "text": "hi"}));
    let e = deliver_direct(&bad, &env, "k2", 1).await.unwrap_err();
    assert_eq!(e.retry, Retry::Halt, "{}", e.message);
    assert!(!bad.ready());
    assert!(e.message.contains("401 M_UNKNOWN_TOKEN"), "{}", e.message);
    assert!(!e.message.contains("syt_not_a_token"), "{}", e.message);
    // Nobody listening: transient.
    let mut s = settings(&p.base, &p.bot);
    s.homeserver = format!("http://127.0.0.1:{}", free_port());
    let gone = MatrixAdapter::new("mx", s).unwrap();
    let e = deliver_direct(&gone, &env, "k3", 1).await.unwrap_err();
    assert_eq!(e.retry, Retry::Backoff, "{}", e.message);
    // History of an unknown room: permanent.
    let e = a.fetch_history("!nope:localhost", 5).await.unwrap_err();
    assert_eq!(e.retry, Retry::Never, "{}", e.message);
}

#[tokio::test]
async fn a_rate_limit_is_honoured() {
    // rc_message: one message a second, bursts of 2.
    let syn = tokio::task::spawn_blocking(|| {
        PrivateSynapse::start(Limits {
            message: (1.0, 2),
            ..UNLIMITED
        })
    })
    .await
    .unwrap();
    let p = pair(&syn.base()).await;
    let a = adapter(&p);
    let mut limited = None;
    for i in 0..10 {
        let env = envelope(
            json!({"type": "message", "channel_id": p.room, "text": format!("burst {i}")}),
        );
        if let Err(e) = deliver_direct(&a, &env, &format!("burst-{i}"), 1).await {
            limited = Some(e);
            break;
        }
    }
    let e = limited.expect("synapse never rate-limited the bot");
    assert!(e.message.contains("M_LIMIT_EXCEEDED"), "{}", e.message);
    match e.retry {
        Retry::After(d) => assert!(
            d > Duration::ZERO && d <= Duration::from_secs(3),
            "wait {d:?}"
        ),
        other => panic!("expected a wait, got {other:?}: {}", e.message),
    }

    // Through a gateway consumer: every message arrives once, in order.
    let rig = Rig::new().await;
    let _gw = rig.start("gw", a.clone(), fast()).await;
    let out = Worker::from_bus(rig.bus.clone(), "sg:msg:", None).proxy();
    let started = Instant::now();
    for i in 0..6 {
        out.send(&p.room, &format!("m{i}")).await.unwrap();
    }
    rig.drained(Duration::from_secs(60)).await;
    let took = started.elapsed();
    assert!(rig.dlq().await.is_empty(), "{:?}", rig.dlq().await);
    let bodies: Vec<String> = p
        .alice
        .messages_from(&p.room, &p.bot.user_id)
        .await
        .into_iter()
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .filter(|b| !b.starts_with("burst"))
        .collect();
    assert_eq!(bodies, ["m0", "m1", "m2", "m3", "m4", "m5"]);
    // At one message a second, six need several seconds: the waits were honoured.
    assert!(took >= Duration::from_secs(3), "took {took:?}");
}

#[tokio::test]
async fn history_rpc_through_a_gateway() {
    let p = pair(&shared()).await;
    let rig = Rig::new().await;
    let _gw = rig.start("gw", adapter(&p), fast()).await;
    let worker = Worker::from_bus(rig.bus.clone(), "sg:msg:", None);
    p.alice.say(&p.room, "one").await;
    worker.proxy().send(&p.room, "two").await.unwrap();
    rig.drained(T).await;
    let two = p.alice.messages_from(&p.room, &p.bot.user_id).await[0]["event_id"]
        .as_str()
        .unwrap()
        .to_owned();
    p.alice
        .send(
            &p.room,
            json!({"msgtype": "m.text", "body": "> <@bot> two\n\nthree",
                   "m.relates_to": {"m.in_reply_to": {"event_id": two}}}),
        )
        .await;
    let h = worker
        .rpc(
            "fetch_channel_history",
            json!({"channel_id": p.room, "limit": 10}),
            T,
        )
        .await
        .unwrap();
    let h = h.as_array().unwrap();
    let texts: Vec<&str> = h.iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["one", "two", "three"], "{h:#?}");
    assert_eq!(h[0]["user_id"], p.alice.user_id.as_str());
    assert_eq!(h[0]["is_bot"], false);
    assert_eq!(h[1]["is_bot"], true);
    assert_eq!(h[1]["message_id"], two.as_str());
    assert_eq!(h[2]["reply_to_id"], two.as_str());
    assert!(h[0]["timestamp"].as_f64().unwrap() > 1.0e9);
    assert!(h[0]["timestamp"].as_f64().unwrap() <= h[2]["timestamp"].as_f64().unwrap());
    let last = worker
        .rpc(
            "fetch_channel_history",
            json!({"channel_id": p.room, "limit": 2}),
            T,
        )
        .await
        .unwrap();
    let texts: Vec<&str> = last
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["two", "three"]);
}

#[tokio::test]
async fn inbound_events_reach_the_stream() {
    let base = shared();
    let bot = User::register(&base, "bot").await;
    let alice = User::register(&base, "alice").await;
    let rig = Rig::new().await;
    let (stop, task) = gateway(&rig, &base, &bot);
    eventually("the first sync", T, || async {
        since(&rig).await.is_some()
    })
    .await;

    // An invite, joined at once.
    let room = alice.create_room(&[&bot.user_id]).await;
    eventually("the invite", T, || async {
        inbound(&rig).await.iter().any(|e| e.kind == "invite")
    })
    .await;
    let invite = inbound(&rig)
        .await
        .into_iter()
        .find(|e| e.kind == "invite")
        .unwrap();
    assert_eq!(invite.channel_id, room);
    assert_eq!(invite.user_id, alice.user_id);
    assert_eq!(invite.extra["joined"], true);
    assert!(alice.joined_members(&room).await.contains(&bot.user_id));

    // A message.
    let hello = alice.say(&room, "hello bot").await;
    eventually("the message", T, || async {
        inbound(&rig).await.iter().any(|e| e.kind == "message")
    })
    .await;
    let msg = inbound(&rig)
        .await
        .into_iter()
        .find(|e| e.kind == "message")
        .unwrap();
    assert_eq!(msg.channel_id, room);
    assert_eq!(msg.text.as_deref(), Some("hello bot"));
    assert_eq!(msg.message_id.as_deref(), Some(hello.as_str()));
    assert_eq!(msg.user_id, alice.user_id);
    assert_eq!(msg.platform, rig.keys.platform());

    // The bot answers with buttons (its own messages are not inbound).
    let out = Worker::from_bus(rig.bus.clone(), "sg:msg:", None).proxy();
    out.send_buttons(&room, "Pick", &[("Red", "red"), ("Blue", "blue")])
        .await
        .unwrap();
    rig.drained(T).await;
    let buttons_id = alice.messages_from(&room, &bot.user_id).await[0]["event_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // A reply naming a number picks that button…
    alice
        .send(
            &room,
            json!({"msgtype": "m.text", "body": "2",
                   "m.relates_to": {"m.in_reply_to": {"event_id": buttons_id}}}),
        )
        .await;
    // …so does a keycap reaction; any other reaction is a reaction.
    alice.react(&room, &buttons_id, "1\u{fe0f}\u{20e3}").await;
    alice.react(&room, &hello, "👀").await;
    eventually("two buttons and a reaction", T, || async {
        let evs = inbound(&rig).await;
        evs.iter().filter(|e| e.kind == "button").count() == 2
            && evs.iter().any(|e| e.kind == "reaction")
    })
    .await;
    let evs = inbound(&rig).await;
    let picks: Vec<&str> = evs
        .iter()
        .filter(|e| e.kind == "button")
        .map(|e| e.custom_id.as_deref().unwrap())
        .collect();
    assert_eq!(picks, ["blue", "red"]);
    assert!(evs.iter().filter(|e| e.kind == "button").all(|e| {
        e.message_id.as_deref() == Some(buttons_id.as_str()) && e.user_id == alice.user_id
    }));
    let reaction = evs.iter().find(|e| e.kind == "reaction").unwrap();
    assert_eq!(reaction.emoji.as_deref(), Some("👀"));
    assert_eq!(reaction.message_id.as_deref(), Some(hello.as_str()));
    assert!(evs.iter().all(|e| e.user_id != bot.user_id), "{evs:#?}");
    assert_eq!(evs.len(), 5, "{evs:#?}");

    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn the_sync_position_survives_a_restart() {
    let base = shared();
    let bot = User::register(&base, "bot").await;
    let alice = User::register(&base, "alice").await;
    let room = alice.create_room(&[&bot.user_id]).await;
    bot.join(&room).await;
    let rig = Rig::new().await;
    let texts = |evs: Vec<InboundEvent>| -> Vec<String> {
        evs.into_iter()
            .filter(|e| e.kind == "message")
            .filter_map(|e| e.text)
            .collect()
    };

    let (stop, task) = gateway(&rig, &base, &bot);
    eventually("the first sync", T, || async {
        since(&rig).await.is_some()
    })
    .await;
    alice.say(&room, "before").await;
    eventually("`before`", T, || async {
        texts(inbound(&rig).await) == ["before"]
    })
    .await;
    stop.cancel();
    task.await.unwrap();
    let position = since(&rig).await.expect("a stored position");

    // While no gateway runs.
    alice.say(&room, "while down").await;

    let (stop, task) = gateway(&rig, &base, &bot);
    eventually("`while down`", T, || async {
        texts(inbound(&rig).await).len() >= 2
    })
    .await;
    alice.say(&room, "after").await;
    eventually("`after`", T, || async {
        texts(inbound(&rig).await).len() >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        texts(inbound(&rig).await),
        ["before", "while down", "after"]
    );
    assert_ne!(since(&rig).await.unwrap(), position);
    stop.cancel();
    task.await.unwrap();
}

#[test]
fn matrix_config_keys_are_checked() {
    use stargazer::config::{AdapterKind, Config};
    let base = r#"
[[platform]]
name = "mx"
adapter = "matrix"
"#;
    let with = |extra: &str| Config::from_toml(&format!("{base}{extra}"), Vec::new());
    let ok = with(
        "homeserver = \"http://127.0.0.1:8008\"\nuser_id = \"@bot:localhost\"\naccess_token = \"syt_secret\"\n",
    )
    .expect("valid");
    let p = &ok.platforms[0];
    assert_eq!(p.adapter, AdapterKind::Matrix);
    assert!(p.auto_join);
    assert_eq!(p.sync_timeout_ms, 30_000);
    assert!(!format!("{p:?}").contains("syt_secret"), "{p:?}");
    let env = std::collections::HashMap::new();
    assert_eq!(
        Config::access_token_for(p, &env).unwrap(),
        "syt_secret".to_owned()
    );
    for (extra, needle) in [
        (
            "user_id = \"@bot:localhost\"\naccess_token = \"t\"\n",
            "homeserver",
        ),
        (
            "homeserver = \"matrix.org\"\nuser_id = \"@bot:localhost\"\naccess_token = \"t\"\n",
            "http",
        ),
        (
            "homeserver = \"http://h\"\naccess_token = \"t\"\n",
            "user_id",
        ),
        (
            "homeserver = \"http://h\"\nuser_id = \"bot\"\naccess_token = \"t\"\n",
            "user_id",
        ),
        (
            "homeserver = \"http://h\"\nuser_id = \"@bot:h\"\n",
            "access_token_env",
        ),
    ] {
        let e = with(extra).expect_err(extra).to_string();
        assert!(e.contains(needle), "{extra}: {e}");
    }
    let from_env = with(
        "homeserver = \"http://h\"\nuser_id = \"@bot:h\"\naccess_token_env = \"MX_T\"\nauto_join = false\n",
    )
    .expect("valid");
    let p = &from_env.platforms[0];
    assert!(!p.auto_join);
    let e = Config::access_token_for(p, &env).unwrap_err().to_string();
    assert!(e.contains("MX_T"), "{e}");
    let env = [("MX_T".to_owned(), "tok".to_owned())].into();
    assert_eq!(Config::access_token_for(p, &env).unwrap(), "tok");
    assert_eq!(p.sync_timeline_limit, 100);
    assert_eq!(Config::refresh_token_for(p, &env).unwrap(), None);

    // The sync's keys.
    let ok = "homeserver = \"http://h\"\nuser_id = \"@bot:h\"\naccess_token = \"t\"\n";
    let e = with(&format!("{ok}sync_timeline_limit = 0\n"))
        .expect_err("limit 0")
        .to_string();
    assert!(e.contains("sync_timeline_limit"), "{e}");
    let e = with(&format!("{ok}session_lease_ms = 100\n"))
        .expect_err("short lease")
        .to_string();
    assert!(e.contains("session_lease_ms"), "{e}");
    let refreshing = with(&format!("{ok}refresh_token_env = \"MX_R\"\n")).expect("valid");
    let p = &refreshing.platforms[0];
    let e = Config::refresh_token_for(p, &env).unwrap_err().to_string();
    assert!(e.contains("MX_R"), "{e}");
    let env = [("MX_R".to_owned(), "r".to_owned())].into();
    assert_eq!(
        Config::refresh_token_for(p, &env).unwrap().as_deref(),
        Some("r")
    );
}

// ---------------------------------------------------------------------------
// The fleet: one syncer, handovers, gaps, a refused token.

/// Exactly one message event per text in `texts`, in that order, with
/// distinct event ids.
fn assert_once_in_order(evs: &[InboundEvent], texts: &[String]) {
    let got: Vec<&str> = messages(evs)
        .iter()
        .map(|e| e.text.as_deref().unwrap_or_default())
        .collect();
    let want: Vec<&str> = texts.iter().map(String::as_str).collect();
    if got != want {
        let missing: Vec<&&str> = want.iter().filter(|t| !got.contains(t)).collect();
        let mut seen = std::collections::HashSet::new();
        let repeated: Vec<&&str> = got.iter().filter(|t| !seen.insert(**t)).collect();
        panic!(
            "{} inbound messages for {} sent; missing {missing:?}; repeated {repeated:?}",
            got.len(),
            want.len()
        );
    }
    let ids: std::collections::HashSet<&str> = messages(evs)
        .iter()
        .map(|e| e.message_id.as_deref().unwrap())
        .collect();
    assert_eq!(ids.len(), texts.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_publish_every_event_once() {
    let base = shared();
    let bot = User::register(&base, "bot").await;
    let alice = User::register(&base, "alice").await;
    let rig = Rig::new().await;
    let _a = GwProc::start(&rig, &base, &bot, "gw-a", "");
    let _b = GwProc::start(&rig, &base, &bot, "gw-b", "");
    eventually("the first sync", T, || async {
        since(&rig).await.is_some()
    })
    .await;
    let room = alice.create_room(&[&bot.user_id]).await;
    eventually("the invite, joined", T, || async {
        alice.joined_members(&room).await.contains(&bot.user_id)
    })
    .await;
    let texts: Vec<String> = (0..100).map(|i| format!("m{i:03}")).collect();
    for t in &texts {
        alice.say(&room, t).await;
    }
    eventually("100 messages", Duration::from_secs(60), || async {
        messages(&inbound(&rig).await).len() >= 100
    })
    .await;
    // A last one, and a full sync cycle after it: a second syncer would
    // have published its copies by then.
    alice.say(&room, "end").await;
    eventually("`end`", T, || async {
        inbound(&rig)
            .await
            .iter()
            .any(|e| e.text.as_deref() == Some("end"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let evs = inbound(&rig).await;
    let mut all = texts.clone();
    all.push("end".into());
    assert_once_in_order(&evs, &all);
    let invites: Vec<&InboundEvent> = evs.iter().filter(|e| e.kind == "invite").collect();
    assert_eq!(invites.len(), 1, "{invites:#?}");
    assert_eq!(invites[0].extra["joined"], true);
    let holder = sync_holder(&rig).await.expect("a holder");
    assert!(
        holder.starts_with("gw-a/") || holder.starts_with("gw-b/"),
        "{holder}"
    );
    eprintln!(
        "two gateways, 100 user messages: {} inbound message entries (+1 sentinel), 1 invite; syncer {holder}",
        messages(&evs).len() - 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_syncer_killed_mid_burst_is_replaced_and_nothing_is_lost() {
    let base = shared();
    let bot = User::register(&base, "bot").await;
    let alice = User::register(&base, "alice").await;
    let room = alice.create_room(&[&bot.user_id]).await;
    bot.join(&room).await;
    let rig = Rig::new().await;
    // A small timeline limit: the burst missed during the handover comes
    // back `limited` and must be backfilled.
    let extra = "sync_timeline_limit = 20";
    let mut a = GwProc::start(&rig, &base, &bot, "gw-a", extra);
    eventually("gw-a to hold the sync", T, || async {
        sync_holder(&rig)
            .await
            .is_some_and(|h| h.starts_with("gw-a/"))
            && since(&rig).await.is_some()
    })
    .await;
    let b = GwProc::start(&rig, &base, &bot, "gw-b", extra);
    let texts: Vec<String> = (0..500).map(|i| format!("burst {i:03}")).collect();
    let mut killed_at = None;
    for (i, t) in texts.iter().enumerate() {
        alice.say(&room, t).await;
        if killed_at.is_none() && messages(&inbound(&rig).await).len() >= 100 {
            a.kill();
            killed_at = Some(i + 1);
        }
    }
    let killed_at = killed_at.expect("gw-a published 100 messages before the burst ended");
    eventually("gw-b to take over", T, || async {
        sync_holder(&rig)
            .await
            .is_some_and(|h| h.starts_with("gw-b/"))
    })
    .await;
    eventually("500 messages", Duration::from_secs(120), || async {
        messages(&inbound(&rig).await).len() >= 500
    })
    .await;
    alice.say(&room, "end").await;
    eventually("`end`", T, || async {
        inbound(&rig)
            .await
            .iter()
            .any(|e| e.text.as_deref() == Some("end"))
    })
    .await;
    let evs = inbound(&rig).await;
    let mut all = texts.clone();
    all.push("end".into());
    assert_once_in_order(&evs, &all);
    assert!(
        !evs.iter().any(|e| e.kind == "gap"),
        "a gap was reported: {:?}",
        evs.iter().find(|e| e.kind == "gap")
    );
    let backfills = b.log().matches("a limited timeline was backfilled").count();
    eprintln!(
        "500-message burst, syncer killed after sending {killed_at}: {} of 500 inbound, 0 lost, 0 repeated; gw-b backfilled {backfills} limited timeline(s)",
        messages(&evs).len() - 1
    );
}

#[tokio::test]
async fn a_gap_after_downtime_is_backfilled_and_an_unfillable_one_reported() {
    let base = shared();
    let bot = User::register(&base, "bot").await;
    let alice = User::register(&base, "alice").await;
    let room = alice.create_room(&[&bot.user_id]).await;
    bot.join(&room).await;
    let rig = Rig::new().await;
    let extra = "sync_timeline_limit = 10";
    let (stop, task) = gateway_with(&rig, &base, &bot, "gw-mx", "", extra);
    eventually("the first sync", T, || async {
        since(&rig).await.is_some()
    })
    .await;
    alice.say(&room, "before").await;
    eventually("`before`", T, || async {
        messages(&inbound(&rig).await).len() == 1
    })
    .await;
    stop.cancel();
    task.await.unwrap();

    // 35 messages while no gateway runs: more than three timelines' worth.
    let mut texts = vec!["before".to_owned()];
    for i in 0..35 {
        let t = format!("while down {i}");
        alice.say(&room, &t).await;
        texts.push(t);
    }
    let (stop, task) = gateway_with(&rig, &base, &bot, "gw-mx", "", extra);
    eventually("36 messages", T, || async {
        messages(&inbound(&rig).await).len() >= 36
    })
    .await;
    assert_once_in_order(&inbound(&rig).await, &texts);
    stop.cancel();
    task.await.unwrap();

    // The last event seen is not in the room's history (as after a purge):
    // the gap cannot be filled, and the stream says so.
    rig.cmd::<()>(&[
        "HSET",
        &format!("{}rooms", rig.keys.matrix()),
        &room,
        "$not-here",
    ])
    .await;
    for i in 0..12 {
        alice.say(&room, &format!("after purge {i}")).await;
    }
    let (stop, task) = gateway_with(&rig, &base, &bot, "gw-mx", "", extra);
    eventually("a gap notice", T, || async {
        inbound(&rig).await.iter().any(|e| e.kind == "gap")
    })
    .await;
    eventually("the live timeline after it", T, || async {
        inbound(&rig)
            .await
            .iter()
            .any(|e| e.text.as_deref() == Some("after purge 11"))
    })
    .await;
    let evs = inbound(&rig).await;
    let gap = evs.iter().find(|e| e.kind == "gap").unwrap();
    assert_eq!(gap.channel_id, room);
    assert_eq!(gap.extra["after_event"], "$not-here");
    assert!(
        gap.extra["reason"]
            .as_str()
            .unwrap()
            .contains("history ended"),
        "{gap:?}"
    );
    // The gap notice comes before the events after it.
    let gap_at = evs.iter().position(|e| e.kind == "gap").unwrap();
    let last_at = evs
        .iter()
        .position(|e| e.text.as_deref() == Some("after purge 11"))
        .unwrap();
    assert!(gap_at < last_at);
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_refused_token_dead_letters_nothing_and_says_why() {
    let p = pair(&shared()).await;
    let rig = Rig::new().await;
    let port = free_port();
    let top = format!("[http]\nlisten = \"127.0.0.1:{port}\"");
    let (stop, task) = gateway_with(&rig, &p.base, &p.bot, "gw-mx", &top, "");
    eventually("the first sync", T, || async {
        since(&rig).await.is_some()
    })
    .await;
    let readyz = || async move {
        let r = reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await;
        match r {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(_) => (0, String::new()),
        }
    };
    eventually("ready", T, || async { readyz().await.0 == 200 }).await;

    // The token is logged out: every call now answers M_UNKNOWN_TOKEN.
    p.bot
        .api(reqwest::Method::POST, "/logout", Some(json!({})))
        .await;
    let out = Worker::from_bus(rig.bus.clone(), "sg:msg:", None).proxy();
    out.send(&p.room, "never sent").await.unwrap();
    out.send(&p.room, "nor this").await.unwrap();
    eventually("/readyz to name the refused token", T, || async {
        let (status, body) = readyz().await;
        status == 503 && body.contains("M_UNKNOWN_TOKEN")
    })
    .await;
    let (_, body) = readyz().await;
    assert!(body.contains(rig.keys.platform()), "{body}");
    // Well past a retry or two: nothing dead-lettered, both still waiting.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(rig.dlq().await.is_empty(), "{:?}", rig.dlq().await);
    assert_eq!(rig.pending().await + rig.lag().await, 2);
    assert!(
        p.alice
            .messages_from(&p.room, &p.bot.user_id)
            .await
            .is_empty()
    );

    // The probe says the same, without sending anything.
    let a = adapter(&p);
    let e = a.probe().await.unwrap_err();
    assert_eq!(e.retry, Retry::Halt);
    assert!(e.message.contains("M_UNKNOWN_TOKEN"), "{}", e.message);
    assert!(!a.ready());
    assert!(a.not_ready_reason().unwrap().contains("refused"));
    stop.cancel();
    task.await.unwrap();
}

// ---------------------------------------------------------------------------
// Messages: edits, deletes, threads, mentions, Markdown, long text, reactions.

#[tokio::test]
async fn edits_deletes_threads_mentions_and_long_text_land_as_matrix_expects() {
    let p = pair(&shared()).await;
    let rig = Rig::new().await;
    let _gw = rig.start("gw", adapter(&p), fast()).await;
    let question = p.alice.say(&p.room, "question?").await;
    let room = p.room.as_str();
    let alice = p.alice.user_id.as_str();
    let long: String = (0..3000)
        .map(|i| format!("line {i:04} of a long answer, with some words to fill it up.\n"))
        .collect();
    for env in [
        json!({"type": "message", "channel_id": room, "text": "**draft**", "message_key": "sg:msg:a1",
               "mentions": [alice]}),
        json!({"type": "edit", "channel_id": room, "target_key": "sg:msg:a1", "text": "final *answer*"}),
        json!({"type": "message", "channel_id": room, "text": "oops", "message_key": "sg:msg:a2"}),
        json!({"type": "delete", "channel_id": room, "target_key": "sg:msg:a2", "reason": "mistake"}),
        json!({"type": "message", "channel_id": room, "text": "in the thread", "thread_id": question}),
        json!({"type": "message", "channel_id": room, "text": "@room hello all"}),
        json!({"type": "message", "channel_id": room, "text": "@room really", "mention_room": true}),
        json!({"type": "message", "channel_id": room, "text": long, "reply_to": question}),
        json!({"type": "reaction", "channel_id": room, "message_id": question, "emoji": "👍"}),
        json!({"type": "reaction", "channel_id": room, "message_id": question, "emoji": "👍"}),
        json!({"type": "message", "channel_id": room, "text": "bad", "mentions": "alice"}),
    ] {
        rig.publish(env).await;
    }
    rig.drained(T).await;
    let dlq = rig.dlq().await;
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert!(dlq[0]["error"].contains("`mentions`"), "{dlq:?}");

    let events = p
        .alice
        .events(
            &p.room,
            &["m.room.message", "m.room.redaction", "m.reaction"],
        )
        .await;
    let mine: Vec<&Value> = events
        .iter()
        .filter(|e| e["sender"] == p.bot.user_id.as_str())
        .collect();
    let c = |i: usize| &mine[i]["content"];
    // The message, Markdown rendered, mentioning alice only.
    assert_eq!(c(0)["body"], "**draft**");
    assert_eq!(c(0)["formatted_body"], "<strong>draft</strong>");
    assert_eq!(c(0)["m.mentions"], json!({"user_ids": [alice]}));
    // Its edit.
    assert_eq!(c(1)["m.relates_to"]["rel_type"], "m.replace");
    assert_eq!(c(1)["m.relates_to"]["event_id"], mine[0]["event_id"]);
    assert_eq!(c(1)["m.new_content"]["body"], "final *answer*");
    assert_eq!(
        c(1)["m.new_content"]["formatted_body"],
        "final <em>answer</em>"
    );
    // A message, then its redaction (its content is gone).
    assert_eq!(mine[3]["type"], "m.room.redaction");
    let redacts = mine[3]["redacts"]
        .as_str()
        .or(mine[3]["content"]["redacts"].as_str())
        .unwrap();
    assert_eq!(redacts, mine[2]["event_id"].as_str().unwrap());
    assert!(c(2).get("body").is_none(), "{}", c(2));
    assert_eq!(c(3)["reason"], "mistake");
    // In the thread.
    assert_eq!(c(4)["m.relates_to"]["rel_type"], "m.thread");
    assert_eq!(c(4)["m.relates_to"]["event_id"], question);
    // @room in the text notifies nobody unless asked.
    assert_eq!(c(5)["m.mentions"], json!({}));
    assert_eq!(c(6)["m.mentions"], json!({"room": true}));
    // The long text: several events, in order, the reply on the first.
    let pieces: Vec<&Value> = mine[7..]
        .iter()
        .copied()
        .take_while(|e| e["type"] == "m.room.message")
        .collect();
    assert!(pieces.len() >= 3, "{} pieces", pieces.len());
    let joined: String = pieces
        .iter()
        .map(|e| e["content"]["body"].as_str().unwrap())
        .collect();
    assert_eq!(joined, long);
    assert_eq!(
        pieces[0]["content"]["m.relates_to"]["m.in_reply_to"]["event_id"],
        question
    );
    for e in &pieces {
        assert!(e.to_string().len() < 65_536);
    }
    // One reaction: the repeat was a duplicate, delivered, not dead-lettered.
    let reactions: Vec<&&Value> = mine.iter().filter(|e| e["type"] == "m.reaction").collect();
    assert_eq!(reactions.len(), 1, "{reactions:#?}");
}

#[tokio::test]
async fn a_streamed_reply_ends_with_its_last_text() {
    let p = pair(&shared()).await;
    let rig = Rig::new().await;
    let gw = rig.start("gw", adapter(&p), fast()).await;
    let room = p.room.as_str();
    rig.publish(
        json!({"type": "message", "channel_id": room, "text": "…", "message_key": "sg:msg:s1"}),
    )
    .await;
    let mut text = String::new();
    for i in 1..=40 {
        text.push_str(&format!("token{i} "));
        rig.publish(
            json!({"type": "edit", "channel_id": room, "target_key": "sg:msg:s1",
                           "text": text.trim_end()}),
        )
        .await;
    }
    rig.drained(T).await;
    assert!(rig.dlq().await.is_empty(), "{:?}", rig.dlq().await);
    let mine = p.alice.messages_from(&p.room, &p.bot.user_id).await;
    let edits: Vec<&Value> = mine
        .iter()
        .filter(|e| e["content"]["m.relates_to"]["rel_type"] == "m.replace")
        .collect();
    let last = edits.last().expect("an edit");
    assert_eq!(last["content"]["m.new_content"]["body"], text.trim_end());
    let coalesced = gw.stats().snapshot().coalesced;
    assert_eq!(
        edits.len() as u64 + coalesced,
        40,
        "{} sent, {coalesced} coalesced",
        edits.len()
    );
    eprintln!(
        "streamed reply, 40 edits published at once: {} sent, {coalesced} coalesced; the last text is the final one",
        edits.len()
    );

    // Paced as tokens arrive (one edit every 100 ms): most are sent.
    rig.publish(
        json!({"type": "message", "channel_id": room, "text": "…", "message_key": "sg:msg:s2"}),
    )
    .await;
    let mut text = String::new();
    for i in 1..=20 {
        text.push_str(&format!("word{i} "));
        rig.publish(
            json!({"type": "edit", "channel_id": room, "target_key": "sg:msg:s2",
                           "text": text.trim_end()}),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rig.drained(T).await;
    assert!(rig.dlq().await.is_empty(), "{:?}", rig.dlq().await);
    let mine = p.alice.messages_from(&p.room, &p.bot.user_id).await;
    let second = mine
        .iter()
        .find(|e| e["content"]["body"] == "…" && e["event_id"] != mine[0]["event_id"])
        .expect("the second reply")["event_id"]
        .clone();
    let edits: Vec<&Value> = mine
        .iter()
        .filter(|e| e["content"]["m.relates_to"]["event_id"] == second)
        .collect();
    assert_eq!(
        edits.last().unwrap()["content"]["m.new_content"]["body"],
        text.trim_end()
    );
    let paced_coalesced = gw.stats().snapshot().coalesced - coalesced;
    assert_eq!(edits.len() as u64 + paced_coalesced, 20);
    eprintln!(
        "streamed reply, 20 edits 100 ms apart: {} sent, {paced_coalesced} coalesced; the last text is the final one",
        edits.len()
    );
}

#[tokio::test]
async fn inbound_edits_redactions_threads_and_media() {
    let base = shared();
    let bot = User::register(&base, "bot").await;
    let alice = User::register(&base, "alice").await;
    let room = alice.create_room(&[&bot.user_id]).await;
    bot.join(&room).await;
    let rig = Rig::new().await;
    let (stop, task) = gateway(&rig, &base, &bot);
    eventually("the first sync", T, || async {
        since(&rig).await.is_some()
    })
    .await;
    let first = alice.say(&room, "frist").await;
    alice
        .send(
            &room,
            json!({"msgtype": "m.text", "body": "* first",
                   "m.new_content": {"msgtype": "m.text", "body": "first"},
                   "m.relates_to": {"rel_type": "m.replace", "event_id": first}}),
        )
        .await;
    alice
        .send(
            &room,
            json!({"msgtype": "m.text", "body": "threaded",
                   "m.relates_to": {"rel_type": "m.thread", "event_id": first,
                                    "is_falling_back": true,
                                    "m.in_reply_to": {"event_id": first}}}),
        )
        .await;
    // Redacted before a sync saw it, the message would arrive emptied.
    eventually("three events", T, || async {
        inbound(&rig).await.len() >= 3
    })
    .await;
    alice
        .api(
            reqwest::Method::PUT,
            &format!("/rooms/{}/redact/{}/r1", seg(&room), seg(&first)),
            Some(json!({"reason": "typo"})),
        )
        .await;
    let up: Value = alice
        .http
        .post(format!("{base}/_matrix/media/v3/upload?filename=cat.png"))
        .bearer_auth(&alice.token)
        .header("content-type", "image/png")
        .body(b"\x89PNG-not-really".to_vec())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    alice
        .send(
            &room,
            json!({"msgtype": "m.image", "body": "cat.png", "url": up["content_uri"],
                   "info": {"mimetype": "image/png", "size": 16}}),
        )
        .await;
    eventually("five events", T, || async {
        inbound(&rig).await.len() >= 5
    })
    .await;
    let evs = inbound(&rig).await;
    let kinds: Vec<&str> = evs.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["message", "edit", "message", "delete", "message"],
        "{evs:#?}"
    );
    assert_eq!(evs[1].message_id.as_deref(), Some(first.as_str()));
    assert_eq!(evs[1].text.as_deref(), Some("first"));
    assert_eq!(evs[2].extra["thread_id"], first.as_str());
    assert_eq!(evs[3].message_id.as_deref(), Some(first.as_str()));
    assert_eq!(evs[3].extra["reason"], "typo");
    let url = evs[4].extra["media_url"].as_str().unwrap();
    assert!(url.contains("/_matrix/client/v1/media/download/"), "{url}");
    let bytes = reqwest::Client::new()
        .get(url)
        .bearer_auth(&bot.token)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&bytes[..], b"\x89PNG-not-really");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_rate_limited_join_is_retried_until_it_succeeds() {
    // One join per 4 s (burst 1): the second invite's join meets a 429 and
    // must be retried, once, by the one syncer.
    let syn = tokio::task::spawn_blocking(|| {
        PrivateSynapse::start(Limits {
            joins: (0.25, 1),
            ..UNLIMITED
        })
    })
    .await
    .unwrap();
    let base = syn.base();
    let bot = User::register(&base, "bot").await;
    let alice = User::register(&base, "alice").await;
    let rig = Rig::new().await;
    let (stop, task) = gateway(&rig, &base, &bot);
    eventually("the first sync", T, || async {
        since(&rig).await.is_some()
    })
    .await;
    let one = alice.create_room(&[&bot.user_id]).await;
    let two = alice.create_room(&[&bot.user_id]).await;
    eventually("both invites, joined", T, || async {
        inbound(&rig)
            .await
            .iter()
            .filter(|e| e.kind == "invite" && e.extra["joined"] == true)
            .count()
            == 2
    })
    .await;
    let evs = inbound(&rig).await;
    let invites: Vec<&InboundEvent> = evs.iter().filter(|e| e.kind == "invite").collect();
    assert_eq!(invites.len(), 2, "{invites:#?}");
    let rooms: std::collections::HashSet<&str> =
        invites.iter().map(|e| e.channel_id.as_str()).collect();
    assert_eq!(rooms, [one.as_str(), two.as_str()].into());
    // One of them needed more than one try.
    assert!(
        invites
            .iter()
            .any(|e| e.extra.get("join_attempts").and_then(Value::as_u64) >= Some(2)),
        "{invites:#?}"
    );
    for room in [&one, &two] {
        assert!(alice.joined_members(room).await.contains(&bot.user_id));
    }
    let pending: std::collections::HashMap<String, String> = rig
        .cmd(&["HGETALL", &format!("{}joins", rig.keys.matrix())])
        .await;
    assert!(pending.is_empty(), "{pending:?}");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn an_expired_token_is_refreshed_once_for_the_fleet() {
    // Access tokens that expire after 8 s, refreshable.
    let syn = tokio::task::spawn_blocking(|| {
        PrivateSynapse::start(Limits {
            extra: "refreshable_access_token_lifetime: 8s",
            ..UNLIMITED
        })
    })
    .await
    .unwrap();
    let base = syn.base();
    let alice = User::register(&base, "alice").await;
    let (bot, refresh) = User::register_refreshable(&base, "bot").await;
    let issued = Instant::now();
    let room = alice.create_room(&[&bot.user_id]).await;
    bot.join(&room).await;
    let rig = Rig::new().await;
    let toml = config_toml(
        &rig,
        &base,
        &bot,
        "gw-mx",
        "",
        "refresh_token_env = \"MX_REFRESH\"",
    );
    let config = stargazer::config::Config::from_toml(&toml, Vec::new()).expect("config");
    let env = [
        ("MX_TOKEN".to_owned(), bot.token.clone()),
        ("MX_REFRESH".to_owned(), refresh.clone()),
    ]
    .into();
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move {
        stargazer::gateway::run(config, env, s.cancelled_owned())
            .await
            .expect("gateway");
    });
    eventually("the first sync", T, || async {
        since(&rig).await.is_some()
    })
    .await;
    // Past the token's lifetime (the server must expire it: real time).
    tokio::time::sleep(Duration::from_secs(9).saturating_sub(issued.elapsed())).await;
    alice.say(&room, "after expiry").await;
    eventually("`after expiry` inbound", T, || async {
        inbound(&rig)
            .await
            .iter()
            .any(|e| e.text.as_deref() == Some("after expiry"))
    })
    .await;
    let out = Worker::from_bus(rig.bus.clone(), "sg:msg:", None).proxy();
    out.send(&room, "still here").await.unwrap();
    rig.drained(T).await;
    assert!(rig.dlq().await.is_empty(), "{:?}", rig.dlq().await);
    let sent = alice.messages_from(&room, &bot.user_id).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["content"]["body"], "still here");
    let stored: std::collections::HashMap<String, String> = rig
        .cmd(&["HGETALL", &format!("{}token", rig.keys.matrix())])
        .await;
    assert!(
        stored.get("access_token").is_some_and(|t| *t != bot.token),
        "{:?}",
        stored.keys()
    );
    assert!(stored.get("refresh_token").is_some_and(|t| *t != refresh));
    stop.cancel();
    task.await.unwrap();
}
