"""Validate a GGUF file before llama.cpp parses it.

GGUF files are untrusted input (a model copied onto a line PC by hand, a half-finished download):
llama.cpp's own parser has had memory-safety bugs on crafted headers (CVE-2025-49847,
CVE-2026-33298). This module reads the header in pure Python with every count and length checked
against the bytes actually present, so a truncated, mismatched or hostile file is refused with an
error naming the file before any C code touches it.

Layout (GGUF v2/v3, little endian): magic ``GGUF``, u32 version, u64 tensor count, u64 metadata
count, the metadata key/values, the tensor infos (name, dims, ggml type, offset), padding to the
alignment (``general.alignment``, default 32), then the tensor data.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from anomalygpt_edge.engines.base import EngineError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
#: Far above any real model (a 70B LLaMA has ~720 tensors) yet small enough to bound work.
MAX_TENSORS = 65_536
MAX_KV = 65_536
MAX_DIMS = 4
MAX_STRING = 64 << 20  # a chat template or one token: 64 MiB is already absurd
DEFAULT_ALIGNMENT = 32

#: ggml type id -> (name, elements per block, bytes per block); mirrors ggml's type traits.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

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

    def unpack(self, fmt: str, what: str) -> object:
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
    another.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise GGUFError(f"{path}: cannot read ({exc.strerror})") from exc
    if size < 24:
        raise GGUFError(f"{path}: truncated: {size} bytes is shorter than a GGUF header (24 bytes)")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _check(_Reader(buf, path), path, size)


def _check(r: _Reader, path: Path, size: int) -> GGUFInfo:
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

    info = GGUFInfo(path=path, version=version, file_size=size, data_offset=0, alignment=DEFAULT_ALIGNMENT)
    for i in range(n_kv):
        key = r.string(f"metadata key #{i}")
        vtype = int(r.unpack("I", f"metadata '{key}' type"))
        if key in info.metadata:
            raise GGUFError(f"{path}: duplicate metadata key '{key}'")
        info.metadata[key] = r.value(vtype, f"metadata '{key}'")

    align = info.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1) or align > 1 << 20:
        raise GGUFError(f"{path}: general.alignment {align!r} is not a power of two")
    info.alignment = align

    names: set[str] = set()
    for i in range(n_tensors):
        name = r.string(f"tensor #{i} name")
        if name in names:
            raise GGUFError(f"{path}: duplicate tensor name '{name}'")
        names.add(name)
        n_dims = int(r.unpack("I", f"tensor '{name}' rank"))
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"{path}: tensor '{name}' has rank {n_dims} (1..{MAX_DIMS} allowed)")
        dims = tuple(int(r.unpack("Q", f"tensor '{name}' dim")) for _ in range(n_dims))
        ttype = int(r.unpack("I", f"tensor '{name}' type"))
        offset = int(r.unpack("Q", f"tensor '{name}' offset"))
        if ttype not in GGML_TYPES:
            raise GGUFError(f"{path}: tensor '{name}' has unknown ggml type {ttype}")
        tname, block, bsize = GGML_TYPES[ttype]
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
        info.tensors.append(TensorInfo(name, dims, tname, offset, n_el // block * bsize))

    data_offset = (r.pos + align - 1) // align * align
    info.data_offset = data_offset
    if data_offset > size and n_tensors:
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
    return info
