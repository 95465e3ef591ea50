"""Every benchmark in one run: ``.venv/bin/python -m bench.run`` prints the figures as JSON.

It starts its own PostgreSQL, a latency proxy (``bench/latency.py``) that puts the database a
1 ms round trip away, and functions-framework servers (gunicorn, ``THREADS=8``, as deployed)
on 127.0.0.1, and drives them with bounded loads: one sequential client for latency, ``wrk``
for saturated throughput. Absolute numbers on a shared machine are noise, so what counts are
the ratios measured in the same run, with the variants interleaved in rounds.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pg8000.core
import pg8000.legacy
import pg8000.native
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from bench.latency import LatencyProxy
from db.migrate import upgrade
from dev.postgres import PASSWORD, PostgresServer, free_port
from dev.round_trips import counting_round_trips
from tests.google.cloudsql import CloudSql

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
ROUNDS = 5
ROUND_SECONDS = 1.5
ROUND_REQUESTS = 3000
DELAY_MS = 0.5  # each way: a 1 ms round trip, as from a function to Cloud SQL
CONNECTOR_INSTANCE = "bench-project:europe-west1:bench"
VARIANTS = {  # name: (target, source)
    "service": ("api", ROOT / "main.py"),
    "google_sample": ("google_sample", BENCH / "variants.py"),
    "seeds_session": ("seeds_session", BENCH / "variants.py"),
    "global_session": ("global_session", BENCH / "variants.py"),
    "engine_per_request": ("engine_per_request", BENCH / "variants.py"),
}


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


@dataclass
class Served:
    """One function served by functions-framework in its own process group."""

    name: str
    target: str
    source: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Served:
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("functions-framework")), f"--target={self.target}",
             f"--source={self.source}", f"--port={self.port}"],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "K_SERVICE": f"bench-{self.name}",
                 "THREADS": "8", **self.env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            self.process.wait(timeout=30)

    def worker_pid(self) -> int:
        assert self.process is not None
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        return int(children.split()[0])


@contextlib.contextmanager
def serving(servers: dict[str, Served]) -> Iterator[dict[str, Served]]:
    """Start the servers; stop them whatever happens."""
    try:
        for server in servers.values():
            server.start()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


class Client:
    """One keep-alive HTTP/1.1 connection, as a calling service would hold."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def send(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        headers = {}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        self.connection.request(method, path, body=payload, headers=headers)
        response = self.connection.getresponse()
        return response.status, response.read()


Request = Callable[[int], tuple[str, str, Any]]


def _load(port: int, request: Request, seconds: float, limit: int) -> list[float]:
    """Send requests one after another until the time or count runs out; their latencies."""
    client = Client(port)
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    n = 0
    while n < limit and time.perf_counter() < deadline:
        method, path, body = request(n)
        started = time.perf_counter()
        status, _ = client.send(method, path, body)
        latencies.append(time.perf_counter() - started)
        assert status < 500, (path, status)
        n += 1
    return latencies


