"""``anomalygpt-edge archive`` arguments (light: the work is in ``runtime/delivery/archive.py``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_ARCHIVE = Path(os.environ.get("ANOMALYGPT_EDGE_ARCHIVE", "data/archive"))


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``archive export`` and ``archive stats``."""
    a = sub.add_parser("archive", help="the on-device verdict archive: export a time range, show its size")
    targets = a.add_subparsers(dest="archive_command", required=True, metavar="ACTION")
    e = targets.add_parser("export", help="write verdicts.csv and the kept images of a time range")
    e.add_argument("--from", dest="start", required=True, help="ISO-8601 start, inclusive (naive = UTC)")
    e.add_argument("--to", dest="end", required=True, help="ISO-8601 end, exclusive (naive = UTC)")
    e.add_argument("--out", type=Path, required=True, help="output folder (created)")
    e.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE, help=f"archive folder (default {DEFAULT_ARCHIVE})")
    e.set_defaults(handler="anomalygpt_edge.runtime.cli.archive:export")
    s = targets.add_parser("stats", help="rows, image bytes, oldest and newest verdict")
    s.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE, help=f"archive folder (default {DEFAULT_ARCHIVE})")
    s.set_defaults(handler="anomalygpt_edge.runtime.cli.archive:stats")


def _open(path: Path):  # noqa: ANN202 - Archive is imported lazily
    from anomalygpt_edge.runtime.delivery.archive import Archive

    if not (path / "archive.db").is_file():
        raise SystemExit(f"anomalygpt-edge archive: no archive at {path} (archive.db missing); use --archive")
    return Archive(path)


def export(args: argparse.Namespace) -> int:
    """Run ``archive export``."""
    from anomalygpt_edge.progress import Progress
    from anomalygpt_edge.runtime.delivery.archive import ArchiveError

    archive = _open(args.archive)
    try:
        with Progress(None, "archive export", "row") as bar:  # the total is known once the rows are read
            result = archive.export(args.start, args.end, args.out, on_row=bar.report)
    except ArchiveError as exc:
        raise SystemExit(f"anomalygpt-edge archive export: {exc}") from None
    finally:
        archive.close()
    print(
        f"{result['rows']} verdicts, {result['images']} images -> {result['out']}"
        + (f" ({result['images_missing']} images already evicted)" if result["images_missing"] else "")
    )
    return 0


def stats(args: argparse.Namespace) -> int:
    """Run ``archive stats``."""
    archive = _open(args.archive)
    try:
        info = archive.summary()
        per = ", ".join(f"{k} {v}" for k, v in sorted(info["by_verdict"].items())) or "none"
        print(f"archive {args.archive}: {info['rows']} verdicts ({per}), {info['image_bytes']} image bytes")
        if info["rows"]:
            print(f"oldest {info['oldest']}  newest {info['newest']}")
    finally:
        archive.close()
    return 0
