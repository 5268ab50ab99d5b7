"""Torch → ONNX export and the FP16 variant, shared by every source (default and AnomalyGPT)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import onnx
import torch

from anomalygpt_edge.engines.base import TensorSpec

OPSET = 17
#: Ops kept in FP32 in the FP16 variants. LayerNorm statistics, softmax and the L2-norm reductions
#: overflow or lose everything in FP16 (a 1280-d residual stream squared easily passes 65504).
FP32_OPS = [
    "LayerNormalization",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL2",
    "Pow",
    "Sqrt",
    "Softmax",
    "Div",
    "Erf",
]
_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.UINT8: "uint8",
}


def export_onnx(
    module: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    output_names: list[str],
    path: Path,
    dynamic_axes: dict[str, dict[int, str]],
) -> None:
    """Export ``module(*inputs.values())`` to ``path`` with named, partly dynamic axes.

    Uses the TorchScript exporter (``dynamo=False``): it needs no onnxscript and handles the
    data-independent graphs here exactly. Graphs over 2 GB go to ONNX's external-data format.
    """
    module.eval()
    path = Path(path)
    with torch.no_grad():
        result = module(*inputs.values())
    results = result if isinstance(result, (tuple, list)) else (result,)
    # Past 2 GB the exporter writes one external-data file per tensor next to the model; export
    # into a scratch folder so those can be gathered into one ``<name>.data`` file afterwards.
    scratch = path.parent / f".{path.name}.export"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter is deprecated; its warnings are noise here
            torch.onnx.export(
                module,
                tuple(inputs.values()),
                str(scratch / path.name),
                input_names=list(inputs),
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                dynamo=False,
                do_constant_folding=True,
            )
        if len(list(scratch.iterdir())) > 1:
            _gather_external_data(scratch / path.name, path)
        else:
            (scratch / path.name).replace(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _declare_output_shapes(path, output_names, [tuple(r.shape) for r in results], dynamic_axes)
    onnx.checker.check_model(str(path))


#: Alignment of tensors in a gathered external-data file (lets runtimes memory-map them).
_DATA_ALIGN = 4096


def _gather_external_data(src: Path, dst: Path) -> None:
    """Rewrite ``src`` (external data in one file per tensor) as ``dst`` + one ``dst.name + '.data'``.

    Streams tensor by tensor, so a multi-GB graph never sits in memory twice.
    """
    model = onnx.load(str(src), load_external_data=False)
    data_name = dst.name + ".data"
    offset = 0
    with open(dst.parent / data_name, "wb") as out:
        for tensor in _all_tensors(model):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in tensor.external_data}
            with open(src.parent / info["location"], "rb") as f:
                f.seek(int(info.get("offset", 0)))
                blob = f.read(int(info["length"])) if "length" in info else f.read()
            pad = (-offset) % _DATA_ALIGN
            out.write(b"\0" * pad)
            offset += pad
            out.write(blob)
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(blob)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += len(blob)
    onnx.save(model, str(dst))


def _all_tensors(model: onnx.ModelProto):
    """Initializers plus tensors held in node attributes (Constant nodes), top graph only."""
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t


def _declare_output_shapes(
    path: Path, names: list[str], shapes: list[tuple[int, ...]], dynamic_axes: dict[str, dict[int, str]]
) -> None:
    """Write exact output shapes into the graph: fixed sizes from the traced run, names for dynamic axes.

    The TorchScript exporter leaves many output dims symbolic; the manifest and TensorRT profiles
    need them concrete.
    """
    model = onnx.load(str(path), load_external_data=False)
    outputs = {o.name: o for o in model.graph.output}
    for name, shape in zip(names, shapes):
        dims = outputs[name].type.tensor_type.shape.dim
        del dims[:]
        for axis, size in enumerate(shape):
            dim = dims.add()
            if axis in dynamic_axes.get(name, {}):
                dim.dim_param = dynamic_axes[name][axis]
            else:
                dim.dim_value = int(size)
    onnx.save(model, str(path))


def graph_signature(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX file as :class:`TensorSpec` lists (dynamic axes by name)."""
    model = onnx.load(str(path), load_external_data=False)

    def specs(values) -> list[TensorSpec]:
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim)
            out.append(TensorSpec(v.name, shape, _ONNX_DTYPES[t.elem_type]))
        return out

    return specs(model.graph.input), specs(model.graph.output)


def external_data_files(path: Path) -> list[str]:
    """Names of the external-data files an ONNX file refers to (empty for a self-contained file)."""
    model = onnx.load(str(path), load_external_data=False)
    names = set()
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                names.add(entry.value)
    return sorted(names)


def _toposort(graph: onnx.GraphProto) -> None:
    """Reorder nodes topologically in place (the FP16 converter appends its Casts out of order)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or dangling input at node {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def to_fp16(src: Path, dst: Path) -> None:
    """Write an FP16 copy of ``src``: FP16 inputs/outputs and weights, FP32 kept for :data:`FP32_OPS`.

    The result is strongly typed (every tensor has one declared type), which is what TensorRT's
    strongly-typed builds read precision from.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # A graph with external data (past 2 GB) is converted from its path: the converter then runs
    # shape inference on the file (in-memory inference cannot serialise > 2 GB) and the FP16 copy,
    # still over 2 GB for the full encoder's activations-free weights, is saved with external data.
    large = bool(external_data_files(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = str(src) if large else onnx.load(str(src))
        half = convert_float_to_float16(source, keep_io_types=False, op_block_list=FP32_OPS)
    _toposort(half.graph)
    if large:
        onnx.save_model(
            half,
            str(dst),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=dst.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(half, str(dst))
    onnx.checker.check_model(str(dst))
