"""GGUF header validation with the ggml type tables of ``gguf.constants``: every type llama.cpp's
gguf package knows is accepted (Q8_1 was missing from the hand-copied table), an unknown one is
refused by id, and without the gguf package the check says so in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from anomalygpt_edge.engines.gguf_check import GGUFError, check_gguf, ggml_types  # noqa: E402


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, object]]) -> None:
    """A small GGUF; each tensor is (data, raw ggml type or None for numpy's own)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.name", "small")
    for name, (data, raw_dtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_type_table_is_the_gguf_packages_own() -> None:
    types = ggml_types()
    assert {tid for tid in types} == {int(t) for t in gguf.GGMLQuantizationType if t in gguf.GGML_QUANT_SIZES}
    for tid, (name, block, size) in types.items():
        t = gguf.GGMLQuantizationType(tid)
        assert name == t.name and (block, size) == gguf.GGML_QUANT_SIZES[t]
    assert types[9] == ("Q8_1", 32, 40)  # the type the copied table missed


def test_a_q8_1_tensor_is_accepted_with_its_block_size(tmp_path: Path) -> None:
    q8_1 = gguf.GGMLQuantizationType.Q8_1
    block, size = gguf.GGML_QUANT_SIZES[q8_1]
    rows, cols = 4, 2 * block  # two blocks per row
    raw = np.random.default_rng(0).integers(0, 255, (rows, cols // block * size), dtype=np.uint8)
    path = tmp_path / "q8_1.gguf"
    write_gguf(path, {"blk.0.w": (raw, q8_1), "norm.weight": (np.ones(cols, np.float32), None)})
    info = check_gguf(path)
    by_name = {t.name: t for t in info.tensors}
    assert by_name["blk.0.w"].type_name == "Q8_1"
    assert by_name["blk.0.w"].shape == (cols, rows) and by_name["blk.0.w"].nbytes == raw.nbytes
    assert by_name["norm.weight"].type_name == "F32"


def test_a_truncated_q8_1_tensor_is_refused_by_its_real_size(tmp_path: Path) -> None:
    q8_1 = gguf.GGMLQuantizationType.Q8_1
    block, size = gguf.GGML_QUANT_SIZES[q8_1]
    path = tmp_path / "cut.gguf"
    write_gguf(path, {"blk.0.w": (np.zeros((2, size), np.uint8), q8_1)})
    info = check_gguf(path)
    end = info.data_offset + info.tensors[0].offset + 2 * size
    path.write_bytes(path.read_bytes()[: end - 1])  # one byte short of the last Q8_1 block
    with pytest.raises(GGUFError, match=r"cut\.gguf: truncated or mismatched: tensor 'blk\.0\.w' \(Q8_1"):
        check_gguf(path)


def test_an_unknown_ggml_type_is_refused_by_id(tmp_path: Path) -> None:
    path = tmp_path / "odd.gguf"
    write_gguf(path, {"w": (np.ones(32, np.float32), None)})
    data = bytearray(path.read_bytes())
    # The tensor info's type field: after the name, rank (u32) and one dim (u64).
    at = data.index(b"w\x01\x00\x00\x00") + 1 + 4 + 8
    assert int.from_bytes(data[at : at + 4], "little") == int(gguf.GGMLQuantizationType.F32)
    data[at : at + 4] = (4242).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match=r"odd\.gguf: tensor 'w' has unknown ggml type 4242"):
        check_gguf(path)


def test_without_the_gguf_package_the_check_refuses_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    write_gguf(path, {"w": (np.ones(32, np.float32), None)})
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'gguf':
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from anomalygpt_edge.engines.gguf_check import GGUFError, check_gguf  # importing needs no gguf
try:
    check_gguf({str(path)!r})
except GGUFError as exc:
    print(exc)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert "\n" not in line
    assert line == f"{path}: cannot be checked: the gguf package is not installed: pip install 'anomalygpt-edge[llm]'"
