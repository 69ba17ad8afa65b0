"""LoraConfig validation and its PEFT JSON form."""

import math

import pytest
from peft import LoraConfig as PeftLoraConfig

from lorakit import LoraConfig, LoraError
from lorakit.config import FileFacts, alpha_for_scale, lora_scale


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"r": 0}, "r must be a positive integer, got 0"),
        ({"r": 2.5}, "r must be a positive integer"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"bias": "some"}, "bias must be one of"),
        ({"init": "xavier"}, "init must be one of"),
        ({"target_modules": None}, "nothing to adapt"),
        ({"rank_pattern": {"v_proj": 0}}, r"rank_pattern\['v_proj'\] must be a positive integer"),
        ({"fused_slices": {"c_attn": [False, False]}}, "at least one True"),
        ({"target_modules": ".*proj", "layers_to_transform": [0]}, "layers_to_transform needs"),
    ],
)
def test_invalid_values_raise(kwargs, message):
    args = {"target_modules": ["q_proj"], **kwargs}
    with pytest.raises(LoraError, match=message):
        LoraConfig(**args)


def test_all_problems_in_one_error():
    with pytest.raises(LoraError) as err:
        LoraConfig(r=-1, dropout=2.0, bias="x", target_modules=["q"])
    assert str(err.value).count("\n  - ") == 3


def test_scale_rules():
    cfg = LoraConfig(
        r=8, alpha=16, target_modules=["q"], rank_pattern={"v_proj": 4}, alpha_pattern={"v_proj": 2}
    )
    assert cfg.scale_for("model.layers.0.q") == 2.0
    assert cfg.scale_for("model.layers.0.v_proj") == 0.5
    rs = LoraConfig(r=16, alpha=8, target_modules=["q"], use_rslora=True)
    assert rs.scale_for("q") == 2.0


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("r", [1, 3, 8, 48])
def test_alpha_for_scale_inverts_the_scale_rule(r, rslora):
    assert lora_scale(5.0, r, rslora) == pytest.approx(5.0 / (math.sqrt(r) if rslora else r))
    assert lora_scale(alpha_for_scale(0.3, r, rslora), r, rslora) == pytest.approx(0.3)
    assert alpha_for_scale(lora_scale(5.0, r, rslora), r, rslora) == pytest.approx(5.0)


@pytest.mark.parametrize("rslora", [False, True])
def test_a_weight_init_adapter_is_saved_at_rank_2r_with_every_scale_kept(rslora):
    cfg = LoraConfig(
        r=4,
        alpha=8,
        target_modules=["q", "v"],
        init="pissa",
        use_rslora=rslora,
        rank_pattern={"v": 2},
        alpha_pattern={"v": 3.0},
    )
    saved = cfg.on_original_weight()
    assert (saved.r, saved.init, saved.rank_pattern) == (8, "kaiming", {"v": 4})
    for path in ("a.q", "a.v"):
        assert saved.scale_for(path) == pytest.approx(cfg.scale_for(path))
    plain = LoraConfig(r=4, target_modules=["q"])
    assert plain.on_original_weight() is plain


def test_the_file_json_is_the_config_plus_what_the_model_adds():
    cfg = LoraConfig(
        r=2, alpha=4, target_modules=["q", "v"], exclude_modules=["skip"], alpha_pattern={"v": 1}
    )
    facts = FileFacts(
        base_model="/models/base",
        task_type="CAUSAL_LM",
        fan_in_fan_out=True,
        ranks={"blk.q": 6},  # a fused pair three times as wide: scale 4 / 2 kept at rank 6
        scales={"blk.q": 2.0},
    )
    data = cfg.to_peft_file(facts)
    assert list(data) == list(cfg.to_peft_dict())  # PEFT's keys, in the same order
    assert data["base_model_name_or_path"] == "/models/base" and data["task_type"] == "CAUSAL_LM"
    assert data["fan_in_fan_out"] is True
    assert data["rank_pattern"] == {r"blk\.q": 6}
    assert data["alpha_pattern"] == {r"blk\.q": 12.0, "v": 1}  # exact paths first
    assert data["exclude_modules"] == r"(?:(?:.*\.)?(?:skip))(?:\..*)?"  # the whole subtree
    back = LoraConfig.from_peft_dict(data)
    assert back.scale_for("blk.q") == lora_scale(12.0, 6, False) == cfg.scale_for("blk.q")
    recorded = cfg.replace(base_model_name_or_path="org/base").to_peft_file(FileFacts())
    assert recorded["base_model_name_or_path"] == "org/base"  # the config's, when no fact


def test_peft_json_round_trip_and_peft_accepts_it():
    cfg = LoraConfig(
        r=4,
        alpha=8,
        dropout=0.1,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        bias="lora_only",
        init="gaussian",
        use_rslora=True,
        modules_to_save=["score"],
    )
    data = cfg.to_peft_dict()
    assert (
        data["lora_alpha"] == 8
        and data["lora_dropout"] == 0.1
        and data["init_lora_weights"] == "gaussian"
    )
    peft_cfg = PeftLoraConfig(**{k: v for k, v in data.items() if k != "peft_type"})
    assert peft_cfg.r == 4 and peft_cfg.rank_pattern == {"v_proj": 2}
    assert set(peft_cfg.target_modules) == {"q_proj", "v_proj"}
    back = LoraConfig.from_peft_dict(data)
    assert back == cfg
    assert LoraConfig.from_dict(cfg.to_dict()) == cfg


def test_reading_peft_features_we_lack_is_an_error():
    with pytest.raises(
        LoraError, match="kasa_config=.*does not implement|not implement: kasa_config"
    ):
        LoraConfig.from_peft_dict(
            {"peft_type": "LORA", "r": 8, "target_modules": ["q"], "kasa_config": {"a": 1}}
        )
    with pytest.raises(LoraError, match="peft_type='IA3'"):
        LoraConfig.from_peft_dict({"peft_type": "IA3", "r": 8})
    with pytest.raises(LoraError, match=r"Unknown LoraConfig keys \['rank'\]"):
        LoraConfig.from_dict({"rank": 8, "target_modules": ["q"]})
