#!/usr/bin/env bash
# Install what the tests need and run every check: ruff, mypy and the test suite.
# The suite starts its own throwaway PostgreSQL; only the server binaries must be present.
# Extra arguments go to pytest, e.g. scripts/test.sh -k users -x
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "Python 3.11 or newer is needed as '$python' (set PYTHON=...)" >&2
  exit 1
fi

have_postgres() {
  command -v pg_ctl >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null
}
if ! have_postgres; then
  echo "Installing PostgreSQL server binaries (Debian package postgresql)..."
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "PostgreSQL server binaries (initdb, pg_ctl) not found; install PostgreSQL 13 or newer" >&2
    exit 1
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy .
.venv/bin/python -m pytest "$@"
