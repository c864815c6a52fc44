"""FFN activations (``qsparse_dist.ops.activations``)."""

from __future__ import annotations

import math

import pytest
import torch

from qsparse_dist.ops import (
    GLU_ACTIVATIONS,
    LinearRecipe,
    drelu,
    glu_activation,
    relu2,
    relu2glu,
    split_gate_up,
    swiglu,
)

SILU1 = 1.0 / (1.0 + math.exp(-1.0))


def test_hand_cases():
    g = torch.tensor([-1.0, 2.0, 3.0])
    u = torch.tensor([5.0, 0.5, -1.0])
    assert torch.equal(relu2(torch.tensor([-1.0, 0.0, 2.0])), torch.tensor([0.0, 0.0, 4.0]))
    assert torch.equal(relu2glu(g, u), torch.tensor([0.0, 2.0, -9.0]))
    assert torch.equal(drelu(g, u), torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(swiglu(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])),
                          torch.tensor([0.0, 3.0 * SILU1]))


def test_split_gate_up_layout():
    g, u = split_gate_up(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert g.tolist() == [[1.0, 2.0]] and u.tolist() == [[3.0, 4.0]]
    with pytest.raises(ValueError, match="fused gate/up dim must be even"):
        split_gate_up(torch.ones(2, 5))


@pytest.mark.parametrize("name", sorted(GLU_ACTIVATIONS))
def test_fused_activation_equals_split_form(name):
    h = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    fn = glu_activation(name)
    assert fn.__name__ == name
    assert torch.equal(fn(h), GLU_ACTIVATIONS[name](h[..., :4], h[..., 4:]))
    assert fn(h).shape == (2, 3, 4)


def test_fused_hand_case():
    h = torch.tensor([-1.0, 2.0, 5.0, 0.5])  # gate = [-1, 2], up = [5, 0.5]
    assert glu_activation("relu2glu")(h).tolist() == [0.0, 2.0]
    assert glu_activation("drelu")(h).tolist() == [0.0, 1.0]


def test_unknown_activation_names_the_field():
    with pytest.raises(ValueError, match="ffn_activation must be one of"):
        glu_activation("gelu")


def _away_from_zero(shape, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x + 0.1 * torch.sign(x)).requires_grad_()  # |x| > 0.1: no kink within the FD step


def test_gradcheck_activations():
    x = _away_from_zero((3, 6), 1)
    g, u = _away_from_zero((3, 6), 2), _away_from_zero((3, 6), 3)
    assert torch.autograd.gradcheck(relu2, (x,))
    for fn in (relu2glu, drelu, swiglu):
        assert torch.autograd.gradcheck(fn, (g, u))
    h = _away_from_zero((2, 8), 4)
    for name in GLU_ACTIVATIONS:
        assert torch.autograd.gradcheck(glu_activation(name), (h,))


def test_activation_sparsity_of_relu_family():
    """relu-based GLUs are sparse by themselves (≈ 1/2 for drelu's gate, ≈ 3/4 with both relus)."""
    g, u = torch.randn(2, 4096, generator=torch.Generator().manual_seed(5)).unbind(0)
    assert abs((relu2glu(g, u) == 0).float().mean().item() - 0.5) < 0.05
    assert abs((drelu(g, u) == 0).float().mean().item() - 0.75) < 0.05
    assert (swiglu(g, u) == 0).float().mean().item() < 0.01


def test_topk_after_activation():
    """The paper's recipe for SiLU models: the down projection's top-K acts on the activation output."""
    h = torch.randn(4, 64, generator=torch.Generator().manual_seed(6))
    act = glu_activation("swiglu")(h)
    y = LinearRecipe("qsparse", 0.75).sparsify(act)
    assert torch.all((y != 0).sum(-1) == 8)
    kept = y != 0
    assert torch.all(act.abs()[kept].view(4, 8).amin(-1) >= act.abs().masked_fill(kept, 0).amax(-1))
