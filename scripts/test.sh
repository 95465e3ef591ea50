#!/usr/bin/env bash
# Install what the tests need and run every check: ruff, mypy and the test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k users -x
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "Python 3.11 or newer is needed as '$python' (set PYTHON=...)" >&2
  exit 1
fi

# The suite starts its own PostgreSQL, PgBouncer and Pub/Sub emulator: only their programs
# must be installed.
missing=()
if ! command -v pg_ctl >/dev/null 2>&1 && ! compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null; then
  missing+=(postgresql)
fi
if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
  missing+=(pgbouncer)
fi
if ! compgen -G "/usr/lib/google-cloud-sdk/platform/pubsub-emulator" >/dev/null; then
  missing+=(google-cloud-cli-pubsub-emulator)  # from Google's apt repository, with gcloud
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "Installing Debian packages: ${missing[*]}..."
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "Not found: ${missing[*]}; install PostgreSQL 13 or newer (initdb, pg_ctl) and PgBouncer" >&2
    exit 1
  fi
  $sudo apt-get update -qq
  if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null; then
    echo "Could not install ${missing[*]}; the Pub/Sub emulator comes from Google's apt" \
      "repository (google-cloud-cli-pubsub-emulator, with Java 17)" >&2
    exit 1
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy .
.venv/bin/python -m pytest "$@"
