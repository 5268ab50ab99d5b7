"""Each engine backend owns its typed options, joined on ``type`` from the backend registry: the
config's ``engines.backend`` is a key (the shorthand) or a mapping validated by the backend's model,
and the daemon opens its bundles with those options (ONNX Runtime's threads among them)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, get_args

import numpy as np
import pytest
import yaml
from daemon_fixtures import ONE_CAMERA_CONFIG
from pydantic import Field, TypeAdapter

from anomalygpt_edge.engines import base
from anomalygpt_edge.engines.base import (
    AutoOptions,
    BackendOptions,
    Engine,
    EngineError,
    TensorSpec,
    backend_keys,
    backend_names,
    backend_options,
    backend_options_union,
    create_engine,
    register_backend,
    removed_backend,
)
from anomalygpt_edge.engines.bundle import EngineBundle
from anomalygpt_edge.engines.onnxruntime_backend import (
    OnnxRuntimeCudaEngine,
    OnnxRuntimeCudaOptions,
    OnnxRuntimeEngine,
    OnnxRuntimeOptions,
)
from anomalygpt_edge.engines.tensorrt_backend import TensorRTOptions
from anomalygpt_edge.runtime.line.batching import BatchPolicy, worker_count
from anomalygpt_edge.runtime.line.config import ConfigError, parse_config
from anomalygpt_edge.runtime.line.recipe_slots import RecipeSlots
from anomalygpt_edge.runtime.recipes.store import RecipeStore

VALID = ONE_CAMERA_CONFIG + "mqtt:\n  port: 1883\n"  # engines: is line 12, its first key line 13


def _engines(section: str, bundle: Path | None = None) -> str:
    """VALID with an ``engines:`` section (its keys indented by two spaces in ``section``)."""
    where = f"  bundle: {bundle}\n" if bundle is not None else ""
    return VALID + "engines:\n" + where + section


def test_a_backends_options_round_trip_from_yaml() -> None:
    config = parse_config(_engines("  backend:\n    type: tensorrt\n    device_id: 1\n    cuda_graph: false\n"))
    assert config.engines.backend == TensorRTOptions(device_id=1, cuda_graph=False)
    written = yaml.safe_dump({"backend": config.engines.backend.model_dump()})
    again = parse_config(_engines("".join(f"  {line}\n" for line in written.splitlines())))
    assert again.engines.backend == config.engines.backend
    cuda = parse_config(_engines("  backend: {type: onnxruntime-cuda, device_id: 2}\n")).engines.backend
    assert cuda == OnnxRuntimeCudaOptions(device_id=2)


def test_an_unknown_option_of_a_backend_is_refused_naming_the_key_and_its_line() -> None:
    section = "  backend:\n    type: onnxruntime-cuda\n    cuda_graph: true\n"  # a TensorRT option
    with pytest.raises(
        ConfigError, match=r"^line.yaml:15: engines.backend.cuda_graph: unknown key; allowed here: device_id, type$"
    ):
        parse_config(_engines(section), "line.yaml")
    with pytest.raises(ConfigError, match=r"^line.yaml:15: engines.backend.device_id: input should be greater"):
        parse_config(_engines("  backend:\n    type: tensorrt\n    device_id: -1\n"), "line.yaml")
    with pytest.raises(ConfigError, match=r"^line.yaml:14: engines.backend.type: must be one of auto, onnxruntime"):
        parse_config(_engines("  backend:\n    type: tpu\n"), "line.yaml")
    with pytest.raises(ConfigError, match=r"^line.yaml:13: engines.backend: must be a backend key \(auto, "):
        parse_config(_engines("  backend: 5\n"), "line.yaml")


def test_the_union_lists_exactly_the_registered_backends_and_a_new_one_joins_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def tags() -> set[str]:
        models = get_args(get_args(backend_options_union())[0])
        return {get_args(m.model_fields["type"].annotation)[0] for m in models}

    assert tags() == {"auto", *backend_names()} == set(backend_keys())

    class FakeOptions(BackendOptions):
        type: Literal["fake"] = "fake"
        level: Annotated[int, Field(ge=0)] = 1

    class FakeEngine(Engine):
        options: FakeOptions

        def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"y": feeds["x"] * self.options.level}

    # Registered through the registries' own dicts, so the monkeypatch takes it out again.
    monkeypatch.setattr(base, "_BACKENDS", dict(base._BACKENDS))
    monkeypatch.setattr(base, "_OPTIONS", dict(base._OPTIONS))
    register_backend("fake", options=FakeOptions)(FakeEngine)
    assert tags() == {"auto", "fake", *backend_names()}
    assert TypeAdapter(backend_options_union()).validate_python({"type": "fake", "level": 3}) == FakeOptions(level=3)
    options = backend_options({"type": "fake", "level": 3})
    with pytest.raises(EngineError, match=r"engine backend options .*: level: Input should be greater"):
        backend_options({"type": "fake", "level": -1})

    spec = [TensorSpec("x", ("batch",), "float32")]
    engine = create_engine(tmp_path / "g.onnx", spec, [TensorSpec("y", ("batch",), "float32")], options)
    assert isinstance(engine, FakeEngine) and engine.options.level == 3
    assert engine.run({"x": np.ones(2, np.float32)})["y"].tolist() == [3.0, 3.0]
    assert create_engine(tmp_path / "g.onnx", spec, spec[:0], "fake").options == FakeOptions()  # the shorthand

    class Misnamed(BackendOptions):
        type: Literal["other"] = "other"

    class NoDefault(BackendOptions):
        type: Literal["strict"] = "strict"
        needed: int

    with pytest.raises(TypeError, match=r"Misnamed.type must be Literal\['fake2'\]"):
        register_backend("fake2", options=Misnamed)
    with pytest.raises(TypeError, match="NoDefault: every option needs a default"):
        register_backend("strict", options=NoDefault)


def test_the_string_shorthand_is_the_mapping_with_only_its_type() -> None:
    for key in backend_keys():
        short = parse_config(_engines(f"  backend: {key}\n")).engines
        spelled = parse_config(_engines(f"  backend:\n    type: {key}\n")).engines
        assert short == spelled and short.backend == backend_options(key) == backend_options({"type": key})
    assert parse_config(VALID).engines.backend == AutoOptions()  # no engines section: auto
    assert backend_options(TensorRTOptions(device_id=1)) == TensorRTOptions(device_id=1)  # taken as it is


def test_threads_reach_the_onnx_runtime_sessions_through_the_daemons_path(
    default_bundle_dir: Path, tmp_path: Path
) -> None:
    def threads_of_the_line(section: str) -> tuple[int, int]:
        config = parse_config(_engines(section, default_bundle_dir), "line.yaml")
        slots = RecipeSlots(config, RecipeStore(tmp_path / "store"))
        slots.open()  # as the daemon opens its engines; no recipe here, so the camera answers ERROR
        pipeline = slots.pipelines[default_bundle_dir.resolve()]
        counts = {e.session.get_session_options().intra_op_num_threads for e in (pipeline.encoder, pipeline.matcher)}
        assert len(counts) == 1, counts
        return counts.pop(), BatchPolicy.from_engines(config.engines).workers

    assert threads_of_the_line("  backend: onnxruntime\n  threads: 3\n") == (3, worker_count("auto", 3))
    # The backend's own threads, without the shorthand: workers count by it too.
    assert threads_of_the_line("  backend:\n    type: onnxruntime\n    threads: 2\n") == (2, worker_count("auto", 2))
    assert threads_of_the_line("  backend: onnxruntime\n")[0] == 1  # engines.threads' default


def test_auto_on_the_cpu_gets_engines_threads_and_the_two_thread_counts_must_agree(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(base, "available_backends", lambda: ["onnxruntime"])
    assert parse_config(_engines("  threads: 4\n")).engines.bundle_options() == OnnxRuntimeOptions(threads=4)
    tensorrt = parse_config(_engines("  backend: {type: tensorrt, device_id: 1}\n  threads: 4\n")).engines
    assert tensorrt.threads == 4 and tensorrt.backend == TensorRTOptions(device_id=1)  # workers: auto counts by it
    with pytest.raises(
        ConfigError, match=r"^line.yaml:16: engines.backend.threads: is 4 but engines.threads is 2: give the thread"
    ):
        parse_config(_engines("  threads: 2\n  backend:\n    type: onnxruntime\n    threads: 4\n"), "line.yaml")
    agreed = parse_config(_engines("  threads: 2\n  backend:\n    type: onnxruntime\n    threads: 2\n")).engines
    assert agreed.bundle_options() == OnnxRuntimeOptions(threads=2)


def test_the_cuda_provider_is_given_its_device_and_an_engine_refuses_another_backends_options(
    default_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomalygpt_edge.engines import onnxruntime_backend

    asked: dict[str, object] = {}

    def no_gpu_here(path: str, sess_options: object, providers: list[object]) -> None:
        asked["providers"] = providers
        raise RuntimeError("CUDA is not available in this test")

    entry = EngineBundle.open(default_bundle_dir).graph("bank_matcher")
    file = default_bundle_dir / entry.file
    monkeypatch.setattr(onnxruntime_backend.ort, "InferenceSession", no_gpu_here)
    with pytest.raises(EngineError, match="cannot load graph .*CUDA is not available"):
        OnnxRuntimeCudaEngine(file, entry.inputs, entry.outputs, OnnxRuntimeCudaOptions(device_id=1))
    assert asked["providers"] == [("CUDAExecutionProvider", {"device_id": "1"}), "CPUExecutionProvider"]
    monkeypatch.undo()
    with pytest.raises(EngineError, match="engine backend 'onnxruntime' takes OnnxRuntimeOptions, got TensorRTOptions"):
        OnnxRuntimeEngine(file, entry.inputs, entry.outputs, TensorRTOptions())


def test_a_removed_backend_keeps_its_message_as_a_key_and_as_a_type() -> None:
    removed = removed_backend("torch-cuda")
    assert removed is not None and "onnxruntime-cuda" in removed
    with pytest.raises(EngineError) as err:
        backend_options("torch-cuda")
    assert str(err.value) == removed
    with pytest.raises(ConfigError) as as_key:
        parse_config(_engines("  backend: torch-cuda\n"), "line.yaml")
    assert str(as_key.value) == f"line.yaml:13: engines.backend: {removed}"
    with pytest.raises(ConfigError) as as_type:
        parse_config(_engines("  backend:\n    type: torch-cuda\n"), "line.yaml")
    assert str(as_type.value) == f"line.yaml:14: engines.backend.type: {removed}"
    with pytest.raises(EngineError, match="unknown engine backend 'tpu'; known: auto, onnxruntime"):
        backend_options("tpu")
    assert "torch-cuda" not in backend_keys()
