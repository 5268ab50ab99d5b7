"""``anomalygpt-edge ask`` and ``anomalygpt-edge bench llm``: the LLM side on the command line (no torch).

``ask`` inspects one image with a recipe (the verdict comes from the vision side, always), then
lets the LLM explain it; ``--chat`` keeps the conversation going with follow-up questions that
reuse the KV cache, streaming tokens to the terminal; ``--json`` prints one JSON object.

``bench llm`` times the embedding-fed runner against llama-cpp-python's plain ``Llama`` API on the
same prompt in the same run (prompt tokens/s, generation tokens/s, time to first token).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def _bench_targets(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The ``bench`` command's target subparsers, creating ``bench`` if no other module has yet.

    Several areas add ``bench <target>`` (vision, line, llm); argparse refuses a second ``bench``
    parser, so whoever comes later adds its target to the existing one.
    """
    existing = sub.choices.get("bench")
    if existing is not None:
        for action in existing._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action
        raise RuntimeError("a 'bench' command without targets is already registered")
    bench = sub.add_parser("bench", help="benchmarks (not timed tests); each target writes --json FILE")
    return bench.add_subparsers(dest="target", required=True, metavar="TARGET")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``ask`` and ``bench llm``."""
    a = sub.add_parser(
        "ask",
        help="inspect an image with a recipe, then ask the LLM about it",
        description="The OK/NG verdict comes from the recipe's calibrated score; the LLM only explains it.",
    )
    a.add_argument("image", type=Path, help="image file (any format OpenCV reads)")
    a.add_argument("question", nargs="?", default="Is there any anomaly in the image?")
    a.add_argument("--recipe", required=True, help="recipe name (see `anomalygpt-edge enroll`)")
    a.add_argument(
        "--store", type=Path, default=_default_store(), help=f"recipe store folder (default {_default_store()})"
    )
    a.add_argument("--bundle", type=Path, help="engine bundle (default: the one the recipe was enrolled with)")
    a.add_argument("--model", type=Path, help="GGUF model (default: the embedded SmolLM2-135M-Instruct)")
    mode = a.add_mutually_exclusive_group()
    mode.add_argument("--chat", action="store_true", help="keep asking follow-up questions (stdin), streaming")
    mode.add_argument("--json", action="store_true", help="print one JSON object: verdict and answer")
    _generation_args(a)
    a.set_defaults(handler="anomalygpt_edge.runtime.cli.explain:run_ask")

    add_bench_target(_bench_targets(sub))


def add_bench_target(targets: argparse._SubParsersAction) -> None:
    """Register ``bench llm`` (idempotent: the runtime CLI may also call this from its target list)."""
    if "llm" in targets.choices:
        return
    b = targets.add_parser(
        "llm", help="LLM tokens/s and time to first token: embedding-fed runner vs plain llama_cpp.Llama"
    )
    b.add_argument("--json", type=Path, required=True, dest="json_out", help="write the figures here")
    b.add_argument("--model", type=Path, help="GGUF model (default: the embedded SmolLM2-135M-Instruct)")
    b.add_argument("--n-gen", type=int, default=64, help="tokens generated per run (default 64)")
    b.add_argument("--repeats", type=int, default=3, help="timed runs per path, after one warm-up (default 3)")
    b.add_argument("--threads", type=int, help="CPU threads for both paths (default: half the cores)")
    b.set_defaults(handler="anomalygpt_edge.runtime.cli.explain:run_bench")


def _default_store() -> Path:
    """The recipe store's default belongs to the runtime CLI (one place for it)."""
    from anomalygpt_edge.runtime.defaults import DEFAULT_STORE

    return Path(DEFAULT_STORE)


def _generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, help="default 0.2 (text prompt) or 1.0 (AnomalyGPT, as the reference)")
    p.add_argument("--top-p", type=float, help="default 0.9 (text prompt) or 0.01 (AnomalyGPT, as the reference)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads for the LLM (default: half the cores)")


# --- ask -----------------------------------------------------------------------------------------


class _AskError(Exception):
    """``ask`` cannot go on; the message is what the user is told."""


