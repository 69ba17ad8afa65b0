"""Image + text records: both conventions, paths relative to the data file, bad records."""

from __future__ import annotations

import base64
import functools
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorakit.data import images_of, read_data
from lorakit.data.files import has_images
from lorakit.data.images import load_image
from lorakit.errors import LoraError


def _write(folder: Path, records: list) -> Path:
    path = folder / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _chat(user: object, reply: str = "ok", images: list[str] | None = None) -> dict:
    record: dict = {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    }
    if images is not None:
        record["images"] = images
    return record


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "img" / "red.png")
    Image.new("RGB", (6, 2), (0, 0, 255)).save(tmp_path / "img" / "blue.png")
    return tmp_path


def test_placeholders_and_content_parts(folder, monkeypatch, tmp_path_factory):
    png = (folder / "img" / "blue.png").read_bytes()
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    parts = [
        {"type": "image", "image": "img/red.png"},
        {"type": "text", "text": "and"},
        {"type": "image_url", "image_url": {"url": data_url}},
        {"type": "image"},  # the next of "images"
    ]
    path = _write(
        folder,
        [
            _chat("<image>What colour? <image>", images=["img/red.png", "img/blue.png"]),
            _chat(parts, images=["img/blue.png"]),
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        ],
    )
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # paths follow the file, not cwd
    data = read_data(path)
    first, second, third = data.examples
    assert first[0]["content"] == "<image>What colour? <image>"
    assert images_of(first) == [folder / "img/red.png", folder / "img/blue.png"]
    assert second[0]["content"] == "<image>and<image><image>"
    assert images_of(second) == [folder / "img/red.png", png, folder / "img/blue.png"]
    assert load_image(images_of(second)[1]).size == (6, 2)
    assert images_of(third) == [] and third[1] == {"role": "assistant", "content": "yo"}
    assert data.sources[0] == f"{path}, line 1"
    assert has_images(path)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            _chat("<image><image>hi", images=["img/red.png"]),
            "line 2: 2 <image> placeholder(s) for 1 image",
        ),
        (_chat("hi", images=["img/red.png"]), "line 2: 0 <image> placeholder(s) for 1 image"),
        (_chat("<image>hi", images=["img/gone.png"]), "line 2: image img/gone.png not found"),
        (_chat("<image>hi", images=["img/notes.png"]), "cannot be read as an image"),
        (_chat("hi", reply="<image>"), "images go in user turns"),
        (
            _chat([{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]),
            "reads no network",
        ),
        (_chat([{"type": "video", "video": "a.mp4"}]), "content part is"),
        (_chat("<image>hi", reply="", images=["img/red.png"]), "is empty"),
        (  # found by tests/test_data_fuzz.py: a list as a ShareGPT role was a TypeError
            {"conversations": [{"from": [], "value": "hi"}, {"from": "gpt", "value": "ok"}]},
            "has a role that is not text",
        ),
    ],
)
def test_bad_records_are_named_by_line(folder, record, message):
    (folder / "img" / "notes.png").write_text("not an image")
    path = _write(folder, [_chat("<image>fine", images=["img/red.png"]), record])
    with pytest.raises(LoraError, match="data.jsonl, line 2") as error:
        read_data(path)
    assert message in str(error.value)
    assert "Fix or remove the record" in str(error.value)


def test_skip_bad_records(folder):
    good = _chat("<image>fine", images=["img/red.png"])
    path = _write(folder, [good, _chat("<image>x", images=["img/gone.png"]), good])
    assert len(read_data(path, skip_bad_records=True).examples) == 2


# --- damaged, oversized and high-depth images --------------------------------------------------
def _png_declaring(width: int, height: int) -> bytes:
    """A valid PNG of a few dozen bytes whose header declares ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("content", "reason", "problem"),
    [
        (
            lambda: _png_declaring(100_000, 100_000),
            "image too large",
            "declares 10,000,000,000 pixels, over lorakit's limit of 67,108,864 pixels (8192 x 8192).",
        ),
        (
            lambda: _png_declaring(9000, 8000),
            "image too large",
            "is 9000 x 8000 pixels, over lorakit's limit of 67,108,864 pixels (8192 x 8192): "
            "shrink it (the model's processor resizes it to a few hundred pixels a side anyway).",
        ),
        (
            lambda: _png_bytes()[:-40],
            "damaged image",
            "is damaged: its header reads but its pixels do not decode (",
        ),
        (
            lambda: _jpeg_bytes()[: len(_jpeg_bytes()) // 2],
            "damaged image",
            "is damaged: its header reads",
        ),
        (lambda: b"GIF89a" + b"\0" * 10, "unreadable image", "cannot be read as an image ("),
        (
            lambda: b"\0\1\2\3" * 50,
            "unreadable image",
            "cannot be read as an image (cannot identify",
        ),
    ],
)
def test_every_image_failure_is_named_by_file_and_line_when_the_data_is_read(
    folder, content, reason, problem
):
    (folder / "img" / "bad.png").write_bytes(content())
    path = _write(
        folder,
        [_chat("<image>fine", images=["img/red.png"]), _chat("<image>hi", images=["img/bad.png"])],
    )
    with pytest.raises(LoraError) as error:
        read_data(path)
    message = str(error.value)
    assert message.startswith(f"{path}, line 2: image {folder / 'img' / 'bad.png'} {problem}")
    assert "Traceback" not in message and "\n" not in message
    assert read_data(path, skip_bad_records=True).skipped == {reason: 1}


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@functools.cache
def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_a_damaged_data_url_is_named_by_line(folder):
    url = "data:image/png;base64," + base64.b64encode(_png_bytes()[:-40]).decode()
    path = _write(folder, [_chat([{"type": "image_url", "image_url": {"url": url}}])])
    with pytest.raises(LoraError, match=r"line 1: the image in a data URL is damaged"):
        read_data(path)


def test_an_image_named_by_many_records_is_decoded_once(folder, monkeypatch):
    from lorakit.data import images

    decoded = []
    real = images._decode
    monkeypatch.setattr(images, "_decode", lambda *a, **k: decoded.append(a[0]) or real(*a, **k))
    images._checked_file.cache_clear()
    path = _write(folder, [_chat("<image>hi", images=["img/red.png"])] * 50)
    assert len(read_data(path).examples) == 50
    assert decoded == [folder / "img" / "red.png"]


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depths_are_scaled_to_8_bits_not_clipped(tmp_path, mode):
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(1, 256).repeat(4, axis=0)
    if mode == "I;16":
        Image.fromarray(ramp).save(tmp_path / "deep.png")  # a 16-bit grey PNG opens as I;16
        source = tmp_path / "deep.png"
        assert Image.open(source).mode == "I;16"
    else:
        values = ramp.astype(np.int32) if mode == "I" else ramp.astype(np.float32) / 65535
        image = Image.fromarray(values)
        assert image.mode == mode
        image.save(tmp_path / "deep.tiff")
        source = tmp_path / "deep.tiff"
    rgb = np.asarray(load_image(source))
    assert rgb.shape == (4, 256, 3) and rgb.dtype == np.uint8
    # Every grey level of the ramp, in order: clipping would make all but the first white.
    assert rgb[0, :, 0].tolist() == list(range(256))
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_an_image_changed_after_the_check_is_named_when_loaded(folder):
    path = folder / "img" / "red.png"
    path.write_bytes(_png_bytes()[:-40])
    with pytest.raises(LoraError) as error:
        load_image(path)
    assert str(error.value).startswith(f"image {path} is damaged: its header reads but")
    assert str(error.value).endswith("; fix or replace the file.")
