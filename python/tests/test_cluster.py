"""Redis Cluster mode, on a private 3-primary cluster made with
`redis-cli --cluster create`: publishing for 10 platforms spread over all
primaries (each platform's keys on one slot), publish_many's MULTI, inbound
events read with XREADGROUP … BLOCK, RPC replies awaited with BLPOP, and —
when the binary is built — the Rust gateway delivering all of it in cluster
mode."""

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
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from rust_rules import Rules, parse_entry
from conftest import stop_process
from servers import Cluster, wait_for
from stargazer_client import Envelope, InboundEvent, RedisConfig, Worker

PLATFORMS = [f"cl{i}" for i in range(10)]
CHANNELS = 5
PER_CHANNEL = 20
BATCH = 10


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster(3)
    yield c
    c.stop()


def node_of(c: redis.RedisCluster, key: str) -> str:
    n = c.get_node_from_key(key)
    assert n is not None
    return f"{n.host}:{n.port}"


def all_keys(cluster: Cluster, pattern: str) -> dict[str, str]:
    """Every key matching ``pattern`` on every primary: key → node."""
    out: dict[str, str] = {}
    for n in cluster.nodes:
        for k in n.client.scan_iter(match=pattern, count=1000):
            out[k.decode()] = f"127.0.0.1:{n.port}"
    return out


def decode(worker: Worker, fields: dict[bytes, bytes]) -> Any:
    return parse_entry({k.decode(): v for k, v in fields.items()},
                       Rules(reply_prefix=worker.keys.reply_prefix))


async def test_ten_platforms_publish_across_the_cluster(cluster: Cluster) -> None:
    """Every platform's envelopes land on the primary of its hash tag's slot, in
    seq order per channel, none lost or repeated; platforms use all 3 primaries."""
    seeds = cluster.urls
    workers = [Worker(RedisConfig(cluster=[seeds[i % len(seeds)]]), p) for i, p in enumerate(PLATFORMS)]
    try:
        assert {w.mode for w in workers} == {"cluster"}

        async def publish(w: Worker) -> list[str]:
            keys = []
            for i in range(PER_CHANNEL):
                # the channels of one platform interleave, each publish a round trip
                sent = await asyncio.gather(*[w.send(f"c{c}", f"hello {i}") for c in range(CHANNELS)])
                keys += [s.message_key or "" for s in sent]
            # one MULTI on the platform's slot
            batch = await w.publish_many([Envelope.message("c0", f"batch {j}") for j in range(BATCH)])
            keys += [b.message_key or "" for b in batch]
            await w.react("c1", "m-1", "👍")  # a strict kind without a message key
            return keys

        published = await asyncio.gather(*[publish(w) for w in workers])
        await asyncio.gather(*[w.ping() for w in workers])
    finally:
        await asyncio.gather(*[w.aclose() for w in workers])

    rc = cluster.client()
    try:
        nodes = set()
        totals = Counter[str]()
        for w, keys in zip(workers, published):
            p = w.platform
            node = node_of(rc, w.keys.outbound)
            nodes.add(node)
            # every key of the platform is in one slot, on that slot's primary
            own = all_keys(cluster, f"sg:{{{p}}}:*")
            assert w.keys.outbound in own and w.keys.channel("c0") in own
            assert {key_slot(k.encode()) for k in own} == {key_slot(w.keys.outbound.encode())}
            assert set(own.values()) == {node}
            entries = rc.xrange(w.keys.outbound)
            got = [decode(w, f) for _, f in entries]
            totals["published"] += len(keys) + 1
            totals["read"] += len(got)
            by_key = Counter(g.message_key for g in got if g.message_key)
            totals["duplicated"] += sum(n - 1 for n in by_key.values())
            totals["lost"] += len(set(keys) - set(by_key))
            seqs: dict[str, list[int]] = defaultdict(list)
            for g in got:
                seqs[g.channel_id].append(g.seq)
            expected = {f"c{c}": PER_CHANNEL for c in range(CHANNELS)}
            expected["c0"] += BATCH
            expected["c1"] += 1
            for ch, n in expected.items():
                assert seqs[ch] == list(range(1, n + 1)), (p, ch, seqs[ch])
            reaction = next(g for g in got if g.type == "reaction")
            assert reaction.obj["idempotency_key"].startswith(f"{p}:py:")
        print(f"\ncluster publish: {dict(totals)} over {len(nodes)} primaries")
        assert totals["published"] == totals["read"] == len(PLATFORMS) * (CHANNELS * PER_CHANNEL + BATCH + 1)
        assert totals["duplicated"] == totals["lost"] == 0
        assert len(nodes) == 3, f"the 10 platforms landed on {nodes} only"
    finally:
        rc.close()


