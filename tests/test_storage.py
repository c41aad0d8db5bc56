"""Persistent history storage: round trip, torn writes, foreign files, one writer."""

from __future__ import annotations

import dataclasses
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from mc_vllm.core.storage import (
    HEADER_SIZE,
    HistoryStore,
    StorageError,
    StoreMeta,
    validate_session_id,
)

K = 32
D = 8
META = StoreMeta(embed_dim=D, dtype="float32", base_model="tiny", gist_levels=2)


def fill(store, n_blocks, rng):
    """Append n_blocks blocks with their LOD1 gists and the LOD2 gists they support."""
    toks = rng.integers(0, 1000, n_blocks * K, dtype=np.int32)
    g1 = rng.standard_normal((n_blocks, D)).astype(np.float32)
    g2 = rng.standard_normal((n_blocks // K, D)).astype(np.float32)
    store.append_blocks(toks)
    store.append_gists(1, g1)
    store.append_gists(2, g2)
    return toks, g1, g2


def counts(s):
    return s.num_blocks, s.num_gists(1), s.num_gists(2)


def rewrite_header(f, offset, value, fix_crc):
    raw = bytearray(f.read_bytes())
    raw[offset : offset + len(value)] = value
    if fix_crc:
        raw[HEADER_SIZE - 4 : HEADER_SIZE] = struct.pack("<I", zlib.crc32(raw[: HEADER_SIZE - 4]))
    f.write_bytes(bytes(raw))


# ---- round trip ------------------------------------------------------------------------


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    with HistoryStore.create(tmp_path / "s", META) as s:
        assert s.repairs == [] and counts(s) == (0, 0, 0)
        assert s.blocks().shape == (0,) and s.gists(1).shape == (0, D)
        toks, g1, g2 = fill(s, 70, rng)
        s.set_open_tokens(np.array([5, 6, 7]))
        np.testing.assert_array_equal(s.blocks(), toks)  # readable while writing
        np.testing.assert_array_equal(s.gists(2), g2)
    with HistoryStore.open(tmp_path / "s", META) as s:
        assert s.repairs == []
        assert counts(s) == (70, 70, 2)
        np.testing.assert_array_equal(s.blocks(), toks)
        np.testing.assert_array_equal(s.gists(1), g1)
        np.testing.assert_array_equal(s.gists(2), g2)
        np.testing.assert_array_equal(s.open_tokens(), [5, 6, 7])
        assert s.open_tokens().dtype == np.int32
        more = rng.integers(0, 1000, K, dtype=np.int32)
        s.append_blocks(more)
        np.testing.assert_array_equal(s.blocks()[-K:], more)


def test_reads_are_read_only_memmaps_refreshed_on_growth(tmp_path):
    rng = np.random.default_rng(1)
    with HistoryStore.create(tmp_path / "s", META) as s:
        assert not s.blocks().flags.writeable and not s.gists(2).flags.writeable  # empty
        fill(s, 3, rng)
        b = s.blocks()
        assert isinstance(b, np.memmap) and b.shape == (3 * K,)
        assert s.blocks() is b  # cached while the file did not grow
        with pytest.raises(ValueError):
            b[0] = 1
        with pytest.raises(ValueError):
            s.gists(1)[0, 0] = 1.0
        s.append_blocks(np.arange(K))
        b2 = s.blocks()
        assert b2.shape == (4 * K,) and np.array_equal(b2[-K:], np.arange(K))
        assert np.array_equal(b2[: 3 * K], b)  # the old view stays valid


def test_open_or_create(tmp_path):
    with HistoryStore.open_or_create(tmp_path / "a" / "s", META) as s:
        s.append_blocks(np.arange(K))
    with HistoryStore.open_or_create(tmp_path / "a" / "s", META) as s:
        assert s.num_blocks == 1


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_dtypes(tmp_path, dtype):
    meta = dataclasses.replace(META, dtype=dtype)
    vals = np.array([[1.0, -2.0, 0.5, 3.0, 0.0, -0.25, 8.0, 1.5]], dtype=np.float32)
    with HistoryStore.create(tmp_path / "s", meta) as s:
        s.append_blocks(np.arange(2 * K))
        s.append_gists(1, vals)
        if dtype == "bfloat16":
            s.append_gists(1, np.array([[0x3F80] * D], dtype=np.uint16))  # raw bits: 1.0
    with HistoryStore.open(tmp_path / "s", meta) as s:
        g = np.asarray(s.gists(1))
        if dtype == "bfloat16":
            assert g.dtype == np.uint16
            g = (g.astype(np.uint32) << 16).view(np.float32)
            np.testing.assert_array_equal(g, np.concatenate([vals, np.ones((1, D), np.float32)]))
        else:
            assert g.dtype == np.float16
            np.testing.assert_array_equal(g, vals)


def test_bfloat16_rounds_to_nearest_even(tmp_path):
    meta = dataclasses.replace(META, dtype="bfloat16", embed_dim=4)
    x = np.array([[1 + 2**-8, 1 + 3 * 2**-8, np.nan, np.inf]], dtype=np.float32)
    with HistoryStore.create(tmp_path / "s", meta) as s:
        s.append_blocks(np.arange(K))
        s.append_gists(1, x)
        bits = np.asarray(s.gists(1))[0]
    assert bits[0] == 0x3F80  # tie -> even (1.0)
    assert bits[1] == 0x3F82  # tie -> even (1 + 2**-6)
    assert (bits[2] & 0x7F80) == 0x7F80 and (bits[2] & 0x7F) != 0  # still a NaN
    assert bits[3] == 0x7F80


def test_ingest_one_million_tokens_in_batches(tmp_path):
    n_blocks = 1_000_000 // K  # 31,250 blocks, appended in 64k-token batches
    tokens = np.arange(n_blocks * K, dtype=np.int32) % 50_000
    with HistoryStore.create(tmp_path / "s", META) as s:
        for i in range(0, len(tokens), 1 << 16):
            s.append_blocks(tokens[i : i + (1 << 16)])
        s.append_gists(1, np.zeros((n_blocks, D), np.float32))
        s.append_gists(2, np.ones((n_blocks // K, D), np.float32))
    with HistoryStore.open(tmp_path / "s", META) as s:
        assert counts(s) == (n_blocks, n_blocks, n_blocks // K)
        b = s.blocks()
        assert isinstance(b, np.memmap)  # mapped, not loaded
        assert np.array_equal(b[-K:], tokens[-K:]) and b[123_456] == tokens[123_456]


# ---- crash safety ----------------------------------------------------------------------


@pytest.mark.parametrize("level", [0, 1, 2])
def test_torn_write_reopens_to_last_complete_record(tmp_path, level):
    rng = np.random.default_rng(1)
    with HistoryStore.create(tmp_path / "s", META) as s:
        toks, g1, g2 = fill(s, 64, rng)
        s.set_open_tokens(np.array([1, 2]))
    f = tmp_path / "s" / f"lod{level}.bin"
    os.truncate(f, f.stat().st_size - 3)  # cut inside the last record
    with HistoryStore.open(tmp_path / "s", META) as s:
        assert any(r.startswith(f"lod{level}.bin: cut a torn") for r in s.repairs)
        if level == 0:
            # block 63 is gone: its gist goes, LOD2 gist 1 loses its support, and the open
            # block (which followed block 63) is discarded
            assert counts(s) == (63, 63, 1)
            assert any("open.bin: tagged for block 64" in r for r in s.repairs)
            assert any("lod1.bin: dropped 1 gist" in r for r in s.repairs)
            assert any("lod2.bin: dropped 1 gist" in r for r in s.repairs)
            np.testing.assert_array_equal(s.blocks(), toks[: 63 * K])
            np.testing.assert_array_equal(s.gists(1), g1[:63])
            assert len(s.open_tokens()) == 0
        elif level == 1:
            # a missing gist is allowed (the tree recomputes it); LOD2 loses support
            assert counts(s) == (64, 63, 1)
            np.testing.assert_array_equal(s.gists(1), g1[:63])
            np.testing.assert_array_equal(s.open_tokens(), [1, 2])
        else:
            assert counts(s) == (64, 64, 1)
            np.testing.assert_array_equal(s.gists(2), g2[:1])
        # the repair is on disk: a second reopen is clean and agrees
        got = counts(s)
    with HistoryStore.open(tmp_path / "s", META) as s:
        assert s.repairs == [] and counts(s) == got
    assert (tmp_path / "s" / f"lod{level}.bin").stat().st_size % 4 == 0


def test_gists_beyond_support_are_dropped(tmp_path):
    # A crash can leave lod1 longer than lod0 (files are written back independently).
    with HistoryStore.create(tmp_path / "s", META) as s:
        fill(s, 40, np.random.default_rng(2))
    f0 = tmp_path / "s" / "lod0.bin"
    os.truncate(f0, HEADER_SIZE + 10 * K * 4)  # exactly 10 whole blocks
    with HistoryStore.open(tmp_path / "s", META) as s:
        assert counts(s) == (10, 10, 0)
        assert s.repairs == [
            "lod1.bin: dropped 30 gist(s) beyond the 10 that lod0.bin supports",
            "lod2.bin: dropped 1 gist(s) beyond the 0 that lod1.bin supports",
        ]


def test_discarded_open_block_is_not_revived(tmp_path):
    with HistoryStore.create(tmp_path / "s", META) as s:
        s.append_blocks(np.arange(2 * K))
        s.set_open_tokens(np.array([9, 9, 9]))  # tagged for block 2
    f0 = tmp_path / "s" / "lod0.bin"
    os.truncate(f0, f0.stat().st_size - 1)
    with HistoryStore.open(tmp_path / "s", META) as s:
        assert s.num_blocks == 1 and len(s.open_tokens()) == 0
        s.append_blocks(np.arange(K) + 100)  # history grows back to 2 blocks
    with HistoryStore.open(tmp_path / "s", META) as s:
        assert s.num_blocks == 2 and len(s.open_tokens()) == 0 and s.repairs == []


def test_sealed_open_block_is_discarded(tmp_path):
    with HistoryStore.create(tmp_path / "s", META) as s:
        s.set_open_tokens(np.arange(5))
        s.append_blocks(np.arange(K))  # the open block got sealed; no new open block saved
    with HistoryStore.open(tmp_path / "s", META) as s:
        assert s.num_blocks == 1 and len(s.open_tokens()) == 0
        assert s.repairs == ["open.bin: tagged for block 0 but the history has 1; "
                             "open block discarded"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "magic"])
def test_corrupt_open_block_is_discarded(tmp_path, damage):
    with HistoryStore.create(tmp_path / "s", META) as s:
        s.set_open_tokens(np.arange(7))
    f = tmp_path / "s" / "open.bin"
    raw = bytearray(f.read_bytes())
    if damage == "truncate":
        raw = raw[:10]
    elif damage == "flip":
        raw[-1] ^= 0x40
    else:
        raw[:4] = b"XXXX"
    f.write_bytes(bytes(raw))
    with HistoryStore.open(tmp_path / "s", META) as s:
        assert len(s.open_tokens()) == 0
        assert len(s.repairs) == 1 and s.repairs[0].startswith("open.bin: ")
    assert not f.exists()


def test_leftover_temp_files_and_interrupted_create(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    (d / "lod1.bin").write_bytes(b"half a create")  # crashed before lod0.bin existed
    (d / "open.bin").write_bytes(b"stale")
    with HistoryStore.create(d, META) as s:
        assert counts(s) == (0, 0, 0) and len(s.open_tokens()) == 0
        s.set_open_tokens(np.arange(3))
    (d / "open.bin.tmp").write_bytes(b"interrupted set_open_tokens")
    with HistoryStore.open(d, META) as s:
        assert s.repairs == ["open.bin.tmp: removed a leftover temporary file"]
        np.testing.assert_array_equal(s.open_tokens(), [0, 1, 2])
    assert not (d / "open.bin.tmp").exists()


@st.composite
def histories(draw):
    """Interleaved appends as the tree would issue them (lower level first), then cuts."""
    # b: k blocks; g/G: up to k LOD1/LOD2 gists; a: k blocks + all gists they support
    # (what the tree does); o: open block of k % K tokens; f: flush.
    ops = draw(st.lists(st.tuples(st.sampled_from("bgGaof"), st.integers(0, 70)), max_size=10))
    cuts = draw(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 4000)), max_size=3))
    return ops, cuts


@given(histories())
def test_any_truncation_reopens_to_a_consistent_prefix(tmp_path_factory, history):
    ops, cuts = history
    d = tmp_path_factory.mktemp("s")
    rng = np.random.default_rng(len(ops))
    toks = np.zeros(0, np.int32)
    g = {1: np.zeros((0, D), np.float32), 2: np.zeros((0, D), np.float32)}
    open_tag, open_toks = None, np.zeros(0, np.int32)
    with HistoryStore.create(d, META) as s:
        for op, k in ops:
            if op in "ba":
                new = rng.integers(0, 1 << 30, k * K, dtype=np.int32)
                s.append_blocks(new)
                toks = np.concatenate([toks, new])
            if op in "gGa":
                for level in (1, 2) if op == "a" else (1 if op == "g" else 2,):
                    support = len(toks) // K if level == 1 else len(g[1]) // K
                    n = support - len(g[level]) if op == "a" else min(k, support - len(g[level]))
                    new = rng.standard_normal((n, D)).astype(np.float32)
                    s.append_gists(level, new)
                    g[level] = np.concatenate([g[level], new])
            elif op == "o":
                open_toks = rng.integers(0, 1000, k % K, dtype=np.int32)
                s.set_open_tokens(open_toks)
                open_tag = len(toks) // K
            elif op == "f":
                s.flush()
    before = {lv: (d / f"lod{lv}.bin").stat().st_size - HEADER_SIZE for lv in range(3)}
    for level, cut in cuts:  # a crash: any file may lose any tail, mid-record or not
        f = d / f"lod{level}.bin"
        os.truncate(f, max(HEADER_SIZE, f.stat().st_size - cut))
    sizes = {lv: (d / f"lod{lv}.bin").stat().st_size - HEADER_SIZE for lv in range(3)}
    want0 = sizes[0] // (K * 4)
    want1 = min(sizes[1] // (D * 4), want0)
    want2 = min(sizes[2] // (D * 4), want1 // K)
    with HistoryStore.open(d, META) as s:
        assert counts(s) == (want0, want1, want2)
        np.testing.assert_array_equal(s.blocks(), toks[: want0 * K])
        np.testing.assert_array_equal(s.gists(1), g[1][:want1])
        np.testing.assert_array_equal(s.gists(2), g[2][:want2])
        event(f"LOD2 gists kept: {want2 > 0}")
        event(f"open block kept: {open_tag == want0}")
        if open_tag == want0:
            np.testing.assert_array_equal(s.open_tokens(), open_toks)
        else:
            assert len(s.open_tokens()) == 0
        if open_tag is not None and open_tag != want0:
            assert any(r.startswith("open.bin: ") for r in s.repairs)
        untouched = all(sizes[lv] == before[lv] for lv in range(3))
        if untouched and open_tag in (None, len(toks) // K):
            assert s.repairs == []


# ---- foreign or damaged headers --------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0, b"XXXXXXXX", "bad magic b'XXXXXXXX', not a mc_vllm history file"),
        (12, (2).to_bytes(4, "little"), "header checksum"),  # the level field, CRC not fixed
        (40, b"Z", "header checksum"),
        (HEADER_SIZE - 10, b"\1", "header checksum"),  # padding is covered too
        (HEADER_SIZE - 2, b"\xff", "header checksum"),  # the CRC itself
    ],
)
def test_corrupt_header_is_refused(tmp_path, offset, value, message):
    HistoryStore.create(tmp_path / "s", META).close()
    rewrite_header(tmp_path / "s" / "lod1.bin", offset, value, fix_crc=False)
    with pytest.raises(StorageError, match=f"lod1.bin: {message}"):
        HistoryStore.open(tmp_path / "s", META)


def test_wrong_version_is_refused(tmp_path):
    HistoryStore.create(tmp_path / "s", META).close()
    # named even when the CRC does not match (a newer format may checksum differently)
    for fix_crc in (True, False):
        rewrite_header(tmp_path / "s" / "lod0.bin", 8, struct.pack("<I", 99), fix_crc)
        with pytest.raises(StorageError, match="lod0.bin: format version is 99, expected 1"):
            HistoryStore.open(tmp_path / "s", META)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"embed_dim": 16}, "embedding dim is 8, expected 16"),
        ({"base_model": "other"}, "base-model id is 'tiny', expected 'other'"),
        ({"dtype": "float16"}, "dtype is 'float32', expected 'float16'"),
        ({"block_size": 16}, "block size is 32, expected 16"),
        ({"gist_levels": 1}, "gist levels is 2, expected 1"),
    ],
)
def test_wrong_meta_is_refused(tmp_path, change, message):
    HistoryStore.create(tmp_path / "s", META).close()
    with pytest.raises(StorageError, match=f"lod0.bin: {message}"):
        HistoryStore.open(tmp_path / "s", dataclasses.replace(META, **change))
    HistoryStore.open(tmp_path / "s", META).close()  # a refused open released the lock


