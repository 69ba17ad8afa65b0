"""Image + text records: both conventions, paths relative to the data file, bad records."""

from __future__ import annotations

import base64
import json
from pathlib import Path

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
