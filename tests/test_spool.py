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

from anomalygpt_edge.runtime.delivery.spool import SpoolError, VerdictSpool, mark_redelivered


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
from anomalygpt_edge.runtime.delivery.spool import VerdictSpool
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


def _cap_pages(spool: VerdictSpool, extra: int) -> None:
    """SQLite's own page limit: the next growth fails with SQLITE_FULL, as a full disk does."""
    n = spool._db.execute("PRAGMA page_count").fetchone()[0]
    spool._db.execute(f"PRAGMA max_page_count={n + extra}")


def test_a_full_disk_is_a_spool_error_never_a_raw_sqlite_error_and_the_spool_recovers(tmp_path: Path) -> None:
    # Issue 12 row 1: the explicit ROLLBACK after SQLite had already rolled back raised a raw
    # sqlite3.OperationalError that killed the inspection thread.
    spool = VerdictSpool(tmp_path / "spool.db", max_age_s=None)
    _cap_pages(spool, 2)
    big = json.dumps({"id": "x", "pad": "a" * 3000}).encode()
    with pytest.raises(SpoolError, match="full"):
        for i in range(100):
            spool.put(f"v{i}", "t", big)
    assert not spool._db.in_transaction
    spool._db.execute("PRAGMA max_page_count=1000000")  # space returns
    assert spool.put("after", "t", payload(1)) > 0
    assert spool.stats()["disk_full_errors"] >= 1
    spool.close()


def test_the_reserve_is_released_when_the_disk_fills_and_taken_back_when_space_returns(tmp_path: Path) -> None:
    spool = VerdictSpool(tmp_path / "spool.db", max_age_s=None, reserve_bytes=256 * 1024)
    reserve = tmp_path / "spool.reserve"
    assert reserve.stat().st_size == 256 * 1024 and spool.stats()["reserve_held"] is True
    _cap_pages(spool, 0)  # full: the first commit fails, the reserve goes, the retry fails too here
    with pytest.raises(SpoolError):
        spool.put("v1", "t", json.dumps({"pad": "a" * 20000}).encode())
    assert not reserve.exists() and spool.stats()["reserve_held"] is False
    spool._db.execute("PRAGMA max_page_count=1000000")
    spool.maintain()
    assert reserve.exists() and spool.stats()["reserve_held"] is True
    spool.close()


def test_a_group_commit_stores_many_verdicts_and_acks_in_one_transaction(tmp_path: Path) -> None:
    with VerdictSpool(tmp_path / "spool.db") as spool:
        first = spool.put_many([(f"v{i}", "t", payload(i)) for i in range(3)])
        more = spool.put_many([("v3", "t", payload(3), 1)], ack_seqs=first[:2])
        assert [(it.verdict_id, it.attempts) for it in spool.pending()] == [("v2", 0), ("v3", 1)]
        assert more[0] > first[-1]
        spool.ack_many([first[2]])
        assert [it.verdict_id for it in spool.pending()] == ["v3"]


def test_a_row_that_cannot_be_decoded_is_quarantined_and_does_not_block_the_rows_behind_it(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    with VerdictSpool(path) as spool:
        spool.put("v0", "t", payload(0))
    with sqlite3.connect(path) as db:  # what flipped bytes in a record leave: wrong types, not JSON
        db.execute("INSERT INTO spool(verdict_id, topic, payload, created) VALUES ('bad1', x'00', '{}', 1e12)")
        db.execute("INSERT INTO spool(verdict_id, topic, payload, created) VALUES ('bad2', 't', x'fffe', 1e12)")
        db.execute("INSERT INTO spool(verdict_id, topic, payload, created) VALUES ('v3', 't', '{}', 1e12)")
    with VerdictSpool(path, max_age_s=None) as spool:
        assert [it.verdict_id for it in spool.pending()] == ["v0", "v3"]
        assert [it.verdict_id for it in spool.pending()] == ["v0", "v3"]  # not retried
        assert spool.stats()["quarantined"] == 2
        assert {q["verdict_id"]: q["reason"] for q in spool.quarantined()} == {
            "bad1": "topic is not a publishable topic (b'\\x00')",
            "bad2": "payload is not JSON",
        }


def test_a_spool_that_comes_back_empty_reports_the_verdicts_it_had(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    with VerdictSpool(path) as spool:
        for i in range(7):
            spool.put(f"v{i}", "t", payload(i))
    path.write_bytes(b"")  # zero-length, as a failed copy or a bad restore leaves it
    for side in ("-wal", "-shm"):
        path.with_name(path.name + side).unlink(missing_ok=True)
    with VerdictSpool(path) as spool:
        stats = spool.stats()
        assert stats["lost_on_open"] == 7 and stats["depth"] == 0
        assert "7 pending verdicts" in stats["events"][-1]["message"]


@pytest.mark.parametrize("damage", ["truncated", "header", "rows"])
def test_a_damaged_spool_is_moved_aside_and_its_readable_rows_carried_over(tmp_path: Path, damage: str) -> None:
    from anomalygpt_edge.runtime.tools.fault_bench import damage_spool

    path = tmp_path / "spool.db"
    with VerdictSpool(path) as spool:
        ids = [f"id-{i:03d}-{'x' * 30}" for i in range(60)]
        bodies = [json.dumps({"schema": "s", "id": vid, "pad": "p" * 100}).encode() for vid in ids]
        spool.put_many([(vid, "t", body) for vid, body in zip(ids, bodies, strict=True)])
    bad = damage_spool(path, damage, ids)
    with VerdictSpool(path) as spool:
        got = [it.verdict_id for it in spool.pending(limit=1000)]
        stats = spool.stats()
    assert got == [i for i in ids if i in set(got)], "order kept"
    accounted = len(got) + stats.get("quarantined", 0) + stats.get("lost_on_open", 0)
    assert accounted == len(ids), stats
    if damage == "rows":
        assert len(got) == len(ids) - len(bad) and stats["quarantined"] == len(bad)
    else:
        assert stats["events"][0]["kind"] == "moved_aside" and list(tmp_path.glob("spool.db.corrupt-*"))
    if damage == "header":
        assert got == ids  # only the magic string was damaged: every row is carried over


def test_a_spool_locked_by_another_process_is_refused_not_moved_aside(tmp_path: Path) -> None:
    # Moving aside is for damaged files only: a second daemon on the same data folder must not
    # rename the first one's good spool away.
    path = tmp_path / "spool.db"
    VerdictSpool(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA journal_mode=DELETE")  # leave WAL mode, then hold the write lock
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(SpoolError, match="locked"):
            VerdictSpool(path, lock_timeout_s=0.2)
    finally:
        holder.rollback()
        holder.close()
    assert not list(tmp_path.glob("spool.db.corrupt-*"))
