"""Conformance with PEFT's own LoRA test matrix: adapter files cross over both ways, exactly.

PEFT 0.21.2 tests LoRA on small custom models in ``tests/test_custom_models.py`` (``TEST_CASES``,
the 46 rows whose config class is ``LoraConfig``). ``CASES`` below is that list, row for row,
with the same names, models and config kwargs. The models are re-written here with the same
architecture and the same seeded initialisation, so the numbers are PEFT's numbers.

For every case this file proves, in float32 and in eval mode, to float32 rounding (``ATOL``,
``RTOL``):

1. PEFT -> lorakit: an adapter made and saved by PEFT (``init_lora_weights=False`` plus noise on
   every trainable tensor, so B != 0 and DoRA magnitudes move) loads with ``load_adapter`` onto
   a fresh base model and gives PEFT's outputs.
2. lorakit -> PEFT: an adapter made by lorakit from PEFT's own config dict
   (``LoraConfig.from_peft_dict``), perturbed the same way and saved with ``save_adapter``, has
   exactly the tensor names and shapes PEFT writes and the same options in its config, loads
   with ``peft.PeftModel.from_pretrained`` and gives lorakit's outputs.
3. merge / unmerge / unload leave lorakit's outputs unchanged, and ``unload`` leaves no lorakit
   module behind. A PEFT-made grouped-conv adapter, which PEFT itself cannot merge, may
   be refused, but merging never changes the outputs.

Methods that are not plain LoRA / DoRA (KaSA, MiCA, VeLoRA, MonteCLoRA, BD-LoRA) carry a
``refused_key``: lorakit must refuse both PEFT's saved adapter and PEFT's config dict with a
``LoraError`` that names that key, never load them as something they are not.

Finally, every field of ``peft.LoraConfig`` is walked: set to a non-default value it must either
round-trip (the fields lorakit implements), be accepted (purely informational fields), or be
refused with a ``LoraError`` naming it (everything else, including fields a newer PEFT adds); a
config with all of PEFT's defaults, and unknown keys left at an empty value (what a newer PEFT
writes for options nobody used), must load.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import peft
import pytest
import torch
from peft import (
    ArrowConfig,
    BdLoraConfig,
    EvaConfig,
    KasaConfig,
    LoraGAConfig,
    MontecloraConfig,
    VeloraConfig,
    get_peft_model_state_dict,
)
from peft.tuners.lora.config import CordaConfig  # not exported at the top level
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from lorakit import (
    LoraConfig,
    LoraError,
    add_lora,
    load_adapter,
    merge,
    save_adapter,
    unload,
    unmerge,
)
from lorakit.config import PEFT_FILE_VERSION

# Outputs are log-probabilities up to ~800 in size. float32 rounding grows with that size:
# PEFT's own merge moves its Conv2d outputs (|y| ~ 40) by 1.5e-5, so a pure absolute 1e-5 would
# fail correct code; rtol=1e-5 forgives rounding only (a real bug is off by 1e-3 or more).
ATOL = 1e-5
RTOL = 1e-5
SEED = 0


# --- the models: PEFT's test models, same layers, shapes and forward -------------------------
class MLP(nn.Module):
    """10 -> lin0 -> 20 -> ReLU -> dropout -> lin1 -> 2 -> log-softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(self.relu(self.lin0(x.float())))
        return self.sm(self.lin1(h))


