"""deploy.sh driving the real gcloud CLI against a stand-in of Google's APIs on 127.0.0.1.

Google cannot be reached from here, so only its APIs are faked (``tests/google/functions.py``):
gcloud itself runs unchanged, builds and uploads its own zip, and sends its own requests. The
tests assert on what gcloud really sent, then unpack the uploaded zip and serve it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from dev.pgbouncer import PgBouncer
from dev.postgres import PostgresServer, free_port
from ops.deploy import EntryPoint, Options, Settings, holdings, share
from ops.deploy import entry_points as read_entry_points
from tests.conftest import ROOT
from tests.deploying import (
    GCLOUD,
    LOCAL_CLUTTER,
    PASSWORD_IN_SHELL,
    RUNTIME_DOCUMENTS,
    RUNTIME_TOP_LEVEL,
    SETTINGS,
    Deploy,
    entry_points,
    needs_gcloud,
    start_deploy,
)

DEFAULT = ["api", "relay_outbox", "transfer_events"]  # what a deploy naming none deploys
EVERY = " ".join(entry_points())
# The budget of 90 connections, 8 to an instance, between the seven functions: the relay gets
# one, each event function at most an even share (1), the HTTP functions split the other 9.
SHARES_OF_SIX = {"users": 2, "items": 2, "transfers": 2, "health": 2, "api": 1,
                 "relay_outbox": 1, "transfer_events": 1}  # fmt: skip


@pytest.fixture(scope="module")
def full_deploy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deploy]:
    """Every function deployed once, with a VPC connector, a build service account and one
    instance kept warm."""
    if GCLOUD is None:
        pytest.skip("the Google Cloud CLI (gcloud) is not installed here; CI has it")
    runner = start_deploy(tmp_path_factory.mktemp("full-deploy"))
    result = runner(
        FUNCTIONS=EVERY,
        VPC_CONNECTOR="functions-egress",
        BUILD_SERVICE_ACCOUNT="builder@acme-prod.iam.gserviceaccount.com",
        MIN_INSTANCES="1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    yield runner
    runner.api.stop()


def _limits(deploy: Deploy) -> dict[str, int]:
    """Each deployed function's max instances."""
    return {
        name: function["serviceConfig"]["maxInstanceCount"]
        for name, function in deploy.api.functions.items()
    }


@needs_gcloud
def test_every_entry_point_in_functions_is_deployed(full_deploy: Deploy) -> None:
    """With FUNCTIONS naming them all, each function main.py registers is deployed, by its own
    name."""
    assert sorted(full_deploy.api.functions) == sorted(entry_points())
    assert full_deploy.writes() == [f"create {name}" for name in EVERY.split()]


@needs_gcloud
def test_by_default_api_and_the_event_functions_are_deployed(deploy: Deploy) -> None:
    """No function named, no FUNCTIONS: api, the relay and transfer_events, sharing the whole
    budget; api gets every instance the others do not need. The relay is callable by the
    scheduler's account only, and its job posts to it every minute with an OIDC token."""
    result = deploy()

    assert result.returncode == 0, result.stderr[-3000:]
    assert deploy.writes() == ["create api", "create relay_outbox", "create transfer_events"]
    assert _limits(deploy) == {"api": 8, "relay_outbox": 1, "transfer_events": 2}
    assert "  total            88 of 90 connections" in result.stdout
    [job] = deploy.api.jobs.values()
    url = deploy.api.functions["relay_outbox"]["url"]
    assert job["name"].endswith("/jobs/relay-outbox")
    assert job["schedule"] == "* * * * *"
    assert job["httpTarget"]["uri"] == url
    assert job["httpTarget"]["httpMethod"] == "POST"
    assert job["httpTarget"]["oidcToken"]["audience"] == url
    assert job["retryConfig"]["retryCount"] == 2
    [binding] = deploy.api.invokers["relay_outbox"]
    assert binding["role"] == "roles/run.invoker"
    assert binding["members"] == [
        f"serviceAccount:{job['httpTarget']['oidcToken']['serviceAccountEmail']}"
    ]

    again = deploy()

    assert again.returncode == 0, again.stderr[-3000:]
    assert "gcloud scheduler jobs update http relay-outbox" in again.stdout
    assert len(deploy.api.jobs) == 1