def _ask_anomalygpt(args: argparse.Namespace, inspector: Any, llm: Any, image: Any) -> tuple[Any, Any, Any]:
    """AnomalyGPT's way: the image vector and the 18 prompt vectors through the embedding input."""
    from anomalygpt_edge.engines.llm import GenerationConfig, LLMError
    from anomalygpt_edge.runtime.explain.explainer import AnomalyGPTExplainer, anomalygpt_llm_inputs

    try:
        verdict, img, prompts = anomalygpt_llm_inputs(inspector, image, args.image.name)
    except ValueError as exc:
        raise _AskError(f"{exc}; {llm.path.name} is AnomalyGPT's LLM and needs an AnomalyGPT bundle") from exc
    if img.shape[1] != llm.n_embd:
        raise _AskError(f"the bundle's image vectors are {img.shape[1]} wide, {llm.path.name} takes {llm.n_embd}")
    config = GenerationConfig(
        max_tokens=args.max_tokens,
        temperature=1.0 if args.temperature is None else args.temperature,
        top_p=0.01 if args.top_p is None else args.top_p,
        seed=args.seed,
        stop=("###",),
    )
    explainer = AnomalyGPTExplainer(llm, config)
    try:
        return verdict, explainer.explain(verdict, img, prompts, args.question), explainer
    except LLMError as exc:
        raise _AskError(str(exc)) from exc


def _ask_findings(args: argparse.Namespace, inspector: Any, llm: Any, image: Any) -> tuple[Any, Any, Any]:
    """Any chat model: the inspection's findings go in as text."""
    from anomalygpt_edge.engines.llm import GenerationConfig, LLMError
    from anomalygpt_edge.runtime.explain.explainer import Explainer

    verdict = inspector.inspect(image, name=args.image.name)
    config = GenerationConfig(
        max_tokens=args.max_tokens,
        temperature=0.2 if args.temperature is None else args.temperature,
        top_p=0.9 if args.top_p is None else args.top_p,
        seed=args.seed,
        stop=(),
    )
    explainer = Explainer(llm, config)
    try:
        return verdict, explainer.explain(verdict, args.question), explainer
    except LLMError as exc:
        raise _AskError(str(exc)) from exc


def _chat(explainer: Any) -> None:
    """Follow-up questions from stdin, answers streamed, until an empty line or end of input."""
    print("(follow-up questions; empty line or Ctrl-D to end)")
    while True:
        try:
            question = input("> ").strip()
        except EOFError:
            break
        if not question or question.lower() in ("quit", "exit"):
            break
        sys.stdout.write("answer: ")
        reply = explainer.follow_up(question, on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        sys.stdout.write("\n")
        if reply.replaced:
            print(f"[that answer contradicts the verdict ({reply.replaced}); the inspection says: {reply.text}]")


def _ask_bundle(args: argparse.Namespace) -> Path:
    """``--bundle``, else the recipe's; the default location is exported first on a first run."""
    from anomalygpt_edge.runtime.cli import first_run
    from anomalygpt_edge.runtime.recipes.store import RecipeStore

    if args.bundle is not None:
        return Path(args.bundle)
    return first_run.ready(RecipeStore(args.store).load(args.recipe).bundle_path)


def run_ask(args: argparse.Namespace) -> int:
    """Handler of ``anomalygpt-edge ask``.

    With the embedded default model (or any chat GGUF) the findings go in as text. With a GGUF
    written by ``export llm`` (AnomalyGPT's Vicuna) and an AnomalyGPT bundle, the image vector and
    the 18 prompt vectors go in through the embedding input, as in AnomalyGPT itself.
    """
    from anomalygpt_edge.engines.llm import create_llm
    from anomalygpt_edge.engines.preprocess import ImageError, read_image
    from anomalygpt_edge.runtime.explain.explainer import default_model_path
    from anomalygpt_edge.runtime.recipes.inspector import Inspector

    def fail(msg: object) -> int:
        print(f"anomalygpt-edge ask: {msg}", file=sys.stderr)
        return 2

    try:  # the same bounded reader as everywhere: header pixel check before any decode
        image = read_image(args.image)
    except ImageError as exc:
        return fail(f"cannot read image {exc}")
    try:
        inspector = Inspector.from_store(args.store, args.recipe, _ask_bundle(args))
        model_path = Path(args.model or default_model_path())
        llm = create_llm(model_path, n_ctx=2048, n_threads=args.threads)
    except (OSError, ValueError, RuntimeError) as exc:  # LLMError and GGUFError are RuntimeErrors
        return fail(exc)
    anomalygpt = llm.metadata("anomalygpt.prompt_embeddings") is not None
    try:
        ask = _ask_anomalygpt if anomalygpt else _ask_findings
        verdict, answer, explainer = ask(args, inspector, llm, image)
    except _AskError as exc:
        return fail(exc)
    if args.json:
        out = {
            "image": str(args.image),
            "question": args.question,
            "verdict": verdict.to_json(),
            "answer": answer.to_json(),
            "model": model_path.name,
            "llm_input": "anomalygpt-embeddings" if anomalygpt else "findings-text",
        }
        if anomalygpt:
            out["prompt_tokens"] = explainer.last_prompt_tokens
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"verdict: {verdict.verdict}  score {verdict.score:.4f} / threshold {verdict.threshold:.4f}"
        + (f"  at the {verdict.location}" if verdict.location else "")
    )
    note = f"  [model answer replaced: {answer.replaced}]" if answer.replaced else ""
    print(f"answer: {answer.text}{note}")
    if args.chat:
        _chat(explainer)
    return 0


