"""Golden-sample enrollment, the quality check, automatic thresholds and verdicts, on real engines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import parts
import pytest

from anomalygpt_edge.cli import main
from anomalygpt_edge.engines import EngineBundle
from anomalygpt_edge.engines.preprocess import ImageError, read_image
from anomalygpt_edge.runtime.inspection.memory_bank import MemoryBank, build_bank, greedy_coreset
from anomalygpt_edge.runtime.recipes import store as recipes_module
from anomalygpt_edge.runtime.recipes.enrollment import Enroller
from anomalygpt_edge.runtime.recipes.inspector import Inspector
from anomalygpt_edge.runtime.recipes.store import RecipeError, RecipeStore


@pytest.fixture(scope="module")
def bundle(default_bundle_dir: Path) -> EngineBundle:
    return EngineBundle.open(default_bundle_dir)


def golden(n: int, start: int = 0) -> list[tuple[str, np.ndarray]]:
    return [(f"good_{i:03d}.png", parts.good_part(i)) for i in range(start, start + n)]


@pytest.fixture(scope="module")
def live_store(tmp_path_factory: pytest.TempPathFactory, bundle: EngineBundle) -> RecipeStore:
    store = RecipeStore(tmp_path_factory.mktemp("store"))
    enroller = Enroller(store, bundle)
    enroller.create("plate", target_frr=0.05)
    result = enroller.add("plate", golden(12))
    assert result.recipe.live, result.to_json()
    return store


def test_enrolled_recipe_passes_good_parts_and_rejects_defects_with_their_location(
    live_store: RecipeStore, bundle: EngineBundle
) -> None:
    inspector = Inspector(bundle, live_store.load("plate"), live_store)
    for seed in (100, 101, 102):
        v = inspector.inspect(parts.good_part(seed))
        assert v.verdict == "OK", (v.score, v.threshold)
        assert v.sentence == "No, there are no anomalies in the image." and v.regions == []
    scratched = inspector.inspect(parts.scratched_part(103, "top left"))
    assert scratched.verdict == "NG" and scratched.score > scratched.threshold
    assert scratched.regions[0].location == "top left"
    assert scratched.sentence == "Yes, there is an anomaly in the image, at the top left of the image."
    assert 0.5 < scratched.normalized_score <= 1.0
    missing = inspector.inspect(parts.missing_feature_part(104))
    assert missing.verdict == "NG" and missing.location == "center"
    assert set(scratched.latency_ms) >= {"preprocess", "encoder", "matcher", "decide"}


def test_verdict_json_carries_the_decision_and_no_map(live_store: RecipeStore, bundle: EngineBundle) -> None:
    v = Inspector(bundle, live_store.load("plate"), live_store).inspect(parts.scratched_part(7, "bottom right"))
    data = json.loads(json.dumps(v.to_json()))
    assert data["verdict"] == "NG" and data["location"] == "bottom right"
    assert data["bundle_sha256"] == bundle.sha256 and data["bank_version"] == 1
    assert data["regions"][0]["area_pct"] > 0 and "anomaly_map" not in data


def test_quality_check_flags_a_planted_bad_golden_sample_by_name(tmp_path: Path, bundle: EngineBundle) -> None:
    store = RecipeStore(tmp_path)
    enroller = Enroller(store, bundle)
    enroller.create("plate")
    images = golden(10) + [("bad_one.png", parts.missing_feature_part(50))]
    result = enroller.add("plate", images)
    flagged = [f["name"] for f in result.quality.flagged]
    assert flagged == ["bad_one.png"], result.quality.to_json()
    assert "possibly a defective or different part" in result.quality.flagged[0]["reason"]
    assert not result.recipe.live  # a flagged golden set does not go live by itself
    with pytest.raises(RecipeError, match="not live"):
        Inspector(bundle, store.load("plate"), store)
    # Removing the bad part makes it live; the bank version moves on.
    after = enroller.remove("plate", "bad_one.png")
    assert after.recipe.live and after.quality.ok
    assert after.recipe.bank_version == result.recipe.bank_version + 1
    assert len(after.recipe.samples) == 10


def test_accepting_flagged_samples_goes_live_and_is_recorded(tmp_path: Path, bundle: EngineBundle) -> None:
    store = RecipeStore(tmp_path)
    enroller = Enroller(store, bundle)
    enroller.create("plate")
    result = enroller.add("plate", golden(8) + [("bad.png", parts.missing_feature_part(60))], accept_flagged=True)
    assert not result.quality.ok
    assert result.recipe.live and result.recipe.quality["accepted_flagged"] is True
    assert next(s for s in result.recipe.samples if s.name == "bad.png").flagged


def test_too_few_golden_samples_warn_and_use_the_conservative_rule(tmp_path: Path, bundle: EngineBundle) -> None:
    store = RecipeStore(tmp_path)
    enroller = Enroller(store, bundle)
    enroller.create("plate", target_frr=0.01)
    t = enroller.add("plate", golden(5)).threshold
    assert t.method == "normal-extrapolation" and not t.supported
    assert t.required_n == 299 and t.n_scores == 5
    assert "only 5 golden-sample scores; 299 are needed" in t.warnings[0]
    assert t.value >= t.stats["max"]
    assert "Enroll more good parts" in t.explain()


def test_single_golden_sample_is_stored_but_not_live(tmp_path: Path, bundle: EngineBundle) -> None:
    store = RecipeStore(tmp_path)
    enroller = Enroller(store, bundle)
    enroller.create("plate")
    result = enroller.add("plate", golden(1))
    assert result.recipe.bank_file is not None and not result.recipe.live and result.threshold is None
    assert enroller.add("plate", golden(1, start=1)).recipe.live  # a second good part completes it


def test_enrollment_is_incremental_and_skips_duplicates(tmp_path: Path, bundle: EngineBundle) -> None:
    store = RecipeStore(tmp_path, keep_versions=0)  # no kept versions: the old bank is garbage
    enroller = Enroller(store, bundle)
    enroller.create("plate")
    first = enroller.add("plate", golden(4))
    second = enroller.add("plate", golden(2, start=3))  # good_003 again, good_004 new
    assert second.added == ["good_004.png"] and second.skipped == ["good_003.png: already enrolled"]
    assert len(second.recipe.samples) == 5 and second.recipe.bank_version == first.recipe.bank_version + 1
    bank = store.load_bank(second.recipe)
    assert bank.meta["k"] == 5 and bank.meta["bundle_sha256"] == bundle.sha256
    assert len(list((tmp_path / "plate").glob("bank-v*.npz"))) == 1  # old versions cleaned up
    with pytest.raises(RecipeError, match="no single golden sample 'nope.png'"):
        enroller.remove("plate", "nope.png")


def test_power_cut_before_the_recipe_commit_leaves_the_previous_bank_live(
    tmp_path: Path, bundle: EngineBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RecipeStore(tmp_path, keep_versions=0)  # no kept versions: only the orphan is left to clean
    enroller = Enroller(store, bundle)
    enroller.create("plate")
    before = enroller.add("plate", golden(6)).recipe
    real_write = recipes_module.atomic_write_bytes

    def cut_power(path: Path, data: bytes) -> None:
        if Path(path).name == "recipe.json":
            raise OSError("power cut")
        real_write(path, data)

    monkeypatch.setattr(recipes_module, "atomic_write_bytes", cut_power)
    with pytest.raises(OSError, match="power cut"):
        enroller.add("plate", golden(3, start=20))
    monkeypatch.undo()
    recipe = store.load("plate")
    assert recipe.bank_version == before.bank_version and len(recipe.samples) == 6
    assert (tmp_path / "plate" / f"bank-v{before.bank_version + 1}.npz").exists()  # the orphan
    assert Inspector(bundle, recipe, store).inspect(parts.good_part(200)).verdict == "OK"
    again = enroller.add("plate", golden(1, start=30))  # the next commit cleans the orphan up
    assert sorted(p.name for p in (tmp_path / "plate").glob("bank-v*.npz")) == [again.recipe.bank_file]


def test_sigkill_during_enrollment_never_leaves_an_unloadable_recipe(tmp_path: Path, default_bundle_dir: Path) -> None:
    store = RecipeStore(tmp_path)
    Enroller(store, EngineBundle.open(default_bundle_dir)).create("plate")
    code = f"""
