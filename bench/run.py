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
import functools
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
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from bench import coldstart
from bench.coldstart import Case
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
SATURATED_ROUNDS = 3
SATURATED = ("service", "google_sample", "hello", "pg8000_floor")
COLD_START_ROUNDS = 5
POST_RUNS = 10
DELAY_MS = 0.5  # each way: a 1 ms round trip, as from a function to Cloud SQL
CONNECTOR_INSTANCE = "bench-project:europe-west1:bench"
VARIANTS = {  # name: (target, source)
    "service": ("api", ROOT / "main.py"),
    "google_sample": ("google_sample", BENCH / "sample.py"),
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
        serving_it = {
            name: server
            for name, server in servers.items()
            if not (label.startswith("POST") and name == "pg8000_floor")  # it only reads
        }
        for server in serving_it.values():
            _load(server.port, request, 0.3, 200)  # warm up: engine, pool, caches
        per_server: dict[str, list[float]] = {name: [] for name in serving_it}
        for _ in range(ROUNDS):
            for name, server in serving_it.items():
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


def saturated(
    servers: dict[str, Served],
    paths: dict[str, str],
    url: URL,
    user_ids: list[int],
    seconds: float = 5,
) -> Any:
    """Requests per second of one instance under 16 concurrent keep-alive clients (wrk), the
    worker's CPU per request, and the database connections the instance holds, in rounds
    interleaving the variants. Writes post users with a unique email per request, or move 1
    between two of ``user_ids``."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return {"skipped": "wrk is not installed (Debian package wrk)"}
    report: dict[str, Any] = {}
    admin = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with tempfile.TemporaryDirectory() as folder:
        for label, path in paths.items():
            runs: dict[str, list[dict[str, float]]] = {}
            script = functools.partial(_wrk_script, label, Path(folder), user_ids)
            for _ in range(SATURATED_ROUNDS):
                for name, server in servers.items():
                    if label.startswith("POST") and name in ("hello", "pg8000_floor"):
                        continue
                    if label.startswith("POST /transfers") and name != "service":
                        continue  # the sample pattern has no transfers
                    runs.setdefault(name, []).append(
                        _saturate(wrk, server, path, seconds=seconds, admin=admin,
                                  script=script)
                    )  # fmt: skip
            report[label] = {
                name: {key: statistics.median(run[key] for run in measured) for key in measured[0]}
                for name, measured in runs.items()
            }
            by_name = report[label]
            if "hello" in by_name:
                by_name["service"]["per_second_vs_hello"] = (
                    by_name["service"]["per_second"] / by_name["hello"]["per_second"]
                )
            if "google_sample" in by_name:
                by_name["service"]["per_second_vs_google_sample"] = (
                    by_name["service"]["per_second"] / by_name["google_sample"]["per_second"]
                )
    admin.dispose()
    return report


def _saturate(
    wrk: str,
    server: Served,
    path: str,
    *,
    script: Callable[[], list[str]],
    seconds: float,
    admin: Engine,
) -> dict[str, float]:
    """One warm-up and one measured wrk run; ``script`` makes each its own request script, so
    no two POST /users share an email."""
    url = f"http://127.0.0.1:{server.port}{path}"
    subprocess.run([wrk, "-t1", "-c8", "-d1s", *script(), url], capture_output=True, check=True,
                   timeout=60)  # fmt: skip
    pid = server.worker_pid()
    cpu_before, started = _cpu_seconds(pid), time.monotonic()
    output = subprocess.run(
        [wrk, "-t1", "-c16", f"-d{seconds}s", *script(), url],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    elapsed = time.monotonic() - started
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output)[1])  # type: ignore[index]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    with admin.connect() as connection:
        held = connection.scalar(
            text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"),
            {"name": f"bench-{server.name}"},
        )
    return {
        "per_second": rate,
        "worker_cpu_us_per_request": (_cpu_seconds(pid) - cpu_before) / (rate * elapsed) * 1e6,
        "non_2xx": int(errors[1]) if errors else 0,
        "connections": float(held or 0),
        "per_second_per_connection": rate / held if held else 0.0,
    }


def _wrk_script(label: str, folder: Path, user_ids: list[int]) -> list[str]:
    """wrk's arguments for the request: a GET as is; POST /users with an email no other
    request used; POST /transfers moving 1 between two users chosen at random."""
    if not label.startswith("POST"):
        return []
    script = folder / f"post-{time.time_ns()}.lua"
    if label.startswith("POST /transfers"):
        ids = ", ".join(str(user_id) for user_id in user_ids)
        body = (
            "local i = math.random(#ids)\n"
            "  local j = (i % #ids) + 1\n"
            "  return wrk.format(nil, nil, nil, '{\"from_user_id\":' .. ids[i] .."
            " ',\"to_user_id\":' .. ids[j] .. ',\"amount\":1}')"
        )
        prelude = f"local ids = {{{ids}}}\n"
    else:
        body = (
            "n = n + 1\n"
            '  return wrk.format(nil, nil, nil, \'{"name":"W","email":"w\' .. prefix .. "-" .. n'
            " .. '@x.io\"}')"
        )
        prelude = f'local prefix = "{script.stem}"\nlocal n = 0\n'
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"{prelude}"
        f"request = function()\n  {body}\nend\n"
    )
    return ["-s", str(script)]


def raw_round_trip(url: URL, user_id: int) -> dict[str, float]:
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


def cold_start(env: dict[str, str], connector_env: dict[str, str], user_id: int) -> dict[str, Any]:
    """Spawn to the first 200 (``bench/coldstart.py``), on the direct path and through the real
    Cloud SQL Python Connector against the stand-in of Google's side (token, Admin API, TLS
    proxy), whose first request includes the connector's import, its key pair, the access
    token, the instance's settings, the ephemeral certificate and the TLS handshake; and where
    the import time goes (``python -X importtime``)."""
    read = f"/users/{user_id}"
    cases = {
        "service": Case("api", ROOT / "main.py", read, env),
        "google_sample": Case("google_sample", BENCH / "sample.py", read, env),
        "hello": Case("hello", BENCH / "hello.py", "/", {}),
        # An instance of 1 vCPU without and with Cloud Run's startup CPU boost (2 vCPUs).
        "service, 1 CPU": Case("api", ROOT / "main.py", read, env, cpus="0"),
        "service, 2 CPUs": Case("api", ROOT / "main.py", read, env, cpus="0,1"),
        "service, connector": Case("api", ROOT / "main.py", read, connector_env),
        "google_sample, connector": Case("google_sample", BENCH / "sample.py", read, connector_env),
    }
    report: dict[str, Any] = coldstart.compare(cases, rounds=COLD_START_ROUNDS)
    median = {name: figures["median_ms"] for name, figures in report.items()}
    report["service / google_sample"] = median["service"] / median["google_sample"]
    report["service / google_sample, connector"] = (
        median["service, connector"] / median["google_sample, connector"]
    )
    report["service, 2 CPUs / 1 CPU"] = median["service, 2 CPUs"] / median["service, 1 CPU"]
    report["imports_ms"] = {
        module: coldstart.import_profile(module, env)
        for module in ("main", "bench.sample", "google.cloud.sql.connector")
    }
    return report


def first_request_memory(env: dict[str, str], user_id: int) -> dict[str, float]:
    """Resident size of a fresh instance's worker after its first request, in MB."""
    cases = {
        "service": Served("rss-service", "api", ROOT / "main.py", env),
        "google_sample": Served("rss-sample", "google_sample", BENCH / "sample.py", env),
        "hello": Served("rss-hello", "hello", BENCH / "hello.py", {}),
    }
    report = {}
    for name, server in cases.items():
        with serving({name: server}):
            status, _ = Client(server.port).send(
                "GET", "/" if name == "hello" else f"/users/{user_id}"
            )
            assert status == 200, (name, status)
            text_ = Path(f"/proc/{server.worker_pid()}/status").read_text()
            report[name] = int(re.search(r"VmRSS:\s+(\d+)", text_)[1]) / 1024  # type: ignore[index]
    return report


