"""RPC round trips against a responder that plays the gateway's documented reply
contract (SPEC G9: RPUSH of JSON onto `reply_key`, 60 s expiry, `{"error": …}`
on failure, a request past its `deadline_ms` dropped)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio

from rust_rules import Rules, parse_entry
from stargazer_client import HistoryMessage, RpcError, RpcTimeout, ToolContext, Worker

Answer = Callable[[str, dict[str, Any], dict[str, Any]], Awaitable[Any]]


class Gateway:
    """Answers rpc_request entries of one platform's outbound stream."""

    def __init__(self, r: redis.asyncio.Redis, worker: Worker, answer: Answer) -> None:
        self.r, self.keys, self.answer = r, worker.keys, answer
        self.requests: list[dict[str, Any]] = []
        self.task: asyncio.Task[None] | None = None
        self.answering: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        try:
            await self.r.xgroup_create(self.keys.outbound, self.keys.gateway_group, id="0", mkstream=True)
        except redis.exceptions.ResponseError:
            pass
        self.task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        assert self.task is not None
        for t in (self.task, *self.answering):
            t.cancel()
        await asyncio.gather(self.task, *self.answering, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            got = await self.r.xreadgroup(
                self.keys.gateway_group, "gw", {self.keys.outbound: ">"}, count=10, block=50
            )
            for _, entries in got or []:
                for entry_id, raw in entries:
                    fields = {k.decode(): v for k, v in raw.items()}
                    p = parse_entry(fields, Rules(reply_prefix=self.keys.reply_prefix))
                    if p.type == "rpc_request":
                        t = asyncio.ensure_future(self._answer(p.obj))
                        self.answering.add(t)
                        t.add_done_callback(self.answering.discard)
                    await self.r.xack(self.keys.outbound, self.keys.gateway_group, entry_id)

    async def _answer(self, req: dict[str, Any]) -> None:
        self.requests.append(req)
        if req["deadline_ms"] < time.time() * 1000:
            return
        try:
            result = await self.answer(req["rpc_method"], req["rpc_args"], req)
        except Exception as e:  # noqa: BLE001
            result = {"error": str(e)}
        await self.r.rpush(req["reply_key"], json.dumps(result))
        await self.r.expire(req["reply_key"], 60)


HISTORY = [
    {"user_id": "7", "user_name": "ada", "text": "hi", "timestamp": 1.5, "message_id": "m1",
     "is_bot": False, "reply_to_id": None, "reactions": []},
    {"user_id": "bot", "user_name": "bot", "text": "hello", "timestamp": 2.5, "message_id": "m2",
     "is_bot": True, "reply_to_id": "m1", "reactions": [{"emoji": "👍", "count": 2}]},
]


async def answer(method: str, args: dict[str, Any], req: dict[str, Any]) -> Any:
    if method == "fetch_channel_history":
        return HISTORY[-args.get("limit", 10):]
    if method == "should_skip_channel_heartbeat":
        return args["channel_id"] == "quiet"
    if method == "execute_tool":
        if args["tool_name"] != "dice":
            raise ValueError(f"no tool named `{args['tool_name']}`")
        return {"rolled": 4, "sides": args["tool_args"]["sides"], "ctx": args["tool_ctx"],
                "channel": req.get("channel_id")}
    if method == "list_tools":
        return [{"name": "dice", "description": "roll", "parameters": {"type": "object"}}]
    if method == "slow":
        await asyncio.sleep(args["s"])
        return "late"
    if method == "echo":
        return args
    if method == "bad_history":
        return "not a list"
    raise ValueError(f"the adapter has no RPC method `{method}`")


@pytest.fixture
async def gateway(worker: Worker, r: redis.asyncio.Redis) -> AsyncIterator[Gateway]:
    gw = Gateway(r, worker, answer)
    await gw.start()
    yield gw
    await gw.stop()


async def test_round_trip(worker: Worker, gateway: Gateway, r: redis.asyncio.Redis) -> None:
    before = int(time.time() * 1000)
    assert await worker.rpc("echo", {"a": [1, "ü"]}, timeout=5) == {"a": [1, "ü"]}
    (req,) = gateway.requests
    assert req["reply_key"].startswith(f"sg:{{{worker.platform}}}:rpc:reply:")
    assert before + 5000 <= req["deadline_ms"] <= int(time.time() * 1000) + 5000
    assert "channel_id" not in req
    # the reply list is gone once read
    assert await r.exists(req["reply_key"]) == 0


async def test_typed_helpers(worker: Worker, gateway: Gateway) -> None:
    history = await worker.fetch_history("c1", limit=5)
    assert history == [HistoryMessage.from_json(m) for m in HISTORY]
    assert history[1].reply_to_id == "m1" and history[1].is_bot
    assert history[1].to_dict() == HISTORY[1]
    assert await worker.should_skip_channel_heartbeat("quiet") is True
    assert await worker.should_skip_channel_heartbeat("busy") is False
    rolled = await worker.execute_tool(
        "dice", {"sides": 20}, tool_ctx=ToolContext(channel_id="c9", user_name="ada")
    )
    assert rolled["sides"] == 20 and rolled["ctx"]["user_name"] == "ada"
    assert rolled["channel"] == "c9"  # the request is on behalf of the context's channel
    assert (await worker.list_tools())[0]["name"] == "dice"
    req = next(q for q in gateway.requests if q["rpc_method"] == "fetch_channel_history")
    assert req["channel_id"] == "c1" and req["rpc_args"] == {"channel_id": "c1", "limit": 5}


async def test_an_error_reply_raises_rpc_error(worker: Worker, gateway: Gateway) -> None:
    with pytest.raises(RpcError, match="no tool named `nope`") as e:
        await worker.execute_tool("nope")
    assert e.value.method == "execute_tool"
    with pytest.raises(RpcError, match="has no RPC method"):
        await worker.rpc("frobnicate")


async def test_a_reply_of_the_wrong_shape_raises_rpc_error(worker: Worker, gateway: Gateway) -> None:
    async def wrong(method: str, args: dict[str, Any], req: dict[str, Any]) -> Any:
        return "not a list"

    gateway.answer = wrong
    with pytest.raises(RpcError, match="expected a list"):
        await worker.fetch_history("c")
    with pytest.raises(RpcError, match="expected a boolean"):
        await worker.should_skip_channel_heartbeat("c")


async def test_no_gateway_times_out(worker: Worker) -> None:
    t0 = time.monotonic()
    with pytest.raises(RpcTimeout, match="is a gateway running") as e:
        await worker.rpc("echo", timeout=0.3)
    assert 0.25 < time.monotonic() - t0 < 2.5
    assert isinstance(e.value, TimeoutError)


async def test_a_late_reply_is_a_timeout(worker: Worker, gateway: Gateway) -> None:
    with pytest.raises(RpcTimeout):
        await worker.rpc("slow", {"s": 1.0}, timeout=0.3)


async def test_many_calls_at_once_do_not_block_publishing(worker: Worker, gateway: Gateway) -> None:
    async def slow_then_echo(method: str, args: dict[str, Any], req: dict[str, Any]) -> Any:
        await asyncio.sleep(0.3)
        return args

    gateway.answer = slow_then_echo
    calls = asyncio.gather(*(worker.rpc("echo", {"i": i}, timeout=5) for i in range(40)))
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await worker.send("c", "while 40 replies are awaited")
    assert time.monotonic() - t0 < 0.2
    assert [r["i"] for r in await calls] == list(range(40))


async def test_rpc_arguments_are_checked_before_publishing(worker: Worker, r: redis.asyncio.Redis) -> None:
    with pytest.raises(ValueError):
        await worker.rpc("", {})
    with pytest.raises(ValueError):
        await worker.rpc("m", {"x": object()})
    with pytest.raises(ValueError):
        await worker.rpc("m", {"x": float("nan")})
    with pytest.raises(TypeError):
        await worker.rpc("m", ["not", "a", "mapping"])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await worker.rpc("m", timeout=0)
    with pytest.raises(ValueError):
        await worker.fetch_history("c", limit=0)
    assert await r.exists(worker.keys.outbound) == 0


async def test_signed_rpc_requests(redis_url: str, platform: str, r: redis.asyncio.Redis) -> None:
    async with Worker(redis_url, platform, secret=b"k") as w:
        with pytest.raises(RpcTimeout):
            await w.rpc("echo", timeout=0.1)
        (_, fields), = await r.xrange(w.keys.outbound)
        parse_entry({k.decode(): v for k, v in fields.items()},
                    Rules(reply_prefix=w.keys.reply_prefix, signing_secret=b"k"))
