"""Crash-safe, append-only, memory-mapped storage of one history (a persistent session).

Layout of a session directory::

    lod0.bin   header + sealed LOD0 blocks (one record = K int32 token ids)
    lod1.bin   header + LOD1 gists          (one record = one [embed_dim] vector)
    lod2.bin   ...                          (one file per gist level)
    open.bin   the open (partial) block, replaced atomically, tagged with its block index
    .lock      flock'ed by the single writer

Every level file starts with the same fixed 256-byte header (magic, format version, level,
block size, embedding dim, gist levels, dtype, base-model id, CRC32), so a file from
another model or format is refused with a message naming the mismatch instead of being
read as garbage. Records are only ever appended; on reopen a torn final record is cut off
and the levels are reconciled (a gist can only exist if the span it summarises does).
Gists that are *missing* after a crash are not an error: the tree recomputes them.

Only numpy and the standard library are used (the store must load without torch/vLLM).
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .config import BLOCK_SIZE

MAGIC = b"MCVHIST\0"
FORMAT_VERSION = 1
HEADER_SIZE = 256
_DTYPE_BYTES = 16
_MODEL_BYTES = 192
# magic, version, level, block size, embed dim, gist levels, dtype, base model; then zero
# padding up to HEADER_SIZE - 4 and a CRC32 of everything before it (padding included).
_HEADER = struct.Struct(f"<8sIIIII{_DTYPE_BYTES}s{_MODEL_BYTES}s")
_CRC_AT = HEADER_SIZE - 4
assert _HEADER.size <= _CRC_AT
_VERSION_AT = 8  # the version sits right after the magic in every format version

# open.bin: magic, format version, block index it belongs to, token count, CRC32 of the
# preceding fields + the tokens; then count int32 tokens.
_OPEN_MAGIC = b"MCVOPEN\0"
_OPEN = struct.Struct("<8sIQII")
_OPEN_FILE = "open.bin"
_LOCK_FILE = ".lock"
_TMP_SUFFIX = ".tmp"

# On-disk dtype per name. bfloat16 has no numpy dtype: it is stored (and returned by
# gists()) as its raw uint16 bit pattern; torch callers view it with `.view(torch.bfloat16)`.
_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
}
_TOKEN = np.dtype("<i4")
_SESSION_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


class StorageError(Exception):
    """A store file is missing, foreign, corrupt or locked; the message names file and problem."""


def validate_session_id(session_id: str) -> str:
    """Return ``session_id`` if it is safe as one directory name, else raise ValueError.

    Session ids come from requests and become directory names: only ``[A-Za-z0-9._-]``,
    1-128 characters, never ``.`` or ``..`` -- so no separators and no path traversal.
    """
    if not isinstance(session_id, str):
        raise ValueError(f"invalid session id {session_id!r}: must be a str")
    if not _SESSION_RE.fullmatch(session_id):
        raise ValueError(
            f"invalid session id {session_id!r}: use 1-128 characters from [A-Za-z0-9._-]"
        )
    if session_id in (".", ".."):
        raise ValueError(f"invalid session id {session_id!r}: '.' and '..' are not names")
    return session_id


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class StoreMeta:
    """What the header of every file of a store records; a reopen must match it exactly."""

    embed_dim: int
    dtype: str  # "float32" | "float16" | "bfloat16" (raw uint16 bits)
    base_model: str
    gist_levels: int
    block_size: int = BLOCK_SIZE

    def __post_init__(self) -> None:
        # Programming errors, not file conditions: ValueError, raised before touching disk.
        if not _is_int(self.embed_dim) or not 1 <= self.embed_dim < 2**32:
            raise ValueError(f"StoreMeta.embed_dim={self.embed_dim!r}: must be a positive int")
        if self.dtype not in _DTYPES:
            raise ValueError(f"StoreMeta.dtype={self.dtype!r}: use one of {sorted(_DTYPES)}")
        if not isinstance(self.base_model, str):
            raise ValueError(f"StoreMeta.base_model={self.base_model!r}: must be a str")
        raw = self.base_model.encode("utf-8")
        if len(raw) > _MODEL_BYTES or b"\0" in raw:
            # It must fit the fixed-width header field verbatim, or two ids could collide.
            raise ValueError(
                f"StoreMeta.base_model={self.base_model!r}: must be at most {_MODEL_BYTES} "
                "UTF-8 bytes without NUL"
            )
        if not _is_int(self.gist_levels) or not 0 <= self.gist_levels <= 16:
            raise ValueError(f"StoreMeta.gist_levels={self.gist_levels!r}: must be an int 0..16")
        if not _is_int(self.block_size) or not 1 <= self.block_size < 2**16:
            raise ValueError(f"StoreMeta.block_size={self.block_size!r}: must be a positive int")


def _record_bytes(meta: StoreMeta, level: int) -> int:
    if level == 0:
        return meta.block_size * _TOKEN.itemsize
    return meta.embed_dim * _DTYPES[meta.dtype].itemsize


def _pack_header(meta: StoreMeta, level: int) -> bytes:
    body = _HEADER.pack(
        MAGIC, FORMAT_VERSION, level, meta.block_size, meta.embed_dim, meta.gist_levels,
        meta.dtype.encode("ascii"), meta.base_model.encode("utf-8"),
    ).ljust(_CRC_AT, b"\0")
    return body + struct.pack("<I", zlib.crc32(body))


def _check_header(path: Path, raw: bytes, meta: StoreMeta, level: int) -> None:
    """Refuse a header that is short, foreign, corrupt or written for other metadata."""
    if len(raw) < HEADER_SIZE:
        raise StorageError(f"{path}: header truncated ({len(raw)} of {HEADER_SIZE} bytes)")
    if raw[:8] != MAGIC:
        raise StorageError(f"{path}: bad magic {raw[:8]!r}, not a mc_vllm history file")
    # Version before CRC: a newer format may checksum differently, and "unsupported
    # version" is the useful message then.
    (version,) = struct.unpack_from("<I", raw, _VERSION_AT)
    if version != FORMAT_VERSION:
        raise StorageError(
            f"{path}: format version is {version}, expected {FORMAT_VERSION} (unsupported)"
        )
    (crc,) = struct.unpack_from("<I", raw, _CRC_AT)
    if zlib.crc32(raw[:_CRC_AT]) != crc:
        raise StorageError(f"{path}: header checksum (CRC32) mismatch, the header is corrupt")
    _, _, lv, bs, dim, levels, dt, model = _HEADER.unpack_from(raw)
    fields = (
        ("level", lv, level),
        ("block size", bs, meta.block_size),
        ("embedding dim", dim, meta.embed_dim),
        ("gist levels", levels, meta.gist_levels),
        ("dtype", dt.rstrip(b"\0").decode("ascii", "replace"), meta.dtype),
        ("base-model id", model.rstrip(b"\0").decode("utf-8", "replace"), meta.base_model),
    )
    for name, got, want in fields:
        if got != want:
            raise StorageError(f"{path}: {name} is {got!r}, expected {want!r}")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a crash leaves either the old or the new file."""
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float -> bfloat16 bit patterns (uint16), rounding to nearest even like torch."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + (((bits >> 16) & 1) + np.uint32(0x7FFF))) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0  # rounding could have turned a NaN payload into inf
    return out


