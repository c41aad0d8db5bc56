"""Crash-safe, append-only, memory-mapped storage of one history (a persistent session).

Layout of a session directory::

    lod0.bin   header + sealed LOD0 blocks (one record = K int32 token ids)
    lod1.bin   header + LOD1 gists          (one record = one [embed_dim] vector)
    lod2.bin   ...                          (one file per gist level)
    open.bin   the open (partial) block, replaced atomically, tagged with its block index
    .lock      flock'ed by the single writer

Every level file starts with the same fixed header (magic, format version, level, block
size, embedding dim, dtype, base-model id, CRC32), so a file from another model or
format is refused with a message naming the mismatch instead of being read as garbage.
Records are only ever appended; on reopen a torn final record is cut off and the levels
are reconciled (a gist can only exist if its span does).
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import BLOCK_SIZE

MAGIC = b"MCVHIST\0"
FORMAT_VERSION = 1
HEADER_SIZE = 256
# magic, version, level, block size, embed dim, dtype[16], base model[192], crc32
_HEADER = struct.Struct("<8sIIII16s192sI")
assert _HEADER.size <= HEADER_SIZE
_OPEN = struct.Struct("<8sQI")  # magic, block index, count (then count int32)
_OPEN_MAGIC = b"MCVOPEN\0"
DTYPES = {"float32": np.float32, "float16": np.float16}
_SESSION_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


class StorageError(Exception):
    """A store file is missing, foreign, corrupt or locked; the message says which and why."""


def validate_session_id(session_id: str) -> str:
    """Session ids name directories: only [A-Za-z0-9._-], 1-128 chars, never '.' or '..'."""
    if not isinstance(session_id, str) or not _SESSION_RE.fullmatch(session_id):
        raise ValueError(
            f"invalid session id {session_id!r}: use 1-128 characters from [A-Za-z0-9._-]"
        )
    if session_id in (".", ".."):
        raise ValueError(f"invalid session id {session_id!r}: not a directory name")
    return session_id


@dataclass(frozen=True)
class StoreMeta:
    embed_dim: int
    dtype: str
    base_model: str
    gist_levels: int
    block_size: int = BLOCK_SIZE

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not supported; use one of {sorted(DTYPES)}")
        if len(self.base_model.encode()) > 192:
            raise ValueError("base_model id longer than 192 bytes")

    def record_bytes(self, level: int) -> int:
        if level == 0:
            return self.block_size * 4
        return self.embed_dim * np.dtype(DTYPES[self.dtype]).itemsize

    def header(self, level: int) -> bytes:
        fields = (MAGIC, FORMAT_VERSION, level, self.block_size, self.embed_dim,
                  self.dtype.encode(), self.base_model.encode())
        body = _HEADER.pack(*fields, 0)[:-4]
        return (body + struct.pack("<I", zlib.crc32(body))).ljust(HEADER_SIZE, b"\0")


def _check_header(path: Path, raw: bytes, meta: StoreMeta, level: int) -> None:
    if len(raw) < HEADER_SIZE:
        raise StorageError(f"{path}: header truncated ({len(raw)} of {HEADER_SIZE} bytes)")
    magic, ver, lv, bs, dim, dt, model, crc = _HEADER.unpack(raw[: _HEADER.size])
    if magic != MAGIC:
        raise StorageError(f"{path}: bad magic {magic!r}, not a mc_vllm history file")
    if zlib.crc32(raw[: _HEADER.size - 4]) != crc:
        raise StorageError(f"{path}: header checksum mismatch (corrupt header)")
    want = {
        "format version": (ver, FORMAT_VERSION),
        "level": (lv, level),
        "block size": (bs, meta.block_size),
        "embedding dim": (dim, meta.embed_dim),
        "dtype": (dt.rstrip(b"\0").decode(), meta.dtype),
        "base-model id": (model.rstrip(b"\0").decode(), meta.base_model),
    }
    for name, (got, exp) in want.items():
        if got != exp:
            raise StorageError(f"{path}: {name} is {got!r}, expected {exp!r}")


class HistoryStore:
    """One writer's handle on a session directory."""

    def __init__(self, path: Path, meta: StoreMeta) -> None:
        self.path = path
        self.meta = meta
        self.repairs: list[str] = []
        self._files: dict[int, object] = {}
        self._counts: dict[int, int] = {}
        self._maps: dict[int, tuple[int, np.ndarray]] = {}
        self._lock_fd: int | None = None

    # ---- open / create -----------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, meta: StoreMeta) -> HistoryStore:
        p = Path(path)
        if (p / "lod0.bin").exists():
            raise StorageError(f"{p}: already holds a history store")
        p.mkdir(parents=True, exist_ok=True)
        self = cls(p, meta)
        self._lock()
        for level in self._levels():
            with open(self._file(level), "wb") as f:
                f.write(meta.header(level))
                f.flush()
                os.fsync(f.fileno())
        self._fsync_dir()
        self._open_files()
        return self

    @classmethod
    def open(cls, path: str | os.PathLike, meta: StoreMeta) -> HistoryStore:
        p = Path(path)
        if not (p / "lod0.bin").exists():
            raise StorageError(f"{p}: no history store here")
        self = cls(p, meta)
        self._lock()
        try:
            for level in self._levels():
                f = self._file(level)
                if not f.exists():
                    raise StorageError(f"{f}: missing")
                with open(f, "rb") as fh:
                    _check_header(f, fh.read(HEADER_SIZE), meta, level)
            self._recover()
            self._open_files()
        except BaseException:
            self._unlock()
            raise
        return self

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, meta: StoreMeta) -> HistoryStore:
        if (Path(path) / "lod0.bin").exists():
            return cls.open(path, meta)
        return cls.create(path, meta)

    def _levels(self) -> range:
        return range(0, self.meta.gist_levels + 1)

    def _file(self, level: int) -> Path:
        return self.path / f"lod{level}.bin"

    def _lock(self) -> None:
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StorageError(f"{self.path}: is open by another writer") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _fsync_dir(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _recover(self) -> None:
        """Cut torn records, then drop records a lower level cannot support."""
        counts = {}
        for level in self._levels():
            f, rb = self._file(level), self.meta.record_bytes(level)
            size = f.stat().st_size - HEADER_SIZE
            counts[level] = size // rb
            if size % rb:
                self.repairs.append(f"{f.name}: cut torn record ({size % rb} bytes)")
        supported = {1: counts[0]}
        for level in range(2, self.meta.gist_levels + 1):
            supported[level] = min(counts[level - 1], supported[level - 1]) // self.meta.block_size
        for level in range(1, self.meta.gist_levels + 1):
            if counts[level] > supported[level]:
                self.repairs.append(
                    f"lod{level}.bin: dropped {counts[level] - supported[level]} gist(s) "
                    "beyond their lower level"
                )
                counts[level] = supported[level]
        for level, n in counts.items():
            f = self._file(level)
            want = HEADER_SIZE + n * self.meta.record_bytes(level)
            if f.stat().st_size != want:
                os.truncate(f, want)
        self._counts = counts

    def _open_files(self) -> None:
        for level in self._levels():
            f = self._file(level)
            self._counts[level] = (f.stat().st_size - HEADER_SIZE) // self.meta.record_bytes(level)
            self._files[level] = open(f, "ab")  # noqa: SIM115 - kept open for appends
        self._open_tokens = self._read_open()

    # ---- open block --------------------------------------------------------------------

    def _read_open(self) -> np.ndarray:
        f = self.path / "open.bin"
        empty = np.zeros(0, dtype=np.int32)
        try:
            raw = f.read_bytes()
        except FileNotFoundError:
            return empty
        if len(raw) < _OPEN.size:
            self.repairs.append("open.bin: truncated, discarded")
            return empty
        magic, block, n = _OPEN.unpack(raw[: _OPEN.size])
        body = raw[_OPEN.size :]
        if magic != _OPEN_MAGIC or len(body) != 4 * n or n >= self.meta.block_size:
            self.repairs.append("open.bin: corrupt, discarded")
            return empty
        if block != self._counts[0]:
            self.repairs.append(f"open.bin: belongs to block {block}, history has "
                                f"{self._counts[0]} blocks; discarded")
            return empty
        return np.frombuffer(body, dtype=np.int32).copy()

    def set_open_tokens(self, tokens: np.ndarray) -> None:
        """Persist the open block atomically (tmp + fsync + rename)."""
        t = np.asarray(tokens, dtype=np.int32).reshape(-1)
        if len(t) >= self.meta.block_size:
            raise ValueError(f"open block holds < {self.meta.block_size} tokens, got {len(t)}")
        tmp = self.path / "open.bin.tmp"
        with open(tmp, "wb") as f:
            f.write(_OPEN.pack(_OPEN_MAGIC, self._counts[0], len(t)) + t.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / "open.bin")
        self._open_tokens = t.copy()

    def open_tokens(self) -> np.ndarray:
        return self._open_tokens.copy()

    # ---- appends -----------------------------------------------------------------------

    def append_blocks(self, tokens: np.ndarray) -> None:
        t = np.ascontiguousarray(tokens, dtype=np.int32).reshape(-1)
        if len(t) % self.meta.block_size:
            raise ValueError(f"append_blocks takes whole blocks of {self.meta.block_size} tokens")
        self._files[0].write(t.tobytes())
        self._counts[0] += len(t) // self.meta.block_size

    def append_gists(self, level: int, gists: np.ndarray) -> None:
        if not 1 <= level <= self.meta.gist_levels:
            raise ValueError(f"level {level} not in 1..{self.meta.gist_levels}")
        g = np.ascontiguousarray(gists, dtype=DTYPES[self.meta.dtype])
        if g.ndim != 2 or g.shape[1] != self.meta.embed_dim:
            raise ValueError(f"gists must be [n, {self.meta.embed_dim}], got {list(g.shape)}")
        self._files[level].write(g.tobytes())
        self._counts[level] += len(g)

    # ---- reads -------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self._counts[0]

    def num_gists(self, level: int) -> int:
        return self._counts[level]

    def _map(self, level: int, dtype: np.dtype, width: int) -> np.ndarray:
        n = self._counts[level]
        cached = self._maps.get(level)
        if cached is not None and cached[0] == n:
            return cached[1]
        if n == 0:
            return np.zeros((0, width) if level else (0,), dtype=dtype)
        self._files[level].flush()  # the map must see what was appended
        shape = (n, width) if level else (n * width,)
        m = np.memmap(self._file(level), dtype=dtype, mode="r", offset=HEADER_SIZE, shape=shape)
        self._maps[level] = (n, m)
        return m

    def blocks(self) -> np.ndarray:
        return self._map(0, np.dtype(np.int32), self.meta.block_size)

    def gists(self, level: int) -> np.ndarray:
        return self._map(level, np.dtype(DTYPES[self.meta.dtype]), self.meta.embed_dim)

    # ---- durability --------------------------------------------------------------------

    def flush(self) -> None:
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        if not self._files:
            return
        self.flush()
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._maps.clear()
        self._unlock()

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
