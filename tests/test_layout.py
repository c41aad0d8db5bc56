"""KV page layout bookkeeping (pure Python, no engine) and the version gate."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mc_vllm.vllm.compat import UnsupportedVLLMVersion, check_version
from mc_vllm.vllm.layout import KVLayout, gist_slot, seal_gist_slot, token_slot


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


def _recount_sealable(lay: KVLayout) -> list[int]:
    counts: dict[int, int] = {}
    for level, index, _ in lay.tail:
        if level == 0:
            counts[index // 32] = counts.get(index // 32, 0) + 1
    return sorted(b for b, n in counts.items() if n == 32)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("tcsxep"), st.integers(0, 10**6)), max_size=60))
def test_sealable_blocks_stay_in_step_with_every_tail_edit(ops):
    """The per-block token counts behind sealable_blocks follow appends, seals (aligned and
    copied), collapses of sealed and unsealed blocks, expands, seal-gist pops and
    preemption: always what a full scan of the tail finds."""
    lay = KVLayout(retained_cap=1)
    pages = iter(range(1000, 10**6))
    hist = 0
    blocks: dict[int, list[int]] = {}
    for op, r in ops:
        if op == "t":  # new tokens (a block that completes may queue its seal-time gist)
            for _ in range(1 + r % 40):
                lay.pending.append(token_slot(hist, hist % 97))
                blocks.setdefault(hist // 32, []).append(hist % 97)
                hist += 1
                if hist % 32 == 0 and r % 3 == 0:
                    lay.pending.append(seal_gist_slot(hist // 32 - 1))
        elif op == "c" and lay.pending:
            lay.computed(1 + r % len(lay.pending))
        elif op == "s" and lay.sealable_blocks():
            lay.seal(lay.sealable_blocks()[0], lambda: next(pages))
        elif op == "x":  # collapse a sealed block, or one whose tokens sit in the tail
            cands = sorted({b for b, _ in lay.lod0} | set(lay._tail_tokens))
            if cands:
                lay.collapse_block(cands[r % len(cands)])
        elif op == "e":
            gists = [c[1] for c in lay.tail if c[0] == 1 and c[2] == -1]
            if gists:
                b = gists[r % len(gists)]
                lay.expand_block(b, blocks[b])
        elif op == "p":
            if r % 2:
                lay.pop_seal_gist()
            else:
                lay.reset_after_preemption(lambda b: blocks[b])
        while len(lay.tail_pages) * 32 < len(lay.tail):  # vLLM's allocation, in the test
            lay.tail_pages.append(next(pages))
        assert lay.sealable_blocks() == _recount_sealable(lay)
