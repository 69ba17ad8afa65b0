"""``lorakit combine`` end to end on a tiny model folder."""

import json
import shutil

import pytest
import tiny
import torch

from lorakit import LoraConfig, add_lora, load_adapter, save_adapter
from lorakit.cli import main
from lorakit.layers import LoraLayer


@pytest.fixture
def tiny_folder(tmp_path, smollm2_tokenizer):
    folder = tmp_path / "tiny"
    tiny.llama().save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    for seed, name in ((1, "a"), (2, "b")):
        model = tiny.llama()
        add_lora(
            model,
            LoraConfig(
                r=2,
                alpha=4,
                target_modules=["q_proj", "v_proj"],
                base_model_name_or_path=str(folder),
            ),
        )
        tiny.randomize_adapters(model, seed=seed)
        save_adapter(model, tmp_path / name)
    return tmp_path


def _deltas(folder):
    model = tiny.llama()
    load_adapter(model, folder)
    return {
        p: m.delta_weight("default") for p, m in model.named_modules() if isinstance(m, LoraLayer)
    }


def test_combine_cat_writes_exact_weighted_sum(tiny_folder, capsys):
    out = tiny_folder / "ab"
    code = main(
        [
            "combine",
            "--adapter",
            f"a={tiny_folder / 'a'}",
            "--adapter",
            f"b={tiny_folder / 'b'}",
            "--weights",
            "0.7,0.3",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    a, b, ab = _deltas(tiny_folder / "a"), _deltas(tiny_folder / "b"), _deltas(out)
    assert set(ab) == set(a)
    for path in a:
        torch.testing.assert_close(ab[path], 0.7 * a[path] + 0.3 * b[path], rtol=1e-5, atol=1e-6)
    assert "method=cat" in capsys.readouterr().out


def test_combine_on_another_model_folder_records_that_folder(tiny_folder):
    moved = tiny_folder / "moved"  # the same base under another path
    shutil.copytree(tiny_folder / "tiny", moved)
    out = tiny_folder / "ab"
    argv = ["combine", "--model", str(moved), "--adapter", f"a={tiny_folder / 'a'}"]
    assert main([*argv, "--adapter", f"b={tiny_folder / 'b'}", "--output", str(out)]) == 0
    recorded = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(moved)
    assert json.loads((tiny_folder / "a" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str(tiny_folder / "tiny")


def test_combine_bad_weights_exit_code(tiny_folder, capsys):
    code = main(
        [
            "combine",
            "--adapter",
            f"a={tiny_folder / 'a'}",
            "--adapter",
            f"b={tiny_folder / 'b'}",
            "--weights",
            "1",
            "--output",
            str(tiny_folder / "x"),
        ]
    )
    assert code == 2
    assert "--weights has 1 values for 2 adapters" in capsys.readouterr().err
    assert not (tiny_folder / "x").exists()


def test_missing_folder_with_equals_is_named_whole(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["merge", "--adapter", "runs/lr=0.5", "--output", "out"]) == 2
    err = capsys.readouterr().err
    assert "--adapter runs/lr=0.5: not an adapter folder (no adapter_config.json)" in err


def test_combine_refuses_a_file_as_output(tiny_folder, capsys):
    data = tiny_folder / "data.jsonl"
    data.write_text("precious\n")
    argv = ["combine", "--adapter", str(tiny_folder / "a"), "--output", str(data)]
    assert main(argv) == 2
    assert (
        f"--output {data} is a file; pass a folder (it is created if missing)."
        in capsys.readouterr().err
    )
    assert data.read_text() == "precious\n"
    assert sorted(p.name for p in tiny_folder.iterdir()) == ["a", "b", "data.jsonl", "tiny"]


def test_full_disk_during_merge_is_one_line_and_leaves_nothing(tiny_folder, capsys, monkeypatch):
    import errno

    from transformers import PreTrainedModel

    def full(self, folder, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder) + "/model.safetensors")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    out = tiny_folder / "merged"
    argv = ["merge", "--model", str(tiny_folder / "tiny"), "--adapter", str(tiny_folder / "a")]
    assert main([*argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("lorakit merge: error: ")
    assert err.endswith(
        f"Could not write the model to {out} (No space left on device); nothing was left "
        "there. Free space or choose another folder."
    )
    assert sorted(p.name for p in tiny_folder.iterdir()) == ["a", "b", "tiny"]


def test_ctrl_c_exits_130_without_a_traceback(tiny_folder, capsys, monkeypatch):
    from lorakit.cli import adapters

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(adapters, "_weights", interrupted)
    assert main(["combine", "--adapter", str(tiny_folder / "a"), "--output", "x"]) == 130
    assert capsys.readouterr().err == "\nlorakit combine: interrupted\n"


@pytest.mark.parametrize("command", ["combine", "export"])
def test_an_adapter_is_never_written_into_a_model_folder(tiny_folder, capsys, command):
    """combine and export --to vllm write adapter folders: a model folder as --output is
    refused before anything loads, and left as it was."""
    model = tiny_folder / "tiny"
    before = sorted(p.name for p in model.iterdir())
    adapter = str(tiny_folder / "a")
    argv = {
        "combine": ["combine", "--adapter", f"a={adapter}", "--adapter", f"b={adapter}"],
        "export": ["export", adapter, "--to", "vllm"],
    }[command]
    assert main([*argv, "--output", str(model)]) == 2
    assert "is not empty and holds no adapter; the adapter written there would be mixed" in (
        capsys.readouterr().err
    )
    assert sorted(p.name for p in model.iterdir()) == before
