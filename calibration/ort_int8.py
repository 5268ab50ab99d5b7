"""Static INT8 quantization of the encoder for ONNX Runtime's CPU provider (``export int8``).

The TensorRT path (``calibration/int8.py``) quantizes for a GPU: symmetric INT8 activations,
entropy ranges. ONNX Runtime's CPU kernels are fastest with unsigned 8-bit activations and signed
8-bit weights (U8S8, what VNNI's ``vpdpbusd`` multiplies), asymmetric activation ranges and
per-channel weight scales, so this module quantizes with those settings:

* the golden images are preprocessed with the runtime's own recipe (``engines/preprocess.py``
  through :func:`calibration.int8.load_preprocessed`) and fed to the quantizer's calibration
  reader in fixed batches;
* the FP32 graph is first shape-inferred and fused (ONNX Runtime's ``quant_pre_process``, which its
  quantizer recommends: Q/DQ pairs land around the fused Conv+activation, not inside it);
* ``quantize_static`` writes a QDQ graph with the FP32 encoder's signature (float in, float out).

:func:`compare_held_out` then encodes held-out golden images with both graphs and reports how far
INT8 moves the features and image scores against an FP32 bank (``calibration.int8.compare_int8``).
ONNX Runtime and OpenCV are imported only by the functions that use them.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from anomalygpt_edge.calibration.int8 import (
    AccuracyReport,
    CalibrationError,
    batch_reader,
    calibration_batches,
    compare_int8,
)

#: Calibration methods of ``export int8 --calib-method``: min/max (fast, the default), percentile, entropy.
CALIB_METHODS: tuple[str, ...] = ("minmax", "percentile", "entropy")
#: Images per calibration batch (the encoder's batch axis is dynamic; this bounds the quantizer's memory).
CALIB_BATCH = 8
#: Quantizer settings recorded in the manifest's ``int8`` record (what the graph was written with).
ACTIVATION_TYPE: Literal["uint8"] = "uint8"
WEIGHT_TYPE: Literal["int8"] = "int8"


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Keep the quantizer's progress prints and generic warnings off stdout (the command's output)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        logging.disable(previous)


def _pre_process(src: Path, dst: Path) -> Path:
    """``src`` shape-inferred and fused into ``dst``; ``src`` itself where the pre-processing fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst))
    except Exception as exc:  # its failures are many kinds; quantizing the raw graph still works
        print(f"int8: pre-processing skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
        return src
    return dst


def quantize_cpu(
    src: Path, dst: Path, images: Sequence[np.ndarray], input_name: str, method: str = "minmax"
) -> dict[str, Any]:
    """Write ``dst``: the FP32 encoder ``src`` as a QDQ U8S8 graph calibrated on ``images`` (C, H, W).

    Returns the quantizer settings for the manifest's ``int8`` record.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    methods["entropy"] = CalibrationMethod.Entropy
    if method not in methods:
        raise CalibrationError(f"--calib-method must be one of {', '.join(CALIB_METHODS)}, got '{method}'")
    batches = calibration_batches(list(images), min(CALIB_BATCH, len(images)))
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp, _quiet_quantizer():
        graph = _pre_process(src, Path(tmp) / "pre.onnx")
        quantize_static(
            str(graph),
            str(dst),
            batch_reader(batches, input_name),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=methods[method],
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
    batch = int(batches[0].shape[0])
    return {"method": method, "images": len(images), "batch_size": batch, "onnxruntime": ort.__version__}


def _encode(path: Path, images: Sequence[np.ndarray], input_name: str, output: str) -> np.ndarray:
    """``output`` of the graph at ``path`` for each image, one at a time (as the line runs), (B, N, C)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.stack([session.run([output], {input_name: x[None]})[0][0] for x in images])


def compare_held_out(
    fp32: Path,
    int8: Path,
    bank_images: Sequence[np.ndarray],
    held_images: Sequence[np.ndarray],
    input_name: str,
    layers: Sequence[str],
    metric: str,
) -> dict[str, AccuracyReport]:
    """Per patch layer: INT8 vs FP32 features and image scores on ``held_images``, bank from ``bank_images``."""
    if not held_images:
        raise CalibrationError("no held-out images to check the INT8 encoder on")
    reports = {}
    for layer in layers:
        bank = _encode(fp32, bank_images, input_name, layer)
        ref = _encode(fp32, held_images, input_name, layer)
        cand = _encode(int8, held_images, input_name, layer)
        reports[layer] = compare_int8(ref, cand, bank.reshape(-1, bank.shape[-1]), metric)
    return reports
