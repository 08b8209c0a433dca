"""Sentinel mode, on a private primary + replica + 3 Sentinels: publishing
(one envelope at a time and MULTI batches) and reading inbound events while
`SENTINEL FAILOVER` moves the primary. With `wait_replicas = 1` every
confirmed publish survives the failover: none lost, no `seq` repeated, and
any copy written again after an unsure failure is the same envelope (same
`seq`, same idempotency key), which the gateway skips as a proven duplicate."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

from conftest import free_port
from conftest import stop_process
from servers import Proc, SentinelSet, _base, wait_for
from stargazer_client import Envelope, InboundEvent, RedisConfig, SentinelConfig, Worker

PLATFORMS = ["s0", "s1", "s2"]
CHANNELS = 5
PER_PLATFORM = 300
BATCH = 5


@pytest.fixture
def sentinels() -> Iterator[SentinelSet]:
    s = SentinelSet()
    yield s
    s.stop()


def config(s: SentinelSet, **kw: Any) -> RedisConfig:
    return RedisConfig(sentinel=SentinelConfig(s.master, s.urls), **kw)


async def test_publishing_and_reading_through_a_sentinel_failover(sentinels: SentinelSet) -> None:
    cfg = config(sentinels, wait_replicas=1, wait_timeout_ms=500)
    workers = {p: Worker(cfg, p) for p in PLATFORMS}
    confirmed: dict[str, list[tuple[str, str, int]]] = {p: [] for p in PLATFORMS}  # key, channel, seq
    after_failover = Counter[str]()
    failover_done = asyncio.Event()

    async def produce(p: str) -> None:
        w = workers[p]
        i = 0
        while i < PER_PLATFORM:
            if p == "s2":
                # MULTI … EXEC + WAIT, one channel's numbers taken for the batch
                envs = [Envelope.message(f"c{(i + j) % CHANNELS}", f"{p} {i + j}",
                                         message_key=f"sg:msg:{p}:{i + j}") for j in range(BATCH)]
                for e, pub in zip(envs, await w.publish_many(envs)):
                    assert pub.seq is not None and pub.message_key is not None
                    confirmed[p].append((pub.message_key, str(e.channel_id), pub.seq))
                i += BATCH
            else:
                ch = f"c{i % CHANNELS}"
                pub = await w.send(ch, f"{p} {i}", message_key=f"sg:msg:{p}:{i}")
                assert pub.seq is not None and pub.message_key is not None
                confirmed[p].append((pub.message_key, ch, pub.seq))
                i += 1
            if failover_done.is_set():
                after_failover[p] += 1

    # An inbound consumer blocked across the failover, and the gateway's side
    # writing events (each one confirmed by a replica too).
    reader = Worker(cfg, "s-in")
    seen: list[str] = []
    enough = asyncio.Event()
    n_events = 60

    async def handle(ev: InboundEvent) -> None:
        seen.append(ev.text or "")
        if len(set(seen)) == n_events:
            enough.set()

    consumer = asyncio.create_task(reader.inbound("py-bot", block=1.0).run(handle, stop=enough))
    gateway_side = redis.asyncio.Sentinel([("127.0.0.1", int(u.rsplit(":", 1)[1])) for u in sentinels.urls])
    primary = gateway_side.master_for(sentinels.master)

    async def write_event(i: int) -> None:
        payload = json.dumps({"type": "message", "channel_id": "c", "text": f"ev {i}"}).encode()
        while True:  # the test's own writer: again until a replica has it
            try:
                pipe = primary.pipeline(transaction=False)
                pipe.xadd(reader.keys.inbound, {"payload": payload})
                pipe.execute_command("WAIT", 1, 500)
                _, replicas = await pipe.execute()
                if int(replicas) >= 1:
                    return
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                    redis.exceptions.ResponseError):
                pass
            await asyncio.sleep(0.05)

    try:
        for i in range(n_events // 2):
            await write_event(i)
        producers = [asyncio.create_task(produce(p)) for p in PLATFORMS]

        def third_published() -> bool:
            return sum(len(v) for v in confirmed.values()) >= len(PLATFORMS) * PER_PLATFORM // 3

        while not third_published():
            assert not any(t.done() for t in producers), [t.exception() for t in producers if t.done()]
            await asyncio.sleep(0.01)
        old, new = await asyncio.to_thread(sentinels.failover)
        failover_done.set()
        for i in range(n_events // 2, n_events):
            await write_event(i)
        await asyncio.wait_for(asyncio.gather(*producers), 120)
        await asyncio.wait_for(consumer, 60)
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await reader.aclose()
        await asyncio.gather(*[w.aclose() for w in workers.values()])
        await primary.aclose()
        await gateway_side.aclose()

    assert sentinels.primary_port() == new != old
    r = redis.Redis(port=new)
    try:
        figures = Counter[str]()
        for p in PLATFORMS:
            entries = r.xrange(workers[p].keys.outbound)
            first: dict[str, bytes] = {}
            copies = Counter[str]()
            order: dict[str, list[int]] = defaultdict(list)
            for _id, f in entries:
                env = json.loads(f[b"payload"])
                key = env["message_key"]
                copies[key] += 1
                if key in first:
                    # a copy written again: the same envelope, so the gateway skips it
                    assert f[b"payload"] == first[key], key
                    continue
                first[key] = f[b"payload"]
                order[env["channel_id"]].append(env["seq"])
            keys = {k for k, _, _ in confirmed[p]}
            figures["published"] += len(confirmed[p])
            figures["stream entries"] += len(entries)
            figures["distinct"] += len(first)
            figures["copies"] += sum(n - 1 for n in copies.values())
            figures["lost"] += len(keys - set(first))
            figures["unconfirmed extra"] += len(set(first) - keys)
            for ch, seqs in order.items():
                figures["seq repeated"] += len(seqs) - len(set(seqs))
                figures["out of order"] += sum(1 for a, b in zip(seqs, seqs[1:]) if b <= a)
                figures["seq gaps"] += (max(seqs) - len(set(seqs))) if seqs else 0
            # what each publish was told is what is in the stream
            told = {k: s for k, _, s in confirmed[p]}
            assert all(json.loads(first[k])["seq"] == s for k, s in told.items() if k in first)
            figures["published after the failover"] += after_failover[p]
        figures["inbound written"] = n_events
        figures["inbound handled (distinct)"] = len(set(seen))
        figures["inbound handled twice"] = len(seen) - len(set(seen))
        print(f"\nsentinel failover {old} -> {new}: {dict(figures)}")
        assert figures["published"] == len(PLATFORMS) * PER_PLATFORM
        assert figures["lost"] == 0
        assert figures["distinct"] == figures["published"]
        assert figures["seq repeated"] == figures["out of order"] == 0
        assert figures["published after the failover"] > 0
        assert set(seen) == {f"ev {i}" for i in range(n_events)}
    finally:
        r.close()


async def test_a_sentinel_worker_follows_the_primary(sentinels: SentinelSet) -> None:
    """Plain publishing (no wait_replicas) and an RPC reply awaited with BLPOP,
    both on the primary the Sentinels name, before and after a failover."""
    async with Worker(config(sentinels), "s-rpc") as w:
        assert w.mode == "sentinel"

        async def answer_one() -> None:
            r = redis.Redis(port=sentinels.primary_port())
            try:
                def take() -> Any:
                    return r.xread({w.keys.outbound: "$"}, block=10_000, count=1)

                res = await asyncio.to_thread(take)
                for _s, items in res:
                    for _id, f in items:
                        env = json.loads(f[b"payload"])
                        if env.get("type") == "rpc_request":
                            r.rpush(env["reply_key"], json.dumps({"ok": env["rpc_args"]}))
            finally:
                r.close()

        for round_ in range(2):
            responder = asyncio.create_task(answer_one())
            # the responder's XREAD must be blocked before the request lands
            port = sentinels.primary_port()
            probe = redis.Redis(port=port)
            try:
                while not any(c.get("cmd") == "xread" for c in probe.client_list()):
                    await asyncio.sleep(0.01)
            finally:
                probe.close()
            assert await w.rpc("echo", {"round": round_}, timeout=10) == {"ok": {"round": round_}}
            await responder
            sent = await w.send("c", f"round {round_}")
            assert sent.seq is not None
            if round_ == 0:
                await asyncio.to_thread(sentinels.failover)


async def test_a_seq_whose_wait_came_back_short_is_reused_not_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A replica that stalls (DEBUG SLEEP) makes WAIT come back short: the worker
    tries again, reuses the seq it took while the counter still stands at it under
    its token, and the channel's numbers stay 1, 2, 3 — no gap for the gateway
    to wait out."""
    p = free_port()
    primary = Proc([*_base(p, tmp_path)], p, tmp_path)
    r = free_port()
    replica = Proc([*_base(r, tmp_path), "--replicaof", "127.0.0.1", str(p), "--enable-debug-command", "yes"],
                   r, tmp_path)
    try:
        wait_for("the replica to sync", lambda: replica.client.info("replication")
                 .get("master_link_status") == "up")
        cfg = RedisConfig(f"redis://127.0.0.1:{p}", wait_replicas=1, wait_timeout_ms=200)
        async with Worker(cfg, "s-gap") as w:
            assert (await w.send("c", "one")).seq == 1
            stall = asyncio.create_task(asyncio.to_thread(
                lambda: redis.Redis(port=r).execute_command("DEBUG", "SLEEP", "1.5")))
            await asyncio.to_thread(wait_for, "the replica to stall",
                                    lambda: int(primary.client.info("replication")["slave0"]["lag"]) >= 1)
            assert (await w.send("c", "two")).seq == 2  # short WAITs, then the same seq
            assert any("taking seq numbers failed" in m and "NotReplicated" in m for m in caplog.messages)
            await stall
            assert (await w.send("c", "three")).seq == 3
            assert int(primary.client.hget(w.keys.channel("c"), "seq")) == 3
            seqs = [json.loads(f[b"payload"])["seq"] for _, f in primary.client.xrange(w.keys.outbound)]
            assert sorted(set(seqs)) == [1, 2, 3]
    finally:
        replica.stop()
        primary.stop()


