//! A private `redis-server` for the demo, the benchmarks and the tests: its
//! own temporary directory, a free loopback port, no persistence, stopped
//! when dropped. The binary is `redis-server` from `PATH`, or the one named
//! by the caller (tests and `main` read `STARGAZER_REDIS_SERVER`).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running private server.
#[derive(Debug)]
pub struct RedisServer {
    child: Child,
    port: u16,
    /// The program and its arguments, to start it again ([`Self::restart`]).
    command: Vec<String>,
    _dir: Option<TempDir>,
}

/// Spawn `command` (program, then arguments) with no terminal.
fn spawn(command: &[String]) -> std::io::Result<Child> {
    Command::new(&command[0])
        .args(&command[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

/// A temporary directory removed on drop (kept tiny to avoid a dependency).
#[derive(Debug)]
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether `child` answers PING on `port` within 10 s; one that exits or
/// stays silent is killed and false is returned.
fn came_up(child: &mut Child, port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if ping(port) {
            return true;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl RedisServer {
    /// Start `binary` (default `redis-server`) on a free port and wait until it answers.
    pub fn start(binary: Option<&str>) -> std::io::Result<RedisServer> {
        Self::start_with(binary, |_, _| Vec::new())
    }

    /// The same with more arguments: `extra(port, dir)` gives them, knowing
    /// the plain port chosen and the server's directory (for TLS files,
    /// `--tls-port`, `--cluster-enabled yes`, `--replicaof`, …).
    pub fn start_with(
        binary: Option<&str>,
        extra: impl Fn(u16, &std::path::Path) -> Vec<String>,
    ) -> std::io::Result<RedisServer> {
        let binary = binary.unwrap_or("redis-server");
        let dir = std::env::temp_dir().join(format!(
            "stargazer-redis-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir)?;
        let dir = TempDir(dir);
        // A port the OS just handed out; the bind race is retried below.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let mut command: Vec<String> =
                vec![binary.to_owned(), "--port".into(), port.to_string()];
            command.extend(
                [
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                ]
                .map(String::from),
            );
            command.push(dir.0.to_string_lossy().into_owned());
            command.extend(extra(port, &dir.0));
            let mut child = spawn(&command).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot start `{binary}` ({e}); install it with `apt-get install redis-server` or name it in STARGAZER_REDIS_SERVER"),
                )
            })?;
            // Exited or silent: probably the port was taken; try another.
            if came_up(&mut child, port) {
                return Ok(RedisServer {
                    child,
                    port,
                    command,
                    _dir: Some(dir),
                });
            }
        }
        Err(std::io::Error::other("redis-server did not come up"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's own directory (its data, and files a test put there).
    pub fn dir(&self) -> &std::path::Path {
        self._dir
            .as_ref()
            .map(|d| d.0.as_path())
            .unwrap_or(std::path::Path::new("."))
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Start a Sentinel on a free port that monitors the primary on
    /// `primary_port` as `name` with `quorum`, quick to act (down after 1 s).
    pub fn start_sentinel(
        binary: Option<&str>,
        name: &str,
        primary_port: u16,
        quorum: u32,
    ) -> std::io::Result<RedisServer> {
        let binary = binary.unwrap_or("redis-server");
        let dir = std::env::temp_dir().join(format!(
            "stargazer-sentinel-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir)?;
        let dir = TempDir(dir);
        for _ in 0..5 {
            let port = free_port()?;
            let conf = dir.0.join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\n\
                     sentinel monitor {name} 127.0.0.1 {primary_port} {quorum}\n\
                     sentinel down-after-milliseconds {name} 1000\n\
                     sentinel failover-timeout {name} 10000\n\
                     sentinel parallel-syncs {name} 1\n",
                    dir.0.display()
                ),
            )?;
            let command = vec![
                binary.to_owned(),
                conf.to_string_lossy().into_owned(),
                "--sentinel".to_owned(),
            ];
            let mut child = spawn(&command)?;
            // Exited or silent: probably the port was taken; try another.
            if came_up(&mut child, port) {
                return Ok(RedisServer {
                    child,
                    port,
                    command,
                    _dir: Some(dir),
                });
            }
        }
        Err(std::io::Error::other("redis-sentinel did not come up"))
    }

    /// Kill the server (tests of Redis outages).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start a killed server again: the same port, directory and arguments
    /// (a cluster node keeps its `nodes.conf`, so it rejoins — as a replica
    /// when its replica was promoted meanwhile). Waits until it answers.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.kill();
        let mut child = spawn(&self.command)?;
        if !came_up(&mut child, self.port) {
            return Err(std::io::Error::other(format!(
                "{} did not come up again on port {}",
                self.command[0], self.port
            )));
        }
        self.child = child;
        Ok(())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a Redis server answers PING on `port` (waiting for it to start).
fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
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

/// A free loopback port (the OS's choice; the bind race is the caller's to retry).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A private Redis Cluster: `masters` primaries, each with `replicas`
/// replicas, every node on free loopback ports (client and cluster bus),
/// slots spread by `redis-cli --cluster create`. Stopped when dropped.
#[derive(Debug)]
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Start the nodes and create the cluster; `cli` is `redis-cli` unless named.
    pub fn start(
        binary: Option<&str>,
        cli: Option<&str>,
        masters: usize,
        replicas: usize,
    ) -> std::io::Result<RedisCluster> {
        let mut nodes = Vec::new();
        for _ in 0..masters * (1 + replicas) {
            let node = RedisServer::start_with(binary, |_, dir| {
                let bus = free_port().unwrap_or(0);
                vec![
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-config-file".into(),
                    dir.join("nodes.conf").to_string_lossy().into_owned(),
                    "--cluster-port".into(),
                    bus.to_string(),
                    "--cluster-node-timeout".into(),
                    "2000".into(),
                ]
            })?;
            nodes.push(node);
        }
        if replicas == 0 {
            // Primaries only: assign the slots and introduce the nodes here
            // (`redis-cli --cluster create` wants at least three primaries).
            let cluster = RedisCluster { nodes };
            cluster.assign_slots()?;
            cluster.wait_ok(Duration::from_secs(30))?;
            return Ok(cluster);
        }
        let cli = cli.unwrap_or("redis-cli");
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let out = Command::new(cli)
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot run `{cli}` ({e}); install it with `apt-get install redis-tools` or name it in STARGAZER_REDIS_CLI"),
                )
            })?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let cluster = RedisCluster { nodes };
        cluster.wait_ok(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// Give node `i` of `k` the `i`-th contiguous `k`-th of the 16,384 slots,
    /// and make every node meet the first.
    fn assign_slots(&self) -> std::io::Result<()> {
        let k = self.nodes.len();
        for (i, n) in self.nodes.iter().enumerate() {
            let (lo, hi) = even_slots(i, k);
            let r = raw_command(
                n.port(),
                &["CLUSTER", "ADDSLOTSRANGE", &lo.to_string(), &hi.to_string()],
            );
            if r.as_deref().map(str::trim) != Some("+OK") {
                return Err(std::io::Error::other(format!(
                    "CLUSTER ADDSLOTSRANGE {lo} {hi} on port {}: {r:?}",
                    n.port()
                )));
            }
        }
        // The first node's cluster-bus port, from its own `CLUSTER NODES`
        // line (`127.0.0.1:port@bus … myself …`).
        let nodes = raw_command(self.nodes[0].port(), &["CLUSTER", "NODES"]).unwrap_or_default();
        let bus = nodes
            .lines()
            .find(|l| l.contains("myself"))
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|a| a.split('@').nth(1))
            .and_then(|b| b.split(',').next())
            .map(str::to_owned)
            .ok_or_else(|| std::io::Error::other(format!("no cluster-bus port in {nodes:?}")))?;
        let first = self.nodes[0].port().to_string();
        for n in &self.nodes[1..] {
            let r = raw_command(n.port(), &["CLUSTER", "MEET", "127.0.0.1", &first, &bus]);
            if r.as_deref().map(str::trim) != Some("+OK") {
                return Err(std::io::Error::other(format!(
                    "CLUSTER MEET on port {}: {r:?}",
                    n.port()
                )));
            }
        }
        Ok(())
    }

    /// Wait until every live node reports `cluster_state:ok` and knows all slots.
    pub fn wait_ok(&self, within: Duration) -> std::io::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let ok = self.nodes.iter().all(|n| {
                let info = raw_command(n.port(), &["CLUSTER", "INFO"]).unwrap_or_default();
                // a killed node does not answer; the others must agree
                info.is_empty()
                    || (info.contains("cluster_state:ok")
                        && info.contains("cluster_slots_assigned:16384"))
            }) && self
                .nodes
                .iter()
                .any(|n| raw_command(n.port(), &["PING"]).is_some());
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(
                    "the cluster did not reach cluster_state:ok",
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The seed URLs of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

/// The slots node `i` of `k` primaries serves when the slots are split
/// evenly, as [`RedisCluster::start`] does without replicas: `lo..=hi`.
pub fn even_slots(i: usize, k: usize) -> (u64, u64) {
    ((i * 16384 / k) as u64, ((i + 1) * 16384 / k - 1) as u64)
}

/// The slot ranges of one `CLUSTER NODES` line (its fields from the ninth:
/// `lo-hi` or a single slot; migration markers in brackets are skipped).
pub fn node_line_slots(line: &str) -> Vec<(u64, u64)> {
    line.split(' ')
        .skip(8)
        .filter_map(|r| match r.split_once('-') {
            Some((lo, hi)) => Some((lo.parse().ok()?, hi.parse().ok()?)),
            None => r.parse().ok().map(|s| (s, s)),
        })
        .collect()
}

/// One command over a raw connection (RESP2), the reply as text; `None`
/// when the server does not answer. For harness checks only.
pub fn raw_command(port: u16, args: &[&str]) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(1000))).ok()?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes()).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if complete(&buf) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    (!buf.is_empty()).then(|| String::from_utf8_lossy(&buf).into_owned())
}

/// Whether `buf` holds one whole simple, error, integer or bulk reply.
fn complete(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    match buf.first() {
        Some(b'$') => {
            let len: i64 = std::str::from_utf8(&buf[1..end])
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            len < 0 || buf.len() >= end + 2 + len as usize + 2
        }
        _ => true,
    }
}
