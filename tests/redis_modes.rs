//! Stargazer on Redis as production runs it: TLS (a private CA, a client
//! certificate), an ACL user per role, a Redis Cluster. Every server is
//! private and started here on free loopback ports; the platform is a local
//! webhook receiver that enforces the webhook contract (SPEC §5) and records
//! what it got, so each test can count delivered, duplicated and out-of-order.
//!
//! The gateway runs in-process through `stargazer::gateway::run`, from a TOML
//! config, exactly as `stargazer gateway` runs it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::{Value, json};
use stargazer::bus::acl::{Role, rules};
use stargazer::bus::conn::Tls;
use stargazer::bus::{Bus, Target};
use stargazer::config::Config;
use stargazer::keys::Keys;
use stargazer::redis_server::{RedisCluster, RedisServer, free_port};
use stargazer::sdk::Worker;

fn server_bin() -> Option<String> {
    std::env::var("STARGAZER_REDIS_SERVER").ok()
}

fn cli_bin() -> Option<String> {
    std::env::var("STARGAZER_REDIS_CLI").ok()
}

// ---------------------------------------------------------------- the platform

/// One POST the receiver took.
#[derive(Debug, Clone)]
struct Got {
    platform: String,
    channel: String,
    seq: u64,
    idempotency_key: String,
}

#[derive(Clone, Default)]
struct Sink {
    got: Arc<Mutex<Vec<Got>>>,
    tick: Arc<tokio::sync::Notify>,
}

async fn deliver(
    State(s): State<Sink>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    // The contract: platform header, Idempotency-Key equal to the body's.
    let platform = headers
        .get("x-stargazer-platform")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (Some(platform), Some(key)) = (platform, key) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "missing X-Stargazer-Platform or Idempotency-Key"})),
        );
    };
    if body["idempotency_key"].as_str() != Some(key.as_str()) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "Idempotency-Key differs from the body's"})),
        );
    }
    let n = {
        let mut got = s.got.lock().unwrap();
        got.push(Got {
            platform,
            channel: body["channel_id"].as_str().unwrap_or_default().to_owned(),
            seq: body["seq"].as_u64().unwrap_or(0),
            idempotency_key: key,
        });
        got.len()
    };
    s.tick.notify_waiters();
    (
        StatusCode::OK,
        Json(json!({"message_id": format!("m-{n}")})),
    )
}

impl Sink {
    async fn start() -> (Sink, String) {
        let s = Sink::default();
        let app = axum::Router::new()
            .route("/deliver", post(deliver))
            .with_state(s.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/deliver", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (s, url)
    }

    fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    /// Wait until `n` distinct idempotency keys arrived.
    async fn wait_distinct(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let notified = self.tick.notified();
            let distinct = self.report().distinct;
            if distinct >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "only {distinct} of {n} distinct deliveries within {within:?}"
            );
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
    }

    fn report(&self) -> Report {
        let got = self.got.lock().unwrap().clone();
        let mut seen = HashSet::new();
        let mut duplicates = 0;
        let mut out_of_order = 0;
        let mut last: HashMap<(String, String), u64> = HashMap::new();
        let mut per_platform: BTreeMap<String, usize> = BTreeMap::new();
        for g in &got {
            if !seen.insert((g.platform.clone(), g.idempotency_key.clone())) {
                duplicates += 1;
                continue;
            }
            *per_platform.entry(g.platform.clone()).or_default() += 1;
            let prev = last
                .entry((g.platform.clone(), g.channel.clone()))
                .or_insert(0);
            // A seq a producer took but never published is skipped (a gap);
            // one that comes after a higher one is out of order.
            if g.seq <= *prev {
                out_of_order += 1;
            }
            *prev = (*prev).max(g.seq);
        }
        Report {
            received: got.len(),
            distinct: seen.len(),
            duplicates,
            out_of_order,
            per_platform,
        }
    }
}

#[derive(Debug)]
struct Report {
    /// Every POST, repeats included.
    received: usize,
    distinct: usize,
    /// Repeats of an idempotency key already received.
    duplicates: usize,
    /// First deliveries whose seq is not the channel's previous one plus one.
    out_of_order: usize,
    per_platform: BTreeMap<String, usize>,
}

// ---------------------------------------------------------------- the gateway

struct Gateway {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), stargazer::gateway::GatewayError>>,
}

impl Gateway {
    /// Run `stargazer gateway` on `toml` (with `env` as its environment).
    fn start(toml: &str, env: HashMap<String, String>) -> Gateway {
        let config = Config::from_toml(toml, env.clone()).expect("config loads");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(stargazer::gateway::run(config, env, async move {
            let _ = rx.await;
        }));
        Gateway {
            stop: Some(tx),
            task,
        }
    }

    /// SIGTERM it and wait for a clean exit.
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let r = tokio::time::timeout(Duration::from_secs(20), &mut self.task)
            .await
            .expect("the gateway drains within 20 s")
            .expect("gateway task");
        r.expect("the gateway exits cleanly");
    }
}

