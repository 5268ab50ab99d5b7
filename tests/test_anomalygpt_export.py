"""The AnomalyGPT source of ``export vision``: a tiny model of the real architecture, saved in the
real checkpoint key layouts, exported through the product's CLI path and checked graph by graph
against PyTorch eager (fp32 tight, fp16 within fp16 tolerance); plus the loaders' strictness."""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomalygpt_edge.atomic_files import sha256_file
from anomalygpt_edge.engines import EngineBundle
from anomalygpt_edge.export import checkpoints as ckpt
from anomalygpt_edge.export.anomalygpt_export import build_modules, compute_text_features
from anomalygpt_edge.export.anomalygpt_models import (
    FULL,
    SPEC_PARAMS,
    TINY,
    ImageBindVision,
    PromptLearner,
    TextMatchingDecoder,
    expected_parameters,
)
from anomalygpt_edge.export.anomalygpt_text import (
    CLASS_NAMES,
    OBJECT_NAMES,
    ClipBPETokenizer,
    ImageBindText,
    class_sentences,
    class_text_features,
    select_class,
)

#: 16 merges: with CLIP's 512 byte symbols and 2 specials, a 530-token vocabulary (TINY.text_vocab).
MERGES = [
    "t h", "th e</w>", "p h", "ph o", "pho t", "phot o</w>", "o f</w>", "d e",
    "de f", "def e", "defe c", "defec t</w>", "f l", "fl a", "fla w</w>", "b o",
]  # fmt: skip
LORA_LAYERS, LORA_RANK = 2, 4


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max())


class Reference:
    """The tiny model's original modules (the weights saved to disk), run in PyTorch eager."""

    def __init__(self) -> None:
        torch.manual_seed(1234)
        self.vision = ImageBindVision(TINY).eval()
        self.text = ImageBindText(TINY).eval()
        self.decoder = TextMatchingDecoder(TINY).eval()
        self.prompt_learner = PromptLearner(TINY).eval()
        self.llama_proj = torch.nn.Linear(TINY.embed_dim, TINY.llm_width).eval()
        with torch.no_grad():  # non-trivial LayerNorm affine parameters, so a swapped key shows
            for m in [*self.vision.modules(), *self.text.modules()]:
                if isinstance(m, torch.nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)
            for m in self.vision.modules():
                if isinstance(m, torch.nn.MultiheadAttention):
                    m.in_proj_bias.normal_(0, 0.1)

    @torch.no_grad()
    def encoder(self, x: np.ndarray) -> dict[str, np.ndarray]:
        embed, taps = self.vision(torch.from_numpy(x))  # Conv3d reference stem, sequence-first taps
        out = {"image_embed": embed, "img_llm": self.llama_proj(embed).unsqueeze(1)}
        out.update({f"tap{i}": t.transpose(0, 1)[:, 1:] for i, t in zip(TINY.taps, taps, strict=True)})
        return {k: v.numpy() for k, v in out.items()}


@pytest.fixture(scope="module")
def ref() -> Reference:
    return Reference()


