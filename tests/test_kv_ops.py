"""kv_ops: vLLM 0.32 KV layouts and the MegaContext KV edits, without an engine.

Caches are built by vLLM's own allocation code (``get_kv_cache_config_from_groups`` for
the strides, ``allocate_kv_cache`` -> ``create_kv_cache_views`` for the per-layer views)
and read back through FlashAttention's convention (``kv.transpose(1, 2).split(D, -1)``,
vllm/v1/attention/backends/flash_attn.py), which is the truth every op is checked against.
"""

from __future__ import annotations

import math
import pickle
from types import SimpleNamespace

import pytest
import torch

from mc_vllm.vllm.kv_ops import KVTarget, Rope, SideStore, _rotate, apply_ops, kv_views
from mc_vllm.vllm.records import CopySlots, PlaceGist, RotateKeys, SaveGist

BS = 32


def _old_kv_views(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """worker.kv_views before kv_ops (commit f361ee8): the layout guessed from the shape."""
    if kv.dim() == 5 and kv.shape[0] == 2:
        return kv[0], kv[1]
    nb, h, bs, two_d = kv.shape
    hd = two_d // 2
    flat = kv.view(nb, h, 2 * bs * hd)
    keys = flat[..., : bs * hd].view(nb, h, hd, bs).permute(0, 3, 1, 2)
    vals = flat[..., bs * hd :].view(nb, h, bs, hd).permute(0, 2, 1, 3)
    return keys, vals


def _fa_views(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention's own reading of a layer cache (flash_attn.py), [B, N, H, D] each."""
    return kv.transpose(1, 2).split(kv.shape[-1] // 2, dim=-1)


def _truth(caches: list[torch.Tensor], kind: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's K and V per slot, [num_slots, H, D], copied out via the reference
    convention of ``kind`` (flash: FlashAttention's; cpu: the packing the old code used)."""
    out = []
    for kv in caches:
        k, v = _fa_views(kv) if kind == "flash" else _old_kv_views(kv)
        out.append((k.reshape(-1, *k.shape[2:]).clone(), v.reshape(-1, *v.shape[2:]).clone()))
    return out


def vllm_layer_caches(layout: str, heads: int, dim: int = 64, dtype=torch.float32,
                      layers: int = 3, blocks: int = 6, seed: int = 0) -> list[torch.Tensor]:
    """Per-layer caches laid out by vLLM 0.32's own code (``get_kv_cache_config_from_groups``
    for the strides, ``allocate_kv_cache`` for the views), filled with random K/V written
    through the FA view."""
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.worker.utils import allocate_kv_cache

    lay = KVCacheLayout[layout]
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=heads, head_size=dim, dtype=dtype)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
    # the fields of VllmConfig that get_kv_cache_config_from_groups reads
    cfg = SimpleNamespace(
        cache_config=SimpleNamespace(get_resolved_kv_cache_layout=lambda: lay,
                                     num_gpu_blocks_override=None,
                                     prefix_cache_retention_interval=None),
        attention_config=SimpleNamespace(hisparse_config=None))
    kcfg = get_kv_cache_config_from_groups(
        cfg, [KVCacheGroupSpec(names, spec)], layers * blocks * spec.page_size_bytes)
    assert kcfg.num_blocks == blocks
    by_name = allocate_kv_cache(kcfg, torch.device("cpu"), lay)
    caches = [by_name[n] for n in names]
    g = torch.Generator().manual_seed(seed)
    for kv in caches:
        for t in _fa_views(kv):
            t.copy_(torch.randn(t.shape, generator=g))
    return caches


@pytest.fixture(scope="module")
def vllm_caches():
    pytest.importorskip("vllm")
    return vllm_layer_caches


GRID = [(lay, h, dt) for lay in ("LBNHC", "LBHNC", "BLNHC") for h in (1, 8)
        for dt in (torch.float32, torch.bfloat16)]


def _ids(p):
    return str(p).replace("torch.", "")


def _ref_rotate(x: torch.Tensor, delta: int, rope: Rope) -> torch.Tensor:
    """Independent reference: pairs as complex numbers times e^(i * delta * inv_freq),
    in float64 (neox pairs (i, i + r/2), GPT-J pairs (2i, 2i + 1))."""
    r, xd = rope.rotary_dim, x.double()
    ang = rope.inv_freq.double() * delta
    rot = xd[..., :r]
    if rope.neox:
        z = torch.complex(rot[..., : r // 2], rot[..., r // 2 :]) * torch.polar(torch.ones_like(ang), ang)
        out = torch.cat([z.real, z.imag], dim=-1)
    else:
        z = torch.view_as_complex(rot.unflatten(-1, (-1, 2)).contiguous()) * torch.polar(
            torch.ones_like(ang), ang)
        out = torch.view_as_real(z).flatten(-2)
    return torch.cat([out, xd[..., r:]], dim=-1)


def _rope(dim: int, neox: bool = True, base: float = 10000.0, rotary_dim: int | None = None) -> Rope:
    r = rotary_dim or dim
    return Rope(1.0 / base ** (torch.arange(0, r, 2, dtype=torch.float) / r), r, neox)


def _vec_rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Relative error of each [head_dim] vector: ||a - b|| / ||b||."""
    return (a.double() - b.double()).norm(dim=-1) / b.double().norm(dim=-1)


# --- records -----------------------------------------------------------------------


def test_records_are_frozen_and_picklable():
    ops = [CopySlots([1, 2], [3, 4]), RotateKeys(-5, [3]), SaveGist(3, 0), PlaceGist(0, 7)]
    assert pickle.loads(pickle.dumps(ops)) == ops
    with pytest.raises(AttributeError):
        ops[0].src = []  # type: ignore[misc]
    with pytest.raises(ValueError, match="2 sources for 1"):
        CopySlots([1, 2], [3])


# --- layouts -----------------------------------------------------------------------


@pytest.mark.parametrize("layout,heads,dtype", GRID, ids=_ids)
def test_flash_views_are_the_flash_attention_convention(vllm_caches, layout, heads, dtype):
    """kv_views(kind="flash") reads and writes exactly FA's K and V, in every stride order."""
    (kv,) = vllm_caches(layout, heads, dtype=dtype, layers=1)
    k, v = kv_views(kv, "flash")
    fk, fv = _fa_views(kv)
    assert k.shape == (6, BS, heads, 64) and torch.equal(k, fk) and torch.equal(v, fv)
    k[3, 7] = 1.5  # views, not copies
    assert (fk[3, 7] == 1.5).all() and not (fv[3, 7] == 1.5).all()


def test_old_shape_guessing_views_break_on_flash_layouts(vllm_caches):
    """The old kv_views (CPU packing for any 4-D cache): a view error on LBNHC with 8
    heads (the FA default on H200), silently wrong K/V on LBNHC with 1 head and on LBHNC.
    Every op test below would have failed on it."""
    (kv,) = vllm_caches("LBNHC", 8, layers=1)
    with pytest.raises(RuntimeError, match="view"):
        _old_kv_views(kv)
    for layout, heads in (("LBNHC", 1), ("LBHNC", 8)):
        (kv,) = vllm_caches(layout, heads, layers=1)
        old_k, old_v = _old_kv_views(kv)
        fk, fv = _fa_views(kv)
        assert not torch.equal(old_k, fk) and not torch.equal(old_v, fv)
        new_k, new_v = kv_views(kv, "flash")
        assert torch.equal(new_k, fk) and torch.equal(new_v, fv)


def test_cpu_views_are_the_cpu_attn_packing(vllm_caches):
    """kind="cpu" is the CPU_ATTN packing (LBHNC, K transposed then V per block and head)
    that the old code read and tests/test_vllm.py checks against the model's K/V."""
    (kv,) = vllm_caches("LBHNC", 4, layers=1)
    k, v = kv_views(kv, "cpu")
    ok, ov = _old_kv_views(kv)
    assert torch.equal(k, ok) and torch.equal(v, ov)
    blk = kv[2].reshape(4, -1)  # one block, per head: [K^T (D x 32) | V (32 x D)]
    assert torch.equal(k[2, 5], blk[:, : BS * 64].view(4, 64, BS)[:, :, 5])
    assert torch.equal(v[2, 5], blk[:, BS * 64 :].view(4, BS, 64)[:, 5])


def test_layout_errors(vllm_caches):
    (kv,) = vllm_caches("LBNHC", 2, layers=1)
    with pytest.raises(ValueError, match="unknown KV layout kind"):
        kv_views(kv, "paged")
    with pytest.raises(ValueError, match="needs 32"):
        kv_views(torch.zeros(12, 2, 16, 128), "flash", block_size=32)  # kernel blocks of 16
    with pytest.raises(ValueError, match="not contiguous"):
        kv_views(kv, "cpu")  # CPU_ATTN is head-major only
    with pytest.raises(ValueError, match="not supported"):
        KVTarget([torch.zeros(2, 1, 32, 8, dtype=torch.uint8)], "flash")


# --- ops ---------------------------------------------------------------------------


def _reference_copies(truth, ops):
    """The ops' meaning, one slot at a time and in order, on the per-slot truth."""
    store: dict[int, list] = {}
    for op in ops:
        if isinstance(op, CopySlots):
            for s, d in zip(op.src, op.dst, strict=True):
                for k, v in truth:
                    k[d], v[d] = k[s].clone(), v[s].clone()
        elif isinstance(op, SaveGist):
            store[op.row] = [(k[op.slot].clone(), v[op.slot].clone()) for k, v in truth]
        elif isinstance(op, PlaceGist):
            for (k, v), (sk, sv) in zip(truth, store[op.row], strict=True):
                k[op.slot], v[op.slot] = sk, sv


COPY_OPS = [
    CopySlots([5, 40, 41], [70, 71, 5]),  # 41 -> 5 after 5 was read: one gather/scatter
    CopySlots([70, 100], [100, 150]),  # chained: 150 gets the new 100 (old 5)
    SaveGist(150, 2),
    CopySlots([0, 0, 31], [150, 150, 32]),  # same destination twice, across a page edge
    PlaceGist(2, 33),
    CopySlots([33, 34, 35], [35, 33, 34]),  # a rotation of three slots, in order
]


@pytest.mark.parametrize("layout,heads,dtype", GRID, ids=_ids)
def test_copy_save_place_match_the_flash_convention(vllm_caches, layout, heads, dtype):
    caches = vllm_caches(layout, heads, dtype=dtype)
    truth = _truth(caches, "flash")
    target = KVTarget.build(caches, "flash")
    store = SideStore.for_target(target, 4)
    apply_ops(target, COPY_OPS, store)
    _reference_copies(truth, COPY_OPS)
    for (k, v), (tk, tv) in zip(_truth(caches, "flash"), truth, strict=True):
        assert torch.equal(k, tk) and torch.equal(v, tv)  # exact, and nothing else moved


def test_random_copy_programs_match_in_order_semantics(vllm_caches):
    """Random copy lists with chains, repeats and overlaps: runs split correctly."""
    caches = vllm_caches("LBHNC", 2, dim=16, blocks=2)
    target = KVTarget.build(caches, "flash")
    g = torch.Generator().manual_seed(3)
    for _ in range(30):
        n = int(torch.randint(1, 20, (1,), generator=g))
        src, dst = torch.randint(0, 2 * BS, (2, n), generator=g).tolist()
        truth = _truth(caches, "flash")
        apply_ops(target, [CopySlots(src, dst)])
        _reference_copies(truth, [CopySlots(src, dst)])
        for (k, v), (tk, tv) in zip(_truth(caches, "flash"), truth, strict=True):
            assert torch.equal(k, tk) and torch.equal(v, tv)


def test_cpu_layout_ops(vllm_caches):
    caches = vllm_caches("LBHNC", 2)
    truth = _truth(caches, "cpu")
    target = KVTarget.build(caches, "cpu", ropes=_rope(64))
    apply_ops(target, COPY_OPS, SideStore.for_target(target, 3))
    _reference_copies(truth, COPY_OPS)
    for (k, v), (tk, tv) in zip(_truth(caches, "cpu"), truth, strict=True):
        assert torch.equal(k, tk) and torch.equal(v, tv)
    apply_ops(target, [RotateKeys(9, [3, 64])])
    for (k, v), (tk, tv) in zip(_truth(caches, "cpu"), truth, strict=True):
        torch.testing.assert_close(k[[3, 64]], _ref_rotate(tk[[3, 64]], 9, target.ropes[0]).float())
        assert torch.equal(v, tv) and torch.equal(k[4:64], tk[4:64])


@pytest.mark.parametrize("layout,heads,dtype", GRID, ids=_ids)
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
def test_rotate_keys_matches_the_flash_convention(vllm_caches, layout, heads, dtype, neox):
    """K of the named slots rotated (vs a float64 complex reference), V and all other
    slots untouched; +d then -d is the identity and a then b is a + b, up to rounding."""
    caches = vllm_caches(layout, heads, dtype=dtype)
    rope = _rope(64, neox, rotary_dim=48)  # partial rotary: the last 16 dims pass through
    target = KVTarget.build(caches, "flash", ropes=rope)
    slots = [3, 31, 32, 100, 191]
    # one bf16 rounding is <= 2^-9 of each element; norm-wise 2^-8 leaves room
    one, two = (1e-6, 2e-6) if dtype == torch.float32 else (2.0**-8, 2.0**-7)
    before = _truth(caches, "flash")

    apply_ops(target, [RotateKeys(37, slots)])
    after = _truth(caches, "flash")
    others = [s for s in range(6 * BS) if s not in slots]
    for (k, v), (k0, v0) in zip(after, before, strict=True):
        assert _vec_rel(k[slots], _ref_rotate(k0[slots], 37, rope)).max() <= one
        assert torch.equal(k[slots][..., 48:], k0[slots][..., 48:])
        assert torch.equal(k[others], k0[others]) and torch.equal(v, v0)

    apply_ops(target, [RotateKeys(-37, slots)])
    for (k, _), (k0, _) in zip(_truth(caches, "flash"), before, strict=True):
        assert _vec_rel(k[slots], k0[slots]).max() <= two

    apply_ops(target, [RotateKeys(500, slots), RotateKeys(-123, slots)])
    for (k, _), (k0, _) in zip(_truth(caches, "flash"), before, strict=True):
        assert _vec_rel(k[slots], _ref_rotate(k0[slots], 377, rope)).max() <= 2 * two


def test_kv_sharing_layers_are_edited_once(vllm_caches):
    """vLLM lists a KV-sharing layer's cache again (the same tensor): it is rotated once.
    Distinct layers share one backing storage, so identity is not the storage."""
    c0, c1, c2 = vllm_caches("LBNHC", 2)
    assert c0.untyped_storage().data_ptr() == c2.untyped_storage().data_ptr()
    runner_list = [c0, c1, c2, c1]  # layer 3 reuses layer 1's KV
    target = KVTarget.build(runner_list, "flash", ropes=_rope(64))
    assert len(target.caches) == 3
    before = _truth([c1], "flash")[0][0]
    apply_ops(target, [RotateKeys(11, [7])])
    k = _truth([c1], "flash")[0][0]
    assert _vec_rel(k[7], _ref_rotate(before[7], 11, target.ropes[0])).max() < 1e-6


def test_op_errors(vllm_caches):
    caches = vllm_caches("LBNHC", 2, blocks=2)
    plain = KVTarget.build(caches, "flash")
    with pytest.raises(RuntimeError, match="compact positions need the model's rotary embedding"):
        apply_ops(plain, [RotateKeys(1, [0])])
    with pytest.raises(TypeError, match="unknown KV op"):
        apply_ops(plain, [("copy", [(0, 1)])])  # type: ignore[list-item]
    with pytest.raises(IndexError, match="slot 64 is outside"):
        apply_ops(plain, [CopySlots([0], [64])])
    with pytest.raises(RuntimeError, match="side store"):
        apply_ops(plain, [SaveGist(0, 0)])
    store = SideStore.for_target(plain, 2)
    with pytest.raises(IndexError, match="row 2 out of range"):
        apply_ops(plain, [SaveGist(0, 2)], store)
    with pytest.raises(IndexError, match="row -1"):
        store.place(plain, -1, 0)
    truth = _truth(caches, "flash")  # a refused list changed nothing
    with pytest.raises(IndexError):
        apply_ops(plain, [CopySlots([0], [1]), PlaceGist(5, 3)], store)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(_truth(caches, "flash"), truth, strict=True))


def test_side_store_size():
    caches = [torch.zeros(4, 8, BS, 256, dtype=torch.bfloat16) for _ in range(32)]
    store = SideStore.for_target(KVTarget.build(caches, "flash"), 10)
    assert store.bytes_per_row == 32 * 2 * 8 * 128 * 2 == 131072  # Llama-3-8B shapes
    assert store.nbytes == 10 * 131072 and store.data.dtype == torch.bfloat16


# --- Rope --------------------------------------------------------------------------


class FakeRotary:
    """The attributes Rope.from_module reads, built as vLLM's rotary_embedding/base.py
    does (float32 angles, cache cast to the model dtype); ``mscale`` folds a YaRN-style
    magnitude into cos/sin, ``linear`` divides positions (linear scaling)."""

    def __init__(self, rotary_dim=64, base=10000.0, max_pos=4096, neox=True,
                 mscale=1.0, linear=1.0, dtype=torch.bfloat16):
        self.rotary_dim, self.base, self.is_neox_style = rotary_dim, base, neox
        t = torch.arange(max_pos, dtype=torch.float) / linear
        freqs = torch.einsum("i,j -> ij", t, self._compute_inv_freq(base))
        self.cos_sin_cache = (torch.cat((freqs.cos(), freqs.sin()), dim=-1) * mscale).to(dtype)

    def _compute_inv_freq(self, base):
        return 1.0 / base ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.float) / self.rotary_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_ids)
def test_rope_from_a_plain_rotary_module(dtype):
    assert Rope.from_module(FakeRotary(128, 500000.0, max_pos=131072, dtype=dtype))
    m = FakeRotary(neox=False, dtype=dtype)
    rope = Rope.from_module(m)
    assert (rope.rotary_dim, rope.neox) == (64, False)
    assert torch.equal(rope.inv_freq, m._compute_inv_freq(m.base))
    ropes = Rope.from_modules([m, m, None, FakeRotary()])
    assert ropes[0] is ropes[1] and ropes[2] is None and ropes[3] is not ropes[0]


@pytest.mark.parametrize("kw,why", [
    ({"mscale": 1.1}, "scaled"), ({"mscale": 1.01}, "scaled"), ({"mscale": 0.98}, "scaled"),
    ({"linear": 4.0}, "differ"),
], ids=["mscale1.1", "mscale1.01", "mscale0.98", "linear4"])
def test_rope_refuses_modules_that_are_not_pure_rotations(kw, why):
    with pytest.raises(ValueError, match=f'cannot re-rotate cached keys.*{why}'):
        Rope.from_module(FakeRotary(**kw))


@pytest.mark.parametrize("params,ok", [
    ({}, True),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 2048}, True),
    ({"rope_type": "linear", "factor": 2.0}, False),
    ({"rope_type": "dynamic", "factor": 2.0, "max_trained_positions": 2048}, False),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}, False),
    ({"rope_type": "deepseek_yarn", "factor": 4.0, "original_max_position_embeddings": 2048,
      "mscale": 1.0, "mscale_all_dim": 1.0}, False),
], ids=["default", "llama3", "linear", "dynamic", "yarn", "deepseek_yarn"])
def test_rope_from_vllm_rotary_modules(params, ok):
    """The real vLLM classes, bf16 caches: plain and Llama-3 ropes are accepted (and our
    fp32 rotation matches their cache), scaled variants refused."""
    pytest.importorskip("vllm")
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        m = get_rope(128, max_position=4096, is_neox_style=True, dtype=torch.bfloat16,
                     rope_parameters={"rope_theta": 500000.0, **params})
    if not ok:
        with pytest.raises(ValueError, match='cannot re-rotate cached keys'):
            Rope.from_module(m)
        return
    rope = Rope.from_module(m)
    c, s = rope.cos_sin(1000)
    cs = m.cos_sin_cache[1000].float()
    assert (c - cs[:64]).abs().max() < 2**-7 and (s - cs[64:]).abs().max() < 2**-7


