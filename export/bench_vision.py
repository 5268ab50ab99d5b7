"""``anomalygpt-edge bench vision``: encoder + bank matcher, PyTorch eager vs the bundle's engines.

Both run in the same process, interleaved, on the same inputs and thread count, so the ratio is
meaningful on a noisy machine; absolute milliseconds are not. The reference is the exporter's own
torch encoder rebuilt for the bundle's source (``export.vision.reference_encoder``): the registry
weights for the default bundle, the recorded seed for ``--random-weights`` exports of the other
single-layer sources (wide_resnet50, dinov2-*); needs the [export] extra.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from anomalygpt_edge.engines.bundle import BundleError, EngineBundle
from anomalygpt_edge.engines.cpu_int8 import int8_flags
from anomalygpt_edge.export.bank_matcher import BankMatcher
from anomalygpt_edge.export.vision import reference_encoder


def _percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "p50_ms": statistics.median(s),
        "p99_ms": s[min(len(s) - 1, round(0.99 * (len(s) - 1)))],
        "mean_ms": statistics.fmean(s),
        "n": len(s),
    }


def _time(fn: Callable[[], object], repeats: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _time_enrollment(bundle: EngineBundle, args: argparse.Namespace) -> dict:
    """Wall time of a full enrollment of ``args.shots`` images into a fresh recipe, as the CLI does it."""
    import tempfile

    from anomalygpt_edge.engines.preprocess import list_images, read_image
    from anomalygpt_edge.runtime.recipes.enrollment import Enroller
    from anomalygpt_edge.runtime.recipes.store import RecipeStore

    if args.enroll_images:
        files = list_images(args.enroll_images)[: args.shots]
        images = [(p.name, read_image(p)) for p in files]
        source = str(args.enroll_images)
    else:  # content barely matters for timing; sizes like a line camera crop
        rng = np.random.default_rng(1)
        images = [(f"{i}.png", rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)) for i in range(args.shots)]
        source = "random 640x480 images"
    runs = []
    for _ in range(3):
        with tempfile.TemporaryDirectory() as tmp:
            enroller = Enroller(RecipeStore(tmp), bundle)
            enroller.create("bench")
            t0 = time.perf_counter()
            enroller.add("bench", images, accept_flagged=True)
            runs.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(runs), "runs_s": runs, "k": len(images), "source": source}


def _compare(
    encoder_t: Any,
    matcher_t: Any,
    encoder_o: Any,
    matcher_o: Any,
    layer_name: str,
    bank: np.ndarray,
    size: tuple[int, int],
    rng: np.random.Generator,
    repeats: int,
) -> tuple[dict[str, dict], float]:
    """Both paths at batch 1 and 8, interleaved: latency figures per path and the largest map difference."""
    bank_t = torch.from_numpy(bank)
    results: dict[str, dict] = {"torch": {}, "onnxruntime": {}}
    max_diff = 0.0
    for batch in (1, 8):
        x = rng.standard_normal((batch, 3, *size)).astype(np.float32)
        xt = torch.from_numpy(x)

        def torch_path(xt: torch.Tensor = xt) -> torch.Tensor:
            with torch.inference_mode():
                out = encoder_t(xt)  # (patches, head features) when the bundle has head layers
                return matcher_t(out[0] if isinstance(out, tuple) else out, bank_t)[0]

        def ort_path(x: np.ndarray = x) -> np.ndarray:
            q = encoder_o.run({"pixel_values": x})[layer_name]
            return matcher_o.run({"q_0": q, "bank_0": bank})["anomaly_map"]

        max_diff = max(max_diff, float(np.abs(torch_path().numpy() - ort_path()).max()))
        reps = repeats if batch == 1 else max(5, repeats // 4)
        t_torch: list[float] = []
        t_ort: list[float] = []
        for _ in range(reps):  # interleave so load spikes hit both paths alike
            t_torch += _time(torch_path, 1, warmup=0 if t_torch else 3)
            t_ort += _time(ort_path, 1, warmup=0 if t_ort else 3)
        for name, samples in (("torch", t_torch), ("onnxruntime", t_ort)):
            stats = _percentiles(samples)
            stats["images_per_s"] = 1e3 * batch / stats["p50_ms"]
            results[name][f"batch{batch}"] = stats
    return results, max_diff


def _encode_once(engine: Any, x: np.ndarray) -> Callable[[], object]:
    """One encoder run on ``x``, as a callable for :func:`_time`."""
    return lambda: engine.run({"pixel_values": x})


def _compare_int8(fp32: Any, int8: Any, size: tuple[int, int], rng: np.random.Generator, repeats: int) -> dict:
    """The FP32 and the INT8 encoder alone at batch 1 and 8, interleaved: latency per precision and the ratio.

    Inputs are random: they time the graphs, not their accuracy (``evaluate --precision`` measures that).
    """
    out: dict[str, Any] = {"fp32": {}, "int8": {}}
    for batch in (1, 8):
        x = rng.standard_normal((batch, 3, *size)).astype(np.float32)
        reps = repeats if batch == 1 else max(5, repeats // 4)
        samples: dict[str, list[float]] = {"fp32": [], "int8": []}
        for _ in range(reps):  # interleave so load spikes hit both precisions alike
            for name, engine in (("fp32", fp32), ("int8", int8)):
                samples[name] += _time(_encode_once(engine, x), 1, warmup=0 if samples[name] else 3)
        for name in ("fp32", "int8"):
            stats = _percentiles(samples[name])
            stats["images_per_s"] = 1e3 * batch / stats["p50_ms"]
            out[name][f"batch{batch}"] = stats
        out[f"speedup_int8_vs_fp32_batch{batch}"] = out["fp32"][f"batch{batch}"]["p50_ms"] / stats["p50_ms"]
    out["cpu_int8_flags"] = int8_flags()
    return out


def _int8_encoder(args: argparse.Namespace) -> Any:
    """The bundle's CPU INT8 encoder (``--precision int8``); BundleError with one line where it is refused."""
    return EngineBundle.open(args.bundle, verify=False, precision="int8").engine("encoder")


