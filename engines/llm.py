"""The LLM interface: a causal language model fed a mix of text and raw input embeddings.

AnomalyGPT conditions Vicuna on one image vector and 18 prompt-learner vectors placed between text
segments, so the interface takes *segments* (a ``str`` is tokenized, a float32 ``(n, n_embd)``
array goes in as input embeddings) and keeps one growing conversation in the model's KV cache:
follow-up turns append to it instead of re-reading the image. Backends register under a key with
:func:`register_llm_backend` like the graph engines in :mod:`anomalygpt_edge.engines.base`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from anomalygpt_edge.engines.base import EngineError

#: One input segment: text (tokenized without BOS) or input embeddings of shape (n, n_embd).
Segment = str | np.ndarray


class LLMError(EngineError):
    """The model cannot be loaded or run; the message names the file or step at fault."""


class _StreamClosedError(Exception):
    """The consumer of :meth:`LLM.stream` stopped reading."""


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings for one answer.

    AnomalyGPT's own scripts sample with ``top_p`` 0.01-0.1 at temperature 1.0, which is almost
    greedy; ``temperature <= 0`` means plain greedy decoding. ``stop`` strings end the answer and
    are not part of the returned text (the model still saw them, so the next turn follows on).
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 0.01
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ("###",)
    ignore_eos: bool = False  # benchmarks only: generate exactly max_tokens


@dataclass
class Generation:
    """What one :meth:`LLM.generate` call produced."""

    text: str
    n_tokens: int
    stop_reason: str  # "stop" (a stop string), "eos", "length"
    prompt_tokens: int  # positions fed since the previous answer
    prompt_s: float  # time spent decoding those positions
    first_token_s: float  # from the generate call to the first token being known
    total_s: float
    tokens: list[int] = field(default_factory=list)  # generated ids, stop-string token included


class LLM(abc.ABC):
    """A loaded causal LM holding one conversation (sequence 0) in its KV cache."""

    backend: str = "abstract"

    @property
    @abc.abstractmethod
    def n_embd(self) -> int:
        """Width of the input embeddings the model accepts."""

    @property
    @abc.abstractmethod
    def n_ctx(self) -> int:
        """Context length (positions) of the loaded session."""

    @property
    @abc.abstractmethod
    def n_past(self) -> int:
        """Positions already in the KV cache."""

    @property
    @abc.abstractmethod
    def bos_id(self) -> int:
        """Id of the beginning-of-sequence token."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int:
        """Id of the end-of-sequence (end-of-turn) token."""

    @abc.abstractmethod
    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text`` as the model's own tokenizer splits it (special tokens parsed)."""

    @abc.abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""

    @abc.abstractmethod
    def token_embeddings(self, ids: Sequence[int]) -> np.ndarray:
        """Rows of the model's input embedding matrix for ``ids``, float32 (len(ids), n_embd)."""

    @abc.abstractmethod
    def feed(self, segments: Sequence[Segment | list[int]], logits_last: bool = True) -> float:
        """Append segments to the conversation; returns the seconds spent decoding them.

        A ``list[int]`` segment is fed as token ids as is (for BOS and exact-id tests).
        """

    @abc.abstractmethod
    def last_logits(self) -> np.ndarray:
        """Next-token logits after the last fed position, float32 (n_vocab,)."""

    @abc.abstractmethod
    def generate(self, config: GenerationConfig, on_text: Callable[[str], None] | None = None) -> Generation:
        """Sample an answer after the fed segments; ``on_text`` receives text pieces as they come."""

    def stream(self, config: GenerationConfig) -> Iterator[str]:
        """Generate as an iterator of text pieces, as they come.

        Generation runs in a helper thread; closing the iterator early (``break``) stops it at the
        next token, leaving the tokens generated so far in the conversation.
        """
        import queue
        import threading

        pieces: queue.Queue[str | None | BaseException] = queue.Queue()
        cancel = threading.Event()

        def put(piece: str) -> None:
            if cancel.is_set():
                raise _StreamClosedError
            pieces.put(piece)

        def work() -> None:
            try:
                self.generate(config, on_text=put)
                pieces.put(None)
            except _StreamClosedError:
                pass
            except BaseException as exc:  # re-raised in the consumer's thread
                pieces.put(exc)

        worker = threading.Thread(target=work, daemon=True, name="llm-stream")
        worker.start()
        try:
            while True:
                item = pieces.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()
            worker.join()

    @abc.abstractmethod
    def truncate(self, n_past: int) -> None:
        """Forget every position from ``n_past`` on (to replace an answer in the history)."""

    def reset(self) -> None:
        """Start a new conversation."""
        self.truncate(0)

    def metadata(self, key: str) -> str | None:
        """A model-file metadata value as text, or ``None`` (backends without metadata: always)."""
        return None

    def chat_prompt(self, messages: Sequence[tuple[str, str]], add_assistant: bool = True) -> str:
        """Format ``(role, content)`` messages with the model's own chat template."""
        raise LLMError(f"{self.backend}: this model has no chat template")

    def close(self) -> None:  # noqa: B027 - optional hook, most backends free on GC
        """Free the model now rather than at garbage collection."""

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# A backend is its class, called as ``cls(path, **options)``; the abstract LLM declares no
# constructor because each backend takes its own options.
_LLM_BACKENDS: dict[str, Callable[..., LLM]] = {}
_LLMClass = TypeVar("_LLMClass", bound=type[LLM])


