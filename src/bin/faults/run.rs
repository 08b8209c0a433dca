//! One run, start to finish: start Redis, the sink and the gateways; publish
//! while executing the fault schedule; heal every fault; drain (bounded);
//! stop the gateways with SIGTERM; collect the history for the checker.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use redis::aio::ConnectionManager;
use redis::streams::StreamRangeReply;
use tokio_util::sync::CancellationToken;

use super::check::{DeadLetter, GwEvent, GwEventKind, History, Outage};
use super::plan::{self, Planned, Step};
use super::procs::{Gateway, GatewayConf, Redis, create_cluster};
use super::producer::{self, Ledger, ProducerConf};
use super::sink::Sink;
use super::{now_ms, poll_until};

/// What the command line asked for.
#[derive(Debug, Clone)]
pub struct Settings {
    pub seed: u64,
    pub duration: Duration,
    pub gateways: usize,
    pub channels: usize,
    pub rate: f64,
    pub float_share: f64,
    pub platform: String,
    pub stargazer: PathBuf,
    pub redis_server: String,
    pub drain: Duration,
    pub hang: Duration,
    pub keep: bool,
    pub gateway_log: String,
    /// Run the workload without a fault schedule (a control run).
    pub no_faults: bool,
    /// Run on a Redis Cluster of three primaries (`--cluster`); the Redis
    /// faults strike the primary that holds the platform's slot.
    pub cluster: bool,
    /// `redis-cli`, to create the cluster.
    pub redis_cli: String,
}

/// What a run saw, beyond the history the checker judges.
#[derive(Debug)]
pub struct Observed {
    pub history: History,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u64>,
    /// Gateways that exited without being told to (incarnation, status, log tail).
    pub self_exits: Vec<(String, String, String)>,
    /// After SIGTERM: (incarnation, how it ended, whether that was exit 0).
    pub shutdown: Vec<(String, String, bool)>,
    /// Whether everything concluded within `--drain`, and how long it took.
    pub drained: bool,
    pub drain_secs: f64,
    pub seq_unknown: u64,
    pub xadd_unknown: u64,
    pub xadd_found: u64,
    pub workdir: Option<PathBuf>,
}

/// The run's directory (configs, gateway logs, Redis's AOF), removed at the
/// end unless `--keep`.
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A gateway slot: the consumer name its next same-name restart uses, and
/// the process now running in it.
struct Slot {
    name: String,
    generation: u32,
    gateway: Option<Gateway>,
}

/// The processes and the record of what was done to them. Dropping it kills
/// every child (see `procs`).
struct World {
    t0: Instant,
    /// The server the platform's keys live on (in a cluster, the primary
    /// of its slot): the Redis faults strike it.
    redis: Redis,
    /// In a cluster, the other primaries (the message cache's keys are
    /// spread over them too); never faulted.
    others: Vec<Redis>,
    conf: GatewayConf,
    slots: Vec<Slot>,
    sink: Sink,
    faults: BTreeMap<String, u64>,
    gw_events: Vec<GwEvent>,
    outages: Vec<Outage>,
    self_exits: Vec<(String, String, String)>,
}

impl World {
    fn log(&self, msg: impl AsRef<str>) {
        println!(
            "[{:7.1}s] {}",
            self.t0.elapsed().as_secs_f64(),
            msg.as_ref()
        );
    }

    fn start_slot(&mut self, slot: usize, new_name: bool) -> Result<()> {
        let s = &mut self.slots[slot];
        s.generation += 1;
        if new_name {
            s.name = format!("gw-{slot}-{}", s.generation);
        }
        let incarnation = format!("g{slot}.{}", s.generation);
        let g = self.conf.spawn(&incarnation, &s.name)?;
        let msg = format!("start {incarnation} as {} (pid {})", g.consumer, g.pid());
        s.gateway = Some(g);
        self.log(msg);
        Ok(())
    }

    fn gateway(&mut self, slot: usize) -> Option<&mut Gateway> {
        self.slots[slot].gateway.as_mut()
    }

    fn close_gw_event(&mut self, incarnation: &str) {
        let now = now_ms();
        if let Some(e) = self
            .gw_events
            .iter_mut()
            .rev()
            .find(|e| e.incarnation == incarnation && e.until_ms.is_none())
        {
            e.until_ms = Some(now);
        }
    }

    fn close_outage(&mut self) {
        let now = now_ms();
        if let Some(o) = self.outages.last_mut().filter(|o| o.until_ms.is_none()) {
            o.until_ms = Some(now);
        }
    }

