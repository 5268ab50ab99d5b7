"""TensorRT engines: profiles, cache keys, engine records and refusals, FP16 graph typing, the CLI.

Everything here but the last section runs without TensorRT. The TensorRT-only tests build and
run real engines and skip with an explicit reason where ``tensorrt`` is not installed.
"""

# The fake cudart below mirrors cuda-python's camelCase names.
# ruff: noqa: N801, N802, N815

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from anomalygpt_edge.atomic_files import sha256_file
from anomalygpt_edge.engines import EngineBundle
from anomalygpt_edge.engines import tensorrt_backend as trt_backend
from anomalygpt_edge.engines.base import EngineError, resolve_backend
from anomalygpt_edge.engines.device_key import (
    ENGINES_NAME,
    DeviceKey,
    EngineKeyMismatchError,
    EngineRecordError,
    check_key,
    key_mismatches,
    normalise_gpu_name,
    read_engine_records,
    record_for,
    refusal_message,
    write_engine_record,
)
from anomalygpt_edge.engines.manifest import GraphEntry, TensorSpec
from anomalygpt_edge.export import onnx_tools
from anomalygpt_edge.export.tensorrt_build import (
    BuildError,
    ProfileShape,
    needs_rebuild,
    plan_name,
    profile_shapes,
    timing_cache_name,
)

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None
NO_TENSORRT = "tensorrt is not installed (TensorRT comes from JetPack or NVIDIA's index)"
needs_tensorrt = pytest.mark.skipif(not HAVE_TENSORRT, reason=NO_TENSORRT)

ORIN = DeviceKey("Orin", "8.7", "10.3.0", "a" * 64)


# --- optimisation profiles ---------------------------------------------------------------------


def test_encoder_profile_spans_batch_one_to_max_with_batch_one_optimal(default_bundle_dir: Path) -> None:
    entry = EngineBundle.open(default_bundle_dir).graph("encoder")
    shapes = profile_shapes(entry, max_batch=8)
    assert shapes == {"pixel_values": ProfileShape((1, 3, 256, 256), (1, 3, 256, 256), (8, 3, 256, 256))}


def test_bank_profile_is_counted_in_golden_images_of_patches(default_bundle_dir: Path) -> None:
    entry = EngineBundle.open(default_bundle_dir).graph("bank_matcher")
    shapes = profile_shapes(entry, max_batch=4, max_shots=32, opt_shots=4)
    # 256 patches per 256x256 image (16x16 grid) from q_0's fixed axis 1.
    assert shapes["q_0"] == ProfileShape((1, 256, 112), (1, 256, 112), (4, 256, 112))
    assert shapes["bank_0"] == ProfileShape((1, 112), (4 * 256, 112), (32 * 256, 112))


def test_bank_optimum_never_exceeds_the_maximum(default_bundle_dir: Path) -> None:
    entry = EngineBundle.open(default_bundle_dir).graph("bank_matcher")
    shapes = profile_shapes(entry, max_shots=2, opt_shots=4)
    assert shapes["bank_0"].opt == shapes["bank_0"].max == (2 * 256, 112)


def test_unknown_dynamic_axis_is_refused_by_name() -> None:
    entry = GraphEntry("x.onnx", [TensorSpec("tokens", ("batch", "seq"), "int64")], [])
    with pytest.raises(BuildError, match="'tokens' has dynamic axis 'seq'"):
        profile_shapes(entry)


@pytest.mark.parametrize(("max_batch", "opt_batch"), [(0, 1), (4, 5), (4, 0)])
def test_impossible_batch_ranges_are_refused(max_batch: int, opt_batch: int) -> None:
    entry = GraphEntry("x.onnx", [TensorSpec("x", ("batch", 3), "float32")], [])
    with pytest.raises(BuildError, match="opt batch"):
        profile_shapes(entry, max_batch=max_batch, opt_batch=opt_batch)


def test_runtime_names_the_rebuild_flag_for_shapes_outside_the_profile() -> None:
    profile = ((1, 256, 112), (4, 256, 112), (8, 256, 112))
    trt_backend.check_profile_shape("q_0", (8, 256, 112), profile)  # the max itself is fine
    with pytest.raises(EngineError, match=r"'q_0' axis 0 is 9, outside .*\[1, 8\].*--max-batch"):
        trt_backend.check_profile_shape("q_0", (9, 256, 112), profile)
    bank = ((1, 112), (1024, 112), (8192, 112))
    with pytest.raises(EngineError, match="--max-shots"):
        trt_backend.check_profile_shape("bank_0", (30000, 112), bank)
    with pytest.raises(EngineError, match="rank 2"):
        trt_backend.check_profile_shape("bank_0", (1, 2, 3), bank)


# --- device keys and refusals ------------------------------------------------------------------


def test_identical_keys_fit_and_every_differing_field_is_named() -> None:
    assert key_mismatches(ORIN, ORIN) == []
    other = DeviceKey("NVIDIA GeForce RTX 4090", "8.9", "10.8.0", "b" * 64)
    assert key_mismatches(ORIN, other) == ["GPU", "compute capability", "TensorRT version", "bundle"]
    upgraded = DeviceKey("Orin", "8.7", "10.7.0", "a" * 64)
    assert key_mismatches(ORIN, upgraded) == ["TensorRT version"]


def test_refusal_says_what_differs_and_how_to_rebuild(tmp_path: Path) -> None:
    current = DeviceKey("Orin", "8.7", "10.7.0", "a" * 64)
    msg = refusal_message("encoder.fp16.plan", ORIN, current, tmp_path)
    assert "encoder.fp16.plan" in msg and "TensorRT version differs" in msg
    assert "TensorRT 10.3.0" in msg and "TensorRT 10.7.0" in msg
    assert f"anomalygpt-edge export engines --bundle {tmp_path}" in msg
    assert "anomalygpt-edge-engines.service" in msg
    with pytest.raises(EngineKeyMismatchError, match="export engines"):
        check_key("encoder.fp16.plan", ORIN, current, tmp_path)
    check_key("encoder.fp16.plan", ORIN, ORIN, tmp_path)  # a match passes silently


