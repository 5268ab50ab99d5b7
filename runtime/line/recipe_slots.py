"""Recipe slots: the engine bundles, pipelines and enrollers, and each camera's live inspector.

One bundle, one pipeline, one enroller per bundle path: cameras sharing a bundle share its engines.
Each bound camera has a slot holding its recipe's name, its :class:`Inspector` (None while the
recipe cannot inspect) and the reason it cannot. A recipe that is missing or not live does not stop
the daemon: that camera answers every part ERROR with the reason until it is enrolled.

Each slot also keeps its :class:`RecipeStamp`, what the camera's recipe was loaded from (the stat
of ``recipe.json`` and the recipe it held), so the recipe watch (``recipe_watch.py``) can tell a
commit of another process from what the camera already runs.

Warm-up (issue 16): :meth:`RecipeSlots.warm_up` runs every live recipe's engines once per batch
shape in use before the daemon says READY, so first-run work (ONNX Runtime's arena growth, a
TensorRT build for a new shape) is not paid by the first part, nor counted by systemd's watchdog.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from anomalygpt_edge.engines.bundle import EngineBundle
from anomalygpt_edge.runtime.inspection.pipeline import VisionPipeline
from anomalygpt_edge.runtime.recipes.enrollment import Enroller
from anomalygpt_edge.runtime.recipes.inspector import Inspector, inspect_many
from anomalygpt_edge.runtime.recipes.store import Recipe, RecipeError, RecipeStore, now_iso

if TYPE_CHECKING:
    from anomalygpt_edge.runtime.line.config import DaemonConfig, EnginesConfig, RecipeBinding

log = logging.getLogger(__name__)

#: Grey level of the warm-up image: any valid image exercises the same shapes and kernels.
WARMUP_GREY = 128
#: Recipe changes (rollbacks, applies, reloads of other processes' commits) the status lists, newest last.
MAX_CHANGES = 8
#: ``recipe.json``'s (inode, modification time in ns, size): an atomic replace changes the inode.
CommitStat = tuple[int, int, int]


def commit_stat(path: Path) -> CommitStat | None:
    """The stat of a recipe's ``recipe.json`` that a commit changes; None when there is none."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


@dataclass(frozen=True)
class RecipeStamp:
    """What a camera's recipe was loaded from: ``recipe.json``'s stat, taken before it was read, and
    the committed recipe it held (None when it could not be read; before the binding's ROI)."""

    stat: CommitStat | None
    committed: Recipe | None


