"""Recipes: one part type on one camera, and the on-disk store of recipes and their memory banks.

Store layout (every file written crash-safely: temp file, fsync, rename)::

    <store>/<recipe>/recipe.json          the commit point: settings, samples, bank file, threshold
    <store>/<recipe>/bank-v<N>.npz        memory bank version N (coreset of all samples' features)
    <store>/<recipe>/samples/<sha>.npz    one golden image's patch features (float16)
    <store>/<recipe>/samples/<sha>.png    the golden image itself (ROI applied), for re-enrollment
    <store>/<recipe>/head-v<N>.npz        defect head version N, when labelled defects are enrolled
    <store>/<recipe>/defects/<sha>.png    a labelled defective part (ROI applied), ``<sha>.mask.png``
                                          its painted defect region if any, ``<sha>.npz`` its features
    <store>/<recipe>/.lock                the per-recipe writer lock (see :meth:`RecipeStore.writer`)

``recipe.json`` names the bank (and head) file it belongs to, with its sha256, shape and dtype; a
new bank is written under a new name first and only then does ``recipe.json`` move to it, so a
power cut at any moment leaves the previous recipe and bank loadable. A bank or head that does not
match what ``recipe.json`` recorded, holds non-finite values or has the wrong feature width is
refused, naming the file. Files no recipe refers to are removed by the next successful commit, and
only under the writer lock, so a clean-up never deletes what another writer is about to commit.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from anomalygpt_edge.atomic_files import atomic_write_bytes, sha256_bytes
from anomalygpt_edge.calibration.threshold import DEFAULT_TARGET_FRR, Threshold
from anomalygpt_edge.runtime.inspection.defect_head import DefectHead, HeadError
from anomalygpt_edge.runtime.inspection.memory_bank import DEFAULT_BUDGET, BankError, MemoryBank

#: Format 2 adds labelled defects, the defect head, and the bank's sha256/shape/dtype. Format 1
#: recipes load unchanged (their bank is still checked for shape and finite values, not hash).
RECIPE_FORMAT = 2
READABLE_FORMATS = (1, 2)
#: Anomaly sources: the few-shot bank, AnomalyGPT's zero-shot text decoder, or both averaged.
SOURCES = ("bank", "text", "text+bank")
USES_TEXT = ("text", "text+bank")
USES_BANK = ("bank", "text+bank")
AUGMENTATIONS = ("rot90", "hflip", "vflip")
RESIZE_MODES = ("squash", "letterbox", "shorter_side_crop")
# \Z, not $: "$" also matches before a trailing newline, which let "nl\n" through as a folder name.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
#: Device names Windows reserves in any folder, with or without an extension (the store may sit on
#: a share, and exported archives travel): refused on every platform so a recipe copies anywhere.
_RESERVED = re.compile(r"(CON|PRN|AUX|NUL|CONIN\$|CONOUT\$|COM[0-9¹²³]|LPT[0-9¹²³])(\..*)?\Z", re.IGNORECASE)
#: File names recipe.json may point at: inside the recipe folder, nothing else.
_BANK_FILE = re.compile(r"bank-v[0-9]{1,9}\.npz\Z")
_HEAD_FILE = re.compile(r"head-v[0-9]{1,9}\.npz\Z")
DEFECT_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_ .-]{0,63}\Z")


class RecipeError(ValueError):
    """A recipe that does not exist, is malformed, or cannot go live; the message says which."""


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def check_name(name: str) -> str:
    """Recipe names become folder names: letters, digits, ``_.-``, at most 64 characters, no device names."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise RecipeError(f"recipe name {name!r} is invalid: use letters, digits, '_', '.', '-' (max 64)")
    if _RESERVED.match(name):
        raise RecipeError(f"recipe name {name!r} is a reserved device name (CON, NUL, COM1, ...): choose another")
    return name


@dataclass(frozen=True)
class DefectSample:
    """One labelled defective part, enrolled to train the recipe's defect head."""

    sha256: str
    name: str
    added_at: str
    defect_type: str | None = None
    has_mask: bool = False
    score: float | None = None  # cross-fitted score at the last rebuild


