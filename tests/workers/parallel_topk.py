"""2 ranks: the TP-global top-K mask / absmax / ternary scale on feature shards equal the single-device
ops on the full tensor (ties included), and the communication they cost.

``argv[1] == "bench"`` adds timings at a realistic size (tokens × features of a row-parallel input)
against the row-parallel linear itself (local matmul + all-reduce of its output)."""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import parallel_common  # noqa: E402,F401  (puts the repo root on sys.path)

from qsparse_dist.layers.global_topk import (  # noqa: E402
    comm_meter,
    tp_global_absmax,
    tp_global_sparsify,
    tp_global_ternary_scale,
    tp_global_topk_mask,
)
from qsparse_dist.ops import LinearRecipe, ternary_scale, topk_mask, topk_sparsify  # noqa: E402
from tests.dist_utils import write_result  # noqa: E402


def shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return x.chunk(world, dim=-1)[rank].contiguous()


def inputs(seed: int, rows: int, d: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g)
    relu = torch.relu(torch.randn(rows, d, generator=g))  # ~50 % exact zeros: ties at the threshold
    coarse = torch.randint(-3, 4, (rows, d), generator=g).float()  # 7 values: massive ties
    spiky = torch.zeros(rows, d)
    spiky[:, :3] = 5.0  # all large entries on rank 0
    return {"gauss": x, "relu": relu, "coarse": coarse, "spiky_rank0": spiky + 0.01 * x}


def correctness(rank: int, world: int) -> dict:
    out = {"mask_mismatch": 0, "cases": 0, "absmax_diff": 0.0, "scale_diff": 0.0, "rescale_diff": 0.0,
           "grad_diff": 0.0}
    for d in (8, 64, 96):
        for x in inputs(d, 6, d).values():
            for s in (0.0, 0.1, 0.5, 0.625, 0.9):
                full = shard(topk_mask(x, s), rank, world)
                for method in ("candidates", "radix", "auto"):
                    local = tp_global_topk_mask(shard(x, rank, world), s, dist.group.WORLD, method=method)
                    out["mask_mismatch"] += int((local != full).sum())
                    out["cases"] += 1
                xb = x.bfloat16()
                local = tp_global_topk_mask(shard(xb, rank, world), s, dist.group.WORLD, method="radix")
                out["mask_mismatch"] += int((local != shard(topk_mask(xb, s), rank, world)).sum())
                out["cases"] += 1
            out["absmax_diff"] = max(out["absmax_diff"], float(
                (tp_global_absmax(shard(x, rank, world), dist.group.WORLD) - x.abs().amax(-1, keepdim=True)).abs().max()))
            w = x.t().contiguous()  # any tensor split in equal shards
            sc = tp_global_ternary_scale(shard(w, rank, world), dist.group.WORLD)
            out["scale_diff"] = max(out["scale_diff"], float((sc - ternary_scale(w)).abs()))
            # STE backward and the L2 re-scale with its differentiable all-reduce
            recipe = LinearRecipe(kind="qsparse", sparsity=0.5, rescale=True)
            xs = shard(x, rank, world).requires_grad_(True)
            y = tp_global_sparsify(xs, recipe, dist.group.WORLD)
            xf = x.clone().requires_grad_(True)
            yf = topk_sparsify(xf, 0.5, rescale=True)
            out["rescale_diff"] = max(out["rescale_diff"], float((y - shard(yf, rank, world)).abs().max()))
            wgt = torch.linspace(-1, 1, d).expand_as(x)
            (y * shard(wgt, rank, world)).sum().backward()
            (yf * wgt).sum().backward()
            out["grad_diff"] = max(out["grad_diff"], float((xs.grad - shard(xf.grad, rank, world)).abs().max()))
    # communication volume of one global top-K call, formula check
    x = torch.randn(32, 64)
    for method in ("candidates", "radix"):
        with comm_meter() as m:
            tp_global_topk_mask(shard(x, rank, world), 0.5, dist.group.WORLD, method=method)
        out[f"bytes_{method}"] = m.bytes
        out[f"calls_{method}"] = m.calls
    return out


def bench(rank: int, world: int, tokens: int, d_full: int, hidden: int, sparsity: float, reps: int = 5) -> dict:
    x = torch.randn(tokens, d_full)
    xs = shard(x, rank, world)
    w = torch.randn(hidden, d_full // world) * 0.02

    def timed(fn):
        fn()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        dist.barrier()
        return (time.perf_counter() - t0) / reps

    def linear():
        y = xs @ w.t()
        dist.all_reduce(y)

    out = {"tokens": tokens, "d_full": d_full, "hidden": hidden, "sparsity": sparsity, "tp": world,
           "linear_allreduce_bytes": tokens * hidden * 4,
           "local_topk_s": timed(lambda: topk_mask(xs, sparsity)),
           "row_linear_with_allreduce_s": timed(linear), "local_matmul_s": timed(lambda: xs @ w.t())}
    for method in ("candidates", "radix"):
        with comm_meter() as m:
            tp_global_topk_mask(xs, sparsity, dist.group.WORLD, method=method)
        out[method] = {"bytes_sent_received": m.bytes, "collectives": m.calls, "comm_s": m.seconds,
                       "total_s": timed(lambda method=method: tp_global_topk_mask(xs, sparsity, dist.group.WORLD,
                                                                                   method=method))}
    return out


def main() -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    rank, world = dist.get_rank(), dist.get_world_size()
    result = correctness(rank, world)
    if len(sys.argv) > 1 and sys.argv[1] == "bench":
        result["bench"] = [bench(rank, world, 2048, 1024, 512, 0.5), bench(rank, world, 2048, 4096, 1024, 0.5),
                           bench(rank, world, 2048, 4096, 1024, 0.9)]
    write_result(result)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
