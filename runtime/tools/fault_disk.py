"""Row 1 of the fault bench: the state folder's disk full (a filler on a small tmpfs), and the
daemon that once filled an 8 MiB disk by itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
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
    write_config,
)


def tmpfs_available() -> str | None:
    """None when a tmpfs can be mounted here, else why not (the reason a test skips with)."""
    if os.name != "posix" or os.geteuid() != 0:
        return "mounting a small tmpfs needs root (run the suite as root, as ./edge test does in CI)"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "mount/umount not installed"
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tmpfs-probe-") as probe:
        try:
            with tmpfs(Path(probe), 1):
                return None
        except RuntimeError as exc:  # e.g. a container without CAP_SYS_ADMIN
            return str(exc)


@contextlib.contextmanager
def tmpfs(path: Path, size_mb: int) -> Any:
    """A ``size_mb`` tmpfs mounted at ``path`` for the block (unmounted after, lazily if busy)."""
    path.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                         capture_output=True, text=True)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"cannot mount a tmpfs at {path}: {out.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


class Filler:
    """Keeps a filesystem full: writes files until ENOSPC and grabs any space that comes free."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="disk-filler", daemon=True)
        self.full = threading.Event()
        self.files = 0

    def _fill(self) -> None:
        chunk = b"\xa5" * 65536
        while not self._stop.is_set():
            path = self.folder / f"fill-{self.files:05d}"
            self.files += 1
            try:
                with open(path, "wb") as fh:
                    for _ in range(64):  # 4 MiB per file at most
                        fh.write(chunk)
                        fh.flush()
            except OSError:
                # Full: top up with small writes so not even a few KiB are left over.
                with contextlib.suppress(OSError), open(self.folder / f"tail-{self.files}", "wb") as fh:
                    for _ in range(1024):
                        fh.write(b"\xa5" * 1024)
                        fh.flush()
                self.full.set()
                return

    def _run(self) -> None:
        while not self._stop.is_set():
            self._fill()
            self._stop.wait(0.05)

    def start(self) -> Filler:
        """Start filling in the background (``full`` is set once the disk is full)."""
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop filling and delete everything written: the space returns."""
        self._stop.set()
        self._thread.join(5)
        shutil.rmtree(self.folder, ignore_errors=True)


class _Paced:
    """Triggers on ``cam1`` at ``rate_hz``, numbered ``d0``, ``d1``, … across calls."""

    def __init__(self, plc: Plc, rate_hz: float):
        self.plc, self.rate_hz, self.n = plc, rate_hz, 0

    def send(self, count: int) -> list[str]:
        """Send ``count`` triggers on the rate's schedule; their correlation ids."""
        corrs = []
        start = time.monotonic()
        for i in range(count):
            time.sleep(max(0.0, start + i / self.rate_hz - time.monotonic()))
            corr = f"d{self.n}"
            self.n += 1
            self.plc.trigger("cam1", corr)
            corrs.append(corr)
        return corrs


def _resumed_after(plc: Plc, t_free: float) -> float | None:
    """Wait for the daemon to serve again after ``t_free``; when it first said online with no problems."""

    def serving() -> bool:
        doc = plc.last_status()
        return (
            doc.get("state") == "online" and (plc.status_since(t_free, lambda d: d.get("state") == "online") or 0) > 0
        )

    wait_until(serving, 10)
    return plc.status_since(t_free, lambda d: d.get("state") == "online" and not d.get("problems"))


def _daemon_figures(daemon: Any) -> dict[str, Any]:
    """What the daemon says of itself after the fault: archive and spool statistics, dead threads."""
    wait_until(lambda: daemon.link.sender.idle(), 15, 0.1)
    return {
        "archive": dict(daemon.archive.archive.stats.to_json()) if daemon.archive else {},
        "dead": daemon.health.dead_threads(),
        "crashed": sorted(daemon._crashes),
        "spool": daemon.spool.stats() if daemon.spool else {},
    }


