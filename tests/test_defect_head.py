"""Labelled defects: the trained head, its fusion with the bank, its place in the recipe, the threshold it informs."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import parts
import pytest

from anomalygpt_edge.cli import main
from anomalygpt_edge.engines import EngineBundle
from anomalygpt_edge.runtime.inspection.defect_head import DefectHead, HeadError, fit_logistic
from anomalygpt_edge.runtime.inspection.pipeline import VisionPipeline, upsample_aligned
from anomalygpt_edge.runtime.recipes.enrollment import Enroller, LabelledImage, patch_coverage
from anomalygpt_edge.runtime.recipes.inspector import Inspector
from anomalygpt_edge.runtime.recipes.store import RecipeError, RecipeStore


@pytest.fixture(scope="module")
def bundle(default_bundle_dir: Path) -> EngineBundle:
    return EngineBundle.open(default_bundle_dir)


def _defects(seeds: range, where: str = "top left", masks: bool = True) -> list[LabelledImage]:
    out = []
    for s in seeds:
        image = parts.scratched_part(s, where)
        out.append(LabelledImage(f"scratch_{s}.png", image, parts.defect_mask(image, s) if masks else None, "scratch"))
    return out


@pytest.fixture(scope="module")
def headed(tmp_path_factory: pytest.TempPathFactory, bundle: EngineBundle) -> RecipeStore:
    store = RecipeStore(tmp_path_factory.mktemp("store"))
    enroller = Enroller(store, bundle)
    enroller.create("plate", target_frr=0.05)
    enroller.add("plate", [(f"good_{i}.png", parts.good_part(i)) for i in range(10)])
    result = enroller.add_defects("plate", _defects(range(300, 306)))
    assert result.recipe.live and result.head is not None, result.to_json()
    return store


def test_logistic_head_separates_two_gaussian_classes_and_stays_linear_above_the_pca_width() -> None:
    rng = np.random.default_rng(0)
    for dim in (8, 300):  # 300 > MAX_DIM: trained in a projection, folded back into one weight vector
        neg = rng.standard_normal((2000, dim)).astype(np.float32)
        pos = rng.standard_normal((40, dim)).astype(np.float32) + 1.5
        x, y = np.concatenate([neg, pos]), np.concatenate([np.zeros(2000), np.ones(40)])
        mean, scale, weight, bias = fit_logistic(x, y)
        assert weight.shape == (dim,)
        logits = ((x - mean) / scale) @ weight + bias
        assert logits[y == 1].mean() > logits[y == 0].mean() + 2
        assert ((logits > 0) == (y == 1)).mean() > 0.95


def test_logistic_head_refuses_training_without_positives() -> None:
    with pytest.raises(HeadError, match="both defect and good patches"):
        fit_logistic(np.ones((10, 3), np.float32), np.zeros(10))


def test_upsampling_matches_the_bank_matchers_align_corners_bilinear() -> None:
    torch = pytest.importorskip("torch")
    grid = np.random.default_rng(1).random((2, 4, 5)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(grid)[:, None], size=(17, 23), mode="bilinear",
                                          align_corners=True)[:, 0].numpy()  # fmt: skip
    assert np.abs(upsample_aligned(grid, (17, 23)) - ref).max() < 1e-5


def test_mask_coverage_keeps_a_defect_of_a_few_pixels_on_its_patch(bundle: EngineBundle) -> None:
    pipeline = VisionPipeline(bundle)
    image = np.zeros((460, 1130, 3), np.uint8)  # bsdata's aspect: squashed 4.4x horizontally
    mask = np.zeros(image.shape[:2], bool)
    mask[100:104, 500:508] = True  # 32 px, the dataset's smallest pitting
    cov = patch_coverage(mask, pipeline.prepare(image), pipeline.grid).reshape(pipeline.grid)
    r, c = np.unravel_index(int(np.argmax(cov)), cov.shape)
    assert cov.max() > 0 and (cov > 0).sum() <= 2
    assert r == int(102 / 460 * pipeline.grid[0]) and c == int(504 / 1130 * pipeline.grid[1])
    assert cov.sum() * (460 * 1130) / cov.size == pytest.approx(32, rel=0.01)  # areas are exact


def test_labelled_defects_train_a_head_that_goes_live_with_the_recipe_and_is_hash_checked(
    headed: RecipeStore, bundle: EngineBundle
) -> None:
    recipe = headed.load("plate")
    assert len(recipe.defects) == 6 and all(d.has_mask and d.defect_type == "scratch" for d in recipe.defects)
    assert recipe.head_file == f"head-v{recipe.bank_version}.npz" and recipe.head_record is not None
    assert recipe.bank_record is not None and recipe.bank_record.sha256
    inspector = Inspector(bundle, recipe, headed)
    assert inspector.head is not None and inspector.head.mode == "mask"
    # The head reads the bank's patches and the head-only stride-32 features; the bank only its own layer.
    assert [h.name for h in bundle.manifest.head_layers] == ["head_0"]
    assert inspector.head.dim == 112 + 192 and list(inspector.bank) == ["patches_0"]
    ok = [inspector.inspect(parts.good_part(s)) for s in (900, 901, 902)]
    ng = [inspector.inspect(parts.scratched_part(s, "bottom right")) for s in (910, 911)]
    assert all(v.verdict == "OK" for v in ok), [(v.score, v.threshold) for v in ok]
    assert all(v.verdict == "NG" for v in ng) and ng[0].location == "bottom right"
    assert recipe.quality["expectation"]["labelled_defects"] == 6
    head_path = headed.folder("plate") / recipe.head_file
    saved = head_path.read_bytes()
    try:
        head_path.write_bytes(saved[:-10] + b"0123456789")
        with pytest.raises(RecipeError, match="defect head does not match recipe.json"):
            Inspector(bundle, recipe, headed)
    finally:
        head_path.write_bytes(saved)


def test_fused_map_is_the_sum_of_the_bank_and_head_z_scores() -> None:
    head = DefectHead(np.zeros(2, np.float32), np.ones(2, np.float32), np.array([1.0, 0.0], np.float32), 0.0,
                      bank_mu=0.2, bank_sd=0.1, head_mu=-3.0, head_sd=2.0, mode="mask")  # fmt: skip
    fused = head.fuse(np.array([[0.4]]), np.array([[1.0]]))
    assert fused[0, 0] == pytest.approx((0.4 - 0.2) / 0.1 + (1.0 + 3.0) / 2.0)


def test_defects_without_masks_train_a_multiple_instance_head(tmp_path: Path, bundle: EngineBundle) -> None:
    store = RecipeStore(tmp_path)
    enroller = Enroller(store, bundle)
    enroller.create("plate", target_frr=0.05)
    enroller.add("plate", [(f"good_{i}.png", parts.good_part(i)) for i in range(8)])
    result = enroller.add_defects("plate", _defects(range(400, 404), masks=False))
    assert result.head["mode"] == "mil" and result.head["defects_held_out"]
    assert not any(d.has_mask for d in result.recipe.defects)
    assert Inspector(bundle, result.recipe, store).inspect(parts.scratched_part(905, "center")).verdict == "NG"


def test_enrollment_states_expected_false_rejects_and_escapes_in_plain_words(headed: RecipeStore) -> None:
    exp = headed.load("plate").quality["expectation"]
    assert 0.0 <= exp["estimated_frr"] <= 1.0 and 0.0 <= exp["expected_escape"] <= 1.0
    assert [p["target_frr"] for p in exp["operating_points"]] == [0.01, 0.02, 0.05, 0.10]
    thresholds = [p["threshold"] for p in exp["operating_points"]]
    assert thresholds == sorted(thresholds, reverse=True)  # a looser target is a lower threshold
    assert "false rejects" in exp["explained"] and "labelled defects" in exp["explained"]


def test_boolean_and_soft_masks_teach_the_head_and_unmasked_defects_mix_in(
    tmp_path: Path, bundle: EngineBundle
) -> None:
    store = RecipeStore(tmp_path)
    enroller = Enroller(store, bundle)
    enroller.create("plate", target_frr=0.05)
    enroller.add("plate", [(f"good_{i}.png", parts.good_part(i)) for i in range(8)])
    boolean = _defects(range(600, 602))
    boolean = [LabelledImage(d.label, d.image, d.mask > 0, d.defect_type) for d in boolean]  # bool, as evaluate has
    result = enroller.add_defects("plate", boolean + _defects(range(602, 604), masks=False))
    assert result.head["mode"] == "mixed"
    assert [d.has_mask for d in result.recipe.defects] == [True, True, False, False]
    blank = LabelledImage("blank.png", parts.scratched_part(605), np.zeros((240, 320), np.uint8))
    with pytest.raises(ValueError, match="blank.png: the mask marks no defect pixels"):
        enroller.add_defects("plate", [blank])


def test_removing_the_last_labelled_defect_drops_the_head(tmp_path: Path, bundle: EngineBundle) -> None:
    store = RecipeStore(tmp_path, keep_versions=0)  # no kept versions: the dropped head's files are garbage
    enroller = Enroller(store, bundle)
    enroller.create("plate")
    enroller.add("plate", [(f"good_{i}.png", parts.good_part(i)) for i in range(6)])
    enroller.add_defects("plate", _defects(range(500, 502)))
    folder = store.folder("plate")
    assert len(list(folder.glob("head-v*.npz"))) == 1 and len(list((folder / "defects").glob("*.png"))) == 4
    enroller.remove("plate", "scratch_500.png")
    recipe = enroller.remove("plate", "scratch_501.png").recipe
    assert recipe.head_file is None and recipe.defects == () and recipe.live
    assert not list(folder.glob("head-v*.npz")) and not list((folder / "defects").glob("*"))


def test_mask_of_another_size_is_refused_naming_the_image(tmp_path: Path, bundle: EngineBundle) -> None:
    store = RecipeStore(tmp_path)
    enroller = Enroller(store, bundle)
    enroller.create("plate")
    enroller.add("plate", [(f"good_{i}.png", parts.good_part(i)) for i in range(4)])
    bad = LabelledImage("odd.png", parts.scratched_part(1), np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="odd.png: mask is 10x10, image is 320x240"):
        enroller.add_defects("plate", [bad])
    assert store.load("plate").defects == ()


def test_enroll_cli_takes_defects_with_masks_beside_them(
    tmp_path: Path, default_bundle_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    for i in range(6):
        parts.write(good / f"{i}.png", parts.good_part(i))
    for s in (700, 701, 702):
        image = parts.scratched_part(s, "top right")
        parts.write(bad / f"s{s}.png", image)
        cv2.imwrite(str(bad / f"s{s}_mask.png"), parts.defect_mask(image, s))
    store = ["--store", str(tmp_path / "store"), "--bundle", str(default_bundle_dir)]
    assert main(["enroll", "--recipe", "plate", "--images", str(good), "--target-frr", "0.05", *store]) == 0
    capsys.readouterr()
    code = main(["enroll", "--recipe", "plate", "--defects", str(bad), "--defect-type", "scratch", "--json", *store])
    assert code == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["defects"] == 3 and reply["head"]["mode"] == "mask" and reply["expectation"]["labelled_defects"] == 3
    recipe = RecipeStore(tmp_path / "store").load("plate")
    assert [d.name for d in recipe.defects] == ["s700.png", "s701.png", "s702.png"]
    assert all(d.has_mask and d.defect_type == "scratch" for d in recipe.defects)