def single_client(servers: dict[str, Served], requests: dict[str, Request]) -> dict[str, Any]:
    """Throughput and p50/p99 of one sequential client, in interleaved rounds."""
    report: dict[str, Any] = {}
    for label, request in requests.items():
        for server in servers.values():
            _load(server.port, request, 0.3, 200)  # warm up: engine, pool, caches
        per_server: dict[str, list[float]] = {name: [] for name in servers}
        for _ in range(ROUNDS):
            for name, server in servers.items():
                per_server[name] += _load(server.port, request, ROUND_SECONDS, ROUND_REQUESTS)
        report[label] = {
            name: {
                "requests": len(latencies),
                "per_second": len(latencies) / sum(latencies),
                "p50_ms": _percentile(latencies, 0.50) * 1000,
                "p99_ms": _percentile(latencies, 0.99) * 1000,
            }
            for name, latencies in per_server.items()
        }
    return report


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def saturated(servers: dict[str, Served], paths: dict[str, str], seconds: float = 5) -> Any:
    """Requests per second of one instance under 16 concurrent keep-alive clients (wrk), and
    the worker's CPU per request. Writes post users with a unique email per request."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return {"skipped": "wrk is not installed (Debian package wrk)"}
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        for label, path in paths.items():
            for name, server in servers.items():
                if label.startswith("POST") and name == "hello":
                    continue
                url = f"http://127.0.0.1:{server.port}{path}"
                extra = _post_script(Path(folder)) if label.startswith("POST") else []
                subprocess.run([wrk, "-t1", "-c8", "-d1s", *extra, url], capture_output=True,
                               check=True, timeout=60)  # fmt: skip
                extra = _post_script(Path(folder)) if label.startswith("POST") else []
                pid = server.worker_pid()
                cpu_before, started = _cpu_seconds(pid), time.monotonic()
                output = subprocess.run(
                    [wrk, "-t1", "-c16", f"-d{seconds}s", *extra, url],
                    capture_output=True, text=True, check=True, timeout=120,
                ).stdout  # fmt: skip
                elapsed = time.monotonic() - started
                rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output)[1])  # type: ignore[index]
                errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
                report.setdefault(label, {})[name] = {
                    "per_second": rate,
                    "worker_cpu_us_per_request": (_cpu_seconds(pid) - cpu_before)
                    / (rate * elapsed)
                    * 1e6,
                    "non_2xx": int(errors[1]) if errors else 0,
                }
    return report


def _post_script(folder: Path) -> list[str]:
    """wrk's arguments for POST /users with an email no other request used."""
    script = folder / f"post-{time.time_ns()}.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'local prefix = "{script.stem}"\n'
        "local n = 0\n"
        "request = function()\n"
        "  n = n + 1\n"
        '  return wrk.format(nil, nil, nil, \'{"name":"W","email":"w\' .. prefix .. "-" .. n'
        " .. '@x.io\"}')\n"
        "end\n"
    )
    return ["-s", str(script)]


def raw_floor(url: URL, user_id: int) -> dict[str, float]:
    """One prepared SELECT over one stock pg8000 connection, in autocommit: one round trip."""
    connection = pg8000.native.Connection(
        url.username or "", password=url.password, host=url.host, port=url.port,
        database=url.database,
    )  # fmt: skip
    statement = connection.prepare(
        "SELECT id, name, email, balance, created_at, updated_at FROM users WHERE id = :id"
    )
    latencies = []
    for _ in range(3000):
        started = time.perf_counter()
        statement.run(id=user_id)
        latencies.append(time.perf_counter() - started)
    connection.close()
    return {
        "per_second": len(latencies) / sum(latencies),
        "p50_ms": _percentile(latencies, 0.5) * 1000,
    }


def round_trips(url: URL, user_id: int) -> dict[str, dict[str, dict[str, int]]]:
    """Writes to PostgreSQL and round trips for one read and one write by each variant, in
    process, on a warm instance (its connection already open)."""
    from functions_framework import create_app

    os.environ["DATABASE_URL"] = url.render_as_string(hide_password=False)
    os.environ["LOG_LEVEL"] = "WARNING"
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for name, (target, source) in VARIANTS.items():
        if name == "global_session":
            continue  # it answers repeated reads from memory
        client = create_app(target, str(source)).test_client()  # type: ignore[no-untyped-call]
        client.get(f"/users/{user_id}")
        email = f"round-trips-{name}-{time.time_ns()}@example.com"
        with counting_round_trips() as read:
            client.get(f"/users/{user_id}")
        with counting_round_trips() as write:
            client.post("/users", json={"name": "RT", "email": email})
        counts[name] = {"GET /users/{id}": read, "POST /users": write}
        if name == "service":
            sys.modules["main"].database.dispose()
    return counts


def bulk_insert(service: Served, url: URL, owner: int) -> dict[str, float]:
    """1000 items through POST /items against one raw multi-row INSERT of the same rows."""
    items = [{"owner_id": owner, "name": f"item {i}", "quantity": i} for i in range(1000)]
    client = Client(service.port)
    through_http = []
    for _ in range(12):
        started = time.perf_counter()
        status, _ = client.send("POST", "/items", {"items": items})
        through_http.append(time.perf_counter() - started)
        assert status == 201
    raw = {mode: _raw_insert(url, items, nodelay=mode == "on") for mode in ("on", "off")}
    return {
        "http_ms": statistics.median(through_http[2:]) * 1000,
        "raw_ms": statistics.median(raw["on"][2:]) * 1000,
        "raw_nagle_ms": statistics.median(raw["off"][2:]) * 1000,
    }


