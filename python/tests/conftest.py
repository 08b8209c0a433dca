"""Test rig: a private redis-server on a free port (one per session), a fresh
platform name per test (every key of a platform carries its name, so tests
never see each other's keys), and the `stargazer` binary when it is built."""

from __future__ import annotations

import os
import shutil
import socket
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio

from stargazer_client import Worker

REPO = Path(__file__).resolve().parents[2]


def stop_process(proc: "subprocess.Popen[bytes]", grace: float, sig: int = signal.SIGTERM) -> None:
    """Send `sig` (SIGTERM) to a child still running, wait up to `grace`
    seconds for it to exit, and kill it when it does not."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """A private `redis-server` (binary from $STARGAZER_REDIS_SERVER or PATH)."""

    def __init__(self) -> None:
        binary = os.environ.get("STARGAZER_REDIS_SERVER") or shutil.which("redis-server")
        if not binary:
            pytest.exit("redis-server not found (scripts/ensure-redis.sh installs it)", 2)
        self.dir = tempfile.mkdtemp(prefix="sg-py-redis-")
        for _ in range(10):
            self.port = free_port()
            self.proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                 "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._wait_ready():
                return
            self.proc.kill()
            self.proc.wait()
        raise RuntimeError("could not start redis-server on a free port")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def _wait_ready(self) -> bool:
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False  # the port was taken after all
                try:
                    if client.ping():
                        return True
                except redis.exceptions.ConnectionError:
                    time.sleep(0.02)
            return False
        finally:
            client.close()

    def stop(self) -> None:
        stop_process(self.proc, 5)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def platform() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def worker(redis_url: str, platform: str) -> AsyncIterator[Worker]:
    async with Worker(redis_url, platform) as w:
        yield w


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client for looking at what the package wrote (RESP2, bytes)."""
    client = redis.asyncio.Redis.from_url(redis_url, protocol=2)
    yield client
    await client.aclose()


def stargazer_binary() -> Path | None:
    env = os.environ.get("STARGAZER_BIN")
    path = Path(env) if env else REPO / "target" / "debug" / "stargazer"
    return path if path.is_file() and os.access(path, os.X_OK) else None


@pytest.fixture
def stargazer_bin() -> Path:
    path = stargazer_binary()
    if path is None:
        pytest.skip("the stargazer binary is not built (cargo build, or set STARGAZER_BIN)")
    return path
