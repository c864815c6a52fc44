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

BitNet kinds multiply integer codes and scale afterwards, ``y = (X_q · W_qᵀ) · (s_x · s_w)``
(:func:`qsparse_dist.ops.linear.bitnet_linear`; exact in float32): megatron's matmul (and its
sequence-parallel all-gather) runs on the int8 codes ``X_q`` and ternary codes ``W_q`` (float
tensors whose straight-through gradients are ``1/s_x`` and ``1/s_w``), and the scales are applied to
its output — for the column-parallel linear after the all-gather of the tokens (``s_x`` is
all-gathered with them under SP), for the row-parallel linear *after* the reduction of the per-rank
integer partial sums (exact), with the TP-global absmax ``s_x`` (sliced to the rank's tokens under
SP) and the TP-global absmean ``s_w``.  Expert row-parallel linears (``explicit_expert_comm``) leave
the reduction to the token dispatcher, so their partial sums are scaled before it.

2:4 Block Q-Sparse (``block_size=4``, 2 of 4 kept; :func:`~qsparse_dist.layers.sparse_linear.is_sparse24`)
runs on sparse tensor cores when ``sparse_tensor_cores`` (``sparsity.sparse_tensor_cores``) allows it
(:func:`~qsparse_dist.layers.sparse_linear.use_sparse24`: ``on``; ``auto`` only where measured faster —
not on the H200, see docs/ops.md):
:meth:`QSparseLinearMixin._forward_impl` replaces megatron's matmul by
:func:`qsparse_dist.kernels.sparse24.sparse24_linear` (selection + compression + sparse matmul forward,
dense straight-through backward), on the unmasked input.  Column-parallel with TP > 1 wraps the input in
megatron's ``copy_to_tensor_model_parallel_region`` (whose backward all-reduces ``dX``, as megatron's
``allreduce_dgrad`` would; measured on one GPU only, TP = 1); sequence parallelism and
gradient-accumulation fusion keep the dense masked path.

