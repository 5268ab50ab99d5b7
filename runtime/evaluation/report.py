"""The evaluation's report: text tables, and the Markdown with ROC/PR curves, heatmap grids and a
summary plot, all drawn with OpenCV (no plotting library on the device)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from anomalygpt_edge.runtime.evaluation import accuracy as metrics
from anomalygpt_edge.runtime.inspection.heatmap import overlay


def text_table(rows: list[tuple]) -> str:
    """Rows as aligned columns, the first row a header underlined with dashes."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _plot(curves: list[tuple[np.ndarray, np.ndarray, str]], xlabel: str, ylabel: str, path: Path) -> None:
    """A small line plot drawn with OpenCV (no plotting library on the device)."""
    size, pad = 420, 50
    img = np.full((size + 2 * pad, size + 2 * pad, 3), 255, np.uint8)
    cv2.rectangle(img, (pad, pad), (pad + size, pad + size), (0, 0, 0), 1)
    colours = [(200, 60, 30), (30, 140, 30), (30, 30, 200), (150, 30, 150)]
    for i, (x, y, label) in enumerate(curves):
        pts = np.stack([pad + x * size, pad + (1 - y) * size], 1).astype(np.int32)
        cv2.polylines(img, [pts], False, colours[i % 4], 2, cv2.LINE_AA)
        cv2.putText(
            img, label, (pad + 10, pad + 20 + 18 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.5, colours[i % 4], 1, cv2.LINE_AA
        )
    cv2.putText(img, xlabel, (pad + size // 2 - 40, size + pad + 35), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    cv2.putText(img, ylabel, (5, pad - 15), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    cv2.imwrite(str(path), img)


def _bars(summaries: list[dict], path: Path) -> None:
    """Summary plot: image AUROC and escape (automatic threshold) per dataset, drawn with OpenCV."""
    names = [Path(s["dataset"]).name for s in summaries]
    w, h, pad = 120 * len(names) + 100, 360, 50
    img = np.full((h + 2 * pad, w, 3), 255, np.uint8)
    cv2.line(img, (pad, pad + h), (w - 20, pad + h), (0, 0, 0), 1)
    for i, (name, s) in enumerate(zip(names, summaries)):
        x = pad + 20 + 120 * i
        for j, (key, colour) in enumerate((("image_auroc", (200, 60, 30)), ("escape_rate", (30, 30, 200)))):
            v = s[key] if np.isfinite(s[key]) else 0.0
            cv2.rectangle(img, (x + 40 * j, pad + h - int(v * h)), (x + 40 * j + 34, pad + h), colour, -1)
            cv2.putText(img, f"{v:.2f}", (x + 40 * j, pad + h - int(v * h) - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                        (0, 0, 0), 1, cv2.LINE_AA)  # fmt: skip
        cv2.putText(img, name[:14], (x, pad + h + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "image AUROC", (pad, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (200, 60, 30), 1, cv2.LINE_AA)
    cv2.putText(img, "escape (auto threshold)", (pad + 140, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (30, 30, 200), 1,
                cv2.LINE_AA)  # fmt: skip
    cv2.imwrite(str(path), img)


def write_report(folder: Path, summaries: list[dict], firsts: list[dict], tables: list[str], summary: str) -> None:
    """Markdown with one section per dataset (ROC, PR, heatmaps of the first seed) and a summary plot."""
    folder.mkdir(parents=True, exist_ok=True)
    s0 = summaries[0]
    md = [
        "# Evaluation",
        "",
        f"{s0['shots']}-shot, {s0['defects']} labelled defects, {s0['seeds']} seed(s), bundle "
        f"`{s0['bundle_sha256'][:16]}` ({s0['bundle_source']}). Mean over seeds:",
        "",
        "```",
        summary,
        "```",
        "",
        "![summary](summary.png)",
        "",
    ]
    _bars(summaries, folder / "summary.png")
    single = len(summaries) == 1  # one set keeps today's flat report folder
    for s, first, table in zip(summaries, firsts, tables):
        name = "." if single else Path(s["dataset"]).name
        md += write_section(folder / name, s, first, table, name)
    (folder / "summary.md").write_text("\n".join(md))


def write_section(folder: Path, summary: dict, first: dict, table: str, rel: str) -> list[str]:
    """ROC and PR curve PNGs and a heatmap grid of one dataset's first seed; its Markdown lines."""
    folder.mkdir(parents=True, exist_ok=True)
    s, y = first["scores"], first["labels"]
    fpr, tpr = metrics.roc_curve(s, y)
    rec, prec = metrics.pr_curve(s, y)
    _plot(
        [(fpr, tpr, f"image ROC, AUROC {metrics.auroc(s, y):.3f}")],
        "false positive rate",
        "true positive rate",
        folder / "roc.png",
    )
    _plot([(rec, prec, "image precision-recall")], "recall", "precision", folder / "pr.png")
    tiles = []
    picked = [e for e in first["examples"] if e[0].defect != "good"][:8] + [
        e for e in first["examples"] if e[0].defect == "good"
    ][:4]
    for t, image, v in picked:
        tile = cv2.resize(overlay(image, v), (192, 192))
        cv2.putText(tile, t.defect, (4, 186), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(tile)
    while len(tiles) % 4:
        tiles.append(np.zeros((192, 192, 3), np.uint8))
    if tiles:
        cv2.imwrite(
            str(folder / "heatmaps.png"), np.vstack([np.hstack(tiles[i : i + 4]) for i in range(0, len(tiles), 4)])
        )
    thr = first["threshold"] or {}
    exp = first.get("expectation") or {}
    return [
        f"## {summary['dataset']}",
        "",
        f"{summary['n_test']} test images, pixel ground truth: {'yes' if summary['pixel_ground_truth'] else 'no (n/a)'}"
        f", {len(summary['skipped'])} unreadable image(s) skipped.",
        "",
        "```",
        table,
        "```",
        "",
        f"Automatic threshold (seed 0): {thr.get('value', float('nan')):.5g} by {thr.get('method')}, "
        f"target false-reject {100 * thr.get('target_frr', 0):g}%.",
        *[f"- warning: {w}" for w in thr.get("warnings", [])],
        *([f"- expected: {exp['explained']}"] if exp.get("explained") else []),
        "",
        f"![ROC]({rel}/roc.png) ![PR]({rel}/pr.png)",
        "",
        "Heatmaps (seed 0):",
        "",
        f"![heatmaps]({rel}/heatmaps.png)",
        "",
    ]