def test_cuda_gpu_names_are_cleaned_of_padding() -> None:
    assert normalise_gpu_name(b"Orin\x00\x00\x00garbage") == "Orin"
    assert normalise_gpu_name("NVIDIA  H100 80GB HBM3 ") == "NVIDIA H100 80GB HBM3"


def test_key_round_trips_through_json_and_a_missing_field_is_named() -> None:
    assert DeviceKey.from_json(json.loads(json.dumps(ORIN.to_json()))) == ORIN
    data = ORIN.to_json()
    del data["tensorrt_version"]
    with pytest.raises(EngineRecordError, match="tensorrt_version"):
        DeviceKey.from_json(data)


def test_timing_cache_file_is_named_per_tensorrt_version_and_gpu() -> None:
    name = timing_cache_name(DeviceKey("NVIDIA GeForce RTX 4090", "8.9", "10.8.0", "b" * 64))
    assert name == "timing-cache.trt10.8.0.sm8.9.nvidia-geforce-rtx-4090.bin"
    assert plan_name("encoder", "fp16") == "encoder.fp16.plan"


# --- engine records beside the bundle ----------------------------------------------------------


def _fake_plan(bundle: Path, graph: str, key: DeviceKey, profiles: dict) -> dict:
    plan = bundle / plan_name(graph, "fp16")
    plan.write_bytes(b"not really a plan " + graph.encode())
    return {
        "graph": graph,
        "plan": plan.name,
        "plan_size": plan.stat().st_size,
        "plan_sha256": sha256_file(plan),
        "precision": "fp16",
        "key": key.to_json(),
        "profiles": {n: p.to_json() for n, p in profiles.items()},
    }


def test_engine_records_leave_the_manifest_and_the_bundle_identity_alone(bundle_copy: Path) -> None:
    before = EngineBundle.open(bundle_copy)
    manifest_bytes = (bundle_copy / "manifest.json").read_bytes()
    key = DeviceKey("Orin", "8.7", "10.3.0", before.sha256)
    for graph in ("encoder", "bank_matcher"):
        profiles = profile_shapes(before.graph(graph))
        write_engine_record(bundle_copy, graph, _fake_plan(bundle_copy, graph, key, profiles))
    after = EngineBundle.open(bundle_copy)  # extra files (plans, engines.json) are not bundle files
    assert (bundle_copy / "manifest.json").read_bytes() == manifest_bytes
    assert after.sha256 == before.sha256  # banks enrolled before the build stay valid
    records = read_engine_records(bundle_copy)
    assert set(records) == {"encoder", "bank_matcher"}  # the second write kept the first record
    assert records["encoder"]["key"]["bundle_sha256"] == before.sha256
    assert not list(bundle_copy.glob(f".{ENGINES_NAME}.*"))  # no temp file left behind


def test_records_in_engines_json_override_the_manifest_section(tmp_path: Path) -> None:
    write_engine_record(tmp_path, "encoder", {"plan": "new.plan"})
    records = read_engine_records(tmp_path, {"encoder": {"plan": "old.plan"}, "decoder": {"plan": "d.plan"}})
    assert records == {"encoder": {"plan": "new.plan"}, "decoder": {"plan": "d.plan"}}


def test_damaged_engines_json_is_an_error_not_a_silent_fallback(tmp_path: Path) -> None:
    (tmp_path / ENGINES_NAME).write_text("{half")
    with pytest.raises(EngineRecordError, match="not valid JSON.*export engines"):
        read_engine_records(tmp_path)
    (tmp_path / ENGINES_NAME).write_text('{"engines": []}')
    with pytest.raises(EngineRecordError, match="'engines' object"):
        read_engine_records(tmp_path)


def test_a_graph_without_an_engine_asks_for_a_build(tmp_path: Path) -> None:
    with pytest.raises(EngineRecordError, match=r"no TensorRT engine for graph 'decoder'.*export engines --bundle"):
        record_for({}, "decoder", tmp_path)
    with pytest.raises(EngineRecordError, match="lacks plan_sha256, plan_size"):
        record_for({"decoder": {"plan": "d.plan", "key": {}}}, "decoder", tmp_path)


def test_rebuild_is_skipped_only_for_an_intact_matching_engine(bundle_copy: Path) -> None:
    bundle = EngineBundle.open(bundle_copy)
    key = DeviceKey("Orin", "8.7", "10.3.0", bundle.sha256)
    profiles = profile_shapes(bundle.graph("encoder"))
    record = _fake_plan(bundle_copy, "encoder", key, profiles)
    assert needs_rebuild(None, key, "fp16", profiles, bundle_copy) == "not built yet"
    assert needs_rebuild(record, key, "fp16", profiles, bundle_copy) is None
    newer = DeviceKey("Orin", "8.7", "10.7.0", bundle.sha256)
    assert needs_rebuild(record, newer, "fp16", profiles, bundle_copy) == "built for another tensorrt version"
    assert "precision" in needs_rebuild(record, key, "int8", profiles, bundle_copy)
    bigger = profile_shapes(bundle.graph("encoder"), max_batch=16)
    assert needs_rebuild(record, key, "fp16", bigger, bundle_copy) == "optimisation profiles changed"
    calibrated = {**record, "precision": "int8", "calibration": {"images_sha256": "one", "method": "qdq"}}
    same = {"images_sha256": "one", "method": "qdq"}
    assert needs_rebuild(calibrated, key, "int8", profiles, bundle_copy, same) is None
    other = {"images_sha256": "two", "method": "qdq"}
    assert needs_rebuild(calibrated, key, "int8", profiles, bundle_copy, other) == "calibration changed (images_sha256)"
    plan = bundle_copy / record["plan"]
    plan.write_bytes(plan.read_bytes()[::-1])  # same size, other bytes
    assert needs_rebuild(record, key, "fp16", profiles, bundle_copy) == "plan file altered"
    plan.unlink()
    assert "missing" in needs_rebuild(record, key, "fp16", profiles, bundle_copy)


