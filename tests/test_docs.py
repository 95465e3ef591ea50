"""The project's documents point only at files of the project, and those exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.copies import copy_of_the_project

LINK = re.compile(r"\]\(([^)\s]+)\)")
CLIMB = re.compile(r"(?<![\w.])(?:\.\./)+[\w.-]+(?:/[\w.-]+)*")


def test_no_file_refers_to_anything_outside_the_repository(tmp_path: Path) -> None:
    """A relative path that climbs up a folder, in any file, ends at a file of the project."""
    for path in copy_of_the_project(tmp_path):
        if Path(path).suffix in (".md", ".py", ".sh", ".yaml", ".toml", ".txt", ".mako", ""):
            text = (ROOT / path).read_text(errors="replace")
            for found in CLIMB.findall(text):
                resolved = ((ROOT / path).parent / found).resolve()
                assert resolved.is_relative_to(ROOT), (path, found)
                assert resolved.exists(), (path, found)


@pytest.mark.parametrize("document", [*sorted(p.name for p in ROOT.glob("*.md")), "docs", "bench"])
def test_every_relative_link_in_the_documents_reaches_a_file(document: str) -> None:
    """Each Markdown link that is not a URL names a file or folder inside the project."""
    paths = (
        [ROOT / document] if document.endswith(".md") else sorted((ROOT / document).glob("*.md"))
    )
    for markdown in paths:
        for target in LINK.findall(markdown.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            resolved = (markdown.parent / target.split("#")[0]).resolve()
            assert resolved.is_relative_to(ROOT), (markdown.name, target)
            assert resolved.exists(), (markdown.name, target)
