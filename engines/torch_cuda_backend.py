"""torch CUDA backend (``torch-cuda``): the bundle's own ONNX graphs, executed op by op with torch.

For GPU workstations that have torch but no TensorRT. torch cannot load ONNX, and a second
artifact (TorchScript/``torch.export``) beside every graph would be a second thing to keep in step
with the ONNX the other backends run. So this backend interprets the *same* ONNX file with a small
ONNX-to-torch interpreter covering the ops our exporters emit (convolutional encoders, ViT
encoders, the bank matcher, decoder and prompt learner); an unknown op is refused at load time
with its name.

* Precision is what the graph declares: the FP16 variant runs in FP16 with FP32 islands exactly
  where ``onnx_tools.FP32_OPS`` put them (the same contract as TensorRT's strongly typed builds).
* Shape arithmetic (``Shape``/``Gather``/``Concat`` feeding ``Reshape``) stays on the CPU, so the
  GPU never waits for a shape and a run with fixed shapes can be captured in a CUDA graph.
* On CUDA, a batch-1 call whose shapes repeat is captured once into a CUDA graph and replayed:
  the Python cost of interpreting the graph disappears from the steady state.
* On CPU (``device="cpu"``) the same interpreter runs; the tests check it against ONNX Runtime.

torch and onnx are imported lazily, only when an engine of this backend is created.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from anomalygpt_edge.engines.base import DTYPES, Engine, EngineError, TensorSpec, register_backend

# ONNX TensorProto element types -> torch dtype names (resolved lazily).
_ONNX_TO_TORCH = {
    1: "float32",
    2: "uint8",
    3: "int8",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    16: "bfloat16",
}


def _torch() -> Any:
    import torch

    return torch


class OnnxTorchGraph:
    """An ONNX graph turned into a list of torch calls; ``__call__(**inputs) -> {output: tensor}``."""

    def __init__(self, path: Path, device: str):
        import onnx
        from onnx import numpy_helper

        torch = _torch()
        self.torch = torch
        self.device = torch.device(device)
        model = onnx.load(str(path))  # loads external data too
        graph = model.graph
        self.input_names = [i.name for i in graph.input]
        self.output_names = [o.name for o in graph.output]
        self.consts: dict[str, Any] = {}
        for init in graph.initializer:
            self.consts[init.name] = self._const(numpy_helper.to_array(init))
        self.nodes: list[tuple[Callable, list[str], list[str], dict[str, Any], str]] = []
        unknown = sorted({n.op_type for n in graph.node if n.op_type not in _OPS})
        if unknown:
            raise EngineError(f"{Path(path).name}: the torch-cuda backend does not implement ONNX op(s) {unknown}")
        for node in graph.node:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            attrs["_device"] = self.device  # for ops that create data (ConstantOfShape)
            if node.op_type == "Constant":
                self.consts[node.output[0]] = self._const(_constant_value(attrs, numpy_helper))
                continue
            self.nodes.append((_OPS[node.op_type], list(node.input), list(node.output), attrs, node.name))
        # Free intermediates as soon as their last consumer ran (matters for a 630 M-param ViT).
        last_use: dict[str, int] = {}
        for i, (_, ins, _, _, _) in enumerate(self.nodes):
            for name in ins:
                last_use[name] = i
        keep = set(self.output_names)
        self.release = [
            [n for n in ins if n and last_use.get(n) == i and n not in keep and n not in self.consts]
            for i, (_, ins, _, _, _) in enumerate(self.nodes)
        ]

    def _const(self, array: np.ndarray) -> Any:
        t = self.torch.from_numpy(np.array(array, copy=True))
        # Integer constants are shape arithmetic or indices: keep them on the CPU (see module doc).
        return t.to(self.device) if t.is_floating_point() else t

    def __call__(self, **inputs: Any) -> dict[str, Any]:
        env: dict[str, Any] = dict(self.consts)
        env.update(inputs)
        for (fn, ins, outs, attrs, name), release in zip(self.nodes, self.release, strict=True):
            args = [env[n] if n else None for n in ins]
            try:
                result = fn(self.torch, attrs, *args)
            except EngineError:
                raise
            except Exception as exc:
                raise EngineError(f"torch-cuda: node {name or fn.__name__} failed: {exc}") from exc
            if isinstance(result, (list, tuple)):
                for o, r in zip(outs, result, strict=False):
                    env[o] = r
            else:
                env[outs[0]] = result
            for n in release:
                env.pop(n, None)
        return {n: env[n] for n in self.output_names}


def _constant_value(attrs: Mapping[str, Any], numpy_helper: Any) -> np.ndarray:
    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attrs:
            return np.array(attrs[key], dtype)
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return np.array(list(attrs[key]), dtype)
    raise EngineError(f"Constant with unsupported attributes {sorted(attrs)}")


# --- op implementations: fn(torch, attrs, *inputs) -> tensor | list of tensors -----------------


# CUDA-graph safety. While a graph is being captured, nothing may copy between host and device
# (a copy from pageable memory, or reading a GPU value into Python, breaks the capture). The
# interpreter keeps shape arithmetic on the CPU, and the two helpers below make the remaining
# crossings happen once, during the warm-up runs before capture, and hit a cache afterwards:
# small CPU tensors moved to the GPU are cached by value, GPU constants read into Python by identity.
_DEVICE_CACHE: dict[tuple, Any] = {}
_HOST_CACHE: dict[int, tuple[Any, list]] = {}
_CACHE_LIMIT = 4096


def _to_device(t: Any, device: Any) -> Any:
    """``t`` on ``device``; a small CPU tensor's device copy is made once and reused."""
    if t.device == device:
        return t
    if t.device.type != "cpu" or t.numel() > _CACHE_LIMIT:
        return t.to(device)
    key = (str(device), str(t.dtype), tuple(t.shape), tuple(t.reshape(-1).tolist()))
    hit = _DEVICE_CACHE.get(key)
    if hit is None:
        if len(_DEVICE_CACHE) >= _CACHE_LIMIT:
            _DEVICE_CACHE.clear()
        hit = _DEVICE_CACHE[key] = t.to(device)
    return hit


