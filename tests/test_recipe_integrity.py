"""A recipe is checked before it inspects, and has one writer at a time (issue: faults that lose parts)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import parts
import pytest

from anomalygpt_edge.engines import EngineBundle
from anomalygpt_edge.runtime.inspection.memory_bank import MemoryBank
from anomalygpt_edge.runtime.recipes.enrollment import Enroller
from anomalygpt_edge.runtime.recipes.inspector import Inspector
from anomalygpt_edge.runtime.recipes.store import RecipeError, RecipeStore, check_name


@pytest.fixture(scope="module")
def bundle(default_bundle_dir: Path) -> EngineBundle:
    return EngineBundle.open(default_bundle_dir)


@pytest.fixture()
def store(tmp_path: Path, bundle: EngineBundle) -> RecipeStore:
    store = RecipeStore(tmp_path / "store")
    enroller = Enroller(store, bundle)
    enroller.create("plate", target_frr=0.05)
    assert enroller.add("plate", [(f"g{i}.png", parts.good_part(i)) for i in range(6)]).recipe.live
    return store


def _rewrite_bank(store: RecipeStore, mutate) -> None:
    """Replace the live bank file with a mutated copy and make recipe.json's record agree (a well-formed bad bank)."""
    recipe = store.load("plate")
    path = store.folder("plate") / recipe.bank_file
    bank = MemoryBank.load(path)
    bank = MemoryBank({k: mutate(v) for k, v in bank.layers.items()}, bank.meta)
    data = bank.to_bytes()
    path.write_bytes(data)
    doc = json.loads((store.folder("plate") / "recipe.json").read_text())
    doc["bank_record"] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "shapes": {k: list(v.shape) for k, v in bank.layers.items()},
        "dtype": "float32",
    }
    (store.folder("plate") / "recipe.json").write_text(json.dumps(doc))


def test_bank_full_of_nan_is_refused_naming_the_file(store: RecipeStore, bundle: EngineBundle) -> None:
    _rewrite_bank(store, lambda a: np.full_like(a, np.nan))
    with pytest.raises(RecipeError, match=r"bank-v1\.npz: bank layer patches_0 holds NaN or infinite values"):
        Inspector(bundle, store.load("plate"), store)


def test_bank_of_another_feature_width_is_refused_before_matching(store: RecipeStore, bundle: EngineBundle) -> None:
    _rewrite_bank(store, lambda a: np.ascontiguousarray(a[:, :56]))
    with pytest.raises(RecipeError, match="has feature width 56, the bundle's encoder gives 112"):
        Inspector(bundle, store.load("plate"), store)


def test_bank_that_differs_from_its_recorded_sha256_is_refused(store: RecipeStore, bundle: EngineBundle) -> None:
    recipe = store.load("plate")
    path = store.folder("plate") / recipe.bank_file
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RecipeError, match="memory bank does not match recipe.json"):
        Inspector(bundle, recipe, store)


def test_nan_score_is_an_error_verdict_never_ok(store: RecipeStore, bundle: EngineBundle) -> None:
    inspector = Inspector(bundle, store.load("plate"), store)
    inspector.bank = {k: np.full_like(v, np.nan) for k, v in inspector.bank.items()}  # damaged after load
    verdict = inspector.inspect(parts.scratched_part(3))
    assert verdict.verdict == "ERROR" and "not a finite number" in verdict.reason


@pytest.mark.parametrize("bank_file", ["../../../etc/passwd", "/etc/passwd", "bank-v1.npz/../x", "samples/a.npz"])
def test_recipe_json_cannot_point_outside_its_folder(store: RecipeStore, bank_file: str) -> None:
    doc = json.loads((store.folder("plate") / "recipe.json").read_text())
    doc["bank_file"] = bank_file
    (store.folder("plate") / "recipe.json").write_text(json.dumps(doc))
    with pytest.raises(RecipeError, match="is not a bank file of this recipe"):
        store.load("plate")


@pytest.mark.parametrize("name", ["nl\n", "CON", "nul", "Com1", "LPT9.txt", "a/b", "", "x" * 65, "Bracket:v2"])
def test_recipe_names_refuse_newlines_device_names_and_separators(name: str) -> None:
    with pytest.raises(RecipeError):
        check_name(name)


def test_recipe_names_accept_ordinary_part_names() -> None:
    for name in ("bracket", "Bracket-v2", "tile_01.b", "CONsole", "NULL"):
        assert check_name(name) == name


def test_recipe_of_a_newer_format_asks_for_an_upgrade(store: RecipeStore) -> None:
    doc = json.loads((store.folder("plate") / "recipe.json").read_text())
    doc["format"] = 99
    (store.folder("plate") / "recipe.json").write_text(json.dumps(doc))
    with pytest.raises(RecipeError, match="written by a newer version: upgrade"):
        store.load("plate")


