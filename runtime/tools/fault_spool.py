"""Row 3 of the fault bench: a spool of pending verdicts damaged while the daemon is stopped."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from anomalygpt_edge.runtime.tools.fault_rig import Plc, Rig, start_daemon, wait_online, wait_until, write_config

SPOOL_KINDS = ("truncated", "header", "directory", "rows", "zero")
SPOOL_ROWS = 138
BAD_ROWS = 5


def _fill_spool(path: Path, device: str, n: int) -> list[str]:
    """``n`` pending verdicts in a spool (as a daemon stopped with the broker away leaves it)."""
    from anomalygpt_edge.runtime.delivery.spool import VerdictSpool

    ids = []
    with VerdictSpool(path) as spool:
        rows = []
        for i in range(n):
            vid = str(uuid.uuid4())
            body = {
                "schema": "anomalygpt-edge/verdict/1",
                "id": vid,
                "camera": "cam1",
                "verdict": "OK",
                "part_id": f"S{i}",
            }
            rows.append((vid, f"anomalygpt/{device}/cam1/verdict", json.dumps(body).encode()))
            ids.append(vid)
        spool.put_many(rows)
    return ids


def damage_spool(path: Path, kind: str, ids: list[str]) -> list[str]:
    """Damage a closed spool file the way ``kind`` says; returns the ids made unreadable on purpose."""
    for side in ("-wal", "-shm"):
        path.with_name(path.name + side).unlink(missing_ok=True)
    data = bytearray(path.read_bytes())
    if kind == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2 + 100]))
        return []
    if kind == "header":
        data[0:16] = b"\x00garbage-header\x00"
        path.write_bytes(bytes(data))
        return []
    if kind == "directory":
        path.unlink()
        path.mkdir()
        return []
    if kind == "zero":
        path.write_bytes(b"")
        return []
    if kind == "rows":
        bad = ids[10 : 10 + BAD_ROWS]
        for vid in bad:
            # The payload of this row starts with '{"schema"' right before its id: break its JSON.
            at = data.find(b'{"schema"', max(0, data.find(vid.encode()) - 80))
            data[at : at + 2] = b"\xff\xfe"
        path.write_bytes(bytes(data))
        return bad
    raise ValueError(f"unknown spool damage {kind!r}; one of {SPOOL_KINDS}")


def corrupt_spool(rig: Rig, work: Path, kind: str) -> dict[str, Any]:
    """Row 3: the daemon starts on a damaged spool, delivers what is readable, reports the rest."""
    device = f"fsp{kind[:4]}"
    data = work / f"spool-{kind}"
    shutil.rmtree(data, ignore_errors=True)
    ids = _fill_spool(data / "spool.db", device, SPOOL_ROWS)
    bad = damage_spool(data / "spool.db", kind, ids)
    plc = Plc(rig, device)
    cfg = write_config(work / f"spool-{kind}.yaml", rig, device, data)
    t0 = time.time()
    try:
        daemon = start_daemon(cfg)
    except Exception as exc:
        plc.close()
        return {"fault": f"spool_{kind}", "started": False, "error": f"{exc!r}"}
    try:
        wait_online(plc)
        readable = set(ids) - set(bad)
        wait_until(lambda: readable <= set(plc.verdict_ids()) or daemon.link.sender.idle(), 20, 0.1)
        plc.trigger("cam1", "after")
        wait_until(lambda: plc.answers.get("after"), 5)
        answered = plc.answers.get("after")
        recovery = (answered[0][0] - t0) if answered else None
        # The status must reflect the rows just read (a quarantine happens as they are sent): wait
        # for the next heartbeat (1 s) rather than take one published before the deliveries.
        t_done = time.time()
        wait_until(lambda: plc.status_since(t_done, lambda d: d.get("state") != "offline"), 3)
        stats = daemon.spool.stats()
        status = plc.last_status()
    finally:
        daemon.stop()
        plc.close()
    got = plc.verdict_ids()
    delivered = sum(1 for i in ids if i in got)
    reported_lost = int(stats.get("lost_on_open", 0))
    quarantined = int(stats.get("quarantined", 0))
    return {
        "fault": f"spool_{kind}",
        "started": True,
        "sent": SPOOL_ROWS,
        "answered": delivered,
        "in_time": None,
        "errors": None,
        "lost": SPOOL_ROWS - delivered - quarantined - reported_lost,  # unaccounted for: hidden data
        "delivered": delivered,
        "quarantined": quarantined,
        "reported_lost": reported_lost,
        "duplicates": sum(c - 1 for i, c in got.items() if i in set(ids) and c > 1),
        "recovery_s": None if recovery is None else round(recovery, 2),
        "new_trigger_answered": bool(answered),
        "events": [e["kind"] for e in stats.get("events", [])],
        "status_state": status.get("state"),
        "status_problems": status.get("problems"),
    }
