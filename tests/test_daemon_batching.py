"""Micro-batching in the inspection worker: triggered parts never wait for a batch, batches stay
within their bound, each job is judged by its own recipe, and an engine failure answers every job
of its batch with ERROR."""

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
from anomalygpt_edge.runtime.line import inspection_worker
from anomalygpt_edge.runtime.line.batching import BatchCost, BatchPolicy
from anomalygpt_edge.runtime.line.config import load_config
from anomalygpt_edge.runtime.line.daemon import Daemon
from anomalygpt_edge.runtime.line.inspection_worker import InspectionWorker
from anomalygpt_edge.runtime.line.jobs import Job, WorkQueue
from anomalygpt_edge.runtime.recipes.enrollment import Enroller
from anomalygpt_edge.runtime.recipes.inspector import Inspector, inspect_many
from anomalygpt_edge.runtime.recipes.store import RecipeStore
from anomalygpt_edge.runtime.tools import synthetic


def _job(camera: str, kind: str, n: int, image: np.ndarray | None = None, deadline_s: float = 30.0) -> Job:
    job = Job(camera, kind, deadline_mono=time.monotonic() + deadline_s)  # type: ignore[arg-type]
    job.part_id, job.image = str(n), image
    return job


def _until(condition: Any, timeout: float = 10.0) -> None:
    """Wait for ``condition()`` with a bounded deadline (no fixed sleep)."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.005)


class _Slots:
    """The worker's view of the recipe slots: each camera's current inspector, switchable."""

    def __init__(self, inspectors: dict[str, Inspector]):
        self.inspectors = dict(inspectors)

    def current(self, camera: str) -> tuple[Inspector | None, str | None, str | None]:
        inspector = self.inspectors.get(camera)
        return inspector, None, inspector.recipe.name if inspector else None


class _Publisher:
    """Records the one answer of each job."""

    def __init__(self) -> None:
        self.answers: dict[str, Verdict] = {}

    def answer(self, job: Job, verdict: Verdict, image: Any) -> bool:
        if not job.claim():
            return False
        self.answers[f"{job.camera}/{job.part_id}"] = verdict
        return True

    def answer_error(self, job: Job, reason: str) -> None:
        self.answer(job, Verdict.error("", reason), None)


class _Health:
    def tick(self, loop: str) -> None:
        pass

    def forget_loop(self, loop: str) -> None:
        pass


def _worker(slots: _Slots, publisher: _Publisher, max_batch: int = 8) -> InspectionWorker:
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    policy = BatchPolicy(max_batch=max_batch, max_wait_s=0.0)
    return InspectionWorker(slots, publisher, _Health(), counts, lambda camera: 30000.0, policy)  # type: ignore[arg-type]


@pytest.fixture(scope="module", name="recipes")
def recipes_fixture(line: dict[str, Any]) -> dict[str, Any]:
    """Two live recipes of one bundle on one shared pipeline, as RecipeSlots builds them."""
    bundle = EngineBundle.open(line["bundle"])
    store = RecipeStore(line["store"])
    golden = synthetic.read_video_frames(line["golden"])
    enroller = Enroller(store, bundle)
    enroller.open_or_create("plate")  # no ROI: the whole frame, another bank than bracket's
    assert enroller.add("plate", [(f"g{i}", im) for i, im in enumerate(golden)]).recipe.live
    pipeline = VisionPipeline(bundle)
    return {
        "bracket": Inspector(bundle, store.load("bracket"), store, pipeline),
        "plate": Inspector(bundle, store.load("plate"), store, pipeline),
        "pipeline": pipeline,
        "images": synthetic.read_video_frames(line["video"])[:6],
    }


def test_a_triggered_part_is_not_delayed_by_a_filling_batch() -> None:
    q = WorkQueue()
    q.put_free(_job("cam2", "free_run", -1))
    q.put_free(_job("cam2", "free_run", 0))  # cam2 now sends frames back to back: a batch waits for its next
    assert len(q.get_batch(8, 0.0, 1.0)) == 1
    q.put_free(_job("cam1", "free_run", 1))
    got: list[list[Job]] = []
    taker = threading.Thread(target=lambda: got.append(q.get_batch(8, 30.0, 30.0)))
    started = time.monotonic()
    taker.start()
    _until(lambda: q.batch_waiters == 1)  # the batch is held open for cam2's frame (up to 30 s)
    q.put_triggered(_job("cam3", "trigger", 2))
    taker.join(10.0)
    assert not taker.is_alive() and time.monotonic() - started < 10.0, "the trigger released the batch at once"
    assert [(j.camera, j.kind) for j in got[0]] == [("cam3", "trigger"), ("cam1", "free_run")]


def test_free_run_frames_wait_for_a_batch_no_longer_than_their_deadline_allows() -> None:
    q = WorkQueue()
    q.put_free(_job("cam2", "free_run", -1))
    q.put_free(_job("cam2", "free_run", 0))
    q.get_batch(8, 0.0, 1.0)
    q.put_free(_job("cam1", "free_run", 1, deadline_s=0.3))
    started = time.monotonic()
    batch = q.get_batch(8, 30.0, 30.0, cost_s=lambda n: 0.1)
    assert [j.part_id for j in batch] == ["1"] and time.monotonic() - started < 5.0


def test_free_run_frames_do_not_wait_for_a_camera_whose_next_frame_is_due_after_the_wait() -> None:
    q = WorkQueue()
    q.put_free(_job("cam2", "free_run", -1))
    q.put_free(_job("cam2", "free_run", 0))
    q.get_batch(8, 0.0, 1.0)
    q._period["cam2"] = 0.9  # cam2's next frame is due after the 0.6 s window (and within its 1 s activity)
    q.put_free(_job("cam1", "free_run", 1))
    started = time.monotonic()
    assert [j.part_id for j in q.get_batch(8, 0.6, 30.0)] == ["1"]
    assert time.monotonic() - started < 0.5, "no wait for a frame that cannot join"


def test_batches_never_exceed_the_bound() -> None:
    q = WorkQueue()
    for n in range(20):
        assert q.put_triggered(_job(f"cam{n % 3}", "trigger", n))
    for n in range(5):
        q.put_free(_job(f"free{n}", "free_run", 100 + n))
    batches = list(iter(lambda: q.get_batch(3, 0.05, 0.01), []))
    assert all(1 <= len(b) <= 3 for b in batches)
    order = [j.part_id for b in batches for j in b]
    assert order == [str(n) for n in range(20)] + [str(100 + n) for n in range(5)], "each once, triggers first"


def test_a_batch_of_triggers_leaves_waiting_frames_queued_when_they_would_make_it_late() -> None:
    q = WorkQueue()
    q.put_triggered(_job("cam1", "trigger", 0, deadline_s=0.5))
    q.put_free(_job("cam2", "free_run", 1))
    batch = q.get_batch(8, 0.0, 1.0, cost_s=lambda n: 0.3 * n)  # two images would end after the deadline
    assert [j.part_id for j in batch] == ["0"]
    assert [j.part_id for j in q.get_batch(8, 0.0, 1.0)] == ["1"], "the frame waited for the next batch"


def test_a_free_run_frame_that_would_finish_after_its_deadline_is_not_added_to_a_batch() -> None:
    q = WorkQueue()
    q.put_free(_job("cam1", "free_run", 0, deadline_s=30))
    q.put_free(_job("cam2", "free_run", 1, deadline_s=0.5))
    batch = q.get_batch(8, 0.0, 1.0, cost_s=lambda n: 0.3 * n)  # two images: 0.6 s, after cam2's deadline
    assert [j.part_id for j in batch] == ["0"]
    assert [j.part_id for j in q.get_batch(8, 0.0, 1.0)] == ["1"], "left queued, not inspected late"


def test_the_worker_never_inspects_more_than_max_batch_at_once(
    recipes: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []

    def counting(items: Any) -> list[Verdict]:
        sizes.append(len(items))
        return inspect_many(items)

    monkeypatch.setattr(inspection_worker, "inspect_many", counting)
    publisher = _Publisher()
    worker = _worker(_Slots({"cam1": recipes["bracket"]}), publisher, max_batch=2)
    q, stop = WorkQueue(), threading.Event()
    for n in range(5):
        q.put_triggered(_job("cam1", "trigger", n, recipes["images"][n]))
    runner = threading.Thread(target=worker.run, args=(q, stop))
    runner.start()
    try:
        _until(lambda: len(publisher.answers) == 5, timeout=60)
    finally:
        stop.set()
        runner.join(10)
    assert sizes and max(sizes) <= 2 and sum(sizes) == 5
    assert all(v.verdict in ("OK", "NG") for v in publisher.answers.values())


def test_a_recipe_switch_mid_batch_answers_each_job_with_its_own_recipe(
    recipes: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline, images = recipes["pipeline"], recipes["images"]
    runs = collections.Counter[str]()
    for name in ("encoder", "matcher"):
        engine = getattr(pipeline, name)
        original = engine.run
        monkeypatch.setattr(engine, "run", lambda feeds, _o=original, _n=name: (runs.update([_n]), _o(feeds))[1])
    slots, publisher = _Slots({"cam1": recipes["bracket"], "cam2": recipes["bracket"]}), _Publisher()
    jobs = [_job("cam1", "trigger", 0, images[0]), _job("cam2", "free_run", 1, images[1])]
    slots.inspectors["cam2"] = recipes["plate"]  # cmd/recipe switches cam2 while both jobs are queued
    jobs.append(_job("cam1", "trigger", 2, images[2]))
    assert _worker(slots, publisher).inspect_batch(jobs) == 3
    assert {k: v.recipe for k, v in publisher.answers.items()} == {
        "cam1/0": "bracket",
        "cam2/1": "plate",
        "cam1/2": "bracket",
    }
    assert runs == {"encoder": 1, "matcher": 2}, "one encoder run for the batch, one bank match per recipe"
    for key, image, recipe in (("cam1/0", images[0], "bracket"), ("cam2/1", images[1], "plate")):
        alone = recipes[recipe].inspect(image)
        assert publisher.answers[key].score == pytest.approx(alone.score, rel=1e-4, abs=1e-5), "same as one at a time"


def test_an_engine_error_in_a_batch_answers_every_job_in_it_with_error(
    recipes: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(feeds: Any) -> Any:
        raise RuntimeError("encoder session died")

    monkeypatch.setattr(recipes["pipeline"].encoder, "run", broken)
    slots, publisher = _Slots({"cam1": recipes["bracket"], "cam2": recipes["plate"]}), _Publisher()
    images = recipes["images"]
    jobs = [_job("cam1", "trigger", 0, images[0]), _job("cam2", "free_run", 1, images[1])]
    jobs.append(_job("cam1", "folder_watch", 2, images[2]))
    _worker(slots, publisher).inspect_batch(jobs)
    assert sorted(publisher.answers) == ["cam1/0", "cam1/2", "cam2/1"]
    for verdict in publisher.answers.values():
        assert verdict.verdict == "ERROR" and "encoder session died" in (verdict.reason or "")
    assert {v.recipe for v in publisher.answers.values()} == {"bracket", "plate"}


def test_a_matcher_error_fails_only_the_jobs_of_that_recipe(
    recipes: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    plate = recipes["plate"]
    monkeypatch.setattr(plate, "maps", lambda features: (_ for _ in ()).throw(RuntimeError("bank damaged")))
    slots, publisher = _Slots({"cam1": recipes["bracket"], "cam2": plate}), _Publisher()
    images = recipes["images"]
    jobs = [_job("cam1", "trigger", 0, images[0]), _job("cam2", "trigger", 1, images[1])]
    _worker(slots, publisher).inspect_batch(jobs)
    failed = publisher.answers["cam2/1"]
    assert publisher.answers["cam1/0"].verdict in ("OK", "NG")
    assert failed.verdict == "ERROR" and "bank damaged" in (failed.reason or "")


def test_the_batch_cost_estimate_follows_a_slower_batch_at_once_and_a_faster_one_slowly() -> None:
    cost = BatchCost(first_guess_per_image_s=0.02)
    assert cost.predict(4) == pytest.approx(0.08), "linear in the batch size"
    cost.observe(2, 0.2)  # 100 ms an image: the box got busy
    assert cost.predict(1) == pytest.approx(0.06), "half way up at once"
    cost.observe(4, 0.04)  # 10 ms an image
    assert 0.05 < cost.predict(1) < 0.06, "only a little way down"


def test_the_engines_section_gives_the_batch_bounds(tmp_path: Path) -> None:
    from anomalygpt_edge.runtime.line.config import EnginesConfig

    assert BatchPolicy.from_engines(EnginesConfig(max_batch=4, max_wait_ms=20, workers=3)) == BatchPolicy(4, 0.02, 3)
    default = BatchPolicy.from_engines(EnginesConfig())
    assert default.max_batch >= 1 and default.max_wait_s <= 0.05, "a safe default: never a long wait"


def test_two_cameras_sharing_a_bundle_are_inspected_in_batches_and_every_trigger_is_answered_once(
    tmp_path: Path, broker: Any, line: dict[str, Any]
) -> None:
    names = ("cam1", "cam2")
    cameras = {n: {"type": "video_file", "source": str(line["video"]), "fps": 10} for n in names}
    recipes = [{"camera": n, "recipe": "bracket", "trigger": "free_run", "fps": 10, "deadline_ms": 3000} for n in names]
    cfg = write_config(tmp_path / "b.yaml", broker, cameras, recipes, line["store"], line["bundle"], device="batch")
    data = json.loads(cfg.read_text())
    data["engines"].update({"max_batch": 4, "max_wait_ms": 150})  # a frame waits for the other camera's
    cfg.write_text(json.dumps(data))
    sub = Subscriber(broker, ["anomalygpt/batch/+/verdict", "plc/batch"])
    daemon = Daemon(load_config(cfg)).start()
    n = 6
    try:
        for camera in names:
            sub.wait_for(topic_is(f"/{camera}/verdict"), count=4, timeout=60)
        for i in range(n):
            body = json.dumps({"camera": names[i % 2], "part_id": f"T{i}"})
            sub.publish("anomalygpt/batch/cmd/trigger", body, response_topic="plc/batch", correlation=f"{i}".encode())
        answers = sub.wait_for(topic_is("plc/batch"), count=n, timeout=60)
        stats = daemon.stats()
    finally:
        daemon.stop()
        sub.close()
    assert sorted(bytes(m.properties.CorrelationData).decode() for m in answers) == [str(i) for i in range(n)]
    assert all(m.json()["verdict"] in ("OK", "NG", "ERROR") for m in answers)
    queue = next(iter(stats["queues"].values()))
    assert queue["batched_jobs"] > queue["batches"] > 0, "frames of the two cameras shared engine runs"
