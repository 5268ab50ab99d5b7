"""Loaders for the checkpoints AnomalyGPT users download, with strict key accounting.

* ``imagebind_huge.pth`` — the full multimodal ImageBind state dict. The vision branch is loaded
  (and the text tower, when text features are computed); every other modality's keys (audio,
  depth, thermal, IMU, and text when unused) are *expected and ignored* by name prefix.
* AnomalyGPT ``pytorch_model.pt`` (train_mvtec / train_visa / train_supervised) — exactly
  ``image_decoder.fc.{0..3}.{weight,bias}``, ``prompt_learner.meta_net.{0,3,6,9,12,15}.{weight,bias}``
  and ``prompt_learner.base_prompts``.
* PandaGPT delta ``pytorch_model.pt`` — ``llama_proj.{weight,bias}`` for the encoder, and the LLM's
  LoRA A/B matrices (q/k/v/o_proj of every layer), which are checked to be complete and counted
  for the LLM export rather than silently skipped.

The original code loads the last two with ``strict=False`` and silently skips mismatches; here any
missing, unexpected or mis-shaped key is listed in one error naming the file. Files are read with
``torch.load(..., weights_only=True)`` only (no arbitrary pickle code runs), or as ``.safetensors``.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from anomalygpt_edge.export.anomalygpt_models import (
    ImageBindVision,
    PromptLearner,
    TextMatchingDecoder,
)
from anomalygpt_edge.export.anomalygpt_text import (
    ImageBindText,
)

StateDict = dict[str, torch.Tensor]
#: Checkpoint key -> (module, dotted name of the parameter or buffer in it) that the key loads into.
KeyMap = dict[str, tuple[torch.nn.Module, str]]


class CheckpointError(ValueError):
    """A checkpoint cannot be read safely, or its keys/shapes do not match the architecture."""


@dataclass
class LoadReport:
    """What a loader did with a file: keys loaded, keys expected-and-ignored (by group), extras."""

    path: str
    loaded: int = 0
    ignored: dict[str, int] = field(default_factory=dict)
    info: dict[str, object] = field(default_factory=dict)


def read_state_dict(path: str | Path) -> StateDict:
    """Read a flat ``{name: tensor}`` dict from ``.safetensors`` or a ``torch.save`` file.

    ``torch.load`` runs with ``weights_only=True``: a file that needs arbitrary pickle code (a
    pickled module or custom class) is refused with a :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from exc
    try:
        try:
            # Memory-map the tensors: imagebind_huge.pth is 4.5 GB, and the model copies what it uses.
            data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            data = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) file
    except pickle.UnpicklingError as exc:
        # torch's message is long; keep the line that says what the unpickler met.
        detail = next((ln.strip() for ln in str(exc).splitlines() if "Unsupported" in ln), "")
        if "Unsupported global" in str(exc):
            raise CheckpointError(
                f"{path}: refused: loading it would run pickled code other than plain tensors "
                f"({detail or 'weights_only=True failed'}). Convert it to a plain state dict or .safetensors "
                f"in a trusted environment."
            ) from exc
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({detail or exc})") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {exc}") from exc
    # Some training scripts wrap the state dict; accept the common single-key wrappers.
    if isinstance(data, Mapping) and len(data) == 1 and next(iter(data)) in ("state_dict", "model", "module"):
        data = next(iter(data.values()))
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), got {type(data).__name__}")
    bad = [k for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not named tensors: {_clip(bad)}")
    return dict(data)


def _clip(keys: list, limit: int = 12) -> str:
    keys = sorted(str(k) for k in keys)
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ... (' + str(len(keys) - limit) + ' more)' if len(keys) > limit else ''}]"


def _assign(
    path: str | Path,
    state: StateDict,
    mapping: KeyMap,
    ignored_prefixes: dict[str, tuple[str, ...]] | None = None,
    accounted: set[str] | None = None,
) -> LoadReport:
    """Copy ``state[key]`` into ``module.<name>`` for every ``key -> (module, name)`` in ``mapping``.

    Keys of ``state`` not in ``mapping`` must start with one of ``ignored_prefixes`` (counted per
    group) or be in ``accounted`` (handled by the caller); anything else is unexpected. Missing,
    unexpected and mis-shaped keys are all listed in one :class:`CheckpointError`.
    """
    ignored_prefixes = ignored_prefixes or {}
    accounted = accounted or set()
    missing = [k for k in mapping if k not in state]
    report = LoadReport(str(path))
    unexpected = []
    for key in state:
        if key in mapping or key in accounted:
            continue
        group = next((g for g, prefixes in ignored_prefixes.items() if key.startswith(prefixes)), None)
        if group is None:
            unexpected.append(key)
        else:
            report.ignored[group] = report.ignored.get(group, 0) + 1
    targets: dict[str, torch.Tensor] = {}
    shapes = []
    for key, (module, name) in mapping.items():
        if key not in state:
            continue
        target: torch.Tensor
        try:
            target = module.get_parameter(name)
        except AttributeError:
            target = module.get_buffer(name)
        targets[key] = target
        if tuple(state[key].shape) != tuple(target.shape):
            shapes.append(f"{key}: file {tuple(state[key].shape)}, model {tuple(target.shape)}")
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_clip(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_clip(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches {_clip(shapes)}")
        raise CheckpointError(f"{path}: does not match the architecture: " + "; ".join(parts))
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(state[key].to(target.dtype))
    report.loaded = len(targets)
    return report


# --- imagebind_huge.pth ----------------------------------------------------------------------------

#: Modalities of imagebind_huge.pth that the vision export never uses: expected and ignored.
OTHER_MODALITIES = ("audio", "depth", "thermal", "imu")
_STAGES = ("modality_preprocessors", "modality_trunks", "modality_heads", "modality_postprocessors")


def _modality_prefixes(modality: str) -> tuple[str, ...]:
    return tuple(f"{stage}.{modality}." for stage in _STAGES)


def imagebind_vision_keys(vision: ImageBindVision) -> KeyMap:
    """``imagebind_huge.pth`` key -> (module, parameter) for the vision branch.

    Names in ImageBind: ``modality_preprocessors.vision.rgbt_stem.proj.1`` is the Conv3d after
    ``PadIm2Video`` (index 0), ``pre_transformer_layer.0`` the pre-trunk LayerNorm, head index 0
    the LayerNorm and 2 the Linear (1 is ``SelectElement``); the postprocessor has no parameters.
    """
    pre, trunk, head = "modality_preprocessors.vision", "modality_trunks.vision", "modality_heads.vision"
    keys: KeyMap = {
        f"{pre}.rgbt_stem.proj.1.weight": (vision, "stem.weight"),
        f"{pre}.cls_token": (vision, "cls_token"),
        f"{pre}.pos_embedding_helper.pos_embed": (vision, "pos_embed"),
        f"{trunk}.pre_transformer_layer.0.weight": (vision, "pre_norm.weight"),
        f"{trunk}.pre_transformer_layer.0.bias": (vision, "pre_norm.bias"),
        f"{head}.0.weight": (vision, "head_norm.weight"),
        f"{head}.0.bias": (vision, "head_norm.bias"),
        f"{head}.2.weight": (vision, "head_proj.weight"),
    }
    for i, block in enumerate(vision.blocks):
        for name, _ in block.named_parameters():
            keys[f"{trunk}.blocks.{i}.{name}"] = (vision, f"blocks.{i}.{name}")
    return keys


def imagebind_text_keys(text: ImageBindText) -> KeyMap:
    """``imagebind_huge.pth`` key -> (module, parameter) for the text tower (text features only)."""
    pre, trunk, head = "modality_preprocessors.text", "modality_trunks.text", "modality_heads.text"
    keys: KeyMap = {
        f"{pre}.token_embedding.weight": (text, "token_embedding.weight"),
        f"{pre}.pos_embed": (text, "pos_embed"),
        f"{head}.proj.0.weight": (text, "head_norm.weight"),
        f"{head}.proj.0.bias": (text, "head_norm.bias"),
        f"{head}.proj.1.weight": (text, "head_proj.weight"),
    }
    for i, block in enumerate(text.blocks):
        for name, _ in block.named_parameters():
            keys[f"{trunk}.blocks.{i}.{name}"] = (text, f"blocks.{i}.{name}")
    return keys


#: Text-tower keys that carry no information the tower needs: the causal mask (rebuilt from the
#: context length) and the learnable logit scale (cancelled by AnomalyGPT's re-normalisation).
TEXT_CONSTANT_KEYS = ("modality_preprocessors.text.mask", "modality_postprocessors.text.1.log_logit_scale")


def load_imagebind(
    path: str | Path,
    vision: ImageBindVision,
    text: ImageBindText | None = None,
    state: StateDict | None = None,
) -> LoadReport:
    """Load the vision branch (and, if given, the text tower) from ``imagebind_huge.pth``.

    Keys of the audio, depth, thermal and IMU branches are expected and ignored; so is the text
    tower when ``text`` is None. Anything else missing or extra is an error.
    """
    state = read_state_dict(path) if state is None else state
    mapping = imagebind_vision_keys(vision)
    ignored = {m: _modality_prefixes(m) for m in OTHER_MODALITIES}
    accounted: set[str] = set()
    if text is None:
        ignored["text"] = _modality_prefixes("text")
    else:
        mapping.update(imagebind_text_keys(text))
        accounted.update(k for k in TEXT_CONSTANT_KEYS if k in state)
    report = _assign(path, state, mapping, ignored, accounted)
    report.info["text_tower"] = text is not None
    return report


# --- AnomalyGPT pytorch_model.pt -------------------------------------------------------------------


def anomalygpt_keys(decoder: TextMatchingDecoder, prompt_learner: PromptLearner) -> KeyMap:
    """AnomalyGPT checkpoint key -> (module, parameter): ``image_decoder.*`` and ``prompt_learner.*``."""
    keys: KeyMap = {f"image_decoder.{n}": (decoder, n) for n, _ in decoder.named_parameters()}
    keys.update({f"prompt_learner.{n}": (prompt_learner, n) for n, _ in prompt_learner.named_parameters()})
    return keys


def load_anomalygpt(
    path: str | Path,
    decoder: TextMatchingDecoder,
    prompt_learner: PromptLearner,
    state: StateDict | None = None,
) -> LoadReport:
    """Load the decoder and prompt learner from an AnomalyGPT ``pytorch_model.pt``, strictly."""
    state = read_state_dict(path) if state is None else state
    return _assign(path, state, anomalygpt_keys(decoder, prompt_learner))


# --- PandaGPT delta pytorch_model.pt ---------------------------------------------------------------

#: LoRA matrices of the LLM as PEFT names them (with or without the ``.default`` adapter name).
LORA_KEY = re.compile(
    r"^llama_model\.base_model\.model\.model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.lora_([AB])(?:\.default)?\.weight$"
)


def load_pandagpt_delta(path: str | Path, llama_proj: torch.nn.Linear, state: StateDict | None = None) -> LoadReport:
    """Load ``llama_proj`` from the PandaGPT delta and account for its LoRA keys.

    The LoRA A/B matrices belong to the LLM (merged there as W <- W + B·A); here they are checked
    to be complete (A and B for q/k/v/o_proj of every layer, one rank) and reported, never
    silently skipped. Any other key is unexpected.
    """
    state = read_state_dict(path) if state is None else state
    mapping: KeyMap = {"llama_proj.weight": (llama_proj, "weight"), "llama_proj.bias": (llama_proj, "bias")}
    lora: dict[tuple[int, str, str], torch.Tensor] = {}
    for key, value in state.items():
        m = LORA_KEY.match(key)
        if m:
            lora[(int(m.group(1)), m.group(2), m.group(3))] = value
    report = _assign(path, state, mapping, accounted={k for k in state if LORA_KEY.match(k)})
    if lora:
        layers = sorted({layer for layer, _, _ in lora})
        incomplete = [
            f"layer {layer} {proj}_proj lora_{ab}"
            for layer in range(max(layers) + 1)
            for proj in "qkvo"
            for ab in "AB"
            if (layer, proj, ab) not in lora
        ]
        ranks = {v.shape[0] for (_, _, ab), v in lora.items() if ab == "A"}
        ranks |= {v.shape[1] for (_, _, ab), v in lora.items() if ab == "B"}
        if incomplete or len(ranks) != 1:
            raise CheckpointError(
                f"{path}: incomplete LoRA delta: missing {_clip(incomplete)}; ranks found {sorted(ranks)}"
            )
        report.info.update({"lora_tensors": len(lora), "lora_layers": len(layers), "lora_rank": ranks.pop()})
        report.info["lora_parameters"] = int(sum(v.numel() for v in lora.values()))
    else:
        report.info["lora_tensors"] = 0
    return report


# --- writing checkpoints in the real layouts (tests and the full-size check) ------------------------


def imagebind_state_dict(vision: ImageBindVision, text: ImageBindText | None = None) -> StateDict:
    """The vision (and text) tensors of ``vision``/``text`` under their ``imagebind_huge.pth`` names."""
    out = {k: m.get_parameter(n).detach().clone() for k, (m, n) in imagebind_vision_keys(vision).items()}
    if text is not None:
        out.update({k: m.get_parameter(n).detach().clone() for k, (m, n) in imagebind_text_keys(text).items()})
        out["modality_preprocessors.text.mask"] = text.mask.clone()
        out["modality_postprocessors.text.1.log_logit_scale"] = torch.tensor(4.6052)
    return out


def anomalygpt_state_dict(decoder: TextMatchingDecoder, prompt_learner: PromptLearner) -> StateDict:
    """Decoder and prompt-learner tensors under their AnomalyGPT checkpoint names."""
    return {k: m.get_parameter(n).detach().clone() for k, (m, n) in anomalygpt_keys(decoder, prompt_learner).items()}


def lora_key(layer: int, proj: str, ab: str) -> str:
    """The PEFT key of one LoRA matrix in the PandaGPT delta."""
    return f"llama_model.base_model.model.model.layers.{layer}.self_attn.{proj}_proj.lora_{ab}.default.weight"
