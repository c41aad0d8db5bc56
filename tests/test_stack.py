"""A model's shipped MegaContext stack (``megacontext.json``) fills what the user left
unset, and a broken one is named."""

from __future__ import annotations

import json

import pytest

from mc_vllm.core.config import ConfigError
from mc_vllm.core.stack import read_stack, with_stack


def _model(tmp_path, stack):
    d = tmp_path / "m"
    (d / "megacontext" / "gistnet").mkdir(parents=True)
    (d / "megacontext" / "lensnet").mkdir(parents=True)
    (d / "megacontext.json").write_text(json.dumps(stack) if isinstance(stack, dict) else stack)
    return d


def test_stack_fills_unset_options_and_the_user_wins(tmp_path):
    d = _model(tmp_path, {"gistnet": "megacontext/gistnet", "lensnet": "megacontext/lensnet",
                          "megacontext": {"w_max": 256}})
    merged = with_stack({}, d)
    assert merged == {"gistnet": str((d / "megacontext/gistnet").resolve()),
                      "lensnet": str((d / "megacontext/lensnet").resolve()), "w_max": 256}
    mine = with_stack({"w_max": 512, "lensnet": "/my/lens"}, d)
    assert mine["w_max"] == 512 and mine["lensnet"] == "/my/lens"
    assert mine["gistnet"] == merged["gistnet"]


def test_no_stack_changes_nothing(tmp_path, tiny_model_dir):
    assert read_stack("meta-llama/Llama-3.2-1B") is None  # a hub id: nothing local to read
    assert read_stack(tiny_model_dir) is None
    assert with_stack({"w_max": 512}, tiny_model_dir) == {"w_max": 512}


@pytest.mark.parametrize("stack, match", [
    ("{not json", "unreadable"),
    ({"gistnet": "megacontext/missing"}, "no such directory"),
    ({"lensnet": "megacontext/lensnet", "bogus": 1}, "expected an object with keys"),
    ({"megacontext": [1]}, "megacontext must be an object"),
])
def test_a_broken_stack_is_named(tmp_path, stack, match):
    d = _model(tmp_path, stack)
    with pytest.raises(ConfigError, match=match) as e:
        read_stack(d)
    assert "megacontext.json" in str(e.value)
