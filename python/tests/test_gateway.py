"""Cross-language: the package against the real `stargazer` gateway binary (the
webhook adapter POSTing to a receiver in this process, the console adapter for
history), and against `stargazer send`. Skipped when the binary is not built."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from conftest import REPO, free_port, stop_process
from stargazer_client import Envelope, InboundEvent, RpcError, ToolContext, Worker


class Receiver:
    """The webhook platform: records every POST, answers with a message id."""

    def __init__(self) -> None:
        self.got: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    n = len(outer.got)
                reply = json.dumps({"message_id": f"wh-{n}"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/deliver"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [b for _, b in self.got]

    async def wait(self, n: int, within: float = 20) -> list[dict[str, Any]]:
        deadline = time.monotonic() + within
        while len(self.bodies()) < n:
            assert time.monotonic() < deadline, f"the receiver got {len(self.bodies())} of {n}"
            await asyncio.sleep(0.02)
        return self.bodies()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rx = Receiver()
    yield rx
    rx.server.shutdown()


GatewayFactory = Callable[..., Any]


@pytest.fixture
def gateway(stargazer_bin: Path, redis_url: str, platform: str, receiver: Receiver,
            tmp_path: Path) -> Iterator[GatewayFactory]:
    """Start `stargazer gateway` for the webhook platform `<platform>` and the
    console platform `<platform>-console`; stopped with SIGTERM afterwards."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(consumer: str = "", http_port: int | None = None) -> subprocess.Popen[bytes]:
        listen = f'[http]\nlisten = "127.0.0.1:{http_port}"\n' if http_port else ""
        config = tmp_path / "stargazer.toml"
        config.write_text(f"""
[redis]
url = "{redis_url}"
cache_prefix = "sg:msg:"
[gateway]
consumer_name = "py-gw"
[consumer]
autoclaim_interval_ms = 200
autoclaim_min_idle_ms = 1500
lock_ttl_ms = 900
block_ms = 100
drain_timeout_ms = 3000
{consumer}
{listen}
[[platform]]
name = "{platform}"
adapter = "webhook"
url = "{receiver.url}"
[[platform]]
name = "{platform}-console"
adapter = "console"
""")
        proc = subprocess.Popen(
            [str(stargazer_bin), "gateway", "--config", str(config)],
            env={**os.environ, "RUST_LOG": "warn"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        stop_process(p, 10)


async def dead_letters(r: redis.asyncio.Redis, worker: Worker) -> list[dict[str, str]]:
    dlq = f"sg:{{{worker.platform}}}:outbound:dlq"
    return [{k.decode(): v.decode() for k, v in f.items()} for _, f in await r.xrange(dlq)]


async def wait_dead_letters(r: redis.asyncio.Redis, worker: Worker, n: int, within: float = 20) -> list[dict[str, str]]:
    deadline = time.monotonic() + within
    while len(got := await dead_letters(r, worker)) < n:
        assert time.monotonic() < deadline, f"{len(got)} of {n} dead letters"
        await asyncio.sleep(0.05)
    return got


async def test_every_type_is_delivered(worker: Worker, gateway: GatewayFactory, receiver: Receiver) -> None:
    gateway()
    sent = await worker.send("c1", "hello", reply_to="m0", buttons=[("More", "more")])
    await worker.send_file("c1", b"\x00bytes\xff", "a.bin", "application/x-test", text="caption")
    await worker.send_buttons("c1", "pick", [("Docs", "https://example.org"), ("Yes", "yes")])
    await worker.react("c1", "m0", "👍")
    await worker.set_presence("watching the stars", "🔭")
    await worker.start_typing("c2", ttl=30)
    await receiver.wait(6)
    await worker.stop_typing("c2")  # after the start was sent: it would supersede a queued one
    got = await receiver.wait(7)
    by_action = {b["action"]: b for b in got}
    assert set(by_action) == {"send_message", "send_file", "send_buttons", "add_reaction",
                              "set_presence", "start_typing", "stop_typing"}
    m = by_action["send_message"]
    assert (m["text"], m["channel_id"], m["seq"], m["reply_to"]) == ("hello", "c1", 1, "m0")
    assert m["buttons"] == [{"label": "More", "custom_id": "more"}]
    assert m["idempotency_key"] == sent.message_key  # defaults to the message key
    f = by_action["send_file"]
    assert base64.b64decode(f["data_base64"]) == b"\x00bytes\xff"
    assert (f["filename"], f["mimetype"], f["text"], f["seq"]) == ("a.bin", "application/x-test", "caption", 2)
    assert by_action["send_buttons"]["buttons"][0] == {"label": "Docs", "url": "https://example.org"}
    assert (by_action["add_reaction"]["emoji"], by_action["add_reaction"]["seq"]) == ("👍", 4)
    assert by_action["set_presence"]["text"] == "watching the stars"
    # strict kinds of one channel arrive in seq order
    assert [b["seq"] for b in got if b.get("channel_id") == "c1"] == [1, 2, 3, 4]
    # the gateway wrote the platform's id back to the message key
    assert sent.message_key is not None
    assert (await worker.message_id(sent.message_key, wait=5) or "").startswith("wh-")


async def test_edit_and_delete_by_target_key(worker: Worker, gateway: GatewayFactory, receiver: Receiver,
                                             r: redis.asyncio.Redis) -> None:
    gateway()
    sent = await worker.send("c", "thinking…")
    await worker.edit("c", "the answer", target_key=sent.message_key)
    await worker.delete("c", target_key=sent.message_key)
    deadline = time.monotonic() + 20
    while len(receiver.bodies()) < 3:
        dlq = await dead_letters(r, worker)
        if any(d.get("error_kind") == "unknown_type" for d in dlq):
            pytest.skip("this gateway binary predates `edit`/`delete` (SPEC §1)")
        assert time.monotonic() < deadline, (receiver.bodies(), dlq)
        await asyncio.sleep(0.05)
    send, edit, delete = receiver.bodies()
    # the target's platform id, resolved by the gateway from the send's message key
    assert (edit["action"], edit["text"], edit["message_id"]) == ("edit_message", "the answer", "wh-1")
    assert (delete["action"], delete["message_id"]) == ("delete_message", "wh-1")
    assert [b["seq"] for b in (send, edit, delete)] == [1, 2, 3]


async def test_seq_interleaves_with_stargazer_send(stargazer_bin: Path, worker: Worker, redis_url: str,
                                                   r: redis.asyncio.Redis, gateway: GatewayFactory,
                                                   receiver: Receiver) -> None:
    """The Rust CLI and the package take numbers from the same counter: no gap,
    no duplicate, and the gateway delivers the mix in seq order."""
    rust = await asyncio.create_subprocess_exec(
        str(stargazer_bin), "send", "--redis-url", redis_url, "--platform", worker.platform,
        "--channel", "shared", "--count", "150", "from rust",
        stdout=asyncio.subprocess.DEVNULL,
    )
    for i in range(100):
        await worker.send("shared", f"from python #{i + 1}")
    await worker.publish_many([Envelope.message("shared", f"batch {i}") for i in range(50)])
    assert await rust.wait() == 0
    entries = await r.xrange(worker.keys.outbound)
    payloads = [json.loads(f[b"payload"]) for _, f in entries]
    assert sorted(p["seq"] for p in payloads) == list(range(1, 301))
    by_rust = [p for p in payloads if p["text"].startswith("from rust")]
    assert len(by_rust) == 150
    gateway()
    got = await receiver.wait(300, within=60)
    assert [b["seq"] for b in got] == list(range(1, 301))


async def test_signed_envelopes_verify_in_the_gateway(redis_url: str, platform: str, gateway: GatewayFactory,
                                                      receiver: Receiver, r: redis.asyncio.Redis) -> None:
    gateway(consumer='signing_secret = "py-secret"')
    async with Worker(redis_url, platform, secret="py-secret") as good, \
            Worker(redis_url, platform, secret="wrong") as forged, \
            Worker(redis_url, platform) as unsigned:
        await good.send("c", "signed")
        # (other channels: a forged producer's seq numbers must not hold up `c`)
        await forged.send("x", "forged")
        await unsigned.send("y", "unsigned")
        await good.publish_many([Envelope.message("c", "signed batch"), Envelope.presence("p")])
        got = await receiver.wait(3)
        dlq = await wait_dead_letters(r, good, 2)
        assert sorted(b.get("text") for b in got) == ["p", "signed", "signed batch"]
        assert [d["error_kind"] for d in dlq] == ["bad_signature", "bad_signature"]
        # and a signed RPC is answered
        assert await good.should_skip_channel_heartbeat("c", timeout=10) is False


TOOL = """#!/bin/sh
# reads {"args": {...}, "context": {...}} on stdin, prints it back
input=$(cat)
printf '{"got": %s}' "$input"
"""


async def test_rpc_round_trips(redis_url: str, platform: str, gateway: GatewayFactory, tmp_path: Path) -> None:
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "echo.sh").write_text(TOOL)
    (tools / "echo.sh").chmod(stat.S_IRWXU)
    (tools / "echo.json").write_text(json.dumps({
        "name": "echo", "description": "says it back", "command": "echo.sh",
        "parameters": {"type": "object", "required": ["word"], "properties": {"word": {"type": "string"}}},
    }))
    gateway(consumer=f'tools_dir = "{tools}"')
    async with Worker(redis_url, platform) as hook, Worker(redis_url, f"{platform}-console") as console:
        out = await hook.execute_tool("echo", {"word": "hi"},
                                      tool_ctx=ToolContext(channel_id="c7", user_name="ada"), timeout=10)
        assert out["got"]["args"] == {"word": "hi"}
        assert out["got"]["context"]["user_name"] == "ada"
        assert out["got"]["context"]["channel_id"] == "c7"
        assert out["got"]["context"]["platform"] == platform
        assert [t["name"] for t in await hook.list_tools(timeout=10)] == ["echo"]
        with pytest.raises(RpcError, match="schema"):
            await hook.execute_tool("echo", {"word": 5}, timeout=10)
        with pytest.raises(RpcError, match="no RPC method"):
            await hook.rpc("frobnicate", timeout=10)
        # history: the console adapter remembers what it sent
        await console.send("room", "first")
        await console.send("room", "second")
        deadline = time.monotonic() + 20
        while len(history := await console.fetch_history("room", limit=5, timeout=10)) < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert [m.text for m in history] == ["first", "second"] and history[0].is_bot
        assert await console.should_skip_channel_heartbeat("room", timeout=10) is False


def _post(url: str, body: dict[str, Any]) -> int:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        status: int = resp.status
        return status


async def test_inbound_events_from_the_gateway(worker: Worker, gateway: GatewayFactory) -> None:
    port = free_port()
    gateway(http_port=port)
    url = f"http://127.0.0.1:{port}/inbound/{worker.platform}"
    deadline = time.monotonic() + 20
    event = {"type": "message", "channel_id": "c1", "user_id": "7", "user_name": "ada",
             "text": "hi bot", "message_id": "m-1"}
    while True:
        try:
            assert await asyncio.to_thread(_post, url, event) in (200, 201, 202)
            break
        except (OSError, urllib.error.URLError):
            assert time.monotonic() < deadline, "the gateway's HTTP listener never came up"
            await asyncio.sleep(0.1)
    got: InboundEvent | None = None
    async for ev in worker.inbound("py-bot"):
        got = ev
        break
    assert got is not None
    assert (got.type, got.platform, got.channel_id, got.user_name, got.text, got.message_id) == (
        "message", worker.platform, "c1", "ada", "hi bot", "m-1")
    assert got.ts_ms > 0


async def test_the_example_echo_bot(redis_url: str, platform: str, gateway: GatewayFactory,
                                    receiver: Receiver) -> None:
    """examples/echo_bot.py, run as its doc says, answers a user through the gateway."""
    port = free_port()
    gateway(http_port=port)
    bot = await asyncio.create_subprocess_exec(
        sys.executable, str(REPO / "examples" / "echo_bot.py"), redis_url, platform,
    )
    try:
        url = f"http://127.0.0.1:{port}/inbound/{platform}"
        event = {"type": "message", "channel_id": "c1", "user_name": "ada", "text": "ping",
                 "message_id": "m-9"}
        deadline = time.monotonic() + 20
        while True:
            try:
                await asyncio.to_thread(_post, url, event)
                break
            except (OSError, urllib.error.URLError):
                assert time.monotonic() < deadline, "the gateway's HTTP listener never came up"
                await asyncio.sleep(0.1)
        got = await receiver.wait(3)
        # (typing is latest-wins, outside the channel's strict order)
        assert sorted(b["action"] for b in got) == ["add_reaction", "send_message", "start_typing"]
        message = next(b for b in got if b["action"] == "send_message")
        assert message["text"] == "ada said: ping"
        assert next(b for b in got if b["action"] == "add_reaction")["message_id"] == "m-9"
    finally:
        bot.terminate()
        await bot.wait()
