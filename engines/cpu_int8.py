"""Whether this CPU has the dot-product instructions that make ONNX Runtime's INT8 kernels fast.

A statically quantized (QDQ) encoder pays off on the CPU only where 8-bit dot products are one
instruction: VNNI on x86 (``avx512_vnni``, ``avx_vnni``; AMX ``amx_int8`` too) and the dot-product /
matrix-multiply extensions on ARM (``asimddp``, ``i8mm``). Elsewhere ONNX Runtime emulates them with
widening multiplies and the INT8 graph is slower than FP32 and less accurate, so the bundle refuses
the variant with :func:`why_not_int8`'s one line rather than silently running the slow path.
"""

from __future__ import annotations

from pathlib import Path

#: Where Linux lists the CPU's feature flags (``flags`` on x86, ``Features`` on ARM).
CPUINFO = Path("/proc/cpuinfo")
#: Flags any one of which makes INT8 fast, per architecture family.
X86_INT8_FLAGS: tuple[str, ...] = ("avx512_vnni", "avx_vnni", "amx_int8")
ARM_INT8_FLAGS: tuple[str, ...] = ("asimddp", "i8mm")
INT8_FLAGS: tuple[str, ...] = X86_INT8_FLAGS + ARM_INT8_FLAGS


def cpu_flags(cpuinfo: str) -> set[str]:
    """Every feature flag named on the ``flags`` (x86) or ``Features`` (ARM) lines of ``cpuinfo``."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def int8_flags(cpuinfo: str | None = None) -> list[str]:
    """The INT8 dot-product flags this CPU has (read from :data:`CPUINFO` unless ``cpuinfo`` is given)."""
    text = CPUINFO.read_text() if cpuinfo is None else cpuinfo
    have = cpu_flags(text)
    return [f for f in INT8_FLAGS if f in have]


def why_not_int8(cpuinfo: str | None = None) -> str | None:
    """One line saying why the INT8 encoder would be slow here, or ``None`` when the CPU has the instructions."""
    try:
        found = int8_flags(cpuinfo)
    except OSError as exc:
        return f"engines.precision int8: cannot read the CPU's flags ({exc}); use fp32 on this machine"
    if found:
        return None
    return (
        "engines.precision int8: this CPU has no 8-bit dot-product instructions (none of "
        f"{', '.join(INT8_FLAGS)} in {CPUINFO}), so the INT8 encoder would be slower than FP32; use fp32"
    )
