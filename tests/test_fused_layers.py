"""Fused training kernels (qsparse_dist.layers.fused / qsparse_dist.kernels.glu) against the eager ops, and the
once-per-optimizer-step BitNet weight cache of the megatron linears.

The GLU kernel runs under the Triton interpreter on CPU (TRITON_INTERPRET=1) and natively on a GPU;
the liger-kernel RMSNorm / RoPE wrappers only on a GPU (skipped without CUDA).
"""

from __future__ import annotations

import os

import pytest
import torch

from qsparse_dist.layers.parallel_linear import QSparseLinearMixin, invalidate_weight_caches
from qsparse_dist.ops import LinearRecipe, fake_quant_weight_ternary, glu_activation

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 or a CUDA device")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _eager_and_fused(name: str, dtype: torch.dtype, seed: int):
    from qsparse_dist.kernels.glu import fused_glu

    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(3, 5, 2 * 37, generator=g) * 2).to(dtype).to(DEV)
    h[0, 0, :37] = 0.0  # gate exactly zero: the ReLU boundary
    dy = torch.randn(3, 5, 37, generator=g).to(dtype).to(DEV)
    out = []
    for fn in (glu_activation(name), lambda t: fused_glu(t, name)):
        x = h.clone().requires_grad_(True)
        y = fn(x)
        y.backward(dy)
        out.append((y.detach(), x.grad))
    return out


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["relu2glu", "drelu"])
def test_fused_glu_bit_identical_to_eager(name, dtype):
    (y_ref, g_ref), (y, g) = _eager_and_fused(name, dtype, seed=len(name))
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert torch.equal(y, y_ref)
    assert torch.equal(g, g_ref)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_swiglu_close_to_eager(dtype):
    (y_ref, g_ref), (y, g) = _eager_and_fused("swiglu", dtype, seed=3)
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # exp's last bit; one bf16 rounding
    assert torch.allclose(y.float(), y_ref.float(), rtol=tol, atol=tol)
    assert torch.allclose(g.float(), g_ref.float(), rtol=tol, atol=tol)


@needs_triton
def test_fused_glu_bad_input_names_the_problem():
    from qsparse_dist.kernels.glu import fused_glu

    with pytest.raises(ValueError, match="fused gate/up dim must be even"):
        fused_glu(torch.ones(2, 5, device=DEV), "relu2glu")
    with pytest.raises(ValueError, match="ffn_activation must be one of"):
        fused_glu(torch.ones(2, 4, device=DEV), "gelu")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rmsnorm_matches_reference(dtype):
    from qsparse_dist.layers import fused
    from qsparse_dist.model.reference import RMSNorm

    torch.manual_seed(0)
    ref = RMSNorm(2048, eps=1e-5).to(DEV)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(2048) * 0.5 + 1)
    ref.weight.data = ref.weight.data.to(dtype)
    x = torch.randn(64, 4, 2048, device=DEV).to(dtype)
    dy = torch.randn_like(x)
    outs = []
    for fn in (ref, lambda t: fused.rms_norm(t, ref.weight, ref.eps)):
        ref.weight.grad = None
        xi = x.clone().requires_grad_(True)
        y = fn(xi)
        y.backward(dy)
        outs.append((y.float(), xi.grad.float(), ref.weight.grad.float()))
    (y0, gx0, gw0), (y1, gx1, gw1) = outs
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    assert rel(y1, y0) < tol and rel(gx1, gx0) < tol
    assert rel(gw1, gw0) < (1e-5 if dtype == torch.float32 else 8e-3)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rope_matches_reference(dtype):
    from qsparse_dist.layers import fused
    from qsparse_dist.model.reference import apply_rope, rope_cache

    s, b, h, d = 128, 2, 4, 64
    cos, sin = rope_cache(s, d, 10000.0, device=DEV)
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=DEV, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(s, device=DEV, dtype=torch.float32), inv)
    freqs = torch.cat([freqs, freqs], dim=-1).view(s, 1, 1, d)  # megatron's rotary_pos_emb
    q = torch.randn(s, b, h, d, device=DEV).to(dtype)  # megatron's [s, b, heads, hd]
    k = torch.randn(s, b, h, d, device=DEV).to(dtype)
    q_ref, k_ref = (apply_rope(t.permute(1, 2, 0, 3), cos, sin) for t in (q, k))
    q_f, k_f = fused.rope_bhsd(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), freqs)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(q_f.float(), q_ref.float(), rtol=tol, atol=tol)
    assert torch.allclose(k_f.float(), k_ref.float(), rtol=tol, atol=tol)
    # backward: RoPE is a rotation, so the gradient is the inverse rotation of dy
    qg = q.clone().requires_grad_(True)
    qr, _ = fused.rope_bhsd(qg.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), freqs)
    (qr.float() * q_ref.float()).sum().backward()
    qg2 = q.clone().float().requires_grad_(True)
    (apply_rope(qg2.permute(1, 2, 0, 3), cos, sin) * q_ref.float()).sum().backward()
    assert torch.allclose(qg.grad.float(), qg2.grad, rtol=tol, atol=tol * 10)


class _TernaryHolder(QSparseLinearMixin, torch.nn.Module):
    """The mixin's weight path alone (TP group of one); the matmul is megatron's elsewhere."""

    def __init__(self, w: torch.Tensor) -> None:
        torch.nn.Module.__init__(self)
        self.weight = torch.nn.Parameter(w)
        self.recipe = LinearRecipe(kind="bitnet")
        self.tp_group = None


def test_ternary_weight_cached_until_the_weights_change():
    torch.manual_seed(0)
    lin = _TernaryHolder(torch.randn(16, 32))
    w_eff = lin.effective_weight(lin.weight)
    assert torch.equal(w_eff, fake_quant_weight_ternary(lin.weight))
    w_eff.sum().backward()  # straight-through: gradient 1 for every latent weight
    assert torch.equal(lin.weight.grad, torch.ones(16, 32))
    lin.weight.data.mul_(3.0)  # a write the version counter does not see: served from the cache
    stale = lin.effective_weight(lin.weight)
    assert torch.equal(stale, w_eff)
    invalidate_weight_caches()
    assert torch.equal(lin.effective_weight(lin.weight), fake_quant_weight_ternary(lin.weight))
    with torch.no_grad():
        lin.weight.add_(0.5)  # an in-place write bumps the version: recomputed
    assert torch.equal(lin.effective_weight(lin.weight), fake_quant_weight_ternary(lin.weight))
    opt = torch.optim.SGD(lin.parameters(), lr=0.0)
    lin.weight.data.mul_(-1.0)  # e.g. ZeRO's flat-buffer copy; then the optimizer step hook fires
    opt.step()
    assert torch.equal(lin.effective_weight(lin.weight), fake_quant_weight_ternary(lin.weight))