@dataclass(frozen=True)
class FileRecord:
    """What ``recipe.json`` knows of a bank or head file: checked before the file is used."""

    sha256: str
    bytes: int
    shapes: dict[str, list[int]]
    dtype: str


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
    bank_record: FileRecord | None = None
    defects: tuple[DefectSample, ...] = ()
    head_file: str | None = None
    head_record: FileRecord | None = None
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
        if self.bank_file is not None and not _BANK_FILE.match(str(self.bank_file)):
            raise RecipeError(f"recipe {self.name}: bank_file {self.bank_file!r} is not a bank file of this recipe")
        if self.head_file is not None and not _HEAD_FILE.match(str(self.head_file)):
            raise RecipeError(f"recipe {self.name}: head_file {self.head_file!r} is not a head file of this recipe")
        for sample in (*self.samples, *self.defects):
            if not re.fullmatch(r"[0-9a-f]{64}", str(sample.sha256)):
                raise RecipeError(f"recipe {self.name}: sample {sample.name!r} has no valid sha256")

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
        if data.get("format") not in READABLE_FORMATS:
            newer = isinstance(data.get("format"), int) and data["format"] > RECIPE_FORMAT
            raise RecipeError(
                f"{origin}: recipe format {data.get('format')} is not one of {READABLE_FORMATS}"
                + ("; it was written by a newer version: upgrade anomalygpt-edge" if newer else "")
            )
        try:
            fields = {k: v for k, v in data.items() if k != "format"}
            fields["roi"] = tuple(fields["roi"]) if fields.get("roi") else None
            fields["augment"] = tuple(fields.get("augment", ()))
            fields["samples"] = tuple(GoldenSample(**s) for s in fields.get("samples", ()))
            fields["defects"] = tuple(DefectSample(**s) for s in fields.get("defects", ()))
            fields["threshold"] = Threshold.from_json(fields["threshold"]) if fields.get("threshold") else None
            for key in ("bank_record", "head_record"):
                fields[key] = FileRecord(**fields[key]) if fields.get(key) else None
            return cls(**fields)
        except RecipeError as exc:
            raise RecipeError(f"{origin}: {exc}") from exc
        except (TypeError, KeyError, ValueError) as exc:
            raise RecipeError(f"{origin}: malformed recipe: {exc}") from exc


def _record(data: bytes, arrays: dict[str, np.ndarray]) -> FileRecord:
    dtypes = {str(a.dtype) for a in arrays.values()}
    return FileRecord(
        sha256=sha256_bytes(data),
        bytes=len(data),
        shapes={k: list(a.shape) for k, a in arrays.items()},
        dtype=",".join(sorted(dtypes)),
    )


