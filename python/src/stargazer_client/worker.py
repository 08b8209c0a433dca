"""The worker: publishing envelopes, calling gateway RPCs, reading inbound events.

Publishing follows SPEC §3 exactly as the Rust SDK and ``stargazer send`` do:
a strict kind takes its channel's next ``seq`` with ``HINCRBY`` on field
``seq`` of ``sg:{<platform>}:chan:<channel>`` (and renews that hash's 30-day
idle expiry), then the envelope is appended to ``sg:{<platform>}:outbound``
as field ``payload``, with ``sig`` when a secret is set. Everything that can
be wrong with an envelope is found before the first command is sent.

Each step is tried again after a transient failure (a failover, a lost
connection, a cluster reconfiguring: see :mod:`~stargazer_client._redis`)
with the same payload: the same ``seq`` once taken, the same idempotency key
(``message_key``, or an ``idempotency_key`` given to every other strict kind),
so a copy that did land before the failure is skipped by the gateway as a
proven duplicate (SPEC G2) and nothing confirmed is lost. With
``RedisConfig(wait_replicas=N)`` a step counts only once N replicas have it
(``WAIT`` on the same connection), so a failover that promotes one of them
cannot take a confirmed publish away (the limits: docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import secrets
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from . import _redis
from ._keys import CHANNEL_IDLE_EXPIRY_MS, DEFAULT_CACHE_PREFIX, Keys
from .config import RedisConfig
from .envelopes import KEYED, SEQUENCED, TYPES, ButtonLike, Envelope, _channel, _ttl
from .errors import RpcError, RpcTimeout
from .rpc import HistoryMessage, ToolContext, parse_reply

if TYPE_CHECKING:
    from .inbound import InboundConsumer

log = logging.getLogger("stargazer_client")

T = TypeVar("T")

DEFAULT_MAX_PAYLOAD_BYTES = 8 * 1024 * 1024
"""The gateway's default ``max_payload_bytes``: a larger entry is dead-lettered."""

_SEQ_ROOM = 32
"""Bytes kept free under the payload limit for the ``"seq":N,`` spliced in."""

_TAKER_EXPIRY_MS = 3600 * 1000
"""How long a ``seq`` taker token is kept: long enough for a retry after a
failover (the Rust publisher's ``TAKER_EXPIRY_MS``)."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Published:
    """Where an envelope landed."""

    id: str
    """Its stream entry id."""
    seq: int | None
    """Its place in its channel's sequence (strict kinds only)."""
    message_key: str | None
    """Its message-cache key: the gateway writes the platform message id there
    once sent; an ``edit`` or ``delete`` names it as ``target_key``."""


@dataclass(frozen=True, slots=True)
class _Prepared:
    body: bytes
    """The envelope's JSON, without ``seq``."""
    channel_id: str | None
    sequenced: bool
    message_key: str | None

    def payload(self, seq: int | None) -> bytes:
        if seq is None:
            return self.body
        # The body is a JSON object; put `seq` first instead of serialising twice.
        return b'{"seq":%d,%s' % (seq, self.body[1:])


