"""Counting what pg8000 sends to the server and how often it waits for an answer, for the
tests and the benchmarks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pg8000.core

from db import driver


@contextlib.contextmanager
def counting_round_trips() -> Iterator[dict[str, int]]:
    """Count pg8000's writes to the server (``writes``) and its round trips (``round_trips``):
    reads that follow a write, that is, waits for the server's answer."""
    counts = {"writes": 0, "round_trips": 0}
    written = [False]
    real_flush, real_read, real_buffered = pg8000.core._flush, pg8000.core._read, driver._buffered

    def flush(sock: Any) -> None:
        counts["writes"] += 1
        written[0] = True
        real_flush(sock)

    def waited() -> None:
        if written[0]:
            counts["round_trips"] += 1
            written[0] = False

    def read(sock: Any, size: int) -> Any:
        waited()
        return real_read(sock, size)

    def buffered(sock: Any) -> bytes:  # the tuned connections' reads (db/driver.py)
        waited()
        return real_buffered(sock)

    pg8000.core._flush, pg8000.core._read, driver._buffered = flush, read, buffered
    try:
        yield counts
    finally:
        pg8000.core._flush, pg8000.core._read, driver._buffered = (
            real_flush,
            real_read,
            real_buffered,
        )
