"""Persistent history storage: round trip, torn writes, foreign files, one writer."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mc_vllm.core.storage import (
    HEADER_SIZE,
    HistoryStore,
    StorageError,
    StoreMeta,
    validate_session_id,
)

META = StoreMeta(embed_dim=8, dtype="float32", base_model="tiny", gist_levels=2)


def fill(store, n_blocks, rng):
    toks = rng.integers(0, 1000, n_blocks * 32, dtype=np.int32)
    g1 = rng.standard_normal((n_blocks, 8)).astype(np.float32)
    g2 = rng.standard_normal((n_blocks // 32, 8)).astype(np.float32)
    store.append_blocks(toks)
    store.append_gists(1, g1)
    store.append_gists(2, g2)
    return toks, g1, g2


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    with HistoryStore.create(tmp_path / "s", META) as s:
        toks, g1, g2 = fill(s, 70, rng)
        s.flush()
        s.set_open_tokens(np.array([5, 6, 7]))
        np.testing.assert_array_equal(s.blocks(), toks)  # readable while writing
    with HistoryStore.open(tmp_path / "s", META) as s:
        assert s.repairs == []
        assert (s.num_blocks, s.num_gists(1), s.num_gists(2)) == (70, 70, 2)
        np.testing.assert_array_equal(s.blocks(), toks)
        np.testing.assert_array_equal(s.gists(1), g1)
        np.testing.assert_array_equal(s.gists(2), g2)
        np.testing.assert_array_equal(s.open_tokens(), [5, 6, 7])
        more = rng.integers(0, 1000, 32, dtype=np.int32)
        s.append_blocks(more)
        np.testing.assert_array_equal(s.blocks()[-32:], more)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_torn_write_reopens_to_last_complete_record(tmp_path, level):
    rng = np.random.default_rng(1)
    with HistoryStore.create(tmp_path / "s", META) as s:
        toks, g1, _ = fill(s, 64, rng)
        s.flush()
        s.set_open_tokens(np.array([1, 2]))
    f = tmp_path / "s" / f"lod{level}.bin"
    os.truncate(f, f.stat().st_size - 3)  # cut inside the last record
    with HistoryStore.open(tmp_path / "s", META) as s:
        assert s.repairs
        if level == 0:
            # block 63 is gone: its gist goes, LOD2 group 1 loses support, the open block
            # (which followed block 63) is discarded
            assert (s.num_blocks, s.num_gists(1), s.num_gists(2)) == (63, 63, 1)
            np.testing.assert_array_equal(s.blocks(), toks[: 63 * 32])
            assert len(s.open_tokens()) == 0
        elif level == 1:
            assert (s.num_blocks, s.num_gists(1), s.num_gists(2)) == (64, 63, 1)
            np.testing.assert_array_equal(s.gists(1), g1[:63])
        else:
            assert (s.num_blocks, s.num_gists(1), s.num_gists(2)) == (64, 64, 1)


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0, b"XXXXXXXX", "bad magic"),
        (8, (2).to_bytes(4, "little"), "checksum"),  # any edit breaks the CRC first
        (40, b"Z", "checksum"),
    ],
)
def test_corrupt_header_is_refused(tmp_path, offset, value, message):
    HistoryStore.create(tmp_path / "s", META).close()
    f = tmp_path / "s" / "lod1.bin"
    raw = bytearray(f.read_bytes())
    raw[offset : offset + len(value)] = value
    f.write_bytes(bytes(raw))
    with pytest.raises(StorageError, match=message):
        HistoryStore.open(tmp_path / "s", META)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"embed_dim": 16}, "embedding dim is 8, expected 16"),
        ({"base_model": "other"}, "base-model id is 'tiny', expected 'other'"),
        ({"dtype": "float16"}, "dtype is 'float32', expected 'float16'"),
    ],
)
def test_wrong_meta_is_refused(tmp_path, change, message):
    HistoryStore.create(tmp_path / "s", META).close()
    other = StoreMeta(**{**META.__dict__, **change})
    with pytest.raises(StorageError, match=message):
        HistoryStore.open(tmp_path / "s", other)


def test_wrong_version_is_refused(tmp_path):
    import struct
    import zlib

    from mc_vllm.core import storage

    HistoryStore.create(tmp_path / "s", META).close()
    f = tmp_path / "s" / "lod0.bin"
    raw = bytearray(f.read_bytes())
    raw[8:12] = struct.pack("<I", 99)
    body = bytes(raw[: storage._HEADER.size - 4])
    raw[storage._HEADER.size - 4 : storage._HEADER.size] = struct.pack("<I", zlib.crc32(body))
    f.write_bytes(bytes(raw))
    with pytest.raises(StorageError, match="format version is 99, expected 1"):
        HistoryStore.open(tmp_path / "s", META)


def test_one_writer(tmp_path):
    s = HistoryStore.create(tmp_path / "s", META)
    with pytest.raises(StorageError, match="another writer"):
        HistoryStore.open(tmp_path / "s", META)
    s.close()
    HistoryStore.open(tmp_path / "s", META).close()
    with pytest.raises(StorageError, match="already holds"):
        HistoryStore.create(tmp_path / "s", META)


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "..", ".", "x" * 129, "a b", "é"])
def test_session_ids_are_validated(bad):
    with pytest.raises(ValueError, match="invalid session id"):
        validate_session_id(bad)
    assert validate_session_id("user-1.chat_2") == "user-1.chat_2"


@given(
    n_blocks=st.integers(0, 80),
    level=st.integers(0, 2),
    cut=st.integers(0, 10_000),
    n_open=st.integers(0, 31),
)
def test_any_truncation_reopens_to_a_consistent_prefix(tmp_path_factory, n_blocks, level, cut, n_open):
    d = tmp_path_factory.mktemp("s")
    rng = np.random.default_rng(n_blocks)
    with HistoryStore.create(d, META) as s:
        toks, g1, g2 = fill(s, n_blocks, rng)
        s.flush()
        s.set_open_tokens(np.arange(n_open))
    f = d / f"lod{level}.bin"
    os.truncate(f, max(HEADER_SIZE, f.stat().st_size - cut))
    with HistoryStore.open(d, META) as s:
        nb, n1, n2 = s.num_blocks, s.num_gists(1), s.num_gists(2)
        assert n1 <= nb and n2 <= n1 // 32
        np.testing.assert_array_equal(s.blocks(), toks[: nb * 32])
        np.testing.assert_array_equal(s.gists(1), g1[:n1])
        np.testing.assert_array_equal(s.gists(2), g2[:n2])
        assert len(s.open_tokens()) in (0, n_open) and (nb == n_blocks or len(s.open_tokens()) == 0)