def test_functions_serving_part_of_api_are_marked_as_such() -> None:
    """users, items, transfers and health serve routes api serves too; api, the event function
    and a plain request_scope function do not."""
    found = {entry.name: entry for entry in read_entry_points(ROOT / "main.py")}

    assert {name for name, entry in found.items() if entry.part_of_api} == {
        "users", "items", "transfers", "health"
    }  # fmt: skip
    assert found["transfer_events"].topic == "transfer-requests"


@needs_gcloud
def test_each_function_is_sent_as_configured(full_deploy: Deploy) -> None:
    """Runtime, entry point, settings, secret reference, limits and accounts reach the API."""
    for name, function in full_deploy.api.functions.items():
        build, service = function["buildConfig"], function["serviceConfig"]
        assert (build["runtime"], build["entryPoint"]) == ("python313", name)
        assert build["serviceAccount"] == (
            "projects/acme-prod/serviceAccounts/builder@acme-prod.iam.gserviceaccount.com"
        )
        assert service["environmentVariables"] == {
            "INSTANCE_CONNECTION_NAME": "acme-prod:europe-west1:main",
            "DB_USER": "app",
            "DB_NAME": "app",
            "DB_IP_TYPE": "PUBLIC",
            "DB_IAM_AUTH": "false",
            "DB_POOL_SIZE": "8",
            "DB_MAX_OVERFLOW": "0",
            "THREADS": "8",
            "LOG_LEVEL": "INFO",
            "GOOGLE_CLOUD_PROJECT": "acme-prod",
            "DB_PASS_FILE": "/etc/secrets/db-pass",
        }
        # The password is a mounted file, read again at each access: rotation needs no deploy.
        assert "secretEnvironmentVariables" not in service
        [volume] = service["secretVolumes"]
        assert (volume["mountPath"], volume["secret"]) == ("/etc/secrets", "db-pass")
        assert volume["versions"] == [{"path": "db-pass", "version": "latest"}]
        assert service["maxInstanceCount"] == SHARES_OF_SIX[name]
        assert service.get("minInstanceCount") == (
            None if name in ("transfer_events", "relay_outbox") else 1
        )
        assert service["maxInstanceRequestConcurrency"] == 8
        assert (service["availableCpu"], service["availableMemory"]) == ("1", "512Mi")
        assert service["timeoutSeconds"] == 60
        assert service["serviceAccountEmail"] == SETTINGS["SERVICE_ACCOUNT"]
        assert service["vpcConnector"].endswith("/connectors/functions-egress")
    # Private: only the scheduler's account may invoke the relay, and nobody anything else.
    assert set(full_deploy.api.invokers) == {"relay_outbox"}


@needs_gcloud
def test_http_functions_get_an_http_trigger_and_event_functions_their_topic(
    full_deploy: Deploy,
) -> None:
    """An event function is triggered by its topic, retried on failure (not dropped), and
    called by the trigger's account; an HTTP function has no event trigger."""
    for name, function in full_deploy.api.functions.items():
        if name == "transfer_events":
            trigger = function["eventTrigger"]
            assert trigger["eventType"] == "google.cloud.pubsub.topic.v1.messagePublished"
            assert trigger["pubsubTopic"] == "projects/acme-prod/topics/transfer-requests"
            assert trigger["retryPolicy"] == "RETRY_POLICY_RETRY"
            assert trigger["serviceAccountEmail"] == SETTINGS["SERVICE_ACCOUNT"]
        else:
            assert "eventTrigger" not in function, name


@needs_gcloud
def test_event_triggers_call_as_the_trigger_service_account(deploy: Deploy) -> None:
    """TRIGGER_SERVICE_ACCOUNT names the account Eventarc pushes as."""
    invoker = "pubsub-invoker@acme-prod.iam.gserviceaccount.com"

    result = deploy("transfer_events", TRIGGER_SERVICE_ACCOUNT=invoker)

    assert result.returncode == 0, result.stderr[-3000:]
    assert deploy.function("transfer_events")["eventTrigger"]["serviceAccountEmail"] == invoker