async def test_inbound_blocking_reads_in_cluster_mode(cluster: Cluster) -> None:
    """One consumer per platform blocks in XREADGROUP … BLOCK on its slot's
    primary; events published afterwards reach it in order, a bad entry is
    dead-lettered (XADD + XACK in one MULTI on the slot), nothing stays pending."""
    n_events = 20
    platforms = [f"in{p}" for p in PLATFORMS]
    workers = [Worker(RedisConfig(cluster=cluster.urls), p) for p in platforms]
    got: dict[str, list[InboundEvent]] = {p: [] for p in platforms}
    stops = {p: asyncio.Event() for p in platforms}

    async def consume(w: Worker) -> None:
        async def handle(ev: InboundEvent) -> None:
            got[w.platform].append(ev)
            if len(got[w.platform]) == n_events:
                stops[w.platform].set()

        await w.inbound("py-bot", block=5.0).run(handle, stop=stops[w.platform])

    tasks = [asyncio.create_task(consume(w)) for w in workers]
    gw = RedisCluster.from_url(cluster.urls[0])
    try:
        def blocked() -> int:
            n = 0
            for node in cluster.nodes:
                for c in node.client.client_list():
                    if c.get("cmd") == "xreadgroup" and "b" in c.get("flags", ""):
                        n += 1
            return n

        await asyncio.to_thread(wait_for, "every consumer to block in XREADGROUP",
                                lambda: blocked() == len(platforms))
        for w in workers:
            await gw.xadd(w.keys.inbound, {"payload": b"not json"})
            for i in range(n_events):
                event = {"type": "message", "channel_id": "c1", "user_name": "ada", "text": f"hi {i}",
                         "platform": w.platform}
                await gw.xadd(w.keys.inbound, {"payload": json.dumps(event).encode()})
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        for w in workers:
            assert [e.text for e in got[w.platform]] == [f"hi {i}" for i in range(n_events)]
            pending = await gw.xpending(w.keys.inbound, w.keys.worker_group)
            assert pending["pending"] == 0
            dlq = await gw.xrange(w.keys.inbound_dlq)
            assert len(dlq) == 1 and b"not JSON" in dlq[0][1][b"error"]
        print(f"\ncluster inbound: {sum(len(v) for v in got.values())} events read by "
              f"{len(platforms)} blocked consumers, {len(platforms)} dead-lettered")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await gw.aclose()
        await asyncio.gather(*[w.aclose() for w in workers])


async def test_rpc_round_trips_in_cluster_mode(cluster: Cluster) -> None:
    """A request lands on the platform's stream, the reply list is on the same
    slot, and the worker's BLPOP on the blocking cluster client gets the reply."""
    platforms = [f"rpc{p}" for p in PLATFORMS]
    # A caller's own RedisCluster client works too (and stays the caller's).
    own = RedisCluster.from_url(cluster.urls[1])
    workers = [Worker(own, p) for p in platforms]
    answered: list[str] = []

    async def fake_gateway(w: Worker) -> None:
        last = "0"
        while True:
            res = await own.xread({w.keys.outbound: last}, block=1000, count=10)
            for _stream, items in res or []:
                for entry_id, fields in items:
                    last = entry_id
                    env = json.loads(fields[b"payload"])
                    assert env["type"] == "rpc_request"
                    assert key_slot(env["reply_key"].encode()) == key_slot(w.keys.outbound.encode())
                    answered.append(w.platform)
                    await own.rpush(env["reply_key"], json.dumps({"echo": env["rpc_args"], "p": w.platform}))

    await own.initialize()  # before tasks share it: see python/README.md (cluster)
    responders = [asyncio.create_task(fake_gateway(w)) for w in workers]
    try:
        replies = await asyncio.gather(*[w.rpc("echo", {"n": i}, timeout=10) for i, w in enumerate(workers)])
        assert replies == [{"echo": {"n": i}, "p": p} for i, p in enumerate(platforms)]
        assert sorted(answered) == sorted(platforms)
    finally:
        for t in responders:
            t.cancel()
        await asyncio.gather(*responders, return_exceptions=True)
        await asyncio.gather(*[w.aclose() for w in workers])
        assert await own.ping()  # not closed by the workers
        await own.aclose()


async def test_the_gateway_delivers_ten_platforms_from_a_cluster(
    cluster: Cluster, stargazer_bin: Path, tmp_path: Path
) -> None:
    """Cross-language: `stargazer gateway` with `[redis] cluster = [...]` delivers
    what the package published for 10 platforms, once each, in seq order."""
    from test_gateway import Receiver

    rx = Receiver()
    platforms = [f"gw{p}" for p in PLATFORMS]
    per_channel = 20
    seeds = ", ".join(f'"{u}"' for u in cluster.urls)
    blocks = "".join(f'[[platform]]\nname = "{p}"\nadapter = "webhook"\nurl = "{rx.url}"\n'
                     for p in platforms)
    config = tmp_path / "stargazer.toml"
    config.write_text(f"""
[redis]
cluster = [{seeds}]
[gateway]
consumer_name = "py-cluster-gw"
[consumer]
block_ms = 100
drain_timeout_ms = 3000
{blocks}""")
    proc = subprocess.Popen([str(stargazer_bin), "gateway", "--config", str(config)],
                            env={**os.environ, "RUST_LOG": "warn"},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    workers = [Worker(RedisConfig(cluster=cluster.urls), p) for p in platforms]
    try:
        async def publish(w: Worker) -> None:
            for i in range(per_channel):
                await asyncio.gather(*[w.send(f"c{c}", f"{w.platform} {i}") for c in range(CHANNELS)])

        await asyncio.gather(*[publish(w) for w in workers])
        total = len(platforms) * CHANNELS * per_channel
        got = await rx.wait(total, within=120)
        keys = Counter(b["idempotency_key"] for b in got)
        assert len(keys) == total and max(keys.values()) == 1
        for p in platforms:
            for c in range(CHANNELS):
                seqs = [b["seq"] for b in got if b["platform"] == p and b["channel_id"] == f"c{c}"]
                assert seqs == list(range(1, per_channel + 1)), (p, c, seqs)
        print(f"\ncluster gateway: {total} published, {len(got)} delivered, 0 duplicated, 0 lost")
    finally:
        await asyncio.gather(*[w.aclose() for w in workers])
        stop_process(proc, 10)
        rx.server.shutdown()


def test_platform_keys_share_one_slot() -> None:
    """The hash tag puts every key the package names for a platform on one slot."""
    from stargazer_client import Keys

    k = Keys("sg", "discord")
    names = [k.outbound, k.inbound, k.inbound_dlq, k.channel("42"), k.reply_prefix + "abc"]
    assert len({key_slot(n.encode()) for n in names}) == 1
    assert key_slot(k.outbound.encode()) == key_slot(b"discord")