@pytest.fixture(scope="module")
def files(ref: Reference, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoints in the real layouts (plus keys of other ImageBind modalities) and a BPE vocab."""
    d = tmp_path_factory.mktemp("ckpt")
    imagebind = ckpt.imagebind_state_dict(ref.vision, ref.text)
    imagebind["modality_trunks.audio.blocks.0.attn.bias_k"] = torch.zeros(1, 1, 8)
    imagebind["modality_preprocessors.depth.cls_token"] = torch.zeros(1, 1, 8)
    imagebind["modality_postprocessors.thermal.1.log_logit_scale"] = torch.tensor(2.3)
    imagebind["modality_heads.imu.3.weight"] = torch.zeros(4, 8)
    torch.save(imagebind, d / "imagebind_huge.pth")
    torch.save(ckpt.anomalygpt_state_dict(ref.decoder, ref.prompt_learner), d / "anomalygpt.pt")
    delta = {
        "llama_proj.weight": ref.llama_proj.weight.detach(),
        "llama_proj.bias": ref.llama_proj.bias.detach(),
    }
    for layer in range(LORA_LAYERS):
        for proj in "qkvo":
            delta[ckpt.lora_key(layer, proj, "A")] = torch.randn(LORA_RANK, 16)
            delta[ckpt.lora_key(layer, proj, "B")] = torch.zeros(16, LORA_RANK)
    torch.save(delta, d / "pandagpt_delta.pt")
    with gzip.open(d / "bpe.txt.gz", "wt", encoding="utf-8") as f:
        f.write("#version: tiny test vocabulary\n" + "\n".join(MERGES) + "\n")
    return {
        "imagebind": d / "imagebind_huge.pth",
        "anomalygpt": d / "anomalygpt.pt",
        "pandagpt_delta": d / "pandagpt_delta.pt",
        "bpe": d / "bpe.txt.gz",
    }


@pytest.fixture(scope="module")
def bundle_dir(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle, exported by ``export vision --source anomalygpt`` from the saved files."""
    from anomalygpt_edge.export import vision

    out = tmp_path_factory.mktemp("bundles") / "anomalygpt"
    args = argparse.Namespace(
        source="anomalygpt", out=out, overwrite=False, image_size=224, metric="l2", smoothing_sigma=4.0,
        no_fp16=False, imagebind=files["imagebind"], anomalygpt=files["anomalygpt"],
        pandagpt_delta=files["pandagpt_delta"], random_weights=False, bpe_vocab=files["bpe"],
        anomalygpt_size="tiny", seed=0,
    )  # fmt: skip
    assert vision.run(args) == 0
    return out


@pytest.fixture(scope="module")
def bundle(bundle_dir: Path) -> EngineBundle:
    return EngineBundle.open(bundle_dir)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)


# --- architecture ------------------------------------------------------------------------------


def test_full_size_parameter_counts_match_the_spec() -> None:
    assert expected_parameters(FULL) == SPEC_PARAMS
    assert SPEC_PARAMS["vision"] == 632_829_440  # "632.8 M"
    assert FULL.n_prompts == 18 and FULL.grid == 16


def test_tiny_modules_have_the_closed_form_parameter_counts(ref: Reference) -> None:
    want = expected_parameters(TINY)
    got = {
        "vision": sum(p.numel() for p in ref.vision.parameters()),
        "decoder": sum(p.numel() for p in ref.decoder.parameters()),
        "prompt_learner": sum(p.numel() for p in ref.prompt_learner.parameters()),
        "llama_proj": sum(p.numel() for p in ref.llama_proj.parameters()),
    }
    assert got == want


def test_folded_conv2d_stem_equals_the_conv3d_over_a_repeated_image(ref: Reference) -> None:
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        conv3d = ref.vision.stem(x.unsqueeze(2).repeat(1, 1, 2, 1, 1)).squeeze(2)
        conv2d = F.conv2d(x, ref.vision.stem.weight.sum(2), stride=14)
    diff = (conv3d - conv2d).abs().max().item()
    assert diff < 1e-4, f"max abs diff {diff}"


def test_prompt_ensemble_has_14_normal_and_10_abnormal_sentences() -> None:
    normal, abnormal = class_sentences("metal nut")
    assert len(normal) == 14 and len(abnormal) == 10
    assert normal[0] == "a photo of a metal nut." and abnormal[-1] == "a photo of the metal nut with damage."


@pytest.mark.parametrize(
    ("prompt", "cls"),
    [
        ("This is a photo of a metal nut for anomaly detection.", "metal nut"),
        ("This is a photo of pipe_fryum.", "fryum"),  # 'fryum' is listed before 'pipe fryum'
        ("This is a photo of capsules.", "capsule"),
        ("This is a photo of chewinggom.", "object"),
        ("This is a photo of pcb3.", "pcb"),
    ],
)
def test_class_selection_is_the_first_listed_substring_else_object(prompt: str, cls: str) -> None:
    assert select_class(prompt) == cls


