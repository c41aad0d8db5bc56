"""Persistent sessions: named histories kept on disk between requests and restarts.

A session directory (``<root>/<session id>/``) holds one :class:`~.storage.HistoryStore`
(the history's tokens, append-only and crash-safe) and ``state.json``: the working context
and Focus Allocator state of the last checkpoint, for the history's first
``history_len`` tokens. A follow-up request sends its whole history (an OpenAI client
resends the conversation); the stored history must be its prefix
(:func:`common_prefix`), and only the rest is ingested. The working context resumes from
the checkpoint, so refocusing goes on where it stopped.

Gist vectors are not stored: GistNet recomputes them from the tokens on reopen (one small
network over token embeddings, no base-model forward).

Crash safety: tokens are appended to the store as they are ingested (every sealed block
survives a ``kill -9``: the writes are in the kernel); ``state.json`` is replaced
atomically at checkpoints and refers to a token count, so a store that grew past its
checkpoint resumes from the checkpoint and ingests the rest again.

No vLLM import here: the scheduler (writer), the front end and ``mc-vllm sessions``
(readers) share it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .config import BLOCK_SIZE
from .storage import (
    HistoryStore,
    StorageError,
    StoreMeta,
    _write_atomic,
    count_tokens,
    read_meta,
    read_tokens,
    validate_session_id,
)

STATE_FILE = "state.json"
STATE_VERSION = 1
DEFAULT_ROOT = "~/.cache/mc_vllm/sessions"


class SessionError(ValueError):
    """A request's session cannot be used as asked; ``status`` is the HTTP status to answer
    (400 bad request, 404 unknown session, 409 conflict with the stored session)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class SessionState:
    """The checkpoint in ``state.json``: the working context (entries ``[level, index]`` in
    time order) and the allocator's cooldown state, valid for the first ``history_len``
    tokens of the stored history, under the recorded ``w_max`` and ``gist_levels``."""

    history_len: int
    w_max: int
    gist_levels: int
    entries: list[tuple[int, int]]
    allocator_step: int = 0
    last_flip: list[tuple[int, int, int]] = field(default_factory=list)  # level, index, step
    requests: int = 0  # requests served in this session
    updated: float = 0.0  # unix time

    def to_json(self) -> bytes:
        d = asdict(self)
        d["version"] = STATE_VERSION
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> SessionState:
        d = json.loads(raw)
        if d.pop("version", None) != STATE_VERSION:
            raise ValueError("unsupported state version")
        d["entries"] = [tuple(e) for e in d["entries"]]
        d["last_flip"] = [tuple(e) for e in d["last_flip"]]
        return cls(**d)


def load_state(path: Path) -> SessionState | None:
    """The session's checkpoint, or None when there is none or it is unreadable (then the
    session resumes by ingesting its stored history again: nothing is lost)."""
    try:
        return SessionState.from_json((path / STATE_FILE).read_bytes())
    except (OSError, ValueError, TypeError, KeyError):
        return None


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two 1-D token arrays (vectorised)."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


@dataclass(frozen=True)
class SessionInfo:
    """What ``mc-vllm sessions`` and ``GET /v1/mc/sessions`` show of one session."""

    id: str
    history_tokens: int
    checkpoint_tokens: int  # tokens the stored working context covers
    requests: int
    disk_bytes: int
    updated: float
    base_model: str
    embed_dim: int

    def to_dict(self) -> dict:
        return asdict(self)


