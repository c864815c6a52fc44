"""Tensor-parallel *global* Q-Sparse and BitNet statistics for inputs sharded on the feature dim.

A row-parallel linear (attention out-projection, FFN down) receives ``x`` split across the ``P``
ranks of its TP group: rank ``r`` holds features ``[r·d, (r+1)·d)`` of a token's ``D = P·d``.  A
per-shard top-K would keep ``k/P`` per shard, which is *not* what the single-device model computes.
The functions here reproduce the unsharded result exactly:

Global top-K mask (per token, ``k = kept_count(D, s)``), no gradient communication:
    1. the global k-th largest |x| value t and n_gt = #(|x| > t), by one of two exact methods:
       candidates  all-gather c_r = top-min(k, d) of |x_r| (the global top-k is a sub-multiset of
                   ∪_r c_r, so the union's k-th largest is t and its #(> t) is n_gt);
                   P·min(k, d)·4 bytes per token, one round;
       radix       radix select on the float32 bit patterns: 8 rounds, each all-reducing a 16-bin
                   histogram of the next 4-bit digit; 8·16·4 = 512 bytes per token whatever d and k.
       ``method="auto"`` takes the one moving fewer bytes; the default is ``candidates``
       (:data:`DEFAULT_METHOD`, faster on CPU/gloo as measured).
    2. all-gather e_r = #(|x_r| == t)  → ranks keep ties in rank order (= lowest global index
       first, the rule of :func:`qsparse_dist.ops.topk_mask`): keep_r = clamp(k - n_gt - Σ_{q<r} e_q, 0, e_r)
       (P · 8 bytes per token)
    3. local mask = mask_from_threshold(|x_r|, t, keep_r);   y = x ⊙ M  with the STE backward

Block N:M needs no communication when the block size divides the shard (blocks never straddle).

BitNet: the absmean weight scale is per *full* tensor (all-reduce SUM of Σ|W| over the group, one
scalar), and the per-token int8 absmax of a sharded input is the all-reduce MAX of the local absmax
(one value per token).  L2 re-scaling after top-K all-reduces ``‖x‖²`` and ``‖y‖²`` per token with a
differentiable all-reduce (the gradient of a group-wide sum is the group-wide sum of gradients).

With a group of size 1 (or ``group=None``) every function falls back to the single-device op, so a
TP=1 megatron model runs exactly the reference code path.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..ops import (
    LinearRecipe,
    apply_mask,
    dispatch,
    kept_count,
    mask_from_threshold,
    topk_mask,
    topk_threshold,
)
from ..ops.quant import WEIGHT_EPS, fake_quant_activation_int8, fake_quant_weight_ternary, int8_codes_ste

__all__ = [
    "CommMeter",
    "comm_meter",
    "group_size",
    "tp_global_topk_mask",
    "tp_global_sparsify",
    "tp_global_absmax",
    "tp_global_ternary_scale",
    "tp_prepare_input",
    "tp_input_codes",
    "tp_effective_weight",
]


@dataclass
class CommMeter:
    """Bytes and wall time spent in the collectives of this module (``with comm_meter() as m``)."""

    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0
    by_kind: dict[str, list[float]] = field(default_factory=dict)  # kind -> [calls, bytes, seconds]

    def add(self, kind: str, nbytes: int, seconds: float) -> None:
        self.calls += 1
        self.bytes += nbytes
        self.seconds += seconds
        row = self.by_kind.setdefault(kind, [0, 0, 0.0])
        row[0] += 1
        row[1] += nbytes
        row[2] += seconds


_METER: CommMeter | None = None


@contextmanager
def comm_meter():
    """Record the communication of the global top-K / BitNet collectives inside the block."""
    global _METER
    prev, _METER = _METER, CommMeter()
    try:
        yield _METER
    finally:
        _METER = prev


def group_size(group) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _all_gather(t: torch.Tensor, group, kind: str) -> torch.Tensor:
    """``[P, *t.shape]`` of every rank's ``t`` in group-rank order."""
    t = t.contiguous()
    start = time.perf_counter() if _METER is not None else 0.0
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    if _METER is not None:
        _METER.add(kind, t.numel() * t.element_size() * len(out), time.perf_counter() - start)
    return torch.stack(out)


def _all_reduce(t: torch.Tensor, group, op, kind: str) -> torch.Tensor:
    start = time.perf_counter() if _METER is not None else 0.0
    dist.all_reduce(t, op=op, group=group)
    if _METER is not None:
        _METER.add(kind, t.numel() * t.element_size(), time.perf_counter() - start)
    return t


RADIX_BITS = 4
"""Digit width of the radix select: 32 / 4 = 8 rounds of a ``[tokens, 16]`` int32 histogram."""

