#!/usr/bin/env bash
# Run one entry point locally (default: api) on http://localhost:8080.
# With no DATABASE_URL or INSTANCE_CONNECTION_NAME it uses ./app.db, created on first request.
set -euo pipefail
cd "$(dirname "$0")/.."

target=${1:-api}
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
exec .venv/bin/functions-framework --target="$target" --port="${PORT:-8080}"
