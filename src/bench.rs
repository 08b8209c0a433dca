//! `stargazer bench`: the SPEC §6 workloads (W1–W6, W3x4) and the queued-backlog
//! memory run (`Q`, `--queued N`) against a private redis-server, with the
//! gateway in child processes (`stargazer bench-node`).
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
//! count lost, duplicated and out-of-order sends over all nodes together. W6
//! (streaming replies) runs the real webhook adapter instead, against an HTTP
//! sink served by the harness itself ([`Sink`]), which records every request
//! and answers each after a fixed delay.
//!
//! **Redis commands per message** = the `calls` of every command in
//! `INFO commandstats` after the `CONFIG RESETSTAT` (so the preload and the
//! nodes' connection set-up are not counted: only the drain), minus the
//! harness's own commands in that window, counted exactly as it sends them
//! (the RESETSTAT itself, one XINFO per poll, the W5 producer's XADDs),
//! divided by the number of stream entries. Redis counts a command run by
//! `redis.call` inside a script like one sent by a client, and the EVALSHA
//! that ran the script once more, so the figure is every command Redis
//! executed for the gateways.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::adapters::webhook::WebhookAdapter;
use crate::adapters::{
    Adapter, AdapterError, BoxFuture, Capabilities, Delivered, Delivery, SharedAdapter,
};
use crate::bus::Bus;
use crate::config::ConsumerConfig;
use crate::consumer::{Consumer, ConsumerParts};
use crate::keys::Keys;
use crate::stats::Snapshot;

/// The platform every workload runs on: stream `sg:{bench}:outbound`.
pub const PLATFORM: &str = "bench";
const PREFIX: &str = "sg";
/// The message-cache prefix the nodes run with (the shipped default).
const CACHE_PREFIX: &str = "sg:msg:";
const KEY_PREFIX: &str = "sg:msg:";
/// W6's message keys: `sg:msg:w6:c<k>`.
const W6_KEY_PREFIX: &str = "sg:msg:w6:";
const PRELOAD_BATCH: u64 = 1000;
const POLL: Duration = Duration::from_millis(10);
/// The workloads run when none is named (`Q` only when named or `--queued`).
pub const DEFAULT_WORKLOADS: &[&str] = &["W1", "W2", "W3", "W3x4", "W4", "W5", "W6"];

/// `stargazer bench` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Workloads to run, in order (W1 W2 W3 W3x4 W4 W5 W6, and Q: one lean
    /// gateway draining 1,000,000 queued entries); all but Q when none is named.
    pub workloads: Vec<String>,
    /// Messages per workload (W5: at 500/s), instead of the SPEC's. W6 ignores
    /// it (each of its channels gets one message and 40 edits).
    #[arg(long)]
    pub n: Option<u64>,
    /// Channels per workload, instead of the SPEC's.
    #[arg(long)]
    pub channels: Option<u64>,
    /// Gateway nodes per workload, instead of the SPEC's (W3: 2, W3x4: 4, others 1).
    #[arg(long)]
    pub nodes: Option<usize>,
    /// Nodes keep no per-message records, so peak RSS is the gateway's own:
    /// no latency figures then, and duplicates across nodes go unseen.
    #[arg(long)]
    pub lean: bool,
    /// Also run Q with this many queued entries (W1's envelopes over
    /// `--channels` or 200 channels, one lean gateway, null adapter): the peak
    /// RSS of one gateway draining a deep backlog.
    #[arg(long, value_name = "N")]
    pub queued: Option<u64>,
    /// BullMQ's figures (the JSON line `baseline/bullmq/b1.mjs` prints,
    /// optionally with `peak_rss_kb`): the targets table then compares with it.
    #[arg(long, value_name = "FILE")]
    pub bullmq_json: Option<PathBuf>,
    /// Also write every figure (and the per-command breakdown) here as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A few hundred messages per workload (for CI).
    #[arg(long)]
    pub smoke: bool,
    /// Give up on a workload that has not finished after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
    /// Start this many replicas of the private server and make every commit
    /// wait for them (`redis.wait_replicas`), to measure what WAIT costs.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub wait_replicas: u32,
    /// Instead of the workloads: W1 over 10 platforms (2,000 messages over
    /// 20 channels each) on a plain server, then on a private Redis Cluster
    /// of each of these primary counts (e.g. `1,2,3`), drained by one
    /// `stargazer gateway` (null adapter): aggregate and per-shard msgs/s.
    #[arg(long, value_name = "COUNTS", value_delimiter = ',')]
    pub shards: Vec<usize>,
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
    /// Deliver through the webhook adapter to this URL instead of the
    /// checking adapter (W6; the harness's sink checks what arrives).
    #[arg(long)]
    pub webhook: Option<String>,
    /// Every commit waits for this many replicas (`redis.wait_replicas`).
    #[arg(long, default_value_t = 0)]
    pub wait_replicas: u32,
}

/// One workload's shape.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    pub name: String,
    pub what: String,
    /// Stream entries (W6: messages and edits together).
    pub n: u64,
    pub channels: u64,
    /// The checking adapter's time per send.
    pub delay_ms: u64,
    pub nodes: usize,
    /// Paced producer (messages per second) instead of a preloaded backlog.
    pub rate: Option<u64>,
    /// Nodes keep no per-message records (to measure the gateway's own memory).
    pub lean: bool,
    /// W6: edits per message (each channel: one message, then this many edits).
    pub edits: u64,
    /// W6: the webhook sink's time per request.
    pub sink_ms: u64,
    /// `redis.wait_replicas` of the nodes (`--wait-replicas`).
    pub wait_replicas: u32,
}

impl Workload {
    /// The workload `name` (W1 … W6, W3x4, Q), smoke-sized or overridden.
    pub fn named(
        name: &str,
        smoke: bool,
        n: Option<u64>,
        channels: Option<u64>,
    ) -> Result<Workload> {
        let upper = name.to_ascii_uppercase();
        if upper == "W6" {
            return Ok(Workload::w6(smoke, channels));
        }
        // (name, n, channels, delay ms, nodes, rate, smoke n, smoke channels, what)
        let (name, dn, dc, delay, nodes, rate, sn, sc, what) = match upper.as_str() {
            "W1" => (
                "W1",
                20_000,
                200,
                0,
                1,
                None,
                400,
                40,
                "drain, null adapter",
            ),
            "W2" => (
                "W2",
                5_000,
                200,
                20,
                1,
                None,
                200,
                20,
                "drain, 20 ms adapter",
            ),
            "W3" => (
                "W3",
                20_000,
                200,
                0,
                2,
                None,
                400,
                40,
                "drain, two gateway nodes",
            ),
            "W3X4" => (
                "W3x4",
                20_000,
                200,
                0,
                4,
                None,
                400,
                40,
                "drain, four gateway nodes",
            ),
            "W4" => ("W4", 2_000, 1, 0, 1, None, 200, 1, "drain, one channel"),
            "W5" => ("W5", 5_000, 50, 0, 1, Some(500), 250, 10, "paced 500/s"),
            "Q" => (
                "Q",
                1_000_000,
                200,
                0,
                1,
                None,
                2_000,
                40,
                "queued backlog, one lean gateway",
            ),
            other => bail!("unknown workload `{other}` (W1 W2 W3 W3x4 W4 W5 W6 Q)"),
        };
        let (dn, dc) = if smoke { (sn, sc) } else { (dn, dc) };
        let n = n.unwrap_or(dn);
        let channels = channels.unwrap_or(dc);
        if n == 0 || channels == 0 {
            bail!("--n and --channels must be at least 1");
        }
        Ok(Workload {
            what: format!("{what}, {n} msgs over {channels} channels"),
            name: name.to_owned(),
            n,
            channels,
            delay_ms: delay,
            nodes,
            rate,
            lean: name == "Q",
            edits: 0,
            sink_ms: 0,
            wait_replicas: 0,
        })
    }