def _host_list(t: Any) -> list:
    """A small tensor's values as Python numbers; a GPU tensor is read once (it is a constant)."""
    if t.device.type == "cpu":
        return t.reshape(-1).tolist()
    hit = _HOST_CACHE.get(id(t))
    if hit is not None and hit[0] is t:
        return hit[1]
    if len(_HOST_CACHE) >= _CACHE_LIMIT:
        _HOST_CACHE.clear()
    values = t.reshape(-1).tolist()
    _HOST_CACHE[id(t)] = (t, values)  # holding t keeps its id from being reused
    return values


def _ints(t: Any) -> list[int]:
    """A small integer tensor (shape arithmetic, kept on the CPU) as Python ints."""
    return [int(v) for v in _host_list(t)]


def _scalar(t: Any) -> float:
    return float(_host_list(t)[0])


def _same_device(a: Any, b: Any) -> tuple[Any, Any]:
    # Shape tensors live on the CPU; move them to the data's device when they meet data.
    if a.device != b.device:
        if a.device.type == "cpu":
            a = _to_device(a, b.device)
        else:
            b = _to_device(b, a.device)
    return a, b


def _binary(op: Callable) -> Callable:
    def fn(torch: Any, attrs: Mapping, a: Any, b: Any) -> Any:
        a, b = _same_device(a, b)
        return op(torch, a, b)

    fn.__name__ = op.__name__
    return fn


def _div(torch: Any, a: Any, b: Any) -> Any:
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer Div truncates


