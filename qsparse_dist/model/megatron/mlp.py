"""megatron MLPs with a named GLU activation: the dense FFN (:class:`QSparseMLP`) and the per-expert
loop of MoE experts (:class:`QSparseSequentialMLP`).

``QSparseMLP`` applies ``qsparse_dist.ops.glu_activation`` (relu2glu | drelu | swiglu) to the fused
fc1 output (rank-local ``[gate_r ‖ up_r]``) — dReLU gates *both* halves, which megatron's
``activation(gate)·up`` form cannot express — and, for MoE experts, multiplies the router
probability into the expert *output* (the reference's ``expert(h)·p``; megatron 0.16.1 multiplies it
into the fc2 input, which would change the BitNet int8 quantization of fc2's input).
"""

from __future__ import annotations

from copy import deepcopy

import torch
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.transformer_config import TransformerConfig

from ...layers import fused
from ...ops import glu_activation

__all__ = ["QSparseMLP", "QSparseSequentialMLP"]


class QSparseMLP(MLP):
    """megatron ``MLP`` computing ``fc2(act([gate ‖ up] = fc1(x)))`` with a named GLU activation.

    ``per_token_scale`` (MoE router probabilities) scales the output rows.
    """

    def __init__(self, config: TransformerConfig, submodules: MLPSubmodules, *, activation: str = "relu2glu",
                 **kwargs) -> None:
        if not config.gated_linear_unit:
            raise ValueError("QSparseMLP needs config.gated_linear_unit=True (fused [gate ‖ up] fc1)")
        super().__init__(config, submodules, **kwargs)
        self.activation = activation
        self.glu = glu_activation(activation)

    def forward(self, hidden_states: torch.Tensor, per_token_scale: torch.Tensor | None = None, **kwargs):
        h, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            h = h + bias
        act = fused.glu(h, self.activation) if fused.fused_enabled(h) else self.glu(h)
        out, out_bias = self.linear_fc2(act)
        if per_token_scale is not None:
            if out_bias is not None:
                out, out_bias = out + out_bias, None
            out = (out * per_token_scale.unsqueeze(-1)).to(out.dtype)
        return out, out_bias


class QSparseSequentialMLP(SequentialMLP):
    """megatron ``SequentialMLP`` whose local experts are :class:`QSparseMLP`.

    ``SequentialMLP.__init__`` hard-codes ``MLP`` for its experts, so this constructor reproduces it
    (config override for ``moe_ffn_hidden_size``, the EP / expert-TP / expert-DP groups) with our MLP.
    """

    def __init__(self, num_local_experts: int, config: TransformerConfig, submodules: MLPSubmodules,
                 pg_collection=None, *, activation: str = "relu2glu") -> None:
        if pg_collection is None:
            raise ValueError("QSparseSequentialMLP needs the pg_collection megatron's MoELayer passes")
        if config.moe_ffn_hidden_size != config.ffn_hidden_size:
            config = deepcopy(config)
            config.ffn_hidden_size = config.moe_ffn_hidden_size
        MegatronModule.__init__(self, config=config)
        self.num_local_experts = num_local_experts
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        self.local_experts = torch.nn.ModuleList(
            QSparseMLP(self.config, submodules, activation=activation,
                       ffn_hidden_size=self.config.moe_ffn_hidden_size, is_expert=True,
                       tp_group=pg_collection.expt_tp)
            for _ in range(num_local_experts)
        )