def test_bpe_tokenizer_applies_merges_in_rank_order(files: dict[str, Path]) -> None:
    tok = ClipBPETokenizer(files["bpe"], context_length=16)
    assert tok.vocab_size == TINY.text_vocab
    ids = tok(["A photo of the  flaw."])[0].tolist()
    a, dot = 256 + ord("a") - ord("!"), 256 + ord(".") - ord("!")  # single-byte word ends: 'a</w>', '.</w>'
    assert ids[:8] == [tok.sot, a, 512 + 5, 512 + 6, 512 + 1, 512 + 14, dot, tok.eot]
    assert ids[8:] == [0] * 8


# --- the bundle ----------------------------------------------------------------------------------


def test_manifest_describes_the_anomalygpt_bundle(bundle: EngineBundle, files: dict[str, Path]) -> None:
    m = bundle.manifest
    assert set(m.graphs) == {"encoder", "bank_matcher", "decoder", "prompt_learner"}
    enc = m.graphs["encoder"]
    assert [s.name for s in enc.outputs] == ["image_embed", "img_llm", "tap0", "tap1", "tap2", "tap3"]
    assert enc.output("tap3").shape == ("batch", 256, TINY.width)
    assert enc.output("img_llm").shape == ("batch", 1, TINY.llm_width)
    assert [p.name for p in m.patch_layers] == ["tap0", "tap1", "tap2", "tap3"]
    assert all(p.grid == (16, 16) and p.dim == TINY.width for p in m.patch_layers)
    assert m.graphs["bank_matcher"].input("bank_3").shape == ("bank", TINY.width)
    assert m.graphs["decoder"].input("text_feats").shape == ("batch", 2, TINY.embed_dim)
    assert m.graphs["prompt_learner"].output("prompt_embeds").shape == ("batch", 18, TINY.llm_width)
    assert all(g.fp16_file for g in m.graphs.values())
    pre = m.preprocess
    assert (pre.resize, pre.interpolation, pre.color, pre.size) == (
        "shorter_side_crop",
        "bicubic",
        "RGB",
        (224, 224),
    )
    assert pre.mean == (0.48145466, 0.4578275, 0.40821073) and pre.std == (0.26862954, 0.26130258, 0.27577711)
    assert m.matching["metric"] == "cosine" and m.matching["image_score"] == "max"
    assert m.matching["smoothing_sigma"] == 0
    assert m.llm["image_embedding_output"] == "img_llm" and m.llm["n_prompts"] == 18
    assert m.llm["width"] == TINY.llm_width
    tf = m.text_features
    assert tf["file"] == "text_features.npz" and tf["default_class"] == "object"
    assert tf["classes"] == list(OBJECT_NAMES) and tf["selection"]["order"] == list(CLASS_NAMES)
    assert "text tower" in tf["source"]
    by_role = {c["role"].split(" ")[0]: c for c in m.source["checkpoints"]}
    for role, key in (
        ("imagebind_huge", "imagebind"),
        ("anomalygpt", "anomalygpt"),
        ("pandagpt_delta", "pandagpt_delta"),
    ):
        assert by_role[role]["sha256"] == sha256_file(files[key])
    assert by_role["imagebind_huge"]["keys_ignored"] == {"audio": 1, "depth": 1, "imu": 1, "thermal": 1}
    assert by_role["pandagpt_delta"]["lora_tensors"] == LORA_LAYERS * 8
    assert by_role["pandagpt_delta"]["lora_rank"] == LORA_RANK
    assert m.source["random_weights"] == []


def test_text_features_are_stored_without_pickle(bundle_dir: Path) -> None:
    with np.load(bundle_dir / "text_features.npz", allow_pickle=False) as data:
        assert sorted(data.files) == sorted(OBJECT_NAMES)
        assert data["bottle"].dtype == np.float32 and data["bottle"].shape == (2, TINY.embed_dim)


def test_text_features_are_the_renormalised_prompt_ensemble(
    bundle: EngineBundle, ref: Reference, files: dict[str, Path]
) -> None:
    tok = ClipBPETokenizer(files["bpe"], TINY.text_context)
    feats = bundle.text_features()
    for name in ("bottle", "metal nut", "object"):
        want = class_text_features(ref.text, tok, name).numpy()
        diff = _max_diff(feats[name], want)
        assert diff < 1e-5, f"{name}: max abs diff {diff}"
        np.testing.assert_allclose(np.linalg.norm(feats[name], axis=-1), 1.0, atol=1e-5)
    assert _max_diff(feats["bottle"], feats["cable"]) > 1e-3  # classes differ