DEFAULT_METHOD = "candidates"
"""Threshold method of the global top-K.  ``candidates`` measured faster on CPU/gloo at every size we
tried (docs/parallelism.md): there bandwidth is cheap and the radix select's 8 extra passes and
rounds are not; ``radix`` moves far fewer bytes (512 B/token) for low sparsity and wide rows."""


def _ties_to_keep(a: torch.Tensor, t: torch.Tensor, need: torch.Tensor, group) -> torch.Tensor:
    """This rank's share of the ``need`` entries equal to ``t`` that the whole row keeps: lowest
    global index first = earlier ranks first (one all-gather of per-rank tie counts)."""
    ties = (a == t).sum(dim=-1, keepdim=True)
    ties_all = _all_gather(ties, group, "topk_tie_counts")  # [P, ..., 1]
    before = ties_all[: dist.get_rank(group)].sum(dim=0)
    return torch.minimum((need - before).clamp_min(0), ties)


def _threshold_candidates(a: torch.Tensor, k: int, group) -> tuple[torch.Tensor, torch.Tensor]:
    """k-th largest of the row and #(> it), from the all-gathered local top-min(k, d) values."""
    cand = a if k >= a.shape[-1] else a.topk(k, dim=-1, largest=True, sorted=False).values
    union = _all_gather(cand, group, "topk_candidates").movedim(0, -2).flatten(-2)  # [..., P·min(k,d)]
    t = topk_threshold(union, k)
    return t, k - (union > t).sum(dim=-1, keepdim=True)


def _threshold_radix(a: torch.Tensor, k: int, group) -> tuple[torch.Tensor, torch.Tensor]:
    """k-th largest of the row by an exact radix select on the float32 bit patterns (non-negative
    floats order like their int32 bits): per round, all-reduce a histogram of the next 4-bit digit
    among the entries that match the digits fixed so far.  Volume is independent of d and k."""
    bits = a.float().contiguous().view(torch.int32)
    prefix = torch.zeros(*a.shape[:-1], 1, dtype=torch.int32, device=a.device)
    need = torch.full_like(prefix, k)  # entries still to take at or below the current prefix
    nbins = 1 << RADIX_BITS
    digits = torch.arange(nbins, device=a.device)
    for shift in range(32 - RADIX_BITS, -1, -RADIX_BITS):
        high = shift + RADIX_BITS
        match = (bits >> high) == (prefix >> high) if high < 32 else torch.ones_like(bits, dtype=torch.bool)
        digit = ((bits >> shift) & (nbins - 1)).long()
        hist = torch.zeros(*a.shape[:-1], nbins, dtype=torch.int32, device=a.device)
        hist.scatter_add_(-1, digit, match.to(torch.int32))
        _all_reduce(hist, group, dist.ReduceOp.SUM, "topk_radix_histogram")
        above = hist.flip(-1).cumsum(-1).flip(-1) - hist  # #(digit > b) among the matching entries
        # the chosen digit b: #(digit > b) < need <= #(digit >= b)  (the largest such b)
        ok = (above < need) & (above + hist >= need)
        b = (ok * digits).amax(dim=-1, keepdim=True)
        need = need - above.gather(-1, b)
        prefix = prefix | (b.to(torch.int32) << shift)
    t = prefix.view(torch.float32).to(a.dtype)
    return t, need


