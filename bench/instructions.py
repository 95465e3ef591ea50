"""Instructions per request, counted with ``valgrind --tool=callgrind``, in process.

Seconds on a shared machine move by a third from run to run; instructions repeat to about 2%.
Each case runs in a child process under callgrind twice: once making ``--requests`` requests
after a warm-up, once making none after the same warm-up; the difference divided by the count
is one request's instructions (Python, Flask, functions-framework, SQLAlchemy, pg8000 and the
service; not PostgreSQL, which runs outside). Each request is a WSGI environ as gunicorn hands
it over, given to the app ``create_app(target, source)`` builds: the whole entry point, without
gunicorn's own parsing of the socket (the same for every function).

    .venv/bin/python -m bench.instructions [--requests 300] [--case GET ...] [--untuned]
    .venv/bin/python -m bench.instructions --cold-start    # a new process to its first answer

``--profile DIR`` keeps each case's callgrind file there, for ``callgrind_annotate``.
"""

from __future__ import annotations

import argparse
import io
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

ROOT = Path(__file__).resolve().parent.parent
USERS = 20
WARM_UP = 50

Build = Callable[[int], tuple[str, str, Any]]  # the n-th request: method, path, JSON body


def _get_user(n: int) -> tuple[str, str, Any]:
    return "GET", f"/users/{1 + n % USERS}", None


def _post_user(n: int) -> tuple[str, str, Any]:
    return "POST", "/users", {"name": "Bench", "email": f"i{os.getpid()}-{n}@example.com"}


def _post_transfer(n: int) -> tuple[str, str, Any]:
    body = {"from_user_id": 1 + n % USERS, "to_user_id": 1 + (n + 1) % USERS, "amount": 1}
    return "POST", "/transfers", body


def _hello(n: int) -> tuple[str, str, Any]:
    return "GET", "/", None


CASES: dict[str, tuple[str, Path, Build, str]] = {  # name: target, source, request, status
    "GET /users/{id}": ("api", ROOT / "main.py", _get_user, "200 OK"),
    "POST /users": ("api", ROOT / "main.py", _post_user, "201 CREATED"),
    "POST /transfers": ("api", ROOT / "main.py", _post_transfer, "201 CREATED"),
    "hello world": ("hello", ROOT / "bench" / "hello.py", _hello, "200 OK"),
}


def _environ(method: str, path: str, body: Any) -> dict[str, Any]:
    """A WSGI environ as gunicorn hands it over, for a keep-alive HTTP/1.1 request."""
    data = b"" if body is None else json.dumps(body).encode()
    environ = {
        "REQUEST_METHOD": method, "PATH_INFO": path, "RAW_URI": path, "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080", "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": "127.0.0.1:8080", "HTTP_USER_AGENT": "bench",
        "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(data), "wsgi.errors": sys.stderr,
        "wsgi.version": (1, 0), "wsgi.multithread": True, "wsgi.multiprocess": False,
        "wsgi.run_once": False, "wsgi.input_terminated": True,
    }  # fmt: skip
    if body is not None:
        environ["CONTENT_TYPE"] = "application/json"
        environ["CONTENT_LENGTH"] = str(len(data))
    return environ


# A cold start: a new process builds the app and answers its first request, and nothing else.
# The whole process is counted, the interpreter's own start included (the same for each).
COLD_STARTS: dict[str, tuple[str, Path, Build]] = {  # name: target, source, request
    "service": ("api", ROOT / "main.py", _get_user),
    "google_sample": ("google_sample", ROOT / "bench" / "sample.py", _get_user),
    "hello world": ("hello", ROOT / "bench" / "hello.py", _hello),
}
_COLD = "cold start of "


def cold_child(name: str) -> None:
    """Build the app of ``name`` and answer its first request (run under callgrind)."""
    target, source, build = COLD_STARTS[name]
    app = create_app(target, str(source))  # type: ignore[no-untyped-call]
    answered: list[str] = []
    for _ in app(_environ(*build(0)), lambda status, *_: answered.append(status)):
        pass
    assert answered == ["200 OK"], (name, answered)


def child(case: str, requests: int) -> None:
    """Warm up, then make ``requests`` requests of ``case`` (run under callgrind)."""
    if case.startswith(_COLD):
        cold_child(case.removeprefix(_COLD))
        return
    target, source, build, status = CASES[case]
    app = create_app(target, str(source))  # type: ignore[no-untyped-call]
    answered: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        answered.append(status)

    for n in range(WARM_UP + requests):
        answered.clear()
        for _ in app(_environ(*build(n)), start_response):
            pass
        assert answered == [status], (case, answered)


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
    parser.add_argument(
        "--cold-start",
        action="store_true",
        help="count the whole process of a cold start instead: build the app, answer once",
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    # The parent's alone: the children under callgrind import only what a request needs.
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from bench.coldstart import compile_bytecode
    from db.migrate import upgrade
    from dev.postgres import PostgresServer, add_users

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
        if args.cold_start:
            compile_bytecode()  # as the buildpack does: an instance does not compile at start
            for name in COLD_STARTS:
                total = _instructions(valgrind, _COLD + name, 1, env, args.profile)
                report[_COLD + name] = {"instructions_M": round(total / 1e6, 1)}
                print(name, report[_COLD + name], file=sys.stderr, flush=True)
            report["service / google_sample"] = round(
                report[_COLD + "service"]["instructions_M"]
                / report[_COLD + "google_sample"]["instructions_M"],
                3,
            )
            print(json.dumps(report, indent=2))
            return
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