@pytest.mark.parametrize(("precision", "atol"), [("fp32", 1e-4), ("fp16", 2e-2)])
def test_encoder_matches_pytorch_eager(
    bundle: EngineBundle, ref: Reference, pixels: np.ndarray, precision: str, atol: float
) -> None:
    dtype = np.float32 if precision == "fp32" else np.float16
    out = bundle.engine("encoder", precision).run({"pixel_values": pixels.astype(dtype)})
    want = ref.encoder(pixels)
    assert set(out) == set(want)
    for name, value in want.items():
        assert out[name].dtype == dtype and out[name].shape == value.shape
        scale = max(1.0, float(np.abs(value).max()))
        diff = _max_diff(out[name], value)
        assert diff <= atol * scale, f"encoder {precision} {name}: max abs diff {diff} (scale {scale:.2f})"
    np.testing.assert_allclose(np.linalg.norm(out["image_embed"].astype(np.float32), axis=-1), 1.0, atol=atol)


@pytest.mark.parametrize(("precision", "atol"), [("fp32", 1e-5), ("fp16", 1e-2)])
def test_decoder_matches_pytorch_eager(
    bundle: EngineBundle, ref: Reference, pixels: np.ndarray, precision: str, atol: float
) -> None:
    dtype = np.float32 if precision == "fp32" else np.float16
    taps = {k: v for k, v in ref.encoder(pixels).items() if k.startswith("tap")}
    feats = bundle.text_features()
    text = np.stack([feats["bottle"], feats["screw"]])  # one class per image of the batch
    out = bundle.engine("decoder", precision).run(
        {**{k: v.astype(dtype) for k, v in taps.items()}, "text_feats": text.astype(dtype)}
    )["anomaly_map"]
    with torch.no_grad():
        want = ref.decoder(*[torch.from_numpy(v) for v in taps.values()], torch.from_numpy(text)).numpy()
    assert out.shape == (2, 1, 224, 224) and out.dtype == dtype
    diff = _max_diff(out, want)
    assert diff <= atol, f"decoder {precision}: max abs diff {diff}"
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def _fewshot_reference(queries: list[np.ndarray], banks: list[np.ndarray]) -> np.ndarray:
    """AnomalyGPT op:627-636 written out: cosine to the bank, max, mean over layers, upsample, 1 - sim."""
    sims = []
    for q, bank in zip(queries, banks, strict=True):
        qn = q / np.linalg.norm(q, axis=-1, keepdims=True)
        bn = bank / np.linalg.norm(bank, axis=-1, keepdims=True)
        sims.append((qn @ bn.T).max(-1))
    sim = torch.from_numpy(np.mean(sims, axis=0).reshape(-1, 1, 16, 16))
    return (1 - F.interpolate(sim, size=224, mode="bilinear", align_corners=True)).numpy()


@pytest.mark.parametrize(("precision", "atol"), [("fp32", 1e-5), ("fp16", 5e-3)])
def test_bank_matcher_matches_anomalygpt_few_shot_map(
    bundle: EngineBundle, ref: Reference, pixels: np.ndarray, precision: str, atol: float
) -> None:
    dtype = np.float32 if precision == "fp32" else np.float16
    taps = [v for k, v in ref.encoder(pixels).items() if k.startswith("tap")]
    golden = [t[0] for t in taps]  # k=1: the first image's 256 patches per layer
    feeds = {f"q_{i}": t.astype(dtype) for i, t in enumerate(taps)}
    feeds |= {f"bank_{i}": b.astype(dtype) for i, b in enumerate(golden)}
    out = bundle.engine("bank_matcher", precision).run(feeds)["anomaly_map"]
    want = _fewshot_reference(taps, golden)
    diff = _max_diff(out, want)
    assert diff <= atol, f"bank matcher {precision}: max abs diff {diff}"
    assert float(np.abs(out[0].astype(np.float32)).max()) < 10 * atol  # the enrolled image matches itself


