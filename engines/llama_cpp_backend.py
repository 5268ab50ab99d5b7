"""LLM backend on llama.cpp through llama-cpp-python's *low-level* bindings.

The high-level ``llama_cpp.Llama`` takes token ids only; AnomalyGPT needs raw input embeddings
(the image vector and the 18 prompt-learner vectors) between text segments. llama.cpp accepts
those in ``llama_batch.embd``, so this backend drives ``llama_batch_init`` / ``llama_decode``
itself: one token batch and one embedding batch, positions counted here so that text and
embedding segments sit contiguously in sequence 0 of the KV cache, and sampling through
llama.cpp's sampler chain (top-k, top-p, temperature, seeded draw).

Every GGUF passes :func:`anomalygpt_edge.engines.gguf_check.check_gguf` before llama.cpp parses
it: GGUF files are untrusted input.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from anomalygpt_edge.engines.gguf_check import check_gguf
from anomalygpt_edge.engines.llm import (
    LLM,
    Generation,
    GenerationConfig,
    LLMError,
    Segment,
    register_llm_backend,
)

if TYPE_CHECKING:  # both ship py.typed; imported lazily at run time (the [llm] extra)
    from gguf import GGMLQuantizationType
    from llama_cpp import llama_sampler_p

_init_lock = threading.Lock()
_backend_ready = False


def _lib() -> ModuleType:
    """Import llama_cpp once and initialise its backend (cheap after the first call)."""
    global _backend_ready
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise LLMError("the llama.cpp backend needs llama-cpp-python; install the [llm] extra") from exc
    with _init_lock:
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            _backend_ready = True
    return llama_cpp


def _set_verbose(verbose: bool) -> None:
    # llama-cpp-python routes llama.cpp's log through its own logger; NOTSET prints every line.
    from llama_cpp import _logger

    _logger.set_verbose(verbose)


@register_llm_backend("llama.cpp")
class LlamaCppLLM(LLM):
    """One GGUF model and one context; sequence 0 holds the conversation."""

    def __init__(
        self,
        path: Path,
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_threads: int | None = None,
        verbose: bool = False,
        check: bool = True,
    ):
        self.path = Path(path)
        if check:
            self.info = check_gguf(self.path)
        lib = _lib()
        _set_verbose(verbose)
        self._lib = lib
        # Half the cores by default: the LLM runs beside the vision pipeline, which needs the rest,
        # and oversubscribed ggml threads spin-wait (measured 4-6x slower on a loaded 2-core box).
        threads = n_threads or max(1, (os.cpu_count() or 2) // 2)

        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self._model = lib.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self._model:
            raise LLMError(f"{self.path}: llama.cpp could not load the model")
        self._vocab = lib.llama_model_get_vocab(self._model)
        self._n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        self._n_embd = int(lib.llama_model_n_embd_inp(self._model))

        cparams = lib.llama_context_default_params()
        # Positions past the training context give garbage; never ask for more than the model has.
        cparams.n_ctx = min(n_ctx, int(lib.llama_model_n_ctx_train(self._model)) or n_ctx)
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        self._ctx = lib.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            lib.llama_model_free(self._model)
            self._model = None
            raise LLMError(f"{self.path}: llama.cpp could not create a context (n_ctx={n_ctx})")
        self._n_ctx = int(lib.llama_n_ctx(self._ctx))
        self._n_batch = n_batch
        self._mem = lib.llama_get_memory(self._ctx)
        # Two reusable batches: llama_batch carries either token ids or embeddings, never both.
        self._tok_batch = lib.llama_batch_init(n_batch, 0, 1)
        self._emb_batch = lib.llama_batch_init(n_batch, self._n_embd, 1)
        self._n_past = 0
        # Tokens sampled but not yet decoded (the last answer token, or an end-of-generation
        # token): decoded at the start of the next feed so the history stays complete without
        # spending a decode on a token nobody may ask about.
        self._pending: list[int] = []
        self._since_answer_n = 0
        self._since_answer_s = 0.0
        # Lazily read token_embd.weight (see token_embeddings): rows, their ggml type, the gguf module.
        self._embd_rows: tuple[np.ndarray, GGMLQuantizationType, ModuleType] | None = None
        self._lock = threading.RLock()

    # --- properties ----------------------------------------------------------------------------
    @property
    def n_embd(self) -> int:
        return self._n_embd

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def n_vocab(self) -> int:
        """Vocabulary size (rows of the logits)."""
        return self._n_vocab

    @property
    def n_past(self) -> int:
        return self._n_past + len(self._pending)

    @property
    def bos_id(self) -> int:
        return int(self._lib.llama_vocab_bos(self._vocab))

    @property
    def eos_id(self) -> int:
        return int(self._lib.llama_vocab_eos(self._vocab))

    def describe(self) -> str:
        """One line for logs: backend, file, size."""
        buf = ctypes.create_string_buffer(256)
        self._lib.llama_model_desc(self._model, buf, len(buf))
        return f"llama.cpp {buf.value.decode(errors='replace')} ({self.path.name}, n_ctx {self._n_ctx})"

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value as llama.cpp reads it, or ``None``."""
        buf = ctypes.create_string_buffer(1 << 16)
        n = self._lib.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return None if n < 0 else buf.value.decode("utf-8", errors="replace")

    # --- text ----------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (self._lib.llama_token * cap)()
        n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, True)
        if n < 0:  # buffer too small: -n is the size needed
            cap = -n
            buf = (self._lib.llama_token * cap)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, True)
        if n < 0:
            raise LLMError(f"{self.path.name}: could not tokenize {text[:40]!r}")
        return list(buf[:n])

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def detokenize(self, ids: Sequence[int]) -> str:
        return b"".join(self._piece(int(t)) for t in ids).decode("utf-8", errors="replace")

    def chat_prompt(self, messages: Sequence[tuple[str, str]], add_assistant: bool = True) -> str:
        lib = self._lib
        tmpl = lib.llama_model_chat_template(self._model, None)
        if not tmpl:
            raise LLMError(f"{self.path.name}: the model has no chat template")
        keep = [(r.encode(), c.encode()) for r, c in messages]  # keep bytes alive for the C call
        arr = (lib.llama_chat_message * len(keep))()
        for i, (r, c) in enumerate(keep):
            arr[i].role = r
            arr[i].content = c
        size = sum(len(c) for _, c in keep) * 2 + 512
        buf = ctypes.create_string_buffer(size)
        n = lib.llama_chat_apply_template(tmpl, arr, len(keep), add_assistant, buf, size)
        if n > size:
            buf = ctypes.create_string_buffer(n)
            n = lib.llama_chat_apply_template(tmpl, arr, len(keep), add_assistant, buf, n)
        if n < 0:
            raise LLMError(f"{self.path.name}: llama.cpp does not know this model's chat template")
        return buf.raw[:n].decode("utf-8", errors="replace")

    def token_embeddings(self, ids: Sequence[int]) -> np.ndarray:
        """Rows of ``token_embd.weight`` read from the GGUF with the ``gguf`` package.

        llama.cpp has no API for its embedding table, so the rows come from the file and are
        dequantized the way ggml does (per-row blocks); they are what the token path would use.
        """
        if self._embd_rows is None:
            try:
                import gguf
            except ImportError as exc:  # pragma: no cover
                raise LLMError("token_embeddings needs the gguf package ([llm] extra)") from exc
            reader = gguf.GGUFReader(self.path)
            found = [t for t in reader.tensors if t.name == "token_embd.weight"]
            if not found:
                raise LLMError(f"{self.path.name}: no token_embd.weight tensor")
            t = found[0]
            self._embd_rows = (t.data, t.tensor_type, gguf)
        data, qtype, gguf = self._embd_rows
        idx = np.asarray(list(ids), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self._n_vocab):
            raise LLMError(f"token id out of range 0..{self._n_vocab - 1}")
        rows = np.asarray(data[idx])
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            out = rows.astype(np.float32)
        else:
            out = gguf.quants.dequantize(rows, qtype).astype(np.float32)
        return out.reshape(len(idx), self._n_embd)

    # --- decoding ------------------------------------------------------------------------------
    def _decode(self, batch: Any, n: int) -> None:
        batch.n_tokens = n
        rc = self._lib.llama_decode(self._ctx, batch)
        if rc != 0:
            raise LLMError(
                f"{self.path.name}: llama_decode failed with {rc} at position {self._n_past} "
                f"(context {self._n_ctx}{'; context full' if rc == 1 else ''})"
            )
        self._n_past += n

    # batch is a llama_batch; Any because llama-cpp-python annotates its fields wrongly (pos as an
    # array of arrays where llama.cpp has one int32 per token), and these writes follow llama.cpp.
    def _fill_common(self, batch: Any, i: int, logits: bool) -> None:
        batch.pos[i] = self._n_past + i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = 1 if logits else 0

    def _feed_ids(self, ids: Sequence[int], logits_last: bool) -> None:
        b = self._tok_batch
        for start in range(0, len(ids), self._n_batch):
            chunk = ids[start : start + self._n_batch]
            last_chunk = start + self._n_batch >= len(ids)
            for i, tok in enumerate(chunk):
                b.token[i] = int(tok)
                self._fill_common(b, i, logits_last and last_chunk and i == len(chunk) - 1)
            self._decode(b, len(chunk))

    def _feed_embd(self, rows: np.ndarray, logits_last: bool) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self._n_embd:
            raise LLMError(f"embedding segment must be (n, {self._n_embd}) float32, got {rows.shape}")
        if not np.isfinite(rows).all():
            raise LLMError("embedding segment contains NaN or infinity")
        b = self._emb_batch
        for start in range(0, len(rows), self._n_batch):
            chunk = rows[start : start + self._n_batch]
            last_chunk = start + self._n_batch >= len(rows)
            ctypes.memmove(b.embd, chunk.ctypes.data, chunk.nbytes)
            for i in range(len(chunk)):
                self._fill_common(b, i, logits_last and last_chunk and i == len(chunk) - 1)
            self._decode(b, len(chunk))

    def feed(self, segments: Sequence[Segment | list[int]], logits_last: bool = True) -> float:
        with self._lock:
            t0 = time.perf_counter()
            n0 = self._n_past  # pending tokens count as fed now, by this call
            parts: list[list[int] | np.ndarray] = []
            if self._pending:
                parts.append(self._pending)
                self._pending = []
            for seg in segments:
                if isinstance(seg, str):
                    if seg:
                        parts.append(self.tokenize(seg))
                elif isinstance(seg, np.ndarray):
                    if len(seg):
                        parts.append(seg)
                else:
                    parts.append([int(t) for t in seg])
            parts = [p for p in parts if len(p)]
            total = sum(len(p) for p in parts)
            if self._n_past + total > self._n_ctx:
                raise LLMError(
                    f"{self.path.name}: {self._n_past + total} positions exceed the context of {self._n_ctx}"
                )
            for k, part in enumerate(parts):
                want = logits_last and k == len(parts) - 1
                if isinstance(part, np.ndarray):
                    self._feed_embd(part, want)
                else:
                    self._feed_ids(part, want)
            dt = time.perf_counter() - t0
            self._since_answer_n += self._n_past - n0
            self._since_answer_s += dt
            return dt

    def last_logits(self) -> np.ndarray:
        ptr = self._lib.llama_get_logits_ith(self._ctx, -1)
        if not ptr:
            raise LLMError("no logits: feed a segment with logits_last=True first")
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).astype(np.float32, copy=True)

    def truncate(self, n_past: int) -> None:
        with self._lock:
            self._pending = []
            n_past = max(0, min(n_past, self._n_past))
            if n_past == 0:
                self._lib.llama_memory_clear(self._mem, True)
            elif not self._lib.llama_memory_seq_rm(self._mem, 0, n_past, -1):
                raise LLMError(f"{self.path.name}: could not trim the KV cache to {n_past} positions")
            self._n_past = n_past
            self._since_answer_n = 0
            self._since_answer_s = 0.0

    # --- sampling ------------------------------------------------------------------------------
    def _sampler(self, config: GenerationConfig) -> llama_sampler_p:
        lib = self._lib
        params = lib.llama_sampler_chain_default_params()
        params.no_perf = True
        chain: llama_sampler_p = lib.llama_sampler_chain_init(params)
        if config.temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        if config.top_k > 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(config.top_k))
        if 0 < config.top_p < 1:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(config.top_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(config.temperature))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(config.seed & 0xFFFFFFFF))
        return chain

    def generate(self, config: GenerationConfig, on_text: Callable[[str], None] | None = None) -> Generation:
        with self._lock:
            return self._generate(config, on_text)

    def _generate(self, config: GenerationConfig, on_text: Callable[[str], None] | None) -> Generation:
        lib = self._lib
        t0 = time.perf_counter()
        if self._pending:
            # The previous answer's last token was never decoded; without it there are no logits.
            self.feed([])
        prompt_n, prompt_s = self._since_answer_n, self._since_answer_s
        self._since_answer_n, self._since_answer_s = 0, 0.0
        chain = self._sampler(config)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = [s for s in config.stop if s]
        hold = max((len(s) for s in stops), default=1) - 1
        text, emitted, n_tokens, reason = "", 0, 0, "length"
        tokens: list[int] = []
        first_s = 0.0
        try:
            for step in range(config.max_tokens):
                if self._n_past + 1 > self._n_ctx:
                    reason = "length"
                    break
                tok = int(lib.llama_sampler_sample(chain, self._ctx, -1))
                if step == 0:
                    first_s = time.perf_counter() - t0
                if lib.llama_vocab_is_eog(self._vocab, tok) and not config.ignore_eos:
                    self._pending = [tok]
                    reason = "eos"
                    break
                n_tokens += 1
                tokens.append(tok)
                text += decoder.decode(self._piece(tok))
                cut = _find_stop(text, stops, max(0, emitted - hold))
                if cut is not None:
                    # The stop string was sampled: the model saw it, the caller does not.
                    self._pending = [tok]
                    text = text[:cut]
                    reason = "stop"
                    break
                if step == config.max_tokens - 1:
                    self._pending = [tok]
                    break
                self._feed_ids([tok], True)
                safe = len(text) - _partial_stop_len(text, stops)
                if on_text is not None and safe > emitted:
                    on_text(text[emitted:safe])
                    emitted = safe
        finally:
            lib.llama_sampler_free(chain)
        text += decoder.decode(b"", final=True) if reason == "length" else ""
        if on_text is not None and len(text) > emitted:
            on_text(text[emitted:])
        return Generation(
            text=text,
            n_tokens=n_tokens,
            stop_reason=reason,
            prompt_tokens=prompt_n,
            prompt_s=prompt_s,
            first_token_s=first_s,
            total_s=time.perf_counter() - t0,
            tokens=tokens,
        )

    def close(self) -> None:
        lib = getattr(self, "_lib", None)
        if lib is None:
            return
        if getattr(self, "_ctx", None):
            lib.llama_batch_free(self._tok_batch)
            lib.llama_batch_free(self._emb_batch)
            lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        # At interpreter shutdown the library may already be gone; nothing useful to do then.
        with contextlib.suppress(Exception):
            self.close()


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    """Index of the earliest stop string in ``text`` at or after ``start``, or ``None``."""
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def _partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best
