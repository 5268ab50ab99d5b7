"""``anomalygpt-edge bench faults``: the faults of issue 12 against the real daemon, measured.

Each scenario runs the daemon (in this process) against a real mosquitto on loopback and a PLC
that is a separate MQTT client, and returns its figures: parts ``sent`` / ``answered`` /
``in_time`` (answered within the deadline), ``errors`` (explicit ERROR answers), ``lost``
(verdicts that never reached the verdict topic), ``duplicates`` (extra copies of an id) and
``recovery_s``. The suite's fault tests (``tests/test_faults_*.py``) run the same scenarios and
assert on the figures; this command prints them as a table and JSON for BENCHMARKS.md.

* ``disk_full`` (row 1): the state folder on a 16 MiB tmpfs (needs root to mount; skipped with
  the reason otherwise); a filler keeps the disk full for a while, triggers keep coming at 10 Hz,
  then the filler's files are deleted and the daemon must resume by itself.
* ``self_fill`` (row 1 as first reported): an 8 MiB tmpfs, every image archived, 25 s of triggers:
  the daemon must not fill the disk by itself.
* ``spool_<kind>`` (row 3): a spool with 138 pending verdicts is damaged while the daemon is
  stopped (``truncated``, ``header`` flipped, a ``directory``, bytes flipped in ``rows``, a
  ``zero``-length file); the daemon must start, deliver what is readable, and report the rest.
* ``empty_file`` (row 7): a folder-watch part that stays 0 bytes is answered ERROR.
* ``burst`` (row 8): 300 triggers in 0.22 s with a 1 s deadline, from a PLC in its own process.
* ``recipe_<kind>_<when>`` (rows 2 and 11): a recipe whose bank is full of NaN (with a matching
  ``recipe.json`` record), of the wrong feature width, differs from its recorded sha256, or whose
  ``bank_file`` is ``../../../etc/passwd``; the daemon is started on it (``start``) or switched
  to it over MQTT (``switch``). It must refuse the recipe naming the file, say ``degraded``, answer
  every part ERROR with that reason in time, never OK, and serve again once the recipe is good.
* ``racing_enroll`` (row 4): one recipe enrolled from the station and over MQTT at the same time,
  several rounds: every file the committed recipe names exists, it can be rebuilt, no
  acknowledged frame is lost, each reply's ``k`` is the recipe as that writer committed it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from typing import Any

# The scenarios live a module per fault row; the suite's fault tests and test_spool import them
# from here, so the names stay importable from this module.
from anomalygpt_edge.runtime.tools.fault_disk import Filler, disk_full, self_fill, tmpfs, tmpfs_available
from anomalygpt_edge.runtime.tools.fault_race import racing_enroll
from anomalygpt_edge.runtime.tools.fault_recipes import RECIPE_KINDS, RECIPE_REASONS, damage_recipe, recipe_faults
from anomalygpt_edge.runtime.tools.fault_rig import ANSWERS, Plc, Rig, percentile, tally, wait_until, write_config
from anomalygpt_edge.runtime.tools.fault_spool import BAD_ROWS, SPOOL_KINDS, SPOOL_ROWS, corrupt_spool, damage_spool
from anomalygpt_edge.runtime.tools.fault_triggers import burst, empty_file

__all__ = [
    "ANSWERS", "BAD_ROWS", "RECIPE_KINDS", "RECIPE_REASONS", "SPOOL_KINDS", "SPOOL_ROWS", "Filler", "Plc", "Rig",
    "burst", "corrupt_spool", "damage_recipe", "damage_spool", "disk_full", "empty_file", "percentile",
    "racing_enroll", "recipe_faults", "run", "self_fill", "tally", "tmpfs", "tmpfs_available", "wait_until",
    "write_config",
]  # fmt: skip


def _table(results: list[dict[str, Any]]) -> str:
    head = "| fault | sent | answered | in time | ERROR | lost | duplicates | recovery s | notes |"
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['fault']} | – | – | – | – | – | – | – | skipped: {r['skipped']} |")
            continue
        notes = []
        if lat := r.get("latency_ms"):
            notes.append(f"p50 {lat['p50']} / p99 {lat['p99']} / max {lat['max']} ms")
        if r.get("reported_s") is not None:
            notes.append(f"degraded in status after {r['reported_s']} s")
        for key in ("quarantined", "reported_lost"):
            if r.get(key):
                notes.append(f"{key.replace('_', ' ')} {r[key]}")
        if r.get("events"):
            notes.append("events: " + ", ".join(r["events"]))
        if r.get("lowest_free_mib") is not None:
            notes.append(f"lowest free {r['lowest_free_mib']} MiB of 8; archive {r['archive']}")
        if r.get("empty_answer"):
            notes.append(f"empty file: {r['empty_answer']['verdict']} after {r['empty_answer']['after_s']} s")
        if r["fault"].startswith("recipe_"):
            notes.append(
                f"OK answers {r['ok_answers']}; ERROR with the reason {r['errors_with_reason']}; refusal names the "
                f"file: {r['refusal_names_file']}; status {r['state']}"
            )
        if r["fault"] == "racing_enroll":
            notes.append(
                f"{r['rounds']} rounds, {r['acknowledged_frames']} MQTT frames acknowledged, rebuilt "
                f"{r['rebuilt']}/{r['rounds']}; problems: {len(r['problems'])}"
            )
        cells = [r.get(k) for k in ("sent", "answered", "in_time", "errors", "lost", "duplicates", "recovery_s")]
        lines.append(
            f"| {r['fault']} | " + " | ".join("–" if c is None else str(c) for c in cells) + f" | {'; '.join(notes)} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``bench faults``: set up a line (bundle, video, enrolled recipe, mosquitto) and run every fault."""
    import logging

    from anomalygpt_edge.engines.bundle import EngineBundle
    from anomalygpt_edge.runtime.defaults import DEFAULT_BUNDLE
    from anomalygpt_edge.runtime.recipes.enrollment import Enroller
    from anomalygpt_edge.runtime.recipes.store import RecipeStore
    from anomalygpt_edge.runtime.tools import synthetic
    from anomalygpt_edge.runtime.tools.demo import ensure_bundle
    from anomalygpt_edge.runtime.tools.local_broker import start_mosquitto

    logging.getLogger("anomalygpt_edge").setLevel(logging.CRITICAL)
    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    bundle = ensure_bundle(DEFAULT_BUNDLE.resolve())
    synthetic.write_line_video(work / "line.avi", n_parts=12, frames_per_part=5)
    synthetic.write_golden_video(work / "golden.avi", 20)
    enroller = Enroller(RecipeStore(work / "store"), EngineBundle.open(bundle))
    enroller.open_or_create("bracket", roi=synthetic.PART_ROI)
    enroller.add("bracket", [(f"g{i}", im) for i, im in enumerate(synthetic.read_video_frames(work / "golden.avi"))])
    broker = start_mosquitto(log_to=work / "mosquitto.log")
    rig = Rig(broker.host, broker.port, work / "store", bundle, work / "line.avi")
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    plan: list[tuple[str, Callable[[], Any]]] = [
        ("disk_full", lambda: disk_full(rig, work)),
        ("self_fill", lambda: self_fill(rig, work)),
        *[(f"spool_{k}", lambda k=k: corrupt_spool(rig, work, k)) for k in SPOOL_KINDS],
        ("empty_file", lambda: empty_file(rig, work)),
        ("burst", lambda: burst(rig, work)),
        *[(f"recipe_{w}", lambda w=w: recipe_faults(rig, work, w)) for w in ("start", "switch")],
        ("racing_enroll", lambda: racing_enroll(rig, work)),
    ]
    results = []
    try:
        for name, scenario in plan:
            if only and name not in only and name.split("_")[0] not in only:
                continue
            print(f"[bench faults] {name} ...", file=sys.stderr, flush=True)
            outcome = scenario()
            for result in outcome if isinstance(outcome, list) else [outcome]:
                result.pop("answered_ids", None)  # for the tests' own subscriber; too long for the report
                result.setdefault("fault", name)
                results.append(result)
    finally:
        broker.stop()
    figures = {"faults": results, "cpu_count": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    print(_table(results))
    print(json.dumps(figures, default=str))
    return 0