class SessionRoot:
    """The directory of all sessions, with the retention limits.

    ``max_tokens``: the most tokens one session's history may hold (a longer request is
    refused, 400). ``max_bytes``: the most disk all sessions together may use; past it the
    least recently updated sessions not in use are deleted (:meth:`enforce_retention`).
    0 means no limit."""

    def __init__(self, root: str | os.PathLike[str] | None, max_tokens: int = 0,
                 max_bytes: int = 0) -> None:
        self.root = Path(os.path.expanduser(str(root or DEFAULT_ROOT)))
        self.max_tokens = max_tokens
        self.max_bytes = max_bytes

    def path(self, session_id: str) -> Path:
        """The session's directory; ValueError (naming ``mc_session``) for an unsafe id."""
        try:
            return self.root / validate_session_id(session_id)
        except ValueError as e:
            raise SessionError(f"mc_session: {e}") from None

    def check_request(self, session_id: str, history: np.ndarray, meta: StoreMeta) -> int:
        """Front-end check of a request on a session: the number of its history's tokens
        already stored (0 for a new session). Raises SessionError: 400 for a history over
        ``max_tokens``, 409 for a session made with another model / embedding size, or
        whose stored history is not a prefix of this request's (with the first token
        where they differ)."""
        path = self.path(session_id)
        if self.max_tokens and len(history) > self.max_tokens:
            raise SessionError(
                f"mc_session={session_id!r}: the history would hold {len(history)} tokens, "
                f"over this server's per-session limit of {self.max_tokens} "
                f"(megacontext.session_max_tokens)")
        if not (path / "lod0.bin").is_file():
            return 0
        try:
            stored_meta = read_meta(path)
            stored = read_tokens(path)
        except StorageError as e:
            raise SessionError(f"mc_session={session_id!r}: the stored session is unreadable "
                               f"({e}); delete it to start over", 409) from None
        check_meta(session_id, stored_meta, meta)
        n = common_prefix(stored, history)
        if n < len(stored):
            raise SessionError(
                f"mc_session={session_id!r}: this conversation diverges from the stored one "
                f"at token {n} of {len(stored)} (a session only grows: resend the whole "
                f"conversation so far plus the new part, or use a new session id to branch)",
                409)
        return n

    def info(self, session_id: str) -> SessionInfo:
        """One session's summary; SessionError 404 when it does not exist."""
        path = self.path(session_id)
        if not (path / "lod0.bin").is_file():
            raise SessionError(f"mc_session={session_id!r}: no such session", 404)
        meta = read_meta(path)
        state = load_state(path)
        return SessionInfo(
            id=session_id,
            history_tokens=count_tokens(path),
            checkpoint_tokens=state.history_len if state else 0,
            requests=state.requests if state else 0,
            disk_bytes=_dir_bytes(path),
            updated=state.updated if state else (path / "lod0.bin").stat().st_mtime,
            base_model=meta.base_model,
            embed_dim=meta.embed_dim,
        )

    def list(self) -> list[SessionInfo]:
        """Every readable session, most recently updated first."""
        out = []
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith("."):
                    continue  # .deleted-* leftovers of an interrupted delete, temp files
                try:
                    out.append(self.info(p.name))
                except (SessionError, StorageError, OSError):
                    continue  # not a session (or half-deleted): skipped, never fatal
        return sorted(out, key=lambda s: -s.updated)

    def delete(self, session_id: str) -> None:
        """Delete a session. SessionError 404 when it does not exist, 409 while a request
        uses it (its writer lock is held)."""
        path = self.path(session_id)
        if not (path / "lod0.bin").is_file():
            raise SessionError(f"mc_session={session_id!r}: no such session", 404)
        if not _remove_unlocked(path):
            raise SessionError(f"mc_session={session_id!r}: in use by a running request; "
                               "retry when it has finished", 409)

    def enforce_retention(self, keep: set[str] = frozenset()) -> list[str]:
        """Delete least recently updated sessions (never those in ``keep`` or in use) until
        all fit ``max_bytes``; the ids deleted."""
        if not self.max_bytes:
            return []
        sessions = self.list()
        total = sum(s.disk_bytes for s in sessions)
        gone = []
        for s in reversed(sessions):  # oldest first
            if total <= self.max_bytes:
                break
            if s.id in keep:
                continue
            if _remove_unlocked(self.path(s.id)):
                total -= s.disk_bytes
                gone.append(s.id)
        return gone