    /// W6, streaming replies: per channel one message, then 40 edits of it by
    /// `target_key`, all published before the gateway starts; webhook sink at
    /// 20 ms per request.
    fn w6(smoke: bool, channels: Option<u64>) -> Workload {
        let channels = channels.unwrap_or(if smoke { 10 } else { 50 }).max(1);
        let edits = 40;
        Workload {
            name: "W6".into(),
            what: format!(
                "streaming replies, {channels} channels × (1 message + {edits} edits), webhook sink at 20 ms"
            ),
            n: channels * (1 + edits),
            channels,
            delay_ms: 0,
            nodes: 1,
            rate: None,
            lean: false,
            edits,
            sink_ms: 20,
            wait_replicas: 0,
        }
    }

    fn streaming(&self) -> bool {
        self.edits > 0
    }

    /// Stream entry `i` of this workload, stamped `created_ms`.
    fn envelope(&self, i: u64, created_ms: u64) -> String {
        if self.streaming() {
            w6_envelope(i, self.channels, self.edits, created_ms)
        } else {
            envelope(i, self.channels, created_ms)
        }
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

/// The text of edit `n` (1-based) of channel `k`'s streamed reply: the reply
/// so far, one token per edit. Edit `edits` carries the final text.
pub fn partial_text(k: u64, n: u64) -> String {
    let mut s = format!("reply c{k}:");
    for t in 1..=n {
        s.push_str(&format!(" t{t}"));
    }
    s
}

/// W6 entry `i`, channels round-robin: round 0 is each channel's message
/// (`message_key` `sg:msg:w6:c<k>`, seq 1), round `r` ≥ 1 its edit `r`
/// (`target_key` that key, seq `r + 1`, text [`partial_text`]).
pub fn w6_envelope(i: u64, channels: u64, edits: u64, created_ms: u64) -> String {
    let k = i % channels;
    let round = (i / channels).min(edits);
    let seq = round + 1;
    if round == 0 {
        format!(
            r#"{{"type":"message","channel_id":"c{k}","text":"reply c{k}: …","message_key":"{W6_KEY_PREFIX}c{k}","seq":1,"created_ms":{created_ms}}}"#
        )
    } else {
        let text = partial_text(k, round);
        format!(
            r#"{{"type":"edit","channel_id":"c{k}","target_key":"{W6_KEY_PREFIX}c{k}","text":"{text}","seq":{seq},"created_ms":{created_ms}}}"#
        )
    }
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
        .with_context(|| format!("connecting to {}", a.redis_url))?
        .with_wait_replicas(a.wait_replicas, Duration::from_secs(1));
    let mut checking = CheckingAdapter::new(Duration::from_millis(a.delay_ms));
    if a.lean {
        checking = checking.lean();
    }
    let checking = Arc::new(checking);
    let adapter: SharedAdapter = match &a.webhook {
        Some(url) => Arc::new(
            WebhookAdapter::new(PLATFORM, url, None, Duration::from_secs(10))
                .map_err(anyhow::Error::msg)
                .context("the webhook adapter")?,
        ),
        None => checking.clone(),
    };
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
        adapter,
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
    // With the webhook adapter the checking one saw nothing: only the
    // consumer's counters and the peak RSS are reported (the sink checks).
    let report = checking.report(stats.snapshot(), vm_hwm_kb(None));
    let text = serde_json::to_vec(&report)?;
    std::fs::write(&a.report, text).with_context(|| format!("writing {}", a.report.display()))?;
    Ok(())
}

// ───────────────────────────── the webhook sink ──────────────────────────

/// One request the sink received (SPEC §5 body fields), in arrival order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SinkHit {
    /// `action`: `send_message`, `edit_message`, …
    pub action: String,
    pub channel_id: Option<String>,
    pub seq: Option<u64>,
    pub text: Option<String>,
    /// `message_key` (a send) or the `Idempotency-Key` header when absent.
    pub message_key: Option<String>,
    /// `message_id` in the body: the platform id an edit targets.
    pub message_id: Option<String>,
    /// The `message_id` the sink answered a `send_message` with.
    pub answered: Option<String>,
}

/// An HTTP receiver for the webhook adapter: records every POST, waits
/// `delay`, then answers 200 — `{"message_id": "w6m-<n>"}` for a send (a
/// fresh id each), the edited id for an edit.
#[derive(Debug)]
pub struct Sink {
    hits: Mutex<Vec<SinkHit>>,
    next_id: AtomicU64,
    delay: Duration,
}

impl Sink {
    pub fn new(delay: Duration) -> Arc<Sink> {
        Arc::new(Sink {
            hits: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
            delay,
        })
    }

    /// Record one request body; returns the answer's body (None: not JSON, 400).
    fn hit(&self, idempotency_key: Option<&str>, body: &[u8]) -> Option<Value> {
        let Ok(Value::Object(b)) = serde_json::from_slice::<Value>(body) else {
            self.hits
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(SinkHit {
                    action: "<not a JSON object>".into(),
                    ..SinkHit::default()
                });
            return None;
        };
        let s = |k: &str| b.get(k).and_then(Value::as_str).map(str::to_owned);
        let mut hit = SinkHit {
            action: s("action").unwrap_or_default(),
            channel_id: s("channel_id"),
            seq: b.get("seq").and_then(Value::as_u64),
            text: s("text"),
            message_key: s("message_key").or_else(|| idempotency_key.map(str::to_owned)),
            message_id: match b.get("message_id") {
                Some(Value::Number(n)) => Some(n.to_string()),
                other => other.and_then(Value::as_str).map(str::to_owned),
            },
            answered: None,
        };
        let answer = if hit.action == "send_message" {
            let id = format!("w6m-{}", self.next_id.fetch_add(1, Ordering::Relaxed) + 1);
            hit.answered = Some(id.clone());
            json!({ "message_id": id })
        } else {
            match &hit.message_id {
                Some(id) => json!({ "message_id": id }),
                None => json!({}),
            }
        };
        self.hits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(hit);
        Some(answer)
    }