def test_tensorrt_backend_refuses_an_engine_built_for_another_gpu(
    bundle_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = EngineBundle.open(bundle_copy)
    built_for = DeviceKey("Orin", "8.7", "10.3.0", bundle.sha256)
    entry = bundle.graph("encoder")
    write_engine_record(bundle_copy, "encoder", _fake_plan(bundle_copy, "encoder", built_for, profile_shapes(entry)))
    # This "device" is a workstation GPU: the refusal must come before any plan is deserialised.
    here = DeviceKey("NVIDIA RTX A4000", "8.6", "10.3.0", bundle.sha256)
    monkeypatch.setattr(trt_backend, "current_key", lambda sha, device=0: here)
    with pytest.raises(EngineKeyMismatchError, match=r"GPU, compute capability differ.*Orin \(sm 8.7\)"):
        trt_backend.TensorRTEngine(bundle_copy / entry.fp16_file, entry.inputs, entry.outputs)


def test_tensorrt_backend_refuses_a_plan_altered_after_its_build(
    bundle_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = EngineBundle.open(bundle_copy)
    key = DeviceKey("Orin", "8.7", "10.3.0", bundle.sha256)
    entry = bundle.graph("encoder")
    record = _fake_plan(bundle_copy, "encoder", key, profile_shapes(entry))
    write_engine_record(bundle_copy, "encoder", record)
    (bundle_copy / record["plan"]).write_bytes(b"x" * record["plan_size"])
    monkeypatch.setattr(trt_backend, "current_key", lambda sha, device=0: key)
    with pytest.raises(EngineRecordError, match="does not match its record"):
        trt_backend.TensorRTEngine(bundle_copy / entry.file, entry.inputs, entry.outputs)


def test_engine_built_for_the_old_bundle_is_refused_after_a_re_export(
    bundle_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = EngineBundle.open(bundle_copy)
    entry = bundle.graph("encoder")
    stale = DeviceKey("Orin", "8.7", "10.3.0", "0" * 64)
    write_engine_record(bundle_copy, "encoder", _fake_plan(bundle_copy, "encoder", stale, profile_shapes(entry)))
    monkeypatch.setattr(trt_backend, "current_key", lambda sha, device=0: DeviceKey("Orin", "8.7", "10.3.0", sha))
    with pytest.raises(EngineKeyMismatchError, match="bundle differs"):
        trt_backend.TensorRTEngine(bundle_copy / entry.file, entry.inputs, entry.outputs)


def test_graph_files_map_to_their_graph(default_bundle_dir: Path) -> None:
    m = EngineBundle.open(default_bundle_dir).manifest
    assert trt_backend.graph_for_file(m, "encoder.fp16.onnx") == "encoder"
    assert trt_backend.graph_for_file(m, "bank_matcher.onnx") == "bank_matcher"
    assert trt_backend.graph_for_file(m, "encoder.int8.plan") == "encoder"
    with pytest.raises(EngineError, match="not a graph of this bundle"):
        trt_backend.graph_for_file(m, "other.onnx")


# --- FP16 graph typing (what strongly typed builds read precision from) ------------------------


@pytest.mark.parametrize("graph", ["encoder", "bank_matcher"])
def test_fp16_variant_declares_a_type_for_every_tensor(default_bundle_dir: Path, graph: str) -> None:
    entry = EngineBundle.open(default_bundle_dir).graph(graph)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(default_bundle_dir / entry.fp16_file)), strict_mode=True)
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({i.name: i.data_type for i in g.initializer})
    for node in g.node:
        if node.op_type == "Constant":
            continue
        for name in [*node.input, *node.output]:
            assert not name or types.get(name, 0) != 0, f"{graph}: tensor {name} of {node.op_type} has no type"
    assert {v.type.tensor_type.elem_type for v in [*g.input, *g.output]} == {onnx.TensorProto.FLOAT16}


@pytest.mark.parametrize("graph", ["encoder", "bank_matcher"])
def test_fp16_variant_keeps_overflow_prone_ops_in_fp32(default_bundle_dir: Path, graph: str) -> None:
    entry = EngineBundle.open(default_bundle_dir).graph(graph)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(default_bundle_dir / entry.fp16_file)))
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({i.name: i.data_type for i in g.initializer})
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    guarded = [n for n in g.node if n.op_type in onnx_tools.FP32_OPS]
    if graph == "bank_matcher":
        # The default bundle matches by cosine: the L2-norm reduction and the division stay fp32.
        assert {n.op_type for n in guarded} >= {"ReduceL2", "Div"}
    for node in guarded:
        for name in [*node.input, *node.output]:
            if name and types.get(name) in floats:
                assert types[name] == onnx.TensorProto.FLOAT, f"{node.op_type} {name} is not fp32"
    half = [n for n in g.node if n.op_type in ("Conv", "MatMul")]
    assert half and all(types.get(n.output[0]) == onnx.TensorProto.FLOAT16 for n in half)


# --- the command without TensorRT --------------------------------------------------------------