def test_wrong_level_is_refused(tmp_path):
    HistoryStore.create(tmp_path / "s", META).close()
    d = tmp_path / "s"
    (d / "lod2.bin").write_bytes((d / "lod1.bin").read_bytes())
    with pytest.raises(StorageError, match="lod2.bin: level is 1, expected 2"):
        HistoryStore.open(d, META)


def test_short_or_missing_files_are_refused(tmp_path):
    with pytest.raises(StorageError, match="no history store here"):
        HistoryStore.open(tmp_path / "nothing", META)
    HistoryStore.create(tmp_path / "s", META).close()
    os.truncate(tmp_path / "s" / "lod2.bin", 100)
    with pytest.raises(StorageError, match="lod2.bin: header truncated"):
        HistoryStore.open(tmp_path / "s", META)
    (tmp_path / "s" / "lod2.bin").unlink()
    with pytest.raises(StorageError, match="lod2.bin: missing"):
        HistoryStore.open(tmp_path / "s", META)


@given(level=st.integers(0, 2), pos=st.integers(0, HEADER_SIZE - 1), xor=st.integers(1, 255))
def test_any_header_byte_flip_is_refused(tmp_path_factory, level, pos, xor):
    d = tmp_path_factory.mktemp("s")
    HistoryStore.create(d, META).close()
    f = d / f"lod{level}.bin"
    raw = bytearray(f.read_bytes())
    raw[pos] ^= xor
    f.write_bytes(bytes(raw))
    with pytest.raises(StorageError, match=f"lod{level}.bin: "):
        HistoryStore.open(d, META)


