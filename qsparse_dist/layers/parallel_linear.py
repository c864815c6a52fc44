"""megatron-core parallel linears that compute :func:`qsparse_dist.ops.qsparse_linear`.

They are injected through megatron-core layer specs (``linear_qkv``, ``linear_proj``,
``linear_fc1``, ``linear_fc2``; see :mod:`qsparse_dist.layers.specs`) with the spec params
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
input (tensors, no host sync); :func:`qsparse_dist.model.megatron_gpt.collect_sparsity_stats`
reduces them over the layer's TP group.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from ..ops import LinearRecipe
from .global_topk import group_size, tp_effective_weight, tp_prepare_input

__all__ = ["QSparseColumnParallelLinear", "QSparseRowParallelLinear", "QSparseLinearMixin"]


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

    def _forward_impl(self, input, weight, *args, **kwargs):  # noqa: A002  (megatron's name)
        """Megatron's matmul with the effective (ternary fake-quant, TP-global scale) weight."""
        return super()._forward_impl(input, tp_effective_weight(weight, self.recipe, self.tp_group), *args, **kwargs)

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
