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
