"""``lorakit train | eval | generate | chat | merge``: fine-tune, measure and use adapters.

``train``'s flags are generated from :class:`lorakit.train_config.TrainConfig`, so the YAML keys, the
flags and their defaults in ``--help`` cannot drift apart.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

from ..errors import LoraError
from .common import (
    adapter_folders,
    check_data_file,
    check_empty_output,
    check_model_spec,
    generation_settings,
    load_adapters,
    model_name,
    read_message,
    set_threads,
    status,
)

# --- train ----------------------------------------------------------------------------------------


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training.config import iter_config_help

    parser.add_argument(
        "config", nargs="?", default=None, help="YAML file with the same keys; flags override it"
    )
    for name, default, help_text in iter_config_help():
        flag = "--" + name.replace("_", "-")
        # SUPPRESS: only flags given on the command line reach the config, over the YAML file.
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": name}
        shown = ",".join(default) if isinstance(default, list) else default
        kwargs["help"] = f"{help_text} (default: {shown})".replace("%", "%%")
        flags = [flag]
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            # Comma-separated and repeatable: --task a=x.jsonl --task b=y.jsonl.
            kwargs["type"] = lambda s: [t.strip() for t in s.split(",") if t.strip()]
            kwargs["action"] = "extend"
            flags.append(flag.removesuffix("s"))
        elif isinstance(default, (int, float)):
            kwargs["type"] = type(default)
        parser.add_argument(*flags, **kwargs)
    parser.add_argument(
        "--demo",
        choices=["vlm"],
        default=None,
        help="vlm: the vision-language demo (a SmolVLM-shaped model assembled from the bundled "
        "SmolLM2 learns to name coloured shapes); without it and --data, the text demo",
    )
    parser.add_argument(
        "--nproc",
        type=_process_count,
        default=1,
        help="processes (GPUs) on this machine: launches torchrun --nproc-per-node N for you; "
        "for several machines run torchrun -m lorakit train yourself (see docs/distributed.md)",
    )


def _process_count(text: str) -> int:
    """``--nproc``: a whole number of processes, at least 1."""
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of processes, 1 or more: {text}")
    return count


def _flags(overrides: dict[str, Any]) -> list[str]:
    """Command-line flags that give ``overrides`` back (for relaunching under torchrun)."""
    flags = []
    for name, value in overrides.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            flags += [flag, ",".join(value)]
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def _launch(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """Run this same ``lorakit train`` in ``args.nproc`` processes under torchrun."""
    import subprocess
    import sys

    if "WORLD_SIZE" in os.environ:
        raise LoraError(
            "--nproc given inside a torchrun launch; drop --nproc (torchrun sets the processes)."
        )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", str(args.nproc), "-m", "lorakit", "train"]
    command += ([args.config] if args.config else []) + _flags(overrides)
    command += ["--debug"] if getattr(args, "debug", False) else []  # each process shows its own
    return subprocess.run(command, check=False).returncode


def run_train(args: argparse.Namespace) -> int:
    """Fine-tune a LoRA adapter (no arguments: the bundled model on the bundled demo task).

    Under torchrun (or with --nproc N) it trains data-parallel: DDP, or FSDP2 with --fsdp.
    --resume OUTPUT alone continues that run with its own settings.

    Prints the settings, a progress bar and, at the end, a before/after table; writes the
    adapter, generation_settings.json (system prompt, chat template), metrics.jsonl, loss.png,
    train_config.yaml and checkpoints to --output.
    """
    from ..training.config import config_fields, resolve_config
    from ..training.loop import check_inputs, train

    overrides = {f.name: getattr(args, f.name) for f in config_fields() if hasattr(args, f.name)}
    if args.demo == "vlm":
        from ..vlm.demo import demo_config

        config = demo_config(args.config, overrides)
    else:
        config = resolve_config(args.config, overrides)  # bad settings fail here, before launching
    from ..vlm.cli import wants_vlm

    if wants_vlm(config):  # a VLM folder, or image data: lorakit.vlm's set-up, the same loop
        from ..vlm.train import train_vlm

        if args.nproc > 1:
            raise LoraError("--nproc with a vision-language model is not implemented yet.")
        set_threads()
        result = train_vlm(config)
        print(f"done: {result.steps} steps, adapter in {result.output}")
        return 0
    if args.nproc > 1:
        check_inputs(config)  # every process would find the same problem, after a model load
        return _launch(args, overrides)
    set_threads()
    result = train(config)
    if "RANK" not in os.environ or os.environ["RANK"] == "0":
        print(f"done: {result.steps} steps, adapter in {result.output}")
    return 0


# --- shared by eval, generate, chat, merge --------------------------------------------------------


def _model_arguments(parser: argparse.ArgumentParser, adapter_required: bool = False) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="base model: HF folder, .gguf file or smollm2-135m (default: the adapter's base, "
        "else smollm2-135m)",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        required=adapter_required,
        default=None,
        metavar="[NAME=]DIR",
        help="adapter folder (PEFT format); repeat as NAME=DIR to load several",
    )
    parser.add_argument(
        "--use",
        default=None,
        help="comma-separated adapter names to activate (several add up; default: the last loaded)",
    )
    _precision_arguments(parser)


def _precision_arguments(parser: argparse.ArgumentParser) -> None:
    """``--dtype``, ``--quantize`` and ``--trust-remote-code``: how the base model loads."""
    from ..models.precision import DTYPE_CHOICES, QUANTIZATIONS

    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="base weights' dtype (auto: float32 on the CPU); adapters stay float32",
    )
    parser.add_argument(
        "--quantize",
        default=None,
        choices=QUANTIZATIONS,
        help="load the base quantized by bitsandbytes: nf4 (4-bit) or int8 (merge: as the "
        "run recorded)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the Python code a model folder ships (auto_map); without it it is refused",
    )


def _prompt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--system",
        default=None,
        help="system message for conversations without one (default: the one saved with the "
        "adapter by lorakit train; '' for none)",
    )
    parser.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="Jinja chat template file (default: the one saved with the adapter, else the model's)",
    )


def _load(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The base model (given, or the first adapter's) with the adapters, if any, loaded, its
    tokenizer (with the chat template in use) and the generation settings.

    ``--model`` may be a ``lorakit train`` output folder: its base model and its adapter load.
    Everything cheap (folders, the model spec, settings files) is checked before the load.
    """
    from ..adapters import set_adapter
    from ..models.load import DEFAULT_MODEL, load_model

    adapters = adapter_folders(args)
    spec = args.model or next(iter(adapters.values()), None) or DEFAULT_MODEL
    check_model_spec(spec, "--model" if args.model else "the adapter's base model")
    settings = generation_settings(args, adapters)
    set_threads()
    model, tokenizer = load_model(
        spec, args.dtype, args.quantize, trust_remote_code=args.trust_remote_code
    )
    load_adapters(model, adapters, model_name(model, spec))
    if args.use:
        set_adapter(model, [n.strip() for n in args.use.split(",")])
    settings.apply_template(tokenizer)
    return model.eval(), tokenizer, settings