class Worker:
    """A bot worker's handle on one platform.

    ``redis`` is a URL (``redis://``, ``rediss://``, ``unix://``), a
    :class:`~stargazer_client.RedisConfig` (a cluster, a Sentinel-managed
    primary, TLS files, a password from the environment, ``wait_replicas``),
    or an existing ``redis.asyncio.Redis`` or ``RedisCluster`` (which stays the
    caller's to close). ``secret`` signs every envelope (the gateway's
    ``consumer.signing_secret``); ``cache_prefix`` is the gateway's
    ``redis.cache_prefix``, where message keys must live. ``retry_for`` is how
    long (seconds) an operation is tried again after transient failures
    before its error is raised (0: once).

    Use it as ``async with Worker(...) as worker:`` or call :meth:`aclose`.
    """

    def __init__(
        self,
        redis: str | Redis | RedisCluster | RedisConfig,
        platform: str,
        *,
        prefix: str = "sg",
        secret: str | bytes | None = None,
        cache_prefix: str = DEFAULT_CACHE_PREFIX,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        max_connections: int = 32,
        retry_for: float = 30.0,
    ) -> None:
        self.keys = Keys(prefix, platform)
        if not isinstance(cache_prefix, str) or not cache_prefix:
            raise ValueError("cache_prefix must be a non-empty string")
        # A message key must never name one of Stargazer's own keys (SPEC §2).
        for own in (f"{prefix}:{{", f"{prefix}:gateway:"):
            if cache_prefix.startswith(own) or own.startswith(cache_prefix):
                raise ValueError(
                    f"cache_prefix {cache_prefix!r} overlaps Stargazer's own keys ({own}…)"
                )
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        if secret is not None and (not isinstance(secret, bytes) or not secret):
            raise ValueError("secret must be a non-empty str or bytes")
        if isinstance(max_payload_bytes, bool) or not isinstance(max_payload_bytes, int) or max_payload_bytes <= _SEQ_ROOM:
            raise ValueError(f"max_payload_bytes must be an int above {_SEQ_ROOM}")
        if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
            raise ValueError("max_connections must be a positive int")
        if isinstance(retry_for, bool) or not isinstance(retry_for, (int, float)) or not retry_for >= 0:
            raise ValueError("retry_for must be a number of seconds >= 0")
        self._secret = secret
        self._cache_prefix = cache_prefix
        self._max_payload = max_payload_bytes
        self._link = _redis.connect(redis, max_connections=max_connections, retry_for=float(retry_for))
        self._redis: _redis.Client = self._link.commands
        self._blocking: _redis.Client = self._link.blocking
        # Publishes whose caller was cancelled finish in the background: a
        # channel never waits out its gap timeout for a seq that was taken.
        self._orphans: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return (
            f"Worker(platform={self.keys.platform!r}, prefix={self.keys.prefix!r}, "
            f"signed={self._secret is not None}, redis={self._link.where})"
        )

    @property
    def platform(self) -> str:
        return self.keys.platform

    @property
    def cache_prefix(self) -> str:
        return self._cache_prefix

    async def __aenter__(self) -> Worker:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Wait for publishes still finishing in the background, close the connections."""
        if self._orphans:
            await asyncio.gather(*self._orphans, return_exceptions=True)
        await self._link.aclose()

    @property
    def mode(self) -> str:
        """``single``, ``cluster`` or ``sentinel``."""
        return self._link.mode

    async def ping(self) -> None:
        """Check that Redis answers (on a cluster: the node of the platform's slot)."""
        if isinstance(self._redis, RedisCluster):
            c = self._redis
            await self._link.run("PING", lambda: c.execute_command(
                "PING", target_nodes=c.get_node_from_key(self.keys.outbound)))
        else:
            await self._link.run("PING", self._redis.ping)

    # ------------------------------------------------------------------ publish

    def _check_cache_key(self, name: str, key: str) -> None:
        if not key.startswith(self._cache_prefix):
            raise ValueError(
                f"{name} {key!r} lies outside the message-cache prefix {self._cache_prefix!r} "
                "(the gateway would dead-letter it as forbidden_key)"
            )

    def _prepare(self, envelope: Envelope) -> _Prepared:
        if not isinstance(envelope, Envelope):
            raise TypeError(f"expected an Envelope, not {type(envelope).__name__}")
        obj = dict(envelope.fields)
        if envelope.type not in TYPES or obj.get("type") != envelope.type:
            raise ValueError(f"unknown envelope type {envelope.type!r}: build envelopes with Envelope.message(…) etc.")
        if "seq" in obj:
            raise ValueError("an envelope may not carry its own seq: publishing takes the channel's next one")
        key = obj.get("message_key")
        if key is None and envelope.type in KEYED:
            key = f"{self._cache_prefix}{self.keys.platform}:{secrets.token_hex(8)}"
            obj["message_key"] = key
        for name in ("message_key", "target_key"):
            if name in obj:
                self._check_cache_key(name, obj[name])
        if envelope.type in SEQUENCED and key is None and "idempotency_key" not in obj:
            # Without one the gateway derives it from the stream entry id, so a
            # copy written again after a failover would be sent twice.
            obj["idempotency_key"] = f"{self.keys.platform}:py:{secrets.token_hex(8)}"
        now = now_ms()
        obj["created_ms"] = now
        if envelope.ttl is not None:
            obj["expires_ms"] = now + math.ceil(envelope.ttl * 1000)
        try:
            body = json.dumps(
                obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False
            ).encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"the {envelope.type} envelope has text that is not valid UTF-8: {e}") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"the {envelope.type} envelope is not JSON: {e}") from None
        if len(body) + _SEQ_ROOM > self._max_payload:
            raise ValueError(
                f"the {envelope.type} envelope is {len(body)} bytes; the gateway takes at most "
                f"{self._max_payload} (max_payload_bytes)"
            )
        return _Prepared(body, envelope.channel_id, envelope.sequenced, key)

    def _fields(self, payload: bytes) -> dict[str, bytes]:
        if self._secret is None:
            return {"payload": payload}
        sig = "sha256=" + hmac.new(self._secret, payload, hashlib.sha256).hexdigest()
        return {"payload": payload, "sig": sig.encode("ascii")}

    def _wait(self, pipe: Any) -> None:
        """Append ``WAIT`` to a pipeline: it runs on the connection of the writes before it."""
        if self._link.wait_replicas:
            pipe.execute_command("WAIT", self._link.wait_replicas, self._link.wait_timeout_ms)

    async def _take_seqs(self, counts: Mapping[str, int]) -> dict[str, int]:
        """Take ``n`` numbers of each channel's sequence; the first of each.

        With ``wait_replicas``, a try whose ``WAIT`` came back short leaves its
        numbers *held*: the next try reuses them while the counter still stands
        at them under the token written after the increment (the token follows
        the increment in the replication stream, so a failover that lost one
        lost both), instead of taking new ones and leaving a gap the gateway
        would wait ``gap_timeout_ms`` for. Numbers a failover took away, or
        that another producer has moved past, are taken again."""
        wait = self._link.wait_replicas > 0
        held: dict[str, tuple[int, str]] = {}  # channel → (last number, token)

        async def still_standing() -> dict[str, tuple[int, str]]:
            if not held:
                return {}
            pipe: Any = self._redis.pipeline(transaction=False)
            for channel in held:
                pipe.hget(self.keys.channel(channel), "seq")
                pipe.get(self.keys.seq_taker(channel))
            replies = await pipe.execute()
            out = {}
            for i, (channel, (last, token)) in enumerate(held.items()):
                cur, taker = replies[2 * i], replies[2 * i + 1]
                if cur is not None and int(cur) == last and taker is not None and _redis.text(taker) == token:
                    out[channel] = (last, token)
            return out

        async def once() -> dict[str, int]:
            reuse = await still_standing()
            held.clear()
            take = [(c, n) for c, n in counts.items() if c not in reuse]
            token = secrets.token_hex(8)
            pipe: Any = self._redis.pipeline(transaction=False)
            for channel, n in take:
                key = self.keys.channel(channel)
                pipe.hincrby(key, "seq", n)
                pipe.pexpire(key, CHANNEL_IDLE_EXPIRY_MS)
                if wait:
                    pipe.set(self.keys.seq_taker(channel), token, px=_TAKER_EXPIRY_MS)
            for channel in reuse:
                # A write on this connection, so the WAIT after it covers the increment.
                pipe.pexpire(self.keys.channel(channel), CHANNEL_IDLE_EXPIRY_MS)
            self._wait(pipe)
            replies: list[Any] = await pipe.execute()
            per = 3 if wait else 2
            taken = {c: (int(replies[per * i]), token) for i, (c, _n) in enumerate(take)}
            if wait:
                try:
                    self._link.check_replicated(replies[-1])
                except _redis.NotReplicated:
                    held.update(taken)
                    held.update(reuse)
                    raise
            return {c: last for c, (last, _t) in {**taken, **reuse}.items()}

        lasts = await self._link.run("taking seq numbers", once)
        return {channel: lasts[channel] - n + 1 for channel, n in counts.items()}

    async def _xadd(self, fields: dict[str, bytes]) -> str:
        """Append one entry (the same one on every try)."""

        async def once() -> str:
            if not self._link.wait_replicas:
                return _redis.text(await self._redis.xadd(self.keys.outbound, fields))  # type: ignore[arg-type]
            pipe: Any = self._redis.pipeline(transaction=False)
            pipe.xadd(self.keys.outbound, fields)
            self._wait(pipe)
            entry_id, replicas = await pipe.execute()
            self._link.check_replicated(replicas)
            return _redis.text(entry_id)

        return await self._link.run("XADD", once)

    async def _publish_one(self, p: _Prepared) -> Published:
        seq = None
        if p.sequenced and p.channel_id is not None:
            seq = (await self._take_seqs({p.channel_id: 1}))[p.channel_id]
        entry_id = await self._xadd(self._fields(p.payload(seq)))
        return Published(entry_id, seq, p.message_key)

    async def _publish_batch(self, batch: Sequence[_Prepared]) -> list[Published]:
        counts: dict[str, int] = {}
        for p in batch:
            if p.sequenced and p.channel_id is not None:
                counts[p.channel_id] = counts.get(p.channel_id, 0) + 1
        nxt = await self._take_seqs(counts) if counts else {}
        seqs: list[int | None] = []
        for p in batch:
            if p.sequenced and p.channel_id is not None:
                seqs.append(nxt[p.channel_id])
                nxt[p.channel_id] += 1
            else:
                seqs.append(None)
        entries = [self._fields(p.payload(seq)) for p, seq in zip(batch, seqs)]

        # One MULTI: the entries land together, in this order, or not at all
        # (one stream, so one slot on a cluster).
        async def once() -> list[Any]:
            if not self._link.wait_replicas:
                pipe: Any = self._redis.pipeline(transaction=True)
                for fields in entries:
                    pipe.xadd(self.keys.outbound, fields)
                got: list[Any] = await pipe.execute()
                return got
            # MULTI … EXEC, then WAIT, on one connection in one round trip.
            raw: Any = self._redis.pipeline(transaction=False)
            raw.execute_command("MULTI")
            for fields in entries:
                raw.xadd(self.keys.outbound, fields)
            raw.execute_command("EXEC")
            self._wait(raw)
            replies = await raw.execute()
            self._link.check_replicated(replies[-1])
            ids: list[Any] = replies[-2]
            return ids

        ids = await self._link.run("MULTI of XADDs", once)
        return [
            Published(_redis.text(i), s, p.message_key) for i, s, p in zip(ids, seqs, batch)
        ]

    async def _shielded(self, coro: Coroutine[Any, Any, T]) -> T:
        task = asyncio.ensure_future(coro)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                self._orphans.add(task)
                task.add_done_callback(self._orphan_done)
            raise

    def _orphan_done(self, task: asyncio.Task[Any]) -> None:
        self._orphans.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a publish whose caller was cancelled failed", exc_info=task.exception())

    async def publish(self, envelope: Envelope) -> Published:
        """Publish one envelope (strict kinds take their channel's next ``seq``)."""
        p = self._prepare(envelope)
        return await self._shielded(self._publish_one(p))

    async def publish_many(self, envelopes: Iterable[Envelope]) -> list[Published]:
        """Publish several envelopes in two round trips (one pipeline taking every
        channel's ``seq`` numbers, one ``MULTI`` appending every entry, in order).
        All are checked first: one bad envelope publishes none."""
        batch = [self._prepare(e) for e in envelopes]
        if not batch:
            return []
        return await self._shielded(self._publish_batch(batch))

    async def send(
        self,
        channel_id: str | int,
        text: str,
        *,
        reply_to: str | None = None,
        buttons: Sequence[ButtonLike] | None = None,
        message_key: str | None = None,
        idempotency_key: str | None = None,
        trace_id: str | None = None,
    ) -> Published:
        """Send a text message (see :meth:`Envelope.message`)."""
        return await self.publish(
            Envelope.message(
                channel_id,
                text,
                reply_to=reply_to,
                buttons=buttons,
                message_key=message_key,
                idempotency_key=idempotency_key,
                trace_id=trace_id,
            )
        )

    async def send_file(
        self,
        channel_id: str | int,
        data: bytes | bytearray | memoryview,
        filename: str = "file",
        mimetype: str = "application/octet-stream",
        *,
        text: str | None = None,
        message_key: str | None = None,
        idempotency_key: str | None = None,
        trace_id: str | None = None,
    ) -> Published:
        """Send a file with an optional caption (see :meth:`Envelope.file`)."""
        return await self.publish(
            Envelope.file(
                channel_id,
                data,
                filename,
                mimetype,
                text=text,
                message_key=message_key,
                idempotency_key=idempotency_key,
                trace_id=trace_id,
            )
        )

    async def send_buttons(
        self,
        channel_id: str | int,
        text: str,
        buttons: Sequence[ButtonLike],
        *,
        message_key: str | None = None,
        idempotency_key: str | None = None,
        trace_id: str | None = None,
    ) -> Published:
        """Send text with buttons (see :meth:`Envelope.buttons`)."""
        return await self.publish(
            Envelope.buttons(
                channel_id,
                text,
                buttons,
                message_key=message_key,
                idempotency_key=idempotency_key,
                trace_id=trace_id,
            )
        )

    async def edit(
        self,
        channel_id: str | int,
        text: str,
        *,
        target_key: str | None = None,
        message_id: str | None = None,
        buttons: Sequence[ButtonLike] | None = None,
        idempotency_key: str | None = None,
        trace_id: str | None = None,
    ) -> Published:
        """Edit an earlier message by its ``message_key`` (``target_key``) or its
        platform ``message_id`` (see :meth:`Envelope.edit`)."""
        return await self.publish(
            Envelope.edit(
                channel_id,
                text,
                target_key=target_key,
                message_id=message_id,
                buttons=buttons,
                idempotency_key=idempotency_key,
                trace_id=trace_id,
            )
        )

    async def delete(
        self,
        channel_id: str | int,
        *,
        target_key: str | None = None,
        message_id: str | None = None,
        idempotency_key: str | None = None,
        trace_id: str | None = None,
    ) -> Published:
        """Delete an earlier message, named as for :meth:`edit`."""
        return await self.publish(
            Envelope.delete(
                channel_id,
                target_key=target_key,
                message_id=message_id,
                idempotency_key=idempotency_key,
                trace_id=trace_id,
            )
        )

    async def start_typing(self, channel_id: str | int, ttl: float = 10.0) -> Published:
        """Show typing; dropped unsent if no gateway gets to it within ``ttl`` seconds."""
        return await self.publish(Envelope.start_typing(channel_id, ttl))

    async def stop_typing(self, channel_id: str | int) -> Published:
        return await self.publish(Envelope.stop_typing(channel_id))

    async def react(
        self,
        channel_id: str | int,
        message_id: str,
        emoji: str,
        *,
        idempotency_key: str | None = None,
    ) -> Published:
        """React to the platform message ``message_id``."""
        return await self.publish(
            Envelope.reaction(channel_id, message_id, emoji, idempotency_key=idempotency_key)
        )

    async def set_presence(
        self, text: str | None = None, emoji: str | None = None, *, ttl: float | None = None
    ) -> Published:
        """Set the bot's presence (platform-wide; the newest wins)."""
        return await self.publish(Envelope.presence(text, emoji, ttl=ttl))

    async def message_id(self, message_key: str, *, wait: float = 0.0) -> str | None:
        """The platform id the gateway recorded for ``message_key`` once it sent the
        message, waiting up to ``wait`` seconds for it; ``None`` if not (yet) sent."""
        self._check_cache_key("message_key", message_key)
        deadline = time.monotonic() + wait
        while True:
            v = await self._link.run("HGET", lambda: _redis.hget(self._redis, message_key, "message_id"))
            if v:
                return _redis.text(v)
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.05)

    # ---------------------------------------------------------------------- rpc

    async def rpc(
        self,
        method: str,
        args: Mapping[str, Any] | None = None,
        *,
        channel_id: str | int | None = None,
        timeout: float = 30.0,
    ) -> Any:
        """Call a gateway RPC and return its JSON result.

        The request carries ``deadline_ms`` (a gateway drops it unanswered after
        that) and a fresh ``reply_key`` under ``sg:{P}:rpc:reply:``; the reply is
        awaited with BLPOP on a connection of its own.

        :raises RpcTimeout: no gateway answered within ``timeout`` seconds.
        :raises RpcError: the gateway answered ``{"error": …}``.
        """
        timeout = _ttl("timeout", timeout)
        reply_key = f"{self.keys.reply_prefix}{secrets.token_hex(16)}"
        envelope = Envelope.rpc_request(
            method,
            {} if args is None else args,
            reply_key,
            now_ms() + math.ceil(timeout * 1000),
            channel_id,
        )
        await self._shielded(self._publish_one(self._prepare(envelope)))
        deadline = time.monotonic() + timeout

        async def wait_reply() -> Any:
            # After a failover the wait goes on, on the new primary, for the time left.
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            return await asyncio.wait_for(
                _redis.blpop(self._blocking, reply_key, max(left, 0.01)), left + 2.0
            )

        try:
            reply = await self._link.run("BLPOP", wait_reply, blocking=True)
        except asyncio.TimeoutError:
            reply = None
        if reply is None:
            raise RpcTimeout(method, self.keys.platform, timeout)
        return parse_reply(method, reply[1])

    async def fetch_history(
        self, channel_id: str | int, limit: int = 10, *, timeout: float = 30.0
    ) -> list[HistoryMessage]:
        """The latest ``limit`` messages of a channel, oldest first (the gateway caps
        ``limit`` at 100)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive int, not {limit!r}")
        channel = _channel(channel_id)
        method = "fetch_channel_history"
        value = await self.rpc(
            method, {"channel_id": channel, "limit": limit}, channel_id=channel, timeout=timeout
        )
        if not isinstance(value, list):
            raise RpcError(method, f"expected a list, got {type(value).__name__}")
        try:
            return [HistoryMessage.from_json(m) for m in value]
        except ValueError as e:
            raise RpcError(method, str(e)) from None

    async def should_skip_channel_heartbeat(
        self, channel_id: str | int, *, timeout: float = 30.0
    ) -> bool:
        """Whether the platform says a periodic heartbeat should leave the channel alone."""
        channel = _channel(channel_id)
        method = "should_skip_channel_heartbeat"
        value = await self.rpc(method, {"channel_id": channel}, channel_id=channel, timeout=timeout)
        if not isinstance(value, bool):
            raise RpcError(method, f"expected a boolean, got {value!r}")
        return value

    async def execute_tool(
        self,
        tool_name: str,
        tool_args: Mapping[str, Any] | None = None,
        *,
        tool_ctx: ToolContext | Mapping[str, str] | None = None,
        channel_id: str | int | None = None,
        timeout: float = 30.0,
    ) -> Any:
        """Run a delegated tool on a gateway and return its JSON result."""
        if not isinstance(tool_name, str) or not tool_name:
            raise ValueError("tool_name must be a non-empty string")
        if tool_args is not None and not isinstance(tool_args, Mapping):
            raise TypeError(f"tool_args must be a mapping, not {type(tool_args).__name__}")
        if isinstance(tool_ctx, ToolContext):
            ctx: dict[str, str] = tool_ctx.to_dict()
        elif tool_ctx is None:
            ctx = {}
        elif isinstance(tool_ctx, Mapping):
            ctx = dict(tool_ctx)
        else:
            raise TypeError(f"tool_ctx must be a ToolContext or a mapping, not {type(tool_ctx).__name__}")
        if channel_id is None and ctx.get("channel_id"):
            channel_id = ctx["channel_id"]
        return await self.rpc(
            "execute_tool",
            {"tool_name": tool_name, "tool_args": dict(tool_args or {}), "tool_ctx": ctx},
            channel_id=channel_id,
            timeout=timeout,
        )

    async def list_tools(self, *, timeout: float = 30.0) -> list[dict[str, Any]]:
        """The manifests of the gateway's delegated tools."""
        value = await self.rpc("list_tools", timeout=timeout)
        if not isinstance(value, list):
            raise RpcError("list_tools", f"expected a list, got {type(value).__name__}")
        return value

    # ------------------------------------------------------------------ inbound

    def inbound(
        self,
        consumer: str,
        *,
        group: str | None = None,
        count: int = 100,
        block: float = 1.0,
        retry_after: float = 0.5,
        max_attempts: int | None = 10,
        claim_idle: float | None = None,
    ) -> InboundConsumer:
        """Read the platform's inbound events as ``consumer`` (keep the name stable
        across restarts: a restarted worker takes its own unfinished events back).
        See :class:`~stargazer_client.inbound.InboundConsumer`."""
        from .inbound import InboundConsumer

        return InboundConsumer(
            self,
            consumer,
            group=group,
            count=count,
            block=block,
            retry_after=retry_after,
            max_attempts=max_attempts,
            claim_idle=claim_idle,
        )
