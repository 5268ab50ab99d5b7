"""BundleWriter: writes an engine bundle (graphs, data files, manifest.json) all-or-nothing.

Everything goes into a temporary sibling folder first; only a complete, verified bundle is renamed
into place, so an interrupted export never leaves a half bundle where the runtime looks for one.
Each step is logged with its size and time, and :meth:`BundleWriter.report` prints the table that
ends the export command (the Ultralytics exporter's habit).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import anomalygpt_edge
from anomalygpt_edge.atomic_files import sha256_file
from anomalygpt_edge.engines.bundle import EngineBundle
from anomalygpt_edge.engines.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    FileEntry,
    GraphEntry,
    Manifest,
    PatchLayer,
    Preprocess,
    parse_manifest,
)
from anomalygpt_edge.export import onnx_tools
from anomalygpt_edge.progress import Progress
from anomalygpt_edge.progress import note as progress_note


@dataclass
class WrittenFile:
    path: str
    size: int
    seconds: float
    note: str


#: False inside :func:`quiet_log`: the step lines are left out (the progress bar of the steps stays).
_LOG_ON: contextvars.ContextVar[bool] = contextvars.ContextVar("export_log", default=True)


def log(message: str) -> None:
    """Progress line on stderr (stdout stays for tables and JSON), above the steps' bar if one is open."""
    if _LOG_ON.get():
        progress_note(f"[export] {message}", sys.stderr)


@contextlib.contextmanager
def quiet_log() -> Iterator[None]:
    """No ``[export]`` lines while inside (a first run's export says one line of its own instead)."""
    token = _LOG_ON.set(False)
    try:
        yield
    finally:
        _LOG_ON.reset(token)


def human_size(n: int) -> str:
    """``n`` bytes in B, KB, MB or GB (multiples of 1024), as the export log prints sizes."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


class BundleWriter:
    """Collects graphs and files for one bundle, then writes the manifest and moves it into place."""

    def __init__(self, out_dir: Path, overwrite: bool = False, steps: int | None = None):
        """``steps``: how many graphs, fp16 conversions and files plus one (the finish) the export will write,
        for the progress bar's count and ETA (None: counted without a total)."""
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise FileExistsError(f"{self.out_dir} already exists; pass --overwrite to replace it")
        self.tmp_dir = self.out_dir.with_name(f".{self.out_dir.name}.partial")
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True)
        self.graphs: dict[str, GraphEntry] = {}
        self.written: list[WrittenFile] = []
        self.started = time.perf_counter()
        self.progress = Progress(steps, "export", "step")

    def add_graph(
        self,
        name: str,
        module: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        output_names: list[str],
        dynamic_axes: dict[str, dict[int, str]],
        fp16: bool = True,
    ) -> GraphEntry:
        """Export ``module`` as ``<name>.onnx`` (and ``<name>.fp16.onnx``) into the bundle."""
        path = self.tmp_dir / f"{name}.onnx"
        log(f"exporting {name} ...")
        t0 = time.perf_counter()
        onnx_tools.export_onnx(module, inputs, output_names, path, dynamic_axes)
        ext = onnx_tools.external_data_files(path)
        self._record(path.name, time.perf_counter() - t0, "ONNX fp32", ext)
        self.progress.update(1, name)
        fp16_file, fp16_ext = None, []
        if fp16:
            half = self.tmp_dir / f"{name}.fp16.onnx"
            log(f"converting {name} to fp16 ...")
            t0 = time.perf_counter()
            onnx_tools.to_fp16(path, half)
            fp16_file, fp16_ext = half.name, onnx_tools.external_data_files(half)
            self._record(half.name, time.perf_counter() - t0, "ONNX fp16", fp16_ext)
            self.progress.update(1, f"{name} fp16")
        ins, outs = onnx_tools.graph_signature(path)
        entry = GraphEntry(path.name, ins, outs, ext, fp16_file, fp16_ext)
        self.graphs[name] = entry
        return entry

    def add_file(self, name: str, writer, note: str) -> Path:
        """Write a data file with ``writer(path)`` into the bundle."""
        path = self.tmp_dir / name
        t0 = time.perf_counter()
        writer(path)
        self._record(name, time.perf_counter() - t0, note, [])
        self.progress.update(1, name)
        return path

    def _record(self, name: str, seconds: float, note: str, external: list[str]) -> None:
        for f in [name, *external]:
            size = (self.tmp_dir / f).stat().st_size
            self.written.append(
                WrittenFile(f, size, seconds if f == name else 0.0, note if f == name else "external data")
            )
            log(f"wrote {f} ({human_size(size)}, {seconds:.1f} s)")

    def finish(
        self,
        source: dict[str, Any],
        preprocess: Preprocess,
        patch_layers: list[PatchLayer],
        map_size: tuple[int, int],
        matching: dict[str, Any],
        text_features: dict[str, Any] | None = None,
        llm: dict[str, Any] | None = None,
        head_layers: list[PatchLayer] | None = None,
    ) -> EngineBundle:
        """Hash every file, write the manifest, verify the bundle loads, move it into place."""
        log("hashing files ...")
        files = {w.path: FileEntry(w.path, sha256_file(self.tmp_dir / w.path), w.size) for w in self.written}
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            source=source,
            exporter={
                "name": "anomalygpt-edge",
                "version": anomalygpt_edge.__version__,
                "torch": torch.__version__,
                "onnx_opset": onnx_tools.OPSET,
            },
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            preprocess=preprocess,
            patch_layers=patch_layers,
            map_size=map_size,
            graphs=self.graphs,
            files=files,
            matching=matching,
            head_layers=list(head_layers or []),
            text_features=text_features,
            llm=llm,
        )
        text = manifest.dumps()
        parse_manifest(json.loads(text))  # what we write must be what we read
        (self.tmp_dir / MANIFEST_NAME).write_text(text)
        self.written.append(WrittenFile(MANIFEST_NAME, len(text.encode()), 0.0, "manifest"))
        EngineBundle.open(self.tmp_dir, verify=False)
        if self.out_dir.exists():
            old = self.out_dir.with_name(f".{self.out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            self.out_dir.rename(old)
            self.tmp_dir.rename(self.out_dir)
            shutil.rmtree(old)
        else:
            self.tmp_dir.rename(self.out_dir)
        self.progress.update(1, "manifest")
        self.progress.close()
        return EngineBundle.open(self.out_dir, verify=False)

    def abort(self) -> None:
        self.progress.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def report(self) -> str:
        """The closing table: every file written, its size and the time it took."""
        rows = [("file", "size", "time", "what")]
        rows += [(w.path, human_size(w.size), f"{w.seconds:.1f} s", w.note) for w in self.written]
        total = sum(w.size for w in self.written)
        rows.append(("total", human_size(total), f"{time.perf_counter() - self.started:.1f} s", str(self.out_dir)))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)