def check_meta(session_id: str, stored: StoreMeta, want: StoreMeta) -> None:
    """409 when a stored session was made for another model, embedding size or layout."""
    for name, got, exp in (("model", stored.base_model, want.base_model),
                           ("embedding size", stored.embed_dim, want.embed_dim),
                           ("gist levels", stored.gist_levels, want.gist_levels),
                           ("block size", stored.block_size, want.block_size)):
        if got != exp:
            raise SessionError(
                f"mc_session={session_id!r}: the session was made with {name} {got!r}, this "
                f"server runs {exp!r}; use another session id (or delete this one)", 409)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _remove_unlocked(path: Path) -> bool:
    """Remove a session directory unless a writer holds its lock; False if one does."""
    import fcntl

    try:
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:
        # rename first: a reader never sees a half-deleted session under its id
        doomed = path.with_name(f".deleted-{path.name}-{time.time_ns()}")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    finally:
        os.close(fd)
    return True


class SessionWriter:
    """The engine's handle on one session while a request uses it: the store (its writer
    lock serialises users of the session across processes), the tokens it already holds,
    and checkpoints."""

    def __init__(self, root: SessionRoot, session_id: str, meta: StoreMeta) -> None:
        self.id = session_id
        self.path = root.path(session_id)
        if (self.path / "lod0.bin").is_file():
            check_meta(session_id, read_meta(self.path), meta)
        self.store = HistoryStore.open_or_create(self.path, meta)  # StorageError if locked
        try:
            have = np.concatenate([np.asarray(self.store.blocks()), self.store.open_tokens()])
        except BaseException:
            self.store.close()  # never leave the session locked
            raise
        self._buf = have.astype(np.int64)  # grows by doubling: extend is O(new tokens)
        self._n = len(have)
        self.state = load_state(self.path)
        self._since_sync = 0

    @property
    def stored(self) -> np.ndarray:
        """The stored history (int64 token ids; a view, valid until the next extend)."""
        return self._buf[: self._n]

    @property
    def num_tokens(self) -> int:
        return self._n

    def extend(self, history: np.ndarray, upto: int) -> None:
        """Store ``history[:upto]`` (the stored tokens are its prefix). Whole blocks are
        appended and handed to the kernel at once (a process kill keeps every sealed
        block); fsync'ed every 16 blocks and at :meth:`checkpoint`, which also writes the
        open (partial) block."""
        n0 = self._n
        if upto <= n0:
            return
        if upto > len(self._buf):
            grown = np.empty(max(upto, 2 * len(self._buf), 1024), dtype=np.int64)
            grown[:n0] = self._buf[:n0]
            self._buf = grown
        self._buf[n0:upto] = history[n0:upto]
        self._n = upto
        on_disk = self.store.num_blocks * BLOCK_SIZE
        sealed_to = (upto // BLOCK_SIZE) * BLOCK_SIZE
        if sealed_to > on_disk:
            self.store.append_blocks(self._buf[on_disk:sealed_to])
            self.store.write_through()
            self._since_sync += (sealed_to - on_disk) // BLOCK_SIZE
            if self._since_sync >= 16:
                self.store.flush()
                self._since_sync = 0

    def checkpoint(self, state: SessionState) -> None:
        """Make the stored tokens durable, then atomically record ``state`` (which must
        not claim more tokens than are stored)."""
        if state.history_len > self._n:
            raise ValueError(f"checkpoint of {state.history_len} tokens, {self._n} stored")
        open_block = self.stored[self.store.num_blocks * BLOCK_SIZE :]
        if len(open_block) or len(self.store.open_tokens()):
            self.store.set_open_tokens(open_block)  # flushes the sealed blocks first
        self.store.flush()
        state.updated = time.time()
        _write_atomic(self.path / STATE_FILE, state.to_json())
        self.state = state

    def close(self) -> None:
        self.store.close()
