"""The line's per-camera counters lose no count when several threads add at once."""

from __future__ import annotations

import threading

from anomalygpt_edge.runtime.line.line_counts import LineCounts


def test_threads_adding_to_one_camera_lose_no_count() -> None:
    counts = LineCounts(["cam1", "cam2"])
    per_thread, threads = 20_000, 4

    def add() -> None:
        for _ in range(per_thread):
            counts.add("cam1", "verdicts")

    workers = [threading.Thread(target=add) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert counts["cam1"]["verdicts"] == per_thread * threads
    assert counts["cam2"] == {}


def test_a_reader_gets_a_copy_and_an_unknown_camera_is_ignored() -> None:
    counts = LineCounts(["cam1"])
    counts.add("cam1", "OK", 2)
    snapshot = counts["cam1"]
    counts.add("cam1", "OK")
    counts.add("no-such-camera", "OK")
    assert snapshot == {"OK": 2}
    assert {k: dict(v) for k, v in counts.items()} == {"cam1": {"OK": 3}}
