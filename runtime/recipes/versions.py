"""Kept recipe versions: what a commit replaces is kept for a rollback (issue 14).

Layout, beside the live ``recipe.json``::

    <store>/<recipe>/versions/recipe-v<N>.json    the recipe.json that bank version N committed

Every commit that changes the bank, head, threshold, golden samples or labelled defects gets a
new bank version, ``max(live, kept) + 1`` (numbers are never reused, so ``bank-v<N>.npz`` and
``head-v<N>.npz`` are never overwritten while a kept version names them), and first writes the
``recipe.json`` it replaces here, byte for byte. A rollback keeps the live one the same way and
then moves ``recipe.json`` to the kept one in one crash-safe write: a power cut at any moment
leaves the old or the new version live, never a mix, and the files either names stay on disk
(garbage collection spares everything a kept version names). The store keeps the
``keep_versions`` most recently replaced versions (file modification time, then number).

This module works on one recipe folder, under the writer lock its caller holds
(:meth:`RecipeStore.commit` and :meth:`RecipeStore.rollback`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter, ValidationError

from anomalygpt_edge.atomic_files import atomic_write_bytes

if TYPE_CHECKING:
    from anomalygpt_edge.runtime.recipes.store import Recipe, RecipeStore

#: How many replaced versions a store keeps per recipe unless told otherwise.
DEFAULT_KEEP_VERSIONS = 3
_VERSION_FILE = re.compile(r"recipe-v([0-9]{1,9})\.json\Z")


@dataclass(frozen=True)
class KeptVersion:
    """One ``versions/recipe-v<N>.json``: its number, when it was replaced, and the recipe (or why not)."""

    version: int
    path: Path
    replaced_ns: int
    recipe: Recipe | None
    error: str | None = None


def version_path(folder: Path, version: int) -> Path:
    """Where bank version ``version`` of the recipe in ``folder`` is kept."""
    return folder / "versions" / f"recipe-v{version}.json"


def content_key(recipe: Recipe) -> tuple[Any, ...]:
    """What makes two commits different versions: bank, head, threshold, samples, defects."""
    threshold = recipe.threshold.to_json() if recipe.threshold else None
    return (
        recipe.bank_file,
        recipe.bank_record,
        recipe.head_file,
        recipe.head_record,
        json.dumps(threshold, sort_keys=True),
        tuple(s.sha256 for s in recipe.samples),
        tuple(d.sha256 for d in recipe.defects),
    )


def kept(folder: Path) -> list[KeptVersion]:
    """The recipe's kept versions, most recently replaced first; an unreadable one carries its error."""
    from anomalygpt_edge.runtime.recipes.store import Recipe, RecipeError

    out = []
    for path in (folder / "versions").glob("recipe-v*.json"):
        match = _VERSION_FILE.match(path.name)
        if match is None:
            continue
        try:
            replaced_ns = path.stat().st_mtime_ns
        except OSError:
            continue  # removed by a concurrent trim: not kept any more
        try:
            recipe: Recipe | None = Recipe.from_json(json.loads(path.read_bytes()), str(path))
            error = None
        except (OSError, ValueError, RecipeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            recipe, error = None, str(exc) if isinstance(exc, RecipeError) else f"{path}: unreadable: {exc}"
        out.append(KeptVersion(int(match.group(1)), path, replaced_ns, recipe, error))
    return sorted(out, key=lambda k: (k.replaced_ns, k.version), reverse=True)


def next_version(folder: Path, recipe: Recipe, live: Recipe | None) -> int:
    """One more than any bank version this recipe has used (live, kept, or on disk as a bank or head)."""
    used = [recipe.bank_version, live.bank_version if live else 0] + [k.version for k in kept(folder)]
    for pattern in ("bank-v*.npz", "head-v*.npz"):
        for path in folder.glob(pattern):
            digits = path.name[6:-4]
            if digits.isdigit():
                used.append(int(digits))
    return max(used, default=0) + 1


def keep(folder: Path, version: int, data: bytes) -> None:
    """Keep ``data`` (a ``recipe.json`` about to be replaced) as version ``version``, crash-safely.

    Rewritten even when already kept, so its modification time says when it was last replaced.
    """
    path = version_path(folder, version)
    atomic_write_bytes(path, data)
    os.utime(path)


def trim(folder: Path, keep_versions: int, live: int) -> list[KeptVersion]:
    """Remove all but the ``keep_versions`` most recently replaced versions; returns those left (live excluded)."""
    left: list[KeptVersion] = []
    for version in kept(folder):
        if version.version == live:
            continue  # the live one rolled back to: its recipe.json is the commit point, not this copy
        if len(left) < keep_versions:
            left.append(version)
        else:
            version.path.unlink(missing_ok=True)
    return left


def rollback_target(name: str, live: Recipe, versions: list[KeptVersion], to_version: int | None) -> KeptVersion:
    """The kept version a rollback makes live: ``to_version``, else the one the live one replaced.

    Without a record of what the live one replaced (an older file, or that version no longer
    kept), the newest kept version numbered below the live one.
    """
    from anomalygpt_edge.runtime.recipes.store import RecipeError

    others = [v for v in versions if v.version != live.bank_version]
    listed = ", ".join(f"v{v.version}" for v in sorted(others, key=lambda v: -v.version)) or "none"
    if to_version is not None:
        if to_version == live.bank_version:
            raise RecipeError(f"recipe {name}: version {to_version} is already live")
        hit = next((v for v in others if v.version == to_version), None)
        if hit is None:
            raise RecipeError(f"recipe {name}: no kept version {to_version} (kept: {listed})")
        return hit
    parent = live.change.previous if live.change is not None else None
    hit = next((v for v in others if v.version == parent), None)
    older = sorted((v for v in others if v.version < live.bank_version), key=lambda v: -v.version)
    if hit is None and older:
        hit = older[0]
    if hit is None:
        raise RecipeError(
            f"recipe {name}: no older version to roll back to (live v{live.bank_version}, kept: {listed})"
        )
    return hit


def describe(recipe: Recipe, live: bool) -> dict[str, Any]:
    """One version as ``versions`` lists it: number, time, goldens, defects, threshold, who and why."""
    change = recipe.change
    return {
        "bank_version": recipe.bank_version,
        "live": live,
        "updated_at": recipe.updated_at,
        "k": len(recipe.samples),
        "defects": len(recipe.defects),
        "threshold": recipe.threshold.value if recipe.threshold else None,
        "by": change.by if change else None,
        "reason": change.reason if change else None,
        "previous": change.previous if change else None,
    }


def change_record(recipe: Recipe, live: Recipe | None, changed: bool, given: Mapping[str, str | None] | None) -> Any:
    """The change record a commit writes: a new one when the content changed or ``given``, else the old one."""
    from anomalygpt_edge.runtime.recipes.store import ChangeRecord, RecipeError, now_iso

    replaced = live if changed else None
    if replaced is None and given is None:
        return recipe.change
    previous = replaced.bank_version if replaced is not None else recipe.change.previous if recipe.change else None
    given = given or {}
    record = {"at": now_iso(), "by": given.get("by"), "reason": given.get("reason"), "previous": previous}
    try:
        return TypeAdapter(ChangeRecord).validate_python(record)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RecipeError(f"recipe {recipe.name}: change {where}: {first['msg']}") from None


def rollback(store: RecipeStore, name: str, to_version: int | None) -> Recipe:
    """:meth:`RecipeStore.rollback`'s work, under the writer lock it holds."""
    from anomalygpt_edge.runtime.recipes.store import RecipeError

    folder = store.folder(name)
    live = store.load(name)  # the live recipe's own error when it cannot be read
    live_bytes = (folder / "recipe.json").read_bytes()
    target = rollback_target(name, live, kept(folder), to_version)
    if target.recipe is None:
        raise RecipeError(f"recipe {name}: kept version {target.version} is unreadable: {target.error}")
    check_files(store, target.recipe, f"kept version {target.version}")
    data = target.path.read_bytes()
    keep(folder, live.bank_version, live_bytes)  # before the commit point moves
    atomic_write_bytes(folder / "recipe.json", data)
    store.collect_garbage(target.recipe, trim(folder, store.keep_versions, target.version))
    return target.recipe


def listing(store: RecipeStore, name: str) -> list[dict[str, Any]]:
    """:meth:`RecipeStore.versions`: the live version and every kept one, newest number first."""
    live = store.load(name)
    out = [describe(live, True)]
    for version in kept(store.folder(name)):
        if version.version == live.bank_version:
            continue
        if version.recipe is None:
            out.append({"bank_version": version.version, "live": False, "error": version.error})
        else:
            out.append(describe(version.recipe, False))
    return sorted(out, key=lambda v: -int(v["bank_version"]))


def check_files(store: RecipeStore, recipe: Recipe, what: str) -> None:
    """The bank, head, golden and defect files ``recipe`` names are there and match their records."""
    from anomalygpt_edge.runtime.inspection.defect_head import DefectHead, HeadError
    from anomalygpt_edge.runtime.inspection.memory_bank import BankError, MemoryBank
    from anomalygpt_edge.runtime.recipes.store import RecipeError, read_checked

    folder = store.folder(recipe.name)
    try:
        if recipe.bank_file is not None:
            path = folder / recipe.bank_file
            MemoryBank.from_bytes(read_checked(path, recipe.bank_record, f"{what}'s memory bank"), str(path))
        if recipe.head_file is not None:
            path = folder / recipe.head_file
            DefectHead.from_bytes(read_checked(path, recipe.head_record, f"{what}'s defect head"), str(path))
    except (BankError, HeadError) as exc:
        raise RecipeError(f"{what}: {exc}") from exc
    for sample in recipe.samples:
        path = store.sample_path(recipe.name, sample.sha256, "npz")
        if not path.is_file():
            raise RecipeError(f"{path}: {what}'s golden sample {sample.name!r} is missing")
    for defect in recipe.defects:
        path = store.defect_path(recipe.name, defect.sha256, "npz")
        if not path.is_file():
            raise RecipeError(f"{path}: {what}'s labelled defect {defect.name!r} is missing")
