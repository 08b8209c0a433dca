"""Where Redis is and how to reach it — the gateway's ``[redis]`` table, in Python.

One server (``url``), a Redis Cluster (``cluster``: seed nodes), or a
Sentinel-managed primary (``sentinel``: the monitored name and the Sentinels),
with TLS (``rediss://``, a CA file, an optional client certificate) and a
password taken from an environment variable. The keys and what is refused
mirror the gateway's (``src/config.rs``, ``docs/redis.md``), so one set of
values configures both::

    from stargazer_client import RedisConfig, SentinelConfig, Worker

    Worker(RedisConfig(cluster=["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"]), "discord")
    Worker(RedisConfig(sentinel=SentinelConfig("sg", ["redis://10.0.0.1:26379"]),
                       wait_replicas=1), "discord")
    Worker(RedisConfig(url="rediss://redis.internal:6380", tls_ca_file="/etc/sg/ca.pem",
                       password_env="SG_REDIS_PASSWORD"), "discord")

A configuration whose keys contradict each other is refused when the
:class:`RedisConfig` is made, with :class:`~stargazer_client.errors.ConfigError`
naming the keys; a ``password_env`` variable that is not set, or a TLS file
that cannot be read, is refused when the worker connects. Passwords never
appear in a message.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from .errors import ConfigError

DEFAULT_WAIT_TIMEOUT_MS = 1000
"""How long a publish waits for ``wait_replicas`` replicas by default."""


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages and logs)."""
    return re.sub(r"(://[^:@/]*:)[^@/]*@", r"\1***@", url)


@dataclass(frozen=True, slots=True)
class Node:
    """One ``host:port`` taken from a URL, with the URL's credentials."""

    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool


