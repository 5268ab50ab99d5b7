"""``anomalygpt-edge bench learn``: a dataset played as a line that learns from a simulated operator.

Per dataset (MVTec layout; ``ground_truth/`` optional: the operator labels images, not pixels):

1. ``--shots`` golden parts are drawn (seeded) from ``train/good`` and enrolled as on the line;
2. the test parts are inspected in one fixed shuffled order (``--seed``), each part once;
3. the simulated operator labels every ``--label-every``-th verdict with its truth, and every
   ``--apply-every`` labels the proposal from those labels (:mod:`runtime.recipes.proposal`) is
   applied, as a technician approving it would;
4. the same parts are scored in the same pass by the enrolled recipe never changed (the baseline,
   "before"), so both columns see the same parts in the same order;
5. false-reject and escape rates per window of ``--window`` parts, and of the first and last
   quarter of the parts, for both; for context the oracle of the last quarter: the lowest escape
   any threshold on those scores gives at 5 % false rejects (no line has it);
6. the drift watch (``calibration/drift.py``) watches the learning replay's verdicts and gets
   the operator's labels (as the line's watch does), its labels window kept when an apply
   rebuilds it for the new version:
   ``drift_first_flag_part`` is the part index of its first flag of any kind (score drift, reject
   rate above what the goldens allow, labelled false rejects), ``drift_first_flag_good_parts`` how
   many good parts had passed the line by then; ``drift_score_flag_part`` the score-drift
   statistic's own first flag;
7. a control replay (``--control-parts``): parts drawn with replacement from the ``train/good``
   images not enrolled (the goldens' own population), inspected by the enrolled recipe with no
   labels applied; ``control.false_alarm_part`` is the drift watch's first flag of any kind there
   (null if none).

Everything runs in-process on a scratch store in a temporary folder. Each image is encoded once
per pass; the labelled parts are encoded again by the proposal (as on the line).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from anomalygpt_edge.engines.bundle import EngineBundle
from anomalygpt_edge.engines.preprocess import ImageError
from anomalygpt_edge.progress import Progress, note
from anomalygpt_edge.runtime.evaluation.evaluate import Dataset, DatasetError, Skips, escape_at_frr, scan_dataset
from anomalygpt_edge.runtime.inspection.pipeline import ENCODE_BATCH, VisionPipeline
from anomalygpt_edge.runtime.recipes.enrollment import Enroller
from anomalygpt_edge.runtime.recipes.inspector import Inspector
from anomalygpt_edge.runtime.recipes.proposal import LabelledPart, Proposal, apply, propose
from anomalygpt_edge.runtime.recipes.store import Recipe, RecipeError, RecipeStore

RECIPE = "learn"
#: The oracle's operating point and the issue's false-reject target.
ORACLE_FRR = 0.05
PANEL_W, PANEL_H = 640, 300


def _drift_module() -> Any | None:
    """calibration.drift when this checkout has it (the drift watch is built beside this bench)."""
    try:
        return importlib.import_module("anomalygpt_edge.calibration.drift")
    except ImportError:
        return None


def _watch(recipe: Recipe) -> Any | None:
    drift = _drift_module()
    if drift is None or recipe.threshold is None:
        return None
    golden = [s.score for s in recipe.samples if s.score is not None]
    expected = (recipe.quality.get("expectation") or {}).get("estimated_frr")
    return drift.DriftWatch(golden, recipe.threshold.value, expected, name=recipe.name)


def _rewatch(recipe: Recipe, previous: Any | None) -> Any | None:
    """The watch of a new version, keeping the previous watch's labels (as ``DriftWatches`` does on the line)."""
    watch = _watch(recipe)
    if watch is not None and previous is not None and hasattr(watch, "carry_labels"):
        watch.carry_labels(previous)
    return watch


@dataclass
class Replay:
    """The per-part record of one replay."""

    labels: list[bool] = field(default_factory=list)  # True: defect
    learn: list[float] = field(default_factory=list)  # score under the recipe live at that part
    learn_ng: list[bool] = field(default_factory=list)
    base: list[float] = field(default_factory=list)
    base_ng: list[bool] = field(default_factory=list)
    applies: list[dict[str, Any]] = field(default_factory=list)
    drift_part: int | None = None
    drift_good: int | None = None
    drift_message: str | None = None
    any_flag: dict[str, Any] | None = None  # first flag of any kind (reject rate, labelled FRR, score drift)


