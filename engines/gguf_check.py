"""Validate a GGUF file before llama.cpp parses it.

GGUF files are untrusted input (a model copied onto a line PC by hand, a half-finished download):
llama.cpp's own parser has had memory-safety bugs on crafted headers (CVE-2025-49847,
CVE-2026-33298). This module reads the header in pure Python with every count and length checked
against the bytes actually present, so a truncated, mismatched or hostile file is refused with an
error naming the file before any C code touches it. Only the ggml type tables (block sizes) come
from elsewhere: ``gguf.constants``, the llama.cpp project's own Python tables (the [llm] extra).

Layout (GGUF v2/v3, little endian): magic ``GGUF``, u32 version, u64 tensor count, u64 metadata
count, the metadata key/values, the tensor infos (name, dims, ggml type, offset), padding to the
alignment (``general.alignment``, default 32), then the tensor data.
"""

from __future__ import annotations

import functools
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomalygpt_edge.engines.base import EngineError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
#: Far above any real model (a 70B LLaMA has ~720 tensors) yet small enough to bound work.
MAX_TENSORS = 65_536
MAX_KV = 65_536
MAX_DIMS = 4
MAX_STRING = 64 << 20  # a chat template or one token: 64 MiB is already absurd
DEFAULT_ALIGNMENT = 32

#: How to get the ggml type tables when they are missing (a runtime-only device has no [llm] extra).
GGUF_MISSING = "the gguf package is not installed: pip install 'anomalygpt-edge[llm]'"


@functools.cache
def ggml_types() -> dict[int, tuple[str, int, int]]:
    """ggml type id -> (name, elements per block, bytes per block), from ``gguf.constants``.

    The tables come from the gguf package (kept by the llama.cpp project next to ggml's own type
    traits), so a type llama.cpp added (Q8_1, MXFP4 …) is known as soon as gguf is upgraded.
    Raises ImportError with one line (:data:`GGUF_MISSING`) when gguf is not installed.
    """
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        raise ImportError(GGUF_MISSING) from None
    return {int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}


def __getattr__(name: str) -> object:
    # GGML_TYPES stays importable by name, loaded on first use: importing this module needs no gguf.
    if name == "GGML_TYPES":
        return ggml_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Metadata value types: id -> struct format (None for string / array).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class GGUFError(EngineError):
    """The file is not a GGUF llama.cpp can safely read; the message names the file and the fault."""


@dataclass
class TensorInfo:
    """One tensor's header entry."""

    name: str
    shape: tuple[int, ...]  # GGUF order: fastest-varying dimension first
    type_name: str
    offset: int  # from the start of the data section
    nbytes: int


@dataclass
class GGUFInfo:
    """What the header says, after every check passed."""

    path: Path
    version: int
    file_size: int
    data_offset: int
    alignment: int
    metadata: dict[str, object] = field(default_factory=dict)  # arrays summarised as their length
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def architecture(self) -> str | None:
        """``general.architecture``, e.g. ``"llama"``."""
        v = self.metadata.get("general.architecture")
        return v if isinstance(v, str) else None


class _Reader:
    def __init__(self, buf: mmap.mmap | bytes, path: Path):
        self.buf = buf
        self.pos = 0
        self.size = len(buf)
        self.path = path

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"truncated or corrupt: {what} needs {n} bytes at offset {self.pos}, file has {self.size} bytes"
            )

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = int(self.unpack("Q", f"{what} length"))
        if n > MAX_STRING:
            raise self.fail(f"{what} claims a {n}-byte string (limit {MAX_STRING})")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not valid UTF-8") from exc

    def skip_string(self, what: str) -> None:
        n = int(self.unpack("Q", f"{what} length"))
        if n > MAX_STRING:
            raise self.fail(f"{what} claims a {n}-byte string (limit {MAX_STRING})")
        self.need(n, what)
        self.pos += n

    def value(self, vtype: int, what: str, depth: int = 0) -> object:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            if depth > 0:
                raise self.fail(f"{what}: nested arrays are not accepted")
            etype = int(self.unpack("I", f"{what} element type"))
            count = int(self.unpack("Q", f"{what} element count"))
            if etype in _SCALARS:
                # Fixed-size elements: check the whole array fits, then skip it in one step.
                n = count * struct.calcsize("<" + _SCALARS[etype])
                self.need(n, f"{what} ({count} elements)")
                self.pos += n
            elif etype == _STRING:
                # Every string costs at least its 8-byte length: bound count before looping.
                self.need(count * 8, f"{what} ({count} strings)")
                for i in range(count):
                    self.skip_string(f"{what}[{i}]")
            else:
                raise self.fail(f"{what}: unknown array element type {etype}")
            return count
        raise self.fail(f"{what}: unknown metadata value type {vtype}")


def check_gguf(path: Path | str) -> GGUFInfo:
    """Read and validate the header of the GGUF at ``path``; raise :class:`GGUFError` on any fault.

    Checks: magic, version, tensor and metadata counts (bounded and consistent with the file
    length), every string and array length, tensor ranks, dims and ggml types, unique tensor
    names, alignment, and that every tensor's data lies inside the file without overlapping
    another. Without the gguf package (no ggml type tables) it refuses with one line saying so.
    """
    path = Path(path)
    try:
        types = ggml_types()
    except ImportError as exc:
        raise GGUFError(f"{path}: cannot be checked: {exc}") from None
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise GGUFError(f"{path}: cannot read ({exc.strerror})") from exc
    if size < 24:
        raise GGUFError(f"{path}: truncated: {size} bytes is shorter than a GGUF header (24 bytes)")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _check(_Reader(buf, path), size, types)


