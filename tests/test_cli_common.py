"""Tests for lorakit.cli.common: the helpers the subcommands share."""

import pytest

from lorakit.cli.common import parse_named_adapters


def test_parse_named_adapters():
    assert parse_named_adapters(["a=x", "b=y/z"]) == {"a": "x", "b": "y/z"}
    assert parse_named_adapters(["runs/demo"]) == {"default": "runs/demo"}
    with pytest.raises(Exception, match="give each adapter once"):
        parse_named_adapters(["a=x", "a=y"])


def test_an_existing_path_wins_over_name_equals_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "lr=0.01").mkdir(parents=True)
    (tmp_path / "lr=0.02").mkdir()
    assert parse_named_adapters(["runs/lr=0.01"]) == {"default": "runs/lr=0.01"}
    assert parse_named_adapters(["lr=0.02"]) == {"default": "lr=0.02"}  # exists: a path
    assert parse_named_adapters(["lr=0.03"]) == {"lr": "0.03"}  # does not: NAME=DIR
    assert parse_named_adapters(["a=runs/lr=0.01"]) == {"a": "runs/lr=0.01"}
    # A '/' before the '=' is a path's, never a name's: a missing folder is named whole.
    assert parse_named_adapters(["runs/lr=0.5"]) == {"default": "runs/lr=0.5"}
