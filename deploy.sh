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
set -euo pipefail
cd "$(dirname "$0")"
# A password in the deployer's shell must not reach gcloud or the functions by accident.
unset DB_PASS

fail() {
  echo "deploy.sh: $*" >&2
  exit 2
}

python=${PYTHON:-.venv/bin/python}
[[ -x "$python" ]] || python=python3

# main.py is the one list of functions, read without importing anything: each line is
# "NAME http" or "NAME event TOPIC".
entry_listing=$("$python" - main.py <<'EOF'
import ast
import sys

tree = ast.parse(open(sys.argv[1], encoding="utf-8").read())
for node in tree.body:
    if not isinstance(node, ast.FunctionDef):
        continue
    decorators = [ast.unparse(decorator) for decorator in node.decorator_list]
    if "functions_framework.http" in decorators:
        print(node.name, "http")
    elif "functions_framework.cloud_event" in decorators:
        topics = [
            keyword.value.value
            for decorator in node.decorator_list
            if isinstance(decorator, ast.Call)
            for keyword in decorator.keywords
            if keyword.arg == "topic" and isinstance(keyword.value, ast.Constant)
        ]
        if len(topics) != 1:
            sys.exit(f"main.py: {node.name} needs event_scope(..., topic='NAME') to be deployed")
        print(node.name, "event", topics[0])
EOF
) || exit 2
mapfile -t ENTRY_LINES <<<"$entry_listing"
ENTRY_POINTS=()
declare -A TRIGGER_TOPIC=()
for line in "${ENTRY_LINES[@]}"; do
  read -r name kind topic <<<"$line"
  ENTRY_POINTS+=("$name")
  if [[ $kind == event ]]; then
    TRIGGER_TOPIC[$name]=$topic
  fi
done
[[ ${#ENTRY_POINTS[@]} -gt 0 ]] || fail "main.py has no @functions_framework.http or .cloud_event function"

is_entry_point() {
  local name
  for name in "${ENTRY_POINTS[@]}"; do [[ "$name" != "$1" ]] || return 0; done
  return 1
}

dry_run=false
migrate=false
access="--no-allow-unauthenticated"
chosen=()
for argument in "$@"; do
  case "$argument" in
    --dry-run) dry_run=true ;;
    --migrate) migrate=true ;;
    --allow-unauthenticated) access="--allow-unauthenticated" ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    -*) fail "unknown option $argument (see --help)" ;;
    *)
      is_entry_point "$argument" || fail "unknown function '$argument'; main.py has: ${ENTRY_POINTS[*]}"
      for name in "${chosen[@]}"; do
        [[ "$name" != "$argument" ]] || fail "$argument is named twice"
      done
      chosen+=("$argument")
      ;;
  esac
done