@pytest.mark.parametrize(("precision", "rtol"), [("fp32", 1e-5), ("fp16", 5e-3)])
def test_prompt_learner_matches_pytorch_eager(
    bundle: EngineBundle, ref: Reference, precision: str, rtol: float
) -> None:
    dtype = np.float32 if precision == "fp32" else np.float16
    amap = np.random.default_rng(3).random((2, 1, 224, 224)).astype(np.float32)
    out = bundle.engine("prompt_learner", precision).run({"anomaly_map": amap.astype(dtype)})["prompt_embeds"]
    with torch.no_grad():
        want = ref.prompt_learner(torch.from_numpy(amap)).numpy()
    assert out.shape == (2, 18, TINY.llm_width)
    scale = float(np.abs(want).max())
    diff = _max_diff(out, want)
    assert diff <= rtol * scale, f"prompt learner {precision}: max abs diff {diff} (scale {scale:.2f})"
    base = ref.prompt_learner.base_prompts.detach().numpy()
    assert _max_diff(out[0, :9], base) <= rtol * scale  # the 9 learned base prompts come first


# --- loaders -------------------------------------------------------------------------------------


def test_missing_and_unexpected_keys_are_listed_naming_the_file(ref: Reference, tmp_path: Path) -> None:
    state = ckpt.anomalygpt_state_dict(ref.decoder, ref.prompt_learner)
    del state["image_decoder.fc.2.bias"]
    state["prompt_learner.meta_net.18.weight"] = torch.zeros(1)
    path = tmp_path / "train_mvtec.pt"
    torch.save(state, path)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_anomalygpt(path, TextMatchingDecoder(TINY), PromptLearner(TINY))
    msg = str(info.value)
    assert "train_mvtec.pt" in msg
    assert "missing keys [image_decoder.fc.2.bias]" in msg
    assert "unexpected keys [prompt_learner.meta_net.18.weight]" in msg


def test_unknown_imagebind_key_is_unexpected_but_other_modalities_are_ignored(
    files: dict[str, Path], tmp_path: Path
) -> None:
    state = ckpt.read_state_dict(files["imagebind"])
    report = ckpt.load_imagebind(files["imagebind"], ImageBindVision(TINY), state=state)
    assert report.ignored == {
        "audio": 1,
        "depth": 1,
        "imu": 1,
        "thermal": 1,
        "text": len(ckpt.imagebind_text_keys(ImageBindText(TINY))) + 2,
    }
    state["modality_trunks.vision.blocks.4.norm_1.weight"] = torch.ones(TINY.width)  # a 5th block
    path = tmp_path / "imagebind_huge.pth"
    torch.save(state, path)
    with pytest.raises(
        ckpt.CheckpointError, match=r"imagebind_huge.pth.*unexpected keys \[modality_trunks.vision.blocks.4"
    ):
        ckpt.load_imagebind(path, ImageBindVision(TINY))


def test_wrong_shape_is_listed(files: dict[str, Path]) -> None:
    state = ckpt.read_state_dict(files["imagebind"])
    state["modality_preprocessors.vision.pos_embedding_helper.pos_embed"] = torch.zeros(1, 50, TINY.width)
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"shape mismatches \[.*pos_embed: file \(1, 50, 32\), model \(1, 257, 32\)",
    ):
        ckpt.load_imagebind(files["imagebind"], ImageBindVision(TINY), state=state)


def test_incomplete_lora_delta_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    state = ckpt.read_state_dict(files["pandagpt_delta"])
    del state[ckpt.lora_key(1, "v", "B")]
    path = tmp_path / "delta.pt"
    torch.save(state, path)
    with pytest.raises(
        ckpt.CheckpointError, match=r"delta.pt: incomplete LoRA delta: missing \[layer 1 v_proj lora_B\]"
    ):
        ckpt.load_pandagpt_delta(path, torch.nn.Linear(TINY.embed_dim, TINY.llm_width))


