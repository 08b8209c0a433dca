"""Publishing: what lands in Redis, decoded with the gateway's own rules."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from typing import Any

import pytest
import redis.asyncio

from rust_rules import Bad, Parsed, Rules, parse_entry
from stargazer_client import Envelope, Keys, Worker

Entries = list[tuple[str, dict[str, bytes]]]


async def stream(r: redis.asyncio.Redis, key: str) -> Entries:
    raw = await r.xrange(key)
    return [(i.decode(), {k.decode(): v for k, v in f.items()}) for i, f in raw]


def decode(worker: Worker, fields: dict[str, bytes], secret: bytes | None = None) -> Parsed:
    return parse_entry(fields, Rules(reply_prefix=worker.keys.reply_prefix, signing_secret=secret))


async def test_every_type_decodes_with_the_gateways_rules(worker: Worker, r: redis.asyncio.Redis) -> None:
    before = int(time.time() * 1000)
    sent = await worker.send("c1", "hello", reply_to="m0", buttons=[("More", "more")])
    await worker.send_file("c1", b"\x00binary\xff", "a.bin", "application/x-test", text="caption")
    await worker.send_buttons("c1", "pick", [("Docs", "https://example.org"), ("Yes", "yes")])
    await worker.edit("c1", "hello, edited", target_key=sent.message_key)
    await worker.delete("c1", message_id="platform-7")
    await worker.start_typing("c1", ttl=5)
    await worker.stop_typing("c1")
    await worker.react("c1", "platform-7", "👍")
    await worker.set_presence("watching the stars", "🔭")
    got = [decode(worker, f) for _, f in await stream(r, worker.keys.outbound)]
    assert [p.type for p in got] == [
        "message", "file", "buttons", "edit", "delete", "start_typing", "stop_typing",
        "reaction", "presence",
    ]
    # strict kinds are numbered 1, 2, … in their channel; typing and presence are not
    assert [p.seq for p in got] == [1, 2, 3, 4, 5, None, None, 6, None]
    msg, file, buttons, edit, delete, typing, _, reaction, presence = got
    assert msg.action == {"text": "hello", "reply_to": "m0", "buttons": [{"label": "More", "custom_id": "more"}]}
    assert msg.message_key == sent.message_key
    assert sent.message_key is not None and sent.message_key.startswith(f"sg:msg:{worker.platform}:")
    assert file.action == {"data": b"\x00binary\xff", "filename": "a.bin",
                           "mimetype": "application/x-test", "text": "caption"}
    assert buttons.action["buttons"][0] == {"label": "Docs", "url": "https://example.org"}
    assert edit.action == {"target_key": sent.message_key, "message_id": None,
                           "text": "hello, edited", "buttons": []}
    assert delete.action == {"target_key": None, "message_id": "platform-7"}
    assert reaction.action == {"message_id": "platform-7", "emoji": "👍"}
    assert presence.channel_id is None and presence.action["emoji"] == "🔭"
    assert len({p.message_key for p in (msg, file, buttons)}) == 3
    assert edit.message_key is None and reaction.message_key is None
    for p in got:
        assert before <= p.obj["created_ms"] <= int(time.time() * 1000)
    assert 4900 <= typing.obj["expires_ms"] - typing.obj["created_ms"] <= 5000
    assert "expires_ms" not in msg.obj
    # UTF-8 on the wire, not \u escapes (the payload is what is signed)
    raw = (await stream(r, worker.keys.outbound))[-1][1]["payload"]
    assert "🔭".encode() in raw


async def test_seq_is_the_channel_counter_exactly_as_spec(worker: Worker, r: redis.asyncio.Redis) -> None:
    for i in range(3):
        assert (await worker.send("a", f"a{i}")).seq == i + 1
    assert (await worker.send("b", "b0")).seq == 1
    assert (await worker.react("a", "m", "x")).seq == 4
    key = Keys("sg", worker.platform).channel("a")
    assert key == f"sg:{{{worker.platform}}}:chan:a"
    assert await r.hget(key, "seq") == b"4"
    ttl_ms = await r.pttl(key)
    assert 29 * 86400 * 1000 < ttl_ms <= 30 * 86400 * 1000
    # a producer that numbered its own (HINCRBY, as SPEC §3 asks) is followed, not overtaken
    await r.hincrby(key, "seq", 10)
    assert (await worker.send("a", "after")).seq == 15


async def test_concurrent_sends_never_share_or_skip_a_seq(worker: Worker, r: redis.asyncio.Redis) -> None:
    results = await asyncio.gather(*(worker.send("hot", f"m{i}") for i in range(300)))
    assert sorted(p.seq for p in results if p.seq) == list(range(1, 301))
    entries = await stream(r, worker.keys.outbound)
    seqs = sorted(json.loads(f["payload"])["seq"] for _, f in entries)
    assert seqs == list(range(1, 301))


async def test_publish_many_is_two_round_trips_in_order(worker: Worker, r: redis.asyncio.Redis) -> None:
    await worker.send("x", "first")
    batch = [Envelope.message(f"{'x' if i % 2 else 'y'}", f"m{i}") for i in range(10)]
    batch.insert(3, Envelope.start_typing("x"))
    out = await worker.publish_many(batch)
    assert len(out) == 11
    entries = await stream(r, worker.keys.outbound)
    assert [e[0] for e in entries[1:]] == [p.id for p in out]
    payloads = [json.loads(f["payload"]) for _, f in entries[1:]]
    xs = [p["seq"] for p in payloads if p["channel_id"] == "x" and "seq" in p]
    ys = [p["seq"] for p in payloads if p["channel_id"] == "y"]
    assert xs == [2, 3, 4, 5, 6] and ys == [1, 2, 3, 4, 5]
    assert [p["text"] for p in payloads if p["type"] == "message"] == [f"m{i}" for i in range(10)]
    assert out[3].seq is None
    assert await worker.publish_many([]) == []


BAD_AT_PUBLISH: list[tuple[str, Any]] = [
    ("message_key outside the cache prefix", Envelope.message("c", "x", message_key="other:1")),
    ("message_key naming a stargazer key", Envelope.message("c", "x", message_key="sg:{p}:chan:c")),
    ("target_key outside the cache prefix", Envelope.edit("c", "x", target_key="sg:{p}:outbound")),
    ("lone surrogate", Envelope.message("c", "bad \ud800 text")),
    ("too large", Envelope.file("c", b"x" * 7_000_000)),
    ("not an envelope", {"type": "message", "channel_id": "c", "text": "x"}),
    ("hand-made unknown type", Envelope("fax", "c", {"type": "fax", "channel_id": "c"})),
    ("hand-made seq", Envelope("message", "c", {"type": "message", "channel_id": "c", "text": "x", "seq": 1})),
]


@pytest.mark.parametrize("case", BAD_AT_PUBLISH, ids=[c[0] for c in BAD_AT_PUBLISH])
async def test_a_bad_envelope_writes_nothing(worker: Worker, r: redis.asyncio.Redis, case: tuple[str, Any]) -> None:
    _, envelope = case
    with pytest.raises((ValueError, TypeError)):
        await worker.publish(envelope)
    # one bad envelope in a batch publishes none of it, and takes no seq
    with pytest.raises((ValueError, TypeError)):
        await worker.publish_many([Envelope.message("c", "good"), envelope])
    assert await r.exists(worker.keys.outbound, worker.keys.channel("c")) == 0


async def test_bad_arguments_of_the_helpers_write_nothing(worker: Worker, r: redis.asyncio.Redis) -> None:
    with pytest.raises(ValueError):
        await worker.edit("c", "x")
    with pytest.raises(ValueError):
        await worker.send_buttons("c", "x", [])
    with pytest.raises(TypeError):
        await worker.send("c", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await worker.start_typing("c", ttl=-1)
    assert await r.exists(worker.keys.outbound, worker.keys.channel("c")) == 0


async def test_signed_entries_carry_the_hmac_of_the_payload(redis_url: str, platform: str, r: redis.asyncio.Redis) -> None:
    async with Worker(redis_url, platform, secret="s3cret") as w:
        await w.send("c", "signed")
        await w.publish_many([Envelope.message("c", "batch"), Envelope.presence("p")])
    entries = await stream(r, Keys("sg", platform).outbound)
    assert len(entries) == 3
    for _, f in entries:
        expected = "sha256=" + hmac.new(b"s3cret", f["payload"], hashlib.sha256).hexdigest()
        assert f["sig"].decode() == expected
        parse_entry(f, Rules(reply_prefix="", signing_secret=b"s3cret"))
        with pytest.raises(Bad) as e:
            parse_entry(f, Rules(reply_prefix="", signing_secret=b"other"))
        assert e.value.kind == "bad_signature"


async def test_unsigned_worker_writes_no_sig(worker: Worker, r: redis.asyncio.Redis) -> None:
    await worker.send("c", "x")
    (_, f), = await stream(r, worker.keys.outbound)
    assert set(f) == {"payload"}


async def test_a_cancelled_send_still_lands(worker: Worker, r: redis.asyncio.Redis) -> None:
    """A caller cancelled between taking the seq and appending must not leave a gap."""
    tasks = [asyncio.ensure_future(worker.send("c", f"m{i}")) for i in range(50)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    for t in tasks[::2]:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await worker.aclose()  # waits for the orphans
    seq = int(await r.hget(worker.keys.channel("c"), "seq") or 0)
    entries = await stream(r, worker.keys.outbound)
    assert sorted(json.loads(f["payload"])["seq"] for _, f in entries) == list(range(1, seq + 1))


async def test_custom_prefix_and_cache_prefix(redis_url: str, platform: str, r: redis.asyncio.Redis) -> None:
    async with Worker(redis_url, platform, prefix="bot", cache_prefix="cache:") as w:
        p = await w.send("c", "x")
        assert p.message_key is not None and p.message_key.startswith(f"cache:{platform}:")
    assert await r.xlen(f"bot:{{{platform}}}:outbound") == 1
    assert await r.hget(f"bot:{{{platform}}}:chan:c", "seq") == b"1"


@pytest.mark.parametrize("kwargs", [
    {"cache_prefix": "sg:"},            # would reach sg:{…} keys
    {"cache_prefix": "sg:{x}:"},
    {"cache_prefix": "sg:gateway:x"},
    {"cache_prefix": ""},
    {"secret": ""},
    {"prefix": "a{b"},
    {"max_payload_bytes": 0},
])
def test_contradictory_settings_are_refused(redis_url: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Worker(redis_url, "p", **kwargs)


def test_platform_names_are_checked(redis_url: str) -> None:
    with pytest.raises(ValueError, match="platform"):
        Worker(redis_url, "")
    with pytest.raises(ValueError, match="hash tag"):
        Worker(redis_url, "a}b")


async def test_message_id_reads_the_gateways_write_back(worker: Worker, r: redis.asyncio.Redis) -> None:
    p = await worker.send("c", "x")
    assert p.message_key is not None
    assert await worker.message_id(p.message_key) is None

    async def gateway_sends() -> None:
        await asyncio.sleep(0.1)
        await r.hset(p.message_key, "message_id", "platform-42")  # type: ignore[arg-type]

    asyncio.ensure_future(gateway_sends())
    assert await worker.message_id(p.message_key, wait=2) == "platform-42"


async def test_an_existing_client_can_be_used(redis_url: str, platform: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    async with Worker(client, platform) as w:
        p = await w.send("c", "x")
        assert p.seq == 1 and isinstance(p.id, str)
    assert await client.ping()  # still the caller's
    await client.aclose()
