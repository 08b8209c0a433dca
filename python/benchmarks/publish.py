"""Publish throughput of one Python process, beside the Rust publisher's.

    .venv-python/bin/python python/benchmarks/publish.py [--n 20000] [--channels 200]

Starts a private redis-server on a free port and measures envelopes/s for:
one `send` at a time (two round trips each: HINCRBY+PEXPIRE, XADD), 100
`send`s in flight at once, and `publish_many` batches of 100 (two round trips
per batch); then `stargazer send --count N` (the Rust `Publisher`, one at a
time) when target/debug or target/release holds the binary. Envelopes are
SPEC §6's: `message`, channel `c<i mod C>`, text `hello <i>`.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from stargazer_client import Envelope, Worker

REPO = Path(__file__).resolve().parents[2]


def start_redis() -> tuple[subprocess.Popen[bytes], int, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = tempfile.mkdtemp(prefix="sg-bench-")
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", d,
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.02)
    return proc, port, d


async def run(url: str, n: int, channels: int) -> list[tuple[str, float]]:
    results = []
    async with Worker(url, "bench-seq") as w:
        t0 = time.perf_counter()
        for i in range(n):
            await w.send(f"c{i % channels}", f"hello {i}")
        results.append(("send, one at a time", n / (time.perf_counter() - t0)))
    async with Worker(url, "bench-conc") as w:
        t0 = time.perf_counter()
        for start in range(0, n, 100):
            await asyncio.gather(*(w.send(f"c{i % channels}", f"hello {i}")
                                   for i in range(start, min(start + 100, n))))
        results.append(("send, 100 in flight", n / (time.perf_counter() - t0)))
    async with Worker(url, "bench-many") as w:
        t0 = time.perf_counter()
        for start in range(0, n, 100):
            await w.publish_many([Envelope.message(f"c{i % channels}", f"hello {i}")
                                  for i in range(start, min(start + 100, n))])
        results.append(("publish_many, batches of 100", n / (time.perf_counter() - t0)))
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--channels", type=int, default=200)
    a = ap.parse_args()
    proc, port, d = start_redis()
    url = f"redis://127.0.0.1:{port}"
    try:
        results = asyncio.run(run(url, a.n, a.channels))
        binary = next((p for p in (REPO / "target/release/stargazer", REPO / "target/debug/stargazer")
                       if p.is_file()), None)
        if binary is not None:
            t0 = time.perf_counter()
            subprocess.run([str(binary), "send", "--redis-url", url, "--platform", "bench-rust",
                            "--channel", "c0", "--count", str(a.n), "hello"],
                           check=True, stdout=subprocess.DEVNULL)
            results.append((f"Rust `stargazer send --count` ({binary.parent.name}), one at a time",
                            a.n / (time.perf_counter() - t0)))
        print(f"{a.n} envelopes, Python {sys.version.split()[0]}, redis-py {redis.__version__}")
        for name, rate in results:
            print(f"  {name:<55} {rate:>9,.0f} envelopes/s")
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
