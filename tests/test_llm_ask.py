"""`anomalygpt-edge ask` end to end: enroll synthetic golden parts, inspect a defective one, explain it.

The verdict comes from the vision side; the answer (model's or template) must agree with it and
name the defect's location.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("llama_cpp")
pytest.importorskip("anomalygpt_edge.runtime.recipes.inspector")  # the vision side of `ask`

from anomalygpt_edge.cli import main as cli_main  # noqa: E402
from anomalygpt_edge.runtime.explain.explainer import contradiction  # noqa: E402
from anomalygpt_edge.runtime.inspection.verdict import Region, Verdict  # noqa: E402


def _part(rng: np.random.Generator) -> np.ndarray:
    """A textured part: the same sine pattern every time, plus sensor noise."""
    y, x = np.mgrid[0:256, 0:256]
    img = 128 + 40 * np.sin(x / 9.0) * np.sin(y / 11.0) + rng.normal(0, 4, (256, 256))
    return cv2.cvtColor(np.clip(img, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)


@pytest.fixture(scope="module")
def enrolled(default_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ask")
    rng = np.random.default_rng(0)
    (root / "good").mkdir()
    for i in range(10):
        cv2.imwrite(str(root / "good" / f"{i}.png"), _part(rng))
    bad = _part(rng)
    cv2.circle(bad, (40, 45), 18, (0, 0, 0), -1)  # a blowhole and a scratch, top left
    cv2.line(bad, (20, 30), (70, 60), (255, 255, 255), 4)
    cv2.imwrite(str(root / "bad.png"), bad)
    store = root / "store"
    rc = cli_main(
        [
            "enroll",
            "--recipe",
            "synthetic",
            "--images",
            str(root / "good"),
            "--store",
            str(store),
            "--bundle",
            str(default_bundle_dir),
        ]
    )
    assert rc == 0
    return {"root": root, "store": store}


def _ask(enrolled: dict, *args: str) -> int:
    """``anomalygpt-edge ask`` on the enrolled ``synthetic`` recipe with these further arguments."""
    return cli_main(["ask", "--recipe", "synthetic", "--store", str(enrolled["store"]), *args])


def test_ask_json_answers_consistently_with_the_verdict_and_names_the_location(
    enrolled: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    rc = _ask(
        enrolled,
        *("--json", "--threads", "1", "--max-tokens", "48"),
        str(enrolled["root"] / "bad.png"),
        "Is there any anomaly in the image?",
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    v = out["verdict"]
    assert v["verdict"] == "NG" and v["location"] == "top left"
    answer = out["answer"]
    assert "top left" in answer["text"]
    verdict = Verdict(
        "NG",
        v["score"],
        v["threshold"],
        v["recipe"],
        [Region(tuple(r["bbox"]), r["area_pct"], r["peak"], r["location"]) for r in v["regions"]],
    )
    assert contradiction(answer["text"], verdict) is None
    assert answer["source"] in ("llm", "template")
    if answer["source"] == "template":
        assert answer["replaced"] and answer["model_text"] is not None


def test_ask_chat_streams_follow_up_answers(
    enrolled: dict, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("How large is it?\n\n"))  # an operator typing
    rc = _ask(enrolled, *("--chat", "--threads", "1", "--max-tokens", "24"), str(enrolled["root"] / "bad.png"))
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("verdict: NG") and "top left" in lines[0]
    assert lines[1].startswith("answer: ") and "top left" in lines[1]
    follow = [ln.split("answer: ", 1)[1] for ln in lines[2:] if "answer: " in ln]
    assert len(follow) == 1 and follow[0].strip()


def test_ask_reports_an_unreadable_image(enrolled: dict, capsys: pytest.CaptureFixture[str]) -> None:
    (enrolled["root"] / "broken.png").write_bytes(b"not an image")
    rc = _ask(enrolled, str(enrolled["root"] / "broken.png"))
    assert rc == 2
    assert "cannot read image" in capsys.readouterr().err