# --- bench llm -----------------------------------------------------------------------------------

N_INJECTED = 19  # AnomalyGPT injects 1 image vector + 18 prompt-learner vectors


def _bench_prompt(llm) -> str:  # noqa: ANN001 - an LLM
    from anomalygpt_edge.runtime.explain.explainer import explanation_messages
    from anomalygpt_edge.runtime.inspection.verdict import Region, Verdict, anomaly_sentence

    regions = [
        Region((40, 20, 60, 50), 4.2, 0.91, "top left"),
        Region((150, 160, 30, 20), 1.1, 0.7, "bottom right"),
    ]
    verdict = Verdict("NG", 0.83, 0.41, "magnetic-tile", regions, anomaly_sentence([r.location for r in regions]))
    return llm.chat_prompt(explanation_messages(verdict, "Describe the anomalies in detail for the operator."))


def _time_ours(llm, ids: list[int], k: int, n_gen: int) -> dict:  # noqa: ANN001
    """Prompt with N_INJECTED of its tokens fed as embedding rows through llama_batch.embd."""
    from anomalygpt_edge.engines.llm import GenerationConfig

    rows = llm.token_embeddings(ids[k : k + N_INJECTED])
    llm.reset()
    t0 = time.perf_counter()
    llm.feed([ids[:k], rows, ids[k + N_INJECTED :]])
    feed_s = time.perf_counter() - t0
    gen = llm.generate(GenerationConfig(max_tokens=n_gen, temperature=0.0, stop=(), ignore_eos=True))
    return _figures(len(ids), feed_s + gen.first_token_s, gen.n_tokens, gen.total_s - gen.first_token_s, gen.tokens)


def _figures(n_prompt: int, ttft: float, n_gen: int, gen_s: float, tokens: list[int]) -> dict:
    return {
        "ttft_s": ttft,
        "prompt_tok_s": n_prompt / ttft,
        "gen_tok_s": (n_gen - 1) / gen_s if gen_s > 0 else float("nan"),
        "n_gen": n_gen,
        "tokens": tokens,
    }


def _time_plain(plain, ids: list[int], n_gen: int) -> dict:  # noqa: ANN001 - llama_cpp.Llama
    """The same prompt through ``Llama.generate`` (token ids only), greedy, detokenizing each token."""
    plain.reset()
    tokens: list[int] = []
    text = b""
    t0 = time.perf_counter()
    t_first = 0.0
    for tok in plain.generate(ids, temp=0.0, top_k=1, top_p=1.0, reset=True):
        if not tokens:
            t_first = time.perf_counter()
        tokens.append(tok)
        text += plain.detokenize([tok])
        if len(tokens) >= n_gen:
            break
    t_end = time.perf_counter()
    return _figures(len(ids), t_first - t0, len(tokens), t_end - t_first, tokens)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _alternating_runs(ours: Any, plain: Any, ids: list[int], k: int, n_gen: int, repeats: int) -> dict[str, list]:
    """``repeats`` timed runs of each path, alternating which goes first; a discarded warm-up run first."""
    runs: dict[str, list[dict]] = {"ours": [], "plain": []}
    for rep in range(repeats + 1):  # run 0 warms caches and is discarded
        # Alternate the order so drifting background load hits both paths alike.
        order = ("plain", "ours") if rep % 2 else ("ours", "plain")
        for name in order:
            r = _time_ours(ours, ids, k, n_gen) if name == "ours" else _time_plain(plain, ids, n_gen)
            if rep:
                runs[name].append(r)
    return runs


