//! `stargazer bench`: the SPEC §6 workloads (W1–W5) against a private
//! redis-server, with the gateway in child processes (`stargazer bench-node`).
//!
//! One workload: FLUSHALL, preload the stream (pipelined XADD, 1000 per batch)
//! unless it is paced, start the node processes and wait until each has
//! connected, CONFIG RESETSTAT, tell the nodes to start (the clock starts
//! here), run the paced producer if any, poll XINFO GROUPS every 10 ms until
//! the group has read every entry and has lag 0 and pending 0, stop the clock,
//! snapshot INFO commandstats and each node's VmHWM, SIGTERM the nodes and
//! merge their reports.
//!
//! Each node runs one [`Consumer`] with a [`CheckingAdapter`] that records
//! every send (channel, seq, message key, send time in µs), so the harness can
//! count lost, duplicated and out-of-order sends over all nodes together.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::adapters::{Adapter, AdapterError, BoxFuture, Capabilities, Delivered, Delivery};
use crate::bus::Bus;
use crate::config::ConsumerConfig;
use crate::consumer::{Consumer, ConsumerParts};
use crate::keys::Keys;
use crate::stats::Snapshot;

/// The platform every workload runs on: stream `sg:{bench}:outbound`.
pub const PLATFORM: &str = "bench";
const PREFIX: &str = "sg";
const CACHE_PREFIX: &str = "sg:";
const KEY_PREFIX: &str = "sg:msg:";
const PRELOAD_BATCH: u64 = 1000;
const POLL: Duration = Duration::from_millis(10);

/// `stargazer bench` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Workloads to run, in order (W1 … W5); all of them when none is named.
    pub workloads: Vec<String>,
    /// Messages per workload (W5: at 500/s), instead of the SPEC's.
    #[arg(long)]
    pub n: Option<u64>,
    /// Channels per workload, instead of the SPEC's.
    #[arg(long)]
    pub channels: Option<u64>,
    /// Gateway nodes per workload, instead of the SPEC's (W3: 2, others 1).
    #[arg(long)]
    pub nodes: Option<usize>,
    /// Nodes keep no per-message records, so peak RSS is the gateway's own:
    /// no latency figures then, and duplicates across nodes go unseen.
    #[arg(long)]
    pub lean: bool,
    /// Also write every figure (and the per-command breakdown) here as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A few hundred messages per workload (for CI).
    #[arg(long)]
    pub smoke: bool,
    /// Give up on a workload that has not finished after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
}

/// `stargazer bench-node` arguments (spawned by `stargazer bench`).
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    #[arg(long)]
    pub redis_url: String,
    /// Consumer name in the group.
    #[arg(long)]
    pub name: String,
    /// Time the adapter takes per send.
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// Where to write the JSON report on SIGTERM.
    #[arg(long)]
    pub report: PathBuf,
    #[arg(long)]
    pub max_in_flight: Option<usize>,
    /// Keep no per-message records (counts and a bitset only).
    #[arg(long)]
    pub lean: bool,
}

/// One workload's shape.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    pub name: String,
    pub what: String,
    pub n: u64,
    pub channels: u64,
    pub delay_ms: u64,
    pub nodes: usize,
    /// Paced producer (messages per second) instead of a preloaded backlog.
    pub rate: Option<u64>,
    /// Nodes keep no per-message records (to measure the gateway's own memory).
    pub lean: bool,
}

impl Workload {
    /// The SPEC §6 workload `name` (W1 … W5), smoke-sized or overridden.
    pub fn named(
        name: &str,
        smoke: bool,
        n: Option<u64>,
        channels: Option<u64>,
    ) -> Result<Workload> {
        let name = name.to_ascii_uppercase();
        // (n, channels, delay ms, nodes, rate, smoke n, smoke channels, what)
        let (dn, dc, delay, nodes, rate, sn, sc, what) = match name.as_str() {
            "W1" => (20_000, 200, 0, 1, None, 400, 40, "drain, null adapter"),
            "W2" => (5_000, 200, 20, 1, None, 200, 20, "drain, 20 ms adapter"),
            "W3" => (20_000, 200, 0, 2, None, 400, 40, "drain, two gateway nodes"),
            "W4" => (2_000, 1, 0, 1, None, 200, 1, "drain, one channel"),
            "W5" => (5_000, 50, 0, 1, Some(500), 250, 10, "paced 500/s"),
            other => bail!("unknown workload `{other}` (W1 … W5)"),
        };
        let (dn, dc) = if smoke { (sn, sc) } else { (dn, dc) };
        let n = n.unwrap_or(dn);
        let channels = channels.unwrap_or(dc);
        if n == 0 || channels == 0 {
            bail!("--n and --channels must be at least 1");
        }
        Ok(Workload {
            what: format!("{what}, {n} msgs over {channels} channels"),
            name,
            n,
            channels,
            delay_ms: delay,
            nodes,
            rate,
            lean: false,
        })
    }
}