def _read_checked(path: Path, record: FileRecord | None, what: str) -> bytes:
    """A bank or head file's bytes, refused unless they match what ``recipe.json`` recorded."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"{path}: {what} unreadable: {exc.strerror or exc}") from exc
    if record is not None and (len(data) != record.bytes or sha256_bytes(data) != record.sha256):
        raise RecipeError(
            f"{path}: {what} does not match recipe.json (sha256 or size differ): the file is damaged or "
            "was replaced; re-enroll the recipe"
        )
    return data


class _WriterLock:
    """One writer per recipe across threads (an RLock) and processes (``flock`` on ``.lock``)."""

    _guard = threading.Lock()
    _held: dict[str, tuple[threading.RLock, list[int]]] = {}

    @classmethod
    @contextlib.contextmanager
    def hold(cls, path: Path) -> Iterator[None]:
        key = str(path.resolve())
        with cls._guard:
            lock, state = cls._held.setdefault(key, (threading.RLock(), [0, -1]))
        with lock:  # re-entrant within a thread; other threads of this process wait here
            if state[0] == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)  # other processes (CLI beside the daemon) wait here
                except BaseException:
                    os.close(fd)
                    raise
                state[1] = fd
            state[0] += 1
            try:
                yield
            finally:
                state[0] -= 1
                if state[0] == 0:
                    fcntl.flock(state[1], fcntl.LOCK_UN)
                    os.close(state[1])
                    state[1] = -1


def text_features_for(recipe: Recipe, bundle: Any) -> np.ndarray:
    """The bundle's AnomalyGPT text features for the recipe's object class (text sources)."""
    table = bundle.text_features()
    cls = recipe.class_name or bundle.manifest.text_features.get("default_class", "object")
    if cls not in table:
        raise RecipeError(f"recipe {recipe.name}: class '{cls}' has no text features in the bundle")
    return table[cls]


class RecipeStore:
    """The folder holding every recipe of this device."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def writer(self, name: str) -> contextlib.AbstractContextManager[None]:
        """The recipe's writer lock: every load-modify-commit of a recipe runs inside it.

        Station, MQTT and CLI enrollment all go through :class:`Enroller`, which holds this lock,
        so two writers are serialised and each one's clean-up sees the other's committed files.
        """
        return _WriterLock.hold(self.folder(name) / ".lock")

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

    def load_bank(self, recipe: Recipe, widths: dict[str, int] | None = None) -> MemoryBank:
        """The recipe's bank, checked against ``recipe.json`` (sha256, shape, dtype), finite, of the right width.

        ``widths`` maps each patch layer of the bundle to its feature width.
        """
        if recipe.bank_file is None:
            raise RecipeError(f"recipe {recipe.name} has no memory bank yet: enroll golden parts first")
        path = self.folder(recipe.name) / recipe.bank_file
        data = _read_checked(path, recipe.bank_record, "memory bank")
        try:
            bank = MemoryBank.from_bytes(data, str(path))
            bank.check(widths, str(path))
        except BankError as exc:
            raise RecipeError(str(exc)) from exc
        if bank.meta.get("bundle_sha256") != recipe.bundle_sha256:
            raise RecipeError(f"recipe {recipe.name}: memory bank was built with another engine bundle; re-enroll")
        if recipe.bank_record is not None and {k: list(a.shape) for k, a in bank.layers.items()} != dict(
            recipe.bank_record.shapes
        ):
            raise RecipeError(f"{path}: memory bank shapes differ from recipe.json; re-enroll the recipe")
        return bank

    def load_head(self, recipe: Recipe, dim: int) -> DefectHead | None:
        """The recipe's defect head (None without labelled defects), hash- and width-checked."""
        if recipe.head_file is None:
            return None
        path = self.folder(recipe.name) / recipe.head_file
        data = _read_checked(path, recipe.head_record, "defect head")
        try:
            head = DefectHead.from_bytes(data, str(path))
            head.check(dim, str(path))
        except HeadError as exc:
            raise RecipeError(str(exc)) from exc
        return head

    def sample_path(self, recipe: str, sha256: str, ext: str) -> Path:
        return self.folder(recipe) / "samples" / f"{sha256}.{ext}"

    def defect_path(self, recipe: str, sha256: str, ext: str) -> Path:
        return self.folder(recipe) / "defects" / f"{sha256}.{ext}"

    def commit(self, recipe: Recipe, bank: MemoryBank | None = None, head: DefectHead | None = None) -> Recipe:
        """Write ``bank`` and ``head`` (as new versions), then ``recipe.json``; clean up what is unreferenced.

        ``head`` is written when given; a recipe committed with ``head_file=None`` drops its head.
        """
        with self.writer(recipe.name):
            folder = self.folder(recipe.name)
            folder.mkdir(parents=True, exist_ok=True)
            if bank is not None:
                version = recipe.bank_version + 1
                bank.meta["bank_version"] = version
                bank_file = f"bank-v{version}.npz"
                data = bank.to_bytes()
                atomic_write_bytes(folder / bank_file, data)
                recipe = replace(
                    recipe, bank_file=bank_file, bank_version=version, bank_record=_record(data, bank.layers)
                )
            if head is not None:
                head_file = f"head-v{recipe.bank_version}.npz"
                data = head.to_bytes()
                arrays = {"mean": head.mean, "scale": head.scale, "weight": head.weight}
                atomic_write_bytes(folder / head_file, data)
                recipe = replace(recipe, head_file=head_file, head_record=_record(data, arrays))
            elif recipe.head_file is None:
                recipe = replace(recipe, head_record=None)
            recipe = replace(recipe, updated_at=now_iso())
            atomic_write_bytes(folder / "recipe.json", (json.dumps(recipe.to_json(), indent=2) + "\n").encode())
            self._collect_garbage(recipe)
        return recipe

    def _collect_garbage(self, recipe: Recipe) -> None:
        """Remove what the just-committed recipe no longer names (called under the writer lock)."""
        folder = self.folder(recipe.name)
        for pattern, current in (("bank-v*.npz", recipe.bank_file), ("head-v*.npz", recipe.head_file)):
            for old in folder.glob(pattern):
                if old.name != current:
                    old.unlink(missing_ok=True)
        for sub, keep in (("samples", recipe.samples), ("defects", recipe.defects)):
            shas = {s.sha256 for s in keep}
            for f in (folder / sub).glob("*"):
                if f.name.split(".")[0] not in shas:
                    f.unlink(missing_ok=True)
        for tmp in folder.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def delete(self, name: str) -> None:
        import shutil

        shutil.rmtree(self.folder(name))
