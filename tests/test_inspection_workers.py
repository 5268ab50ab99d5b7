"""Several inspection workers on one bundle queue (``engines.workers``): every job is answered
exactly once, one camera is on one worker at a time so its verdicts keep their order, the scores
are those of one worker, and a worker that dies is reported and restarted."""

from __future__ import annotations

import collections
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from daemon_fixtures import Subscriber, broker_fixture, line_fixture, topic_is, write_config  # noqa: F401

from anomalygpt_edge.engines.bundle import EngineBundle
from anomalygpt_edge.runtime.inspection.pipeline import VisionPipeline
from anomalygpt_edge.runtime.inspection.verdict import Verdict
from anomalygpt_edge.runtime.line.batching import BatchPolicy, worker_count
from anomalygpt_edge.runtime.line.config import ConfigError, EnginesConfig, load_config
from anomalygpt_edge.runtime.line.daemon import Daemon
from anomalygpt_edge.runtime.line.inspection_worker import InspectionWorker
from anomalygpt_edge.runtime.line.jobs import Job, WorkQueue
from anomalygpt_edge.runtime.line.status import DaemonHealth
from anomalygpt_edge.runtime.recipes.inspector import Inspector
from anomalygpt_edge.runtime.recipes.store import RecipeStore
from anomalygpt_edge.runtime.tools import synthetic

CAMERAS = ("cam1", "cam2", "cam3", "cam4")


def _until(condition: Any, timeout: float = 30.0) -> None:
    """Wait for ``condition()`` with a bounded deadline (no fixed sleep)."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.005)


class _Slots:
    """The worker's view of the recipe slots: every camera on the same live inspector."""

    def __init__(self, inspector: Inspector):
        self.inspector = inspector

    def current(self, camera: str) -> tuple[Inspector | None, str | None, str | None]:
        return self.inspector, None, self.inspector.recipe.name


