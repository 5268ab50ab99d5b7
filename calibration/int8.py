"""INT8 entropy calibration of the encoder from golden images, and the INT8-vs-FP16 accuracy check.

``anomalygpt-edge export engines --precision int8 --calib-images DIR`` uses this module:

* the golden images are split deterministically into a calibration set and a held-out set;
* calibration images are preprocessed exactly as the runtime does (the manifest's recipe) and
  stacked into fixed-size calibration batches (TensorRT's calibrator takes full batches only, so
  the last one is filled up by cycling from the first image);
* either TensorRT's entropy calibrator (``IInt8EntropyCalibrator2``, TensorRT 10.x) reads those
  batches (:func:`make_entropy_calibrator`), or ONNX Runtime's quantizer runs entropy calibration
  on them and inserts Q/DQ nodes into the ONNX (:func:`quantize_qdq`), which strongly typed
  builds (TensorRT 11's only kind) read INT8 from. Either way the calibration cache is written
  beside the bundle and reused while the bundle, the image set, the batch size and the TensorRT
  version are unchanged, so a rebuild at boot skips calibration;
* the held-out images are encoded with the FP16 and the INT8 engine and scored against a bank
  built from the calibration images: :func:`compare_int8` reports how far INT8 moves the patch
  features and the image scores, and the command prints it.

Everything except :func:`make_entropy_calibrator` runs in CI (:func:`quantize_qdq` with ONNX
Runtime on the CPU). No torch here; OpenCV (preprocessing) and ONNX Runtime's quantizer are
imported only by the functions that use them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from anomalygpt_edge.atomic_files import atomic_write_bytes, sha256_file


class CalibrationError(ValueError):
    """Calibration images or cache are unusable; the message says which and why."""


def list_images(folder: Path | str) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (so every build sees the same order)."""
    from anomalygpt_edge.engines import preprocess

    if not Path(folder).is_dir():
        raise CalibrationError(f"--calib-images: {folder} is not a folder")
    try:
        return preprocess.list_images(folder)
    except preprocess.ImageError as exc:
        raise CalibrationError(f"--calib-images: {exc}") from None


def split_holdout(paths: Sequence[Path], fraction: float = 0.2) -> tuple[list[Path], list[Path]]:
    """Split into (calibration, held-out): every k-th image is held out, k = round(1 / fraction).

    Deterministic and spread over the whole (sorted) set, so held-out images are not all from one
    end of a capture session. Needs at least 2 images: one to calibrate on, one to check.
    """
    if not 0.0 < fraction < 1.0:
        raise CalibrationError(f"held-out fraction must be in (0, 1), got {fraction}")
    paths = list(paths)
    if len(paths) < 2:
        raise CalibrationError(
            f"INT8 calibration needs at least 2 golden images (1 to calibrate, 1 to check); got {len(paths)}"
        )
    step = max(2, round(1.0 / fraction))
    held = [p for i, p in enumerate(paths) if i % step == step - 1]
    if not held:
        held = [paths[-1]]
    calib = [p for p in paths if p not in held]
    return calib, held


