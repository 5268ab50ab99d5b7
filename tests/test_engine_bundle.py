"""The engine bundle: the runtime loads and runs it, and refuses every kind of damage clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anomalygpt_edge.engines import EngineBundle
from anomalygpt_edge.engines.base import EngineError, resolve_backend
from anomalygpt_edge.engines.bundle import BundleError


def test_manifest_describes_every_graph_and_preprocessing(default_bundle_dir: Path) -> None:
    bundle = EngineBundle.open(default_bundle_dir)
    m = bundle.manifest
    assert m.schema_version == 1
    assert set(m.graphs) == {"encoder", "bank_matcher"}
    enc = m.graphs["encoder"]
    assert enc.inputs[0].name == "pixel_values" and enc.inputs[0].shape == ("batch", 3, 256, 256)
    assert enc.outputs[0].shape == ("batch", 256, 112)
    assert m.graphs["bank_matcher"].input("bank_0").shape == ("bank", 112)
    assert m.preprocess.mean == (0.5, 0.5, 0.5) and m.preprocess.color == "RGB"
    assert m.source["checkpoints"][0]["sha256"]
    assert all(len(f.sha256) == 64 and f.size > 0 for f in m.files.values())
    assert enc.fp16_file == "encoder.fp16.onnx"


def test_bank_length_is_dynamic_so_enrolling_never_rebuilds_a_graph(default_bundle_dir: Path) -> None:
    bundle = EngineBundle.open(default_bundle_dir)
    matcher = bundle.engine("bank_matcher")
    q = np.random.default_rng(0).standard_normal((2, 256, 112)).astype(np.float32)
    for m in (1, 300, 5000):
        bank = np.random.default_rng(m).standard_normal((m, 112)).astype(np.float32)
        out = matcher.run({"q_0": q, "bank_0": bank})
        assert out["anomaly_map"].shape == (2, 1, 256, 256)
        assert out["patch_scores"].shape == (2, 256)


def test_bank_matcher_scores_zero_for_a_patch_in_the_bank(default_bundle_dir: Path) -> None:
    matcher = EngineBundle.open(default_bundle_dir).engine("bank_matcher")
    q = np.random.default_rng(1).standard_normal((1, 256, 112)).astype(np.float32)
    out = matcher.run({"q_0": q, "bank_0": q[0]})
    np.testing.assert_allclose(out["patch_scores"], 0.0, atol=2e-2)


def test_runtime_loads_and_runs_the_bundle_without_torch(default_bundle_dir: Path) -> None:
    # A child interpreter in which importing torch (or onnx) fails, as on a runtime-only device.
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'onnx'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import numpy as np
from anomalygpt_edge.engines import EngineBundle
b = EngineBundle.open({str(default_bundle_dir)!r})
x = np.zeros((1, 3, 256, 256), np.float32)
p = b.engine('encoder').run({{'pixel_values': x}})['patches_0']
m = b.engine('bank_matcher').run({{'q_0': p, 'bank_0': p[0]}})['anomaly_map']
assert 'torch' not in sys.modules
print('ok', p.shape, m.shape)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ok (1, 256, 112) (1, 1, 256, 256)" in result.stdout


def test_altered_graph_is_refused_naming_the_file(bundle_copy: Path) -> None:
    path = bundle_copy / "encoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="encoder.onnx.*sha256"):
        EngineBundle.open(bundle_copy)


def test_truncated_graph_is_refused_naming_the_file(bundle_copy: Path) -> None:
    path = bundle_copy / "bank_matcher.onnx"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(BundleError, match="bank_matcher.onnx.*truncated"):
        EngineBundle.open(bundle_copy)


def test_missing_graph_is_refused_naming_the_file(bundle_copy: Path) -> None:
    (bundle_copy / "encoder.fp16.onnx").unlink()
    with pytest.raises(BundleError, match="encoder.fp16.onnx.*missing"):
        EngineBundle.open(bundle_copy)


def test_missing_manifest_says_it_is_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="manifest.json is missing"):
        EngineBundle.open(tmp_path)


def test_newer_schema_asks_for_an_upgrade(bundle_copy: Path) -> None:
    path = bundle_copy / "manifest.json"
    data = json.loads(path.read_text())
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="newer exporter.*Upgrade"):
        EngineBundle.open(bundle_copy)


def test_older_schema_without_migration_asks_for_a_re_export(bundle_copy: Path) -> None:
    path = bundle_copy / "manifest.json"
    data = json.loads(path.read_text())
    data["schema_version"] = 0
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="re-export"):
        EngineBundle.open(bundle_copy)


def test_malformed_manifest_names_the_key(bundle_copy: Path) -> None:
    path = bundle_copy / "manifest.json"
    data = json.loads(path.read_text())
    del data["preprocess"]["mean"]
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="missing key 'mean'"):
        EngineBundle.open(bundle_copy)


def test_manifest_that_is_not_json_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        EngineBundle.open(bundle_copy)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.zeros((1, 3, 200, 256), np.float32), r"pixel_values' must have shape \(batch, 3, 256, 256\)"),
        (np.zeros((1, 3, 256, 256), np.float64), "pixel_values' must be float32, got float64"),
        (np.zeros((3, 256, 256), np.float32), "must have shape"),
        ([[0.0]], "must be a numpy array"),
    ],
)
def test_wrong_input_is_refused_naming_the_tensor(default_bundle_dir: Path, value, message: str) -> None:
    encoder = EngineBundle.open(default_bundle_dir).engine("encoder")
    with pytest.raises(EngineError, match=message):
        encoder.run({"pixel_values": value})


def test_missing_and_unexpected_inputs_are_listed(default_bundle_dir: Path) -> None:
    matcher = EngineBundle.open(default_bundle_dir).engine("bank_matcher")
    with pytest.raises(EngineError, match=r"missing \['bank_0'\].*unexpected \['bank'\]"):
        matcher.run({"q_0": np.zeros((1, 256, 112), np.float32), "bank": np.zeros((4, 112), np.float32)})


def test_unknown_backend_is_refused_with_the_known_ones() -> None:
    with pytest.raises(EngineError, match="unknown engine backend 'tpu'; known: .*onnxruntime"):
        resolve_backend("tpu")


def test_auto_backend_picks_an_installed_one() -> None:
    assert resolve_backend("auto") in ("onnxruntime", "onnxruntime-cuda", "tensorrt")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(colour="red"), "manifest.json: colour: unknown key"),
        (lambda d: d["preprocess"].update(resize="zoom"), "manifest.json: preprocess.resize: Input should be"),
        (lambda d: d["preprocess"].update(size=[256]), r"manifest.json: preprocess.size: too few values, got \[256\]"),
        (lambda d: d["graphs"]["encoder"].update(file=7), "manifest.json: graphs.encoder.file: Input should be"),
        (lambda d: d.update(schema_version="1"), "manifest.json: 'schema_version' must be int, got str"),
        (lambda d: d["files"].pop("encoder.onnx"), "graph 'encoder' refers to 'encoder.onnx', which is not listed"),
    ],
)
def test_a_malformed_manifest_is_refused_naming_the_key(default_bundle_dir: Path, edit, message: str) -> None:
    from anomalygpt_edge.engines.manifest import ManifestError, parse_manifest

    data = json.loads((default_bundle_dir / "manifest.json").read_text())
    assert parse_manifest(json.loads(json.dumps(data))).graphs["encoder"].file == "encoder.onnx"
    edit(data)
    with pytest.raises(ManifestError, match=message):
        parse_manifest(data)


def test_the_manifest_written_is_the_manifest_read(default_bundle_dir: Path) -> None:
    from anomalygpt_edge.engines.manifest import read_manifest

    manifest, raw = read_manifest(default_bundle_dir)
    assert manifest.dumps() == raw.decode()