def register_llm_backend(key: str) -> Callable[[_LLMClass], _LLMClass]:
    """Class decorator: make an LLM subclass loadable under ``key``."""

    def wrap(cls: _LLMClass) -> _LLMClass:
        cls.backend = key
        _LLM_BACKENDS[key] = cls
        return cls

    return wrap


def llm_backend_names() -> list[str]:
    """Every registered LLM backend key."""
    _import_llm_backends()
    return sorted(_LLM_BACKENDS)


def _import_llm_backends() -> None:
    # Importing registers; the module imports llama_cpp only when a model is loaded.
    from anomalygpt_edge.engines import llama_cpp_backend  # noqa: F401


def create_llm(path: Path, backend: str = "llama.cpp", **options: object) -> LLM:
    """Load the model at ``path`` with the named backend (only ``"llama.cpp"`` today)."""
    _import_llm_backends()
    if backend not in _LLM_BACKENDS:
        raise LLMError(f"unknown LLM backend '{backend}'; known: {', '.join(sorted(_LLM_BACKENDS))}")
    return _LLM_BACKENDS[backend](Path(path), **options)


# --- AnomalyGPT's conversation layout (architecture notes §6) -------------------------------------

IMG_OPEN = "### Human: <Img>"
IMG_CLOSE = "</Img> "
ASSISTANT = "\n### Assistant:"


def anomalygpt_first_turn(image_embed: np.ndarray, prompt_embeds: np.ndarray, question: str) -> list[Segment]:
    """Segments of AnomalyGPT's first turn after BOS.

    ``### Human: <Img>``, the image vector (1 × n_embd), ``</Img> `` (trailing space kept), the 18
    prompt-learner vectors, then the question and ``\\n### Assistant:``. Each text segment is
    tokenized on its own, as the reference tokenizes them separately.
    """
    image_embed = np.asarray(image_embed, np.float32).reshape(-1, np.shape(image_embed)[-1])
    prompt_embeds = np.asarray(prompt_embeds, np.float32).reshape(-1, np.shape(prompt_embeds)[-1])
    if image_embed.shape[0] != 1:
        raise LLMError(f"image embedding must be one vector, got shape {image_embed.shape}")
    if prompt_embeds.shape[1] != image_embed.shape[1]:
        raise LLMError(
            f"prompt embeddings width {prompt_embeds.shape[1]} != image embedding width {image_embed.shape[1]}"
        )
    return [IMG_OPEN, image_embed, IMG_CLOSE, prompt_embeds, question + ASSISTANT]


def anomalygpt_next_turn(question: str) -> list[Segment]:
    """Segments of a follow-up turn: the previous answer already ends with ``\\n###``."""
    return [" Human: " + question + ASSISTANT]


class AnomalyGPTChat:
    """Multi-turn AnomalyGPT conversation: image and prompts are fed once, follow-ups reuse the KV cache."""

    def __init__(self, llm: LLM, config: GenerationConfig | None = None):
        self.llm = llm
        self.config = config or GenerationConfig()
        self.turns: list[tuple[str, str]] = []
        self._answer_start = 0

    def ask(
        self,
        question: str,
        image_embed: np.ndarray | None = None,
        prompt_embeds: np.ndarray | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """First call needs the embeddings and starts a new conversation; later calls append a turn."""
        if not self.turns:
            if image_embed is None or prompt_embeds is None:
                raise LLMError("the first AnomalyGPT turn needs the image and prompt embeddings")
            if image_embed.shape[-1] != self.llm.n_embd:
                raise LLMError(f"image embedding width {image_embed.shape[-1]} != model width {self.llm.n_embd}")
            self.llm.reset()
            self.llm.feed([[self.llm.bos_id], *anomalygpt_first_turn(image_embed, prompt_embeds, question)])
        else:
            self.llm.feed(anomalygpt_next_turn(question))
        self._answer_start = self.llm.n_past
        gen = self.llm.generate(self.config, on_text=on_text)
        if gen.stop_reason != "stop":
            # The reference history closes every answer with "\n###"; the model did not, so we do.
            self.llm.feed(["\n###"], logits_last=False)
        self.turns.append((question, gen.text.strip()))
        return gen

    def replace_last_answer(self, text: str) -> None:
        """Rewrite the last answer in the KV cache (and history) as ``text``, closed by ``\n###``."""
        if not self.turns:
            raise LLMError("no answer to replace")
        self.llm.truncate(self._answer_start)
        # Answers follow "Assistant:" after a space. SentencePiece vocabularies add that space
        # themselves (a leading "▁"); byte-level BPE ones need it spelled out.
        spaced = self.llm.tokenize("a") == self.llm.tokenize(" a")
        self.llm.feed([("" if spaced else " ") + text + "\n###"], logits_last=False)
        self.turns[-1] = (self.turns[-1][0], text)