def _engines_args(bundle: Path, **kw) -> argparse.Namespace:
    base = dict(
        bundle=bundle,
        precision="fp16",
        calib_images=None,
        workspace_gb=1.0,
        max_batch=8,
        max_shots=32,
        force=False,
        int8_method="auto",
    )
    base.update(kw)
    return argparse.Namespace(**base)


def test_export_engines_is_a_registered_export_target() -> None:
    from anomalygpt_edge.cli import build_parser

    args = build_parser().parse_args(["export", "engines", "--bundle", "b", "--precision", "int8", "--max-batch", "4"])
    assert args.handler == "anomalygpt_edge.export.tensorrt_build:run"
    assert (args.precision, args.max_batch, args.workspace_gb, args.max_shots) == ("int8", 4, 1.0, 32)


@pytest.mark.skipif(HAVE_TENSORRT, reason="checks the message shown where TensorRT is absent")
def test_export_engines_without_tensorrt_says_where_tensorrt_comes_from(bundle_copy: Path) -> None:
    from anomalygpt_edge.cli import main

    with pytest.raises(SystemExit, match="TensorRT comes from JetPack or NVIDIA's index"):
        main(["export", "engines", "--bundle", str(bundle_copy)])
    assert not (bundle_copy / ENGINES_NAME).exists()


def test_int8_without_calibration_images_is_refused_before_anything_runs(bundle_copy: Path) -> None:
    from anomalygpt_edge.export import tensorrt_build

    with pytest.raises(SystemExit, match="--calib-images"):
        tensorrt_build.run(_engines_args(bundle_copy, precision="int8"))


def test_tensorrt_backend_is_registered_and_explains_why_it_is_unusable_here() -> None:
    if HAVE_TENSORRT:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(EngineError, match=r"'tensorrt' is not usable.*TensorRT comes from JetPack"):
        resolve_backend("tensorrt")


# --- INT8 through Q/DQ nodes (what strongly typed builds read INT8 from) -----------------------


def _golden_images(folder: Path, n: int = 6) -> list[Path]:
    """Textured "parts" with small variation, as a line's golden images look to the encoder."""
    import cv2

    folder.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:240, 0:320]
    for i in range(n):
        img = np.stack([127 + 60 * np.sin(xx / 17 + c + 0.1 * i) * np.cos(yy / 23) for c in range(3)], -1)
        cv2.imwrite(str(folder / f"{i:02d}.png"), np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8))
    return sorted(folder.iterdir())


def test_qdq_int8_encoder_is_symmetric_and_scores_like_fp32(default_bundle_dir: Path, tmp_path: Path) -> None:
    import onnxruntime as ort
    from onnx import numpy_helper

    from anomalygpt_edge.calibration import int8

    bundle = EngineBundle.open(default_bundle_dir)
    calib, held = int8.split_holdout(_golden_images(tmp_path / "golden"))
    images = int8.load_preprocessed(calib, bundle.manifest.preprocess)
    batches = int8.calibration_batches(images, 2)
    cache = int8.CalibrationCache(tmp_path / "encoder.int8.ranges.json")
    meta = {"images_sha256": int8.images_digest(calib), "batch_size": 2, "method": "qdq"}
    qdq = tmp_path / "encoder.int8.qdq.onnx"
    src = default_bundle_dir / bundle.graph("encoder").file
    assert int8.quantize_qdq(src, qdq, batches, "pixel_values", cache, meta) is False

    model = onnx.load(str(qdq))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    quant = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    source_convs = sum(n.op_type == "Conv" for n in onnx.load(str(src)).graph.node)
    # Every Conv of the encoder survives quantisation (33 for block 10, 45 with the head's block 14).
    assert len(quant) > 20 and source_convs >= 33 and sum(n.op_type == "Conv" for n in model.graph.node) == source_convs
    for node in quant:  # TensorRT takes symmetric INT8 only: zero points 0, int8
        zp = inits[node.input[2]]
        assert zp.dtype == np.int8 and not zp.any()

    fp32 = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    int8_sess = ort.InferenceSession(str(qdq), providers=["CPUExecutionProvider"])
    held_images = int8.load_preprocessed(held, bundle.manifest.preprocess)

    def encode(sess, xs) -> np.ndarray:
        return np.stack([sess.run(None, {"pixel_values": x[None]})[0][0] for x in xs])

    bank = encode(fp32, images).reshape(-1, 112)
    report = int8.compare_int8(encode(fp32, held_images), encode(int8_sess, held_images), bank, "l2")
    assert report.feature_cosine_mean > 0.99 and report.score_rel_diff_max < 0.05
    assert "INT8 vs FP32 on 1 held-out image(s)" in int8.format_report(report, [held[0].name], "FP32")


def test_qdq_calibration_ranges_are_reused_until_the_images_change(default_bundle_dir: Path, tmp_path: Path) -> None:
    import inspect

    from onnxruntime.quantization import quantize_static

    from anomalygpt_edge.calibration import int8

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        pytest.skip("this onnxruntime has no calibration cache (added in a later release)")
    bundle = EngineBundle.open(default_bundle_dir)
    images = int8.load_preprocessed(_golden_images(tmp_path / "golden", 3), bundle.manifest.preprocess)
    batches = int8.calibration_batches(images, 3)
    cache = int8.CalibrationCache(tmp_path / "ranges.json")
    src, dst = default_bundle_dir / "encoder.onnx", tmp_path / "q.onnx"
    meta = {"images_sha256": "one", "batch_size": 3}
    assert int8.quantize_qdq(src, dst, batches, "pixel_values", cache, meta) is False
    assert cache.path.is_file() and cache.meta_path.is_file()
    assert int8.quantize_qdq(src, dst, batches, "pixel_values", cache, meta) is True
    assert int8.quantize_qdq(src, dst, batches, "pixel_values", cache, {**meta, "images_sha256": "two"}) is False


