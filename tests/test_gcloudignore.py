""".gcloudignore uploads what runs in production and nothing else (gitignore rules, as gcloud)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pathspec
import pytest

from tests.conftest import ROOT

RUNTIME = ["main.py", "requirements.txt", "db/engine.py", "db/migrations/env.py",
           "db/migrations/script.py.mako", "db/migrations/versions/0001_users.py",
           "service/users.py", "web/http.py"]  # fmt: skip
EXCLUDED = ["tests/test_users.py", "tests/scenarios/probe.py", ".venv/lib/site.py", "venv/bin/x",
            "app.db", "app.db-wal", "db/local.db", ".git/config", "__pycache__/main.pyc",
            "db/__pycache__/engine.cpython-311.pyc", ".pytest_cache/v/x", ".mypy_cache/x.json",
            ".ruff_cache/x", ".hypothesis/x", "bench/run.py", "scripts/test.sh", ".ci/run",
            "README.md", "deploy.sh", "pyproject.toml", "requirements-dev.txt", "openapi.yaml",
            ".gitignore", ".gcloudignore", ".env", "notes.txt"]  # fmt: skip


def uploaded(paths: list[str]) -> set[str]:
    """The paths gcloud would upload, by the repository's .gcloudignore."""
    spec = pathspec.GitIgnoreSpec.from_lines((ROOT / ".gcloudignore").read_text().splitlines())
    return {path for path in paths if not spec.match_file(path)}


def test_runtime_files_are_uploaded() -> None:
    """main.py, requirements.txt and the db, service and web packages are uploaded."""
    assert uploaded(RUNTIME) == set(RUNTIME)


@pytest.mark.parametrize("path", EXCLUDED)
def test_everything_else_stays_behind(path: str) -> None:
    """Tests, virtual environments, local databases, caches, git data and tooling stay out."""
    assert uploaded([path]) == set()


def test_every_tracked_runtime_file_is_uploaded_and_nothing_more() -> None:
    """Of the files git tracks, exactly main.py, requirements.txt and db/, service/, web/ go up."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
    ).stdout.splitlines()
    if not tracked:
        pytest.skip("not a git checkout")
    runtime = {
        path
        for path in tracked
        if path in ("main.py", "requirements.txt")
        or Path(path).parts[0] in ("db", "service", "web")
    }
    assert uploaded(tracked) == runtime
