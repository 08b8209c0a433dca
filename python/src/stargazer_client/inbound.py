"""Inbound events: what users said, on their way from the gateways to the workers
through ``sg:{<platform>}:inbound``, read at least once with a consumer group.

>>> async def bot(worker):                                  # doctest: +SKIP
...     async for event in worker.inbound("bot-1"):
...         await worker.send(event.channel_id, f"you said {event.text}")

An event is acknowledged only once its handler is done: in the ``async for``
form, when the loop asks for the next event. If the loop body raises, the
event stays pending and is handed over again the next time the consumer is
iterated (after ``retry_after``); :meth:`InboundConsumer.run` does the same
for a handler function and keeps going. A restarted worker with the same
consumer name gets its unfinished events back first; with ``claim_idle`` set it
also takes over events left pending by other consumers (dead workers) for that
long. An entry that is not an event, or whose handler failed ``max_attempts``
times, goes to ``sg:{<platform>}:inbound:dlq`` (fields ``payload``, ``error``,
``original_id``) and is acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from . import _redis

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("stargazer_client")

_KNOWN = ("type", "platform", "channel_id", "user_id", "user_name", "text",
          "message_id", "reply_to", "emoji", "custom_id", "ts_ms")


@dataclass(frozen=True, slots=True)
class InboundEvent:
    """One thing a platform said."""

    type: str
    """``message``, ``reaction`` (with ``emoji`` and the ``message_id`` reacted to),
    ``button`` (with ``custom_id``) or ``invite``."""
    channel_id: str
    platform: str = ""
    user_id: str = ""
    user_name: str = ""
    text: str | None = None
    message_id: str | None = None
    reply_to: str | None = None
    emoji: str | None = None
    custom_id: str | None = None
    ts_ms: int = 0
    """When the platform saw it (Unix ms)."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Platform-specific fields."""
    stream_id: str = ""
    """The inbound stream entry it came from."""

    @classmethod
    def from_payload(cls, payload: bytes | str, stream_id: str = "") -> InboundEvent:
        """Parse an entry's ``payload`` (raises :class:`ValueError` naming the problem)."""
        try:
            obj = json.loads(payload)
        except ValueError as e:
            raise ValueError(f"payload is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ValueError("payload is not a JSON object")

        def req(name: str) -> str:
            v = obj.get(name)
            if not isinstance(v, str) or not v:
                raise ValueError(f"an inbound event needs the string field `{name}`")
            return v

        def text(name: str) -> str:
            v = obj.get(name)
            if v is None:
                return ""
            if not isinstance(v, str):
                raise ValueError(f"field `{name}` must be a string")
            return v

        def opt(name: str) -> str | None:
            v = obj.get(name)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"field `{name}` must be a string")
            return v

        ts = obj.get("ts_ms", 0) or 0
        if isinstance(ts, float) and ts.is_integer():
            ts = int(ts)
        if isinstance(ts, bool) or not isinstance(ts, int) or ts < 0:
            raise ValueError("field `ts_ms` must be a non-negative integer")
        return cls(
            type=req("type"),
            channel_id=req("channel_id"),
            platform=text("platform"),
            user_id=text("user_id"),
            user_name=text("user_name"),
            text=opt("text"),
            message_id=opt("message_id"),
            reply_to=opt("reply_to"),
            emoji=opt("emoji"),
            custom_id=opt("custom_id"),
            ts_ms=ts,
            extra={k: v for k, v in obj.items() if k not in _KNOWN},
            stream_id=stream_id,
        )


Handler = Callable[[InboundEvent], Awaitable[object]]


