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
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"MCConfig\.{field}="):
        MCConfig(**{field: value})


def test_from_dict_rejects_unknown_keys():
    assert MCConfig.from_dict({"w_max": 2048}).w_max == 2048
    with pytest.raises(ConfigError, match="wmax"):
        MCConfig.from_dict({"wmax": 2048})
