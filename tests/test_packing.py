"""The packed ternary format (qsparse_dist.ops.packing): exact bit layout, round trips, errors."""

import pytest
import torch

from qsparse_dist.ops import quantize_weight_ternary
from qsparse_dist.ops.packing import (
    PackedTernary,
    pack_ternary,
    pack_ternary_weight,
    to_feature_major,
    unpack_ternary,
)


def _rand_ternary(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, shape, generator=g).to(torch.int8)


def test_bit_layout_is_documented_one():
    # element 4j+i in bits [2i, 2i+1] of byte j, code = w + 1
    w = torch.tensor([[-1, 0, 1, 1, 0, -1]], dtype=torch.int8)
    p = pack_ternary(w)
    assert p.dtype == torch.uint8 and p.shape == (1, 2)
    assert p[0, 0].item() == (0 | 1 << 2 | 2 << 4 | 2 << 6)
    assert p[0, 1].item() == (1 | 0 << 2 | 1 << 4 | 1 << 6)  # padding = code 1 (weight 0)
    assert pack_ternary(torch.zeros(2, 8, dtype=torch.int8)).eq(0x55).all()


@pytest.mark.parametrize("shape", [(3, 4), (5, 7), (1, 1), (2, 3, 9)])
def test_round_trip(shape):
    w = _rand_ternary(*shape, seed=shape[-1])
    p = pack_ternary(w)
    assert p.shape == (*shape[:-1], (shape[-1] + 3) // 4)
    assert torch.equal(unpack_ternary(p, shape[-1]), w)


def test_feature_major_is_pack_of_transpose():
    w = _rand_ternary(6, 10, seed=3)
    fm = to_feature_major(pack_ternary(w), 10)
    assert fm.shape == (10, 2)
    assert torch.equal(fm, pack_ternary(w.t().contiguous()))
    assert torch.equal(unpack_ternary(fm, 6), w.t())


def test_pack_ternary_weight_dequantizes_like_quantizer():
    w = torch.randn(8, 12, generator=torch.Generator().manual_seed(1))
    pt = pack_ternary_weight(w)
    w_q, s = quantize_weight_ternary(w)
    assert isinstance(pt, PackedTernary) and pt.out_features == 8 and pt.in_features == 12
    assert pt.scale.shape == () and pt.scale.dtype == torch.float32
    assert torch.equal(pt.unpack(), w_q)
    torch.testing.assert_close(pt.dequantize(), w_q.float() * s, rtol=0, atol=0)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="w_q must be int8"):
        pack_ternary(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="only -1, 0, 1"):
        pack_ternary(torch.full((2, 4), 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="ceil"):
        unpack_ternary(torch.zeros(2, 3, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="invalid code"):
        unpack_ternary(torch.full((1, 1), 0xFF, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="k must be"):
        unpack_ternary(torch.zeros(1, 1, dtype=torch.uint8), 0)
