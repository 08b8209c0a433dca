"""The gateway's entry parser (src/envelope.rs `parse_entry`), rule for rule, in
Python: what the package writes is decoded here as the Rust gateway decodes it,
independently of the package's own checks. `edit` and `delete` follow SPEC §1
(the gateway's parser learns them with the engine rewrite).

Returns the envelope object, or raises `Bad(kind, detail)` with the gateway's
dead-letter `error_kind`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any


class Bad(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass
class Rules:
    reply_prefix: str
    cache_prefix: str = "sg:msg:"
    max_payload_bytes: int = 8 * 1024 * 1024
    signing_secret: bytes | None = None


@dataclass
class Parsed:
    type: str
    channel_id: str | None
    seq: int | None
    message_key: str | None
    obj: dict[str, Any]
    action: dict[str, Any] = field(default_factory=dict)


def _opt_str(obj: dict[str, Any], name: str) -> str | None:
    v = obj.get(name)
    if v is None:
        return None
    if not isinstance(v, str):
        raise Bad("bad_field", f"field `{name}` must be a string")
    return v


def _req_str(obj: dict[str, Any], name: str, ty: str) -> str:
    v = _opt_str(obj, name)
    if v is None:
        raise Bad("missing_field", f"a `{ty}` envelope needs the field `{name}`")
    return v


def _opt_u64(obj: dict[str, Any], name: str) -> int | None:
    v = obj.get(name)
    if v is None:
        return None
    # serde_json's is_u64: a JSON integer (Python int, not bool), 0 ≤ v < 2^64.
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**64:
        raise Bad("bad_field", f"field `{name}` must be a non-negative integer, found {v!r}")
    return v


def _channel(obj: dict[str, Any]) -> str | None:
    v = obj.get("channel_id")
    if v is None:
        return None
    if isinstance(v, str):
        if not v:
            raise Bad("bad_field", "field `channel_id` is an empty string")
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    raise Bad("bad_field", "field `channel_id` must be a string")


def _buttons(obj: dict[str, Any], ty: str, required: bool) -> list[dict[str, Any]]:
    v = obj.get("buttons")
    if v is None:
        if required:
            raise Bad("missing_field", f"a `{ty}` envelope needs the field `buttons`")
        return []
    if not isinstance(v, list):
        raise Bad("bad_field", "field `buttons` must be a list")
    if required and not v:
        raise Bad("bad_field", "field `buttons` is empty")
    out = []
    for i, b in enumerate(v):
        if not isinstance(b, dict):
            raise Bad("bad_field", f"buttons[{i}] must be an object")
        if _opt_str(b, "label") is None:
            raise Bad("missing_field", f"buttons[{i}] needs the field `label`")
        if (_opt_str(b, "custom_id") is None) == (_opt_str(b, "url") is None):
            raise Bad("bad_field", f"buttons[{i}] needs exactly one of `custom_id` and `url`")
        _opt_str(b, "style")
        out.append(b)
    return out


def _sign(secret: bytes, payload: bytes) -> str:
    return "sha256=" + hmac.new(secret, payload, hashlib.sha256).hexdigest()


def parse_entry(fields: dict[str, bytes], rules: Rules) -> Parsed:
    payload = fields.get("payload")
    if payload is None:
        raise Bad("missing_payload", "stream entry has no `payload` field")
    if len(payload) > rules.max_payload_bytes:
        raise Bad("too_large", f"payload is {len(payload)} bytes")
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise Bad("not_json", f"payload is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise Bad("not_object", "payload is not an object")
    if rules.signing_secret is not None:
        sig = fields.get("sig")
        if sig is None:
            raise Bad("bad_signature", "entry has no `sig` field but signing is required")
        if not hmac.compare_digest(sig, _sign(rules.signing_secret, payload).encode()):
            raise Bad("bad_signature", "`sig` does not match the payload's HMAC-SHA256")
    ty = _opt_str(obj, "type") or "message"
    channel = _channel(obj)

    def needs_channel() -> None:
        if channel is None:
            raise Bad("missing_field", f"a `{ty}` envelope needs the field `channel_id`")

    action: dict[str, Any] = {}
    if ty == "message":
        needs_channel()
        action = {"text": _req_str(obj, "text", ty), "reply_to": _opt_str(obj, "reply_to"),
                  "buttons": _buttons(obj, ty, False)}
    elif ty == "file":
        needs_channel()
        b64 = _req_str(obj, "file_data", ty)
        try:
            data = base64.b64decode(b64.strip(), validate=True)
        except (binascii.Error, ValueError) as e:
            raise Bad("bad_base64", f"field `file_data` is not valid base64: {e}") from None
        action = {"data": data, "filename": _opt_str(obj, "filename") or "file",
                  "mimetype": _opt_str(obj, "mimetype") or "application/octet-stream",
                  "text": _opt_str(obj, "text")}
    elif ty == "buttons":
        needs_channel()
        action = {"text": _req_str(obj, "text", ty), "buttons": _buttons(obj, ty, True)}
    elif ty in ("typing", "start_typing", "stop_typing"):
        needs_channel()
    elif ty == "reaction":
        needs_channel()
        action = {"message_id": _req_str(obj, "message_id", ty), "emoji": _req_str(obj, "emoji", ty)}
    elif ty == "presence":
        action = {"text": _opt_str(obj, "text"), "emoji": _opt_str(obj, "emoji")}
    elif ty in ("edit", "delete"):
        needs_channel()
        target, mid = _opt_str(obj, "target_key"), _opt_str(obj, "message_id")
        if target is None and mid is None:
            raise Bad("missing_field", f"a `{ty}` envelope needs `message_id` or `target_key`")
        if target is not None and not target.startswith(rules.cache_prefix):
            raise Bad("forbidden_key", f"target_key `{target}` lies outside the cache prefix")
        action = {"target_key": target, "message_id": mid}
        if ty == "edit":
            action["text"] = _req_str(obj, "text", ty)
            action["buttons"] = _buttons(obj, ty, False)
    elif ty == "rpc_request":
        method = _opt_str(obj, "rpc_method") or _opt_str(obj, "action")
        if method is None:
            raise Bad("missing_field", "a `rpc_request` envelope needs the field `rpc_method`")
        args = obj.get("rpc_args", obj.get("kwargs"))
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise Bad("bad_field", "field `rpc_args` must be an object")
        reply_key = _req_str(obj, "reply_key", ty)
        if not reply_key.startswith(rules.reply_prefix):
            raise Bad("forbidden_key", f"reply_key `{reply_key}` lies outside the reply prefix")
        action = {"method": method, "args": args, "reply_key": reply_key,
                  "deadline_ms": _opt_u64(obj, "deadline_ms")}
    else:
        raise Bad("unknown_type", f"unknown envelope type `{ty}`")
    seq = _opt_u64(obj, "seq")
    if seq == 0:
        raise Bad("bad_field", "field `seq` must start at 1, found 0")
    if seq is not None and seq > 2**53:
        raise Bad("bad_field", "field `seq` is above 2^53")
    message_key = _opt_str(obj, "message_key")
    if message_key is not None:
        own = ("sg:{", "sg:gateway:")
        if not message_key.startswith(rules.cache_prefix) or message_key.startswith(own):
            raise Bad("forbidden_key", f"message_key `{message_key}` lies outside the cache prefix")
    _opt_str(obj, "idempotency_key")
    _opt_u64(obj, "created_ms")
    _opt_u64(obj, "expires_ms")
    _opt_str(obj, "trace_id")
    return Parsed(ty, channel, seq, message_key, obj, action)
