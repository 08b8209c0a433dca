"""Connections, and the few Redis replies the package reads itself.

Two clients per worker: one for ordinary commands and one for blocking reads
(BLPOP of RPC replies, XREADGROUP … BLOCK of inbound events), so a blocked
read never holds up a publish and never trips a socket timeout meant for
short commands. Both pools *wait* for a free connection instead of failing
when they are exhausted (redis-py's default async pool raises at 100).

Stream replies are taken raw and parsed here, so RESP2 and RESP3 (redis-py 8's
default) read the same.
"""

from __future__ import annotations

from typing import Any, Union

from redis.asyncio import BlockingConnectionPool, Redis

Entry = tuple[str, Union[dict[str, bytes], None]]
"""A stream entry: its id and its fields (``None`` when the entry was deleted
while pending)."""

_RAW = ("XREADGROUP", "XAUTOCLAIM")


def text(v: Any) -> str:
    """A reply value as text (replies are bytes unless the client decodes)."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


def _raw(response: Any, **_options: Any) -> Any:
    return response


def clients(
    redis: str | Redis, *, max_connections: int
) -> tuple[Redis, Redis, bool]:
    """(commands, blocking, owned): ``owned`` says whether the commands client
    was made here (and is closed with the worker)."""
    if isinstance(redis, str):
        commands = Redis(
            connection_pool=BlockingConnectionPool.from_url(
                redis, max_connections=max_connections, timeout=None
            )
        )
        owned = True
    elif isinstance(redis, Redis):
        commands, owned = redis, False
    else:
        raise TypeError(f"redis must be a URL or a redis.asyncio.Redis, not {type(redis).__name__}")
    base = commands.connection_pool
    kwargs = dict(base.connection_kwargs)
    # Blocking reads are bounded by the caller (asyncio timeouts), not the socket.
    kwargs["socket_timeout"] = None
    kwargs["decode_responses"] = False
    blocking = Redis(
        connection_pool=BlockingConnectionPool(
            connection_class=base.connection_class,
            max_connections=max_connections,
            timeout=None,
            **kwargs,
        )
    )
    for cmd in _RAW:
        blocking.set_response_callback(cmd, _raw)
    return commands, blocking, owned


# redis-py's annotations of these two differ between 5.x and 8.x; call them untyped.


async def hget(client: Redis, key: str, field: str) -> Any:
    c: Any = client
    return await c.hget(key, field)


async def blpop(client: Redis, key: str, timeout: float) -> Any:
    """``[key, value]``, or None when ``timeout`` seconds passed first."""
    c: Any = client
    return await c.blpop([key], timeout=timeout)


def _fields(flat: Any) -> dict[str, bytes] | None:
    if flat is None:
        return None
    if isinstance(flat, dict):
        return {text(k): v for k, v in flat.items()}
    it = iter(flat)
    return {text(k): v for k, v in zip(it, it)}


def entries(raw: Any) -> list[Entry]:
    """The entries of a raw XREADGROUP reply on one stream (RESP2 or RESP3)."""
    if not raw:
        return []
    streams = raw.items() if isinstance(raw, dict) else raw
    out: list[Entry] = []
    for _stream, items in streams:
        for item in items or ():
            out.append((text(item[0]), _fields(item[1])))
    return out


def claimed_ids(raw: Any) -> tuple[str, list[str]]:
    """(next cursor, claimed ids) of a raw ``XAUTOCLAIM … JUSTID`` reply."""
    return text(raw[0]), [text(i) for i in raw[1] or ()]
