"""The README's "Add your own function" guide, followed to the letter in a copy of the project.

Each code block of the guide is marked with what to do with it: ``create PATH`` writes the
file, ``append PATH`` adds to its end, ``patch PATH`` applies a diff with ``git apply``, as a
reader would, and ``run`` runs each command line in the copy. The last one runs the copy's own
checks and tests.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CONFIG_VARIABLES, ROOT
from tests.copies import copy_of_the_project

STEP = re.compile(r"<!-- guide: (\w+)(?: (\S+))? -->\n```\w*\n(.*?)```", re.DOTALL)


def guide_steps() -> list[tuple[str, str | None, str]]:
    """(action, path, block) for each marked block of the README's guide, in order."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Add your own function")
    guide = readme[start : readme.index("\n## ", start + 1)]
    return [(m[1], m[2], m[3]) for m in STEP.finditer(guide)]


def test_the_guide_marks_every_step() -> None:
    """The guide's blocks are all marked: none is left out of the walk below."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Add your own function")
    guide = readme[start : readme.index("\n## ", start + 1)]
    blocks = guide.count("\n```") // 2
    assert len(guide_steps()) == blocks - 1  # the deploy command is the one not run


def test_following_the_guide_gives_a_project_that_passes_its_checks(tmp_path: Path) -> None:
    """Every step applied to a copy, the copy's migration, ruff, mypy and tests all pass."""
    project = tmp_path / "project"
    copy_of_the_project(project)
    (project / ".venv").symlink_to(ROOT / ".venv")
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARIABLES}
    env["PYTHON"] = sys.executable  # the copy's checks on this Python: the suite runs on both

    for action, path, block in guide_steps():
        target = project / path if path else project
        if action == "create":
            assert not target.exists(), path
            target.write_text(block)
        elif action == "append":
            target.write_text(target.read_text().rstrip("\n") + "\n\n\n" + block)
        elif action == "patch":
            assert block.startswith(f"--- a/{path}\n+++ b/{path}\n"), path
            diff = tmp_path / "step.diff"
            diff.write_text(block)
            applied = subprocess.run(
                ["git", "apply", "--verbose", str(diff)], cwd=project, capture_output=True,
                text=True, timeout=60, check=False,
            )  # fmt: skip
            assert applied.returncode == 0, f"{path}:\n{applied.stderr}"
        elif action == "run":
            for command in filter(None, block.splitlines()):
                result = subprocess.run(
                    ["bash", "-c", command], cwd=project, env=env, capture_output=True,
                    text=True, timeout=600, check=False,
                )  # fmt: skip
                assert result.returncode == 0, f"{command}\n{result.stdout[-4000:]}"
        else:
            pytest.fail(f"unknown guide action {action}")

    assert (project / "db" / "migrations" / "versions" / "0005_notes.py").exists()