@pytest.mark.parametrize(
    ("requested", "version", "method"),
    [("auto", "10.3.0", "calibrator"), ("auto", "11.4.0", "qdq"), ("qdq", "10.3.0", "qdq")],
)
def test_int8_method_follows_the_tensorrt_version(requested: str, version: str, method: str) -> None:
    from anomalygpt_edge.export.tensorrt_build import int8_method

    assert int8_method(requested, version) == method


def test_calibrator_is_refused_on_tensorrt_11() -> None:
    from anomalygpt_edge.export.tensorrt_build import int8_method

    with pytest.raises(BuildError, match="no calibrators; use qdq"):
        int8_method("calibrator", "11.0.0")


# --- with TensorRT (a Jetson or a GPU workstation) ---------------------------------------------


@needs_tensorrt
def test_built_engines_match_onnx_runtime_and_rebuilds_are_skipped(
    bundle_copy: Path,
) -> None:  # pragma: no cover
    from anomalygpt_edge.export import tensorrt_build

    assert tensorrt_build.run(_engines_args(bundle_copy, max_batch=2, max_shots=2)) == 0
    records = read_engine_records(bundle_copy)
    assert set(records) == {"encoder", "bank_matcher"}
    mtime = (bundle_copy / records["encoder"]["plan"]).stat().st_mtime_ns
    assert tensorrt_build.run(_engines_args(bundle_copy, max_batch=2, max_shots=2)) == 0
    assert (bundle_copy / records["encoder"]["plan"]).stat().st_mtime_ns == mtime  # up to date: not rebuilt

    ref = EngineBundle.open(bundle_copy, backend="onnxruntime")
    trt_bundle = EngineBundle.open(bundle_copy, backend="tensorrt")
    x = np.random.default_rng(0).standard_normal((1, 3, 256, 256)).astype(np.float32)
    want = ref.engine("encoder").run({"pixel_values": x})["patches_0"]
    got = trt_bundle.engine("encoder").run({"pixel_values": x})["patches_0"]  # FP16 engine, FP32 I/O
    assert got.dtype == np.float32
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()
    got2 = trt_bundle.engine("encoder").run({"pixel_values": x})["patches_0"]  # CUDA-graph replay
    np.testing.assert_array_equal(got, got2)
    with pytest.raises(EngineError, match="--max-batch"):
        trt_bundle.engine("encoder").run({"pixel_values": np.zeros((3, 3, 256, 256), np.float32)})


# --- the TensorRT runner's buffer and CUDA-graph logic, against a fake TensorRT + cudart ---------
#
# The fakes keep "device" memory in host RAM and run captured work when a graph is launched, so the
# runner's real code paths (pinned buffers, growth, capture, replay, recapture) run here.


class _FakeCudart:
    class cudaError_t:
        cudaSuccess = 0

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaStreamCaptureMode:
        cudaStreamCaptureModeThreadLocal = 1

    cudaStreamNonBlocking = 1

    def __init__(self) -> None:
        import ctypes

        self._ctypes = ctypes
        self.memory: dict[int, object] = {}
        self.allocations = self.frees = self.captures = self.launches = 0
        self.capturing: list | None = None
        self.devices: list[int] = []  # every cudaSetDevice, in order

    def _alloc(self, size: int) -> tuple[int, int]:
        buf = self._ctypes.create_string_buffer(size)
        addr = self._ctypes.addressof(buf)
        self.memory[addr] = buf
        self.allocations += 1
        return 0, addr

    cudaMallocHost = cudaMalloc = _alloc

    def cudaSetDevice(self, device: int) -> tuple[int]:
        self.devices.append(device)
        return (0,)

    def _free(self, ptr: int) -> tuple[int]:
        self.memory.pop(ptr)
        self.frees += 1
        return (0,)

    cudaFreeHost = cudaFree = _free

    def submit(self, op) -> None:
        if self.capturing is not None:
            self.capturing.append(op)
        else:
            op()

    def cudaMemcpyAsync(self, dst: int, src: int, n: int, kind: int, stream) -> tuple[int]:
        self.submit(lambda: self._ctypes.memmove(dst, src, n))
        return (0,)

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[int, str]:
        return 0, "stream"

    def cudaStreamSynchronize(self, stream) -> tuple[int]:
        return (0,)

    def cudaStreamBeginCapture(self, stream, mode) -> tuple[int]:
        self.capturing = []
        return (0,)

    def cudaStreamEndCapture(self, stream) -> tuple[int, list]:
        ops, self.capturing = self.capturing, None
        self.captures += 1
        return 0, ops

    def cudaGraphInstantiate(self, graph: list, flags: int) -> tuple[int, list]:
        return 0, list(graph)

    def cudaGraphLaunch(self, graph: list, stream) -> tuple[int]:
        self.launches += 1
        for op in graph:
            op()
        return (0,)

    def cudaGraphExecDestroy(self, g) -> tuple[int]:
        return (0,)

    cudaGraphDestroy = cudaStreamDestroy = cudaGraphExecDestroy