    async fn apply(&mut self, step: Step) -> Result<()> {
        if let Some(kind) = step.fault_kind() {
            *self.faults.entry(kind).or_default() += 1;
        }
        match step {
            Step::GwKill { slot, new_name } => {
                if let Some(mut g) = self.slots[slot].gateway.take() {
                    g.proc().kill();
                    self.gw_events.push(GwEvent {
                        incarnation: g.incarnation.clone(),
                        at_ms: now_ms(),
                        kind: GwEventKind::Kill,
                        until_ms: Some(now_ms()),
                    });
                    let then = if new_name { "new name" } else { "same name" };
                    self.log(format!(
                        "SIGKILL {} ({}); restart under {then} later",
                        g.incarnation, g.consumer
                    ));
                }
            }
            Step::GwStart { slot, new_name } => {
                if self.slots[slot].gateway.is_none() {
                    self.start_slot(slot, new_name)?;
                }
            }
            Step::GwStop { slot, long } => {
                if let Some(g) = self.gateway(slot).filter(|g| !g.stopped) {
                    g.proc().signal("STOP")?;
                    g.stopped = true;
                    let inc = g.incarnation.clone();
                    self.gw_events.push(GwEvent {
                        incarnation: inc.clone(),
                        at_ms: now_ms(),
                        kind: if long {
                            GwEventKind::StopLong
                        } else {
                            GwEventKind::StopShort
                        },
                        until_ms: None,
                    });
                    self.log(format!(
                        "SIGSTOP {inc} ({})",
                        if long { "long" } else { "short" }
                    ));
                }
            }
            Step::GwCont { slot } => {
                if let Some(g) = self.gateway(slot).filter(|g| g.stopped) {
                    g.proc().signal("CONT")?;
                    g.stopped = false;
                    let inc = g.incarnation.clone();
                    self.close_gw_event(&inc);
                    self.log(format!("SIGCONT {inc}"));
                }
            }
            Step::RedisStop => {
                self.redis.stop()?;
                self.outages.push(Outage {
                    from_ms: now_ms(),
                    until_ms: None,
                });
                self.log("SIGSTOP redis");
            }
            Step::RedisCont => {
                if self.redis.is_stopped() {
                    self.redis.cont()?;
                    self.close_outage();
                    self.log("SIGCONT redis");
                }
            }
            Step::RedisKill => {
                self.redis.kill();
                self.outages.push(Outage {
                    from_ms: now_ms(),
                    until_ms: None,
                });
                self.log("SIGKILL redis");
            }
            Step::RedisStart => {
                if !self.redis.is_running() {
                    self.redis.restart().await?;
                    self.close_outage();
                    self.log("redis restarted from its AOF, answering PING");
                }
            }
            Step::PlatformOn { id, fault, scope } => {
                self.log(format!(
                    "platform fault #{id}: {} on {scope:?}",
                    fault.name()
                ));
                self.sink.fault_on(id, fault, scope);
            }
            Step::PlatformOff { id } => {
                self.sink.fault_off(id);
                self.log(format!("platform fault #{id} over"));
            }
        }
        Ok(())
    }

    /// Notices gateways that exited by themselves, and restarts them.
    fn monitor(&mut self) -> Result<()> {
        for slot in 0..self.slots.len() {
            let Some(g) = self.slots[slot].gateway.as_mut() else {
                continue;
            };
            if let Some(status) = g.proc().exited() {
                let g = self.slots[slot].gateway.take().expect("checked above");
                let status = describe(status);
                self.log(format!(
                    "{} exited by itself ({status}); restarting it",
                    g.incarnation
                ));
                self.self_exits
                    .push((g.incarnation.clone(), status, g.log_tail(5)));
                self.start_slot(slot, false)?;
            }
        }
        Ok(())
    }

    /// Ends every fault: Redis running, every gateway running, the platform
    /// answering normally.
    async fn heal(&mut self) -> Result<()> {
        self.sink.clear_faults();
        if self.redis.is_stopped() {
            self.redis.cont()?;
            self.log("heal: SIGCONT redis");
        }
        if !self.redis.is_running() {
            self.redis.restart().await?;
            self.log("heal: redis restarted");
        }
        self.close_outage();
        for slot in 0..self.slots.len() {
            match self.slots[slot].gateway.as_mut() {
                Some(g) if g.stopped => {
                    g.proc().signal("CONT")?;
                    g.stopped = false;
                    let inc = g.incarnation.clone();
                    self.close_gw_event(&inc);
                    self.log(format!("heal: SIGCONT {inc}"));
                }
                Some(_) => {}
                None => self.start_slot(slot, false)?,
            }
        }
        Ok(())
    }