/// The envelope of message `i` of `channels` round-robin channels.
pub fn envelope(i: u64, channels: u64, created_ms: u64) -> String {
    let k = i % channels;
    let seq = i / channels + 1;
    format!(
        r#"{{"type":"message","channel_id":"c{k}","text":"hello {i}","message_key":"{KEY_PREFIX}{i}","seq":{seq},"created_ms":{created_ms}}}"#
    )
}

/// Unix time in microseconds.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// VmHWM (peak resident set) in kB of `pid`, or of this process.
pub fn vm_hwm_kb(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_owned(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

// ───────────────────────────── the node side ─────────────────────────────

/// One send as the adapter saw it: `[channel index, seq, message index,
/// send time µs, created_ms]` (indices parsed from `c<k>` and `sg:msg:<i>`).
pub type Record = [u64; 5];

#[derive(Debug, Default)]
struct Log {
    records: Vec<Record>,
    lean: bool,
    /// Delivered keys, one bit each.
    keys: Vec<u64>,
    distinct: u64,
    max_seq: HashMap<u64, u64>,
    duplicates: u64,
    out_of_order: u64,
    /// Sends whose channel, seq or key the bench did not publish.
    foreign: u64,
}

/// An adapter like `null` (optional fixed delay, synthetic ids) that also
/// checks what it is given: duplicates and per-channel order.
#[derive(Debug)]
pub struct CheckingAdapter {
    delay: Duration,
    next_id: AtomicU64,
    log: Mutex<Log>,
}

fn index(s: &str, prefix: &str) -> Option<u64> {
    s.strip_prefix(prefix)?.parse().ok()
}

impl CheckingAdapter {
    pub fn new(delay: Duration) -> Self {
        CheckingAdapter {
            delay,
            next_id: AtomicU64::new(0),
            log: Mutex::new(Log::default()),
        }
    }

    /// Keep counts and a bitset only, no per-message records.
    pub fn lean(self) -> Self {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).lean = true;
        self
    }

    fn record(&self, d: &Delivery<'_>, send_us: u64) {
        let env = d.envelope;
        let chan = env.channel_id.as_ref().and_then(|c| index(&c.0, "c"));
        let key = env
            .message_key
            .as_deref()
            .and_then(|k| index(k, KEY_PREFIX));
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let (Some(chan), Some(seq), Some(key)) = (chan, env.seq, key) else {
            log.foreign += 1;
            return;
        };
        let (word, bit) = ((key / 64) as usize, 1u64 << (key % 64));
        if log.keys.len() <= word {
            log.keys.resize(word + 1, 0);
        }
        if log.keys[word] & bit != 0 {
            log.duplicates += 1;
        } else {
            log.keys[word] |= bit;
            log.distinct += 1;
        }
        let top = log.max_seq.entry(chan).or_insert(0);
        if seq <= *top {
            log.out_of_order += 1;
        } else {
            *top = seq;
        }
        if !log.lean {
            log.records
                .push([chan, seq, key, send_us, env.created_ms.unwrap_or(0)]);
        }
    }

    /// What the node reports.
    pub fn report(&self, stats: Snapshot, vm_hwm_kb: Option<u64>) -> NodeReport {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        NodeReport {
            sends: log.distinct + log.duplicates + log.foreign,
            distinct_keys: log.distinct,
            duplicates: log.duplicates,
            out_of_order: log.out_of_order,
            foreign: log.foreign,
            vm_hwm_kb,
            stats: serde_json::to_value(stats).unwrap_or_default(),
            records: log.records.clone(),
        }
    }
}

impl Adapter for CheckingAdapter {
    fn kind(&self) -> &'static str {
        "bench"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    fn deliver<'a>(
        &'a self,
        delivery: Delivery<'a>,
    ) -> BoxFuture<'a, Result<Delivered, AdapterError>> {
        Box::pin(async move {
            self.record(&delivery, now_us());
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            let n = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
            Ok(Delivered {
                message_id: Some(format!("bench-{n}")),
            })
        })
    }
}

