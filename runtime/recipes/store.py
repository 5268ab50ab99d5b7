"""Recipes: one part type on one camera, and the on-disk store of recipes and their memory banks.

Store layout (every file written crash-safely: temp file, fsync, rename)::

    <store>/<recipe>/recipe.json          the commit point: settings, samples, bank file, threshold
    <store>/<recipe>/bank-v<N>.npz        memory bank version N (coreset of all samples' features)
    <store>/<recipe>/samples/<sha>.npz    one golden image's patch features (float16)
    <store>/<recipe>/samples/<sha>.png    the golden image itself (ROI applied), for re-enrollment
    <store>/<recipe>/head-v<N>.npz        defect head version N, when labelled defects are enrolled
    <store>/<recipe>/defects/<sha>.png    a labelled defective part (ROI applied), ``<sha>.mask.png``
                                          its painted defect region if any, ``<sha>.npz`` its features
    <store>/<recipe>/versions/recipe-v<N>.json  a replaced recipe.json kept for a rollback (``versions.py``)
    <store>/<recipe>/.lock                the per-recipe writer lock (see :meth:`RecipeStore.writer`)

``recipe.json`` names the bank (and head) file it belongs to, with its sha256, shape and dtype; a
new bank is written under a new name first and only then does ``recipe.json`` move to it, so a
power cut at any moment leaves the previous recipe and bank loadable. A bank or head that does not
match what ``recipe.json`` recorded, holds non-finite values or has the wrong feature width is
refused, naming the file. Files neither the live recipe nor a kept version refers to are removed by
the next successful commit, and only under the writer lock, so a clean-up never deletes what another
writer is about to commit. :meth:`RecipeStore.rollback` makes a kept version live again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from anomalygpt_edge.atomic_files import atomic_write_bytes, sha256_bytes
from anomalygpt_edge.calibration.threshold import DEFAULT_TARGET_FRR, Threshold
from anomalygpt_edge.runtime import values
from anomalygpt_edge.runtime.inspection.defect_head import DefectHead, HeadError
from anomalygpt_edge.runtime.inspection.memory_bank import DEFAULT_BUDGET, BankError, MemoryBank
from anomalygpt_edge.runtime.recipes import versions
from anomalygpt_edge.runtime.recipes.writer_lock import WriterLock

if TYPE_CHECKING:  # types only: the store never opens engines; `versions` in RecipeStore is its method
    from anomalygpt_edge.engines.bundle import EngineBundle
    from anomalygpt_edge.runtime.recipes.versions import KeptVersion

#: Format 2 adds labelled defects, the defect head, and the bank's sha256/shape/dtype. Format 1
#: recipes load unchanged (their bank is still checked for shape and finite values, not hash).
RECIPE_FORMAT: Final = 2
READABLE_FORMATS = (1, 2)
#: Anomaly sources: the few-shot bank, AnomalyGPT's zero-shot text decoder, or both averaged.
SOURCES = ("bank", "text", "text+bank")
USES_TEXT = ("text", "text+bank")
USES_BANK = ("bank", "text+bank")
AUGMENTATIONS = ("rot90", "hflip", "vflip")
RESIZE_MODES = ("squash", "letterbox", "shorter_side_crop")
#: File names recipe.json may point at: inside the recipe folder, nothing else.
_BANK_FILE = re.compile(r"bank-v[0-9]{1,9}\.npz\Z")
_HEAD_FILE = re.compile(r"head-v[0-9]{1,9}\.npz\Z")
DEFECT_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_ .-]{0,63}\Z")


class RecipeError(ValueError):
    """A recipe that does not exist, is malformed, or cannot go live; the message says which."""


def now_iso() -> str:
    """UTC now, ISO 8601 to the millisecond (recipe timestamps)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def check_name(name: str) -> str:
    """Recipe names become folder names: :func:`values.check_name` (the config's rule too), as a RecipeError."""
    try:
        return values.check_name(name)
    except ValueError as exc:
        raise RecipeError(f"recipe {exc}") from None


# The sample and record dataclasses are validated as parts of RecipeFile: unknown keys refused.
_FILE_PART = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class DefectSample:
    """One labelled defective part, enrolled to train the recipe's defect head."""

    __pydantic_config__ = _FILE_PART

    sha256: str
    name: str
    added_at: str
    defect_type: str | None = None
    has_mask: bool = False
    score: float | None = None  # cross-fitted score at the last rebuild


@dataclass(frozen=True)
class FileRecord:
    """What ``recipe.json`` knows of a bank or head file: checked before the file is used."""

    __pydantic_config__ = _FILE_PART

    sha256: str
    bytes: int
    shapes: dict[str, list[int]]
    dtype: str


