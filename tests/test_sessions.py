"""Persistent sessions (core.sessions): prefix rule, checkpoints, retention, and kill -9
during a long ingest (every sealed block survives; the session continues)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mc_vllm.core.config import BLOCK_SIZE as K
from mc_vllm.core.sessions import (
    SessionError,
    SessionRoot,
    SessionState,
    SessionWriter,
    common_prefix,
    load_state,
)
from mc_vllm.core.storage import StorageError, StoreMeta, read_tokens

META = StoreMeta(embed_dim=64, dtype="float32", base_model="tiny", gist_levels=2)


def _history(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2048, n, dtype=np.int64)


def test_common_prefix():
    a = np.arange(100)
    assert common_prefix(a, a) == 100
    assert common_prefix(a, a[:40]) == 40
    b = a.copy()
    b[57] = -1
    assert common_prefix(a, b) == 57
    assert common_prefix(a[:0], a) == 0


def test_writer_stores_every_token_and_checkpoints_atomically(tmp_path):
    root = SessionRoot(tmp_path)
    h = _history(1000)
    w = SessionWriter(root, "s", META)
    for upto in range(0, 1001, 77):
        w.extend(h, upto)
    w.extend(h, 1000)
    # sealed blocks are readable by another process at once; the open block at checkpoints
    assert np.array_equal(read_tokens(root.path("s")), h[: 1000 // K * K])
    w.checkpoint(SessionState(1000, 256, 2, [(1, 0), (0, 31)]))
    assert np.array_equal(read_tokens(root.path("s")), h)
    w.close()
    w = SessionWriter(root, "s", META)  # reopen: the tokens and the checkpoint are back
    assert np.array_equal(w.stored, h) and w.state.history_len == 1000
    assert w.state.entries == [(1, 0), (0, 31)]
    w.close()


def test_front_end_check(tmp_path):
    root = SessionRoot(tmp_path, max_tokens=5000)
    h = _history(700)
    assert root.check_request("new", h, META) == 0  # a new session: nothing stored
    w = SessionWriter(root, "s", META)
    w.extend(h, 700)
    w.checkpoint(SessionState(700, 256, 2, []))
    w.close()
    longer = np.concatenate([h, _history(50, 1)])
    assert root.check_request("s", longer, META) == 700
    assert root.check_request("s", h, META) == 700  # a retry of the same turn
    diverged = longer.copy()
    diverged[123] += 1
    with pytest.raises(SessionError, match="diverges from the stored one at token 123") as e:
        root.check_request("s", diverged, META)
    assert e.value.status == 409
    with pytest.raises(SessionError, match="diverges") as e:
        root.check_request("s", h[:500], META)  # shorter than the stored history
    assert e.value.status == 409
    other = StoreMeta(embed_dim=128, dtype="float32", base_model="tiny", gist_levels=2)
    with pytest.raises(SessionError, match="embedding size 64.*runs 128") as e:
        root.check_request("s", longer, other)
    assert e.value.status == 409
    with pytest.raises(SessionError, match="per-session limit of 5000") as e:
        root.check_request("s", _history(5001), META)
    assert e.value.status == 400
    for bad in ("../x", "a/b", "..", "a\0b", "x" * 200):
        with pytest.raises(SessionError, match="mc_session"):
            root.check_request(bad, h, META)


def test_one_writer_per_session_and_delete_refuses_a_session_in_use(tmp_path):
    root = SessionRoot(tmp_path)
    w = SessionWriter(root, "s", META)
    w.extend(_history(100), 100)
    with pytest.raises(StorageError, match="another writer"):
        SessionWriter(root, "s", META)
    with pytest.raises(SessionError, match="in use") as e:
        root.delete("s")
    assert e.value.status == 409
    w.checkpoint(SessionState(64, 256, 2, []))
    w.close()
    assert [s.id for s in root.list()] == ["s"]
    info = root.info("s")
    assert info.history_tokens == 100 and info.checkpoint_tokens == 64
    root.delete("s")
    assert root.list() == []
    with pytest.raises(SessionError, match="no such session") as e:
        root.delete("s")
    assert e.value.status == 404


def test_retention_deletes_the_least_recently_used_sessions(tmp_path):
    root = SessionRoot(tmp_path)
    for i, sid in enumerate(("old", "mid", "new")):
        w = SessionWriter(root, sid, META)
        w.extend(_history(4096, i), 4096)
        w.checkpoint(SessionState(4096, 256, 2, []))
        w.close()
        time.sleep(0.01)
    size = root.info("new").disk_bytes
    root.max_bytes = 2 * size + 1
    assert root.enforce_retention(keep={"old"}) == ["mid"]  # "old" is in use: kept
    assert sorted(s.id for s in root.list()) == ["new", "old"]


_CHILD = r"""
import sys, numpy as np
from mc_vllm.core.sessions import SessionRoot, SessionState, SessionWriter
from mc_vllm.core.storage import StoreMeta
root, n = SessionRoot(sys.argv[1]), int(sys.argv[2])
meta = StoreMeta(embed_dim=64, dtype="float32", base_model="tiny", gist_levels=2)
h = np.random.default_rng(0).integers(0, 2048, n, dtype=np.int64)
w = SessionWriter(root, "s", meta)
assert np.array_equal(w.stored, h[:len(w.stored)]), "stored history is not a prefix"
start = w.state.history_len if w.state else 0
print(len(w.stored), start, flush=True)
for upto in range(len(w.stored), n + 1, 50):  # ingest in 50-token chunks, as the engine does
    w.extend(h, upto)
    if upto // 4096 != (upto - 50) // 4096:
        w.checkpoint(SessionState(upto, 256, 2, [(0, 0)]))
