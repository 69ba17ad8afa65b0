"""The VLM demo: a SmolVLM-shaped model learns to describe coloured shapes, offline.

The model is assembled, not downloaded: the bundled SmolLM2-135M-Instruct is the language
model, and a small, randomly initialised SigLIP-style vision encoder (Idefics3's) with a
pixel-shuffle projector turns a 64x64 image into 4 tokens, one per quadrant. This is the shape
of SmolVLM-256M (same language model family, same projector), only smaller. The vision encoder
stays frozen; the projector is trained in full (``--train-projector``) and the language model
through LoRA.

The task is generated: one shape (circle, square or triangle) in one colour (red, green, blue
or yellow) in one quadrant; the question is "What is in the picture?" and the answer reads
"a red circle at the top left" (48 answers: chance is about 2%).
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 20),
}
SHAPES = ("circle", "square", "triangle")
PLACES = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
QUESTION = "What is in the picture?"
IMAGE_SIZE = 64  # pixels; 4x4 patches of 16, pixel-shuffled 2x2 -> 4 image tokens
SHAPE_SIZES = (22, 28)  # a shape's side in pixels, in its 32-pixel quadrant (jittered)
SPLITS = {"train": 1200, "val": 48, "test": 50}
# A ChatML template (SmolLM2's) whose image parts become the processor's <image> marker.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IMAGE_TOKENS = {
    "fake_image_token": "<fake_token_around_image>",
    "image_token": "<image>",
    "end_of_utterance_token": "<end_of_utterance>",
    "global_image_token": "<global-img>",
}


def draw(colour: str, shape: str, place: str, rng: random.Random) -> Any:
    """A 64x64 PIL image: ``shape`` in ``colour`` in quadrant ``place``, slightly jittered."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (245, 245, 245))
    pen = ImageDraw.Draw(image)
    col, row = PLACES[place]
    half = IMAGE_SIZE // 2
    size = rng.randint(*SHAPE_SIZES)
    x0 = col * half + rng.randint(1, half - size - 1)
    y0 = row * half + rng.randint(1, half - size - 1)
    box = (x0, y0, x0 + size, y0 + size)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(x0 + size // 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=fill)
    return image


def write_demo_data(
    folder: Path, seed: int = 0, splits: dict[str, int] | None = None
) -> dict[str, Path]:
    """PNG images and ``train/val/test.jsonl`` (``images`` + ``<image>``) under ``folder``.

    Returns:
        split name -> data file.
    """
    from ..progress import progress

    rng = random.Random(seed)
    files = {}
    for split, count in (splits or SPLITS).items():
        (folder / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in progress(range(count), f"drawing {split} images", count, "image"):
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            place = rng.choice(list(PLACES))
            name = f"{split}/{i:04d}.png"
            draw(colour, shape, place, rng).save(folder / name)
            answer = f"a {colour} {shape} at the {place}"
            messages = [
                {"role": "user", "content": f"<image>{QUESTION}"},
                {"role": "assistant", "content": answer},
            ]
            rows.append(json.dumps({"messages": messages, "images": [name]}))
        files[split] = folder / f"{split}.jsonl"
        files[split].write_text("\n".join(rows) + "\n")
    return files


def assemble_vlm(
    language_model: Any, tokenizer: Any, seed: int = 0, vision_layers: int = 2
) -> tuple[Any, Any]:
    """An Idefics3 (SmolVLM) model around ``language_model``, and its processor.

    Args:
        language_model: a ``LlamaForCausalLM`` (its weights are copied).
        tokenizer: its tokenizer (copied; the image tokens are added to the copy).
        seed: seeds the vision encoder's and projector's random init.
        vision_layers: transformer layers of the vision encoder (width 96).

    Returns:
        ``(model, processor)``; the model in eval mode, float32.
    """
    import copy

    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS.values())})
    for name, token in IMAGE_TOKENS.items():
        setattr(tokenizer, name, token)
    text_config = copy.deepcopy(language_model.config)
    vision = dict(
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=16,
    )
    config = Idefics3Config(
        text_config=text_config.to_dict(),
        vision_config=vision,
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["image_token"]),
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    model.model.text_model.load_state_dict(language_model.get_decoder().state_dict())
    model.lm_head.load_state_dict(language_model.get_output_embeddings().state_dict())
    # The image tokens' rows start at the old rows' mean and covariance (transformers' mean
    # resizing, seeded above); its note about that is for users who did not choose it.
    with _transformers_quiet():
        model.resize_token_embeddings(len(tokenizer))
    model.config.text_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), _processor(tokenizer)


