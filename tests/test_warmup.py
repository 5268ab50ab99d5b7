"""Warm-up before READY (issue 16, item 5): every live recipe's engines run once per batch shape
before the daemon tells systemd READY=1 and before its status says ``online``.

Not a timed test: the evidence is the order of events (engine runs recorded with their batch
size, the warm-up record, READY=1's arrival at a stand-in notify socket), never a latency.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import faults  # tests/faults.py: bounded condition waits
import numpy as np
import pytest
from daemon_fixtures import line_fixture  # noqa: F401 - fixtures are used by name
from test_daemon_systemd import NotifySocket

from anomalygpt_edge.engines.base import Engine
from anomalygpt_edge.runtime.delivery.null_link import NullLink
from anomalygpt_edge.runtime.line.config import load_config
from anomalygpt_edge.runtime.line.daemon import Daemon
from anomalygpt_edge.runtime.line.recipe_slots import warmup_batches, warmup_image


class RecordingLink(NullLink):
    """The standalone link, keeping every status document the daemon publishes."""

    def __init__(self) -> None:
        super().__init__("warm")
        self.statuses: list[dict[str, Any]] = []

    def publish_json(self, topic: str, body: Any, qos: int = 1, retain: bool = False) -> Any:
        if topic.endswith("/status"):
            self.statuses.append(body)
        return super().publish_json(topic, body, qos=qos, retain=retain)


def _config(tmp_path: Path, line: dict, **engines: Any) -> Path:
    cfg = {
        "device": {"id": "warm"},
        "cameras": {"cam1": {"type": "video_file", "source": str(line["video"]), "fps": 10}},
        "recipes": [{"camera": "cam1", "recipe": "bracket", "trigger": "mqtt", "deadline_ms": 2000}],
        "engines": {"bundle": str(line["bundle"]), "backend": "onnxruntime", **engines},
        "storage": {"store": str(line["store"]), "data": str(tmp_path / "state")},
        "health": {"heartbeat_s": 0.5},
    }
    path = tmp_path / "warm.yaml"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(name="engine_runs")
def engine_runs_fixture(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, str, int]]:
    """Every engine run in this process as (monotonic time, graph file, batch size)."""
    runs: list[tuple[float, str, int]] = []
    original = Engine.run

    def recording(self: Engine, feeds: Any) -> dict[str, np.ndarray]:
        out = original(self, feeds)
        batch = next(iter(feeds.values())).shape[0]
        runs.append((time.monotonic(), self.name, int(batch)))
        return out

    monkeypatch.setattr(Engine, "run", recording)
    return runs


@pytest.fixture(name="notify")
def notify_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    sock = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    yield sock
    sock.close()


def test_every_engine_runs_at_each_batch_shape_before_ready(
    tmp_path: Path, line: dict, engine_runs: list, notify: NotifySocket
) -> None:
    link = RecordingLink()
    daemon = Daemon(load_config(_config(tmp_path, line)), link=link)
    assert daemon.status()["state"] == "starting", "not online before the engines ran"
    daemon.start()
    try:
        ready = notify.wait_for("READY=1", 30)
        assert ready is not None, "no READY=1"
        shapes = warmup_batches(daemon.config.engines)  # 1, and engines.max_batch where configured
        assert shapes[0] == 1
        warm = daemon.slots.warmups
        assert [(w.recipe, w.batch, w.error) for w in warm] == [("bracket", b, None) for b in shapes]
        assert all(w.finished_at < ready for w in warm), "READY=1 came before the warm-up ended"
        before_ready = [(name, batch) for t, name, batch in engine_runs if t < ready]
        for graph in ("encoder", "bank_matcher"):
            ran = sorted({b for name, b in before_ready if name.startswith(graph)})
            assert ran == shapes, f"{graph} ran at batch sizes {ran} before READY=1, not {shapes}"
        status = daemon.status()
        assert status["state"] == "online", status["problems"]
        assert status["warmup"] == [w.to_json() for w in warm]
        messages = [m for _, m in list(notify.messages)]
        assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in messages), messages
        assert any("warming up bracket" in m for m in messages), messages
    finally:
        daemon.stop()
    # The standalone link publishes no status on connect, so its first one is the announcement
    # after the warm-up (the MQTT link's on-connect status says ``starting``: see above).
    states = [doc["state"] for doc in link.statuses]
    assert "online" in states, states
    assert "starting" not in states[states.index("online") :], "back to starting after online"


def test_status_says_starting_and_no_ready_while_the_warm_up_runs(
    tmp_path: Path, line: dict, notify: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = Daemon(load_config(_config(tmp_path, line)), link=RecordingLink())
    entered, release = threading.Event(), threading.Event()
    warm_once = daemon.slots._warm_once

    def held(*args: Any) -> Any:
        entered.set()
        release.wait(30)  # a first-run compilation that takes a while
        return warm_once(*args)

    monkeypatch.setattr(daemon.slots, "_warm_once", held)
    starter = threading.Thread(target=daemon.start, daemon=True)
    starter.start()
    try:
        assert entered.wait(30), "the warm-up never started"
        assert daemon.status()["state"] == "starting"
        assert notify.count("READY=1") == 0
        release.set()
        assert notify.wait_for("READY=1", 30) is not None
        starter.join(30)
        assert faults.wait_until(lambda: daemon.status()["state"] == "online", 10), daemon.status()["problems"]
    finally:
        release.set()
        starter.join(30)
        daemon.stop()


def test_configured_max_batch_is_warmed_up_too(tmp_path: Path, line: dict) -> None:
    engines = load_config(_config(tmp_path, line)).engines
    if "max_batch" in type(engines).model_fields:  # engines.max_batch (micro-batching)
        assert warmup_batches(engines.model_copy(update={"max_batch": 4})) == [1, 4]
        assert warmup_batches(engines.model_copy(update={"max_batch": 1})) == [1]
    assert warmup_batches(type("E", (), {"max_batch": 4})()) == [1, 4]  # type: ignore[arg-type]
    assert warmup_batches(type("E", (), {})()) == [1]  # type: ignore[arg-type]  # a config without the key


def test_warm_up_batches_cover_each_shape_and_a_failure_is_recorded(
    tmp_path: Path, line: dict, engine_runs: list
) -> None:
    daemon = Daemon(load_config(_config(tmp_path, line)), link=RecordingLink())
    daemon.slots.open()
    runs = daemon.slots.warm_up([1, 3])
    assert [(r.batch, r.error) for r in runs] == [(1, None), (3, None)]
    encoder_batches = sorted({b for _, name, b in engine_runs if "encoder" in name})
    assert encoder_batches == [1, 3]
    inspector = daemon.inspectors["cam1"]
    assert inspector is not None

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("engine gone")

    inspector.pipeline.encoder.run = broken  # type: ignore[method-assign]
    failed = daemon.slots.warm_up([1])
    assert failed[0].error == "inspection failed: engine gone" and daemon.slots.warmed.is_set()


def test_warm_up_image_fits_the_recipe_roi() -> None:
    assert warmup_image((10, 20, 30, 40), (224, 224)).shape == (60, 40, 3)
    assert warmup_image(None, (224, 320)).shape == (224, 320, 3)
