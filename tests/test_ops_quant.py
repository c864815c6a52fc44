"""BitNet b1.58 quantizers (``qsparse_dist.ops.quant``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qsparse_dist.ops import (
    fake_quant_activation_int8,
    fake_quant_weight_ternary,
    quantize_activation_int8,
    quantize_weight_ternary,
    ternary_scale,
    topk_sparsify,
)
from qsparse_dist.ops.quant import ACT_EPS, WEIGHT_EPS


def test_ternary_hand_case():
    w = torch.tensor([[0.5, -1.0], [0.0, 2.5]])  # mean|w| = 1.0
    w_q, s = quantize_weight_ternary(w)
    assert s.dim() == 0 and s.dtype == torch.float32
    assert s.item() == pytest.approx(1.0 + WEIGHT_EPS, rel=1e-7)
    # w/s = [0.499995, -0.99999, 0, 2.49997] -> round -> [0, -1, 0, 2] -> clamp -> [0, -1, 0, 1]
    assert w_q.dtype == torch.int8
    assert torch.equal(w_q, torch.tensor([[0, -1], [0, 1]], dtype=torch.int8))
    assert torch.equal(ternary_scale(w), s)


def test_ternary_values_and_scale_formula_random():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)) * 3
    w_q, s = quantize_weight_ternary(w, eps=1e-3)
    assert set(w_q.unique().tolist()) == {-1, 0, 1}
    assert s.item() == pytest.approx(w.abs().mean().item() + 1e-3, rel=1e-6)
    assert torch.equal(w_q, torch.clamp(torch.round(w / s), -1, 1).to(torch.int8))


def test_ternary_explicit_scale_for_shards():
    """A tensor-parallel shard quantizes with the global scale it is given."""
    w = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    _, s_full = quantize_weight_ternary(w)
    shards = [quantize_weight_ternary(part, scale=s_full) for part in w.chunk(2, dim=0)]
    w_q_full, _ = quantize_weight_ternary(w)
    assert torch.equal(torch.cat([q for q, _ in shards]), w_q_full)
    assert all(torch.equal(s, s_full) for _, s in shards)
    w_q, s = quantize_weight_ternary(torch.tensor([1.0, 3.0, -5.0]), scale=torch.tensor(2.0))
    assert s.item() == 2.0 and torch.equal(w_q, torch.tensor([0, 1, -1], dtype=torch.int8))  # round(0.5)=0


def test_rounding_is_half_to_even():
    """torch.round (and so both quantizers) rounds exact halves to the even integer."""
    w_q, _ = quantize_weight_ternary(torch.tensor([0.5, 1.5, -0.5]), scale=torch.tensor(1.0))
    assert w_q.tolist() == [0, 1, 0]  # 0.5 -> 0, 1.5 -> 2 -> clamp 1, -0.5 -> -0
    x_q, _ = quantize_activation_int8(torch.tensor([2.5, 127.0]), absmax=torch.tensor([127.0]))
    assert x_q.tolist() == [2, 127]


def test_int8_hand_case():
    x = torch.tensor([[0.3, -1.0, 0.2], [0.0, 0.0, 0.0]])
    x_q, s = quantize_activation_int8(x)
    assert s.shape == (2, 1) and s.dtype == torch.float32
    assert s[0, 0].item() == pytest.approx(1.0 / 127)
    assert s[1, 0].item() == pytest.approx(ACT_EPS / 127)  # all-zero row: eps guard
    # 0.3·127 = 38.1, 0.2·127 = 25.4
    assert torch.equal(x_q, torch.tensor([[38, -127, 25], [0, 0, 0]], dtype=torch.int8))
    deq = fake_quant_activation_int8(x)
    assert torch.allclose(deq, x_q.float() * s)


def test_int8_range_and_error_bound():
    x = torch.randn(32, 100, generator=torch.Generator().manual_seed(2)) * 1000
    x_q, s = quantize_activation_int8(x)
    assert x_q.dtype == torch.int8
    assert int(x_q.min()) >= -128 and int(x_q.max()) <= 127
    assert torch.all(x_q.abs().amax(-1) == 127)  # the absmax of every token maps to ±127
    err = (fake_quant_activation_int8(x) - x).abs()
    assert torch.all(err <= s / 2 * (1 + 1e-5))


def test_int8_external_absmax_clamps():
    x = torch.tensor([[-2.0, 1.0, 0.5]])
    x_q, s = quantize_activation_int8(x, absmax=torch.tensor([[1.0]]))
    assert s.item() == pytest.approx(1 / 127)
    assert x_q.tolist() == [[-128, 127, 64]]  # -254 clamps to -128; 63.5 -> 64 (even)


def test_quantizing_a_sparsified_row_keeps_zeros_and_absmax():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    y = topk_sparsify(x, 0.75)
    x_q, _ = quantize_activation_int8(y)
    assert torch.equal(x_q == 0, (y == 0) | (x_q == 0))
    assert torch.all((y == 0) <= (x_q == 0))
    assert torch.all(x_q.abs().amax(-1) == 127)
    assert torch.equal(y.abs().amax(-1), x.abs().amax(-1))


@pytest.mark.parametrize("fn, name", [(quantize_weight_ternary, "w"), (quantize_activation_int8, "x"),
                                      (fake_quant_weight_ternary, "w"), (fake_quant_activation_int8, "x"),
                                      (ternary_scale, "w")])
def test_integer_dtype_rejected(fn, name):
    with pytest.raises(ValueError, match=rf"{name} must be a floating-point tensor"):
        fn(torch.ones(4, 4, dtype=torch.int32))


def test_fake_quant_forward_values_and_ste():
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(4), requires_grad=True)
    fw = fake_quant_weight_ternary(w)
    w_q, s = quantize_weight_ternary(w)
    assert torch.allclose(fw, w_q.float() * s)
    g = torch.randn(6, 5)
    fw.backward(g)
    assert torch.equal(w.grad, g)

    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(5), requires_grad=True)
    fx = fake_quant_activation_int8(x)
    x_q, sx = quantize_activation_int8(x)
    assert torch.allclose(fx, x_q.float() * sx)
    gx = torch.randn(3, 5)
    fx.backward(gx)
    assert torch.equal(x.grad, gx)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_fake_quant_keeps_dtype(dtype):
    w = torch.randn(4, 8).to(dtype)
    assert fake_quant_weight_ternary(w).dtype == dtype
    assert fake_quant_activation_int8(w).dtype == dtype
    w_q, s = quantize_weight_ternary(w)
    assert w_q.dtype == torch.int8 and s.dtype == torch.float32


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_int8_scale_is_the_correctly_rounded_quotient(device):
    """``s_x = absmax / 127`` rounded once (numpy's float32 division is IEEE), as the Triton kernels
    compute it (``div_rn``); multiplying by the rounded reciprocal — what CUDA does for ``tensor /
    python_scalar`` — differs in 200 of these 4096 rows."""
    x = torch.randn(4096, 8, generator=torch.Generator().manual_seed(0)) * 10
    _, s = quantize_activation_int8(x.to(device))
    m = x.abs().amax(-1, keepdim=True).numpy().astype(np.float32)
    want = m / np.float32(127)
    assert np.array_equal(s.cpu().numpy(), want)
    assert not np.array_equal(want, m * (np.float32(1) / np.float32(127)))  # the data tells them apart