def test_rotate_helper_matches_reference_both_styles():
    x = torch.randn(5, 3, 64)
    for neox in (True, False):
        rope = _rope(64, neox)
        assert _vec_rel(rope.rotate(x, -2001), _ref_rotate(x, -2001, rope)).max() < 1e-6


# --- drift -------------------------------------------------------------------------

# Thresholds on the norm-wise relative error of K vectors after N re-rotations, each
# rounded to bf16: one rounding adds <= 2^-9 relative per element, independent from
# shift to shift, so the error is a random walk ~ sqrt(N) * 2^-8 * c. Measured with
# _drift below (512 tokens x 8 heads x 128 dims, Llama-3 rope base 5e5), max/mean:
#   N                          1            8            32           128
#   ours, +-31 (compaction)    0/0          .0064/.0041  .0121/.0049  .0428/.0111
#   ours, +-1..4095            0/0          .0075/.0049  .0143/.0092  .0274/.0186
#   old,  +-31 (bf16 cache)    .0035/.0017  .0110/.0078  .0386/.0242  .1422/.0945
#   old,  +-1..4095            .0035/.0021  .0088/.0060  .0165/.0119  .0507/.0291
# i.e. ours: mean <= 0.44 sqrt(N) 2^-8, max <= 0.97 sqrt(N) 2^-8. The old way repeats the
# same bf16 cos/sin error at every shift of the same size (compaction shifts by the same
# gap again and again), so its error grows ~N: at 128 shifts mean 2.1, max 3.2 x
# sqrt(N) 2^-8. With random shift sizes its errors partly cancel (mean 0.66 x), so only the
# compaction schedule separates the two reliably.
DRIFT_MEAN = 0.6  # x sqrt(N) * 2^-8
DRIFT_MAX = 1.5


