"""The README's layout table matches the tree: every top-level folder of the repository and every
module of pipelines/ is named there, and everything named there exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Made by builds and tests, and ignored by git (test-artifacts: the UI test's screenshots): not the layout.
IGNORED = {"build", "node_modules", "test-artifacts"}


def _layout_rows() -> dict[str, str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("| path | holds |") :]
    rows = {}
    for line in section.splitlines()[2:]:
        if not line.startswith("|"):
            break
        path, holds = (cell.strip() for cell in line.strip("|").split("|", 1))
        rows[path.strip("`").rstrip("/")] = holds
    return rows


def test_every_top_level_folder_is_in_the_layout_table_and_nothing_more() -> None:
    rows = _layout_rows()
    folders = {
        p.name
        for p in REPO.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in IGNORED and not p.name.endswith(".egg-info")
    }
    assert folders - set(rows) == set(), "folders missing from README's layout table"
    assert {r for r in rows if "/" not in r} - folders - {p.name for p in REPO.iterdir()} == set(), (
        "rows naming nothing"
    )


def test_every_pipelines_module_is_named_in_its_row() -> None:
    holds = _layout_rows()["pipelines"]
    named = {name.rstrip("/") for name in re.findall(r"`([a-z_/]+)`", holds)}
    modules = {
        p.stem
        for p in (REPO / "pipelines").iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and p.name not in ("__pycache__", "data"))
    }
    assert modules - named == set(), "pipelines modules the README's layout table does not name"
    assert named - modules == set(), "names in the layout table that are not pipelines modules"