def _header(r: _Reader, size: int) -> tuple[int, int, int]:
    """Magic and version; the tensor and metadata counts, bounded by the limits and the file size."""
    path = r.path
    magic = bytes(r.buf[0:4])
    if magic != MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
    r.pos = 4
    version = int(r.unpack("I", "version"))
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"{path}: unsupported GGUF version {version} (supported: {SUPPORTED_VERSIONS})")
    n_tensors = int(r.unpack("Q", "tensor count"))
    n_kv = int(r.unpack("Q", "metadata count"))
    # The smallest tensor info is 8+1 (name) + 4 (rank) + 8 (dim) + 4 (type) + 8 (offset) bytes and
    # the smallest KV 8+1 + 4 + 1: a count that cannot fit in the file is a lie, whatever the limit.
    if n_tensors > MAX_TENSORS:
        raise GGUFError(f"{path}: absurd tensor count {n_tensors} (limit {MAX_TENSORS})")
    if n_tensors * 33 > size:
        raise GGUFError(f"{path}: truncated or corrupt: {n_tensors} tensors cannot fit in {size} bytes")
    if n_kv > MAX_KV:
        raise GGUFError(f"{path}: absurd metadata count {n_kv} (limit {MAX_KV})")
    if n_kv * 14 > size:
        raise GGUFError(f"{path}: truncated or corrupt: {n_kv} metadata entries cannot fit in {size} bytes")
    return version, n_tensors, n_kv


def _metadata(r: _Reader, info: GGUFInfo, n_kv: int) -> None:
    """The key/values (arrays summarised as their length) and the alignment they declare."""
    for i in range(n_kv):
        key = r.string(f"metadata key #{i}")
        vtype = int(r.unpack("I", f"metadata '{key}' type"))
        if key in info.metadata:
            raise GGUFError(f"{r.path}: duplicate metadata key '{key}'")
        info.metadata[key] = r.value(vtype, f"metadata '{key}'")
    align = info.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1) or align > 1 << 20:
        raise GGUFError(f"{r.path}: general.alignment {align!r} is not a power of two")
    info.alignment = align


def _tensor(r: _Reader, i: int, size: int, align: int, types: dict[int, tuple[str, int, int]]) -> TensorInfo:
    """One tensor info: rank, dims, a known ggml type, whole blocks, a plausible size, aligned offset."""
    path = r.path
    name = r.string(f"tensor #{i} name")
    n_dims = int(r.unpack("I", f"tensor '{name}' rank"))
    if not 1 <= n_dims <= MAX_DIMS:
        raise GGUFError(f"{path}: tensor '{name}' has rank {n_dims} (1..{MAX_DIMS} allowed)")
    dims = tuple(int(r.unpack("Q", f"tensor '{name}' dim")) for _ in range(n_dims))
    ttype = int(r.unpack("I", f"tensor '{name}' type"))
    offset = int(r.unpack("Q", f"tensor '{name}' offset"))
    if ttype not in types:
        raise GGUFError(f"{path}: tensor '{name}' has unknown ggml type {ttype}")
    tname, block, bsize = types[ttype]
    if any(d == 0 for d in dims) or any(d > size * 8 for d in dims):
        raise GGUFError(f"{path}: tensor '{name}' has impossible shape {dims}")
    if dims[0] % block:
        raise GGUFError(f"{path}: tensor '{name}' row of {dims[0]} is not a multiple of the {tname} block {block}")
    n_el = 1
    for d in dims:
        n_el *= d
        if n_el > size * 8:  # even 1-bit weights cannot be this many in this file
            raise GGUFError(f"{path}: tensor '{name}' shape {dims} cannot fit in a {size}-byte file")
    if offset % align:
        raise GGUFError(f"{path}: tensor '{name}' offset {offset} is not aligned to {align}")
    return TensorInfo(name, dims, tname, offset, n_el // block * bsize)


def _data_layout(r: _Reader, info: GGUFInfo, size: int) -> None:
    """Every tensor's bytes lie inside the file after the padded header, none overlapping another."""
    path, align = r.path, info.alignment
    data_offset = (r.pos + align - 1) // align * align
    info.data_offset = data_offset
    if data_offset > size and info.tensors:
        raise GGUFError(
            f"{path}: truncated: header ends at {r.pos}, data would start at {data_offset}, file has {size} bytes"
        )
    end_prev, prev_name = 0, None
    for t in sorted(info.tensors, key=lambda t: t.offset):
        if t.offset < end_prev:
            raise GGUFError(f"{path}: tensors '{prev_name}' and '{t.name}' overlap")
        end = data_offset + t.offset + t.nbytes
        if end > size:
            raise GGUFError(
                f"{path}: truncated or mismatched: tensor '{t.name}' ({t.type_name} {t.shape}, "
                f"{t.nbytes} bytes "
                f"at data offset {t.offset}) ends at byte {end}, file has {size} bytes"
            )
        end_prev, prev_name = t.offset + t.nbytes, t.name


def _check(r: _Reader, size: int, types: dict[int, tuple[str, int, int]]) -> GGUFInfo:
    version, n_tensors, n_kv = _header(r, size)
    info = GGUFInfo(path=r.path, version=version, file_size=size, data_offset=0, alignment=DEFAULT_ALIGNMENT)
    _metadata(r, info, n_kv)
    names: set[str] = set()
    for i in range(n_tensors):
        tensor = _tensor(r, i, size, info.alignment, types)
        if tensor.name in names:
            raise GGUFError(f"{r.path}: duplicate tensor name '{tensor.name}'")
        names.add(tensor.name)
        info.tensors.append(tensor)
    _data_layout(r, info, size)
    return info
