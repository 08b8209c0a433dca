"""Connections, the retry rule, and the few Redis replies the package reads itself.

Three deployments, one :class:`Link` (see :mod:`~stargazer_client.config`):

- **one server** — ``redis.asyncio.Redis`` on a pool that *waits* for a free
  connection instead of failing when it is exhausted;
- **a Redis Cluster** — ``redis.asyncio.cluster.RedisCluster``, which routes
  each command by its key's slot and follows ``MOVED``/``ASK`` by itself.
  Every key of a platform carries the hash tag ``{<platform>}``, so every
  pipeline and ``MULTI`` the package sends stays on one slot. Its per-node
  pools fail when exhausted, so calls are gated by a semaphore instead;
- **a Sentinel-managed primary** — ``redis.asyncio.sentinel.Sentinel.master_for``:
  a connection asks the Sentinels for the primary when it connects, and one
  that finds a demoted primary (``READONLY``) drops itself, so the next try
  lands on the new one.

Two clients each: one for ordinary commands and one for blocking reads
(BLPOP of RPC replies, XREADGROUP … BLOCK of inbound events), so a blocked
read never holds up a publish and never trips a socket timeout meant for
short commands.

Failures that a reconnect can cure — a connection lost or refused, a
time-out, a demoted primary, a blocked read unblocked by a failover, a
cluster reconfiguring (``TRYAGAIN``, ``CLUSTERDOWN``), a write not
replicated in time — are :func:`transient`: :meth:`Link.run` tries the
operation again, with the same arguments, until ``retry_for`` seconds have
passed. Every operation the package retries is safe to repeat: a publish
sends the same payload (same ``seq``, same idempotency key, so a copy that
did land is skipped by the gateway as a proven duplicate, SPEC G2), an
acknowledgement or a read is idempotent.

Stream replies are taken raw and parsed here, so RESP2 and RESP3 (redis-py 8's
default) read the same.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar, Union

from redis import exceptions as rx
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import SSLConnection
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from .config import RedisConfig, redact

log = logging.getLogger("stargazer_client")

T = TypeVar("T")

Client = Union[Redis, RedisCluster]
"""What the package sends commands through."""

Entry = tuple[str, Union[dict[str, bytes], None]]
"""A stream entry: its id and its fields (``None`` when the entry was deleted
while pending)."""

_RAW = ("XREADGROUP", "XAUTOCLAIM")

_TRANSIENT_REPLIES = ("READONLY", "UNBLOCKED", "TRYAGAIN", "CLUSTERDOWN", "LOADING",
                      "MASTERDOWN", "NOREPLICAS")
"""Error replies that mean "the deployment is changing under you": a primary
demoted by a failover, a blocked read unblocked by it, a slot being moved or
a cluster electing a new primary, a server still loading its data."""


class NotReplicated(rx.ConnectionError):
    """A write reached fewer replicas than ``wait_replicas`` within
    ``wait_timeout_ms``: it may be lost in a failover, so it is written again."""


def transient(e: BaseException) -> bool:
    """Whether trying again (after a reconnect) may succeed."""
    if isinstance(e, (rx.AuthenticationError, rx.AuthorizationError, rx.MaxConnectionsError,
                      rx.ExternalAuthProviderError)):
        return False
    if _tls_refused(e):
        return False  # a wrong CA or a missing client certificate will not heal
    if isinstance(e, (rx.ConnectionError, rx.TimeoutError, rx.ClusterError, rx.SlotNotCoveredError,
                      ConnectionResetError, ConnectionRefusedError, BrokenPipeError)):
        return True
    if isinstance(e, rx.ResponseError):
        return str(e).split(" ", 1)[0].upper() in _TRANSIENT_REPLIES
    return False


def _tls_refused(e: BaseException) -> bool:
    seen: BaseException | None = e
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def text(v: Any) -> str:
    """A reply value as text (replies are bytes unless the client decodes)."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


def _raw(response: Any, **_options: Any) -> Any:
    return response


class _WaitingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """A Sentinel pool that waits for a free connection, like the one-server pool."""