/// A gateway config: `redis` is the `[redis]` table's body; one webhook
/// platform per name, all posting to `sink`.
fn config(redis: &str, platforms: &[String], sink: &str) -> String {
    let mut s = format!(
        "[redis]\n{redis}\n[gateway]\nconsumer_name = \"gw-1\"\n\
         [consumer]\nblock_ms = 200\nlock_ttl_ms = 1000\nautoclaim_min_idle_ms = 2000\n\
         autoclaim_interval_ms = 500\ngap_timeout_ms = 20000\nbackoff_base_ms = 20\nbackoff_max_ms = 500\n\
         trim_interval_ms = 500\nretention_ms = 0\n"
    );
    for p in platforms {
        s.push_str(&format!(
            "[[platform]]\nname = \"{p}\"\nadapter = \"webhook\"\nurl = \"{sink}\"\ntimeout_ms = 5000\n"
        ));
    }
    s
}

/// Publish `per_channel` messages on each of `channels` channels of every
/// platform (platforms at once, each channel's messages in turn).
async fn publish_all(target: &Target, platforms: &[String], channels: usize, per_channel: usize) {
    let mut tasks = Vec::new();
    for p in platforms {
        let target = target.clone();
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let w = Worker::connect_to(&target, "sg", &p)
                .await
                .expect("worker connects");
            let out = w.proxy();
            for i in 0..per_channel {
                for c in 0..channels {
                    out.send(&format!("c{c}"), &format!("hello {i}"))
                        .await
                        .expect("publish");
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

async fn raw(conn: &mut stargazer::bus::Conn, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query_async(conn).await
}

// ---------------------------------------------------------------- TLS

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA named `name` and, signed by it, a certificate for `role`
/// (`server`: 127.0.0.1 and localhost; `client`): `<role>.crt`, `<role>.key`.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
        ],
    );
}

fn make_cert(dir: &Path, ca: &str, role: &str) {
    let ext = match role {
        "server" => {
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
                     keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
        }
        _ => "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
    };
    std::fs::write(dir.join(format!("{role}.ext")), ext).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-keyout",
            &format!("{role}.key"),
            "-out",
            &format!("{role}.csr"),
            "-subj",
            &format!("/CN=stargazer-{role}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{role}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{role}.crt"),
            "-days",
            "2",
            "-extfile",
            &format!("{role}.ext"),
        ],
    );
}

/// A `redis-server` that speaks TLS on its own port and requires a client
/// certificate signed by the test CA (`ca.crt` in `dir`).
struct TlsRedis {
    server: RedisServer,
    tls_port: u16,
    dir: PathBuf,
}

impl TlsRedis {
    fn start(dir: &Path) -> TlsRedis {
        make_ca(dir, "ca");
        make_cert(dir, "ca", "server");
        make_cert(dir, "ca", "client");
        let tls_port = free_port().unwrap();
        let d = dir.to_path_buf();
        let server = RedisServer::start_with(server_bin().as_deref(), move |_, _| {
            let f = |n: &str| d.join(n).to_string_lossy().into_owned();
            vec![
                "--tls-port".into(),
                tls_port.to_string(),
                "--tls-cert-file".into(),
                f("server.crt"),
                "--tls-key-file".into(),
                f("server.key"),
                "--tls-ca-cert-file".into(),
                f("ca.crt"),
                "--tls-auth-clients".into(),
                "yes".into(),
            ]
        })
        .expect("redis-server with TLS (Debian's is built with it)");
        TlsRedis {
            server,
            tls_port,
            dir: dir.to_path_buf(),
        }
    }

