"""GPU backends without a GPU: the backend registry (and the removed torch-cuda key), INT8
calibration batching/cache/accuracy maths, the no-torch promise of engines/ and calibration/, and
the GPU bench script run end to end on the CPU.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from anomalygpt_edge.calibration import int8
from anomalygpt_edge.engines import EngineBundle
from anomalygpt_edge.engines.base import (
    AUTO_ORDER,
    EngineError,
    available_backends,
    backend_names,
    removed_backend,
    resolve_backend,
)

torch = pytest.importorskip("torch")
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiny_anomalygpt_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real AnomalyGPT graph structure (ViT encoder, decoder, prompt learner), tiny widths."""
    from anomalygpt_edge.cli import main

    out = tmp_path_factory.mktemp("tiny") / "bundle"
    argv = ["export", "vision", "--source", "anomalygpt", "--random-weights", "--anomalygpt-size", "tiny"]
    assert main([*argv, "--out", str(out)]) == 0
    return out


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))


# --- backend registry ------------------------------------------------------------------------


def test_gpu_backends_register_but_auto_stays_on_the_cpu_here() -> None:
    assert {"tensorrt", "onnxruntime", "onnxruntime-cuda"} <= set(backend_names())
    assert "torch-cuda" not in backend_names() and "torch-cuda" not in AUTO_ORDER
    if not CUDA:
        assert available_backends() == ["onnxruntime"]


def test_selecting_the_removed_torch_cuda_backend_says_what_to_use_instead(default_bundle_dir: Path) -> None:
    want = r"'torch-cuda' was removed .*use 'onnxruntime-cuda' \(onnxruntime-gpu\) or 'tensorrt' on a GPU"
    with pytest.raises(EngineError, match=want) as err:
        resolve_backend("torch-cuda")
    assert "\n" not in str(err.value)  # one line, for the log and the status topic
    with pytest.raises(EngineError, match=want):
        EngineBundle.open(default_bundle_dir).engine("encoder", backend="torch-cuda")
    assert removed_backend("torch-cuda") == str(err.value) and removed_backend("onnxruntime") is None


# --- INT8 calibration (numpy parts) ------------------------------------------------------------


def test_holdout_split_is_deterministic_spread_and_disjoint() -> None:
    paths = [Path(f"{i:03d}.png") for i in range(10)]
    calib, held = int8.split_holdout(paths, 0.2)
    assert held == [Path("004.png"), Path("009.png")]
    assert not set(calib) & set(held) and len(calib) + len(held) == 10
    assert int8.split_holdout(paths, 0.2) == (calib, held)
    assert int8.split_holdout(paths[:2]) == ([paths[0]], [paths[1]])
    with pytest.raises(int8.CalibrationError, match="at least 2 golden images"):
        int8.split_holdout(paths[:1])


def test_calibration_batches_are_full_and_cycle_real_images() -> None:
    images = [np.full((3, 4, 4), i, np.float32) for i in range(5)]
    batches = int8.calibration_batches(images, 2)
    assert [b.shape for b in batches] == [(2, 3, 4, 4)] * 3
    assert [float(b[j, 0, 0, 0]) for b in batches for j in range(2)] == [0, 1, 2, 3, 4, 0]
    assert all(b.flags["C_CONTIGUOUS"] and b.dtype == np.float32 for b in batches)
    assert len(int8.calibration_batches(images, 8)) == 1
    with pytest.raises(int8.CalibrationError, match="shape"):
        int8.calibration_batches([*images, np.zeros((3, 5, 4), np.float32)], 2)
    with pytest.raises(int8.CalibrationError, match="at least 1"):
        int8.calibration_batches(images, 0)


def test_calibration_images_are_preprocessed_like_the_runtime(default_bundle_dir: Path, tmp_path: Path) -> None:
    from anomalygpt_edge.engines.preprocess import preprocess

    rng = np.random.default_rng(6)
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"part{i}.png"), rng.integers(0, 255, (300, 400, 3), np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    paths = int8.list_images(tmp_path)
    assert [p.name for p in paths] == ["part0.png", "part1.png", "part2.png"]
    spec = EngineBundle.open(default_bundle_dir).manifest.preprocess
    images = int8.load_preprocessed(paths, spec)
    assert images[0].shape == (3, 256, 256) and images[0].dtype == np.float32
    np.testing.assert_array_equal(images[1], preprocess(cv2.imread(str(paths[1])), spec).pixel_values)
    (tmp_path / "empty").mkdir()
    with pytest.raises(int8.CalibrationError, match=r"empty: no image files \(\.png"):  # the one list_images
        int8.list_images(tmp_path / "empty")


def test_calibration_cache_is_reused_only_for_the_same_images_bundle_and_tensorrt(tmp_path: Path) -> None:
    cache = int8.CalibrationCache(tmp_path / "encoder.int8.calib")
    meta = {
        "bundle_sha256": "a" * 64,
        "images_sha256": "b" * 64,
        "batch_size": 8,
        "tensorrt_version": "10.3.0",
    }
    assert cache.load(meta) is None
    cache.save(b"TRT-8601-EntropyCalibration2\n", meta)
    assert cache.load(dict(meta)) == b"TRT-8601-EntropyCalibration2\n"
    for field, value in [("images_sha256", "c" * 64), ("tensorrt_version", "10.7.0"), ("batch_size", 4)]:
        assert cache.load({**meta, field: value}) is None, field
    cache.meta_path.write_text("{broken")
    assert cache.load(meta) is None


def test_image_digest_changes_with_content_and_names(tmp_path: Path) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"1")
    b.write_bytes(b"2")
    d = int8.images_digest([a, b])
    assert d == int8.images_digest([a, b]) and d != int8.images_digest([b, a])
    b.write_bytes(b"3")
    assert int8.images_digest([a, b]) != d


