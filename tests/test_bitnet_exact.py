"""The BitNet linear sums the int8 × ternary product exactly: ``y = (X_q · W_qᵀ) · (s_x · s_w)``.

The truth is an int64 computation of the integer product (torch integer matmul, no floats), scaled
once in float32: every layer that computes a BitNet linear in float32 must equal it bit for bit,
whatever the number of rows in the matmul (the row count changes the float blocking, which used to
turn an exactly-zero sum into ±1e-9 and flip a relu′ between layouts).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qsparse_dist.infer.backends.torch_backend import InferenceLinear
from qsparse_dist.layers import SparseLinear
from qsparse_dist.ops import (
    EXACT_K_MAX,
    LinearRecipe,
    bitnet_linear,
    fake_quant_activation_int8,
    fake_quant_weight_ternary,
    qsparse_linear,
    quantize_activation_int8,
    quantize_weight_ternary,
)


def int64_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(X_q · W_qᵀ)`` in int64, then ``· (s_x · s_w)`` in float32."""
    x_q, s_x = quantize_activation_int8(x)
    w_q, s_w = quantize_weight_ternary(w)
    y_int = x_q.long() @ w_q.long().T
    assert y_int.abs().max() < 2**24
    return y_int.float() * (s_x * s_w)


def _cancelling_rows(k: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and an input whose every row has an exactly-zero product with output 0: weight
    +1 on the first half of the features, -1 on the second, whose inputs are the first half's values
    in another order.  (The de-quantized float product gives ±1e-5 here: the old failure.)"""
    w = torch.randn(n, k, generator=gen)
    h = k // 2
    w[0, :h] = 1.0
    w[0, h:] = -1.0
    x = torch.randn(5, k, generator=gen)
    for r in range(5):
        x[r, h:] = x[r, :h][torch.randperm(h, generator=gen)]
    return x, w


@pytest.mark.parametrize("k", [64, 1536, 4096])
def test_bitnet_linear_equals_int64_reference_for_any_row_count(k):
    gen = torch.Generator().manual_seed(k)
    w = torch.randn(48, k, generator=gen)
    x = torch.randn(333, k, generator=gen) * torch.rand(333, 1, generator=gen) * 4
    want = int64_reference(x, w)
    assert torch.equal(bitnet_linear(x, w), want)
    for rows in (1, 2, 7, 64, 200):  # row count changes the matmul's float blocking
        assert torch.equal(bitnet_linear(x[:rows], w), want[:rows]), rows
    assert torch.equal(bitnet_linear(x[5:6], w), want[5:6])


def test_exactly_zero_sum_is_zero_whatever_the_rows():
    gen = torch.Generator().manual_seed(0)
    x, w = _cancelling_rows(2048, 8, gen)
    assert torch.equal(int64_reference(x, w)[:, 0], torch.zeros(5))
    big = torch.cat([x, torch.randn(300, 2048, generator=gen)])
    for xs in (x, x[:1], big):
        y = bitnet_linear(xs, w)
        assert torch.equal(y[: min(5, len(xs)), 0], torch.zeros(min(5, len(xs))))
        assert torch.equal(y, int64_reference(xs, w))


def test_every_float32_bitnet_layer_equals_the_reference():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 512, generator=gen)
    w = torch.randn(40, 512, generator=gen)
    for kind in ("bitnet", "bitnet_qsparse"):
        recipe = LinearRecipe(kind, 0.5 if kind == "bitnet_qsparse" else 0.0)
        want = int64_reference(recipe.sparsify(x), w)
        lin = SparseLinear(512, 40, recipe=recipe)
        with torch.no_grad():
            lin.weight.copy_(w)
        assert torch.equal(lin(x), want), kind
        assert torch.equal(qsparse_linear(x, w, None, recipe), want), kind
        runtime = InferenceLinear(recipe, fake_quant_weight_ternary(w).detach())
        assert torch.equal(runtime(x), want), kind


def test_gradients_are_the_straight_through_ones():
    """∂L/∂x = g·(s_w W_q) and ∂L/∂W = gᵀ·(s_x X_q): the de-quantized product's gradients."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 256, generator=gen, requires_grad=True)
    w = torch.randn(24, 256, generator=gen, requires_grad=True)
    g = torch.randn(6, 24, generator=gen)
    bitnet_linear(x, w).backward(g)
    x_old, w_old = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    F.linear(fake_quant_activation_int8(x_old), fake_quant_weight_ternary(w_old)).backward(g)
    # equal up to float32 rounding of the sums (the scales are applied in another order)
    for new, old in ((x.grad, x_old.grad), (w.grad, w_old.grad)):
        assert (new - old).abs().max() <= 1e-6 * old.abs().max(), (new - old).abs().max()
    assert x.grad.dtype == x.dtype and w.grad.dtype == w.dtype


def test_bound_on_in_features():
    assert EXACT_K_MAX * 128 == 2**24
