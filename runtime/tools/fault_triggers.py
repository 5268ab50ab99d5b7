"""Rows 7 and 8 of the fault bench: an empty file in a watched folder, and a burst of triggers from
a PLC in its own process (this module is that process's entry point).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from anomalygpt_edge.runtime.tools.fault_rig import (
    Plc,
    Rig,
    percentile,
    start_daemon,
    wait_online,
    wait_until,
    write_config,
)


def empty_file(rig: Rig, work: Path) -> dict[str, Any]:
    """Row 7: a folder-watch part that stays 0 bytes is answered ERROR (empty file) after the settle time."""
    import cv2

    from anomalygpt_edge.runtime.tools import synthetic

    device, deadline_ms = "fempty", 3000.0
    inbox = work / "inbox"
    shutil.rmtree(inbox, ignore_errors=True)
    inbox.mkdir(parents=True)
    camera = {"type": "image_folder", "source": str(inbox)}
    binding = {"trigger": "folder_watch", "deadline_ms": deadline_ms}
    cfg = write_config(work / "empty.yaml", rig, device, work / "empty-state", camera=camera, binding=binding)
    plc = Plc(rig, device)
    daemon = start_daemon(cfg)
    try:
        wait_online(plc)
        t0 = time.time()
        (inbox / "part-empty.png").write_bytes(b"")
        frame = synthetic.read_video_frames(rig.video)[0]
        cv2.imwrite(str(inbox / "part-good.png"), frame)

        def answer(part: str) -> tuple[float, dict] | None:
            with plc.lock:
                return next(((t, v) for t, v in plc.verdicts if v.get("part_id") == part), None)

        wait_until(lambda: answer("part-empty") and answer("part-good"), 10)
        empty, good = answer("part-empty"), answer("part-good")
    finally:
        daemon.stop()
        plc.close()
    return {
        "fault": "empty_file",
        "sent": 2,
        "answered": int(empty is not None) + int(good is not None),
        "in_time": sum(1 for a in (empty, good) if a is not None and (a[0] - t0) * 1e3 <= deadline_ms),
        "errors": sum(1 for a in (empty, good) if a is not None and a[1].get("verdict") == "ERROR"),
        "lost": int(empty is None) + int(good is None),
        "duplicates": 0,
        "recovery_s": None,
        "empty_answer": None
        if empty is None
        else {
            "verdict": empty[1].get("verdict"),
            "reason": empty[1].get("reason"),
            "after_s": round(empty[0] - t0, 2),
        },  # fmt: skip
        "good_answer": None if good is None else good[1].get("verdict"),
    }


# -- row 8: a burst of triggers -------------------------------------------------------------------


def _burst_plc(host: str, port: int, base: str, n: int, span_s: float, out: Path) -> None:
    """The separate PLC process of the burst: ``n`` triggers in ``span_s``, answers timed on arrival."""
    rig = Rig(host, port, Path(), Path(), Path())
    plc = Plc(rig, base.split("/", 1)[1], prefix=base.split("/", 1)[0])
    print("ready", flush=True)
    sys.stdin.readline()  # the daemon is online
    start = time.monotonic()
    for i in range(n):
        time.sleep(max(0.0, start + span_s * i / n - time.monotonic()))
        plc.trigger("cam1", f"b{i}")
    took = time.monotonic() - start
    wait_until(lambda: len(plc.answers) >= n, 10)
    time.sleep(0.5)  # a duplicate answer would arrive now
    plc.close()
    with plc.lock:
        out.write_text(
            json.dumps({"sent": plc.sent, "answers": plc.answers, "send_s": took, "ids": list(plc.verdict_ids())})
        )


def burst(rig: Rig, work: Path, n: int = 300, span_s: float = 0.22, deadline_ms: float = 1000.0) -> dict[str, Any]:
    """Row 8: ``n`` triggers in ``span_s`` with a ``deadline_ms`` deadline; every one answered in time."""
    device = "fburst"
    cfg = write_config(work / "burst.yaml", rig, device, work / "burst-state", binding={"deadline_ms": deadline_ms})
    out = work / "burst-plc.json"
    out.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "anomalygpt_edge.runtime.tools.fault_triggers", "--burst-plc", rig.host, str(rig.port),
         f"anomalygpt/{device}", str(n), str(span_s), str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    watcher = Plc(rig, device)
    daemon = start_daemon(cfg)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        proc.stdout.readline()  # "ready"
        wait_online(watcher)
        wait_until(lambda: daemon.cameras["cam1"].online, 10)
        time.sleep(0.5)  # a few frames in: the camera is delivering
        proc.stdin.write("go\n")
        proc.stdin.flush()
        proc.wait(60)
        wait_until(lambda: daemon.link.sender.idle(), 15, 0.1)
    finally:
        daemon.stop()
        watcher.close()
        if proc.poll() is None:
            proc.kill()
    data = json.loads(out.read_text())
    lat, errors, dup = [], 0, 0
    for corr, sent_at in data["sent"].items():
        got = data["answers"].get(corr, [])
        if got:
            lat.append((got[0][0] - sent_at) * 1e3)
            errors += got[0][1].get("verdict") == "ERROR"
            dup += len(got) - 1
    ids = {str(g[0][1].get("id")) for g in data["answers"].values() if g and g[0][1].get("id")}
    seen = set(data["ids"]) | set(watcher.verdict_ids())
    reasons = Counter(
        str(g[0][1].get("reason", "")).split(":")[0] for g in data["answers"].values() if g and g[0][1].get("reason")
    )
    return {
        "fault": "burst",
        "sent": len(data["sent"]),
        "answered": len(lat),
        "in_time": sum(v <= deadline_ms for v in lat),
        "errors": errors,
        "lost": len(ids - seen),
        "duplicates": dup,
        "recovery_s": None,
        "send_s": round(data["send_s"], 3),
        "deadline_ms": deadline_ms,
        "latency_ms": {"p50": percentile(lat, 50), "p99": percentile(lat, 99), "max": percentile(lat, 100)},
        "error_reasons": dict(reasons),
    }


if __name__ == "__main__":
    if len(sys.argv) == 8 and sys.argv[1] == "--burst-plc":
        host, port, base, n, span, out = sys.argv[2:]
        _burst_plc(host, int(port), base, int(n), float(span), Path(out))
    else:
        sys.exit(
            "usage: python -m anomalygpt_edge.runtime.tools.fault_triggers --burst-plc HOST PORT BASE N SPAN_S OUT"
        )