import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
import parts
from anomalygpt_edge.engines import EngineBundle
from anomalygpt_edge.runtime.recipes.enrollment import Enroller
from anomalygpt_edge.runtime.recipes.store import RecipeStore
e = Enroller(RecipeStore({str(tmp_path)!r}), EngineBundle.open({str(default_bundle_dir)!r}))
i = 0
while True:
    e.add('plate', [(f'g{{i}}.png', parts.good_part(i)), (f'g{{i+1}}.png', parts.good_part(i + 1))])
    print(i, flush=True)
    i += 2
"""
    bundle = EngineBundle.open(default_bundle_dir)
    for delay in (1.5, 2.3, 3.1):
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            child.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            child.kill()  # SIGKILL: no cleanup runs, like a power cut
        child.wait()
        recipe = store.load("plate")
        if recipe.samples:
            store.load_bank(recipe)  # the bank the recipe names is complete and loadable
        if recipe.live:
            assert Inspector(bundle, recipe, store).inspect(parts.good_part(999)).verdict in ("OK", "NG")


def test_bank_is_bounded_by_greedy_coreset_that_keeps_rare_patches() -> None:
    rng = np.random.default_rng(0)
    common = rng.normal(0, 0.1, (2000, 16)).astype(np.float32)
    rare = np.full((1, 16), 5.0, np.float32)
    feats = np.concatenate([common, rare])
    idx = greedy_coreset(feats, 50)
    assert len(idx) == 50 and 2000 in idx  # the outlier patch survives subsampling
    per_sample = [{"patches_0": feats[i * 401 : (i + 1) * 401][None]} for i in range(4)]
    layers, info = build_bank(per_sample, budget=300)
    assert layers["patches_0"].shape == (300, 16) and info["subsampled"] and info["total_patches"] == 1604


def test_bank_round_trips_without_pickle(tmp_path: Path) -> None:
    bank = MemoryBank({"patches_0": np.ones((5, 3), np.float32)}, {"bundle_sha256": "x", "k": 1})
    bank.save(tmp_path / "b.npz")
    again = MemoryBank.load(tmp_path / "b.npz")
    assert again.meta["k"] == 1 and again.layers["patches_0"].shape == (5, 3)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="unreadable memory bank"):
        MemoryBank.load(tmp_path / "bad.npz")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "file is empty"),
        (b"\x89PNG\r\n\x1a\nthis is not really a png", "not a decodable image"),
        (bytes(range(256)) * 4, "not a decodable image"),
    ],
)
def test_bad_image_files_give_a_clear_error_naming_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "part.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=f"part.png: {message}"):
        read_image(path)


def test_enroll_with_a_corrupt_image_changes_nothing_already_stored(
    tmp_path: Path, default_bundle_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    images = tmp_path / "golden"
    for name, image in golden(4):
        parts.write(images / name, image)
    store = tmp_path / "store"
    args = [
        "enroll",
        "--recipe",
        "plate",
        "--images",
        str(images),
        "--store",
        str(store),
        "--bundle",
        str(default_bundle_dir),
    ]
    assert main(args) == 0
    before = (store / "plate" / "recipe.json").read_bytes()
    more = tmp_path / "more"
    parts.write(more / "ok.png", parts.good_part(40))
    (more / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    assert main([*args[:3], "--images", str(more), *args[5:]]) == 2
    assert "broken.jpg: not a decodable image" in capsys.readouterr().err
    assert (store / "plate" / "recipe.json").read_bytes() == before


def test_roi_outside_the_image_is_refused_clearly(tmp_path: Path, bundle: EngineBundle) -> None:
    store = RecipeStore(tmp_path)
    enroller = Enroller(store, bundle)
    enroller.create("plate", roi=(300, 0, 100, 100))
    with pytest.raises(ImageError, match=r"ROI \(x=300, y=0, w=100, h=100\) does not fit inside the 320x240 image"):
        enroller.add("plate", golden(2))


def test_malformed_recipe_file_is_reported_with_its_path(tmp_path: Path) -> None:
    (tmp_path / "plate").mkdir()
    (tmp_path / "plate" / "recipe.json").write_text('{"format": 1, "name": 5}')
    with pytest.raises(RecipeError, match="recipe.json"):
        RecipeStore(tmp_path).load("plate")
    with pytest.raises(RecipeError, match="no recipe 'other'.*known: plate"):
        RecipeStore(tmp_path).load("other")
    with pytest.raises(RecipeError, match="invalid"):
        RecipeStore(tmp_path).load("../etc")


def test_inspect_cli_writes_json_verdicts_and_heatmaps(
    tmp_path: Path, live_store: RecipeStore, capsys: pytest.CaptureFixture
) -> None:
    parts.write(tmp_path / "bad.png", parts.scratched_part(9, "top right"))
    parts.write(tmp_path / "good.png", parts.good_part(300))
    code = main(
        [
            "inspect",
            "--recipe",
            "plate",
            "--store",
            str(live_store.root),
            "--json",
            "--heatmap",
            str(tmp_path / "hm"),
            str(tmp_path / "bad.png"),
            str(tmp_path / "good.png"),
        ]
    )
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["verdict"] for d in lines] == ["NG", "OK"]
    assert lines[0]["location"] == "top right"
    heatmap = cv2.imread(lines[0]["heatmap"])
    assert heatmap is not None and heatmap.shape == (240, 320, 3)


@pytest.fixture(scope="module")
def tiny_anomalygpt_bundle(tmp_path_factory: pytest.TempPathFactory) -> EngineBundle:
    """AnomalyGPT's architecture, tiny and random: 4 tapped layers and a text decoder."""
    out = tmp_path_factory.mktemp("agpt") / "bundle"
    args = ["export", "vision", "--source", "anomalygpt", "--random-weights", "--anomalygpt-size", "tiny"]
    assert main([*args, "--out", str(out), "--no-fp16"]) == 0
    return EngineBundle.open(out)


