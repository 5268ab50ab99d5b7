"""``anomalygpt-edge export llm``: arguments only (no torch here); the work is in ``llm_gguf``."""

from __future__ import annotations

import argparse
from pathlib import Path

QUANT_TYPES = ("q4_k_m", "q8_0")


def add_export_target(targets: argparse._SubParsersAction) -> None:
    """Register the ``llm`` export target."""
    p = targets.add_parser(
        "llm",
        help="Vicuna-7B (HF LLaMA layout) + PandaGPT LoRA delta -> GGUF f16 + quantised GGUFs",
        description=(
            "Merge the PandaGPT LoRA delta into a Hugging Face LLaMA checkpoint (W <- W + alpha/r * B A on "
            "q/k/v/o), write a GGUF f16 file with tokenizer, special tokens and AnomalyGPT's conversation "
            "template as metadata, then quantise it with llama.cpp."
        ),
    )
    p.add_argument(
        "--base",
        type=Path,
        required=True,
        help="HF LLaMA folder: config.json, tokenizer.model, *.safetensors or pytorch_model*.bin",
    )
    lora = p.add_mutually_exclusive_group(required=True)
    lora.add_argument("--lora", type=Path, help="PandaGPT delta (pytorch_model.pt or .safetensors) with lora_A/lora_B")
    lora.add_argument("--no-lora", action="store_true", help="export the base model as is (not AnomalyGPT's LLM)")
    p.add_argument("--lora-r", type=int, default=32, help="LoRA rank (PandaGPT: 32)")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (PandaGPT: 32, so scale 1.0)")
    p.add_argument("--out", type=Path, required=True, help="folder for the GGUF files and llm.json")
    p.add_argument("--name", default="anomalygpt-vicuna-7b", help="file name stem")
    p.add_argument(
        "--quant",
        nargs="*",
        choices=QUANT_TYPES,
        default=list(QUANT_TYPES),
        help="quantised variants to write (default: q4_k_m q8_0; none: f16 only)",
    )
    p.add_argument("--threads", type=int, default=0, help="quantisation threads (0: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.set_defaults(handler="anomalygpt_edge.export.llm_gguf:run")