/// A node's JSON report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeReport {
    pub sends: u64,
    pub distinct_keys: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub foreign: u64,
    pub vm_hwm_kb: Option<u64>,
    /// The consumer's counters (`Stats::snapshot`).
    pub stats: serde_json::Value,
    pub records: Vec<Record>,
}

/// `stargazer bench-node`: print `ready` once connected, start the consumer
/// on the first line of stdin, and on SIGTERM shut it down and write the report.
pub async fn run_node(a: NodeArgs) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let bus = Bus::connect(&a.redis_url, Keys::new(PREFIX, PLATFORM))
        .await
        .with_context(|| format!("connecting to {}", a.redis_url))?;
    let mut checking = CheckingAdapter::new(Duration::from_millis(a.delay_ms));
    if a.lean {
        checking = checking.lean();
    }
    let adapter = Arc::new(checking);
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        out.write_all(b"ready\n")?;
        out.flush()?;
    }
    // The start signal: one line on stdin (read on a blocking thread).
    let read = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    });
    let line = tokio::select! {
        r = read => r?.context("reading the start signal")?,
        _ = term.recv() => bail!("stopped before the start signal"),
    };
    if line.trim() != "go" {
        bail!("no start signal (stdin closed)");
    }
    let mut settings = ConsumerConfig::default();
    if let Some(m) = a.max_in_flight {
        settings.max_in_flight = m;
    }
    let consumer = Consumer::start(ConsumerParts {
        bus,
        adapter: adapter.clone(),
        settings,
        consumer_name: a.name.clone(),
        cache_prefix: CACHE_PREFIX.into(),
        tools: Vec::new(),
    })
    .await
    .context("starting the consumer")?;
    term.recv().await;
    let stats = consumer.stats();
    consumer.shutdown().await;
    let report = adapter.report(stats.snapshot(), vm_hwm_kb(None));
    let text = serde_json::to_vec(&report)?;
    std::fs::write(&a.report, text).with_context(|| format!("writing {}", a.report.display()))?;
    Ok(())
}

// ──────────────────────────── the harness side ───────────────────────────

/// Commands only the harness sends (never a gateway); excluded from the counts.
/// (XPENDING is not among them: the begin script runs it once per entry.)
const HARNESS: &[&str] = &["info", "xinfo", "config", "flushall", "ping", "xlen"];

/// Commands a gateway sends itself (one round trip each). Every other command
/// a gateway causes runs inside its Lua scripts (XACK is sent directly only
/// for RPCs, which the workloads do not publish).
const CLIENT_SENT: &[&str] = &[
    "xreadgroup",
    "xautoclaim",
    "xclaim",
    "evalsha",
    "eval",
    "script",
    "xgroup",
    "client",
    "hello",
    "select",
];

/// Everything measured in one workload.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub workload: Workload,
    pub finished: bool,
    pub wall_s: f64,
    pub msgs_per_s: f64,
    pub redis_calls_per_msg: f64,
    pub round_trips_per_msg: f64,
    pub script_calls_per_msg: f64,
    /// Gateway calls per command (commandstats after RESETSTAT, harness excluded).
    pub commands: HashMap<String, u64>,
    pub latency_ms: Latency,
    pub peak_rss_mib: f64,
    pub sends: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub dead_lettered: u64,
    pub foreign_sends: u64,
    pub node_out_of_order: Vec<u64>,
    pub node_duplicates: Vec<u64>,
    pub node_stats: Vec<serde_json::Value>,
}

/// Publish→send latency percentiles (nearest rank) in ms.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub samples: usize,
}

impl Latency {
    fn of(mut us: Vec<u64>) -> Latency {
        if us.is_empty() {
            return Latency::default();
        }
        us.sort_unstable();
        let at = |p: f64| {
            let rank = ((p / 100.0) * us.len() as f64).ceil().max(1.0) as usize;
            us[rank.min(us.len()) - 1] as f64 / 1000.0
        };
        Latency {
            p50: at(50.0),
            p95: at(95.0),
            p99: at(99.0),
            max: *us.last().unwrap_or(&0) as f64 / 1000.0,
            samples: us.len(),
        }
    }
}

