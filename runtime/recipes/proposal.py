"""Proposals from labelled parts: what the recipe would become if a person's labels were used.

A line drifts away from the golden parts it was enrolled with (goods start to fail), or lets a
kind of defect through. Operators label verdicts ("this NG was good", "this OK was a defect");
from those labels :func:`propose` computes what a careful engineer would do, on a **scratch copy**
of the recipe (nothing in the store changes), and :func:`apply` makes it live in one commit.

The rules, each with its reason:

* **Goldens to add**: every labelled-good part, passed through the same leave-one-out quality
  check as enrollment. A labelled good that the check flags among the others is refused, with the
  check's reason: a person's "good" may be a mislabel or a defect-like outlier, and one such part
  in the bank hides every defect that looks like it. Goods that support each other (a real drift:
  several new parts alike) are not outliers of the grown set, so they pass.
* **Labelled defects** train the recipe's defect head (retrained with the new goldens as well),
  image-level (multiple-instance: a verdict's label has no painted mask); only for the bank source.
* **The threshold** is the enrollment rule (:func:`calibration.threshold.fit_threshold` at the
  recipe's target false-reject rate) on the **held-out** scores of every golden part, the just
  added ones included: a part in the bank scores zero against itself, so in-sample scores would
  set the threshold far too low; leave-one-out (k-fold above 32) scores are what a new good part
  of the same population would score. Labelled defects never move it (threshold.py, rule 3).
* **Before / after** on the labelled parts: before, each part as the live recipe inspects it;
  after, the added goods' and defects' held-out (cross-fitted) scores against the new threshold,
  and the refused goods inspected by the new recipe (they are out of its sample). Each rate comes
  with its one-sided 95 % upper bound (exact binomial, as threshold.py's bounds).

Coreset budget: added goldens grow the bank only up to the recipe's patch budget (the greedy
coreset keeps matching time flat above it); the notes say when the bank is subsampled.
"""

from __future__ import annotations

import atexit
import hashlib
import inspect
import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from statistics import NormalDist
from typing import Any, Literal

import numpy as np

from anomalygpt_edge.atomic_files import atomic_write_bytes
from anomalygpt_edge.calibration.threshold import frr_upper_bound, rate_upper_bound, robust_sigma
from anomalygpt_edge.engines.preprocess import ImageError
from anomalygpt_edge.runtime.recipes.enrollment import Enroller, LabelledImage
from anomalygpt_edge.runtime.recipes.golden_check import quality_report
from anomalygpt_edge.runtime.recipes.inspector import Inspector
from anomalygpt_edge.runtime.recipes.store import Recipe, RecipeError, RecipeStore

#: At most this many labelled parts in one proposal (memory and time bound; the caller batches).
MAX_PARTS = 1000
#: Rounds of "remove the flagged new goldens, re-check": removing one changes the others' median.
REFUSE_ROUNDS = 3
#: Labelled goods needed before they are checked as a population of their own (the quality check's own minimum).
MIN_POPULATION = 4


@dataclass(frozen=True)
class LabelledPart:
    """One labelled verdict's image as the camera saw it: the full frame (the recipe's ROI is applied to
    it), or with ``roi_applied`` the ROI crop the line archived (enrolled and scored as it is)."""

    name: str
    image: np.ndarray
    label: Literal["good", "defect"]
    defect_type: str | None = None
    roi_applied: bool = False


@dataclass
class Proposal:
    """What :func:`propose` suggests for a recipe, with its figures on the labelled parts."""

    recipe: str
    base_bank_version: int
    add_goldens: list[str]
    refused_goldens: dict[str, str]
    add_defects: list[str]
    retrain_head: bool
    threshold_before: float
    threshold_after: float
    before: dict[str, Any]
    after: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Proposal:
        try:
            return cls(**data)
        except TypeError as exc:
            raise RecipeError(f"proposal: malformed ({exc})") from None


def figures(good: Sequence[float], defect: Sequence[float], threshold: float) -> dict[str, Any]:
    """False-reject and escape rates (with 95 % upper bounds) of labelled scores at ``threshold``."""
    g, d = np.asarray(good, float), np.asarray(defect, float)
    rejected, escaped = int((g > threshold).sum()), int((d <= threshold).sum())
    return {
        "n_good": int(g.size),
        "n_defect": int(d.size),
        "false_rejects": rejected,
        "escapes": escaped,
        "false_reject_rate": rejected / g.size if g.size else None,
        "false_reject_upper_95": rate_upper_bound(rejected, int(g.size)) if g.size else None,
        "escape_rate": escaped / d.size if d.size else None,
        "escape_upper_95": rate_upper_bound(escaped, int(d.size)) if d.size else None,
    }


