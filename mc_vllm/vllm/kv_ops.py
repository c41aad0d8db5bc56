"""vLLM 0.32 KV-cache layouts and the MegaContext KV edits applied to them (torch only).

The one place that knows how a layer's cache is laid out. It imports no vLLM: the worker
hands over the runner's per-layer cache tensors, and a GPU check drives it with plain
tensors (bench/device_check.py).

Every layer's cache is a 4-D tensor ``[num_blocks, kv_heads, block_size, 2*head_dim]``
(``B, H, N, C`` in vLLM's names). A *slot* is ``page_id * block_size + offset``. Layouts
(``kind``):

- ``"flash"``: FlashAttention and FlashInfer, allocated by vLLM's generic
  ``create_kv_cache_views`` (vllm/v1/kv_cache_interface.py). For each token, K is the
  first ``head_dim`` of the last axis and V the second half: both backends read the cache
  as ``kv_cache.transpose(1, 2).split(head_size, dim=-1)``
  (vllm/v1/attention/backends/flash_attn.py ``forward`` and ``do_kv_cache_update``,
  flashinfer.py the same). The *physical* order is a ``KVCacheLayout``
  (vllm/v1/kv_cache_layout.py): LBNHC (token-major, the default without a backend
  preference, vllm/v1/attention/backends/utils.py) or LBHNC (head-major: FlashInfer on
  SM100, ``VLLM_KV_CACHE_LAYOUT=HND``), or a block-outermost one. The views below are
  strided, so every order works.
- ``"cpu"``: CPU_ATTN (vllm/v1/attention/backends/cpu_attn.py, LBHNC only). Each
  (block, head) interior holds K transposed, ``[head_dim, block_size]``, then V,
  ``[block_size, head_dim]`` (checked against the model's own K/V in tests/test_vllm.py).

KV edits are the records in ``records.py`` (``CopySlots``, ``RotateKeys``, ``SaveGist``,
``PlaceGist``); ``apply_ops`` applies a step's list of them in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .records import CopySlots, KVOp, PlaceGist, RotateKeys, SaveGist

BLOCK_SIZE = 32  # MegaContext's block, and the only page size it runs with
KINDS = ("cpu", "flash")
# fp8/nvfp4 caches carry scales (and NVFP4 packs heads differently): rotating or copying
# them needs the backend's quantization, which is not modelled here.
CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_cache(kv: Tensor, kind: str, block_size: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown KV layout kind {kind!r}; expected one of {KINDS}")
    if kv.dim() != 4 or kv.shape[-1] % 2:
        raise ValueError(
            f"expected a per-layer KV cache [num_blocks, kv_heads, block_size, 2*head_dim], "
            f"got shape {tuple(kv.shape)}")
    if kv.shape[2] != block_size:
        raise ValueError(
            f"KV cache block axis is {kv.shape[2]} tokens, MegaContext needs {block_size}: "
            "the attention backend split pages into smaller kernel blocks; run with "
            f"--block-size {block_size} on a backend that accepts it")
    if kind == "cpu":
        _, _, n, c = kv.shape
        if kv.stride(3) != 1 or kv.stride(2) != c or kv.stride(1) != n * c:
            raise ValueError(f"CPU KV cache interior is not contiguous (strides {kv.stride()})")


def kv_views(kv: Tensor, kind: str, block_size: int = BLOCK_SIZE) -> tuple[Tensor, Tensor]:
    """One layer's cache as K and V views, each ``[num_blocks, block_size, kv_heads,
    head_dim]`` (indexed [block, offset, head, dim]). Views share storage: writes go to the
    cache. Raises ValueError for an unknown ``kind``, a wrong shape, or a block axis that is
    not ``block_size``."""
    _check_cache(kv, kind, block_size)
    nb, h, bs, c = kv.shape
    d = c // 2
    if kind == "flash":  # the expression flash_attn.py uses, valid for every stride order
        keys, vals = kv.transpose(1, 2).split(d, dim=-1)
        return keys, vals
    flat = kv.view(nb, h, 2 * bs * d)
    keys = flat[..., : bs * d].view(nb, h, d, bs).permute(0, 3, 1, 2)
    vals = flat[..., bs * d :].view(nb, h, bs, d).permute(0, 2, 1, 3)
    return keys, vals


def _slot_views(kv: Tensor, kind: str, block_size: int) -> list[Tensor]:
    """Views indexed [block, offset, ...] that together hold a whole slot: one for the
    flash layout (K and V side by side in [B, N, H, 2D]), K and V apart for the CPU one."""
    if kind == "flash":
        _check_cache(kv, kind, block_size)
        return [kv.transpose(1, 2)]
    return list(kv_views(kv, kind, block_size))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int, neox: bool) -> Tensor:
    """x [..., head_dim] rotated by the angles whose cos/sin [rotary_dim/2] (float32) are
    given; math in float32, result in x's dtype. Dims past rotary_dim pass through."""
    xf = x.float()
    r = xf[..., :rotary_dim]
    if neox:  # halves: (x[i], x[i + rotary_dim/2]) are a pair
        x1, x2 = r.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:  # GPT-J: interleaved pairs (x[2i], x[2i+1])
        x1, x2 = r[..., 0::2], r[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    if rotary_dim < x.shape[-1]:
        out = torch.cat([out, xf[..., rotary_dim:]], dim=-1)
    return out.to(x.dtype)


class Rope:
    """A layer's rotary embedding, as needed to re-rotate cached keys.

    ``inv_freq``: float32 [rotary_dim/2], the frequency of each pair in radians per
    position. A rotation by ``delta`` positions takes its angles ``delta * inv_freq`` in
    float64 and its cos/sin in float32: never vLLM's ``cos_sin_cache``, which is in the
    model dtype (bf16 on GPU) and whose rounding compounds over repeated shifts.
    """

    def __init__(self, inv_freq: Tensor, rotary_dim: int, neox: bool) -> None:
        inv = torch.as_tensor(inv_freq).detach().to("cpu", torch.float32).flatten()
        if rotary_dim <= 0 or rotary_dim % 2 or inv.numel() != rotary_dim // 2:
            raise ValueError(f"Rope: {inv.numel()} frequencies for rotary_dim {rotary_dim}")
        self.inv_freq = inv
        self.rotary_dim = rotary_dim
        self.neox = neox
        self._inv64: dict[torch.device, Tensor] = {}  # float64 copy per device

    def __repr__(self) -> str:
        return f"Rope(rotary_dim={self.rotary_dim}, neox={self.neox})"

    def cos_sin(self, delta: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """cos and sin of ``delta * inv_freq``, float32 [rotary_dim/2] on ``device``,
        computed there (no host->device copy after the first call per device)."""
        device = torch.device(device)
        inv = self._inv64.get(device)
        if inv is None:
            inv = self._inv64[device] = self.inv_freq.to(device, torch.float64)
        ang = inv * float(delta)
        return ang.cos().float(), ang.sin().float()

    def rotate(self, x: Tensor, delta: int) -> Tensor:
        """Keys x [..., head_dim] rotated by ``delta`` positions (a new tensor, x's dtype)."""
        cos, sin = self.cos_sin(delta, x.device)
        return _rotate(x, cos, sin, self.rotary_dim, self.neox)

    @classmethod
    def from_module(cls, module: Any, positions: Sequence[int] | None = None) -> Rope:
        """The Rope of a vLLM rotary module, duck-typed (``rotary_dim``, ``is_neox_style``,
        ``base``, ``_compute_inv_freq(base)``, buffer ``cos_sin_cache`` [max_pos,
        rotary_dim] = cos half then sin half; vllm/model_executor/layers/rotary_embedding/
        base.py).

        Raises ValueError unless the module is a pure rotation that our frequencies
        reproduce: cos^2 + sin^2 must be 1 on sampled rows of its cache (YaRN, LongRoPE and
        DeepSeek fold an mscale into cos/sin, so a shift would also rescale K), and our
        float32 cos/sin must match those rows within the cache dtype's precision (modules
        whose cache is not ``t * _compute_inv_freq(base)``: linear or dynamic-NTK scaling,
        YaRN's own ``_compute_inv_freq(scaling_factor)``).
        """
        name = type(module).__name__
        try:
            rotary_dim = int(module.rotary_dim)
            inv = module._compute_inv_freq(module.base)
            cache = module.cos_sin_cache
        except AttributeError as e:
            raise ValueError(f"{name} is not a rotary embedding module ({e})") from None
        rope = cls(inv, rotary_dim, bool(module.is_neox_style))
        max_pos = cache.shape[0]
        if positions is None:  # 0, 1, 2, 4, ... and the last row: low and high frequencies
            positions = sorted({0, max_pos - 1, *(2**i for i in range(max_pos.bit_length()))})
        rows = [p for p in positions if 0 <= p < max_pos]
        sampled = cache[rows].detach().to("cpu", torch.float32)
        half = rotary_dim // 2
        cos, sin = sampled[:, :half], sampled[:, half:]
        # bf16 rounds each of cos, sin by <= 2^-9 relative: |cos^2 + sin^2 - 1| <= ~eps/2
        eps = torch.finfo(cache.dtype).eps
        norm = cos.square() + sin.square() - 1
        refuse = f"{name} cannot re-rotate cached keys (compact positions)"
        if norm.abs().max() > eps or norm.mean().abs() > eps / 8:
            raise ValueError(f"{refuse}: its cos/sin are scaled (cos^2+sin^2-1 up to "
                             f"{norm.abs().max():.3g}, e.g. a YaRN/LongRoPE mscale)")
        for i, p in enumerate(rows):
            c, s = rope.cos_sin(p)
            # vLLM builds its cache from float32 angles: their error grows with p
            tol = eps + p * 2.0**-20
            err = max((c - cos[i]).abs().max().item(), (s - sin[i]).abs().max().item())
            if err > tol:
                raise ValueError(f"{refuse}: its cos/sin at position {p} differ from "
                                 f"cos/sin(p * inv_freq) by {err:.3g}")
        return rope

    @classmethod
    def from_modules(cls, modules: Sequence[Any | None]) -> list[Rope | None]:
        """One Rope per layer from each layer's rotary module (None stays None), built once
        per distinct module: vLLM's ``get_rope`` shares one module across most layers."""
        built: dict[int, Rope] = {}
        out: list[Rope | None] = []
        for m in modules:
            if m is not None and id(m) not in built:
                built[id(m)] = cls.from_module(m)
            out.append(None if m is None else built[id(m)])
        return out


@dataclass
class KVTarget:
    """The KV caches MegaContext edits on one worker: one tensor per attention layer that
    owns KV (``caches``), all ``[num_blocks, kv_heads, block_size, 2*head_dim]`` with one
    dtype and device, in layout ``kind``, and each layer's Rope (None: no re-rotation).
    Build it with ``KVTarget.build``, which drops layers that share another's KV."""

    caches: list[Tensor]
    kind: str
    block_size: int = BLOCK_SIZE
    ropes: list[Rope | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.caches:
            raise ValueError("KVTarget needs at least one KV cache")
        if not self.ropes:
            self.ropes = [None] * len(self.caches)
        if len(self.ropes) != len(self.caches):
            raise ValueError(f"{len(self.ropes)} ropes for {len(self.caches)} KV caches")
        first = self.caches[0]
        for kv in self.caches:
            _check_cache(kv, self.kind, self.block_size)
            if (kv.shape, kv.dtype, kv.device) != (first.shape, first.dtype, first.device):
                raise ValueError("all KV caches must share shape, dtype and device; got "
                                 f"{tuple(kv.shape)} {kv.dtype} {kv.device} and "
                                 f"{tuple(first.shape)} {first.dtype} {first.device}")
        if first.dtype not in CACHE_DTYPES:
            raise ValueError(f"KV cache dtype {first.dtype} is not supported (quantized "
                             "caches need their scales); use kv_cache_dtype='auto'")

    @classmethod
    def build(
        cls,
        caches: Sequence[Tensor],
        kind: str,
        block_size: int = BLOCK_SIZE,
        ropes: Rope | Sequence[Rope | None] | None = None,
    ) -> KVTarget:
        """A target over ``caches`` (e.g. vLLM's ``runner.kv_caches``), each distinct KV
        tensor once. KV-sharing layers appear there as the same tensor again
        (vllm/v1/worker/gpu_model_runner.py ``initialize_kv_cache_tensors``); editing
        them twice would rotate twice. Every layer's view lives in one backing allocation,
        so identity is the view's address, shape and strides, not its storage. ``ropes``:
        one per cache (a duplicate keeps the first's) or one for all."""
        if ropes is None or isinstance(ropes, Rope):
            ropes = [ropes] * len(caches)
        if len(ropes) != len(caches):
            raise ValueError(f"{len(ropes)} ropes for {len(caches)} KV caches")
        seen: set[tuple] = set()
        kept, kept_ropes = [], []
        for kv, rope in zip(caches, ropes, strict=True):
            key = (kv.data_ptr(), tuple(kv.shape), kv.stride())
            if key not in seen:
                seen.add(key)
                kept.append(kv)
                kept_ropes.append(rope)
        return cls(kept, kind, block_size, kept_ropes)

    @property
    def device(self) -> torch.device:
        return self.caches[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.caches[0].dtype

    @property
    def kv_heads(self) -> int:
        return self.caches[0].shape[1]

    @property
    def head_dim(self) -> int:
        return self.caches[0].shape[3] // 2

    @property
    def num_slots(self) -> int:
        return self.caches[0].shape[0] * self.block_size

    def check_slots(self, slots: Sequence[int]) -> None:
        """IndexError unless every slot is in [0, num_slots): an out-of-range index on
        CUDA is a device-side assert that kills the worker, so check on the host."""
        if slots and (min(slots) < 0 or max(slots) >= self.num_slots):
            bad = next(s for s in slots if not 0 <= s < self.num_slots)
            raise IndexError(f"slot {bad} is outside the KV cache (0..{self.num_slots - 1})")


class SideStore:
    """Seal-time gist KV kept outside vLLM's pool: one preallocated tensor
    ``[num_rows, num_layers, 2 (K, V), kv_heads, head_dim]`` in the cache dtype on the
    cache device, so its memory is fixed and countable when it is created.
    ``bytes_per_row`` = num_layers * 2 * kv_heads * head_dim * itemsize (128 KiB at
    Llama-3-8B shapes in bf16: 1/32 of a page's KV)."""

    def __init__(
        self, num_rows: int, num_layers: int, kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device | str,
    ) -> None:
        # zeros, not empty: on CPU vLLM sizes the KV cache from RSS, so pages must be touched
        self.data = torch.zeros(num_rows, num_layers, 2, kv_heads, head_dim,
                                dtype=dtype, device=device)

    @classmethod
    def for_target(cls, target: KVTarget, num_rows: int) -> SideStore:
        return cls(num_rows, len(target.caches), target.kv_heads, target.head_dim,
                   target.dtype, target.device)

    @property
    def num_rows(self) -> int:
        return self.data.shape[0]

    @property
    def bytes_per_row(self) -> int:
        return self.data[0].numel() * self.data.element_size()

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def check_row(self, row: int) -> None:
        if not 0 <= row < self.num_rows:
            raise IndexError(f"side-store row {row} out of range: the store has "
                             f"{self.num_rows} rows")

    def check_target(self, target: KVTarget) -> None:
        want = (len(target.caches), 2, target.kv_heads, target.head_dim)
        if (tuple(self.data.shape[1:]), self.data.dtype, self.data.device) != (
                want, target.dtype, target.device):
            raise ValueError(f"side store rows {tuple(self.data.shape[1:])} "
                             f"{self.data.dtype} {self.data.device} do not fit KV target "
                             f"{want} {target.dtype} {target.device}")

    def _pairs(self, target: KVTarget, slot: int, row: int) -> list[tuple[Tensor, Tensor]]:
        """(cache view of the slot, matching store view) per layer, K and V together where
        the layout allows it (flash: one [H, 2D] <-> [2, H, D] copy per layer)."""
        self.check_row(row)
        self.check_target(target)
        target.check_slots([slot])
        b, o = divmod(slot, target.block_size)
        pairs = []
        for i, kv in enumerate(target.caches):
            if target.kind == "flash":
                s = kv.transpose(1, 2)[b, o].unflatten(-1, (2, -1)).transpose(0, 1)
                pairs.append((s, self.data[row, i]))
            else:
                k, v = kv_views(kv, target.kind, target.block_size)
                pairs += [(k[b, o], self.data[row, i, 0]), (v[b, o], self.data[row, i, 1])]
        return pairs

    def save(self, target: KVTarget, slot: int, row: int) -> None:
        """Copy ``slot``'s K and V (every layer) into ``row``. IndexError: bad row/slot."""
        for cache, stored in self._pairs(target, slot, row):
            stored.copy_(cache)

    def place(self, target: KVTarget, row: int, slot: int) -> None:
        """Write ``row`` into ``slot`` (K and V, every layer). IndexError: bad row/slot."""
        for cache, stored in self._pairs(target, slot, row):
            cache.copy_(stored)


def _runs(src: list[int], dst: list[int]) -> list[tuple[list[int], list[int]]]:
    """Split in-order copies into runs applied as one gather + scatter each: within a run
    no copy reads or writes a slot an earlier copy of the run wrote (a gather reads all
    sources before the scatter writes, so reading a slot written later is fine)."""
    runs: list[tuple[list[int], list[int]]] = []
    written: set[int] = set()
    for s, d in zip(src, dst, strict=True):
        if not runs or s in written or d in written:
            runs.append(([], []))
            written = set()
        runs[-1][0].append(s)
        runs[-1][1].append(d)
        written.add(d)
    return runs


def _upload(values: list[int], device: torch.device) -> Tensor:
    """One int64 tensor on ``device``; on CUDA from pinned memory, without blocking (the
    caching host allocator keeps the buffer until the copy has run)."""
    cuda = device.type == "cuda"
    host = torch.tensor(values, dtype=torch.int64, pin_memory=cuda)
    return host.to(device, non_blocking=True) if cuda else host


def apply_ops(target: KVTarget, ops: Sequence[KVOp], side_store: SideStore | None = None) -> None:
    """Apply a step's KV edits to ``target``, in order.

    All ops are checked before any is applied, and the block/offset indices of all of
    them go to the device in one copy, reused by every layer. Raises IndexError (slot or
    side-store row out of range), ValueError (RotateKeys naming a slot twice),
    RuntimeError (RotateKeys without every layer's Rope: "compact positions need the
    model's rotary embedding"; Save/PlaceGist without a side store), TypeError (not a
    KVOp).
    """
    bs = target.block_size
    values: list[int] = []  # [blocks..., offsets...] per index set, concatenated
    plan: list[tuple] = []

    def add(slots: list[int]) -> tuple[int, int]:
        values.extend([s // bs for s in slots] + [s % bs for s in slots])
        return len(values) - 2 * len(slots), len(slots)

    for op in ops:
        if isinstance(op, CopySlots):
            target.check_slots(op.src + op.dst)
            for src, dst in _runs(op.src, op.dst):
                plan.append(("copy", add(src), add(dst)))
        elif isinstance(op, RotateKeys):
            if any(r is None for r in target.ropes):
                raise RuntimeError("compact positions need the model's rotary embedding")
            target.check_slots(op.slots)
            if len(set(op.slots)) != len(op.slots):
                raise ValueError("RotateKeys names a slot twice")
            if op.delta and op.slots:
                plan.append(("rot", add(op.slots), op.delta))
        elif isinstance(op, SaveGist | PlaceGist):
            if side_store is None:
                raise RuntimeError(f"{type(op).__name__} needs a side store")
            side_store.check_row(op.row)
            side_store.check_target(target)
            target.check_slots([op.slot])
            plan.append(("gist", op))
        else:
            raise TypeError(f"unknown KV op {type(op).__name__}: expected one of {KVOp}")
    idx = _upload(values, target.device) if values else None

    def at(ref: tuple[int, int]) -> tuple[Tensor, Tensor]:
        start, n = ref
        return idx[start : start + n], idx[start + n : start + 2 * n]

    with torch.no_grad():
        for entry in plan:
            if entry[0] == "copy":
                (sb, so), (db, do) = at(entry[1]), at(entry[2])
                for kv in target.caches:
                    for t in _slot_views(kv, target.kind, bs):
                        t[db, do] = t[sb, so]  # the gather copies before the scatter
            elif entry[0] == "rot":
                b, o = at(entry[1])
                cos_sin: dict[int, tuple[Tensor, Tensor]] = {}  # per distinct Rope
                for kv, rope in zip(target.caches, target.ropes, strict=True):
                    assert rope is not None
                    if id(rope) not in cos_sin:
                        cos_sin[id(rope)] = rope.cos_sin(entry[2], target.device)
                    keys = kv_views(kv, target.kind, bs)[0]
                    keys[b, o] = _rotate(keys[b, o], *cos_sin[id(rope)], rope.rotary_dim,
                                         rope.neox)
            else:
                op = entry[1]
                assert side_store is not None
                if isinstance(op, SaveGist):
                    side_store.save(target, op.slot, op.row)
                else:
                    side_store.place(target, op.row, op.slot)


__all__ = [
    "BLOCK_SIZE", "KINDS", "KVTarget", "Rope", "SideStore", "apply_ops", "kv_views",
]
