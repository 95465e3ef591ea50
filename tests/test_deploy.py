"""deploy.sh, run against a stand-in gcloud (and python, for --migrate) that records its arguments.

Google's CLI cannot reach Google here, so the stand-ins are the network edge: they log each
call as a JSON line and answer `gcloud secrets versions access` with a made-up password.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SECRET_VALUE = "pw-from-secret-manager-91d2"
SETTINGS = {
    "PROJECT_ID": "acme-prod",
    "REGION": "europe-west1",
    "INSTANCE_CONNECTION_NAME": "acme-prod:europe-west1:main",
    "DB_NAME": "app",
    "DB_USER": "app",
    "SERVICE_ACCOUNT": "functions@acme-prod.iam.gserviceaccount.com",
    "DB_PASS_SECRET": "db-pass",
}
STAND_IN = f"""#!{sys.executable}
import json, os, sys
name = os.path.basename(sys.argv[0])
with open(os.environ["CALLS_LOG"], "a") as log:
    log.write(json.dumps({{"program": name, "args": sys.argv[1:],
                          "DB_PASS": os.environ.get("DB_PASS")}}) + "\\n")
if name == "gcloud" and sys.argv[1:4] == ["secrets", "versions", "access"]:
    print("{SECRET_VALUE}")
"""


class Deploy:
    """Runs deploy.sh with the stand-ins first on PATH and reads what they recorded."""

    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.bin.mkdir()
        self.log = root / "calls.jsonl"
        for program in ("gcloud", "python"):
            stand_in = self.bin / program
            stand_in.write_text(STAND_IN)
            stand_in.chmod(0o755)

    def __call__(self, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            "CALLS_LOG": str(self.log),
            "PYTHON": str(self.bin / "python"),
            **{k: v for k, v in {**SETTINGS, **settings}.items() if v is not None},
        }
        return subprocess.run(
            ["bash", str(ROOT / "deploy.sh"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def calls(self) -> list[dict[str, object]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def deploys(self) -> list[list[str]]:
        return [
            list(call["args"])  # type: ignore[call-overload]
            for call in self.calls()
            if call["program"] == "gcloud" and call["args"][:2] == ["functions", "deploy"]
        ]


@pytest.fixture
def deploy(tmp_path: Path) -> Deploy:
    """deploy.sh with stand-in gcloud and python."""
    return Deploy(tmp_path)


def flags(args: list[str]) -> dict[str, str]:
    """--name=value flags of one call as a dict (bare flags map to "")."""
    return dict([*arg.split("=", 1), ""][:2] for arg in args if arg.startswith("--"))


def test_deploys_every_function_with_the_expected_flags(deploy: Deploy) -> None:
    """By default all five functions are deployed as 2nd gen HTTP functions, privately."""
    result = deploy()

    assert result.returncode == 0, result.stderr
    deployed = deploy.deploys()
    assert [args[2] for args in deployed] == ["users", "items", "transfers", "health", "api"]
    for args in deployed:
        given = flags(args)
        assert given["--gen2"] == given["--trigger-http"] == given["--quiet"] == ""
        assert given["--no-allow-unauthenticated"] == ""
        assert "--allow-unauthenticated" not in given
        assert given["--entry-point"] == args[2]
        assert given["--source"] == "."
        assert given["--runtime"] == "python312"
        assert (given["--project"], given["--region"]) == ("acme-prod", "europe-west1")
        assert given["--service-account"] == SETTINGS["SERVICE_ACCOUNT"]
        assert (given["--concurrency"], given["--cpu"], given["--memory"]) == ("8", "1", "512Mi")
        assert given["--set-secrets"] == "DB_PASS=db-pass:latest"
        env_vars = dict(pair.split("=", 1) for pair in given["--set-env-vars"].split(","))
        assert env_vars["THREADS"] == env_vars["DB_POOL_SIZE"] == given["--concurrency"]
        assert env_vars["INSTANCE_CONNECTION_NAME"] == SETTINGS["INSTANCE_CONNECTION_NAME"]
        assert "DB_PASS" not in env_vars


def test_max_instances_comes_from_the_connection_budget(deploy: Deploy) -> None:
    """(max_connections - reserve) / (pool + overflow) / functions, printed with its arithmetic."""
    result = deploy(DB_MAX_CONNECTIONS="200", DB_RESERVED_CONNECTIONS="20", DB_MAX_OVERFLOW="2")

    assert result.returncode == 0, result.stderr
    assert {flags(args)["--max-instances"] for args in deploy.deploys()} == {"3"}  # 180 / 10 / 5
    assert "= --max-instances=3 per function" in result.stdout


def test_only_the_chosen_function_is_deployed(deploy: Deploy) -> None:
    """Naming api deploys api alone, with the whole budget: 90 / 8 = 11 instances."""
    result = deploy("api")

    assert result.returncode == 0, result.stderr
    assert [args[2] for args in deploy.deploys()] == ["api"]
    assert flags(deploy.deploys()[0])["--max-instances"] == "11"


def test_allow_unauthenticated_is_opt_in(deploy: Deploy) -> None:
    """--allow-unauthenticated replaces --no-allow-unauthenticated."""
    assert deploy("--allow-unauthenticated", "health").returncode == 0
    given = flags(deploy.deploys()[0])
    assert "--allow-unauthenticated" in given
    assert "--no-allow-unauthenticated" not in given


def test_iam_authentication_deploys_no_password_at_all(deploy: Deploy) -> None:
    """With DB_IAM_AUTH=true there is no secret and DB_IAM_AUTH=true reaches the function."""
    result = deploy("api", DB_IAM_AUTH="true", DB_PASS_SECRET=None)

    assert result.returncode == 0, result.stderr
    given = flags(deploy.deploys()[0])
    assert "--set-secrets" not in given
    assert "DB_IAM_AUTH=true" in given["--set-env-vars"]


def test_a_password_in_the_environment_is_never_passed_on(deploy: Deploy) -> None:
    """DB_PASS set in the deployer's shell appears in no argument and no output."""
    result = deploy(DB_PASS="hunter2-from-shell")  # noqa: S106  # a value to look for

    assert result.returncode == 0, result.stderr
    assert "hunter2-from-shell" not in json.dumps(deploy.calls()) + result.stdout + result.stderr


