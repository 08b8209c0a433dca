"""The exceptions the package raises on its own.

Bad arguments are plain :class:`ValueError` (or :class:`TypeError`), raised
before anything is written to Redis. Redis failures surface as redis-py's own
exceptions (``redis.exceptions.ConnectionError``, …).
"""

from __future__ import annotations


class StargazerError(Exception):
    """Base of every error specific to Stargazer."""


class ConfigError(StargazerError, ValueError):
    """A Redis configuration that cannot work (keys that contradict each other, a
    URL that does not parse, a ``password_env`` variable that is not set, a TLS
    file that cannot be read); the message names the keys."""


class RpcError(StargazerError):
    """A gateway answered an RPC with ``{"error": …}``, or with a reply that
    is not what the method promises."""

    def __init__(self, method: str, message: str) -> None:
        super().__init__(f"the gateway answered `{method}` with an error: {message}")
        self.method = method
        self.message = message


class RpcTimeout(StargazerError, TimeoutError):
    """No gateway answered an RPC in time (is a gateway running for the platform?)."""

    def __init__(self, method: str, platform: str, timeout: float) -> None:
        super().__init__(
            f"no gateway answered `{method}` within {timeout:g} s "
            f"(is a gateway running for platform `{platform}`?)"
        )
        self.method = method
        self.platform = platform
        self.timeout = timeout
