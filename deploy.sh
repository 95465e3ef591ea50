#!/usr/bin/env bash
# Deploy the functions as 2nd gen Cloud Functions: one `gcloud functions deploy` each.
#
# Usage: ./deploy.sh [--dry-run] [--migrate] [--allow-unauthenticated] [FUNCTION ...]
#   FUNCTION               an entry point of main.py (default: every function in FUNCTIONS)
#   --dry-run              print every command, run none
#   --migrate              first run `python -m db upgrade` from here, as the schema's owner
#   --allow-unauthenticated  let anyone call the functions (default: IAM callers only)
#
# The functions are main.py's entry points: each `@functions_framework.http` function at its
# top level is deployed with an HTTP trigger, each `@functions_framework.cloud_event` function
# with `--trigger-topic` (the `topic=` of its `event_scope`) and `--retry`, so that a failed
# delivery is redelivered rather than dropped. A new entry point needs no change here.
#
# Settings, from the environment (docs/deploying.md):
#   PROJECT_ID, REGION                  where to deploy
#   SERVICE_ACCOUNT                     the functions' own service account (email)
# and either, through the Cloud SQL Python Connector:
#   INSTANCE_CONNECTION_NAME            project:region:instance of the Cloud SQL instance
#   DB_NAME, DB_USER                    database and user
#   DB_PASS_SECRET                      Secret Manager secret with the password (NAME or NAME:VERSION),
#                                       unless DB_IAM_AUTH=true
# or, to any address (a connection pooler, Managed Connection Pooling's port 6432):
#   DATABASE_URL_SECRET                 Secret Manager secret holding the whole DATABASE_URL
# and, for --migrate, the schema's owner (the functions' user only has the runtime role):
#   DB_OWNER, DB_OWNER_PASS_SECRET      the owner's database user and its password's secret, or
#   DB_OWNER_IAM_AUTH=true              DB_OWNER is your own IAM database user (gcloud's login)
#   MIGRATION_DATABASE_URL_SECRET       with DATABASE_URL_SECRET: the owner's whole DATABASE_URL
# and optionally:
#   FUNCTIONS="(every entry point)"     the functions that share the database's connections
#   DB_IAM_AUTH=false  DB_IP_TYPE=PUBLIC  CONCURRENCY=8  DB_MAX_OVERFLOW=0  CPU=1  MEMORY=512Mi
#   TIMEOUT=60s  RUNTIME=python312  LOG_LEVEL=INFO  VPC_CONNECTOR=(none; needed by PRIVATE and PSC)
#   BUILD_SERVICE_ACCOUNT=(the project's default)   the account Cloud Build builds with (email)
#   TRIGGER_SERVICE_ACCOUNT=(SERVICE_ACCOUNT)  the account event triggers call the functions as
#   DB_MAX_CONNECTIONS=100  DB_RESERVED_CONNECTIONS=10   the connection budget for --max-instances:
#                                       the instance's max_connections, or a pooler's client limit
# A password is never read from the environment and never passed as a plain variable.
#
# The logic lives in ops/deploy.py, tested by tests/test_deploy.py.
set -euo pipefail
cd "$(dirname "$0")"

for argument in "$@"; do
  if [[ $argument == -h || $argument == --help ]]; then
    sed -n '2,/^# The logic lives/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
  fi
done

python=${PYTHON:-.venv/bin/python}
[[ -x "$python" ]] || python=python3
exec "$python" -m ops.deploy "$@"