def _mod(torch: Any, attrs: Mapping, a: Any, b: Any) -> Any:
    a, b = _same_device(a, b)
    # fmod=1: C fmod (sign of the dividend); fmod=0: Python-style (sign of the divisor).
    return torch.fmod(a, b) if attrs.get("fmod", 0) else torch.remainder(a, b)


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _reduce(name: str) -> Callable:
    def fn(torch: Any, attrs: Mapping, x: Any, axes_in: Any = None) -> Any:
        axes = list(attrs.get("axes", [])) or (_ints(axes_in) if axes_in is not None else [])
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        axes = sorted(_norm_axis(a, x.dim()) for a in axes)
        if name == "ReduceSum":
            return torch.sum(x, dim=axes, keepdim=keep)
        if name == "ReduceMean":
            return torch.mean(x, dim=axes, keepdim=keep)
        if name == "ReduceSumSquare":
            return torch.sum(x * x, dim=axes, keepdim=keep)
        if name == "ReduceL2":
            return torch.sqrt(torch.sum(x * x, dim=axes, keepdim=keep))
        out = x
        for a in reversed(axes):
            out = (torch.amax if name == "ReduceMax" else torch.amin)(out, dim=a, keepdim=keep)
        return out

    fn.__name__ = name
    return fn


def _conv(torch: Any, attrs: Mapping, x: Any, w: Any, b: Any = None) -> Any:
    F = torch.nn.functional
    nd = w.dim() - 2
    strides = list(attrs.get("strides", [1] * nd))
    dil = list(attrs.get("dilations", [1] * nd))
    pads = list(attrs.get("pads", [0] * (2 * nd)))
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise EngineError("Conv auto_pad SAME_* is not supported; export with explicit pads")
    begin, end = pads[:nd], pads[nd:]
    if begin != end:
        x = F.pad(x, [p for i in reversed(range(nd)) for p in (begin[i], end[i])])
        begin = [0] * nd
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return conv(x, w, b, stride=strides, padding=begin, dilation=dil, groups=int(attrs.get("group", 1)))


def _pool(kind: str) -> Callable:
    def fn(torch: Any, attrs: Mapping, x: Any) -> Any:
        F = torch.nn.functional
        k = list(attrs["kernel_shape"])
        nd = len(k)
        strides = list(attrs.get("strides", [1] * nd))
        pads = list(attrs.get("pads", [0] * (2 * nd)))
        ceil = bool(attrs.get("ceil_mode", 0))
        begin, end = pads[:nd], pads[nd:]
        if begin != end:
            value = float("-inf") if kind == "max" else 0.0
            x = F.pad(x, [p for i in reversed(range(nd)) for p in (begin[i], end[i])], value=value)
            begin = [0] * nd
        if kind == "max":
            pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
            return pool(x, k, strides, begin, dilation=list(attrs.get("dilations", [1] * nd)), ceil_mode=ceil)
        pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
        return pool(x, k, strides, begin, ceil_mode=ceil, count_include_pad=bool(attrs.get("count_include_pad", 0)))

    fn.__name__ = f"{kind}_pool"
    return fn


