#!/usr/bin/env bash
# Run one entry point locally (default: api) on http://localhost:8080.
#
# Usage: scripts/serve.sh [--postgres] [TARGET]
#   With no DATABASE_URL or INSTANCE_CONNECTION_NAME it uses ./app.db, created on first request.
#   --postgres  serve from a local PostgreSQL instead, started here and migrated first; its files
#               stay in .dev/postgres between runs, and it stops when the server does.
set -euo pipefail
cd "$(dirname "$0")/.."

postgres=false
if [[ "${1:-}" == "--postgres" ]]; then
  postgres=true
  shift
fi
target=${1:-api}
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
serve=(.venv/bin/functions-framework --target="$target" --port="${PORT:-8080}")
if $postgres; then
  exec .venv/bin/python -m dev.postgres --data .dev/postgres -- "${serve[@]}"
fi
exec "${serve[@]}"
