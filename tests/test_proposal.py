"""Proposals from labelled parts (runtime/recipes/proposal.py), on real engines and synthetic parts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import parts
import pytest

from anomalygpt_edge.engines import EngineBundle
from anomalygpt_edge.runtime.recipes.enrollment import Enroller
from anomalygpt_edge.runtime.recipes.inspector import Inspector
from anomalygpt_edge.runtime.recipes.proposal import LabelledPart, Proposal, apply, propose, rate_upper_bound
from anomalygpt_edge.runtime.recipes.store import RecipeError, RecipeStore


@pytest.fixture(scope="module")
def bundle(default_bundle_dir: Path) -> EngineBundle:
    return EngineBundle.open(default_bundle_dir)


def drifted_part(seed: int) -> np.ndarray:
    """A good part after the line changed: the disc moved and the light got brighter and warmer."""
    image = parts.good_part(seed).astype(np.float32)
    h, w = image.shape[:2]
    cv2.circle(image, (w // 2, h // 2), min(h, w) // 6 + 6, (110, 110, 110), -1)  # the disc moved ...
    cv2.circle(image, (w // 2 + 70, h // 2 - 40), min(h, w) // 8, (200, 200, 200), -1, cv2.LINE_AA)
    return np.clip(image * np.array([1.0, 1.08, 1.18], np.float32), 0, 255).astype(np.uint8)  # ... light warmer


def enrolled(tmp_path: Path, bundle: EngineBundle) -> Enroller:
    enroller = Enroller(RecipeStore(tmp_path / "store"), bundle)
    enroller.create("plate", target_frr=0.05)
    result = enroller.add("plate", [(f"good_{i:03d}.png", parts.good_part(i)) for i in range(10)])
    assert result.recipe.live, result.to_json()
    return enroller


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def test_drifted_goods_labelled_good_are_proposed_as_goldens_and_pass_after_apply(
    tmp_path: Path, bundle: EngineBundle
) -> None:
    enroller = enrolled(tmp_path, bundle)
    labelled = [LabelledPart(f"drift_{i}.png", drifted_part(100 + i), "good") for i in range(8)]
    proposal = propose(enroller, "plate", labelled)
    assert proposal.before["false_rejects"] >= 6, proposal.to_json()  # the drift: today they are rejected
    assert sorted(proposal.add_goldens) == sorted(p.name for p in labelled), proposal.refused_goldens
    assert proposal.after["false_rejects"] < proposal.before["false_rejects"], proposal.to_json()
    assert any("would be false rejects today" in n for n in proposal.notes), proposal.notes
    recipe = apply(enroller, proposal, labelled, by="tech", reason="line changed")
    assert recipe.bank_version > proposal.base_bank_version
    assert {s.name for s in recipe.samples} >= set(proposal.add_goldens)
    inspector = Inspector(bundle, recipe, enroller.store)
    fresh = [inspector.inspect(drifted_part(300 + i)).verdict for i in range(4)]
    assert fresh.count("OK") >= 3, fresh  # drifted goods never labelled now pass
    assert inspector.inspect(parts.scratched_part(400, "top left")).verdict == "NG"
    assert recipe.change is not None and recipe.change.by == "tech"
    back = enroller.store.rollback("plate")  # the old version is kept: one click back
    assert back.bank_version == proposal.base_bank_version


def test_labelled_good_that_looks_defective_is_refused_by_the_quality_check(
    tmp_path: Path, bundle: EngineBundle
) -> None:
    enroller = enrolled(tmp_path, bundle)
    labelled = [LabelledPart(f"new_{i}.png", parts.good_part(200 + i), "good") for i in range(6)]
    labelled.append(LabelledPart("mislabel.png", parts.missing_feature_part(250), "good"))
    proposal = propose(enroller, "plate", labelled)
    assert "mislabel.png" in proposal.refused_goldens, proposal.to_json()
    assert "quality check" in proposal.refused_goldens["mislabel.png"]
    assert "mislabel.png" not in proposal.add_goldens
    assert len(proposal.add_goldens) >= 5, proposal.refused_goldens


def test_apply_is_refused_when_the_recipe_moved_since_the_proposal(tmp_path: Path, bundle: EngineBundle) -> None:
    enroller = enrolled(tmp_path, bundle)
    labelled = [LabelledPart(f"new_{i}.png", parts.good_part(200 + i), "good") for i in range(4)]
    labelled.append(LabelledPart("bad.png", parts.scratched_part(260, "center"), "defect", "scratch"))
    proposal = propose(enroller, "plate", labelled)
    assert proposal.add_defects == ["bad.png"] and proposal.retrain_head
    enroller.add("plate", [("late.png", parts.good_part(270))])  # someone enrolled a part meanwhile
    before = snapshot(enroller.store.folder("plate"))
    with pytest.raises(RecipeError, match="bank version"):
        apply(enroller, proposal, labelled, by="tech", reason="labels")
    assert snapshot(enroller.store.folder("plate")) == before


def test_propose_changes_nothing_in_the_store_and_round_trips_as_json(tmp_path: Path, bundle: EngineBundle) -> None:
    enroller = enrolled(tmp_path, bundle)
    folder = enroller.store.folder("plate")
    before = snapshot(folder)
    labelled = [LabelledPart(f"new_{i}.png", parts.good_part(200 + i), "good") for i in range(4)]
    labelled.append(LabelledPart("bad.png", parts.scratched_part(261, "top right"), "defect"))
    proposal = propose(enroller, "plate", labelled)
    assert snapshot(folder) == before
    assert enroller.store.load("plate").bank_version == proposal.base_bank_version
    again = Proposal.from_json(json.loads(json.dumps(proposal.to_json())))
    assert again == proposal
    for side in (proposal.before, proposal.after):
        assert side["n_good"] == 4 and side["n_defect"] == 1
        assert side["false_reject_rate"] <= side["false_reject_upper_95"] <= 1


def test_rate_upper_bound_is_the_exact_one_sided_binomial_bound() -> None:
    assert rate_upper_bound(0, 59) == pytest.approx(0.0495, abs=5e-4)  # the rule of three's exact form
    assert rate_upper_bound(0, 0) == 1.0
    assert 0.1 < rate_upper_bound(1, 10) < 0.4


def test_a_recipe_after_an_apply_gets_no_drift_flag_on_parts_from_its_own_population(
    tmp_path: Path, bundle: EngineBundle
) -> None:
    """The drift watch is rebuilt on the applied version's held-out golden scores (the retrained head's
    cross-fitted ones): fresh good parts of the same population must not read as a drift against them."""
    from anomalygpt_edge.calibration.drift import DriftSettings
    from anomalygpt_edge.runtime.line.drift_watch import watch_for

    enroller = enrolled(tmp_path, bundle)
    labelled = [LabelledPart(f"new_{i}.png", parts.good_part(200 + i), "good") for i in range(8)]
    spots = ["top left", "bottom right", "center"]
    labelled += [LabelledPart(f"bad_{i}.png", parts.scratched_part(260 + i, s), "defect") for i, s in enumerate(spots)]
    proposal = propose(enroller, "plate", labelled)
    assert proposal.retrain_head and len(proposal.add_goldens) == 8, proposal.to_json()
    recipe = apply(enroller, proposal, labelled, by="tech", reason="labels")
    inspector = Inspector(bundle, recipe, enroller.store)
    watch = watch_for(inspector, DriftSettings(min_parts=30))
    fresh = inspector.inspect_batch([parts.good_part(700 + i) for i in range(40)])
    for i, v in enumerate(fresh):
        watch.observe(v.score, v.verdict, at=float(i))
    state = watch.state(now=40.0)
    assert state.passed_parts >= 30, [v.verdict for v in fresh]
    assert not state.flagged, state.message