def test_threads_enrolling_one_recipe_are_serialised_and_keep_every_sample(
    store: RecipeStore, bundle: EngineBundle
) -> None:
    errors: list[BaseException] = []

    def enroll(start: int) -> None:
        try:
            Enroller(store, bundle).add("plate", [(f"t{start + i}.png", parts.good_part(start + i)) for i in range(3)])
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=enroll, args=(100 + 10 * t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    recipe = store.load("plate")
    assert len(recipe.samples) == 6 + 9
    for s in recipe.samples:  # no writer's clean-up deleted another's files
        assert store.sample_path("plate", s.sha256, "png").is_file()
        assert store.sample_path("plate", s.sha256, "npz").is_file()


_ENROLL_IN_CHILD = """
import sys
sys.path.insert(0, {tests!r})
import parts
from anomalygpt_edge.engines import EngineBundle
from anomalygpt_edge.runtime.recipes.enrollment import Enroller
from anomalygpt_edge.runtime.recipes.store import RecipeStore
store = RecipeStore({store!r})
enroller = Enroller(store, EngineBundle.open({bundle!r}))
start = int(sys.argv[1])
r = enroller.add("plate", [(f"p{{start + i}}.png", parts.good_part(start + i)) for i in range(4)])
print(len(r.recipe.samples))
"""


def test_processes_enrolling_one_recipe_are_serialised_by_the_file_lock(
    store: RecipeStore, default_bundle_dir: Path
) -> None:
    code = _ENROLL_IN_CHILD.format(
        tests=str(Path(__file__).parent), store=str(store.root), bundle=str(default_bundle_dir)
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(200 + 10 * i)], stdout=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    counts = sorted(int(p.communicate(timeout=180)[0].strip()) for p in procs)
    assert all(p.returncode == 0 for p in procs)
    assert counts == [10, 14]  # each reply states the recipe as it committed it: one after the other
    recipe = store.load("plate")
    assert len(recipe.samples) == 14
    assert all(store.sample_path("plate", s.sha256, "npz").is_file() for s in recipe.samples)
    assert not list(store.folder("plate").rglob(".*.tmp"))


def test_bank_bytes_round_trip_through_the_checked_loader(store: RecipeStore) -> None:
    recipe = store.load("plate")
    bank = store.load_bank(recipe, {"patches_0": 112})
    again = MemoryBank.from_bytes(bank.to_bytes(), "memory")
    assert np.array_equal(again.layers["patches_0"], bank.layers["patches_0"])
    assert again.meta["bank_version"] == recipe.bank_version


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"colour": "red"}, "malformed recipe: colour: Extra inputs are not permitted"),
        ({"roi": [0, 0, 4, 4]}, r"malformed recipe: roi: must be \[x, y, w, h\] with x, y >= 0 and w, h >= 8"),
        ({"target_frr": 0.7}, r"malformed recipe: target_frr: must be a number in \(0, 0.5\), got 0.7"),
        ({"source": "magic"}, "malformed recipe: source: Input should be 'bank', 'text' or 'text\\+bank'"),
        ({"name": "Bracket:v2"}, "malformed recipe: name: recipe name 'Bracket:v2' is invalid"),
    ],
)
def test_recipe_json_is_validated_in_one_place_naming_the_file_and_the_key(
    store: RecipeStore, edit: dict, message: str
) -> None:
    path = store.folder("plate") / "recipe.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, **edit}))
    with pytest.raises(RecipeError, match=f"{path}: {message}"):
        store.load("plate")


def test_a_format_1_recipe_still_loads(store: RecipeStore) -> None:
    path = store.folder("plate") / "recipe.json"
    doc = json.loads(path.read_text())
    for key in ("defects", "head_file", "head_record", "bank_record"):
        doc.pop(key)
    path.write_text(json.dumps({**doc, "format": 1}))
    recipe = store.load("plate")
    assert recipe.live and recipe.bank_record is None and recipe.defects == () and len(recipe.samples) == 6


def test_a_recipe_built_in_code_obeys_the_rules_of_a_loaded_one(store: RecipeStore) -> None:
    from dataclasses import replace

    recipe = store.load("plate")
    assert replace(recipe, roi=(0, 0, 64, 64)).roi == (0, 0, 64, 64)
    with pytest.raises(RecipeError, match="recipe plate: roi: must be"):
        replace(recipe, roi=(0, 0, 4, 4))
    with pytest.raises(RecipeError, match=r"recipe plate: target_frr: must be a number in \(0, 0.5\)"):
        replace(recipe, target_frr=0.5)
    with pytest.raises(RecipeError, match="recipe plate: augment.0: Input should be"):
        replace(recipe, augment=("spin",))