def _llama3_rope() -> Rope:
    return _rope(128, base=500000.0)


def _drift(n: int, schedule: str, old: bool) -> tuple[float, float]:
    """(max, mean) relative error of K after n shifts vs one fp32 rotation to the net
    position, both rounded to bf16."""
    rope = _llama3_rope()
    g = torch.Generator().manual_seed(1)
    signs = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    mags = torch.full((n,), 31) if schedule == "compaction" else torch.randint(1, 4096, (n,), generator=g)
    deltas = (signs * mags).tolist()
    k0 = torch.randn(512, 8, 128, generator=torch.Generator().manual_seed(0)).bfloat16()
    t = torch.arange(4096, dtype=torch.float)  # vLLM's bf16 cos_sin_cache, as base.py builds it
    freqs = torch.einsum("i,j -> ij", t, rope.inv_freq)
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).bfloat16()
    k = k0.clone()
    for d in deltas:
        if old:  # worker._rotate before kv_ops: cos/sin read from the bf16 cache
            cs = cache[abs(d)].float()
            k = _rotate(k, cs[:64], cs[64:] * (1 if d >= 0 else -1), 128, True)
        else:
            k = rope.rotate(k, d)
    ref = rope.rotate(k0.float(), sum(deltas)).bfloat16()
    e = _vec_rel(k, ref)
    return e.max().item(), e.mean().item()


@pytest.mark.parametrize("schedule", ["compaction", "random"])
def test_rotation_drift_bf16(schedule):
    """128 successive bf16 re-rotations stay within DRIFT_* x sqrt(N) x 2^-8 of one exact
    rotation (numbers above); the old bf16-cache rotation exceeds it on compaction shifts."""
    for n in (1, 8, 32, 128):
        mx, mean = _drift(n, schedule, old=False)
        bound = math.sqrt(n) * 2.0**-8
        assert mean <= DRIFT_MEAN * bound and mx <= DRIFT_MAX * bound, (n, mx, mean)
    if schedule == "compaction":
        mx, mean = _drift(128, schedule, old=True)
        bound = math.sqrt(128) * 2.0**-8
        assert mean > DRIFT_MEAN * bound and mx > DRIFT_MAX * bound, (mx, mean)
