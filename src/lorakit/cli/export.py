"""``lorakit export``: an adapter for llama.cpp (GGUF) or vLLM."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import LoraError


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "adapter", metavar="ADAPTER", help="adapter folder (lorakit train --output)"
    )
    parser.add_argument("--to", required=True, choices=["gguf", "vllm"], help="target runtime")
    parser.add_argument(
        "--output", required=True, help="GGUF file (--to gguf) or folder (--to vllm)"
    )
    parser.add_argument(
        "--merged",
        action="store_true",
        help="gguf: write the whole model with the adapter merged, not an adapter file",
    )
    parser.add_argument(
        "--outtype",
        choices=["f32", "f16", "bf16", "q8_0"],
        help="gguf tensor type (default: f32 for an adapter, f16 merged)",
    )
    parser.add_argument("--model", help="base model (default: the one the adapter records)")
    parser.add_argument(
        "--gguf-metadata",
        metavar="FILE",
        help="--merged: GGUF of the base giving tokenizer and hyperparameters "
        "(default: the GGUF the base loads from)",
    )
    parser.add_argument(
        "--max-lora-rank",
        type=int,
        default=16,
        help="vllm: the --max-lora-rank vLLM will be started with",
    )
    parser.add_argument(
        "--check", action="store_true", help="vllm: report the rules only, write nothing"
    )


def _check_args(args: argparse.Namespace) -> None:
    """Flag combinations and paths, checked before any model loads."""
    if not (Path(args.adapter) / "adapter_config.json").is_file():
        raise LoraError(
            f"ADAPTER {args.adapter}: not an adapter folder (no adapter_config.json). Pass "
            "the --output folder of lorakit train, a checkpoint folder or a PEFT adapter."
        )
    if args.to == "vllm" and (args.merged or args.outtype or args.gguf_metadata):
        raise LoraError(
            "--merged, --outtype and --gguf-metadata are for --to gguf; for vLLM serve the "
            "adapter folder this writes, or a merged folder (lorakit merge)."
        )
    if args.to == "gguf" and args.gguf_metadata and not args.merged:
        raise LoraError("--gguf-metadata is for --merged (a whole model); add --merged.")
    if args.gguf_metadata and not Path(args.gguf_metadata).is_file():
        raise LoraError(f"--gguf-metadata {args.gguf_metadata}: no such file.")


def run_export(args: argparse.Namespace) -> int:
    """Export an adapter for llama.cpp (a LoRA GGUF, or the merged model) or vLLM.

    --to gguf: a llama.cpp adapter (llama-cli -m BASE.gguf --lora OUT.gguf; Ollama: ADAPTER).
    --to gguf --merged: the whole merged model as GGUF (llama-cli -m OUT.gguf).
    --to vllm: checks vLLM's LoRA loader rules, then writes a folder for --lora-modules.
    """
    from ..export.folder import load_for_export

    _check_args(args)
    print(f"loading {args.adapter} and its base model", file=sys.stderr, flush=True)
    model = load_for_export(args.adapter, args.model, allow_extra_rows=args.merged)
    if args.to == "vllm":
        return _vllm(model, args)
    if args.merged:
        from ..export.gguf_model import to_gguf_model

        out = to_gguf_model(
            model,
            args.output,
            outtype=args.outtype or "f16",
            source=args.gguf_metadata,
            in_place=True,
        )
        print(f"merged model written to {out} (llama-cli -m {out})")
        return 0
    from ..export.gguf_adapter import to_gguf

    out = to_gguf(model, args.output, outtype=args.outtype or "f32", metadata_dir=args.adapter)
    print(f"llama.cpp adapter written to {out} (llama-cli -m BASE.gguf --lora {out})")
    return 0


def _vllm(model, args: argparse.Namespace) -> int:
    from ..export.vllm import check_vllm, to_vllm

    report = check_vllm(model, max_lora_rank=args.max_lora_rank)
    print(report)
    if args.check:
        return 0 if report.ok else 1
    to_vllm(model, args.output, max_lora_rank=args.max_lora_rank)
    print(
        f"vLLM adapter written to {args.output} (vllm serve BASE --enable-lora "
        f"--lora-modules mine={args.output} --max-lora-rank {args.max_lora_rank})"
    )
    return 0


COMMANDS = {"export": (add_export_arguments, run_export)}
