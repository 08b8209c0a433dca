"""Private Redis deployments for the tests, on free ports in temp dirs: a
3-primary Redis Cluster (``redis-cli --cluster create``), a primary + replica
+ 3 Sentinels (with a forced failover), and a TLS server with certificates
made by ``openssl``. Every wait polls for the condition with a deadline."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import free_port, stop_process


def binary(name: str, env: str) -> str:
    path = os.environ.get(env) or shutil.which(name)
    if not path:
        pytest.exit(f"{name} not found (scripts/ensure-redis.sh installs it)", 2)
    return path


def wait_for(what: str, check: Callable[[], bool], within: float = 20.0, every: float = 0.05) -> None:
    """Poll ``check`` until it is true; fail naming ``what`` after ``within`` s."""
    deadline = time.monotonic() + within
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.exceptions.RedisError, OSError) as e:
            last = e
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}" + (f" (last error: {last})" if last else ""))


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A port whose cluster-bus twin (port + 10000) is free too."""
    for _ in range(200):
        p = random.randint(20000, 40000)
        if _port_free(p) and _port_free(p + 10000):
            return p
    raise RuntimeError("no free port pair for a cluster node")


class Proc:
    """One redis-server (or Sentinel) process on ``port``."""

    def __init__(self, args: list[str], port: int, dir: Path, ping: Callable[[], bool] | None = None) -> None:
        self.port = port
        self.dir = dir
        self.log = dir / f"redis-{port}.log"
        self.proc = subprocess.Popen(
            [binary("redis-server", "STARGAZER_REDIS_SERVER"), *args, "--logfile", str(self.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.client = redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=5)
        check = ping or (lambda: bool(self.client.ping()))

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server on {port} exited: {self.tail()}")
            return check()

        wait_for(f"redis-server on port {port}", up, within=15)

    def tail(self) -> str:
        try:
            return self.log.read_text()[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        self.client.close()
        stop_process(self.proc, 5)


def _base(port: int, dir: Path) -> list[str]:
    return ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(dir),
            "--save", "", "--appendonly", "no"]


class Cluster:
    """A Redis Cluster of ``masters`` primaries (no replicas), every slot covered."""

    def __init__(self, masters: int = 3) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sg-py-cluster-"))
        self.nodes: list[Proc] = []
        try:
            for _ in range(masters):
                port = cluster_port()
                self.nodes.append(Proc(
                    [*_base(port, self.dir), "--cluster-enabled", "yes",
                     "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", "3000"],
                    port, self.dir))
            out = subprocess.run(
                [binary("redis-cli", "STARGAZER_REDIS_CLI"), "--cluster", "create",
                 *[f"127.0.0.1:{n.port}" for n in self.nodes], "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, text=True, timeout=60,
            )
            assert out.returncode == 0, out.stdout + out.stderr

            def ready() -> bool:
                for n in self.nodes:
                    info = n.client.cluster("INFO")
                    if info.get("cluster_state") != "ok" or int(info.get("cluster_slots_ok", 0)) != 16384:
                        return False
                    if int(info.get("cluster_known_nodes", 0)) != masters:
                        return False
                return True

            wait_for("the cluster to cover every slot", ready, within=30)
        except BaseException:
            self.stop()
            raise

    @property
    def urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{n.port}" for n in self.nodes]

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelSet:
    """A primary, one replica and three Sentinels monitoring them as ``master``."""

    master = "sg"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sg-py-sentinel-"))
        self.sentinels: list[Proc] = []
        self.servers: list[Proc] = []
        try:
            p = free_port()
            self.servers.append(Proc(_base(p, self.dir), p, self.dir))
            r = free_port()
            self.servers.append(Proc([*_base(r, self.dir), "--replicaof", "127.0.0.1", str(p)], r, self.dir))
            wait_for("the replica to sync", lambda: self.servers[1].client.info("replication")
                     .get("master_link_status") == "up")
            for _ in range(3):
                sp = free_port()
                conf = self.dir / f"sentinel-{sp}.conf"
                conf.write_text(
                    f"port {sp}\nbind 127.0.0.1\ndir {self.dir}\n"
                    f"sentinel monitor {self.master} 127.0.0.1 {p} 2\n"
                    f"sentinel down-after-milliseconds {self.master} 2000\n"
                    f"sentinel failover-timeout {self.master} 10000\n"
                    f"sentinel parallel-syncs {self.master} 1\n"
                )
                self.sentinels.append(Proc([str(conf), "--sentinel"], sp, self.dir))

            def known() -> bool:
                for s in self.sentinels:
                    replicas = s.client.sentinel_slaves(self.master)
                    if not any(x["port"] == r and "s_down" not in x["flags"] for x in replicas):
                        return False
                    if len(s.client.sentinel_sentinels(self.master)) != 2:
                        return False
                return True

            wait_for("every Sentinel to know the replica and the other Sentinels", known, within=30)
        except BaseException:
            self.stop()
            raise

    @property
    def urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{s.port}" for s in self.sentinels]

    def primary_port(self) -> int:
        addr: Any = self.sentinels[0].client.sentinel_get_master_addr_by_name(self.master)
        return int(addr[1])

    def server(self, port: int) -> Proc:
        return next(s for s in self.servers if s.port == port)

    def failover(self) -> tuple[int, int]:
        """``SENTINEL FAILOVER``, then wait until every Sentinel names the new
        primary, the old one follows it, and the new one has its replica back
        (so ``WAIT 1`` can succeed again). (old port, new port)."""
        old = self.primary_port()
        new = next(s.port for s in self.servers if s.port != old)
        assert self.sentinels[0].client.execute_command("SENTINEL", "FAILOVER", self.master)
        wait_for("every Sentinel to name the new primary",
                 lambda: all(int(s.client.sentinel_get_master_addr_by_name(self.master)[1]) == new
                             for s in self.sentinels), within=30)
        wait_for("the old primary to follow the new one",
                 lambda: self.server(old).client.info("replication").get("role") == "slave"
                 and self.server(old).client.info("replication").get("master_link_status") == "up",
                 within=30)
        wait_for("the new primary to see its replica",
                 lambda: int(self.server(new).client.info("replication").get("connected_slaves", 0)) >= 1,
                 within=30)
        return old, new

    def stop(self) -> None:
        for s in [*self.sentinels, *self.servers]:
            s.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class TlsServer:
    """A redis-server on a TLS port only (no plain port), requiring a client
    certificate and a password; certificates made by openssl in a temp dir."""

    password = "tls-s3cret"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sg-py-tls-"))
        d = self.dir
        self.ca = str(d / "ca.pem")
        self.other_ca = str(d / "other-ca.pem")
        self.cert = str(d / "client.pem")
        self.key = str(d / "client.key")
        try:
            self._certs()
            self.port = free_port()
            self.proc = Proc(
                ["--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1", "--dir", str(d),
                 "--save", "", "--appendonly", "no",
                 "--tls-cert-file", str(d / "server.pem"), "--tls-key-file", str(d / "server.key"),
                 "--tls-ca-cert-file", self.ca, "--tls-auth-clients", "yes",
                 "--requirepass", self.password],
                self.port, d, ping=lambda: bool(self.client().ping()))
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _certs(self) -> None:
        d = self.dir

        def ssl(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

        for ca in ("ca", "other-ca"):
            ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=sg-test-{ca}",
                "-keyout", f"{ca}.key", "-out", f"{ca}.pem")
        (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        for name in ("server", "client"):
            ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=sg-test-{name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr")
            ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", f"{name}.pem")

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, ssl=True, ssl_ca_certs=self.ca,
                           ssl_certfile=self.cert, ssl_keyfile=self.key, password=self.password,
                           socket_connect_timeout=1)

    def stop(self) -> None:
        self.proc.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
