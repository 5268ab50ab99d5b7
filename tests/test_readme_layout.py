"""README's layout table names every room of the tree, and nothing that is not there.

A newcomer finds their room from that table; a folder or top-level module added without a row (or a
row left behind by a move) sends them looking in the wrong place.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Top-level entries that are not rooms of the product: packaging, CI, docs of the repository itself.
NOT_ROOMS = {"pyproject.toml", "README.md", "BENCHMARKS.md", "edge", "__init__.py"}


def layout_rows() -> set[str]:
    """Every path written in backticks in the first column of README's "Layout" table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    named: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            named.update(p.rstrip("/") for p in re.findall(r"`([^`]+)`", first_cell))
    return named


def tracked_rooms() -> set[str]:
    """Top-level folders and modules, and the runtime's subpackages and loose files, as git tracks them
    (outputs of set-up, the demo and benchmarks are ignored by git and are not rooms)."""
    listed = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
    ).stdout.splitlines()
    rooms = set()
    for path in listed:
        parts = path.split("/")
        if parts[0].startswith(".") or parts[0] in NOT_ROOMS:
            continue
        if parts[0] == "runtime":
            if len(parts) > 1 and parts[1] != "__init__.py":
                rooms.add(f"runtime/{parts[1]}")
        else:
            rooms.add(parts[0])
    return rooms


def test_every_room_on_disk_has_a_row_in_the_readme_layout_table() -> None:
    missing = sorted(tracked_rooms() - layout_rows())
    assert not missing, f"README's layout table has no row for: {missing}"


def test_every_row_of_the_readme_layout_table_names_something_on_disk() -> None:
    gone = sorted(p for p in layout_rows() if not (ROOT / p).exists())
    assert not gone, f"README's layout table names what is not in the tree: {gone}"