@torch.no_grad()
def tp_global_topk_mask(x: torch.Tensor, sparsity: float, group, method: str | None = None) -> torch.Tensor:
    """Boolean mask of the local shard's entries inside the global per-token top-k of ``|x|``.

    ``x`` is this rank's shard ``[..., d]``; the full row is the concatenation over the group's
    ranks in rank order.  Identical to ``topk_mask(full_x, sparsity)`` restricted to the shard.
    ``method``: ``"candidates"`` (all-gather local top-min(k, d) values: ``P·min(k,d)·4`` B/token,
    1 round), ``"radix"`` (8 rounds of a 16-bin histogram all-reduce: 512 B/token whatever d, k),
    ``"auto"`` = the one moving fewer bytes; ``None`` = :data:`DEFAULT_METHOD`.  Both add one
    all-gather of tie counts (8 B/rank/token).
    """
    method = method or DEFAULT_METHOD
    p = group_size(group)
    if p == 1:
        return topk_mask(x, sparsity)
    a = x.detach().abs()
    d = a.shape[-1]
    k = kept_count(d * p, sparsity)
    if k >= d * p:
        return torch.ones_like(a, dtype=torch.bool)
    if method == "auto":
        radix_ok = a.dtype in (torch.float32, torch.bfloat16, torch.float16)
        method = "radix" if radix_ok and p * min(k, d) * 4 > (32 // RADIX_BITS) * (1 << RADIX_BITS) * 4 else "candidates"
    if method == "candidates":
        t, need = _threshold_candidates(a, k, group)
    elif method == "radix":
        t, need = _threshold_radix(a, k, group)
    else:
        raise ValueError(f"method must be 'auto', 'candidates' or 'radix', got {method!r}")
    return mask_from_threshold(a, t, _ties_to_keep(a, t, need, group))


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group in forward and backward (the result feeds every rank's partial output)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _all_reduce(t.clone(), group, dist.ReduceOp.SUM, "rescale_norms")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce(grad.clone(), ctx.group, dist.ReduceOp.SUM, "rescale_norms_grad"), None


def _global_l2_rescale(y: torch.Tensor, x: torch.Tensor, group, eps: float = 1e-6) -> torch.Tensor:
    """:func:`qsparse_dist.ops.l2_rescale` with the per-token norms taken over the full row."""
    sq = torch.cat([x.pow(2).sum(-1, keepdim=True), y.pow(2).sum(-1, keepdim=True)], dim=-1)
    sq = _AllReduceSum.apply(sq, group)
    nx, ny = sq[..., :1].sqrt(), sq[..., 1:].sqrt()
    return y * (nx / ny.clamp_min(eps))


def tp_global_sparsify(x: torch.Tensor, recipe: LinearRecipe, group) -> torch.Tensor:
    """``recipe.sparsify`` for a feature-sharded input: global top-K (or local N:M blocks)."""
    if not recipe.uses_topk:
        return x
    if group_size(group) == 1:
        return recipe.sparsify(x)
    if recipe.block_size is not None:  # blocks never straddle a shard: purely local
        mask = topk_mask(x, recipe.sparsity, block_size=recipe.block_size)
    else:
        mask = tp_global_topk_mask(x, recipe.sparsity, group)
    y = apply_mask(x, mask, recipe.ste)
    return _global_l2_rescale(y, x, group) if recipe.rescale else y


@torch.no_grad()
def tp_global_absmax(x: torch.Tensor, group) -> torch.Tensor:
    """Per-token ``max |x|`` over the full (sharded) row, ``[..., 1]``."""
    m = x.detach().abs().amax(dim=-1, keepdim=True)
    if group_size(group) > 1:
        _all_reduce(m, group, dist.ReduceOp.MAX, "int8_absmax")
    return m


@torch.no_grad()
def tp_global_ternary_scale(w: torch.Tensor, group, eps: float = WEIGHT_EPS) -> torch.Tensor:
    """Absmean ``mean(|W|) + eps`` of the full tensor whose equal-sized shards the group holds.

    The sum is accumulated in float64 (one scalar all-reduce), so the value does not depend on how
    the tensor is split; the result is float32 like :func:`qsparse_dist.ops.ternary_scale`.
    """
    s = w.detach().abs().double().sum().reshape(1)
    p = group_size(group)
    if p > 1:
        _all_reduce(s, group, dist.ReduceOp.SUM, "ternary_scale")
    return (s[0] / (w.numel() * p)).float() + eps


def tp_prepare_input(x: torch.Tensor, recipe: LinearRecipe, group) -> torch.Tensor:
    """``recipe.prepare_input`` for a feature-sharded input (``group`` = the TP group), else local."""
    if group_size(group) == 1:
        return recipe.prepare_input(x)
    y = tp_global_sparsify(x, recipe, group)
    if recipe.quantized:
        y = fake_quant_activation_int8(y, absmax=tp_global_absmax(y, group))
    return y


def tp_input_codes(x: torch.Tensor, recipe: LinearRecipe, group) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet kinds: ``(X_q, s_x)`` of the (TP-global) sparsified input — the int8 codes with the
    straight-through gradient ``1/s_x`` and the per-token scale of the full row (all-reduce MAX of
    the absmax); ``s_x · X_q`` is :func:`tp_prepare_input`'s value."""
    if group_size(group) == 1:
        if recipe.uses_topk and not recipe.rescale and dispatch.triton_kernels_for(x):
            # one pass: top-K + codes + scales (kernels.codes_scale.topk_codes_triton), same values and gradients
            return dispatch.kernel("topk_codes")(x, recipe.sparsity, block_size=recipe.block_size, ste=recipe.ste)
        return int8_codes_ste(recipe.sparsify(x))
    y = tp_global_sparsify(x, recipe, group)
    return int8_codes_ste(y, absmax=tp_global_absmax(y, group))


def tp_effective_weight(w: torch.Tensor, recipe: LinearRecipe, group) -> torch.Tensor:
    """``recipe.weight`` of one shard with the ternary scale of the full tensor."""
    if not recipe.quantized:
        return w
    if group_size(group) == 1:
        return recipe.weight(w)
    return fake_quant_weight_ternary(w, scale=tp_global_ternary_scale(w, group))