def calibration_batches(images: Sequence[np.ndarray], batch_size: int) -> list[np.ndarray]:
    """Stack (C, H, W) float32 images into contiguous (batch_size, C, H, W) batches.

    The last batch is filled up by cycling from the first image: the calibrator's input shape is
    fixed, and repeating real images skews the histograms far less than zero padding would.
    """
    if batch_size < 1:
        raise CalibrationError(f"calibration batch size must be at least 1, got {batch_size}")
    if not images:
        raise CalibrationError("no calibration images")
    shape = images[0].shape
    for i, img in enumerate(images):
        if img.shape != shape or img.ndim != 3:
            raise CalibrationError(f"calibration image {i} has shape {img.shape}, expected {shape} (C, H, W)")
    n_batches = -(-len(images) // batch_size)
    order = [i % len(images) for i in range(n_batches * batch_size)]
    return [
        np.ascontiguousarray(np.stack([images[j] for j in order[b * batch_size : (b + 1) * batch_size]]), np.float32)
        for b in range(n_batches)
    ]


def load_preprocessed(paths: Sequence[Path], preprocess_spec: Any) -> list[np.ndarray]:
    """Read and preprocess images with the runtime's own recipe (the manifest's ``preprocess``)."""
    from anomalygpt_edge.engines.preprocess import preprocess, read_image

    return [preprocess(read_image(p), preprocess_spec, name=str(p)).pixel_values for p in paths]


def images_digest(paths: Sequence[Path]) -> str:
    """sha256 over the names and contents of the calibration images (the cache is valid for them only)."""
    digest = hashlib.sha256()
    for p in paths:
        digest.update(Path(p).name.encode() + b"\0" + sha256_file(Path(p)).encode() + b"\0")
    return digest.hexdigest()


class CalibrationCache:
    """TensorRT's calibration cache plus a JSON sidecar saying what it was computed from.

    The cache bytes are opaque (TensorRT's format); the sidecar holds ``meta`` (bundle sha256,
    image digest, batch size, TensorRT version). :meth:`load` returns the bytes only when the
    sidecar matches the ``meta`` of the build at hand, otherwise ``None`` and calibration reruns.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.meta_path = self.path.with_name(self.path.name + ".json")

    def load(self, meta: dict[str, Any]) -> bytes | None:
        """The cached bytes if they were computed for exactly ``meta``; else ``None``."""
        if not (self.path.is_file() and self.meta_path.is_file()):
            return None
        try:
            stored = json.loads(self.meta_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if stored != json.loads(json.dumps(meta)):
            return None
        data = self.path.read_bytes()
        return data or None

    def save(self, data: bytes, meta: dict[str, Any]) -> None:
        """Write cache then sidecar, each atomically; a crash between them leaves a cache not reused."""
        self.meta_path.unlink(missing_ok=True)
        atomic_write_bytes(self.path, bytes(data))
        atomic_write_bytes(self.meta_path, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())


def make_entropy_calibrator(
    batches: Sequence[np.ndarray], input_name: str, cache: CalibrationCache, meta: dict[str, Any]
) -> Any:
    """A ``tensorrt.IInt8EntropyCalibrator2`` feeding ``batches`` to ``input_name`` (TensorRT 10.x).

    Written against the documented TensorRT Python API (not run here: no TensorRT on CI). Each
    batch is copied into one device buffer that lives as long as the calibrator. TensorRT 11 has
    no calibrators (INT8 needs Q/DQ nodes in the graph); the builder refuses int8 there first.
    """
    import tensorrt as trt

    from anomalygpt_edge.engines.tensorrt_backend import cuda_call, cudart

    if cudart is None:
        raise CalibrationError("INT8 calibration needs cuda-python (pip install cuda-python)")

    class _EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)  # pybind11 needs the base initialised explicitly
            self._batches = list(batches)
            self._next = 0
            self._nbytes = max(b.nbytes for b in self._batches)
            self._device = cuda_call(cudart.cudaMalloc(self._nbytes))

        def get_batch_size(self) -> int:
            return int(self._batches[0].shape[0])

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self._next >= len(self._batches):
                return None  # tells TensorRT the calibration set is exhausted
            batch = self._batches[self._next]
            self._next += 1
            cuda_call(
                cudart.cudaMemcpy(
                    self._device,
                    batch.ctypes.data,
                    batch.nbytes,
                    cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                )
            )
            return [int(self._device) if n == input_name else 0 for n in names]

        def read_calibration_cache(self) -> bytes | None:
            return cache.load(meta)

        def write_calibration_cache(self, data: Any) -> None:
            cache.save(bytes(data), meta)

        def __del__(self) -> None:
            if getattr(self, "_device", None):
                cudart.cudaFree(self._device)

    return _EntropyCalibrator()


def batch_reader(batches: Sequence[np.ndarray], input_name: str) -> Any:
    """ONNX Runtime's calibration reader over ``batches`` (one input feed per batch)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            return None if batch is None else {input_name: batch}

    return _Reader()


def _calibration_options(params: Any, cache: CalibrationCache, meta: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Whether cached ranges are reused, and the quantizer options this ONNX Runtime supports for it."""
    import onnxruntime as ort

    kwargs: dict[str, Any] = {}
    reused = False
    if "calibration_cache_path" in params:
        reused = cache.load(meta) is not None
        if not reused:  # stale ranges (other images, bundle or settings): compute afresh
            cache.path.unlink(missing_ok=True)
            cache.meta_path.unlink(missing_ok=True)
        kwargs["calibration_cache_path"] = str(cache.path)
    if "calibration_providers" in params and "CUDAExecutionProvider" in ort.get_available_providers():
        kwargs["calibration_providers"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return reused, kwargs


def quantize_qdq(
    src: Path,
    dst: Path,
    batches: Sequence[np.ndarray],
    input_name: str,
    cache: CalibrationCache,
    meta: dict[str, Any],
    external_data: bool = False,
) -> bool:
    """Write ``dst``: ``src`` with INT8 Q/DQ nodes from entropy calibration on ``batches``.

    Explicit quantization is how INT8 reaches a strongly typed TensorRT build (the only kind
    TensorRT 11 makes). ONNX Runtime's static quantizer does the entropy calibration on the CPU
    (or CUDA with onnxruntime-gpu), symmetric INT8 for weights (per channel) and activations, as
    TensorRT requires. Where the installed ONNX Runtime supports it, the computed tensor ranges
    are kept in ``cache`` and reused while ``meta`` matches; returns True when they were reused.
    """
    import inspect

    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    params = inspect.signature(quantize_static).parameters
    reused, kwargs = _calibration_options(params, cache, meta)
    # ImageBind-H in FP32 is 2.5 GB, past protobuf's 2 GB limit: external data for the output too.
    external = external_data or Path(src).stat().st_size > 1_900_000_000
    # The quantizer logs a generic "consider pre-processing" warning on every call: advice about
    # fusing the graph for ONNX Runtime's own CPU kernels; TensorRT fuses the graph itself.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        quantize_static(
            str(src),
            str(dst),
            batch_reader(batches, input_name),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.Entropy,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
            use_external_data_format=external,
            **kwargs,
        )
    finally:
        logging.disable(previous)
    if "calibration_cache_path" in params and not reused and cache.path.is_file():
        cache.save(cache.path.read_bytes(), meta)
    return reused


# --- accuracy check --------------------------------------------------------------------------


def nearest_patch_scores(q: np.ndarray, bank: np.ndarray, metric: str) -> np.ndarray:
    """Per-patch anomaly scores (B, N) of queries (B, N, C) against a bank (M, C), as the matcher does.

    ``l2``: distance to the nearest bank patch; ``cosine``: 1 - max cosine similarity. Computed
    in float64 so the reference itself adds no rounding to the comparison.
    """
    q = np.asarray(q, np.float64)
    bank = np.asarray(bank, np.float64)
    if metric == "cosine":
        qn = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
        bn = bank / np.maximum(np.linalg.norm(bank, axis=-1, keepdims=True), 1e-12)
        return 1.0 - (qn @ bn.T).max(-1)
    if metric == "l2":
        d2 = (q * q).sum(-1, keepdims=True) - 2.0 * (q @ bank.T) + (bank * bank).sum(-1)
        return np.sqrt(np.maximum(d2.min(-1), 0.0))
    raise CalibrationError(f"unknown metric '{metric}'")


@dataclass(frozen=True)
class AccuracyReport:
    """How INT8 features compare with FP16 ones on held-out images."""

    images: int
    feature_cosine_mean: float
    feature_cosine_min: float
    feature_rel_error: float
    score_fp16: list[float]
    score_int8: list[float]
    score_abs_diff_max: float
    score_rel_diff_max: float
    patch_score_corr_min: float

    def passed(self, max_score_rel_diff: float = 0.05, min_corr: float = 0.98) -> bool:
        """INT8 is acceptable when image scores move < 5% and the patch-score maps stay correlated."""
        return self.score_rel_diff_max <= max_score_rel_diff and self.patch_score_corr_min >= min_corr


def compare_int8(ref: np.ndarray, cand: np.ndarray, bank: np.ndarray, metric: str) -> AccuracyReport:
    """Compare candidate (INT8) patch features with reference (FP16) ones, both (B, N, C).

    Image score = max patch score against ``bank`` (the reference bank: what enrolled parts look
    like in the precision the line was enrolled with).
    """
    ref = np.asarray(ref, np.float64)
    cand = np.asarray(cand, np.float64)
    if ref.shape != cand.shape or ref.ndim != 3:
        raise CalibrationError(f"feature shapes differ or are not (B, N, C): {ref.shape} vs {cand.shape}")
    num = (ref * cand).sum(-1)
    den = np.maximum(np.linalg.norm(ref, axis=-1) * np.linalg.norm(cand, axis=-1), 1e-12)
    cos = num / den
    rel = float(np.linalg.norm(cand - ref) / max(np.linalg.norm(ref), 1e-12))
    s_ref = nearest_patch_scores(ref, bank, metric)
    s_cand = nearest_patch_scores(cand, bank, metric)
    img_ref, img_cand = s_ref.max(-1), s_cand.max(-1)
    abs_diff = np.abs(img_cand - img_ref)
    rel_diff = abs_diff / np.maximum(np.abs(img_ref), 1e-12)
    corrs = []
    for a, b in zip(s_ref, s_cand, strict=True):
        if a.std() < 1e-12 or b.std() < 1e-12:
            corrs.append(1.0 if np.allclose(a, b) else 0.0)
        else:
            corrs.append(float(np.corrcoef(a, b)[0, 1]))
    return AccuracyReport(
        images=int(ref.shape[0]),
        feature_cosine_mean=float(cos.mean()),
        feature_cosine_min=float(cos.min()),
        feature_rel_error=rel,
        score_fp16=[float(v) for v in img_ref],
        score_int8=[float(v) for v in img_cand],
        score_abs_diff_max=float(abs_diff.max()),
        score_rel_diff_max=float(rel_diff.max()),
        patch_score_corr_min=float(min(corrs)),
    )


def format_report(
    report: AccuracyReport,
    names: Sequence[str] | None = None,
    reference: str = "FP16",
    keep_hint: str = "re-run with --precision fp16",
) -> str:
    """The accuracy table printed at the end of an INT8 build (``reference``: what INT8 is compared to;
    ``keep_hint``: how to keep the reference precision instead)."""
    names = list(names) if names is not None else [f"image {i}" for i in range(report.images)]
    width = max(len(n) for n in [*names, "held-out image"])
    lines = [
        f"INT8 vs {reference} on {report.images} held-out image(s):",
        f"  patch features: cosine mean {report.feature_cosine_mean:.4f} "
        f"min {report.feature_cosine_min:.4f}, relative L2 error {report.feature_rel_error:.4f}",
        f"  {'held-out image'.ljust(width)}  score {reference.lower():>5}  score int8  diff",
    ]
    for n, a, b in zip(names, report.score_fp16, report.score_int8, strict=True):
        lines.append(f"  {n.ljust(width)}  {a:10.4f}  {b:10.4f}  {b - a:+.4f}")
    lines.append(
        f"  image score: max abs diff {report.score_abs_diff_max:.4f}, max rel diff "
        f"{100 * report.score_rel_diff_max:.2f}%; "
        f"patch-score correlation min {report.patch_score_corr_min:.4f}"
    )
    lines.append(
        "  verdict: INT8 is within tolerance"
        if report.passed()
        else f"  verdict: INT8 moves scores by more than 5% or decorrelates maps: keep {reference} "
        f"({keep_hint}) or re-enroll and re-fit thresholds on INT8"
    )
    return "\n".join(lines)
