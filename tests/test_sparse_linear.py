"""``SparseLinear`` / ``qsparse_linear`` / ``LinearRecipe`` against the formulas written out by hand."""

from __future__ import annotations

import pytest
import torch

from qsparse_dist.layers import SparseLinear
from qsparse_dist.ops import LINEAR_KINDS, LinearRecipe, qsparse_linear


def topk_by_sort(x: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.sort(x.abs(), dim=-1, descending=True, stable=True).indices
    return torch.zeros_like(x).scatter(-1, order[..., :k], 1.0)


def q8(x: torch.Tensor) -> torch.Tensor:
    s = x.abs().amax(-1, keepdim=True).clamp_min(1e-5) / 127
    return torch.clamp(torch.round(x / s), -128, 127) * s


def ternary(w: torch.Tensor) -> torch.Tensor:
    s = w.abs().mean() + 1e-5
    return torch.clamp(torch.round(w / s), -1, 1) * s


def expected(kind: str, x, w, b, sparsity=0.5, block=None):
    """The module docstring of ``qsparse_dist.ops.linear``, written out independently."""
    xin = x
    if kind in ("qsparse", "block_qsparse", "bitnet_qsparse"):
        if block is None:
            xin = x * topk_by_sort(x, x.shape[-1] - int(sparsity * x.shape[-1] + 0.5))
        else:
            xb = x.reshape(*x.shape[:-1], -1, block)
            m = topk_by_sort(xb, block - int(sparsity * block + 0.5))
            xin = (xb * m).reshape(x.shape)
    wt = w
    if kind.startswith("bitnet"):
        xin, wt = q8(xin), ternary(w)
    y = xin @ wt.T
    return y if b is None else y + b


CASES = [
    ("dense", 0.0, None),
    ("qsparse", 0.5, None),
    ("qsparse", 0.75, None),
    ("block_qsparse", 0.5, 8),
    ("bitnet", 0.0, None),
    ("bitnet_qsparse", 0.5, None),
    ("bitnet_qsparse", 0.5, 8),
]


@pytest.mark.parametrize("kind, s, block", CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_kinds_agree_with_formulas(kind, s, block, bias):
    torch.manual_seed(0)
    lin = SparseLinear(32, 12, bias=bias, recipe=LinearRecipe(kind, s, block))
    if bias:
        torch.nn.init.normal_(lin.bias)
    x = torch.randn(2, 5, 32)
    want = expected(kind, x, lin.weight.detach(), None if lin.bias is None else lin.bias.detach(), s, block)
    got = lin(x)
    assert got.shape == (2, 5, 12)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got, qsparse_linear(x, lin.weight, lin.bias, lin.recipe))


def test_dense_and_bitnet_ignore_sparsity():
    assert not LinearRecipe("dense", 0.5).uses_topk
    assert not LinearRecipe("bitnet", 0.9).uses_topk
    assert not LinearRecipe("qsparse", 0.0).uses_topk
    x = torch.randn(3, 16)
    assert torch.equal(LinearRecipe("dense", 0.5).prepare_input(x), x)


def test_mask_comes_from_unquantized_input():
    """|x| = [1, .3, .301, 0]: int8 makes .3 and .301 both 38, so a mask taken after quantization
    would keep index 1 (tie rule); the rule is the unquantized top-K, which keeps index 2."""
    x = torch.tensor([[1.0, 0.3, 0.301, 0.0]])
    y = LinearRecipe("bitnet_qsparse", 0.5).prepare_input(x)
    s = 1.0 / 127
    assert torch.allclose(y, torch.tensor([[127 * s, 0.0, 38 * s, 0.0]]))


def test_hand_computed_qsparse_layer():
    lin = SparseLinear(4, 2, recipe=LinearRecipe("qsparse", 0.5))
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, -1.0]]))
    x = torch.tensor([[0.5, -2.0, 1.0, -0.1]])  # kept: -2.0 (idx 1), 1.0 (idx 2)
    assert lin(x).tolist() == [[-4.0 + 3.0, -2.0]]


