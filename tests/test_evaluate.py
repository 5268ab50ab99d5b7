"""``evaluate`` runs the k-shot protocol on an MVTec-layout folder and refuses malformed datasets clearly."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import parts
import pytest

from anomalygpt_edge.cli import main
from anomalygpt_edge.runtime.evaluation.accuracy import aupro, auroc


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "plate"
    parts.mvtec_folder(root)
    return root


def _evaluate(dataset: Path, bundle: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "evaluate",
            "--data",
            str(dataset),
            "--shots",
            "4",
            "--seeds",
            "2",
            "--bundle",
            str(bundle),
            "--json",
            str(out / "eval.json"),
            *extra,
        ]
    )


def test_evaluate_reports_every_figure_overall_and_per_defect(
    dataset: Path, default_bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert _evaluate(dataset, default_bundle_dir, tmp_path, "--report", str(tmp_path / "report")) == 0
    data = json.loads((tmp_path / "eval.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "false_reject_rate", "escape_rate", "accuracy"):
        assert 0.0 <= data[key] <= 1.0, key
    assert data["image_auroc"] >= 0.9 and data["pixel_auroc"] >= 0.9  # obvious synthetic scratches
    assert set(data["per_defect"]) == {"scratch"} and len(data["per_seed"]) == 2
    assert data["per_seed"][0]["threshold"]["value"] > 0
    for name in ("summary.md", "roc.png", "pr.png", "heatmaps.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert cv2.imread(str(tmp_path / "report" / "roc.png")) is not None
    assert "overall" in capsys.readouterr().out


def test_mask_of_the_wrong_size_is_refused_naming_the_file(
    dataset: Path, default_bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cv2.imwrite(str(dataset / "ground_truth" / "scratch" / "001_mask.png"), np.zeros((10, 10), np.uint8))
    assert _evaluate(dataset, default_bundle_dir, tmp_path) == 2
    assert "001_mask.png: mask is 10x10, image is 320x240" in capsys.readouterr().err


def test_missing_mask_leaves_that_image_to_image_level_metrics_and_names_it(
    dataset: Path, default_bundle_dir: Path, tmp_path: Path
) -> None:
    (dataset / "ground_truth" / "scratch" / "002_mask.png").unlink()
    assert _evaluate(dataset, default_bundle_dir, tmp_path) == 0
    data = json.loads((tmp_path / "eval.json").read_text())
    assert any("002.png: no mask at" in note for note in data["notes"])
    assert data["pixel_ground_truth"] and 0.0 <= data["pixel_auroc"] <= 1.0


def test_undecodable_test_image_is_named_skipped_and_counted_not_fatal(
    dataset: Path, default_bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (dataset / "test" / "good" / "001.png").write_bytes(b"")
    assert _evaluate(dataset, default_bundle_dir, tmp_path) == 0
    assert "skipped" in capsys.readouterr().err
    data = json.loads((tmp_path / "eval.json").read_text())
    assert [Path(s["path"]).name for s in data["skipped"]] == ["001.png"]
    assert "file is empty" in data["skipped"][0]["reason"]
    assert data["n_test"] == 8 and data["per_seed"][0]["overall"]["image_auroc"] >= 0.9


def test_dataset_without_ground_truth_reports_pixel_metrics_as_na(
    dataset: Path, default_bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    shutil.rmtree(dataset / "ground_truth")
    assert _evaluate(dataset, default_bundle_dir, tmp_path) == 0
    data = json.loads((tmp_path / "eval.json").read_text())
    assert not data["pixel_ground_truth"] and data["pixel_auroc"] is None and data["aupro"] is None
    assert data["image_auroc"] >= 0.9
    assert "n/a" in capsys.readouterr().out


def test_evaluate_over_several_datasets_prints_a_row_each_and_the_mean(
    dataset: Path, default_bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    second = tmp_path / "bracket"
    parts.mvtec_folder(second, n_bad=3)
    out = tmp_path / "out"
    code = main(
        ["evaluate", "--data", str(dataset), str(second), "--shots", "4", "--seeds", "1", "--defects", "1"]
        + ["--bundle", str(default_bundle_dir), "--json", str(out / "eval.json"), "--report", str(out / "report")]
    )
    assert code == 0
    data = json.loads((out / "eval.json").read_text())
    assert [Path(d["dataset"]).name for d in data["datasets"]] == ["plate", "bracket"]
    means = [d["image_auroc"] for d in data["datasets"]]
    assert data["mean"]["image_auroc"] == pytest.approx(np.mean(means))
    assert data["image_auroc"] == data["mean"]["image_auroc"]
    assert all(d["defects"] == 1 and len(d["per_seed"][0]["labelled_defects"]) == 1 for d in data["datasets"])
    assert all(d["per_seed"][0]["head"]["mode"] == "mask" for d in data["datasets"])  # masks reached the head
    assert data["datasets"][1]["n_test"] == 4 + 3 - 1  # the labelled defect left the test set
    printed = capsys.readouterr().out
    assert "plate" in printed and "bracket" in printed and "\nmean " in printed
    for name in ("summary.md", "summary.png", "plate/roc.png", "bracket/heatmaps.png"):
        assert (out / "report" / name).stat().st_size > 0


def test_folder_that_is_not_mvtec_layout_is_refused(
    tmp_path: Path, default_bundle_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    assert _evaluate(tmp_path, default_bundle_dir, tmp_path) == 2
    assert "missing train/good/" in capsys.readouterr().err


def test_auroc_counts_ties_as_half_and_aupro_rewards_covering_small_regions() -> None:
    assert auroc(np.array([1, 1, 1, 1]), np.array([0, 1, 0, 1])) == 0.5
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    mask = np.zeros((20, 20), bool)
    mask[2:4, 2:4] = True
    perfect = mask.astype(float)
    assert aupro([perfect], [mask]) == pytest.approx(1.0, abs=0.02)
    assert aupro([np.random.default_rng(0).random((20, 20))], [mask]) < 0.5
