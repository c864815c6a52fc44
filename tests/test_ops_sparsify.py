"""Q-Sparse top-K (``qsparse_dist.ops.sparsify``) and the sparsity statistics (``ops.stats``)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qsparse_dist.ops import (
    SparsityMeter,
    apply_mask,
    kept_count,
    l2_rescale,
    mask_from_threshold,
    topk_mask,
    topk_sparsify,
    topk_threshold,
    validate_sparsity,
    zero_fraction,
)

METHODS = ("topk", "kthvalue")


def reference_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k of |x| along the last dim by a stable descending sort: equal magnitudes keep their
    index order, so the lowest index wins a tie (the documented rule)."""
    order = torch.sort(x.abs(), dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(x, dtype=torch.bool)
    return mask.scatter(-1, order[..., :k], True)


# --- k rounding -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "d, s, k",
    [
        (4, 0.5, 2),
        (5, 0.5, 2),  # 2.5 dropped rounds half up to 3
        (8, 0.3125, 5),  # 2.5 (exact in binary) -> 3 dropped; banker's rounding would keep 6
        (10, 0.24, 8),  # 2.4 -> 2 dropped
        (10, 0.26, 7),  # 2.6 -> 3 dropped
        (3, 0.5, 1),
        (1, 0.4, 1),
        (7, 0.0, 7),
        (4096, 0.75, 1024),
    ],
)
def test_kept_count_rounding(d, s, k):
    assert kept_count(d, s) == k
    assert kept_count(d, s) == d - math.floor(s * d + 0.5)


def test_kept_count_zero_is_an_error():
    with pytest.raises(ValueError, match=r"k=0"):
        kept_count(1, 0.5)
    with pytest.raises(ValueError, match=r"k=0"):
        topk_sparsify(torch.randn(2, 3), 0.9)  # 3 - floor(3.2) = 0
    with pytest.raises(ValueError, match=r"k=0"):
        topk_sparsify(torch.randn(2, 8), 0.9, block_size=4)  # per block: 4 - floor(4.1) = 0


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", True, None])
def test_bad_sparsity_names_argument(bad):
    with pytest.raises(ValueError, match="sparsity"):
        validate_sparsity(bad)
    with pytest.raises(ValueError, match="sparsity"):
        topk_sparsify(torch.randn(2, 8), bad)


@pytest.mark.parametrize("bad", [3, 0, -4, True, 2.0])
def test_bad_block_size_names_argument(bad):
    with pytest.raises(ValueError, match="block_size"):
        topk_sparsify(torch.randn(2, 8), 0.5, block_size=bad)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.bool])
def test_integer_input_is_rejected(dtype):
    x = torch.ones(2, 8, dtype=dtype)
    with pytest.raises(ValueError, match=r"x must be a floating-point"):
        topk_sparsify(x, 0.5)
    with pytest.raises(ValueError, match=r"x must be a floating-point"):
        topk_mask(x, 0.5)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="x must have at least one dimension"):
        topk_sparsify(torch.tensor(1.0), 0.5)
    with pytest.raises(ValueError, match="x must be a torch.Tensor"):
        topk_sparsify([1.0, 2.0], 0.5)
    with pytest.raises(ValueError, match="method"):
        topk_sparsify(torch.randn(2, 8), 0.5, method="sort")


# --- hand-computed cases --------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_hand_case(method):
    x = torch.tensor([[0.5, -2.0, 1.0, -0.1], [3.0, 0.0, -4.0, 1.0]])
    y = topk_sparsify(x, 0.5, method=method)
    assert torch.equal(y, torch.tensor([[0.0, -2.0, 1.0, 0.0], [3.0, 0.0, -4.0, 0.0]]))


@pytest.mark.parametrize("method", METHODS)
def test_ties_keep_lowest_index(method):
    # |x| = [.5, 1, 1, .2, 1]; k = 5 - floor(3.5) = 2 of the three tied 1's: indices 1 and 2.
    x = torch.tensor([0.5, -1.0, 1.0, 0.2, -1.0])
    assert torch.equal(topk_sparsify(x, 0.6, method=method), torch.tensor([0.0, -1.0, 1.0, 0.0, 0.0]))
    # all equal: the first k
    assert torch.equal(topk_mask(torch.ones(6), 0.5, method=method), torch.tensor([1, 1, 1, 0, 0, 0]).bool())
    # an all-zero row still keeps exactly k entries in the mask (the first ones)
    m = topk_mask(torch.zeros(2, 4), 0.25, method=method)
    assert torch.equal(m, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]]).bool())
    # ties straddling the threshold with a strictly larger entry after them
    x = torch.tensor([2.0, 2.0, 2.0, 5.0, 0.0, 2.0])
    assert torch.equal(topk_mask(x, 0.5, method=method), torch.tensor([1, 1, 0, 1, 0, 0]).bool())


