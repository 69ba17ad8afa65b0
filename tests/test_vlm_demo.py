"""The VLM demo: its cached data written as one unit and named after what generated it, and
its model assembled without transformers' notes."""

from __future__ import annotations

import json

import pytest
import vlm_tiny

from lorakit.vlm import demo

SMALL = {"train": 3, "val": 2, "test": 2}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(demo, "SPLITS", SMALL)
    return tmp_path


def test_data_is_written_once_with_every_split(cache):
    files = demo.demo_data()
    assert sorted(files) == sorted(SMALL)
    for split, path in files.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) == SMALL[split]
        assert all((path.parent / row["images"][0]).is_file() for row in rows)
    stamp = files["test"].stat().st_mtime_ns
    assert demo.demo_data() == files and files["test"].stat().st_mtime_ns == stamp


def test_a_write_cut_short_leaves_no_folder_that_looks_complete(cache, monkeypatch):
    drawn = []
    real_draw = demo.draw

    def draw_then_fail(*args):
        if len(drawn) == 4:  # inside the val split: train.jsonl is already written
            raise OSError(28, "No space left on device")
        drawn.append(args)
        return real_draw(*args)

    monkeypatch.setattr(demo, "draw", draw_then_fail)
    with pytest.raises(OSError):
        demo.demo_data()
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == []
    monkeypatch.setattr(demo, "draw", real_draw)
    files = demo.demo_data()
    assert len(files["test"].read_text().splitlines()) == SMALL["test"]
    assert [p.name for p in cache.iterdir()] == [files["test"].parent.name]


def test_a_changed_task_gets_new_data_not_the_stale_cache(cache, monkeypatch):
    before = demo.demo_data()["train"].parent
    monkeypatch.setattr(demo, "SHAPE_SIZES", (10, 12))
    after = demo.demo_data()["train"].parent
    assert after != before and before.is_dir()
    monkeypatch.setattr(demo, "DEMO_VERSION", demo.DEMO_VERSION + 1)
    assert demo.demo_data()["train"].parent not in (before, after)


def test_assembly_prints_no_transformers_notes_and_keeps_their_verbosity(smollm2_tokenizer):
    import logging as std_logging

    from transformers.utils import logging

    notes = []
    handler = std_logging.Handler()
    handler.emit = lambda record: notes.append(record.getMessage())
    std_logging.getLogger("transformers").addHandler(handler)
    logging.set_verbosity_warning()
    try:
        model, processor = vlm_tiny.idefics3(smollm2_tokenizer)
    finally:
        std_logging.getLogger("transformers").removeHandler(handler)
    assert notes == []
    assert logging.get_verbosity() == logging.WARNING
    assert model.config.text_config.pad_token_id == processor.tokenizer.pad_token_id
    assert model.get_input_embeddings().num_embeddings == len(processor.tokenizer)