def test_numpy_patch_scores_match_the_exported_bank_matcher(default_bundle_dir: Path) -> None:
    bundle = EngineBundle.open(default_bundle_dir)
    q = bundle.engine("encoder").run(
        {"pixel_values": np.random.default_rng(7).standard_normal((3, 3, 256, 256)).astype(np.float32)}
    )["patches_0"]
    want = bundle.engine("bank_matcher").run({"q_0": q[:2], "bank_0": q[2]})["patch_scores"]
    got = int8.nearest_patch_scores(q[:2], q[2], bundle.manifest.matching["metric"])
    assert _max_rel(want, got) < 1e-4


def test_int8_check_passes_faithful_features_and_flags_damaged_ones() -> None:
    rng = np.random.default_rng(8)
    bank = rng.standard_normal((500, 16)).astype(np.float32)
    ref = rng.standard_normal((3, 50, 16)).astype(np.float32)
    close = ref + 1e-3 * rng.standard_normal(ref.shape).astype(np.float32)
    good = int8.compare_int8(ref, close, bank, "l2")
    assert good.passed() and good.feature_cosine_min > 0.999 and good.images == 3
    bad = int8.compare_int8(ref, ref + 0.8 * rng.standard_normal(ref.shape).astype(np.float32), bank, "l2")
    assert not bad.passed() and bad.score_rel_diff_max > 0.05
    text = int8.format_report(bad, ["a.png", "b.png", "c.png"])
    assert "INT8 vs FP16 on 3 held-out image(s)" in text and "c.png" in text and "keep FP16" in text
    assert "within tolerance" in int8.format_report(good)
    assert int8.compare_int8(ref, ref, bank, "cosine").score_abs_diff_max == 0.0


# --- import hygiene ----------------------------------------------------------------------------


def test_engines_and_calibration_import_without_torch_tensorrt_or_cuda(default_bundle_dir: Path) -> None:
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'onnx', 'tensorrt', 'cuda'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import numpy as np
from anomalygpt_edge.engines import EngineBundle, tensorrt_backend, device_key
from anomalygpt_edge.engines.base import available_backends, resolve_backend
from anomalygpt_edge.calibration import int8
import anomalygpt_edge.export.engines_cli
b = EngineBundle.open({str(default_bundle_dir)!r})
assert resolve_backend('auto') == 'onnxruntime', available_backends()
b.engine('encoder').run({{'pixel_values': np.zeros((1, 3, 256, 256), np.float32)}})
print('why', tensorrt_backend.TensorRTEngine.why_not())
assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorrt', 'cuda', 'onnx')]
print('ok')
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout and "TensorRT comes from JetPack" in result.stdout


def test_gpu_bench_script_runs_end_to_end_on_the_cpu_with_tiny_weights(
    tiny_anomalygpt_bundle: Path, tmp_path: Path
) -> None:
    from anomalygpt_edge.export import gpu_bench

    out = tmp_path / "bench.json"
    argv = [
        "--size",
        "tiny",
        "--device",
        "cpu",
        "--bundle",
        str(tiny_anomalygpt_bundle),
        "--iters",
        "2",
        "--warmup",
        "1",
        "--batch",
        "2",
        "--out",
        str(out),
    ]
    # The fixture bundle was exported with seed 0, like the script's own modules: same weights.
    assert gpu_bench.main(argv) == 0
    report = __import__("json").loads(out.read_text())
    parity = report["results"]["onnxruntime fp32"]["parity"]
    assert set(parity) == {"tap_last", "anomaly_map", "prompt_embeds", "img_llm"}
    assert all(v["max_rel"] < 1e-4 for v in parity.values())
    assert report["results"]["eager fp32"]["batch1"]["n"] == 2 and "gpu_bench" in report["command"]
