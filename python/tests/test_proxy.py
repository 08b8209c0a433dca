"""The drop-in adapter: the reference's method names and call shapes, published
as Stargazer envelopes."""

from __future__ import annotations

import asyncio
import inspect
import json
from typing import Any

import redis.asyncio

from rust_rules import Rules, parse_entry
from stargazer_client import ProxyPlatformAdapter, Worker

# How the reference calls a platform adapter (its gateway-side dispatch and RPC
# handler), i.e. the signatures worker code written for it relies on.
REFERENCE_CALLS: dict[str, list[str]] = {
    "send": ["channel_id", "text"],
    "send_file": ["channel_id", "data", "filename", "mimetype"],
    "send_with_buttons": ["channel_id", "text", "buttons"],
    "start_typing": ["channel_id"],
    "stop_typing": ["channel_id"],
    "add_reaction": ["channel_id", "message_id", "emoji"],
    "set_presence": ["text", "emoji"],
    "fetch_history": ["channel_id", "limit"],
    "should_skip_channel_heartbeat": ["channel_id"],
    "execute_tool": ["tool_name", "tool_args", "tool_ctx"],
}


def test_the_reference_methods_exist_with_their_parameters() -> None:
    for name, params in REFERENCE_CALLS.items():
        method = getattr(ProxyPlatformAdapter, name)
        assert inspect.iscoroutinefunction(method), name
        got = list(inspect.signature(method).parameters)[1 : 1 + len(params)]
        assert got == params, f"{name}{got}"
    assert inspect.signature(ProxyPlatformAdapter.fetch_history).parameters["limit"].default == 10


async def stream(r: redis.asyncio.Redis, adapter: ProxyPlatformAdapter) -> list[dict[str, Any]]:
    keys = adapter.worker.keys
    out = []
    for _, f in await r.xrange(keys.outbound):
        p = parse_entry({k.decode(): v for k, v in f.items()}, Rules(reply_prefix=keys.reply_prefix))
        out.append(p.obj | {"_action": p.action})
    return out


async def test_seed_style_calls_publish_envelopes(redis_url: str, platform: str, r: redis.asyncio.Redis) -> None:
    redis_client = redis.asyncio.Redis.from_url(redis_url)
    adapter = ProxyPlatformAdapter(redis_client, platform)
    assert adapter.name == platform
    await adapter.start()
    # exactly as the reference's dispatch calls an adapter, positionally
    key = await adapter.send("42", "hello")
    await adapter.send_file("42", b"\x89PNG", "chart.png", "image/png")
    await adapter.send_with_buttons("42", "pick", [{"label": "Yes", "custom_id": "yes"}])
    await adapter.start_typing("42")
    await adapter.stop_typing("42")
    await adapter.add_reaction("42", "1234", "⭐")
    await adapter.set_presence("watching", None)
    assert key is not None
    await adapter.edit_message("42", key, "hello again")   # by the key send returned
    await adapter.delete_message("42", "1234")             # by platform id
    got = await stream(r, adapter)
    assert [g["type"] for g in got] == [
        "message", "file", "buttons", "start_typing", "stop_typing", "reaction", "presence",
        "edit", "delete",
    ]
    assert [g.get("seq") for g in got] == [1, 2, 3, None, None, 4, None, 5, 6]
    assert got[0]["message_key"] == key
    assert got[1]["_action"]["data"] == b"\x89PNG"
    assert got[3]["expires_ms"] - got[3]["created_ms"] == 10_000
    assert got[7]["target_key"] == key and got[8]["message_id"] == "1234"
    await adapter.stop()
    assert await redis_client.ping()  # the caller's client stays open
    await redis_client.aclose()


async def test_reacting_to_an_own_message_waits_for_its_platform_id(
    worker: Worker, r: redis.asyncio.Redis
) -> None:
    adapter = ProxyPlatformAdapter(worker, rpc_timeout=3)
    key = await adapter.send("c", "react to me")
    assert key is not None

    async def gateway_sends() -> None:
        await asyncio.sleep(0.1)
        await r.hset(key, "message_id", "987")

    asyncio.ensure_future(gateway_sends())
    await adapter.add_reaction("c", key, "👀")
    reaction = (await stream(r, adapter))[-1]
    assert reaction["type"] == "reaction" and reaction["message_id"] == "987"


async def test_rpc_methods_go_to_the_gateway(worker: Worker, r: redis.asyncio.Redis) -> None:
    adapter = ProxyPlatformAdapter(worker, rpc_timeout=0.2)
    for call in (
        adapter.fetch_history("c", limit=3),
        adapter.should_skip_channel_heartbeat("c"),
        adapter.execute_tool("dice", {"sides": 6}, {"user_id": "7"}),
        adapter.call("delete_egregore_webhook", guild_id="g", webhook_id="w"),
    ):
        try:
            await call
        except TimeoutError:
            pass  # no gateway here: test_gateway.py does the round trips
    got = await stream(r, adapter)
    assert [(g["rpc_method"], g["rpc_args"]) for g in got] == [
        ("fetch_channel_history", {"channel_id": "c", "limit": 3}),
        ("should_skip_channel_heartbeat", {"channel_id": "c"}),
        ("execute_tool", {"tool_name": "dice", "tool_args": {"sides": 6}, "tool_ctx": {"user_id": "7"}}),
        ("delete_egregore_webhook", {"guild_id": "g", "webhook_id": "w"}),
    ]
    assert json.dumps(got[0]["reply_key"]).startswith(f'"sg:{{{worker.platform}}}:rpc:reply:')