@pytest.mark.parametrize("method", METHODS)
def test_block_hand_case(method):
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 3.0, 2.0, 1.0])
    y = topk_sparsify(x, 0.5, block_size=4, method=method)
    assert torch.equal(y, torch.tensor([0.0, 0.0, 3.0, 4.0, 4.0, 3.0, 0.0, 0.0]))
    # ties inside a block also keep the lowest index *within the block*
    x = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 7.0, 7.0, 7.0])
    assert torch.equal(topk_mask(x, 0.5, block_size=4, method=method), torch.tensor([1, 1, 0, 0, 0, 1, 1, 0]).bool())


@pytest.mark.parametrize("method", METHODS)
def test_threshold_and_mask_from_threshold(method):
    a = torch.tensor([[3.0, 1.0, 2.0, 5.0], [1.0, 1.0, 1.0, 0.0]])
    assert torch.equal(topk_threshold(a, 2, method), torch.tensor([[3.0], [1.0]]))
    assert torch.equal(topk_threshold(a, 1, method), torch.tensor([[5.0], [1.0]]))
    a = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0])
    got = mask_from_threshold(a, torch.tensor([2.0]), torch.tensor([2]))
    assert torch.equal(got, torch.tensor([0, 1, 1, 0, 1]).bool())
    got = mask_from_threshold(a, torch.tensor([2.0]), torch.tensor([0]))
    assert torch.equal(got, torch.tensor([0, 0, 0, 0, 1]).bool())


def test_sparsity_zero_is_identity_with_identity_gradient():
    x = torch.randn(3, 10, requires_grad=True)
    y = topk_sparsify(x, 0.0)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