def _check_parts(parts: Sequence[LabelledPart]) -> None:
    if not parts:
        raise RecipeError("proposal: no labelled parts")
    if len(parts) > MAX_PARTS:
        raise RecipeError(f"proposal: {len(parts)} labelled parts, at most {MAX_PARTS} at once")
    seen: set[str] = set()
    for p in parts:
        if p.label not in ("good", "defect"):
            raise RecipeError(f"{p.name}: label {p.label!r} is not 'good' or 'defect'")
        if not isinstance(p.image, np.ndarray) or p.image.size == 0:
            raise ImageError(f"{p.name}: empty image")
        if p.name in seen:
            raise RecipeError(f"{p.name}: labelled twice in one proposal")
        if p.roi_applied != parts[0].roi_applied:
            raise RecipeError(f"{p.name}: ROI crops and full frames mixed in one proposal")
        seen.add(p.name)


@dataclass
class _Build:
    """A scratch copy of a recipe with labelled parts enrolled into it."""

    store: RecipeStore
    enroller: Enroller
    recipe: Recipe
    added: dict[str, str]  # part name -> sha256 of the new golden
    refused: dict[str, str]
    defects: dict[str, str]  # part name -> sha256 of the new labelled defect
    base_version: int = 0


def _scratch(enroller: Enroller, live: Recipe, root: Path, roi_applied: bool) -> tuple[RecipeStore, Enroller]:
    src = enroller.store.folder(live.name)
    shutil.copytree(src, root / live.name, ignore=shutil.ignore_patterns(".lock", ".*.tmp"))
    store = RecipeStore(root)
    scratch = Enroller(store, enroller.bundle, enroller.pipeline)
    scratch.roi_applied = roi_applied  # archived crops: stored and encoded as they are, not cropped again
    return store, scratch


def _build(enroller: Enroller, live: Recipe, parts: Sequence[LabelledPart], root: Path, check: bool) -> _Build:
    """Enroll ``parts`` into a scratch copy; with ``check``, refuse the new goldens the quality check flags."""
    store, se = _scratch(enroller, live, root, bool(parts) and parts[0].roi_applied)
    name, refused = live.name, {}
    before = {s.sha256 for s in live.samples}
    goods = [p for p in parts if p.label == "good"]
    recipe = live
    if goods:
        result = se.add(name, [(p.name, p.image) for p in goods], accept_flagged=True)
        refused.update({s.split(": ", 1)[0]: "already a golden part of this recipe" for s in result.skipped})
        recipe = result.recipe
        for _ in range(REFUSE_ROUNDS if check else 0):
            flagged = _flagged_new(recipe, before)
            if not flagged:
                break
            for sample in [s for s in recipe.samples if s.sha256 in flagged]:
                refused[sample.name] = f"quality check: {flagged[sample.sha256]}"
                recipe = se.remove(name, sample.sha256, accept_flagged=True).recipe
    added = {s.name: s.sha256 for s in recipe.samples if s.sha256 not in before}
    defects = [p for p in parts if p.label == "defect"]
    new_defects: dict[str, str] = {}
    if defects and live.source == "bank":
        known = {d.sha256 for d in recipe.defects}
        items = [LabelledImage(p.name, p.image, None, p.defect_type) for p in defects]
        recipe = se.add_defects(name, items, accept_flagged=True).recipe
        new_defects = {d.name: d.sha256 for d in recipe.defects if d.sha256 not in known}
    return _Build(store, se, recipe, added, refused, new_defects, live.bank_version)