def _resize(torch: Any, attrs: Mapping, x: Any, roi: Any = None, scales: Any = None, sizes: Any = None) -> Any:
    F = torch.nn.functional
    mode = _s(attrs.get("mode", "nearest"))
    ctm = _s(attrs.get("coordinate_transformation_mode", "half_pixel"))
    nd = x.dim() - 2
    if sizes is not None and sizes.numel():
        size = _ints(sizes)[2:]
    else:
        sc = [float(v) for v in _host_list(scales)]
        size = [int(math.floor(x.shape[2 + i] * sc[2 + i])) for i in range(nd)]
    if mode == "nearest":
        if ctm != "asymmetric" or _s(attrs.get("nearest_mode", "round_prefer_floor")) != "floor":
            # torch's "nearest" is ONNX asymmetric+floor; half_pixel rounding is "nearest-exact".
            return F.interpolate(x, size=size, mode="nearest-exact")
        return F.interpolate(x, size=size, mode="nearest")
    if mode == "linear":
        torch_mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[nd]
        if ctm == "align_corners":
            return F.interpolate(x, size=size, mode=torch_mode, align_corners=True)
        if ctm in ("half_pixel", "pytorch_half_pixel"):
            return F.interpolate(x, size=size, mode=torch_mode, align_corners=False)
    if mode == "cubic" and nd == 2 and ctm in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        return F.interpolate(x, size=size, mode="bicubic", align_corners=ctm == "align_corners")
    raise EngineError(f"Resize mode={mode} coordinate_transformation_mode={ctm} is not supported")


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _pad(torch: Any, attrs: Mapping, x: Any, pads: Any, value: Any = None, axes: Any = None) -> Any:
    F = torch.nn.functional
    p = _ints(pads)
    rank = x.dim()
    ax = [_norm_axis(a, rank) for a in _ints(axes)] if axes is not None else list(range(rank))
    begin = dict(zip(ax, p[: len(ax)], strict=False))
    end = dict(zip(ax, p[len(ax) :], strict=False))
    flat: list[int] = []
    for a in reversed(range(rank)):
        flat += [begin.get(a, 0), end.get(a, 0)]
    while len(flat) > 2 and flat[-2:] == [0, 0]:
        flat = flat[:-2]
    mode = _s(attrs.get("mode", "constant"))
    if mode == "constant":
        fill = _scalar(value) if value is not None and value.numel() else 0.0
        return F.pad(x, flat, value=fill)
    return F.pad(x, flat, mode={"reflect": "reflect", "edge": "replicate"}[mode])


def _slice(torch: Any, attrs: Mapping, x: Any, starts: Any, ends: Any, axes: Any = None, steps: Any = None) -> Any:
    st, en = _ints(starts), _ints(ends)
    ax = _ints(axes) if axes is not None else list(range(len(st)))
    sp = _ints(steps) if steps is not None else [1] * len(st)
    for s, e, a, step in zip(st, en, ax, sp, strict=True):
        axis = _norm_axis(a, x.dim())
        dim = x.shape[axis]
        s, e = (s + dim if s < 0 else s), (e + dim if e < 0 else e)
        if step > 0:  # clamping as the ONNX spec defines it
            s, e = max(0, min(dim, s)), max(0, min(dim, e))
            index: list[Any] = [slice(None)] * x.dim()
            index[axis] = slice(s, e, step)
            x = x[tuple(index)]
        elif step < 0:
            # torch has no negative-step slicing; the exporter emits it to reverse pad lists.
            s, e = max(0, min(dim - 1, s)), max(-1, min(dim - 1, e))
            idx = _to_device(torch.tensor(list(range(s, e, step)), dtype=torch.int64), x.device)
            x = torch.index_select(x, axis, idx)
        else:
            raise EngineError("Slice step 0 is invalid")
    return x


def _gather(torch: Any, attrs: Mapping, x: Any, idx: Any) -> Any:
    axis = _norm_axis(int(attrs.get("axis", 0)), x.dim())
    idx = idx.to(torch.int64)
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    idx = _to_device(idx, x.device)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]))


def _reshape(torch: Any, attrs: Mapping, x: Any, shape: Any) -> Any:
    target = _ints(shape)
    if not attrs.get("allowzero", 0):
        target = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
    return x.reshape(target)


def _unsqueeze(torch: Any, attrs: Mapping, x: Any, axes: Any = None) -> Any:
    ax = list(attrs["axes"]) if "axes" in attrs else _ints(axes)
    rank = x.dim() + len(ax)
    for a in sorted(_norm_axis(a, rank) for a in ax):
        x = x.unsqueeze(a)
    return x


