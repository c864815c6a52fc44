"""Pick the fastest :class:`~.gemv.GemvConfig` for one decode projection shape, on the GPU.

Candidates: a few tile shapes × split-K factors giving 2/4/8 programs per SM.  Each is timed over
enough distinct weight copies to exceed the L2 cache (the decode loop streams every weight once per
token), in a CUDA graph, median of several replays.  Meant for load time of a runtime and for
``tools/bench_*``; takes a few seconds per shape (compilation included).
"""

from __future__ import annotations

import statistics

import torch

from ..ops import kept_count, pack_ternary
from .gemv import GemvConfig, gather_gemv, sparse_gemv, ternary_gemv

__all__ = ["SPARSE_TILES", "TERNARY_TILES", "candidate_configs", "time_graph_ms", "tune_gemv"]

# (block_n outputs, block_k, num_warps)
SPARSE_TILES = [(64, 64, 4), (128, 32, 4), (128, 64, 8), (64, 128, 4), (256, 32, 8), (32, 128, 4)]
TERNARY_TILES = [(256, 32, 4), (256, 64, 8), (512, 32, 8), (128, 64, 4), (512, 16, 4), (1024, 16, 8)]


def candidate_configs(tiles, k: int, n: int, sms: int, per_sm=(2, 4, 8)) -> list[GemvConfig]:
    out = set()
    for bn, bk, nw in tiles:
        n_tiles = -(-n // bn)
        for c in per_sm:
            split = max(1, min(-(-c * sms // n_tiles), k // (2 * bk)))
            out.add(GemvConfig(block_n=bn, block_k=bk, split_k=split, num_warps=nw))
    return sorted(out, key=str)


def time_graph_ms(fn, iters: int = 15, warmup: int = 2) -> float:
    """Median ms of one replay of ``fn`` captured in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def tune_gemv(kind: str, k: int, n: int, sparsity: float = 0.0, *, device="cuda",
              l2_bytes: int | None = None, tiles=None, gather: bool = True) -> tuple[GemvConfig, float]:
    """Best config for ``kind`` in {"sparse", "ternary"} at ``[K, N]``; returns (config, µs/call).

    With ``sparsity > 0`` and ``gather`` the candidates run :func:`gather_gemv` on the compacted
    kept list (what ``DecodeLinear`` runs at batch 1), else the predicated-row kernels."""
    if kind not in ("sparse", "ternary"):
        raise ValueError(f"kind must be 'sparse' or 'ternary', got {kind!r}")
    props = torch.cuda.get_device_properties(device)
    l2 = l2_bytes or getattr(props, "L2_cache_size", 50 * 2**20)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, k, device=device, generator=g)
    kept = k
    idx = None
    if sparsity > 0:
        kept = kept_count(k, sparsity)
        idx = x.abs().topk(kept, dim=1).indices.sort(dim=1).values.to(torch.int32)
        x = x * torch.zeros_like(x).scatter_(1, idx.long(), 1.0)
    use_gather = gather and idx is not None and (kind == "sparse" or n % 16 == 0)
    if kind == "sparse":
        nbytes = k * n * 2
        xin = x.to(torch.bfloat16)
        vals = xin.gather(1, idx.long()) if use_gather else None
        mats = [torch.randn(k, n, device=device, dtype=torch.bfloat16, generator=g)
                for _ in range(max(2, min(64, -(-4 * l2 // nbytes))))]
        tiles = tiles or SPARSE_TILES
    else:
        nbytes = k * ((n + 3) // 4)
        q = torch.clamp(torch.round(x / x.abs().max() * 127), -128, 127).to(torch.int8)
        vals = q.gather(1, idx.long()) if use_gather else None
        sx = torch.ones(1, device=device)
        sw = torch.ones((), device=device)
        mats = [pack_ternary(torch.randint(-1, 2, (k, n), device=device, dtype=torch.int8, generator=g))
                for _ in range(max(2, min(256, -(-4 * l2 // nbytes))))]
        tiles = tiles or TERNARY_TILES
    cands = candidate_configs(tiles, kept if use_gather else k, n, props.multi_processor_count)
    acc = torch.zeros(len(mats), 1, n, device=device)
    best = None
    for cfg in cands:
        if use_gather:
            def run(cfg=cfg):
                acc.zero_()
                for i, w in enumerate(mats):
                    gather_gemv(vals, idx, w, n, x_scale=None if kind == "sparse" else sx,
                                w_scale=None if kind == "sparse" else sw, config=cfg, out=acc[i],
                                out_is_zeroed=True)
        elif kind == "sparse":
            def run(cfg=cfg):
                acc.zero_()
                for i, w in enumerate(mats):
                    sparse_gemv(xin, w, config=cfg, out=acc[i], out_is_zeroed=True)
        else:
            def run(cfg=cfg):
                acc.zero_()
                for i, w in enumerate(mats):
                    ternary_gemv(q, sx, w, sw, n, skip_zeros=sparsity > 0, config=cfg, out=acc[i],
                                 out_is_zeroed=True)
        us = time_graph_ms(run) * 1e3 / len(mats)
        if best is None or us < best[1]:
            best = (cfg, us)
    return best
