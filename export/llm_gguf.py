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
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
# HF checkpoints of that era carry RoPE caches as buffers; they are recomputed, never stored.
_IGNORED_BASE = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_LORA_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.self_attn\.([qkvo])_proj\.lora_([AB])(?:\.default)?\.weight$")
_IGNORED_DELTA = re.compile(r"^(?:.*\.)?llama_proj\.(weight|bias)$")

# sentencepiece piece types and llama.cpp's GGUF token types share their numbering: 1 normal,
# 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte. Anything else is treated as normal.
_KNOWN_TOKEN_TYPES = {1, 2, 3, 4, 5, 6}


class LLMExportError(RuntimeError):
    """The checkpoint cannot be exported; the message says which file or tensors are at fault."""


# --- tokenizer -------------------------------------------------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    """Yield (field number, wire type, value) of a protobuf message; length-delimited as bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = _varint(buf, pos)
        elif wire == 1:
            val, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated field")
            val, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            val, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield num, wire, val


def read_sentencepiece(path: Path) -> list[tuple[str, float, int]]:
    """(piece, score, sentencepiece type) of every vocabulary entry of a ``tokenizer.model``.

    The file is a protobuf ``ModelProto`` whose field 1 repeats ``SentencePiece {piece=1, score=2,
    type=3}``; reading those three fields needs no sentencepiece library. Types: 1 normal,
    2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    """
    try:
        data = Path(path).read_bytes()
        pieces = []
        for num, wire, val in _fields(data):
            if num != 1 or wire != 2:
                continue
            piece, score, ptype = "", 0.0, 1
            for n2, w2, v2 in _fields(val):  # type: ignore[arg-type]
                if n2 == 1 and w2 == 2:
                    piece = bytes(v2).decode("utf-8")  # type: ignore[arg-type]
                elif n2 == 2 and w2 == 5:
                    score = struct.unpack("<f", v2)[0]  # type: ignore[arg-type]
                elif n2 == 3 and w2 == 0:
                    ptype = int(v2)  # type: ignore[arg-type]
            pieces.append((piece, score, ptype))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise LLMExportError(f"{path}: not a readable sentencepiece model ({exc})") from exc
    if not pieces:
        raise LLMExportError(f"{path}: no vocabulary pieces found (not a sentencepiece model?)")
    return pieces


