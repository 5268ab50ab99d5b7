"""Recipes: one part type on one camera, and the on-disk store of recipes and their memory banks.

Store layout (every file written crash-safely: temp file, fsync, rename)::

    <store>/<recipe>/recipe.json          the commit point: settings, samples, bank file, threshold
    <store>/<recipe>/bank-v<N>.npz        memory bank version N (coreset of all samples' features)
    <store>/<recipe>/samples/<sha>.npz    one golden image's patch features (float16)
    <store>/<recipe>/samples/<sha>.png    the golden image itself (ROI applied), for re-enrollment

``recipe.json`` names the bank file it belongs to; a new bank is written under a new name first
and only then does ``recipe.json`` move to it, so a power cut at any moment leaves the previous
recipe and bank loadable. Files no recipe refers to are removed by the next successful commit.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from anomalygpt_edge.calibration.threshold import DEFAULT_TARGET_FRR, Threshold
from anomalygpt_edge.engines.integrity import atomic_write_bytes
from anomalygpt_edge.runtime.memory_bank import DEFAULT_BUDGET, MemoryBank

RECIPE_FORMAT = 1
SOURCES = ("bank", "text")
AUGMENTATIONS = ("rot90", "hflip", "vflip")
RESIZE_MODES = ("squash", "letterbox", "shorter_side_crop")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class RecipeError(ValueError):
    """A recipe that does not exist, is malformed, or cannot go live; the message says which."""


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def check_name(name: str) -> str:
    """Recipe names become folder names: letters, digits, ``_.-``, at most 64 characters."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise RecipeError(f"recipe name {name!r} is invalid: use letters, digits, '_', '.', '-' (max 64)")
    return name


@dataclass(frozen=True)
class GoldenSample:
    """One enrolled good part."""

    sha256: str
    name: str
    added_at: str
    score: float | None = None  # leave-one-out score, once computed
    flagged: str | None = None  # why the quality check flagged it, if it did


@dataclass(frozen=True)
class Recipe:
    """Settings and state of one part type on one camera."""

    name: str
    bundle_sha256: str
    bundle_path: str
    source: str = "bank"
    roi: tuple[int, int, int, int] | None = None  # x, y, w, h in camera pixels
    resize: str | None = None  # overrides the bundle's resize mode when set
    augment: tuple[str, ...] = ()  # only for rotation/flip-invariant parts
    class_name: str | None = None  # text source: the object name for AnomalyGPT's prompts
    target_frr: float = DEFAULT_TARGET_FRR
    bank_budget: int = DEFAULT_BUDGET
    samples: tuple[GoldenSample, ...] = ()
    bank_file: str | None = None
    bank_version: int = 0
    threshold: Threshold | None = None
    quality: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=now_iso)
    updated_at: str = field(default_factory=now_iso)

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.source not in SOURCES:
            raise RecipeError(f"recipe {self.name}: source must be one of {SOURCES}, got {self.source!r}")
        if self.resize is not None and self.resize not in RESIZE_MODES:
            raise RecipeError(f"recipe {self.name}: resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        bad = [a for a in self.augment if a not in AUGMENTATIONS]
        if bad:
            raise RecipeError(f"recipe {self.name}: unknown augmentation {bad}; allowed {AUGMENTATIONS}")
        if self.roi is not None and (len(self.roi) != 4 or min(self.roi[2:]) <= 0 or min(self.roi[:2]) < 0):
            raise RecipeError(f"recipe {self.name}: roi must be [x, y, w, h] with w, h > 0, got {self.roi}")
        if not 0 < self.target_frr < 0.5:
            raise RecipeError(f"recipe {self.name}: target_frr must be in (0, 0.5), got {self.target_frr}")
        if self.bank_budget < 256:
            raise RecipeError(f"recipe {self.name}: bank_budget must be at least 256 patches")

    @property
    def live(self) -> bool:
        """Whether the recipe can inspect: it has a bank (or text source) and a threshold."""
        return self.threshold is not None and (self.source == "text" or self.bank_file is not None)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["format"] = RECIPE_FORMAT
        data["threshold"] = self.threshold.to_json() if self.threshold else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], origin: str) -> Recipe:
        if data.get("format") != RECIPE_FORMAT:
            raise RecipeError(f"{origin}: recipe format {data.get('format')} is not {RECIPE_FORMAT}")
        try:
            fields = {k: v for k, v in data.items() if k != "format"}
            fields["roi"] = tuple(fields["roi"]) if fields.get("roi") else None
            fields["augment"] = tuple(fields.get("augment", ()))
            fields["samples"] = tuple(GoldenSample(**s) for s in fields.get("samples", ()))
            fields["threshold"] = Threshold.from_json(fields["threshold"]) if fields.get("threshold") else None
            return cls(**fields)
        except RecipeError:
            raise
        except (TypeError, KeyError, ValueError) as exc:
            raise RecipeError(f"{origin}: malformed recipe: {exc}") from exc


class RecipeStore:
    """The folder holding every recipe of this device."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def folder(self, name: str) -> Path:
        return self.root / check_name(name)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob("*/recipe.json"))

    def exists(self, name: str) -> bool:
        return (self.folder(name) / "recipe.json").is_file()

    def load(self, name: str) -> Recipe:
        path = self.folder(name) / "recipe.json"
        if not path.is_file():
            known = ", ".join(self.names()) or "none"
            raise RecipeError(f"no recipe '{name}' in {self.root} (known: {known})")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RecipeError(f"{path}: unreadable recipe: {exc}") from exc
        return Recipe.from_json(data, str(path))

    def load_bank(self, recipe: Recipe) -> MemoryBank:
        if recipe.bank_file is None:
            raise RecipeError(f"recipe {recipe.name} has no memory bank yet: enroll golden parts first")
        bank = MemoryBank.load(self.folder(recipe.name) / recipe.bank_file)
        if bank.meta.get("bundle_sha256") != recipe.bundle_sha256:
            raise RecipeError(f"recipe {recipe.name}: memory bank was built with another engine bundle; re-enroll")
        return bank

    def sample_path(self, recipe: str, sha256: str, ext: str) -> Path:
        return self.folder(recipe) / "samples" / f"{sha256}.{ext}"

    def commit(self, recipe: Recipe, bank: MemoryBank | None = None) -> Recipe:
        """Write ``bank`` (as a new version) and then ``recipe.json``; clean up what is unreferenced."""
        folder = self.folder(recipe.name)
        folder.mkdir(parents=True, exist_ok=True)
        if bank is not None:
            version = recipe.bank_version + 1
            bank.meta["bank_version"] = version
            bank_file = f"bank-v{version}.npz"
            bank.save(folder / bank_file)
            recipe = replace(recipe, bank_file=bank_file, bank_version=version)
        recipe = replace(recipe, updated_at=now_iso())
        atomic_write_bytes(folder / "recipe.json", (json.dumps(recipe.to_json(), indent=2) + "\n").encode())
        self._collect_garbage(recipe)
        return recipe

    def _collect_garbage(self, recipe: Recipe) -> None:
        folder = self.folder(recipe.name)
        for old in folder.glob("bank-v*.npz"):
            if old.name != recipe.bank_file:
                old.unlink(missing_ok=True)
        keep = {s.sha256 for s in recipe.samples}
        for f in (folder / "samples").glob("*"):
            if f.stem not in keep:
                f.unlink(missing_ok=True)
        for tmp in folder.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def delete(self, name: str) -> None:
        import shutil

        shutil.rmtree(self.folder(name))
