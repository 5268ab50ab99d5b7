"""The verdict spool: durable before publish, gone on PUBACK, bounded, and intact after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anomalygpt_edge.runtime.spool import SpoolError, VerdictSpool, mark_redelivered


class FakeClock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def payload(i: int) -> bytes:
    return json.dumps({"id": f"v{i}", "verdict": "OK"}).encode()


def test_put_returns_increasing_seqs_and_pending_lists_them_in_order(tmp_path: Path) -> None:
    with VerdictSpool(tmp_path / "spool.db") as spool:
        seqs = [spool.put(f"v{i}", "a/b/cam/verdict", payload(i)) for i in range(5)]
        assert seqs == sorted(seqs) and len(set(seqs)) == 5
        items = spool.pending(limit=10)
        assert [it.seq for it in items] == seqs
        assert [it.verdict_id for it in items] == [f"v{i}" for i in range(5)]
        assert items[2].payload == payload(2) and items[2].topic == "a/b/cam/verdict"
        assert all(it.attempts == 0 and not it.redelivered for it in items)
        assert [it.seq for it in spool.pending(limit=2)] == seqs[:2]
        assert [it.seq for it in spool.pending(limit=10, after_seq=seqs[2])] == seqs[3:]


def test_ack_removes_only_the_acknowledged_verdict(tmp_path: Path) -> None:
    with VerdictSpool(tmp_path / "spool.db") as spool:
        a, b, c = (spool.put(f"v{i}", "t", payload(i)) for i in range(3))
        assert spool.ack(b) is True
        assert spool.ack(b) is False  # a duplicate PUBACK is harmless
        assert [it.seq for it in spool.pending()] == [a, c]
        assert spool.stats()["depth"] == 2


def test_attempted_items_are_flagged_as_redelivered_and_restamped(tmp_path: Path) -> None:
    with VerdictSpool(tmp_path / "spool.db") as spool:
        seq = spool.put("v1", "t", payload(1))
        spool.mark_attempt(seq)
        (item,) = spool.pending()
        assert item.attempts == 1 and item.redelivered
        restamped = json.loads(mark_redelivered(item.payload))
        assert restamped == {"id": "v1", "verdict": "OK", "redelivered": True}


def test_a_batch_of_attempts_is_recorded_together(tmp_path: Path) -> None:
    with VerdictSpool(tmp_path / "spool.db") as spool:
        seqs = [spool.put(f"v{i}", "t", payload(i)) for i in range(4)]
        spool.mark_attempts(seqs[:3])
        spool.mark_attempts([])
        assert [it.attempts for it in spool.pending()] == [1, 1, 1, 0]


def test_restamping_leaves_non_json_payloads_untouched() -> None:
    assert mark_redelivered(b"\xff\x00not json") == b"\xff\x00not json"
    assert mark_redelivered(b"[1, 2]") == b"[1, 2]"


def test_verdicts_survive_closing_and_reopening(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    with VerdictSpool(path) as spool:
        seqs = [spool.put(f"v{i}", "t", payload(i)) for i in range(3)]
        spool.mark_attempt(seqs[0])
        spool.ack(seqs[1])
    with VerdictSpool(path) as spool:
        items = spool.pending()
        assert [(it.seq, it.attempts) for it in items] == [(seqs[0], 1), (seqs[2], 0)]
        # New seqs never reuse acknowledged ones (AUTOINCREMENT), so a late PUBACK cannot hit a new row.
        assert spool.put("v9", "t", payload(9)) > seqs[2]


def test_full_spool_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    with VerdictSpool(tmp_path / "spool.db", max_rows=3, max_age_s=None) as spool:
        for i in range(5):
            spool.put(f"v{i}", "t", payload(i))
        assert [it.verdict_id for it in spool.pending()] == ["v2", "v3", "v4"]
        stats = spool.stats()
        assert stats["depth"] == 3 and stats["dropped_full"] == 2 and stats["dropped_age"] == 0


def test_verdicts_older_than_max_age_are_dropped_and_counted(tmp_path: Path) -> None:
    clock = FakeClock()
    with VerdictSpool(tmp_path / "spool.db", max_age_s=60, clock=clock) as spool:
        spool.put("old", "t", payload(0))
        clock.t += 30
        spool.put("mid", "t", payload(1))
        assert spool.stats()["oldest_age_s"] == 30
        clock.t += 45  # "old" is now 75 s old, "mid" 45 s
        assert [it.verdict_id for it in spool.pending()] == ["mid"]
        assert spool.stats()["dropped_age"] == 1


def test_drop_counters_persist_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    with VerdictSpool(path, max_rows=1, max_age_s=None) as spool:
        spool.put("a", "t", b"1")
        spool.put("b", "t", b"2")
    with VerdictSpool(path, max_rows=1, max_age_s=None) as spool:
        assert spool.stats()["dropped_full"] == 1


def test_empty_spool_reports_no_oldest_age(tmp_path: Path) -> None:
    with VerdictSpool(tmp_path / "spool.db") as spool:
        assert spool.stats() == {
            "depth": 0,
            "oldest_age_s": None,
            "dropped_full": 0,
            "dropped_age": 0,
            "max_rows": spool.max_rows,
            "max_age_s": spool.max_age_s,
        }


def test_database_is_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    VerdictSpool(path).close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_file_that_is_not_a_database_is_moved_aside_and_a_fresh_spool_started(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with VerdictSpool(path) as spool:
        (event,) = spool.stats()["events"]
        assert event["kind"] == "moved_aside" and "spool.db" in event["message"]
        assert spool.put("v1", "t", payload(1)) >= 1  # the line goes on with a fresh spool
    (moved,) = tmp_path.glob("spool.db.corrupt-*")
    assert moved.read_bytes() == b"this is not sqlite" * 100  # kept as evidence, never deleted


def test_a_folder_that_cannot_be_created_is_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(SpoolError, match="cannot create its folder"):
        VerdictSpool(tmp_path / "file" / "spool.db")


@pytest.mark.parametrize("kwargs", [{"max_rows": 0}, {"max_age_s": 0}, {"synchronous": "OFF"}])
def test_invalid_bounds_are_refused(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        VerdictSpool(tmp_path / "spool.db", **kwargs)


_WRITER = """
import sys
from anomalygpt_edge.runtime.spool import VerdictSpool
spool = VerdictSpool(sys.argv[1])
i = 0
while True:
    seq = spool.put(f"v{i}", "t", b'{"id": "v%d"}' % i)
    if i % 3 == 0:
        spool.ack(seq)  # acks interleave with puts, as PUBACKs do
    # Reported only after put() returned: this is the "acknowledged as captured" promise.
    print(seq, i, flush=True)
    i += 1
"""


def test_every_put_that_returned_survives_sigkill_mid_writes(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    reported: list[tuple[int, int]] = []
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while len(reported) < 200 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seq, i = map(int, line.split())
        reported.append((seq, i))
    os.kill(proc.pid, signal.SIGKILL)  # mid-stream: the writer is inside its loop
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert len(reported) >= 200, "the writer did not get going"

    with VerdictSpool(path) as spool:
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        present = {it.seq for it in spool.pending(limit=100_000)}
        expected = {seq for seq, i in reported if i % 3 != 0}
        acked = {seq for seq, i in reported if i % 3 == 0}
        assert expected <= present, f"lost after SIGKILL: {sorted(expected - present)[:10]}"
        assert not (acked & present), "an acknowledged verdict came back"
        # The reopened spool keeps working.
        new = spool.put("after", "t", b"{}")
        assert new > max(present)