    /// Everything received so far, in arrival order.
    pub fn hits(&self) -> Vec<SinkHit> {
        self.hits.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Serve on a free loopback port; returns the URL to POST to and the
    /// server task (abort it when done).
    pub async fn serve(self: &Arc<Sink>) -> Result<(String, tokio::task::JoinHandle<()>)> {
        use axum::body::Bytes;
        use axum::extract::State;
        use axum::http::{HeaderMap, StatusCode};
        use axum::response::IntoResponse;

        async fn deliver(
            State(sink): State<Arc<Sink>>,
            headers: HeaderMap,
            body: Bytes,
        ) -> axum::response::Response {
            let key = headers
                .get(crate::adapters::webhook::IDEMPOTENCY_HEADER)
                .and_then(|v| v.to_str().ok());
            let answer = sink.hit(key, &body);
            tokio::time::sleep(sink.delay).await;
            match answer {
                Some(a) => axum::Json(a).into_response(),
                None => (StatusCode::BAD_REQUEST, "not a JSON object").into_response(),
            }
        }

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the webhook sink")?;
        let port = listener.local_addr()?.port();
        let app = axum::Router::new()
            .route("/deliver", axum::routing::post(deliver))
            .with_state(self.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok((format!("http://127.0.0.1:{port}/deliver"), task))
    }
}

/// A dead-lettered entry as the harness reads it back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    pub error_kind: String,
    /// The envelope's `type` (`message` when absent), if its payload is JSON.
    pub kind_of_entry: String,
    pub channel_id: Option<String>,
    pub seq: Option<u64>,
}

/// W6's figures: what the sink received, against what was published.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Streaming {
    pub messages: u64,
    pub edits_published: u64,
    /// `send_message` requests received.
    pub send_requests: u64,
    /// `edit_message` requests received (a repeat counted each time).
    pub edit_requests: u64,
    /// Messages sent at least once.
    pub distinct_sends: u64,
    /// Edits (distinct seqs) received.
    pub distinct_edits: u64,
    /// Edits published − distinct edits received − edits dead-lettered (with
    /// nothing dead-lettered: edits published − edit requests received).
    pub coalesced: u64,
    /// The engine's own `coalesced` counter summed over the nodes, when its
    /// `Stats` has one.
    pub engine_coalesced: Option<u64>,
    pub edits_dead_lettered: u64,
    /// Messages whose last `edit_message` received carried the final text.
    pub final_ok: u64,
    /// Edits whose `message_id` is not the id the sink gave their target's send.
    pub misdirected: u64,
    /// Requests the workload did not publish (unknown channel, action or seq).
    pub foreign: u64,
    /// Messages not received and not dead-lettered, plus final edits neither
    /// received nor dead-lettered (an intermediate edit may be coalesced).
    pub lost: u64,
    /// Repeated sends of a message and repeated edits (same seq).
    pub duplicated: u64,
    /// Requests of a channel whose seq is ≤ one already received on it.
    pub out_of_order: u64,
}

/// Check what the sink received in W6 (`hits` in arrival order).
pub fn check_streaming(w: &Workload, hits: &[SinkHit], dlq: &[DeadLetter]) -> Streaming {
    let chan_of = |c: &Option<String>| {
        c.as_deref()
            .and_then(|c| index(c, "c"))
            .filter(|&k| k < w.channels)
    };
    let mut s = Streaming {
        messages: w.channels,
        edits_published: w.channels * w.edits,
        ..Streaming::default()
    };
    let last_seq = w.edits + 1;
    // Per channel: the id its send was answered with, seqs seen, highest seq,
    // the last edit's text.
    let mut sent: HashMap<u64, String> = HashMap::new();
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut top: HashMap<u64, u64> = HashMap::new();
    let mut last_text: HashMap<u64, Option<String>> = HashMap::new();
    for h in hits {
        let (Some(k), Some(seq)) = (chan_of(&h.channel_id), h.seq) else {
            s.foreign += 1;
            continue;
        };
        let expected_key = format!("{W6_KEY_PREFIX}c{k}");
        match h.action.as_str() {
            "send_message" if seq == 1 && h.message_key.as_deref() == Some(&expected_key) => {
                s.send_requests += 1;
                if let Some(id) = &h.answered {
                    sent.entry(k).or_insert_with(|| id.clone());
                }
            }
            "edit_message" if (2..=last_seq).contains(&seq) => {
                s.edit_requests += 1;
                if !sent.contains_key(&k) || h.message_id.as_ref() != sent.get(&k) {
                    s.misdirected += 1;
                }
                last_text.insert(k, h.text.clone());
            }
            _ => {
                s.foreign += 1;
                continue;
            }
        }
        if seen.insert((k, seq)) {
            if seq > 1 {
                s.distinct_edits += 1;
            } else {
                s.distinct_sends += 1;
            }
        } else {
            s.duplicated += 1;
        }
        let t = top.entry(k).or_insert(0);
        if seq <= *t {
            s.out_of_order += 1;
        } else {
            *t = seq;
        }
    }
    let dead: HashSet<(u64, u64)> = dlq
        .iter()
        .filter_map(|d| Some((chan_of(&d.channel_id)?, d.seq?)))
        .collect();
    s.edits_dead_lettered = dead.iter().filter(|(_, seq)| *seq > 1).count() as u64;
    for k in 0..w.channels {
        if !seen.contains(&(k, 1)) && !dead.contains(&(k, 1)) {
            s.lost += 1;
        }
        if !seen.contains(&(k, last_seq)) && !dead.contains(&(k, last_seq)) {
            s.lost += 1;
        }
        if last_text.get(&k).cloned().flatten() == Some(partial_text(k, w.edits)) {
            s.final_ok += 1;
        }
    }
    s.coalesced = s
        .edits_published
        .saturating_sub(s.distinct_edits + s.edits_dead_lettered);
    s
}

// ──────────────────────────── the harness side ───────────────────────────

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
    /// Gateway calls per command (commandstats after RESETSTAT, the harness's
    /// own calls subtracted).
    pub commands: HashMap<String, u64>,
    /// The harness's own calls in the measured window (subtracted above).
    pub harness_calls: HashMap<String, u64>,
    pub latency_ms: Latency,
    pub peak_rss_mib: f64,
    pub sends: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub dead_lettered: u64,
    /// Dead-lettered entries by `error_kind`.
    pub dead_letter_kinds: BTreeMap<String, u64>,
    pub foreign_sends: u64,
    pub node_out_of_order: Vec<u64>,
    pub node_duplicates: Vec<u64>,
    pub node_stats: Vec<serde_json::Value>,
    /// W6 only.
    pub streaming: Option<Streaming>,
    /// What a reader must know about this run (e.g. an action the engine lacks).
    pub note: Option<String>,
}

