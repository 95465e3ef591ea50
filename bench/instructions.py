"""Instructions per request, counted with ``valgrind --tool=callgrind``, in process.

Seconds on a shared machine move by a third from run to run; instructions repeat to about 2%.
Each case runs in a child process under callgrind twice: once making ``--requests`` requests
after a warm-up, once making none after the same warm-up; the difference divided by the count
is one request's instructions (Python, Flask, functions-framework, SQLAlchemy, pg8000 and the
service; not PostgreSQL, which runs outside). Requests go through
``create_app(target, source).test_client()``, as in the tests: the whole entry point without
gunicorn's socket handling.

    .venv/bin/python -m bench.instructions [--requests 300] [--case GET ...] [--untuned]

``--profile DIR`` keeps each case's callgrind file there, for ``callgrind_annotate``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from functions_framework import create_app
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from db.migrate import upgrade
from dev.postgres import PostgresServer, add_users

ROOT = Path(__file__).resolve().parent.parent
USERS = 20
WARM_UP = 50

Call = Callable[[Any, int], int]


def _get_user(client: Any, n: int) -> int:
    return int(client.get(f"/users/{1 + n % USERS}").status_code)


def _post_user(client: Any, n: int) -> int:
    body = {"name": "Bench", "email": f"i{os.getpid()}-{n}@example.com"}
    return int(client.post("/users", json=body).status_code)


def _post_transfer(client: Any, n: int) -> int:
    payer = 1 + n % USERS
    body = {"from_user_id": payer, "to_user_id": 1 + (n + 1) % USERS, "amount": 1}
    return int(client.post("/transfers", json=body).status_code)


def _hello(client: Any, n: int) -> int:
    return int(client.get("/").status_code)


CASES: dict[str, tuple[str, Path, Call, int]] = {  # name: target, source, request, status
    "GET /users/{id}": ("api", ROOT / "main.py", _get_user, 200),
    "POST /users": ("api", ROOT / "main.py", _post_user, 201),
    "POST /transfers": ("api", ROOT / "main.py", _post_transfer, 201),
    "hello world": ("hello", ROOT / "bench" / "hello.py", _hello, 200),
}


def child(case: str, requests: int) -> None:
    """Warm up, then make ``requests`` requests of ``case`` (run under callgrind)."""
    target, source, call, status = CASES[case]
    client = create_app(target, str(source)).test_client()  # type: ignore[no-untyped-call]
    for n in range(WARM_UP):
        assert call(client, n) == status, case
    for n in range(WARM_UP, WARM_UP + requests):
        assert call(client, n) == status, case


def _instructions(
    valgrind: str, case: str, requests: int, env: dict[str, str], keep: Path | None
) -> int:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "callgrind.out"
        subprocess.run(
            [valgrind, "--tool=callgrind", f"--callgrind-out-file={out}",
             sys.executable, "-m", "bench.instructions", "--child", case, str(requests)],
            cwd=ROOT, env=env, check=True, capture_output=True,
        )  # fmt: skip
        text = out.read_text(errors="replace")
        if keep is not None and requests:
            slug = re.sub(r"\W+", "-", case).strip("-")
            (keep / f"callgrind.{slug}.out").write_text(text)
    match = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
    assert match is not None, "no total in callgrind's output"
    return int(match[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--case", action="append", choices=list(CASES))
    parser.add_argument("--untuned", action="store_true", help="DB_DRIVER_TUNING=false")
    parser.add_argument("--profile", type=Path, help="keep the callgrind files here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        parser.error("valgrind is not installed: apt-get install valgrind")
    server = PostgresServer(Path(tempfile.mkdtemp(prefix="bench-instructions-")))
    server.init()
    server.start()
    try:
        url = server.create_database("app")
        engine = create_engine(url, poolclass=NullPool)
        upgrade(engine)
        add_users(engine, USERS, 1_000_000_000)
        engine.dispose()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "LOG_LEVEL": "INFO",
               "DATABASE_URL": url.render_as_string(hide_password=False)}  # fmt: skip
        env["K_SERVICE"] = "bench-instructions"  # JSON log lines, as on Cloud Run
        for name in ("GOOGLE_CLOUD_PROJECT", "PUBSUB_EMULATOR_HOST"):
            env.pop(name, None)
        if args.untuned:
            env["DB_DRIVER_TUNING"] = "false"
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
        report: dict[str, Any] = {}
        for case in args.case or list(CASES):
            counted = _instructions(valgrind, case, args.requests, env, args.profile)
            baseline = _instructions(valgrind, case, 0, env, None)
            report[case] = {
                "instructions_per_request_M": round((counted - baseline) / args.requests / 1e6, 3)
            }
            print(case, report[case], file=sys.stderr, flush=True)
        print(json.dumps(report, indent=2))
    finally:
        server.destroy()


if __name__ == "__main__":
    main()
