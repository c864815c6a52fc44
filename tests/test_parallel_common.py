"""The comparison helper of the multi-process parallel tests (``tests/workers/parallel_common.max_diff``)
must fail loudly when there is nothing to compare: an empty dict/list, a length, key or shape mismatch
would otherwise read as "difference 0" and pass any tolerance."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from parallel_common import max_diff  # noqa: E402


def test_max_diff_value():
    a = torch.zeros(2, 3)
    b = a.clone()
    b[1, 2] = -0.25
    assert max_diff(a, b) == 0.25
    assert max_diff({"x": a, "y": [a, b]}, {"x": a, "y": [a, a]}) == 0.25


@pytest.mark.parametrize("a, b, message", [
    ({}, {}, "two empty dicts"),
    ([], [], "two empty sequences"),
    ({"x": []}, {"x": []}, "two empty sequences"),
    ({"x": torch.ones(1)}, {"y": torch.ones(1)}, "different keys"),
    ([torch.ones(1)], [torch.ones(1), torch.ones(1)], "lengths differ"),
    (torch.ones(2, 3), torch.ones(3), "shapes differ"),
    (torch.ones(0), torch.ones(0), "empty tensors"),
])
def test_max_diff_refuses_nothing_to_compare(a, b, message):
    with pytest.raises(ValueError, match=message):
        max_diff(a, b)