impl Outcome {
    /// Why this run fails its correctness checks, if it does.
    pub fn failure(&self) -> Option<String> {
        let mut why = Vec::new();
        if !self.finished {
            why.push("did not finish".to_owned());
        }
        if self.lost + self.duplicated + self.out_of_order + self.foreign_sends > 0 {
            why.push(format!(
                "lost {}, duplicated {}, out of order {}, foreign {}",
                self.lost, self.duplicated, self.out_of_order, self.foreign_sends
            ));
        }
        if let Some(s) = &self.streaming {
            if s.final_ok < s.messages {
                why.push(format!(
                    "final text wrong on {} of {} messages",
                    s.messages - s.final_ok,
                    s.messages
                ));
            }
            if s.misdirected > 0 {
                why.push(format!(
                    "{} edits sent to the wrong message id",
                    s.misdirected
                ));
            }
            if self.dead_lettered > 0 {
                why.push(format!("{} entries dead-lettered", self.dead_lettered));
            }
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
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

async fn spawn_node(url: &str, name: &str, w: &Workload, webhook: Option<&str>) -> Result<Node> {
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
        .args(webhook.into_iter().flat_map(|u| ["--webhook", u]))
        .args(["--wait-replicas", &w.wait_replicas.to_string()])
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
                .arg(w.envelope(j, now))
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

/// The dead-letter stream, read back (at most `limit` entries).
async fn dead_letters(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &Keys,
    limit: usize,
) -> Result<Vec<DeadLetter>> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(keys.dlq())
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(limit)
        .query_async(conn)
        .await?;
    let text = |v: Option<&redis::Value>| {
        v.and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
            .unwrap_or_default()
    };
    Ok(reply
        .ids
        .iter()
        .map(|e| {
            let payload: Option<Value> = serde_json::from_str(&text(e.map.get("payload"))).ok();
            let field = |k: &str| payload.as_ref().and_then(|p| p.get(k));
            DeadLetter {
                error_kind: text(e.map.get("error_kind")),
                kind_of_entry: match payload.as_ref() {
                    None => "<not JSON>".into(),
                    Some(_) => field("type")
                        .and_then(Value::as_str)
                        .unwrap_or("message")
                        .to_owned(),
                },
                channel_id: field("channel_id")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                seq: field("seq").and_then(Value::as_u64),
            }
        })
        .collect())
}

fn sigterm(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

/// What one workload's run gathered, before it is summarized.
#[derive(Debug, Default)]
struct Measured {
    finished: bool,
    wall: f64,
    /// `INFO commandstats` at the end of the drain.
    info: String,
    /// The harness's own commands since RESETSTAT, by command.
    harness: HashMap<String, u64>,
    hwm: Vec<u64>,
    /// The paced producer's publish times (µs), one per message.
    published: Vec<u64>,
    reports: Vec<NodeReport>,
    dead_lettered: u64,
    dlq: Vec<DeadLetter>,
    /// W6: the sink's requests in arrival order.
    hits: Vec<SinkHit>,
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
    let sink = w
        .streaming()
        .then(|| Sink::new(Duration::from_millis(w.sink_ms)));
    let served = match &sink {
        Some(s) => Some(s.serve().await?),
        None => None,
    };
    let hook = served.as_ref().map(|(u, _)| u.as_str());
    let mut nodes = Vec::new();
    for k in 0..w.nodes {
        nodes.push(spawn_node(url, &format!("gw-{k}"), w, hook).await?);
    }
    // From here on Redis counts only the drain: the preload and the nodes'
    // connection set-up are behind us. The harness counts its own commands.
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async::<()>(conn)
        .await?;
    let mut m = Measured {
        harness: HashMap::from([("config".to_owned(), 1)]),
        ..Measured::default()
    };
    let started = Instant::now();
    for node in &mut nodes {
        node.stdin.write_all(b"go\n").await?;
        node.stdin.flush().await?;
    }
    let producer = w
        .rate
        .map(|_| tokio::spawn(paced_producer(url.to_owned(), keys.clone(), w.clone())));
    loop {
        let produced = producer.as_ref().is_none_or(|p| p.is_finished());
        if produced {
            *m.harness.entry("xinfo".to_owned()).or_insert(0) += 1;
            if let Some((read, Some(0), 0)) = group_state(conn, &keys).await?
                && read >= w.n
            {
                m.finished = true;
                break;
            }
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
    m.wall = started.elapsed().as_secs_f64();
    m.info = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    m.hwm = nodes
        .iter()
        .filter_map(|n| vm_hwm_kb(Some(n.pid)))
        .collect();
    if let Some(p) = producer {
        m.published = p.await??;
    }

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
        m.reports.push(serde_json::from_slice::<NodeReport>(&text)?);
    }
    m.dead_lettered = redis::cmd("XLEN").arg(keys.dlq()).query_async(conn).await?;
    m.dlq = dead_letters(conn, &keys, 100_000).await?;
    if let (Some(sink), Some((_, task))) = (sink, served) {
        m.hits = sink.hits();
        task.abort();
    }
    Ok(summarize(w, m))
}

fn summarize(w: &Workload, m: Measured) -> Outcome {
    let n = w.n as f64;
    // Redis calls: everything after RESETSTAT but the harness's own commands.
    let mut commands = command_calls(&m.info);
    let mut harness = m.harness.clone();
    if !m.published.is_empty() {
        harness.insert("xadd".into(), m.published.len() as u64); // the paced producer's
    }
    for (c, k) in &harness {
        if let Some(x) = commands.get_mut(c) {
            *x = x.saturating_sub(*k);
        }
    }
    // The INFO that read the stats is not in them; no gateway sends INFO.
    commands.remove("info");
    commands.retain(|_, v| *v > 0);
    let total: u64 = commands.values().sum();
    let trips: u64 = commands
        .iter()
        .filter(|(c, _)| CLIENT_SENT.contains(&c.as_str()))
        .map(|(_, v)| v)
        .sum();

    // Correctness over all nodes: per channel, sends merged by send time.
    let mut all: Vec<Record> = Vec::new();
    for r in &m.reports {
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
    let mut lost = w.n - delivered;
    let mut sends: u64 = m.reports.iter().map(|r| r.sends).sum();
    let mut foreign: u64 = m.reports.iter().map(|r| r.foreign).sum();
    if w.lean {
        // No records: the nodes' own counts (duplicates across nodes unseen).
        delivered = m.reports.iter().map(|r| r.distinct_keys).sum();
        lost = w.n.saturating_sub(delivered);
        dups = m.reports.iter().map(|r| r.duplicates).sum();
        ooo = m.reports.iter().map(|r| r.out_of_order).sum();
    }
    let mut dead_letter_kinds = BTreeMap::new();
    for d in &m.dlq {
        *dead_letter_kinds.entry(d.error_kind.clone()).or_insert(0) += 1;
    }
    let mut note = None;
    let streaming = w.streaming().then(|| {
        let mut s = check_streaming(w, &m.hits, &m.dlq);
        let engine: Vec<u64> = m
            .reports
            .iter()
            .filter_map(|r| r.stats.get("coalesced").and_then(Value::as_u64))
            .collect();
        s.engine_coalesced = (!engine.is_empty()).then(|| engine.iter().sum());
        sends = m.hits.len() as u64;
        foreign += s.foreign;
        lost = s.lost;
        dups = s.duplicated;
        ooo = s.out_of_order;
        delivered = s.distinct_sends + s.distinct_edits;
        let unknown_edits = m
            .dlq
            .iter()
            .filter(|d| d.kind_of_entry == "edit" && d.error_kind == "unknown_type")
            .count();
        if unknown_edits > 0 {
            note = Some(format!(
                "this engine does not implement `edit`: {unknown_edits} of {} edits were \
                 dead-lettered as unknown_type",
                s.edits_published
            ));
        }
        s
    });
    let lat: Vec<u64> = all
        .iter()
        .map(|r| {
            let from = m
                .published
                .get(r[2] as usize)
                .copied()
                .unwrap_or(r[4] * 1000);
            r[3].saturating_sub(from)
        })
        .collect();
    let peak = m
        .hwm
        .iter()
        .copied()
        .chain(m.reports.iter().filter_map(|r| r.vm_hwm_kb))
        .max()
        .unwrap_or(0);
    Outcome {
        workload: w.clone(),
        finished: m.finished,
        wall_s: m.wall,
        msgs_per_s: n / m.wall,
        redis_calls_per_msg: total as f64 / n,
        round_trips_per_msg: trips as f64 / n,
        script_calls_per_msg: (total - trips) as f64 / n,
        commands,
        harness_calls: harness,
        latency_ms: Latency::of(lat),
        peak_rss_mib: peak as f64 / 1024.0,
        sends,
        delivered,
        lost,
        duplicated: dups,
        out_of_order: ooo,
        dead_lettered: m.dead_lettered,
        dead_letter_kinds,
        foreign_sends: foreign,
        node_out_of_order: m.reports.iter().map(|r| r.out_of_order).collect(),
        node_duplicates: m.reports.iter().map(|r| r.duplicates).collect(),
        node_stats: m.reports.into_iter().map(|r| r.stats).collect(),
        streaming,
        note,
    }
}

const HEADER: &str = "| workload | msgs | msgs/s | wall s | Redis calls/msg | round trips/msg | latency p50 / p95 / p99 / max ms | peak RSS MiB | lost | dup | out of order | dead-lettered |\n|---|---|---|---|---|---|---|---|---|---|---|---|";

fn row(o: &Outcome) -> String {
    let w = &o.workload;
    let l = &o.latency_ms;
    let latency = if w.lean {
        "– (lean)".to_owned()
    } else if w.streaming() {
        "– (webhook)".to_owned()
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

/// W6's own figures, one line.
fn streaming_line(o: &Outcome) -> Option<String> {
    let s = o.streaming.as_ref()?;
    let engine = s
        .engine_coalesced
        .map_or("no counter".to_owned(), |c| c.to_string());
    Some(format!(
        "{}: {} messages, {} edits published; requests received: {} send_message, {} \
         edit_message; edits coalesced {} (engine's own count: {engine}); dead-lettered edits \
         {}; final text right on {} of {} messages; misdirected edits {}",
        o.workload.name,
        s.messages,
        s.edits_published,
        s.send_requests,
        s.edit_requests,
        s.coalesced,
        s.edits_dead_lettered,
        s.final_ok,
        s.messages,
        s.misdirected,
    ))
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

/// The peer's figures (BullMQ on the W1 shape), as `b1.mjs` prints them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Peer {
    pub label: String,
    pub jobs_per_s: f64,
    pub cmds_per_job: Option<f64>,
    /// Peak RSS of the producer+worker process (`peak_rss_kb`, from
    /// `/usr/bin/time`), else its RSS at the end (`rss_mb`).
    pub rss_mib: Option<f64>,
    pub rss_is_peak: bool,
    pub duplicated: Option<u64>,
    pub out_of_order: Option<u64>,
}

impl Peer {
    pub fn from_json(v: &Value) -> Result<Peer> {
        let f = |k: &str| v.get(k).and_then(Value::as_f64);
        let u = |k: &str| v.get(k).and_then(Value::as_u64);
        let jobs_per_s = f("jobs_per_s").context("no `jobs_per_s` in the BullMQ figures")?;
        let peak = f("peak_rss_kb").map(|kb| kb / 1024.0);
        let label = format!(
            "BullMQ{}, W1 shape ({} jobs / {} ch), concurrency {}",
            v.get("bullmq_version")
                .and_then(Value::as_str)
                .map(|s| format!(" {s}"))
                .unwrap_or_default(),
            u("N").map_or("?".into(), |n| n.to_string()),
            u("C").map_or("?".into(), |n| n.to_string()),
            u("conc").map_or("?".into(), |n| n.to_string()),
        );
        Ok(Peer {
            label,
            jobs_per_s,
            cmds_per_job: f("cmds_per_job"),
            rss_is_peak: peak.is_some(),
            rss_mib: peak.or_else(|| f("rss_mb")),
            duplicated: u("dup"),
            out_of_order: u("order_violations"),
        })
    }
}

/// `12345.6` → `12,346`.
fn thousands(x: f64) -> String {
    let s = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// `x` to two decimals, rounded towards the `≥` target's side: a shown
/// ratio meets a two-decimal target exactly when the measured one does.
fn floor2(x: f64) -> f64 {
    (x * 100.0 + 1e-9).floor() / 100.0
}

/// `x` to two decimals, rounded up (for `≤` targets).
fn ceil2(x: f64) -> f64 {
    (x * 100.0 - 1e-9).ceil() / 100.0
}

/// The issue's targets, one row per run: (figure, target, met).
fn target_of(o: &Outcome, w1: Option<f64>, peer: Option<&Peer>) -> (String, String, Option<bool>) {
    let ratio_w1 = |min: f64| match w1 {
        Some(w1) => {
            let r = o.msgs_per_s / w1;
            (
                format!("{:.2}× W1", floor2(r)),
                format!("≥ {min}× W1"),
                Some(r >= min),
            )
        }
        None => ("– (no W1 in this run)".into(), format!("≥ {min}× W1"), None),
    };
    match o.workload.name.as_str() {
        "W1" => match peer {
            Some(p) => {
                let r = o.msgs_per_s / p.jobs_per_s;
                (
                    format!("{:.2}× BullMQ", floor2(r)),
                    format!("≥ 3× BullMQ ({} msgs/s)", thousands(3.0 * p.jobs_per_s)),
                    Some(r >= 3.0),
                )
            }
            None => ("– (no BullMQ figure)".into(), "≥ 3× BullMQ".into(), None),
        },
        "W2" => {
            let w = &o.workload;
            let ideal = w.n.div_ceil(w.channels) as f64 * w.delay_ms as f64 / 1000.0;
            let r = o.wall_s / ideal;
            (
                format!(
                    "wall {:.3} s = {:.2}× ideal ({ideal:.2} s)",
                    o.wall_s,
                    ceil2(r)
                ),
                "≤ 1.25× ideal".into(),
                Some(r <= 1.25),
            )
        }
        "W3" => ratio_w1(0.9),
        "W3x4" => ratio_w1(0.8),
        "W4" => ratio_w1(0.3),
        "W5" => (
            format!(
                "p50 {:.2} / p99 {:.2} ms",
                o.latency_ms.p50, o.latency_ms.p99
            ),
            "p99 ≤ 1 ms".into(),
            Some(o.latency_ms.samples > 0 && o.latency_ms.p99 <= 1.0),
        ),
        "W6" => match &o.streaming {
            Some(s) => (
                format!(
                    "edits sent {} / coalesced {} of {}; final text {}/{}",
                    s.edit_requests, s.coalesced, s.edits_published, s.final_ok, s.messages
                ),
                "final text on every message, nothing dead-lettered".into(),
                Some(o.failure().is_none()),
            ),
            None => ("–".into(), "–".into(), None),
        },
        "Q" => (
            format!(
                "peak RSS {:.1} MiB, {} queued",
                o.peak_rss_mib,
                thousands(o.workload.n as f64)
            ),
            "< 64 MiB".into(),
            Some(o.peak_rss_mib < 64.0),
        ),
        _ => ("–".into(), "–".into(), None),
    }
}

/// One table: every run's throughput, its ratio to BullMQ, the issue's
/// target for it, Redis commands per message, peak RSS and correctness.
pub fn targets_table(outcomes: &[Outcome], peer: Option<&Peer>) -> String {
    let mut t = String::from(
        "| run | msgs/s | × BullMQ | figure | target | met | Redis cmds/msg | peak RSS MiB | lost / dup / out of order |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    if let Some(p) = peer {
        t.push_str(&format!(
            "| {} | {} | 1.00 | – | – | – | {} | {}{} | – / {} / {} |\n",
            p.label,
            thousands(p.jobs_per_s),
            p.cmds_per_job.map_or("?".into(), |c| format!("{c:.2}")),
            p.rss_mib.map_or("?".into(), |r| format!("{r:.1}")),
            if p.rss_is_peak { "" } else { " (at exit)" },
            p.duplicated.map_or("?".into(), |d| d.to_string()),
            p.out_of_order.map_or("?".into(), |d| d.to_string()),
        ));
    }
    let w1 = outcomes
        .iter()
        .find(|o| o.workload.name == "W1")
        .map(|o| o.msgs_per_s);
    for o in outcomes {
        let w = &o.workload;
        let (figure, target, met) = target_of(o, w1, peer);
        let failure = o.failure();
        let met = match (met, &failure) {
            (_, Some(_)) => "**no** (correctness)",
            (Some(true), None) => "yes",
            (Some(false), None) => "**no**",
            (None, None) => "–",
        };
        t.push_str(&format!(
            "| {}{} | {} | {} | {figure} | {target} | {met} | {:.2} | {:.1} | {} / {} / {}{} |\n",
            w.name,
            if w.nodes > 1 {
                format!(" ({} nodes)", w.nodes)
            } else {
                String::new()
            },
            thousands(o.msgs_per_s),
            peer.map_or("–".into(), |p| format!(
                "{:.2}",
                o.msgs_per_s / p.jobs_per_s
            )),
            o.redis_calls_per_msg,
            o.peak_rss_mib,
            o.lost,
            o.duplicated,
            o.out_of_order,
            if o.dead_lettered > 0 {
                format!(" ({} dead-lettered)", o.dead_lettered)
            } else {
                String::new()
            },
        ));
    }
    t
}

/// The workloads `args` asks for, in order.
fn workloads_of(args: &BenchArgs) -> Result<Vec<Workload>> {
    let mut names = if args.workloads.is_empty() {
        DEFAULT_WORKLOADS.iter().map(|s| s.to_string()).collect()
    } else {
        args.workloads.clone()
    };
    if args.queued.is_some() && !names.iter().any(|n| n.eq_ignore_ascii_case("Q")) {
        names.push("Q".into());
    }
    names
        .iter()
        .map(|n| {
            let mut w = Workload::named(n, args.smoke, args.n, args.channels)?;
            if w.name == "Q"
                && let Some(q) = args.queued.filter(|q| *q > 0)
            {
                w.n = q;
                w.what = format!(
                    "queued backlog, one lean gateway, {q} msgs over {} channels",
                    w.channels
                );
            }
            w.lean |= args.lean;
            if args.wait_replicas > 0 {
                w.wait_replicas = args.wait_replicas;
                w.what = format!(
                    "{}, commits wait for {} replica(s)",
                    w.what, args.wait_replicas
                );
            }
            if let Some(k) = args.nodes.filter(|k| *k > 0) {
                w.nodes = k;
                w.what = format!("{}, {k} gateway nodes", w.what);
            }
            Ok(w)
        })
        .collect()
}

/// `stargazer bench`: run the workloads, print the tables, write the JSON.
/// Fails (after printing everything) when a correctness check fails.
pub async fn run(args: BenchArgs) -> Result<()> {
    if !args.shards.is_empty() {
        if args.shards.contains(&0) {
            bail!("--shards: each count must be at least 1");
        }
        let (per, channels) = if args.smoke { (200, 20) } else { (2_000, 20) };
        let per = args.n.map_or(per, |n| (n / 10).max(1));
        let channels = args.channels.map_or(channels, |c| (c / 10).max(1));
        let mut counts = vec![0];
        counts.extend(&args.shards);
        let runs =
            crate::bench_shards::run(&counts, per, channels, Duration::from_secs(args.timeout_s))
                .await?;
        println!("{}", crate::bench_shards::HEADER);
        for r in &runs {
            println!("{}", crate::bench_shards::row(r));
        }
        return Ok(());
    }
    let workloads = workloads_of(&args)?;
    let peer = match &args.bullmq_json {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let v: Value = serde_json::from_str(text.trim())
                .with_context(|| format!("{} is not JSON", path.display()))?;
            Some(Peer::from_json(&v)?)
        }
        None => None,
    };
    let bin = std::env::var("STARGAZER_REDIS_SERVER").ok();
    let server = crate::redis_server::RedisServer::start(bin.as_deref())
        .context("starting a private redis-server")?;
    let url = server.url();
    let client = redis::Client::open(url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let version = redis_version(&mut conn).await.unwrap_or_default();
    eprintln!("private redis-server {version} at {url}");
    let _replicas = start_replicas(bin.as_deref(), server.port(), args.wait_replicas, &mut conn)
        .await
        .context("starting replicas for --wait-replicas")?;
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
    for o in &outcomes {
        if let Some(line) = streaming_line(o) {
            println!("\n{line}");
        }
        if let Some(note) = &o.note {
            println!("{}: NOTE: {note}", o.workload.name);
        }
        if !o.dead_letter_kinds.is_empty() {
            let kinds: Vec<String> = o
                .dead_letter_kinds
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            println!(
                "{}: dead-lettered by error_kind: {}",
                o.workload.name,
                kinds.join(", ")
            );
        }
    }
    println!(
        "\nRedis calls per message, by command (INFO commandstats over the drain only: \
         preload excluded, commands inside scripts included, the harness's own subtracted):"
    );
    for o in &outcomes {
        println!("  {}", breakdown(o));
    }
    println!(
        "\n## Targets{}{}\n",
        if peer.is_some() {
            " (Stargazer vs BullMQ, one run, this machine)"
        } else {
            ""
        },
        if args.smoke || args.n.is_some() || args.channels.is_some() {
            "\n\nNot the SPEC's sizes (--smoke, --n or --channels): the ratios are not the targets' own."
        } else {
            ""
        }
    );
    print!("{}", targets_table(&outcomes, peer.as_ref()));
    if let Some(path) = &args.json {
        write_json(path, &version, &outcomes, peer.as_ref())?;
    }
    let bad: Vec<String> = outcomes
        .iter()
        .filter_map(|o| {
            o.failure()
                .map(|why| format!("{} ({why})", o.workload.name))
        })
        .collect();
    if !bad.is_empty() {
        bail!("correctness failure in {}", bad.join(", "));
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

fn write_json(path: &Path, version: &str, outcomes: &[Outcome], peer: Option<&Peer>) -> Result<()> {
    let doc = json!({
        "redis_version": version,
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "bullmq": peer,
        "outcomes": outcomes,
    });
    std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// `n` replicas of the server on `port`, each in sync before this returns.
async fn start_replicas(
    bin: Option<&str>,
    port: u16,
    n: u32,
    conn: &mut redis::aio::MultiplexedConnection,
) -> Result<Vec<crate::redis_server::RedisServer>> {
    let mut replicas = Vec::new();
    for _ in 0..n {
        let r = crate::redis_server::RedisServer::start_with(bin, |_, _| {
            vec!["--replicaof".into(), "127.0.0.1".into(), port.to_string()]
        })?;
        replicas.push(r);
    }
    if n == 0 {
        return Ok(replicas);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(conn)
            .await?;
        let online = info.matches("state=online").count();
        if online >= n as usize {
            eprintln!("{n} replica(s) online; every commit waits for them");
            return Ok(replicas);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "replicas did not come online: {info}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    fn w6_is_a_message_then_its_edits_by_target_key() {
        let w = Workload::named("w6", false, Some(5), None).unwrap();
        assert_eq!((w.channels, w.edits, w.n), (50, 40, 50 * 41));
        let m: Value = serde_json::from_str(&w.envelope(3, 9)).unwrap();
        assert_eq!(m["type"], "message");
        assert_eq!(m["channel_id"], "c3");
        assert_eq!(m["message_key"], "sg:msg:w6:c3");
        assert_eq!(m["seq"], 1);
        let e: Value = serde_json::from_str(&w.envelope(50 * 2 + 3, 9)).unwrap();
        assert_eq!(e["type"], "edit");
        assert_eq!(e["target_key"], "sg:msg:w6:c3");
        assert_eq!(e["seq"], 3);
        assert_eq!(e["text"], "reply c3: t1 t2");
        let last: Value = serde_json::from_str(&w.envelope(w.n - 1, 9)).unwrap();
        assert_eq!(last["seq"], 41);
        assert_eq!(last["text"], partial_text(49, 40));
    }

    #[test]
    fn workload_names_and_the_queued_run() {
        let w = Workload::named("w3x4", false, None, None).unwrap();
        assert_eq!((w.name.as_str(), w.nodes, w.n), ("W3x4", 4, 20_000));
        let args = BenchArgs {
            workloads: vec!["W1".into()],
            n: None,
            channels: None,
            nodes: None,
            lean: false,
            queued: Some(1_000_000),
            bullmq_json: None,
            json: None,
            smoke: false,
            timeout_s: 600,
            wait_replicas: 0,
            shards: Vec::new(),
        };
        let ws = workloads_of(&args).unwrap();
        assert_eq!(ws.len(), 2);
        assert_eq!(
            (ws[1].name.as_str(), ws[1].n, ws[1].lean),
            ("Q", 1_000_000, true)
        );
        assert!(!ws[0].lean);
        assert!(Workload::named("W7", false, None, None).is_err());
    }

    fn send(k: u64, id: &str) -> SinkHit {
        SinkHit {
            action: "send_message".into(),
            channel_id: Some(format!("c{k}")),
            seq: Some(1),
            text: Some("x".into()),
            message_key: Some(format!("sg:msg:w6:c{k}")),
            message_id: None,
            answered: Some(id.into()),
        }
    }

    fn edit(k: u64, n: u64, id: &str) -> SinkHit {
        SinkHit {
            action: "edit_message".into(),
            channel_id: Some(format!("c{k}")),
            seq: Some(n + 1),
            text: Some(partial_text(k, n)),
            message_key: Some("sg:bench:1-0".into()),
            message_id: Some(id.into()),
            answered: None,
        }
    }

    #[test]
    fn streaming_counts_coalesced_edits_and_checks_the_final_text() {
        let mut w = Workload::named("W6", true, None, Some(2)).unwrap();
        w.edits = 3;
        // c0: send, edit 1, edit 3 (2 coalesced) — right. c1: send, edit 3, then
        // edit 2 late (out of order, final text wrong) and to a wrong id.
        let hits = vec![
            send(0, "a"),
            send(1, "b"),
            edit(0, 1, "a"),
            edit(1, 3, "b"),
            edit(0, 3, "a"),
            edit(1, 2, "zz"),
        ];
        let s = check_streaming(&w, &hits, &[]);
        assert_eq!((s.send_requests, s.edit_requests), (2, 4));
        assert_eq!(s.coalesced, 6 - 4);
        assert_eq!(s.final_ok, 1);
        assert_eq!(s.out_of_order, 1);
        assert_eq!(s.misdirected, 1);
        assert_eq!((s.lost, s.duplicated, s.foreign), (0, 0, 0));
        assert_eq!((s.distinct_sends, s.distinct_edits), (2, 4));
    }

    #[test]
    fn streaming_on_an_engine_without_edit() {
        let mut w = Workload::named("W6", true, None, Some(2)).unwrap();
        w.edits = 2;
        let dlq: Vec<DeadLetter> = (0..2)
            .flat_map(|k| {
                (2..=3).map(move |seq| DeadLetter {
                    error_kind: "unknown_type".into(),
                    kind_of_entry: "edit".into(),
                    channel_id: Some(format!("c{k}")),
                    seq: Some(seq),
                })
            })
            .collect();
        let s = check_streaming(&w, &[send(0, "a"), send(0, "a")], &dlq);
        assert_eq!(s.edits_dead_lettered, 4);
        assert_eq!(s.coalesced, 0);
        assert_eq!(s.final_ok, 0);
        assert_eq!(s.lost, 1); // c1's message: neither sent nor dead-lettered
        assert_eq!(s.duplicated, 1);
    }

    #[test]
    fn the_sink_answers_sends_with_fresh_ids() {
        let sink = Sink::new(Duration::ZERO);
        let a = sink
            .hit(Some("k"), br#"{"action":"send_message","channel_id":"c1","seq":1,"text":"t","message_key":"sg:msg:w6:c1"}"#)
            .unwrap();
        let b = sink
            .hit(None, br#"{"action":"edit_message","channel_id":"c1","seq":2,"text":"t2","message_id":"w6m-1"}"#)
            .unwrap();
        assert_eq!(a["message_id"], "w6m-1");
        assert_eq!(b["message_id"], "w6m-1");
        assert!(sink.hit(None, b"nope").is_none());
        let hits = sink.hits();
        assert_eq!(hits.len(), 3);
        assert_eq!(hits[1].message_id.as_deref(), Some("w6m-1"));
        assert_eq!(hits[0].answered.as_deref(), Some("w6m-1"));
    }

    #[test]
    fn commandstats_fold_subcommands() {
        let info = "# Commandstats\r\ncmdstat_evalsha:calls=10,usec=5\r\ncmdstat_xinfo|groups:calls=3,usec=1\r\ncmdstat_client|setinfo:calls=2,usec=1\r\ncmdstat_client|list:calls=1,usec=1\r\n";
        let c = command_calls(info);
        assert_eq!(c["evalsha"], 10);
        assert_eq!(c["xinfo"], 3);
        assert_eq!(c["client"], 3);
    }

    fn report(records: Vec<Record>) -> NodeReport {
        NodeReport {
            sends: records.len() as u64,
            distinct_keys: 0,
            duplicates: 0,
            out_of_order: 0,
            foreign: 0,
            vm_hwm_kb: Some(1024),
            stats: serde_json::Value::Null,
            records,
        }
    }

    #[test]
    fn merged_order_and_duplicates() {
        let w = Workload::named("W1", true, Some(4), Some(2)).unwrap();
        // Channel 0: seq 2 sent (node b) before seq 1 (node a); key 1 sent twice.
        let a = report(vec![[0, 1, 0, 20, 0], [1, 1, 1, 5, 0]]);
        let b = report(vec![[0, 2, 2, 10, 0], [1, 1, 1, 30, 0]]);
        let m = Measured {
            finished: true,
            wall: 1.0,
            reports: vec![a, b],
            ..Measured::default()
        };
        let o = summarize(&w, m);
        assert_eq!(o.out_of_order, 2); // c0 seq 1 after 2; c1 seq 1 again
        assert_eq!(o.duplicated, 1);
        assert_eq!(o.delivered, 3);
        assert_eq!(o.lost, 1);
        assert_eq!(o.peak_rss_mib, 1.0);
        assert!(o.failure().is_some());
    }

    #[test]
    fn only_the_drain_is_counted_and_the_harness_is_subtracted_exactly() {
        let w = Workload::named("W1", true, Some(10), Some(2)).unwrap();
        let info = "cmdstat_config|resetstat:calls=1\r\ncmdstat_xinfo|groups:calls=7\r\ncmdstat_evalsha:calls=4\r\ncmdstat_hset:calls=20\r\ncmdstat_xadd:calls=3\r\n";
        let m = Measured {
            finished: true,
            wall: 1.0,
            info: info.into(),
            harness: HashMap::from([("config".into(), 1), ("xinfo".into(), 7)]),
            published: vec![0, 0, 0],
            ..Measured::default()
        };
        let o = summarize(&w, m);
        assert_eq!(o.commands.len(), 2, "{:?}", o.commands);
        assert_eq!(o.redis_calls_per_msg, 2.4);
        assert_eq!(o.round_trips_per_msg, 0.4);
        assert_eq!(o.script_calls_per_msg, 2.0);
    }

    #[test]
    fn the_targets_table_compares_with_bullmq() {
        let peer = Peer::from_json(&json!({"N":20000,"C":200,"conc":50,"jobs_per_s":20000,
            "cmds_per_job":23.0,"rss_mb":119,"dup":0,"order_violations":0,"peak_rss_kb":122880}))
        .unwrap();
        assert_eq!(peer.rss_mib, Some(120.0));
        let mk = |name: &str, rate: f64| {
            let w = Workload::named(name, false, None, None).unwrap();
            let mut o = summarize(
                &w,
                Measured {
                    finished: true,
                    wall: 1.0,
                    ..Measured::default()
                },
            );
            o.msgs_per_s = rate;
            o.lost = 0;
            o
        };
        let t = targets_table(&[mk("W1", 70_000.0), mk("W3", 56_000.0)], Some(&peer));
        assert!(
            t.contains("| W1 | 70,000 | 3.50 | 3.50× BullMQ | ≥ 3× BullMQ (60,000 msgs/s) | yes |"),
            "{t}"
        );
        assert!(t.contains("0.80× W1 | ≥ 0.9× W1 | **no** |"), "{t}");
        let t = targets_table(&[mk("W1", 70_000.0), mk("W3x4", 55_990.0)], None);
        assert!(t.contains("0.79× W1 | ≥ 0.8× W1 | **no** |"), "{t}");
        assert_eq!((floor2(0.8), ceil2(1.25), ceil2(1.2501)), (0.8, 1.25, 1.26));
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
    }

    #[test]
    fn percentiles_nearest_rank() {
        let l = Latency::of((1..=100).map(|i| i * 1000).collect());
        assert_eq!((l.p50, l.p95, l.p99, l.max), (50.0, 95.0, 99.0, 100.0));
    }
}