struct Node {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    report: PathBuf,
    pid: u32,
}

async fn spawn_node(url: &str, name: &str, w: &Workload) -> Result<Node> {
    let exe = std::env::current_exe().context("locating the stargazer binary")?;
    let report = std::env::temp_dir().join(format!(
        "stargazer-bench-{}-{}-{name}.json",
        std::process::id(),
        w.name
    ));
    let _ = std::fs::remove_file(&report);
    let mut child = tokio::process::Command::new(exe)
        .arg("bench-node")
        .args(["--redis-url", url, "--name", name])
        .args(["--delay-ms", &w.delay_ms.to_string()])
        .args(w.lean.then_some("--lean"))
        .arg("--report")
        .arg(&report)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting a bench node")?;
    let pid = child.id().context("bench node has no pid")?;
    let stdin = child.stdin.take().context("bench node stdin")?;
    let stdout = child.stdout.take().context("bench node stdout")?;
    let mut line = String::new();
    let mut lines = BufReader::new(stdout);
    tokio::time::timeout(Duration::from_secs(30), lines.read_line(&mut line))
        .await
        .context("bench node did not get ready in 30 s")??;
    if line.trim() != "ready" {
        bail!("bench node {name} failed to start (said {line:?})");
    }
    Ok(Node {
        child,
        stdin,
        report,
        pid,
    })
}

/// Group progress: (entries read, lag, pending); lag is None when Redis cannot tell.
async fn group_state(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &Keys,
) -> Result<Option<(u64, Option<u64>, u64)>> {
    let r: redis::RedisResult<Vec<HashMap<String, redis::Value>>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(keys.outbound())
        .query_async(conn)
        .await;
    let groups = match r {
        Ok(g) => g,
        Err(e) if e.code() == Some("ERR") => return Ok(None), // no stream yet
        Err(e) => return Err(e.into()),
    };
    let group = keys.group();
    for g in groups {
        let name = g
            .get("name")
            .and_then(|v| redis::from_redis_value_ref::<String>(v).ok());
        if name.as_deref() != Some(group.as_str()) {
            continue;
        }
        let num = |k: &str| {
            g.get(k)
                .and_then(|v| redis::from_redis_value_ref::<Option<u64>>(v).ok())
                .flatten()
        };
        return Ok(Some((
            num("entries-read").unwrap_or(0),
            num("lag"),
            num("pending").unwrap_or(0),
        )));
    }
    Ok(None)
}

/// `INFO commandstats` as command → calls (subcommands folded into their command).
fn command_calls(info: &str) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for line in info.lines() {
        let Some(rest) = line.strip_prefix("cmdstat_") else {
            continue;
        };
        let Some((name, fields)) = rest.split_once(':') else {
            continue;
        };
        let base = name.split('|').next().unwrap_or(name).to_ascii_lowercase();
        let calls = fields
            .split(',')
            .find_map(|f| f.strip_prefix("calls="))
            .and_then(|c| c.parse::<u64>().ok())
            .unwrap_or(0);
        *out.entry(base).or_insert(0) += calls;
    }
    out
}

async fn preload(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &Keys,
    w: &Workload,
) -> Result<()> {
    let stream = keys.outbound();
    let mut i = 0;
    while i < w.n {
        let end = (i + PRELOAD_BATCH).min(w.n);
        let mut pipe = redis::pipe();
        let now = crate::now_ms();
        for j in i..end {
            pipe.cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("payload")
                .arg(envelope(j, w.channels, now))
                .ignore();
        }
        pipe.query_async::<()>(conn).await?;
        i = end;
    }
    Ok(())
}

