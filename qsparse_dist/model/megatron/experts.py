"""MoE experts through one grouped GEMM per projection, and the MoE layer that feeds them without host syncs.

:class:`QSparseGroupedMLP` is the ``mlp.submodules.experts`` of our megatron ``MoELayer`` spec.  It
holds exactly the modules of :class:`~qsparse_dist.model.megatron.mlp.QSparseSequentialMLP`
(``local_experts.{e}.linear_fc{1,2}.weight``, each a Q-Sparse/BitNet parallel linear), so state
dicts, checkpoints, the HF adapter and the expert-parameter predicates are unchanged; only the forward
differs.  Megatron's ``SequentialMLP`` splits the permuted tokens on the host (``tokens_per_expert
.tolist()``) and runs each expert's ~15 kernels in turn; here, with ``x`` the tokens sorted by expert
(``n_e`` rows for expert ``e``, offsets ``o_e = Σ_{e'≤e} n_e'`` on the device)::

    h   = prepare_up(x)                      (row-wise: top-K / int8 per token — the same for every expert)
    y1  = [h_e · W1_eᵀ]_e                    one grouped GEMM over the stacked weights [E, 2F, H]
    a   = GLU(y1)                            (row-wise; the fused kernel on CUDA)
    y2  = [prepare_down(a)_e · W2_eᵀ]_e      one grouped GEMM over [E, H, F]
    out = y2 · p                             (router probability per row, as QSparseMLP)

Every step before and after the GEMMs is row-wise, so applying it to all experts' rows at once is
the per-expert computation.  BitNet kinds multiply the int8 codes by each expert's ternary codes
(cached once per optimizer step by the expert's own linear) and scale each row by ``s_x · s_{w,e}``
(``e`` = the row's expert) — :func:`qsparse_dist.ops.scale_codes_product`, the same float32 product as
the per-expert linear.  Gradients flow through ``torch.stack`` into each expert's weight.

The grouped GEMM is ``torch._grouped_mm`` (CUTLASS on Hopper for bf16; torch's reference loop on the
CPU) with ``offs`` on the device; elsewhere (other dtypes/GPUs, or ``QSPARSE_GROUPED_MM=0``) an exact
per-expert loop of ``matmul`` over host-side splits.  Layouts this module does not cover (expert
TP > 1, biases, probabilities on the input, FP8, ``sparsity.sparse_tensor_cores: on`` — 2:4 sparse
tensor cores run per linear) run the inherited sequential forward; with ``auto`` the grouped GEMM
multiplies the masked input densely (same values).

:class:`QSparseMoELayer` is megatron's ``MoELayer`` that, where no tokens cross ranks, swaps its
dispatcher for :func:`qsparse_dist.compat.megatron.local_token_dispatcher_class` (permutation on the
device, ``tokens_per_expert`` never leaves it).
"""

from __future__ import annotations

import os
from functools import cache

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer, get_default_pg_collection

from ...compat.megatron import local_dispatch_eligible, local_token_dispatcher_class
from ...layers import fused
from ...layers.global_topk import group_size, tp_input_codes
from ...ops import scale_codes_product
from .mlp import QSparseSequentialMLP

__all__ = ["grouped_mm_usable", "grouped_linear", "QSparseGroupedMLP", "QSparseMoELayer"]