class InboundConsumer:
    """An at-least-once reader of one platform's inbound stream (see the module doc).

    Made by :meth:`Worker.inbound <stargazer_client.Worker.inbound>`.
    ``group`` defaults to ``sg:worker:<platform>``: workers of one group share
    the events, each group gets all of them.
    """

    def __init__(
        self,
        worker: Worker,
        consumer: str,
        *,
        group: str | None = None,
        count: int = 100,
        block: float = 1.0,
        retry_after: float = 0.5,
        max_attempts: int | None = 10,
        claim_idle: float | None = None,
    ) -> None:
        if not isinstance(consumer, str) or not consumer:
            raise ValueError("consumer must be a non-empty string")
        if group is not None and (not isinstance(group, str) or not group):
            raise ValueError("group must be a non-empty string")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError("count must be a positive int")
        for name, v in (("block", block), ("retry_after", retry_after)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{name} must be a number of seconds >= 0")
        if max_attempts is not None and (
            isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1
        ):
            raise ValueError("max_attempts must be a positive int or None")
        if claim_idle is not None and (
            isinstance(claim_idle, bool) or not isinstance(claim_idle, (int, float)) or not claim_idle > 0
        ):
            raise ValueError("claim_idle must be a positive number of seconds or None")
        self._worker = worker
        self._keys = worker.keys
        self.consumer = consumer
        self.group = group or worker.keys.worker_group
        self._count = count
        self._block_ms = max(1, int(block * 1000))
        self._retry_after = float(retry_after)
        self._max_attempts = max_attempts
        self._claim_idle_ms = None if claim_idle is None else max(1, int(claim_idle * 1000))
        self._next_claim = 0.0
        self._group_ready = False
        # Own pending entries first (a restart, or a failure), then new ones.
        self._pending_from: str | None = "0"
        self._buffer: deque[_redis.Entry] = deque()
        self._current: InboundEvent | None = None
        self._failures: dict[str, int] = {}
        self._last_error: dict[str, str] = {}
        self._resume_at = 0.0

    # -- the async-iterator form

    def __aiter__(self) -> InboundConsumer:
        if self._current is not None:
            # Handed out and never acknowledged: the loop body raised (or broke out).
            self._failed(self._current, None)
        return self

    async def __anext__(self) -> InboundEvent:
        if self._current is not None:
            done, self._current = self._current, None
            await self.ack(done)
        event = await self._next()
        assert event is not None  # only a `stop` ends _next early
        self._current = event
        return event

    # -- the handler form

    async def run(self, handler: Handler, *, stop: asyncio.Event | None = None) -> None:
        """Hand every event to ``handler`` until ``stop`` is set (or the task is
        cancelled); acknowledge each one after the handler returned, hand a failed
        one over again after ``retry_after``."""
        while stop is None or not stop.is_set():
            event = await self._next(stop)
            if event is None:
                return
            try:
                await handler(event)
            except Exception as e:  # noqa: BLE001 — a failed handler must not stop the worker
                log.warning(
                    "inbound handler failed on %s; it will be handed over again",
                    event.stream_id,
                    exc_info=True,
                )
                self._failed(event, e)
                continue
            await self.ack(event)

    async def ack(self, event: InboundEvent) -> None:
        """Acknowledge ``event`` (done for you by both forms)."""
        r = self._worker._redis
        await self._worker._link.run(
            "XACK", lambda: r.xack(self._keys.inbound, self.group, event.stream_id)
        )
        self._failures.pop(event.stream_id, None)
        self._last_error.pop(event.stream_id, None)
        if self._current is not None and self._current.stream_id == event.stream_id:
            self._current = None

    # -- inside

    def _failed(self, event: InboundEvent, error: BaseException | None) -> None:
        self._current = None
        self._failures[event.stream_id] = self._failures.get(event.stream_id, 0) + 1
        if error is not None:
            self._last_error[event.stream_id] = f"{type(error).__name__}: {error}"
        # Everything read after it is pending on us too: read it all again, in order.
        self._buffer.clear()
        self._pending_from = "0"
        self._resume_at = time.monotonic() + self._retry_after

    async def _next(self, stop: asyncio.Event | None = None) -> InboundEvent | None:
        while True:
            while self._buffer:
                entry_id, fields = self._buffer.popleft()
                event = await self._admit(entry_id, fields)
                if event is not None:
                    return event
            if stop is not None and stop.is_set():
                return None
            await self._fill()

    async def _admit(self, entry_id: str, fields: dict[str, bytes] | None) -> InboundEvent | None:
        """The event of an entry, or None once a bad one is dead-lettered."""
        if fields is None:
            await self._dead_letter(entry_id, b"", "lost_in_stream: deleted from the stream while pending")
            return None
        payload = fields.get("payload")
        if payload is None:
            await self._dead_letter(entry_id, b"", "no `payload` field")
            return None
        failures = self._failures.get(entry_id, 0)
        if self._max_attempts is not None and failures >= self._max_attempts:
            last = self._last_error.get(entry_id, "the handler raised")
            await self._dead_letter(entry_id, payload, f"handler failed {failures} times; last: {last}")
            return None
        try:
            return InboundEvent.from_payload(payload, entry_id)
        except ValueError as e:
            log.warning("inbound entry %s is not a valid event (%s); dead-lettered", entry_id, e)
            await self._dead_letter(entry_id, payload, str(e))
            return None

    async def _dead_letter(self, entry_id: str, payload: bytes, reason: str) -> None:
        async def once() -> None:
            # One MULTI on one slot: the dead letter and the ack land together.
            pipe = self._worker._redis.pipeline(transaction=True)
            pipe.xadd(
                self._keys.inbound_dlq,
                {"payload": payload, "error": reason, "original_id": entry_id},
            )
            pipe.xack(self._keys.inbound, self.group, entry_id)
            await pipe.execute()

        await self._worker._link.run("dead-lettering an inbound entry", once)
        self._failures.pop(entry_id, None)
        self._last_error.pop(entry_id, None)

    async def _fill(self) -> None:
        """Read the next entries into the buffer, riding out Redis outages."""
        backoff = self._retry_after or 0.1
        while True:
            try:
                async with self._worker._link.gate_for(blocking=True):
                    await self._read()
                return
            except Exception as e:  # noqa: BLE001 — classified just below
                if isinstance(e, ResponseError) and "NOGROUP" in str(e):
                    # The stream or group was deleted (or lost in a failover): make it again.
                    self._group_ready = False
                    continue
                if not (_redis.transient(e) or isinstance(e, (asyncio.TimeoutError, OSError))):
                    raise
                log.warning("reading %s failed (%s: %s); retrying in %.1f s",
                            self._keys.inbound, type(e).__name__, e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _read(self) -> None:
        r = self._worker._blocking
        if not self._group_ready:
            try:
                await r.xgroup_create(self._keys.inbound, self.group, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
            self._group_ready = True
        wait = self._resume_at - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        if self._claim_idle_ms is not None and time.monotonic() >= self._next_claim:
            await self._claim()
        if self._pending_from is not None:
            raw = await r.xreadgroup(
                self.group, self.consumer, {self._keys.inbound: self._pending_from}, count=self._count
            )
            got = _redis.entries(raw)
            if got:
                self._pending_from = got[-1][0]
                self._buffer.extend(got)
            else:
                self._pending_from = None
            return
        raw = await asyncio.wait_for(
            r.xreadgroup(
                self.group,
                self.consumer,
                {self._keys.inbound: ">"},
                count=self._count,
                block=self._block_ms,
            ),
            self._block_ms / 1000 + 10,
        )
        self._buffer.extend(_redis.entries(raw))

    async def _claim(self) -> None:
        """Take over events other consumers left pending for ``claim_idle``."""
        assert self._claim_idle_ms is not None
        self._next_claim = time.monotonic() + max(self._claim_idle_ms / 2000, 0.05)
        cursor, claimed = "0-0", 0
        for _ in range(10):
            raw = await self._worker._blocking.xautoclaim(
                self._keys.inbound, self.group, self.consumer,
                self._claim_idle_ms, cursor, count=100, justid=True,
            )
            cursor, ids = _redis.claimed_ids(raw)
            claimed += len(ids)
            if cursor == "0-0":
                break
        if claimed:
            log.info("took over %d inbound events left pending by other consumers", claimed)
            self._pending_from = "0"
