"""One-shot device check of the worker's KV edits (mc_vllm/vllm/kv_ops.py), torch only.

    python bench/device_check.py              # CUDA: Llama-3-8B shapes, bf16 (~16 GiB caches)
    python bench/device_check.py --small      # CPU, small shapes, a few seconds
    python bench/device_check.py --json out.json

The lent GPU machine has torch but no vLLM, so nothing here imports vLLM: per-layer caches
are built the way vLLM 0.32 lays them out (one backing buffer, a 5-D ``[L, B, H, N, C]``
view with a ``KVCacheLayout`` stride order, one 4-D view per layer: ``create_kv_cache_views``
in vllm/v1/kv_cache_interface.py; tests/test_device_check.py checks the strides against
vLLM's own). Checks, one row each in the final table; exit status 1 if any row FAILs:

a. layout round trip through FlashAttention's view (K = [..., :D], V = [..., D:] of
   ``kv.transpose(1, 2)``), LBNHC and LBHNC, 1 and 8 KV heads: CopySlots, SaveGist and
   PlaceGist exact against a one-slot-at-a-time reference, nothing else touched;
   RotateKeys +d then -d within 2^-7 relative (about one bf16 ulp) per K vector.
b. rotation drift after 1/8/32/128 bf16 re-rotations vs one fp32 rotation to the net
   position (thresholds and measured numbers: tests/test_kv_ops.py, test_rotation_drift_bf16),
   against the old way (cos/sin read from vLLM's bf16 ``cos_sin_cache``).
c. CUDA-graph semantics (CUDA only): a replayed graph ignores a new ``inputs_embeds``
   argument; a graph captured on a persistent ``inputs_embeds`` buffer sees in-place row
   writes and in-place position writes between replays, and not a rebound buffer.
d. cost of one typical refocus at W_max = 8192: 4 collapse/expand page moves (128 slot
   copies), 32 compaction copies, one RotateKeys over 4096 slots, one save, one place:
   median ms (synchronized) and host->device copies / syncs seen by torch.profiler.
e. side store: bytes per row and the allocator's delta for 10k rows (131072 B per row at
   8B shapes = 32 layers x K,V x 8 heads x 128 x 2 B).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout

from mc_vllm.vllm.kv_ops import KVTarget, Rope, SideStore, _rotate, apply_ops  # noqa: E402
from mc_vllm.vllm.records import CopySlots, PlaceGist, RotateKeys, SaveGist  # noqa: E402

BS = 32
# vllm/v1/kv_cache_layout.py: physical order of the logical axes [L, B, H, N, C]
STRIDE_ORDER = {"LBNHC": (0, 1, 3, 2, 4), "LBHNC": (0, 1, 2, 3, 4)}
FULL = {"layers": 32, "heads": 8, "dim": 128, "pages": 4096, "w_max": 8192}
SMALL = {"layers": 4, "heads": 8, "dim": 64, "pages": 64, "w_max": 1024}
# tests/test_kv_ops.py: mean and max norm-wise relative error <= c * sqrt(N) * 2^-8
DRIFT_MEAN, DRIFT_MAX = 0.6, 1.5
ROT_TOL = 2.0**-7  # +d then -d: two bf16 roundings

Row = dict[str, str]


def make_caches(layout: str, layers: int, pages: int, heads: int, dim: int,
                dtype: torch.dtype, device: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(backing buffer, per-layer [pages, heads, 32, 2*dim] views) with vLLM's strides."""
    shape = (layers, pages, heads, BS, 2 * dim)
    strides, size = [0] * 5, 1
    for axis in reversed(STRIDE_ORDER[layout]):
        strides[axis] = size
        size *= shape[axis]
    buf = torch.empty(size, dtype=dtype, device=device)
    view = buf.as_strided(shape, strides)
    return buf, [view[i] for i in range(layers)]


