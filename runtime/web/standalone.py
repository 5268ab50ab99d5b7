"""A standalone station in one process: the line daemon with a null MQTT link, for a bench or a laptop.

There is one runtime. ``anomalygpt-edge web --config`` builds it from a daemon config
(``runtime/cli/station.py``); :class:`StandaloneStation` builds it from a recipe store, an engine
bundle and a few camera sources, for benches and tests that run a station in-process: the
daemon's own cameras, inspection workers, verdict ids (uuid7), archive and explanation worker,
with a :class:`~anomalygpt_edge.runtime.delivery.null_link.NullLink` instead of a broker.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomalygpt_edge.engines.bundle import EngineBundle
from anomalygpt_edge.runtime.delivery.null_link import NullLink
from anomalygpt_edge.runtime.line.config import DaemonConfig, RecipeBinding, parse_config
from anomalygpt_edge.runtime.line.daemon import Daemon
from anomalygpt_edge.runtime.recipes.store import RecipeStore
from anomalygpt_edge.runtime.web.daemon_station import DaemonStation
from anomalygpt_edge.runtime.web.station_protocol import StationError

#: No PLC waits on a bench: a verdict a slow laptop takes long over is late, not wrong, so the
#: bench's free-run inspections get a deadline far beyond any inspection time.
BENCH_DEADLINE_MS = 60_000.0


@dataclass(frozen=True)
class CameraSpec:
    """A frame source: ``kind`` is ``video_file``, ``image_folder`` or ``opencv`` (index, device or URL)."""

    name: str
    kind: str
    source: str
    fps: float = 10.0
    loop: bool = True

    def section(self) -> dict[str, Any]:
        """This camera as the daemon config's ``cameras.<name>`` section."""
        out: dict[str, Any] = {"type": self.kind, "source": self.source, "fps": self.fps}
        if self.kind in FILE_KINDS:
            out["loop"] = self.loop
        return out


#: Camera kinds that replay files (and so may loop).
FILE_KINDS = ("video_file", "image_folder")


def bench_binding(camera: str, recipe: str, inspect_fps: float) -> RecipeBinding:
    """A free-run binding at ``inspect_fps`` inspections per second, with the bench's deadline."""
    return RecipeBinding(camera=camera, recipe=recipe, fps=inspect_fps, deadline_ms=BENCH_DEADLINE_MS)


def bench_config(
    store: Path,
    bundle: EngineBundle,
    cameras: list[CameraSpec],
    bindings: dict[str, str],
    inspect_fps: float,
    data: Path,
) -> DaemonConfig:
    """A daemon config for a bench, validated like a config file: no ``mqtt:`` section, no spool
    (nothing to resend), no archive (history in memory)."""
    if not cameras:
        raise StationError("a standalone station needs at least one camera")
    text = {
        "device": {"id": "standalone"},
        "cameras": {c.name: c.section() for c in cameras},
        "recipes": [
            {"camera": cam, "recipe": recipe, "fps": inspect_fps, "deadline_ms": BENCH_DEADLINE_MS}
            for cam, recipe in bindings.items()
        ],
        # The bundle's backend with the options it was opened with. threads: its own, else 0, the
        # backend's default (every core), as a bench's enrollment wants; the line's one-thread
        # setting protects a PLC's deadlines, which a bench does not have.
        "engines": {
            "bundle": str(bundle.path),
            "backend": {**bundle.options.model_dump(exclude_unset=True), "type": bundle.backend},
            "threads": getattr(bundle.options, "threads", 0),
        },
        "storage": {"store": str(store), "data": str(data), "spool": False, "archive": False},
    }
    return parse_config(json.dumps(text), "<standalone station>")  # JSON is YAML


class StandaloneStation(DaemonStation):
    """A :class:`DaemonStation` over a daemon it runs itself, with a :class:`NullLink`.

    A camera bound in ``bindings`` inspects with that recipe; any other camera starts inspecting
    (free run, ``inspect_fps``) once a recipe is assigned to it, e.g. by finishing its enrollment.
    Call :meth:`start` before serving and :meth:`stop` after.
    """

    def __init__(
        self,
        store: RecipeStore,
        bundle: EngineBundle,
        cameras: list[CameraSpec],
        bindings: dict[str, str] | None = None,
        inspect_fps: float = 5.0,
    ):
        self._data = Path(tempfile.mkdtemp(prefix="anomalygpt-station-"))
        self.inspect_fps = inspect_fps
        config = bench_config(store.root, bundle, cameras, dict(bindings or {}), inspect_fps, self._data)
        super().__init__(Daemon(config, link=NullLink(config.device_id)))

    def start(self) -> StandaloneStation:
        """Start the daemon (engines, cameras, inspection workers)."""
        try:
            self.daemon.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the station's recorder, then the daemon; remove the daemon's scratch folder."""
        super().stop()
        self.daemon.stop()
        shutil.rmtree(self._data, ignore_errors=True)

    def assign(self, camera: str, recipe: str | None) -> dict[str, Any]:
        """As :meth:`DaemonStation.assign`; a camera without a binding gets a free-run one first."""
        self._check_camera(camera)
        if recipe is not None and self.daemon.binding(camera) is None:
            recipes = self.daemon.config.recipes
            if not isinstance(recipes, list):
                raise StationError(f"camera {camera} has no recipe binding in the daemon config")
            recipes.append(bench_binding(camera, recipe, self.inspect_fps))
        return super().assign(camera, recipe)
