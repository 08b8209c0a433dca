"""Every Redis key name the package uses (SPEC §2), in one place.

All keys of one platform carry the hash tag ``{<platform>}``, so a platform
lives on one Redis Cluster slot.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_CACHE_PREFIX = "sg:msg:"
"""Where message keys live by default (the gateway's ``redis.cache_prefix``)."""

CHANNEL_IDLE_EXPIRY_MS = 30 * 24 * 3600 * 1000
"""A channel's state hash expires after 30 idle days (SPEC §2)."""


def _check_name(what: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, not {value!r}")
    if "{" in value or "}" in value:
        raise ValueError(f"{what} {value!r} may not contain '{{' or '}}' (it is a hash tag)")


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names of one platform under one prefix (``sg`` by default)."""

    prefix: str
    platform: str

    def __post_init__(self) -> None:
        _check_name("prefix", self.prefix)
        _check_name("platform", self.platform)

    @property
    def outbound(self) -> str:
        """``sg:{P}:outbound`` — the stream workers publish to."""
        return f"{self.prefix}:{{{self.platform}}}:outbound"

    @property
    def gateway_group(self) -> str:
        """``sg:gateway:P`` — the gateways' consumer group on the outbound stream."""
        return f"{self.prefix}:gateway:{self.platform}"

    @property
    def inbound(self) -> str:
        """``sg:{P}:inbound`` — platform events for the workers."""
        return f"{self.prefix}:{{{self.platform}}}:inbound"

    @property
    def inbound_dlq(self) -> str:
        """``sg:{P}:inbound:dlq`` — inbound entries that are not valid events."""
        return f"{self.inbound}:dlq"

    @property
    def worker_group(self) -> str:
        """``sg:worker:P`` — the workers' default consumer group on the inbound stream."""
        return f"{self.prefix}:worker:{self.platform}"

    def channel(self, channel_id: str) -> str:
        """``sg:{P}:chan:<channel>`` — the channel's state hash; field ``seq`` is the
        producers' counter."""
        return f"{self.prefix}:{{{self.platform}}}:chan:{channel_id}"

    def seq_taker(self, channel_id: str) -> str:
        """``sg:{P}:seq_taker:<channel>`` — the token of the producer that took the
        channel's last ``seq`` under ``wait_replicas`` (as the Rust publisher
        writes it), so a retry after a short ``WAIT`` can tell that its ``seq``
        still stands and reuse it instead of leaving a gap."""
        return f"{self.prefix}:{{{self.platform}}}:seq_taker:{channel_id}"

    @property
    def reply_prefix(self) -> str:
        """``sg:{P}:rpc:reply:`` — every RPC reply list starts with this."""
        return f"{self.prefix}:{{{self.platform}}}:rpc:reply:"
