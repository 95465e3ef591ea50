"""Running deploy.sh as a deployer would: in a copy of the project, with the real gcloud CLI
configured to reach the stand-in of Google's APIs (``tests/google/functions.py``) and nothing else.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.copies import copy_of_the_project
from tests.google.functions import FunctionsApi

ROOT = Path(__file__).resolve().parent.parent

GCLOUD = shutil.which("gcloud")
needs_gcloud = pytest.mark.skipif(
    GCLOUD is None, reason="the Google Cloud CLI (gcloud) is not installed here; CI has it"
)
PASSWORD_IN_SHELL = "hunter2-from-the-deployers-shell"
SECRET_IN_SECRET_MANAGER = "the-password-in-secret-manager"
OWNER_SECRET_IN_SECRET_MANAGER = "the-owners-password-in-secret-manager"
SETTINGS = {
    "PROJECT_ID": "acme-prod",
    "REGION": "europe-west1",
    "INSTANCE_CONNECTION_NAME": "acme-prod:europe-west1:main",
    "DB_NAME": "app",
    "DB_USER": "app",
    "SERVICE_ACCOUNT": "functions@acme-prod.iam.gserviceaccount.com",
    "DB_PASS_SECRET": "db-pass",
    "DB_OWNER": "owner",  # for --migrate: the schema's owner
    "DB_OWNER_PASS_SECRET": "db-owner-pass",
}
RUNTIME_TOP_LEVEL = ("main.py", "requirements.txt", "db", "service", "web")
RUNTIME_DOCUMENTS = ("docs/openapi.yaml",)  # served by the api function
# Files a working copy holds that must never be uploaded.
LOCAL_CLUTTER = [".venv/lib/python3.11/site.py", ".venv-3.13/lib/python3.13/site.py",
                 "__pycache__/main.cpython-311.pyc", "db/__pycache__/engine.cpython-311.pyc",
                 "web/__pycache__/http.cpython-311.pyc",
                 "app.db", "app.db-wal", "db/local.db", ".env", "notes.txt", ".git/config",
                 ".pytest_cache/v/x", ".mypy_cache/x.json", ".ruff_cache/x",
                 "bench/results/x"]  # fmt: skip


def entry_points() -> list[str]:
    """The functions main.py registers with functions-framework (HTTP and event functions), in
    the order it defines them."""
    from functions_framework import _function_registry, create_app

    create_app("api", str(ROOT / "main.py"))  # type: ignore[no-untyped-call]
    module = sys.modules["main"]
    return [
        name
        for name, value in vars(module).items()
        if _function_registry.REGISTRY_MAP.get(name) in ("http", "cloudevent") and callable(value)
    ]


class Deploy:
    """Runs a project copy's deploy.sh with the real gcloud, configured for the stand-in."""

    def __init__(self, project: Path, tracked: list[str], api: FunctionsApi, home: Path) -> None:
        self.project = project
        self.tracked = tracked
        self.api = api
        token = home / "access-token"
        token.write_text("stand-in-access-token\n")
        self.gcloud_env = api.configure_gcloud(home / "gcloud", token)
        self.outputs: list[str] = []

    def __call__(self, *args: str, **settings: str | None) -> subprocess.CompletedProcess[str]:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDSDK_")}
        env = {
            **inherited,
            **self.gcloud_env,
            "CLOUDSDK_CORE_LOG_HTTP": "true",  # every request gcloud makes, to check its host
            "PYTHON": sys.executable,
            "DB_PASS": PASSWORD_IN_SHELL,
        }
        for name, value in {**SETTINGS, **settings}.items():
            env.pop(name, None)
            if value is not None:
                env[name] = value
        result = subprocess.run(
            ["bash", str(self.project / "deploy.sh"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        self.outputs.append(result.stdout + result.stderr)
        return result

    def hosts_called(self) -> set[str]:
        """The base of every URL gcloud requested, from its --log-http output."""
        return {
            "/".join(line.split()[1].split("/")[:3])
            for output in self.outputs
            for line in output.splitlines()
            if line.startswith("uri: ")
        }

    def function(self, name: str) -> dict[str, Any]:
        return self.api.functions[name]

    def writes(self) -> list[str]:
        """The functions created and patched, in order, as 'create NAME' or 'patch NAME'."""
        done = []
        for request in self.api.received:
            if request.method == "POST" and "functionId" in request.query:
                done.append(f"create {request.query['functionId'][0]}")
            elif request.method == "PATCH":
                done.append(f"patch {request.path.rsplit('/', 1)[1]}")
        return done

    def uploaded_zip(self, function: str) -> zipfile.ZipFile:
        source = self.function(function)["buildConfig"]["source"]["storageSource"]
        return zipfile.ZipFile(io.BytesIO(self.api.uploads[source["object"].removesuffix(".zip")]))


def start_deploy(folder: Path) -> Deploy:
    """A stand-in project with no function, and deploy.sh in a fresh copy of this one."""
    api = FunctionsApi(
        secrets={
            "db-pass": SECRET_IN_SECRET_MANAGER,
            "db-owner-pass": OWNER_SECRET_IN_SECRET_MANAGER,
        }
    ).start()
    tracked = copy_of_the_project(folder / "project", clutter=LOCAL_CLUTTER)
    (folder / "home").mkdir()
    return Deploy(folder / "project", tracked, api, folder / "home")
