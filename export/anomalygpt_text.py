"""The text side of AnomalyGPT (export only): the prompt ensemble, the class names, CLIP's BPE tokenizer
and ImageBind's text tower.

The decoder's per-class text features depend only on the class, so they are computed here once
and stored in the bundle as data; the text tower never becomes an ONNX graph.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from anomalygpt_edge.export.anomalygpt_models import FULL, AnomalyGPTConfig, VisionBlock

#: AnomalyGPT's prompt ensemble (op:17-21): 7 normal and 5 abnormal states, 2 templates.
PROMPT_NORMAL = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
PROMPT_ABNORMAL = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
PROMPT_TEMPLATES = ("a photo of a {}.", "a photo of the {}.")
#: Every object name AnomalyGPT precomputes sentences for (op:31-32), underscores already spaces.
OBJECT_NAMES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal nut", "pill", "screw",
    "tile", "toothbrush", "transistor", "wood", "zipper", "object", "candle", "cashew", "chewinggum",
    "fryum", "macaroni", "pcb", "pipe fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4",
    "capsules",
)  # fmt: skip
#: The class-selection list (op:14-15): the first entry found as a substring of the user prompt
#: wins, else "object". Order matters ("pcb" before "pipe fryum", "fryum" before "pipe fryum").
CLASS_NAMES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal nut", "pill", "screw",
    "tile", "toothbrush", "transistor", "wood", "zipper", "object", "candle", "cashew", "chewinggum",
    "fryum", "macaroni", "pcb", "pipe fryum",
)  # fmt: skip
DEFAULT_CLASS = "object"


def class_sentences(obj: str) -> tuple[list[str], list[str]]:
    """The 14 normal and 10 abnormal sentences of one object, in AnomalyGPT's order."""

    def expand(states: tuple[str, ...]) -> list[str]:
        return [t.format(s.format(obj)) for s in states for t in PROMPT_TEMPLATES]

    return expand(PROMPT_NORMAL), expand(PROMPT_ABNORMAL)


def select_class(prompt: str, classes: tuple[str, ...] = CLASS_NAMES, default: str = DEFAULT_CLASS) -> str:
    """AnomalyGPT's class selection (op:588-593): first class named in ``prompt``, else ``default``."""
    for name in classes:
        if name in prompt:
            return name
    return default


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-unicode table (printable bytes map to themselves).

    Insertion order matters: the vocabulary lists the symbols in this order, printable bytes first
    (in byte order), then the remaining bytes mapped to code points from 256 up.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    for extra, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + extra)
    return table


class ClipBPETokenizer:
    """CLIP's byte-level BPE (ImageBind's ``SimpleTokenizer``) for the ASCII prompt sentences.

    ``vocab_path`` is CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (a header line then merges). Text is
    lower-cased and whitespace-collapsed; the original's ftfy/html clean-up is the identity on the
    fixed ASCII sentences used here, and non-ASCII text is refused rather than tokenised differently.
    """

    #: CLIP keeps the first 49152 - 256 - 2 merges.
    MAX_MERGES = 49152 - 256 - 2

    def __init__(self, vocab_path: str | Path, context_length: int = 77):

        with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1 : self.MAX_MERGES + 1]
        merges = [tuple(line.split()) for line in lines if line.strip()]
        symbols = list(_bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = _bytes_to_unicode()
        self.sot, self.eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
        self.context_length = context_length
        # CLIP's pattern with \p{L} / \p{N} narrowed to ASCII (input is checked to be ASCII).
        self.pattern = re.compile(
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+"
        )

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, token: str) -> list[str]:
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word[:-1], word[1:], strict=True)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text: str) -> list[int]:
        if not text.isascii():
            raise ValueError(f"the prompt tokenizer takes ASCII sentences only, got {text!r}")
        text = " ".join(text.split()).lower()
        ids: list[int] = []
        for token in self.pattern.findall(text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self._bpe(token))
        return ids

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), context_length) int64: [SOT] ids [EOT], zero-padded, truncated keeping EOT."""
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot, *self.encode(text), self.eot]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length - 1] + [self.eot]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


class ImageBindText(nn.Module):
    """ImageBind's text tower: token + positional embedding, causal pre-norm blocks (no pre-LN),
    the EOS token (at ``argmax`` of the ids, as EOT has the largest id) -> LayerNorm -> Linear (no
    bias) -> L2-normalise. The learnable logit scale is omitted: AnomalyGPT re-normalises the
    averaged features, which cancels it.
    """

    #: The causal attention mask, a registered buffer: declared so its type is known.
    mask: torch.Tensor

    def __init__(self, cfg: AnomalyGPTConfig = FULL):
        super().__init__()
        self.cfg = cfg
        w = cfg.text_width
        self.token_embedding = nn.Embedding(cfg.text_vocab, w)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.text_context, w) * 0.01)
        self.blocks = nn.ModuleList(
            VisionBlock(w, cfg.text_heads, cfg.mlp_ratio, cfg.ln_eps) for _ in range(cfg.text_depth)
        )
        self.head_norm = nn.LayerNorm(w, eps=cfg.ln_eps)
        self.head_proj = nn.Linear(w, cfg.embed_dim, bias=False)
        mask = torch.full((cfg.text_context, cfg.text_context), float("-inf")).triu(1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = (self.token_embedding(ids) + self.pos_embed).transpose(0, 1)
        for block in self.blocks:
            x = block(x, attn_mask=self.mask)
        x = x.transpose(0, 1)[torch.arange(ids.shape[0]), ids.argmax(dim=-1)]
        return F.normalize(self.head_proj(self.head_norm(x)), dim=-1)


@torch.no_grad()
def class_text_features(text: ImageBindText, tokenizer: ClipBPETokenizer, obj: str) -> torch.Tensor:
    """(2, E) [normal, abnormal] features of one object, as ``encode_text_with_prompt_ensemble``:
    each state's sentence embeddings averaged, then re-normalised."""
    feats = []
    for sentences in class_sentences(obj):
        emb = text(tokenizer(sentences)).mean(dim=0)
        feats.append(emb / emb.norm())
    return torch.stack(feats)
