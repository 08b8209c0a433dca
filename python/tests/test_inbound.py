"""Inbound events: at least once, acknowledged only after the handler returned."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis.asyncio

from stargazer_client import InboundEvent, Worker


async def say(r: redis.asyncio.Redis, worker: Worker, text: str, **extra: Any) -> str:
    """Publish an inbound event the way a gateway does (src/inbound.rs)."""
    event = {"type": "message", "platform": worker.platform, "channel_id": "c1",
             "user_id": "7", "user_name": "ada", "text": text, "message_id": f"m-{text}",
             "ts_ms": 1795750587165, **extra}
    entry_id = await r.xadd(worker.keys.inbound, {"payload": json.dumps(event)})
    return str(entry_id.decode())


async def pending(r: redis.asyncio.Redis, worker: Worker) -> int:
    info = await r.xpending(worker.keys.inbound, worker.keys.worker_group)
    return int(info["pending"])


async def test_events_in_order_acked_after_the_body(worker: Worker, r: redis.asyncio.Redis) -> None:
    ids = [await say(r, worker, f"hello {i}") for i in range(3)]
    seen: list[InboundEvent] = []
    async for ev in worker.inbound("bot-1"):
        # the event being handled is still pending: a crash now would redeliver it
        assert await pending(r, worker) >= 1
        seen.append(ev)
        if len(seen) == 3:
            break
    assert [e.stream_id for e in seen] == ids
    first = seen[0]
    assert (first.type, first.channel_id, first.user_name, first.text, first.message_id) == (
        "message", "c1", "ada", "hello 0", "m-hello 0")
    assert first.platform == worker.platform and first.ts_ms == 1795750587165
    # `break` left the third unacknowledged; the first two are done
    assert await pending(r, worker) == 1


async def test_a_failing_body_gets_the_event_again(worker: Worker, r: redis.asyncio.Redis) -> None:
    await say(r, worker, "a")
    await say(r, worker, "b")
    consumer = worker.inbound("bot-1", retry_after=0.05)
    texts: list[str | None] = []
    while True:
        try:
            async for ev in consumer:
                texts.append(ev.text)
                if ev.text == "a" and texts.count("a") < 3:
                    raise RuntimeError("the model server is down")
                if ev.text == "b":
                    await consumer.ack(ev)
                    break
            break
        except RuntimeError:
            continue  # a supervisor loop: iterate again, the event comes back
    assert texts == ["a", "a", "a", "b"]
    assert await pending(r, worker) == 0


async def test_run_retries_a_failed_handler_and_keeps_going(worker: Worker, r: redis.asyncio.Redis) -> None:
    for t in ("a", "b", "c"):
        await say(r, worker, t)
    calls: list[str] = []
    stop = asyncio.Event()

    async def handler(ev: InboundEvent) -> None:
        calls.append(ev.text or "")
        if ev.text == "b" and calls.count("b") < 3:
            raise ValueError("flaky")
        if ev.text == "c":
            stop.set()

    await asyncio.wait_for(worker.inbound("bot-1", retry_after=0.01).run(handler, stop=stop), 10)
    assert calls == ["a", "b", "b", "b", "c"]
    assert await pending(r, worker) == 0


async def test_a_restarted_worker_takes_its_own_pending_back(worker: Worker, r: redis.asyncio.Redis) -> None:
    await say(r, worker, "x")
    async for ev in worker.inbound("bot-1"):
        break  # "crash" while handling: never acknowledged
    later = await say(r, worker, "y")
    fresh = worker.inbound("bot-1")  # the same name after a restart
    got = []
    async for ev in fresh:
        got.append(ev.text)
        if ev.stream_id == later:
            break
    assert got == ["x", "y"]


async def test_claim_idle_takes_over_a_dead_consumers_events(worker: Worker, r: redis.asyncio.Redis) -> None:
    await say(r, worker, "orphan")
    async for _ in worker.inbound("dead-worker"):
        break
    assert await pending(r, worker) == 1
    other = worker.inbound("live-worker", claim_idle=0.2, block=0.1)
    ev = await asyncio.wait_for(other.__aiter__().__anext__(), 5)
    assert ev.text == "orphan"
    await other.ack(ev)
    assert await pending(r, worker) == 0


async def test_bad_entries_are_dead_lettered_not_handed_over(worker: Worker, r: redis.asyncio.Redis) -> None:
    await r.xadd(worker.keys.inbound, {"payload": "{not json"})
    await r.xadd(worker.keys.inbound, {"payload": json.dumps({"type": "message"})})
    await r.xadd(worker.keys.inbound, {"other": "x"})
    good = await say(r, worker, "fine")
    async for ev in worker.inbound("bot-1"):
        assert ev.stream_id == good
        break
    dlq = await r.xrange(worker.keys.inbound_dlq)
    errors = [f[b"error"].decode() for _, f in dlq]
    assert len(errors) == 3
    assert "not JSON" in errors[0] and "channel_id" in errors[1] and "payload" in errors[2]
    assert {f[b"original_id"] for _, f in dlq} and await pending(r, worker) == 1


async def test_an_event_failing_max_attempts_times_is_dead_lettered(worker: Worker, r: redis.asyncio.Redis) -> None:
    await say(r, worker, "poison")
    await say(r, worker, "next")
    stop = asyncio.Event()
    seen: list[str] = []

    async def handler(ev: InboundEvent) -> None:
        seen.append(ev.text or "")
        if ev.text == "poison":
            raise KeyError("always")
        stop.set()

    await asyncio.wait_for(
        worker.inbound("bot-1", retry_after=0, max_attempts=3).run(handler, stop=stop), 10
    )
    assert seen == ["poison"] * 3 + ["next"]
    (_, f), = await r.xrange(worker.keys.inbound_dlq)
    assert b"failed 3 times" in f[b"error"] and b"KeyError" in f[b"error"]
    assert await pending(r, worker) == 0


async def test_unknown_fields_are_kept_as_extra(worker: Worker, r: redis.asyncio.Redis) -> None:
    await say(r, worker, "x", guild_id="g1", custom_id=None)
    async for ev in worker.inbound("bot-1"):
        assert ev.extra == {"guild_id": "g1"}
        break


async def test_groups_each_get_every_event(worker: Worker, r: redis.asyncio.Redis) -> None:
    await say(r, worker, "both")
    a = worker.inbound("w", group="pool-a")
    b = worker.inbound("w", group="pool-b")
    ea = await a.__aiter__().__anext__()
    eb = await b.__aiter__().__anext__()
    assert ea.text == eb.text == "both"


def test_event_parsing_names_the_problem() -> None:
    with pytest.raises(ValueError, match="channel_id"):
        InboundEvent.from_payload(b'{"type": "message"}')
    with pytest.raises(ValueError, match="ts_ms"):
        InboundEvent.from_payload(b'{"type": "message", "channel_id": "c", "ts_ms": "soon"}')
    with pytest.raises(ValueError, match="text"):
        InboundEvent.from_payload(b'{"type": "message", "channel_id": "c", "text": 5}')
    ev = InboundEvent.from_payload(b'{"type": "button", "channel_id": "c", "custom_id": "yes", "ts_ms": 1.7e12}')
    assert ev.custom_id == "yes" and ev.ts_ms == 1_700_000_000_000


def test_consumer_settings_are_checked(worker: Worker) -> None:
    for kwargs in ({"count": 0}, {"block": -1}, {"max_attempts": 0}, {"claim_idle": 0}, {"group": ""}):
        with pytest.raises(ValueError):
            worker.inbound("c", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        worker.inbound("")