async def test_the_gateway_delivers_through_a_sentinel_failover_once_each(
    sentinels: SentinelSet, stargazer_bin: Path, tmp_path: Path
) -> None:
    """Cross-language: `stargazer gateway` under `[redis] sentinel = {…}` with
    `wait_replicas = 1` delivers everything the package confirmed across a
    `SENTINEL FAILOVER`: each idempotency key at least once, in seq order per
    channel; a repeat is counted (the webhook's Idempotency-Key removes it)."""
    from test_gateway import Receiver

    rx = Receiver()
    platforms = ["sg0", "sg1"]
    per_platform = 300
    urls = ", ".join(f'"{u}"' for u in sentinels.urls)
    blocks = "".join(f'[[platform]]\nname = "{p}"\nadapter = "webhook"\nurl = "{rx.url}"\n' for p in platforms)
    config = tmp_path / "stargazer.toml"
    config.write_text(f"""
[redis]
sentinel = {{ master = "{sentinels.master}", urls = [{urls}] }}
wait_replicas = 1
[gateway]
consumer_name = "py-sentinel-gw"
[consumer]
block_ms = 100
drain_timeout_ms = 3000
{blocks}""")
    proc = subprocess.Popen([str(stargazer_bin), "gateway", "--config", str(config)],
                            env={**os.environ, "RUST_LOG": "error"},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    cfg = config_of(sentinels)
    workers = [Worker(cfg, p) for p in platforms]
    confirmed: list[str] = []
    try:
        async def produce(w: Worker) -> None:
            for i in range(per_platform):
                pub = await w.send(f"c{i % CHANNELS}", f"{w.platform} {i}", message_key=f"sg:msg:{w.platform}:{i}")
                confirmed.append(pub.message_key or "")

        producers = [asyncio.create_task(produce(w)) for w in workers]
        while len(confirmed) < len(platforms) * per_platform // 3:
            assert not any(t.done() for t in producers), [t.exception() for t in producers if t.done()]
            await asyncio.sleep(0.01)
        old, new = await asyncio.to_thread(sentinels.failover)
        await asyncio.wait_for(asyncio.gather(*producers), 120)
        deadline = asyncio.get_running_loop().time() + 120
        while not set(confirmed) <= {b["idempotency_key"] for b in rx.bodies()}:
            assert asyncio.get_running_loop().time() < deadline, "confirmed messages were not delivered"
            await asyncio.sleep(0.05)
        got = rx.bodies()
        keys = Counter(b["idempotency_key"] for b in got)
        seen: set[str] = set()
        out_of_order = 0
        last: dict[tuple[str, str], int] = {}
        for b in got:
            if b["idempotency_key"] in seen:
                continue
            seen.add(b["idempotency_key"])
            ch = (b["platform"], b["channel_id"])
            if b["seq"] <= last.get(ch, 0):
                out_of_order += 1
            last[ch] = b["seq"]
        primary_now = redis.Redis(port=new)
        try:
            entries = sum(primary_now.xlen(w.keys.outbound) for w in workers)
        finally:
            primary_now.close()
        figures = {"published": len(confirmed), "stream entries": entries,
                   "stream copies (written again by the worker)": entries - len(confirmed),
                   "delivered (distinct)": len(keys),
                   "resent at the platform": sum(n - 1 for n in keys.values()),
                   "out of order": out_of_order, "lost": len(set(confirmed) - set(keys))}
        print(f"\nsentinel gateway failover {old} -> {new}: {figures}")
        assert figures["lost"] == figures["out of order"] == 0
        assert figures["delivered (distinct)"] == figures["published"] == len(platforms) * per_platform
    finally:
        await asyncio.gather(*[w.aclose() for w in workers])
        stop_process(proc, 10)
        rx.server.shutdown()


def config_of(s: SentinelSet) -> RedisConfig:
    return config(s, wait_replicas=1, wait_timeout_ms=500)
