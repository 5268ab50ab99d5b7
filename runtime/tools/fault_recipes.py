"""Rows 2 and 11 of the fault bench: a recipe whose files fail their checks, at start-up or
switched to over MQTT.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from anomalygpt_edge.runtime.tools.fault_rig import (
    Plc,
    Rig,
    answer_ids,
    count_lost,
    daemon_and_plc,
    tally,
    wait_online,
    wait_until,
)

RECIPE_KINDS = ("nan", "width", "sha", "path")
#: What the refusal must say for each kind (besides naming the file).
RECIPE_REASONS = {
    "nan": "holds NaN or infinite values",
    "width": "has feature width",
    "sha": "does not match recipe.json",
    "path": "is not a bank file of this recipe",
}


def damage_recipe(store: Path, source: str, name: str, kind: str) -> str:
    """Copy recipe ``source`` to ``name`` in ``store`` and damage it as ``kind`` says.

    ``nan`` and ``width`` are well-formed bad banks: ``recipe.json`` records their sha256, shapes
    and dtype, so only the content checks can refuse them. Returns the file the refusal must name.
    """
    import hashlib

    import numpy as np

    from anomalygpt_edge.runtime.inspection.memory_bank import MemoryBank

    dst = store / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(store / source, dst, ignore=shutil.ignore_patterns(".lock"))
    doc = json.loads((dst / "recipe.json").read_text())
    doc["name"] = name
    bank_path = dst / doc["bank_file"]
    if kind in ("nan", "width"):
        bank = MemoryBank.load(bank_path)

        def mutate(a: np.ndarray) -> np.ndarray:
            return np.full_like(a, np.nan) if kind == "nan" else np.ascontiguousarray(a[:, : a.shape[1] // 2])

        bank = MemoryBank({k: mutate(v) for k, v in bank.layers.items()}, bank.meta)
        data = bank.to_bytes()
        bank_path.write_bytes(data)
        doc["bank_record"] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "shapes": {k: list(v.shape) for k, v in bank.layers.items()},
            "dtype": ",".join(sorted({str(v.dtype) for v in bank.layers.values()})),
        }
        named = str(bank_path)
    elif kind == "sha":
        damaged = bytearray(bank_path.read_bytes())
        damaged[-100] ^= 0xFF
        bank_path.write_bytes(bytes(damaged))
        named = str(bank_path)
    elif kind == "path":
        doc["bank_file"] = "../../../etc/passwd"
        named = "../../../etc/passwd"
    else:
        raise ValueError(f"unknown recipe damage {kind!r}; one of {RECIPE_KINDS}")
    (dst / "recipe.json").write_text(json.dumps(doc, indent=2))
    return named


def recipe_config(path: Path, rig: Rig, device: str, data: Path, store: Path, bindings: dict[str, str]) -> Path:
    """A daemon config with one looping video camera per ``bindings`` entry (camera -> recipe)."""
    cfg = {
        "device": {"id": device},
        "cameras": {cam: {"type": "video_file", "source": str(rig.video), "fps": 5, "loop": True} for cam in bindings},
        "recipes": [
            {"camera": cam, "recipe": recipe, "trigger": "mqtt", "deadline_ms": 1000}
            for cam, recipe in bindings.items()
        ],
        "engines": {"bundle": str(rig.bundle), "backend": "onnxruntime"},
        "mqtt": {"host": rig.host, "port": rig.port, "keepalive": 10},
        "storage": {"store": str(store), "data": str(data)},
        "health": {"heartbeat_s": 1.0},
        # The bench's PLC switches recipes without a token: say so, as a plant's config would.
        "commands": {"allow_anonymous_control": True},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=2))
    return path


def _parts(plc: Plc, camera: str, prefix: str, n: int, gap_s: float = 0.15) -> list[str]:
    """``n`` triggers on ``camera``, ``gap_s`` apart (a part per frame at 5 fps, roughly)."""
    corrs = []
    for i in range(n):
        corr = f"{prefix}-{i}"
        plc.trigger(camera, corr)
        corrs.append(corr)
        time.sleep(gap_s)
    return corrs


def _refusal_row(
    plc: Plc, fault: str, corrs: list[str], named: str, reason: str, refusal: str | None, problems: list[str]
) -> dict[str, Any]:
    """Figures of one damaged recipe: every part ERROR with the refusal's reason, none OK, in time."""
    wait_until(lambda: all(plc.answers.get(c) for c in corrs), 5)
    row = {"fault": fault, **tally(plc, corrs, 1000.0)}
    with plc.lock:
        bodies = [plc.answers[c][0][1] for c in corrs if plc.answers.get(c)]
    row["ok_answers"] = sum(b.get("verdict") == "OK" for b in bodies)
    row["errors_with_reason"] = sum(
        b.get("verdict") == "ERROR" and named in str(b.get("reason")) and reason in str(b.get("reason")) for b in bodies
    )
    row["refusal"] = refusal
    row["refusal_names_file"] = refusal is not None and named in refusal and reason in refusal
    row["status_says"] = any(named in p and reason in p for p in problems)
    row["lost"] = count_lost(plc, answer_ids(plc, corrs), 5)
    row["duplicates"] = row.pop("duplicate_answers")
    row["reason"] = bodies[0].get("reason") if bodies else None
    return row


