"""2:4 Block Q-Sparse on sparse tensor cores (qsparse_dist.kernels.sparse24): the mask, the CUTLASS
layout, the CPU fallback and the config switch.  The sparse matmul itself needs a GPU with sparse tensor
cores; ``tools/bench_sparse24.py`` asserts it against the dense masked product there."""

from __future__ import annotations

import os

import pytest
import torch

from qsparse_dist.config.schema import SparsityConfig
from qsparse_dist.layers import SparseLinear
from qsparse_dist.layers.sparse_linear import is_sparse24, use_sparse24
from qsparse_dist.ops import LinearRecipe, topk_mask

triton = pytest.importorskip("triton")
needs_interp = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="Triton kernels on CPU need TRITON_INTERPRET=1")


def _with_ties(shape, dtype, seed=0):
    """Random values plus rows full of ties, zeros and sign-only differences."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(dtype)
    x[0] = 0
    x[1] = 1
    x[2, 0::2] = -0.5
    x[2, 1::2] = 0.5
    x[3] = torch.randint(-2, 3, (shape[-1],), generator=g).to(dtype)  # many equal magnitudes
    return x


@needs_interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mask_equals_torch_nm_op(dtype):
    from qsparse_dist.kernels.sparse24 import sparse24_mask_dense

    x = _with_ties((40, 136), dtype)  # 136 = 128 + 8: a partial column tile; 40 rows: a partial row tile
    ref = x * topk_mask(x, 0.5, block_size=4)  # torch path on CPU (the reference)
    got = sparse24_mask_dense(x)
    assert got.dtype == dtype and torch.equal(got, ref)
    # the same rule as a stable descending sort of |x| per block of 4 keeping the first 2
    blocks = x.float().abs().reshape(40, -1, 4)
    idx = torch.sort(blocks, dim=-1, descending=True, stable=True).indices[..., :2]
    m = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, idx, True).reshape(x.shape)
    assert torch.equal(got, x * m)


@needs_interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cutlass_layout_equals_torch_conversion(dtype):
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_from_dense_cutlass,
        sparse_semi_structured_to_dense_cutlass,
    )

    from qsparse_dist.kernels.sparse24 import sparse24_compress_cutlass

    x = torch.randn(96, 192, generator=torch.Generator().manual_seed(1)).to(dtype)
    xm, packed, meta = sparse24_compress_cutlass(x)
    assert torch.equal(xm, x * topk_mask(x, 0.5, block_size=4))
    ref_packed, ref_meta = sparse_semi_structured_from_dense_cutlass(xm)  # no zeros: one encoding
    assert torch.equal(packed, ref_packed) and torch.equal(meta, ref_meta)
    # with ties and zeros the encoding of a zero may differ; the decoded matrix may not
    y = _with_ties((64, 128), dtype, seed=2)
    ym, p, m = sparse24_compress_cutlass(y)
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(p, m), ym)


def test_cutlass_layout_refuses_bad_shapes():
    from qsparse_dist.kernels.sparse24 import sparse24_compress_cutlass

    with pytest.raises(ValueError, match="K % 64"):
        sparse24_compress_cutlass(torch.zeros(32, 48, dtype=torch.bfloat16))


def test_recipe_is_sparse24():
    assert is_sparse24(LinearRecipe("block_qsparse", 0.5, 4))
    assert is_sparse24(LinearRecipe("block_qsparse", 0.4, 4))  # drops floor(1.6 + .5) = 2 of 4
    assert not is_sparse24(LinearRecipe("block_qsparse", 0.7, 4))
    assert not is_sparse24(LinearRecipe("block_qsparse", 0.5, 8))
    assert not is_sparse24(LinearRecipe("block_qsparse", 0.5, 4, ste=False))
    assert not is_sparse24(LinearRecipe("block_qsparse", 0.5, 4, rescale=True))
    assert not is_sparse24(LinearRecipe("bitnet_qsparse", 0.5, 4))


@pytest.mark.parametrize("mode", ["auto", "on", "off"])
def test_cpu_fallback_is_dense_masked_product(mode):
    torch.manual_seed(0)
    lin = SparseLinear(64, 24, bias=True, recipe=LinearRecipe("block_qsparse", 0.5, 4), sparse_tensor_cores=mode)
    x = torch.randn(3, 32, 64, requires_grad=True)
    assert not use_sparse24(lin.recipe, mode, x, lin.weight)
    y = lin(x)
    mask = topk_mask(x, 0.5, block_size=4)
    ref = torch.nn.functional.linear(x.detach() * mask, lin.weight.detach(), lin.bias.detach())
    assert torch.equal(y, ref)
    y.sum().backward()  # straight-through: dx = dy·W, unmasked
    assert torch.allclose(x.grad, torch.ones(3, 32, 24) @ lin.weight.detach())


def test_sparse_linear_refuses_unknown_mode():
    with pytest.raises(ValueError, match="sparse_tensor_cores"):
        SparseLinear(8, 8, recipe=LinearRecipe("block_qsparse", 0.5, 4), sparse_tensor_cores="yes")


def test_config_on_needs_24():
    ok = dict(linear="block_qsparse", block_size=4, qkv=0.5, out=0.5, up=0.5, down=0.5)
    assert SparsityConfig(**ok, sparse_tensor_cores="on").sparse_tensor_cores == "on"
    assert SparsityConfig(**{**ok, "qkv": 0.0}, sparse_tensor_cores="on")  # dense projection: fine
    bad = [({"linear": "qsparse", "block_size": None}, "sparsity.linear"),
           ({"block_size": 32}, "sparsity.block_size"),
           ({"down": 0.75}, "sparsity.down"),
           ({"ste": False}, "sparsity.ste"),
           ({"rescale": True}, "sparsity.rescale")]
    for patch, field in bad:
        with pytest.raises(ValueError, match=field):
            SparsityConfig(**{**ok, **patch}, sparse_tensor_cores="on")
        SparsityConfig(**{**ok, **patch}, sparse_tensor_cores="auto")  # auto / off: never an error
    with pytest.raises(ValueError, match="sparse_tensor_cores"):
        SparsityConfig(**ok, sparse_tensor_cores="always")


def test_config_yaml_on_off():
    from qsparse_dist.config import config_from_dict

    cfg = config_from_dict({}, ["sparsity.linear=block_qsparse", "sparsity.block_size=4", "sparsity.sparse_tensor_cores=off"])
    assert cfg.sparsity.sparse_tensor_cores == "off"


@needs_interp
def test_sparsify_ste_equals_topk_sparsify():
    from qsparse_dist.kernels.sparse24 import sparse24_sparsify_ste
    from qsparse_dist.ops import topk_sparsify

    x = _with_ties((8, 64), torch.float32).requires_grad_()
    y = sparse24_sparsify_ste(x)
    assert torch.equal(y, topk_sparsify(x.detach(), 0.5, block_size=4))
    y.backward(torch.arange(512.0).view(8, 64))
    assert torch.equal(x.grad, torch.arange(512.0).view(8, 64))  # straight-through


@needs_interp
@pytest.mark.parametrize("sparsity", [0.4, 0.5])
def test_ops_dispatch_routes_2_of_4_to_the_sparse24_kernel(monkeypatch, sparsity):
    """``topk_sparsify(x, s, block_size=4)`` keeping 2 of 4 runs the one-pass 2:4 kernel when the
    kernels are dispatched, with the torch op's values and the STE gradient."""
    import qsparse_dist.kernels.sparse24 as s24
    from qsparse_dist.ops import topk_sparsify

    calls = []
    orig = s24._MaskSTE24.apply
    monkeypatch.setattr(s24._MaskSTE24, "apply", lambda *a: calls.append(1) or orig(*a))
    x = _with_ties((6, 48), torch.float32, seed=3).requires_grad_()
    monkeypatch.setenv("QSPARSE_TRITON", "0")
    ref = topk_sparsify(x, sparsity, block_size=4)
    assert not calls
    monkeypatch.setenv("QSPARSE_TRITON", "1")
    got = topk_sparsify(x, sparsity, block_size=4)
    assert calls and torch.equal(got, ref)
    got.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    calls.clear()
    topk_sparsify(x, 0.75, block_size=4)  # 1 of 4: the generic kernel
    assert not calls
