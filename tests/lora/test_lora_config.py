import math

import pytest

from lorakit import ConfigError, LoraConfig


def test_defaults_are_the_papers_setting():
    cfg = LoraConfig()
    assert (cfg.r, cfg.targets, cfg.init) == (8, ("q", "v"), "gaussian")
    assert cfg.scaling_for("x") == pytest.approx(16 / 8)
    assert cfg.std_for("x") == pytest.approx(1 / 8)


def test_rslora_scaling_uses_sqrt_r():
    cfg = LoraConfig(r=16, alpha=8, use_rslora=True)
    assert cfg.scaling_for("any") == pytest.approx(8 / math.sqrt(16))


def test_patterns_override_rank_and_alpha_by_suffix():
    cfg = LoraConfig(r=8, alpha=16, rank_pattern={"v_proj": 4, r"layers\.1\..*q_proj": 2}, alpha_pattern={"v_proj": 2})
    assert cfg.rank_for("model.layers.0.self_attn.v_proj") == 4
    assert cfg.rank_for("model.layers.1.self_attn.q_proj") == 2
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 8
    assert cfg.scaling_for("model.layers.0.self_attn.v_proj") == pytest.approx(2 / 4)
    # "proj" is not a dotted suffix of "q_proj": PEFT's rule needs the pattern to cover a whole name piece.
    assert LoraConfig(rank_pattern={"proj": 2}).rank_for("a.q_proj") == 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"alpha": float("inf")}, "alpha must be"),  # any finite alpha is PEFT-legal
        ({"dropout": 1.0}, "dropout"),
        ({"init": "uniform"}, "init must be"),
        ({"bias": "some"}, "bias must be"),
        ({"targets": ()}, "targets is empty"),
        ({"rank_pattern": {"q": 0}}, "rank_pattern"),
        ({"rank_pattern": {"(": 2}}, "not a valid regular expression"),
    ],
)
def test_bad_values_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**kwargs)


def test_round_trip_and_unknown_keys():
    cfg = LoraConfig(r=4, targets="q, v ,o", modules_to_save=["classifier"])
    assert cfg.targets == ("q", "v", "o")
    assert LoraConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"unknown LoraConfig field.*rank"):
        LoraConfig.from_dict({"rank": 4})
