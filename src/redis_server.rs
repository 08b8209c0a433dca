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
    _dir: Option<TempDir>,
}

/// A temporary directory removed on drop (kept tiny to avoid a dependency).
#[derive(Debug)]
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl RedisServer {
    /// Start `binary` (default `redis-server`) on a free port and wait until it answers.
    pub fn start(binary: Option<&str>) -> std::io::Result<RedisServer> {
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
            let mut child = Command::new(binary)
                .args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--dir", &dir.0.to_string_lossy()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("cannot start `{binary}` ({e}); install it with `apt-get install redis-server` or name it in STARGAZER_REDIS_SERVER"),
                    )
                })?;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited: probably the port was taken; try another
                }
                if ping(port) {
                    return Ok(RedisServer {
                        child,
                        port,
                        _dir: Some(dir),
                    });
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
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

    /// Kill the server (tests of Redis outages).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