def test_meta_is_validated():
    with pytest.raises(ValueError, match="dtype"):
        StoreMeta(embed_dim=8, dtype="int8", base_model="m", gist_levels=2)
    with pytest.raises(ValueError, match="base_model"):
        StoreMeta(embed_dim=8, dtype="float32", base_model="é" * 97, gist_levels=2)
    with pytest.raises(ValueError, match="embed_dim"):
        StoreMeta(embed_dim=0, dtype="float32", base_model="m", gist_levels=2)
    long_ok = StoreMeta(embed_dim=8, dtype="float32", base_model="é" * 96, gist_levels=2)
    assert len(long_ok.base_model.encode()) == 192


# ---- writer discipline and argument checks ---------------------------------------------


def test_one_writer(tmp_path):
    s = HistoryStore.create(tmp_path / "s", META)
    with pytest.raises(StorageError, match="is open by another writer"):
        HistoryStore.open(tmp_path / "s", META)
    with pytest.raises(StorageError, match="is open by another writer"):
        HistoryStore.open_or_create(tmp_path / "s", META)
    s.close()
    s.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        s.append_blocks(np.arange(K))
    HistoryStore.open(tmp_path / "s", META).close()
    with pytest.raises(StorageError, match="already holds a history store"):
        HistoryStore.create(tmp_path / "s", META)