def _rates(labels: np.ndarray, ng: np.ndarray) -> dict[str, Any]:
    good, bad = ~labels, labels
    return {
        "parts": int(labels.size),
        "n_good": int(good.sum()),
        "n_defect": int(bad.sum()),
        "false_reject_rate": float(ng[good].mean()) if good.any() else None,
        "escape_rate": float((~ng[bad]).mean()) if bad.any() else None,
    }


def _windows(labels: np.ndarray, ng: np.ndarray, size: int) -> list[dict[str, Any]]:
    out = []
    for start in range(0, labels.size, size):
        block = _rates(labels[start : start + size], ng[start : start + size])
        out.append({"first_part": start, **block})
    return out


def _quarters(labels: np.ndarray, ng: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
    q = labels.size // 4
    return _rates(labels[:q], ng[:q]), _rates(labels[labels.size - q :], ng[labels.size - q :])


class Line:
    """One dataset's replay: the enrolled recipe, the learning recipe, the operator, the drift watch."""

    def __init__(self, bundle: EngineBundle, pipeline: VisionPipeline, root: Path, args: argparse.Namespace):
        self.bundle, self.pipeline, self.args = bundle, pipeline, args
        self.store = RecipeStore(root)
        self.enroller = Enroller(self.store, bundle, pipeline)
        self.skips = Skips()

    def enroll(self, golden: list[Path]) -> Recipe:
        goods = [(p.name, r[0]) for p in golden if (r := self.skips.read(p)) is not None]
        if len(goods) < 2:
            raise DatasetError("fewer than 2 readable golden images")
        self.enroller.create(RECIPE, **({"target_frr": self.args.target_frr} if self.args.target_frr else {}))
        return self.enroller.add(RECIPE, goods, accept_flagged=True).recipe

    def inspector(self) -> Inspector:
        return Inspector(self.bundle, self.store.load(RECIPE), self.store, self.pipeline)

    def scores(self, inspector: Inspector, features: dict[str, np.ndarray]) -> list[float]:
        return [self.pipeline.image_score(m) for m in inspector.maps(features)]

    def encode(self, images: list[np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        return self.pipeline.encode([self.pipeline.prepare(im, None, None, n) for im, n in zip(images, names)])

    def replay(self, items: list[tuple[str, Path, bool, str]], bar: Progress) -> Replay:
        """Inspect ``(name, path, is_defect, defect type)`` in order; label, propose and apply as configured."""
        out, pending, n_labels = Replay(), [], 0
        base, live = self.inspector(), self.inspector()
        watch = _watch(live.recipe)
        goods_passed = 0
        for start in range(0, len(items), ENCODE_BATCH):
            chunk = [
                (it, r[0]) for it in items[start : start + ENCODE_BATCH] if (r := self.skips.read(it[1])) is not None
            ]
            bar.update(min(ENCODE_BATCH, len(items) - start))
            if not chunk:
                continue
            feats = self.encode([im for _, im in chunk], [it[0] for it, _ in chunk])
            base_s = self.scores(base, feats)
            for row, ((name, _, defect, kind), image) in enumerate(chunk):
                one = {k: v[row : row + 1] for k, v in feats.items()}
                score = self.scores(live, one)[0]
                ng = score > live.threshold
                i = len(out.labels)
                out.labels.append(defect)
                out.learn.append(score)
                out.learn_ng.append(ng)
                out.base.append(base_s[row])
                out.base_ng.append(base_s[row] > base.threshold)
                goods_passed += (not defect) and not ng
                if watch is not None:
                    watch.observe(score, "NG" if ng else "OK", at=float(i))
                    state = watch.state(now=float(i))
                    if out.drift_part is None and state.drifting:
                        out.drift_part, out.drift_good, out.drift_message = i, goods_passed, state.message
                    if out.any_flag is None and state.flagged:
                        out.any_flag = _flag_record(state, i, goods_passed)
                if self.args.label_every and (i + 1) % self.args.label_every == 0:
                    pending.append(LabelledPart(name, image, "defect" if defect else "good", kind if defect else None))
                    if watch is not None:  # as the line's labels reach its watch (ProposalDesk.on_label)
                        watch.observe_label("defect" if defect else "good", "NG" if ng else "OK", at=float(i))
                    n_labels += 1
                    if n_labels % self.args.apply_every == 0:
                        live = self.learn(pending, i, out)
                        watch = _rewatch(live.recipe, watch)
                        pending = []
        return out

    def learn(self, parts: list[LabelledPart], part: int, out: Replay) -> Inspector:
        """The technician approves the proposal from the labels since the last one."""
        t0 = time.perf_counter()
        try:
            proposal: Proposal = propose(self.enroller, RECIPE, parts)
            if proposal.add_goldens or proposal.add_defects:
                apply(self.enroller, proposal, parts, by="bench learn", reason=f"labels up to part {part}")
            record = {"part": part, **{k: v for k, v in proposal.to_json().items() if k != "recipe"}}
        except (RecipeError, ImageError) as exc:  # a proposal that cannot be made is reported, never fatal
            record = {"part": part, "error": str(exc)}
        record["seconds"] = round(time.perf_counter() - t0, 2)
        out.applies.append(record)
        return self.inspector()

    def control(self, pool: list[Path], n: int, seed: int) -> dict[str, Any]:
        """The goldens' own population replayed ``n`` times (with replacement) to the enrolled recipe's drift watch."""
        if not n or not pool or _drift_module() is None:
            return {"parts": 0, "false_alarm_part": None, "pool": len(pool), "note": "not run"}
        inspector = self.inspector()
        scores: list[float] = []
        for start in range(0, len(pool), ENCODE_BATCH):
            chunk = [
                (p.name, r[0]) for p in pool[start : start + ENCODE_BATCH] if (r := self.skips.read(p)) is not None
            ]
            if chunk:
                scores += self.scores(inspector, self.encode([im for _, im in chunk], [nm for nm, _ in chunk]))
        draw = np.random.default_rng(seed + 1).integers(0, len(scores), n)
        watch = _watch(inspector.recipe)
        alarm, message = None, None
        if watch is None:
            return {"parts": 0, "false_alarm_part": None, "pool": len(pool), "note": "no threshold"}
        for i, j in enumerate(draw):
            s = scores[int(j)]
            watch.observe(s, "NG" if s > inspector.threshold else "OK", at=float(i))
            state = watch.state(now=float(i))
            if state.flagged:
                alarm, message = i, state.message
                break
        ng = np.array(scores) > inspector.threshold
        return {
            "parts": n,
            "pool": len(scores),
            "false_alarm_part": alarm,
            "message": message,
            "false_reject_rate": float(ng[draw].mean()),
        }


def _flag_record(state: Any, part: int, goods_passed: int) -> dict[str, Any]:
    kinds = [k for k in ("drifting", "reject_rate_high", "labelled_frr_high") if getattr(state, k)]
    return {"part": part, "good_parts": goods_passed, "kinds": kinds, "message": state.message}


def replay_dataset(bundle: EngineBundle, pipeline: VisionPipeline, data: Dataset, args: argparse.Namespace) -> dict:
    """One dataset's replay and control, as the JSON block of that dataset."""
    if not 2 <= args.shots <= len(data.train):
        raise DatasetError(f"{data.root}: --shots must be between 2 and {len(data.train)} (images in train/good)")
    rng = np.random.default_rng(args.seed)
    chosen = set(rng.choice(len(data.train), size=args.shots, replace=False).tolist())
    golden = [p for i, p in enumerate(data.train) if i in chosen]
    pool = [p for i, p in enumerate(data.train) if i not in chosen]
    order = rng.permutation(len(data.tests))
    items = [
        (f"{t.defect}/{t.path.name}", t.path, t.defect != "good", t.defect) for t in (data.tests[i] for i in order)
    ]
    if args.max_parts:
        items = items[: args.max_parts]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="agpt-learn-") as tmp:
        line = Line(bundle, pipeline, Path(tmp), args)
        enrolled = line.enroll(golden)
        with Progress(len(items), f"bench learn {data.root.name}", "part") as bar:
            r = line.replay(items, bar)
        control = line.control(pool, args.control_parts, args.seed)
    return _summary(data, args, enrolled, r, control, time.perf_counter() - t0, line.skips)


def _summary(
    data: Dataset, args: argparse.Namespace, enrolled: Recipe, r: Replay, control: dict, seconds: float, skips: Skips
) -> dict[str, Any]:
    labels, learn_ng, base_ng = np.array(r.labels, bool), np.array(r.learn_ng, bool), np.array(r.base_ng, bool)
    first, last = _quarters(labels, learn_ng)
    b_first, b_last = _quarters(labels, base_ng)
    q = labels.size // 4
    tail = slice(labels.size - q, labels.size)
    return {
        "dataset": str(data.root),
        "seed": args.seed,
        "shots": args.shots,
        "label_every": args.label_every,
        "apply_every": args.apply_every,
        "window": args.window,
        "target_frr": enrolled.target_frr,
        "parts": int(labels.size),
        "threshold_enrolled": enrolled.threshold.value if enrolled.threshold else None,
        "windows": _windows(labels, learn_ng, args.window),
        "first_quarter": first,
        "last_quarter": last,
        "baseline": {
            "windows": _windows(labels, base_ng, args.window),
            "first_quarter": b_first,
            "last_quarter": b_last,
        },
        "oracle_last_quarter": {
            "false_reject_rate": ORACLE_FRR,
            "escape_rate": escape_at_frr(np.array(r.learn)[tail], labels[tail], ORACLE_FRR),
            "baseline_escape_rate": escape_at_frr(np.array(r.base)[tail], labels[tail], ORACLE_FRR),
        },
        "labels": int(sum(1 for _ in range(args.label_every - 1, labels.size, args.label_every)))
        if args.label_every
        else 0,
        "applies": r.applies,
        # The watch's first flag of any kind (score drift, reject rate, labelled false rejects), as the
        # control counts a false alarm; the score-drift statistic's own first flag beside it.
        "drift_first_flag_part": r.any_flag["part"] if r.any_flag else None,
        "drift_first_flag_good_parts": r.any_flag["good_parts"] if r.any_flag else None,
        "drift_first_flag": r.any_flag,
        "drift_score_flag_part": r.drift_part,
        "drift_score_flag_good_parts": r.drift_good,
        "drift_score_message": r.drift_message,
        "drift_watch": _drift_module() is not None,
        "control": control,
        "seconds": round(seconds, 1),
        "skipped": [{"path": p, "reason": why} for p, why in skips.items.items()],
    }


def _pct(v: Any) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{100 * v:.1f}%"


def table(docs: list[dict[str, Any]]) -> str:
    """One row per dataset: quarters before (baseline) and after (learning), oracle, drift, control."""
    head = (
        "set",
        "seed",
        "first q FRR/esc",
        "last q baseline FRR/esc",
        "last q learning FRR/esc",
        "oracle esc@5%",
        "drift at",
        "control alarm",
    )
    rows = [head]
    for d in docs:
        bl, ll = d["baseline"]["last_quarter"], d["last_quarter"]
        rows.append(
            (
                Path(d["dataset"]).name,
                str(d["seed"]),
                f"{_pct(d['first_quarter']['false_reject_rate'])} / {_pct(d['first_quarter']['escape_rate'])}",
                f"{_pct(bl['false_reject_rate'])} / {_pct(bl['escape_rate'])}",
                f"{_pct(ll['false_reject_rate'])} / {_pct(ll['escape_rate'])}",
                _pct(d["oracle_last_quarter"]["escape_rate"]),
                str(d["drift_first_flag_part"]),
                str(d["control"]["false_alarm_part"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def _panel(title: str, doc: dict[str, Any], key: str) -> np.ndarray:
    """Rate per window against part index (learning blue, baseline grey), applies green, drift flag orange."""
    img = np.full((PANEL_H, PANEL_W, 3), 255, np.uint8)
    x0, x1, y0, y1 = 50, PANEL_W - 20, PANEL_H - 35, 35
    n = max(1, doc["parts"])
    font = cv2.FONT_HERSHEY_SIMPLEX

    def x(part: float) -> int:
        return int(x0 + part / n * (x1 - x0))

    def y(v: float) -> int:
        return int(y0 + v * (y1 - y0))

    cv2.putText(img, title, (x0, 22), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.line(img, (x0, y0), (x1, y0), (0, 0, 0), 1)
    cv2.line(img, (x0, y0), (x0, y1), (0, 0, 0), 1)
    for v in (0.0, 0.05, 0.1, 0.5, 1.0):
        cv2.putText(img, f"{100 * v:g}%", (4, y(v) + 4), font, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.line(img, (x0, y(v)), (x1, y(v)), (225, 225, 225), 1)
    for a in doc["applies"]:
        cv2.line(img, (x(a["part"]), y0), (x(a["part"]), y1), (60, 170, 60), 1)
    if doc["drift_first_flag_part"] is not None:
        cv2.line(img, (x(doc["drift_first_flag_part"]), y0), (x(doc["drift_first_flag_part"]), y1), (0, 140, 255), 2)
    for _label, windows, colour in (
        ("before (baseline)", doc["baseline"]["windows"], (150, 150, 150)),
        ("after (learning)", doc["windows"], (200, 90, 30)),
    ):
        pts = [(x(w["first_part"] + w["parts"] / 2), y(w[key])) for w in windows if w[key] is not None]
        for a, b in zip(pts, pts[1:]):
            cv2.line(img, a, b, colour, 2, cv2.LINE_AA)
        for pt in pts:
            cv2.circle(img, pt, 3, colour, -1, cv2.LINE_AA)
    cv2.putText(
        img,
        "grey before, blue after, green apply, orange drift flag",
        (x0, PANEL_H - 10),
        font,
        0.38,
        (0, 0, 0),
        1,
        cv2.LINE_AA,
    )
    return img


def write_plot(doc: dict[str, Any], path: Path) -> Path:
    name = Path(doc["dataset"]).name
    grid = np.vstack(
        [
            _panel(f"{name} seed {doc['seed']}: false-reject rate per {doc['window']} parts", doc, "false_reject_rate"),
            _panel(f"{name} seed {doc['seed']}: escape rate per {doc['window']} parts", doc, "escape_rate"),
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), grid):
        raise OSError(f"{path}: could not write the plot")
    return path


def _mean(docs: list[dict[str, Any]]) -> dict[str, Any]:
    def avg(get: Any) -> float | None:
        v = [get(d) for d in docs if get(d) is not None]
        return float(np.mean(v)) if v else None

    return {
        q: {k: avg(lambda d, q=q, k=k: d[q][k]) for k in ("false_reject_rate", "escape_rate")}
        for q in ("first_quarter", "last_quarter")
    } | {
        "baseline_last_quarter": {
            k: avg(lambda d, k=k: d["baseline"]["last_quarter"][k]) for k in ("false_reject_rate", "escape_rate")
        }
    }


def _check(args: argparse.Namespace) -> None:
    for name, low in (("label_every", 1), ("apply_every", 1), ("window", 2), ("control_parts", 0)):
        if getattr(args, name) < low:
            raise DatasetError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")


def run(args: argparse.Namespace) -> int:
    """``bench learn``: replay each dataset, write JSON (and the report's PNGs + Markdown), print the table."""
    try:
        _check(args)
        datasets = [scan_dataset(r) for r in args.data]
        bundle = EngineBundle.open(args.bundle, backend=args.backend)
    except (DatasetError, ImageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pipeline = VisionPipeline(bundle)
    docs = []
    for data in datasets:
        try:
            docs.append(replay_dataset(bundle, pipeline, data, args))
        except (DatasetError, ImageError, RecipeError) as exc:
            print(f"error: {data.root}: {exc}", file=sys.stderr)
            return 2
        if args.report is not None:
            docs[-1]["plot"] = str(write_plot(docs[-1], args.report / f"learn-{data.root.name}-seed{args.seed}.png"))
        if docs[-1]["drift_watch"] is False:
            note("[bench learn] calibration.drift is not in this checkout: drift keys are null")
    result: dict[str, Any] = docs[0] if len(docs) == 1 else {"datasets": docs, "mean": _mean(docs)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    text = table(docs)
    if args.report is not None:
        (args.report / f"learn-seed{args.seed}.md").write_text(f"# bench learn, seed {args.seed}\n\n```\n{text}\n```\n")
    print(text)
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
