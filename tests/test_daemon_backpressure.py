"""Back-pressure: free-run frames are dropped oldest-first when the engine cannot keep up, while
every triggered part is answered exactly once, even in a burst larger than the queue."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from daemon_fixtures import (  # noqa: F401 - fixtures are used by name
    Subscriber,
    broker_fixture,
    line_fixture,
    topic_is,
    write_config,
)

from anomalygpt_edge.runtime.line.config import load_config
from anomalygpt_edge.runtime.line.daemon import Daemon
from anomalygpt_edge.runtime.line.jobs import Job, WorkQueue


def _job(camera: str, kind: str, n: int) -> Job:
    job = Job(camera, kind, deadline_mono=time.monotonic() + 10)
    job.part_id = str(n)
    return job


def test_the_work_queue_keeps_the_newest_free_run_frame_and_serves_triggers_first() -> None:
    q = WorkQueue(max_triggered=2)
    for n in range(5):
        q.put_free(_job("cam1", "free_run", n))
    q.put_free(_job("cam2", "free_run", 0))
    assert q.put_triggered(_job("cam1", "trigger", 100)) and q.put_triggered(_job("cam2", "trigger", 101))
    assert not q.put_triggered(_job("cam1", "trigger", 102)), "a full trigger queue refuses (the caller answers ERROR)"
    order = [(j.kind, j.camera, j.part_id) for j in iter(lambda: q.get(0.01), None)]
    assert order == [
        ("trigger", "cam1", "100"),
        ("trigger", "cam2", "101"),
        ("free_run", "cam1", "4"),  # the newest of five; four were superseded
        ("free_run", "cam2", "0"),
    ]
    assert q.counts["superseded"] == 4 and q.counts["triggered_refused"] == 1


def test_a_burst_of_triggers_on_a_busy_line_gets_one_answer_each_and_free_run_drops_old_frames(
    tmp_path: Path, broker: Any, line: dict
) -> None:
    # 30 fps camera, free-run at 30 fps: more than one engine thread on 2 cores keeps up with.
    cameras = {"cam1": {"type": "video_file", "source": str(line["video"]), "fps": 30}}
    recipes = [{"camera": "cam1", "recipe": "bracket", "trigger": "free_run", "fps": 30, "deadline_ms": 400}]
    cfg = write_config(tmp_path / "b.yaml", broker, cameras, recipes, line["store"], line["bundle"], device="burst")
    sub = Subscriber(broker, ["anomalygpt/burst/cam1/verdict", "plc/burst"])
    daemon = Daemon(load_config(cfg)).start()
    n = 80  # more than the trigger queue holds (64)
    try:
        sub.wait_for(topic_is("/cam1/verdict"), count=5)
        for i in range(n):
            sub.publish("anomalygpt/burst/cmd/trigger", f'{{"camera": "cam1", "part_id": "B{i}"}}',
                        response_topic="plc/burst", correlation=f"{i}".encode())  # fmt: skip
        answers = sub.wait_for(topic_is("plc/burst"), count=n, timeout=30)
        # A fixed absence window: no event says that no late or duplicate answer is coming.
        time.sleep(1.0)  # anything late or duplicated would arrive now
        stats = daemon.stats()
    finally:
        daemon.stop()
        sub.close()
    all_answers = [m for m in sub.messages if m.topic == "plc/burst"]
    corr = [bytes(m.properties.CorrelationData).decode() for m in all_answers]
    assert sorted(corr, key=int) == [str(i) for i in range(n)], "exactly one answer per triggered part"
    bodies = [m.json() for m in answers]
    assert all(b["verdict"] in ("OK", "NG", "ERROR") for b in bodies)
    errors = [b["reason"] for b in bodies if b["verdict"] == "ERROR"]
    assert all("deadline exceeded" in r or "queue full" in r for r in errors), errors
    assert len(errors) < n, "most triggered parts are inspected"
    queue = next(iter(stats["queues"].values()))
    assert queue.get("superseded", 0) + stats["cameras"]["cam1"].get("stale", 0) > 0, "free-run dropped old frames"