def test_loader_reads_the_unprefixed_peft_lora_names_too(files: dict[str, Path], tmp_path: Path) -> None:
    state = {k.replace(".default", ""): v for k, v in ckpt.read_state_dict(files["pandagpt_delta"]).items()}
    torch.save(state, tmp_path / "old_peft.pt")
    report = ckpt.load_pandagpt_delta(tmp_path / "old_peft.pt", torch.nn.Linear(TINY.embed_dim, TINY.llm_width))
    assert report.info["lora_tensors"] == LORA_LAYERS * 8


_UNPICKLED: list[str] = []


def _record(tag: str) -> str:
    _UNPICKLED.append(tag)
    return tag


class _Payload:
    """Unpickling this calls ``_record``: proof of whether arbitrary pickle code ran."""

    def __reduce__(self):
        return (_record, ("payload ran",))


def test_checkpoint_needing_arbitrary_pickle_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.pt"
    torch.save({"llama_proj.weight": torch.zeros(2, 2), "extra": _Payload()}, path)
    with pytest.raises(ckpt.CheckpointError, match=r"pytorch_model.pt: refused"):
        ckpt.read_state_dict(path)
    assert _UNPICKLED == []


def test_file_that_is_not_a_checkpoint_is_refused_as_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "imagebind_huge.pth"
    path.write_bytes(b"<html>403 Forbidden</html>")  # what a failed download often leaves behind
    with pytest.raises(ckpt.CheckpointError, match=r"imagebind_huge.pth: not a readable torch checkpoint"):
        ckpt.read_state_dict(path)


def test_safetensors_checkpoint_loads_like_the_torch_file(ref: Reference, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = ckpt.anomalygpt_state_dict(ref.decoder, ref.prompt_learner)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "anomalygpt.safetensors"))
    decoder, pl = TextMatchingDecoder(TINY), PromptLearner(TINY)
    report = ckpt.load_anomalygpt(tmp_path / "anomalygpt.safetensors", decoder, pl)
    assert report.loaded == len(state)
    assert torch.equal(pl.base_prompts, ref.prompt_learner.base_prompts)
    assert torch.equal(decoder.fc[3].weight, ref.decoder.fc[3].weight)


def test_missing_checkpoint_names_the_flag_unless_random_weights_are_asked_for(
    files: dict[str, Path],
) -> None:
    with pytest.raises(ckpt.CheckpointError, match=r"no checkpoint for llama_proj \(--pandagpt-delta\)"):
        build_modules(TINY, files["imagebind"], files["anomalygpt"])
    with pytest.raises(ckpt.CheckpointError, match=r"vision \(--imagebind\), decoder \(--anomalygpt\)"):
        build_modules(TINY)


def test_export_cli_accepts_the_anomalygpt_flags() -> None:
    from anomalygpt_edge.export import cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    argv = ["export", "vision", "--source", "anomalygpt", "--out", "b", "--imagebind", "i.pth"]
    argv += [
        "--anomalygpt",
        "a.pt",
        "--pandagpt-delta",
        "d.pt",
        "--bpe-vocab",
        "v.gz",
        "--anomalygpt-size",
        "tiny",
    ]
    args = parser.parse_args(argv)
    assert (args.source, args.anomalygpt_size, args.bpe_vocab, args.seed) == (
        "anomalygpt",
        "tiny",
        Path("v.gz"),
        0,
    )
    assert args.pandagpt_delta == Path("d.pt") and not args.random_weights


def test_random_weight_text_features_are_labelled_random_and_unit_norm() -> None:
    mods = build_modules(TINY, random_weights=True)
    feats, how = compute_text_features(mods)
    assert how.startswith("RANDOM")
    assert set(feats) == set(OBJECT_NAMES)
    np.testing.assert_allclose(np.linalg.norm(feats["pcb"], axis=-1), 1.0, atol=1e-6)


def test_bundle_manifest_is_plain_json(bundle_dir: Path) -> None:
    data = json.loads((bundle_dir / "manifest.json").read_text())
    assert data["llm"]["prompt_graph"] == "prompt_learner"
    assert data["source"]["preset"] == "tiny" and data["source"]["config"]["taps"] == [0, 1, 2, 3]