@pytest.mark.parametrize("source", ["bank", "text", "text+bank"])
def test_anomalygpt_bundles_enroll_and_inspect_with_every_anomaly_source(
    tmp_path: Path, tiny_anomalygpt_bundle: EngineBundle, source: str
) -> None:
    store = RecipeStore(tmp_path)
    enroller = Enroller(store, tiny_anomalygpt_bundle)
    enroller.create("plate", source=source, class_name="object" if source != "bank" else None)
    result = enroller.add("plate", golden(6), accept_flagged=True)
    assert result.recipe.live and len(result.quality.scores) == 6
    assert result.quality.method == ("zero-shot text decoder" if source == "text" else "leave-one-out")
    verdict = Inspector(tiny_anomalygpt_bundle, result.recipe, store).inspect(parts.scratched_part(5))
    assert verdict.verdict in ("OK", "NG") and verdict.anomaly_map.shape == (240, 320)
    if source == "text":  # AnomalyGPT's text map is a softmax probability
        assert 0.0 <= verdict.score <= 1.0


def test_text_plus_bank_source_averages_the_text_and_bank_maps(
    tmp_path: Path, tiny_anomalygpt_bundle: EngineBundle
) -> None:
    from anomalygpt_edge.runtime.inspection.pipeline import VisionPipeline

    store = RecipeStore(tmp_path)
    enroller = Enroller(store, tiny_anomalygpt_bundle)
    enroller.create("plate", source="text+bank", class_name="object")
    recipe = enroller.add("plate", golden(4), accept_flagged=True).recipe
    pipeline = VisionPipeline(tiny_anomalygpt_bundle)
    feats = pipeline.encode([pipeline.prepare(parts.scratched_part(9))])
    bank = store.load_bank(recipe).layers
    text = tiny_anomalygpt_bundle.text_features()["object"]
    both = pipeline.combined_maps(feats, bank, text)
    expected = 0.5 * (pipeline.bank_maps(feats, bank) + pipeline.text_maps(feats, text))
    assert np.allclose(both, expected, atol=1e-6)  # the AnomalyGPT bundle does not smooth (sigma 0)


def test_text_source_needs_a_bundle_with_the_decoder(tmp_path: Path, bundle: EngineBundle) -> None:
    with pytest.raises(RecipeError, match="source 'text' needs a bundle with AnomalyGPT's decoder"):
        Enroller(RecipeStore(tmp_path), bundle).create("plate", source="text")
