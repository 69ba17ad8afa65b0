"""`lorakit extract / resize / factorize` and the perplexity they report."""

import argparse
import copy
import json
import math

import pytest
import tiny
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lorakit import LoraError, load_adapter
from lorakit.cli import lowrank as cli
from lorakit.lowrank import extract_adapter
from lorakit.lowrank.factorize import factorize
from lorakit.models.load import load_model


@pytest.fixture(scope="module")
def finetune():
    return tiny.full_finetune()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", *[f"w{i}" for i in range(61)]]
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=inner, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _call(name, argv):
    add_arguments, run = cli.COMMANDS[name]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args(argv))


@pytest.fixture(scope="module")
def folders(tmp_path_factory, finetune):
    """Base and tuned model folders with a tokenizer, and a text data file."""
    root = tmp_path_factory.mktemp("cli")
    for name, model in zip(("base", "tuned"), finetune, strict=True):
        model.save_pretrained(root / name)
        _tokenizer().save_pretrained(root / name)
    gen = torch.Generator().manual_seed(4)
    lines = [
        " ".join(f"w{int(i)}" for i in torch.randint(0, 61, (15,), generator=gen)) for _ in range(6)
    ]
    (root / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return root


def test_perplexity_is_exp_of_the_mean_token_loss(folders):
    model, tokenizer = load_model(str(folders / "base"))
    ppl = cli.perplexity(model, tokenizer, folders / "data.jsonl")
    losses = []
    for line in (folders / "data.jsonl").read_text().splitlines():
        ids = tokenizer(json.loads(line)["text"])["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([ids])
        losses.append(
            F.cross_entropy(tiny.logits(model, ids)[0, :-1], ids[0, 1:], reduction="none")
        )
    assert ppl == pytest.approx(math.exp(torch.cat(losses).mean().item()), rel=1e-5)


def test_cli_extract_resize_factorize(folders, finetune, capsys):
    out = folders / "out"
    assert _call("extract", ["--base", str(folders / "base"), "--tuned", str(folders / "tuned"),
                             "--rank", "4", "--output", str(out / "extracted")]) == 0  # fmt: skip
    assert "model.norm.weight" in capsys.readouterr().out  # listed as changed, not targeted
    written = json.loads((out / "extracted" / "adapter_config.json").read_text())
    assert written["r"] == 4 and written["base_model_name_or_path"] == str(folders / "base")
    expected = copy.deepcopy(finetune[0])
    extract_adapter(expected, finetune[1], "all-linear", rank=4)
    adapted = load_adapter(load_model(str(folders / "base"))[0], out / "extracted")
    assert tiny.max_diff(tiny.logits(adapted), tiny.logits(expected)) < 1e-5

    assert (
        _call("resize", [str(out / "extracted"), "--rank", "2", "--output", str(out / "r2")]) == 0
    )
    assert "4 -> 2" in capsys.readouterr().out
    tensors = load_file(out / "r2" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"].shape == (2, 32)

    assert _call("factorize", ["--model", str(folders / "base"), "--targets", "q_proj", "v_proj",
                               "--rank", "3", "--data", str(folders / "data.jsonl"),
                               "--output", str(out / "factorized")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "perplexity on" in printed and "before" in printed and "after" in printed
    loaded, _ = load_model(str(out / "factorized"))
    reference = copy.deepcopy(finetune[0])
    factorize(reference, ["q_proj", "v_proj"], rank=3)
    assert tiny.max_diff(tiny.logits(loaded), tiny.logits(reference)) < 1e-6


# --- where extract and resize may write ---------------------------------------------------------
def _folder(root, name: str, *files: str):
    folder = root / name
    folder.mkdir()
    for file in files:
        (folder / file).write_text("{}")
    return folder


@pytest.mark.parametrize(
    ("files", "kind"),
    [
        (("config.json", "model.safetensors"), "is not empty and holds no adapter"),
        (("adapter_config.json", "config.json", "model.safetensors"), "holds a model"),
        (
            ("adapter_config.json", "adapter_model.safetensors", "train_config.yaml"),
            "holds a run of lorakit train (its adapter, settings and checkpoints)",
        ),
        (("notes.txt",), "is not empty and holds no adapter"),
    ],
)
def test_extract_and_resize_refuse_a_folder_of_another_kind_before_loading(
    folders, tmp_path, monkeypatch, files, kind
):
    out = _folder(tmp_path, "out", *files)
    before = sorted(p.name for p in out.iterdir())
    import lorakit.models.load

    monkeypatch.setattr(lorakit.models.load, "load_model", lambda *a, **k: pytest.fail("loaded"))
    adapter = _folder(tmp_path, "adapter", "adapter_config.json")
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(folders / "base")})
    )
    calls = {
        "extract": ["--base", str(folders / "base"), "--tuned", str(folders / "tuned")],
        "resize": [str(adapter)],
    }
    for command, argv in calls.items():
        with pytest.raises(LoraError) as error:
            _call(command, [*argv, "--rank", "2", "--output", str(out)])
        assert str(error.value) == (
            f"--output {out} {kind}; the adapter written there would be mixed with it. Pass a "
            "new or empty folder, or an adapter folder to replace."
        )
    assert sorted(p.name for p in out.iterdir()) == before


def test_an_adapter_folder_a_new_or_an_empty_one_is_a_fine_output(tmp_path):
    adapter = _folder(tmp_path, "adapter", "adapter_config.json", "adapter_model.safetensors")
    (adapter / "README.md").write_text("notes")
    empty = _folder(tmp_path, "empty")
    for out in (adapter, empty, tmp_path / "new"):
        assert cli.check_adapter_output(out) == out
    (tmp_path / "file").write_text("x")
    with pytest.raises(LoraError, match="is a file; pass a folder"):
        cli.check_adapter_output(tmp_path / "file")
