"""Image records, one more data format: conversations whose user turns carry images.

Two conventions are read, in JSON or JSONL files, and may be mixed in one file:

* LLaMA-Factory / ms-swift: ``{"messages": [...], "images": ["a.png", ...]}`` where each
  ``<image>`` in a user turn's text stands for the next image of ``images``, in order
  (``conversations`` with ``from``/``value`` turns, ShareGPT-style, works the same);
* OpenAI-style content parts: a turn's ``content`` is a list of ``{"type": "text", "text":
  ...}``, ``{"type": "image", "image": PATH}`` and ``{"type": "image_url", "image_url":
  {"url": PATH_OR_DATA_URL}}`` parts (a bare ``{"type": "image"}`` takes the next of ``images``).

Paths are relative to the data file. Each record becomes a conversation like every other
format's (the text checks of :mod:`lorakit.data.records` apply to it unchanged) in which a
user turn's text holds one ``<image>`` per image and the turn's ``"images"`` key lists them
in order (:func:`images_of` gives a conversation's). So images travel with their turns
through system prompts, splits and prompts cut before a reply. Each image is decoded once
as the file is read (:func:`check_image`), so a missing, damaged or oversized image
(:data:`MAX_PIXELS`) is named by file and line before a model loads; :func:`load_image`
gives 8-bit RGB, 16-bit images scaled rather than clipped.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import re
from pathlib import Path
from typing import Any

from ..errors import LoraError, brief
from .records import BadRecord, Conversation, parse_chat

IMAGE = "<image>"  # the placeholder of one image in a turn's text
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}
ImageSource = Path | bytes  # a file, or the bytes of a data URL


def is_image_record(record: Any) -> bool:
    """Whether a record has images: an ``images`` list, or image content parts in a turn."""
    if not isinstance(record, dict):
        return False
    turns = record.get("messages") or record.get("conversations") or []
    parts = [
        part
        for turn in (turns if isinstance(turns, list) else [])
        if isinstance(turn, dict) and isinstance(turn.get("content"), list)
        for part in turn["content"]
    ]
    return bool(record.get("images")) or any(_part_type(p) in _IMAGE_PARTS for p in parts)


_IMAGE_PARTS = ("image", "image_url")


def _part_type(part: Any) -> str | None:
    return part.get("type") if isinstance(part, dict) else None


def images_of(conversation: Conversation) -> list[ImageSource]:
    """The images of a conversation's turns, in order (none for text records)."""
    return [image for turn in conversation for image in turn.get("images", ())]


def parse_image_record(record: Any, where: str, folder: Path) -> Conversation:
    """A record as a conversation: turns flattened to text, each user turn's images resolved
    (against ``folder``, the data file's) under its ``"images"`` key."""
    if not isinstance(record, dict):
        raise BadRecord(where, "not an object", "the record must be a JSON object.")
    listed = record.get("images", [])
    if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
        raise BadRecord(where, "bad images", "field 'images' must be a list of file paths.")
    key = "messages" if "messages" in record else "conversations"
    turns = record.get(key)
    if not isinstance(turns, list):
        raise BadRecord(where, "no turns", f"field {key!r} must be a list of turns.")
    flat, sources = [], []  # sources: per turn, one per placeholder (None: the next listed)
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRecord(where, "not an object", f"field '{key}[{i}]' must be an object.")
        role = turn.get("role", turn.get("from"))
        if not isinstance(role, str | None):  # parse_chat names the turn's missing role
            raise BadRecord(where, "bad role", f"field '{key}[{i}]' has a role that is not text.")
        role = _SHAREGPT_ROLES.get(role, role) if "from" in turn else role
        text, found = _flatten(turn.get("content", turn.get("value")), f"{key}[{i}]", where)
        if found and role != "user":
            raise BadRecord(
                where,
                "image outside a user turn",
                f"field '{key}[{i}]' ({role}) holds an image; images go in user turns.",
            )
        flat.append({"role": role, "content": text})
        sources.append(found)
    placeholders = sum(found.count(None) for found in sources)
    if placeholders != len(listed):
        raise BadRecord(
            where,
            "placeholder/image mismatch",
            f"{placeholders} {IMAGE} placeholder(s) for {len(listed)} image(s) in 'images': "
            f"every image needs exactly one {IMAGE} in a user turn, in order.",
        )
    messages = parse_chat({"messages": flat}, where)  # the text checks of lorakit.data
    queue = iter(listed)
    for message, found in zip(messages, sources, strict=True):
        if found:
            chosen = [next(queue) if source is None else source for source in found]
            message["images"] = [_resolve(s, folder, where) for s in chosen]
    return messages


def _flatten(content: Any, name: str, where: str) -> tuple[Any, list[str | None]]:
    """A turn's content as text with :data:`IMAGE` placeholders, and each placeholder's
    source: a path or data URL from a content part, or ``None`` for the next of ``images``."""
    if not isinstance(content, list):
        return content, [None] * (content.count(IMAGE) if isinstance(content, str) else 0)
    text, sources = "", []
    for j, part in enumerate(content):
        kind = _part_type(part)
        if kind == "text" and isinstance(part.get("text"), str):
            text += part["text"]
            sources += [None] * part["text"].count(IMAGE)
        elif kind in _IMAGE_PARTS:
            text += IMAGE
            sources.append(_part_source(part, f"{name}.content[{j}]", where))
        else:
            raise BadRecord(
                where,
                "bad content part",
                f"field '{name}.content[{j}]' is {brief(part)}; a content part is "
                '{"type": "text", "text": ...}, {"type": "image", "image": PATH} or '
                '{"type": "image_url", "image_url": {"url": PATH_OR_DATA_URL}}.',
            )
    return text, sources


