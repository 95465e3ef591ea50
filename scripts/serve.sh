#!/usr/bin/env bash
# Run one entry point locally (default: api) on http://localhost:8080.
#
# Usage: scripts/serve.sh [--postgres] [TARGET]
#   With no DATABASE_URL or INSTANCE_CONNECTION_NAME it uses ./app.db, created on first request.
#   --postgres  serve from a local PostgreSQL instead, started here and migrated first; its files
#               stay in .dev/postgres between runs, and it stops when the server does.
#   PORT=8080        the port to listen on (PORT=8081 scripts/serve.sh transfer_events runs a
#                    second function beside the first)
#   HOST=127.0.0.1   the address to listen on: this machine only; HOST=0.0.0.0 for every
#                    interface (another machine, a container's host)
set -euo pipefail
cd "$(dirname "$0")/.."

postgres=false
if [[ "${1:-}" == "--postgres" ]]; then
  postgres=true
  shift
fi
target=${1:-api}
port=${PORT:-8080}
host=${HOST:-127.0.0.1}
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
# gunicorn would only say "Can't connect" after retrying for 5 s.
if ! .venv/bin/python - "$host" "$port" <<'PY'
import socket
import sys

with socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET) as probe:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
    try:
        probe.bind((sys.argv[1], int(sys.argv[2])))
    except OSError as error:
        print(f"cannot listen on {sys.argv[1]} port {sys.argv[2]}: {error.strerror}", file=sys.stderr)
        sys.exit(1)
PY
then
  echo "Another server may hold port $port: stop it, or pick another port:" \
    "PORT=$((port + 1)) scripts/serve.sh${1:+ $target}" >&2
  exit 1
fi
shown=$host
if [[ $host == 127.0.0.1 ]]; then shown=localhost; fi
echo "serving $target on http://$shown:$port (on $host; PORT and HOST change it; Ctrl-C stops it)"
serve=(.venv/bin/functions-framework --target="$target" --host="$host" --port="$port")
if $postgres; then
  exec .venv/bin/python -m dev.postgres --data .dev/postgres -- "${serve[@]}"
fi
exec "${serve[@]}"
