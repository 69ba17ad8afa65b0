"""Hostile and careless adapter files: each gives a LoraError naming the problem, or loads
right; never another library's exception, never a silently different model."""

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit import LoraConfig, LoraError, add_lora, load_adapter, save_adapter

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(6, 8)
        self.lin1 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def _base() -> nn.Module:
    torch.manual_seed(0)
    return Mlp().eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A good adapter folder (r=2 on both layers, B non-zero)."""
    folder = tmp_path_factory.mktemp("good")
    model = _base()
    add_lora(model, LoraConfig(r=2, alpha=4, target_modules=["lin0", "lin1"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    save_adapter(model, folder)
    return folder


def _copy(saved: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir()
    for name in (WEIGHTS, CONFIG):
        (folder / name).write_bytes((saved / name).read_bytes())
    return folder


def _rewrite_tensors(folder: Path, change) -> None:
    from safetensors import safe_open

    with safe_open(folder / WEIGHTS, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(folder / WEIGHTS)
    save_file(change(tensors), folder / WEIGHTS, metadata=metadata)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: (f / WEIGHTS).write_bytes(b""), "not a readable safetensors file"),
        (
            lambda f: (f / WEIGHTS).write_bytes((f / WEIGHTS).read_bytes()[:100]),
            "truncated or corrupt",
        ),
        (
            lambda f: (f / WEIGHTS).write_bytes(struct.pack("<Q", 2**40) + b"{}"),
            "not a readable safetensors file",
        ),
        (lambda f: (f / CONFIG).write_text("{not json"), "is not valid JSON"),
        (lambda f: (f / CONFIG).write_text("[1, 2]"), "must hold a JSON object, not a list"),
        (
            lambda f: _rewrite_tensors(f, lambda t: {k: v.to(torch.int32) for k, v in t.items()}),
            r"must be floating point; found .*torch.int32",
        ),
        (
            lambda f: _rewrite_tensors(f, lambda t: {k: v * float("nan") for k, v in t.items()}),
            "NaN or inf",
        ),
    ],
    ids=["zero-byte", "truncated", "huge-header", "bad-json", "json-list", "int32", "nan"],
)
def test_corrupt_files_are_refused_by_name(saved, tmp_path, mutate, message):
    folder = _copy(saved, tmp_path)
    mutate(folder)
    model = _base()
    with pytest.raises(LoraError, match=message):
        load_adapter(model, folder)
    assert not any("lora" in n for n, _ in model.named_modules())  # the model is unchanged


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"lora_alpha": 32}, r"changed after the adapter was saved \(lora_alpha: 4 -> 32\)"),
        ({"r": -1}, "r must be a positive integer, got -1"),
        ({"target_modules": 5}, "target_modules must be a list of module names"),
        ({"r": None}, "r must be a positive integer"),
    ],
)
def test_edited_json_never_gives_a_second_model(saved, tmp_path, edit, message):
    folder = _copy(saved, tmp_path)
    config = json.loads((folder / CONFIG).read_text())
    (folder / CONFIG).write_text(json.dumps(config | edit))
    with pytest.raises(LoraError, match=message):
        load_adapter(_base(), folder)


def test_config_without_r_is_not_a_lora_adapter(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    config = json.loads((folder / CONFIG).read_text())
    del config["r"]
    (folder / CONFIG).write_text(json.dumps(config))
    with pytest.raises(LoraError, match="has no 'r'"):
        load_adapter(_base(), folder)


def test_corrupt_metadata_is_refused(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    tensors = load_file(folder / WEIGHTS)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt", "lorakit.config": "{oops"})
    with pytest.raises(LoraError, match="'lorakit.config' is not valid JSON"):
        load_adapter(_base(), folder)


def test_a_huge_rank_in_a_peft_file_is_refused_before_anything_is_allocated(saved, tmp_path):
    """A PEFT-written file (no lorakit metadata) whose config says r=10**9: the expected
    shapes are worked out on the meta device, so the mismatch is named, not a 24 GB
    allocation."""
    folder = _copy(saved, tmp_path)
    save_file(load_file(folder / WEIGHTS), folder / WEIGHTS, metadata={"format": "pt"})
    config = json.loads((folder / CONFIG).read_text())
    (folder / CONFIG).write_text(json.dumps({**config, "r": 10**9, "lora_alpha": 10**9}))
    with pytest.raises(LoraError, match="shape"):
        load_adapter(_base(), folder)


def test_a_deeply_nested_config_is_refused_by_name(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / CONFIG).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(LoraError, match="nests its values too deeply"):
        load_adapter(_base(), folder)


# --- fuzzing: anything a file can hold gives a result or a LoraError -----------------------
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 40)
    | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
KEYS = st.sampled_from(
    [
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "exclude_modules",
        "bias",
        "use_dora",
        "lora_bias",
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "layers_pattern",
        "init_lora_weights",
        "use_rslora",
        "modules_to_save",
        "target_parameters",
        "trainable_token_indices",
        "peft_type",
        "kasa_config",
        "fan_in_fan_out",
        "new_key",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYS, JSON_VALUES, max_size=8))
def test_fuzzed_config_dicts_give_a_config_or_a_lora_error(data):
    base = {"r": 4, "target_modules": ["lin0"]}
    try:
        config = LoraConfig.from_peft_dict(base | data)
    except LoraError:
        return
    assert isinstance(config.to_peft_dict(), dict)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cut=st.integers(0, 2000),
    flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(1, 255)), max_size=4),
    target=st.sampled_from([WEIGHTS, CONFIG]),
)
def test_fuzzed_adapter_files_give_a_model_or_a_lora_error(saved, tmp_path, cut, flips, target):
    folder = tmp_path / "fuzz"
    folder.mkdir(exist_ok=True)
    for name in (WEIGHTS, CONFIG):
        (folder / name).write_bytes((saved / name).read_bytes())
    data = bytearray((folder / target).read_bytes())
    for offset, xor in flips:
        if offset < len(data):
            data[offset] ^= xor
    (folder / target).write_bytes(bytes(data[: max(cut, len(data) // 2) if cut else len(data)]))
    try:
        model = load_adapter(_base(), folder)
    except LoraError:
        return
    assert torch.isfinite(model(torch.randn(2, 6))).all()


DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8, torch.bool]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    drop=st.lists(st.integers(0, 3), max_size=3, unique=True),
    retype=st.dictionaries(st.integers(0, 3), st.sampled_from(DTYPES), max_size=2),
    transpose=st.lists(st.integers(0, 3), max_size=2, unique=True),
)
def test_dropped_retyped_or_reshaped_tensors_give_a_model_or_a_lora_error(
    saved, tmp_path, drop, retype, transpose
):
    folder = tmp_path / "mutated"
    folder.mkdir(exist_ok=True)
    for name in (WEIGHTS, CONFIG):
        (folder / name).write_bytes((saved / name).read_bytes())

    reshaped = []

    def change(tensors: dict) -> dict:
        out = {}
        for i, key in enumerate(sorted(tensors)):
            if i in drop:
                continue
            value = tensors[key].t().contiguous() if i in transpose else tensors[key]
            reshaped.append(value.shape != tensors[key].shape)
            out[key] = value.to(retype[i]) if i in retype else value
        return out

    _rewrite_tensors(folder, change)
    try:
        model = load_adapter(_base(), folder)
    except LoraError:
        return
    # Accepted: only float dtypes, every tensor present with its shape.
    assert not drop and not any(reshaped)
    assert all(dtype.is_floating_point for dtype in retype.values())
    assert torch.isfinite(model(torch.randn(2, 6))).all()