@dataclass
class Link:
    """The worker's way to Redis, whichever the deployment."""

    commands: Client
    """Short commands: publishes, acknowledgements, lookups."""
    blocking: Client
    """Blocking reads, with no socket time-out of their own (the caller bounds them)."""
    mode: str
    """``single``, ``cluster`` or ``sentinel``."""
    where: str
    """Where it points, passwords hidden (for messages)."""
    owned: bool
    """Whether ``commands`` was made here (and is closed with the worker)."""
    wait_replicas: int = 0
    wait_timeout_ms: int = 0
    retry_for: float = 30.0
    """How long an operation is tried again after transient failures."""
    sentinel: Sentinel | None = None
    gate: asyncio.Semaphore | None = None
    """Cluster only: bounds concurrent calls below the per-node pool size."""
    blocking_gate: asyncio.Semaphore | None = None
    """The same for the blocking client."""

    @property
    def is_cluster(self) -> bool:
        return self.mode == "cluster"

    def gate_for(self, *, blocking: bool) -> AbstractAsyncContextManager[Any]:
        """The cluster gate of a client (a no-op elsewhere)."""
        return self._gate(blocking)

    def _gate(self, blocking: bool) -> AbstractAsyncContextManager[Any]:
        gate = self.blocking_gate if blocking else self.gate
        return gate if gate is not None else nullcontext()

    async def run(self, what: str, op: Callable[[], Awaitable[T]], *, blocking: bool = False) -> T:
        """``op()``, tried again after transient failures for up to ``retry_for`` s
        (``blocking``: it uses the blocking client)."""
        deadline = time.monotonic() + self.retry_for
        backoff = 0.05
        attempt = 1
        while True:
            try:
                async with self._gate(blocking):
                    if isinstance(self.commands, RedisCluster):
                        # redis-py's asyncio ClusterPipeline(transaction=True) runs a
                        # first initialize() in a thread of its own, whose event loop
                        # then dies with the connections it made: initialize here
                        # first, on this loop (a no-op once done).
                        await self.commands.initialize()
                    return await op()
            except Exception as e:  # noqa: BLE001 — classified just below
                if not transient(e) or time.monotonic() + backoff > deadline:
                    raise
                log.warning("%s failed on %s (attempt %d: %s: %s); trying again in %.2f s",
                            what, self.where, attempt, type(e).__name__, e, backoff)
            # A pause between tries of a failed command (a backoff, not a wait for an event).
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)
            attempt += 1

    def check_replicated(self, got: Any) -> None:
        n = int(got)
        if n < self.wait_replicas:
            raise NotReplicated(
                f"{n} of {self.wait_replicas} replicas acknowledged within {self.wait_timeout_ms} ms"
            )

    async def aclose(self) -> None:
        await _close(self.blocking)
        if self.owned:
            await _close(self.commands)
        if self.sentinel is not None:
            await self.sentinel.aclose()


async def _close(client: Client) -> None:
    if isinstance(client, Redis):
        await client.aclose(close_connection_pool=True)
    else:
        await client.aclose()


def _set_raw(client: Client) -> None:
    for cmd in _RAW:
        client.set_response_callback(cmd, _raw)


def _blocking_twin(commands: Redis, max_connections: int) -> Redis:
    base = commands.connection_pool
    kwargs = dict(base.connection_kwargs)
    # Blocking reads are bounded by the caller (asyncio timeouts), not the socket.
    kwargs["socket_timeout"] = None
    kwargs["decode_responses"] = False
    return Redis(
        connection_pool=BlockingConnectionPool(
            connection_class=base.connection_class,
            max_connections=max_connections,
            timeout=None,
            **kwargs,
        )
    )


_TWIN_KEYS = ("username", "password", "credential_provider", "client_name",
              "socket_connect_timeout", "socket_keepalive", "protocol")
"""What a blocking twin of a caller's RedisCluster copies from it (with ``ssl_*``)."""


