"""The Engine interface every backend implements: named numpy inputs in, named numpy outputs out.

A backend is one file in this folder that subclasses :class:`Engine` and registers itself under a
type key with :func:`register_backend` (the Frigate detector-plugin pattern), together with its
options model (a :class:`BackendOptions` subclass whose ``type`` is ``Literal[<key>]``, beside the
engine). Which backend runs a graph, and with which options, is chosen by config
(``engines.backend``: a key, or a mapping validated by :func:`backend_options_union`) or, with
``"auto"``, by what is installed.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

#: dtype names used in manifests, mapped to numpy dtypes.
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "uint8": np.dtype(np.uint8),
}


class EngineError(RuntimeError):
    """A graph cannot be loaded or run; the message names the file or tensor at fault."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one graph input or output.

    ``shape`` entries are ints for fixed axes and strings for dynamic ones (``"batch"``,
    ``"bank"``); a dynamic axis accepts any positive length.
    """

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), tuple(data["shape"]), str(data["dtype"]))

    def check(self, value: np.ndarray, graph: str) -> None:
        """Raise :class:`EngineError` unless ``value`` fits this spec."""
        if not isinstance(value, np.ndarray):
            raise EngineError(f"{graph}: input '{self.name}' must be a numpy array, got {type(value).__name__}")
        if value.dtype != DTYPES[self.dtype]:
            raise EngineError(f"{graph}: input '{self.name}' must be {self.dtype}, got {value.dtype}")
        if value.ndim != len(self.shape):
            raise EngineError(
                f"{graph}: input '{self.name}' must have shape {_fmt(self.shape)}, got {tuple(value.shape)}"
            )
        for want, got in zip(self.shape, value.shape):
            if isinstance(want, int) and want != got or isinstance(want, str) and got < 1:
                raise EngineError(
                    f"{graph}: input '{self.name}' must have shape {_fmt(self.shape)}, got {tuple(value.shape)}"
                )


def _fmt(shape: tuple[int | str, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


class BackendOptions(BaseModel):
    """What every backend's options share: ``type``, the backend's key.

    Each backend declares a subclass beside its engine with ``type: Literal[<key>]`` and the
    options only it reads, every one with a default (so the bare key is a valid configuration);
    :func:`register_backend` records it and :func:`backend_options_union` joins them on ``type``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str


class AutoOptions(BackendOptions):
    """``auto``: the best backend installed here (:data:`AUTO_ORDER`), with that backend's defaults."""

    type: Literal["auto"] = "auto"


class Engine(abc.ABC):
    """One loaded graph. Subclasses set :attr:`backend` and implement :meth:`_run`.

    ``options`` is the backend's options object (its :attr:`options_model`, set by
    :func:`register_backend`); None means the backend's defaults.
    """

    backend: str = "abstract"
    options_model: type[BackendOptions] = BackendOptions

    def __init__(
        self, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], options: BackendOptions | None = None
    ):
        self.path = Path(path)
        self.inputs = inputs
        self.outputs = outputs
        if options is None:
            options = self.options_model.model_validate({"type": self.backend})
        if not isinstance(options, self.options_model) or options.type != self.backend:
            raise EngineError(
                f"engine backend '{self.backend}' takes {self.options_model.__name__}, got {type(options).__name__} "
                f"for '{options.type}'"
            )
        self.options = options

    @property
    def name(self) -> str:
        return self.path.name

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate ``feeds`` against :attr:`inputs`, run the graph, return outputs by name."""
        expected = {spec.name for spec in self.inputs}
        missing = expected - set(feeds)
        extra = set(feeds) - expected
        if missing or extra:
            raise EngineError(
                f"{self.name}: inputs must be {sorted(expected)}; missing {sorted(missing)}, unexpected {sorted(extra)}"
            )
        for spec in self.inputs:
            spec.check(feeds[spec.name], self.name)
        return self._run(dict(feeds))

    @abc.abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Backend-specific execution; inputs are already validated."""

    def describe(self) -> str:
        """One line for logs and the status topic: backend and device."""
        return self.backend

    @classmethod
    def available(cls) -> bool:
        """Whether this backend's libraries (and device) are present on this machine."""
        return cls.why_not() is None

    @classmethod
    def why_not(cls) -> str | None:
        """Why this backend cannot run here, or ``None`` when it can."""
        return None


_BACKENDS: dict[str, type[Engine]] = {}
#: Each key's options model, ``auto`` first, then the backends in registration order (the order
#: an unknown ``type`` lists them in).
_OPTIONS: dict[str, type[BackendOptions]] = {"auto": AutoOptions}
#: Order tried by ``backend="auto"``: fastest first. A backend is used only if ``available()``.
AUTO_ORDER = ("tensorrt", "onnxruntime-cuda", "onnxruntime")
#: Backend keys that existed once, with what to use instead: a config naming one gets this line,
#: not a bare "unknown backend".
REMOVED_BACKENDS: dict[str, str] = {
    "torch-cuda": (
        "engine backend 'torch-cuda' was removed (the torch ONNX interpreter had no GPU figure to "
        "justify it): use 'onnxruntime-cuda' (onnxruntime-gpu) or 'tensorrt' on a GPU, 'onnxruntime' "
        "on the CPU, or 'auto'"
    ),
}


