"""TP-global top-K / int8 absmax / ternary scale on 2 gloo ranks: each shard's mask is exactly the
single-device mask restricted to the shard (ties, all-on-one-rank rows, bf16 included) for both
threshold methods; the STE gradient and the L2 re-scale match; the communication volume is the
documented one."""

from __future__ import annotations

import pytest

from tests.dist_utils import torchrun

pytestmark = [pytest.mark.dist]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return torchrun("parallel_topk.py", 2, tmp_path_factory.mktemp("topk"), timeout=300)


def test_global_mask_equals_full_mask(results):
    for r in results:
        assert r["cases"] == 240
        assert r["mask_mismatch"] == 0
        assert r["absmax_diff"] == 0.0


def test_bitnet_scale_rescale_and_ste(results):
    for r in results:
        assert r["scale_diff"] <= 1e-7  # float64-accumulated vs the float32 mean
        assert r["rescale_diff"] <= 1e-5 and r["grad_diff"] <= 1e-5


def test_communication_volume(results):
    # 32 tokens, 32 features per shard, k = 32 of 64: candidates = the whole shard (P·32·4 B/token)
    # + tie counts (P·8 B/token); radix = 8 rounds · 16 bins · 4 B + tie counts
    for r in results:
        assert r["calls_candidates"] == 2 and r["bytes_candidates"] == 32 * (2 * 32 * 4 + 2 * 8)
        assert r["calls_radix"] == 9 and r["bytes_radix"] == 32 * (8 * 16 * 4 + 2 * 8)
