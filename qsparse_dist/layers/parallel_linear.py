"""megatron-core parallel linears that compute :func:`qsparse_dist.ops.qsparse_linear`.

They are injected through megatron-core layer specs (``linear_qkv``, ``linear_proj``,
``linear_fc1``, ``linear_fc2``; see :mod:`qsparse_dist.model.megatron.specs`) with the spec params
``recipe`` (a :class:`~qsparse_dist.ops.LinearRecipe`) and ``projection`` (``qkv|out|up|down``).
Megatron's own forward, communication and gradient code run unchanged; only the input and the
effective weight change:

* ``QSparseColumnParallelLinear`` (QKV, fc1): the input holds the full feature dim (or, with
  sequence parallelism, a sequence shard — top-K and absmax are per token), so ``recipe`` applies
  locally, before megatron's all-gather.  The ternary weight scale is reduced over the TP group
  (the weight rows are sharded).
* ``QSparseRowParallelLinear`` (attention out, FFN down): the input is split on the feature dim, so
  top-K, the int8 absmax and the L2 re-scale are *global* per token
  (:mod:`qsparse_dist.layers.global_topk`); block N:M stays local when the block size divides the
  shard (checked at construction).

With ``track_sparsity`` on, each layer accumulates the exact-zero count and size of its prepared
input (tensors, no host sync); :func:`qsparse_dist.model.megatron.gpt.collect_sparsity_stats`
reduces them over the layer's TP group.  The training loop switches it on for logging steps only.

BitNet kinds quantize the latent weight **once per optimizer step**, not once per forward: the
de-quantized ternary weight ``s_w·W_q`` is cached per layer under the key (storage address,
in-place version counter, number of optimizer steps taken in this process — counted by a global
``torch.optim`` step hook, since ZeRO writes updated weights into flat buffers that bypass the
version counter).  The forward value is exactly ``fake_quant_weight_ternary(W)``'s; the backward
is the same straight-through identity.  :func:`invalidate_weight_caches` forces a recompute after
writing weights any other way (e.g. through ``.data``).
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..ops import LinearRecipe
from ..ops.quant import quantize_weight_ternary
from .global_topk import group_size, tp_global_ternary_scale, tp_prepare_input

__all__ = ["QSparseColumnParallelLinear", "QSparseRowParallelLinear", "QSparseLinearMixin",
           "invalidate_weight_caches"]

_WEIGHT_GENERATION = [0]


def invalidate_weight_caches(*_: object) -> None:
    """Make every layer re-quantize its weight on the next forward (also the optimizer step hook)."""
    _WEIGHT_GENERATION[0] += 1


register_optimizer_step_post_hook(invalidate_weight_caches)


class _StraightThrough(torch.autograd.Function):
    """Forward: the precomputed ``value`` (no copy); backward: the gradient to ``w`` unchanged."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return value.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


@torch.no_grad()
def _ternary_dequant(w: torch.Tensor, group) -> torch.Tensor:
    """``s_w·W_q`` in ``w``'s dtype with the scale of the full (TP-sharded) tensor — the forward
    value of ``fake_quant_weight_ternary`` / ``tp_effective_weight``."""
    scale = tp_global_ternary_scale(w, group) if group_size(group) > 1 else None
    w_q, s = quantize_weight_ternary(w, scale=scale)
    return (w_q.float() * s).to(w.dtype)


class QSparseLinearMixin:
    """Recipe, effective weight and sparsity counters shared by both parallel linears."""

    recipe: LinearRecipe
    projection: str
    tp_group: object

    def _init_qsparse(self, recipe: LinearRecipe | None, projection: str, in_features_local: int) -> None:
        self.recipe = recipe or LinearRecipe()
        self.projection = projection
        bs = self.recipe.block_size
        if bs is not None and in_features_local % bs:
            raise ValueError(
                f"sparsity.block_size={bs} does not divide the {projection or 'linear'} input shard of "
                f"{in_features_local} features (blocks must not straddle tensor-parallel shards)"
            )
        self.track_sparsity = False
        self.reset_sparsity_counts()

    def reset_sparsity_counts(self) -> None:
        self._zero_count = torch.zeros((), dtype=torch.float64)
        self._numel = 0

    @torch.no_grad()
    def _track(self, x: torch.Tensor) -> None:
        if self.track_sparsity:
            self._zero_count = self._zero_count.to(x.device) + (x.numel() - torch.count_nonzero(x))
            self._numel += x.numel()

    def sparsity_counts(self) -> tuple[torch.Tensor, int]:
        """``(zeros, numel)`` of this rank's prepared inputs since the last reset."""
        return self._zero_count, self._numel

    def effective_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight the matmul uses: ``weight`` itself, or its ternary fake-quant (TP-global scale),
        computed once per optimizer step (module docstring)."""
        if not self.recipe.quantized:
            return weight
        key = (weight.data_ptr(), weight._version, _WEIGHT_GENERATION[0], weight.dtype, tuple(weight.shape))
        cached = getattr(self, "_qsd_weight_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, _ternary_dequant(weight, self.tp_group))
            self._qsd_weight_cache = cached
        return _StraightThrough.apply(weight, cached[1])

    def _forward_impl(self, input, weight, *args, **kwargs):  # noqa: A002  (megatron's name)
        """Megatron's matmul with the effective (ternary fake-quant, TP-global scale) weight."""
        return super()._forward_impl(input, self.effective_weight(weight), *args, **kwargs)

    def extra_repr(self) -> str:
        r = self.recipe
        return (
            f"projection={self.projection}, kind={r.kind}, sparsity={r.sparsity}, block_size={r.block_size}, "
            f"tp={group_size(self.tp_group)}"
        )


class QSparseColumnParallelLinear(QSparseLinearMixin, ColumnParallelLinear):
    """``ColumnParallelLinear`` whose input is prepared by ``recipe`` (full feature dim is local)."""

    def __init__(self, input_size: int, output_size: int, *, recipe: LinearRecipe | None = None,
                 projection: str = "", **kwargs) -> None:
        super().__init__(input_size, output_size, **kwargs)
        self._init_qsparse(recipe, projection, input_size)

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None):
        x = self.recipe.prepare_input(input_)
        self._track(x)
        return super().forward(x, weight=weight, runtime_gather_output=runtime_gather_output)


class QSparseRowParallelLinear(QSparseLinearMixin, RowParallelLinear):
    """``RowParallelLinear`` with TP-global top-K / absmax on its feature-sharded input."""

    def __init__(self, input_size: int, output_size: int, *, recipe: LinearRecipe | None = None,
                 projection: str = "", **kwargs) -> None:
        super().__init__(input_size, output_size, **kwargs)
        self._init_qsparse(recipe, projection, self.input_size_per_partition)

    def forward(self, input_: torch.Tensor):
        group = self.tp_group if self.input_is_parallel else None
        x = tp_prepare_input(input_, self.recipe, group)
        self._track(x)
        return super().forward(x)
