"""Building envelopes: every argument checked, with a message naming it."""

from __future__ import annotations

import base64
import re
from typing import Any, Callable

import pytest

from stargazer_client import Button, Envelope


def test_message_fields() -> None:
    e = Envelope.message("42", "hi", reply_to="m1", buttons=[("Yes", "yes")], trace_id="t")
    assert e.type == "message" and e.channel_id == "42" and e.sequenced
    assert dict(e.fields) == {
        "type": "message", "channel_id": "42", "text": "hi", "reply_to": "m1",
        "buttons": [{"label": "Yes", "custom_id": "yes"}], "trace_id": "t",
    }


def test_numeric_channel_ids_become_text() -> None:
    assert Envelope.message(1234567890123, "hi").channel_id == "1234567890123"


def test_buttons_take_three_spellings() -> None:
    e = Envelope.buttons("c", "pick", [
        Button("A", custom_id="a", style="primary"),
        {"label": "B", "url": "https://example.org"},
        ("C", "https://example.org/c"),
        ("D", "d"),
    ])
    assert e.fields["buttons"] == [
        {"label": "A", "custom_id": "a", "style": "primary"},
        {"label": "B", "url": "https://example.org"},
        {"label": "C", "url": "https://example.org/c"},
        {"label": "D", "custom_id": "d"},
    ]


def test_file_is_base64_with_defaults() -> None:
    e = Envelope.file("c", b"\x00\xffdata")
    assert base64.b64decode(e.fields["file_data"]) == b"\x00\xffdata"
    assert e.fields["filename"] == "file"
    assert e.fields["mimetype"] == "application/octet-stream"


def test_edit_and_delete_name_exactly_one_target() -> None:
    assert Envelope.edit("c", "new", target_key="sg:msg:x").fields["target_key"] == "sg:msg:x"
    assert Envelope.delete("c", message_id="123").fields["message_id"] == "123"
    assert Envelope.edit("c", "x", message_id="1").sequenced
    assert Envelope.delete("c", message_id="1").sequenced


def test_latest_wins_kinds_take_no_seq() -> None:
    assert not Envelope.start_typing("c").sequenced
    assert not Envelope.stop_typing("c").sequenced
    assert not Envelope.presence("hi").sequenced
    assert Envelope.start_typing("c", 2.5).ttl == 2.5
    assert Envelope.presence("hi").channel_id is None


BAD: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    ("empty channel", lambda: Envelope.message("", "x"), ValueError, "channel_id"),
    ("bool channel", lambda: Envelope.message(True, "x"), TypeError, "channel_id"),  # type: ignore[arg-type]
    ("text not str", lambda: Envelope.message("c", 5), TypeError, "text"),  # type: ignore[arg-type]
    ("text missing", lambda: Envelope.message("c", None), TypeError, "text"),  # type: ignore[arg-type]
    ("empty reply_to", lambda: Envelope.message("c", "x", reply_to=""), ValueError, "reply_to"),
    ("buttons empty", lambda: Envelope.buttons("c", "x", []), ValueError, "buttons"),
    ("buttons a dict", lambda: Envelope.buttons("c", "x", {"label": "a"}), TypeError, "list"),  # type: ignore[arg-type]
    ("button both", lambda: Envelope.buttons("c", "x", [Button("a", custom_id="a", url="https://x")]),
     ValueError, "exactly one"),
    ("button neither", lambda: Envelope.buttons("c", "x", [{"label": "a"}]), ValueError, "buttons[0]"),
    ("button unknown field", lambda: Envelope.buttons("c", "x", [{"label": "a", "custom_id": "a", "emoji": "x"}]),
     ValueError, "emoji"),
    ("button no label", lambda: Envelope.buttons("c", "x", [{"custom_id": "a"}]), ValueError, "label"),
    ("button bad tuple", lambda: Envelope.buttons("c", "x", [("a",)]), ValueError, "buttons[0]"),  # type: ignore[list-item]
    ("button int", lambda: Envelope.buttons("c", "x", [3]), TypeError, "buttons[0]"),  # type: ignore[list-item]
    ("file data str", lambda: Envelope.file("c", "abc"), TypeError, "bytes"),  # type: ignore[arg-type]
    ("file empty name", lambda: Envelope.file("c", b"", ""), ValueError, "filename"),
    ("edit no target", lambda: Envelope.edit("c", "x"), ValueError, "exactly one"),
    ("edit two targets", lambda: Envelope.edit("c", "x", target_key="sg:msg:a", message_id="1"),
     ValueError, "exactly one"),
    ("delete no target", lambda: Envelope.delete("c"), ValueError, "target_key"),
    ("reaction no emoji", lambda: Envelope.reaction("c", "m", ""), ValueError, "emoji"),
    ("reaction no message", lambda: Envelope.reaction("c", "", "x"), ValueError, "message_id"),
    ("typing ttl 0", lambda: Envelope.start_typing("c", 0), ValueError, "ttl"),
    ("typing ttl nan", lambda: Envelope.start_typing("c", float("nan")), ValueError, "ttl"),
    ("typing ttl str", lambda: Envelope.start_typing("c", "5"), TypeError, "ttl"),  # type: ignore[arg-type]
    ("presence ttl negative", lambda: Envelope.presence("x", ttl=-1), ValueError, "ttl"),
    ("empty idempotency key", lambda: Envelope.message("c", "x", idempotency_key=""), ValueError,
     "idempotency_key"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_arguments_are_refused_by_name(case: tuple[str, Callable[[], Any], type[Exception], str]) -> None:
    _, build, exc, word = case
    with pytest.raises(exc, match=re.escape(word)):
        build()


def test_envelopes_are_immutable() -> None:
    e = Envelope.message("c", "x")
    with pytest.raises(TypeError):
        e.fields["text"] = "changed"  # type: ignore[index]