def _fake_tensorrt(cudart: _FakeCudart):
    """A TensorRT stand-in whose engine computes y = 2 * x (fp16, x: (batch, 64), batch 1..8)."""
    import ctypes
    import types

    def view(addr: int, shape: tuple) -> np.ndarray:
        n = int(np.prod(shape)) * 2
        return np.frombuffer((ctypes.c_uint8 * n).from_address(addr), np.uint8).view(np.float16).reshape(shape)

    class Context:
        def __init__(self) -> None:
            self.shape: tuple = ()
            self.addr: dict[str, int] = {}
            self.executions = 0

        def set_input_shape(self, name: str, shape: tuple) -> bool:
            self.shape = tuple(shape)
            return True

        def get_tensor_shape(self, name: str) -> tuple:
            return self.shape

        def set_tensor_address(self, name: str, addr: int) -> None:
            self.addr[name] = addr

        def execute_async_v3(self, stream) -> bool:
            x_addr, y_addr, shape = self.addr["x"], self.addr["y"], self.shape
            self.executions += 1

            def compute() -> None:
                view(y_addr, shape)[...] = view(x_addr, shape) * 2

            cudart.submit(compute)
            return True

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i: int) -> str:
            return "xy"[i]

        def get_tensor_mode(self, name: str) -> str:
            return "in" if name == "x" else "out"

        def get_tensor_dtype(self, name: str) -> type:
            return np.float16

        def get_tensor_profile_shape(self, name: str, profile: int) -> list:
            return [(1, 64), (1, 64), (8, 64)]

        def create_execution_context(self) -> Context:
            self.context = Context()
            return self.context

    class Runtime:
        def __init__(self, logger) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes):
            return Engine() if data == b"fake plan" else None

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            self.level = level

    return types.SimpleNamespace(
        Logger=Logger,
        Runtime=Runtime,
        TensorIOMode=types.SimpleNamespace(INPUT="in", OUTPUT="out"),
        nptype=lambda dtype: dtype,
        __version__="10.3.0",
    )


@pytest.fixture()
def fake_runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cudart = _FakeCudart()
    fake = _fake_tensorrt(cudart)
    monkeypatch.setattr(trt_backend, "cudart", cudart)
    monkeypatch.setattr(trt_backend, "_tensorrt", lambda: fake)
    plan = tmp_path / "y.fp16.plan"
    plan.write_bytes(b"fake plan")
    runner = trt_backend.PlanRunner(plan, cuda_graph=True)
    yield runner, cudart
    runner.close()


def test_batch_one_calls_are_captured_once_and_replayed_with_new_inputs(fake_runner) -> None:
    runner, cudart = fake_runner
    for value in (1.0, 3.0, -2.5):
        x = np.full((1, 64), value, np.float32)  # FP32 in: cast into the FP16 pinned buffer
        y = runner.run({"x": x})["y"]
        np.testing.assert_array_equal(y, np.full((1, 64), 2 * value, np.float16))
    assert cudart.captures == 1 and cudart.launches == 3
    # One uncaptured flush run before capture, one run recorded into the graph; replays reuse it.
    assert runner.engine.context.executions == 2


def test_larger_batches_run_eagerly_and_grow_buffers_that_are_then_reused(fake_runner) -> None:
    runner, cudart = fake_runner
    runner.run({"x": np.ones((1, 64), np.float16)})
    allocated = cudart.allocations
    y = runner.run({"x": np.arange(512, dtype=np.float16).reshape(8, 64)})["y"]
    np.testing.assert_array_equal(y, 2 * np.arange(512, dtype=np.float16).reshape(8, 64))
    assert cudart.allocations > allocated and cudart.frees > 0  # grown: old buffers freed
    grown = cudart.allocations
    runner.run({"x": np.ones((4, 64), np.float16)})  # smaller than the capacity: no allocation
    assert cudart.allocations == grown and cudart.captures == 1
    # The batch-1 graph held the freed addresses: it is captured again, and computes correctly.
    y1 = runner.run({"x": np.full((1, 64), 5, np.float16)})["y"]
    assert cudart.captures == 2
    np.testing.assert_array_equal(y1, np.full((1, 64), 10, np.float16))


def test_shapes_outside_the_profile_are_refused_before_anything_runs(fake_runner) -> None:
    runner, cudart = fake_runner
    with pytest.raises(EngineError, match="outside the engine's profile"):
        runner.run({"x": np.ones((9, 64), np.float16)})
    assert cudart.allocations == 0 and runner.engine.context.executions == 0


def test_a_plan_tensorrt_cannot_deserialise_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cudart = _FakeCudart()
    fake = _fake_tensorrt(cudart)
    monkeypatch.setattr(trt_backend, "cudart", cudart)
    monkeypatch.setattr(trt_backend, "_tensorrt", lambda: fake)
    plan = tmp_path / "other.plan"
    plan.write_bytes(b"from another TensorRT")
    with pytest.raises(EngineError, match="could not deserialise.*export engines"):
        trt_backend.PlanRunner(plan)


def test_an_engine_that_cannot_be_captured_falls_back_to_eager_runs(fake_runner, monkeypatch) -> None:
    runner, cudart = fake_runner

    def refuse(stream, mode) -> tuple[int]:
        return (900,)  # cudaErrorStreamCaptureUnsupported

    monkeypatch.setattr(cudart, "cudaStreamBeginCapture", refuse)
    monkeypatch.setattr(
        cudart, "cudaGetErrorName", lambda err: (0, b"cudaErrorStreamCaptureUnsupported"), raising=False
    )
    for value in (1.0, 2.0):
        y = runner.run({"x": np.full((1, 64), value, np.float16)})["y"]
        np.testing.assert_array_equal(y, np.full((1, 64), 2 * value, np.float16))
    assert not runner.use_cuda_graph and "CaptureUnsupported" in runner.capture_error
    assert cudart.launches == 0


# --- `export engines` end to end against a fake TensorRT builder -------------------------------