@dataclass(frozen=True)
class WarmRun:
    """One warm-up run: a recipe's engines at one batch shape, how long it took, and when it ended."""

    bundle: str
    recipe: str
    batch: int
    ms: float
    finished_at: float  # time.monotonic(), to order it against READY=1
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The run as the status document lists it."""
        return {"bundle": self.bundle, "recipe": self.recipe, "batch": self.batch, "ms": round(self.ms, 1)} | (
            {"error": self.error} if self.error else {}
        )


def warmup_batches(engines: EnginesConfig) -> list[int]:
    """The batch shapes the line runs: 1 (one part per trigger) and ``engines.max_batch`` when configured."""
    max_batch = getattr(engines, "max_batch", None)  # optional key: not every config version has it
    return sorted({1, int(max_batch)}) if max_batch else [1]


def warmup_image(recipe_roi: tuple[int, int, int, int] | None, size: Sequence[int]) -> np.ndarray:
    """A plain grey frame large enough for the recipe's ROI (else the bundle's input size)."""
    h, w = int(size[0]), int(size[1])
    if recipe_roi is not None:
        x, y, rw, rh = recipe_roi
        h, w = y + rh, x + rw
    return np.full((h, w, 3), WARMUP_GREY, np.uint8)


class RecipeSlots:
    """Bundles, pipelines, enrollers and per-camera inspectors; loads and switches recipes.

    ``on_change`` is called after a switch or a reload (the daemon republishes its status).
    """

    def __init__(self, config: DaemonConfig, store: RecipeStore, on_change: Callable[[], None] | None = None):
        self.config = config
        self.store = store
        self.on_change = on_change
        self.bundles: dict[Path, EngineBundle] = {}
        self.pipelines: dict[Path, VisionPipeline] = {}
        self.enrollers: dict[Path, Enroller] = {}
        self.inspectors: dict[str, Inspector | None] = {}
        self.recipe_names: dict[str, str] = {}
        self.recipe_problems: dict[str, str | None] = {}
        self.lock = threading.Lock()
        #: Set once :meth:`warm_up` has run (the status says ``starting`` until then).
        self.warmed = threading.Event()
        self.warmups: list[WarmRun] = []
        #: The last recipe changes, announced in the status (``recipe_changes``).
        self.changes: deque[dict[str, Any]] = deque(maxlen=MAX_CHANGES)
        #: Camera -> what its recipe was last loaded from (set by every :meth:`load_recipe`).
        self.stamps: dict[str, RecipeStamp] = {}
        self._reloading: dict[str, int] = {}  # recipe -> loads, reloads and rollbacks of it under way

    # -- bundles ---------------------------------------------------------------------------------
    def binding(self, camera: str) -> RecipeBinding | None:
        """The camera's recipe binding from the config (None for an unbound camera)."""
        return self.config.binding(camera)

    def bundle_key(self, camera: str) -> Path:
        """The resolved path of the bundle that inspects ``camera``."""
        binding = self.binding(camera)
        path = self.config.bundle_for(binding) if binding else self.config.engines.bundle
        return Path(path).resolve()

    def enroller(self, camera: str) -> Enroller:
        """The enroller for ``camera``'s bundle."""
        return self.enrollers[self.bundle_key(camera)]

    def bundle_sha256(self, camera: str) -> str | None:
        """The sha256 of ``camera``'s bundle, None before the engines are open."""
        bundle = self.bundles.get(self.bundle_key(camera))
        return bundle.sha256 if bundle is not None else None

    def open(self) -> None:
        """Open every camera's bundle once, then load every bound recipe (one that cannot inspect is noted)."""
        for camera in self.config.cameras:
            key = self.bundle_key(camera)
            if key not in self.bundles:
                bundle = self.open_bundle(key)
                self.bundles[key] = bundle
                self.pipelines[key] = VisionPipeline(bundle)
                self.enrollers[key] = Enroller(self.store, bundle, self.pipelines[key])
        for b in self.config.recipes:
            with contextlib.suppress(RecipeError):
                self.load_recipe(b.camera, b.recipe)

    def open_bundle(self, path: Path) -> EngineBundle:
        """The bundle at ``path`` as the line runs it: at ``engines.precision``, every graph loaded
        with the engines section's backend options (``auto`` resolved on this machine, ONNX Runtime
        on the CPU with ``engines.threads`` threads)."""
        engines = self.config.engines
        return EngineBundle.open(path, backend=engines.bundle_options(), precision=engines.precision)

    # -- warm-up ---------------------------------------------------------------------------------
    def warm_up(self, batches: Sequence[int], before: Callable[[str], None] | None = None) -> list[WarmRun]:
        """Run each live recipe's engines once per batch shape; ``before(what)`` is called ahead of each run.

        Cameras sharing a bundle and a recipe share one warm-up. A run that fails is recorded with
        its error and does not stop the daemon: that camera's parts then get the engine's error as
        their ERROR verdict, as they would have anyway.
        """
        done: set[tuple[Path, str]] = set()
        runs: list[WarmRun] = []
        for camera in self.config.cameras:
            inspector, _, recipe = self.current(camera)
            key = self.bundle_key(camera)
            if inspector is None or recipe is None or (key, recipe) in done:
                continue
            done.add((key, recipe))
            for batch in batches:
                if before is not None:
                    before(f"warming up {recipe} on {key.name}, batch {batch}")
                runs.append(self._warm_once(inspector, key, recipe, batch))
        self.warmups = runs
        self.warmed.set()
        return runs

    @staticmethod
    def _warm_once(inspector: Inspector, key: Path, recipe: str, batch: int) -> WarmRun:
        """One micro-batch of ``batch`` grey frames down the line's own path (:func:`inspect_many`)."""
        image = warmup_image(inspector.recipe.roi, inspector.bundle.manifest.preprocess.size)
        t0 = time.perf_counter()
        error = None
        try:
            verdicts = inspect_many([(inspector, image, f"warm-up {i}") for i in range(batch)])
            error = next((v.reason or "ERROR" for v in verdicts if v.verdict == "ERROR"), None)
        except Exception as exc:  # any engine failure: recorded, the daemon still starts
            error = f"{type(exc).__name__}: {exc}"
        if error:
            log.warning("warm-up of %s on %s (batch %d) failed: %s", recipe, key, batch, error)
        ms = (time.perf_counter() - t0) * 1e3
        log.info("warm-up: %s on %s, batch %d: %.0f ms", recipe, key.name, batch, ms)
        return WarmRun(str(key), recipe, batch, ms, time.monotonic(), error)

    # -- recipes ---------------------------------------------------------------------------------
    def current(self, camera: str) -> tuple[Inspector | None, str | None, str | None]:
        """``(inspector, problem, recipe name)`` of the camera's slot, read together."""
        with self.lock:
            return self.inspectors.get(camera), self.recipe_problems.get(camera), self.recipe_names.get(camera)

    def load_recipe(self, camera: str, name: str) -> Inspector:
        """Make ``name`` the camera's recipe; a recipe that cannot go live leaves the camera answering ERROR."""
        with self.reloading(name):
            return self._load_recipe(camera, name)

    def _load_recipe(self, camera: str, name: str) -> Inspector:
        key = self.bundle_key(camera)
        binding = self.binding(camera)
        with self.lock:
            self.recipe_names[camera] = name
        stat, committed = None, None
        try:
            # Stat before reading: a commit landing in between shows as a change the watch re-checks.
            stat = self.recipe_stat(name)
            recipe = committed = self.store.load(name)
            if binding is not None and binding.roi is not None:
                recipe = replace(recipe, roi=binding.roi)
            inspector = Inspector(self.bundles[key], recipe, self.store, self.pipelines[key])
        except (RecipeError, ValueError, OSError) as exc:
            with self.lock:
                self.inspectors[camera] = None
                self.recipe_problems[camera] = str(exc)
                self.stamps[camera] = RecipeStamp(stat, committed)
            log.warning("camera %s: recipe %s cannot inspect: %s", camera, name, exc)
            raise RecipeError(str(exc)) from exc
        with self.lock:
            self.inspectors[camera] = inspector
            self.recipe_problems[camera] = None
            self.stamps[camera] = RecipeStamp(stat, committed)
        log.info("camera %s: recipe %s live (threshold %.4g)", camera, name, inspector.threshold)
        return inspector

    def switch_recipe(self, camera: str, name: str) -> str | None:
        """Make ``name`` the camera's recipe and announce it; return the previous recipe's name.

        A recipe that cannot inspect (not live, or a bank, head or ``recipe.json`` that fails its
        checks) is refused (:class:`RecipeError`, "cannot inspect: ...", naming the file) and the
        camera stays on it, answering every part ERROR with that reason, the status ``degraded``:
        the PLC switches because the parts changed, so judging the new parts by the previous
        recipe could pass them as OK (issue 12, rows 2 and 11). An unknown name changes nothing.
        Shared by ``cmd/recipe`` and the technician station so both switch the same way.
        """
        if not self.store.exists(name):
            raise RecipeError(f"unknown recipe '{name}'; recipes: {', '.join(self.store.names()) or 'none'}")
        previous = self.recipe_names.get(camera)
        try:
            self.load_recipe(camera, name)
        except RecipeError as exc:
            raise RecipeError(f"recipe '{name}' cannot inspect: {exc}") from None
        finally:
            # Refused or not, the camera's recipe changed: the retained status says which, and why.
            self.changed()
        return previous

    def reload_users(self, recipe: str, *, except_camera: str | None = None) -> None:
        """Cameras inspecting with ``recipe`` pick up its new bank, head and threshold
        (``except_camera``: one the caller has just loaded it on)."""
        with self.reloading(recipe):
            for camera, name in list(self.recipe_names.items()):
                if name == recipe and camera != except_camera:
                    # Not live any more: load_recipe leaves the camera answering ERROR and says why.
                    with contextlib.suppress(RecipeError):
                        self.load_recipe(camera, name)
        self.changed()

    @contextlib.contextmanager
    def reloading(self, recipe: str) -> Iterator[None]:
        """Mark ``recipe`` as being (re)loaded by the daemon itself while the block runs.

        The recipe watch leaves such a recipe alone: what the block commits, the block reloads.
        """
        with self.lock:
            self._reloading[recipe] = self._reloading.get(recipe, 0) + 1
        try:
            yield
        finally:
            with self.lock:
                left = self._reloading.pop(recipe) - 1
                if left:
                    self._reloading[recipe] = left

    def is_reloading(self, recipe: str) -> bool:
        """Whether the daemon is loading, reloading or rolling back ``recipe`` right now."""
        with self.lock:
            return recipe in self._reloading

    def recipe_stat(self, recipe: str) -> CommitStat | None:
        """The stat of ``recipe``'s ``recipe.json`` now (None when it has none)."""
        return commit_stat(self.store.folder(recipe) / "recipe.json")

    def used_recipes(self) -> list[str]:
        """The recipes the cameras are on, each once, sorted."""
        with self.lock:
            return sorted(set(self.recipe_names.values()))

    def keep_running(self, recipe: str) -> None:
        """``recipe`` was committed as a draft (a station enrollment step before Finish): the cameras
        on it keep what they run, and the recipe watch takes the new ``recipe.json`` as known."""
        stat = self.recipe_stat(recipe)
        self.restamp(list(self.stamps_of(recipe)), stat)

    def stamps_of(self, recipe: str) -> dict[str, RecipeStamp]:
        """Camera -> its :class:`RecipeStamp`, for every camera inspecting with ``recipe``."""
        with self.lock:
            return {c: self.stamps[c] for c, name in self.recipe_names.items() if name == recipe and c in self.stamps}

    def restamp(self, cameras: Sequence[str], stat: CommitStat | None) -> None:
        """``recipe.json`` was rewritten (or touched) with what these cameras run: note its new stat."""
        with self.lock:
            for camera in cameras:
                held = self.stamps.get(camera)
                if held is not None:
                    self.stamps[camera] = replace(held, stat=stat)

    def record_change(self, change: dict[str, Any]) -> None:
        """Add ``change`` to the recipe changes the status lists (``recipe_changes``)."""
        with self.lock:
            self.changes.append(change)

    def rollback(self, recipe: str, to_version: int | None = None, by: str | None = None) -> dict[str, Any]:
        """Roll ``recipe`` back (:meth:`RecipeStore.rollback`), reload the cameras using it, announce it.

        A refused rollback (no older version, a damaged kept one) changes nothing: RecipeError.
        """
        if not self.store.exists(recipe):
            raise RecipeError(f"unknown recipe '{recipe}'; recipes: {', '.join(self.store.names()) or 'none'}")
        with self.reloading(recipe):  # the rollback's own reload below, not the recipe watch's
            return self._rollback(recipe, to_version, by)

    def _rollback(self, recipe: str, to_version: int | None, by: str | None) -> dict[str, Any]:
        with self.store.writer(recipe):  # re-entrant: what was live and what is now, read under one lock
            was = self.store.load(recipe)
            live = self.store.rollback(recipe, to_version)
        cameras = sorted(c for c, name in list(self.recipe_names.items()) if name == recipe)
        change = {
            "recipe": recipe,
            "action": "rollback",
            "from": was.bank_version,
            "to": live.bank_version,
            "threshold": live.threshold.value if live.threshold else None,
            "cameras": cameras,
            "by": by,
            "at": now_iso(),
        }
        self.record_change(change)
        log.warning("recipe %s rolled back from v%d to v%d by %s", recipe, was.bank_version, live.bank_version, by)
        self.reload_users(recipe)  # reloads each camera on it, then republishes the status
        return change

    def changed(self) -> None:
        """Tell ``on_change`` (the daemon republishes its status)."""
        if self.on_change is not None:
            self.on_change()

    def refused(self) -> list[str]:
        """A problem line for every bound camera whose recipe cannot inspect."""
        with self.lock:
            refused = [(c, self.recipe_names.get(c), p) for c, p in self.recipe_problems.items() if p]
        return [f"camera {camera}: recipe {recipe} cannot inspect: {problem}" for camera, recipe, problem in refused]