def read_meta(path: str | os.PathLike[str]) -> StoreMeta:
    """The metadata a store's ``lod0.bin`` header records, without taking the writer lock
    (for readers: the server's front end, ``mc-vllm sessions``). Raises StorageError for a
    missing, foreign or corrupt header."""
    f = Path(path) / "lod0.bin"
    try:
        with open(f, "rb") as fh:
            raw = fh.read(HEADER_SIZE)
    except FileNotFoundError:
        raise StorageError(f"{Path(path)}: no history store here (lod0.bin missing)") from None
    if len(raw) < HEADER_SIZE or raw[:8] != MAGIC:
        raise StorageError(f"{f}: not a mc_vllm history file")
    _, version, _, bs, dim, levels, dt, model = _HEADER.unpack_from(raw)
    if version != FORMAT_VERSION or zlib.crc32(raw[:_CRC_AT]) != struct.unpack_from(
            "<I", raw, _CRC_AT)[0]:
        raise StorageError(f"{f}: header of format version {version} is unsupported or corrupt")
    return StoreMeta(embed_dim=dim, dtype=dt.rstrip(b"\0").decode("ascii", "replace"),
                     base_model=model.rstrip(b"\0").decode("utf-8", "replace"),
                     gist_levels=levels, block_size=bs)


