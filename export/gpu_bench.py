"""GPU check of the engine backends on the full-size AnomalyGPT vision path (random weights).

Run on a machine with a CUDA GPU (a lent accelerator, a workstation)::

    python -m anomalygpt_edge.export.gpu_bench --out bench.json
    python -m anomalygpt_edge.export.gpu_bench --size tiny --device cpu --iters 3   # smoke test

What it does, all in one process so the ratios compare like with like:

1. builds AnomalyGPT's inference modules at full size (ImageBind-Huge vision branch, 632.8 M
   parameters; text-matching decoder; prompt learner) with seeded random weights, through the
   exporter's own ``build_modules`` (real architecture, no checkpoints needed);
2. exports them as an engine bundle (FP32 + FP16 ONNX) with the same weights, unless ``--bundle``
   names one already exported with the same ``--seed``;
3. **parity**: runs encoder -> decoder -> prompt learner in PyTorch eager FP32 (the reference), in
   PyTorch eager FP16, and through each measured engine backend on the bundle's graphs (on a GPU:
   ``onnxruntime-cuda`` and ``tensorrt`` where usable, FP16 graphs; on the CPU: ``onnxruntime``,
   FP32), and reports the largest errors of the taps, the anomaly map and the prompt embeddings;
4. **latency**: batch-1 p50/p99 and batch-8 throughput of the same path for eager FP32, eager FP16
   and each backend, with ratios to eager FP32.

A backend that cannot load here (``tensorrt`` without engines built by ``export engines``) gets
its reason in the report instead of figures. It prints a table and, with ``--out``, writes the
figures as JSON together with the command line. torch is required (this is an export-side tool);
nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentiles(samples: list[float]) -> dict[str, float]:
    arr = np.asarray(samples) * 1000.0
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p99_ms": float(np.percentile(arr, 99)),
        "n": len(samples),
    }


def time_calls(fn: Any, device: torch.device, iters: int, warmup: int) -> list[float]:
    """Wall time of ``fn()`` per call, synchronising the GPU around each call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