w.extend(h, n)
w.checkpoint(SessionState(n, 256, 2, [(0, 0)]))
print("done", flush=True)
"""


def test_kill_9_during_a_long_ingest_loses_no_sealed_block(tmp_path):
    """20 times: a writer ingesting a 400k-token history is killed with SIGKILL at a random
    moment; on reopen every block it had sealed is there, the checkpoint never claims more
    than is stored, and the next writer continues from what was stored. The last run
    completes the history."""
    n = 400_000
    h = np.random.default_rng(0).integers(0, 2048, n, dtype=np.int64)
    rng = np.random.default_rng(1)
    seen, interrupted = 0, 0
    for _ in range(20):
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path), str(n)],
                                stdout=subprocess.PIPE, text=True)
        first = proc.stdout.readline().split()
        stored, start = int(first[0]), int(first[1])
        assert stored >= seen  # nothing sealed before was lost
        assert start <= stored
        time.sleep(float(rng.uniform(0.0, 0.05)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        tokens = read_tokens(tmp_path / "s")
        assert np.array_equal(tokens, h[: len(tokens)])  # a prefix, never garbage
        state = load_state(tmp_path / "s")
        assert state is None or state.history_len <= len(tokens)
        seen = len(tokens) // K * K
        interrupted += seen < n
    assert interrupted >= 10  # the kills did land mid-ingest
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), str(n)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split()[-1] == "done", out.stderr
    assert np.array_equal(read_tokens(tmp_path / "s"), h)
    assert load_state(tmp_path / "s").history_len == n


def test_sessions_command(tmp_path, capsys):
    from mc_vllm.cli import main

    w = SessionWriter(SessionRoot(tmp_path), "doc-1", META)
    w.extend(_history(300), 300)
    w.checkpoint(SessionState(300, 256, 2, []))
    w.close()
    assert main(["sessions", "list", "--dir", str(tmp_path)]) == 0
    assert "doc-1" in capsys.readouterr().out
    assert main(["sessions", "show", "doc-1", "--dir", str(tmp_path)]) == 0
    assert '"history_tokens": 300' in capsys.readouterr().out
    assert main(["sessions", "delete", "doc-1", "--dir", str(tmp_path)]) == 0
    assert main(["sessions", "show", "doc-1", "--dir", str(tmp_path)]) == 1
    assert "no such session" in capsys.readouterr().err