def _part_source(part: dict[str, Any], name: str, where: str) -> str | None:
    """The path or data URL of an image part; ``None``: the next of the record's ``images``."""
    value = part.get(part["type"])
    if isinstance(value, dict):
        value = value.get("url")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise BadRecord(where, "bad image part", f"field {name!r} must name an image file.")
    if "://" in value:
        raise BadRecord(
            where,
            "remote image",
            f"field {name!r} is the URL {value[:60]}; lorakit reads no network: download the "
            "image and give its path (or a data: URL).",
        )
    return value


def _resolve(source: str, folder: Path, where: str) -> ImageSource:
    """A data URL's bytes, or the path (relative to the data file) of a readable image."""
    if source.startswith("data:"):
        try:
            data = base64.b64decode(source.split(",", 1)[1], validate=True)
        except (IndexError, binascii.Error):
            raise BadRecord(
                where, "bad data URL", "an image data URL must be data:image/...;base64,<data>."
            ) from None
        check_image(io.BytesIO(data), "the image in a data URL", where)
        return data
    path = Path(source).expanduser()
    path = path if path.is_absolute() else folder / path
    if not path.is_file():
        raise BadRecord(
            where,
            "missing image",
            f"image {source} not found (looked for {path}; paths are relative to the data "
            "file). Fix the path or add the file.",
        )
    check_image(path, f"image {path}", where)
    return path


# The most pixels an image may have: 8192 x 8192. A vision-language model's processor shrinks
# every image to some hundreds of pixels a side anyway, and decoding this many takes about
# 200 MB; a PNG of a few hundred bytes may declare billions (a decompression bomb).
MAX_PIXELS = 8192 * 8192
_LIMIT = f"lorakit's limit of {MAX_PIXELS:,} pixels (8192 x 8192)"


class _ImageProblem(Exception):
    """Why an image cannot be used: ``reason`` counts it among skipped records."""

    def __init__(self, reason: str, problem: str) -> None:
        super().__init__(problem)
        self.reason = reason


def _decode(source: Path | io.BytesIO, check: bool = False) -> Any:
    """The image decoded in full, as RGB; ``check``: only decoded (a JPEG at reduced scale:
    every byte is still decoded, so damage shows all the same, in half the time) and one
    pixel converted, to see that it converts, and ``None`` returned.

    Raises:
        _ImageProblem: no image, an image larger than :data:`MAX_PIXELS`, or damaged data.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # our limit is lower than PIL's warning's
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
    except Image.DecompressionBombError as error:  # PIL's own limit, twice its warning's
        declared = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(declared.group(1)):,} pixels" if declared else "more pixels"
        raise _ImageProblem("image too large", f"declares {size}, over {_LIMIT}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise _ImageProblem("unreadable image", f"cannot be read as an image ({error})") from None
    with image:
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise _ImageProblem(
                "image too large",
                f"is {width} x {height} pixels, over {_LIMIT}: shrink it (the model's "
                "processor resizes it to a few hundred pixels a side anyway)",
            )
        try:
            if check and image.format == "JPEG":
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
            if check:
                _to_rgb(image.crop((0, 0, 1, 1)))  # one pixel: the conversion works on its mode
                return None
            return _to_rgb(image)
        except Exception as error:  # PIL's decoders raise OSError, ValueError, struct.error...
            raise _ImageProblem(
                "damaged image",
                f"is damaged: its header reads but its pixels do not decode ({error})",
            ) from None


def _to_rgb(image: Any) -> Any:
    """``image`` as 8-bit RGB; 16- and 32-bit grey and float images are scaled to 8 bits, not
    clipped (``convert("RGB")`` makes every value above 255 white: most of a 16-bit PNG)."""
    import numpy as np
    from PIL import Image

    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and values.max(initial=0) <= 1:
            top = 1.0  # float images hold [0, 1]
        elif image.mode.startswith("I;16") or values.max(initial=0) <= 65535:
            top = 65535.0  # 16-bit data (PNG and TIFF give it as I;16, older PIL as I)
        else:
            top = 2.0**32 - 1
        scaled = np.clip(np.rint(values * (255 / top)), 0, 255).astype(np.uint8)
        image = Image.fromarray(scaled, mode="L")
    return image.convert("RGB")


@functools.lru_cache(maxsize=4096)
def _checked_file(path: Path, size: int, mtime_ns: int) -> None:
    """Decode a file once per version of it (size and mtime): a data set naming one image in
    a thousand records decodes it once."""
    _decode(path, check=True)


def check_image(file: Path | io.BytesIO, what: str, where: str) -> None:
    """Decode the image in full (once per file), so that a file that is no image, is larger
    than :data:`MAX_PIXELS` or is damaged fails here, named with its record, and never later
    in training.

    Raises:
        BadRecord: naming ``what`` (the file), ``where`` (the record), the problem and the
            limit.
    """
    try:
        if isinstance(file, Path):
            stat = file.stat()
            _checked_file(file, stat.st_size, stat.st_mtime_ns)
        else:
            _decode(file, check=True)
    except _ImageProblem as problem:
        raise BadRecord(where, problem.reason, f"{what} {problem}.") from None


def load_image(source: ImageSource) -> Any:
    """A PIL image in 8-bit RGB, from a path or bytes (high bit depths scaled, not clipped).

    Raises:
        LoraError: the file changed since it was checked and is no longer a usable image.
    """
    what = "the image in a data URL" if isinstance(source, bytes) else f"image {source}"
    try:
        return _decode(io.BytesIO(source) if isinstance(source, bytes) else source)
    except _ImageProblem as problem:
        raise LoraError(f"{what} {problem}; fix or replace the file.") from None
