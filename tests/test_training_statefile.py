"""Training state in safetensors: the tree comes back exactly, and a damaged file is a LoraError."""

import os
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit import LoraError
from lorakit.training.statefile import load_tree, save_tree


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def test_an_optimizer_and_rng_state_round_trip_exactly(tmp_path):
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    tree = {
        "optimizer": optimizer.state_dict(),  # int keys, tuples, tensors, floats
        "python_rng": random.getstate(),  # must come back as tuples for random.setstate
        "torch_rng": torch.get_rng_state(),
        "step": 7,
        "nothing": None,
        "ratio": float("inf"),
    }
    save_tree(tree, tmp_path / "state.safetensors")
    back = load_tree(tmp_path / "state.safetensors")
    assert _same(tree, back)
    random.setstate(back["python_rng"])
    fresh = torch.optim.AdamW(model.parameters(), lr=1.0)
    fresh.load_state_dict(back["optimizer"])
    assert fresh.param_groups[0]["betas"] == (0.8, 0.9)


leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**62), 2**62),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.builds(lambda n: torch.arange(n, dtype=torch.float32), st.integers(0, 4)),
)
trees = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(max_size=4), st.integers(0, 9)), inner, max_size=3),
    ),
    max_leaves=12,
)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tree=trees)
def test_any_tree_round_trips(tmp_path, tree):
    save_tree(tree, tmp_path / "t.safetensors")
    assert _same(tree, load_tree(tmp_path / "t.safetensors"))


def _saved(tmp_path):
    path = tmp_path / "state.safetensors"
    save_tree({"step": 3, "w": torch.ones(8)}, path)
    return path


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cut=st.integers(0, 200), flips=st.lists(st.integers(0, 10_000), max_size=4))
def test_a_damaged_file_gives_a_lora_error_or_a_tree(tmp_path, cut, flips):
    path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    for index in flips:
        data[index % len(data)] ^= 0xFF
    path.write_bytes(bytes(data[: len(data) - cut]))
    try:
        load_tree(path)
    except LoraError as err:
        assert str(path) in str(err) and "Resume from another checkpoint" in str(err)


def test_missing_file_and_foreign_safetensors_are_lora_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(LoraError, match="not a readable lorakit training state"):
        load_tree(tmp_path / "absent.safetensors")
    save_file({"x": torch.ones(2)}, tmp_path / "plain.safetensors")  # no tree in its metadata
    with pytest.raises(LoraError, match="plain.safetensors is not a readable"):
        load_tree(tmp_path / "plain.safetensors")


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_a_state_file_has_the_mode_of_the_umask_not_owner_only(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_tree({"step": 1, "t": torch.zeros(2)}, tmp_path / "state.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "state.safetensors").stat().st_mode & 0o777 == mode
