"""Progress bars: no cursor escapes in a log, and transformers' own bars switched off."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from lorakit.progress import bar, progress, quiet_transformers


def test_nested_bars_in_a_file_never_move_the_cursor(monkeypatch):
    log = io.StringIO()  # not a terminal, as a redirected stderr
    monkeypatch.setattr(sys, "stderr", log)
    outer = bar(3, "train")
    for _ in range(3):
        inner = bar(4, "val loss", "seq", leave=False)
        for _ in range(4):
            inner.update(1)
        inner.close()
        outer.write("step: eval loss 1.0", file=log)
        outer.update(1)
    outer.close()
    text = log.getvalue()
    assert "val loss:" in text and "train:" in text and "step: eval loss 1.0" in text
    assert "\x1b[" not in text, repr(text)


def test_progress_is_silent_off_a_terminal_and_yields_every_item(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    assert list(progress(range(5), "inspect")) == [0, 1, 2, 3, 4]
    assert log.getvalue() == ""


def test_a_bar_without_a_label_draws_nothing(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    with bar(2, None) as shown:
        shown.update(2)
    assert log.getvalue() == ""


@pytest.fixture
def transformers_bars(monkeypatch):
    """transformers' bars on for the test, and as they were after it."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    logging.enable_progress_bar()
    yield logging
    (logging.enable_progress_bar if was else logging.disable_progress_bar)()


def test_quiet_transformers_switches_their_bars_off(transformers_bars):
    quiet_transformers()
    assert not transformers_bars.is_progress_bar_enabled()
    log = io.StringIO()
    for _ in transformers_bars.tqdm(range(3), desc="Loading weights", file=log):
        pass
    assert log.getvalue() == ""


def test_quiet_transformers_before_they_load_holds_when_they_do():
    code = (
        "import sys\n"
        "from lorakit.progress import quiet_transformers\n"
        "quiet_transformers()\n"
        "assert 'transformers' not in sys.modules\n"  # no import: the checks stay fast
        "from transformers.utils import logging\n"
        "print('ENABLED', logging.is_progress_bar_enabled())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ENABLED False" in done.stdout


def test_the_gguf_readers_bar_follows_transformers_switch(transformers_bars):
    import transformers.modeling_gguf_pytorch_utils as reader

    from lorakit.models.load import _gguf_bar_follows_transformers

    def drawn() -> str:
        log = io.StringIO()
        for _ in reader.tqdm(
            range(3), desc="Converting and de-quantizing GGUF tensors...", file=log
        ):
            pass
        return log.getvalue()

    with _gguf_bar_follows_transformers():
        assert "Converting" in drawn()  # bars on: theirs shows
    transformers_bars.disable_progress_bar()
    with _gguf_bar_follows_transformers():
        assert drawn() == ""
    assert "Converting" in drawn()  # only inside the block