They quantize the latent weight **once per optimizer step**, not once per forward: the
ternary codes ``W_q`` and ``s_w`` are cached per layer under the key (storage address,
in-place version counter, number of optimizer steps taken in this process — counted by a global
``torch.optim`` step hook, since ZeRO writes updated weights into flat buffers that bypass the
version counter).  :meth:`QSparseLinearMixin.effective_weight` (``s_w·W_q``) is exactly
``fake_quant_weight_ternary(W)``'s value with the straight-through identity backward.
:func:`invalidate_weight_caches` forces a recompute after writing weights any other way (e.g.
through ``.data``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..ops import LinearRecipe, dispatch, scale_codes_product
from ..ops.quant import codes_ste, quantize_weight_ternary
from .global_topk import group_size, tp_global_ternary_scale, tp_input_codes, tp_prepare_input
from .sparse_linear import check_sparse_tensor_cores, use_sparse24

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
def _ternary_codes(w: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_q, s_w)``: ternary codes in ``w``'s dtype and the float32 scale of the full
    (TP-sharded) tensor — ``s_w·W_q`` is the forward value of ``fake_quant_weight_ternary`` /
    ``tp_effective_weight``."""
    scale = tp_global_ternary_scale(w, group) if group_size(group) > 1 else None
    w_q, s = quantize_weight_ternary(w, scale=scale)
    return w_q.to(w.dtype), s


class QSparseLinearMixin:
    """Recipe, effective weight and sparsity counters shared by both parallel linears."""

    recipe: LinearRecipe
    projection: str
    tp_group: object

    def _init_qsparse(self, recipe: LinearRecipe | None, projection: str, in_features_local: int,
                      sparse_tensor_cores: str = "auto") -> None:
        self.recipe = recipe or LinearRecipe()
        self.projection = projection
        self.sparse_tensor_cores = check_sparse_tensor_cores(sparse_tensor_cores)
        self._qsd_sparse24 = False
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

    def _cached_codes(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_q, s_w)`` of ``weight`` (TP-global scale), computed once per optimizer step."""
        key = (weight.data_ptr(), weight._version, _WEIGHT_GENERATION[0], weight.dtype, tuple(weight.shape))
        cached = getattr(self, "_qsd_weight_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, *_ternary_codes(weight, self.tp_group))
            self._qsd_weight_cache = cached
        return cached[1], cached[2]

    def effective_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The de-quantized weight: ``weight`` itself, or its ternary fake-quant ``s_w·W_q``
        (TP-global scale) with the straight-through identity gradient."""
        if not self.recipe.quantized:
            return weight
        codes, s = self._cached_codes(weight)
        return _StraightThrough.apply(weight, (codes.float() * s).to(weight.dtype))

    def weight_codes(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_q, s_w)``: the ternary codes the matmul uses (gradient ``1/s_w`` to ``weight``)."""
        codes, s = self._cached_codes(weight)
        return codes_ste(weight, codes, s), s

    def _sparse24_wanted(self, x: torch.Tensor, sequence_parallel: bool) -> bool:
        """Whether this forward takes the sparse-tensor-core path (decided before megatron's forward)."""
        if sequence_parallel or getattr(self, "gradient_accumulation_fusion", False):
            return False
        return use_sparse24(self.recipe, self.sparse_tensor_cores, x, self.weight)

    def _sparse24_impl(self, input, weight, bias=None, allreduce_dgrad=False, **_):  # noqa: A002
        """``(x ⊙ M_2:4) Wᵀ + b`` on sparse tensor cores; ``allreduce_dgrad``: ``dX`` all-reduced over TP."""
        if allreduce_dgrad:
            input = copy_to_tensor_model_parallel_region(input, group=self.tp_group)  # noqa: A001
        y, xm = dispatch.kernel("sparse24_linear")(input, weight, bias)
        self._track(xm)
        return y

    def _forward_impl(self, input, weight, *args, **kwargs):  # noqa: A002  (megatron's name)
        """Megatron's matmul; BitNet: on the ternary codes (the caller applies the scales); 2:4: on
        sparse tensor cores."""
        if self._qsd_sparse24:
            return self._sparse24_impl(input, weight, *args, **kwargs)
        if not self.recipe.quantized:
            return super()._forward_impl(input, weight, *args, **kwargs)
        w_q, self._qsd_weight_scale = self.weight_codes(weight)
        return super()._forward_impl(input, w_q.to(input.dtype), *args, **kwargs)

    def extra_repr(self) -> str:
        r = self.recipe
        return (
            f"projection={self.projection}, kind={r.kind}, sparsity={r.sparsity}, block_size={r.block_size}, "
            f"tp={group_size(self.tp_group)}"
        )


class QSparseColumnParallelLinear(QSparseLinearMixin, ColumnParallelLinear):
    """``ColumnParallelLinear`` whose input is prepared by ``recipe`` (full feature dim is local)."""

    def __init__(self, input_size: int, output_size: int, *, recipe: LinearRecipe | None = None,
                 projection: str = "", sparse_tensor_cores: str = "auto", **kwargs) -> None:
        super().__init__(input_size, output_size, **kwargs)
        self._init_qsparse(recipe, projection, input_size, sparse_tensor_cores)

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None):
        sp = self.sequence_parallel and not self.explicit_expert_comm
        self._qsd_sparse24 = weight is None and self._sparse24_wanted(input_, sp)
        if self._qsd_sparse24:  # selection, compression and matmul in _forward_impl
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        if not self.recipe.quantized:
            x = self.recipe.prepare_input(input_)
            self._track(x)
            return super().forward(x, weight=weight, runtime_gather_output=runtime_gather_output)
        x_q, self._qsd_act_scale = tp_input_codes(input_, self.recipe, None)
        self._track(x_q)
        self._qsd_out_dtype = input_.dtype
        return super().forward(x_q, weight=weight, runtime_gather_output=runtime_gather_output)

    def _forward_impl(self, input, weight, *args, bias=None, **kwargs):  # noqa: A002
        """BitNet: integer-code matmul on the (SP-gathered) tokens, then ``· (s_x · s_w) + b``."""
        if self._qsd_sparse24 or not self.recipe.quantized:
            return super()._forward_impl(input, weight, *args, bias=bias, **kwargs)
        y_int = super()._forward_impl(input, weight, *args, bias=None, **kwargs)
        s_x = self._qsd_act_scale
        if kwargs.get("sequence_parallel") and group_size(self.tp_group) > 1:
            s_x = gather_from_sequence_parallel_region(
                s_x, tensor_parallel_output_grad=False, group=self.tp_group
            )
        y = scale_codes_product(y_int, s_x, self._qsd_weight_scale, self._qsd_out_dtype)
        return y if bias is None else y + bias


class QSparseRowParallelLinear(QSparseLinearMixin, RowParallelLinear):
    """``RowParallelLinear`` with TP-global top-K / absmax on its feature-sharded input."""

    def __init__(self, input_size: int, output_size: int, *, recipe: LinearRecipe | None = None,
                 projection: str = "", sparse_tensor_cores: str = "auto", **kwargs) -> None:
        super().__init__(input_size, output_size, **kwargs)
        self._init_qsparse(recipe, projection, self.input_size_per_partition, sparse_tensor_cores)
        if self.recipe.quantized and self.bias is not None and not self.skip_bias_add:
            raise ValueError(f"{projection or 'linear'}: a BitNet row-parallel linear needs skip_bias_add "
                             "(the bias goes after the scales, which follow the reduction)")

    def forward(self, input_: torch.Tensor):
        group = self.tp_group if self.input_is_parallel else None
        # block N:M is local per shard (block divides it), so the 2:4 path needs no TP communication
        self._qsd_sparse24 = self.input_is_parallel and self._sparse24_wanted(input_, False)
        if self._qsd_sparse24:
            return super().forward(input_)
        if not self.recipe.quantized:
            x = tp_prepare_input(input_, self.recipe, group)
            self._track(x)
            return super().forward(x)
        x_q, s_x = tp_input_codes(input_, self.recipe, group)
        self._track(x_q)
        out, out_bias = super().forward(x_q)  # integer partial sums, reduced exactly
        p = group_size(self.tp_group)
        if self.sequence_parallel and not self.explicit_expert_comm and p > 1:
            s_x = s_x.chunk(p, dim=0)[dist.get_rank(self.tp_group)]  # the reduce-scatter's tokens
        return scale_codes_product(out, s_x, self._qsd_weight_scale, input_.dtype), out_bias