def _flagged_new(recipe: Recipe, before: set[str]) -> dict[str, str]:
    """sha256 -> reason for the new goldens the leave-one-out quality check flags.

    Each new golden's score is its leave-one-out score against every other golden (old and new).
    With at least :data:`MIN_POPULATION` labelled goods, the outlier rule is applied among the
    labelled goods themselves: they are the line's parts *now*; a drift moves them together (so
    against the old goldens every one of them is an "outlier"), a mislabelled defect stands apart
    from the others. With fewer there is no population to compare with, and the enrollment check
    over the whole golden set decides (the conservative side).
    """
    new = tuple(s for s in recipe.samples if s.sha256 not in before)
    scores = recipe.quality.get("scores", {})
    if len(new) >= MIN_POPULATION and all(s.name in scores for s in new):
        report = quality_report(replace(recipe, samples=new), {s.name: float(scores[s.name]) for s in new})
        med = float(np.median([scores[s.name] for s in new]))
        return {
            f["sha256"]: (
                f"leave-one-out score {f['score']:.4g}, far above the median {med:.4g} of the {len(new)} labelled "
                "goods of this proposal: possibly a defective or different part"
            )
            for f in report.flagged
        }
    return {f["sha256"]: f["reason"] for f in recipe.quality.get("flagged", []) if f["sha256"] not in before}


def _with_defect_threshold(recipe: Recipe) -> Recipe:
    """The recipe with the normal model's target-FRR point as threshold, when labelled defects show the cost of more.

    With fewer golden scores than a distribution-free bound needs, :func:`fit_threshold` takes the
    conservative ``max(highest score, mean + max(z, 2) SD)``: the floor is there for lack of
    evidence. Held-out labelled defects scoring between the normal model's point at the recipe's
    target false-reject rate (mean + z SD, as :func:`threshold.expectations` reports it) and that
    conservative value are evidence of what the floor costs: those defects would pass. Then the
    model's point is proposed instead (its estimated false-reject rate is the target, said so).
    Never when the distribution-free rule applies, never above the conservative value.
    """
    t = recipe.threshold
    g = np.array([s.score for s in recipe.samples if s.score is not None], float)
    d = np.array([x.score for x in recipe.defects if x.score is not None], float)
    if t is None or t.supported or g.size < 3 or not d.size:
        return recipe
    spread = robust_sigma(g, 1e-12)
    point = float(g.mean()) + NormalDist().inv_cdf(1 - t.target_frr) * spread
    caught = int(((d > point) & (d <= t.value)).sum())
    if point >= t.value or not caught:
        return recipe
    rank = int((g <= point).sum())
    words = (
        f"{caught} of {d.size} labelled defects score between the normal model's {100 * t.target_frr:g}% point "
        f"({point:.4g}) and the conservative threshold ({t.value:.4g}): the model's point is used "
        f"(estimated false rejects {100 * t.target_frr:g}%, a model estimate from {g.size} golden scores)"
    )
    threshold = replace(
        t,
        value=point,
        method="normal-model+labelled-defects",
        frr_upper_bound_95=frr_upper_bound(int(g.size), max(rank, 1)),
        warnings=[*t.warnings, words],
    )
    return replace(recipe, threshold=threshold)


#: The last proposal's scratch build (one, in a temporary folder), so that applying it right away
#: does not compute it again; the next proposal replaces it, an apply takes it, the process's exit drops it.
_LAST: dict[str, Any] = {}
_LOCK = threading.Lock()


def _fingerprint(parts: Sequence[LabelledPart]) -> list[tuple[str, str, str]]:
    return [(p.name, p.label, hashlib.sha256(np.ascontiguousarray(p.image).tobytes()).hexdigest()) for p in parts]


def _remember(build: _Build, tmp: str, parts: Sequence[LabelledPart]) -> None:
    with _LOCK:
        old = _LAST.get("tmp")
        _LAST.clear()
        _LAST.update(build=build, tmp=tmp, parts=_fingerprint(parts))
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _forget(only: str | None = None) -> None:
    """Drop the kept build (only the one in folder ``only`` when given) and its folder."""
    with _LOCK:
        tmp = _LAST.get("tmp")
        if only is not None and tmp != only:
            return
        _LAST.clear()
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


atexit.register(lambda: _forget())


def _take(proposal: Proposal, parts: Sequence[LabelledPart]) -> tuple[_Build, str] | None:
    """The kept scratch build of ``proposal`` (now the caller's), if it is the last one computed, from these parts."""
    with _LOCK:
        build = _LAST.get("build")
        if build is None or _LAST.get("parts") != _fingerprint(parts):
            return None
        if build.recipe.name != proposal.recipe or build.base_version != proposal.base_bank_version:
            return None
        if sorted(build.added) != sorted(proposal.add_goldens) or sorted(build.defects) != sorted(proposal.add_defects):
            return None
        if build.recipe.threshold is None or build.recipe.threshold.value != proposal.threshold_after:
            return None
        tmp = _LAST["tmp"]
        _LAST.clear()
        return build, tmp