# --- checkpoint reading ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaConfig:
    """The HF ``config.json`` fields the GGUF needs."""

    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    rms_eps: float
    ctx: int
    rope_theta: float
    bos: int
    eos: int
    pad: int | None

    @classmethod
    def load(cls, path: Path) -> LlamaConfig:
        try:
            c = json.loads(path.read_text())
            heads = int(c["num_attention_heads"])
            return cls(
                hidden=int(c["hidden_size"]),
                ffn=int(c["intermediate_size"]),
                layers=int(c["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(c.get("num_key_value_heads") or heads),
                vocab=int(c["vocab_size"]),
                rms_eps=float(c.get("rms_norm_eps", 1e-6)),
                ctx=int(c.get("max_position_embeddings", 2048)),
                rope_theta=float(c.get("rope_theta", 10000.0)),
                bos=int(c.get("bos_token_id", 1)),
                eos=int(c.get("eos_token_id", 2)),
                pad=None if c.get("pad_token_id") in (None, -1) else int(c["pad_token_id"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LLMExportError(f"{path}: not a usable LLaMA config.json ({exc!r})") from exc


def build_vocab(base: Path, pieces: list[tuple[str, float, int]], vocab_size: int) -> tuple[list, list, list]:
    """Tokens, scores and GGUF token types for ``vocab_size`` ids.

    The sentencepiece pieces come first; tokens from ``added_tokens.json`` (Vicuna v0 adds
    ``[PAD]`` as id 32000) take their ids after them, as control tokens; any id still free up to
    the embedding matrix's size becomes an unused ``[PAD<id>]``.
    """
    tokens = [p for p, _, _ in pieces]
    scores = [s for _, s, _ in pieces]
    types = [t if t in _KNOWN_TOKEN_TYPES else 1 for _, _, t in pieces]
    added: dict[int, str] = {}
    added_file = base / "added_tokens.json"
    if added_file.is_file():
        try:
            added = {int(i): str(t) for t, i in json.loads(added_file.read_text()).items()}
        except (ValueError, AttributeError) as exc:
            raise LLMExportError(f"{added_file}: not a token -> id mapping ({exc})") from exc
    for i in sorted(added):
        if i < len(pieces):
            if tokens[i] != added[i]:
                raise LLMExportError(f"{added_file}: '{added[i]}' claims id {i}, which is '{tokens[i]}'")
            continue
        if i >= vocab_size:
            raise LLMExportError(f"{added_file}: '{added[i]}' has id {i}, beyond vocab_size {vocab_size}")
    for i in range(len(pieces), vocab_size):
        if i in added:
            tokens.append(added[i])
            types.append(3)
            scores.append(0.0)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(5)
            scores.append(-1000.0)
    return tokens, scores, types


def expected_hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF ``LlamaForCausalLM`` checkpoint must hold, with its shape."""
    head_dim = cfg.hidden // cfg.heads
    kv = cfg.kv_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab, cfg.hidden),
        "model.norm.weight": (cfg.hidden,),
        "lm_head.weight": (cfg.vocab, cfg.hidden),
    }
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (cfg.hidden,),
            p + "post_attention_layernorm.weight": (cfg.hidden,),
            p + "self_attn.q_proj.weight": (cfg.hidden, cfg.hidden),
            p + "self_attn.k_proj.weight": (kv, cfg.hidden),
            p + "self_attn.v_proj.weight": (kv, cfg.hidden),
            p + "self_attn.o_proj.weight": (cfg.hidden, cfg.hidden),
            p + "mlp.gate_proj.weight": (cfg.ffn, cfg.hidden),
            p + "mlp.up_proj.weight": (cfg.ffn, cfg.hidden),
            p + "mlp.down_proj.weight": (cfg.hidden, cfg.ffn),
        }
    return shapes


def gguf_name(hf: str) -> str:
    """llama.cpp's tensor name for an HF LLaMA tensor name."""
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in fixed:
        return fixed[hf]
    m = re.match(r"model\.layers\.(\d+)\.(.+)\.weight$", hf)
    if not m:
        raise LLMExportError(f"no GGUF name for tensor '{hf}'")
    part = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }[m.group(2)]
    return f"blk.{m.group(1)}.{part}.weight"


class _Weights:
    """Name -> tensor loader over a folder of safetensors or .bin shards (loaded one at a time)."""

    def __init__(self, base: Path):
        import torch

        self._torch = torch
        self.files: list[Path] = sorted(base.glob("*.safetensors"))
        self._where: dict[str, Path] = {}
        self._bin_cache: tuple[Path, dict] | None = None
        if self.files:
            from safetensors import safe_open

            for f in self.files:
                with safe_open(str(f), framework="pt") as fh:
                    for k in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                        self._where[k] = f
        else:
            self.files = sorted(base.glob("pytorch_model*.bin")) + sorted(base.glob("consolidated*.pth"))
            if not self.files:
                raise LLMExportError(f"{base}: no *.safetensors or pytorch_model*.bin weight files")
            for f in self.files:
                for k in self._load_bin(f):
                    self._where[k] = f

    def _load_bin(self, f: Path) -> dict:
        if self._bin_cache and self._bin_cache[0] == f:
            return self._bin_cache[1]
        try:
            # mmap keeps a 7B shard out of RAM; files in torch's legacy (non-zip) format cannot be
            # memory-mapped and are read whole instead.
            try:
                sd = self._torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                sd = self._torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types; the message says which file
            raise LLMExportError(f"{f}: cannot read with torch.load(weights_only=True): {exc}") from exc
        if not isinstance(sd, dict):
            raise LLMExportError(f"{f}: expected a state dict, got {type(sd).__name__}")
        self._bin_cache = (f, sd)
        return sd

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a tensor without reading its data."""
        f = self._where[name]
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as fh:
                return tuple(fh.get_slice(name).get_shape())
        return tuple(self._load_bin(f)[name].shape)

    def get(self, name: str):  # noqa: ANN201 - torch.Tensor
        f = self._where[name]
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as fh:
                return fh.get_tensor(name)
        return self._load_bin(f)[name]


def _list(names: set[str] | list[str], limit: int = 24) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_base_tensors(present: set[str], cfg: LlamaConfig) -> None:
    """Raise :class:`LLMExportError` listing missing and unexpected base-model tensors."""
    expected = set(expected_hf_shapes(cfg))
    present = {n for n in present if not _IGNORED_BASE.match(n)}
    missing, unexpected = expected - present, present - expected
    if missing or unexpected:
        msg = ["base checkpoint does not match a LLaMA with this config.json"]
        if missing:
            msg.append(f"missing {len(missing)} tensors: {_list(missing)}")
        if unexpected:
            msg.append(f"unexpected {len(unexpected)} tensors: {_list(unexpected)}")
        raise LLMExportError("; ".join(msg))


def load_lora(path: Path, cfg: LlamaConfig, r: int) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """Read PandaGPT's delta: ``{(layer, 'q'|'k'|'v'|'o'): (A (r, in), B (out, r))}`` as float32.

    Every layer must have A and B for all four projections; keys other than the LoRA matrices and
    ``llama_proj`` are an error, listed by name (non-strict loading would skip them silently).
    """
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise LLMExportError(f"{path}: cannot read the LoRA delta: {exc}") from exc
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise LLMExportError(f"{path}: expected a state dict, got {type(sd).__name__}")
    found: dict[tuple[int, str, str], np.ndarray] = {}
    unexpected, ignored = [], []
    for k, v in sd.items():
        m = _LORA_KEY.match(k)
        if m:
            found[(int(m.group(1)), m.group(2), m.group(3))] = v.detach().to(torch.float32).numpy()
        elif _IGNORED_DELTA.match(k):
            ignored.append(k)
        else:
            unexpected.append(k)
    want = {(i, p, ab) for i in range(cfg.layers) for p in "qkvo" for ab in "AB"}
    missing = want - set(found)
    extra = set(found) - want
    if missing or unexpected or extra:
        msg = [f"{path}: not a PandaGPT LoRA delta for this {cfg.layers}-layer model"]
        if missing:
            msg.append(f"missing {len(missing)}: " + _list({_lora_name(*t) for t in missing}))
        if extra:
            msg.append(f"layers out of range {len(extra)}: " + _list({_lora_name(*t) for t in extra}))
        if unexpected:
            msg.append(f"unexpected {len(unexpected)} keys: {_list(unexpected)}")
        raise LLMExportError("; ".join(msg))
    if ignored:
        log.info("%s: skipping %s (it belongs to the vision bundle)", path.name, ", ".join(sorted(ignored)))
    head_dim = cfg.hidden // cfg.heads
    out_dim = {"q": cfg.hidden, "k": cfg.kv_heads * head_dim, "v": cfg.kv_heads * head_dim, "o": cfg.hidden}
    pairs = {}
    for i in range(cfg.layers):
        for p in "qkvo":
            a, b = found[(i, p, "A")], found[(i, p, "B")]
            if a.shape != (r, cfg.hidden) or b.shape != (out_dim[p], r):
                raise LLMExportError(
                    f"{path}: layer {i} {p}_proj LoRA shapes A{a.shape} B{b.shape}, expected "
                    f"A{(r, cfg.hidden)} B{(out_dim[p], r)} (rank {r}; pass --lora-r if it differs)"
                )
            pairs[(i, p)] = (a, b)
    return pairs


def _lora_name(layer: int, proj: str, ab: str) -> str:
    return f"layers.{layer}.self_attn.{proj}_proj.lora_{ab}.weight"


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows from HF's rotate-half layout to llama.cpp's interleaved-pair layout."""
    out, inp = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, inp).swapaxes(1, 2).reshape(out, inp)


# --- writing ---------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    weights = _Weights(base)
    check_base_tensors(weights.names(), cfg)
    shapes = expected_hf_shapes(cfg)
    for n, shp in shapes.items():
        got = weights.shape(n)
        if got != shp:
            raise LLMExportError(f"{base}: tensor '{n}' has shape {got}, config.json implies {shp}")
    pairs = load_lora(lora, cfg, lora_r) if lora is not None else {}
    scale = lora_alpha / lora_r

    w = gguf.GGUFWriter(str(out_file), "llama")
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
    # Tokenizer: sentencepiece vocabulary as llama.cpp's "llama" (SPM) model.
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
    # AnomalyGPT's sequence layout, for the runtime and for people reading the file.
    w.add_string("anomalygpt.conversation.human", "### Human: ")
    w.add_string("anomalygpt.conversation.assistant", "\n### Assistant:")
    w.add_string("anomalygpt.conversation.image", "<Img>{image}</Img> {prompts}")
    w.add_string("anomalygpt.conversation.stop", "###")
    w.add_uint32("anomalygpt.image_embeddings", 1)
    w.add_uint32("anomalygpt.prompt_embeddings", 18)
    w.add_string("anomalygpt.lora", f"merged r={lora_r} alpha={lora_alpha:g} q,k,v,o" if pairs else "none")
    w.add_string("anomalygpt.exporter_version", EXPORTER_VERSION)

    order = ["model.embed_tokens.weight"]
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        order += [p + "input_layernorm.weight"] + [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        order += [p + "post_attention_layernorm.weight"] + [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    order += ["model.norm.weight", "lm_head.weight"]
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


def _converted(weights: _Weights, n: str, cfg: LlamaConfig, pairs: dict, scale: float) -> np.ndarray:
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
