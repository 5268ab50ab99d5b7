"""Reading a Hugging Face LLaMA checkpoint and PandaGPT's LoRA delta for the GGUF export: the
sentencepiece vocabulary, ``config.json``, the weight shards (one at a time) and the LoRA pairs,
checked against the shapes the config implies; and the q/k row order llama.cpp expects."""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

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


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield (field number, wire type, value) of a protobuf message; varints as int, the rest as bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        val: int | bytes
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
        # The wire type fixes a value's type (0: an int, 2 and 5: bytes); isinstance says so to mypy.
        for num, wire, val in _fields(data):
            if num != 1 or wire != 2 or not isinstance(val, bytes):
                continue
            piece, score, ptype = "", 0.0, 1
            for n2, w2, v2 in _fields(val):
                if n2 == 1 and w2 == 2 and isinstance(v2, bytes):
                    piece = v2.decode("utf-8")
                elif n2 == 2 and w2 == 5 and isinstance(v2, bytes):
                    score = struct.unpack("<f", v2)[0]
                elif n2 == 3 and w2 == 0 and isinstance(v2, int):
                    ptype = v2
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


class Weights:
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