class EagerPath(torch.nn.Module):
    """encoder -> decoder (text matching) -> prompt learner, as PyTorch modules."""

    def __init__(self, mods: Any):
        super().__init__()
        from anomalygpt_edge.export.anomalygpt_models import AnomalyGPTEncoder

        self.encoder = AnomalyGPTEncoder(mods.vision, mods.llama_proj).eval()
        self.decoder = mods.decoder.eval()
        self.prompt_learner = mods.prompt_learner.eval()

    def forward(self, pixel_values: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        embed, img_llm, *taps = self.encoder(pixel_values)
        anomaly_map = self.decoder(*taps, text.expand(pixel_values.shape[0], -1, -1))
        prompts = self.prompt_learner(anomaly_map)
        return {
            "tap_last": taps[-1],
            "anomaly_map": anomaly_map,
            "prompt_embeds": prompts,
            "img_llm": img_llm,
        }


#: Backends measured on a GPU (when usable here) and on the CPU (the smoke test).
GPU_BACKENDS = ("onnxruntime-cuda", "tensorrt")
CPU_BACKENDS = ("onnxruntime",)


class BackendPath:
    """The same path through an engine backend on a bundle's graphs (numpy in and out)."""

    def __init__(self, bundle_dir: Path, precision: str, backend: str):
        from anomalygpt_edge.engines import EngineBundle

        bundle = EngineBundle.open(bundle_dir, verify=False)
        # EngineBundle.engine types the FP16 graphs' float32 tensors as float16 itself.
        self.engines = {
            g: bundle.engine(g, precision, backend=backend) for g in ("encoder", "decoder", "prompt_learner")
        }
        self.taps = [s.name for s in bundle.graph("decoder").inputs if s.name != "text_feats"]
        self.dtype = np.float16 if precision == "fp16" else np.float32

    def __call__(self, pixel_values: np.ndarray, text: np.ndarray) -> dict[str, np.ndarray]:
        enc = self.engines["encoder"].run({"pixel_values": pixel_values.astype(self.dtype)})
        b = pixel_values.shape[0]
        feeds = {n: enc[n] for n in self.taps}
        feeds["text_feats"] = np.repeat(text.astype(self.dtype), b, axis=0)
        anomaly_map = self.engines["decoder"].run(feeds)["anomaly_map"]
        prompts = self.engines["prompt_learner"].run({"anomaly_map": anomaly_map})["prompt_embeds"]
        return {
            "tap_last": enc[self.taps[-1]],
            "anomaly_map": anomaly_map,
            "prompt_embeds": prompts,
            "img_llm": enc["img_llm"],
        }


def measured_backends(device: torch.device) -> list[str]:
    """The backends to measure on ``device``: the GPU ones usable here, or the CPU one."""
    from anomalygpt_edge.engines.base import available_backends

    wanted = GPU_BACKENDS if device.type == "cuda" else CPU_BACKENDS
    usable = set(available_backends())
    return [b for b in wanted if b in usable]


def errors(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Max abs error, error relative to the reference's max magnitude, and correlation, per output."""
    out = {}
    for name, r in ref.items():
        a = (r.float().cpu().numpy() if isinstance(r, torch.Tensor) else r).astype(np.float64)
        g = got[name]
        b = (g.float().cpu().numpy() if isinstance(g, torch.Tensor) else g).astype(np.float64)
        corr = float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) if a.std() > 0 and b.std() > 0 else 1.0
        out[name] = {
            "max_abs": float(np.abs(a - b).max()),
            "max_rel": float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)),
            "corr": corr,
        }
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("full", "tiny"), default="full", help="architecture size (tiny: smoke test)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test only)")
    p.add_argument("--bundle", type=Path, help="an anomalygpt bundle exported with --random-weights and --seed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=50, help="timed calls per configuration")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=8, help="batch of the throughput run (default 8)")
    p.add_argument("--skip-backend", action="store_true", help="eager only (no ONNX export)")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    return p


def _report_head(args: argparse.Namespace, argv: list[str] | None, device: torch.device) -> dict[str, Any]:
    command = [sys.executable, "-m", "anomalygpt_edge.export.gpu_bench", *(argv if argv is not None else sys.argv[1:])]
    return {
        "command": " ".join(shlex.quote(a) for a in command),
        "size": args.size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "seed": args.seed,
    }


def _export_bundle(mods: Any, args: argparse.Namespace, report: dict[str, Any], tmp_dir: str) -> Path:
    """Export the modules' bundle (same seeded weights) into ``tmp_dir``; the time goes in the report."""
    from anomalygpt_edge.export.anomalygpt_export import write_bundle
    from anomalygpt_edge.export.bundle_writer import BundleWriter

    bundle_dir = Path(tmp_dir) / "bundle"
    print(f"exporting a {args.size} bundle with the same weights to {bundle_dir} ...", file=sys.stderr)
    t0 = time.perf_counter()
    write_bundle(mods, BundleWriter(bundle_dir), fp16=True, seed=args.seed, preset=args.size)
    report["export_seconds"] = round(time.perf_counter() - t0, 1)
    return bundle_dir


Runners = dict[str, tuple[Any, Any]]


def _eager_runs(mods: Any, inputs: tuple, device: torch.device, results: dict[str, Any]) -> tuple[dict, Runners]:
    """The FP32 reference outputs, and the eager runners (FP16 too on a GPU) with their parity."""
    x1, xb, text = inputs
    eager32 = EagerPath(mods).to(device).float()
    runners: Runners = {}
    with torch.inference_mode():
        d1, db, dt = x1.to(device), xb.to(device), text.to(device)
        ref = {k: v.float().cpu() for k, v in eager32(d1, dt).items()}
        runners["eager fp32"] = (lambda: eager32(d1, dt), lambda: eager32(db, dt))
        if device.type == "cuda":
            eager16 = EagerPath(mods).to(device).half()
            h1, hb, ht = d1.half(), db.half(), dt.half()
            results["eager fp16"] = {"parity": errors(ref, eager16(h1, ht))}
            runners["eager fp16"] = (lambda: eager16(h1, ht), lambda: eager16(hb, ht))
    return ref, runners


def _backend_runs(bundle_dir: Path, inputs: tuple, device: torch.device, ref: dict, report: dict) -> Runners:
    """Each measured backend's runners, its parity against ``ref`` in ``report["results"]``."""
    precision = "fp16" if device.type == "cuda" else "fp32"  # CPU fp16 convolutions are not a product path
    n1, nb, nt = (t.numpy() for t in inputs)
    runners: Runners = {}
    for key in measured_backends(device):
        name = f"{key} {precision}"
        try:
            path = BackendPath(bundle_dir, precision, key)
        except Exception as exc:  # e.g. tensorrt without built engines: say why, measure the rest
            report.setdefault("not_measured", {})[name] = str(exc)
            continue
        report["results"][name] = {"parity": errors(ref, path(n1, nt))}
        runners[name] = (lambda p=path: p(n1, nt), lambda p=path: p(nb, nt))
    return runners


def _time_runners(runners: Runners, results: dict[str, Any], args: argparse.Namespace, device: torch.device) -> None:
    with torch.inference_mode():
        for name, (one, many) in runners.items():
            lat = _percentiles(time_calls(one, device, args.iters, args.warmup))
            tb = time_calls(many, device, max(3, args.iters // 4), max(1, args.warmup // 2))
            entry = results.setdefault(name, {})
            entry["batch1"] = lat
            entry[f"batch{args.batch}_images_per_s"] = float(args.batch / np.median(tb))
    base = results["eager fp32"]
    key = f"batch{args.batch}_images_per_s"
    for entry in results.values():
        entry["speedup_p50_vs_eager_fp32"] = base["batch1"]["p50_ms"] / entry["batch1"]["p50_ms"]
        entry[f"speedup_batch{args.batch}_vs_eager_fp32"] = entry[key] / base[key]


def _print_table(report: dict[str, Any], args: argparse.Namespace) -> bool:
    """Print the figures; True when some path failed its parity tolerance."""
    print(f"AnomalyGPT vision path ({args.size}, random weights) on {report['device']}, torch {torch.__version__}")
    print(f"{'path':<22} {'b1 p50 ms':>10} {'b1 p99 ms':>10} {f'b{args.batch} img/s':>10} {'x fp32':>7}  parity")
    failed = False
    for name, e in report["results"].items():
        parity = e.get("parity", {})
        worst = max((v["max_rel"] for v in parity.values()), default=0.0)
        corr = min((v["corr"] for v in parity.values()), default=1.0)
        # FP16 tolerance: 2% of the output's range and a correlation above 0.999 for every output.
        ok = worst <= 0.02 and corr >= 0.999
        failed |= bool(parity) and not ok
        text_parity = "reference" if not parity else f"max rel {worst:.2e}, corr {corr:.5f} {'OK' if ok else 'FAIL'}"
        print(
            f"{name:<22} {e['batch1']['p50_ms']:>10.2f} {e['batch1']['p99_ms']:>10.2f} "
            f"{e[f'batch{args.batch}_images_per_s']:>10.1f} {e['speedup_p50_vs_eager_fp32']:>7.2f}  "
            f"{text_parity}"
        )
    for name, why in report.get("not_measured", {}).items():
        print(f"{name:<22} not measured: {why}")
    print(f"command: {report['command']}")
    return failed


def main(argv: list[str] | None = None) -> int:
    """Run the parity check and the benchmark; returns the exit code (1 when parity fails)."""
    args = _parser().parse_args(argv)
    from anomalygpt_edge.export.anomalygpt_export import build_modules
    from anomalygpt_edge.export.anomalygpt_models import PRESETS

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_bench: torch sees no CUDA device (use --device cpu --size tiny for a smoke test)")
    cfg = PRESETS[args.size]
    mods = build_modules(cfg, random_weights=True, seed=args.seed)
    report = _report_head(args, argv, device)
    results: dict[str, Any] = {}
    report["results"] = results
    gen = torch.Generator().manual_seed(args.seed + 1)
    x1 = torch.randn(1, 3, cfg.image_size, cfg.image_size, generator=gen)
    xb = torch.randn(args.batch, 3, cfg.image_size, cfg.image_size, generator=gen)
    text = torch.nn.functional.normalize(torch.randn(1, cfg.n_states, cfg.embed_dim, generator=gen), dim=-1)
    ref, runners = _eager_runs(mods, (x1, xb, text), device, results)
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp_dir:
        if not args.skip_backend:
            bundle_dir = args.bundle or _export_bundle(mods, args, report, tmp_dir)
            runners |= _backend_runs(bundle_dir, (x1, xb, text), device, ref, report)
        _time_runners(runners, results, args, device)
    failed = _print_table(report, args)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