def _raw_insert(url: URL, items: list[dict[str, Any]], *, nodelay: bool) -> list[float]:
    """One multi-row INSERT ... RETURNING id of the items with stock pg8000, 12 times."""
    timings = []
    connection = pg8000.legacy.Connection(
        url.username or "", password=url.password, host=url.host, port=url.port,
        database=url.database,
    )  # fmt: skip
    if nodelay:
        connection._usock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    cursor = connection.cursor()
    rows = ", ".join(["(%s, %s, %s, now())"] * len(items))
    sql = f"INSERT INTO items (owner_id, name, quantity, created_at) VALUES {rows} RETURNING id"
    values = [v for item in items for v in (item["owner_id"], item["name"], item["quantity"])]
    for _ in range(12):
        started = time.perf_counter()
        cursor.execute(sql, values)
        cursor.fetchall()
        connection.commit()
        timings.append(time.perf_counter() - started)
    connection.close()
    return timings


def connections_under_load(servers: dict[str, Served], log: Path, user_id: int) -> dict[str, Any]:
    """Server connections opened while 8 clients send 400 reads each, per variant, and by the
    instance since it started."""
    opened = {}
    for name in ("service", "engine_per_request"):
        server = servers[name]
        before = log.read_text().count(f"application_name=bench-{name}")

        def client(_: int, port: int = server.port) -> int:
            http_client = Client(port)
            for _ in range(400):
                http_client.send("GET", f"/users/{user_id}")
            return 400

        with ThreadPoolExecutor(8) as pool:
            sent = sum(pool.map(client, range(8)))
        time.sleep(0.2)
        in_all = log.read_text().count(f"application_name=bench-{name}")
        opened[name] = {
            "requests": sent,
            "connections_opened": in_all - before,
            "connections_opened_since_start": in_all,
        }
    return opened


def memory(service: Served, user_ids: list[int]) -> dict[str, float]:
    """Resident size of the service's worker after 1,000 and after 20,000 mixed requests."""

    def rss_mb() -> float:
        status = Path(f"/proc/{service.worker_pid()}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024  # type: ignore[index]

    def mixed(n: int) -> tuple[str, str, Any]:
        kind = n % 4
        if kind == 0:
            return "POST", "/users", {"name": "M", "email": f"m{n}-{time.monotonic_ns()}@x.io"}
        if kind == 1:
            sender, receiver = user_ids[n % len(user_ids)], user_ids[(n + 1) % len(user_ids)]
            return (
                "POST",
                "/transfers",
                {"from_user_id": sender, "to_user_id": receiver, "amount": 1},
            )
        if kind == 2:
            return "GET", "/users?limit=20", None
        return "GET", f"/users/{user_ids[n % len(user_ids)]}", None

    def run(total: int) -> None:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: _load(service.port, mixed, 120, total // 4), range(4)))

    run(1_000)
    after_1k = rss_mb()
    run(19_000)
    after_20k = rss_mb()
    return {
        "rss_after_1k_mb": after_1k,
        "rss_after_20k_mb": after_20k,
        "growth_mb": after_20k - after_1k,
    }


def cold_start(env: dict[str, str], connector_env: dict[str, str]) -> dict[str, dict[str, float]]:
    """Median of 5 fresh processes: load the entry point, then serve the first request.

    The connector case reaches the same database through the real Cloud SQL Python Connector
    and the stand-in of Google's side (token, Admin API, TLS proxy) from the test suite: its
    first request includes the connector's import, its key pair, the access token, the
    instance's settings, the ephemeral certificate and the TLS handshake.
    """
    cases = {
        "service (api, PostgreSQL, DATABASE_URL)": ("api", ROOT / "main.py", "/healthz", env),
        "service (api, Cloud SQL connector)": ("api", ROOT / "main.py", "/healthz", connector_env),
        "hello world": ("hello", BENCH / "hello.py", "/", {}),
    }
    base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "LOG_LEVEL")}
    report = {}
    for name, (target, source, path, case_env) in cases.items():
        runs = []
        for _ in range(5):
            output = subprocess.run(
                [sys.executable, str(BENCH / "coldstart.py"), target, str(source), path],
                cwd=ROOT, env={**base, **case_env, "LOG_LEVEL": "WARNING"},
                capture_output=True, text=True, check=True, timeout=120,
            ).stdout  # fmt: skip
            runs.append(json.loads(output.strip().splitlines()[-1]))
        report[name] = {
            key: statistics.median(run[key] for run in runs) * 1000
            for key in ("load_s", "first_request_s", "second_request_s")
        }
    return report