    async fn wait_ready(&mut self, within: Duration) -> Vec<String> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()
            .expect("an HTTP client");
        let mut not_ready = Vec::new();
        for s in &self.slots {
            let Some(g) = &s.gateway else { continue };
            let ok = poll_until(within, Duration::from_millis(100), || g.ready(&client)).await;
            if !ok {
                not_ready.push(g.incarnation.clone());
            }
        }
        not_ready
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown".into(),
    }
}

/// Reads the dead-letter stream incrementally (each entry once: an
/// oversized entry's payload is 8 MiB).
struct DlqReader {
    key: String,
    last: String,
    entries: Vec<DeadLetter>,
}

impl DlqReader {
    async fn pull(&mut self, conn: &mut ConnectionManager) -> Result<()> {
        loop {
            let reply: StreamRangeReply = redis::cmd("XRANGE")
                .arg(&self.key)
                .arg(format!("({}", self.last))
                .arg("+")
                .arg("COUNT")
                .arg(20)
                .query_async(conn)
                .await
                .context("XRANGE of the dead-letter stream")?;
            for e in &reply.ids {
                let field = |k: &str| match e.map.get(k) {
                    Some(redis::Value::BulkString(b)) => {
                        String::from_utf8_lossy(&b[..b.len().min(300)]).into_owned()
                    }
                    Some(redis::Value::SimpleString(s)) => s.clone(),
                    _ => String::new(),
                };
                self.entries.push(DeadLetter {
                    original_id: field("original_id"),
                    error_kind: field("error_kind"),
                    error: field("error"),
                    failed_ms: field("failed_ms").parse().unwrap_or(0),
                });
                self.last = e.id.clone();
            }
            if reply.ids.len() < 20 {
                return Ok(());
            }
        }
    }
}

/// `XPENDING <stream> <group>`: the group's pending count.
async fn pending(conn: &mut ConnectionManager, stream: &str, group: &str) -> Result<u64> {
    let v: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(conn)
        .await
        .with_context(|| format!("XPENDING {stream} {group}"))?;
    match v {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => Ok(*n as u64),
            _ => bail!("unexpected XPENDING reply {items:?}"),
        },
        other => bail!("unexpected XPENDING reply {other:?}"),
    }
}

/// The ids in the group's pending list.
async fn pending_ids(
    conn: &mut ConnectionManager,
    stream: &str,
    group: &str,
) -> Result<std::collections::HashSet<String>> {
    let mut ids = std::collections::HashSet::new();
    let mut from = "-".to_owned();
    loop {
        let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .arg(&from)
            .arg("+")
            .arg(1000)
            .query_async(conn)
            .await
            .with_context(|| format!("XPENDING {stream} {group} - +"))?;
        let full = rows.len() == 1000;
        if let Some(last) = rows.last() {
            from = format!("({}", last.0);
        }
        ids.extend(rows.into_iter().map(|r| r.0));
        if !full {
            return Ok(ids);
        }
    }
}

/// The group's `last-delivered-id`, from `XINFO GROUPS`.
async fn last_delivered_id(
    conn: &mut ConnectionManager,
    stream: &str,
    group: &str,
) -> Result<Option<String>> {
    let groups: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
        .context("XINFO GROUPS")?;
    let text = |v: Option<&redis::Value>| match v {
        Some(redis::Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
        Some(redis::Value::SimpleString(s)) => Some(s.clone()),
        _ => None,
    };
    Ok(groups
        .iter()
        .find(|g| text(g.get("name")).as_deref() == Some(group))
        .and_then(|g| text(g.get("last-delivered-id"))))
}

/// Every key in the database.
async fn all_keys(conn: &mut ConnectionManager) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .context("SCAN")?;
        keys.extend(
            batch
                .into_iter()
                .map(|k| String::from_utf8_lossy(&k).into_owned()),
        );
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

/// `--cluster`: three primaries joined by `redis-cli --cluster create`;
/// returns the one holding the platform's slot first, then the others.
async fn start_cluster(s: &Settings, work: &std::path::Path) -> Result<(Redis, Vec<Redis>)> {
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(
            Redis::start_cluster_node(&s.redis_server, &work.join(format!("redis-{i}"))).await?,
        );
    }
    create_cluster(&s.redis_cli, &nodes).await?;
    let mut c = redis::Client::open(nodes[0].url())?
        .get_multiplexed_async_connection()
        .await?;
    let slot: u64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(format!("sg:{{{}}}:outbound", s.platform))
        .query_async(&mut c)
        .await?;
    let mut owner = None;
    for (i, n) in nodes.iter().enumerate() {
        if n.own_slots()
            .await?
            .iter()
            .any(|(lo, hi)| (*lo..=*hi).contains(&slot))
        {
            owner = Some(i);
        }
    }
    let owner = owner.with_context(|| format!("no node serves slot {slot}"))?;
    let first = nodes.remove(owner);
    Ok((first, nodes))
}

