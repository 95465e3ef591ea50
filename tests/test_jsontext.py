"""JSON text: orjson's speed, the standard library's bytes and errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from web.jsontext import compact, loose

MAX_BIGINT = 2**63 - 1

# What answers hold: objects, lists, strings of any character, integers, booleans, null.
ANSWERS: list[Any] = [
    {"id": 1, "name": "Zoë 中文 🙂", "balance": MAX_BIGINT, "next_after": None, "ok": True},
    {"error": {"code": "x", "details": [{"field": "a", "message": 'say "hi"\\n'}]}},
    ["\u2028\u2029", "\x00\x1f\x7f", "\t\r\n\b\f", "/</script>", ""],
    {"min": -(2**63), "unsigned": 2**64 - 1, "past": 2**64, "far": -(2**80)},
    [],
    {},
    0,
    "plain",
]


@pytest.mark.parametrize("value", ANSWERS)
def test_compact_writes_the_standard_librarys_bytes(value: Any) -> None:
    """The bytes ``json.dumps(value, ensure_ascii=False, separators=(",", ":"))`` encodes,
    integers past 64 bits included (orjson refuses them; the standard library writes them)."""
    expected = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    assert compact(value) == expected


def test_compact_raises_as_the_standard_library_does() -> None:
    """What JSON cannot hold is a TypeError; a lone surrogate, which UTF-8 cannot carry, a
    UnicodeEncodeError."""
    with pytest.raises(TypeError, match="set is not JSON serializable"):
        compact({"tags": {1, 2}})
    with pytest.raises(UnicodeEncodeError):
        compact({"name": "\ud800"})


class _Opaque:
    def __str__(self) -> str:
        return "opaque thing"


def test_loose_writes_anything_a_log_field_holds() -> None:
    """Keys that are not strings, values JSON cannot hold (as their ``str()``) and integers past
    64 bits: a log line never fails for a field's sake."""
    written = json.loads(loose({1: _Opaque(), "big": 2**70, "nested": {None: [True]}}))
    assert written == {"1": "opaque thing", "big": 2**70, "nested": {"null": [True]}}
    assert isinstance(loose({"a": 1}), str)
