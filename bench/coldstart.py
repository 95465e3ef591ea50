"""Cold starts: from spawning ``functions-framework`` to the first 200, as a new instance's
first caller waits for it.

Each case starts the real server (gunicorn, ``THREADS=8``, as deployed) in a fresh process and
sends its one request as soon as the port accepts connections; the request waits in the
listen queue until the worker has loaded the function, then runs on a cold instance (engine,
pool and first connection, or the connector's certificate, all built by it). The cases run
interleaved, so that a slow moment of a shared machine falls on all of them.

``import_profile`` says where the import time of a module goes, from ``python -X importtime``.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dev.postgres import free_port

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("main.py", "db", "web", "service", "bench")  # what the cold-started functions import


@dataclass(frozen=True)
class Case:
    """One function to cold-start: its entry point, the request, its environment, and the CPUs
    its server may run on (``taskset -c``; all of the machine's when None)."""

    target: str
    source: Path
    path: str
    env: dict[str, str]
    cpus: str | None = None


def compile_bytecode() -> None:
    """Compile the project's modules, as Google's buildpack does when it builds a function's
    image (``python -m compileall``): an instance never compiles its source at a cold start,
    whatever ``PYTHONDONTWRITEBYTECODE`` says here."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-f", *SOURCES],
        cwd=ROOT, env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""},
        check=True, stdout=subprocess.DEVNULL, timeout=120,
    )  # fmt: skip


def spawn_to_first_200(case: Case, timeout: float = 60) -> float:
    """Seconds from spawning the server to the first 200 of ``case.path``."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "LOG_LEVEL")}
    started = time.perf_counter()
    pinned = [] if case.cpus is None else [_taskset(), "-c", case.cpus]
    process = subprocess.Popen(
        [*pinned, str(Path(sys.executable).with_name("functions-framework")),
         f"--target={case.target}", f"--source={case.source}", f"--port={port}"],
        cwd=ROOT,
        env={**base, "PYTHONPATH": str(ROOT), "THREADS": "8", "LOG_LEVEL": "WARNING", **case.env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = started + timeout
        while True:
            try:
                connection = socket.create_connection(("127.0.0.1", port), timeout=timeout)
                break
            except OSError:
                if time.perf_counter() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.001)
        client = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        client.sock = connection
        client.request("GET", case.path)
        response = client.getresponse()
        response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200:
            raise RuntimeError(f"{case.target} answered {response.status} to {case.path}")
        client.close()
        return elapsed
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)


def _taskset() -> str:
    found = shutil.which("taskset")
    if found is None:
        raise RuntimeError("taskset (util-linux) is needed to pin a case to its CPUs")
    return found


def compare(cases: dict[str, Case], rounds: int = 5) -> dict[str, dict[str, float]]:
    """Spawn to first 200 of every case, interleaved over ``rounds``: median, min and max in ms."""
    compile_bytecode()
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            runs[name].append(spawn_to_first_200(case) * 1000)
    return {
        name: {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms)}
        for name, ms in runs.items()
    }


def import_profile(module: str, env: dict[str, str], top: int = 12) -> dict[str, float]:
    """The import time in ms of ``module`` (as ``total``), and of the top-level packages it
    pulls in that cost the most, each with all it imports (so they overlap: Flask's includes
    Werkzeug's)."""
    output = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True, text=True, check=True, timeout=120,
    ).stderr  # fmt: skip
    packages: dict[str, float] = {}
    total = 0.0
    for line in output.splitlines():
        found = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if not found:
            continue
        cumulative, depth, name = int(found[1]) / 1000, len(found[2]), found[3]
        if name == module and depth == 1:
            total = cumulative
        # The outermost import of each top-level package, anywhere in the tree.
        package = name.split(".")[0]
        if package == module.split(".", maxsplit=1)[0]:
            continue
        packages[package] = max(packages.get(package, 0.0), cumulative)
    ranked = sorted(packages.items(), key=lambda item: -item[1])
    return {"total": total, **dict(ranked[:top])}
