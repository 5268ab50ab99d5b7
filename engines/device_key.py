"""The key a built TensorRT engine is cached under, the engine records beside a bundle, and refusals.

A ``.plan`` file only runs on the GPU model and TensorRT version it was built with, and it only
means something for the exact graphs it was built from. Each engine is therefore recorded with a
:class:`DeviceKey` (GPU name, compute capability, TensorRT version, bundle sha256); the runtime
compares the recorded key with this device's and refuses a mismatch with a message that says how
to rebuild. Pure Python: no TensorRT, CUDA or torch here, so all of it is tested in CI.

Where the records live: ``engines.json`` beside ``manifest.json``, not the manifest's own
``engines`` section. :class:`~anomalygpt_edge.engines.bundle.EngineBundle` identifies a bundle by
the sha256 of ``manifest.json``'s bytes, and memory banks record that hash. Writing engine records
into the manifest would change the bundle's identity every time engines are (re)built on a device:
every enrolled bank would be refused, and the key stored in the record would name a hash the
bundle no longer has. ``engines.json`` has the same shape as the manifest's reserved ``engines``
section (graph name -> record), which is still read as a fallback for bundles that ship records.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from anomalygpt_edge.atomic_files import atomic_write_bytes
from anomalygpt_edge.engines.base import EngineError

ENGINES_NAME = "engines.json"
RECORDS_SCHEMA = 1
#: The command that (re)builds engines; every refusal names it.
REBUILD_COMMAND = "anomalygpt-edge export engines"
#: The systemd oneshot that runs it at boot (see engines/TENSORRT.md).
REBUILD_UNIT = "anomalygpt-edge-engines.service"

_FIELD_WORDS = {
    "gpu_name": "GPU",
    "compute_capability": "compute capability",
    "tensorrt_version": "TensorRT version",
    "bundle_sha256": "bundle",
}


class EngineKeyMismatchError(EngineError):
    """A built engine belongs to another GPU, TensorRT version or bundle than the one here."""


class EngineRecordError(EngineError):
    """``engines.json`` is missing an engine, malformed, or its ``.plan`` file is damaged."""


@dataclass(frozen=True)
class DeviceKey:
    """What a TensorRT engine is only valid for.

    ``compute_capability`` is ``"major.minor"`` (``"8.7"`` on Jetson Orin). ``tensorrt_version``
    is the full version string: plans are not portable across TensorRT releases (without the
    version-compatible builder flag, which we do not use because it costs speed).
    """

    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    bundle_sha256: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeviceKey:
        """Parse a recorded key; a missing field is an :class:`EngineRecordError` naming it."""
        try:
            return cls(**{f: str(data[f]) for f in _FIELD_WORDS})
        except KeyError as exc:
            raise EngineRecordError(f"engine record key lacks '{exc.args[0]}'") from None

    def describe(self) -> str:
        """Human form for messages: ``Orin (sm 8.7), TensorRT 10.3.0, bundle 1a2b3c4d5e6f``."""
        return (
            f"{self.gpu_name} (sm {self.compute_capability}), TensorRT {self.tensorrt_version}, "
            f"bundle {self.bundle_sha256[:12]}"
        )


def normalise_gpu_name(name: str | bytes) -> str:
    """CUDA reports the name as a fixed-size, NUL-padded char array; make it a clean string."""
    if isinstance(name, bytes):
        name = name.split(b"\x00", 1)[0].decode("utf-8", "replace")
    return " ".join(name.split("\x00", 1)[0].split())


def key_mismatches(recorded: DeviceKey, current: DeviceKey) -> list[str]:
    """Names (in words) of the key fields that differ, in a fixed order; empty when the engine fits."""
    return [words for field, words in _FIELD_WORDS.items() if getattr(recorded, field) != getattr(current, field)]


def refusal_message(plan: str, recorded: DeviceKey, current: DeviceKey, bundle_dir: Path | str) -> str:
    """The message a mismatching engine is refused with: what differs, both keys, and the fix."""
    differs = key_mismatches(recorded, current)
    return (
        f"TensorRT engine {plan} does not fit this device ({', '.join(differs)} differ"
        f"{'s' if len(differs) == 1 else ''}): built for {recorded.describe()}; this device is "
        f"{current.describe()}. Rebuild the engines with `{REBUILD_COMMAND} --bundle {bundle_dir}` "
        f"(the {REBUILD_UNIT} oneshot does this at boot)."
    )


def check_key(plan: str, recorded: DeviceKey, current: DeviceKey, bundle_dir: Path | str) -> None:
    """Raise :class:`EngineKeyMismatchError` unless ``recorded`` equals ``current`` in every field."""
    if key_mismatches(recorded, current):
        raise EngineKeyMismatchError(refusal_message(plan, recorded, current, bundle_dir))


def missing_engine_message(graph: str, bundle_dir: Path | str) -> str:
    """The message when a bundle has no built engine for a graph yet."""
    return (
        f"bundle {bundle_dir} has no TensorRT engine for graph '{graph}'; build them on this device with "
        f"`{REBUILD_COMMAND} --bundle {bundle_dir}` (first builds take minutes on a Jetson)"
    )


def read_engine_records(bundle_dir: Path, manifest_engines: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Engine records of a bundle, graph name -> record; ``engines.json`` wins over the manifest's.

    A malformed ``engines.json`` is an error (rather than "no engines") so that a damaged file is
    reported instead of silently falling back to a slower backend.
    """
    records: dict[str, Any] = dict(manifest_engines or {})
    path = Path(bundle_dir) / ENGINES_NAME
    if path.is_file():
        try:
            data = json.loads(path.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EngineRecordError(f"{path}: not valid JSON ({exc}); rebuild with `{REBUILD_COMMAND}`") from exc
        if not isinstance(data, dict) or not isinstance(data.get("engines"), dict):
            raise EngineRecordError(f"{path}: needs an 'engines' object; rebuild with `{REBUILD_COMMAND}`")
        if int(data.get("schema_version", 0)) > RECORDS_SCHEMA:
            raise EngineRecordError(f"{path}: written by a newer anomalygpt-edge; upgrade this device")
        records.update(data["engines"])
    return records


def write_engine_record(bundle_dir: Path, graph: str, record: Mapping[str, Any]) -> None:
    """Add or replace one graph's record in ``engines.json``, atomically (temp file + rename).

    Read-modify-write of the whole file: records of other graphs are kept. ``manifest.json`` is
    never touched (see the module docstring for why).
    """
    path = Path(bundle_dir) / ENGINES_NAME
    records = read_engine_records(bundle_dir) if path.is_file() else {}
    records[graph] = dict(record)
    data = {
        "schema_version": RECORDS_SCHEMA,
        "updated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "engines": records,
    }
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def record_for(records: Mapping[str, Any], graph: str, bundle_dir: Path | str) -> dict[str, Any]:
    """The record of ``graph`` with its required fields checked; raises with the rebuild command."""
    record = records.get(graph)
    if record is None:
        raise EngineRecordError(missing_engine_message(graph, bundle_dir))
    missing = [k for k in ("plan", "key", "plan_sha256", "plan_size") if k not in record]
    if missing:
        raise EngineRecordError(
            f"{Path(bundle_dir) / ENGINES_NAME}: record of '{graph}' lacks {', '.join(missing)}; "
            f"rebuild with `{REBUILD_COMMAND} --bundle {bundle_dir}`"
        )
    return dict(record)