def test_an_event_function_without_a_topic_is_refused(deploy: Deploy) -> None:
    """A cloud_event entry point whose event_scope names no topic stops the deploy, naming it."""
    main = deploy.project / "main.py"
    main.write_text(main.read_text().replace('topic="transfer-requests"', "topic=TOPIC"))

    result = deploy("--dry-run")

    assert result.returncode == 2
    assert "transfer_events needs event_scope(..., topic='NAME')" in result.stderr
    assert deploy.api.received == []


@needs_gcloud
def test_no_password_and_no_request_leave_for_a_real_host(full_deploy: Deploy) -> None:
    """DB_PASS in the deployer's shell reaches no request and no output; gcloud called only
    the stand-in."""
    sent = b"".join(request.body for request in full_deploy.api.received)
    assert PASSWORD_IN_SHELL.encode() not in sent
    assert PASSWORD_IN_SHELL not in "".join(full_deploy.outputs)
    assert full_deploy.hosts_called() == {full_deploy.api.url}


@needs_gcloud
def test_the_upload_holds_exactly_the_runtime_files(full_deploy: Deploy) -> None:
    """The zip gcloud built holds main.py, requirements.txt, db/, service/, web/ and the OpenAPI
    document, nothing more."""
    expected = {
        path
        for path in full_deploy.tracked
        if path.split("/")[0] in RUNTIME_TOP_LEVEL or path in RUNTIME_DOCUMENTS
    }
    for name in full_deploy.api.functions:
        files = {
            entry for entry in full_deploy.uploaded_zip(name).namelist() if not entry.endswith("/")
        }
        assert files == expected
    assert "db/migrations/versions/0001_users.py" in expected
    assert not expected & set(LOCAL_CLUTTER)


