"""``recipe propose`` / ``recipe apply`` offline, on a store and an archive written here (real engines,
real archive): the before/after table, the pending proposal a second command applies, one-line
errors; and a SIGKILL at random points of the proposal's multi-file apply (new golden files, then
one commit) leaves the old or the new version live, whole, never a mix."""

from __future__ import annotations

import json
import random
import shutil
import time
import uuid
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import faults  # tests/faults.py: the SIGKILL helper
import pytest
from daemon_fixtures import line_fixture  # noqa: F401 - fixtures are used by name
from test_recipe_versions import assert_consistent

from anomalygpt_edge.cli import main
from anomalygpt_edge.engines import EngineBundle
from anomalygpt_edge.engines.preprocess import crop_roi
from anomalygpt_edge.runtime.delivery.archive import Archive
from anomalygpt_edge.runtime.line.proposals import ProposalDesk
from anomalygpt_edge.runtime.recipes.inspector import Inspector
from anomalygpt_edge.runtime.recipes.store import Recipe, RecipeStore
from anomalygpt_edge.runtime.tools import synthetic


def _strict(line: dict, root: Path) -> tuple[RecipeStore, Recipe]:
    """A copy of the line's store whose ``bracket`` rejects every part (the false rejects to correct)."""
    shutil.copytree(line["store"], root / "store")
    store = RecipeStore(root / "store")
    old = store.load("bracket")
    assert old.threshold is not None
    return store, store.commit(replace(old, threshold=replace(old.threshold, value=1e-6)), change={"by": "test"})


def _archive(root: Path, recipe: Recipe, n: int = 5) -> list[str]:
    """``n`` NG verdicts of new good parts, archived as the line does (the ROI crop), labelled good."""
    video = root / "goods.avi"
    synthetic.write_golden_video(video, n, seed=9)
    archive = Archive(root / "archive")
    ids = []
    try:
        for i, frame in enumerate(synthetic.read_video_frames(video)[:n]):
            vid = str(uuid.uuid4())
            verdict = {"id": vid, "camera": "cam1", "recipe": recipe.name, "verdict": "NG", "score": 0.5}
            verdict |= {"threshold": 1e-6, "captured_at": time.time() - 60 + i}
            assert archive.record(verdict, crop_roi(frame, recipe.roi), keep_image=True)
            ids.append(vid)
        archive.add_labels([(v, "good", None, None) for v in ids], author="anna", source="cli")
        # A label whose image was never kept: counted in the notes, not guessed.
        blind = str(uuid.uuid4())
        assert archive.record({"id": blind, "camera": "cam1", "recipe": recipe.name, "verdict": "OK", "score": 0.0})
        archive.add_label(blind, "good", author="anna", source="cli")
    finally:
        archive.close()
    return ids


