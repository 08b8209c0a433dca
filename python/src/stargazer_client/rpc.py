"""What gateway RPCs return (SPEC G9), typed.

The gateway answers an ``rpc_request`` by RPUSHing JSON onto its
``reply_key``: the method's result, or ``{"error": "…"}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import RpcError


@dataclass(frozen=True, slots=True)
class HistoryMessage:
    """One message of a channel's history (``fetch_channel_history``)."""

    user_id: str
    user_name: str
    text: str
    timestamp: float
    """Unix time in seconds."""
    message_id: str
    is_bot: bool = False
    reply_to_id: str | None = None
    reactions: list[Any] = field(default_factory=list)

    @classmethod
    def from_json(cls, v: Any) -> HistoryMessage:
        if not isinstance(v, Mapping):
            raise ValueError(f"a history message must be an object, not {type(v).__name__}")
        try:
            return cls(
                user_id=str(v.get("user_id", "")),
                user_name=str(v.get("user_name", "")),
                text=str(v.get("text", "")),
                timestamp=float(v.get("timestamp", 0.0)),
                message_id=str(v.get("message_id", "")),
                is_bot=bool(v.get("is_bot", False)),
                reply_to_id=None if v.get("reply_to_id") is None else str(v["reply_to_id"]),
                reactions=list(v.get("reactions") or []),
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"malformed history message: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ToolContext:
    """Who asks for a delegated tool; passed to the tool as its ``context``.
    Empty ``platform`` and ``channel_id`` are filled in by the gateway."""

    platform: str = ""
    channel_id: str = ""
    user_id: str = ""
    user_name: str = ""
    guild_id: str = ""
    message_id: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def parse_reply(method: str, raw: bytes | str) -> Any:
    """The value of a reply, or :class:`RpcError` for ``{"error": …}``."""
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise RpcError(method, f"the reply is not JSON: {e}") from None
    if isinstance(value, dict) and len(value) == 1 and "error" in value:
        err = value["error"]
        raise RpcError(method, err if isinstance(err, str) else json.dumps(err))
    return value
