"""Database trouble in the logs, once: a dropped connection is one line, an outage two.

The first failure is logged at WARNING with its cause. The failures that follow it are
counted, not logged. The run ends at the first success that comes a second or more after
the last failure (requests that succeed between failures, as when only some connections are
refused, do not end it); then one line says how many failures there were and over how long.
A single dropped connection, retried at once, is the first line only.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)

QUIET_SECONDS = 1.0  # without a failure, after which a success ends a run


class OutageLog:
    """Counts one instance's database failures and logs where a run of them starts and ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures = 0
        self._first = self._last = 0.0

    def failure(self, cause: str) -> None:
        """Note a failure to reach or keep the database; the first of a run is logged."""
        now = time.monotonic()
        with self._lock:
            self._failures += 1
            self._last = now
            if self._failures > 1:
                return
            self._first = now
        log.warning("database connection failed: %s", cause)

    def success(self) -> None:
        """Note a transaction that reached the database; it may end a run of failures."""
        if not self._failures:  # the common case, read without the lock
            return
        now = time.monotonic()
        with self._lock:
            if not self._failures or now - self._last < QUIET_SECONDS:
                return
            failures, self._failures = self._failures, 0
            seconds = self._last - self._first
        if failures > 1:
            log.warning(
                "database reachable again after %d failed attempts over %.1f s", failures, seconds
            )

    def reset(self) -> None:
        """Forget any run of failures (for a fresh start, as in tests)."""
        with self._lock:
            self._failures = 0


outages = OutageLog()


def describe(error: BaseException) -> str:
    """A one-line cause for the logs: the exception's kind and the driver's message."""
    orig = getattr(error, "orig", None) or error
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], dict):  # pg8000: the server's error fields
        fields = args[0]
        return f"SQLSTATE {fields.get('C')}: {fields.get('M')}"
    message = str(orig).splitlines()[0] if str(orig) else ""
    return f"{type(orig).__name__}: {message}" if message else type(orig).__name__