def test_hand_computed_bitnet_layer():
    lin = SparseLinear(2, 2, recipe=LinearRecipe("bitnet"))
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -1.0], [0.0, 2.5]]))  # -> s≈1, W_q = [[0,-1],[0,1]]
    x = torch.tensor([[1.0, -0.5]])  # absmax 1: x_q = [127, -63.5 -> -64]
    sx, sw = 1 / 127, 1.0 + 1e-5
    want = torch.tensor([[64 * sx * sw, -64 * sx * sw]])
    assert torch.allclose(lin(x), want, rtol=1e-6)


@pytest.mark.parametrize("kind, block", [("qsparse", None), ("block_qsparse", 4), ("bitnet_qsparse", None)])
def test_ste_gradients(kind, block):
    """With the STE, ∂L/∂x = g·W_eff (unmasked), ∂L/∂W = gᵀ·x_eff (the sparsified/quantized input)."""
    torch.manual_seed(1)
    lin = SparseLinear(16, 6, recipe=LinearRecipe(kind, 0.5, block))
    x = torch.randn(5, 16, requires_grad=True)
    g = torch.randn(5, 6)
    lin(x).backward(g)
    w_eff = lin.recipe.weight(lin.weight).detach()
    x_eff = lin.recipe.prepare_input(x).detach()
    assert torch.allclose(x.grad, g @ w_eff, atol=1e-6)
    assert torch.allclose(lin.weight.grad, g.T @ x_eff, atol=1e-6)
    assert (x_eff == 0).float().mean().item() >= 0.5


def test_masked_gradient_recipe():
    torch.manual_seed(2)
    lin = SparseLinear(16, 6, recipe=LinearRecipe("qsparse", 0.5, ste=False))
    x = torch.randn(5, 16, requires_grad=True)
    g = torch.randn(5, 6)
    lin(x).backward(g)
    mask = (lin.recipe.prepare_input(x) != 0).float()
    assert torch.allclose(x.grad, (g @ lin.weight.detach()) * mask, atol=1e-6)


def test_gradcheck_masked_layer():
    torch.manual_seed(3)
    lin = SparseLinear(8, 3, recipe=LinearRecipe("qsparse", 0.5, ste=False), dtype=torch.float64)
    x = ((torch.randperm(16).double() + 1) / 10 * torch.where(torch.rand(16) < 0.5, -1, 1)).view(2, 8)
    assert torch.autograd.gradcheck(lambda t, w: qsparse_linear(t, w, None, lin.recipe),
                                    (x.requires_grad_(), lin.weight.detach().clone().requires_grad_()))


def test_track_sparsity():
    lin = SparseLinear(64, 4, recipe=LinearRecipe("qsparse", 0.75))
    lin(torch.randn(3, 64))
    assert lin.last_input_zero_fraction is None
    lin.track_sparsity = True
    lin(torch.randn(3, 64))
    assert lin.last_input_zero_fraction.item() == pytest.approx(0.75)


def test_init_and_repr():
    lin = SparseLinear(32, 8, recipe=LinearRecipe("block_qsparse", 0.5, 16), init_std=0.02)
    assert 0.01 < lin.weight.std().item() < 0.03
    assert "kind=block_qsparse" in repr(lin) and "block_size=16" in repr(lin)
    assert SparseLinear(4, 4).recipe.kind == "dense"
    half = SparseLinear(4, 4, dtype=torch.bfloat16)
    assert half.weight.dtype == torch.bfloat16


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="block_size=3 does not divide in_features=32"):
        SparseLinear(32, 8, recipe=LinearRecipe("block_qsparse", 0.5, 3))
    with pytest.raises(ValueError, match="kind must be one of"):
        LinearRecipe("sparse", 0.5)
    with pytest.raises(ValueError, match="block_size is required"):
        LinearRecipe("block_qsparse", 0.5)
    with pytest.raises(ValueError, match="block_size is only valid"):
        LinearRecipe("qsparse", 0.5, 8)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        LinearRecipe("block_qsparse", 0.5, 0)
    with pytest.raises(ValueError, match="sparsity"):
        LinearRecipe("qsparse", 1.0)
    with pytest.raises(ValueError, match="x must be a floating-point"):
        SparseLinear(8, 2, recipe=LinearRecipe("qsparse", 0.5))(torch.ones(2, 8, dtype=torch.long))
    assert set(LINEAR_KINDS) == {"dense", "qsparse", "block_qsparse", "bitnet", "bitnet_qsparse"}