pub async fn run(s: &Settings) -> Result<Observed> {
    let t0 = Instant::now();
    let work = WorkDir {
        path: std::env::temp_dir().join(format!(
            "stargazer-faults-{}-{}",
            std::process::id(),
            s.seed
        )),
        keep: s.keep,
    };
    std::fs::create_dir_all(&work.path)?;
    if !s.stargazer.is_file() {
        bail!(
            "no stargazer binary at {} (build it with `cargo build --bins`, or pass --stargazer)",
            s.stargazer.display()
        );
    }
    let (redis, others) = if s.cluster {
        start_cluster(s, &work.path).await?
    } else {
        (
            Redis::start(&s.redis_server, &work.path.join("redis")).await?,
            Vec::new(),
        )
    };
    let cluster = s.cluster.then(|| {
        std::iter::once(&redis)
            .chain(&others)
            .map(Redis::url)
            .collect::<Vec<_>>()
    });
    let (sink, sink_base) = Sink::start(s.seed, s.hang).await?;
    let conf = GatewayConf {
        binary: s.stargazer.clone(),
        redis_url: redis.url(),
        cluster: cluster.clone(),
        platform: s.platform.clone(),
        sink_base,
        dir: work.path.clone(),
        log_level: s.gateway_log.clone(),
    };
    let mut world = World {
        t0,
        redis,
        others,
        conf,
        slots: (0..s.gateways)
            .map(|i| Slot {
                name: format!("gw-{i}"),
                generation: 0,
                gateway: None,
            })
            .collect(),
        sink: sink.clone(),
        faults: BTreeMap::new(),
        gw_events: Vec::new(),
        outages: Vec::new(),
        self_exits: Vec::new(),
    };
    if s.cluster {
        world.log(format!(
            "redis cluster of {} primaries (AOF, fsync always, no replicas) in {}; \
             the platform's slot is on {}, which the Redis faults strike",
            1 + world.others.len(),
            work.path.display(),
            world.redis.url(),
        ));
    } else {
        world.log(format!(
            "redis {} (AOF, fsync always) in {}",
            world.redis.url(),
            work.path.display()
        ));
    }
    for slot in 0..s.gateways {
        world.start_slot(slot, false)?;
    }
    let not_ready = world.wait_ready(Duration::from_secs(60)).await;
    if !not_ready.is_empty() {
        let tails: Vec<String> = world
            .slots
            .iter()
            .filter_map(|sl| sl.gateway.as_ref())
            .map(|g| format!("--- {} ---\n{}", g.incarnation, g.log_tail(15)))
            .collect();
        bail!(
            "gateways {not_ready:?} not ready within 60 s:\n{}",
            tails.join("\n")
        );
    }
    world.log(format!("{} gateways ready; publishing", s.gateways));

    let ledger = Arc::new(Ledger::default());
    let stop = CancellationToken::new();
    let producers = producer::spawn(
        ProducerConf {
            redis_url: world.redis.url(),
            platform: s.platform.clone(),
            channels: s.channels,
            seed: s.seed,
            rate: s.rate,
            float_share: s.float_share,
        },
        ledger.clone(),
        stop.clone(),
    )
    .await?;

    // The fault phase.
    let plan: Vec<Planned> = if s.no_faults {
        Vec::new()
    } else {
        plan::generate(s.seed, s.duration, s.gateways, s.channels)
    };
    let start = tokio::time::Instant::now();
    let end = start + s.duration;
    let mut steps = plan.into_iter().peekable();
    let mut monitor = tokio::time::interval(Duration::from_millis(500));
    let mut progress = tokio::time::interval(Duration::from_secs(15));
    loop {
        let next = steps
            .peek()
            .map(|p| start + p.at)
            .filter(|t| *t < end)
            .unwrap_or(end);
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {
                if next >= end {
                    break;
                }
                let p = steps.next().expect("peeked");
                world.apply(p.step).await?;
            }
            _ = monitor.tick() => world.monitor()?,
            _ = progress.tick() => world.log(format!(
                "published {}, delivered {}, sink requests {}",
                ledger.len(), sink.delivered_count(), sink.request_count()
            )),
        }
    }
    world.log("fault phase over: healing every fault");
    world.heal().await?;
    stop.cancel();
    for h in producers {
        match tokio::time::timeout(Duration::from_secs(120), h).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(e.context("a producer failed")),
            Ok(Err(e)) => bail!("a producer panicked: {e}"),
            Err(_) => bail!("a producer did not stop within 120 s"),
        }
    }
    let published = ledger.snapshot();
    world.log(format!(
        "producers stopped: {} entries published; draining (at most {:?})",
        published.len(),
        s.drain
    ));

    // Drain: until every entry is delivered or dead-lettered and nothing is
    // pending, or the bound.
    let stream = format!("sg:{{{}}}:outbound", s.platform);
    let group = format!("sg:gateway:{}", s.platform);
    let cfg = redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(Duration::from_secs(30)))
        .set_connection_timeout(Some(Duration::from_secs(5)));
    let mut conn = redis::Client::open(world.redis.url())?
        .get_connection_manager_with_config(cfg)
        .await?;
    let mut dlq = DlqReader {
        key: format!("sg:{{{}}}:outbound:dlq", s.platform),
        last: "0-0".into(),
        entries: Vec::new(),
    };
    let drain_start = Instant::now();
    let deadline = drain_start + s.drain;
    let mut last_print = Instant::now();
    let drained = loop {
        world.monitor()?;
        dlq.pull(&mut conn).await?;
        let dead: std::collections::HashSet<&str> =
            dlq.entries.iter().map(|d| d.original_id.as_str()).collect();
        let open = published
            .iter()
            .filter(|p| !sink.is_delivered(&p.id) && !dead.contains(p.id.as_str()))
            .count();
        let pend = pending(&mut conn, &stream, &group).await?;
        if open == 0 && pend == 0 {
            break true;
        }
        if Instant::now() >= deadline {
            world.log(format!(
                "drain bound reached: {open} entries neither delivered nor dead-lettered, {pend} pending"
            ));
            break false;
        }
        if last_print.elapsed() >= Duration::from_secs(10) {
            world.log(format!(
                "draining: {open} entries open, {pend} pending in the group"
            ));
            last_print = Instant::now();
        }
        // Polling interval of the drain check (with a deadline above).
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let drain_secs = drain_start.elapsed().as_secs_f64();
    if drained {
        world.log(format!("drained in {drain_secs:.1} s"));
    }

    // SIGTERM: every gateway should stop reading, finish and exit 0 (G8).
    let mut shutdown = Vec::new();
    for slot in &mut world.slots {
        if let Some(g) = slot.gateway.as_mut() {
            let _ = g.proc().signal("TERM");
        }
    }
    for slot in &mut world.slots {
        if let Some(mut g) = slot.gateway.take() {
            let status = g.proc().wait_exit(Duration::from_secs(30)).await;
            let (text, ok) = match status {
                Some(st) => (describe(st), st.success()),
                None => {
                    g.proc().kill();
                    ("did not exit within 30 s of SIGTERM (killed)".into(), false)
                }
            };
            shutdown.push((g.incarnation.clone(), text, ok));
        }
    }
    world.log("gateways stopped; reading the final state");
    dlq.pull(&mut conn).await?;
    let pend = pending(&mut conn, &stream, &group).await?;
    let pending_ids = pending_ids(&mut conn, &stream, &group).await?;
    let last_delivered_id = last_delivered_id(&mut conn, &stream, &group).await?;
    let mut keys = all_keys(&mut conn).await?;
    for other in &world.others {
        let mut c = redis::Client::open(other.url())?
            .get_connection_manager()
            .await?;
        keys.extend(all_keys(&mut c).await?);
    }
    world.redis.shutdown();
    for other in &mut world.others {
        other.shutdown();
    }

    let history = History {
        platform: s.platform.clone(),
        published,
        requests: sink.requests(),
        dead_letters: dlq.entries,
        pending: pend,
        pending_ids,
        last_delivered_id,
        keys,
        gw_events: std::mem::take(&mut world.gw_events),
        redis_outages: std::mem::take(&mut world.outages),
    };
    Ok(Observed {
        history,
        faults: std::mem::take(&mut world.faults),
        self_exits: std::mem::take(&mut world.self_exits),
        shutdown,
        drained,
        drain_secs,
        seq_unknown: ledger.seq_unknown.load(Ordering::Relaxed),
        xadd_unknown: ledger.xadd_unknown.load(Ordering::Relaxed),
        xadd_found: ledger.xadd_found.load(Ordering::Relaxed),
        workdir: s.keep.then(|| work.path.clone()),
    })
}
