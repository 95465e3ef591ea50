"""Time one cold start in this fresh process: load an entry point, then serve its first request.

Usage: python bench/coldstart.py TARGET SOURCE PATH; prints the load, first and second request
times in seconds as JSON.
"""

from __future__ import annotations

import json
import sys
import time

started = time.perf_counter()
from functions_framework import create_app  # noqa: E402  # the import is part of what is timed

target, source, path = sys.argv[1:4]
client = create_app(target, source).test_client()  # type: ignore[no-untyped-call]
loaded = time.perf_counter()
status = client.get(path).status_code
served = time.perf_counter()
assert status == 200, status
assert client.get(path).status_code == 200
again = time.perf_counter()
print(json.dumps({
    "load_s": loaded - started,
    "first_request_s": served - loaded,
    "second_request_s": again - served,
}))  # fmt: skip