# Settings: every problem is reported before anything runs.
problems=()
require() {
  [[ -n "${!1:-}" ]] || problems+=("$1 is not set")
}
whole_number() { # name, minimum
  [[ "${!1}" =~ ^[0-9]+$ ]] && ((10#${!1} >= $2)) || problems+=("$1 must be a whole number of at least $2, got '${!1}'")
}
email() { # name
  [[ -z "${!1:-}" || "${!1}" =~ ^[^@[:space:]]+@[^@[:space:]]+$ ]] || problems+=("$1 must be a service account email, got '${!1}'")
}
DATABASE_URL_SECRET=${DATABASE_URL_SECRET:-}
INSTANCE_CONNECTION_NAME=${INSTANCE_CONNECTION_NAME:-}
if [[ -n "$DATABASE_URL_SECRET" ]]; then
  mode=url
  for name in INSTANCE_CONNECTION_NAME DB_NAME DB_USER DB_PASS_SECRET DB_IAM_AUTH DB_IP_TYPE \
    DB_OWNER DB_OWNER_PASS_SECRET DB_OWNER_IAM_AUTH; do
    [[ -z "${!name:-}" ]] || problems+=("$name has no use with DATABASE_URL_SECRET; set one or the other")
  done
else
  mode=connector
  for name in INSTANCE_CONNECTION_NAME DB_NAME DB_USER; do
    [[ -n "${!name:-}" ]] || problems+=("$name is not set (or set DATABASE_URL_SECRET)")
  done
fi
for name in PROJECT_ID REGION SERVICE_ACCOUNT; do
  require "$name"
done
DB_IAM_AUTH=${DB_IAM_AUTH:-false}
DB_IP_TYPE=${DB_IP_TYPE:-PUBLIC}
CONCURRENCY=${CONCURRENCY:-8}
DB_MAX_OVERFLOW=${DB_MAX_OVERFLOW:-0}
CPU=${CPU:-1}
MEMORY=${MEMORY:-512Mi}
TIMEOUT=${TIMEOUT:-60s}
RUNTIME=${RUNTIME:-python312}
LOG_LEVEL=${LOG_LEVEL:-INFO}
DB_MAX_CONNECTIONS=${DB_MAX_CONNECTIONS:-100}
DB_RESERVED_CONNECTIONS=${DB_RESERVED_CONNECTIONS:-10}
DB_PASS_SECRET=${DB_PASS_SECRET:-}
DB_OWNER=${DB_OWNER:-}
DB_OWNER_PASS_SECRET=${DB_OWNER_PASS_SECRET:-}
DB_OWNER_IAM_AUTH=${DB_OWNER_IAM_AUTH:-false}
MIGRATION_DATABASE_URL_SECRET=${MIGRATION_DATABASE_URL_SECRET:-}
VPC_CONNECTOR=${VPC_CONNECTOR:-}
BUILD_SERVICE_ACCOUNT=${BUILD_SERVICE_ACCOUNT:-}
TRIGGER_SERVICE_ACCOUNT=${TRIGGER_SERVICE_ACCOUNT:-${SERVICE_ACCOUNT:-}}

FUNCTIONS=${FUNCTIONS:-${ENTRY_POINTS[*]}}
read -r -a fleet <<<"${FUNCTIONS//,/ }"
[[ ${#fleet[@]} -gt 0 ]] || problems+=("FUNCTIONS names no function")
in_fleet() {
  local name
  for name in "${fleet[@]}"; do [[ "$name" != "$1" ]] || return 0; done
  return 1
}
seen=()
for name in "${fleet[@]}"; do
  is_entry_point "$name" || problems+=("FUNCTIONS names '$name', which is not an entry point of main.py")
  for other in "${seen[@]}"; do
    [[ "$other" != "$name" ]] || problems+=("FUNCTIONS names '$name' twice")
  done
  seen+=("$name")
done
for name in "${chosen[@]}"; do
  in_fleet "$name" || problems+=("$name is not in FUNCTIONS (${fleet[*]}), whose share of connections it would take")
done
if [[ ${#chosen[@]} -eq 0 ]]; then
  chosen=("${fleet[@]}")
fi

if [[ -n "${INSTANCE_CONNECTION_NAME:-}" && ! "$INSTANCE_CONNECTION_NAME" =~ ^([a-z0-9.-]+:)?[a-z0-9-]+:[a-z0-9-]+:[a-z0-9-]+$ ]]; then
  problems+=("INSTANCE_CONNECTION_NAME must look like project:region:instance, got '$INSTANCE_CONNECTION_NAME'")
fi
email SERVICE_ACCOUNT
email BUILD_SERVICE_ACCOUNT
email TRIGGER_SERVICE_ACCOUNT
case "$mode:$DB_IAM_AUTH" in
  url:*) ;;
  *:true)
    [[ -z "$DB_PASS_SECRET" ]] || problems+=("DB_PASS_SECRET must not be set when DB_IAM_AUTH=true")
    ;;
  *:false)
    [[ -n "$DB_PASS_SECRET" ]] || problems+=("DB_PASS_SECRET is not set (or set DB_IAM_AUTH=true)")
    ;;
  *) problems+=("DB_IAM_AUTH must be true or false, got '$DB_IAM_AUTH'") ;;
esac
if $migrate && [[ $mode == url ]]; then
  [[ -n "$MIGRATION_DATABASE_URL_SECRET" ]] || problems+=("--migrate needs MIGRATION_DATABASE_URL_SECRET: the schema owner's DATABASE_URL, not the functions'")
elif $migrate; then
  if [[ -z "$DB_OWNER" ]]; then
    problems+=("--migrate needs DB_OWNER: the database user that owns the schema, not the functions' DB_USER")
  elif [[ "$DB_OWNER" == "${DB_USER:-}" ]]; then
    problems+=("DB_OWNER must not be DB_USER: the functions must not own the tables they serve")
  fi
  case "$DB_OWNER_IAM_AUTH" in
    true) [[ -z "$DB_OWNER_PASS_SECRET" ]] || problems+=("DB_OWNER_PASS_SECRET must not be set when DB_OWNER_IAM_AUTH=true") ;;
    false) [[ -n "$DB_OWNER_PASS_SECRET" ]] || problems+=("--migrate needs DB_OWNER_PASS_SECRET (or DB_OWNER_IAM_AUTH=true)") ;;
    *) problems+=("DB_OWNER_IAM_AUTH must be true or false, got '$DB_OWNER_IAM_AUTH'") ;;
  esac
fi
case "$DB_IP_TYPE" in
  PUBLIC) ;;
  PRIVATE | PSC)
    [[ -n "$VPC_CONNECTOR" ]] || problems+=("DB_IP_TYPE=$DB_IP_TYPE needs VPC_CONNECTOR: a function reaches the VPC only through one")
    ;;
  *) problems+=("DB_IP_TYPE must be PUBLIC, PRIVATE or PSC, got '$DB_IP_TYPE'") ;;
