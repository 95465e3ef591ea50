"""A copy of this project in a folder of its own, as a user who copies it would have it."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def copy_of_the_project(destination: Path, clutter: Iterable[str] = ()) -> list[str]:
    """Copy the files of this checkout that git does not ignore, plus ``clutter``; those copied."""
    tracked = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=False,
        timeout=30,
    ).stdout.decode()
    paths = [path for path in tracked.split("\0") if path]
    if not paths:  # not a git checkout: everything but local state
        paths = [
            str(path.relative_to(ROOT))
            for path in ROOT.rglob("*")
            if path.is_file()
            and not {".git", ".venv", "__pycache__"} & set(path.parts)
            and not any(part.startswith(".venv-") for part in path.parts)
        ]
    for path in paths:
        target = destination / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, target)
    for path in clutter:
        (destination / path).parent.mkdir(parents=True, exist_ok=True)
        (destination / path).write_text("local only\n")
    return paths