def _squeeze(torch: Any, attrs: Mapping, x: Any, axes: Any = None) -> Any:
    ax = list(attrs["axes"]) if "axes" in attrs else (_ints(axes) if axes is not None else None)
    if ax is None:
        return x.squeeze()
    for a in sorted((_norm_axis(a, x.dim()) for a in ax), reverse=True):
        x = x.squeeze(a)
    return x


def _concat(torch: Any, attrs: Mapping, *xs: Any) -> Any:
    xs = [x for x in xs if x is not None]
    devices = {x.device for x in xs}
    if len(devices) > 1:
        target = next(d for d in devices if d.type != "cpu")
        xs = [_to_device(x, target) for x in xs]
    return torch.cat(xs, dim=int(attrs["axis"]))


def _split(torch: Any, attrs: Mapping, x: Any, split: Any = None) -> Any:
    axis = int(attrs.get("axis", 0))
    if split is not None:
        sizes = _ints(split)
    elif "split" in attrs:
        sizes = list(attrs["split"])
    else:
        n = int(attrs["num_outputs"])
        chunk = -(-x.shape[axis] // n)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(n)]
    return list(torch.split(x, sizes, dim=axis))


def _cast(torch: Any, attrs: Mapping, x: Any) -> Any:
    return x.to(getattr(torch, _ONNX_TO_TORCH[int(attrs["to"])]))


def _clip(torch: Any, attrs: Mapping, x: Any, lo: Any = None, hi: Any = None) -> Any:
    lo_v = _scalar(lo) if lo is not None else attrs.get("min")
    hi_v = _scalar(hi) if hi is not None else attrs.get("max")
    return torch.clamp(x, min=lo_v, max=hi_v)


def _const_of_shape(torch: Any, attrs: Mapping, shape: Any) -> Any:
    from onnx import numpy_helper

    value = numpy_helper.to_array(attrs["value"]) if "value" in attrs else np.zeros(1, np.float32)
    t = torch.from_numpy(np.array(value)).reshape(())
    size = _ints(shape)
    # Small results are shape arithmetic (CPU); large ones are data, made on the graph's device.
    device = attrs["_device"] if int(np.prod(size, dtype=np.int64)) > _CACHE_LIMIT else "cpu"
    return torch.full(size, t.item(), dtype=t.dtype, device=device)


def _gemm(torch: Any, attrs: Mapping, a: Any, b: Any, c: Any = None) -> Any:
    if attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if attrs.get("transB", 0):
        b = b.transpose(0, 1)
    y = float(attrs.get("alpha", 1.0)) * (a @ b)
    if c is not None:
        y = y + float(attrs.get("beta", 1.0)) * c
    return y


def _layer_norm(torch: Any, attrs: Mapping, x: Any, scale: Any, bias: Any = None) -> Any:
    axis = _norm_axis(int(attrs.get("axis", -1)), x.dim())
    return torch.nn.functional.layer_norm(x, x.shape[axis:], scale, bias, eps=float(attrs.get("epsilon", 1e-5)))


def _expand(torch: Any, attrs: Mapping, x: Any, shape: Any) -> Any:
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))


def _range(torch: Any, attrs: Mapping, start: Any, limit: Any, delta: Any) -> Any:
    return torch.arange(_scalar(start), _scalar(limit), _scalar(delta), dtype=start.dtype)


def _where(torch: Any, attrs: Mapping, c: Any, a: Any, b: Any) -> Any:
    a, b = _same_device(a, b)
    c, a = _same_device(c, a)
    return torch.where(c, a, b)


def _softmax(torch: Any, attrs: Mapping, x: Any) -> Any:
    return torch.softmax(x, dim=int(attrs.get("axis", -1)))


def _unary(name: str, fn: Callable) -> Callable:
    def op(torch: Any, attrs: Mapping, x: Any) -> Any:
        return fn(torch, x)

    op.__name__ = name
    return op