class _Publisher:
    """Records every answer attempt: which job, which worker thread, in which order per camera."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempts: collections.Counter[int] = collections.Counter()  # id(job) -> answer() calls
        self.by_camera: dict[str, list[str]] = collections.defaultdict(list)  # camera -> part ids in answer order
        self.scores: dict[str, float | None] = {}
        self.threads: collections.Counter[str] = collections.Counter()

    def answer(self, job: Job, verdict: Verdict, image: Any) -> bool:
        with self.lock:
            self.attempts[id(job)] += 1
        if not job.claim():
            return False
        with self.lock:
            self.by_camera[job.camera].append(str(job.part_id))
            self.scores[f"{job.camera}/{job.part_id}"] = verdict.score
            self.threads[threading.current_thread().name] += 1
        return True

    def answer_error(self, job: Job, reason: str) -> None:
        self.answer(job, Verdict.error("", reason), None)

    def answered(self) -> int:
        with self.lock:
            return sum(len(v) for v in self.by_camera.values())


@pytest.fixture(scope="module", name="inspector")
def inspector_fixture(line: dict[str, Any]) -> Inspector:
    """The live ``bracket`` recipe on the default bundle, as the daemon builds it (one thread)."""
    from anomalygpt_edge.engines.onnxruntime_backend import OnnxRuntimeOptions

    bundle = EngineBundle.open(line["bundle"], backend=OnnxRuntimeOptions(threads=1))
    pipeline = VisionPipeline(bundle)
    store = RecipeStore(line["store"])
    return Inspector(bundle, store.load("bracket"), store, pipeline)


@pytest.fixture(scope="module", name="images")
def images_fixture(line: dict[str, Any]) -> list[np.ndarray]:
    return synthetic.read_video_frames(line["video"])[:12]


def _parts(images: list[np.ndarray], per_camera: int) -> list[Job]:
    """``per_camera`` triggered parts for each camera, camera after camera (cam1's first, ...)."""
    jobs = []
    for camera in CAMERAS:
        for n in range(per_camera):
            job = Job(camera, "trigger", deadline_mono=time.monotonic() + 600.0)
            job.part_id, job.image = f"{camera}-{n}", images[(n * 5 + len(jobs)) % len(images)]
            jobs.append(job)
    return jobs


def _serve(inspector: Inspector, jobs: list[Job], workers: int) -> _Publisher:
    """Put ``jobs`` on one queue, run ``workers`` loops on it until every job is answered; the record."""
    publisher = _Publisher()
    queue, stop = WorkQueue(max_triggered=len(jobs)), threading.Event()
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    policy = BatchPolicy(max_batch=1, max_wait_s=0.0, workers=workers)
    worker = InspectionWorker(_Slots(inspector), publisher, DaemonHealth("dev"), counts, lambda c: 600000.0, policy)  # type: ignore[arg-type]
    for job in jobs:
        assert queue.put_triggered(job)
    loops = [threading.Thread(target=worker.run, args=(queue, stop), name=f"inspect-0-{i}") for i in range(workers)]
    for t in loops:
        t.start()
    try:
        _until(lambda: publisher.answered() == len(jobs), timeout=120.0)
    finally:
        stop.set()
        queue.wake()
        for t in loops:
            t.join(10.0)
    assert not any(t.is_alive() for t in loops), "every loop ends on stop"
    assert queue.counts["batched_jobs"] == len(jobs), "the two loops' counts add up (no lost update)"
    return publisher


def test_two_workers_share_one_queue_and_answer_every_job_exactly_once(
    inspector: Inspector, images: list[np.ndarray]
) -> None:
    jobs = _parts(images, per_camera=6)
    publisher = _serve(inspector, jobs, workers=2)
    assert all(job.answered for job in jobs)
    assert sorted(publisher.attempts[id(job)] for job in jobs) == [1] * len(jobs), "one answer attempt per job"
    assert set(publisher.threads) == {"inspect-0-0", "inspect-0-1"}, f"both loops took work: {publisher.threads}"


def test_one_camera_is_on_one_worker_at_a_time_so_its_verdicts_keep_their_order(
    inspector: Inspector, images: list[np.ndarray]
) -> None:
    # Parts are queued camera after camera: without the hold, the second loop would take cam1's
    # second part while the first inspects its first, and could answer it first.
    jobs = _parts(images, per_camera=8)
    publisher = _serve(inspector, jobs, workers=2)
    for camera in CAMERAS:
        assert publisher.by_camera[camera] == [f"{camera}-{n}" for n in range(8)], camera


def test_a_held_camera_waits_while_other_cameras_are_taken() -> None:
    queue = WorkQueue()
    first, second, other = (Job(c, "trigger", deadline_mono=time.monotonic() + 60) for c in ("cam1", "cam1", "cam2"))
    for job in (first, second, other):
        queue.put_triggered(job)
    assert queue.get_batch(1, 0.0, 1.0, hold=True) == [first]
    assert queue.get_batch(1, 0.0, 1.0, hold=True) == [other], "cam1 is held: cam2's part goes to the second loop"
    assert queue.get_batch(1, 0.0, 0.05, hold=True) == [], "cam1's next part waits for its camera"
    queue.release([first])
    assert queue.get_batch(1, 0.0, 1.0, hold=True) == [second]


def test_two_workers_give_the_scores_of_one_worker(inspector: Inspector, images: list[np.ndarray]) -> None:
    one = _serve(inspector, _parts(images, per_camera=3), workers=1)
    two = _serve(inspector, _parts(images, per_camera=3), workers=2)
    assert len(one.scores) == 12 and all(s is not None for s in one.scores.values())
    assert two.scores == pytest.approx(one.scores, abs=1e-6)


def test_engines_workers_auto_fits_single_thread_inferences_to_the_cores() -> None:
    assert worker_count("auto", threads=1, cpus=2) == 2
    assert worker_count("auto", threads=1, cpus=1) == 1
    assert worker_count("auto", threads=1, cpus=32) == 2, "auto stops at what was measured"
    assert worker_count("auto", threads=2, cpus=2) == 1
    assert worker_count("auto", threads=0, cpus=8) == 1, "a pool on every core: one worker"
    assert worker_count(3, threads=1, cpus=2) == 3, "a number is taken as given"
    assert EnginesConfig().workers == "auto"


@pytest.mark.parametrize("bad", ["two", 0, 1.5, True])
def test_a_bad_engines_workers_is_refused_with_one_line_naming_it(tmp_path: Path, bad: Any) -> None:
    cfg = tmp_path / "w.yaml"
    cameras = {"cam1": {"type": "image_folder", "source": str(tmp_path)}}
    recipes = [{"camera": "cam1", "recipe": "bracket"}]
    body = {"device": {"id": "w"}, "cameras": cameras, "recipes": recipes, "engines": {"workers": bad}}
    cfg.write_text(json.dumps(body))
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    message = str(err.value)
    assert "engines.workers" in message and "must be auto or a whole number" in message and "\n" not in message


def test_a_worker_that_dies_is_reported_and_restarted_while_the_other_keeps_inspecting(
    tmp_path: Path, broker: Any, line: dict[str, Any]
) -> None:
    cameras = {"cam1": {"type": "video_file", "source": str(line["video"]), "fps": 10}}
    recipes = [{"camera": "cam1", "recipe": "bracket", "trigger": "free_run", "fps": 10, "deadline_ms": 3000}]
    cfg = write_config(tmp_path / "w.yaml", broker, cameras, recipes, line["store"], line["bundle"], device="workers")
    data = json.loads(cfg.read_text())
    data["engines"]["workers"] = 2
    cfg.write_text(json.dumps(data))
    sub = Subscriber(broker, ["anomalygpt/workers/+/verdict"])
    daemon = Daemon(load_config(cfg)).start()
    try:
        names = sorted(t.name for t in daemon._threads if t.name.startswith("inspect-"))
        queue = next(iter(daemon.queues.values()))
        real, calls = queue.get_batch, collections.Counter[str]()

        def get_batch(*args: Any, **kwargs: Any) -> list[Job]:
            name = threading.current_thread().name
            calls[name] += 1
            if name == "inspect-0-1" and calls[name] == 1:
                raise RuntimeError("simulated bug in worker 1")
            return real(*args, **kwargs)

        queue.get_batch = get_batch  # type: ignore[method-assign]
        _until(lambda: calls["inspect-0-1"] >= 3, timeout=20.0)  # restarted: the loop takes work again
        problems = daemon.status()["problems"]
        sub.wait_for(topic_is("/cam1/verdict"), count=len(sub.messages) + 3, timeout=30)
        dead = daemon.health.dead_threads()
    finally:
        daemon.stop()
        sub.close()
    assert names == ["inspect-0-0", "inspect-0-1"]
    assert any("inspect-0-1 crashed and was restarted" in p and "simulated bug" in p for p in problems), problems
    assert "inspect-0-1" not in dead and len(daemon._crashes["inspect-0-1"]) == 1
    assert "inspect-0-0" not in daemon._crashes, "the other loop never died"
