"""``anomalygpt-edge label --from FILE.csv``: labels on archived verdicts in bulk (an inspection
station's or a spreadsheet's findings), stored as ``source: cli`` rows with their author.

The file has the columns ``id,label[,defect_type,note]``, with or without a header row naming
them (in any order then). Every row is checked before anything is written: each bad row is one line
(row number, what is wrong), and a file with bad rows writes **nothing** unless ``--skip-bad``,
which stores the good rows and lists the bad ones. All good rows go in one transaction.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import io
import os
import sys
from pathlib import Path
from typing import Any

from anomalygpt_edge.runtime.cli.archive import DEFAULT_ARCHIVE

#: The file is read whole: bounded before it is read.
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_ROWS = 100_000
COLUMNS = ("id", "label", "defect_type", "note")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``label``."""
    p = sub.add_parser("label", help="label archived verdicts good/defect in bulk from a CSV file")
    p.add_argument("--from", dest="source", type=Path, required=True, help="CSV: id,label[,defect_type,note]")
    p.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE, help=f"archive folder (default {DEFAULT_ARCHIVE})")
    p.add_argument("--author", default=None, help="who labelled them (default: the login name)")
    p.add_argument("--skip-bad", action="store_true", help="store the good rows of a file that has bad ones")
    p.set_defaults(handler="anomalygpt_edge.runtime.cli.label:run")


def _author(given: str | None) -> str:
    if given is not None:
        return given
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER") or "cli"


def read_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """``(row number, cells)`` of the file (row numbers as a spreadsheet shows them); SystemExit
    for a file that is too big, not UTF-8 or has too many rows."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise SystemExit(f"anomalygpt-edge label: {path} is {size} bytes; at most {MAX_FILE_BYTES}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SystemExit(f"anomalygpt-edge label: {path} is not UTF-8 text: {exc}") from None
    lines = list(csv.reader(io.StringIO(text)))
    header = [c.strip().lower() for c in lines[0]] if lines else []
    names = header if header[:1] == ["id"] or "label" in header else list(COLUMNS)
    first = 2 if names is header else 1
    unknown = [n for n in names if n not in COLUMNS]
    if unknown or not {"id", "label"} <= set(names):
        raise SystemExit(
            f"anomalygpt-edge label: {path}: the header must name id, label[, defect_type, note]; got {header}"
        )
    rows: list[tuple[int, dict[str, str]]] = []
    for number, cells in enumerate(lines[first - 1 :], first):
        if not any(c.strip() for c in cells):
            continue
        if len(rows) >= MAX_ROWS:
            raise SystemExit(f"anomalygpt-edge label: {path} has more than {MAX_ROWS} rows; split it")
        extra = cells[len(names) :]
        row = {n: c.strip() for n, c in zip(names, cells, strict=False)}
        if any(c.strip() for c in extra):
            row["\0extra"] = "1"
        rows.append((number, row))
    return rows


def check_rows(
    rows: list[tuple[int, dict[str, str]]], archive: Any, author: str
) -> tuple[list[tuple[str, str, str | None, str | None]], list[str]]:
    """The good rows as label tuples, and one line per bad row."""
    from anomalygpt_edge.runtime.delivery.archive_labels import check_label

    known = archive.known_verdicts([r.get("id", "") for _, r in rows])
    good, bad = [], []
    for number, r in rows:
        item = (r.get("id", ""), r.get("label", ""), r.get("defect_type") or None, r.get("note") or None)
        try:
            if "\0extra" in r:
                raise ValueError(f"more cells than the columns {', '.join(COLUMNS)}")
            check_label(*item[:2], author, "cli", *item[2:])
            if item[0] not in known:
                raise ValueError(f"no verdict '{item[0][:80]}' in the archive")
        except ValueError as exc:
            bad.append(f"row {number}: {exc}")
            continue
        good.append(item)
    return good, bad


def run(args: argparse.Namespace) -> int:
    """Run ``label``: check every row, then store them (all, or the good ones with ``--skip-bad``)."""
    from anomalygpt_edge.runtime.cli.archive import _open

    rows = read_rows(args.source)
    archive = _open(args.archive)
    try:
        good, bad = check_rows(rows, archive, _author(args.author))
        for line in bad:
            print(f"anomalygpt-edge label: {args.source}: {line}", file=sys.stderr)
        if bad and not args.skip_bad:
            print(f"{len(bad)} bad rows of {len(rows)}: nothing written (--skip-bad stores the good ones)")
            return 2
        if good:
            archive.add_labels(good, author=_author(args.author), source="cli")
    finally:
        archive.close()
    print(f"{len(good)} labels written to {args.archive}" + (f", {len(bad)} bad rows skipped" if bad else ""))
    return 0
