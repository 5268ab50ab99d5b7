"""The strong encoder sources of ``export vision``: WideResNet-50-2 (PatchCore) and DINOv2 ViT-S/14,
ViT-B/14 (AnomalyDINO), built with random weights in their real checkpoint layouts, saved as the
files users download, exported through the CLI at small input sizes (the graphs do not depend on
the size), run under ONNX Runtime in a process that cannot import torch, and compared with
PyTorch eager; plus the strict key accounting and the up-front argument checks."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomalygpt_edge.atomic_files import sha256_file
from anomalygpt_edge.cli import main
from anomalygpt_edge.engines import EngineBundle
from anomalygpt_edge.export import checkpoints as ckpt
from anomalygpt_edge.export import cli as export_cli
from anomalygpt_edge.export import dinov2, vision
from anomalygpt_edge.export import wide_resnet as wrn
from anomalygpt_edge.export.bank_matcher import BankMatcher

WRN_SIZE, DINO_SIZE = 64, 84  # 8×8 and 6×6 patch grids: small, fast, same graphs as 224 / 448


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max())


def _perturb_norms(model: torch.nn.Module) -> None:
    """Non-trivial norm affines/statistics and LayerScale, so a swapped or dropped key changes outputs."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, dinov2.LayerScale):
                m.gamma.uniform_(0.1, 1.0)