# --- properties on random data --------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("d", [33, 64, 100])
@pytest.mark.parametrize("s", [0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9])
def test_measured_sparsity_equals_configured(method, d, s):
    x = torch.randn(4, 5, d, generator=torch.Generator().manual_seed(d))
    y = topk_sparsify(x, s, method=method)
    k = kept_count(d, s)
    nnz = (y != 0).sum(-1)
    assert torch.all(nnz == k)
    assert abs(zero_fraction(y).item() - (d - k) / d) < 1e-6
    assert abs((d - k) / d - s) <= 0.5 / d + 1e-12  # the rounding error bound


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("block, s, n", [(32, 0.5, 16), (8, 0.5, 4), (4, 0.75, 1), (16, 0.3, 11)])
def test_nm_property_on_every_block(method, block, s, n):
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(block))
    y = topk_sparsify(x, s, block_size=block, method=method)
    blocks = y.reshape(3, 7, 64 // block, block)
    assert torch.all((blocks != 0).sum(-1) == n)
    # the kept entries of each block are that block's n largest magnitudes
    ref = reference_mask(x.reshape(3, 7, 64 // block, block), n)
    assert torch.equal(blocks != 0, ref)


@pytest.mark.parametrize("method", METHODS)
def test_matches_stable_sort_reference_with_many_ties(method):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (64, 40), generator=g).float()  # 7 values: ties everywhere, zeros too
    for s in (0.2, 0.5, 0.8):
        assert torch.equal(topk_mask(x, s, method=method), reference_mask(x, kept_count(40, s)))
        blk = topk_mask(x, s, block_size=8, method=method)
        assert torch.equal(blk, reference_mask(x.view(64, 5, 8), kept_count(8, s)).view(64, 40))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4),
    d=st.integers(1, 48),
    s=st.floats(0.0, 0.95),
    levels=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_property_methods_agree_with_reference(rows, d, s, levels, seed):
    assume(d - math.floor(s * d + 0.5) > 0)  # at least one entry kept
    x = torch.randint(-levels, levels + 1, (rows, d), generator=torch.Generator().manual_seed(seed)).float()
    ref = reference_mask(x, kept_count(d, s))
    for method in METHODS:
        assert torch.equal(topk_mask(x, s, method=method), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dtype_and_shape_preserved(dtype):
    x = torch.randn(2, 3, 16).to(dtype)
    y = topk_sparsify(x, 0.5)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y[y != 0], x[y != 0])  # kept values are untouched


# --- gradients ------------------------------------------------------------------------------------

def test_ste_gradient_equals_upstream():
    x = torch.randn(4, 16, requires_grad=True)
    g = torch.randn(4, 16)
    topk_sparsify(x, 0.75).backward(g)
    assert torch.equal(x.grad, g)
    x.grad = None
    topk_sparsify(x, 0.5, block_size=4).backward(g)
    assert torch.equal(x.grad, g)


def test_masked_gradient_without_ste():
    x = torch.randn(4, 16, requires_grad=True)
    g = torch.randn(4, 16)
    topk_sparsify(x, 0.75, ste=False).backward(g)
    mask = topk_mask(x, 0.75)
    assert torch.equal(x.grad, g * mask)
    assert int((x.grad != 0).sum()) == 4 * 4


def _no_near_ties(shape, seed):
    """float64 data whose magnitudes are ≥ 1e-2 apart, so finite differences never flip the mask."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    mags = (torch.randperm(n, generator=g).double() + 1.0) * 1e-2
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return (mags * signs).reshape(shape)


def test_gradcheck_masked_path():
    x = _no_near_ties((3, 8), 1).requires_grad_()
    mask = topk_mask(x, 0.5)
    assert torch.autograd.gradcheck(lambda t: apply_mask(t, mask, ste=False), (x,))
    assert torch.autograd.gradcheck(lambda t: topk_sparsify(t, 0.5, ste=False), (x,))
    assert torch.autograd.gradcheck(lambda t: topk_sparsify(t, 0.5, block_size=4, ste=False), (x,))


def test_ste_is_not_the_true_gradient():
    """Sanity check that gradcheck can fail here: the STE gradient is deliberately not the
    derivative of the forward."""
    x = _no_near_ties((2, 8), 2).requires_grad_()
    assert not torch.autograd.gradcheck(lambda t: topk_sparsify(t, 0.5, ste=True), (x,), raise_exception=False)


def test_l2_rescale_hand_case_and_gradcheck():
    x = torch.tensor([[3.0, 4.0, 1.0, 0.5]])
    y = topk_sparsify(x, 0.5, rescale=True)
    assert torch.allclose(y, torch.tensor([[3.0, 4.0, 0.0, 0.0]]) * math.sqrt(26.25) / 5.0)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))
    assert torch.equal(l2_rescale(torch.zeros(1, 3), torch.zeros(1, 3)), torch.zeros(1, 3))  # eps guard
    xd = _no_near_ties((3, 8), 3).requires_grad_()
    mask = topk_mask(xd, 0.5)
    assert torch.autograd.gradcheck(lambda t: l2_rescale(t * mask, t), (xd,))
    assert torch.autograd.gradcheck(lambda t: topk_sparsify(t, 0.5, ste=False, rescale=True), (xd,))


# --- statistics -----------------------------------------------------------------------------------

def test_zero_fraction_and_meter():
    assert zero_fraction(torch.tensor([0.0, 1.0, 0.0, 2.0])).item() == 0.5
    assert zero_fraction(torch.empty(0)).item() == 0.0
    z = zero_fraction(torch.zeros(3, requires_grad=True))
    assert z.dim() == 0 and z.dtype == torch.float32 and not z.requires_grad and z.item() == 1.0
    meter = SparsityMeter()
    meter.update("layers.0.qkv", torch.tensor(0.5))
    meter.update("layers.0.qkv", torch.tensor(0.7))
    meter.update("layers.0.down", torch.tensor(0.9))
    means = meter.means()
    assert list(means) == ["layers.0.down", "layers.0.qkv"]
    assert means["layers.0.qkv"] == pytest.approx(0.6) and means["layers.0.down"] == pytest.approx(0.9)
    meter.reset()
    assert meter.means() == {}


def test_bench_ops_smoke(tmp_path):
    """tools/bench_ops.py runs end to end on a tiny shape and writes its JSON."""
    import json

    from tests.tools_loader import load_tool

    mod = load_tool("bench_ops")
    out = tmp_path / "b.json"
    assert mod.main(["--device", "cpu", "--shapes", "8x64", "--repeat", "1", "--warmup", "0", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data["results"]) == 9 and data["meta"]["shapes"] == ["8x64"]
    assert all(r["median_ms"] > 0 and r["path"] == "torch" for r in data["results"])