def count_tokens(path: str | os.PathLike[str]) -> int:
    """How many tokens :func:`read_tokens` would return, from file sizes and the open
    block's header only (no token is read)."""
    meta = read_meta(path)
    p = Path(path)
    blocks = ((p / "lod0.bin").stat().st_size - HEADER_SIZE) // _record_bytes(meta, 0)
    try:
        with open(p / _OPEN_FILE, "rb") as fh:
            head = fh.read(_OPEN.size)
    except FileNotFoundError:
        head = b""
    extra = 0
    if len(head) == _OPEN.size:
        magic, version, block, n, _ = _OPEN.unpack_from(head)
        if magic == _OPEN_MAGIC and version == FORMAT_VERSION and block == blocks \
                and n < meta.block_size:
            extra = n
    return blocks * meta.block_size + extra


def read_tokens(path: str | os.PathLike[str]) -> np.ndarray:
    """A snapshot of a store's history (int32 token ids: the sealed blocks, then the open
    block when its tag still matches), read without the writer lock. What a concurrent
    writer has not finished (a torn record, an open block being replaced) is left out, as
    ``HistoryStore.open`` would after a crash. Raises StorageError like :func:`read_meta`."""
    meta = read_meta(path)
    p = Path(path)
    rb = _record_bytes(meta, 0)
    with open(p / "lod0.bin", "rb") as fh:
        fh.seek(HEADER_SIZE)
        data = fh.read()
    blocks = len(data) // rb
    sealed = np.frombuffer(data[: blocks * rb], dtype=_TOKEN)
    try:
        raw = (p / _OPEN_FILE).read_bytes()
    except FileNotFoundError:
        raw = b""
    if len(raw) >= _OPEN.size:
        magic, version, block, n, crc = _OPEN.unpack_from(raw)
        body = raw[_OPEN.size :]
        if (magic == _OPEN_MAGIC and version == FORMAT_VERSION and block == blocks
                and n < meta.block_size and len(body) == n * _TOKEN.itemsize
                and zlib.crc32(body, zlib.crc32(raw[: _OPEN.size - 4])) == crc):
            return np.concatenate([sealed, np.frombuffer(body, dtype=_TOKEN)]).astype(np.int32)
    return sealed.astype(np.int32)