def _vlm_base(args: argparse.Namespace) -> str | None:
    """The vision-language model folder the command is for, if it is one (lorakit.vlm.cli)."""
    from ..vlm.cli import base_spec

    spec = base_spec(args)
    if spec is None and getattr(args, "image", None):
        raise LoraError("--image needs a vision-language model (--model VLM_FOLDER).")
    return spec


# --- eval -----------------------------------------------------------------------------------------


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    from ..data import FORMATS

    _model_arguments(parser)
    _prompt_arguments(parser)
    parser.add_argument("--data", required=True, help="JSON/JSONL data file")
    parser.add_argument("--format", default=None, choices=FORMATS, help="data format (auto)")
    parser.add_argument("--seq-len", type=int, default=512, help="cut sequences to this length")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    parser.add_argument(
        "--skip-bad-records",
        action="store_true",
        help="skip malformed records (counted and reported) instead of stopping at one",
    )


def run_eval(args: argparse.Namespace) -> int:
    """Loss and perplexity on a data file, plus exact match for chat/alpaca/sharegpt records.

    Conversations without a system message get the adapter's saved one (or --system), as in
    training.
    """
    vlm = _vlm_base(args)
    if vlm is not None:
        from ..vlm import cli

        return cli.run_eval(args, vlm)
    from collections import Counter

    from ..data import encode_examples, skip_report
    from ..generate import exact_match_score, split_references
    from ..training.step import evaluate_loss

    data = check_data_file(args.data, args.format, skip_bad_records=args.skip_bad_records)
    examples = data.examples
    chats = not isinstance(examples[0], str)
    if chats:
        split_references(examples)  # every record needs the reply to compare with
    model, tokenizer, settings = _load(args)
    examples = [settings.messages(e) if chats else e for e in examples]
    dataset = encode_examples(
        examples,
        tokenizer,
        args.seq_len,
        sources=data.sources,
        skip_bad_records=args.skip_bad_records,
    )
    refused = set(dataset.refused)  # by the chat template: no reply to generate from either
    examples = [e for i, e in enumerate(examples) if i not in refused]
    skipped = skip_report(data.skipped + Counter(dataset.skipped), data.records, args.data)
    if skipped:
        status(skipped)
    loss = evaluate_loss(model, dataset, args.batch_size, tokenizer.pad_token_id, "loss")
    print(f"examples:    {len(examples)}")
    print(f"loss:        {loss:.4f}")
    print(f"perplexity:  {math.exp(min(loss, 50)):.3f}")
    if chats:
        label = f"exact match ({len(examples)} greedy replies)"
        score = exact_match_score(model, tokenizer, examples, progress=label)
        print(f"exact match: {score:.1%}")
    return 0