_OPS: dict[str, Callable] = {
    "Constant": lambda torch, attrs: None,  # folded at load time
    "Add": _binary(lambda torch, a, b: a + b),
    "Sub": _binary(lambda torch, a, b: a - b),
    "Mul": _binary(lambda torch, a, b: a * b),
    "Div": _binary(_div),
    "Mod": _mod,
    "Pow": _binary(lambda torch, a, b: torch.pow(a, b)),
    "MatMul": _binary(lambda torch, a, b: torch.matmul(a, b)),
    "Max": _binary(lambda torch, a, b: torch.maximum(a, b)),
    "Min": _binary(lambda torch, a, b: torch.minimum(a, b)),
    "Equal": _binary(lambda torch, a, b: a == b),
    "Less": _binary(lambda torch, a, b: a < b),
    "Greater": _binary(lambda torch, a, b: a > b),
    "Sqrt": _unary("Sqrt", lambda torch, x: torch.sqrt(x)),
    "Erf": _unary("Erf", lambda torch, x: torch.erf(x)),
    "Exp": _unary("Exp", lambda torch, x: torch.exp(x)),
    "Log": _unary("Log", lambda torch, x: torch.log(x)),
    "Neg": _unary("Neg", lambda torch, x: -x),
    "Abs": _unary("Abs", lambda torch, x: torch.abs(x)),
    "Relu": _unary("Relu", lambda torch, x: torch.relu(x)),
    "Sigmoid": _unary("Sigmoid", lambda torch, x: torch.sigmoid(x)),
    "Tanh": _unary("Tanh", lambda torch, x: torch.tanh(x)),
    "Not": _unary("Not", lambda torch, x: torch.logical_not(x)),
    "Identity": _unary("Identity", lambda torch, x: x),
    "Shape": _unary("Shape", lambda torch, x: torch.tensor(list(x.shape), dtype=torch.int64)),
    "Softmax": _softmax,
    "Gelu": lambda torch, attrs, x: torch.nn.functional.gelu(x, approximate=_s(attrs.get("approximate", "none"))),
    "Transpose": lambda torch, attrs, x: x.permute(*(attrs.get("perm") or reversed(range(x.dim())))),
    "Flatten": lambda torch, attrs, x: x.reshape(
        int(np.prod(x.shape[: _norm_axis(int(attrs.get("axis", 1)), x.dim())], dtype=np.int64)), -1
    ),
    "Conv": _conv,
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda torch, attrs, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "Resize": _resize,
    "Pad": _pad,
    "Slice": _slice,
    "Gather": _gather,
    "Reshape": _reshape,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": _concat,
    "Split": _split,
    "Cast": _cast,
    "Clip": _clip,
    "ConstantOfShape": _const_of_shape,
    "Gemm": _gemm,
    "LayerNormalization": _layer_norm,
    "Expand": _expand,
    "Range": _range,
    "Where": _where,
    "ReduceSum": _reduce("ReduceSum"),
    "ReduceMean": _reduce("ReduceMean"),
    "ReduceMax": _reduce("ReduceMax"),
    "ReduceMin": _reduce("ReduceMin"),
    "ReduceSumSquare": _reduce("ReduceSumSquare"),
    "ReduceL2": _reduce("ReduceL2"),
}

#: ONNX ops this backend runs; anything else is refused at load time with its name.
SUPPORTED_OPS = frozenset(_OPS)