def connect(
    redis: str | Redis | RedisCluster | RedisConfig,
    *,
    max_connections: int,
    retry_for: float,
) -> Link:
    """A :class:`Link` for a URL, a :class:`RedisConfig`, or a client of the caller's
    (which stays the caller's to close)."""
    if isinstance(redis, str):
        redis = RedisConfig(redis)
    if isinstance(redis, Redis):
        blocking = _blocking_twin(redis, max_connections)
        _set_raw(blocking)
        return Link(redis, blocking, "single", "a client of the caller's", False, retry_for=retry_for)
    if isinstance(redis, RedisCluster):
        # A twin with the caller's settings, without a socket time-out.
        given = redis.get_connection_kwargs()
        kw: dict[str, Any] = {k: v for k, v in given.items()
                              if k in _TWIN_KEYS or k.startswith("ssl_")}
        cls = given.get("connection_class")
        kw["ssl"] = isinstance(cls, type) and issubclass(cls, SSLConnection)
        kw["socket_timeout"] = None
        kw["decode_responses"] = False
        seeds = [ClusterNode(n.host, n.port) for n in redis.get_nodes()] or list(redis.startup_nodes)
        cblocking = _cluster_client(seeds, max_connections, kw)
        _set_raw(cblocking)
        return Link(redis, cblocking, "cluster", "a cluster client of the caller's", False,
                    retry_for=retry_for, gate=asyncio.Semaphore(max_connections),
                    blocking_gate=asyncio.Semaphore(max_connections))
    if not isinstance(redis, RedisConfig):
        raise TypeError(
            "redis must be a URL, a RedisConfig, a redis.asyncio.Redis or a RedisCluster, "
            f"not {type(redis).__name__}"
        )
    if redis.mode == "cluster":
        link = _cluster(redis, max_connections)
    elif redis.mode == "sentinel":
        link = _sentinel(redis, max_connections)
    else:
        link = _single(redis, max_connections)
    link.retry_for = retry_for
    link.wait_replicas = redis.wait_replicas
    link.wait_timeout_ms = redis.wait_timeout_ms
    return link


def _single(cfg: RedisConfig, max_connections: int) -> Link:
    password = cfg.password()
    pool = BlockingConnectionPool.from_url(
        cfg.server_url, max_connections=max_connections, timeout=None,
        **cfg.tls_kwargs(), **dict(cfg.extra),
    )
    if password is not None:
        pool.connection_kwargs["password"] = password  # password_env wins over the URL's
    commands = Redis(connection_pool=pool)
    blocking = _blocking_twin(commands, max_connections)
    _set_raw(blocking)
    return Link(commands, blocking, "single", redact(cfg.server_url), True)


def _cluster_client(seeds: list[ClusterNode], max_connections: int, kw: dict[str, Any]) -> RedisCluster:
    # One more than the gate lets through, so a per-node pool is never exhausted.
    make: Any = RedisCluster
    client: RedisCluster = make(startup_nodes=seeds, max_connections=max_connections + 1, **kw)
    return client


def _cluster(cfg: RedisConfig, max_connections: int) -> Link:
    password = cfg.password()
    seeds = cfg.cluster_nodes()
    first = seeds[0]
    kw: dict[str, Any] = {
        "username": first.username,
        "password": password if password is not None else first.password,
        "ssl": first.tls,
        **cfg.tls_kwargs(),
        **dict(cfg.extra),
    }
    commands = _cluster_client([ClusterNode(n.host, n.port) for n in seeds], max_connections, kw)
    blocking = _cluster_client([ClusterNode(n.host, n.port) for n in seeds], max_connections,
                               {**kw, "socket_timeout": None})
    _set_raw(blocking)
    return Link(commands, blocking, "cluster", f"cluster {[redact(u) for u in cfg.cluster]}", True,
                gate=asyncio.Semaphore(max_connections),
                blocking_gate=asyncio.Semaphore(max_connections))


def _sentinel(cfg: RedisConfig, max_connections: int) -> Link:
    assert cfg.sentinel is not None
    password = cfg.password()
    nodes = cfg.sentinel.nodes()
    skw: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 2.0}
    if nodes[0].password is not None:
        skw["password"] = nodes[0].password
        skw["username"] = nodes[0].username
    make: Any = Sentinel
    sentinel: Sentinel = make([(n.host, n.port) for n in nodes], sentinel_kwargs=skw, **dict(cfg.extra))
    mkw: dict[str, Any] = {"max_connections": max_connections, "timeout": None,
                           "socket_connect_timeout": 2.0, "socket_timeout": 10.0}
    if password is not None:
        mkw["password"] = password
    master_for: Any = sentinel.master_for
    commands: Redis = master_for(cfg.sentinel.master, redis_class=Redis,
                                 connection_pool_class=_WaitingSentinelPool, **mkw)
    blocking: Redis = master_for(cfg.sentinel.master, redis_class=Redis,
                                 connection_pool_class=_WaitingSentinelPool,
                                 **{**mkw, "socket_timeout": None})
    _set_raw(blocking)
    where = f"sentinel `{cfg.sentinel.master}` {[redact(u) for u in cfg.sentinel.urls]}"
    return Link(commands, blocking, "sentinel", where, True, sentinel=sentinel)


# redis-py's annotations of these two differ between 5.x and 8.x; call them untyped.


async def hget(client: Client, key: str, field: str) -> Any:
    c: Any = client
    return await c.hget(key, field)


async def blpop(client: Client, key: str, timeout: float) -> Any:
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