def _bench_summary(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Median TTFT and token rates per path, with every run's figures."""
    summary: dict[str, dict] = {}
    for name, rs in runs.items():
        summary[name] = {
            key: statistics.median(r[key] for r in rs) for key in ("ttft_s", "prompt_tok_s", "gen_tok_s")
        } | {"runs": [{k2: round(v, 4) for k2, v in r.items() if k2 != "tokens"} for r in rs]}
    return summary


def _print_bench(summary: dict[str, dict], result: dict[str, Any], threads: int) -> None:
    """The two paths as a table, and the overhead in one line."""
    rows = [("path", "TTFT ms", "prompt tok/s", "gen tok/s")]
    for name, label in (("ours", "embeddings (low-level)"), ("plain", "plain Llama API")):
        s = summary[name]
        rows.append((label, f"{s['ttft_s'] * 1e3:.1f}", f"{s['prompt_tok_s']:.1f}", f"{s['gen_tok_s']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print(
        f"overhead_ratio (plain gen tok/s / ours) = {result['overhead_ratio']:.3f}; "
        f"prompt {result['n_prompt']} tokens ({N_INJECTED} as embeddings), {result['n_gen']} generated, "
        f"{threads} thread(s); greedy outputs agree on the first {result['greedy_tokens_agree']} tokens"
    )


def run_bench(args: argparse.Namespace) -> int:
    """Handler of ``anomalygpt-edge bench llm``."""
    import llama_cpp

    from anomalygpt_edge.engines.llm import create_llm
    from anomalygpt_edge.runtime.explain.explainer import default_model_path

    model = args.model or default_model_path()
    threads = args.threads or max(1, (os.cpu_count() or 2) // 2)
    ours = create_llm(model, n_ctx=2048, n_threads=threads)
    plain = llama_cpp.Llama(
        str(model),
        n_ctx=2048,
        n_batch=512,
        n_ubatch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    ids = ours.tokenize(_bench_prompt(ours))
    if ids != plain.tokenize(_bench_prompt(ours).encode(), add_bos=False, special=True):
        print("bench llm: the two APIs tokenize the prompt differently", file=sys.stderr)
        return 1
    k = min(24, max(0, len(ids) - N_INJECTED - 1))  # inject in the middle, like the image block
    runs = _alternating_runs(ours, plain, ids, k, args.n_gen, args.repeats)
    summary = _bench_summary(runs)
    # Greedy decoding on both paths: the texts agree until a near-tie, where splitting the prompt
    # into three llama_decode calls (text, embeddings, text) changes float summation order.
    agree = min(_common_prefix(r["tokens"], p["tokens"]) for r, p in zip(runs["ours"], runs["plain"], strict=True))
    result = {
        "model": Path(model).name,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "n_prompt": len(ids),
        "n_injected_embeddings": N_INJECTED,
        "n_gen": args.n_gen,
        "repeats": args.repeats,
        "ours": summary["ours"],
        "plain": summary["plain"],
        "overhead_ratio": summary["plain"]["gen_tok_s"] / summary["ours"]["gen_tok_s"],
        "prompt_overhead_ratio": summary["plain"]["prompt_tok_s"] / summary["ours"]["prompt_tok_s"],
        "greedy_tokens_agree": agree,
        "command": "anomalygpt-edge " + " ".join(sys.argv[1:]) if sys.argv else None,
    }
    args.json_out.write_text(json.dumps(result, indent=2))
    _print_bench(summary, result, threads)
    ours.close()
    plain.close()
    return 0