def test_cli_propose_prints_before_after_and_apply_makes_the_pending_proposal_live(
    tmp_path: Path, line: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    store, strict = _strict(line, tmp_path)
    ids = _archive(tmp_path, strict)
    base = ["--store", str(tmp_path / "store"), "--archive", str(tmp_path / "archive"), "--recipe", "bracket"]
    assert main(["recipe", "apply", *base, "--by", "anna"]) == 2
    assert "no pending proposal; run 'recipe propose' first" in capsys.readouterr().err
    out_json = tmp_path / "proposal.json"
    assert main(["recipe", "propose", *base, "--json", str(out_json)]) == 0
    table = capsys.readouterr().out
    proposal = json.loads(out_json.read_text())
    assert proposal["base_bank_version"] == strict.bank_version and set(proposal["add_goldens"]) <= set(ids)
    assert f"recipe bracket: proposal on bank version {strict.bank_version}" in table
    assert "false rejects  5/5" in table, table
    assert "1 labelled verdicts have no kept image" in table, table
    assert (store.folder("bracket") / "proposal.json").is_file(), "pending for the daemon and for apply"
    # A daemon started later (its proposal desk reads the store) shows the same pending proposal.
    desk = ProposalDesk(SimpleNamespace(store=store), lambda: None)
    shown = desk.pending("bracket")
    assert shown is not None and shown.to_json() == proposal
    assert desk.status()["pending"]["bracket"]["add_goldens"] == len(proposal["add_goldens"])
    assert store.load("bracket").bank_version == strict.bank_version, "proposing changes nothing"

    assert main(["recipe", "apply", *base, "--by", "anna", "--reason", "new supplier"]) == 0
    said = capsys.readouterr().out
    live = store.load("bracket")
    assert live.bank_version > strict.bank_version and f"v{live.bank_version} live (was v{strict.bank_version}" in said
    assert live.change is not None and (live.change.by, live.change.reason) == ("anna", "new supplier")
    assert live.threshold is not None and live.threshold.value == pytest.approx(proposal["threshold_after"])
    assert {s.name for s in live.samples} >= set(proposal["add_goldens"])
    assert not (store.folder("bracket") / "proposal.json").exists()
    assert_consistent(store, live)
    # The new goldens are the archived crops as they are (not cropped again): the recipe's ROI size.
    x, y, w, h = strict.roi or (0, 0, 0, 0)
    new = [s for s in live.samples if s.name in proposal["add_goldens"]]
    import cv2

    png = cv2.imread(str(store.sample_path("bracket", new[0].sha256, "png")))
    assert png.shape[:2] == (h, w), png.shape

    assert main(["recipe", "propose", *base[:4], "--recipe", "nope"]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err


_APPLIER = """
import time
from anomalygpt_edge.engines import EngineBundle
from anomalygpt_edge.runtime.delivery.archive import Archive
from anomalygpt_edge.runtime.line.proposals import ProposalDesk
from anomalygpt_edge.runtime.line import proposals as desk
from anomalygpt_edge.runtime.recipes.enrollment import Enroller
from anomalygpt_edge.runtime.recipes.proposal import propose
from anomalygpt_edge.runtime.recipes.store import RecipeStore
e = Enroller(RecipeStore({store!r}), EngineBundle.open({bundle!r}))
archive = Archive({archive!r})
print('ready', flush=True)
while True:
    if e.store.load('bracket').bank_version != {strict}:  # a kill after an apply: start from the old version
        e.store.rollback('bracket', {strict})
    g = desk.gather(archive, 'bracket')
    pending = desk.Pending(propose(e, 'bracket', g.parts), g.labels, 'kill-test', 'now')
    desk.save_pending(e.store, pending)
    desk.apply_pending(e, pending, g, 'kill-test', 'loop')
    print('applied', flush=True)
    # The kill points are random by design (the parent waits a random delay, not for a state):
    # this pause only widens the stretch where the new version is live, so some kills find it.
    time.sleep(0.5)
"""


def _run_and_kill(code: str, delay: float, log: Path) -> None:
    """Run ``code`` in a child, SIGKILL it ``delay`` s after it is ready; it must not have died by itself."""
    with log.open("w") as err:
        code_ = faults.kill_when_ready(code, delay, stderr=err)
    assert code_ == -9, f"the child stopped by itself: {log.read_text()[-2000:]}"


def test_sigkill_during_proposal_applies_leaves_the_old_or_the_new_version_whole(
    tmp_path: Path, line: dict, default_bundle_dir: Path
) -> None:
    store, strict = _strict(line, tmp_path)
    _archive(tmp_path, strict)
    code = _APPLIER.format(
        store=str(tmp_path / "store"),
        bundle=str(default_bundle_dir),
        archive=str(tmp_path / "archive"),
        strict=strict.bank_version,
    )
    rng = random.Random(314)
    seen: set[int] = set()
    bundle = EngineBundle.open(default_bundle_dir)
    for _ in range(5):  # bounded: five kills at random points of the propose / apply / rollback loop
        _run_and_kill(code, rng.uniform(0.5, 12.0), tmp_path / "child.log")
        live = store.load("bracket")
        seen.add(live.bank_version)
        assert_consistent(store, live)
        for sample in live.samples:  # every golden the live version names has its image and features
            assert len(list((store.folder("bracket") / "samples").glob(f"{sample.sha256}.*"))) >= 2, sample
        if live.bank_version == strict.bank_version:
            assert live.to_json() == strict.to_json(), "the old version, byte for byte"
        else:  # a version the proposal made: the old goldens and the new ones, with its own threshold
            assert {s.sha256 for s in live.samples} > {s.sha256 for s in strict.samples}
            assert live.change is not None and live.change.by == "kill-test"
        assert Inspector(bundle, live, store).inspect(synthetic.golden_images(1, seed=77)[0][1]).verdict in ("OK", "NG")
        pending: Any = store.folder("bracket") / "proposal.json"
        if pending.exists():  # killed mid-write or not, the pending file is whole JSON
            json.loads(pending.read_text())
    assert max(seen) > strict.bank_version, f"the children applied something between the kills: {seen}"
    print("live versions seen after the kills:", sorted(seen))