class _FakeBuilderTrt:
    """Records what the build asks TensorRT for; 'serialises' a plan naming its ONNX file."""

    __version__ = "10.3.0"

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 5

    class MemoryPoolType:
        WORKSPACE = "workspace"

    class BuilderFlag:
        INT8, FP16 = "int8", "fp16"

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            pass

    def __init__(self) -> None:
        import importlib.machinery

        self.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
        self.builds: list[dict] = []
        outer = self

        class Profile:
            def __init__(self) -> None:
                self.shapes: dict = {}

            def set_shape(self, name, lo, opt, hi) -> None:
                self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

        class Config:
            def __init__(self) -> None:
                self.build = {"profiles": [], "flags": []}

            def set_memory_pool_limit(self, pool, size) -> None:
                self.build["workspace"] = size

            def add_optimization_profile(self, profile) -> None:
                self.build["profiles"].append(profile.shapes)

            def create_timing_cache(self, data: bytes) -> bytes:
                self.build["timing_cache_in"] = data
                return data

            def set_timing_cache(self, cache, ignore_mismatch) -> None:
                pass

            def get_timing_cache(self):
                return type("Cache", (), {"serialize": lambda self: b"timing-cache-v1"})()

            def set_flag(self, flag) -> None:
                self.build["flags"].append(flag)

        class Network:
            def __init__(self, flags: int) -> None:
                self.flags = flags

        class Parser:
            def __init__(self, network, logger) -> None:
                self.network = network

            def parse_from_file(self, path: str) -> bool:
                self.network.onnx = Path(path).name
                return True

        class Builder:
            def __init__(self, logger) -> None:
                pass

            def create_network(self, flags: int) -> Network:
                return Network(flags)

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network, config) -> bytes:
                outer.builds.append({"onnx": network.onnx, "network_flags": network.flags, **config.build})
                return b"plan of " + network.onnx.encode()

        self.Builder, self.OnnxParser = Builder, Parser


def test_export_engines_builds_strongly_typed_fp16_plans_records_them_and_skips_when_current(
    bundle_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import sys

    from anomalygpt_edge.export import tensorrt_build

    fake = _FakeBuilderTrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_backend, "current_key", lambda sha, device=0: DeviceKey("Orin", "8.7", "10.3.0", sha))
    sha = EngineBundle.open(bundle_copy).sha256
    assert tensorrt_build.run(_engines_args(bundle_copy, max_batch=4)) == 0

    builds = {b["onnx"]: b for b in fake.builds}
    assert sorted(builds) == ["bank_matcher.fp16.onnx", "encoder.fp16.onnx"]
    for build in fake.builds:
        assert build["network_flags"] == 1 << 5  # STRONGLY_TYPED: precision from the FP16 graph
        assert build["flags"] == [] and build["workspace"] == 1 << 30
    encoder = {"pixel_values": ((1, 3, 256, 256), (1, 3, 256, 256), (4, 3, 256, 256))}
    assert builds["encoder.fp16.onnx"]["profiles"] == [encoder]
    bank = builds["bank_matcher.fp16.onnx"]["profiles"][0]["bank_0"]
    assert bank == ((1, 112), (4 * 256, 112), (32 * 256, 112))
    # The first build starts the timing cache; the next one reads what the first one saved.
    assert fake.builds[0]["timing_cache_in"] == b""
    assert fake.builds[1]["timing_cache_in"] == b"timing-cache-v1"
    records = read_engine_records(bundle_copy)
    assert records["encoder"]["plan"] == "encoder.fp16.plan" and records["encoder"]["key"]["bundle_sha256"] == sha
    assert (bundle_copy / "encoder.fp16.plan").read_bytes() == b"plan of encoder.fp16.onnx"
    out = capsys.readouterr()
    assert "built in" in out.out and "engines recorded in" in out.out and "[engines] encoder: building fp16" in out.err
    assert EngineBundle.open(bundle_copy).sha256 == sha  # the bundle's identity is untouched

    assert tensorrt_build.run(_engines_args(bundle_copy, max_batch=4)) == 0  # nothing changed
    assert len(fake.builds) == 2 and "up to date" in capsys.readouterr().out
    assert tensorrt_build.run(_engines_args(bundle_copy, max_batch=8)) == 0  # new profile: rebuild
    assert len(fake.builds) == 4