@dataclass(frozen=True)
class GoldenSample:
    """One enrolled good part."""

    __pydantic_config__ = _FILE_PART

    sha256: str
    name: str
    added_at: str
    score: float | None = None  # leave-one-out score, once computed
    flagged: str | None = None  # why the quality check flagged it, if it did


@dataclass(frozen=True)
class ChangeRecord:
    """Who changed a recipe's bank, head, threshold or samples, why, when, and which version it replaced."""

    __pydantic_config__ = _FILE_PART

    at: str
    by: Annotated[str, Field(max_length=64)] | None = None
    reason: Annotated[str, Field(max_length=500)] | None = None
    previous: int | None = None  # the bank version this commit replaced


def _recipe_name(value: str) -> str:
    check_name(value)  # RecipeError is a ValueError: pydantic reports its sentence
    return value


def _pattern(rule: re.Pattern[str], what: str) -> Any:
    def check(value: str) -> str:
        if not rule.match(value):
            raise ValueError(f"{value!r} is not a {what} of this recipe")
        return value

    return AfterValidator(check)


def _sha256s(samples: tuple[Any, ...]) -> tuple[Any, ...]:
    for sample in samples:
        if not re.fullmatch(r"[0-9a-f]{64}", str(sample.sha256)):
            raise ValueError(f"sample {sample.name!r} has no valid sha256")
    return samples


class RecipeFile(BaseModel):
    """``recipe.json``: format 2 as written, format 1 (no defects, head or file records) read as is.

    The one place the file's fields are typed and checked: :meth:`Recipe.from_json` validates a
    loaded file through it, and every :class:`Recipe` built in code is checked by it as well.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1, 2] = RECIPE_FORMAT
    name: Annotated[str, AfterValidator(_recipe_name)]
    bundle_sha256: str
    bundle_path: str
    source: Literal["bank", "text", "text+bank"] = "bank"
    roi: values.Roi | None = None  # x, y, w, h in camera pixels
    resize: Literal["squash", "letterbox", "shorter_side_crop"] | None = None  # overrides the bundle's
    augment: tuple[Literal["rot90", "hflip", "vflip"], ...] = ()  # only for rotation/flip-invariant parts
    class_name: str | None = None  # text source: the object name for AnomalyGPT's prompts
    target_frr: values.TargetFrr = DEFAULT_TARGET_FRR
    bank_budget: Annotated[int, Field(ge=256)] = DEFAULT_BUDGET
    samples: Annotated[tuple[GoldenSample, ...], AfterValidator(_sha256s)] = ()
    bank_file: Annotated[str, _pattern(_BANK_FILE, "bank file")] | None = None
    bank_version: Annotated[int, Field(ge=0)] = 0
    threshold: dict[str, Any] | None = None
    quality: dict[str, Any] = Field(default_factory=dict)
    bank_record: FileRecord | None = None
    defects: Annotated[tuple[DefectSample, ...], AfterValidator(_sha256s)] = ()
    head_file: Annotated[str, _pattern(_HEAD_FILE, "head file")] | None = None
    head_record: FileRecord | None = None
    change: ChangeRecord | None = None  # optional: files written before versions load unchanged
    created_at: str = Field(default_factory=now_iso)
    updated_at: str = Field(default_factory=now_iso)


def _problem(exc: ValidationError) -> str:
    """pydantic's first error as ``key: what is wrong``."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-"))
    text = str(first.get("ctx", {}).get("error") or first["msg"])
    return f"{where}: {text}" if where else text


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
    change: ChangeRecord | None = None
    created_at: str = field(default_factory=now_iso)
    updated_at: str = field(default_factory=now_iso)

    def __post_init__(self) -> None:
        # The same rules as a loaded recipe.json: a recipe built in code is one that would load.
        check_name(self.name)
        try:
            RecipeFile.model_validate(self._fields())
        except ValidationError as exc:
            raise RecipeError(f"recipe {self.name}: {_problem(exc)}") from None

    def _fields(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["threshold"] = self.threshold.to_json() if self.threshold else None
        return data

    @property
    def live(self) -> bool:
        """Whether the recipe can inspect: it has a bank (or text source) and a threshold."""
        return self.threshold is not None and (self.source == "text" or self.bank_file is not None)

    def to_json(self) -> dict[str, Any]:
        """``recipe.json``'s content (format 2)."""
        data = asdict(self)
        data["format"] = RECIPE_FORMAT
        data["threshold"] = self.threshold.to_json() if self.threshold else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], origin: str) -> Recipe:
        """A loaded ``recipe.json`` validated by :class:`RecipeFile`; RecipeError naming ``origin``."""
        fmt = data.get("format") if isinstance(data, dict) else None
        if fmt not in READABLE_FORMATS or isinstance(fmt, bool):
            newer = isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > RECIPE_FORMAT
            raise RecipeError(
                f"{origin}: recipe format {fmt} is not one of {READABLE_FORMATS}"
                + ("; it was written by a newer version: upgrade anomalygpt-edge" if newer else "")
            )
        try:
            doc = RecipeFile.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(f"{origin}: malformed recipe: {_problem(exc)}") from None
        try:
            threshold = Threshold.from_json(doc.threshold) if doc.threshold else None
            loaded = {f.name: getattr(doc, f.name) for f in fields(cls) if f.name != "threshold"}
            return cls(**loaded, threshold=threshold)
        except RecipeError as exc:
            raise RecipeError(f"{origin}: {exc}") from exc
        except (TypeError, KeyError, ValueError) as exc:
            raise RecipeError(f"{origin}: malformed recipe: {exc}") from exc