def disk_full(
    rig: Rig, work: Path, full_s: float = 6.0, rate_hz: float = 10.0, after_s: float = 10.0
) -> dict[str, Any]:
    """Row 1: triggers at ``rate_hz`` while the state folder's disk is full, then space returns."""
    if (why := tmpfs_available()) is not None:
        return {"skipped": why}
    device, deadline_ms = "fdisk", 1000.0
    with tmpfs(work / "disk", 16) as mnt:
        storage = {"disk_free_floor_mb": 2, "spool_reserve_mb": 1, "archive_ok_sample_rate": 1.0}
        cfg = write_config(work / "disk.yaml", rig, device, mnt / "state", storage=storage, heartbeat_s=1.0)
        with daemon_and_plc(rig, device, cfg) as (plc, daemon):
            filler = None
            try:
                if not wait_online(plc):
                    raise RuntimeError("the daemon never said online")
                paced = _Paced(plc, rate_hz)
                before = paced.send(int(2 * rate_hz))
                filler = Filler(mnt / "filler").start()
                if not filler.full.wait(30):
                    raise RuntimeError("the filler did not fill the tmpfs")
                t_full = time.time()
                during = paced.send(int(full_s * rate_hz))
                reported = plc.status_since(t_full, lambda d: d.get("state") == "degraded")
                status_full = plc.last_status()
                filler.release()
                t_free = time.time()
                after = paced.send(int(after_s * rate_hz))
                resumed = _resumed_after(plc, t_free)
                wait_until(lambda: all(plc.answers.get(c) for c in after), 5)
                ids = answer_ids(plc, before + during + after)
                lost = count_lost(plc, ids, 15)
                figures = _daemon_figures(daemon)
            finally:
                if filler is not None:
                    filler.release()
        archive = figures["archive"]
        return {
            "fault": "disk_full",
            **tally(plc, during, deadline_ms),
            "lost": lost,
            "duplicates": sum(c - 1 for vid, c in plc.verdict_ids().items() if vid in ids and c > 1),
            "reported_s": None if reported is None else round(reported - t_full, 2),
            "recovery_s": None if resumed is None else round(resumed - t_free, 2),
            "before": tally(plc, before, deadline_ms),
            "after": tally(plc, after, deadline_ms),
            "status_while_full": {k: status_full.get(k) for k in ("state", "problems", "last_error")},
            "dead_threads": figures["dead"],
            "crashed_threads": figures["crashed"],
            "answered_ids": sorted(ids),
            "archive": {k: archive.get(k) for k in ("rows", "rows_deferred", "images_skipped_disk", "disk")},
            "spool": figures["spool"],
        }


def self_fill(rig: Rig, work: Path, seconds: float = 25.0, rate_hz: float = 10.0) -> dict[str, Any]:
    """Row 1 as first seen: an 8 MiB tmpfs that the daemon once filled by itself in 14-23 s (WALs
    outside the quota). Every image kept; the disk must never fill and every part be answered."""
    from anomalygpt_edge.runtime.delivery.spool import free_bytes

    if (why := tmpfs_available()) is not None:
        return {"skipped": why}
    device, deadline_ms = "fself", 1000.0
    with tmpfs(work / "disk8", 8) as mnt:
        storage = {"disk_free_floor_mb": 1, "spool_reserve_mb": 1, "archive_ok_sample_rate": 1.0}
        cfg = write_config(work / "self.yaml", rig, device, mnt / "state", storage=storage)
        corrs, lowest = [], free_bytes(mnt)
        with daemon_and_plc(rig, device, cfg) as (plc, daemon):
            wait_online(plc)
            start = time.monotonic()
            for i in range(int(seconds * rate_hz)):
                time.sleep(max(0.0, start + i / rate_hz - time.monotonic()))
                plc.trigger("cam1", f"s{i}")
                corrs.append(f"s{i}")
                lowest = min(lowest, free_bytes(mnt))
            wait_until(lambda: all(plc.answers.get(c) for c in corrs), 5)
            lost = count_lost(plc, answer_ids(plc, corrs), 10)
            archive = dict(daemon.archive.archive.stats.to_json()) if daemon.archive else {}
            problems = plc.last_status().get("problems")
    return {
        "fault": "self_fill",
        **tally(plc, corrs, deadline_ms),
        "lost": lost,
        "duplicates": sum(c - 1 for c in plc.verdict_ids().values() if c > 1),
        "recovery_s": None,
        "lowest_free_mib": round(lowest / 1024**2, 2),
        "archive": {k: archive.get(k) for k in ("rows", "images_written", "images_evicted", "images_skipped_disk")},
        "problems_at_end": problems,
    }
