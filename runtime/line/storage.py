"""The daemon's local storage: the verdict spool and the archive under one disk budget.

A damaged store is moved aside at start-up, never fatal; an archive that cannot be opened at all
leaves the line running without it (the archive is the local record, not the PLC's answer). What
is wrong with the disk, the spool or the archive is listed by :meth:`LineStorage.problems`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from anomalygpt_edge.runtime.delivery.archive import Archive, ArchiveError, ArchiveWriter, DiskBudget
from anomalygpt_edge.runtime.delivery.spool import VerdictSpool

if TYPE_CHECKING:
    from anomalygpt_edge.runtime.line.config import StorageConfig

log = logging.getLogger(__name__)
#: How long a store moved aside at start-up keeps the status degraded.
EVENT_DEGRADED_S = 300.0
MB = 1024**2


class LineStorage:
    """Spool, archive and disk budget of ``storage.data``; ``report`` receives every error message."""

    def __init__(self, config: StorageConfig, report: Callable[[str], None]):
        self.config = config
        self.report = report
        self.spool: VerdictSpool | None = None
        self.archive: ArchiveWriter | None = None
        self.disk: DiskBudget | None = None
        self.archive_problem: str | None = None  # the archive could not be opened at all

    def open(self) -> None:
        """Open the disk budget, the spool (when enabled) and the archive (when enabled)."""
        st = self.config
        floor, reserve = st.disk_free_floor_mb * MB, st.spool_reserve_mb * MB
        self.disk = DiskBudget(st.data, st.disk_budget_mb * MB, floor, reserve if st.spool else 0)
        if st.spool:
            self.spool = VerdictSpool(
                st.data / "spool.db",
                max_rows=st.spool_max_rows,
                max_age_s=st.spool_max_age_s,
                reserve_bytes=reserve,
                free_floor_bytes=floor,
            )
            self.disk.track(self.spool.path)
            for event in self.spool.events:
                self.report(event["message"])
        if st.archive:
            self._open_archive()

    def _open_archive(self) -> None:
        st = self.config
        try:
            archive = Archive(
                st.data / "archive",
                quota_bytes=st.archive_quota_mb * MB,
                ok_sample_rate=st.archive_ok_sample_rate,
                disk=self.disk,
            )
        except ArchiveError as exc:
            self.archive_problem = f"archive not available, verdicts are not archived: {exc}"
            log.error("%s", self.archive_problem)
            self.report(self.archive_problem)
            return
        for event in archive.events:
            self.report(event["message"])
        self.archive = ArchiveWriter(archive, on_error=self.report)

    def close(self) -> None:
        """Flush and close the archive, then the spool."""
        if self.archive is not None:
            self.archive.close()
        if self.spool is not None:
            self.spool.close()

    def problems(self) -> list[str]:
        """Disk below its floor, spool reserve released, stores moved aside, archive rows waiting."""
        out: list[str] = []
        if self.disk is not None:
            level, used, free = self.disk.measure()
            if level != "ok":
                what = "archive stopped writing images" if level == "low" else "archive stopped writing"
                out.append(
                    f"disk {level}: {free / MB:.1f} MiB free (floor {self.disk.floor_bytes / MB:.1f} MiB),"
                    f" {used / MB:.1f} MiB used by the daemon; {what}"
                )
        if self.spool is not None:
            if not self.spool.reserve.held:
                out.append("spool reserve released: the disk filled up")
            out += _recent(self.spool.events)
        if self.archive_problem:
            out.append(self.archive_problem)
        if self.archive is not None:
            archive = self.archive.archive
            if waiting := archive.deferred_rows():
                out.append(f"archive: {waiting} rows waiting for disk space")
            out += _recent(archive.events)
        return out


def _recent(events: list[dict[str, Any]]) -> list[str]:
    """Messages of store events younger than EVENT_DEGRADED_S."""
    now = time.time()
    return [e["message"] for e in events if now - event_time(e) < EVENT_DEGRADED_S]


def event_time(event: dict[str, Any]) -> float:
    """Epoch seconds of a store event (``at``: ``20261201T213000Z`` or ISO); 0 when unreadable."""
    text = str(event.get("at", ""))
    with contextlib.suppress(ValueError):
        return dt.datetime.strptime(text, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc).timestamp()
    with contextlib.suppress(ValueError):
        return dt.datetime.fromisoformat(text).timestamp()
    return 0.0
