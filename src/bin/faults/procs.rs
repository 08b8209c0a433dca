//! The suite's child processes: one private `redis-server` (AOF on, so it can
//! be SIGKILLed and restarted on the same directory and port) and the
//! `stargazer gateway` nodes, each with a config file the suite writes.
//!
//! Every child sits in a [`Proc`] guard that SIGKILLs and reaps it when
//! dropped, so nothing outlives the suite, whether a run ends, fails or
//! panics. Signals other than SIGKILL go through `kill(1)`: the crate forbids
//! `unsafe`, and this keeps it free of a libc dependency.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::poll_until;

/// A running child, SIGKILLed and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    reaped: Option<ExitStatus>,
}

impl Proc {
    fn spawn(cmd: &mut Command, what: &str) -> Result<Proc> {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {what} ({:?})", cmd.get_program()))?;
        Ok(Proc {
            child,
            reaped: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` (`STOP`, `CONT`, `TERM`) with `kill(1)`.
    pub fn signal(&self, sig: &str) -> Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("cannot run kill(1)")?;
        if !status.success() {
            bail!("kill -{sig} {} failed (process gone?)", self.pid());
        }
        Ok(())
    }

    /// Its exit status, once it has exited (reaping it).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.reaped.is_none() {
            self.reaped = self.child.try_wait().ok().flatten();
        }
        self.reaped
    }

    /// SIGKILL (works on a SIGSTOPped process too) and reap.
    pub fn kill(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            self.reaped = self.child.wait().ok();
        }
    }

    /// Waits up to `within` for the process to exit by itself.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        poll_until(within, Duration::from_millis(50), || {
            let done = self.exited().is_some();
            async move { done }
        })
        .await;
        self.exited()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port the OS just handed out (bound and released; a race with another
/// process taking it is possible and handled by the callers' retries).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether a Redis server on `port` answers PING with PONG (not `-LOADING`).
async fn redis_pong(port: u16) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).await.ok()?;
        Some(&buf == b"+PONG\r\n")
    };
    tokio::time::timeout(Duration::from_millis(500), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// The private Redis: one directory and one port for the whole run.
#[derive(Debug)]
pub struct Redis {
    binary: String,
    dir: PathBuf,
    port: u16,
    /// In a cluster (`--cluster`): the node's cluster-bus port.
    cluster_port: Option<u16>,
    proc: Option<Proc>,
    stopped: bool,
}

/// How long a (re)started Redis may take to load its AOF and answer.
const REDIS_READY: Duration = Duration::from_secs(60);

impl Redis {
    /// Starts `binary` on a free port with its data in `dir`.
    pub async fn start(binary: &str, dir: &Path) -> Result<Redis> {
        Self::start_node(binary, dir, false).await
    }

    /// Starts `binary` as a cluster node (`cluster-enabled`, its
    /// `nodes.conf` in `dir`, no slots yet): [`create_cluster`] joins them.
    /// A node that is down leaves the other nodes serving their slots
    /// (`cluster-require-full-coverage no`).
    pub async fn start_cluster_node(binary: &str, dir: &Path) -> Result<Redis> {
        Self::start_node(binary, dir, true).await
    }

    async fn start_node(binary: &str, dir: &Path, cluster: bool) -> Result<Redis> {
        std::fs::create_dir_all(dir)?;
        for _ in 0..5 {
            let mut redis = Redis {
                binary: binary.to_owned(),
                dir: dir.to_owned(),
                port: free_port()?,
                cluster_port: if cluster { Some(free_port()?) } else { None },
                proc: None,
                stopped: false,
            };
            redis.spawn()?;
            if redis.wait_ready().await {
                return Ok(redis);
            }
            // Exited at once: most likely the port was taken meanwhile.
        }
        bail!(
            "`{binary}` did not come up (see {}/redis.log); install redis-server or name it in STARGAZER_REDIS_SERVER",
            dir.display()
        )
    }

    fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new(&self.binary);
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--save", "", "--daemonize", "no", "--logfile", "redis.log"]);
        if let Some(bus) = self.cluster_port {
            cmd.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--cluster-port", &bus.to_string()])
            .args(["--cluster-node-timeout", "5000"])
            .args(["--cluster-require-full-coverage", "no"]);
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        self.proc = Some(Proc::spawn(
            &mut cmd,
            "redis-server (install it, or name it in STARGAZER_REDIS_SERVER)",
        )?);
        self.stopped = false;
        Ok(())
    }

    /// Polls until it answers PING (true) or exits or times out (false).
    async fn wait_ready(&mut self) -> bool {
        let port = self.port;
        let ok = poll_until(REDIS_READY, Duration::from_millis(25), || {
            let gone = self.proc.as_mut().is_none_or(|p| p.exited().is_some());
            async move { gone || redis_pong(port).await }
        })
        .await;
        ok && self.proc.as_mut().is_some_and(|p| p.exited().is_none())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A cluster node: whether it reports `cluster_state:ok` (after a
    /// restart, once it has rejoined).
    pub async fn cluster_ok(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let attempt = async {
            let mut c = client.get_multiplexed_async_connection().await.ok()?;
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut c)
                .await
                .ok()?;
            Some(info.contains("cluster_state:ok"))
        };
        tokio::time::timeout(Duration::from_secs(1), attempt)
            .await
            .ok()
            .flatten()
            .unwrap_or(false)
    }

    /// The slot ranges this cluster node serves (`CLUSTER NODES`, its
    /// `myself` line).
    pub async fn own_slots(&self) -> Result<Vec<(u64, u64)>> {
        let client = redis::Client::open(self.url())?;
        let mut c = client.get_multiplexed_async_connection().await?;
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut c)
            .await?;
        let mine = nodes
            .lines()
            .find(|l| l.split(' ').nth(2).is_some_and(|f| f.contains("myself")))
            .context("no `myself` line in CLUSTER NODES")?;
        Ok(stargazer::redis_server::node_line_slots(mine))
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.exited().is_none())
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    pub fn stop(&mut self) -> Result<()> {
        if let Some(p) = &self.proc {
            p.signal("STOP")?;
            self.stopped = true;
        }
        Ok(())
    }

    pub fn cont(&mut self) -> Result<()> {
        if let Some(p) = &self.proc {
            p.signal("CONT")?;
        }
        self.stopped = false;
        Ok(())
    }

    /// SIGKILL: whatever was not yet in the AOF is gone, as in a power cut.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
        self.stopped = false;
    }

    /// Starts it again on the same port and directory (loading the AOF) and
    /// waits until it answers (a cluster node: and has rejoined the cluster).
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        let deadline = std::time::Instant::now() + REDIS_READY;
        loop {
            self.spawn()?;
            if self.wait_ready().await {
                if self.cluster_port.is_some() {
                    let this = &*self;
                    if !poll_until(REDIS_READY, Duration::from_millis(100), || {
                        this.cluster_ok()
                    })
                    .await
                    {
                        bail!(
                            "cluster node on port {} did not rejoin (see {}/redis.log)",
                            self.port,
                            self.dir.display()
                        );
                    }
                }
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "redis-server did not restart on port {} (see {}/redis.log)",
                    self.port,
                    self.dir.display()
                );
            }
            // It exited at once (the old socket not yet released): a short
            // back-off before the next try, not a guess at readiness.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn shutdown(&mut self) {
        self.kill();
    }
}

/// Joins `nodes` (started with [`Redis::start_cluster_node`]) into a cluster
/// of primaries without replicas, with `redis-cli --cluster create` (`cli`),
/// and waits until every node reports `cluster_state:ok`.
pub async fn create_cluster(cli: &str, nodes: &[Redis]) -> Result<()> {
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let out = tokio::process::Command::new(cli)
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| {
            format!("cannot run `{cli}` (install redis-tools, or name it in STARGAZER_REDIS_CLI)")
        })?;
    if !out.status.success() {
        bail!(
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for n in nodes {
        if !poll_until(REDIS_READY, Duration::from_millis(100), || n.cluster_ok()).await {
            bail!(
                "cluster node on port {} never reported cluster_state:ok",
                n.port
            );
        }
    }
    Ok(())
}

/// What every gateway of the run shares: its binary, Redis, platform and the
/// sink. A config sets only the Redis URL, the platform (adapter `webhook`,
/// its url), `gateway.consumer_name` and `http.listen`: everything else is
/// the shipped default, which is what the suite exists to test.
#[derive(Debug, Clone)]
pub struct GatewayConf {
    pub binary: PathBuf,
    pub redis_url: String,
    /// `--cluster`: every node's URL (`redis.cluster`), instead of `redis_url`.
    pub cluster: Option<Vec<String>>,
    pub platform: String,
    /// `http://127.0.0.1:<port>/deliver`; each incarnation posts to its own
    /// `/<incarnation>` below it, so the sink knows which process sent what.
    pub sink_base: String,
    pub dir: PathBuf,
    /// `RUST_LOG` of the gateways (their logs go to `<dir>/<incarnation>.log`).
    pub log_level: String,
}

/// One incarnation of a gateway slot.
#[derive(Debug)]
pub struct Gateway {
    /// `g<slot>.<generation>`: which process, for the sink and the checker.
    pub incarnation: String,
    /// Its name in the consumer group.
    pub consumer: String,
    pub http: SocketAddr,
    pub log: PathBuf,
    pub stopped: bool,
    proc: Proc,
}

impl GatewayConf {
    /// Writes the config of `incarnation` and starts it (without waiting).
    pub fn spawn(&self, incarnation: &str, consumer: &str) -> Result<Gateway> {
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let config = self.dir.join(format!("{incarnation}.toml"));
        let redis = match &self.cluster {
            Some(urls) => format!(
                "cluster = [{}]",
                urls.iter()
                    .map(|u| format!("\"{u}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => format!("url = \"{}\"", self.redis_url),
        };
        let text = format!(
            "[redis]\n{redis}\n\n[gateway]\nconsumer_name = \"{consumer}\"\n\n\
             [http]\nlisten = \"{http}\"\n\n[[platform]]\nname = \"{platform}\"\n\
             adapter = \"webhook\"\nurl = \"{sink}/{incarnation}\"\n",
            platform = self.platform,
            sink = self.sink_base,
        );
        std::fs::write(&config, text)?;
        let log = self.dir.join(format!("{incarnation}.log"));
        let out = File::create(&log)?;
        let mut cmd = Command::new(&self.binary);
        cmd.args(["gateway", "--config"])
            .arg(&config)
            .env("RUST_LOG", &self.log_level)
            .env("NO_COLOR", "1")
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out));
        // The shipped defaults, whatever this shell exports.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("STARGAZER_") {
                cmd.env_remove(key);
            }
        }
        let proc = Proc::spawn(&mut cmd, "the stargazer gateway")?;
        Ok(Gateway {
            incarnation: incarnation.to_owned(),
            consumer: consumer.to_owned(),
            http,
            log,
            stopped: false,
            proc,
        })
    }
}

impl Gateway {
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// Whether `/readyz` answers 200.
    pub async fn ready(&self, client: &reqwest::Client) -> bool {
        let url = format!("http://{}/readyz", self.http);
        matches!(client.get(url).send().await, Ok(r) if r.status().is_success())
    }

    /// What its log says about how it ended: from the last `Error:` or
    /// `panicked` line (up to `lines` lines), else its last `lines` lines.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let start = all
            .iter()
            .rposition(|l| l.starts_with("Error:") || l.contains("panicked"))
            .unwrap_or(all.len().saturating_sub(lines));
        all[start..(start + lines).min(all.len())].join("\n")
    }
}