/// Publish `w.n` envelopes at `w.rate` per second, one XADD at a time; returns
/// each message's publish time (µs, taken just before its XADD).
async fn paced_producer(url: String, keys: Keys, w: Workload) -> Result<Vec<u64>> {
    let client = redis::Client::open(url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let stream = keys.outbound();
    let rate = w.rate.unwrap_or(500).max(1);
    let start = tokio::time::Instant::now();
    let mut published = Vec::with_capacity(w.n as usize);
    for i in 0..w.n {
        tokio::time::sleep_until(start + Duration::from_micros(i * 1_000_000 / rate)).await;
        let us = now_us();
        published.push(us);
        redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("payload")
            .arg(envelope(i, w.channels, us / 1000))
            .query_async::<()>(&mut conn)
            .await?;
    }
    Ok(published)
}

fn sigterm(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

async fn run_workload(
    url: &str,
    conn: &mut redis::aio::MultiplexedConnection,
    w: &Workload,
    timeout: Duration,
) -> Result<Outcome> {
    let keys = Keys::new(PREFIX, PLATFORM);
    redis::cmd("FLUSHALL").query_async::<()>(conn).await?;
    if w.rate.is_none() {
        preload(conn, &keys, w).await?;
    }
    let mut nodes = Vec::new();
    for k in 0..w.nodes {
        nodes.push(spawn_node(url, &format!("gw-{k}"), w).await?);
    }
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async::<()>(conn)
        .await?;
    let started = Instant::now();
    for node in &mut nodes {
        node.stdin.write_all(b"go\n").await?;
        node.stdin.flush().await?;
    }
    let producer = w
        .rate
        .map(|_| tokio::spawn(paced_producer(url.to_owned(), keys.clone(), w.clone())));
    let mut finished = false;
    loop {
        let produced = producer.as_ref().is_none_or(|p| p.is_finished());
        if produced
            && let Some((read, Some(0), 0)) = group_state(conn, &keys).await?
            && read >= w.n
        {
            finished = true;
            break;
        }
        for (k, node) in nodes.iter_mut().enumerate() {
            if let Some(status) = node.child.try_wait()? {
                bail!("{}: node gw-{k} exited early ({status})", w.name);
            }
        }
        if started.elapsed() > timeout {
            eprintln!(
                "{}: not finished after {} s; collecting what was done",
                w.name,
                timeout.as_secs()
            );
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let wall = started.elapsed().as_secs_f64();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    let hwm: Vec<u64> = nodes
        .iter()
        .filter_map(|n| vm_hwm_kb(Some(n.pid)))
        .collect();
    let published = match producer {
        Some(p) => p.await??,
        None => Vec::new(),
    };

    let mut reports = Vec::new();
    for (k, mut node) in nodes.into_iter().enumerate() {
        sigterm(node.pid);
        drop(node.stdin);
        let status = match tokio::time::timeout(Duration::from_secs(60), node.child.wait()).await {
            Ok(s) => s?,
            Err(_) => {
                let _ = node.child.kill().await;
                bail!(
                    "{}: node gw-{k} did not stop within 60 s of SIGTERM",
                    w.name
                );
            }
        };
        if !status.success() {
            bail!("{}: node gw-{k} exited with {status}", w.name);
        }
        let text = std::fs::read(&node.report)
            .with_context(|| format!("reading {}", node.report.display()))?;
        let _ = std::fs::remove_file(&node.report);
        reports.push(serde_json::from_slice::<NodeReport>(&text)?);
    }
    let dead_lettered: u64 = redis::cmd("XLEN").arg(keys.dlq()).query_async(conn).await?;
    Ok(summarize(
        w,
        finished,
        wall,
        &info,
        &hwm,
        &published,
        reports,
        dead_lettered,
    ))
}

#[allow(clippy::too_many_arguments)]
fn summarize(
    w: &Workload,
    finished: bool,
    wall: f64,
    info: &str,
    hwm: &[u64],
    published: &[u64],
    reports: Vec<NodeReport>,
    dead_lettered: u64,
) -> Outcome {
    let n = w.n as f64;
    // Redis calls: everything after RESETSTAT but the harness's own commands.
    let mut commands = command_calls(info);
    commands.retain(|c, _| !HARNESS.contains(&c.as_str()));
    if let Some(x) = commands.get_mut("xadd") {
        *x = x.saturating_sub(published.len() as u64); // the paced producer's
    }
    commands.retain(|_, v| *v > 0);
    let total: u64 = commands.values().sum();
    let trips: u64 = commands
        .iter()
        .filter(|(c, _)| CLIENT_SENT.contains(&c.as_str()))
        .map(|(_, v)| v)
        .sum();

    // Correctness over all nodes: per channel, sends merged by send time.
    let mut all: Vec<Record> = Vec::new();
    for r in &reports {
        all.extend_from_slice(&r.records);
    }
    all.sort_by_key(|r| (r[0], r[3]));
    let mut seen = HashSet::new();
    let (mut dups, mut ooo) = (0u64, 0u64);
    let mut chan = u64::MAX;
    let mut top = 0u64;
    for r in &all {
        if r[0] != chan {
            chan = r[0];
            top = 0;
        }
        if r[1] <= top {
            ooo += 1;
        } else {
            top = r[1];
        }
        if !seen.insert(r[2]) {
            dups += 1;
        }
    }
    let mut delivered = seen.iter().filter(|&&k| k < w.n).count() as u64;
    if w.lean {
        // No records: the nodes' own counts (duplicates across nodes unseen).
        delivered = reports.iter().map(|r| r.distinct_keys).sum();
        dups = reports.iter().map(|r| r.duplicates).sum();
        ooo = reports.iter().map(|r| r.out_of_order).sum();
    }
    let lat: Vec<u64> = all
        .iter()
        .map(|r| {
            let from = published.get(r[2] as usize).copied().unwrap_or(r[4] * 1000);
            r[3].saturating_sub(from)
        })
        .collect();
    let sends: u64 = reports.iter().map(|r| r.sends).sum();
    let peak = hwm
        .iter()
        .copied()
        .chain(reports.iter().filter_map(|r| r.vm_hwm_kb))
        .max()
        .unwrap_or(0);
    Outcome {
        workload: w.clone(),
        finished,
        wall_s: wall,
        msgs_per_s: n / wall,
        redis_calls_per_msg: total as f64 / n,
        round_trips_per_msg: trips as f64 / n,
        script_calls_per_msg: (total - trips) as f64 / n,
        commands,
        latency_ms: Latency::of(lat),
        peak_rss_mib: peak as f64 / 1024.0,
        sends,
        delivered,
        lost: w.n - delivered,
        duplicated: dups,
        out_of_order: ooo,
        dead_lettered,
        foreign_sends: reports.iter().map(|r| r.foreign).sum(),
        node_out_of_order: reports.iter().map(|r| r.out_of_order).collect(),
        node_duplicates: reports.iter().map(|r| r.duplicates).collect(),
        node_stats: reports.into_iter().map(|r| r.stats).collect(),
    }
}

const HEADER: &str = "| workload | msgs | msgs/s | wall s | Redis calls/msg | round trips/msg | latency p50 / p95 / p99 / max ms | peak RSS MiB | lost | dup | out of order | dead-lettered |\n|---|---|---|---|---|---|---|---|---|---|---|---|";

fn row(o: &Outcome) -> String {
    let w = &o.workload;
    let l = &o.latency_ms;
    let latency = if w.lean {
        "– (lean)".to_owned()
    } else {
        format!("{:.2} / {:.2} / {:.2} / {:.2}", l.p50, l.p95, l.p99, l.max)
    };
    format!(
        "| {}{} | {} / {} ch{} | {:.0} | {:.3} | {:.2} | {:.2} | {} | {:.1} | {} | {} | {} | {} |",
        w.name,
        if o.finished { "" } else { " (TIMED OUT)" },
        w.n,
        w.channels,
        if w.nodes > 1 {
            format!(", {} nodes", w.nodes)
        } else {
            String::new()
        },
        o.msgs_per_s,
        o.wall_s,
        o.redis_calls_per_msg,
        o.round_trips_per_msg,
        latency,
        o.peak_rss_mib,
        o.lost,
        o.duplicated,
        o.out_of_order,
        o.dead_lettered,
    )
}

fn breakdown(o: &Outcome) -> String {
    let mut c: Vec<_> = o.commands.iter().collect();
    c.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let parts: Vec<String> = c
        .iter()
        .map(|(k, v)| format!("{k} {:.2}", **v as f64 / o.workload.n as f64))
        .collect();
    format!("{}: {}", o.workload.name, parts.join(", "))
}

/// `stargazer bench`: run the workloads, print the table, write the JSON.
/// Fails (after printing everything) when a correctness column is not 0.
pub async fn run(args: BenchArgs) -> Result<()> {
    let names = if args.workloads.is_empty() {
        ["W1", "W2", "W3", "W4", "W5"].map(String::from).to_vec()
    } else {
        args.workloads.clone()
    };
    let workloads = names
        .iter()
        .map(|n| {
            Workload::named(n, args.smoke, args.n, args.channels).map(|mut w| {
                w.lean = args.lean;
                if let Some(k) = args.nodes.filter(|k| *k > 0) {
                    w.nodes = k;
                    w.what = format!("{}, {k} gateway nodes", w.what);
                }
                w
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let bin = std::env::var("STARGAZER_REDIS_SERVER").ok();
    let server = crate::redis_server::RedisServer::start(bin.as_deref())
        .context("starting a private redis-server")?;
    let url = server.url();
    let client = redis::Client::open(url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let version = redis_version(&mut conn).await.unwrap_or_default();
    eprintln!("private redis-server {version} at {url}");
    let mut outcomes = Vec::new();
    for w in &workloads {
        eprintln!("{}: {} …", w.name, w.what);
        let o = run_workload(&url, &mut conn, w, Duration::from_secs(args.timeout_s)).await?;
        eprintln!("{}", row(&o));
        outcomes.push(o);
    }
    println!("{HEADER}");
    for o in &outcomes {
        println!("{}", row(o));
    }
    println!("\nRedis calls per message, by command:");
    for o in &outcomes {
        println!("  {}", breakdown(o));
    }
    if let Some(path) = &args.json {
        write_json(path, &version, &outcomes)?;
    }
    let bad: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| !o.finished || o.lost + o.duplicated + o.out_of_order + o.foreign_sends > 0)
        .collect();
    if !bad.is_empty() {
        let names: Vec<&str> = bad.iter().map(|o| o.workload.name.as_str()).collect();
        bail!(
            "correctness failure in {}: lost, duplicated or out-of-order sends, or unfinished",
            names.join(", ")
        );
    }
    Ok(())
}

async fn redis_version(conn: &mut redis::aio::MultiplexedConnection) -> Result<String> {
    let info: String = redis::cmd("INFO").arg("server").query_async(conn).await?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("")
        .trim()
        .to_owned())
}

fn write_json(path: &Path, version: &str, outcomes: &[Outcome]) -> Result<()> {
    let doc = json!({
        "redis_version": version,
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "outcomes": outcomes,
    });
    std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_robin_with_seqs_from_one() {
        assert_eq!(
            envelope(0, 200, 7),
            r#"{"type":"message","channel_id":"c0","text":"hello 0","message_key":"sg:msg:0","seq":1,"created_ms":7}"#
        );
        let e: serde_json::Value = serde_json::from_str(&envelope(401, 200, 7)).unwrap();
        assert_eq!(e["channel_id"], "c1");
        assert_eq!(e["seq"], 3);
    }

    #[test]
    fn commandstats_fold_subcommands() {
        let info = "# Commandstats\r\ncmdstat_evalsha:calls=10,usec=5\r\ncmdstat_xinfo|groups:calls=3,usec=1\r\ncmdstat_client|setinfo:calls=2,usec=1\r\ncmdstat_client|list:calls=1,usec=1\r\n";
        let c = command_calls(info);
        assert_eq!(c["evalsha"], 10);
        assert_eq!(c["xinfo"], 3);
        assert_eq!(c["client"], 3);
    }

    #[test]
    fn merged_order_and_duplicates() {
        let w = Workload::named("W1", true, Some(4), Some(2)).unwrap();
        let report = |records: Vec<Record>| NodeReport {
            sends: records.len() as u64,
            distinct_keys: 0,
            duplicates: 0,
            out_of_order: 0,
            foreign: 0,
            vm_hwm_kb: Some(1024),
            stats: serde_json::Value::Null,
            records,
        };
        // Channel 0: seq 2 sent (node b) before seq 1 (node a); key 1 sent twice.
        let a = report(vec![[0, 1, 0, 20, 0], [1, 1, 1, 5, 0]]);
        let b = report(vec![[0, 2, 2, 10, 0], [1, 1, 1, 30, 0]]);
        let o = summarize(&w, true, 1.0, "", &[], &[], vec![a, b], 0);
        assert_eq!(o.out_of_order, 2); // c0 seq 1 after 2; c1 seq 1 again
        assert_eq!(o.duplicated, 1);
        assert_eq!(o.delivered, 3);
        assert_eq!(o.lost, 1);
        assert_eq!(o.peak_rss_mib, 1.0);
    }

    #[test]
    fn percentiles_nearest_rank() {
        let l = Latency::of((1..=100).map(|i| i * 1000).collect());
        assert_eq!((l.p50, l.p95, l.p99, l.max), (50.0, 95.0, 99.0, 100.0));
    }
}
