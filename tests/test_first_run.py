"""The first run on a fresh install: the commands that need the default bundle export it themselves.

A new user's first ``enroll`` must work without ``./edge demo`` or ``export vision`` first; a
runtime-only device (no torch) gets one line naming the export command; two first runs at once
export once and never leave a half bundle where the runtime looks.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from parts import good_part, write

from anomalygpt_edge.export import first_run
from anomalygpt_edge.runtime.cli import first_run as cli_first_run


def _goods(folder: Path, n: int = 4) -> Path:
    for i in range(n):
        write(folder / f"good_{i:02d}.png", good_part(i))
    return folder


def _cli(args: list[str], env: dict[str, str], cwd: Path, prelude: str = "") -> subprocess.CompletedProcess:
    """``anomalygpt-edge ARGS`` in a fresh interpreter (``prelude`` runs first, e.g. to hide torch)."""
    code = f"{prelude}\nimport sys\nfrom anomalygpt_edge.cli import main\nsys.exit(main({args!r}))"
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_first_enroll_exports_the_default_bundle_and_says_so_in_one_line(tmp_path: Path) -> None:
    bundle = tmp_path / "bundles" / "default"
    bundle.mkdir(parents=True)  # empty, as an installer might leave it
    env = {"ANOMALYGPT_EDGE_BUNDLE": str(bundle), "ANOMALYGPT_EDGE_STORE": str(tmp_path / "store")}
    goods = _goods(tmp_path / "goods")

    done = _cli(["enroll", "--recipe", "t", "--images", str(goods), "--json"], env, tmp_path)

    assert done.returncode == 0, done.stderr
    said = [ln for ln in done.stderr.splitlines() if ln.startswith("first run:")]
    assert said == [f"first run: exporting the embedded default engine bundle to {bundle} (once) ..."]
    assert (bundle / "manifest.json").is_file()
    result = json.loads(done.stdout)  # the export's own table stayed off stdout: the JSON parses
    assert result["recipe"] == "t" and result["k"] == 4 and result["live"]
    assert "[export] 5/5 steps (100%)" in done.stderr  # the steps' progress, plain lines: not a terminal
    assert "[enroll: encoding] 4/4 images (100%)" in done.stderr
    leftovers = sorted(p.name for p in bundle.parent.iterdir())
    assert leftovers == [".default.lock", "default"]  # no temporary folder left beside the bundle

    again = _cli(["enroll", "--recipe", "t", "--images", str(goods)], env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "first run" not in again.stderr  # once only


def test_runtime_only_install_fails_with_one_line_naming_the_export_command(tmp_path: Path) -> None:
    bundle = tmp_path / "bundles" / "default"
    env = {"ANOMALYGPT_EDGE_BUNDLE": str(bundle), "ANOMALYGPT_EDGE_STORE": str(tmp_path / "store")}
    goods = _goods(tmp_path / "goods", 2)

    done = _cli(
        ["enroll", "--recipe", "t", "--images", str(goods)], env, tmp_path, "import sys; sys.modules['torch'] = None"
    )

    assert done.returncode == 2
    lines = [ln for ln in done.stderr.splitlines() if not ln.startswith("[enroll: reading]")]
    assert len(lines) == 1, done.stderr
    assert f"anomalygpt-edge export vision --out {bundle}" in lines[0]
    assert "torch is not installed" in lines[0] and "Traceback" not in done.stderr
    assert "first run:" not in done.stderr  # nothing is announced that cannot happen
    assert not (bundle / "manifest.json").exists()


def test_the_daemon_on_a_runtime_only_device_names_the_export_command_before_it_starts(tmp_path: Path) -> None:
    bundle = tmp_path / "bundles" / "default"
    config = tmp_path / "line.yaml"
    config.write_text(
        "device: {id: line-1}\n"
        f"cameras: {{cam1: {{type: image_folder, source: {tmp_path}}}}}\n"
        "recipes: [{camera: cam1, recipe: t, trigger: free_run}]\n"
        f"engines: {{bundle: {bundle}}}\n"
        f"storage: {{store: {tmp_path / 'store'}, data: {tmp_path / 'state'}}}\n"
    )
    env = {"ANOMALYGPT_EDGE_BUNDLE": str(bundle)}

    done = _cli(["run", "--config", str(config)], env, tmp_path, "import sys; sys.modules['torch'] = None")

    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert f"anomalygpt-edge export vision --out {bundle}" in done.stderr


# --- the shared function, with a stand-in exporter (no torch work) ------------------------------------


class _FakeExporter:
    """What ``_load_exporter`` returns, writing a manifest only; counts exports and checks the lock is held."""

    def __init__(self, lock_path: Path, fail: bool = False):
        self.lock_path = lock_path
        self.fail = fail
        self.exports = 0
        self.lock_held: list[bool] = []

    def modules(self, path: Path) -> tuple[Any, Any, Any]:
        writer = argparse.Namespace(quiet_log=contextlib.nullcontext)
        vision = argparse.Namespace(run=self.run)
        return writer, vision, lambda out: argparse.Namespace(out=out)

    def run(self, args: argparse.Namespace) -> int:
        self.exports += 1
        self.lock_held.append(self._locked_elsewhere())
        if self.fail:
            raise KeyboardInterrupt  # an export interrupted half-way
        args.out.mkdir(parents=True)
        (args.out / "encoder.onnx").write_bytes(b"graph")
        (args.out / "manifest.json").write_text("{}")
        return 0

    def _locked_elsewhere(self) -> bool:
        fd = os.open(self.lock_path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


def test_two_first_runs_at_once_export_once_under_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tmp_path / "default"
    fake = _FakeExporter(tmp_path / ".default.lock")
    monkeypatch.setattr(first_run, "_load_exporter", fake.modules)
    start = threading.Barrier(2)
    results: list[Path] = []

    def first() -> None:
        start.wait(10)
        results.append(first_run.ensure_default_bundle(bundle, say=False))

    threads = [threading.Thread(target=first) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert results == [bundle, bundle]
    assert fake.exports == 1 and fake.lock_held == [True]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".default.lock", "default"]
    assert (bundle / "manifest.json").is_file()


def test_interrupted_first_run_leaves_no_half_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tmp_path / "default"
    monkeypatch.setattr(first_run, "_load_exporter", _FakeExporter(tmp_path / ".default.lock", fail=True).modules)

    with pytest.raises(KeyboardInterrupt):
        first_run.ensure_default_bundle(bundle, say=False)

    assert not bundle.exists()  # the next first run starts again from nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == [".default.lock"]


def test_a_folder_with_something_in_it_is_never_exported_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tmp_path / "default"
    bundle.mkdir()
    (bundle / "notes.txt").write_text("a user's file")
    fake = _FakeExporter(tmp_path / ".default.lock")
    monkeypatch.setattr(first_run, "_load_exporter", fake.modules)

    assert first_run.ensure_default_bundle(bundle) == bundle
    assert fake.exports == 0 and sorted(p.name for p in bundle.iterdir()) == ["notes.txt"]


def test_only_the_default_location_is_exported_by_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from anomalygpt_edge.runtime import defaults

    fake = _FakeExporter(tmp_path / ".default.lock")
    monkeypatch.setattr(first_run, "_load_exporter", fake.modules)
    monkeypatch.setattr(defaults, "DEFAULT_BUNDLE", tmp_path / "default")

    mine = tmp_path / "mine"
    assert cli_first_run.ready(mine) == mine and fake.exports == 0 and not mine.exists()
    assert cli_first_run.ready(None) == tmp_path / "default" and fake.exports == 1
    assert cli_first_run.is_default(tmp_path / "x" / ".." / "default")
