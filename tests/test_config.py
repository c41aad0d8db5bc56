from __future__ import annotations

import pytest

from mc_vllm.core.config import ConfigError, MCConfig


def test_defaults_follow_design():
    c = MCConfig()
    assert (c.block_size, c.w_max, c.n_diff, c.cooldown) == (32, 8192, 4, 2)
    assert (c.tau_expand, c.tau_collapse, c.refocus_every, c.gist_levels) == (0.2, 0.2, 32, 2)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("w_max", 64),
        ("w_max", "big"),
        ("block_size", 16),
        ("tau_expand", 1.5),
        ("tau_collapse", -0.1),
        ("cooldown", -1),
        ("n_diff", 1),
        ("gist_levels", 0),
        ("position_mode", "relative"),
        ("gist_timing", "never"),
        ("refocus_every", 16),
        ("prompt_refocus_rounds", 1),  # fewer than gist_levels: a LOD2 gist never reaches raw
        ("prompt_refocus_rounds", 33),
        ("prompt_refocus_rounds", 2.5),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"MCConfig\.{field}="):
        MCConfig(**{field: value})


def test_from_dict_rejects_unknown_keys():
    assert MCConfig.from_dict({"w_max": 2048}).w_max == 2048
    with pytest.raises(ConfigError, match="wmax"):
        MCConfig.from_dict({"wmax": 2048})


def test_prompt_refocus_rounds_feed_the_prompt_end_one_token_each():
    from mc_vllm.core.allocator import prompt_refocus_points

    assert MCConfig().prompt_refocus_rounds == 4
    assert prompt_refocus_points(1000, 256, 4) == [996, 997, 998, 999]
    assert prompt_refocus_points(256, 256, 4) == []  # fits W_max: nothing to expand