@contextlib.contextmanager
def cloud_sql_stand_in(server: PostgresServer, folder: Path) -> Iterator[dict[str, str]]:
    """The connector path's settings, with Google's side stood in for on 127.0.0.1."""
    stand_in = CloudSql.start(CONNECTOR_INSTANCE, server.port, folder)
    try:
        yield {
            **stand_in.environment(),
            "INSTANCE_CONNECTION_NAME": CONNECTOR_INSTANCE,
            "DB_USER": "postgres",
            "DB_PASS": PASSWORD,
            "DB_NAME": "app",
        }
    finally:
        stand_in.stop()


def _variants(url: URL) -> dict[str, Served]:
    env = {"DATABASE_URL": url.render_as_string(hide_password=False)}
    servers = {name: Served(name, *where, env) for name, where in VARIANTS.items()}
    servers["hello"] = Served("hello", "hello", BENCH / "hello.py", {})
    return servers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument(
        "--latency-only",
        action="store_true",
        help="only the one-client comparison at a 1 ms round trip (about 2 minutes)",
    )
    latency_only = parser.parse_args(argv).latency_only
    server = PostgresServer()
    server.init()
    server.start()
    proxy = LatencyProxy(server.port, DELAY_MS)
    try:
        admin = create_engine(server.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.exec_driver_sql("ALTER SYSTEM SET log_connections = on")
            connection.exec_driver_sql("SELECT pg_reload_conf()")
        admin.dispose()
        url = server.create_database("app")
        engine = create_engine(url)
        upgrade(engine)
        with engine.begin() as connection:
            user_ids = list(connection.scalars(text(
                "INSERT INTO users (name, email, balance, created_at, updated_at)"
                " SELECT 'Bench', 'bench' || n || '@example.com', 1000000000, now(), now()"
                " FROM generate_series(1, 20) n RETURNING id"
            )))  # fmt: skip
        engine.dispose()
        user_id = user_ids[0]
        delayed = url.set(port=proxy.port)

        counter = iter(range(10**9))
        requests: dict[str, Request] = {
            "GET /users/{id}": lambda n: ("GET", f"/users/{user_id}", None),
            "POST /users": lambda n: (
                "POST", "/users", {"name": "B", "email": f"b{next(counter)}@example.com"}
            ),
        }  # fmt: skip
        paths = {"GET /users/{id}": f"/users/{user_id}", "POST /users": "/users"}
        report: dict[str, Any] = {}
        atexit.register(lambda: print(json.dumps(report, indent=2)))
        for network, target in (("1 ms round trip", delayed), ("loopback", url)):
            with serving(_variants(target)) as servers:
                report[network] = {
                    "single_client": single_client(servers, requests),
                    "raw_pg8000_one_round_trip": raw_floor(target, user_id),
                }
                if latency_only:
                    return
                report[network]["saturated"] = saturated(
                    {name: servers[name] for name in ("service", "google_sample", "hello")}, paths
                )
                if network == "loopback":
                    report["bulk_insert_1000"] = bulk_insert(servers["service"], url, user_id)
                    report["connections_under_load"] = connections_under_load(
                        servers, server.log, user_id
                    )
        report["round_trips"] = round_trips(url, user_id)
        env = {"DATABASE_URL": url.render_as_string(hide_password=False)}
        with serving({"memory": Served("memory", "api", ROOT / "main.py", env)}) as servers:
            report["memory"] = memory(servers["memory"], user_ids)
        with cloud_sql_stand_in(server, server.root) as connector_env:
            report["cold_start_ms"] = cold_start(env, connector_env)
    finally:
        proxy.stop()
        server.destroy()


if __name__ == "__main__":
    main()