@register_backend("torch-cuda")
class TorchCudaEngine(Engine):
    """A bundle graph interpreted with torch, on CUDA by default (``device="cpu"`` for tests).

    ``cuda_graph``: capture batch-1 calls with repeating shapes into a CUDA graph (CUDA only).
    """

    def __init__(
        self,
        path: Path,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        device: str = "cuda",
        cuda_graph: bool = True,
    ):
        super().__init__(path, inputs, outputs)
        if not self.path.is_file():
            raise EngineError(f"graph file {self.path} does not exist")
        torch = _torch()
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineError("torch-cuda: torch sees no CUDA device")
        self.torch = torch
        self.device = torch.device(device)
        try:
            self.graph = OnnxTorchGraph(self.path, device)
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"cannot load graph {self.path}: {exc}") from exc
        want_in, want_out = {s.name for s in inputs}, {s.name for s in outputs}
        if set(self.graph.input_names) != want_in or not want_out <= set(self.graph.output_names):
            raise EngineError(
                f"graph {self.path} does not match its manifest entry: graph inputs "
                f"{sorted(self.graph.input_names)} outputs {sorted(self.graph.output_names)}, "
                f"manifest {sorted(want_in)} / {sorted(want_out)}"
            )
        self.use_cuda_graph = cuda_graph and self.device.type == "cuda"
        self._cuda_graph: Any = None
        self._static_in: dict[str, Any] = {}
        self._static_out: dict[str, Any] = {}
        self._signature: tuple | None = None
        self._lock = threading.Lock()

    def _feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
        return {
            n: self.torch.from_numpy(np.ascontiguousarray(v)).to(self.device, non_blocking=True)
            for n, v in feeds.items()
        }

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # One engine is shared by every camera; the captured graph's static buffers are not.
        with self._lock:
            return self._run_locked(feeds)

    def _run_locked(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        signature = tuple(sorted((n, v.shape, str(v.dtype)) for n, v in feeds.items()))
        batch_one = all(v.shape[0] == 1 for n, v in feeds.items() if not n.startswith("bank"))
        with torch.inference_mode():
            if self.use_cuda_graph and batch_one:
                if signature != self._signature:
                    self._capture(feeds, signature)
                for n, v in feeds.items():
                    self._static_in[n].copy_(torch.from_numpy(np.ascontiguousarray(v)), non_blocking=True)
                self._cuda_graph.replay()
                out = self._static_out
            else:
                out = self.graph(**self._feeds(feeds))
            return {s.name: out[s.name].cpu().numpy().astype(DTYPES[s.dtype], copy=False) for s in self.outputs}

    def _capture(self, feeds: Mapping[str, np.ndarray], signature: tuple) -> None:
        """Record one run for these shapes into a CUDA graph (torch wants a side-stream warm-up first)."""
        torch = self.torch
        self._cuda_graph = None
        self._static_in = self._feeds(feeds)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.graph(**self._static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._static_out = self.graph(**self._static_in)
        self._cuda_graph = graph
        self._signature = signature

    def describe(self) -> str:
        name = self.torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return f"torch-cuda ({name}{', CUDA graphs' if self.use_cuda_graph else ''})"

    @classmethod
    def why_not(cls) -> str | None:
        # Called for every backend whenever "auto" is resolved, so it must not import torch (seconds,
        # and the runtime promises not to): it reads torch's version.py and looks for a GPU device node.
        for module in ("torch", "onnx"):
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                return f"{module} is not installed (the torch-cuda backend needs torch with CUDA and onnx)"
        if "torch" in sys.modules:
            return None if sys.modules["torch"].cuda.is_available() else "torch sees no CUDA device"
        if torch_cuda_version() is None:
            return "this torch is a CPU-only build (install a CUDA build of torch)"
        if not any(Path(p).exists() for p in _GPU_NODES):
            return "no NVIDIA GPU device node (/dev/nvidia0 or Jetson /dev/nvgpu) is present"
        return None


#: Device nodes of an NVIDIA GPU: discrete/driver GPUs, and Jetson's integrated GPU.
_GPU_NODES = ("/dev/nvidia0", "/dev/nvgpu/igpu0", "/dev/nvhost-ctrl-gpu")


def torch_cuda_version() -> str | None:
    """The CUDA version the installed torch was built for (``None``: CPU build), without importing torch."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    version_py = Path(list(spec.submodule_search_locations)[0]) / "version.py"
    try:
        text = version_py.read_text()
    except OSError:
        return None
    match = re.search(r"^cuda\b[^=]*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return match.group(1) if match else None