def post_runs(servers: dict[str, Served], request: Request, runs: int = 10) -> dict[str, Any]:
    """``POST /users`` p50 of the service against the sample's, ``runs`` times over, each run
    in interleaved rounds: the ratios and their spread."""
    pair = {name: servers[name] for name in ("service", "google_sample")}
    ratios, service_ms, sample_ms = [], [], []
    for _ in range(runs):
        measured = single_client(pair, {"POST /users": request})["POST /users"]
        service_ms.append(measured["service"]["p50_ms"])
        sample_ms.append(measured["google_sample"]["p50_ms"])
        ratios.append(service_ms[-1] / sample_ms[-1])
    return {
        "ratios": ratios,
        "ratio_min": min(ratios),
        "ratio_median": statistics.median(ratios),
        "ratio_max": max(ratios),
        "service_p50_ms": service_ms,
        "google_sample_p50_ms": sample_ms,
    }


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
    servers["pg8000_floor"] = Served("pg8000_floor", "pg8000_floor", BENCH / "floor.py", env)
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

        def post_user(_: int) -> tuple[str, str, Any]:
            return "POST", "/users", {"name": "B", "email": f"b{next(counter)}@example.com"}

        requests: dict[str, Request] = {
            "GET /users/{id}": lambda n: ("GET", f"/users/{user_id}", None),
            "POST /users": post_user,
        }
        paths = {
            "GET /users/{id}": f"/users/{user_id}",
            "POST /users": "/users",
            "POST /transfers": "/transfers",
        }
        report: dict[str, Any] = {}
        atexit.register(lambda: print(json.dumps(report, indent=2)))
        for network, target in (("1 ms round trip", delayed), ("loopback", url)):
            with serving(_variants(target)) as servers:
                report[network] = {
                    "single_client": single_client(servers, requests),
                    "raw_pg8000_one_round_trip": raw_round_trip(target, user_id),
                }
                if latency_only:
                    return
                if network == "1 ms round trip":
                    report[network]["POST /users, 10 runs"] = post_runs(
                        servers, post_user, POST_RUNS
                    )
                report[network]["saturated"] = saturated(
                    {name: servers[name] for name in SATURATED},
                    paths, url, user_ids,
                )  # fmt: skip
                if network == "loopback":
                    report["bulk_insert_1000"] = bulk_insert(servers["service"], url, user_id)
                    report["connections_under_load"] = connections_under_load(
                        servers, server.log, user_id
                    )
        report["round_trips"] = round_trips(url, user_id)
        env = {"DATABASE_URL": url.render_as_string(hide_password=False)}
        with serving({"memory": Served("memory", "api", ROOT / "main.py", env)}) as servers:
            report["memory"] = memory(servers["memory"], user_ids)
        report["memory_after_first_request_mb"] = first_request_memory(env, user_id)
        with cloud_sql_stand_in(server, server.root) as connector_env:
            report["cold_start"] = cold_start(env, connector_env, user_id)
    finally:
        proxy.stop()
        server.destroy()


if __name__ == "__main__":
    main()
