"""``bench goldens`` on a small synthetic MVTec-layout set: the figures it promises, per k.

No real data (a fresh clone has no ../shared) and no timing asserted: the sweep's speed figures
belong in BENCHMARKS.md. What is checked is what the sweep is for: banks bounded by the budget
while the unbounded reference keeps growing, a k larger than train/good capped and said so, and
JSON + PNG + Markdown written.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from anomalygpt_edge.cli import main
from anomalygpt_edge.runtime.cli.parts import ks_arg
from anomalygpt_edge.runtime.tools import synthetic


@pytest.fixture(scope="module", name="tiny_set")
def tiny_set_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/good with 6 parts, test/good with 4, test/scratch with 4 (no ground_truth/)."""
    root = tmp_path_factory.mktemp("tiny-set")
    rng = np.random.default_rng(3)
    for folder, n, defect in (("train/good", 6, None), ("test/good", 4, None), ("test/scratch", 4, "scratch")):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            assert cv2.imwrite(str(root / folder / f"{i:03d}.png"), synthetic.render_part(rng, defect))
    return root


def test_sweep_bounds_the_bank_caps_k_and_writes_json_png_and_markdown(
    tiny_set: Path, default_bundle_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    argv = ["bench", "goldens", "--data", str(tiny_set), "--k", "1,2,4,50", "--budget", "600"]
    argv += ["--json", str(tmp_path / "g.json"), "--report", str(out), "--bundle", str(default_bundle_dir)]
    argv += ["--backend", "onnxruntime"]
    assert main(argv) == 0
    doc = json.loads((tmp_path / "g.json").read_text())
    rows = {r["k"]: r for r in doc["rows"]}
    assert sorted(rows) == [1, 2, 4, 6], "k 50 is measured at the 6 train goods there are"
    assert doc["train_goods"] == 6 and any("k 50" in n and "k = 6" in n for n in doc["notes"]), doc["notes"]
    per_image = doc["patches_per_image"]
    for k, r in rows.items():
        assert r["total_patches"] == k * per_image
        assert r["bank_patches"] == min(600, k * per_image)
        assert r["subsampled"] == (k * per_image > 600)
        assert r["bank_bytes"] <= r["unbounded_bank_bytes"] and 0.0 <= r["image_auroc"] <= 1.0
        assert r["enroll_s"] >= r["encode_s"] > 0 and r["match_ms_per_image"] > 0
        # The reference ran side by side: the unbounded bank's figures are there at every k.
        assert r["unbounded_match_ms_per_image"] > 0 and 0.0 <= r["unbounded_image_auroc"] <= 1.0
    sizes = [rows[k]["bank_bytes"] for k in sorted(rows)]
    unbounded = [rows[k]["unbounded_bank_bytes"] for k in sorted(rows)]
    assert sizes[-1] == sizes[-2], "the budget holds the bank flat once it is reached"
    assert unbounded == sorted(unbounded) and unbounded[-1] > unbounded[-2]
    assert rows[1]["vs_first_k"]["bank_bytes"] == 1.0
    assert doc["n_test"] == 8 and doc["n_test_defects"] == 4
    png = cv2.imread(str(out / "goldens.png"))
    assert png is not None and png.shape[0] > 100 and png.shape[1] > 100
    assert "| 6 |" in (out / "goldens.md").read_text()


def test_sweep_with_a_bounded_test_set_says_so(tiny_set: Path, default_bundle_dir: Path, tmp_path: Path) -> None:
    argv = ["bench", "goldens", "--data", str(tiny_set), "--k", "2", "--max-test", "4", "--no-reference"]
    argv += ["--json", str(tmp_path / "g.json"), "--bundle", str(default_bundle_dir), "--backend", "onnxruntime"]
    assert main(argv) == 0
    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc["n_test"] == 4 and 1 <= doc["n_test_defects"] <= 3
    assert any("bounded to 4 of 8" in n for n in doc["notes"]), doc["notes"]


def test_k_list_is_sorted_unique_and_positive() -> None:
    assert ks_arg("8, 1,2,2") == [1, 2, 8]
    for bad in ("0,1", "a", ""):
        with pytest.raises(Exception, match="golden-part counts|comma list"):
            ks_arg(bad)