class HistoryStore:
    """The single writer's handle on one session directory (use create/open, not __init__)."""

    def __init__(self, path: Path, meta: StoreMeta) -> None:
        if not isinstance(meta, StoreMeta):
            raise TypeError(f"meta must be a StoreMeta, got {type(meta).__name__}")
        self.path = path
        self.meta = meta
        self.repairs: list[str] = []  # what open() fixed after a crash; empty when clean
        self._files: dict[int, BinaryIO] = {}
        self._counts: dict[int, int] = {}
        self._dirty: set[int] = set()  # levels appended to since their last fsync
        self._maps: dict[int, tuple[int, np.ndarray]] = {}  # level -> (records, memmap)
        self._open_tokens = np.zeros(0, dtype=np.int32)
        self._lock_fd: int | None = None

    # ---- open / create -----------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str], meta: StoreMeta) -> HistoryStore:
        """Start a new, empty store in ``path`` (created if needed)."""
        p = Path(path)
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"{p}: cannot create the store directory ({e})") from e
        self = cls(p, meta)
        self._lock()  # before the existence check, so two creators cannot both pass it
        try:
            if self._file(0).exists():
                raise StorageError(f"{p}: already holds a history store")
            # Leftovers of an earlier create that crashed before lod0.bin existed (lod0.bin
            # is written last, so its presence marks a complete store) are overwritten.
            for name in (_OPEN_FILE, _OPEN_FILE + _TMP_SUFFIX):
                (p / name).unlink(missing_ok=True)
            for level in [*range(1, meta.gist_levels + 1), 0]:
                _write_atomic(self._file(level), _pack_header(meta, level))
            _fsync_path(p)
            self._open_files()
        except BaseException:
            self._release()
            raise
        return self

    @classmethod
    def open(cls, path: str | os.PathLike[str], meta: StoreMeta) -> HistoryStore:
        """Reopen an existing store: check every header, repair what a crash left behind."""
        p = Path(path)
        if not (p / "lod0.bin").is_file():
            raise StorageError(f"{p}: no history store here (lod0.bin missing)")
        self = cls(p, meta)
        self._lock()
        try:
            for level in self._levels():
                f = self._file(level)
                try:
                    with open(f, "rb") as fh:
                        raw = fh.read(HEADER_SIZE)
                except FileNotFoundError:
                    raise StorageError(f"{f}: missing (level {level} of the store)") from None
                _check_header(f, raw, meta, level)
            self._recover()
            self._open_files()
            self._open_tokens = self._read_open_block()
        except BaseException:
            self._release()
            raise
        return self

    @classmethod
    def open_or_create(cls, path: str | os.PathLike[str], meta: StoreMeta) -> HistoryStore:
        if (Path(path) / "lod0.bin").exists():
            return cls.open(path, meta)
        return cls.create(path, meta)

    def _levels(self) -> range:
        return range(self.meta.gist_levels + 1)

    def _file(self, level: int) -> Path:
        return self.path / f"lod{level}.bin"

    def _lock(self) -> None:
        try:
            fd = os.open(self.path / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StorageError(f"{self.path / _LOCK_FILE}: cannot open lock file ({e})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StorageError(f"{self.path}: is open by another writer") from None
        self._lock_fd = fd

    def _release(self) -> None:
        """Close every file and unlock, whatever fails on the way (a full disk can make a
        buffered close raise); the first error is re-raised after the lock is gone."""
        error: BaseException | None = None
        for f in self._files.values():
            try:
                f.close()
            except OSError as e:
                error = error or e
        self._files.clear()
        self._maps.clear()
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
        if error is not None:
            raise error

    def _recover(self) -> None:
        """Cut torn records, then drop records that their lower level cannot support."""
        for level in [*self._levels(), None]:  # stale temp files of interrupted writes
            name = _OPEN_FILE if level is None else self._file(level).name
            tmp = self.path / (name + _TMP_SUFFIX)
            if tmp.exists():
                tmp.unlink()
                self.repairs.append(f"{tmp.name}: removed a leftover temporary file")
        sizes = {lv: self._file(lv).stat().st_size - HEADER_SIZE for lv in self._levels()}
        counts: dict[int, int] = {}
        for level, size in sizes.items():
            rb = _record_bytes(self.meta, level)
            counts[level] = size // rb
            if size % rb:
                self.repairs.append(
                    f"lod{level}.bin: cut a torn final record ({size % rb} of {rb} bytes)"
                )
        # One LOD1 gist per block; one level-L gist per K level-(L-1) gists. Anything beyond
        # can only be the residue of a crash (gists are appended after what they summarise).
        for level in range(1, self.meta.gist_levels + 1):
            support = counts[0] if level == 1 else counts[level - 1] // self.meta.block_size
            if counts[level] > support:
                self.repairs.append(
                    f"lod{level}.bin: dropped {counts[level] - support} gist(s) beyond the "
                    f"{support} that lod{level - 1}.bin supports"
                )
                counts[level] = support
        for level, n in counts.items():
            want = n * _record_bytes(self.meta, level)
            if sizes[level] != want:
                fd = os.open(self._file(level), os.O_RDWR)
                try:
                    os.ftruncate(fd, HEADER_SIZE + want)
                    os.fsync(fd)  # the repair must be durable before new appends follow it
                finally:
                    os.close(fd)

    def _open_files(self) -> None:
        for level in self._levels():
            f = self._file(level)
            self._counts[level] = (f.stat().st_size - HEADER_SIZE) // _record_bytes(self.meta, level)
            self._files[level] = open(f, "ab")  # noqa: SIM115 - kept open for appends

    # ---- open block --------------------------------------------------------------------

    def _read_open_block(self) -> np.ndarray:
        f = self.path / _OPEN_FILE
        empty = np.zeros(0, dtype=np.int32)
        try:
            raw = f.read_bytes()
        except FileNotFoundError:
            return empty
        problem = None
        if len(raw) < _OPEN.size:
            problem = f"truncated ({len(raw)} bytes)"
        else:
            magic, version, block, n, crc = _OPEN.unpack_from(raw)
            body = raw[_OPEN.size :]
            if magic != _OPEN_MAGIC:
                problem = f"bad magic {magic!r}"
            elif version != FORMAT_VERSION:
                problem = f"format version is {version}, expected {FORMAT_VERSION}"
            elif n >= self.meta.block_size or len(body) != n * _TOKEN.itemsize:
                problem = f"bad token count {n} for {len(body)} bytes"
            elif zlib.crc32(body, zlib.crc32(raw[: _OPEN.size - 4])) != crc:
                problem = "checksum mismatch"
            elif block != self._counts[0]:
                # Its block was sealed since (tag < blocks) or lost to a torn lod0 write.
                problem = f"tagged for block {block} but the history has {self._counts[0]}"
        if problem is None:
            return np.frombuffer(body, dtype=_TOKEN).astype(np.int32)
        # Remove it: left on disk, a later history could grow back to its tag and revive it.
        f.unlink()
        _fsync_path(self.path)
        self.repairs.append(f"{_OPEN_FILE}: {problem}; open block discarded")
        return empty

    def set_open_tokens(self, tokens: np.ndarray) -> None:
        """Persist the open (partial) block atomically, tagged with its block index."""
        self._check_usable()
        t = self._as_tokens(tokens)
        if len(t) >= self.meta.block_size:
            raise ValueError(f"open block holds < {self.meta.block_size} tokens, got {len(t)}")
        # The tag claims "lod0 has num_blocks blocks": make that durable before the claim.
        if 0 in self._dirty:
            self._sync(0)
        head = _OPEN.pack(_OPEN_MAGIC, FORMAT_VERSION, self._counts[0], len(t), 0)[:-4]
        body = t.tobytes()
        crc = zlib.crc32(body, zlib.crc32(head))
        _write_atomic(self.path / _OPEN_FILE, head + struct.pack("<I", crc) + body)
        _fsync_path(self.path)  # the rename itself must survive a crash
        self._open_tokens = t.copy()

    def open_tokens(self) -> np.ndarray:
        """The open block's tokens (int32, fewer than block_size), a copy."""
        return self._open_tokens.copy()

    # ---- appends -----------------------------------------------------------------------

    def _as_tokens(self, tokens: np.ndarray) -> np.ndarray:
        a = np.asarray(tokens)
        if a.ndim != 1:
            raise ValueError(f"token ids must be 1-D, got shape {list(a.shape)}")
        if a.dtype == _TOKEN:
            return a
        if a.size and a.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got {a.dtype}")
        if a.size and (a.min() < -(2**31) or a.max() >= 2**31):
            raise ValueError("token ids must fit int32")
        return a.astype(_TOKEN)

    def append_blocks(self, tokens: np.ndarray) -> None:
        """Append sealed LOD0 blocks: int32 ids, a whole number of blocks, any batch size."""
        self._check_usable()
        t = np.ascontiguousarray(self._as_tokens(tokens))
        if len(t) % self.meta.block_size:
            raise ValueError(
                f"append_blocks takes whole blocks of {self.meta.block_size} tokens, "
                f"got {len(t)}"
            )
        if not len(t):
            return
        self._files[0].write(memoryview(t).cast("B"))  # buffered; no copy of the batch
        self._counts[0] += len(t) // self.meta.block_size
        self._dirty.add(0)

    def append_gists(self, level: int, gists: np.ndarray) -> None:
        """Append ``[n, embed_dim]`` gists of ``level`` (1..gist_levels).

        For bfloat16 stores pass floats (rounded to nearest even) or raw uint16 bits.
        A level may never hold more gists than its lower level supports.
        """
        self._check_usable()
        self._check_level(level)
        g = np.asarray(gists)
        if g.ndim != 2 or g.shape[1] != self.meta.embed_dim:
            raise ValueError(f"gists must be [n, {self.meta.embed_dim}], got {list(g.shape)}")
        if not len(g):
            return
        support = (
            self._counts[0] if level == 1 else self._counts[level - 1] // self.meta.block_size
        )
        if self._counts[level] + len(g) > support:
            # Reopen would drop them anyway; failing here catches the caller's ordering bug.
            raise ValueError(
                f"level {level} would hold {self._counts[level] + len(g)} gists but the level "
                f"below supports only {support}; append the lower level first"
            )
        disk = _DTYPES[self.meta.dtype]
        if self.meta.dtype == "bfloat16" and g.dtype != np.uint16:
            g = _to_bf16_bits(g)
        g = np.ascontiguousarray(g, dtype=disk)
        self._files[level].write(memoryview(g).cast("B"))
        self._counts[level] += len(g)
        self._dirty.add(level)

    # ---- reads -------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self._counts[0]

    def num_gists(self, level: int) -> int:
        self._check_level(level)
        return self._counts[level]

    def _map(self, level: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        n = self._counts[level]
        cached = self._maps.get(level)
        if cached is not None and cached[0] == n:
            return cached[1]
        if n == 0:
            empty = np.zeros(shape, dtype=dtype)
            empty.flags.writeable = False
            return empty
        self._files[level].flush()  # the map reads the file: push the write buffer out
        m = np.memmap(self._file(level), dtype=dtype, mode="r", offset=HEADER_SIZE, shape=shape)
        self._maps[level] = (n, m)  # a new map only when the level grew; old ones stay valid
        return m

    def blocks(self) -> np.ndarray:
        """Read-only memmap of all sealed tokens, int32 ``[num_blocks * block_size]``."""
        self._check_usable()
        n = self._counts[0] * self.meta.block_size
        return self._map(0, _TOKEN, (n,))

    def gists(self, level: int) -> np.ndarray:
        """Read-only memmap ``[num_gists(level), embed_dim]`` (bfloat16: raw uint16 bits)."""
        self._check_usable()
        self._check_level(level)
        shape = (self._counts[level], self.meta.embed_dim)
        return self._map(level, _DTYPES[self.meta.dtype], shape)

    # ---- durability --------------------------------------------------------------------

    def _sync(self, level: int) -> None:
        f = self._files[level]
        f.flush()
        os.fsync(f.fileno())
        self._dirty.discard(level)

    def write_through(self) -> None:
        """Hand every append so far to the kernel (no fsync): it then survives the process
        being killed, though not a power loss (:meth:`flush`)."""
        self._check_usable()
        for level in self._dirty:
            self._files[level].flush()

    def flush(self) -> None:
        """Make every append so far durable (lod0 first, then the gist levels)."""
        self._check_usable()
        for level in sorted(self._dirty):
            self._sync(level)

    def close(self) -> None:
        """Flush, close the files and release the writer lock (idempotent)."""
        if self._lock_fd is None:
            return
        try:
            self.flush()
        finally:
            self._release()

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_usable(self) -> None:
        if self._lock_fd is None:
            raise StorageError(f"{self.path}: the store is closed")

    def _check_level(self, level: int) -> None:
        if not _is_int(level) or not 1 <= level <= self.meta.gist_levels:
            raise ValueError(f"gist level {level!r} not in 1..{self.meta.gist_levels}")