@cache
def _cpu_grouped_mm_works() -> bool:
    """Whether this torch has a CPU ``_grouped_mm`` (forward and backward) — probed once."""
    try:
        x = torch.ones(3, 8, requires_grad=True)
        w = torch.ones(2, 8, 8, requires_grad=True)
        y = torch._grouped_mm(x, w.transpose(-2, -1), offs=torch.tensor([1, 3], dtype=torch.int32))
        _ContiguousGrad.apply(y).sum().backward()
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def grouped_mm_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` computes ``x [T, K] × w [E, N, K]ᵀ`` here without a host sync:
    CUDA bf16 on compute capability ≥ 9.0 with ``K`` and ``N`` multiples of 8 (16-byte rows for
    CUTLASS), or the CPU when torch has it; never with ``QSPARSE_GROUPED_MM=0``."""
    if os.environ.get("QSPARSE_GROUPED_MM", "1") == "0" or not hasattr(torch, "_grouped_mm"):
        return False
    if x.is_cuda:
        return (x.dtype == w.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
                and x.shape[-1] % 8 == 0 and w.shape[1] % 8 == 0)
    return x.device.type == "cpu" and x.dtype == w.dtype and _cpu_grouped_mm_works()


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (``_grouped_mm``'s backward
    refuses expanded gradients such as the one of ``.sum()``)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``y[rows of e] = x[rows of e] · w[e]ᵀ`` for rows sorted by expert, ``counts[e]`` rows each
    (``x [T, K]``, ``w [E, N, K]`` → ``y [T, N]``).  Grouped GEMM with device offsets where
    :func:`grouped_mm_usable`, else a per-expert ``matmul`` loop over host splits."""
    if grouped_mm_usable(x, w):
        offs = counts.to(device=x.device).cumsum(0).to(torch.int32)
        return _ContiguousGrad.apply(torch._grouped_mm(x, w.transpose(-2, -1), offs=offs))
    parts = torch.split(x, counts.tolist())
    return torch.cat([torch.matmul(p, w[e].t()) for e, p in enumerate(parts)], dim=0)


class QSparseGroupedMLP(QSparseSequentialMLP):
    """:class:`QSparseSequentialMLP` (same parameters and state-dict keys) whose forward runs all local
    experts through one grouped GEMM per projection (module docstring)."""

    def _grouped_applies(self, x: torch.Tensor) -> bool:
        c = self.config
        experts = self.local_experts
        return (
            group_size(self.tp_group) == 1
            and not c.moe_apply_probs_on_input and not (c.fp8 or c.fp4)
            and all(e.linear_fc1.bias is None and e.linear_fc2.bias is None for e in experts)
            and all(getattr(m, "sparse_tensor_cores", "off") != "on"  # 2:4 required: the per-linear path
                    for e in experts for m in (e.linear_fc1, e.linear_fc2))
            and x.dim() == 2
        )

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        x = permuted_local_hidden_states
        if not self._grouped_applies(x):
            if torch.is_tensor(tokens_per_expert) and tokens_per_expert.device.type != "cpu":
                tokens_per_expert = tokens_per_expert.cpu()  # SequentialMLP splits on the host
            return super().forward(x, tokens_per_expert, permuted_probs)
        counts = torch.as_tensor(tokens_per_expert, dtype=torch.long)
        fc1 = [e.linear_fc1 for e in self.local_experts]
        fc2 = [e.linear_fc2 for e in self.local_experts]
        self._track(fc1, x, counts)
        h = self._project(fc1, x, counts)
        activation = self.local_experts[0].activation
        a = fused.glu(h, activation) if fused.fused_enabled(h) else self.local_experts[0].glu(h)
        self._track(fc2, a, counts)
        out = self._project(fc2, a, counts)
        out = (out * permuted_probs.unsqueeze(-1)).to(out.dtype)
        return out, None

    @staticmethod
    def _project(linears: list, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``linear_e(x_e)`` of every expert ``e`` (all share one recipe): the recipe's row-wise input
        preparation once, then one grouped GEMM; BitNet: codes × codes, then ``· (s_x · s_{w,e})``."""
        recipe = linears[0].recipe
        if not recipe.quantized:
            return grouped_linear(recipe.prepare_input(x), torch.stack([m.weight for m in linears]), counts)
        x_q, s_x = tp_input_codes(x, recipe, None)
        codes = [m.weight_codes(m.weight) for m in linears]
        w_q = torch.stack([c.to(x_q.dtype) for c, _ in codes])
        s_w = torch.stack([s for _, s in codes])
        rows_expert = torch.repeat_interleave(torch.arange(len(linears), device=x.device),
                                              counts.to(x.device), output_size=x.shape[0])
        y_int = grouped_linear(x_q, w_q, counts)
        return scale_codes_product(y_int, s_x, s_w[rows_expert].unsqueeze(-1), x.dtype)

    @staticmethod
    @torch.no_grad()
    def _track(linears: list, x: torch.Tensor, counts: torch.Tensor) -> None:
        """Sparsity counters (logging steps only, when the training loop switched them on): each expert
        counts its own rows' prepared input, as in the per-expert forward (a host split is fine here)."""
        if not any(m.track_sparsity for m in linears):
            return
        recipe = linears[0].recipe
        prepared = recipe.prepare_input(x) if not recipe.quantized else tp_input_codes(x, recipe, None)[0]
        for m, part in zip(linears, torch.split(prepared, counts.tolist())):
            m._track(part)


class QSparseMoELayer(MoELayer):
    """megatron ``MoELayer`` whose token dispatcher is the sync-free local one where no token crosses
    ranks (:func:`qsparse_dist.compat.megatron.local_dispatch_eligible`); megatron's own otherwise, and
    for any forward given a ``padding_mask`` (which may leave tokens with fewer than top-K experts)."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None) -> None:
        if pg_collection is None:  # what MoELayer does; the local dispatcher needs the same groups
            pg_collection = get_default_pg_collection()
        super().__init__(config, submodules, layer_number=layer_number, pg_collection=pg_collection)
        self.megatron_dispatcher = self.token_dispatcher
        self.local_dispatcher = None
        if local_dispatch_eligible(self.config, pg_collection):
            self.local_dispatcher = local_token_dispatcher_class()(
                self.num_local_experts, self.local_expert_indices, config=self.config,
                pg_collection=pg_collection,
            )
            self.token_dispatcher = self.local_dispatcher

    def forward(self, hidden_states, intermediate_tensors=None, padding_mask=None):
        if self.local_dispatcher is not None:
            self.token_dispatcher = self.megatron_dispatcher if padding_mask is not None else self.local_dispatcher
        return super().forward(hidden_states, intermediate_tensors, padding_mask)