class ModelEmbConv1D(nn.Module):
    """Token ids -> Embedding(100, 5) -> GPT-2 style Conv1D (5 -> 1) -> flatten -> lin0 -> 2."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)  # transformers' Conv1D(nf=out, nx=in): weight is (in, out)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.flat(self.relu(self.conv1d(self.emb(x))))
        return self.sm(self.lin0(h))


class ModelConv1D(nn.Module):
    """(batch, 10) -> (batch, 1, 10) -> Conv1d(1, 1, 2) -> 9 -> lin0 -> 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(1, 1, 2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(9, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.flat(self.relu(self.conv1d(x.float().reshape(-1, 1, 10))))
        return self.sm(self.lin0(h))


class ModelConv2D(nn.Module):
    """Input reshaped to (-1, 5, 3, 3) -> Conv2d(5, 10, 3) -> 10 -> lin0 -> 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(5, 10, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.flat(self.relu(self.conv2d(x.float().reshape(-1, 5, 3, 3))))
        return self.sm(self.lin0(h))


class ModelConv2DGroups(nn.Module):
    """All 90 inputs -> lin0 -> 288 = (2, 16, 3, 3) -> Conv2d(16, 16, 3, groups=8) -> lin1 -> 2.

    groups=8 divides PEFT's default r=8, which its grouped-conv LoRA needs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(90, 288)
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin1 = nn.Linear(16, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin0(x.float().flatten()).reshape(2, 16, 3, 3)
        h = self.flat(self.relu(self.conv2d(h)))
        return self.sm(self.lin1(h))


class ModelConv2DGroups2(nn.Module):
    """(9, 16, 20, 20) -> Conv2d(16, 32, 3, padding=1, groups=2) -> 12800 -> lin0 -> 2.

    PEFT's version builds this input inside ``forward`` and ignores its argument; here it comes
    from ``make_inputs`` (same values), so the model is a plain function of its input.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(12800, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.flat(self.relu(self.conv2d(x.float())))
        return self.sm(self.lin0(h))


class ModelConv3D(nn.Module):
    """(batch, 10) stacked 3 times -> (-1, 5, 3, 3, 3) -> Conv3d(5, 10, 3) -> lin0 -> 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3d = nn.Conv3d(5, 10, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        volume = torch.stack([x.float()] * 3, dim=-1).reshape(-1, 5, 3, 3, 3)
        h = self.flat(self.relu(self.conv3d(volume)))
        return self.sm(self.lin0(h))


class ModelMha(nn.Module):
    """Unbatched self-attention: (9, 10) -> MultiheadAttention(10, 2 heads) -> lin0 -> 2."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        h, _ = self.mha(x, x, x)
        return self.sm(self.lin0(h))


class ParameterLinear(nn.Module):
    """A linear layer that is not an ``nn.Linear``: ``x @ weight + bias`` with weight (in, out).

    Only ``target_parameters`` can adapt it.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        self.bias = nn.Parameter(torch.ones(out_features))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight + self.bias


class MlpUsingParameters(nn.Module):
    """``MLP`` with ``ParameterLinear`` layers in place of ``nn.Linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = ParameterLinear(10, 20)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = ParameterLinear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(self.relu(self.lin0(x.float())))
        return self.sm(self.lin1(h))


MODELS: dict[str, type[nn.Module]] = {
    "MLP": MLP,
    "EmbConv1D": ModelEmbConv1D,
    "Conv1d": ModelConv1D,
    "Conv2d": ModelConv2D,
    "Conv2dGroups": ModelConv2DGroups,
    "Conv2dGroups2": ModelConv2DGroups2,
    "Conv3d": ModelConv3D,
    "MHA": ModelMha,
    "MlpUsingParameters": MlpUsingParameters,
}


def build_model(model_id: str) -> nn.Module:
    """A fresh base model in eval mode; the fixed seed makes every call return the same weights."""
    torch.manual_seed(SEED)
    return MODELS[model_id]().eval()


def make_inputs(model_id: str) -> Tensor:
    """PEFT's ``prepare_inputs_for_testing``: ``arange(90)`` as a (9, 10) integer tensor.

    Each model casts or reshapes it itself (the embedding model reads it as token ids < 100).
    Conv2dGroups2 needs an image batch: PEFT's ``arange(9 * 16 * 20 * 20)`` as (9, 16, 20, 20).
    """
    if model_id == "Conv2dGroups2":
        return torch.arange(9 * 16 * 20 * 20).view(9, 16, 20, 20)
    return torch.arange(90).view(9, 10)


# --- the cases: PEFT's TEST_CASES rows with config class LoraConfig -------------------------
class Case(NamedTuple):
    """One row of PEFT's ``TEST_CASES`` (config class ``LoraConfig``)."""

    name: str
    model_id: str
    kwargs: dict[str, Any]
    # The adapter_config.json key whose method lorakit does not implement, and so must refuse.
    refused_key: str | None = None


CASES = [
    Case("Vanilla MLP 1 LoRA", "MLP", {"target_modules": "lin0"}),
    Case("Vanilla MLP 2 LoRA", "MLP", {"target_modules": ["lin0"]}),
    Case("Vanilla MLP 3 LoRA", "MLP", {"target_modules": ["lin1"]}),
    Case("Vanilla MLP 4 LoRA", "MLP", {"target_modules": ["lin0", "lin1"]}),
    Case("Vanilla MLP 5 LoRA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    Case(
        "Vanilla MLP 6 LoRA",
        "MLP",
        {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1},
    ),
    Case("Vanilla MLP 7 LoRA with DoRA", "MLP", {"target_modules": ["lin0"], "use_dora": True}),
    Case(
        "Vanilla MLP 8 LoRA with DoRA",
        "MLP",
        {"target_modules": ["lin0", "lin1"], "use_dora": True},
    ),
    Case(
        "Vanilla MLP 1 LoRA with KaSA",
        "MLP",
        {"target_modules": ["lin0"], "kasa_config": KasaConfig(), "r": 4},
        refused_key="kasa_config",
    ),
    Case(
        "Vanilla MLP 1 LoRA with MiCA",
        "MLP",
        {"target_modules": ["lin0"], "init_lora_weights": "mica", "r": 4},
        refused_key="init_lora_weights",
    ),
    Case(
        "Vanilla MLP 9 LoRA with DoRA",
        "MLP",
        {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32},
    ),
    Case(
        "Vanilla MLP 10 LoRA with VeLoRA random",
        "MLP",
        {
            "target_modules": ["lin0"],
            "velora_config": VeloraConfig(num_groups=2, init_type="random"),
        },
        refused_key="velora_config",
    ),
    Case(
        "Vanilla MLP 11 LoRA with VeLoRA batch_average",
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "velora_config": VeloraConfig(num_groups=2, init_type="batch_average"),
        },
        refused_key="velora_config",
    ),
    Case(
        "Vanilla MLP 12 LoRA with VeLoRA batch_average_once",
        "MLP",
        {
            "target_modules": ["lin0"],
            "velora_config": VeloraConfig(num_groups=2, init_type="batch_average_once"),
        },
        refused_key="velora_config",
    ),
    Case("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", {"target_modules": ["conv1d"]}),
    Case("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", {"target_modules": ["emb"]}),
    Case(
        "Embedding + transformers Conv1D 3 LoRA",
        "EmbConv1D",
        {"target_modules": ["emb", "conv1d"]},
    ),
    Case(
        "Embedding + transformers Conv1D 1 DoRA",
        "EmbConv1D",
        {"target_modules": ["conv1d"], "use_dora": True},
    ),
    Case(
        "Embedding + transformers Conv1D 2 DoRA",
        "EmbConv1D",
        {"target_modules": ["emb"], "use_dora": True},
    ),
    Case(
        "Embedding + transformers Conv1D 3 DoRA",
        "EmbConv1D",
        {"target_modules": ["emb", "conv1d"], "use_dora": True},
    ),
    Case(
        "Embedding + transformers Conv1D 1 LoRA trainable_tokens",
        "EmbConv1D",
        {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}},
    ),
    Case("Conv1d LoRA", "Conv1d", {"target_modules": ["conv1d"]}),
    Case("Conv1d LoRA with DoRA", "Conv1d", {"target_modules": ["conv1d"], "use_dora": True}),
    Case("Conv2d 1 LoRA", "Conv2d", {"target_modules": ["conv2d"]}),
    Case("Conv2d 2 LoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    Case("Conv2d 1 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d"], "use_dora": True}),
    Case(
        "Conv2d 2 LoRA with DoRA",
        "Conv2d",
        {"target_modules": ["conv2d", "lin0"], "use_dora": True},
    ),
    Case("Conv2d Groups LoRA", "Conv2dGroups", {"target_modules": ["conv2d"]}),
    Case("Conv2d Groups2 LoRA", "Conv2dGroups2", {"target_modules": ["conv2d"]}),
    Case(
        "Conv2d Groups LoRA with DoRA",
        "Conv2dGroups",
        {"target_modules": ["conv2d"], "use_dora": True},
    ),
    Case(
        "Conv2d Groups2 LoRA with DoRA",
        "Conv2dGroups2",
        {"target_modules": ["conv2d"], "use_dora": True},
    ),
    Case("Conv3d 1 LoRA", "Conv3d", {"target_modules": ["conv3d"]}),
    Case("Conv3d 2 LoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"]}),
    Case("Conv3d 1 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d"], "use_dora": True}),
    Case(
        "Conv3d 2 LoRA with DoRA",
        "Conv3d",
        {"target_modules": ["conv3d", "lin0"], "use_dora": True},
    ),
    # lora_bias: a bias on lora_B. lora_alpha != r so that the scale is exercised.
    Case(
        "Vanilla MLP 1 LoRA with lora_b bias",
        "MLP",
        {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32},
    ),
    Case(
        "Conv2d 1 LoRA with lora_b bias",
        "Conv2d",
        {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32},
    ),
    Case(
        "Conv3d 1 LoRA with lora_b bias",
        "Conv3d",
        {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32},
    ),
    Case("MHA 1 LoRA", "MHA", {"target_modules": ["mha"]}),
    Case("MHA 2 LoRA", "MHA", {"target_modules": ["mha", "lin0"]}),
    # Parameters targeted directly.
    Case(
        "MLP 1 using nn.Parameter LoRA",
        "MlpUsingParameters",
        {"target_parameters": ["lin0.weight"]},
    ),
    Case(
        "MLP 2 using nn.Parameter LoRA",
        "MLP",
        {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]},
    ),
    Case(
        "Vanilla MLP 1 LoRA with Monteclora",
        "MLP",
        {"target_modules": ["lin0"], "monteclora_config": MontecloraConfig(num_samples=2)},
        refused_key="monteclora_config",
    ),
    # BD-LoRA: block-diagonal lora_A and / or lora_B.
    Case(
        "BD-LoRA A only",
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": BdLoraConfig(target_modules_bd_a=["lin0"], match_strict=False),
        },
        refused_key="use_bdlora",
    ),
    Case(
        "BD-LoRA B only",
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": BdLoraConfig(target_modules_bd_b=["lin1"], nblocks=2, match_strict=False),
        },
        refused_key="use_bdlora",
    ),
    Case(
        "BD-LoRA both A and B",
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": BdLoraConfig(
                target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=2
            ),
        },
        refused_key="use_bdlora",
    ),
]

