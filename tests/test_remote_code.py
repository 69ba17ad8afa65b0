"""A model folder's own Python code (``auto_map``) never runs unless the user asks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit import LoraError
from lorakit.models.load import check_remote_code

CODE = """
from pathlib import Path

Path(__file__).with_name("{marker}").write_text("the folder's code ran")
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "evilnet"


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""


def evil_folder(root: Path, marker: Path) -> Path:
    """A model folder whose ``config.json`` maps to its own ``evil.py``, which writes ``marker``."""
    folder = root / "evil-model"
    folder.mkdir()
    (folder / "evil.py").write_text(CODE.format(marker=marker.name))
    config = {
        "model_type": "evilnet",  # unknown to transformers: only the folder's code knows it
        "architectures": ["EvilForCausalLM"],
        "auto_map": {
            "AutoConfig": "evil.EvilConfig",
            "AutoModelForCausalLM": "evil.EvilForCausalLM",
        },
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("stdin", ["y\n", None], ids=["yes-on-stdin", "stdin-closed"])
def test_train_refuses_a_folder_with_code_and_never_runs_it(tmp_path, stdin):
    folder = evil_folder(tmp_path, tmp_path / "evil-model" / "MARKER")
    marker = folder / "MARKER"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "lorakit", "train", "--model", str(folder)],
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "ships its own Python code, named in config.json (auto_map -> evil)" in done.stderr
    assert "--trust-remote-code" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert "Do you wish to run the custom code" not in done.stdout + done.stderr
    assert not marker.exists()
    assert not (tmp_path / "modules").exists()  # transformers never copied the code
    assert not (tmp_path / "runs").exists()  # nothing written


def test_a_tokenizer_with_code_is_refused_too(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    auto_map = {"AutoTokenizer": ["tok.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": auto_map}))
    with pytest.raises(LoraError, match=r"tokenizer_config.json \(auto_map -> tok\)"):
        check_remote_code(folder)
    check_remote_code(folder, trust_remote_code=True)  # the opt-in


def test_trust_remote_code_reaches_transformers_only_when_asked(tmp_path, monkeypatch):
    import transformers

    from lorakit.models.load import load_model

    folder = evil_folder(tmp_path, tmp_path / "MARKER")
    seen = []

    def spy(path, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        raise RuntimeError("stop here")  # the spy only records what load_model passes

    monkeypatch.setattr(
        transformers, "AutoModelForCausalLM", type("M", (), {"from_pretrained": staticmethod(spy)})
    )
    with pytest.raises(LoraError, match="--trust-remote-code"):
        load_model(str(folder))
    assert seen == []
    with pytest.raises(LoraError, match=r"\(RuntimeError: stop here\)"):  # wrapped, named
        load_model(str(folder), trust_remote_code=True)
    assert seen == [True]