    fn file(&self, n: &str) -> String {
        self.dir.join(n).to_string_lossy().into_owned()
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.tls_port)
    }

    fn tls(&self, ca: &str, client: bool) -> Tls {
        Tls {
            ca: Some(std::fs::read(self.file(ca)).unwrap()),
            client: client.then(|| {
                (
                    std::fs::read(self.file("client.crt")).unwrap(),
                    std::fs::read(self.file("client.key")).unwrap(),
                )
            }),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_and_a_worker_carry_messages_over_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let redis = TlsRedis::start(dir.path());
    let (sink, sink_url) = Sink::start().await;
    let platforms = vec!["tls".to_owned()];
    let redis_table = format!(
        "url = \"{}\"\ntls_ca_file = \"{}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"",
        redis.url(),
        redis.file("ca.crt"),
        redis.file("client.crt"),
        redis.file("client.key")
    );
    let toml = config(&redis_table, &platforms, &sink_url);
    let gw = Gateway::start(&toml, HashMap::new());
    // The worker reaches Redis through the same [redis] table.
    let cfg = Config::from_toml(&toml, []).unwrap();
    let target = Target::from_config(&cfg.redis, &HashMap::new()).unwrap();
    publish_all(&target, &platforms, 5, 40).await;
    sink.wait_distinct(200, Duration::from_secs(60)).await;
    let r = sink.report();
    assert_eq!(
        (r.distinct, r.duplicates, r.out_of_order),
        (200, 0, 0),
        "{r:?}"
    );
    // Every connection of the gateway and the worker was TLS: the plain
    // port saw none of them (only this check's own).
    let clients =
        stargazer::redis_server::raw_command(redis.server.port(), &["CLIENT", "LIST"]).unwrap();
    let plain_port = format!("laddr=127.0.0.1:{} ", redis.server.port());
    let tls_port = format!("laddr=127.0.0.1:{} ", redis.tls_port);
    assert_eq!(clients.matches(&plain_port).count(), 1, "{clients}");
    assert!(clients.matches(&tls_port).count() >= 2, "{clients}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_an_unknown_server_and_a_missing_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let redis = TlsRedis::start(dir.path());
    make_ca(dir.path(), "other-ca");
    let keys = Keys::new("sg", "tls");
    // The server's certificate is not signed by the CA we trust.
    let wrong = Target::url(&redis.url()).with_tls(redis.tls("other-ca.crt", true));
    let e = Bus::connect_to(&wrong, keys.clone())
        .await
        .expect_err("refused");
    assert!(
        format!("{e}").to_lowercase().contains("certificate"),
        "names the certificate: {e}"
    );
    // Trusted server, but no client certificate: the server refuses us.
    let anonymous = Target::url(&redis.url()).with_tls(redis.tls("ca.crt", false));
    let refused = async {
        let bus = Bus::connect_to(&anonymous, keys.clone()).await?;
        let mut c = bus.conn();
        raw(&mut c, &["PING"]).await
    };
    assert!(
        refused.await.is_err(),
        "a client without a certificate is refused"
    );
    // Both: works.
    let good = Target::url(&redis.url()).with_tls(redis.tls("ca.crt", true));
    let bus = Bus::connect_to(&good, keys).await.expect("connects");
    let mut c = bus.conn();
    let pong = raw(&mut c, &["PING"]).await.unwrap();
    assert_eq!(pong, redis::Value::SimpleString("PONG".into()));
}

// ---------------------------------------------------------------- ACL

/// `ACL SETUSER user on >password <rules of role>` on `server`, as the
/// default user.
async fn create_user(server: &RedisServer, user: &str, password: &str, role: Role) {
    let mut admin = Target::url(&server.url()).shared().await.unwrap();
    let mut c = redis::cmd("ACL");
    c.arg("SETUSER")
        .arg(user)
        .arg("reset")
        .arg("on")
        .arg(format!(">{password}"));
    for r in rules(role, "sg", "sg:msg:", None) {
        c.arg(r);
    }
    let _: () = c.query_async(&mut admin).await.expect("ACL SETUSER");
}

fn is_noperm(r: &redis::RedisResult<redis::Value>) -> bool {
    match r {
        Err(e) => e.code() == Some("NOPERM") || e.to_string().contains("NOPERM"),
        Ok(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_acl_users_run_a_gateway_and_a_worker_and_no_more() {
    let server = RedisServer::start(server_bin().as_deref()).unwrap();
    create_user(&server, "sg-gateway", "gw-secret", Role::Gateway).await;
    create_user(&server, "sg-worker", "wk-secret", Role::Worker).await;
    let (sink, sink_url) = Sink::start().await;
    let platforms = vec!["acl".to_owned()];
    // The gateway's password comes from the environment (redis.password_env).
    let toml = config(
        &format!(
            "url = \"redis://sg-gateway@127.0.0.1:{}\"\npassword_env = \"SG_REDIS_PASSWORD\"",
            server.port()
        ),
        &platforms,
        &sink_url,
    );
    let env: HashMap<String, String> =
        [("SG_REDIS_PASSWORD".to_owned(), "gw-secret".to_owned())].into();
    let gw = Gateway::start(&toml, env);

    // The worker publishes and calls an RPC with its own user.
    let worker_url = format!("redis://sg-worker:wk-secret@127.0.0.1:{}", server.port());
    let worker_target = Target::url(&worker_url);
    publish_all(&worker_target, &platforms, 4, 25).await;
    let w = Worker::connect_to(&worker_target, "sg", "acl")
        .await
        .unwrap();
    let tools = w
        .rpc("list_tools", json!({}), Duration::from_secs(10))
        .await
        .expect("the worker's user can call an RPC");
    assert!(tools.is_array(), "{tools}");
    sink.wait_distinct(100, Duration::from_secs(60)).await;
    let r = sink.report();
    assert_eq!(
        (r.distinct, r.duplicates, r.out_of_order),
        (100, 0, 0),
        "{r:?}"
    );

    // Bad input is dead-lettered through the gateway's user (the commit
    // script writes the dead-letter stream).
    let keys = Keys::new("sg", "acl");
    let mut wc = worker_target.shared().await.unwrap();
    raw(
        &mut wc,
        &["XADD", &keys.outbound(), "*", "payload", "not json"],
    )
    .await
    .expect("a worker may append");
    let gw_target = Target::url(&format!(
        "redis://sg-gateway:gw-secret@127.0.0.1:{}",
        server.port()
    ));
    let gw_bus = Bus::connect_to(&gw_target, keys.clone()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = stargazer::ops::status::collect(&gw_bus, "sg", &platforms)
            .await
            .expect("status runs with the gateway's user");
        let p = &st.platforms[0];
        // …and the trimmer (every 500 ms here) has removed the acked entries.
        if p.dead_letters == 1 && p.pending == 0 && p.stream_length == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "not dead-lettered: {p:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Nothing either of them did so far was refused: the rules cover the
    // whole run (reads, claims, commits, trimming, gauges, RPC, status).
    let mut admin = Target::url(&server.url()).shared().await.unwrap();
    let log = raw(&mut admin, &["ACL", "LOG"]).await.unwrap();
    assert_eq!(log, redis::Value::Array(vec![]), "denied commands: {log:?}");

    // The worker's user can append and nothing else on the outbound stream.
    let out = keys.outbound();
    let group = keys.group();
    let id = match raw(&mut wc, &["XADD", &out, "*", "payload", "{}"])
        .await
        .unwrap()
    {
        redis::Value::BulkString(b) => String::from_utf8(b).unwrap(),
        other => panic!("{other:?}"),
    };
    let refused: &[&[&str]] = &[
        &["XACK", &out, &group, &id],
        &["XCLAIM", &out, &group, "wk", "0", &id],
        &["XAUTOCLAIM", &out, &group, "wk", "0", "0"],
        &["XDEL", &out, &id],
        &["XTRIM", &out, "MAXLEN", "0"],
        &["DEL", &out],
        &["PEXPIRE", &out, "1"],
        &["XGROUP", "DESTROY", &out, &group],
        &["XREADGROUP", "GROUP", &group, "wk", "STREAMS", &out, ">"],
        &["XADD", &keys.dlq(), "*", "payload", "x"],
        &["FLUSHALL"],
    ];
    for args in refused {
        let r = raw(&mut wc, args).await;
        assert!(is_noperm(&r), "the worker's user ran {args:?}: {r:?}");
    }
    // Nor can the gateway's user step outside Stargazer's keys.
    let mut gc = gw_bus.conn();
    for args in [
        &["SET", "elsewhere", "1"][..],
        &["FLUSHALL"],
        &["CONFIG", "GET", "*"],
        &["KEYS", "*"],
    ] {
        let r = raw(&mut gc, args).await;
        assert!(is_noperm(&r), "the gateway's user ran {args:?}: {r:?}");
    }
    gw.stop().await;
}

// ---------------------------------------------------------------- cluster

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_platforms_of_a_thousand_messages_cross_a_three_master_cluster() {
    let cluster = RedisCluster::start(server_bin().as_deref(), cli_bin().as_deref(), 3, 0)
        .expect("a 3-master cluster");
    let (sink, sink_url) = Sink::start().await;
    let platforms: Vec<String> = (0..10).map(|i| format!("p{i}")).collect();
    let seeds = cluster
        .urls()
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let toml = config(&format!("cluster = [{seeds}]"), &platforms, &sink_url);
    let gw = Gateway::start(&toml, HashMap::new());
    let target = Target::cluster(cluster.urls());
    let started = Instant::now();
    publish_all(&target, &platforms, 10, 100).await;
    sink.wait_distinct(10_000, Duration::from_secs(240)).await;
    let took = started.elapsed();
    let r = sink.report();
    eprintln!("cluster 10×1000: {r:?} in {took:?}");
    assert_eq!(r.received, r.distinct + r.duplicates);
    assert_eq!(
        (r.distinct, r.duplicates, r.out_of_order),
        (10_000, 0, 0),
        "{r:?}"
    );
    assert!(r.per_platform.values().all(|n| *n == 1000), "{r:?}");

    // `stargazer status` on the cluster: every platform found, drained,
    // and the node that holds it named; the platforms span all three.
    let bus = Bus::connect_to(&target, Keys::new("sg", "")).await.unwrap();
    let found = bus.discover_platforms("sg").await.unwrap();
    assert_eq!(found, platforms);
    let deadline = Instant::now() + Duration::from_secs(30);
    let st = loop {
        let st = stargazer::ops::status::collect(&bus, "sg", &platforms)
            .await
            .unwrap();
        if st
            .platforms
            .iter()
            .all(|p| p.pending == 0 && p.lag == Some(0))
        {
            break st;
        }
        assert!(Instant::now() < deadline, "not drained: {st:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let nodes: HashSet<String> = st.platforms.iter().filter_map(|p| p.node.clone()).collect();
    assert_eq!(
        nodes.len(),
        3,
        "the platforms land on all three primaries: {nodes:?}"
    );
    assert!(st.platforms.iter().all(|p| p.dead_letters == 0));
    let table = stargazer::ops::status::render_table(&st);
    assert!(table.contains("NODE"), "{table}");
    gw.stop().await;
    assert_eq!(sink.count(), 10_000, "nothing more arrived while draining");
}

// ---------------------------------------------------------------- faults on a cluster

/// A producer that survives a failover: each message has a fixed
/// `message_key` (its idempotency key) and, once taken, a fixed `seq`, and
/// is published again until Redis confirms it. Returns the keys confirmed.
async fn publish_resilient(
    target: Target,
    platform: String,
    channels: usize,
    per_channel: usize,
    replicas: u32,
) -> Vec<String> {
    let w = loop {
        match Worker::connect_to(&target, "sg", &platform).await {
            Ok(w) => break w,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    // A write counts once a replica has it: one a failover took away is
    // published again (the same envelope; a copy that did land is skipped).
    let publisher = w
        .publisher()
        .clone()
        .with_wait_replicas(replicas, Duration::from_millis(500));
    let mut confirmed = Vec::new();
    for i in 0..per_channel {
        for c in 0..channels {
            let channel = format!("c{c}");
            let seq = loop {
                match publisher.next_seq(&channel).await {
                    Ok(s) => break s,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            };
            let key = format!("sg:msg:{platform}:{channel}:{i}");
            let env = json!({"type": "message", "channel_id": channel, "text": format!("hello {i}"),
                "seq": seq, "message_key": key});
            let Value::Object(env) = env else {
                unreachable!()
            };
            loop {
                match publisher.publish(env.clone()).await {
                    Ok(_) => break,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            confirmed.push(key);
        }
    }
    confirmed
}

/// Every dead letter of `platforms`: (message_key, error_kind).
async fn dead_letters(target: &Target, platforms: &[String]) -> Vec<(String, String)> {
    let mut conn = target.shared().await.unwrap();
    let mut out = Vec::new();
    for p in platforms {
        let keys = Keys::new("sg", p);
        let r: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(keys.dlq())
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        for e in r.ids {
            let payload: String = e.get("payload").unwrap_or_default();
            let kind: String = e.get("error_kind").unwrap_or_default();
            let key = serde_json::from_str::<Value>(&payload)
                .ok()
                .and_then(|v| v["message_key"].as_str().map(str::to_owned))
                .unwrap_or_default();
            out.push((key, kind));
        }
    }
    out
}

/// The primary (its index in `cluster.nodes`) holding `key`'s slot.
fn primary_of(cluster: &RedisCluster, key: &str) -> usize {
    try_primary_of(cluster, key).expect("a primary owns the slot")
}

/// The same, asking any node that answers; `None` while no live primary
/// owns the slot (during a failover).
fn try_primary_of(cluster: &RedisCluster, key: &str) -> Option<usize> {
    let (port, slot) = cluster.nodes.iter().find_map(|n| {
        let slot: u64 =
            stargazer::redis_server::raw_command(n.port(), &["CLUSTER", "KEYSLOT", key])
                .and_then(|r| r.trim().trim_start_matches(':').parse().ok())?;
        Some((n.port(), slot))
    })?;
    let nodes = stargazer::redis_server::raw_command(port, &["CLUSTER", "NODES"])?;
    for line in nodes.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
            continue;
        }
        let owns = stargazer::redis_server::node_line_slots(line)
            .iter()
            .any(|(lo, hi)| (*lo..=*hi).contains(&slot));
        if owns {
            let addr_port: u16 = f[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| p.parse().ok())?;
            return cluster.nodes.iter().position(|n| n.port() == addr_port);
        }
    }
    None
}

/// What a scenario ended with (the closing note's table).
#[derive(Debug)]
struct Outcome {
    published: usize,
    delivered: usize,
    resent: usize,
    out_of_order: usize,
    dead_lettered: usize,
    lost: usize,
}

/// Run 10 platforms × `per_platform` through a gateway configured with
/// `redis` (the `[redis]` table; `target` reaches the same Redis) while
/// `fault` runs once a third has been delivered; account for every message.
/// The producers wait for `replicas` replicas of each write.
async fn scenario<F, Fut>(
    redis: &str,
    target: Target,
    per_platform: usize,
    replicas: u32,
    extra: &str,
    fault: F,
) -> Outcome
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (sink, sink_url) = Sink::start().await;
    let platforms: Vec<String> = (0..10).map(|i| format!("p{i}")).collect();
    let toml = format!("{}{extra}", config(redis, &platforms, &sink_url));
    let gw = Gateway::start(&toml, HashMap::new());
    let producers: Vec<_> = platforms
        .iter()
        .map(|p| {
            tokio::spawn(publish_resilient(
                target.clone(),
                p.clone(),
                10,
                per_platform / 10,
                replicas,
            ))
        })
        .collect();
    let total = platforms.len() * per_platform;
    sink.wait_distinct(total / 3, Duration::from_secs(120))
        .await;
    fault().await;
    let mut published = Vec::new();
    for p in producers {
        published.extend(p.await.unwrap());
    }
    // Everything confirmed must end delivered or dead-lettered.
    let deadline = Instant::now() + Duration::from_secs(180);
    let (delivered, dead) = loop {
        let got: HashSet<String> = sink
            .got
            .lock()
            .unwrap()
            .iter()
            .map(|g| g.idempotency_key.clone())
            .collect();
        let dead = dead_letters(&target, &platforms).await;
        let dead_keys: HashSet<&String> = dead.iter().map(|(k, _)| k).collect();
        let missing = published
            .iter()
            .filter(|k| !got.contains(*k) && !dead_keys.contains(k))
            .count();
        if missing == 0 {
            break (got, dead);
        }
        assert!(
            Instant::now() < deadline,
            "{missing} confirmed messages neither delivered nor dead-lettered; {:?}",
            sink.report()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    gw.stop().await;
    let r = sink.report();
    let published_set: HashSet<&String> = published.iter().collect();
    let outcome = Outcome {
        published: published_set.len(),
        delivered: delivered.len(),
        resent: r.duplicates,
        out_of_order: r.out_of_order,
        dead_lettered: dead.len(),
        lost: published_set
            .iter()
            .filter(|k| !delivered.contains(**k) && !dead.iter().any(|(d, _)| d == **k))
            .count(),
    };
    for (key, kind) in &dead {
        assert!(!kind.is_empty(), "a dead letter without a reason: {key}");
    }
    eprintln!(
        "| published {} | delivered {} | resent at the platform {} | out of order {} | dead-lettered {} | lost {} |",
        outcome.published,
        outcome.delivered,
        outcome.resent,
        outcome.out_of_order,
        outcome.dead_lettered,
        outcome.lost
    );
    outcome
}

/// A primary killed mid-run: its replica is promoted (cluster-node-timeout
/// 2 s), and the killed node, started again as an operator would, rejoins as
/// the new primary's replica. The producers wait for a replica
/// (`with_wait_replicas`), so what the dead primary had not replicated is
/// published again; the gateway runs with `wait_replicas = 1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_primary_killed_mid_run_loses_and_reorders_nothing() {
    let mut cluster = RedisCluster::start(server_bin().as_deref(), cli_bin().as_deref(), 3, 1)
        .expect("3 primaries with a replica each");
    let victim = primary_of(&cluster, "sg:{p0}:outbound");
    let victim_port = cluster.nodes[victim].port();
    let redis = format!("cluster = [{}]\nwait_replicas = 1", quoted(&cluster.urls()));
    let target = Target::cluster(cluster.urls());
    let cluster_ref = &mut cluster;
    let o = scenario(&redis, target, 1000, 1, "", || {
        cluster_ref.nodes[victim].kill();
        eprintln!("killed primary {victim} (holding p0)");
        tokio::task::block_in_place(|| {
            // Its replica took over (another node owns the slot)…
            let deadline = Instant::now() + Duration::from_secs(60);
            while try_primary_of(cluster_ref, "sg:{p0}:outbound").is_none_or(|p| p == victim) {
                assert!(Instant::now() < deadline, "no replica was promoted");
                std::thread::sleep(Duration::from_millis(100));
            }
            cluster_ref.wait_ok(Duration::from_secs(60)).unwrap();
            eprintln!("a replica was promoted; starting the killed node again");
            // …and the killed node comes back as its replica.
            cluster_ref.nodes[victim].restart().unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let info =
                    stargazer::redis_server::raw_command(victim_port, &["INFO", "replication"])
                        .unwrap_or_default();
                if info.contains("role:slave") && info.contains("master_link_status:up") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the restarted node did not become a replica: {info}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            eprintln!("the killed node is the new primary's replica");
        });
        async move {}
    })
    .await;
    cluster.wait_ok(Duration::from_secs(30)).unwrap();
    assert_eq!((o.lost, o.out_of_order), (0, 0), "{o:?}");
    assert_eq!(o.published, 10_000, "{o:?}");
    assert_eq!(o.delivered + o.dead_lettered, 10_000, "{o:?}");
}

fn quoted(urls: &[String]) -> String {
    urls.iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------- Sentinel

/// A primary, its replica and three Sentinels watching it as `sg`.
struct SentinelSet {
    primary: RedisServer,
    replica: RedisServer,
    sentinels: Vec<RedisServer>,
}

/// `field`'s value in a flat RESP reply read as lines (`SENTINEL MASTER`).
fn resp_field(reply: &str, field: &str) -> Option<String> {
    let mut lines = reply.lines();
    while let Some(l) = lines.next() {
        if l == field {
            lines.next();
            return lines.next().map(str::to_owned);
        }
    }
    None
}

impl SentinelSet {
    async fn start() -> SentinelSet {
        let bin = server_bin();
        let primary = RedisServer::start(bin.as_deref()).unwrap();
        let pport = primary.port();
        let replica = RedisServer::start_with(bin.as_deref(), move |_, _| {
            vec!["--replicaof".into(), "127.0.0.1".into(), pport.to_string()]
        })
        .unwrap();
        let sentinels = (0..3)
            .map(|_| {
                RedisServer::start_sentinel(bin.as_deref(), "sg", pport, 2).expect("a sentinel")
            })
            .collect();
        let set = SentinelSet {
            primary,
            replica,
            sentinels,
        };
        // Ready for a failover: every Sentinel knows the replica and the
        // two other Sentinels.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = set.sentinels.iter().all(|s| {
                let m =
                    stargazer::redis_server::raw_command(s.port(), &["SENTINEL", "MASTER", "sg"])
                        .unwrap_or_default();
                resp_field(&m, "num-slaves").as_deref() == Some("1")
                    && resp_field(&m, "num-other-sentinels").as_deref() == Some("2")
            });
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the Sentinels did not find each other"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        set
    }

    fn urls(&self) -> Vec<String> {
        self.sentinels.iter().map(RedisServer::url).collect()
    }

    /// The primary's port the first Sentinel names.
    fn named_primary(&self) -> Option<u16> {
        let r = stargazer::redis_server::raw_command(
            self.sentinels[0].port(),
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "sg"],
        )?;
        r.lines().nth(4)?.trim().parse().ok()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_mid_run_loses_and_reorders_nothing() {
    let set = SentinelSet::start().await;
    assert_eq!(set.named_primary(), Some(set.primary.port()));
    let http = free_port().unwrap();
    let redis = format!(
        "sentinel = {{ master = \"sg\", urls = [{}] }}\nwait_replicas = 1",
        quoted(&set.urls())
    );
    let target = Target::sentinel("sg", set.urls());
    let readyz = format!("http://127.0.0.1:{http}/readyz");
    let first = format!("redis primary 127.0.0.1:{}", set.primary.port());
    let then = format!("redis primary 127.0.0.1:{}", set.replica.port());
    let sentinel_port = set.sentinels[1].port();
    let o = scenario(
        &redis,
        target,
        500,
        1,
        &format!("[http]\nlisten = \"127.0.0.1:{http}\"\n"),
        || async move {
            let says = |want: String| {
                let readyz = readyz.clone();
                async move {
                    let deadline = Instant::now() + Duration::from_secs(60);
                    loop {
                        let body = match reqwest::get(&readyz).await {
                            Ok(r) => r.text().await.unwrap_or_default(),
                            Err(_) => String::new(),
                        };
                        if body.starts_with("ready") && body.contains(&want) {
                            return;
                        }
                        assert!(Instant::now() < deadline, "/readyz still says: {body}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            };
            says(first).await;
            let r = stargazer::redis_server::raw_command(
                sentinel_port,
                &["SENTINEL", "FAILOVER", "sg"],
            );
            assert_eq!(r.as_deref(), Some("+OK\r\n"), "SENTINEL FAILOVER");
            eprintln!("SENTINEL FAILOVER sent");
            // /readyz names the new primary once the Sentinels switched.
            says(then).await;
        },
    )
    .await;
    assert_eq!(
        set.named_primary(),
        Some(set.replica.port()),
        "the replica was promoted"
    );
    assert_eq!((o.lost, o.out_of_order), (0, 0), "{o:?}");
    assert_eq!(o.published, 5_000, "{o:?}");
    assert_eq!(o.delivered + o.dead_lettered, 5_000, "{o:?}");
}

// ---------------------------------------------------------------- wait_replicas

/// A replica of the server on `port`.
fn replica_of(port: u16) -> RedisServer {
    RedisServer::start_with(server_bin().as_deref(), move |_, _| {
        vec!["--replicaof".into(), "127.0.0.1".into(), port.to_string()]
    })
    .unwrap()
}

/// `next_seq` until it succeeds (a replica has acknowledged), within 30 s.
async fn next_seq_once_replicated(publisher: &stargazer::publish::Publisher, channel: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match publisher.next_seq(channel).await {
            Ok(s) => return s,
            Err(e) => assert!(Instant::now() < deadline, "never replicated: {e}"),
        }
    }
}

/// A `seq` whose `WAIT` came back short is handed out again by the next
/// `next_seq` of its channel once a replica has it, so a producer that
/// retries leaves no gap (each gap would cost the channel `gap_timeout_ms`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seq_taken_while_replicas_are_short_is_reused_not_skipped() {
    let primary = RedisServer::start(server_bin().as_deref()).unwrap();
    let target = Target::url(&primary.url());
    let w = Worker::connect_to(&target, "sg", "p").await.unwrap();
    let publisher = w
        .publisher()
        .clone()
        .with_wait_replicas(1, Duration::from_millis(500));
    // No replica: the increment lands on the primary, the WAIT is short.
    for _ in 0..3 {
        assert!(publisher.next_seq("c").await.is_err(), "no replica yet");
    }
    let mut conn = target.shared().await.unwrap();
    let counter: u64 = redis::cmd("HGET")
        .arg(Keys::new("sg", "p").channel("c"))
        .arg("seq")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(counter, 1, "the retries took no further seq");
    // A replica arrives: the retry hands out the seq it took first.
    let port = primary.port();
    let _replica = replica_of(port);
    let seq = next_seq_once_replicated(&publisher, "c").await;
    assert_eq!(seq, 1);
    // (under load a WAIT may still come back short: then the retry reuses it)
    assert_eq!(next_seq_once_replicated(&publisher, "c").await, 2);
    // Short again, and another producer takes a seq meanwhile: the held one
    // no longer stands at the counter, so a new one is taken after it.
    drop(_replica);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // the primary notices the replica gone (a WAIT comes back short)
        match publisher.next_seq("c").await {
            Err(_) => break,
            Ok(s) => assert!(Instant::now() < deadline, "still replicated at seq {s}"),
        }
    }
    let held: u64 = redis::cmd("HINCRBY")
        .arg(Keys::new("sg", "p").channel("c"))
        .arg("seq")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _replica = replica_of(port);
    let seq = next_seq_once_replicated(&publisher, "c").await;
    assert_eq!(
        seq,
        held + 1,
        "the other producer's seq {held} is not handed out again"
    );
}

/// `redis-cli -p PORT ARGS…`, its output (for the slot migration below).
fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new(cli_bin().unwrap_or_else(|| "redis-cli".into()))
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Move `slot` from node `from` to node `to` as `redis-cli --cluster
/// reshard` does (IMPORTING, MIGRATING, MIGRATE key by key, SETSLOT NODE),
/// one key every `pace`, so traffic meets the slot half moved: commands on
/// keys already gone get ASK, scripts over keys on both sides TRYAGAIN.
/// Returns how many keys moved.
fn migrate_slot(
    cluster: &RedisCluster,
    slot: u64,
    from: usize,
    to: usize,
    pace: Duration,
) -> usize {
    let (src, dst) = (cluster.nodes[from].port(), cluster.nodes[to].port());
    let (src_id, dst_id) = (
        cli(src, &["CLUSTER", "MYID"]),
        cli(dst, &["CLUSTER", "MYID"]),
    );
    let s = slot.to_string();
    assert_eq!(
        cli(dst, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &src_id]),
        "OK"
    );
    assert_eq!(
        cli(src, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &dst_id]),
        "OK"
    );
    let mut moved = 0;
    loop {
        let key = cli(src, &["CLUSTER", "GETKEYSINSLOT", &s, "1"]);
        if key.is_empty() {
            break;
        }
        let r = cli(
            src,
            &[
                "MIGRATE",
                "127.0.0.1",
                &dst.to_string(),
                "",
                "0",
                "10000",
                "KEYS",
                &key,
            ],
        );
        assert!(r == "OK" || r == "NOKEY", "MIGRATE {key}: {r}");
        moved += 1;
        std::thread::sleep(pace);
    }
    for n in &cluster.nodes {
        assert_eq!(
            cli(n.port(), &["CLUSTER", "SETSLOT", &s, "NODE", &dst_id]),
            "OK"
        );
    }
    moved
}

/// The slot of `p0` is migrated to another primary mid-run, key by key, while
/// the gateway reads, commits and dead-letters there and the producers
/// publish: every message delivered once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_migrated_mid_run_loses_and_reorders_nothing() {
    let cluster = RedisCluster::start(server_bin().as_deref(), cli_bin().as_deref(), 3, 0)
        .expect("a 3-master cluster");
    let from = primary_of(&cluster, "sg:{p0}:outbound");
    let to = (from + 1) % 3;
    let slot: u64 = cli(
        cluster.nodes[from].port(),
        &["CLUSTER", "KEYSLOT", "sg:{p0}:outbound"],
    )
    .parse()
    .unwrap();
    let redis = format!("cluster = [{}]", quoted(&cluster.urls()));
    let target = Target::cluster(cluster.urls());
    let cluster_ref = &cluster;
    let o = scenario(&redis, target, 1000, 0, "", || {
        let moved = tokio::task::block_in_place(|| {
            migrate_slot(cluster_ref, slot, from, to, Duration::from_millis(250))
        });
        eprintln!("slot {slot} of p0 moved from node {from} to node {to}: {moved} keys");
        assert!(moved >= 5, "the platform's keys moved ({moved})");
        async move {}
    })
    .await;
    // No seq was taken that no entry carries (each would be a gap the
    // gateway waits gap_timeout_ms for): every counter stands at 100.
    let mut conn = Target::cluster(cluster.urls()).shared().await.unwrap();
    for c in 0..10 {
        let v: Option<u64> = redis::cmd("HGET")
            .arg(Keys::new("sg", "p0").channel(&format!("c{c}")))
            .arg("seq")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            v,
            Some(100),
            "p0 c{c}: seq numbers taken but never published"
        );
    }
    assert_eq!(primary_of(&cluster, "sg:{p0}:outbound"), to);
    assert_eq!((o.lost, o.out_of_order), (0, 0), "{o:?}");
    assert_eq!(o.published, 10_000, "{o:?}");
    assert_eq!(o.delivered + o.dead_lettered, 10_000, "{o:?}");
    assert_eq!(
        o.resent, 0,
        "a migration kills nothing, so nothing is resent: {o:?}"
    );
}