# --- generate and chat ----------------------------------------------------------------------------


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser)
    parser.add_argument("prompt", nargs="+", help="the user message (words are joined)")
    parser.add_argument(
        "--image",
        action="append",
        default=None,
        metavar="FILE",
        help="an image for a vision-language model (repeatable; each is an <image> before the "
        "prompt unless the prompt places them)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest reply")
    _prompt_arguments(parser)


def run_generate(args: argparse.Namespace) -> int:
    """Reply to one prompt with the chat template, streaming tokens as they come.

    The system prompt and chat template saved with the adapter by lorakit train are used
    unless --system / --chat-template say otherwise.
    """
    vlm = _vlm_base(args)
    if vlm is not None:
        from ..vlm import cli

        return cli.run_generate(args, vlm)
    from ..generate import stream_reply

    model, tokenizer, settings = _load(args)
    messages = settings.messages([{"role": "user", "content": " ".join(args.prompt)}])
    stream_reply(model, tokenizer, messages, args.max_new_tokens)
    return 0


def _chat_arguments(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest reply")
    _prompt_arguments(parser)


def run_chat(args: argparse.Namespace) -> int:
    """Chat in the terminal (streamed replies); an empty line or Ctrl-D ends it.

    The system prompt and chat template saved with the adapter are used unless overridden.
    """
    vlm = _vlm_base(args)
    if vlm is not None:
        from ..vlm import cli

        return cli.run_chat(args, vlm)
    from ..generate import stream_reply

    model, tokenizer, settings = _load(args)
    messages = settings.messages([])
    while (text := read_message()) is not None:
        messages.append({"role": "user", "content": text})
        reply = stream_reply(model, tokenizer, messages, args.max_new_tokens)
        messages.append({"role": "assistant", "content": reply})
    return 0


# --- merge ----------------------------------------------------------------------------------------


def _merge_arguments(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser, adapter_required=True)
    parser.add_argument("--output", required=True, help="folder for the merged model")
    parser.add_argument(
        "--base-weights",
        default=None,
        metavar="MODEL",
        help="after a quantized run: merge into MODEL's float weights (W + dW) instead of the "
        "dequantized base (dequant(W) + dW)",
    )


def _recorded_quantization(adapters: dict[str, str]) -> str | None:
    """The ``quantize`` a ``lorakit train`` run recorded beside its adapter, if any."""
    import yaml

    from ..training.config import CONFIG_FILE

    for folder in adapters.values():
        for config in (Path(folder) / CONFIG_FILE, Path(folder).parent / CONFIG_FILE):
            try:
                recorded = yaml.safe_load(config.read_text())
            except (OSError, yaml.YAMLError):
                continue  # no run settings here (a PEFT adapter): nothing recorded
            if isinstance(recorded, dict) and recorded.get("quantize"):
                return str(recorded["quantize"])
    return None


def run_merge(args: argparse.Namespace) -> int:
    """Fold an adapter into its base model and save a plain Hugging Face model folder.

    The folder (safetensors, config, tokenizer) loads with
    transformers.AutoModelForCausalLM.from_pretrained, without lorakit. The adapter's chat
    template goes into the tokenizer, and its generation_settings.json is copied along.

    After a quantized run (--quantize recorded in its train_config.yaml, or a quantized base
    folder) the base loads quantized as in training and the folder holds float weights
    dequant(W) + dW, never re-quantized; --base-weights MODEL merges into MODEL's float
    weights instead (W + dW).
    """
    vlm = _vlm_base(args)
    if vlm is not None:
        from ..vlm import cli

        return cli.run_merge(args, vlm)
    from ..layers.quantized import is_quantized
    from ..merge import dequantize_merge
    from ..models.load import save_model_folder
    from ..models.precision import resolve_dtype

    args.system = args.chat_template = None
    out = check_empty_output(args.output)  # before the slow part
    if args.base_weights and args.quantize:
        raise LoraError("--base-weights merges into float weights; drop --quantize.")
    if args.base_weights:
        args.model = args.base_weights
    else:
        args.quantize = args.quantize or _recorded_quantization(adapter_folders(args))
    model, tokenizer, settings = _load(args)
    quantized = is_quantized(model)
    dequantize_merge(model, resolve_dtype(args.dtype))  # a float base: a plain merge
    model.config.use_cache = True
    kept = settings if settings.system or settings.chat_template else None
    save_model_folder(model, tokenizer, out, kept)
    if quantized:
        status(
            "note: the base was quantized, so the merged weights are the dequantized base "
            "plus the adapter (dequant(W) + dW), not the original float weights; pass "
            "--base-weights MODEL to merge into those instead."
        )
    elif args.base_weights:
        status(f"merged into the float weights of {args.base_weights} (W + dW)")
    print(f"merged model written to {out}")
    return 0


COMMANDS = {
    "train": (_train_arguments, run_train),
    "eval": (_eval_arguments, run_eval),
    "generate": (_generate_arguments, run_generate),
    "chat": (_chat_arguments, run_chat),
    "merge": (_merge_arguments, run_merge),
}
