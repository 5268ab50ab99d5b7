"""``anomalygpt-edge bench line-sweep``: the line's cost curves, measured, as JSON and PNG plots.

Two curves:

* **cameras × fps**: ``bench line`` (separate subscriber process; the path under test, by default
  ``engines.workers: auto`` unbatched, and the old path, one worker unbatched, in the same run) at
  every camera count and frame rate: p50/p99 capture→verdict, the share of frames inspected, the
  ERROR share, the bench process's CPU % and peak RSS (the keys ``batched``/``unbatched`` name the
  two runs as before: path under test / old path);
* **batch size**: one bundle's encoder + bank matcher through the line's batched entry
  (:func:`~anomalygpt_edge.runtime.recipes.inspector.inspect_many`) at each batch size and
  ``engines.threads`` value, interleaved round by round so that load from other processes hits
  every size alike: images/s and p99 per batch;
* **workers**: the same recipe inspected one image at a time by 1, 2, ... concurrent loops (what
  ``engines.workers`` runs), in blocks 1, 2, 2, 1: images/s and per-image p50/p99.

Plots are drawn with OpenCV (no plotting library is a dependency); every figure is in
``sweep.json`` next to them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

#: Colours (BGR) of the plotted series, in order.
COLOURS = [(200, 90, 30), (40, 140, 40), (30, 30, 200), (160, 60, 160), (20, 150, 190), (90, 90, 90)]
W, H, MARGIN = 640, 400, 60


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2)


# -- batch size -> images/s ---------------------------------------------------------------------
def _inspector(bundle: Path, store: Path, backend: str, threads: int) -> Any:
    """The enrolled ``bracket`` recipe on ``threads`` ONNX Runtime threads, as the daemon builds it."""
    from anomalygpt_edge.engines.bundle import EngineBundle
    from anomalygpt_edge.runtime.inspection.pipeline import VisionPipeline
    from anomalygpt_edge.runtime.line.config import EnginesConfig
    from anomalygpt_edge.runtime.recipes.inspector import Inspector
    from anomalygpt_edge.runtime.recipes.store import RecipeStore

    options = EnginesConfig.model_validate({"backend": backend, "threads": threads}).bundle_options()
    opened = EngineBundle.open(bundle, backend=options)
    pipeline = VisionPipeline(opened)
    recipes = RecipeStore(store)
    return Inspector(opened, recipes.load("bracket"), recipes, pipeline)


def batch_curve(
    bundle: Path, store: Path, images: list[np.ndarray], sizes: list[int], threads: list[int], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """images/s and per-batch p50/p99 for every (threads, batch size).

    Batch sizes are interleaved round by round. Thread counts run in blocks, in the order 1, 2, 2, 1
    (so a load change favours neither), with a pause between blocks: a pool of two or more threads
    spin-waits after its run and would slow a run of another session right after it.
    """
    from anomalygpt_edge.runtime.recipes.inspector import inspect_many

    if not sizes:
        return []  # --batch-sizes "": the camera curve only
    inspectors = {t: _inspector(bundle, store, args.backend, t) for t in threads}
    for inspector in inspectors.values():
        inspect_many([(inspector, images[0], "warm-up")] * max(sizes))
    times: dict[tuple[int, int], list[float]] = {(t, b): [] for t in threads for b in sizes}
    i = 0
    for t in [*threads, *reversed(threads)]:
        time.sleep(0.2)
        end = time.monotonic() + args.batch_seconds * len(sizes) / 2
        while time.monotonic() < end or any(len(times[(t, b)]) < 3 for b in sizes):
            for b in sizes:
                batch = [(inspectors[t], images[(i + k) % len(images)], f"img{k}") for k in range(b)]
                t0 = time.perf_counter()
                inspect_many(batch)
                times[(t, b)].append(time.perf_counter() - t0)
                i += b
    rows = []
    for (t, b), seconds in times.items():
        ms = [s * 1e3 for s in seconds]
        rows.append(
            {
                "threads": t,
                "batch": b,
                "batches": len(ms),
                "images_per_s": round(b * len(ms) / sum(seconds), 1),
                "images_per_s_at_p50": round(1e3 * b / _pct(ms, 50), 1),
                "batch_ms_p50": _pct(ms, 50),
                "batch_ms_p99": _pct(ms, 99),
            }
        )
    return rows


def workers_curve(
    bundle: Path, store: Path, images: list[np.ndarray], counts: list[int], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """images/s and per-image p50/p99 of ``n`` loops sharing one inspector, one image at a time each.

    Each loop is what one inspection worker runs (``inspect_many`` of one job on single-thread
    ONNX Runtime sessions shared by the loops). Counts run in blocks, in the order 1, 2, 2, 1.
    """
    import threading

    from anomalygpt_edge.runtime.recipes.inspector import inspect_many

    if not counts:
        return []
    inspector = _inspector(bundle, store, args.backend, 1)
    inspect_many([(inspector, images[0], "warm-up")])
    done: dict[int, list[float]] = {n: [] for n in counts}
    elapsed: dict[int, float] = dict.fromkeys(counts, 0.0)
    for n in [*counts, *reversed(counts)]:
        end = time.monotonic() + args.batch_seconds

        def loop(k: int, n: int = n, end: float = end) -> None:
            i = k
            while time.monotonic() < end:
                t0 = time.perf_counter()
                inspect_many([(inspector, images[i % len(images)], f"img{i}")])
                done[n].append(time.perf_counter() - t0)
                i += n

        loops = [threading.Thread(target=loop, args=(k,), name=f"curve-{k}") for k in range(n)]
        t0 = time.monotonic()
        for t in loops:
            t.start()
        for t in loops:
            t.join()
        elapsed[n] += time.monotonic() - t0
    rows = []
    for n, seconds in done.items():
        ms = [v * 1e3 for v in seconds]
        rows.append(
            {
                "workers": n,
                "images": len(ms),
                "images_per_s": round(len(ms) / elapsed[n], 1),
                "image_ms_p50": _pct(ms, 50),
                "image_ms_p99": _pct(ms, 99),
            }
        )
    return rows


# -- cameras x fps ------------------------------------------------------------------------------
def _point(args: argparse.Namespace, cameras: int, fps: float, first: bool = False) -> dict[str, Any]:
    """``bench line`` at one camera count and rate; the summary of both modes and their ratios."""
    from anomalygpt_edge.runtime.tools import line_bench

    ns = argparse.Namespace(**{**vars(args), "cameras": cameras, "fps": fps, "unbatched_first": first})
    figures = line_bench.measure(ns)
    line_bench._print_figures(figures, " (path under test)")
    keep = ("latency_ms", "verdicts_per_s", "share_of_frames_inspected", "error_share", "errors_free_run",
            "errors_triggered", "cpu_percent", "rss_mb_peak", "mean_batch", "max_batch", "workers", "triggers",
            "load_average_1m")  # fmt: skip
    point: dict[str, Any] = {"cameras": cameras, "fps": fps, "batched": {k: figures.get(k) for k in keep}}
    if "unbatched" in figures:
        point["unbatched"] = {k: figures["unbatched"].get(k) for k in keep}
        point["ratios"] = figures["ratios"]
    return point


# -- plots --------------------------------------------------------------------------------------
def chart(
    path: Path, title: str, xlabel: str, ylabel: str, series: list[tuple[str, list[float], list[float]]],
    hline: float | None = None,
) -> Path:  # fmt: skip
    """A line chart as a small PNG (OpenCV drawing): one polyline per series, a legend, a dashed limit."""
    img = np.full((H, W, 3), 255, np.uint8)
    xs = sorted({x for _, sx, _ in series for x in sx}) or [0.0, 1.0]
    ys = [y for _, _, sy in series for y in sy if y is not None] + ([hline] if hline is not None else [])
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y1 = max(ys) * 1.1 if ys and max(ys) > 0 else 1.0

    def at(x: float, y: float) -> tuple[int, int]:
        px = MARGIN + (x - x0) / (x1 - x0) * (W - 2 * MARGIN)
        return int(px), int(H - MARGIN - y / y1 * (H - 2 * MARGIN))

    font, black, grey = cv2.FONT_HERSHEY_SIMPLEX, (0, 0, 0), (200, 200, 200)
    cv2.rectangle(img, (MARGIN, MARGIN), (W - MARGIN, H - MARGIN), black, 1)
    for k in range(6):
        y = y1 * k / 5
        cv2.line(img, at(x0, y), at(x1, y), grey, 1)
        cv2.putText(img, f"{y:.3g}", (4, at(x0, y)[1] + 4), font, 0.4, black, 1, cv2.LINE_AA)
    for x in xs:
        cv2.putText(img, f"{x:g}", (at(x, 0)[0] - 8, H - MARGIN + 16), font, 0.4, black, 1, cv2.LINE_AA)
    if hline is not None:
        for px in range(MARGIN, W - MARGIN, 12):
            cv2.line(img, (px, at(x0, hline)[1]), (px + 6, at(x0, hline)[1]), (0, 0, 230), 1)
    for n, (label, sx, sy) in enumerate(series):
        colour = COLOURS[n % len(COLOURS)]
        pts = [at(x, y) for x, y in zip(sx, sy) if y is not None]
        if len(pts) > 1:
            cv2.polylines(img, [np.array(pts, np.int32)], False, colour, 2, cv2.LINE_AA)
        for p in pts:
            cv2.circle(img, p, 3, colour, -1)
        cv2.putText(img, label, (MARGIN + 8, MARGIN + 16 + 16 * n), font, 0.45, colour, 1, cv2.LINE_AA)
    cv2.putText(img, title, (MARGIN, MARGIN - 22), font, 0.55, black, 1, cv2.LINE_AA)
    cv2.putText(img, ylabel, (4, MARGIN - 6), font, 0.4, black, 1, cv2.LINE_AA)
    cv2.putText(img, xlabel, (W // 2 - 40, H - 12), font, 0.45, black, 1, cv2.LINE_AA)
    cv2.imwrite(str(path), img, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return path


def _mode_label(figures: dict[str, Any]) -> str:
    """What one run was: its workers per queue and batch bound."""
    return f"workers {figures.get('workers') or 1}, batch {figures.get('max_batch') or 1}"


def _series(points: list[dict[str, Any]], value: Any, modes: tuple[str, ...] = ("batched", "unbatched")) -> list:
    """One series per (fps, mode): x = cameras, y = ``value(mode figures)``."""
    out = []
    for fps in sorted({p["fps"] for p in points}):
        for mode in modes:
            pts = [p for p in points if p["fps"] == fps and mode in p]
            if pts:
                label = f"{fps:g} fps, {_mode_label(pts[0][mode])}"
                out.append((label, [p["cameras"] for p in pts], [value(p[mode]) for p in pts]))
    return out


def plots(
    out: Path, points: list[dict[str, Any]], curve: list[dict[str, Any]], workers: list[dict[str, Any]] | None = None
) -> list[str]:
    """Every PNG of the report; returns their paths."""
    p99 = _series(points, lambda f: f["latency_ms"]["p99"])
    p50 = _series(points, lambda f: f["latency_ms"]["p50"])
    share = _series(points, lambda f: 100 * (f["share_of_frames_inspected"] or 0))
    errors = _series(points, lambda f: 100 * (f["error_share"] or 0))
    cpu = _series(points, lambda f: f["cpu_percent"])
    rss = _series(points, lambda f: f["rss_mb_peak"])
    threads = sorted({r["threads"] for r in curve})
    ips = [(f"threads {t}", [r["batch"] for r in curve if r["threads"] == t],
            [r["images_per_s"] for r in curve if r["threads"] == t]) for t in threads]  # fmt: skip
    bp99 = [(f"threads {t}", [r["batch"] for r in curve if r["threads"] == t],
             [r["batch_ms_p99"] for r in curve if r["threads"] == t]) for t in threads]  # fmt: skip
    paths = [
        chart(out / "p99_vs_cameras.png", "capture->verdict p99", "cameras", "ms", p99, hline=100.0),
        chart(out / "p50_vs_cameras.png", "capture->verdict p50", "cameras", "ms", p50),
        chart(out / "inspected_vs_cameras.png", "frames inspected", "cameras", "%", share, hline=100.0),
        chart(out / "errors_vs_cameras.png", "ERROR verdicts", "cameras", "% of verdicts", errors),
        chart(out / "cpu_vs_cameras.png", "bench process CPU (100 = one core)", "cameras", "%", cpu),
        chart(out / "rss_vs_cameras.png", "bench process peak RSS", "cameras", "MB", rss),
    ]
    if curve:  # --batch-sizes "": no batch curve, no empty charts
        paths.append(chart(out / "images_per_s_vs_batch.png", "encoder+matcher images/s", "batch size", "/s", ips))
        paths.append(chart(out / "batch_p99_vs_batch.png", "p99 of one batch", "batch size", "ms", bp99))
    if workers:
        xs = [r["workers"] for r in workers]
        series = [("images/s", xs, [r["images_per_s"] for r in workers])]
        paths.append(chart(out / "images_per_s_vs_workers.png", "images/s, one at a time", "workers", "/s", series))
    return [str(p) for p in paths]


def _print_tables(
    points: list[dict[str, Any]], curve: list[dict[str, Any]], workers: list[dict[str, Any]] | None = None
) -> None:
    """The tables BENCHMARKS.md quotes."""
    print("| cameras | fps | mode | p50 ms | p99 ms | inspected | ERROR | verdicts/s | mean batch | CPU % | RSS MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for p in points:
        for mode in ("batched", "unbatched"):
            if mode not in p:
                continue
            f, lat = p[mode], p[mode]["latency_ms"]
            share = f"{100 * (f['share_of_frames_inspected'] or 0):.1f} %"
            err = f"{100 * (f['error_share'] or 0):.1f} %"
            mode_label = _mode_label(f)
            print(f"| {p['cameras']} | {p['fps']:g} | {mode_label} | {lat['p50']} | {lat['p99']} | {share} | {err} | "
                  f"{f['verdicts_per_s']} | {f['mean_batch']} | {f['cpu_percent']} | {f['rss_mb_peak']} |")  # fmt: skip
        if "ratios" in p:
            print(f"|  |  | new/old | | p99 x{p['ratios']['latency_p99']} | | | "
                  f"x{p['ratios']['verdicts_per_s']} | | | |")  # fmt: skip
    if workers:
        print("\n| workers | images/s | image p50 ms | image p99 ms |")
        print("| --- | --- | --- | --- |")
        for r in workers:
            print(f"| {r['workers']} | {r['images_per_s']} | {r['image_ms_p50']} | {r['image_ms_p99']} |")
    print("\n| threads | batch | images/s | batch p50 ms | batch p99 ms |")
    print("| --- | --- | --- | --- | --- |")
    for r in curve:
        print(f"| {r['threads']} | {r['batch']} | {r['images_per_s']} | {r['batch_ms_p50']} | {r['batch_ms_p99']} |")


def busy_processes(limit: int = 6) -> list[str]:
    """The busiest other processes right now (``ps``), so the report says what else was running."""
    import os
    import subprocess

    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    rows = [line.split(None, 2) for line in out.stdout.splitlines()[1:]]
    return [f"{r[1]} % {r[2][:100]}" for r in rows if len(r) == 3 and int(r[0]) != os.getpid()][:limit]


def run(args: argparse.Namespace) -> int:
    """``bench line-sweep``: the batch curve, then ``bench line`` over cameras × fps; JSON + PNG in ``--out``."""
    import os

    from anomalygpt_edge.runtime.tools import line_bench, synthetic

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    prep = argparse.Namespace(**{**vars(args), "cameras": 1, "fps": 10.0})
    work, bundle = line_bench._prepare(prep)
    images = synthetic.read_video_frames(work / "line.avi")[:16]
    started, busy = time.time(), busy_processes()
    curve = batch_curve(bundle, work / "store", images, _ints(args.batch_sizes), _ints(args.thread_counts), args)
    workers = workers_curve(bundle, work / "store", images, _ints(getattr(args, "worker_counts", "")), args)
    grid = [(n, fps) for fps in _floats(args.fps_list) for n in _ints(args.camera_counts)]
    points = [_point(args, n, fps, first=i % 2 == 1) for i, (n, fps) in enumerate(grid)]
    report: dict[str, Any] = {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "cpu_count": os.cpu_count(),
        "load_average_1m_end": round(os.getloadavg()[0], 2),
        "busy_processes_start": busy,
        "busy_processes_end": busy_processes(),
        "batch_curve": curve,
        "workers_curve": workers,
        "points": points,
    }
    report["plots"] = drawn = plots(out, points, curve, workers)
    (out / "sweep.json").write_text(json.dumps(report, indent=2) + "\n")
    _print_tables(points, curve, workers)
    print(f"report: {out / 'sweep.json'} and {len(drawn)} plots")
    return 0