def test_append_arguments_are_checked(tmp_path):
    with HistoryStore.create(tmp_path / "s", META) as s:
        with pytest.raises(ValueError, match="whole blocks"):
            s.append_blocks(np.arange(K + 1))
        with pytest.raises(ValueError, match="fit int32"):
            s.append_blocks(np.full(K, 2**40))
        with pytest.raises(ValueError, match="supports only 0"):
            s.append_gists(1, np.zeros((1, D), np.float32))  # no block yet
        s.append_blocks(np.arange(K))
        with pytest.raises(ValueError, match=r"must be \[n, 8\]"):
            s.append_gists(1, np.zeros((1, D + 1), np.float32))
        with pytest.raises(ValueError, match="gist level 3"):
            s.append_gists(3, np.zeros((1, D), np.float32))
        with pytest.raises(ValueError, match="open block holds < 32"):
            s.set_open_tokens(np.arange(K))
        assert counts(s) == (1, 0, 0)


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "..", ".", "x" * 129, "a b", "é", "a\n"])
def test_session_ids_are_validated(bad):
    with pytest.raises(ValueError, match="invalid session id"):
        validate_session_id(bad)


def test_good_session_ids_pass():
    for ok in ("user-1.chat_2", "...", "x" * 128, ".hidden"):
        assert validate_session_id(ok) == ok