@needs_gcloud
def test_the_uploaded_source_installs_migrates_and_serves(
    full_deploy: Deploy, postgres: PostgresServer, tmp_path: Path
) -> None:
    """Unpacked into a fresh folder with only its requirements.txt installed, the upload
    migrates an empty database and serves the api function."""
    source = tmp_path / "source"
    full_deploy.uploaded_zip("api").extractall(source)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r",
         str(source / "requirements.txt")],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    url = _empty_database(postgres, "uploaded")
    env = {
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "DATABASE_URL": url.render_as_string(hide_password=False),
    }
    migrated = subprocess.run(
        [str(python), "-m", "db", "upgrade"],
        cwd=source, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert migrated.returncode == 0, migrated.stderr

    port = free_port()
    log = tmp_path / "server.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            [str(venv / "bin" / "functions-framework"), "--target=api", f"--port={port}"],
            cwd=source, env=env, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for_http(f"{base}/healthz", server, log)
        ada = _call("POST", f"{base}/users", {"name": "Ada", "email": "ada@x.io", "balance": 50})
        bob = _call("POST", f"{base}/users", {"name": "Bob", "email": "bob@x.io"})
        transfer = {"from_user_id": ada[1]["id"], "to_user_id": bob[1]["id"], "amount": 20}
        assert ada[0] == bob[0] == 201
        assert _call("POST", f"{base}/transfers", transfer)[0] == 201
        assert _call("GET", f"{base}/users/{bob[1]['id']}")[1]["balance"] == 20
        assert _call("GET", f"{base}/healthz") == (200, {"status": "ok", "database": "ok"})
        assert _call("GET", f"{base}/openapi.json")[1]["openapi"] == "3.1.0"
    finally:
        server.terminate()
        server.wait(timeout=30)


def _empty_database(postgres: PostgresServer, name: str) -> URL:
    admin = create_engine(postgres.url(), poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    admin.dispose()
    return postgres.url(name)


def _wait_for_http(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            assert time.monotonic() < deadline, "the uploaded source did not start serving"
            time.sleep(0.2)


def _call(method: str, url: str, body: object = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, json.loads(response.read() or b"null")


@needs_gcloud
def test_redeploying_some_functions_keeps_every_function_within_the_budget(deploy: Deploy) -> None:
    """Deploying api alone after a full deploy gives it the same share, not the whole budget."""
    assert deploy(FUNCTIONS=EVERY).returncode == 0

    result = deploy("api", FUNCTIONS=EVERY)

    assert result.returncode == 0, result.stderr[-3000:]
    assert _limits(deploy) == SHARES_OF_SIX
    assert sum(_limits(deploy).values()) * 8 <= 100 - 10


@needs_gcloud
def test_moving_from_six_functions_to_the_default_is_one_command(deploy: Deploy) -> None:
    """After a deployment of all six, the default deploy is refused, naming the functions that
    hold the budget and the remedy, --prune; with it they are deleted and the default gets the
    whole budget."""
    assert deploy(FUNCTIONS=EVERY).returncode == 0

    refused = deploy()
    pruned = deploy("--prune")

    assert refused.returncode == 2
    assert "users in europe-west1 (2 instances x 8)" in refused.stderr
    assert "add --prune" in refused.stderr
    assert pruned.returncode == 0, pruned.stderr[-3000:]
    assert _limits(deploy) == {"api": 8, "relay_outbox": 1, "transfer_events": 2}
    deleted = [r.path.rsplit("/", 1)[1] for r in deploy.api.received if r.method == "DELETE"]
    assert sorted(deleted) == ["health", "items", "transfers", "users"]


@needs_gcloud
def test_a_resource_function_named_joins_the_deployment(deploy: Deploy) -> None:
    """./deploy.sh users deploys users beside the default functions' shares: api keeps at
    least 5 instances, and the three together stay within the budget."""
    result = deploy("users")

    assert result.returncode == 0, result.stderr[-3000:]
    assert _limits(deploy) == {"users": 4}
    assert "  api              --max-instances=4 x 8 = 32 connections" in result.stdout
    assert "  total            88 of 90 connections" in result.stdout


@needs_gcloud
def test_the_functions_setting_shares_the_budget_between_fewer_functions(deploy: Deploy) -> None:
    """FUNCTIONS=api makes api the only function on the instance: (100 - 10) / 8 = 11."""
    result = deploy(FUNCTIONS="api")

    assert result.returncode == 0, result.stderr[-3000:]
    assert _limits(deploy) == {"api": 11}


@needs_gcloud
def test_functions_already_deployed_on_the_instance_count_against_the_budget(
    deploy: Deploy,
) -> None:
    """A function left deployed on the same instance with a large limit stops the deploy,
    named; one on another instance is not counted."""
    resource = "projects/acme-prod/locations/europe-west1/functions/"
    for name, instance in (("reports", "acme-prod:europe-west1:main"), ("other", "x:y:z")):
        deploy.api.functions[name] = {
            "name": resource + name,
            "environment": "GEN_2",
            "serviceConfig": {
                "maxInstanceCount": 11,
                "maxInstanceRequestConcurrency": 8,
                "environmentVariables": {"INSTANCE_CONNECTION_NAME": instance, "DB_POOL_SIZE": "8"},
            },
        }

    result = deploy("api", FUNCTIONS="api")

    assert result.returncode == 2
    complaint = "\n".join(
        line for line in result.stderr.splitlines() if line.startswith("deploy.sh:")
    )
    assert "reports in europe-west1 (11 instances x 8)" in complaint
    assert "add --prune" in complaint
    assert "other" not in complaint
    assert deploy.writes() == []


@needs_gcloud
def test_switching_to_iam_authentication_removes_the_password_secret(deploy: Deploy) -> None:
    """A function deployed with DB_PASS from Secret Manager loses the secret under IAM auth."""
    assert deploy("api").returncode == 0
    assert deploy.function("api")["serviceConfig"]["secretVolumes"]

    result = deploy("api", DB_IAM_AUTH="true", DB_PASS_SECRET=None)

    assert result.returncode == 0, result.stderr[-3000:]
    service = deploy.function("api")["serviceConfig"]
    assert "secretVolumes" not in service
    assert "secretEnvironmentVariables" not in service
    assert service["environmentVariables"]["DB_IAM_AUTH"] == "true"
    assert "DB_PASS_FILE" not in service["environmentVariables"]


@needs_gcloud
@pytest.mark.parametrize(
    ("setting", "value", "field", "sent"),
    [
        ("BUILD_SERVICE_ACCOUNT", "builder@acme-prod.iam.gserviceaccount.com",
         ("buildConfig", "serviceAccount"),
         "projects/acme-prod/serviceAccounts/builder@acme-prod.iam.gserviceaccount.com"),
        ("MIN_INSTANCES", "2", ("serviceConfig", "minInstanceCount"), 2),
        ("VPC_CONNECTOR", "functions-egress", ("serviceConfig", "vpcConnector"),
         "projects/acme-prod/locations/europe-west1/connectors/functions-egress"),
    ],
)  # fmt: skip
def test_an_optional_setting_taken_out_is_taken_off_the_function(
    deploy: Deploy, setting: str, value: str, field: tuple[str, str], sent: object
) -> None:
    """Deployed with the setting, then without it: the function no longer has it."""
    section, key = field
    assert deploy("items", **{setting: value}).returncode == 0
    assert deploy.function("items")[section][key] == sent

    result = deploy("items")

    assert result.returncode == 0, result.stderr[-3000:]
    assert key not in deploy.function("items")[section]


@needs_gcloud
def test_a_vpc_connector_taken_out_of_the_settings_is_removed(deploy: Deploy) -> None:
    """Redeploying without VPC_CONNECTOR detaches the connector the function had."""
    assert deploy("api", VPC_CONNECTOR="functions-egress").returncode == 0
    assert deploy.function("api")["serviceConfig"]["vpcConnector"]

    assert deploy("api").returncode == 0

    assert "vpcConnector" not in deploy.function("api")["serviceConfig"]


@needs_gcloud
def test_allow_unauthenticated_grants_everyone_the_invoker_role(deploy: Deploy) -> None:
    """--allow-unauthenticated binds allUsers to run.invoker; the default binds nobody."""
    assert deploy("health").returncode == 0
    assert deploy.api.invokers == {}

    assert deploy("--allow-unauthenticated", "health").returncode == 0

    assert deploy.api.invokers["health"] == [{"members": ["allUsers"], "role": "roles/run.invoker"}]


def test_dry_run_prints_every_command_and_sends_nothing(deploy: Deploy) -> None:
    """--dry-run runs no command: the stand-in receives nothing; each command is printed."""
    result = deploy("--dry-run", "--migrate")

    assert result.returncode == 0, result.stderr
    assert deploy.api.received == []
    printed = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert "gcloud functions list" in printed[0]
    assert "gcloud secrets versions access latest --secret=db-owner-pass" in printed[1]
    assert printed[2].endswith("-m db upgrade")
    assert [line.split()[4] for line in printed[3:] if " deploy " in line] == DEFAULT
    assert "  api              --max-instances=8 x 8 = 64 connections" in result.stdout
    assert "  relay_outbox     --max-instances=1 x 8 = 8 connections" in result.stdout
    assert "  transfer_events  --max-instances=2 x 8 = 16 connections" in result.stdout
    assert "  total            88 of 90 connections" in result.stdout
    assert "skipped in a dry run: reading which functions are already deployed" in result.stdout


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"PROJECT_ID": None}, "PROJECT_ID is not set"),
        ({"REGION": ""}, "REGION is not set"),
        ({"SERVICE_ACCOUNT": None}, "SERVICE_ACCOUNT is not set"),
        ({"DB_PASS_SECRET": None}, "DB_PASS_SECRET is not set"),
        ({"DB_IAM_AUTH": "true"}, "DB_PASS_SECRET must not be set"),
        ({"INSTANCE_CONNECTION_NAME": "main"}, "INSTANCE_CONNECTION_NAME must look like"),
        ({"SERVICE_ACCOUNT": "functions"}, "SERVICE_ACCOUNT must be a service account email"),
        ({"BUILD_SERVICE_ACCOUNT": "x"}, "BUILD_SERVICE_ACCOUNT must be a service account email"),
        ({"DB_IP_TYPE": "INTERNAL"}, "DB_IP_TYPE must be"),
        ({"DB_IP_TYPE": "PRIVATE"}, "DB_IP_TYPE=PRIVATE needs VPC_CONNECTOR"),
        ({"DB_IP_TYPE": "PSC"}, "DB_IP_TYPE=PSC needs VPC_CONNECTOR"),
        ({"CONCURRENCY": "0"}, "CONCURRENCY must be a whole number"),
        ({"CPU": "0.5"}, "CONCURRENCY above 1 needs CPU of at least 1"),
        ({"DB_MAX_CONNECTIONS": "20"}, "the connection budget allows no instance"),
        ({"REGION": "us-central1"}, "every round trip to the database would leave the region"),
        ({"ALLOW_CROSS_REGION": "yes"}, "ALLOW_CROSS_REGION must be true or false"),
        ({"RUNTIME": "python310"}, "RUNTIME must be one of python311, python312"),
        ({"MIN_INSTANCES": "-1"}, "MIN_INSTANCES must be a whole number"),
        ({"MIN_INSTANCES": "10"}, "MIN_INSTANCES=10 is more than the budget gives api (8)"),
        ({"EVENT_INSTANCES": "0"}, "EVENT_INSTANCES must be a whole number of at least 1"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL must be"),
        ({"FUNCTIONS": "api nope"}, "FUNCTIONS names 'nope', which is not an entry point"),
        ({"FUNCTIONS": "api,api"}, "FUNCTIONS names 'api' twice"),
        ({"DATABASE_URL_SECRET": "db-url"}, "INSTANCE_CONNECTION_NAME has no use with"),
        ({"INSTANCE_CONNECTION_NAME": None}, "INSTANCE_CONNECTION_NAME is not set"),
        ({"DB_OWNER": None}, "--migrate needs DB_OWNER"),
        ({"DB_OWNER": "app"}, "DB_OWNER must not be DB_USER"),
        ({"DB_OWNER_PASS_SECRET": None}, "--migrate needs DB_OWNER_PASS_SECRET"),
        ({"DB_OWNER_IAM_AUTH": "true"}, "DB_OWNER_PASS_SECRET must not be set"),
        ({"DATABASE_URL_SECRET": "db-url", "INSTANCE_CONNECTION_NAME": None, "DB_NAME": None,
          "DB_USER": None, "DB_PASS_SECRET": None, "DB_OWNER": None,
          "DB_OWNER_PASS_SECRET": None}, "--migrate needs MIGRATION_DATABASE_URL_SECRET"),
    ],
)  # fmt: skip
def test_bad_settings_stop_before_any_request(
    deploy: Deploy, settings: dict[str, str | None], message: str
) -> None:
    """A missing or malformed setting exits 2 with a line naming it, before gcloud is called."""
    result = deploy("--migrate", **settings)

    assert result.returncode == 2
    assert message in result.stderr
    assert deploy.api.received == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("nope",), "unknown function 'nope'; main.py has: "),
        (("api", "api"), "api is named twice"),
        (("--force",), "unknown option --force"),
        (("users",), "users is not in FUNCTIONS"),
    ],
)
def test_bad_arguments_stop_before_any_request(
    deploy: Deploy, args: tuple[str, ...], message: str
) -> None:
    """An unknown function or option, a function named twice or outside FUNCTIONS exits 2."""
    result = deploy(*args, FUNCTIONS="api health")

    assert result.returncode == 2
    assert message in result.stderr
    assert deploy.api.received == []


