"""The encoder's CPU INT8 variant: export, manifest record, variant selection and the CPU-flag refusal.

A tiny bundle (two seeded random convolutions, 64x64 input) is built by hand so the quantizer runs
in seconds; synthetic parts (``runtime/tools/synthetic.py``) are its golden images.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from anomalygpt_edge.atomic_files import sha256_bytes, sha256_file
from anomalygpt_edge.cli import main
from anomalygpt_edge.engines import cpu_int8
from anomalygpt_edge.engines.base import TensorSpec
from anomalygpt_edge.engines.bundle import BundleError, EngineBundle
from anomalygpt_edge.engines.manifest import (
    FileEntry,
    GraphEntry,
    Manifest,
    ManifestError,
    PatchLayer,
    Preprocess,
    parse_manifest,
)
from anomalygpt_edge.engines.preprocess import preprocess
from anomalygpt_edge.runtime.tools.synthetic import render_part

VNNI = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
NO_VNNI = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n"
ARM_DOTPROD = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 asimddp\n"
ARM_PLAIN = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\n"
SIZE = 64


def _encoder_onnx(path: Path) -> None:
    """Two stride-2/4 convolutions with ReLU, seeded weights: (B, 3, 64, 64) -> patches (B, 64, 32)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((32, 16, 3, 3)) * 0.15).astype(np.float32)
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32) * 0.1, "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(rng.standard_normal(32).astype(np.float32) * 0.1, "b2"),
        numpy_helper.from_array(np.array([0, 32, -1], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["pixel_values", "w1", "b1"], ["c1"], strides=[4, 4], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Reshape", ["r2", "shape"], ["flat"]),
        helper.make_node("Transpose", ["flat"], ["patches_0"], perm=[0, 2, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_encoder",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("patches_0", TensorProto.FLOAT, ["batch", 64, 32])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _matcher_onnx(path: Path) -> None:
    """A stand-in bank matcher (the tests here never match): the query's first channel as the map."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("ReduceMax", ["q_0"], ["anomaly_map"], axes=[2], keepdims=0)]
    graph = helper.make_graph(
        nodes,
        "tiny_matcher",
        [
            helper.make_tensor_value_info("q_0", TensorProto.FLOAT, ["batch", 64, 32]),
            helper.make_tensor_value_info("bank_0", TensorProto.FLOAT, ["bank", 32]),
        ],
        [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["batch", 64])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _manifest(files: dict[str, FileEntry]) -> Manifest:
    spec_in = TensorSpec("pixel_values", ("batch", 3, SIZE, SIZE), "float32")
    spec_out = TensorSpec("patches_0", ("batch", 64, 32), "float32")
    spec_q = TensorSpec("q_0", ("batch", 64, 32), "float32")
    return Manifest(
        schema_version=1,
        source={"kind": "tiny-test"},
        exporter={"name": "tests"},
        created_at="2026-01-01T00:00:00Z",
        preprocess=Preprocess((SIZE, SIZE), "squash", "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
        patch_layers=[PatchLayer("patches_0", (8, 8), 32)],
        map_size=(SIZE, SIZE),
        graphs={
            "encoder": GraphEntry("encoder.onnx", [spec_in], [spec_out]),
            "bank_matcher": GraphEntry(
                "bank_matcher.onnx",
                [spec_q, TensorSpec("bank_0", ("bank", 32), "float32")],
                [TensorSpec("anomaly_map", ("batch", 64), "float32")],
            ),
        },
        files=files,
        matching={"metric": "cosine"},
    )


@pytest.fixture
def tiny_bundle(tmp_path: Path) -> Path:
    """A one-graph bundle whose manifest is in the canonical form (as the exporter writes it)."""
    out = tmp_path / "bundle"
    out.mkdir()
    _encoder_onnx(out / "encoder.onnx")
    _matcher_onnx(out / "bank_matcher.onnx")
    files = {
        n: FileEntry(n, sha256_file(out / n), (out / n).stat().st_size) for n in ("encoder.onnx", "bank_matcher.onnx")
    }
    (out / "manifest.json").write_text(_manifest(files).dumps())
    return out


@pytest.fixture
def parts(tmp_path: Path) -> Path:
    """Ten synthetic golden parts as PNG files."""
    folder = tmp_path / "golden"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(10):
        cv2.imwrite(str(folder / f"part{i:02d}.png"), render_part(rng))
    return folder


@pytest.fixture
def vnni_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This test's CPU has VNNI, whatever the machine running it has."""
    info = tmp_path / "cpuinfo"
    info.write_text(VNNI)
    monkeypatch.setattr(cpu_int8, "CPUINFO", info)


def _export(bundle: Path, parts: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["export", "int8", "--bundle", str(bundle), "--calib-images", str(parts)]) == 0
    return capsys.readouterr().out


def test_export_int8_writes_a_qdq_encoder_recorded_in_the_manifest(
    tiny_bundle: Path, parts: Path, vnni_cpu: None, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnx

    fp32_sha = sha256_bytes((tiny_bundle / "manifest.json").read_bytes())
    out = _export(tiny_bundle, parts, capsys)
    assert "INT8 vs FP32 on 2 held-out image(s)" in out and "encoder.int8.onnx" in out
    graph = onnx.load(str(tiny_bundle / "encoder.int8.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    weight_scales = [i for i in graph.initializer if i.name.startswith("w2") and "scale" in i.name]
    assert weight_scales and weight_scales[0].dims == [32]  # per output channel
    bundle = EngineBundle.open(tiny_bundle)  # the INT8 file's sha256 is verified like every other
    variant = bundle.manifest.int8
    assert variant is not None and variant.file == "encoder.int8.onnx" and variant.format == "qdq"
    assert variant.calibration["images"] == 8 and variant.calibration["held_out"] == 2
    assert "encoder.int8.onnx" in bundle.manifest.files
    # FP32 recipes stay valid; INT8 is another identity (its features differ).
    assert bundle.sha256 == fp32_sha
    assert EngineBundle.open(tiny_bundle, precision="int8").sha256 != fp32_sha


def test_export_int8_is_skipped_when_present_and_redone_with_force(
    tiny_bundle: Path, parts: Path, vnni_cpu: None, capsys: pytest.CaptureFixture[str]
) -> None:
    _export(tiny_bundle, parts, capsys)
    assert "already has encoder.int8.onnx" in _export(tiny_bundle, parts, capsys)
    args = ["export", "int8", "--bundle", str(tiny_bundle), "--calib-images", str(parts), "--force"]
    assert main(args) == 0
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["bank_matcher.onnx", "encoder.int8.onnx", "encoder.onnx"]


def test_the_int8_encoder_agrees_with_fp32_on_synthetic_parts(
    tiny_bundle: Path, parts: Path, vnni_cpu: None, capsys: pytest.CaptureFixture[str]
) -> None:
    _export(tiny_bundle, parts, capsys)
    fp32 = EngineBundle.open(tiny_bundle)
    int8 = EngineBundle.open(tiny_bundle, precision="int8")
    assert int8.engine("encoder").path.name == "encoder.int8.onnx"
    assert fp32.engine("encoder").path.name == "encoder.onnx"
    rng = np.random.default_rng(11)  # parts the calibration never saw, one defective
    images = [render_part(rng), render_part(rng, "scratch"), render_part(rng)]
    x = np.stack([preprocess(im, fp32.manifest.preprocess).pixel_values for im in images])
    ref = fp32.engine("encoder").run({"pixel_values": x})["patches_0"]
    got = int8.engine("encoder").run({"pixel_values": x})["patches_0"]
    assert got.shape == ref.shape and got.dtype == np.float32
    cosine = (ref * got).sum(-1) / np.maximum(np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1), 1e-12)
    assert cosine.mean() >= 0.99 and cosine.min() >= 0.95, (cosine.mean(), cosine.min())
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 0.1


def test_the_manifest_round_trips_with_and_without_the_int8_record(
    tiny_bundle: Path, parts: Path, vnni_cpu: None, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = json.loads((tiny_bundle / "manifest.json").read_text())
    assert "int8" not in plain  # bundles without the variant read and write as before
    assert parse_manifest(plain).dumps() == (tiny_bundle / "manifest.json").read_text()
    _export(tiny_bundle, parts, capsys)
    text = (tiny_bundle / "manifest.json").read_text()
    manifest = parse_manifest(json.loads(text))
    assert manifest.dumps() == text and manifest.int8 is not None and manifest.int8.version == 1
    assert manifest.without_int8().dumps() == json.dumps(plain, indent=2, sort_keys=True) + "\n"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["int8"].update(version=2), "int8: record version 2 was written by a newer exporter"),
        (lambda d: d["files"].pop("encoder.int8.onnx"), "int8 refers to 'encoder.int8.onnx', which is not listed"),
        (lambda d: d["int8"].update(format="qoperator"), "int8.format"),
    ],
)
def test_a_bad_int8_record_is_refused_naming_the_key(
    tiny_bundle: Path, parts: Path, vnni_cpu: None, capsys: pytest.CaptureFixture[str], edit, message: str
) -> None:
    _export(tiny_bundle, parts, capsys)
    data = json.loads((tiny_bundle / "manifest.json").read_text())
    edit(data)
    with pytest.raises(ManifestError, match=message):
        parse_manifest(data)


@pytest.mark.parametrize(
    ("cpuinfo", "flags"),
    [(VNNI, ["avx512_vnni"]), (ARM_DOTPROD, ["asimddp"]), (NO_VNNI, []), (ARM_PLAIN, [])],
)
def test_the_int8_flags_are_read_from_cpuinfo(cpuinfo: str, flags: list[str]) -> None:
    assert cpu_int8.int8_flags(cpuinfo) == flags
    assert (cpu_int8.why_not_int8(cpuinfo) is None) == bool(flags)


def test_int8_is_refused_with_one_line_on_a_cpu_without_vnni(
    tiny_bundle: Path, parts: Path, vnni_cpu: None, capsys: pytest.CaptureFixture[str], monkeypatch, tmp_path: Path
) -> None:
    _export(tiny_bundle, parts, capsys)
    old = tmp_path / "old-cpuinfo"
    old.write_text(NO_VNNI)
    monkeypatch.setattr(cpu_int8, "CPUINFO", old)
    with pytest.raises(BundleError) as info:
        EngineBundle.open(tiny_bundle, precision="int8")
    line = str(info.value)
    assert "\n" not in line and "avx512_vnni" in line and "asimddp" in line and "use fp32" in line
    assert EngineBundle.open(tiny_bundle).precision == "fp32"  # FP32 still opens on that CPU
    monkeypatch.setattr(cpu_int8, "CPUINFO", tmp_path / "missing")
    with pytest.raises(BundleError, match="cannot read the CPU's flags"):
        EngineBundle.open(tiny_bundle, precision="int8")


def test_int8_on_a_bundle_without_the_variant_names_the_command_that_adds_it(tiny_bundle: Path) -> None:
    with pytest.raises(BundleError, match=r"has no int8 encoder: run `anomalygpt-edge export int8 --bundle"):
        EngineBundle.open(tiny_bundle, precision="int8")
    with pytest.raises(BundleError, match="must be fp32 or int8, got 'fp16'"):
        EngineBundle.open(tiny_bundle, precision="fp16")


def test_engines_precision_in_the_line_config_and_the_precision_flags() -> None:
    import argparse

    from anomalygpt_edge.runtime.cli import parts as cli_parts
    from anomalygpt_edge.runtime.line.config import ConfigError, parse_config

    base = "device:\n  id: d\ncameras:\n  cam1:\n    type: video_file\n    source: a.avi\n"
    base += "recipes:\n  - camera: cam1\n    recipe: r\n"
    assert parse_config(base, "line.yaml").engines.precision == "fp32"
    assert parse_config(base + "engines:\n  precision: int8\n", "line.yaml").engines.precision == "int8"
    with pytest.raises(ConfigError, match="line.yaml:11: engines.precision"):
        parse_config(base + "engines:\n  precision: fp16\n", "line.yaml")
    parser = argparse.ArgumentParser()
    cli_parts.add_parser(parser.add_subparsers(dest="command"))
    for argv in (
        ["inspect", "--recipe", "r", "a.png", "--precision", "int8"],
        ["evaluate", "--data", "d", "--json", "o.json", "--precision", "int8"],
        ["bench", "vision", "--json", "o.json", "--precision", "int8"],
    ):
        assert parser.parse_args(argv).precision == "int8"


def test_the_line_loads_the_encoder_of_engines_precision_with_its_own_thread_count(
    tiny_bundle: Path, parts: Path, vnni_cpu: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from anomalygpt_edge.runtime.inspection.pipeline import VisionPipeline
    from anomalygpt_edge.runtime.line.config import parse_config
    from anomalygpt_edge.runtime.line.recipe_slots import RecipeSlots
    from anomalygpt_edge.runtime.recipes.store import RecipeStore

    _export(tiny_bundle, parts, capsys)
    base = "device:\n  id: d\ncameras:\n  cam1:\n    type: video_file\n    source: a.avi\n"
    base += "recipes:\n  - camera: cam1\n    recipe: r\nengines:\n  backend: onnxruntime\n  threads: 1\n"
    for precision, name in (("fp32", "encoder.onnx"), ("int8", "encoder.int8.onnx")):
        config = parse_config(base + f"  precision: {precision}\n", "line.yaml")
        slots = RecipeSlots(config, RecipeStore(tmp_path / "store"))
        pipeline = VisionPipeline(slots.open_bundle(tiny_bundle))
        assert pipeline.encoder.path.name == name
        assert pipeline.matcher.path.name == "bank_matcher.onnx"
        assert pipeline.encoder.session.get_session_options().intra_op_num_threads == 1