def removed_backend(name: str) -> str | None:
    """The one-line explanation when ``name`` is a backend that was removed, else None."""
    return REMOVED_BACKENDS.get(name)


def register_backend(key: str, options: type[BackendOptions]) -> Callable[[type[Engine]], type[Engine]]:
    """Class decorator: make an Engine subclass loadable under ``key``, configured by ``options``.

    ``options`` must have ``type: Literal[key]`` and defaults for everything else: a bare ``key``
    (the string shorthand) is then a complete configuration.
    """
    if get_args(options.model_fields["type"].annotation) != (key,):
        raise TypeError(f"{options.__name__}.type must be Literal[{key!r}]")
    try:
        options.model_validate({"type": key})
    except ValidationError as exc:
        raise TypeError(f"{options.__name__}: every option needs a default ({exc})") from None

    def wrap(cls: type[Engine]) -> type[Engine]:
        cls.backend = key
        cls.options_model = options
        _BACKENDS[key] = cls
        _OPTIONS[key] = options
        return cls

    return wrap


def _import_backends() -> None:
    # Importing registers them; each import is cheap and guarded inside the module.
    import contextlib
    import importlib

    from anomalygpt_edge.engines import onnxruntime_backend  # noqa: F401

    # GPU backends: their modules import without tensorrt/cuda (those load lazily), but a
    # broken optional install must never take the CPU backend down with it.
    for module in ("tensorrt_backend",):
        with contextlib.suppress(ImportError):
            importlib.import_module(f"anomalygpt_edge.engines.{module}")


def backend_names() -> list[str]:
    """Every registered backend key, available or not."""
    _import_backends()
    return sorted(_BACKENDS)


def backend_options_union() -> Any:
    """Every registered options model (``auto``'s too), joined on ``type`` (pydantic's discriminated
    union), in registration order; built from the registry, so a backend registered later joins it."""
    _import_backends()
    models = tuple(_OPTIONS.values())
    return Annotated[Union[models], Field(discriminator="type")]  # noqa: UP007 - built at run time


_ADAPTERS: dict[tuple[type[BackendOptions], ...], TypeAdapter[BackendOptions]] = {}


def _options_adapter() -> TypeAdapter[BackendOptions]:
    """A validator for the union as the registry stands now (a new one when a backend registers)."""
    _import_backends()
    models = tuple(_OPTIONS.values())
    if models not in _ADAPTERS:
        _ADAPTERS[models] = TypeAdapter(backend_options_union())
    return _ADAPTERS[models]


def backend_keys() -> list[str]:
    """Every key ``engines.backend`` accepts: ``auto``, then the registered backends by name."""
    _import_backends()
    return ["auto", *sorted(_BACKENDS)]


def backend_options(value: str | Mapping[str, Any] | BackendOptions) -> BackendOptions:
    """The validated options object for a key (the shorthand for ``{type: key}``), a mapping or an
    options object (returned as it is); :class:`EngineError` names what is wrong."""
    if isinstance(value, BackendOptions):
        return value
    if isinstance(value, str):
        if (removed := removed_backend(value)) is not None:
            raise EngineError(removed)
        known = backend_keys()
        if value not in known:
            raise EngineError(f"unknown engine backend '{value}'; known: {', '.join(known)}")
        value = {"type": value}
    try:
        return _options_adapter().validate_python(dict(value))
    except ValidationError as exc:  # the first error, as "key: problem" (the tag pydantic adds left out)
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"][1:]) or "type"
        raise EngineError(f"engine backend options {dict(value)}: {key}: {error['msg']}") from None


def available_backends() -> list[str]:
    """Registered backends whose libraries are importable on this machine, best first."""
    _import_backends()
    ranked = [k for k in AUTO_ORDER if k in _BACKENDS] + sorted(set(_BACKENDS) - set(AUTO_ORDER))
    return [k for k in ranked if _BACKENDS[k].available()]


def resolve_backend(name: str) -> str:
    """Turn ``"auto"`` into the best available backend; check an explicit one exists and is usable."""
    _import_backends()
    if name == "auto":
        usable = available_backends()
        if not usable:
            raise EngineError("no engine backend is usable: install onnxruntime")
        return usable[0]
    if (removed := removed_backend(name)) is not None:
        raise EngineError(removed)
    if name not in _BACKENDS:
        raise EngineError(f"unknown engine backend '{name}'; known: {', '.join(sorted(_BACKENDS))}")
    if not _BACKENDS[name].available():
        raise EngineError(f"engine backend '{name}' is not usable on this machine: {_BACKENDS[name].why_not()}")
    return name


def resolve_options(backend: str | BackendOptions = "auto") -> BackendOptions:
    """The options a graph is loaded with on this machine: ``auto`` becomes the best available
    backend's defaults; an explicit backend is checked to exist and be usable (:func:`resolve_backend`)."""
    if isinstance(backend, str):
        key = resolve_backend(backend)  # the removed/unknown messages of a bare key
        return backend_options(key)
    key = resolve_backend(backend.type)
    return backend if key == backend.type else backend_options(key)


def create_engine(
    path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], backend: str | BackendOptions = "auto"
) -> Engine:
    """Load the graph at ``path`` with the chosen backend: a key (``"onnxruntime"``, ``"auto"``) or
    a validated options object (:func:`backend_options`)."""
    options = resolve_options(backend)
    return _BACKENDS[options.type](Path(path), inputs, outputs, options)
