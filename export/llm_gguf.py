"""Vicuna-7B + PandaGPT LoRA delta -> GGUF (f16) -> quantised GGUF, for llama.cpp.

Input is a Hugging Face LLaMA folder (``config.json``, ``tokenizer.model``, weights as
``*.safetensors`` or ``pytorch_model*.bin``; ``.bin`` is read with ``torch.load(weights_only=True)``
so no pickle code runs) and PandaGPT's delta file, which holds the LoRA matrices of q/k/v/o
(r = alpha = 32, so scale 1.0) and ``llama_proj``. The LoRA is merged (W <- W + alpha/r * B A)
in float32 before anything else touches the weight. ``llama_proj`` is the vision bundle's
business (its encoder emits the LLM-width image vector) and is skipped here.

llama.cpp's LLaMA graph applies RoPE to interleaved pairs while HF checkpoints store q/k rows in
"rotate-half" order, so q_proj/k_proj rows are permuted back (per head, halves interleaved), the
same transform llama.cpp's own converter applies.

Tensors are written one at a time (header first, then data), so a 7B model never sits in RAM
whole. Quantisation goes through ``llama_model_quantize`` from llama-cpp-python.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# Reading the checkpoint is a module of its own; the tests import these names from here.
from anomalygpt_edge.export.llm_checkpoint import (
    LlamaConfig,
    LLMExportError,
    Weights,
    build_vocab,
    check_base_tensors,
    expected_hf_shapes,
    gguf_name,
    load_lora,
    permute_rope,
    read_sentencepiece,
)

__all__ = [
    "EXPORTER_VERSION", "QUANT_FTYPES", "VICUNA_V0_TEMPLATE", "LLMExportError", "LlamaConfig", "build_vocab",
    "check_base_tensors", "expected_hf_shapes", "export_llm", "gguf_name", "load_lora", "permute_rope", "quantize",
    "read_sentencepiece", "run", "write_gguf",
]  # fmt: skip

log = logging.getLogger(__name__)

EXPORTER_VERSION = "1"
#: AnomalyGPT's conversation (architecture notes §6) as a Jinja chat template, for tools that
#: render one; the runtime builds the sequence itself because it interleaves embeddings.
VICUNA_V0_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Human: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Assistant: ' + message['content'] + '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:' }}{% endif %}"
)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_checkpoint(base: Path) -> tuple[LlamaConfig, list, Weights, dict[str, tuple[int, ...]]]:
    """The config, sentencepiece pieces, weight shards and expected shapes of ``base``, all checked."""
    cfg = LlamaConfig.load(base / "config.json")
    if cfg.hidden % cfg.heads or (cfg.hidden // cfg.heads) % 2:
        raise LLMExportError(
            f"{base / 'config.json'}: hidden {cfg.hidden} / heads {cfg.heads} is not an even head size"
        )
    tok_path = base / "tokenizer.model"
    if not tok_path.is_file():
        raise LLMExportError(f"{base}: tokenizer.model (sentencepiece) is missing")
    pieces = read_sentencepiece(tok_path)
    if len(pieces) > cfg.vocab:
        raise LLMExportError(f"{tok_path}: {len(pieces)} pieces but config.json vocab_size is {cfg.vocab}")
    weights = Weights(base)
    check_base_tensors(weights.names(), cfg)
    shapes = expected_hf_shapes(cfg)
    for n, shp in shapes.items():
        got = weights.shape(n)
        if got != shp:
            raise LLMExportError(f"{base}: tensor '{n}' has shape {got}, config.json implies {shp}")
    return cfg, pieces, weights, shapes


def _add_model_keys(w: Any, cfg: LlamaConfig, name: str) -> None:
    """The LLaMA hyper-parameters llama.cpp reads."""
    import gguf

    w.add_name(name)
    w.add_context_length(cfg.ctx)
    w.add_embedding_length(cfg.hidden)
    w.add_block_count(cfg.layers)
    w.add_feed_forward_length(cfg.ffn)
    w.add_head_count(cfg.heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_rope_dimension_count(cfg.hidden // cfg.heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_vocab_size(cfg.vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)


def _add_tokenizer_keys(w: Any, cfg: LlamaConfig, base: Path, pieces: list) -> None:
    """The sentencepiece vocabulary as llama.cpp's "llama" (SPM) model, with its special tokens."""
    tokens, scores, types = build_vocab(base, pieces, cfg.vocab)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(cfg.bos)
    w.add_eos_token_id(cfg.eos)
    unk = next((i for i, (_, _, t) in enumerate(pieces) if t == 2), None)
    if unk is not None:
        w.add_unk_token_id(unk)
    # AnomalyGPT pads with eos (tokenizer.pad_token = eos_token).
    w.add_pad_token_id(cfg.pad if cfg.pad is not None else cfg.eos)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.add_chat_template(VICUNA_V0_TEMPLATE)


def _add_anomalygpt_keys(w: Any, lora_note: str) -> None:
    """AnomalyGPT's sequence layout, for the runtime and for people reading the file."""
    w.add_string("anomalygpt.conversation.human", "### Human: ")
    w.add_string("anomalygpt.conversation.assistant", "\n### Assistant:")
    w.add_string("anomalygpt.conversation.image", "<Img>{image}</Img> {prompts}")
    w.add_string("anomalygpt.conversation.stop", "###")
    w.add_uint32("anomalygpt.image_embeddings", 1)
    w.add_uint32("anomalygpt.prompt_embeddings", 18)
    w.add_string("anomalygpt.lora", lora_note)
    w.add_string("anomalygpt.exporter_version", EXPORTER_VERSION)