def test_scripts_are_shellcheck_clean() -> None:
    """deploy.sh and the helper scripts pass shellcheck."""
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (requirements-dev.txt installs it)")
    scripts = [ROOT / "deploy.sh", ROOT / ".ci" / "run", *sorted((ROOT / "scripts").glob("*.sh"))]

    result = subprocess.run(
        [shellcheck, *map(str, scripts)], capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 0, result.stdout


POOLER = {
    "DATABASE_URL_SECRET": "db-url",
    "INSTANCE_CONNECTION_NAME": None,
    "DB_NAME": None,
    "DB_USER": None,
    "DB_PASS_SECRET": None,
    "DB_OWNER": None,
    "DB_OWNER_PASS_SECRET": None,
}


@needs_gcloud
def test_a_database_url_from_secret_manager_replaces_the_connector_settings(
    deploy: Deploy,
) -> None:
    """With DATABASE_URL_SECRET (a pooler's address), the URL arrives as a secret, none of the
    connector's settings do, and the budget is the pooler's client limit."""
    result = deploy("api", FUNCTIONS="api", DB_MAX_CONNECTIONS="1000", **POOLER)

    assert result.returncode == 0, result.stderr[-3000:]
    service = deploy.function("api")["serviceConfig"]
    [secret] = service["secretEnvironmentVariables"]
    assert (secret["key"], secret["secret"], secret["version"]) == (
        "DATABASE_URL",
        "db-url",
        "latest",
    )
    assert set(service["environmentVariables"]) == {
        "DB_POOL_SIZE", "DB_MAX_OVERFLOW", "THREADS", "LOG_LEVEL", "GOOGLE_CLOUD_PROJECT",
    }  # fmt: skip
    assert service["maxInstanceCount"] == (1000 - 10) // 8


@needs_gcloud
def test_migrate_reads_the_database_url_from_secret_manager(
    deploy: Deploy, postgres: PostgresServer, pgbouncer: PgBouncer
) -> None:
    """--migrate with DATABASE_URL_SECRET: the real gcloud reads the owner's URL, here through
    PgBouncer, and the migration runs through it before the deploy; the functions get only
    their own URL's secret."""
    url = _empty_database(postgres, "pooled").set(port=pgbouncer.port)
    deploy.api.secrets["db-owner-url"] = url.render_as_string(hide_password=False)
    deploy.api.secrets["db-url"] = "postgresql+pg8000://functions:never-read@pooler:6432/pooled"

    result = deploy(
        "--migrate", "health", FUNCTIONS="health",
        MIGRATION_DATABASE_URL_SECRET="db-owner-url", **POOLER,  # noqa: S106  # a secret's name
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-3000:]
    [secret] = deploy.function("health")["serviceConfig"]["secretEnvironmentVariables"]
    assert (secret["key"], secret["secret"]) == ("DATABASE_URL", "db-url")
    migrated = create_engine(postgres.url("pooled"), poolclass=NullPool)
    assert {"users", "items", "transfers"} <= set(inspect(migrated).get_table_names())
    migrated.dispose()
    assert str(url.password) not in result.stdout + result.stderr


def test_holdings_count_only_the_functions_on_the_same_database() -> None:
    """What each deployed function may hold: its most instances times its pool and overflow,
    for those reaching the same instance (or DATABASE_URL secret) only."""

    def deployed(name: str, instance: str, **config: object) -> dict[str, object]:
        env = {"INSTANCE_CONNECTION_NAME": instance, "DB_POOL_SIZE": "4", "DB_MAX_OVERFLOW": "1"}
        return {
            "name": f"projects/p/locations/europe-west1/functions/{name}",
            "serviceConfig": {"environmentVariables": env, "maxInstanceCount": 3, **config},
        }

    listing = [deployed("api", "p:r:main"), deployed("other", "p:r:elsewhere")]

    assert holdings(listing, "instance:p:r:main") == [("api", "europe-west1", 3, 5)]


def test_an_empty_setting_counts_as_unset() -> None:
    """As the shell's ${NAME:-default}: CONCURRENCY="" takes the default, REGION="" is missing."""
    settings = Settings(
        {**SETTINGS, "CONCURRENCY": "", "REGION": ""}, [EntryPoint("api")], Options()
    )

    assert settings.get("CONCURRENCY") == "8"
    assert "REGION is not set" in settings.problems


def test_a_region_other_than_the_instances_is_deployed_only_when_meant(deploy: Deploy) -> None:
    """ALLOW_CROSS_REGION=true lets REGION differ from the instance's region."""
    result = deploy("--dry-run", REGION="us-central1", ALLOW_CROSS_REGION="true")

    assert result.returncode == 0, result.stderr
    assert "--region=us-central1" in result.stdout


@pytest.mark.parametrize(
    ("fleet", "slots", "expected"),
    [
        (["api", "transfer_events"], 11, {"api": 9, "transfer_events": 2}),
        (["api"], 11, {"api": 11}),
        (["transfer_events"], 11, {"transfer_events": 11}),
        (["api", "users", "transfer_events"], 11, {"api": 5, "users": 4, "transfer_events": 2}),
        (["api", "transfer_events"], 3, {"api": 2, "transfer_events": 1}),
        (["api", "transfer_events"], 1, {"api": 1, "transfer_events": 0}),
    ],
)
def test_the_budget_is_shared_by_what_each_function_needs(
    fleet: list[str], slots: int, expected: dict[str, int]
) -> None:
    """An event function gets EVENT_INSTANCES (2) or an even share if less; the HTTP functions
    split the rest, the first taking what does not divide."""
    topics = {"transfer_events": "transfer-requests"}

    assert share(fleet, topics, slots, 2) == expected
