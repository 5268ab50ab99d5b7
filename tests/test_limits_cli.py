"""CLI errors are one clear line naming the file and what is wrong (a truncated encoder.onnx, a
truncated or garbage manifest.json, a bad preprocess value, a schema from a newer exporter, a bad
config), from the one handler in cli.main; ``--debug`` shows the traceback."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from anomalygpt_edge.cli import error_line, is_expected_error, main


@pytest.fixture(scope="module")
def enrolled(default_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    images = root / "golden"
    images.mkdir()
    rng = np.random.default_rng(7)
    for i in range(3):
        cv2.imwrite(str(images / f"g{i}.png"), rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))
    store = root / "store"
    argv = ["enroll", "--recipe", "r", "--images", str(images), "--store", str(store)]
    assert main([*argv, "--bundle", str(default_bundle_dir), "--accept-flagged"]) in (0, 3)
    return {"store": store, "image": images / "g0.png", "bundle": default_bundle_dir, "root": root}


def _truncate_encoder(b: Path) -> None:
    data = (b / "encoder.onnx").read_bytes()
    (b / "encoder.onnx").write_bytes(data[:1000])


def _truncate_manifest(b: Path) -> None:
    text = (b / "manifest.json").read_text()
    (b / "manifest.json").write_text(text[: len(text) // 3])


def _garbage_manifest(b: Path) -> None:
    (b / "manifest.json").write_bytes(b"\x00\xffgarbage{")


def _edit_manifest(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(b: Path) -> None:
        m = json.loads((b / "manifest.json").read_text())
        edit(m)
        (b / "manifest.json").write_text(json.dumps(m))

    return apply


CASES = {
    "truncated-encoder": (_truncate_encoder, r"encoder\.onnx.*1000 bytes"),
    "truncated-manifest": (_truncate_manifest, r"manifest\.json: not valid JSON"),
    "garbage-manifest": (_garbage_manifest, r"manifest\.json"),
    "bad-preprocess": (_edit_manifest(lambda m: m["preprocess"].update(std=[0.5, 0.5, "x"])), r"manifest\.json"),
    "bad-interpolation": (_edit_manifest(lambda m: m["preprocess"].update(interpolation="fancy")), "interpolation"),
    "newer-schema": (_edit_manifest(lambda m: m.update(schema_version=99)), "newer exporter"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_inspect_with_a_broken_bundle_prints_one_line_naming_the_problem(
    enrolled: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    breaks, expected = CASES[case]
    bundle = tmp_path / "bundle"
    shutil.copytree(enrolled["bundle"], bundle)
    breaks(bundle)
    capsys.readouterr()
    argv = ["inspect", "--recipe", "r", "--store", str(enrolled["store"]), "--bundle", str(bundle)]
    code = main([*argv, str(enrolled["image"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err  # was 18-43 lines of traceback
    assert err[0].startswith("anomalygpt-edge inspect: error: ") and "Traceback" not in err[0]
    assert re.search(expected, err[0]), err[0]


def test_a_config_error_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "line.yaml"
    cfg.write_text(
        "device: {id: d}\ncameras: {c: {type: video_file, source: a}}\nrecipes: [{camera: c, recipe: r}]\n"
        "limits: {max_image_pixels: lots}\n"
    )
    quiet = subprocess.run(
        [sys.executable, "-m", "anomalygpt_edge", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert quiet.returncode == 2
    lines = quiet.stderr.strip().splitlines()
    assert len(lines) == 1 and "line.yaml:4: limits.max_image_pixels: must be an integer >= 1, got 'lots'" in lines[0]


def test_debug_shows_the_traceback_of_the_same_error(enrolled: dict[str, Path], tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(enrolled["bundle"], bundle)
    _truncate_encoder(bundle)
    args = [
        "inspect",
        "--recipe",
        "r",
        "--store",
        str(enrolled["store"]),
        "--bundle",
        str(bundle),
        str(enrolled["image"]),
    ]
    quiet = subprocess.run(
        [sys.executable, "-m", "anomalygpt_edge", *args], capture_output=True, text=True, timeout=120
    )
    assert quiet.returncode == 2 and len(quiet.stderr.strip().splitlines()) == 1, quiet.stderr
    loud = subprocess.run(
        [sys.executable, "-m", "anomalygpt_edge", "--debug", *args], capture_output=True, text=True, timeout=120
    )
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "BundleError" in loud.stderr


def test_only_the_products_own_errors_and_os_errors_are_shortened() -> None:
    from anomalygpt_edge.engines.bundle import BundleError
    from anomalygpt_edge.engines.preprocess import ImageError

    assert is_expected_error(BundleError("x")) and is_expected_error(ImageError("x"))
    assert is_expected_error(FileNotFoundError(2, "No such file or directory", "/data/x.npz"))
    assert not is_expected_error(KeyError("bug")) and not is_expected_error(TypeError("bug"))
    assert error_line(PermissionError(13, "Permission denied", "/data/spool.db")) == "/data/spool.db: Permission denied"
    assert error_line(ImageError("a\n  b")) == "a b"