def _tensor_order(cfg: LlamaConfig) -> list[str]:
    """The HF tensor names in the order llama.cpp's converter writes them."""
    order = ["model.embed_tokens.weight"]
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        order += [p + "input_layernorm.weight"] + [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        order += [p + "post_attention_layernorm.weight"] + [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    order += ["model.norm.weight", "lm_head.weight"]
    return order


def write_gguf(
    base: Path,
    out_file: Path,
    lora: Path | None,
    lora_r: int = 32,
    lora_alpha: float = 32.0,
    name: str = "anomalygpt-vicuna-7b",
) -> dict:
    """Write ``out_file`` (GGUF, f16 matrices, f32 norms); returns a summary for ``llm.json``."""
    import gguf

    cfg, pieces, weights, shapes = _read_checkpoint(base)
    pairs = load_lora(lora, cfg, lora_r) if lora is not None else {}
    scale = lora_alpha / lora_r

    w = gguf.GGUFWriter(str(out_file), "llama")
    _add_model_keys(w, cfg, name)
    _add_tokenizer_keys(w, cfg, base, pieces)
    _add_anomalygpt_keys(w, f"merged r={lora_r} alpha={lora_alpha:g} q,k,v,o" if pairs else "none")
    order = _tensor_order(cfg)
    for n in order:
        dt = np.float32 if len(shapes[n]) == 1 else np.float16
        w.add_tensor_info(gguf_name(n), shapes[n], np.dtype(dt), int(np.prod(shapes[n])) * np.dtype(dt).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for n in order:
        w.write_tensor_data(_converted(weights, n, cfg, pairs, scale))
    w.close()
    return {
        "lora": None
        if lora is None
        else {
            "file": lora.name,
            "sha256": _sha256(lora),
            "r": lora_r,
            "alpha": lora_alpha,
            "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
        },
        "base_files": {f.name: _sha256(f) for f in weights.files},
        "config": cfg.__dict__,
    }


def _converted(weights: Weights, n: str, cfg: LlamaConfig, pairs: dict, scale: float) -> np.ndarray:
    """One tensor in GGUF form: LoRA merged in float32, q/k permuted, matrices f16, norms f32."""
    import torch

    t = weights.get(n).to(torch.float32).numpy()
    m = re.match(r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight$", n)
    if m and pairs:
        a, b = pairs[(int(m.group(1)), m.group(2))]
        t = t + scale * (b @ a)
    if m and m.group(2) == "q":
        t = permute_rope(t, cfg.heads)
    elif m and m.group(2) == "k":
        t = permute_rope(t, cfg.kv_heads)
    if t.ndim == 1:
        return np.ascontiguousarray(t, dtype=np.float32)
    if np.abs(t).max() > 65504:
        raise LLMExportError(f"tensor '{n}' has values beyond float16 range")
    return np.ascontiguousarray(t, dtype=np.float16)


QUANT_FTYPES = {"q4_k_m": ("Q4_K_M", 15), "q8_0": ("Q8_0", 7)}


def quantize(src: Path, dst: Path, kind: str, threads: int = 0) -> None:
    """Quantise ``src`` into ``dst`` with llama.cpp's ``llama_model_quantize``."""
    import llama_cpp

    from anomalygpt_edge.engines.llama_cpp_backend import _set_verbose

    _set_verbose(False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[kind][1]
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), llama_cpp.byref(params))
    if rc != 0 or not dst.is_file():
        raise LLMExportError(f"llama_model_quantize {src.name} -> {dst.name} ({kind}) failed with {rc}")


def export_llm(
    base: Path,
    out: Path,
    lora: Path | None,
    lora_r: int = 32,
    lora_alpha: float = 32.0,
    quants: list[str] | tuple[str, ...] = ("q4_k_m", "q8_0"),
    name: str = "anomalygpt-vicuna-7b",
    overwrite: bool = False,
    threads: int = 0,
    progress: Callable[[str], None] = log.info,
) -> dict:
    """Write ``{name}.f16.gguf``, the quantised GGUFs and ``llm.json`` into ``out``; return the manifest."""
    from anomalygpt_edge.engines.gguf_check import check_gguf

    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"{name}.f16.gguf"] + [out / f"{name}.{QUANT_FTYPES[q][0]}.gguf" for q in quants]
    clash = [f.name for f in files + [out / "llm.json"] if f.exists()]
    if clash and not overwrite:
        raise LLMExportError(f"{out}: {', '.join(clash)} exist; pass --overwrite to replace them")
    t0 = time.perf_counter()
    # Write under a temporary name: a crash never leaves a plausible-looking half file.
    tmp = files[0].with_suffix(".gguf.partial")
    summary = write_gguf(base, tmp, lora, lora_r, lora_alpha, name)
    tmp.replace(files[0])
    progress(f"wrote {files[0]} ({files[0].stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    for q, f in zip(quants, files[1:], strict=True):
        t1 = time.perf_counter()
        part = f.with_suffix(".gguf.partial")
        quantize(files[0], part, q, threads)
        part.replace(f)
        progress(f"wrote {f} ({f.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t1:.1f} s")
    manifest = {"exporter_version": EXPORTER_VERSION, "files": {}, **summary}
    for f in files:
        info = check_gguf(f)  # what we hand to llama.cpp later must pass our own validator
        manifest["files"][f.name] = {
            "sha256": _sha256(f),
            "bytes": f.stat().st_size,
            "tensors": len(info.tensors),
        }
    (out / "llm.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def run(args: argparse.Namespace) -> int:
    """Handler of ``anomalygpt-edge export llm``."""
    try:
        export_llm(
            args.base,
            args.out,
            None if args.no_lora else args.lora,
            args.lora_r,
            args.lora_alpha,
            args.quant,
            args.name,
            args.overwrite,
            args.threads,
            progress=print,
        )
    except LLMExportError as exc:
        print(f"anomalygpt-edge export llm: {exc}")
        return 2
    return 0
