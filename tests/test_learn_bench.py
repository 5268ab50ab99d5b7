"""``bench learn`` on tiny synthetic MVTec-layout folders: the JSON keys it promises and the plot.

No real data (a fresh clone has no ../shared); no rate asserted beyond what the replay's own
bookkeeping guarantees. The figures on real sets belong in BENCHMARKS.md ("The line learns").
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import parts
import pytest

from anomalygpt_edge.cli import main


def tiny_set(root: Path, masks: bool) -> Path:
    """train/good 10, test/good 14, test/scratch 6; ``ground_truth/`` only with ``masks``."""
    parts.mvtec_folder(root, n_train=10, n_good=14, n_bad=6)
    if not masks:
        shutil.rmtree(root / "ground_truth")
    return root


@pytest.mark.parametrize("masks", [True, False], ids=["with-ground-truth", "image-labels-only"])
def test_bench_learn_writes_windows_quarters_drift_control_and_the_plot(
    masks: bool, default_bundle_dir: Path, tmp_path: Path
) -> None:
    data = tiny_set(tmp_path / "set", masks)
    assert (data / "ground_truth").is_dir() == masks
    out, report = tmp_path / "learn.json", tmp_path / "report"
    argv = ["bench", "learn", "--data", str(data), "--shots", "4", "--label-every", "2", "--apply-every", "3"]
    argv += ["--window", "5", "--control-parts", "40", "--seed", "1", "--json", str(out), "--report", str(report)]
    assert main([*argv, "--bundle", str(default_bundle_dir)]) == 0
    doc = json.loads(out.read_text())
    assert doc["parts"] == 20
    assert sum(w["parts"] for w in doc["windows"]) == 20
    for w in doc["windows"]:
        assert set(w) >= {"parts", "false_reject_rate", "escape_rate"}
    for q in ("first_quarter", "last_quarter"):
        assert set(doc[q]) >= {"false_reject_rate", "escape_rate"}
        assert set(doc["baseline"][q]) >= {"false_reject_rate", "escape_rate"}
    assert "drift_first_flag_part" in doc and "drift_first_flag_good_parts" in doc
    assert "false_alarm_part" in doc["control"]
    assert [a["part"] for a in doc["applies"]] == [5, 11, 17]  # every 3rd label of every 2nd part
    assert all("error" not in a for a in doc["applies"]), doc["applies"]
    image = cv2.imread(doc["plot"])
    assert image is not None and image.shape[0] > 100
    assert Path(doc["plot"]).parent == report


def test_bench_learn_refuses_a_zero_label_interval_in_one_line(
    default_bundle_dir: Path, tmp_path: Path, capsys
) -> None:
    data = tiny_set(tmp_path / "set", True)
    argv = ["bench", "learn", "--data", str(data), "--label-every", "0", "--json", str(tmp_path / "x.json")]
    assert main([*argv, "--bundle", str(default_bundle_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: --label-every must be at least 1, got 0"
