"""KV page layout bookkeeping (pure Python, no engine) and the version gate."""

from __future__ import annotations

import pytest

from mc_vllm.vllm.compat import UnsupportedVLLMVersion, check_version
from mc_vllm.vllm.layout import KVLayout, gist_slot, token_slot


def test_version_gate():
    assert check_version("0.32.0") == check_version("0.32.3")
    for bad in ("0.31.9", "0.33.0", "0.320.1", "1.0.0"):
        with pytest.raises(UnsupportedVLLMVersion, match="supports vLLM 0.32.x"):
            check_version(bad)


def fill(lay: KVLayout, contents, pages):
    lay.pending += contents
    lay.tail_pages += pages
    lay.computed(len(contents))


def test_seal_aligned_block_is_free_and_misaligned_is_copied():
    lay = KVLayout(retained_cap=2)
    fill(lay, [token_slot(i, 100 + i) for i in range(32)], [7])
    edit = lay.seal(0, fresh_page=lambda: 99)
    assert lay.lod0 == [(0, 7)] and edit.copies == [] and not edit.table_changed
    # a gist sits before the next block's tokens: sealing needs a fresh page and copies
    fill(lay, [gist_slot((1, 5))] + [token_slot(32 + i, i) for i in range(32)], [8, 9])
    edit = lay.seal(1, fresh_page=lambda: 42)
    assert lay.lod0[-1] == (1, 42)
    assert edit.copies[:32] == [(8 * 32 + 1 + i, 42 * 32 + i) for i in range(32)]
    assert lay.tail == [gist_slot((1, 5))] and lay.tail_pages == [8] and edit.freed == [9]


def test_remove_tail_slots_compacts_with_few_copies():
    lay = KVLayout(retained_cap=0)
    fill(lay, [gist_slot((1, i)) for i in range(40)], [3, 4])
    edit = lay.remove_contents({gist_slot((1, 0)), gist_slot((1, 5))})
    # the two last slots move into the two holes; nothing else moves
    assert len(lay.tail) == 38 and edit.copies == [(4 * 32 + 6, 3 * 32 + 0), (4 * 32 + 7, 3 * 32 + 5)]
    assert gist_slot((1, 38)) == lay.tail[0] and gist_slot((1, 39)) == lay.tail[5]
    assert edit.freed == [] and lay.tail_pages == [3, 4]


def test_collapse_retains_then_drops_and_expand_recomputes():
    lay = KVLayout(retained_cap=1)
    lay.lod0 = [(0, 10), (1, 11), (2, 12)]
    lay.collapse_block(0)
    e = lay.collapse_block(1)
    assert e.freed == [10] and dict(lay.retained) == {1: 11}
    assert lay.pending == [gist_slot((1, 1)), gist_slot((1, 0))]
    lay.computed(2)
    lay.tail_pages = [20]
    _, recomputed = lay.expand_block(1, list(range(32)))
    assert not recomputed and (1, 11) in lay.lod0 and lay.tail == [gist_slot((1, 0))]
    _, recomputed = lay.expand_block(0, list(range(32)))
    assert recomputed and lay.pending[0] == token_slot(0, 0) and lay.tail == []


def test_request_options_and_engine_defaults():
    from mc_vllm.core.config import ConfigError, MCConfig
    from mc_vllm.vllm.options import (
        EngineOptions,
        FrontEndLimits,
        request_options,
        validate_request,
    )

    opts = EngineOptions.from_additional_config({"megacontext": {"w_max": 2048, "retained_cap": 3}})
    assert opts.defaults.w_max == 2048 and opts.retained_cap == 3
    assert request_options({"temperature_hint": 1}, opts.defaults) is None  # plain request
    cfg = request_options({"mc_w_max": 512, "mc_position_mode": "absolute"}, opts.defaults)
    assert cfg == MCConfig(w_max=512, position_mode="absolute")
    with pytest.raises(ConfigError, match="wmax"):
        request_options({"mc_wmax": 512}, opts.defaults)
    assert EngineOptions.from_additional_config(
        {"megacontext": {"gist_timing": "seal"}}).defaults.gist_timing == "seal"
    def lim(n: int) -> FrontEndLimits:
        return FrontEndLimits(max_model_len=n, vocab_size=2048, max_position=None)

    with pytest.raises(ValueError, match="max_model_len >= "):
        validate_request({"mc": 1}, 16, {"megacontext": {"w_max": 2048}}, lim(1024))
    with pytest.raises(ValueError, match="mc_prompt"):
        validate_request({"mc_prompt": [1, -2]}, 16, None, lim(9000))
    with pytest.raises(ValueError, match="prompt_logprobs"):
        validate_request({"mc": 1}, 16, None, lim(9000), prompt_logprobs=1)
    with pytest.raises(RuntimeError, match="coarsest"):
        validate_request({"mc_prompt": [5] * 300_000, "mc_w_max": 256}, 16, None, lim(9000))


def test_plugin_refuses_other_vllm_versions(monkeypatch):
    import vllm

    from mc_vllm.vllm import compat, plugin

    monkeypatch.setattr(vllm, "__version__", "0.33.1")
    compat.patches.cache_clear()
    try:
        with pytest.raises(UnsupportedVLLMVersion, match=r"0\.32\.x.*0\.33\.1"):
            plugin.register()
    finally:
        compat.patches.cache_clear()