def _live_scores(enroller: Enroller, recipe: Recipe, store: RecipeStore, parts: Sequence[LabelledPart]) -> list[float]:
    if parts and parts[0].roi_applied:  # archived ROI crops: inspected as they are
        recipe = replace(recipe, roi=None)
    inspector = Inspector(enroller.bundle, recipe, store, enroller.pipeline)
    scores: list[float] = []
    for i in range(0, len(parts), 8):
        chunk = parts[i : i + 8]
        scores += [v.score for v in inspector.inspect_batch([p.image for p in chunk], [p.name for p in chunk])]
    return scores


def propose(enroller: Enroller, recipe_name: str, parts: Sequence[LabelledPart]) -> Proposal:
    """The proposal for ``recipe_name`` from ``parts``, computed on a scratch copy; the store is unchanged."""
    _check_parts(parts)
    live = enroller.store.load(recipe_name)
    if not live.live or live.threshold is None:
        raise RecipeError(f"recipe {recipe_name} is not live: enroll golden parts before proposing from labels")
    goods = [p for p in parts if p.label == "good"]
    defects = [p for p in parts if p.label == "defect"]
    before_scores = dict(zip([p.name for p in parts], _live_scores(enroller, live, enroller.store, parts)))
    tmp = tempfile.mkdtemp(prefix="agpt-proposal-")
    try:
        build = _build(enroller, live, parts, Path(tmp), check=True)
        new = build.recipe
        if new.threshold is None:
            raise RecipeError(f"recipe {recipe_name}: with these labels no threshold could be set")
        new = _with_defect_threshold(new)
        build.recipe = new
        assert new.threshold is not None
        _remember(build, tmp, parts)
        held_out = {s.name: s.score for s in new.samples}
        refused_parts = [p for p in goods if p.name not in build.added]
        refused_scores = dict(
            zip([p.name for p in refused_parts], _live_scores(enroller, new, build.store, refused_parts))
        )
        defect_scores = {d.name: d.score for d in new.defects}
    except BaseException:
        _forget(only=tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    assert new.threshold is not None  # checked above
    after_t, before_t = new.threshold.value, live.threshold.value
    good_after = [held_out.get(p.name) if p.name in build.added else refused_scores[p.name] for p in goods]
    defect_after = [defect_scores.get(p.name) for p in defects]
    if any(v is None for v in good_after) or any(v is None for v in defect_after):  # no held-out score: inspect
        good_after = [v if v is not None else before_scores[p.name] for v, p in zip(good_after, goods)]
        defect_after = [v if v is not None else before_scores[p.name] for v, p in zip(defect_after, defects)]
    before = figures([before_scores[p.name] for p in goods], [before_scores[p.name] for p in defects], before_t)
    after = figures(
        [float(v) for v in good_after if v is not None], [float(v) for v in defect_after if v is not None], after_t
    )
    proposal = Proposal(
        recipe=recipe_name,
        base_bank_version=live.bank_version,
        add_goldens=list(build.added),
        refused_goldens=build.refused,
        add_defects=list(build.defects),
        retrain_head=bool(build.defects) or (bool(build.added) and bool(live.defects)),
        threshold_before=before_t,
        threshold_after=after_t,
        before=before,
        after=after,
    )
    proposal.notes = _notes(proposal, live, new, goods, good_after, before_scores)
    return proposal


def _notes(
    p: Proposal, live: Recipe, new: Recipe, goods: Sequence[LabelledPart], good_after: Sequence[Any], before: dict
) -> list[str]:
    """Plain words for the technician: what the labels show and what the proposal changes."""
    notes = []
    rejected = [g.name for g in goods if before[g.name] > p.threshold_before]
    if rejected:
        passing = sum(
            1 for g, v in zip(goods, good_after) if g.name in rejected and v is not None and v <= p.threshold_after
        )
        notes.append(f"{len(rejected)} labelled goods would be false rejects today; {passing} of them pass after.")
    if p.refused_goldens:
        notes.append(f"{len(p.refused_goldens)} labelled goods are not added as golden parts (reasons listed).")
    b, a = p.before, p.after
    if a["n_defect"]:
        notes.append(
            f"Of {a['n_defect']} labelled defects, {b['escapes']} pass today and {a['escapes']} would pass after"
            + (" (held-out scores of the retrained defect head)." if p.retrain_head else ".")
        )
    notes.append(
        f"Threshold {p.threshold_before:.4g} -> {p.threshold_after:.4g} from {len(new.samples)} golden parts' "
        f"held-out scores at the recipe's {100 * new.target_frr:g}% target false-reject rate."
    )
    if new.bank_record is not None and new.samples:
        kept = sum(shape[0] for shape in new.bank_record.shapes.values()) // max(1, len(new.bank_record.shapes))
        if kept >= new.bank_budget:
            notes.append(
                f"The bank is at its patch budget ({new.bank_budget}): the coreset keeps matching time flat; "
                "more golden parts refine it without growing it."
            )
    if not new.quality.get("ok", True) and new.quality.get("inconsistent"):
        notes.append(f"Quality check: {new.quality['inconsistent']}")
    return notes


def _commit_kwargs(store: RecipeStore, by: str, reason: str) -> dict[str, Any]:
    """``change=`` for a store whose commit records who changed the recipe and why (when it has one)."""
    params = inspect.signature(store.commit).parameters
    if "change" not in params:
        return {}
    return {"change": {"by": by, "reason": reason}}


def apply(enroller: Enroller, proposal: Proposal, parts: Sequence[LabelledPart], *, by: str, reason: str) -> Recipe:
    """Make ``proposal`` live in one crash-safe commit (a new bank version); refused when the base moved."""
    _check_parts(parts)
    by_name = {p.name: p for p in parts}
    missing = [n for n in (*proposal.add_goldens, *proposal.add_defects) if n not in by_name]
    if missing:
        raise RecipeError(f"proposal for {proposal.recipe}: labelled part {missing[0]!r} is not among the parts given")
    chosen = [replace(by_name[n], label="good") for n in proposal.add_goldens]
    chosen += [replace(by_name[n], label="defect") for n in proposal.add_defects]
    store = enroller.store
    with store.writer(proposal.recipe):
        live = store.load(proposal.recipe)
        if live.bank_version != proposal.base_bank_version:
            raise RecipeError(
                f"recipe {proposal.recipe}: the proposal was computed on bank version {proposal.base_bank_version}, "
                f"the live one is {live.bank_version}; compute a new proposal"
            )
        if not chosen:
            raise RecipeError(f"proposal for {proposal.recipe}: nothing to apply (no goldens or defects to add)")
        taken = _take(proposal, parts)
        try:
            return _commit_build(enroller, live, chosen, taken[0] if taken else None, by, reason)
        finally:
            if taken:
                shutil.rmtree(taken[1], ignore_errors=True)


def _commit_build(
    enroller: Enroller, live: Recipe, chosen: Sequence[LabelledPart], build: _Build | None, by: str, reason: str
) -> Recipe:
    """Commit ``build`` (computed again from ``chosen`` on ``live`` when None) into the live store."""
    store = enroller.store
    with tempfile.TemporaryDirectory(prefix="agpt-apply-") as tmp:
        if build is None:  # not the proposal just computed: compute it again, on the live base
            build = _build(enroller, live, chosen, Path(tmp), check=False)
            build.recipe = _with_defect_threshold(build.recipe)
        new = build.recipe
        if new.threshold is None:
            raise RecipeError(f"recipe {live.name}: with these parts no threshold could be set")
        _copy_files(build.store, store, live, new)
        bank = build.store.load_bank(new)
        head = build.store.load_head(new, enroller.pipeline.feature_dim)
        final = replace(
            new,
            bank_version=live.bank_version,
            bank_file=live.bank_file,
            bank_record=live.bank_record,
            created_at=live.created_at,
        )
        return store.commit(final, bank, head, **_commit_kwargs(store, by, reason))


def _copy_files(scratch: RecipeStore, store: RecipeStore, live: Recipe, new: Recipe) -> None:
    """The new goldens' and defects' files into the live store before its commit (unreferenced until then)."""
    old = {s.sha256 for s in live.samples} | {d.sha256 for d in live.defects}
    for sub, items in (("samples", new.samples), ("defects", new.defects)):
        for item in items:
            if item.sha256 in old:
                continue
            for f in sorted((scratch.folder(new.name) / sub).glob(f"{item.sha256}.*")):
                atomic_write_bytes(store.folder(new.name) / sub / f.name, f.read_bytes())