esac
case "$LOG_LEVEL" in
  DEBUG | INFO | WARNING | ERROR) ;;
  *) problems+=("LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got '$LOG_LEVEL'") ;;
esac
whole_number CONCURRENCY 1
whole_number DB_MAX_OVERFLOW 0
whole_number DB_MAX_CONNECTIONS 1
whole_number DB_RESERVED_CONNECTIONS 0
[[ "$CPU" =~ ^[0-9]+(\.[0-9]+)?$ ]] || problems+=("CPU must be a number of vCPUs, got '$CPU'")
if [[ "$CPU" =~ ^0 && "$CONCURRENCY" != 1 ]]; then
  problems+=("CONCURRENCY above 1 needs CPU of at least 1, got CPU=$CPU")
fi
if [[ ${#problems[@]} -gt 0 ]]; then
  printf 'deploy.sh: %s\n' "${problems[@]}" >&2
  exit 2
fi
if ! $dry_run && ! command -v gcloud >/dev/null 2>&1; then
  fail "gcloud is not on PATH; install the Google Cloud CLI"
fi

# Every instance may hold pool + overflow connections and every function scales on its own, so
# the functions of FUNCTIONS split what the Cloud SQL instance allows, less a reserve, evenly:
# deploying some of them never gives those more than their share.
per_instance=$((CONCURRENCY + DB_MAX_OVERFLOW))
budget=$((DB_MAX_CONNECTIONS - DB_RESERVED_CONNECTIONS))
max_instances=$((budget / per_instance / ${#fleet[@]}))
echo "connection budget: ($DB_MAX_CONNECTIONS max_connections - $DB_RESERVED_CONNECTIONS reserved)" \
  "/ ($CONCURRENCY pool + $DB_MAX_OVERFLOW overflow per instance) / ${#fleet[@]} functions" \
  "= --max-instances=$max_instances per function"
if ((max_instances < 1)); then
  fail "the connection budget allows no instance; raise DB_MAX_CONNECTIONS or lower CONCURRENCY"
fi

show() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
}

run() {
  show "$@"
  if ! $dry_run; then
    "$@"
  fi
}

deploying() {
  local name
  for name in "${chosen[@]}"; do [[ "$name" != "$1" ]] || return 0; done
  return 1
}

# Functions deployed earlier keep their --max-instances until redeployed: count what those
# already on this database (the same INSTANCE_CONNECTION_NAME, or the same DATABASE_URL
# secret) may hold, beside what this deploy gives.
if [[ $mode == url ]]; then
  database="the database of secret ${DATABASE_URL_SECRET%%:*}"
  shared_by="secret:${DATABASE_URL_SECRET%%:*}"
else
  database=$INSTANCE_CONNECTION_NAME
  shared_by="instance:$INSTANCE_CONNECTION_NAME"
fi
listing=(gcloud functions list --project="$PROJECT_ID" --format=json)
show "${listing[@]}"
held=0
holders=()
if ! $dry_run; then
  deployed=$("${listing[@]}")
  while IFS='|' read -r name location most each; do
    if [[ "$location" == "$REGION" ]] && deploying "$name"; then
      continue # replaced by this deploy
    fi
    held=$((held + most * each))
    holders+=("$name in $location ($most instances x $each)")
  done < <("$python" -c '
import json
import sys

# Each function deployed on the same database: name|region|max instances|connections each.
for function in json.load(sys.stdin):
    config = function.get("serviceConfig", {})
    env = config.get("environmentVariables", {})
    secrets = {s.get("key"): s.get("secret") for s in config.get("secretEnvironmentVariables", [])}
    if sys.argv[1] not in (
        "instance:" + str(env.get("INSTANCE_CONNECTION_NAME")),
        "secret:" + str(secrets.get("DATABASE_URL")),
    ):
        continue
    pool = int(env.get("DB_POOL_SIZE") or config.get("maxInstanceRequestConcurrency") or 1)
    each = pool + int(env.get("DB_MAX_OVERFLOW") or 0)
    region, name = function["name"].split("/")[3::2]
    most = config.get("maxInstanceCount", 100)
    print(f"{name}|{region}|{most}|{each}")
' "$shared_by" <<<"$deployed")
fi
planned=$((${#chosen[@]} * max_instances * per_instance))
if ((held + planned > budget)); then
  printf 'deploy.sh: %s\n' \
    "functions already deployed on $database may hold $held connections:" \
    "${holders[@]/#/  }" \
    "with the $planned of this deploy that passes the budget of $budget;" \
    "deploy them too (they must be in FUNCTIONS), or delete those no longer used" >&2
  exit 2
fi

# A secret named NAME or NAME:VERSION, as NAME:VERSION (the latest version by default).
secret_ref() {
  if [[ "$1" == *:* ]]; then echo "$1"; else echo "$1:latest"; fi
}

# The gcloud command that prints a secret's value, in `fetch`.
secret_access() {
  local ref
  ref=$(secret_ref "$1")
  fetch=(gcloud secrets versions access "${ref#*:}" --secret="${ref%%:*}" --project="$PROJECT_ID")
}

if $migrate && [[ $mode == url ]]; then
  echo "migrating the schema as its owner, at the DATABASE_URL kept in Secret Manager"
  secret_access "$MIGRATION_DATABASE_URL_SECRET"
  show "${fetch[@]}"
  show "$python" -m db upgrade
  if ! $dry_run; then
    # Captured, never printed: it reaches only the migration's environment.
    database_url=$("${fetch[@]}")
    DATABASE_URL="$database_url" "$python" -m db upgrade
    unset database_url
  fi
elif $migrate; then
  echo "migrating the schema as its owner $DB_OWNER, through the Cloud SQL connector"
  migration_env=(INSTANCE_CONNECTION_NAME="$INSTANCE_CONNECTION_NAME" DB_USER="$DB_OWNER"
    DB_NAME="$DB_NAME" DB_IP_TYPE="$DB_IP_TYPE" DB_IAM_AUTH="$DB_OWNER_IAM_AUTH")
  if [[ "$DB_OWNER_IAM_AUTH" == false ]]; then
    secret_access "$DB_OWNER_PASS_SECRET"
    show "${fetch[@]}"
    if ! $dry_run; then
      # Captured, never printed: it reaches only the migration's environment.
      password=$("${fetch[@]}")
      migration_env+=(DB_PASS="$password")
    fi
  fi
  show "$python" -m db upgrade
  if ! $dry_run; then
    env "${migration_env[@]}" "$python" -m db upgrade
  fi
  unset password migration_env
fi

env_vars="DB_POOL_SIZE=$CONCURRENCY,DB_MAX_OVERFLOW=$DB_MAX_OVERFLOW,THREADS=$CONCURRENCY"
env_vars+=",LOG_LEVEL=$LOG_LEVEL,GOOGLE_CLOUD_PROJECT=$PROJECT_ID"
PASSWORD_FILE=/etc/secrets/db-pass
if [[ $mode == connector ]]; then
  env_vars="INSTANCE_CONNECTION_NAME=$INSTANCE_CONNECTION_NAME,DB_USER=$DB_USER,DB_NAME=$DB_NAME"
  env_vars+=",DB_IP_TYPE=$DB_IP_TYPE,DB_IAM_AUTH=$DB_IAM_AUTH,DB_POOL_SIZE=$CONCURRENCY"
  env_vars+=",DB_MAX_OVERFLOW=$DB_MAX_OVERFLOW,THREADS=$CONCURRENCY,LOG_LEVEL=$LOG_LEVEL"
  env_vars+=",GOOGLE_CLOUD_PROJECT=$PROJECT_ID"
  if [[ "$DB_IAM_AUTH" == false ]]; then
    env_vars+=",DB_PASS_FILE=$PASSWORD_FILE"
  fi
fi

for function in "${chosen[@]}"; do
  command=(gcloud functions deploy "$function"
    --gen2
    --project="$PROJECT_ID"
    --region="$REGION"
    --runtime="$RUNTIME"
    --source=.
    --entry-point="$function")
  if [[ -n "${TRIGGER_TOPIC[$function]:-}" ]]; then
    # Without --retry a failed delivery is dropped; with it, redelivered for up to 24 hours.
    command+=(--trigger-topic="${TRIGGER_TOPIC[$function]}" --retry
      --trigger-service-account="$TRIGGER_SERVICE_ACCOUNT")
  else
    command+=(--trigger-http "$access")
  fi
  command+=(
    --service-account="$SERVICE_ACCOUNT"
    --set-env-vars="$env_vars"
    --concurrency="$CONCURRENCY"
    --cpu="$CPU"
    --memory="$MEMORY"
    --timeout="$TIMEOUT"
    --max-instances="$max_instances"
    --quiet)
  # Each deploy states every setting, so one that was dropped is removed, not left behind.
  if [[ $mode == url ]]; then
    command+=(--set-secrets="DATABASE_URL=$(secret_ref "$DATABASE_URL_SECRET")")
  elif [[ "$DB_IAM_AUTH" == false ]]; then
    # A file, read again at each access: a rotated password needs no redeploy (DB_PASS_FILE).
    command+=(--set-secrets="$PASSWORD_FILE=$(secret_ref "$DB_PASS_SECRET")")
  else
    command+=(--clear-secrets)
  fi
  if [[ -n "$VPC_CONNECTOR" ]]; then
    command+=(--vpc-connector="$VPC_CONNECTOR")
  else
    command+=(--clear-vpc-connector)
  fi
  if [[ -n "$BUILD_SERVICE_ACCOUNT" ]]; then
    command+=(--build-service-account="projects/$PROJECT_ID/serviceAccounts/$BUILD_SERVICE_ACCOUNT")
  fi
  run "${command[@]}"
done
