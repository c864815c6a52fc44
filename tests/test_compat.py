"""qsparse_dist.compat: the private-API patches of megatron-core / DeepSpeed.

* The Transformer-Engine names megatron-core 0.16's ``moe_utils`` leaves undefined without Transformer
  Engine are defined on the CUDA path too (issue 14, 4a: MoE crashed on an H200 with ``NameError:
  te_general_gemm`` because only the CPU shims defined them).  Checked in a fresh interpreter, since a
  process that already ran the CPU shims has the names: ``prepare_megatron(cuda=True)`` as the CUDA
  path calls it, then megatron's own router gating (forward and backward) on CPU tensors, compared
  with ``x @ w.T`` computed by torch.
* A release the patches were not written for is refused with an error naming package and version.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qsparse_dist.compat import SUPPORTED, CompatError, check_version, require

ROOT = Path(__file__).resolve().parents[1]

_CUDA_PATH = r"""
import torch
from qsparse_dist.compat import prepare_megatron
from qsparse_dist.compat.cpu import cpu_shims_enabled
from megatron.core.transformer.moe import moe_utils

assert not moe_utils.HAVE_TE, "this check needs an environment without Transformer Engine"
assert "te_general_gemm" not in vars(moe_utils)          # megatron 0.16.1 leaves it undefined
current_device = torch.cuda.current_device
cpu_path = prepare_megatron(cuda=True)                   # what initialize_parallel does on a GPU
assert cpu_path is False and not cpu_shims_enabled()     # the CPU shims stayed off
assert torch.cuda.current_device is current_device
torch.manual_seed(0)
x = torch.randn(6, 8, requires_grad=True)
w = torch.randn(4, 8, requires_grad=True)
out = moe_utils.router_gating_linear(x, w, None, torch.float32)
out.sum().backward()
xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
ref = xr @ wr.t()
ref.sum().backward()
assert torch.allclose(out, ref, atol=1e-6) and torch.allclose(x.grad, xr.grad) and torch.allclose(w.grad, wr.grad)
print("ROUTER_OK")
"""


def test_te_names_defined_on_the_cuda_path():
    r = subprocess.run([sys.executable, "-c", _CUDA_PATH], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and "ROUTER_OK" in r.stdout, r.stderr[-3000:]


def test_wrong_version_is_refused_by_name():
    with pytest.raises(CompatError, match=r"megatron-core 0\.16\.x, but megatron-core 0\.17\.0 is installed"):
        check_version("megatron-core", "0.17.0", "0.16", "moe_utils: Transformer-Engine names")
    with pytest.raises(CompatError, match=r"deepspeed 0\.19\.x, but deepspeed 0\.20\.1 is installed"):
        check_version("deepspeed", "0.20.1", "0.19", "groups tables")
    with pytest.raises(CompatError, match=r"deepspeed 0\.19\.x, but deepspeed 1\.19\.0"):
        check_version("deepspeed", "1.19.0", "0.19", "groups tables")
    check_version("megatron-core", "0.16.1", "0.16", "x")  # patch releases of the series are accepted
    check_version("deepspeed", "0.19.8+cu130", "0.19", "x")
    for package in SUPPORTED:  # the installed (pinned) releases pass every guard
        require(package, "installed")