def _node(key: str, url: str, schemes: tuple[str, ...], default_port: int) -> Node:
    shown = redact(url)
    if not isinstance(url, str) or not url:
        raise ConfigError(f"{key}: a URL must be a non-empty string, not {url!r}")
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in schemes:
        want = " or ".join(f"{s}://" for s in schemes)
        raise ConfigError(f"{key}: `{shown}` must start with {want}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"{key}: `{shown}` is not a Redis URL: {e}") from None
    if not parts.hostname:
        raise ConfigError(f"{key}: `{shown}` names no host")
    if parts.path not in ("", "/", "/0"):
        raise ConfigError(f"{key}: `{shown}` names a database; a cluster and a Sentinel have only db 0")
    return Node(
        host=parts.hostname,
        port=port or default_port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=scheme == "rediss",
    )


@dataclass(frozen=True, slots=True)
class SentinelConfig:
    """``sentinel = { master = "sg", urls = ["redis://10.0.0.1:26379", …] }``."""

    master: str
    """The name the Sentinels monitor the primary under (``sentinel monitor <name> …``)."""
    urls: tuple[str, ...]
    """The Sentinels (``redis://[:password@]host:port``); any that answers is asked."""

    def __init__(self, master: str, urls: Iterable[str]) -> None:
        if isinstance(urls, str):
            urls = [u.strip() for u in urls.split(",") if u.strip()]
        object.__setattr__(self, "master", master)
        object.__setattr__(self, "urls", tuple(urls))
        if not isinstance(master, str) or not master or not self.urls:
            raise ConfigError(
                "redis.sentinel needs `master` (the monitored name) and at least one of `urls`"
            )
        for u in self.urls:
            _node("redis.sentinel.urls", u, ("redis",), 26379)

    def nodes(self) -> list[Node]:
        return [_node("redis.sentinel.urls", u, ("redis",), 26379) for u in self.urls]


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """How a worker reaches Redis (the gateway's ``[redis]`` keys; see the module doc).

    Exactly one of ``url``, ``cluster`` and ``sentinel`` (``url`` defaults to
    ``redis://127.0.0.1:6379`` when neither of the others is given).
    """

    url: str | None = None
    """One server: ``redis://[user[:password]@]host:port[/db]``, ``rediss://…`` (TLS),
    ``unix:///path``."""
    cluster: tuple[str, ...] = ()
    """A Redis Cluster: seed nodes (``redis://`` or ``rediss://``, any of its nodes)."""
    sentinel: SentinelConfig | None = None
    """A Sentinel-managed primary, followed through failovers."""
    tls_ca_file: str | None = None
    """PEM file of the CA that signed the server's certificate (``rediss://``);
    default: the system's trusted roots."""
    tls_cert_file: str | None = None
    """PEM client certificate, for a server that requires one; with ``tls_key_file``."""
    tls_key_file: str | None = None
    """PEM private key of ``tls_cert_file``."""
    password_env: str | None = None
    """Name of an environment variable that holds the password (of the URL's
    user, or of ``default``); wins over a password in the URL."""
    wait_replicas: int = 0
    """Replicas every publish (and every ``seq`` taken) must reach before it
    counts (``WAIT``); fewer in time is retried as a failed write."""
    wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS
    """How long a publish waits for them."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Further keyword arguments for redis-py's client (e.g. ``socket_timeout``)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        cluster: Iterable[str] | str = (),
        sentinel: SentinelConfig | Mapping[str, Any] | None = None,
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        password_env: str | None = None,
        wait_replicas: int = 0,
        wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(cluster, str):  # one comma-separated string, as from the environment
            cluster = [u.strip() for u in cluster.split(",") if u.strip()]
        if isinstance(sentinel, Mapping):
            unknown = set(sentinel) - {"master", "urls"}
            if unknown:
                raise ConfigError(f"redis.sentinel: unknown key(s) {sorted(unknown)}")
            sentinel = SentinelConfig(sentinel.get("master", ""), sentinel.get("urls", ()))
        values = {
            "url": url,
            "cluster": tuple(cluster),
            "sentinel": sentinel,
            "tls_ca_file": tls_ca_file,
            "tls_cert_file": tls_cert_file,
            "tls_key_file": tls_key_file,
            "password_env": password_env,
            "wait_replicas": wait_replicas,
            "wait_timeout_ms": wait_timeout_ms,
            "extra": dict(extra or {}),
        }
        for k, v in values.items():
            object.__setattr__(self, k, v)
        self._validate()

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any]) -> RedisConfig:
        """From a parsed ``[redis]`` table of the gateway's TOML file. The keys
        that are not about connecting (``prefix``, ``cache_prefix``) must be
        given to the :class:`~stargazer_client.Worker` instead, so they are refused
        here rather than silently ignored."""
        known = {"url", "cluster", "sentinel", "tls_ca_file", "tls_cert_file", "tls_key_file",
                 "password_env", "wait_replicas", "wait_timeout_ms"}
        unknown = set(table) - known
        if unknown:
            raise ConfigError(
                f"redis: key(s) {sorted(unknown)} are not connection settings "
                "(prefix and cache_prefix are Worker(prefix=…, cache_prefix=…))"
            )
        return cls(**dict(table))

    @property
    def mode(self) -> str:
        """``"single"``, ``"cluster"`` or ``"sentinel"``."""
        if self.cluster:
            return "cluster"
        if self.sentinel is not None:
            return "sentinel"
        return "single"

    @property
    def server_url(self) -> str:
        """The one server's URL (single mode)."""
        return self.url or "redis://127.0.0.1:6379"

    def __repr__(self) -> str:
        if self.mode == "cluster":
            where = f"cluster={[redact(u) for u in self.cluster]}"
        elif self.sentinel is not None:
            where = f"sentinel={self.sentinel.master!r} {[redact(u) for u in self.sentinel.urls]}"
        else:
            where = f"url={redact(self.server_url)!r}"
        return f"RedisConfig({where}, wait_replicas={self.wait_replicas})"

    def _validate(self) -> None:
        def path(key: str, v: object) -> None:
            if v is not None and (not isinstance(v, str) or not v):
                raise ConfigError(f"redis.{key} must be a non-empty path, not {v!r}")

        if self.sentinel is not None and not isinstance(self.sentinel, SentinelConfig):
            raise ConfigError("redis.sentinel must be a SentinelConfig or {master, urls}")
        if self.sentinel is not None and (self.url is not None or self.cluster):
            raise ConfigError(
                "redis.sentinel takes the place of redis.url and redis.cluster: set only one"
            )
        if self.cluster and self.url is not None:
            raise ConfigError(
                "redis.url and redis.cluster are both set: name the cluster's seed nodes in "
                "redis.cluster only"
            )
        for k in ("tls_ca_file", "tls_cert_file", "tls_key_file", "password_env"):
            path(k, getattr(self, k))
        tls_files = self.tls_ca_file is not None or self.tls_cert_file is not None
        if self.sentinel is not None and tls_files:
            raise ConfigError(
                "redis.tls_ca_file / redis.tls_cert_file are not supported with redis.sentinel yet"
            )
        if self.mode == "cluster":
            for u in self.cluster:
                n = _node("redis.cluster", u, ("redis", "rediss"), 6379)
                if tls_files and not n.tls:
                    raise ConfigError(
                        f"redis.tls_ca_file / redis.tls_cert_file are set but `{redact(u)}` is not "
                        "a rediss:// URL (TLS would not be used)"
                    )
            if len({u.split("://", 1)[0] for u in self.cluster}) > 1:
                raise ConfigError("redis.cluster: mix of redis:// and rediss:// seeds")
        elif self.mode == "single":
            u = self.server_url
            if not isinstance(u, str) or not re.match(r"^(redis|rediss|unix)://", u):
                raise ConfigError(
                    f"redis.url: `{redact(str(u))}` must start with redis://, rediss:// or unix://"
                )
            if u.startswith(("redis://", "rediss://")):
                try:
                    urlsplit(u).port
                except ValueError as e:
                    raise ConfigError(f"redis.url: `{redact(u)}` is not a Redis URL: {e}") from None
            if tls_files and not u.startswith("rediss://"):
                raise ConfigError(
                    f"redis.tls_ca_file / redis.tls_cert_file are set but `{redact(u)}` is not "
                    "a rediss:// URL (TLS would not be used)"
                )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError(
                "redis.tls_cert_file and redis.tls_key_file go together: set both or neither"
            )
        for k in ("wait_replicas", "wait_timeout_ms"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"redis.{k} must be an int >= 0, not {v!r}")
        if self.wait_replicas > 0 and self.wait_timeout_ms == 0:
            raise ConfigError(
                "redis.wait_timeout_ms must be greater than 0 when redis.wait_replicas is set "
                "(WAIT with 0 would block a publish forever)"
            )
        if self.wait_replicas > 0 and self.mode == "cluster":
            raise ConfigError(
                "redis.wait_replicas is not supported with redis.cluster in the Python client yet "
                "(WAIT must follow the write on the same connection to the slot's primary)"
            )

    # -- what the connection code needs

    def cluster_nodes(self) -> list[Node]:
        """The cluster's seed nodes, parsed."""
        return [_node("redis.cluster", u, ("redis", "rediss"), 6379) for u in self.cluster]

    def password(self) -> str | None:
        """The password from ``password_env`` (None without one); an unset variable
        is a :class:`ConfigError`."""
        if self.password_env is None:
            return None
        v = os.environ.get(self.password_env)
        if v is None:
            raise ConfigError(
                f"redis.password_env names `{self.password_env}`, which is not set in the environment"
            )
        return v

    def tls_kwargs(self) -> dict[str, Any]:
        """redis-py's ``ssl_*`` keywords for the TLS files (verification always on)."""
        out: dict[str, Any] = {}
        for key, arg in (("tls_ca_file", "ssl_ca_certs"), ("tls_cert_file", "ssl_certfile"),
                         ("tls_key_file", "ssl_keyfile")):
            p = getattr(self, key)
            if p is None:
                continue
            try:
                with open(p, "rb"):
                    pass
            except OSError as e:
                raise ConfigError(f"redis.{key}: cannot read `{p}`: {e.strerror or e}") from None
            out[arg] = p
        return out