def _print_int8(report: dict[str, Any]) -> None:
    """FP32 vs INT8 encoder latency and the ratio, two lines."""
    flags = ", ".join(report["cpu_int8_flags"]) or "no int8 flags"
    for batch in (1, 8):
        f, q = report["fp32"][f"batch{batch}"], report["int8"][f"batch{batch}"]
        print(
            f"encoder batch {batch}: fp32 p50 {f['p50_ms']:.1f} ms, int8 p50 {q['p50_ms']:.1f} ms -> int8 "
            f"{report[f'speedup_int8_vs_fp32_batch{batch}']:.2f}x fp32 ({flags})"
        )


def _print_table(results: dict[str, dict], backend: str) -> None:
    """Latency per path and batch as an aligned table."""
    rows = [("path", "batch", "p50 ms", "p99 ms", "images/s")]
    for name in ("torch", "onnxruntime"):
        for b in (1, 8):
            r = results[name][f"batch{b}"]
            rows.append(
                (
                    name if name == "torch" else backend,
                    str(b),
                    f"{r['p50_ms']:.1f}",
                    f"{r['p99_ms']:.1f}",
                    f"{r['images_per_s']:.1f}",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def run(args: argparse.Namespace) -> int:
    """Entry point of ``bench vision``."""
    bundle = EngineBundle.open(args.bundle, backend=args.backend)
    m = bundle.manifest
    try:
        if len(m.patch_layers) != 1:
            raise ValueError(f"a {m.source.get('kind')} bundle has {len(m.patch_layers)} patch layers, not one")
        encoder_t = reference_encoder(m)
        encoder_8 = _int8_encoder(args) if getattr(args, "precision", "fp32") == "int8" else None
    except (ValueError, BundleError) as exc:
        print(f"error: bench vision: {exc}", file=sys.stderr)
        return 2
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    size = m.preprocess.size
    layer = m.patch_layers[0]
    matcher_t = BankMatcher(1, layer.grid, m.map_size, metric=m.matching["metric"]).eval()
    encoder_o = bundle.engine("encoder")
    matcher_o = bundle.engine("bank_matcher")

    rng = np.random.default_rng(0)
    golden = rng.standard_normal((args.shots, 3, *size)).astype(np.float32)
    bank = encoder_o.run({"pixel_values": golden})[layer.name].reshape(-1, layer.dim)
    results, max_diff = _compare(encoder_t, matcher_t, encoder_o, matcher_o, layer.name, bank, size, rng, args.repeats)
    int8 = None if encoder_8 is None else _compare_int8(encoder_o, encoder_8, size, rng, args.repeats)
    enroll_s = _time_enrollment(bundle, args)
    speedup = results["torch"]["batch1"]["p50_ms"] / results["onnxruntime"]["batch1"]["p50_ms"]
    speedup8 = results["torch"]["batch8"]["p50_ms"] / results["onnxruntime"]["batch8"]["p50_ms"]
    report = {
        "bundle": str(args.bundle),
        "bundle_sha256": bundle.sha256,
        "source": m.source.get("kind"),
        "weights": m.source.get("weights", "checkpoints"),
        "patch_grid": list(layer.grid),
        "feature_dim": layer.dim,
        # What a device stores: every file of the bundle, FP16 variants included.
        "bundle_bytes": sum(f.size for f in m.files.values()),
        "backend": encoder_o.describe(),
        "input": list(size),
        "bank_patches": int(bank.shape[0]),
        "shots": args.shots,
        "threads": threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "results": results,
        "speedup_vs_torch": speedup,
        "speedup_vs_torch_batch8": speedup8,
        "max_abs_diff_anomaly_map": max_diff,
        "enroll_seconds": enroll_s,
        "load_average": os.getloadavg()[0],
        "int8_encoder": int8,  # --precision int8: FP32 vs INT8 encoder in this run; else null
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    _print_table(results, encoder_o.describe())
    _print_summary(report)
    if int8 is not None:
        _print_int8(int8)
    return 0


def _print_summary(report: dict[str, Any]) -> None:
    """The speed-up, the map difference and the enrollment time in two lines."""
    enroll_s = report["enroll_seconds"]
    print(
        f"speedup_vs_torch (batch 1, p50) = {report['speedup_vs_torch']:.2f}x; batch 8 = "
        f"{report['speedup_vs_torch_batch8']:.2f}x; max |map diff| = {report['max_abs_diff_anomaly_map']:.2e}; "
        f"bank {report['bank_patches']} patches; load avg {report['load_average']:.1f}"
    )
    print(
        f"enrolling {report['shots']} golden images ({enroll_s['source']}): median {enroll_s['median_s']:.2f} s "
        f"over {len(enroll_s['runs_s'])} runs (encode, bank, leave-one-out check, threshold, crash-safe commit)"
    )
