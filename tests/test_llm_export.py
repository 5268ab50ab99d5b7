"""`export llm` end to end on a tiny random LLaMA with the real HF tensor names and a real tokenizer.

The tokenizer is a genuine sentencepiece ``ModelProto`` (unk/bos/eos, 256 byte-fallback pieces,
whole-word pieces reachable by bigram merges) written here field by field, so the test needs no
sentencepiece library; llama.cpp's own SPM tokenizer then has to split text with it.
The GGUF's logits are checked against an HF-semantics LLaMA forward in torch (rotate-half RoPE,
LoRA applied unmerged), which catches a wrong q/k permutation or a wrong LoRA merge.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")
safetensors_torch = pytest.importorskip("safetensors.torch")

from anomalygpt_edge.cli import main as cli_main  # noqa: E402
from anomalygpt_edge.engines.gguf_check import check_gguf  # noqa: E402
from anomalygpt_edge.engines.llm import AnomalyGPTChat, GenerationConfig, create_llm  # noqa: E402
from anomalygpt_edge.export.llm_gguf import (  # noqa: E402
    LLMExportError,
    build_vocab,
    export_llm,
    read_sentencepiece,
)

CFG = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=512,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
WORDS = [
    "###",
    "##",
    "#",
    "Human",
    "Assistant",
    "Img",
    "Is",
    "there",
    "any",
    "anomaly",
    "in",
    "the",
    "image",
    "Yes",
    "No",
    "top",
    "left",
    "right",
    "bottom",
    "center",
    "of",
    "a",
    "is",
    "at",
]
R = 8  # LoRA rank of the tiny delta; alpha = R keeps PandaGPT's scale of 1.0


# --- a real sentencepiece model, written as protobuf --------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field_bytes(num: int, data: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def _piece(piece: str, score: float, ptype: int) -> bytes:
    body = _field_bytes(1, piece.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", score)
    return _field_bytes(1, body + _varint(3 << 3) + _varint(ptype))


def tiny_vocab() -> list[tuple[str, float, int]]:
    """unk, bos, eos, 256 byte pieces, single characters, then every prefix of every ▁word."""
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    pieces += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    seen = {p for p, _, _ in pieces}
    chars = sorted({c for w in WORDS for c in w} | set(":<>/?.,▁"))
    for c in chars:
        pieces.append((c, -10.0, 1))
        seen.add(c)
    for w in WORDS:
        for form in ("▁" + w, w):
            for k in range(2, len(form) + 1):
                if form[:k] not in seen:
                    seen.add(form[:k])
                    pieces.append((form[:k], float(k), 1))  # longer pieces win bigram merges
    for extra in ("</", "</Img", "<Img"):
        if extra not in seen:
            seen.add(extra)
            pieces.append((extra, float(len(extra)), 1))
    return pieces


def write_tokenizer_model(path: Path, pieces: list[tuple[str, float, int]]) -> None:
    path.write_bytes(b"".join(_piece(*p) for p in pieces))


# --- the tiny model ------------------------------------------------------------------------------


def make_tiny_llama(base: Path, seed: int = 0, **overrides: int) -> tuple[dict, dict, list]:
    """HF-layout folder with config.json, tokenizer.model, model.safetensors; returns (state, cfg, vocab)."""
    base.mkdir(parents=True)
    vocab = tiny_vocab()
    cfg = dict(CFG, vocab_size=len(vocab), **overrides)
    g = torch.Generator().manual_seed(seed)
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]

    def rnd(*shape: int, std: float = 0.08) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(torch.float16)

    sd = {
        "model.embed_tokens.weight": rnd(len(vocab), h, std=1.0),
        "model.norm.weight": 1 + rnd(h, std=0.1),
        "lm_head.weight": rnd(len(vocab), h),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd |= {
            p + "input_layernorm.weight": 1 + rnd(h, std=0.1),
            p + "post_attention_layernorm.weight": 1 + rnd(h, std=0.1),
            p + "self_attn.q_proj.weight": rnd(h, h),
            p + "self_attn.k_proj.weight": rnd(kv, h),
            p + "self_attn.v_proj.weight": rnd(kv, h),
            p + "self_attn.o_proj.weight": rnd(h, h),
            p + "mlp.gate_proj.weight": rnd(f, h),
            p + "mlp.up_proj.weight": rnd(f, h),
            p + "mlp.down_proj.weight": rnd(h, f),
        }
        # Old HF checkpoints carry this buffer; the exporter must skip it, not complain.
        sd[p + "self_attn.rotary_emb.inv_freq"] = torch.ones(h // cfg["num_attention_heads"] // 2)
    (base / "config.json").write_text(json.dumps(cfg))
    write_tokenizer_model(base / "tokenizer.model", vocab)
    safetensors_torch.save_file(sd, str(base / "model.safetensors"))
    return sd, cfg, vocab


def make_lora(path: Path, cfg: dict, seed: int = 1) -> dict:
    """A PandaGPT-style delta: PEFT key names for q/k/v/o LoRA plus llama_proj."""
    g = torch.Generator().manual_seed(seed)
    h = cfg["hidden_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    out = {"q": h, "k": kv, "v": kv, "o": h}
    sd = {}
    for i in range(cfg["num_hidden_layers"]):
        for p in "qkvo":
            k = f"llama_model.base_model.model.model.layers.{i}.self_attn.{p}_proj"
            sd[f"{k}.lora_A.weight"] = torch.randn(R, h, generator=g) * 0.1
            sd[f"{k}.lora_B.weight"] = torch.randn(out[p], R, generator=g) * 0.1
    sd["llama_proj.weight"] = torch.randn(h, 32, generator=g)
    sd["llama_proj.bias"] = torch.zeros(h)
    torch.save(sd, path)
    return sd


def hf_reference_logits(sd: dict, lora: dict | None, cfg: dict, ids: list[int]) -> np.ndarray:
    """Last-position logits of an HF-semantics LLaMA (rotate-half RoPE, LoRA unmerged), float64."""
    W = {k: v.to(torch.float64) for k, v in sd.items()}
    L = {k: v.to(torch.float64) for k, v in (lora or {}).items()}
    H, KV, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"]
    D = cfg["hidden_size"] // H
    T = len(ids)

    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def proj(x: torch.Tensor, i: int, p: str) -> torch.Tensor:
        y = x @ W[f"model.layers.{i}.self_attn.{p}_proj.weight"].T
        k = f"llama_model.base_model.model.model.layers.{i}.self_attn.{p}_proj"
        if L:
            y = y + (x @ L[f"{k}.lora_A.weight"].T) @ L[f"{k}.lora_B.weight"].T  # alpha/r = 1
        return y

    inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(x: torch.Tensor) -> torch.Tensor:  # (heads, T, D)
        half = torch.cat([-x[..., D // 2 :], x[..., : D // 2]], -1)
        return x * cos + half * sin

    x = W["model.embed_tokens.weight"][ids]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, W[p + "input_layernorm.weight"])
        q = rope(proj(h, i, "q").view(T, H, D).transpose(0, 1))
        k = rope(proj(h, i, "k").view(T, KV, D).transpose(0, 1)).repeat_interleave(H // KV, 0)
        v = proj(h, i, "v").view(T, KV, D).transpose(0, 1).repeat_interleave(H // KV, 0)
        att = torch.softmax(q @ k.transpose(1, 2) / D**0.5 + mask, -1) @ v
        x = x + proj(att.transpose(0, 1).reshape(T, H * D), i, "o")
        h = rms(x, W[p + "post_attention_layernorm.weight"])
        x = (
            x
            + (torch.nn.functional.silu(h @ W[p + "mlp.gate_proj.weight"].T) * (h @ W[p + "mlp.up_proj.weight"].T))
            @ W[p + "mlp.down_proj.weight"].T
        )
    x = rms(x, W["model.norm.weight"])
    return (x[-1] @ W["lm_head.weight"].T).numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tiny_llama")
    sd, cfg, vocab = make_tiny_llama(root / "base")
    lora = make_lora(root / "pandagpt_delta.pt", cfg)
    out = root / "gguf"
    rc = cli_main(
        [
            "export",
            "llm",
            "--base",
            str(root / "base"),
            "--lora",
            str(root / "pandagpt_delta.pt"),
            "--lora-r",
            str(R),
            "--lora-alpha",
            str(R),
            "--out",
            str(out),
            "--name",
            "tiny",
        ]
    )
    assert rc == 0
    return dict(root=root, sd=sd, cfg=cfg, vocab=vocab, lora=lora, out=out)


def test_export_writes_f16_and_quantised_ggufs_that_pass_validation(tiny: dict) -> None:
    manifest = json.loads((tiny["out"] / "llm.json").read_text())
    assert set(manifest["files"]) == {"tiny.f16.gguf", "tiny.Q4_K_M.gguf", "tiny.Q8_0.gguf"}
    n_tensors = 3 + 9 * CFG["num_hidden_layers"]
    for name, entry in manifest["files"].items():
        info = check_gguf(tiny["out"] / name)
        assert entry["tensors"] == len(info.tensors) == n_tensors
        assert info.architecture == "llama"
    sizes = {n: e["bytes"] for n, e in manifest["files"].items()}
    assert sizes["tiny.Q4_K_M.gguf"] < sizes["tiny.Q8_0.gguf"] < sizes["tiny.f16.gguf"]
    assert manifest["lora"]["r"] == R and manifest["lora"]["targets"] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    ]


def test_exported_tokenizer_metadata_and_template(tiny: dict) -> None:
    with create_llm(tiny["out"] / "tiny.f16.gguf", n_ctx=256) as llm:
        vocab = [p for p, _, _ in tiny["vocab"]]
        # llama.cpp's SPM tokenizer adds the "▁" prefix and merges to the whole-word pieces.
        assert llm.tokenize("Human") == [vocab.index("▁Human")]
        assert llm.tokenize("Is there any anomaly") == [vocab.index(w) for w in ("▁Is", "▁there", "▁any", "▁anomaly")]
        assert llm.tokenize("\n")[-1] == vocab.index("<0x0A>")  # byte fallback
        assert llm.bos_id == 1
        assert "### Assistant:" in llm.metadata("tokenizer.chat_template")
        assert llm.metadata("anomalygpt.conversation.stop") == "###"
        assert llm.metadata("anomalygpt.lora").startswith(f"merged r={R}")
    assert read_sentencepiece(tiny["root"] / "base" / "tokenizer.model") == [
        (p, pytest.approx(s), t) for p, s, t in tiny["vocab"]
    ]


def test_f16_gguf_logits_match_hf_reference_with_lora_merged(tiny: dict) -> None:
    ids = [1] + list(range(300, 330))
    ref = hf_reference_logits(tiny["sd"], tiny["lora"], tiny["cfg"], ids)
    no_lora = hf_reference_logits(tiny["sd"], None, tiny["cfg"], ids)
    with create_llm(tiny["out"] / "tiny.f16.gguf", n_ctx=256) as llm:
        llm.feed([ids])
        got = llm.last_logits()
    # f16 weights and f16 KV cache against a float64 reference: 2% of the logit range.
    tol = 0.02 * np.abs(ref).max()
    assert np.abs(got - ref).max() < tol
    assert got.argmax() == ref.argmax()
    # The LoRA really changed the model (so the comparison above proves it was merged right).
    assert np.abs(ref - no_lora).max() > 10 * tol


def test_quantised_ggufs_answer_through_the_embedding_path(tiny: dict) -> None:
    rng = np.random.default_rng(0)
    for name in ("tiny.Q4_K_M.gguf", "tiny.Q8_0.gguf"):
        with create_llm(tiny["out"] / name, n_ctx=256) as llm:
            chat = AnomalyGPTChat(llm, GenerationConfig(max_tokens=8, temperature=0.0))
            img = rng.standard_normal((1, llm.n_embd)).astype(np.float32)
            prompts = rng.standard_normal((18, llm.n_embd)).astype(np.float32)
            first = chat.ask("Is there any anomaly in the image?", img, prompts)
            n_text = sum(
                len(llm.tokenize(s))
                for s in ("### Human: <Img>", "</Img> ", "Is there any anomaly in the image?\n### Assistant:")
            )
            assert first.prompt_tokens == 1 + n_text + 1 + 18  # BOS, text, image, 18 prompts
            assert first.n_tokens > 0 and first.stop_reason in ("length", "stop", "eos")
            second = chat.ask("Is there any anomaly?")
            # The follow-up appends only the previous answer's last token, the "\n###" closing it
            # when the model did not, and its own text: image and prompts are not fed again.
            closing = 0 if first.stop_reason == "stop" else len(llm.tokenize("\n###"))
            turn = len(llm.tokenize(" Human: Is there any anomaly?\n### Assistant:"))
            assert second.prompt_tokens == 1 + closing + turn
            assert second.n_tokens > 0


def test_missing_and_unexpected_tensors_are_listed(tmp_path: Path, tiny: dict) -> None:
    sd = dict(tiny["sd"])
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(2, 2, dtype=torch.float16)
    base = tmp_path / "broken"
    base.mkdir()
    for f in ("config.json", "tokenizer.model"):
        (base / f).write_bytes((tiny["root"] / "base" / f).read_bytes())
    safetensors_torch.save_file(sd, str(base / "model.safetensors"))
    with pytest.raises(LLMExportError) as err:
        export_llm(base, tmp_path / "out", None, quants=())
    msg = str(err.value)
    assert "missing 1 tensors: model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected 1 tensors: model.layers.0.self_attn.extra.weight" in msg


def test_lora_delta_with_missing_and_foreign_keys_is_refused(tmp_path: Path, tiny: dict) -> None:
    lora = dict(tiny["lora"])
    del lora["llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    lora["prompt_learner.base_prompts"] = torch.zeros(9, 256)
    torch.save(lora, tmp_path / "delta.pt")
    with pytest.raises(LLMExportError) as err:
        export_llm(tiny["root"] / "base", tmp_path / "out", tmp_path / "delta.pt", R, R, quants=())
    msg = str(err.value)
    assert "layers.1.self_attn.v_proj.lora_B.weight" in msg
    assert "unexpected 1 keys: prompt_learner.base_prompts" in msg


def test_export_refuses_to_overwrite_without_flag(tiny: dict) -> None:
    with pytest.raises(LLMExportError, match="--overwrite"):
        export_llm(tiny["root"] / "base", tiny["out"], None, quants=(), name="tiny")


def test_tiny_model_embedding_rows_reproduce_token_logits(tiny: dict) -> None:
    ids = [1] + list(range(300, 340))
    with create_llm(tiny["out"] / "tiny.f16.gguf", n_ctx=256) as llm:
        llm.feed([ids[:3], ids[3:22], ids[22:]])
        by_ids = llm.last_logits()
        llm.reset()
        llm.feed([ids[:3], llm.token_embeddings(ids[3:22]), ids[22:]])
        by_embd = llm.last_logits()
    # f16 rows widened to f32 are exactly what ggml's get_rows produces: observed identical.
    assert np.abs(by_ids - by_embd).max() <= 1e-3
    assert by_ids.argmax() == by_embd.argmax()


def test_ask_with_exported_anomalygpt_llm_feeds_image_and_prompt_vectors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ask` with an `export llm` GGUF and an AnomalyGPT bundle: img_llm + 18 prompt vectors as embeddings."""
    pytest.importorskip("anomalygpt_edge.runtime.recipes.inspector")
    import cv2

    bundle = tmp_path / "agpt"
    assert (
        cli_main(
            [
                "export",
                "vision",
                "--source",
                "anomalygpt",
                "--random-weights",
                "--anomalygpt-size",
                "tiny",
                "--out",
                str(bundle),
            ]
        )
        == 0
    )
    width = json.loads((bundle / "manifest.json").read_text())["llm"]["width"]
    make_tiny_llama(
        tmp_path / "base",
        hidden_size=width,
        intermediate_size=2 * width,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    export_llm(tmp_path / "base", tmp_path / "gguf", None, quants=(), name="agpt")
    rng = np.random.default_rng(0)
    good = tmp_path / "good"
    good.mkdir()
    y, x = np.mgrid[0:224, 0:224]
    for i in range(6):
        img = 128 + 40 * np.sin(x / 9.0) * np.sin(y / 11.0) + rng.normal(0, 3, x.shape)
        cv2.imwrite(str(good / f"{i}.png"), np.clip(img, 0, 255).astype(np.uint8))
    bad = cv2.imread(str(good / "0.png"))
    cv2.rectangle(bad, (150, 160), (200, 210), (255, 255, 255), -1)
    cv2.imwrite(str(tmp_path / "bad.png"), bad)
    store = tmp_path / "store"
    assert (
        cli_main(
            [
                "enroll",
                "--recipe",
                "agpt",
                "--images",
                str(good),
                "--store",
                str(store),
                "--bundle",
                str(bundle),
                "--accept-flagged",
            ]
        )
        == 0
    )
    capsys.readouterr()
    rc = cli_main(
        [
            "ask",
            "--recipe",
            "agpt",
            "--store",
            str(store),
            "--model",
            str(tmp_path / "gguf" / "agpt.f16.gguf"),
            "--json",
            "--max-tokens",
            "8",
            str(tmp_path / "bad.png"),
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["llm_input"] == "anomalygpt-embeddings"
    with create_llm(tmp_path / "gguf" / "agpt.f16.gguf") as llm:
        n_text = sum(
            len(llm.tokenize(s))
            for s in ("### Human: <Img>", "</Img> ", "Is there any anomaly in the image?\n### Assistant:")
        )
    assert out["prompt_tokens"] == 1 + n_text + 1 + 18  # BOS, text, image vector, 18 prompt vectors
    # The planted square sits at the bottom right. A random LLM says nothing sensible, so the
    # answer is the verdict's sentence, and the model's text is kept for audit.
    v, answer = out["verdict"], out["answer"]
    assert v["verdict"] == "NG" and v["location"] == "bottom right"
    assert "bottom right" in answer["text"]
    assert answer["source"] == "template" and answer["replaced"] and answer["model_text"] is not None


def test_added_tokens_take_their_ids_and_free_ids_become_unused(tmp_path: Path) -> None:
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3), ("▁a", -1.0, 1)]
    (tmp_path / "added_tokens.json").write_text(json.dumps({"[PAD]": 5}))
    tokens, scores, types = build_vocab(tmp_path, pieces, 7)
    assert tokens == ["<unk>", "<s>", "</s>", "▁a", "[PAD4]", "[PAD]", "[PAD6]"]
    assert types == [2, 3, 3, 1, 5, 3, 5]
    (tmp_path / "added_tokens.json").write_text(json.dumps({"[PAD]": 9}))
    with pytest.raises(LLMExportError, match="beyond vocab_size 7"):
        build_vocab(tmp_path, pieces, 7)


def test_closing_a_stream_early_stops_generation(tiny: dict) -> None:
    with create_llm(tiny["out"] / "tiny.f16.gguf", n_ctx=256) as llm:
        llm.feed([[1, 300, 301]])
        before = llm.n_past
        stream = llm.stream(GenerationConfig(max_tokens=100, temperature=0.0, stop=()))
        first = next(stream)
        stream.close()  # the helper thread stops at the next token and releases the model
        assert first
        assert llm.n_past < before + 100
        llm.feed([[302]])  # the model is usable again right away
