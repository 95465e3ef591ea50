#!/usr/bin/env bash
# Deploy the functions as 2nd gen Cloud Functions: one `gcloud functions deploy` each.
#
# Usage: ./deploy.sh [--dry-run] [--migrate] [--prune] [--allow-unauthenticated] [FUNCTION ...]
#   FUNCTION               an entry point of main.py (default: every function in FUNCTIONS)
#   --dry-run              print the budget and every command, run none (and ask Google nothing)
#   --migrate              first run `python -m db upgrade` from here, as the schema's owner
#   --prune                delete the functions deployed on the same database that are not in
#                          FUNCTIONS (the way from an older deployment to this one)
#   --allow-unauthenticated  let anyone call the functions (default: IAM callers only)
#
# The functions are main.py's entry points: each `@functions_framework.http` function at its
# top level is deployed with an HTTP trigger, each `@functions_framework.cloud_event` function
# with `--trigger-topic` (the `topic=` of its `event_scope`) and `--retry`, so that a failed
# delivery is redelivered rather than dropped. A new entry point needs no change here.
#
# The deployment (FUNCTIONS) is, by default, `api`, the event functions and every other HTTP
# function except those that serve one resource of `web/routes.py` (users, items, transfers,
# health), whose routes `api` already serves: those are deployed when named, and then join it.
# The deployment shares one connection budget: each event function gets EVENT_INSTANCES
# instances, the outbox's relay (`relay_outbox`) one, the HTTP functions split the rest, and the
# dry run prints every share and the total. The relay is private: its Cloud Scheduler job
# (created or updated here) calls it with an OIDC token as SCHEDULER_SERVICE_ACCOUNT.
#
# Events are published to Pub/Sub by the functions themselves: create each topic they publish
# to (`transfer-completed`) and grant SERVICE_ACCOUNT roles/pubsub.publisher on it, once
# (docs/deploying.md); until then the events wait in the outbox.
#
# Settings, from the environment (docs/deploying.md):
#   PROJECT_ID, REGION                  where to deploy (REGION: the Cloud SQL instance's own)
#   SERVICE_ACCOUNT                     the functions' own service account (email)
# and either, through the Cloud SQL Python Connector:
#   INSTANCE_CONNECTION_NAME            project:region:instance of the Cloud SQL instance
#   DB_NAME, DB_USER                    database and user
#   DB_PASS_SECRET                      Secret Manager secret with the password (NAME, which
#                                       follows its latest version, or NAME:VERSION), unless
#                                       DB_IAM_AUTH=true
# or, to any address (a connection pooler, Managed Connection Pooling's port 6432):
#   DATABASE_URL_SECRET                 Secret Manager secret holding the whole DATABASE_URL
# and, for --migrate, the schema's owner (the functions' user only has the runtime role):
#   DB_OWNER, DB_OWNER_PASS_SECRET      the owner's database user and its password's secret, or
#   DB_OWNER_IAM_AUTH=true              DB_OWNER is your own IAM database user (gcloud's login)
#   MIGRATION_DATABASE_URL_SECRET       with DATABASE_URL_SECRET: the owner's whole DATABASE_URL
# and optionally:
#   FUNCTIONS="api transfer_events"     the deployment: the functions that share the connections
#   DB_IAM_AUTH=false  DB_IP_TYPE=PUBLIC  CONCURRENCY=8  DB_MAX_OVERFLOW=0  CPU=1  MEMORY=512Mi
#   TIMEOUT=60s  LOG_LEVEL=INFO  VPC_CONNECTOR=(none; needed by PRIVATE and PSC)
#   RUNTIME=python313                   python311 to python314; the suite runs on 3.11 and 3.13
#   BUILD_SERVICE_ACCOUNT=(the project's default)   the account Cloud Build builds with (email)
#   TRIGGER_SERVICE_ACCOUNT=(SERVICE_ACCOUNT)  the account event triggers call the functions as
#   SCHEDULER_SERVICE_ACCOUNT=(TRIGGER_SERVICE_ACCOUNT)  the account the relay's job calls it as
#   RELAY_SCHEDULE="* * * * *"          when the relay's job runs (cron, UTC)
#   DB_MAX_CONNECTIONS=100  DB_RESERVED_CONNECTIONS=10   the connection budget for --max-instances:
#                                       the instance's max_connections, or a pooler's client limit
#   EVENT_INSTANCES=2                   the most instances of each event function
#   MIN_INSTANCES=0                     instances of each HTTP function kept running, so that no
#                                       caller waits for a cold start; each is billed while idle
#                                       (at Cloud Run's idle rate) and holds its pool's connections
#   ALLOW_CROSS_REGION=false            true: deploy to a REGION other than the instance's
# A setting left out is taken off the function at its next deploy (the connector, the build
# account, the kept instances, the password secret). A password is never read from the
# environment and never passed as a plain variable.
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