def _processor(tokenizer: Any) -> Any:
    """Idefics3's processor for one unsplit IMAGE_SIZE image of (IMAGE_SIZE / 32)² tokens."""
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
        do_image_splitting=False,
    )
    return Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(IMAGE_SIZE // 16 // 2) ** 2,
        chat_template=CHAT_TEMPLATE,
    )


@contextmanager
def _transformers_quiet() -> Iterator[None]:
    """transformers' own logging at errors only, for the block."""
    from transformers.utils import logging

    before = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(before)


# The demo run's settings (`lorakit train --demo vlm`), for the keys neither flags nor a YAML
# file set: tuned to reach its accuracy target within 10 minutes on a 2-core CPU.
DEMO_DEFAULTS: dict[str, Any] = {
    "max_steps": 150,
    "lr": 2e-3,
    "batch_size": 8,
    "seq_len": 128,
    "warmup_steps": 5,
    "dropout": 0.0,
    "eval_every": 50,
    "train_projector": True,
    "output": "runs/demo-vlm",
}


# Bump when draw(), the records or assemble_vlm() change: the cached data and base are
# named after it and the constants, so an upgraded lorakit never trains on stale ones.
DEMO_VERSION = 1


def _cache_name(stem: str) -> str:
    """``stem-<hash>``: a folder name that changes with anything that would change its files."""
    import hashlib

    made_of = [DEMO_VERSION, COLOURS, SHAPES, PLACES, QUESTION, IMAGE_SIZE, SHAPE_SIZES, SPLITS]
    return f"{stem}-{hashlib.sha256(json.dumps(made_of).encode()).hexdigest()[:12]}"


def demo_base() -> Path:
    """The demo's base VLM folder, assembled once from the bundled SmolLM2 and cached."""
    from ..models.gguf import DEFAULT_MODEL, cache_dir
    from ..models.load import load_model, save_model_folder

    folder = cache_dir() / _cache_name("smolvlm-demo")
    if not (folder / "config.json").is_file():
        _status(
            "assembling the demo's base model, once: SmolLM2-135M with a 2-layer vision encoder "
            f"and a projector; cached at {folder}"
        )
        language_model, tokenizer = load_model(DEFAULT_MODEL)
        model, processor = assemble_vlm(language_model, tokenizer, seed=0)
        save_model_folder(model, processor, folder)  # atomic: whole or absent
    return folder


def demo_data() -> dict[str, Path]:
    """The demo's generated images and records, written once (as one unit) and cached.

    Returns:
        split name -> data file.
    """
    from ..atomic import atomic_folder
    from ..models.gguf import cache_dir

    folder = cache_dir() / _cache_name("vlm-demo-data")
    if not folder.is_dir():  # a killed write leaves only a hidden temporary folder
        images = sum(SPLITS.values())
        _status(f"drawing the demo's {images} images, once; cached at {folder}")
        with atomic_folder(folder) as new:
            write_demo_data(new)
    return {split: folder / f"{split}.jsonl" for split in SPLITS}


def _status(message: str) -> None:
    """A line on stderr while the demo prepares what it caches (results go to stdout)."""
    print(message, file=sys.stderr, flush=True)


def demo_config(yaml_path: str | None, overrides: dict[str, Any]) -> Any:
    """The demo run's :class:`~lorakit.training.config.TrainConfig`: the generated data (written
    once, beside the base), the assembled base and :data:`DEMO_DEFAULTS` under the flags."""
    from ..training.config import resolve_config

    files = demo_data()
    demo = {
        "model": str(demo_base()),
        "data": str(files["train"]),
        "val_data": str(files["val"]),
        "test_data": str(files["test"]),
        **DEMO_DEFAULTS,
    }
    return resolve_config(yaml_path, {**demo, **overrides})
