"""``lorakit eval | generate | chat | merge``: measure and use adapters.

One code path for text and vision-language models: each command chooses its road once
(:func:`lorakit.vlm.modality.choose_modality`) and the road loads the model and its codec.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.images import IMAGE
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


@dataclass(frozen=True)
class _Loaded:
    """What eval, generate, chat and merge run on: the model with its adapters, the codec,
    the generation settings in use and the road (text or images)."""

    model: Any
    codec: Any
    settings: Any
    modality: Any


@dataclass(frozen=True)
class _Road:
    """What a command loads: the model spec as given and as resolved (the name to show), the
    adapter folders by name, and the road (text or images)."""

    spec: str
    base: str
    adapters: dict[str, str]
    modality: Any


def _road(args: argparse.Namespace, spec: str | None = None) -> _Road:
    """The model spec, the adapter folders and the road, all checked before any load.

    ``spec`` overrides ``--model`` (merge's ``--base-weights``). ``--model`` may be a
    ``lorakit train`` output folder: its base model and its adapter load.
    """
    from ..models.load import DEFAULT_MODEL
    from ..vlm.modality import choose_modality

    adapters = adapter_folders(args)
    spec = spec or args.model or next(iter(adapters.values()), None) or DEFAULT_MODEL
    base = check_model_spec(spec, "--model" if args.model else "the adapter's base model")
    modality = choose_modality(spec, getattr(args, "data", None))
    modality.refuse(args)
    if getattr(args, "image", None) and not modality.images:
        raise LoraError("--image needs a vision-language model (--model VLM_FOLDER).")
    return _Road(spec, base, adapters, modality)


def _load(
    args: argparse.Namespace, spec: str | None = None, quantize: str | None = None
) -> _Loaded:
    """The base model (given, or the first adapter's) with the adapters, if any, loaded, its
    codec (with the chat template in use) and the generation settings.

    Everything cheap (folders, the model spec, the road, settings files) is checked before
    the load. ``spec`` and ``quantize`` override ``--model`` and ``--quantize``.
    """
    from ..adapters import set_adapter

    road = _road(args, spec)
    settings = generation_settings(args, road.adapters)
    set_threads()
    # Loading takes seconds (tens on a busy machine) before anything else shows: say what.
    folders = list(road.adapters.values())
    named = f" with the adapter{'s' * (len(folders) > 1)} {', '.join(folders)}" if folders else ""
    status(f"loading {road.base}{named}")
    model, processor = road.modality.load(
        road.spec, args.dtype, quantize or args.quantize, trust_remote_code=args.trust_remote_code
    )
    load_adapters(model, road.adapters, model_name(model, road.spec))
    if args.use:
        set_adapter(model, [n.strip() for n in args.use.split(",")])
    settings.apply_template(processor)
    return _Loaded(model.eval(), road.modality.codec(processor), settings, road.modality)


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
    """Loss and perplexity on a data file, plus exact match for conversations (with images
    on a vision-language model).

    Conversations without a system message get the adapter's saved one (or --system), as in
    training.
    """
    from collections import Counter

    from ..data import skip_report
    from ..generate import exact_match_score, split_references
    from ..training.step import evaluate_loss

    data = check_data_file(args.data, args.format, skip_bad_records=args.skip_bad_records)
    examples = data.examples
    chats = not isinstance(examples[0], str)
    if chats:
        split_references(examples)  # every record needs the reply to compare with
    loaded = _load(args)
    examples = [loaded.settings.messages(e) if chats else e for e in examples]
    dataset = loaded.codec.encode(
        examples, args.seq_len, sources=data.sources, skip_bad_records=args.skip_bad_records
    )
    refused = set(dataset.refused)  # by the chat template: no reply to generate from either
    examples = [e for i, e in enumerate(examples) if i not in refused]
    skipped = skip_report(data.skipped + Counter(dataset.skipped), data.records, args.data)
    if skipped:
        status(skipped)
    pad_id = loaded.codec.tokenizer.pad_token_id
    loss = evaluate_loss(loaded.model, dataset, args.batch_size, pad_id, "loss")
    dropped = f" ({dataset.dropped} dropped at --seq-len)" if dataset.dropped else ""
    print(f"examples:    {len(examples)}{dropped}")
    print(f"loss:        {loss:.4f}")
    print(f"perplexity:  {math.exp(min(loss, 50)):.3f}")
    if chats:
        label = f"exact match ({len(examples)} greedy replies)"
        score = exact_match_score(loaded.model, loaded.codec, examples, progress=label)
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
    unless --system / --chat-template say otherwise. Each ``--image`` (a vision-language
    model) is an ``<image>`` before the prompt unless the prompt places them.
    """
    from ..generate import stream_reply

    images = _check_images(args.image or [])
    loaded = _load(args)
    if loaded.modality.images and not images:
        status(_NO_IMAGE_WARNING.format(what="the prompt", fix="--image FILE"))
    text = " ".join(args.prompt)
    if images and IMAGE not in text:
        text = IMAGE * len(images) + text
    turn: dict[str, Any] = {"role": "user", "content": text}
    if images:
        turn["images"] = images
    stream_reply(loaded.model, loaded.codec, loaded.settings.messages([turn]), args.max_new_tokens)
    return 0


def _check_images(paths: list[str]) -> list[Path]:
    """``--image`` files, each checked to open as an image (as data records' images are)."""
    from ..data.images import check_image
    from ..data.records import BadRecord

    for path in paths:
        if not Path(path).is_file():
            raise LoraError(f"--image {path}: file not found.")
        try:
            check_image(Path(path), f"--image {path}", "--image")
        except BadRecord as bad:  # worded for a record; this is a flag
            raise LoraError(f"{bad.problem} Pass another image file.") from None
    return [Path(path) for path in paths]


def _chat_arguments(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest reply")
    _prompt_arguments(parser)


_QUIT = ("/quit", "/exit")
# What a vision-language model asked about no image answers from: the text alone.
_NO_IMAGE_WARNING = (
    "warning: this is a vision-language model and {what} has no image: it answers from the "
    "text alone and may describe a picture it never saw. Attach one with {fix}."
)
_NO_IMAGES = (
    "(not sent: /image needs a vision-language model, and {model} reads text only; "
    "pass --model VLM_FOLDER or --adapter of a VLM run to chat about images)"
)


def run_chat(args: argparse.Namespace) -> int:
    """Chat in the terminal (streamed replies); an empty line, /quit or Ctrl-D ends it.

    The system prompt and chat template saved with the adapter are used unless overridden.
    With a vision-language model, ``/image PATH`` attaches an image to the next message.
    """
    from ..generate import stream_reply

    loaded = _load(args)
    vlm = loaded.modality.images
    messages, pending = loaded.settings.messages([]), []
    images = "; /image PATH attaches an image to your next message" if vlm else ""
    print(f"(an empty line, /quit or Ctrl-D ends the chat{images})")
    while (text := read_message()) is not None and text not in _QUIT:
        if text.split(maxsplit=1)[0] == "/image":
            if vlm:
                pending += _chat_image(text.removeprefix("/image").strip())
            else:
                print(_NO_IMAGES.format(model=model_name(loaded.model, args.model or "")))
            continue
        if vlm and not pending and not any(m.get("images") for m in messages):
            status(_NO_IMAGE_WARNING.format(what="this message", fix="/image PATH"))
        turn: dict[str, Any] = {"role": "user", "content": IMAGE * len(pending) + text}
        if pending:
            turn["images"], pending = pending, []
        messages.append(turn)
        reply = stream_reply(loaded.model, loaded.codec, messages, args.max_new_tokens)
        messages.append({"role": "assistant", "content": reply})
    return 0


def _chat_image(path: str) -> list[Path]:
    """``/image PATH``'s image, checked; a bad path is printed and the chat goes on."""
    try:
        return _check_images([path])
    except LoraError as error:
        print(f"(not attached: {error})")
        return []


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
    """The ``quantize`` a ``lorakit train`` run recorded beside its adapter, if any.

    Raises:
        LoraError: the run's ``train_config.yaml`` is damaged (see ``read_run_config``).
    """
    from ..training.run_folder import read_run_config

    for folder in adapters.values():
        # The adapter's own folder (OUTPUT, a checkpoint), or OUTPUT for a task's OUTPUT/NAME.
        for run in (Path(folder), Path(folder).parent):
            # None: no run settings here (a PEFT adapter), so nothing recorded.
            recorded = read_run_config(run, required=False) or {}
            if recorded.get("quantize"):
                return str(recorded["quantize"])
    return None


def run_merge(args: argparse.Namespace) -> int:
    """Fold an adapter into its base model and save a plain Hugging Face model folder.

    The folder (safetensors, config, tokenizer or processor) loads with transformers'
    ``from_pretrained``, without lorakit, and answers as the adapter does: the adapter's chat
    template goes into the tokenizer, with the run's system prompt as the default of every
    conversation without one (so plain ``apply_chat_template`` prompts as lorakit generate
    does), and its generation_settings.json is copied along.

    After a quantized run (--quantize recorded in its train_config.yaml, or a quantized base
    folder) the base loads quantized as in training and the folder holds float weights
    dequant(W) + dW, never re-quantized; --base-weights MODEL merges into MODEL's float
    weights instead (W + dW).
    """
    from ..layers.quantized import is_quantized
    from ..merge import dequantize_merge
    from ..models.load import save_model_folder
    from ..models.precision import resolve_dtype

    out = check_empty_output(args.output)  # before the slow part
    if args.base_weights and args.quantize:
        raise LoraError("--base-weights merges into float weights; drop --quantize.")
    quantize = None  # --base-weights: the float model, never quantized
    if not args.base_weights:
        quantize = args.quantize or _recorded_quantization(adapter_folders(args))
    loaded = _load(args, args.base_weights, quantize)
    model = loaded.model
    quantized = is_quantized(model)
    dequantize_merge(model, resolve_dtype(args.dtype))  # a float base: a plain merge
    model.config.use_cache = True
    settings, processor = loaded.settings, loaded.codec.processor
    # The system prompt goes into the folder's chat template, so that plain transformers
    # (and whatever reads the template) prompts the merged model as lorakit generate does.
    kept = settings.bake_into(processor) if settings.system or settings.chat_template else None
    save_model_folder(model, processor, out, kept)
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
    "eval": (_eval_arguments, run_eval),
    "generate": (_generate_arguments, run_generate),
    "chat": (_chat_arguments, run_chat),
    "merge": (_merge_arguments, run_merge),
}
