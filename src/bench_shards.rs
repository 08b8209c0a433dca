//! `stargazer bench --shards 1,2,3`: W1 (20,000 messages over 200 channels)
//! spread over 10 platforms (2,000 messages over 20 channels each) on a
//! private Redis Cluster of 1, 2, 3… primaries, drained by one real
//! `stargazer gateway` process (`redis.cluster`, the `null` adapter), after a
//! run on a plain server for comparison. Figures: messages per second in
//! aggregate (all platforms drained) and per shard (the platforms whose slot
//! the shard holds, until the last of them drained).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bus::{Bus, Conn, Target};
use crate::keys::Keys;
use crate::redis_server::{RedisCluster, RedisServer};

/// Platforms of the workload.
const PLATFORMS: usize = 10;

/// What one shard count measured.
#[derive(Debug, Clone)]
pub struct ShardRun {
    /// `None`: a plain server, not a cluster.
    pub shards: Option<usize>,
    pub messages: u64,
    pub secs: f64,
    /// Per shard: (platforms on it, messages, seconds until its last drained).
    pub per_shard: Vec<(usize, u64, f64)>,
}

impl ShardRun {
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.secs.max(1e-9)
    }
}

/// Run the shard benchmark for each of `counts` (0 = a plain server),
/// `per_platform` messages over `channels` channels per platform.
pub async fn run(
    counts: &[usize],
    per_platform: u64,
    channels: u64,
    timeout: Duration,
) -> Result<Vec<ShardRun>> {
    let server = std::env::var("STARGAZER_REDIS_SERVER").ok();
    let cli = std::env::var("STARGAZER_REDIS_CLI").ok();
    let mut out = Vec::new();
    for &k in counts {
        let (target, slots, redis, _single, _cluster) = if k == 0 {
            let s = RedisServer::start(server.as_deref()).context("starting redis-server")?;
            let line = format!("url = \"{}\"", s.url());
            (Target::url(&s.url()), None, line, Some(s), None)
        } else {
            let c = RedisCluster::start(server.as_deref(), cli.as_deref(), k, 0)
                .with_context(|| format!("starting a cluster of {k} primaries"))?;
            let line = format!(
                "cluster = [{}]",
                c.urls()
                    .iter()
                    .map(|u| format!("\"{u}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            (Target::cluster(c.urls()), Some(k), line, None, Some(c))
        };
        eprintln!(
            "shards {}: {} platforms × {per_platform} messages over {channels} channels …",
            slots.map_or("none (one server)".into(), |k| k.to_string()),
            PLATFORMS
        );
        let r = one(&target, &redis, slots, per_platform, channels, timeout).await?;
        eprintln!("{}", row(&r));
        out.push(r);
    }
    Ok(out)
}

/// Which of `k` shards (contiguous slot ranges, as
/// [`RedisCluster::start`] assigns them: [`crate::redis_server::even_slots`])
/// holds `key`.
async fn shard_of(conn: &mut Conn, key: &str, k: usize) -> Result<usize> {
    let slot: u64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(conn)
        .await?;
    Ok((0..k)
        .find(|&i| slot <= crate::redis_server::even_slots(i, k).1)
        .unwrap_or(k - 1))
}

async fn one(
    target: &Target,
    redis: &str,
    shards: Option<usize>,
    per_platform: u64,
    channels: u64,
    timeout: Duration,
) -> Result<ShardRun> {
    let mut conn = target.shared().await?;
    let platforms: Vec<String> = (0..PLATFORMS).map(|i| format!("p{i}")).collect();
    let mut shard = BTreeMap::new();
    for p in &platforms {
        let keys = Keys::new("sg", p);
        let s = match shards {
            Some(k) => shard_of(&mut conn, &keys.outbound(), k).await?,
            None => 0,
        };
        shard.insert(p.clone(), s);
        // Preload, in batches of one pipeline (one slot: the platform's).
        let created = crate::now_ms();
        for chunk in (0..per_platform).collect::<Vec<_>>().chunks(500) {
            let mut pipe = redis::pipe();
            for &i in chunk {
                let k = i % channels;
                let seq = i / channels + 1;
                let env = format!(
                    r#"{{"type":"message","channel_id":"c{k}","text":"hello {i}","message_key":"sg:msg:{p}:{i}","seq":{seq},"created_ms":{created}}}"#
                );
                pipe.cmd("XADD")
                    .arg(keys.outbound())
                    .arg("*")
                    .arg("payload")
                    .arg(env)
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
    }
    let dir = std::env::temp_dir().join(format!(
        "stargazer-bench-shards-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir)?;
    let mut toml = format!("[redis]\n{redis}\n\n[http]\nlisten = \"127.0.0.1:0\"\n");
    for p in &platforms {
        toml.push_str(&format!(
            "\n[[platform]]\nname = \"{p}\"\nadapter = \"null\"\n"
        ));
    }
    let config = dir.join("gateway.toml");
    std::fs::write(&config, toml)?;
    let exe: PathBuf = std::env::current_exe().context("this executable")?;
    let started = Instant::now();
    let mut child = tokio::process::Command::new(exe)
        .args(["gateway", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the gateway")?;
    let bus = Bus::connect_to(target, Keys::new("sg", "")).await?;
    let buses: BTreeMap<&String, Bus> = platforms
        .iter()
        .map(|p| (p, bus.for_platform(Keys::new("sg", p))))
        .collect();
    let mut done: BTreeMap<String, f64> = BTreeMap::new();
    let deadline = started + timeout;
    while done.len() < platforms.len() {
        if let Some(status) = child.try_wait()? {
            bail!("the gateway exited ({status}) before draining");
        }
        if Instant::now() > deadline {
            bail!(
                "not drained within {timeout:?}: {} of {} platforms done",
                done.len(),
                platforms.len()
            );
        }
        for p in &platforms {
            if done.contains_key(p) {
                continue;
            }
            if drained(&buses[p], per_platform).await? {
                done.insert(p.clone(), started.elapsed().as_secs_f64());
            }
        }
        // The poll interval of the drain check (bounded by the deadline).
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = done.values().copied().fold(0.0, f64::max);
    let _ = child.start_kill();
    let _ = child.wait().await;
    let _ = std::fs::remove_dir_all(&dir);
    let k = shards.unwrap_or(1);
    let per_shard = (0..k)
        .map(|s| {
            let on: Vec<&String> = shard
                .iter()
                .filter(|(_, v)| **v == s)
                .map(|(p, _)| p)
                .collect();
            let t = on.iter().map(|p| done[*p]).fold(0.0, f64::max);
            (on.len(), on.len() as u64 * per_platform, t)
        })
        .collect();
    Ok(ShardRun {
        shards,
        messages: per_platform * PLATFORMS as u64,
        secs,
        per_shard,
    })
}

/// Whether the platform's gateway group has read all `n` entries and holds
/// none pending (every one delivered and acknowledged).
async fn drained(bus: &Bus, n: u64) -> Result<bool> {
    Ok(bus
        .group()
        .await
        .ok()
        .flatten()
        .is_some_and(|g| g.entries_read == Some(n) && g.pending == 0))
}

/// The header of [`row`]'s table.
pub const HEADER: &str = "| Redis | msgs | s | msgs/s (aggregate) | per shard: platforms, msgs/s |\n|---|---|---|---|---|";

/// One markdown row.
pub fn row(r: &ShardRun) -> String {
    let what = match r.shards {
        None => "one server".to_owned(),
        Some(1) => "cluster, 1 shard".to_owned(),
        Some(k) => format!("cluster, {k} shards"),
    };
    let per: Vec<String> = r
        .per_shard
        .iter()
        .enumerate()
        .map(|(i, (p, m, t))| format!("#{i}: {p}, {:.0}", *m as f64 / t.max(1e-9)))
        .collect();
    format!(
        "| {what} | {} | {:.2} | {:.0} | {} |",
        r.messages,
        r.secs,
        r.rate(),
        per.join("; ")
    )
}