def _damaged_row(plc: Plc, daemon: Any, when: str, kind: str, named: str) -> dict[str, Any]:
    """The figures of the parts sent while the damaged recipe ``bad-<kind>`` is refused."""
    camera = f"cam-{kind}" if when == "start" else "cam1"
    refusal = None
    if when == "switch":
        plc.command("recipe", {"action": "switch", "camera": camera, "recipe": f"bad-{kind}"}, f"sw-{kind}")
        reply = plc.reply(f"sw-{kind}", 10) or {}
        refusal = None if reply.get("ok", True) else reply.get("error")
    else:
        refusal = daemon.recipe_problems.get(camera)
    since = time.time() - 1.5
    wait_until(lambda: plc.status_since(since, lambda d: d.get("state") == "degraded"), 3)
    problems = list(daemon.status()["problems"])
    corrs = _parts(plc, camera, f"{when}-{kind}", 5)
    row = _refusal_row(plc, f"recipe_{kind}_{when}", corrs, named, RECIPE_REASONS[kind], refusal, problems)
    row["state"] = "degraded" if problems else "online"
    return row


def _recover(plc: Plc, store: Path, rig: Rig, when: str, kind: str) -> tuple[bool, float | None]:
    """Put the good recipe back; whether the switch was accepted and seconds to the first OK/NG answer."""
    camera = f"cam-{kind}" if when == "start" else "cam1"
    t_back = time.time()
    if when == "start":
        shutil.rmtree(store / f"bad-{kind}")
        shutil.copytree(store / rig.recipe, store / f"bad-{kind}", ignore=shutil.ignore_patterns(".lock"))
        target = f"bad-{kind}"
    else:
        target = rig.recipe
    plc.command("recipe", {"action": "switch", "camera": camera, "recipe": target}, f"back-{when}-{kind}")
    back = plc.reply(f"back-{when}-{kind}", 10) or {}
    good = None
    for attempt in range(5):
        corr = f"{when}-{kind}-good{attempt}"
        plc.trigger(camera, corr)
        body = plc.reply(corr, 3)
        if body is not None and body.get("verdict") in ("OK", "NG"):
            good = plc.answers[corr][0][0]
            break
    return bool(back.get("ok")), None if good is None else round(good - t_back, 2)


def recipe_faults(rig: Rig, work: Path, when: str) -> list[dict[str, Any]]:
    """Rows 2 and 11: damaged recipes at start-up (``when="start"``) or switched to over MQTT (``"switch"``).

    ``recovery_s``: the good recipe put back (``start``: the files repaired, then ``switch`` to
    the same recipe; ``switch``: a switch back) → the first part answered OK/NG again.
    """
    device = f"frec{when[:2]}"
    store = work / f"recipes-{when}"
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(rig.store, store, ignore=shutil.ignore_patterns(".lock"))
    named = {}
    for kind in RECIPE_KINDS:
        named[kind] = damage_recipe(store, rig.recipe, f"bad-{kind}", kind)
    bindings = {f"cam-{k}": f"bad-{k}" for k in RECIPE_KINDS} if when == "start" else {"cam1": rig.recipe}
    cfg = recipe_config(work / f"recipes-{when}.yaml", rig, device, work / f"recipes-{when}-state", store, bindings)
    rows: list[dict[str, Any]] = []
    with daemon_and_plc(rig, device, cfg) as (plc, daemon):
        if not wait_online(plc):
            raise RuntimeError("the daemon never published its status")
        wait_until(lambda: all(c.online for c in daemon.cameras.values()), 10)
        for kind in RECIPE_KINDS:
            row = _damaged_row(plc, daemon, when, kind, named[kind])
            row["switch_back_ok"], row["recovery_s"] = _recover(plc, store, rig, when, kind)
            rows.append(row)
        t_end = time.time()
        cleared = wait_until(lambda: plc.status_since(t_end, lambda d: d.get("state") == "online"), 5)
        dead = daemon.health.dead_threads()
        alive = all(t.is_alive() for t in daemon._threads)
    for row in rows:
        row["online_at_end"] = bool(cleared)
        row["daemon_alive"] = alive and not dead
    return rows
