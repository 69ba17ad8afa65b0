"""TrainConfig at our boundary: every field of the right type and range, YAML scalars coerced,
and any YAML a user can write gives a config or a LoraError."""

from __future__ import annotations

import dataclasses
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit import LoraError
from lorakit.training.config import TrainConfig, config_fields, resolve_config


def test_yaml_scientific_notation_without_a_dot_is_a_number(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 as the string "1e-3"; so does a careless API caller.
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-3\nrank: '8'\nepochs: 2\nseq_len: 1e3\n")
    assert isinstance(yaml.safe_load(path.read_text())["lr"], str)
    config = resolve_config(path, {"data": "x.jsonl"})
    assert (config.lr, config.rank, config.epochs, config.seq_len) == (1e-3, 8, 2.0, 1000)
    assert type(config.rank) is int and type(config.epochs) is float


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lr": math.inf}, "lr must be a finite number, got inf"),
        ({"lr": "nan"}, "lr must be a finite number, got 'nan'"),
        ({"lr": 1e39}, "lr must be at most 3.403e+38, got 1e+39"),
        ({"epochs": math.inf}, "epochs must be a finite number, got inf"),
        ({"epochs": 0, "max_steps": 5}, "epochs must be positive, got 0.0"),
        ({"weight_decay": -1}, "weight_decay must be 0 or more, got -1.0"),
        ({"max_grad_norm": -0.5}, "max_grad_norm must be 0 or more, got -0.5"),
        ({"alpha": 0}, "alpha must be positive, got 0.0"),
        ({"rank": 2.5}, "rank must be an integer, got 2.5"),
        ({"rank": "eight"}, "rank must be an integer, got 'eight'"),
        ({"rank": True}, "rank must be an integer, got True"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"seed": -1}, "seed must be in [0, 2**63), got -1"),
        ({"packing": "yes"}, "packing must be true or false, got 'yes'"),
        ({"targets": 5}, "targets must be a list of names (or one comma-separated string), got 5"),
        ({"targets": ["q_proj", 3]}, "targets must be a list of names"),
        ({"model": 7}, "model must be text, got 7"),
        ({"dropout": 1.0}, "dropout must be in [0, 1), got 1.0"),
        ({"schedule": "step"}, "schedule must be one of cosine, linear, constant, got 'step'"),
    ],
)
def test_bad_values_are_refused_by_name(changes, message):
    with pytest.raises(LoraError, match="Invalid training config") as caught:
        TrainConfig(**changes)
    assert message in str(caught.value)


def test_every_problem_is_listed_at_once():
    with pytest.raises(LoraError) as caught:
        TrainConfig(lr=-1, rank=0, dropout=2)
    assert str(caught.value).count("\n  - ") == 3


def _any_value():
    anything = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**20), 10**20),
        st.floats(),
        st.text(max_size=12),
        st.lists(st.one_of(st.text(max_size=6), st.integers()), max_size=3),
        st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    )
    numeric_text = st.sampled_from(["1e-3", "8", " 2 ", "inf", "-0", "1e400", "0x10", ""])
    return st.one_of(anything, numeric_text)


FIELDS = [f.name for f in config_fields() if f.name not in ("data", "tasks", "resume")]


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_yaml_gives_a_config_or_a_lora_error(tmp_path, data):
    names = data.draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True))
    values = {name: data.draw(_any_value()) for name in names}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    try:
        config = resolve_config(path, {"data": "x.jsonl"})
    except LoraError:
        return
    for f in dataclasses.fields(config):  # what was accepted is of the annotated type
        value = getattr(config, f.name)
        kind = str(f.type).removesuffix(" | None")
        if value is None and str(f.type).endswith("| None"):
            continue
        expected = {"int": int, "float": float, "bool": bool, "str": str, "list[str]": list}[kind]
        assert type(value) is expected, (f.name, value)
        if expected is float:
            assert math.isfinite(value)


@pytest.mark.parametrize(
    "text",
    ["lr: [1, 2", "- just\n- a list", "lr: !!python/object/apply:os.system ['true']", "\x00"],
)
def test_broken_or_hostile_yaml_is_a_lora_error(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(LoraError, match=str(path)):
        resolve_config(path)


def test_the_resume_rule_names_what_a_resume_may_not_change():
    from lorakit.training.config import resume_conflicts

    saved = TrainConfig(data="a.jsonl", rank=4).to_dict()
    del saved["dropout"]  # a setting added since the run started: it ran with the default
    flags = {"rank": 8, "output": "elsewhere", "save_every": 5, "lr": saved["lr"], "seed": 3}
    assert resume_conflicts(saved, flags) == ["rank", "seed"]  # in the order given
    assert resume_conflicts(saved, {"dropout": 0.05}) == []  # the default it ran with
    assert resume_conflicts(saved, {"dropout": 0.1}) == ["dropout"]
    assert resume_conflicts(saved, {"batch_size": 4}) == ["batch_size"]
    assert resume_conflicts(saved, {"batch_size": 4}, batch_size_free=True) == []
    whole = TrainConfig(data="a.jsonl", rank=4, max_steps=9).to_dict()
    assert resume_conflicts({**saved, "gone": 1}, whole) == ["max_steps", "gone"]


# --- bounded messages, --overwrite ---------------------------------------------------------------
@pytest.mark.parametrize(
    "changes",
    [
        {"rank": ["x"] * 10**6},
        {"lr": {"k" * 10**6: 1}},
        {"schedule": "s" * 10**6},
        {"tasks": ["=" + "f" * 10**6]},
    ],
)
def test_refusals_never_show_an_unbounded_value(changes):
    with pytest.raises(LoraError) as caught:
        TrainConfig(**changes)
    assert len(str(caught.value)) < 400, str(caught.value)[:500]


def test_a_yaml_of_many_unknown_keys_gets_a_short_message(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("".join(f"key{i}{'x' * 200}: 1\n" for i in range(5000)))
    with pytest.raises(LoraError, match=r"Unknown config keys in .*\.\.\. and 4995 more\.") as e:
        resolve_config(path)
    assert len(str(e.value)) < 2000


def test_overwrite_is_a_flag_refused_with_resume_and_never_resumed(tmp_path):
    from lorakit.cli import build_parser

    args = build_parser().parse_args(["train", "--overwrite"])
    assert args.overwrite is True
    with pytest.raises(LoraError, match="--overwrite replaces the run that --resume continues"):
        TrainConfig(data="a.jsonl", resume="runs/a", overwrite=True)
    # A run started with --overwrite resumes without it: it belongs to the start only.
    from lorakit.training.config import resumed_config
    from lorakit.training.run_folder import STATE_FILE, write_run_config
    from lorakit.training.statefile import save_tree

    step = tmp_path / "run" / "checkpoints" / "step-2"
    step.mkdir(parents=True)
    save_tree({"step": 2, "trainable": {}, "optimizer": {}, "world_size": 1}, step / STATE_FILE)
    write_run_config(TrainConfig(data="a.jsonl", overwrite=True).to_dict(), step)
    config = resumed_config({"resume": str(tmp_path / "run")})
    assert (config.overwrite, config.resume, config.output) == (
        False,
        str(tmp_path / "run"),
        str(tmp_path / "run"),
    )
