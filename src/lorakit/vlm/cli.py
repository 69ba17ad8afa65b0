"""The CLI with images: ``train`` (and ``--demo vlm``), ``eval``, ``generate --image``, ``chat``
(``/image PATH``) and ``merge`` on a vision-language model folder.

:mod:`lorakit.cli.tune` hands a command over here when its model is a VLM folder (or an
adapter trained on one) or its data has images; the flags are the same.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from ..errors import LoraError
from .data import IMAGE


def base_spec(args: argparse.Namespace) -> str | None:
    """The model folder ``eval``/``generate``/``chat``/``merge`` would load, if it is a VLM."""
    from ..cli.adapters import parse_named_adapters
    from ..models.load import resolve_model_spec
    from .models import is_vlm_folder

    try:
        spec = args.model or next(iter(parse_named_adapters(args.adapter or []).values()), None)
        if spec is None:
            return None
        resolved = resolve_model_spec(spec)
    except LoraError:
        return None  # the text path reports it
    return resolved if is_vlm_folder(resolved) else None


def _load(args: argparse.Namespace, spec: str) -> tuple[Any, Any, Any]:
    """The VLM with the adapters loaded, its processor and the generation settings."""
    from ..adapters import set_adapter
    from ..cli.common import adapter_folders, generation_settings, load_adapters, set_threads
    from .models import load_vlm

    if args.quantize:
        raise LoraError("--quantize with a vision-language model is not implemented.")
    if args.chat_template:
        raise LoraError(
            "--chat-template with a vision-language model is not implemented: its processor's "
            "template places the images."
        )
    adapters = adapter_folders(args)
    settings = generation_settings(args, adapters)
    set_threads()
    model, processor = load_vlm(spec, args.dtype, args.trust_remote_code)
    load_adapters(model, adapters, spec)
    if args.use:
        set_adapter(model, [n.strip() for n in args.use.split(",")])
    return model.eval(), processor, settings


def _check_images(paths: list[str]) -> list[Path]:
    from .data import check_image  # the same check as for data records

    found = []
    for path in paths:
        if not Path(path).is_file():
            raise LoraError(f"--image {path}: file not found.")
        check_image(Path(path), f"--image {path}", "--image")
        found.append(Path(path))
    return found


def run_generate(args: argparse.Namespace, spec: str) -> int:
    """One reply to ``--image`` files (each one ``<image>`` before the prompt) and the prompt."""
    from .generate import stream_vlm_reply

    images = _check_images(args.image or [])
    model, processor, settings = _load(args, spec)
    text = " ".join(args.prompt)
    if IMAGE not in text:
        text = IMAGE * len(images) + text
    messages = settings.messages([{"role": "user", "content": text}])
    stream_vlm_reply(model, processor, messages, images, args.max_new_tokens)
    return 0


def run_chat(args: argparse.Namespace, spec: str) -> int:
    """A chat; ``/image PATH`` attaches an image to the next message."""
    from ..cli.common import read_message
    from .generate import stream_vlm_reply

    model, processor, settings = _load(args, spec)
    messages, images, pending = settings.messages([]), [], []
    print("(/image PATH attaches an image to your next message)")
    while (text := read_message()) is not None:
        if text.startswith("/image"):
            try:
                pending += _check_images([text.removeprefix("/image").strip()])
            except LoraError as error:
                print(error)
            continue
        messages.append({"role": "user", "content": IMAGE * len(pending) + text})
        images += pending
        pending = []
        reply = stream_vlm_reply(model, processor, messages, images, args.max_new_tokens)
        messages.append({"role": "assistant", "content": reply})
    return 0


def run_eval(args: argparse.Namespace, spec: str) -> int:
    """Loss, perplexity and exact match on image + text records."""
    from ..training.step import evaluate_loss
    from .collate import encode_vlm
    from .data import read_vlm_data
    from .generate import vlm_exact_match

    examples = read_vlm_data(args.data, skip_bad_records=args.skip_bad_records)
    model, processor, settings = _load(args, spec)
    for example in examples:
        example.messages = settings.messages(example.messages)
    dataset = encode_vlm(examples, processor, args.seq_len, source=args.data)
    loss = evaluate_loss(model, dataset, args.batch_size, None, "loss")
    print(f"examples:    {len(dataset)} ({dataset.dropped} dropped at --seq-len)")
    print(f"loss:        {loss:.4f}")
    print(f"perplexity:  {math.exp(min(loss, 50)):.3f}")
    print(
        f"exact match: {vlm_exact_match(model, processor, dataset.examples, args.batch_size):.1%}"
    )
    return 0


def run_merge(args: argparse.Namespace, spec: str) -> int:
    """The adapter folded in; the folder (model + processor) loads with plain transformers."""
    from ..cli.common import check_empty_output
    from ..merge import unload
    from ..models.load import save_model_folder

    if args.base_weights:
        raise LoraError(
            "--base-weights is for quantized runs; drop it for a vision-language model."
        )
    args.system = args.chat_template = None
    out = check_empty_output(args.output)
    model, processor, settings = _load(args, spec)
    model = unload(model, merge=True)
    model.config.use_cache = True
    # The processor saves as a tokenizer does.
    save_model_folder(model, processor, out, settings if settings.system else None)
    print(f"merged model written to {out}")
    return 0


def wants_vlm(config: Any) -> bool:
    """Whether a ``train`` config is an image run: a VLM folder as model, or image data."""
    from ..models.load import resolve_model_spec
    from .data import has_images
    from .models import is_vlm_folder

    try:
        model = resolve_model_spec(config.model)
    except LoraError:
        model = config.model
    images = config.data is not None and Path(config.data).is_file() and has_images(config.data)
    if images and not is_vlm_folder(model):
        raise LoraError(
            f"--data {config.data} has images but --model {config.model} is not a "
            "vision-language model: pass a VLM folder (AutoModelForImageTextToText), or try "
            "`lorakit train --demo vlm`."
        )
    if not is_vlm_folder(model) and (config.train_projector or config.train_vision):
        raise LoraError(
            "--train-projector and --train-vision are for vision-language models; "
            f"--model {config.model} is a text model."
        )
    return is_vlm_folder(model)