def test_export_engines_refuses_a_damaged_bundle_with_a_message(
    bundle_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from anomalygpt_edge.export import tensorrt_build

    monkeypatch.setitem(sys.modules, "tensorrt", _FakeBuilderTrt())
    (bundle_copy / "encoder.fp16.onnx").write_bytes(b"tampered")
    with pytest.raises(SystemExit, match=r"export engines: .*encoder.fp16.onnx"):
        tensorrt_build.run(_engines_args(bundle_copy))


class _FakeTrtWithRuntime(_FakeBuilderTrt):
    """Builder fake plus a runtime whose 'engine' runs the plan's ONNX file with ONNX Runtime."""

    class TensorIOMode:
        INPUT, OUTPUT = "in", "out"

    @staticmethod
    def nptype(dtype):
        return dtype

    def __init__(self, bundle_dir: Path, cudart: _FakeCudart) -> None:
        import ctypes

        import onnxruntime as ort

        super().__init__()

        def view(addr: int, shape: tuple, dtype) -> np.ndarray:
            n = int(np.prod(shape)) * np.dtype(dtype).itemsize
            raw = (ctypes.c_uint8 * n).from_address(addr)
            return np.frombuffer(raw, np.uint8).view(dtype).reshape(shape)

        class Context:
            def __init__(self, engine) -> None:
                self.engine, self.shapes, self.addr = engine, {}, {}

            def set_input_shape(self, name, shape) -> bool:
                self.shapes[name] = tuple(shape)
                return True

            def get_tensor_shape(self, name):
                batch = next(iter(self.shapes.values()))[0]
                return tuple(batch if isinstance(d, str) else d for d in self.engine.shape[name])

            def set_tensor_address(self, name, addr) -> None:
                self.addr[name] = addr

            def execute_async_v3(self, stream) -> bool:
                eng, addr, shapes = self.engine, dict(self.addr), dict(self.shapes)
                outs = {n: self.get_tensor_shape(n) for n in eng.outputs}

                def compute() -> None:
                    feeds = {n: view(addr[n], shapes[n], eng.dtype[n]).copy() for n in eng.inputs}
                    for n, v in zip(eng.outputs, eng.session.run(eng.outputs, feeds), strict=True):
                        view(addr[n], outs[n], eng.dtype[n])[...] = v

                cudart.submit(compute)
                return True

        class Engine:
            def __init__(self, onnx_file: str) -> None:
                self.session = ort.InferenceSession(str(bundle_dir / onnx_file), providers=["CPUExecutionProvider"])
                ios = [*self.session.get_inputs(), *self.session.get_outputs()]
                self.inputs = [i.name for i in self.session.get_inputs()]
                self.outputs = [o.name for o in self.session.get_outputs()]
                self.shape = {i.name: i.shape for i in ios}
                self.dtype = {i.name: np.float16 if "16" in i.type else np.float32 for i in ios}
                self.num_io_tensors = len(ios)

            def get_tensor_name(self, i: int) -> str:
                return [*self.inputs, *self.outputs][i]

            def get_tensor_mode(self, name: str) -> str:
                return "in" if name in self.inputs else "out"

            def get_tensor_dtype(self, name: str):
                return self.dtype[name]

            def get_tensor_profile_shape(self, name: str, profile: int) -> list:
                dims = self.shape[name]
                return [tuple(b if isinstance(d, str) else d for d in dims) for b in (1, 1, 8)]

            def create_execution_context(self) -> Context:
                return Context(self)

        class Runtime:
            def __init__(self, logger) -> None:
                pass

            def deserialize_cuda_engine(self, data: bytes):
                return Engine(data.decode().removeprefix("plan of "))

        self.Runtime = Runtime


def _install_fake_tensorrt(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[_FakeTrtWithRuntime, _FakeCudart]:
    """The fake TensorRT (builder and runtime) and CUDA runtime, installed where the backend and the
    exporter import them from."""
    import sys

    cudart = _FakeCudart()
    fake = _FakeTrtWithRuntime(bundle, cudart)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_backend, "cudart", cudart)
    monkeypatch.setattr(trt_backend, "_tensorrt", lambda: fake)
    return fake, cudart


def test_export_engines_int8_qdq_builds_both_engines_and_reports_accuracy_on_held_out_images(
    bundle_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from anomalygpt_edge.export import tensorrt_build

    fake, _ = _install_fake_tensorrt(bundle_copy, monkeypatch)
    monkeypatch.setattr(trt_backend, "current_key", lambda sha, device=0: DeviceKey("Orin", "8.7", "10.3.0", sha))
    golden = tmp_path / "golden"
    _golden_images(golden, 5)
    args = _engines_args(bundle_copy, precision="int8", calib_images=golden, int8_method="qdq", max_batch=2)
    assert tensorrt_build.run(args) == 0

    builds = {b["onnx"]: b for b in fake.builds}
    assert set(builds) == {"encoder.fp16.onnx", "encoder.int8.qdq.onnx", "bank_matcher.fp16.onnx"}
    q = builds["encoder.int8.qdq.onnx"]
    assert q["network_flags"] == 0 and q["flags"] == ["int8", "fp16"]  # TensorRT 10: Q/DQ + FP16 elsewhere
    record = read_engine_records(bundle_copy)["encoder"]
    assert record["precision"] == "int8" and record["plan"] == "encoder.int8.plan"
    assert record["calibration"]["method"] == "qdq" and record["calibration"]["held_out"] == 1
    out = capsys.readouterr().out
    assert "INT8 vs FP16 on 1 held-out image(s)" in out and "04.png" in out and "verdict:" in out

    assert tensorrt_build.run(args) == 0  # same images and method: nothing to rebuild
    assert len(fake.builds) == 3


def test_cameras_sharing_one_engine_get_their_own_results(fake_runner) -> None:
    from concurrent.futures import ThreadPoolExecutor

    runner, _ = fake_runner

    def infer(value: int) -> bool:
        y = runner.run({"x": np.full((1 + value % 3, 64), value, np.float16)})["y"]
        return bool((y == 2 * value).all()) and y.shape[0] == 1 + value % 3

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(infer, range(40)))


def test_tensorrt_options_reach_the_engine_and_its_runner_keeps_to_its_gpu(
    bundle_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomalygpt_edge.engines.base import backend_options
    from anomalygpt_edge.export import tensorrt_build

    _, cudart = _install_fake_tensorrt(bundle_copy, monkeypatch)
    probed: list[int] = []

    def key(sha: str, device: int = 0) -> DeviceKey:
        probed.append(device)
        return DeviceKey("Orin", "8.7", "10.3.0", sha)

    monkeypatch.setattr(trt_backend, "current_key", key)
    monkeypatch.setattr(trt_backend.TensorRTEngine, "why_not", classmethod(lambda cls: None))
    assert tensorrt_build.run(_engines_args(bundle_copy, max_batch=2)) == 0
    probed.clear()

    options = backend_options({"type": "tensorrt", "device_id": 1, "cuda_graph": False})
    encoder = EngineBundle.open(bundle_copy, backend=options).engine("encoder")
    assert probed == [1], "the engine's key is checked against the GPU that runs it"
    assert encoder.runner.device == 1 and not encoder.runner.use_cuda_graph
    cudart.devices.clear()
    encoder.run({"pixel_values": np.zeros((1, 3, 256, 256), np.float32)})
    assert cudart.devices == [1] and cudart.launches == 0, "each run sets its GPU (workers are other threads)"
