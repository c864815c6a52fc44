"""FFN activations.  Gated forms take the fused fc1 output ``h = [gate ‖ up]`` split on the last dim,
the layout megatron-core's ``linear_fc1`` produces when ``gated_linear_unit=True``.

    relu2(x)          = relu(x)²                          (Primer; Q-Sparse's FFN choice)
    relu2glu(g, u)    = u ⊙ relu(g)²                      (Q-Sparse's ReLU²GLU)
    drelu(g, u)       = relu(g) ⊙ relu(u)                 (Turbo Sparse dReLU, arXiv 2406.05955)
    swiglu(g, u)      = silu(g) ⊙ u                       (dense baseline)

"Top-K after the activation" (the paper's recipe for pretrained SiLU models) is not a separate
activation: the down projection's input *is* the activation output, so its Q-Sparse top-K
(``sparsity.down``) is applied after the activation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["relu2", "relu2glu", "drelu", "swiglu", "split_gate_up", "GLU_ACTIVATIONS", "glu_activation"]


def relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU."""
    return F.relu(x).square()


def split_gate_up(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the fused ``[gate ‖ up]`` projection output in two halves on the last dim."""
    if h.shape[-1] % 2:
        raise ValueError(f"fused gate/up dim must be even, got {h.shape[-1]}")
    g, u = h.chunk(2, dim=-1)
    return g, u


def relu2glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """ReLU²GLU: ``up ⊙ relu(gate)²``."""
    return up * relu2(gate)


def drelu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """dReLU (Turbo Sparse): ``relu(gate) ⊙ relu(up)``."""
    return F.relu(gate) * F.relu(up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: ``silu(gate) ⊙ up``."""
    return F.silu(gate) * up


GLU_ACTIVATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "relu2glu": relu2glu,
    "drelu": drelu,
    "swiglu": swiglu,
}


def glu_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Activation on the fused ``[gate ‖ up]`` tensor, by name (``relu2glu|drelu|swiglu``)."""
    if name not in GLU_ACTIVATIONS:
        raise ValueError(f"ffn_activation must be one of {sorted(GLU_ACTIVATIONS)}, got {name!r}")
    fn = GLU_ACTIVATIONS[name]

    def fused(h: torch.Tensor) -> torch.Tensor:
        return fn(*split_gate_up(h))

    fused.__name__ = name
    return fused