SUPPORTED = [c for c in CASES if c.refused_key is None]
REFUSED = [c for c in CASES if c.refused_key is not None]


def _ids(cases: list[Case]) -> list[str]:
    return [c.name for c in cases]


# --- helpers ---------------------------------------------------------------------------------
def peft_config(case: Case, *, random_init: bool) -> peft.LoraConfig:
    """PEFT's config for ``case``; ``random_init`` sets ``init_lora_weights=False`` (B != 0).

    A case that chooses its own init (MiCA) keeps it. The kwargs are copied because they hold
    config objects that PEFT may keep a reference to.
    """
    kwargs = copy.deepcopy(case.kwargs)
    if random_init:
        kwargs.setdefault("init_lora_weights", False)
    return peft.LoraConfig(**kwargs)


def lorakit_config(case: Case) -> LoraConfig:
    """lorakit's config for ``case``, read from PEFT's own dict (not from lorakit's field names)."""
    return LoraConfig.from_peft_dict(peft_config(case, random_init=False).to_dict())


def perturb_trainable(model: nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    """Add N(0, scale²) noise to every trainable parameter: B leaves 0, DoRA magnitudes move."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator))


def run(model: nn.Module, model_id: str) -> Tensor:
    """The model's output on PEFT's test input, without autograd."""
    with torch.no_grad():
        return model(make_inputs(model_id))


def assert_same(actual: Tensor, expected: Tensor) -> None:
    """Equal up to float32 rounding (``ATOL``, ``RTOL``)."""
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


def assert_adapter_matters(output: Tensor, model_id: str) -> None:
    """The adapter changes the output, so that an equality check on it is not vacuous."""
    base = run(build_model(model_id), model_id)
    assert (output - base).abs().max() > 1e-3, "adapter has no effect: the test would be vacuous"


def peft_adapter(case: Case, directory: Path) -> Tensor:
    """Make PEFT's adapter for ``case`` (random init + noise), save it; return PEFT's output."""
    model = peft.get_peft_model(
        build_model(case.model_id), peft_config(case, random_init=True)
    ).eval()
    perturb_trainable(model)
    output = run(model, case.model_id)
    model.save_pretrained(directory)
    return output


def lorakit_model(case: Case) -> nn.Module:
    """The base model with lorakit's adapter for ``case`` added and perturbed (B != 0)."""
    model = build_model(case.model_id)
    add_lora(model, lorakit_config(case))
    perturb_trainable(model)
    return model.eval()


def file_layout(directory: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape in the ``adapter_model.safetensors`` under ``directory``."""
    with safe_open(directory / "adapter_model.safetensors", framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118


def peft_layout(case: Case) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape that PEFT's ``save_pretrained`` writes for ``case``."""
    model = peft.get_peft_model(build_model(case.model_id), peft_config(case, random_init=False))
    return {key: tuple(t.shape) for key, t in get_peft_model_state_dict(model).items()}


def assert_same_meaning(directory: Path, case: Case) -> None:
    """The saved adapter_config.json, read by PEFT, keeps every option the case sets."""
    saved = peft.PeftConfig.from_pretrained(directory)
    wanted = peft_config(case, random_init=False)
    for key in sorted({"r", "lora_alpha", *case.kwargs}):
        assert getattr(saved, key) == getattr(wanted, key), key


def lorakit_modules(model: nn.Module) -> list[str]:
    """Paths of modules whose class is defined in lorakit."""
    return [path for path, m in model.named_modules() if type(m).__module__.startswith("lorakit")]


# --- 1. PEFT -> lorakit ----------------------------------------------------------------------
@pytest.mark.parametrize("case", SUPPORTED, ids=_ids(SUPPORTED))
def test_peft_adapter_loads_in_lorakit(case: Case, tmp_path: Path) -> None:
    expected = peft_adapter(case, tmp_path)
    assert_adapter_matters(expected, case.model_id)

    model = build_model(case.model_id)
    load_adapter(model, tmp_path)
    assert_same(run(model.eval(), case.model_id), expected)


# --- 2. lorakit -> PEFT ----------------------------------------------------------------------
@pytest.mark.parametrize("case", SUPPORTED, ids=_ids(SUPPORTED))
def test_lorakit_adapter_loads_in_peft(case: Case, tmp_path: Path) -> None:
    model = lorakit_model(case)
    expected = run(model, case.model_id)
    assert_adapter_matters(expected, case.model_id)
    save_adapter(model, tmp_path)
    # PEFT's loader only warns about missing or unexpected tensors, and an option lorakit drops
    # can vanish from both sides unnoticed: check the file against what PEFT itself writes.
    assert file_layout(tmp_path) == peft_layout(case)
    assert_same_meaning(tmp_path, case)

    loaded = peft.PeftModel.from_pretrained(build_model(case.model_id), tmp_path).eval()
    assert_same(expected, run(loaded, case.model_id))


# PEFT before 0.22 applied a MultiheadAttention adapter's out_proj delta twice
# (huggingface/peft#3774); PEFT 0.22 reads the files those releases wrote with out_proj's B
# doubled, by the peft_version the file records. lorakit must read every such file as PEFT does.
MHA_CASE = next(c for c in SUPPORTED if c.name == "MHA 1 LoRA")


@pytest.mark.parametrize("version", ["0.21.2", "0.17.0", None, "0.21.1.dev0@abc", "0.22.0"])
def test_mha_adapter_from_an_older_peft_reads_as_peft_reads_it(version, tmp_path: Path) -> None:
    peft_adapter(MHA_CASE, tmp_path)
    config_file = tmp_path / "adapter_config.json"
    data = json.loads(config_file.read_text())
    data.pop("peft_version")
    config_file.write_text(
        json.dumps(data | ({} if version is None else {"peft_version": version}))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT says it doubled B
        expected = run(peft.PeftModel.from_pretrained(build_model("MHA"), tmp_path), "MHA")
    loaded = load_adapter(build_model("MHA"), tmp_path).eval()
    assert_same(run(loaded, "MHA"), expected)
    B = load_file(tmp_path / "adapter_model.safetensors")[
        "base_model.model.mha.base_layer.out_proj.lora_B.weight"
    ]
    doubled = version not in ("0.21.1.dev0@abc", "0.22.0")
    assert_same(loaded.mha.out_proj.lora_B["default"], (2 if doubled else 1) * B)


def test_lorakit_records_the_peft_release_its_files_are_written_for(tmp_path: Path) -> None:
    save_adapter(lorakit_model(MHA_CASE), tmp_path)
    recorded = json.loads((tmp_path / "adapter_config.json").read_text())["peft_version"]
    assert recorded == PEFT_FILE_VERSION == peft.__version__.partition("@")[0]


def test_an_mha_adapter_with_a_peft_version_that_is_no_version_is_refused(tmp_path: Path) -> None:
    peft_adapter(MHA_CASE, tmp_path)
    config_file = tmp_path / "adapter_config.json"
    data = json.loads(config_file.read_text()) | {"peft_version": "latest"}
    config_file.write_text(json.dumps(data))
    model = build_model("MHA")
    with pytest.raises(LoraError, match="peft_version='latest', not a version"):
        load_adapter(model, tmp_path)


# --- 3. merge = unmerged = unloaded ----------------------------------------------------------
@pytest.mark.parametrize("case", SUPPORTED, ids=_ids(SUPPORTED))
def test_merge_unmerge_unload_keep_outputs(case: Case) -> None:
    model = lorakit_model(case)
    expected = run(model, case.model_id)
    assert_adapter_matters(expected, case.model_id)

    merge(model)
    assert_same(run(model, case.model_id), expected)
    unmerge(model)
    assert_same(run(model, case.model_id), expected)
    model = unload(model)
    assert_same(run(model, case.model_id), expected)
    assert lorakit_modules(model) == []


# PEFT lays out a grouped conv's LoRA as a dense lora_A conv and a grouped 1x1 lora_B conv, so
# a PEFT-made delta connects channels across groups, which the grouped base weight cannot hold;
# PEFT refuses to merge it ("Merging is not supported for _ConvNd layers with groups > 1").
# lorakit may merge it exactly or refuse with LoraError, but never change the outputs.
GROUPED = [c for c in SUPPORTED if c.model_id in ("Conv2dGroups", "Conv2dGroups2")]


def merge_or_refuse(step: Callable[[nn.Module], nn.Module], model: nn.Module) -> nn.Module:
    """``step(model)``, or ``model`` itself when the step refuses with ``LoraError``."""
    try:
        return step(model)
    except LoraError:
        return model


@pytest.mark.parametrize("case", GROUPED, ids=_ids(GROUPED))
def test_merging_peft_grouped_conv_adapter_never_changes_outputs(
    case: Case, tmp_path: Path
) -> None:
    peft_adapter(case, tmp_path)
    model = load_adapter(build_model(case.model_id), tmp_path)
    expected = run(model, case.model_id)

    model = merge_or_refuse(merge, model)
    assert_same(run(model, case.model_id), expected)
    model = merge_or_refuse(unload, model)
    assert_same(run(model, case.model_id), expected)

    if lorakit_modules(model):  # unload refused to merge; dropping the adapter always works
        model = unload(model, merge=False)
        assert_same(run(model, case.model_id), run(build_model(case.model_id), case.model_id))
    assert lorakit_modules(model) == []


# --- methods lorakit does not implement: refused by name -------------------------------------
@pytest.mark.parametrize("case", REFUSED, ids=_ids(REFUSED))
def test_peft_adapter_of_other_method_is_refused(case: Case, tmp_path: Path) -> None:
    peft_adapter(case, tmp_path)
    model = build_model(case.model_id)
    with pytest.raises(LoraError, match=re.escape(case.refused_key)):
        load_adapter(model, tmp_path)
    assert lorakit_modules(model) == [], "a refused adapter must leave the model untouched"

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    with pytest.raises(LoraError, match=re.escape(case.refused_key)):
        LoraConfig.from_peft_dict(saved)


@pytest.mark.parametrize("case", REFUSED, ids=_ids(REFUSED))
def test_peft_config_of_other_method_is_refused(case: Case) -> None:
    with pytest.raises(LoraError, match=re.escape(case.refused_key)):
        lorakit_config(case)


# --- every field of peft.LoraConfig ----------------------------------------------------------
# Fields lorakit implements: a non-default value must come back unchanged in to_peft_dict()
# (what save_adapter writes), so an adapter keeps its meaning through lorakit.
IMPLEMENTED = {
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "bias",
    "init_lora_weights",
    "use_rslora",
    "modules_to_save",
    "target_parameters",
    "use_dora",
    "lora_bias",
    "trainable_token_indices",
    "base_model_name_or_path",
}
# Fields that do not change what the adapter computes: accepted, and may be dropped.
INFORMATIONAL = {
    "task_type",  # picks PEFT's wrapper class; the tensors and their names are the same
    "auto_mapping",
    "peft_version",
    "revision",  # of the base model on the Hub
    "inference_mode",
    # PEFT derives it from the layer type (forced on for GPT-2 Conv1D, off for nn.Linear);
    # so does lorakit.
    "fan_in_fan_out",
    "runtime_config",  # runtime only; PEFT does not even save it
}
# Fields PEFT itself ignores unless another option turns them on (megatron_config, use_qalora,
# or the init_lora_weights mode of the same name, all refused by lorakit): ignoring them is
# exact, refusing them is safe, so either is allowed (a refusal must name the field).
INERT = {
    "megatron_core",
    "qalora_group_size",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
}
# Every other field (peft_type other than "LORA", use_qalora, velora_config, kasa_config, ...)
# changes what the adapter computes in a way lorakit does not implement, and must be refused.

NON_DEFAULTS: dict[str, Any] = {
    "task_type": "CAUSAL_LM",
    "peft_type": "LOHA",
    "auto_mapping": {"base_model_class": "MLP", "parent_library": "__main__"},
    "peft_version": "0.99.0",
    "base_model_name_or_path": "org/some-model",
    "revision": "v2",
    "inference_mode": True,
    "r": 4,
    "target_modules": ["lin0", "lin1"],
    "exclude_modules": ["lin1"],
    "lora_alpha": 32,
    "lora_dropout": 0.1,
    "fan_in_fan_out": True,
    "bias": "all",
    "use_rslora": True,
    "modules_to_save": ["lin1"],
    "init_lora_weights": "gaussian",
    "layers_to_transform": [0, 1],
    "layers_pattern": ["layers"],
    "rank_pattern": {"lin0": 2},
    "alpha_pattern": {"lin0": 3},
    "megatron_config": {"tensor_model_parallel_size": 2},
    "megatron_core": "my_megatron.core",
    "trainable_token_indices": {"emb": [0, 10]},
    "loftq_config": {"loftq_bits": 4, "loftq_iter": 1},
    "eva_config": dataclasses.asdict(EvaConfig()),
    "corda_config": dataclasses.asdict(CordaConfig()),
    "lora_ga_config": dataclasses.asdict(LoraGAConfig()),
    "use_dora": True,
    "velora_config": dataclasses.asdict(VeloraConfig(num_groups=2)),
    "alora_invocation_tokens": [1, 2, 3],
    "use_qalora": True,
    "qalora_group_size": 32,
    "monteclora_config": dataclasses.asdict(MontecloraConfig(num_samples=2)),
    "layer_replication": [[0, 1], [0, 1]],
    "runtime_config": {"ephemeral_gpu_offload": True},
    "lora_bias": True,
    "target_parameters": ["lin1.weight"],
    "use_bdlora": dataclasses.asdict(BdLoraConfig(target_modules_bd_a=["lin0"])),
    "arrow_config": dataclasses.asdict(ArrowConfig(top_k=2)),
    "kasa_config": dataclasses.asdict(KasaConfig()),
    "ensure_weight_tying": True,
}
# Keys a non-default value needs next to it to be a valid PEFT config.
COMPANIONS: dict[str, dict[str, Any]] = {"layers_pattern": {"layers_to_transform": [0]}}

PEFT_FIELDS = [f.name for f in dataclasses.fields(peft.LoraConfig)]


def as_json(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` as ``adapter_config.json`` holds it (sets become lists, enums strings)."""
    return json.loads(json.dumps(data, default=sorted))


def peft_defaults() -> dict[str, Any]:
    """PEFT's adapter_config.json for a LoRA on ``lin0`` with every other option at its default."""
    return as_json(peft.LoraConfig(target_modules=["lin0"]).to_dict())


def non_default(field: dataclasses.Field) -> Any:
    """A value different from ``field``'s default: ``NON_DEFAULTS``, else a generic guess.

    The guess serves fields a newer PEFT adds: they must be refused until lorakit knows them.
    """
    if field.name in NON_DEFAULTS:
        return NON_DEFAULTS[field.name]
    default = field.default
    if isinstance(default, bool):
        return not default
    if isinstance(default, (int, float)):
        return default + 1
    if isinstance(default, str):
        return default + "-custom"
    return {"custom": True}


@pytest.mark.parametrize("field", dataclasses.fields(peft.LoraConfig), ids=PEFT_FIELDS)
def test_every_peft_field_round_trips_or_is_refused(field: dataclasses.Field) -> None:
    value = non_default(field)
    data = {**peft_defaults(), **COMPANIONS.get(field.name, {}), field.name: value}
    if field.name in IMPLEMENTED:
        assert LoraConfig.from_peft_dict(data).to_peft_dict()[field.name] == value
    elif field.name in INFORMATIONAL:
        LoraConfig.from_peft_dict(data)
    elif field.name in INERT:
        try:
            LoraConfig.from_peft_dict(data)
        except LoraError as err:
            assert field.name in str(err)
    else:
        with pytest.raises(LoraError, match=re.escape(field.name)):
            LoraConfig.from_peft_dict(data)


INIT_IMPLEMENTED = [True, False, "gaussian", "nora", "pissa", "olora"]
# Inits that pair the adapter with a changed base model or extra data lorakit does not reproduce.
INIT_REFUSED = ["eva", "corda", "astra", "loftq", "orthogonal", "mica", "lora_ga"]


@pytest.mark.parametrize("init", INIT_IMPLEMENTED + INIT_REFUSED)
def test_init_lora_weights_round_trips_or_is_refused(init: bool | str) -> None:
    data = {**peft_defaults(), "init_lora_weights": init}
    if init in INIT_IMPLEMENTED:
        assert LoraConfig.from_peft_dict(data).to_peft_dict()["init_lora_weights"] == init
    else:
        with pytest.raises(LoraError, match="init_lora_weights"):
            LoraConfig.from_peft_dict(data)


def test_every_peft_init_mode_is_classified() -> None:
    """A new ``init_lora_weights`` mode in PEFT must be added to one of the two lists above."""
    annotation = str(peft.LoraConfig.__dataclass_fields__["init_lora_weights"].type)
    # The quoted names of the Literal; 'pissa_niter_[number of iters]' is pissa and not matched.
    modes = set(re.findall(r"'([a-z_]+)'", annotation))
    assert modes <= set(INIT_IMPLEMENTED + INIT_REFUSED), modes - set(INIT_REFUSED)


def test_all_peft_defaults_load() -> None:
    config = LoraConfig.from_peft_dict(peft_defaults())
    assert config.to_peft_dict()["target_modules"] == ["lin0"]


@pytest.mark.parametrize("empty", [None, False, {}, []], ids=repr)
def test_unknown_key_left_empty_loads(empty: Any) -> None:
    """A key from a newer PEFT, left at an empty default, says nothing and must not block."""
    data = {**peft_defaults(), "option_from_a_newer_peft": empty}
    assert LoraConfig.from_peft_dict(data).to_peft_dict()["r"] == 8


# --- small cases ---------------------------------------------------------------------------
@pytest.mark.parametrize("targets", [{"lin0", "lin1"}, ("lin0", "lin1")], ids=["set", "tuple"])
def test_target_modules_collection_saves_as_json_list(targets: Any, tmp_path: Path) -> None:
    model = build_model("MLP")
    add_lora(model, LoraConfig(r=2, target_modules=targets))
    save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(saved, list) and sorted(saved) == ["lin0", "lin1"]
    peft.PeftModel.from_pretrained(build_model("MLP"), tmp_path)


# lin1 is Linear(20, 2): r=32 is above min(in, out) = 2, so the adapter is over-parameterised
# but still a valid LoRA; PEFT allows it and lorakit must read and write it (with a warning).
RANK_ABOVE_MIN = {"target_modules": ["lin1"], "r": 32, "lora_alpha": 16}


def test_rank_above_min_dim_loads_peft_adapter(tmp_path: Path) -> None:
    case = Case("rank above min(in, out)", "MLP", RANK_ABOVE_MIN)
    expected = peft_adapter(case, tmp_path)
    model = build_model("MLP")
    load_adapter(model, tmp_path)
    assert_same(run(model, "MLP"), expected)


def test_rank_above_min_dim_warns_and_saves_for_peft(tmp_path: Path) -> None:
    model = build_model("MLP")
    with pytest.warns(UserWarning):
        add_lora(model, lorakit_config(Case("rank above min(in, out)", "MLP", RANK_ABOVE_MIN)))
    perturb_trainable(model)
    expected = run(model, "MLP")
    save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(build_model("MLP"), tmp_path).eval()
    assert_same(run(loaded, "MLP"), expected)