def _export(source: str, out: Path, *extra: str) -> Path:
    assert main(["export", "vision", "--source", source, "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def wrn_net() -> wrn.WideResNet50_2:
    net = vision.build_wide_resnet50(seed=7)
    _perturb_norms(net)
    return net.eval()


@pytest.fixture(scope="module")
def dino_net() -> dinov2.DinoVisionTransformer:
    vit = vision.build_dinov2("dinov2-small", seed=5)
    _perturb_norms(vit)
    return vit.eval()


@pytest.fixture(scope="module")
def files(
    wrn_net: wrn.WideResNet50_2, dino_net: dinov2.DinoVisionTransformer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The weights as users get them: torchvision's .pth (no BatchNorm counters) and a safetensors copy of DINOv2."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("weights")
    state = {k: v for k, v in wrn_net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, d / "wide_resnet50_2-95faca4d.pth")
    save_file({k: v.contiguous() for k, v in dino_net.state_dict().items()}, str(d / "dinov2_vits14.safetensors"))
    return {"wide_resnet50": d / "wide_resnet50_2-95faca4d.pth", "dinov2-small": d / "dinov2_vits14.safetensors"}


@pytest.fixture(scope="module")
def bundles(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bundles")
    return {
        "wide_resnet50": _export(
            "wide_resnet50", d / "wrn", "--weights", str(files["wide_resnet50"]), "--image-size", str(WRN_SIZE)
        ),
        "dinov2-small": _export(
            "dinov2-small", d / "dino", "--weights", str(files["dinov2-small"]), "--image-size", str(DINO_SIZE)
        ),
    }


@pytest.fixture(scope="module")
def pixels() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "wide_resnet50": rng.standard_normal((2, 3, WRN_SIZE, WRN_SIZE)).astype(np.float32),
        "dinov2-small": rng.standard_normal((2, 3, DINO_SIZE, DINO_SIZE)).astype(np.float32),
    }


@pytest.fixture(scope="module")
def eager(
    wrn_net: wrn.WideResNet50_2, dino_net: dinov2.DinoVisionTransformer, pixels: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """PyTorch eager patches of the original modules (DINOv2: its own per-call pos-embed resize)."""
    with torch.no_grad():
        return {
            "wide_resnet50": wrn.PatchCoreEncoder(wrn_net)(torch.from_numpy(pixels["wide_resnet50"])).numpy(),
            "dinov2-small": dino_net(torch.from_numpy(pixels["dinov2-small"])).numpy(),
        }


#: Runs in a child interpreter where importing torch or onnx fails, as on a runtime-only device.
_CHILD = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'onnx'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import numpy as np
from anomalygpt_edge.engines import EngineBundle
bundles, inputs, out = sys.argv[1].split(','), np.load(sys.argv[2]), {}
for name, path in (b.split('=', 1) for b in bundles):
    bundle = EngineBundle.open(path)  # verifies every file's sha256
    x = inputs[name]
    for precision, dtype in (('fp32', np.float32), ('fp16', np.float16)):
        p = bundle.engine('encoder', precision).run({'pixel_values': x.astype(dtype)})['patches_0']
        out[f'{name}/{precision}'] = p.astype(np.float32)
    p = out[f'{name}/fp32']
    m = bundle.engine('bank_matcher').run({'q_0': p, 'bank_0': p[0]})
    out[f'{name}/patch_scores'], out[f'{name}/anomaly_map'] = m['patch_scores'], m['anomaly_map']
assert 'torch' not in sys.modules and 'onnx' not in sys.modules
np.savez(sys.argv[3], **out)
print('ok')
"""


@pytest.fixture(scope="module")
def ort(bundles: dict[str, Path], pixels: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("ort")
    np.savez(d / "inputs.npz", **pixels)
    spec = ",".join(f"{k}={v}" for k, v in bundles.items())
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, spec, str(d / "inputs.npz"), str(d / "out.npz")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
    with np.load(d / "out.npz") as data:
        return {k: data[k] for k in data.files}


# --- architectures in their real key layouts -------------------------------------------------------


def test_wide_resnet50_has_torchvision_keys_shapes_and_68_9m_parameters() -> None:
    with torch.device("meta"):  # layout and shapes only: no memory, no random init
        net = vision.build_wide_resnet50()
    state = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == wrn.EXPECTED_PARAMETERS == 68_883_240
    assert len(state) == 320  # 53 convs + 53 BatchNorms × 5 + fc weight and bias
    assert list(state)[:2] == ["conv1.weight", "bn1.weight"] and list(state)[-2:] == ["fc.weight", "fc.bias"]
    shapes = {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.conv1.weight": (128, 64, 1, 1),  # wide: 2 × ResNet-50's 64
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.running_var": (256,),
        "layer2.0.conv2.weight": (256, 256, 3, 3),
        "layer3.5.bn3.weight": (1024,),
        "layer4.2.conv2.weight": (1024, 1024, 3, 3),
        "fc.weight": (1000, 2048),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert "layer2.1.downsample.0.weight" not in state and "layer4.3.conv1.weight" not in state


@pytest.mark.parametrize(
    ("source", "dim", "heads", "params"),
    [("dinov2-small", 384, 6, 22_056_576), ("dinov2-base", 768, 12, 86_580_480)],
)
def test_dinov2_has_the_hub_checkpoint_keys_and_published_parameter_count(
    source: str, dim: int, heads: int, params: int
) -> None:
    with torch.device("meta"):  # layout and shapes only: ViT-B/14 is not exported in this suite (slow)
        vit = vision.build_dinov2(source)
    state = vit.state_dict()
    assert sum(p.numel() for p in vit.parameters()) == params == dinov2.expected_parameters(vit.cfg)
    block = [
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
        "mlp.fc2.bias", "ls2.gamma",
    ]  # fmt: skip
    want = ["cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    want += [f"blocks.{i}.{k}" for i in range(12) for k in block] + ["norm.weight", "norm.bias"]
    assert sorted(state) == sorted(want)  # no register tokens, no head
    assert tuple(state["pos_embed"].shape) == (1, 1 + 37 * 37, dim)
    assert tuple(state["patch_embed.proj.weight"].shape) == (dim, 3, 14, 14)
    assert tuple(state["blocks.11.attn.qkv.weight"].shape) == (3 * dim, dim)
    assert tuple(state["blocks.0.mlp.fc1.weight"].shape) == (4 * dim, dim)
    assert vit.cfg.heads == heads and vit.cfg.weights_url.endswith(f"{vit.cfg.name}/{vit.cfg.name}_pretrain.pth")


def test_dinov2_positional_embedding_is_resized_bicubically_from_the_518px_grid(
    dino_net: dinov2.DinoVisionTransformer,
) -> None:
    assert dino_net.interpolated_pos_embed((37, 37)) is dino_net.pos_embed  # 518 px: used as is
    with torch.no_grad():
        pos = dino_net.interpolated_pos_embed((32, 32))  # AnomalyDINO's 448 px
        grid = dino_net.pos_embed[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
        want = F.interpolate(grid, scale_factor=(32.1 / 37, 32.1 / 37), mode="bicubic", align_corners=False)
    assert pos.shape == (1, 1 + 32 * 32, 384)
    assert torch.equal(pos[:, 0], dino_net.pos_embed[:, 0])  # the class token's entry is kept
    assert torch.allclose(pos[0, 1:].reshape(32, 32, 384), want[0].permute(1, 2, 0))


def test_folded_positional_embedding_gives_the_eager_model_output(dino_net: dinov2.DinoVisionTransformer) -> None:
    x = torch.randn(1, 3, DINO_SIZE, DINO_SIZE)
    with torch.no_grad():
        assert torch.equal(dinov2.DinoPatchEncoder(dino_net, (DINO_SIZE, DINO_SIZE))(x), dino_net(x))


# --- the bundles ------------------------------------------------------------------------------------


def test_patchcore_bundle_records_its_recipe_and_the_weights_sha256(
    bundles: dict[str, Path], files: dict[str, Path]
) -> None:
    m = EngineBundle.open(bundles["wide_resnet50"]).manifest
    assert m.source["kind"] == "wide_resnet50" and m.source["layers"] == ["layer2", "layer3"]
    (record,) = m.source["checkpoints"]
    assert record["name"] == m.source["weights"] == "wide_resnet50_2-95faca4d.pth"
    assert record["sha256"] == sha256_file(files["wide_resnet50"]) and record["origin"] == "--weights"
    assert record["keys_loaded"] == 320 - 53  # every key but the BatchNorm counters the file lacks
    assert m.source["random_weights"] is False
    assert m.matching == {"metric": "l2", "image_score": "max", "smoothing_sigma": 4.0}
    layer = m.patch_layers[0]
    assert (layer.name, layer.grid, layer.dim) == ("patches_0", (WRN_SIZE // 8, WRN_SIZE // 8), 512 + 1024)
    assert m.preprocess.mean == wrn.MEAN and m.preprocess.std == wrn.STD and m.preprocess.size == (64, 64)
    assert m.graphs["encoder"].output("patches_0").shape == ("batch", 64, 1536)
    assert m.graphs["bank_matcher"].input("bank_0").shape == ("bank", 1536)


def test_anomalydino_bundle_records_cosine_and_mean_of_the_top_1_percent(
    bundles: dict[str, Path], files: dict[str, Path]
) -> None:
    m = EngineBundle.open(bundles["dinov2-small"]).manifest
    assert m.source["kind"] == "dinov2-small" and m.source["weights"] == "dinov2_vits14.safetensors"
    assert m.source["checkpoints"][0]["sha256"] == sha256_file(files["dinov2-small"])
    assert m.source["checkpoints"][0]["keys_loaded"] == 175
    assert m.matching == {"metric": "cosine", "image_score": "mean_top_1pct", "smoothing_sigma": 4.0}
    assert m.patch_layers[0].grid == (6, 6) and m.patch_layers[0].dim == 384
    assert (m.preprocess.interpolation, m.preprocess.mean) == ("bicubic", dinov2.MEAN)
    assert dinov2.top_fraction_count(32 * 32) == 10 and dinov2.top_fraction_count(36) == 1
    assert json.loads((bundles["dinov2-small"] / "manifest.json").read_text())["matching"]["image_score"] == (
        "mean_top_1pct"
    )


@pytest.mark.parametrize("source", ["wide_resnet50", "dinov2-small"])
@pytest.mark.parametrize(("precision", "tol"), [("fp32", 1e-4), ("fp16", 3e-2)])
def test_bundle_runs_without_torch_and_matches_pytorch_eager(
    ort: dict, eager: dict[str, np.ndarray], source: str, precision: str, tol: float
) -> None:
    got, want = ort[f"{source}/{precision}"], eager[source]
    assert got.shape == want.shape
    scale = max(1.0, float(np.abs(want).max()))
    diff = _max_diff(got, want)
    assert diff <= tol * scale, f"{source} {precision}: max abs diff {diff} (scale {scale:.2f})"


@pytest.mark.parametrize(("source", "metric"), [("wide_resnet50", "l2"), ("dinov2-small", "cosine")])
def test_bank_matcher_scores_the_enrolled_image_as_normal_and_matches_eager(
    ort: dict, eager: dict[str, np.ndarray], source: str, metric: str
) -> None:
    patches = eager[source]
    side = int(round(patches.shape[1] ** 0.5))
    size = (WRN_SIZE,) * 2 if source == "wide_resnet50" else (DINO_SIZE,) * 2
    with torch.no_grad():
        amap, want = BankMatcher(1, (side, side), size, metric=metric)(
            torch.from_numpy(patches), torch.from_numpy(patches[0])
        )
    scores = ort[f"{source}/patch_scores"]
    # L2 is sqrt(|q|² - 2q·b + |b|²): near zero, float rounding of |q|² shows as sqrt(eps)·|q|.
    floor = 1e-3 * float(np.linalg.norm(patches, axis=-1).max()) if metric == "l2" else 1e-5
    assert float(np.abs(scores[0]).max()) <= floor  # the enrolled image matches itself
    assert float(scores[1].min()) > 10 * floor  # another image does not
    if metric == "l2":  # the same rounding, compared where it lives: on squared distances
        norm2 = float((patches**2).sum(-1).max())
        assert _max_diff(scores[1] ** 2, want[1].numpy() ** 2) <= 1e-6 * norm2
    else:
        assert _max_diff(scores[1], want[1].numpy()) <= 1e-5
        assert _max_diff(ort[f"{source}/anomaly_map"], amap.numpy()) <= 1e-5


def test_random_weights_bundle_is_rebuilt_from_its_seed_for_bench_vision(
    tmp_path: Path, bundles: dict[str, Path]
) -> None:
    out = _export(
        "dinov2-small", tmp_path / "rand", "--random-weights", "--seed", "3", "--image-size", "56", "--no-fp16"
    )
    bundle = EngineBundle.open(out)
    src = bundle.manifest.source
    assert (src["weights"], src["random_weights"], src["seed"], src["checkpoints"]) == ("random", True, 3, [])
    x = np.random.default_rng(1).standard_normal((1, 3, 56, 56)).astype(np.float32)
    with torch.no_grad():
        want = vision.reference_encoder(bundle.manifest)(torch.from_numpy(x)).numpy()
    assert _max_diff(bundle.engine("encoder").run({"pixel_values": x})["patches_0"], want) < 1e-4
    with pytest.raises(ValueError, match=r"dinov2_vits14.safetensors\) cannot be rebuilt"):
        vision.reference_encoder(EngineBundle.open(bundles["dinov2-small"]).manifest)


# --- weights files -----------------------------------------------------------------------------------


def test_weights_file_with_a_renamed_key_is_refused_in_one_line_naming_both_keys(
    dino_net: dinov2.DinoVisionTransformer, tmp_path: Path
) -> None:
    state = dict(dino_net.state_dict())
    state["blocks.3.ls1.scale"] = state.pop("blocks.3.ls1.gamma")
    torch.save(state, tmp_path / "dinov2_vits14_pretrain.pth")
    with pytest.raises(SystemExit) as info:
        main(["export", "vision", "--source", "dinov2-small", "--out", str(tmp_path / "b")]
             + ["--weights", str(tmp_path / "dinov2_vits14_pretrain.pth"), "--image-size", "56"])  # fmt: skip
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("export vision --source dinov2-small: ")
    assert "dinov2_vits14_pretrain.pth" in msg
    assert "missing keys [blocks.3.ls1.gamma]" in msg and "unexpected keys [blocks.3.ls1.scale]" in msg
    assert not (tmp_path / "b").exists() and not (tmp_path / ".b.partial").exists()  # nothing half-written


def test_wrong_shape_is_named_with_file_and_model_shapes(wrn_net: wrn.WideResNet50_2, tmp_path: Path) -> None:
    state = dict(wrn_net.state_dict())
    state["fc.weight"] = torch.zeros(10, 2048)  # a fine-tuned 10-class head
    state["fc.bias"] = torch.zeros(10)
    path = tmp_path / "finetuned.pth"
    torch.save(state, path)
    with pytest.raises(ckpt.CheckpointError) as info:
        vision.load_weights("wide_resnet50", vision.build_wide_resnet50(), path, wrn.WEIGHTS_URL)
    assert "shape mismatches [fc.bias: file (10,), model (1000,), fc.weight: file (10, 2048), model (1000, 2048)]" in (
        str(info.value)
    )


def test_pickled_code_in_a_weights_file_is_refused(dino_net: dinov2.DinoVisionTransformer, tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    torch.save({"net": torch.nn.Linear(2, 2)}, path)  # a pickled module, not plain tensors
    with pytest.raises(ckpt.CheckpointError, match=r"model.pth: refused"):
        vision.load_weights("dinov2-small", dino_net, path, dinov2.VITS14.weights_url)


def test_failed_download_says_so_in_one_line_and_names_the_flag(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def offline(url: str, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(SystemExit) as info:
        main(["export", "vision", "--source", "wide_resnet50", "--out", str(tmp_path / "b")])
    msg = str(info.value)
    assert "\n" not in msg
    assert f"cannot download {wrn.WEIGHTS_URL} (URLError" in msg and "pass --weights FILE" in msg


# --- arguments -----------------------------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    export_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["export", "vision", "--out", "b", *argv])


def test_cli_offers_every_source_of_the_table() -> None:
    assert tuple(vision.SOURCES) == export_cli.VISION_SOURCES
    assert _args().source == "efficientnet-lite0"  # the offline default stays the default


@pytest.mark.parametrize(
    ("source", "size", "metric"),
    [("efficientnet-lite0", 256, "cosine"), ("wide_resnet50", 224, "l2"), ("dinov2-small", 448, "cosine"),
     ("dinov2-base", 448, "cosine"), ("anomalygpt", 224, "cosine")],
)  # fmt: skip
def test_each_source_defaults_to_its_published_input_size_and_metric(source: str, size: int, metric: str) -> None:
    args = _args("--source", source, "--random-weights") if source != "efficientnet-lite0" else _args()
    vision.validate(args)
    assert (args.image_size, args.metric) == (size, metric)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--weights", "w.pth"], r"efficientnet-lite0: --weights does not apply \(only to wide_resnet50, dinov2"),
        (["--source", "dinov2-small", "--taps", "4"], r"--taps does not apply \(only to efficientnet-lite0\)"),
        (["--source", "wide_resnet50", "--imagebind", "i.pth"], r"--imagebind does not apply"),
        (["--source", "dinov2-base", "--image-size", "224"], None),
        (["--source", "dinov2-small", "--image-size", "440"], r"multiple of 14 and at least 28, got 440"),
        (["--source", "wide_resnet50", "--image-size", "200"], r"multiple of 16 and at least 32, got 200"),
        (["--source", "anomalygpt", "--random-weights", "--image-size", "448"], r"fixed at 224"),
        (["--source", "wide_resnet50", "--weights", "nowhere.pth"], r"--weights: nowhere.pth is not a file"),
        (["--source", "wide_resnet50", "--random-weights", "--weights", "x"], r"exclude each other"),
    ],
)
def test_arguments_are_checked_against_the_source_before_anything_runs(argv: list[str], message: str | None) -> None:
    args = _args(*argv)
    if message is None:
        assert vision.validate(args).name == args.source
        return
    with pytest.raises(SystemExit, match=message):
        vision.validate(args)
