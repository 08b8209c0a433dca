"""Outbound envelopes (SPEC §1), built and checked before anything is written.

Every constructor of :class:`Envelope` checks its arguments and raises
:class:`ValueError` (or :class:`TypeError` for a wrong type) naming the bad
one, so an envelope that exists is one the gateway accepts. What depends on
the worker — ``seq``, ``created_ms``, ``expires_ms``, a generated
``message_key``, the signature — is added when it is published.

>>> Envelope.message("42", "hello").type
'message'
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Union

SEQUENCED = frozenset({"message", "file", "buttons", "reaction", "edit", "delete"})
"""Types that take their channel's next ``seq`` (strict per-channel order, SPEC §3;
an edit or delete must follow the send it names)."""

KEYED = frozenset({"message", "file", "buttons"})
"""Types that get a generated ``message_key`` when they have none."""

TYPES = SEQUENCED | {"start_typing", "stop_typing", "presence", "rpc_request"}
"""Every type this package publishes (SPEC §1)."""


@dataclass(frozen=True, slots=True)
class Button:
    """One button: a ``custom_id`` the bot receives when it is pressed, or a ``url``."""

    label: str
    custom_id: str | None = None
    url: str | None = None
    style: str | None = None

    def __post_init__(self) -> None:
        _str("button label", self.label)
        for name in ("custom_id", "url", "style"):
            v = getattr(self, name)
            if v is not None:
                _str(f"button {name}", v, empty=False)
        if (self.custom_id is None) == (self.url is None):
            raise ValueError(
                f"button {self.label!r} needs exactly one of custom_id and url"
            )

    def to_json(self) -> dict[str, str]:
        out = {"label": self.label}
        for name in ("custom_id", "url", "style"):
            v = getattr(self, name)
            if v is not None:
                out[name] = v
        return out


ButtonLike = Union[Button, Mapping[str, str], tuple[str, str]]
"""A :class:`Button`, a mapping with its fields, or ``(label, custom_id_or_url)``
(a target starting with ``http://`` or ``https://`` is a URL)."""

_BUTTON_FIELDS = frozenset({"label", "custom_id", "url", "style"})


def _button(b: ButtonLike, i: int) -> dict[str, str]:
    try:
        if isinstance(b, Button):
            return b.to_json()
        if isinstance(b, tuple):
            if len(b) != 2:
                raise ValueError("a tuple button is (label, custom_id_or_url)")
            label, target = b
            _str("button target", target, empty=False)
            if target.startswith(("http://", "https://")):
                return Button(label, url=target).to_json()
            return Button(label, custom_id=target).to_json()
        if isinstance(b, Mapping):
            unknown = set(b) - _BUTTON_FIELDS
            if unknown:
                raise ValueError(f"unknown field(s) {sorted(unknown)} (known: label, custom_id, url, style)")
            if "label" not in b:
                raise ValueError("a button needs a label")
            return Button(
                b["label"], b.get("custom_id"), b.get("url"), b.get("style")
            ).to_json()
    except (TypeError, ValueError) as e:
        raise type(e)(f"buttons[{i}]: {e}") from None
    raise TypeError(
        f"buttons[{i}] must be a Button, a mapping or a (label, target) tuple, "
        f"not {type(b).__name__}"
    )


def _buttons(bs: Sequence[ButtonLike] | None, *, required: bool) -> list[dict[str, str]] | None:
    if bs is None:
        if required:
            raise ValueError("buttons are required")
        return None
    if isinstance(bs, (str, bytes, Mapping)) or not isinstance(bs, Sequence):
        raise TypeError(f"buttons must be a list, not {type(bs).__name__}")
    if required and not bs:
        raise ValueError("buttons may not be empty")
    return [_button(b, i) for i, b in enumerate(bs)]


def _str(name: str, v: object, *, empty: bool = True) -> str:
    if not isinstance(v, str):
        raise TypeError(f"{name} must be a str, not {type(v).__name__}")
    if not empty and not v:
        raise ValueError(f"{name} may not be empty")
    return v


def _opt(name: str, v: object) -> str | None:
    return None if v is None else _str(name, v, empty=False)


def _channel(v: object) -> str:
    """A channel id as text; platforms with numeric ids may pass an int."""
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return _str("channel_id", v, empty=False)


def _ttl(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(v).__name__}")
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, not {v!r}")
    return float(v)


def _target(target_key: object, message_id: object) -> tuple[str | None, str | None]:
    if (target_key is None) == (message_id is None):
        raise ValueError("give exactly one of target_key (a message_key) and message_id")
    return _opt("target_key", target_key), _opt("message_id", message_id)


@dataclass(frozen=True, slots=True)
class Envelope:
    """One outbound action, checked, not yet published.

    Build it with a constructor (:meth:`message`, :meth:`file`, …) and hand it
    to :meth:`Worker.publish <stargazer_client.Worker.publish>` or
    :meth:`Worker.publish_many <stargazer_client.Worker.publish_many>`.
    """

    type: str
    channel_id: str | None
    fields: Mapping[str, Any]
    """The envelope's JSON fields (``type`` first), without what publishing adds."""
    ttl: float | None = None
    """Seconds after publishing that the gateway drops it unsent (``expires_ms``)."""

    @property
    def sequenced(self) -> bool:
        """Whether it takes its channel's next ``seq``."""
        return self.type in SEQUENCED

    @staticmethod
    def _make(
        type_: str,
        channel_id: str | None,
        *,
        ttl: float | None = None,
        idempotency_key: str | None,
        trace_id: str | None,
        **fields: Any,
    ) -> Envelope:
        obj: dict[str, Any] = {"type": type_}
        if channel_id is not None:
            obj["channel_id"] = channel_id
        obj.update((k, v) for k, v in fields.items() if v is not None)
        if idempotency_key is not None:
            obj["idempotency_key"] = _str("idempotency_key", idempotency_key, empty=False)
        if trace_id is not None:
            obj["trace_id"] = _str("trace_id", trace_id, empty=False)
        return Envelope(type_, channel_id, MappingProxyType(obj), ttl)

    @classmethod
    def message(
        cls,
        channel_id: str | int,
        text: str,
        *,
        reply_to: str | None = None,
        buttons: Sequence[ButtonLike] | None = None,
        message_key: str | None = None,
        idempotency_key: str | None = None,
        trace_id: str | None = None,
    ) -> Envelope:
        """A text message, optionally replying to the platform message ``reply_to``."""
        return cls._make(
            "message",
            _channel(channel_id),
            text=_str("text", text),
            reply_to=_opt("reply_to", reply_to),
            buttons=_buttons(buttons, required=False),
            message_key=_opt("message_key", message_key),
            idempotency_key=idempotency_key,
            trace_id=trace_id,
        )

    @classmethod
    def file(
        cls,
        channel_id: str | int,
        data: bytes | bytearray | memoryview,
        filename: str = "file",
        mimetype: str = "application/octet-stream",
        *,
        text: str | None = None,
        message_key: str | None = None,
        idempotency_key: str | None = None,
        trace_id: str | None = None,
    ) -> Envelope:
        """A file (sent base64-encoded), with an optional caption ``text``."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes, not {type(data).__name__}")
        return cls._make(
            "file",
            _channel(channel_id),
            file_data=base64.b64encode(data).decode("ascii"),
            filename=_str("filename", filename, empty=False),
            mimetype=_str("mimetype", mimetype, empty=False),
            text=None if text is None else _str("text", text),
            message_key=_opt("message_key", message_key),
            idempotency_key=idempotency_key,
            trace_id=trace_id,
        )

    @classmethod
    def buttons(
        cls,
        channel_id: str | int,
        text: str,
        buttons: Sequence[ButtonLike],
        *,
        message_key: str | None = None,
        idempotency_key: str | None = None,
        trace_id: str | None = None,
    ) -> Envelope:
        """Text with at least one button."""
        return cls._make(
            "buttons",
            _channel(channel_id),
            text=_str("text", text),
            buttons=_buttons(buttons, required=True),
            message_key=_opt("message_key", message_key),
            idempotency_key=idempotency_key,
            trace_id=trace_id,
        )

    @classmethod
    def edit(
        cls,
        channel_id: str | int,
        text: str,
        *,
        target_key: str | None = None,
        message_id: str | None = None,
        buttons: Sequence[ButtonLike] | None = None,
        idempotency_key: str | None = None,
        trace_id: str | None = None,
    ) -> Envelope:
        """Replace the text of an earlier message, named by its ``message_key``
        (``target_key``, usable before the platform id is known) or by its platform
        ``message_id``."""
        target_key, message_id = _target(target_key, message_id)
        return cls._make(
            "edit",
            _channel(channel_id),
            text=_str("text", text),
            target_key=target_key,
            message_id=message_id,
            buttons=_buttons(buttons, required=False),
            idempotency_key=idempotency_key,
            trace_id=trace_id,
        )

    @classmethod
    def delete(
        cls,
        channel_id: str | int,
        *,
        target_key: str | None = None,
        message_id: str | None = None,
        idempotency_key: str | None = None,
        trace_id: str | None = None,
    ) -> Envelope:
        """Delete an earlier message, named as for :meth:`edit`."""
        target_key, message_id = _target(target_key, message_id)
        return cls._make(
            "delete",
            _channel(channel_id),
            target_key=target_key,
            message_id=message_id,
            idempotency_key=idempotency_key,
            trace_id=trace_id,
        )

    @classmethod
    def start_typing(
        cls, channel_id: str | int, ttl: float = 10.0, *, trace_id: str | None = None
    ) -> Envelope:
        """Show typing; dropped unsent if no gateway sends it within ``ttl`` seconds."""
        return cls._make(
            "start_typing",
            _channel(channel_id),
            ttl=_ttl("ttl", ttl),
            idempotency_key=None,
            trace_id=trace_id,
        )

    @classmethod
    def stop_typing(cls, channel_id: str | int, *, trace_id: str | None = None) -> Envelope:
        """Stop showing typing (supersedes a start that is still queued)."""
        return cls._make(
            "stop_typing", _channel(channel_id), idempotency_key=None, trace_id=trace_id
        )

    @classmethod
    def reaction(
        cls,
        channel_id: str | int,
        message_id: str,
        emoji: str,
        *,
        idempotency_key: str | None = None,
        trace_id: str | None = None,
    ) -> Envelope:
        """React with ``emoji`` to the platform message ``message_id``."""
        return cls._make(
            "reaction",
            _channel(channel_id),
            message_id=_str("message_id", message_id, empty=False),
            emoji=_str("emoji", emoji, empty=False),
            idempotency_key=idempotency_key,
            trace_id=trace_id,
        )

    @classmethod
    def presence(
        cls,
        text: str | None = None,
        emoji: str | None = None,
        *,
        ttl: float | None = None,
        trace_id: str | None = None,
    ) -> Envelope:
        """The bot's presence (platform-wide, no channel); the newest one wins."""
        return cls._make(
            "presence",
            None,
            ttl=None if ttl is None else _ttl("ttl", ttl),
            text=None if text is None else _str("text", text),
            emoji=_opt("emoji", emoji),
            idempotency_key=None,
            trace_id=trace_id,
        )

    @classmethod
    def rpc_request(
        cls,
        method: str,
        args: Mapping[str, Any],
        reply_key: str,
        deadline_ms: int,
        channel_id: str | int | None = None,
    ) -> Envelope:
        """A gateway RPC call (:meth:`Worker.rpc <stargazer_client.Worker.rpc>` builds it)."""
        if not isinstance(args, Mapping):
            raise TypeError(f"rpc args must be a mapping, not {type(args).__name__}")
        return cls._make(
            "rpc_request",
            None if channel_id is None else _channel(channel_id),
            rpc_method=_str("method", method, empty=False),
            rpc_args=dict(args),
            reply_key=_str("reply_key", reply_key, empty=False),
            deadline_ms=deadline_ms,
            idempotency_key=None,
            trace_id=None,
        )
