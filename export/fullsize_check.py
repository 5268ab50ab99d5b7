"""Full-size AnomalyGPT export check, not part of CI.

Run as ``python -m anomalygpt_edge.export.fullsize_check --out DIR``.

Builds the full-size architecture (ImageBind-Huge vision, 632.8 M parameters) with random weights,
checks every parameter count against the architecture spec, exports the bundle (the encoder
passes 2 GB, so it uses ONNX's external-data format), then runs each graph once under ONNX Runtime
in a child process that cannot import torch, and compares the encoder with PyTorch eager. Prints
time, peak memory (RSS) and file sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _rss_gb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


def _save_reference(mods: Any, out: Path, seed: int) -> float:
    """PyTorch eager encoder outputs for one fixed image, beside the bundle; seconds the eager run took.

    The Conv3d reference path, before any folding: what the exported graphs are compared with.
    """
    import numpy as np
    import torch

    cfg = mods.cfg
    size = cfg.image_size
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((1, 3, size, size)).astype(np.float32))
    t1 = time.perf_counter()
    with torch.no_grad():
        embed, taps = mods.vision(x)
        ref = [embed, mods.llama_proj(embed).unsqueeze(1), *[t.transpose(0, 1)[:, 1:] for t in taps]]
    eager_s = time.perf_counter() - t1
    names = ["image_embed", "img_llm", *[f"tap{i}" for i in cfg.taps]]
    np.savez(
        out.with_name(out.name + ".reference.npz"),
        pixel_values=x.numpy(),
        **{n: t.numpy() for n, t in zip(names, ref, strict=True)},
    )
    return eager_s


def export_full(out: Path, fp16: bool, seed: int, preset: str = "full") -> dict[str, Any]:
    """Build, check counts, export; also save PyTorch reference encoder outputs for one image."""

    from anomalygpt_edge.export.anomalygpt_export import build_modules, write_bundle
    from anomalygpt_edge.export.anomalygpt_models import (
        PRESETS,
        SPEC_PARAMS,
        count_parameters,
        expected_parameters,
    )
    from anomalygpt_edge.export.bundle_writer import BundleWriter

    cfg = PRESETS[preset]
    t0 = time.perf_counter()
    mods = build_modules(cfg, random_weights=True, seed=seed)
    built = time.perf_counter() - t0
    counts = {
        "vision": count_parameters(mods.vision),
        "decoder": count_parameters(mods.decoder),
        "prompt_learner": count_parameters(mods.prompt_learner),
        "llama_proj": count_parameters(mods.llama_proj),
    }
    # The spec's counts hold for the full model; a smaller preset is checked against the closed form.
    want = SPEC_PARAMS if preset == "full" else expected_parameters(cfg)
    if counts != want or (preset == "full" and expected_parameters(cfg) != SPEC_PARAMS):
        raise SystemExit(f"parameter counts {counts} differ from the spec {want}")
    print(f"parameter counts match the spec: {counts}", flush=True)

    eager_s = _save_reference(mods, out, seed)

    t2 = time.perf_counter()
    writer = BundleWriter(out, overwrite=True)
    try:
        write_bundle(mods, writer, fp16=fp16, seed=seed, preset=preset)
    except BaseException:
        writer.abort()
        raise
    export_s = time.perf_counter() - t2
    print(writer.report(), flush=True)
    return {
        "build_s": built,
        "torch_eager_encoder_s": eager_s,
        "export_s": export_s,
        "export_peak_rss_gb": _rss_gb(),
        "params": counts,
    }


def run_bundle(bundle_dir: Path, precisions: list[str]) -> dict[str, Any]:
    """Open the bundle (verifying hashes) and run every graph once; compare with the reference."""
    import numpy as np

    from anomalygpt_edge.engines import EngineBundle

    result: dict[str, Any] = {}
    t0 = time.perf_counter()
    bundle = EngineBundle.open(bundle_dir)
    result["open_verify_s"] = time.perf_counter() - t0
    ref = np.load(bundle_dir.with_name(bundle_dir.name + ".reference.npz"))
    m = bundle.manifest
    cfg = m.source["config"]
    assert [p.name for p in m.patch_layers] == [f"tap{i}" for i in cfg["taps"]], m.patch_layers
    llm_section = m.llm
    assert llm_section is not None, "an AnomalyGPT bundle's manifest has an llm section"
    for precision in precisions:
        dt = np.float32 if precision == "fp32" else np.float16
        r: dict[str, Any] = {}

        def run(graph: str, feeds: dict[str, np.ndarray], r=r, precision=precision) -> dict[str, np.ndarray]:
            # Session creation (reading the weights) and the first run are timed separately.
            t = time.perf_counter()
            engine = bundle.engine(graph, precision)
            r[f"{graph}_load_s"] = time.perf_counter() - t
            t = time.perf_counter()
            out = engine.run(feeds)
            r[f"{graph}_run_s"] = time.perf_counter() - t
            return out

        out = run("encoder", {"pixel_values": ref["pixel_values"].astype(dt)})
        r["encoder_max_abs_diff_vs_torch"] = {k: float(np.abs(out[k].astype(np.float32) - ref[k]).max()) for k in out}
        shapes = {k: list(v.shape) for k, v in out.items()}
        n, llm = (cfg["image_size"] // cfg["patch_size"]) ** 2, llm_section["width"]
        assert shapes["image_embed"] == [1, cfg["embed_dim"]] and shapes["img_llm"] == [1, 1, llm], shapes
        assert all(shapes[p.name] == [1, n, cfg["width"]] for p in m.patch_layers), shapes
        taps = [out[p.name] for p in m.patch_layers]
        feats = bundle.text_features()["bottle"][None].astype(dt)
        feeds = {p.name: v for p, v in zip(m.patch_layers, taps, strict=True)} | {"text_feats": feats}
        amap = run("decoder", feeds)["anomaly_map"]
        feeds = {f"q_{i}": v for i, v in enumerate(taps)} | {f"bank_{i}": v[0] for i, v in enumerate(taps)}
        fmap = run("bank_matcher", feeds)["anomaly_map"]
        r["bank_self_match_max_score"] = float(np.abs(fmap.astype(np.float32)).max())
        prompts = run("prompt_learner", {"anomaly_map": amap})["prompt_embeds"]
        assert amap.shape == (1, 1, *m.map_size), amap.shape
        assert prompts.shape == (1, llm_section["n_prompts"], llm), prompts.shape
        result[precision] = r
    result["sizes"] = {f.path: f.size for f in m.files.values()}
    result["runtime_peak_rss_gb"] = _rss_gb()
    result["loadavg_1m_at_end"] = os.getloadavg()[0]
    result["torch_imported"] = "torch" in sys.modules
    return result


_CHILD = """
import sys, json
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'torch':
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from pathlib import Path
from anomalygpt_edge.export.fullsize_check import run_bundle
print('RESULT ' + json.dumps(run_bundle(Path(sys.argv[1]), sys.argv[2].split(','))))
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point: export, run under ONNX Runtime without torch, print the figures as JSON."""
    p = argparse.ArgumentParser(description="Full-size AnomalyGPT export check (random weights).")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write (replaced if present)")
    p.add_argument("--no-fp16", action="store_true", help="skip the FP16 graph variants")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=("full", "tiny"), default="full", help="tiny: a quick smoke run")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    figures: dict[str, Any] = {"command": "python -m anomalygpt_edge.export.fullsize_check " + " ".join(sys.argv[1:])}
    # The 1-minute load average shows how much other work shared the CPU during the timings.
    figures["loadavg_1m_at_start"] = os.getloadavg()[0]
    figures.update(export_full(args.out, not args.no_fp16, args.seed, args.preset))
    precisions = ["fp32"] if args.no_fp16 else ["fp32", "fp16"]
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(args.out), ",".join(precisions)], capture_output=True, text=True
    )
    if child.returncode != 0:
        print(child.stdout, child.stderr, file=sys.stderr)
        return 1
    line = next(ln for ln in child.stdout.splitlines() if ln.startswith("RESULT "))
    figures["onnxruntime"] = json.loads(line[len("RESULT ") :])
    figures["total_s"] = time.perf_counter() - t0
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
