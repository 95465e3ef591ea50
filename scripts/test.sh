#!/usr/bin/env bash
# Install what the tests need and run every check: ruff, mypy and the test suite, the suite on
# the oldest and the newest Python this project supports (3.11 to 3.14) that are installed
# here, each in a virtual environment of its own (.venv for the first, .venv-3.X for the other).
# PYTHON=python3.12 runs everything on that one Python instead.
# Extra arguments go to pytest, e.g. scripts/test.sh -k users -x
set -euo pipefail
cd "$(dirname "$0")/.."

# The first of python3.MINOR for the minors given that runs: on PATH, or installed by pyenv.
find_python() {
  local minor candidate
  for minor in "$@"; do
    for candidate in "python3.$minor" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3."$minor".*/bin/python3."$minor"; do
      if command -v "$candidate" >/dev/null 2>&1 \
        && "$candidate" -c "import sys; sys.exit(sys.version_info[:2] != (3, $minor))" 2>/dev/null; then
        echo "$candidate"
        return 0
      fi
    done
  done
  return 1
}

if [ -n "${PYTHON:-}" ]; then
  pythons=("$PYTHON")
else
  oldest=$(find_python 11 12 13 14 || echo python3)
  newest=$(find_python 14 13 12 11 || echo python3)
  pythons=("$oldest")
  if [ "$newest" != "$oldest" ]; then pythons+=("$newest"); fi
fi
for python in "${pythons[@]}"; do
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "Python 3.11 or newer is needed as '$python' (set PYTHON=...)" >&2
    exit 1
  fi
done

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

# The first Python's environment is .venv, the one scripts/serve.sh uses too.
venvs=()
for python in "${pythons[@]}"; do
  venv=.venv
  if [ ${#venvs[@]} -gt 0 ]; then
    venv=.venv-$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  fi
  if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r requirements-dev.txt
  venvs+=("$venv")
done

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy .
# The second Python's run goes alongside the first, its output shown after: the suite mostly
# waits on the servers it starts, and two runs at once take little longer than one.
other=""
if [ ${#venvs[@]} -gt 1 ]; then
  other_log=$(mktemp)
  trap 'rm -f "$other_log"' EXIT
  "${venvs[1]}/bin/python" -m pytest "$@" >"$other_log" 2>&1 &
  other=$!
fi
echo "pytest on $(.venv/bin/python --version)"
status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ -n "$other" ]; then
  other_status=0
  wait "$other" || other_status=$?
  echo "pytest on $("${venvs[1]}/bin/python" --version)"
  cat "$other_log"
  if [ "$status" = 0 ]; then status=$other_status; fi
fi
exit "$status"