def _record(data: bytes, arrays: dict[str, np.ndarray]) -> FileRecord:
    return FileRecord(
        sha256=sha256_bytes(data),
        bytes=len(data),
        shapes={k: list(a.shape) for k, a in arrays.items()},
        dtype=",".join(sorted({str(a.dtype) for a in arrays.values()})),
    )


def read_checked(path: Path, record: FileRecord | None, what: str) -> bytes:
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


def text_features_for(recipe: Recipe, bundle: EngineBundle) -> np.ndarray:
    """The bundle's AnomalyGPT text features for the recipe's object class (text sources)."""
    table = bundle.text_features()  # BundleError without them: the `or {}` below only narrows the type
    cls = recipe.class_name or str((bundle.manifest.text_features or {}).get("default_class", "object"))
    if cls not in table:
        raise RecipeError(f"recipe {recipe.name}: class '{cls}' has no text features in the bundle")
    return table[cls]


class RecipeStore:
    """The folder holding every recipe of this device."""

    def __init__(self, root: Path | str, keep_versions: int = versions.DEFAULT_KEEP_VERSIONS):
        if keep_versions < 0:
            raise RecipeError(f"keep_versions must be 0 or more, got {keep_versions}")
        self.root = Path(root)
        self.keep_versions = keep_versions
        self._who = threading.local()  # the change attributed() records

    def writer(self, name: str) -> contextlib.AbstractContextManager[None]:
        """The recipe's writer lock: every load-modify-commit of a recipe runs inside it.

        Station, MQTT and CLI enrollment all go through :class:`Enroller`, which holds this lock,
        so two writers are serialised and each one's clean-up sees the other's committed files.
        """
        return WriterLock.hold(self.folder(name) / ".lock")

    def folder(self, name: str) -> Path:
        """The recipe's folder; RecipeError for a name that cannot be one."""
        return self.root / check_name(name)

    def names(self) -> list[str]:
        """Every recipe in the store, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob("*/recipe.json"))

    def exists(self, name: str) -> bool:
        """Whether the recipe has a committed ``recipe.json``."""
        return (self.folder(name) / "recipe.json").is_file()

    def load(self, name: str) -> Recipe:
        """The committed recipe, validated (:class:`RecipeFile`); RecipeError naming the file otherwise."""
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
        data = read_checked(path, recipe.bank_record, "memory bank")
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
        data = read_checked(path, recipe.head_record, "defect head")
        try:
            head = DefectHead.from_bytes(data, str(path))
            head.check(dim, str(path))
        except HeadError as exc:
            raise RecipeError(str(exc)) from exc
        return head

    def sample_path(self, recipe: str, sha256: str, ext: str) -> Path:
        """Where a golden sample's image (``png``) or features (``npz``) live."""
        return self.folder(recipe) / "samples" / f"{sha256}.{ext}"

    def defect_path(self, recipe: str, sha256: str, ext: str) -> Path:
        """Where a labelled defect's image, mask or features live."""
        return self.folder(recipe) / "defects" / f"{sha256}.{ext}"

    def commit(
        self,
        recipe: Recipe,
        bank: MemoryBank | None = None,
        head: DefectHead | None = None,
        change: Mapping[str, str | None] | None = None,
    ) -> Recipe:
        """Write ``bank`` and ``head`` (as new versions), then ``recipe.json``; clean up what is unreferenced.

        ``head`` is written when given; a recipe committed with ``head_file=None`` drops its head.
        A commit that changes the bank, head, threshold or samples gets a new bank version and
        keeps the ``recipe.json`` it replaces (``versions.py``); ``change`` (``by``, ``reason``),
        else the one :meth:`attributed` set, is recorded with it.
        """
        with self.writer(recipe.name):
            folder = self.folder(recipe.name)
            folder.mkdir(parents=True, exist_ok=True)
            old_bytes, old = self._live(recipe.name)
            changed = old is not None and (
                bank is not None or head is not None or versions.content_key(old) != versions.content_key(recipe)
            )
            if bank is not None or changed:
                recipe = replace(recipe, bank_version=versions.next_version(folder, recipe, old))
            if bank is not None:
                bank.meta["bank_version"] = recipe.bank_version
                bank_file = f"bank-v{recipe.bank_version}.npz"
                data = bank.to_bytes()
                atomic_write_bytes(folder / bank_file, data)
                recipe = replace(recipe, bank_file=bank_file, bank_record=_record(data, bank.layers))
            if head is not None:
                head_file = f"head-v{recipe.bank_version}.npz"
                data = head.to_bytes()
                arrays = {"mean": head.mean, "scale": head.scale, "weight": head.weight}
                atomic_write_bytes(folder / head_file, data)
                recipe = replace(recipe, head_file=head_file, head_record=_record(data, arrays))
            elif recipe.head_file is None:
                recipe = replace(recipe, head_record=None)
            given = change if change is not None else getattr(self._who, "change", None)
            recipe = replace(recipe, updated_at=now_iso(), change=versions.change_record(recipe, old, changed, given))
            if changed and old is not None and old_bytes is not None:  # kept before the commit point moves
                versions.keep(folder, old.bank_version, old_bytes)
            atomic_write_bytes(folder / "recipe.json", (json.dumps(recipe.to_json(), indent=2) + "\n").encode())
            self.collect_garbage(recipe, versions.trim(folder, self.keep_versions, recipe.bank_version))
        return recipe

    @contextlib.contextmanager
    def attributed(self, by: str | None, reason: str | None = None) -> Iterator[None]:
        """Commits of this thread inside the block record ``by`` and ``reason`` (Enroller paths pass no ``change``)."""
        before = getattr(self._who, "change", None)
        self._who.change = {"by": by, "reason": reason}
        try:
            yield
        finally:
            self._who.change = before

    def _live(self, name: str) -> tuple[bytes | None, Recipe | None]:
        """The live ``recipe.json``'s bytes and recipe; None for both when there is none or it is unreadable."""
        path = self.folder(name) / "recipe.json"
        try:
            data = path.read_bytes()
            return data, Recipe.from_json(json.loads(data), str(path))
        except (OSError, ValueError):  # RecipeError, JSONDecodeError and UnicodeDecodeError are ValueErrors
            return None, None

    def rollback(self, name: str, to_version: int | None = None) -> Recipe:
        """Make a kept version live: ``to_version``, else the one the live version replaced.

        One crash-safe ``recipe.json`` write under the writer lock, after the kept version's bank,
        head and sample files were checked as the live ones are (sha256 records); the version it
        replaces is kept in turn, so ``rollback(name, to_version=<it>)`` rolls forward again.
        """
        with self.writer(name):
            return versions.rollback(self, name, to_version)

    def versions(self, name: str) -> list[dict[str, Any]]:
        """The live version and every kept one, newest number first (see :func:`versions.describe`)."""
        return versions.listing(self, name)

    def check_files(self, recipe: Recipe, what: str = "recipe") -> None:
        """The bank, head and sample files ``recipe`` names are there and match their records (RecipeError)."""
        versions.check_files(self, recipe, what)

    def collect_garbage(self, recipe: Recipe, kept: list[KeptVersion]) -> None:
        """Remove what neither the just-committed recipe nor a kept version names (under the writer lock)."""
        folder = self.folder(recipe.name)
        named = [recipe] + [k.recipe for k in kept if k.recipe is not None]
        files = {f for r in named for f in (r.bank_file, r.head_file) if f is not None}
        for pattern in ("bank-v*.npz", "head-v*.npz"):
            for old in folder.glob(pattern):
                if old.name not in files:
                    old.unlink(missing_ok=True)
        for sub, attr in (("samples", "samples"), ("defects", "defects")):
            shas = {s.sha256 for r in named for s in getattr(r, attr)}
            for f in (folder / sub).glob("*"):
                if f.name.split(".")[0] not in shas:
                    f.unlink(missing_ok=True)
        for tmp in folder.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def delete(self, name: str) -> None:
        """Remove the recipe's folder and everything in it."""
        import shutil

        shutil.rmtree(self.folder(name))
