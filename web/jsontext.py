"""JSON text for answers and log lines, written by orjson: a tenth of the standard library's
cost (``bench/README.md``), the same bytes."""

from __future__ import annotations

import json
from typing import Any

import orjson

# The standard library's encoders, for what orjson refuses: an integer past 64 bits. They raise
# the standard errors for what JSON cannot hold (orjson's JSONEncodeError is a TypeError).
_STANDARD = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_STANDARD_WITH_STR = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str)


def compact(value: Any) -> bytes:
    """``value`` as compact JSON in UTF-8, byte for byte what ``json.dumps(value,
    ensure_ascii=False, separators=(",", ":"))`` encodes for what answers hold (objects, lists,
    strings, integers, booleans, null; a float may differ in its exponent's digits, ``1e-7``).
    Raises as that does: ``TypeError`` for what JSON cannot hold, ``UnicodeEncodeError`` for a
    lone surrogate."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return _STANDARD.encode(value).encode()


def loose(value: Any) -> str:
    """``value`` as compact JSON, keys that are not strings and values JSON cannot hold written
    as their ``str()``: for log lines, which never fail for a field's sake."""
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except orjson.JSONEncodeError:
        return _STANDARD_WITH_STR.encode(value)