def test_dry_run_prints_every_command_and_runs_none(deploy: Deploy) -> None:
    """--dry-run calls nothing and prints each gcloud command, migration included."""
    result = deploy("--dry-run", "--migrate")

    assert result.returncode == 0, result.stderr
    assert deploy.calls() == []
    printed = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert len(printed) == 2 + 5
    assert "gcloud secrets versions access latest --secret=db-pass" in printed[0]
    assert printed[1].endswith("-m db upgrade")
    assert all("gcloud functions deploy" in line for line in printed[2:])


def test_migration_runs_first_with_the_password_from_secret_manager(deploy: Deploy) -> None:
    """--migrate fetches the secret, hands it only to `python -m db upgrade`, then deploys."""
    result = deploy("--migrate", "api")

    assert result.returncode == 0, result.stderr
    calls = deploy.calls()
    assert calls[0]["args"][:3] == ["secrets", "versions", "access"]
    assert calls[1] == {
        "program": "python",
        "args": ["-m", "db", "upgrade"],
        "DB_PASS": SECRET_VALUE,
    }
    assert calls[2]["args"][:2] == ["functions", "deploy"]
    assert calls[2]["DB_PASS"] is None
    assert SECRET_VALUE not in result.stdout + result.stderr


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
        ({"DB_IP_TYPE": "INTERNAL"}, "DB_IP_TYPE must be"),
        ({"CONCURRENCY": "0"}, "CONCURRENCY must be a whole number"),
        ({"CPU": "0.5"}, "CONCURRENCY above 1 needs CPU of at least 1"),
        ({"DB_MAX_CONNECTIONS": "20"}, "the connection budget allows no instance"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL must be"),
    ],
)  # fmt: skip
def test_bad_settings_stop_before_any_call(
    deploy: Deploy, settings: dict[str, str | None], message: str
) -> None:
    """A missing or malformed setting exits 2 with a line naming it, before gcloud runs."""
    result = deploy("--migrate", **settings)

    assert result.returncode == 2
    assert message in result.stderr
    assert deploy.calls() == []


@pytest.mark.parametrize("args", [("nope",), ("api", "api"), ("--force",)])
def test_bad_arguments_stop_before_any_call(deploy: Deploy, args: tuple[str, ...]) -> None:
    """An unknown function or option, or a function named twice, exits 2 before gcloud runs."""
    result = deploy(*args)

    assert result.returncode == 2
    assert result.stderr.startswith("deploy.sh: ")
    assert deploy.calls() == []


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
