"""``bench vision`` runs PyTorch eager and the bundle side by side and writes its figures (no timing asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anomalygpt_edge.cli import main


def test_bench_vision_writes_ratios_and_parity_for_both_paths(
    default_bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "vision",
                "--bundle",
                str(default_bundle_dir),
                "--json",
                str(out),
                "--repeats",
                "2",
                "--shots",
                "4",
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert data["speedup_vs_torch"] > 0 and data["speedup_vs_torch_batch8"] > 0
    for path in ("torch", "onnxruntime"):
        for batch in ("batch1", "batch8"):
            assert data["results"][path][batch]["p50_ms"] > 0
    assert data["max_abs_diff_anomaly_map"] < 1e-3  # same maths on both sides
    assert data["enroll_seconds"]["k"] == 4 and len(data["enroll_seconds"]["runs_s"]) == 3
    assert "speedup_vs_torch" in capsys.readouterr().out