def fa_views(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention's reading of a layer cache (flash_attn.py): K, V [B, N, H, D]."""
    return kv.transpose(1, 2).split(kv.shape[-1] // 2, dim=-1)


def llama3_rope(dim: int) -> Rope:
    return Rope(1.0 / 500000.0 ** (torch.arange(0, dim, 2, dtype=torch.float) / dim), dim, True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def vec_rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).norm(dim=-1) / b.float().norm(dim=-1)


# --- a. layout round trip ------------------------------------------------------------


def reference(caches: list[torch.Tensor], ops: list) -> None:
    """The ops' meaning, one slot at a time, on FlashAttention's view."""
    store: dict[int, list[torch.Tensor]] = {}
    slots = [kv.transpose(1, 2) for kv in caches]  # [B, N, H, 2D]: K then V per token
    for op in ops:
        if isinstance(op, CopySlots):
            for s, d in zip(op.src, op.dst, strict=True):
                for t in slots:
                    t[divmod(d, BS)] = t[divmod(s, BS)].clone()
        elif isinstance(op, SaveGist):
            store[op.row] = [t[divmod(op.slot, BS)].clone() for t in slots]
        elif isinstance(op, PlaceGist):
            for t, x in zip(slots, store[op.row], strict=True):
                t[divmod(op.slot, BS)] = x


def round_trip(layout: str, heads: int, shape: dict, device: str, g: torch.Generator) -> Row:
    """One layout: random K/V through FA's view, every op vs the reference (a function, so
    the 2 x 16 GiB of buffers are freed on return)."""
    buf, caches = make_caches(layout, shape["layers"], shape["pages"], heads, shape["dim"],
                              torch.bfloat16, device)
    for kv in caches:  # random K/V written through FA's view
        for t in fa_views(kv):
            t.normal_()
    ns = shape["pages"] * BS
    ops = [
        CopySlots([5, 40, 41, ns - 1], [70, 71, 5, 100]),
        CopySlots([70, 100, ns - 33], [100, 150, 31]),  # chained
        SaveGist(150, 2),
        CopySlots([0, 0], [150, 150]),
        PlaceGist(2, ns - 2),
        CopySlots([33, 34, 35], [35, 33, 34]),
        CopySlots(*torch.randint(0, ns, (2, 128), generator=g).tolist()),  # repeats, chains
    ]
    target = KVTarget.build(caches, "flash", ropes=llama3_rope(shape["dim"]))
    expected = buf.clone()
    exp_caches = [expected.as_strided(kv.shape, kv.stride(), kv.storage_offset())
                  for kv in caches]
    apply_ops(target, ops, SideStore.for_target(target, 4))
    reference(exp_caches, ops)
    exact = torch.equal(buf, expected)

    slots = torch.randperm(ns, generator=g)[: min(4096, ns)].tolist()
    apply_ops(target, [RotateKeys(1234, slots), RotateKeys(-1234, slots)])
    idx = torch.tensor(slots, device=device)
    b, o = idx // BS, idx % BS
    err = 0.0
    for kv, ref in zip(caches, exp_caches, strict=True):
        k, rk = fa_views(kv)[0], fa_views(ref)[0]
        err = max(err, vec_rel(k[b, o], rk[b, o]).max().item())
        k[b, o] = rk[b, o]  # undo, then nothing else may differ
    untouched = torch.equal(buf, expected)
    ok = exact and untouched and err <= ROT_TOL
    return {"check": "a. layout round trip", "case": f"{layout} H={heads}",
            "status": "PASS" if ok else "FAIL",
            "detail": f"copy/save/place exact={exact}; rot +-d over {len(slots)} slots max "
                      f"rel err {err:.2e} (<= {ROT_TOL:.2e}); rest untouched={untouched}"}


def check_layouts(shape: dict, device: str, rows: list[Row]) -> None:
    g = torch.Generator().manual_seed(0)
    for layout in STRIDE_ORDER:
        for heads in (1, 8):
            try:
                rows.append(round_trip(layout, heads, shape, device, g))
            except Exception as e:  # e.g. a view error: report it, try the next layout
                rows.append({"check": "a. layout round trip", "case": f"{layout} H={heads}",
                             "status": "FAIL", "detail": f"{type(e).__name__}: {e}"})
            if device.startswith("cuda"):
                torch.cuda.empty_cache()


# --- b. rotation drift ---------------------------------------------------------------


def drift(n: int, schedule: str, old: bool, device: str) -> tuple[float, float]:
    """(max, mean) relative error of K [512, 8, 128] bf16 after n shifts vs one fp32
    rotation to the net position, as in tests/test_kv_ops.py."""
    rope = llama3_rope(128)
    g = torch.Generator().manual_seed(1)
    signs = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    mags = (torch.full((n,), 31) if schedule == "compaction"
            else torch.randint(1, 4096, (n,), generator=g))
    deltas = (signs * mags).tolist()
    k0 = torch.randn(512, 8, 128, generator=torch.Generator().manual_seed(0)).bfloat16().to(device)
    t = torch.arange(4096, dtype=torch.float)  # vLLM's bf16 cos_sin_cache (rotary_embedding/base.py)
    freqs = torch.einsum("i,j -> ij", t, rope.inv_freq)
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).bfloat16().to(device)
    k = k0.clone()
    for d in deltas:
        if old:
            cs = cache[abs(d)].float()
            k = _rotate(k, cs[:64], cs[64:] * (1 if d >= 0 else -1), 128, True)
        else:
            k = rope.rotate(k, d)
    e = vec_rel(k, rope.rotate(k0.float(), sum(deltas)).bfloat16())
    return e.max().item(), e.mean().item()


def check_drift(device: str, rows: list[Row]) -> None:
    for schedule in ("compaction", "random"):
        for n in (1, 8, 32, 128):
            bound = math.sqrt(n) * 2.0**-8
            mx, mean = drift(n, schedule, False, device)
            omx, omean = drift(n, schedule, True, device)
            ok = mean <= DRIFT_MEAN * bound and mx <= DRIFT_MAX * bound
            rows.append({"check": "b. rotation drift", "case": f"{schedule} N={n}",
                         "status": "PASS" if ok else "FAIL",
                         "detail": f"ours max/mean {mx:.4f}/{mean:.4f} (<= {DRIFT_MAX * bound:.4f}"
                                   f"/{DRIFT_MEAN * bound:.4f}); old bf16-cache "
                                   f"{omx:.4f}/{omean:.4f}"})


# --- c. CUDA graphs ------------------------------------------------------------------


def capture(fn: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up off the capture stream, as torch's docs do
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def check_graphs(device: str, rows: list[Row]) -> None:
    name = "c. CUDA graphs"
    if not device.startswith("cuda"):
        for case in ("replay ignores inputs_embeds arg", "embeds buffer row writes",
                     "position writes"):
            rows.append({"check": name, "case": case, "status": "SKIP", "detail": "no CUDA"})
        return
    torch.manual_seed(0)
    vocab, dim, n = 1000, 256, 16
    emb = torch.nn.Embedding(vocab, dim).to(device)
    pos_emb = torch.nn.Embedding(4096, dim).to(device)
    lin = torch.nn.Linear(dim, dim).to(device)

    def model(input_ids, positions, inputs_embeds=None):
        x = emb(input_ids) if inputs_embeds is None else inputs_embeds
        return lin(x + pos_emb(positions))

    def close(a, b):
        return torch.allclose(a, b, atol=1e-4, rtol=1e-4)

    with torch.no_grad():
        ids = torch.randint(0, vocab, (n,), device=device)
        pos = torch.arange(n, device=device)
        g1, out1 = capture(lambda: model(ids, pos))

        def wrapper(input_ids, positions, inputs_embeds=None):  # vLLM's CUDAGraphWrapper
            g1.replay()  # replays the capture, whatever it is called with
            return out1

        other = torch.randn(n, dim, device=device)
        y = wrapper(ids, pos, inputs_embeds=other).clone()
        ignored = close(y, model(ids, pos)) and not close(y, model(ids, pos, other))
        rows.append({"check": name, "case": "replay ignores inputs_embeds arg",
                     "status": "PASS" if ignored else "FAIL",
                     "detail": "output is the captured input_ids path (documents review item 4)"})

        embeds = emb(ids).clone()  # the persistent buffer (enable_prompt_embeds route)
        positions = pos.clone()
        g2, out2 = capture(lambda: model(None, positions, embeds))
        embeds[torch.tensor([2, 5], device=device)] = torch.randn(2, dim, device=device)
        g2.replay()
        rows_ok = close(out2, model(None, positions, embeds))
        positions.copy_(pos + 100)
        g2.replay()
        pos_ok = close(out2, model(None, positions, embeds))
        seen = out2.clone()
        embeds = torch.randn(n, dim, device=device)  # rebinding: the graph keeps the old one
        g2.replay()
        rebind_ignored = torch.equal(out2, seen)
        rows.append({"check": name, "case": "embeds buffer row writes",
                     "status": "PASS" if rows_ok and rebind_ignored else "FAIL",
                     "detail": f"in-place rows seen={rows_ok}; rebound buffer ignored={rebind_ignored}"})
        rows.append({"check": name, "case": "position writes",
                     "status": "PASS" if pos_ok else "FAIL",
                     "detail": f"in-place positions seen={pos_ok}"})


# --- d. cost of one refocus ----------------------------------------------------------


def refocus_ops(shape: dict, g: torch.Generator) -> list:
    """One refocus of a request whose working context fills W_max slots."""
    pages = torch.randperm(shape["pages"], generator=g)[: shape["w_max"] // BS + 8].tolist()
    own, spare = pages[:-8], pages[-8:]
    ops = []
    for a, b in zip(own[:4], spare[:4], strict=True):  # collapse/expand: whole-page moves
        ops.append(CopySlots([a * BS + i for i in range(BS)], [b * BS + i for i in range(BS)]))
    tail = own[-1] * BS
    ops.append(CopySlots([tail + i + 1 for i in range(31)] + [spare[4] * BS],
                         [tail + i for i in range(31)] + [tail + 31]))  # compaction
    later = own[len(own) // 2 :]
    ops.append(RotateKeys(-31, [p * BS + i for p in later for i in range(BS)]))
    ops += [SaveGist(spare[5] * BS, 0), PlaceGist(0, spare[6] * BS)]
    return ops


def count_events(fn: Callable[[], None], device: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    names = [e.name for e in prof.events()]
    if not device.startswith("cuda"):
        return "CPU: no host->device copies"
    pinned = sum("HtoD (Pinned" in x for x in names)
    pageable = sum("HtoD" in x for x in names) - pinned  # pageable copies block the host
    syncs = sum(x in ("cudaStreamSynchronize", "cudaEventSynchronize") for x in names)
    launches = sum("LaunchKernel" in x for x in names)
    return (f"H2D copies {pinned} pinned + {pageable} pageable, stream/event syncs {syncs}, "
            f"kernel launches {launches}")


def check_cost(shape: dict, device: str, rows: list[Row]) -> None:
    buf, caches = make_caches("LBNHC", shape["layers"], shape["pages"], shape["heads"],
                              shape["dim"], torch.bfloat16, device)
    buf.normal_()
    target = KVTarget.build(caches, "flash", ropes=llama3_rope(shape["dim"]))
    store = SideStore.for_target(target, 4)
    ops = refocus_ops(shape, torch.Generator().manual_seed(2))
    copies = sum(len(op.src) for op in ops if isinstance(op, CopySlots))
    rotated = sum(len(op.slots) for op in ops if isinstance(op, RotateKeys))
    for _ in range(3):
        apply_ops(target, ops, store)
    times, host = [], []
    for _ in range(10):
        sync(device)
        t0 = time.perf_counter()
        apply_ops(target, ops, store)
        host.append(time.perf_counter() - t0)
        sync(device)
        times.append(time.perf_counter() - t0)
    try:
        events = count_events(lambda: apply_ops(target, ops, store), device)
    except Exception as e:  # the profiler is a report, not a check
        events = f"profiler failed: {type(e).__name__}: {e}"
    rows.append({"check": "d. refocus cost", "case": f"W_max={shape['w_max']} LBNHC",
                 "status": "INFO",
                 "detail": f"{copies} copies + rot {rotated} slots + save + place over "
                           f"{len(target.caches)} layers: median {statistics.median(times) * 1e3:.2f} ms "
                           f"(host {statistics.median(host) * 1e3:.2f} ms); {events}"})


# --- e. side store -------------------------------------------------------------------


def check_side_store(shape: dict, device: str, rows: list[Row]) -> None:
    cuda = device.startswith("cuda")
    sync(device)
    before = torch.cuda.memory_allocated() if cuda else 0
    store = SideStore(10_000, shape["layers"], shape["heads"], shape["dim"], torch.bfloat16, device)
    delta = torch.cuda.memory_allocated() - before if cuda else store.nbytes
    expect = shape["layers"] * 2 * shape["heads"] * shape["dim"] * 2
    ok = store.bytes_per_row == expect and store.nbytes == delta == 10_000 * expect
    rows.append({"check": "e. side store", "case": "10k rows",
                 "status": "PASS" if ok else "FAIL",
                 "detail": f"{store.bytes_per_row} B/row (expected {expect}); allocated "
                           f"{delta / 2**20:.1f} MiB = {delta / 10_000:.0f} B/row"
                           + ("" if cuda else " (CPU: nbytes, no allocator counter)")})
    del store


# --- main ----------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    head = ("check", "case", "status", "detail")
    widths = [max(len(h), *(len(r[h]) for r in rows)) for h in head[:3]] + [0]
    for r in [dict(zip(head, head, strict=True)), *rows]:
        print("  ".join(r[h].ljust(w) for h, w in zip(head, widths, strict=True)).rstrip())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="small shapes (default device: CPU)")
    ap.add_argument("--device", default=None, help="default: cpu with --small, else cuda")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    device = args.device or ("cpu" if args.small else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --small (CPU)", file=sys.stderr)
        return 2
    if device == "cpu":  # small tensors: OpenMP threads only contend (10x slower on 2 busy cores)
        torch.set_num_threads(1)
    shape = SMALL if args.small else FULL
    rows: list[Row] = []
    t0 = time.perf_counter()
    checks = [("a. layout round trip", lambda: check_layouts(shape, device, rows)),
              ("b. rotation drift", lambda: check_drift(device, rows)),
              ("c. CUDA graphs", lambda: check_graphs(device, rows)),
              ("d. refocus cost", lambda: check_cost(shape, device, rows)),
              ("e. side store", lambda: check_side_store(shape, device, rows))]
    for name, check in checks:
        try:
            with torch.no_grad():
                check()
        except Exception as e:  # one broken check must not hide the others' rows
            rows.append({"check": name, "case": "-", "status": "FAIL",
                         "detail": f"{type(e).__name__}: {e}"})
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    failed = sum(r["status"] == "FAIL" for r in rows)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(f"\nkv_ops device check: {name}, torch {torch.__version__}, shapes {shape}, "
          f"{time.perf_counter() - t0:.1f} s")
    print_table(rows)
    print(f"{'FAILED' if failed else 'OK'}: {failed} of {len(rows)} rows failed")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__,
                                         "shape": shape, "rows": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
